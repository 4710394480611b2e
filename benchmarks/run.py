"""Benchmark grid: {algorithm} x {env} x {seed} at a fixed env-step budget, resumable.

Every run uses the same env construction (``make_safety_env`` -> SB3 ``Monitor`` ->
``CostMonitor``), the same periodic evaluation (``evaluate_safe_policy`` on a separate env,
deterministic actions) and the same bookkeeping; the algorithms differ by class and
hyperparameters only. Each run writes into ``<out>/<env>/<algo>/seed<k>/``:

- ``episodes.csv``: every training episode (env steps at its end, return, cost, violations, length);
- ``curve.csv``: one row per evaluation (env steps, wall time, training return/cost/violations since
  the previous row, cumulative training violations, eval return/cost/CVaR/violations);
- ``summary.json``: written last, atomically; its presence marks the run finished;
- ``progress.csv`` (with ``--train-log`` only): SB3's logger output, dumped after every episode.

A finished run's summary is also appended to ``<out>/runs.jsonl``. Rerunning the same command
skips finished runs and restarts unfinished ones from scratch, so a long grid can be resumed.

Usage::

    python benchmarks/run.py --quick                 # minutes, HazardPoint-v0, CI-sized
    python benchmarks/run.py --full --workers 2      # hours; results/full, resumable
    python benchmarks/run.py --quick --algos sac ppo_lag --budget 500 --out /tmp/bench
    python benchmarks/run.py --quick --force          # retrain although results/quick is committed
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

# the script lives outside the package: make `import sb3_offtrc` work from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sb3_offtrc.offtrc.presets import get_preset  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: name -> (module, class). Swapping the algorithm swaps only this.
ALGORITHMS: dict[str, tuple[str, str]] = {
    "offtrc": ("sb3_offtrc.offtrc", "OffTRC"),
    "sac": ("stable_baselines3", "SAC"),
    "ppo": ("stable_baselines3", "PPO"),
    "sac_lag": ("sb3_offtrc.lagrangian", "SACLagrangian"),
    "ppo_lag": ("sb3_offtrc.lagrangian", "PPOLagrangian"),
    # OffTRC with the CPU preset (sb3_offtrc.offtrc.presets.CPU): same class, other hyperparameters
    "offtrc_cpu": ("sb3_offtrc.offtrc", "OffTRC"),
}
#: algorithms that take ``cost_limit`` (the others only see it in the report)
CONSTRAINED = {"offtrc", "offtrc_cpu", "sac_lag", "ppo_lag"}
#: the quick grid keeps to the library's algorithms; offtrc_cpu is compared in the full grid
_QUICK_ALGOS = ["offtrc", "sac", "ppo", "sac_lag", "ppo_lag"]


@dataclass
class Block:
    """One rectangle of the grid: every algo x env x seed in it runs at ``budget`` env steps."""

    algos: list[str]
    envs: list[str]
    seeds: list[int]
    budget: int


@dataclass
class Preset:
    name: str
    blocks: list[Block]
    cost_limit: float  # per-step d; the episode limit is d * episode length
    eval_freq: int
    n_eval_episodes: int
    cvar_alpha: float = 0.125
    #: per-algorithm constructor kwargs (the cost limit is added for the constrained ones)
    hyperparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: extra algorithm names this preset defines -> the entry of ALGORITHMS they instantiate
    #: (same class, the hyperparameters under the extra name)
    variants: dict[str, str] = field(default_factory=dict)

    def algos(self) -> list[str]:
        """Every algorithm name the preset's blocks use, in order."""
        return list(dict.fromkeys(algo for block in self.blocks for algo in block.algos))


_SMALL_NET = [64, 64]

QUICK = Preset(
    name="quick",
    blocks=[Block(algos=_QUICK_ALGOS, envs=["HazardPoint-v0"], seeds=[0], budget=8_000)],
    cost_limit=0.025,  # HazardPoint: episode limit 2.5 hazard steps, straight line costs ~10
    eval_freq=2_000,
    n_eval_episodes=5,
    hyperparams={
        # small networks and short update intervals so that the whole grid fits CI time
        "offtrc": {
            "n_steps": 500,
            "n_recent": 500,
            "n_batch": 2_000,
            "buffer_size": 8_000,
            "n_critic_epochs": 20,
            "max_kl": 0.01,
            "policy_kwargs": {"net_arch": _SMALL_NET},
        },
        "sac": {"learning_starts": 500, "batch_size": 64, "policy_kwargs": {"net_arch": _SMALL_NET}},
        "sac_lag": {
            "learning_starts": 500,
            "batch_size": 64,
            "lagrangian_lr": 3e-3,
            "policy_kwargs": {"net_arch": _SMALL_NET},
        },
        "ppo": {"n_steps": 1_000, "batch_size": 100, "policy_kwargs": {"net_arch": _SMALL_NET}},
        "ppo_lag": {"n_steps": 1_000, "batch_size": 100, "policy_kwargs": {"net_arch": _SMALL_NET}},
    },
)

#: The cpu preset as it was before it took 10 critic passes per update: 5 (docs/speed.md). Its runs
#: are kept, next to the present preset's, under the name offtrc_cpu_5passes; the variants below
#: that undo one of its savings were built on it.
_CPU_5PASSES = {**get_preset("cpu"), "n_critic_epochs": 5}
#: ... and as it was before that, when it also took the Fisher-vector products on a random fifth of
#: the states (docs/speed.md). Its runs are kept under the name offtrc_cpu_fisher0.2.
_PREVIOUS_CPU = {**_CPU_5PASSES, "fisher_fraction": 0.2}
#: The paper's critic fit (100 full-batch Adam steps at 3e-4), to put back into a cpu preset.
_PAPER_CRITIC_FIT = {"n_critic_epochs": 100, "critic_batch_size": None, "learning_rate": 3e-4}

#: OffTRC variants of the full grid: the two previous cpu presets, and the 5-pass one with some of
#: its savings undone, run to find which of them cost the extra hazard steps on SafetyPointGoal1-v0
#: (the answer, 10 critic passes instead of 5, became the present preset).
FULL_VARIANTS: dict[str, dict[str, Any]] = {
    "offtrc_cpu_5passes": _CPU_5PASSES,
    "offtrc_cpu_fisher0.2": _PREVIOUS_CPU,
    # the paper's critic fit (100 full-batch steps at 3e-4) on the preset's 128-wide critics
    "offtrc_cpu_fullfit": {**_CPU_5PASSES, **_PAPER_CRITIC_FIT},
    # the paper's 2 x 512 actor with the preset's 128-wide critics and their 5-pass minibatch fit
    "offtrc_cpu_pi512": {**_CPU_5PASSES, "policy_kwargs": {"net_arch": {"pi": [512, 512], "vf": [128, 128]}}},
    # the paper's 2 x 512 critics, fitted by 5 passes of 500-sample minibatches
    "offtrc_cpu_vf512": {**_CPU_5PASSES, "policy_kwargs": {"net_arch": {"pi": [128, 128], "vf": [512, 512]}}},
    # both: the paper's networks, fitted by 5 passes of 500-sample minibatches
    "offtrc_cpu_nets512": {**_CPU_5PASSES, "policy_kwargs": {"net_arch": [512, 512]}},
}

FULL = Preset(
    name="full",
    blocks=[
        # the grid: native 0/1 cost, episode limit 25 (d = 0.025 x 1000 steps)
        Block(algos=list(ALGORITHMS), envs=["SafetyPointGoal1-v0"], seeds=[0, 1, 2], budget=100_000),
        Block(algos=list(ALGORITHMS), envs=["SafetyCarGoal1-v0"], seeds=[0, 1, 2], budget=100_000),
        Block(algos=list(ALGORITHMS), envs=["OffTRC/HalfCheetahFlip-v4"], seeds=[0, 1, 2], budget=100_000),
        # training violations vary a lot from seed to seed: more seeds of the cpu preset to compare
        # them with the paper's settings (docs/benchmarks.md); the 5-pass preset on seeds 0-19
        Block(algos=["offtrc_cpu"], envs=["SafetyPointGoal1-v0"], seeds=list(range(3, 20)), budget=100_000),
        Block(
            algos=["offtrc_cpu_5passes"],
            envs=["SafetyPointGoal1-v0", "SafetyCarGoal1-v0", "OffTRC/HalfCheetahFlip-v4"],
            seeds=[0, 1, 2],
            budget=100_000,
        ),
        Block(algos=["offtrc_cpu_5passes"], envs=["SafetyPointGoal1-v0"], seeds=list(range(3, 20)), budget=100_000),
        # ... and of the paper's settings (75-110 minutes per run here)
        Block(algos=["offtrc"], envs=["SafetyPointGoal1-v0"], seeds=list(range(3, 14)), budget=100_000),
        # the cpu preset before that (5 passes, Fisher products on a fifth of the states)
        Block(
            algos=["offtrc_cpu_fisher0.2"],
            envs=["SafetyPointGoal1-v0", "SafetyCarGoal1-v0", "OffTRC/HalfCheetahFlip-v4"],
            seeds=[0, 1, 2],
            budget=100_000,
        ),
        # which of the preset's three remaining savings costs the extra hazard steps on this task: the
        # paper's critic fit, the paper's 2 x 512 actor or its 2 x 512 critics, each put back on its own
        Block(
            algos=["offtrc_cpu_fullfit", "offtrc_cpu_pi512", "offtrc_cpu_vf512"],
            envs=["SafetyPointGoal1-v0"],
            seeds=[0, 1, 2, 3],
            budget=100_000,
        ),
        # the paper's actor and critic widths together, with the preset's critic fit
        Block(algos=["offtrc_cpu_nets512"], envs=["SafetyPointGoal1-v0"], seeds=[0, 1, 2, 3], budget=100_000),
        # longer OffTRC runs to show the trend: the three cpu presets (about half an hour each here)
        # and the paper's settings (about six hours on this 2-core machine)
        Block(algos=["offtrc_cpu", "offtrc_cpu_5passes"], envs=["SafetyPointGoal1-v0"], seeds=[100], budget=500_000),
        Block(algos=["offtrc_cpu_fisher0.2"], envs=["SafetyPointGoal1-v0"], seeds=[100], budget=500_000),
        Block(algos=["offtrc"], envs=["SafetyPointGoal1-v0"], seeds=[100], budget=500_000),
    ],
    cost_limit=0.025,
    eval_freq=10_000,
    n_eval_episodes=10,
    hyperparams={
        # library defaults (OffTRC: the authors' settings), nothing tuned per environment
        "offtrc": {},
        "offtrc_cpu": get_preset("cpu"),
        **FULL_VARIANTS,
        "sac": {},
        "sac_lag": {},
        "ppo": {},
        "ppo_lag": {},
    },
    variants={name: "offtrc" for name in FULL_VARIANTS},
)

#: OffTRC's cpu preset against the paper's settings where OffTRC learns within minutes: the
#: preset changes only compute (network width, critic fit), so both get the same larger trust
#: region (max_kl 0.01, as the HazardPoint learning check) and everything else as is.
#: ``offtrc_cpu_5passes`` is the previous preset (5 critic passes), the ``offtrc_cpu_fisher0.2*``
#: variants the one before it (5 passes, Fisher products on a fifth of the states) and one-change
#: variants of that, run to find which of its savings cost learning; they take under a minute per
#: run, the paper's settings twenty minutes.
_CPU_CHECK = {**get_preset("cpu"), "max_kl": 0.01}
_PREVIOUS_CHECK = {**_PREVIOUS_CPU, "max_kl": 0.01}
CPU_VARIANTS: dict[str, dict[str, Any]] = {
    # the previous preset: 5 critic passes
    "offtrc_cpu_5passes": {**_CPU_5PASSES, "max_kl": 0.01},
    # the one before: the Fisher-vector products on a random fifth of the states
    "offtrc_cpu_fisher0.2": _PREVIOUS_CHECK,
    # ... and on half of them
    "offtrc_cpu_fisher0.5": {**_PREVIOUS_CHECK, "fisher_fraction": 0.5},
    # ... with twice the critic passes
    "offtrc_cpu_fisher0.2_10passes": {**_PREVIOUS_CHECK, "n_critic_epochs": 10},
    # ... with the paper's critic learning rate
    "offtrc_cpu_fisher0.2_lr3e-4": {**_PREVIOUS_CHECK, "learning_rate": 3e-4},
    # ... with 256-wide networks (a quarter of the paper's multiply-adds per layer instead of 1/16)
    "offtrc_cpu_fisher0.2_256": {
        **_PREVIOUS_CHECK,
        "policy_kwargs": {"net_arch": {"pi": [256, 256], "vf": [256, 256]}},
    },
    # ... with the paper's critic fit (100 full-batch steps at 3e-4) on the 128-wide networks
    "offtrc_cpu_fisher0.2_fullfit": {**_PREVIOUS_CHECK, **_PAPER_CRITIC_FIT},
}
PRESET_CHECK = Preset(
    name="preset_check",
    blocks=[
        Block(algos=["offtrc"], envs=["HazardPoint-v0"], seeds=[0, 1, 2, 3, 4], budget=30_000),
        Block(algos=["offtrc_cpu", *CPU_VARIANTS], envs=["HazardPoint-v0"], seeds=list(range(10)), budget=30_000),
    ],
    cost_limit=0.025,
    eval_freq=3_000,
    n_eval_episodes=10,
    hyperparams={"offtrc": {"max_kl": 0.01}, "offtrc_cpu": _CPU_CHECK, **CPU_VARIANTS},
    variants={name: "offtrc" for name in CPU_VARIANTS},
)

#: The learning study (issue: OffTRC learns). Every arm starts from the cpu preset and changes one
#: lever at a time; an arm may also set how its env is built under the reserved key ``"env"``
#: (``n_envs``, ``normalize_obs``, ``cost``: see :func:`make_train_env`). Short evaluations (5
#: episodes every 20k steps) keep a 100k-step run near four minutes here.
_LEARN_BASE = get_preset("cpu")
LEARN_VARIANTS: dict[str, dict[str, Any]] = {
    "offtrc_cpu": _LEARN_BASE,
    # a ten times larger trust region, fixed (no shrinking by the buffer's behaviour KL)
    "kl0.01_fixed": {**_LEARN_BASE, "max_kl": 0.01, "adaptive_trust_region": False},
    "kl0.03_fixed": {**_LEARN_BASE, "max_kl": 0.03, "adaptive_trust_region": False},
    "kl0.01_adaptive": {**_LEARN_BASE, "max_kl": 0.01},
    # the authors' torch setup: five env copies (each recent window then holds five episodes' worth
    # of 200 steps instead of one 1000-step stretch)
    "kl0.01_fixed_n5": {**_LEARN_BASE, "max_kl": 0.01, "adaptive_trust_region": False, "env": {"n_envs": 5}},
    # ... and the paper's training cost (smooth hazard distance) and scaled observations (running
    # mean/std, SB3's VecNormalize)
    "kl0.01_fixed_n5_smooth_norm": {
        **_LEARN_BASE,
        "max_kl": 0.01,
        "adaptive_trust_region": False,
        "env": {"n_envs": 5, "cost": "smooth", "normalize_obs": True},
    },
    # ... with the paper's own scaled 24-dim observation instead of the running normalisation
    "kl0.01_fixed_n5_smooth_paperobs": {
        **_LEARN_BASE,
        "max_kl": 0.01,
        "adaptive_trust_region": False,
        "env": {"n_envs": 5, "cost": "smooth", "observation": "paper"},
    },
    # ... with the cost gradient shrunk to the share two halves of the batch agree on
    "kl0.01_fixed_n5_smooth_norm_shrink": {
        **_LEARN_BASE,
        "max_kl": 0.01,
        "adaptive_trust_region": False,
        "cost_gradient_shrinkage": True,
        "env": {"n_envs": 5, "cost": "smooth", "normalize_obs": True},
    },
    "kl0.01_fixed_shrink": {
        **_LEARN_BASE,
        "max_kl": 0.01,
        "adaptive_trust_region": False,
        "cost_gradient_shrinkage": True,
    },
    # ... with the larger radius
    "kl0.03_fixed_n5_smooth_norm": {
        **_LEARN_BASE,
        "max_kl": 0.03,
        "adaptive_trust_region": False,
        "env": {"n_envs": 5, "cost": "smooth", "normalize_obs": True},
    },
    # the surrogates' baseline inside the importance weight (OffTRC(weighted_baseline=True)), on
    # the two arms that led at 1M steps
    "kl0.01_fixed_wb": {**_LEARN_BASE, "max_kl": 0.01, "adaptive_trust_region": False, "weighted_baseline": True},
    "kl0.01_fixed_n5_smooth_norm_shrink_wb": {
        **_LEARN_BASE,
        "max_kl": 0.01,
        "adaptive_trust_region": False,
        "cost_gradient_shrinkage": True,
        "weighted_baseline": True,
        "env": {"n_envs": 5, "cost": "smooth", "normalize_obs": True},
    },
}
LEARN = Preset(
    name="learn",
    blocks=[
        Block(algos=list(LEARN_VARIANTS), envs=["SafetyPointGoal1-v0"], seeds=[0, 1, 2], budget=100_000),
    ],
    cost_limit=0.025,
    eval_freq=20_000,
    n_eval_episodes=5,
    hyperparams=dict(LEARN_VARIANTS),
    variants={name: "offtrc" for name in LEARN_VARIANTS if name != "offtrc_cpu"},
)

#: The two arms of the learning study that led at 100k steps, at the issue's budget of 1M steps
#: (about 35 minutes each here): the largest return (fixed radius 0.01) and the fewest violations
#: (the paper's task setup with the shrunk cost gradient). Ten evaluation episodes every 50k steps.
LEARN_1M = Preset(
    name="learn_1m",
    blocks=[
        Block(
            algos=[
                "kl0.01_fixed",
                "kl0.01_fixed_n5_smooth_norm_shrink",
                "kl0.01_fixed_wb",
                "kl0.01_fixed_n5_smooth_norm_shrink_wb",
            ],
            envs=["SafetyPointGoal1-v0"],
            seeds=[0],
            budget=1_000_000,
        ),
    ],
    cost_limit=0.025,
    eval_freq=50_000,
    n_eval_episodes=10,
    hyperparams=dict(LEARN_VARIANTS),
    variants=dict(LEARN.variants),
)

PRESETS = {"quick": QUICK, "full": FULL, "preset_check": PRESET_CHECK, "learn": LEARN, "learn_1m": LEARN_1M}


@dataclass
class RunSpec:
    preset: str
    algo: str
    env_id: str
    seed: int
    budget: int
    cost_limit: float
    eval_freq: int
    n_eval_episodes: int
    cvar_alpha: float
    hyperparams: dict[str, Any]
    out: str
    #: the ALGORITHMS entry to instantiate (``algo`` itself unless it is a preset's variant)
    base: str
    #: also keep SB3's logger output (``train/*``, ``rollout/*``), dumped after every episode, in
    #: ``progress.csv`` (``--train-log``)
    train_log: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.env_id.replace("/", "_") / self.algo / f"seed{self.seed}"

    @property
    def key(self) -> str:
        return f"{self.env_id}/{self.algo}/seed{self.seed}"


def expand(
    preset: Preset,
    out: Path,
    algos: list[str] | None,
    envs: list[str] | None,
    seeds: list[int] | None,
    budget: int | None,
) -> list[RunSpec]:
    specs = []
    for block in preset.blocks:
        for env_id in block.envs:
            if envs and env_id not in envs:
                continue
            for algo in block.algos:
                if algos and algo not in algos:
                    continue
                for seed in seeds if seeds is not None else block.seeds:
                    specs.append(
                        RunSpec(
                            preset=preset.name,
                            algo=algo,
                            env_id=env_id,
                            seed=seed,
                            budget=budget or block.budget,
                            cost_limit=preset.cost_limit,
                            eval_freq=min(preset.eval_freq, budget or block.budget),
                            n_eval_episodes=preset.n_eval_episodes,
                            cvar_alpha=preset.cvar_alpha,
                            hyperparams=preset.hyperparams.get(algo, {}),
                            out=str(out),
                            base=preset.variants.get(algo, algo),
                        )
                    )
    # one key may be listed by two blocks (e.g. a longer run of the same seed): keep the first
    seen: set[str] = set()
    unique = []
    for spec in specs:
        if spec.key not in seen:
            seen.add(spec.key)
            unique.append(spec)
    return unique


# ----------------------------------------------------------------------------- one run


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


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train one (algo, env, seed) and return its summary (also written to ``summary.json``)."""
    import torch as th

    # one core per run: the grid runs `--workers` processes side by side
    th.set_num_threads(1)
    import stable_baselines3

    import sb3_offtrc

    module, name = ALGORITHMS[spec.base]
    algo_class = getattr(importlib.import_module(module), name)

    run_dir = spec.run_dir
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
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=float))
    tmp.replace(run_dir / "summary.json")
    train_env.close()
    eval_env.close()
    return summary


def code_version() -> dict[str, Any]:
    """The git commit of the checkout and whether the package or the benchmarks differ from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "sb3_offtrc", "benchmarks/run.py"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def _run_safely(spec: RunSpec) -> dict[str, Any]:
    try:
        return run_one(spec)
    except Exception:  # one failing run must not take the rest of the grid down
        return {"key": spec.key, "error": traceback.format_exc()}


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
        default=min(2, os.cpu_count() or 1),
        help="runs in parallel, one process and one torch thread each (default: 2, or 1 on a 1-core machine)",
    )
    parser.add_argument(
        "--train-log",
        action="store_true",
        help="also write each run's SB3 logger output (train/*, rollout/*; every episode) to progress.csv",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    parser.add_argument(
        "--force", action="store_true", help="rerun the selected runs even if finished (their old records are dropped)"
    )
    args = parser.parse_args(argv)

    presets = {"full": FULL, "preset_check": PRESET_CHECK, "learn": LEARN, "learn_1m": LEARN_1M}
    preset = next((grid for flag, grid in presets.items() if getattr(args, flag)), QUICK)
    out = args.out or RESULTS_DIR / preset.name
    unknown = sorted(set(args.algos or []) - set(preset.algos()))
    if unknown:
        choices = " ".join(preset.algos())
        parser.error(f"--algos {' '.join(unknown)}: not in the {preset.name} grid; choose from {choices}")
    specs = expand(preset, out, args.algos, args.envs, args.seeds, args.budget)
    if args.train_log:
        specs = [replace(spec, train_log=True) for spec in specs]

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
    failures = 0
    for summary in _map(todo, args.workers):
        if "error" in summary:
            failures += 1
            print(f"FAILED {summary['key']}\n{summary['error']}", flush=True)
            continue
        with (out / "runs.jsonl").open("a") as f:
            f.write(json.dumps(summary, default=float) + "\n")
        final = summary["final_eval"]
        print(
            f"finished {summary['key']}: {summary['env_steps']} steps in {summary['wall_time']:.0f}s "
            f"({summary['env_steps_per_s']:.0f} steps/s), eval return {final.get('eval_return', math.nan):.2f} "
            f"cost {final.get('eval_cost', math.nan):.2f}",
            flush=True,
        )
    return 1 if failures else 0


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


def _map(specs: list[RunSpec], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        for spec in specs:
            yield _run_safely(spec)
        return
    # spawn: no torch / MuJoCo state inherited from the parent; one run per child process
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=workers, maxtasksperchild=1) as pool:
        yield from pool.imap_unordered(_run_safely, specs)


if __name__ == "__main__":
    # the script lives outside the package; make `import sb3_offtrc` work from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MUJOCO_GL", "egl")
    sys.exit(main())
