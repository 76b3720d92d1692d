"""The image type: a 3D array on a voxel grid with its world affine, and what needs only that
(value checks, box parsing, resampling between grids). It reads and writes nothing, so every
reader and writer (:mod:`vbseg.io.volume`, :mod:`vbseg.io.dicom`, :mod:`vbseg.io.writing`) can import it
(the split of torchio's ``data/image.py`` from ``data/io.py``).
"""

from __future__ import annotations

import dataclasses

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


def check_values(path, data: np.ndarray) -> None:
    """InputError (naming ``path``) when ``data`` holds NaN or infinite voxels, or is constant."""
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(path, f"{int(bad.sum())} voxels are NaN or infinite")
    if float(data.max()) == float(data.min()):
        raise InputError(path, f"image is constant (every voxel is {float(data.min()):g})")


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


def within_field_of_view(positions, shape) -> np.ndarray:
    """Which of the (3, N) continuous voxel ``positions`` lie in the field of view of a grid of
    ``shape``: within half a voxel of its outermost centres (what a resampled voxel counts as
    covered by)."""
    return np.all((positions >= -0.5) & (positions <= np.asarray(shape, np.float64)[:, None] - 0.5), axis=0)


def resample_onto(source: Volume, reference: Volume, *, nearest: bool = False
                  ) -> tuple[Volume, np.ndarray]:
    """Resample ``source`` onto ``reference``'s grid through world coordinates.

    Each reference voxel centre is mapped to a continuous source index with
    ``inv(A_src) @ A_ref`` and interpolated trilinearly. When the source is finer than the
    target along an axis (CT at 1 mm onto PET at 4 mm), it is first smoothed with a Gaussian
    of sigma ``(f - 1) / 2`` source voxels, f the down-sampling factor along that axis (the
    anti-aliasing rule of scikit-image's ``resize``), so the result approximates the mean
    over the target voxel rather than a point sample. With ``nearest`` (labels: a mask's
    values must stay values it holds) each reference voxel takes the value of the source voxel
    nearest its centre, unsmoothed.

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
    if not nearest and np.any(sigmas > 0):
        data = ndimage.gaussian_filter(data, sigma=sigmas, mode="nearest")
    out = np.empty(reference.shape, np.float32)
    coverage = np.empty(reference.shape, bool)
    ni, nj, nk = reference.shape
    ii, jj = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
    for k in range(nk):  # one slab at a time keeps the coordinate arrays small
        ijk = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)]).astype(np.float64)
        coords = to_source[:3, :3] @ ijk + to_source[:3, 3:4]
        coverage[:, :, k] = within_field_of_view(coords, source.shape).reshape(ni, nj)
        out[:, :, k] = ndimage.map_coordinates(data, coords, order=0 if nearest else 1,
                                               mode="nearest").reshape(
            ni, nj
        )
    if not coverage.any():
        raise InputError(
            source.name, f"does not overlap the grid of {reference.name} in world space"
        )
    resampled = Volume(out, reference.affine.copy(), source.modality, source.path)
    return resampled, coverage
