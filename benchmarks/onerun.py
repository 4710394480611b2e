"""How one run of the benchmark grid is done: build its envs, train, evaluate, write its files.

Every run uses the same env construction (``make_safety_env`` -> SB3 ``Monitor`` ->
``CostMonitor``), the same periodic evaluation (``evaluate_safe_policy`` on a separate env,
deterministic actions) and the same bookkeeping; the algorithms differ by class and
hyperparameters only. A run writes into its directory (``RunSpec.run_dir`` unless told otherwise):

- ``episodes.csv``: every training episode (env steps at its end, return, cost, violations, length);
- ``curve.csv``: one row per evaluation (env steps, wall time, training return/cost/violations since
  the previous row, cumulative training violations, eval return/cost/CVaR/violations);
- ``summary.json``: written last, atomically; its presence marks the run finished;
- ``progress.csv`` (with ``--train-log`` only): SB3's logger output, dumped after every episode;
- ``model.zip`` and, where observations are normalised, ``vecnormalize.pkl`` (with ``--save-model``
  only): the trained model, e.g. to watch it (``python -m sb3_offtrc record``).

A run on another machine (``backends.py``, Ray) writes into a temporary directory there and hands
back the files' contents (``run_to_files``); the driver writes them with ``write_run_files``.
"""

from __future__ import annotations

import copy
import csv
import importlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from grid import ALGORITHMS, CONSTRAINED, RunSpec

#: the files of one run, by name -> their bytes (what a run on another machine hands back)
RunFiles = dict[str, bytes]


def make_env(env_id: str, seed: int, observation: str = "native") -> Any:
    """The one env construction every algorithm gets: task -> Monitor -> CostMonitor (outermost)."""
    from stable_baselines3.common.monitor import Monitor

    from sb3_offtrc.common.monitor import CostMonitor
    from sb3_offtrc.envs import make_safety_env

    env = CostMonitor(Monitor(make_safety_env(env_id, observation=observation)))
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def make_train_env(
    env_id: str,
    seed: int,
    n_envs: int = 1,
    normalize_obs: bool = False,
    cost: str | None = None,
    observation: str = "native",
) -> tuple[Any, Any]:
    """The training and evaluation VecEnvs of one run.

    ``n_envs`` copies of the task (seeds ``seed``, ``seed + 1``, ...); ``cost="smooth"`` trains on
    the paper's smooth hazard-distance cost (the native 0/1 cost is still counted as violations,
    and evaluation always reports the native cost); ``observation="paper"`` gives both the paper's
    scaled Goal observation (``sb3_offtrc.envs.observations``); ``normalize_obs`` wraps both in SB3's
    ``VecNormalize`` (observations only), the evaluation env sharing the training statistics.
    """
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    train_id = env_id
    if cost == "smooth":
        train_id = "OffTRC/" + env_id.replace("-v", "Smooth-v") if not env_id.startswith("OffTRC/") else env_id
    train_env: Any = DummyVecEnv([(lambda k=k: make_env(train_id, seed + k, observation)) for k in range(n_envs)])
    eval_env: Any = DummyVecEnv([lambda: make_env(env_id, seed + 10_000, observation)])
    if normalize_obs:
        train_env = VecNormalize(train_env, norm_obs=True, norm_reward=False)
        eval_env = VecNormalize(eval_env, norm_obs=True, norm_reward=False, training=False)
        eval_env.obs_rms = train_env.obs_rms  # the same object: evaluation sees today's statistics
    return train_env, eval_env


def episode_length(env: Any) -> int | None:
    """The time limit of the episodes (the TimeLimit wrapper's, as the outer spec reports it)."""
    steps = getattr(env.spec, "max_episode_steps", None)
    return int(steps) if steps else None


class CsvLog:
    def __init__(self, path: Path, fields: list[str]) -> None:
        self.fields = fields
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields)
        self.writer.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: row.get(k, "") for k in self.fields})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


EPISODE_FIELDS = ["env_steps", "wall_time", "return", "cost", "cv", "length"]
CURVE_FIELDS = [
    "env_steps",
    "wall_time",
    "train_time",
    "train_episodes",
    "train_return",
    "train_cost",
    "train_cv",
    "train_cv_total",
    "eval_return",
    "eval_return_std",
    "eval_cost",
    "eval_cost_std",
    "eval_cost_cvar",
    "eval_cv",
    "eval_violation_rate",
]


def _make_recorder(spec: RunSpec, eval_env: Any, episode_limit: float | None, episodes: CsvLog, curve: CsvLog) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    from sb3_offtrc.common.evaluation import evaluate_safe_policy

    class BenchRecorder(BaseCallback):
        """Logs every training episode and evaluates every ``eval_freq`` env steps (and at 0 and the end)."""

        def __init__(self) -> None:
            super().__init__()
            self.start = time.perf_counter()
            self.eval_time = 0.0
            self.eval_cpu = 0.0
            self.next_eval = 0
            self.pending: list[dict[str, float]] = []
            self.n_episodes = 0
            self.cv_total = 0.0
            self.last_eval: dict[str, float] = {}

        def _on_training_start(self) -> None:
            self.start = time.perf_counter()
            self.evaluate()

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", []):
                ep = info.get("episode")
                if ep is not None:
                    row = {
                        "env_steps": self.num_timesteps,
                        "wall_time": round(time.perf_counter() - self.start, 3),
                        "return": float(ep["r"]),
                        "cost": float(ep.get("c", math.nan)),
                        "cv": float(ep.get("cv", math.nan)),
                        "length": int(ep["l"]),
                    }
                    episodes.write(row)
                    self.pending.append(row)
                    self.n_episodes += 1
                    self.cv_total += row["cv"]
            if self.num_timesteps >= self.next_eval:
                self.evaluate()
            return True

        def _on_training_end(self) -> None:
            if not self.last_eval or self.last_eval["env_steps"] < self.num_timesteps:
                self.evaluate()

        def evaluate(self) -> None:
            t0, cpu0 = time.perf_counter(), time.process_time()
            result = evaluate_safe_policy(
                self.model,
                eval_env,
                n_eval_episodes=spec.n_eval_episodes,
                deterministic=True,
                cvar_alpha=spec.cvar_alpha,
                cost_limit=episode_limit,
            )
            self.eval_time += time.perf_counter() - t0
            self.eval_cpu += time.process_time() - cpu0
            wall = time.perf_counter() - self.start
            pending = self.pending
            row = {
                "env_steps": self.num_timesteps,
                "wall_time": round(wall, 3),
                "train_time": round(wall - self.eval_time, 3),
                "train_episodes": self.n_episodes,
                "train_return": np.mean([p["return"] for p in pending]) if pending else "",
                "train_cost": np.mean([p["cost"] for p in pending]) if pending else "",
                "train_cv": np.mean([p["cv"] for p in pending]) if pending else "",
                "train_cv_total": self.cv_total,
                "eval_return": result.mean_reward,
                "eval_return_std": result.std_reward,
                "eval_cost": result.mean_cost,
                "eval_cost_std": result.std_cost,
                "eval_cost_cvar": result.cost_cvar,
                "eval_cv": result.mean_cv,
                "eval_violation_rate": result.violation_rate,
            }
            curve.write(row)
            self.pending = []
            self.last_eval = {k: float(v) for k, v in row.items() if v != ""}
            while self.next_eval <= self.num_timesteps:
                self.next_eval += spec.eval_freq

    return BenchRecorder()


def run_one(spec: RunSpec, run_dir: Path | None = None) -> dict[str, Any]:
    """Train one (algo, env, seed) and return its summary (also written to ``summary.json``).

    The files go to ``run_dir``, by default the run's place in the results (``spec.run_dir``).
    """
    import torch as th

    # one core per run: the grid runs `--workers` processes side by side
    th.set_num_threads(1)
    import stable_baselines3

    import sb3_offtrc

    module, name = ALGORITHMS[spec.base]
    algo_class = getattr(importlib.import_module(module), name)

    run_dir = spec.run_dir if run_dir is None else run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished earlier attempt: start it again from scratch
    run_dir.mkdir(parents=True)

    # a deep copy: SB3 writes into the policy_kwargs dict it is given
    kwargs = copy.deepcopy(spec.hyperparams)
    env_options = kwargs.pop("env", {})
    train_env, eval_env = make_train_env(spec.env_id, spec.seed, **env_options)
    horizon = episode_length(getattr(train_env, "venv", train_env).envs[0])
    episode_limit = spec.cost_limit * horizon if horizon else None
    if spec.base in CONSTRAINED:
        kwargs["cost_limit"] = spec.cost_limit
    model = algo_class("MlpPolicy", train_env, seed=spec.seed, device="cpu", verbose=0, **kwargs)

    episodes = CsvLog(run_dir / "episodes.csv", EPISODE_FIELDS)
    curve = CsvLog(run_dir / "curve.csv", CURVE_FIELDS)
    recorder = _make_recorder(spec, eval_env, episode_limit, episodes, curve)
    learn_kwargs: dict[str, Any] = {}
    if spec.train_log:
        from stable_baselines3.common.logger import configure

        model.set_logger(configure(str(run_dir), ["csv"]))
        learn_kwargs["log_interval"] = 1
    start = time.perf_counter()
    cpu_start = time.process_time()
    try:
        model.learn(total_timesteps=spec.budget, callback=recorder, **learn_kwargs)
    finally:
        episodes.close()
        curve.close()
        if spec.train_log:
            model.logger.close()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    train_time = max(wall - recorder.eval_time, 1e-9)
    # CPU time is the steadier speed figure on a shared machine (wall time counts waiting for a core)
    train_cpu = max(cpu - recorder.eval_cpu, 1e-9)

    summary = {
        "key": spec.key,
        "preset": spec.preset,
        "algo": spec.algo,
        "algo_class": f"{module}.{name}",
        "env_id": spec.env_id,
        "seed": spec.seed,
        "budget": spec.budget,
        "env_steps": int(model.num_timesteps),
        "episode_length": horizon,
        "cost_limit": spec.cost_limit,
        "episode_cost_limit": episode_limit,
        "wall_time": round(wall, 2),
        "cpu_time": round(cpu, 2),
        "eval_time": round(recorder.eval_time, 2),
        "env_steps_per_s": round(model.num_timesteps / train_time, 2),
        "env_steps_per_cpu_s": round(model.num_timesteps / train_cpu, 2),
        "train_episodes": recorder.n_episodes,
        "train_cv_total": recorder.cv_total,
        "final_eval": recorder.last_eval,
        "hyperparams": spec.hyperparams,
        "versions": {
            "python": platform.python_version(),
            "torch": th.__version__,
            "stable_baselines3": stable_baselines3.__version__,
            "sb3_offtrc": sb3_offtrc.__version__,
        },
        "code": code_version(),
        "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": th.get_num_threads()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if spec.save_model:
        model.save(run_dir / "model.zip")
        if hasattr(train_env, "obs_rms"):  # VecNormalize: the statistics the policy was trained on
            train_env.save(str(run_dir / "vecnormalize.pkl"))
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=float))
    tmp.replace(run_dir / "summary.json")
    train_env.close()
    eval_env.close()
    return summary


#: the benchmark scripts whose changes make a run's code "dirty" (with the package itself)
HARNESS_FILES = ["benchmarks/run.py", "benchmarks/grid.py", "benchmarks/onerun.py", "benchmarks/backends.py"]


def code_version(*scripts: str) -> dict[str, Any]:
    """The git commit of the checkout and whether the package, the run harness or the given scripts
    (paths relative to the checkout: a measurement script passes its own) differ from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "sb3_offtrc", *HARNESS_FILES, *scripts],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def run_to_files(spec: RunSpec) -> RunFiles:
    """Train one run in a temporary directory and return its files' contents.

    For a run on a machine that does not share the driver's file system: the driver writes the
    files into the results with :func:`write_run_files`.
    """
    with tempfile.TemporaryDirectory(prefix="sb3-offtrc-run-") as tmp:
        run_dir = Path(tmp) / "run"
        run_one(spec, run_dir)
        return {path.name: path.read_bytes() for path in sorted(run_dir.iterdir()) if path.is_file()}


def write_run_files(run_dir: Path, files: RunFiles) -> dict[str, Any]:
    """Write a run's files (from :func:`run_to_files`) into ``run_dir`` and return its summary.

    Same contract as a run written in place: whatever an earlier attempt left there is removed,
    and ``summary.json`` comes last and atomically, so an interrupted write reads as unfinished.
    """
    if "summary.json" not in files:
        raise ValueError(f"{run_dir}: the run handed back no summary.json (files: {sorted(files)})")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    for name, content in files.items():
        if name != "summary.json":
            (run_dir / name).write_bytes(content)
    tmp = run_dir / "summary.json.tmp"
    tmp.write_bytes(files["summary.json"])
    tmp.replace(run_dir / "summary.json")
    summary: dict[str, Any] = json.loads(files["summary.json"])
    return summary


def finished(spec: RunSpec) -> bool:
    path = spec.run_dir / "summary.json"
    if not path.exists():
        return False
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return bool(summary.get("budget") == spec.budget and summary.get("hyperparams") == spec.hyperparams)


def available(algo: str) -> str | None:
    """None when the algorithm's module imports, else the reason it does not."""
    module, name = ALGORITHMS[algo]
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
