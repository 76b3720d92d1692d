"""Learned components in ``vbseg.segment``: where a prior log-odds map comes from, and the
deep-uncertainty baselines.

Coarse to fine (issue 9). A network's logits ell_v (or any per-voxel prior log-odds map, e.g.
an atlas) enter a Bayesian model as a prior term with a weight gamma that is *learned* from
the image, so the network brings recognition while the statistical model keeps the last word:

* ``deep-potts``: the hidden Potts model with external field e_v(k) = gamma * ell_v on the
  tumour class (0 on the others); gamma is estimated with beta by pseudo-likelihood inside
  variational EM (:func:`vbseg.potts.beta.estimate_coupling_pl`), starting from gamma = 0,
  i.e. from the data-only fit. 1 / gamma is the network's fitted temperature: a map that
  carries no information about this image's labels (pure noise) gets gamma near 0 and the
  posterior falls back to the data-only model; an over-confident one is cooled.
* ``deep-gp``: the GP logit field with prior mean m + gamma * ell_v (gamma learned in the SVI
  fit; :mod:`vbseg.gp.model`).

Deep-uncertainty baselines, through the same outputs (probability map, contours, volume
interval) so the benchmark compares like with like:

* ``cnn``: sigmoid(ell_v), volume draws from independent voxel labels;
* ``mc-dropout`` (Gal & Ghahramani 2016, ICML): the mean of ``DROPOUT_PASSES`` forward passes
  with dropout on; every pass contributes an equal share of the volume draws, each a draw of
  independent voxel labels from that pass's map (so the interval holds both the spread between
  passes and the per-voxel Bernoulli noise);
* ``cnn-ensemble`` (Lakshminarayanan, Pritzel & Blundell 2017, NeurIPS): the same with the
  checkpoint's ensemble members in place of dropout passes.
"""

from __future__ import annotations

import os
import time

import numpy as np

from vbseg.deep import model as deep
from vbseg.errors import InputError
from vbseg.io.volume import load_map
from vbseg.records import independent_draws

NETWORK_BASELINES = ("cnn", "mc-dropout", "cnn-ensemble")
FIELD_MODELS = ("deep-potts", "deep-gp")
DEEP_MODELS = FIELD_MODELS + NETWORK_BASELINES
DROPOUT_PASSES = 20


def load_network(checkpoint, modalities):
    """The checkpoint to use (given path, or the packaged one for these modalities) and its
    path as text. InputError when none fits."""
    if checkpoint is None:
        packaged = deep.packaged_checkpoint(tuple(modalities))
        if packaged is None:
            raise InputError("--checkpoint", "no packaged network for inputs "
                             f"{','.join(modalities)} (packaged: pet; pet,ct; pet,ct,mr); give one")
        checkpoint = packaged
    path = os.fspath(checkpoint)
    network = deep.load_checkpoint(path)
    deep.check_modalities(network, list(modalities), path)
    return network, path


def network_prior_logit(checkpoint, stack, observed, modalities):
    """(X, Y, Z) network logits on the crop, the record of where they came from, and the run
    time of the forward pass (s)."""
    network, path = load_network(checkpoint, modalities)
    start = time.perf_counter()
    logits = deep.network_logits(network, stack, observed, list(modalities))
    seconds = time.perf_counter() - start
    return logits, {"source": "network", "checkpoint": path,
                    "members": len(network.models),
                    "training": {k: network.meta.get(k) for k in ("seed", "real_cases")}}, seconds


def map_prior_logit(path, reference, bounds):
    """(X, Y, Z) log-odds from a NIfTI map on the first image's grid, cut to the crop."""
    path = os.fspath(path)
    return load_map(path, reference, "log-odds map")[bounds], {"source": "map", "path": path}


def tumour_field(prior_logit, num_classes, field_class):
    """(X, Y, Z, K) external field: the log-odds on the tumour class, 0 on the others (a
    per-voxel constant added to every class would change nothing)."""
    field = np.zeros(prior_logit.shape + (num_classes,), np.float32)
    field[..., field_class] = prior_logit
    return field


def network_baseline(name, checkpoint, stack, observed, crop_voi, modalities, seed, volume_draws,
                     reference, bounds):
    """(probability on the first grid, volume draws mL, TLG draws or None, summary parts) of
    a deep-uncertainty baseline (module doc)."""
    network, path = load_network(checkpoint, modalities)
    start = time.perf_counter()
    if name == "cnn":
        maps = 1.0 / (1.0 + np.exp(-deep.network_logits(network, stack, observed, list(modalities))))
        maps = maps[None]
        method = "sigmoid of the network logits; volume draws from independent voxel labels"
    elif name == "mc-dropout":
        maps = deep.dropout_probabilities(network, stack, observed, list(modalities),
                                          num_samples=DROPOUT_PASSES, seed=seed)
        method = (f"MC dropout: mean of {DROPOUT_PASSES} passes with dropout on; volume draws "
                  "split equally over the passes, independent voxel labels from each pass's map")
    else:
        if len(network.models) < 2:
            raise InputError(path, "cnn-ensemble needs a checkpoint with >= 2 members, this one has "
                                   f"{len(network.models)}")
        maps = deep.member_probabilities(network, stack, observed, list(modalities))
        method = (f"deep ensemble of {len(maps)} members: mean map; volume draws split equally over "
                  "the members, independent voxel labels from each member's map")
    run_s = time.perf_counter() - start
    maps = np.where(crop_voi, maps, 0.0).astype(np.float32)

    def on_grid(crop):
        full = np.zeros(reference.shape, np.float32)
        full[bounds] = crop
        return full

    probability = on_grid(maps.mean(axis=0))
    pet_first = modalities[0] == "pet"
    per_map = -(-volume_draws // len(maps))
    pairs = [independent_draws(on_grid(m), reference, pet_first, seed + i, per_map)
             for i, m in enumerate(maps)]
    volume_draws_ml = np.concatenate([volume for volume, _ in pairs])[:volume_draws]
    tlg_draws = np.concatenate([tlg for _, tlg in pairs])[:volume_draws] if pet_first else None
    parts = {"parameters": {"checkpoint": path, "members": len(network.models),
                            "maps": len(maps)},
             "timings_s": {"compile": 0.0, "run": run_s}, "method": method}
    return probability, volume_draws_ml, tlg_draws, parts
