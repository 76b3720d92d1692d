"""The partial-volume hidden MRF as a method: ``pv-potts`` (:mod:`vbseg.pv_potts.model`).

Each voxel carries a tumour fraction on ``--fraction-levels`` L levels; PET is the blurred
fraction field (``--psf-fwhm``), CT and MR are linear in the fraction (``--fusion joint``).
Steps, on the standardised crop: the two-class PSF hidden Potts fit (the start, as in
``--model potts``), the partial-volume mean-field fit from it, then joint draws of the
fraction field by the level sampler from the mean-field mode
(:mod:`vbseg.pv_potts.inference`). Outputs: ``prob.nii.gz`` = P(f_v >= 1/2) and
``fraction.nii.gz`` = E[f_v] (mean-field marginals); the volume is voxel volume x sum of
fractions, its draws one per joint draw of the field. ``--wall-mm W`` adds a cold shell of
W mm outside the two-class fit's lesion to the PET forward model.

``--beta auto``: the partial-volume fit at each beta of ``BETA_GRID``; the fits are mixed
with weights ∝ exp(ELBO(beta) - log Z(beta)), log Z(beta) - log Z(0) of the level prior on the
fit's own ROI and grid by thermodynamic integration along ``PATH_STEP`` steps from 0
(:func:`vbseg.pv_potts.inference.level_log_partition`, :func:`~vbseg.pv_potts.inference.
beta_weights`): the probability and fraction maps are the weighted means of the fits' maps,
and the volume draws a weighted draw from the joint draws of every fit with weight >=
``MIN_DRAW_WEIGHT`` (each sampled from its own mean-field mode). The mean-field ELBO is a lower
bound whose gap grows with the coupling, so the weights lean towards weaker coupling than the
exact marginal likelihood would (Gelman & Meng 1998 for the path; the bias is the bound's).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vbseg.inference.chains import chain_diagnostics
from vbseg.methods.inputs import likelihood_inputs
from vbseg.methods.registry import Method, MethodResult, register
from vbseg.options import default_beta, fixed_beta, levels_for
from vbseg.potts.fitting import fit_potts
from vbseg.potts.gibbs_psf import gibbs_hidden_potts_psf
from vbseg.potts.meanfield_psf import fit_hidden_potts_vb_psf
from vbseg.potts.method import noise_model, tumour_choice
from vbseg.potts.model import NormalGammaPrior, neighbour_weights
from vbseg.prepare import pad_to_bucket, standardise
from vbseg.pv_potts.inference import (
    beta_weights,
    fraction_summaries,
    level_log_partition,
    levels_from_classes,
    wall_fraction,
)
from vbseg.pv_potts.model import (
    DEFAULT_MIXED_WEIGHT,
    level_design,
    level_interaction,
    level_log_prior,
    wall_offset,
)
from vbseg.runtime import compile_and_run

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
    f"noise precision) by the partial-volume level sampler (vbseg.potts.gibbs_psf with the "
    f"level design), {PV_CHAINS} chains from the mean-field mode, {PV_BURN_IN} burn-in sweeps, "
    f"{PV_KEPT_PER_CHAIN} kept sweeps each; volume = voxel volume x sum of fractions per draw"
)
# --beta auto (module doc): the fits' grid, the TI path's step from 0 (its points include the
# grid's), and the least weight whose fit is sampled for the volume draws
BETA_GRID = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
PATH_STEP = 0.25
MIN_DRAW_WEIGHT = 0.01
BETA_MIXTURE_NOTE = (f"; with --beta auto, drawn at each beta of the grid with weight >= "
                     f"{MIN_DRAW_WEIGHT:g} and mixed in proportion to the weights "
                     "exp(ELBO - log Z(beta))")


def _padded(likelihood, features, crop_voi, precision):
    return (jnp.asarray(pad_to_bucket(features, 0.0)),
            jnp.asarray(pad_to_bucket(likelihood.observed, False)),
            jnp.asarray(pad_to_bucket(crop_voi, False)),
            jnp.asarray(pad_to_bucket(precision, 1.0)))


class BetaWeighting(NamedTuple):
    """--beta auto: the grid's weights (:class:`~vbseg.pv_potts.inference.BetaWeights`), the TI
    path from 0 (betas, E[T | beta], log Z(beta) - log Z(0)) and the seconds it took."""

    weights: np.ndarray
    record: dict
    seconds: float


def weigh_betas(fits, num_levels: int, roi, weights, seed: int) -> BetaWeighting:
    """Weights ∝ exp(ELBO - log Z(beta)) of the fits at ``BETA_GRID`` (module doc)."""
    start = time.perf_counter()
    path_betas = np.round(np.arange(0.0, BETA_GRID[-1] + PATH_STEP / 2, PATH_STEP), 6)
    log_z, path = level_log_partition(path_betas, level_interaction(num_levels),
                                      level_log_prior(num_levels), roi, weights, seed=seed)
    at = [int(np.flatnonzero(np.isclose(path_betas, b))[0]) for b in BETA_GRID]
    elbos = [float(np.asarray(f.elbo_trace)[int(f.num_iterations) - 1]) for f in fits]
    result = beta_weights(BETA_GRID, elbos, log_z[at], path[at])
    record = {"betas": list(BETA_GRID), "elbo": result.elbo.tolist(),
              "log_partition": result.log_partition.tolist(), "weights": result.weights.tolist(),
              "posterior_mean_beta": float(np.dot(result.weights, BETA_GRID)),
              "path": {"betas": path_betas.tolist(), "mean_pair_statistic": path.tolist(),
                       "log_partition": log_z.tolist()},
              "rule": "weights ∝ exp(ELBO(beta) - (log Z(beta) - log Z(0))), uniform prior on "
                      "the grid; log Z by thermodynamic integration (trapezoid) of the level "
                      "prior's pair statistic simulated by checkerboard Gibbs on the fit's ROI"}
    return BetaWeighting(result.weights, record, time.perf_counter() - start)


def mixed_draws(pools, weights, seed: int):
    """(volume, TLG) draws of the beta mixture: ``pools`` holds each sampled fit's (fraction
    sum, weighted sum) draws, (C, S) each; each of the C x S mixture draws picks a fit with
    probability ∝ its weight, then one of that fit's draws not picked before."""
    if len(pools) == 1:
        return pools[0][0].ravel(), pools[0][1].ravel()
    size = pools[0][0].size
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(size, np.asarray(weights, np.float64) / np.sum(weights))
    picks = [rng.permutation(size)[:n] for n in counts]
    return (np.concatenate([pool[0].ravel()[pick] for pool, pick in zip(pools, picks)]),
            np.concatenate([pool[1].ravel()[pick] for pool, pick in zip(pools, picks)]))


class LevelProblem(NamedTuple):
    """What the level fits and the level sampler share, on the bucket-padded crop: ``padded``
    (features, observed, ROI, relative precision), the neighbour ``weights``, the level prior
    ``unary``, the level ``design``, the Normal-Gamma ``prior``, the cold wall's ``offset`` (or
    None), the TLG ``count_weights``, the ``start`` level marginals, ``num_levels`` and the
    static PSF arguments ``statics``."""

    padded: tuple
    weights: jax.Array
    unary: jax.Array
    design: jax.Array
    prior: NormalGammaPrior
    offset: jax.Array | None
    count_weights: jax.Array
    start: np.ndarray
    num_levels: int
    statics: dict


def level_fit(problem: LevelProblem, beta: float):
    """(mean-field fit, compile s, run s) of the level model at ``beta`` from the start."""
    return compile_and_run(fit_hidden_potts_vb_psf, problem.padded[:3] + (
        jnp.asarray(level_interaction(problem.num_levels, beta)), problem.weights, problem.prior,
        jnp.float32(1.0), jnp.asarray(problem.start), problem.padded[3], problem.unary,
        problem.design, problem.offset), **problem.statics)


def level_draws(problem: LevelProblem, beta: float, fit, seed: int):
    """(joint draws, compile s, run s) of the level sampler at ``beta`` from ``fit``'s mode."""
    labels = jnp.asarray(np.argmax(np.asarray(fit.marginals), axis=-1).astype(np.int32))
    return compile_and_run(
        gibbs_hidden_potts_psf,
        (jax.random.PRNGKey(seed),) + problem.padded[:3] + (
            jnp.asarray(level_interaction(problem.num_levels, beta)), problem.weights,
            problem.prior, problem.padded[3], labels, problem.count_weights, problem.unary,
            problem.design, problem.offset),
        num_classes=problem.num_levels, num_chains=PV_CHAINS, num_sweeps=PV_KEPT_PER_CHAIN,
        burn_in=PV_BURN_IN, **problem.statics)


def level_problem(prepared, options, likelihood, features, psf, precision, start_marginals):
    """(:class:`LevelProblem`, the cold wall's per-voxel fraction (or None)) from the two-class
    fit's tumour marginals ``start_marginals`` (padded grid)."""
    crop_voi, reference = prepared.crop_voi, prepared.reference
    num_levels, num_modalities = levels_for(options.model), features.shape[-1]
    spacing = tuple(float(s) for s in reference.spacing)
    padded = _padded(likelihood, features, crop_voi, precision)
    grid = padded[0].shape[:3]
    omega = None
    if options.model.wall_mm:
        lesion = pad_to_bucket(start_marginals[: crop_voi.shape[0], : crop_voi.shape[1],
                                               : crop_voi.shape[2]] >= 0.5, False)
        shell = wall_fraction(lesion, spacing, float(options.model.wall_mm))
        omega = np.stack([shell if m == "pet" else np.zeros_like(shell)
                          for m in likelihood.modalities], axis=-1)
    counted = likelihood.stack[..., 0] if prepared.pet_first else np.ones(crop_voi.shape)
    problem = LevelProblem(
        padded=padded, weights=jnp.asarray(neighbour_weights(reference.spacing, options.model.neighbourhood)),
        unary=jnp.broadcast_to(jnp.asarray(level_log_prior(num_levels)), grid + (num_levels,)),
        design=jnp.asarray(level_design(num_levels)),
        prior=NormalGammaPrior(*(jnp.float32(p) for p in NormalGammaPrior())),
        offset=None if omega is None else jnp.asarray(wall_offset(omega, num_modalities)),
        count_weights=jnp.asarray(pad_to_bucket(counted.astype(np.float32), 0.0)),
        start=levels_from_classes(start_marginals, num_levels), num_levels=num_levels,
        statics=dict(psf_fwhm_mm=tuple(float(f) for f in psf), spacing_mm=spacing))
    return problem, omega


def run_pv_potts(prepared, options) -> MethodResult:
    """The partial-volume fit and its joint draws on the prepared crop (module doc)."""
    likelihood = likelihood_inputs(prepared, options)
    crop_voi = prepared.crop_voi
    features, centres, scales = standardise(likelihood.stack, likelihood.observed, likelihood.volumes)
    psf, precision = noise_model(likelihood, crop_voi, options)
    if psf is None:
        psf, precision = (0.0,) * features.shape[-1], np.ones(features.shape, np.float32)
    # the two-class start and a fixed-beta fit use the given beta; --beta auto starts at the default
    beta = float(fixed_beta(options.model) if options.model.beta == "auto" else default_beta(options.model))
    first = fit_potts(features, likelihood.observed, crop_voi, prepared.reference.spacing,
                      num_classes=2, beta=beta, psf_fwhm_mm=psf if any(psf) else None,
                      relative_precision=precision, neighbourhood=options.model.neighbourhood)
    pet_index = likelihood.modalities.index("pet") if "pet" in likelihood.modalities else None
    order, position, tumour_rule = tumour_choice(
        first.means, pet_index=pet_index,
        pet_image=None if pet_index is None else likelihood.columns[pet_index] + 1,
        tumour_class=options.model.tumour_class)
    problem, omega = level_problem(prepared, options, likelihood, features, psf, precision,
                                   first.marginals[..., int(order[position])])
    betas = BETA_GRID if options.model.beta == "auto" else (beta,)
    fits = [level_fit(problem, b) for b in betas]
    weighting = None if options.model.beta != "auto" else weigh_betas(
        [fit for fit, _, _ in fits], problem.num_levels, np.asarray(problem.padded[2]),
        np.asarray(problem.weights), prepared.seed)
    beta_weight = np.ones(1) if weighting is None else weighting.weights
    drawn = {i: level_draws(problem, betas[i], fits[i][0], prepared.seed)
             for i in range(len(betas)) if beta_weight[i] >= MIN_DRAW_WEIGHT}
    counts, weighted = mixed_draws([(np.asarray(d.counts)[..., 1], np.asarray(d.weighted)[..., 1])
                                    for d, _, _ in drawn.values()],
                                   beta_weight[list(drawn)], prepared.seed)
    shape = crop_voi.shape
    marginals = sum(w * np.asarray(f.marginals)[: shape[0], : shape[1], : shape[2]]
                    for w, (f, _, _) in zip(beta_weight, fits))
    top = int(np.argmax(beta_weight))
    fit = fits[top][0]
    probability, fraction = fraction_summaries(marginals)
    voxel_ml = prepared.reference.voxel_volume_ml
    levels = np.asarray(fit.emission.mean).T * scales + centres  # (2, M) image units
    noise_sd = np.sqrt(np.asarray(fit.emission.rate) / np.asarray(fit.emission.shape)) * scales
    iterations = int(fit.num_iterations)
    fit_compile, fit_run = (sum(f[k] for f in fits) for k in (1, 2))
    draw_compile, draw_run = (sum(d[k] for d in drawn.values()) for k in (1, 2))
    timings = {"compile": first.timings["compile"] + fit_compile + draw_compile,
               "run": first.timings["run"] + fit_run + draw_run + (weighting.seconds if weighting else 0.0),
               "pv_fit": fit_run, "pv_draws": draw_run}
    if weighting is not None:
        timings["beta_log_partition"] = weighting.seconds
    run_options = {
        "fraction_levels": problem.num_levels, "beta": "auto" if weighting else beta,
        "neighbourhood": options.model.neighbourhood,
        "psf_fwhm_mm": options.model.psf_fwhm_mm, "wall_mm": options.model.wall_mm,
        "pet_noise": options.model.pet_noise if options.model.psf_fwhm_mm is not None else None,
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
        "noise_sd": noise_sd.tolist(), "beta": betas[top],
        "neighbour_weights": np.asarray(problem.weights).tolist(),
        "units": "image units; columns follow options.fusion.images_in_likelihood",
        "levels_note": ("the highest-weight beta's fit" if weighting else "the fit's"),
    }
    diagnostics = {
        "initial_fit": first.diagnostics,
        "converged": bool(fit.converged), "iterations": iterations,
        "fraction_sum_chains": chain_diagnostics(np.asarray(drawn[top][0].counts)[..., 1]),
        "beta_weighting": None if weighting is None else {
            **weighting.record, "sampled_betas": [betas[i] for i in drawn]},
        "fraction_sum_mean_field_voxels": float(fraction[crop_voi].sum()),
        "wall_voxels": None if omega is None else float(omega.sum()),
        "fit_grid_shape": [int(n) for n in problem.padded[0].shape[:3]],
        "elbo_note": "nats; lower bound on log p(y) + log Z(beta), comparable within one fit",
    }
    return MethodResult(
        probability=prepared.on_grid(probability.astype(np.float32)),
        volume_draws_ml=counts * voxel_ml,
        volume_method=PV_DRAWS_METHOD + (BETA_MIXTURE_NOTE if weighting else ""),
        tlg_draws=weighted * voxel_ml if prepared.pet_first else None,
        model=options.model.name, options=run_options, parameters=parameters, diagnostics=diagnostics,
        elbo=np.asarray(fit.elbo_trace)[:iterations].tolist(), timings_s=timings,
        maps={FRACTION_FILE: prepared.on_grid(fraction.astype(np.float32))})


register(Method("pv-potts", run_pv_potts, "partial-volume hidden MRF: a tumour fraction per "
                "voxel on --fraction-levels levels, PSF likelihood, joint volume draws",
                extra_outputs=lambda options: [FRACTION_FILE], rank=4))
