"""The lesion's envelope (``--envelope-mm R``): what a delineator calls the mass, not only its
hot part.

The sarcoma GTVs of ``../shared/data`` follow the anatomical mass: a necrotic or low-uptake core,
a cleft or a cold rim the hot tumour class wraps are inside the contour (the data README).
The Potts classes say which voxels are hot. The envelope closes the tumour region with a ball of
radius R mm and fills the holes left inside it (a morphological closing, then hole filling;
Serra, *Image Analysis and Mathematical Morphology*, 1982; Soille, *Morphological Image
Analysis*, 2003, ch. 6 for the grey-level fill).

On the probability map both operations are applied in grey levels with a flat structuring
element, so they commute with thresholding: for every t the envelope map's region {p_env >= t}
is exactly the closed and filled region {p >= t}. Each contour is therefore the envelope of the
model's contour at the same level, and the nested contours stay nested. Read as a coupling of
the voxels by one uniform threshold (a draw of the tumour is {p >= U}), p_env is the
probability that a voxel lies in the envelope of a drawn region. The volume draws (however the
method made them: independent voxels, Gibbs) are carried by matching volumes, not by the
coupling itself: with t the threshold whose region {p >= t} has the draw's volume v, the draw
gains what the envelope adds at t (V_env(t) - V(t), linear between the map's distinct values).
v -> v + gain is non-decreasing, so the volume interval's quantiles are the mapped quantiles.
A TLG draw gains the SUV mass the envelope adds at its volume draw's threshold; that shift
depends on the paired volume draw, so the TLG interval is re-estimated from the shifted
draws, not mapped. pv-potts is left out: its volume is a sum of fractions, not a region's.

SimpleITK's grey closing (ball kernel, per-axis radius round(R / spacing), at least one voxel)
and grey hole filling do the work (a hole is what cannot reach the border through face
neighbours, so a shell that is only edge-connected still encloses its core); the radius is in
millimetres so that it means the same on every grid. The envelope stays inside the VOI. Other
maps a method writes (e.g. a network's logits) are left as the model's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk

# the envelope more than doubled the 50 % region: warn (envelope-doubles-region). Set after the
# sarcoma benchmark's per-case ratios were seen: it fires there on two FDG-faint cases only
DOUBLING_LIMIT = 1.0
ENVELOPE_NOTE = ("; then --envelope-mm: each draw gains the volume the envelope (grey closing with "
                 "a {radius:g} mm ball, then hole filling) adds at the threshold whose region has "
                 "the draw's volume (vbseg.envelope)")


def _image(array: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))


def envelope_probability(probability, spacing_mm, radius_mm: float, voi=None) -> np.ndarray:
    """The envelope map (module doc) of ``probability`` (I, J, K) on voxels of ``spacing_mm``:
    grey closing by a ball of ``radius_mm`` (per-axis radius round(R / spacing), at least 1),
    then grey hole filling; 0 outside ``voi`` when given. R = 0 returns the map unchanged."""
    probability = np.asarray(probability, np.float32)
    if radius_mm <= 0:
        return probability.copy()
    radius = [max(int(round(radius_mm / float(s))), 1) for s in spacing_mm]
    closed = sitk.GrayscaleMorphologicalClosing(_image(probability), radius, sitk.sitkBall, True)
    filled = sitk.GetArrayFromImage(sitk.GrayscaleFillhole(closed, False)).transpose(2, 1, 0)
    envelope = np.maximum(filled, probability)  # extensive by construction; guards rounding
    return envelope if voi is None else np.where(voi, envelope, 0.0).astype(np.float32)


def envelope_gain(probability, envelope, draws_ml, voxel_ml: float, uptake=None) -> tuple[np.ndarray, ...]:
    """(volume gain (D,), uptake-mass gain (D,) or None) for volume draws ``draws_ml`` under the
    one-threshold coupling (module doc). The knots are the distinct positive values t of the map:
    {p >= t} holds n_p(t) voxels and {p_env >= t} n_e(t); a draw of v voxels gains
    n_e - n_p interpolated linearly in n_p between knots, from (0, 0) (a draw of no voxels gains
    nothing) to the last knot (larger draws take its gain). ``uptake``: the image whose mass
    (x voxel volume) the TLG draws sum, or None; its gain is the mass the envelope adds at the
    same threshold."""
    p = np.asarray(probability, np.float64).ravel()
    env = np.asarray(envelope, np.float64).ravel()
    draws = np.asarray(draws_ml, np.float64) / voxel_ml
    thresholds = np.unique(p[p > 0])[::-1]
    if thresholds.size == 0:
        return np.zeros(draws.shape), None if uptake is None else np.zeros(draws.shape)
    p_sorted, env_sorted = np.sort(p), np.sort(env)
    n_p = p.size - np.searchsorted(p_sorted, thresholds, side="left")
    n_e = env.size - np.searchsorted(env_sorted, thresholds, side="left")
    counts = np.concatenate([[0], n_p])
    gain = np.interp(draws, counts, np.concatenate([[0], n_e - n_p]) * voxel_ml)
    if uptake is None:
        return gain, None
    u = np.asarray(uptake, np.float64).ravel()
    mass_p = np.concatenate([[0.0], np.cumsum(u[np.argsort(-p, kind="stable")])])[n_p]
    mass_e = np.concatenate([[0.0], np.cumsum(u[np.argsort(-env, kind="stable")])])[n_e]
    return gain, np.interp(draws, counts, np.concatenate([[0.0], mass_e - mass_p]) * voxel_ml)


def apply_envelope(result, prepared, radius_mm: float):
    """The method's result with the envelope (module doc): its probability map, volume and TLG
    draws (TLG only with PET first; otherwise none), the volume method's text,
    ``options.envelope_mm``, ``diagnostics.envelope`` (the volume it adds at P >= 1/2) and the
    warning ``envelope-doubles-region`` when that is more than the 50 % region itself."""
    reference = prepared.reference
    envelope = envelope_probability(result.probability, reference.spacing, radius_mm, prepared.voi)
    uptake = reference.data if (prepared.pet_first and result.tlg_draws is not None) else None
    gain, uptake_gain = envelope_gain(result.probability, envelope, result.volume_draws_ml,
                                      reference.voxel_volume_ml, uptake)
    region = int((result.probability >= 0.5).sum())
    added_ml = float(((envelope >= 0.5).sum() - region) * reference.voxel_volume_ml)
    region_ml = region * reference.voxel_volume_ml
    warnings = list(result.sections.get("warnings", []))
    if added_ml > DOUBLING_LIMIT * region_ml:
        warnings.append({"code": "envelope-doubles-region",
                         "message": f"the envelope added {added_ml:.1f} mL to a 50 % region of "
                                    f"{region_ml:.1f} mL: the hot region is scattered and its envelope may "
                                    "join separate structures; compare with the result without "
                                    "--envelope-mm"})
    return dataclasses.replace(
        result, probability=envelope, volume_draws_ml=np.asarray(result.volume_draws_ml) + gain,
        volume_method=result.volume_method + ENVELOPE_NOTE.format(radius=radius_mm),
        tlg_draws=None if uptake_gain is None else np.asarray(result.tlg_draws) + uptake_gain,
        options={**result.options, "envelope_mm": radius_mm},
        sections={**result.sections, "warnings": warnings},
        diagnostics={**result.diagnostics, "envelope": {
            "radius_mm": radius_mm, "added_ml_at_50": added_ml,
            "rule": "grey closing (ball) then grey hole filling of the probability map, inside the VOI"}})
