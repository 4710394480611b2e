"""The paper's cost formulas against hand-computed values, and the MuJoCo cost envs."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

import sb3_offtrc.envs  # noqa: F401
from sb3_offtrc.envs import make_safety_env, resolve_env_id
from sb3_offtrc.envs.costs import (
    halfcheetah_flip_cost,
    hazard_distance_cost,
    nearest_planar_distance,
    walker2d_height_cost,
)


def test_hazard_distance_cost_values() -> None:
    # 1 / (1 + exp(10 (h - 0.2)))
    assert hazard_distance_cost(0.2) == pytest.approx(0.5)
    assert hazard_distance_cost(0.0) == pytest.approx(1 / (1 + math.exp(-2.0)))  # 0.8808
    assert hazard_distance_cost(0.4) == pytest.approx(1 / (1 + math.exp(2.0)))  # 0.1192
    assert hazard_distance_cost(1.2) == pytest.approx(4.54e-5, rel=1e-2)
    assert hazard_distance_cost(1e6) == 0.0  # no overflow


def test_halfcheetah_flip_cost_values() -> None:
    # 1 / (1 + exp(10 (pi/4 - |angle|)))
    assert halfcheetah_flip_cost(math.pi / 4) == pytest.approx(0.5)
    assert halfcheetah_flip_cost(-math.pi / 4) == pytest.approx(0.5)
    assert halfcheetah_flip_cost(0.0) == pytest.approx(1 / (1 + math.exp(10 * math.pi / 4)))  # 3.9e-4
    assert halfcheetah_flip_cost(math.pi / 2) == pytest.approx(1 / (1 + math.exp(-10 * math.pi / 4)))
    assert halfcheetah_flip_cost(-1e6) == 1.0


def test_walker2d_height_cost_values() -> None:
    # 1 / (1 + exp(15 (height - 0.5)))
    assert walker2d_height_cost(0.5) == pytest.approx(0.5)
    assert walker2d_height_cost(1.25) == pytest.approx(1 / (1 + math.exp(11.25)))  # standing: 1.3e-5
    assert walker2d_height_cost(0.3) == pytest.approx(1 / (1 + math.exp(-3.0)))  # 0.9526


def test_nearest_planar_distance_ignores_z() -> None:
    centres = np.array([[3.0, 4.0, 9.0], [1.0, 0.0, -5.0]])
    assert nearest_planar_distance(np.array([0.0, 0.0, 100.0]), centres) == pytest.approx(1.0)
    assert nearest_planar_distance(np.zeros(2), np.zeros((0, 3))) == math.inf


def _step_zero(env: gym.Env) -> dict:
    _, _, terminated, _, info = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
    info["terminated"] = terminated
    return info


def test_halfcheetah_flip_env() -> None:
    pytest.importorskip("mujoco")
    env = gym.make("OffTRC/HalfCheetahFlip-v4")
    env.reset(seed=0)
    info = _step_zero(env)
    assert info["cost"] < 0.01 and info["cv"] == 0.0  # upright
    base = env.unwrapped
    qpos, qvel = base.data.qpos.copy(), np.zeros_like(base.data.qvel)
    qpos[2] = math.pi / 2  # rooty: lying on its back
    base.set_state(qpos, qvel)
    info = _step_zero(env)
    assert abs(info["root_angle"] - math.pi / 2) < 0.1
    assert info["cost"] == pytest.approx(halfcheetah_flip_cost(info["root_angle"]))
    assert info["cost"] > 0.99 and info["cv"] == 1.0


def test_walker2d_height_env_no_alive_bonus_no_termination() -> None:
    pytest.importorskip("mujoco")
    env = gym.make(resolve_env_id("Walker2d-v4"))
    assert env.spec is not None and env.spec.id == "OffTRC/Walker2dHeight-v4"
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros(6, dtype=np.float32))
    # reward = forward velocity - 0.001 |a|^2 with no +1 alive bonus (zero action: no ctrl cost)
    assert reward == pytest.approx(info["x_velocity"])
    assert info["cost"] < 0.01
    base = env.unwrapped
    qpos = base.data.qpos.copy()
    qpos[1] = 0.3  # torso low: unhealthy for the stock env
    base.set_state(qpos, np.zeros_like(base.data.qvel))
    info = _step_zero(env)
    assert info["terminated"] is False
    assert info["height"] == pytest.approx(float(base.data.qpos[1]))
    assert info["cost"] == pytest.approx(walker2d_height_cost(info["height"]))
    assert info["cost"] > 0.5 and info["cv"] == 1.0


def test_mujoco_tasks_have_no_native_cost() -> None:
    with pytest.raises(ValueError, match="smooth"):
        make_safety_env("HalfCheetah-v4", cost="native")


def test_unknown_ids_list_the_available_ones() -> None:
    with pytest.raises(ValueError, match="HazardPoint-v0") as excinfo:
        resolve_env_id("NoSuchTask-v3")
    assert "OffTRC/SafetyPointGoal1Smooth-v0" in str(excinfo.value)
    with pytest.raises(ValueError, match="Available ids"):
        make_safety_env("NoSuchTask-v3")
    with pytest.raises(ValueError, match="cost must be"):
        make_safety_env("HazardPoint-v0", cost="nope")


def test_resolve_env_id() -> None:
    assert resolve_env_id("SafetyPointGoal1-v0") == "OffTRC/SafetyPointGoal1-v0"
    assert resolve_env_id("SafetyPointGoal1-v0", "smooth") == "OffTRC/SafetyPointGoal1Smooth-v0"
    assert resolve_env_id("SafetyCarGoal2Gymnasium-v0") == "OffTRC/SafetyCarGoal2-v0"
    assert resolve_env_id("HazardPoint-v0", "smooth") == "HazardPointSmooth-v0"
    assert resolve_env_id("Pendulum-v1") == "Pendulum-v1"
    assert resolve_env_id("OffTRC/SafetyPointPush1-v0") == "OffTRC/SafetyPointPush1-v0"


def test_make_safety_env_hazard_point() -> None:
    env = make_safety_env("HazardPoint-v0", cost="smooth")
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.zeros(2, dtype=np.float32))
    # start ~1.5 from the hazard centre: 1 / (1 + exp(10 (1.5 - 0.5))) ~ 4.5e-5
    assert 0 < info["cost"] < 1e-4
