"""Training the 3D U-Net of :mod:`vbseg.deep.model` (``vbseg train CONFIG.toml``).

Each step draws a batch of patches, synthetic (:func:`vbseg.deep.training_data.synthetic_patch`) or,
during the last ``finetune_steps`` steps, a ``real_fraction`` of them from delineated real
cases (:func:`vbseg.deep.training_data.real_patch`), and takes an AdamW step (Loshchilov & Hutter
2019; warm-up then cosine decay of the learning rate, gradients clipped to norm 1) on

    L = BCE + dice_weight * (1 - (2 sum_v w p t + 1) / (sum_v w p + sum_v w t + 1)),

BCE the mean binary cross-entropy of the logits over counted voxels (w = 1: inside the crop),
the soft Dice (Milletari et al. 2016) pooled over the batch, p = sigmoid(logit), t the
tumour mask, with dropout on. ``scan_steps`` steps run inside one ``lax.scan`` under
``eqx.filter_jit`` on a stacked block of batches, the next block being generated while the
previous one computes. ``members`` independent seeds give a deep ensemble in one checkpoint.

The settings and their TOML form (``[train]``, ``[network]``, ``[phantoms]``) are in
:mod:`vbseg.deep.training_config`.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vbseg import __version__
from vbseg.deep.model import (
    CHECKPOINT_FORMAT,
    DeepCheckpoint,
    UNet3D,
    architecture_record,
    count_parameters,
    deterministic_logits,
    network_logits,
    padded_input,
    save_checkpoint,
)
from vbseg.deep.training_config import TrainSettings, check_settings, load_settings
from vbseg.deep.training_data import (
    DeepTrainingCase,
    PhantomRanges,
    load_deep_case,
    real_patch,
    synthetic_patch,
    synthetic_training_patch,
)
from vbseg.errors import InputError
from vbseg.io.cases import read_cases
from vbseg.io.result_folder import output_files
from vbseg.metrics import dice

CROP_NOTE = ("the sarcoma crops of ../shared/data are centred on the tumour (5 cm margin), which "
             "flatters any method evaluated on them and means real patches always see tumour near "
             "the middle of the field of view")


# --- real cases ----------------------------------------------------------------------------

def real_training_cases(settings: TrainSettings, progress=None) -> list[DeepTrainingCase]:
    """The real cases ``settings`` names (all patient cases with its modalities by default,
    less ``exclude_cases``), loaded in network space; [] when ``cases`` is unset or absent."""
    if settings.cases is None or not Path(settings.cases).is_file():
        return []
    cases = read_cases(settings.cases, settings.modalities, settings.train_cases)
    loaded = []
    for case in cases:
        if case.name in settings.exclude_cases:
            continue
        loaded.append(load_deep_case(case))
        if progress:
            progress(f"loaded {case.name} {loaded[-1].tumour.shape}")
    return loaded


# --- the optimisation ------------------------------------------------------------------------

def segmentation_loss(logits, tumour, valid, dice_weight):
    """BCE + dice_weight * (1 - soft Dice), both over counted voxels (module doc); arrays (B, X, Y, Z)."""
    count = jnp.maximum(valid.sum(), 1.0)
    bce = (optax.sigmoid_binary_cross_entropy(logits, tumour) * valid).sum() / count
    probability = jax.nn.sigmoid(logits) * valid
    dice = (2.0 * (probability * tumour).sum() + 1.0) / (probability.sum() + (tumour * valid).sum() + 1.0)
    return bce + dice_weight * (1.0 - dice)


def optimiser(settings: TrainSettings) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.learning_rate, warmup_steps=max(1, settings.steps // 20),
        decay_steps=settings.steps, end_value=0.05 * settings.learning_rate)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=settings.weight_decay))


@eqx.filter_jit
def train_block(model, opt_state, inputs, tumour, valid, keys, *, optim, dice_weight):
    """``lax.scan`` of optimiser steps over a block of batches.

    Args: inputs (S, B, M, X, Y, Z), tumour and valid (S, B, X, Y, Z), keys (S, 2) dropout keys.
    Returns (model, opt_state, losses (S,)).
    """
    params, static = eqx.partition(model, eqx.is_array)

    def step(carry, batch):
        params, opt_state = carry
        batch_inputs, batch_tumour, batch_valid, key = batch

        def loss_of(params):
            network = eqx.combine(params, static)
            member_keys = jax.random.split(key, batch_inputs.shape[0])
            logits = jax.vmap(lambda x, k: network(x, key=k))(batch_inputs, member_keys)
            return segmentation_loss(logits, batch_tumour, batch_valid, dice_weight)

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (inputs, tumour, valid, keys))
    return eqx.combine(params, static), opt_state, losses


def _block(rng, settings, real_cases, num_real):
    """A block of ``scan_steps`` batches, each with ``num_real`` real patches."""
    patches = []
    for _ in range(settings.scan_steps):
        for b in range(settings.batch_size):
            if b < num_real:
                case = real_cases[int(rng.integers(len(real_cases)))]
                patches.append(real_patch(rng, case, settings.patch_shape))
            else:
                patches.append(synthetic_training_patch(rng, settings.patch_shape, settings.modalities,
                                                        settings.phantoms))
    shape = (settings.scan_steps, settings.batch_size)
    return tuple(jnp.asarray(np.stack(field).reshape(shape + np.shape(field[0])))
                 for field in zip(*patches))


def train_member(settings: TrainSettings, member: int, real_cases, progress=None):
    """One ensemble member: returns (model, record with loss trace and timings)."""
    rng = np.random.default_rng([settings.seed, member])
    key = jax.random.fold_in(jax.random.PRNGKey(settings.seed), member)
    init_key, dropout_key = jax.random.split(key)
    model = UNet3D(len(settings.modalities), settings.channels, settings.dropout, key=init_key)
    optim = optimiser(settings)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    num_blocks = settings.steps // settings.scan_steps
    first_finetune = (settings.steps - settings.finetune_steps) // settings.scan_steps
    num_real = int(round(settings.real_fraction * settings.batch_size)) if real_cases else 0
    started = time.perf_counter()
    losses, trace, compile_s = [], [], None
    block = _block(rng, settings, real_cases, num_real if first_finetune == 0 else 0)
    for index in range(num_blocks):
        keys = jax.random.split(jax.random.fold_in(dropout_key, index), settings.scan_steps)
        block_started = time.perf_counter()
        model, opt_state, block_losses = train_block(model, opt_state, *block, keys, optim=optim,
                                                     dice_weight=settings.dice_weight)
        if index + 1 < num_blocks:  # generated while the block computes (asynchronous dispatch)
            block = _block(rng, settings, real_cases, num_real if index + 1 >= first_finetune else 0)
        losses.extend(np.asarray(block_losses).tolist())
        if compile_s is None:
            compile_s = time.perf_counter() - block_started
        step = (index + 1) * settings.scan_steps
        if step % settings.log_every < settings.scan_steps or index + 1 == num_blocks:
            recent = float(np.mean(losses[-settings.log_every:]))
            trace.append([step, recent])
            if progress:
                progress(f"member {member} step {step}/{settings.steps} loss {recent:.4f} "
                         f"({time.perf_counter() - started:.0f} s)")
    record = {"member": member, "seed": [settings.seed, member], "loss_trace": trace,
              "initial_loss": float(np.mean(losses[:settings.scan_steps])),
              "final_loss": float(np.mean(losses[-min(len(losses), settings.log_every):])),
              "time_s": time.perf_counter() - started, "first_block_s_with_compile": compile_s,
              "real_patches_per_batch": num_real}
    return model, record


def _vbseg_version() -> str:
    return __version__


def train(settings: TrainSettings, *, cases=None, progress=None) -> DeepCheckpoint:
    """Train ``settings.members`` networks (independent seeds) into one checkpoint.

    Args:
        settings: a :class:`TrainSettings` (:func:`load_settings` reads one from TOML).
        cases: real cases to fine-tune on: a list of :class:`~vbseg.deep.training_data.DeepTrainingCase`
            (from :func:`~vbseg.deep.training_data.load_deep_case`; lets a benchmark load its cases once
            and retrain per fold) or of :class:`~vbseg.io.cases.DelineatedCase`; names in
            ``settings.exclude_cases`` are dropped either way. None: the cases ``settings`` names
            (:func:`real_training_cases`).
    """
    check_settings(settings)
    started = time.perf_counter()
    if cases is None:
        real_cases = real_training_cases(settings, progress)
    else:
        real_cases = [c if isinstance(c, DeepTrainingCase) else load_deep_case(c) for c in cases
                      if c.name not in settings.exclude_cases]
    for case in real_cases:
        if case.inputs.shape[0] != len(settings.modalities):
            raise InputError(case.name, f"has {case.inputs.shape[0]} modalities, training needs "
                                        f"{','.join(settings.modalities)}")
    load_s = time.perf_counter() - started
    models, records = [], []
    for member in range(settings.members):
        model, record = train_member(settings, member, real_cases, progress)
        models.append(model)
        records.append(record)
    licences = sorted({c.licence for c in real_cases if c.licence})
    meta = {
        "format": CHECKPOINT_FORMAT,
        "modalities": list(settings.modalities),
        "architecture": {**architecture_record(len(settings.modalities), settings.channels,
                                               settings.dropout),
                         "parameters": count_parameters(models[0])},
        "seed": settings.seed,
        "members": settings.members,
        "training": {
            "settings": settings.record(), "members": records,
            "time_s": time.perf_counter() - started, "case_loading_s": load_s,
            "cases_index": {"path": settings.cases,
                            "found": settings.cases is not None and Path(settings.cases).is_file()},
            "loss": "mean BCE + dice_weight * (1 - soft Dice pooled over the batch), dropout on",
            "optimiser": "AdamW, warm-up (5 % of steps) then cosine decay to 5 % of the peak "
                         "learning rate, gradients clipped to global norm 1",
            "data": "synthetic limb patches generated on the fly (vbseg.deep.training_data); real patches "
                    f"(half centred on tumour) in the last {settings.finetune_steps} steps, "
                    f"{settings.real_fraction:.0%} of each batch" if real_cases else
                    "synthetic limb patches generated on the fly (vbseg.deep.training_data); no real cases",
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "jax_backend": jax.default_backend(), "jax": jax.__version__,
                        "equinox": eqx.__version__, "optax": optax.__version__},
        },
        "real_cases": [c.name for c in real_cases],
        "real_cases_note": CROP_NOTE if real_cases else "trained on synthetic patches only",
        "attribution": "; ".join(licences) + (
            " -- sarcoma cases: Vallieres et al. 2015, TCIA doi:10.7937/K9/TCIA.2015.7GO2GSKS; "
            "Phys Med Biol 60(14):5471; prepared by the IBSI (Zwanenburg et al. 2020)"
            if any(c.name.startswith("sts") for c in real_cases) else "") if real_cases else "",
        "vbseg_version": _vbseg_version(),
    }
    return DeepCheckpoint(tuple(models), meta, "trained in memory")


# --- evaluation (recorded in the checkpoint; not a substitute for held-out benchmarks) ------

def evaluate(checkpoint: DeepCheckpoint, real_cases=(), *, num_phantoms=3, seed=10_000,
             shape=(48, 48, 40)) -> dict:
    """Dice of ``network_logits > 0`` on fresh synthetic patches with at least one lesion (the
    default :class:`~vbseg.deep.training_data.PhantomRanges`, generators seeded (``seed``, i), which
    training never uses: it seeds (config seed, member)) and on ``real_cases`` (in-sample when
    they were trained on)."""
    modalities = checkpoint.modalities
    phantoms, attempt = [], 0
    while len(phantoms) < num_phantoms:
        rng = np.random.default_rng([seed, attempt])
        attempt += 1
        stack, observed, tumour, valid, _ = synthetic_patch(rng, shape, modalities, PhantomRanges(
            empty_probability=0.0))
        if tumour.sum() < 8:
            continue
        logits = network_logits(checkpoint, stack, observed, modalities)
        phantoms.append(dice((logits > 0) & valid, tumour))
    real = {}
    for case in real_cases:  # inputs already in network space (the same map network_logits applies)
        real[case.name] = dice(_logits_from_inputs(checkpoint, case.inputs) > 0, case.tumour)
    return {"synthetic_dice": phantoms, "synthetic_mean_dice": float(np.mean(phantoms)),
            "real_dice": real, "real_mean_dice": float(np.mean(list(real.values()))) if real else None}


def _logits_from_inputs(checkpoint, inputs) -> np.ndarray:
    padded = jnp.asarray(padded_input(inputs))
    logits = jnp.mean(jnp.stack([deterministic_logits(m, padded) for m in checkpoint.models]), axis=0)
    x, y, z = inputs.shape[1:]
    return np.asarray(logits)[:x, :y, :z]


def default_output(config_path) -> Path:
    return Path("results") / f"{Path(config_path).stem}.eqx"


def train_from_config(path, out=None, *, overwrite=False, progress=None) -> Path:
    """``vbseg train``: read and check the config, train, evaluate, save; returns the
    checkpoint's path (``out``, default results/<config stem>.eqx). The two files (``out`` and
    its .json) are checked (not an input, not existing without ``overwrite``) and locked before
    training, and staged beside ``out`` to be moved into place together
    (:func:`vbseg.io.result_folder.output_files`)."""
    settings = load_settings(path)
    out = Path(out) if out is not None else default_output(path)
    if out.suffix == ".json":
        raise InputError(out, "the checkpoint's weights need a name not ending in .json (use .eqx)")
    inputs = [path, *([settings.cases] if settings.cases is not None else [])]
    with output_files([out, out.with_suffix(".json")], inputs, overwrite) as staging:
        checkpoint = trained_checkpoint(settings, path, out, progress)
        save_checkpoint(staging / out.name, checkpoint)
    return out


def trained_checkpoint(settings: TrainSettings, path, out: Path, progress=None) -> DeepCheckpoint:
    """Train and evaluate as :func:`train_from_config` does; the checkpoint records ``path``
    (the config) and its destination ``out``."""
    started = time.perf_counter()
    real_cases = real_training_cases(settings, progress)
    load_s = time.perf_counter() - started
    checkpoint = train(settings, cases=real_cases, progress=progress)
    checkpoint.meta["training"]["case_loading_s"] = load_s
    started = time.perf_counter()
    evaluation = evaluate(checkpoint, real_cases)
    evaluation["note"] = ("synthetic: fresh patches (unseen seeds); real: IN-SAMPLE (cases used in "
                          "training), not an estimate of accuracy on new patients")
    evaluation["time_s"] = time.perf_counter() - started
    meta = {**checkpoint.meta, "evaluation": evaluation,
            "config": {"path": os.fspath(path), "text": Path(path).read_text(encoding="utf-8")},
            "command": f"vbseg train {os.fspath(path)} --out {os.fspath(out)}"}
    return DeepCheckpoint(checkpoint.models, meta, os.fspath(out))


__all__ = ["TrainSettings", "check_settings", "evaluate", "load_settings", "real_training_cases",
           "segmentation_loss", "train", "train_block", "train_from_config", "train_member"]
