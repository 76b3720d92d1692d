"""The scanner point-spread function as a linear operator on a voxel crop.

PET images are the activity blurred by the scanner's PSF, well described by an isotropic
Gaussian of known FWHM (a property of scanner and reconstruction; NEMA NU-2 measures it).
Labels (and so activity) are modelled only on a support S (the volume of interest), so on
the grid the blur is written H' = D^{-1} H 1_S: H is the separable Gaussian convolution with
zero padding (symmetric, so H^T = H), 1_S zeroes what lies outside the support, and
D = diag(H 1_S) renormalises the kernel weight that falls outside it; this amounts to assuming
the activity just outside the VOI resembles that just inside it. Then

    apply(x)              = H (1_S x) / d,
    adjoint(u)            = 1_S H (u / d),          (H'^T u)
    adjoint_squared(u)    = 1_S H_2 (u / d^2),      (sum_v h'_vw^2 u_v; H_2 = kernel squared)

All operate on the first three axes of arrays with any trailing (channel) axes. A FWHM of 0
gives the identity.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
TRUNCATE_SIGMAS = 3.0
# --pet-noise: how the PET noise of the PSF likelihood varies: variance proportional to the
# local mean ("poisson") or constant
PET_NOISE_MODELS = ("poisson", "constant")


def gaussian_kernels(fwhm_mm: float, spacing_mm) -> tuple[np.ndarray, ...]:
    """Normalised 1D Gaussian kernels per array axis, truncated at 3 sigma (odd lengths).

    A zero FWHM gives the kernel [1] on every axis.
    """
    kernels = []
    for spacing in np.asarray(spacing_mm, float):
        sigma = fwhm_mm * FWHM_TO_SIGMA / spacing
        if sigma <= 0:
            kernels.append(np.ones(1, np.float32))
            continue
        radius = max(1, int(math.ceil(TRUNCATE_SIGMAS * sigma)))
        offsets = np.arange(-radius, radius + 1, dtype=np.float64)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        kernels.append((kernel / kernel.sum()).astype(np.float32))
    return tuple(kernels)


def convolve(x, kernels) -> jnp.ndarray:
    """Separable zero-padded convolution of x over axes 0, 1, 2 with symmetric 1D kernels."""
    for axis, kernel in enumerate(kernels):
        radius = (len(kernel) - 1) // 2
        if radius == 0:
            x = x * float(kernel[0])
            continue
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(x, pad)
        n = x.shape[axis]
        total = jnp.zeros_like(x)
        for offset, weight in enumerate(kernel):
            index = [slice(None)] * x.ndim
            index[axis] = slice(offset, offset + n)
            total = total + float(weight) * padded[tuple(index)]
        x = total
    return x


class BlurOperator(NamedTuple):
    """H' = D^{-1} H 1_S (see module doc). ``support`` (X, Y, Z) 0/1, ``norm`` d = H 1_S."""

    kernels: tuple
    squared_kernels: tuple
    support: jnp.ndarray
    norm: jnp.ndarray

    @staticmethod
    def _expand(values, ndim):
        return values.reshape(values.shape + (1,) * (ndim - 3))

    def apply(self, x):
        support, norm = self._expand(self.support, x.ndim), self._expand(self.norm, x.ndim)
        return convolve(x * support, self.kernels) / norm

    def adjoint(self, u):
        support, norm = self._expand(self.support, u.ndim), self._expand(self.norm, u.ndim)
        return support * convolve(u / norm, self.kernels)

    def adjoint_squared(self, u):
        support, norm = self._expand(self.support, u.ndim), self._expand(self.norm, u.ndim)
        return support * convolve(u / norm**2, self.squared_kernels)


def blur_operator(fwhm_mm: float, spacing_mm, support) -> BlurOperator:
    """The renormalised Gaussian blur of given FWHM (mm) restricted to ``support`` (X, Y, Z)."""
    kernels = gaussian_kernels(fwhm_mm, spacing_mm)
    squared = tuple((k.astype(np.float64) ** 2).astype(np.float32) for k in kernels)
    support = jnp.asarray(support).astype(jnp.result_type(float))
    # voxels with no support within reach get norm 1 (their value is 0 and never observed)
    norm = convolve(support, kernels)
    norm = jnp.where(norm > 0, norm, 1.0)
    return BlurOperator(kernels, squared, support, norm)
