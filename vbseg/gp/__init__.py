"""Gaussian-process fields: kernels on grids (:mod:`~vbseg.gp.kernels`), the NumPyro programs
(:mod:`~vbseg.gp.model`), the fit and its start (:mod:`~vbseg.gp.fit`, :mod:`~vbseg.gp.start`) and
the gp and deep-gp methods (:mod:`~vbseg.gp.method`)."""
