"""A GP intensity field inside the hidden Potts mean-field fit: an MR bias field or
heterogeneous uptake within the tumour, on the grid at O(N log N) per step.

Model (the Gaussian emission of :mod:`vbseg.potts.model` with a smooth additive field on
the first modality of the classes in S):

    y_v1 | z_v = k ~ N(mu_k1 + [k in S] b_v, 1 / tau_k1),   b = L eps,   eps ~ N(0, I),

L a square root of a stationary kernel's covariance on the grid, so b ~ GP(0, k) with the
kernel's length-scale (mm) and amplitude (standardised units). The default structure is the
separable product kernel through per-axis Cholesky factors (Kronecker,
:class:`~vbseg.gp.kernels.KroneckerFactors`): exact, eps on the grid itself, O(N sum_d
n_d) per product. The isotropic kernel by circulant embedding ("fft", the compact periodic
torus of ``embedding_shape(..., exact=False)``) needs a torus twice the kernel's reach, which
for a bias field's long length-scale on a small crop is many times the crop (60 mm Matern 5/2
on a 16^3 crop of 4 mm voxels: a torus of ~125^3), so it only pays on large grids.

This is the Potts-model counterpart of :func:`vbseg.gp.model.gp_intensity_field`, in the
tradition of bias-field estimation inside the segmentation EM (Wells et al. 1996, IEEE TMI
15:429; Van Leemput et al. 1999, IEEE TMI 18:885, who use a polynomial basis where this uses
a GP).

**Inference: variational EM with eps as a parameter.** The labels and class parameters keep
their mean-field factors; eps gets a point estimate (its MAP given them), so the objective the
fit climbs is E_q[log p(y, z, theta | eps)] + log N(eps | 0, I) + H[q]. Given q and the class
posteriors, with D_v = sum_{k in S} q_v(k) E[tau_k1] (observed VOI voxels) and
s_v = sum_{k in S} q_v(k) E[tau_k1] (y_v1 - E[mu_k1]), that objective in eps is the quadratic
-|eps|^2 / 2 - (L eps)' D (L eps) / 2 + s' L eps, maximised where

    (I + L' D L) eps = L' s      (so b = L eps = (K^-1 + D)^-1 s, the GP posterior mean).

Each coordinate-ascent iteration runs ``cg_iterations`` conjugate-gradient steps on it, warm
started at the previous eps: CG from x0 minimises the quadratic over x0 + a Krylov space, so
every update raises the objective and the ELBO trace stays monotone. Why a point estimate:
q(b)'s variance would need the diagonal of (I + L' D L)^-1; for a field that is smooth over
hundreds of voxels it is far below the noise variance (each b_v is informed by the voxels
within a length-scale), so E[(y - mu - b)^2] is dominated by (y - mu - E b)^2 + 1 / kappa.
The kernel's hyperparameters are fixed (given); the field and the labels are told apart only
by smoothness, so the length-scale must sit well above the lesion size.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vbseg.gp.kernels import KERNELS, STRUCTURES, embedding_shape, grid_structure
from vbseg.potts.emission_updates import (
    EmissionVB,
    expected_log_likelihood,
    kl_normal_gamma,
    normal_gamma_update,
)
from vbseg.potts.model import NormalGammaPrior

DEFAULT_LENGTHSCALE_MM = 60.0
DEFAULT_AMPLITUDE = 0.5
DEFAULT_CG_ITERATIONS = 6
INTENSITY_FILE = "intensity_field.nii.gz"  # what vbseg segment --intensity-field writes
# --intensity-field: which classes' first-modality mean carries the GP field: every class (a
# bias field) or the tumour class
INTENSITY_FIELDS = ("all", "tumour")


@dataclasses.dataclass(frozen=True)
class IntensityFieldSpec:
    """Static description of the field (hashable: a ``jax.jit`` static argument).

    classes: the classes whose first-modality mean carries the field (all of them: a bias
    field; the tumour class: heterogeneous uptake). kernel: one of
    :data:`~vbseg.gp.kernels.KERNELS`. lengthscale_mm, amplitude: fixed
    hyperparameters (amplitude in standardised intensity units). spacing_mm: voxel size.
    structure: "kronecker" (separable product kernel, the default) or "fft" (isotropic,
    circulant embedding); see the module doc.
    """

    classes: tuple[int, ...]
    spacing_mm: tuple[float, float, float]
    kernel: str = "matern52"
    structure: str = "kronecker"
    lengthscale_mm: float = DEFAULT_LENGTHSCALE_MM
    amplitude: float = DEFAULT_AMPLITUDE
    cg_iterations: int = DEFAULT_CG_ITERATIONS

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(int(k) for k in self.classes))
        object.__setattr__(self, "spacing_mm", tuple(float(h) for h in self.spacing_mm))
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r} (available: {', '.join(KERNELS)})")
        if self.structure not in STRUCTURES:
            raise ValueError(f"unknown structure {self.structure!r} (available: {', '.join(STRUCTURES)})")
        if not (self.lengthscale_mm > 0 and self.amplitude > 0 and self.classes):
            raise ValueError("the intensity field needs a positive length-scale and amplitude and "
                             "at least one class")

    def describe(self, which: str, scale: float, log_scale: bool) -> dict:
        """summary.json's description: ``which`` ("all"/"tumour"), the amplitude in image units
        (``scale``: the first image's standardisation sd; ``log_scale``: log-normal PET)."""
        units = "log of the first image's units" if log_scale else "the first image's units"
        return {"classes": which, "fit_classes": list(self.classes), "kernel": self.kernel,
                "structure": self.structure + " (separable product kernel)" * (self.structure == "kronecker"),
                "lengthscale_mm": self.lengthscale_mm, "amplitude": self.amplitude * float(scale),
                "amplitude_units": units,
                "inference": "variational EM: the whitened field a point estimate (MAP given the label "
                             f"marginals and class posteriors; {self.cg_iterations} warm-started "
                             "conjugate-gradient steps per iteration), hyperparameters fixed "
                             "(vbseg.potts.intensity_field)",
                "note": "the field and the class means share a constant offset, pinned only by the "
                        "field's zero-mean prior"}

    def covariance(self, grid_shape, check: bool = False):
        """The kernel's grid structure on ``grid_shape`` (``latent_shape``, ``sqrt_matvec``,
        ``sqrt_rmatvec``)."""
        shape = (embedding_shape(grid_shape, self.spacing_mm, self.kernel, self.lengthscale_mm,
                                 exact=False) if self.structure == "fft" else None)
        return grid_structure(self.structure, grid_shape, self.spacing_mm, self.kernel,
                              self.lengthscale_mm, self.amplitude, shape=shape, check=check)


class FieldPosterior(NamedTuple):
    """The GP-field family's ``post``: the class parameters' Normal-Gamma posterior and the
    whitened field eps (the torus shape)."""

    classes: NormalGammaPrior
    eps: jax.Array


def class_offsets(field, classes, num_classes: int, num_modalities: int):
    """(X, Y, Z, K, M): ``field`` on the first modality of ``classes``, 0 elsewhere."""
    mask = jnp.zeros((num_classes, num_modalities), field.dtype)
    mask = mask.at[jnp.asarray(classes), 0].set(1.0)
    return field[..., None, None] * mask


def field_step(eps, structure, q, observations, observed, post: NormalGammaPrior,
               classes, iterations: int, tol: float = 1e-6):
    """At most ``iterations`` CG steps on (I + L' D L) eps = L' s from ``eps`` (module doc),
    fewer when the relative residual falls below ``tol``."""
    cls = jnp.asarray(classes)
    precision = (post.shape / post.rate)[cls, 0]  # E[tau_k1], k in S
    weight = q[..., cls] * precision * observed[..., :1]  # (X, Y, Z, |S|)
    d = jnp.sum(weight, axis=-1)
    s = jnp.sum(weight * (observations[..., :1] - post.mean[cls, 0]), axis=-1)

    def operator(x):
        return x + structure.sqrt_rmatvec(d * structure.sqrt_matvec(x))

    solution, _ = jax.scipy.sparse.linalg.cg(operator, structure.sqrt_rmatvec(s), x0=eps,
                                             tol=tol, maxiter=iterations)
    return solution


def field_emission(prior: NormalGammaPrior, spec: IntensityFieldSpec, grid_shape, *, num_classes: int,
                   num_modalities: int, tied: bool = True) -> EmissionVB:
    """The Gaussian emission family with the GP intensity field (module doc); ``post`` is a
    :class:`FieldPosterior`, ``aux`` the previous eps."""
    structure = spec.covariance(grid_shape)

    def offsets(eps):
        return class_offsets(structure.sqrt_matvec(eps), spec.classes, num_classes, num_modalities)

    def update(q, y, o, eps):
        classes = normal_gamma_update(q, y, o, prior, tied, offset=offsets(eps))
        eps = field_step(eps, structure, q, y, o, classes, spec.classes, spec.cg_iterations)
        return FieldPosterior(classes, eps)

    def unary(y, o, post):
        return expected_log_likelihood(y, o, post.classes, offset=offsets(post.eps)), post.eps

    def kl(post):
        # minus log N(eps | 0, I) up to its constant: eps is a point estimate (module doc)
        return kl_normal_gamma(post.classes, prior, tied) + 0.5 * jnp.sum(post.eps**2)

    return EmissionVB(update, unary, kl, lambda q: jnp.zeros(structure.latent_shape, q.dtype),
                      lambda post: post.classes)


def field_on_grid(spec: IntensityFieldSpec, grid_shape, eps):
    """b = L eps on the grid (standardised units of the first modality)."""
    return spec.covariance(grid_shape).sqrt_matvec(eps)
