"""Locate, then delineate, out of sample: does a population prior that says *where* the lesion
is, with hidden Potts saying where its boundary lies (``--model locate-potts``), beat each part
alone and SUV >= 2.5 on the real sarcomas?

Folds: the committed ``experiments/folds/sarcoma_5fold.json`` (5 folds by case, stratified by
FDG avidity, seeded; :mod:`vbseg.experiment.folds`). Every learned part is retrained per fold on the other
four folds' cases only: a population prior (``vbseg fit-prior``'s model: 2 tumour + 4 background
classes, empirical Bayes) and the 3D U-Net of the packaged checkpoint's config
(``experiments/train_<modalities>.toml``: synthetic patches, then fine-tuning mixed with the
training cases' patches; the held-out cases are excluded and the checkpoint's list checked),
each on each modality set.
Methods:

* ``suv2.5``: a fixed SUV >= 2.5 threshold (the reference);
* ``potts``: the default for PET and PET + CT, and for PET + CT + MR before this study made
  locate-potts the default there (PET decides, K = 2; nothing learned);
* ``prior (fold)``: the fold's population prior alone (``--prior``); its volume interval comes
  from independent voxel draws here (the fold priors carry no leave-one-out volume calibration,
  which would cost 17 more fits per fold);
* ``locate-potts (fold prior)``: the fold's prior locates, hidden Potts (PET decides, K = 2)
  delineates in a box 20 mm around the located regions with the prior's log-odds as the field,
  its weight learned (:mod:`vbseg.potts.locate`);
* ``cnn (fold network)``, the fold's network alone; ``deep-potts (fold
  network)``, hidden Potts on the whole crop with the network's logits as the field (the
  coarse-to-fine model as it was before locate-potts); ``locate-potts (fold network)``, the
  network as the locator; ``locate-potts (fold prior + network)``, both (the mean of their
  log-odds); and ``potts K = 3`` (three classes, the tumour the hottest; nothing learned).

Studies: PET + CT + MR and PET alone on the shared crops and on asymmetric re-crops (below);
PET + CT on the shared crops; the prior and the network learned on each study's images only (the
network from the packaged checkpoint's config for those modalities, ``experiments/train_pet_ct.toml``
and ``train_pet.toml``). Every study has every row above.

Scored on the PET grid against ``<case>_pet_label`` (an empty contour scores Dice 0 and HD95 the
VOI diagonal) by the experiment runner (vbseg.experiment.runner); FDG-avid and faint cases
apart; paired percentile bootstrap by case (10,000 resamples, seed 0) against SUV >= 2.5 and
against locate-potts.

Selection: locate-potts's design (the default's PET-decides delineation, a 20 mm margin, the
regions >= 10 % of the largest's mass, the disagreement rule at Dice 0.5) was fixed before this
run; a prototype on these cases had compared the delineation inside the located box with PET
alone against PET + CT + MR jointly (K = 2, 3), and those numbers were seen, so the choice of
PET alone over the joint delineation is selection-affected (the joint variants were worse).
One rule was changed after the first full run of this benchmark, and is selection-affected: a
locator that finds no region (fold-prior P < 1/2 everywhere, sts004 and sts043) first gave its
all-negative map as the field, which pushed the delineation off the lesion; it now abstains
(data-only delineation, a warning). Before the change locate-potts scored 0.60 [0.48, 0.70] on
all 21 shared crops and 0.33 on the faint six (the other cases' results are unchanged).

Re-crops. The shared crops are centred on the GTV (a 5 cm margin on every side), which
flatters any locator and any method that favours the middle. The same study is repeated on
asymmetric re-crops: the PET (and its label) cut so that each of the six margins around the
GTV's bounding box is drawn uniformly from 1-5 cm (seeded by the case's name; the GTV is kept
whole; CT and MR are left whole and resampled onto the cut PET grid as usual), with the same
fold priors. The re-cropped files are derived data, written under
benchmarks/results/experiments/locate/recrops/ (not committed).

Regenerate (about 3 hours on 2 cores, most of it the fifteen networks; resumable, fold priors
and networks cached under benchmarks/results/experiments/locate/):
    python -m benchmarks.bench_locate
Without ../shared/data it says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.bench_fusion_default import case_of, fdg_avid, markdown_table, summarise
from benchmarks.common import RESULTS, machine, write_report
from vbseg.deep.model import load_checkpoint, save_checkpoint
from vbseg.deep.training import load_settings, train
from vbseg.experiment.config import load_experiment
from vbseg.experiment.folds import AVID_MEAN_SUV, all_cases, load_folds
from vbseg.experiment.folds import fold_prior as learned_prior
from vbseg.experiment.results import load_records
from vbseg.experiment.runner import run_experiment
from vbseg.io.writing import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
INDEX = (ROOT / "../shared/data/cases.json").resolve()
FOLDS = ROOT / "experiments" / "folds" / "sarcoma_5fold.json"
MODALITIES = ["pet", "ct", "mr"]
MODALITY_SETS = {"pet_ct_mr": MODALITIES, "pet_ct": ["pet", "ct"], "pet": ["pet"]}
# each modality set's network: the packaged checkpoint's config, retrained per fold
TRAIN_CONFIGS = {tag: ROOT / "experiments" / f"train_{tag}.toml" for tag in MODALITY_SETS}
NAME = "bench_locate"


def method_name(record: dict) -> str:
    settings = record.get("settings", {})
    name = settings.get("name", "potts")
    learned = [part for key, part in (("prior", "prior"), ("checkpoint", "network")) if key in settings]
    if name == "potts" and learned == ["prior"]:
        return "prior (fold)"
    if "classes" in settings:
        name = f"{name} K = {settings['classes']}"
    return f"{name} (fold {' + '.join(learned)})" if learned else name


RECROP_MM = (10.0, 50.0)


def recrop_index(index: Path, cases: list[str], folder: Path) -> Path:
    """A cases index like ``index`` whose PET images and labels are cut so that each margin
    around the GTV's bounding box is uniform on RECROP_MM (module doc); CT and MR entries point
    at the original files. Written once under ``folder``; returns the new index's path."""
    target = folder / "cases.json"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    entries = {e["case"]: e for e in json.loads(index.read_text())}
    written = []
    for name in cases:
        entry = json.loads(json.dumps(entries[name]))
        pet = entry["modalities"]["pet"]
        image, label = nib.load(index.parent / pet["image"]), nib.load(index.parent / pet["label"])
        truth = np.asarray(label.dataobj) > 0
        spacing = np.asarray(image.header.get_zooms()[:3], float)
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
        margins = np.random.default_rng(seed).uniform(*RECROP_MM, size=(3, 2))
        found = np.nonzero(truth)
        box = tuple(slice(max(0, int(i.min()) - int(round(low / step))),
                          min(n, int(i.max()) + 1 + int(round(high / step))))
                    for i, (low, high), step, n in zip(found, margins, spacing, truth.shape))
        for key, source in (("image", image), ("label", label)):
            path = folder / f"{name}_pet_{key}_recrop.nii.gz"
            nib.save(source.slicer[box], path)  # nibabel moves the affine's origin to the box
            pet[key] = str(path)
        for modality, files in entry["modalities"].items():
            if modality != "pet":
                for key in ("image", "label"):
                    files[key] = str(index.parent / files[key])
        entry["recrop_margins_mm"] = margins.round(1).tolist()
        written.append(entry)
    write_text_atomic(target, json.dumps(written, indent=1) + "\n")
    return target


def network_path(folder: Path, fold: int, tag: str, variant: str = "") -> Path:
    """Where the fold network of modality set ``tag`` is cached (PET + CT + MR: foldF.eqx;
    a training-data ``variant`` other than the packaged recipe prefixes its name)."""
    name = f"fold{fold}.eqx" if tag == "pet_ct_mr" else f"{tag}_fold{fold}.eqx"
    return folder / (f"{variant}_{name}" if variant else name)


def fold_network(folder: Path, fold: int, held_out: list[str], tag: str, variant: str = "",
                 **overrides) -> tuple[Path, float | None]:
    """(checkpoint path, training seconds or None when reused): the network of modality set
    ``tag`` (``TRAIN_CONFIGS``, the packaged checkpoint's config, with the training-settings
    ``overrides`` of a ``variant``) trained on every shared sarcoma but the fold's ``held_out``
    cases (synthetic patches, then fine-tuning mixed with those cases' patches)."""
    out = network_path(folder, fold, tag, variant)
    if out.is_file():  # reused when it saw no held-out case and was trained with the overrides
        meta = load_checkpoint(out).meta
        stored = meta.get("training", {}).get("settings", {})
        # settings as the JSON holds them (tuples come back as lists)
        if not set(meta.get("real_cases", [])) & set(held_out) and all(
                stored.get(key, "(absent)") == json.loads(json.dumps(value))
                for key, value in overrides.items()):
            return out, None
    settings = load_settings(TRAIN_CONFIGS[tag])
    settings = dataclasses.replace(settings, **{"cases": str(INDEX), **overrides,
                                                "exclude_cases": tuple(held_out)})
    started = time.perf_counter()
    checkpoint = train(settings)
    seconds = time.perf_counter() - started
    if set(checkpoint.meta.get("real_cases", [])) & set(held_out):
        raise RuntimeError(f"fold {fold}: the network saw a held-out case")
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, checkpoint)
    return out, seconds


def fold_prior(folder: Path, fold: int, modalities: list[str], folds: dict, seconds: dict) -> Path:
    """The population prior on ``modalities`` learned from every case outside ``fold`` (cached;
    the fitting time goes into ``seconds``)."""
    tag = "" if modalities == MODALITIES else "_".join(modalities) + "_"
    path = folder / f"{tag}fold{fold}.json"
    begin, cached = time.perf_counter(), path.is_file()
    learned_prior(INDEX, folds, fold, modalities, path)
    if not cached:
        seconds[f"{tag}fold{fold}"] = time.perf_counter() - begin
    return path


def config_text(name: str, cases: list[str], models: list[str], index: Path = INDEX,
                modalities: list[str] = MODALITIES, **settings) -> str:
    """An experiment config (TOML) contouring ``cases`` on ``modalities`` with ``models`` and
    the further ``[model]`` settings (strings or paths)."""
    lines = ["[experiment]", f'name = "{name}"', "[real]", f'index = "{index}"',
             f"cases = {cases!r}".replace("'", '"'), f"modalities = {modalities!r}".replace("'", '"'),
             "[model]", f"name = {models!r}".replace("'", '"')]
    lines += [f"{key} = {value!r}" if isinstance(value, (int, float)) else f'{key} = "{value}"'
              for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def run_config(folder: Path, text: str, jobs: int) -> list[dict]:
    """Write the config into ``folder`` (when it differs), run it there, return its records."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    experiment = load_experiment(path)
    run_experiment(experiment, folder, jobs=jobs)
    return load_records(experiment, folder)


def locate_studies(work: Path, every: list[str]) -> dict:
    """Each study's (title, index, folder, modalities' tag); the re-crops are made (cached) in
    ``work``/recrops."""
    recropped = recrop_index(INDEX, every, work / "recrops")
    return {"centred": ("PET + CT + MR, shared crops (centred on the GTV)", INDEX, work, "pet_ct_mr"),
            "recrop": ("PET + CT + MR, asymmetric re-crops (each margin 1-5 cm)", recropped,
                       work / "recrop", "pet_ct_mr"),
            "pet_ct": ("PET + CT, shared crops", INDEX, work / "pet_ct", "pet_ct"),
            "pet": ("PET alone, shared crops", INDEX, work / "pet", "pet"),
            "recrop_pet": ("PET alone, asymmetric re-crops (each margin 1-5 cm)", recropped,
                           work / "recrop_pet", "pet")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--train-only", action="store_true",
                        help="train the fold networks (cached) and stop")
    parser.add_argument("--runs-only", default=None, metavar="STUDIES",
                        help="run these studies' fits (comma-separated: centred, recrop, pet_ct, pet, "
                             "recrop_pet; cached) and stop without a report, e.g. while the networks "
                             "train")
    parser.add_argument("--no-networks", action="store_true",
                        help="leave out the rows that need the fold networks (cnn, deep-potts, "
                             "locate-potts with the network) and Potts K = 3, e.g. before they are "
                             "trained; the report says so")
    parser.add_argument("--no-train", action="store_true",
                        help="use the fold networks already trained; folds without one are left out "
                             "of the network rows (the report names them)")
    parser.add_argument("--network-studies", default="centred,recrop,pet_ct,pet,recrop_pet",
                        help="the studies that get the network rows and Potts K = 3 (default all: "
                             "centred,recrop,pet_ct,pet,recrop_pet)")
    args = parser.parse_args(argv)
    if not INDEX.is_file():
        print(f"bench_locate: {INDEX} not found; nothing to measure (the sarcomas are needed)")
        return 0
    started = time.perf_counter()
    out = Path(args.out)
    work = out / "experiments" / "locate"
    folds = load_folds(FOLDS)
    prior_s = {}
    priors = {tag: [fold_prior(work / "priors", f, modalities, folds, prior_s)
                    for f in range(len(folds["folds"]))] for tag, modalities in MODALITY_SETS.items()}
    selected = None if args.runs_only is None else args.runs_only.split(",")
    every = all_cases(folds)
    studies = locate_studies(work, every)
    network_studies = [] if args.no_networks else [
        study for study in args.network_studies.split(",") if selected is None or study in selected]
    networks, network_s = train_networks(work / "networks", folds,
                                         sorted({studies[s][3] for s in network_studies}), args.no_train)
    if args.train_only:
        return 0
    record = {"machine": machine(), "avid_rule": f"mean SUV inside the PET GTV >= {AVID_MEAN_SUV:g}",
              "folds": folds["folds"], "prior_fit_s": prior_s, "network_training_min": network_s}
    sections, runs, run_s = [], 0, 0.0
    for study, spec in studies.items():
        if selected is not None and study not in selected:
            continue
        records = study_records(study, spec, folds, priors[spec[3]],
                                networks[spec[3]] if study in network_studies else None, every,
                                args.jobs)
        runs += len(records)
        run_s += sum(r.get("wall_s", 0.0) for r in records)
        entry, text = study_report(records)
        record[study] = entry
        sections.append(f"## {spec[0]}\n\n" + text)
    if selected is not None:
        return 0
    record["wall_s"] = time.perf_counter() - started
    avid = record["centred"]["avid"]
    cases = sorted(avid)
    paragraphs = __doc__.split("\n\n")
    selection = next(p for p in paragraphs if p.startswith("Selection:"))
    recrops = next(p for p in paragraphs if p.startswith("Re-crops."))
    note = (" ".join(selection.split()) + "\n\n" + " ".join(recrops.split()) + "\n\n"
            + "\n".join(sections)
            + f"FDG-avid: {sum(avid.values())} cases, faint: {len(avid) - sum(avid.values())} "
            f"({', '.join(c for c in cases if not avid[c])}). {runs} runs, {run_s / 60:.0f} "
            "min of fit time (sum of each run's wall time; finished runs and fold priors are reused "
            "from benchmarks/results/experiments/locate/, so regenerating the report costs "
            "seconds).\n\n")
    if args.no_networks:
        note = ("The rows with the fold networks were not run for this report (--no-networks).\n\n"
                + note)
    record["network_studies"] = network_studies
    missing = {tag: [f for f, path in enumerate(paths) if path is None] for tag, paths in networks.items()}
    record["network_folds_left_out"] = missing
    for tag, folds_out in missing.items():
        if folds_out:
            left_out = sorted(c for f in folds_out for c in folds["folds"][f])
            note = (f"The {tag} fold networks of folds {', '.join(map(str, folds_out))} were not trained "
                    f"for this report (--no-train): their network rows cover {len(every) - len(left_out)} "
                    f"cases, without {', '.join(left_out)}; their paired differences are over those "
                    "cases only.\n\n" + note)
    write_report(args.out, NAME, record, __doc__, "", note)
    print(f"wrote {Path(args.out) / (NAME + '.md')}")
    return 0


def train_networks(folder: Path, folds: dict, tags: list[str], no_train: bool) -> tuple[dict, dict]:
    """({modality set: [its fold network's path, or None when ``no_train`` and not trained, per
    fold]}, {fold network: training minutes}) for the modality sets ``tags`` (cached)."""
    networks, minutes = {}, {}
    for tag in tags:
        networks[tag] = []
        for f, held_out in enumerate(folds["folds"]):
            if no_train and not network_path(folder, f, tag).is_file():
                networks[tag].append(None)
                continue
            path, seconds = fold_network(folder, f, held_out, tag)
            networks[tag].append(path)
            if seconds is not None:
                minutes[path.stem] = seconds / 60
                print(f"{tag} fold {f}: network trained in {seconds / 60:.1f} min", flush=True)
    return networks, minutes


def study_records(study: str, spec: tuple, folds: dict, priors: list[Path], networks, every,
                  jobs: int) -> list[dict]:
    """Every run of one study (cached): SUV >= 2.5 and potts on all cases, then per fold potts
    and locate-potts with the fold prior, and with ``networks`` (one checkpoint or None per
    fold; None for the whole study leaves them out) Potts K = 3 on all cases and the network
    rows of the folds that have one."""
    _, index, folder, tag = spec
    modalities = MODALITY_SETS[tag]
    records = run_config(folder / "reference", config_text(
        f"locate_reference_{study}", every, ["suv2.5", "potts"], index, modalities), jobs)
    if networks is not None:  # the studies that compare every part also get Potts with K = 3
        records += run_config(folder / "reference_k3", config_text(
            f"locate_reference_k3_{study}", every, ["potts"], index, modalities, classes=3), jobs)
    for f, held_out in enumerate(folds["folds"]):
        cases = sorted(held_out)
        records += run_config(folder / f"fold{f}", config_text(
            f"locate_fold{f}_{study}", cases, ["potts", "locate-potts"], index, modalities,
            prior=priors[f]), jobs)
        if networks is None or networks[f] is None:
            continue
        for kind, models, settings in (
                ("cnn", ["cnn"], dict(checkpoint=networks[f])),
                ("deep", ["deep-potts"], dict(checkpoint=networks[f])),
                ("net", ["locate-potts"], dict(locator="network", checkpoint=networks[f])),
                ("both", ["locate-potts"], dict(locator="both", checkpoint=networks[f], prior=priors[f]))):
            records += run_config(folder / f"fold{f}_{kind}", config_text(
                f"locate_fold{f}_{kind}_{study}", cases, models, index, modalities, **settings), jobs)
    return records


def study_report(records: list[dict]) -> tuple[dict, str]:
    """(the JSON entry, the markdown) of one study: against SUV >= 2.5, against locate-potts,
    and Dice per case."""
    cases = sorted({case_of(r) for r in records})
    avid = {case: fdg_avid(INDEX, case) for case in cases}
    summary = summarise(records, avid, "suv2.5", name_of=method_name)
    against_locate = summarise(records, avid, "locate-potts (fold prior)", name_of=method_name)
    per_case = {}
    for r in records:
        if r.get("status") == "ok":
            per_case.setdefault(method_name(r), {})[case_of(r)] = {
                "dice50": r["dice50"], "vol_mean_ml": r["vol_mean_ml"], "vol_true_ml": r["vol_true_ml"],
                "vol_lower_ml": r["vol_lower_ml"], "vol_upper_ml": r["vol_upper_ml"],
                "warnings": r.get("warnings", [])}
    failed = [f"{r['case']} {method_name(r)}: {r.get('error')}" for r in records if r.get("status") != "ok"]
    methods = list(per_case)
    lines = ["| case | avid | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for case in cases:
        lines.append(f"| {case} | {'yes' if avid[case] else 'no'} | " + " | ".join(
            f"{per_case[m][case]['dice50']:.2f}" if case in per_case[m] else "-" for m in methods) + " |")
    text = (markdown_table(summary, "suv2.5") + "\nPaired against locate-potts:\n\n"
            + markdown_table(against_locate, "locate-potts (fold prior)", "locate-potts")
            + "\nPer case, Dice50:\n\n" + "\n".join(lines) + "\n\n"
            + (f"Failed runs: {'; '.join(failed)}\n\n" if failed else ""))
    return {"avid": avid, "summary": summary, "against_locate": against_locate,
            "per_case": per_case, "failed": failed}, text


if __name__ == "__main__":
    sys.exit(main())
