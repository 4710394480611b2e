"""Turn a results directory of ``benchmarks/run.py`` into PNG curves and a markdown table.

Reads every ``<env>/<algo>/seed<k>/`` that has a ``summary.json`` (finished runs only) and writes,
next to them:

- ``curves_<env>.png``: evaluation return and episode cost (top) and training return and episode
  cost (bottom) against env steps, mean ± std over seeds, the episode cost limit dashed (the
  longest runs'; an env's shorter budgets get ``curves_<env>_<N>k.png``);
- ``report.md``: per env and algorithm, over seeds (mean ± std): final eval return, final eval
  episode cost and its CVaR, total training-time constraint violations, env steps until the eval
  cost stays under the limit, training env-steps per wall-clock second and per CPU second of the
  run's process (evaluation excluded), and the CPU-second rate relative to SAC's on the same env
  (the CPU figure is the steadier one on a shared machine); then, where OffTRC with the paper's
  settings has two or more seeds, every other algorithm's training violations against it, with a
  one-sided permutation p-value over seeds and, on the seeds both have run, a paired one.

Usage::

    python benchmarks/report.py                                  # benchmarks/results/quick
    python benchmarks/report.py --results benchmarks/results/full
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALGO_ORDER = [
    "offtrc_recommended",
    "rec_actionvalue",
    "rec_actionvalue_smooth_limit2x",
    "rec_actionvalue_smooth_limit1.6x",
    "rec_actionvalue_smooth_limit2x_twinq",
    "rec_actionvalue_smooth_limit2x_mult",
    "offtrc",
    "offtrc_cpu",
    "sac_lag",
    "ppo_lag",
    "sac",
    "ppo",
]
LABELS = {
    "offtrc_recommended": "OffTRC (recommended preset)",
    # the learning study's round 6 (benchmarks/grid.py LEARN6): the preset with surrogate="action_value"
    "rec_actionvalue": "OffTRC (recommended, action-value surrogate)",
    # round 7 (LEARN7): the same trained on the smooth hazard-distance cost, limit 50, native cost reported
    "rec_actionvalue_smooth_limit2x": "OffTRC (action-value, smooth training cost)",
    # round 9 (LEARN9): the same with the smooth cost's limit at 40 per episode
    "rec_actionvalue_smooth_limit1.6x": "OffTRC (action-value, smooth training cost, limit 40)",
    # round 11 (LEARN10): the smooth-cost arm (limit 50) with a pessimistic pair of critics per side
    "rec_actionvalue_smooth_limit2x_twinq": "OffTRC (action-value, smooth training cost, critic pairs)",
    # round 12 (LEARN11): the smooth-cost arm (limit 50) with cost_step="multiplier"
    "rec_actionvalue_smooth_limit2x_mult": "OffTRC (action-value, smooth training cost, cost multiplier)",
    # round 13 (LEARN12): the smooth-cost arm (limit 50) with cost_q_form="dynamics"
    "rec_actionvalue_smooth_limit2x_dynq": "OffTRC (action-value, smooth training cost, cost through a one-step model)",
    # round 13 (LEARN12): the smooth-cost arm (limit 50) with the critics given the clipped action
    "rec_actionvalue_smooth_limit2x_clip": "OffTRC (action-value, smooth training cost, clipped critic input)",
    "rec_actionvalue_smooth_limit2x_clip_stdmin0.15": "OffTRC (action-value, smooth cost, clipped input, std >= 0.15)",
    "offtrc": "OffTRC",
    "offtrc_cpu": "OffTRC (cpu preset)",
    "sac_lag": "SAC-Lag",
    "ppo_lag": "PPO-Lag",
    "sac": "SAC",
    "ppo": "PPO",
    # the previous cpu preset (5 critic passes), the one before it (5 passes, Fisher products on a
    # fifth of the states) and, in the preset check, one-change variants of that one
    # (benchmarks/grid.py CPU_VARIANTS)
    "offtrc_cpu_5passes": "previous cpu preset (5 critic passes)",
    "offtrc_cpu_fisher0.2": "cpu preset before that (Fisher on a fifth)",
    "offtrc_cpu_fisher0.5": "preset before that, Fisher on half the states",
    "offtrc_cpu_fisher0.2_10passes": "preset before that, 10 critic passes",
    "offtrc_cpu_fisher0.2_lr3e-4": "preset before that, lr 3e-4",
    "offtrc_cpu_fisher0.2_256": "preset before that, 256-wide nets",
    "offtrc_cpu_fisher0.2_fullfit": "preset before that, paper's critic fit",
    # the full grid: the 5-pass preset with one of its savings undone
    "offtrc_cpu_fullfit": "5-pass preset, paper's critic fit",
    "offtrc_cpu_pi512": "5-pass preset, 2 x 512 actor",
    "offtrc_cpu_vf512": "5-pass preset, 2 x 512 critics",
    "offtrc_cpu_nets512": "5-pass preset, 2 x 512 actor and critics",
    # the learning study (grid.py LEARN_VARIANTS): the cpu preset with one lever changed at a time
    "kl0.01_fixed": "OffTRC, max_kl 0.01 fixed",
    "kl0.03_fixed": "OffTRC, max_kl 0.03 fixed",
    "kl0.01_adaptive": "OffTRC, max_kl 0.01 adaptive",
    "kl0.01_fixed_shrink": "OffTRC, max_kl 0.01 fixed, shrunk cost gradient",
    "kl0.01_fixed_n5": "OffTRC, max_kl 0.01 fixed, 5 envs",
    "kl0.01_fixed_n5_smooth_norm": "OffTRC, 0.01 fixed, 5 envs, smooth cost, VecNormalize",
    "kl0.01_fixed_n5_smooth_paperobs": "OffTRC, 0.01 fixed, 5 envs, smooth cost, paper obs",
    "kl0.01_fixed_n5_smooth_norm_shrink": "OffTRC, 0.01 fixed, 5 envs, smooth cost, VecNormalize, shrunk",
    # results/code_check: the 5-pass preset's settings as named by the code of commit 75b390a
    "offtrc_cpu_fisher1": "5-pass preset's settings, code of 75b390a",
}


@dataclass
class Run:
    summary: dict[str, Any]
    curve: pd.DataFrame
    episodes: pd.DataFrame

    @property
    def algo(self) -> str:
        return str(self.summary["algo"])

    @property
    def env_id(self) -> str:
        return str(self.summary["env_id"])

    @property
    def budget(self) -> int:
        return int(self.summary.get("budget", self.summary["env_steps"]))


def _reporting_run(env_runs: list[Run]) -> Run:
    """The run whose episode cost limit the reported costs are judged against.

    An arm that trains on the smooth hazard cost (``hyperparams["env"]["cost"] == "smooth"``) trains
    under its own limit but is evaluated, like every other arm, on the native cost: the first run that
    trains on the reported cost (the first run where every arm is smooth).
    """

    def smooth(run: Run) -> bool:
        env = (run.summary.get("hyperparams") or {}).get("env") or {}
        return isinstance(env, dict) and env.get("cost") == "smooth"

    return next((r for r in env_runs if not smooth(r)), env_runs[0])


def reported_cost_limit(env_runs: list[Run]) -> float | None:
    """The episode cost limit the reported costs are judged against (see :func:`_reporting_run`)."""
    return _reporting_run(env_runs).summary.get("episode_cost_limit")


def _budgets(env_runs: list[Run]) -> list[int]:
    """The env's budgets, longest first (each budget gets its own rows and figure)."""
    return sorted({r.budget for r in env_runs}, reverse=True)


def _algo_key(algo: str) -> tuple[int, str]:
    """Known algorithms in ALGO_ORDER, then the rest (e.g. preset variants) by name."""
    return (ALGO_ORDER.index(algo) if algo in ALGO_ORDER else len(ALGO_ORDER), algo)


def load_runs(results: Path) -> list[Run]:
    runs = []
    for path in sorted(results.glob("*/*/seed*/summary.json")):
        summary = json.loads(path.read_text())
        curve = pd.read_csv(path.parent / "curve.csv")
        episodes = pd.read_csv(path.parent / "episodes.csv")
        runs.append(Run(summary, curve, episodes))
    return runs


def steps_until_under_limit(curve: pd.DataFrame, limit: float | None) -> float:
    """First eval step from which every later eval's mean episode cost is <= limit (nan: never)."""
    if limit is None or curve.empty:
        return math.nan
    above = curve["eval_cost"].to_numpy() > limit + 1e-9
    if above[-1]:
        return math.nan
    last_above = np.flatnonzero(above)
    if last_above.size == 0:
        return float(curve["env_steps"].iloc[0])
    return float(curve["env_steps"].iloc[last_above[-1] + 1])


def _mean_std(values: list[float], fmt: str = "{:.2f}") -> str:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return "–"
    if arr.size == 1:
        return fmt.format(arr[0])
    return f"{fmt.format(np.nanmean(arr))} ± {fmt.format(np.nanstd(arr))}"


def _steps_cell(values: list[float]) -> str:
    arr = np.asarray(values, dtype=float)
    never = int(np.isnan(arr).sum())
    if never == arr.size:
        return "never"
    text = f"{np.nanmean(arr):,.0f}"
    return f"{text} ({never}/{arr.size} never)" if never else text


def _cpu_rate(run: Run) -> float:
    return float(run.summary.get("env_steps_per_cpu_s", math.nan))


COLUMNS = [
    "algorithm",
    "seeds",
    "env steps",
    "final return",
    "final episode cost",
    "final cost CVaR",
    "training violations (total)",
    "steps until eval cost stays ≤ limit",
    "env-steps/s",
    "env-steps/CPU-s",
    "× SAC speed (CPU)",
    "wall time (s)",
]


def _row(algo: str, group: list[Run], limit: float | None, sac_rate: float) -> list[str]:
    finals = [r.summary["final_eval"] for r in group]
    cpu_rates = [_cpu_rate(r) for r in group]
    return [
        LABELS.get(algo, algo),
        str(len(group)),
        f"{int(np.mean([r.summary['env_steps'] for r in group])):,}",
        _mean_std([f["eval_return"] for f in finals]),
        _mean_std([f["eval_cost"] for f in finals]),
        _mean_std([f["eval_cost_cvar"] for f in finals]),
        _mean_std([float(r.summary["train_cv_total"]) for r in group], "{:,.0f}"),
        _steps_cell([steps_until_under_limit(r.curve, limit) for r in group]),
        _mean_std([r.summary["env_steps_per_s"] for r in group], "{:,.0f}"),
        _mean_std(cpu_rates, "{:,.0f}"),
        "–" if math.isnan(sac_rate) else f"{np.mean(cpu_rates) / sac_rate:.2f}",
        _mean_std([r.summary["wall_time"] for r in group], "{:,.0f}"),
    ]


def permutation_p_value(
    reference: list[float], other: list[float], max_exact: int = 50_000, n_resamples: int = 50_000, seed: int = 0
) -> float:
    """One-sided permutation p-value of ``mean(other) - mean(reference)`` being this large by chance.

    Under the null hypothesis the seeds of both groups are exchangeable; the p-value is the share of
    the ways to split the pooled values into groups of the same sizes whose difference of means is at
    least the observed one. Exact (every split) up to ``max_exact`` splits, otherwise estimated from
    ``n_resamples`` random splits with the observed split counted once (so p > 0).
    """
    pooled = np.asarray([*reference, *other], dtype=float)
    n_ref, n = len(reference), len(reference) + len(other)
    if n_ref == 0 or n_ref == n:
        raise ValueError("both groups need at least one value")
    total = pooled.sum()

    def diff(ref_sum: np.ndarray | float) -> np.ndarray | float:
        return (total - ref_sum) / (n - n_ref) - ref_sum / n_ref

    observed = diff(float(np.sum(reference)))
    tolerance = 1e-9 * max(1.0, abs(observed))
    if math.comb(n, n_ref) <= max_exact:
        sums = np.array([pooled[list(idx)].sum() for idx in itertools.combinations(range(n), n_ref)])
        return float(np.mean(diff(sums) >= observed - tolerance))
    rng = np.random.default_rng(seed)
    draws = np.array([pooled[rng.permutation(n)[:n_ref]].sum() for _ in range(n_resamples)])
    return float((np.sum(diff(draws) >= observed - tolerance) + 1) / (n_resamples + 1))


def paired_p_value(
    reference: list[float], other: list[float], max_exact: int = 2**16, n_resamples: int = 50_000, seed: int = 0
) -> float:
    """One-sided paired permutation p-value of ``mean(other - reference)`` being this large by chance.

    ``reference[i]`` and ``other[i]`` are runs on the same seed (the same env layouts and initial
    states). Under the null hypothesis either run of a pair could have come from either setting: the
    p-value is the share of the ``2**n`` sign flips of the per-seed differences whose mean is at least
    the observed one. Exact up to ``max_exact`` flips, otherwise estimated from ``n_resamples`` random
    flips with the observed one counted once (so p > 0).
    """
    diffs = np.asarray(other, dtype=float) - np.asarray(reference, dtype=float)
    if diffs.ndim != 1 or len(reference) != len(other) or diffs.size == 0:
        raise ValueError("paired_p_value needs two lists of the same, nonzero length")
    n = diffs.size
    observed = float(diffs.mean())
    tolerance = 1e-9 * max(1.0, abs(observed))
    if 2**n <= max_exact:
        signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)  # every +-1 pattern
        return float(np.mean(signs @ diffs / n >= observed - tolerance))
    rng = np.random.default_rng(seed)
    flipped = rng.choice([-1.0, 1.0], size=(n_resamples, n)) @ diffs / n
    return float((np.sum(flipped >= observed - tolerance) + 1) / (n_resamples + 1))


REFERENCE_ALGO = "offtrc"  # the paper's settings: what the preset and its variants must not do worse than


def format_p(p: float) -> str:
    """Three decimals; below 0.001 as "< 0.001" (a Monte Carlo estimate is never exactly 0)."""
    return "< 0.001" if p < 0.0005 else f"{p:.3f}"


def seed_pairs(reference: dict[int, float], other: dict[int, float]) -> tuple[list[float], list[float]]:
    """The values of the seeds both have, in seed order: ``(reference values, other values)``."""
    shared = sorted(set(reference) & set(other))
    return [reference[s] for s in shared], [other[s] for s in shared]


def _violations_by_seed(runs: list[Run], algo: str) -> dict[int, float]:
    return {int(r.summary["seed"]): float(r.summary["train_cv_total"]) for r in runs if r.algo == algo}


def violations_against_reference(runs: list[Run]) -> str:
    """Per env and budget: each algorithm's training violations against the paper-settings OffTRC runs.

    Empty when no env has at least two reference seeds.
    """
    lines: list[str] = []
    for env_id in sorted({r.env_id for r in runs}):
        env_runs = [r for r in runs if r.env_id == env_id]
        for budget in _budgets(env_runs):
            budget_runs = [r for r in env_runs if r.budget == budget]
            reference = [float(r.summary["train_cv_total"]) for r in budget_runs if r.algo == REFERENCE_ALGO]
            others = sorted({r.algo for r in budget_runs} - {REFERENCE_ALGO}, key=_algo_key)
            if len(reference) < 2 or not others:
                continue
            lines += [
                f"#### {env_id}, {budget:,} steps: against {LABELS[REFERENCE_ALGO]} with the paper's settings "
                f"({len(reference)} seeds, mean {np.mean(reference):,.0f} violations)",
                "",
                "| algorithm | seeds | mean violations | difference | p (more violations by chance) "
                "| shared seeds | paired difference | paired p |",
                "|---|---|---|---|---|---|---|---|",
            ]
            reference_by_seed = _violations_by_seed(budget_runs, REFERENCE_ALGO)
            for algo in others:
                values = [float(r.summary["train_cv_total"]) for r in budget_runs if r.algo == algo]
                if len(values) < 2:
                    continue
                p = permutation_p_value(reference, values)
                ref_pairs, other_pairs = seed_pairs(reference_by_seed, _violations_by_seed(budget_runs, algo))
                paired = "| – | – |"
                if len(ref_pairs) >= 2:
                    paired = (
                        f"| {np.mean(other_pairs) - np.mean(ref_pairs):+,.0f} | "
                        f"{format_p(paired_p_value(ref_pairs, other_pairs))} |"
                    )
                lines.append(
                    f"| {LABELS.get(algo, algo)} | {len(values)} | {np.mean(values):,.0f} | "
                    f"{np.mean(values) - np.mean(reference):+,.0f} | {format_p(p)} | {len(ref_pairs)} {paired}"
                )
            lines.append("")
    if not lines:
        return ""
    header = [
        "### Training violations against the paper's settings",
        "",
        "One-sided permutation test over seeds: the share of the ways to split the pooled seeds into "
        "groups of the same sizes whose difference of means is at least the observed one (every split "
        "up to 50,000 of them). A small p says the difference is unlikely to be seed luck; a large one "
        "says these seeds cannot tell the two apart, not that they are equal. A seed fixes the env's "
        "layouts, so some seeds are harder than others for every algorithm: the last three columns "
        "compare only the seeds both have run, pair by pair (the mean of the per-seed differences, and "
        "the share of the sign flips of those differences whose mean is at least the observed one). "
        "Each row is its own test: among several rows, a small p now and then is expected by chance.",
        "",
    ]
    return "\n".join(header + lines)


#: what decides a run's numbers: the algorithm's own files, the envs and the harness's one-run code
#: (not the presets, the CLI or the docs; a run's own hyperparameters are in its summary)
SHARED_RUN_CODE = ["sb3_offtrc/envs", "sb3_offtrc/common", "sb3_offtrc/cost_signal.py", "benchmarks/onerun.py"]
_OFFTRC_OWN_CODE = [
    "sb3_offtrc/offtrc/offtrc.py",
    "sb3_offtrc/offtrc/policies.py",
    "sb3_offtrc/offtrc/buffers.py",
    "sb3_offtrc/core",
]
OFFTRC_RUN_CODE = [*_OFFTRC_OWN_CODE, *SHARED_RUN_CODE]
BASELINE_RUN_CODE = ["sb3_offtrc/lagrangian", *SHARED_RUN_CODE]
RUN_CODE = [*_OFFTRC_OWN_CODE, *BASELINE_RUN_CODE]


def run_code(summary: dict[str, Any]) -> list[str]:
    """The files a run's numbers depend on: OffTRC's for its runs, the baselines' for the others
    (a change to OffTRC does not make a PPO run stale, nor the reverse)."""
    class_name = str(summary.get("algo_class", "")).rsplit(".", 1)[-1]
    is_offtrc = class_name == "OffTRC" or str(summary.get("algo", "")).startswith("offtrc")
    return OFFTRC_RUN_CODE if is_offtrc else BASELINE_RUN_CODE


def code_changed_since(
    commits: set[str | None], root: Path = RESULTS_DIR.parent.parent, paths: list[str] | None = None
) -> dict[str | None, str]:
    """For each commit that made a run: ``""`` if the code in ``paths`` (default RUN_CODE) is the
    same now (in the working tree), else why not ("changed since", "unknown commit", "no commit
    recorded")."""
    import subprocess

    status: dict[str | None, str] = {}
    for commit in commits:
        if not commit:
            status[commit] = "no commit recorded"
            continue
        try:
            done = subprocess.run(
                ["git", "diff", "--quiet", commit, "--", *(paths or RUN_CODE)],
                cwd=root,
                capture_output=True,
                check=False,
            )
        except OSError:
            status[commit] = "unknown commit"
            continue
        status[commit] = {0: "", 1: "changed since"}.get(done.returncode, "unknown commit")
    return status


def stale_runs(runs: list[Run]) -> set[int]:
    """``id`` of each run made by code other than the present in the files its numbers depend on."""
    stale: set[int] = set()
    for paths in (OFFTRC_RUN_CODE, BASELINE_RUN_CODE):
        family = [r for r in runs if run_code(r.summary) is paths]
        status = code_changed_since({r.summary.get("code", {}).get("commit") for r in family}, paths=paths)
        stale |= {id(r) for r in family if status[r.summary.get("code", {}).get("commit")]}
    return stale


def table(runs: list[Run]) -> str:
    stale = stale_runs(runs)
    lines = []
    for env_id in sorted({r.env_id for r in runs}):
        env_runs = [r for r in runs if r.env_id == env_id]
        first = _reporting_run(env_runs).summary
        limit = first.get("episode_cost_limit")
        sac_rates = [_cpu_rate(r) for r in env_runs if r.algo == "sac"]
        sac_rate = float(np.mean(sac_rates)) if sac_rates else math.nan
        lines += [
            f"### {env_id}",
            "",
            f"Episode cost limit {limit} (d = {first['cost_limit']} per step x {first['episode_length']} steps). "
            "Final = last evaluation, deterministic policy; mean ± std over seeds.",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS),
        ]
        for budget in _budgets(env_runs):
            budget_runs = [r for r in env_runs if r.budget == budget]
            for algo in sorted({r.algo for r in budget_runs}, key=_algo_key):
                group = [r for r in budget_runs if r.algo == algo]
                row = _row(algo, group, limit, sac_rate)
                if any(id(r) in stale for r in group):
                    row[0] += " †"
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if stale:
        made_by = Counter(
            (r.summary.get("code", {}).get("commit") or "")[:7] or "no commit recorded" for r in runs if id(r) in stale
        )
        lines += [
            "† made by code other than the present one in the files the run depends on (OffTRC: "
            f"{', '.join(OFFTRC_RUN_CODE)}; the baselines: {', '.join(BASELINE_RUN_CODE)}), or by a "
            "commit this report cannot check: a rerun may give other numbers ("
            + ", ".join(f"{what}: {n} run{'s' * (n > 1)}" for what, n in sorted(made_by.items()))
            + ").",
            "",
        ]
    return "\n".join(lines)


def at_steps(run: Run, steps: int) -> pd.Series | None:
    """The run's first evaluation at or after ``steps`` env steps (``None`` if it stopped before).

    PPO's evaluations fall on the first rollout boundary past each multiple of ``eval_freq``, so
    "at or after" keeps them comparable with the off-policy algorithms' (a few hundred steps later).
    """
    later = run.curve[run.curve["env_steps"] >= steps]
    return None if later.empty else later.iloc[0]


def early_table(runs: list[Run], steps: int) -> str:
    """Every algorithm's evaluation and training violations after ``steps`` env steps, whatever its
    budget: the early phase of a long run next to the short runs of another grid."""
    # a seed counts once: the same (task, algorithm, seed) in two grids (a 100k grid and a 1M one)
    # trained identically up to the shorter budget; the first one given (--results) is kept
    unique: dict[tuple[str, str, int], Run] = {}
    for run in runs:
        unique.setdefault((run.env_id, run.algo, int(run.summary["seed"])), run)
    runs = list(unique.values())
    lines = []
    for env_id in sorted({r.env_id for r in runs}):
        rows = []
        for algo in sorted({r.algo for r in runs if r.env_id == env_id}, key=_algo_key):
            points = [p for r in runs if r.env_id == env_id and r.algo == algo if (p := at_steps(r, steps)) is not None]
            if not points:
                continue
            rows.append(
                [
                    LABELS.get(algo, algo),
                    str(len(points)),
                    _mean_std([float(p["eval_return"]) for p in points]),
                    _mean_std([float(p["eval_cost"]) for p in points]),
                    _mean_std([float(p["train_cv_total"]) for p in points], "{:,.0f}"),
                    _mean_std([float(p.get("train_time", p["wall_time"])) for p in points], "{:,.0f}"),
                ]
            )
        if not rows:
            continue
        header = ["algorithm", "seeds", "return", "episode cost", "training violations so far", "training time (s)"]
        lines += [
            f"### {env_id}: after {steps:,} env steps",
            "",
            "The first evaluation at or after that step (deterministic policy), mean ± std over seeds; "
            "training time = wall-clock seconds without the evaluations.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows),
            "",
        ]
    return "\n".join(lines)


def _aggregate(series: list[tuple[np.ndarray, np.ndarray]], grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of curves ``(x, y)`` interpolated onto ``grid`` (nan outside each x range)."""
    stacked = []
    for x, y in series:
        keep = ~np.isnan(y)
        x, y = x[keep], y[keep]
        if x.size == 0:
            stacked.append(np.full(grid.shape, np.nan))
            continue
        interp = np.interp(grid, x, y)
        interp[(grid < x[0]) | (grid > x[-1])] = np.nan
        stacked.append(interp)
    data = np.vstack(stacked)
    with warnings.catch_warnings():
        # a grid point covered by no seed
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(data, axis=0), np.nanstd(data, axis=0)


def _eval_series(run: Run, column: str) -> tuple[np.ndarray, np.ndarray]:
    return run.curve["env_steps"].to_numpy(dtype=float), pd.to_numeric(run.curve[column]).to_numpy(dtype=float)


def _train_series(run: Run, column: str, window: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Training episodes, smoothed by a running mean over ``window`` episodes."""
    ep = run.episodes
    if column == "cv" and "cv" not in ep:
        column = "cost"  # records from before violations were logged: there the cost is the 0/1 cost
    y = pd.to_numeric(ep[column]).rolling(window, min_periods=1).mean()
    return ep["env_steps"].to_numpy(dtype=float), y.to_numpy(dtype=float)


def plot(runs: list[Run], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figures = []  # (env id, budget, runs, file name)
    for env_id in sorted({r.env_id for r in runs}):
        all_env_runs = [r for r in runs if r.env_id == env_id]
        budgets = _budgets(all_env_runs)
        for budget in budgets:
            # the longest runs' figure without suffix, so that adding runs never renames a figure
            name = f"curves_{env_id.replace('/', '_')}" + ("" if budget == max(budgets) else f"_{budget // 1000}k")
            figures.append((env_id, budget, [r for r in all_env_runs if r.budget == budget], name))
    for env_id, budget, env_runs, name in figures:
        limit = reported_cost_limit(env_runs)
        fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
        panels = [
            (axes[0, 0], "eval_return", "eval return (deterministic)", _eval_series),
            (axes[0, 1], "eval_cost", "eval episode cost", _eval_series),
            (axes[1, 0], "return", "training episode return (10-episode mean)", _train_series),
            # violations (the 0/1 cost), not the training cost: an arm may train on the smooth cost
            (axes[1, 1], "cv", "training episode violations (10-episode mean)", _train_series),
        ]
        for algo in sorted({r.algo for r in env_runs}, key=_algo_key):
            group = [r for r in env_runs if r.algo == algo]
            for ax, column, _, series_of in panels:
                series = [series_of(r, column) for r in group]
                if series_of is _eval_series:
                    grid = series[0][0]
                else:
                    top = max((x[-1] for x, _ in series if x.size), default=0.0)
                    grid = np.linspace(0.0, top, 200)
                mean, std = _aggregate(series, grid)
                (line,) = ax.plot(
                    grid,
                    mean,
                    marker="." if grid.size < 30 else None,
                    label=f"{LABELS.get(algo, algo)} (n={len(group)})",
                )
                ax.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        for ax, column, title, _ in panels:
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            if column in ("eval_cost", "cv") and limit is not None:
                ax.axhline(limit, color="k", linestyle="--", linewidth=1, label=f"cost limit {limit:g}")
        for ax in axes[1]:
            ax.set_xlabel("env steps")
        axes[0, 1].legend(fontsize=8)
        fig.suptitle(f"{env_id}, {budget:,} env steps: mean ± std over seeds")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        written.append(plot_wall_clock(env_runs, out / f"{name}_wallclock.png", f"{env_id}, {budget:,} env steps"))
    return written


def _wall_series(run: Run, column: str) -> tuple[np.ndarray, np.ndarray]:
    """An evaluation column against the run's training seconds (its own evaluations' time left out)."""
    curve = run.curve
    seconds = pd.to_numeric(curve["train_time"] if "train_time" in curve else curve["wall_time"])
    return seconds.to_numpy(dtype=float), pd.to_numeric(curve[column]).to_numpy(dtype=float)


def plot_wall_clock(runs: list[Run], path: Path, title: str) -> Path:
    """Eval return and episode cost against training wall-clock seconds, mean ± std over seeds.

    Seconds are those of the run's own process on this machine (one core each, evaluation time
    left out), so algorithms of different speed compare by the time a user waits.
    """
    import matplotlib.pyplot as plt

    limit = reported_cost_limit(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for algo in sorted({r.algo for r in runs}, key=_algo_key):
        group = [r for r in runs if r.algo == algo]
        for ax, column in zip(axes, ("eval_return", "eval_cost"), strict=True):
            series = [_wall_series(r, column) for r in group]
            top = max((x[-1] for x, _ in series if x.size), default=0.0)
            grid = np.linspace(0.0, top, 100)
            mean, std = _aggregate(series, grid)
            (line,) = ax.plot(grid, mean, label=f"{LABELS.get(algo, algo)} (n={len(group)})")
            ax.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes[0].set_title("eval return (deterministic)", fontsize=10)
    axes[1].set_title("eval episode cost", fontsize=10)
    if limit is not None:
        axes[1].axhline(limit, color="k", linestyle="--", linewidth=1, label=f"cost limit {limit:g}")
    for ax in axes:
        ax.set_xlabel("training wall-clock seconds (one core)")
        ax.set_xscale("symlog", linthresh=60.0)
        ax.set_xlim(left=0.0)
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)
    fig.suptitle(f"{title}: against wall-clock time")
    fig.tight_layout(rect=(0.0, 0.06 + 0.035 * math.ceil(len(labels) / 3), 1.0, 1.0))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_doc(doc: Path, name: str, body: str) -> None:
    """Replace what lies between ``<!-- BEGIN report:<name> -->`` and ``<!-- END report:<name> -->`` in ``doc``."""
    begin, end = f"<!-- BEGIN report:{name} -->", f"<!-- END report:{name} -->"
    text = doc.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "quick", help="a run.py results directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the results directory)")
    parser.add_argument(
        "--update-doc",
        type=Path,
        default=None,
        help="also paste the table and figures into this markdown file, between "
        "<!-- BEGIN report:NAME --> and <!-- END report:NAME --> (NAME = the results directory's name)",
    )
    parser.add_argument(
        "--also",
        type=Path,
        nargs="+",
        default=[],
        help="more results directories whose runs join the report (e.g. baselines run in another grid)",
    )
    parser.add_argument("--algos", nargs="+", default=None, help="only these algorithms")
    parser.add_argument("--envs", nargs="+", default=None, help="only these env ids")
    parser.add_argument("--budgets", nargs="+", type=int, default=None, help="only runs of these budgets")
    parser.add_argument(
        "--at",
        type=int,
        nargs="+",
        default=[],
        metavar="STEPS",
        help="also tabulate every run's evaluation and training violations after STEPS env steps",
    )
    args = parser.parse_args(argv)
    runs = [run for results in [args.results, *args.also] for run in load_runs(results)]
    runs = [
        run
        for run in runs
        if (args.algos is None or run.algo in args.algos)
        and (args.envs is None or run.env_id in args.envs)
        and (args.budgets is None or run.budget in args.budgets)
    ]
    if not runs:
        print(f"no finished runs under {args.results}", file=sys.stderr)
        return 1
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot(runs, out)
    command_file = args.results / "command.txt"
    commands = command_file.read_text().splitlines() if command_file.exists() else []
    # the joined directories' own logs stay in their command.txt (a long grid's would bury this one's)
    commands += [f"# and the runs of {results}, made by the commands in its command.txt" for results in args.also]
    provenance = ""
    if commands:
        report_cmd = " ".join(["python", "benchmarks/report.py", *(argv if argv is not None else sys.argv[1:])])
        ran = "".join(f"    {command}\n" for command in commands if command.strip())
        provenance = f"Produced by\n\n{ran}\nthen `{report_cmd}`.\n\n"
    comparison = violations_against_reference(runs)
    early = "".join("\n" + early_table(runs, steps) for steps in args.at)
    body = provenance + table(runs) + early + (f"\n{comparison}" if comparison else "")
    report = "# Benchmark results\n\n" + body + "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in pngs)
    (out / "report.md").write_text(report)
    print(report)
    if args.update_doc is not None:
        doc_dir = args.update_doc.resolve().parent
        figures = "".join(f"![{p.stem}]({os.path.relpath(p.resolve(), doc_dir)})\n" for p in pngs)
        update_doc(args.update_doc, args.results.resolve().name, body + "\n" + figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
