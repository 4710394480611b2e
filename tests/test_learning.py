"""Learning checks: the distributional cost critic against Monte Carlo, and OffTRC satisfying a
binding cost constraint on the built-in HazardPoint task while improving its return."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure

import sb3_offtrc.envs  # noqa: F401  (registers HazardPoint-v0)
from sb3_offtrc import OffTRC, evaluate_safe_policy
from sb3_offtrc.core import offpolicy_targets

COST_P, STOP_Q, GAMMA = 0.5, 0.1, 0.9


class CostChain(gym.Env):
    """One state; each step costs 1 with probability COST_P and terminates with probability STOP_Q."""

    observation_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action: np.ndarray) -> Any:
        cost = float(self.np_random.uniform() < COST_P)
        terminated = bool(self.np_random.uniform() < STOP_Q)
        return np.zeros(1, np.float32), 0.0, terminated, False, {"cost": cost}


def test_cost_critics_match_monte_carlo_on_a_markov_chain(tmp_path: Any) -> None:
    rng = np.random.default_rng(0)
    returns = []
    for _ in range(50_000):
        total, discount = 0.0, 1.0
        while True:
            total += discount * float(rng.uniform() < COST_P)
            discount *= GAMMA
            if rng.uniform() < STOP_Q:
                break
        returns.append(total)
    mc_mean, mc_std = float(np.mean(returns)), float(np.std(returns))

    model = OffTRC(
        "MlpPolicy", CostChain(), gamma=GAMMA, n_critic_epochs=50, learning_rate=3e-3,
        policy_kwargs=dict(net_arch=[16]), seed=0,
    )  # fmt: skip
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(8000, log_interval=1)
    with th.no_grad():
        _, cost_mean, cost_std = model.policy.values(th.zeros(1, 1))
    assert float(cost_mean) == pytest.approx(mc_mean, rel=0.05)
    # The std critic regresses on sqrt(max(z, 0)) (ALGORITHM.md §3.9), i.e. it learns E[sqrt(z)], which
    # Jensen's inequality puts a little below sqrt(E[z]) = the true std; the variance constant V_hat
    # averages z itself and is unbiased.
    assert float(cost_std) == pytest.approx(mc_std, rel=0.2)
    assert float(cost_std) < mc_std
    # The variance targets z average to the true variance once the critics have converged; V_hat
    # (the constant of §3.4) averages max(z, 0), which the clamp biases upward.
    batch = model.replay_buffer.sample_windows(1000, 4000)
    with th.no_grad():
        n = batch.observations.shape[0]
        v_r, v_c, s_c = model.policy.values(th.cat([batch.observations, batch.next_observations]))
        z = offpolicy_targets(
            batch.rewards, batch.costs, batch.cuts, batch.fails, th.ones(n), v_r[:n], v_r[n:], v_c[:n], v_c[n:],
            s_c[:n] ** 2, s_c[n:] ** 2, GAMMA, model.gae_lambda,
        ).var_target  # fmt: skip
    assert float(z.mean()) == pytest.approx(mc_std**2, rel=0.15)
    logged = pd.read_csv(tmp_path / "progress.csv")["train/cost_std"].dropna().to_numpy()
    assert logged[-1] ** 2 >= float(z.mean())


def test_offtrc_meets_a_binding_constraint_on_hazard_point() -> None:
    th.set_num_threads(1)
    env = make_vec_env("HazardPoint-v0", n_envs=1, seed=0)
    eval_env = gym.make("HazardPoint-v0")
    limit = 0.025  # per step; 100-step episodes -> 2.5 per episode. Driving straight costs ~10.
    model = OffTRC(
        "MlpPolicy", env, cost_limit=limit, max_kl=0.01, n_critic_epochs=20, learning_rate=1e-3,
        policy_kwargs=dict(net_arch=[64, 64]), seed=0,
    )  # fmt: skip
    before = evaluate_safe_policy(model, eval_env, n_eval_episodes=5)
    model.learn(30_000)
    after = evaluate_safe_policy(model, eval_env, n_eval_episodes=5)
    train_costs = list(model.ep_cost_buffer)[-20:]
    assert np.mean(train_costs) <= limit * 100
    assert after.mean_cost <= limit * 100
    assert after.mean_reward > before.mean_reward + 10.0
