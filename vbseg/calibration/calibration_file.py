"""Conformal calibration of one model variant: ``vbseg calibrate`` writes it, ``vbseg segment
--calibration`` applies it.

A calibration fits every case of an experiment config (one model variant, cases with exact or
delineated truth) and stores, per case, the conformity scores of :mod:`vbseg.calibration.conformal`: the
log-volume miss of the model's 95 % interval (split conformal; Lei, G'Sell, Rinaldo, Tibshirani &
Wasserman, JASA 2018), the false-negative-rate curve of the probability contours {p >= 1 - lambda}
on a fixed lambda grid (conformal risk control, Angelopoulos, Bates, Fisch, Lei & Schuster, ICLR
2024, with probability contours as in Zhang & Ray, COPA 2024) and the margin that the 50 % contour
needs to contain the truth (Mossina & Friedrich, MICCAI 2025). With it the file records what the
scores are valid for: the typed fit options, the sha256 of the prior and checkpoint, the code's
source digest, the case list and the command.

Applying it (:func:`plan_conformal` before any work, :meth:`ConformalPlan.apply` after the fit)
adds to a result ``summary.json["volume_ml_conformal"]`` (one entry per level) and the contours
``contour_crc<alpha %>.nii.gz`` and ``contour_margin<alpha %>.nii.gz``. The guarantee is marginal
(over new cases exchangeable with the calibration cases: same population, scanner, protocol and
model), not conditional on the case at hand.

Mondrian strata (Vovk, Gammerman & Shafer 2005, ch. 4; ``vbseg calibrate --strata``): the
cases are binned, at bin edges fixed before any case is fitted, by quantities a new case has
too: the model's mean volume and the fitted contrast-to-noise of each case's own fit, and the
PSF FWHM it was fitted with (:data:`STRATA_FEATURES`). A new case is scored against its own
stratum's cases alone, which makes the coverage hold conditionally on the stratum (still
marginal within it). A stratum needs at least 1/alpha - 1 cases for level 1 - alpha (19 for
95 %): a calibration is refused unless one stratum has
:data:`vbseg.calibration.conformal.MIN_STRATUM_CASES` (19); smaller strata are kept, and a new
case whose stratum cannot support a level (or is empty) is refused when it is applied. A stratum
of few cases can be what isolates the rare fits that fail outright (e.g. volumes above any lesion
of the cohort) from the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from vbseg.calibration.conformal import (
    MIN_STRATUM_CASES,
    bin_label,
    conformal_quantile,
    conformal_volume_interval,
    dilate_by,
    margin_counts,
    margin_score,
    risk_control_lambda,
    risk_control_margin,
    strata_indices,
    threshold_counts,
    volume_scores,
)
from vbseg.cohort.population import PACKAGED_PRIORS, source_digest
from vbseg.errors import InputError
from vbseg.io.volume import sha256_file
from vbseg.options import SegmentOptions, default_beta, model_fusion
from vbseg.posterior import credible_interval
from vbseg.potts.locate import default_locator

CALIBRATION_FORMAT = "vbseg-calibration"
CALIBRATION_VERSION = 1
# the model interval whose miss is scored (summary.json's volume_ml interval)
MODEL_INTERVAL_LEVEL = 0.95
# lambda of the contours {p >= 1 - lambda} scored for risk control
LAMBDA_GRID = np.round(np.linspace(0.0, 1.0, 201), 6)
# the dilation family's distances (mm) for risk control by a margin, in half-millimetre steps
# (finer than any voxel); after 60 mm its last member is the whole map
RISK_MARGIN_GRID_MM = np.round(np.arange(0.0, 60.0 + 1e-9, 0.5), 6)
MARGIN_CONTOUR_LEVEL = 0.5
DEFAULT_CONFORMAL_LEVELS = (90.0, 95.0)
# A calibration holds for the model and fit options it was made with (SegmentOptions.model and
# .fit); the output options (SegmentOptions.outputs: the draws) change how the posterior is
# summarised, not the fit, and may differ. The files of these model options enter by sha256:
HASHED_OPTIONS = ("prior", "checkpoint")
# Mondrian strata (Vovk, Gammerman & Shafer 2005): quantities of a case's own fit, known for a
# new case: name -> (its key in a case record, its label, its unit, what it is)
STRATA_FEATURES = {
    "volume": ("mean_ml", "volume", " mL", "the model's mean tumour volume (mL) of the case's own fit"),
    "contrast": ("contrast_to_noise", "CNR", "",
                 "the fitted contrast-to-noise: (tumour class mean - most frequent other class's "
                 "mean) / that class's sd in the first image of the likelihood "
                 "(summary.json parameters.contrast_to_noise)"),
    "psf": ("psf_fwhm_mm", "FWHM", " mm",
            "the scanner PSF FWHM (mm) the case was fitted with (--psf-fwhm; summary.json "
            "options.psf_fwhm_mm): a setting, so a new case's stratum is known before its fit"),
}
DEFAULT_STRATA_BINS = {"volume": (5.0, 50.0), "contrast": (10.0,), "psf": (6.0,)}
NO_STRATA = "all"  # the one stratum of a calibration without strata
# calibrations shipped in vbseg/data/calibrations, named for --calibration NAME
PACKAGED_CALIBRATIONS = {"pet-phantom": "calibrations/pet-phantom.json",
                         "pet-phantom-psf": "calibrations/pet-phantom-psf.json",
                         "sarcoma": "calibrations/sarcoma.json"}
# [model] psf_fwhm_mm = "phantom" (vbseg.experiment.config): each phantom case is fitted with the PSF
# model given its own scanner FWHM; its calibration records options.psf_fwhm_mm = "phantom" and
# the FWHM range of its cases ("psf_fwhm_mm_range"), and a new case's --psf-fwhm must lie in it
PHANTOM_PSF = "phantom"
# How a calibration's scores were made (its "scheme"): SPLIT, every case fitted by the one model
# that a new case is fitted by; CROSS_FIT, each case fitted by its fold's model (a prior learned
# without its fold) while a new case is fitted by the model learned from every case
SPLIT, CROSS_FIT = "split", "cross-fit"
# The code a calibration's scores depend on (the fit from images to a posterior, and the scores
# themselves): its digest, recorded by ``vbseg calibrate``, is what a packaged calibration must
# match. The whole package's digest (vbseg.cohort.population.source_digest) would change with every
# edit of the CLI, the docs strings of the writers or this module's applying code, which leave
# the scores as they were.
MODEL_CODE = ("potts", "pv_potts", "gp", "cohort", "baselines", "inference", "methods", "deep/model.py",
              "deep/segment.py", "prepare.py", "io/image.py", "options.py", "records.py", "posterior.py",
              "calibration/conformal.py", "envelope.py")


def model_digest() -> str:
    """sha256 of the modules in :data:`MODEL_CODE` (paths and contents)."""
    return source_digest(MODEL_CODE)


@contextlib.contextmanager
def calibration_file(name_or_path):
    """The path of a calibration file: a packaged one by its name (:data:`PACKAGED_CALIBRATIONS`)
    or the path as given."""
    if str(name_or_path) in PACKAGED_CALIBRATIONS:
        resource = resources.files("vbseg") / "data" / PACKAGED_CALIBRATIONS[str(name_or_path)]
        with resources.as_file(resource) as path:
            yield path
    else:
        yield Path(name_or_path)


def _file_hash(value) -> str | None:
    """sha256 of a prior or checkpoint file (a packaged prior's by name); None when none."""
    if value is None:
        return None
    if not isinstance(value, (str, Path)):
        return f"in-memory {type(value).__name__}"
    if str(value) in PACKAGED_PRIORS:
        with resources.as_file(resources.files("vbseg") / "data" / PACKAGED_PRIORS[str(value)]) as path:
            return sha256_file(path)
    if not Path(value).is_file():
        raise InputError(value, "not found")
    return sha256_file(value)


def scheme_guarantee(scheme: str) -> str:
    """What a calibration of ``scheme`` (:data:`SPLIT`, :data:`CROSS_FIT`) guarantees a new case."""
    if scheme == SPLIT:
        return ("split conformal: every calibration case was fitted by the model a new case is "
                "fitted by, so the levels hold marginally (>= the level, over new cases exchangeable "
                "with the calibration cases; Vovk et al. 2005; Lei et al. 2018)")
    if scheme == CROSS_FIT:
        return ("cross-validation calibration of the procedure, not split conformal: each case's "
                "scores come from a fit with the prior learned without its fold (out-of-fold "
                "scores), while a new case is fitted with the deployed prior learned from all the "
                "cases. Applying the out-of-fold scores to the deployed model is the K-fold "
                "'CV' (jackknife-style) interval of Barber, Candes, Ramdas & Tibshirani (Ann. Stat. "
                "2021): about the level in practice when the deployed prior behaves like the fold "
                "priors, with no finite-sample guarantee (that needs CV+, which fits a new case "
                "with every fold's prior and guarantees only >= 1 - 2 alpha - "
                "min(2(1 - 1/K)/(n/K + 1), (1 - K/n)/(K + 1)))")
    raise InputError("calibration", f"unknown scheme {scheme!r} (this vbseg knows {SPLIT}, {CROSS_FIT})")


def effective_prior(options: SegmentOptions, modalities):
    """The prior a fit uses: ``--prior``, or the packaged one locate-potts locates with when no
    prior is given (so a calibration made with ``prior = "sarcoma"`` matches a run without
    ``--prior``, and a run with another prior does not)."""
    if options.model.prior is not None or options.model.name != "locate-potts":
        return options.model.prior
    return "sarcoma" if default_locator(options, modalities) in ("prior", "both") else None


def fit_identity(options: SegmentOptions, modalities) -> dict:
    """What a calibration is valid for: the modalities, every fit option (defaults resolved;
    the external field as given or not) and the sha256 of the prior and checkpoint (the prior a
    locate-potts fit locates with when none is given: :func:`effective_prior`)."""
    options = options.replace(prior=effective_prior(options, modalities))
    fields = {keyword: value for keyword, value in options.values(("model", "fit")).items()
              if keyword not in HASHED_OPTIONS}
    fields["beta"] = default_beta(options.model)
    fields["fusion"] = model_fusion(options.model, modalities)
    fields["external_field"] = options.model.external_field is not None
    if options.model.name == "locate-potts":
        fields["locator"] = default_locator(options, modalities)
    identity = {"modalities": list(modalities), "options": fields,
                "files": {name: _file_hash(getattr(options.model, name)) for name in HASHED_OPTIONS}}
    return json.loads(json.dumps(identity))


def _edges(option: str, text, positive: bool) -> list[float]:
    """Bin edges from "a,b,..." or a sequence: finite, strictly increasing (and > 0)."""
    try:
        edges = [float(x) for x in (text.split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        raise InputError(option, f"needs comma-separated numbers, got {text!r}") from None
    if not edges or not all(math.isfinite(x) and (x > 0 or not positive) for x in edges) \
            or any(b <= a for a, b in zip(edges, edges[1:])):
        raise InputError(option, f"needs strictly increasing finite{' positive' if positive else ''} "
                                 f"edges, got {text!r}")
    return edges


def strata_spec(by="none", volume_bins_ml=None, contrast_bins=None, psf_bins_mm=None) -> dict:
    """The Mondrian strata of a calibration, fixed before any case is fitted: ``by`` is "none"
    or a comma-separated list of distinct features (volume, contrast, psf); each feature is cut
    at its bin edges (half-open bins; defaults :data:`DEFAULT_STRATA_BINS`). InputError naming
    the option otherwise."""
    names = [] if by in (None, "", "none") else [name.strip() for name in str(by).split(",")]
    if any(name not in STRATA_FEATURES for name in names) or len(set(names)) != len(names):
        raise InputError("--strata", f"must be none or distinct features among "
                                     f"{', '.join(STRATA_FEATURES)} (e.g. volume,psf); got {by!r}")
    given = {"volume": volume_bins_ml, "contrast": contrast_bins, "psf": psf_bins_mm}
    for name, edges in given.items():
        if edges is not None and name not in names:
            raise InputError(f"--{name}-bins", f"goes with --strata {name}")
    return {"by": names,
            "bins": {name: _edges(f"--{name}-bins", DEFAULT_STRATA_BINS[name] if given[name] is None
                                  else given[name], positive=name in ("volume", "psf")) for name in names},
            "features": {name: STRATA_FEATURES[name][3] for name in names}}


def stratum_of(case: dict, spec: dict) -> str:
    """The stratum of a case record (or a new case's features: ``mean_ml``, ``contrast_to_noise``,
    ``psf_fwhm_mm``) under ``spec``. InputError when the model does not record a feature the strata need."""
    parts = []
    for name in spec["by"]:
        key, label, unit, _ = STRATA_FEATURES[name]
        value = case.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError("--strata", f"{name} strata need each fit's {key}, which this model does "
                                         "not record")
        parts.append(bin_label(value, spec["bins"][name], label, unit))
    return ", ".join(parts) if parts else NO_STRATA


def strata_groups(labels) -> dict:
    """{stratum: indices of its cases} (strata sorted); InputError unless one stratum has
    MIN_STRATUM_CASES cases (a smaller one is refused when a case falls in it: ConformalPlan)."""
    groups = strata_indices(labels)
    largest = max(groups, key=lambda label: groups[label].size)
    if groups[largest].size < MIN_STRATUM_CASES:
        raise InputError("calibration", f"no stratum has >= {MIN_STRATUM_CASES} cases (the largest, "
                                        f"{largest!r}, has {groups[largest].size})")
    return groups


def stratify(record: dict, spec: dict, source) -> dict:
    """``record`` (a calibration) with ``spec`` as its strata and each case's stratum; InputError
    naming ``source`` when a case lacks a feature or no stratum has MIN_STRATUM_CASES cases."""
    try:
        labels = [stratum_of(case, spec) for case in record["cases"]]
        if spec["by"]:
            strata_groups(labels)
    except InputError as error:
        raise InputError(source, error.problem) from None
    return {**record, "strata": spec,
            "cases": [{**case, "stratum": label} for case, label in zip(record["cases"], labels)]}


def case_scores(posterior, truth, true_ml: float, spacing) -> dict:
    """One calibration case's record: the model's interval, the truth, the one-voxel floor and
    the three conformity scores."""
    interval = posterior.volume_interval(MODEL_INTERVAL_LEVEL)
    floor_ml = float(np.prod(spacing)) / 1000.0
    contour = posterior.probability >= np.float32(MARGIN_CONTOUR_LEVEL)
    margin = margin_score(contour, truth, spacing)
    return {
        "lower_ml": interval["lower"], "upper_ml": interval["upper"], "mean_ml": interval["mean"],
        "true_ml": float(true_ml), "floor_ml": floor_ml,
        "volume_score": float(volume_scores(interval["lower"], interval["upper"], true_ml, floor_ml)),
        **curve_counts(posterior.probability, contour, truth, spacing),
        "margin_mm": None if math.isinf(margin) else margin,
        "contrast_to_noise": posterior.summary.get("parameters", {}).get("contrast_to_noise"),
        "psf_fwhm_mm": posterior.summary.get("options", {}).get("psf_fwhm_mm"),
    }


def curve_counts(probability, contour, truth, spacing) -> dict:
    """A case's risk curves as voxel counts (exact and compact; :func:`with_curves` turns them
    into rates): the true voxels and, over the threshold family {p >= 1 - lambda} of
    LAMBDA_GRID and over the dilation family of the 50 % ``contour`` by RISK_MARGIN_GRID_MM (then
    the whole map), the true voxels each member misses and its size."""
    missed, size = threshold_counts(probability, truth, LAMBDA_GRID)
    margin_missed, margin_size = margin_counts(contour, truth, spacing, RISK_MARGIN_GRID_MM)
    return {"truth_voxels": int(np.asarray(truth, bool).sum()), "missed_voxels": run_lengths(missed),
            "contour_voxels": run_lengths(size), "margin_missed_voxels": run_lengths(margin_missed),
            "margin_contour_voxels": run_lengths(margin_size)}


def run_lengths(counts) -> list[list[int]]:
    """A step curve of counts as [value, repeats] runs (a mean-field map's threshold curve holds
    about 15 distinct values over the 201 lambdas)."""
    values = np.asarray(counts, np.int64)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    return [[int(values[i]), int(n)] for i, n in zip(starts, np.diff(np.r_[starts, values.size]))]


def expand_runs(runs, length: int | None = None) -> list[int]:
    """The counts of :func:`run_lengths` runs, one per grid point; ValueError unless each run is
    [count >= 0, repeats >= 1] (integers) and, ``length`` given, the repeats add up to it."""
    def whole(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(runs, list) or not all(
            isinstance(run, list) and len(run) == 2 and whole(run[0]) and whole(run[1])
            and run[0] >= 0 and run[1] >= 1 for run in runs):
        raise ValueError("runs must be [count, repeats] pairs of non-negative integers")
    if length is not None and sum(run[1] for run in runs) != length:
        raise ValueError(f"runs cover {sum(run[1] for run in runs)} grid points, not {length}")
    return [value for value, repeats in runs for _ in range(repeats)]


# the stored count runs of a case, the rate each gives, and the grid it spans ("lambda": the
# lambda grid; "margin": the dilation grid and the whole map)
COUNT_CURVES = {"missed_voxels": ("fnr", "lambda"), "contour_voxels": ("stretch", "lambda"),
                "margin_missed_voxels": ("fnr_margin", "margin"),
                "margin_contour_voxels": ("stretch_margin", "margin")}


def with_curves(case: dict, lengths: dict) -> dict:
    """``case`` with its rates from the stored count runs: ``fnr`` and ``stretch`` (contour size over
    the truth's) over LAMBDA_GRID, ``fnr_margin`` and ``stretch_margin`` over the dilation
    family (``lengths``: the points of the "lambda" and "margin" grids); a case stored before
    counts (rates only) as it is. ValueError for counts that cannot be a case's."""
    if not isinstance(case, dict) or "missed_voxels" not in case:
        return case
    n = case.get("truth_voxels")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError("truth_voxels must be a positive integer")
    rates = {}
    for key, (rate, grid) in COUNT_CURVES.items():
        if key in case:
            if lengths[grid] is None:
                raise ValueError(f"{key} without risk_margin_grid_mm")
            counts = expand_runs(case[key], lengths[grid])
            if key.endswith("missed_voxels") and max(counts) > n:
                raise ValueError(f"{key} exceeds truth_voxels")
            rates[rate] = [count / n for count in counts]
    return {**case, **rates}


def _margin_grid(path, grid) -> int | None:
    """The number of members of a calibration's dilation family (its distances and the whole
    map), None without one; InputError unless the distances are finite, >= 0 and increasing."""
    if grid is None:
        return None
    if not (isinstance(grid, list) and grid and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
            for x in grid) and all(b > a for a, b in zip(grid, grid[1:]))):
        raise InputError(path, "is not a vbseg calibration (risk_margin_grid_mm must be increasing "
                               "distances >= 0 in mm)")
    return len(grid) + 1


CASE_KEYS = ("name", "lower_ml", "upper_ml", "true_ml", "floor_ml", "volume_score", "fnr", "margin_mm")


def load_calibration(path) -> dict:
    """A calibration JSON, checked; InputError (one line) for anything that is not one."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(path, f"is not a vbseg calibration ({type(error).__name__})") from None
    if not isinstance(record, dict) or record.get("format") != CALIBRATION_FORMAT:
        raise InputError(path, f"is not a vbseg calibration (no \"format\": \"{CALIBRATION_FORMAT}\")")
    if record.get("version") != CALIBRATION_VERSION:
        raise InputError(path, f"calibration version {record.get('version')!r}; this vbseg reads "
                               f"{CALIBRATION_VERSION}")
    cases, grid = record.get("cases"), record.get("lambda_grid")
    if not isinstance(cases, list) or not cases or not isinstance(grid, list):
        raise InputError(path, "is not a vbseg calibration (no cases or no lambda grid)")
    lengths = {"lambda": len(grid), "margin": _margin_grid(path, record.get("risk_margin_grid_mm"))}
    try:
        cases = [with_curves(case, lengths) for case in cases]
    except (TypeError, KeyError, ValueError) as error:
        raise InputError(path, f"is not a vbseg calibration (a case's risk counts are malformed: "
                               f"{error})") from None
    for case in cases:
        if not isinstance(case, dict) or any(key not in case for key in CASE_KEYS) \
                or len(case["fnr"]) != len(grid):
            raise InputError(path, "is not a vbseg calibration (a case lacks its scores)")
    scheme = record.get("scheme", SPLIT)  # absent: made before cross-fitted calibrations existed
    if scheme not in (SPLIT, CROSS_FIT):
        raise InputError(path, f"calibration scheme {scheme!r}; this vbseg reads {SPLIT} and {CROSS_FIT}")
    psf_range(path, record)
    return {**record, "cases": cases, "scheme": scheme, "strata": _stored_strata(path, record.get("strata"))}


def _stored_strata(path, strata) -> dict:
    """A calibration's strata spec, checked as :func:`strata_spec` checks the options (absent:
    no strata, a calibration made before they existed)."""
    if strata is None:
        return strata_spec()
    try:
        by, bins = strata["by"], strata["bins"]
        if not isinstance(by, list) or not isinstance(bins, dict) or set(bins) != set(by):
            raise TypeError
        return strata_spec(",".join(by) or "none", bins.get("volume"), bins.get("contrast"), bins.get("psf"))
    except (KeyError, TypeError):
        raise InputError(path, "is not a vbseg calibration (its strata lack \"by\" or their bins)") from None
    except InputError as error:
        raise InputError(path, f"strata: {error.problem}") from None


def psf_range(path, record: dict) -> list[float] | None:
    """The FWHM range (mm) of a calibration over phantoms of several scanner PSFs
    (options.psf_fwhm_mm = PHANTOM_PSF); None for any other. InputError when it lacks the range."""
    if record.get("options", {}).get("psf_fwhm_mm") != PHANTOM_PSF:
        return None
    bounds = record.get("psf_fwhm_mm_range")
    if not (isinstance(bounds, list) and len(bounds) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                    for x in bounds) and bounds[0] <= bounds[1]):
        raise InputError(path, f"is not a vbseg calibration (psf_fwhm_mm = \"{PHANTOM_PSF}\" needs "
                               "psf_fwhm_mm_range: [lowest, highest] mm > 0)")
    return [float(x) for x in bounds]


def check_identity(path, record: dict, identity: dict) -> None:
    """InputError naming the first fit option, modality set or file hash that differs (for a
    calibration over a PSF range: --psf-fwhm outside it)."""
    if record.get("modalities") != identity["modalities"]:
        raise InputError(path, f"calibrated for modalities {record.get('modalities')}, this run has "
                               f"{identity['modalities']}")
    bounds = psf_range(path, record)
    if bounds is not None:
        value = identity["options"]["psf_fwhm_mm"]
        if value is None or not bounds[0] <= value <= bounds[1]:
            given = "no --psf-fwhm" if value is None else f"--psf-fwhm {value:g}"
            raise InputError(path, f"calibrated for --psf-fwhm {bounds[0]:g}-{bounds[1]:g} mm (each "
                                   f"case fitted with its scanner's FWHM), this run has {given}")
        identity = {**identity, "options": {**identity["options"], "psf_fwhm_mm": PHANTOM_PSF}}
    for group in ("options", "files"):
        calibrated = record.get(group, {})
        for key, value in identity[group].items():
            if calibrated.get(key, "(absent)") != value:
                what = f"the {key} file's sha256" if group == "files" else f"option {key}"
                raise InputError(path, f"calibrated with {what} = {calibrated.get(key, '(absent)')!r}, "
                                       f"this run has {value!r} (fit options, prior and checkpoint "
                                       "must match the calibration's)")


def alpha_text(level_percent: float) -> str:
    """The miscoverage in percent as it appears in file names (level 95 -> "5")."""
    return f"{100.0 - level_percent:g}"


CONTOUR_KINDS = ("crc", "margin", "crcmargin")  # file-name kinds, as in contour_<kind><alpha %>
# summary.json's key for each kind's entry in volume_ml_conformal
CONTOUR_ENTRIES = dict(zip(CONTOUR_KINDS, ("contour_crc", "contour_margin", "contour_crc_margin")))


def conformal_output_names(levels_percent, kinds=CONTOUR_KINDS) -> list[str]:
    """The contour files a calibration adds for these levels (percent): each of ``kinds`` (a
    calibration made before the dilation family's counts has no "crcmargin")."""
    return [f"contour_{kind}{alpha_text(level)}.nii.gz" for level in levels_percent for kind in kinds]


@dataclasses.dataclass(frozen=True)
class StratumCalibration:
    """One stratum's calibrated quantities for each level: the log-volume quantile q, the
    risk-control lambda, the margin (mm; inf when some case's 50 % contour was empty) and the
    risk-control margin of the dilation family (mm, inf for the whole map; None for a
    calibration made before that family's counts were stored)."""

    n: int
    quantiles: tuple
    lambdas: tuple
    margins_mm: tuple
    risk_margins_mm: tuple | None = None


def calibrate_stratum(cases: list[dict], lambda_grid, levels, margin_grid_mm=None) -> StratumCalibration:
    """The quantities of :class:`StratumCalibration` from these cases' scores (InputError when
    they are too few for a level); the risk-control margins when ``margin_grid_mm`` (the
    calibration's risk_margin_grid_mm) is given and every case has its dilation curve."""
    scores = [case["volume_score"] for case in cases]
    fnr = np.asarray([case["fnr"] for case in cases], np.float64)
    margins = [math.inf if case["margin_mm"] is None else case["margin_mm"] for case in cases]
    alphas = [1.0 - level / 100.0 for level in levels]
    calibrated = StratumCalibration(len(cases), tuple(conformal_quantile(scores, a) for a in alphas),
                                    tuple(risk_control_lambda(fnr, lambda_grid, a) for a in alphas),
                                    tuple(conformal_quantile(margins, a) for a in alphas))
    if margin_grid_mm is None or not all("fnr_margin" in case for case in cases):
        return calibrated
    losses = np.asarray([case["fnr_margin"] for case in cases], np.float64)
    return dataclasses.replace(calibrated, risk_margins_mm=tuple(
        risk_control_margin(losses, margin_grid_mm, a) for a in alphas))


def _guarantees(level: float, stratum: str, n: int, scheme: str = SPLIT) -> tuple[str, str, str, str]:
    """What the volume interval, the CRC contour, the margin contour and the CRC margin contour
    each guarantee (for a cross-fitted calibration: what each estimates, with no finite-sample
    guarantee)."""
    alpha = 1.0 - level / 100.0
    over = f"the {n} calibration cases" + ("" if stratum == NO_STRATA else f" of stratum {stratum!r}")
    miss = f"the log-volume miss of the model's {MODEL_INTERVAL_LEVEL:.0%} interval"
    if scheme == CROSS_FIT:
        cv = (f"cross-validation (K-fold 'CV', jackknife-style; Barber et al., Ann. Stat. 2021): the "
              f"out-of-fold fits of {over} (each with a prior learned without its fold), applied to "
              "this fit with the deployed prior; no finite-sample guarantee")
        return (f"{miss}: coverage of the true volume about {level / 100:g}, estimated by {cv}",
                f"E[false-negative rate] about {alpha:g} (conformal risk control), estimated by {cv}",
                f"contains the whole lesion with probability about {level / 100:g} (calibrated margin "
                f"of the {MARGIN_CONTOUR_LEVEL:.0%} contour), estimated by {cv}",
                f"E[false-negative rate] about {alpha:g} (conformal risk control over the dilations "
                f"of the {MARGIN_CONTOUR_LEVEL:.0%} contour), estimated by {cv}")
    if stratum == NO_STRATA:
        volume = (f"split conformal on {miss}: marginal coverage >= {level / 100:g} of the true volume "
                  f"under exchangeability with {over} (not conditional on this case's size or contrast)")
    else:
        volume = (f"Mondrian split conformal (Vovk, Gammerman & Shafer 2005) on {miss}: coverage >= "
                  f"{level / 100:g} of the true volume conditional on the stratum ({stratum}, from this "
                  f"case's own fit), under exchangeability with {over}")
    return (volume, f"E[false-negative rate] <= {alpha:g} (conformal risk control over {over})",
            f"contains the whole lesion with probability >= {level / 100:g} (calibrated margin of "
            f"the {MARGIN_CONTOUR_LEVEL:.0%} contour over {over})",
            f"E[false-negative rate] <= {alpha:g} (conformal risk control over the dilations of the "
            f"{MARGIN_CONTOUR_LEVEL:.0%} contour, over {over})")


def _margin_entry(margin_mm: float) -> dict:
    """A dilated contour's margin for summary.json (None for the whole map)."""
    return {"margin_mm": None if math.isinf(margin_mm) else margin_mm}


@dataclasses.dataclass(frozen=True)
class ConformalPlan:
    """A calibration's quantities for each level in each of its strata (computed before any
    fit); a new case is scored in the stratum its own fit falls in."""

    path: str
    sha256: str
    levels_percent: tuple
    strata: dict  # the calibration's strata spec (:func:`strata_spec`)
    by_stratum: dict  # stratum -> StratumCalibration
    source_digest: str
    model_digest: str = ""
    scheme: str = SPLIT  # SPLIT or CROSS_FIT (:func:`scheme_guarantee`)
    refused: dict = dataclasses.field(default_factory=dict)  # stratum -> why it cannot be applied

    def output_names(self) -> list[str]:
        dilation = next(iter(self.by_stratum.values())).risk_margins_mm is not None  # all or none
        return conformal_output_names(self.levels_percent, CONTOUR_KINDS if dilation else CONTOUR_KINDS[:2])

    def stratum(self, features: dict) -> str:
        """The stratum of a new case from its own fit's ``features``; InputError naming the
        calibration when it has no cases there."""
        try:
            label = stratum_of(features, self.strata)
        except InputError as error:
            raise InputError(self.path, error.problem) from None
        if label in self.refused:
            raise InputError(self.path, f"this case falls in stratum {label!r}, whose "
                                        f"{self.refused[label]}")
        if label not in self.by_stratum:
            raise InputError(self.path, f"this case falls in stratum {label!r}, which has no "
                                        f"calibration cases (calibrated: {', '.join(self.by_stratum)})")
        return label

    def apply(self, result, prepared):
        """``result`` (a MethodResult) with the conformal entries and contours added (its
        sections and maps, which the method registry writes with the rest); InputError when
        the case's stratum has no calibration cases."""
        interval = credible_interval(result.volume_draws_ml, MODEL_INTERVAL_LEVEL)
        features = {"mean_ml": interval["mean"],
                    "contrast_to_noise": (result.parameters or {}).get("contrast_to_noise"),
                    "psf_fwhm_mm": (result.options or {}).get("psf_fwhm_mm")}
        stratum = self.stratum(features)
        calibrated = self.by_stratum[stratum]
        floor_ml, spacing = prepared.reference.voxel_volume_ml, prepared.reference.spacing
        probability = np.asarray(result.probability, np.float64)
        contour = result.probability >= np.float32(MARGIN_CONTOUR_LEVEL)
        entries, maps = [], {}
        risk_margins = calibrated.risk_margins_mm or (None,) * len(self.levels_percent)
        for level, q, lam, margin, risk_margin in zip(self.levels_percent, calibrated.quantiles,
                                                      calibrated.lambdas, calibrated.margins_mm,
                                                      risk_margins):
            lower, upper = conformal_volume_interval(interval["lower"], interval["upper"], q, floor_ml)
            names = {kind: f"contour_{kind}{alpha_text(level)}.nii.gz" for kind in CONTOUR_KINDS}
            texts = dict(zip(("volume", *CONTOUR_KINDS),
                             _guarantees(level, stratum, calibrated.n, self.scheme)))
            contours = {"crc": ((probability >= 1.0 - lam), {"lambda": lam, "threshold": 1.0 - lam}),
                        "margin": (dilate_by(contour, margin, spacing), _margin_entry(margin))}
            if risk_margin is not None:
                contours["crcmargin"] = (dilate_by(contour, risk_margin, spacing), _margin_entry(risk_margin))
            entry = {"level": level / 100.0, "lower": lower, "upper": upper, "n": calibrated.n,
                     "stratum": stratum, "score": q, "guarantee": texts["volume"]}
            for kind, (mask, values) in contours.items():
                maps[names[kind]] = mask.astype(np.uint8)
                entry[CONTOUR_ENTRIES[kind]] = {"file": names[kind], **values, "guarantee": texts[kind]}
            entries.append(entry)
        record = {"path": self.path, "sha256": self.sha256,
                  "n": sum(s.n for s in self.by_stratum.values()),
                  "strata": {"by": self.strata["by"], "bins": self.strata["bins"],
                             "n": {label: s.n for label, s in self.by_stratum.items()},
                             "refused": dict(self.refused)},
                  "stratum": stratum, "features": features, "scheme": self.scheme,
                  "guarantee": scheme_guarantee(self.scheme),
                  "source_digest": self.source_digest,
                  "source_digest_matches": self.source_digest == source_digest(),
                  "model_digest": self.model_digest,
                  "model_digest_matches": self.model_digest == model_digest()}
        return dataclasses.replace(
            result, maps={**result.maps, **maps},
            sections={**result.sections, "volume_ml_conformal": entries, "conformal_calibration": record})


def plan_conformal(path, levels_percent, options: SegmentOptions, modalities) -> ConformalPlan:
    """Load the calibration at ``path`` (or the packaged one of that name), check it was made
    with these fit options, and compute each level's calibrated quantities in each stratum;
    InputError (one line) for every refusal (no stratum with MIN_STRATUM_CASES cases, a level no
    stratum's cases can support). A stratum too small for a level is kept in ``refused``: a new
    case that falls in it is refused when the plan is applied."""
    levels = tuple(float(level) for level in levels_percent)
    if not levels or len(set(levels)) != len(levels):
        raise InputError("--conformal-levels", "needs one or more distinct levels")
    for level in levels:
        if not 0.0 < level < 100.0:
            raise InputError("--conformal-levels", f"each level must be strictly between 0 and 100, "
                                                   f"got {level:g}")
    with calibration_file(path) as file:
        record = load_calibration(file)
        sha256 = sha256_file(file)
    check_identity(path, record, fit_identity(options, modalities))
    spec = record["strata"]
    cases = record["cases"]
    try:
        labels = [stratum_of(case, spec) for case in cases]
        groups = strata_groups(labels) if spec["by"] else {NO_STRATA: np.arange(len(cases))}
        by_stratum, refused = {}, {}
        for label, members in groups.items():
            try:
                by_stratum[label] = calibrate_stratum([cases[i] for i in members], record["lambda_grid"],
                                                      levels, record.get("risk_margin_grid_mm"))
            except InputError as error:
                refused[label] = error.problem
        if not by_stratum:
            label = next(iter(refused))
            raise InputError(path, ("" if label == NO_STRATA else f"stratum {label!r}: ") + refused[label])
    except InputError as error:
        raise InputError(path, error.problem) from None
    if any(s.risk_margins_mm is None for s in by_stratum.values()):  # all or none write crcmargin
        by_stratum = {label: dataclasses.replace(s, risk_margins_mm=None) for label, s in by_stratum.items()}
    return ConformalPlan(str(path), sha256, levels, spec, by_stratum, record.get("source_digest", ""),
                         record.get("model_digest", ""), record["scheme"], refused)
