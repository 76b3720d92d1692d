"""The reference sampler against exact enumeration, and as the pipeline's volume sampler.

* label-only Gibbs (fixed unary) vs exact marginals on 3x3x1 and 2x2x2 grids, two colours
  for the 6-neighbourhood and eight for the 26-neighbourhood;
* full conjugate Gibbs (labels, class means/precisions, proportions) vs the exact posterior
  with all parameters integrated out (Normal-Gamma evidence and Dirichlet-multinomial,
  enumerated over every labelling), tied and per-class precision, and with an external field
  on the 26-neighbourhood;
* Student-t emissions: Gibbs over labels and the scale-mixture weights u with fixed class
  parameters vs exact marginals of the labels with the multivariate-t densities (u integrated
  out in closed form), one modality unobserved at one voxel.
Tolerances: 0.015 (label-only, 4 x 10^4 sweeps) and 0.02 (full, 4 x 10^4 sweeps), several
Monte Carlo standard errors of the worst voxel (observed errors when written: <= 0.007).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vbseg
from vbseg.io.volume import save_nifti
from vbseg.potts.exact import exact_collapsed_marginals, exact_potts_marginals, grid_edges
from vbseg.potts.gibbs import (
    gibbs_hidden_potts,
    gibbs_label_marginals,
    gibbs_student_label_marginals,
)
from vbseg.potts.model import NormalGammaPrior, neighbour_weights

WEIGHTS = np.array([1.0, 1.0, 0.75])
WEIGHTS_26 = neighbour_weights((1.0, 1.0, 4.0 / 3.0), 26)


@pytest.mark.parametrize("shape,num_classes,weights", [
    ((3, 3, 1), 3, WEIGHTS), ((2, 2, 2), 2, WEIGHTS), ((3, 3, 1), 2, WEIGHTS_26),
    ((2, 2, 3), 2, WEIGHTS_26)])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_label_gibbs_matches_enumeration(shape, num_classes, weights, beta):
    # same total coupling per voxel for both neighbourhoods (beta x sum of a voxel's weights):
    # at beta = 1 a 26-neighbourhood voxel on 12 sites is pinned to a bimodal all-0 / all-1
    # posterior that single-site Gibbs does not cross in 10^4 sweeps
    beta = beta * np.sum(WEIGHTS) / np.sum(weights)
    unary = np.random.default_rng(5).normal(size=shape + (num_classes,))
    edges, edge_weights = grid_edges(shape, weights)
    exact, _ = exact_potts_marginals(unary.reshape(-1, num_classes), edges, edge_weights, beta)
    run = jax.vmap(lambda key: gibbs_label_marginals(
        key, jnp.asarray(unary, jnp.float32), beta, jnp.asarray(weights, jnp.float32),
        jnp.ones(shape, bool), jnp.zeros(shape, jnp.int32), num_sweeps=10_000, burn_in=200))
    estimate = np.asarray(run(jax.random.split(jax.random.PRNGKey(0), 4))).mean(0)
    assert np.abs(estimate.reshape(-1, num_classes) - exact).max() <= 0.015


@pytest.mark.parametrize("tied,weights,with_field", [
    (True, WEIGHTS, False), (False, WEIGHTS, False), (True, WEIGHTS_26, True)])
def test_full_gibbs_matches_the_collapsed_exact_posterior(tied, weights, with_field):
    rng = np.random.default_rng(1)
    shape, num_classes = (2, 2, 2), 2
    y = (np.where(rng.uniform(size=shape) > 0.5, 1.0, -1.0) + 0.8 * rng.normal(size=shape))[..., None]
    observed = np.ones(y.shape, bool)
    observed[0, 0, 0, 0] = False  # one unobserved voxel: its label follows the prior alone
    prior_mean = np.array([[-1.0], [1.0]])  # distinct prior means: no label symmetry
    prior_kappa = np.full((2, 1), 2.0)
    beta = 0.4
    field = rng.normal(size=shape + (num_classes,)) if with_field else None
    edges, edge_weights = grid_edges(shape, weights)
    exact = exact_collapsed_marginals(
        y.reshape(-1, 1), observed.reshape(-1, 1), edges, edge_weights, beta, prior_mean,
        prior_kappa, 2.0, 1.0, 1.0, num_classes, tied,
        None if field is None else field.reshape(-1, num_classes))
    prior = NormalGammaPrior(jnp.asarray(prior_mean, jnp.float32), jnp.asarray(prior_kappa, jnp.float32),
                             jnp.full((2, 1), 2.0), jnp.full((2, 1), 1.0))
    result = gibbs_hidden_potts(
        jax.random.PRNGKey(0), jnp.asarray(y, jnp.float32), jnp.asarray(observed),
        jnp.ones(shape, bool), beta, jnp.asarray(weights, jnp.float32), prior, 1.0,
        jnp.zeros(shape, jnp.int32), jnp.ones(shape, jnp.float32),
        None if field is None else jnp.asarray(field, jnp.float32), num_chains=4,
        num_sweeps=10_000, burn_in=300, tied=tied)
    estimate = np.asarray(result.marginals).reshape(-1, num_classes)
    assert np.abs(estimate - exact).max() <= 0.02
    # the recorded class counts are the marginals summed over voxels, draw by draw
    np.testing.assert_allclose(np.asarray(result.counts).mean(axis=(0, 1)),
                               estimate.sum(axis=0), rtol=1e-4)


@pytest.mark.parametrize("weights", [WEIGHTS, WEIGHTS_26])
def test_student_gibbs_matches_enumeration_with_t_densities(weights):
    """Labels and scales u by Gibbs, u summed out by sampling; exact: log p(z | y) = log pi +
    log t_nu(y_v | mu_z, diag(1/tau_z)) over the observed modalities + beta S(z), enumerated.
    Tolerance 0.015 (4 x 10^4 sweeps), as for the label-only sampler."""
    from scipy import stats

    rng = np.random.default_rng(11)
    shape, num_classes, dof, beta = (2, 2, 2), 2, 3.0, 0.4
    mean = np.array([[-1.0, 0.5], [1.0, -0.5]])
    precision = np.array([[1.5, 0.8], [0.7, 2.0]])
    log_pi = np.log([0.4, 0.6])
    y = rng.standard_t(2.0, size=shape + (2,)) + np.where(rng.uniform(size=shape) > 0.5, 1.0, -1.0)[..., None]
    observed = np.ones(y.shape, bool)
    observed[1, 0, 1, 1] = False
    unary = np.zeros((8, num_classes))
    for v, index in enumerate(np.ndindex(shape)):
        seen = observed[index]
        for k in range(num_classes):
            unary[v, k] = log_pi[k] + stats.multivariate_t(
                mean[k, seen], np.diag(1.0 / precision[k, seen]), df=dof).logpdf(y[index][seen])
    edges, edge_weights = grid_edges(shape, weights)
    exact, _ = exact_potts_marginals(unary, edges, edge_weights, beta)
    log_prior = jnp.broadcast_to(jnp.asarray(log_pi, jnp.float32), shape + (num_classes,))
    run = jax.vmap(lambda key: gibbs_student_label_marginals(
        key, jnp.asarray(y, jnp.float32), jnp.asarray(observed), jnp.ones(shape, bool), beta,
        jnp.asarray(weights, jnp.float32), jnp.asarray(mean, jnp.float32),
        jnp.asarray(precision, jnp.float32), log_prior, dof, jnp.zeros(shape, jnp.int32),
        num_sweeps=10_000, burn_in=200))
    estimate = np.asarray(run(jax.random.split(jax.random.PRNGKey(3), 4))).mean(0)
    assert np.abs(estimate.reshape(-1, num_classes) - exact).max() <= 0.015


def test_gibbs_sampler_in_the_pipeline(tmp_path):
    phantom = vbseg.make_phantom(vbseg.PhantomSpec(psf_fwhm_mm=5.0), seed=1)
    path = save_nifti(tmp_path / "pet.nii.gz", phantom.pet.data, phantom.pet.affine)
    vb = vbseg.segment([path], modalities=["pet"], seed=0)
    gibbs = vbseg.segment([path], modalities=["pet"], sampler="gibbs", seed=0, volume_draws=400)
    again = vbseg.segment([path], modalities=["pet"], sampler="gibbs", seed=0, volume_draws=400)
    np.testing.assert_array_equal(gibbs.volume_draws_ml, again.volume_draws_ml)
    assert gibbs.volume_draws_ml.size == 400
    assert "Gibbs" in gibbs.volume_interval()["method"]
    chains = gibbs.summary["diagnostics"]["volume_chains"]
    assert all(c["r_hat"] < 1.1 for c in chains), chains
    assert gibbs.summary["elbo"] is None
    # the two agree on the map and the volume (on this phantom the Gibbs volume sd is only
    # ~1.2x the independent-voxel one when written: the model's posterior is genuinely tight)
    assert np.abs(gibbs.probability - vb.probability).max() < 0.5
    assert gibbs.volume_interval()["mean"] == pytest.approx(vb.volume_interval()["mean"], rel=0.03)
    pet_tlg = gibbs.pet_measures()["tlg"]
    assert pet_tlg["lower"] <= pet_tlg["mean"] <= pet_tlg["upper"]
    # label switching is counted per chain; restarts are reported with their class sizes
    switches = gibbs.summary["diagnostics"]["label_switches"]
    assert len(switches) == 4 and all(0 <= n <= 100 for n in switches)
    fit = vb.summary["diagnostics"]
    assert len(fit["restart_class_voxels"]) == len(fit["restart_elbos"]) == 3
    assert 1 <= fit["restarts_agreeing_with_best"] <= 3 and fit["elbo_gap_to_runner_up"] >= 0


def test_student_gibbs_in_the_pipeline(tmp_path):
    """--emission student --sampler gibbs: whole-field draws of the Student-t model agree with its
    VB fit on the volume (within 5 %) and the summary names the sampler."""
    phantom = vbseg.make_phantom(vbseg.PhantomSpec(psf_fwhm_mm=5.0), seed=1)
    path = save_nifti(tmp_path / "pet.nii.gz", phantom.pet.data, phantom.pet.affine)
    vb = vbseg.segment([path], modalities=["pet"], emission="student", dof=4.0, seed=0)
    gibbs = vbseg.segment([path], modalities=["pet"], emission="student", dof=4.0, sampler="gibbs",
                          seed=0, volume_draws=200)
    assert "Student-t (4 degrees of freedom)" in gibbs.summary["diagnostics"]["sampler"]
    assert gibbs.volume_draws_ml.size == 200
    assert gibbs.volume_interval()["mean"] == pytest.approx(vb.volume_interval()["mean"], rel=0.05)
