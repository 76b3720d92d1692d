"""Brute-force enumeration of label fields on tiny grids: the ground truth for tests.

For p(z) ∝ exp(sum_v unary_v(z_v) + beta * sum_{(v,w) in E} w_vw 1[z_v = z_w]) with n sites
and K classes, all K^n labelings are scored in float64 NumPy (independent of the JAX code it
checks), giving exact marginals and the exact log normaliser. Feasible for K^n up to a few
million (n <= 16 for K = 2, n <= 13 for K = 3).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.special import gammaln, logsumexp

from vbseg.potts.model import neighbour_offsets
from vbseg.potts.psf import gaussian_kernels

MAX_LABELINGS = 5_000_000


def grid_edges(shape, weights) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour pairs of a 3D grid in C order, written pair by pair (no stencils).

    ``weights`` has one entry per pair direction of
    :func:`~vbseg.potts.model.neighbour_offsets`: 3 for the 6-neighbourhood, 13 for the
    26-neighbourhood. Returns (edges (E, 2) int of flat site indices, edge_weights (E,)).
    """
    offsets = neighbour_offsets(6 if len(weights) == 3 else 26)
    index = np.arange(int(np.prod(shape))).reshape(shape)
    edges, edge_weights = [], []
    for site in itertools.product(*[range(n) for n in shape]):
        for offset, weight in zip(offsets, weights):
            other = tuple(i + d for i, d in zip(site, offset))
            if all(0 <= i < n for i, n in zip(other, shape)):
                edges.append((index[site], index[other]))
                edge_weights.append(float(weight))
    return np.asarray(edges, dtype=np.int64).reshape(-1, 2), np.asarray(edge_weights)


def enumerate_labelings(num_sites: int, num_classes: int) -> np.ndarray:
    """All labelings as an (K^n, n) int array, first site varying slowest."""
    if num_classes**num_sites > MAX_LABELINGS:
        raise ValueError(f"{num_classes}^{num_sites} labelings is too many to enumerate")
    grids = np.meshgrid(*[np.arange(num_classes)] * num_sites, indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1)


def potts_log_potential(labelings, unary, edges, edge_weights, beta) -> np.ndarray:
    """sum_v unary[v, z_v] + beta sum_e w_e 1[z_a = z_b] for each labeling: (L,); with a
    (K, K) class-interaction matrix as ``beta``, sum_e w_e J[z_a, z_b] instead."""
    sites = np.arange(unary.shape[0])
    unary_term = unary[sites[None, :], labelings].sum(axis=1)
    first, second = labelings[:, edges[:, 0]], labelings[:, edges[:, 1]]
    if np.ndim(beta) == 2:
        pair = np.asarray(beta, np.float64)[first, second]
    else:
        pair = beta * (first == second)
    return unary_term + (pair * edge_weights[None, :]).sum(axis=1)


def exact_potts_marginals(unary, edges, edge_weights, beta) -> tuple[np.ndarray, float]:
    """Exact marginals p(z_v = k) (n, K) and log normaliser log sum_z exp(potential(z)).

    Args:
        unary: (n, K) float64 log-potentials per site and class.
        edges, edge_weights: from :func:`grid_edges` (or any graph).
        beta: coupling, or a (K, K) class-interaction matrix.
    """
    unary = np.asarray(unary, dtype=np.float64)
    num_sites, num_classes = unary.shape
    labelings = enumerate_labelings(num_sites, num_classes)
    log_potential = potts_log_potential(
        labelings, unary, np.asarray(edges), np.asarray(edge_weights, np.float64), beta
    )
    return labeling_marginals(labelings, log_potential, num_classes)


def labeling_marginals(labelings, log_potential, num_classes) -> tuple[np.ndarray, float]:
    """Marginals p(x_v = k) (n, K) and log normaliser of p(x) ∝ exp(log_potential) over the
    (L, n) ``labelings``."""
    log_norm = float(logsumexp(log_potential))
    probs = np.exp(np.asarray(log_potential, np.float64) - log_norm)
    marginals = np.stack([probs @ (labelings == k) for k in range(num_classes)], axis=1)
    return marginals, log_norm


def dense_blur(fwhm_mm, spacing_mm, shape) -> np.ndarray:
    """The renormalised blur H' of :mod:`vbseg.potts.psf` on a whole grid (support = every
    voxel) as a dense (n, n) float64 matrix, built from its 1D kernels in NumPy: the product of
    the per-axis kernel weights k_a[i_a - j_a], each row divided by its sum (the zero-padded
    kernel weight that falls on the grid)."""
    kernels = gaussian_kernels(fwhm_mm, spacing_mm)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    blur = np.ones((index.shape[0], index.shape[0]))
    for axis, kernel in enumerate(kernels):
        radius = (len(kernel) - 1) // 2
        offset = index[:, None, axis] - index[None, :, axis]
        inside = np.abs(offset) <= radius
        blur *= np.where(inside, np.asarray(kernel, np.float64)[np.clip(offset + radius, 0,
                                                                          len(kernel) - 1)], 0.0)
    return blur / blur.sum(axis=1, keepdims=True)


def regression_log_evidence(y, relative, design, prior_mean, prior_kappa, prior_shape,
                            prior_rate) -> float:
    """log p(y) of y = design @ mu + noise, noise_v ~ N(0, 1 / (tau lambda_v)), with
    tau ~ Gamma(a0, b0), mu | tau ~ N(m0, I / (kappa0 tau)) (the Normal-Gamma regression
    evidence; Murphy 2007). ``design`` (n, J) blurred design, ``relative`` lambda (n,),
    ``prior_mean`` scalar or (J,)."""
    n, num_columns = design.shape
    m0 = np.broadcast_to(np.asarray(prior_mean, np.float64), (num_columns,))
    precision = prior_kappa * np.eye(num_columns) + design.T @ (relative[:, None] * design)
    mean = np.linalg.solve(precision, prior_kappa * m0 + design.T @ (relative * y))
    shape = prior_shape + n / 2
    rate = prior_rate + 0.5 * (np.sum(relative * y * y) + prior_kappa * m0 @ m0
                               - mean @ precision @ mean)
    return float(0.5 * num_columns * np.log(prior_kappa) - 0.5 * np.linalg.slogdet(precision)[1]
                 + prior_shape * np.log(prior_rate) - shape * np.log(rate) + gammaln(shape)
                 - gammaln(prior_shape) - 0.5 * n * np.log(2 * np.pi)
                 + 0.5 * np.sum(np.log(relative)))


def _log_normal_gamma_evidence(values, m0, kappa0):
    """Per-class pieces of the Normal-Gamma marginal likelihood: (n, kappa', b-increment, const)."""
    n = values.size
    kappa = kappa0 + n
    if n == 0:
        return n, kappa, 0.0
    mean = values.mean()
    rate_increment = 0.5 * np.sum((values - mean) ** 2) + 0.5 * kappa0 * n * (mean - m0) ** 2 / kappa
    return n, kappa, rate_increment


def exact_collapsed_marginals(y, observed, edges, edge_weights, beta, prior_mean, prior_kappa,
                              prior_shape, prior_rate, concentration, num_classes, tied=True,
                              external_field=None):
    """Exact p(z_v = k | y) of the hidden Potts model with (mu, tau, pi) integrated out.

    p(z | y) ∝ exp(beta S(z)) DirMult(counts(z) | alpha0) prod_m p(y_m | z), where p(y_m | z) is
    the Normal-Gamma evidence (Murphy 2007, "Conjugate Bayesian analysis of the Gaussian
    distribution"), with one precision per modality shared by the classes (``tied``) or one per
    class. ``y`` and ``observed`` are (n, M); ``prior_mean`` and ``prior_kappa`` are (K, M)
    (class-specific prior means break the label symmetry); shape/rate scalars.
    """
    y = np.asarray(y, np.float64)
    num_sites, num_modalities = y.shape
    labelings = enumerate_labelings(num_sites, num_classes)
    agree = labelings[:, edges[:, 0]] == labelings[:, edges[:, 1]]
    log_post = beta * (agree * np.asarray(edge_weights)[None, :]).sum(axis=1)
    if external_field is not None:
        log_post = log_post + np.asarray(external_field, np.float64)[
            np.arange(num_sites)[None, :], labelings].sum(axis=1)
    alpha0 = np.full(num_classes, concentration, np.float64)
    for row, z in enumerate(labelings):
        counts = np.bincount(z, minlength=num_classes)
        value = (gammaln(alpha0.sum()) - gammaln(alpha0.sum() + num_sites)
                 + np.sum(gammaln(alpha0 + counts) - gammaln(alpha0)))
        for m in range(num_modalities):
            pieces = [_log_normal_gamma_evidence(y[(z == k) & observed[:, m], m],
                                                 prior_mean[k, m], prior_kappa[k, m])
                      for k in range(num_classes)]
            if tied:
                n_total = sum(p[0] for p in pieces)
                shape = prior_shape + 0.5 * n_total
                rate = prior_rate + sum(p[2] for p in pieces)
                value += (sum(0.5 * np.log(prior_kappa[k, m] / p[1]) for k, p in enumerate(pieces))
                          + gammaln(shape) - gammaln(prior_shape) + prior_shape * np.log(prior_rate)
                          - shape * np.log(rate) - 0.5 * n_total * np.log(2 * np.pi))
            else:
                for k, (n, kappa, increment) in enumerate(pieces):
                    shape = prior_shape + 0.5 * n
                    value += (0.5 * np.log(prior_kappa[k, m] / kappa) + gammaln(shape)
                              - gammaln(prior_shape) + prior_shape * np.log(prior_rate)
                              - shape * np.log(prior_rate + increment) - 0.5 * n * np.log(2 * np.pi))
        log_post[row] += value
    probs = np.exp(log_post - logsumexp(log_post))
    return np.stack([probs @ (labelings == k) for k in range(num_classes)], axis=1)
