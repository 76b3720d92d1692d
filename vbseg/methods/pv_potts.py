"""The partial-volume hidden MRF as a method: ``pv-potts`` (:mod:`vbseg.models.pv_potts`).

Each voxel carries a tumour fraction on ``--fraction-levels`` L levels; PET is the blurred
fraction field (``--psf-fwhm``), CT and MR are linear in the fraction (``--fusion joint``).
Steps, on the standardised crop: the two-class PSF hidden Potts fit (the start, as in
``--model potts``), the partial-volume mean-field fit from it, then joint draws of the
fraction field by the level sampler from the mean-field mode
(:mod:`vbseg.inference.pv_potts`). Outputs: ``prob.nii.gz`` = P(f_v >= 1/2) and
``fraction.nii.gz`` = E[f_v] (mean-field marginals); the volume is voxel volume x sum of
fractions, its draws one per joint draw of the field. ``--wall-mm W`` adds a cold shell of
W mm outside the two-class fit's lesion to the PET forward model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vbseg.fitting import fit_potts
from vbseg.inference.chains import chain_diagnostics
from vbseg.inference.gibbs_psf import gibbs_hidden_potts_psf
from vbseg.inference.meanfield_psf import fit_hidden_potts_vb_psf
from vbseg.inference.pv_potts import fraction_summaries, levels_from_classes, wall_fraction
from vbseg.inference.svi import compile_and_run
from vbseg.methods.inputs import likelihood_inputs
from vbseg.methods.potts import noise_model, tumour_choice
from vbseg.methods.registry import Method, MethodResult, register
from vbseg.models.potts import NormalGammaPrior, neighbour_weights
from vbseg.models.pv_potts import (
    DEFAULT_MIXED_WEIGHT,
    level_design,
    level_interaction,
    level_log_prior,
    wall_offset,
)
from vbseg.options import default_beta, levels_for
from vbseg.prepare import pad_to_bucket, standardise

FRACTION_FILE = "fraction.nii.gz"
# Joint draws: independent chains from the mean-field mode, vectorised, a short burn-in (the
# start is the mode of a close approximation; split R-hat of the fraction sum 1.02-1.07 after
# 40 sweeps on 13 and 22 mm phantom spheres) and a few kept sweeps each: 4 x 25 = 100 draws.
# A sweep visits one colour per PSF-support cell (175 for a 6 mm PSF on 4 x 4 x 3 mm voxels),
# each a full-grid blur: about 0.1-0.6 s per sweep for 4 chains on 16^3-24^3 crops.
PV_CHAINS = 4
PV_BURN_IN = 30
PV_KEPT_PER_CHAIN = 25
PV_DRAWS_METHOD = (
    f"joint posterior draws of the whole fraction field (levels, background and tumour levels, "
    f"noise precision) by the partial-volume level sampler (vbseg.inference.gibbs_psf with the "
    f"level design), {PV_CHAINS} chains from the mean-field mode, {PV_BURN_IN} burn-in sweeps, "
    f"{PV_KEPT_PER_CHAIN} kept sweeps each; volume = voxel volume x sum of fractions per draw"
)


def _padded(likelihood, features, crop_voi, precision):
    return (jnp.asarray(pad_to_bucket(features, 0.0)),
            jnp.asarray(pad_to_bucket(likelihood.observed, False)),
            jnp.asarray(pad_to_bucket(crop_voi, False)),
            jnp.asarray(pad_to_bucket(precision, 1.0)))


def run_pv_potts(prepared, options) -> MethodResult:
    """The partial-volume fit and its joint draws on the prepared crop (module doc)."""
    likelihood = likelihood_inputs(prepared, options)
    crop_voi, reference = prepared.crop_voi, prepared.reference
    features, centres, scales = standardise(likelihood.stack, likelihood.observed, likelihood.volumes)
    psf, precision = noise_model(likelihood, crop_voi, options)
    num_modalities = features.shape[-1]
    if psf is None:
        psf, precision = (0.0,) * num_modalities, np.ones(features.shape, np.float32)
    beta = float(default_beta(options))
    num_levels = levels_for(options)
    spacing = tuple(float(s) for s in reference.spacing)
    first = fit_potts(features, likelihood.observed, crop_voi, reference.spacing, num_classes=2,
                      beta=beta, psf_fwhm_mm=psf if any(psf) else None,
                      relative_precision=precision, neighbourhood=options.neighbourhood)
    pet_index = likelihood.modalities.index("pet") if "pet" in likelihood.modalities else None
    order, position, tumour_rule = tumour_choice(
        first.means, pet_index=pet_index,
        pet_image=None if pet_index is None else likelihood.columns[pet_index] + 1,
        tumour_class=options.tumour_class)
    tumour = int(order[position])
    start = levels_from_classes(first.marginals[..., tumour], num_levels)
    padded = _padded(likelihood, features, crop_voi, precision)
    grid = padded[0].shape[:3]
    omega = None
    if options.wall_mm:
        lesion = pad_to_bucket(first.marginals[: crop_voi.shape[0], : crop_voi.shape[1],
                                               : crop_voi.shape[2], tumour] >= 0.5, False)
        shell = wall_fraction(lesion, spacing, float(options.wall_mm))
        omega = np.stack([shell if m == "pet" else np.zeros_like(shell)
                          for m in likelihood.modalities], axis=-1)
    offset = None if omega is None else jnp.asarray(wall_offset(omega, num_modalities))
    weights = jnp.asarray(neighbour_weights(reference.spacing, options.neighbourhood))
    interaction = jnp.asarray(level_interaction(num_levels, beta))
    unary = jnp.broadcast_to(jnp.asarray(level_log_prior(num_levels)), grid + (num_levels,))
    design = jnp.asarray(level_design(num_levels))
    prior = NormalGammaPrior(*(jnp.float32(p) for p in NormalGammaPrior()))
    statics = dict(psf_fwhm_mm=tuple(float(f) for f in psf), spacing_mm=spacing)
    fit, fit_compile, fit_run = compile_and_run(
        fit_hidden_potts_vb_psf, padded[:3] + (interaction, weights, prior, jnp.float32(1.0),
                                               jnp.asarray(start), padded[3], unary, design, offset),
        **statics)
    count_weights = (likelihood.stack[..., 0] if prepared.pet_first
                     else np.ones(crop_voi.shape, np.float32))
    labels = jnp.asarray(np.argmax(np.asarray(fit.marginals), axis=-1).astype(np.int32))
    draws, draw_compile, draw_run = compile_and_run(
        gibbs_hidden_potts_psf,
        (jax.random.PRNGKey(prepared.seed),) + padded[:3] + (
            interaction, weights, prior, padded[3], labels,
            jnp.asarray(pad_to_bucket(count_weights.astype(np.float32), 0.0)), unary, design,
            offset),
        num_classes=num_levels, num_chains=PV_CHAINS, num_sweeps=PV_KEPT_PER_CHAIN,
        burn_in=PV_BURN_IN, **statics)
    shape = crop_voi.shape
    marginals = np.asarray(fit.marginals)[: shape[0], : shape[1], : shape[2]]
    probability, fraction = fraction_summaries(marginals)
    voxel_ml = reference.voxel_volume_ml
    counts = np.asarray(draws.counts)[..., 1]  # (C, S) fraction sums
    emission = fit.emission
    levels = np.asarray(emission.mean).T * scales + centres  # (2, M) image units
    noise_sd = np.sqrt(np.asarray(emission.rate) / np.asarray(emission.shape)) * scales
    iterations = int(fit.num_iterations)
    timings = {"compile": first.timings["compile"] + fit_compile + draw_compile,
               "run": first.timings["run"] + fit_run + draw_run,
               "pv_fit": fit_run, "pv_draws": draw_run}
    run_options = {
        "fraction_levels": num_levels, "beta": beta, "neighbourhood": options.neighbourhood,
        "psf_fwhm_mm": options.psf_fwhm_mm, "wall_mm": options.wall_mm,
        "pet_noise": options.pet_noise if options.psf_fwhm_mm is not None else None,
        "mixed_weight": DEFAULT_MIXED_WEIGHT,
        "prior": dict(NormalGammaPrior()._asdict(),
                      units="standardised features: (y - median) / sd over the VOI"),
        "inference": ("the two-class PSF hidden Potts fit (mean-field) as the start; the "
                      "partial-volume model by mean-field VB (damped checkerboard level sweeps, "
                      "conjugate regression update); joint draws by the level sampler"),
        "tumour_rule": tumour_rule, "fusion": likelihood.record, "volume_draws": int(counts.size),
    }
    parameters = {
        "background_level": levels[0].tolist(), "tumour_level": levels[1].tolist(),
        "noise_sd": noise_sd.tolist(), "beta": beta,
        "neighbour_weights": np.asarray(weights).tolist(),
        "units": "image units; columns follow options.fusion.images_in_likelihood",
    }
    diagnostics = {
        "initial_fit": first.diagnostics,
        "converged": bool(fit.converged), "iterations": iterations,
        "fraction_sum_chains": chain_diagnostics(counts),
        "fraction_sum_mean_field_voxels": float(fraction[crop_voi].sum()),
        "wall_voxels": None if omega is None else float(omega.sum()),
        "fit_grid_shape": [int(n) for n in grid],
        "elbo_note": "nats; lower bound on log p(y) + log Z(beta), comparable within one fit",
    }
    return MethodResult(
        probability=prepared.on_grid(probability.astype(np.float32)),
        volume_draws_ml=counts.ravel() * voxel_ml, volume_method=PV_DRAWS_METHOD,
        tlg_draws=(np.asarray(draws.weighted)[..., 1].ravel() * voxel_ml
                   if prepared.pet_first else None),
        model=options.model, options=run_options, parameters=parameters, diagnostics=diagnostics,
        elbo=np.asarray(fit.elbo_trace)[:iterations].tolist(), timings_s=timings,
        maps={FRACTION_FILE: prepared.on_grid(fraction.astype(np.float32))})


register(Method("pv-potts", run_pv_potts, "partial-volume hidden MRF: a tumour fraction per "
                "voxel on --fraction-levels levels, PSF likelihood, joint volume draws",
                extra_outputs=lambda options: [FRACTION_FILE], rank=2))
