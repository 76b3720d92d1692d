"""Do the hidden Potts fit's k-means restarts agree on the real sarcomas, and how often would the
``restarts-disagree`` warning (vbseg.trust) fire?

For each delineated sarcoma of ``../shared/data``, the hidden Potts model on PET + CT + MR (the
options' default fusion: PET decides) with K = 2 and K = 3, seed 0: how many of the restarts
found the chosen solution (every class size within 5 %), the ELBO gap to the runner-up and to
the best restart that found another solution, and the warnings the fit raised. Nothing is
learned, so every case is out of sample.

Regenerate (about 4 minutes on 2 cores):
    python -m benchmarks.restart_agreement
Writes benchmarks/results/restart_agreement.{json,md}; skips with a message without ../shared/data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import vbseg
from benchmarks.common import RESULTS, machine, write_report
from vbseg.io.cases import read_cases

SHARED_INDEX = Path(__file__).resolve().parents[2] / "shared" / "data" / "cases.json"
MODALITIES = ("pet", "ct", "mr")
CLASSES = (2, 3)


def case_rows(case, classes=CLASSES) -> list[dict]:
    rows = []
    for num_classes in classes:
        posterior = vbseg.segment(list(case.images), modalities=list(MODALITIES), model="potts",
                                  num_classes=num_classes, seed=0)
        fit = posterior.summary["diagnostics"]
        rows.append({"case": case.name, "classes": num_classes,
                     "restarts": len(fit["restart_elbos"]),
                     "agreeing": fit["restarts_agreeing_with_best"],
                     "gap_runner_up": fit["elbo_gap_to_runner_up"],
                     "gap_other_solution": fit["elbo_gap_to_other_solution"],
                     "warnings": [w["code"] for w in posterior.summary["warnings"]]})
        print(rows[-1], flush=True)
    return rows


def _gap(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(rows) -> str:
    fired = sum("restarts-disagree" in r["warnings"] for r in rows)
    lines = [f"restarts-disagree fired on {fired} of {len(rows)} fits.", "",
             "| case | K | restarts agreeing with the chosen one | ELBO gap to runner-up | "
             "to another solution | warnings |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['classes']} | {r['agreeing']}/{r['restarts']} | "
              f"{_gap(r['gap_runner_up'])} | {_gap(r['gap_other_solution'])} | "
              f"{', '.join(r['warnings']) or '-'} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, default=SHARED_INDEX)
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.index.is_file():
        print(f"restart_agreement: skipped, no cases index at {args.index}")
        return 0
    names = args.cases.split(",") if args.cases else None
    rows = [row for case in read_cases(args.index, list(MODALITIES), names) for row in case_rows(case)]
    write_report(args.out, "restart_agreement", {"machine": machine(), "rows": rows}, __doc__, markdown(rows))
    print(f"wrote {args.out / 'restart_agreement.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
