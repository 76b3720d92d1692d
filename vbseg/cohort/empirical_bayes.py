"""Fitting the population level of :mod:`vbseg.cohort.model` by empirical Bayes, and the
per-scan variational fit under the learned prior.

**Per training case** (:func:`fit_case_classes`): the hidden Potts model of
:mod:`vbseg.potts.model` with K = T + B classes and per-class precisions is fitted by
mean-field VB (:func:`constrained_potts_fit`, the CAVI of :mod:`vbseg.potts.meanfield`) with the manual
delineation as a hard constraint: an external field of -``FORBIDDEN`` on the background
classes inside the manual mask and on the tumour classes outside it, so the T tumour classes
split the delineated mass (e.g. hot viable rim / cold necrotic core) and the B background
classes its surroundings (air / fat / soft tissue / bone). beta is learned in the same fit
(variational EM with the mean-field pseudo-likelihood step, Celeux, Forbes & Peyrard 2003;
:mod:`vbseg.potts.beta`). Class identity across cases: tumour classes ordered by
decreasing mean of the ordering modality (PET when present: tumour 0 is the hottest),
background classes by increasing mean of CT when present (else the first modality).

**Pooling** (:func:`pool_population`; the method-of-moments empirical Bayes of the normal
hierarchical model, Efron & Morris 1975, JASA 70:311; Casella 1985, Am Stat 39:83; with the
sampling-variance correction of DerSimonian & Laird 1986). With x_pk the fitted class mean
of case p, s2_pk its within-case variance and n_pk its voxel count, over the n_k cases where
the class holds at least ``MIN_CLASS_VOXELS`` voxels:

    mu_k        = mean_p x_pk
    spread_var  = (1 + 1/n_k) max( var_p(x_pk) - mean_p(s2_pk / n_pk),  SPREAD_FLOOR_SD^2 )
                  (the predictive variance of a new patient's class mean: between-patient
                  variance plus the uncertainty of mu_k; var with n_k - 1 in the denominator)
    noise_var   = sum_p n_pk s2_pk / sum_p n_pk            (pooled within-patient variance)
    proportions = mean_p (voxels of class k / voxels)      beta = median_p beta_p.

With fewer than two cases the between-patient variance is not identified and spread_var is
``WEAK_SPREAD_SD``^2, which makes the prior on class means nearly flat (kappa0 small), so the
per-scan fit is close to the unsupervised one.

**Per-scan fit** (:func:`fit_with_population_prior`): CAVI of
:mod:`vbseg.potts.meanfield` (label sweeps, conjugate Normal-Gamma updates per class,
Dirichlet proportions) with beta fixed at the population value and the per-class priors of
:meth:`vbseg.cohort.model.PopulationPrior.normal_gamma_prior`. It starts from the
label update at the prior: q_v(k) ∝ pi_k exp(E_prior[log N(y_v | mu_k, 1/tau_k)]), so class k keeps its
population identity (no k-means restarts, no label switching).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vbseg.potts.beta import (
    LabelConfigurations,
    equal_row_sum_gauge,
    estimate_interaction_pl,
    label_configurations,
)
from vbseg.potts.emission_updates import emission_vb, expected_log_likelihood
from vbseg.potts.meanfield import beta_step_function, coordinate_ascent, kmeans_labels, restart_levels
from vbseg.potts.model import NormalGammaPrior

# Log-potential that forbids a class at a voxel in the constrained training fit.
FORBIDDEN = 1.0e3
# Where the constrained training fit starts beta (below the critical coupling; cf.
# vbseg.options.AUTO_BETA_START).
TRAINING_BETA_START = 0.1
MIN_CLASS_VOXELS = 10
SPREAD_FLOOR_SD = 0.05
WEAK_SPREAD_SD = 10.0
# Smallest within-class sd (feature units): air is constant at the PET floor and would
# otherwise get an unbounded precision.
NOISE_FLOOR_SD = 0.05


class CaseClassStats(NamedTuple):
    """One training case's constrained fit, classes in population order.

    means, variances, counts: (K, M); proportions: (K,); beta: learned coupling;
    configurations: the most probable labels' neighbour configurations
    (:func:`vbseg.potts.beta.label_configurations`, labels in population order), for the
    class-interaction matrix.
    """

    means: np.ndarray
    variances: np.ndarray
    counts: np.ndarray
    proportions: np.ndarray
    beta: float
    configurations: LabelConfigurations | None = None


def class_order(means: np.ndarray, num_tumour: int, tumour_key: int, background_key: int) -> np.ndarray:
    """Permutation putting tumour classes by decreasing ``means[:, tumour_key]`` first, then
    background classes by increasing ``means[:, background_key]``."""
    tumour = np.argsort(-means[:num_tumour, tumour_key], kind="stable")
    background = num_tumour + np.argsort(means[num_tumour:, background_key], kind="stable")
    return np.concatenate([tumour, background])


@partial(jax.jit, static_argnames=("num_tumour", "num_background", "max_iter"))
def constrained_potts_fit(observations, observed, roi, tumour, weights, *, num_tumour: int,
                          num_background: int, max_iter: int = 150, tol: float = 1e-4):
    """Mean-field VB of the hidden Potts model with the labels constrained by a manual mask.

    Tumour voxels may take only classes 0..T-1, the others only T..K-1 (external field of
    -FORBIDDEN); per-class Normal-Gamma emissions (weak default
    prior), Dirichlet proportions, beta learned by the pseudo-likelihood step of variational EM
    from TRAINING_BETA_START. One start: k-means within the mask and within its complement
    (:func:`vbseg.potts.meanfield.kmeans_labels`). Returns (marginals (X, Y, Z, K), beta,
    iterations).
    """
    num_classes = num_tumour + num_background
    observed = observed & roi[..., None]
    inside, outside = roi & tumour, roi & ~tumour
    tumour_labels = kmeans_labels(observations, observed, inside, restart_levels(num_tumour)[0]
                                  if num_tumour > 1 else jnp.array([0.5]))
    background_labels = kmeans_labels(observations, observed, outside,
                                      restart_levels(num_background)[0] if num_background > 1
                                      else jnp.array([0.5]))
    labels = jnp.where(tumour, tumour_labels, num_tumour + background_labels)
    q0 = jax.nn.one_hot(labels, num_classes, dtype=observations.dtype) * roi[..., None]
    is_tumour_class = jnp.arange(num_classes) < num_tumour
    allowed = jnp.where(tumour[..., None], is_tumour_class, ~is_tumour_class)
    field = jnp.where(allowed, 0.0, -FORBIDDEN).astype(observations.dtype) * roi[..., None]
    prior = NormalGammaPrior(*(jnp.full((num_classes, observations.shape[-1]), p, observations.dtype)
                               for p in NormalGammaPrior()))
    family = emission_vb("gaussian", prior, num_classes=num_classes,
                         num_modalities=observations.shape[-1], tied=False)
    step = beta_step_function("pl", weights, roi)
    q, _, _, _, iterations, _, beta, _, _ = coordinate_ascent(
        observations, observed, roi, jnp.asarray(TRAINING_BETA_START, observations.dtype), weights,
        family, jnp.asarray(1.0, observations.dtype), field, q0, max_iter=max_iter, tol=tol,
        min_iter=5, beta_step=step)
    return q, beta, iterations


def fit_case_classes(features, observed, roi, tumour, weights, *, num_tumour: int,
                     num_background: int, tumour_key: int, background_key: int) -> CaseClassStats:
    """The constrained hidden Potts fit of one delineated case (module doc), summarised.

    Args:
        features: (X, Y, Z, M) feature-space images; observed (X, Y, Z, M) bool; roi (X, Y, Z)
            bool; tumour (X, Y, Z) bool manual mask; weights: Potts neighbour weights.
    Class statistics are the q-weighted mean and variance of each class's voxels.
    """
    q, beta, _ = constrained_potts_fit(jnp.asarray(features), jnp.asarray(observed),
                                       jnp.asarray(roi), jnp.asarray(tumour), jnp.asarray(weights),
                                       num_tumour=num_tumour, num_background=num_background)
    q = np.asarray(q, np.float64)
    x = np.asarray(features, np.float64)
    o = (np.asarray(observed) & np.asarray(roi)[..., None]).astype(np.float64)
    weight = q[..., :, None] * o[..., None, :]  # (X, Y, Z, K, M)
    counts = weight.sum(axis=(0, 1, 2))
    means = np.einsum("xyzkm,xyzm->km", weight, x) / np.maximum(counts, 1e-12)
    second = np.einsum("xyzkm,xyzm->km", weight, x**2) / np.maximum(counts, 1e-12)
    variances = np.maximum(second - means**2, NOISE_FLOOR_SD**2)
    proportions = q.sum(axis=(0, 1, 2)) / max(float(np.asarray(roi).sum()), 1.0)
    order = class_order(means, num_tumour, tumour_key, background_key)
    rank = np.argsort(order)  # old class -> its population position
    configurations = label_configurations(rank[q.argmax(axis=-1)], roi, weights, q.shape[-1])
    return CaseClassStats(means[order], variances[order], counts[order], proportions[order],
                          float(beta), configurations)


def pool_population(stats: list[CaseClassStats], interaction: bool = False) -> dict:
    """Empirical-Bayes pooling of per-case class statistics (module doc).

    Returns {"mean", "spread_var", "noise_var" (K, M), "proportions" (K,), "beta",
    "cases_per_class" (K,), "interaction"}: with ``interaction`` the (K, K) class-interaction
    matrix of :func:`pool_interaction`, else None.
    """
    means = np.stack([s.means for s in stats])  # (P, K, M)
    variances = np.stack([s.variances for s in stats])
    counts = np.stack([s.counts for s in stats])
    present = counts >= MIN_CLASS_VOXELS
    num_cases = present.sum(axis=0)  # (K, M)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(present, means, 0.0).sum(axis=0) / num_cases
        deviation = np.where(present, means - mean, 0.0)
        between = (deviation**2).sum(axis=0) / (num_cases - 1)
        sampling = np.where(present, variances / np.maximum(counts, 1.0), 0.0).sum(axis=0) / num_cases
        noise = (np.where(present, counts * variances, 0.0).sum(axis=0)
                 / np.where(present, counts, 0.0).sum(axis=0))
    spread = (1.0 + 1.0 / np.maximum(num_cases, 1)) * np.maximum(between - sampling, SPREAD_FLOOR_SD**2)
    weak = num_cases < 2
    spread = np.where(weak, WEAK_SPREAD_SD**2, spread)
    # a class seen in no case: a flat prior around 0 with unit noise
    mean = np.where(num_cases == 0, 0.0, mean)
    noise = np.maximum(np.where(num_cases == 0, 1.0, noise), NOISE_FLOOR_SD**2)
    return {"mean": mean, "spread_var": spread, "noise_var": noise,
            "proportions": np.mean([s.proportions for s in stats], axis=0),
            "beta": float(np.median([s.beta for s in stats])),
            "cases_per_class": num_cases.min(axis=1),
            "interaction": pool_interaction(stats, mean.shape[0]) if interaction else None}


def pool_interaction(stats: list[CaseClassStats], num_classes: int) -> np.ndarray:
    """The (K, K) class-interaction matrix by pseudo-likelihood jointly over the cases' most
    probable label fields, a free class bias per case
    (:func:`vbseg.potts.beta.estimate_interaction_pl`), in the gauge where every row of J
    has the same sum (:func:`vbseg.potts.beta.equal_row_sum_gauge`): J then carries no
    net preference for a class, which in the per-scan fit comes from the scan's own
    proportions (E[log pi]) alone.

    Measured alternative, rejected: the biases fixed at each case's log class frequencies
    (what E[log pi] is in the per-scan fit). The part of J that trades against the biases then
    absorbs the difference between those and the pseudo-likelihood's own biases, and on the
    sarcomas the held-out fits called thousands of mL tumour (leave-one-out Dice 0.03-0.2 on
    12 of 15 cases)."""
    if any(s.configurations is None for s in stats):
        raise ValueError("the class-interaction matrix needs every case's label configurations "
                         "(statistics from fit_case_classes)")
    interaction, _ = estimate_interaction_pl([s.configurations for s in stats], num_classes)
    return equal_row_sum_gauge(interaction)


class PriorFitResult(NamedTuple):
    """Output of :func:`fit_with_population_prior`: marginals (X, Y, Z, K) in population class
    order; emission posterior (fields (K, M)); proportions (K,) Dirichlet parameters; elbo_trace
    (max_iter,), NaN after the last iteration; num_iterations; converged."""

    marginals: jax.Array
    emission: NormalGammaPrior
    proportions: jax.Array
    elbo_trace: jax.Array
    num_iterations: jax.Array
    converged: jax.Array


@partial(jax.jit, static_argnames=("max_iter",))
def fit_with_population_prior(observations, observed, roi, beta, weights, prior: NormalGammaPrior,
                              concentration, start_kappa=None, *, max_iter: int = 300,
                              tol: float = 1e-5,
                              min_iter: int = 5) -> PriorFitResult:
    """Mean-field VB of the hidden Potts model of one scan under per-class population priors.

    Args:
        observations: (X, Y, Z, M) feature-space images; observed (X, Y, Z, M) bool;
            roi (X, Y, Z) bool; beta: fixed coupling, a scalar or a (K, K) class-interaction
            matrix; weights: (3,) or (13,) neighbour weights.
        prior: Normal-Gamma hyperparameters, each (K, M) (per class; not tied).
        concentration: (K,) Dirichlet parameters of the class proportions.
        start_kappa: optional (K, M) kappa for the start only (see the code comment).
    The start is the prior predictive assignment (module doc); then CAVI to convergence
    (|ELBO change| per ROI voxel < tol).
    """
    observed = observed & roi[..., None]
    num_classes, num_modalities = prior.mean.shape
    concentration = jnp.asarray(concentration, observations.dtype)
    family = emission_vb("gaussian", prior, num_classes=num_classes,
                         num_modalities=num_modalities, tied=False)
    # the label update of CAVI with the parameter factors at their prior, q(mu, tau) = p(mu, tau);
    # start_kappa (K, M) replaces kappa0 there (a huge value drops the 1 / kappa0 term where
    # the prior is flat, which would otherwise penalise low-noise classes for the mean's
    # uncertainty and start far from the data)
    start = (prior if start_kappa is None
             else prior._replace(kappa=jnp.asarray(start_kappa, prior.kappa.dtype)))
    start_unary = (expected_log_likelihood(observations, observed, start)
                   + jnp.log(concentration / jnp.sum(concentration)))
    q0 = jax.nn.softmax(start_unary, axis=-1) * roi[..., None]
    field = jnp.zeros(observations.shape[:3] + (num_classes,), observations.dtype)
    q, post, alpha, trace, iterations, converged, *_ = coordinate_ascent(
        observations, observed, roi, beta, weights, family, concentration, field, q0,
        max_iter=max_iter, tol=tol, min_iter=min_iter)
    return PriorFitResult(q, post, alpha, trace, iterations, converged)
