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


# --noise-fwhm: the whitening filter's gain is capped here; where the noise kernel's transfer
# function falls below 1 / MAX_WHITENING_GAIN (the highest frequencies of a noise kernel wider
# than about a voxel) the noise is left partly correlated rather than amplified without bound
MAX_WHITENING_GAIN = 20.0


def signal_fwhm(psf_fwhm_mm: float, noise_fwhm_mm: float | None) -> float:
    """The blur left on the activity once the image is whitened (:func:`whiten`): Gaussians
    compose by adding variances, so the scanner's PSF of FWHM F is the noise kernel's N
    followed by one of sqrt(F^2 - N^2)."""
    if not noise_fwhm_mm:
        return float(psf_fwhm_mm)
    return float(math.sqrt(max(psf_fwhm_mm**2 - noise_fwhm_mm**2, 0.0)))


def neighbour_correlation(fwhm_mm: float, spacing_mm: float) -> float:
    """The correlation of neighbours along an axis of ``spacing_mm`` for white noise blurred by
    the kernel of :func:`gaussian_kernels` of ``fwhm_mm``: sum_k g_k g_k+1 / sum_k g_k^2."""
    kernel = gaussian_kernels(fwhm_mm, (spacing_mm,))[0].astype(np.float64)
    return float(np.dot(kernel[1:], kernel[:-1]) / np.dot(kernel, kernel))


def noise_sd_gain(noise_fwhm_mm: float | None, spacing_mm) -> float:
    """The sd of white noise of unit sd blurred by the noise kernel (sqrt of the sum of its
    squared weights): a whitened image's noise sd times this is the measured image's."""
    if not noise_fwhm_mm:
        return 1.0
    return float(np.sqrt(np.prod([np.sum(k.astype(np.float64) ** 2)
                                  for k in gaussian_kernels(noise_fwhm_mm, spacing_mm)])))


def noise_fwhm_from_correlation(rho: float, spacing_mm: float) -> float:
    """The noise kernel's FWHM (mm) whose neighbour correlation (:func:`neighbour_correlation`)
    along an axis of ``spacing_mm`` is ``rho`` (measured in a uniform region), by bisection;
    0 for rho <= 0 (white or anti-correlated noise: nothing to whiten). For ``--noise-fwhm``."""
    if rho <= 0:
        return 0.0
    if not rho < 1:
        raise ValueError(f"a neighbour correlation must be below 1, got {rho!r}")
    low, high = 0.0, spacing_mm
    while neighbour_correlation(high, spacing_mm) < rho:
        low, high = high, 2 * high
    for _ in range(60):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if neighbour_correlation(middle, spacing_mm) < rho else (low, middle)
    return 0.5 * (low + high)


def whitening_text(psf_fwhm_mm, noise_fwhm_mm) -> str:
    """What summary.json says of ``--noise-fwhm`` ("" without it)."""
    if not noise_fwhm_mm:
        return ""
    return (f"; PET whitened for noise correlated by a Gaussian kernel of FWHM {noise_fwhm_mm:g} mm "
            f"and fitted with the rest of the PSF, FWHM {signal_fwhm(psf_fwhm_mm, noise_fwhm_mm):.3g} mm")


def _transfer(kernel: np.ndarray, length: int, half: bool) -> np.ndarray:
    """The DFT (real: the kernel is symmetric) of a 1D kernel centred at index 0 of a periodic
    signal of ``length``: all ``length`` frequencies, or the rfft's half with ``half``."""
    radius = (len(kernel) - 1) // 2
    line = np.zeros(length, np.float64)
    for offset, weight in zip(range(-radius, radius + 1), kernel):
        line[offset % length] += weight
    return (np.fft.rfft(line) if half else np.fft.fft(line)).real


def whiten(image, observed, spacing_mm, noise_fwhm_mm: float) -> np.ndarray:
    """The image with its noise's spatial correlation undone: (X, Y, Z) float32.

    Reconstructed PET noise is not white: the reconstruction and its post-filter correlate
    neighbouring voxels, which a likelihood of independent voxels reads as signal (a blob of
    noise at a boundary looks like a partial-volume ramp) and over-counts as evidence.
    Modelling the noise as white noise blurred by a Gaussian kernel N (FWHM ``noise_fwhm_mm``,
    the kernels of :func:`gaussian_kernels`), the image N^{-1} y has white noise and its
    activity blurred by the rest of the PSF (:func:`signal_fwhm`): the prewhitening of
    generalised least squares, with the Gaussian noise kernel of smoothed images as in Worsley
    and Friston (NeuroImage 2:173, 1995). N^{-1} is applied in Fourier space on the image
    mirrored at its far faces (so nothing wraps around), its gain capped at
    MAX_WHITENING_GAIN. Unobserved voxels take the observed mean first and are returned as
    they were; a zero FWHM returns the image unchanged.
    """
    image = np.asarray(image, np.float64)
    if not noise_fwhm_mm:
        return image.astype(np.float32)
    observed = np.asarray(observed, bool)
    filled = np.where(observed, image, image[observed].mean() if observed.any() else 0.0)
    mirrored = np.pad(filled, [(0, n) for n in filled.shape], mode="symmetric")
    spectrum = np.fft.rfftn(mirrored)
    transfer = np.ones(spectrum.shape)
    for axis, kernel in enumerate(gaussian_kernels(noise_fwhm_mm, spacing_mm)):
        line = _transfer(kernel.astype(np.float64), mirrored.shape[axis], half=axis == 2)
        transfer = transfer * line.reshape([-1 if a == axis else 1 for a in range(3)])
    transfer = np.maximum(transfer, 1.0 / MAX_WHITENING_GAIN)
    white = np.fft.irfftn(spectrum / transfer, s=mirrored.shape, axes=(0, 1, 2))[
        : image.shape[0], : image.shape[1], : image.shape[2]]
    return np.where(observed, white, image).astype(np.float32)
