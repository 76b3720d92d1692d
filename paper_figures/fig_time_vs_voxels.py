"""Fit time against the number of voxels, per model and baseline (log-log).

Reads benchmarks/results/bench_speed.json (``python -m benchmarks.bench_speed``, also run by
``python -m benchmarks.run``): solid lines are the median fit time over repeats, dashed lines
the JAX compile time (paid once per grid shape), for the methods that compile.
Regenerate: python -m paper_figures.fig_time_vs_voxels (from the repository root)
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from paper_figures.common import figure_arguments, read_json, save, style

LABELS = {"potts_psf": "potts + PSF 6 mm"}


def draw(speed: dict):
    rows = speed["rows"]
    figure, ax = plt.subplots(figsize=(8.0, 4.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        label = LABELS.get(method, method)
        colour, marker = style(label)
        chosen = sorted((r for r in rows if r["method"] == method), key=lambda r: r["voxels"])
        voxels = np.array([r["voxels"] for r in chosen])
        run_s = np.maximum([r["run_s"] for r in chosen], 1e-4)  # a 0.0 s threshold stays on the axis
        ax.plot(voxels, run_s, color=colour, marker=marker, label=label)
        compile_s = np.array([r["compile_s"] for r in chosen])
        if np.any(compile_s > 0):
            ax.plot(voxels, compile_s, color=colour, ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("voxels")
    ax.set_ylabel("seconds (solid: fit, median; dashed: compile)")
    ax.set_title(f"Fit time vs grid size ({speed['machine']['cpus']} CPU cores, "
                 f"{speed['machine']['backend']})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: no line hidden
    figure.tight_layout()
    return figure


def main(argv=None):
    results, out, _ = figure_arguments(__doc__, argv)
    speed = read_json(results / "bench_speed.json", "python -m benchmarks.bench_speed")
    return save(draw(speed), out, "time_vs_voxels")


if __name__ == "__main__":
    main()
