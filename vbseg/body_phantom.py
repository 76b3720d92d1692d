"""A phantom built like a real PET/CT/MR crop of a limb sarcoma, with exact ground truth.

The sphere phantoms of :mod:`vbseg.phantoms` are a lesion in a uniform warm background, where
every image separates lesion from background. A real crop does not: it holds air around the
body, subcutaneous fat, muscle and bone, and on CT or T1 MR those tissues differ far more from
each other than the lesion does from muscle (a sarcoma is within ~10 HU of muscle on CT in 9 of
15 crops in ``benchmarks/results/gtv_contrast.md``). A class split over every image then finds
body against air before tumour against tissue. This phantom reproduces that structure so the
default model choice can be tested on it:

* body: an elliptic limb cross-section extruded along the last axis, air outside;
* a subcutaneous fat ring (``fat_mm`` thick), muscle inside, a cylindrical bone off-centre;
* a spherical lesion in the muscle, hot on PET, at muscle density on CT, slightly brighter than
  muscle on T1 MR.

All three images share one grid (PET-like voxels); PET is blurred by a Gaussian PSF, and each
image gets Gaussian noise. Tissue values (SUV, HU, T1 arbitrary units) are typical ones, not
fitted to any scan. Everything is determined by the seed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy import ndimage

from vbseg.io.writing import save_nifti
from vbseg.phantoms import FWHM_TO_SIGMA

# (PET SUV, CT HU, T1 MR a.u.) of each tissue
TISSUES = {
    "air": (0.05, -1000.0, 20.0),
    "fat": (0.4, -100.0, 900.0),
    "muscle": (0.9, 50.0, 450.0),
    "bone": (0.7, 700.0, 250.0),
    "lesion": (6.0, 45.0, 520.0),
}
IMAGES = ("pet", "ct", "mr")


@dataclasses.dataclass(frozen=True)
class BodyPhantomSpec:
    """shape and spacing_mm: the grid; body_radii_mm: the limb's elliptic semi-axes; fat_mm: the
    fat ring's thickness; bone_radius_mm; lesion_diameter_mm; lesion_suv: the lesion's uptake
    (FDG-faint lesions: near muscle's 0.9); psf_fwhm_mm: PET blur; pet_cv: PET noise sd /
    local mean; ct_noise_hu; mr_cv."""

    shape: tuple[int, int, int] = (40, 40, 24)
    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    body_radii_mm: tuple[float, float] = (62.0, 54.0)
    fat_mm: float = 10.0
    bone_radius_mm: float = 14.0
    lesion_diameter_mm: float = 36.0
    lesion_suv: float = TISSUES["lesion"][0]
    psf_fwhm_mm: float = 6.0
    pet_cv: float = 0.15
    ct_noise_hu: float = 15.0
    mr_cv: float = 0.08


@dataclasses.dataclass(frozen=True)
class BodyPhantom:
    """images: {"pet", "ct", "mr"} -> (I, J, K) float32; tissue: (I, J, K) int8 index into
    TISSUES; truth: the lesion mask; affine: the shared grid's voxel-to-world matrix (mm)."""

    spec: BodyPhantomSpec
    images: dict
    tissue: np.ndarray
    truth: np.ndarray
    affine: np.ndarray

    @property
    def volume_ml(self) -> float:
        return float(self.truth.sum()) * float(np.prod(self.spec.spacing_mm)) / 1000.0

    def save(self, out_dir) -> dict[str, Path]:
        """Write pet/ct/mr.nii.gz and truth.nii.gz into ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {name: save_nifti(out / f"{name}.nii.gz", image, self.affine)
                 for name, image in self.images.items()}
        paths["truth"] = save_nifti(out / "truth.nii.gz", self.truth.astype(np.uint8), self.affine)
        return paths


def tissue_map(spec: BodyPhantomSpec) -> np.ndarray:
    """(I, J, K) int8: each voxel centre's tissue, as the index of its name in TISSUES."""
    names = list(TISSUES)
    spacing = np.asarray(spec.spacing_mm)
    centre = (np.asarray(spec.shape) - 1) / 2.0
    x, y, z = (np.indices(spec.shape).T * spacing - centre * spacing).T  # mm from the grid centre
    a, b = spec.body_radii_mm
    body = (x / a) ** 2 + (y / b) ** 2 <= 1.0
    muscle = (x / (a - spec.fat_mm)) ** 2 + (y / (b - spec.fat_mm)) ** 2 <= 1.0
    bone_centre = (-0.45 * a, 0.0)
    bone = (x - bone_centre[0]) ** 2 + (y - bone_centre[1]) ** 2 <= spec.bone_radius_mm ** 2
    lesion_centre = (0.3 * a, 0.0, 0.0)
    lesion = ((x - lesion_centre[0]) ** 2 + (y - lesion_centre[1]) ** 2 + (z - lesion_centre[2]) ** 2
              <= (spec.lesion_diameter_mm / 2.0) ** 2)
    tissue = np.full(spec.shape, names.index("air"), np.int8)
    tissue[body] = names.index("fat")
    tissue[muscle] = names.index("muscle")
    tissue[muscle & bone] = names.index("bone")
    tissue[muscle & lesion] = names.index("lesion")
    return tissue


def make_body_phantom(spec: BodyPhantomSpec = BodyPhantomSpec(), *, seed: int = 0) -> BodyPhantom:
    """Rasterise the tissues, give each image its tissue values, blur PET, add noise."""
    rng = np.random.default_rng(seed)
    tissue = tissue_map(spec)
    values = np.array(list(TISSUES.values()), np.float64)  # (tissues, images)
    values[list(TISSUES).index("lesion"), 0] = spec.lesion_suv
    sigma_voxels = spec.psf_fwhm_mm * FWHM_TO_SIGMA / np.asarray(spec.spacing_mm)
    pet = ndimage.gaussian_filter(values[tissue, 0], sigma_voxels, mode="nearest")
    pet = pet * (1.0 + spec.pet_cv * rng.standard_normal(spec.shape))
    ct = values[tissue, 1] + spec.ct_noise_hu * rng.standard_normal(spec.shape)
    mr = values[tissue, 2] * (1.0 + spec.mr_cv * rng.standard_normal(spec.shape))
    affine = np.diag([*spec.spacing_mm, 1.0])
    images = {name: image.astype(np.float32) for name, image in zip(IMAGES, (pet, ct, mr))}
    truth = tissue == list(TISSUES).index("lesion")
    return BodyPhantom(spec=spec, images=images, tissue=tissue, truth=truth, affine=affine)
