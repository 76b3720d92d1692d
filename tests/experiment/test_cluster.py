"""Sweeps on a local Dask cluster and in --jobs processes, for real on loopback: the same table
as a serial run; a worker (or a --jobs child) SIGKILLed mid-fit costs nothing finished and the
run is redone in the same invocation; a run that kills every worker it meets ends failed after
the configured deaths while the others finish, and a re-run completes it.

One cluster for the module (two workers, ``allowed-failures`` = 1), plus the one ``local:2``
starts; every wait is bounded."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import dask
import distributed  # noqa: F401  (its config defaults must exist before dask.config.set)
import psutil
import pytest

from tests.experiment import cluster_methods
from vbseg.cli import main
from vbseg.experiment.cluster import local_cluster, parse_cluster
from vbseg.experiment.config import load_experiment
from vbseg.experiment.runner import run_experiment

CONFIG = """
[phantoms]
diameters_mm = {diameters}
contrast = 4.0
cv = 0.1
seeds = {seeds}

[model]
{model}
volume_draws = 200
"""
TIMING = {"compile_s", "run_s"}


def _config(tmp_path, name="cfg.toml", diameters="[22, 30]", seeds=1, model="beta = 1.0") -> Path:
    path = tmp_path / name
    path.write_text(CONFIG.format(diameters=diameters, seeds=seeds, model=model))
    return path


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def run_files(out: Path) -> dict:
    """Every file of every finished (status ok) run folder -> (mtime, sha256)."""
    return {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for done in out.glob("runs/*/result.json") if '"status": "ok"' in done.read_text()
            for p in done.parent.rglob("*") if p.is_file()}


def wait_for(condition, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """The test methods registered here and (through the environment) in every worker."""
    folder = tmp_path_factory.mktemp("control")
    patch = pytest.MonkeyPatch()
    patch.setenv(cluster_methods.CONTROL_ENV, str(folder))
    patch.setenv("VBSEG_METHODS", "tests.experiment.cluster_methods")
    cluster_methods.register_all()
    yield folder
    patch.undo()
    cluster_methods.unregister()


@pytest.fixture(scope="module")
def cluster(control):
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        started = local_cluster(parse_cluster("local:2"))
    yield started
    started.close(timeout=60)


def in_thread(function, *args, **kwargs):
    result, thread = {}, None

    def target():
        result["value"] = function(*args, **kwargs)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def kill_paused_run(control: Path, out: Path) -> tuple[int, dict]:
    """Wait until one run is paused mid-fit and another has finished; SIGKILL the paused
    process. Returns its pid and the finished runs' files."""
    paused = wait_for(lambda: list(control.glob("pause.[0-9]*")), 120, "a paused run")
    wait_for(lambda: list(out.glob("runs/*/result.json")), 120, "a finished run")
    finished = run_files(out)
    pid = int(paused[0].suffix[1:])
    os.kill(pid, signal.SIGKILL)
    paused[0].unlink()
    return pid, finished


def test_local_cluster_gives_the_serial_table(tmp_path, control):
    """--cluster local:2 fills the same rows as a serial run (timings aside), in worker
    processes that are not this one."""
    experiment = load_experiment(_config(tmp_path))
    serial = run_experiment(experiment, tmp_path / "serial", progress=False)
    spread = run_experiment(experiment, tmp_path / "local", cluster=parse_cluster("local:2"),
                            progress=False)
    assert serial["failed"] == spread["failed"] == 0 and spread["runs"] == 2
    for one, two in zip(rows(tmp_path / "serial"), rows(tmp_path / "local")):
        assert {k: v for k, v in one.items() if k not in TIMING} == \
               {k: v for k, v in two.items() if k not in TIMING}
    assert not list((tmp_path / "local").glob(".staging/*"))


def test_a_worker_killed_mid_fit_costs_nothing_finished(tmp_path, control, cluster):
    """SIGKILL the worker holding a run mid-fit: the run is rescheduled and every run finishes
    in the same invocation; finished runs' files are untouched; the nanny starts a new worker."""
    experiment = load_experiment(_config(tmp_path, seeds=2, model='name = "test-pause-once"'))
    out = tmp_path / "out"
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    (control / "pause.armed").touch()
    thread, result = in_thread(run_experiment, experiment, out,
                               cluster=parse_cluster(cluster.scheduler_address), progress=False)
    killed, finished = kill_paused_run(control, out)
    thread.join(timeout=240)
    assert not thread.is_alive(), "the sweep did not end"
    assert result["value"]["failed"] == 0 and result["value"]["runs"] == 4
    assert [r["status"] for r in rows(out)] == ["ok"] * 4
    assert finished and all(run_files(out)[path] == stamp for path, stamp in finished.items())
    assert killed in before
    wait_for(lambda: {c.pid for c in psutil.Process().children(recursive=True)} - before, 60,
             "a new worker process")


def test_a_run_that_kills_every_worker_fails_and_the_rest_finish(tmp_path, control, cluster):
    """A method that SIGKILLs its worker every time: after allowed-failures + 1 deaths its run
    is recorded as failed (KilledWorker) and the other finishes, exit status 1; once it stops
    killing, a re-run completes it and leaves the finished run alone."""
    config = _config(tmp_path, diameters="22", model='name = ["eanm41", "test-kill"]')
    command = ["experiment", str(config), "--out", str(tmp_path / "out"), "--cluster",
               cluster.scheduler_address]
    (control / "kill.armed").touch()
    try:
        assert main(command) == 1
    finally:
        (control / "kill.armed").unlink()
    first = {r["variant"].split(",")[0]: r for r in rows(tmp_path / "out")}
    assert first["name=eanm41"]["status"] == "ok"
    assert first["name=test-kill"]["status"] == "failed"
    assert "KilledWorker" in first["name=test-kill"]["error"]
    finished = run_files(tmp_path / "out")
    assert main(command) == 0
    assert [r["status"] for r in rows(tmp_path / "out")] == ["ok", "ok"]
    assert all(run_files(tmp_path / "out")[path] == stamp for path, stamp in finished.items())


def test_jobs_survive_a_killed_child(tmp_path, control):
    """--jobs 2 without Dask: a child SIGKILLed mid-fit no longer aborts the sweep; its run is
    redone in a fresh process and every run finishes."""
    experiment = load_experiment(_config(tmp_path, seeds=2, model='name = "test-pause-once"'))
    out = tmp_path / "out"
    (control / "pause.armed").touch()
    thread, result = in_thread(run_experiment, experiment, out, jobs=2, progress=False)
    _, finished = kill_paused_run(control, out)
    thread.join(timeout=240)
    assert not thread.is_alive(), "the sweep did not end"
    assert result["value"]["failed"] == 0
    assert [r["status"] for r in rows(out)] == ["ok"] * 4
    assert all(run_files(out)[path] == stamp for path, stamp in finished.items())
