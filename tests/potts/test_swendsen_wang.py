"""The Swendsen-Wang sampler against exact enumeration, against checkerboard Gibbs near and
above the critical coupling, and its handling of the ROI.

* Tiny grids (3x3x2; K = 2 and 3; 6-neighbourhood with unit and anisotropic weights,
  26-neighbourhood with anisotropic weights; an external field; ROIs with holes): E[S] and
  every voxel's marginal P(z_v = k) within 4 Monte Carlo standard errors of the enumerated
  values. The standard error of E[S] is sd(S) / sqrt(ESS) (numpyro's ESS over the chains);
  that of a marginal is the batch-means one, the spread of the 64 per-chain marginals over
  sqrt(64) (64 batches of 500 sweeps, each far longer than the autocorrelation time of a
  few sweeps), i.e. sqrt(p (1 - p) / ESS_v) with ESS_v estimated from the batches.
* 16^3, K = 2, unit weights (critical coupling ~0.443): at beta = 0.44 the class count (the
  magnetisation) has >= 10x Gibbs's ESS per sweep (measured 50-200x) and S at least Gibbs's
  (measured 1.5-2.8x); at beta = 1.0 chains from random and all-one starts agree (split
  R-hat < 1.05 for S and the count) and the all-one chains visit both ordered states (their
  time-averaged class-1 fraction is within 4 standard errors of the exact 1/2), while Gibbs
  chains from the all-one start never leave it (fraction > 0.9 in every sweep).
* ROI: voxels outside never bond and never change; the clusters are exactly the connected
  equal-label components inside the ROI (scipy.ndimage.label) when every bond opens.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy.special import logsumexp

from vbseg.inference.chains import chain_diagnostics
from vbseg.potts import beta as beta_estimation
from vbseg.potts.exact import enumerate_labelings, grid_edges, potts_log_potential
from vbseg.potts.gibbs import sample_labels
from vbseg.potts.model import neighbour_offsets, neighbour_weights, potts_statistic
from vbseg.potts.swendsen_wang import (
    connected_components,
    open_bonds,
    sample_swendsen_wang,
    swendsen_wang_sweep,
)

SHAPE = (3, 3, 2)


def _exact_on_roi(weights, beta, unary, roi):
    """Exact marginals (X, Y, Z, K) (zero outside the ROI) and E[S] of the Potts prior on the
    ROI sites and the pairs inside it, by enumeration."""
    edges, edge_weights = grid_edges(roi.shape, weights)
    inside = roi.ravel()
    kept = inside[edges[:, 0]] & inside[edges[:, 1]]
    sites = np.flatnonzero(inside)
    position = np.full(inside.size, -1)
    position[sites] = np.arange(sites.size)
    edges, edge_weights = position[edges[kept]], edge_weights[kept]
    num_classes = unary.shape[-1]
    labelings = enumerate_labelings(sites.size, num_classes)
    log_potential = potts_log_potential(labelings, unary.reshape(-1, num_classes)[sites], edges,
                                        edge_weights, beta)
    probs = np.exp(log_potential - logsumexp(log_potential))
    statistic = ((labelings[:, edges[:, 0]] == labelings[:, edges[:, 1]]) * edge_weights).sum(1)
    marginals = np.zeros((inside.size, num_classes))
    for k in range(num_classes):
        marginals[sites, k] = probs @ (labelings == k)
    return marginals.reshape(roi.shape + (num_classes,)), float(probs @ statistic)


def _roi_with_holes():
    roi = np.ones(SHAPE, bool)
    roi[1, 1, 0] = roi[0, 2, 1] = False
    return roi


def _roi_of_twelve():
    roi = np.zeros(SHAPE, bool)
    roi[:, :2, :] = True  # 12 sites: 3^12 labelings for K = 3
    return roi


@pytest.mark.parametrize("weights,num_classes,beta,with_field,roi", [
    (neighbour_weights((1.0, 1.0, 1.0)), 2, 0.8, False, np.ones(SHAPE, bool)),
    (neighbour_weights((1.0, 1.0, 1.5)), 2, 1.2, False, _roi_with_holes()),
    (neighbour_weights((1.0, 1.0, 2.0), 26), 2, 0.5, False, np.ones(SHAPE, bool)),
    (neighbour_weights((1.0, 1.5, 1.0)), 3, 1.0, True, _roi_of_twelve()),
], ids=["6nbhd", "6nbhd-anisotropic-holes", "26nbhd-anisotropic", "K3-field-roi"])
def test_marginals_and_statistic_match_enumeration(weights, num_classes, beta, with_field, roi):
    """Observed when written: marginals within 2.7 standard errors (0.010) at every voxel,
    E[S] within 1.9."""
    unary = (np.random.default_rng(3).normal(size=SHAPE + (num_classes,)) if with_field
             else np.zeros(SHAPE + (num_classes,)))
    exact_marginals, exact_statistic = _exact_on_roi(weights, beta, unary, roi)
    result = sample_swendsen_wang(
        jax.random.PRNGKey(0), beta, jnp.asarray(weights), jnp.asarray(roi),
        num_classes=num_classes, num_sweeps=500, burn_in=20, num_chains=64,
        unary=jnp.asarray(unary, jnp.float32) if with_field else None)
    statistics = np.asarray(result.statistics, np.float64)
    ess = chain_diagnostics(statistics)["ess"]
    assert abs(statistics.mean() - exact_statistic) <= 4 * statistics.std() / np.sqrt(ess)
    per_chain = np.asarray(result.marginals, np.float64)
    standard_error = per_chain.std(axis=0, ddof=1) / np.sqrt(per_chain.shape[0])
    error = np.abs(per_chain.mean(axis=0) - exact_marginals)
    assert np.all(error[roi] <= 4 * standard_error[roi])
    assert np.all(per_chain[:, ~roi] == 0.0)
    counts = np.asarray(result.counts)
    assert np.all(counts.sum(-1) == roi.sum())


def test_statistic_path_with_swendsen_wang_matches_enumeration():
    """statistic_path(sampler="sw") with a prior unary term (the cluster labels then come from
    its cluster sums): E[S | beta] within 4 standard errors (+0.01) at every grid point, and
    chains from random and constant starts agree (R-hat < 1.05)."""
    weights = neighbour_weights((1.0, 1.0, 1.5))
    roi = _roi_of_twelve()
    prior_unary = 0.5 * np.random.default_rng(4).normal(size=SHAPE + (2,))
    betas = np.linspace(0.0, 1.5, 4)
    path = beta_estimation.statistic_path(
        jax.random.PRNGKey(1), betas, jnp.asarray(roi), weights, num_classes=2,
        prior_unary=prior_unary, num_chains=4, num_sweeps=1500, burn_in=50, sampler="sw")
    exact = [_exact_on_roi(weights, beta, prior_unary, roi)[1] for beta in betas]
    assert np.all(np.abs(path.mean - exact) <= 4 * path.standard_error + 0.01)
    assert np.all(path.r_hat < 1.05)
    with pytest.raises(ValueError, match="sampler"):
        beta_estimation.statistic_path(jax.random.PRNGKey(1), betas, jnp.asarray(roi), weights,
                                       num_classes=2, sampler="wolff")


@partial(jax.jit, static_argnames=("num_sweeps", "burn_in"))
def _gibbs_traces(key, beta, weights, roi, starts, *, num_sweeps, burn_in):
    """Checkerboard Gibbs chains (K = 2, no field) recording S and the class-1 count."""
    unary = jnp.zeros(roi.shape + (2,), jnp.float32)

    def chain(chain_key, labels):
        def sweep(labels, sweep_key):
            labels = sample_labels(sweep_key, labels, unary, beta, weights, roi)
            onehot = jax.nn.one_hot(labels, 2, dtype=jnp.float32) * roi[..., None]
            return labels, (potts_statistic(onehot, weights), jnp.sum(onehot[..., 1]))

        _, (statistics, counts) = jax.lax.scan(sweep, labels,
                                               jax.random.split(chain_key, burn_in + num_sweeps))
        return statistics[burn_in:], counts[burn_in:]

    return jax.vmap(chain)(jax.random.split(key, starts.shape[0]), starts)


def test_swendsen_wang_mixes_where_gibbs_does_not():
    """16^3, K = 2: ESS ratios near the critical coupling, mode hopping above it (module doc)."""
    shape, num_sweeps, burn_in = (16, 16, 16), 300, 50
    weights = jnp.asarray(neighbour_weights((1.0, 1.0, 1.0)))
    roi = jnp.ones(shape, bool)
    size = float(np.prod(shape))
    random = jax.random.randint(jax.random.PRNGKey(100), (2,) + shape, 0, 2)
    starts = jnp.concatenate([random, jnp.ones((2,) + shape, random.dtype)])  # 2 random, 2 ordered

    def traces(beta):
        result = sample_swendsen_wang(jax.random.PRNGKey(0), beta, weights, roi, num_classes=2,
                                      num_sweeps=num_sweeps, burn_in=burn_in, num_chains=4,
                                      initial_labels=starts, record_marginals=False)
        gibbs = _gibbs_traces(jax.random.PRNGKey(0), beta, weights, roi, starts,
                              num_sweeps=num_sweeps, burn_in=burn_in)
        swendsen_wang = (np.asarray(result.statistics), np.asarray(result.counts[..., 1]) / size)
        return swendsen_wang, (np.asarray(gibbs[0]), np.asarray(gibbs[1]) / size)

    # near the critical coupling: the magnetisation is where single-site updates slow down
    (sw_statistic, sw_fraction), (gibbs_statistic, gibbs_fraction) = traces(0.44)
    draws = 4 * num_sweeps
    assert (chain_diagnostics(sw_fraction)["ess"]
            >= 10 * chain_diagnostics(gibbs_fraction)["ess"])
    assert chain_diagnostics(sw_statistic)["ess"] >= chain_diagnostics(gibbs_statistic)["ess"]
    assert chain_diagnostics(sw_fraction)["ess"] >= 0.5 * draws

    # deep in the ordered phase: SW flips between the two ordered states, Gibbs stays put
    (sw_statistic, sw_fraction), (_, gibbs_fraction) = traces(1.0)
    assert chain_diagnostics(sw_statistic)["r_hat"] < 1.05
    assert chain_diagnostics(sw_fraction)["r_hat"] < 1.05
    ordered = sw_fraction[2:]
    standard_error = ordered.std() / np.sqrt(chain_diagnostics(ordered)["ess"])
    assert abs(ordered.mean() - 0.5) <= 4 * standard_error
    assert np.all(gibbs_fraction[2:] > 0.9)


@pytest.mark.parametrize("neighbourhood", [6, 26])
def test_clusters_are_the_equal_label_components_inside_the_roi(neighbourhood):
    """With every bond open (beta = 50: 1 - exp(-50) is 1 in float32) the clusters are the
    connected components of each label's voxels inside the ROI; voxels outside are their own
    singleton clusters, whatever their label."""
    rng = np.random.default_rng(7)
    shape = (9, 8, 7)
    weights = jnp.asarray(neighbour_weights((1.0, 1.0, 2.0), neighbourhood))
    labels = rng.integers(0, 2, size=shape)
    roi = rng.uniform(size=shape) > 0.25
    bonds = open_bonds(jnp.asarray(rng.uniform(size=(len(weights),) + shape), jnp.float32),
                       jnp.asarray(labels, jnp.int32), 50.0, weights, jnp.asarray(roi))
    ids, _ = jax.jit(connected_components)(bonds)
    ids = np.asarray(ids).ravel()
    index = np.arange(ids.size)
    assert np.array_equal(ids[~roi.ravel()], index[~roi.ravel()])
    structure = ndimage.generate_binary_structure(3, 1 if neighbourhood == 6 else 3)
    for k in range(2):
        components, count = ndimage.label((labels == k) & roi, structure)
        components = components.ravel()
        for component in range(1, count + 1):
            members = components == component
            assert np.all(ids[members] == index[members].min())


def test_voxels_outside_the_roi_never_bond_or_change():
    """An ROI of two blocks separated by a plane of outside voxels, the blocks labelled 0, the
    plane 2, every bond open: no bond touches the plane, the blocks are two clusters (relabelled
    independently, so they disagree in some sweeps), and the plane keeps its label 2
    through every sweep (here with a field; the ROI-with-holes enumeration case covers the
    uniform relabelling)."""
    shape, num_classes = (7, 4, 4), 3
    weights = jnp.asarray(neighbour_weights((1.0, 1.0, 1.0), 26))
    roi = np.ones(shape, bool)
    roi[3] = False
    labels = np.where(roi, 0, 2).astype(np.int32)
    bonds = np.asarray(open_bonds(jnp.zeros((13,) + shape), jnp.asarray(labels), 50.0, weights,
                                  jnp.asarray(roi)))
    edges, _ = grid_edges(shape, np.asarray(weights))
    inside = roi.ravel()
    assert bonds.sum() == np.sum(inside[edges[:, 0]] & inside[edges[:, 1]])  # every ROI pair
    for direction, offset in enumerate(neighbour_offsets(26)):
        for voxel in np.argwhere(bonds[direction]):  # and no other
            assert roi[tuple(voxel)] and roi[tuple(voxel + np.asarray(offset))]
    ids, _ = connected_components(jnp.asarray(bonds))
    ids = np.asarray(ids)
    assert np.all(ids[:3] == 0) and np.all(ids[4:] == np.ravel_multi_index((4, 0, 0), shape))

    field = jnp.asarray(np.random.default_rng(0).normal(size=shape + (num_classes,)), jnp.float32)
    sweep = jax.jit(swendsen_wang_sweep)
    current, disagreements = jnp.asarray(labels), 0
    for key in jax.random.split(jax.random.PRNGKey(0), 20):
        current = sweep(key, current, 50.0, weights, jnp.asarray(roi), field)
        grid = np.asarray(current)
        assert np.all(grid[3] == 2)
        disagreements += int(grid[0, 0, 0] != grid[4, 0, 0])
    assert disagreements > 0
