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
