"""The hidden Potts model as a method: ``potts`` (the default, but for PET + CT + MR:
:data:`vbseg.potts.locate.DEFAULT_MODEL_RULE`) and ``deep-potts`` (a network's
logits as the external field, its weight learned).

From the prepared crop: the images ``--fusion`` puts in the likelihood, log-PET where asked,
standardised (y - median) / sd; the PET noise weights and the PSF where asked; the prior
log-odds map on the tumour class; then the mean-field VB fit under ``jax.jit``
(:func:`vbseg.potts.fitting.fit_potts`; compile time apart from run time), optionally followed by the
Gibbs sampler. Classes are ordered by increasing mean in the first image of the likelihood.

Which class is tumour: the class carrying the prior log-odds map (or the GP intensity field on
the tumour class) when there is one; else, with PET in the likelihood, the class with the
highest mean PET uptake (FDG-avid lesions are the hottest structure in a lesion-centred VOI);
else the class ``--tumour-class`` names (CT and MR have no safe rule: a lesion may be darker or
brighter than its surroundings).
"""

from __future__ import annotations

import numpy as np

from vbseg.deep.segment import tumour_field
from vbseg.errors import InputError
from vbseg.methods.inputs import likelihood_inputs, prior_log_odds
from vbseg.methods.registry import Method, MethodResult, register
from vbseg.options import default_beta, fixed_beta
from vbseg.posterior import INDEPENDENT_DRAWS_METHOD
from vbseg.potts.beta import AUTO_BETA_START, BETA_LEARNED_TEXT
from vbseg.potts.emissions import describe_emission, log_transform_pet
from vbseg.potts.fitting import (
    GIBBS_BURN_IN,
    GIBBS_CHAINS,
    fit_potts,
    learned_or_fixed,
    pet_relative_precision,
    sample_potts,
    tumour_voxels,
)
from vbseg.potts.intensity_field import DEFAULT_LENGTHSCALE_MM, INTENSITY_FILE, IntensityFieldSpec
from vbseg.potts.model import DEFAULT_CONCENTRATION, NormalGammaPrior, neighbour_weights
from vbseg.potts.multiscale import RESTARTS
from vbseg.potts.psf import signal_fwhm, whitening_text
from vbseg.prepare import standardise
from vbseg.records import independent_draws

FIELD_LEARNED_TEXT = (
    "the prior log-odds map's weight gamma learned (uniform prior on [0, 5]; variational EM "
    "from gamma = 0, the data-only fit, with a joint pseudo-likelihood step for beta and gamma "
    "after each label sweep; vbseg.potts.beta.estimate_coupling_pl)"
)
GIBBS_DRAWS_METHOD = (
    f"posterior draws of the whole label field: Gibbs (labels, class means and "
    f"precisions, proportions), {GIBBS_CHAINS} chains started at the VB solution, "
    f"{GIBBS_BURN_IN} burn-in sweeps, one draw per kept sweep; R-hat and ESS in diagnostics"
)


def noise_model(likelihood, crop_voi, options):
    """(PSF FWHM per image or None, relative precision (x, y, z, M') or None); the PET's FWHM
    is what is left of the PSF once ``--noise-fwhm`` has whitened it (:func:`signal_fwhm`)."""
    if options.model.psf_fwhm_mm is None:
        return None, None
    pet_fwhm = signal_fwhm(options.model.psf_fwhm_mm, options.model.noise_fwhm_mm)
    psf = tuple(pet_fwhm if m == "pet" else 0.0 for m in likelihood.modalities)
    precision = np.ones(likelihood.stack.shape, np.float32)
    if options.model.pet_noise == "poisson":
        for m, modality in enumerate(likelihood.modalities):
            if modality == "pet":
                precision[..., m] = pet_relative_precision(likelihood.measured[..., m], crop_voi)
    return psf, precision


def _fit(prepared, options, likelihood, features, prior_logit):
    """The VB fit (then Gibbs with --sampler gibbs): (FitOutcome, the tumour-class rules of
    :func:`tumour_choice`, intensity spec, whether the field weight was learned, the beta of
    the VB fit, the learned-beta check's record or None, whether a prior log-odds map entered).
    With --beta auto the fit is checked against the one at the fixed default beta and falls
    back to it when the learned beta fails (:func:`vbseg.potts.fitting.learned_or_fixed`)."""
    model = options.model
    reference, num_classes, tumour_class = prepared.reference, model.num_classes, model.tumour_class
    beta = default_beta(options.model)
    learn_beta = beta == "auto"
    psf, precision = noise_model(likelihood, prepared.crop_voi, options)
    field, field_class = None, None
    if prior_logit is not None:
        # the k-means starts number classes by level in the first image (PET, or
        # --tumour-class says which); the field's class stays the tumour class
        field_class = num_classes - 1 if tumour_class is None else int(tumour_class)
        field = tumour_field(prior_logit, num_classes, field_class)
    learn_weight = field is not None and options.model.field_weight == "auto"
    intensity = None
    if options.model.intensity_field is not None:
        tumour_in_fit = num_classes - 1 if tumour_class is None else int(tumour_class)
        intensity = IntensityFieldSpec(
            classes=tuple(range(num_classes)) if options.model.intensity_field == "all" else (tumour_in_fit,),
            spacing_mm=reference.spacing,
            lengthscale_mm=options.model.intensity_lengthscale_mm or DEFAULT_LENGTHSCALE_MM)
    emission, covariance = options.model.emission, options.model.covariance
    arguments = dict(features=features, observed=likelihood.observed, voi=prepared.crop_voi,
                     spacing=reference.spacing, num_classes=num_classes,
                     beta=AUTO_BETA_START if learn_beta else beta, psf_fwhm_mm=psf,
                     relative_precision=precision, neighbourhood=options.model.neighbourhood,
                     beta_estimator="pl" if learn_beta else "fixed",
                     emission="full" if covariance == "full" else
                     ("student" if emission == "student" else "gaussian"), dof=options.model.dof,
                     external_field=field, learn_field_weight=learn_weight,
                     field_weight=0.0 if learn_weight or field is None else float(options.model.field_weight),
                     intensity=intensity, multiscale=RESTARTS[options.fit.restarts])
    fit = fit_potts(**arguments)
    pet_index = likelihood.modalities.index("pet") if "pet" in likelihood.modalities else None
    rules = dict(field_class=field_class,
                 intensity_class=intensity.classes[0] if options.model.intensity_field == "tumour" else None,
                 pet_index=pet_index,
                 pet_image=None if pet_index is None else likelihood.columns[pet_index] + 1,
                 tumour_class=tumour_class)
    learned_beta_record = None
    if learn_beta:  # checked against the fit at the fixed default beta (learned_or_fixed)
        fixed = fit_potts(**dict(arguments, beta=fixed_beta(options.model), beta_estimator="fixed"))
        volumes = []
        for candidate in (fit, fixed):
            order, position, _ = tumour_choice(candidate.means, **rules)
            volumes.append(tumour_voxels(candidate, int(order[position]), prepared.crop_voi))
        fit, learned_beta_record = learned_or_fixed(fit, fixed, *volumes, fixed_beta(options.model))
    vb_beta = fit.beta
    if options.fit.sampler == "gibbs":
        count_weights = (likelihood.measured[..., 0] if prepared.pet_first
                         else np.ones(prepared.crop_voi.shape, np.float32))
        fit = sample_potts(fit, features, likelihood.observed, prepared.crop_voi, reference.spacing,
                           count_weights, num_classes=num_classes, beta=vb_beta, seed=prepared.seed,
                           num_draws=options.outputs.volume_draws, neighbourhood=options.model.neighbourhood,
                           psf_fwhm_mm=psf, relative_precision=precision,
                           emission="student" if emission == "student" else "gaussian",
                           dof=options.model.dof,
                           external_field=None if field is None else fit.field_weight * field)
    return fit, rules, intensity, learn_weight, vb_beta, learned_beta_record, field is not None


def tumour_choice(fit_means, *, field_class=None, intensity_class=None, pet_index=None,
                  pet_image=None, tumour_class=None) -> tuple[np.ndarray, int, str]:
    """Which class is tumour: (order (K,) of the fit's classes by increasing mean in the first
    image of the likelihood, the tumour class's position in that order, the rule in words).
    ``fit_means`` (K, M) in any units increasing with the images' (standardised, log).
    The class carrying the external field (``field_class``, numbered as in the fit) or the
    tumour intensity field (``intensity_class``); else the highest mean in the PET column
    ``pet_index`` (input image ``pet_image``, 1-based); else ``tumour_class`` in the order."""
    fit_means = np.asarray(fit_means)
    order = np.argsort(fit_means[:, 0], kind="stable")
    if field_class is not None:
        return order, int(np.flatnonzero(order == field_class)[0]), (
            f"the class carrying the prior log-odds map (class {field_class} of the k-means "
            "start, numbered by level in the first image)")
    if intensity_class is not None:
        return order, int(np.flatnonzero(order == intensity_class)[0]), (
            f"the class carrying the intensity field (class {intensity_class} of the k-means "
            "start, numbered by level in the first image)")
    if pet_index is not None:
        return order, int(np.argmax(fit_means[order, pet_index])), (
            f"class with the highest mean uptake in image {pet_image} (PET)")
    return order, int(tumour_class), ("given by --tumour-class (classes ordered by mean in the "
                                      "first image)")


def contrast_to_noise(means, sds, proportions, tumour: int) -> float:
    """(mu_t - mu_b) / sd_b in the first image of the likelihood: the tumour class's mean against
    the most frequent other class's, in units of that class's sd. ``means`` and ``sds`` (K, M) on
    the fit's own scale (standardised, log where log-normal), which the ratio makes free of the
    image's units; ``proportions`` (K,). A quantity of the fit alone, known for a new case (a
    Mondrian stratum of :mod:`vbseg.calibration.calibration_file`)."""
    means, sds = np.asarray(means, np.float64), np.asarray(sds, np.float64)
    others = [k for k in range(means.shape[0]) if k != tumour]
    background = max(others, key=lambda k: float(proportions[k]))
    return float((means[tumour, 0] - means[background, 0]) / sds[background, 0])


def _inference_text(options, learn_weight, has_field) -> str:
    psf = options.model.psf_fwhm_mm is not None
    return ("mean-field VB (CAVI with colour-by-colour label sweeps), "
            + (BETA_LEARNED_TEXT if default_beta(options.model) == "auto" else "beta fixed")
            + ("; then the PSF model by mean-field VB from that solution (damped "
               "checkerboard sweeps)" if psf else "")
            + ("; then Gibbs from that solution (probabilities and volumes from "
               "its draws; the PSF model's own sampler with --psf-fwhm)"
               if options.fit.sampler == "gibbs" else "")
            + ("" if not has_field else "; " + (FIELD_LEARNED_TEXT if learn_weight
                                                else "external field weight fixed")))


def _emission_text(options) -> str:
    text = describe_emission(options.model.emission, options.model.covariance, options.model.dof)
    if options.model.psf_fwhm_mm is not None:
        variance = "proportional to the local mean" if options.model.pet_noise == "poisson" else "constant"
        text += (f"; PET mean blurred by a Gaussian PSF of FWHM {options.model.psf_fwhm_mm:g} mm, PET "
                 f"noise variance {variance}, class proportions uniform"
                 + whitening_text(options.model.psf_fwhm_mm, options.model.noise_fwhm_mm))
    return text


def run_potts(prepared, options) -> MethodResult:
    """The hidden Potts fit on the prepared crop (module doc)."""
    return potts_result(prepared, options, *prior_log_odds(prepared, options))


def potts_result(prepared, options, prior_logit, field_record, network_s) -> MethodResult:
    """The hidden Potts fit on the prepared crop with the prior log-odds map ``prior_logit``
    ((x, y, z) on the crop, or None; ``field_record`` says where it came from, for
    summary.json; ``network_s``: the seconds it took, recorded when a network made it)."""
    likelihood = likelihood_inputs(prepared, options)
    crop_voi = prepared.crop_voi
    if options.model.covariance == "full":
        for m, volume in enumerate(likelihood.volumes):
            if not likelihood.observed[..., m][crop_voi].all():
                raise InputError(volume.name, "does not cover the whole volume of interest, which "
                                              "--covariance full needs (crop the VOI or use diagonal)")
    log_flags = tuple(options.model.emission == "lognormal" and m == "pet" for m in likelihood.modalities)
    model_stack, floored = log_transform_pet(likelihood.stack, likelihood.observed, log_flags)
    features, centres, scales = standardise(model_stack, likelihood.observed, likelihood.volumes)
    fit, rules, intensity, learn_weight, vb_beta, learned_beta_record, has_field = _fit(
        prepared, options, likelihood, features, prior_logit)
    if network_s:
        fit.timings["network"] = network_s  # the forward pass, its compile included
    shape = crop_voi.shape
    marginals = fit.marginals[: shape[0], : shape[1], : shape[2]]
    means = fit.means * scales + centres  # (K, M) in image units (log units where log-normal)
    sds = fit.sds * scales * likelihood.noise_gain  # the measured image's noise (--noise-fwhm)
    log_columns = np.flatnonzero(log_flags)
    means[:, log_columns] = np.exp(means[:, log_columns])  # log-normal: the class median
    order, chosen, tumour_rule = tumour_choice(fit.means, **rules)
    means, sds, marginals = means[order], sds[order], marginals[..., order]
    probability = prepared.on_grid(marginals[..., chosen])
    if fit.class_counts is not None:
        voxel_ml = prepared.reference.voxel_volume_ml
        volume_draws_ml = fit.class_counts[..., order][..., chosen].ravel() * voxel_ml
        tlg_draws = fit.class_weighted[..., order][..., chosen].ravel() * voxel_ml
        volume_method = GIBBS_DRAWS_METHOD
    else:
        volume_draws_ml, tlg_draws = independent_draws(probability, prepared.reference,
                                                       prepared.pet_first, prepared.seed,
                                                       options.outputs.volume_draws)
        volume_method = INDEPENDENT_DRAWS_METHOD
    beta = default_beta(options.model)
    run_options = {
        "classes": options.model.num_classes, "beta": beta if beta == "auto" else float(beta),
        "neighbourhood": options.model.neighbourhood, "restarts": options.fit.restarts,
        "emission": _emission_text(options), "psf_fwhm_mm": options.model.psf_fwhm_mm,
        "noise_fwhm_mm": options.model.noise_fwhm_mm,
        "pet_noise": options.model.pet_noise if options.model.psf_fwhm_mm is not None else None,
        "prior": dict(NormalGammaPrior()._asdict(), proportions_concentration=DEFAULT_CONCENTRATION,
                      units="standardised features: (y - median) / sd over the VOI"),
        "inference": _inference_text(options, learn_weight, has_field),
        "prior_log_odds": field_record,
        "field_weight": options.model.field_weight if has_field else None,
        "sampler": options.fit.sampler, "tumour_rule": tumour_rule, "fusion": likelihood.record,
        "volume_draws": options.outputs.volume_draws,
    }
    parameters = {
        "class_means": means.tolist(), "class_sds": sds.tolist(),
        "class_proportions": fit.proportions[order].tolist(), "tumour_class": chosen,
        "contrast_to_noise": contrast_to_noise(fit.means[order], fit.sds[order] * likelihood.noise_gain,
                                               fit.proportions[order], chosen),
        "beta": vb_beta, "field_weight": fit.field_weight if has_field else None,
        "neighbour_weights": neighbour_weights(prepared.reference.spacing,
                                               options.model.neighbourhood).tolist(),
        "class_order": "increasing mean in the first image in the likelihood; columns follow "
                       "options.fusion.images_in_likelihood",
        "units": ("image units; for log-normal (PET) columns the class mean is exp(mean of "
                  "log y), the class median, and the sd is on the log scale"
                  if any(log_flags) else "image units"),
    }
    diagnostics = {
        **fit.diagnostics,
        **({} if learned_beta_record is None else {"learned_beta": learned_beta_record}),
        "elbo_note": "nats; lower bound on log p(y) + log Z(beta), comparable within one fit",
        "fit_grid_shape": [int(n) for n in features.shape[:3]],
        "log_floored_voxels": floored,
    }
    maps = {}
    if intensity is not None:
        field_map = prepared.on_grid(fit.intensity[: shape[0], : shape[1], : shape[2]] * scales[0])
        run_options["intensity_field"] = intensity.describe(options.model.intensity_field, scales[0],
                                                            log_flags[0])
        values = field_map[prepared.voi]
        parameters["intensity_field"] = {
            "min": float(values.min()), "max": float(values.max()), "sd": float(values.std()),
            "units": "log of the first image's units" if log_flags[0] else "the first image's units",
            "file": INTENSITY_FILE}
        maps[INTENSITY_FILE] = field_map
    return MethodResult(probability=probability, volume_draws_ml=volume_draws_ml,
                        volume_method=volume_method, tlg_draws=tlg_draws if prepared.pet_first else None,
                        model=options.model.name, options=run_options, parameters=parameters,
                        diagnostics=diagnostics, elbo=fit.elbo.tolist() if fit.elbo is not None else None,
                        timings_s=fit.timings, maps=maps)


def _intensity_output(options) -> list[str]:
    return [INTENSITY_FILE] if options.model.intensity_field is not None else []


register(Method("potts", run_potts, "hidden Potts MRF fitted by mean-field VB (the default but "
                                          "for PET + CT + MR)",
                extra_outputs=_intensity_output, rank=0))
register(Method("deep-potts", run_potts, "hidden Potts with a 3D CNN's logits as the external "
                                          "field, its weight learned", extra_outputs=_intensity_output,
                rank=1))
