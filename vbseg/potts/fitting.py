"""Running a fit from the pipeline: padding a crop to a shape bucket, compiling apart from
running (timed), the PSF-free fit and, when asked, the PSF fit started from it, and the PET
noise weights. Returns plain NumPy in standardised units for ``vbseg.pipeline`` to report."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from vbseg.inference.chains import chain_diagnostics
from vbseg.potts.beta import BETA_MAX, FIELD_WEIGHT_MAX
from vbseg.potts.emission_updates import DEFAULT_STUDENT_DOF, NormalWishart
from vbseg.potts.gibbs import gibbs_hidden_potts
from vbseg.potts.gibbs_psf import gibbs_hidden_potts_psf
from vbseg.potts.meanfield import fit_hidden_potts_vb
from vbseg.potts.meanfield_psf import fit_hidden_potts_vb_psf
from vbseg.potts.model import DEFAULT_CONCENTRATION, NormalGammaPrior, neighbour_weights
from vbseg.prepare import SHAPE_BUCKET, pad_to_bucket  # noqa: F401  (SHAPE_BUCKET re-exported)
from vbseg.runtime import compile_and_run as _compile_and_run


class FitOutcome(NamedTuple):
    """What the pipeline keeps of a fit, in standardised units on the padded crop."""

    marginals: np.ndarray  # (X, Y, Z, K)
    means: np.ndarray  # (K, M)
    sds: np.ndarray  # (K, M) noise sd (at relative precision 1 for the PSF fit)
    proportions: np.ndarray  # (K,) E[pi] (uniform when not learned)
    elbo: np.ndarray | None  # trace of the last VB stage; None for the sampler
    diagnostics: dict
    timings: dict
    class_counts: np.ndarray | None = None  # (C, S, K) sampler: voxels per class per draw
    class_weighted: np.ndarray | None = None  # (C, S, K) sampler: sum of count weights
    beta: float | None = None  # the coupling used (learned when beta was estimated)
    field_weight: float | None = None  # the external field's weight gamma (learned or given)
    intensity: np.ndarray | None = None  # (X, Y, Z) GP intensity field, standardised units


def pet_relative_precision(image: np.ndarray, voi: np.ndarray) -> np.ndarray:
    """lambda_v for PET noise whose variance grows in proportion to the local mean uptake
    (Poisson-like): lambda_v = median / local mean, the local mean a Gaussian smoothing of the
    image (sigma 1 voxel), floored at 10 % of the VOI median to keep cold voxels finite."""
    median = float(np.median(image[voi]))
    local = ndimage.gaussian_filter(image.astype(np.float64), 1.0, mode="nearest")
    floor = 0.1 * abs(median) if median != 0 else 1e-3
    return (abs(median) / np.maximum(local, floor)).astype(np.float32)


def fit_potts(features, observed, voi, spacing, *, num_classes, beta, psf_fwhm_mm=None,
              relative_precision=None, neighbourhood=6, beta_estimator="fixed",
              emission="gaussian", dof=DEFAULT_STUDENT_DOF, external_field=None,
              learn_field_weight=False, field_weight=1.0, intensity=None, multiscale=False) -> FitOutcome:
    """Mean-field fit on a bucket-padded crop (compile timed apart from run).

    Without ``psf_fwhm_mm`` this is the PSF-free fit (restarts, learned proportions). With it
    (a tuple, one FWHM per modality, 0 = no blur) the PSF-free fit is the starting point of
    the PSF fit (:mod:`vbseg.potts.meanfield_psf`), whose result is returned.
    ``beta_estimator`` "pl" learns beta in the PSF-free fit from the start value ``beta``
    (variational EM with the pseudo-likelihood step); the PSF fit learns its own the same way
    under its own prior (uniform proportions), starting from the PSF-free marginals.
    ``emission`` and ``dof``: see :mod:`vbseg.potts.emission_updates` (PSF-free fit only).
    ``external_field`` (X, Y, Z, K) prior log-potentials (e.g. a network's logits on the tumour
    class) enter with weight ``field_weight``, learned by pseudo-likelihood with
    ``learn_field_weight`` (:func:`vbseg.potts.beta.estimate_coupling_pl`); the PSF fit
    keeps the weight the PSF-free fit ended with. ``intensity``: an
    :class:`~vbseg.potts.intensity_field.IntensityFieldSpec` (PSF-free fit only).
    ``multiscale``: restarts on a 2x2x2 coarser grid first (True;
    :mod:`vbseg.potts.multiscale`), or on the crop's grid (False).
    """
    padded = (jnp.asarray(pad_to_bucket(features, 0.0)),
              jnp.asarray(pad_to_bucket(observed, False)),
              jnp.asarray(pad_to_bucket(voi, False)))
    weights = jnp.asarray(neighbour_weights(spacing, neighbourhood))
    common = (jnp.float32(beta), weights, NormalGammaPrior(), jnp.float32(DEFAULT_CONCENTRATION))
    field = (None if external_field is None
             else jnp.asarray(pad_to_bucket(np.asarray(external_field, np.float32), 0.0)))
    result, compile_s, run_s = _compile_and_run(fit_hidden_potts_vb,
                                                padded + common + (field, None,
                                                                   jnp.float32(field_weight)),
                                                num_classes=num_classes,
                                                beta_estimator=beta_estimator, emission=emission,
                                                dof=float(dof), learn_field_weight=learn_field_weight,
                                                intensity=intensity, multiscale=multiscale)
    iterations = int(result.num_iterations)
    # with coarse restarts a restart that repeated an earlier coarse solution carries that
    # one's full-grid fit: agreement and the ELBO gap are over the distinct full-grid fits
    elbos, voxels = np.asarray(result.restart_elbos), np.asarray(result.restart_voxels)
    ran = (np.ones(elbos.shape, bool) if result.coarse_iterations is None
           else np.asarray(result.restart_iterations) > 0)
    diagnostics = {
        "converged": bool(result.converged),
        "iterations": iterations,
        "restart_elbos": np.asarray(result.restart_elbos).tolist(),
        "best_restart": int(result.best_restart),
        "restart_iterations": np.asarray(result.restart_iterations).tolist(),
        # restarts fitted on a 2x2x2 coarser grid first, one fine fit per distinct solution
        # (vbseg.potts.multiscale, --restarts coarse): their coarse iterations, else null
        "coarse_restart_iterations": (None if result.coarse_iterations is None
                                      else np.asarray(result.coarse_iterations).tolist()),
        **restart_agreement(elbos[ran], voxels[ran],
                            int(np.flatnonzero(ran).tolist().index(int(result.best_restart)))),
    }
    beta = float(result.beta)
    gamma = float(result.field_weight)
    if external_field is not None:
        diagnostics["field_weight"] = gamma
        if learn_field_weight:
            diagnostics["field_weight_at_prior_bound"] = bool(gamma >= 0.999 * FIELD_WEIGHT_MAX)
    if beta_estimator != "fixed":
        diagnostics["beta_trace"] = np.asarray(result.beta_trace)[:iterations].tolist()
        diagnostics["beta_at_prior_bound"] = bool(beta >= 0.999 * BETA_MAX)
    common = (jnp.float32(beta),) + common[1:]
    if psf_fwhm_mm is None:
        alpha = np.asarray(result.proportions)
        return FitOutcome(
            np.asarray(result.marginals), np.asarray(result.emission.mean),
            _class_scales(result.emission),
            alpha / alpha.sum(), np.asarray(result.elbo_trace)[:iterations],
            diagnostics, {"compile": compile_s, "run": run_s}, beta=beta, field_weight=gamma,
            intensity=None if intensity is None else np.asarray(result.intensity),
        )
    if relative_precision is None:
        relative_precision = np.ones(features.shape, np.float32)
    psf_args = padded + common + (result.marginals,
                                  jnp.asarray(pad_to_bucket(relative_precision, 1.0)),
                                  None if field is None else gamma * field)
    learn_beta = beta_estimator != "fixed"
    psf_result, psf_compile, psf_run = _compile_and_run(
        fit_hidden_potts_vb_psf, psf_args, psf_fwhm_mm=tuple(float(f) for f in psf_fwhm_mm),
        spacing_mm=tuple(float(s) for s in spacing), learn_beta=learn_beta,
    )
    emission = psf_result.emission
    sds = np.sqrt(np.asarray(emission.rate) / np.asarray(emission.shape))  # (M,)
    psf_iterations = int(psf_result.num_iterations)
    diagnostics = {
        "initial_fit": diagnostics,
        "converged": bool(psf_result.converged),
        "iterations": psf_iterations,
    }
    if learn_beta:
        # the PSF model's prior has uniform proportions, so it learns its own beta (the
        # PSF-free fit's, in initial_fit, goes with learned proportions; meanfield_psf doc)
        beta = float(psf_result.beta)
        diagnostics["beta_trace"] = np.asarray(psf_result.beta_trace)[:psf_iterations].tolist()
        diagnostics["beta_at_prior_bound"] = bool(beta >= 0.999 * BETA_MAX)
    return FitOutcome(
        np.asarray(psf_result.marginals), np.asarray(emission.mean).T,
        np.broadcast_to(sds, (num_classes, sds.size)).copy(),
        np.full(num_classes, 1.0 / num_classes),
        np.asarray(psf_result.elbo_trace)[: int(psf_result.num_iterations)],
        diagnostics, {"compile": compile_s + psf_compile, "run": run_s + psf_run}, beta=beta,
        field_weight=gamma,
    )


# Restarts whose every class size is within this fraction of the chosen restart's count as
# having found the same solution.
SAME_SOLUTION_TOLERANCE = 0.05


def restart_agreement(elbos, voxels, best) -> dict:
    """How the k-means restarts ended: class sizes (voxels, classes ordered by mean) per
    restart, and how many found the chosen solution (every class size within 5 %). Distinct
    solutions mean a multimodal posterior; the chosen one has the highest ELBO (restarts share
    beta, so their ELBOs are comparable), and ``elbo_gap_to_other_solution`` is how far above
    the best other solution it is (None when every restart found it; the restarts-disagree
    warning of :mod:`vbseg.trust` reads it). The caller passes the restarts that ran a fit of
    their own (with coarse restarts, the distinct full-grid fits)."""
    reference = voxels[best]
    tolerance = SAME_SOLUTION_TOLERANCE * np.maximum(reference, 1.0)
    same = np.array([bool(np.all(np.abs(v - reference) <= tolerance)) for v in voxels])
    elbos = np.asarray(elbos, np.float64)
    return {"restart_class_voxels": np.round(voxels, 1).tolist(),
            "restarts_agreeing_with_best": int(same.sum()),
            "elbo_gap_to_runner_up": float(np.sort(elbos)[-1] - np.sort(elbos)[-2])
            if len(elbos) > 1 else None,
            # the best's ELBO over the best of the restarts that found another solution
            "elbo_gap_to_other_solution": float(elbos[best] - elbos[~same].max()) if (~same).any() else None}


def _class_scales(post) -> np.ndarray:
    """(K, M) noise scales: sqrt(b / a) for Normal-Gamma posteriors (the Student-t scale for
    that emission); sqrt(diag(E[Lambda]^-1)) for Normal-Wishart ones."""
    if isinstance(post, NormalWishart):
        expected = np.asarray(post.dof)[:, None, None] * np.asarray(post.scale)
        return np.sqrt(np.diagonal(np.linalg.inv(expected), axis1=1, axis2=2))
    return np.sqrt(np.asarray(post.rate) / np.asarray(post.shape))


GIBBS_CHAINS = 4
GIBBS_BURN_IN = 200


def sample_potts(initial: FitOutcome, features, observed, voi, spacing, count_weights, *,
                 num_classes, beta, seed, num_draws, neighbourhood=6, psf_fwhm_mm=None,
                 relative_precision=None, emission="gaussian", dof=DEFAULT_STUDENT_DOF,
                 external_field=None) -> FitOutcome:
    """Gibbs (labels, class means/precisions, proportions) from a VB solution.

    GIBBS_CHAINS chains start at the VB labels (argmax of q), run GIBBS_BURN_IN sweeps of
    burn-in, then ceil(num_draws / chains) kept sweeps each; every kept sweep is one posterior
    draw of the label field, so volumes carry the spatial correlation the mean-field marginals
    ignore. With ``psf_fwhm_mm`` the PSF model is sampled
    (:mod:`vbseg.potts.gibbs_psf`; uniform proportions, ``relative_precision`` weights).
    ``emission`` "student" samples the Student-t model through its scale mixture (PSF-free).
    ``external_field`` (X, Y, Z, K): prior log-potentials, already weighted (no class renaming).
    """
    per_chain = -(-num_draws // GIBBS_CHAINS)
    padded = (jnp.asarray(pad_to_bucket(features, 0.0)),
              jnp.asarray(pad_to_bucket(observed, False)),
              jnp.asarray(pad_to_bucket(voi, False)),
              jnp.float32(beta),
              jnp.asarray(neighbour_weights(spacing, neighbourhood)))
    start = jnp.asarray(np.argmax(initial.marginals, axis=-1).astype(np.int32))
    weights = jnp.asarray(pad_to_bucket(count_weights.astype(np.float32), 0.0))
    field = (None if external_field is None
             else jnp.asarray(pad_to_bucket(np.asarray(external_field, np.float32), 0.0)))
    sizes = dict(num_chains=GIBBS_CHAINS, num_sweeps=per_chain, burn_in=GIBBS_BURN_IN)
    if psf_fwhm_mm is None:
        prior = NormalGammaPrior(*(jnp.full((num_classes, features.shape[-1]), p, jnp.float32)
                                   for p in NormalGammaPrior()))
        args = (jax.random.PRNGKey(seed),) + padded + (
            prior, jnp.float32(DEFAULT_CONCENTRATION), start, weights, field)
        result, compile_s, run_s = _compile_and_run(gibbs_hidden_potts, args, emission=emission,
                                                    dof=float(dof), **sizes)
        precisions = np.asarray(result.precisions)
        sampler = "checkerboard Gibbs with conjugate parameter draws" + (
            f"; Student-t ({dof:g} degrees of freedom) through its Gamma scale mixture"
            if emission == "student" else "")
    else:
        if relative_precision is None:
            relative_precision = np.ones(features.shape, np.float32)
        args = (jax.random.PRNGKey(seed),) + padded + (
            NormalGammaPrior(*(jnp.float32(p) for p in NormalGammaPrior())),
            jnp.asarray(pad_to_bucket(relative_precision, 1.0)), start, weights, field)
        result, compile_s, run_s = _compile_and_run(
            gibbs_hidden_potts_psf, args, num_classes=num_classes,
            psf_fwhm_mm=tuple(float(f) for f in psf_fwhm_mm),
            spacing_mm=tuple(float(x) for x in spacing), **sizes)
        precisions = np.broadcast_to(np.asarray(result.precisions)[:, :, None, :],
                                     np.asarray(result.means).shape)
        sampler = ("Gibbs for the PSF model: colour strides beyond the PSF support, conjugate "
                   "regression draws of the class means and noise precision")
    counts = np.asarray(result.counts)
    means = np.asarray(result.means).mean(axis=(0, 1))
    sds = np.sqrt(1.0 / precisions).mean(axis=(0, 1))
    diagnostics = {
        "initial_fit": dict(initial.diagnostics, elbo=initial.elbo.tolist()),
        "sampler": sampler,
        "burn_in": GIBBS_BURN_IN,
        # sweeps in which the classes' order by mean changed and were renamed back (label
        # switching), per chain
        "label_switches": np.asarray(result.label_switches).sum(axis=1).tolist(),
        # per class: split R-hat and ESS of its voxel count (the volume) across chains
        "volume_chains": [chain_diagnostics(counts[..., k]) for k in range(num_classes)],
    }
    proportions = (counts.mean(axis=(0, 1)) / max(float(voi.sum()), 1.0) if psf_fwhm_mm is None
                   else initial.proportions)
    timings = {"compile": initial.timings["compile"] + compile_s,
               "run": initial.timings["run"] + run_s}
    return FitOutcome(np.asarray(result.marginals), means, sds, proportions, None, diagnostics,
                      timings, counts, np.asarray(result.weighted), beta=float(beta),
                      field_weight=initial.field_weight)


# --beta auto is checked against the fit at the fixed default coupling: a learned fit whose
# expected tumour volume differs from the fixed fit's by more than this factor (either way),
# or whose beta stopped at its prior's bound, is not used (learned_or_fixed).
LEARNED_VOLUME_RATIO_LIMIT = 2.0


def tumour_voxels(fit: FitOutcome, tumour_index: int, voi) -> float:
    """Expected tumour voxels in ``voi`` (X, Y, Z) bool: sum_v q_v(t) over the VOI, with
    q (X', Y', Z', K) the fit's marginals on the bucket-padded crop (X' >= X, ...)."""
    shape = voi.shape
    return float(fit.marginals[: shape[0], : shape[1], : shape[2], tumour_index][voi].sum())


def learned_or_fixed(learned: FitOutcome, fixed: FitOutcome, learned_voxels: float,
                     fixed_voxels: float, fixed_beta: float) -> tuple[FitOutcome, dict]:
    """Keep the learned-beta fit, or fall back to the fixed-beta one, and say why.

    A learned coupling can fail without any other sign: one far too low lets the tumour class
    take the background (the PSF fit run at the PSF-free fit's beta put +5000 % on 10 mm
    spheres), one at its prior's bound was not determined by the data. So the learned fit is
    rejected when its beta is at the bound or when its expected tumour volume
    ``learned_voxels`` is outside [1/r, r] x ``fixed_voxels`` (r = LEARNED_VOLUME_RATIO_LIMIT,
    one voxel added to both so an empty class divides nothing), the fixed fit being the one
    at the default coupling ``fixed_beta``. Returns (the fit to use, with both fits' timings
    summed; its record for summary.json's diagnostics["learned_beta"]: both betas, both
    volumes in voxels, ``used`` "learned"/"fixed" and ``reason``, None when kept). A rejected
    fit's diagnostics go to the kept one's ``rejected_learned_fit``.
    """
    at_bound = bool(learned.beta is not None and learned.beta >= 0.999 * BETA_MAX)
    ratio = (learned_voxels + 1.0) / (fixed_voxels + 1.0)
    reason = None
    if at_bound:
        reason = f"the learned beta stopped at its prior's bound {BETA_MAX:g}"
    elif not 1.0 / LEARNED_VOLUME_RATIO_LIMIT <= ratio <= LEARNED_VOLUME_RATIO_LIMIT:
        reason = (f"the learned beta {learned.beta:.3g} gave an expected tumour volume "
                  f"{ratio:.3g} times the one at the fixed beta {fixed_beta:g} (limit "
                  f"{LEARNED_VOLUME_RATIO_LIMIT:g}x either way)")
    record = {"learned_beta": learned.beta, "fixed_beta": float(fixed_beta),
              "learned_tumour_voxels": learned_voxels, "fixed_tumour_voxels": fixed_voxels,
              "used": "learned" if reason is None else "fixed", "reason": reason}
    timings = {key: fixed.timings[key] + learned.timings[key] for key in fixed.timings}
    if reason is None:
        return learned._replace(timings=timings), record
    diagnostics = dict(fixed.diagnostics, rejected_learned_fit=learned.diagnostics)
    return fixed._replace(diagnostics=diagnostics, timings=timings), record
