"""Gaussian-process fields on grids against exact answers (float64 where exactness is claimed).

* FFT (circulant embedding) and Kronecker covariance products, square roots, solves and
  log-determinants equal the dense covariance built from the kernel formula on 5 x 6 x 4 grids,
  isotropic and anisotropic spacing, all four kernels: relative 1e-5 (observed ~1e-15 for FFT,
  ~1e-10 for Kronecker, whose per-axis jitter is 1e-10).
* A non-positive-definite embedding is detected and named, with a padding that fixes it.
* Prior draws have the kernel's covariance: 4000 draws, selected entries within 5 standard
  errors (se of an empirical covariance of zero-mean Gaussians: sqrt((K_ii K_jj + K_ij^2) / n)).
* The variational fit itself (vbseg.inference.svi) is tested against the conjugate GP regression
  in tests/inference/test_svi.py.
* The GP logit model's NumPyro log density is the exact per-voxel mixture with its priors,
  with and without a GP intensity field on the tumour class or on both classes.
* The GP intensity field, as a bias field in a 2-class mixture, recovers a smooth bias ramp and
  fixes the labels the bias spoils.
* On the 22 mm sphere phantom (4:1, CV 10 %, 24^3 crop) ``fit_gp_logit`` reaches Dice >= 0.85.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density
from scipy import stats

from vbseg.gp.kernels import (
    KERNELS,
    EmbeddingNotPositiveDefinite,
    circulant_embedding,
    dense_covariance,
    embedding_shape,
    kronecker_factors,
)
from vbseg.gp.model import FieldPrior, GPIntensityMixtureModel, GPLogitModel, GridGP
from vbseg.gp.start import mixture_em as _mixture_em
from vbseg.inference import svi
from vbseg.metrics import dice
from vbseg.phantoms import PhantomSpec, make_phantom

GRID = (5, 6, 4)
SPACINGS = {"isotropic": (3.0, 3.0, 3.0), "anisotropic": (4.0, 4.0, 3.0)}


def _relative_error(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@partial(jax.jit, static_argnames=("grid", "spacing", "kernel", "shape"))
def _fft_products(v, lengthscale, amplitude, *, grid, spacing, kernel, shape):
    """K v through the torus ``shape`` and through the minimal one, sqrt(C) sqrt(C)^T v, and the
    clipped eigenvalue mass (one compiled program per case, not op-by-op dispatch)."""
    embedding = circulant_embedding(grid, spacing, kernel, lengthscale, amplitude, shape=shape,
                                    check=False)
    minimal = circulant_embedding(grid, spacing, kernel, lengthscale, amplitude, check=False)
    return (embedding.matvec(v), embedding.sqrt_matvec(embedding.sqrt_rmatvec(v)),
            minimal.matvec(v), embedding.negative_mass)


@pytest.mark.parametrize("spacing", sorted(SPACINGS))
@pytest.mark.parametrize("kernel", KERNELS)
def test_fft_products_equal_the_dense_isotropic_covariance(kernel, spacing):
    h = SPACINGS[spacing]
    lengthscale, amplitude = 7.0, 1.3
    v = np.random.default_rng(0).normal(size=(2,) + GRID)  # a batch of two vectors
    dense = dense_covariance(GRID, h, kernel, lengthscale, amplitude)
    expected = (v.reshape(2, -1) @ dense).reshape(v.shape)
    with jax.enable_x64(True):
        # padded so the embedding is positive definite and the square root is exact too
        shape = embedding_shape(GRID, h, kernel, lengthscale)
        product, roundtrip, minimal, negative = _fft_products(
            jnp.asarray(v), lengthscale, amplitude, grid=GRID, spacing=h, kernel=kernel, shape=shape)
    assert float(negative) <= 1e-6
    assert _relative_error(product, expected) <= 1e-5
    # sqrt(C) restricted: P C^(1/2) C^(1/2) P^T v = K v
    assert _relative_error(roundtrip, expected) <= 1e-5
    # the minimal torus (2n - 1 per axis) restricts to exactly K as well (PD or not)
    assert _relative_error(minimal, expected) <= 1e-5


def test_fft_products_with_per_axis_lengthscales():
    h, lengthscale = SPACINGS["anisotropic"], np.array([5.0, 9.0, 6.0])
    v = np.random.default_rng(1).normal(size=GRID)
    dense = dense_covariance(GRID, h, "matern52", lengthscale, 0.7)
    with jax.enable_x64(True):
        product = _fft_products(jnp.asarray(v), jnp.asarray(lengthscale), 0.7, grid=GRID, spacing=h,
                                kernel="matern52", shape=embedding_shape(GRID))[0]
    assert _relative_error(product, (dense @ v.ravel()).reshape(GRID)) <= 1e-5


def test_compact_torus_is_the_kernel_up_to_its_reach_tolerance():
    """The periodic approximation on a torus below 2n - 1: every covariance entry within
    tolerance x a^2 of the kernel's (here 1e-2, the fits' setting)."""
    grid, h, lengthscale = (12, 12, 10), (4.0, 4.0, 3.0), 5.0
    shape = embedding_shape(grid, h, "matern32", lengthscale, tolerance=1e-2, exact=False)
    assert all(m < 2 * n - 1 for m, n in zip(shape, grid))
    dense = dense_covariance(grid, h, "matern32", lengthscale, 2.0)
    columns = np.random.default_rng(2).choice(dense.shape[0], 40, replace=False)
    basis = np.zeros((40,) + grid)
    basis.reshape(40, -1)[np.arange(40), columns] = 1.0
    with jax.enable_x64(True):
        approx = _fft_products(jnp.asarray(basis), lengthscale, 2.0, grid=grid, spacing=h,
                               kernel="matern32", shape=shape)[0]
    approx = np.asarray(approx).reshape(40, -1)
    assert np.max(np.abs(approx - dense[columns])) <= 1e-2 * 4.0


@partial(jax.jit, static_argnames=("grid", "kernel"))
def _kronecker_products(v, y, spacing, lengthscale, amplitude, *, grid, kernel):
    factors = kronecker_factors(grid, spacing, kernel, lengthscale, amplitude)
    return (factors.matvec(v), factors.sqrt_matvec(factors.sqrt_rmatvec(v)), factors.solve(v),
            factors.logdet(), factors.noisy_log_marginal(y, 0.4, 0.3))


@pytest.mark.parametrize("spacing", sorted(SPACINGS))
@pytest.mark.parametrize("kernel", KERNELS)
def test_kronecker_products_solves_and_logdet_equal_the_dense_separable_covariance(kernel, spacing):
    h = SPACINGS[spacing]
    v = np.random.default_rng(3).normal(size=GRID)
    y = v + 0.4
    dense = dense_covariance(GRID, h, kernel, 6.0, 1.3, separable=True)
    with jax.enable_x64(True):
        product, roundtrip, solved, logdet, evidence = _kronecker_products(
            jnp.asarray(v), jnp.asarray(y), jnp.asarray(h), 6.0, 1.3, grid=GRID, kernel=kernel)
    expected = (dense @ v.ravel()).reshape(GRID)
    assert _relative_error(product, expected) <= 1e-5
    assert _relative_error(roundtrip, expected) <= 1e-5
    assert _relative_error(solved, np.linalg.solve(dense, v.ravel()).reshape(GRID)) <= 1e-5
    sign, dense_logdet = np.linalg.slogdet(dense)
    assert sign > 0 and float(logdet) == pytest.approx(dense_logdet, rel=1e-5)
    exact = stats.multivariate_normal(np.full(v.size, 0.4), dense + 0.3 * np.eye(v.size))
    assert float(evidence) == pytest.approx(exact.logpdf(y.ravel()), rel=1e-8)


def test_squared_exponential_is_both_isotropic_and_separable():
    """The only kernel for which the two structures are the same kernel."""
    h = SPACINGS["anisotropic"]
    iso = dense_covariance(GRID, h, "se", 6.0)
    np.testing.assert_allclose(dense_covariance(GRID, h, "se", 6.0, separable=True), iso, atol=1e-12)
    assert np.max(np.abs(dense_covariance(GRID, h, "matern32", 6.0, separable=True)
                         - dense_covariance(GRID, h, "matern32", 6.0))) > 0.05


def test_non_positive_definite_embedding_is_reported():
    """SE with a long length-scale on the minimal torus: negative eigenvalues, a named error that
    says to pad more and suggests a torus; that torus passes. Under jit nothing can be raised:
    the clipped mass is reported instead."""
    h = SPACINGS["anisotropic"]
    padded = embedding_shape(GRID, h, "se", 30.0)
    with jax.enable_x64(True):
        with pytest.raises(EmbeddingNotPositiveDefinite, match=r"not positive definite.*pad more"):
            circulant_embedding(GRID, h, "se", 30.0)
        minimal_mass = _fft_products(jnp.zeros(GRID), 30.0, 1.0, grid=GRID, spacing=h, kernel="se",
                                     shape=embedding_shape(GRID))[3]
        padded_mass = _fft_products(jnp.zeros(GRID), 30.0, 1.0, grid=GRID, spacing=h, kernel="se",
                                    shape=padded)[3]
    assert float(minimal_mass) > 1e-3 and float(padded_mass) < 1e-6


@pytest.mark.parametrize("structure", ["fft", "kronecker"])
def test_prior_samples_have_the_kernel_covariance(structure):
    grid, h, num = (6, 5, 4), SPACINGS["anisotropic"], 4000
    # a torus on which this kernel's embedding is positive definite
    torus = embedding_shape(grid, h, "matern52", 6.0, tolerance=1e-3)

    @jax.jit
    def sample(key):
        if structure == "fft":
            gp = circulant_embedding(grid, h, "matern52", 6.0, 1.5, shape=torus, check=False)
        else:
            gp = kronecker_factors(grid, h, "matern52", 6.0, 1.5)
        return gp.sample(key, num, dtype=jnp.float64), getattr(gp, "negative_mass", 0.0)

    with jax.enable_x64(True):
        draws, negative = sample(jax.random.PRNGKey(4))
    assert float(negative) == 0.0
    draws = np.asarray(draws).reshape(num, -1)
    dense = dense_covariance(grid, h, "matern52", 6.0, 1.5, separable=structure == "kronecker")
    for i, j in [(0, 0), (0, 1), (0, 5), (0, 20), (37, 38), (37, 119), (60, 60)]:
        empirical = np.mean(draws[:, i] * draws[:, j])
        stderr = np.sqrt((dense[i, i] * dense[j, j] + dense[i, j] ** 2) / num)
        assert abs(empirical - dense[i, j]) <= 5 * stderr, (i, j, empirical, dense[i, j])


@pytest.mark.parametrize("intensity", [None, "tumour", "all"])
def test_logit_model_log_density_is_the_exact_mixture(intensity):
    """log_density of gp_logit_model = priors + sum over VOI voxels of
    log(sigmoid(f) N(y | mu_1 (+ g), s) + sigmoid(-f) N(y | mu_0 (+ g), s)), with f and the
    intensity field g (added to the first modality of the tumour class, or of both) built
    independently from the dense covariances' Cholesky factors."""
    grid, h = (4, 3, 3), (4.0, 4.0, 3.0)
    rng = np.random.default_rng(7)
    y = rng.normal(size=grid + (2,))
    observed = rng.uniform(size=y.shape) > 0.2
    voi = rng.uniform(size=grid) > 0.3
    model = GPLogitModel(GridGP(grid, h, "matern52", "kronecker"), FieldPrior(), intensity=intensity)
    values = {"field_mean": -1.0, "field_lengthscale": 6.0, "field_amplitude": 2.0,
              "field_eps": rng.normal(size=grid), "mu": np.array([[0.0, 0.5], [2.0, -1.0]]),
              "tau": np.array([[3.0, 1.5]])}
    if intensity is not None:
        values.update(intensity_lengthscale=20.0, intensity_amplitude=0.7,
                      intensity_eps=rng.normal(size=grid))
    args = (jnp.asarray(y), jnp.asarray(observed), jnp.asarray(voi))
    with jax.enable_x64(True):
        logp = jax.jit(lambda params: log_density(model, args, {}, params)[0])(
            {k: jnp.asarray(v) for k, v in values.items()})

    def field(lengthscale, amplitude, eps):
        # the Kronecker factor is the Cholesky factor of the Kronecker product (jitter 1e-10)
        dense = dense_covariance(grid, h, "matern52", lengthscale, amplitude, separable=True)
        return (np.linalg.cholesky(dense) @ eps.ravel()).reshape(grid)

    f = -1.0 + field(6.0, 2.0, values["field_eps"])
    means = [np.broadcast_to(values["mu"][k], y.shape).copy() for k in range(2)]
    prior = (stats.norm.logpdf(-1.0, -2.0, 3.0) + stats.lognorm.logpdf(6.0, 0.5, scale=10.0)
             + stats.lognorm.logpdf(2.0, 0.5, scale=4.0) + stats.norm.logpdf(values["field_eps"]).sum()
             + stats.norm.logpdf(values["mu"], 0.0, 10.0).sum()
             + stats.gamma.logpdf(values["tau"], 1.0, scale=100.0).sum())
    if intensity is not None:
        g = field(20.0, 0.7, values["intensity_eps"])
        for k in ((1,) if intensity == "tumour" else (0, 1)):
            means[k][..., 0] += g
        prior += (stats.lognorm.logpdf(20.0, 0.5, scale=30.0) + stats.lognorm.logpdf(0.7, 0.5, scale=0.5)
                  + stats.norm.logpdf(values["intensity_eps"]).sum())
    sd = 1.0 / np.sqrt(values["tau"][0])
    log_n = [np.sum(np.where(observed, stats.norm.logpdf(y, means[k], sd), 0.0), -1) for k in range(2)]
    mixture = np.logaddexp(np.log(1 / (1 + np.exp(-f))) + log_n[1], np.log(1 / (1 + np.exp(f))) + log_n[0])
    assert float(logp) == pytest.approx(prior + mixture[voi].sum(), rel=1e-7)


def test_intensity_field_corrects_a_smooth_bias():
    """The GP intensity field as a bias field (added to both classes' means, K = 2 mixture with
    labels summed out): a 28 mm sphere 2 units above background, noise sd 0.4, plus a linear
    bias ramp of +-1.4 across x and +-0.15 across z. The independent mixture (EM, no field)
    labels 95 % of voxels right; with the field (Kronecker Matern 5/2, length-scale prior
    median 60 mm, SVI mean field) >= 98 % (measured 99.5 %), and the fitted field follows the
    ramp (correlation >= 0.95, measured 0.997)."""
    grid, h = (16, 16, 12), (4.0, 4.0, 3.0)
    position = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1) * np.asarray(h)
    truth = np.linalg.norm(position - np.asarray(grid) * np.asarray(h) / 2, axis=-1) < 14.0
    bias = 1.4 * (position[..., 0] / 30.0 - 1.0) + 0.3 * (position[..., 2] / 36.0 - 0.5)
    y = (2.0 * truth + bias + 0.4 * np.random.default_rng(0).normal(size=grid))[..., None]
    args = (jnp.asarray(y, jnp.float32), jnp.ones(y.shape, bool), jnp.ones(grid, bool))
    start = jnp.asarray(y[..., 0] > np.quantile(y, 0.9), jnp.int32)
    mu, tau, proportion, _, plain = jax.jit(_mixture_em, static_argnums=4)(*args, start, 30)
    model = GPIntensityMixtureModel(GridGP(grid, h, "matern52", "kronecker"), field_classes=(0, 1),
                                    prior=FieldPrior(lengthscale_median_mm=60.0, lengthscale_log_sd=0.3,
                                                     amplitude_median=1.0))
    init = {"mu": mu, "tau": tau, "pi": jnp.stack([1 - proportion, proportion]),
            "intensity_lengthscale": 60.0, "intensity_amplitude": 1.0}
    sites = ("intensity_eps",)
    result = svi.fit_svi(jax.random.PRNGKey(0), args, init, None, 0.05, 1e-4, float(truth.size),
                         0.1, 200, model=model, field_sites=sites, max_steps=400)
    @jax.jit
    def fitted(params):
        location = svi.guide_location(params, args, model=model, field_sites=sites)
        return location, svi.model_sites(model, args, location, ("intensity", "class_log_lik"))

    location, out = fitted(result.params)
    log_post = np.asarray(out["class_log_lik"]) + np.log(np.asarray(location["pi"]))
    labels = log_post[..., 1] > log_post[..., 0]
    assert np.mean((np.asarray(plain) >= 0.5) == truth) < 0.97  # the bias does hurt
    assert np.mean(labels == truth) >= 0.98
    assert np.corrcoef(np.asarray(out["intensity"]).ravel(), bias.ravel())[0, 1] >= 0.95


def test_phantom_sphere_dice_through_segment(tmp_path):
    """The issue's target: Dice >= 0.85 of the 50 % contour on the 22 mm sphere (4:1, CV 10 %,
    6 mm PSF, the default 24^3 crop), through ``vbseg.segment(model="gp")`` with its default
    settings (FFT, Matern 3/2, mean field; measured 0.89 when written). Also: the documented
    outputs, and volume draws from whole label fields within 25 % of the sphere (the PSF is not
    modelled)."""
    import json

    import vbseg

    phantom = make_phantom(PhantomSpec(), seed=0)
    paths = phantom.save(tmp_path / "in")
    posterior = vbseg.segment([paths["pet"]], tmp_path / "out", modalities=["pet"], model="gp",
                              seed=0, volume_draws=200)
    assert dice(posterior.contour(0.5), phantom.truth) >= 0.85
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"] == "gp" and set(summary["timings_s"]) == {"compile", "run"}
    assert summary["elbo"][-1] > summary["elbo"][0]
    assert summary["parameters"]["tumour_class"] == 1 and summary["parameters"]["lengthscale_mm"] > 0
    assert "whole label fields" in summary["volume_ml"]["method"]
    assert {"model", "inference", "probability", "volume"} <= set(summary["gp"])
    assert posterior.volume_draws_ml.shape == (200,)
    assert abs(posterior.volume_interval()["mean"] / phantom.volume_ml - 1) <= 0.25
    with pytest.raises(vbseg.InputError, match="two-class"):
        vbseg.segment([paths["pet"]], modalities=["pet"], model="gp", num_classes=3)
