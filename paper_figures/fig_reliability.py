"""Reliability diagrams per method: phantoms (against the exact partial-volume fraction) and the
real sarcomas (against the manual mask).

Reads the reliability-bin sums in benchmarks/results/experiments/{methods_phantoms,models}/
records.json (``python -m benchmarks.run``), pooled over runs: the mean predicted probability
of each of 15 equal-width bins against the observed frequency (or mean true fraction) of its
voxels; marker area grows with the bin's voxel count. A calibrated method lies on the
diagonal. Methods that output a 0/1 mask (thresholds, Otsu, k-means) fill only the end
bins and are drawn as markers alone.
Regenerate (from the repository root): python -m paper_figures.fig_reliability
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from paper_figures.common import MissingResults, figure_arguments, method_label, records, save, style
from vbseg.metrics import calibration_error_of_bins, pooled_reliability


def panel(ax, rows, key, title):
    for method in dict.fromkeys(method_label(r) for r in rows):
        predicted, observed, counts = pooled_reliability([r[key] for r in rows if method_label(r) == method])
        filled = counts > 0
        colour, marker = style(method)
        ece = calibration_error_of_bins(predicted, observed, counts)
        if filled.sum() > 2:  # a 0/1 mask fills only the end bins: markers, no line between
            ax.plot(predicted[filled], observed[filled], color=colour, lw=1, alpha=0.8)
        ax.scatter(predicted[filled], observed[filled], s=6 + 10 * np.log10(counts[filled]),
                   color=colour, marker=marker, label=f"{method} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
    ax.set_xlim(-0.02, 1.02)  # the end bins' markers sit at 0 and 1
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("predicted probability (bin mean)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, loc="upper left")
    ax.grid(alpha=0.3)


def draw(phantom_rows, real_rows):
    panels = [(phantom_rows, "reliability_fraction", "phantoms: vs partial-volume fraction")]
    if real_rows:
        panels.append((real_rows, "reliability", "sarcoma PET: vs manual GTV"))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5.5), squeeze=False)
    for ax, (rows, key, title) in zip(axes[0], panels):
        panel(ax, rows, key, title)
    axes[0, 0].set_ylabel("observed frequency / mean true fraction")
    figure.tight_layout()
    return figure


def main(argv=None):
    results, out, experiments = figure_arguments(__doc__, argv)
    try:
        real_rows = records(results, experiments["real"])
    except MissingResults as missing:  # without ../shared/data the real panel is left out
        print(f"reliability: real-case panel left out ({missing})")
        real_rows = []
    return save(draw(records(results, experiments["phantoms"]), real_rows), out, "reliability")


if __name__ == "__main__":
    main()
