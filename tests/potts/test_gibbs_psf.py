"""The PSF-model Gibbs sampler against the exact posterior on a tiny grid.

The exact posterior of the labels with class means and noise precision integrated out is
p(z | y) ∝ exp(beta S(z)) p(y | z), where p(y | z) is the Normal-Gamma regression evidence of
y = H' mu_z + noise, computed here in float64 NumPy from the dense blur matrix for each of the
2^9 labelings. The sampler renames classes by increasing mean, so its marginal of "class 0"
is, exactly, sum_z p(z | y) [P(mu_0 < mu_1 | z, y) 1[z_v = 0] + P(mu_0 > mu_1 | z, y) 1[z_v = 1]],
with mu_1 - mu_0 | z, y a Student-t. Tolerance 0.02 (4 chains x 5000 sweeps; several Monte
Carlo standard errors of the worst voxel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import gammaln, logsumexp

from vbseg.potts.exact import enumerate_labelings, grid_edges
from vbseg.potts.gibbs_psf import colour_strides, gibbs_hidden_potts_psf
from vbseg.potts.model import NormalGammaPrior
from vbseg.potts.psf import blur_operator

SHAPE = (3, 3, 1)
SPACING = (1.0, 1.0, 10.0)
FWHM = 1.2
WEIGHTS = np.array([1.0, 1.0, 0.1])


def _dense_blur():
    operator = blur_operator(FWHM, SPACING, jnp.ones(SHAPE, bool))
    n = int(np.prod(SHAPE))
    columns = [np.asarray(operator.apply(jnp.asarray(np.eye(n)[i].reshape(SHAPE), jnp.float32)),
                          np.float64).ravel() for i in range(n)]
    return np.stack(columns, axis=1)  # H'[u, v]


def _exact_ordered_marginals(y, relative, beta, prior):
    blur = _dense_blur()
    n = y.size
    labelings = enumerate_labelings(n, 2)
    edges, edge_weights = grid_edges(SHAPE, WEIGHTS)
    m0, k0, a0, b0 = (float(p) for p in prior)
    log_post, p_ordered = [], []
    for z in labelings:
        design = blur @ np.eye(2)[z]  # (n, K): blurred class indicators
        gram = design.T @ (relative[:, None] * design)
        precision = k0 * np.eye(2) + gram
        moment = design.T @ (relative * y)
        mean = np.linalg.solve(precision, k0 * m0 + moment)
        shape = a0 + n / 2
        rate = b0 + 0.5 * (np.sum(relative * y * y) + k0 * 2 * m0**2 - mean @ precision @ mean)
        evidence = (0.5 * 2 * np.log(k0) - 0.5 * np.linalg.slogdet(precision)[1]
                    + a0 * np.log(b0) - shape * np.log(rate) + gammaln(shape) - gammaln(a0)
                    - 0.5 * n * np.log(2 * np.pi) + 0.5 * np.sum(np.log(relative)))
        agree = z[edges[:, 0]] == z[edges[:, 1]]
        log_post.append(beta * np.sum(edge_weights * agree) + evidence)
        contrast = np.array([-1.0, 1.0])
        scale = np.sqrt(rate / shape * contrast @ np.linalg.solve(precision, contrast))
        p_ordered.append(stats.t.cdf((contrast @ mean) / scale, 2 * shape))
    probs = np.exp(np.array(log_post) - logsumexp(log_post))
    p_ordered = np.array(p_ordered)
    class0 = probs @ (p_ordered[:, None] * (labelings == 0) + (1 - p_ordered)[:, None] * (labelings == 1))
    return np.stack([class0, 1 - class0], axis=1)


def test_colour_strides_cover_the_psf_support():
    # 6 mm PSF on 4 x 4 x 3 mm voxels: kernel radii 2, 2, 3 -> strides 5, 5, 7
    assert colour_strides((6.0,), (4.0, 4.0, 3.0)) == (5, 5, 7)
    # no blur: the Potts checkerboard needs stride 3 at most (radius 1)
    assert colour_strides((0.0,), (4.0, 4.0, 3.0)) == (3, 3, 3)


def test_psf_gibbs_matches_the_exact_collapsed_posterior():
    rng = np.random.default_rng(2)
    truth = np.array([[0, 0, 1], [0, 1, 1], [0, 0, 1]]).reshape(SHAPE)
    blur = _dense_blur()
    relative = rng.uniform(0.6, 1.6, size=truth.size)
    y = blur @ (2.0 * truth.ravel()) + rng.normal(size=truth.size) / np.sqrt(2.0 * relative)
    prior = NormalGammaPrior(0.5, 0.5, 2.0, 1.0)
    beta = 0.5
    exact = _exact_ordered_marginals(y, relative, beta, prior)
    result = gibbs_hidden_potts_psf(
        jax.random.PRNGKey(0), jnp.asarray(y.reshape(SHAPE + (1,)), jnp.float32),
        jnp.ones(SHAPE + (1,), bool), jnp.ones(SHAPE, bool), beta, jnp.asarray(WEIGHTS, jnp.float32),
        NormalGammaPrior(*(jnp.float32(p) for p in prior)),
        jnp.asarray(relative.reshape(SHAPE + (1,)), jnp.float32), jnp.zeros(SHAPE, jnp.int32),
        jnp.ones(SHAPE, jnp.float32), num_classes=2, psf_fwhm_mm=(FWHM,), spacing_mm=SPACING,
        num_chains=4, num_sweeps=5000, burn_in=200)
    estimate = np.asarray(result.marginals).reshape(-1, 2)
    assert np.abs(estimate - exact).max() <= 0.02, np.abs(estimate - exact).max()
    # the recorded class counts are the marginals summed over voxels, draw by draw
    np.testing.assert_allclose(np.asarray(result.counts).mean(axis=(0, 1)), estimate.sum(0),
                               rtol=1e-4)


def test_psf_gibbs_in_the_pipeline(tmp_path):
    """--sampler gibbs with --psf-fwhm through segment(): a 37 mm sphere on 8 mm voxels (a 10^3
    crop; the coarse voxels keep the colouring at 3^3 colours, where 4 x 4 x 3 mm voxels need
    5 x 5 x 7, so the test stays short), 400 whole-field draws whose pooled volume agrees with
    the PSF VB fit's within 5 %, with split R-hat and ESS of the volume reported. Mixing on
    realistic crops is slow (the volume moves a voxel at a time: R-hat 1.4 on a 22 mm sphere
    in a 16^3 crop of 4 mm voxels with 100 draws per chain), so the R-hat in summary.json is
    what says whether a run is long enough."""
    import vbseg
    from vbseg.io.volume import save_nifti

    phantom = vbseg.make_phantom(vbseg.PhantomSpec(diameters_mm=(37.0,), spacing_mm=(8.0, 8.0, 8.0),
                                                   psf_fwhm_mm=6.0, shape=(10, 10, 10)), seed=2)
    path = save_nifti(tmp_path / "pet.nii.gz", phantom.pet.data, phantom.pet.affine)
    vb = vbseg.segment([path], modalities=["pet"], psf_fwhm_mm=6.0, seed=0)
    gibbs = vbseg.segment([path], modalities=["pet"], psf_fwhm_mm=6.0, sampler="gibbs", seed=0,
                          volume_draws=400)
    assert gibbs.volume_draws_ml.size == 400 and "PSF model" in gibbs.summary["diagnostics"]["sampler"]
    tumour = gibbs.summary["parameters"]["tumour_class"]
    chains = gibbs.summary["diagnostics"]["volume_chains"][tumour]
    assert chains["r_hat"] >= 1.0 and chains["ess"] > 0 and chains["draws_per_chain"] == 100
    assert gibbs.volume_interval()["mean"] == pytest.approx(vb.volume_interval()["mean"], rel=0.05)
