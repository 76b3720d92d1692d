"""Metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from vbseg.metrics import brier_score, dice, expected_calibration_error, reliability


def test_dice_by_hand():
    a = np.arange(10) < 4
    b = (np.arange(10) >= 2) & (np.arange(10) < 8)
    assert dice(a, b) == pytest.approx(2 * 2 / (4 + 6))
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_ece_and_brier_by_hand():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.5, 0.5])
    t = np.array([0, 0, 1, 0, 1, 1])
    # bins: {0.05, 0.05} -> |0.05 - 0| ; {0.95, 0.95} -> |0.95 - 0.5| ; {0.5, 0.5} -> |0.5 - 1|
    expected = (2 * 0.05 + 2 * 0.45 + 2 * 0.5) / 6
    assert expected_calibration_error(p, t) == pytest.approx(expected)
    assert brier_score(p, t) == pytest.approx(np.mean((p - t) ** 2))
    voi = np.array([1, 1, 0, 0, 0, 0], bool)
    assert expected_calibration_error(p, t, voi) == pytest.approx(0.05)


def test_perfectly_calibrated_draws_have_small_ece():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200_000)
    t = rng.uniform(size=p.size) < p
    assert expected_calibration_error(p, t) < 0.01
    assert expected_calibration_error(p, ~t) > 0.4
    edges, predicted, observed, counts = reliability(p, t)
    assert len(edges) == 16 and counts.sum() == p.size


def _ball(shape, centre, radius, spacing):
    grid = np.indices(shape).T * np.asarray(spacing)
    return (np.sqrt(np.sum((grid - np.asarray(centre)) ** 2, axis=-1)) <= radius).T


def test_surface_metrics_on_shifted_spheres():
    """A 10 mm sphere against itself shifted by 3 voxels (3 mm) along one axis: the surface
    distances lie between 0 and 3 mm (the shift), the 95th percentile close to it (within one
    voxel); surface Dice is 1 at a 3 mm tolerance and below 1 at 1 mm; identical masks give 0
    and 1."""
    from vbseg.metrics import surface_metrics

    spacing = (1.0, 1.0, 1.0)
    a = _ball((40, 40, 40), (20, 20, 20), 10, spacing)
    b = _ball((40, 40, 40), (23, 20, 20), 10, spacing)
    same = surface_metrics(a, a, spacing)
    assert same["hd95_mm"] == 0 and same["asd_mm"] == 0 and same["sdice"] == 1
    shifted = surface_metrics(b, a, spacing, tolerance_mm=1.0)
    assert 2.0 <= shifted["hd95_mm"] <= 4.0
    assert 0.5 <= shifted["asd_mm"] <= 3.0
    assert shifted["sdice"] < 0.9
    assert surface_metrics(b, a, spacing, tolerance_mm=3.5)["sdice"] == pytest.approx(1.0)
    assert np.isnan(surface_metrics(np.zeros_like(a), a, spacing)["hd95_mm"])
    # more tolerances in one call: each equals the single-tolerance value
    both = surface_metrics(b, a, spacing, tolerance_mm=1.0, more_tolerances_mm=(3.5, 2.0))
    assert both["sdice"] == shifted["sdice"]
    assert both["sdice_3.5mm"] == surface_metrics(b, a, spacing, tolerance_mm=3.5)["sdice"]
    assert both["sdice_2mm"] == surface_metrics(b, a, spacing, tolerance_mm=2.0)["sdice"]
    assert shifted["sdice"] < both["sdice_2mm"] < both["sdice_3.5mm"]
    empty = surface_metrics(np.zeros_like(a), a, spacing, more_tolerances_mm=(5.0,))
    assert empty["sdice"] == 0 and empty["sdice_5mm"] == 0


def test_interval_score_and_crps_closed_forms():
    from vbseg.metrics import crps_from_draws, interval_score

    assert interval_score(1.0, 3.0, 2.0) == pytest.approx(2.0)
    assert interval_score(1.0, 3.0, 4.0) == pytest.approx(2.0 + 40.0 * 1.0)
    # CRPS of a point mass at x is |x - y|; of N(0, 1) at y = 0 it is 2 phi(0) - 1/sqrt(pi)
    assert crps_from_draws(np.full(10, 2.0), 5.0) == pytest.approx(3.0)
    draws = np.random.default_rng(0).normal(size=200_000)
    exact = 2 * (1 / np.sqrt(2 * np.pi)) - 1 / np.sqrt(np.pi)
    assert crps_from_draws(draws, 0.0) == pytest.approx(exact, abs=0.005)


def test_bootstrap_interval_matches_the_normal_theory_one():
    """For 400 draws the percentile bootstrap CI of a mean is close to mean -/+ 1.96 sd/sqrt(n)
    (each end within 15 % of the half-width); pairing removes a shared case effect."""
    from vbseg.metrics import bootstrap_mean_ci

    rng = np.random.default_rng(1)
    values = rng.normal(2.0, 1.0, size=400)
    ci = bootstrap_mean_ci(values)
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert ci["mean"] == pytest.approx(values.mean())
    assert abs((ci["upper"] - ci["mean"]) - half) <= 0.15 * half
    assert abs((ci["mean"] - ci["lower"]) - half) <= 0.15 * half
    case = rng.normal(0, 5.0, size=400)  # a large per-case effect shared by both methods
    a, b = case + 0.3 + rng.normal(0, 0.1, 400), case + rng.normal(0, 0.1, 400)
    paired = bootstrap_mean_ci(a, paired_with=b)
    assert paired["lower"] > 0.25 and paired["upper"] < 0.35  # unpaired, the case effect swamps it
    assert bootstrap_mean_ci([np.nan, np.nan])["n"] == 0


def test_pooled_reliability_equals_reliability_of_the_union():
    """Bin sums added over runs give exactly the reliability curve (and ECE) of all voxels."""
    from vbseg.metrics import (
        calibration_error_of_bins,
        expected_calibration_error,
        pooled_reliability,
        reliability,
        reliability_sums,
    )

    rng = np.random.default_rng(3)
    p = [rng.uniform(size=(6, 7, 5)), rng.beta(0.3, 0.3, size=(4, 5, 6))]
    t = [rng.uniform(size=a.shape) < a for a in p]
    predicted, observed, counts = pooled_reliability([reliability_sums(a, b) for a, b in zip(p, t)])
    flat_p = np.concatenate([a.ravel() for a in p])
    flat_t = np.concatenate([b.ravel() for b in t])
    _, want_predicted, want_observed, want_counts = reliability(flat_p, flat_t)
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_allclose(predicted, want_predicted, rtol=1e-12)
    np.testing.assert_allclose(observed, want_observed, rtol=1e-12)
    assert calibration_error_of_bins(predicted, observed, counts) == pytest.approx(
        expected_calibration_error(flat_p, flat_t), rel=1e-12)


def test_an_empty_contour_is_as_far_off_as_the_voi_allows():
    """voi_diagonal_mm: the diagonal of the VOI's bounding box on an anisotropic grid (the
    HD95 the experiment runner gives a run whose 50 % contour is empty)."""
    from vbseg.metrics import voi_diagonal_mm

    voi = np.zeros((10, 10, 10), bool)
    voi[2:5, 1:9, 4:6] = True  # 3 x 8 x 2 voxels
    assert voi_diagonal_mm(voi, (2.0, 1.0, 4.0)) == pytest.approx(np.sqrt(6.0**2 + 8.0**2 + 8.0**2))
    assert np.isnan(voi_diagonal_mm(np.zeros((3, 3, 3), bool), (1.0, 1.0, 1.0)))
