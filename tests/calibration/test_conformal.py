"""Conformal calibration (vbseg.calibration.conformal) against exact answers: the rank rule, coverage over
many random splits against the Beta-binomial law it must follow, risk control's mean loss on a
synthetic problem, the margin score on a grid with known distances, and every refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from vbseg.calibration.conformal import (
    MIN_STRATUM_CASES,
    bin_label,
    conformal_quantile,
    conformal_rank,
    conformal_volume_interval,
    dilate_by,
    fnr_curves,
    margin_counts,
    margin_score,
    mondrian_groups,
    mondrian_quantiles,
    risk_control_lambda,
    risk_control_margin,
    split_coverage_band,
    threshold_counts,
    volume_scores,
)
from vbseg.errors import InputError


def test_rank_rule_and_refusal():
    assert conformal_rank(19, 0.05) == 19
    assert conformal_rank(99, 0.1) == 90
    assert conformal_rank(9, 0.1) == 9
    with pytest.raises(InputError, match="18 cases cannot calibrate level 0.95: that needs at least 19"):
        conformal_rank(18, 0.05)
    assert conformal_quantile([5.0, 1.0, 3.0, 2.0, 4.0] * 4, 0.1) == 5.0  # k = ceil(21 x 0.9) = 19


def _intervals(rng, count):
    """Model intervals that miss in both directions: log L = log V + a - w, log U = log V + a + w."""
    volume = np.exp(rng.normal(3.0, 1.0, count))
    shift, width = rng.normal(0.0, 0.3, count), rng.uniform(0.02, 0.2, count)
    return volume * np.exp(shift - width), volume * np.exp(shift + width), volume


def test_volume_coverage_over_random_splits_follows_the_beta_binomial_law():
    """Given the calibration set, coverage is Beta(k, n + 1 - k) (continuous scores), so the
    count covered among m test cases is Beta-binomial(m, k, n + 1 - k): its mean over 400 splits
    must be within 4 standard errors of m k/(n+1) and its variance within 25 % of the law's."""
    rng = np.random.default_rng(0)
    n, m, alpha, splits = 39, 50, 0.1, 400
    k = conformal_rank(n, alpha)
    law = stats.betabinom(m, k, n + 1 - k)
    counts = []
    for _ in range(splits):
        lower, upper, volume = _intervals(rng, n + m)
        scores = volume_scores(lower[:n], upper[:n], volume[:n], 1e-3)
        q = conformal_quantile(scores, alpha)
        covered = [lo <= v <= hi for lo, hi, v in
                   (conformal_volume_interval(a, b, q, 1e-3) + (c,)
                    for a, b, c in zip(lower[n:], upper[n:], volume[n:]))]
        counts.append(sum(covered))
    counts = np.asarray(counts, float)
    assert abs(counts.mean() - law.mean()) <= 4 * math.sqrt(law.var() / splits)
    assert abs(counts.var() / law.var() - 1) <= 0.25
    assert law.mean() / m == pytest.approx(k / (n + 1))  # 36/40 = 0.9


def test_volume_scores_are_negative_inside_and_floored():
    scores = volume_scores([8.0, 8.0, 0.0], [12.0, 9.0, 0.0], [10.0, 10.0, 0.5], floor_ml=0.5)
    assert scores[0] == pytest.approx(max(math.log(0.8), math.log(10 / 12)))  # inside: < 0
    assert scores[1] == pytest.approx(math.log(10 / 9))
    assert scores[2] == 0.0  # an empty interval at a one-voxel truth: both floored to one voxel
    lower, upper = conformal_volume_interval(8.0, 12.0, math.log(2.0), 0.5)
    assert (lower, upper) == pytest.approx((4.0, 24.0))
    # an over-covering model (q < 0) and a narrow interval: the empty set becomes sqrt(L U)
    assert conformal_volume_interval(10.0, 11.0, -0.3, 0.5) == pytest.approx((math.sqrt(110),) * 2)
    assert conformal_volume_interval(10.0, 20.0, -0.1, 0.5) == pytest.approx(
        (10 * math.exp(0.1), 20 * math.exp(-0.1)))


def test_fnr_curves_count_missed_true_voxels():
    probability = np.array([0.95, 0.6, 0.3, 0.05, 0.9])
    truth = np.array([True, True, True, False, False])
    curves = fnr_curves([probability], [truth], [0.0, 0.06, 0.41, 0.71, 1.0])
    # contour {p >= 1 - lambda}: lambda 0.06 -> {0.95, 0.9}; 0.41 -> adds 0.6; 0.71 -> adds 0.3
    np.testing.assert_allclose(curves[0], [1.0, 2 / 3, 1 / 3, 0.0, 0.0])


def test_threshold_counts_count_missed_voxels_and_the_contour():
    probability = np.array([[0.95, 0.6], [0.3, 0.05], [0.9, 0.0]])
    truth = np.array([[True, True], [True, False], [False, False]])
    missed, contour = threshold_counts(probability, truth, [0.0, 0.06, 0.11, 0.41, 0.71, 0.96, 1.0])
    # contour {p >= 1 - lambda} over every voxel: none at lambda 0 (no p is 1), {0.95} at 0.06,
    # + 0.9 at 0.11, + 0.6 at 0.41, + 0.3 at 0.71, + 0.05 at 0.96, all six at 1; of the three true
    # voxels (0.95, 0.6, 0.3) the contour misses 3, 2, 2, 1, 0, 0, 0
    np.testing.assert_array_equal(contour, [0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(missed, [3, 2, 2, 1, 0, 0, 0])
    with pytest.raises(InputError, match="empty truth"):
        threshold_counts(probability, np.zeros_like(truth), [0.5])


def test_margin_counts_follow_the_dilations_written():
    """On a 1 x 1 x 12 row with 2 mm voxels, the 50 % contour at voxel 0, the truth voxels 0-3:
    dilating by d mm reaches voxel floor(d / 2) (dilate_by, checked), so at 0, 1, 2, 5 and 6 mm
    the contour misses 3, 3, 2, 1, 0 true voxels and holds 1, 1, 2, 3, 4 voxels; the last member
    is the whole row (0 missed, 12 voxels); an empty contour dilates to nothing."""
    contour = np.zeros((1, 1, 12), bool)
    contour[0, 0, 0] = True
    truth = np.zeros_like(contour)
    truth[0, 0, :4] = True
    grid, spacing = [0.0, 1.0, 2.0, 5.0, 6.0], (1.0, 1.0, 2.0)
    missed, size = margin_counts(contour, truth, spacing, grid)
    np.testing.assert_array_equal(missed, [3, 3, 2, 1, 0, 0])
    np.testing.assert_array_equal(size, [1, 1, 2, 3, 4, 12])
    for d, expected in zip(grid, size):
        assert dilate_by(contour, d, spacing).sum() == expected
    missed, size = margin_counts(np.zeros_like(contour), truth, spacing, grid)
    np.testing.assert_array_equal(missed, [4, 4, 4, 4, 4, 0])
    np.testing.assert_array_equal(size, [0, 0, 0, 0, 0, 12])


def test_risk_control_margin_picks_the_smallest_dilation():
    """Losses over 3 distances and the whole map: 19 cases with FNR 1, 0.5, 0.04, 0 and one with
    1, 1, 1, 0: at alpha 0.1 the adjusted risk 20/21 mean + 1/21 is 1, 0.55, 0.13, 0.05 -> the whole
    map (inf); at alpha 0.2 the 4 mm member (index 2: 20/21 x 0.088 + 1/21 = 0.131)."""
    losses = np.array([[1.0, 0.5, 0.04, 0.0]] * 19 + [[1.0, 1.0, 1.0, 0.0]])
    assert risk_control_margin(losses, [0.0, 2.0, 4.0], 0.1) == math.inf
    assert risk_control_margin(losses, [0.0, 2.0, 4.0], 0.2) == 4.0


def test_risk_control_bounds_the_mean_false_negative_rate():
    """Each case's truth voxels have P ~ Beta(a_i, 1) with a case-level a_i: the mean FNR of new
    cases at the chosen lambda stays <= alpha (4 standard errors), and the chosen lambda is the
    exact minimiser of the adjusted-risk rule on the grid."""
    rng = np.random.default_rng(1)
    lambdas = np.linspace(0.0, 1.0, 201)

    def cases(count):
        return [rng.beta(rng.uniform(0.5, 3.0), 1.0, size=rng.integers(20, 200)) for _ in range(count)]

    alpha, n = 0.1, 60
    calibration = cases(n)
    losses = fnr_curves(calibration, [np.ones(p.size, bool) for p in calibration], lambdas)
    chosen = risk_control_lambda(losses, lambdas, alpha)
    adjusted = n / (n + 1) * losses.mean(axis=0) + 1 / (n + 1)
    assert chosen == lambdas[np.argmax(adjusted <= alpha)]
    means = []
    for _ in range(300):  # new calibration sets and new cases: the guarantee is over both
        calibration = cases(n)
        losses = fnr_curves(calibration, [np.ones(p.size, bool) for p in calibration], lambdas)
        chosen = risk_control_lambda(losses, lambdas, alpha)
        new = cases(1)[0]
        means.append(np.mean(new < 1.0 - chosen))
    means = np.asarray(means)
    assert means.mean() <= alpha + 4 * means.std() / math.sqrt(means.size)
    assert means.mean() >= alpha - 0.05  # not vacuous: it spends most of its budget
    with pytest.raises(InputError, match="8 cases cannot control the risk at 0.1"):
        risk_control_lambda(losses[:8], lambdas, 0.1)
    # n = 9 is enough for alpha = 1 - 0.9 (0.09999999999999998 in floating point): B/(n+1) = 0.1
    zero = np.zeros((9, lambdas.size))
    assert risk_control_lambda(zero, lambdas, 1 - 0.9) == 0.0


def test_margin_score_on_an_anisotropic_grid():
    contour = np.zeros((10, 3, 3), bool)
    contour[0:3, 1, 1] = True
    truth = np.zeros_like(contour)
    truth[0:6, 1, 1] = True
    truth[2, 1, 2] = True  # one voxel 3 mm off the axis along the second spacing
    spacing = (2.0, 1.0, 3.0)
    assert margin_score(contour, truth, spacing) == pytest.approx(6.0)  # voxel 5 to voxel 2: 3 x 2 mm
    assert dilate_by(contour, 6.0, spacing)[truth].all()
    assert not dilate_by(contour, 5.9, spacing)[truth].all()
    assert margin_score(contour, contour, spacing) == 0.0
    assert margin_score(np.zeros_like(contour), truth, spacing) == math.inf
    assert dilate_by(np.zeros_like(contour), math.inf, spacing).all()  # an infinite margin: everything
    assert dilate_by(contour, math.inf, spacing).all()


def test_mondrian_strata_each_need_enough_cases():
    scores = np.arange(40, dtype=float)
    strata = np.array(["small"] * 20 + ["large"] * 20)
    result = mondrian_quantiles(scores, strata, 0.05)
    assert result["small"] == {"quantile": 19.0, "n": 20} and result["large"] == {"quantile": 39.0, "n": 20}
    strata[:2] = "large"
    with pytest.raises(InputError, match=f"stratum 'small' has 18 cases; each needs >= {MIN_STRATUM_CASES}"):
        mondrian_quantiles(scores, strata, 0.05)


def test_bin_labels_are_half_open():
    edges = (5.0, 50.0)
    assert bin_label(4.999, edges, "volume", " mL") == "volume <5 mL"
    assert bin_label(5.0, edges, "volume", " mL") == "volume 5-50 mL"
    assert bin_label(49.9, edges, "volume", " mL") == "volume 5-50 mL"
    assert bin_label(50.0, edges, "volume", " mL") == "volume >=50 mL"
    assert bin_label(-3.0, (10,), "CNR") == "CNR <10" and bin_label(10.0, (10,), "CNR") == "CNR >=10"


def test_mondrian_coverage_per_stratum_follows_the_beta_binomial_law():
    """Two strata whose scores differ in scale (exchangeable within each, not across): over 300
    splits with fresh cases, each stratum's covered count is a sum of independent
    Beta-binomial(m, k, n + 1 - k) counts (k = ceil((n + 1) 0.9) of that stratum's n), so the
    total must lie inside the exact central 99 % band of that sum. Pooled (non-Mondrian)
    calibration of the same splits under-covers the wide stratum: outside its band."""
    rng = np.random.default_rng(7)
    alpha, splits = 0.1, 300
    sizes = {"volume <5 mL": (19, 20, 1.0), "volume >=5 mL": (29, 20, 0.1)}  # n, m, score scale
    covered = {name: 0 for name in sizes}
    pooled_covered = dict(covered)
    for _ in range(splits):
        features, scores = [], []
        for name, (n, m, scale) in sizes.items():
            low, high = (0.5, 5.0) if name.endswith("<5 mL") else (5.0, 60.0)
            features.append(rng.uniform(low, high, n + m))
            scores.append(np.abs(rng.normal(0.0, scale, n + m)))
        labels = [[bin_label(x, (5.0,), "volume", " mL") for x in group] for group in features]
        assert [set(group) for group in labels] == [{name} for name in sizes]
        calibration_strata = np.concatenate([group[:n] for group, (n, _, _) in zip(labels, sizes.values())])
        calibration_scores = np.concatenate([s[:n] for s, (n, _, _) in zip(scores, sizes.values())])
        quantiles = mondrian_quantiles(calibration_scores, calibration_strata, alpha)
        pooled = conformal_quantile(calibration_scores, alpha)
        for name, s, (n, _, _) in zip(sizes, scores, sizes.values()):
            assert quantiles[name]["n"] == n
            covered[name] += int(np.sum(s[n:] <= quantiles[name]["quantile"]))
            pooled_covered[name] += int(np.sum(s[n:] <= pooled))
    for name, (n, m, _) in sizes.items():
        low, high = split_coverage_band(n, m, alpha, splits)
        assert low <= covered[name] <= high, (name, covered[name], low, high)
    assert pooled_covered["volume <5 mL"] < split_coverage_band(19, 20, alpha, splits)[0]


def test_split_coverage_band_is_the_exact_beta_binomial_band():
    """One split: the band is the Beta-binomial's own quantiles; 400 splits: a normal
    approximation of the sum (mean 400 m k/(n+1), sd 37) agrees within 3 counts at each end (the
    sum is skewed left, coverage being near 1: both ends sit about 2 counts above the normal)."""
    k = conformal_rank(19, 0.1)  # 18
    law = stats.betabinom(20, k, 20 - k)
    assert split_coverage_band(19, 20, 0.1, 1) == (law.ppf(0.005), law.ppf(0.995))
    low, high = split_coverage_band(19, 20, 0.1, 400)
    mean, sd = 400 * law.mean(), math.sqrt(400 * law.var())
    assert abs(low - (mean - 2.5758 * sd)) <= 3 and abs(high - (mean + 2.5758 * sd)) <= 3
    with pytest.raises(InputError, match="18 cases cannot calibrate level 0.95"):
        split_coverage_band(18, 5, 0.05, 10)


def test_mondrian_groups_refuse_a_small_stratum():
    groups = mondrian_groups(["a"] * 19 + ["b"] * 25)
    assert list(groups) == ["a", "b"] and groups["a"].size == 19 and groups["b"][0] == 19
    with pytest.raises(InputError, match="stratum 'b' has 18 cases; each needs >= 19"):
        mondrian_groups(["a"] * 19 + ["b"] * 18)
