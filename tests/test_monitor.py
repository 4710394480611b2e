"""CostMonitor and CostLoggerCallback against manual rollouts and real SB3 training loops."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor

import sb3_offtrc.envs  # noqa: F401
from sb3_offtrc import CostLoggerCallback, CostMonitor
from sb3_offtrc.common.monitor import load_cost_results


def scripted_actions(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 2)).astype(np.float32) * 0.3 + [1.0, 0.0]


def manual_episode_totals(actions: np.ndarray, seed: int = 0) -> tuple[float, float, int]:
    """Reference: the same rollout on the bare env, summing info by hand."""
    env = gym.make("HazardPoint-v0", cost_type="smooth")
    env.reset(seed=seed)
    ret = cost = 0.0
    cv = 0
    for a in actions:
        _, r, _, _, info = env.step(a)
        ret += float(r)
        cost += info["cost"]
        cv += int(info["cv"] > 0)
    return ret, cost, cv


@pytest.mark.parametrize("with_monitor", [False, True])
def test_episode_sums_match_manual_rollout(with_monitor: bool) -> None:
    actions = scripted_actions(100)
    ref_return, ref_cost, ref_cv = manual_episode_totals(actions)
    assert ref_cv > 0 and ref_cost > ref_cv  # smooth cost is also positive outside the hazard
    env = gym.make("HazardPoint-v0", cost_type="smooth")
    if with_monitor:
        env = Monitor(env)
    env = CostMonitor(env)
    env.reset(seed=0)
    for t, a in enumerate(actions):
        _, _, terminated, truncated, info = env.step(a)
        assert (terminated or truncated) == (t == 99)
    episode = info["episode"]
    assert episode["c"] == pytest.approx(ref_cost)
    assert episode["cv"] == ref_cv
    assert episode["r"] == pytest.approx(ref_return, abs=1e-5)
    assert episode["l"] == 100 and "t" in episode
    assert env.get_episode_costs() == [pytest.approx(ref_cost)]
    assert env.get_episode_cvs() == [ref_cv]
    assert env.get_total_steps() == 100


def test_counters_reset_between_episodes() -> None:
    env = CostMonitor(gym.make("HazardPoint-v0"))
    for seed in (0, 1):
        env.reset(seed=seed)
        for _ in range(100):
            _, _, _, truncated, info = env.step(np.zeros(2, dtype=np.float32))
    # staying at the start never enters the hazard: both episodes cost 0
    assert env.get_episode_costs() == [0.0, 0.0]
    assert info["episode"]["l"] == 100


def test_missing_cost_raises_naming_the_fix() -> None:
    env = CostMonitor(gym.make("Pendulum-v1"))
    env.reset(seed=0)
    with pytest.raises(KeyError, match="cost_fn"):
        env.step(env.action_space.sample())


def test_cost_fn_and_violation_threshold() -> None:
    # Pendulum has no cost: define one from the observation (cos theta < 0: pole below horizontal)
    def cost_fn(obs, action, info):
        return float(obs[0] < 0.0) * 2.0

    env = CostMonitor(gym.make("Pendulum-v1"), cost_fn=cost_fn, violation_threshold=1.0)
    obs, _ = env.reset(seed=0)
    expected_cost = 0.0
    expected_cv = 0
    for _ in range(200):
        obs, _, _, truncated, info = env.step(np.zeros(1, dtype=np.float32))
        assert info["cost"] == cost_fn(obs, None, info)  # written back for algorithms reading info
        expected_cost += cost_fn(obs, None, info)
        expected_cv += int(cost_fn(obs, None, info) > 1.0)
    assert truncated
    assert info["episode"]["c"] == expected_cost
    assert info["episode"]["cv"] == expected_cv
    assert expected_cost > 0


def test_violation_defaults_and_overrides() -> None:
    env = CostMonitor(gym.make("HazardPoint-v0", cost_type="smooth"))
    info = {"cost": 0.3}
    assert env._violated(0.3, info)  # no flag in info -> cost > 0
    assert not env._violated(0.3, {"cost": 0.3, "cv": 0.0})  # the env's own flag wins
    assert env._violated(0.0, {"violation": True})
    keyed = CostMonitor(gym.make("HazardPoint-v0"), violation_key="hit")
    assert not keyed._violated(1.0, {"cost": 1.0, "cv": 1.0})
    assert keyed._violated(0.0, {"hit": 1})
    custom = CostMonitor(gym.make("HazardPoint-v0"), violation_fn=lambda c, info: c >= 0.5)
    assert custom._violated(0.5, {"cv": 0.0}) and not custom._violated(0.4, {"cv": 1.0})


def test_csv_written_and_loaded(tmp_path) -> None:
    for rank in range(2):
        env = CostMonitor(
            Monitor(gym.make("HazardPoint-v0"), filename=str(tmp_path / str(rank))), filename=str(tmp_path / str(rank))
        )
        env.reset(seed=rank)
        for _ in range(200):
            _, _, _, truncated, _ = env.step(np.array([1.0, 0.0], dtype=np.float32))
            if truncated:
                env.reset()
        env.close()
    assert sorted(os.listdir(tmp_path)) == ["0.costs.csv", "0.monitor.csv", "1.costs.csv", "1.monitor.csv"]
    data = load_cost_results(str(tmp_path))
    assert list(data.columns) == ["r", "l", "t", "c", "cv", "timesteps"]
    assert len(data) == 4
    # driving along y ~ 0 crosses the 1.0-wide hazard in 9-10 steps of 0.1 (start noise shifts it)
    assert data["c"].between(9, 10).all() and (data["c"] == data["cv"]).all()
    assert data["timesteps"].tolist() == [100, 200, 300, 400]
    # SB3's own reader ignores our files (different suffix)
    from stable_baselines3.common.monitor import load_results

    assert len(load_results(str(tmp_path))) == 4
    with pytest.raises(FileNotFoundError):
        load_cost_results(str(tmp_path / "nothing"))


def _progress(folder) -> pd.DataFrame:
    return pd.read_csv(os.path.join(folder, "progress.csv"))


def test_sac_logs_rollout_cost(tmp_path) -> None:
    venv = make_vec_env("HazardPoint-v0", n_envs=1, seed=0, wrapper_class=CostMonitor)
    model = SAC("MlpPolicy", venv, learning_starts=200, batch_size=32, seed=0, policy_kwargs={"net_arch": [16]})
    model.set_logger(configure(str(tmp_path), ["csv"]))
    callback = CostLoggerCallback()
    model.learn(300, callback=callback, log_interval=1)
    progress = _progress(tmp_path)
    assert "rollout/ep_cost_mean" in progress and "rollout/ep_cv_mean" in progress
    episode_costs = [ep["c"] for ep in model.ep_info_buffer]
    assert len(episode_costs) == 3
    assert progress["rollout/ep_cost_mean"].iloc[-1] == pytest.approx(np.mean(episode_costs))
    assert progress["rollout/ep_cv_mean"].iloc[-1] == pytest.approx(np.mean([ep["cv"] for ep in model.ep_info_buffer]))


def test_ppo_logs_rollout_cost(tmp_path) -> None:
    venv = make_vec_env("HazardPoint-v0", n_envs=2, seed=0, wrapper_class=CostMonitor)
    model = PPO("MlpPolicy", venv, n_steps=100, batch_size=50, n_epochs=1, seed=0, policy_kwargs={"net_arch": [16]})
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(400, callback=CostLoggerCallback())
    progress = _progress(tmp_path)
    assert progress["rollout/ep_cost_mean"].notna().all()
    assert progress["rollout/ep_cost_mean"].iloc[-1] == pytest.approx(np.mean([ep["c"] for ep in model.ep_info_buffer]))


def test_monitor_outside_cost_monitor_keeps_costs_as_columns(tmp_path) -> None:
    from sb3_offtrc.common.monitor import EPISODE_INFO_KEYWORDS

    env = Monitor(
        CostMonitor(gym.make("HazardPoint-v0")), filename=str(tmp_path / "m"), info_keywords=EPISODE_INFO_KEYWORDS
    )
    env.reset(seed=0)
    for _ in range(100):
        _, _, _, truncated, info = env.step(np.array([1.0, 0.0], dtype=np.float32))
    assert truncated
    assert "c" not in info["episode"]  # Monitor rebuilt it ...
    assert info["episode"]["episode_cost"] == info["episode_cost"] > 0  # ... but kept the flat keys
    env.close()
    from stable_baselines3.common.monitor import load_results

    data = load_results(str(tmp_path))
    assert data["episode_cost"].tolist() == [info["episode_cost"]]
    assert data["episode_cv"].tolist() == [info["episode_cv"]]


def test_cost_logger_reads_flat_keys() -> None:
    from stable_baselines3.common.logger import Logger

    callback = CostLoggerCallback()
    logger = Logger(folder=None, output_formats=[])
    callback.model = type("M", (), {"_stats_window_size": 5, "logger": logger, "num_timesteps": 0})()
    callback._init_callback()
    for cost in (1.0, 3.0):
        callback.locals = {"infos": [{"episode_cost": cost, "episode_cv": 2 * cost}], "dones": np.array([True])}
        callback.on_step()
    assert logger.name_to_value["rollout/ep_cost_mean"] == 2.0
    assert logger.name_to_value["rollout/ep_cv_mean"] == 4.0


def test_make_cost_vec_env_writes_one_file_pair_per_copy(tmp_path) -> None:
    from sb3_offtrc.common.monitor import make_cost_vec_env

    venv = make_cost_vec_env("HazardPoint-v0", n_envs=2, seed=3, monitor_dir=str(tmp_path))
    venv.reset()
    for _ in range(100):
        _, _, dones, infos = venv.step(np.tile([[1.0, 0.0]], (2, 1)).astype(np.float32))
    assert dones.all() and all("c" in info["episode"] for info in infos)
    venv.close()
    assert sorted(os.listdir(tmp_path)) == ["0.costs.csv", "0.monitor.csv", "1.costs.csv", "1.monitor.csv"]
    assert len(load_cost_results(str(tmp_path))) == 2
