"""Episode costs for ``python -m sb3_offtrc.zoo enjoy``.

rl-zoo3's ``enjoy`` prints the reward and length of each episode and their means, but knows
nothing of costs. :class:`VecEpisodeCostReporter` wraps the VecEnv that ``enjoy`` builds and
prints, next to rl-zoo3's lines, each finished episode's cost and violation count, then on
``close()`` the mean episode cost, its empirical CVaR and the violations per episode.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from sb3_offtrc.common.evaluation import empirical_cvar
from sb3_offtrc.common.monitor import step_violation


class VecEpisodeCostReporter(VecEnvWrapper):
    """Sums ``info[cost_key]`` per env copy and prints every finished episode's cost.

    An env that reports no cost is not an error here (``enjoy`` only replays a policy): the
    wrapper says once that there is nothing to report and stays silent afterwards.

    :param venv: the VecEnv to watch.
    :param cost_key: the info key of the step cost.
    :param cvar_alpha: tail fraction of the episode-cost CVaR in the summary.
    :param verbose: 0 prints nothing (rl-zoo3's ``--verbose 0``).
    :param stream: where to print (stdout by default).
    """

    def __init__(
        self,
        venv: VecEnv,
        cost_key: str = "cost",
        cvar_alpha: float = 0.125,
        verbose: int = 1,
        stream: TextIO | None = None,
    ) -> None:
        super().__init__(venv)
        self.cost_key = cost_key
        self.cvar_alpha = cvar_alpha
        self.verbose = verbose
        self.stream = stream
        self.running_cost = np.zeros(self.num_envs, dtype=np.float64)
        self.running_cv = np.zeros(self.num_envs, dtype=np.int64)
        self.episode_costs: list[float] = []
        self.episode_cvs: list[int] = []
        self._missing_reported = False

    def _print(self, text: str) -> None:
        if self.verbose > 0:
            print(text, file=self.stream or sys.stdout)

    def reset(self) -> Any:
        self.running_cost[:] = 0.0
        self.running_cv[:] = 0
        return self.venv.reset()

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        for idx, info in enumerate(infos):
            if self.cost_key not in info:
                if not self._missing_reported:
                    self._missing_reported = True
                    self._print(f"(no info[{self.cost_key!r}] from this env: episode costs are not reported)")
                continue
            cost = float(info[self.cost_key])
            self.running_cost[idx] += cost
            self.running_cv[idx] += int(step_violation(cost, info))
            if dones[idx]:
                self.episode_costs.append(float(self.running_cost[idx]))
                self.episode_cvs.append(int(self.running_cv[idx]))
                prefix = f"[env {idx}] " if self.num_envs > 1 else ""
                self._print(f"{prefix}Episode Cost: {self.running_cost[idx]:.2f} (violations: {self.running_cv[idx]})")
                self.running_cost[idx] = 0.0
                self.running_cv[idx] = 0
        return obs, rewards, dones, infos

    def summary(self) -> dict[str, float] | None:
        """Mean and std of the episode costs, their CVaR and the mean violations; None before any episode."""
        if not self.episode_costs:
            return None
        costs = np.asarray(self.episode_costs)
        return {
            "episodes": float(costs.size),
            "mean_cost": float(costs.mean()),
            "std_cost": float(costs.std()),
            "cost_cvar": empirical_cvar(costs, self.cvar_alpha),
            "mean_violations": float(np.mean(self.episode_cvs)),
        }

    def close(self) -> None:
        stats = self.summary()
        if stats is not None:
            self._print(f"Mean episode cost: {stats['mean_cost']:.2f} +/- {stats['std_cost']:.2f}")
            self._print(f"Episode cost CVaR({self.cvar_alpha:g}): {stats['cost_cvar']:.2f}")
            self._print(f"Mean violations per episode: {stats['mean_violations']:.2f}")
        self.venv.close()


__all__ = ["VecEpisodeCostReporter"]
