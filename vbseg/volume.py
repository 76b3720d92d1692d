"""Reading images: validated NIfTI input (and DICOM series through :mod:`vbseg.dicom`).

The image type lives in :mod:`vbseg.image` and the atomic writers in :mod:`vbseg.writing`;
both are re-exported here, so ``from vbseg.volume import Volume, save_nifti`` keeps working.

A :class:`Volume` is a 3D array plus the 4x4 voxel-to-world affine of its grid (NIfTI RAS+
millimetres, as nibabel reports it). Everything that reads a user's file goes through
:func:`load_volume` / :func:`load_mask` (NIfTI files; :func:`load_volume` hands a folder to the
DICOM series reader, :mod:`vbseg.dicom`), which check the file once at the edge and raise
:class:`~vbseg.errors.InputError` naming the file and the problem; arrays inside vbseg are
then known to be finite, 3D and numeric. Everything that writes goes through
:func:`save_nifti` / :func:`write_text_atomic`: a temporary file in the target folder,
renamed over the target only when complete, so an interrupted run never leaves a
half-written output.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from vbseg.dicom import load_dicom_volume
from vbseg.errors import InputError
from vbseg.image import (  # noqa: F401  (re-exported: the image type and grid helpers)
    AFFINE_ATOL_MM,
    MAX_VOXEL_MM,
    MODALITIES,
    Volume,
    check_values,
    parse_box,
    resample_onto,
)
from vbseg.writing import (  # noqa: F401  (re-exported: the atomic writers)
    current_umask,
    save_nifti,
    save_volume,
    sha256_file,
    write_text_atomic,
    write_with,
)


def _read_nifti(path: str | os.PathLike) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """Open ``path`` with nibabel and return (image, raw array); InputError on any failure."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    if os.path.isdir(path):
        raise InputError(path, "is a directory, expected a NIfTI file (.nii or .nii.gz)")
    try:
        image = nib.load(path)
        dtype = image.get_data_dtype()
    except Exception as exc:  # nibabel raises many types for unreadable files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"cannot be read as a NIfTI image ({first_line})") from None
    if dtype.fields is not None or not (
        np.issubdtype(dtype, np.integer)
        or np.issubdtype(dtype, np.floating)
        or np.issubdtype(dtype, np.bool_)
    ):
        raise InputError(path, f"voxel type {dtype} is not a real number type")
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"voxel data cannot be read ({first_line})") from None
    # Trailing singleton axes (e.g. a 4D file with one time point) carry no information.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D image, got shape {tuple(data.shape)}")
    if min(data.shape) < 1:
        raise InputError(path, f"image has an empty axis, shape {tuple(data.shape)}")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "the voxel-to-world affine is singular or not finite")
    return image, data


def load_volume(path: str | os.PathLike, modality: str = "other", *, series_uid=None) -> Volume:
    """Read and validate a 3D image: a NIfTI file, or a folder holding a DICOM series.

    A folder goes to :func:`vbseg.dicom.load_dicom_volume` (PET in SUV, CT in HU; ``series_uid``
    picks one of several series in it; needs the ``vbseg[dicom]`` extra).

    Raises InputError (naming ``path``) when the file is missing or unreadable, not 3D, of a
    non-numeric voxel type, holds NaN or infinite voxels, is constant, or has voxels over
    MAX_VOXEL_MM.
    """
    if modality not in MODALITIES:
        raise InputError(path, f"unknown modality {modality!r} (expected one of {MODALITIES})")
    if os.path.isdir(path):
        volume = load_dicom_volume(path, modality, series_uid=series_uid)
    else:
        image, raw = _read_nifti(path)
        data = np.asarray(raw, dtype=np.float32)
        check_values(path, data)
        volume = Volume(data, np.asarray(image.affine, np.float64), modality, os.fspath(path))
    if volume.spacing.max() > MAX_VOXEL_MM:
        sizes = " x ".join(f"{size:g}" for size in volume.spacing)
        raise InputError(path, f"voxel size {sizes} mm is over {MAX_VOXEL_MM:g} mm: the header's "
                               "affine is not in millimetres, or is broken")
    return volume


def _read_on_grid(path, reference: Volume, what: str) -> np.ndarray:
    """A NIfTI file's voxels, which must lie on ``reference``'s grid and be finite."""
    image, raw = _read_nifti(path)
    path = os.fspath(path)
    affine = np.asarray(image.affine, np.float64)
    if tuple(raw.shape) != reference.shape or not np.allclose(
        affine, reference.affine, atol=AFFINE_ATOL_MM
    ):
        raise InputError(
            path,
            f"{what} grid (shape {tuple(raw.shape)}) differs from the grid of {reference.name} "
            f"(shape {reference.shape}); it must be on the first image's grid",
        )
    values = np.asarray(raw)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
        raise InputError(path, f"{what} holds NaN or infinite voxels")
    return values


def load_mask(path: str | os.PathLike, reference: Volume) -> np.ndarray:
    """Read a binary mask (non-zero = inside) that must lie on ``reference``'s grid.

    Raises InputError when the file is unreadable, on another grid (shape or affine), holds
    NaN, or is empty.
    """
    mask = _read_on_grid(path, reference, "mask") != 0
    if not mask.any():
        raise InputError(os.fspath(path), "mask is empty (no non-zero voxel)")
    return mask


def load_map(path: str | os.PathLike, reference: Volume, what: str = "map") -> np.ndarray:
    """Read a real-valued map (e.g. prior log-odds) on ``reference``'s grid: float32; a constant
    map is allowed. InputError when unreadable, on another grid, or not finite."""
    return _read_on_grid(path, reference, what).astype(np.float32)


