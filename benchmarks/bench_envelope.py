"""The lesion's envelope (``--envelope-mm``), out of sample on the real sarcomas: does closing
the hot tumour region and filling its holes bring the contour closer to the anatomical GTV?

The sarcoma GTVs follow the mass, and the Potts tumour class follows FDG uptake: a necrotic or
low-uptake core, a cleft or a cold rim of the mass is in the GTV but not in the hot class. The
envelope (:mod:`vbseg.envelope`) closes the probability map with a ball of R mm and fills its
holes, in grey levels, so every contour is the envelope of the model's own.

Selection, inside the training folds: R is chosen per fold and method from
``RADII_MM`` by the mean Dice50 over that fold's training cases, then applied to its held-out
cases (ties go to the smaller radius; the configs give no ROI, so the VOI is the whole crop,
as in the scored runs). For ``potts`` (nothing learned) the training cases'
predictions are its runs on them. For ``locate-potts`` they are new runs on the training cases
with the fold's own prior (in sample for the prior, as training predictions are), so no
held-out case enters the choice. Selection-affected: the idea itself. An exploratory scan of
the same five radii on bench_locate's saved out-of-fold maps of these 21 cases came first
(locate-potts, shared crops: 0.63 at 0 mm, 0.66 at 5 mm, 0.66 at 10 mm), so that the envelope
was tried at all, and which family of operations was tried, were decided after seeing these
cases; the radius used on each held-out case was not.

Studies, as in ``bench_locate`` (same folds, fold priors and runs, reused from
benchmarks/results/experiments/locate/): PET + CT + MR on the shared crops and on the
asymmetric re-crops, and PET alone on the shared crops. Scored by the experiment runner on the
PET grid against ``<case>_pet_label``, FDG-avid and faint apart, paired percentile bootstrap
by case (10,000 resamples, seed 0) against SUV >= 2.5 and against the same method without the
envelope.

Regenerate (about 40 minutes on 2 cores; resumable, runs cached under
benchmarks/results/experiments/envelope/; needs bench_locate's fold priors, which it makes if
absent):
    python -m benchmarks.bench_envelope
Without ../shared/data it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.bench_fusion_default import case_of, fdg_avid, markdown_table, summarise
from benchmarks.bench_locate import (
    FOLDS,
    INDEX,
    MODALITY_SETS,
    config_text,
    fold_prior,
    locate_studies,
    network_path,
    run_config,
)
from benchmarks.common import RESULTS, machine, write_report
from vbseg.envelope import envelope_probability
from vbseg.experiment.folds import AVID_MEAN_SUV, all_cases, load_folds
from vbseg.metrics import dice

NAME = "bench_envelope"
RADII_MM = (0.0, 5.0, 10.0, 15.0, 20.0)
METHODS = ("potts", "locate-potts")
STUDIES = ("centred", "recrop", "pet")


def prediction_dice(record: dict, folder: Path, radii=RADII_MM) -> list[float]:
    """Dice50 of one run's saved probability map against its label, with each envelope radius."""
    image = nib.load(folder / "runs" / record["run_id"] / "outputs" / "prob.nii.gz")
    probability = np.asarray(image.dataobj, np.float32)
    label = np.asarray(nib.load(record["case_spec"]["label"]).dataobj) > 0
    spacing = image.header.get_zooms()[:3]
    return [dice(envelope_probability(probability, spacing, r) >= 0.5, label) for r in radii]


def choose_radius(scores: dict) -> tuple[float, list[float]]:
    """(the radius with the best mean training Dice, the means); ``scores`` case -> Dice per radius."""
    means = np.mean([scores[c] for c in sorted(scores)], axis=0)
    return float(RADII_MM[int(np.flatnonzero(means >= means.max() - 1e-12)[0])]), means.tolist()


def study_runs(study: str, spec: tuple, folds: dict, priors: list, networks: Path, work: Path, jobs: int):
    """(records for the report, the chosen radii and training means per fold and method);
    ``networks``: bench_locate's fold-network folder."""
    _, index, locate_folder, tag = spec
    modalities = MODALITY_SETS[tag]
    every = all_cases(folds)
    reference_folder = locate_folder / "reference"
    reference = run_config(reference_folder, config_text(
        f"locate_reference_{study}", every, ["suv2.5", "potts"], index, modalities), jobs)
    potts_runs = {case_of(r): r for r in reference if r.get("model") == "potts" and r.get("status") == "ok"}
    records = list(reference)
    chosen = {}
    for f, held_out in enumerate(folds["folds"]):
        cases, training = sorted(held_out), sorted(set(every) - set(held_out))
        fold_runs = run_config(locate_folder / f"fold{f}", config_text(
            f"locate_fold{f}_{study}", cases, ["potts", "locate-potts"], index, modalities,
            prior=priors[f]), jobs)
        records += [r for r in fold_runs if r.get("model") == "locate-potts"]
        network = network_path(networks, f, tag)
        if network.is_file():  # bench_locate's fold network alone, cached (a part to beat)
            records += run_config(locate_folder / f"fold{f}_cnn", config_text(
                f"locate_fold{f}_cnn_{study}", cases, ["cnn"], index, modalities, checkpoint=network), jobs)
        train_folder = work / study / f"train_fold{f}"
        train_runs = run_config(train_folder, config_text(
            f"envelope_train_fold{f}_{study}", training, ["locate-potts"], index, modalities,
            prior=priors[f]), jobs)
        scores = {"potts": {c: prediction_dice(potts_runs[c], reference_folder) for c in training
                            if c in potts_runs},
                  "locate-potts": {case_of(r): prediction_dice(r, train_folder)
                                   for r in train_runs if r.get("status") == "ok"}}
        for method in METHODS:
            radius, means = choose_radius(scores[method])
            used = len(scores[method])
            chosen.setdefault(method, []).append({"fold": f, "radius_mm": radius, "training_dice": means,
                                                  "training_cases": used,
                                                  "training_cases_failed": len(training) - used})
            settings = dict(prior=priors[f]) if method == "locate-potts" else {}
            runs = run_config(work / study / f"fold{f}_{method}", config_text(
                f"envelope_fold{f}_{method}_{study}", cases, [method], index, modalities,
                envelope_mm=float(radius), **settings), jobs)
            records += [dict(r, envelope_method=f"{method} + envelope (fold-chosen R)") for r in runs]
    return records, chosen


def name_of(record: dict) -> str:
    if "envelope_method" in record:
        return record["envelope_method"]
    return {"locate-potts": "locate-potts (fold prior)", "cnn": "cnn (fold network)"}.get(
        record.get("model"), record.get("model"))


def study_report(records: list, chosen: dict) -> tuple[dict, str]:
    avid = {case: fdg_avid(INDEX, case) for case in sorted({case_of(r) for r in records})}
    against_suv = summarise(records, avid, "suv2.5", name_of=name_of)
    text = markdown_table(against_suv, "suv2.5")
    paired = {}
    comparisons = [("potts", "potts"), ("locate-potts", "locate-potts (fold prior)")]
    if any(name_of(r) == "cnn (fold network)" for r in records):
        comparisons.append(("locate-potts", "cnn (fold network)"))
    for method, base in comparisons:
        label = f"{method} + envelope (fold-chosen R)"
        own = [r for r in records if name_of(r) in (label, base)]
        paired[f"{method} against {base}"] = summary = summarise(own, avid, base, name_of=name_of)
        what = "the network alone" if base.startswith("cnn") else "without the envelope"
        text += f"\nPaired against {base} ({what}):\n\n" + markdown_table({label: summary[label]}, base, base)
    lines = ["| method | fold | training cases (failed) | chosen R mm | training Dice at "
             + ", ".join(f"{r:g}" for r in RADII_MM) + " mm |", "|---|---|---|---|---|"]
    for method, folds in chosen.items():
        for entry in folds:
            lines.append(f"| {method} | {entry['fold']} | {entry['training_cases']} "
                         f"({entry['training_cases_failed']}) | {entry['radius_mm']:g} | "
                         + ", ".join(f"{d:.3f}" for d in entry["training_dice"]) + " |")
    text += "\nRadius chosen per fold on its training cases:\n\n" + "\n".join(lines) + "\n"
    return {"avid": avid, "against_suv": against_suv, "against_no_envelope": paired, "chosen": chosen}, text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--studies", default="centred,recrop,pet",
                        help="comma-separated, from centred, recrop, pet (default all three)")
    args = parser.parse_args(argv)
    if not INDEX.is_file():
        print(f"bench_envelope: {INDEX} not found; nothing to measure (the sarcomas are needed)")
        return 0
    started = time.perf_counter()
    out = Path(args.out)
    locate = out / "experiments" / "locate"
    folds = load_folds(FOLDS)
    every = all_cases(folds)
    studies = locate_studies(locate, every)
    record = {"machine": machine(), "avid_rule": f"mean SUV inside the PET GTV >= {AVID_MEAN_SUV:g}",
              "radii_mm": list(RADII_MM)}
    sections = []
    for study in args.studies.split(","):
        if study not in STUDIES:
            parser.error(f"--studies: unknown {study!r} (known: {', '.join(STUDIES)})")
        spec = studies[study]
        modalities = MODALITY_SETS[spec[3]]
        priors = [fold_prior(locate / "priors", f, modalities, folds, {}) for f in range(len(folds["folds"]))]
        records, chosen = study_runs(study, spec, folds, priors, locate / "networks",
                                     out / "experiments" / "envelope", args.jobs)
        record[study], text = study_report(records, chosen)
        sections.append(f"## {spec[0]}\n\n" + text)
    record["wall_s"] = time.perf_counter() - started
    selection = next(p for p in __doc__.split("\n\n") if p.startswith("Selection,"))
    body = " ".join(selection.split()) + "\n\n" + "\n".join(sections)
    write_report(args.out, NAME, record, __doc__, "", body)
    print(f"wrote {Path(args.out) / (NAME + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
