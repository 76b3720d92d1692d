"""Reference sampler for the hidden Potts model with a PSF-blurred likelihood.

Model as in :mod:`vbseg.inference.meanfield_psf`: y_m = H'_m mu_{z, m} + noise of precision
tau_m lambda_vm at observed voxels. Changing one label z_v from its current class c to k
changes the blurred mean only inside the PSF support of v, by h'_uv (mu_k - mu_c), so with the
current residual r = y - H' mu_z the log-likelihood changes by

    Delta_m(v, k) = tau_m (mu_km - mu_cm) A_v - tau_m (mu_km - mu_cm)^2 c_v / 2,
    A = H'^T (w r),   c = H'^2^T w   (w = o lambda: observation weights),

one adjoint blur per modality. The full conditional of z_v is then

    p(z_v = k | rest) ∝ exp(log pi_k + e_vk + beta sum_w w_vw 1[z_w = k] + sum_m Delta_m(v, k)).

Two voxels whose PSF supports overlap are no longer conditionally independent, so the grid
is coloured with strides 2R + 1 per axis (R the largest kernel radius on that axis, at least
1 for the Potts neighbours): voxels of one colour are far enough apart that their supports
are disjoint, and one colour is drawn at once (Gumbel-max). Given the labels, (mu_.m, tau_m)
are drawn from their conjugate Normal-Gamma regression posterior (the one-hot case of
:func:`~vbseg.inference.meanfield_psf.regression_update`, where the expected Gram matrix is
exact); class proportions stay uniform, as in the PSF fit. Classes are renamed by increasing
mean in the first modality after each sweep (the posterior is symmetric under renaming).

The sampler is a blackjax-style kernel (:func:`psf_hidden_potts_gibbs`: ``init``, ``step``) run
by the shared chain driver of :mod:`vbseg.inference.chains`, as the other Gibbs samplers are.

**Level designs** (the partial-volume model): with a design P (L, J) and per-voxel offsets o
(:mod:`vbseg.inference.meanfield_psf`, "Level designs"), level k of voxel v has the unblurred
mean (P_k + o_v) . mu_m, and Delta_m(v, k) above holds with mu_km - mu_cm replaced by the
difference of those level means; the coupling may be an (L, L) interaction matrix, and the
regression draw uses the design rows of the current labels. No renaming then (the level prior
and the start pin the columns' meaning).

Each colour costs one blur and one adjoint blur per blurred modality, and there are
prod(2R + 1) colours (e.g. 5 x 5 x 7 = 175 for a 6 mm PSF on 4 x 4 x 3 mm voxels), so a
sweep costs a few hundred blurs: a reference for small crops, not a fast fitter.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vbseg.inference.chains import SamplingAlgorithm
from vbseg.inference.gibbs import (
    GibbsResult,
    LabelSwitchInfo,
    conjugate_gibbs_chains,
    order_classes,
    posterior_draw_summary,
)
from vbseg.inference.meanfield_psf import regression_update
from vbseg.models.potts import NormalGammaPrior, coupling_field, neighbour_sum
from vbseg.models.psf import blur_operator, gaussian_kernels


def colour_strides(psf_fwhm_mm, spacing_mm) -> tuple[int, int, int]:
    """Per-axis stride 2R + 1 (R the largest PSF kernel radius over modalities, at least 1)."""
    radius = np.ones(3, int)
    for fwhm in psf_fwhm_mm:
        for axis, kernel in enumerate(gaussian_kernels(float(fwhm), spacing_mm)):
            radius[axis] = max(radius[axis], (len(kernel) - 1) // 2)
    return tuple(int(2 * r + 1) for r in radius)


def _colours(shape, strides):
    index = jnp.meshgrid(*[jnp.arange(n) for n in shape], indexing="ij")
    code = ((index[0] % strides[0]) * strides[1] + index[1] % strides[1]) * strides[2] \
        + index[2] % strides[2]
    return code


def _label_sweep(key, labels, mean, tau, observations, weights_obs, operators, c_terms, log_prior,
                 beta, weights, roi, codes, num_colours, rows):
    """One sweep over all colours; returns the new labels (X, Y, Z). ``rows(m)``: the design
    rows per level, (L, J) or per voxel and level (X, Y, Z, L, J) (module doc, "Level designs")."""
    num_levels = log_prior.shape[-1]
    num_modalities = observations.shape[-1]

    # every voxel is drawn once per sweep (in its colour), so one Gumbel array per sweep serves
    # all colours: each voxel's noise is fresh when it is used (drawing it per colour was most
    # of the sweep's cost: L x N normals per colour, hundreds of colours)
    gumbel = jax.random.gumbel(key, labels.shape + (num_levels,), observations.dtype)

    def colour_step(labels, colour):
        onehot = jax.nn.one_hot(labels, num_levels, dtype=observations.dtype) * roi[..., None]
        logits = log_prior + coupling_field(neighbour_sum(onehot, weights), beta)
        for m in range(num_modalities):
            level_mean = jnp.broadcast_to(rows(m) @ mean[m], labels.shape + (num_levels,))
            current = jnp.take_along_axis(level_mean, labels[..., None], axis=-1)[..., 0]
            residual = observations[..., m] - operators[m].apply(current * roi)
            a_term = operators[m].adjoint(weights_obs[..., m] * residual)
            step = level_mean - current[..., None]  # (X, Y, Z, L)
            logits = logits + tau[m] * (step * a_term[..., None] - 0.5 * step**2 * c_terms[m][..., None])
        draw = jnp.argmax(logits + gumbel, -1)
        return jnp.where((codes == colour) & roi, draw, labels), None

    labels, _ = jax.lax.scan(colour_step, labels, jnp.arange(num_colours))
    return labels


def _draw_parameters(key, labels, observations, observed_f, weights_obs, roi, operators, prior,
                     design, offset):
    """(mean (M, J), tau (M,)) from the conjugate regression posterior given the labels."""
    num_levels, num_columns = design.shape
    onehot = jax.nn.one_hot(labels, num_levels, dtype=observations.dtype) * roi[..., None]
    means, taus = [], []
    for m, (operator, m_key) in enumerate(zip(operators, jax.random.split(key, len(operators)))):
        mean, precision, shape, rate, _ = regression_update(
            onehot, observations[..., m], observed_f[..., m], weights_obs[..., m], operator, prior,
            design, None if offset is None else offset[..., m, :])
        tau_key, mu_key = jax.random.split(m_key)
        tau = jax.random.gamma(tau_key, shape) / rate
        chol = jnp.linalg.cholesky(tau * precision)
        noise = jax.random.normal(mu_key, (num_columns,), observations.dtype)
        means.append(mean + jax.scipy.linalg.solve_triangular(chol.T, noise, lower=False))
        taus.append(tau)
    return jnp.stack(means), jnp.stack(taus)


class PsfGibbsState(NamedTuple):
    """labels (X, Y, Z) int; mean (M, K) class means per modality; tau (M,) noise precisions."""

    labels: jax.Array
    mean: jax.Array
    tau: jax.Array


def psf_hidden_potts_gibbs(observations, observed, roi, beta, weights, prior, relative_precision,
                           external_field, *, num_classes: int, psf_fwhm_mm: tuple,
                           spacing_mm: tuple, design=None, offset=None) -> SamplingAlgorithm:
    """Gibbs kernel for the PSF model (module docstring); arguments as for
    :func:`gibbs_hidden_potts_psf`.

    ``init(key, labels)`` draws (mean, tau) given the start labels; ``step(key, state)`` draws
    the labels colour by colour, then (mean, tau), then renames the classes by mean in the first
    modality (without an external field or a level design), reported as
    :class:`~vbseg.inference.gibbs.LabelSwitchInfo`. ``num_classes`` is the number of labels
    (levels L with a ``design`` (L, J); ``offset`` (X, Y, Z, M, J) or None)."""
    dtype = observations.dtype
    num_modalities = observations.shape[-1]
    observed_f = (observed & roi[..., None]).astype(dtype)
    weights_obs = observed_f * relative_precision.astype(dtype)
    operators = [blur_operator(f, spacing_mm, roi) for f in psf_fwhm_mm]
    c_terms = [operators[m].adjoint_squared(weights_obs[..., m]) for m in range(num_modalities)]
    # an axis shorter than its stride gives every voxel along it its own colour already
    strides = tuple(min(s, n) for s, n in zip(colour_strides(psf_fwhm_mm, spacing_mm), roi.shape))
    num_colours = strides[0] * strides[1] * strides[2]
    codes = _colours(roi.shape, strides)
    log_prior = (jnp.full(roi.shape + (num_classes,), -jnp.log(num_classes), dtype)
                 + (0.0 if external_field is None else external_field))

    levels = jnp.eye(num_classes, dtype=dtype) if design is None else design

    def rows(m):
        return levels if offset is None else levels + offset[..., m, None, :]

    def draw(parameter_key, labels):
        return _draw_parameters(parameter_key, labels, observations, observed_f, weights_obs, roi,
                                operators, prior, levels, offset)

    def init(key, labels):
        return PsfGibbsState(labels, *draw(key, labels))

    def step(key, state):
        label_key, parameter_key = jax.random.split(key)
        labels = _label_sweep(label_key, state.labels, state.mean, state.tau, observations,
                              weights_obs, operators, c_terms, log_prior, beta, weights, roi, codes,
                              num_colours, rows)
        mean, tau = draw(parameter_key, labels)
        switched = jnp.asarray(False)
        if external_field is None and design is None:
            labels, order, switched = order_classes(labels, mean[0])
            mean = mean[:, order]
        return PsfGibbsState(labels, mean, tau), LabelSwitchInfo(switched)

    return SamplingAlgorithm(init, step)


@partial(jax.jit, static_argnames=("num_classes", "psf_fwhm_mm", "spacing_mm", "num_chains",
                                   "num_sweeps", "burn_in"))
def gibbs_hidden_potts_psf(key, observations, observed, roi, beta, weights, prior: NormalGammaPrior,
                           relative_precision, initial_labels, count_weights, external_field=None,
                           design=None, offset=None, *, num_classes: int, psf_fwhm_mm: tuple,
                           spacing_mm: tuple, num_chains: int, num_sweeps: int,
                           burn_in: int) -> GibbsResult:
    """Gibbs for the PSF model with fixed beta, uniform proportions, tied precisions.

    Args:
        observations, observed: (X, Y, Z, M) standardised images and where observed.
        roi: (X, Y, Z) bool; beta, weights: Potts coupling and neighbour weights.
        prior: scalar Normal-Gamma hyperparameters.
        relative_precision: (X, Y, Z, M) known lambda_vm (ones: homoscedastic).
        initial_labels: (X, Y, Z) start of every chain (e.g. the PSF fit's argmax).
        count_weights: (X, Y, Z) summed per class each kept sweep (e.g. SUV, for TLG).
        external_field: optional (X, Y, Z, K) prior log-potentials (no renaming then).
        num_classes: K; psf_fwhm_mm: per-modality FWHM (0 = no blur); spacing_mm; sizes.
        design, offset: a level design (L, J) with L = ``num_classes`` labels and its per-voxel
            offsets (X, Y, Z, M, J) (module doc; ``beta`` may be an (L, L) matrix).
    Returns:
        :class:`~vbseg.inference.gibbs.GibbsResult` with means (C, S, J, M) and precisions
        (C, S, M), one noise precision per modality; marginals over the L labels, counts and
        weighted sums over the J design columns (sum_v P[x_v], e.g. the fraction sum).
    """
    sampler = psf_hidden_potts_gibbs(observations, observed, roi, beta, weights, prior,
                                     relative_precision, external_field, num_classes=num_classes,
                                     psf_fwhm_mm=psf_fwhm_mm, spacing_mm=spacing_mm, design=design,
                                     offset=offset)

    def summarise(state, info):
        return posterior_draw_summary(state.labels, state.mean.T, state.tau, info.label_switch,
                                      roi, count_weights, observations.dtype, design=design,
                                      num_labels=num_classes)

    return conjugate_gibbs_chains(key, sampler, initial_labels, summarise, num_chains=num_chains,
                                  num_sweeps=num_sweeps, burn_in=burn_in)
