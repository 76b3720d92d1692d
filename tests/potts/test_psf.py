"""The PSF-blurred likelihood: the blur operator and its adjoints against dense matrices;
the mean-field formulas against the PSF-free ones (no blur), against exact coordinate
differences, and against a Monte Carlo average of the NumPyro model's own log likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from scipy import ndimage

from vbseg.potts import meanfield as mf
from vbseg.potts import meanfield_psf as mp
from vbseg.potts.model import NormalGammaPrior, hidden_potts_model, neighbour_weights
from vbseg.potts.psf import (
    blur_operator,
    convolve,
    gaussian_kernels,
    neighbour_correlation,
    noise_fwhm_from_correlation,
    noise_sd_gain,
    signal_fwhm,
    whiten,
)

SHAPE, SPACING = (5, 4, 3), (4.0, 4.0, 3.0)


def _dense(function, shape):
    """The matrix of a linear map on arrays of ``shape``, column j = function(unit vector j)."""
    n = int(np.prod(shape))
    columns = [np.asarray(function(jnp.asarray(np.eye(n)[j].reshape(shape)))).ravel()
               for j in range(n)]
    return np.stack(columns, axis=1)


def test_blur_operator_adjoints_match_the_dense_matrix():
    rng = np.random.default_rng(0)
    support = rng.uniform(size=SHAPE) > 0.2
    with jax.enable_x64(True):
        op = blur_operator(6.0, SPACING, support)
        forward = _dense(op.apply, SHAPE)
        np.testing.assert_allclose(_dense(op.adjoint, SHAPE), forward.T, atol=1e-12)
        np.testing.assert_allclose(_dense(op.adjoint_squared, SHAPE), (forward**2).T, atol=1e-12)
    # rows inside the support's reach sum to one (renormalised blur); unsupported columns are 0
    reach = forward.sum(axis=1) > 0
    np.testing.assert_allclose(forward.sum(axis=1)[reach], 1.0, atol=1e-12)
    assert np.all(forward[:, ~support.ravel()] == 0)


def _problem(seed, num_classes=3, num_modalities=2):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=SHAPE + (num_modalities,))
    observed = rng.uniform(size=y.shape) > 0.15
    roi = rng.uniform(size=SHAPE) > 0.1
    q = rng.dirichlet(np.ones(num_classes), size=SHAPE) * roi[..., None]
    precision = rng.uniform(0.5, 2.0, size=y.shape)
    return y, observed, roi, q, precision


def test_without_blur_the_psf_formulas_reduce_to_the_psf_free_ones():
    y, observed, roi, q, _ = _problem(1, num_modalities=1)
    prior = NormalGammaPrior(0.1, 0.5, 2.0, 0.3)
    with jax.enable_x64(True):
        o = jnp.asarray(observed[..., 0] & roi, jnp.float64)
        op = blur_operator(0.0, SPACING, roi)
        qj, yj = jnp.asarray(q), jnp.asarray(y[..., 0])
        mean, precision, shape, rate, gram = mp.regression_update(qj, yj, o, o, op, prior)
        full = NormalGammaPrior(*(jnp.full((3, 1), p, jnp.float64) for p in prior))
        ng = mf.normal_gamma_update(qj, jnp.asarray(y), jnp.asarray(observed & roi[..., None]), full, True)
        np.testing.assert_allclose(mean, ng.mean[:, 0], rtol=1e-10)
        np.testing.assert_allclose(precision, np.diag(ng.kappa[:, 0]), atol=1e-10)
        assert float(shape) == pytest.approx(float(ng.shape[0, 0]), rel=1e-12)
        assert float(rate) == pytest.approx(float(ng.rate[0, 0]), rel=1e-10)
        total, potentials = mp.expected_log_likelihood_psf(qj, yj, o, o, op, mean, precision, shape,
                                                           rate, gram)
        mask = jnp.asarray(observed & roi[..., None])
        ell = np.asarray(mf.expected_log_likelihood(jnp.asarray(y), mask, ng))
        assert float(total) == pytest.approx(float(np.sum(q * ell)), rel=1e-10)
        # potentials equal the per-voxel expected log-likelihoods up to a per-voxel constant
        difference = (np.asarray(potentials) - ell)[roi]
        np.testing.assert_allclose(difference - difference[:, :1], 0.0, atol=1e-10)
        kl = mp.kl_regression(mean, precision, shape, rate, prior)
        ng_kl = mf.kl_normal_gamma(ng, full, True)
        assert float(kl) == pytest.approx(float(ng_kl), rel=1e-10)


def test_label_potentials_are_exact_coordinate_differences():
    """E_q[log p(y|z)] is linear in each q_w; f_wk - f_w0 must equal the change of the total
    when q_w is set to class k instead of class 0 (blurred, weighted, two modalities)."""
    y, observed, roi, q, lam = _problem(2)
    prior = NormalGammaPrior(0.0, 0.3, 1.5, 0.4)
    with jax.enable_x64(True):
        ops = [blur_operator(f, SPACING, roi) for f in (6.0, 0.0)]
        qj = jnp.asarray(q)
        parts = []
        for m, op in enumerate(ops):
            o = jnp.asarray(observed[..., m] & roi, jnp.float64)
            w = o * jnp.asarray(lam[..., m])
            post = mp.regression_update(qj, jnp.asarray(y[..., m]), o, w, op, prior)
            parts.append((jnp.asarray(y[..., m]), o, w, op, post[:4]))

        def total(qx):
            value = 0.0
            for ym, o, w, op, (mean, prec, a, b) in parts:
                _, _, _, _, gram = mp.regression_update(qx, ym, o, w, op, prior)
                value += mp.expected_log_likelihood_psf(qx, ym, o, w, op, mean, prec, a, b, gram)[0]
            return float(value)

        potentials = sum(np.asarray(mp.expected_log_likelihood_psf(
            qj, ym, o, w, op, mean, prec, a, b,
            mp.regression_update(qj, ym, o, w, op, prior)[4])[1])
            for ym, o, w, op, (mean, prec, a, b) in parts)
        for voxel in [(2, 1, 1), (0, 0, 0), (4, 3, 2)]:
            if not roi[voxel]:
                continue
            values = []
            for k in range(3):
                qk = np.array(q)
                qk[voxel] = np.eye(3)[k]
                values.append(total(jnp.asarray(qk)))
            np.testing.assert_allclose(np.array(values) - values[0],
                                       potentials[voxel] - potentials[voxel][0], atol=1e-8)


def test_expected_log_likelihood_matches_the_numpyro_model_by_monte_carlo():
    y, observed, roi, q, lam = _problem(3)
    prior = NormalGammaPrior(0.0, 0.3, 1.5, 0.4)
    fwhm = (6.0, 0.0)
    rng = np.random.default_rng(4)
    draws = 4000
    with jax.enable_x64(True):
        analytic, posts = 0.0, []
        for m, f in enumerate(fwhm):
            op = blur_operator(f, SPACING, roi)
            o = jnp.asarray(observed[..., m] & roi, jnp.float64)
            w = o * jnp.asarray(lam[..., m])
            post = mp.regression_update(jnp.asarray(q), jnp.asarray(y[..., m]), o, w, op, prior)
            analytic += float(mp.expected_log_likelihood_psf(jnp.asarray(q), jnp.asarray(y[..., m]),
                                                             o, w, op, *post)[0])
            posts.append([np.asarray(p) for p in post[:4]])
        kwargs = dict(num_classes=3, beta=0.0, weights=neighbour_weights(SPACING), tied=True,
                      psf_fwhm_mm=fwhm, spacing_mm=SPACING, relative_precision=jnp.asarray(lam),
                      learn_proportions=False)
        args = (jnp.asarray(y), jnp.asarray(observed), jnp.asarray(roi))

        def log_likelihood(z, mu, tau):
            data = {"z": z, "mu": mu, "tau": tau}
            trace = handlers.trace(handlers.substitute(hidden_potts_model, data)).get_trace(*args, **kwargs)
            site = trace["y"]
            return site["fn"].log_prob(site["value"]).sum()

        # independent draws from q(z) q(mu, tau): labels by inverse CDF per voxel (class 0
        # outside the ROI), tau ~ Gamma(shape, rate), mu | tau ~ N(mean, (tau * precision)^-1)
        cdf = np.cumsum(np.where(roi[..., None], q / np.maximum(q.sum(-1, keepdims=True), 1e-300),
                                 np.eye(3)[0]), axis=-1)
        z = (rng.uniform(size=(draws,) + SHAPE)[..., None] > cdf[..., :-1]).sum(-1)
        tau = np.stack([rng.gamma(p[2], 1 / p[3], size=draws) for p in posts], axis=1)[:, None, :]
        mu = np.stack([p[0] + np.einsum("ij,nj->ni", np.linalg.cholesky(np.linalg.inv(p[1])),
                                        rng.normal(size=(draws, 3))) / np.sqrt(tau[:, :, m])
                       for m, p in enumerate(posts)], axis=2)
        values = np.asarray(jax.vmap(log_likelihood)(jnp.asarray(z), jnp.asarray(mu), jnp.asarray(tau)))
    estimate, stderr = values.mean(), values.std() / np.sqrt(draws)
    assert abs(estimate - analytic) <= 4 * stderr, (estimate, analytic, stderr)


def test_learned_beta_is_the_pseudo_likelihood_maximiser_under_the_psf_models_own_prior():
    """--beta auto with --psf-fwhm learns beta in the PSF fit (uniform proportions): at the end
    beta maximises log PL(beta | q) with the uniform unary, checked on a fine grid of beta
    (an independent reference for the Newton steps). Under the PSF-free fit's learned
    proportions (a 0.5 % tumour class: log-odds ~5 nats) the same marginals give a far lower
    beta: the coupling that made the PSF fit split the background (issue 20, item 5)."""
    from vbseg.potts.beta import pseudo_log_likelihood

    shape = (14, 14, 14)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    lesion = np.sum((grid - 7) ** 2, axis=-1) <= 1  # 7 voxels
    rng = np.random.default_rng(0)
    y = (np.where(lesion, 6.0, 0.0) + rng.normal(size=shape))[..., None]
    roi = np.ones(shape, bool)
    start = np.stack([~lesion, lesion], axis=-1).astype(np.float64) * 0.98 + 0.01
    weights = jnp.asarray(neighbour_weights((4.0, 4.0, 4.0), 6))
    result = mp.fit_hidden_potts_vb_psf(
        jnp.asarray(y, jnp.float32), jnp.ones(y.shape, bool), jnp.asarray(roi), jnp.float32(0.1),
        weights, NormalGammaPrior(), jnp.float32(1.0), jnp.asarray(start, jnp.float32),
        jnp.ones(y.shape, jnp.float32), psf_fwhm_mm=(4.0,), spacing_mm=(4.0, 4.0, 4.0),
        learn_beta=True)
    q = np.asarray(result.marginals, np.float64)
    assert q[..., 1].sum() < 30  # the lesion stayed a lesion
    iterations = int(result.num_iterations)
    assert float(result.beta_trace[iterations - 1]) == pytest.approx(float(result.beta))
    betas = np.linspace(0.0, 3.0, 3001)

    def grid_maximiser(unary):
        with jax.enable_x64(True):
            values = jax.vmap(lambda b: pseudo_log_likelihood(
                b, jnp.asarray(q), jnp.asarray(unary), weights.astype(jnp.float64),
                jnp.asarray(roi)))(jnp.asarray(betas))
        return betas[int(np.argmax(np.asarray(values)))]

    uniform = np.full((2,), -np.log(2.0))
    assert float(result.beta) == pytest.approx(grid_maximiser(uniform), abs=2e-3)
    assert float(result.beta) > 0.9
    small_tumour = np.log(np.array([0.995, 0.005]))
    assert grid_maximiser(small_tumour) < 0.5 * float(result.beta)


def test_whitening_undoes_the_noise_kernel_and_the_psf_splits_into_noise_and_signal_kernels(monkeypatch):
    """White noise blurred by the noise kernel (mirrored at the faces, as the whitening assumes)
    has the sd noise_sd_gain says (3 %) and comes back exactly (1e-4) without the gain cap, and
    with it (the highest frequencies of a 5 mm kernel on 3-4 mm voxels are capped) to within
    3 % of its sd, its neighbours
    uncorrelated; a zero FWHM changes nothing; unobserved voxels are returned as they were.
    Blurring by the noise kernel and then by signal_fwhm's is blurring by the PSF (Gaussians
    add variances; to 0.5 % of the peak: sampled kernels cut at 3 sigma)."""
    spacing, noise_fwhm = (4.0, 4.0, 3.0), 5.0
    white = np.random.default_rng(0).normal(size=(30, 28, 40))
    blurred = white.copy()
    for axis, kernel in enumerate(gaussian_kernels(noise_fwhm, spacing)):
        blurred = ndimage.convolve1d(blurred, kernel.astype(np.float64), axis=axis, mode="reflect")
    observed = np.ones(blurred.shape, bool)
    # away from the faces (mirroring repeats samples there, which raises the sd)
    assert blurred[3:-3, 3:-3, 3:-3].std() == pytest.approx(noise_sd_gain(noise_fwhm, spacing), rel=0.03)
    assert noise_sd_gain(None, spacing) == noise_sd_gain(0.0, spacing) == 1.0
    recovered = whiten(blurred, observed, spacing, noise_fwhm)
    assert np.abs(recovered - white).max() < 0.03
    for axis in range(3):
        lagged = np.moveaxis(recovered, axis, 0)
        assert abs(np.corrcoef(lagged[1:].ravel(), lagged[:-1].ravel())[0, 1]) < 0.02
    np.testing.assert_array_equal(whiten(blurred, observed, spacing, 0.0), blurred.astype(np.float32))
    monkeypatch.setattr("vbseg.potts.psf.MAX_WHITENING_GAIN", 1e9)
    assert np.abs(whiten(blurred, observed, spacing, noise_fwhm) - white).max() < 1e-4
    observed[:3] = False
    partial = whiten(blurred, observed, spacing, noise_fwhm)
    np.testing.assert_array_equal(partial[:3], blurred[:3].astype(np.float32))
    assert signal_fwhm(6.0, 4.0) == pytest.approx(np.sqrt(20.0)) and signal_fwhm(6.0, None) == 6.0
    delta = np.zeros((41, 41, 41))
    delta[20, 20, 20] = 1.0
    composed = np.asarray(convolve(convolve(delta, gaussian_kernels(4.0, (1.0, 1.0, 1.0))),
                                   gaussian_kernels(signal_fwhm(6.0, 4.0), (1.0, 1.0, 1.0))))
    direct = np.asarray(convolve(delta, gaussian_kernels(6.0, (1.0, 1.0, 1.0))))
    assert np.abs(composed - direct).max() < 5e-3 * direct.max()


def test_noise_fwhm_from_correlation_inverts_the_kernels_neighbour_correlation():
    """The FWHM found from a neighbour correlation gives that correlation back (1e-9), for
    kernels narrower and wider than a voxel; white or anti-correlated noise gives 0; on white
    noise blurred by a 5 mm kernel on 2-3 mm voxels the correlation measured along each axis
    gives back 5 mm within 0.25 mm (sampling error of 40,000 pairs)."""
    for fwhm, spacing in ((2.0, 4.0), (4.0, 4.0), (5.0, 2.0), (9.0, 3.0)):
        rho = neighbour_correlation(fwhm, spacing)
        found = noise_fwhm_from_correlation(rho, spacing)
        assert neighbour_correlation(found, spacing) == pytest.approx(rho, abs=1e-9)
    assert noise_fwhm_from_correlation(0.0, 4.0) == 0.0 and noise_fwhm_from_correlation(-0.1, 4.0) == 0.0
    with pytest.raises(ValueError, match="below 1"):
        noise_fwhm_from_correlation(1.0, 4.0)
    spacing = (2.0, 2.0, 3.0)
    noise = np.random.default_rng(1).normal(size=(36, 36, 36))
    for axis, kernel in enumerate(gaussian_kernels(5.0, spacing)):
        noise = ndimage.convolve1d(noise, kernel.astype(np.float64), axis=axis, mode="reflect")
    for axis, h in enumerate(spacing):
        moved = np.moveaxis(noise, axis, 0)
        rho = np.corrcoef(moved[1:].ravel(), moved[:-1].ravel())[0, 1]
        assert abs(noise_fwhm_from_correlation(rho, h) - 5.0) < 0.25, (axis, rho)
