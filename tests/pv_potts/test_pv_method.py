"""``--model pv-potts`` through segment() and the command line: its outputs, its volume from
joint draws on a phantom of known truth fraction, the cold wall, and its options' errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import vbseg
from tests.test_cli import main_cli
from vbseg.errors import InputError
from vbseg.io.volume import save_nifti
from vbseg.options import SegmentOptions
from vbseg.potts.beta import log_partition_ratio
from vbseg.pv_potts.inference import fraction_summaries, wall_fraction
from vbseg.pv_potts.method import (
    BETA_GRID,
    FRACTION_FILE,
    MIN_DRAW_WEIGHT,
    PV_CHAINS,
    PV_KEPT_PER_CHAIN,
    mixed_draws,
    psf_grid,
)


@pytest.fixture(scope="module")
def phantom_path(tmp_path_factory):
    """A 37 mm sphere on 8 mm voxels (a 10^3 crop: 3^3 colours for the sampler, a short test)."""
    phantom = vbseg.make_phantom(vbseg.PhantomSpec(diameters_mm=(37.0,), spacing_mm=(8.0, 8.0, 8.0),
                                                   psf_fwhm_mm=6.0, shape=(10, 10, 10)), seed=2)
    folder = tmp_path_factory.mktemp("pv")
    return phantom, save_nifti(folder / "pet.nii.gz", phantom.pet.data, phantom.pet.affine)


def test_pv_potts_recovers_the_volume_of_a_phantom_with_known_truth_fraction(phantom_path, tmp_path):
    """The posterior mean volume is within 10 % of the physical volume (the truth-fraction sum);
    the interval comes from the sampler's joint draws; prob.nii.gz is P(f >= 1/2) and
    fraction.nii.gz E[f], whose sum agrees with the draws' mean within 5 %."""
    phantom, path = phantom_path
    out = tmp_path / "out"
    posterior = vbseg.segment([path], modalities=["pet"], model="pv-potts", psf_fwhm_mm=6.0,
                              fraction_levels=5, seed=0, out=out)
    volume = posterior.volume_interval()
    truth_ml = phantom.volume_ml
    np.testing.assert_allclose(phantom.truth_fraction.sum() * phantom.pet.voxel_volume_ml, truth_ml,
                               rtol=0.02)
    assert abs(volume["mean"] / truth_ml - 1) <= 0.10, (volume, truth_ml)
    assert posterior.volume_draws_ml.size == PV_CHAINS * PV_KEPT_PER_CHAIN
    assert volume["lower"] < volume["mean"] < volume["upper"]
    summary = json.loads((out / "summary.json").read_text())
    assert "joint posterior draws of the whole fraction field" in summary["volume_ml"]["method"]
    assert summary["options"]["fraction_levels"] == 5 and summary["model"] == "pv-potts"
    fraction = np.asarray(nib.load(out / FRACTION_FILE).dataobj)
    prob = np.asarray(nib.load(out / "prob.nii.gz").dataobj)
    assert fraction.min() >= 0 and fraction.max() <= 1 + 1e-6
    # P(f >= 1/2) >= 1/2 wherever E[f] > 3/4 (Markov's inequality on 1 - f) and <= 1/2 where
    # E[f] < 1/4 (on f): prob and fraction come from the same level marginals
    assert np.all(prob[fraction > 0.75] >= 0.5) and np.all(prob[fraction < 0.25] <= 0.5)
    fraction_ml = fraction.sum() * phantom.pet.voxel_volume_ml
    assert fraction_ml == pytest.approx(volume["mean"], rel=0.05)


def test_fraction_summaries_and_wall_fraction():
    q = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])  # levels 0, 1/2, 1
    probability, fraction = fraction_summaries(q)
    np.testing.assert_allclose(probability, [0.8, 0.4])
    np.testing.assert_allclose(fraction, [0.65, 0.25])
    lesion = np.zeros((9, 9, 9), bool)
    lesion[3:6, 3:6, 3:6] = True
    omega = wall_fraction(lesion, (2.0, 2.0, 2.0), 1.0)
    # a 1 mm shell on 2 mm voxels: half of each face neighbour's voxel, none inside or far out
    assert omega[lesion].max() == 0 and omega[2, 4, 4] == pytest.approx(0.5)
    assert omega[0, 4, 4] == 0 and omega.max() <= 1
    assert not wall_fraction(lesion, (2.0, 2.0, 2.0), 0.0).any()


BAD_OPTIONS = {
    "one fraction level": (["--model", "pv-potts", "--fraction-levels", "1"], "--fraction-levels",
                           "from 2 to"),
    "negative wall": (["--model", "pv-potts", "--wall-mm", "-1"], "--wall-mm", ">= 0"),
    "wall with potts": (["--wall-mm", "1.0"], "--wall-mm", "goes with --model pv-potts"),
    "levels with potts": (["--fraction-levels", "5"], "--fraction-levels", "goes with --model pv-potts"),
    "psf sd without psf": (["--model", "pv-potts", "--psf-sd", "1"], "--psf-sd", "--psf-fwhm"),
    "psf sd at psf 0": (["--model", "pv-potts", "--psf-fwhm", "0", "--psf-sd", "1"], "--psf-sd", "above 0"),
    "psf sd too wide": (["--model", "pv-potts", "--psf-fwhm", "6", "--psf-sd", "7"], "--psf-sd", "from 0 to"),
    "envelope with pv-potts": (["--model", "pv-potts", "--envelope-mm", "5"], "--envelope-mm", "fractions"),
    "psf sd with potts": (["--psf-fwhm", "6", "--psf-sd", "1"], "--psf-sd", "goes with --model pv-potts"),
    "negative psf sd": (["--model", "pv-potts", "--psf-fwhm", "6", "--psf-sd", "-1"], "--psf-sd",
                        "from 0 to"),
    "noise kernel without psf": (["--model", "pv-potts", "--noise-fwhm", "4"], "--noise-fwhm",
                                 "--psf-fwhm above 0"),
    "noise kernel wider than psf": (["--model", "pv-potts", "--psf-fwhm", "6", "--noise-fwhm", "7"],
                                    "--noise-fwhm", "from 0 to below --psf-fwhm (6)"),
    "noise kernel as wide as the psf": (["--model", "pv-potts", "--psf-fwhm", "6", "--noise-fwhm", "6"],
                                        "--noise-fwhm", "below --psf-fwhm"),
    "negative noise kernel": (["--psf-fwhm", "6", "--noise-fwhm", "-1"], "--noise-fwhm", "from 0 to"),
    "noise kernel with a baseline": (["--model", "suv2.5", "--psf-fwhm", "6", "--noise-fwhm", "4"],
                                     "--noise-fwhm", "goes with --model potts or deep-potts or pv-potts"),
}


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_bad_partial_volume_options_are_one_line_exit_2(phantom_path, tmp_path, name):
    args, subject, problem = BAD_OPTIONS[name]
    _, path = phantom_path
    result = main_cli("segment", path, "--out", tmp_path / "out", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("vbseg: error: ") and subject in lines[0] and problem in lines[0]
    assert not (tmp_path / "out").exists()


def test_pv_potts_refuses_more_classes_and_other_samplers():
    def check(modalities=("pet",), box=None, **options):
        SegmentOptions.from_values(model="pv-potts", volume_draws=2000, **options).check(
            num_images=1, modalities=list(modalities), levels_percent=(50,), box=box)

    with pytest.raises(InputError, match="--classes"):
        check(num_classes=3)
    with pytest.raises(InputError, match="--sampler"):
        check(sampler="gibbs")
    check(beta="auto")  # the beta grid (its own test)
    with pytest.raises(InputError, match="--wall-mm"):
        check(modalities=["ct"], tumour_class=1, wall_mm=1.0, box="0:2,0:2,0:2")


def test_beta_auto_mixes_the_grid_by_elbo_minus_log_partition(phantom_path):
    """--beta auto: one fit per beta of the grid, weighted by exp(ELBO - log Z(beta)) with
    log Z from the recorded thermodynamic-integration path (recomputed here by the trapezoid
    rule); the volume still comes from joint draws and recovers the phantom within 10 %."""
    phantom, path = phantom_path
    posterior = vbseg.segment([path], modalities=["pet"], model="pv-potts", psf_fwhm_mm=6.0,
                              fraction_levels=5, seed=0, beta="auto")
    record = posterior.summary["diagnostics"]["beta_weighting"]
    assert record["betas"] == list(BETA_GRID)
    ti = record["path"]
    statistic = np.asarray(ti["mean_pair_statistic"])
    # T = sum w J <= 0 (J = -|phi_k - phi_l|); coupling orders the field, so E[T] rises from 0
    assert ti["betas"][0] == 0.0 and np.all(statistic <= 0) and statistic[-1] > 0.5 * statistic[0]
    np.testing.assert_allclose(ti["log_partition"],
                               log_partition_ratio(ti["betas"], ti["mean_pair_statistic"]), rtol=1e-6)
    at = [ti["betas"].index(b) for b in BETA_GRID]
    np.testing.assert_allclose(record["log_partition"], np.asarray(ti["log_partition"])[at], rtol=1e-6)
    log_weight = np.asarray(record["elbo"]) - np.asarray(record["log_partition"])
    expected = np.exp(log_weight - log_weight.max())
    np.testing.assert_allclose(record["weights"], expected / expected.sum(), rtol=1e-5, atol=1e-12)
    sampled = record["sampled_betas"]
    assert sampled and all(record["weights"][BETA_GRID.index(b)] >= MIN_DRAW_WEIGHT for b in sampled)
    assert posterior.summary["options"]["beta"] == "auto"
    assert posterior.volume_draws_ml.size == PV_CHAINS * PV_KEPT_PER_CHAIN
    assert abs(posterior.volume_interval()["mean"] / phantom.volume_ml - 1) <= 0.10


def test_mixed_draws_pick_each_pool_in_proportion_to_its_weight():
    """Each mixture draw comes from one pool, none twice; over seeds the share taken from a
    pool of weight 1/4 is 1/4 within 4 binomial standard errors."""
    first = np.arange(100, dtype=float).reshape(4, 25)
    second = 1000 + first
    taken = []
    for seed in range(40):
        volume, weighted = mixed_draws([(first, -first), (second, -second)], [0.25, 0.75], seed)
        assert volume.size == 100 and np.array_equal(weighted, -volume)
        assert np.unique(volume).size == 100 and np.isin(volume, np.r_[first.ravel(), second.ravel()]).all()
        taken.append(np.mean(volume < 1000))
    share, n = np.mean(taken), 40 * 100
    assert abs(share - 0.25) <= 4 * np.sqrt(0.25 * 0.75 / n)
    single, _ = mixed_draws([(first, first)], [1.0], 0)
    np.testing.assert_array_equal(single, first.ravel())  # one fit: its draws as they came


def test_psf_grid_weights_are_the_normal_masses_of_the_nodes_bins():
    """Nodes at the given FWHM + (-2..2) sd; weights Phi(0.5) - Phi(-0.5) = 0.38292, Phi(1.5) -
    Phi(0.5) = 0.24173 and 1 - Phi(1.5) = 0.06681 (tables); nodes below 0 mm are dropped, the
    lowest bin cut at 0 mm (Phi(-0.5) - Phi(-1) = 0.30854 - 0.15866) and the rest renormalised;
    no sd (or 0): the given FWHM alone."""
    fwhms, weights = psf_grid(6.0, 1.0)
    np.testing.assert_allclose(fwhms, [4.0, 5.0, 6.0, 7.0, 8.0])
    np.testing.assert_allclose(weights, [0.06681, 0.24173, 0.38292, 0.24173, 0.06681], atol=1e-5)
    fwhms, weights = psf_grid(1.5, 1.0)
    np.testing.assert_allclose(fwhms, [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(weights, np.array([0.24173, 0.38292, 0.24173, 0.06681]) / 0.93319, atol=1e-5)
    fwhms, weights = psf_grid(1.0, 1.0)  # the node at 0 mm takes its bin's mass above 0 only
    np.testing.assert_allclose(fwhms, [0.0, 1.0, 2.0, 3.0])
    mass = np.array([0.30854 - 0.15866, 0.38292, 0.24173, 0.06681])
    np.testing.assert_allclose(weights, mass / mass.sum(), atol=1e-5)
    for sd in (None, 0.0):
        fwhms, weights = psf_grid(6.0, sd)
        assert fwhms.tolist() == [6.0] and weights.tolist() == [1.0]
    # with --noise-fwhm 4.5 the PSF is at least the noise kernel: the prior is cut at 4.5 mm
    fwhms, weights = psf_grid(6.0, 1.0, 4.5)
    np.testing.assert_allclose(fwhms, [5.0, 6.0, 7.0, 8.0])
    mass = np.array([0.30854 - 0.06681, 0.38292, 0.24173, 0.06681])  # Phi(-0.5) - Phi(-1.5), ...
    np.testing.assert_allclose(weights, mass / mass.sum(), atol=1e-5)


def test_noise_kernel_whitens_the_pet_and_leaves_the_rest_of_the_psf(tmp_path):
    """--noise-fwhm N with --psf-fwhm F: the fit sees the whitened PET with the PSF sqrt(F^2 - N^2)
    (recorded in summary.json beside N) and reports the noise sd as measured; the volume stays
    within 10 % of a 22 mm sphere whose noise is correlated by that kernel."""
    spec = vbseg.PhantomSpec(diameters_mm=(22.0,), spacing_mm=(4.0, 4.0, 4.0), psf_fwhm_mm=6.0,
                             noise_fwhm_mm=4.0, cv=0.1, shape=(14, 14, 14))
    phantom = vbseg.make_phantom(spec, seed=0)
    path = save_nifti(tmp_path / "pet.nii.gz", phantom.pet.data, phantom.pet.affine)
    runs = {noise: vbseg.segment([path], modalities=["pet"], model="pv-potts", psf_fwhm_mm=6.0,
                                 noise_fwhm_mm=noise, fraction_levels=5, seed=0)
            for noise in (None, 4.0)}
    whitened = runs[4.0]
    assert whitened.summary["options"]["noise_fwhm_mm"] == 4.0
    assert runs[None].summary["options"]["noise_fwhm_mm"] is None
    assert "whitened" in whitened.summary["options"]["inference"]
    assert f"FWHM {np.sqrt(20.0):.3g} mm" in whitened.summary["options"]["inference"]
    assert abs(whitened.volume_interval()["mean"] / phantom.volume_ml - 1) <= 0.10
    assert not np.array_equal(whitened.volume_draws_ml, runs[None].volume_draws_ml)
    # the noise sd is reported in the measured image's units (the whitened fit's sd x the gain)
    assert whitened.summary["parameters"]["noise_sd"][0] == pytest.approx(
        runs[None].summary["parameters"]["noise_sd"][0], rel=0.25)


def test_psf_sd_mixes_the_fits_at_the_psf_nodes_by_their_prior_weights(phantom_path):
    """--psf-sd: one fit per PSF node, recorded with its prior weight and its mean-field volume;
    the mixture's interval is wider than the given PSF's and holds the central nodes' volumes;
    --psf-sd 0 is the fit at the given FWHM exactly."""
    phantom, path = phantom_path
    given = vbseg.segment([path], modalities=["pet"], model="pv-potts", psf_fwhm_mm=6.0,
                          fraction_levels=5, seed=0)
    zero = vbseg.segment([path], modalities=["pet"], model="pv-potts", psf_fwhm_mm=6.0,
                         fraction_levels=5, seed=0, psf_sd_mm=0.0)
    np.testing.assert_array_equal(zero.volume_draws_ml, given.volume_draws_ml)
    mixed = vbseg.segment([path], modalities=["pet"], model="pv-potts", psf_fwhm_mm=6.0,
                          fraction_levels=5, seed=0, psf_sd_mm=1.0)
    components = mixed.summary["diagnostics"]["mixture"]["components"]
    fwhms, weights = psf_grid(6.0, 1.0)
    assert [c["psf_fwhm_mm"] for c in components] == fwhms.tolist()
    np.testing.assert_allclose([c["weight"] for c in components], weights, rtol=1e-12)
    assert all(c["sampled"] for c in components) and mixed.summary["options"]["psf_sd_mm"] == 1.0
    assert all(c["mean_field_volume_ml"] > 0 for c in components)
    assert mixed.volume_draws_ml.size == PV_CHAINS * PV_KEPT_PER_CHAIN
    assert "--psf-sd" in mixed.volume_method
    narrow, wide = given.volume_interval(), mixed.volume_interval()
    assert wide["upper"] - wide["lower"] > 1.5 * (narrow["upper"] - narrow["lower"]), (narrow, wide)
    central = [c["mean_field_volume_ml"] for c in components[1:4]]  # weights 0.24-0.38 each
    assert wide["lower"] <= min(central) and max(central) <= wide["upper"], (central, wide)
    assert abs(wide["mean"] / phantom.volume_ml - 1) <= 0.10
