"""Clinical PET read-outs of a contour: SUVmax, SUVpeak, SUVmean, MTV and TLG.

For a contour C (a set of voxels) on a PET image in SUV with voxel volume dV (mL):

* SUVmax = max_{v in C} SUV_v.
* SUVmean = (1/|C|) sum_{v in C} SUV_v.
* MTV = |C| dV (mL), the metabolic tumour volume.
* TLG = SUVmean x MTV = dV sum_{v in C} SUV_v (SUV mL), total lesion glycolysis.
* SUVpeak = max_{v in C} (mean SUV over the voxels whose centres lie within 6.2 mm of v's
  centre): the mean uptake in a 1 mL sphere (4/3 pi 0.62^3 cm^3 = 1.0 mL) centred at the
  hottest position in the lesion (PERCIST 1.0, Wahl, Jacene, Kasamon & Lodge, J Nucl Med
  2009;50:122S-150S; EANM/EARL practice). Rules here: a voxel belongs to the sphere when its
  centre is inside it (centre-in-sphere; no partial-volume weights), distances are in mm
  from the voxel spacing (column norms of the affine; the axes are taken as orthogonal); the
  sphere's centre is a voxel centre inside C, while the sphere itself may reach outside C
  (PERCIST lets the peak sphere be placed anywhere in the lesion, and 1 mL may exceed a
  small lesion); voxels of the sphere outside the image are left out of the mean.

Each is deterministic given the contour; a contour may hold several regions (the lesion
and other uptake), so each level also reports its largest connected region alone. The
posterior over the tumour region (its draws of volume and of sum SUV dV) gives intervals for
MTV, TLG and SUVmean = TLG / MTV per draw.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PEAK_RADIUS_MM = 6.2  # radius of a 1 mL sphere: (3 / (4 pi))^(1/3) cm = 0.6204 cm

SUVPEAK_DEFINITION = (
    "max over voxel centres inside the contour of the mean SUV of the voxels whose centres lie "
    f"within {PEAK_RADIUS_MM} mm (a 1 mL sphere; PERCIST 1.0, Wahl et al. J Nucl Med "
    "2009;50:122S) in mm from the voxel spacing; the sphere may extend outside the contour; "
    "voxels outside the image are left out of the mean"
)
READOUT_UNITS = {"suvmax": "SUV", "suvpeak": "SUV", "suvmean": "SUV", "mtv_ml": "mL",
                 "tlg": "SUV mL", "voxels": "count"}
POSTERIOR_NOTE = (
    "intervals over the posterior of the tumour region (the volume draws, volume_ml.method): "
    "mtv_ml from the volume draws, tlg from the draws of sum SUV x voxel volume, suvmean = "
    "tlg / mtv_ml per draw (draws with zero volume left out); the per-level values are "
    "deterministic given each contour, SUVmax and SUVpeak included"
)


def sphere_kernel(spacing_mm, radius_mm: float = PEAK_RADIUS_MM) -> np.ndarray:
    """Weights (odd shape, sum 1) of the voxels whose centres lie within ``radius_mm`` of the
    central voxel's centre, with voxel spacing ``spacing_mm`` (3,) in mm."""
    spacing = np.asarray(spacing_mm, np.float64)
    half = np.floor(radius_mm / spacing).astype(int)
    offsets = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    inside = sum(o ** 2 for o in offsets) <= radius_mm ** 2 * (1 + 1e-9)
    return inside / inside.sum()


def peak_map(image, spacing_mm, radius_mm: float = PEAK_RADIUS_MM) -> np.ndarray:
    """Per voxel, the mean of ``image`` over the sphere of ``radius_mm`` centred there
    (centre-in-sphere voxels; those outside the image left out of the mean)."""
    kernel = sphere_kernel(spacing_mm, radius_mm)
    image = np.asarray(image, np.float64)
    total = ndimage.correlate(image, kernel, mode="constant", cval=0.0)
    weight = ndimage.correlate(np.ones_like(image), kernel, mode="constant", cval=0.0)
    return total / weight


def suv_peak(image, contour, spacing_mm, radius_mm: float = PEAK_RADIUS_MM) -> float | None:
    """SUVpeak of ``contour`` (module doc); None for an empty contour. Computed on the
    contour's bounding box grown by the sphere's radius (the same value as on the whole
    image, at a fraction of the cost)."""
    contour = np.asarray(contour, bool)
    if not contour.any():
        return None
    half = np.floor(radius_mm / np.asarray(spacing_mm, np.float64)).astype(int)
    index = np.nonzero(contour)
    box = tuple(slice(max(int(i.min()) - h, 0), int(i.max()) + h + 1) for i, h in zip(index, half))
    peaks = peak_map(np.asarray(image)[box], spacing_mm, radius_mm)
    return float(peaks[contour[box]].max())


def contour_readouts(image, contour, spacing_mm, voxel_ml: float) -> dict:
    """SUVmax, SUVpeak, SUVmean, MTV (mL), TLG (SUV mL) and the voxel count of one contour on
    a PET image in SUV (module doc); the SUV entries are None for an empty contour."""
    contour = np.asarray(contour, bool)
    values = np.asarray(image, np.float64)[contour]
    count = int(values.size)
    mtv = count * voxel_ml
    if count == 0:
        return {"suvmax": None, "suvpeak": None, "suvmean": None, "mtv_ml": 0.0, "tlg": 0.0,
                "voxels": 0}
    suvmean = float(values.mean())
    return {"suvmax": float(values.max()), "suvpeak": suv_peak(image, contour, spacing_mm),
            "suvmean": suvmean, "mtv_ml": mtv, "tlg": suvmean * mtv, "voxels": count}


def largest_region(mask) -> np.ndarray:
    """The largest face-connected region of a bool mask (the mask itself when it is empty)."""
    mask = np.asarray(mask, bool)
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(np.ones(mask.shape), components, index=np.arange(1, count + 1))
    return components == 1 + int(np.argmax(sizes))


def level_readouts(image, contour, spacing_mm, voxel_ml: float) -> dict:
    """:func:`contour_readouts` of the whole contour, its number of face-connected regions,
    and the read-outs of its largest region alone (``largest_region``: the lesion, when the
    contour also holds other uptake, e.g. a bladder or small foci)."""
    contour = np.asarray(contour, bool)
    record = contour_readouts(image, contour, spacing_mm, voxel_ml)
    record["regions"] = int(ndimage.label(contour)[1])
    record["largest_region"] = contour_readouts(image, largest_region(contour), spacing_mm, voxel_ml)
    return record


def suvmean_draws(volume_draws_ml, tlg_draws) -> np.ndarray:
    """SUVmean per posterior draw, TLG / volume, over the draws with a non-zero volume."""
    volume = np.asarray(volume_draws_ml, np.float64)
    tlg = np.asarray(tlg_draws, np.float64)
    keep = volume > 0
    return tlg[keep] / volume[keep]
