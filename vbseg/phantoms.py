"""Synthetic PET/CT phantoms with exact ground truth.

A phantom is a set of lesions defined in continuous world coordinates (mm), rasterised onto
a PET grid (and, separately, onto a finer CT grid in the same world frame), so that every
quantity a method is judged on is known exactly:

* ``truth``: the voxel-centre mask (voxel centre inside a lesion), what Dice and ECE are
  scored against (DESIGN.md);
* ``truth_fraction``: the fraction of each voxel inside a lesion, from ``s^3`` sub-voxel
  samples (``supersample``);
* ``volume_ml``: the physical lesion volume (analytic for spheres, the supersampled
  fraction sum for irregular lesions).

Image formation follows the usual PET simulation chain (e.g. Hatt et al., IEEE TMI 2009,
FLAB phantom study): voxel-mean activity (background plus lesion uptake at a given
contrast) -> Gaussian scanner PSF of given FWHM (in mm, applied on the voxel grid, an
approximation of blurring the continuous object) -> noise, either Gaussian with a stated
coefficient of variation relative to the local mean (optionally spatially correlated with a
Gaussian kernel, renormalised so the CV holds) or Poisson counts scaled so the background CV
is the stated one. NEMA IEC-like spheres (10, 13, 17, 22, 28, 37 mm, on a 57.2 mm ring) or an
irregular, heterogeneous lesion (star-shaped boundary, cold necrotic core that is still
tumour, linear uptake gradient across the rim) are provided. CT (HU) has the same lesions at
a small soft-tissue contrast on its own grid. Everything is determined by the seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from vbseg.io.image import Volume
from vbseg.io.writing import save_nifti

NEMA_DIAMETERS_MM = (10.0, 13.0, 17.0, 22.0, 28.0, 37.0)
NEMA_RING_RADIUS_MM = 57.2
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclasses.dataclass(frozen=True)
class PhantomSpec:
    """Everything that defines a phantom except the seed.

    Attributes:
        kind: "spheres" (one sphere per diameter; several go on a NEMA-like ring) or
            "heterogeneous" (one irregular lesion of the first diameter, with necrotic core).
        diameters_mm: lesion diameters (mm).
        contrast: lesion-to-background uptake ratio (e.g. 4.0 for 4:1).
        background_suv: background uptake (SUV).
        cv: noise coefficient of variation (sd / local mean), e.g. 0.10.
        noise: "gaussian" or "poisson".
        noise_fwhm_mm: FWHM of the kernel correlating Gaussian noise (0 = white).
        psf_fwhm_mm: scanner PSF FWHM (mm).
        spacing_mm: PET voxel size (mm) along the array axes.
        shape: PET grid shape; None sizes it to the lesions plus a 24 mm margin, rounded up
            to a multiple of 8 voxels (few distinct shapes -> few JAX compilations).
        ct_spacing_mm: CT voxel size; the CT covers the same world box as the PET.
        ct_background_hu, ct_lesion_hu, ct_noise_hu: CT soft tissue, lesion, noise sd (HU).
        necrotic_radius_fraction, necrotic_uptake, gradient: heterogeneous lesion only; the
            core (inside this fraction of the boundary radius) has uptake ``necrotic_uptake``
            x background; the rim's contrast varies linearly by +-``gradient`` across it.
        supersample: sub-voxel samples per axis for fractions and voxel means.
        wall_mm: spheres only: a cold shell of this thickness (mm) just outside each sphere, with
            no activity (the glass wall of a NEMA IEC sphere, about 1 mm). The truth is the
            sphere's inside, as on the real phantom, whose stated volumes are the inner ones.
    """

    kind: str = "spheres"
    diameters_mm: tuple[float, ...] = (22.0,)
    contrast: float = 4.0
    background_suv: float = 1.0
    cv: float = 0.10
    noise: str = "gaussian"
    noise_fwhm_mm: float = 0.0
    psf_fwhm_mm: float = 6.0
    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 3.0)
    shape: tuple[int, int, int] | None = None
    ct_spacing_mm: tuple[float, float, float] = (2.0, 2.0, 3.0)
    ct_background_hu: float = 40.0
    ct_lesion_hu: float = 60.0
    ct_noise_hu: float = 12.0
    necrotic_radius_fraction: float = 0.5
    necrotic_uptake: float = 1.3
    gradient: float = 0.3
    supersample: int = 5
    wall_mm: float = 0.0

    def __post_init__(self):
        if self.kind not in ("spheres", "heterogeneous"):
            raise ValueError(f"kind must be 'spheres' or 'heterogeneous', got {self.kind!r}")
        if self.noise not in ("gaussian", "poisson"):
            raise ValueError(f"noise must be 'gaussian' or 'poisson', got {self.noise!r}")
        if not self.diameters_mm or min(self.diameters_mm) <= 0:
            raise ValueError("diameters_mm must be positive")
        numbers = (self.contrast, self.background_suv, self.cv, self.psf_fwhm_mm, self.noise_fwhm_mm,
                   self.wall_mm, *self.diameters_mm, *self.spacing_mm)
        if not all(math.isfinite(x) for x in numbers):
            raise ValueError("phantom settings must be finite numbers")
        if self.contrast <= 0 or self.cv < 0 or self.psf_fwhm_mm < 0 or self.background_suv <= 0:
            raise ValueError("contrast and background must be > 0, cv and psf_fwhm_mm >= 0")
        if self.noise == "poisson" and self.cv <= 0:
            raise ValueError("poisson noise needs cv > 0")
        if self.wall_mm < 0 or (self.wall_mm > 0 and self.kind != "spheres"):
            raise ValueError(f"wall_mm must be >= 0, and is for spheres only, got {self.wall_mm!r}")
        if max(self.diameters_mm) > 200:
            raise ValueError("lesion diameters above 200 mm are not supported")


@dataclasses.dataclass(frozen=True, eq=False)
class Phantom:
    """A rasterised phantom. ``truth`` and ``truth_fraction`` are on the PET grid."""

    pet: Volume
    ct: Volume
    truth: np.ndarray
    truth_fraction: np.ndarray
    volume_ml: float
    spec: PhantomSpec
    seed: int

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write pet/ct/truth/truth_fraction NIfTI files (atomically) into ``out_dir``."""
        out = Path(out_dir)
        return {
            "pet": save_nifti(out / "pet.nii.gz", self.pet.data, self.pet.affine),
            "ct": save_nifti(out / "ct.nii.gz", self.ct.data, self.ct.affine),
            "truth": save_nifti(out / "truth.nii.gz", self.truth.astype(np.uint8), self.pet.affine),
            "truth_fraction": save_nifti(
                out / "truth_fraction.nii.gz", self.truth_fraction.astype(np.float32), self.pet.affine
            ),
        }


# --- lesion geometry -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Lesion:
    """A star-shaped lesion: boundary radius R(u) = radius * (1 + sum_j a_j exp((u.d_j - 1)/w))
    along unit direction u from ``centre``; a_j = 0 gives a sphere."""

    centre: np.ndarray  # (3,) mm
    radius: float
    bump_dirs: np.ndarray  # (J, 3) unit vectors
    bump_amps: np.ndarray  # (J,)
    bump_width: float = 0.3

    def boundary_radius(self, unit: np.ndarray) -> np.ndarray:
        if self.bump_amps.size == 0:
            return np.full(unit.shape[:-1], self.radius)
        cos = unit @ self.bump_dirs.T
        return self.radius * (1.0 + np.exp((cos - 1.0) / self.bump_width) @ self.bump_amps)

    def polar(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance from centre, distance / boundary radius) for points (..., 3)."""
        offset = points - self.centre
        dist = np.linalg.norm(offset, axis=-1)
        unit = offset / np.maximum(dist, 1e-9)[..., None]
        return dist, dist / self.boundary_radius(unit)

    def max_radius(self) -> float:
        return self.radius * (1.0 + float(np.sum(np.clip(self.bump_amps, 0, None))))


def _make_lesions(spec: PhantomSpec, rng: np.random.Generator) -> list[_Lesion]:
    none = np.zeros((0, 3)), np.zeros(0)
    if spec.kind == "spheres":
        radii = [d / 2.0 for d in spec.diameters_mm]
        if len(radii) == 1:
            return [_Lesion(np.zeros(3), radii[0], *none)]
        angles = 2 * np.pi * np.arange(len(radii)) / len(radii)
        centres = NEMA_RING_RADIUS_MM * np.stack([np.cos(angles), np.sin(angles), 0 * angles], 1)
        return [_Lesion(c, r, *none) for c, r in zip(centres, radii)]
    num_bumps = 6
    dirs = rng.normal(size=(num_bumps, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    amps = rng.uniform(-0.2, 0.3, size=num_bumps)
    return [_Lesion(np.zeros(3), spec.diameters_mm[0] / 2.0, dirs, amps)]


def _uptake_ratio(spec: PhantomSpec, lesion: _Lesion, points: np.ndarray, gradient_dir) -> tuple:
    """(inside mask, uptake / background) at points (..., 3) for one lesion."""
    dist, rel = lesion.polar(points)
    inside = rel <= 1.0
    if spec.kind == "spheres":
        wall = ~inside & (dist <= lesion.radius + spec.wall_mm)  # empty when wall_mm is 0
        return inside, np.where(inside, spec.contrast, np.where(wall, 0.0, 1.0))
    along = ((points - lesion.centre) @ gradient_dir) / max(lesion.max_radius(), 1e-9)
    rim = spec.contrast * (1.0 + spec.gradient * np.clip(along, -1.0, 1.0))
    core = rel <= spec.necrotic_radius_fraction
    ratio = np.where(core, spec.necrotic_uptake, rim)
    return inside, np.where(inside, ratio, 1.0)


def _grid_affine(spacing, shape, corner_mm) -> np.ndarray:
    """LPS-oriented grid (as DICOM-derived NIfTI files are): x and y axes point to -R, -A."""
    signs = np.array([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = np.diag(signs * np.asarray(spacing, float))
    # voxel 0's outer corner sits at corner_mm along each signed axis
    affine[:3, 3] = corner_mm + signs * np.asarray(spacing, float) / 2.0
    return affine


def _rasterise(spec, lesions, gradient_dir, affine, shape):
    """Voxel-centre inside mask, inside fraction and mean uptake ratio on one grid."""
    inside_centre = np.zeros(shape, bool)
    fraction = np.zeros(shape, np.float64)
    ratio_mean = np.ones(shape, np.float64)
    s = spec.supersample
    offsets = (np.arange(s) + 0.5) / s - 0.5
    inv = np.linalg.inv(affine)
    for lesion in lesions:
        reach = lesion.max_radius() + spec.wall_mm + 2.0 * float(np.max(np.abs(affine[:3, :3])))
        corners = np.array(
            [[lesion.centre[0] + a, lesion.centre[1] + b, lesion.centre[2] + c, 1.0]
             for a in (-reach, reach) for b in (-reach, reach) for c in (-reach, reach)]
        )
        idx = (inv @ corners.T)[:3]
        lo = np.clip(np.floor(idx.min(1)).astype(int), 0, np.array(shape))
        hi = np.clip(np.ceil(idx.max(1)).astype(int) + 1, 0, np.array(shape))
        if np.any(hi <= lo):
            continue
        axes = [np.arange(lo_i, hi_i)[:, None] + offsets[None, :] for lo_i, hi_i in zip(lo, hi)]
        sub = np.stack(np.meshgrid(*[a.ravel() for a in axes], indexing="ij"), -1)
        world = sub @ affine[:3, :3].T + affine[:3, 3]
        inside, ratio = _uptake_ratio(spec, lesion, world, gradient_dir)
        box = tuple(int(hi_i - lo_i) for lo_i, hi_i in zip(lo, hi))
        blocks = (box[0], s, box[1], s, box[2], s)
        region = tuple(slice(lo_i, hi_i) for lo_i, hi_i in zip(lo, hi))
        fraction[region] += inside.reshape(blocks).mean(axis=(1, 3, 5))
        # voxel-mean uptake: lesion sub-samples replace background (ratio 1) sub-samples
        ratio_mean[region] += (ratio - 1.0).reshape(blocks).mean(axis=(1, 3, 5))
        voxel_axes = [np.arange(lo_i, hi_i) for lo_i, hi_i in zip(lo, hi)]
        centres = np.stack(np.meshgrid(*voxel_axes, indexing="ij"), -1)
        centre_world = centres @ affine[:3, :3].T + affine[:3, 3]
        inside_centre[region] |= _uptake_ratio(spec, lesion, centre_world, gradient_dir)[0]
    return inside_centre, np.clip(fraction, 0.0, 1.0), ratio_mean


def _correlated_normal(rng, shape, fwhm_mm, spacing) -> np.ndarray:
    white = rng.standard_normal(shape)
    if fwhm_mm <= 0:
        return white
    sigma = fwhm_mm * FWHM_TO_SIGMA / np.asarray(spacing, float)
    smooth = ndimage.gaussian_filter(white, sigma, mode="wrap")
    # unit marginal variance: divide by the kernel's L2 norm (exact for the wrapped filter)
    impulse = np.zeros(shape)
    impulse[tuple(n // 2 for n in shape)] = 1.0
    norm = np.sqrt(np.sum(ndimage.gaussian_filter(impulse, sigma, mode="wrap") ** 2))
    return smooth / norm


def default_shape(spec: PhantomSpec, lesions: list[_Lesion]) -> tuple[int, int, int]:
    reach = np.max([np.abs(les.centre) + les.max_radius() for les in lesions], axis=0) + 24.0
    shape = np.ceil(2 * reach / np.asarray(spec.spacing_mm)).astype(int)
    return tuple(int(8 * math.ceil(n / 8)) for n in shape)


def make_phantom(spec: PhantomSpec = PhantomSpec(), *, seed: int = 0) -> Phantom:
    """Build a phantom from ``spec``; identical ``(spec, seed)`` give identical arrays."""
    rng = np.random.default_rng(seed)
    lesions = _make_lesions(spec, rng)
    gradient_dir = rng.normal(size=3)
    gradient_dir /= np.linalg.norm(gradient_dir)
    shape = tuple(spec.shape) if spec.shape is not None else default_shape(spec, lesions)
    extent = np.asarray(shape) * np.asarray(spec.spacing_mm)
    # centre the world box on the origin (lesions are placed around it); LPS signs
    corner = -np.array([-1.0, -1.0, 1.0]) * extent / 2.0
    pet_affine = _grid_affine(spec.spacing_mm, shape, corner)
    truth, fraction, ratio = _rasterise(spec, lesions, gradient_dir, pet_affine, shape)

    mean = spec.background_suv * ratio
    if spec.psf_fwhm_mm > 0:
        sigma = spec.psf_fwhm_mm * FWHM_TO_SIGMA / np.asarray(spec.spacing_mm)
        mean = ndimage.gaussian_filter(mean, sigma, mode="nearest")
    if spec.noise == "gaussian":
        eps = _correlated_normal(rng, shape, spec.noise_fwhm_mm, spec.spacing_mm)
        pet = mean * (1.0 + spec.cv * eps)
    else:
        counts_per_suv = 1.0 / (spec.cv**2 * spec.background_suv)
        pet = rng.poisson(mean * counts_per_suv) / counts_per_suv

    ct_shape = tuple(int(round(e / s)) for e, s in zip(extent, spec.ct_spacing_mm))
    ct_affine = _grid_affine(spec.ct_spacing_mm, ct_shape, corner)
    _, ct_fraction, _ = _rasterise(spec, lesions, gradient_dir, ct_affine, ct_shape)
    ct = spec.ct_background_hu + (spec.ct_lesion_hu - spec.ct_background_hu) * ct_fraction
    ct = ct + spec.ct_noise_hu * rng.standard_normal(ct_shape)

    voxel_ml = abs(np.linalg.det(pet_affine[:3, :3])) / 1000.0
    if spec.kind == "spheres":
        volume_ml = sum(4.0 / 3.0 * math.pi * les.radius**3 for les in lesions) / 1000.0
    else:
        volume_ml = float(fraction.sum() * voxel_ml)
    return Phantom(
        pet=Volume(pet.astype(np.float32), pet_affine, "pet"),
        ct=Volume(ct.astype(np.float32), ct_affine, "ct"),
        truth=truth,
        truth_fraction=fraction.astype(np.float32),
        volume_ml=float(volume_ml),
        spec=spec,
        seed=seed,
    )


def world_coordinates(affine, shape) -> np.ndarray:
    """(X, Y, Z, 3) world millimetre coordinates of every voxel centre of a grid."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return index @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def spherical_voi(affine, shape, centre_mm, radius_mm: float) -> np.ndarray:
    """The voxels of a grid whose centre lies within ``radius_mm`` of ``centre_mm`` (world mm)."""
    offset = world_coordinates(affine, shape) - np.asarray(centre_mm, float)
    return np.linalg.norm(offset, axis=-1) <= radius_mm


def lesion_voi(phantom: Phantom, margin_mm: float) -> np.ndarray:
    """A spherical VOI around each lesion of ``phantom`` on its PET grid: the voxels whose centre
    lies within the lesion's nominal radius (diameter / 2) + ``margin_mm`` of its centre, as a
    user draws a VOI around one lesion (benchmarks/bench_nema.py: radius + 15 mm). A margin
    beyond the grid's own (24 mm; :func:`default_shape`) is cut off by the grid."""
    lesions = _make_lesions(phantom.spec, np.random.default_rng(phantom.seed))
    voi = np.zeros(phantom.pet.data.shape, bool)
    for lesion in lesions:
        voi |= spherical_voi(phantom.pet.affine, voi.shape, lesion.centre, lesion.radius + margin_mm)
    return voi


# A known population for cohort tests (vbseg.cohort.model): four classes (tumour rim,
# tumour core, fat, muscle) x (PET, CT, MR), in the cohort feature space (log SUV, HU / 100,
# MR / 100). Each synthetic patient draws its class means around these with sd COHORT_SPREAD_SD.
COHORT_MEANS = np.array([[1.8, 0.4, 3.0],     # tumour rim: SUV ~6, 40 HU, MR 300
                         [0.7, 0.2, 4.0],     # tumour core: SUV ~2, 20 HU, MR 400
                         [-0.9, -1.0, 9.0],   # fat: SUV ~0.4, -100 HU, MR 900
                         [0.0, 0.5, 3.5]])    # muscle: SUV ~1, 50 HU, MR 350
COHORT_SPREAD_SD = 0.2
COHORT_NOISE_SD = 0.15


def make_cohort(folder, num_cases: int, *, seed: int = 0, shape=(20, 20, 12), spacing_mm=4.0) -> Path:
    """Write ``num_cases`` synthetic delineated PET/CT/MR cases and their CASES.json.

    Each case: a sphere (radius 4-6 voxels) whose outer shell is the rim class and inner half
    radius the core; background split by a plane into fat and muscle. Class means are drawn
    per case as COHORT_MEANS + Normal(0, COHORT_SPREAD_SD^2) in feature space, voxels as
    class mean + Normal(0, COHORT_NOISE_SD^2), then mapped back to SUV / HU / MR units.
    Returns the path of cases.json (entries in the ``modalities`` shape).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"), -1)
    radius = np.linalg.norm(grid, axis=-1)
    entries = []
    for case in range(num_cases):
        size = rng.uniform(4.0, 6.0)
        labels = np.where(grid[..., 0] < rng.uniform(-3, 3), 2, 3)
        labels = np.where(radius <= size, 0, labels)
        labels = np.where(radius <= 0.5 * size, 1, labels)
        means = COHORT_MEANS + rng.normal(0.0, COHORT_SPREAD_SD, COHORT_MEANS.shape)
        features = means[labels] + rng.normal(0.0, COHORT_NOISE_SD, shape + (3,))
        images = {"pet": np.exp(features[..., 0]), "ct": 100.0 * features[..., 1],
                  "mr": 100.0 * features[..., 2]}
        name = f"syn{case:02d}"
        table = {}
        for modality, data in images.items():
            save_nifti(folder / f"{name}_{modality}.nii.gz", data.astype(np.float32), affine)
            save_nifti(folder / f"{name}_{modality}_label.nii.gz", (labels <= 1).astype(np.uint8), affine)
            table[modality] = {"image": f"{name}_{modality}.nii.gz",
                               "label": f"{name}_{modality}_label.nii.gz"}
        entries.append({"case": name, "kind": "patient", "modalities": table,
                        "class_means_features": means.tolist()})
    index = folder / "cases.json"
    index.write_text(json.dumps(entries, indent=1))
    return index
