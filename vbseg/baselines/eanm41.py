"""``eanm41``: PET >= 41 % of SUVmax in the volume of interest, the fixed-threshold rule of the
EANM procedure guidelines for FDG PET/CT tumour imaging (Boellaard et al., Eur J Nucl Med Mol
Imaging 2015;42:328, which recommend 41 % of SUVmax for the metabolic volume when no
background correction is used).

This module is the README's worked example of adding a method: one function that turns the
prepared crop into a map, one :func:`~vbseg.methods.registry.register` call; the registry puts
it in ``vbseg segment --model``, the experiment runner and the benchmarks.
"""

from __future__ import annotations

import time

import numpy as np

from vbseg.baselines.method import map_result
from vbseg.methods.registry import Method, register

FRACTION_OF_MAX = 0.41


def run_eanm41(prepared, options):
    """The mask {PET >= 0.41 SUVmax} over the VOI's PET voxels, as a result."""
    start = time.perf_counter()
    pet = prepared.modalities.index("pet")
    inside = prepared.crop_voi & prepared.observed[..., pet]
    values = prepared.stack[..., pet]
    threshold = FRACTION_OF_MAX * float(values[inside].max())
    mask = (inside & (values >= threshold)).astype(np.float32)
    return map_result(prepared, options, mask, "mask", {"threshold": threshold},
                      time.perf_counter() - start)


register(Method("eanm41", run_eanm41, "PET >= 41 % of SUVmax (EANM guideline)", rank=11,
                needs_pet=True))
