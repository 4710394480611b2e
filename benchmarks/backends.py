"""Where the runs of the benchmark grid execute: a local process pool, or a Ray cluster.

Both backends take the runs still to do and yield, as each run ends, its summary (the run's files are
in the results by then) or ``{"key": ..., "error": ...}`` for a run that raised: one failing run
never stops the others. ``run.py`` records the summaries and prints a :class:`Progress` line after
each run.

- ``local``: ``--workers`` spawned processes on this machine, one run each (one torch thread), or the
  runs one after the other in this process with ``--workers 1``. The runs write their files in place.
- ``ray``: every run is a Ray task asking for one CPU. A task trains in a temporary directory on
  whichever machine Ray picks and hands its files back; this process writes them into the results,
  so the machines share no file system. Each machine needs the same checkout at the same path and
  the same environment (``make setup``): Ray adds the directory of the driver's script to its
  workers' import path, which is how they import ``onerun`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import time
import traceback
from collections.abc import Generator
from typing import Any

from grid import RunSpec
from onerun import code_version, run_one, run_to_files, write_run_files

#: the extra that brings Ray (pyproject.toml), named in the error when Ray is missing
RAY_EXTRA = "cluster"


def _format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


class Progress:
    """Runs done out of the total, failures, elapsed time and an estimate of the time left.

    The estimate assumes the remaining runs take as long on average as the finished ones, so it is
    rough at first and when the grid mixes short and long runs.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.start = time.perf_counter()

    def update(self, failed: bool = False) -> str:
        """Count one more run that ended (``failed`` if it raised) and return the progress line."""
        self.done += 1
        self.failed += int(failed)
        elapsed = time.perf_counter() - self.start
        left = self.total - self.done
        parts = [f"progress: {self.done}/{self.total} runs done"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        parts.append(f"{_format_seconds(elapsed)} elapsed")
        if left:
            parts.append(f"ETA {_format_seconds(elapsed / self.done * left)}")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- local


def _run_safely(spec: RunSpec) -> dict[str, Any]:
    try:
        return run_one(spec)
    except Exception:  # one failing run must not take the rest of the grid down
        return {"key": spec.key, "error": traceback.format_exc()}


def run_local(specs: list[RunSpec], workers: int) -> Generator[dict[str, Any], None, None]:
    """The runs on this machine, ``workers`` at a time."""
    if workers <= 1:
        for spec in specs:
            yield _run_safely(spec)
        return
    # spawn: no torch / MuJoCo state inherited from the parent; one run per child process
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=workers, maxtasksperchild=1) as pool:
        yield from pool.imap_unordered(_run_safely, specs)


# ----------------------------------------------------------------------------- Ray


def ray_missing() -> str | None:
    """None when Ray imports, else the one-line error that says how to get it."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return (
            f"--backend ray needs Ray, which is not installed ({exc}): "
            f"pip install 'sb3-offtrc[{RAY_EXTRA}]' (or make setup, whose default extras include it)"
        )
    return None


def run_ray(specs: list[RunSpec], address: str | None, workers: int) -> Generator[dict[str, Any], None, None]:
    """The runs as Ray tasks on the cluster at ``address`` (``auto``, ``HOST:PORT``), or on a Ray
    instance started here with ``workers`` CPUs when ``address`` is None.

    Leaving the generator early (Ctrl-C, or a ``close()``) cancels the tasks still queued or
    running on the cluster (their worker processes are killed) before it disconnects.
    """
    import ray

    if address is None:
        ray.init(num_cpus=workers, include_dashboard=False)
    else:
        ray.init(address=address)
    # Every worker gets one torch / OpenMP thread (run_one also sets torch's), as a local worker does,
    # and this machine's MuJoCo backend, whatever the environment `ray start` was run in.
    env_vars = {"OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    task = ray.remote(num_cpus=1, runtime_env={"env_vars": env_vars})(run_to_files)
    pending: dict[Any, RunSpec] = {}
    for spec in specs:
        # What an earlier attempt left (or, with --force, the finished run whose runs.jsonl record
        # run.py has just dropped) goes now, as a local run's does when it starts: the results never
        # hold a summary.json that the run about to replace it has made stale.
        if spec.run_dir.exists():
            shutil.rmtree(spec.run_dir)
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        where = "a local Ray instance" if address is None else f"the Ray cluster at {address}"
        # The task's name is the run's key: it is what `ray list tasks`, the dashboard and the
        # worker's process title (ray::<key>) show.
        pending = {task.options(name=spec.key).remote(spec): spec for spec in specs}
        print(f"submitted {len(pending)} run(s) to {where} ({cpus:g} CPUs)", flush=True)
        ours = code_version()
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ref)
            try:
                files = ray.get(ref)
            except ray.exceptions.RayError as exc:
                # the task raised (RayTaskError carries the remote traceback), or its worker or
                # node died after Ray's retries: report it, keep the other runs going
                yield {"key": spec.key, "error": str(exc)}
                continue
            summary = write_run_files(spec.run_dir, files)
            theirs = summary.get("code", {})
            if theirs.get("commit") != ours["commit"]:
                print(
                    f"warning: {spec.key} ran on commit {theirs.get('commit')}, this checkout is at "
                    f"{ours['commit']}: the machines' checkouts differ",
                    file=sys.stderr,
                    flush=True,
                )
            yield summary
    finally:
        if pending:
            for ref in pending:
                ray.cancel(ref, force=True)
            # wait (briefly) until the cancellations took: each cancelled task's result becomes a
            # TaskCancelledError once its worker is gone
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=30)
            print(f"cancelled {len(ready)} of {len(pending)} unfinished run(s) on the cluster", flush=True)
        ray.shutdown()
