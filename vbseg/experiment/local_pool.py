"""Running a sweep's tasks on this machine, without Dask: in this process (``--jobs 1``) or in
``jobs`` spawned processes (``--jobs N``; JAX does not survive fork).

Each process slot is its own one-process :class:`~concurrent.futures.ProcessPoolExecutor`, so a
child that dies (killed, out of memory) breaks only its own slot and is known to have held one
task: that task is started again in a fresh process, and after :data:`ALLOWED_DEATHS` deaths it
is recorded as failed with the reason while the sweep goes on (Dask's
``distributed.scheduler.allowed-failures`` rule, whose default this follows). A task whose
dependency failed is recorded as failed without running.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Iterator

from vbseg.experiment.task import Task, describe_error, record_failure
from vbseg.runtime import enable_compilation_cache

# a task whose process died this many times is recorded as failed (Dask's default
# allowed-failures is 3 retries: the fourth death fails the task)
ALLOWED_DEATHS = 4


def _call_in_child(function, args):
    enable_compilation_cache()
    return function(*args)


class _Outcomes:
    """What has happened to each task: succeeded, or failed with a reason."""

    def __init__(self, out):
        self.out, self.done, self.failed = out, set(), {}

    def blocked(self, task: Task) -> str | None:
        """Why ``task`` cannot run (a dependency failed), or None."""
        for key in task.after:
            if key in self.failed:
                return f"needs {key}, which failed ({self.failed[key]})"
        return None

    def ready(self, task: Task) -> bool:
        return all(key in self.done for key in task.after)

    def succeed(self, task: Task, result) -> Iterator[dict]:
        self.done.add(task.key)
        if task.run is not None:
            yield result

    def fail(self, task: Task, reason: str) -> Iterator[dict]:
        self.failed[task.key] = reason
        if task.run is not None:
            yield record_failure(task.run, self.out, reason)


def run_serially(tasks: list[Task], out) -> Iterator[dict]:
    """Each task in this process, in order; yields each run task's record."""
    outcomes = _Outcomes(out)
    for task in tasks:
        reason = outcomes.blocked(task)
        if reason is not None:
            yield from outcomes.fail(task, reason)
            continue
        try:
            result = task.function(*task.args)
        except Exception as error:  # a stage's error; runs record their own
            yield from outcomes.fail(task, describe_error(error))
            continue
        yield from outcomes.succeed(task, result)


def run_in_processes(tasks: list[Task], out, jobs: int) -> Iterator[dict]:
    """The tasks in ``jobs`` spawned processes, each started once its dependencies succeeded;
    yields each run task's record as it completes (module doc: a dead child)."""
    outcomes = _Outcomes(out)
    pending, running, idle, deaths = list(tasks), {}, [], Counter()
    context = get_context("spawn")
    try:
        while pending or running:
            waiting = []
            for task in pending:
                reason = outcomes.blocked(task)
                if reason is not None:
                    yield from outcomes.fail(task, reason)
                elif outcomes.ready(task) and len(running) < jobs:
                    slot = idle.pop() if idle else ProcessPoolExecutor(1, mp_context=context)
                    running[slot.submit(_call_in_child, task.function, task.args)] = (task, slot)
                else:
                    waiting.append(task)
            pending = waiting
            if not running:
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task, slot = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    slot.shutdown(wait=False, cancel_futures=True)
                    deaths[task.key] += 1
                    if deaths[task.key] < ALLOWED_DEATHS:
                        pending.insert(0, task)
                    else:
                        yield from outcomes.fail(task, f"its process died {deaths[task.key]} times "
                                                       "while running it (killed, or out of memory)")
                    continue
                except Exception as error:
                    idle.append(slot)
                    yield from outcomes.fail(task, describe_error(error))
                    continue
                idle.append(slot)
                yield from outcomes.succeed(task, result)
    finally:
        for slot in idle + [slot for _, slot in running.values()]:
            slot.shutdown(wait=False, cancel_futures=True)
