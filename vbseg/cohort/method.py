"""The hidden Potts model with a population prior as a method (``--prior``; name ``prior``).

The prior (:mod:`vbseg.cohort.population`, :mod:`vbseg.cohort.model`) fixes the classes (its K, the
first ``num_tumour`` tumour), their intensity priors in a fixed feature space, beta (or a K x K
interaction matrix) and the neighbourhood; P(tumour) is the sum of the tumour classes'
marginals. Volume draws are calibrated by the prior's leave-one-out volume errors when it has
them (:func:`vbseg.cohort.population.calibrated_draws`).
"""

from __future__ import annotations

import os

import numpy as np

from vbseg.cohort.model import NOISE_PSEUDO_COUNT, PopulationPrior, to_features
from vbseg.cohort.population import resolve_prior, tumour_probability
from vbseg.cohort.volume_error import METHOD as CALIBRATED_METHOD
from vbseg.cohort.volume_error import calibrated_draws
from vbseg.errors import InputError
from vbseg.methods.registry import Method, MethodResult, register
from vbseg.options import NO_PET_NO_VOI
from vbseg.posterior import INDEPENDENT_DRAWS_METHOD
from vbseg.records import independent_draws


def prior_subject(prior) -> tuple[str, str]:
    """(where the prior came from, for summary.json; what an error about it names)."""
    source = "in memory" if isinstance(prior, PopulationPrior) else os.fspath(prior)
    return source, "--prior" if isinstance(prior, PopulationPrior) else source


def check_prior_options(options, num_images: int, modalities, levels_percent, roi, box) -> list[str]:
    """Validate the options of a fit with a population prior; returns the inputs' modalities
    (the prior's when none are given). InputError names the option or the prior's file."""
    if options.model.intensity_field is not None or options.model.intensity_lengthscale_mm is not None:
        raise InputError("--intensity-field", "does not apply with --prior (the population "
                                              "prior's classes carry no intensity field)")
    if options.fit.restarts != "full":
        raise InputError("--restarts", "does not apply with --prior (the population prior's "
                                       "fit starts from the prior's classes, not k-means)")
    if options.model.fusion is not None:
        raise InputError("--fusion", "does not apply with --prior (the prior's classes are learned "
                                     "on all of its modalities together)")
    _, subject = prior_subject(options.model.prior)
    prior = resolve_prior(options.model.prior)
    if options.model.name != "potts":
        raise InputError("--prior", f"applies to the potts model, not {options.model.name!r}")
    if modalities is None:
        if num_images != len(prior.modalities):
            raise InputError(subject, f"this prior was learned on {'+'.join(prior.modalities)} "
                                      f"({len(prior.modalities)} images) but {num_images} image(s) "
                                      "were given")
        modalities = list(prior.modalities)
    prior.check_modalities(modalities, subject)
    if "pet" not in modalities and roi is None and box is None:
        raise InputError("--roi/--box", NO_PET_NO_VOI)
    if roi is not None and box is not None:
        raise InputError("--roi", "give either --roi or --box, not both")
    if not levels_percent or not all(0 < level < 100 for level in levels_percent):
        raise InputError("--levels", "each level must be strictly between 0 and 100")
    volume_draws = options.outputs.volume_draws
    if not isinstance(volume_draws, int) or volume_draws < 100:
        raise InputError("--volume-draws", f"must be an integer >= 100, got {volume_draws!r}")
    return list(modalities)


def prior_crop_probability(prepared, prior: PopulationPrior):
    """(P(tumour) (x, y, z) on the prepared crop under the population prior, the fit's record:
    :func:`vbseg.cohort.population.tumour_probability` in the prior's feature space)."""
    features = np.where(prepared.observed, to_features(prepared.stack, list(prepared.modalities)),
                        0.0).astype(np.float32)
    return tumour_probability(prior, features, prepared.observed, prepared.crop_voi,
                              prepared.reference.spacing)


def run_prior(prepared, options) -> MethodResult:
    """The population prior's fit on the prepared crop (module doc)."""
    source, _ = prior_subject(options.model.prior)
    prior = resolve_prior(options.model.prior)
    crop_probability, record = prior_crop_probability(prepared, prior)
    probability = prepared.on_grid(crop_probability)
    raw_volumes, raw_tlg = independent_draws(probability, prepared.reference, prepared.pet_first,
                                             prepared.seed, options.outputs.volume_draws)
    volume_draws_ml, tlg_draws, missed_fraction = calibrated_draws(
        raw_volumes, raw_tlg, prior.volume_calibration, prepared.seed,
        contour_empty=not (probability >= 0.5).any())
    interaction = prior.interaction
    run_options = {
        "classes": prior.num_classes, "tumour_classes": prior.num_tumour,
        "class_names": prior.class_names, "beta": prior.beta if interaction is None else None,
        "interaction": None if interaction is None else interaction.tolist(),
        "neighbourhood": prior.neighbourhood,
        "emission": "Gaussian per class and modality (per-class precisions) in the fixed "
                    "feature space of vbseg.cohort.model",
        "feature_transforms": prior.transforms,
        "prior": {"source": source, "cases": prior.cases, "spread_scale": prior.spread_scale,
                  "noise_pseudo_count": NOISE_PSEUDO_COUNT, "vbseg_version": prior.vbseg_version},
        "inference": "mean-field VB (CAVI, colour-by-colour label sweeps) from the prior "
                     "predictive assignment; beta (or the interaction matrix) fixed at the "
                     "population value",
        "tumour_rule": f"P(tumour) = sum of the marginals of the first {prior.num_tumour} classes",
        "volume_draws": options.outputs.volume_draws,
    }
    calibration = prior.volume_calibration
    parameters = {
        "class_means_features": record["class_means_features"],
        "class_sds_features": record["class_sds_features"],
        "class_proportions": record["class_proportions"],
        "beta": prior.beta if interaction is None else None,
        "volume_calibration": ({k: v for k, v in calibration.items() if k != "entries"}
                               if calibration else None),
        "units": "feature space (see options.feature_transforms)",
    }
    diagnostics = {"converged": record["converged"], "iterations": record["iterations"],
                   "uncalibrated_volume_ml": {"mean": float(np.mean(raw_volumes)),
                                              "lower": float(np.quantile(raw_volumes, 0.025)),
                                              "upper": float(np.quantile(raw_volumes, 0.975))},
                   "volume_draws_from_missed_component": missed_fraction}
    return MethodResult(probability=probability, volume_draws_ml=volume_draws_ml,
                        volume_method=CALIBRATED_METHOD if calibration else INDEPENDENT_DRAWS_METHOD,
                        tlg_draws=tlg_draws if prepared.pet_first else None,
                        model="potts+population_prior", options=run_options, parameters=parameters,
                        diagnostics=diagnostics, elbo=record["elbo"], timings_s=record["timings"])


register(Method("prior", run_prior, "hidden Potts with a population prior learned from delineated "
                                    "cases (--prior)", rank=90))
