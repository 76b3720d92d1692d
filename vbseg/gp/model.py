"""Gaussian-process fields on voxel grids, as NumPyro programs.

A field g on the grid has a zero-mean GP prior with a stationary kernel (Matern 1/2, 3/2, 5/2
or squared exponential, in mm; :mod:`vbseg.gp.kernels`), written in the whitened
(non-centred) parameterisation g = L eps, eps ~ N(0, I), with L the grid structure's square
root (circulant embedding: eps on the periodic torus; Kronecker: eps on the grid). Learned
hyperparameters get log-normal priors: the length-scale l (mm) and the amplitude a (the field's
marginal sd). Nothing here forms an N x N matrix: one evaluation costs O(N log N) (FFT) or
O(N sum_d n_d) (Kronecker).

**GP logit field** (:func:`gp_logit_model`). A latent field f = m + g gives the prior tumour
probability of each voxel, P(z_v = 1 | f) = sigmoid(f_v) (a spatially varying mixture, as in
Sanjay-Gopal & Hebert 1998, IEEE TIP 7:1014, with a GP prior on the mixing logits instead of
an MRF). The labels are summed out exactly, so each voxel of the volume of interest (VOI)
contributes

    log p(y_v | f_v, theta) = log( sigmoid(f_v) N(y_v | mu_1, 1/tau_1)
                                   + sigmoid(-f_v) N(y_v | mu_0, 1/tau_0) ),

with diagonal Gaussian emissions over the M modalities (each summed over the modalities
observed at v), one precision per modality shared by the classes (``tied``, as the Potts model
does) or one per class. Priors, on standardised intensities (y - median) / sd per modality:
mu_km ~ N(0, 10^2), tau ~ Gamma(1, 0.01) (weak, like the Potts fit's Normal-Gamma), the field's
mean m ~ N(m0, s0^2), l ~ LogNormal, a ~ LogNormal (:class:`FieldPrior`). Given f and theta,
the posterior label probability of voxel v is the responsibility

    r_v = sigmoid(f_v) N_1(y_v) / (sigmoid(f_v) N_1(y_v) + sigmoid(-f_v) N_0(y_v)).

**Prior logit (coarse to fine).** Optionally the field's mean carries a given per-voxel offset
ell (X, Y, Z), e.g. a CNN's tumour logits, with a learned non-negative weight gamma:

    f_v = m + gamma ell_v + g_v,   g ~ GP(0, k),   gamma ~ HalfNormal(1)

(``prior_logit_weight``). gamma = 1 takes the network's logits at face value, gamma < 1 tempers
an over-confident network, gamma ~ 0 ignores a useless one; what is left of the shape is the
GP's (g) and the data's. The half-normal puts its largest density at 0 (a useless network is
the null model, not a tail event) and keeps ~1/3 of its mass above 1 (an under-confident network
may be sharpened); a log-normal centred at 1 would give gamma = 0 zero density and pull log
gamma back towards 0 quadratically, so a pure-noise ell could only shrink to exp(-few sd).
Pure noise is penalised by the data alone: iid logit noise of variance gamma^2 var(ell) lowers
the expected log-likelihood of each voxel by ~gamma^2 var(ell) s_v (1 - s_v) / 2 (second order;
s_v the voxel's probability), a cost growing like N gamma^2 over the N VOI voxels, while the
first-order term is a zero-mean sum of size ~sqrt(N) gamma and the smooth g cannot absorb the
noise; the MAP of gamma then falls like 1 / sqrt(N). gamma is the inverse "temperature" of the
coarse-to-fine scheme (Platt-like scaling of the network's logits, learned inside the model).

**GP intensity field** (:func:`gp_intensity_field`). A zero-mean smooth field added to a class
mean: heterogeneous uptake inside a tumour (``intensity="tumour"``: added to class 1's mean in
the first modality) or an MR bias field (``intensity="all"``: added to every class's mean in the
first modality). It is a component any NumPyro program can call; :func:`gp_logit_model` uses
it, and :func:`gp_intensity_mixture_model` is a K-class mixture (labels summed out, Dirichlet
proportions) with such a field. Inside the hidden Potts model the same field is fitted by the
mean-field EM of :mod:`vbseg.potts.intensity_field` (``vbseg segment --intensity-field``).

Shapes: observations/observed (X, Y, Z, M); voi and prior_logit (X, Y, Z); class parameters
(K, M).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from vbseg.gp.kernels import KERNELS, STRUCTURES, embedding_shape, grid_structure
from vbseg.potts.model import gaussian_log_likelihood

INTENSITY_OPTIONS = (None, "tumour", "all")


@dataclasses.dataclass(frozen=True)
class GridGP:
    """Static description of a GP on a grid (hashable, so a model holding it can be a static
    argument of ``jax.jit``).

    Attributes:
        grid_shape: (n1, n2, n3). spacing_mm: voxel size per axis.
        kernel: one of :data:`~vbseg.gp.kernels.KERNELS`.
        structure: "fft" (isotropic kernel, circulant embedding) or "kronecker" (separable
            product kernel); see :mod:`vbseg.gp.kernels` for why they differ.
        embedding: the torus (m1, m2, m3) for "fft"; None: the minimal one, 2n - 1 rounded up.
    """

    grid_shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    kernel: str = "matern32"
    structure: str = "fft"
    embedding: tuple[int, int, int] | None = None

    def __post_init__(self):
        # tuples of Python numbers, so the description hashes by value (a jit cache key)
        object.__setattr__(self, "grid_shape", tuple(int(n) for n in self.grid_shape))
        object.__setattr__(self, "spacing_mm", tuple(float(h) for h in self.spacing_mm))
        if self.embedding is not None:
            object.__setattr__(self, "embedding", tuple(int(m) for m in self.embedding))
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r} (available: {', '.join(KERNELS)})")
        if self.structure not in STRUCTURES:
            raise ValueError(f"unknown structure {self.structure!r} (available: {', '.join(STRUCTURES)})")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        if self.structure == "kronecker":
            return tuple(self.grid_shape)
        return self.embedding or embedding_shape(self.grid_shape)

    def build(self, lengthscale_mm, amplitude):
        """The grid structure at these hyperparameters (no positive-definiteness check: under
        ``jax.jit`` the FFT square root clips negative eigenvalues, see ``negative_mass``)."""
        return grid_structure(self.structure, self.grid_shape, self.spacing_mm, self.kernel,
                              lengthscale_mm, amplitude, shape=self.latent_shape
                              if self.structure == "fft" else None, check=False)


@dataclasses.dataclass(frozen=True)
class FieldPrior:
    """Priors of one GP field: l ~ LogNormal(log lengthscale_median_mm, lengthscale_log_sd),
    a ~ LogNormal(log amplitude_median, amplitude_log_sd), and, for the logit field, its mean
    m ~ N(mean_loc, mean_scale^2). Defaults for the logit field: a 22 mm lesion is a few
    length-scales of 5-20 mm across; an amplitude of ~4 lets sigmoid(f) reach ~0.02 / 0.98 at
    two sd; the mean sits below 0 because the tumour is the smaller class of a lesion-centred
    VOI."""

    lengthscale_median_mm: float = 10.0
    lengthscale_log_sd: float = 0.5
    amplitude_median: float = 4.0
    amplitude_log_sd: float = 0.5
    mean_loc: float = -2.0
    mean_scale: float = 3.0

    def lengthscale_quantile(self, z: float = 1.96) -> float:
        """The length-scale z prior sd above the median (mm): sizes the FFT torus."""
        return self.lengthscale_median_mm * math.exp(z * self.lengthscale_log_sd)


# Emission priors on standardised intensities (weakly informative, as the Potts fit's).
CLASS_MEAN_SCALE = 10.0
PRECISION_SHAPE = 1.0
PRECISION_RATE = 0.01
# Prior scale of the prior-logit weight gamma ~ HalfNormal(scale) (module docstring).
PRIOR_LOGIT_WEIGHT_SCALE = 1.0
DEFAULT_INTENSITY_PRIOR = FieldPrior(lengthscale_median_mm=30.0, amplitude_median=0.5)


def gp_field(name: str, grid: GridGP, prior: FieldPrior):
    """Sample sites ``{name}_lengthscale`` (mm), ``{name}_amplitude`` and ``{name}_eps``
    (whitened, ``grid.latent_shape``, standard normal); returns (g (grid shape), structure)."""
    lengthscale = numpyro.sample(f"{name}_lengthscale", dist.LogNormal(
        math.log(prior.lengthscale_median_mm), prior.lengthscale_log_sd))
    amplitude = numpyro.sample(f"{name}_amplitude", dist.LogNormal(
        math.log(prior.amplitude_median), prior.amplitude_log_sd))
    eps = numpyro.sample(f"{name}_eps", dist.Normal(0.0, 1.0).expand(grid.latent_shape).to_event(3))
    structure = grid.build(lengthscale, amplitude)
    return structure.sqrt_matvec(eps), structure


def gp_intensity_field(grid: GridGP, prior: FieldPrior = DEFAULT_INTENSITY_PRIOR,
                       name: str = "intensity"):
    """A smooth zero-mean intensity field g ~ GP(0, k) on the grid (standardised units), to be
    added to class means. Sites ``{name}_lengthscale``, ``{name}_amplitude``, ``{name}_eps``.
    Returns g (grid shape).

    The field and the labels are only told apart by smoothness: give the length-scale a prior
    well above the lesion size. Measured: a bias ramp on a 28 mm sphere is recovered
    (correlation 0.997, labels 99.5 % right vs 95 % without the field) with a 60 mm prior
    median (tests/gp/test_gp.py); on the 22 mm PET sphere, ``intensity="tumour"`` with the 30 mm
    default let the tumour class absorb the PSF-blurred rim (Dice 0.57, volume x 2.5), so it is
    off by default in :func:`vbseg.gp.fit.fit_gp_logit`."""
    return gp_field(name, grid, prior)[0]


def _class_parameters(num_classes: int, num_modalities: int, tied: bool):
    tau_rows = 1 if tied else num_classes
    tau = numpyro.sample("tau", dist.Gamma(PRECISION_SHAPE, PRECISION_RATE)
                         .expand((tau_rows, num_modalities)).to_event(2))
    mu = numpyro.sample("mu", dist.Normal(0.0, CLASS_MEAN_SCALE)
                        .expand((num_classes, num_modalities)).to_event(2))
    return mu, jnp.broadcast_to(tau, (num_classes, num_modalities))


def class_log_likelihoods(observations, observed, mu, tau, intensity=None, intensity_classes=()):
    """log N(y_v | mu_k (+ g_v in the first modality for the classes in ``intensity_classes``),
    1/tau_k) summed over observed modalities: (X, Y, Z, K)."""
    log_lik = gaussian_log_likelihood(observations, observed, mu, tau)
    if intensity is None:
        return log_lik
    y0, seen = observations[..., 0], observed[..., 0]
    columns = []
    for k in range(mu.shape[0]):
        if k not in intensity_classes:
            columns.append(log_lik[..., k])
            continue
        plain = 0.5 * tau[k, 0] * ((y0 - mu[k, 0]) ** 2 - (y0 - mu[k, 0] - intensity) ** 2)
        columns.append(log_lik[..., k] + jnp.where(seen, plain, 0.0))
    return jnp.stack(columns, axis=-1)


def mixture_log_likelihood(logit, log_lik):
    """log(sigmoid(f) exp(ll_1) + sigmoid(-f) exp(ll_0)) per voxel, the labels summed out."""
    return jnp.logaddexp(jax.nn.log_sigmoid(logit) + log_lik[..., 1],
                         jax.nn.log_sigmoid(-logit) + log_lik[..., 0])


def responsibility(logit, log_lik):
    """P(z_v = 1 | f_v, y_v, theta) = sigmoid(f_v + ll_1 - ll_0), the exact label posterior."""
    return jax.nn.sigmoid(logit + log_lik[..., 1] - log_lik[..., 0])


@dataclasses.dataclass(frozen=True)
class GPLogitModel:
    """The GP logit-field model with its static settings; call it as a NumPyro program:
    ``model(observations, observed, voi)`` or, with a prior logit (an array argument, so one
    compiled program serves every map), ``model(observations, observed, voi, prior_logit)``.
    See :func:`gp_logit_model`. ``prior_logit_weight_scale``: the scale of gamma's half-normal
    prior (used only with a prior logit)."""

    grid: GridGP
    prior: FieldPrior = FieldPrior()
    tied: bool = True
    intensity: str | None = None
    intensity_grid: GridGP | None = None
    intensity_prior: FieldPrior = DEFAULT_INTENSITY_PRIOR
    prior_logit_weight_scale: float = PRIOR_LOGIT_WEIGHT_SCALE

    def __post_init__(self):
        if self.intensity not in INTENSITY_OPTIONS:
            raise ValueError(f"intensity must be one of {INTENSITY_OPTIONS}, got {self.intensity!r}")
        if not self.prior_logit_weight_scale > 0:
            raise ValueError(f"prior_logit_weight_scale must be > 0, got {self.prior_logit_weight_scale!r}")

    def __call__(self, observations, observed, voi, prior_logit=None):
        return gp_logit_model(observations, observed, voi, prior_logit, config=self)


def gp_logit_model(observations, observed, voi, prior_logit=None, *, config: GPLogitModel) -> None:
    """GP logit-field model (module docstring) as a NumPyro program.

    Sample sites: ``field_lengthscale`` (mm), ``field_amplitude``, ``field_mean`` (scalar),
    ``field_eps`` (``config.grid.latent_shape``, whitened), ``tau`` ((1, M) tied or (2, M)),
    ``mu`` (2, M); with ``config.intensity`` also ``intensity_lengthscale``,
    ``intensity_amplitude``, ``intensity_eps``; with ``prior_logit`` also
    ``prior_logit_weight`` gamma (scalar, HalfNormal(``config.prior_logit_weight_scale``)).
    Deterministic: ``logit`` f = m (+ gamma ell) + g (X, Y, Z) and ``class_log_lik``
    (X, Y, Z, 2). Factor ``y``: the sum over VOI voxels of the mixture log-likelihood (labels
    summed out). Without ``prior_logit`` the program is the plain GP logit field (the same
    sites and the same density as before the offset existed).

    Args:
        observations: (X, Y, Z, M) standardised images. observed: (X, Y, Z, M) bool, where each
            modality is observed. voi: (X, Y, Z) bool, the voxels that carry a label.
        prior_logit: optional (X, Y, Z) float offset ell, the prior logit of class 1 (e.g. a
            CNN's tumour logits); its values outside the VOI do not matter.
        config: the grid, kernel, structure, priors and options.
    """
    num_modalities = observations.shape[-1]
    mean = numpyro.sample("field_mean", dist.Normal(config.prior.mean_loc, config.prior.mean_scale))
    deviation, _ = gp_field("field", config.grid, config.prior)
    if prior_logit is not None:
        weight = numpyro.sample("prior_logit_weight", dist.HalfNormal(config.prior_logit_weight_scale))
        mean = mean + weight * prior_logit
    logit = numpyro.deterministic("logit", mean + deviation)
    mu, tau = _class_parameters(2, num_modalities, config.tied)
    intensity = None
    if config.intensity is not None:
        intensity = gp_intensity_field(config.intensity_grid or config.grid, config.intensity_prior)
    classes = (1,) if config.intensity == "tumour" else (0, 1)
    log_lik = numpyro.deterministic("class_log_lik", class_log_likelihoods(
        observations, observed, mu, tau, intensity, classes))
    numpyro.factor("y", jnp.sum(jnp.where(voi, mixture_log_likelihood(logit, log_lik), 0.0)))


@dataclasses.dataclass(frozen=True)
class GPIntensityMixtureModel:
    """K-class mixture (labels summed out) with a GP intensity field; see
    :func:`gp_intensity_mixture_model`. Call as ``model(observations, observed, voi)``."""

    grid: GridGP
    num_classes: int = 2
    field_classes: tuple[int, ...] = (0, 1)
    prior: FieldPrior = DEFAULT_INTENSITY_PRIOR
    tied: bool = True
    concentration: float = 1.0

    def __call__(self, observations, observed, voi):
        return gp_intensity_mixture_model(observations, observed, voi, config=self)


def gp_intensity_mixture_model(observations, observed, voi, *,
                               config: GPIntensityMixtureModel) -> None:
    """y_v | z_v = k ~ N(mu_k + g_v [k in field_classes, first modality], 1/tau_k), z_v ~ pi
    independently (summed out), pi ~ Dirichlet(concentration), g ~ GP (:func:`gp_intensity_field`):
    a bias-field-corrected mixture (all classes) or a mixture with heterogeneous uptake in some.

    Sites: ``pi`` (K,), ``tau``, ``mu`` (K, M), ``intensity_lengthscale``,
    ``intensity_amplitude``, ``intensity_eps``; deterministic ``intensity`` g and
    ``class_log_lik`` (X, Y, Z, K); factor ``y``.
    """
    k = config.num_classes
    pi = numpyro.sample("pi", dist.Dirichlet(jnp.full(k, config.concentration)))
    mu, tau = _class_parameters(k, observations.shape[-1], config.tied)
    g = numpyro.deterministic("intensity", gp_intensity_field(config.grid, config.prior))
    log_lik = numpyro.deterministic("class_log_lik", class_log_likelihoods(
        observations, observed, mu, tau, g, config.field_classes))
    per_voxel = jax.scipy.special.logsumexp(log_lik + jnp.log(pi), axis=-1)
    numpyro.factor("y", jnp.sum(jnp.where(voi, per_voxel, 0.0)))
