"""Coarse-to-fine restarts for the hidden-Potts mean-field fit on large grids.

The mean-field fit (:func:`vbseg.potts.meanfield.fit_hidden_potts_vb`) runs several
k-means restarts to convergence and keeps the one with the highest ELBO, because the ELBO of
a hidden Potts model has several modes (e.g. a solution that finds a small lesion and one
that spends its classes on the background). On a large grid most of the time goes into those
restarts. Here they run on a grid coarsened 2 x 2 x 2 instead (an eighth of the voxels):

1. every restart is fitted to convergence on the coarse grid (block means of the observed
   voxels, a block in the ROI when any of its voxels is; same beta and neighbour weights,
   which depend only on the ratios of the spacings);
2. restarts whose coarse solutions agree (hard labels with a Dice of at least
   :data:`SAME_SOLUTION_DICE` for every class) are one solution: only the first of them goes
   on;
3. each distinct coarse solution, its marginals repeated onto the fine grid, starts a fine
   fit run to convergence; the fine ELBOs pick the result as in the single-scale fit.

So the fine grid sees one fit per distinct mode instead of one per restart, each started near
its optimum. The result is a converged mean-field solution of the fine-grid model, chosen
among the modes found by the fine-grid ELBO; what differs from the full-grid restarts is which
modes are found. The coarse grid changes the landscape the k-means starts fall into: a lesion
of about one coarse voxel loses half its contrast or more to the block mean (and can be missed),
block means divide independent noise by sqrt(8), and with K = 3 whether a lesion is split into
rim and core can come out differently. ``python -m benchmarks.bench_multiscale`` measures it on
32 PET/CT phantoms at 96^3 and 144^3 (results/bench_multiscale.md): the same solution in 28
(50 % contours with Dice >= 0.97); at 144^3, with a 10 mm sphere at 2:1, the coarse path's
hottest class took the whole grid (its ELBO 30 nats lower, level within the stopping
tolerance), a 13 mm sphere at 2:1 came out smaller (contour Dice 0.90 between the two, ELBOs level),
and in two (a 37 mm sphere at 8:1, the six-sphere ring) the fits ended in different modes, once
with a higher, once with a lower ELBO than the full-grid restarts. So the fit takes this path
only when asked (``multiscale=True``; ``vbseg segment --restarts coarse``).

Multigrid and coarse-to-fine strategies for Markov random fields go back to Gidas (IEEE PAMI
1989) and Kato, Berthod & Zerubia (CVGIP 1996); here the coarse level serves only to choose
and warm-start the fine-level mean-field restarts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vbseg.potts.kmeans import start_centres

# two restarts found the same solution when their hard labels agree this well in every class
SAME_SOLUTION_DICE = 0.98
BLOCK = 2
# The fine fit from a coarse solution starts near its optimum: the ELBO then rises by little
# per iteration while the voxels along the boundary still relax, and the k-means starts'
# stopping rule (change < tol nats per voxel after 5 iterations) stopped it early: on a 13 mm
# sphere at 48^3 (PET/CT, K = 3) the volume came out 4 % above that of a full-grid fit run to
# tol 1e-8 (1.661 vs 1.597 mL); with these settings for the fine stage, 1.598 mL (measured once
# while choosing them; tests/potts/test_multiscale.py holds the K = 2 volume within 1 %).
FINE_TOL_FACTOR = 0.1
FINE_MIN_ITER = 10
# --restarts: where the Potts fit's k-means restarts run: "full" on the crop's grid (default),
# "coarse" on a 2x2x2 coarser grid first, one full-grid fit per distinct solution (this module;
# faster, but can end in other modes: bench_multiscale). Name -> multiscale or not.
RESTARTS = {"full": False, "coarse": True}


def _blocks(x: jax.Array, fill) -> jax.Array:
    """(X, Y, Z, ...) -> (X', Y', Z', 8, ...) with X' = ceil(X / 2): the 2 x 2 x 2 block of
    each coarse voxel on one axis (odd sizes padded with ``fill``)."""
    pad = [(0, (-n) % BLOCK) for n in x.shape[:3]] + [(0, 0)] * (x.ndim - 3)
    x = jnp.pad(x, pad, constant_values=fill)
    nx, ny, nz = (n // BLOCK for n in x.shape[:3])
    rest = x.shape[3:]
    x = x.reshape((nx, BLOCK, ny, BLOCK, nz, BLOCK) + rest)
    x = jnp.moveaxis(x, (1, 3, 5), (3, 4, 5))
    return x.reshape((nx, ny, nz, BLOCK**3) + rest)


def coarsen(observations, observed, roi, field):
    """The 2 x 2 x 2 coarse problem.

    Args:
        observations, observed: (X, Y, Z, M); roi: (X, Y, Z) bool; field: (X, Y, Z, K).
    Returns:
        (observations, observed, roi, field) on the (ceil(X/2), ceil(Y/2), ceil(Z/2)) grid: the
        mean of each modality over the block's observed ROI voxels (observed when there is at
        least one), the ROI as any voxel of the block, the field's mean over the block's ROI
        voxels.
    """
    observed = observed & roi[..., None]
    weight = _blocks(observed, False).astype(observations.dtype)  # (x, y, z, 8, M)
    values = _blocks(jnp.where(observed, observations, 0.0), 0.0)
    count = jnp.sum(weight, axis=3)
    coarse = jnp.sum(values * weight, axis=3) / jnp.maximum(count, 1.0)
    inside = _blocks(roi, False)  # (x, y, z, 8)
    coarse_roi = jnp.any(inside, axis=3)
    members = jnp.maximum(jnp.sum(inside, axis=3), 1)[..., None].astype(field.dtype)
    coarse_field = jnp.sum(_blocks(field, 0.0) * inside[..., None], axis=3) / members
    return coarse, count > 0, coarse_roi, coarse_field


def refine(marginals, shape) -> jax.Array:
    """(x, y, z, K) coarse marginals -> (X, Y, Z, K): each coarse voxel's q on its 2 x 2 x 2
    block, cropped to ``shape``."""
    for axis in range(3):
        marginals = jnp.repeat(marginals, BLOCK, axis=axis)
    return marginals[: shape[0], : shape[1], : shape[2]]


def first_equal_solution(marginals, roi) -> jax.Array:
    """For each restart r, the restart whose fine fit stands for it: the first earlier
    representative s (a restart standing for itself) that found the same solution, else r.
    Same solution: hard labels (argmax of q over the ROI) with a Dice of at least
    :data:`SAME_SOLUTION_DICE` in every class (a class empty in both counts as agreeing).
    "Same" is not transitive (A ~ B and B ~ C without A ~ C), so r is compared with the
    representatives only: every returned index stands for itself, i.e. its fine fit runs.
    ``marginals`` (R, X, Y, Z, K); returns (R,) int."""
    num_restarts, num_classes = marginals.shape[0], marginals.shape[-1]
    onehot = jax.nn.one_hot(jnp.argmax(marginals, axis=-1), num_classes, dtype=jnp.float32)
    onehot = onehot * roi[None, ..., None]
    flat = onehot.reshape(num_restarts, -1, num_classes)
    overlap = jnp.einsum("rvk,svk->rsk", flat, flat)  # (R, R, K) voxels labelled k by both
    size = jnp.sum(flat, axis=1)  # (R, K)
    total = size[:, None, :] + size[None, :, :]
    dice = jnp.where(total > 0, 2.0 * overlap / jnp.maximum(total, 1.0), 1.0)
    same = jnp.all(dice >= SAME_SOLUTION_DICE, axis=-1)  # (R, R)
    source = jnp.arange(num_restarts)
    for r in range(1, num_restarts):  # R is small and static
        earlier = jnp.arange(r)
        candidates = same[r, :r] & (source[:r] == earlier)
        source = source.at[r].set(jnp.where(jnp.any(candidates), jnp.argmax(candidates), r))
    return source


def multiscale_restarts(fit_start, fit_from, observations, observed, roi, field, levels):
    """Restarts on the coarse grid, then one fine fit per distinct coarse solution.

    Args:
        fit_start: (observations, observed, roi, field, level, centres) -> the single-scale
            restart's tuple (q, post, alpha, trace, iterations, converged) (k-means start,
            then coordinate ascent), applied on the coarse grid.
        fit_from: (q0,) -> the same tuple for coordinate ascent on the fine grid from q0.
        levels: (R, K) k-means start levels (the start centres are the coarse grid's
            quantiles at these levels).
    Returns:
        (the per-restart tuple stacked over R, as the single-scale restarts return it, with a
        restart that repeats an earlier one's coarse solution carrying that one's fine result;
        coarse iterations (R,); fine iterations (R,), 0 for a repeated restart).
    """
    coarse = coarsen(observations, observed, roi, field)
    coarse_centres = start_centres(coarse[0], coarse[1] & coarse[2][..., None], coarse[2], levels)
    q_coarse, *_, coarse_iterations, _ = jax.lax.map(
        lambda start: fit_start(*coarse, *start), (levels, coarse_centres))
    source = first_equal_solution(q_coarse, coarse[2])
    shape = observations.shape[:3]
    template = jax.eval_shape(fit_from, jax.ShapeDtypeStruct(shape + q_coarse.shape[-1:],
                                                              observations.dtype))

    def fine(args):
        q_start, repeated = args

        def run(q):
            return fit_from(refine(q, shape) * roi[..., None])

        def skip(q):
            return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), template)

        return jax.lax.cond(repeated, skip, run, q_start)

    outputs = jax.lax.map(fine, (q_coarse, source != jnp.arange(source.shape[0])))
    fine_iterations = jnp.where(source == jnp.arange(source.shape[0]), outputs[4], 0)
    outputs = jax.tree_util.tree_map(lambda x: x[source], outputs)
    return outputs, coarse_iterations, fine_iterations
