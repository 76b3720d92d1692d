"""Fitting the GP logit-field model (:mod:`vbseg.gp.model`) to an image stack by SVI
(:mod:`vbseg.inference.svi`), for the pipeline: :func:`fit_gp_logit` returns NumPy arrays on
the input grid, fitted parameters in image units, the ELBO trace, timings and method strings.

Steps, all but the standardisation inside two jitted programs (fit; draws), each compiled
apart from its run:

1. Standardise each modality over its observed VOI voxels, (y - median) / sd; pad the grid to a
   multiple of 8 voxels per axis (outside the VOI) so nearby crop sizes share one program.
2. Start: four labelings, the first modality (whose higher class is tumour) above its 50th,
   90th, 99th and 99.9th percentiles (the last for a lesion under 0.1 % of a large crop, where a
   k-means start splits the background instead), each refined by 20 EM steps of an
   independent-voxel Gaussian mixture over all modalities (tied variances); the one with the
   highest mixture log-likelihood gives the class parameters and responsibilities r0.
   The field starts at the kriging (GP regression) fit of the logits of r0 clipped to
   [0.02, 0.98]: eps0 = L^T P^T (P K P^T + a^2 I)^-1 (logit r0 - m0), 40 conjugate-gradient
   steps (P: restriction to the VOI), at the prior medians of l and a. With a prior logit ell
   (the offset of :func:`vbseg.gp.model.gp_logit_model`, f = m + gamma ell + g), m and gamma
   start at the least-squares line of those logits on ell over the VOI, gamma clipped to
   [0.05, 4] (it must be > 0 in log space; a useless ell starts at the floor, which is near
   its optimum: pure N(0, 3^2) noise on the 22 mm sphere settles at gamma ~ 0.08 from starts of
   0.01 and 1 alike after 2000 steps, tests/gp/test_deep_gp.py), and the field is kriged from the
   residual logit(r0) - m - gamma ell.
3. SVI from there (Adam, reparameterised ELBO, convergence per VOI voxel); gamma is a hyper
   site like m (a point estimate in log space, or log-normal for ``hyper="gaussian"``).
4. ``num_prob_draws`` draws f ~ q (with theta at its point estimate, or drawn from q for
   ``hyper="gaussian"``) give two probability maps: the field probability E_q[sigmoid(f_v)]
   (the model's P(tumour at v), the issue's definition) and the label probability E_q[r_v(f)],
   r_v = P(z_v = 1 | f_v, y_v, theta) the exact posterior of the observed voxel's label given
   the field and its own data. ``probability`` picks which one is the tumour probability and
   how labels are drawn: for each field draw, ceil(num_volume_draws / num_prob_draws) label
   fields z_v ~ Bernoulli(sigmoid(f_v)) ("field") or Bernoulli(r_v(f)) ("label") give the
   volume draws, which carry the spatial correlation of q.

   Default "label": it is the posterior of the observed voxel's label, P(z_v | y), which is
   what a contour of the image should show; E_q[sigmoid(f_v)] is the probability for a *new*
   voxel at v, before its own data. Measured (22 mm PET sphere, 4:1, CV 10 %, PSF not
   modelled): on the 24^3 phantom crop both reach Dice >= 0.85 (field 0.94-0.97, label
   0.89-0.93; label ECE ~0.0015 vs ~0.004); on a 64^3 crop (lesion 0.04 % of the voxels) the
   field needs a +5 sd excursion of the GP, its posterior falls short inside the lesion and
   field Dice drops to 0.72-0.94 while label Dice stays 0.89. The field's volume draws are
   far wider (Bernoulli(sigmoid f) over a broad rim); see ``benchmarks/results/bench_gp.md``.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vbseg.gp.kernels import embedding_shape
from vbseg.gp.model import (
    FieldPrior,
    GPLogitModel,
    GridGP,
    responsibility,
)
from vbseg.gp.start import PRIOR_LOGIT_SITE, start_values
from vbseg.inference.svi import (
    fit_svi,
    guide_draw,
    guide_location,
    model_sites,
)
from vbseg.prepare import pad_to_bucket, standardise_features
from vbseg.runtime import compile_and_run

FIELD_SITES = ("field_eps",)
INTENSITY_SITES = ("field_eps", "intensity_eps")
# The FFT torus is sized for the kernel at this many prior sd above the median length-scale
# (reach tolerance below): larger length-scales wrap around and the clipped eigenvalue mass
# (reported) grows.
TORUS_LENGTHSCALE_Z = 1.0
TORUS_REACH_TOLERANCE = 1e-2
TORUS_OPTIONS = ("compact", "exact")
PROBABILITIES = ("field", "label")
DEFAULT_FIELD_PRIOR = FieldPrior()
HYPER_REPORTED = ("field_lengthscale", "field_amplitude", "field_mean", "mu", "tau")


class GPResult(NamedTuple):
    """What :func:`fit_gp_logit` returns (NumPy; input grid; image units).

    tumour_probability: (I, J, K) the map ``probability`` names (0 outside the VOI), one of:
    field_probability: (I, J, K) E_q[sigmoid(+-f_v)] for the tumour class (the model's
        P(tumour at v)), and label_probability: (I, J, K) E_q[P(z_v = tumour | f, y_v, theta)].
    volume_draws_voxels: (num_volume_draws,) tumour voxel counts in the VOI, labels drawn from
        the map ``probability`` names; volume_draws_by_map: {"label": ..., "field": ...} both
        (the same uniforms, so they differ only by the map).
    weighted_draws: (num_volume_draws,) sum of ``count_weights`` over tumour voxels (e.g. PET
        for TLG / voxel volume), or None.
    elbo_trace: (steps run,) ELBO estimates (nats).
    lengthscale_mm, amplitude, logit_mean: field hyperparameters (point estimates, or the
        medians of their log-normal / normal q).
    class_means, class_sds: (2, M) in image units, classes ordered by the first modality's
        mean; tumour_class: the index (1 unless the fit swapped the classes).
    timings: {"compile", "run"} seconds. diagnostics: steps, convergence, torus, clipped
        eigenvalue mass, ... method: strings for summary.json.
    prior_logit_weight: the learned weight gamma of the prior logit (its point estimate, or the
        median of its log-normal q), None when no prior logit was given.
    """

    tumour_probability: np.ndarray
    field_probability: np.ndarray
    label_probability: np.ndarray
    volume_draws_voxels: np.ndarray
    volume_draws_by_map: dict
    weighted_draws: np.ndarray | None
    elbo_trace: np.ndarray
    lengthscale_mm: float
    amplitude: float
    logit_mean: float
    class_means: np.ndarray
    class_sds: np.ndarray
    tumour_class: int
    timings: dict
    diagnostics: dict
    method: dict
    prior_logit_weight: float | None = None


def _model_args(features, observed, voi, prior_logit):
    """The model's positional arguments: the prior logit only when there is one (so without it
    the program is the plain model's)."""
    return (features, observed, voi) if prior_logit is None else (features, observed, voi, prior_logit)


@partial(jax.jit, static_argnames=("model", "family", "rank", "hyper", "num_particles",
                                   "max_steps", "check_every"))
def _fit_program(key, features, observed, voi, prior_logit, weight_start, learning_rate, tol, init_scale,
                 min_steps, *, model, family, rank, hyper, num_particles, max_steps, check_every):
    """Start (k-means + EM + kriging) and SVI, one program. ``prior_logit``: (X, Y, Z) or None
    (a pytree without leaves: its own compiled program); ``weight_start``: its weight's start
    (scalar, NaN: least squares) or None. Returns (SVIResult, the weight's start or None)."""
    init_hyper, init_field = start_values(features, observed, voi, model, prior_logit, weight_start)
    sites = FIELD_SITES if model.intensity is None else INTENSITY_SITES
    fit = fit_svi(key, _model_args(features, observed, voi, prior_logit), init_hyper, init_field,
                  learning_rate, tol, jnp.maximum(jnp.sum(voi), 1).astype(features.dtype), init_scale,
                  min_steps, model=model, field_sites=sites, family=family, rank=rank, hyper=hyper,
                  num_particles=num_particles, max_steps=max_steps, check_every=check_every)
    return fit, init_hyper.get(PRIOR_LOGIT_SITE)


@partial(jax.jit, static_argnames=("model", "family", "hyper", "num_field_draws",
                                   "labels_per_field", "probability"))
def _draw_program(key, params, features, observed, voi, prior_logit, count_weights, *, model, family,
                  hyper, num_field_draws, labels_per_field, probability):
    """Field draws from q: means of sigmoid(f) and r(f) over draws, and per draw the class-1
    voxel counts of ``labels_per_field`` label fields drawn from sigmoid(f) and from r(f), and
    the weighted sums of those drawn from the map ``probability`` names. With a prior logit, f
    includes gamma ell (gamma drawn from q too for ``hyper="gaussian"``)."""
    args = _model_args(features, observed, voi, prior_logit)
    sites = FIELD_SITES if model.intensity is None else INTENSITY_SITES
    mask = voi.astype(features.dtype)

    def one(carry, draw_key):
        field_key, label_key = jax.random.split(draw_key)
        values = guide_draw(field_key, params, args, model=model, field_sites=sites, family=family,
                            hyper=hyper)
        out = model_sites(model, args, values, ("logit", "class_log_lik"))
        field = jax.nn.sigmoid(out["logit"]) * mask
        label = responsibility(out["logit"], out["class_log_lik"]) * mask
        chosen_map = field if probability == "field" else label

        def label_draw(k):  # one label field per map from the same uniforms
            uniform = jax.random.uniform(k, field.shape, field.dtype)
            counts = {"field": jnp.sum(uniform < field), "label": jnp.sum(uniform < label)}
            return counts, jnp.sum(jnp.where(uniform < chosen_map, count_weights, 0.0))

        # sequential in batches of 8: memory stays a few grids, not labels_per_field of them
        counts, weighted = jax.lax.map(label_draw, jax.random.split(label_key, labels_per_field),
                                       batch_size=8)
        field_sum, label_sum = carry
        return (field_sum + field, label_sum + label), (counts, weighted)

    zeros = jnp.zeros(voi.shape, features.dtype)
    (field_sum, label_sum), (counts, weighted) = jax.lax.scan(
        one, (zeros, zeros), jax.random.split(key, num_field_draws))
    location = guide_location(params, args, model=model, field_sites=sites)
    reported = HYPER_REPORTED + ((PRIOR_LOGIT_SITE,) if prior_logit is not None else ())
    location = {name: location[name] for name in reported}
    negative_mass = jnp.zeros(())
    if model.grid.structure == "fft":
        structure = model.grid.build(location["field_lengthscale"], location["field_amplitude"])
        negative_mass = structure.negative_mass
    return (field_sum / num_field_draws, label_sum / num_field_draws, counts, weighted, location,
            negative_mass)


def torus_shape(grid_shape, spacing_mm, kernel: str, prior: FieldPrior,
                torus: str = "compact") -> tuple[int, int, int]:
    """The FFT torus a fit uses: :func:`~vbseg.gp.kernels.embedding_shape` for the prior's
    length-scale TORUS_LENGTHSCALE_Z sd above its median, reach tolerance 1e-2; "exact": at
    least 2n - 1 per axis (the grid covariance is exactly the kernel's, up to clipped negative
    eigenvalues); "compact": the periodic approximation, n + reach / h (the kernel differs by
    at most 1e-2 x a^2 at the distances where it wraps), ~1.5-3x fewer latents on large grids."""
    if torus not in TORUS_OPTIONS:
        raise ValueError(f"torus must be one of {TORUS_OPTIONS} or a shape, got {torus!r}")
    return embedding_shape(grid_shape, spacing_mm, kernel,
                           prior.lengthscale_quantile(TORUS_LENGTHSCALE_Z),
                           tolerance=TORUS_REACH_TOLERANCE, exact=torus == "exact")


def fit_gp_logit(data: np.ndarray, spacing_mm, *, kernel: str = "matern32", structure: str = "fft",
                 family: str = "meanfield", rank: int = 8, steps: int = 400,
                 learning_rate: float = 0.05, seed: int = 0, num_prob_draws: int = 64,
                 num_volume_draws: int = 2000, voxel_mask: np.ndarray | None = None,
                 observed: np.ndarray | None = None, count_weights: np.ndarray | None = None,
                 prior: FieldPrior = DEFAULT_FIELD_PRIOR, tied: bool = True, intensity: str | None = None,
                 probability: str = "label", hyper: str = "point", num_particles: int = 1,
                 tol: float = 1e-4,
                 min_steps: int = 100, check_every: int = 25, init_scale: float = 0.1,
                 torus="compact", prior_logit: np.ndarray | None = None,
                 prior_logit_weight_start: float | None = None) -> GPResult:
    """Fit the GP logit-field model to an image stack and summarise q (module docstring).

    Args:
        data: (M, I, J, K) float images on one grid (or (I, J, K) for one modality); the first
            decides which class is tumour (the one with the higher mean, as for PET).
        spacing_mm: (3,) voxel size.
        kernel: "matern12", "matern32", "matern52" or "se". structure: "fft" (isotropic kernel,
            circulant embedding on a torus) or "kronecker" (separable product kernel).
        family: "meanfield" or "lowrank" (rank ``rank``) Gaussian over the whitened field.
        steps: the SVI step cap (Adam, ``learning_rate``); the loop stops earlier when the mean
            ELBO of a chunk of ``check_every`` steps improves by < ``tol`` nats per VOI voxel
            (after ``min_steps``).
        seed: seeds the SVI draws and the posterior draws.
        num_prob_draws: field draws from q for the probability maps (and the volume draws).
        num_volume_draws: volume draws (label fields drawn given the field draws).
        voxel_mask: (I, J, K) bool VOI (default: every voxel). observed: (I, J, K, M) bool,
            where each modality is observed (default: everywhere).
        count_weights: optional (I, J, K) weights summed over tumour voxels per volume draw.
        prior: the field's priors. tied: one noise precision per modality for both classes.
        intensity: None, "tumour" or "all": add a GP intensity field to the tumour class's /
            every class's mean in the first modality (:func:`vbseg.gp.model.gp_intensity_field`).
        probability: "label" (E_q[r(f)], the voxel's own label posterior; labels for the
            volume draws from r(f)) or "field" (E_q[sigmoid(f)]; labels from sigmoid(f)).
        hyper: "point" (MAP in log space) or "gaussian" (Gaussian in log space).
        torus: the FFT torus: "compact" or "exact" (:func:`torus_shape` of the padded grid), or
            a shape (m1, m2, m3).
        prior_logit: optional (I, J, K) float prior logit ell of the tumour class (e.g. a CNN's
            logits on this grid): the field becomes f = m + gamma ell + g with gamma >= 0
            learned (:func:`vbseg.gp.model.gp_logit_model`; ``GPResult.prior_logit_weight``).
            It is the logit of the model's class 1, which the start makes the first modality's
            higher class; should the fit swap the classes, gamma >= 0 can only oppose the
            data and is driven towards 0 (``diagnostics["prior_logit_class"]`` says which).
            Without it the fit is the plain GP logit field, unchanged.
        prior_logit_weight_start: gamma's start (> 0); None: the clipped least-squares slope
            of the start's logits on ell (module docstring, step 2).
    """
    if probability not in PROBABILITIES:
        raise ValueError(f"probability must be one of {PROBABILITIES}, got {probability!r}")
    stack, voi, seen, prior_logit = _checked_inputs(data, voxel_mask, observed, prior_logit,
                                                    prior_logit_weight_start)
    grid_shape = stack.shape[:3]
    start = time.perf_counter()
    features, centres, scales = standardise_features(stack, seen)
    features, seen_p, voi_p = (pad_to_bucket(features, 0.0), pad_to_bucket(seen, False),
                               pad_to_bucket(voi, False))
    padded = features.shape[:3]
    spacing = tuple(float(s) for s in spacing_mm)
    if structure == "fft" and isinstance(torus, str):
        torus = torus_shape(padded, spacing, kernel, prior, torus)
    grid = GridGP(padded, spacing, kernel, structure,
                  tuple(int(m) for m in torus) if structure == "fft" else None)
    model = GPLogitModel(grid, prior, tied, intensity)
    arrays = (jnp.asarray(features), jnp.asarray(seen_p), jnp.asarray(voi_p),
              None if prior_logit is None
              else jnp.asarray(pad_to_bucket(np.where(voi, prior_logit, 0.0), 0.0)))
    prep_s = time.perf_counter() - start

    key_fit, key_draws = jax.random.split(jax.random.PRNGKey(seed))
    weight_start = None if prior_logit is None else jnp.float32(
        np.nan if prior_logit_weight_start is None else prior_logit_weight_start)
    settings = (jnp.float32(learning_rate), jnp.float32(tol), jnp.float32(init_scale),
                jnp.int32(min(min_steps, steps)))
    (fit, weight_start), fit_compile, fit_run = compile_and_run(
        _fit_program, (key_fit,) + arrays + (weight_start,) + settings,
        model=model, family=family, rank=rank, hyper=hyper, num_particles=num_particles,
        max_steps=steps, check_every=check_every)
    weights = np.zeros(padded, np.float32) if count_weights is None else pad_to_bucket(
        np.asarray(count_weights, np.float32), 0.0)
    labels_per_field = max(1, math.ceil(num_volume_draws / num_prob_draws))
    draws, draw_compile, draw_run = compile_and_run(
        _draw_program, (key_draws, fit.params) + arrays + (jnp.asarray(weights),), model=model,
        family=family, hyper=hyper, num_field_draws=num_prob_draws,
        labels_per_field=labels_per_field, probability=probability)

    start = time.perf_counter()
    field_probability, label_probability, counts, weighted, location, negative_mass = (
        jax.tree_util.tree_map(np.asarray, draws))
    mu = np.asarray(location["mu"]) * scales + centres
    sds = np.broadcast_to(scales / np.sqrt(np.asarray(location["tau"])), mu.shape).copy()
    tumour = int(np.argmax(mu[:, 0]))
    crop = tuple(slice(0, n) for n in grid_shape)
    field_probability, label_probability = field_probability[crop], label_probability[crop]
    total = float(voi.sum())
    counts = {name: c.reshape(-1)[:num_volume_draws].astype(np.float64)
              for name, c in counts.items()}
    weighted = weighted.reshape(-1)[:num_volume_draws]
    weight = None if prior_logit is None else float(location[PRIOR_LOGIT_SITE])
    if tumour == 0:  # the fit swapped the classes: the field is the background's logit
        label_probability = np.where(voi, 1.0 - label_probability, 0.0)
        field_probability = np.where(voi, 1.0 - field_probability, 0.0)
        counts = {name: total - c for name, c in counts.items()}
        weighted = float((weights * voi_p).sum()) - weighted
    order = np.argsort(mu[:, 0], kind="stable")
    num_steps = int(fit.num_steps)
    diagnostics = {
        "steps": num_steps, "converged": bool(fit.converged), "max_steps": steps,
        "fit_grid_shape": list(padded), "latent_shape": list(grid.latent_shape),
        "latent_size": int(np.prod(grid.latent_shape)),
        "torus_negative_eigenvalue_mass": float(negative_mass) if structure == "fft" else None,
        "num_prob_draws": num_prob_draws, "labels_per_field_draw": labels_per_field,
        "voi_voxels": int(total),
    }
    if prior_logit is not None:
        diagnostics.update({
            "prior_logit_weight": weight, "prior_logit_weight_start": float(weight_start),
            "prior_logit_sd": float(prior_logit[voi].std()),
            "prior_logit_class": "tumour" if tumour == 1 else "background (classes swapped)"})
    return GPResult(
        tumour_probability=(field_probability if probability == "field"
                            else label_probability).astype(np.float32),
        field_probability=field_probability.astype(np.float32),
        label_probability=label_probability.astype(np.float32),
        volume_draws_voxels=counts[probability], volume_draws_by_map=counts,
        weighted_draws=None if count_weights is None else weighted.astype(np.float64),
        elbo_trace=np.asarray(fit.elbo_trace)[:num_steps].astype(np.float64),
        lengthscale_mm=float(location["field_lengthscale"]),
        amplitude=float(location["field_amplitude"]),
        logit_mean=float(location["field_mean"]),
        class_means=mu[order], class_sds=sds[order], tumour_class=int(np.flatnonzero(order == tumour)[0]),
        timings={"compile": fit_compile + draw_compile,
                 "run": prep_s + fit_run + draw_run + time.perf_counter() - start},
        diagnostics=diagnostics,
        method=_method_strings(kernel, structure, family, rank, hyper, num_particles, grid,
                               num_prob_draws, num_volume_draws, labels_per_field, intensity,
                               probability, None if weight is None else model.prior_logit_weight_scale),
        prior_logit_weight=weight,
    )


def _checked_inputs(data, voxel_mask, observed, prior_logit, prior_logit_weight_start):
    """(stack (I, J, K, M) float32, VOI (I, J, K), observed-and-in-VOI (I, J, K, M), prior logit
    float32 or None) of :func:`fit_gp_logit`'s arguments; ValueError names a bad one."""
    data = np.asarray(data, np.float32)
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4:
        raise ValueError(f"data must be (M, I, J, K) or (I, J, K), got shape {data.shape}")
    stack = np.moveaxis(data, 0, -1)
    grid_shape = stack.shape[:3]
    voi = np.ones(grid_shape, bool) if voxel_mask is None else np.asarray(voxel_mask, bool)
    seen = np.ones(stack.shape, bool) if observed is None else np.asarray(observed, bool)
    seen = seen & voi[..., None]
    if not voi.any():
        raise ValueError("the voxel mask is empty")
    if prior_logit is not None:
        prior_logit = np.asarray(prior_logit, np.float32)
        if prior_logit.shape != grid_shape:
            raise ValueError(f"prior_logit must have the image grid's shape {grid_shape}, "
                             f"got {prior_logit.shape}")
        if not np.isfinite(prior_logit[voi]).all():
            raise ValueError("prior_logit has NaN or infinite values in the voxel mask")
        if prior_logit_weight_start is not None and not prior_logit_weight_start > 0:
            raise ValueError(f"prior_logit_weight_start must be > 0, got {prior_logit_weight_start!r}")
    return stack, voi, seen, prior_logit


def _method_strings(kernel, structure, family, rank, hyper, num_particles, grid, num_prob_draws,
                    num_volume_draws, labels_per_field, intensity, probability,
                    prior_logit_weight_scale=None) -> dict:
    kernel_text = {"fft": f"isotropic {kernel} kernel of the Euclidean distance (mm), circulant "
                          f"embedding on a {'x'.join(map(str, grid.latent_shape))} torus (FFT)",
                   "kronecker": f"separable product of 1D {kernel} kernels per axis (Kronecker)"}
    family_text = {"meanfield": "mean-field Gaussian", "lowrank": f"low-rank (rank {rank}) plus "
                   "diagonal Gaussian", "fullrank": "full-rank Gaussian"}[family]
    hyper_text = ("point estimates (MAP in log space)" if hyper == "point"
                  else "mean-field Gaussian in log space")
    with_offset = prior_logit_weight_scale is not None
    return {
        "model": ("GP logit field: P(tumour at v) = sigmoid(f_v), "
                  + ("f = m + gamma ell + g with a given prior logit ell (e.g. a CNN's logits) and "
                     f"its weight gamma ~ HalfNormal({prior_logit_weight_scale:g}) learned, "
                     "g ~ GP(0, k), " if with_offset else "f ~ GP(m, k), ")
                  + kernel_text[structure] + "; labels summed out (2-class Gaussian mixture per "
                  "voxel, diagonal across modalities)"
                  + ("" if intensity is None else f"; GP intensity field on {intensity} class means"
                     " (first modality)")),
        "inference": (f"SVI (Adam, reparameterised ELBO, {num_particles} draw(s) per step) with a "
                      f"{family_text} over the whitened field; length-scale, amplitude, field "
                      f"mean{', prior-logit weight' if with_offset else ''} and class parameters: "
                      f"{hyper_text}"),
        "probability": (f"E_q[sigmoid(f_v)] over {num_prob_draws} draws f ~ q"
                        if probability == "field" else
                        f"E_q[P(z_v = tumour | f, y_v)] over {num_prob_draws} draws f ~ q (the "
                        "label posterior given the field and the voxel's data)"),
        "volume": (f"posterior draws of whole label fields: {num_prob_draws} field draws f ~ q, "
                   f"{labels_per_field} label field(s) each, z_v ~ Bernoulli("
                   + ("sigmoid(f_v)" if probability == "field" else "P(z_v | f, y_v)")
                   + f"), first {num_volume_draws} kept (spatial correlation from q's field)"),
    }
