"""Distribution-free calibration of a model's outputs over exchangeable calibration cases.

A model's own volume interval need not cover (the PSF model's 95 % interval covered the
phantom volume in 41 of 216 draws). Conformal methods turn any model into one whose outputs
carry a finite-sample guarantee, provided the calibration cases and the new case are
exchangeable (same population, same model and settings). Three quantities:

* **Volume interval** (split conformal; Vovk, Gammerman & Shafer 2005; Lei et al., JASA 2018).
  Each calibration case i has the model's interval [L_i, U_i] and the true volume V_i; its
  score is the log-scale distance by which the interval misses,
  s_i = max(log L_i - log V_i, log V_i - log U_i) (negative when V_i lies inside), volumes
  floored at one voxel. With q the k-th smallest score, k = ceil((n + 1)(1 - alpha)), the
  interval [L e^-q, U e^q] of a new case covers its volume with probability >= 1 - alpha
  (and < 1 - alpha + 1 / (n + 1) when scores are continuous). k > n (n < 1/alpha - 1) gives
  no finite interval: refused.
* **Contour with a false-negative-rate guarantee** (conformal risk control, Angelopoulos,
  Bates, Fisch, Lei & Schuster, ICLR 2024; with probability contours as in Zhang & Ray, COPA
  2024). The contour C(lambda) = {p >= 1 - lambda} grows with lambda, and the loss
  FNR_i(lambda) = |truth_i minus C(lambda)| / |truth_i| shrinks, bounded by B = 1. The chosen
  lambda = inf{lambda : n/(n+1) mean_i FNR_i(lambda) + B/(n+1) <= alpha} gives
  E[FNR] <= alpha for a new case. It needs B/(n+1) <= alpha, i.e. n >= 1/alpha - 1.
  The same rule over a second nested family, the 50 % contour dilated by d mm (then the whole
  map), controls the FNR with a margin instead of a probability level: a mean-field map is
  nearly binary, so {p >= 1 - lambda} jumps from the 50 % contour to most of the map within a
  few grid steps, while the dilation grows the contour by mm (both are measured, with their
  stretch |C| / |truth| against the oracle's, in ``benchmarks/bench_conformal.py``).
* **Calibrated margin** (Mossina & Friedrich, MICCAI 2025): the score of case i is the
  largest distance (mm, Euclidean on the anisotropic grid) from a true voxel to the model's
  50 % contour; dilating a new case's contour by the split-conformal quantile of those scores
  contains the whole lesion with probability >= 1 - alpha.

Mondrian (stratified) calibration applies each rule within strata defined by quantities known
at test time, each stratum needing enough cases on its own (:data:`MIN_STRATUM_CASES`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, stats

from vbseg.errors import InputError

# A stratum of a Mondrian calibration needs this many cases: with 19 the 95 % split-conformal
# quantile is the largest score (k = ceil(20 x 0.95) = 19), the smallest n with a finite one.
MIN_STRATUM_CASES = 19


def conformal_rank(n: int, alpha: float) -> int:
    """k = ceil((n + 1)(1 - alpha)): the rank of the calibration score that bounds a new one
    with probability >= 1 - alpha. InputError when k > n (too few cases for the level)."""
    if not 0.0 < alpha < 1.0:
        raise InputError("--conformal-levels", f"each level must be in (0, 100) percent, got {1 - alpha:g}")
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    if k > n:
        raise InputError("calibration", f"{n} cases cannot calibrate level {1 - alpha:.3g}: that "
                                        f"needs at least {math.ceil(1.0 / alpha - 1.0 - 1e-9)}")
    return k


def conformal_quantile(scores, alpha: float) -> float:
    """The k-th smallest of ``scores`` (k of :func:`conformal_rank`)."""
    scores = np.sort(np.asarray(scores, np.float64))
    return float(scores[conformal_rank(scores.size, alpha) - 1])


def split_coverage_band(n: int, m: int, alpha: float, splits: int, mass: float = 0.99) -> tuple[int, int]:
    """The central ``mass`` band of the number of test cases covered, summed over ``splits``
    independent random splits into n calibration and m test cases. In each split the count is
    Beta-binomial(m, k, n + 1 - k) with k = :func:`conformal_rank` (n, alpha): exact for
    exchangeable scores without ties, and, for random splits of one fixed set of distinct
    scores, exact given that set (the test case's rank among the n + 1 is uniform; Vovk,
    "Conditional validity of inductive conformal predictors", ACML 2012); ties only add
    coverage. The splits' counts are then independent, so the sum's law is their convolution."""
    k = conformal_rank(n, alpha)
    pmf = stats.betabinom(m, k, n + 1 - k).pmf(np.arange(m + 1))
    total = np.ones(1)
    for _ in range(splits):
        total = np.convolve(total, pmf)
    cdf = np.cumsum(total)
    tail = (1.0 - mass) / 2.0
    return int(np.searchsorted(cdf, tail - 1e-12)), int(np.searchsorted(cdf, 1.0 - tail - 1e-12))


def volume_scores(lower_ml, upper_ml, true_ml, floor_ml: float | np.ndarray) -> np.ndarray:
    """s_i = max(log L_i - log V_i, log V_i - log U_i), each volume floored at ``floor_ml`` (one
    voxel, per case or shared) before the log: the log-scale miss of each model interval."""
    floor = np.asarray(floor_ml, np.float64)
    log_lower = np.log(np.maximum(np.asarray(lower_ml, np.float64), floor))
    log_upper = np.log(np.maximum(np.asarray(upper_ml, np.float64), floor))
    log_true = np.log(np.maximum(np.asarray(true_ml, np.float64), floor))
    return np.maximum(log_lower - log_true, log_true - log_upper)


def conformal_volume_interval(lower_ml: float, upper_ml: float, quantile: float,
                              floor_ml: float) -> tuple[float, float]:
    """[L e^-q, U e^q] with L and U floored at ``floor_ml`` (the inverse of :func:`volume_scores`).

    With q < 0 (a model that over-covers) and a narrow model interval, the exact conformal set
    {V : s(V) <= q} is empty (L e^-q > U e^q); it is then reported as the single point
    sqrt(L U), the geometric middle, which can only add coverage."""
    lower, upper = max(lower_ml, floor_ml), max(upper_ml, floor_ml)
    low, high = lower * math.exp(-quantile), upper * math.exp(quantile)
    if low > high:
        middle = math.sqrt(lower * upper)
        return middle, middle
    return low, high


def _nested_counts(score, truth, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(missed, contour) int arrays for the contours C(t) = {score >= t} at each of
    ``thresholds`` (decreasing thresholds give growing, nested contours): the true voxels
    outside C(t) and the voxels of C(t) over the whole map. InputError for an empty truth mask."""
    score, truth = np.asarray(score, np.float64), np.asarray(truth, bool)
    if not truth.any():
        raise InputError("calibration", "a calibration case has an empty truth mask (FNR undefined)")
    thresholds = np.asarray(thresholds, np.float64)
    missed = np.searchsorted(np.sort(score[truth]), thresholds, side="left")
    return missed, score.size - np.searchsorted(np.sort(score.ravel()), thresholds, side="left")


def threshold_counts(probability, truth, lambdas) -> tuple[np.ndarray, np.ndarray]:
    """(missed, contour) int arrays over the increasing grid ``lambdas``: the true voxels outside
    C(lambda) = {p >= 1 - lambda} (a true voxel with P = p is missed while p < 1 - lambda, the
    contour's own comparison), and the voxels of C(lambda) over the whole map (as
    ``contour_crc`` is written). FNR(lambda) = missed / |truth|; the contour's stretch (what a
    lower FNR costs) = contour / |truth|. InputError for an empty truth mask (FNR undefined)."""
    return _nested_counts(probability, truth, 1.0 - np.asarray(lambdas, np.float64))


def fnr_curves(probabilities, truths, lambdas) -> np.ndarray:
    """(n, L) FNR_i(lambda) = |truth_i minus {p_i >= 1 - lambda}| / |truth_i| for each case's
    probability map and (non-empty) truth mask, at each lambda of the increasing grid ``lambdas``."""
    return np.asarray([threshold_counts(probability, truth, lambdas)[0] / np.asarray(truth, bool).sum()
                       for probability, truth in zip(probabilities, truths)])


def margin_counts(contour, truth, spacing_mm, grid_mm) -> tuple[np.ndarray, np.ndarray]:
    """(missed, contour) int arrays over the dilation family of the 50 % contour: for each
    distance d of the increasing ``grid_mm``, C(d) = every voxel within d mm of ``contour``
    (:func:`dilate_by`: distance <= d, i.e. -distance >= -d), then, as the family's last member,
    the whole map (FNR 0). An empty contour dilates to nothing. Counted as
    :func:`threshold_counts` counts."""
    contour = np.asarray(contour, bool)
    distance = (ndimage.distance_transform_edt(~contour, sampling=spacing_mm) if contour.any()
                else np.full(contour.shape, np.inf))
    missed, inside = _nested_counts(-distance, truth, -(np.asarray(grid_mm, np.float64) + 1e-9))
    return np.append(missed, 0), np.append(inside, contour.size)


def risk_control_index(losses, alpha: float) -> int:
    """The index of the smallest member of a nested family that controls the risk, from the
    calibration ``losses`` (n, members) over the family (:func:`risk_control_lambda`)."""
    losses = np.asarray(losses, np.float64)
    return int(risk_control_lambda(losses, np.arange(losses.shape[1]), alpha))


def risk_control_margin(losses, grid_mm, alpha: float) -> float:
    """The smallest member of the dilation family (:func:`margin_counts`; ``losses`` (n, D + 1)
    over the D distances of ``grid_mm`` and the whole map) that controls the risk: its distance
    in mm, inf for the whole map."""
    index = risk_control_index(losses, alpha)
    return float(grid_mm[index]) if index < len(grid_mm) else math.inf


def risk_control_lambda(losses, lambdas, alpha: float, bound: float = 1.0) -> float:
    """The smallest lambda of the grid with n/(n+1) mean_i loss_i(lambda) + B/(n+1) <= alpha
    (``losses`` (n, L) non-increasing along the grid ``lambdas``; B = ``bound``). InputError
    when n < B/alpha - 1 (no lambda can qualify) or when even the largest lambda does not."""
    losses = np.asarray(losses, np.float64)
    n = losses.shape[0]
    if bound / (n + 1) > alpha + 1e-12:  # 1 - 0.9 is 0.09999999999999998 in floating point
        raise InputError("calibration", f"{n} cases cannot control the risk at {alpha:g}: that needs "
                                        f"at least {math.ceil(bound / alpha - 1.0 - 1e-9)}")
    adjusted = n / (n + 1) * losses.mean(axis=0) + bound / (n + 1)
    feasible = np.flatnonzero(adjusted <= alpha + 1e-12)
    if feasible.size == 0:
        raise InputError("calibration", f"no contour level controls the false-negative rate at {alpha:g}")
    return float(np.asarray(lambdas, np.float64)[feasible[0]])


def margin_score(contour, truth, spacing_mm) -> float:
    """The largest Euclidean distance (mm, anisotropic ``spacing_mm``) from a voxel of ``truth``
    to ``contour``: the smallest dilation of the contour that contains the truth. inf when the
    contour is empty and the truth is not; 0 when the contour already contains the truth."""
    contour, truth = np.asarray(contour, bool), np.asarray(truth, bool)
    if not truth.any():
        return 0.0
    if not contour.any():
        return math.inf
    distance = ndimage.distance_transform_edt(~contour, sampling=spacing_mm)
    return float(distance[truth].max())


def dilate_by(contour, margin_mm: float, spacing_mm) -> np.ndarray:
    """Every voxel within ``margin_mm`` (Euclidean, anisotropic) of ``contour``; the whole grid
    for an infinite margin (a calibration case whose contour was empty)."""
    contour = np.asarray(contour, bool)
    if math.isinf(margin_mm):
        return np.ones_like(contour)
    if not contour.any():
        return contour.copy()
    return ndimage.distance_transform_edt(~contour, sampling=spacing_mm) <= margin_mm + 1e-9


def bin_label(value: float, edges, name: str, unit: str = "") -> str:
    """The half-open bin of ``value`` among the increasing ``edges`` e_1 < ... < e_m, as text:
    "<name> <e_1<unit>", "<name> e_j-e_j+1<unit>" or "<name> >=e_m<unit>"."""
    edges = [float(edge) for edge in edges]
    position = int(np.searchsorted(edges, value, side="right"))
    if position == 0:
        return f"{name} <{edges[0]:g}{unit}"
    if position == len(edges):
        return f"{name} >={edges[-1]:g}{unit}"
    return f"{name} {edges[position - 1]:g}-{edges[position]:g}{unit}"


def strata_indices(strata) -> dict:
    """{stratum: indices of its cases}, strata sorted."""
    strata = np.asarray(strata)
    return {stratum: np.flatnonzero(strata == stratum) for stratum in sorted(set(strata.tolist()))}


def mondrian_groups(strata) -> dict:
    """:func:`strata_indices`; InputError naming the first stratum with fewer than
    MIN_STRATUM_CASES cases (Mondrian conformal prediction, Vovk, Gammerman & Shafer 2005, ch. 4:
    each stratum is calibrated by its own cases alone)."""
    groups = strata_indices(strata)
    for stratum, members in groups.items():
        if members.size < MIN_STRATUM_CASES:
            raise InputError("calibration", f"stratum {stratum!r} has {members.size} cases; each needs "
                                            f">= {MIN_STRATUM_CASES}")
    return groups


def mondrian_quantiles(scores, strata, alpha: float) -> dict:
    """{stratum: {"quantile", "n"}}: :func:`conformal_quantile` within each stratum of
    :func:`mondrian_groups` (a new case is scored against its own stratum's quantile, which
    gives coverage >= 1 - alpha conditional on the stratum)."""
    scores = np.asarray(scores, np.float64)
    return {stratum: {"quantile": conformal_quantile(scores[members], alpha), "n": int(members.size)}
            for stratum, members in mondrian_groups(strata).items()}
