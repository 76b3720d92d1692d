"""The located-or-missed volume-error mixture of population priors (vbseg.cohort.volume_error):
its parameters in closed form from leave-one-out entries, its draws against the mixture's
exact CDF (Kolmogorov-Smirnov), the empty-contour rule, TLG of missed draws, and the
regression that one missed training case no longer blows the interval up."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from vbseg.cohort.model import load_prior
from vbseg.cohort.volume_error import (
    CALIBRATION_FORMAT,
    calibrated_draws,
    calibration_entry,
    calibration_from_entries,
    describe,
)
from vbseg.errors import InputError

NUM_DRAWS = 40_000
# KS critical value at the 0.1 % level: 1.95 / sqrt(n)
KS_LIMIT = 1.95 / np.sqrt(NUM_DRAWS)


def _entry(name, manual_ml, model_ml, located, suv=None, empty=False):
    entry = {"case": name, "manual_ml": manual_ml, "model_ml": model_ml,
             "dice50": 0.7 if located else 0.0, "located": located, "contour_empty": empty}
    if suv is not None:
        entry["manual_suv_mean"] = suv
    return entry


# four located cases and two missed ones (one contour empty, one elsewhere), sarcoma-like volumes
ENTRIES = [_entry("a", 366.0, 500.0, True, 4.1), _entry("b", 54.0, 73.0, True, 2.2),
           _entry("c", 80.0, 69.0, True, 6.0), _entry("d", 297.0, 1e-3, False, 1.9, empty=True),
           _entry("e", 422.0, 525.0, True, 3.3), _entry("f", 369.0, 82.0, False, 1.5)]


def _t_cdf(x, predictive):
    n = predictive["n"]
    return stats.t.cdf((x - predictive["mean"]) / (predictive["sd"] * np.sqrt(1 + 1 / n)), n - 1)


def test_entry_classifies_by_the_dice_of_the_50_percent_contour():
    tumour = np.zeros((10, 10, 10), bool)
    tumour[2:6, 2:6, 2:6] = True
    hit = np.where(tumour, 0.9, 0.0)
    elsewhere = np.roll(hit, 5, axis=0)
    suv = np.where(tumour, 5.0, 1.0)
    entry = calibration_entry("x", hit, tumour, 0.5, suv)
    assert entry["located"] and entry["dice50"] == 1.0
    assert entry["manual_ml"] == 32.0 and entry["model_ml"] == pytest.approx(0.9 * 32.0)
    assert entry["manual_suv_mean"] == 5.0 and not entry["contour_empty"]
    assert not calibration_entry("x", elsewhere, tumour, 0.5)["located"]
    empty = calibration_entry("x", np.full_like(hit, 0.4), tumour, 0.5)
    assert not empty["located"] and empty["contour_empty"]


def test_parameters_in_closed_form():
    calibration = calibration_from_entries(ENTRIES)
    assert calibration["format"] == CALIBRATION_FORMAT and calibration["n"] == 6
    # 1 miss among the 5 cases whose contour was not empty: (1 + 1) / (5 + 2)
    assert calibration["missed"] == 2 and calibration["empty_contours"] == 1
    assert calibration["miss_probability"] == pytest.approx(2 / 7)
    residuals = np.log([366 / 500, 54 / 73, 80 / 69, 422 / 525])
    assert calibration["located"]["log_ratio_mean"] == pytest.approx(residuals.mean())
    assert calibration["located"]["log_ratio_sd"] == pytest.approx(residuals.std(ddof=1))
    assert calibration["located"]["n"] == 4
    manual = np.log([e["manual_ml"] for e in ENTRIES])
    assert calibration["manual_log_volume"]["mean"] == pytest.approx(manual.mean())
    assert calibration["manual_log_volume"]["sd"] == pytest.approx(manual.std(ddof=1))
    assert "2 of 6" in describe(calibration)
    assert calibration_from_entries(ENTRIES[:2]) is None  # fewer than three cases
    # fewer than three located: no located component
    few_located = [_entry(str(i), 50.0 + i, 40.0, i < 2) for i in range(5)]
    assert calibration_from_entries(few_located)["located"] is None


def test_draws_follow_the_mixture_cdf():
    calibration = calibration_from_entries(ENTRIES)
    raw = np.full(NUM_DRAWS, 100.0)  # the model's own volume, no spread of its own
    volumes, tlg, missed = calibrated_draws(raw, None, calibration, seed=3, contour_empty=False)
    assert tlg is None
    p = calibration["miss_probability"]
    assert abs(missed - p) < 4 * np.sqrt(p * (1 - p) / NUM_DRAWS)
    located = dict(calibration["located"], mean=calibration["located"]["log_ratio_mean"],
                   sd=calibration["located"]["log_ratio_sd"])

    def mixture_cdf(v):
        population = calibration["manual_log_volume"]
        return (1 - p) * _t_cdf(np.log(v / 100.0), located) + p * _t_cdf(np.log(v), population)

    assert stats.kstest(volumes, mixture_cdf).statistic < KS_LIMIT


def test_empty_contour_draws_only_from_the_population_with_their_tlg():
    calibration = calibration_from_entries(ENTRIES)
    raw = np.zeros(NUM_DRAWS)
    volumes, tlg, missed = calibrated_draws(raw, np.zeros(NUM_DRAWS), calibration, seed=4, contour_empty=True)
    assert missed == 1.0
    population = calibration["manual_log_volume"]
    assert stats.kstest(np.log(volumes), lambda x: _t_cdf(x, population)).statistic < KS_LIMIT
    suv = np.log([e["manual_suv_mean"] for e in ENTRIES])
    suv_predictive = {"mean": suv.mean(), "sd": suv.std(ddof=1), "n": suv.size}
    assert stats.kstest(np.log(tlg / volumes), lambda x: _t_cdf(x, suv_predictive)).statistic < KS_LIMIT


def test_one_missed_training_case_no_longer_blows_up_the_interval():
    # the old single log-normal: the empty contour's residual log(297 / 1e-3) = 12.6 made the
    # residual sd ~5 and the 95 % interval reach millions of mL
    calibration = calibration_from_entries(ENTRIES)
    raw = np.full(NUM_DRAWS, 100.0)
    volumes, _, _ = calibrated_draws(raw, None, calibration, seed=5, contour_empty=False)
    lower, upper = np.quantile(volumes, [0.025, 0.975])
    largest = max(e["manual_ml"] for e in ENTRIES)
    assert 0 < lower < 100.0 < upper < 10 * largest


def test_a_prior_of_the_old_format_is_refused_in_one_line(tmp_path):
    from vbseg.cohort.population import resolve_prior

    record = resolve_prior("sarcoma").to_dict()
    record["format"] = "vbseg-population-prior/1"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match="old.json: .*written by another vbseg: learn it again"):
        load_prior(path)
    record["format"] = "vbseg-population-prior/2"
    record["volume_calibration"] = {"log_ratio_mean": 0.6, "log_ratio_sd": 3.4, "n": 15}
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match="old.json: not a valid population prior .*learn the prior again"):
        load_prior(path)
