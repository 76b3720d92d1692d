"""Does conformal calibration deliver the coverage it promises? The default model's calibration
scores on 72 phantom spheres (``vbseg calibrate`` on benchmarks/configs/conformal_phantoms.toml:
10-37 mm, 2:1-8:1, CV 10 %, 4 noise draws), split at random many times into calibration and
test cases: the model's own 95 % volume interval against the split-conformal 90 % and 95 %
intervals (coverage over the test cases, averaged over splits, against the exact
ceil((n+1)(1-alpha))/(n+1); median width relative to the true volume), coverage by sphere size
(conformal coverage is marginal, not per size), the mean false-negative rate of the
risk-controlled contour at alpha 0.1 against its bound, and the calibrated-margin contour's
rate of containing the whole lesion.

Random splits of one set of scores are the issue's allowed shortcut ("the mean over >= 200
random splits compared with ceil((n+1)(1-alpha))/(n+1)"); disjoint calibration and test sets of
>= 500 and >= 1000 phantoms are the full study, not run here.

Regenerate (about 2 minutes on 2 cores; the calibration is cached in
benchmarks/results/bench_conformal_calibration.json, delete it to refit):
    python -m benchmarks.bench_conformal
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine, write_report
from vbseg.calibrate import calibrate
from vbseg.calibration import load_calibration
from vbseg.conformal import conformal_quantile, conformal_rank, risk_control_lambda

CONFIG = Path(__file__).resolve().parent / "configs" / "conformal_phantoms.toml"
NAME = "bench_conformal"
LEVELS = (0.90, 0.95)
RISK_ALPHA = 0.10
SPLITS = 500


def split_study(cases: list[dict], lambdas, n_cal: int, splits: int, seed: int = 0) -> dict:
    """Coverage, width, FNR and containment over ``splits`` random calibration/test splits of
    the calibration ``cases`` (their stored scores; nothing is refitted)."""
    rng = np.random.default_rng(seed)
    score = np.array([c["volume_score"] for c in cases])
    lower, upper = np.array([c["lower_ml"] for c in cases]), np.array([c["upper_ml"] for c in cases])
    true, floor = np.array([c["true_ml"] for c in cases]), np.array([c["floor_ml"] for c in cases])
    fnr = np.array([c["fnr"] for c in cases])
    margin = np.array([math.inf if c["margin_mm"] is None else c["margin_mm"] for c in cases])
    size = np.array([c["case"]["spec"]["diameters_mm"] for c in cases])
    record = {"n_cal": n_cal, "n_test": len(cases) - n_cal, "splits": splits,
              "model_95": {"covered": float(np.mean(score <= 0)),
                           "median_width_rel": float(np.median((upper - lower) / true))}}
    for level in LEVELS:
        alpha = 1.0 - level
        covered, widths, by_size = [], [], {float(d): [] for d in np.unique(size)}
        for _ in range(splits):
            order = rng.permutation(len(cases))
            cal, test = order[:n_cal], order[n_cal:]
            q = conformal_quantile(score[cal], alpha)
            hit = score[test] <= q
            covered.append(hit.mean())
            lo = np.maximum(lower[test], floor[test]) * math.exp(-q)
            hi = np.maximum(upper[test], floor[test]) * math.exp(q)
            widths.append(np.median((hi - lo) / true[test]))
            for d in by_size:
                members = size[test] == d
                if members.any():
                    by_size[d].append(hit[members].mean())
        k = conformal_rank(n_cal, alpha)
        record[f"conformal_{round(level * 100)}"] = {
            "covered_mean": float(np.mean(covered)), "exact": k / (n_cal + 1),
            "covered_sd_over_splits": float(np.std(covered)),
            "median_width_rel": float(np.median(widths)),
            "covered_by_diameter": {f"{d:g}": float(np.mean(v)) for d, v in by_size.items()}}
    fnrs, contained = [], []
    for _ in range(splits):
        order = rng.permutation(len(cases))
        cal, test = order[:n_cal], order[n_cal:]
        lam = risk_control_lambda(fnr[cal], lambdas, RISK_ALPHA)
        fnrs.append(fnr[test][:, int(np.searchsorted(lambdas, lam))].mean())
        q = conformal_quantile(margin[cal], 1.0 - LEVELS[0]) if np.isfinite(margin[cal]).sum() else math.inf
        contained.append(np.mean(margin[test] <= q))
    record["risk_control"] = {"alpha": RISK_ALPHA, "mean_fnr": float(np.mean(fnrs))}
    record["margin_90"] = {"contains_lesion": float(np.mean(contained))}
    return record


def markdown(record: dict) -> str:
    study = record["study"]
    lines = [f"{record['cases']} phantom cases; {study['splits']} random splits into {study['n_cal']} "
             f"calibration and {study['n_test']} test cases.", "",
             "| interval | coverage (mean over splits) | exact conformal value | median width / V |",
             "|---|---|---|---|",
             f"| model's own 95 % | {study['model_95']['covered']:.3f} (all cases) | - | "
             f"{study['model_95']['median_width_rel']:.3f} |"]
    for level in LEVELS:
        row = study[f"conformal_{round(level * 100)}"]
        lines.append(f"| conformal {level:.0%} | {row['covered_mean']:.3f} "
                     f"(sd {row['covered_sd_over_splits']:.3f}) | {row['exact']:.3f} | "
                     f"{row['median_width_rel']:.3f} |")
    diameters = study["conformal_95"]["covered_by_diameter"]
    lines += ["", "Coverage by sphere diameter (mean over splits):", "",
              "| interval | " + " | ".join(f"{d} mm" for d in diameters) + " |",
              "|---|" + "---|" * len(diameters)]
    for level in LEVELS:
        row = study[f"conformal_{round(level * 100)}"]["covered_by_diameter"]
        lines.append(f"| conformal {level:.0%} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")
    lines += ["", f"Risk control at alpha {study['risk_control']['alpha']:g}: mean FNR of the test "
              f"cases {study['risk_control']['mean_fnr']:.3f} (bound {study['risk_control']['alpha']:g}). "
              f"Calibrated 90 % margin: the dilated contour contains the whole lesion in "
              f"{study['margin_90']['contains_lesion']:.3f} of test cases.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--n-cal", type=int, default=36, help="calibration cases per split")
    parser.add_argument("--splits", type=int, default=SPLITS)
    parser.add_argument("--config", default=str(CONFIG))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    cached = out / f"{NAME}_calibration.json"
    if not cached.exists():
        out.mkdir(parents=True, exist_ok=True)
        calibrate(args.config, cached, progress=print,
                  command=f"python -m benchmarks.bench_conformal --config {args.config}")
    calibration = load_calibration(cached)
    study = split_study(calibration["cases"], np.asarray(calibration["lambda_grid"]), args.n_cal,
                        args.splits)
    record = {"machine": machine(), "wall_s": time.perf_counter() - started,
              "cases": len(calibration["cases"]), "study": study, "calibration": str(cached)}
    write_report(out, NAME, record, __doc__, markdown(record))
    print(json.dumps(study, indent=1)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
