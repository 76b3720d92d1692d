"""Fitting the partial-volume hidden MRF (:mod:`vbseg.pv_potts.model`): the mean-field fit,
the joint draws of the fraction field, the summaries, the cold wall, and beta weighting.

**Mean-field VB.** :func:`~vbseg.potts.meanfield_psf.fit_hidden_potts_vb_psf` with the
level design P_k = (1 - phi_k, phi_k), the (L, L) coupling beta J and the level prior u as
the external field (uniform proportions): the same conjugate Normal-Gamma regression update
for (mu, tau) given q(x), and damped colour-by-colour level updates. It starts from a two-class
fit (the PSF hidden Potts model): background mass on level 0, tumour mass on level L-1.

**Joint draws.** Volumes come from draws of the whole fraction field, never from independent
voxels (DESIGN principle 3): the PSF Gibbs sampler over levels
(:mod:`vbseg.potts.gibbs_psf`, "Level designs"; levels, mu and tau drawn jointly, so the
draws carry the trade-off between a lesion's size and its uptake), started at the mean-field
mode. Volume = voxel volume x sum_v phi_v per draw (the sampler's recorded tumour column).

**Summaries.** P(f_v >= 1/2) (drives the contours and the binary ECE) and E[f_v] (the fraction
map) from level marginals.

**Cold wall** (``--wall-mm``). A shell of thickness W outside the lesion holds no activity
(the glass wall of a NEMA IEC sphere, about 1 mm), so near the boundary the blurred image is
darker than the model without it predicts. Its per-voxel fraction omega is placed outside the
two-class fit's lesion (P >= 1/2): with d the distance from a voxel centre to the nearest
lesion voxel centre minus half a voxel (the surface lies about half a voxel beyond the last
inside centre), omega is the length of [d - h/2, d + h/2] inside [0, W] over h (a 1D
partial-volume approximation across the surface, h the voxel size along the nearest
direction, taken as the mean spacing). It enters as a known design offset (-omega, 0).

**Beta weighting.** The mean-field ELBO bounds log p(y | beta) + log Z(beta) (the prior's
energy enters unnormalised), so ELBOs at different beta are comparable only after subtracting
log Z(beta) - log Z(0), estimated by thermodynamic integration (Gelman & Meng 1998,
Statistical Science 13:163): d log Z / d beta = E[T(x) | beta] with T(x) = sum_{v~w} w_vw
J(x_v, x_w) the prior's pair statistic, simulated by checkerboard Gibbs from the level prior
(with its unary u) on the fit's own ROI and grid, and integrated by the trapezoid rule
(:func:`~vbseg.potts.beta.log_partition_ratio`). The fits on a small beta grid are then
mixed with weights ∝ exp(ELBO(beta) - log Z(beta)). PSF FWHM values are weighted by the ELBO
alone (log Z does not depend on the PSF).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from vbseg.inference.chains import one_hot_labels, run_chains, split_each
from vbseg.potts.beta import log_partition_ratio
from vbseg.potts.gibbs import label_gibbs
from vbseg.pv_potts.model import fraction_levels, level_energy

# the mass spread over every level in the start from a two-class fit (no level starts at 0)
START_FLOOR = 0.05


def levels_from_classes(tumour_probability, num_levels: int) -> np.ndarray:
    """Start marginals (X, Y, Z, L) from a two-class fit's P(tumour): 1 - p on level 0, p on
    level L-1, mixed with START_FLOOR of the uniform distribution over levels."""
    p = np.asarray(tumour_probability, np.float32)
    q = np.zeros(p.shape + (num_levels,), np.float32)
    q[..., 0], q[..., -1] = 1.0 - p, p
    return (1.0 - START_FLOOR) * q + START_FLOOR / num_levels


def fraction_summaries(level_marginals) -> tuple[np.ndarray, np.ndarray]:
    """(P(f_v >= 1/2), E[f_v]) from level marginals (X, Y, Z, L)."""
    q = np.asarray(level_marginals)
    phi = fraction_levels(q.shape[-1])
    # clipped: float32 marginals sum to 1 only to rounding
    return np.clip(q[..., phi >= 0.5].sum(axis=-1), 0, 1), np.clip(q @ phi, 0, 1)


def wall_fraction(lesion, spacing_mm, wall_mm: float) -> np.ndarray:
    """The cold-wall fraction omega (X, Y, Z) of each voxel outside ``lesion`` (bool mask),
    a shell of ``wall_mm`` (module doc); zeros when ``wall_mm`` is 0 or the lesion empty."""
    lesion = np.asarray(lesion, bool)
    if wall_mm <= 0 or not lesion.any():
        return np.zeros(lesion.shape, np.float32)
    h = float(np.mean(spacing_mm))
    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing_mm) - 0.5 * h
    low, high = np.maximum(distance - 0.5 * h, 0.0), np.minimum(distance + 0.5 * h, wall_mm)
    omega = np.clip((high - low) / h, 0.0, 1.0)
    return np.where(lesion, 0.0, omega).astype(np.float32)


class BetaWeights(NamedTuple):
    """betas (B,); elbo (B,) of the fits; log_partition (B,) log Z(beta) - log Z(0) by TI;
    weights (B,) normalised exp(elbo - log_partition); path (B,) the simulated E[T | beta]."""

    betas: np.ndarray
    elbo: np.ndarray
    log_partition: np.ndarray
    weights: np.ndarray
    path: np.ndarray


@partial(jax.jit, static_argnames=("num_levels", "num_chains", "num_sweeps", "burn_in"))
def _level_statistic_path(key, betas, unit_interaction, unary, roi, weights, *, num_levels,
                          num_chains, num_sweeps, burn_in):
    """(B, C, S) draws of T(x) = sum_{v~w} w_vw J(x_v, x_w) under the level prior at each beta."""
    prior_unary = jnp.broadcast_to(unary, roi.shape + (num_levels,))

    def summarise(state, info):
        onehot = one_hot_labels(state.labels, num_levels, roi, unary.dtype)
        return (), level_energy(onehot, unit_interaction, 0.0, weights)

    def at_beta(beta, beta_key):
        kernel = label_gibbs(prior_unary, beta * unit_interaction, weights, roi)
        chain_keys = split_each(jax.random.split(beta_key, num_chains), 2)
        starts = jax.vmap(lambda k: kernel.init(jax.random.randint(k, roi.shape, 0, num_levels)))(
            chain_keys[:, 0])
        return run_chains(kernel.step, starts, split_each(chain_keys[:, 1], burn_in + num_sweeps),
                          summarise, burn_in=burn_in).records

    return jax.lax.map(lambda args: at_beta(*args), (betas, jax.random.split(key, betas.shape[0])))


def level_log_partition(betas, unit_interaction, unary, roi, weights, *, seed=0, num_chains=4,
                        num_sweeps=150, burn_in=100) -> tuple[np.ndarray, np.ndarray]:
    """(log Z(beta) - log Z(0) at each of ``betas`` (increasing from 0), E[T | beta]) for the level
    prior p(x) ∝ exp(sum_v u(x_v) + beta T(x)) on ``roi`` (module doc)."""
    betas = np.asarray(betas, np.float64)
    if betas[0] != 0.0 or np.any(np.diff(betas) <= 0):
        raise ValueError("betas must increase strictly from 0")
    draws = np.asarray(_level_statistic_path(
        jax.random.PRNGKey(seed), jnp.asarray(betas, jnp.float32),
        jnp.asarray(unit_interaction, jnp.float32), jnp.asarray(unary, jnp.float32),
        jnp.asarray(roi, bool), jnp.asarray(weights, jnp.float32),
        num_levels=len(unary), num_chains=num_chains, num_sweeps=num_sweeps, burn_in=burn_in),
        np.float64)
    path = draws.mean(axis=(1, 2))
    return log_partition_ratio(betas, path), path


def beta_weights(betas, elbos, log_partition, path) -> BetaWeights:
    """Posterior weights of the beta grid (uniform prior on the grid points): ∝ exp(ELBO -
    log Z)."""
    log_weight = np.asarray(elbos, np.float64) - np.asarray(log_partition, np.float64)
    weights = np.exp(log_weight - log_weight.max())
    return BetaWeights(np.asarray(betas, np.float64), np.asarray(elbos, np.float64),
                       np.asarray(log_partition, np.float64), weights / weights.sum(),
                       np.asarray(path, np.float64))
