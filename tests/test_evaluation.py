"""evaluate_safe_policy and SafeEvalCallback on scripted policies with known costs."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv

import sb3_offtrc.envs  # noqa: F401
from sb3_offtrc import SafeEvalCallback, evaluate_safe_policy
from sb3_offtrc.common.evaluation import empirical_cvar
from sb3_offtrc.envs.hazard_point import straight_policy


class EpisodeIndexCostEnv(gym.Env):
    """Three-step episodes; every step of the k-th episode (k = 0, 1, ...) costs k and rewards 1."""

    observation_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
    action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def __init__(self) -> None:
        self.episode = -1
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        info = {"cost": float(self.episode)}
        return np.zeros(1, dtype=np.float32), 1.0, self.t >= 3, False, info


class ScriptedModel:
    """Anything with SB3's predict signature works as a model."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        return np.stack([self.fn(o) for o in observation]), state


def test_empirical_cvar_hand_values() -> None:
    assert empirical_cvar([1.0, 2.0, 3.0, 4.0], 0.5) == 3.5
    assert empirical_cvar([1.0, 2.0, 3.0, 4.0], 1.0) == 2.5
    # ceil(0.125 * 10) = 2 worst of 0..9 -> (9 + 8) / 2
    assert empirical_cvar(list(range(10)), 0.125) == 8.5
    assert empirical_cvar([5.0], 0.01) == 5.0
    with pytest.raises(ValueError):
        empirical_cvar([1.0], 0.0)


def test_known_episode_costs_on_plain_env() -> None:
    model = ScriptedModel(lambda o: np.zeros(1, dtype=np.float32))
    result = evaluate_safe_policy(model, EpisodeIndexCostEnv(), n_eval_episodes=10, cvar_alpha=0.125, cost_limit=12.0)
    # episode k costs 3k: 0, 3, ..., 27
    assert result.episode_costs == [3.0 * k for k in range(10)]
    assert result.mean_cost == pytest.approx(13.5)
    assert result.cost_cvar == pytest.approx((27 + 24) / 2)
    assert result.mean_reward == 3.0 and result.std_reward == 0.0
    assert result.mean_ep_length == 3.0
    # episodes with cost > 12: k = 5..9
    assert result.violation_rate == pytest.approx(0.5)
    # no violation flag in info -> a step violates when its cost > 0: every step of episodes 1..9
    assert result.episode_cvs == [0] + [3] * 9
    assert result.mean_cv == pytest.approx(2.7)


def test_straight_policy_on_hazard_point_vec_env() -> None:
    venv = DummyVecEnv([lambda: gym.make("HazardPoint-v0", start_noise=0.0)] * 3)
    result = evaluate_safe_policy(ScriptedModel(straight_policy), venv, n_eval_episodes=4)
    assert len(result.episode_costs) == 4
    assert result.episode_costs == [10.0] * 4 and result.episode_cvs == [10] * 4
    assert result.mean_reward == pytest.approx(102.0)
    assert result.violation_rate == 1.0  # no limit: episodes with any violating step
    summary = result.summary()
    assert "episode_costs" not in summary and summary["mean_cost"] == 10.0


def test_missing_cost_key_raises() -> None:
    with pytest.raises(KeyError, match="cost_key"):
        evaluate_safe_policy(ScriptedModel(lambda o: np.zeros(1, dtype=np.float32)), gym.make("Pendulum-v1"), 1)


@pytest.mark.parametrize("cost_limit, saved", [(None, True), (-1.0, False), (1000.0, True)])
def test_safe_eval_callback_logs_and_gates_best_model(tmp_path, cost_limit, saved) -> None:
    model = SAC(
        "MlpPolicy", "HazardPoint-v0", learning_starts=100, batch_size=16, seed=0, policy_kwargs={"net_arch": [8]}
    )
    model.set_logger(configure(str(tmp_path / "log"), ["csv"]))
    callback = SafeEvalCallback(
        gym.make("HazardPoint-v0"),
        cost_limit=cost_limit,
        n_eval_episodes=2,
        eval_freq=100,
        log_path=str(tmp_path / "eval"),
        best_model_save_path=str(tmp_path / "best"),
        verbose=0,
    )
    model.learn(200, callback=callback)
    progress = pd.read_csv(tmp_path / "log" / "progress.csv")
    for key in ("eval/mean_reward", "eval/ep_cost_mean", "eval/ep_cost_cvar", "eval/ep_cv_mean"):
        assert progress[key].notna().sum() == 2, key
    assert os.path.exists(tmp_path / "best" / "best_model.zip") == saved
    data = np.load(tmp_path / "eval" / "evaluations.npz")
    assert data["costs"].shape == (2, 2) and data["cvs"].shape == (2, 2)
    assert callback.last_result is not None
    assert progress["eval/ep_cost_mean"].dropna().iloc[-1] == pytest.approx(callback.last_result.mean_cost)
