"""``vbseg.segment``: from image files to a saved :class:`~vbseg.posterior.Posterior`.

The steps, each at the edge where it belongs: validate options and planned outputs (before
any work), load and validate the images, resample the others onto the first image's grid
through world coordinates, restrict to the volume of interest (``roi`` mask or ``box``),
standardise each modality, fit the model under ``jax.jit`` (compile time measured apart
from run time), order the classes, pick the tumour class, draw volumes, and save.

Which class is tumour: classes are numbered 0..K-1 in increasing order of their fitted mean in
the first image. With a PET image in the stack, tumour is the class with the highest mean PET
uptake (FDG-avid lesions are the hottest structure in a lesion-centred VOI). CT and MR have no
such safe rule (a lesion may be darker or brighter than its surroundings), so without PET
``tumour_class`` must name the class index.
"""

from __future__ import annotations

import os

import numpy as np

from vbseg.baselines import BASELINES
from vbseg.deep_segment import (
    FIELD_MODELS,
    NETWORK_BASELINES,
    map_prior_logit,
    network_prior_logit,
    tumour_field,
)
from vbseg.errors import InputError
from vbseg.fitting import (
    GIBBS_BURN_IN,
    GIBBS_CHAINS,
    fit_potts,
    learned_or_fixed,
    pet_relative_precision,
    sample_potts,
    tumour_voxels,
)
from vbseg.inference.intensity_field import DEFAULT_LENGTHSCALE_MM, INTENSITY_FILE, IntensityFieldSpec
from vbseg.map_segment import baseline_posterior
from vbseg.models.emissions import describe_emission, log_transform_pet
from vbseg.models.potts import DEFAULT_CONCENTRATION, NormalGammaPrior, neighbour_weights
from vbseg.options import (
    AUTO_BETA_START,
    BETA_LEARNED_TEXT,
    DEFAULT_BETA,
    DEFAULT_BETA_PSF,
    DEFAULT_LEVELS,
    DEFAULT_STUDENT_DOF,
    DEFAULT_VOLUME_DRAWS,
    FUSION_JOINT_TEXT,
    FUSION_PET_TEXT,
    RESTARTS,
    check_options,
    check_outputs,
    default_fusion,
    fusion_columns,
)
from vbseg.posterior import (
    INDEPENDENT_DRAWS_METHOD,
    Posterior,
    output_names,
    saved_posterior,
)
from vbseg.records import independent_draws, provenance, voi_text
from vbseg.volume import (
    load_mask,
    load_volume,
    parse_box,
    resample_onto,
    save_nifti,
)

FIELD_LEARNED_TEXT = (
    "the prior log-odds map's weight gamma learned (uniform prior on [0, 5]; variational EM "
    "from gamma = 0, the data-only fit, with a joint pseudo-likelihood step for beta and gamma "
    "after each label sweep; vbseg.inference.beta.estimate_coupling_pl)"
)
GIBBS_DRAWS_METHOD = (
    f"posterior draws of the whole label field: Gibbs (labels, class means and "
    f"precisions, proportions), {GIBBS_CHAINS} chains started at the VB solution, "
    f"{GIBBS_BURN_IN} burn-in sweeps, one draw per kept sweep; R-hat and ESS in diagnostics"
)
def _voi_bounds(voi: np.ndarray) -> tuple[slice, ...]:
    index = np.nonzero(voi)
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)


def load_inputs(images, modalities, roi=None, box=None, series_uid=None):
    """Load the images (NIfTI files or DICOM series folders; ``series_uid`` picks series in
    folders holding several), put them on the first image's grid, and build the VOI.

    Returns (volumes, voi (bool, first grid), channels [(I, J, K) float32 per image],
    coverage [bool per image: inside that image's field of view], resampled [bool per image]).
    """
    volumes = [load_volume(path, modality, series_uid=series_uid)
               for path, modality in zip(images, modalities)]
    reference = volumes[0]
    if roi is not None:
        voi = load_mask(roi, reference)
    elif box is not None:
        voi = np.zeros(reference.shape, bool)
        voi[parse_box(box, reference.shape)] = True
    else:
        voi = np.ones(reference.shape, bool)
    full = np.ones(reference.shape, bool)
    channels, coverage, resampled = [reference.data], [full], [False]
    for volume in volumes[1:]:
        if volume.same_grid(reference):
            channels.append(volume.data)
            coverage.append(full)
            resampled.append(False)
            continue
        on_grid, covered = resample_onto(volume, reference)
        if not (covered & voi).any():
            raise InputError(volume.name, "does not overlap the volume of interest in world space")
        channels.append(on_grid.data)
        coverage.append(covered)
        resampled.append(True)
    return volumes, voi, channels, coverage, resampled


def standardise(stack, observed, volumes):
    """Per-modality (y - median) / sd over observed VOI voxels; zeros where unobserved.

    Returns (features, centres (M,), scales (M,)); InputError for a constant modality.
    """
    centres, scales = [], []
    for m, volume in enumerate(volumes):
        values = stack[..., m][observed[..., m]]
        scale = float(values.std()) if values.size else 0.0
        if scale == 0.0:
            raise InputError(volume.name, "is constant inside the volume of interest")
        centres.append(float(np.median(values)))
        scales.append(scale)
    centres, scales = np.asarray(centres, np.float32), np.asarray(scales, np.float32)
    features = np.where(observed, (stack - centres) / scales, 0.0).astype(np.float32)
    return features, centres, scales


def load_crop(images, modalities, roi=None, box=None, series_uid=None):
    """:func:`load_inputs`, then the VOI's bounding box cut out of every image.

    Returns (volumes, voi (first grid), bounds (slices), crop_voi, stack (x, y, z, M) float32,
    observed (x, y, z, M) bool: inside that image's field of view and the VOI, resampled).
    """
    volumes, voi, channels, coverage, resampled = load_inputs(images, modalities, roi, box, series_uid)
    bounds = _voi_bounds(voi)
    crop_voi = voi[bounds]
    stack = np.stack([c[bounds] for c in channels], axis=-1).astype(np.float32)
    observed = np.stack([c[bounds] for c in coverage], axis=-1) & crop_voi[..., None]
    return volumes, voi, bounds, crop_voi, stack, observed, resampled


def tumour_choice(fit_means, *, field_class=None, intensity_class=None, pet_index=None,
                  pet_image=None, tumour_class=None) -> tuple[np.ndarray, int, str]:
    """Which class is tumour: (order (K,) the fit's classes by increasing mean in the first
    image of the likelihood, the tumour class's position in that order, the rule in words).
    ``fit_means`` (K, M) in any units increasing with the image's (standardised, log).
    The class carrying the external field (``field_class``, numbered as in the fit) or the
    tumour intensity field (``intensity_class``); else the highest mean in the PET column
    ``pet_index`` (input image ``pet_image``); else ``tumour_class`` in the order."""
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


def segment(
    images,
    out=None,
    *,
    modalities=None,
    roi=None,
    box=None,
    model: str = "potts",
    num_classes: int = 2,
    beta: float | str | None = None,
    neighbourhood: int = 6,
    restarts: str = "full",
    levels_percent=DEFAULT_LEVELS,
    tumour_class: int | None = None,
    seed: int = 0,
    volume_draws: int = DEFAULT_VOLUME_DRAWS,
    psf_fwhm_mm: float | None = None,
    pet_noise: str = "poisson",
    sampler: str = "vb",
    emission: str = "gaussian",
    covariance: str = "diagonal",
    dof: float = DEFAULT_STUDENT_DOF,
    series_uid=None,
    overwrite: bool = False,
    title: str = "",
    prior=None,
    checkpoint=None,
    external_field=None,
    field_weight: float | str = "auto",
    intensity_field: str | None = None,
    intensity_lengthscale_mm: float | None = None,
    fusion: str | None = None,
) -> Posterior:
    """Segment one image or a co-registered stack; write the outputs into ``out`` if given.

    Args:
        images: paths of NIfTI files or DICOM series folders (:mod:`vbseg.dicom`; PET in SUV);
            the first defines the output grid, others are resampled onto it.
        out: output directory (None: nothing is written).
        modalities: one of pet/ct/mr/other per image; default pet for the first, other after.
        roi: path of a mask on the first image's grid; box: "i0:i1,j0:j1,k0:k1" (half-open).
        model, num_classes: the model (hidden Potts) and its number of classes K.
        beta: Potts coupling; None: DEFAULT_BETA, or DEFAULT_BETA_PSF with ``psf_fwhm_mm``;
            "auto": learned by variational EM with a pseudo-likelihood step (from
            AUTO_BETA_START; :mod:`vbseg.inference.beta`), then kept for the PSF fit or sampler.
        neighbourhood: 6 or 26 (the Potts neighbourhood; weights by inverse distance).
        restarts: where the Potts fit's k-means restarts run: "full" (the image's grid, the
            default) or "coarse" (a 2x2x2 coarser grid, then one fit on the image's grid per
            distinct solution; :mod:`vbseg.inference.multiscale`: faster on large grids, but
            it can end in another mode of the ELBO).
        levels_percent: contour levels in percent.
        tumour_class: class index that is tumour (required without PET; see module doc).
        seed: seeds the volume draws (the fit itself is deterministic).
        volume_draws: number of posterior volume draws.
        psf_fwhm_mm: the PET scanner's PSF FWHM in mm. Given, PET images get the PSF-blurred
            likelihood (:mod:`vbseg.inference.meanfield_psf`; other modalities are not blurred)
            and ``pet_noise`` says how PET noise varies: "poisson" (variance proportional to
            the local mean uptake) or "constant".
        sampler: "vb" (mean-field marginals; volume draws from independent voxels) or "gibbs"
            (checkerboard Gibbs from the VB solution: marginals and volume draws from posterior
            draws of the whole label field; PSF-free model only).
        emission: "gaussian", "student" (Student-t with ``dof`` degrees of freedom: robust to
            outlier voxels) or "lognormal" (PET images modelled on the log scale).
        covariance: "diagonal" (modalities independent given the class) or "full" (a full
            covariance per class across modalities; every image must cover the whole VOI).
        series_uid: Series Instance UID(s) choosing the series in DICOM folders that hold several.
        prior: a population prior (JSON path, "sarcoma" for the packaged one, or a
            :class:`~vbseg.models.cohort.PopulationPrior`): the hidden Potts model with the
            prior's classes, class priors and beta (:mod:`vbseg.population`); the inputs must be
            the prior's modalities; num_classes, beta, emission and the PSF options are not used.
        checkpoint: the network of the deep models (``deep-potts``, ``deep-gp``, ``cnn``,
            ``mc-dropout``, ``cnn-ensemble``; :mod:`vbseg.deep_segment`); default: the packaged
            one for the input modalities.
        external_field: path of a prior log-odds map (NIfTI on the first image's grid) for
            ``potts`` or ``gp``: added to the tumour class's prior (Potts external field; GP
            prior mean) with weight ``field_weight``. ``deep-potts``/``deep-gp`` use the
            network's logits as this map.
        field_weight: "auto" (learned: pseudo-likelihood in variational EM for Potts, from 0,
            the data-only fit; a learned weight in the GP fit) or a fixed weight >= 0 (Potts).
        intensity_field: "all" or "tumour": a smooth GP field added to the first image's mean
            of every class (a bias field) or of the tumour class (heterogeneous uptake), fitted
            with the labels (:mod:`vbseg.inference.intensity_field`; Matern 5/2, separable,
            length-scale ``intensity_lengthscale_mm``, default 60 mm); saved as
            intensity_field.nii.gz in the first image's units (log units for log-normal PET).
        fusion: which images enter the label model's likelihood (potts, gp, deep-potts, deep-gp):
            "pet" (PET alone decides tumour and background; the others are loaded, checked and
            resampled, and the deep models' network still sees every image) or "joint" (every
            image in one class split). None: "pet" with PET among several images, else "joint"
            (:func:`vbseg.options.default_fusion`; why in ``FUSION_PET_TEXT``).
    Raises:
        InputError naming the file or option for every problem with the input.
    """
    images = [os.fspath(p) for p in images]
    if not images:
        raise InputError("segment", "needs at least one image")
    if prior is not None:
        from vbseg.population import segment_with_prior

        if intensity_field is not None or intensity_lengthscale_mm is not None:
            raise InputError("--intensity-field", "does not apply with --prior (the population "
                                                  "prior's classes carry no intensity field)")
        if restarts != "full":
            raise InputError("--restarts", "does not apply with --prior (the population prior's "
                                           "fit starts from the prior's classes, not k-means)")

        return segment_with_prior(images, out, prior=prior, modalities=modalities, roi=roi, box=box,
                                  model=model, levels_percent=tuple(float(x) for x in levels_percent),
                                  seed=seed, volume_draws=volume_draws, series_uid=series_uid,
                                  overwrite=overwrite, title=title)
    modalities = list(modalities) if modalities else ["pet"] + ["other"] * (len(images) - 1)
    levels_percent = tuple(float(level) for level in levels_percent)
    if beta is None:
        beta = DEFAULT_BETA if psf_fwhm_mm is None else DEFAULT_BETA_PSF
    fusion_given = fusion is not None
    fusion = fusion if fusion_given else default_fusion(model, modalities, covariance)
    check_options(model=model, num_classes=num_classes, beta=beta, levels_percent=levels_percent,
                  num_images=len(images), modalities=modalities, tumour_class=tumour_class,
                  volume_draws=volume_draws, neighbourhood=neighbourhood,
                  psf_fwhm_mm=psf_fwhm_mm, pet_noise=pet_noise, sampler=sampler,
                  emission=emission, covariance=covariance, dof=dof, roi=roi, box=box,
                  checkpoint=checkpoint, external_field=external_field, field_weight=field_weight,
                  intensity_field=intensity_field, intensity_lengthscale_mm=intensity_lengthscale_mm,
                  restarts=restarts, fusion=fusion)
    learn_beta = beta == "auto"
    roi = os.fspath(roi) if roi is not None else None
    if out is not None:
        extra = [INTENSITY_FILE] if intensity_field is not None else []
        check_outputs(out, output_names(levels_percent) + extra, images + ([roi] if roi else []),
                      overwrite)

    volumes, voi, bounds, crop_voi, stack, observed, resampled = load_crop(images, modalities, roi, box,
                                                                           series_uid)
    reference = volumes[0]
    if model in BASELINES + NETWORK_BASELINES:
        return baseline_posterior(model, stack, observed, crop_voi, voi, bounds, volumes,
                                   images, modalities, roi, box, resampled, seed, volume_draws,
                                   out, levels_percent, title, checkpoint)
    prior_logit, field_record, network_s = None, None, 0.0
    if model in FIELD_MODELS:
        prior_logit, field_record, network_s = network_prior_logit(checkpoint, stack, observed,
                                                                   modalities)
    elif external_field is not None:
        prior_logit, field_record = map_prior_logit(external_field, reference, bounds)
    # the label model's likelihood sees the images --fusion chooses (the network saw them all)
    columns = fusion_columns(fusion, modalities)
    fusion_record = {"mode": fusion, "chosen": "given" if fusion_given else "default",
                     "images_in_likelihood": [images[m] for m in columns],
                     "rule": FUSION_PET_TEXT if fusion == "pet" else FUSION_JOINT_TEXT}
    stack, observed = stack[..., columns], observed[..., columns]
    fit_volumes = [volumes[m] for m in columns]
    fit_modalities = [modalities[m] for m in columns]
    if model in ("gp", "deep-gp"):
        from vbseg import gp_segment

        return gp_segment.build(stack, observed, crop_voi, voi, bounds, volumes, images, modalities,
                                roi, box, resampled, seed, volume_draws, out, levels_percent, title,
                                provenance(images, modalities, roi, seed, volumes),
                                voi_text(roi, box), prior_logit=prior_logit, model_name=model,
                                field_record=field_record, fusion=fusion_record)
    if covariance == "full":
        for m, volume in enumerate(fit_volumes):
            if not observed[..., m][crop_voi].all():
                raise InputError(volume.name, "does not cover the whole volume of interest, which "
                                              "--covariance full needs (crop the VOI or use diagonal)")
    log_flags = tuple(emission == "lognormal" and m == "pet" for m in fit_modalities)
    model_stack, floored = log_transform_pet(stack, observed, log_flags)
    features, centres, scales = standardise(model_stack, observed, fit_volumes)
    psf, precision = None, None
    if psf_fwhm_mm is not None:
        psf = tuple(psf_fwhm_mm if m == "pet" else 0.0 for m in fit_modalities)
        precision = np.ones(stack.shape, np.float32)
        if pet_noise == "poisson":
            for m, modality in enumerate(fit_modalities):
                if modality == "pet":
                    precision[..., m] = pet_relative_precision(stack[..., m], crop_voi)
    field, field_class = None, None
    if prior_logit is not None:
        # the k-means starts number classes by level in the first image (PET, or
        # --tumour-class says which); the field's class stays the tumour class
        field_class = num_classes - 1 if tumour_class is None else int(tumour_class)
        field = tumour_field(prior_logit, num_classes, field_class)
    learn_weight = field is not None and field_weight == "auto"
    intensity = None
    if intensity_field is not None:
        tumour_in_fit = num_classes - 1 if tumour_class is None else int(tumour_class)
        intensity = IntensityFieldSpec(
            classes=tuple(range(num_classes)) if intensity_field == "all" else (tumour_in_fit,),
            spacing_mm=reference.spacing,
            lengthscale_mm=intensity_lengthscale_mm or DEFAULT_LENGTHSCALE_MM)
    fit_arguments = dict(features=features, observed=observed, voi=crop_voi,
                         spacing=reference.spacing, num_classes=num_classes,
                         beta=AUTO_BETA_START if learn_beta else beta, psf_fwhm_mm=psf,
                         relative_precision=precision, neighbourhood=neighbourhood,
                         beta_estimator="pl" if learn_beta else "fixed",
                         emission="full" if covariance == "full" else
                         ("student" if emission == "student" else "gaussian"), dof=dof,
                         external_field=field, learn_field_weight=learn_weight,
                         field_weight=0.0 if learn_weight or field is None else float(field_weight),
                         intensity=intensity, multiscale=RESTARTS[restarts])
    fit = fit_potts(**fit_arguments)
    pet_index = fit_modalities.index("pet") if "pet" in fit_modalities else None
    tumour_rules = dict(field_class=field_class,
                        intensity_class=intensity.classes[0] if intensity_field == "tumour" else None,
                        pet_index=pet_index,
                        pet_image=None if pet_index is None else columns[pet_index] + 1,
                        tumour_class=tumour_class)
    learned_beta_record = None
    if learn_beta:  # checked against the fit at the fixed default beta (learned_or_fixed)
        fixed_beta = DEFAULT_BETA if psf_fwhm_mm is None else DEFAULT_BETA_PSF
        fixed = fit_potts(**dict(fit_arguments, beta=fixed_beta, beta_estimator="fixed"))
        tumour_volumes = []
        for candidate in (fit, fixed):
            order, position, _ = tumour_choice(candidate.means, **tumour_rules)
            tumour_volumes.append(tumour_voxels(candidate, int(order[position]), crop_voi))
        fit, learned_beta_record = learned_or_fixed(fit, fixed, *tumour_volumes, fixed_beta)
    if model in FIELD_MODELS:
        fit.timings["network"] = network_s  # the forward pass, its compile included
    beta_used = fit.beta
    pet_first = modalities[0] == "pet"
    if sampler == "gibbs":
        count_weights = stack[..., 0] if pet_first else np.ones(crop_voi.shape, np.float32)
        fit = sample_potts(fit, features, observed, crop_voi, reference.spacing, count_weights,
                           num_classes=num_classes, beta=beta_used, seed=seed,
                           num_draws=volume_draws, neighbourhood=neighbourhood,
                           psf_fwhm_mm=psf, relative_precision=precision,
                           emission="student" if emission == "student" else "gaussian", dof=dof,
                           external_field=None if field is None else fit.field_weight * field)

    shape = crop_voi.shape
    marginals = fit.marginals[: shape[0], : shape[1], : shape[2]]
    means = fit.means * scales + centres  # (K, M) in image units (log units where log-normal)
    sds = fit.sds * scales
    log_columns = np.flatnonzero(log_flags)
    means[:, log_columns] = np.exp(means[:, log_columns])  # log-normal: the class median
    order, chosen, tumour_rule = tumour_choice(fit.means, **tumour_rules)
    means, sds, marginals = means[order], sds[order], marginals[..., order]
    proportions = fit.proportions[order]
    probability = np.zeros(reference.shape, np.float32)
    probability[bounds] = np.where(crop_voi, marginals[..., chosen], 0.0)

    voxel_ml = reference.voxel_volume_ml
    if fit.class_counts is not None:
        volume_draws_ml = fit.class_counts[..., order][..., chosen].ravel() * voxel_ml
        tlg_draws = fit.class_weighted[..., order][..., chosen].ravel() * voxel_ml
        volume_method = GIBBS_DRAWS_METHOD
    else:
        volume_draws_ml, tlg_draws = independent_draws(probability, reference, pet_first, seed,
                                                        volume_draws)
        volume_method = INDEPENDENT_DRAWS_METHOD

    emission_text = describe_emission(emission, covariance, dof)
    if psf_fwhm_mm is not None:
        variance = "proportional to the local mean" if pet_noise == "poisson" else "constant"
        emission_text += (f"; PET mean blurred by a Gaussian PSF of FWHM {psf_fwhm_mm:g} mm, PET "
                          f"noise variance {variance}, class proportions uniform")
    summary = {
        "model": model,
        "options": {
            "classes": num_classes,
            "beta": "auto" if learn_beta else float(beta),
            "neighbourhood": neighbourhood,
            "restarts": restarts,
            "emission": emission_text,
            "psf_fwhm_mm": psf_fwhm_mm,
            "pet_noise": pet_noise if psf_fwhm_mm is not None else None,
            "prior": dict(NormalGammaPrior()._asdict(),
                          proportions_concentration=DEFAULT_CONCENTRATION,
                          units="standardised features: (y - median) / sd over the VOI"),
            "inference": "mean-field VB (CAVI with colour-by-colour label sweeps), "
                         + (BETA_LEARNED_TEXT if learn_beta else "beta fixed")
                         + ("; then the PSF model by mean-field VB from that solution (damped "
                            "checkerboard sweeps)" if psf_fwhm_mm is not None else "")
                         + ("; then Gibbs from that solution (probabilities and volumes from "
                            "its draws; the PSF model's own sampler with --psf-fwhm)"
                            if sampler == "gibbs" else "")
                         + ("" if field is None else "; " + (FIELD_LEARNED_TEXT if learn_weight
                                                             else "external field weight fixed")),
            "prior_log_odds": field_record,
            "field_weight": None if field is None else field_weight,
            "sampler": sampler,
            "tumour_rule": tumour_rule,
            "fusion": fusion_record,
            "volume_draws": volume_draws,
            "voi": voi_text(roi, box),
        },
        "parameters": {
            "class_means": means.tolist(),
            "class_sds": sds.tolist(),
            "class_proportions": proportions.tolist(),
            "tumour_class": chosen,
            "beta": beta_used,
            "field_weight": None if field is None else fit.field_weight,
            "neighbour_weights": neighbour_weights(reference.spacing, neighbourhood).tolist(),
            "class_order": "increasing mean in the first image in the likelihood; columns follow "
                           "options.fusion.images_in_likelihood",
            "units": ("image units; for log-normal (PET) columns the class mean is exp(mean of "
                      "log y), the class median, and the sd is on the log scale"
                      if any(log_flags) else "image units"),
        },
        "modality": modalities,
        "resampled": [{"path": p, "resampled": r} for p, r in zip(images, resampled)],
        "elbo": fit.elbo.tolist() if fit.elbo is not None else None,
        "diagnostics": {
            **fit.diagnostics,
            **({} if learned_beta_record is None else {"learned_beta": learned_beta_record}),
            "elbo_note": "nats; lower bound on log p(y) + log Z(beta), comparable within one fit",
            "fit_grid_shape": [int(n) for n in features.shape[:3]],
            "voi_voxels": int(voi.sum()),
            "log_floored_voxels": floored,
            "voi_bounds": [[s.start, s.stop] for s in bounds],
        },
        "timings_s": fit.timings,
        **provenance(images, modalities, roi, seed, volumes),
    }
    field_map = None
    if intensity is not None:
        field_map = np.zeros(reference.shape, np.float32)
        field_map[bounds] = np.where(crop_voi, fit.intensity[: shape[0], : shape[1], : shape[2]]
                                     * scales[0], 0.0)
        summary["options"]["intensity_field"] = intensity.describe(intensity_field, scales[0], log_flags[0])
        values = field_map[voi]
        summary["parameters"]["intensity_field"] = {
            "min": float(values.min()), "max": float(values.max()), "sd": float(values.std()),
            "units": "log of the first image's units" if log_flags[0] else "the first image's units",
            "file": INTENSITY_FILE}
    posterior = saved_posterior(out, levels_percent, title, probability=probability, reference=reference,
                                voi=voi, volume_draws_ml=volume_draws_ml, volume_method=volume_method,
                                tlg_draws=tlg_draws if pet_first else None, summary=summary)
    if out is not None and field_map is not None:
        save_nifti(os.path.join(out, INTENSITY_FILE), field_map, reference.affine)
    return posterior

