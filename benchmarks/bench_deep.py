"""Coarse to fine: does a CNN's map inside the Bayesian models beat both parts alone?

Every method runs through ``vbseg.segment`` (same crops, same outputs) and is scored against
the truth: Dice of the 50 % contour, HD95, surface Dice at 2 mm, volume error, coverage, width
and interval score of the 95 % volume interval, ECE over the VOI, Brier score, and time. The
methods: ``kspc`` (Zhang & Ray 2023), the network alone (``cnn``: member 0; ``mc-dropout``:
20 passes of member 0 with dropout; ``cnn-ensemble``: all members), the data-only models
(``potts``, ``gp``) and their coarse-to-fine versions (``deep-potts``, ``deep-gp``: member 0's
logits as the prior log-odds with a learned weight).

* **Networks.** A fixed 3-fold split of the real sarcomas by case (sorted names, case i in
  fold i mod 3); per fold a network of ``--members`` members (independent seeds) is trained
  with the settings of ``experiments/train_pet.toml`` (synthetic patches, then fine-tuning
  mixed with real patches) on the other two folds' cases only, so no case is scored by a
  network that saw it. Without ../shared/data: one network on synthetic patches only.
* **Phantoms.** vbseg's own phantoms (vbseg.phantoms: irregular heterogeneous lesions with a
  necrotic core and spheres, PET with 6 mm PSF, contrasts 3:1 and 6:1), not the training
  generator's, so the network meets a shift in appearance; scored with fold 0's network.
* **Real sarcomas** (``../shared/data``, PET; skipped when absent), each scored with the
  network of its fold. The sarcoma crops are centred on the tumour, which flatters every
  method (most of all a network, which can learn "the middle"); the manual GTV follows the
  anatomical mass, not FDG uptake.

Means carry percentile-bootstrap 95 % CIs over cases; paired differences are against
deep-potts. Training time (per member) and inference time are reported apart.

Regenerate (about 75 minutes on 2 cores):
    python -m benchmarks.bench_deep
``--quick``: one phantom, 20-step training, no real cases (the smoke test). Writes
benchmarks/results/bench_deep.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import vbseg
from benchmarks.bench_cohort import SHARED_INDEX, score
from benchmarks.common import RESULTS, machine, write_report
from vbseg.deep.model import load_checkpoint, save_checkpoint
from vbseg.deep.training import load_settings, train
from vbseg.deep.training_data import load_deep_case
from vbseg.io.cases import read_cases
from vbseg.io.volume import write_text_atomic
from vbseg.metrics import bootstrap_mean_ci, brier_score
from vbseg.phantoms import PhantomSpec, make_phantom
from vbseg.runtime import enable_compilation_cache

METHODS = ("kspc", "cnn", "mc-dropout", "cnn-ensemble", "potts", "gp", "deep-potts", "deep-gp")
NETWORK_METHODS = ("cnn", "mc-dropout", "cnn-ensemble", "deep-potts", "deep-gp")
METRICS = ("dice50", "hd95_mm", "sdice_2mm", "volume_error", "covered", "width_ml",
           "interval_score_ml", "ece", "brier", "seconds")
REFERENCE = "deep-potts"
PHANTOM_SPECS = (
    ("heterogeneous 30 mm 3:1",
     PhantomSpec(kind="heterogeneous", diameters_mm=(30.0,), contrast=3.0, cv=0.15)),
    ("heterogeneous 45 mm 6:1",
     PhantomSpec(kind="heterogeneous", diameters_mm=(45.0,), contrast=6.0, cv=0.15)),
    ("sphere 17 mm 6:1", PhantomSpec(diameters_mm=(17.0,), contrast=6.0, cv=0.15)),
    ("sphere 28 mm 3:1", PhantomSpec(diameters_mm=(28.0,), contrast=3.0, cv=0.15)),
)
PHANTOM_SEEDS = (101,)
FOLDS = 3
REPORT_ONLY = [False]  # --report-only: tables from the cached scores, nothing computed
TRAIN_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "train_pet.toml"


def train_network(modalities, out: Path, *, seed: int, members: int, quick: bool, cases=None,
                  index=None) -> tuple[Path, dict]:
    """Train (the settings of experiments/train_pet.toml, modalities replaced) and save a
    checkpoint; returns its path and the training record. A checkpoint already at ``out``
    trained for the same modalities, members, seed and cases is reused (the work folder makes
    the benchmark resumable)."""
    wanted_cases = sorted(c.name for c in cases) if cases else []
    if out.is_file():
        meta = load_checkpoint(out).meta
        training = meta.get("training", {})
        if (meta.get("modalities") == list(modalities) and meta.get("members") == members
                and meta.get("seed") == seed and sorted(meta.get("real_cases", [])) == wanted_cases
                and training.get("settings", {}).get("steps") is not None):
            seconds = float(training.get("time_s", float("nan")))
            return out, {"seconds": seconds, "seconds_per_member": seconds / members,
                         "members": members, "steps": training["settings"]["steps"],
                         "finetune_steps": training["settings"].get("finetune_steps"),
                         "real_cases": wanted_cases, "reused": str(out)}

    settings = dataclasses.replace(load_settings(TRAIN_CONFIG), modalities=tuple(modalities),
                                   seed=seed, members=members,
                                   cases=None if index is None else str(index))
    if quick:
        settings = dataclasses.replace(settings, steps=20, finetune_steps=10, log_every=10)
    started = time.perf_counter()
    checkpoint = train(settings, cases=cases)
    seconds = time.perf_counter() - started
    save_checkpoint(out, checkpoint)
    return out, {"seconds": seconds, "seconds_per_member": seconds / members,
                 "members": members, "steps": settings.steps,
                 "finetune_steps": settings.finetune_steps,
                 "real_cases": checkpoint.meta.get("real_cases", [])}


def cached(work: Path, key: str, compute, report_only=False):
    """A case's scores from ``work/records/KEY.json`` if a finished run left them, else computed
    and written (atomically), so an interrupted benchmark resumes case by case; with
    ``report_only`` a case without scores is left out (None)."""
    path = work / "records" / f"{key.replace(' ', '_').replace(':', '-')}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if report_only:
        return None
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value, default=float))
    return value


def run_methods(images, modalities, truth, spacing, checkpoint, progress, label, **voi) -> dict:
    """Every method on one case: {method: scores}."""
    rows = {}
    for method in METHODS:
        kwargs = dict(model=method, modalities=list(modalities), seed=0, **voi)
        if method in NETWORK_METHODS:
            kwargs["checkpoint"] = str(checkpoint)
        started = time.perf_counter()
        try:
            posterior = vbseg.segment(images, **kwargs)
        except Exception as error:  # recorded, the benchmark goes on
            rows[method] = {"error": f"{type(error).__name__}: {error}"}
            continue
        seconds = time.perf_counter() - started
        row = dict(score(posterior, truth, spacing), seconds=seconds,
                   brier=brier_score(posterior.probability, truth, posterior.voi))
        weight = posterior.summary.get("parameters", {})
        row["field_weight"] = weight.get("field_weight", weight.get("prior_logit_weight"))
        rows[method] = row
    progress(f"{label}: " + ", ".join(f"{m} {r.get('dice50', float('nan')):.2f}" for m, r in rows.items()))
    return rows


def phantom_records(checkpoint, folder: Path, specs, seeds, modalities, progress) -> list[dict]:
    records = []
    for name, spec in specs:
        for seed in seeds:
            phantom = make_phantom(spec, seed=seed)

            def compute(phantom=phantom, name=name, seed=seed):
                paths = phantom.save(folder / "inputs" / f"{name.replace(' ', '_')}_{seed}")
                images = [str(paths[m]) for m in modalities]  # the phantoms have PET and CT
                return run_methods(images, modalities, phantom.truth,
                                   tuple(float(s) for s in phantom.pet.spacing), checkpoint,
                                   progress, f"{name} seed {seed}")

            rows = cached(folder, f"phantom {'+'.join(modalities)} {name} {seed}", compute,
                          REPORT_ONLY[0])
            if rows is None:
                continue
            records.append({"case": f"{name} seed {seed}", "methods": rows,
                            "true_ml_exact": phantom.volume_ml})
    return records


def fold_networks(index, modalities, folder: Path, members, quick, progress, num_folds=FOLDS):
    """(cases sorted by name, fold of each, [(checkpoint path, training record)] per fold);
    one synthetic-only network when the index is absent."""
    if index is None:
        path, record = train_network(modalities, folder / "synthetic.eqx", seed=0, members=members,
                                     quick=quick)
        progress(f"synthetic-only network: {record['seconds'] / 60:.1f} min")
        return [], [], [(path, record)]
    cases = sorted((c for c in read_cases(index, modalities) if c.kind == "patient"),
                   key=lambda c: c.name)
    loaded = [load_deep_case(c) for c in cases]
    folds = [i % FOLDS for i in range(len(cases))]
    networks = []
    for fold in range(num_folds):
        training = [d for d, f in zip(loaded, folds) if f != fold]
        path, record = train_network(modalities, folder / f"fold{fold}.eqx", seed=fold,
                                     members=members, quick=quick, cases=training, index=index)
        record.update(fold=fold, held_out=[c.name for c, f in zip(cases, folds) if f == fold])
        networks.append((path, record))
        progress(f"fold {fold}: {members} members on {len(training)} cases in "
                 f"{record['seconds'] / 60:.1f} min")
    return cases, folds, networks


def real_records(cases, folds, networks, modalities, folder: Path, progress) -> list[dict]:
    records = []
    for case, fold in zip(cases, folds):
        if fold >= len(networks):
            continue
        truth = np.asarray(nib.load(case.label).dataobj) > 0
        spacing = tuple(float(s) for s in nib.load(case.label).header.get_zooms()[:3])
        rows = cached(folder, f"real {'+'.join(modalities)} {case.name}", lambda case=case, fold=fold,
                      truth=truth, spacing=spacing: run_methods(
                          list(case.images), modalities, truth, spacing, networks[fold][0],
                          progress, f"{case.name} (fold {fold})"), REPORT_ONLY[0])
        if rows is None:
            continue
        records.append({"case": case.name, "fold": fold, "methods": rows})
    return records


def summarise(records) -> dict:
    summary = {}
    for method in METHODS:
        ok = [r for r in records if "dice50" in r["methods"].get(method, {})]
        if not ok:
            continue
        values = {m: np.array([r["methods"][method][m] for r in ok], np.float64) for m in METRICS}
        entry = {m: bootstrap_mean_ci(values[m]) for m in METRICS}
        entry["failed"] = len(records) - len(ok)
        if method != REFERENCE:
            pairs = [r for r in ok if "dice50" in r["methods"].get(REFERENCE, {})]
            for metric in ("dice50", "ece", "interval_score_ml"):
                entry[f"{metric}_minus_{REFERENCE}"] = bootstrap_mean_ci(
                    [r["methods"][method][metric] for r in pairs],
                    paired_with=[r["methods"][REFERENCE][metric] for r in pairs])
        summary[method] = entry
    return summary


def table(title, summary, records) -> str:
    def ci(c, digits=2):
        return f"{c['mean']:.{digits}f} [{c['lower']:.{digits}f}, {c['upper']:.{digits}f}]"

    lines = [f"### {title} ({len(records)} cases)", "",
             f"| method | Dice50 | Dice50 - {REFERENCE} | HD95 mm | surface Dice 2 mm | volume error "
             "| 95 % coverage | width mL | interval score mL | ECE | ECE - deep-potts | Brier | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        paired = s.get(f"dice50_minus_{REFERENCE}")
        paired_ece = s.get(f"ece_minus_{REFERENCE}")
        lines.append(f"| {name} | {ci(s['dice50'])} | {ci(paired) if paired else '-'} | "
                     f"{ci(s['hd95_mm'], 1)} | {ci(s['sdice_2mm'])} | {ci(s['volume_error'])} | "
                     f"{ci(s['covered'])} | {ci(s['width_ml'], 1)} | {ci(s['interval_score_ml'], 1)} | "
                     f"{ci(s['ece'], 3)} | {ci(paired_ece, 3) if paired_ece else '-'} | "
                     f"{ci(s['brier'], 4)} | {s['seconds']['mean']:.1f} |"
                     + (f" ({s['failed']} failed)" if s["failed"] else ""))
    names = [m for m in METHODS if m in summary]
    lines += ["", "Per case: Dice50 (learned field weight for the coarse-to-fine models):", "",
              "| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in records:
        cells = []
        for m in names:
            row = r["methods"].get(m, {})
            text = f"{row['dice50']:.2f}" if "dice50" in row else "failed"
            if row.get("field_weight") is not None and m.startswith("deep"):
                text += f" (w {row['field_weight']:.2f})"
            cells.append(text)
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=str(SHARED_INDEX), help="CASES.json of the real cases")
    parser.add_argument("--modalities", default="pet", help="inputs (PET first)")
    parser.add_argument("--members", type=int, default=2, help="ensemble members per network")
    parser.add_argument("--quick", action="store_true",
                        help="one phantom, 20-step training, no real cases (smoke test)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "vbseg_bench_deep"),
                        help="networks and per-case scores; a re-run reuses what is there")
    parser.add_argument("--part", default="all", choices=("all", "phantoms"),
                        help="phantoms: only the phantom part (fold 0's network)")
    parser.add_argument("--folds", type=int, default=FOLDS,
                        help="train and score only the first N folds (a partial run, e.g. in "
                             "parallel with one training the later folds)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the scores in --work (a partial run says so)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    REPORT_ONLY[0] = args.report_only
    enable_compilation_cache()
    started = time.perf_counter()

    def progress(text):
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {text}", flush=True)

    modalities = [m.strip() for m in args.modalities.split(",")]
    index = args.index if Path(args.index).is_file() and not args.quick else None
    specs = PHANTOM_SPECS[:1] if args.quick else PHANTOM_SPECS
    record = {"benchmark": "bench_deep", "machine": machine(), "methods": list(METHODS),
              "modalities": modalities, "members": args.members,
              "command": "python -m benchmarks.bench_deep " + " ".join(argv or [])}
    sections = []
    folder = Path(args.work) / ("quick" if args.quick else "full")
    folder.mkdir(parents=True, exist_ok=True)
    cases, folds, networks = fold_networks(index, modalities, folder, args.members, args.quick,
                                           progress, 1 if args.part == "phantoms" else args.folds)
    if args.part == "phantoms":
        cases = []
    record["training"] = [r for _, r in networks]
    records = phantom_records(networks[0][0], folder, specs, PHANTOM_SEEDS[:1], modalities,
                              progress)
    summary = summarise(records)
    record["phantoms"] = {"records": records, "summary": summary}
    sections.append(table("Phantoms (PET; fold 0's network)", summary, records))
    if cases:
        records = real_records(cases, folds, networks, modalities, folder, progress)
        summary = summarise(records)
        record["real"] = {"records": records, "summary": summary}
        partial = "" if len(records) == len(cases) else f", PARTIAL: {len(records)} of {len(cases)} cases"
        sections.append(table(f"Sarcomas ({'+'.join(modalities)}; 3-fold by case{partial})", summary,
                              records))
    record["total_s"] = time.perf_counter() - started
    note = ("Training per member (synthetic pre-training + fine-tuning, "
            f"{record['training'][0]['steps']} steps): "
            + ", ".join(f"{t['seconds_per_member'] / 60:.1f} min" for t in record["training"])
            + f". Total {record['total_s'] / 60:.1f} min.\n\n")
    write_report(args.out, "bench_deep", record, __doc__, "\n".join(sections), note)
    print("\n".join(sections))


if __name__ == "__main__":
    main()
