"""Safety-Gymnasium and MuJoCo tasks with the step cost in ``info["cost"]``.

Safety-Gymnasium is imported only through :mod:`sb3_offtrc.compat.safety_gymnasium` (it does
not import cleanly on Python 3.11 otherwise) and only when an env is built.

Ids. Safety-Gymnasium registers its own names (``SafetyPointGoal1-v0``, a six-tuple ``step``)
in gymnasium's registry when it is imported, so registering ours under the same names would be
silently overridden. Ours therefore live in the ``OffTRC`` namespace:

- ``OffTRC/<Task>-v0``: Safety-Gymnasium's native cost (0/1 in these tasks) in ``info["cost"]``.
- ``OffTRC/<Task>Smooth-v0`` (Goal tasks): the paper's smooth hazard-distance cost in
  ``info["cost"]``, the native 0/1 cost counted as ``info["cv"]``.
- ``OffTRC/HalfCheetahFlip-v4``, ``OffTRC/Walker2dHeight-v4``: the paper's MuJoCo costs.

:func:`make_safety_env` accepts those ids and Safety-Gymnasium's own names (with or without the
``Gymnasium`` suffix), the cost chosen by ``cost=``.
"""

from __future__ import annotations

import re
from typing import Any

import gymnasium as gym

from sb3_offtrc.envs.costs import HazardDistanceCost, NativeCost, make_halfcheetah_flip, make_walker2d_height

NAMESPACE = "OffTRC"

#: Safety-Gymnasium tasks that build and step with our install (checked by tests/test_envs_safety.py).
SAFETY_TASKS = (
    "SafetyPointGoal1-v0",
    "SafetyPointGoal2-v0",
    "SafetyCarGoal1-v0",
    "SafetyCarGoal2-v0",
    "SafetyPointButton1-v0",
    "SafetyPointPush1-v0",
    "SafetyDoggoGoal1-v0",
)

#: MuJoCo tasks with the paper's costs: base id -> builder.
MUJOCO_TASKS = {
    "HalfCheetah-v4": ("HalfCheetahFlip-v4", make_halfcheetah_flip),
    "Walker2d-v4": ("Walker2dHeight-v4", make_walker2d_height),
}

COST_CHOICES = ("native", "smooth")
OBSERVATION_CHOICES = ("native", "paper", "lidar_max")


def registered_ids() -> list[str]:
    """Every id this package registers for third-party tasks."""
    ids = []
    for task in SAFETY_TASKS:
        name, version = task.rsplit("-", 1)
        ids.append(f"{NAMESPACE}/{task}")
        if "Goal" in name:
            ids.append(f"{NAMESPACE}/{name}Smooth-{version}")
    ids += [f"{NAMESPACE}/{new_id}" for new_id, _ in MUJOCO_TASKS.values()]
    return ids


def available_env_ids() -> list[str]:
    """Ids accepted by :func:`make_safety_env` (and by the CLI's ``--env``)."""
    from sb3_offtrc.envs import HAZARD_POINT_IDS

    return [*HAZARD_POINT_IDS, *registered_ids(), *SAFETY_TASKS, *MUJOCO_TASKS]


def _parse(env_id: str, cost: str | None) -> tuple[str, str]:
    """Map any accepted spelling to (Safety-Gymnasium or MuJoCo base id, cost)."""
    name = env_id.split(":", 1)[-1]  # "module:Id" form
    if name.startswith(f"{NAMESPACE}/"):
        name = name[len(NAMESPACE) + 1 :]
        for base, (new_id, _) in MUJOCO_TASKS.items():
            if name == new_id:
                return base, "smooth"
        match = re.fullmatch(r"(.+?)Smooth-(v\d+)", name)
        if match:
            return f"{match.group(1)}-{match.group(2)}", "smooth"
        return name, cost or "native"
    match = re.fullmatch(r"(Safety.+?)Gymnasium-(v\d+)", name)
    if match:
        name = f"{match.group(1)}-{match.group(2)}"
    if name in MUJOCO_TASKS:
        return name, cost or "smooth"
    return name, cost or "native"


def _unknown(env_id: str, extra: str = "") -> ValueError:
    listing = "\n  ".join(available_env_ids())
    return ValueError(f"Unknown environment id {env_id!r}{extra}. Available ids:\n  {listing}")


def make_safety_env(
    env_id: str,
    cost: str | None = None,
    render_mode: str | None = None,
    observation: str = "native",
    **kwargs: Any,
) -> gym.Env:
    """Build a constrained task as a gymnasium env with the step cost in ``info["cost"]``.

    :param env_id: an ``OffTRC/...`` id, a Safety-Gymnasium name such as ``"SafetyPointGoal1-v0"``
        (or ``"SafetyPointGoal1Gymnasium-v0"``), ``"HalfCheetah-v4"``, ``"Walker2d-v4"`` or
        ``"HazardPoint-v0"``.
    :param cost: ``"native"`` (Safety-Gymnasium's own cost; the default for its tasks) or
        ``"smooth"`` (the paper's cost: hazard distance for tasks with hazards; flip/height for
        HalfCheetah/Walker2d, where it is the only choice). Ignored where the id fixes it
        (``...Smooth-v0``).
    :param render_mode: ``"rgb_array"`` for frames (headless: set ``MUJOCO_GL=egl``), or ``None``.
    :param observation: ``"native"`` (the task's own observation), ``"paper"`` (the authors'
        scaled 24-dimensional Goal observation, :mod:`sb3_offtrc.envs.observations`; Goal tasks only)
        or ``"lidar_max"`` (the task's own observation with each lidar's largest bin appended).
    :param kwargs: passed to the underlying env constructor.
    :return: the env; ``info["cost"]`` and ``info["cv"]`` are set on every step.
    :raises ValueError: for an unknown id or an unsupported cost, listing what is available.
    """
    if cost is not None and cost not in COST_CHOICES:
        raise ValueError(f"cost must be one of {COST_CHOICES}, got {cost!r}")
    if observation not in OBSERVATION_CHOICES:
        raise ValueError(f"observation must be one of {OBSERVATION_CHOICES}, got {observation!r}")
    base, chosen = _parse(env_id, cost)
    if observation != "native" and not base.startswith("Safety"):
        raise ValueError(
            f"observation={observation!r} is defined for the Safety-Gymnasium Goal tasks only, not {env_id!r}"
        )
    if base in ("HazardPoint-v0", "HazardPointSmooth-v0"):
        import sb3_offtrc.envs  # noqa: F401  (registers the ids)

        if chosen == "smooth" or base == "HazardPointSmooth-v0":
            kwargs["cost_type"] = "smooth"
        return gym.make("HazardPoint-v0", render_mode=render_mode, **kwargs)
    if base in MUJOCO_TASKS:
        if chosen != "smooth":
            raise ValueError(f"{base} has no native cost; use cost='smooth' (the paper's cost)")
        return MUJOCO_TASKS[base][1](render_mode=render_mode, **kwargs)
    if not base.startswith("Safety"):
        raise _unknown(env_id)
    from sb3_offtrc.compat.safety_gymnasium import import_safety_gymnasium

    import_safety_gymnasium()
    name, _, version = base.rpartition("-")
    adapter_id = f"{name}Gymnasium-{version}"
    if adapter_id not in gym.registry:
        raise _unknown(env_id, " (not a Safety-Gymnasium task either)")
    env = gym.make(adapter_id, render_mode=render_mode, **kwargs)
    if observation == "paper":
        if "Goal" not in name:
            raise ValueError(f"observation='paper' is defined for the Goal tasks only, not {env_id!r}")
        from sb3_offtrc.envs.observations import PaperGoalObservation

        env = PaperGoalObservation(env)
    elif observation == "lidar_max":
        from sb3_offtrc.envs.observations import LidarMaxObservation

        env = LidarMaxObservation(env)
    if chosen == "smooth":
        return HazardDistanceCost(env)
    return NativeCost(env)
