"""Benchmark grid: {algorithm} x {env} x {seed} at a fixed env-step budget, resumable.

The command line. What is run (algorithms, presets, tasks, budgets) is defined in ``grid.py``, how
one run is done (envs, training, evaluation, its files) in ``onerun.py``, and where the runs execute
(a local process pool, or a Ray cluster) in ``backends.py``. Each run writes into
``<out>/<env>/<algo>/seed<k>/``: ``episodes.csv``, ``curve.csv``, ``summary.json`` (last; its
presence marks the run finished) and, with ``--train-log``, ``progress.csv`` (see ``onerun.py``).

A finished run's summary is also appended to ``<out>/runs.jsonl``. Rerunning the same command
skips finished runs and restarts unfinished ones from scratch, so a long grid can be resumed.

Usage::

    python benchmarks/run.py --quick                 # minutes, HazardPoint-v0, CI-sized
    python benchmarks/run.py --full --workers 2      # hours; results/full, resumable
    python benchmarks/run.py --quick --algos sac ppo_lag --budget 500 --out /tmp/bench
    python benchmarks/run.py --quick --force          # retrain although results/quick is committed
    python benchmarks/run.py --full --backend ray --address auto   # on a Ray cluster (ray start)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

# `import run` from elsewhere (tests, other scripts) finds the modules beside it, as the script does
_BENCH_DIR = str(Path(__file__).resolve().parent)
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

# the names other scripts and the tests use from here, re-exported from the modules that define them
from backends import RAY_EXTRA, Progress, ray_missing, run_local, run_ray  # noqa: E402
from grid import (  # noqa: E402, F401
    ALGORITHMS,
    CONSTRAINED,
    CPU_VARIANTS,
    FULL,
    FULL_VARIANTS,
    LEARN,
    LEARN2,
    LEARN2_1M,
    LEARN2_VARIANTS,
    LEARN_1M,
    LEARN_VARIANTS,
    MAIN,
    PRESET_CHECK,
    PRESETS,
    QUICK,
    Block,
    Preset,
    RunSpec,
    expand,
)
from onerun import available, finished, make_env, make_train_env, run_one  # noqa: E402, F401

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="CI-sized grid on HazardPoint-v0 (default)")
    group.add_argument("--full", action="store_true", help="the documented grid (hours; resumable)")
    group.add_argument(
        "--preset-check",
        action="store_true",
        help="OffTRC cpu preset and one-change variants of it vs the paper settings on HazardPoint-v0, "
        "30k steps (paper settings 5 seeds, about 20 min each; the rest 10 seeds, under 2 min each)",
    )
    group.add_argument("--learn", action="store_true", help="the learning study: one-lever OffTRC arms")
    group.add_argument("--learn-1m", action="store_true", help="the learning study's leading arms at 1M steps")
    group.add_argument(
        "--learn2", action="store_true", help="the learning study's second round: levers on a fixed radius of 0.03"
    )
    group.add_argument("--learn2-1m", action="store_true", help="single seeds of the second round's arms at 1M steps")
    group.add_argument(
        "--learn3", action="store_true", help="the learning study's third round: a learned entropy weight, 1M steps"
    )
    group.add_argument(
        "--learn4",
        action="store_true",
        help="the learning study's fourth round: the smooth cost's limit, J_hat from 5 windows, a cost discount",
    )
    group.add_argument(
        "--learn5", action="store_true", help="the learning study's fifth round: rescaled observations, 300k steps"
    )
    group.add_argument(
        "--learn6",
        action="store_true",
        help="the learning study's sixth round: action-value surrogates (reparameterised gradients), 300k steps",
    )
    group.add_argument(
        "--learn7",
        action="store_true",
        help="the learning study's seventh round: the action-value step's cost side (J_hat, Q_C's fit, the smooth "
        "cost) on PointGoal1, and the step on CarGoal1 and HalfCheetahFlip",
    )
    group.add_argument(
        "--learn8",
        action="store_true",
        help="the learning study's eighth round: a cost whose next steps depend on the action (the smooth "
        "hazard-distance cost, discounted by 0.9), 300k steps",
    )
    group.add_argument(
        "--learn9",
        action="store_true",
        help="the learning study's ninth round: the smooth-cost action-value arm at limit 40 on PointGoal1 and at "
        "limits 50 and 40 on CarGoal1, 1M steps",
    )
    group.add_argument(
        "--learn10",
        action="store_true",
        help="the learning study's eleventh round: the smooth-cost action-value arm with its cost critic fitted as "
        "SAC-Lagrangian's (SAC's number of Adam steps), with critics that see the exploration noise, or with a "
        "pessimistic pair of critics per side, 300k steps",
    )
    group.add_argument(
        "--learn11",
        action="store_true",
        help="the learning study's twelfth round: the smooth-cost action-value arm with the cost direction weighted "
        "by a multiplier on the measured cost (cost_step='multiplier'), 1M steps",
    )
    group.add_argument(
        "--learn12",
        action="store_true",
        help="the learning study's thirteenth round: the smooth-cost action-value arm with its cost value read "
        "through a one-step model of the observation (cost_q_form='dynamics'), 300k steps; and with the critics given "
        "the clipped action (action_value_input='clipped'), 1M steps; that arm with a floor of 0.15 under the std, "
        "300k",
    )
    group.add_argument(
        "--main", action="store_true", help="the published comparison: OffTRC against PPO(-Lagrangian) at 1M steps"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default benchmarks/results/<preset>)"
    )
    parser.add_argument("--algos", nargs="+", help="subset of the preset's algorithms")
    parser.add_argument("--envs", nargs="+", help="subset of the preset's env ids")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the seeds")
    parser.add_argument("--budget", type=int, help="override the env-step budget of every run")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="runs in parallel, one process and one torch thread each (default: 2, or 1 on a 1-core machine); "
        "with --backend ray and no --address, the CPUs of the Ray instance started here",
    )
    parser.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="where the runs execute: a process pool on this machine (default), or Ray tasks of one CPU each "
        f"(needs the extra: pip install 'sb3-offtrc[{RAY_EXTRA}]')",
    )
    parser.add_argument(
        "--address",
        help="with --backend ray: the cluster to connect to (auto: the one `ray start` made on this machine, "
        "or HOST:PORT of its head); without it, a Ray instance is started here with --workers CPUs",
    )
    parser.add_argument(
        "--train-log",
        action="store_true",
        help="also write each run's SB3 logger output (train/*, rollout/*; every episode) to progress.csv",
    )
    parser.add_argument(
        "--save-model",
        action="store_true",
        help="also save each trained model (model.zip, and vecnormalize.pkl where observations are normalised)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    parser.add_argument(
        "--force", action="store_true", help="rerun the selected runs even if finished (their old records are dropped)"
    )
    args = parser.parse_args(argv)
    if args.address is not None and args.backend != "ray":
        parser.error("--address needs --backend ray")
    if args.backend == "ray":
        missing = ray_missing()
        if missing is not None:
            print(f"error: {missing}", file=sys.stderr)
            return 2
        if args.address is not None and args.workers is not None:
            print("note: --workers is ignored with --address: the cluster's CPUs decide", flush=True)
    workers = args.workers if args.workers is not None else min(2, os.cpu_count() or 1)

    # each preset but the default has its flag (--full, --learn2-1m, ...): grid.PRESETS names them
    preset = next((grid for flag, grid in PRESETS.items() if flag != "quick" and getattr(args, flag)), QUICK)
    out = args.out or RESULTS_DIR / preset.name
    unknown = sorted(set(args.algos or []) - set(preset.algos()))
    if unknown:
        choices = " ".join(preset.algos())
        parser.error(f"--algos {' '.join(unknown)}: not in the {preset.name} grid; choose from {choices}")
    specs = expand(preset, out, args.algos, args.envs, args.seeds, args.budget)
    if args.train_log or args.save_model:
        specs = [replace(spec, train_log=args.train_log, save_model=args.save_model) for spec in specs]

    todo: list[RunSpec] = []
    for spec in specs:
        reason = available(spec.base)
        if reason is not None:
            print(f"skip {spec.key}: {spec.algo} not importable ({reason})", flush=True)
        elif finished(spec) and not args.force:
            print(f"done {spec.key} (finished earlier)", flush=True)
        else:
            todo.append(spec)
    print(f"{len(todo)} run(s) to do, {len(specs) - len(todo)} skipped, results in {out}", flush=True)
    if args.dry_run or not todo:
        return 0

    out.mkdir(parents=True, exist_ok=True)
    if args.force:
        _drop_records(out / "runs.jsonl", {spec.key for spec in todo})
    _record_command(out / "command.txt")
    if args.backend == "ray":
        outcomes = run_ray(todo, args.address, workers)
    else:
        outcomes = run_local(todo, workers)
    progress = Progress(len(todo))
    # closing(): on Ctrl-C the backend stops what is still running (Ray: cancels the cluster's tasks)
    with contextlib.closing(outcomes):
        try:
            for summary in outcomes:
                _report(summary, out)
                print(progress.update(failed="error" in summary), flush=True)
        except KeyboardInterrupt:
            unfinished = progress.total - progress.done
            print(
                f"interrupted: {unfinished} run(s) unfinished (rerun the same command to do them)",
                file=sys.stderr,
                flush=True,
            )
            return 130  # the shell's code for a command ended by SIGINT
    return 1 if progress.failed else 0


def _report(summary: dict[str, Any], out: Path) -> None:
    """Print how a run ended; a finished one is appended to ``runs.jsonl``."""
    if "error" in summary:
        print(f"FAILED {summary['key']}\n{summary['error']}", flush=True)
        return
    with (out / "runs.jsonl").open("a") as f:
        f.write(json.dumps(summary, default=float) + "\n")
    final = summary["final_eval"]
    print(
        f"finished {summary['key']}: {summary['env_steps']} steps in {summary['wall_time']:.0f}s "
        f"({summary['env_steps_per_s']:.0f} steps/s), eval return {final.get('eval_return', math.nan):.2f} "
        f"cost {final.get('eval_cost', math.nan):.2f}",
        flush=True,
    )


def _record_command(path: Path) -> None:
    """Append this invocation to the results' command log (a grid is often filled by several)."""
    root = str(Path(__file__).resolve().parent.parent) + os.sep
    args = [arg.replace(root, "") for arg in sys.argv]  # paths inside the checkout, relative
    line = " ".join(["python", *args])
    lines = path.read_text().splitlines() if path.exists() else []
    if line not in lines:
        path.write_text("".join(f"{entry}\n" for entry in [*lines, line]))


def _drop_records(path: Path, keys: set[str]) -> None:
    """Remove the runs.jsonl lines of runs that are about to be redone."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line).get("key") not in keys]
    path.write_text("".join(f"{line}\n" for line in kept))


if __name__ == "__main__":
    # the script lives outside the package; make `import sb3_offtrc` work from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MUJOCO_GL", "egl")
    sys.exit(main())
