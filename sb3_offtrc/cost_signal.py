"""Reading the step cost from ``info``, tracking episode costs and resolving env-id strings, shared by
every algorithm of the package.

Layer 2 (next to the algorithms): numpy only, no SB3 base classes.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np


class CostReturnLimitMixin:
    """``cost_return_limit``: the limit ``D = d / (1 - gamma)`` on the discounted cost return, for every
    algorithm whose ``cost_limit`` is the per-step limit ``d`` (``ALGORITHM.md`` §1).

    Not to be confused with the *episode* cost limit ``d * T`` on the undiscounted episode cost, which
    the monitors, evaluations and benchmarks use.
    """

    cost_limit: float
    gamma: float

    @property
    def cost_return_limit(self) -> float:
        """``D = cost_limit / (1 - gamma)``, the limit on the discounted cost return."""
        return self.cost_limit / (1.0 - self.gamma)


def resolve_env_string(env: Any) -> Any:
    """``OffTRC("MlpPolicy", "<id>")``, as SB3 users write it, for this package's constrained ids.

    A string that gymnasium does not know yet is looked up after registering this package's ids
    (so ``"HazardPoint-v0"`` works without ``import sb3_offtrc.envs``), and a Safety-Gymnasium name
    is mapped to its registration with the cost in ``info`` (``"SafetyPointGoal1-v0"`` ->
    ``"OffTRC/SafetyPointGoal1-v0"``). Ids gymnasium already knows, env objects and unknown names
    are returned unchanged (gymnasium then raises its own error).
    """
    if not isinstance(env, str):
        return env
    import gymnasium as gym

    if env in gym.registry or ":" in env:
        return env
    # imported here, not at the top: the algorithms do not otherwise depend on the env layer
    from sb3_offtrc.envs import resolve_env_id

    if env in gym.registry:  # registered by that import (HazardPoint-v0, OffTRC/...)
        return env
    try:
        return resolve_env_id(env)
    except ValueError:
        return env


def check_cost(value: Any, cost_key: str = "cost", owner: str = "This algorithm", where: str = "") -> float:
    """One step cost ``info[cost_key]`` as a float: a finite real number >= 0, or a clear error.

    A str, bool, None or list is a ``TypeError`` (``float("1.0")`` or ``float(True)`` would hide a
    bug in the env); NaN, inf and negative costs are a ``ValueError``: a NaN cost must never count
    as safe, and the constraint bounds a sum of non-negative costs. A single-element numpy array is
    read as its element. ``where`` (e.g. ``" at env step 5 from env index 0"``) goes into the message.
    """
    number = value
    if isinstance(value, np.ndarray) and value.size == 1:
        number = value.reshape(()).item()
    if isinstance(number, bool | np.bool_) or not isinstance(number, numbers.Real):
        raise TypeError(
            f"{owner}: the step cost info[{cost_key!r}] must be a real number, got {value!r} "
            f"({type(value).__name__}){where}. Make the env's step() put float(cost) there."
        )
    cost = float(number)
    if not math.isfinite(cost):
        raise ValueError(
            f"{owner}: Non-finite cost {cost}{where} in info[{cost_key!r}]; a NaN or inf cost can neither "
            "be learned from nor judged safe. Check the environment (or its cost wrapper)."
        )
    if cost < 0.0:
        raise ValueError(
            f"{owner}: negative cost {cost}{where} in info[{cost_key!r}]; step costs must be >= 0 (the "
            "constraint bounds the sum of non-negative costs). Shift or clip the env's cost."
        )
    return cost


def costs_from_infos(
    infos: Sequence[dict[str, Any]], cost_key: str, owner: str = "This algorithm", env_step: int | None = None
) -> np.ndarray:
    """Per-env step costs ``info[cost_key]`` as a float32 array, each checked by :func:`check_cost`,
    with an error that says how to fix a missing key.

    :param infos: the ``infos`` list returned by ``VecEnv.step``.
    :param cost_key: the info key that carries the step cost.
    :param owner: name used in the error message.
    :param env_step: the algorithm's step count, named in the error message.
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
        at = f" at env step {env_step}" if env_step is not None else ""
        costs[idx] = check_cost(info[cost_key], cost_key, owner, f"{at} from env index {idx}")
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
