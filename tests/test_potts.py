"""The hidden Potts model: its NumPyro log joint equals a direct energy computation, and the
stencil neighbour sum equals the explicit edge list."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density
from scipy import stats

from vbseg.inference.exact import grid_edges
from vbseg.models.potts import (
    NormalGammaPrior,
    hidden_potts_model,
    neighbour_sum,
    neighbour_weights,
    potts_statistic,
)


def _direct_log_joint(y, observed, roi, z, mu, tau, pi, beta, weights, prior, alpha0):
    """log p(y, z, mu, tau, pi) + log Z(beta) from the formulas, float64 SciPy, edge by edge."""
    total = stats.gamma.logpdf(tau, a=prior.shape, scale=1 / prior.rate).sum()
    tau_k = np.broadcast_to(tau, mu.shape)
    total += stats.norm.logpdf(mu, prior.mean, 1 / np.sqrt(prior.kappa * tau_k)).sum()
    total += stats.dirichlet.logpdf(pi, np.full(pi.shape, alpha0))
    flat_roi, flat_z = roi.ravel(), z.ravel()
    total += np.log(pi[flat_z[flat_roi]]).sum()
    edges, edge_weights = grid_edges(roi.shape, weights)
    a, b = edges[:, 0], edges[:, 1]
    same = (flat_z[a] == flat_z[b]) & flat_roi[a] & flat_roi[b]
    total += beta * np.sum(edge_weights * same)
    flat_y = y.reshape(-1, y.shape[-1])
    flat_obs = observed.reshape(-1, y.shape[-1]) & flat_roi[:, None]
    logpdf = stats.norm.logpdf(flat_y, mu[flat_z], 1 / np.sqrt(tau_k[flat_z]))
    return total + np.sum(np.where(flat_obs, logpdf, 0.0))


@pytest.mark.parametrize("tied", [True, False])
def test_log_joint_matches_direct_energy(tied):
    rng = np.random.default_rng(1)
    shape, num_classes, num_modalities = (4, 3, 2), 3, 2
    y = rng.normal(size=shape + (num_modalities,))
    observed = rng.uniform(size=y.shape) > 0.2
    roi = rng.uniform(size=shape) > 0.25
    z = rng.integers(0, num_classes, size=shape)
    mu = rng.normal(size=(num_classes, num_modalities))
    tau = rng.gamma(2.0, 1.0, size=(1 if tied else num_classes, num_modalities))
    pi = rng.dirichlet(np.ones(num_classes))
    beta, weights = 0.7, neighbour_weights((4.0, 4.0, 3.0))
    prior = NormalGammaPrior(0.1, 0.5, 2.0, 0.3)
    value, _ = log_density(
        hidden_potts_model,
        (jnp.asarray(y, jnp.float32), jnp.asarray(observed), jnp.asarray(roi)),
        dict(num_classes=num_classes, beta=beta, weights=weights, prior=prior,
             concentration=1.5, tied=tied),
        {"z": jnp.asarray(z), "mu": jnp.asarray(mu, jnp.float32),
         "tau": jnp.asarray(tau, jnp.float32), "pi": jnp.asarray(pi, jnp.float32)},
    )
    expected = _direct_log_joint(y, observed, roi, z, mu, tau, pi, beta, weights, prior, 1.5)
    # float32 program vs float64 reference: relative 1e-5 of a sum of ~60 terms
    assert float(value) == pytest.approx(expected, rel=1e-5, abs=1e-3)


def test_neighbour_sum_and_statistic_match_edge_list():
    rng = np.random.default_rng(2)
    shape, weights = (3, 4, 2), neighbour_weights((2.0, 1.0, 3.0))
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
