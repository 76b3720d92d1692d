"""Conformal calibration of one model variant: ``vbseg calibrate`` writes it, ``vbseg segment
--calibration`` applies it.

A calibration fits every case of an experiment config (one model variant, cases with exact or
delineated truth) and stores, per case, the conformity scores of :mod:`vbseg.conformal`: the
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
"""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from vbseg.conformal import (
    conformal_quantile,
    conformal_volume_interval,
    dilate_by,
    fnr_curves,
    margin_score,
    risk_control_lambda,
    volume_scores,
)
from vbseg.errors import InputError
from vbseg.options import SegmentOptions, default_beta, default_fusion
from vbseg.population import PACKAGED_PRIORS, source_digest
from vbseg.posterior import credible_interval
from vbseg.volume import sha256_file

CALIBRATION_FORMAT = "vbseg-calibration"
CALIBRATION_VERSION = 1
# the model interval whose miss is scored (summary.json's volume_ml interval)
MODEL_INTERVAL_LEVEL = 0.95
# lambda of the contours {p >= 1 - lambda} scored for risk control
LAMBDA_GRID = np.round(np.linspace(0.0, 1.0, 201), 6)
MARGIN_CONTOUR_LEVEL = 0.5
DEFAULT_CONFORMAL_LEVELS = (90.0, 95.0)
# options that change the outputs' sampling, not the fit: they may differ from the calibration's
OUTPUT_OPTIONS = ("volume_draws",)
HASHED_OPTIONS = ("prior", "checkpoint")
# the stratum candidate recorded per case: the model's mean volume, binned (mL)
VOLUME_BINS_ML = (5.0, 50.0)
STRATUM = "all"  # this version pools every case (no Mondrian strata yet)


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


def fit_identity(options: SegmentOptions, modalities) -> dict:
    """What a calibration is valid for: the modalities, every fit option (defaults resolved;
    the external field as given or not) and the sha256 of the prior and checkpoint."""
    fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
              if f.name not in OUTPUT_OPTIONS + HASHED_OPTIONS}
    fields["beta"] = default_beta(options)
    fields["fusion"] = options.fusion or default_fusion(options.model, modalities, options.covariance)
    fields["external_field"] = options.external_field is not None
    identity = {"modalities": list(modalities), "options": fields,
                "files": {name: _file_hash(getattr(options, name)) for name in HASHED_OPTIONS}}
    return json.loads(json.dumps(identity))


def volume_stratum(mean_ml: float) -> str:
    """The estimated-volume bin of a case (a Mondrian stratum candidate known at test time)."""
    low, high = VOLUME_BINS_ML
    return f"<{low:g} mL" if mean_ml < low else f"{low:g}-{high:g} mL" if mean_ml < high else f">={high:g} mL"


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
        "fnr": [float(x) for x in fnr_curves([posterior.probability], [truth], LAMBDA_GRID)[0]],
        "margin_mm": None if math.isinf(margin) else margin,
        "stratum_candidate": volume_stratum(interval["mean"]),
    }


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
    for case in cases:
        if not isinstance(case, dict) or any(key not in case for key in CASE_KEYS) \
                or len(case["fnr"]) != len(grid):
            raise InputError(path, "is not a vbseg calibration (a case lacks its scores)")
    return record


def check_identity(path, record: dict, identity: dict) -> None:
    """InputError naming the first fit option, modality set or file hash that differs."""
    if record.get("modalities") != identity["modalities"]:
        raise InputError(path, f"calibrated for modalities {record.get('modalities')}, this run has "
                               f"{identity['modalities']}")
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


def conformal_output_names(levels_percent) -> list[str]:
    """The contour files a calibration adds for these levels (percent)."""
    return [f"contour_{kind}{alpha_text(level)}.nii.gz" for level in levels_percent
            for kind in ("crc", "margin")]


@dataclasses.dataclass(frozen=True)
class ConformalPlan:
    """The calibrated quantities for each level (computed before any fit): the log-volume
    quantile q, the risk-control lambda and the margin (mm; inf when some case's 50 % contour
    was empty)."""

    path: str
    sha256: str
    levels_percent: tuple
    n: int
    quantiles: tuple
    lambdas: tuple
    margins_mm: tuple
    source_digest: str

    def output_names(self) -> list[str]:
        return conformal_output_names(self.levels_percent)

    def apply(self, result, prepared):
        """``result`` (a MethodResult) with the conformal entries and contours added (its
        sections and maps, which the method registry writes with the rest)."""
        interval = credible_interval(result.volume_draws_ml, MODEL_INTERVAL_LEVEL)
        floor_ml, spacing = prepared.reference.voxel_volume_ml, prepared.reference.spacing
        probability = np.asarray(result.probability, np.float64)
        contour = result.probability >= np.float32(MARGIN_CONTOUR_LEVEL)
        entries, maps = [], {}
        for level, q, lam, margin in zip(self.levels_percent, self.quantiles, self.lambdas,
                                         self.margins_mm):
            alpha = 1.0 - level / 100.0
            lower, upper = conformal_volume_interval(interval["lower"], interval["upper"], q, floor_ml)
            crc, dilated = (f"contour_{kind}{alpha_text(level)}.nii.gz" for kind in ("crc", "margin"))
            maps[crc] = (probability >= 1.0 - lam).astype(np.uint8)
            maps[dilated] = dilate_by(contour, margin, spacing).astype(np.uint8)
            entries.append({
                "level": level / 100.0, "lower": lower, "upper": upper, "n": self.n,
                "stratum": STRATUM, "score": q,
                "guarantee": (f"split conformal on the log-volume miss of the model's "
                              f"{MODEL_INTERVAL_LEVEL:.0%} interval: marginal coverage >= {level / 100:g} "
                              f"of the true volume under exchangeability with the {self.n} calibration "
                              "cases (not conditional on this case's size or contrast)"),
                "contour_crc": {"file": crc, "lambda": lam, "threshold": 1.0 - lam,
                                "guarantee": f"E[false-negative rate] <= {alpha:g} (conformal risk "
                                             f"control over the {self.n} calibration cases)"},
                "contour_margin": {"file": dilated, "margin_mm": None if math.isinf(margin) else margin,
                                   "guarantee": f"contains the whole lesion with probability >= "
                                                f"{level / 100:g} (calibrated margin of the "
                                                f"{MARGIN_CONTOUR_LEVEL:.0%} contour)"},
            })
        record = {"path": self.path, "sha256": self.sha256, "n": self.n,
                  "source_digest": self.source_digest,
                  "source_digest_matches": self.source_digest == source_digest()}
        return dataclasses.replace(
            result, maps={**result.maps, **maps},
            sections={**result.sections, "volume_ml_conformal": entries, "conformal_calibration": record})


def plan_conformal(path, levels_percent, options: SegmentOptions, modalities) -> ConformalPlan:
    """Load the calibration at ``path``, check it was made with these fit options, and compute
    each level's calibrated quantities; InputError (one line) for every refusal."""
    levels = tuple(float(level) for level in levels_percent)
    if not levels or len(set(levels)) != len(levels):
        raise InputError("--conformal-levels", "needs one or more distinct levels")
    for level in levels:
        if not 0.0 < level < 100.0:
            raise InputError("--conformal-levels", f"each level must be strictly between 0 and 100, "
                                                   f"got {level:g}")
    record = load_calibration(path)
    check_identity(path, record, fit_identity(options, modalities))
    cases = record["cases"]
    scores = [case["volume_score"] for case in cases]
    fnr = np.asarray([case["fnr"] for case in cases], np.float64)
    margins = [math.inf if case["margin_mm"] is None else case["margin_mm"] for case in cases]
    quantiles, lambdas, margin_q = [], [], []
    for level in levels:
        alpha = 1.0 - level / 100.0
        try:
            quantiles.append(conformal_quantile(scores, alpha))
            lambdas.append(risk_control_lambda(fnr, record["lambda_grid"], alpha))
            margin_q.append(conformal_quantile(margins, alpha))
        except InputError as error:
            raise InputError(path, error.problem) from None
    return ConformalPlan(str(path), sha256_file(path), levels, len(cases), tuple(quantiles),
                         tuple(lambdas), tuple(margin_q), record.get("source_digest", ""))
