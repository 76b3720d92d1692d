"""Names of the files of a result set that more than one module must know: the writers
(:mod:`vbseg.io.dicom.outputs`) and the result folder that replaces a previous set whole
(:mod:`vbseg.io.result_folder`). A leaf module, so neither imports the other."""

RTSTRUCT_NAME = "contours_rtstruct.dcm"
SEG_NAME = "prob_seg.dcm"
# maps a method writes beside prob.nii.gz (MethodResult.maps)
FRACTION_FILE = "fraction.nii.gz"  # pv-potts: E[f]
LOCATOR_FILE = "locator_prob.nii.gz"  # locate-potts: the locator's P(tumour)
DELINEATION_FILE = "delineation_prob.nii.gz"  # locate-potts: the delineation's P(tumour) in its box
