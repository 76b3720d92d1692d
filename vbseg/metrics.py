"""Scores of a probabilistic segmentation against a binary truth.

All functions take NumPy arrays on one grid and an optional ``voi`` (volume of interest)
mask: the voxels over which voxel-wise scores are averaged (DESIGN.md: the ROI or box; for
phantoms the whole crop). Truth is the binary voxel-centre mask.
"""

from __future__ import annotations

import numpy as np

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


def expected_calibration_error(probability, truth, voi=None, num_bins: int = ECE_BINS) -> float:
    """ECE = sum_b (n_b / n) |mean predicted_b - observed frequency_b| over 15 equal-width bins.

    Bins are [0, 1/15), ..., [14/15, 1] (p = 1 falls in the last bin).
    """
    _, predicted, observed, counts = reliability(probability, truth, voi, num_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(predicted[filled] - observed[filled])) / counts.sum())
