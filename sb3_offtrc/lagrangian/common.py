"""Pieces shared by the Lagrangian baselines: the multiplier (reading the cost and tracking episode
costs live in :mod:`sb3_offtrc.cost_signal`, shared with OffTRC, and are re-exported here).

Convention (the same as OffTRC's, see ``ALGORITHM.md`` §1): ``cost_limit`` is a *per-step* limit
``d``; the constraint is on the expected discounted cost return,

    J_C = E[sum_t gamma^t c_t] <= D = d / (1 - gamma).

An agent whose average step cost is ``d`` sits exactly on the limit, so for an episodic task with
``T`` steps the undiscounted episode-cost limit is roughly ``d * T``.
"""

from __future__ import annotations

import torch as th
from torch import nn

from sb3_offtrc.cost_signal import EpisodeCostTracker, costs_from_infos

__all__ = ["EpisodeCostTracker", "LagrangeMultiplier", "costs_from_infos"]


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
