"""Markov kernels for the Potts prior with optional random class proportions.

The target is the prior of :mod:`vbseg.potts.model` on the voxels of a ROI,

    p(z, pi | beta) ∝ Dirichlet(pi | concentration) exp( sum_v (e_v(z_v) + log pi_{z_v}) + beta S(z) ),

with e the fixed ``prior_unary`` (external field) and pi either fixed at uniform or drawn. One
step of :func:`potts_prior_kernel` updates z | pi by a checkerboard Gibbs sweep
(:func:`~vbseg.potts.gibbs.sample_labels`; Geman & Geman 1984) or a Swendsen-Wang sweep
(:func:`~vbseg.potts.swendsen_wang.swendsen_wang_sweep`; Swendsen & Wang 1987), both exact
for the unary term, then pi | z ~ Dirichlet(concentration + class counts). The kernel has the
blackjax shape (``init``, pure ``step``) and is run by :mod:`vbseg.inference.chains`; the
thermodynamic-integration path E[S | beta] of :func:`~vbseg.potts.beta.statistic_path` is
simulated with it.

Shapes: labels (X, Y, Z) int; roi (X, Y, Z) bool; prior_unary (X, Y, Z, K); weights (3,) or (13,).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vbseg.inference.chains import EmptyInfo, SamplingAlgorithm, one_hot_labels
from vbseg.potts.gibbs import sample_labels
from vbseg.potts.swendsen_wang import swendsen_wang_sweep


class PriorState(NamedTuple):
    """labels (X, Y, Z) int; log_proportions (K,) log pi (uniform unless drawn)."""

    labels: jax.Array
    log_proportions: jax.Array


def potts_prior_kernel(beta, roi, weights, prior_unary, concentration, *, num_classes,
                       sample_proportions, sampler) -> SamplingAlgorithm:
    """Kernel for the Potts prior with unary ``prior_unary + log pi`` (blackjax shape, run by
    :mod:`vbseg.inference.chains`): ``init(labels)`` starts from uniform proportions;
    ``step(key, state)`` is one label sweep (checkerboard Gibbs or Swendsen-Wang), then, with
    ``sample_proportions``, pi | z ~ Dirichlet(concentration + class counts)."""
    dtype = prior_unary.dtype

    def init(labels):
        return PriorState(labels, jnp.full((num_classes,), -jnp.log(num_classes), dtype))

    def step(key, state):
        label_key, pi_key = jax.random.split(key)
        unary = prior_unary + state.log_proportions
        if sampler == "sw":
            labels = swendsen_wang_sweep(label_key, state.labels, beta, weights, roi, unary)
        else:
            labels = sample_labels(label_key, state.labels, unary, beta, weights, roi)
        log_pi = state.log_proportions
        if sample_proportions:
            counts = jnp.sum(one_hot_labels(labels, num_classes, roi, dtype), axis=(0, 1, 2))
            log_pi = jnp.log(jax.random.dirichlet(pi_key, concentration + counts))
        return PriorState(labels, log_pi), EmptyInfo()

    return SamplingAlgorithm(init, step)
