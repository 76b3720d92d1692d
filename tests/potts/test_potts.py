"""The hidden Potts model: its NumPyro log joint equals a direct energy computation, and the
stencil neighbour sums (6- and 26-neighbourhood) equal the explicit edge list."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density
from scipy import stats

from vbseg.potts.exact import grid_edges
from vbseg.potts.model import (
    NormalGammaPrior,
    colour_masks,
    hidden_potts_model,
    neighbour_offsets,
    neighbour_sum,
    neighbour_weights,
    potts_statistic,
)


def jitted_log_density(model, args, kwargs, params):
    """(numpyro's log_density of ``model``, None), under one ``jax.jit`` (model options static):
    the same value as calling it eagerly, without compiling every primitive on its own."""
    return jax.jit(lambda a, p: log_density(model, a, kwargs, p)[0])(args, params), None


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
    value, _ = jitted_log_density(
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


def _direct_labels_and_prior(z, roi, pi, beta, weights, alpha0):
    flat_roi, flat_z = roi.ravel(), z.ravel()
    total = stats.dirichlet.logpdf(pi, np.full(pi.shape, alpha0))
    total += np.log(pi[flat_z[flat_roi]]).sum()
    edges, edge_weights = grid_edges(roi.shape, weights)
    a, b = edges[:, 0], edges[:, 1]
    return total + beta * np.sum(edge_weights * ((flat_z[a] == flat_z[b]) & flat_roi[a] & flat_roi[b]))


def test_log_joint_student_and_lognormal():
    """Student-t scale mixture (latent u per voxel) with the first modality log-normal: the
    program's log density equals the formula written with SciPy (float64 reference)."""
    rng = np.random.default_rng(3)
    shape, num_classes = (3, 3, 2), 2
    y = np.stack([rng.lognormal(size=shape), rng.normal(size=shape)], axis=-1)
    observed = rng.uniform(size=y.shape) > 0.2
    roi = rng.uniform(size=shape) > 0.2
    z = rng.integers(0, num_classes, size=shape)
    mu = rng.normal(size=(num_classes, 2))
    tau = rng.gamma(2.0, 1.0, size=(1, 2))
    u = rng.gamma(2.0, 0.5, size=shape)
    pi = rng.dirichlet(np.ones(num_classes))
    weights, prior, dof = neighbour_weights((2.0, 2.0, 3.0)), NormalGammaPrior(0.1, 0.5, 2.0, 0.3), 3.0
    value, _ = jitted_log_density(
        hidden_potts_model,
        (jnp.asarray(y, jnp.float32), jnp.asarray(observed), jnp.asarray(roi)),
        dict(num_classes=num_classes, beta=0.6, weights=weights, prior=prior, concentration=1.2,
             emission="student", dof=dof, log_modalities=(True, False)),
        {"z": jnp.asarray(z), "mu": jnp.asarray(mu, jnp.float32), "tau": jnp.asarray(tau, jnp.float32),
         "pi": jnp.asarray(pi, jnp.float32), "u": jnp.asarray(u, jnp.float32)},
    )
    expected = stats.gamma.logpdf(tau, a=prior.shape, scale=1 / prior.rate).sum()
    expected += stats.norm.logpdf(mu, prior.mean, 1 / np.sqrt(prior.kappa * tau)).sum()
    expected += _direct_labels_and_prior(z, roi, pi, 0.6, weights, 1.2)
    expected += stats.gamma.logpdf(u[roi], a=dof / 2, scale=2 / dof).sum()
    for v in zip(*np.nonzero(roi)):
        for m in range(2):
            if observed[v + (m,)]:
                sd = 1 / np.sqrt(tau[0, m] * u[v])
                if m == 0:  # log-normal: the density of y itself
                    expected += stats.lognorm.logpdf(y[v + (m,)], s=sd, scale=np.exp(mu[z[v], m]))
                else:
                    expected += stats.norm.logpdf(y[v + (m,)], mu[z[v], m], sd)
    assert float(value) == pytest.approx(expected, rel=1e-5, abs=1e-3)


@pytest.mark.parametrize("tied", [True, False])
def test_log_joint_full_covariance(tied):
    rng = np.random.default_rng(4)
    shape, num_classes = (3, 2, 2), 2
    y = rng.normal(size=shape + (2,))
    roi = rng.uniform(size=shape) > 0.2
    z = rng.integers(0, num_classes, size=shape)
    precision = stats.wishart(df=4, scale=np.eye(2)).rvs(size=1 if tied else num_classes,
                                                          random_state=rng).reshape(-1, 2, 2)
    mu = rng.normal(size=(num_classes, 2))
    pi = rng.dirichlet(np.ones(num_classes))
    weights, prior = neighbour_weights((1.0, 1.0, 1.0)), NormalGammaPrior(0.1, 0.5, 2.0, 0.3)
    value, _ = jitted_log_density(
        hidden_potts_model,
        (jnp.asarray(y, jnp.float32), jnp.ones(y.shape, bool), jnp.asarray(roi)),
        dict(num_classes=num_classes, beta=0.4, weights=weights, prior=prior, emission="full",
             tied=tied),
        {"z": jnp.asarray(z), "mu": jnp.asarray(mu, jnp.float32),
         "Lambda": jnp.asarray(precision, jnp.float32), "pi": jnp.asarray(pi, jnp.float32)},
    )
    # Wishart(I / (2 b0), 2 a0 + D - 1) on each precision matrix; then the Normal means
    wishart = stats.wishart(df=2 * prior.shape + 1, scale=np.eye(2) / (2 * prior.rate))
    expected = sum(wishart.logpdf(p) for p in precision)
    full = np.broadcast_to(precision, (num_classes, 2, 2))
    expected += sum(stats.multivariate_normal(np.full(2, prior.mean),
                                              np.linalg.inv(prior.kappa * full[k])).logpdf(mu[k])
                    for k in range(num_classes))
    expected += _direct_labels_and_prior(z, roi, pi, 0.4, weights, 1.0)
    for v in zip(*np.nonzero(roi)):
        expected += stats.multivariate_normal(mu[z[v]], np.linalg.inv(full[z[v]])).logpdf(y[v])
    assert float(value) == pytest.approx(expected, rel=1e-5, abs=1e-3)
