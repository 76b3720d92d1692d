"""Mean-field variational Bayes for the hidden Potts model (coordinate ascent, analytic ELBO).

The variational family factorises over voxels and over the class parameters,

    q(z, mu, tau, pi) = prod_v q_v(z_v) * prod_m NormalGamma(mu_.m, tau_.m) * Dirichlet(pi | alpha),

and every update is the closed-form optimum of one factor given the others (CAVI; the
mean-field approximation of the Potts prior as in Zhang 1992 and Woolrich & Behrens, IEEE
TMI 2006). For labels,

    q_v(k)  ∝  exp( E_q[log p(y_v | mu_k, tau_k)] + E_q[log pi_k] + beta * sum_w w_vw q_w(k) ),

where the neighbour sum is one 6- or 26-point stencil over the grid (plus e_v(k) with an
external field). Updating all voxels at once can oscillate between two checkerboard patterns
when beta is large, so the colours of a proper colouring of the neighbourhood graph (two for
the bipartite 6-neighbourhood, eight for the 26-neighbourhood) are updated in turn: each
colour's update is an exact coordinate step and the ELBO never decreases. For the class
parameters the update is the conjugate Normal-Gamma posterior with voxel weights q_v(k), for
the proportions Dirichlet(alpha0 + sum_v q_v).

ELBO (nats) = sum_v sum_k q_v(k) (E[log p(y_v | k)] + E[log pi_k]) + beta E_q[S(z)] + H[q(z)]
              - KL(q(mu, tau) || p(mu, tau)) - KL(q(pi) || p(pi)),
a lower bound on log p(y) + log Z(beta); Z(beta) is constant while beta is fixed, so the
trace is comparable across iterations of one fit, not across values of beta.

With a symmetric K x K class-interaction matrix J in place of beta (prior energy
sum_{v~w} w_vw J[z_v, z_w]; J = beta I is the Potts model; a population prior learns J so
that e.g. a necrotic core next to its viable rim is favoured and next to fat is not, see
:mod:`vbseg.cohort.model`) the label update uses sum_l J[k, l] sum_w w_vw q_w(l) and the
ELBO's pair term is E_q of that energy (:func:`coupling_field`, :func:`pair_energy`).

The whole fit (k-means initialisation, sweeps, parameter updates, ELBO, convergence test)
runs inside one ``jax.jit`` with ``lax.while_loop``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln, xlogy

from vbseg.potts import beta as beta_estimation
from vbseg.potts.beta import estimate_coupling_pl
from vbseg.potts.emission_updates import (  # noqa: F401  (re-exported: the Gaussian pieces)
    DEFAULT_STUDENT_DOF,
    emission_vb,
    expected_log_likelihood,
    kl_normal_gamma,
    normal_gamma_update,
)
from vbseg.potts.intensity_field import field_emission, field_on_grid
from vbseg.potts.kmeans import (  # noqa: F401  (re-exported: the k-means start)
    KMEANS_SAMPLE,
    kmeans_labels,
    restart_levels,
    start_centres,
)
from vbseg.potts.model import (
    DEFAULT_CONCENTRATION,
    NormalGammaPrior,
    class_softmax,
    colour_masks,
    coupling_field,
    neighbour_sum,
    potts_statistic,
)
from vbseg.potts.multiscale import FINE_MIN_ITER, FINE_TOL_FACTOR, multiscale_restarts


class MeanFieldResult(NamedTuple):
    """Output of :func:`fit_hidden_potts_vb`.

    marginals: (X, Y, Z, K) q_v(k), zero outside the ROI.
    emission: Normal-Gamma posterior of the class parameters, each field (K, M).
    proportions: (K,) Dirichlet posterior concentration of the class proportions.
    elbo_trace: (max_iter,) ELBO after each iteration, NaN after the last one run.
    num_iterations: iterations run.
    converged: whether the ELBO change fell below the tolerance before max_iter.
    restart_elbos: (R,) final ELBO of every restart; the result is the restart with the
        largest (all restarts share beta, so their ELBOs are comparable). All run to
        convergence: the restart that finds a small lesion (upper-tail start) can trail for
        ~20 iterations before it overtakes (bench_potts 96^3 crop), so keeping only the best
        after a short probe picked the wrong restart.
    best_restart: index of the chosen restart.
    beta: the coupling at the end (the given one when fixed, else the learned one).
    beta_trace: (max_iter,) beta after each iteration of the learned-beta stage (NaN when
        beta is fixed or after the last iteration run).
    restart_means: (R, K, M) class means of every restart (first modality ascending within
        each, as k-means orders them), and restart_voxels (R, K) their expected class sizes:
        restarts that agree found the same solution; ones that differ show where the ELBO
        landscape has several modes.
    field_weight: the weight gamma of the external field at the end (learned with
        ``learn_field_weight``, else the given one).
    intensity: (X, Y, Z) the GP intensity field b on the first modality (standardised units)
        when the fit has one (``intensity``), else None.
    restart_iterations: (R,) iterations each restart ran on the fit's grid (each stops at its
        own convergence; 0 for a coarse-grid restart that repeated an earlier one's solution).
    coarse_iterations: (R,) iterations of each restart on the 2 x 2 x 2 coarse grid when the
        restarts ran there first (:mod:`vbseg.potts.multiscale`), else None.
    """

    marginals: jax.Array
    emission: NormalGammaPrior
    proportions: jax.Array
    elbo_trace: jax.Array
    num_iterations: jax.Array
    converged: jax.Array
    restart_elbos: jax.Array
    best_restart: jax.Array
    beta: jax.Array
    beta_trace: jax.Array
    restart_means: jax.Array
    restart_voxels: jax.Array
    field_weight: jax.Array | None = None
    intensity: jax.Array | None = None
    restart_iterations: jax.Array | None = None
    coarse_iterations: jax.Array | None = None


def pair_energy(marginals, beta, weights) -> jax.Array:
    """E_q[sum_{v~w} w_vw J[z_v, z_w]] under independent marginals, each pair once: beta E_q[S]
    for a scalar coupling, else half of sum_v q_v . (J sum_w w_vw q_w)."""
    if jnp.ndim(beta) == 0:
        return beta * potts_statistic(marginals, weights)
    return 0.5 * jnp.sum(marginals * coupling_field(neighbour_sum(marginals, weights), beta))


def label_elbo_terms(marginals, unary, beta, weights) -> jax.Array:
    """sum q * unary + E_q[pair energy] + H[q]: the label part of the ELBO (``beta`` a scalar
    coupling or a (K, K) interaction matrix, :func:`coupling_field`)."""
    energy = jnp.sum(marginals * unary) + pair_energy(marginals, beta, weights)
    entropy = -jnp.sum(xlogy(marginals, marginals))
    return energy + entropy


def dirichlet_update(marginals, concentration) -> jax.Array:
    """q(pi) = Dirichlet(alpha0 + sum_v q_v(k)): (K,)."""
    return concentration + jnp.sum(marginals, axis=(0, 1, 2))


def expected_log_proportions(alpha) -> jax.Array:
    """E[log pi_k] = digamma(alpha_k) - digamma(sum alpha) under Dirichlet(alpha)."""
    return digamma(alpha) - digamma(jnp.sum(alpha))


def kl_dirichlet(alpha, alpha0) -> jax.Array:
    """KL(Dirichlet(alpha) || Dirichlet(alpha0)), closed form."""
    return (
        gammaln(jnp.sum(alpha)) - jnp.sum(gammaln(alpha)) - gammaln(jnp.sum(alpha0))
        + jnp.sum(gammaln(alpha0))
        + jnp.sum((alpha - alpha0) * (digamma(alpha) - digamma(jnp.sum(alpha))))
    )


def checkerboard_sweep(marginals, unary, beta, weights, roi) -> jax.Array:
    """One coordinate-ascent sweep over q(z), one colour of :func:`colour_masks` at a time
    (``beta`` a scalar coupling or a (K, K) interaction matrix, :func:`coupling_field`)."""
    for colour in colour_masks(roi.shape, weights):
        logits = unary + coupling_field(neighbour_sum(marginals, weights), beta)
        update = class_softmax(logits)
        marginals = jnp.where((colour & roi)[..., None], update, marginals)
    return marginals


@partial(jax.jit, static_argnames=("num_sweeps",))
def meanfield_label_marginals(unary, beta, weights, roi, *, num_sweeps: int = 200) -> jax.Array:
    """Mean-field marginals of p(z) ∝ exp(sum_v unary_v(z_v) + beta S(z)) with a fixed unary.

    Args:
        unary: (X, Y, Z, K) log-potentials (e.g. log-likelihoods under fixed parameters).
    Returns:
        (X, Y, Z, K) marginals after ``num_sweeps`` checkerboard sweeps from softmax(unary).
    """
    start = jax.nn.softmax(unary, axis=-1) * roi[..., None]
    return jax.lax.fori_loop(
        0, num_sweeps, lambda _, q: checkerboard_sweep(q, unary, beta, weights, roi), start
    )


def coordinate_ascent(observations, observed, roi, beta, weights, emission, concentration, field, q0,
                      *, max_iter, tol, min_iter, beta_step=None, field_weight=1.0, coupling_step=None,
                      aux0=None):
    """Coordinate ascent from marginals q0: label sweep, conjugate parameter updates (the
    emission family's, :mod:`vbseg.potts.emission_updates`), then (with ``beta_step``, a function
    (q, prior unary, beta) -> beta) the beta update, or (with ``coupling_step``, a function
    (q, log proportions, field, beta, gamma) -> (beta, gamma)) the update of beta and of the
    external field's weight gamma; until the ELBO change per ROI voxel falls below ``tol``.
    The label prior's unary term is E[log pi] + gamma * field. Returns (q, post, alpha, trace,
    iterations, converged, beta, beta_trace, gamma). ``aux0``: the emission family's state to
    start from (default its ``initial_aux``; a later stage passes the GP intensity field on)."""
    num_classes = q0.shape[-1]
    dtype = observations.dtype
    alpha0 = jnp.broadcast_to(jnp.asarray(concentration, dtype), (num_classes,))

    def parameter_step(q, aux, gamma):
        post = emission.update(q, observations, observed, aux)
        alpha = dirichlet_update(q, alpha0)
        likelihood, aux = emission.unary(observations, observed, post)
        return post, alpha, likelihood + expected_log_proportions(alpha) + gamma * field, aux

    gamma = jnp.asarray(field_weight, dtype)
    aux0 = emission.initial_aux(q0) if aux0 is None else aux0
    post0, alpha_post0, unary0, aux0 = parameter_step(q0, aux0, gamma)
    num_voxels = jnp.maximum(jnp.sum(roi), 1)
    trace0 = jnp.full((max_iter,), jnp.nan, dtype)

    def cond(carry):
        *_, it, delta = carry
        return (it < max_iter) & ((it < min_iter) | (delta >= tol))

    def body(carry):
        q, post, alpha, unary, aux, beta, gamma, trace, beta_trace, it, _ = carry
        q = checkerboard_sweep(q, unary, beta, weights, roi)
        if coupling_step is not None:
            log_proportions = expected_log_proportions(dirichlet_update(q, alpha0))
            beta, gamma = coupling_step(q, log_proportions, field, beta, gamma)
        post, alpha, unary, aux = parameter_step(q, aux, gamma)
        if beta_step is not None:
            beta = beta_step(q, expected_log_proportions(alpha) + gamma * field, beta)
        value = (label_elbo_terms(q, unary, beta, weights) - emission.kl(post)
                 - kl_dirichlet(alpha, alpha0))
        previous = jnp.where(it > 0, trace[jnp.maximum(it - 1, 0)], -jnp.inf)
        delta = jnp.abs(value - previous) / num_voxels
        return (q, post, alpha, unary, aux, beta, gamma, trace.at[it].set(value),
                beta_trace.at[it].set(beta if beta.ndim == 0 else jnp.nan), it + 1, delta)

    beta = jnp.asarray(beta, dtype)
    init = (q0, post0, alpha_post0, unary0, aux0, beta, gamma, trace0, trace0, jnp.int32(0),
            jnp.asarray(jnp.inf, dtype))
    q, post, alpha, _, _, beta, gamma, trace, beta_trace, it, delta = jax.lax.while_loop(
        cond, body, init)
    return q, post, alpha, trace, it, delta < tol, beta, beta_trace, gamma


def _fit_one_start(observations, observed, roi, beta, weights, emission, concentration, field,
                   field_weight, levels, centres, *, num_classes, max_iter, tol, min_iter):
    labels0 = kmeans_labels(observations, observed, roi, levels, centres=centres)
    q0 = jax.nn.one_hot(labels0, num_classes, dtype=observations.dtype) * roi[..., None]
    return coordinate_ascent(observations, observed, roi, beta, weights, emission, concentration, field, q0,
                 max_iter=max_iter, tol=tol, min_iter=min_iter, field_weight=field_weight)[:6]


def beta_step_function(estimator: str, weights, roi, path=None, beta_max=None):
    """The beta update of variational EM given the current marginals q.

    "pl": the maximiser of the mean-field-like pseudo-likelihood (Celeux et al. 2003);
    "ti": the beta at which the prior's E[S | beta] (a simulated path ``path`` = (betas, mean),
    see :mod:`vbseg.potts.beta`) equals E_q[S], the exact maximiser of
    E_q[log p(z | beta)] = beta E_q[S] - log Z(beta).
    """
    beta_max = beta_estimation.BETA_MAX if beta_max is None else beta_max
    if estimator == "pl":
        def step(q, prior_unary, beta):
            return beta_estimation.estimate_beta_pl(q, prior_unary, weights, roi, beta_start=beta,
                                                    beta_max=beta_max, num_steps=8)
    elif estimator == "ti":
        betas, mean = path
        monotone = jax.lax.cummax(mean)

        def step(q, prior_unary, beta):
            return jnp.interp(potts_statistic(q, weights), monotone, betas).astype(q.dtype)
    else:
        raise ValueError(f"unknown beta estimator {estimator!r}")
    return step


@partial(jax.jit, static_argnames=("num_classes", "max_iter", "tied", "beta_estimator", "emission",
                                   "dof", "learn_field_weight", "intensity", "multiscale"))
def fit_hidden_potts_vb(
    observations: jax.Array,
    observed: jax.Array,
    roi: jax.Array,
    beta: jax.Array,
    weights: jax.Array,
    prior: NormalGammaPrior,
    concentration: float = DEFAULT_CONCENTRATION,
    external_field: jax.Array | None = None,
    beta_path=None,
    field_weight: float = 1.0,
    *,
    num_classes: int,
    intensity=None,
    learn_field_weight: bool = False,
    tied: bool = True,
    beta_estimator: str = "fixed",
    emission: str = "gaussian",
    dof: float = DEFAULT_STUDENT_DOF,
    max_iter: int = 300,
    tol: float = 1e-5,
    min_iter: int = 5,
    multiscale: bool = False,
) -> MeanFieldResult:
    """Fit the hidden Potts model by mean-field VB, with beta fixed or learned.

    The restarts (k-means starts, :func:`restart_levels`) all run at the given ``beta`` so
    their ELBOs are comparable (the ELBO omits log Z(beta), which grows with beta, so ELBOs at
    different betas cannot pick a restart). With ``beta_estimator`` "pl" or "ti" the best
    restart is then continued with a beta update after every parameter step (variational EM,
    :func:`beta_step_function`), starting from ``beta``; the result's ``beta`` is the last
    value and ``elbo_trace``/``beta_trace`` are those of this second stage.

    Args:
        observations: (X, Y, Z, M) standardised images (any finite values outside ``observed``).
        observed: (X, Y, Z, M) bool, where each modality is observed.
        roi: (X, Y, Z) bool, the voxels that carry labels.
        beta: Potts coupling; weights: (3,) or (13,) neighbour weights (6- or 26-neighbourhood).
        prior: Normal-Gamma hyperparameters, broadcastable to (K, M).
        concentration: Dirichlet concentration alpha0 of the class proportions.
        external_field: optional (X, Y, Z, K) prior log-potentials added to every voxel's
            unary term (see :mod:`vbseg.potts.model`) with weight ``field_weight``; the
            k-means start ignores it.
        learn_field_weight: (static) after the restarts (which use ``field_weight``), continue
            the best one with the weight gamma of the field learned jointly with beta (when
            ``beta_estimator`` is "pl"; else with beta fixed) by pseudo-likelihood
            (:func:`vbseg.potts.beta.estimate_coupling_pl`): a network's logits enter
            with a fitted temperature 1 / gamma.
        num_classes: K (static); max_iter: iteration cap (static).
        tied: one noise precision per modality shared by all classes (static). The default:
            at lesion edges the partial-volume and PSF-blurred voxels otherwise widen the
            tumour class and push its boundary outwards (on a 22 mm sphere, 4:1, 6 mm PSF the
            per-class fit overestimates the volume by ~80 %, the tied one by < 10 %).
        tol: convergence when |ELBO change| per ROI voxel < tol (nats), after min_iter.
        beta_estimator: "fixed" (static), "pl" (pseudo-likelihood) or "ti" (thermodynamic
            integration; needs ``beta_path`` = (betas, E[S | beta]) simulated for this ROI
            with :func:`vbseg.potts.beta.statistic_path`).
        emission: "gaussian" (independent per modality), "student" (Student-t scale mixture,
            ``dof`` degrees of freedom) or "full" (full covariance across modalities; every
            modality must be observed at every ROI voxel); see
            :mod:`vbseg.potts.emission_updates`. ``emission.mean`` of the result is (K, M) for
            all three.
        intensity: (static) an :class:`~vbseg.potts.intensity_field.IntensityFieldSpec`:
            a GP intensity field on the first modality of its classes, fitted with the labels
            (variational EM, :mod:`vbseg.potts.intensity_field`; Gaussian emission only).
        multiscale: (static) run the restarts on a 2 x 2 x 2 coarser grid first and continue
            one fine fit per distinct coarse solution (:mod:`vbseg.potts.multiscale`):
            faster on large grids (1.8-3.0x at 144^3-192^3 in bench_potts), but the modes it
            finds can differ from those of the full-grid restarts (bench_multiscale), so it is
            opt-in.
    """
    observed = observed & roi[..., None]
    shape = (num_classes, observations.shape[-1])
    prior = NormalGammaPrior(
        *(jnp.broadcast_to(jnp.asarray(p, observations.dtype), shape) for p in prior)
    )
    field = (jnp.zeros(observations.shape[:3] + (num_classes,), observations.dtype)
             if external_field is None else jnp.asarray(external_field, observations.dtype))
    field = field * roi[..., None]
    if intensity is None:
        family = emission_vb(emission, prior, num_classes=num_classes,
                             num_modalities=observations.shape[-1], tied=tied, dof=dof)
    elif emission == "gaussian":
        family = field_emission(prior, intensity, observations.shape[:3], num_classes=num_classes,
                                num_modalities=observations.shape[-1], tied=tied)
    else:
        raise ValueError(f"the intensity field goes with the gaussian emission, not {emission!r}")
    fit = partial(_fit_one_start, num_classes=num_classes, max_iter=max_iter, tol=tol,
                  min_iter=min_iter)
    levels = restart_levels(num_classes)
    coarse_iterations = None
    if multiscale:
        if intensity is not None:
            raise ValueError("coarse-grid restarts do not go with a GP intensity field")

        def fit_start(obs, seen, inside, prior_field, level, centre):
            return fit(obs, seen, inside, beta, weights, family, concentration, prior_field,
                       field_weight, level, centre)

        def fit_from(q_start):
            # a start repeated from the coarse grid sits near the optimum, where the ELBO
            # creeps up while the boundary voxels relax: a tighter test than the k-means
            # starts need (see multiscale.FINE_TOL_FACTOR)
            return coordinate_ascent(observations, observed, roi, beta, weights, family, concentration, field,
                         q_start, max_iter=max_iter, tol=tol * FINE_TOL_FACTOR,
                         min_iter=jnp.maximum(min_iter, FINE_MIN_ITER), field_weight=field_weight)[:6]

        (q, post, alpha, trace, it, converged), coarse_iterations, restart_iterations = (
            multiscale_restarts(fit_start, fit_from, observations, observed, roi, field, levels))
    else:
        # one restart after another (lax.map), not vmapped: each stops at its own convergence,
        # and XLA's CPU code for the class-major sums is several times slower with a batch axis
        q, post, alpha, trace, it, converged = jax.lax.map(
            lambda start: fit(observations, observed, roi, beta, weights, family, concentration,
                              field, field_weight, *start),
            (levels, start_centres(observations, observed, roi, levels)))
        restart_iterations = it
    finals = jnp.take_along_axis(trace, (it - 1)[:, None], axis=1)[:, 0]
    restart_means = family.classes(post).mean
    restart_voxels = jnp.sum(q, axis=(1, 2, 3))
    best = jnp.argmax(finals)
    pick = lambda x: x[best]  # noqa: E731
    q, post, alpha, trace, it, converged = (
        pick(q), jax.tree_util.tree_map(pick, post), pick(alpha), pick(trace), pick(it),
        pick(converged))
    beta = jnp.asarray(beta, observations.dtype)
    gamma = jnp.asarray(field_weight, observations.dtype)
    beta_trace = jnp.full_like(trace, jnp.nan)
    # the later stage continues from the best restart's intensity field, not from zero
    aux0 = post.eps if intensity is not None else None
    if learn_field_weight:
        if beta_estimator not in ("fixed", "pl"):
            raise ValueError("learn_field_weight goes with beta_estimator 'fixed' or 'pl'")
        def coupling(q_now, log_proportions, field_now, beta_now, gamma_now):
            return estimate_coupling_pl(q_now, log_proportions, field_now, weights, roi,
                                        beta_start=beta_now, weight_start=gamma_now,
                                        learn_beta=beta_estimator == "pl", num_steps=8)

        q, post, alpha, trace, it, converged, beta, beta_trace, gamma = coordinate_ascent(
            observations, observed, roi, beta, weights, family, concentration, field, q,
            max_iter=max_iter, tol=tol, min_iter=min_iter, field_weight=gamma,
            coupling_step=coupling, aux0=aux0)
    elif beta_estimator != "fixed":
        step = beta_step_function(beta_estimator, weights, roi, beta_path)
        q, post, alpha, trace, it, converged, beta, beta_trace, gamma = coordinate_ascent(
            observations, observed, roi, beta, weights, family, concentration, field, q,
            max_iter=max_iter, tol=tol, min_iter=min_iter, beta_step=step, field_weight=gamma, aux0=aux0)
    intensity_map = None
    if intensity is not None:
        intensity_map = field_on_grid(intensity, observations.shape[:3], post.eps) * roi
    return MeanFieldResult(q, family.classes(post), alpha, trace, it, converged, finals, best, beta,
                           beta_trace, restart_means, restart_voxels, gamma, intensity_map,
                           restart_iterations, coarse_iterations)
