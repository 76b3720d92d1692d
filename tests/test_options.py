"""Typed options (vbseg.options.SegmentOptions): defaults resolved in one place, validated once
(every message is tested through the CLI in tests/test_cli.py)."""

from __future__ import annotations

import dataclasses

import pytest

from vbseg.errors import InputError
from vbseg.options import (
    DEFAULT_BETA,
    DEFAULT_BETA_PSF,
    SegmentOptions,
    default_beta,
    default_fusion,
    fusion_columns,
)


def test_options_are_frozen_and_unknown_ones_are_a_type_error():
    options = SegmentOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.model = "gp"
    with pytest.raises(TypeError):
        SegmentOptions(clases=3)


def test_beta_defaults_follow_the_psf():
    assert default_beta(SegmentOptions()) == DEFAULT_BETA
    assert default_beta(SegmentOptions(psf_fwhm_mm=6.0)) == DEFAULT_BETA_PSF
    assert default_beta(SegmentOptions(beta="auto")) == "auto"
    assert default_beta(SegmentOptions(beta=0.0)) == 0.0


@pytest.mark.parametrize("model, modalities, covariance, expected", [
    ("potts", ["pet"], "diagonal", "joint"),
    ("potts", ["pet", "ct"], "diagonal", "pet"),
    ("deep-gp", ["pet", "ct", "mr"], "diagonal", "pet"),
    ("kmeans", ["pet", "ct"], "diagonal", "pet"),
    ("potts", ["pet", "ct"], "full", "joint"),
    ("potts", ["ct", "mr"], "diagonal", "joint"),
    ("cnn", ["pet", "ct"], "diagonal", "joint"),
])
def test_default_fusion(model, modalities, covariance, expected):
    assert default_fusion(model, modalities, covariance) == expected


def test_fusion_columns_pick_every_pet_image():
    assert fusion_columns("pet", ["ct", "pet", "mr", "pet"]) == [1, 3]
    assert fusion_columns("joint", ["ct", "pet"]) == [0, 1]


def test_check_validates_the_options_against_the_inputs():
    SegmentOptions().check(num_images=2, modalities=["pet", "ct"], levels_percent=(10, 50, 90))
    with pytest.raises(InputError, match="--modality: names 2 modalities for 1 images"):
        SegmentOptions().check(num_images=1, modalities=["pet", "ct"], levels_percent=(50,))
    with pytest.raises(InputError, match="--roi/--box: required without a PET image"):
        SegmentOptions(tumour_class=1).check(num_images=1, modalities=["mr"], levels_percent=(50,))
    SegmentOptions(tumour_class=1).check(num_images=1, modalities=["mr"], levels_percent=(50,),
                                         box="0:4,0:4,0:4")
    with pytest.raises(InputError, match="--classes"):
        SegmentOptions(num_classes=9).check(num_images=1, modalities=["pet"], levels_percent=(50,))


def test_every_option_is_listed_once_and_reaches_the_cli_and_the_configs():
    """SegmentOptions is the one list of the model options: each field is a `vbseg segment`
    option whose dest is the field's name, and a key of experiment configs; parsing a command
    line gives exactly the fields it names (the rest keep the dataclass's defaults)."""
    import dataclasses

    from vbseg.cli import build_parser, option_values
    from vbseg.experiment.config import MODEL_KEYS
    from vbseg.options import SegmentOptions

    names = {field.name for field in dataclasses.fields(SegmentOptions)}
    segment = next(action for action in build_parser()._subparsers._group_actions[0].choices.values()
                   if action.prog.endswith("segment"))
    dests = {action.dest for action in segment._actions}
    assert names <= dests
    assert {field for field, _ in MODEL_KEYS.values()} == names
    args = build_parser().parse_args(["segment", "pet.nii.gz", "--out", "o", "--classes", "3",
                                      "--beta", "auto", "--field-weight", "1.5", "--psf-fwhm", "6"])
    assert option_values(args) == {"num_classes": 3, "beta": "auto", "field_weight": 1.5,
                                   "psf_fwhm_mm": 6.0}
    assert SegmentOptions(**option_values(args)).neighbourhood == SegmentOptions().neighbourhood
