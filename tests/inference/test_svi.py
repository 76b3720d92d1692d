"""The variational fit of GP fields (vbseg.inference.svi) against exact answers, in float64.

* Conjugate GP regression (Gaussian noise, 4 x 5 x 4 grid, whitened: y ~ N(mean + L eps,
  noise^2 I), eps ~ N(0, I)): the full-rank family reaches the closed-form posterior (mean and
  covariance to 1e-6) and its ELBO the exact log marginal likelihood (to 1e-6 nats), and so does
  the low-rank family with rank D; the mean-field family reaches the exact mean and the known
  fixed-point variances 1 / Lambda_ii (to 1e-6), with an ELBO below the evidence. The ELBO is
  computed by the spherical cubature rule, exact for these quadratic log joints, and optimised
  by L-BFGS, so the optimum is deterministic.
* The KL term of each family is the closed-form Gaussian KL to N(0, I).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import stats

from vbseg.gp.kernels import circulant_embedding, kronecker_factors
from vbseg.inference import svi

SPACING = (4.0, 4.0, 3.0)


@dataclasses.dataclass(frozen=True)
class _Regression:
    """y ~ N(mean + L eps, noise^2 I), eps ~ N(0, I): conjugate GP regression, whitened."""

    noise: float

    def __call__(self, y, mean, structure):
        eps = numpyro.sample("eps", dist.Normal(0.0, 1.0).expand(structure.latent_shape).to_event(3))
        numpyro.sample("y", dist.Normal(mean + structure.sqrt_matvec(eps), self.noise).to_event(3),
                       obs=y)


def _regression_problem(structure_name, grid=None):
    noise, mean, h = 0.5, 0.3, SPACING
    if grid is None:
        grid = (4, 5, 4) if structure_name == "kronecker" else (3, 4, 3)  # FFT: D = 5 x 7 x 5
    if structure_name == "kronecker":
        structure = jax.jit(lambda: kronecker_factors(grid, h, "matern32", 8.0, 1.2))()
    else:  # minimal torus: its (clipped) square root is what the model uses, so the oracle too
        structure = jax.jit(lambda: circulant_embedding(grid, h, "matern32", 8.0, 1.2, check=False))()
    latent = int(np.prod(structure.latent_shape))
    basis = jnp.eye(latent).reshape((latent,) + structure.latent_shape)
    root = np.asarray(jax.jit(lambda s, b: s.sqrt_matvec(b))(structure, basis))
    root = root.reshape(latent, -1).T  # (N, D): f = mean + root @ eps
    rng = np.random.default_rng(5)
    y = mean + root @ rng.normal(size=latent) + noise * rng.normal(size=root.shape[0])
    precision = np.eye(latent) + root.T @ root / noise**2  # posterior precision of eps
    covariance = np.linalg.inv(precision)
    posterior_mean = covariance @ root.T @ (y - mean) / noise**2
    evidence = stats.multivariate_normal(np.full(y.size, mean), root @ root.T
                                         + noise**2 * np.eye(y.size)).logpdf(y)
    args = (jnp.asarray(y.reshape(grid)), mean, structure)
    return args, _Regression(noise), precision, covariance, posterior_mean, evidence


def _fit_regression(args, model, family, rank=8, steps=150):
    return svi.fit_svi(jax.random.PRNGKey(0), args, None, None, 0.0, -1.0, model=model,
                       field_sites=("eps",), family=family, rank=rank, optimizer="lbfgs",
                       estimator="cubature", max_steps=steps, check_every=steps, min_steps=steps)


def test_fullrank_vi_is_the_exact_conjugate_posterior():
    with jax.enable_x64(True):
        args, model, _, covariance, mean, evidence = _regression_problem("kronecker")
        result = _fit_regression(args, model, "fullrank")
        chol = np.asarray(svi.field_scales(result.params, "fullrank")["cholesky"])
        loc = np.asarray(result.params["field"]["loc"])
        trace = np.asarray(result.elbo_trace)
    np.testing.assert_allclose(loc, mean, atol=1e-6)
    np.testing.assert_allclose(chol @ chol.T, covariance, atol=1e-6)
    assert trace[-1] == pytest.approx(evidence, abs=1e-6)
    assert np.all(trace <= evidence + 1e-8)  # a lower bound at every step


def test_lowrank_vi_of_full_rank_is_the_exact_conjugate_posterior():
    """W W^T + diag(s^2) with W (D, D) can be any covariance: the optimum is exact too
    (D = 18 here; over-parameterised, so L-BFGS needs more steps)."""
    with jax.enable_x64(True):
        args, model, _, covariance, mean, evidence = _regression_problem("kronecker", (3, 3, 2))
        result = _fit_regression(args, model, "lowrank", rank=18, steps=300)
        scales = svi.field_scales(result.params, "lowrank")
        fitted = np.diag(np.asarray(scales["diagonal"]) ** 2) + np.asarray(
            scales["factor"] @ scales["factor"].T)
        loc = np.asarray(result.params["field"]["loc"])
        final = float(result.elbo_trace[-1])
    np.testing.assert_allclose(loc, mean, atol=1e-6)
    np.testing.assert_allclose(fitted, covariance, atol=1e-6)
    assert final == pytest.approx(evidence, abs=1e-6)


@pytest.mark.parametrize("structure", ["kronecker", "fft"])
def test_meanfield_vi_reaches_the_exact_mean_and_fixed_point_variances(structure):
    with jax.enable_x64(True):
        args, model, precision, _, mean, evidence = _regression_problem(structure)
        result = _fit_regression(args, model, "meanfield")
        loc = np.asarray(result.params["field"]["loc"])
        variance = np.asarray(svi.field_covariance_diagonal(result.params, "meanfield"))
        final = float(result.elbo_trace[-1])
    np.testing.assert_allclose(loc, mean, atol=1e-6)
    np.testing.assert_allclose(variance, 1.0 / np.diag(precision), atol=1e-6)
    assert final < evidence - 1.0  # mean field ignores the posterior correlations


@pytest.mark.parametrize("family", ["meanfield", "lowrank", "fullrank"])
def test_field_kl_is_the_gaussian_kl(family):
    rng = np.random.default_rng(6)
    d, rank = 7, 3
    shapes = {"loc": (d,), "scale": (d,), "factor": (d, rank), "tril": (d, d)}
    names = {"meanfield": ("loc", "scale"), "lowrank": ("loc", "scale", "factor"),
             "fullrank": ("loc", "tril")}[family]
    field = {name: rng.normal(size=shapes[name]) for name in names}

    @jax.jit
    def evaluate(field):
        params = {"field": field}
        return (svi.field_scales(params, family), svi.field_kl(params, family),
                svi.field_covariance_diagonal(params, family))

    with jax.enable_x64(True):
        scales, kl, diagonal = evaluate(field)
    scales = {name: np.asarray(value) for name, value in scales.items()}
    if family == "fullrank":
        cov = scales["cholesky"] @ scales["cholesky"].T
    else:
        cov = np.diag(scales["diagonal"] ** 2)
        if family == "lowrank":
            cov = cov + scales["factor"] @ scales["factor"].T
    loc = field["loc"]
    expected = 0.5 * (np.trace(cov) + loc @ loc - d - np.linalg.slogdet(cov)[1])
    assert float(kl) == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(diagonal, np.diag(cov), rtol=1e-12)
