"""Scores of a probabilistic segmentation against a binary truth.

All functions take NumPy arrays on one grid and an optional ``voi`` (volume of interest)
mask: the voxels over which voxel-wise scores are averaged (DESIGN.md: the ROI or box; for
phantoms the whole crop). Truth is the binary voxel-centre mask.
"""

from __future__ import annotations

import warnings

import numpy as np
from surface_distance import metrics as sd

ECE_BINS = 15


def _select(array, voi):
    array = np.asarray(array)
    return array.ravel() if voi is None else array[np.asarray(voi, bool)]


def dice(mask, truth) -> float:
    """Dice overlap 2|A ∩ B| / (|A| + |B|); 1.0 when both are empty."""
    a, b = np.asarray(mask, bool), np.asarray(truth, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def volume_error(estimate_ml: float, true_ml: float) -> float:
    """Relative volume error (estimate - truth) / truth."""
    return float((estimate_ml - true_ml) / true_ml)


def brier_score(probability, truth, voi=None) -> float:
    """Mean squared difference between P(tumour) and the binary truth over the VOI."""
    p = _select(probability, voi).astype(np.float64)
    t = _select(truth, voi).astype(np.float64)
    return float(np.mean((p - t) ** 2))


def reliability(probability, truth, voi=None, num_bins: int = ECE_BINS):
    """Reliability diagram data over equal-width bins of predicted probability.

    Returns (bin_edges (B+1,), mean predicted (B,), observed frequency (B,), counts (B,)); empty
    bins hold NaN. ``truth`` may be binary or a fraction (reliability against the partial-volume
    fraction).
    """
    p = _select(probability, voi).astype(np.float64)
    t = _select(truth, voi).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=False), 0, num_bins - 1)
    counts = np.bincount(index, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(index, weights=p, minlength=num_bins) / counts
        observed = np.bincount(index, weights=t, minlength=num_bins) / counts
    return edges, predicted, observed, counts


def reliability_sums(probability, truth, voi=None, num_bins: int = ECE_BINS) -> dict:
    """Per-bin sums behind a reliability diagram, poolable across runs by adding them.

    Returns {"counts", "predicted_sum", "observed_sum"} (lists of length ``num_bins``, equal-width
    bins of predicted probability as in :func:`reliability`); pooled mean predicted and observed
    frequency are the summed sums over the summed counts.
    """
    _, predicted, observed, counts = reliability(probability, truth, voi, num_bins)
    return {"counts": counts.astype(int).tolist(),
            "predicted_sum": np.nan_to_num(predicted * counts).tolist(),
            "observed_sum": np.nan_to_num(observed * counts).tolist()}


def pooled_reliability(sums: list[dict]):
    """(mean predicted (B,), observed frequency (B,), counts (B,)) of several runs' sums pooled."""
    counts = np.sum([s["counts"] for s in sums], axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.sum([s["predicted_sum"] for s in sums], axis=0) / counts
        observed = np.sum([s["observed_sum"] for s in sums], axis=0) / counts
    return predicted, observed, counts


def expected_calibration_error(probability, truth, voi=None, num_bins: int = ECE_BINS) -> float:
    """ECE = sum_b (n_b / n) |mean predicted_b - observed frequency_b| over 15 equal-width bins.

    Bins are [0, 1/15), ..., [14/15, 1] (p = 1 falls in the last bin).
    """
    _, predicted, observed, counts = reliability(probability, truth, voi, num_bins)
    return calibration_error_of_bins(predicted, observed, counts)


def calibration_error_of_bins(predicted, observed, counts) -> float:
    """ECE of a (possibly pooled) reliability curve: count-weighted mean |predicted - observed|."""
    counts = np.asarray(counts, np.float64)
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(np.asarray(predicted)[filled]
                                                 - np.asarray(observed)[filled])) / counts.sum())


def voi_diagonal_mm(voi, spacing_mm) -> float:
    """The diagonal (mm) of the bounding box of ``voi`` (a bool mask; None or empty: the whole
    grid cannot be named, so NaN): the HD95 an empty contour is given when the truth is not
    empty (a contour that found nothing is as far from the lesion as the VOI allows)."""
    if voi is None or not np.any(voi):
        return float("nan")
    index = np.nonzero(voi)
    extent = np.array([int(i.max()) - int(i.min()) + 1 for i in index], float)
    return float(np.linalg.norm(extent * np.asarray(spacing_mm, float)))


def surface_metrics(mask, truth, spacing_mm, tolerance_mm: float = 2.0, more_tolerances_mm=()) -> dict:
    """Surface distances between two masks, with DeepMind's ``surface-distance`` library.

    Surfaces are made of surface elements (surfels) weighted by their area; distances are from
    each surfel of one surface to the nearest surfel of the other, in mm (Nikolov et al. 2021,
    "Clinically applicable segmentation of head and neck anatomy for radiotherapy", JMIR 23:e26151,
    for surface Dice). Returns:

    * ``hd95_mm``: the robust Hausdorff distance, the larger of the two directed 95th
      percentiles of the surfel-weighted distances;
    * ``asd_mm``: the average surface distance, the mean of the two directed surfel-weighted
      mean distances;
    * ``sdice``: surface Dice at ``tolerance_mm``: the fraction of both surfaces' area lying
      within the tolerance of the other surface; ``sdice_<t>mm`` the same at each tolerance t
      of ``more_tolerances_mm`` (e.g. ``sdice_5mm``).

    Empty masks give NaN distances (and surface Dice 0 unless both are empty). The library
    (0.1, 2024) still calls ``scipy.ndimage.filters``, deprecated in SciPy; its warning is
    silenced here, and SciPy 2 removing that namespace would need a patch or a replacement.
    """
    a, b = np.asarray(mask, bool), np.asarray(truth, bool)
    if not a.any() or not b.any():
        agree = 1.0 if not a.any() and not b.any() else 0.0  # both empty: the surfaces agree
        return {"hd95_mm": float("nan"), "asd_mm": float("nan"), "sdice": agree,
                **{f"sdice_{t:g}mm": agree for t in more_tolerances_mm}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="surface_distance")
        distances = sd.compute_surface_distances(b, a, tuple(float(s) for s in spacing_mm))
    to_truth, to_mask = sd.compute_average_surface_distance(distances)
    return {
        "hd95_mm": float(sd.compute_robust_hausdorff(distances, 95)),
        "asd_mm": float(0.5 * (to_truth + to_mask)),
        "sdice": float(sd.compute_surface_dice_at_tolerance(distances, tolerance_mm)),
        **{f"sdice_{t:g}mm": float(sd.compute_surface_dice_at_tolerance(distances, t))
           for t in more_tolerances_mm},
    }


def interval_score(lower: float, upper: float, truth: float, level: float = 0.95) -> float:
    """Interval (Winkler) score of a central interval at ``level``: its width plus 2 / alpha
    times the distance by which it misses the truth (Gneiting & Raftery 2007, JASA 102:359),
    so a wide interval does not win by covering."""
    alpha = 1.0 - level
    return float((upper - lower) + (2.0 / alpha) * (max(lower - truth, 0.0) + max(truth - upper, 0.0)))


def crps_from_draws(draws, truth: float) -> float:
    """Continuous ranked probability score of a distribution given by draws:
    E|X - y| - E|X - X'| / 2 (Gneiting & Raftery 2007), from the sorted draws in O(n log n)."""
    x = np.sort(np.asarray(draws, np.float64).ravel())
    n = x.size
    first = np.mean(np.abs(x - truth))
    # E|X - X'| = 2 / n^2 sum_i (2 i - n - 1) x_(i), i = 1..n
    second = 2.0 / n**2 * np.sum((2 * np.arange(1, n + 1) - n - 1) * x)
    return float(first - 0.5 * second)


def bootstrap_mean_ci(values, *, level: float = 0.95, num_resamples: int = 5000, seed: int = 0,
                      paired_with=None) -> dict:
    """Mean of ``values`` (or of the paired differences ``values - paired_with``, case by case)
    with a percentile bootstrap confidence interval (Efron & Tibshirani 1993, ch. 13): cases are
    resampled with replacement ``num_resamples`` times. NaNs (failed runs) drop out pairwise."""
    a = np.asarray(values, np.float64)
    if paired_with is not None:
        a = a - np.asarray(paired_with, np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"mean": float("nan"), "lower": float("nan"), "upper": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(num_resamples, a.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return {"mean": float(a.mean()), "lower": float(np.percentile(means, tail)),
            "upper": float(np.percentile(means, 100 - tail)), "n": int(a.size)}
