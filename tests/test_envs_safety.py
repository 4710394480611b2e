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


def test_paper_goal_observation_matches_the_raw_sensors() -> None:
    """The 24-dim paper observation, rebuilt here from Safety-Gymnasium's own observation dict."""
    from sb3_offtrc.envs.observations import PAPER_GOAL_DIM

    env = make_safety_env("SafetyPointGoal1-v0", cost="smooth", observation="paper")
    assert env.observation_space.shape == (PAPER_GOAL_DIM,)
    obs, _ = env.reset(seed=3)
    env.action_space.seed(3)
    task = env.unwrapped.task
    for _ in range(40):
        obs, _, _, _, info = env.step(env.action_space.sample())
    raw = task.obs()  # Safety-Gymnasium's flattened vector, in its Dict space's order
    parts = dict(
        zip(
            task.obs_info.obs_space_dict.keys(),
            np.split(raw, np.cumsum([space.shape[0] for space in task.obs_info.obs_space_dict.values()])[:-1]),
            strict=True,
        )
    )
    goal = np.asarray(task.goal.pos[:2]) - np.asarray(task.agent.pos[:2])
    ego = goal @ np.asarray(task.agent.mat)[:2, :2]
    compass = ego / (np.linalg.norm(ego) + 0.001)
    expected = np.concatenate([
        compass / 0.7,
        [(np.linalg.norm(goal) - 1.5) / 0.6],
        parts["accelerometer"][:2] / 8.0,
        parts["velocimeter"][:2] / 0.2,
        parts["gyro"][2:] / 2.0,
        (parts["hazards_lidar"] - 0.3) / 0.3,
    ])  # fmt: skip
    np.testing.assert_allclose(obs, expected, atol=1e-6)
    assert "cv" in info  # the native cost is still counted


def test_paper_observation_is_refused_where_it_is_not_defined() -> None:
    with pytest.raises(ValueError, match="Goal tasks only"):
        make_safety_env("SafetyPointButton1-v0", observation="paper")
    with pytest.raises(ValueError, match="observation must be one of"):
        make_safety_env("SafetyPointGoal1-v0", observation="scaled")
    with pytest.raises(ValueError, match="Safety-Gymnasium Goal tasks only"):
        make_safety_env("HazardPoint-v0", observation="paper")


def test_lidar_max_observation_appends_each_lidars_largest_bin() -> None:
    env = make_safety_env("SafetyPointGoal1-v0", observation="lidar_max")
    native = make_safety_env("SafetyPointGoal1-v0")
    assert env.observation_space.shape == (native.observation_space.shape[0] + 3,)  # goal, hazard, vase lidars
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    task = env.unwrapped.task
    keys = list(task.obs_info.obs_space_dict)
    sizes = [space.shape[0] for space in task.obs_info.obs_space_dict.values()]
    inside = []
    for _ in range(8000):
        if len(inside) >= 20:
            break
        obs, _, terminated, truncated, info = env.step(env.action_space.sample())
        parts = dict(zip(keys, np.split(obs[:-3], np.cumsum(sizes)[:-1]), strict=True))
        np.testing.assert_allclose(
            obs[-3:], [parts["goal_lidar"].max(), parts["hazards_lidar"].max(), parts["vases_lidar"].max()]
        )
        if info["cost"] > 0:
            inside.append(obs[-2])
        if terminated or truncated:
            obs, _ = env.reset()
    # in a hazard (radius 0.2, lidar range 3) the largest hazard bin is above 1 - 0.2 / 3
    assert inside and min(inside) > 1.0 - 0.2 / 3.0 - 1e-3


def test_lidar_max_observation_needs_a_lidar_task() -> None:
    with pytest.raises(ValueError, match="Safety-Gymnasium"):
        make_safety_env("HazardPoint-v0", observation="lidar_max")
