"""What the figure scripts share: where results live, reading them, saving PNG + PDF.

Figures are drawn from result files only (``benchmarks/results``), never by re-running a fit;
a missing result file is reported with the command that produces it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = Path(__file__).resolve().parent / "output"
if str(ROOT) not in sys.path:  # run as `python paper_figures/make_all.py` from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.run import method_label  # noqa: E402

__all__ = ["OUTPUT", "RESULTS", "ROOT", "MissingResults", "method_label", "read_json", "records", "save",
           "style"]
METHOD_STYLE = {"potts + PSF 6 mm": ("#d62728", "o"), "potts": ("#1f77b4", "s"),
                "gmm": ("#2ca02c", "^"), "random_walker": ("#9467bd", "v"),
                "otsu": ("#8c564b", "D"), "kmeans": ("#e377c2", "P"),
                "threshold40": ("#7f7f7f", "x"), "threshold50": ("#bcbd22", "+"),
                "adaptive50": ("#17becf", "*"), "suv2.5": ("#ff7f0e", "h"),
                "kspc": ("black", "."), "graphcut": ("#000080", "X")}


class MissingResults(FileNotFoundError):
    """A result file a figure needs is absent; the message names the command that makes it."""


def read_json(path: Path, command: str = "python -m benchmarks.run"):
    if not path.is_file():
        raise MissingResults(f"{path} not found: run `{command}` first")
    return json.loads(path.read_text())


def records(results: Path, experiment: str) -> list[dict]:
    """The per-run records of one benchmark experiment (``records.json``)."""
    return read_json(Path(results) / "experiments" / experiment / "records.json")


def style(method: str) -> tuple[str, str]:
    """(colour, marker) of a method, stable across figures."""
    base = method.split(" [")[0]
    return METHOD_STYLE.get(base, ("black", "."))


def save(figure, out: Path, name: str) -> list[Path]:
    """Write ``name``.png (150 dpi) and ``name``.pdf into ``out``; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in ("png", "pdf"):
        path = out / f"{name}.{suffix}"
        partial = path.with_name(f".{path.name}.partial")
        figure.savefig(partial, dpi=150, bbox_inches="tight", format=suffix)
        partial.replace(path)  # atomic: a figure is either the old one or the complete new one
        paths.append(path)
    plt.close(figure)
    return paths


# which benchmark experiment each figure reads, for the full report and for its --quick smoke run
EXPERIMENTS = {"full": {"phantoms": "methods_phantoms", "real": "models", "fusion": "sts_fusion"},
               "quick": {"phantoms": "quick_phantoms", "real": "quick_real", "fusion": "quick_real"}}


def figure_arguments(doc: str, argv=None):
    """--results, --out, --quick: the command line every figure script takes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS), help="benchmarks/results folder")
    parser.add_argument("--out", default=str(OUTPUT))
    parser.add_argument("--quick", action="store_true",
                        help="read the results of `python -m benchmarks.run --quick`")
    args = parser.parse_args(argv)
    return Path(args.results), Path(args.out), EXPERIMENTS["quick" if args.quick else "full"]
