"""The partial-volume hidden MRF against exact answers on a 2 x 2 x 2 grid.

With L = 3 fraction levels there are 3^8 = 6,561 labelings, each scored in float64 NumPy from
the dense blur matrix (:func:`vbseg.potts.exact.dense_blur`), independent of the JAX code:
the NumPyro program's log joint against a direct computation; the exact posterior over fraction
levels at fixed class parameters against the mean-field fit at those parameters (weak
coupling); the level sampler against the exact posterior with the class parameters integrated
out (Normal-Gamma regression evidence); and, with L = 2, the model against the PSF hidden
Potts model with uniform proportions (log joint up to a constant, identical VB fits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer.util import log_density
from scipy import stats

from vbseg.potts.exact import (
    dense_blur,
    enumerate_labelings,
    grid_edges,
    labeling_marginals,
    potts_log_potential,
    regression_log_evidence,
)
from vbseg.potts.gibbs_psf import gibbs_hidden_potts_psf
from vbseg.potts.meanfield_psf import RegressionPosterior, fit_hidden_potts_vb_psf
from vbseg.potts.model import NormalGammaPrior, hidden_potts_model, neighbour_weights
from vbseg.pv_potts.inference import beta_weights, level_log_partition
from vbseg.pv_potts.model import (
    fraction_levels,
    level_design,
    level_interaction,
    level_log_prior,
    pv_potts_model,
)

SHAPE = (2, 2, 2)
SPACING = (2.0, 2.0, 2.0)
FWHM = 2.5
LEVELS = 3
MIXED = 0.5  # rho: the mixed level's prior weight (the default, 0.01, would leave it rare)
WEIGHTS = neighbour_weights(SPACING)


def _problem(seed, background=0.0, tumour=2.0, tau=4.0):
    """Truth fractions, noisy blurred data and relative precisions on the tiny grid."""
    rng = np.random.default_rng(seed)
    truth = np.array([0.0, 0.5, 1.0, 1.0, 0.0, 0.0, 0.5, 1.0])
    relative = rng.uniform(0.7, 1.4, size=truth.size)
    blur = dense_blur(FWHM, SPACING, SHAPE)
    mean = blur @ (background + (tumour - background) * truth)
    y = mean + rng.normal(size=truth.size) / np.sqrt(tau * relative)
    return y, relative, blur


def _prior_potential(labelings, beta, mixed_weight=MIXED):
    edges, edge_weights = grid_edges(SHAPE, WEIGHTS)
    unary = np.broadcast_to(level_log_prior(LEVELS, mixed_weight).astype(np.float64),
                            (labelings.shape[1], LEVELS))
    return potts_log_potential(labelings, unary, edges, edge_weights,
                               level_interaction(LEVELS, beta).astype(np.float64))


def _log_likelihood(labelings, y, relative, blur, mu, tau):
    """log N(y | H'(mu_0 (1 - phi) + mu_1 phi), 1 / (tau lambda)) per labeling."""
    phi = fraction_levels(LEVELS).astype(np.float64)[labelings]
    mean = (mu[0] * (1 - phi) + mu[1] * phi) @ blur.T
    return stats.norm.logpdf(y, mean, 1.0 / np.sqrt(tau * relative)).sum(axis=1)


def _jax_inputs(y, relative):
    return (jnp.asarray(y.reshape(SHAPE + (1,)), jnp.float32), jnp.ones(SHAPE + (1,), bool),
            jnp.ones(SHAPE, bool), jnp.asarray(relative.reshape(SHAPE + (1,)), jnp.float32))


def test_log_joint_matches_a_direct_computation():
    y, relative, blur = _problem(0)
    prior = NormalGammaPrior(0.5, 0.3, 2.0, 1.5)
    rng = np.random.default_rng(1)
    observations, observed, roi, weights_obs = _jax_inputs(y, relative)
    labelings = enumerate_labelings(8, LEVELS)[rng.choice(LEVELS**8, 5, replace=False)]
    for x in labelings:
        mu, tau = rng.normal(size=2), rng.gamma(2.0)
        params = {"x": jnp.asarray(x.reshape(SHAPE)), "mu": jnp.asarray(mu.reshape(2, 1)),
                  "tau": jnp.full((1, 1), tau)}
        with jax.enable_x64(True):
            value, _ = log_density(
                handlers.substitute(pv_potts_model, params), (observations, observed, roi), dict(
                    num_levels=LEVELS, beta=0.7, weights=WEIGHTS, psf_fwhm_mm=(FWHM,),
                    spacing_mm=SPACING, prior=prior, mixed_weight=MIXED,
                    relative_precision=weights_obs), {})
        direct = (stats.gamma.logpdf(tau, prior.shape, scale=1 / prior.rate)
                  + stats.norm.logpdf(mu, prior.mean, 1 / np.sqrt(prior.kappa * tau)).sum()
                  - 8 * np.log(LEVELS) + _prior_potential(x[None], 0.7)[0]
                  + _log_likelihood(x[None], y, relative, blur, mu, tau)[0])
        np.testing.assert_allclose(float(value), direct, rtol=1e-5)


def test_mean_field_at_fixed_parameters_is_close_to_the_exact_posterior_at_weak_coupling():
    """Mean-field ignores the coupling through the prior and through the blur; at beta = 0.2
    and this blur its marginals are within 0.03 of the exact ones (measured worst 0.014)."""
    y, relative, blur = _problem(3)
    mu, tau, beta = np.array([0.0, 2.0]), 4.0, 0.2
    labelings = enumerate_labelings(8, LEVELS)
    exact, _ = labeling_marginals(
        labelings, _prior_potential(labelings, beta) + _log_likelihood(labelings, y, relative,
                                                                        blur, mu, tau), LEVELS)
    observations, observed, roi, weights_obs = _jax_inputs(y, relative)
    sharp = 1e7  # a point mass at (mu, tau): the fit updates the levels only
    held = RegressionPosterior(jnp.asarray(mu, jnp.float32)[None], sharp * jnp.eye(2)[None],
                               jnp.full((1,), sharp), jnp.full((1,), sharp / tau))
    result = fit_hidden_potts_vb_psf(
        observations, observed, roi, jnp.asarray(level_interaction(LEVELS, beta)),
        jnp.asarray(WEIGHTS), NormalGammaPrior(), jnp.float32(1.0),
        jnp.full(SHAPE + (LEVELS,), 1.0 / LEVELS), weights_obs,
        jnp.broadcast_to(jnp.asarray(level_log_prior(LEVELS, MIXED)), SHAPE + (LEVELS,)),
        psf_fwhm_mm=(FWHM,), spacing_mm=SPACING, design=jnp.asarray(level_design(LEVELS)),
        emission_start=held, learn_emission=False, max_iter=400, tol=1e-7)
    error = np.abs(np.asarray(result.marginals).reshape(-1, LEVELS) - exact).max()
    assert bool(result.converged)
    assert error <= 0.03, error


def test_level_sampler_matches_the_exact_collapsed_posterior():
    """Gibbs over fraction levels with (mu, tau) drawn from their regression posterior, against
    sum over the 6,561 labelings of prior x Normal-Gamma regression evidence. Class-specific
    prior means (0, 2) pin background and tumour. Tolerance 0.02 (4 chains x 4000 sweeps)."""
    y, relative, blur = _problem(5)
    beta = 0.6
    prior = (np.array([0.0, 2.0]), 1.0, 2.0, 1.0)
    labelings = enumerate_labelings(8, LEVELS)
    design = level_design(LEVELS).astype(np.float64)
    evidence = np.array([regression_log_evidence(y, relative, blur @ design[x], *prior)
                         for x in labelings])
    exact, _ = labeling_marginals(labelings, _prior_potential(labelings, beta) + evidence, LEVELS)
    observations, observed, roi, weights_obs = _jax_inputs(y, relative)
    result = gibbs_hidden_potts_psf(
        jax.random.PRNGKey(0), observations, observed, roi,
        jnp.asarray(level_interaction(LEVELS, beta)), jnp.asarray(WEIGHTS),
        NormalGammaPrior(jnp.asarray(prior[0], jnp.float32), *(jnp.float32(p) for p in prior[1:])),
        weights_obs, jnp.zeros(SHAPE, jnp.int32), jnp.ones(SHAPE, jnp.float32),
        jnp.broadcast_to(jnp.asarray(level_log_prior(LEVELS, MIXED)), SHAPE + (LEVELS,)),
        jnp.asarray(level_design(LEVELS)), num_classes=LEVELS, psf_fwhm_mm=(FWHM,),
        spacing_mm=SPACING, num_chains=4, num_sweeps=4000, burn_in=200)
    estimate = np.asarray(result.marginals).reshape(-1, LEVELS)
    assert np.abs(estimate - exact).max() <= 0.02, np.abs(estimate - exact).max()
    # the recorded tumour column is the fraction sum of each draw: its mean is E[sum_v phi_v]
    phi = fraction_levels(LEVELS).astype(np.float64)
    np.testing.assert_allclose(np.asarray(result.counts)[..., 1].mean(), (estimate @ phi).sum(),
                               rtol=1e-4)
    assert abs((estimate @ phi).sum() - (exact @ phi).sum()) <= 0.08


def test_two_levels_are_the_psf_potts_model_with_uniform_proportions():
    y, relative, _ = _problem(7)
    observations, observed, roi, weights_obs = _jax_inputs(y, relative)
    beta, prior = 0.8, NormalGammaPrior(0.2, 0.5, 2.0, 1.0)
    edges, edge_weights = grid_edges(SHAPE, WEIGHTS)
    rng = np.random.default_rng(2)
    differences = []
    for _ in range(4):
        z = rng.integers(0, 2, SHAPE)
        mu, tau = rng.normal(size=(2, 1)), rng.gamma(2.0, size=(1, 1))
        common = {"mu": jnp.asarray(mu), "tau": jnp.asarray(tau)}
        with jax.enable_x64(True):
            pv, _ = log_density(handlers.substitute(pv_potts_model, {**common, "x": jnp.asarray(z)}),
                                (observations, observed, roi),
                                dict(num_levels=2, beta=beta, weights=WEIGHTS, psf_fwhm_mm=(FWHM,),
                                     spacing_mm=SPACING, prior=prior,
                                     relative_precision=weights_obs), {})
            potts, _ = log_density(
                handlers.substitute(hidden_potts_model, {**common, "z": jnp.asarray(z)}),
                (observations, observed, roi),
                dict(num_classes=2, beta=beta, weights=WEIGHTS, prior=prior, psf_fwhm_mm=(FWHM,),
                     spacing_mm=SPACING, relative_precision=weights_obs, learn_proportions=False),
                {})
        differences.append(float(pv) - float(potts))
    # J(k, l) = 1[k = l] - 1: the pair term is the Potts one less beta * sum of edge weights
    # (float32 interaction constants: equal to 1e-6)
    np.testing.assert_allclose(differences, -beta * edge_weights.sum(), atol=1e-6)

    start = jnp.asarray(np.stack([1 - y.reshape(SHAPE) / 2, y.reshape(SHAPE) / 2], -1).clip(0.05, 0.95))
    args = (observations, observed, roi)
    tail = (jnp.asarray(WEIGHTS), NormalGammaPrior(), jnp.float32(1.0), start, weights_obs)
    statics = dict(psf_fwhm_mm=(FWHM,), spacing_mm=SPACING, max_iter=60)
    potts_fit = fit_hidden_potts_vb_psf(*args, jnp.float32(beta), *tail, **statics)
    pv_fit = fit_hidden_potts_vb_psf(*args, jnp.asarray(level_interaction(2, beta)), *tail,
                                     jnp.zeros(SHAPE + (2,)), design=jnp.asarray(level_design(2)),
                                     **statics)
    np.testing.assert_allclose(pv_fit.marginals, potts_fit.marginals, atol=1e-5)
    np.testing.assert_allclose(pv_fit.emission.mean, potts_fit.emission.mean, atol=1e-4)


def test_thermodynamic_integration_of_the_level_prior_matches_enumeration():
    """log Z(beta) - log Z(0) of the level prior (unary u, pair term beta J) from the simulated
    path E[T | beta] (trapezoid rule on 5 points) against the enumerated log normaliser of all
    6,561 labelings; within 0.05 nats (a change of several nats over the path)."""
    betas = np.linspace(0.0, 1.0, 5)
    labelings = enumerate_labelings(8, LEVELS)
    exact = np.array([labeling_marginals(labelings, _prior_potential(labelings, b), LEVELS)[1]
                      for b in betas])
    estimate, path = level_log_partition(betas, level_interaction(LEVELS), level_log_prior(LEVELS, MIXED),
                                         np.ones(SHAPE, bool), WEIGHTS, num_chains=8,
                                         num_sweeps=600, burn_in=50)
    assert np.all(np.diff(path) > 0)  # E[T | beta] increases (its slope is Var[T | beta])
    np.testing.assert_allclose(estimate, exact - exact[0], atol=0.05)
    assert abs(exact[-1] - exact[0]) > 1.0
    weights = beta_weights(betas, np.zeros(5), estimate, path).weights
    np.testing.assert_allclose(weights, np.exp(-estimate) / np.exp(-estimate).sum())
