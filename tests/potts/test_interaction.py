"""The K x K class-interaction matrix J (generalised Potts prior) against exact answers.

* the pair energy of one-hot labels equals the enumeration code's sum over edges (float64,
  written pair by pair), for a random J and both neighbourhoods;
* label Gibbs with J matches exact enumeration of the marginals on a 3x3x1 grid, K = 3
  (4 chains x 10^4 sweeps; max abs error <= 0.015, as for the scalar-beta sampler);
* mean-field with J = beta I gives the scalar-beta fit (marginals within 1e-5, ELBO trace
  within 2e-5 relative: float32 sums of ~10^3 terms computed in a different order);
* at the pseudo-likelihood optimum the observed class co-occurrences equal their fitted
  expectations up to the ridge term (the stationarity condition, checked directly);
* the pseudo-likelihood's closed-form gradient equals finite differences (1e-5);
* the pseudo-likelihood estimate from collapsed configurations equals the one from every
  voxel separately (1e-6), and it recovers a known J from label fields simulated from the
  prior by Gibbs (4 fields of 24^3, K = 3, below the critical coupling, balanced classes with
  free biases and unbalanced ones with the biases fixed; entries within 0.05 after removing
  the unidentified constant, contrasts within 0.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vbseg.cohort.empirical_bayes import fit_with_population_prior
from vbseg.potts.beta import (
    LabelConfigurations,
    estimate_interaction_pl,
    interaction_contrasts,
    interaction_objective,
    label_configurations,
)
from vbseg.potts.exact import exact_potts_marginals, grid_edges, potts_log_potential
from vbseg.potts.gibbs import gibbs_label_marginals, sample_potts_prior
from vbseg.potts.meanfield import pair_energy
from vbseg.potts.model import NormalGammaPrior, neighbour_weights

J_TRUE = np.array([[0.4, 0.05, -0.2], [0.05, 0.3, 0.0], [-0.2, 0.0, 0.4]])


def _centred(matrix):
    """J up to the constant that the pseudo-likelihood cannot identify."""
    return matrix - matrix.mean()


@pytest.mark.parametrize("neighbourhood", [6, 26])
def test_pair_energy_of_one_hot_labels_is_the_sum_over_edges(neighbourhood):
    rng = np.random.default_rng(1)
    shape, num_classes = (4, 3, 3), 3
    weights = neighbour_weights((1.0, 1.2, 2.5), neighbourhood)
    interaction = rng.normal(size=(num_classes, num_classes))
    interaction = interaction + interaction.T
    labels = rng.integers(0, num_classes, size=shape)
    edges, edge_weights = grid_edges(shape, weights)
    expected = potts_log_potential(labels.reshape(1, -1), np.zeros((labels.size, num_classes)), edges,
                                   edge_weights, interaction)[0]
    onehot = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.float32)
    got = pair_energy(onehot, jnp.asarray(interaction, jnp.float32), jnp.asarray(weights, jnp.float32))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_label_gibbs_with_an_interaction_matrix_matches_enumeration():
    shape, num_classes = (3, 3, 1), 3
    weights = np.array([1.0, 1.0, 0.75])
    interaction = np.array([[0.8, -0.4, 0.3], [-0.4, 0.5, 0.0], [0.3, 0.0, 0.2]])
    unary = np.random.default_rng(5).normal(size=shape + (num_classes,))
    edges, edge_weights = grid_edges(shape, weights)
    exact, _ = exact_potts_marginals(unary.reshape(-1, num_classes), edges, edge_weights, interaction)
    run = jax.vmap(lambda key: gibbs_label_marginals(
        key, jnp.asarray(unary, jnp.float32), jnp.asarray(interaction, jnp.float32),
        jnp.asarray(weights, jnp.float32), jnp.ones(shape, bool), jnp.zeros(shape, jnp.int32),
        num_sweeps=10_000, burn_in=200))
    estimate = np.asarray(run(jax.random.split(jax.random.PRNGKey(0), 4))).mean(0)
    assert np.abs(estimate.reshape(-1, num_classes) - exact).max() <= 0.015


def test_meanfield_with_beta_times_identity_is_the_potts_fit():
    rng = np.random.default_rng(2)
    shape, num_classes = (12, 12, 8), 3
    truth = rng.integers(0, num_classes, size=shape)
    y = (truth[..., None] * 1.5 + rng.normal(size=shape + (1,))).astype(np.float32)
    observed = jnp.ones(shape + (1,), bool)
    roi = jnp.ones(shape, bool)
    weights = jnp.asarray(neighbour_weights((1.0, 1.0, 2.0), 6), jnp.float32)
    prior = NormalGammaPrior(*(jnp.asarray(np.full((num_classes, 1), v), jnp.float32)
                               for v in (0.0, 1.0, 2.0, 2.0)))
    prior = prior._replace(mean=jnp.asarray([[0.0], [1.5], [3.0]], jnp.float32))
    concentration = jnp.full((num_classes,), 2.0, jnp.float32)
    scalar = fit_with_population_prior(jnp.asarray(y), observed, roi, jnp.float32(0.4), weights,
                                       prior, concentration)
    matrix = fit_with_population_prior(jnp.asarray(y), observed, roi,
                                       jnp.asarray(0.4 * np.eye(num_classes), jnp.float32), weights,
                                       prior, concentration)
    assert int(scalar.num_iterations) == int(matrix.num_iterations)
    np.testing.assert_allclose(np.asarray(matrix.marginals), np.asarray(scalar.marginals), atol=1e-5)
    iterations = int(scalar.num_iterations)
    np.testing.assert_allclose(np.asarray(matrix.elbo_trace)[:iterations],
                               np.asarray(scalar.elbo_trace)[:iterations], rtol=2e-5)


def test_collapsed_configurations_give_the_per_voxel_estimate():
    rng = np.random.default_rng(3)
    shape, num_classes = (10, 9, 8), 3
    weights = neighbour_weights((1.0, 1.0, 2.0), 6)
    roi = np.ones(shape, bool)
    roi[:2] = False
    fields = [rng.integers(0, num_classes, size=shape) for _ in range(2)]
    collapsed = [label_configurations(f, roi, weights, num_classes) for f in fields]
    assert all(c.counts.sum() == roi.sum() for c in collapsed)
    assert all(len(c.labels) < roi.sum() for c in collapsed)
    # the same statistics, one row per voxel
    per_voxel = []
    for f in fields:
        onehot = np.eye(num_classes)[f] * roi[..., None]
        sums = np.zeros_like(onehot)
        for axis, weight in enumerate(weights):
            for step in (1, -1):
                shifted = np.zeros_like(onehot)
                source = [slice(None)] * 3
                target = [slice(None)] * 3
                source[axis] = slice(max(step, 0), onehot.shape[axis] + min(step, 0))
                target[axis] = slice(max(-step, 0), onehot.shape[axis] + min(-step, 0))
                shifted[tuple(target)] = onehot[tuple(source)]
                sums += weight * shifted
        per_voxel.append(LabelConfigurations(f[roi], sums[roi], np.ones(roi.sum(), np.int64)))
    a, ha = estimate_interaction_pl(collapsed, num_classes)
    b, hb = estimate_interaction_pl(per_voxel, num_classes)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(ha, hb, atol=1e-6)


@pytest.mark.parametrize("proportions", [None, (0.5, 0.3, 0.2)])
def test_interaction_pl_recovers_a_known_matrix(proportions):
    # balanced classes with free biases (J up to its constant), and unbalanced classes (a class
    # field log pi) with the biases fixed at the simulation's: then J is identified up to the
    # constant too; with free biases only the contrasts would be. (The rarest class here holds
    # ~2 % of the voxels; at log pi = log(0.6, 0.3, 0.1) it holds 0.7 % and its self-coupling
    # is off by 0.3: the data hardly inform it.)
    shape, num_classes, fields = (24, 24, 24), 3, 4
    roi = jnp.ones(shape, bool)
    weights = jnp.asarray(neighbour_weights((1.0, 1.0, 1.0), 6), jnp.float32)
    h = np.zeros(num_classes) if proportions is None else np.log(proportions)
    labels, _ = sample_potts_prior(jax.random.PRNGKey(0), jnp.asarray(J_TRUE, jnp.float32), roi, weights,
                                   num_classes=num_classes, num_fields=fields, num_sweeps=300,
                                   prior_unary=jnp.broadcast_to(jnp.asarray(h, jnp.float32),
                                                                shape + (num_classes,)))
    configurations = [label_configurations(f, roi, weights, num_classes) for f in np.asarray(labels)]
    estimate, biases = estimate_interaction_pl(
        configurations, num_classes, biases=None if proportions is None else np.tile(h, (fields, 1)))
    assert biases.shape == (fields, num_classes)
    np.testing.assert_allclose(estimate, estimate.T)
    assert np.abs(_centred(estimate) - _centred(J_TRUE)).max() <= 0.05
    contrasts = interaction_contrasts(estimate)
    assert np.abs(contrasts - interaction_contrasts(J_TRUE)).max() <= 0.1


@pytest.mark.parametrize("free_biases", [True, False])
def test_interaction_pl_gradient_is_exact(free_biases):
    # the closed-form gradient against finite differences of the objective (float64)
    from scipy.optimize import approx_fprime

    rng = np.random.default_rng(6)
    shape, num_classes, ridge = (8, 7, 6), 3, 1e-3
    weights = neighbour_weights((1.0, 1.0, 1.5), 6)
    fields = [label_configurations(rng.integers(0, num_classes, size=shape), np.ones(shape, bool),
                                   weights, num_classes) for _ in range(2)]
    biases = None if free_biases else rng.normal(size=(2, num_classes))
    size = 6 + (2 * num_classes if free_biases else 0)
    theta = rng.normal(scale=0.5, size=size)
    _, gradient = interaction_objective(theta, fields, num_classes, biases, ridge)
    numeric = approx_fprime(theta, lambda t: interaction_objective(t, fields, num_classes, biases, ridge)[0],
                            1e-7)
    np.testing.assert_allclose(gradient, numeric, atol=1e-5)


def test_interaction_pl_optimum_matches_moments():
    # at the penalised maximiser the gradient vanishes: for every class pair the observed
    # neighbour co-occurrence sum_v 1[z_v = k] n_v(l) equals its expectation under the fitted
    # conditionals, up to the ridge term (ridge x voxels x J), folded for the symmetric J
    rng = np.random.default_rng(4)
    shape, num_classes, ridge = (14, 12, 10), 4, 1e-3
    weights = neighbour_weights((1.0, 1.0, 1.5), 6)
    roi = np.ones(shape, bool)
    coarse = rng.integers(0, num_classes, size=(7, 6, 5))
    labels = np.where(rng.random(shape) < 0.8, coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2),
                      rng.integers(0, num_classes, size=shape))
    field = label_configurations(labels, roi, weights, num_classes)
    J, h = estimate_interaction_pl([field], num_classes, ridge=ridge)
    logits = field.neighbours @ J + h[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    observed = field.neighbours.T @ (np.eye(num_classes)[field.labels] * field.counts[:, None])
    expected = field.neighbours.T @ (probs * field.counts[:, None])
    gap = (observed - expected) + (observed - expected).T
    scale = ridge * field.counts.sum()
    np.testing.assert_allclose(gap, 2 * scale * J, atol=1e-3 * scale)
    np.testing.assert_allclose((np.eye(num_classes)[field.labels] - probs).T @ field.counts,
                               scale * h[0], atol=1e-3 * scale)


def test_equal_row_sum_gauge_keeps_the_contrasts():
    from vbseg.potts.beta import equal_row_sum_gauge

    rng = np.random.default_rng(7)
    J = rng.normal(size=(5, 5))
    J = J + J.T
    gauged = equal_row_sum_gauge(J)
    np.testing.assert_allclose(gauged, gauged.T)
    np.testing.assert_allclose(gauged.sum(axis=1), J.sum() / 5, atol=1e-12)
    np.testing.assert_allclose(interaction_contrasts(gauged), interaction_contrasts(J), atol=1e-12)
    np.testing.assert_allclose(equal_row_sum_gauge(0.7 * np.eye(5)), 0.7 * np.eye(5))
