"""The methods users compare against, as methods: every map of :mod:`vbseg.baselines.classic`
(thresholds, Otsu, k-means, mixture, random walker, graph cut, KsPC) and the deep-uncertainty
baselines of :mod:`vbseg.deep.segment` (cnn, mc-dropout, cnn-ensemble).

A baseline gives a map, not a posterior: volume draws come from independent voxel labels with
P(tumour) = the map (a 0/1 mask gives a single volume, so its "interval" has zero width); the
deep-uncertainty baselines pool draws over their dropout passes or ensemble members.
:func:`map_result` turns any crop map into a result, so a new baseline is one function and one
:func:`~vbseg.methods.registry.register` call (README, "Extending vbseg").
"""

from __future__ import annotations

import time

from vbseg.baselines.classic import BASELINES, baseline_map
from vbseg.deep.segment import NETWORK_BASELINES, network_baseline
from vbseg.methods.inputs import likelihood_inputs
from vbseg.methods.registry import Method, MethodResult, register
from vbseg.posterior import INDEPENDENT_DRAWS_METHOD
from vbseg.records import independent_draws

MAP_KIND_METHODS = {
    "probability": INDEPENDENT_DRAWS_METHOD,
    "hdr": "the KsPC map ranks voxels by smoothed uptake and is not a tumour probability; its "
           "volume draws treat it as one (independent voxels), for comparison only",
    "mask": "a deterministic mask: one volume, no uncertainty",
}


def map_result(prepared, options, crop_map, kind: str, parameters: dict, run_s: float,
               extra_options: dict | None = None) -> MethodResult:
    """A baseline's (x, y, z) crop map in [0, 1] as a result. ``kind``: "probability" (a
    tumour probability), "mask" (0/1) or "hdr" (a ranking, KsPC); ``run_s``: its run time;
    ``extra_options``: more entries for summary.json's options (e.g. the fusion record)."""
    probability = prepared.on_grid(crop_map)
    volume_draws_ml, tlg_draws = independent_draws(probability, prepared.reference, prepared.pet_first,
                                                   prepared.seed, options.outputs.volume_draws)
    return MethodResult(probability=probability, volume_draws_ml=volume_draws_ml,
                        volume_method=MAP_KIND_METHODS[kind], tlg_draws=tlg_draws, model=options.model.name,
                        options={"baseline": options.model.name, "volume_draws": options.outputs.volume_draws,
                                 "map": kind, **(extra_options or {})},
                        parameters=parameters, diagnostics={}, elbo=None,
                        timings_s={"compile": 0.0, "run": run_s})


def run_baseline(prepared, options) -> MethodResult:
    """One of :data:`vbseg.baselines.classic.BASELINES` on the prepared crop, on the images ``--fusion``
    chooses (with PET among several images: PET alone, so the multi-image baselines, kmeans, gmm
    and graphcut, cannot split body from air instead of tumour from tissue)."""
    start = time.perf_counter()
    likelihood = likelihood_inputs(prepared, options)
    crop_map, kind, parameters = baseline_map(options.model.name, likelihood.stack, likelihood.observed,
                                              prepared.crop_voi, list(likelihood.modalities),
                                              prepared.reference.spacing)
    return map_result(prepared, options, crop_map, kind, parameters, time.perf_counter() - start,
                      extra_options={"fusion": likelihood.record})


def run_network_baseline(prepared, options) -> MethodResult:
    """cnn, mc-dropout or cnn-ensemble (:func:`vbseg.deep.segment.network_baseline`)."""
    probability, volume_draws_ml, tlg_draws, parts = network_baseline(
        options.model.name, options.model.checkpoint, prepared.stack, prepared.observed, prepared.crop_voi,
        list(prepared.modalities), prepared.seed, options.outputs.volume_draws, prepared.reference,
        prepared.bounds)
    return MethodResult(probability=probability, volume_draws_ml=volume_draws_ml,
                        volume_method=parts["method"], tlg_draws=tlg_draws, model=options.model.name,
                        options={"baseline": options.model.name, "volume_draws": options.outputs.volume_draws,
                                 "map": "probability",
                                 "network_timing": "run includes the first call's compile"},
                        parameters=parts["parameters"], diagnostics={}, elbo=None,
                        timings_s=parts["timings_s"])


for _name in BASELINES:
    register(Method(_name, run_baseline, f"baseline {_name} (vbseg/baselines/classic.py)", rank=10,
                    needs_pet=True))
for _name in NETWORK_BASELINES:
    register(Method(_name, run_network_baseline, f"deep-uncertainty baseline {_name} "
                                                  "(vbseg/deep/segment.py)", rank=20))
