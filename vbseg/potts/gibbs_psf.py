"""Reference sampler for the hidden Potts model with a PSF-blurred likelihood.

Model as in :mod:`vbseg.potts.meanfield_psf`: y_m = H'_m mu_{z, m} + noise of precision
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
:func:`~vbseg.potts.meanfield_psf.regression_update`, where the expected Gram matrix is
exact); class proportions stay uniform, as in the PSF fit. Classes are renamed by increasing
mean in the first modality after each sweep (the posterior is symmetric under renaming).

The sampler is a blackjax-style kernel (:func:`psf_hidden_potts_gibbs`: ``init``, ``step``) run
by the shared chain driver of :mod:`vbseg.inference.chains`, as the other Gibbs samplers are.

**Level designs** (the partial-volume model): with a design P (L, J) and per-voxel offsets o
(:mod:`vbseg.potts.meanfield_psf`, "Level designs"), level k of voxel v has the unblurred
mean (P_k + o_v) . mu_m, and Delta_m(v, k) above holds with mu_km - mu_cm replaced by the
difference of those level means; the coupling may be an (L, L) interaction matrix, and the
regression draw uses the design rows of the current labels. No renaming then (the level prior
and the start pin the columns' meaning).

**Cost: local updates.** A sweep does not blur the whole grid per colour. The residual
r = y - H' mu_z is computed once per sweep (one blur per modality; the class means change
with each parameter draw) and then kept current: in the grid padded by R + 1 before and R
after on every axis, flattened, a colour's voxels are listed in a table (padded with a dummy
voxel, :func:`colour_tables`), A_v = S_v sum_u h(u - v) (w r / d)_u is a gathered window of
the separable kernel around each of them, and after the draw the residual in each window is
corrected by -h(u - v) S_v Delta_v / d_u (the windows of one colour are disjoint, so the
scatter-add has no conflicts). The prior term gathers the neighbours' labels the same way. A
colour then costs O(n_c K) for n_c voxels and a K-voxel kernel, a sweep O(N K) instead of
O(colours x N x K) (e.g. 175 colours for a 6 mm PSF on 4 x 4 x 3 mm voxels). The draws are
those of the sampler with full-grid blurs per colour (the same conditionals; tested against
enumeration), only cheaper: pv-potts's 100 draws on a 22 mm sphere's 18 x 18 x 24 crop took
4.5 s instead of 36-75 s on 2 shared cores (``benchmarks/bench_pv.py``).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vbseg.inference.chains import SamplingAlgorithm
from vbseg.potts.gibbs import (
    GibbsResult,
    LabelSwitchInfo,
    conjugate_gibbs_chains,
    order_classes,
    posterior_draw_summary,
)
from vbseg.potts.meanfield_psf import regression_update
from vbseg.potts.model import NormalGammaPrior, coupling_field, neighbour_offsets
from vbseg.potts.psf import blur_operator, gaussian_kernels


def colour_strides(psf_fwhm_mm, spacing_mm) -> tuple[int, int, int]:
    """Per-axis stride 2R + 1 (R the largest PSF kernel radius over modalities, at least 1)."""
    radius = np.ones(3, int)
    for fwhm in psf_fwhm_mm:
        for axis, kernel in enumerate(gaussian_kernels(float(fwhm), spacing_mm)):
            radius[axis] = max(radius[axis], (len(kernel) - 1) // 2)
    return tuple(int(2 * r + 1) for r in radius)


def colour_codes(shape, psf_fwhm_mm, spacing_mm) -> np.ndarray:
    """The colour of every voxel (X, Y, Z) int: its position modulo the strides, one integer
    (an axis shorter than its stride gives every voxel along it its own colour already)."""
    strides = [min(s, n) for s, n in zip(colour_strides(psf_fwhm_mm, spacing_mm), shape)]
    index = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return ((index[0] % strides[0]) * strides[1] + index[1] % strides[1]) * strides[2] \
        + index[2] % strides[2]


class LocalGrid(NamedTuple):
    """The padded flat layout of the local sweep (module doc): every axis padded by R + 1 before
    and R after (R the largest kernel radius; the extra voxel before holds the dummy entry of
    the colour tables). ``pad`` ((before, after) per axis), ``to_flat`` (X * Y * Z,) the flat
    index of each voxel, ``dummy`` the dummy's flat index, ``neighbours`` (D,) flat offsets of
    the Potts neighbours (both directions of each pair offset)."""

    pad: tuple
    padded: tuple
    to_flat: np.ndarray
    dummy: int
    neighbours: np.ndarray


def local_grid(shape, psf_fwhm_mm, spacing_mm, num_weights: int) -> LocalGrid:
    radius = [(s - 1) // 2 for s in colour_strides(psf_fwhm_mm, spacing_mm)]
    pad = tuple((r + 1, r) for r in radius)
    padded = tuple(n + 2 * r + 1 for n, r in zip(shape, radius))
    index = np.meshgrid(*[np.arange(n) + r + 1 for n, r in zip(shape, radius)], indexing="ij")
    to_flat = np.ravel_multi_index(tuple(index), padded).ravel()
    dummy = int(np.ravel_multi_index(tuple(radius), padded))
    steps = np.array([padded[1] * padded[2], padded[2], 1])
    half = [int(np.dot(d, steps)) for d in neighbour_offsets(6 if num_weights == 3 else 26)]
    return LocalGrid(pad, padded, to_flat, dummy, np.asarray(half + [-h for h in half]))


def window(kernels, padded) -> tuple[np.ndarray, np.ndarray]:
    """(flat offsets (K,), weights (K,)) of a separable kernel's window in the padded layout."""
    radius = [(len(k) - 1) // 2 for k in kernels]
    steps = np.meshgrid(*[np.arange(-r, r + 1) for r in radius], indexing="ij")
    flat = steps[0] * padded[1] * padded[2] + steps[1] * padded[2] + steps[2]
    weight = kernels[0][:, None, None] * kernels[1][None, :, None] * kernels[2][None, None, :]
    return flat.ravel(), weight.ravel().astype(np.float32)


def colour_tables(roi, codes, grid: LocalGrid) -> tuple[jax.Array, jax.Array]:
    """(index (C, n) flat padded indices of the ROI voxels of each colour, the dummy where a
    colour has fewer than n, the most voxels any colour of the grid holds; valid (C, n) bool)."""
    size = int(np.bincount(codes.ravel()).max())
    codes_flat = jnp.asarray(codes.ravel())
    roi_flat = jnp.asarray(roi).ravel()
    to_flat = jnp.asarray(grid.to_flat)

    def one(colour):
        position = jnp.nonzero(roi_flat & (codes_flat == colour), size=size, fill_value=-1)[0]
        valid = position >= 0
        return jnp.where(valid, to_flat[position], grid.dummy), valid

    return jax.vmap(one)(jnp.arange(int(codes.max()) + 1))


def flat_padded(x, grid: LocalGrid, fill=0):
    """(X, Y, Z, ...) -> (P, ...) in the padded flat layout."""
    padded = jnp.pad(x, grid.pad + ((0, 0),) * (x.ndim - 3), constant_values=fill)
    return padded.reshape((-1,) + x.shape[3:])


def from_flat_padded(x, grid: LocalGrid, shape):
    """(P, ...) -> (X, Y, Z, ...), the inverse of :func:`flat_padded`."""
    x = x.reshape(grid.padded + x.shape[1:])
    return x[tuple(slice(b, b + n) for (b, _), n in zip(grid.pad, shape))]


class LocalSweep(NamedTuple):
    """What the local sweep needs besides the state, built once per kernel: the layout
    ``grid``, ``tables`` (index, valid) of :func:`colour_tables`, per blurred modality its
    ``windows`` (offsets, kernel weights) and, in the padded flat layout, ``scaled_weights``
    w / d, ``inverse_norm`` 1 / d and ``c_terms``; ``support`` and ``roi_flat`` the ROI (float,
    bool), ``log_prior`` (P, L), ``edge_weights`` (D,); ``observations`` (X, Y, Z, M),
    ``roi`` (X, Y, Z) and the blur ``operators`` for the per-sweep residual."""

    grid: LocalGrid
    tables: tuple
    windows: tuple
    scaled_weights: tuple
    inverse_norm: tuple
    c_terms: tuple
    support: jax.Array
    roi_flat: jax.Array
    log_prior: jax.Array
    edge_weights: jax.Array
    observations: jax.Array
    roi: jax.Array
    operators: tuple


def _label_sweep(key, labels, mean, tau, setup: LocalSweep, beta, rows):
    """One sweep over all colours, each colour's voxels drawn at once from gathered windows
    (module doc, "Cost"); returns the new labels (X, Y, Z). ``rows(m)``: the design rows per
    level, (L, J) or per voxel and level (X, Y, Z, L, J) (module doc, "Level designs")."""
    grid, tables, windows = setup.grid, setup.tables, setup.windows
    num_levels = setup.log_prior.shape[-1]
    dtype = setup.log_prior.dtype
    roi = setup.roi
    level_means, residuals = [], []
    for m, operator in enumerate(setup.operators):
        level_mean = jnp.broadcast_to(rows(m) @ mean[m], labels.shape + (num_levels,))
        current = jnp.take_along_axis(level_mean, labels[..., None], axis=-1)[..., 0]
        residuals.append(flat_padded(setup.observations[..., m] - operator.apply(current * roi),
                                     grid))
        level_means.append(flat_padded(level_mean, grid))
    support = setup.support

    def colour_step(carry, colour):
        labels_f, residuals = carry
        index, valid = tables[0][colour], tables[1][colour]
        now = labels_f[index]
        around = index[:, None] + grid.neighbours[None, :]
        onehot = (jax.nn.one_hot(labels_f[around], num_levels, dtype=dtype)
                  * setup.roi_flat[around][..., None])
        logits = setup.log_prior[index] + coupling_field(
            jnp.einsum("ndl,d->nl", onehot, setup.edge_weights), beta)
        currents = []
        for m, ((offsets, kernel), residual) in enumerate(zip(windows, residuals)):
            inside = index[:, None] + offsets[None, :]
            level_mean = level_means[m][index]  # (n, L)
            current = jnp.take_along_axis(level_mean, now[:, None], axis=1)[:, 0]
            a_term = support[index] * jnp.sum(kernel * setup.scaled_weights[m][inside]
                                               * residual[inside], axis=1)
            step = level_mean - current[:, None]
            logits = logits + tau[m] * (step * a_term[:, None]
                                        - 0.5 * step**2 * setup.c_terms[m][index][:, None])
            currents.append((inside, level_mean, current))
        gumbel = jax.random.gumbel(jax.random.fold_in(key, colour), logits.shape, dtype)
        new = jnp.where(valid, jnp.argmax(logits + gumbel, -1), now)
        updated = []
        for m, ((inside, level_mean, current), residual) in enumerate(zip(currents, residuals)):
            change = (jnp.take_along_axis(level_mean, new[:, None], axis=1)[:, 0] - current) \
                * support[index]
            updated.append(residual.at[inside].add(
                -windows[m][1] * setup.inverse_norm[m][inside] * change[:, None]))
        return (labels_f.at[index].set(new), tuple(updated)), None

    (labels_f, _), _ = jax.lax.scan(colour_step, (flat_padded(labels, grid), tuple(residuals)),
                                    jnp.arange(tables[0].shape[0]))
    return from_flat_padded(labels_f, grid, labels.shape)


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
    :class:`~vbseg.potts.gibbs.LabelSwitchInfo`. ``num_classes`` is the number of labels
    (levels L with a ``design`` (L, J); ``offset`` (X, Y, Z, M, J) or None)."""
    dtype = observations.dtype
    observed_f = (observed & roi[..., None]).astype(dtype)
    weights_obs = observed_f * relative_precision.astype(dtype)
    operators = [blur_operator(f, spacing_mm, roi) for f in psf_fwhm_mm]
    log_prior = (jnp.full(roi.shape + (num_classes,), -jnp.log(num_classes), dtype)
                 + (0.0 if external_field is None else external_field))
    grid = local_grid(roi.shape, psf_fwhm_mm, spacing_mm, weights.shape[0])
    codes = colour_codes(roi.shape, psf_fwhm_mm, spacing_mm)
    setup = LocalSweep(
        grid, colour_tables(roi, codes, grid),
        tuple(window(op.kernels, grid.padded) for op in operators),
        tuple(flat_padded(weights_obs[..., m] / op.norm, grid) for m, op in enumerate(operators)),
        tuple(flat_padded(1.0 / op.norm, grid) for op in operators),
        tuple(flat_padded(op.adjoint_squared(weights_obs[..., m]), grid)
              for m, op in enumerate(operators)),
        flat_padded(roi.astype(dtype), grid), flat_padded(roi, grid, False),
        flat_padded(log_prior, grid), jnp.concatenate([weights, weights]).astype(dtype),
        observations, roi, tuple(operators))

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
        labels = _label_sweep(label_key, state.labels, state.mean, state.tau, setup, beta, rows)
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
        :class:`~vbseg.potts.gibbs.GibbsResult` with means (C, S, J, M) and precisions
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
