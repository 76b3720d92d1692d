"""Locate, then delineate (``--model locate-potts``): a learned component says *where* the lesion
is, the hidden Potts model says where its boundary lies and how sure it is.

1. **Locate.** The locator gives P_loc(tumour) on the crop: the population prior's fit
   (``--locator prior``: :mod:`vbseg.cohort.population`, classes learned from delineated cases over
   every image, so CT and MR can find a lesion that is not hot on PET), the network's sigmoid
   (``--locator network``: :mod:`vbseg.deep.model`), or both (the mean of their log-odds).
   Its regions are the connected components (26-neighbourhood) of P_loc >= 1/2; those holding
   at least ``REGION_MASS_SHARE`` of the largest one's probability mass are kept, and the
   delineation VOI is their bounding box grown by ``--locate-margin`` mm (default
   ``DEFAULT_MARGIN_MM``) on every side, inside the given VOI. With no region the locator says
   nothing about where the lesion is: the whole VOI is delineated by the data-only model (no
   field: a map that says "not here" everywhere would only push the tumour class down), and
   the ``locator-found-nothing`` warning says so.
2. **Delineate.** The hidden Potts model of ``--model potts`` (the same fit, likelihood and
   ``--fusion`` rule) inside that VOI, with the locator's log-odds (clipped to +-``LOGIT_CLIP``)
   as the external field on the tumour class and its weight learned from the image (as
   ``deep-potts`` learns its network's weight), so the image keeps the last word on the
   boundary and the locator only sets the prior odds.
3. **Disagreement.** When the locator found a region and the delineation's 50 % region and
   the locator's overlap with Dice below ``AGREEMENT_DICE`` (an image region the locator
   rejects, or a located region without image support), vbseg does not pick one: the result
   is the equal-weight mixture of the two posteriors (probability map and volume draws, each
   from its own model), so the probabilities fall where they disagree and the volume interval
   spans both answers, and the ``locator-image-disagree`` warning is raised. This is model
   averaging with equal weights: the locator's fit and the Potts fit share no marginal
   likelihood that could weigh them against each other (a weight learned by stacking on the
   prior's leave-one-out segmentations was tried and did no better out of sample:
   docs/research/locate.md). Both answers are written beside prob.nii.gz, whether or not they
   disagree (``LOCATOR_FILE``, ``DELINEATION_FILE``).
4. **The image's own answer outside the box.** The locator confines the delineation to its box,
   so a hot region elsewhere (an FDG-avid lesion the locator missed, or a hot organ) would go
   unseen. The data-only model of ``--model potts`` is therefore also fitted on the whole VOI;
   when at least ``IMAGE_OUTSIDE_SHARE`` of its 50 % region lies outside the box, the
   ``image-region-outside-locator`` warning names that region's volume and share. The result
   is not changed (the two fits answer different questions: where the learned components
   look, and what is most distinct in the image anywhere), so the warning is the signal to
   look, or to run ``--model potts``.

5. **Its volume error.** When the prior that locates carries a volume error learned for
   locate-potts (``method_calibrations["locate-potts"]``: each of its training cases segmented
   by locate-potts with the prior learned from the others, ``vbseg fit-prior
   --calibrate-method locate-potts``; :mod:`vbseg.cohort.method_error`), the volume draws are
   put through it (:func:`vbseg.cohort.volume_error.calibrated_draws`): the interval then
   carries the between-patient error of the method on delineated cases, not only the spread
   of one fit. The probability map is not changed. The error was learned with locate-potts's
   default settings and the prior as locator; with any other setting (``--locator both``,
   ``--fusion joint``, another margin, ...) it is not applied, and the warning
   ``volume-error-not-applied`` says so.

This is the two-stage design of coarse-to-fine segmentation (a detector proposes a region, a
local model delineates it), with the delineation a hidden MRF whose external field is the
detector's output (cf. the CNN-plus-CRF pipelines of Kamnitsas et al., Med Image Anal 2017).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from scipy import ndimage

from vbseg.cohort.method import prior_crop_probability, prior_subject
from vbseg.cohort.population import resolve_prior
from vbseg.cohort.volume_error import calibrated_draws, describe
from vbseg.deep import model as deep
from vbseg.deep.segment import load_network
from vbseg.errors import InputError
from vbseg.io.result_files import DELINEATION_FILE, LOCATOR_FILE
from vbseg.methods.registry import Method, MethodResult, register
from vbseg.metrics import dice
from vbseg.options import SegmentOptions, default_beta, model_fusion
from vbseg.potts.method import potts_result
from vbseg.records import independent_draws

LOCATORS = ("prior", "network", "both")
DEFAULT_MARGIN_MM = 20.0
REGION_MASS_SHARE = 0.1
LOGIT_CLIP = 8.0
AGREEMENT_DICE = 0.5
IMAGE_OUTSIDE_SHARE = 0.5
CALIBRATED_METHOD = ("{draws}, then the between-patient volume error of locate-potts learned by "
                     "leave-one-out over the prior's training cases (vbseg.cohort.method_error: a "
                     "miss draws from the training cases' manual volumes, a located case from the "
                     "regression of log manual on log model volume)")
MIXTURE_METHOD = ("equal-weight mixture of the delineation's and the locator's volume draws "
                  "(they disagree; each from independent voxel labels of its own map)")


DEFAULT_MODEL_RULE = (
    "without --model: locate-potts with the packaged sarcoma prior when the images are PET, CT and "
    "MR in that order (the prior's modalities) and every model and fit option is at locate-potts's "
    "defaults (those its out-of-sample numbers and its learned volume error hold for: no --prior, "
    "--checkpoint, --external-field, --classes, --fusion, --psf-fwhm, --beta, --restarts, "
    "--sampler, --envelope-mm, ...); potts otherwise, and for other tumours (the prior was learned "
    "from soft-tissue sarcomas of the extremities; docs/research/locate.md)")


def default_model(modalities, options: dict) -> str:
    """The method ``vbseg segment`` uses without ``--model`` (DEFAULT_MODEL_RULE), from the
    images' modalities and the flat option keywords given (None: not given)."""
    if list(modalities) != list(resolve_prior("sarcoma").modalities):
        return "potts"
    given = {k: v for k, v in options.items() if v is not None and k != "model"}
    if any(k in given for k in ("prior", "checkpoint", "external_field")):
        return "potts"
    try:
        candidate = SegmentOptions.from_values(**given, model="locate-potts")
    except TypeError:
        return "potts"  # an unknown keyword: plan_segment says so
    return "locate-potts" if at_learned_settings(candidate, modalities) else "potts"


def default_locator(options, modalities) -> str:
    """``--locator`` when not given: the prior when one is given or the packaged one is for
    these modalities, else the network."""
    if options.model.locator is not None:
        return options.model.locator
    if options.model.prior is not None:
        return "prior"
    packaged = resolve_prior("sarcoma")
    return "prior" if list(modalities) == list(packaged.modalities) else "network"


def check_locate_options(options, modalities) -> None:
    """InputError naming the option when the locate-potts options cannot work together (after
    the shared checks of :meth:`vbseg.options.SegmentOptions.check`)."""
    locator = default_locator(options, modalities)
    if locator not in LOCATORS:
        raise InputError("--locator", f"must be one of {', '.join(LOCATORS)}, got {locator!r}")
    margin = options.model.locate_margin_mm
    if margin is not None and not (np.isfinite(margin) and 0 <= margin <= 200):
        raise InputError("--locate-margin", f"must be a number of mm from 0 to 200, got {margin!r}")
    if options.model.external_field is not None:
        raise InputError("--external-field", "does not go with locate-potts (its locator gives the "
                                             "external field)")
    if locator == "network" and options.model.prior is not None:
        raise InputError("--prior", "is a locator: give --locator prior or both, not network")
    if locator in ("prior", "both"):
        prior = resolve_prior("sarcoma" if options.model.prior is None else options.model.prior)
        prior.check_modalities(modalities, prior_subject(options.model.prior)[1] if options.model.prior
                               is not None else "--locator")
    if locator in ("network", "both"):
        load_network(options.model.checkpoint, modalities)


def locating_prior(options, modalities):
    """The population prior the locator uses, or None (``--locator network``)."""
    if default_locator(options, modalities) not in ("prior", "both"):
        return None
    return resolve_prior("sarcoma" if options.model.prior is None else options.model.prior)


def learned_settings(options, modalities) -> tuple:
    """(model options, fit options) of ``options`` with what a learned volume error does not
    depend on set aside (the prior itself, the network) and every default resolved; the output
    options (the number of draws) are not among them."""
    resolved = options.replace(
        prior=None, checkpoint=None, beta=default_beta(options.model),
        fusion=model_fusion(options.model, modalities), locator=default_locator(options, modalities))
    return resolved.model, resolved.fit


def at_learned_settings(options, modalities) -> bool:
    """Whether ``options`` are those locate-potts's learned parts were learned with: its
    defaults, the prior as locator (:func:`learned_settings` of both agree)."""
    learned = learned_settings(SegmentOptions.from_values(model="locate-potts", locator="prior"), modalities)
    return learned_settings(options, modalities) == learned


def method_volume_error(prepared, options, probability, volume_draws, tlg_draws):
    """(volume draws, TLG draws, the record or None) after the locating prior's locate-potts
    volume error, when it has one and this run's settings are those it was learned with (module
    doc, step 5); otherwise the draws as they were and, when it has one, a record saying why."""
    prior = locating_prior(options, prepared.modalities)
    calibration = None if prior is None else prior.method_calibrations.get("locate-potts")
    if calibration is None:
        return volume_draws, tlg_draws, None
    if not at_learned_settings(options, prepared.modalities):
        return volume_draws, tlg_draws, {"applied": False}
    volumes, tlg, missed = calibrated_draws(volume_draws, tlg_draws, calibration, prepared.seed,
                                            contour_empty=not bool((probability >= 0.5).any()))
    record = {"applied": True, "description": describe(calibration), "missed_draw_fraction": missed,
              "uncalibrated_volume_ml": {"mean": float(np.mean(volume_draws)),
                                         "lower_95": float(np.quantile(volume_draws, 0.025)),
                                         "upper_95": float(np.quantile(volume_draws, 0.975))},
              **{k: v for k, v in calibration.items() if k != "entries"}}
    return volumes.astype(np.float32), tlg, record


def locator_logit(prepared, options):
    """(log-odds (x, y, z) on the crop, record for summary.json, seconds) of the locator."""
    locator = default_locator(options, prepared.modalities)
    start = time.perf_counter()
    logits, record = [], {"locator": locator}
    if locator in ("prior", "both"):
        prior = resolve_prior("sarcoma" if options.model.prior is None else options.model.prior)
        probability, fit = prior_crop_probability(prepared, prior)
        clipped = np.clip(probability, 1e-6, 1 - 1e-6)
        logits.append(np.log(clipped) - np.log1p(-clipped))
        record["prior"] = {"source": prior_subject(options.model.prior)[0] if options.model.prior is not None
                           else "packaged sarcoma prior", "cases": prior.cases,
                           "converged": fit["converged"]}
    if locator in ("network", "both"):
        network, path = load_network(options.model.checkpoint, prepared.modalities)
        logits.append(deep.network_logits(network, prepared.stack, prepared.observed,
                                          list(prepared.modalities)))
        record["network"] = {"checkpoint": path, "members": len(network.models),
                             "training": {k: network.meta.get(k) for k in ("seed", "real_cases")}}
    logit = np.mean(logits, axis=0).astype(np.float32)
    return np.where(prepared.crop_voi, logit, -LOGIT_CLIP), record, time.perf_counter() - start


def located_regions(probability, crop_voi):
    """(mask of the kept regions: the 26-connected components of P >= 1/2 inside the VOI holding
    at least ``REGION_MASS_SHARE`` of the largest one's mass; the record {"regions", "kept"})."""
    labels, count = ndimage.label((probability >= 0.5) & crop_voi, structure=np.ones((3, 3, 3)))
    if count == 0:
        return np.zeros(probability.shape, bool), {"regions": 0, "kept": 0}
    mass = ndimage.sum(probability, labels, np.arange(1, count + 1))
    kept = 1 + np.flatnonzero(mass >= REGION_MASS_SHARE * mass.max())
    return np.isin(labels, kept), {"regions": int(count), "kept": int(kept.size)}


def located_box(probability, crop_voi, spacing, margin_mm):
    """(box: slices of the crop around the kept regions (:func:`located_regions`) grown by
    ``margin_mm``, or None when no voxel reaches 1/2; the regions' record)."""
    regions, record = located_regions(probability, crop_voi)
    if not record["regions"]:
        return None, record
    index = np.nonzero(regions)
    grow = np.ceil(margin_mm / np.asarray(spacing, float)).astype(int)
    box = tuple(slice(max(0, int(i.min()) - g), min(n, int(i.max()) + 1 + g))
                for i, g, n in zip(index, grow, crop_voi.shape))
    return box, record


def image_outside_box(prepared, options, bounds) -> dict:
    """The data-only model (``--model potts``, no field) on the whole VOI: its 50 % region's
    volume (mL) and the share of it outside ``bounds`` (slices of the first grid)."""
    plain = potts_result(prepared, options.replace(model="potts"), None, None, 0.0)
    region = plain.probability >= 0.5
    inside = np.zeros(region.shape, bool)
    inside[tuple(bounds)] = True
    count = int(region.sum())
    return {"image_region_ml": float(count * prepared.reference.voxel_volume_ml),
            "image_outside_share": float((region & ~inside).sum() / count) if count else 0.0}


def run_locate(prepared, options) -> MethodResult:
    """Locate, then delineate (module doc)."""
    logit, record, locate_s = locator_logit(prepared, options)
    located = 1.0 / (1.0 + np.exp(-logit))
    margin = options.model.locate_margin_mm
    margin = DEFAULT_MARGIN_MM if margin is None else float(margin)
    box, regions = located_box(located, prepared.crop_voi, prepared.reference.spacing, margin)
    warnings, field = [], None
    if box is None:
        warnings.append({"code": "locator-found-nothing",
                         "message": "the locator found no region (no voxel reaches P = 0.5); the "
                                    "whole VOI was delineated by the data-only model"})
        box = tuple(slice(0, n) for n in prepared.crop_voi.shape)
    else:
        field = np.clip(logit[box], -LOGIT_CLIP, LOGIT_CLIP)
    regions["kept_mass_ml"] = float(located[box].sum() * prepared.reference.voxel_volume_ml)
    inner = prepared.within(box)
    result = potts_result(inner, options.replace(model="potts"), field,
                          {"source": "locator", **record}, locate_s)
    located_full = prepared.on_grid(located)
    agreement = dice(result.probability >= 0.5, located_full >= 0.5)
    probability, volume_draws, tlg_draws = result.probability, result.volume_draws_ml, result.tlg_draws
    volume_method = result.volume_method
    mixed = field is not None and agreement < AGREEMENT_DICE  # a locator with no region abstains
    if mixed:
        warnings.append({"code": "locator-image-disagree",
                         "message": f"the delineation and the locator overlap with Dice "
                                    f"{agreement:.2f} (< {AGREEMENT_DICE:g}); the result is their "
                                    "equal-weight mixture, so probabilities and the volume "
                                    "interval carry both answers"})
        probability = (0.5 * (result.probability + located_full)).astype(np.float32)
        loc_volumes, loc_tlg = independent_draws(located_full, prepared.reference, prepared.pet_first,
                                                 prepared.seed + 1, options.outputs.volume_draws)
        half = options.outputs.volume_draws // 2
        volume_draws = np.concatenate([result.volume_draws_ml[:half],
                                       loc_volumes[: options.outputs.volume_draws - half]])
        if tlg_draws is not None:
            draws = options.outputs.volume_draws
            tlg_draws = np.concatenate([result.tlg_draws[:half], loc_tlg[: draws - half]])
        volume_method = MIXTURE_METHOD
    volume_draws, tlg_draws, volume_error = method_volume_error(prepared, options, probability,
                                                                volume_draws, tlg_draws)
    if volume_error is not None and volume_error["applied"]:
        volume_method = CALIBRATED_METHOD.format(draws=volume_method)
    elif volume_error is not None:
        warnings.append({"code": "volume-error-not-applied",
                         "message": "the prior carries locate-potts's volume error, learned with its "
                                    "default settings and the prior as locator; these settings differ, "
                                    "so the volume interval is one fit's spread, far too narrow for "
                                    "real scans (vbseg fit-prior --calibrate-method learns it anew)"})
    bounds = inner.bounds
    outside = {} if field is None else image_outside_box(prepared, options, bounds)
    if outside and outside["image_outside_share"] >= IMAGE_OUTSIDE_SHARE:
        warnings.append({"code": "image-region-outside-locator",
                         "message": f"{outside['image_outside_share']:.0%} of the data-only "
                                    f"model's 50 % region ({outside['image_region_ml']:.1f} mL) "
                                    "lies outside the located box, which was not delineated: an "
                                    "FDG-avid lesion the locator missed, or a hot organ; check it "
                                    "(--model potts delineates the whole VOI)"})
    run_options = {**result.options,
                   "locate": {**record, "margin_mm": margin, "region_mass_share": REGION_MASS_SHARE,
                              "logit_clip": LOGIT_CLIP, "agreement_dice": AGREEMENT_DICE,
                              "image_outside_share": IMAGE_OUTSIDE_SHARE,
                              "rule": "delineation VOI = bounding box of the locator's regions "
                                      "(P >= 1/2) grown by the margin; locator log-odds as the "
                                      "external field, weight learned; equal mixture when the two "
                                      "disagree; a warning when the data-only model's 50 % region "
                                      "lies mostly outside the box"}}
    diagnostics = {**result.diagnostics,
                   "locate": {**regions, "box": [[int(s.start), int(s.stop)] for s in bounds],
                              "agreement_dice": float(agreement),
                              "mixed": mixed, **outside},
                   **({"volume_error": volume_error} if volume_error is not None else {})}
    sections = {**result.sections, "warnings": [*result.sections.get("warnings", []), *warnings]}
    return dataclasses.replace(result, probability=probability, volume_draws_ml=volume_draws,
                               tlg_draws=tlg_draws, volume_method=volume_method,
                               model="locate-potts", options=run_options, diagnostics=diagnostics,
                               sections=sections, maps={**result.maps, LOCATOR_FILE: located_full,
                                                        DELINEATION_FILE: result.probability})


register(Method("locate-potts", run_locate,
                "locate, then delineate: a population prior and/or network locates the lesion, "
                "hidden Potts delineates it with their log-odds as the field", rank=3,
                extra_outputs=lambda options: [LOCATOR_FILE, DELINEATION_FILE],
                needs_pet=True, check_options=check_locate_options, takes_prior=True))
