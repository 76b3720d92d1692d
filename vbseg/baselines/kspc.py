"""Kernel-smoothing probability contours (KsPC): a published baseline for probability contours.

After Zhang & Ray, "From coarse to fine: a deep 3D probability volume contours framework for
tumour segmentation and dose painting in PET images", Frontiers in Radiology 2023,
doi:10.3389/fradi.2023.1225215, as we read it. Within the volume of interest (VOI) the
background-subtracted uptake is treated as an unnormalised spatial density, smoothed, and
summarised by its highest-density regions (HDRs):

    u(v) = max(y(v) - b, 0)                       b: background, the VOI median of the PET
    f    = G_H * u                                Gaussian kernel, per-axis bandwidth H (mm)
    d(v) = f(v) / sum_{w in VOI} f(w)             a probability mass function over VOI voxels
    M(v) = sum_{w : d(w) >= d(v)} d(w)            mass of the HDR whose boundary passes through v
    p(v) = 1 - M(v)

HDR(m), the smallest region holding mass m, is {v : M(v) <= m} up to one level set of d (the
voxels tied at the boundary density), so {p >= 0.9} = HDR(0.1) (the hot core) and
{p >= 0.1} = HDR(0.9); the contours are nested by construction, like every other model's. p is
not a probability that a voxel is tumour: it ranks voxels by smoothed uptake, and HDR(m) holds
the fraction m of the (background-subtracted) activity. That is the sense in which KsPC
contours are "probability" contours, and why vbseg reports them as a baseline.

Bandwidth (the paper selects it by a plug-in rule; we use the normal-reference rule, which is
the AMISE-optimal bandwidth when the density is Gaussian; Silverman 1986, Density Estimation,
eq. 4.14; Wand & Jones 1995, ch. 4): per axis i,

    h_i = sigma_i (4 / ((d + 2) n))^(1 / (d + 4)),   d = 3,

sigma_i the uptake-weighted standard deviation of the voxel-centre coordinates (mm) along axis
i, and n the effective number of points of the weights, (sum u)^2 / sum u^2 (Kish 1965). A
bandwidth in mm may be given instead.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DIMENSIONS = 3


def normal_reference_bandwidth(points_mm: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Per-axis normal-reference bandwidth (mm) of weighted points (N, D): the AMISE-optimal
    Gaussian-kernel bandwidth of a Gaussian density with the points' weighted covariance
    diagonal, n taken as the weights' effective sample size."""
    points = np.asarray(points_mm, np.float64)
    w = np.ones(len(points)) if weights is None else np.asarray(weights, np.float64)
    total = w.sum()
    mean = (w[:, None] * points).sum(axis=0) / total
    sigma = np.sqrt((w[:, None] * (points - mean) ** 2).sum(axis=0) / total)
    n_eff = total**2 / np.sum(w**2)
    d = points.shape[1]
    return sigma * (4.0 / ((d + 2) * n_eff)) ** (1.0 / (d + 4))


def hdr_mass_map(density: np.ndarray, voi: np.ndarray) -> np.ndarray:
    """M(v) = total mass of VOI voxels whose density is >= d(v) (ties share one M); 1 outside."""
    values = density[voi].astype(np.float64)
    values = values / values.sum()
    order = np.argsort(-values, kind="stable")
    cumulative = np.cumsum(values[order])
    sorted_values = values[order]
    # a level set of tied densities shares the mass of the whole set
    last_of_tie = np.searchsorted(-sorted_values, -sorted_values, side="right") - 1
    mass = np.empty_like(values)
    mass[order] = cumulative[last_of_tie]
    out = np.ones(density.shape, np.float64)
    out[voi] = np.minimum(mass, 1.0)
    return out


def kspc_map(pet: np.ndarray, voi: np.ndarray, spacing_mm, *, bandwidth_mm=None) -> tuple[np.ndarray, dict]:
    """KsPC map p = 1 - M over the VOI (0 outside) and its parameters (module docstring).

    Args:
        pet: (X, Y, Z) PET values; voi: (X, Y, Z) bool; spacing_mm: voxel size (3,).
        bandwidth_mm: per-axis (3,) or scalar Gaussian-kernel sd in mm; None: normal reference.
    """
    voi = np.asarray(voi, bool)
    spacing = np.asarray(spacing_mm, np.float64)
    background = float(np.median(pet[voi]))
    uptake = np.where(voi, np.maximum(pet.astype(np.float64) - background, 0.0), 0.0)
    if not np.any(uptake > 0):  # a flat VOI: nothing above background, every voxel ties
        return np.where(voi, 0.0, 0.0).astype(np.float32), {"background": background,
                                                             "bandwidth_mm": None}
    if bandwidth_mm is None:
        index = np.nonzero(uptake > 0)
        points = np.stack(index, axis=1) * spacing
        bandwidth = normal_reference_bandwidth(points, uptake[index])
        rule = "normal reference (AMISE-optimal for a Gaussian density), Kish effective n"
    else:
        bandwidth = np.broadcast_to(np.asarray(bandwidth_mm, np.float64), (DIMENSIONS,))
        rule = "given"
    # outside the VOI the uptake is zero (mode constant): mass does not leak in from outside
    smoothed = ndimage.gaussian_filter(uptake, sigma=bandwidth / spacing, mode="constant", truncate=4.0)
    smoothed = np.where(voi, smoothed, 0.0)
    mass = hdr_mass_map(smoothed, voi)
    probability = np.where(voi, 1.0 - mass, 0.0).astype(np.float32)
    return probability, {"background": background, "bandwidth_mm": bandwidth.tolist(),
                         "bandwidth_rule": rule}
