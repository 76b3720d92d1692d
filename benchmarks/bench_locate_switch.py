"""Would an avidity switch help locate-potts on FDG-faint lesions? Where the located lesion is
not hot on PET, the PET-deciding delineation has nothing to follow, so a natural rule is: when
a statistic of the PET inside a learned component's region (its mean or median SUV) is below a
threshold T, return that component's own posterior instead of the delineation. Two switches:

* ``prior``: locate-potts (fold prior), or the fold prior alone (``--prior``), the statistic
  inside the prior's located region;
* ``network``: locate-potts + envelope (the held-out results of bench_envelope, R chosen per
  fold), or the fold network alone (``--model cnn``, PET + CT + MR), the statistic inside the
  network's located region (the same region rule as the prior's, on the network's map). The
  network finds the faint lesions best and the envelope the avid ones (bench_envelope), so this
  is the switch that could beat both.

This study chooses the rule (no switch, or mean/median below T = 1.5, 2, 2.5, 3; the
same grid for both) inside the training folds and scores it on the held-out fold (nested selection), from the
per-case results that ``python -m benchmarks.bench_locate`` and ``bench_envelope`` cached:
nothing is refitted.

For each held-out fold k, every rule is scored by the mean Dice50 over the other folds' cases
(each case's result is out of sample: its fold's prior and network never saw it; the prior or
network behind a training case's result did see fold k's cases, a second-order leak the
selection inherits), the best rule is applied to fold k's cases (ties go to no switch). A case
whose component finds no region keeps the delineation (there is no region to measure). Avidity
as in bench_locate (mean SUV inside the PET GTV >= 2). The prior switch's rule set was written
after seeing bench_locate's per-case table (the prior alone beats locate-potts on some faint
cases), and the network switch after its per-case table too, so every number here is
selection-affected; the nested estimate is the honest one.

Regenerate (seconds; after bench_locate and bench_envelope; skips with a message when
../shared/data or the cached runs are absent):
    python -m benchmarks.bench_locate_switch
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.bench_fusion_default import fdg_avid
from benchmarks.bench_locate import FOLDS, INDEX
from benchmarks.common import RESULTS, machine, write_report
from vbseg.experiment.config import load_experiment
from vbseg.experiment.folds import load_folds
from vbseg.experiment.results import load_records
from vbseg.potts.locate import located_regions

NAME = "bench_locate_switch"
THRESHOLDS = (1.5, 2.0, 2.5, 3.0)
RULES = [None] + [(statistic, t) for statistic in ("mean", "median") for t in THRESHOLDS]
# switch: (title, (base folder, base model), (fallback folder, fallback model)); folders under
# benchmarks/results/experiments/, {f} the fold
SWITCHES = {
    "prior": ("locate-potts, or the fold prior alone", ("locate/fold{f}", "locate-potts"),
              ("locate/fold{f}", "potts+population_prior")),
    "network": ("locate-potts + envelope, or the fold network alone (cnn)",
                ("envelope/centred/fold{f}_locate-potts", "locate-potts"), ("locate/fold{f}_cnn", "cnn")),
}


def rule_name(rule) -> str:
    return "no switch" if rule is None else f"{rule[0]} SUV < {rule[1]:g}"


def cached_cases(work: Path, folds: dict, base: tuple, fallback: tuple) -> dict:
    """{case: {"base", "fallback": Dice50, "stat": {"mean", "median"} or None}} from the finished
    runs of the cached fold experiments (the fallback run's own saved map gives the located
    region); a case without a finished run of both is left out."""
    cases = {}
    for fold in range(len(folds["folds"])):
        for key, (folder, model) in (("base", base), ("fallback", fallback)):
            folder = work / folder.format(f=fold)
            for record in load_records(load_experiment(folder / "config.toml"), folder):
                if record["model"] != model:
                    continue
                entry = cases.setdefault(record["case"], {"stat": None})
                entry[key] = float(record["dice50"])
                if key == "base":
                    continue
                saved = folder / "runs" / record["run_id"] / "outputs" / "prob.nii.gz"
                probability = np.asarray(nib.load(saved).dataobj, np.float32)
                pet = np.asarray(nib.load(record["case_spec"]["images"][0]).dataobj, np.float32)
                region, found = located_regions(probability, np.ones(probability.shape, bool))
                if found["regions"]:
                    entry["stat"] = {"mean": float(pet[region].mean()),
                                     "median": float(np.median(pet[region]))}
    return {case: entry for case, entry in cases.items() if "base" in entry and "fallback" in entry}


def outcome(case: dict, rule) -> float:
    if rule is None or case["stat"] is None:
        return case["base"]
    statistic, threshold = rule
    return case["fallback"] if case["stat"][statistic] < threshold else case["base"]


def nested(cases: dict, folds: dict) -> tuple[dict, list]:
    """({case: (Dice50, rule)} with each fold's rule chosen on the other folds, per-fold choices)."""
    chosen, per_fold = {}, []
    for fold, held_out in enumerate(folds["folds"]):
        training = [c for c in cases if c not in held_out]
        scores = {i: np.mean([outcome(cases[c], rule) for c in training]) for i, rule in enumerate(RULES)}
        best = max(scores, key=lambda i: (round(scores[i], 9), i == 0))
        per_fold.append({"fold": fold, "rule": rule_name(RULES[best]),
                         "training_dice": {rule_name(RULES[i]): float(s) for i, s in scores.items()}})
        for case in held_out:
            chosen[case] = (outcome(cases[case], RULES[best]), rule_name(RULES[best]))
    return chosen, per_fold


def switch_section(cases: dict, avid: dict, folds: dict, labels: tuple) -> tuple[dict, str]:
    """(the JSON entry, the markdown) of one switch; ``labels`` names its base and fallback."""
    chosen, per_fold = nested(cases, folds)
    groups = {"all": sorted(cases), "avid": sorted(c for c in cases if avid[c]),
              "faint": sorted(c for c in cases if not avid[c])}
    rows = [(f"{labels[0]} (no switch)", {c: outcome(cases[c], None) for c in cases}),
            ("nested choice (out of sample)", {c: d for c, (d, _) in chosen.items()})]
    rows += [(f"{rule_name(rule)} (fixed, all cases; seen)", {c: outcome(cases[c], rule) for c in cases})
             for rule in RULES[1:]]
    lines = ["| rule | " + " | ".join(f"{g} ({len(v)})" for g, v in groups.items()) + " |",
             "|---|" + "---|" * len(groups)]
    for title, dice in rows:
        lines.append(f"| {title} | " + " | ".join(f"{np.mean([dice[c] for c in v]):.3f}"
                                                   for v in groups.values()) + " |")
    lines += ["", "Rule chosen per fold (on the other folds' cases): "
              + "; ".join(f"fold {f['fold']}: {f['rule']}" for f in per_fold) + ".", "",
              f"| case | avid | mean SUV in region | median | {labels[0]} | {labels[1]} | nested |",
              "|---|---|---|---|---|---|---|"]
    for case in groups["all"]:
        stat = cases[case]["stat"]
        lines.append(f"| {case} | {'yes' if avid[case] else 'no'} | "
                     + (f"{stat['mean']:.2f} | {stat['median']:.2f}" if stat else "no region | -")
                     + f" | {cases[case]['base']:.2f} | {cases[case]['fallback']:.2f}"
                     f" | {chosen[case][0]:.2f} ({chosen[case][1]}) |")
    entry = {"per_fold": per_fold, "cases": {c: {**cases[c], "avid": avid[c], "nested": chosen[c]}
                                             for c in cases}}
    return entry, "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    work = Path(args.out) / "experiments"
    folds = load_folds(FOLDS) if FOLDS.is_file() else {"folds": []}
    needed = [work / folder.format(f=f) / "config.toml" for _, *parts in SWITCHES.values()
              for folder, _ in parts for f in range(len(folds["folds"]))]
    if not INDEX.is_file() or not folds["folds"] or not all(path.is_file() for path in needed):
        print(f"{NAME}: {INDEX} or the cached runs of bench_locate and bench_envelope under {work} not "
              "found; run python -m benchmarks.bench_locate and bench_envelope first (the sarcomas are "
              "needed)")
        return 0
    record, sections = {"machine": machine(), "rules": [rule_name(r) for r in RULES]}, []
    labels = {"prior": ("locate-potts", "prior alone"), "network": ("locate-potts + envelope", "cnn alone")}
    for switch, (title, base, fallback) in SWITCHES.items():
        cases = cached_cases(work, folds, base, fallback)
        avid = {case: fdg_avid(INDEX, case) for case in cases}
        record[switch], text = switch_section(cases, avid, folds, labels[switch])
        sections.append(f"## {title}\n\n{text}")
    note = ("\nEvery number is selection-affected (module doc); the nested rows are the out-of-sample "
            "estimates of choosing the rule inside the training folds, the fixed rows what each rule "
            "would give if it had been chosen in advance. Neither switch gains enough out of sample to "
            "be worth its rule: each trades avid cases for faint ones, so locate-potts does not "
            "switch.\n\n")
    write_report(args.out, NAME, record, __doc__, "\n".join(sections), note)
    print(f"wrote {Path(args.out) / (NAME + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
