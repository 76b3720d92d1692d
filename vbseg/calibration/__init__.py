"""Distribution-free guarantees: split conformal and risk control
(:mod:`~vbseg.calibration.conformal`), the calibration file and ``segment --calibration``
(:mod:`~vbseg.calibration.calibration_file`), and ``vbseg calibrate``
(:mod:`~vbseg.calibration.calibrate`)."""
