"""The benchmark report: every model and baseline, on real cases and phantoms, with speed.

Runs, in one go and on one machine:
1. ``experiments/models.toml``: the hidden Potts model and every baseline on the 15 sarcoma PET
   scans, scored against the manual GTV (skipped, with a message, without ../shared/data);
2. ``experiments/sts_fusion.toml``: the same cases, PET alone against PET + CT + MR fused
   (``--fusion joint``); CT or MR alone are refused without a VOI (the 2026-11-25 report's
   whole-crop run: CT alone Dice 0.11, MR alone 0.22);
3. ``benchmarks/configs/methods_phantoms.toml``: every method on spheres of 10-37 mm at three
   contrasts, two noise draws each (exact truth, and the partial-volume fraction for calibration);
4. ``benchmarks/bench_speed.py``: fit time against the number of voxels per method.

Experiments go through the resumable runner (``vbseg.experiment.config``): an interrupted report run
resumes where it stopped. Each experiment's outputs land in ``results/experiments/<name>/``
(``runs/`` holds the per-run folders and is not committed; ``results.csv``, ``results.md`` and
``records.json``, the full per-run records with reliability-bin sums that the paper figures
read, are). ``results/report.md`` pools them with bootstrap confidence intervals over cases.

Regenerate (about 25 minutes on 2 cores):
    python -m benchmarks.run
Smoke version (tiny configs, one small grid; about a minute):
    python -m benchmarks.run --quick --out /tmp/report
Rebuild the report from what has finished, running nothing:
    python -m benchmarks.run --report-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import bench_speed
from benchmarks.common import RESULTS, machine
from vbseg.experiment.config import load_experiment, tomllib
from vbseg.experiment.results import load_records, variant_summary, write_tables
from vbseg.experiment.runner import run_experiment
from vbseg.io.volume import write_text_atomic
from vbseg.metrics import bootstrap_mean_ci, calibration_error_of_bins, pooled_reliability

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"
REAL_CONFIGS = {"full": [ROOT / "experiments" / "models.toml", ROOT / "experiments" / "sts_fusion.toml"],
                "quick": [CONFIGS / "quick_real.toml"]}
PHANTOM_CONFIGS = {"full": [CONFIGS / "methods_phantoms.toml"], "quick": [CONFIGS / "quick_phantoms.toml"]}
SPEED_ARGS = {"full": [], "quick": ["--sizes", "16", "--repeats", "1", "--methods", "potts,otsu"]}
# records.json keeps what figures and tables need, not tracebacks or the case's file paths
DROPPED_KEYS = ("traceback",)


def method_label(record: dict) -> str:
    """A short name for a run's method: the model, its PSF if modelled, other settings."""
    settings = dict(record.get("settings", {}))
    name = settings.pop("name", "potts")
    psf = settings.pop("psf_fwhm_mm", 0) or 0
    label = name + (f" + PSF {psf:g} mm" if psf else "")
    modalities = record.get("case_spec", {}).get("modalities")
    if modalities and modalities != ["pet"]:
        label += " [" + "+".join(m.upper() for m in modalities) + "]"
    extra = ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
    return label + (f" ({extra})" if extra else "")


def _mean_ci(values, digits=3) -> str:
    ci = bootstrap_mean_ci(values)
    if ci["n"] == 0:
        return "-"
    return f"{ci['mean']:.{digits}f} ({ci['lower']:.{digits}f}-{ci['upper']:.{digits}f})"


def method_table(records: list[dict]) -> list[str]:
    """Markdown rows per method: mean (95 % bootstrap CI over cases) of Dice, HD95, surface Dice,
    |volume error|; interval coverage; mean ECE (binary truth); median fit time."""
    methods = list(dict.fromkeys(method_label(r) for r in records))
    lines = ["| method | runs | Dice50 | HD95 mm | surface Dice 2 mm | abs. volume error % | "
             "95 % interval covers | ECE | median fit s (compile s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        rows = [r for r in records if method_label(r) == method]
        vol_err = [100 * abs(r["vol_mean_ml"] - r["vol_true_ml"]) / r["vol_true_ml"] for r in rows]
        covered = sum(bool(r["covered"]) for r in rows)
        lines.append(
            f"| {method} | {len(rows)} | {_mean_ci([r['dice50'] for r in rows])} | "
            f"{_mean_ci([r['hd95_mm'] for r in rows], 1)} | {_mean_ci([r['sdice_2mm'] for r in rows])} | "
            f"{_mean_ci(vol_err, 1)} | {covered}/{len(rows)} | {np.mean([r['ece'] for r in rows]):.4f} | "
            f"{np.median([r['run_s'] for r in rows]):.2f} "
            f"({np.median([r['compile_s'] for r in rows]):.1f}) |")
    return lines


def phantom_tables(records: list[dict]) -> list[str]:
    """Dice by sphere diameter per method, and calibration against the partial-volume fraction."""
    methods = list(dict.fromkeys(method_label(r) for r in records))
    diameters = sorted({r["case_spec"]["spec"]["diameters_mm"] for r in records})
    lines = ["Mean Dice50 by sphere diameter (all contrasts and draws pooled):", "",
             "| method | " + " | ".join(f"{d:g} mm" for d in diameters) + " |",
             "|---|" + "---|" * len(diameters)]
    for method in methods:
        cells = []
        for d in diameters:
            values = [r["dice50"] for r in records
                      if method_label(r) == method and r["case_spec"]["spec"]["diameters_mm"] == d]
            cells.append(f"{np.mean(values):.3f}" if values else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Calibration pooled over all phantom runs: ECE of the pooled reliability curve, "
              "against the binary voxel-centre truth and against the exact partial-volume fraction:",
              "", "| method | pooled ECE (binary) | pooled ECE (fraction) |", "|---|---|---|"]
    for method in methods:
        rows = [r for r in records if method_label(r) == method]
        cells = []
        for key in ("reliability", "reliability_fraction"):
            ece = calibration_error_of_bins(*pooled_reliability([r[key] for r in rows]))
            cells.append(f"{ece:.4f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def run_config(config: Path, out_root: Path, jobs: int, run: bool = True) -> tuple:
    """Run one experiment config (resumably; ``run`` False: only collect the finished runs)
    and export its records; (experiment, records, output folder)."""
    experiment = load_experiment(config)
    out = out_root / "experiments" / experiment.name
    started = time.perf_counter()
    if run:
        summary = run_experiment(experiment, out, jobs=jobs)
    else:
        write_tables(experiment, out)
        summary = {"runs": len(experiment.runs), "skipped": len(experiment.runs), "failed": 0}
    records = load_records(experiment, out)
    exported = [{k: v for k, v in r.items() if k not in DROPPED_KEYS} for r in records]
    # one record per line: diffs between report runs stay readable
    write_text_atomic(out / "records.json",
                      "[\n" + ",\n".join(json.dumps(r, default=float) for r in exported) + "\n]\n")
    print(f"{experiment.name}: {len(records)} of {summary['runs']} runs finished "
          f"({summary['failed']} failed now) in {time.perf_counter() - started:.0f} s", flush=True)
    return experiment, records, out


def real_data_available(config: Path) -> tuple[bool, str]:
    """Whether the case index a real-data config names exists, and its path."""
    index = (config.parent / tomllib.loads(config.read_text())["real"]["index"]).resolve()
    return index.is_file(), str(index)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs: a smoke test")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the report from the runs already finished and bench_speed.json, "
                             "running nothing (runs not yet done are left out and counted)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sections = []

    real_lines = ["## Real cases: soft-tissue sarcomas against the manual GTV", ""]
    for config in REAL_CONFIGS[mode]:
        available, index = real_data_available(config)
        if not available:
            message = f"skipped {config.name}: {index} not found (the shared data are absent)"
            print(message)
            real_lines += [message, ""]
            continue
        experiment, records, out = run_config(config, out_root, args.jobs, not args.report_only)
        real_lines += [f"### {experiment.name} (`{config.relative_to(ROOT)}`)", "",
                       f"{len(records)} of {len(experiment.runs)} runs finished. Means with 95 % "
                       "percentile-bootstrap CIs over cases.", ""]
        real_lines += method_table(records) + [""]
        if len({run.variant_text for run in experiment.runs}) > 1:  # else nothing to pair
            real_lines += ["Paired comparison with the first variant:", ""]
            real_lines += variant_summary(experiment, records) + [""]
    sections.append(real_lines)

    phantom_lines = ["## Phantoms: spheres with exact truth", ""]
    for config in PHANTOM_CONFIGS[mode]:
        experiment, records, out = run_config(config, out_root, args.jobs, not args.report_only)
        phantom_lines += [f"### {experiment.name} (`{config.relative_to(ROOT)}`)", "",
                          f"{len(records)} of {len(experiment.runs)} runs finished.", ""]
        phantom_lines += method_table(records) + [""] + phantom_tables(records) + [""]
    sections.append(phantom_lines)

    if args.report_only:
        speed = json.loads((out_root / "bench_speed.json").read_text())
    else:
        speed = bench_speed.main(SPEED_ARGS[mode] + ["--out", str(out_root)])
    sizes = sorted({r["n"] for r in speed["rows"]})
    methods = list(dict.fromkeys(r["method"] for r in speed["rows"]))
    sections.append(["## Speed", "", f"From `{speed['command'].strip()}` in the same run.", "",
                     bench_speed.markdown(speed["rows"], methods, sizes)])

    sections.append(["## Other benchmarks", "",
                     "- [bench_calibration.md](bench_calibration.md): volume-interval coverage and "
                     "reliability over 216 phantom draws",
                     "- [bench_beta.md](bench_beta.md): bias of the beta estimators",
                     "- [bench_potts.md](bench_potts.md): VB and Gibbs per-iteration cost up to 144^3",
                     ""])
    total_s = time.perf_counter() - started
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    header = ["# vbseg benchmark report", "",
              f"Generated {datetime.date.today().isoformat()} by `{command.strip()}` "
              f"in {total_s / 60:.1f} min{' (rebuilt from finished runs)' if args.report_only else ''}; "
              f"machine: {machine()}.", "",
              "Dice50, HD95 and surface Dice are of the 50 % contour; the volume interval is the 95 % "
              "interval of the posterior volume draws (summary.json says how each method draws); ECE "
              "uses 15 equal-width bins over the fitted region. A baseline that gives a 0/1 mask has a "
              "zero-width interval.", ""]
    text = "\n".join(header + [line for section in sections for line in section]) + "\n"
    write_text_atomic(out_root / "report.md", text)
    print(f"report: {out_root / 'report.md'} ({total_s:.0f} s)")
    return {"report": out_root / "report.md", "total_s": total_s}


if __name__ == "__main__":
    main()
