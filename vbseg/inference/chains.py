"""One chain driver for every Markov-chain sampler of label fields, and its diagnostics.

The samplers follow the blackjax shape (blackjax-devs/blackjax, ``mcmc/elliptical_slice.py``):
a sampler is a :class:`SamplingAlgorithm`, a pair of pure functions

    init(...) -> State                       (the chain's start: labels, and any parameters)
    step(key, state) -> (State, Info)        (one sweep of a Markov kernel that leaves the
                                              target invariant; Info: what the sweep saw)

with the model's fixed inputs (observations, coupling, weights, ROI) closed over. The kernels
live with their samplers: checkerboard Gibbs (:mod:`vbseg.potts.gibbs`), Gibbs for the
PSF model (:mod:`vbseg.potts.gibbs_psf`), Swendsen-Wang
(:mod:`vbseg.potts.swendsen_wang`) and the Potts prior with random proportions
(:mod:`vbseg.potts.prior_sampler`). This module runs any of them: :func:`run_chain` scans
``step`` over an explicit array of sweep keys under ``jax.lax.scan`` (one compiled sweep body
for burn-in and kept sweeps alike), and after each sweep calls a summary function

    summarise(state, info) -> (accumulated, recorded)

whose first part is summed over the kept sweeps (e.g. one-hot labels: their sum divided by the
number of kept sweeps is the Monte Carlo estimate of the label marginals P(z_v = k)) and whose
second part is stacked, one entry per kept sweep (class counts, per-class weighted sums,
S(z), parameter draws). :func:`run_chains` does the same for independent chains in parallel
(``jax.vmap`` over a leading chain axis of the start states and the keys).

The sweep keys are an argument, not drawn here, so each sampler keeps its own key schedule
(:func:`burn_in_then_kept_keys` for the samplers that split burn-in and kept keys apart).

:func:`chain_diagnostics` turns a (chains, draws) trace of a scalar summary into the split
R-hat and effective sample size (Gelman et al. 2013, Bayesian Data Analysis, ch. 11; numpyro's
estimators).

Shapes: labels (X, Y, Z) int, roi (X, Y, Z) bool, one-hot labels (X, Y, Z, K); sweep keys
(B + S, 2) for B burn-in and S kept sweeps, with a leading chain axis C for :func:`run_chains`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin


class SamplingAlgorithm(NamedTuple):
    """A sampler: ``init(...) -> State`` and a pure ``step(key, state) -> (State, Info)``."""

    init: Callable
    step: Callable


class EmptyInfo(NamedTuple):
    """Info of a kernel that reports nothing about its sweep."""


class LabelState(NamedTuple):
    """labels (X, Y, Z) int: the whole state of a chain over label fields alone."""

    labels: jax.Array


class ChainTrace(NamedTuple):
    """What :func:`run_chain` returns (with a leading chain axis C from :func:`run_chains`).

    final_state: the state after the last sweep; kept_sum: the ``accumulated`` summaries summed
    over the S kept sweeps (zero when nothing was kept); records: the ``recorded`` summaries
    stacked over the kept sweeps (leading axis S)."""

    final_state: Any
    kept_sum: Any
    records: Any


def run_chain(step, initial_state, sweep_keys, summarise, *, burn_in: int) -> ChainTrace:
    """Run one chain: ``len(sweep_keys)`` sweeps of ``step``, the first ``burn_in`` discarded.

    Args:
        step: ``step(key, state) -> (state, info)``, a pure Markov kernel.
        initial_state: the chain's start (a pytree).
        sweep_keys: (B + S, 2) PRNG keys, one per sweep, burn-in first.
        summarise: ``summarise(state, info) -> (accumulated, recorded)`` (pytrees of arrays).
        burn_in: B (static).
    Returns:
        :class:`ChainTrace`. The summary is evaluated after burn-in sweeps too (one scan body
        for every sweep compiles once); their ``accumulated`` part is masked out, not added,
        so the sums are exactly those over the kept sweeps.
    """
    num_total = sweep_keys.shape[0]
    template = jax.eval_shape(lambda: summarise(*step(sweep_keys[0], initial_state))[0])
    zero = jax.tree_util.tree_map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), template)

    def sweep(carry, inputs):
        state, kept_sum = carry
        key, kept = inputs
        state, info = step(key, state)
        accumulated, recorded = summarise(state, info)
        kept_sum = jax.tree_util.tree_map(
            lambda total, value: total + jnp.where(kept, value, jnp.zeros_like(value)),
            kept_sum, accumulated)
        return (state, kept_sum), recorded

    kept = jnp.arange(num_total) >= burn_in
    (state, kept_sum), records = jax.lax.scan(sweep, (initial_state, zero), (sweep_keys, kept))
    records = jax.tree_util.tree_map(lambda leaf: leaf[burn_in:], records)
    return ChainTrace(state, kept_sum, records)


def run_chains(step, initial_states, sweep_keys, summarise, *, burn_in: int) -> ChainTrace:
    """:func:`run_chain` for C independent chains in parallel (``jax.vmap``).

    ``initial_states`` and ``sweep_keys`` (C, B + S, 2) carry a leading chain axis; so does
    every field of the returned :class:`ChainTrace`."""
    return jax.vmap(lambda state, keys: run_chain(step, state, keys, summarise, burn_in=burn_in))(
        initial_states, sweep_keys)


def burn_in_then_kept_keys(burn_key, keep_key, burn_in: int, num_sweeps: int) -> jax.Array:
    """Sweep keys (B + S, 2): ``burn_in`` split from ``burn_key``, then ``num_sweeps`` split
    from ``keep_key`` (the schedule of the conjugate Gibbs samplers)."""
    return jnp.concatenate([jax.random.split(burn_key, burn_in),
                            jax.random.split(keep_key, num_sweeps)])


def split_each(keys, num: int) -> jax.Array:
    """``jax.random.split(key, num)`` for each of C keys: (C, num, 2)."""
    return jax.vmap(lambda key: jax.random.split(key, num))(keys)


def one_hot_labels(labels, num_classes: int, roi, dtype) -> jax.Array:
    """1[z_v = k] inside the ROI, zero outside: (X, Y, Z, K)."""
    return jax.nn.one_hot(labels, num_classes, dtype=dtype) * roi[..., None]


def pooled_marginals(kept_sums, num_sweeps: int) -> jax.Array:
    """Label marginals pooled over chains: the (C, X, Y, Z, K) per-chain sums of one-hot labels
    over S kept sweeps, summed over chains and divided by C S: (X, Y, Z, K)."""
    return jnp.sum(kept_sums, axis=0) / (kept_sums.shape[0] * num_sweeps)


def chain_diagnostics(draws) -> dict:
    """Split R-hat and effective sample size (numpyro) of a (chains, draws) trace; both None
    for a trace that never changes (they are undefined, not perfect)."""
    draws = np.asarray(draws, np.float64)
    constant = bool(np.ptp(draws) == 0)
    return {
        "r_hat": None if constant else float(split_gelman_rubin(draws)),
        "ess": None if constant else float(effective_sample_size(draws)),
        "chains": int(draws.shape[0]),
        "draws_per_chain": int(draws.shape[1]),
        "constant": constant,
    }
