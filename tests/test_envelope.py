"""--envelope-mm (vbseg.envelope): the grey-level envelope commutes with thresholding, the
volume draws follow it exactly at the thresholds, and a lesion with a cold core gets its whole
mass back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

import vbseg
from tests.test_cli import main_cli
from vbseg.envelope import envelope_gain, envelope_probability
from vbseg.io.volume import save_nifti
from vbseg.metrics import dice

SPACING = (4.0, 4.0, 3.0)


def _binary_envelope(mask, radius_mm):
    """The binary closing (ball) and hole filling of one contour, by SimpleITK's binary filters."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask.astype(np.uint8).transpose(2, 1, 0)))
    radius = [max(int(round(radius_mm / s)), 1) for s in SPACING]
    closed = sitk.BinaryMorphologicalClosing(image, radius, sitk.sitkBall, 1, True)
    filled = sitk.BinaryFillhole(closed, False, 1)
    return sitk.GetArrayFromImage(filled).transpose(2, 1, 0).astype(bool)


@pytest.fixture(scope="module")
def smooth_map():
    rng = np.random.default_rng(3)
    field = ndimage.gaussian_filter(rng.normal(size=(18, 16, 20)), 1.5)
    return (1 / (1 + np.exp(-3 * field / field.std()))).astype(np.float32)


@pytest.mark.parametrize("radius_mm", [4.0, 9.0])
def test_the_envelope_map_thresholds_to_the_envelope_of_each_contour(smooth_map, radius_mm):
    """For every level t, {p_env >= t} is exactly the binary closing + hole filling of
    {p >= t} (grey morphology with a flat kernel commutes with thresholding); p_env >= p."""
    envelope = envelope_probability(smooth_map, SPACING, radius_mm)
    assert np.all(envelope >= smooth_map) and (envelope > smooth_map).any()
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        expected = _binary_envelope(smooth_map >= t, radius_mm)
        np.testing.assert_array_equal(envelope >= t, expected, err_msg=f"level {t}")
    np.testing.assert_array_equal(envelope_probability(smooth_map, SPACING, 0.0), smooth_map)
    voi = np.zeros(smooth_map.shape, bool)
    voi[2:-2, 2:-2, 2:-2] = True
    inside = envelope_probability(smooth_map, SPACING, radius_mm, voi)
    assert not inside[~voi].any() and np.array_equal(inside[voi], envelope[voi])


def test_volume_draws_gain_what_the_envelope_adds_at_their_threshold(smooth_map):
    """A draw whose volume is that of {p >= t} gains |{p_env >= t}| - |{p >= t}| voxels, and its
    uptake mass gains the envelope's added uptake at t, exactly; the map is monotone."""
    envelope = envelope_probability(smooth_map, SPACING, 6.0)
    uptake = np.random.default_rng(0).gamma(2.0, size=smooth_map.shape)
    voxel_ml = 0.048
    levels = np.sort(smooth_map.ravel())[[500, 2000, 4000, 5500]]  # map values: exact knots
    counts = np.array([(smooth_map >= t).sum() for t in levels])
    gain, uptake_gain = envelope_gain(smooth_map, envelope, counts * voxel_ml, voxel_ml, uptake)
    for t, n, g, u in zip(levels, counts, gain, uptake_gain):
        assert g == pytest.approx(((envelope >= t).sum() - n) * voxel_ml, rel=1e-9)
        assert u == pytest.approx((uptake[envelope >= t].sum() - uptake[smooth_map >= t].sum()) * voxel_ml,
                                  rel=1e-9)
    draws = np.linspace(0.0, smooth_map.size * voxel_ml * 1.1, 50)
    mapped = draws + envelope_gain(smooth_map, envelope, draws, voxel_ml)[0]
    assert mapped[0] == 0 and np.all(np.diff(mapped) >= -1e-9)


def test_volume_gain_with_tied_values_and_an_empty_map():
    """A block of 27 voxels at p = 1 around a hole at 0 (a filled cavity): a draw of the block's
    volume gains the hole, smaller draws gain in proportion (linear from 0), none gains more;
    draws beyond the region with p > 0 keep the last gain; an all-zero map gains nothing."""
    p = np.zeros((9, 9, 9), np.float32)
    p[3:6, 3:6, 3:6] = 1.0
    p[4, 4, 4] = 0.0
    envelope = envelope_probability(p, (1.0, 1.0, 1.0), 1.0)
    assert envelope[4, 4, 4] == 1.0 and (envelope >= 0.5).sum() == 27
    gain, uptake_gain = envelope_gain(p, envelope, np.array([0.0, 0.5, 13.0, 26.0, 40.0]), 1.0,
                                      uptake=np.full(p.shape, 2.0))
    np.testing.assert_allclose(gain, [0.0, 0.5 / 26, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(uptake_gain, 2.0 * gain)
    zero = np.zeros((4, 4, 4), np.float32)
    nothing, none = envelope_gain(zero, zero, np.array([0.0, 3.0]), 1.0)
    assert none is None and np.array_equal(nothing, [0.0, 0.0])


@pytest.fixture(scope="module")
def cold_core(tmp_path_factory):
    """A 36 mm lesion whose hot rim (SUV 6) wraps a cold 26 mm core (SUV 1.2) in background 1,
    noise CV 10 %, on 4 x 4 x 3 mm voxels."""
    shape = (24, 24, 32)
    centres = [(np.arange(n) + 0.5) * s for n, s in zip(shape, SPACING)]
    grid = np.meshgrid(*centres, indexing="ij", sparse=True)
    radius = np.sqrt(sum((g - n * s / 2) ** 2 for g, n, s in zip(grid, shape, SPACING)))
    lesion = radius <= 18.0
    activity = np.where(lesion, 6.0, 1.0) * np.where(radius <= 13.0, 0.2, 1.0)
    image = activity * (1 + 0.1 * np.random.default_rng(5).normal(size=shape))
    path = save_nifti(tmp_path_factory.mktemp("core") / "pet.nii.gz", image.astype(np.float32),
                      np.diag(list(SPACING) + [1.0]))
    return path, lesion


def test_envelope_gives_the_lesion_with_a_cold_core_its_whole_mass(cold_core, tmp_path):
    """Potts takes the hot rim only; with --envelope-mm 8 the 50 % contour is the whole lesion
    (Dice up by > 0.15, to >= 0.9), the volume interval holds the lesion's volume, and
    summary.json records the radius."""
    path, lesion = cold_core
    plain = vbseg.segment([path], seed=0)
    out = tmp_path / "out"
    whole = vbseg.segment([path], seed=0, envelope_mm=8.0, out=out)
    before, after = dice(plain.probability >= 0.5, lesion), dice(whole.probability >= 0.5, lesion)
    assert after >= 0.9 and after - before > 0.15, (before, after)
    true_ml = lesion.sum() * np.prod(SPACING) / 1000
    interval = whole.volume_interval()
    assert interval["lower"] <= true_ml * 1.05 and interval["upper"] >= true_ml * 0.95, (interval, true_ml)
    assert plain.volume_interval()["upper"] < 0.8 * true_ml
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["envelope_mm"] == 8.0
    assert summary["diagnostics"]["envelope"]["added_ml_at_50"] > 0
    assert "--envelope-mm" in summary["volume_ml"]["method"]
    assert not [w for w in summary["warnings"] if w["code"] == "envelope-doubles-region"]


def test_envelope_doubles_region_fires_on_scattered_hot_spots(tmp_path):
    """Hot 4 mm spots 12 mm apart: a 10 mm envelope joins them into one block, more than
    doubling the 50 % region, and the warning says so."""
    shape = (30, 30, 30)
    image = np.ones(shape, np.float32)
    image[3:27:3, 3:27:3, 3:27:3] = 8.0
    image *= 1 + 0.03 * np.random.default_rng(1).normal(size=shape).astype(np.float32)
    path = save_nifti(tmp_path / "pet.nii.gz", image, np.diag([4.0, 4.0, 4.0, 1.0]))
    posterior = vbseg.segment([path], seed=0, envelope_mm=10.0, out=tmp_path / "out")
    warnings = json.loads((tmp_path / "out" / "summary.json").read_text())["warnings"]
    fired = [w for w in warnings if w["code"] == "envelope-doubles-region"]
    assert len(fired) == 1 and "mL" in fired[0]["message"], warnings
    added = posterior.summary["diagnostics"]["envelope"]["added_ml_at_50"]
    assert added > (posterior.probability >= 0.5).sum() * 0.064 / 2  # the region after is > 2x before


@pytest.mark.parametrize("value", ["-1", "nan", "500"])
def test_a_bad_envelope_radius_is_one_line_exit_2(cold_core, tmp_path, value):
    path, _ = cold_core
    result = main_cli("segment", path, "--out", tmp_path / "out", "--envelope-mm", value)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "--envelope-mm" in lines[0] and "from 0 to 100" in lines[0]
    assert not (tmp_path / "out").exists()
