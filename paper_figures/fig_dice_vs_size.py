"""Dice of the 50 % contour against sphere diameter, per method and contrast (FLAB-style figure).

Reads benchmarks/results/experiments/methods_phantoms/records.json (written by
``python -m benchmarks.run``); each point is the mean over the noise draws, bars span their
range. Regenerate: python -m paper_figures.fig_dice_vs_size (from the repository root)
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from paper_figures.common import figure_arguments, method_label, records, save, style


def draw(rows: list[dict]):
    contrasts = sorted({r["case_spec"]["spec"]["contrast"] for r in rows})
    methods = list(dict.fromkeys(method_label(r) for r in rows))
    figure, axes = plt.subplots(1, len(contrasts), figsize=(4.2 * len(contrasts), 4.0), sharey=True,
                                squeeze=False)
    for ax, contrast in zip(axes[0], contrasts):
        for method in methods:
            colour, marker = style(method)
            by_size = {}
            for r in rows:
                spec = r["case_spec"]["spec"]
                if method_label(r) == method and spec["contrast"] == contrast:
                    by_size.setdefault(spec["diameters_mm"], []).append(r["dice50"])
            sizes = sorted(by_size)
            mean = np.array([np.mean(by_size[d]) for d in sizes])
            low = mean - np.array([np.min(by_size[d]) for d in sizes])
            high = np.array([np.max(by_size[d]) for d in sizes]) - mean
            ax.errorbar(sizes, mean, yerr=[low, high], color=colour, marker=marker, ms=5,
                        lw=1.2, capsize=2, label=method)
        ax.set_title(f"contrast {contrast:g}:1")
        ax.set_xlabel("sphere diameter (mm)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("Dice of the 50 % contour")
    axes[0, -1].legend(fontsize=7, loc="lower right")
    figure.suptitle("Phantom spheres: Dice against size (mean over noise draws, bars: range)")
    figure.tight_layout()
    return figure


def main(argv=None):
    results, out, experiments = figure_arguments(__doc__, argv)
    return save(draw(records(results, experiments["phantoms"])), out, "dice_vs_size")


if __name__ == "__main__":
    main()
