"""When a fit should not be trusted: the ``warnings`` of summary.json.

A probabilistic contour that is confidently wrong is the worst output this tool can give, so
every saved result is checked for the signs of a fit that found something other than a lesion,
and each sign is reported as ``{"code", "message"}`` (the CLI prints one line per warning).
The checks read only the posterior and its record, so every model gets them:

* ``tumour-fills-voi``: the expected tumour volume is more than ``VOI_SHARE_LIMIT`` of the
  volume of interest. A lesion-centred VOI is mostly not lesion; a class that fills it is
  usually a tissue split (body against air, fat against muscle).
* ``tumour-on-voi-border``: more than ``BORDER_SHARE_LIMIT`` of the VOI's border voxels lie
  in the 50 % contour: the "lesion" surrounds the VOI, so the class is background.
* ``contour-cut-by-voi``: more than ``CUT_SHARE_LIMIT`` of the 50 % contour's surface voxels
  lie on the VOI's border: the region runs out of the VOI. Either the VOI cuts the lesion (its
  volume is truncated) or the contour holds another structure that crosses the VOI's border
  (on the sarcoma crops: hot tissue beside the GTV, in 5 of 21 default fits).
* ``no-contour``: no voxel reaches P(tumour) = 0.5: the model found no lesion.
* ``classes-overlap``: the tumour class's intensities are within ``SEPARATION_LIMIT`` pooled
  standard deviations of another class's in every image of the likelihood. Two equal-weight
  Gaussians of equal variance make a unimodal mixture when their means are less than two
  standard deviations apart, so below that the split is not carried by the image.
* ``beta-at-bound``, ``field-weight-at-bound``: a learned parameter stopped at its prior's
  bound, so the data did not determine it (read from the fit's diagnostics, or from those of
  the first fit when a PSF fit or a sampler followed it).
* ``restarts-disagree``: the fit's k-means restarts ended in different solutions (some class
  size differs by more than 5 %, :func:`vbseg.potts.fitting.restart_agreement`) and the best
  other solution's ELBO is within ``RESTART_ODDS_NATS`` = log 20 of the chosen one's: by the
  bound, the data favour the chosen segmentation by less than 20 to 1 over another, so the
  posterior has competing modes and the result shows one of them (its probabilities and
  interval do not carry the other). On the 21 sarcomas (PET + CT + MR, K = 2 and 3, three
  restarts; ``python -m benchmarks.restart_agreement``) every fit's restarts found one
  solution, so it did not fire.
* ``learned-beta-rejected``: ``--beta auto`` was checked against the fit at the fixed default
  beta and failed (``diagnostics.learned_beta``, :func:`vbseg.potts.fitting.learned_or_fixed`), so
  the result is the fixed-beta fit's.

Before the fit, :func:`input_warnings` adds what is implausible but not certainly wrong in the
inputs (they come first in the list):

* ``level-below-1``: a contour level under 1 %: levels are percent, so ``--levels 0.5`` is
  P(tumour) >= 0.005, which was probably meant as 50.
* ``negative-pet``: a PET image holds negative voxels. SUV is not negative (reconstruction
  can undershoot next to hot regions); TLG sums SUV x volume and those voxels lower it.

What the checks cannot see: a contour of the wrong structure that lies inside the VOI, and a
contour that covers only part of the lesion (under-segmentation). On the 21 sarcomas
(benchmarks/results/fusion_default.json) they flag 3 of the default's 4 fits below Dice 0.3
(and 2 of its 17 others), all 16 of the joint two-class PET+CT+MR model's fits below 0.3 (its
body-sized contours), and 6 of 11 K = 3 fits below 0.3: the 5 silent ones found a small part
of the GTV.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

VOI_SHARE_LIMIT = 0.5
BORDER_SHARE_LIMIT = 0.5
CUT_SHARE_LIMIT = 0.1
SEPARATION_LIMIT = 2.0
RESTART_ODDS_NATS = float(np.log(20.0))


def _warning(code: str, message: str) -> dict:
    return {"code": code, "message": message}


def surface(region: np.ndarray) -> np.ndarray:
    """(I, J, K) bool: voxels of ``region`` with a face neighbour outside it or outside the array."""
    padded = np.pad(region, 1, constant_values=False)
    interior = ndimage.binary_erosion(padded, structure=ndimage.generate_binary_structure(3, 1))
    return region & ~interior[1:-1, 1:-1, 1:-1]


def class_separation(means, sds, tumour_class: int) -> float | None:
    """min over other classes l of max over images m of |mu_t,m - mu_l,m| / sqrt((s_t,m^2 +
    s_l,m^2) / 2): how far the tumour class stands from its nearest class in its best image.
    ``means``/``sds`` (K, M); None with fewer than two classes."""
    means, sds = np.asarray(means, np.float64), np.asarray(sds, np.float64)
    if means.ndim != 2 or means.shape[0] < 2:
        return None
    pooled = np.sqrt(0.5 * (sds[tumour_class] ** 2 + sds ** 2))
    distance = np.abs(means - means[tumour_class]) / np.maximum(pooled, 1e-12)
    others = [k for k in range(means.shape[0]) if k != tumour_class]
    return float(min(distance[k].max() for k in others))


def input_warnings(levels_percent, volumes) -> list[dict]:
    """The input warnings of the module doc, for contour ``levels_percent`` and the loaded
    ``volumes`` (:class:`vbseg.io.volume.Volume`)."""
    warnings = [_warning("level-below-1", f"contour level {level:g} is read as {level:g} % "
                                          f"(P(tumour) >= {level / 100:g}); for {level * 100:g} % "
                                          f"write {level * 100:g}")
                for level in levels_percent if level < 1]
    for volume in volumes:
        negative = volume.data < 0
        if volume.modality == "pet" and negative.any():
            warnings.append(_warning(
                "negative-pet", f"{volume.name}: {int(negative.sum())} PET voxels are negative "
                                f"(down to {float(volume.data.min()):g}); SUV is not, and they "
                                "lower the TLG"))
    return warnings


def fit_warnings(probability: np.ndarray, voi: np.ndarray, summary: dict) -> list[dict]:
    """The warnings of one result: ``probability`` P(tumour) and ``voi`` (bool) on one grid,
    ``summary`` the record the model wrote (its parameters and diagnostics are read when
    present). Returns a list of ``{code, message}``, empty for a fit with no sign of trouble."""
    inside = probability[voi]
    share = float(inside.sum()) / max(int(voi.sum()), 1)
    border = surface(voi)
    contour = voi & (probability >= 0.5)
    border_share = float(contour[border].mean()) if border.any() else 0.0
    contour_surface = surface(contour)
    cut_share = float(border[contour_surface].mean()) if contour_surface.any() else 0.0
    whole_image = summary.get("options", {}).get("voi") == "whole image"
    cut_by = ("the image's field of view cuts the lesion (its volume is truncated)" if whole_image else
              "the VOI cuts the lesion (enlarge --roi/--box)")
    checks = [
        (share > VOI_SHARE_LIMIT, "tumour-fills-voi",
         f"the expected tumour volume is {share:.0%} of the volume of interest (limit "
         f"{VOI_SHARE_LIMIT:.0%}): the tumour class may be a tissue class; give a tighter "
         "--roi/--box or check the inputs"),
        (border_share > BORDER_SHARE_LIMIT, "tumour-on-voi-border",
         f"{border_share:.0%} of the volume of interest's border lies in the 50 % contour (limit "
         f"{BORDER_SHARE_LIMIT:.0%}): the contour surrounds the volume of interest"),
        (cut_share > CUT_SHARE_LIMIT and border_share <= BORDER_SHARE_LIMIT, "contour-cut-by-voi",
         f"{cut_share:.0%} of the 50 % contour's surface lies on the border of the volume of "
         f"interest (limit {CUT_SHARE_LIMIT:.0%}): the region runs out of it, so either {cut_by} "
         "or the contour holds another structure"),
        (not contour.any(), "no-contour",
         "no voxel reaches P(tumour) = 0.5: the model found no lesion in the volume of interest"),
    ]
    warnings = [_warning(code, message) for fired, code, message in checks if fired]
    parameters = summary.get("parameters", {})
    on_one_scale = "log scale" not in str(parameters.get("units", ""))  # log-normal: medians vs log sds
    if on_one_scale and all(key in parameters for key in ("class_means", "class_sds", "tumour_class")):
        separation = class_separation(parameters["class_means"], parameters["class_sds"],
                                      int(parameters["tumour_class"]))
        if separation is not None and separation < SEPARATION_LIMIT:
            warnings.append(_warning(
                "classes-overlap", f"the tumour class's mean is {separation:.2f} pooled sd from the "
                                   f"nearest class's (limit {SEPARATION_LIMIT:g}): the image does not "
                                   "separate them"))
    diagnostics = summary.get("diagnostics", {})
    diagnostics = {**diagnostics.get("initial_fit", {}), **diagnostics}  # PSF fit or sampler after VB
    for key, code, name in (("beta_at_prior_bound", "beta-at-bound", "beta"),
                            ("field_weight_at_prior_bound", "field-weight-at-bound", "field weight")):
        if diagnostics.get(key):
            warnings.append(_warning(code, f"the learned {name} stopped at its prior's bound: the data "
                                           "did not determine it; fix it with an option instead"))
    gap = diagnostics.get("elbo_gap_to_other_solution")
    if gap is not None and gap < RESTART_ODDS_NATS:
        warnings.append(_warning(
            "restarts-disagree", f"the fit's restarts found different solutions, the best other one "
                                 f"{gap:.2f} nats of ELBO below the chosen one (limit log 20 = "
                                 f"{RESTART_ODDS_NATS:.2f}): the data hardly prefer this segmentation; "
                                 "see diagnostics.restart_class_voxels, or give a tighter --roi/--box"))
    learned_beta = diagnostics.get("learned_beta") or {}
    if learned_beta.get("used") == "fixed":
        warnings.append(_warning("learned-beta-rejected",
                                 f"--beta auto was not used: {learned_beta.get('reason')}; the "
                                 f"result is the fit at the fixed beta {learned_beta.get('fixed_beta'):g}"))
    return warnings
