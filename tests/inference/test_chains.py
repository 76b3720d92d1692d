"""The shared chain driver (vbseg.inference.chains) on kernels with exact answers.

* Bookkeeping, exactly: a deterministic counting kernel shows that sweep i gets sweep key i,
  that the first ``burn_in`` sweeps are neither summed nor recorded, and that the sums are the
  sums of the kept records; chains run by ``run_chains`` keep their own keys and states.
* A kernel with a known stationary law: independent two-state Markov chains per site
  (P(0 -> 1) = a_v, P(1 -> 0) = b_v, stationary P(x_v = 1) = a_v / (a_v + b_v)); the driver's
  kept average is within 5 Monte Carlo standard errors of it at every site (the standard error
  exact for this chain: sqrt(p (1 - p) (1 + r) / ((1 - r) n)) with lag-one correlation
  r = 1 - a - b over n kept sweeps in all chains).
* The Potts prior with a random external field on a 3x3x1 grid, checkerboard Gibbs kernel run by
  ``run_chains``: marginals within 0.02 of enumeration (4 x 5000 sweeps; the label-only test of
  tests/potts/test_gibbs.py observed <= 0.007 at 4 x 10^4) and E[S] within 4 standard errors
  (sd / sqrt(ESS), ESS from ``chain_diagnostics``).
* ``chain_diagnostics``: R-hat near 1 for agreeing chains, large for disagreeing ones,
  undefined (None) for a constant trace.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vbseg.inference.chains import (
    EmptyInfo,
    LabelState,
    burn_in_then_kept_keys,
    chain_diagnostics,
    one_hot_labels,
    pooled_marginals,
    run_chain,
    run_chains,
    split_each,
)
from vbseg.potts.exact import enumerate_labelings, exact_potts_marginals, grid_edges
from vbseg.potts.gibbs import label_gibbs
from vbseg.potts.model import potts_statistic


class CounterState(NamedTuple):
    count: jax.Array


def counting_step(key, state):
    """Deterministic kernel: count sweeps; report the key it was given."""
    return CounterState(state.count + 1), key


def test_run_chain_bookkeeping_is_exact():
    burn_in, num_sweeps = 3, 5
    keys = jax.random.split(jax.random.PRNGKey(0), burn_in + num_sweeps)

    def summarise(state, info):
        return state.count, (state.count, info)

    trace = run_chain(counting_step, CounterState(jnp.int32(10)), keys, summarise, burn_in=burn_in)
    kept_counts = np.arange(10 + burn_in + 1, 10 + burn_in + num_sweeps + 1)
    assert int(trace.final_state.count) == 10 + burn_in + num_sweeps
    np.testing.assert_array_equal(trace.records[0], kept_counts)
    np.testing.assert_array_equal(trace.records[1], keys[burn_in:])  # sweep i used key i
    assert int(trace.kept_sum) == kept_counts.sum()


def test_run_chains_keeps_chains_apart_and_burn_in_only_sums_nothing():
    keys = split_each(jax.random.split(jax.random.PRNGKey(1), 3), 4)

    def summarise(state, info):
        return state.count, ()

    trace = run_chains(counting_step, CounterState(jnp.array([0, 100, 200])), keys, summarise,
                       burn_in=4)
    np.testing.assert_array_equal(trace.final_state.count, [4, 104, 204])
    np.testing.assert_array_equal(trace.kept_sum, [0, 0, 0])  # every sweep was burn-in
    manual = jnp.concatenate([jax.random.split(keys[0, 0], 2), jax.random.split(keys[0, 1], 3)])
    np.testing.assert_array_equal(burn_in_then_kept_keys(keys[0, 0], keys[0, 1], 2, 3), manual)


class FlipState(NamedTuple):
    on: jax.Array  # (n,) bool


def test_two_state_chains_reach_their_stationary_law():
    rng = np.random.default_rng(4)
    size, num_chains, burn_in, num_sweeps = 12, 4, 50, 4000
    to_on = jnp.asarray(rng.uniform(0.1, 0.6, size), jnp.float32)
    to_off = jnp.asarray(rng.uniform(0.1, 0.6, size), jnp.float32)

    def step(key, state):
        uniform = jax.random.uniform(key, (size,))
        return FlipState(jnp.where(state.on, uniform >= to_off, uniform < to_on)), EmptyInfo()

    def summarise(state, info):
        return state.on.astype(jnp.float32), ()

    starts = FlipState(jnp.zeros((num_chains, size), bool))
    keys = split_each(jax.random.split(jax.random.PRNGKey(2), num_chains), burn_in + num_sweeps)
    trace = jax.jit(lambda s, k: run_chains(step, s, k, summarise, burn_in=burn_in))(starts, keys)
    estimate = np.asarray(pooled_marginals(trace.kept_sum, num_sweeps), np.float64)
    a, b = np.asarray(to_on, np.float64), np.asarray(to_off, np.float64)
    exact = a / (a + b)
    lag_one = 1.0 - a - b
    standard_error = np.sqrt(exact * (1 - exact) * (1 + lag_one) / (1 - lag_one)
                             / (num_chains * num_sweeps))
    assert np.all(np.abs(estimate - exact) <= 5 * standard_error), np.abs(estimate - exact) / standard_error


def test_gibbs_kernel_under_the_driver_matches_potts_enumeration():
    shape, num_classes, beta = (3, 3, 1), 2, 0.6
    weights = np.array([1.0, 1.0, 0.75])
    num_chains, burn_in, num_sweeps = 4, 100, 5000
    unary = np.random.default_rng(6).normal(size=shape + (num_classes,))
    edges, edge_weights = grid_edges(shape, weights)
    exact_marginals, log_norm = exact_potts_marginals(unary.reshape(-1, num_classes), edges,
                                                      edge_weights, beta)
    labelings = enumerate_labelings(int(np.prod(shape)), num_classes)
    statistic = ((labelings[:, edges[:, 0]] == labelings[:, edges[:, 1]]) * edge_weights).sum(1)
    log_potential = (unary.reshape(-1, num_classes)[np.arange(labelings.shape[1]), labelings].sum(1)
                     + beta * statistic)
    exact_statistic = np.sum(np.exp(log_potential - log_norm) * statistic)

    roi = jnp.ones(shape, bool)
    weights_jax = jnp.asarray(weights, jnp.float32)
    sampler = label_gibbs(jnp.asarray(unary, jnp.float32), beta, weights_jax, roi)

    def summarise(state, info):
        onehot = one_hot_labels(state.labels, num_classes, roi, jnp.float32)
        return onehot, potts_statistic(onehot, weights_jax)

    keys = split_each(jax.random.split(jax.random.PRNGKey(3), num_chains), burn_in + num_sweeps)
    starts = LabelState(jnp.zeros((num_chains,) + shape, jnp.int32))
    trace = jax.jit(lambda s, k: run_chains(sampler.step, s, k, summarise, burn_in=burn_in))(
        starts, keys)
    estimate = np.asarray(pooled_marginals(trace.kept_sum, num_sweeps)).reshape(-1, num_classes)
    assert np.abs(estimate - exact_marginals).max() <= 0.02
    statistics = np.asarray(trace.records, np.float64)
    assert statistics.shape == (num_chains, num_sweeps)
    ess = chain_diagnostics(statistics)["ess"]
    assert abs(statistics.mean() - exact_statistic) <= 4 * statistics.std() / np.sqrt(ess)


def test_chain_diagnostics_detect_disagreeing_chains():
    rng = np.random.default_rng(0)
    good = rng.normal(size=(4, 500))
    assert chain_diagnostics(good)["r_hat"] == pytest.approx(1.0, abs=0.02)
    assert chain_diagnostics(good)["ess"] > 1000
    bad = good + np.arange(4)[:, None] * 3.0
    assert chain_diagnostics(bad)["r_hat"] > 1.5
    # a trace that never moves has no defined R-hat or ESS (reported as None, not as perfect)
    flat = chain_diagnostics(np.full((4, 50), 7.0))
    assert flat["constant"] and flat["r_hat"] is None and flat["ess"] is None
