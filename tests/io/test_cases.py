"""Case indexes (CASES.json, :mod:`vbseg.io.cases`) whose files are NRRD, MetaImage, MGH or NIfTI
pairs (issue 21): read through the one image reader of :mod:`vbseg.io.volume`, so ``fit-prior``,
training cases, folds and experiments take them as they take NIfTI; a missing or unsupported
file named in an index is one line, exit 2, nothing written.

The cohort is :func:`vbseg.phantoms.make_cohort`'s (NIfTI), converted file by file by the
libraries that read each format (SimpleITK, nibabel) onto the same world grids.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.io.test_image_files import itk_from_volume, written
from tests.test_cli import digest, main_cli
from vbseg.cohort.model import load_prior
from vbseg.cohort.population import load_training_case
from vbseg.deep.training_data import load_deep_case
from vbseg.experiment.folds import make_folds
from vbseg.io.cases import read_cases
from vbseg.phantoms import make_cohort

MODALITIES = ["pet", "ct", "mr"]
# (modality, role) -> the suffix the converted index uses
SUFFIXES = {("pet", "image"): ".nrrd", ("pet", "label"): ".mha", ("ct", "image"): ".mgz",
            ("ct", "label"): ".nhdr", ("mr", "image"): ".hdr", ("mr", "label"): ".mhd"}


def convert(source: Path, target: Path) -> str:
    """``source`` (NIfTI) rewritten as ``target``, its format by suffix, on the same world grid."""
    image = nib.load(source)
    data, affine = np.asarray(image.dataobj), image.affine
    if target.suffix in (".nrrd", ".nhdr", ".mha", ".mhd"):
        return written(itk_from_volume(data, affine), target)
    kind = nib.MGHImage if target.suffix == ".mgz" else nib.Nifti1Pair  # .hdr/.img
    nib.save(kind(data, affine), target)
    return str(target)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """(the NIfTI index, the same cases in other formats) of a three-case cohort."""
    folder = tmp_path_factory.mktemp("cohort")
    nifti_index = make_cohort(folder, 3, seed=3)
    other = folder / "other"
    other.mkdir()
    entries = json.loads(nifti_index.read_text())
    for entry in entries:
        for modality, files in entry["modalities"].items():
            for role in ("image", "label"):
                name = files[role].removesuffix(".nii.gz") + SUFFIXES[modality, role]
                convert(folder / files[role], other / name)
                files[role] = name
    (other / "cases.json").write_text(json.dumps(entries))
    return nifti_index, other / "cases.json"


def test_an_index_of_other_formats_loads_as_the_nifti_one(indexes):
    """Training cases (population prior and network), folds: the same arrays from either index."""
    nifti_index, other_index = indexes
    nifti, other = (read_cases(index, MODALITIES) for index in indexes)
    assert [c.name for c in other] == [c.name for c in nifti] == ["syn00", "syn01", "syn02"]
    assert other[0].images[0].endswith(".nrrd") and other[0].label.endswith(".mha")
    for a, b in zip(nifti, other):
        expected, found = load_training_case(a), load_training_case(b)
        for field in ("features", "observed", "roi", "tumour"):
            np.testing.assert_allclose(getattr(found, field), getattr(expected, field), atol=1e-5)
        assert found.spacing == pytest.approx(expected.spacing)
        np.testing.assert_allclose(load_deep_case(b).inputs, load_deep_case(a).inputs, atol=1e-5)
    assert make_folds(other_index, k=2)["folds"] == make_folds(nifti_index, k=2)["folds"]


def test_fit_prior_and_an_experiment_from_an_index_of_other_formats(indexes, tmp_path):
    _, index = indexes
    out = tmp_path / "prior.json"
    result = main_cli("fit-prior", index, "--modalities", "pet,ct,mr", "--out", out,
                      "--cases", "syn00,syn01", "--background-classes", "2")
    assert result.returncode == 0, result.stderr
    assert load_prior(out).cases == ["syn00", "syn01"]
    assert [p.name for p in tmp_path.iterdir()] == ["prior.json"]  # no temporary file, no lock
    config = tmp_path / "real.toml"
    config.write_text(f'[real]\nindex = "{index}"\nmodalities = ["pet", "ct"]\n[model]\nname = "gmm"\n')
    result = main_cli("experiment", config, "--out", tmp_path / "experiment")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = (tmp_path / "experiment" / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    statuses = [row.split(",")[header.index("status")] for row in rows[1:]]
    assert statuses == ["ok"] * 3


@pytest.mark.parametrize("command", ["fit-prior", "experiment"])
@pytest.mark.parametrize("problem", ["file not found", "unknown image file type"])
def test_a_missing_or_unsupported_file_in_an_index_is_one_line(indexes, tmp_path, problem, command):
    _, index = indexes
    entries = json.loads(index.read_text())
    for entry in entries:  # the edited index lives elsewhere: absolute file names
        for files in entry["modalities"].values():
            files.update({role: str(index.parent / name) for role, name in files.items()})
    bad = tmp_path / ("absent.nrrd" if problem == "file not found" else "scan.png")
    if problem != "file not found":
        bad.write_bytes(b"\x89PNG")
    entries[1]["modalities"]["ct"]["image"] = str(bad)
    edited = tmp_path / "cases.json"
    edited.write_text(json.dumps(entries))
    config = tmp_path / "real.toml"
    config.write_text(f'[real]\nindex = "{edited}"\nmodalities = ["pet", "ct"]\n[model]\nname = "gmm"\n')
    before = digest(tmp_path)
    args = (["fit-prior", edited, "--modalities", "pet,ct", "--out", tmp_path / "prior.json"]
            if command == "fit-prior" else ["experiment", config, "--out", tmp_path / "out"])
    result = main_cli(*args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"vbseg: error: {bad}: ") and problem in result.stderr
    assert "Traceback" not in result.stderr and digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["cases.json", "real.toml"] + (["scan.png"] if problem != "file not found" else []))
