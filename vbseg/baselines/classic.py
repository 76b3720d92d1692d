"""The methods users compare against, run through the same ``segment`` path as the models.

Each takes the images on the first image's grid, cropped to the volume of interest (VOI), and
returns a per-voxel tumour map in [0, 1]: a probability where the method has one (Gaussian
mixture, random walker), a 0/1 mask otherwise. All need a PET image (the tumour is the hot
structure); thresholds are taken over the VOI.

* ``threshold40``, ``threshold50``: PET >= 40 % / 50 % of SUVmax (the fixed-fraction rule of
  clinical practice; e.g. Erdi et al. 1997, Cancer 80:2505).
* ``suv2.5``: PET >= 2.5 (a fixed SUV cut-off, common for FDG; meaningful only in SUV).
* ``adaptive50``: background-corrected threshold T = B + 0.5 (SUVmax - B), B the median PET
  value of the VOI (source-to-background adaptive thresholds, cf. Daisne et al. 2003,
  Radiother Oncol 69:247; Nestle et al. 2005, J Nucl Med 46:1342).
* ``otsu``: Otsu's threshold of the PET values in the VOI (scikit-image).
* ``kmeans``: two-class k-means on all modalities (standardised), tumour = hotter PET centre.
* ``gmm``: two-component Gaussian mixture (diagonal covariance, all modalities) fitted by EM
  without any spatial prior; the map is the posterior probability of the hotter component.
* ``random_walker``: scikit-image's random walker (Grady 2006, IEEE TPAMI 28:1768) on the PET
  image with ``return_full_prob``: seeds are PET >= 70 % SUVmax (tumour) and PET <= B
  (background); the map is the tumour label's probability.
* ``graphcut``: the hidden Potts model's MAP labelling (beta = 0.5, the Potts model's default,
  6-neighbourhood) with the ``gmm`` mixture's class parameters, by a minimum s-t cut
  (:mod:`vbseg.baselines.graphcut`; Greig et al. 1989, Boykov & Kolmogorov 2004): the hard
  segmentation that graph-cut tools give, from SciPy's BSD max-flow rather than GPL PyMaxflow.
* ``kspc``: kernel-smoothing probability contours (Zhang & Ray 2023): the map is 1 - the mass
  of the highest-density region of the smoothed, background-subtracted PET whose boundary
  passes through the voxel (:mod:`vbseg.baselines.kspc`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vbseg.baselines.graphcut import potts_map_by_graph_cut
from vbseg.baselines.kspc import kspc_map
from vbseg.potts.kmeans import kmeans_labels, restart_levels
from vbseg.potts.model import DEFAULT_POTTS_BETA

BASELINES = ("threshold40", "threshold50", "suv2.5", "adaptive50", "otsu", "kmeans", "gmm",
             "random_walker", "kspc", "graphcut")
GMM_ITERATIONS = 200


def _pet(stack, observed, voi, modalities):
    index = modalities.index("pet")
    values = stack[..., index]
    inside = voi & observed[..., index]
    return values, inside


def _standardised(stack, observed, voi):
    features = np.zeros(stack.shape, np.float64)
    for m in range(stack.shape[-1]):
        inside = voi & observed[..., m]
        values = stack[..., m][inside]
        scale = values.std() or 1.0
        features[..., m] = np.where(inside, (stack[..., m] - np.median(values)) / scale, 0.0)
    return features


def _component_log_likelihood(x, o, mean, var):
    """log N(x | mean_k, var_k) summed over the observed modalities: x, o (..., M) -> (..., K)."""
    per_modality = -0.5 * (np.log(2 * np.pi * var) + (x[..., None, :] - mean) ** 2 / var)
    return np.sum(o[..., None, :] * per_modality, axis=-1)


def _gmm(features, observed, voi, hot_channel, num_iterations=GMM_ITERATIONS):
    """EM for a two-component diagonal Gaussian mixture over VOI voxels (unobserved modalities
    left out of each voxel's likelihood). Returns P(hot component) per voxel and parameters."""
    x = features[voi]
    o = observed[voi].astype(np.float64)
    order = np.argsort(x[:, hot_channel])
    # start: the lower and upper halves by the PET value
    resp = np.zeros((x.shape[0], 2))
    resp[order[: x.shape[0] // 2], 0] = 1.0
    resp[order[x.shape[0] // 2:], 1] = 1.0
    for _ in range(num_iterations):
        weight = resp[:, :, None] * o[:, None, :]  # (n, 2, M)
        count = weight.sum(axis=0) + 1e-9
        mean = (weight * x[:, None, :]).sum(axis=0) / count
        var = (weight * (x[:, None, :] - mean) ** 2).sum(axis=0) / count + 1e-6
        pi = resp.mean(axis=0)
        log_lik = np.log(pi) + _component_log_likelihood(x, o, mean, var)
        log_lik -= log_lik.max(axis=1, keepdims=True)
        new = np.exp(log_lik)
        new /= new.sum(axis=1, keepdims=True)
        if np.max(np.abs(new - resp)) < 1e-6:
            resp = new
            break
        resp = new
    hot = int(np.argmax(mean[:, hot_channel]))
    probability = np.zeros(voi.shape, np.float32)
    probability[voi] = resp[:, hot]
    return probability, {"means_standardised": mean.tolist(), "variances_standardised": var.tolist(),
                         "proportions": pi.tolist(), "hot_component": hot}


def baseline_map(name, stack, observed, voi, modalities, spacing_mm=(1.0, 1.0, 1.0)
                 ) -> tuple[np.ndarray, str, dict]:
    """(tumour map (X, Y, Z) in [0, 1], "probability", "mask" or "hdr" (KsPC: 1 - HDR mass),
    parameters) for baseline ``name``
    (``spacing_mm``: the voxel size, which KsPC's bandwidth is in)."""
    pet, inside = _pet(stack, observed, voi, modalities)
    values = pet[inside]
    suv_max = float(values.max())
    background = float(np.median(values))

    def mask(threshold):
        return (inside & (pet >= threshold)).astype(np.float32), "mask", {"threshold": float(threshold)}

    if name == "threshold40":
        return mask(0.4 * suv_max)
    if name == "threshold50":
        return mask(0.5 * suv_max)
    if name == "suv2.5":
        return mask(2.5)
    if name == "adaptive50":
        result = mask(background + 0.5 * (suv_max - background))
        result[2]["background"] = background
        return result
    if name == "kspc":
        probability, parameters = kspc_map(pet, inside, spacing_mm)
        return probability, "hdr", parameters
    if name == "otsu":
        from skimage.filters import threshold_otsu

        return mask(float(threshold_otsu(values)))
    hot = modalities.index("pet")
    features = _standardised(stack, observed, voi)
    if name == "kmeans":
        best = None
        for levels in np.asarray(restart_levels(2)):  # several starts, the lowest SSE kept
            labels = np.asarray(kmeans_labels(jnp.asarray(features, jnp.float32),
                                              jnp.asarray(observed), jnp.asarray(voi),
                                              jnp.asarray(levels)))
            sse = sum(float(np.sum(((features - features[voi & (labels == k)].mean(axis=0))
                                    ** 2)[voi & (labels == k)])) for k in (0, 1) if np.any(labels == k))
            if best is None or sse < best[0]:
                best = (sse, labels)
        labels = best[1]
        centres = [float(features[..., hot][voi & (labels == k)].mean()) for k in (0, 1)]
        tumour = int(np.argmax(centres))
        return (voi & (labels == tumour)).astype(np.float32), "mask", {"centres_pet": centres}
    if name == "gmm":
        probability, parameters = _gmm(features, observed, voi, hot)
        return probability, "probability", parameters
    if name == "graphcut":
        _, parameters = _gmm(features, observed, voi, hot)
        proportions = np.maximum(np.asarray(parameters["proportions"]), 1e-300)
        unary = -np.log(proportions) - _component_log_likelihood(
            features, observed, np.asarray(parameters["means_standardised"]),
            np.asarray(parameters["variances_standardised"]))
        tumour = parameters["hot_component"]
        unary = np.stack([unary[..., 1 - tumour], unary[..., tumour]], axis=-1)
        labels = potts_map_by_graph_cut(unary, voi, DEFAULT_POTTS_BETA, spacing_mm)
        return labels.astype(np.float32), "mask", dict(parameters, beta=DEFAULT_POTTS_BETA,
                                                       neighbourhood=6)
    if name == "random_walker":
        from skimage.segmentation import random_walker

        markers = np.zeros(voi.shape, np.int32)  # 0: unlabelled; -1 excluded (outside the VOI)
        markers[~inside] = -1
        markers[inside & (pet <= background)] = 1
        markers[inside & (pet >= 0.7 * suv_max)] = 2
        data = np.where(inside, (pet - background) / max(suv_max - background, 1e-6), 0.0)
        full = random_walker(data, markers, beta=130, mode="cg_j", tol=1e-5,
                             return_full_prob=True)
        # the iterative solver leaves values a few 1e-5 outside [0, 1]: clip them
        probability = np.clip(np.where(inside, full[1], 0.0), 0.0, 1.0).astype(np.float32)
        return probability, "probability", {"background": background, "tumour_seed": 0.7 * suv_max}
    raise ValueError(f"unknown baseline {name!r}")
