"""Partial-volume hidden Markov random field: a tumour fraction per voxel on L levels.

Each voxel v of the region of interest R carries a label x_v in {0, ..., L-1} naming its
tumour fraction phi_{x_v}, with phi_k = k / (L - 1) (L >= 2; 0 and 1 are the pure levels). The
prior is an ordinal Markov random field,

    p(x | beta) ∝ exp( sum_v u(x_v) + beta * sum over neighbour pairs (v, w) of
                       w_vw * J(x_v, x_w) ),      J(k, l) = -|phi_k - phi_l|,

with the spacing-aware weights w_vw of :mod:`vbseg.potts.model`. The pair term charges a step
in fraction by its size, so a boundary ramp costs what a sharp edge of the same total step
costs; the unary u favours the pure levels by their own weights (u = 0 at phi = 0 and 1,
u = log(rho / (L - 2)) at each of the L - 2 mixed levels, so the mixed levels together weigh
rho times a pure level, whatever L). This is the fuzzy-measure idea of FLAB (Hatt et al., "A
fuzzy locally adaptive Bayesian segmentation approach for volume determination in PET", IEEE
TMI 28:881, 2009): two hard classes and a fuzzy transition between them, with the pure
classes carrying their own prior mass; here the transition is an ordinal MRF on a grid of
fractions (an alternative is a finer latent label grid averaged onto the image, Van Leemput
et al., "A unifying framework for partial volume segmentation of brain MR images", IEEE TMI
22:105, 2003; not built).

Given the fractions, each modality m is linear in the fraction,

    y_vm = H'_m( mu_0m (1 - phi - omega) + mu_1m phi )_v + noise,  noise ~ N(0, 1/(tau_m lambda_vm)),

with the scanner blur H'_m of :mod:`vbseg.potts.psf` (FWHM 0, the identity, for CT and MR),
background level mu_0m, tumour level mu_1m (so y = b + Delta (H' phi) with b = mu_0,
Delta = mu_1 - mu_0, on the support), one noise precision per modality and known relative
precisions lambda_vm (e.g. PET variance growing with uptake), and the Normal-Gamma prior of the
PSF Potts model on (mu_.m, tau_m). ``omega`` (X, Y, Z, M), default 0, is a known per-voxel
fraction of a cold structure (the glass wall of a NEMA IEC sphere: activity 0 there). In
regression form the unblurred mean is (P[x_v] + o_v) . mu_m with the level design
P_k = (1 - phi_k, phi_k) and offset o_v = (-omega_v, 0)
(:mod:`vbseg.potts.meanfield_psf`, "Level designs").

With L = 2 the model is the PSF hidden Potts model with K = 2 and uniform class proportions:
J(k, l) = 1[k = l] - 1 differs from the Potts pair term by a constant, and the design is the
one-hot one (tested).

Shapes: grid (X, Y, Z); observations (X, Y, Z, M); level marginals (X, Y, Z, L); class
parameters (2, M).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from vbseg.potts.model import DEFAULT_PRIOR, NormalGammaPrior, coupling_field, neighbour_sum
from vbseg.potts.psf import blur_operator

DEFAULT_FRACTION_LEVELS = 9
# --fraction-levels: at most this many levels L (phi = k / (L - 1)); the cost grows with L only
# in elementwise terms (the blurs act on the two design columns)
MAX_FRACTION_LEVELS = 33
# rho: the mixed levels together weigh 1 % of a pure level. The volume sums fractions over
# the whole VOI, so small fractions that noise lends to background voxels add up: with
# rho = 1 (mixed levels as likely as a pure one) a 13 mm sphere (1.15 mL, 4:1, CV 10 %, 6 mm PSF,
# a 16 x 16 x 24 crop) came out at 5.3 mL (mean-field) and 5.7 mL (joint draws); with
# rho = 0.01 at 1.20 and 1.21 mL, and a 22 mm sphere (5.58 mL) at 5.51 / 5.49 mL.
DEFAULT_MIXED_WEIGHT = 0.01


def fraction_levels(num_levels: int) -> np.ndarray:
    """phi_k = k / (L - 1), k = 0..L-1: (L,) float32."""
    if num_levels < 2:
        raise ValueError(f"at least two fraction levels are needed, got {num_levels}")
    return (np.arange(num_levels) / (num_levels - 1)).astype(np.float32)


def level_design(num_levels: int) -> np.ndarray:
    """The regression design row of each level, (1 - phi_k, phi_k): (L, 2)."""
    phi = fraction_levels(num_levels)
    return np.stack([1.0 - phi, phi], axis=1).astype(np.float32)


def level_interaction(num_levels: int, beta: float = 1.0) -> np.ndarray:
    """beta J with J(k, l) = -|phi_k - phi_l|: (L, L) (a coupling matrix for
    :func:`~vbseg.potts.model.coupling_field`)."""
    phi = fraction_levels(num_levels)
    return (-float(beta) * np.abs(phi[:, None] - phi[None, :])).astype(np.float32)


def level_log_prior(num_levels: int, mixed_weight: float = DEFAULT_MIXED_WEIGHT) -> np.ndarray:
    """The unary u (L,): 0 at the pure levels, log(rho / (L - 2)) at each mixed level."""
    unary = np.zeros(num_levels, np.float32)
    if num_levels > 2:
        unary[1:-1] = np.log(mixed_weight / (num_levels - 2))
    return unary


def wall_offset(wall_fraction, num_modalities: int) -> np.ndarray | None:
    """Design offsets (X, Y, Z, M, 2) for a cold-wall fraction omega (X, Y, Z, M): (-omega, 0)."""
    if wall_fraction is None:
        return None
    omega = np.asarray(wall_fraction, np.float32)
    return np.stack([-omega, np.zeros_like(omega)], axis=-1).reshape(
        omega.shape[:3] + (num_modalities, 2))


def level_energy(onehot, beta, unary, weights) -> jax.Array:
    """sum_v u(x_v) + beta sum_{v~w} w_vw J(x_v, x_w) for one-hot levels or marginals
    (X, Y, Z, L) (each pair once: half the sum of x_v' (beta J) n_v over voxels)."""
    pair = 0.5 * jnp.sum(onehot * coupling_field(neighbour_sum(onehot, weights),
                                                 jnp.asarray(beta)))
    return jnp.sum(onehot * unary) + pair


def pv_potts_model(
    observations: jax.Array,
    observed: jax.Array,
    roi: jax.Array,
    *,
    num_levels: int,
    beta: float,
    weights,
    psf_fwhm_mm,
    spacing_mm,
    prior: NormalGammaPrior = DEFAULT_PRIOR,
    mixed_weight: float = DEFAULT_MIXED_WEIGHT,
    relative_precision=None,
    wall_fraction=None,
) -> None:
    """The partial-volume hidden MRF as a NumPyro program (module doc).

    Sample sites: ``tau`` (1, M) noise precisions, ``mu`` (2, M) background and tumour levels,
    ``x`` (X, Y, Z) fraction levels (masked to the ROI; base measure uniform over the L
    levels), factor ``pv_prior`` = sum_v u(x_v) + beta sum w J, and observed ``y``.

    Args:
        observations, observed: (X, Y, Z, M) images and where each is observed.
        roi: (X, Y, Z) bool. num_levels: L. beta: coupling >= 0. weights: (3,) or (13,).
        psf_fwhm_mm: per-modality FWHM (mm; 0 = no blur); spacing_mm: voxel size.
        prior: Normal-Gamma hyperparameters (scalars). mixed_weight: rho.
        relative_precision: optional (X, Y, Z, M) known lambda_vm > 0.
        wall_fraction: optional (X, Y, Z, M) known cold fraction omega.
    """
    num_modalities = observations.shape[-1]
    grid = observations.shape[:3]
    tau = numpyro.sample("tau", dist.Gamma(jnp.full((1, num_modalities), prior.shape),
                                           jnp.full((1, num_modalities), prior.rate)).to_event(2))
    tau = jnp.broadcast_to(tau, (2, num_modalities))
    mu = numpyro.sample("mu", dist.Normal(jnp.full((2, num_modalities), prior.mean),
                                          1.0 / jnp.sqrt(prior.kappa * tau)).to_event(2))
    x = numpyro.sample("x", dist.Categorical(probs=jnp.full(num_levels, 1.0 / num_levels))
                       .expand(grid).mask(roi).to_event(3))
    onehot = jax.nn.one_hot(x, num_levels) * roi[..., None]
    numpyro.factor("pv_prior", level_energy(onehot, level_interaction(num_levels, beta),
                                            level_log_prior(num_levels, mixed_weight), weights))
    phi = jnp.asarray(fraction_levels(num_levels))[jnp.where(roi, x, 0)]
    omega = 0.0 if wall_fraction is None else wall_fraction
    unblurred = (mu[0] * (1.0 - phi[..., None] - omega) + mu[1] * phi[..., None])
    mean = jnp.stack([blur_operator(f, spacing_mm, roi).apply(unblurred[..., m])
                      for m, f in enumerate(psf_fwhm_mm)], axis=-1)
    scale = jnp.broadcast_to(1.0 / jnp.sqrt(tau[0]), mean.shape)
    if relative_precision is not None:
        scale = scale / jnp.sqrt(relative_precision)
    numpyro.sample("y", dist.Normal(mean, scale).mask(observed & roi[..., None]).to_event(4),
                   obs=observations)
