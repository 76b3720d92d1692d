"""Settings of a training run of the 3D U-Net (:mod:`vbseg.deep.training`) and their TOML form.

Config (TOML; every key optional except ``modalities``; unknown keys and wrong types are
an InputError naming the file and the key)::

    [train]
    modalities = ["pet", "ct"]    # the checkpoint's inputs, in order
    seed = 0                      # member m uses seed (seed, m)
    members = 1                   # 1..3
    steps = 600                   # total optimiser steps per member
    finetune_steps = 300          # the last steps mix in real patches (when cases exist)
    batch_size = 4
    patch_shape = [32, 32, 32]
    learning_rate = 3e-3
    weight_decay = 1e-4
    dice_weight = 1.0
    scan_steps = 5                # steps per lax.scan block (steps must be a multiple)
    log_every = 25                # steps between loss-trace entries
    real_fraction = 0.5           # of each fine-tuning batch
    cases = "../../shared/data/cases.json"   # relative to the config file; absent -> phantoms only
    train_cases = ["sts001"]      # default: every patient case with the modalities
    exclude_cases = ["sts002"]    # held out (cross-validation folds)

    [network]
    channels = [8, 16, 32]
    dropout = 0.1

    [phantoms]                    # vbseg.deep.training_data.PhantomRanges; [low, high] pairs
    spacing_xy_mm = [3.0, 5.5]
    spacing_z_mm = [2.5, 4.5]
    diameter_mm = [8.0, 90.0]     # log-uniform
    contrast = [1.5, 12.0]        # log-uniform, lesion : muscle uptake
    psf_fwhm_mm = [4.0, 8.0]
    cv = [0.05, 0.25]
    necrotic_probability = 0.4
    empty_probability = 0.15
    max_distractors = 3
    partial_fov_probability = 0.6
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from vbseg.cohort.model import COHORT_MODALITIES
from vbseg.deep.model import DEFAULT_CHANNELS, DEFAULT_DROPOUT
from vbseg.deep.training_data import PhantomRanges
from vbseg.errors import InputError
from vbseg.experiment.config import check_scalar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_MEMBERS = 3


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything that defines a training run (module doc for the meaning of each field)."""

    modalities: tuple[str, ...]
    seed: int = 0
    members: int = 1
    steps: int = 600
    finetune_steps: int = 300
    batch_size: int = 4
    patch_shape: tuple[int, int, int] = (32, 32, 32)
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    scan_steps: int = 5
    log_every: int = 25
    real_fraction: float = 0.5
    cases: str | None = None
    train_cases: tuple[str, ...] | None = None
    exclude_cases: tuple[str, ...] = ()
    channels: tuple[int, int, int] = DEFAULT_CHANNELS
    dropout: float = DEFAULT_DROPOUT
    phantoms: PhantomRanges = PhantomRanges()

    def record(self) -> dict:
        record = dataclasses.asdict(self)
        record["phantoms"] = self.phantoms.record()
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in record.items()}


TRAIN_KEYS = {"modalities": "modalities", "seed": int, "members": int, "steps": int,
              "finetune_steps": int, "batch_size": int, "patch_shape": "shape",
              "learning_rate": float, "weight_decay": float, "dice_weight": float, "scan_steps": int,
              "log_every": int, "real_fraction": float, "cases": str, "train_cases": "names",
              "exclude_cases": "names"}
NETWORK_KEYS = {"channels": "channels", "dropout": float}
PHANTOM_KEYS = {f.name: ("pair" if isinstance(f.default, tuple) else type(f.default))
                for f in dataclasses.fields(PhantomRanges)}
SECTIONS = {"train": TRAIN_KEYS, "network": NETWORK_KEYS, "phantoms": PHANTOM_KEYS}


def _typed(path, key, value, kind):
    """Check one config value against its declared kind; returns it in settings form."""
    if kind in (int, float, str):
        return check_scalar(path, key, value, kind)
    if not isinstance(value, list):
        raise InputError(path, f"{key}: expected a list, got {value!r}")
    if kind == "modalities" or kind == "names":
        items = tuple(check_scalar(path, key, v, str) for v in value)
        return tuple(m.lower() for m in items) if kind == "modalities" else items
    if kind == "pair":
        if len(value) != 2:
            raise InputError(path, f"{key}: expected [low, high], got {value!r}")
        pair = tuple(check_scalar(path, key, v, float) for v in value)
        if not 0 < pair[0] <= pair[1]:
            raise InputError(path, f"{key}: expected 0 < low <= high, got {value!r}")
        return pair
    if len(value) != 3:
        raise InputError(path, f"{key}: expected three integers, got {value!r}")
    return tuple(check_scalar(path, key, v, int) for v in value)


def check_settings(settings: TrainSettings, subject="settings") -> None:
    """Value checks shared by the config file and the Python API:
    InputError(subject, "[section] key: problem")."""
    def need(condition, key, message):
        if not condition:
            section = next(name for name, keys in SECTIONS.items() if key in keys)
            raise InputError(subject, f"[{section}] {key}: {message}")

    modalities = list(settings.modalities)
    need(len(modalities) >= 1 and all(m in COHORT_MODALITIES for m in modalities)
         and len(set(modalities)) == len(modalities), "modalities",
         f"each one of {', '.join(COHORT_MODALITIES)}, no repeats, got {modalities}")
    need(modalities[0] == "pet", "modalities",
         f"the first (output-grid) modality must be pet, got {modalities}")
    need(1 <= settings.members <= MAX_MEMBERS, "members", f"1..{MAX_MEMBERS}, got {settings.members}")
    need(settings.scan_steps >= 1, "scan_steps", f"must be >= 1, got {settings.scan_steps}")
    need(settings.steps >= settings.scan_steps and settings.steps % settings.scan_steps == 0, "steps",
         f"a positive multiple of scan_steps ({settings.scan_steps}), got {settings.steps}")
    need(0 <= settings.finetune_steps <= settings.steps
         and settings.finetune_steps % settings.scan_steps == 0, "finetune_steps",
         f"a multiple of scan_steps between 0 and steps, got {settings.finetune_steps}")
    need(settings.batch_size >= 1, "batch_size", f"must be >= 1, got {settings.batch_size}")
    need(all(n >= 8 and n % 4 == 0 for n in settings.patch_shape), "patch_shape",
         f"multiples of 4, each >= 8, got {list(settings.patch_shape)}")
    need(settings.learning_rate > 0, "learning_rate", f"must be > 0, got {settings.learning_rate}")
    need(settings.weight_decay >= 0, "weight_decay", f"must be >= 0, got {settings.weight_decay}")
    need(settings.dice_weight >= 0, "dice_weight", f"must be >= 0, got {settings.dice_weight}")
    need(settings.log_every >= 1, "log_every", f"must be >= 1, got {settings.log_every}")
    need(0 <= settings.real_fraction <= 1, "real_fraction", f"in [0, 1], got {settings.real_fraction}")
    need(len(settings.channels) == 3 and all(c >= 1 for c in settings.channels), "channels",
         f"three positive integers, got {list(settings.channels)}")
    need(0 <= settings.dropout < 1, "dropout", f"in [0, 1), got {settings.dropout}")
    ranges = settings.phantoms
    for name in ("necrotic_probability", "empty_probability", "partial_fov_probability"):
        need(0 <= getattr(ranges, name) <= 1, name, f"in [0, 1], got {getattr(ranges, name)}")
    need(ranges.max_distractors >= 0, "max_distractors", f"must be >= 0, got {ranges.max_distractors}")


def load_settings(path) -> TrainSettings:
    """Parse and validate a training config (module doc); ``cases`` resolved against its folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "not found")
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise InputError(path, f"is not valid TOML ({error})") from None
    values, ranges = {}, {}
    for section, table in config.items():
        if section not in SECTIONS:
            raise InputError(path, f"[{section}]: unknown section (known: {', '.join(sorted(SECTIONS))})")
        if not isinstance(table, dict):
            raise InputError(path, f"{section}: expected a [{section}] table")
        keys = SECTIONS[section]
        for key, value in table.items():
            if key not in keys:
                raise InputError(path, f"[{section}] {key}: unknown key (known: {', '.join(sorted(keys))})")
            typed = _typed(path, f"[{section}] {key}", value, keys[key])
            (ranges if section == "phantoms" else values)[key] = typed
    if "modalities" not in values:
        raise InputError(path, "[train] modalities: required (e.g. [\"pet\", \"ct\"])")
    if "cases" in values:
        values["cases"] = str((path.parent / values["cases"]).resolve())
    settings = TrainSettings(**values, phantoms=PhantomRanges(**ranges))
    check_settings(settings, path)
    return settings


__all__ = ["MAX_MEMBERS", "TrainSettings", "check_settings", "load_settings"]
