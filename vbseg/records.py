"""What every saved result records about how it was made: package versions, inputs with
their sha256, the seed, the volume of interest; and the volume draws shared by the map-based
models (independent voxel labels)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import numpy as np

from vbseg.io.writing import sha256_file
from vbseg.posterior import independent_label_draws

PACKAGES = ("vbseg", "jax", "jaxlib", "numpyro", "numpy", "nibabel", "scipy", "matplotlib")


def versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def voi_text(roi, box) -> str:
    return "roi" if roi is not None else (f"box {box}" if box is not None else "whole image")


def provenance(images, modalities, roi, seed, volumes) -> dict:
    """summary.json's seed, versions and inputs (paths with sha256; for DICOM the series and
    its SUV conversion, ``Volume.source``)."""
    inputs = [{"path": os.path.abspath(p), "sha256": sha256_file(p), "modality": m,
               **({"source": v.source} if v.source else {})}
              for p, m, v in zip(images, modalities, volumes)]
    if roi is not None:
        inputs.append({"path": os.path.abspath(roi), "sha256": sha256_file(roi), "role": "roi"})
    return {"seed": seed, "versions": versions(), "inputs": inputs}


def independent_draws(probability, reference, pet_first, seed, num_draws):
    """Volume (and TLG) draws from independent voxel labels with P(tumour) = probability."""
    voxel_ml = reference.voxel_volume_ml
    candidates = probability > 0
    weights = [np.full(int(candidates.sum()), voxel_ml)]
    if pet_first:
        weights.append(reference.data[candidates] * voxel_ml)
    draws = independent_label_draws(probability[candidates], np.stack(weights, axis=1), seed=seed,
                                    num_draws=num_draws)
    return draws[:, 0], (draws[:, -1] if pet_first else None)
