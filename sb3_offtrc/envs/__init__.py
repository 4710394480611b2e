"""Constrained environments with the step cost in ``info["cost"]``.

Importing this package registers gymnasium ids (cheaply: entry points are strings, nothing
heavy is imported until an env is made):

- ``HazardPoint-v0`` / ``HazardPointSmooth-v0``: the built-in pure-numpy task
  (:mod:`sb3_offtrc.envs.hazard_point`), 0/1 or smooth hazard cost, 100 steps per episode.
"""

from __future__ import annotations

import gymnasium as gym

from sb3_offtrc.envs.hazard_point import SUGGESTED_COST_LIMIT, HazardPointEnv

HAZARD_POINT_IDS = ("HazardPoint-v0", "HazardPointSmooth-v0")


def _register(env_id: str, entry_point: str, **kwargs: object) -> None:
    # re-importing (e.g. after importlib.reload) must not warn about overriding an id
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=entry_point, **kwargs)  # type: ignore[arg-type]


_register(
    "HazardPoint-v0",
    "sb3_offtrc.envs.hazard_point:HazardPointEnv",
    max_episode_steps=100,
    kwargs={"cost_type": "binary"},
)
_register(
    "HazardPointSmooth-v0",
    "sb3_offtrc.envs.hazard_point:HazardPointEnv",
    max_episode_steps=100,
    kwargs={"cost_type": "smooth"},
)

__all__ = ["HAZARD_POINT_IDS", "SUGGESTED_COST_LIMIT", "HazardPointEnv"]
