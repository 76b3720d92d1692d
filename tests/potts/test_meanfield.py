"""Mean-field VB for the hidden Potts model against exact answers.

* exact enumeration (float64 NumPy) checked against the NumPyro model's own log density,
  enumerated in float64 JAX: two independent routes to p(z | y, theta);
* mean-field marginals: exact at beta = 0, close to exact at weak coupling;
* the ELBO: equals the exact log normaliser at beta = 0, bounds it below otherwise, never
  decreases over a fit;
* conjugate updates and KL terms against textbook closed forms / NumPyro / Monte Carlo.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions.kl import kl_divergence
from numpyro.infer.util import log_density
from scipy.special import logsumexp, softmax

from vbseg.phantoms import PhantomSpec, make_phantom
from vbseg.potts import kmeans
from vbseg.potts import meanfield as mf
from vbseg.potts.exact import enumerate_labelings, exact_potts_marginals, grid_edges
from vbseg.potts.model import NormalGammaPrior, hidden_potts_model, neighbour_weights

GRIDS = [((3, 3, 1), 3), ((2, 2, 2), 3), ((2, 2, 2), 2)]


def _random_problem(shape, num_classes, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    unary = scale * rng.normal(size=shape + (num_classes,))
    return unary


@pytest.mark.parametrize("shape,num_classes", GRIDS)
def test_exact_enumeration_matches_numpyro_log_density(shape, num_classes):
    """p(z | y, mu, tau, pi) from the model's log density (float64 JAX, all K^n labelings)
    equals exact_potts_marginals with unary = log pi + log N(y | mu, tau): to 1e-10."""
    rng = np.random.default_rng(3)
    y = rng.normal(size=shape + (1,))
    mu = np.linspace(-1.0, 1.0, num_classes)[:, None]
    tau = np.full((1, 1), 2.0)
    pi = rng.dirichlet(np.ones(num_classes))
    beta, weights = 0.6, np.array([1.0, 0.8, 0.5])
    n = int(np.prod(shape))
    labelings = enumerate_labelings(n, num_classes)
    with jax.enable_x64(True):
        args = (jnp.asarray(y), jnp.ones(y.shape, bool), jnp.ones(shape, bool))
        kwargs = dict(num_classes=num_classes, beta=beta, weights=jnp.asarray(weights), tied=True)
        params = {"mu": jnp.asarray(mu), "tau": jnp.asarray(tau), "pi": jnp.asarray(pi)}

        def joint(z):
            return log_density(hidden_potts_model, args, kwargs, dict(params, z=z.reshape(shape)))[0]

        # jit: one compilation of the whole program instead of one per primitive
        log_joint = np.asarray(jax.jit(jax.vmap(joint))(jnp.asarray(labelings)))
    probs = np.exp(log_joint - logsumexp(log_joint))
    from_model = np.stack([probs @ (labelings == k) for k in range(num_classes)], axis=1)

    unary = np.log(pi)[None, :] + (
        0.5 * np.log(tau[0, 0] / (2 * np.pi)) - 0.5 * tau[0, 0] * (y.reshape(-1, 1) - mu[:, 0]) ** 2
    )
    edges, edge_weights = grid_edges(shape, weights)
    exact, _ = exact_potts_marginals(unary, edges, edge_weights, beta)
    np.testing.assert_allclose(exact, from_model, atol=1e-10)


@pytest.mark.parametrize("shape,num_classes", GRIDS)
def test_meanfield_is_exact_without_coupling(shape, num_classes):
    unary = _random_problem(shape, num_classes, seed=4)
    edges, edge_weights = grid_edges(shape, np.ones(3))
    exact, log_norm = exact_potts_marginals(unary.reshape(-1, num_classes), edges, edge_weights, 0.0)
    np.testing.assert_allclose(exact, softmax(unary.reshape(-1, num_classes), axis=1), atol=1e-12)
    roi = jnp.ones(shape, bool)
    q = mf.meanfield_label_marginals(jnp.asarray(unary, jnp.float32), 0.0, jnp.ones(3), roi)
    np.testing.assert_allclose(np.asarray(q).reshape(-1, num_classes), exact, atol=1e-6)
    # at beta = 0 the mean-field ELBO of the label field is the exact log normaliser
    elbo = mf.label_elbo_terms(q, jnp.asarray(unary, jnp.float32), 0.0, jnp.ones(3))
    assert float(elbo) == pytest.approx(log_norm, abs=1e-4)


@pytest.mark.parametrize("shape,num_classes", GRIDS)
@pytest.mark.parametrize("beta", [0.1, 0.25])
@pytest.mark.parametrize("neighbourhood", [6, 26])
def test_meanfield_close_to_exact_at_weak_coupling(shape, num_classes, beta, neighbourhood):
    """Mean field ignores correlations, an O(beta^2) error in the marginals at weak coupling.
    Tolerance: max |q - p| <= 0.04 at beta <= 0.25 with unit-scale unaries (observed worst
    case over these grids ~0.02); the ELBO stays below the exact log normaliser. On the
    26-neighbourhood beta is scaled so a voxel's total coupling is the same."""
    unary = _random_problem(shape, num_classes, seed=5)
    weights = np.array([1.0, 1.0, 0.75])
    if neighbourhood == 26:
        scaled = neighbour_weights((1.0, 1.0, 4.0 / 3.0), 26)
        beta, weights = beta * weights.sum() / scaled.sum(), scaled
    edges, edge_weights = grid_edges(shape, weights)
    exact, log_norm = exact_potts_marginals(unary.reshape(-1, num_classes), edges, edge_weights, beta)
    roi = jnp.ones(shape, bool)
    unary_j = jnp.asarray(unary, jnp.float32)
    q = mf.meanfield_label_marginals(unary_j, beta, jnp.asarray(weights), roi)
    error = np.abs(np.asarray(q).reshape(-1, num_classes) - exact).max()
    assert error <= 0.04, error
    elbo = float(mf.label_elbo_terms(q, unary_j, beta, jnp.asarray(weights)))
    assert elbo <= log_norm + 1e-5
    assert elbo >= log_norm - 0.05 * n_edges(edges) * beta  # and not absurdly loose


def n_edges(edges):
    return len(edges)


def test_meanfield_error_grows_with_coupling():
    """A check that the comparison above can fail: at strong coupling mean field is far off."""
    shape, num_classes = (3, 3, 1), 2
    unary = 0.1 * _random_problem(shape, num_classes, seed=6)
    edges, edge_weights = grid_edges(shape, np.ones(3))
    exact, _ = exact_potts_marginals(unary.reshape(-1, 2), edges, edge_weights, 1.5)
    q = mf.meanfield_label_marginals(jnp.asarray(unary, jnp.float32), 1.5, jnp.ones(3),
                                     jnp.ones(shape, bool))
    assert np.abs(np.asarray(q).reshape(-1, 2) - exact).max() > 0.1


@pytest.mark.parametrize("tied", [True, False])
def test_normal_gamma_update_matches_conjugate_closed_form(tied):
    rng = np.random.default_rng(7)
    shape, num_classes = (6, 5, 4), 3
    y = rng.normal(size=shape + (2,))
    observed = rng.uniform(size=y.shape) > 0.1
    labels = rng.integers(0, num_classes, size=shape)
    q = np.eye(num_classes)[labels]
    prior = NormalGammaPrior(0.2, 0.5, 1.5, 0.7)
    post = mf.normal_gamma_update(
        jnp.asarray(q, jnp.float32), jnp.asarray(y, jnp.float32), jnp.asarray(observed),
        NormalGammaPrior(*(jnp.full((num_classes, 2), p, jnp.float32) for p in prior)), tied,
    )
    m0, k0, a0, b0 = prior
    for m in range(2):
        shared_a, shared_b = a0, b0
        for k in range(num_classes):
            x = y[..., m][(labels == k) & observed[..., m]]
            n, xbar = x.size, x.mean()
            kappa = k0 + n
            assert float(post.kappa[k, m]) == pytest.approx(kappa, rel=1e-5)
            assert float(post.mean[k, m]) == pytest.approx((k0 * m0 + n * xbar) / kappa, rel=1e-5)
            b_term = 0.5 * np.sum((x - xbar) ** 2) + 0.5 * k0 * n * (xbar - m0) ** 2 / kappa
            if not tied:
                assert float(post.shape[k, m]) == pytest.approx(a0 + n / 2, rel=1e-5)
                assert float(post.rate[k, m]) == pytest.approx(b0 + b_term, rel=1e-4)
            shared_a += n / 2
            shared_b += b_term
        if tied:
            np.testing.assert_allclose(post.shape[:, m], shared_a, rtol=1e-5)
            np.testing.assert_allclose(post.rate[:, m], shared_b, rtol=1e-4)


def test_kl_dirichlet_matches_numpyro():
    alpha, alpha0 = jnp.array([3.0, 40.5, 2.2]), jnp.array([1.0, 1.0, 2.0])
    expected = kl_divergence(dist.Dirichlet(alpha), dist.Dirichlet(alpha0))
    assert float(mf.kl_dirichlet(alpha, alpha0)) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_kl_normal_gamma_matches_monte_carlo(tied):
    """Closed-form KL vs a float64 Monte Carlo estimate (400k draws; tolerance 4 standard errors)."""
    post = NormalGammaPrior(*(jnp.asarray(v, jnp.float32) for v in (
        [[0.3], [1.2]], [[5.0], [9.0]], [[4.0], [4.0]] if tied else [[4.0], [7.0]],
        [[2.0], [2.0]] if tied else [[2.0], [1.0]])))
    prior = NormalGammaPrior(*(jnp.full((2, 1), v, jnp.float32) for v in (0.0, 0.5, 1.5, 1.0)))
    rng = np.random.default_rng(8)
    draws = 400_000
    a, b = np.asarray(post.shape, np.float64), np.asarray(post.rate, np.float64)
    rows = 1 if tied else 2
    tau = rng.gamma(a[:rows, 0], 1 / b[:rows, 0], size=(draws, rows))
    tau = np.broadcast_to(tau, (draws, 2)) if tied else tau
    kappa, mean = np.asarray(post.kappa)[:, 0], np.asarray(post.mean)[:, 0]
    mu = rng.normal(mean, 1 / np.sqrt(kappa * tau))
    from scipy import stats

    def log_ng(mu, tau, m, k, a, b, rows):
        return (stats.gamma.logpdf(tau[:, :rows], a[:rows], scale=1 / b[:rows]).sum(1)
                + stats.norm.logpdf(mu, m, 1 / np.sqrt(k * tau)).sum(1))

    log_q = log_ng(mu, tau, mean, kappa, a[:, 0], b[:, 0], rows)
    log_p = log_ng(mu, tau, 0.0, 0.5, np.full(2, 1.5), np.full(2, 1.0), rows)
    sample = log_q - log_p
    estimate, stderr = sample.mean(), sample.std() / np.sqrt(draws)
    exact = float(mf.kl_normal_gamma(post, prior, tied))
    assert abs(exact - estimate) <= 4 * stderr + 1e-4


@pytest.mark.parametrize("tied,neighbourhood,with_field", [
    (True, 6, False), (False, 6, False), (True, 26, True)])
def test_elbo_never_decreases(tied, neighbourhood, with_field):
    """Every CAVI step is an exact coordinate ascent step (also colour by colour on the
    26-neighbourhood, and with an external field): run in float64 so rounding cannot hide a
    decrease; allowed: 1e-10 relative."""
    phantom = make_phantom(PhantomSpec(shape=(24, 24, 24)), seed=11)
    y = phantom.pet.data.astype(np.float64)
    field = (np.random.default_rng(3).normal(size=y.shape + (3,)) if with_field else None)
    with jax.enable_x64(True):
        features = jnp.asarray(((y - np.median(y)) / y.std())[..., None])
        weights = neighbour_weights(phantom.pet.spacing, neighbourhood)
        result = mf.fit_hidden_potts_vb(
            features, jnp.ones(features.shape, bool), jnp.ones(y.shape, bool),
            0.5 if neighbourhood == 6 else 0.15,
            jnp.asarray(weights, jnp.float64), NormalGammaPrior(),
            1.0, None if field is None else jnp.asarray(field), num_classes=3, tied=tied,
            max_iter=40, tol=0.0,
        )
        trace = np.asarray(result.elbo_trace)
    assert trace.dtype == np.float64 and trace.size == 40 and np.all(np.isfinite(trace))
    assert np.all(np.diff(trace) >= -1e-10 * np.abs(trace[1:])), np.diff(trace).min()
    assert trace[-1] > trace[0]


def test_kmeans_on_a_subsample_labels_like_kmeans_on_every_voxel(monkeypatch):
    """Above KMEANS_SAMPLE voxels k-means runs on a regular subsample and then assigns every
    voxel: on a 3-class image of 72^3 voxels (stride 2) the labels are those of k-means on all
    voxels except at most 0.1 % (near the boundaries between centres), for every restart."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (72, 72, 72))
    image = (np.array([0.0, 2.0, 5.0])[labels] + rng.normal(0.0, 0.6, labels.shape))[..., None]
    args = (jnp.asarray(image, jnp.float32), jnp.ones(image.shape, bool), jnp.ones(labels.shape, bool))
    assert labels.size > mf.KMEANS_SAMPLE
    sampled = [np.asarray(mf.kmeans_labels(*args, levels)) for levels in mf.restart_levels(3)]
    monkeypatch.setattr(kmeans, "KMEANS_SAMPLE", labels.size)
    full = [np.asarray(mf.kmeans_labels(*args, levels)) for levels in mf.restart_levels(3)]
    for a, b in zip(sampled, full):
        assert np.mean(a != b) <= 1e-3


def test_kmeans_sample_spans_every_plane_and_keeps_a_small_roi_whole():
    """The k-means sample of a large ROI reaches every plane of every axis (no aliasing with
    the row length) and holds only ROI voxels, at most KMEANS_SAMPLE of them; a ROI smaller
    than that is taken whole, each voxel once."""
    shape = (96, 96, 64)  # 589 824 voxels, 2.25 per sample row
    index = np.arange(np.prod(shape), dtype=np.float32).reshape(shape + (1,))
    observed = np.ones(shape + (1,), bool)
    roi = np.ones(shape, bool)
    roi[:, :, :8] = False
    values, valid = kmeans.kmeans_sample(jnp.asarray(index), jnp.asarray(observed), jnp.asarray(roi))
    picked = np.asarray(values)[np.asarray(valid)[:, 0], 0].astype(np.int64)
    assert len(picked) == mf.KMEANS_SAMPLE == len(np.unique(picked))
    coords = np.unravel_index(picked, shape)
    assert roi[coords].all()
    for axis, size in enumerate(shape):
        expected = size - 8 if axis == 2 else size
        assert len(np.unique(coords[axis])) == expected
    small = np.zeros(shape, bool)
    small[40:50, 30:45, 20:27] = True
    values, valid = kmeans.kmeans_sample(jnp.asarray(index), jnp.asarray(observed), jnp.asarray(small))
    picked = np.asarray(values)[np.asarray(valid)[:, 0], 0].astype(np.int64)
    np.testing.assert_array_equal(np.sort(picked), np.flatnonzero(small))
