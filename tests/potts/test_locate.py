"""Locate, then delineate (``--model locate-potts``, vbseg.potts.locate) on a crop built like a
real one (vbseg.body_phantom: a limb in air, fat, muscle, bone and a hot lesion): the located
box, the delineation inside it, the disagreement rule and the option checks."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import vbseg
from tests.test_cli import main_cli
from vbseg.body_phantom import make_body_phantom
from vbseg.io.result_files import DELINEATION_FILE, LOCATOR_FILE
from vbseg.metrics import dice
from vbseg.potts import locate
from vbseg.prepare import prepare

MODALITIES = ("pet", "ct", "mr")


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crop")
    phantom = make_body_phantom(seed=4)
    phantom.save(folder)
    return [folder / f"{m}.nii.gz" for m in MODALITIES], phantom


def truth_box(truth) -> list[list[int]]:
    index = np.nonzero(truth)
    return [[int(i.min()), int(i.max()) + 1] for i in index]


@pytest.mark.parametrize("locator", ["prior", "network"])
def test_locate_then_delineate_contours_the_lesion(crop, tmp_path, locator):
    """Both locators (the packaged sarcoma prior, the packaged PET+CT+MR network) find the
    lesion; the delineation box holds it with the margin; nothing warns."""
    images, phantom = crop
    out = tmp_path / "out"
    result = main_cli("segment", *images, "--modality", ",".join(MODALITIES), "--model",
                      "locate-potts", "--locator", locator, "--out", out)
    assert result.returncode == 0, result.stderr
    contour = np.asarray(nib.load(out / "contour_50.nii.gz").dataobj) > 0
    assert dice(contour, phantom.truth) > 0.9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "locate-potts" and summary["warnings"] == []
    assert summary["diagnostics"]["locate"]["image_outside_share"] == 0.0
    assert summary["options"]["locate"]["locator"] == locator
    assert summary["options"]["fusion"]["mode"] == "pet"
    box = summary["diagnostics"]["locate"]["box"]
    spacing = nib.load(images[0]).header.get_zooms()[:3]
    for (start, stop), (low, high), n, step in zip(box, truth_box(phantom.truth), contour.shape, spacing):
        assert start <= low and high <= stop
        assert (low - start) * step >= 20 - step or start == 0  # the margin, unless at the edge
        assert (stop - high) * step >= 20 - step or stop == n
    assert summary["parameters"]["field_weight"] > 0  # image and locator agree: the map counts
    # outside the box the result is 0: the delineation ran inside it
    probability = np.asarray(nib.load(out / "prob.nii.gz").dataobj)
    inside = np.zeros(contour.shape, bool)
    inside[tuple(slice(a, b) for a, b in box)] = True
    assert probability[~inside].max() == 0


def test_located_box_keeps_the_heavy_regions_and_grows_them_in_mm():
    probability = np.zeros((40, 40, 20), np.float32)
    probability[10:14, 10:14, 5:9] = 0.9   # the largest region: mass 57.6
    probability[25:28, 25:28, 10:12] = 0.8  # 14.4 >= 10 % of it: kept
    probability[35, 2, 2] = 0.6             # 0.6 < 5.76: dropped
    voi = np.ones(probability.shape, bool)
    box, record = locate.located_box(probability, voi, (2.0, 2.0, 5.0), margin_mm=10.0)
    assert record == {"regions": 3, "kept": 2}
    # 10 mm is 5 voxels in-plane, 2 through-plane; clipped at the array's edges
    assert box == (slice(5, 33), slice(5, 33), slice(3, 14))
    nothing, record = locate.located_box(np.full((5, 5, 5), 0.4, np.float32), np.ones((5, 5, 5), bool),
                                         (1.0, 1.0, 1.0), 5.0)
    assert nothing is None and record["regions"] == 0


def test_within_cuts_the_crop_and_maps_back(crop):
    images, _ = crop
    prepared = prepare([str(p) for p in images], list(MODALITIES))
    box = (slice(3, 9), slice(2, 7), slice(4, 6))
    inner = prepared.within(box)
    np.testing.assert_array_equal(inner.stack, prepared.stack[box])
    assert inner.voi.sum() == inner.crop_voi.sum() == 6 * 5 * 2
    ones = inner.on_grid(np.ones(inner.crop_voi.shape, np.float32))
    assert ones.sum() == 60 and ones[tuple(slice(b.start + s.start, b.start + s.stop)
                                           for b, s in zip(prepared.bounds, box))].all()


def wrong_locator(phantom):
    """A locator that names a region of muscle far from the lesion: (its mask, the fake
    :func:`vbseg.potts.locate.locator_logit` giving it log-odds 4, -4 elsewhere)."""
    wrong = np.zeros(phantom.truth.shape, bool)
    centre = np.argwhere(phantom.tissue == 2)[0]  # a muscle voxel
    wrong[tuple(slice(max(0, c - 2), c + 3) for c in centre)] = True
    wrong &= phantom.tissue == 2

    def fake_locator(prepared, options):
        logit = np.where(wrong[prepared.bounds], 4.0, -4.0).astype(np.float32)
        return logit, {"locator": "test"}, 0.0

    return wrong, fake_locator


def test_a_locator_that_points_elsewhere_gives_a_mixture_and_a_warning(crop, monkeypatch):
    """The locator names a region of muscle far from the lesion: the delineation (which sees
    the hot lesion only if it is in the box) and the locator disagree, and the result carries
    both: the equal mixture of the two maps (both written beside it), a volume interval
    spanning both answers."""
    images, phantom = crop
    wrong, fake_locator = wrong_locator(phantom)
    monkeypatch.setattr(locate, "locator_logit", fake_locator)
    posterior = vbseg.segment([str(p) for p in images], modalities=list(MODALITIES),
                              model="locate-potts", volume_draws=1000)
    summary = posterior.summary
    codes = [w["code"] for w in summary["warnings"]]
    assert "locator-image-disagree" in codes
    assert summary["diagnostics"]["locate"]["mixed"] is True
    # the hot lesion lies outside the located box: the data-only model's region says so
    assert "image-region-outside-locator" in codes
    outside = summary["diagnostics"]["locate"]["image_outside_share"]
    assert outside >= locate.IMAGE_OUTSIDE_SHARE
    assert not phantom.truth[tuple(slice(*b) for b in summary["diagnostics"]["locate"]["box"])].any()
    assert summary["diagnostics"]["locate"]["agreement_dice"] < locate.AGREEMENT_DICE
    # the packaged prior's locate-potts volume error is applied to the mixture's draws
    assert posterior.volume_method == locate.CALIBRATED_METHOD.format(draws=locate.MIXTURE_METHOD)
    # the map is the equal mixture of the two maps written beside it
    located_map, delineation = posterior.maps[LOCATOR_FILE], posterior.maps[DELINEATION_FILE]
    np.testing.assert_allclose(posterior.probability, 0.5 * (located_map + delineation), atol=1e-6)
    located = 1.0 / (1.0 + np.exp(-4.0))
    np.testing.assert_allclose(located_map[wrong], located, rtol=1e-6)
    # where the locator says tumour, the probability is at least half its value
    assert posterior.probability[wrong].min() >= 0.5 * located - 1e-6
    draws = np.sort(posterior.volume_draws_ml)
    # two clusters: the located region's volume and the delineation's
    wrong_ml = wrong.sum() * posterior.reference.voxel_volume_ml
    assert abs(np.median(draws[:500]) - np.median(draws[500:])) > 0.25 * wrong_ml


@pytest.mark.parametrize("args, option, text", [
    (["--model", "potts", "--locator", "prior"], "--locator", "goes with --model locate-potts"),
    (["--model", "locate-potts", "--locator", "atlas"], "--locator", "must be one of"),
    (["--model", "locate-potts", "--locate-margin", "-3"], "--locate-margin", "from 0 to 200"),
    (["--model", "locate-potts", "--prior", "sarcoma", "--locator", "network"], "--prior",
     "is a locator"),
])
def test_locate_options_are_checked_before_any_work(crop, tmp_path, args, option, text):
    images, _ = crop
    out = tmp_path / "out"
    result = main_cli("segment", *images, "--modality", ",".join(MODALITIES), *args, "--out", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and text in lines[0], lines
    assert not out.exists()


def test_the_packaged_prior_does_not_locate_on_pet_alone(crop, tmp_path):
    images, _ = crop
    result = main_cli("segment", images[0], "--model", "locate-potts", "--locator", "prior",
                      "--out", tmp_path / "out")
    assert result.returncode == 2 and "--locator" in result.stderr
    assert "pet+ct+mr" in result.stderr


def test_a_locator_that_finds_nothing_abstains(crop, monkeypatch):
    """No located region: the whole VOI is delineated by the data-only model (the same result
    as --model potts), with the locator-found-nothing warning and no mixture."""
    images, phantom = crop

    def nothing(prepared, options):
        return np.full(prepared.crop_voi.shape, -6.0, np.float32), {"locator": "test"}, 0.0

    monkeypatch.setattr(locate, "locator_logit", nothing)
    paths = [str(p) for p in images]
    posterior = vbseg.segment(paths, modalities=list(MODALITIES), model="locate-potts", volume_draws=500)
    codes = [w["code"] for w in posterior.summary["warnings"]]
    assert codes == ["locator-found-nothing"]
    assert posterior.summary["diagnostics"]["locate"]["mixed"] is False
    plain = vbseg.segment(paths, modalities=list(MODALITIES), volume_draws=500)
    np.testing.assert_allclose(posterior.probability, plain.probability, atol=1e-5)
    assert dice(posterior.contour(0.5), phantom.truth) > 0.9
