"""Typed options (vbseg.options): one frozen dataclass per concern (model, fit, outputs), built
from flat keywords, defaults resolved in one place, validated once (every message is tested
through the CLI in tests/test_cli.py)."""

from __future__ import annotations

import dataclasses

import pytest

from vbseg.errors import InputError
from vbseg.options import (
    CONCERNS,
    DEFAULT_BETA,
    DEFAULT_BETA_PSF,
    OPTION_KEYWORDS,
    FitOptions,
    ModelOptions,
    OutputOptions,
    SegmentOptions,
    default_beta,
    default_fusion,
    fusion_columns,
    model_fusion,
)


def test_options_are_frozen_and_unknown_ones_are_a_type_error():
    options = SegmentOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.model = ModelOptions(name="gp")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.model.name = "gp"
    with pytest.raises(TypeError, match="clases"):
        SegmentOptions.from_values(clases=3)
    # a concern given a flat value (the old flat dataclass's spelling) is refused, not stored
    with pytest.raises(TypeError, match="SegmentOptions.model must be a ModelOptions"):
        SegmentOptions(model="gp")


def test_flat_keywords_land_in_their_concern():
    options = SegmentOptions.from_values(model="gp", beta=0.7, sampler="gibbs", restarts="coarse",
                                         volume_draws=500)
    assert options.model == ModelOptions(name="gp", beta=0.7)
    assert options.fit == FitOptions(sampler="gibbs", restarts="coarse")
    assert options.outputs == OutputOptions(volume_draws=500)
    replaced = options.replace(model="potts", volume_draws=1000)
    assert (replaced.model.name, replaced.model.beta, replaced.fit, replaced.outputs.volume_draws) == (
        "potts", 0.7, options.fit, 1000)
    assert options.model.name == "gp"  # replace makes a copy
    # values() inverts from_values, concern by concern
    assert SegmentOptions.from_values(**options.values()) == options
    assert set(options.values(("fit",))) == {"sampler", "restarts"}
    assert options.values(("outputs",)) == {"volume_draws": 500}
    assert set(options.values()) == set(OPTION_KEYWORDS)


def test_each_keyword_names_one_field_of_one_concern():
    fields = [(concern, field.name) for concern, kind in CONCERNS.items()
              for field in dataclasses.fields(kind)]
    assert sorted(fields) == sorted((concern, field.name) for concern, field in OPTION_KEYWORDS.values())
    assert OPTION_KEYWORDS["model"][0] == "model" and OPTION_KEYWORDS["model"][1].name == "name"


def test_beta_defaults_follow_the_psf():
    assert default_beta(ModelOptions()) == DEFAULT_BETA
    assert default_beta(ModelOptions(psf_fwhm_mm=6.0)) == DEFAULT_BETA_PSF
    assert default_beta(ModelOptions(beta="auto")) == "auto"
    assert default_beta(ModelOptions(beta=0.0)) == 0.0


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
    assert model_fusion(ModelOptions(name=model, covariance=covariance), modalities) == expected
    assert model_fusion(ModelOptions(name=model, fusion="joint"), modalities) == "joint"


def test_fusion_columns_pick_every_pet_image():
    assert fusion_columns("pet", ["ct", "pet", "mr", "pet"]) == [1, 3]
    assert fusion_columns("joint", ["ct", "pet"]) == [0, 1]


def test_check_validates_the_options_against_the_inputs():
    SegmentOptions().check(num_images=2, modalities=["pet", "ct"], levels_percent=(10, 50, 90))
    with pytest.raises(InputError, match="--modality: names 2 modalities for 1 images"):
        SegmentOptions().check(num_images=1, modalities=["pet", "ct"], levels_percent=(50,))
    mr = SegmentOptions.from_values(tumour_class=1)
    with pytest.raises(InputError, match="--roi/--box: required without a PET image"):
        mr.check(num_images=1, modalities=["mr"], levels_percent=(50,))
    mr.check(num_images=1, modalities=["mr"], levels_percent=(50,), box="0:4,0:4,0:4")
    with pytest.raises(InputError, match="--classes"):
        SegmentOptions.from_values(num_classes=9).check(num_images=1, modalities=["pet"],
                                                        levels_percent=(50,))


@pytest.mark.parametrize("values, message", [
    ({"sampler": "mcmc"}, "--sampler: must be one of vb, gibbs"),
    ({"restarts": "coarse", "model": "gp"}, "--restarts: coarse restarts are for the hidden Potts fit"),
    ({"sampler": "gibbs", "model": "gp"}, "--sampler: applies to --model potts"),
    ({"sampler": "gibbs", "model": "pv-potts"}, "--sampler: does not apply to --model pv-potts"),
    ({"sampler": "gibbs", "intensity_field": "all"}, "--intensity-field: cannot be combined with "
                                                     "--sampler gibbs"),
    ({"volume_draws": 99}, "--volume-draws: must be an integer from 100"),
    ({"volume_draws": True}, "--volume-draws: must be an integer from 100"),
])
def test_fit_and_output_options_are_checked_against_the_model(values, message):
    with pytest.raises(InputError, match=message):
        SegmentOptions.from_values(**values).check(num_images=1, modalities=["pet"], levels_percent=(50,))


def test_every_option_is_listed_once_and_reaches_the_cli_and_the_configs():
    """OPTION_KEYWORDS is the one list of the options: each keyword is a `vbseg segment`
    option whose dest is the keyword, and a key of experiment configs; parsing a command line
    gives exactly the options it names (the rest keep their defaults)."""
    from vbseg.cli import build_parser, option_values
    from vbseg.experiment.config import MODEL_KEYS

    names = set(OPTION_KEYWORDS)
    segment = next(action for action in build_parser()._subparsers._group_actions[0].choices.values()
                   if action.prog.endswith("segment"))
    dests = {action.dest for action in segment._actions}
    assert names <= dests
    assert {keyword for keyword, _ in MODEL_KEYS.values()} == names
    args = build_parser().parse_args(["segment", "pet.nii.gz", "--out", "o", "--classes", "3",
                                      "--beta", "auto", "--field-weight", "1.5", "--psf-fwhm", "6",
                                      "--sampler", "gibbs", "--volume-draws", "300"])
    assert option_values(args) == {"num_classes": 3, "beta": "auto", "field_weight": 1.5,
                                   "psf_fwhm_mm": 6.0, "sampler": "gibbs", "volume_draws": 300}
    options = SegmentOptions.from_values(**option_values(args))
    assert options.model.neighbourhood == ModelOptions().neighbourhood
    assert (options.fit.sampler, options.outputs.volume_draws) == ("gibbs", 300)
