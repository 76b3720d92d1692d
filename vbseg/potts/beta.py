"""Estimating the Potts coupling beta (and an external field's weight): pseudo-likelihood and
thermodynamic integration.

beta gets a uniform prior on [0, beta_max]; both estimators below give its mode given a label
field z (or, inside a variational fit, given the mean-field marginals q in place of z).

**Pseudo-likelihood** (Besag 1975, "Statistical analysis of non-lattice data", The
Statistician 24:179). The intractable p(z | beta) is replaced by the product of the full
conditionals,

    log PL(beta) = sum_v [ beta n_v(z_v) + e_v(z_v) - log sum_k exp(beta n_v(k) + e_v(k)) ],
    n_v(k) = sum_w w_vw 1[z_w = k],

where e_v(k) is the rest of the prior's unary term (log class proportions, external field).
log PL is concave in beta (a linear term minus a log-sum-exp of terms linear in beta), with

    d/dbeta  = sum_v [ n_v(z_v) - E_{p_v}[n_v] ],      d2/dbeta2 = - sum_v Var_{p_v}[n_v],

p_v = softmax(beta n_v + e_v), so a safeguarded Newton iteration finds its maximiser. With
marginals q in place of one-hot labels (n_v(k) = sum_w w_vw q_w(k), the first term weighted by
q_v) this is the mean-field-like pseudo-likelihood of Celeux, Forbes & Peyrard (2003, Pattern
Recognition 36:131), the beta step of variational EM. PL is consistent but known to be biased
upwards at strong coupling on finite grids; the study in ``benchmarks/bench_beta.py`` measures
by how much.

**Thermodynamic integration** (Gelman & Meng 1998, Statistical Science 13:163; for Potts
models as in Green & Richardson 2002 and Moores et al.'s bayesImageS). The log partition
function obeys d log Z(beta) / d beta = E[S(z) | beta], so a path of E[S | beta] estimated by
Gibbs simulation from the prior on a grid of beta values gives

    log Z(beta) - log Z(0) = integral_0^beta E[S | b] db     (trapezoid rule on the grid),

and with it the exact log posterior of beta given labels, beta S(z) - log Z(beta) + const.
Its mode solves E[S | beta] = S(z) (the path increases with beta: its slope is Var[S | beta]),
and the posterior mean and sd are computed on a fine grid. Inside a variational fit the
labels are replaced by q and S(z) by E_q[S], the exact beta step of variational EM. The path
depends on the region of interest (its size and shape) and on the rest of the prior, so it is
simulated for the region at hand; its cost is what the study reports.

**Class-interaction matrix.** The Potts prior's single beta becomes a symmetric K x K matrix J
(energy sum_{v~w} w_vw J[z_v, z_w], the generalised Potts or "MRF with class interactions"
prior; J = beta I is the Potts model), estimated by the same pseudo-likelihood, jointly over
several label fields (:func:`estimate_interaction_pl`), from their collapsed neighbour
configurations (:func:`label_configurations`). Only part of J is identified next to free
class biases; :func:`interaction_contrasts` are the identified combinations.

**External field weight.** With a prior log-odds map f (an atlas, a network's logits) in the
unary term as gamma * f_v(k), the same pseudo-likelihood is concave in (beta, gamma) jointly
(:func:`estimate_coupling_pl`); gamma is the map's learned inverse temperature.

Shapes: labels and marginals (X, Y, Z, K), zero outside the ROI; prior unary (X, Y, Z, K) or
(K,); roi (X, Y, Z) bool.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize

from vbseg.inference.chains import (
    burn_in_then_kept_keys,
    chain_diagnostics,
    one_hot_labels,
    run_chains,
    split_each,
)
from vbseg.potts.model import class_softmax, neighbour_sum, potts_statistic
from vbseg.potts.prior_sampler import potts_prior_kernel

# Upper end of beta's uniform prior, in units where the nearest neighbours weigh 1. Far above
# the critical coupling of the 6-neighbourhood (about 0.44 for K = 2, 0.55 for K = 3).
BETA_MAX = 3.0
# Upper end of the external field's weight gamma (uniform prior on [0, FIELD_WEIGHT_MAX]).
FIELD_WEIGHT_MAX = 5.0
# --beta auto: where the learned-beta fit starts. Below the critical coupling of the
# 6-neighbourhood Potts model (~0.44 for K = 2), so the restarts cannot lock onto a one-class
# ordered state that the beta step would then confirm (see tests/potts/test_beta.py).
AUTO_BETA_START = 0.1
BETA_LEARNED_TEXT = (
    f"beta learned (uniform prior on [0, {BETA_MAX:g}]; variational EM from beta = "
    f"{AUTO_BETA_START:g}, restarts at that value, then a mean-field pseudo-likelihood step "
    "after each parameter update, Celeux, Forbes & Peyrard 2003)"
)


def pseudo_log_likelihood(beta, labels, prior_unary, weights, roi) -> jax.Array:
    """log PL(beta) of one-hot labels, or its mean-field form for marginals (module doc)."""
    counts = neighbour_sum(labels, weights)
    logits = beta * counts + prior_unary
    per_voxel = (jnp.sum(labels * logits, axis=-1)
                 - jax.scipy.special.logsumexp(logits, axis=-1))
    return jnp.sum(jnp.where(roi, per_voxel, 0.0))


def _pl_derivatives(beta, labels, counts, prior_unary, roi):
    probs = class_softmax(beta * counts + prior_unary)
    expected = jnp.sum(probs * counts, axis=-1)
    observed = jnp.sum(labels * counts, axis=-1)
    variance = jnp.sum(probs * counts**2, axis=-1) - expected**2
    gradient = jnp.sum(jnp.where(roi, observed - expected, 0.0))
    curvature = -jnp.sum(jnp.where(roi, variance, 0.0))
    return gradient, curvature


def estimate_beta_pl(labels, prior_unary, weights, roi, *, beta_start=0.5, beta_max=BETA_MAX,
                     num_steps: int = 25) -> jax.Array:
    """Maximiser of log PL(beta) over [0, beta_max]: projected Newton steps.

    The neighbour counts do not depend on beta, so each step costs one softmax. Concavity
    makes the projected Newton iteration converge to the constrained maximiser; a step is
    capped at 1 so a near-flat start (all voxels of one class) cannot overshoot far.
    """
    counts = neighbour_sum(labels, weights)

    def step(_, beta):
        gradient, curvature = _pl_derivatives(beta, labels, counts, prior_unary, roi)
        move = jnp.clip(-gradient / jnp.minimum(curvature, -1e-6), -1.0, 1.0)
        return jnp.clip(beta + move, 0.0, beta_max)

    start = jnp.asarray(beta_start, labels.dtype)
    return jax.lax.fori_loop(0, num_steps, step, start)


def estimate_coupling_pl(labels, base_unary, field, weights, roi, *, beta_start, weight_start,
                         learn_beta: bool, beta_max=BETA_MAX, weight_max=None,
                         num_steps: int = 25) -> tuple[jax.Array, jax.Array]:
    """Joint pseudo-likelihood maximiser of (beta, gamma) for the prior with an external field
    scaled by a weight gamma (the inverse temperature of a network's logits):

        log PL(beta, gamma) = sum_v [ theta . t_v(z_v) - log sum_k exp(theta . t_v(k) + a_v(k)) ]
                              + sum_v a_v(z_v),
        theta = (beta, gamma),  t_v(k) = (n_v(k), f_v(k)),

    with a_v the rest of the unary term (log proportions) and f_v(k) the external field. It is
    concave in theta (a log-sum-exp of functions linear in theta, subtracted from a linear
    term): gradient sum_v [t_v(z_v) - E_{p_v}[t_v]] and Hessian -sum_v Cov_{p_v}[t_v], so
    projected Newton steps on the box [0, beta_max] x [0, weight_max] find the maximiser.
    A field that carries no information about the labels (pure noise) gets gamma near 0; an
    over-confident field (logits too large for its accuracy) gets gamma < 1, which is how the
    data keep the last word (issue 9's "fitted temperature"). With ``learn_beta`` False beta
    stays at ``beta_start`` and only gamma moves (one-dimensional Newton).
    """
    weight_max = FIELD_WEIGHT_MAX if weight_max is None else weight_max
    counts = neighbour_sum(labels, weights)
    features = jnp.stack([counts, jnp.broadcast_to(field, counts.shape)], axis=-1)  # (..., K, 2)
    upper = jnp.asarray([beta_max, weight_max], labels.dtype)
    mask = roi[..., None]

    def step(_, theta):
        probs = class_softmax(jnp.einsum("...kt,t->...k", features, theta) + base_unary)
        expected = jnp.einsum("...k,...kt->...t", probs, features)
        observed = jnp.einsum("...k,...kt->...t", labels, features)
        second = jnp.einsum("...k,...kt,...ku->...tu", probs, features, features)
        covariance = second - expected[..., :, None] * expected[..., None, :]
        gradient = jnp.sum(jnp.where(mask, observed - expected, 0.0), axis=(0, 1, 2))
        hessian = -jnp.sum(jnp.where(mask[..., None], covariance, 0.0), axis=(0, 1, 2))
        if not learn_beta:  # Newton in gamma alone
            move_gamma = -gradient[1] / jnp.minimum(hessian[1, 1], -1e-6)
            move = jnp.stack([jnp.zeros_like(move_gamma), move_gamma])
        else:
            regularised = hessian - 1e-6 * jnp.eye(2, dtype=hessian.dtype)
            move = -jnp.linalg.solve(regularised, gradient)
        return jnp.clip(theta + jnp.clip(move, -1.0, 1.0), 0.0, upper)

    start = jnp.stack([jnp.asarray(beta_start, labels.dtype), jnp.asarray(weight_start, labels.dtype)])
    theta = jax.lax.fori_loop(0, num_steps, step, start)
    return theta[0], theta[1]


class LabelConfigurations(NamedTuple):
    """The sufficient statistics of a label field for the pseudo-likelihood of a class-interaction
    matrix: the distinct (label, neighbour sums) configurations of its ROI voxels and how often
    each occurs. labels (C,) int; neighbours (C, K) float64, n_v(k) = sum_w w_vw 1[z_w = k];
    counts (C,) int."""

    labels: np.ndarray
    neighbours: np.ndarray
    counts: np.ndarray


def label_configurations(labels, roi, weights, num_classes: int) -> LabelConfigurations:
    """Collapse a label field (X, Y, Z) int on ``roi`` (X, Y, Z) bool into
    :class:`LabelConfigurations` (voxels outside the ROI are nobody's neighbours). A voxel's
    pseudo-likelihood term depends only on its label and its neighbour sums, and a segmented
    image holds few distinct ones (thousands, against millions of voxels), so the estimator
    below costs nothing per voxel."""
    roi = np.asarray(roi, bool)
    onehot = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.float32) * jnp.asarray(roi)[..., None]
    neighbours = np.asarray(neighbour_sum(onehot, jnp.asarray(weights, jnp.float32)))[roi]
    rows = np.concatenate([np.asarray(labels)[roi][:, None].astype(np.float32), neighbours], axis=1)
    unique, counts = np.unique(rows, axis=0, return_counts=True)
    return LabelConfigurations(unique[:, 0].astype(np.int64), unique[:, 1:].astype(np.float64), counts)


def _symmetric(theta, num_classes):
    upper = np.zeros((num_classes, num_classes))
    upper[np.triu_indices(num_classes)] = theta
    return upper + np.triu(upper, 1).T


def interaction_contrasts(interaction) -> np.ndarray:
    """C[k, l] = 2 J[k, l] - J[k, k] - J[l, l] (K, K): the log-odds, per unit neighbour weight,
    of a k-l neighbour pair against the pairs k-k and l-l. Unchanged by J[k, l] -> J[k, l] +
    a_k + a_l (which trades against class biases; see :func:`estimate_interaction_pl`), so
    these are what the data pin down; a Potts prior J = beta I has C = -2 beta off the diagonal."""
    interaction = np.asarray(interaction, np.float64)
    diagonal = np.diag(interaction)
    return 2 * interaction - diagonal[:, None] - diagonal[None, :]


def equal_row_sum_gauge(interaction) -> np.ndarray:
    """J - (a 1' + 1 a') with a = (r - mean(r)) / K, r the row sums: the same contrasts
    (:func:`interaction_contrasts`) and every row summing to mean(r). Next to free class biases
    the a-part is not identified by the pseudo-likelihood (it only moves class preference
    between J and the biases, see :func:`estimate_interaction_pl`); this gauge leaves all of
    it to the biases. J = beta I is already in it."""
    interaction = np.asarray(interaction, np.float64)
    rows = interaction.sum(axis=1)
    shift = (rows - rows.mean()) / interaction.shape[0]
    return interaction - shift[:, None] - shift[None, :]


def interaction_objective(theta, fields, num_classes, biases, ridge):
    """-log PL / voxels (plus the ridge) of :func:`estimate_interaction_pl` and its exact
    gradient, at theta = (upper triangle of J row by row, then the biases (P, K) flattened
    unless ``biases`` (P, K) fixes them)."""
    num_fields = len(fields)
    num_pairs = num_classes * (num_classes + 1) // 2
    total = float(sum(f.counts.sum() for f in fields))
    scale = ridge * total
    interaction = _symmetric(theta[:num_pairs], num_classes)
    free = biases is None
    h = theta[num_pairs:].reshape(num_fields, num_classes) if free else biases
    value = 0.5 * scale * (np.sum(interaction**2) + (np.sum(h**2) if free else 0.0))
    grad_j = scale * interaction
    grad_h = scale * h
    for p, field in enumerate(fields):
        logits = field.neighbours @ interaction + h[p]
        top = logits.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        probs = np.exp(logits - log_norm[:, None])
        rows = np.arange(len(field.labels))
        value -= float(field.counts @ (logits[rows, field.labels] - log_norm))
        residual = -probs
        residual[rows, field.labels] += 1.0
        residual *= field.counts[:, None]
        grad_j -= field.neighbours.T @ residual  # d/dJ[l, k] of the full (unsymmetrised) J
        grad_h[p] -= residual.sum(axis=0)
    folded = grad_j + grad_j.T - np.diag(np.diag(grad_j))
    gradient = folded[np.triu_indices(num_classes)]
    if free:
        gradient = np.concatenate([gradient, grad_h.ravel()])
    return value / total, gradient / total


def estimate_interaction_pl(fields: list[LabelConfigurations], num_classes: int, *, biases=None,
                            ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-likelihood estimate of a symmetric class-interaction matrix J (K, K) shared by
    several label fields (e.g. the training cases of a population prior), field p with class
    biases h_p (K,):

        log PL(J, h) = sum_p sum_{v in p} [ l_v(z_v) - log sum_k exp l_v(k) ],
        l_v(k) = h_p(k) + sum_l J[k, l] n_v(l),        n_v(l) = sum_w w_vw 1[z_w = l],

    the Besag pseudo-likelihood of the prior exp(sum_v h_p(z_v) + sum_{v~w} w_vw J[z_v, z_w])
    (J = beta I gives the Potts model and :func:`estimate_beta_pl`). It is concave (a linear
    term minus log-sum-exps of linear functions).

    Identification: the neighbour sums of a voxel add up to its total neighbour weight T_v,
    the same for every k, so J + c (a constant) changes nothing, and J[k, l] + a_k + a_l changes
    l_v(k) by a_k T_v, which a free h_p absorbs wherever T_v is the full weight (away from the
    ROI border): with free biases that part of J is set by the border and the ridge, not by the
    data. ``biases`` given (a (K,) array per field, known class fields), h is fixed and J is
    identified up to the constant; None: h_p are estimated too, and only the contrasts of
    :func:`interaction_contrasts` are meaningful (:func:`equal_row_sum_gauge` picks one J).
    A ridge penalty ``ridge`` x voxels x ||J||^2 / 2 (the same on free biases)
    picks one maximiser along the constant. L-BFGS on the collapsed configurations
    (:func:`label_configurations`) with the exact gradient; ValueError when it does not
    converge. Returns (J (K, K), h (P, K)).
    """
    num_fields = len(fields)
    num_pairs = num_classes * (num_classes + 1) // 2
    fixed = None if biases is None else np.asarray(biases, np.float64).reshape(num_fields, num_classes)

    def objective(theta):
        return interaction_objective(theta, fields, num_classes, fixed, ridge)

    size = num_pairs + (num_fields * num_classes if fixed is None else 0)
    result = minimize(objective, np.zeros(size), jac=True, method="L-BFGS-B",
                      options={"maxiter": 2000, "gtol": 1e-9, "ftol": 1e-14})
    if not result.success and np.max(np.abs(result.jac)) > 1e-6:
        raise ValueError(f"interaction pseudo-likelihood did not converge ({result.message})")
    interaction = _symmetric(result.x[:num_pairs], num_classes)
    h = result.x[num_pairs:].reshape(num_fields, num_classes) if fixed is None else fixed
    return interaction, h


class StatisticPath(NamedTuple):
    """E[S | beta] on a grid of beta values, from Gibbs simulation of the prior.

    betas (B,) increasing from 0; mean (B,) the estimate of E[S | beta]; standard_error (B,)
    its Monte Carlo error (from the effective sample size); r_hat (B,) split R-hat of S across
    chains; ess (B,); draws (B, C, S) the recorded statistics.
    """

    betas: np.ndarray
    mean: np.ndarray
    standard_error: np.ndarray
    r_hat: np.ndarray
    ess: np.ndarray
    draws: np.ndarray


def _start_labels(key, roi, num_classes, chain):
    """Chains alternate a uniform random start and a constant start (class chain // 2 mod K),
    so a coupling where the sampler cannot leave an ordered or a disordered state shows up
    as a large R-hat."""
    random = jax.random.randint(key, roi.shape, 0, num_classes)
    constant = jnp.full(roi.shape, (chain // 2) % num_classes, random.dtype)
    return jnp.where(chain % 2 == 0, random, constant)


@partial(jax.jit, static_argnames=("num_classes", "num_chains", "num_sweeps", "burn_in",
                                   "sample_proportions", "sampler"))
def _simulate_statistic(key, betas, roi, weights, prior_unary, concentration, *, num_classes,
                        num_chains, num_sweeps, burn_in, sample_proportions, sampler="gibbs"):
    def summarise(state, info):
        return (), potts_statistic(one_hot_labels(state.labels, num_classes, roi,
                                                  prior_unary.dtype), weights)

    def at_beta(beta, beta_key):
        kernel = potts_prior_kernel(beta, roi, weights, prior_unary, concentration,
                                    num_classes=num_classes,
                                    sample_proportions=sample_proportions, sampler=sampler)
        chain_keys = split_each(jax.random.split(beta_key, num_chains), 3)
        starts = jax.vmap(lambda start_key, chain: kernel.init(
            _start_labels(start_key, roi, num_classes, chain)))(chain_keys[:, 0],
                                                                 jnp.arange(num_chains))
        sweep_keys = jax.vmap(burn_in_then_kept_keys, in_axes=(0, 0, None, None))(
            chain_keys[:, 1], chain_keys[:, 2], burn_in, num_sweeps)
        return run_chains(kernel.step, starts, sweep_keys, summarise, burn_in=burn_in).records

    return jax.lax.map(lambda args: at_beta(*args),
                       (betas, jax.random.split(key, betas.shape[0])))


def statistic_path(key, betas, roi, weights, *, num_classes, prior_unary=None,
                   sample_proportions=False, concentration=1.0, num_chains=4, num_sweeps=400,
                   burn_in=200, sampler="gibbs") -> StatisticPath:
    """Simulate E[S | beta] for each beta of ``betas`` (which must start at 0).

    Under the prior p(z | beta) ∝ exp(sum_v e_v(z_v) + beta S(z)) on the ROI, with e the fixed
    ``prior_unary`` (default 0: uniform proportions); with ``sample_proportions`` the class
    proportions pi ~ Dirichlet(concentration) are part of the prior and drawn too (the model of
    :mod:`vbseg.potts.model` with learned proportions), so the path is d log Z(beta) / d beta
    of that model. Checkerboard Gibbs (:func:`~vbseg.potts.gibbs.sample_labels`), chains
    vectorised, betas in sequence.

    ``sampler="sw"`` draws the labels by Swendsen-Wang sweeps instead
    (:func:`~vbseg.potts.swendsen_wang.swendsen_wang_sweep`, cluster labels from the summed
    unary, exact for the field and the sampled proportions alike): far better mixing near and
    above the critical coupling, where Gibbs chains from ordered and disordered starts do not
    meet (see ``r_hat``), at 1.3-2x the time of a Gibbs sweep.
    """
    if sampler not in ("gibbs", "sw"):
        raise ValueError(f"sampler must be 'gibbs' or 'sw', got {sampler!r}")
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or betas[0] != 0.0 or np.any(np.diff(betas) <= 0):
        raise ValueError("betas must increase strictly from 0")
    roi = jnp.asarray(roi, bool)
    if prior_unary is None:
        prior_unary = jnp.zeros(roi.shape + (num_classes,), jnp.float32)
    draws = np.asarray(_simulate_statistic(
        key, jnp.asarray(betas, jnp.float32), roi, jnp.asarray(weights, jnp.float32),
        jnp.asarray(prior_unary, jnp.float32), jnp.float32(concentration),
        num_classes=num_classes, num_chains=num_chains, num_sweeps=num_sweeps, burn_in=burn_in,
        sample_proportions=sample_proportions, sampler=sampler), np.float64)
    diagnostics = [chain_diagnostics(d) for d in draws]
    # a statistic that never moved has zero spread: its mean is exact for these draws
    ess = np.array([d["ess"] if d["ess"] is not None else d["chains"] * d["draws_per_chain"]
                    for d in diagnostics], np.float64)
    standard_error = draws.reshape(len(betas), -1).std(axis=1) / np.sqrt(np.maximum(ess, 1.0))
    return StatisticPath(betas, draws.mean(axis=(1, 2)), standard_error,
                         np.array([np.nan if d["r_hat"] is None else d["r_hat"]
                                   for d in diagnostics]), ess, draws)


def log_partition_ratio(betas, path_mean) -> np.ndarray:
    """log Z(beta_i) - log Z(0) for each grid point: cumulative trapezoid of E[S | beta]."""
    betas, path_mean = np.asarray(betas, np.float64), np.asarray(path_mean, np.float64)
    steps = np.diff(betas) * 0.5 * (path_mean[1:] + path_mean[:-1])
    return np.concatenate([[0.0], np.cumsum(steps)])


def _fine_log_partition(betas, path_mean, num_points=2001):
    # E[S | beta] linear between grid points -> log Z piecewise quadratic: integrate exactly
    fine = np.linspace(betas[0], betas[-1], num_points)
    mean = np.interp(fine, betas, path_mean)
    return fine, log_partition_ratio(fine, mean)


def estimate_beta_ti(statistic, betas, path_mean) -> float:
    """Mode of p(beta | z) ∝ exp(beta S(z) - log Z(beta)) on the path's range: the beta where
    E[S | beta] = S(z) (the path made non-decreasing first; ends clip)."""
    monotone = np.maximum.accumulate(np.asarray(path_mean, np.float64))
    return float(np.interp(float(statistic), monotone, np.asarray(betas, np.float64)))


def beta_posterior_ti(statistic, betas, path_mean) -> tuple[float, float]:
    """Posterior mean and sd of beta given S(z) under the uniform prior on the path's range."""
    fine, log_z = _fine_log_partition(np.asarray(betas, np.float64), np.asarray(path_mean))
    log_post = fine * float(statistic) - log_z
    weights = np.exp(log_post - log_post.max())
    weights /= weights.sum()
    mean = float(np.sum(weights * fine))
    return mean, float(np.sqrt(np.sum(weights * (fine - mean) ** 2)))
