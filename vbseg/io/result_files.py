"""Names of the files of a result set that more than one module must know: the writers
(:mod:`vbseg.io.dicom.outputs`) and the result folder that replaces a previous set whole
(:mod:`vbseg.io.result_folder`). A leaf module, so neither imports the other."""

RTSTRUCT_NAME = "contours_rtstruct.dcm"
SEG_NAME = "prob_seg.dcm"
