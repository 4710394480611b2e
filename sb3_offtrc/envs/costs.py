"""The paper's training costs (ALGORITHM.md §5) as pure functions and gymnasium wrappers.

Every wrapper writes the training cost to ``info["cost"]`` and a 0/1 violation flag to
``info["cv"]``, which :class:`~sb3_offtrc.common.monitor.CostMonitor` counts per episode:

- :class:`HazardDistanceCost` (Safety-Gymnasium tasks with hazards):
  ``c = 1 / (1 + exp(10 (h - 0.2)))``, ``h`` = planar distance from the robot to the nearest
  hazard centre; ``cv`` = Safety-Gymnasium's native 0/1 cost (kept in ``info["native_cost"]``).
- :class:`HalfCheetahFlipCost`: ``c = 1 / (1 + exp(10 (pi/4 - |root angle|)))``, ``cv = c >= 0.5``.
- :class:`Walker2dHeightCost`: ``c = 1 / (1 + exp(15 (height - 0.5)))``, ``cv = c >= 0.5``; build
  the env with ``healthy_reward=0`` and ``terminate_when_unhealthy=False`` (see
  :func:`make_walker2d_height`) to remove the alive bonus and the early termination.
"""

from __future__ import annotations

import math
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np


def _sigmoid_of_negative(z: float) -> float:
    """``1 / (1 + exp(z))`` without overflow for large ``z``."""
    if z >= 0:
        e = math.exp(-z)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(z))


def hazard_distance_cost(h: float, radius: float = 0.2, sharpness: float = 10.0) -> float:
    """Smooth hazard cost ``1 / (1 + exp(sharpness (h - radius)))`` (0.5 at the hazard's edge)."""
    return _sigmoid_of_negative(sharpness * (h - radius))


def halfcheetah_flip_cost(root_angle: float) -> float:
    """``1 / (1 + exp(10 (pi/4 - |root angle|)))``: about 1 once the body tilts past 45 degrees."""
    return _sigmoid_of_negative(10.0 * (math.pi / 4 - abs(root_angle)))


def walker2d_height_cost(height: float) -> float:
    """``1 / (1 + exp(15 (height - 0.5)))``: about 1 once the torso drops below 0.5."""
    return _sigmoid_of_negative(15.0 * (height - 0.5))


def nearest_planar_distance(point: np.ndarray, centres: np.ndarray) -> float:
    """Smallest xy distance from ``point`` to any of ``centres`` (rows; extra z columns ignored)."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, np.shape(centres)[-1])
    if centres.shape[0] == 0:
        return math.inf
    delta = centres[:, :2] - np.asarray(point, dtype=np.float64)[:2]
    return float(np.sqrt((delta**2).sum(axis=1)).min())


class HazardDistanceCost(gym.Wrapper):
    """Replace a Safety-Gymnasium env's 0/1 cost by the paper's smooth hazard-distance cost.

    Expects the gymnasium adapter (cost already in ``info["cost"]``) around a Safety-Gymnasium
    ``Builder`` whose task has hazards. The native cost moves to ``info["native_cost"]`` and
    ``info["cv"] = float(native_cost > 0)``.

    :param env: a Safety-Gymnasium task in the gymnasium API.
    :param radius: hazard radius (Safety-Gymnasium's default 0.2; ``None`` reads it from the task).
    :param sharpness: the 10 in the exponent.
    """

    def __init__(self, env: gym.Env, radius: float | None = None, sharpness: float = 10.0) -> None:
        super().__init__(env)
        task = getattr(env.unwrapped, "task", None)
        hazards = getattr(task, "hazards", None)
        if task is None or hazards is None or getattr(hazards, "num", 0) == 0:
            raise ValueError(
                f"HazardDistanceCost needs a Safety-Gymnasium task with hazards; {env} has none "
                "(use cost='native' for this task)"
            )
        self._task = task
        self.radius = float(hazards.size) if radius is None else float(radius)
        self.sharpness = float(sharpness)

    def hazard_distance(self) -> float:
        return nearest_planar_distance(self._task.agent.pos, np.asarray(self._task.hazards.pos))

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        native = float(info.get("cost", 0.0))
        info["native_cost"] = native
        info["cv"] = float(native > 0.0)
        info["cost"] = hazard_distance_cost(self.hazard_distance(), self.radius, self.sharpness)
        return obs, reward, terminated, truncated, info


class NativeCost(gym.Wrapper):
    """Keep Safety-Gymnasium's own cost in ``info["cost"]`` and flag ``info["cv"] = cost > 0``."""

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        cost = float(info.get("cost", 0.0))
        info["cost"] = cost
        info["cv"] = float(cost > 0.0)
        return obs, reward, terminated, truncated, info


class HalfCheetahFlipCost(gym.Wrapper):
    """HalfCheetah with the flip cost of the paper; the root angle is ``qpos[2]`` (rooty)."""

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        angle = float(self.env.unwrapped.data.qpos[2])  # type: ignore[attr-defined]
        cost = halfcheetah_flip_cost(angle)
        info["root_angle"] = angle
        info["cost"] = cost
        info["cv"] = float(cost >= 0.5)
        return obs, reward, terminated, truncated, info


class Walker2dHeightCost(gym.Wrapper):
    """Walker2d with the paper's height cost; the torso height is ``qpos[1]`` (rootz)."""

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        height = float(self.env.unwrapped.data.qpos[1])  # type: ignore[attr-defined]
        cost = walker2d_height_cost(height)
        info["height"] = height
        info["cost"] = cost
        info["cv"] = float(cost >= 0.5)
        return obs, reward, terminated, truncated, info


def make_halfcheetah_flip(render_mode: str | None = None, **kwargs: Any) -> gym.Env:
    """``HalfCheetah-v4`` (1000 steps) with :class:`HalfCheetahFlipCost`."""
    return HalfCheetahFlipCost(gym.make("HalfCheetah-v4", render_mode=render_mode, **kwargs))


def make_walker2d_height(render_mode: str | None = None, **kwargs: Any) -> gym.Env:
    """``Walker2d-v4`` (1000 steps) without alive bonus or early termination, with the height cost."""
    kwargs.setdefault("healthy_reward", 0.0)
    kwargs.setdefault("terminate_when_unhealthy", False)
    return Walker2dHeightCost(gym.make("Walker2d-v4", render_mode=render_mode, **kwargs))
