"""HazardPoint-v0: registration, dynamics, costs and the straight-vs-detour reference numbers."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_util import make_vec_env

import sb3_offtrc.envs  # noqa: F401  (registers the ids)
from sb3_offtrc.envs.hazard_point import SUGGESTED_COST_LIMIT, HazardPointEnv, detour_policy, straight_policy


def rollout(env: gym.Env, policy, seed: int = 0) -> tuple[float, float, float, int, bool]:
    obs, _ = env.reset(seed=seed)
    ret = cost = cv = 0.0
    steps = 0
    while True:
        obs, r, terminated, truncated, info = env.step(policy(obs))
        ret += r
        cost += info["cost"]
        cv += info["cv"]
        steps += 1
        if terminated or truncated:
            return ret, cost, cv, steps, truncated


def test_gym_make_and_checker() -> None:
    env = gym.make("HazardPoint-v0")
    assert env.spec is not None and env.spec.max_episode_steps == 100
    check_env(env.unwrapped)
    obs, info = env.reset(seed=1)
    assert obs.shape == (6,) and obs.dtype == np.float32
    _, _, _, _, info = env.step(env.action_space.sample())
    assert set(info) >= {"cost", "cv"}


def test_observation_layout() -> None:
    env = HazardPointEnv(start_noise=0.0)
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs, [-1.5, 0.0, 3.0, 0.0, 1.5, 0.0])


def test_straight_vs_detour_reference_numbers() -> None:
    straight = rollout(gym.make("HazardPoint-v0", start_noise=0.0), straight_policy)
    detour = rollout(gym.make("HazardPoint-v0", start_noise=0.0), detour_policy)
    # straight: progress 2.9 / 0.1 = 29 (+ the last 0.1 step ends at the goal centre: 30 steps,
    # the bonus paid from step 29 on: 72 steps) -> 30 + 72 = 102; hazard interior |x| < 0.5 is
    # crossed in 10 steps (x = -0.4 ... 0.4 at step 11 ... 19) -> cost 10
    assert straight[0] == pytest.approx(102.0, abs=1e-6)
    assert straight[1] == 10.0 and straight[2] == 10.0
    assert straight[3] == 100 and straight[4] is True  # truncated, not terminated
    assert detour[1] == 0.0 and detour[2] == 0.0
    assert 90.0 < detour[0] < straight[0]
    limit = SUGGESTED_COST_LIMIT * 100
    assert straight[1] > limit >= detour[1]


def test_binary_and_smooth_cost_values() -> None:
    binary = HazardPointEnv(cost_type="binary")
    smooth = HazardPointEnv(cost_type="smooth")
    assert binary.cost_at(0.49) == 1.0 and binary.cost_at(0.5) == 0.0
    # 1 / (1 + exp(10 (h - 0.5))): h = 0.5 -> 0.5, h = 0.7 -> 1/(1+e^2), h = 0.3 -> 1/(1+e^-2)
    assert smooth.cost_at(0.5) == pytest.approx(0.5)
    assert smooth.cost_at(0.7) == pytest.approx(1 / (1 + math.e**2))
    assert smooth.cost_at(0.3) == pytest.approx(1 / (1 + math.e**-2))
    assert smooth.cost_at(100.0) == pytest.approx(0.0, abs=1e-20)


def test_smooth_variant_counts_violations_separately() -> None:
    env = gym.make("HazardPointSmooth-v0", start_noise=0.0)
    _, cost, cv, _, _ = rollout(env, straight_policy)
    assert cv == 10.0
    assert 10.0 < cost < 20.0  # positive everywhere, near 1 inside


def test_action_norm_is_clipped() -> None:
    env = HazardPointEnv(start_noise=0.0)
    env.reset(seed=0)
    env.step(np.array([1.0, 1.0], dtype=np.float32))
    moved = env.pos - env.start
    assert np.linalg.norm(moved) == pytest.approx(0.1)


def test_seeded_reset_is_reproducible() -> None:
    a, _ = gym.make("HazardPoint-v0").reset(seed=3)
    b, _ = gym.make("HazardPoint-v0").reset(seed=3)
    np.testing.assert_array_equal(a, b)


def test_make_vec_env_with_string_id_sets_timelimit_truncated() -> None:
    venv = make_vec_env("HazardPoint-v0", n_envs=2, seed=0)
    venv.reset()
    infos = []
    for _ in range(100):
        _, _, dones, infos = venv.step(np.zeros((2, 2), dtype=np.float32))
    assert dones.all()
    assert all(info["TimeLimit.truncated"] for info in infos)
    assert all("terminal_observation" in info for info in infos)


def test_fast_enough() -> None:
    import time

    env = gym.make("HazardPoint-v0").unwrapped
    env.reset(seed=0)
    action = np.zeros(2, dtype=np.float32)
    start = time.perf_counter()
    for _ in range(2000):
        env.step(action)
    assert 2000 / (time.perf_counter() - start) > 2000


def test_render_rgb_array() -> None:
    env = gym.make("HazardPoint-v0", render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8


def test_module_prefixed_id_imports_the_package() -> None:
    # "module:Id" makes gymnasium import sb3_offtrc.envs itself (useful in spawned workers)
    env = gym.make("sb3_offtrc.envs:HazardPoint-v0")
    assert env.spec is not None and env.spec.id == "HazardPoint-v0"
