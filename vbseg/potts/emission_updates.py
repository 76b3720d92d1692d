"""Variational updates of the class-emission models (the "how" of :mod:`vbseg.potts.emissions`).

Each family supplies, for coordinate-ascent VB with label marginals q_v(k):
the conjugate update of the class parameters' posterior, the expected log-likelihood of each
voxel under each class (the unary term of the label update), and the KL of the parameters'
posterior from their prior (for the ELBO).

* ``gaussian``: independent Gaussians per modality, Normal-Gamma posteriors (tied or
  per-class precisions).
* ``student``: a multivariate Student-t with diagonal scale per class, as the scale mixture
  y_v | z_v = k, u_vk ~ N(mu_k, diag(1 / (u_vk tau_k))), u_vk ~ Gamma(nu / 2, nu / 2), with one
  u per voxel and class shared by the modalities (Svensen & Bishop 2005, "Robust Bayesian
  mixture modelling", Neurocomputing 64:235; Archambeau & Verleysen 2007, Neural Networks
  20:129). q(u_vk) = Gamma((nu + D_v) / 2, (nu + Delta_vk) / 2) with D_v observed modalities and
  Delta_vk = sum_m E[tau_km (y_vm - mu_km)^2]; the class parameters get the Normal-Gamma update
  with precision weights E[u_vk]. The unary term is E[log p(y, u | k)] - E[log q(u | k)] at
  that q(u), which for fixed parameters is exactly the log Student-t density.
* ``full``: a multivariate Gaussian over the modalities with a full covariance, Normal-Wishart
  posteriors per class or tied (Bishop 2006, PRML section 10.2), so correlated PET/CT or MR
  sequences are fused in one likelihood. Needs every modality observed at every VOI voxel.

Shapes: observations/observed (X, Y, Z, M); marginals (X, Y, Z, K); Normal-Gamma fields
(K, M); Normal-Wishart mean (K, D), kappa (K,), scale (K, D, D), dof (K,).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln, multigammaln

from vbseg.potts.model import NormalGammaPrior

EMISSIONS = ("gaussian", "student", "full")
# Student-t degrees of freedom when not given: heavy enough tails to discount isolated
# outliers (a hot vessel or a reconstruction spike), light enough to keep a class compact.
DEFAULT_STUDENT_DOF = 4.0


def class_major(x: jax.Array) -> jax.Array:
    """(X, Y, Z, C) -> (C, X, Y, Z): each class's (or modality's) voxels contiguous."""
    return jnp.moveaxis(x, -1, 0)


def class_moments(marginals, observations, observed, precision_weights=None, offset=None):
    """Weighted voxel sums per (class, modality), each (K, M): (n, c, ybar, s) with
    r_v = q_v(k) [v observed in m] u_vk, n = sum r, c = sum q [observed], ybar = sum r y / n
    and s = sum r (y - ybar)^2 (two passes, so no cancellation between raw moments).

    Written as K x M separate sums over class-major copies (:func:`class_major`) rather than
    one reduction of the (X, Y, Z, K, M) broadcast: on CPU, XLA reduces such small minor axes
    badly (144^3 voxels, K = 3, M = 2: 163 ms as one reduction, 75 ms this way).
    """
    num_classes, num_modalities = marginals.shape[-1], observations.shape[-1]
    q, y = class_major(marginals), class_major(observations)
    o = class_major(observed).astype(observations.dtype)
    u = None if precision_weights is None else class_major(precision_weights)
    rows = {"n": [], "c": [], "ybar": [], "s": []}
    for k in range(num_classes):
        cells = {key: [] for key in rows}
        for m in range(num_modalities):
            weight = q[k] * o[m]
            counted = jnp.sum(weight)
            if u is not None:
                weight = weight * u[k]
            n = counted if u is None else jnp.sum(weight)
            values = y[m] if offset is None else y[m] - offset[..., k, m]
            mean = jnp.sum(weight * values) / jnp.maximum(n, 1e-12)
            for key, value in zip(rows, (n, counted, mean, jnp.sum(weight * (values - mean) ** 2))):
                cells[key].append(value)
        for key in rows:
            rows[key].append(jnp.stack(cells[key]))
    return tuple(jnp.stack(rows[key]) for key in rows)


def normal_gamma_update(marginals, observations, observed, prior: NormalGammaPrior,
                        tied: bool = True, precision_weights=None, offset=None) -> NormalGammaPrior:
    """Conjugate Normal-Gamma posterior per (class, modality) with soft counts q_v(k).

    With r_v = q_v(k) [v observed in m] u_vk: n = sum_v r_v, ybar = sum r y / n,
    s = sum r (y - ybar)^2, c = sum_v q_v(k) [v observed in m], and

        kappa' = kappa0 + n,   m' = (kappa0 m0 + n ybar) / kappa',
        per class (tied=False):  a' = a0 + c / 2,  b' = b0 + s / 2 + kappa0 n (ybar - m0)^2 / (2 kappa');
        tied (one precision per modality shared by the K classes, mu_k | tau ~ N(m0, 1/(kappa0 tau))):
                 a' = a0 + sum_k c_k / 2,  b' = b0 + sum_k [s_k + kappa0 n_k (ybar_k - m0)^2 / kappa'_k] / 2,
    the tied values repeated on every class row. All fields are (K, M). ``precision_weights``
    u_vk (X, Y, Z, K) scale each voxel's precision (E[u] of the Student-t scale mixture); by
    default 1, and then n = c. ``offset`` (X, Y, Z, K, M), if given, is subtracted from the
    observations class by class (a GP intensity field on some classes,
    :mod:`vbseg.potts.intensity_field`).
    """
    count, counted, ybar, scatter = class_moments(marginals, observations, observed,
                                                  precision_weights, offset)
    kappa = prior.kappa + count
    mean = (prior.kappa * prior.mean + count * ybar) / kappa
    rate_terms = 0.5 * scatter + 0.5 * prior.kappa * count * (ybar - prior.mean) ** 2 / kappa
    if tied:
        shape = prior.shape[:1] + 0.5 * jnp.sum(counted, axis=0, keepdims=True)
        rate = prior.rate[:1] + jnp.sum(rate_terms, axis=0, keepdims=True)
        shape, rate = jnp.broadcast_to(shape, count.shape), jnp.broadcast_to(rate, count.shape)
    else:
        shape = prior.shape + 0.5 * counted
        rate = prior.rate + rate_terms
    return NormalGammaPrior(mean, kappa, shape, rate)


def _gaussian_pieces(observations, observed, post: NormalGammaPrior, offset=None):
    """Per (voxel, class), summed over observed modalities: sum_m (E[log tau] - log 2 pi) / 2
    and Delta = sum_m E[tau (y - mu)^2] = sum_m (a / b)(y - m)^2 + 1 / kappa (y minus
    ``offset`` (X, Y, Z, K, M) class by class when given)."""
    e_log_tau = digamma(post.shape) - jnp.log(post.rate)
    log_norm, quadratic = 0.0, 0.0
    for m in range(observations.shape[-1]):  # (X, Y, Z, K) per modality: faster on CPU than
        o = observed[..., m:m + 1]            # reducing an (X, Y, Z, K, M) broadcast over M
        y = observations[..., m:m + 1] if offset is None else observations[..., m:m + 1] - offset[..., m]
        log_norm = log_norm + jnp.where(o, 0.5 * (e_log_tau[:, m] - jnp.log(2 * jnp.pi)), 0.0)
        term = (post.shape[:, m] / post.rate[:, m]) * (y - post.mean[:, m]) ** 2 + 1.0 / post.kappa[:, m]
        quadratic = quadratic + jnp.where(o, term, 0.0)
    return log_norm, quadratic


def expected_log_likelihood(observations, observed, post: NormalGammaPrior, offset=None) -> jax.Array:
    """E_q[log N(y_vm | mu_km, 1/tau_km)] summed over observed modalities: (X, Y, Z, K).

    Uses E[log tau] = digamma(a) - log b, E[tau] = a / b, E[tau (y - mu)^2] =
    (a / b)(y - m)^2 + 1 / kappa. ``offset``: as in :func:`normal_gamma_update`.
    """
    log_norm, quadratic = _gaussian_pieces(observations, observed, post, offset)
    return log_norm - 0.5 * quadratic


def kl_normal_gamma(post: NormalGammaPrior, prior: NormalGammaPrior, tied: bool = True) -> jax.Array:
    """KL(q(mu, tau) || p(mu, tau)) summed over classes and modalities, closed form.

    KL = KL(Gamma(a, b) || Gamma(a0, b0)) for each precision (once per modality when tied)
       + sum_k E_tau[KL(N(m_k, 1/(kappa_k tau)) || N(m0, 1/(kappa0 tau)))],
    the latter = (kappa0/kappa - 1 - log(kappa0/kappa) + kappa0 (a/b) (m - m0)^2) / 2.
    """
    a, b, a0, b0 = post.shape, post.rate, prior.shape, prior.rate
    kl_gamma = (
        (a - a0) * digamma(a) - gammaln(a) + gammaln(a0) + a0 * (jnp.log(b) - jnp.log(b0))
        + a * (b0 - b) / b
    )
    if tied:
        kl_gamma = kl_gamma[:1]
    ratio = prior.kappa / post.kappa
    kl_mean = 0.5 * (ratio - 1.0 - jnp.log(ratio) + prior.kappa * (a / b) * (post.mean - prior.mean) ** 2)
    return jnp.sum(kl_gamma) + jnp.sum(kl_mean)


def student_unary(observations, observed, post: NormalGammaPrior, dof):
    """Unary term and E[u] of the Student-t emission: ((X, Y, Z, K), (X, Y, Z, K)).

    With a = (nu + D_v) / 2, b = (nu + Delta) / 2, E[u] = a / b, E[log u] = digamma(a) - log b:
    unary = sum_m (E[log tau] - log 2 pi) / 2 + D_v E[log u] / 2 - E[u] Delta / 2
            + E[log Gamma(u | nu/2, nu/2)] - E[log Gamma(u | a, b)].
    """
    log_norm, quadratic = _gaussian_pieces(observations, observed, post)
    num_observed = jnp.sum(observed, axis=-1, dtype=observations.dtype)[..., None]
    half = 0.5 * dof
    a = half + 0.5 * num_observed
    b = half + 0.5 * quadratic
    e_u = a / b
    e_log_u = digamma(a) - jnp.log(b)
    log_prior_u = half * jnp.log(half) - gammaln(half) + (half - 1.0) * e_log_u - half * e_u
    log_q_u = a * jnp.log(b) - gammaln(a) + (a - 1.0) * e_log_u - a
    unary = log_norm + 0.5 * num_observed * e_log_u - 0.5 * e_u * quadratic + log_prior_u - log_q_u
    return unary, e_u


class NormalWishart(NamedTuple):
    """Normal-Wishart parameters: mu_k | Lambda_k ~ N(mean_k, (kappa_k Lambda_k)^-1),
    Lambda_k ~ Wishart(scale_k, dof_k) (E[Lambda] = dof scale); tied rows repeat."""

    mean: jax.Array  # (K, D)
    kappa: jax.Array  # (K,)
    scale: jax.Array  # (K, D, D)
    dof: jax.Array  # (K,)


def normal_wishart_prior(prior: NormalGammaPrior, num_classes: int, num_modalities: int,
                         dtype=jnp.float32) -> NormalWishart:
    """The Normal-Wishart prior matching scalar Normal-Gamma hyperparameters: mean m0,
    kappa0, Wishart(I / (2 b0), 2 a0 + D - 1), which is Gamma(a0, b0) when D = 1 and keeps
    E[Lambda] = (2 a0 + D - 1) / (2 b0) I."""
    d = num_modalities
    k = num_classes
    m0, kappa0, a0, b0 = (jnp.asarray(p, dtype).reshape(-1)[0] for p in prior)
    return NormalWishart(
        jnp.full((k, d), m0, dtype), jnp.full((k,), kappa0, dtype),
        jnp.broadcast_to(jnp.eye(d, dtype=dtype) / (2.0 * b0), (k, d, d)),
        jnp.full((k,), 2.0 * a0 + d - 1.0, dtype))


def normal_wishart_update(marginals, observations, prior: NormalWishart,
                          tied: bool = True) -> NormalWishart:
    """Conjugate update with soft counts N_k = sum_v q_v(k), means xbar_k and scatter S_k:

        kappa_k = kappa0 + N_k,  mean_k = (kappa0 m0 + N_k xbar_k) / kappa_k,
        scale_k^-1 = scale0^-1 + S_k + kappa0 N_k / kappa_k (xbar_k - m0)(xbar_k - m0)^T,
        dof_k = dof0 + N_k;
    tied: one Wishart, scale^-1 = scale0^-1 + sum_k [...], dof = dof0 + sum_k N_k.
    """
    axes = (0, 1, 2)
    count = jnp.sum(marginals, axis=axes)  # (K,)
    xbar = jnp.einsum("xyzk,xyzd->kd", marginals, observations) / jnp.maximum(count, 1e-12)[:, None]
    second = jnp.einsum("xyzk,xyzd,xyze->kde", marginals, observations, observations)
    scatter = second - count[:, None, None] * xbar[:, :, None] * xbar[:, None, :]
    kappa = prior.kappa + count
    mean = (prior.kappa[:, None] * prior.mean + count[:, None] * xbar) / kappa[:, None]
    diff = xbar - prior.mean
    extra = scatter + (prior.kappa * count / kappa)[:, None, None] * diff[:, :, None] * diff[:, None, :]
    scale0_inv = jnp.linalg.inv(prior.scale)
    if tied:
        inverse = scale0_inv[0] + jnp.sum(extra, axis=0)
        scale = jnp.broadcast_to(jnp.linalg.inv(inverse), prior.scale.shape)
        dof = jnp.broadcast_to(prior.dof[0] + jnp.sum(count), count.shape)
    else:
        scale = jnp.linalg.inv(scale0_inv + extra)
        dof = prior.dof + count
    return NormalWishart(mean, kappa, scale, dof)


def _expected_log_det(post: NormalWishart) -> jax.Array:
    d = post.mean.shape[-1]
    terms = digamma(0.5 * (post.dof[:, None] + 1.0 - jnp.arange(1, d + 1)))
    return jnp.sum(terms, axis=-1) + d * jnp.log(2.0) + jnp.linalg.slogdet(post.scale)[1]


def expected_log_likelihood_full(observations, post: NormalWishart) -> jax.Array:
    """E_q[log N(y_v | mu_k, Lambda_k^-1)] = E[log |Lambda|] / 2 - D log(2 pi) / 2
    - (D / kappa_k + dof_k (y - mean_k)^T scale_k (y - mean_k)) / 2: (X, Y, Z, K)."""
    d = post.mean.shape[-1]
    diff = observations[..., None, :] - post.mean  # (X, Y, Z, K, D)
    quadratic = jnp.einsum("...kd,kde,...ke->...k", diff, post.scale, diff)
    return (0.5 * _expected_log_det(post) - 0.5 * d * jnp.log(2 * jnp.pi)
            - 0.5 * (d / post.kappa + post.dof * quadratic))


def kl_normal_wishart(post: NormalWishart, prior: NormalWishart, tied: bool = True) -> jax.Array:
    """KL(q(mu, Lambda) || p(mu, Lambda)), closed form, summed over classes:

    KL(Wishart(W, nu) || Wishart(W0, nu0)) = nu0/2 (log|W0| - log|W|) + nu/2 (tr(W0^-1 W) - D)
        + log Gamma_D(nu0/2) - log Gamma_D(nu/2) + (nu - nu0)/2 psi_D(nu/2)   (once when tied)
    + sum_k E_Lambda KL(N(m_k, (kappa_k Lambda)^-1) || N(m0, (kappa0 Lambda)^-1))
      = (D kappa0/kappa_k - D - D log(kappa0/kappa_k) + kappa0 nu_k (m_k - m0)^T W_k (m_k - m0)) / 2.
    """
    d = post.mean.shape[-1]
    logdet = jnp.linalg.slogdet(post.scale)[1]
    logdet0 = jnp.linalg.slogdet(prior.scale)[1]
    trace = jnp.einsum("kde,ked->k", jnp.linalg.inv(prior.scale), post.scale)
    psi_d = jnp.sum(digamma(0.5 * post.dof[:, None] + 0.5 * (1.0 - jnp.arange(1, d + 1))), axis=-1)
    kl_wishart = (0.5 * prior.dof * (logdet0 - logdet) + 0.5 * post.dof * (trace - d)
                  + multigammaln(0.5 * prior.dof, d) - multigammaln(0.5 * post.dof, d)
                  + 0.5 * (post.dof - prior.dof) * psi_d)
    if tied:
        kl_wishart = kl_wishart[:1]
    ratio = prior.kappa / post.kappa
    diff = post.mean - prior.mean
    mahalanobis = jnp.einsum("kd,kde,ke->k", diff, post.scale, diff)
    kl_mean = 0.5 * (d * ratio - d - d * jnp.log(ratio) + prior.kappa * post.dof * mahalanobis)
    return jnp.sum(kl_wishart) + jnp.sum(kl_mean)


class EmissionVB(NamedTuple):
    """One emission family's VB pieces, closed over its prior and options.

    update(q, y, o, aux) -> post; unary(y, o, post) -> (unary (X, Y, Z, K), aux); kl(post).
    ``aux`` carries what the next update needs from the last unary (E[u] for Student-t; the
    whitened intensity field for the GP-field family). ``classes(post)`` is the class
    parameters' posterior (``post`` itself except for the GP-field family).
    """

    update: Callable
    unary: Callable
    kl: Callable
    initial_aux: Callable
    classes: Callable = lambda post: post


def emission_vb(kind: str, prior: NormalGammaPrior, *, num_classes: int, num_modalities: int,
                tied: bool = True, dof=DEFAULT_STUDENT_DOF) -> EmissionVB:
    """The VB pieces of emission family ``kind`` (one of EMISSIONS); ``prior`` fields are
    (K, M) arrays (for "full", their first entries set the Normal-Wishart prior)."""
    if kind == "gaussian":
        return EmissionVB(
            lambda q, y, o, aux: normal_gamma_update(q, y, o, prior, tied),
            lambda y, o, post: (expected_log_likelihood(y, o, post), None),
            lambda post: kl_normal_gamma(post, prior, tied),
            lambda q: None)
    if kind == "student":
        return EmissionVB(
            lambda q, y, o, aux: normal_gamma_update(q, y, o, prior, tied, aux),
            lambda y, o, post: student_unary(y, o, post, dof),
            lambda post: kl_normal_gamma(post, prior, tied),
            lambda q: jnp.ones(q.shape, q.dtype))
    if kind == "full":
        wishart = normal_wishart_prior(prior, num_classes, num_modalities, prior.mean.dtype)
        return EmissionVB(
            lambda q, y, o, aux: normal_wishart_update(q, y, wishart, tied),
            lambda y, o, post: (expected_log_likelihood_full(y, post), None),
            lambda post: kl_normal_wishart(post, wishart, tied),
            lambda q: None)
    raise ValueError(f"unknown emission {kind!r} (one of {', '.join(EMISSIONS)})")
