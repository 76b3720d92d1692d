"""The writers besides ``segment`` (issue 21): ``experiment``, ``fit-prior``, ``train`` and
``calibrate`` write through :mod:`vbseg.io.result_folder` as ``segment`` does. A second run on the
same output is refused with one line while the first holds its lock; a failure or Ctrl-C in the
middle of the work leaves no temporary file, no lock, no half output and no folder the run
made; an output that is one of the inputs is refused; an interrupted sweep resumes.

The failures are injected in this process where the work starts (the fit, the training), so
each command's cleanup is exercised without its minutes of work; one real SIGINT interrupts a
sweep in a subprocess.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_cli import interrupted_at, main_cli
from vbseg.errors import OutputError
from vbseg.io.result_folder import output_files
from vbseg.phantoms import make_cohort

SWEEP = """
[phantoms]
diameters_mm = [22]
contrast = 4.0
cv = [0.1]
seeds = 2

[model]
name = "gmm"
volume_draws = 200
"""

# name: (arguments, with OUT for the new output folder; the outputs (names in OUT); the
# function whose call starts the work, where a failure is injected; the lock's name in OUT)
WRITERS = {
    "fit-prior": (["fit-prior", "INDEX", "--modalities", "pet", "--cases", "syn00,syn01",
                   "--out", "OUT/prior.json"], ["prior.json"],
                  "vbseg.cohort.population.fit_population_prior", ".prior.json.vbseg.lock"),
    "train": (["train", "TRAIN", "--out", "OUT/net.eqx"], ["net.eqx", "net.json"],
              "vbseg.deep.training.train", ".net.eqx.vbseg.lock"),
    "calibrate": (["calibrate", "SWEEP", "--out", "OUT/calibration.json"], ["calibration.json"],
                  "vbseg.calibration.calibrate.fit_case", ".calibration.json.vbseg.lock"),
    "experiment": (["experiment", "SWEEP", "--out", "OUT"], ["results.csv", "results.md"],
                   "vbseg.experiment.task.fit_case", ".vbseg.lock"),
}


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("writers")
    index = make_cohort(folder / "cohort", 2, seed=5)
    (folder / "train.toml").write_text('[train]\nmodalities = ["pet"]\n')
    (folder / "sweep.toml").write_text(SWEEP)
    return {"INDEX": index, "TRAIN": folder / "train.toml", "SWEEP": folder / "sweep.toml"}


def arguments(configs: dict, args, out: Path) -> list[str]:
    return [str(configs.get(a, a)).replace("OUT", str(out)) for a in args]


def hidden_files(folder: Path) -> list[str]:
    """vbseg's temporary files and folders and its locks start with '.'."""
    return sorted(str(p) for p in folder.rglob(".*"))


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_second_run_on_the_same_output_is_refused(configs, tmp_path, writer):
    args, _, _, lock = WRITERS[writer]
    out = tmp_path / "out"
    out.mkdir()
    (out / lock).write_text(f"{os.getpid()} {os.uname().nodename}\n")  # a run that is alive
    result = main_cli(*arguments(configs, args, out))
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vbseg: error: {out / lock}: another vbseg run (pid {os.getpid()}")
    assert [p.name for p in out.iterdir()] == [lock]


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_failure_in_the_middle_leaves_nothing_behind(configs, tmp_path, monkeypatch, writer,
                                                       failure):
    """A defect (a traceback) or Ctrl-C (exit 130, one line) once the work has started: no
    output, no temporary file or lock, and the folders the run created are gone (a sweep
    records a failed run instead, and rebuilds its tables after Ctrl-C, as it always did)."""
    args, outputs, target, _ = WRITERS[writer]
    out = tmp_path / "new" / "out"
    started = []

    def fail(*args, **kwargs):
        started.append(True)
        raise failure("injected")

    monkeypatch.setattr(target, fail)
    if failure is RuntimeError and writer != "experiment":
        with pytest.raises(RuntimeError, match="injected"):
            main_cli(*arguments(configs, args, out))
    else:
        result = main_cli(*arguments(configs, args, out))
        expected = 1 if failure is RuntimeError else 130
        assert result.returncode == expected, result.stderr
        if failure is KeyboardInterrupt:  # after a sweep's progress bar
            assert result.stderr.splitlines()[-1] == "vbseg: interrupted", result.stderr
    assert started
    if writer == "experiment":
        assert sorted(p.name for p in out.iterdir()) == sorted(
            outputs + (["runs"] if failure is RuntimeError else []))
        assert hidden_files(out) == []
    else:
        assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("writer", ["fit-prior", "train", "calibrate"])
def test_an_input_is_never_an_output(configs, tmp_path, writer):
    """--out naming an input (the index; train's checkpoint JSON when the training config's
    cases index has that name; the config) is refused with one line, even with --overwrite, and
    nothing changes."""
    if writer == "train":
        index = tmp_path / "net.json"
        index.write_text("[]")
        (tmp_path / "net.toml").write_text(f'[train]\nmodalities = ["pet"]\ncases = "{index}"\n')
        args, target = ["train", tmp_path / "net.toml", "--out", tmp_path / "net.eqx"], index
    elif writer == "fit-prior":
        target = configs["INDEX"]
        args = ["fit-prior", target, "--modalities", "pet", "--out", target]
    else:
        target = configs["SWEEP"]
        args = ["calibrate", target, "--out", target]
    before = {p.name: p.read_bytes() for p in Path(target).parent.iterdir() if p.is_file()}
    result = main_cli(*args, "--overwrite")
    assert result.returncode == 2 and result.stderr == (
        f"vbseg: error: {target}: is one of the inputs; choose another --out\n"), result.stderr
    assert {p.name: p.read_bytes() for p in Path(target).parent.iterdir() if p.is_file()} == before


def test_ctrl_c_during_a_sweep_leaves_no_partial_run_and_it_resumes(configs, tmp_path):
    """SIGINT while the first run fits: exit 130, one line, no staging folder, lock or run
    folder left; the re-run does both runs."""
    out = tmp_path / "sweep"
    reached = tmp_path / "reached"
    status, stderr = interrupted_at("fit", reached, "experiment", configs["SWEEP"], "--out", out)
    assert reached.exists(), stderr[-600:]
    assert status == 130 and stderr.splitlines()[-1] == "vbseg: interrupted", stderr[-600:]
    assert "Traceback" not in stderr
    # the phantom's input images (written once per case), the tables: no run, no staging, no lock
    assert sorted(p.name for p in out.iterdir()) == ["phantoms", "results.csv", "results.md"]
    assert hidden_files(out) == []
    result = main_cli("experiment", configs["SWEEP"], "--out", out)
    assert result.returncode == 0, result.stderr
    records = [json.loads(p.read_text()) for p in out.glob("runs/*/result.json")]
    assert [r["status"] for r in records] == ["ok", "ok"] and hidden_files(out) == []


def test_an_output_file_name_near_the_limit_gets_a_short_lock_and_one_over_it_one_line(tmp_path):
    """An output name of 250 bytes is allowed, but ``.<name>.vbseg.lock`` would not be (262 >
    255): the lock takes a hashed name, the file lands, nothing else is left. A name over the
    limit is refused with OutputError before anything is written (it was an OSError)."""
    long_name = "a" * 245 + ".json"
    with output_files([tmp_path / long_name], [], False) as staging:
        (staging / long_name).write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [long_name]
    too_long = "b" * 300 + ".json"
    with pytest.raises(OutputError, match="longer than the file system allows"):
        with output_files([tmp_path / too_long], [], False):
            raise AssertionError("the block must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == [long_name]
