"""Between-patient volume error of a contouring model: a located-or-missed mixture learned by
leave-one-out over delineated cases.

A model's own volume draws (independent voxel labels from its marginals) spread over a few mL;
on real scans the error that matters is systematic: the expert's GTV follows the anatomical
mass, the model follows the image, and now and then the model contours something else
entirely (a hot node, a bladder, nothing at all). A single log-normal error model fitted to
leave-one-out residuals r = log(V_manual / V_model) is broken by one such miss: a held-out
case whose contour is empty has r = log(V_manual / 0) (tens after flooring), the residual sd
grows to several units and the "95 % interval" spans zero to millions of mL. So the error is
modelled as a two-component mixture, each component a posterior predictive:

* **Located** (the held-out 50 % contour overlaps the manual GTV, Dice >= ``LOCATED_DICE``):
  log V = log V_model + rbar + s sqrt(1 + 1/n_L) t_(n_L - 1), the predictive of a normal
  model with the Jeffreys prior from the n_L located residuals (mean rbar, sd s).
* **Missed** (any other case): the model's volume says nothing about the tumour's, so the
  volume is a draw from the population of manual volumes: log V = m + s_V sqrt(1 + 1/n) t_(n-1)
  (m, s_V: mean and sd of log V_manual over all n training cases). Its TLG, when the first
  image is PET, is that volume times a draw of the manual GTVs' SUVmean from the same
  log-normal predictive over the training cases.

The located component may instead be a regression (``located_model="regression"``, what
``vbseg fit-prior --calibrate-method`` learns for a method other than the prior): the normal
linear model log V = a + b log V_model + e from the n_L located cases, whose posterior
predictive under the Jeffreys prior p(a, b, sigma) ~ 1/sigma is
a + b x + s sqrt(1 + x' (X'X)^-1 x) t_(n_L - 2) with x = (1, log V_model) (Gelman et al.,
Bayesian Data Analysis, 3rd ed., section 14.2). A slope below 1 says the method's volume
errors shrink toward the cohort's typical volume (large model volumes too large, small ones too
small), which a fixed ratio cannot express.

A new scan whose own 50 % contour is empty is a miss by definition (Dice 0): every draw comes
from the population. For any other scan the miss probability is the posterior predictive of a
Beta(1, 1) prior on the miss rate among scans with a non-empty contour: with k misses among the
n' training cases whose held-out contour was not empty, (k + 1) / (n' + 2) (a training case with
an empty contour says nothing about how often a contour that exists is in the wrong place). The
probability map, and so every contour, is not changed by any of this.
"""

from __future__ import annotations

import numpy as np

from vbseg.metrics import dice

CALIBRATION_FORMAT = "located-or-missed/1"
LOCATED_DICE = 0.2
MIN_CALIBRATION_CASES = 3
# fewer located residuals than this: no located component (every draw from the population)
MIN_LOCATED_CASES = 3
# the regression's located component needs two more than its two coefficients
MIN_REGRESSION_CASES = 4
LOCATED_MODELS = ("ratio", "regression")
DEFINITION = (f"held-out case located when its 50 % contour has Dice >= {LOCATED_DICE:g} with the "
              "manual GTV; located: r = log(V_manual / V_model), V_model = sum of P(tumour) x voxel "
              "volume, case contoured with the prior pooled from the other training cases; missed: "
              "volume from the training cases' manual volumes")
METHOD = (
    "independent voxel draws from the mean-field marginals, then the between-patient volume error "
    "learned by leave-one-out over the training cases: with probability (k + 1) / (n' + 2) (k missed of "
    "the n' cases whose held-out contour was not empty; 1 when this scan's contour is empty) a draw from "
    "the training cases' manual volumes, otherwise the draw times "
    "exp(rbar + s sqrt(1 + 1/n_L) t_(n_L - 1)) from the n_L located residuals "
    "(vbseg.cohort.volume_error)")


def calibration_entry(name: str, probability, tumour, voxel_ml: float, suv=None) -> dict:
    """What one held-out training case contributes: its manual and model volumes, the Dice of
    its 50 % contour, whether it was located and (``suv`` given) the manual GTV's SUVmean."""
    tumour = np.asarray(tumour, bool)
    probability = np.asarray(probability)
    overlap = dice(probability >= 0.5, tumour)
    entry = {"case": name, "manual_ml": float(tumour.sum()) * voxel_ml,
             "model_ml": float(probability.sum()) * voxel_ml, "dice50": float(overlap),
             "located": bool(overlap >= LOCATED_DICE),
             "contour_empty": not bool((probability >= 0.5).any())}
    if suv is not None:
        entry["manual_suv_mean"] = float(np.mean(np.asarray(suv)[tumour]))
    return entry


def _log_normal_predictive(values) -> dict:
    logs = np.log(np.asarray(values, np.float64))
    return {"mean": float(logs.mean()), "sd": float(logs.std(ddof=1)), "n": int(logs.size)}


def _located_regression(located: list[dict]) -> dict:
    """Least squares of log manual on (1, log model) volume over the located entries, with what
    the posterior predictive needs: coefficients, residual scale s, (X'X)^-1, dof n - 2."""
    x = np.log(np.asarray([e["model_ml"] for e in located], np.float64))
    y = np.log(np.asarray([e["manual_ml"] for e in located], np.float64))
    design = np.stack([np.ones_like(x), x], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    residuals = y - design @ coefficients
    dof = x.size - 2
    return {"model": "regression", "intercept": float(coefficients[0]), "slope": float(coefficients[1]),
            "scale": float(np.sqrt(residuals @ residuals / dof)), "dof": int(dof),
            "xtx_inv": np.linalg.inv(design.T @ design).tolist(), "n": int(x.size)}


def calibration_from_entries(entries: list[dict], located_model: str = "ratio") -> dict | None:
    """The mixture's parameters from per-case entries (:func:`calibration_entry`); None with
    fewer than ``MIN_CALIBRATION_CASES`` cases. ``located_model``: "ratio" (a fixed log-ratio)
    or "regression" (module doc); the regression needs ``MIN_REGRESSION_CASES`` located cases
    and a model volume that varies, else the located component is absent."""
    if located_model not in LOCATED_MODELS:
        raise ValueError(f"located_model must be one of {LOCATED_MODELS}, got {located_model!r}")
    if len(entries) < MIN_CALIBRATION_CASES:
        return None
    n = len(entries)
    located = [e for e in entries if e["located"]]
    missed = n - len(located)
    with_contour = [e for e in entries if not e["contour_empty"]]
    missed_with_contour = sum(not e["located"] for e in with_contour)
    calibration = {"format": CALIBRATION_FORMAT, "n": n, "missed": missed,
                   "empty_contours": n - len(with_contour),
                   "miss_probability": (missed_with_contour + 1) / (len(with_contour) + 2), "located": None,
                   "manual_log_volume": _log_normal_predictive([e["manual_ml"] for e in entries]),
                   "manual_log_suv_mean": None, "entries": list(entries), "definition": DEFINITION}
    if located_model == "regression":
        model_volumes = {round(np.log(e["model_ml"]), 9) for e in located if e["model_ml"] > 0}
        if len(located) >= MIN_REGRESSION_CASES and len(model_volumes) >= 2:
            calibration["located"] = _located_regression(located)
    elif len(located) >= MIN_LOCATED_CASES:
        residuals = [np.log(e["manual_ml"] / e["model_ml"]) for e in located]
        calibration["located"] = {"log_ratio_mean": float(np.mean(residuals)),
                                  "log_ratio_sd": float(np.std(residuals, ddof=1)), "n": len(located)}
    if all("manual_suv_mean" in e for e in entries):
        calibration["manual_log_suv_mean"] = _log_normal_predictive([e["manual_suv_mean"] for e in entries])
    return calibration


def check_calibration(calibration) -> None:
    """ValueError unless ``calibration`` is None or this module's format."""
    if calibration is not None and (not isinstance(calibration, dict)
                                    or calibration.get("format") != CALIBRATION_FORMAT):
        raise ValueError(f"volume_calibration is not {CALIBRATION_FORMAT!r} (written by an older "
                         "vbseg: learn the prior again with vbseg fit-prior)")


def describe(calibration) -> str:
    """One line for the command line: the mixture's miss rate and located residuals."""
    if calibration is None:
        return f"no volume calibration (< {MIN_CALIBRATION_CASES} cases)"
    text = (f"volume error: {calibration['missed']} of {calibration['n']} held-out cases missed, "
            f"{calibration['empty_contours']} with an empty contour (miss probability "
            f"{calibration['miss_probability']:.2f} for a scan with a contour)")
    located = calibration["located"]
    if located is None:
        return text + "; too few located cases: volumes from the training cases"
    if located.get("model") == "regression":
        return text + (f"; located: log V = {located['intercept']:+.2f} + {located['slope']:.2f} log V_model "
                       f"+- {located['scale']:.2f} (n = {located['n']})")
    return text + (f"; located log-ratio {located['log_ratio_mean']:+.2f} +- {located['log_ratio_sd']:.2f} "
                   f"(n = {located['n']})")


def _predictive_draws(rng, predictive: dict, size) -> np.ndarray:
    n = predictive["n"]
    t = rng.standard_t(n - 1, size=size)
    return np.exp(predictive["mean"] + predictive["sd"] * np.sqrt(1 + 1 / n) * t)


def _located_factor(rng, located: dict, volume_draws) -> np.ndarray:
    """Per draw, the predicted manual volume over the model's (the located component)."""
    size = volume_draws.shape
    if located.get("model") != "regression":
        predictive = {"mean": located["log_ratio_mean"], "sd": located["log_ratio_sd"], "n": located["n"]}
        return _predictive_draws(rng, predictive, size)
    # a draw of 0 mL (no voxel labelled) is floored at 1 uL before the log
    log_model = np.log(np.maximum(volume_draws, 1e-3))
    xtx_inv = np.asarray(located["xtx_inv"], np.float64)
    leverage = xtx_inv[0, 0] + 2 * xtx_inv[0, 1] * log_model + xtx_inv[1, 1] * log_model**2
    t = rng.standard_t(located["dof"], size=size)
    log_manual = (located["intercept"] + located["slope"] * log_model
                  + located["scale"] * np.sqrt(1 + leverage) * t)
    return np.exp(log_manual - log_model)


def calibrated_draws(volume_draws, tlg_draws, calibration, seed, contour_empty: bool):
    """Volume (and TLG) draws under the mixture (module doc); ``contour_empty``: the new scan's
    50 % contour is empty (every draw a miss). Returns (volumes, tlg or None, miss fraction)."""
    volume_draws = np.asarray(volume_draws, np.float64)
    if calibration is None:
        return volume_draws, tlg_draws, 0.0
    rng = np.random.default_rng(seed + 7919)
    size = volume_draws.shape
    p_miss = 1.0 if contour_empty or calibration["located"] is None else calibration["miss_probability"]
    miss = rng.random(size) < p_miss
    volumes = volume_draws.copy()
    tlg = None if tlg_draws is None else np.asarray(tlg_draws, np.float64).copy()
    if calibration["located"] is not None:
        factor = _located_factor(rng, calibration["located"], volume_draws)
        volumes = np.where(miss, volumes, volumes * factor)
        if tlg is not None:
            tlg = np.where(miss, tlg, tlg * factor)
    population = _predictive_draws(rng, calibration["manual_log_volume"], size)
    volumes = np.where(miss, population, volumes)
    if tlg is not None:
        suv = calibration["manual_log_suv_mean"]
        # without the training GTVs' SUVmean a missed draw's TLG is unknown: no TLG at all
        tlg = None if suv is None else np.where(miss, population * _predictive_draws(rng, suv, size), tlg)
    return volumes, tlg, float(miss.mean())
