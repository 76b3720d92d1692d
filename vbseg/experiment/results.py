"""Results tables of an experiment, rebuilt from its run folders.

``results.csv`` holds one row per (case, variant) with DESIGN.md's columns; ``results.md`` adds
a per-variant summary (mean Dice with a percentile-bootstrap 95 % CI over cases, the paired
difference from the first variant, interval coverage, mean ECE) above the same rows.
:func:`load_records` gives the full result records (including the reliability-bin sums that
the tables leave out) to benchmark reports and paper figures, so they read results rather than
re-running anything.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from vbseg.experiment.config import COLUMNS, Experiment, result_path
from vbseg.io.writing import write_text_atomic
from vbseg.metrics import bootstrap_mean_ci


def collect(experiment: Experiment, out) -> list[dict]:
    """One row per run of the experiment (missing runs as status "missing")."""
    rows = []
    for run in experiment.runs:
        path = result_path(Path(out), run)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {"case": run.label, "variant": run.variant_text, "seed": run.case["seed"],
                      "status": "missing"}
        rows.append({column: record.get(column) for column in COLUMNS})
    return rows


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


TABLES = ("results.csv", "results.md")  # what write_tables writes into the output folder


def write_tables(experiment: Experiment, out) -> Path:
    """results.csv and results.md rebuilt from the run folders (atomic writes)."""
    out = Path(out)
    rows = collect(experiment, out)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in COLUMNS])
    write_text_atomic(out / TABLES[0], buffer.getvalue())
    shown = [c for c in COLUMNS if c != "error"]
    ok = sum(r["status"] == "ok" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    lines = [f"# {experiment.name}", "",
             f"Config: `{experiment.path}`; {len(rows)} runs, {ok} ok, {failed} failed.", ""]
    lines += variant_summary(experiment, rows)
    lines += ["", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]).replace("|", "/") for c in shown) + " |")
    failures = [r for r in rows if r["status"] == "failed"]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {r['case']} ({r['variant']}): {r['error']}" for r in failures]
    write_text_atomic(out / TABLES[1], "\n".join(lines) + "\n")
    return out / TABLES[0]


def _value(row, column) -> float:
    try:
        return float(row[column]) if row["status"] == "ok" else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def variant_summary(experiment: Experiment, rows) -> list[str]:
    """Markdown lines: per variant, mean Dice with a bootstrap 95 % CI over cases, coverage,
    mean ECE; and each variant's paired Dice difference from the first variant (same cases)."""
    variants = list(dict.fromkeys(run.variant_text for run in experiment.runs))
    by_variant = {v: {r["case"]: r for r in rows if r["variant"] == v} for v in variants}
    cases = list(dict.fromkeys(r["case"] for r in rows))
    first = variants[0]
    lines = ["| variant | runs ok | mean Dice50 (95 % bootstrap CI) | Dice minus first variant "
             "(paired, 95 % CI) | interval covers truth | mean ECE |", "|---|---|---|---|---|---|"]
    for variant in variants:
        table = by_variant[variant]
        dice = [_value(table[c], "dice50") if c in table else float("nan") for c in cases]
        base = [_value(by_variant[first][c], "dice50") if c in by_variant[first] else float("nan")
                for c in cases]
        mean = bootstrap_mean_ci(dice)
        paired = ("-" if variant == first else
                  "{mean:+.3f} ({lower:+.3f} to {upper:+.3f})".format(
                      **bootstrap_mean_ci(dice, paired_with=base)))
        ok = [r for r in table.values() if r["status"] == "ok"]
        covered = sum(str(r["covered"]) == "True" for r in ok)
        ece = [_value(r, "ece") for r in ok]
        lines.append(f"| {variant} | {len(ok)}/{len(table)} | {mean['mean']:.3f} ({mean['lower']:.3f}-"
                     f"{mean['upper']:.3f}) | {paired} | {covered}/{len(ok)} | "
                     f"{np.nanmean(ece) if ece else float('nan'):.4f} |")
    return lines


def load_records(experiment: Experiment, out) -> list[dict]:
    """Full result records of the experiment's finished runs (status "ok"), in run order."""
    records = []
    for run in experiment.runs:
        try:
            record = json.loads(result_path(Path(out), run).read_text())
        except (OSError, ValueError):
            continue
        if record.get("status") == "ok":
            records.append(record)
    return records
