"""The default model on inputs built like a real crop (vbseg.body_phantom: a limb in air with
fat, muscle, bone and a hot lesion), through the command line, for every modality
combination: the 50 % contour is the lesion, not the body; without PET and without a VOI the
command refuses with one line and writes nothing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tests.test_cli import main_cli
from vbseg.body_phantom import BodyPhantomSpec, make_body_phantom, tissue_map
from vbseg.experiment.config import segment_kwargs
from vbseg.metrics import dice
from vbseg.potts.locate import DEFAULT_MODEL_RULE, default_model


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crop")
    phantom = make_body_phantom(seed=4)
    phantom.save(folder)
    return folder, phantom


def contour_dice(out, truth) -> float:
    return dice(np.asarray(nib.load(out / "contour_50.nii.gz").dataobj) > 0, truth)


def test_body_phantom_has_every_tissue():
    tissue = tissue_map(BodyPhantomSpec())
    counts = np.bincount(tissue.ravel(), minlength=5)
    assert np.all(counts > 0)
    # the body (everything but air) is far larger than the lesion: a body/air split is no lesion
    assert (tissue > 0).sum() > 20 * (tissue == 4).sum()


@pytest.mark.parametrize("modalities", ["pet", "pet,ct", "pet,ct,mr"])
def test_default_contours_the_lesion_for_every_modality_combination(crop, tmp_path, modalities):
    folder, phantom = crop
    images = [folder / f"{m}.nii.gz" for m in modalities.split(",")]
    out = tmp_path / "out"
    result = main_cli("segment", *images, "--modality", modalities, "--out", out)
    assert result.returncode == 0, result.stderr
    assert contour_dice(out, phantom.truth) > 0.9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warnings"] == [] and "warning" not in result.stderr
    fusion = summary["options"]["fusion"]
    if "," in modalities:
        assert fusion["mode"] == "pet" and fusion["chosen"] == "default"
        assert fusion["images_in_likelihood"] == [str(images[0])]
    else:
        assert fusion["mode"] == "joint"
    # PET + CT + MR: locate, then delineate, with the packaged sarcoma prior; else hidden Potts
    assert summary["model"] == ("locate-potts" if modalities == "pet,ct,mr" else "potts")
    assert summary["options"]["model_choice"] == {"chosen": "default", "rule": DEFAULT_MODEL_RULE}
    # the command line says when the default is not plain Potts, and why
    assert ("model locate-potts (the default" in result.stdout) == (modalities == "pet,ct,mr")
    if modalities == "pet,ct,mr":
        assert summary["options"]["locate"]["locator"] == "prior"
        assert "locate-potts" in summary["volume_ml"]["method"]  # its learned volume error
        # the printed volume is the predicted manual volume: the line after it says so, with the
        # model's own volume and the 50 % contour's
        own = summary["diagnostics"]["volume_error"]["uncalibrated_volume_ml"]["mean"]
        contour = nib.load(out / "contour_50.nii.gz")
        voxel_ml = abs(np.linalg.det(contour.affine[:3, :3])) / 1000
        contour_ml = float(np.asarray(contour.dataobj).sum() * voxel_ml)
        assert f"from the model's {own:.2f} mL" in result.stdout
        assert f"the 50 % contour holds {contour_ml:.2f} mL" in result.stdout
    else:
        assert "from the model's" not in result.stdout and "50 % contour holds" not in result.stdout


def test_images_out_of_order_keep_potts_and_say_why(crop, tmp_path):
    """CT, PET, MR (the modalities from the files' order): the sarcoma default needs pet, ct, mr,
    so the default is potts, and the command line says what order would have chosen it."""
    folder, _ = crop
    images = [folder / f"{m}.nii.gz" for m in ("ct", "pet", "mr")]
    out = tmp_path / "order"
    result = main_cli("segment", *images, "--modality", "ct,pet,mr", "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "potts" and summary["options"]["model_choice"]["chosen"] == "default"
    assert "needs the images in the order pet, ct, mr (these came as ct,pet,mr)" in result.stdout


def test_a_given_model_is_kept_and_said(crop, tmp_path):
    """--model potts on PET + CT + MR: the given method, recorded as given."""
    folder, phantom = crop
    images = [folder / f"{m}.nii.gz" for m in ("pet", "ct", "mr")]
    out = tmp_path / "given"
    result = main_cli("segment", *images, "--modality", "pet,ct,mr", "--model", "potts", "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "potts" and summary["options"]["model_choice"]["chosen"] == "given"
    assert contour_dice(out, phantom.truth) > 0.9


@pytest.mark.parametrize("modalities, options, expected", [
    (["pet", "ct", "mr"], {}, "locate-potts"),
    (["pet", "ct", "mr"], {"prior": "sarcoma"}, "potts"),
    (["pet", "ct", "mr"], {"external_field": "field.nii.gz"}, "potts"),
    (["pet", "ct", "mr"], {"intensity_field": "all"}, "potts"),
    (["pet", "ct", "mr"], {"checkpoint": "net.eqx"}, "potts"),
    (["pet", "ct", "mr"], {"num_classes": 3}, "potts"),
    (["pet", "ct", "mr"], {"restarts": "coarse"}, "potts"),
    (["pet", "ct", "mr"], {"envelope_mm": 10.0}, "potts"),
    (["pet", "ct", "mr"], {"fusion": "joint"}, "potts"),
    (["pet", "ct", "mr"], {"psf_fwhm_mm": 6.0}, "potts"),
    (["pet", "ct", "mr"], {"locator": "network"}, "potts"),
    # what does not change the model: outputs, and options given at their defaults
    (["pet", "ct", "mr"], {"volume_draws": 500, "num_classes": None}, "locate-potts"),
    (["pet", "ct", "mr"], {"num_classes": 2, "fusion": "pet", "locator": "prior"}, "locate-potts"),
    (["pet", "mr", "ct"], {}, "potts"),
    (["pet", "ct"], {}, "potts"),
    (["pet"], {}, "potts"),
])
def test_the_default_model_rule(modalities, options, expected):
    assert default_model(modalities, options) == expected


def test_an_experiment_variant_without_a_model_is_potts():
    """Experiments sweep named variants: an unnamed one is potts, not segment's default rule
    (which would use the packaged prior, in sample on the shared sarcomas)."""
    assert segment_kwargs({})["model"] == "potts"
    assert segment_kwargs({"name": "locate-potts"})["model"] == "locate-potts"


def test_joint_two_class_split_finds_the_body_and_warns(crop, tmp_path):
    """What the default avoids: with every image in one two-class split, CT's body/air contrast
    decides the classes; the warnings say so."""
    folder, phantom = crop
    out = tmp_path / "joint"
    result = main_cli("segment", folder / "pet.nii.gz", folder / "ct.nii.gz", "--modality", "pet,ct",
                      "--fusion", "joint", "--out", out)
    assert result.returncode == 0, result.stderr
    assert contour_dice(out, phantom.truth) < 0.2
    body = phantom.tissue > 0
    assert dice(np.asarray(nib.load(out / "contour_50.nii.gz").dataobj) > 0, body) > 0.9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["fusion"]["chosen"] == "given"
    found = [w["code"] for w in summary["warnings"]]
    assert "contour-cut-by-voi" in found
    assert "vbseg: warning: contour-cut-by-voi:" in result.stderr


@pytest.mark.parametrize("model", ["kmeans", "gmm", "graphcut"])
def test_multi_image_baselines_follow_the_same_rule(crop, model):
    """kmeans, gmm and graphcut split every image they are given: with PET deciding, a CT beside
    the PET changes nothing; given PET and CT jointly, k-means finds the body."""
    import vbseg

    folder, phantom = crop
    images = [folder / "pet.nii.gz", folder / "ct.nii.gz"]
    default = vbseg.segment(images, modalities=["pet", "ct"], model=model, volume_draws=200)
    alone = vbseg.segment(images[:1], modalities=["pet"], model=model, volume_draws=200)
    np.testing.assert_array_equal(default.probability, alone.probability)
    assert default.summary["options"]["fusion"]["mode"] == "pet"
    if model == "kmeans":
        assert dice(default.contour(0.5), phantom.truth) > 0.9
        joint = vbseg.segment(images, modalities=["pet", "ct"], model=model, fusion="joint",
                              volume_draws=200)
        assert dice(joint.contour(0.5), phantom.tissue > 0) > 0.9


def test_a_population_prior_takes_no_fusion_option(crop, tmp_path):
    folder, _ = crop
    result = main_cli("segment", *(folder / f"{m}.nii.gz" for m in ("pet", "ct", "mr")), "--prior",
                      "sarcoma", "--fusion", "pet", "--out", tmp_path / "out")
    assert result.returncode == 2 and "--fusion: does not apply with --prior" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_without_pet_and_without_a_voi_nothing_is_written(crop, tmp_path, modality):
    folder, _ = crop
    out = tmp_path / "refused"
    result = main_cli("segment", folder / f"{modality}.nii.gz", "--modality", modality,
                      "--tumour-class", "1", "--out", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--roi/--box" in lines[0] and "without a PET image" in lines[0]
    assert not out.exists()
