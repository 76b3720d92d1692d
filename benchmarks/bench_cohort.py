"""Population priors out of sample: leave-one-out over the delineated sarcomas.

For each held-out case the population prior (vbseg.cohort.model; empirical Bayes,
vbseg.cohort.empirical_bayes) is learned from the other cases only — class statistics and
beta (their constrained per-case fits use each case alone, so they are computed once) — and
the held-out case is contoured with it through ``vbseg.segment(..., prior=...)``. The prior's
volume-error model (vbseg.cohort.volume_error: located-or-missed mixture) uses the other
cases' entries from one leave-one-out pass (case j contoured with the prior pooled from all
but j: its volume, Dice, located or missed). Those priors include the held-out case as one of
14 training cases, a small leak into the interval only (not into Dice or the probability
map); ``vbseg fit-prior`` itself nests it properly, which would cost 14 more fits per fold
here. Scored against the manual GTV on the first modality's
grid: Dice of the 50 % contour, HD95, surface Dice at 2 mm, relative volume error, coverage, width and
interval score of the 95 % volume interval, ECE over the VOI (the whole crop). Next to it, through
``vbseg.segment(model=...)`` on the same images: SUV >= 2.5, 40 % SUVmax and the unsupervised
hidden Potts model (K = 3, the same modalities, per-scan standardisation). Prior sensitivity:
the same prior with its between-patient spread widened x ``--widen`` (variance), for the first
modality set.

Modality sets (``--modalities``, separated by ';'; default fused PET+CT+MR, then PET, CT and
MR alone): each set gets its own priors learned from the same cases with only those images,
and its own unsupervised model. A set is scored on its first modality's grid against that
modality's manual label (the data's three labels of a case are the same GTV on three grids),
so CT-alone and MR-alone rows are scored on the CT and MR grids; the paired differences
against SUV >= 2.5 (scored on the PET grid) are per case.
Means carry percentile-bootstrap 95 % CIs over cases, and paired differences vs SUV >= 2.5.

Regenerate (on 2 cores: about 10 minutes for PET+CT+MR with the sensitivity and interaction
runs, 7 for PET alone; CT alone and MR alone fit their own whole fields of view, about 24x the
voxels of the PET grid: 20 min for CT without the unsupervised model on a quiet machine, 47 min
for MR with it on shared cores; the report is rewritten after every finished set, so an
interrupted run keeps them):
    python -m benchmarks.bench_cohort
``--append`` keeps the sets already in the report and runs only the missing ones, e.g.
    python -m benchmarks.bench_cohort --modalities "ct;mr" --append
(``--no-unsupervised`` leaves out the unsupervised model, e.g. for CT alone, where
the unsupervised row measures it on the same cases).
``--quick``: two held-out cases, no sensitivity run, no unsupervised model (the smoke test runs
it on a synthetic cohort, vbseg.phantoms.make_cohort).
Writes benchmarks/results/bench_cohort.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np

import vbseg
from benchmarks.common import RESULTS, machine, write_report
from vbseg.cohort.population import (
    DEFAULT_BACKGROUND_CLASSES,
    DEFAULT_TUMOUR_CLASSES,
    case_statistics,
    held_out_prior,
    leave_one_out_entries,
    load_training_case,
)
from vbseg.io.cases import read_cases
from vbseg.metrics import (
    bootstrap_mean_ci,
    dice,
    expected_calibration_error,
    interval_score,
    surface_metrics,
)
from vbseg.runtime import enable_compilation_cache

SHARED_INDEX = Path(__file__).resolve().parents[2] / "shared" / "data" / "cases.json"
SARCOMAS = tuple(f"sts{n}" for n in ("001 002 003 004 012 014 018 023 024 026 028 031 032 034 "
                                     "035").split())
LEVEL = 0.95
METRICS = ("dice50", "hd95_mm", "sdice_2mm", "volume_error", "covered", "width_ml",
           "interval_score_ml", "ece")


def score(posterior, truth, spacing) -> dict:
    volume = posterior.volume_interval(LEVEL)
    true_ml = float(truth.sum()) * posterior.reference.voxel_volume_ml
    contour = posterior.probability >= 0.5
    surface = surface_metrics(contour, truth, spacing, tolerance_mm=2.0)
    return {"dice50": dice(contour, truth), "hd95_mm": surface["hd95_mm"],
            "sdice_2mm": surface["sdice"], "true_ml": true_ml, "mean_ml": volume["mean"],
            "lower_ml": volume["lower"], "upper_ml": volume["upper"],
            "volume_error": volume["mean"] / true_ml - 1.0,
            "covered": float(volume["lower"] <= true_ml <= volume["upper"]),
            "width_ml": volume["upper"] - volume["lower"],
            "interval_score_ml": interval_score(volume["lower"], volume["upper"], true_ml, LEVEL),
            "ece": expected_calibration_error(posterior.probability, truth, posterior.voi)}


def run_case(case, prior, modalities, widen, baselines, progress, unsupervised=True, variants=None):
    """Contour ``case`` with ``prior`` (learned without it), the priors of ``variants``
    ({name: prior}) and every other method; returns {method: scores}."""
    start = time.perf_counter()
    fit_s = 0.0
    truth = np.asarray(nib.load(case.label).dataobj) > 0
    spacing = tuple(float(s) for s in nib.load(case.label).header.get_zooms()[:3])
    images, rows = list(case.images), {}
    tag = "+".join(modalities)
    methods = [(f"prior {tag}", dict(prior=prior))]
    if widen:
        methods.append((f"prior {tag}, spread x{widen:g}", dict(prior=prior.widened(widen))))
    methods += [(name, dict(prior=variant)) for name, variant in (variants or {}).items()]
    if "pet" in modalities:
        methods += [(name, dict(model=name)) for name in baselines]
    if unsupervised:
        # without PET no rule picks the tumour class: K = 3 orders the classes by mean as fat /
        # soft tissue / bone on CT and dark / intermediate / bright (fat) on T1 MR, and the
        # middle one is called tumour. With several images every one enters the class split
        # (--fusion joint), the model this row has always measured.
        middle = (dict(tumour_class=1) if "pet" not in modalities
                  else dict(fusion="joint") if len(modalities) > 1 else {})
        methods.append((f"unsupervised potts {tag} K=3", dict(model="potts", num_classes=3, **middle)))
    # vbseg segment refuses CT or MR alone without a VOI; these rows measure why, so they name
    # the whole crop as the VOI
    whole = ",".join(f"0:{n}" for n in nib.load(images[0]).shape[:3])
    voi = {} if "pet" in modalities else {"box": whole}
    for name, kwargs in methods:
        t0 = time.perf_counter()
        posterior = vbseg.segment(images, modalities=list(modalities), seed=0, **voi, **kwargs)
        rows[name] = dict(score(posterior, truth, spacing), seconds=time.perf_counter() - t0)
    rows[f"prior {tag}"]["prior_fit_s"] = fit_s
    rows[f"prior {tag}"]["beta"] = prior.beta
    for name, variant in (variants or {}).items():
        if variant.interaction is not None:
            rows[name]["interaction"] = variant.interaction.tolist()
    progress(f"{case.name}: " + ", ".join(f"{k} {v['dice50']:.2f}" for k, v in rows.items())
             + f" ({time.perf_counter() - start:.0f} s)")
    return rows


def summarise(records, reference) -> dict:
    methods = list(records[0]["methods"])
    out = {}
    for name in methods:
        values = {m: np.array([r["methods"][name][m] for r in records], np.float64) for m in METRICS}
        entry = {m: bootstrap_mean_ci(values[m]) for m in METRICS}
        if reference in records[0]["methods"] and name != reference:
            paired = np.array([r["methods"][reference]["dice50"] for r in records])
            entry["dice50_minus_reference"] = bootstrap_mean_ci(values["dice50"], paired_with=paired)
        out[name] = entry
    return out


def markdown(summary, records, args, total_s, reference, sets=()) -> str:
    def ci(c, digits=2):
        return f"{c['mean']:.{digits}f} [{c['lower']:.{digits}f}, {c['upper']:.{digits}f}]"

    done = "; ".join("+".join(group) for group in sets)
    lines = [f"Modality sets: {done}.", "",
             f"Leave-one-out over {len(records)} cases ({', '.join(r['case'] for r in records)}); "
             f"total {total_s / 60:.1f} min on this machine. Means with 95 % bootstrap CIs over cases.", "",
             f"| method | Dice50 | Dice50 - {reference} (paired) | HD95 mm | surface Dice 2 mm "
             "| volume error | 95 % coverage | interval width mL | interval score mL | ECE |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        paired = ci(s["dice50_minus_reference"]) if "dice50_minus_reference" in s else "-"
        lines.append(f"| {name} | {ci(s['dice50'])} | {paired} | {ci(s['hd95_mm'], 1)} | "
                     f"{ci(s['sdice_2mm'])} | {ci(s['volume_error'])} | {ci(s['covered'])} | "
                     f"{ci(s['width_ml'], 0)} | {ci(s['interval_score_ml'], 0)} | {ci(s['ece'], 3)} |")
    names = list(summary)
    lines += ["", "Per case: Dice50 (volume mean [95 % interval] mL; manual volume):", "",
              "| case | manual mL | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in records:
        cells = [f"{m['dice50']:.2f} ({m['mean_ml']:.0f} [{m['lower_ml']:.0f}, {m['upper_ml']:.0f}])"
                 for m in r["methods"].values()]
        true_ml = next(iter(r["methods"].values()))["true_ml"]
        lines.append(f"| {r['case']} | {true_ml:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def leave_one_out(args, modalities, widen, baselines, interaction=False):
    """Yield (case name, {method: scores}) for every held-out case with ``modalities``
    (``interaction``: also the prior with a learned class-interaction matrix)."""
    started = time.perf_counter()
    cases = read_cases(args.index, modalities, [c.strip() for c in args.cases.split(",")])
    training = [load_training_case(case) for case in cases]
    held_out = range(2) if args.quick else range(len(cases))
    stats, shapes = case_statistics(training, modalities, num_tumour=DEFAULT_TUMOUR_CLASSES,
                                    num_background=DEFAULT_BACKGROUND_CLASSES)
    tag = "+".join(modalities)
    print(f"{tag}: constrained fits of {len(cases)} cases: {time.perf_counter() - started:.0f} s", flush=True)
    # one leave-one-out pass: every case contoured with the prior pooled from the others,
    # giving its volume-error entry (volumes, Dice, located or missed)
    names = [c.name for c in cases]
    entries = leave_one_out_entries(training, stats, shapes, modalities, num_tumour=DEFAULT_TUMOUR_CLASSES,
                                    progress=lambda text: print(text, flush=True))
    interaction_entries = leave_one_out_entries(
        training, stats, shapes, modalities, num_tumour=DEFAULT_TUMOUR_CLASSES, interaction=True,
        progress=lambda text: print(text, flush=True)) if interaction else None
    print(f"{tag}: leave-one-out calibration pass: {time.perf_counter() - started:.0f} s", flush=True)

    for i in held_out:
        pooled = partial(held_out_prior, stats, names=names, held_out=i, modalities=modalities,
                         num_tumour=DEFAULT_TUMOUR_CLASSES)
        variants = ({f"prior {tag}, interaction J": pooled(interaction_entries, interaction=True)}
                    if interaction else None)
        prior = pooled(entries)
        yield names[i], run_case(cases[i], prior, modalities, widen, baselines,
                                 lambda text: print(text, flush=True),
                                 unsupervised=args.unsupervised and not args.quick,
                                 variants=variants)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=str(SHARED_INDEX), help="CASES.json")
    parser.add_argument("--cases", default=",".join(SARCOMAS), help="comma-separated case names")
    parser.add_argument("--modalities", default="pet,ct,mr;pet;ct;mr",
                        help="modality sets separated by ';', each learned and evaluated on its own "
                             "(the first modality of a set is its output grid)")
    parser.add_argument("--widen", type=float, default=4.0,
                        help="sensitivity: spread variance x this (0: off)")
    parser.add_argument("--baselines", default="suv2.5,threshold40")
    parser.add_argument("--interaction", action=argparse.BooleanOptionalAction, default=True,
                        help="also a prior with a learned K x K class-interaction matrix (first set)")
    parser.add_argument("--quick", action="store_true",
                        help="hold out only the first two cases; no widening, no unsupervised model")
    parser.add_argument("--unsupervised", action=argparse.BooleanOptionalAction, default=True,
                        help="also the unsupervised hidden Potts model (K = 3) per set")
    parser.add_argument("--append", action="store_true",
                        help="keep the modality sets already in OUT/bench_cohort.json and run only "
                             "the sets it lacks (a resumed or extended run)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    enable_compilation_cache()
    sets = [[m.strip() for m in group.split(",") if m.strip()] for group in args.modalities.split(";")]
    started = time.perf_counter()
    widen = 0.0 if args.quick else args.widen
    baselines = [b for b in args.baselines.split(",") if b]
    done, records, earlier_s = finished_sets(args.out, settings(args)) if args.append else ([], {}, 0.0)
    record = None
    for modalities in sets:
        if modalities in done:
            print(f"{'+'.join(modalities)}: already in {args.out}, kept", flush=True)
            continue
        # the sensitivity and interaction runs go with the first set, the baselines with the
        # first set that has PET (sets of an earlier run count: --append)
        first = not done
        with_baselines = baselines if "pet" in modalities and not any("pet" in s for s in done) else []
        for name, rows in leave_one_out(args, modalities, widen if first else 0.0, with_baselines,
                                        interaction=first and args.interaction):
            records.setdefault(name, {"case": name, "methods": {}})["methods"].update(rows)
        done.append(modalities)
        # written after every modality set: an interrupted run keeps the finished sets
        record = write(args, argv, list(records.values()), done, baselines, started, earlier_s)
    return record


def settings(args) -> dict:
    """The options that must agree between the runs merged by ``--append`` (the cases held
    out, the baselines and the first set's variants)."""
    return {"index": str(args.index), "cases": args.cases, "quick": args.quick, "widen": args.widen,
            "baselines": args.baselines, "interaction": args.interaction}


def finished_sets(out, current):
    """(modality sets, {case: record}, seconds) of an earlier run's bench_cohort.json in ``out``
    (none if it does not exist). Refuses (one line) when that run's settings differ from
    ``current``; a report written before settings were recorded is taken as it is."""
    path = Path(out) / "bench_cohort.json"
    if not path.exists():
        return [], {}, 0.0
    earlier = json.loads(path.read_text())
    stored = earlier.get("settings")
    if stored is not None and stored != current:
        differ = ", ".join(k for k in current if stored.get(k) != current[k])
        raise SystemExit(f"bench_cohort --append: {path} was made with other settings ({differ}); "
                         "run without --append or with the same options")
    return ([list(s) for s in earlier["modality_sets"]],
            {r["case"]: r for r in earlier["records"]}, float(earlier["total_s"]))


def write(args, argv, records, sets, baselines, started, earlier_s=0.0):
    """Summarise the finished modality sets and write bench_cohort.{json,md}
    (``earlier_s``: the time of the sets kept from an earlier run, added to the total)."""
    total_s = time.perf_counter() - started + earlier_s
    reference = ("suv2.5" if "suv2.5" in baselines and any("pet" in group for group in sets)
                 else next(iter(records[0]["methods"])))
    summary = summarise(records, reference)
    record = {"benchmark": "bench_cohort", "summary": summary, "records": records,
              "modality_sets": sets, "index": str(args.index), "total_s": total_s,
              "settings": settings(args),
              "machine": machine(), "command": "python -m benchmarks.bench_cohort "
              + " ".join(sys.argv[1:] if argv is None else argv)}
    table = markdown(summary, records, args, total_s, reference, sets)
    write_report(args.out, "bench_cohort", record, __doc__, table)
    print(table, flush=True)
    return record

if __name__ == "__main__":
    main()
