"""Evaluation that sees costs: :func:`evaluate_safe_policy` and :class:`SafeEvalCallback`.

SB3's ``evaluate_policy`` only reports returns. Here each evaluation episode also yields its cost
sum (``info[cost_key]`` summed over the episode) and its violation count (see
:func:`sb3_offtrc.common.monitor.step_violation`), from which come the mean episode cost, its
empirical CVaR and a violation rate.

Empirical CVaR_alpha of the episode costs = the mean of the ``ceil(alpha * n)`` largest of the
``n`` episode costs (at least one), i.e. the average over the worst alpha-fraction of episodes.
It is an undiscounted, per-episode figure, unlike the discounted CVaR OffTRC constrains
during training (ALGORITHM.md §1).
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.type_aliases import PolicyPredictor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, sync_envs_normalization

from sb3_offtrc.common.monitor import step_violation
from sb3_offtrc.cost_signal import check_cost


def empirical_cvar(values: np.ndarray | list[float], alpha: float) -> float:
    """Mean of the ``ceil(alpha * n)`` largest values (upper tail: large costs are bad)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"cvar_alpha must be in (0, 1], got {alpha}")
    x = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    if x.size == 0:
        return float("nan")
    k = max(1, math.ceil(alpha * x.size - 1e-9))
    return float(x[:k].mean())


@dataclass
class SafeEvalResult:
    """Outcome of :func:`evaluate_safe_policy` (all episode figures undiscounted).

    ``violation_rate`` is the fraction of episodes whose cost exceeds ``cost_limit`` when a limit
    is given, otherwise the fraction of episodes with at least one violating step.
    """

    mean_reward: float
    std_reward: float
    mean_cost: float
    std_cost: float
    cost_cvar: float
    mean_cv: float
    violation_rate: float
    mean_ep_length: float
    cvar_alpha: float
    cost_limit: float | None
    episode_rewards: list[float] = field(default_factory=list)
    episode_costs: list[float] = field(default_factory=list)
    episode_cvs: list[int] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, float]:
        """The scalar fields only (for tables and loggers)."""
        return {k: v for k, v in asdict(self).items() if not isinstance(v, list) and v is not None}


def evaluate_safe_policy(
    model: PolicyPredictor,
    env: gym.Env | VecEnv,
    n_eval_episodes: int = 10,
    deterministic: bool = True,
    cvar_alpha: float = 0.125,
    cost_key: str = "cost",
    cost_limit: float | None = None,
    violation_key: str | None = None,
    render: bool = False,
    callback: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> SafeEvalResult:
    """Run ``n_eval_episodes`` episodes and report return, cost, CVaR of cost and violations.

    Works like SB3's ``evaluate_policy``: ``env`` may be a plain gymnasium env or a VecEnv, and
    episodes are spread evenly over the VecEnv's copies so the result is not biased toward short
    episodes. Rewards are summed as the env returns them (use an env without reward
    normalisation).

    :param model: anything with SB3's ``predict`` (an algorithm or a policy).
    :param env: the evaluation environment; its step info must carry ``cost_key``.
    :param n_eval_episodes: number of episodes.
    :param deterministic: use the deterministic action.
    :param cvar_alpha: tail fraction for the empirical CVaR of episode costs.
    :param cost_key: info key of the step cost.
    :param cost_limit: episode-level cost limit for ``violation_rate`` (e.g. ``d * T``).
    :param violation_key: info key of a per-step violation flag (default: ``"cv"`` or
        ``"violation"`` when present, else ``cost > 0``).
    :param render: call ``env.render()`` every step.
    :param callback: called as ``callback(locals(), globals())`` after every env copy's step,
        like ``evaluate_policy``'s callback.
    """
    empirical_cvar([], cvar_alpha)  # checks cvar_alpha before any episode is run
    if cost_limit is not None and not math.isfinite(cost_limit):
        raise ValueError(f"evaluate_safe_policy: cost_limit must be a finite episode cost or None, got {cost_limit}")
    if not isinstance(env, VecEnv):
        env = DummyVecEnv([lambda: env])  # type: ignore[list-item, return-value]
    n_envs = env.num_envs
    targets = np.array([(n_eval_episodes + i) // n_envs for i in range(n_envs)], dtype=int)
    counts = np.zeros(n_envs, dtype=int)
    cur_reward = np.zeros(n_envs)
    cur_cost = np.zeros(n_envs)
    cur_cv = np.zeros(n_envs, dtype=int)
    cur_len = np.zeros(n_envs, dtype=int)
    rewards: list[float] = []
    costs: list[float] = []
    cvs: list[int] = []
    lengths: list[int] = []
    observations = env.reset()
    states = None
    episode_starts = np.ones(n_envs, dtype=bool)
    while (counts < targets).any():
        actions, states = model.predict(
            observations,  # type: ignore[arg-type]
            state=states,
            episode_start=episode_starts,
            deterministic=deterministic,
        )
        observations, step_rewards, dones, infos = env.step(actions)
        for i in range(n_envs):
            if counts[i] >= targets[i]:
                continue
            info = infos[i]
            if cost_key not in info:
                raise KeyError(
                    f"evaluate_safe_policy: step info has no {cost_key!r} key (keys: {sorted(info)}); "
                    "pass cost_key=..., or wrap the env in CostMonitor(env, cost_fn=...)"
                )
            cost = check_cost(info[cost_key], cost_key, "evaluate_safe_policy", f" from env index {i}")
            cur_reward[i] += float(step_rewards[i])
            cur_cost[i] += cost
            cur_cv[i] += int(step_violation(cost, info, violation_key))
            cur_len[i] += 1
            done = bool(dones[i])
            episode_starts[i] = done
            if callback is not None:
                callback(locals(), globals())
            if done:
                rewards.append(float(cur_reward[i]))
                costs.append(float(cur_cost[i]))
                cvs.append(int(cur_cv[i]))
                lengths.append(int(cur_len[i]))
                counts[i] += 1
                cur_reward[i] = cur_cost[i] = 0.0
                cur_cv[i] = cur_len[i] = 0
        if render:
            env.render()
    cost_array = np.asarray(costs)
    if cost_limit is not None:
        violation_rate = float(np.mean(cost_array > cost_limit))
    else:
        violation_rate = float(np.mean(np.asarray(cvs) > 0))
    return SafeEvalResult(
        mean_reward=float(np.mean(rewards)),
        std_reward=float(np.std(rewards)),
        mean_cost=float(cost_array.mean()),
        std_cost=float(cost_array.std()),
        cost_cvar=empirical_cvar(cost_array, cvar_alpha),
        mean_cv=float(np.mean(cvs)),
        violation_rate=violation_rate,
        mean_ep_length=float(np.mean(lengths)),
        cvar_alpha=cvar_alpha,
        cost_limit=cost_limit,
        episode_rewards=rewards,
        episode_costs=costs,
        episode_cvs=cvs,
        episode_lengths=lengths,
    )


class SafeEvalCallback(EvalCallback):
    """Periodic evaluation with costs; keeps the best *feasible* model.

    Logs ``eval/mean_reward``, ``eval/mean_ep_length``, ``eval/ep_cost_mean``,
    ``eval/ep_cost_cvar``, ``eval/ep_cv_mean``, ``eval/violation_rate`` and ``eval/feasible``.
    An evaluation is feasible when its ``constraint_metric`` (mean episode cost, or its CVaR)
    is at most ``cost_limit``; the best model is the one with the highest mean return among
    feasible evaluations (with ``cost_limit=None`` every evaluation is feasible, as in
    ``EvalCallback``). ``evaluations.npz`` in ``log_path`` gains ``costs`` and ``cvs`` arrays.

    :param eval_env: the evaluation environment (its info must carry ``cost_key``).
    :param cost_limit: episode-level cost limit (e.g. ``d * T`` for per-step limit ``d``).
    :param constraint_metric: ``"mean"`` or ``"cvar"``: which episode-cost figure must be within
        the limit.
    :param cvar_alpha: tail fraction for the empirical CVaR.
    :param cost_key: info key of the step cost.
    :param callback_on_new_best: called when a new best feasible model is found.
    :param callback_after_eval: called after every evaluation.
    :param n_eval_episodes: episodes per evaluation.
    :param eval_freq: evaluate every ``eval_freq`` calls (i.e. ``env.step`` calls of training).
    :param log_path: folder for ``evaluations.npz``.
    :param best_model_save_path: folder for ``best_model.zip``.
    :param deterministic: deterministic actions during evaluation.
    :param render: render during evaluation.
    :param verbose: 1 prints each evaluation.
    """

    def __init__(
        self,
        eval_env: gym.Env | VecEnv,
        cost_limit: float | None = None,
        constraint_metric: str = "mean",
        cvar_alpha: float = 0.125,
        cost_key: str = "cost",
        callback_on_new_best: BaseCallback | None = None,
        callback_after_eval: BaseCallback | None = None,
        n_eval_episodes: int = 5,
        eval_freq: int = 10000,
        log_path: str | None = None,
        best_model_save_path: str | None = None,
        deterministic: bool = True,
        render: bool = False,
        verbose: int = 1,
    ) -> None:
        if constraint_metric not in ("mean", "cvar"):
            raise ValueError(f"constraint_metric must be 'mean' or 'cvar', got {constraint_metric!r}")
        if cost_limit is not None and not math.isfinite(cost_limit):
            raise ValueError(f"SafeEvalCallback: cost_limit must be a finite episode cost or None, got {cost_limit}")
        empirical_cvar([], cvar_alpha)  # checks cvar_alpha
        super().__init__(
            eval_env,
            callback_on_new_best=callback_on_new_best,
            callback_after_eval=callback_after_eval,
            n_eval_episodes=n_eval_episodes,
            eval_freq=eval_freq,
            log_path=log_path,
            best_model_save_path=best_model_save_path,
            deterministic=deterministic,
            render=render,
            verbose=verbose,
            warn=False,
        )
        self.cost_limit = cost_limit
        self.constraint_metric = constraint_metric
        self.cvar_alpha = cvar_alpha
        self.cost_key = cost_key
        self.evaluations_costs: list[list[float]] = []
        self.evaluations_cvs: list[list[int]] = []
        self.last_result: SafeEvalResult | None = None
        self.last_mean_cost = float("nan")

    def _feasible(self, costs: Sequence[float]) -> bool:
        if self.cost_limit is None:
            return True
        metric = (
            float(np.mean(costs)) if self.constraint_metric == "mean" else empirical_cvar(list(costs), self.cvar_alpha)
        )
        return metric <= self.cost_limit

    def restore_history(self, path: str) -> int:
        """Continue the ``evaluations.npz`` of an earlier run (a resumed one) instead of starting it anew.

        Loads its evaluations (with ``allow_pickle=False``), so that the file this callback writes keeps
        them, and sets ``best_mean_reward`` to the best feasible one among them, so that ``best_model``
        is only replaced by a better model. Returns the number of evaluations restored.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in ("timesteps", "results", "ep_lengths", "costs", "cvs")}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path!r} is not an evaluations file of SafeEvalCallback ({exc})") from None
        self.evaluations_timesteps = arrays["timesteps"].tolist()
        self.evaluations_results = arrays["results"].tolist()
        self.evaluations_length = arrays["ep_lengths"].tolist()
        self.evaluations_costs = arrays["costs"].tolist()
        self.evaluations_cvs = arrays["cvs"].tolist()
        for rewards, costs in zip(self.evaluations_results, self.evaluations_costs, strict=True):
            if self._feasible(costs):
                self.best_mean_reward = max(self.best_mean_reward, float(np.mean(rewards)))
        return len(self.evaluations_timesteps)

    def _on_step(self) -> bool:
        if not (self.eval_freq > 0 and self.n_calls % self.eval_freq == 0):
            return True
        continue_training = True
        if self.model.get_vec_normalize_env() is not None:
            sync_envs_normalization(self.training_env, self.eval_env)
        result = evaluate_safe_policy(
            self.model,
            self.eval_env,
            n_eval_episodes=self.n_eval_episodes,
            deterministic=self.deterministic,
            cvar_alpha=self.cvar_alpha,
            cost_key=self.cost_key,
            cost_limit=self.cost_limit,
            render=self.render,
        )
        self.last_result = result
        self.last_mean_reward = result.mean_reward
        self.last_mean_cost = result.mean_cost
        if self.log_path is not None:
            self.evaluations_timesteps.append(self.num_timesteps)
            self.evaluations_results.append(result.episode_rewards)
            self.evaluations_length.append(result.episode_lengths)
            self.evaluations_costs.append(result.episode_costs)
            self.evaluations_cvs.append(result.episode_cvs)
            np.savez(
                self.log_path,
                timesteps=self.evaluations_timesteps,
                results=self.evaluations_results,
                ep_lengths=self.evaluations_length,
                costs=self.evaluations_costs,
                cvs=self.evaluations_cvs,
            )
        feasible = self._feasible(result.episode_costs)
        if self.verbose >= 1:
            print(
                f"Eval num_timesteps={self.num_timesteps}, episode_reward={result.mean_reward:.2f} "
                f"+/- {result.std_reward:.2f}, episode_cost={result.mean_cost:.2f} "
                f"(CVaR {result.cost_cvar:.2f}, CV {result.mean_cv:.2f}){'' if feasible else ' over the limit'}"
            )
        self.logger.record("eval/mean_reward", result.mean_reward)
        self.logger.record("eval/mean_ep_length", result.mean_ep_length)
        self.logger.record("eval/ep_cost_mean", result.mean_cost)
        self.logger.record("eval/ep_cost_cvar", result.cost_cvar)
        self.logger.record("eval/ep_cv_mean", result.mean_cv)
        self.logger.record("eval/violation_rate", result.violation_rate)
        self.logger.record("eval/feasible", float(feasible))
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(self.num_timesteps)
        if feasible and result.mean_reward > self.best_mean_reward:
            if self.verbose >= 1:
                print("New best feasible mean reward!")
            if self.best_model_save_path is not None:
                self.model.save(os.path.join(self.best_model_save_path, "best_model"))
            self.best_mean_reward = result.mean_reward
            if self.callback_on_new_best is not None:
                continue_training = self.callback_on_new_best.on_step()
        if self.callback is not None:
            continue_training = continue_training and self._on_event()
        return continue_training


__all__ = ["SafeEvalCallback", "SafeEvalResult", "empirical_cvar", "evaluate_safe_policy"]
