"""Training patches for the 3D U-Net of :mod:`vbseg.deep.model`: synthetic PET/CT/MR limb
patches generated on the fly, and random patches of real delineated cases.

**Synthetic patch** (:func:`synthetic_patch`; everything drawn from a numpy Generator, so a
seed fixes it). Geometry in mm on a grid of random PET-like spacing (``spacing_xy_mm``,
``spacing_z_mm``), voxel centres at (i - (n - 1) / 2) * spacing:

* body: an elliptic cylinder along z (a limb, semi-axes 55-150 mm) with air outside, a
  subcutaneous fat layer (3-25 mm), muscle inside crossed by thin intermuscular fat septa,
  and with probability 0.7 a long bone (cortex 2-5 mm around fatty marrow);
* lesions (the tumour, 0-2 per patch, none with probability ``empty_probability``): star-
  shaped, R(u) = r (1 + sum_j a_j exp((u.d_j - 1) / w)) along unit direction u in a randomly
  rotated, anisotropically scaled frame, diameter log-uniform in ``diameter_mm``; uptake a
  log-uniform contrast in ``contrast`` times muscle, a linear gradient across the lesion and
  a smooth log-normal texture; with probability ``necrotic_probability`` (lesions > 25 mm) a
  cold necrotic core (0.3-1.5 x muscle uptake) that is still tumour. CT: soft tissue
  (25-55 HU, core 5-30 HU); MR: near-isointense to muscle (x 0.9-1.4);
* distractors (hot, NOT tumour; 0..``max_distractors``): fluid-filled organ/bladder-like
  ellipsoids (very hot, homogeneous, water on CT, dark on T1), vessels (tubes at blood-pool
  uptake), elongated hot muscle and hot marrow, so the network has to recognise a lesion,
  not threshold uptake;
* PET: tissue uptake (SUV: air 0, fat 0.15-0.4, muscle 0.4-1.0) blurred by a Gaussian PSF of
  FWHM in ``psf_fwhm_mm``, plus noise of sd cv sqrt(mean x muscle SUV) (the CV in muscle is
  cv, Poisson-like growth with uptake) correlated over ~1 voxel; clipped at 0;
* CT (HU: air -1000, fat -100, muscle 40-60, bone 700-1200, marrow -50..50) and T1 MR
  (fat-normalised units: air ~0, fat 750-950, muscle 250-400, multiplicative bias field)
  on the PET grid with slight partial-volume blur and noise, their fields of view often a
  random sub-box of the patch (the sarcoma MR covers 19-70 % of the PET crop);
* occasionally a zero-padded border slab (as real crops smaller than a patch get), where
  nothing is observed and the loss does not count.

Ground truth: the voxel-centre lesion mask, necrotic cores included.

**Real patch** (:func:`real_patch`): a window of the patch shape from a delineated case on its
first modality's grid (:func:`load_deep_case`), centred on a random tumour voxel with
probability ``tumour_fraction`` (else anywhere), zero-padded (and not counted) where it leaves
the crop, randomly flipped along each axis. The sarcoma crops are centred on the tumour
(a 5 cm margin), so real patches always see tumour near the middle of the field of view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from vbseg.deep.model import network_inputs
from vbseg.errors import InputError
from vbseg.io.cases import DelineatedCase
from vbseg.io.volume import read_label
from vbseg.prepare import load_inputs

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class PhantomRanges:
    """The ranges synthetic training patches are drawn from (module doc); pairs are (low, high)."""

    spacing_xy_mm: tuple[float, float] = (3.0, 5.5)
    spacing_z_mm: tuple[float, float] = (2.5, 4.5)
    diameter_mm: tuple[float, float] = (8.0, 90.0)  # log-uniform
    contrast: tuple[float, float] = (1.5, 12.0)  # log-uniform, lesion rim : muscle uptake
    psf_fwhm_mm: tuple[float, float] = (4.0, 8.0)
    cv: tuple[float, float] = (0.05, 0.25)
    necrotic_probability: float = 0.4
    empty_probability: float = 0.15
    max_distractors: int = 3
    partial_fov_probability: float = 0.6

    def record(self) -> dict:
        return {name: (list(value) if isinstance(value, tuple) else value)
                for name, value in self.__dict__.items()}


class Patch(NamedTuple):
    """One training example: network inputs, target and where the loss counts."""

    inputs: np.ndarray  # (M, X, Y, Z) float32, network space (vbseg.deep.model.network_inputs)
    tumour: np.ndarray  # (X, Y, Z) float32 in {0, 1}
    valid: np.ndarray  # (X, Y, Z) float32 in {0, 1}


def _uniform(rng, pair):
    return float(rng.uniform(pair[0], pair[1]))


def _log_uniform(rng, pair):
    return float(np.exp(rng.uniform(np.log(pair[0]), np.log(pair[1]))))


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _smooth_field(rng, shape, sigma_voxels) -> np.ndarray:
    """Zero-mean, unit-sd Gaussian random field (white noise smoothed by ``sigma_voxels``)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_voxels, mode="wrap")
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _star_radius(rng, points, radius, anisotropy=(0.7, 1.4)):
    """Normalised radius rel(p) = |A p| / R(u) of a star-shaped body at the origin (module doc);
    points (..., 3) in mm relative to its centre; rel <= 1 is inside."""
    frame = _random_rotation(rng) * rng.uniform(*anisotropy, size=3)[None, :]
    frame /= np.cbrt(abs(np.linalg.det(frame)))  # volume-preserving, so r stays the mean radius
    local = points @ frame
    dist = np.linalg.norm(local, axis=-1)
    unit = local / np.maximum(dist, 1e-9)[..., None]
    directions = rng.normal(size=(6, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    amplitudes = rng.uniform(-0.25, 0.35, size=6)
    boundary = radius * (1.0 + np.exp((unit @ directions.T - 1.0) / 0.3) @ amplitudes)
    return dist / np.maximum(boundary, 1e-3)


def _sub_box(rng, shape, low_fraction) -> np.ndarray:
    """A random axis-aligned box covering a fraction in [low_fraction, 1] of each axis."""
    mask = np.zeros(shape, bool)
    slices = []
    for n in shape:
        length = max(1, int(round(n * rng.uniform(low_fraction, 1.0))))
        start = int(rng.integers(0, n - length + 1))
        slices.append(slice(start, start + length))
    mask[tuple(slices)] = True
    return mask


class _Scene(NamedTuple):
    """The tissue maps of one synthetic patch before imaging: SUV, HU and MR (X, Y, Z) in image
    units, the body and muscle masks, and the patient's muscle SUV and MR and fat MR levels."""

    suv: np.ndarray
    hu: np.ndarray
    mr: np.ndarray
    inside_body: np.ndarray
    muscle: np.ndarray
    muscle_suv: float
    muscle_mr: float
    fat_mr: float


def _anatomy(rng, points, shape) -> _Scene:
    """An elliptic limb along z (fat, septa, muscle, optionally bone with a hot marrow) around
    the patch centre, in air."""
    semi = rng.uniform(55.0, 150.0, size=2)
    angle, depth = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0.0, 0.8))
    centre = -depth * semi * np.array([np.cos(angle), np.sin(angle)])
    rho = np.hypot((points[..., 0] - centre[0]) / semi[0], (points[..., 1] - centre[1]) / semi[1])
    inside_body = rho <= 1.0
    depth_mm = (1.0 - rho) * semi.min()
    fat = inside_body & (depth_mm < rng.uniform(3.0, 25.0))
    for _ in range(int(rng.integers(0, 4))):  # intermuscular fat septa
        normal = np.r_[rng.normal(size=2), rng.normal(scale=0.3)]
        normal /= np.linalg.norm(normal)
        offset = points @ normal - rng.uniform(-60, 60)
        fat |= inside_body & (np.abs(offset) < rng.uniform(0.8, 2.5))
    muscle = inside_body & ~fat
    cortex = np.zeros(shape, bool)
    marrow = np.zeros(shape, bool)
    if rng.uniform() < 0.7:
        axis = np.r_[rng.normal(scale=0.15, size=2), 1.0]
        axis /= np.linalg.norm(axis)
        place = centre + rng.uniform(-0.5, 0.5, size=2) * semi
        relative = points - np.r_[place, 0.0]
        radial = np.linalg.norm(relative - (relative @ axis)[..., None] * axis, axis=-1)
        bone_radius = rng.uniform(8.0, 18.0)
        cortex = inside_body & (radial <= bone_radius)
        marrow = cortex & (radial <= bone_radius - rng.uniform(2.0, 5.0))
        cortex &= ~marrow

    muscle_suv = rng.uniform(0.4, 1.0)
    suv = np.where(inside_body, np.where(fat, rng.uniform(0.15, 0.4), muscle_suv), 0.0)
    suv = np.where(cortex, 0.3 * muscle_suv, suv)
    suv = np.where(marrow, muscle_suv * rng.uniform(0.6, 2.5), suv)  # hot marrow: a distractor
    hu = np.where(inside_body, np.where(fat, rng.uniform(-120, -80), rng.uniform(40, 60)), -1000.0)
    hu = np.where(cortex, rng.uniform(700, 1200), np.where(marrow, rng.uniform(-50, 50), hu))
    muscle_mr = rng.uniform(250, 400)
    fat_mr = rng.uniform(750, 950)
    mr = np.where(inside_body, np.where(fat | marrow, fat_mr, muscle_mr), rng.uniform(0, 20))
    mr = np.where(cortex, rng.uniform(20, 80), mr)
    return _Scene(suv, hu, mr, inside_body, muscle, muscle_suv, muscle_mr, fat_mr)


def _with_distractors(rng, scene: _Scene, points, shape, spacing, ranges) -> _Scene:
    """Hot organs, vessels and hot muscle strips (drawn before the lesions, so that a lesion
    drawn over one stays tumour)."""
    suv, hu, mr = scene.suv, scene.hu, scene.mr
    inside_body, muscle_suv = scene.inside_body, scene.muscle_suv
    for _ in range(int(rng.integers(0, ranges.max_distractors + 1))):
        at = np.r_[rng.uniform(-0.45, 0.45, size=3) * np.asarray(shape) * spacing]
        kind = rng.choice(["organ", "vessel", "hot_muscle"])
        if kind == "organ":
            rel = _star_radius(rng, points - at, rng.uniform(12.0, 35.0), anisotropy=(0.8, 1.25))
            body = (rel <= 1.0) & inside_body
            wall = body & (rel > 0.85)
            suv = np.where(body, muscle_suv * _log_uniform(rng, (3.0, 25.0)), suv)
            hu = np.where(body, np.where(wall, rng.uniform(30, 50), rng.uniform(0, 15)), hu)
            mr = np.where(body, np.where(wall, scene.muscle_mr, rng.uniform(80, 200)), mr)
        elif kind == "vessel":
            direction = np.r_[rng.normal(scale=0.4, size=2), 1.0]
            direction /= np.linalg.norm(direction)
            relative = points - at
            radial = np.linalg.norm(relative - (relative @ direction)[..., None] * direction, axis=-1)
            tube = (radial <= rng.uniform(2.5, 8.0)) & inside_body
            suv = np.where(tube, muscle_suv * rng.uniform(1.5, 3.0), suv)
            hu = np.where(tube, rng.uniform(35, 50), hu)
            mr = np.where(tube, rng.uniform(50, 180), mr)
        else:
            long_axis = rng.uniform(25.0, 60.0)
            frame = _random_rotation(rng)
            local = (points - at) @ frame / np.array([long_axis, rng.uniform(4, 9), rng.uniform(4, 9)])
            strip = (np.linalg.norm(local, axis=-1) <= 1.0) & scene.muscle
            suv = np.where(strip, muscle_suv * rng.uniform(1.5, 3.0), suv)
    return scene._replace(suv=suv, hu=hu, mr=mr)


def _with_lesions(rng, scene: _Scene, points, shape, spacing, ranges) -> tuple[_Scene, np.ndarray]:
    """(the scene with 0-2 star-shaped lesions drawn in, tumour mask (X, Y, Z)): textured uptake
    with a gradient, soft-tissue CT and MR, a necrotic core in some large ones."""
    suv, hu, mr = scene.suv, scene.hu, scene.mr
    muscle_suv, muscle_mr = scene.muscle_suv, scene.muscle_mr
    tumour = np.zeros(shape, bool)
    num_lesions = 0 if rng.uniform() < ranges.empty_probability else int(rng.integers(1, 3))
    for _ in range(num_lesions):
        diameter = _log_uniform(rng, ranges.diameter_mm)
        at = rng.uniform(-0.3, 0.3, size=3) * np.asarray(shape) * spacing
        rel = _star_radius(rng, points - at, diameter / 2.0)
        lesion = rel <= 1.0
        if not lesion.any():
            continue
        tumour |= lesion
        gradient = rng.normal(size=3)
        along = ((points - at) @ (gradient / np.linalg.norm(gradient))) / (diameter / 2.0)
        texture = np.exp(rng.uniform(0.05, 0.3) * _smooth_field(rng, shape, rng.uniform(1.0, 2.5)))
        contrast = _log_uniform(rng, ranges.contrast)
        uptake = muscle_suv * contrast * (1.0 + rng.uniform(0, 0.4) * np.clip(along, -1, 1)) * texture
        lesion_hu = rng.uniform(25, 55) + 8.0 * _smooth_field(rng, shape, 1.5)
        lesion_mr = muscle_mr * rng.uniform(0.9, 1.4) * np.exp(0.08 * _smooth_field(rng, shape, 1.5))
        if diameter > 25.0 and rng.uniform() < ranges.necrotic_probability:
            core = lesion & (rel <= rng.uniform(0.3, 0.7))
            uptake = np.where(core, muscle_suv * rng.uniform(0.3, 1.5), uptake)
            lesion_hu = np.where(core, rng.uniform(5, 30), lesion_hu)
            lesion_mr = np.where(core, lesion_mr * rng.uniform(0.6, 1.3), lesion_mr)
        suv = np.where(lesion, uptake, suv)
        hu = np.where(lesion, lesion_hu, hu)
        mr = np.where(lesion, lesion_mr, mr)
    return scene._replace(suv=suv, hu=hu, mr=mr), tumour


def _imaged(rng, scene: _Scene, shape, spacing, modalities, ranges):
    """(stack (X, Y, Z, M) float32, observed (X, Y, Z, M), valid (X, Y, Z)): PET blurred by the
    PSF with correlated noise, CT and MR blurred and noisy (MR with a bias field), partial
    fields of view and padded borders at random."""
    sigma = _uniform(rng, ranges.psf_fwhm_mm) * FWHM_TO_SIGMA / spacing
    pet_mean = ndimage.gaussian_filter(scene.suv, sigma, mode="nearest")
    noise = _smooth_field(rng, shape, rng.uniform(0.3, 1.0))
    cv = _uniform(rng, ranges.cv)
    pet = np.maximum(pet_mean + cv * np.sqrt(np.maximum(pet_mean, 0.0) * scene.muscle_suv) * noise, 0.0)
    images = {"pet": pet}
    if "ct" in modalities:
        blurred = ndimage.gaussian_filter(scene.hu, rng.uniform(0.3, 0.6), mode="nearest")
        images["ct"] = blurred + rng.uniform(4, 20) * rng.standard_normal(shape)
    if "mr" in modalities:
        bias = np.exp(0.1 * _smooth_field(rng, shape, 6.0))
        blurred = ndimage.gaussian_filter(scene.mr * bias, rng.uniform(0.3, 0.6), mode="nearest")
        images["mr"] = np.maximum(
            blurred + rng.uniform(0.01, 0.04) * scene.fat_mr * rng.standard_normal(shape), 0)
    observed = np.ones(shape + (len(modalities),), bool)
    for m, modality in enumerate(modalities):
        if modality in ("ct", "mr") and rng.uniform() < ranges.partial_fov_probability:
            observed[..., m] = _sub_box(rng, shape, 0.6 if modality == "ct" else 0.3)
    valid = np.ones(shape, bool)
    if rng.uniform() < 0.15:  # a padded border, as real crops smaller than a patch get
        axis, width = int(rng.integers(0, 3)), int(rng.integers(1, max(2, shape[0] // 4)))
        border = [slice(None)] * 3
        border[axis] = slice(0, width) if rng.uniform() < 0.5 else slice(shape[axis] - width, None)
        valid[tuple(border)] = False
        observed &= valid[..., None]
    stack = np.stack([images[m] for m in modalities], axis=-1).astype(np.float32)
    return stack, observed, valid


def synthetic_patch(rng: np.random.Generator, shape, modalities, ranges: PhantomRanges = PhantomRanges()):
    """One synthetic patch (module doc): anatomy, distractors, lesions, then imaging, each
    drawing from ``rng`` in turn.

    Returns (stack (X, Y, Z, M) float32 in image units: SUV / HU / MR units, observed
    (X, Y, Z, M) bool, tumour (X, Y, Z) bool, valid (X, Y, Z) bool, spacing (3,) mm).
    """
    shape = tuple(int(n) for n in shape)
    spacing = np.array([_uniform(rng, ranges.spacing_xy_mm)] * 2 + [_uniform(rng, ranges.spacing_z_mm)])
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (X, Y, Z, 3) mm
    scene = _with_distractors(rng, _anatomy(rng, points, shape), points, shape, spacing, ranges)
    scene, tumour = _with_lesions(rng, scene, points, shape, spacing, ranges)
    stack, observed, valid = _imaged(rng, scene, shape, spacing, modalities, ranges)
    return stack, observed, tumour & valid, valid, spacing


def synthetic_training_patch(rng, shape, modalities, ranges: PhantomRanges = PhantomRanges()) -> Patch:
    """:func:`synthetic_patch` in network space."""
    stack, observed, tumour, valid, _ = synthetic_patch(rng, shape, modalities, ranges)
    return Patch(network_inputs(stack, observed, modalities), tumour.astype(np.float32),
                 valid.astype(np.float32))


class DeepTrainingCase(NamedTuple):
    """A delineated case in network space on its first modality's grid."""

    name: str
    inputs: np.ndarray  # (M, X, Y, Z) float32 (vbseg.deep.model.network_inputs)
    tumour: np.ndarray  # (X, Y, Z) bool
    spacing: tuple
    licence: str = ""


def load_deep_case(case: DelineatedCase) -> DeepTrainingCase:
    """Images in their units on the first modality's grid (others resampled through world
    coordinates, :func:`vbseg.prepare.load_inputs`), mapped to network space exactly as
    :func:`vbseg.deep.model.network_logits` maps its inputs, and the first modality's label."""

    volumes, _, channels, coverage, _, _ = load_inputs(list(case.images), list(case.modalities))
    stack = np.stack(channels, axis=-1)
    observed = np.stack(coverage, axis=-1)
    tumour, _ = read_label(case.label)
    if not tumour.any():
        raise InputError(case.label, f"case {case.name}: label is empty")
    return DeepTrainingCase(case.name, network_inputs(stack, observed, case.modalities), tumour,
                            tuple(float(s) for s in volumes[0].spacing), case.licence)


def real_patch(rng: np.random.Generator, case: DeepTrainingCase, shape,
               tumour_fraction: float = 0.5) -> Patch:
    """A random window of ``case`` (module doc), flipped at random along each axis."""
    crop = np.asarray(case.tumour.shape)
    size = np.asarray(shape)
    if rng.uniform() < tumour_fraction:
        voxels = np.argwhere(case.tumour)
        centre = voxels[int(rng.integers(len(voxels)))] + rng.integers(-size // 4, size // 4 + 1)
    else:
        centre = np.array([rng.integers(0, n) for n in crop])
    start = centre - size // 2
    inputs = np.zeros((case.inputs.shape[0],) + tuple(shape), np.float32)
    tumour = np.zeros(tuple(shape), np.float32)
    valid = np.zeros(tuple(shape), np.float32)
    source = tuple(slice(max(s, 0), min(s + n, c)) for s, n, c in zip(start, size, crop))
    target = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(source, start))
    inputs[(slice(None),) + target] = case.inputs[(slice(None),) + source]
    tumour[target] = case.tumour[source]
    valid[target] = 1.0
    for axis in range(3):
        if rng.uniform() < 0.5:
            inputs, tumour, valid = (np.flip(inputs, axis + 1), np.flip(tumour, axis), np.flip(valid, axis))
    return Patch(np.ascontiguousarray(inputs), np.ascontiguousarray(tumour), np.ascontiguousarray(valid))


__all__ = ["DeepTrainingCase", "Patch", "PhantomRanges", "load_deep_case", "real_patch",
           "synthetic_patch", "synthetic_training_patch"]
