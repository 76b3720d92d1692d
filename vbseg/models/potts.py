"""Hidden Potts model: a Markov random field over voxel labels with per-class emissions.

Labels z_v in {0, ..., K-1} on the voxels v of a region of interest (ROI) R, with class
proportions pi (an external field that lets a small lesion be a small class). The prior is

    p(pi, z | beta) = Dirichlet(pi | alpha0) prod_{v in R} pi_{z_v} exp(beta * S(z)) / Z(beta),
    S(z) = sum over neighbour pairs (v, w) in R of  w_vw * 1[z_v = z_w],

(Potts 1952; as an image prior, Besag 1986), on the 6-neighbourhood of the voxel grid with
spacing-aware weights w_vw = min(spacing) / spacing_axis (the inverse centre distance,
normalised so the finest axis has weight 1, keeping beta's meaning independent of the voxel
size). Given labels, each of M co-registered modalities is an independent Gaussian

    y_vm | z_v = k  ~  Normal(mu_km, 1 / tau_km),

observed only where ``observed[v, m]`` (inside that image's field of view); the hidden
Markov random field with Gaussian emissions of Zhang, Brady & Smith (IEEE TMI 2001). Class
parameters get the conjugate Normal-Gamma prior

    tau_km ~ Gamma(a0, b0),   mu_km | tau_km ~ Normal(m0, 1 / (kappa0 * tau_km)),

with one precision per modality shared by all classes (``tied=True``, tau_km = tau_m) or
one per class. Z(beta) normalises the joint of (pi, z), so it depends on beta alone (the
marginal prior of pi is the Dirichlet tilted by the Potts partition function); it is
intractable and constant while beta is fixed. The NumPyro program below writes pi and the
categorical base measure as sample sites and exp(beta S(z)) as a factor, so its log density
is the log joint up to -log Z(beta).

Shapes: grid (X, Y, Z); observations (X, Y, Z, M); one-hot or marginal label arrays
(X, Y, Z, K); class parameters (K, M).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from vbseg.models.psf import blur_operator


class NormalGammaPrior(NamedTuple):
    """Normal-Gamma hyperparameters (each a scalar or a (K, M) array)."""

    mean: jax.Array | float = 0.0
    kappa: jax.Array | float = 0.01
    shape: jax.Array | float = 1.0
    rate: jax.Array | float = 0.01


DEFAULT_PRIOR = NormalGammaPrior()
# Default Dirichlet concentration of the class proportions: uniform on the simplex.
DEFAULT_CONCENTRATION = 1.0


def neighbour_weights(spacing_mm) -> np.ndarray:
    """6-neighbourhood edge weight per array axis: min(spacing) / spacing_axis, shape (3,)."""
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    return (spacing.min() / spacing).astype(np.float32)


def _shift(x: jax.Array, axis: int, step: int) -> jax.Array:
    """x shifted by ``step`` (+1 or -1) along ``axis`` with zeros entering (free boundary).

    ``_shift(x, a, +1)[i] = x[i - 1]``; ``_shift(x, a, -1)[i] = x[i + 1]``.
    """
    n = x.shape[axis]
    zeros = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))
    if step == 1:
        return jnp.concatenate([zeros, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    return jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), zeros], axis=axis)


def neighbour_sum(labels: jax.Array, weights) -> jax.Array:
    """sum_w w_vw * labels[w] over the 6 neighbours w of each voxel v.

    Args:
        labels: (X, Y, Z, K) one-hot labels or marginals, zero outside the ROI.
        weights: (3,) per-axis edge weights.
    Returns:
        (X, Y, Z, K) array; a weighted 6-point stencil (one convolution), free boundary.
    """
    total = jnp.zeros_like(labels)
    for axis in range(3):
        total = total + weights[axis] * (_shift(labels, axis, 1) + _shift(labels, axis, -1))
    return total


def potts_statistic(labels: jax.Array, weights) -> jax.Array:
    """S = sum over neighbour pairs of w_vw * <labels_v, labels_w>.

    For one-hot labels this is sum w_vw 1[z_v = z_w]; for mean-field marginals q it is
    E_q[S(z)] (the pairs are independent under q). Each pair is counted once.
    """
    total = jnp.zeros((), labels.dtype)
    for axis in range(3):
        n = labels.shape[axis]
        lower = jax.lax.slice_in_dim(labels, 0, n - 1, axis=axis)
        upper = jax.lax.slice_in_dim(labels, 1, n, axis=axis)
        total = total + weights[axis] * jnp.sum(lower * upper)
    return total


def gaussian_log_likelihood(observations, observed, mean, precision) -> jax.Array:
    """log N(y_vm | mean_km, 1/precision_km) summed over observed modalities: (X, Y, Z, K)."""
    y = observations[..., None, :]  # (X, Y, Z, 1, M)
    per_modality = 0.5 * (jnp.log(precision) - jnp.log(2 * jnp.pi)) - 0.5 * precision * (
        y - mean
    ) ** 2
    return jnp.sum(jnp.where(observed[..., None, :], per_modality, 0.0), axis=-1)


def hidden_potts_model(
    observations: jax.Array,
    observed: jax.Array,
    roi: jax.Array,
    *,
    num_classes: int,
    beta: float,
    weights,
    prior: NormalGammaPrior = DEFAULT_PRIOR,
    concentration: float = DEFAULT_CONCENTRATION,
    tied: bool = True,
    psf_fwhm_mm=None,
    spacing_mm=None,
    relative_precision=None,
    learn_proportions: bool = True,
) -> None:
    """Hidden Potts model as a NumPyro program.

    Sample sites: ``tau`` (1, M) shared or (K, M) per-class precisions, ``mu`` (K, M) class
    means, ``pi`` (K,) class proportions, ``z`` (X, Y, Z) labels (masked to the ROI), factor
    ``potts`` = beta * S(z), and observed ``y``.

    Args:
        observations: (X, Y, Z, M) images on one grid (standardised per modality).
        observed: (X, Y, Z, M) bool, where each modality is observed (FOV and ROI).
        roi: (X, Y, Z) bool, the voxels that carry a label.
        num_classes: K.
        beta: Potts coupling (>= 0).
        weights: (3,) per-axis neighbour weights, see :func:`neighbour_weights`.
        prior: Normal-Gamma hyperparameters of the class parameters (scalars).
        concentration: Dirichlet concentration alpha0 of pi.
        tied: one precision per modality shared by the classes.
        psf_fwhm_mm: optional per-modality PSF FWHM (mm; 0 = none) with ``spacing_mm``: the
            mean of modality m is then the blurred class-mean image H'_m mu_{z, m} (see
            :mod:`vbseg.models.psf`), i.e. the labels describe the activity before the
            scanner blurred it. Needs ``tied=True`` (one noise level per image).
        relative_precision: optional (X, Y, Z, M) known lambda_vm > 0: the noise precision of
            voxel v in modality m is tau_m * lambda_vm (e.g. PET variance growing with uptake).
        learn_proportions: sample pi ~ Dirichlet, or fix it uniform (no ``pi`` site).
    """
    num_modalities = observations.shape[-1]
    grid = observations.shape[:3]
    shape = (num_classes, num_modalities)
    tau_shape = (1, num_modalities) if tied else shape
    tau = numpyro.sample(
        "tau",
        dist.Gamma(jnp.full(tau_shape, prior.shape), jnp.full(tau_shape, prior.rate)).to_event(2),
    )
    tau = jnp.broadcast_to(tau, shape)
    mu = numpyro.sample(
        "mu", dist.Normal(jnp.full(shape, prior.mean), 1.0 / jnp.sqrt(prior.kappa * tau)).to_event(2)
    )
    if learn_proportions:
        pi = numpyro.sample("pi", dist.Dirichlet(jnp.full(num_classes, concentration)))
    else:
        pi = jnp.full(num_classes, 1.0 / num_classes)
    z = numpyro.sample(
        "z", dist.Categorical(probs=pi).expand(grid).mask(roi).to_event(3)
    )
    onehot = jax.nn.one_hot(z, num_classes) * roi[..., None]
    numpyro.factor("potts", beta * potts_statistic(onehot, weights))
    safe_z = jnp.where(roi, z, 0)
    mean, scale = mu[safe_z], 1.0 / jnp.sqrt(tau[safe_z])  # (X, Y, Z, M)
    if relative_precision is not None:
        scale = scale / jnp.sqrt(relative_precision)
    if psf_fwhm_mm is not None:
        if not tied:
            raise ValueError("the PSF likelihood needs tied precisions")
        # the blurred image of the label field's class means, restricted to the ROI
        mean = jnp.stack(
            [blur_operator(f, spacing_mm, roi).apply(mean[..., m])
             for m, f in enumerate(psf_fwhm_mm)], axis=-1)
    numpyro.sample(
        "y",
        dist.Normal(mean, scale).mask(observed & roi[..., None]).to_event(4),
        obs=observations,
    )
