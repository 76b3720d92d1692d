"""Hidden Potts model: a Markov random field over voxel labels with per-class emissions.

Labels z_v in {0, ..., K-1} on the voxels v of a region of interest (ROI) R, with class
proportions pi (an external field that lets a small lesion be a small class). The prior is

    p(pi, z | beta) = Dirichlet(pi | alpha0) prod_{v in R} pi_{z_v} exp(beta * S(z)) / Z(beta),
    S(z) = sum over neighbour pairs (v, w) in R of  w_vw * 1[z_v = z_w],

(Potts 1952; as an image prior, Besag 1986), on the 6- or 26-neighbourhood of the voxel grid
with spacing-aware weights w_vw = min(spacing) / |v - w| (the inverse centre distance in mm,
normalised so the nearest neighbours weigh 1, keeping beta's meaning independent of the voxel
size). The weight vector's length (3 or 13, one per pair direction) says which neighbourhood
a fit uses. An optional external field e_v(k) (a per-voxel prior log-odds map from an atlas or
a network) multiplies the prior by exp(sum_v e_v(z_v)).

Given labels, each of M co-registered modalities is an independent Gaussian

    y_vm | z_v = k  ~  Normal(mu_km, 1 / tau_km),

observed only where ``observed[v, m]`` (inside that image's field of view); the hidden
Markov random field with Gaussian emissions of Zhang, Brady & Smith (IEEE TMI 2001). Class
parameters get the conjugate Normal-Gamma prior

    tau_km ~ Gamma(a0, b0),   mu_km | tau_km ~ Normal(m0, 1 / (kappa0 * tau_km)),

with one precision per modality shared by all classes (``tied=True``, tau_km = tau_m) or
one per class. Z(beta) normalises the joint of (pi, z), so it depends on beta alone (the
marginal prior of pi is the Dirichlet tilted by the Potts partition function); it is
intractable and constant while beta is fixed. The NumPyro program below writes pi and the
categorical base measure as sample sites and exp(beta S(z)) as a factor, so its log density
is the log joint up to -log Z(beta).

Shapes: grid (X, Y, Z); observations (X, Y, Z, M); one-hot or marginal label arrays
(X, Y, Z, K); class parameters (K, M).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from vbseg.potts.psf import blur_operator


class NormalGammaPrior(NamedTuple):
    """Normal-Gamma hyperparameters (each a scalar or a (K, M) array)."""

    mean: jax.Array | float = 0.0
    kappa: jax.Array | float = 0.01
    shape: jax.Array | float = 1.0
    rate: jax.Array | float = 0.01


DEFAULT_PRIOR = NormalGammaPrior()
# Default Dirichlet concentration of the class proportions: uniform on the simplex.
DEFAULT_CONCENTRATION = 1.0


NEIGHBOURHOODS = (6, 26)
# Potts coupling when none is given (or the start of --beta auto). The PSF model needs a
# stronger spatial prior: deconvolution is ill-posed, and on the NEMA phantom scan (background
# COV 0.35) beta = 0.5 let the tumour class explain background noise bumps (volumes +20 to
# +75 % at beta = 1.0), while beta = 1.5 gave Dice 0.91-0.95 and volume within 5 % for spheres
# >= 13 mm; the PSF-free model changes little between 0.5 and 2.0 on phantoms (see README).
DEFAULT_POTTS_BETA = 0.5
DEFAULT_POTTS_BETA_PSF = 1.5
# --sampler: "vb" (mean-field marginals, volume draws from independent voxels) or "gibbs"
# (checkerboard Gibbs from the VB solution: draws of the whole label field)
SAMPLERS = ("vb", "gibbs")


def neighbour_offsets(neighbourhood: int = 6) -> tuple[tuple[int, int, int], ...]:
    """One offset per neighbour pair direction (half of the neighbourhood), in a fixed order.

    6: the three axis steps; 26: the 13 steps d in {-1, 0, 1}^3 whose first nonzero entry is
    +1 (faces, edges and corners). Each unordered neighbour pair (v, v + d) is one offset.
    """
    if neighbourhood == 6:
        return ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    if neighbourhood == 26:
        steps = itertools.product((-1, 0, 1), repeat=3)
        return tuple(d for d in steps if any(d) and d[next(i for i in range(3) if d[i])] == 1)
    raise ValueError(f"neighbourhood must be 6 or 26, got {neighbourhood!r}")


def _offsets_for(weights) -> tuple[tuple[int, int, int], ...]:
    # the weight vector's (static) length says which neighbourhood it belongs to
    return neighbour_offsets(6 if len(weights) == 3 else 26)


def neighbour_weights(spacing_mm, neighbourhood: int = 6) -> np.ndarray:
    """Edge weight per offset of :func:`neighbour_offsets`: the inverse centre distance
    min(spacing) / |d * spacing|, so the nearest neighbours weigh 1 and beta keeps its meaning
    across voxel sizes. Shape (3,) for the 6-neighbourhood, (13,) for the 26-neighbourhood."""
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    offsets = np.asarray(neighbour_offsets(neighbourhood), dtype=np.float64)
    distance = np.sqrt(np.sum((offsets * spacing) ** 2, axis=1))
    return (spacing.min() / distance).astype(np.float32)


def colour_masks(shape, weights) -> tuple[jax.Array, ...]:
    """A proper colouring of the grid graph: voxels of one colour share no neighbour pair.

    6-neighbourhood: two colours by the parity of i + j + k (the grid is bipartite).
    26-neighbourhood: eight colours by the parities of (i, j, k); two 26-neighbours differ by
    one step along at least one axis, so that axis's parity differs. Voxels of one colour are
    conditionally independent given the rest, so a colour is updated (or drawn) at once.
    """
    i, j, k = jnp.meshgrid(*[jnp.arange(n) for n in shape], indexing="ij")
    if len(weights) == 3:
        even = (i + j + k) % 2 == 0
        return even, ~even
    code = (i % 2) * 4 + (j % 2) * 2 + (k % 2)
    return tuple(code == c for c in range(8))


def _shift(x: jax.Array, axis: int, step: int) -> jax.Array:
    """x shifted by ``step`` (+1 or -1) along ``axis`` with zeros entering (free boundary).

    ``_shift(x, a, +1)[i] = x[i - 1]``; ``_shift(x, a, -1)[i] = x[i + 1]``.
    """
    n = x.shape[axis]
    zeros = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))
    if step == 1:
        return jnp.concatenate([zeros, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    return jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), zeros], axis=axis)


def shift_by(x: jax.Array, offset) -> jax.Array:
    """``shift_by(x, d)[v] = x[v - d]`` (zero where v - d leaves the grid), d in {-1, 0, 1}^3."""
    for axis, step in enumerate(offset):
        if step:
            x = _shift(x, axis, step)
    return x


def neighbour_sum(labels: jax.Array, weights) -> jax.Array:
    """sum_w w_vw * labels[w] over the neighbours w of each voxel v.

    Args:
        labels: (X, Y, Z, K) one-hot labels or marginals, zero outside the ROI.
        weights: (3,) or (13,) per-offset edge weights from :func:`neighbour_weights`.
    Returns:
        (X, Y, Z, K) array; a weighted 7- or 27-point stencil, free boundary.
    """
    total = jnp.zeros_like(labels)
    for weight, offset in zip(weights, _offsets_for(weights)):
        back = tuple(-d for d in offset)
        total = total + weight * (shift_by(labels, offset) + shift_by(labels, back))
    return total


def coupling_field(neighbours, beta) -> jax.Array:
    """The Potts prior's part of each voxel's label logits from its neighbours' weighted label
    sums ``neighbours`` (X, Y, Z, K): beta * neighbours for a scalar coupling, or
    neighbours @ J for a symmetric (K, K) class-interaction matrix J (energy
    sum_{v~w} w_vw J[z_v, z_w]; J = beta I is the Potts model)."""
    beta = jnp.asarray(beta)
    return beta * neighbours if beta.ndim == 0 else neighbours @ beta


def class_softmax(logits: jax.Array) -> jax.Array:
    """softmax over the last (class) axis, written exp(x - logsumexp(x)).

    Same values as ``jax.nn.softmax``; on CPU, when the logits are a stencil expression (label
    updates), XLA fuses this form about 3.5x faster (measured on 96^3 x 3 classes: 13 ms vs
    46 ms), because jax.nn.softmax's separate max, sum and divide passes each recompute the
    fused stencil.
    """
    return jnp.exp(logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True))


def potts_statistic(labels: jax.Array, weights) -> jax.Array:
    """S = sum over neighbour pairs of w_vw * <labels_v, labels_w>.

    For one-hot labels this is sum w_vw 1[z_v = z_w]; for mean-field marginals q it is
    E_q[S(z)] (the pairs are independent under q). Each pair is counted once.
    """
    total = jnp.zeros((), labels.dtype)
    for weight, offset in zip(weights, _offsets_for(weights)):
        total = total + weight * jnp.sum(labels * shift_by(labels, offset))
    return total


def gaussian_log_likelihood(observations, observed, mean, precision) -> jax.Array:
    """log N(y_vm | mean_km, 1/precision_km) summed over observed modalities: (X, Y, Z, K)."""
    y = observations[..., None, :]  # (X, Y, Z, 1, M)
    per_modality = 0.5 * (jnp.log(precision) - jnp.log(2 * jnp.pi)) - 0.5 * precision * (
        y - mean
    ) ** 2
    return jnp.sum(jnp.where(observed[..., None, :], per_modality, 0.0), axis=-1)


def hidden_potts_model(
    observations: jax.Array,
    observed: jax.Array,
    roi: jax.Array,
    *,
    num_classes: int,
    beta: float,
    weights,
    prior: NormalGammaPrior = DEFAULT_PRIOR,
    concentration: float = DEFAULT_CONCENTRATION,
    tied: bool = True,
    psf_fwhm_mm=None,
    spacing_mm=None,
    relative_precision=None,
    learn_proportions: bool = True,
    external_field=None,
    emission: str = "gaussian",
    dof: float = 4.0,
    log_modalities=None,
) -> None:
    """Hidden Potts model as a NumPyro program.

    Sample sites: ``tau`` (1, M) shared or (K, M) per-class precisions, ``mu`` (K, M) class
    means, ``pi`` (K,) class proportions, ``z`` (X, Y, Z) labels (masked to the ROI), factor
    ``potts`` = beta * S(z) (plus sum_v e_v(z_v) with an external field), and observed ``y``.

    Args:
        observations: (X, Y, Z, M) images on one grid (standardised per modality).
        observed: (X, Y, Z, M) bool, where each modality is observed (FOV and ROI).
        roi: (X, Y, Z) bool, the voxels that carry a label.
        num_classes: K.
        beta: Potts coupling (>= 0).
        weights: (3,) or (13,) neighbour weights (6- or 26-neighbourhood), see
            :func:`neighbour_weights`.
        prior: Normal-Gamma hyperparameters of the class parameters (scalars).
        concentration: Dirichlet concentration alpha0 of pi.
        tied: one precision per modality shared by the classes.
        psf_fwhm_mm: optional per-modality PSF FWHM (mm; 0 = none) with ``spacing_mm``: the
            mean of modality m is then the blurred class-mean image H'_m mu_{z, m} (see
            :mod:`vbseg.potts.psf`), i.e. the labels describe the activity before the
            scanner blurred it. Needs ``tied=True`` (one noise level per image).
        relative_precision: optional (X, Y, Z, M) known lambda_vm > 0: the noise precision of
            voxel v in modality m is tau_m * lambda_vm (e.g. PET variance growing with uptake).
        learn_proportions: sample pi ~ Dirichlet, or fix it uniform (no ``pi`` site).
        external_field: optional (X, Y, Z, K) prior log-potentials e_v(k) added to the unary
            term of the label prior (defined up to a per-voxel constant).
        emission: "gaussian" (above); "student": a latent scale ``u`` (X, Y, Z) ~
            Gamma(dof/2, dof/2) per voxel divides every modality's variance (a multivariate
            Student-t with diagonal scale); "full": class precision matrices ``Lambda`` (K, M, M)
            (one (1, M, M) shared when ``tied``) ~ Wishart(I / (2 b0), 2 a0 + M - 1), means
            mu_k | Lambda_k ~ N(m0, (kappa0 Lambda_k)^-1), y_v ~ N(mu_k, Lambda_k^-1) with every
            modality observed in the ROI (see :mod:`vbseg.potts.emission_updates`).
        log_modalities: optional per-modality bools: those modalities are log-normal, i.e. the
            model above holds for log y (``observations`` must then be positive there) and
            the density of y carries the Jacobian -log y.
    """
    if emission == "full":
        _full_covariance_emissions(observations, observed, roi, num_classes=num_classes,
                                   beta=beta, weights=weights, prior=prior,
                                   concentration=concentration, tied=tied,
                                   learn_proportions=learn_proportions,
                                   external_field=external_field, log_modalities=log_modalities)
        return
    observations = _log_transformed(observations, observed, roi, log_modalities)
    num_modalities = observations.shape[-1]
    grid = observations.shape[:3]
    shape = (num_classes, num_modalities)
    tau_shape = (1, num_modalities) if tied else shape
    tau = numpyro.sample(
        "tau",
        dist.Gamma(jnp.full(tau_shape, prior.shape), jnp.full(tau_shape, prior.rate)).to_event(2),
    )
    tau = jnp.broadcast_to(tau, shape)
    mu = numpyro.sample(
        "mu", dist.Normal(jnp.full(shape, prior.mean), 1.0 / jnp.sqrt(prior.kappa * tau)).to_event(2)
    )
    safe_z = _potts_labels(grid, roi, num_classes=num_classes, beta=beta, weights=weights,
                           concentration=concentration, learn_proportions=learn_proportions,
                           external_field=external_field)
    mean, scale = mu[safe_z], 1.0 / jnp.sqrt(tau[safe_z])  # (X, Y, Z, M)
    if emission == "student":
        u = numpyro.sample("u", dist.Gamma(0.5 * dof, 0.5 * dof).expand(grid).mask(roi).to_event(3))
        scale = scale / jnp.sqrt(u)[..., None]
    elif emission != "gaussian":
        raise ValueError(f"unknown emission {emission!r}")
    if relative_precision is not None:
        scale = scale / jnp.sqrt(relative_precision)
    if psf_fwhm_mm is not None:
        if not tied:
            raise ValueError("the PSF likelihood needs tied precisions")
        # the blurred image of the label field's class means, restricted to the ROI
        mean = jnp.stack(
            [blur_operator(f, spacing_mm, roi).apply(mean[..., m])
             for m, f in enumerate(psf_fwhm_mm)], axis=-1)
    numpyro.sample(
        "y",
        dist.Normal(mean, scale).mask(observed & roi[..., None]).to_event(4),
        obs=observations,
    )


def _potts_labels(grid, roi, *, num_classes, beta, weights, concentration, learn_proportions,
                  external_field):
    """Sample sites ``pi`` and ``z`` and the ``potts`` factor; returns z with 0 outside the ROI."""
    if learn_proportions:
        pi = numpyro.sample("pi", dist.Dirichlet(jnp.full(num_classes, concentration)))
    else:
        pi = jnp.full(num_classes, 1.0 / num_classes)
    z = numpyro.sample("z", dist.Categorical(probs=pi).expand(grid).mask(roi).to_event(3))
    onehot = jax.nn.one_hot(z, num_classes) * roi[..., None]
    energy = beta * potts_statistic(onehot, weights)
    if external_field is not None:
        energy = energy + jnp.sum(onehot * external_field)
    numpyro.factor("potts", energy)
    return jnp.where(roi, z, 0)


def _log_transformed(observations, observed, roi, log_modalities):
    """log y for the log-normal modalities, with the Jacobian factor -sum log y over their
    observed ROI voxels (so the program's density is that of y itself)."""
    if log_modalities is None or not any(log_modalities):
        return observations
    flags = jnp.asarray(log_modalities, bool)
    inside = observed & roi[..., None] & flags
    safe = jnp.where(inside, observations, 1.0)
    numpyro.factor("log_jacobian", -jnp.sum(jnp.log(safe)))
    return jnp.where(flags, jnp.log(jnp.where(flags, safe, 1.0)), observations)


def _full_covariance_emissions(observations, observed, roi, *, num_classes, beta, weights, prior,
                               concentration, tied, learn_proportions, external_field,
                               log_modalities):
    """The ``emission="full"`` branch of :func:`hidden_potts_model` (sites ``Lambda``, ``mu``,
    ``pi``, ``z``, ``y``)."""
    observations = _log_transformed(observations, observed, roi, log_modalities)
    d = observations.shape[-1]
    grid = observations.shape[:3]
    rows = 1 if tied else num_classes
    scale0 = jnp.eye(d) / (2.0 * prior.rate)
    precision = numpyro.sample(
        "Lambda", dist.Wishart(2.0 * prior.shape + d - 1.0, scale_matrix=scale0)
        .expand((rows,)).to_event(1))
    precision = jnp.broadcast_to(precision, (num_classes, d, d))
    mu = numpyro.sample("mu", dist.MultivariateNormal(
        jnp.full((num_classes, d), prior.mean), precision_matrix=prior.kappa * precision).to_event(1))
    safe_z = _potts_labels(grid, roi, num_classes=num_classes, beta=beta, weights=weights,
                           concentration=concentration, learn_proportions=learn_proportions,
                           external_field=external_field)
    numpyro.sample("y", dist.MultivariateNormal(mu[safe_z], precision_matrix=precision[safe_z])
                   .mask(roi).to_event(3), obs=observations)
