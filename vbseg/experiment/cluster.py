"""``vbseg experiment --cluster SPEC``: a sweep's tasks on a Dask cluster (the optional
``[cluster]`` extra: dask, distributed; ``[slurm]`` adds dask-jobqueue).

SPEC is one of

* ``local:N``: N worker processes here (spawned, JAX-safe), this process's cores split between
  them (each worker pinned to its share; BLAS thread counts, and XLA's when the share is one
  core, set to match);
* ``local:gpus``: one worker per visible GPU (``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``),
  JAX's GPU memory preallocation off;
* ``tcp://HOST:PORT`` (or ``tls://``): a running scheduler;
* ``scheduler-file:PATH``: the scheduler that wrote PATH (``dask scheduler --scheduler-file``,
  as in a SLURM allocation: docs/cluster.md);
* ``env``: the address in ``$DASK_SCHEDULER_ADDRESS`` (what the Dask Kubernetes operator's
  DaskJob sets);
* ``slurm:N``: N SLURM jobs of one worker each, from the user's dask-jobqueue configuration
  (``jobqueue.slurm`` in ~/.config/dask/jobqueue.yaml: cores, memory, walltime, queue, ...).

Dask places the tasks (:func:`vbseg.experiment.task.plan_tasks`), reschedules the task of a
worker that died, and after ``distributed.scheduler.allowed-failures`` deaths fails it with
``KilledWorker``: the run is then recorded as failed with that reason and the sweep goes on.
Each task's key holds the output folder, so two sweeps sharing a scheduler never share a key
unless they write the same run. Futures are released as they complete, so the driver holds
only what is still running. Before anything is submitted, :func:`check_workers` asks every
worker whether it sees the output folder and the inputs and runs the same vbseg code (its
:func:`~vbseg.cohort.population.source_digest`); a problem is one line.

On a cluster, JAX's persistent compilation cache goes to node-local disk (``$TMPDIR``,
``/tmp``; ``$VBSEG_JAX_CACHE`` wins), not a shared file system; local clusters share the
driver's cache.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vbseg.cohort.population import source_digest
from vbseg.errors import InputError
from vbseg.experiment.task import Task, describe_error, record_failure
from vbseg.runtime import enable_compilation_cache

SPECS = "local:N, local:gpus, tcp://HOST:PORT, scheduler-file:PATH, env or slurm:N"
ADDRESS_ENV = "DASK_SCHEDULER_ADDRESS"
CPUS_ENV = "VBSEG_WORKER_CPUS"
CACHE_ENV = "VBSEG_JAX_CACHE"
EXTRA = {"distributed": "cluster", "dask": "cluster", "dask_jobqueue": "slurm"}


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster``: ``kind`` is local, gpus, address, scheduler-file or slurm."""

    text: str
    kind: str
    workers: int = 0
    address: str = ""

    @property
    def option(self) -> str:
        return f"--cluster {self.text}"


def _count(text: str, spec: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise InputError("--cluster", f"{spec}: expected a number of workers >= 1 after ':'")
    return count


def parse_cluster(text: str) -> ClusterSpec:
    """``--cluster``'s value (module doc) as a ClusterSpec; InputError naming it otherwise."""
    text = text.strip()
    kind, _, value = text.partition(":")
    if text == "local:gpus":
        return ClusterSpec(text, "gpus")
    if kind == "local":
        return ClusterSpec(text, "local", _count(value, text))
    if kind == "slurm":
        return ClusterSpec(text, "slurm", _count(value, text))
    if kind in ("tcp", "tls") and value.startswith("//") and len(value) > 2:
        return ClusterSpec(text, "address", address=text)
    if kind == "scheduler-file" and value:
        return ClusterSpec(text, "scheduler-file", address=value)
    if text == "env":
        address = os.environ.get(ADDRESS_ENV, "").strip()
        if not address:
            raise InputError("--cluster env", f"${ADDRESS_ENV} is not set (the Dask Kubernetes "
                                              "operator sets it in a DaskJob's job pod)")
        return ClusterSpec(text, "address", address=address)
    raise InputError("--cluster", f"expected {SPECS}, got {text!r}")


def require(module: str):
    """Import an optional extra's module, or InputError saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRA[module.split(".")[0]]
        raise InputError("--cluster", f"needs the optional [{extra}] extra: "
                                      f"pip install 'vbseg[{extra}]'") from None


# --- workers -----------------------------------------------------------------------------------

def thread_env(cores: list[int]) -> dict[str, str]:
    """A worker's environment for its share of cores: BLAS thread counts, the cores it is
    pinned to (:func:`cluster_task`), and XLA single-threaded when the share is one core."""
    count = str(len(cores))
    env = {"OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count, "OPENBLAS_NUM_THREADS": count,
           CPUS_ENV: ",".join(map(str, cores))}
    if len(cores) == 1:
        env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                  "--xla_cpu_multi_thread_eigen=false",
                                                  "intra_op_parallelism_threads=1"]))
    return env


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``$CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    try:
        lines = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30,
                               check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(lines) if line.startswith("GPU ")]


def local_worker_envs(spec: ClusterSpec) -> list[dict[str, str]]:
    """One environment per worker of a local cluster: the cores split between the workers
    (round robin when there are more workers than cores), one GPU each for ``local:gpus``."""
    cores = sorted(os.sched_getaffinity(0))
    gpus = visible_gpus() if spec.kind == "gpus" else []
    if spec.kind == "gpus" and not gpus:
        raise InputError(spec.option, "no GPU is visible ($CUDA_VISIBLE_DEVICES is empty, or "
                                      "nvidia-smi lists none)")
    count = len(gpus) if gpus else spec.workers
    share = max(1, len(cores) // count)
    envs = []
    for i in range(count):
        mine = cores[i * share:(i + 1) * share] if count <= len(cores) else [cores[i % len(cores)]]
        env = {**thread_env(mine), CACHE_ENV: enable_compilation_cache()}
        if gpus:
            env.update({"CUDA_VISIBLE_DEVICES": gpus[i], "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
        envs.append(env)
    return envs


def local_cluster(spec: ClusterSpec):
    """A Dask SpecCluster of spawned worker processes here, one task at a time each."""
    distributed = require("distributed")
    workers = {f"vbseg-{i}": {"cls": distributed.Nanny,
                              "options": {"nthreads": 1, "env": env, "memory_limit": 0,
                                          "silence_logs": logging.ERROR}}
               for i, env in enumerate(local_worker_envs(spec))}
    scheduler = {"cls": distributed.Scheduler, "options": {"host": "127.0.0.1", "dashboard": False}}
    return distributed.SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR)


def slurm_cluster(**overrides):
    """A dask-jobqueue SLURMCluster from the user's ``jobqueue.slurm`` configuration, one
    worker process with one task at a time per job, holding the job's cores (``job_cpu``) and
    memory, with matching thread counts and a node-local compilation cache."""
    dask = require("dask")
    jobqueue = require("dask_jobqueue")
    cores = int(dask.config.get("jobqueue.slurm.cores", None) or 1)
    memory = dask.config.get("jobqueue.slurm.memory", None) or "4GB"
    env = {key: value for key, value in thread_env(list(range(cores))).items() if key != CPUS_ENV}
    options = {"cores": 1, "processes": 1, "job_cpu": cores, "memory": memory,
               "job_script_prologue": [*(dask.config.get("jobqueue.slurm.job-script-prologue", None)
                                         or []), *(f"export {k}='{v}'" for k, v in env.items())],
               **overrides}
    return jobqueue.SLURMCluster(**options)


def node_local_cache() -> str:
    """The compilation cache of a worker: $VBSEG_JAX_CACHE, else node-local temporary disk."""
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), f"vbseg-jax-{os.getuid()}")


def cluster_task(function, args, after=()):
    """What a worker runs: pinned to its cores (first task only), the compilation cache
    turned on, then ``function(*args)``; ``after`` only orders the call."""
    del after
    cores = os.environ.get(CPUS_ENV)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
        os.environ.pop(CPUS_ENV)
    enable_compilation_cache(node_local_cache())
    return function(*args)


def worker_view(out: str, probe: str, token: str, inputs: list[str]) -> dict:
    """What a worker sees (run on each by :func:`check_workers`)."""
    try:
        sees_out = (Path(out) / probe).read_text() == token
    except OSError:
        sees_out = False
    return {"host": socket.gethostname(), "digest": source_digest(), "sees_out": sees_out,
            "missing": [path for path in inputs if not os.path.exists(path)]}


def check_workers(client, out: Path, inputs, option: str) -> None:
    """InputError (one line) unless every worker sees ``out`` and ``inputs`` and runs this
    process's vbseg code. ``out`` is created for the check (and removed again if the check
    fails and it was created here)."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    probe, token = f".vbseg-probe-{secrets.token_hex(6)}", secrets.token_hex(16)
    (out / probe).write_text(token)
    try:
        views = client.run(worker_view, str(out.resolve()), probe, token, sorted(inputs))
    finally:
        (out / probe).unlink(missing_ok=True)
    digest = source_digest()
    problem = None
    for address, view in sorted(views.items()):
        where = f"the worker at {address} (host {view['host']})"
        if view["digest"] != digest:
            problem = (option, f"{where} runs other vbseg code (source digest {view['digest'][:12]}, "
                               f"this process's {digest[:12]}); install the same vbseg there")
        elif not view["sees_out"]:
            problem = (str(out), f"{where} does not see this output folder; put it on a file "
                                 "system every worker mounts at the same path")
        elif view["missing"]:
            problem = (view["missing"][0], f"not found by {where}; inputs must be on a file system "
                                           "every worker mounts at the same path")
        if problem:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise InputError(*problem)


def _timeout_s() -> float:
    require("dask")
    utils = require("dask.utils")
    return utils.parse_timedelta(require("dask.config").get("distributed.comm.timeouts.connect"), "s")


@contextlib.contextmanager
def cluster_client(spec: ClusterSpec, out, inputs) -> Iterator:
    """A connected Client whose workers passed :func:`check_workers`; closes what it started."""
    distributed = require("distributed")
    cluster = client = None
    try:
        try:
            if spec.kind in ("local", "gpus"):
                cluster = local_cluster(spec)
            elif spec.kind == "slurm":
                cluster = slurm_cluster()
                cluster.scale(jobs=spec.workers)
            if cluster is not None:
                client = distributed.Client(cluster)
            elif spec.kind == "scheduler-file":
                client = distributed.Client(scheduler_file=spec.address, timeout=_timeout_s())
            else:
                client = distributed.Client(spec.address, timeout=_timeout_s())
        except InputError:
            raise
        except (OSError, TimeoutError, ValueError) as error:
            where = spec.address if spec.kind == "address" else spec.text
            raise InputError(spec.option, f"cannot reach the Dask scheduler at {where} "
                                          f"({describe_error(error)})") from None
        if spec.kind != "slurm":  # SLURM jobs may wait in the queue: tasks wait with them
            try:
                client.wait_for_workers(1, timeout=_timeout_s())
            except TimeoutError:
                raise InputError(spec.option, f"no worker joined the scheduler within "
                                              f"{_timeout_s():g} s") from None
        else:
            client.wait_for_workers(1)
        check_workers(client, Path(out), inputs, spec.option)
        yield client
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def task_key(task: Task, out) -> str:
    """The Dask key of ``task``: its key in the sweep and the output folder."""
    return f"vbseg-{task.key}-{Path(out).resolve()}"


def run_on_cluster(client, tasks: list[Task], out) -> Iterator[dict]:
    """Submit every task (dependencies as Dask dependencies), yield each run's record as it
    completes; a run whose task failed (its workers died, a stage it needs failed) is
    recorded as failed with the reason."""
    distributed = require("distributed")
    futures, runs = {}, {}
    for task in tasks:
        futures[task.key] = client.submit(cluster_task, task.function, task.args,
                                          [futures[key] for key in task.after],
                                          key=task_key(task, out), pure=False)
        if task.run is not None:
            runs[futures[task.key].key] = task.run
    # the stages' futures go: the scheduler keeps each while a dependent needs it
    completed = distributed.as_completed([futures[t.key] for t in tasks if t.run is not None])
    futures.clear()
    for future in completed:
        run = runs.pop(future.key)
        try:
            record = future.result()
        except distributed.KilledWorker as error:
            first = str(error).split(". ")[0]
            record = record_failure(run, out, f"KilledWorker: its worker died each time it ran it "
                                              f"(distributed.scheduler.allowed-failures reached; "
                                              f"{first})")
        except Exception as error:
            record = record_failure(run, out, describe_error(error))
        future.release()
        yield record
