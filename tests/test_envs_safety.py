"""Safety-Gymnasium tasks through our ids: they build, step and carry info["cost"] / info["cv"]."""

from __future__ import annotations

import numpy as np
import pytest

from sb3_offtrc.compat.safety_gymnasium import safety_gymnasium_available

pytestmark = [
    pytest.mark.safety,
    pytest.mark.skipif(not safety_gymnasium_available(), reason="safety_gymnasium / mujoco not installed"),
]

import gymnasium as gym  # noqa: E402

from sb3_offtrc.envs import SAFETY_TASKS, make_safety_env  # noqa: E402
from sb3_offtrc.envs.costs import hazard_distance_cost  # noqa: E402


def _run(env: gym.Env, steps: int = 30) -> list[dict]:
    env.reset(seed=0)
    env.action_space.seed(0)
    infos = []
    for _ in range(steps):
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        infos.append(info)
        assert not terminated
    return infos


def _hazard_distance(env: gym.Env) -> float:
    """Independent reference: read the agent and hazard bodies straight from MuJoCo's data."""
    base = env.unwrapped
    data = base.task.data
    agent = data.body("agent").xpos[:2]
    hazards = [data.body(f"hazard{i}").xpos[:2] for i in range(base.task.hazards.num)]
    return min(float(np.hypot(*(agent - h))) for h in hazards)


def test_point_goal1_native_and_registered() -> None:
    env = gym.make("OffTRC/SafetyPointGoal1-v0")
    infos = _run(env)
    for info in infos:
        assert info["cost"] in (0.0, 1.0)
        assert info["cv"] == info["cost"]


def test_point_goal1_smooth_cost_matches_mujoco_state() -> None:
    env = make_safety_env("SafetyPointGoal1-v0", cost="smooth")
    env.reset(seed=0)
    for _ in range(20):
        _, _, _, _, info = env.step(env.action_space.sample())
        h = _hazard_distance(env)
        assert info["cost"] == pytest.approx(1 / (1 + np.exp(10 * (h - 0.2))))
        assert info["cost"] == pytest.approx(hazard_distance_cost(h))
        assert info["cv"] == float(info["native_cost"] > 0)
        # the native 0/1 hazard cost is 1 exactly when inside a hazard (h <= 0.2)
        assert (info["native_cost"] > 0) == (h <= 0.2)


def test_make_vec_env_with_string_id() -> None:
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env("OffTRC/SafetyPointGoal1Smooth-v0", n_envs=1, seed=0)
    venv.reset()
    _, _, _, infos = venv.step(np.zeros((1, 2), dtype=np.float32))
    assert 0.0 <= infos[0]["cost"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("task", [t for t in SAFETY_TASKS if t != "SafetyPointGoal1-v0"])
def test_every_supported_task_builds_and_steps(task: str) -> None:
    infos = _run(make_safety_env(task), steps=10)
    assert all("cost" in info and "cv" in info for info in infos)
