"""Volumes on voxel grids: validated NIfTI input, world-space resampling, atomic output.

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

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from vbseg.errors import InputError

MODALITIES = ("pet", "ct", "mr", "other")

# Two grids are "the same" when their affines agree to this many millimetres (entries of
# the 4x4 matrix); NIfTI writers round affines to float32, which is ~1e-5 mm at 100 mm.
AFFINE_ATOL_MM = 1e-3
# Larger voxels than this are no medical image's (whole-body PET uses 2-5 mm, thick CT slices
# 10 mm): an affine in metres-as-millimetres or a broken header, refused rather than fitted.
MAX_VOXEL_MM = 50.0


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image on a voxel grid.

    Attributes:
        data: float32 array of shape (I, J, K), finite.
        affine: float64 (4, 4) voxel-index -> world (mm, RAS+) matrix.
        modality: one of :data:`MODALITIES`.
        path: the file it was read from, if any (used in error messages and summaries).
        source: how the values were read, when more than "a NIfTI file" (a DICOM series: its
            UIDs and the SUV conversion); summary.json records it.
    """

    data: np.ndarray
    affine: np.ndarray
    modality: str = "other"
    path: str | None = None
    source: dict | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return np.sqrt(np.sum(self.affine[:3, :3] ** 2, axis=0))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (|det| of the linear part, mm^3 / 1000)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)

    @property
    def name(self) -> str:
        return self.path if self.path is not None else f"<{self.modality} array>"

    def same_grid(self, other: Volume) -> bool:
        return self.shape == other.shape and np.allclose(
            self.affine, other.affine, atol=AFFINE_ATOL_MM
        )

    def with_data(self, data: np.ndarray) -> Volume:
        return dataclasses.replace(self, data=data)


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


def check_values(path, data: np.ndarray) -> None:
    """InputError (naming ``path``) when ``data`` holds NaN or infinite voxels, or is constant."""
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(path, f"{int(bad.sum())} voxels are NaN or infinite")
    if float(data.max()) == float(data.min()):
        raise InputError(path, f"image is constant (every voxel is {float(data.min()):g})")


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
        from vbseg.dicom import load_dicom_volume

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


def parse_box(text: str, shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """Parse ``"i0:i1,j0:j1,k0:k1"`` (0-based, half-open, numpy order) into slices.

    Raises InputError (subject ``--box``) on a malformed box, or one not inside ``shape``.
    """
    parts = text.split(",")
    if len(parts) != 3:
        raise InputError("--box", f"expected i0:i1,j0:j1,k0:k1, got {text!r}")
    slices = []
    for axis, (part, n) in enumerate(zip(parts, shape)):
        try:
            lo_text, hi_text = part.split(":")
            lo, hi = int(lo_text), int(hi_text)
        except ValueError:
            raise InputError("--box", f"axis {axis}: expected two integers lo:hi, got {part!r}") from None
        if not 0 <= lo < hi <= n:
            raise InputError(
                "--box", f"axis {axis}: range {lo}:{hi} is empty or outside the image (0:{n})"
            )
        slices.append(slice(lo, hi))
    return tuple(slices)


def resample_onto(source: Volume, reference: Volume) -> tuple[Volume, np.ndarray]:
    """Resample ``source`` onto ``reference``'s grid through world coordinates.

    Each reference voxel centre is mapped to a continuous source index with
    ``inv(A_src) @ A_ref`` and interpolated trilinearly. When the source is finer than the
    target along an axis (CT at 1 mm onto PET at 4 mm), it is first smoothed with a Gaussian
    of sigma ``(f - 1) / 2`` source voxels, f the down-sampling factor along that axis (the
    anti-aliasing rule of scikit-image's ``resize``), so the result approximates the mean
    over the target voxel rather than a point sample.

    Returns:
        (resampled Volume on the reference grid, coverage): coverage is a bool array, True
        where the reference voxel centre lies inside the source's field of view (within
        half a voxel of its outermost centres); values outside are edge-extended and must be
        treated as missing by the caller.

    Raises InputError when the two grids share no voxel in world space.
    """
    to_source = np.linalg.inv(source.affine) @ reference.affine
    jacobian = to_source[:3, :3]  # source voxels per reference voxel
    factors = np.max(np.abs(jacobian), axis=1)
    sigmas = np.maximum(0.0, (factors - 1.0) / 2.0)
    data = source.data.astype(np.float32)
    if np.any(sigmas > 0):
        data = ndimage.gaussian_filter(data, sigma=sigmas, mode="nearest")
    out = np.empty(reference.shape, np.float32)
    coverage = np.empty(reference.shape, bool)
    ni, nj, nk = reference.shape
    ii, jj = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
    src_shape = np.asarray(source.shape)[:, None]
    for k in range(nk):  # one slab at a time keeps the coordinate arrays small
        ijk = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)]).astype(np.float64)
        coords = to_source[:3, :3] @ ijk + to_source[:3, 3:4]
        inside = np.all((coords >= -0.5) & (coords <= src_shape - 0.5), axis=0)
        coverage[:, :, k] = inside.reshape(ni, nj)
        out[:, :, k] = ndimage.map_coordinates(data, coords, order=1, mode="nearest").reshape(
            ni, nj
        )
    if not coverage.any():
        raise InputError(
            source.name, f"does not overlap the grid of {reference.name} in world space"
        )
    resampled = Volume(out, reference.affine.copy(), source.modality, source.path)
    return resampled, coverage


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file; of a folder (a DICOM series), over the names and contents of the
    files directly in it, in sorted order."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.is_file()) if os.path.isdir(path) else [path]
    for file in files:
        if os.path.isdir(path):
            digest.update(Path(file).name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process's umask (read by setting it and restoring it at once: there is no getter)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def write_with(path: str | os.PathLike, writer) -> Path:
    """Atomically create ``path`` by calling ``writer(tmp_path)``, then renaming.

    The temporary file sits in the target folder (so the rename is atomic on POSIX) and keeps
    the target's extension (``.nii.gz``, ``.png``, ...) for writers that infer the format from
    it. If ``writer`` fails or the process dies, the target is untouched. The file gets the
    mode a plain ``open`` would give it (0666 less the umask), not mkstemp's private 0600.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if target.name.endswith(".nii.gz") else target.suffix
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``array`` (dtype kept) with ``affine`` as NIfTI-1 (sform = qform), atomically."""
    affine = np.asarray(affine, np.float64)
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return write_with(path, lambda tmp: nib.save(image, tmp))


def save_volume(path: str | os.PathLike, volume: Volume) -> Path:
    return save_nifti(path, volume.data, volume.affine)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))
