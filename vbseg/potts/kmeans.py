"""k-means starts for the mean-field fits: start levels, start centres, Lloyd labels.

Every coordinate-ascent fit of :mod:`vbseg.potts.meanfield` (and the coarse stage of
:mod:`vbseg.potts.multiscale`) starts from deterministic k-means over the ROI voxels, with
centres at per-modality quantiles; the baselines' k-means labels are the same function. A module
of its own so that the single-scale and the multiscale fit both build on it without importing
each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vbseg.potts.emission_updates import class_moments


def restart_levels(num_classes: int) -> jax.Array:
    """Quantile levels at which k-means centres start, one row per restart: (R, K).

    Evenly spaced levels (k + 0.5) / K suit classes of similar size; a small hot lesion in a
    large background (the usual PET crop, well under 1 % of voxels) is found from the
    upper-tail row (0.5 up to 0.999, geometric in the tail probability), a cold one from its
    mirror image. The fit keeps the restart with the highest ELBO.
    """
    even = (jnp.arange(num_classes) + 0.5) / num_classes
    tail = 0.5 * (0.002 ** (jnp.arange(num_classes) / (num_classes - 1)))
    upper = 1.0 - tail
    lower = jnp.sort(tail)
    return jnp.stack([even, upper, lower])


# k-means runs on at most this many ROI voxels (evenly spaced ranks among them beyond it), and
# every voxel is then assigned to the nearest final centre: XLA's CPU sort alone takes ~2 s for
# the 3 million voxels x 2 modalities of a 144^3 PET/CT crop, and a quarter of a million voxels
# place the start centres as well (the fit refines them).
KMEANS_SAMPLE = 2**18


def kmeans_sample(observations, observed, roi):
    """(observations (S, M), valid (S, M)) of the ROI voxels k-means runs on.

    With n ROI voxels and S = min(grid size, :data:`KMEANS_SAMPLE`): all of them when n <= S
    (the rows past n are marked invalid), else the voxels of rank floor(j n / S), j < S, in
    the ROI's flattened order: a non-integer step, so the sample does not alias with the grid
    (an integer step dividing the row length would keep only some planes).
    """
    num_modalities = observations.shape[-1]
    flat_roi = roi.reshape(-1)
    size = min(flat_roi.shape[0], KMEANS_SAMPLE)
    count = jnp.sum(flat_roi)
    (index,) = jnp.nonzero(flat_roi, size=flat_roi.shape[0], fill_value=0)
    ranks = jnp.arange(size)
    ranks = jnp.where(count > size, (ranks * (count / size)).astype(ranks.dtype), ranks)
    chosen = index[jnp.minimum(ranks, flat_roi.shape[0] - 1)]
    valid = observed.reshape(-1, num_modalities)[chosen] & (ranks < count)[:, None]
    return observations.reshape(-1, num_modalities)[chosen], valid


def start_centres(observations, observed, roi, levels) -> jax.Array:
    """k-means start centres: the quantiles ``levels`` ((K,) or (R, K)) of each modality over
    the ROI voxels where it is observed (of the sample of :func:`kmeans_sample`);
    (K, M) or (R, K, M), one sort for all rows."""
    values, valid = kmeans_sample(observations, observed, roi)
    flat = jnp.nanquantile(jnp.where(valid, values, jnp.nan), jnp.reshape(levels, -1), axis=0)
    return flat.reshape(jnp.shape(levels) + (observations.shape[-1],))


def nearest_centre(observations, valid, centres):
    """Index of the nearest centre over the valid modalities: (...,) from (..., M), (K, M).
    A NaN centre coordinate (a modality not observed where the centre was placed) counts as
    unobserved."""
    dist2 = 0.0
    for m in range(observations.shape[-1]):  # (..., K) per modality: faster on CPU than
        term = (observations[..., m:m + 1] - centres[:, m]) ** 2  # reducing (..., K, M)
        use = valid[..., m:m + 1] & ~jnp.isnan(centres[:, m])
        dist2 = dist2 + jnp.where(use, term, 0.0)
    return jnp.argmin(dist2, axis=-1)


def kmeans_labels(observations, observed, roi, levels, num_iterations: int = 30, centres=None):
    """Deterministic k-means (Lloyd) over ROI voxels, distances over observed modalities.

    Centres start at the quantiles ``levels`` (K,) of each modality (:func:`start_centres`,
    or at ``centres`` (K, M) when given); Lloyd steps on the voxels of :func:`kmeans_sample`
    (every ROI voxel when there are at most :data:`KMEANS_SAMPLE`) run until no voxel changes class,
    at most ``num_iterations``; then every ROI voxel goes to its nearest centre. Classes are
    returned in increasing order of the first modality's centre. Returns (X, Y, Z) int labels.
    """
    num_classes = levels.shape[0]
    if centres is None:
        centres = start_centres(observations, observed, roi, levels)
    values, valid = kmeans_sample(observations, observed, roi)
    inside = jnp.any(valid, axis=-1)

    def cond(carry):
        it, _, _, changed = carry
        return (it < num_iterations) & changed

    def step(carry):
        it, centres, labels, _ = carry
        onehot = jax.nn.one_hot(labels, num_classes, dtype=values.dtype) * inside[:, None]
        count, _, mean, _ = class_moments(onehot, values, valid)
        centres = jnp.where(count > 0, mean, centres)
        new = nearest_centre(values, valid, centres)
        return it + 1, centres, new, jnp.any((new != labels) & inside)

    start = (0, centres, nearest_centre(values, valid, centres), True)
    _, centres, _, _ = jax.lax.while_loop(cond, step, start)
    order = jnp.argsort(centres[:, 0])
    rank = jnp.argsort(order)
    return rank[nearest_centre(observations, observed & roi[..., None], centres)]
