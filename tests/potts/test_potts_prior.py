"""The Potts-prior kernel with random class proportions against enumeration.

p(z | beta) with pi ~ Dirichlet(alpha) integrated out is
exp(sum_v e_v(z_v) + beta S(z)) Gamma(K alpha) / Gamma(K alpha + n) prod_k Gamma(alpha + n_k) / Gamma(alpha)
(Dirichlet-multinomial), enumerated on a 3x3x1 grid with a random field. Both label updates
(checkerboard Gibbs and Swendsen-Wang), run by the shared chain driver for 4 chains x 5000 sweeps,
give every voxel's marginal within 0.02 of it (observed when written: <= 0.003; with the
proportions held fixed instead, 0.37).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import gammaln, logsumexp

from vbseg.inference.chains import (
    one_hot_labels,
    pooled_marginals,
    run_chains,
    split_each,
)
from vbseg.potts.exact import enumerate_labelings, grid_edges, potts_log_potential
from vbseg.potts.prior_sampler import potts_prior_kernel


@pytest.mark.parametrize("sampler", ["gibbs", "sw"])
def test_prior_kernel_with_random_proportions_matches_enumeration(sampler):
    shape, num_classes, beta, concentration = (3, 3, 1), 2, 0.5, 0.7
    weights = np.array([1.0, 1.0, 0.75])
    num_chains, burn_in, num_sweeps = 4, 100, 5000
    unary = np.random.default_rng(8).normal(scale=0.7, size=shape + (num_classes,))
    edges, edge_weights = grid_edges(shape, weights)
    labelings = enumerate_labelings(int(np.prod(shape)), num_classes)
    counts = np.stack([(labelings == k).sum(1) for k in range(num_classes)], axis=1)
    log_post = (potts_log_potential(labelings, unary.reshape(-1, num_classes), edges, edge_weights,
                                    beta)
                + gammaln(num_classes * concentration)
                - gammaln(num_classes * concentration + labelings.shape[1])
                + (gammaln(concentration + counts) - gammaln(concentration)).sum(1))
    probs = np.exp(log_post - logsumexp(log_post))
    exact = np.stack([probs @ (labelings == k) for k in range(num_classes)], axis=1)

    roi = jnp.ones(shape, bool)
    kernel = potts_prior_kernel(beta, roi, jnp.asarray(weights, jnp.float32),
                                jnp.asarray(unary, jnp.float32), jnp.float32(concentration),
                                num_classes=num_classes, sample_proportions=True, sampler=sampler)

    def summarise(state, info):
        return one_hot_labels(state.labels, num_classes, roi, jnp.float32), ()

    starts = jax.vmap(kernel.init)(jnp.zeros((num_chains,) + shape, jnp.int32))
    keys = split_each(jax.random.split(jax.random.PRNGKey(5), num_chains), burn_in + num_sweeps)
    trace = jax.jit(lambda s, k: run_chains(kernel.step, s, k, summarise, burn_in=burn_in))(
        starts, keys)
    estimate = np.asarray(pooled_marginals(trace.kept_sum, num_sweeps)).reshape(-1, num_classes)
    assert np.abs(estimate - exact).max() <= 0.02, np.abs(estimate - exact).max()
