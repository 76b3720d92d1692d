"""The hidden Potts model: its NumPyro log joint equals a direct energy computation, and the
stencil neighbour sums (6- and 26-neighbourhood) equal the explicit edge list."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density
from scipy import stats

from vbseg.inference.exact import grid_edges
from vbseg.models.potts import (
    NormalGammaPrior,
    colour_masks,
    hidden_potts_model,
    neighbour_offsets,
    neighbour_sum,
    neighbour_weights,
    potts_statistic,
)


def _direct_log_joint(y, observed, roi, z, mu, tau, pi, beta, weights, prior, alpha0, field):
    """log p(y, z, mu, tau, pi) + log Z(beta) from the formulas, float64 SciPy, edge by edge."""
    total = stats.gamma.logpdf(tau, a=prior.shape, scale=1 / prior.rate).sum()
    tau_k = np.broadcast_to(tau, mu.shape)
    total += stats.norm.logpdf(mu, prior.mean, 1 / np.sqrt(prior.kappa * tau_k)).sum()
    total += stats.dirichlet.logpdf(pi, np.full(pi.shape, alpha0))
    flat_roi, flat_z = roi.ravel(), z.ravel()
    total += np.log(pi[flat_z[flat_roi]]).sum()
    flat_field = field.reshape(-1, field.shape[-1])
    total += sum(flat_field[v, flat_z[v]] for v in np.flatnonzero(flat_roi))
    edges, edge_weights = grid_edges(roi.shape, weights)
    a, b = edges[:, 0], edges[:, 1]
    same = (flat_z[a] == flat_z[b]) & flat_roi[a] & flat_roi[b]
    total += beta * np.sum(edge_weights * same)
    flat_y = y.reshape(-1, y.shape[-1])
    flat_obs = observed.reshape(-1, y.shape[-1]) & flat_roi[:, None]
    logpdf = stats.norm.logpdf(flat_y, mu[flat_z], 1 / np.sqrt(tau_k[flat_z]))
    return total + np.sum(np.where(flat_obs, logpdf, 0.0))


@pytest.mark.parametrize("tied,neighbourhood", [(True, 6), (False, 6), (True, 26)])
def test_log_joint_matches_direct_energy(tied, neighbourhood):
    """Includes an external field (random per-voxel log-potentials)."""
    rng = np.random.default_rng(1)
    shape, num_classes, num_modalities = (4, 3, 2), 3, 2
    y = rng.normal(size=shape + (num_modalities,))
    observed = rng.uniform(size=y.shape) > 0.2
    roi = rng.uniform(size=shape) > 0.25
    z = rng.integers(0, num_classes, size=shape)
    mu = rng.normal(size=(num_classes, num_modalities))
    tau = rng.gamma(2.0, 1.0, size=(1 if tied else num_classes, num_modalities))
    pi = rng.dirichlet(np.ones(num_classes))
    beta, weights = 0.7, neighbour_weights((4.0, 4.0, 3.0), neighbourhood)
    prior = NormalGammaPrior(0.1, 0.5, 2.0, 0.3)
    field = rng.normal(size=shape + (num_classes,))
    value, _ = log_density(
        hidden_potts_model,
        (jnp.asarray(y, jnp.float32), jnp.asarray(observed), jnp.asarray(roi)),
        dict(num_classes=num_classes, beta=beta, weights=weights, prior=prior,
             concentration=1.5, tied=tied, external_field=jnp.asarray(field, jnp.float32)),
        {"z": jnp.asarray(z), "mu": jnp.asarray(mu, jnp.float32),
         "tau": jnp.asarray(tau, jnp.float32), "pi": jnp.asarray(pi, jnp.float32)},
    )
    expected = _direct_log_joint(y, observed, roi, z, mu, tau, pi, beta, weights, prior, 1.5, field)
    # float32 program vs float64 reference: relative 1e-5 of a sum of ~60 terms
    assert float(value) == pytest.approx(expected, rel=1e-5, abs=1e-3)


@pytest.mark.parametrize("neighbourhood", [6, 26])
def test_neighbour_sum_and_statistic_match_edge_list(neighbourhood):
    rng = np.random.default_rng(2)
    shape, weights = (3, 4, 3), neighbour_weights((2.0, 1.0, 3.0), neighbourhood)
    labels = rng.uniform(size=shape + (3,))
    edges, edge_weights = grid_edges(shape, weights)
    flat = labels.reshape(-1, 3)
    expected_sum = np.zeros_like(flat)
    for (a, b), w in zip(edges, edge_weights):
        expected_sum[a] += w * flat[b]
        expected_sum[b] += w * flat[a]
    got = np.asarray(neighbour_sum(jnp.asarray(labels, jnp.float32), weights)).reshape(-1, 3)
    np.testing.assert_allclose(got, expected_sum, rtol=1e-5)
    expected_stat = sum(w * flat[a] @ flat[b] for (a, b), w in zip(edges, edge_weights))
    got_stat = float(potts_statistic(jnp.asarray(labels, jnp.float32), weights))
    assert got_stat == pytest.approx(expected_stat, rel=1e-5)


def test_neighbour_weights_are_inverse_distance():
    np.testing.assert_allclose(neighbour_weights((4.0, 4.0, 2.0)), [0.5, 0.5, 1.0])
    offsets = neighbour_offsets(26)
    assert len(offsets) == 13 and len(set(offsets)) == 13
    # every neighbour direction appears exactly once up to sign
    assert {d for d in offsets} | {tuple(-i for i in d) for d in offsets} == {
        d for d in np.ndindex(3, 3, 3) for d in [tuple(i - 1 for i in d)] if any(d)}
    weights = dict(zip(offsets, neighbour_weights((4.0, 4.0, 2.0), 26)))
    assert weights[(0, 0, 1)] == pytest.approx(1.0)
    assert weights[(1, 0, 0)] == pytest.approx(0.5)
    assert weights[(1, -1, 0)] == pytest.approx(2.0 / np.sqrt(32.0))
    assert weights[(1, 1, 1)] == pytest.approx(2.0 / np.sqrt(36.0))
    with pytest.raises(ValueError, match="6 or 26"):
        neighbour_offsets(18)


@pytest.mark.parametrize("neighbourhood,num_colours", [(6, 2), (26, 8)])
def test_colour_masks_are_a_proper_colouring(neighbourhood, num_colours):
    """Every voxel has exactly one colour, and no neighbour pair shares one (so a colour's
    voxels are conditionally independent and can be updated at once)."""
    shape = (4, 5, 3)
    weights = neighbour_weights((1.0, 1.0, 1.0), neighbourhood)
    colours = np.stack([np.asarray(c) for c in colour_masks(shape, weights)])
    assert colours.shape[0] == num_colours
    np.testing.assert_array_equal(colours.sum(axis=0), 1)
    colour_of = np.argmax(colours, axis=0).ravel()
    edges, _ = grid_edges(shape, weights)
    assert np.all(colour_of[edges[:, 0]] != colour_of[edges[:, 1]])
