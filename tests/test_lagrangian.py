"""SAC-Lagrangian and PPO-Lagrangian: multiplier dynamics, cost critics against closed forms, save/load."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from sb3_offtrc.lagrangian import (
    LagrangeMultiplier,
    PPOLagrangian,
    SACLagrangian,
    generalised_advantages,
)

AlgoClass = type[SACLagrangian] | type[PPOLagrangian]


def small_net() -> dict[str, Any]:
    # a fresh dict each time: SB3 writes into the policy_kwargs it is given (e.g. "use_sde")
    return {"net_arch": [32, 32]}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # tiny networks on a shared 2-core machine: extra intra-op threads only add contention
    previous = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(previous)


class ConstantCostEnv(gym.Env[np.ndarray, np.ndarray]):
    """Random observations, reward ``-a^2``, a constant step cost ``c``; never terminates.

    Under any policy the discounted cost return from every state is ``c / (1 - gamma)`` as long as
    time-outs are bootstrapped, which is what the cost critics are checked against.
    """

    def __init__(self, cost: float = 0.5, with_cost: bool = True) -> None:
        self.cost = cost
        self.with_cost = with_cost
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        info = {"cost": self.cost} if self.with_cost else {}
        return self.observation_space.sample(), -float(np.square(action).sum()), False, False, info


def constant_cost_env(cost: float = 0.5, with_cost: bool = True, horizon: int = 25) -> gym.Env:
    return gym.wrappers.TimeLimit(ConstantCostEnv(cost, with_cost), max_episode_steps=horizon)


class EpisodeCostRecorder(gym.Wrapper):
    """Independent reference for the algorithms' episode-cost bookkeeping."""

    def __init__(self, env: gym.Env, sink: list[float]) -> None:
        super().__init__(env)
        self.sink = sink
        self.total = 0.0

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        self.total = 0.0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.total += float(info["cost"])
        if terminated or truncated:
            self.sink.append(self.total)
        return obs, float(reward), terminated, truncated, info


# ----------------------------------------------------------------------------- the multiplier


def test_multiplier_rises_while_cost_above_limit_and_falls_to_zero_below() -> None:
    lr = 0.1
    lag = LagrangeMultiplier(initial_value=0.0, lr=lr)
    rising = [lag.update(cost_estimate=5.0, cost_return_limit=2.5) for _ in range(20)]
    assert np.all(np.diff(rising) > 0)
    # Adam without momentum under a constant gradient moves by exactly lr per step
    assert rising[-1] == pytest.approx(20 * lr, rel=1e-4)

    falling = [lag.update(cost_estimate=1.0, cost_return_limit=2.5) for _ in range(40)]
    assert np.all(np.diff(falling) <= 0)
    assert min(falling) >= 0.0
    assert falling[-1] == 0.0  # projected onto lambda >= 0, not merely close to it

    # after a long slack phase one violation lifts lambda off zero immediately (no stale momentum)
    assert lag.update(cost_estimate=3.0, cost_return_limit=2.5) > 0.0


def test_multiplier_step_direction_follows_sign_of_violation() -> None:
    for cost, expected_sign in [(4.0, 1.0), (0.5, -1.0)]:
        lag = LagrangeMultiplier(initial_value=1.0, lr=0.05)
        assert np.sign(lag.update(cost, 2.0) - 1.0) == expected_sign


def test_multiplier_bounds_and_validation() -> None:
    lag = LagrangeMultiplier(initial_value=0.0, lr=1.0, max_value=1.5)
    for _ in range(5):
        lag.update(10.0, 0.0)
    assert lag.value == 1.5
    with pytest.raises(ValueError):
        LagrangeMultiplier(initial_value=-0.1)


# ----------------------------------------------------------------------------- cost GAE


def _reference_discounted_costs(costs: np.ndarray, episode_starts: np.ndarray, gamma: float) -> np.ndarray:
    """Brute force: for every step, sum gamma^k c_{t+k} until the episode ends (no bootstrap)."""
    n_steps, n_envs = costs.shape
    out = np.zeros_like(costs)
    for env in range(n_envs):
        for t in range(n_steps):
            total, discount = 0.0, 1.0
            for k in range(t, n_steps):
                if k > t and episode_starts[k, env]:
                    break
                total += discount * costs[k, env]
                discount *= gamma
            out[t, env] = total
    return out


def test_cost_gae_with_lambda_one_is_the_discounted_cost_sum() -> None:
    rng = np.random.default_rng(0)
    n_steps, n_envs, gamma = 30, 3, 0.9
    costs = rng.uniform(0, 1, size=(n_steps, n_envs)).astype(np.float32)
    episode_starts = (rng.uniform(size=(n_steps, n_envs)) < 0.15).astype(np.float32)
    zeros = np.zeros((n_steps, n_envs), dtype=np.float32)
    adv = generalised_advantages(
        costs, zeros, episode_starts, np.zeros(n_envs), np.ones(n_envs, dtype=bool), gamma, gae_lambda=1.0
    )
    np.testing.assert_allclose(adv, _reference_discounted_costs(costs, episode_starts, gamma), rtol=1e-5)


def test_cost_gae_with_lambda_zero_is_the_td_error() -> None:
    rng = np.random.default_rng(1)
    n_steps, n_envs, gamma = 10, 2, 0.95
    costs = rng.uniform(0, 1, size=(n_steps, n_envs)).astype(np.float32)
    values = rng.uniform(0, 5, size=(n_steps, n_envs)).astype(np.float32)
    last_values = rng.uniform(0, 5, size=n_envs).astype(np.float32)
    episode_starts = np.zeros((n_steps, n_envs), dtype=np.float32)
    adv = generalised_advantages(costs, values, episode_starts, last_values, np.zeros(n_envs), gamma, 0.0)
    next_values = np.vstack([values[1:], last_values[None]])
    np.testing.assert_allclose(adv, costs + gamma * next_values - values, rtol=1e-5)


# ----------------------------------------------------------------------------- cost critics


def test_sac_cost_critic_learns_constant_cost_return() -> None:
    cost, gamma = 0.5, 0.8
    model = SACLagrangian(
        "MlpPolicy",
        constant_cost_env(cost),
        gamma=gamma,
        learning_rate=1e-3,
        tau=0.05,
        batch_size=64,
        learning_starts=64,
        policy_kwargs=small_net(),
        seed=0,
        device="cpu",
    )
    model.learn(600)
    rng = np.random.default_rng(2)
    obs = th.as_tensor(rng.uniform(-1, 1, size=(256, 3)), dtype=th.float32)
    act = th.as_tensor(rng.uniform(-1, 1, size=(256, 1)), dtype=th.float32)
    with th.no_grad():
        q_c = th.cat(model.cost_critic(obs, act), dim=1).mean().item()
    assert q_c == pytest.approx(cost / (1 - gamma), rel=0.05)


def test_ppo_cost_value_learns_constant_cost_return() -> None:
    cost, gamma = 0.5, 0.8
    model = PPOLagrangian(
        "MlpPolicy",
        constant_cost_env(cost),
        gamma=gamma,
        n_steps=200,
        batch_size=50,
        learning_rate=1e-3,
        policy_kwargs=small_net(),
        seed=0,
        device="cpu",
    )
    model.learn(3000)
    obs = th.as_tensor(np.random.default_rng(3).uniform(-1, 1, size=(256, 3)), dtype=th.float32)
    with th.no_grad():
        v_c = model.policy.predict_cost_values(obs).mean().item()
    assert v_c == pytest.approx(cost / (1 - gamma), rel=0.05)


def test_multiplier_grows_in_training_when_the_limit_cannot_be_met() -> None:
    # every step costs 0.5 whatever the policy does, the limit is 0.1 per step
    sac = SACLagrangian(
        "MlpPolicy",
        constant_cost_env(0.5),
        cost_limit=0.1,
        gamma=0.8,
        lagrangian_lr=0.01,
        learning_rate=1e-3,
        tau=0.05,
        batch_size=32,
        learning_starts=32,
        policy_kwargs=small_net(),
        seed=0,
        device="cpu",
    )
    sac.learn(300)
    assert sac.lagrange.value > 0.5
    ppo = PPOLagrangian(
        "MlpPolicy",
        constant_cost_env(0.5),
        cost_limit=0.1,
        lagrangian_lr=0.1,
        n_steps=50,
        batch_size=25,
        policy_kwargs=small_net(),
        seed=0,
        device="cpu",
    )
    ppo.learn(500)
    # ten rollouts, each one step of about lr upward
    assert ppo.lagrange.value == pytest.approx(1.0, rel=0.05)


# ----------------------------------------------------------------------------- errors, n_envs, save/load


@pytest.mark.parametrize("algo", [SACLagrangian, PPOLagrangian])
def test_missing_cost_raises_at_first_step_with_the_fix(algo: AlgoClass) -> None:
    kwargs: dict[str, Any] = {"n_steps": 8, "batch_size": 8} if algo is PPOLagrangian else {"learning_starts": 4}
    model = algo("MlpPolicy", constant_cost_env(with_cost=False), policy_kwargs=small_net(), device="cpu", **kwargs)
    with pytest.raises(KeyError, match=r"info\['cost'\].*cost_key="):
        model.learn(8)
    assert model.num_timesteps == 1


@pytest.mark.parametrize("algo", [SACLagrangian, PPOLagrangian])
def test_custom_cost_key(algo: AlgoClass) -> None:
    class Renamed(gym.Wrapper):
        def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
            obs, reward, terminated, truncated, info = self.env.step(action)
            return obs, float(reward), terminated, truncated, {"penalty": info.pop("cost")}

    kwargs: dict[str, Any] = {"n_steps": 16, "batch_size": 16} if algo is PPOLagrangian else {"learning_starts": 8}
    model = algo("MlpPolicy", Renamed(constant_cost_env(0.3)), cost_key="penalty", policy_kwargs=small_net(), **kwargs)
    model.learn(32)
    assert model.num_timesteps == 32


@pytest.mark.parametrize("algo", [SACLagrangian, PPOLagrangian])
def test_two_envs_costs_and_episode_costs_match_an_independent_recorder(algo: AlgoClass) -> None:
    import sb3_offtrc.envs  # noqa: F401  (registers HazardPoint-v0)

    recorded: list[float] = []
    env = make_vec_env("HazardPoint-v0", n_envs=2, seed=0, wrapper_class=lambda e: EpisodeCostRecorder(e, recorded))
    kwargs: dict[str, Any] = (
        {"n_steps": 64, "batch_size": 64} if algo is PPOLagrangian else {"learning_starts": 50, "batch_size": 32}
    )
    model = algo("MlpPolicy", env, policy_kwargs=small_net(), seed=0, device="cpu", **kwargs)
    model.learn(512)  # 256 steps per env copy: two finished 100-step episodes each
    assert len(recorded) == 4
    assert sorted(model._cost_tracker.ep_costs) == pytest.approx(sorted(recorded))
    if isinstance(model, SACLagrangian):
        stored = model.replay_buffer.costs[: model.replay_buffer.pos]
        assert stored.shape[1] == 2
        assert stored.sum() == pytest.approx(sum(recorded) + model._cost_tracker.running.sum())


def _assert_same_state_dict(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_state_dict(a[key], b[key])
        elif isinstance(a[key], th.Tensor):
            assert th.equal(a[key], b[key]), key
        elif isinstance(a[key], list):
            assert len(a[key]) == len(b[key])
            for x, y in zip(a[key], b[key], strict=True):
                if isinstance(x, dict):
                    _assert_same_state_dict(x, y)
                else:
                    assert x == y
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("algo", [SACLagrangian, PPOLagrangian])
def test_save_load_round_trip(algo: AlgoClass, tmp_path: Any) -> None:
    kwargs: dict[str, Any] = (
        {"n_steps": 32, "batch_size": 16} if algo is PPOLagrangian else {"learning_starts": 16, "batch_size": 16}
    )
    model = algo(
        "MlpPolicy",
        constant_cost_env(0.5),
        cost_limit=0.05,
        initial_lagrange=0.7,
        lagrangian_lr=0.01,
        policy_kwargs=small_net(),
        seed=0,
        device="cpu",
        **kwargs,
    )
    model.learn(96)
    assert model.lagrange.value != pytest.approx(0.7)  # the multiplier actually moved
    model.save(tmp_path / "model.zip")
    loaded = algo.load(tmp_path / "model.zip", device="cpu")

    obs = np.random.default_rng(4).uniform(-1, 1, size=(16, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    assert loaded.lagrange.value == model.lagrange.value
    assert loaded.cost_limit == model.cost_limit and loaded.cost_key == model.cost_key
    _assert_same_state_dict(model.lagrange.optimizer.state_dict(), loaded.lagrange.optimizer.state_dict())
    obs_t = th.as_tensor(obs)
    with th.no_grad():
        if isinstance(model, SACLagrangian) and isinstance(loaded, SACLagrangian):
            act_t = th.as_tensor(np.zeros((16, 1), dtype=np.float32))
            for net in ("cost_critic", "cost_critic_target"):
                before = th.cat(getattr(model, net)(obs_t, act_t), dim=1)
                after = th.cat(getattr(loaded, net)(obs_t, act_t), dim=1)
                assert th.equal(before, after)
            _assert_same_state_dict(model.cost_critic.optimizer.state_dict(), loaded.cost_critic.optimizer.state_dict())
        elif isinstance(model, PPOLagrangian) and isinstance(loaded, PPOLagrangian):
            assert th.equal(model.policy.predict_cost_values(obs_t), loaded.policy.predict_cost_values(obs_t))
            _assert_same_state_dict(model.policy.optimizer.state_dict(), loaded.policy.optimizer.state_dict())
        else:
            raise AssertionError(f"loaded a {type(loaded).__name__} from a {type(model).__name__}")

    # a loaded model keeps training (aliases, buffers and the multiplier's optimiser are wired)
    loaded.set_env(make_vec_env(lambda: constant_cost_env(0.5), n_envs=1))
    loaded.learn(64)


# ----------------------------------------------------------------------------- learning (slow)


@pytest.mark.slow
def test_ppo_lagrangian_takes_the_feasible_detour_that_ppo_does_not() -> None:
    # HazardPoint-v0: straight to the goal ~10 hazard steps per episode, the detour none; the
    # episode limit 0.025 x 100 = 2.5 leaves only the detour feasible
    import sb3_offtrc.envs  # noqa: F401  (registers HazardPoint-v0)
    from sb3_offtrc.common.evaluation import evaluate_safe_policy

    results = {}
    for algo in (PPO, PPOLagrangian):
        kwargs: dict[str, Any] = {"cost_limit": 0.025} if algo is PPOLagrangian else {}
        model = algo(
            "MlpPolicy",
            "HazardPoint-v0",
            n_steps=1000,
            batch_size=100,
            policy_kwargs={"net_arch": [64, 64]},
            seed=0,
            device="cpu",
            **kwargs,
        )
        model.learn(24_000)
        results[algo.__name__] = evaluate_safe_policy(model, gym.make("HazardPoint-v0"), n_eval_episodes=10)
    assert results["PPO"].mean_cost > 2.5
    assert results["PPOLagrangian"].mean_cost <= 2.5
    assert results["PPOLagrangian"].mean_reward > 80.0
