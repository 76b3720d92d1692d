"""What does the network learn from? An ablation of the training data of the PET-alone 3D U-Net
(``--model cnn``), out of sample on the 21 sarcomas.

The packaged recipe (``experiments/train_pet.toml``) trains on synthetic limb patches for 250
steps, then for 250 steps on batches half synthetic, half random windows of the delineated
sarcomas (flipped at random along each axis, half of them centred on a tumour voxel;
:mod:`vbseg.deep.training_data`). Each variant below changes only where the patches come
from; the architecture, seed, steps, batch size and optimiser are the recipe's:

* ``packaged recipe``: as above (bench_locate's PET fold networks and runs, reused);
* ``synthetic only``: 500 steps of synthetic patches, no real case; it sees no sarcoma, so one
  network (cached as ``synthetic_pet_fold0.eqx``) serves every fold;
* ``real only``: 500 steps of real patches, no synthetic patch;
* ``half real throughout``: 500 steps of half-and-half batches.

Folds: the committed ``experiments/folds/sarcoma_5fold.json``; every network but the synthetic
one is retrained per fold on the other folds' cases only (the checkpoint's recorded case list
is checked against the held-out fold). Scored like bench_locate (PET grid, manual GTV, Dice50;
FDG-avid and faint apart; paired percentile bootstrap by case, 10,000 resamples, seed 0, against
the packaged recipe) on the shared crops (centred on the GTV) and on bench_locate's asymmetric
re-crops (each margin 1-5 cm), where a network that learned "the lesion is in the middle" from
centred training crops would lose.

Not in the ablation: the lung CTs and the brain and breast MRs (this network sees PET alone, and
no other shared PET is delineated); random flips of the real patches (kept in every variant). No
choice is made from this study: the packaged recipe was fixed before it ran, and the numbers do
not change it.

The PET + CT + MR network (``experiments/train_pet_ct_mr.toml``, 11-32 min a network) is
studied for the synthetic-only variant alone (one network; the others would be 10 more), against
bench_locate's PET + CT + MR fold networks: ``--modalities pet_ct_mr --variants synthetic``,
written to ``bench_training_data_pet_ct_mr.md``.

Regenerate (about 50 min on 2 cores, almost all of it 11 networks, and about 5 min for the
PET + CT + MR one; resumable, networks cached under
benchmarks/results/experiments/locate/networks/, runs under
benchmarks/results/experiments/training_data/; run after bench_locate, whose fold networks and
re-crops it reuses):
    python -m benchmarks.bench_training_data
    python -m benchmarks.bench_training_data --modalities pet_ct_mr --variants synthetic
Without ../shared/data it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.bench_fusion_default import case_of, fdg_avid, markdown_table, summarise
from benchmarks.bench_locate import (
    FOLDS,
    INDEX,
    MODALITY_SETS,
    config_text,
    fold_network,
    locate_studies,
    run_config,
)
from benchmarks.common import RESULTS, machine, write_report
from vbseg.deep.model import load_checkpoint
from vbseg.experiment.folds import AVID_MEAN_SUV, all_cases, load_folds

NAME = "bench_training_data"
TAG = "pet"
# variant: (label, training-settings overrides); "" is the packaged recipe
VARIANTS = {
    "": ("packaged recipe (250 synthetic, then 250 half real)", {}),
    "synthetic": ("synthetic only (500 steps)", {"cases": None}),
    "real": ("real only (500 steps)", {"finetune_steps": 500, "real_fraction": 1.0}),
    "mixed": ("half real throughout (500 steps)", {"finetune_steps": 500}),
}
REFERENCE = VARIANTS[""][0]


def variant_networks(folder: Path, folds: dict, variants: list[str], tag: str = TAG) -> tuple[dict, dict]:
    """({variant: [checkpoint per fold]}, {network: training minutes}) of modality set ``tag``
    (cached)."""
    networks, minutes = {}, {}
    for variant in variants:
        overrides = VARIANTS[variant][1]
        if variant == "synthetic":  # it sees no case (checked: every case held out): one for every fold
            every = all_cases(folds)
            path, seconds = fold_network(folder, 0, every, tag, variant, **overrides)
            networks[variant], trained = [path] * len(folds["folds"]), [(path, seconds)]
        else:
            trained = [fold_network(folder, f, held_out, tag, variant, **overrides)
                       for f, held_out in enumerate(folds["folds"])]
            networks[variant] = [path for path, _ in trained]
        for path, seconds in trained:
            if seconds is not None:
                minutes[path.stem] = seconds / 60
                print(f"{path.stem}: trained in {seconds / 60:.1f} min", flush=True)
    return networks, minutes


# bench_locate's study of each (modality set, crops): its packaged-recipe cnn runs are reused
LOCATE_STUDY = {("pet", "centred"): "pet", ("pet", "recrop"): "recrop_pet",
                ("pet_ct_mr", "centred"): "centred", ("pet_ct_mr", "recrop"): "recrop"}


def study_records(work: Path, study: str, folds: dict, networks: dict, jobs: int, tag: str = TAG) -> list:
    """The cnn runs of every variant on every held-out fold of one study (``centred`` or
    ``recrop``) on modality set ``tag`` (cached); each record gets its variant's label as
    ``variant_label``. The packaged recipe's runs are bench_locate's own (same networks, same
    configs)."""
    every = all_cases(folds)
    located = LOCATE_STUDY[tag, study]
    _, index, locate_folder, _ = locate_studies(work / "locate", every)[located]
    own = work / "training_data" / (study if tag == TAG else f"{tag}/{study}")
    records = []
    for variant, paths in networks.items():
        for f, held_out in enumerate(folds["folds"]):
            folder = own / f"{variant}_fold{f}" if variant else locate_folder / f"fold{f}_cnn"
            name = (f"training_data_{variant}_fold{f}_{study}" + ("" if tag == TAG else f"_{tag}")
                    if variant else f"locate_fold{f}_cnn_{located}")
            for record in run_config(folder, config_text(name, sorted(held_out), ["cnn"], index,
                                                         MODALITY_SETS[tag], checkpoint=paths[f]), jobs):
                records.append({**record, "variant_label": VARIANTS[variant][0]})
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--variants", default="synthetic,real,mixed",
                        help="the variants besides the packaged recipe (comma-separated: synthetic, "
                             "real, mixed)")
    parser.add_argument("--modalities", default=TAG, choices=("pet", "pet_ct_mr"),
                        help="the network's images (default pet; pet_ct_mr writes "
                             f"{NAME}_pet_ct_mr.md)")
    parser.add_argument("--train-only", action="store_true", help="train the networks (cached) and stop")
    args = parser.parse_args(argv)
    if not INDEX.is_file():
        print(f"{NAME}: {INDEX} not found; nothing to measure (the sarcomas are needed)")
        return 0
    started = time.perf_counter()
    work = Path(args.out) / "experiments"
    folds = load_folds(FOLDS)
    variants = [""] + [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (synthetic, real, mixed)")
    tag = args.modalities
    networks, minutes = variant_networks(work / "locate" / "networks", folds, variants, tag)
    if args.train_only:
        return 0
    record = {"machine": machine(), "avid_rule": f"mean SUV inside the PET GTV >= {AVID_MEAN_SUV:g}",
              "folds": folds["folds"], "modalities": MODALITY_SETS[tag],
              "variants": {VARIANTS[v][0]: VARIANTS[v][1] for v in variants}, "network_training_min": minutes}
    images = "PET alone" if tag == TAG else "PET + CT + MR"
    sections = []
    for study, title in (("centred", f"{images}, shared crops (centred on the GTV)"),
                         ("recrop", f"{images}, asymmetric re-crops (each margin 1-5 cm)")):
        records = study_records(work, study, folds, networks, args.jobs, tag)
        avid = {case: fdg_avid(INDEX, case) for case in sorted({case_of(r) for r in records})}
        summary = summarise(records, avid, REFERENCE, name_of=lambda r: r["variant_label"])
        record[study] = {"avid": avid, "summary": summary, "per_case": {
            label: {case_of(r): r["dice50"] for r in records if r["variant_label"] == label
                    and r.get("status") == "ok"} for label in summary}}
        sections.append(f"## {title}\n\n" + markdown_table(summary, REFERENCE, "packaged recipe"))
    record["wall_s"] = time.perf_counter() - started
    record["training_min"] = {VARIANTS[v][0]: [load_checkpoint(path).meta["training"]["time_s"] / 60
                                               for path in dict.fromkeys(paths)]
                              for v, paths in networks.items()}
    note = "Training time per network (minutes, from each checkpoint's record; 2 shared cores): " + "; ".join(
        f"{label} {min(m):.1f}-{max(m):.1f}" for label, m in record["training_min"].items()) + ".\n\n"
    name = NAME if tag == TAG else f"{NAME}_{tag}"
    write_report(args.out, name, record, __doc__, "\n".join(sections) + "\n", note)
    print(f"wrote {Path(args.out) / (name + '.md')}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
