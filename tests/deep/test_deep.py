"""The 3D U-Net (vbseg.deep.model) and its training (vbseg.deep.training): shapes, a short seeded
training run, checkpoint round trips, MC-dropout, bad inputs and the packaged checkpoints.

Kept cheap: a tiny network (channels 2, 4, 8) on 16^3 grids; one short training run."""

from __future__ import annotations

import contextlib
import io
import json

import jax
import numpy as np
import pytest

from vbseg.deep.model import (
    DeepCheckpoint,
    UNet3D,
    architecture_record,
    check_modalities,
    dropout_probabilities,
    load_checkpoint,
    member_probabilities,
    network_inputs,
    network_logits,
    packaged_checkpoint,
    save_checkpoint,
)
from vbseg.deep.training import TrainSettings, load_settings, train
from vbseg.deep.training_data import PhantomRanges, synthetic_patch
from vbseg.errors import InputError

TINY_CHANNELS = (2, 4, 8)
ODD_SHAPE = (13, 10, 9)  # padded to 16^3 inside, cropped back


def tiny_checkpoint(modalities=("pet", "ct"), members=2) -> DeepCheckpoint:
    models = tuple(UNet3D(len(modalities), TINY_CHANNELS, 0.3, key=jax.random.PRNGKey(m))
                   for m in range(members))
    meta = {"modalities": list(modalities), "seed": 0, "members": members,
            "architecture": architecture_record(len(modalities), TINY_CHANNELS, 0.3),
            "training": {"steps": 0}, "real_cases": [], "vbseg_version": "test"}
    return DeepCheckpoint(models, meta, "tiny")


@pytest.fixture(scope="module")
def checkpoint() -> DeepCheckpoint:
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def images():
    """A PET/CT stack (13, 10, 9, 2) in SUV and HU, the CT field of view cut short."""
    stack, observed, tumour, _, _ = synthetic_patch(np.random.default_rng(0), ODD_SHAPE, ["pet", "ct"])
    observed[:, :, :2, 1] = False
    return stack, observed, tumour


def test_layers_match_reference_convolutions():
    """The scan-over-offsets 3x3x3 convolution equals XLA's (cross-correlation, zero 'SAME'
    padding) and the 2x2x2 stride-2 up-convolution equals its definition, to float32 rounding."""
    from vbseg.deep.model import Conv3x3x3, UpConv

    x = np.random.default_rng(0).normal(size=(3, 6, 5, 4)).astype(np.float32)
    conv = Conv3x3x3(3, 2, key=jax.random.PRNGKey(1))
    reference = jax.lax.conv_general_dilated(x[None], conv.weight, (1, 1, 1), "SAME")[0]
    np.testing.assert_allclose(conv(x), reference + conv.bias[:, None, None, None], atol=1e-5)
    up = UpConv(3, 2, key=jax.random.PRNGKey(2))
    expected = np.zeros((2, 12, 10, 8), np.float32) + np.asarray(up.bias)[:, None, None, None]
    for a, b, c in np.ndindex(2, 2, 2):
        expected[:, a::2, b::2, c::2] += np.einsum("oi,ixyz->oxyz", np.asarray(up.weight)[..., a, b, c], x)
    np.testing.assert_allclose(up(x), expected, atol=1e-5)


def test_logits_come_back_on_the_input_grid_and_finite(checkpoint, images):
    stack, observed, _ = images
    logits = network_logits(checkpoint, stack, observed, ["pet", "ct"])
    assert logits.shape == ODD_SHAPE and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    members = [network_logits(checkpoint, stack, observed, ["pet", "ct"], member=m) for m in (0, 1)]
    assert not np.allclose(members[0], members[1])
    np.testing.assert_allclose(logits, (members[0] + members[1]) / 2, atol=1e-5)
    np.testing.assert_array_equal(logits, network_logits(checkpoint, stack, observed, ["pet", "ct"]))


def test_network_inputs_zero_where_unobserved(images):
    stack, observed, _ = images
    inputs = network_inputs(stack, observed, ["pet", "ct"])
    assert inputs.shape == (2,) + ODD_SHAPE
    assert np.all(inputs[1][~observed[..., 1]] == 0.0)
    np.testing.assert_allclose(inputs[0], np.log(np.maximum(stack[..., 0], 0.1)), rtol=1e-6)


def test_mc_dropout_passes_differ_and_repeat_with_the_seed(checkpoint, images):
    stack, observed, _ = images
    samples = dropout_probabilities(checkpoint, stack, observed, ["pet", "ct"], num_samples=3, seed=4)
    assert samples.shape == (3,) + ODD_SHAPE
    assert np.all((samples >= 0) & (samples <= 1))
    assert not np.allclose(samples[0], samples[1])
    again = dropout_probabilities(checkpoint, stack, observed, ["pet", "ct"], num_samples=3, seed=4)
    np.testing.assert_array_equal(samples, again)
    ensemble = member_probabilities(checkpoint, stack, observed, ["pet", "ct"])
    assert ensemble.shape == (2,) + ODD_SHAPE
    first = network_logits(checkpoint, stack, observed, ["pet", "ct"], member=0)
    np.testing.assert_allclose(ensemble[0], 1 / (1 + np.exp(-first)), atol=1e-6)


def test_checkpoint_round_trip_gives_identical_logits(checkpoint, images, tmp_path):
    stack, observed, _ = images
    path = tmp_path / "net.eqx"
    save_checkpoint(path, checkpoint)
    assert path.is_file() and (tmp_path / "net.json").is_file()
    loaded = load_checkpoint(path)
    assert loaded.meta["modalities"] == ["pet", "ct"] and loaded.meta["members"] == 2
    assert json.loads((tmp_path / "net.json").read_text()) == loaded.meta
    for member in (0, 1):
        np.testing.assert_array_equal(
            network_logits(checkpoint, stack, observed, ["pet", "ct"], member=member),
            network_logits(loaded, stack, observed, ["pet", "ct"], member=member))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.eqx", "net.json"]  # no temporaries


def test_bad_checkpoints_and_inputs_get_one_line_errors(checkpoint, images, tmp_path):
    stack, observed, _ = images
    with pytest.raises(InputError, match="not found") as error:
        load_checkpoint(tmp_path / "missing.eqx")
    assert str(tmp_path / "missing.eqx") in str(error.value)
    path = tmp_path / "net.eqx"
    save_checkpoint(path, checkpoint)
    loaded = load_checkpoint(path)
    with pytest.raises(InputError, match="checkpoint expects pet,ct inputs, got pet$") as error:
        network_logits(loaded, stack[..., :1], observed[..., :1], ["pet"])
    assert str(error.value).startswith(str(path))
    with pytest.raises(InputError, match="checkpoint expects pet,ct inputs, got pet,ct,mr"):
        check_modalities(loaded, ["pet", "ct", "mr"], "x.eqx")
    meta = json.loads((tmp_path / "net.json").read_text())
    meta["architecture"]["channels"] = [4, 8, 16]
    (tmp_path / "net.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="do not match the architecture"):
        load_checkpoint(path)
    (tmp_path / "net.json").unlink()
    with pytest.raises(InputError, match="metadata"):
        load_checkpoint(path)


def test_bad_training_configs_name_the_file_and_key(tmp_path):
    from vbseg.cli import main

    config = tmp_path / "train.toml"
    config.write_text('[train]\nmodalities = ["pet"]\nstepz = 3\n')
    with pytest.raises(InputError, match=r"\[train\] stepz: unknown key") as error:
        load_settings(config)
    assert str(error.value).startswith(str(config))
    config.write_text('[train]\nmodalities = ["pet"]\nsteps = "many"\n')
    with pytest.raises(InputError, match=r"\[train\] steps: expected int"):
        load_settings(config)
    config.write_text('[train]\nmodalities = ["pet", "ct"]\n[network]\ndropout = 1.5\n')
    with pytest.raises(InputError, match=r"\[network\] dropout: in \[0, 1\)"):
        load_settings(config)
    config.write_text('[train]\nmodalities = ["pet"]\n[phantoms]\ncv = [0.3, 0.1]\n')
    with pytest.raises(InputError, match=r"\[phantoms\] cv: expected 0 < low <= high"):
        load_settings(config)
    config.write_text('[train]\nmodalities = ["pet"]\nmembers = 4\n')
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = main(["train", str(config), "--out", str(tmp_path / "out.eqx")])
    assert status == 2
    assert stderr.getvalue() == f"vbseg: error: {config}: [train] members: 1..3, got 4\n"
    assert not (tmp_path / "out.eqx").exists()


def test_synthetic_patches_are_seeded():
    first = synthetic_patch(np.random.default_rng(7), (12, 12, 8), ["pet", "ct", "mr"])
    second = synthetic_patch(np.random.default_rng(7), (12, 12, 8), ["pet", "ct", "mr"])
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    stack, observed, tumour, valid, spacing = first
    assert stack.shape == (12, 12, 8, 3) and observed.shape == stack.shape and tumour.shape == (12, 12, 8)
    assert np.all(stack[..., 0] >= 0) and np.all(tumour <= valid)


def test_short_seeded_training_reduces_the_loss(tmp_path):
    """30 steps of a small network on easy patches (one 20-40 mm lesion at 4-8:1, no distractors):
    with seed 0 the mean loss falls from 1.43 over the first 5 steps to 0.69 over the last 10
    (other seeds: by 0.24-0.69)."""
    easy = PhantomRanges(diameter_mm=(20.0, 40.0), contrast=(4.0, 8.0), max_distractors=0,
                         empty_probability=0.0, necrotic_probability=0.0)
    settings = TrainSettings(modalities=("pet",), seed=0, steps=30, finetune_steps=0, batch_size=2,
                             patch_shape=(16, 16, 16), channels=(4, 8, 8), scan_steps=5, log_every=10,
                             learning_rate=3e-2, phantoms=easy)
    trained = train(settings, cases=[])
    record = trained.meta["training"]["members"][0]
    trace = [loss for _, loss in record["loss_trace"]]
    assert len(trace) == 3 and np.all(np.isfinite(trace))
    assert record["final_loss"] < record["initial_loss"] - 0.2
    assert trained.meta["real_cases"] == [] and trained.meta["modalities"] == ["pet"]
    save_checkpoint(tmp_path / "trained.eqx", trained)
    assert load_checkpoint(tmp_path / "trained.eqx").meta["training"]["members"][0]["loss_trace"] \
        == record["loss_trace"]


@pytest.mark.parametrize("modalities", [("pet",), ("pet", "ct"), ("pet", "ct", "mr")])
def test_packaged_checkpoints_load_and_match_their_modalities(modalities):
    path = packaged_checkpoint(modalities)
    assert path is not None and path.is_file(), f"no packaged checkpoint for {modalities}"
    assert path.stat().st_size + path.with_suffix(".json").stat().st_size < 5 * 2**20
    loaded = load_checkpoint(path)
    check_modalities(loaded, modalities, path)
    assert loaded.meta["modalities"] == list(modalities)
    for key in ("architecture", "seed", "members", "training", "real_cases", "vbseg_version"):
        assert key in loaded.meta
    assert packaged_checkpoint(("ct",)) is None and packaged_checkpoint(("pet", "mr")) is None


@pytest.mark.parametrize("stem", ["train_pet", "train_pet_ct", "train_pet_ct_mr"])
def test_packaged_checkpoints_saw_every_shared_case_their_config_names(stem):
    """Each packaged checkpoint was trained on the real cases its config takes from the shared
    index today (every patient case with its modalities, none excluded): a case added to the
    index and not to the checkpoint fails here until the recorded command is rerun."""
    from pathlib import Path

    from vbseg.deep.model import load_checkpoint, packaged_checkpoint
    from vbseg.deep.training import load_settings
    from vbseg.io.cases import read_cases

    root = Path(__file__).resolve().parents[2]
    settings = load_settings(root / "experiments" / f"{stem}.toml")
    if settings.cases is None or not Path(settings.cases).is_file():
        pytest.skip(f"{settings.cases}: the shared cases index is absent, so the training list "
                    "cannot be checked")
    expected = [c.name for c in read_cases(settings.cases, settings.modalities, settings.train_cases,
                                           check_files=False)
                if c.name not in settings.exclude_cases]
    meta = load_checkpoint(packaged_checkpoint(settings.modalities)).meta
    assert meta["real_cases"] == expected
    assert len(expected) == 21 and not settings.exclude_cases


@pytest.mark.parametrize("stem", ["train_pet", "train_pet_ct", "train_pet_ct_mr"])
def test_shipped_training_configs_parse_and_match_their_checkpoints(stem):
    """Each packaged checkpoint records the settings of the config that remakes it."""
    from pathlib import Path

    from vbseg.deep.model import load_checkpoint, packaged_checkpoint
    from vbseg.deep.training import load_settings

    root = Path(__file__).resolve().parents[2]
    settings = load_settings(root / "experiments" / f"{stem}.toml")
    meta = load_checkpoint(packaged_checkpoint(settings.modalities)).meta
    recorded = meta["training"]["settings"]
    for key in ("seed", "members", "steps", "finetune_steps", "batch_size", "learning_rate"):
        assert recorded[key] == getattr(settings, key), key
    assert meta["modalities"] == list(settings.modalities)
