"""Experiments: a TOML config that sweeps model settings over cases, run resumably.

A config names the cases and the model settings; any model setting given as a list is a sweep
axis, and the runs are every (case, variant) pair, the variants being the product of the axes
(``[sweep] mode = "product"``, the default) or their element-wise zip (``"zip"``)::

    [experiment]
    name = "phantom_spheres"          # optional; default: the file's stem
    description = "..."

    [phantoms]                        # synthetic cases (each list a case axis, product)
    diameters_mm = [10, 22, 37]
    contrast = [2.0, 4.0]
    cv = [0.1]
    psf_fwhm_mm = 6.0
    noise = "gaussian"                # or "poisson" (counts scaled so the background CV is cv)
    noise_fwhm_mm = [0, 4.0]          # FWHM of the kernel correlating Gaussian noise (0: white)
    spacing_mm = [4.0, 4.0, 3.0]      # one PET voxel size (mm), not an axis; the default
    voi_margin_mm = 15.0              # optional, not an axis: fit each sphere in a spherical VOI
                                      # of its radius + this margin (default: the whole grid)
    wall_mm = 1.0                     # optional, not an axis: a cold shell (no activity) of this
                                      # thickness outside each sphere (NEMA glass; default 0)
    seeds = 3                         # noise draws per configuration (seeds 0..n-1), or a list
                                      # of seeds: [4, 5] (draws disjoint from seeds = 4's)

    [real]                            # cases from an index such as ../shared/data/cases.json
    index = "../../shared/data/cases.json"   # relative to the config file
    cases = ["sts001", "sts002"]      # or "all" (every case of kind = "patient", the default)
    modalities = ["pet", "ct"]        # images in this order; the label of the first is the truth
                                      # (a list of such lists is a case axis: [["pet"], ["pet", "ct"]])

    [model]                           # settings of vbseg.segment (see `vbseg segment --help`)
    name = "potts"
    beta = [0.5, 1.5, "auto"]
    psf_fwhm_mm = [0, 6.0]            # 0: no PSF term; "phantom": each phantom case is fitted
                                      # with its own [phantoms] psf_fwhm_mm (phantoms only)
    tumour_class = 1                  # cases without PET: which class (by mean in image 1) is tumour
    prior = "leave-one-out"           # or a prior JSON / "sarcoma": population priors; "leave-one-out"
                                      # learns each real case's prior from the experiment's other
                                      # real cases with the same modalities (cached in <out>/priors)

    [sweep]
    mode = "product"

Validation happens before anything runs; a problem is one line naming the config file, the
key and the problem. Each run gets a folder ``runs/<id>`` under the output folder, ``id`` a
hash of (case, variant, code version), holding its outputs and ``result.json``, written
atomically and last: a run with a ``result.json`` of status "ok" is finished and a re-run skips
it, so an interrupted sweep resumes where it stopped. A run that fails records its error and
the sweep goes on. ``results.csv`` and ``results.md`` (DESIGN.md's columns) are rebuilt from
the run folders at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from vbseg import __version__
from vbseg.calibration.calibration_file import PHANTOM_PSF
from vbseg.cohort.population import PACKAGED_PRIORS, resolve_prior
from vbseg.cohort.volume_error import MIN_CALIBRATION_CASES
from vbseg.errors import InputError
from vbseg.io.volume import read_image_grid
from vbseg.methods import get_method
from vbseg.options import DEFAULT_LEVELS, OPTION_KEYWORDS, SegmentOptions
from vbseg.phantoms import PhantomSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECTIONS = {"experiment", "phantoms", "real", "model", "sweep"}
EXPERIMENT_KEYS = {"name": str, "description": str}
PHANTOM_KEYS = {"diameters_mm": float, "contrast": float, "cv": float, "psf_fwhm_mm": float,
                "noise": str, "noise_fwhm_mm": float, "seeds": (int, list), "spacing_mm": list,
                "voi_margin_mm": float, "wall_mm": float}
# the [phantoms] keys that are case axes (each value a case), in the order of the case names' tags
PHANTOM_AXES = ("diameters_mm", "contrast", "cv", "psf_fwhm_mm", "noise", "noise_fwhm_mm")
# case-name tags of the axes whose key's first word is not its tag ("noise" is the noise model's)
PHANTOM_TAGS = {"noise_fwhm_mm": "nfwhm"}
REAL_KEYS = {"index": str, "cases": (str, list), "modalities": list, "kind": str}
# config keys that name an option (its keyword) differently
KEY_ALIASES = {"model": "name", "num_classes": "classes"}
# the scalar types a field's annotation names ("object": a path or a packaged name)
ANNOTATION_TYPES = {"str": str, "int": int, "float": float, "object": str}


def _model_keys() -> dict:
    """model settings, one per option (:data:`vbseg.options.OPTION_KEYWORDS`, every concern's
    fields): config key -> (the segment() keyword, the scalar type(s) it takes)."""
    keys = {}
    for keyword, (_, field) in OPTION_KEYWORDS.items():
        kinds = tuple(ANNOTATION_TYPES[word] for word in str(field.type).replace(" ", "").split("|")
                      if word != "None")
        keys[KEY_ALIASES.get(keyword, keyword)] = (keyword, kinds[0] if len(kinds) == 1 else kinds)
    return keys


MODEL_KEYS = _model_keys()
# settings that name a file: relative paths are relative to the config's folder ("sarcoma", the
# packaged prior, is a name)
PATH_KEYS = ("checkpoint", "prior", "external_field")
# [model] prior = "leave-one-out": each real case is contoured with the population prior learned
# from the experiment's other real cases with the same modalities (vbseg fit-prior's model,
# vbseg.cohort.population.leave_one_out_prior)
LEAVE_ONE_OUT = "leave-one-out"
SWEEP_MODES = ("product", "zip")
COLUMNS = ["case", "variant", "seed", "model", "status", "dice50", "hd95_mm", "asd_mm",
           "sdice_2mm", "vol_true_ml", "vol_mean_ml", "vol_lower_ml", "vol_upper_ml", "covered",
           "interval_score", "ece", "brier", "compile_s", "run_s", "crps_ml", "sdice_5mm", "error"]


@dataclass(frozen=True)
class Run:
    """One (case, variant) of a sweep. ``case`` and ``variant`` are JSON-able dicts."""

    case: dict
    variant: dict

    @property
    def run_id(self) -> str:
        payload = json.dumps({"case": self.case, "variant": self.variant, "version": __version__},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        return self.case["name"]

    @property
    def variant_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.variant.items())) or "default"


@dataclass(frozen=True)
class Experiment:
    name: str
    path: Path
    runs: tuple[Run, ...]
    index: Path | None = None  # the [real] cases index, resolved (None without real cases)


def _number(value, kind):
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise TypeError


def check_scalar(path, key, value, kinds):
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    for kind in kinds:
        try:
            return _number(value, kind)
        except TypeError:
            continue
    names = " or ".join(k.__name__ for k in kinds)
    raise InputError(path, f"{key}: expected {names}, got {value!r}")


def _axis(path, key, value, kinds) -> list:
    """A setting as a list of validated scalars (a scalar is a one-element axis)."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise InputError(path, f"{key}: an empty list")
    return [check_scalar(path, key, v, kinds) for v in values]


def _unknown(path, section, table, allowed):
    for key in table:
        if key not in allowed:
            raise InputError(path, f"[{section}] {key}: unknown key (known: {', '.join(sorted(allowed))})")


def _phantom_seeds(path, value) -> list[int]:
    """[phantoms] seeds: n (the noise draws 0..n-1) or a list of distinct seeds >= 0 (draws
    disjoint from another config's)."""
    if isinstance(value, list):
        seeds = _axis(path, "[phantoms] seeds", value, int)
        if min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise InputError(path, f"[phantoms] seeds: a list needs distinct seeds >= 0, got {value!r}")
        return seeds
    count = check_scalar(path, "[phantoms] seeds", value, int)
    if count < 1:
        raise InputError(path, f"[phantoms] seeds: must be >= 1, got {count}")
    return list(range(count))


def _phantom_spacing(path, value) -> list[float]:
    """[phantoms] spacing_mm: one PET voxel size, three finite numbers > 0 (not an axis)."""
    key = "[phantoms] spacing_mm"
    if not isinstance(value, list) or len(value) != 3:
        raise InputError(path, f"{key}: expected a list of 3 numbers (mm along the array axes), "
                               f"got {value!r}")
    spacing = [check_scalar(path, key, v, float) for v in value]
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise InputError(path, f"{key}: each voxel size must be a finite number > 0, got {value!r}")
    return spacing


def _phantom_extras(path, table) -> tuple[dict, dict, str]:
    """The [phantoms] keys that are not axes: (spec entries, case entries, case-name suffix).
    Absent keys add nothing, so a config without them keeps its case names and run ids."""
    spec, case, suffix = {}, {}, ""
    if "spacing_mm" in table:
        spec["spacing_mm"] = _phantom_spacing(path, table["spacing_mm"])
        suffix += "_sp" + "x".join(f"{v:g}" for v in spec["spacing_mm"])
    if "wall_mm" in table:
        wall = check_scalar(path, "[phantoms] wall_mm", table["wall_mm"], float)
        if not (math.isfinite(wall) and wall >= 0):
            raise InputError(path, f"[phantoms] wall_mm: must be a finite number >= 0, got {wall!r}")
        spec["wall_mm"] = wall
        suffix += f"_wall{wall:g}"
    if "voi_margin_mm" in table:
        margin = check_scalar(path, "[phantoms] voi_margin_mm", table["voi_margin_mm"], float)
        if not (math.isfinite(margin) and margin > 0):
            raise InputError(path, f"[phantoms] voi_margin_mm: must be a finite number > 0, got {margin!r}")
        case["voi_margin_mm"] = margin
        suffix += f"_voi{margin:g}"
    return spec, case, suffix


def _phantom_cases(path, table) -> list[dict]:
    _unknown(path, "phantoms", table, PHANTOM_KEYS)
    axes = {key: _axis(path, f"[phantoms] {key}", table[key], PHANTOM_KEYS[key])
            for key in PHANTOM_AXES if key in table}
    if "diameters_mm" not in axes:
        raise InputError(path, "[phantoms] diameters_mm: required")
    bad = [v for v in axes.get("noise_fwhm_mm", []) if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise InputError(path, f"[phantoms] noise_fwhm_mm: must be finite numbers >= 0 (0: white noise), "
                               f"got {bad[0]!r}")
    if any(axes.get("noise_fwhm_mm", [0.0])) and "poisson" in axes.get("noise", []):
        raise InputError(path, "[phantoms] noise_fwhm_mm: correlates Gaussian noise only; noise = "
                               "\"poisson\" is white (use noise_fwhm_mm = 0 with it)")
    seeds = _phantom_seeds(path, table.get("seeds", 1))
    extra_spec, extra_case, suffix = _phantom_extras(path, table)
    cases = []
    names = list(axes)
    for values in itertools.product(*axes.values()):
        spec = dict(zip(names, values))
        tag = "_".join(f"{PHANTOM_TAGS.get(k, k.split('_')[0])}{v:g}" if isinstance(v, float)
                       else f"{k}{v}" for k, v in spec.items()) + suffix
        for seed in seeds:
            cases.append({"kind": "phantom", "name": f"phantom_{tag}_s{seed}",
                          "spec": {**spec, **extra_spec}, "seed": seed, **extra_case})
    return cases


def _real_index(path, table) -> Path:
    """The [real] table's cases index, resolved against the config's folder; InputError when
    it is not given or not there."""
    if "index" not in table:
        raise InputError(path, "[real] index: required (a cases.json)")
    index_path = (path.parent / check_scalar(path, "[real] index", table["index"], str)).resolve()
    if not index_path.is_file():
        raise InputError(path, f"[real] index: {index_path} not found")
    return index_path


def _real_cases(path, table) -> list[dict]:
    _unknown(path, "real", table, REAL_KEYS)
    index_path = _real_index(path, table)
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"[real] index: {index_path} cannot be read ({error})") from None
    by_name = {entry["case"]: entry for entry in index if "case" in entry}
    sets = table.get("modalities", ["pet"])
    sets = sets if sets and all(isinstance(x, list) for x in sets) else [sets]
    cases = []
    for modalities in sets:
        modalities = [m.lower() for m in _axis(path, "[real] modalities", modalities, str)]
        cases += _real_cases_for(path, table, index_path, by_name, modalities, len(sets) > 1)
    if not cases:
        raise InputError(path, "[real]: no case has every requested modality")
    return cases


def _real_cases_for(path, table, index_path, by_name, modalities, tag) -> list[dict]:
    wanted = table.get("cases", "all")
    kind = check_scalar(path, "[real] kind", table.get("kind", "patient"), str)
    names = (sorted(n for n, e in by_name.items()
                    if e.get("kind") == kind and all(m in e.get("modalities", {}) for m in modalities))
             if wanted == "all" else _axis(path, "[real] cases", wanted, str))
    cases = []
    for name in names:
        entry = by_name.get(name)
        if entry is None:
            raise InputError(path, f"[real] cases: {name!r} is not in {index_path}")
        available = entry.get("modalities", {})
        missing = [m for m in modalities if m not in available]
        if missing:
            raise InputError(path, f"[real] cases: {name!r} has no {', '.join(missing)} image")
        images = [str(index_path.parent / available[m]["image"]) for m in modalities]
        label = str(index_path.parent / available[modalities[0]]["label"])
        for file in (*images, label):  # exists, and its header reads as a 3D image
            try:
                read_image_grid(file)
            except InputError as error:
                raise InputError(error.subject, f"[real] case {name!r}: {error.problem}") from None
        cases.append({"kind": "real", "name": f"{name}_{'+'.join(modalities)}" if tag else name,
                      "images": images, "modalities": modalities, "label": label, "seed": 0,
                      "index": str(index_path), "index_case": name})
    return cases


def _model_axis(path, key, value) -> list:
    """A [model] setting's values; psf_fwhm_mm may also be PHANTOM_PSF (each phantom's own)."""
    if key == "psf_fwhm_mm":
        values = _axis(path, f"[model] {key}", value, (float, str))
        for item in values:
            if isinstance(item, str) and item != PHANTOM_PSF:
                raise InputError(path, f"[model] psf_fwhm_mm: expected a number or \"{PHANTOM_PSF}\" "
                                       f"(each phantom fitted with its own PSF), got {item!r}")
        return values
    return _axis(path, f"[model] {key}", value, MODEL_KEYS[key][1])


def _variants(path, model, mode) -> list[dict]:
    _unknown(path, "model", model, MODEL_KEYS)
    axes = {key: _model_axis(path, key, value) for key, value in model.items()}
    for value in axes.get("beta", []):
        if isinstance(value, str) and value != "auto":
            raise InputError(path, f"[model] beta: expected a number or 'auto', got {value!r}")
    names = list(axes)
    if mode == "zip":
        lengths = {len(v) for v in axes.values() if len(v) > 1}
        if len(lengths) > 1:
            raise InputError(path, "[sweep] mode = \"zip\": list settings have different lengths "
                                   f"{sorted(lengths)}")
        n = lengths.pop() if lengths else 1
        rows = [tuple(v[i] if len(v) > 1 else v[0] for v in axes.values()) for i in range(n)]
    else:
        rows = list(itertools.product(*axes.values()))
    return [_resolve_paths(path, dict(zip(names, row))) for row in rows]


def _attach_cohorts(path, cases, leave_one_out: bool) -> None:
    """With a leave-one-out prior, each real case records its cohort (the experiment's real
    cases from the same index with the same modalities); otherwise the index keys are dropped
    (they would only change the run ids of existing results)."""
    for case in cases:
        if case["kind"] != "real":
            continue
        if not leave_one_out:
            case.pop("index"), case.pop("index_case")
            continue
        case["cohort"] = sorted(c["index_case"] for c in cases if c["kind"] == "real"
                                and c["index"] == case["index"] and c["modalities"] == case["modalities"])


def _resolve_paths(path, variant: dict) -> dict:
    for key in PATH_KEYS:
        if key == "prior" and variant.get(key) == LEAVE_ONE_OUT:
            continue
        if key in variant and not (key == "prior" and variant[key] in PACKAGED_PRIORS):
            target = (path.parent / variant[key]).resolve()
            if not target.is_file():
                raise InputError(path, f"[model] {key}: {target} not found")
            variant[key] = str(target)
    return variant


def load_experiment(path) -> Experiment:
    """Parse and validate a config; returns the expanded runs. InputError names file and key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "not found")
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise InputError(path, f"is not valid TOML ({error})") from None
    for section, value in config.items():
        if section not in SECTIONS:
            raise InputError(path, f"[{section}]: unknown section (known: {', '.join(sorted(SECTIONS))})")
        if not isinstance(value, dict):
            raise InputError(path, f"{section}: expected a [{section}] table")
    meta = config.get("experiment", {})
    _unknown(path, "experiment", meta, EXPERIMENT_KEYS)
    name = check_scalar(path, "[experiment] name", meta.get("name", path.stem), str)
    sweep = config.get("sweep", {})
    _unknown(path, "sweep", sweep, {"mode"})
    mode = sweep.get("mode", "product")
    if mode not in SWEEP_MODES:
        raise InputError(path, f"[sweep] mode: must be one of {', '.join(SWEEP_MODES)}, got {mode!r}")
    cases = []
    if "phantoms" in config:
        cases += _phantom_cases(path, config["phantoms"])
    if "real" in config:
        cases += _real_cases(path, config["real"])
    if not cases:
        raise InputError(path, "names no cases: add a [phantoms] or a [real] table")
    variants = _variants(path, config.get("model", {}), mode)
    _attach_cohorts(path, cases, any(v.get("prior") == LEAVE_ONE_OUT for v in variants))
    for variant in variants:
        _check_variant(path, variant, cases)
    return Experiment(name, path, tuple(Run(case, variant) for case in cases for variant in variants),
                      _real_index(path, config["real"]) if "real" in config else None)


def phantom_psf_mm(case: dict) -> float:
    """The scanner PSF FWHM (mm) a phantom case was made with ([phantoms] psf_fwhm_mm or the
    PhantomSpec default)."""
    return float(case["spec"].get("psf_fwhm_mm", PhantomSpec.psf_fwhm_mm))


def segment_kwargs(variant: dict, case: dict | None = None) -> dict:
    """A variant's settings as ``vbseg.segment`` keywords (psf_fwhm_mm = 0 means no PSF term;
    ``psf_fwhm_mm = "phantom"`` becomes ``case``'s own PSF, or stays as it is without a case).
    A variant without a model name is ``potts``: not ``segment``'s default rule, which picks
    locate-potts with the packaged sarcoma prior for PET + CT + MR, in sample on the shared
    sarcomas (:data:`vbseg.potts.locate.DEFAULT_MODEL_RULE`)."""
    kwargs = {"model": "potts", **{MODEL_KEYS[k][0]: v for k, v in variant.items()}}
    if kwargs.get("psf_fwhm_mm") == PHANTOM_PSF and case is not None:
        kwargs["psf_fwhm_mm"] = phantom_psf_mm(case)
    if kwargs.get("psf_fwhm_mm") == 0:
        kwargs["psf_fwhm_mm"] = None
    return kwargs


def _check_variant(path, variant, cases):
    """Option values are checked by the same validation as ``vbseg segment`` (no files read)."""
    kwargs = segment_kwargs(variant)
    if kwargs.get("psf_fwhm_mm") == PHANTOM_PSF:
        _check_phantom_psf(path, cases)
        kwargs["psf_fwhm_mm"] = phantom_psf_mm(cases[0])
    if "prior" in kwargs and kwargs.get("restarts", "full") != "full":
        raise InputError(path, "[model] restarts: does not apply with a prior (its fit starts "
                               "from the prior's classes, not k-means)")
    if kwargs.get("prior") == LEAVE_ONE_OUT:
        for case in cases:
            if case["kind"] != "real":
                raise InputError(path, "[model] prior = \"leave-one-out\": needs real (delineated) cases "
                                       "only, not phantoms")
            if len(case["cohort"]) < MIN_CALIBRATION_CASES + 1:
                raise InputError(path, f"[model] prior = \"leave-one-out\": {case['name']} has "
                                       f"{len(case['cohort']) - 1} other cases with its modalities; "
                                       f"needs >= {MIN_CALIBRATION_CASES}")
        return
    if "prior" in kwargs:  # the prior fixes classes, beta and emissions; its file must load
        try:
            resolve_prior(kwargs["prior"])
        except InputError as error:
            raise InputError(path, f"[model] prior: {error}") from None
        return
    for modalities in {tuple(case.get("modalities", ["pet"])) for case in cases}:
        try:
            get_method(kwargs.get("model", "potts")).check_inputs(modalities)
            SegmentOptions.from_values(**kwargs).check(
                num_images=len(modalities), modalities=list(modalities), levels_percent=DEFAULT_LEVELS)
        except InputError as error:
            raise InputError(path, f"[model] {error}") from None


def _check_phantom_psf(path, cases) -> None:
    """[model] psf_fwhm_mm = "phantom" needs phantom cases only, each made with a PSF > 0."""
    for case in cases:
        if case["kind"] != "phantom":
            raise InputError(path, f"[model] psf_fwhm_mm = \"{PHANTOM_PSF}\": needs phantom cases only "
                                   f"(each fitted with its own scanner PSF), not {case['name']}")
        if phantom_psf_mm(case) <= 0:
            raise InputError(path, f"[phantoms] psf_fwhm_mm: must be > 0 with [model] psf_fwhm_mm = "
                                   f"\"{PHANTOM_PSF}\" (the PSF model), got {phantom_psf_mm(case):g}")


# --- where runs write -----------------------------------------------------------------------

def result_path(out: Path, run: Run) -> Path:
    return out / "runs" / run.run_id / "result.json"


def default_output(config_path) -> Path:
    return Path("results") / Path(config_path).stem


def input_files(runs) -> set[str]:
    """Every file the runs read: real cases' images, labels and index; prior and checkpoint
    files of the variants (phantoms are generated)."""
    files = set()
    for run in runs:
        case = run.case
        if case["kind"] == "real":
            files.update([*case["images"], case["label"], *([case["index"]] if "index" in case else [])])
        files.update(str(run.variant[key]) for key in PATH_KEYS
                     if key in run.variant and Path(str(run.variant[key])).is_absolute())
    return files
