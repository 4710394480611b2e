"""Pieces shared by the Lagrangian baselines: reading the cost, tracking episode costs, the multiplier.

Convention (the same as OffTRC's, see ``ALGORITHM.md`` §1): ``cost_limit`` is a *per-step* limit
``d``; the constraint is on the expected discounted cost return,

    J_C = E[sum_t gamma^t c_t] <= D = d / (1 - gamma).

An agent whose average step cost is ``d`` sits exactly on the limit, so for an episodic task with
``T`` steps the undiscounted episode-cost limit is roughly ``d * T``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th
from torch import nn


def costs_from_infos(infos: Sequence[dict[str, Any]], cost_key: str, owner: str = "This algorithm") -> np.ndarray:
    """Per-env step costs ``info[cost_key]`` as a float32 array, with an error that says how to fix a missing key.

    :param infos: the ``infos`` list returned by ``VecEnv.step``.
    :param cost_key: the info key that carries the step cost.
    :param owner: name used in the error message.
    """
    costs = np.zeros(len(infos), dtype=np.float32)
    for idx, info in enumerate(infos):
        if cost_key not in info:
            raise KeyError(
                f"{owner} needs the per-step cost in info[{cost_key!r}], but env {idx} returned an info dict "
                f"without it (keys: {sorted(info)}). Use an environment that reports its cost there "
                "(e.g. the built-in 'HazardPoint-v0' after `import sb3_offtrc.envs`, or a Safety-Gymnasium "
                "task through sb3_offtrc.make_safety_env), or pass cost_key=<the key your env uses>."
            )
        costs[idx] = float(info[cost_key])
    return costs


class EpisodeCostTracker:
    """Sums step costs per env copy and keeps the totals of the last ``window`` finished episodes.

    :param n_envs: number of env copies in the VecEnv.
    :param window: how many finished episodes ``ep_costs`` keeps (SB3's ``stats_window_size``).
    """

    def __init__(self, n_envs: int, window: int = 100) -> None:
        self.running = np.zeros(n_envs, dtype=np.float64)
        self.ep_costs: deque[float] = deque(maxlen=window)

    def update(self, costs: np.ndarray, dones: np.ndarray) -> None:
        if self.running.shape != costs.shape:
            # a different VecEnv was attached (set_env after load): its episodes start afresh
            self.running = np.zeros(costs.shape, dtype=np.float64)
        self.running += costs
        for idx in np.flatnonzero(dones):
            self.ep_costs.append(float(self.running[idx]))
            self.running[idx] = 0.0

    def mean(self) -> float | None:
        return float(np.mean(self.ep_costs)) if len(self.ep_costs) > 0 else None


class LagrangeMultiplier(nn.Module):
    """A learned Lagrange multiplier ``lambda >= 0`` for the constraint ``J_C <= D``.

    The Lagrangian ``L = J_R - lambda (J_C - D)`` is minimised over ``lambda``, i.e. ``lambda``
    follows gradient *ascent* on ``lambda (J_C - D)``: it rises while the cost estimate is above
    the limit and falls while below. ``lambda`` is kept as a plain scalar and projected back onto
    ``[0, max_value]`` after every step (projected gradient ascent; a softplus or log
    parametrisation would never reach exactly 0 and would need ``initial_value > 0``). The step is
    taken with Adam, so its size is about ``lr`` per update whatever the scale of ``J_C - D``.

    :param initial_value: starting ``lambda`` (>= 0).
    :param lr: Adam learning rate of the multiplier.
    :param max_value: optional upper bound on ``lambda`` (``None``: unbounded).
    :param device: torch device of the parameter.
    """

    def __init__(
        self,
        initial_value: float = 0.0,
        lr: float = 1e-2,
        max_value: float | None = None,
        device: th.device | str = "cpu",
    ) -> None:
        super().__init__()
        if initial_value < 0:
            raise ValueError(f"initial_value must be >= 0, got {initial_value}")
        self.max_value = max_value
        self.multiplier = nn.Parameter(th.tensor(float(initial_value), device=device))
        # no first-moment momentum (beta1 = 0): with the projection at 0, momentum built up while the
        # constraint was slack would hold lambda at 0 for several updates after the cost crosses the
        # limit, which hurts most for PPO (one update per rollout)
        self.optimizer = th.optim.Adam([self.multiplier], lr=lr, betas=(0.0, 0.999))

    @property
    def value(self) -> float:
        return float(self.multiplier.detach().item())

    def update(self, cost_estimate: float, cost_return_limit: float) -> float:
        """One projected ascent step on ``lambda (cost_estimate - cost_return_limit)``; returns the new ``lambda``."""
        loss = -self.multiplier * float(cost_estimate - cost_return_limit)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with th.no_grad():
            self.multiplier.clamp_(min=0.0, max=self.max_value)
        return self.value
