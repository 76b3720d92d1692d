"""DICOM in and out (the optional ``vbseg[dicom]`` extra: pydicom, highdicom, scikit-image).

* :mod:`~vbseg.io.dicom.series`: a folder holding a PET / CT / MR image series -> a
  :class:`~vbseg.io.volume.Volume` (RAS+ affine like nibabel, per-slice rescale);
* :mod:`~vbseg.io.dicom.suv`: PET in SUV body weight (QIBA convention);
* :mod:`~vbseg.io.dicom.rtstruct`: RTSTRUCT contours -> masks on a series grid, and masks ->
  an RTSTRUCT of planar contours referencing the series;
* :mod:`~vbseg.io.dicom.seg`: a probability map <-> a FRACTIONAL / PROBABILITY DICOM SEG (highdicom);
* :mod:`~vbseg.io.dicom.outputs`: what ``vbseg segment --rtstruct/--dicom-seg`` and
  ``vbseg convert`` write.

Nothing here imports pydicom or highdicom until it is used, so ``import vbseg`` works without
the extra; a missing package is an InputError naming the install command.
"""

from vbseg.io.dicom.outputs import (
    check_dicom_outputs,
    convert_rtstruct,
    default_modalities,
    dicom_output_names,
    write_posterior_dicom,
)
from vbseg.io.dicom.rtstruct import read_rtstruct_masks, rtstruct_roi_names, write_rtstruct
from vbseg.io.dicom.seg import read_probability_seg, write_probability_seg
from vbseg.io.dicom.series import (
    DicomSeries,
    SeriesInfo,
    list_series,
    load_dicom_volume,
    open_series,
    read_slices,
)
from vbseg.io.dicom.suv import pet_suv_factor

__all__ = [
    "DicomSeries",
    "SeriesInfo",
    "check_dicom_outputs",
    "convert_rtstruct",
    "default_modalities",
    "dicom_output_names",
    "list_series",
    "load_dicom_volume",
    "open_series",
    "pet_suv_factor",
    "read_probability_seg",
    "read_rtstruct_masks",
    "read_slices",
    "rtstruct_roi_names",
    "write_posterior_dicom",
    "write_probability_seg",
    "write_rtstruct",
]
