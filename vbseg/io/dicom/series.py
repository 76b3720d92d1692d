"""One DICOM image series (PET, CT, MR) from a folder, as a :class:`~vbseg.io.volume.Volume`.

Geometry (DICOM PS3.3 C.7.6.2, Image Plane Module). Every slice file carries Image Position
(Patient) p_k (mm, the centre of its first pixel), Image Orientation (Patient) (r, c): r the
direction along a row (increasing column index), c down a column (increasing row index), and
Pixel Spacing (dr, dc) = (spacing between rows, spacing between columns). Slices are ordered
by s_k = p_k . n with n = r x c, so k grows along the slice normal. With i the column index,
j the row index and k the slice index, a voxel centre is, in the patient LPS frame,

    x_LPS(i, j, k) = p_0 + i dc r + j dr c + k t,    t = (p_{K-1} - p_0) / (K - 1),

t the slice step (it also carries a gantry-tilt shear). vbseg volumes are NIfTI RAS+ like
nibabel's: x_RAS = diag(-1, -1, 1) x_LPS, and the array is ``data[i, j, k] =
slice_k[j, i]`` (shape (Columns, Rows, slices)), the layout of dcm2niix and nibabel.

Values (PS3.3 C.11.1.1, Modality LUT): value = stored x Rescale Slope + Rescale Intercept,
read from every slice (PET writers give each slice its own slope); absent tags mean 1 and 0
(MR). PET is then put in SUV body weight by :mod:`vbseg.io.dicom.suv`.

Only the files directly in the folder are read (not subfolders); files that are not DICOM
(no "DICM" preamble) and DICOM objects that are not images (RTSTRUCT, SEG, SR, ...) are
skipped. A folder holding several image series is an error that lists them; ``series_uid``
picks one. Every problem is an :class:`~vbseg.errors.InputError` naming the folder or file.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

import numpy as np

from vbseg.errors import InputError
from vbseg.io.dicom._deps import first_line, quiet_pydicom, quietly, require
from vbseg.io.dicom.suv import pet_suv_factor
from vbseg.io.image import MODALITIES, Volume, check_values

# DICOM Modality (0008,0060) -> vbseg modality.
VBSEG_MODALITY = {"PT": "pet", "CT": "ct", "MR": "mr"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Slices must lie on p_0 + k t within this fraction of the slice step (dcm2niix-like
# tolerance): a missing slice is a whole step off, scanner rounding a few micrometres.
POSITION_TOLERANCE = 0.05
ORIENTATION_TOLERANCE = 1e-4  # direction cosines of different slices must agree this closely


@dataclasses.dataclass(frozen=True, eq=False)
class SeriesInfo:
    """One image series found in a folder (what an error message lists)."""

    series_instance_uid: str
    series_number: str
    description: str
    modality: str
    files: tuple[str, ...]
    headers: tuple = dataclasses.field(repr=False, default=())

    def line(self) -> str:
        return (f"series {self.series_number or '?'} '{self.description}' ({self.modality}, "
                f"{len(self.files)} slices) UID {self.series_instance_uid}")


@dataclasses.dataclass(frozen=True, eq=False)
class DicomSeries:
    """The geometry and headers of one image series, slices in order of increasing s_k.

    Attributes:
        path: the folder.
        files: slice files, sorted along the slice normal.
        headers: their datasets without pixel data (same order); the reference for writing
            RTSTRUCT and SEG objects that point back at these slices.
        lps_affine: (4, 4) float64, voxel (i, j, k) -> LPS mm (module docstring).
        shape: (Columns, Rows, slices).
    """

    path: str
    files: tuple[str, ...]
    headers: tuple
    lps_affine: np.ndarray
    shape: tuple[int, int, int]

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) voxel -> RAS+ mm, the :class:`~vbseg.io.volume.Volume` affine of this grid."""
        return LPS_TO_RAS @ self.lps_affine

    @property
    def first(self):
        return self.headers[0]

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", ""))

    @property
    def series_instance_uid(self) -> str:
        return str(self.first.SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str | None:
        uid = self.first.get("FrameOfReferenceUID")
        return str(uid) if uid else None

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(h.SOPInstanceUID) for h in self.headers]

    def describe(self) -> dict:
        """What summary.json records about the source of a volume."""
        first = self.first
        return {
            "format": "DICOM",
            "folder": os.path.abspath(self.path),
            "modality": self.modality,
            "series_instance_uid": self.series_instance_uid,
            "series_number": str(first.get("SeriesNumber", "")),
            "series_description": str(first.get("SeriesDescription", "")),
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "slices": len(self.files),
        }


def _read_header(pydicom, file: Path):
    """The dataset without pixel data, or None when the file is not DICOM."""
    try:
        with quiet_pydicom():
            return pydicom.dcmread(file, stop_before_pixels=True)
    except Exception:  # InvalidDicomError, truncated files, undecodable values: not a series file
        return None


def _series_order(info: SeriesInfo) -> tuple:
    number = info.series_number.strip()
    return (int(number) if number.lstrip("-").isdigit() else 1 << 31, info.series_instance_uid)


def _scan(path) -> list[SeriesInfo]:
    """The image series in folder ``path``, each with its files and headers.

    Raises InputError when the folder is missing, not a folder, or holds no image series.
    """
    folder = Path(path)
    if not folder.exists():
        raise InputError(path, "DICOM folder not found")
    if not folder.is_dir():
        raise InputError(path, "is not a folder; a DICOM series is read from the folder holding "
                               "its slice files")
    pydicom = require("pydicom", path)
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    by_series: dict[str, list] = {}
    other_objects: Counter = Counter()
    not_dicom = multi_frame = 0
    for file in files:
        header = _read_header(pydicom, file)
        if header is None:
            not_dicom += 1
            continue
        is_image = all(key in header for key in ("ImagePositionPatient", "ImageOrientationPatient",
                                                 "Rows", "Columns", "SeriesInstanceUID"))
        frames = header.get("NumberOfFrames", 1)
        if not is_image or int(frames or 1) > 1:
            other_objects[str(header.get("Modality", "unknown"))] += 1
            multi_frame += int(frames or 1) > 1
            continue
        by_series.setdefault(str(header.SeriesInstanceUID), []).append((str(file), header))
    note = ", ".join(f"{n} {m}" for m, n in sorted(other_objects.items()))
    if not by_series:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not files:
            problem = "holds no files" + (" directly" if subfolders else "")
        elif note:
            problem = f"holds no single-frame DICOM image series (found {note}" + (
                "; enhanced multi-frame images are not supported)" if multi_frame else ")")
        else:
            problem = f"holds no DICOM files ({not_dicom} file(s) without the DICOM preamble)"
        if subfolders:
            problem += f"; it has subfolders ({', '.join(subfolders[:6])}): pass the one holding the slices"
        raise InputError(path, problem)
    series = []
    for uid, members in by_series.items():
        first = members[0][1]
        series.append(SeriesInfo(uid, str(first.get("SeriesNumber", "")),
                                 str(first.get("SeriesDescription", "")),
                                 str(first.get("Modality", "")), tuple(f for f, _ in members),
                                 tuple(h for _, h in members)))
    return sorted(series, key=_series_order)


@quietly
def list_series(path) -> list[SeriesInfo]:
    """The image series held directly in folder ``path``, by series number."""
    return _scan(path)


def _wanted(series_uid) -> set[str]:
    if series_uid is None:
        return set()
    if isinstance(series_uid, str):
        return {series_uid.strip()}
    return {str(uid).strip() for uid in series_uid}


@quietly
def series_held(folders, series_uid) -> set[str]:
    """The requested Series Instance UIDs that some DICOM folder among ``folders`` holds."""
    wanted = _wanted(series_uid)
    if not wanted:
        return set()
    held = {s.series_instance_uid for f in folders if os.path.isdir(f) for s in _scan(f)}
    return wanted & held


@quietly
def check_series_requested(folders, series_uid, option: str = "--series") -> None:
    """Refuse a requested UID (``--series``) that no DICOM folder among ``folders`` holds.

    :func:`_choose` reads a folder with one series whatever the UIDs say (they may be meant for
    other folders), so without this a mistyped UID would silently give whatever series the
    folder holds. Raises InputError(option, ...) naming the UIDs not found and listing the
    series each folder holds. Paths that do not exist are left to the loader, which names them.
    """
    paths = list(dict.fromkeys(os.fspath(f) for f in folders))
    if not _wanted(series_uid) or not all(os.path.exists(p) for p in paths):
        return
    missing = _wanted(series_uid) - series_held(paths, series_uid)
    if not missing:
        return
    listing = "; ".join(f"{f} holds " + ", ".join(info.line() for info in _scan(f))
                        for f in paths if os.path.isdir(f))
    raise InputError(option, f"{', '.join(sorted(missing))}: no such series in the DICOM "
                             f"inputs ({listing or 'no input is a DICOM folder'})")


def _choose(path, series: list[SeriesInfo], series_uid) -> SeriesInfo:
    """The series named by ``series_uid`` (one UID or several, one per input folder).

    A folder with one series is read whatever ``series_uid`` says (the UIDs may be meant for
    other folders); a folder with several needs exactly one of them.
    """
    wanted = _wanted(series_uid)
    chosen = [s for s in series if s.series_instance_uid in wanted]
    if len(chosen) == 1:
        return chosen[0]
    if len(series) == 1 and not chosen:
        return series[0]
    listing = "; ".join(s.line() for s in series)
    if len(chosen) > 1:
        raise InputError(path, f"several requested series UIDs are in this folder; name one: {listing}")
    if not wanted:
        raise InputError(path, f"holds {len(series)} image series, choose one with --series UID "
                               f"(series_uid=...): {listing}")
    raise InputError(path, f"none of the requested series UIDs ({', '.join(sorted(wanted))}) is "
                           f"in this folder, which holds: {listing}")


def _vector(header, key: str, size: int, file: str) -> np.ndarray:
    try:
        values = np.asarray([float(v) for v in header[key].value], np.float64)
    except (KeyError, TypeError, ValueError):
        raise InputError(file, f"{key} is missing or not numeric") from None
    if values.shape != (size,) or not np.all(np.isfinite(values)):
        raise InputError(file, f"{key} must hold {size} finite numbers, got {header[key].value!r}")
    return values


def _geometry(path, files: list[str], headers: list) -> tuple[list[int], np.ndarray, tuple]:
    """Slice order and the LPS affine of a series (module docstring); InputError when the slices
    do not form one evenly spaced grid (mixed sizes or orientations, duplicates, gaps)."""
    first = headers[0]
    rows, columns = int(first.Rows), int(first.Columns)
    orientation = _vector(first, "ImageOrientationPatient", 6, files[0])
    spacing = _vector(first, "PixelSpacing", 2, files[0])
    if np.any(spacing <= 0):
        raise InputError(files[0], f"PixelSpacing must be positive, got {spacing.tolist()}")
    along_row, along_column = orientation[:3], orientation[3:]
    norms = np.linalg.norm(along_row), np.linalg.norm(along_column)
    if min(norms) < 0.9 or abs(float(along_row @ along_column)) > 1e-3 * norms[0] * norms[1]:
        raise InputError(files[0], f"ImageOrientationPatient is not two orthogonal unit vectors: "
                                   f"{orientation.tolist()}")
    along_row, along_column = along_row / norms[0], along_column / norms[1]
    normal = np.cross(along_row, along_column)
    positions = []
    for file, header in zip(files, headers):
        if (int(header.Rows), int(header.Columns)) != (rows, columns):
            raise InputError(path, f"slices differ in size: {Path(files[0]).name} is {columns} x "
                                   f"{rows}, {Path(file).name} is {header.Columns} x {header.Rows}")
        if int(header.get("SamplesPerPixel", 1) or 1) != 1:
            raise InputError(file, "colour images (SamplesPerPixel > 1) are not a scan series")
        other = _vector(header, "ImageOrientationPatient", 6, file)
        if np.max(np.abs(other - orientation)) > ORIENTATION_TOLERANCE:
            raise InputError(path, f"slices differ in orientation: {Path(files[0]).name} "
                                   f"{orientation.tolist()}, {Path(file).name} {other.tolist()}")
        if np.max(np.abs(_vector(header, "PixelSpacing", 2, file) - spacing)) > 1e-4:
            raise InputError(path, f"slices differ in PixelSpacing ({Path(files[0]).name}, "
                                   f"{Path(file).name})")
        positions.append(_vector(header, "ImagePositionPatient", 3, file))
    positions = np.asarray(positions)
    heights = positions @ normal
    order = [int(k) for k in np.argsort(heights, kind="stable")]
    positions, heights = positions[order], heights[order]
    names = [Path(files[k]).name for k in order]
    count = len(order)
    if count > 1:
        gaps = np.diff(heights)
        if np.min(gaps) < 1e-3:
            k = int(np.argmin(gaps))
            raise InputError(path, f"two slices at the same position ({names[k]} and {names[k + 1]}, "
                                   f"{heights[k]:.3f} mm along the normal): several acquisitions "
                                   f"or time frames in one series are not supported")
        step = (positions[-1] - positions[0]) / (count - 1)
        expected = positions[0] + np.arange(count)[:, None] * step
        misplacement = np.linalg.norm(positions - expected, axis=1)
        if np.max(misplacement) > POSITION_TOLERANCE * np.linalg.norm(step):
            k = int(np.argmax(np.abs(gaps - gaps.mean())))
            raise InputError(path, f"slices are not evenly spaced: {gaps[k]:.3f} mm between "
                                   f"{names[k]} and {names[k + 1]}, {np.median(gaps):.3f} mm "
                                   f"elsewhere (a missing slice?)")
    else:
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
        if not thickness or float(thickness) <= 0:
            raise InputError(path, "a single slice without SpacingBetweenSlices or SliceThickness "
                                   "has no slice step")
        step = normal * float(thickness)
    lps = np.eye(4)
    lps[:3, 0] = along_row * spacing[1]
    lps[:3, 1] = along_column * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return order, lps, (columns, rows, count)


@quietly
def open_series(path, series_uid=None) -> DicomSeries:
    """Headers and geometry of the image series in folder ``path`` (no pixel data read).

    ``series_uid``: a Series Instance UID (or several, one per folder) choosing among several
    series in the folder. Raises InputError for every problem (see module docstring).
    """
    path = os.fspath(path)
    found = _scan(path)
    info = _choose(path, found, series_uid)
    headers = list(info.headers)
    order, lps, shape = _geometry(path, list(info.files), headers)
    return DicomSeries(path, tuple(info.files[k] for k in order), tuple(headers[k] for k in order),
                       lps, shape)


def _number(header, key: str, default: float, file: str) -> float:
    value = header.get(key)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(file, f"{key} is not a number: {value!r}") from None
    if not np.isfinite(number):
        raise InputError(file, f"{key} is not finite")
    return number


@quietly
def read_slices(series: DicomSeries, factor: float = 1.0) -> np.ndarray:
    """factor x (stored x slope + intercept), slope and intercept per slice, computed in float64,
    as float32 (Columns, Rows, slices)."""
    pydicom = require("pydicom", series.path)
    data = np.empty(series.shape, np.float32)
    columns, rows, _ = series.shape
    for k, file in enumerate(series.files):
        try:
            dataset = pydicom.dcmread(file)
        except Exception as exc:
            raise InputError(file, f"cannot be read as DICOM ({first_line(exc)})") from None
        try:
            stored = dataset.pixel_array
        except Exception as exc:  # missing decoder plug-ins, truncated pixel data
            syntax = getattr(dataset.file_meta, "TransferSyntaxUID", "unknown")
            raise InputError(file, f"pixel data cannot be decoded (transfer syntax {syntax}: "
                                   f"{first_line(exc)})") from None
        if stored.shape != (rows, columns):
            raise InputError(file, f"pixel data of shape {stored.shape}, expected {(rows, columns)}")
        slope = _number(dataset, "RescaleSlope", 1.0, file)
        intercept = _number(dataset, "RescaleIntercept", 0.0, file)
        data[:, :, k] = ((stored.astype(np.float64) * slope + intercept) * factor).T
    return data


@quietly
def load_dicom_volume(path, modality: str | None = None, *, series_uid=None):
    """Read a DICOM image series folder into a :class:`~vbseg.io.volume.Volume`.

    Args:
        path: folder holding the slices of one series (or several, with ``series_uid``).
        modality: vbseg modality; None takes it from the header (PT -> pet, CT -> ct,
            MR -> mr, else other). A modality that contradicts the header is an error.
        series_uid: Series Instance UID(s) choosing the series (see :func:`open_series`).
    Returns:
        Volume with float32 data (PET in SUVbw, :func:`vbseg.io.dicom.suv.pet_suv_factor`; CT in
        HU; others in the file's units), the RAS+ affine, and ``source``: the series'
        identity and how its values were converted (for summary.json).
    """
    return volume_from_series(open_series(os.fspath(path), series_uid), modality)


@quietly
def volume_from_series(series: DicomSeries, modality: str | None = None):
    """The :class:`~vbseg.io.volume.Volume` of an opened series (see :func:`load_dicom_volume`)."""
    path = series.path
    from_header = VBSEG_MODALITY.get(series.modality, "other")
    if modality is None:
        modality = from_header
    if modality not in MODALITIES:
        raise InputError(path, f"unknown modality {modality!r} (expected one of {MODALITIES})")
    if modality != "other" and from_header != "other" and modality != from_header:
        raise InputError(path, f"the DICOM header says Modality {series.modality}, not {modality}: "
                               f"name it {from_header} (--modality, or modalities=)")
    source = series.describe()
    factor = 1.0
    if series.modality == "PT":
        factor, source["values"] = pet_suv_factor(series)
    else:
        source["values"] = {"units": str(series.first.get("RescaleType", "") or
                                         ("HU" if series.modality == "CT" else "as stored")),
                            "conversion": "stored x RescaleSlope + RescaleIntercept, per slice "
                                          "(DICOM PS3.3 C.11.1.1)"}
    data = read_slices(series, factor)
    check_values(path, data)
    return Volume(data, series.affine, modality, path, source=source)
