"""Constrained environments with the step cost in ``info["cost"]``.

Importing this package registers gymnasium ids cheaply (entry points are strings: nothing heavy
is imported until an env is made), so ``gym.make(id)`` and SB3's ``make_vec_env(id)`` work with
a string. ``gym.make("sb3_offtrc.envs:<id>")`` imports this package itself, which also helps in
``SubprocVecEnv`` workers started with ``spawn``.

- ``HazardPoint-v0`` / ``HazardPointSmooth-v0``: the built-in pure-numpy task
  (:mod:`sb3_offtrc.envs.hazard_point`), 0/1 or smooth hazard cost, 100 steps per episode.
- ``OffTRC/<SafetyTask>-v0`` (native cost), ``OffTRC/<SafetyGoalTask>Smooth-v0`` (the paper's
  smooth hazard cost), ``OffTRC/HalfCheetahFlip-v4``, ``OffTRC/Walker2dHeight-v4``: see
  :mod:`sb3_offtrc.envs.safety` for why these live in a namespace.
"""

from __future__ import annotations

import importlib

import gymnasium as gym

from sb3_offtrc.envs.hazard_point import SUGGESTED_COST_LIMIT, HazardPointEnv
from sb3_offtrc.envs.safety import (
    MUJOCO_TASKS,
    NAMESPACE,
    SAFETY_TASKS,
    _parse,
    available_env_ids,
    make_safety_env,
    registered_ids,
)

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
for _env_id in registered_ids():
    _base, _cost = _parse(_env_id, None)
    _register(_env_id, "sb3_offtrc.envs.safety:make_safety_env", kwargs={"env_id": _base, "cost": _cost})


def resolve_env_id(env_id: str, cost: str | None = None) -> str:
    """The registered id to pass to ``gym.make`` / ``make_vec_env`` for a user-facing id.

    Safety-Gymnasium names (``SafetyPointGoal1-v0``) and the plain MuJoCo names map to our
    ``OffTRC/...`` ids (``cost="smooth"`` picks the smooth variant); other registered ids are
    returned unchanged.

    A ``"module:EnvId"`` id (gymnasium's own convention, also understood by ``gym.make``) imports
    ``module`` first, so an env that a user's module registers on import is found here and in
    ``SubprocVecEnv`` workers alike; the id is returned with its prefix.

    :raises ValueError: for an id that is neither ours nor registered, listing what is available,
        or for a ``module:`` prefix that cannot be imported.
    """
    module, sep, name = env_id.rpartition(":")
    if sep and module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(
                f"cannot import {module!r} for env id {env_id!r} ({exc}); "
                "put the module on PYTHONPATH or install its package"
            ) from exc
    if name in HAZARD_POINT_IDS:
        return "HazardPointSmooth-v0" if cost == "smooth" else name
    base, chosen = _parse(name, cost)
    if base in MUJOCO_TASKS:
        return f"{NAMESPACE}/{MUJOCO_TASKS[base][0]}"
    if base.startswith("Safety") and not name.startswith(f"{NAMESPACE}/"):
        stem, _, version = base.rpartition("-")
        candidate = f"{NAMESPACE}/{stem}Smooth-{version}" if chosen == "smooth" else f"{NAMESPACE}/{base}"
        if candidate in gym.registry:
            return candidate
        if base in SAFETY_TASKS or chosen == "smooth":
            raise ValueError(f"no registered id for {env_id!r} with cost={chosen!r}; use make_safety_env")
    if env_id in gym.registry or name in gym.registry:
        return env_id
    try:
        gym.spec(env_id)
    except gym.error.Error:
        listing = "\n  ".join(available_env_ids())
        raise ValueError(
            f"Unknown environment id {env_id!r}. Available constrained ids:\n  {listing}\n"
            "(any other registered gymnasium id works too, given a cost_fn)"
        ) from None
    return env_id


__all__ = [
    "HAZARD_POINT_IDS",
    "MUJOCO_TASKS",
    "SAFETY_TASKS",
    "SUGGESTED_COST_LIMIT",
    "HazardPointEnv",
    "available_env_ids",
    "make_safety_env",
    "registered_ids",
    "resolve_env_id",
]
