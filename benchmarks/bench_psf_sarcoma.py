"""Does modelling the PET blur (``--psf-fwhm``) help on real sarcomas? PET alone, K = 2: the
default options (no PSF term) against ``--psf-fwhm 6`` and ``--psf-fwhm 8`` (the PET voxels are
3.9-5.5 mm in-plane, so 6-8 mm is a realistic reconstructed resolution), on every soft-tissue
sarcoma in ../shared/data, the whole PET image as the volume of interest (no --roi/--box, as a
user would start).

Scored on the PET grid against ``<case>_pet_label`` (the manual GTV). FDG-avid cases (mean SUV
inside the GTV >= 2) and faint ones are reported apart; the Dice difference of each method is
paired by case against the default (percentile bootstrap, 10,000 resamples, seed 0). Tables
from :func:`benchmarks.bench_fusion_default.summarise` / ``markdown_table``.

Regenerate (resumable; finished runs are reused from benchmarks/results/experiments/):
    python -m benchmarks.bench_psf_sarcoma
Without ../shared/data it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.bench_fusion_default import case_of, fdg_avid, markdown_table, summarise
from benchmarks.common import RESULTS, machine, write_report
from vbseg.experiment.config import load_experiment
from vbseg.experiment.results import load_records
from vbseg.experiment.runner import run_experiment

CONFIG = Path(__file__).resolve().parent / "configs" / "psf_sarcoma.toml"
NAME = "psf_sarcoma"
REFERENCE = "no PSF term (default)"


def method_name(record: dict) -> str:
    """'no PSF term (default)' or '--psf-fwhm F'."""
    fwhm = record.get("settings", {}).get("psf_fwhm_mm", 0)
    return REFERENCE if not fwhm else f"--psf-fwhm {fwhm:g}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    index = (CONFIG.parent / "../../../shared/data/cases.json").resolve()
    if not index.is_file():
        print(f"bench_psf_sarcoma: {index} not found; nothing to measure (the sarcomas are needed)")
        return 0
    started = time.perf_counter()
    out = Path(args.out)
    experiment = load_experiment(CONFIG)
    folder = out / "experiments" / experiment.name
    run_experiment(experiment, folder, jobs=args.jobs)
    records = [dict(r, method=method_name(r)) for r in load_records(experiment, folder)]
    cases = sorted({case_of(r) for r in records})
    avid = {case: fdg_avid(index, case) for case in cases}
    summary = summarise(records, avid, REFERENCE, name_of=lambda r: r["method"])
    per_case = {}
    for r in records:
        if r.get("status") == "ok":
            per_case.setdefault(r["method"], {})[case_of(r)] = {
                "dice50": r["dice50"], "vol_mean_ml": r["vol_mean_ml"],
                "vol_true_ml": r["vol_true_ml"], "warnings": r.get("warnings", [])}
    record = {"machine": machine(), "wall_s": time.perf_counter() - started, "avid": avid,
              "summary": summary, "per_case": per_case}
    lines = ["| case | avid | GTV mL | " + " | ".join(per_case) + " |",
             "|---|---|---|" + "---|" * len(per_case)]
    for case in cases:
        first = next(iter(per_case.values())).get(case, {})
        cells = [f"{per_case[m][case]['vol_mean_ml']:.0f} mL, Dice {per_case[m][case]['dice50']:.2f}"
                 if case in per_case[m] else "failed" for m in per_case]
        lines.append(f"| {case} | {'yes' if avid[case] else 'no'} | "
                     f"{first.get('vol_true_ml', float('nan')):.0f} | " + " | ".join(cells) + " |")
    run_minutes = sum(r.get("wall_s", 0.0) for r in records) / 60
    note = (f"FDG-avid: {sum(avid.values())} cases, faint: {len(avid) - sum(avid.values())}. "
            f"'minus ...' is the paired Dice difference against the default. The {len(records)} "
            f"runs took {run_minutes:.0f} min of fit time.\n\nPer case (posterior mean volume, "
            "Dice of the 50 % contour):\n\n" + "\n".join(lines) + "\n\n")
    write_report(args.out, NAME, record, __doc__, markdown_table(summary, REFERENCE, "default"), note)
    print(f"wrote {Path(args.out) / (NAME + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
