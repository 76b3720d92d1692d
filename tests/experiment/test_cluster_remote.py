"""Sweeps on a scheduler and workers started apart from the driver, on loopback: a
``dask scheduler --scheduler-file`` and two ``dask worker`` processes started here (a SLURM
allocation's layout), reached through ``scheduler-file:PATH`` and through ``env``
($DASK_SCHEDULER_ADDRESS, as the Kubernetes operator sets it): the serial run's table; a killed
driver's sweep resumes; every bad --cluster / --shard is one line with exit status 2; the SLURM
job script carries the requested resources; shards cover every run once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import dask
import dask_jobqueue  # noqa: F401  (its config defaults must exist before dask.config.set)
import distributed  # noqa: F401
import pytest

from tests.experiment.test_cluster import TIMING, _config, rows, run_files, wait_for
from vbseg.cli import main
from vbseg.errors import InputError
from vbseg.experiment import cluster as cluster_module
from vbseg.experiment.config import load_experiment
from vbseg.experiment.runner import parse_shard, run_experiment, shard_runs

ROOT = Path(__file__).resolve().parents[2]


def _environment(**extra) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture(scope="module")
def scheduler_file(tmp_path_factory):
    """``dask scheduler`` and two ``dask worker`` processes on loopback; stopped afterwards."""
    folder = tmp_path_factory.mktemp("dask")
    path = folder / "scheduler.json"
    loopback = ["--host", "127.0.0.1", "--scheduler-file", str(path)]
    commands = [[sys.executable, "-m", "dask", "scheduler", *loopback, "--port", "0", "--no-dashboard"]]
    commands += [[sys.executable, "-m", "dask", "worker", *loopback, "--nthreads", "1",
                  "--memory-limit", "0", "--no-dashboard", "--name", f"w{i}"] for i in range(2)]
    processes = []
    try:
        for command in commands:
            processes.append(subprocess.Popen(command, env=_environment(), start_new_session=True,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if len(processes) == 1:
                wait_for(path.exists, 60, "the scheduler file")
        yield path
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def _cli(*arguments, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vbseg.cli", "experiment", *map(str, arguments)],
                          capture_output=True, text=True, timeout=timeout, env=_environment(**env))


def _address(scheduler_file: Path) -> str:
    return json.loads(scheduler_file.read_text())["address"]


def test_scheduler_file_and_env_give_the_serial_table(tmp_path, scheduler_file, monkeypatch):
    config = _config(tmp_path)
    experiment = load_experiment(config)
    run_experiment(experiment, tmp_path / "serial", progress=False)
    result = _cli(config, "--out", tmp_path / "file", "--cluster", f"scheduler-file:{scheduler_file}")
    assert result.returncode == 0, result.stderr[-2000:]
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", _address(scheduler_file))
    summary = run_experiment(experiment, tmp_path / "env", cluster=cluster_module.parse_cluster("env"),
                             progress=False)
    assert summary["failed"] == 0
    serial = rows(tmp_path / "serial")
    for out in ("file", "env"):
        assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows(tmp_path / out)] == \
               [{k: v for k, v in r.items() if k not in TIMING} for r in serial]
    # the runs ran in the workers, not here
    record = json.loads(next((tmp_path / "env").glob("runs/*/result.json")).read_text())
    assert record["worker"]["pid"] != os.getpid()


def test_a_killed_driver_resumes(tmp_path, scheduler_file):
    """SIGKILL the driver once a run has finished; a re-run does not redo finished runs."""
    config = _config(tmp_path, seeds=2, model='name = "eanm41"')
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vbseg.cli", "experiment", str(config), "--out", str(out),
               "--cluster", "env"]
    driver = subprocess.Popen(command, env=_environment(DASK_SCHEDULER_ADDRESS=_address(scheduler_file)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: list(out.glob("runs/*/result.json")), 120, "a finished run")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finished = run_files(out)
    result = _cli(config, "--out", out, "--cluster", "env",
                  DASK_SCHEDULER_ADDRESS=_address(scheduler_file))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["status"] for r in rows(out)] == ["ok"] * 4
    assert finished and all(run_files(out)[path] == stamp for path, stamp in finished.items())


def test_workers_with_other_code_are_refused(tmp_path, scheduler_file, monkeypatch):
    """Workers running other vbseg code (another source digest): one line, nothing written."""
    monkeypatch.setattr(cluster_module, "source_digest", lambda: "0" * 64)
    spec = cluster_module.parse_cluster(f"scheduler-file:{scheduler_file}")
    with pytest.raises(InputError, match="runs other vbseg code") as caught:
        run_experiment(load_experiment(_config(tmp_path)), tmp_path / "out", cluster=spec,
                       progress=False)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


class FakeClient:
    """A client whose workers report ``view`` (what :func:`worker_view` would return)."""

    def __init__(self, **view):
        self.view = {"host": "node7", "digest": cluster_module.source_digest(), "sees_out": True,
                     "missing": [], **view}

    def run(self, function, *args):
        return {"tcp://10.0.0.7:4000": self.view}


UNSEEN = [({"sees_out": False}, "does not see this output folder"),
          ({"missing": ["/data/pet.nii.gz"]}, "/data/pet.nii.gz: not found by")]


@pytest.mark.parametrize("view,problem", UNSEEN)
def test_workers_that_cannot_see_the_files_are_refused(tmp_path, view, problem):
    with pytest.raises(InputError, match=problem) as caught:
        cluster_module.check_workers(FakeClient(**view), tmp_path / "out", ["/data/pet.nii.gz"],
                                     "--cluster x")
    assert "node7" in str(caught.value) and not (tmp_path / "out").exists()


BAD = [(["--cluster", "local:0"], "--cluster: local:0: expected a number of workers"),
       (["--cluster", "yarn"], "--cluster: expected local:N"),
       (["--cluster", "env"], "DASK_SCHEDULER_ADDRESS is not set"),
       (["--cluster", "local:gpus"], "--cluster local:gpus: no GPU is visible"),
       (["--cluster", "tcp://127.0.0.1:9"], "cannot reach the Dask scheduler at tcp://127.0.0.1:9"),
       (["--cluster", "local:2", "--jobs", "2"], "--jobs: does not go with --cluster"),
       (["--shard", "2/2"], "--shard: expected I/N with 0 <= I < N"),
       (["--shard", "a/b"], "--shard: expected I/N")]


def test_bad_cluster_and_shard_options_are_one_line(tmp_path, monkeypatch, capsys):
    config = _config(tmp_path)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        for arguments, problem in BAD:
            status = main(["experiment", str(config), "--out", str(tmp_path / "out"), *arguments])
            lines = capsys.readouterr().err.strip().splitlines()
            assert status == 2 and len(lines) == 1 and problem in lines[0], (arguments, lines)
            assert not (tmp_path / "out").exists()
    result = _cli(config, "--out", tmp_path / "out", *BAD[0][0], timeout=120)  # the console, too
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"vbseg: error: {BAD[0][1]}")


def test_slurm_job_script_has_the_requested_resources():
    settings = {"jobqueue.slurm.cores": 8, "jobqueue.slurm.memory": "32GB",
                "jobqueue.slurm.walltime": "02:00:00", "jobqueue.slurm.queue": "gpu",
                "jobqueue.slurm.job-extra-directives": ["--gres=gpu:1"]}
    with dask.config.set(settings):  # the job reads the configuration when its script is made
        cluster = cluster_module.slurm_cluster(scheduler_options={"host": "127.0.0.1",
                                                                  "dashboard_address": ":0"})
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    for line in ("#SBATCH --cpus-per-task=8", "#SBATCH --mem=30G", "#SBATCH -t 02:00:00",
                 "#SBATCH -p gpu", "#SBATCH --gres=gpu:1", "export OMP_NUM_THREADS='8'"):
        assert line in script, script
    assert "--nthreads 1" in script  # one fit at a time, on all of the job's cores


def test_shards_cover_every_run_once(tmp_path):
    experiment = load_experiment(_config(tmp_path, seeds=3, model='name = ["eanm41", "threshold40"]'))
    ids = [run.run_id for run in experiment.runs]
    for count in (1, 2, 3, 5, 13):
        shards = [shard_runs(experiment.runs, parse_shard(f"{i}/{count}")) for i in range(count)]
        assert sorted(run.run_id for shard in shards for run in shard) == sorted(ids)
    summary = run_experiment(experiment, tmp_path / "out", shard=(1, 5), progress=False)
    assert summary["runs"] == len(ids[1::5]) and summary["failed"] == 0
    done = {p.parent.name for p in (tmp_path / "out").glob("runs/*/result.json")}
    assert done == set(ids[1::5])
