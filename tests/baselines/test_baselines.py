"""Each baseline on a phantom with known truth, through the same segment() path as the models;
and through the experiment runner."""

from __future__ import annotations

import numpy as np
import pytest

import vbseg
from vbseg.baselines.classic import BASELINES
from vbseg.metrics import dice

# Dice of the 50 % contour on a 30 mm sphere, 4:1, CV 10 %, 6 mm PSF, measured when written:
# threshold40 0.92, threshold50 0.95, suv2.5 0.91, adaptive50 0.81, otsu 0.96, kmeans 0.97,
# gmm 0.79, random_walker 0.89, graphcut 0.80 (PET + CT). Asserted: >= 0.7 each (a baseline that finds the
# lesion; the kmeans baseline keeps the lowest-SSE of three starts, as its single even start
# split the background instead, Dice 0.08).
MIN_DICE = 0.7


@pytest.fixture(scope="module")
def sphere(tmp_path_factory):
    phantom = vbseg.make_phantom(vbseg.PhantomSpec(diameters_mm=(30.0,)), seed=4)
    folder = tmp_path_factory.mktemp("baseline")
    return phantom, phantom.save(folder)


# KsPC's contours are highest-density regions of the activity, not a tumour probability: its
# 50 % contour holds half the smoothed activity, so it is tested for what it claims in
# tests/baselines/test_kspc.py instead of by Dice here.
@pytest.mark.parametrize("name", [b for b in BASELINES if b != "kspc"])
def test_baseline_finds_the_sphere(sphere, name, tmp_path):
    phantom, paths = sphere
    posterior = vbseg.segment([paths["pet"], paths["ct"]], tmp_path / "out", modalities=["pet", "ct"],
                              model=name, volume_draws=200)
    p = posterior.probability
    assert p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1
    score = dice(posterior.contour(0.5), phantom.truth)
    assert score >= MIN_DICE, (name, score)
    summary = posterior.summary
    assert summary["model"] == name and summary["elbo"] is None
    if summary["options"]["map"] == "mask":
        assert set(np.unique(p)) <= {0.0, 1.0}
        interval = posterior.volume_interval()
        assert interval["lower"] == interval["upper"] == pytest.approx(interval["mean"])
    else:
        assert np.any((p > 0.01) & (p < 0.99))  # a probability map, not a mask
    assert (tmp_path / "out" / "summary.json").exists()


def test_thresholds_follow_their_definitions(sphere, tmp_path):
    phantom, paths = sphere
    pet = phantom.pet.data
    for name, fraction in (("threshold40", 0.4), ("threshold50", 0.5)):
        posterior = vbseg.segment([paths["pet"]], modalities=["pet"], model=name, volume_draws=200)
        expected = pet >= fraction * pet.max()
        np.testing.assert_array_equal(posterior.probability > 0.5, expected)
    adaptive = vbseg.segment([paths["pet"]], modalities=["pet"], model="adaptive50", volume_draws=200)
    background = np.median(pet)
    np.testing.assert_array_equal(adaptive.probability > 0.5,
                                  pet >= background + 0.5 * (pet.max() - background))


def test_baseline_without_pet_is_refused(sphere):
    _, paths = sphere
    with pytest.raises(vbseg.InputError, match="no image is PET"):
        vbseg.segment([paths["ct"]], modalities=["ct"], model="otsu", tumour_class=1)


def test_baselines_run_in_an_experiment(tmp_path):
    from vbseg.experiment.config import load_experiment
    from vbseg.experiment.runner import run_experiment

    config = tmp_path / "baselines.toml"
    config.write_text('[phantoms]\ndiameters_mm = 22\n[model]\nname = ["threshold40", "gmm"]\n'
                      'volume_draws = 200\n')
    summary = run_experiment(load_experiment(config), tmp_path / "out", progress=False)
    assert summary["failed"] == 0
    text = (tmp_path / "out" / "results.csv").read_text()
    assert "threshold40" in text and "gmm" in text
    # results.md summarises each variant with a bootstrap CI and the paired difference from
    # the first variant (here one case, so the intervals collapse onto the values)
    report = (tmp_path / "out" / "results.md").read_text()
    assert "Dice minus first variant (paired, 95 % CI)" in report
    gmm_row = next(line for line in report.splitlines() if line.startswith("| name=gmm,"))
    assert gmm_row.split("|")[2].strip() == "1/1" and gmm_row.split("|")[4].strip() != "-"
