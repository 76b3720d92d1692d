"""Running an experiment: each unfinished (case, variant) of a sweep, resumably, then the tables.

:mod:`vbseg.experiment.config` reads and validates the config and names each run's folder;
:mod:`vbseg.experiment.task` turns the unfinished runs into tasks (one per run, plus the
per-cohort stages of leave-one-out priors) and runs one; this module hands the tasks to an
executor (this process, ``jobs`` spawned processes: :mod:`vbseg.experiment.local_pool`; a Dask cluster:
:mod:`vbseg.experiment.cluster`), shows the progress, and rebuilds results.csv / results.md from the run
folders with :mod:`vbseg.experiment.results` at the end, also after a failure or Ctrl-C.

``shard = (I, N)`` runs only the runs whose index in the experiment's full run list is I mod N
(0-based), for job arrays without an engine: N independent invocations (one per array task)
cover every run exactly once, each skipping what is finished, and any of them (or a last
plain one) rebuilds the full tables.

A sweep holds a lock in its output folder (:func:`vbseg.io.result_folder.locked_folder`), one per
shard (:func:`lock_name`): a second invocation of the same sweep (or shard) into the same folder
is refused with one line while the first runs; different shards run side by side. The tables
are never written over one of the sweep's inputs.
"""

from __future__ import annotations

import contextlib

from tqdm import tqdm

from vbseg.errors import InputError
from vbseg.experiment.cluster import ClusterSpec, cluster_client, run_on_cluster
from vbseg.experiment.config import Experiment, Run, input_files
from vbseg.experiment.local_pool import run_in_processes, run_serially
from vbseg.experiment.results import TABLES, write_tables
from vbseg.experiment.task import is_finished, plan_tasks, rescore, tidy_staging
from vbseg.io.result_folder import LOCK_NAME, check_outputs, locked_folder


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` (0 <= I < N) as (I, N); InputError naming --shard otherwise."""
    index, _, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        shard = (-1, 0)
    if not 0 <= shard[0] < shard[1]:
        raise InputError("--shard", f"expected I/N with 0 <= I < N (0-based), got {text!r}")
    return shard


def shard_runs(runs, shard: tuple[int, int] | None) -> list[Run]:
    """The runs whose index in ``runs`` is I mod N (all of them when ``shard`` is None)."""
    if shard is None:
        return list(runs)
    index, count = shard
    return [run for position, run in enumerate(runs) if position % count == index]


def lock_name(shard: tuple[int, int] | None) -> str:
    """The lock of a sweep (``.vbseg.lock``) or of its shard I/N (``.vbseg-shard-I-of-N.lock``)."""
    return LOCK_NAME if shard is None else f".vbseg-shard-{shard[0]}-of-{shard[1]}.lock"


def run_experiment(experiment: Experiment, out, *, jobs: int = 1, cluster: ClusterSpec | None = None,
                   shard: tuple[int, int] | None = None, progress: bool = True) -> dict:
    """Run every unfinished run of ``experiment`` (of its ``shard``) into ``out``; rebuild the
    tables.

    Returns {"runs", "skipped", "failed", "table", "compile_s", "fit_s"} (the last two summed
    over the runs fitted now: compile time, and compile plus run time). ``jobs`` > 1 runs tasks
    in that many spawned processes (JAX does not survive fork); ``cluster`` on a Dask cluster.
    """
    runs = shard_runs(experiment.runs, shard)
    failed, compile_s, fit_s = 0, 0.0, 0.0
    with contextlib.ExitStack() as stack:
        out, _ = stack.enter_context(locked_folder(out, lock_name(shard)))
        check_outputs(out, TABLES, [experiment.path, *input_files(experiment.runs)], overwrite=True)
        todo = []
        for run in runs:
            if not is_finished(out, run):
                todo.append(run)
            else:  # finished before a score was added: scored from its saved map
                rescore(run, out)
        skipped = len(runs) - len(todo)
        tasks = plan_tasks(todo, out)
        if cluster is not None:
            client = stack.enter_context(cluster_client(cluster, out, input_files(todo)))
            records = run_on_cluster(client, tasks, out)
        else:
            records = run_serially(tasks, out) if jobs <= 1 else run_in_processes(tasks, out, jobs)
        bar = stack.enter_context(tqdm(total=len(runs), initial=skipped, unit="run", disable=not progress,
                                       desc=experiment.name, dynamic_ncols=True))
        stack.callback(write_tables, experiment, out)  # also after a failure or Ctrl-C
        stack.callback(tidy_staging, out)
        for record in records:
            bar.set_postfix_str(record["case"])
            if record["status"] == "ok":
                compile_s += record["compile_s"]
                fit_s += record["compile_s"] + record["run_s"]
            else:
                failed += 1
            bar.update(1)
    return {"runs": len(runs), "skipped": skipped, "failed": failed, "table": out / "results.csv",
            "compile_s": compile_s, "fit_s": fit_s}
