"""95 % volume intervals against the true sphere volume, per model, on the phantom spheres.

Reads benchmarks/results/experiments/methods_phantoms/records.json (``python -m benchmarks.run``).
Each vertical bar is one noise draw's 95 % interval of the posterior volume, the dot its mean;
green bars cover the true volume, red ones miss it; the diagonal is the truth. Only methods
whose map is a probability (the hidden Potts fits and the probabilistic baselines) are shown;
threshold masks have zero-width intervals.
Regenerate (from the repository root): python -m paper_figures.fig_volume_intervals
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from paper_figures.common import figure_arguments, method_label, records, save

SHOWN = ("potts + PSF 6 mm", "potts", "gmm", "random_walker")


def draw(rows: list[dict]):
    methods = [m for m in dict.fromkeys(method_label(r) for r in rows) if m in SHOWN]
    figure, axes = plt.subplots(1, len(methods), figsize=(3.8 * len(methods), 4.0), squeeze=False)
    for ax, method in zip(axes[0], methods):
        chosen = [r for r in rows if method_label(r) == method]
        truth = np.array([r["vol_true_ml"] for r in chosen])
        # spread draws of one size sideways so their bars do not hide each other
        offsets = np.linspace(0.93, 1.07, 1 + max(1, len(chosen) // max(1, len(set(truth)))))
        for i, r in enumerate(chosen):
            x = r["vol_true_ml"] * offsets[i % len(offsets)]
            colour = "#2ca02c" if r["covered"] else "#d62728"
            ax.plot([x, x], [r["vol_lower_ml"], r["vol_upper_ml"]], color=colour, lw=1.5)
            ax.plot(x, r["vol_mean_ml"], ".", color="black", ms=3)
        span = np.array([truth.min() * 0.5, truth.max() * 2])
        ax.plot(span, span, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("true sphere volume (mL)")
        covered = sum(bool(r["covered"]) for r in chosen)
        ax.set_title(f"{method}\ncovers {covered}/{len(chosen)}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("posterior volume, 95 % interval (mL)")
    figure.suptitle("Phantom spheres: volume intervals (green covers the truth, red misses)")
    figure.tight_layout()
    return figure


def main(argv=None):
    results, out, experiments = figure_arguments(__doc__, argv)
    return save(draw(records(results, experiments["phantoms"])), out, "volume_intervals")


if __name__ == "__main__":
    main()
