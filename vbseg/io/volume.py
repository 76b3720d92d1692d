"""Reading images: validated NIfTI, NRRD, MetaImage, MGH and Analyze input (and DICOM series
through :mod:`vbseg.io.dicom`).

The image type lives in :mod:`vbseg.io.image` and the atomic writers in :mod:`vbseg.io.writing`;
both are re-exported here, so ``from vbseg.io.volume import Volume, save_nifti`` keeps working.

A :class:`Volume` is a 3D array plus the 4x4 voxel-to-world affine of its grid (NIfTI RAS+
millimetres, as nibabel reports it; NRRD and MetaImage grids, LPS in ITK, are converted by
:mod:`vbseg.io.itk_files`). Everything that reads a user's file goes through :func:`load_volume` /
:func:`load_mask` / :func:`load_map` / :func:`read_label` / :func:`read_image_grid` (image files
of any of these formats, one reader and one set of checks, :func:`read_image_file`; case
indexes, training, priors and experiments read through them too; :func:`load_volume` hands a
folder to the DICOM series reader, :mod:`vbseg.io.dicom`), which check the file once at the edge
and raise
:class:`~vbseg.errors.InputError` naming the file and the problem; arrays inside vbseg are
then known to be finite, 3D and numeric. Outputs are NIfTI. Everything that writes goes through
:func:`save_nifti` / :func:`write_text_atomic`: a temporary file in the target folder,
renamed over the target only when complete, so an interrupted run never leaves a
half-written output.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from vbseg.errors import InputError
from vbseg.io.dicom import load_dicom_volume
from vbseg.io.image import (  # noqa: F401  (re-exported: the image type and grid helpers)
    AFFINE_ATOL_MM,
    MAX_VOXEL_MM,
    MODALITIES,
    Volume,
    check_values,
    parse_box,
    resample_onto,
)
from vbseg.io.itk_files import itk_reader, itk_suffix, read_itk_voxels
from vbseg.io.writing import (  # noqa: F401  (re-exported: the atomic writers)
    current_umask,
    save_nifti,
    save_volume,
    sha256_file,
    write_text_atomic,
    write_with,
)

# suffix (lower case) -> the format's name in messages, for the formats nibabel reads. Analyze
# 7.5 stores no orientation: nibabel gives its grid the radiological (x flipped) convention
# (a NIfTI pair, .hdr/.img with the NIfTI magic, keeps its own orientation).
NIBABEL_FORMATS = {".nii": "NIfTI", ".nii.gz": "NIfTI", ".mgz": "MGH", ".mgh": "MGH",
                   ".hdr": "Analyze", ".img": "Analyze"}
IMAGE_FILE_TYPES = ("a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), "
                    "MGH (.mgz, .mgh) or Analyze (.hdr/.img) file")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def nibabel_format(path) -> str | None:
    """The name of the nibabel format ``path``'s suffix (any case) names, or None."""
    name = os.fspath(path).lower()
    return next((fmt for suffix, fmt in NIBABEL_FORMATS.items() if name.endswith(suffix)), None)


def _has_dicom_preamble(path) -> bool:
    """Whether ``path`` starts with the DICOM Part 10 preamble (128 bytes, then "DICM")."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def check_real_type(path, dtype: np.dtype) -> None:
    """InputError unless ``dtype`` is a real number type (integer, floating or boolean)."""
    dtype = np.dtype(dtype)
    if dtype.fields is not None or not (
        np.issubdtype(dtype, np.integer)
        or np.issubdtype(dtype, np.floating)
        or np.issubdtype(dtype, np.bool_)
    ):
        raise InputError(path, f"voxel type {dtype} is not a real number type")


def _open_image(path: str):
    """(grid shape, affine, read_voxels) of an image file, its header read (voxels not yet):
    nibabel for NIfTI, MGH and Analyze, SimpleITK for NRRD and MetaImage; InputError naming
    ``path`` when it is missing, a folder, of another type or unreadable."""
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    if os.path.isdir(path):
        raise InputError(path, f"is a directory, expected {IMAGE_FILE_TYPES}")
    if itk_suffix(path) is not None:
        reader, shape, affine = itk_reader(path)

        def read_voxels():
            data = read_itk_voxels(path, reader)
            check_real_type(path, data.dtype)
            return data
        return shape, affine, read_voxels
    format_name = nibabel_format(path)
    if format_name is None:
        if _has_dicom_preamble(path):
            raise InputError(path, "is a single DICOM file; give the folder holding the image "
                                   "series' slice files (an RTSTRUCT file is read by vbseg convert)")
        raise InputError(path, f"unknown image file type; expected {IMAGE_FILE_TYPES}")
    article = "an" if format_name[0] in "AM" else "a"  # "an MGH", "an Analyze", "a NIfTI"

    def unreadable(exc: Exception) -> InputError:
        return InputError(path, f"cannot be read as {article} {format_name} image ({_first_line(exc)})")
    try:
        image = nib.load(path)
        dtype = image.get_data_dtype()
        shape = tuple(int(size) for size in image.shape)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise unreadable(exc) from None
    check_real_type(path, dtype)

    def read_voxels():
        try:
            return np.asanyarray(image.dataobj)
        except Exception as exc:  # the data file of a pair can be missing or short
            raise unreadable(exc) from None
    return shape, affine, read_voxels


def _grid_shape(path: str, shape, affine) -> tuple[int, int, int]:
    """The 3D grid of a file's header (trailing axes of length 1, e.g. a 4D file with one time
    point, carry no information and are dropped); InputError when it is not 3D, has an empty
    axis, or a singular or non-finite affine."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(path, f"expected a 3D image, got shape {shape}")
    if min(shape) < 1:
        raise InputError(path, f"image has an empty axis, shape {shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "the voxel-to-world affine is singular or not finite")
    return shape


def read_image_grid(path: str | os.PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """(grid shape (I, J, K), RAS+ affine) of an image file from its header alone, with the
    checks of :func:`read_image_file` that need no voxel (for checking many files before any
    work: case indexes, batches)."""
    path = os.fspath(path)
    shape, affine, _ = _open_image(path)
    return _grid_shape(path, shape, affine), affine


def read_image_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(raw voxels (I, J, K), RAS+ affine) of an image file, by its suffix: NIfTI, MGH and
    Analyze through nibabel, NRRD and MetaImage through SimpleITK (:mod:`vbseg.io.itk_files`, LPS
    converted).

    The same checks for every format: InputError naming ``path`` when it is missing, a folder,
    of another type, unreadable, of a non-real voxel type, not 3D (trailing axes of length 1
    are dropped), empty, or with a singular or non-finite affine.
    """
    path = os.fspath(path)
    shape, affine, read_voxels = _open_image(path)
    shape = _grid_shape(path, shape, affine)
    return np.asarray(read_voxels()).reshape(shape), affine


def read_label(path: str | os.PathLike, what: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """(mask (I, J, K) bool, affine) of a delineation file of any supported format: voxels > 0
    are inside; InputError naming ``path`` when it cannot be read or holds NaN."""
    values, affine = _read_finite(path, what)
    return values > 0, affine


def load_volume(path: str | os.PathLike, modality: str = "other", *, series_uid=None) -> Volume:
    """Read and validate a 3D image: a NIfTI, NRRD or MetaImage file
    (:func:`read_image_file`), or a folder holding a DICOM series.

    A folder goes to :func:`vbseg.io.dicom.load_dicom_volume` (PET in SUV, CT in HU; ``series_uid``
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
        raw, affine = read_image_file(path)
        data = np.asarray(raw, dtype=np.float32)
        check_values(path, data)
        volume = Volume(data, affine, modality, os.fspath(path))
    if volume.spacing.max() > MAX_VOXEL_MM:
        sizes = " x ".join(f"{size:g}" for size in volume.spacing)
        raise InputError(path, f"voxel size {sizes} mm is over {MAX_VOXEL_MM:g} mm: the header's "
                               "affine is not in millimetres, or is broken")
    return volume


LABEL_RESAMPLING = "nearest neighbour in world coordinates"


def _read_finite(path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, affine) of an image file (:func:`read_image_file`) whose voxels are finite."""
    values, affine = read_image_file(path)
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
        raise InputError(os.fspath(path), f"{what} holds NaN or infinite voxels")
    return values, affine


def _other_grid(path, shape, reference: Volume, what: str, rule: str) -> InputError:
    return InputError(os.fspath(path), f"{what} grid (shape {tuple(shape)}) differs from the grid of "
                                       f"{reference.name} (shape {reference.shape}); {rule}")


def is_label(values: np.ndarray) -> bool:
    """True for a label image: boolean or integer voxels, or floating ones that are all whole
    numbers (masks are often stored as float)."""
    if not np.issubdtype(values.dtype, np.floating):
        return True
    return bool(np.all(values == np.round(values)))


def read_mask(path: str | os.PathLike, reference: Volume, what: str = "mask"
              ) -> tuple[np.ndarray, dict | None]:
    """A binary mask (non-zero = inside) on ``reference``'s grid, and how it got there.

    A mask on another grid is resampled onto ``reference``'s by nearest neighbour in world
    coordinates (:func:`~vbseg.io.image.resample_onto`; voxels outside its field of view are
    outside), when it is a label image (:func:`is_label`); a mask with fractional values on
    another grid (a probability map?) is refused: thresholding it there is the user's choice.

    Returns (mask (I, J, K) bool, resampling): resampling is None on the same grid, else
    ``{"method", "from_shape", "from_spacing_mm"}`` for summary.json.
    Raises InputError when the file is unreadable, holds NaN, is fractional on another grid,
    does not overlap the grid, or is empty (there).
    """
    values, affine = _read_finite(path, what)
    path = os.fspath(path)
    source = Volume(values, affine, path=path)
    if source.same_grid(reference):
        mask, resampling = values != 0, None
    elif not is_label(values):
        raise _other_grid(path, values.shape, reference, what,
                          "only a label mask (whole-number values) is resampled onto it, and this "
                          "one holds fractional values")
    else:
        on_grid, covered = resample_onto(source.with_data((values != 0).astype(np.float32)), reference,
                                         nearest=True)
        mask = (on_grid.data != 0) & covered
        resampling = {"method": LABEL_RESAMPLING, "from_shape": list(source.shape),
                      "from_spacing_mm": [round(float(s), 6) for s in source.spacing]}
    if not mask.any():
        where = f" on the grid of {reference.name}" if resampling else ""
        raise InputError(path, f"{what} is empty{where} (no non-zero voxel)")
    return mask, resampling


def load_mask(path: str | os.PathLike, reference: Volume) -> np.ndarray:
    """:func:`read_mask`'s mask: non-zero = inside, on ``reference``'s grid (a label mask on
    another grid resampled by nearest neighbour)."""
    return read_mask(path, reference)[0]


def load_map(path: str | os.PathLike, reference: Volume, what: str = "map") -> np.ndarray:
    """Read a real-valued map (e.g. prior log-odds) on ``reference``'s grid: float32; a constant
    map is allowed. InputError when unreadable, on another grid, or not finite."""
    values, affine = _read_finite(path, what)
    if not Volume(values, affine).same_grid(reference):
        raise _other_grid(path, values.shape, reference, what, "it must be on the first image's grid")
    return values.astype(np.float32)
