"""The method registry (vbseg.methods): every way of segmenting is one registered method with
one signature, listed for the CLI and the experiment runner; one summary.json builder; the
README's worked example of adding a method (vbseg/baselines/eanm41.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import vbseg
from tests.test_cli import main_cli
from vbseg.baselines.classic import BASELINES
from vbseg.deep.segment import NETWORK_BASELINES
from vbseg.errors import InputError
from vbseg.methods import Method, MethodResult, build_summary, get_method, method_names, register
from vbseg.methods.registry import REGISTRY
from vbseg.prepare import prepare


@pytest.fixture(scope="module")
def phantom_paths(tmp_path_factory):
    phantom = vbseg.make_phantom(vbseg.PhantomSpec(diameters_mm=(17.0,)), seed=5)
    return phantom, phantom.save(tmp_path_factory.mktemp("phantom"))


def test_every_model_is_registered_once_and_listed():
    names = method_names()
    assert names[0] == "potts" and len(set(names)) == len(names)
    expected = {"potts", "deep-potts", "pv-potts", "gp", "deep-gp", "prior", "eanm41", "locate-potts",
                *BASELINES, *NETWORK_BASELINES}
    assert set(names) == expected
    with pytest.raises(InputError, match="--model: unknown model 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register(Method("potts", lambda prepared, options: None, "another potts"))


def test_cli_model_help_and_experiment_names_come_from_the_registry(tmp_path):
    result = main_cli("segment", "--help")
    for name in ("potts", "gp", "graphcut", "eanm41", "random_walker"):  # argparse wraps at hyphens
        assert name in result.stdout
    from vbseg.experiment.config import load_experiment

    config = tmp_path / "c.toml"
    config.write_text('[phantoms]\ndiameters_mm = [17]\nseeds = 1\n[model]\nname = ["eanm41", "nope"]\n')
    with pytest.raises(InputError, match="unknown model 'nope'"):
        load_experiment(config)


def test_eanm41_is_the_41_percent_threshold_through_segment(phantom_paths, tmp_path):
    phantom, paths = phantom_paths
    posterior = vbseg.segment([paths["pet"]], tmp_path / "out", model="eanm41", volume_draws=200)
    pet = phantom.pet.data
    np.testing.assert_array_equal(posterior.contour(0.5), pet >= 0.41 * pet.max())
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"] == "eanm41" and summary["options"]["map"] == "mask"
    assert summary["parameters"]["threshold"] == pytest.approx(0.41 * float(pet.max()), rel=1e-6)
    assert summary["volume_ml"]["lower"] == summary["volume_ml"]["upper"]  # a mask: one volume
    refused = main_cli("segment", paths["ct"], "--modality", "ct", "--box", "2:10,2:10,2:10",
                       "--tumour-class", "1", "--model", "eanm41", "--out", tmp_path / "ct")
    assert refused.returncode == 2 and "--model: eanm41 is a PET method" in refused.stderr


def test_one_summary_builder_records_inputs_voi_and_provenance(phantom_paths):
    _, paths = phantom_paths
    prepared = prepare([str(paths["pet"]), str(paths["ct"])], ["pet", "ct"], box="2:12,3:13,4:14", seed=7)
    result = MethodResult(probability=np.zeros(prepared.reference.shape, np.float32),
                          volume_draws_ml=np.ones(10), volume_method="test", tlg_draws=None,
                          model="m", options={"a": 1}, parameters={"b": 2}, diagnostics={"c": 3},
                          elbo=None, timings_s={"compile": 0.0, "run": 0.0}, sections={"extra": {}})
    summary = build_summary(result, prepared)
    assert summary["options"] == {"a": 1, "voi": "box 2:12,3:13,4:14"}
    assert summary["diagnostics"] == {"c": 3, "voi_voxels": 1000,
                                      "voi_bounds": [[2, 12], [3, 13], [4, 14]]}
    assert summary["modality"] == ["pet", "ct"] and summary["seed"] == 7
    assert [r["resampled"] for r in summary["resampled"]] == [False, True]
    assert [i["modality"] for i in summary["inputs"]] == ["pet", "ct"] and "extra" in summary


def test_a_method_registered_by_a_new_module_runs_through_segment(phantom_paths, tmp_path):
    """What a contributor's module does: register, and segment() finds it by name."""
    from vbseg.baselines.method import map_result

    def run_half_max(prepared, options):
        pet = prepared.stack[..., 0]
        return map_result(prepared, options, (pet >= 0.5 * pet.max()).astype(np.float32), "mask",
                          {}, 0.0)

    register(Method("test-half-max", run_half_max, "test only", needs_pet=True))
    try:
        _, paths = phantom_paths
        posterior = vbseg.segment([paths["pet"]], model="test-half-max", volume_draws=200)
        assert posterior.summary["model"] == "test-half-max" and posterior.summary["warnings"] == []
        assert "test-half-max" in method_names()
    finally:
        REGISTRY.pop("test-half-max")


def test_the_readme_example_is_the_shipped_module():
    """README's 'Extending vbseg' code is vbseg/baselines/eanm41.py line for line (not a copy
    that can drift)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    section = readme.split("## Extending vbseg", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    module = (root / "vbseg" / "baselines" / "eanm41.py").read_text()
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) >= 10 and all(line in module for line in lines)
