"""``vbseg segment --batch CASES.json`` (issue 21, item 5): one output folder per case, a
case that fails while it runs recorded and the batch going on, exit status 1 when a case
failed, finished cases skipped on a re-run (unless --overwrite), Ctrl-C leaving the finished
cases as they were, problems with the index or the options as one line with exit status 2,
nothing written, and cases that cannot run (a missing file, a modality they lack, an option
that does not suit their images) refused before the first fit, one line each.

Small phantoms and the ``gmm`` baseline (a probabilistic method without a JIT compilation), so
the batch machinery, not a model, is what takes the time.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.test_cli import digest, interrupted_at, main_cli
from vbseg.io.volume import save_nifti
from vbseg.phantoms import PhantomSpec, make_phantom

MODEL = ["--model", "gmm"]
RESULT_SET = {"prob.nii.gz", "contour_10.nii.gz", "contour_50.nii.gz", "contour_90.nii.gz",
              "summary.json", "overview.png"}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """An index of three cases: 'alpha' (PET + CT, a label), 'beta' (one PET image in the
    single-modality shape, a VOI mask) and 'nan' (a PET with a NaN voxel, found only when its
    voxels are read)."""
    folder = tmp_path_factory.mktemp("cases")
    entries = []
    for name, seed in (("alpha", 1), ("beta", 2)):
        phantom = make_phantom(PhantomSpec(diameters_mm=(16.0,)), seed=seed)
        save_nifti(folder / f"{name}_pet.nii.gz", phantom.pet.data, phantom.pet.affine)
        save_nifti(folder / f"{name}_ct.nii.gz", phantom.ct.data, phantom.ct.affine)
        save_nifti(folder / f"{name}_label.nii.gz", phantom.truth.astype(np.uint8), phantom.pet.affine)
    roi = np.zeros(phantom.pet.shape, np.uint8)
    roi[3:-3, 3:-3, 3:-3] = 1
    save_nifti(folder / "beta_roi.nii.gz", roi, phantom.pet.affine)
    nan = phantom.pet.data.copy()
    nan[1, 2, 3] = np.nan
    save_nifti(folder / "nan_pet.nii.gz", nan, phantom.pet.affine)
    entries = [
        {"case": "alpha", "kind": "phantom", "modalities": {
            "pet": {"image": "alpha_pet.nii.gz", "label": "alpha_label.nii.gz"},
            "ct": {"image": "alpha_ct.nii.gz"}}},
        {"case": "beta", "modality": "PET", "image": "beta_pet.nii.gz", "roi": "beta_roi.nii.gz"},
        {"case": "nan", "modality": "PET", "image": "nan_pet.nii.gz"},
    ]
    (folder / "cases.json").write_text(json.dumps(entries))
    return folder


def record(out) -> dict:
    return {row["case"]: row for row in json.loads((out / "batch.json").read_text())["cases"]}


def test_batch_one_folder_per_case_failures_recorded_resume_and_overwrite(cases, tmp_path):
    out = tmp_path / "results"
    before = digest(cases)
    first = main_cli("segment", "--batch", cases / "cases.json", *MODEL, "--out", out)
    assert first.returncode == 1, first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "batch.json", "beta"]
    rows = record(out)
    assert [row["status"] for row in rows.values()] == ["done", "done", "failed"]
    assert rows["nan"]["error"] == f"{cases / 'nan_pet.nii.gz'}: 1 voxels are NaN or infinite"
    for name in ("alpha", "beta"):
        assert {p.name for p in (out / name).iterdir()} == RESULT_SET
        summary = json.loads((out / name / "summary.json").read_text())
        assert rows[name]["volume_ml"]["mean"] == pytest.approx(summary["volume_ml"]["mean"])
        assert rows[name]["volume_ml"]["lower"] <= rows[name]["volume_ml"]["upper"]
        assert summary["model"] == json.loads((out / "alpha" / "summary.json").read_text())["model"]
        assert rows[name]["model"] == summary["model"]  # each case's method (the default may differ)
    assert rows["nan"]["model"] is None
    alpha = json.loads((out / "alpha" / "summary.json").read_text())
    beta = json.loads((out / "beta" / "summary.json").read_text())
    assert alpha["modality"] == ["pet", "ct"] and "dice_50" in alpha["reference_mask"]
    assert beta["modality"] == ["pet"] and beta["options"]["voi"] == "roi"
    assert "reference_mask" not in beta
    assert "alpha: done: " in first.stdout and "3 cases: 2 done, 0 finished before, 1 failed" in first.stdout
    assert digest(cases) == before

    finished = {name: digest(out / name) for name in ("alpha", "beta")}
    again = main_cli("segment", "--batch", cases / "cases.json", *MODEL, "--out", out)
    assert again.returncode == 1
    rows = record(out)
    assert [rows[n]["status"] for n in ("alpha", "beta")] == ["skipped (finished before)"] * 2
    assert rows["alpha"]["volume_ml"]["mean"] == pytest.approx(alpha["volume_ml"]["mean"])
    assert rows["alpha"]["model"] == alpha["model"]
    assert {name: digest(out / name) for name in ("alpha", "beta")} == finished

    kept = digest(out)
    only_pet_ct = main_cli("segment", "--batch", cases / "cases.json", *MODEL, "--modality", "pet,ct",
                           "--levels", "30", "--overwrite", "--out", out)
    assert only_pet_ct.returncode == 2 and only_pet_ct.stderr.splitlines() == [
        f"vbseg: error: {cases / 'cases.json'}: case {name}: has no ct image" for name in ("beta", "nan")]
    assert digest(out) == kept and {name: digest(out / name) for name in ("alpha", "beta")} == finished
    relevelled = main_cli("segment", "--batch", cases / "cases.json", *MODEL, "--levels", "30",
                          "--overwrite", "--out", out)
    assert relevelled.returncode == 1
    assert [row["status"] for row in record(out).values()] == ["done", "done", "failed"]
    assert "contour_30.nii.gz" in {p.name for p in (out / "alpha").iterdir()}


def test_batch_without_failures_exits_0(cases, tmp_path):
    index = tmp_path / "two.json"
    entries = json.loads((cases / "cases.json").read_text())[:2]
    for entry in entries:  # file names relative to the index's own folder
        for files in entry.get("modalities", {"": entry}).values():
            for key in ("image", "label", "roi"):
                if key in files:
                    files[key] = str(cases / files[key])
        if "roi" in entry:
            entry["roi"] = str(cases / entry["roi"])
    index.write_text(json.dumps(entries))
    result = main_cli("segment", "--batch", index, *MODEL, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [row["status"] for row in record(tmp_path / "out").values()] == ["done", "done"]


BAD_BATCHES = {
    # name: (index entries or None for the fixture's, extra arguments, subject, problem)
    "images too": (None, ["IMAGE"], "--batch", "takes no image arguments"),
    "roi too": (None, ["--roi", "IMAGE"], "--roi", "does not go with --batch"),
    "reference too": (None, ["--reference", "IMAGE"], "--reference", "does not go with --batch"),
    "unknown modality": (None, ["--modality", "pet,spect"], "--modality", "unknown modality 'spect'"),
    "bad option": (None, ["--classes", "1"], "--classes", "2 to 8"),
    "name twice": ([{"case": "a", "modality": "PET", "image": "x.nii.gz"}] * 2, [], "INDEX",
                   "named twice"),
    "path as name": ([{"case": "../a", "modality": "PET", "image": "x.nii.gz"}], [], "INDEX",
                     "cannot be a folder name"),
    "no image": ([{"case": "a", "modality": "PET"}], [], "INDEX", "needs an 'image' file name"),
    "not a list": ({"case": "a"}, [], "INDEX", "must be a JSON list"),
}


@pytest.mark.parametrize("name", list(BAD_BATCHES))
def test_bad_batch_is_one_line_exit_2_nothing_written(cases, tmp_path, name):
    entries, extra, subject, problem = BAD_BATCHES[name]
    index = cases / "cases.json"
    if entries is not None:
        index = tmp_path / "index.json"
        index.write_text(json.dumps(entries))
    places = {"IMAGE": cases / "alpha_pet.nii.gz"}
    result = main_cli("segment", "--batch", index, *MODEL, *[places.get(a, a) for a in extra],
                      "--out", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vbseg: error: {index if subject == 'INDEX' else subject}: ")
    assert problem in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if entries is None else ["index.json"])


def test_cases_that_cannot_run_are_refused_before_any_fit_one_line_each(cases, tmp_path):
    """A missing PET file, a missing VOI mask and a CT-only case for a PET method (an option
    check that depends on the case's modalities) after a good case: exit 2, one line per bad case
    naming the file or option and the case, nothing written (the good case did not run)."""
    good = json.loads((cases / "cases.json").read_text())[0]
    for files in good["modalities"].values():
        files.update({key: str(cases / name) for key, name in files.items()})
    entries = [good,
               {"case": "lost", "modality": "PET", "image": "lost_pet.nii.gz"},
               {"case": "noroi", "modality": "PET", "image": str(cases / "beta_pet.nii.gz"),
                "roi": "lost_roi.nii.gz"},
               {"case": "ctonly", "modality": "CT", "image": str(cases / "alpha_ct.nii.gz")}]
    index = tmp_path / "index.json"
    index.write_text(json.dumps(entries))
    before = digest(cases)
    result = main_cli("segment", "--batch", index, *MODEL, "--out", tmp_path / "out")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert lines[:2] == [f"vbseg: error: {tmp_path / 'lost_pet.nii.gz'}: case lost: file not found",
                         f"vbseg: error: {tmp_path / 'lost_roi.nii.gz'}: case noroi: file not found"]
    assert lines[2:] == ["vbseg: error: --model: case ctonly: gmm is a PET method, and no image is PET"]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
    assert digest(cases) == before


def test_ctrl_c_during_a_case_leaves_the_finished_cases(cases, tmp_path):
    """SIGINT while the second case fits: exit 130, one line; the first case's files as they
    were, no folder, temporary folder or lock left for the second, batch.json says so."""
    out = tmp_path / "out"
    index = tmp_path / "index.json"
    entries = json.loads((cases / "cases.json").read_text())
    index.write_text(json.dumps(entries[1:2]))  # beta alone
    os.symlink(cases / "beta_pet.nii.gz", tmp_path / "beta_pet.nii.gz")
    os.symlink(cases / "beta_roi.nii.gz", tmp_path / "beta_roi.nii.gz")
    first = main_cli("segment", "--batch", index, *MODEL, "--out", out)
    assert first.returncode == 0, first.stdout + first.stderr
    finished = digest(out / "beta")
    gamma = {"case": "gamma", "modality": "PET", "image": "beta_pet.nii.gz"}
    index.write_text(json.dumps([entries[1], gamma]))
    reached = tmp_path / "reached"
    status, stderr = interrupted_at("fit", reached, "segment", "--batch", index, *MODEL, "--out", out)
    assert reached.exists(), stderr[-600:]
    assert status == 130 and stderr == "vbseg: interrupted\n", stderr[-600:]
    assert sorted(p.name for p in out.iterdir()) == ["batch.json", "beta"]
    assert digest(out / "beta") == finished
    rows = record(out)
    assert [rows["beta"]["status"], rows["gamma"]["status"]] == ["skipped (finished before)", "not run"]


def test_segment_without_images_or_batch_is_one_line(tmp_path):
    result = main_cli("segment", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr == "vbseg: error: segment: needs at least one image (or --batch CASES.json)\n"
    assert not any(tmp_path.iterdir())
