"""Where the GP logit-field fit starts (step 2 of :mod:`vbseg.gp.fit`): class
parameters from the best of four thresholded labelings of the first modality refined by EM of
an independent-voxel Gaussian mixture, and the whitened field from kriging the logits of its
responsibilities (plus, with a prior logit ell, the least-squares start of m and gamma)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vbseg.gp.model import (
    GPLogitModel,
    GridGP,
    class_log_likelihoods,
    mixture_log_likelihood,
    responsibility,
)

PRIOR_LOGIT_SITE = "prior_logit_weight"

# Responsibilities are clipped to this before the logit that starts the field.
START_CLIP = 0.02
START_CG_STEPS = 40
START_EM_STEPS = 20
# Percentiles of the first modality above which voxels start as tumour (one start each).
START_LEVELS = (0.5, 0.9, 0.99, 0.999)
# The prior-logit weight's start (least-squares slope) is clipped to this range.
START_WEIGHT_MIN = 0.05
START_WEIGHT_MAX = 4.0

def mixture_em(features, observed, voi, labels, num_steps):
    """EM for an independent-voxel 2-class Gaussian mixture with tied variances, from hard
    labels. Returns (mu (2, M), tau (1, M), proportion of class 1, log-likelihood, r (X, Y, Z))."""
    seen = observed & voi[..., None]
    r = (labels == 1).astype(features.dtype)

    def m_step(r):
        weights = jnp.stack([1.0 - r, r], -1)[..., :, None] * seen[..., None, :]  # (X,Y,Z,2,M)
        count = jnp.maximum(jnp.sum(weights, axis=(0, 1, 2)), 1e-6)
        mu = jnp.sum(weights * features[..., None, :], axis=(0, 1, 2)) / count
        scatter = jnp.sum(weights * (features[..., None, :] - mu) ** 2, axis=(0, 1, 2))
        tau = jnp.sum(count, 0, keepdims=True) / jnp.maximum(jnp.sum(scatter, 0, keepdims=True), 1e-6)
        proportion = jnp.clip(jnp.sum(r * voi) / jnp.maximum(jnp.sum(voi), 1), 1e-4, 1 - 1e-4)
        return mu, tau, proportion

    def e_step(params):
        mu, tau, proportion = params
        log_lik = class_log_likelihoods(features, seen, mu, jnp.broadcast_to(tau, mu.shape))
        logit = jnp.log(proportion) - jnp.log1p(-proportion)
        return responsibility(logit, log_lik), jnp.sum(
            jnp.where(voi, mixture_log_likelihood(logit, log_lik), 0.0))

    r = jax.lax.fori_loop(0, num_steps, lambda _, r: e_step(m_step(r))[0], r)
    params = m_step(r)
    r, log_lik = e_step(params)
    return params[0], params[1], params[2], log_lik, r


def kriging_start(grid: GridGP, target, voi, lengthscale, amplitude):
    """eps0 = L^T P^T (P K P^T + a^2 I)^-1 P target by conjugate gradients: the whitened
    coordinates of the GP regression mean of ``target`` observed on the VOI with noise a^2."""
    structure = grid.build(lengthscale, amplitude)
    mask = voi.astype(target.dtype)
    noise = amplitude**2

    def operator(x):
        return mask * structure.matvec(mask * x) + noise * x

    solution, _ = jax.scipy.sparse.linalg.cg(operator, mask * target, maxiter=START_CG_STEPS)
    return structure.sqrt_rmatvec(mask * solution)


def start_values(features, observed, voi, model: GPLogitModel, prior_logit=None, weight_start=None):
    """Initial hyper values (constrained) and field mean (see the module docstring, step 2);
    ``prior_logit``: the optional (X, Y, Z) offset ell (adds the ``prior_logit_weight`` start:
    ``weight_start`` when it is a number, the clipped least-squares slope when it is NaN)."""
    seen = observed[..., 0] & voi
    first = jnp.where(seen, features[..., 0], jnp.nan)
    thresholds = jnp.nanquantile(first, jnp.asarray(START_LEVELS, features.dtype))
    labelings = (seen & (features[..., 0] > thresholds[:, None, None, None])).astype(jnp.int32)
    fits = jax.vmap(mixture_em, in_axes=(None, None, None, 0, None))(
        features, observed, voi, labelings, START_EM_STEPS)
    best = jnp.argmax(fits[3])
    mu, tau, _, _, r = jax.tree_util.tree_map(lambda x: x[best], fits)
    target = jnp.log(jnp.clip(r, START_CLIP, 1 - START_CLIP)) - jnp.log1p(
        -jnp.clip(r, START_CLIP, 1 - START_CLIP))
    prior = model.prior
    count = jnp.maximum(jnp.sum(voi), 1)
    offset = 0.0
    if prior_logit is not None:  # least-squares line target ~ m + gamma ell over the VOI
        ell_mean = jnp.sum(prior_logit * voi) / count
        centred = jnp.where(voi, prior_logit - ell_mean, 0.0)
        slope = jnp.sum(centred * target) / jnp.maximum(jnp.sum(centred**2), 1e-6)
        weight = jnp.clip(slope, START_WEIGHT_MIN, START_WEIGHT_MAX)
        weight = jnp.where(jnp.isnan(weight_start), weight, weight_start).astype(features.dtype)
        offset = weight * prior_logit
    mean = jnp.clip(jnp.sum((target - offset) * voi) / count,
                    prior.mean_loc - 2 * prior.mean_scale, prior.mean_loc + 2 * prior.mean_scale)
    lengthscale = jnp.asarray(prior.lengthscale_median_mm, features.dtype)
    amplitude = jnp.asarray(prior.amplitude_median, features.dtype)
    eps = kriging_start(model.grid, target - offset - mean, voi, lengthscale, amplitude)
    hyper = {"field_mean": mean, "field_lengthscale": lengthscale, "field_amplitude": amplitude,
             "mu": mu, "tau": tau if model.tied else jnp.broadcast_to(tau, mu.shape)}
    if prior_logit is not None:
        hyper[PRIOR_LOGIT_SITE] = weight
    field = {"field_eps": eps}
    if model.intensity is not None:
        ip = model.intensity_prior
        hyper["intensity_lengthscale"] = jnp.asarray(ip.lengthscale_median_mm, features.dtype)
        hyper["intensity_amplitude"] = jnp.asarray(ip.amplitude_median, features.dtype)
        field["intensity_eps"] = jnp.zeros((model.intensity_grid or model.grid).latent_shape,
                                           features.dtype)
    return hyper, field
