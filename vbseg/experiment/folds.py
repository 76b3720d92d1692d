"""Cross-validation folds by case, fixed once and committed, so every out-of-sample evaluation
(learned priors, networks, warning thresholds, conformal calibration) uses the same split.

The split is stratified by FDG avidity (mean SUV inside the PET GTV >= ``AVID_MEAN_SUV``): the
avid and the faint cases are each shuffled with one seeded generator and dealt round-robin into
``k`` folds, so every fold holds avid and faint cases in about the proportion of the cohort.
The committed file records the seed, the rule, each case's mean GTV SUV and the command that
regenerates it; :func:`check_folds` confirms a file against the data it was made from.

Regenerate::

    python -m vbseg.experiment.folds ../shared/data/cases.json --out experiments/folds/sarcoma_5fold.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vbseg.cohort.population import fit_prior, resolve_prior
from vbseg.errors import InputError
from vbseg.io.cases import read_cases
from vbseg.io.volume import read_image_file, read_label
from vbseg.io.writing import write_text_atomic

AVID_MEAN_SUV = 2.0
DEFAULT_FOLDS = 5
DEFAULT_SEED = 20261204


def mean_gtv_suv(pet_path, label_path) -> float:
    """Mean PET value inside the label (the GTV on the PET grid)."""
    image = np.asarray(read_image_file(pet_path)[0], np.float64)
    label, _ = read_label(label_path)
    if not label.any():
        raise InputError(label_path, "is empty: no GTV to measure the uptake in")
    return float(image[label].mean())


def stratified_folds(strata: dict[str, bool], k: int, seed: int) -> list[list[str]]:
    """``k`` folds of the case names in ``strata`` (name -> stratum), each stratum shuffled by
    one generator seeded with ``seed`` (strata in sorted order, names sorted before shuffling)
    and dealt round-robin, continuing the deal across strata so fold sizes differ by <= 1."""
    if k < 2 or k > len(strata):
        raise InputError("--folds", f"must be from 2 to the number of cases ({len(strata)}), got {k}")
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(k)]
    dealt = 0
    for stratum in sorted(set(strata.values())):
        names = sorted(name for name, value in strata.items() if value == stratum)
        for name in rng.permutation(names):
            folds[dealt % k].append(str(name))
            dealt += 1
    return [sorted(fold) for fold in folds]


def make_folds(index, k: int = DEFAULT_FOLDS, seed: int = DEFAULT_SEED, modality: str = "pet") -> dict:
    """The fold record of every patient case with ``modality`` in the index CASES.json."""
    cases = read_cases(index, [modality])
    uptake = {case.name: mean_gtv_suv(case.images[0], case.label) for case in cases}
    avid = {name: value >= AVID_MEAN_SUV for name, value in uptake.items()}
    folds = stratified_folds(avid, k, seed)
    return {
        "folds": folds, "k": k, "seed": seed,
        "stratum": f"FDG-avid: mean SUV inside the {modality.upper()} GTV >= {AVID_MEAN_SUV:g}",
        "cases": {name: {"avid": avid[name], "mean_gtv_suv": round(uptake[name], 4)}
                  for name in sorted(uptake)},
        "command": f"python -m vbseg.experiment.folds CASES.json --folds {k} --seed {seed} --out FILE",
    }


def load_folds(path) -> dict:
    """A committed fold record (InputError naming the file when it is not one)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot be read as a folds file ({error})") from None
    names = [name for fold in record.get("folds", []) for name in fold]
    if not names or len(names) != len(set(names)) or set(names) != set(record.get("cases", {})):
        raise InputError(path, "is not a folds file: every case must be in exactly one fold")
    return record


def all_cases(record: dict) -> list[str]:
    """Every case of the folds record, sorted."""
    return sorted(name for names in record["folds"] for name in names)


def training_cases(record: dict, fold: int) -> list[str]:
    """The cases a model for held-out fold ``fold`` may learn from: every other fold's."""
    return sorted(name for i, names in enumerate(record["folds"]) if i != fold for name in names)


def fold_prior(index, record: dict, fold: int, modalities, path, *, command: str = "",
               method_errors=None, methods=()) -> Path:
    """The population prior for held-out fold ``fold`` at ``path``: ``vbseg fit-prior``'s model
    learned from :func:`training_cases` only (without the leave-one-out volume calibration, which
    the locator does not use), fitted and written when ``path`` is absent (``command`` recorded
    in it). ``method_errors`` (see :func:`vbseg.cohort.population.fit_prior`) adds the volume
    error of ``methods``, learned by leave-one-out over the training cases only. InputError
    naming ``path`` when a file there was learned from other cases (one that saw a held-out
    case), on other modalities, or without those methods' volume errors."""
    path = Path(path)
    names = training_cases(record, fold)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fit_prior(index, modalities, path, names=names, calibrate=False, command=command,
                  method_errors=method_errors)
    prior = resolve_prior(path)
    if sorted(prior.cases) != names or list(prior.modalities) != [m.lower() for m in modalities]:
        raise InputError(path, f"is not fold {fold}'s prior: learned from {len(prior.cases)} cases on "
                               f"{','.join(prior.modalities)}, fold {fold} trains on {len(names)} on "
                               f"{','.join(modalities)} (delete it to refit)")
    missing = [m for m in methods if m not in prior.method_calibrations]
    if missing:
        raise InputError(path, f"has no volume error of {', '.join(missing)} (delete it to refit)")
    return path


def check_folds(record: dict, index) -> None:
    """InputError unless ``record`` is what :func:`make_folds` makes from ``index`` now."""
    again = make_folds(index, record["k"], record["seed"])
    if again["folds"] != record["folds"] or again["cases"] != record["cases"]:
        raise InputError(str(index), "gives other folds than the committed file (cases or their "
                                     "uptake changed): regenerate it and rerun what used it")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vbseg.experiment.folds",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("index", help="CASES.json")
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", required=True, help="the folds JSON to write")
    args = parser.parse_args(argv)
    try:
        record = make_folds(args.index, args.folds, args.seed)
        record["command"] = (f"python -m vbseg.experiment.folds {args.index} --folds {args.folds} "
                             f"--seed {args.seed} --out {args.out}")
    except InputError as error:
        print(f"vbseg.experiment.folds: error: {error}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(record, indent=1) + "\n")
    sizes = ", ".join(f"{len(f)} ({sum(record['cases'][n]['avid'] for n in f)} avid)"
                      for f in record["folds"])
    print(f"{len(record['cases'])} cases in {args.folds} folds: {sizes}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
