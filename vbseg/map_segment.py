"""Baselines' and networks' maps as saved Posteriors (``segment(..., model=<baseline>)``):
the thresholds, mixtures, random walker and KsPC of :mod:`vbseg.baselines`, and the
deep-uncertainty baselines of :mod:`vbseg.deep_segment` (cnn, mc-dropout, cnn-ensemble)."""

from __future__ import annotations

import time

import numpy as np

from vbseg.baselines import baseline_map
from vbseg.deep_segment import NETWORK_BASELINES, network_baseline
from vbseg.posterior import INDEPENDENT_DRAWS_METHOD, Posterior, saved_posterior
from vbseg.records import independent_draws, provenance, voi_text


def baseline_posterior(name, stack, observed, crop_voi, voi, bounds, volumes, images,
                        modalities, roi, box, resampled, seed, volume_draws, out, levels_percent,
                        title, checkpoint=None) -> Posterior:
    """A baseline's map as a Posterior: volume draws from independent voxels (a 0/1 mask gives
    a single volume, so its "interval" has zero width); the deep-uncertainty baselines
    (:mod:`vbseg.deep_segment`) pool draws over their dropout passes or ensemble members."""
    reference = volumes[0]
    pet_first = modalities[0] == "pet"
    options = {"baseline": name, "voi": voi_text(roi, box), "volume_draws": volume_draws}
    if name in NETWORK_BASELINES:
        probability, volume_draws_ml, tlg_draws, parts = network_baseline(
            name, checkpoint, stack, observed, crop_voi, modalities, seed, volume_draws,
            reference, bounds)
        parameters, timings, method = parts["parameters"], parts["timings_s"], parts["method"]
        options.update(map="probability", network_timing="run includes the first call's compile")
    else:
        start = time.perf_counter()
        crop, kind, parameters = baseline_map(name, stack, observed, crop_voi, modalities,
                                              reference.spacing)
        timings = {"compile": 0.0, "run": time.perf_counter() - start}
        probability = np.zeros(reference.shape, np.float32)
        probability[bounds] = np.where(crop_voi, crop, 0.0)
        volume_draws_ml, tlg_draws = independent_draws(probability, reference, pet_first, seed,
                                                        volume_draws)
        options["map"] = kind
        method = {"probability": INDEPENDENT_DRAWS_METHOD,
                  "hdr": "the KsPC map ranks voxels by smoothed uptake and is not a tumour "
                         "probability; its volume draws treat it as one (independent voxels), "
                         "for comparison only",
                  }.get(kind, "a deterministic mask: one volume, no uncertainty")
    summary = {
        "model": name,
        "options": options,
        "parameters": parameters,
        "modality": modalities,
        "resampled": [{"path": p, "resampled": r} for p, r in zip(images, resampled)],
        "elbo": None,
        "diagnostics": {"voi_voxels": int(voi.sum()),
                        "voi_bounds": [[s.start, s.stop] for s in bounds]},
        "timings_s": timings,
        **provenance(images, modalities, roi, seed, volumes),
    }
    return saved_posterior(out, levels_percent, title, probability=probability, reference=reference,
                           voi=voi, volume_draws_ml=volume_draws_ml, volume_method=method,
                           tlg_draws=tlg_draws, summary=summary)
