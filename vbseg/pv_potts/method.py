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

``--psf-sd S``: the given PSF FWHM is uncertain, with a normal prior of sd S around it. The
fit and the sampler run at the nodes of :func:`psf_grid` (the given FWHM + ``PSF_GRID_Z`` x
S) and are mixed as above, with each node's prior mass as its weight (times the beta weights
within the node with ``--beta auto``). The PSF is not weighted by the ELBO: on phantoms whose
noise is not the model's (Poisson, correlated) the bound peaked 0.5-1.5 mm above the true
FWHM on every draw tried (docs/research/model.md), so data weights would replace an honest
spread by one wrong FWHM. This is a cut of the PSF's likelihood, not its full posterior.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from vbseg.inference.chains import chain_diagnostics
from vbseg.io.result_files import FRACTION_FILE
from vbseg.methods.inputs import likelihood_inputs
from vbseg.methods.registry import Method, MethodResult, register
from vbseg.options import default_beta, fixed_beta, levels_for
from vbseg.potts.fitting import fit_potts
from vbseg.potts.gibbs_psf import gibbs_hidden_potts_psf
from vbseg.potts.meanfield_psf import fit_hidden_potts_vb_psf
from vbseg.potts.method import noise_model, tumour_choice
from vbseg.potts.model import NormalGammaPrior, neighbour_weights
from vbseg.potts.psf import signal_fwhm, whitening_text
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
# --psf-sd: the PSF FWHM's prior nodes, in sds from the given FWHM (module doc)
PSF_GRID_Z = (-2.0, -1.0, 0.0, 1.0, 2.0)
PSF_RULE = ("PSF nodes at the given FWHM + (-2, -1, 0, 1, 2) x --psf-sd, each weighted by the "
            "N(given, sd^2) mass of its bin (outer bins open; the prior truncated at 0 mm: nodes "
            "below it dropped, the lowest bin cut there, the masses renormalised); the PSF is "
            "not weighted by the data (the ELBO reads correlated and Poisson noise as extra blur: "
            "docs/research/model.md); with --beta auto, the beta grid weighted within each node")
PSF_MIXTURE_NOTE = "; with --psf-sd, drawn at each PSF node and mixed in proportion to its prior weight"
BETA_MIXTURE_NOTE = (f"; with --beta auto, drawn at each beta of the grid with weight >= "
                     f"{MIN_DRAW_WEIGHT:g} and mixed in proportion to the weights "
                     "exp(ELBO - log Z(beta))")


def _padded(likelihood, features, crop_voi, precision):
    return (jnp.asarray(pad_to_bucket(features, 0.0)),
            jnp.asarray(pad_to_bucket(likelihood.observed, False)),
            jnp.asarray(pad_to_bucket(crop_voi, False)),
            jnp.asarray(pad_to_bucket(precision, 1.0)))


class BetaPath(NamedTuple):
    """--beta auto: log Z(beta) - log Z(0) and E[T | beta] of the level prior at ``BETA_GRID``,
    the record of the whole TI path from 0, and the seconds it took."""

    log_partition: np.ndarray
    mean_statistic: np.ndarray
    record: dict
    seconds: float


def beta_path(num_levels: int, roi, weights, seed: int) -> BetaPath:
    """The level prior's log partition function along ``PATH_STEP`` steps from 0 on the fit's
    ROI (module doc); it does not depend on the image, so one path serves every PSF node."""
    start = time.perf_counter()
    path_betas = np.round(np.arange(0.0, BETA_GRID[-1] + PATH_STEP / 2, PATH_STEP), 6)
    log_z, path = level_log_partition(path_betas, level_interaction(num_levels),
                                      level_log_prior(num_levels), roi, weights, seed=seed)
    at = [int(np.flatnonzero(np.isclose(path_betas, b))[0]) for b in BETA_GRID]
    record = {"betas": path_betas.tolist(), "mean_pair_statistic": path.tolist(),
              "log_partition": log_z.tolist()}
    return BetaPath(log_z[at], path[at], record, time.perf_counter() - start)


def weigh_betas(fits, path: BetaPath) -> tuple[np.ndarray, dict]:
    """(weights ∝ exp(ELBO - log Z(beta)) of the fits at ``BETA_GRID``, their record)."""
    elbos = [float(np.asarray(f.elbo_trace)[int(f.num_iterations) - 1]) for f in fits]
    result = beta_weights(BETA_GRID, elbos, path.log_partition, path.mean_statistic)
    record = {"betas": list(BETA_GRID), "elbo": result.elbo.tolist(),
              "log_partition": result.log_partition.tolist(), "weights": result.weights.tolist(),
              "posterior_mean_beta": float(np.dot(result.weights, BETA_GRID)), "path": path.record,
              "rule": "weights ∝ exp(ELBO(beta) - (log Z(beta) - log Z(0))), uniform prior on "
                      "the grid; log Z by thermodynamic integration (trapezoid) of the level "
                      "prior's pair statistic simulated by checkerboard Gibbs on the fit's ROI"}
    return result.weights, record


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
    None), the TLG ``count_weights``, the ``start`` level marginals, ``num_levels``, the
    static PSF arguments ``statics`` (the PET's FWHM there is what is left of the PSF after
    whitening), ``noise_fwhm_mm``, the ``--noise-fwhm`` the PET was whitened by (0: none), and
    ``blurred``, which images have a PSF (the PET with ``--psf-fwhm`` above 0)."""

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
    noise_fwhm_mm: float
    blurred: tuple


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
    counted = likelihood.measured[..., 0] if prepared.pet_first else np.ones(crop_voi.shape)
    problem = LevelProblem(
        padded=padded, weights=jnp.asarray(neighbour_weights(reference.spacing, options.model.neighbourhood)),
        unary=jnp.broadcast_to(jnp.asarray(level_log_prior(num_levels)), grid + (num_levels,)),
        design=jnp.asarray(level_design(num_levels)),
        prior=NormalGammaPrior(*(jnp.float32(p) for p in NormalGammaPrior())),
        offset=None if omega is None else jnp.asarray(wall_offset(omega, num_modalities)),
        count_weights=jnp.asarray(pad_to_bucket(counted.astype(np.float32), 0.0)),
        start=levels_from_classes(start_marginals, num_levels), num_levels=num_levels,
        statics=dict(psf_fwhm_mm=tuple(float(f) for f in psf), spacing_mm=spacing),
        noise_fwhm_mm=float(options.model.noise_fwhm_mm or 0.0),
        blurred=tuple(bool(options.model.psf_fwhm_mm) and m == "pet" for m in likelihood.modalities))
    return problem, omega


def psf_grid(fwhm_mm: float, sd_mm: float | None, low_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(FWHMs, prior weights) of ``--psf-sd``: the given FWHM plus ``PSF_GRID_Z`` sds, each node
    weighted by the N(given, sd^2) mass of its bin (half-way to its neighbours, the outer bins
    open), the prior truncated at ``low_mm`` (0, or the ``--noise-fwhm`` the PSF includes):
    nodes below it are dropped, the lowest bin is cut there and the masses renormalised.
    Without an sd: the given FWHM alone."""
    if not sd_mm:
        return np.array([float(fwhm_mm)]), np.ones(1)
    z = np.asarray(PSF_GRID_Z, np.float64)
    edges = np.maximum(np.concatenate([[-np.inf], (z[1:] + z[:-1]) / 2, [np.inf]]),
                       (low_mm - fwhm_mm) / sd_mm)
    mass = np.diff(special.ndtr(edges))
    fwhms = fwhm_mm + sd_mm * z
    keep = fwhms >= low_mm
    return fwhms[keep], mass[keep] / mass[keep].sum()


def at_fwhm(problem: LevelProblem, fwhm_mm: float) -> LevelProblem:
    """``problem`` with the PET images' PSF FWHM (the images with one) set to ``fwhm_mm``, less
    the noise kernel the PET was whitened by (:func:`~vbseg.potts.psf.signal_fwhm`)."""
    signal = signal_fwhm(fwhm_mm, problem.noise_fwhm_mm)
    psf = tuple(signal if blurred else 0.0 for blurred in problem.blurred)
    return problem._replace(statics=dict(problem.statics, psf_fwhm_mm=psf))


class Components(NamedTuple):
    """The fits mixed for the outputs: ``fits`` (mean-field fit, compile s, run s) with their
    ``betas`` and PET ``fwhms`` (one per fit), the mixture ``weights`` (prior weight of the PSF
    node x the beta's weight within it), the beta weighting's ``record`` (None at a fixed beta)
    and the seconds its log Z path took."""

    fits: list
    betas: list
    fwhms: list
    weights: np.ndarray
    record: dict | None
    seconds: float


def fit_components(problem: LevelProblem, options, betas, seed: int) -> Components:
    """The level fits at every (PSF node, beta) and their mixture weights (module doc): at a
    fixed beta the PSF prior's weights; with --beta auto, within each PSF node the beta grid
    weighted by exp(ELBO - log Z(beta)) (log Z is the prior's and is shared by the nodes)."""
    given = float(options.model.psf_fwhm_mm or 0.0)
    fwhms, psf_weights = psf_grid(given, options.model.psf_sd_mm if given > 0 else None,
                                  problem.noise_fwhm_mm)
    path = None if options.model.beta != "auto" else beta_path(
        problem.num_levels, np.asarray(problem.padded[2]), np.asarray(problem.weights), seed)
    fits, grid_betas, grid_fwhms, weights, record = [], [], [], [], None
    for fwhm, psf_weight in zip(fwhms, psf_weights):
        node_fits = [level_fit(at_fwhm(problem, fwhm), b) for b in betas]
        beta_weight = np.ones(1)
        if path is not None:
            beta_weight, node_record = weigh_betas([f for f, _, _ in node_fits], path)
            if fwhm == given:
                record = dict(node_record, psf_fwhm_mm=float(given))
        fits += node_fits
        grid_betas += list(betas)
        grid_fwhms += [float(fwhm)] * len(betas)
        weights += list(psf_weight * beta_weight)
    return Components(fits, grid_betas, grid_fwhms, np.asarray(weights), record,
                      0.0 if path is None else path.seconds)


def component_draws(problem: LevelProblem, components: Components, seed: int):
    """{index: (joint draws, compile s, run s)} of the level sampler for every component with
    weight >= ``MIN_DRAW_WEIGHT``, each from its own mean-field mode."""
    drawn = {}
    for i, (fit, beta, fwhm) in enumerate(zip(components.fits, components.betas, components.fwhms)):
        if components.weights[i] >= MIN_DRAW_WEIGHT:
            drawn[i] = level_draws(at_fwhm(problem, fwhm), beta, fit[0], seed)
    return drawn


def _records(options, problem, components: Components, drawn, beta, volume_draws: int, component_ml):
    """(run options, the beta/PSF mixture's diagnostics) for the summary; ``component_ml`` the
    mean-field volume (voxel volume x sum of E[f] over the VOI) of each fit."""
    auto = components.record is not None
    mixed = len(components.fits) > 1
    run_options = {
        "fraction_levels": problem.num_levels, "beta": "auto" if auto else beta,
        "neighbourhood": options.model.neighbourhood,
        "psf_fwhm_mm": options.model.psf_fwhm_mm, "psf_sd_mm": options.model.psf_sd_mm,
        "noise_fwhm_mm": options.model.noise_fwhm_mm,
        "wall_mm": options.model.wall_mm,
        "pet_noise": options.model.pet_noise if options.model.psf_fwhm_mm is not None else None,
        "mixed_weight": DEFAULT_MIXED_WEIGHT,
        "prior": dict(NormalGammaPrior()._asdict(),
                      units="standardised features: (y - median) / sd over the VOI"),
        "inference": ("the two-class PSF hidden Potts fit (mean-field) as the start; the "
                      "partial-volume model by mean-field VB (damped checkerboard level sweeps, "
                      "conjugate regression update); joint draws by the level sampler"
                      + whitening_text(options.model.psf_fwhm_mm, options.model.noise_fwhm_mm)),
        "volume_draws": volume_draws,
    }
    mixture = None if not mixed else {
        "components": [{"beta": b, "psf_fwhm_mm": f, "weight": float(w), "sampled": i in drawn,
                        "mean_field_volume_ml": ml}
                       for i, (b, f, w, ml) in enumerate(zip(components.betas, components.fwhms,
                                                             components.weights, component_ml))],
        "rule": PSF_RULE if options.model.psf_sd_mm else "the beta grid's weights at the given PSF"}
    return run_options, mixture


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
    components = fit_components(problem, options, BETA_GRID if options.model.beta == "auto" else (beta,),
                                prepared.seed)
    drawn = component_draws(problem, components, prepared.seed)
    counts, weighted = mixed_draws([(np.asarray(d.counts)[..., 1], np.asarray(d.weighted)[..., 1])
                                    for d, _, _ in drawn.values()],
                                   components.weights[list(drawn)], prepared.seed)
    shape, voxel_ml = crop_voi.shape, prepared.reference.voxel_volume_ml
    each = [np.asarray(f.marginals)[: shape[0], : shape[1], : shape[2]] for f, _, _ in components.fits]
    component_ml = [float(fraction_summaries(m)[1][crop_voi].sum() * voxel_ml) for m in each]
    marginals = sum(w * m for w, m in zip(components.weights, each))
    top = int(np.argmax(components.weights))
    fit = components.fits[top][0]
    probability, fraction = fraction_summaries(marginals)
    levels = np.asarray(fit.emission.mean).T * scales + centres  # (2, M) image units
    noise_sd = (np.sqrt(np.asarray(fit.emission.rate) / np.asarray(fit.emission.shape)) * scales
                * likelihood.noise_gain)  # the measured image's noise (--noise-fwhm)
    iterations = int(fit.num_iterations)
    fit_compile, fit_run = (sum(f[k] for f in components.fits) for k in (1, 2))
    draw_compile, draw_run = (sum(d[k] for d in drawn.values()) for k in (1, 2))
    timings = {"compile": first.timings["compile"] + fit_compile + draw_compile,
               "run": first.timings["run"] + fit_run + draw_run + components.seconds,
               "pv_fit": fit_run, "pv_draws": draw_run}
    if components.record is not None:
        timings["beta_log_partition"] = components.seconds
    run_options, mixture = _records(options, problem, components, drawn, beta, int(counts.size),
                                    component_ml)
    run_options.update(tumour_rule=tumour_rule, fusion=likelihood.record)
    parameters = {
        "background_level": levels[0].tolist(), "tumour_level": levels[1].tolist(),
        "noise_sd": noise_sd.tolist(), "beta": components.betas[top],
        "psf_fwhm_mm": components.fwhms[top] if any(psf) else None,
        "neighbour_weights": np.asarray(problem.weights).tolist(),
        "units": "image units; columns follow options.fusion.images_in_likelihood",
        "levels_note": "the highest-weight fit's" if mixture else "the fit's",
    }
    diagnostics = {
        "initial_fit": first.diagnostics,
        "converged": bool(fit.converged), "iterations": iterations,
        "fraction_sum_chains": chain_diagnostics(np.asarray(drawn[top][0].counts)[..., 1]),
        "beta_weighting": None if components.record is None else {
            **components.record, "sampled_betas": sorted({components.betas[i] for i in drawn})},
        "mixture": mixture,
        "fraction_sum_mean_field_voxels": float(fraction[crop_voi].sum()),
        "wall_voxels": None if omega is None else float(omega.sum()),
        "fit_grid_shape": [int(n) for n in problem.padded[0].shape[:3]],
        "elbo_note": "nats; lower bound on log p(y) + log Z(beta), comparable within one fit",
    }
    note = (BETA_MIXTURE_NOTE if components.record is not None else "") + (
        PSF_MIXTURE_NOTE if options.model.psf_sd_mm and any(psf) else "")
    return MethodResult(
        probability=prepared.on_grid(probability.astype(np.float32)),
        volume_draws_ml=counts * voxel_ml, volume_method=PV_DRAWS_METHOD + note,
        tlg_draws=weighted * voxel_ml if prepared.pet_first else None,
        model=options.model.name, options=run_options, parameters=parameters, diagnostics=diagnostics,
        elbo=np.asarray(fit.elbo_trace)[:iterations].tolist(), timings_s=timings,
        maps={FRACTION_FILE: prepared.on_grid(fraction.astype(np.float32))})


register(Method("pv-potts", run_pv_potts, "partial-volume hidden MRF: a tumour fraction per "
                "voxel on --fraction-levels levels, PSF likelihood, joint volume draws",
                extra_outputs=lambda options: [FRACTION_FILE], rank=4))
