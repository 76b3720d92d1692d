"""A probability map <-> DICOM Segmentation (PS3.3 A.51, C.8.20) of type FRACTIONAL / PROBABILITY.

A FRACTIONAL segmentation stores each pixel as an integer v in 0..M with M the Maximum
Fractional Value (0062,000E); with Segmentation Fractional Type (0062,0010) PROBABILITY,
v / M is the probability that the pixel belongs to the segment (C.8.20.2.3). vbseg writes
M = 255 (8 bits), so a probability p is stored as round(255 p) and read back within 1/510.
One frame per slice of the reference series, referencing it (Derivation Image and Source
Image sequences), so viewers overlay it on the series without resampling; frames that are
all zero are omitted, as the standard allows. The object is built by highdicom
(``highdicom.seg.Segmentation``), which fills the multi-frame functional groups.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np

from vbseg.errors import InputError
from vbseg.io.dicom._deps import first_line, quietly, require
from vbseg.io.dicom.rtstruct import software_version
from vbseg.io.writing import write_with

MAX_FRACTIONAL_VALUE = 255


# Patient and General Study attributes of type 2 (PS3.3 C.7.1.1, C.7.2.1): highdicom copies them
# from the first source image and needs them present, if empty; many exported series drop them.
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                       "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _with_type2_attributes(headers) -> list:
    first = copy.deepcopy(headers[0])
    for key in TYPE2_PATIENT_STUDY:
        if key not in first:
            setattr(first, key, "")
    return [first, *headers[1:]]


@quietly
def write_probability_seg(path, series, probability: np.ndarray, *,
                          label: str = "vbseg P(tumour)", description: str = "") -> Path:
    """Write P(tumour) on ``series``' grid as a FRACTIONAL / PROBABILITY DICOM SEG, atomically.

    Args:
        path: the .dcm file to write.
        series: :class:`vbseg.io.dicom.series.DicomSeries`, the grid of ``probability``.
        probability: (I, J, K) values in [0, 1] on the series grid (Volume axes: i along a row).
        label, description: Segment Label and Content Description.
    """
    hd = require("highdicom", path)
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    probability = np.asarray(probability, np.float64)
    if probability.shape != series.shape:
        raise InputError(path, f"probability map of shape {probability.shape} is not on the grid of "
                               f"{series.path} {series.shape}")
    if not np.all(np.isfinite(probability)) or probability.min() < 0 or probability.max() > 1:
        raise InputError(path, "probabilities must be finite and in [0, 1]")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="vbseg", version=software_version(),
        # The hidden Potts prior couples each voxel's label with its neighbours'.
        family=codes.cid7162.NeighborhoodAnalysis)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    frames = probability.transpose(2, 1, 0)  # (slices, Rows, Columns), one frame per source slice
    try:
        seg = hd.seg.Segmentation(
            source_images=_with_type2_attributes(series.headers), pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            max_fractional_value=MAX_FRACTIONAL_VALUE, segment_descriptions=[segment],
            series_instance_uid=generate_uid(), series_number=9002,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="vbseg",
            manufacturer_model_name="vbseg", software_versions=software_version(),
            device_serial_number="none", content_label="VBSEG",
            content_description=(description or label)[:64])
    except (ValueError, TypeError, AttributeError) as exc:  # headers highdicom cannot use
        raise InputError(series.path, f"cannot build a DICOM SEG on this series "
                                      f"({first_line(exc)})") from None
    return write_with(path, lambda tmp: seg.save_as(tmp))


@quietly
def read_probability_seg(path, series, segment_number: int = 1) -> np.ndarray:
    """Read a FRACTIONAL segment of a DICOM SEG back onto ``series``' grid.

    Frames are matched to slices by their source SOP Instance UIDs; slices without a frame
    are 0. Returns float32 (I, J, K) values v / M in [0, 1].

    Raises InputError when the file is missing or not a SEG, is not FRACTIONAL, or is not
    derived from the series (frame of reference or source images).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(path, "DICOM SEG file not found")
    hd = require("highdicom", path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise InputError(path, f"cannot be read as a DICOM SEG ({first_line(exc)})") from None
    if str(seg.SegmentationType) != "FRACTIONAL":
        raise InputError(path, f"SegmentationType is {seg.SegmentationType}, not FRACTIONAL")
    frame = str(seg.get("FrameOfReferenceUID", ""))
    if series.frame_of_reference_uid and frame and frame != series.frame_of_reference_uid:
        raise InputError(path, f"frame of reference {frame} is not that of {series.path}")
    sources = {str(uid) for _, _, uid in seg.get_source_image_uids()}
    uids = series.sop_instance_uids
    if not sources & set(uids):
        raise InputError(path, f"is not derived from the series in {series.path} (no source "
                               f"image of the SEG is one of its slices)")
    try:
        stack = seg.get_pixels_by_source_instance(
            uids, segment_numbers=[segment_number], assert_missing_frames_are_empty=True,
            rescale_fractional=True, dtype=np.float32)
    except (ValueError, KeyError, IndexError) as exc:
        raise InputError(path, f"segment {segment_number} cannot be read on {series.path} "
                               f"({first_line(exc)})") from None
    return np.ascontiguousarray(stack[..., 0].transpose(2, 1, 0), dtype=np.float32)
