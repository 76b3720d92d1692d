"""Prior log-odds maps in the hidden Potts model (coarse to fine, issue 9; the external field
of issue 4): the joint pseudo-likelihood estimator of (beta, gamma) against a direct numerical
maximiser of the same objective, its recovery of known couplings from labels simulated from
the prior, the fall-back to the data-only model when the map is pure noise, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage, optimize

from tests.test_cli import main_cli
from vbseg.io.volume import save_nifti
from vbseg.metrics import dice
from vbseg.phantoms import PhantomSpec, make_phantom
from vbseg.pipeline import segment
from vbseg.potts.beta import estimate_coupling_pl
from vbseg.potts.gibbs import sample_labels
from vbseg.potts.model import neighbour_sum, neighbour_weights


def _log_pl(theta, labels, base, field, weights, roi):
    """log PL(beta, gamma) written out directly (numpy, float64)."""
    counts = np.asarray(neighbour_sum(jnp.asarray(labels), jnp.asarray(weights)), np.float64)
    logits = theta[0] * counts + theta[1] * field + base
    per_voxel = (np.sum(labels * logits, -1)
                 - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1))
                 - logits.max(-1))
    return float(np.sum(per_voxel[roi]))


def test_joint_pseudo_likelihood_maximiser_matches_a_direct_optimiser():
    """The projected Newton iteration and L-BFGS-B on the written-out log PL agree (the
    objective is concave, so both find its unique maximiser in the box)."""
    rng = np.random.default_rng(3)
    shape = (10, 9, 8)
    field_map = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 6
    field = np.stack([np.zeros(shape), field_map], -1)
    # labels that follow the smoothed map partly: a noisy threshold of it
    labels = jax.nn.one_hot((field_map + rng.normal(0, 2, shape) > 0).astype(int), 2)
    labels = np.asarray(labels, np.float64)
    roi = np.ones(shape, bool)
    weights = neighbour_weights((1.0, 1.0, 1.0), 6)
    base = np.zeros(2)
    beta, gamma = estimate_coupling_pl(jnp.asarray(labels, jnp.float32), jnp.zeros(2, jnp.float32),
                                       jnp.asarray(field, jnp.float32), jnp.asarray(weights), roi,
                                       beta_start=0.1, weight_start=0.0, learn_beta=True)
    direct = optimize.minimize(lambda t: -_log_pl(t, labels, base, field, weights, roi),
                               x0=[0.1, 0.0], bounds=[(0, 3), (0, 5)], method="L-BFGS-B")
    assert direct.success
    np.testing.assert_allclose([float(beta), float(gamma)], direct.x, atol=2e-3)
    # beta fixed: the one-dimensional maximiser in gamma
    _, gamma_only = estimate_coupling_pl(jnp.asarray(labels, jnp.float32), jnp.zeros(2, jnp.float32),
                                         jnp.asarray(field, jnp.float32), jnp.asarray(weights), roi,
                                         beta_start=0.4, weight_start=0.0, learn_beta=False)
    line = optimize.minimize_scalar(lambda g: -_log_pl([0.4, g], labels, base, field, weights, roi),
                                    bounds=(0, 5), method="bounded", options={"xatol": 1e-6})
    assert abs(float(gamma_only) - line.x) < 2e-3


def test_pseudo_likelihood_recovers_the_coupling_of_simulated_labels():
    """Labels drawn (checkerboard Gibbs, 300 sweeps) from the Potts prior with external field
    gamma * f, beta = 0.3 (below the critical coupling, where the sampler mixes), gamma = 0.8:
    the mean estimate over 4 independent 24^3 label fields is within 0.03 (beta) and 0.08
    (gamma) of the truth: about 4 and 3 standard errors (over 8 fields the estimates' sd was
    0.016 and 0.052 per field, their means 0.301 and 0.801: no visible bias). A field the labels
    never saw gets gamma < 0.1."""
    rng = np.random.default_rng(0)
    shape = (24, 24, 24)
    informative = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    informative = informative / informative.std() * 1.5
    field = jnp.asarray(np.stack([np.zeros(shape), informative], -1), jnp.float32)
    weights = jnp.asarray(neighbour_weights((1.0, 1.0, 1.0), 6))
    roi = jnp.ones(shape, bool)
    true_beta, true_gamma = 0.3, 0.8
    unary = true_gamma * field

    @jax.jit
    def simulate(key):
        def sweep(labels, sweep_key):
            return sample_labels(sweep_key, labels, unary, true_beta, weights, roi), None

        start = jax.random.randint(key, shape, 0, 2)
        return jax.lax.scan(sweep, start, jax.random.split(key, 300))[0]

    estimates = []
    for seed in range(4):
        onehot = jax.nn.one_hot(simulate(jax.random.PRNGKey(seed)), 2, dtype=jnp.float32)
        estimates.append([float(x) for x in estimate_coupling_pl(
            onehot, jnp.zeros(2, jnp.float32), field, weights, roi, beta_start=0.1,
            weight_start=0.0, learn_beta=True)])
    beta, gamma = np.mean(estimates, axis=0)
    assert abs(beta - true_beta) < 0.03 and abs(gamma - true_gamma) < 0.08, estimates
    unrelated = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    unrelated = jnp.asarray(np.stack([np.zeros(shape), unrelated / unrelated.std() * 1.5], -1),
                            jnp.float32)
    _, gamma_unrelated = estimate_coupling_pl(onehot, jnp.zeros(2, jnp.float32), unrelated, weights,
                                              roi, beta_start=0.1, weight_start=0.0, learn_beta=True)
    assert float(gamma_unrelated) < 0.1


@pytest.fixture(scope="module")
def phantom_with_maps(tmp_path_factory):
    """A 22 mm sphere at 3:1, 20 % noise, with three log-odds maps on its grid."""
    folder = tmp_path_factory.mktemp("field")
    phantom = make_phantom(PhantomSpec(contrast=3.0, cv=0.2), seed=1)
    paths = phantom.save(folder)
    rng = np.random.default_rng(0)
    signed = (ndimage.distance_transform_edt(~phantom.truth)
              - ndimage.distance_transform_edt(phantom.truth))
    maps = {"noise": rng.normal(0, 3, phantom.truth.shape),
            "informative": np.clip(-signed, -6, 6),
            "wrong": np.where(np.roll(phantom.truth, 4, axis=0), 8.0, -8.0)}
    for name, values in maps.items():
        save_nifti(folder / f"{name}.nii.gz", values.astype(np.float32), phantom.pet.affine)
    return phantom, paths, folder


def _fit(paths, field=None, **kwargs):
    return segment([paths["pet"]], None, external_field=field, volume_draws=200, **kwargs)


def test_noise_map_falls_back_to_the_data_only_model(phantom_with_maps):
    """Issue 9: a map that is pure noise (iid N(0, 3^2) logits) leaves the 50 % contour's Dice
    within 0.02 of the data-only fit's; an over-confident map of the wrong place (shifted 16 mm,
    logits +-8) is switched off (gamma < 0.05) and changes Dice by < 0.02 too; an informative map
    gets a large weight and raises Dice."""
    phantom, paths, folder = phantom_with_maps
    data_only = dice(_fit(paths).contour(0.5), phantom.truth)
    for name in ("noise", "wrong"):
        posterior = _fit(paths, folder / f"{name}.nii.gz")
        assert abs(dice(posterior.contour(0.5), phantom.truth) - data_only) < 0.02, name
        assert posterior.summary["parameters"]["field_weight"] < (0.5 if name == "noise" else 0.05)
    informative = _fit(paths, folder / "informative.nii.gz")
    assert informative.summary["parameters"]["field_weight"] > 1.0
    assert dice(informative.contour(0.5), phantom.truth) > data_only + 0.02
    assert "learned" in informative.summary["options"]["inference"]
    assert informative.summary["options"]["prior_log_odds"]["source"] == "map"
    # a fixed weight is used as given
    fixed = _fit(paths, folder / "informative.nii.gz", field_weight=0.5)
    assert fixed.summary["parameters"]["field_weight"] == 0.5


def test_bad_field_inputs_get_one_line(phantom_with_maps, tmp_path):
    phantom, paths, folder = phantom_with_maps
    other_grid = tmp_path / "small.nii.gz"
    save_nifti(other_grid, np.zeros((5, 5, 5), np.float32), phantom.pet.affine)
    cases = [
        (["--external-field", other_grid], "small.nii.gz: log-odds map grid"),
        (["--external-field", tmp_path / "missing.nii.gz"], "missing.nii.gz"),
        (["--external-field", folder / "noise.nii.gz", "--field-weight", "-1"], "--field-weight"),
        (["--external-field", folder / "noise.nii.gz", "--field-weight", "x"], "--field-weight"),
        (["--external-field", folder / "noise.nii.gz", "--model", "otsu"], "--external-field"),
        (["--checkpoint", tmp_path / "net.eqx"], "--checkpoint: goes with a deep model"),
    ]
    for extra, message in cases:
        result = main_cli("segment", paths["pet"], "--out", tmp_path / "out", *extra)
        assert result.returncode == 2, extra
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (extra, result.stderr)
    ct_first = main_cli("segment", paths["ct"], paths["pet"], "--modality", "ct,pet", "--model",
                        "deep-potts", "--out", tmp_path / "out")
    assert ct_first.returncode == 2 and "needs the first image to be PET" in ct_first.stderr


def test_deep_models_run_through_segment_with_the_packaged_network(phantom_with_maps, tmp_path):
    """deep-potts (packaged PET network's logits, learned weight) and the deep-uncertainty
    baselines write the usual outputs; a checkpoint for other inputs and an ensemble of one
    are refused with one line."""
    from vbseg.deep.model import packaged_checkpoint

    phantom, paths, _ = phantom_with_maps
    data_only = dice(_fit(paths).contour(0.5), phantom.truth)
    deep = segment([paths["pet"]], tmp_path / "deep", model="deep-potts", volume_draws=200)
    assert (tmp_path / "deep" / "summary.json").is_file()
    record = deep.summary["options"]["prior_log_odds"]
    assert record["source"] == "network" and record["checkpoint"].endswith("deep_pet.eqx")
    assert deep.summary["parameters"]["field_weight"] >= 0.0
    assert "network" in deep.summary["timings_s"]
    # the packaged network finds this sphere (in-distribution for it), so the prior must not hurt
    assert dice(deep.contour(0.5), phantom.truth) >= data_only - 0.02
    dropout = segment([paths["pet"]], None, model="mc-dropout", volume_draws=200)
    assert 0.0 <= dropout.probability.min() and dropout.probability.max() <= 1.0
    assert "MC dropout" in dropout.volume_method
    for extra, message in (
        (["--model", "cnn-ensemble"], "needs a checkpoint with >= 2 members"),
        (["--model", "deep-potts", "--checkpoint", packaged_checkpoint(("pet", "ct"))],
         "checkpoint expects"),
    ):
        result = main_cli("segment", paths["pet"], "--out", tmp_path / "bad", *extra)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
