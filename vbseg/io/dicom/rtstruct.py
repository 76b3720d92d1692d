"""RTSTRUCT (DICOM RT Structure Set, PS3.3 A.19) contours <-> masks on a series grid.

Reading (:func:`read_rtstruct_masks`). An ROI (Structure Set ROI Sequence, C.8.8.5) has closed
planar contours (ROI Contour Module, C.8.8.6): points in patient LPS mm, each contour in one
image plane. Points go to voxel coordinates through the inverse of the series' LPS affine
(:mod:`vbseg.io.dicom.series`), so a contour has a slice index k and a polygon in (i, j). A voxel
(i, j, k) is inside when its centre is inside the polygon by the even-odd rule; several
polygons on one plane combine by XOR (a contour inside another is a hole), which is how
planning systems read them and reproduces the NIfTI labels of the shared sarcoma cases exactly.
Each contour is put on the slice its Contour Image Sequence names when that SOP Instance is in
the series, else on the nearest slice by position, with a :class:`ContourPlacementWarning`
(exports that crop a series often leave stale per-slice references, as in the IBSI sarcoma
RTSTRUCTs). A structure set whose frame of reference or referenced series is not the
series' is refused.

Writing (:func:`write_rtstruct`). Each mask plane is contoured by marching squares
(scikit-image ``measure.find_contours``) at level 0.5 of the 0/1 mask, padded so every
contour closes: the polygon passes through the midpoints between inside and outside voxel
centres (cutting corners diagonally), so the even-odd rasterisation above gives the mask back
voxel for voxel, holes included. Vertices go to LPS through the series geometry, and every
contour references its slice (SOP Instance UID) and the series' frame of reference. The
dataset is written with pydicom by hand: highdicom has no RTSTRUCT class, and rt-utils
(1.2.7) refuses structure sets with stale per-slice references on reading and, on writing,
traces the centres of the boundary voxels (OpenCV ``findContours``), so its polygons enclose
about half a voxel less than the mask on every side.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from vbseg.errors import InputError
from vbseg.io.dicom._deps import first_line, quietly, require
from vbseg.io.writing import write_with

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
# RT Referenced Study Sequence items name the study by this class (PS3.3 C.8.8.5.1, the
# retired Detached Study Management SOP Class, which planning systems still expect).
STUDY_REFERENCE_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
PLANE_TOLERANCE = 0.25  # slice units: a contour farther than this from a slice centre is "between"


class ContourPlacementWarning(UserWarning):
    """Contours placed on slices by position rather than by their per-slice references."""


def _read_structure_set(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(path, "RTSTRUCT file not found" if not os.path.exists(path)
                         else "is not a file (an RTSTRUCT is one .dcm file)")
    pydicom = require("pydicom", path)
    try:
        dataset = pydicom.dcmread(path)
    except Exception as exc:
        raise InputError(path, f"cannot be read as DICOM ({first_line(exc)})") from None
    if str(dataset.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS and dataset.get("Modality") != "RTSTRUCT":
        raise InputError(path, f"is not an RTSTRUCT (Modality {dataset.get('Modality', 'missing')})")
    if "StructureSetROISequence" not in dataset:
        raise InputError(path, "RTSTRUCT has no StructureSetROISequence")
    return dataset


def _roi_table(dataset) -> dict[str, dict]:
    """ROI name -> {number, frame_of_reference}."""
    return {str(item.get("ROIName", "")): {"number": int(item.ROINumber),
                                           "frame": str(item.get("ReferencedFrameOfReferenceUID", ""))}
            for item in dataset.StructureSetROISequence}


@quietly
def rtstruct_roi_names(path) -> list[str]:
    """ROI names of an RTSTRUCT file, in file order."""
    return list(_roi_table(_read_structure_set(path)))


def fill_polygon(shape: tuple[int, int], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Voxel centres (i, j) of an (I, J) plane inside the closed polygon (xs, ys), even-odd rule.

    Scanline form: on row j the polygon's edges cross y = j at x_e (an edge counts when one
    end is at y <= j and the other at y > j, so a vertex on the line counts once); centre
    (i, j) is inside when an odd number of crossings have x_e <= i, i.e. the ray from (i, j)
    towards -x crosses the boundary an odd number of times. Returns bool (I, J).
    """
    ni, nj = shape
    inside = np.zeros(shape, bool)
    lo, hi = max(0, int(np.ceil(ys.min()))), min(nj - 1, int(np.floor(ys.max())))
    if lo > hi:
        return inside
    x0, y0, x1, y1 = xs, ys, np.roll(xs, -1), np.roll(ys, -1)
    rows = np.arange(lo, hi + 1, dtype=np.float64)[:, None]
    straddles = (y0 <= rows) != (y1 <= rows)
    row_index, edge_index = np.nonzero(straddles)
    y_start, y_end = y0[edge_index], y1[edge_index]
    crossing = x0[edge_index] + (rows[row_index, 0] - y_start) * (
        (x1[edge_index] - x0[edge_index]) / (y_end - y_start))
    first_centre = np.clip(np.ceil(crossing), 0, ni).astype(np.int64)  # first i with x_e <= i
    toggles = np.zeros((hi - lo + 1, ni + 1), np.int64)
    np.add.at(toggles, (row_index, first_centre), 1)
    inside[:, lo:hi + 1] = (np.cumsum(toggles[:, :ni], axis=1) % 2).T.astype(bool)
    return inside


def _check_references(path, dataset, series, roi_name: str, frame: str) -> None:
    series_frame = series.frame_of_reference_uid
    if frame and series_frame and frame != series_frame:
        raise InputError(path, f"ROI '{roi_name}' is in frame of reference {frame}, the images in "
                               f"{series.path} in {series_frame}")
    referenced_series, frames = set(), set()
    for frame_item in dataset.get("ReferencedFrameOfReferenceSequence") or []:
        frames.add(str(frame_item.get("FrameOfReferenceUID", "")))
        for study in frame_item.get("RTReferencedStudySequence") or []:
            for item in study.get("RTReferencedSeriesSequence") or []:
                referenced_series.add(str(item.get("SeriesInstanceUID", "")))
    frames.discard("")
    if not frame and series_frame and frames and series_frame not in frames:
        raise InputError(path, f"RTSTRUCT frame of reference {', '.join(sorted(frames))} is not "
                               f"that of the images in {series.path} ({series_frame})")
    referenced_series.discard("")
    if referenced_series and series.series_instance_uid not in referenced_series:
        raise InputError(path, f"RTSTRUCT references series {', '.join(sorted(referenced_series))}, "
                               f"not the series in {series.path} ({series.series_instance_uid})")


@quietly
def read_rtstruct_masks(path, series, roi_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Rasterise RTSTRUCT ROIs onto a series grid (module docstring for the rules).

    Args:
        path: the RTSTRUCT file.
        series: :class:`vbseg.io.dicom.series.DicomSeries` the contours belong to.
        roi_names: ROIs to read (default all).
    Returns:
        ROI name -> bool (I, J, K) mask on the series grid (Volume axes).
    Raises:
        InputError: unreadable or not an RTSTRUCT, unknown ROI name, frame of reference or
        referenced series not the series', malformed contour data.
    Warns:
        ContourPlacementWarning when contours are placed by position (stale or absent
        per-slice references), lie between slices, or fall outside the series.
    """
    path = os.fspath(path)
    dataset = _read_structure_set(path)
    table = _roi_table(dataset)
    names = list(table) if roi_names is None else list(roi_names)
    for name in names:
        if name not in table:
            raise InputError(path, f"no ROI named '{name}' (ROIs: {', '.join(table) or 'none'})")
    to_voxel = np.linalg.inv(series.lps_affine)
    slice_of = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
    contours_by_number = {int(item.ReferencedROINumber): item.get("ContourSequence") or []
                          for item in dataset.get("ROIContourSequence") or []}
    ni, nj, nk = series.shape
    counts = dict.fromkeys(("unreferenced", "disagree", "between", "outside", "skipped", "total"), 0)
    masks = {}
    for name in names:
        _check_references(path, dataset, series, name, table[name]["frame"])
        mask = np.zeros(series.shape, bool)
        for contour in contours_by_number.get(table[name]["number"], []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                counts["skipped"] += 1
                continue
            try:
                points = np.asarray([float(v) for v in contour.ContourData], np.float64).reshape(-1, 3)
            except (AttributeError, ValueError):
                raise InputError(path, f"ROI '{name}': ContourData is not a list of x, y, z "
                                       f"triplets") from None
            if len(points) < 3 or not np.all(np.isfinite(points)):
                raise InputError(path, f"ROI '{name}': a contour has fewer than 3 finite points")
            counts["total"] += 1
            voxel = (to_voxel[:3, :3] @ points.T + to_voxel[:3, 3:4]).T
            height = float(voxel[:, 2].mean())
            if np.ptp(voxel[:, 2]) > 2 * PLANE_TOLERANCE:
                raise InputError(path, f"ROI '{name}': a contour is not in an image plane of "
                                       f"{series.path} (spans {np.ptp(voxel[:, 2]):.2f} slices)")
            images = contour.get("ContourImageSequence") or []
            referenced = [slice_of.get(str(im.get("ReferencedSOPInstanceUID", ""))) for im in images]
            k = referenced[0] if referenced else None
            if k is None:
                counts["unreferenced"] += 1
            elif abs(k - height) > PLANE_TOLERANCE:
                counts["disagree"] += 1
                k = None
            if k is None:
                k = int(np.rint(height))
                if abs(k - height) > PLANE_TOLERANCE:
                    counts["between"] += 1
            if not 0 <= k < nk:
                counts["outside"] += 1
                continue
            mask[:, :, k] ^= fill_polygon((ni, nj), voxel[:, 0], voxel[:, 1])
        masks[name] = mask
    _warn_placement(path, counts)
    return masks


def _warn_placement(path, counts: dict) -> None:
    notes = []
    if counts["unreferenced"]:
        notes.append(f"{counts['unreferenced']} of {counts['total']} contours reference no image of "
                     f"the series (stale or absent per-slice SOP Instance UIDs) and were placed on "
                     f"the nearest slice by position")
    if counts["disagree"]:
        notes.append(f"{counts['disagree']} contours lie on another slice than the one they "
                     f"reference and were placed by position")
    if counts["between"]:
        notes.append(f"{counts['between']} lie between slices")
    if counts["outside"]:
        notes.append(f"{counts['outside']} lie outside the series and were dropped")
    if counts["skipped"]:
        notes.append(f"{counts['skipped']} are not CLOSED_PLANAR and were ignored")
    if notes:
        warnings.warn(f"{path}: " + "; ".join(notes), ContourPlacementWarning, stacklevel=3)


def mask_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (n, 2) in (i, j) voxel coordinates around the True voxels of a plane.

    Marching squares at level 0.5 on the zero-padded 0/1 plane (module docstring); the
    repeated closing vertex is dropped.
    """
    measure = require("skimage.measure", "RTSTRUCT")
    padded = np.pad(plane.astype(np.float64), 1)
    polygons = []
    for contour in measure.find_contours(padded, 0.5):
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        if len(contour) >= 3:
            polygons.append(contour - 1.0)
    return polygons


def _ds_text(values: np.ndarray) -> list[str]:
    """Decimal strings of at most 16 characters (DS), to 0.1 micrometre."""
    texts = []
    for value in np.round(values, 4).ravel():
        text = f"{value:.4f}".rstrip("0").rstrip(".")
        texts.append("0" if text in ("-0", "") else text)
    return texts


def _copy_patient_and_study(target, source) -> None:
    """Patient and General Study module attributes (PS3.3 C.7.1.1, C.7.2.1) of the series."""
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                "StudyDescription"):
        setattr(target, key, source.get(key, ""))


def _image_reference(pydicom, header):
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    return item


@quietly
def build_rtstruct(series, rois: Sequence[tuple[str, np.ndarray]], *,
                   colours: Sequence[Sequence[int]] | None = None,
                   descriptions: Sequence[str] | None = None, label: str = "vbseg"):
    """The RTSTRUCT dataset (module docstring) for masks on ``series``' grid."""
    pydicom = require("pydicom", series.path)
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    frame = series.frame_of_reference_uid
    if not frame:
        raise InputError(series.path, "the series has no FrameOfReferenceUID; RTSTRUCT contours "
                                      "need one")
    for name, mask in rois:
        if np.shape(mask) != series.shape:
            raise InputError(series.path, f"mask '{name}' has shape {np.shape(mask)}, the series "
                                          f"grid is {series.shape}")
    now = datetime.datetime.now()
    first = series.first
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    _copy_patient_and_study(ds, first)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9001
    ds.SeriesDescription = f"{label} probability contours"
    ds.Manufacturer = "vbseg"
    ds.ManufacturerModelName = "vbseg"
    ds.SoftwareVersions = software_version()
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = frame
    ds.StructureSetLabel = label[:16]
    ds.StructureSetName = label[:64]
    ds.StructureSetDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ApprovalStatus = "UNAPPROVED"

    series_item = pydicom.Dataset()
    series_item.SeriesInstanceUID = series.series_instance_uid
    series_item.ContourImageSequence = [_image_reference(pydicom, h) for h in series.headers]
    study_item = pydicom.Dataset()
    study_item.ReferencedSOPClassUID = STUDY_REFERENCE_SOP_CLASS
    study_item.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_item.RTReferencedSeriesSequence = [series_item]
    frame_item = pydicom.Dataset()
    frame_item.FrameOfReferenceUID = frame
    frame_item.RTReferencedStudySequence = [study_item]
    ds.ReferencedFrameOfReferenceSequence = [frame_item]

    roi_items, contour_items, observation_items = [], [], []
    lps = series.lps_affine
    for number, (name, mask) in enumerate(rois, start=1):
        roi = pydicom.Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame
        roi.ROIName = name[:64]
        if descriptions is not None:
            roi.ROIDescription = descriptions[number - 1][:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_items.append(roi)
        contour_item = pydicom.Dataset()
        contour_item.ReferencedROINumber = number
        contour_item.ROIDisplayColor = list(colours[number - 1]) if colours is not None else [255, 0, 0]
        contours = []
        mask = np.asarray(mask, bool)
        for k in np.flatnonzero(mask.any(axis=(0, 1))):
            for polygon in mask_contours(mask[:, :, k]):
                voxel = np.column_stack([polygon, np.full(len(polygon), float(k)),
                                         np.ones(len(polygon))])
                world = (lps @ voxel.T)[:3].T
                contour = pydicom.Dataset()
                contour.ContourImageSequence = [_image_reference(pydicom, series.headers[k])]
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(world)
                contour.ContourNumber = len(contours) + 1
                contour.ContourData = _ds_text(world)
                contours.append(contour)
        contour_item.ContourSequence = contours
        contour_items.append(contour_item)
        observation = pydicom.Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.ROIObservationLabel = name[:16]
        # Type 2, left empty: a probability contour is not a clinical GTV/CTV by itself.
        observation.RTROIInterpretedType = ""
        observation.ROIInterpreter = ""
        observation_items.append(observation)
    ds.StructureSetROISequence = roi_items
    ds.ROIContourSequence = contour_items
    ds.RTROIObservationsSequence = observation_items
    return ds


def software_version() -> str:
    """vbseg's installed version, written into the DICOM objects it makes."""
    try:
        return metadata.version("vbseg")
    except metadata.PackageNotFoundError:
        return "unknown"


@quietly
def write_rtstruct(path, series, rois: Sequence[tuple[str, np.ndarray]], **options) -> Path:
    """Write masks on ``series``' grid as an RTSTRUCT file, atomically.

    Args:
        path: the .dcm file to write.
        series: :class:`vbseg.io.dicom.series.DicomSeries` the masks lie on (its slices are
            referenced; patient and study are copied from it).
        rois: (ROI name, bool (I, J, K) mask) pairs, one ROI each, numbered from 1.
        options: ``colours`` (RGB per ROI), ``descriptions`` (per ROI), ``label``.
    """
    dataset = build_rtstruct(series, rois, **options)
    return write_with(path, lambda tmp: dataset.save_as(tmp, enforce_file_format=True))
