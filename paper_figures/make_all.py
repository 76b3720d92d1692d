"""Regenerate every paper figure from the benchmark results (PNG and PDF in paper_figures/output).

    python -m benchmarks.run            # the results the figures read (about 25 minutes)
    python paper_figures/make_all.py    # the figures (seconds)

``--quick`` reads the results of ``python -m benchmarks.run --quick`` instead (a smoke test);
``--results`` and ``--out`` move the folders. A figure whose results are missing is reported
with the command that makes them, and the others are still drawn; the exit status is 1 then.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paper_figures import (  # noqa: E402
    fig_contours_real,
    fig_dice_vs_size,
    fig_reliability,
    fig_time_vs_voxels,
    fig_volume_intervals,
)
from paper_figures.common import MissingResults  # noqa: E402

FIGURES = (fig_contours_real, fig_reliability, fig_volume_intervals, fig_dice_vs_size, fig_time_vs_voxels)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    missing = 0
    for module in FIGURES:
        try:
            paths = module.main(argv)
        except MissingResults as error:
            print(f"{module.__name__}: {error}", file=sys.stderr)
            missing += 1
            continue
        print(f"{module.__name__}: " + ", ".join(str(p) for p in paths))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
