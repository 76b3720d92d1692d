"""The command line's edges: output paths that cannot be written, options that would run for
minutes, implausible inputs, Ctrl-C, --overwrite over another result set, two runs into one
folder, file modes, --version and --help (issue 21, items 2 and 6).

A bad input is one line ``vbseg: error: <path or option>: <problem>``, exit 2, checked before
the fit, nothing written, inputs untouched; Ctrl-C is exit 130 and one line, and leaves the
output folder holding the previous result set (or nothing), never a partial one.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from tests import test_cli
from tests.test_cli import digest, interrupted_at, main_cli
from vbseg.io.volume import save_nifti

inputs = test_cli.inputs  # the fixture of the images and bad files, shared with test_cli
RESULT_FILES = {"prob.nii.gz", "summary.json", "overview.png"}


def _one_line_error(result, subject, problem):
    lines = result.stderr.strip().splitlines()
    return (result.returncode == 2 and len(lines) == 1 and lines[0].startswith("vbseg: error: ")
            and subject in lines[0] and problem in lines[0] and "Traceback" not in result.stderr)


BAD_EDGES = {
    # name: (arguments after the PET image, subject, problem); OUT stands for the output folder
    "empty --out": (["--out", ""], "--out", "empty"),
    "dangling symlink": (["--out", "LINK"], "link", "dangling symbolic link"),
    "name too long": (["--out", "LONG"], "x" * 20, "longer than"),
    "seed too large": (["--seed", "99999999999999999999", "--out", "OUT"], "--seed", "2**32"),
    "negative seed": (["--seed", "-1", "--out", "OUT"], "--seed", "2**32"),
    "too many volume draws": (["--volume-draws", "100000000", "--out", "OUT"], "--volume-draws",
                              "100000"),
    "PSF wider than the image": (["--psf-fwhm", "1e6", "--out", "OUT"], "--psf-fwhm", "field of view"),
    "same file twice": (["PET", "--modality", "pet,pet", "--out", "OUT"], "pet.nii.gz", "given twice"),
    "voxels of kilometres": (["--out", "OUT"], "km_voxels.nii.gz", "voxel size"),
    "another run holds the lock": (["--out", "LOCKED"], ".vbseg.lock", "another vbseg run"),
}


@pytest.mark.parametrize("name", list(BAD_EDGES))
def test_bad_edge_is_one_line_exit_2_before_any_work(inputs, tmp_path, monkeypatch, name):
    args, subject, problem = BAD_EDGES[name]
    monkeypatch.chdir(tmp_path)  # --out "" must not write into the current directory
    out = tmp_path / "out"
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / ".vbseg.lock").write_text(f"{os.getpid()} {os.uname().nodename}\n")  # alive
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    image = inputs / ("km_voxels.nii.gz" if name == "voxels of kilometres" else "pet.nii.gz")
    places = {"OUT": out, "LINK": tmp_path / "link", "LONG": tmp_path / ("x" * 300),
              "LOCKED": locked, "PET": inputs / "pet.nii.gz"}
    before = digest(inputs)
    result = main_cli("segment", image, *[places.get(a, a) for a in args])
    assert _one_line_error(result, subject, problem), result.stderr[-600:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "locked"]  # nothing written
    assert [p.name for p in locked.iterdir()] == [".vbseg.lock"]  # another run's lock stays
    assert not (tmp_path / "nowhere").exists()
    assert digest(inputs) == before


def test_implausible_values_and_levels_below_one_warn(inputs, tmp_path):
    """Negative PET voxels and --levels 0.5 are warnings (code and message) in summary.json
    and on stderr; the run completes."""
    out = tmp_path / "warned"
    result = main_cli("segment", inputs / "negative_pet.nii.gz", "--box", "4:20,4:20,4:20",
                      "--levels", "0.5,50", "--out", out)
    assert result.returncode == 0, result.stderr
    codes = [w["code"] for w in json.loads((out / "summary.json").read_text())["warnings"]]
    assert codes[:2] == ["level-below-1", "negative-pet"]
    for code in codes[:2]:
        assert f"vbseg: warning: {code}: " in result.stderr
    assert (out / "contour_0.5.nii.gz").exists()


def test_overwrite_replaces_the_whole_result_set_and_follows_the_umask(inputs, tmp_path):
    out = tmp_path / "seg"
    old_umask = os.umask(0o027)
    try:
        first = main_cli("segment", inputs / "pet.nii.gz", "--box", "4:20,4:20,4:20", "--out", out)
        assert first.returncode == 0, first.stderr
        (out / "notes.txt").write_text("mine")
        (out / "contour_mine.nii.gz").write_text("mine too")
        second = main_cli("segment", inputs / "pet.nii.gz", "--box", "4:20,4:20,4:20",
                          "--levels", "30", "--out", out, "--overwrite")
        assert second.returncode == 0, second.stderr
    finally:
        os.umask(old_umask)
    written = RESULT_FILES | {"contour_30.nii.gz"}
    assert {p.name for p in out.iterdir()} == written | {"notes.txt", "contour_mine.nii.gz"}
    assert json.loads((out / "summary.json").read_text())["levels_percent"] == [30.0]
    assert (out / "notes.txt").read_text() == "mine"
    for name in written:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name


def test_outputs_follow_the_umask(tmp_path):
    old_umask = os.umask(0o022)
    try:
        path = save_nifti(tmp_path / "a.nii.gz", np.zeros((2, 2, 2), np.float32), np.eye(4))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    from vbseg.io.result_folder import LOCK_NAME, held_lock

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    (tmp_path / LOCK_NAME).write_text(f"{finished.stdout.strip()} {os.uname().nodename}\n")
    with held_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("stage", ["fit", "publish"])
def test_ctrl_c_leaves_the_previous_result_set(inputs, tmp_path, stage):
    """SIGINT while a second run is fitting (or about to move its files into place): exit 130,
    one line, the first run's files untouched, no temporary folder or lock left behind."""
    out = tmp_path / "seg"
    first = main_cli("segment", inputs / "pet.nii.gz", "--box", "4:20,4:20,4:20", "--out", out)
    assert first.returncode == 0, first.stderr
    before = digest(out)
    reached = tmp_path / "reached"
    status, stderr = interrupted_at(stage, reached, "segment", inputs / "pet.nii.gz", "--box",
                                    "4:20,4:20,4:20", "--levels", "30", "--out", out, "--overwrite")
    assert reached.exists(), stderr[-600:]
    assert status == 130 and stderr == "vbseg: interrupted\n", stderr[-600:]
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no .vbseg-* left
    assert digest(out) == before


# what the `vbseg` console script pip writes runs
CONSOLE_SCRIPT = ("-c", "import sys; from vbseg.cli import main; sys.exit(main())")


@pytest.mark.parametrize("launcher", [("-m", "vbseg.cli"), CONSOLE_SCRIPT],
                         ids=["python -m vbseg.cli", "console script"])
def test_ctrl_c_while_the_command_line_loads_is_one_line(tmp_path, launcher):
    """SIGINT while vbseg.cli's imports (JAX, the models) load: exit 130 and one line, no
    traceback, nothing written; and importing the package itself loads no JAX, so no longer
    stretch of the start is outside that handler."""
    reached = tmp_path / "reached"
    status, stderr = interrupted_at("import", reached, "phantom", "--out", tmp_path / "out",
                                    launcher=launcher)
    assert reached.exists(), stderr[-600:]
    assert status == 130 and stderr == "vbseg: interrupted\n", stderr[-600:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reached"]
    light = subprocess.run([sys.executable, "-c", "import sys, vbseg, vbseg.interrupts; "
                            "print(sorted({'jax', 'numpy', 'vbseg.pipeline'} & set(sys.modules)))"],
                           capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "[]"


def test_version_and_the_whole_description_in_help():
    from importlib.metadata import version

    shown = main_cli("--version")
    assert shown.returncode == 0 and shown.stdout.strip() == f"vbseg {version('vbseg')}"
    helped = main_cli("--help")
    assert helped.returncode == 0
    description = " ".join(helped.stdout.split())
    assert "fit-prior | train." in description and "exit status 2" in description


def test_overwrite_never_removes_an_input(tmp_path):
    """A stale contour of the previous result set that this run reads (say, as its --roi)
    stays; the other stale one goes, summary.json is replaced."""
    from vbseg.io.result_folder import publish
    from vbseg.posterior import result_set_names

    out, staging = tmp_path / "out", tmp_path / "out" / ".vbseg-partial-x"
    staging.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"levels_percent": [10.0, 90.0]}))
    for name in ("contour_10.nii.gz", "contour_90.nii.gz"):
        (out / name).write_text("previous")
    (staging / "summary.json").write_text("{}")
    (staging / "contour_50.nii.gz").write_text("new")
    publish(staging, out, inputs=[out / "contour_90.nii.gz"], overwrite=True, previous_set=result_set_names)
    assert sorted(p.name for p in out.iterdir()) == [
        ".vbseg-partial-x", "contour_50.nii.gz", "contour_90.nii.gz", "summary.json"]
    assert (out / "summary.json").read_text() == "{}"


def test_overwrite_removes_the_maps_another_method_wrote(tmp_path):
    """A previous run's method maps (pv-potts's fraction, locate-potts's two answers) are part
    of its result set: a run of another method over it with --overwrite removes them."""
    from vbseg.io.result_files import DELINEATION_FILE, FRACTION_FILE, LOCATOR_FILE
    from vbseg.io.result_folder import publish
    from vbseg.posterior import result_set_names

    out, staging = tmp_path / "out", tmp_path / "out" / ".vbseg-partial-y"
    staging.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"levels_percent": [50.0]}))
    for name in (FRACTION_FILE, LOCATOR_FILE, DELINEATION_FILE, "prob.nii.gz"):
        (out / name).write_text("previous")
    (staging / "summary.json").write_text("{}")
    (staging / "prob.nii.gz").write_text("new")
    publish(staging, out, inputs=[], overwrite=True, previous_set=result_set_names)
    assert sorted(p.name for p in out.iterdir()) == [".vbseg-partial-y", "prob.nii.gz", "summary.json"]


@pytest.mark.parametrize("command,option,problem", [
    ("phantom", "--out", "empty"), ("demo", "--out", "empty"),
    ("phantom", "--seed", "2**32"), ("demo", "--seed", "2**32")])
def test_phantom_and_demo_refuse_an_empty_out_and_a_bad_seed(tmp_path, monkeypatch, command,
                                                             option, problem):
    monkeypatch.chdir(tmp_path)
    args = ["--out", ""] if option == "--out" else ["--out", "folder", "--seed", "-3"]
    result = main_cli(command, *args)
    assert _one_line_error(result, option, problem), result.stderr[-600:]
    assert not any(tmp_path.iterdir())
