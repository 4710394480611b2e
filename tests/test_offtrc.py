"""Layer-2 wiring of OffTRC: buffer windows, SB3 behaviour (save/load, VecEnvs, VecNormalize,
continued learning, seeding, logging) and clear errors on bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

from sb3_offtrc import OffTRC
from sb3_offtrc.core import diag_gaussian_kl, gaussian_fisher_vector_product, kl_hessian_vector_product
from sb3_offtrc.offtrc import CostReplayBuffer
from sb3_offtrc.offtrc import offtrc as offtrc_module
from sb3_offtrc.offtrc.buffers import WindowBatch
from sb3_offtrc.offtrc.policies import GaussianActor, NumpyActor

SMALL: dict[str, Any] = dict(
    n_steps=100,
    n_recent=100,
    n_batch=300,
    buffer_size=1000,
    n_critic_epochs=3,
    policy_kwargs=dict(net_arch=[16, 16]),
)


class CostPendulum(gym.Wrapper):
    """Pendulum with a known cost: 1 while the angle is beyond 0.5 rad (``cos < cos(0.5)``)."""

    def __init__(self, cost_value: float | None = None, reward_value: float | None = None) -> None:
        super().__init__(gym.make("Pendulum-v1", max_episode_steps=50))
        self.cost_value, self.reward_value = cost_value, reward_value

    def step(self, action: np.ndarray) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["cost"] = float(obs[0] < math.cos(0.5)) if self.cost_value is None else self.cost_value
        if self.reward_value is not None:
            reward = self.reward_value
        return obs, reward, terminated, truncated, info


class NoCost(gym.Wrapper):
    def __init__(self) -> None:
        super().__init__(gym.make("Pendulum-v1", max_episode_steps=50))


def _model(env: Any = None, **kwargs: Any) -> OffTRC:
    params = {**SMALL, **kwargs}
    return OffTRC("MlpPolicy", env if env is not None else CostPendulum(), seed=0, **params)


# ----------------------------------------------------------------------------------- buffer
def _filled_buffer(n_rows: int, buffer_size: int, n_envs: int, done_every: int = 0) -> CostReplayBuffer:
    obs_space = spaces.Box(-np.inf, np.inf, (1,), np.float32)
    act_space = spaces.Box(-1, 1, (1,), np.float32)
    buf = CostReplayBuffer(buffer_size * n_envs, obs_space, act_space, device="cpu", n_envs=n_envs)
    for t in range(n_rows):
        stamp = np.array([[t * 10 + e] for e in range(n_envs)], dtype=np.float32)  # time and env in the obs
        done = np.array([done_every > 0 and (t + 1) % done_every == 0] * n_envs)
        infos = [{"TimeLimit.truncated": bool(done[0]) and t % 2 == 0} for _ in range(n_envs)]
        buf.add(stamp, stamp + 1, stamp, stamp[:, 0], done, infos,
                cost=stamp[:, 0] / 100, behaviour_mean=stamp * 0, behaviour_std=stamp * 0 + 1)  # fmt: skip
    return buf


@pytest.mark.parametrize("n_rows, buffer_size", [(50, 100), (250, 100), (100, 100)])
@pytest.mark.parametrize("n_envs", [1, 3])
def test_windows_are_contiguous_recent_and_older(n_rows: int, buffer_size: int, n_envs: int) -> None:
    np.random.seed(0)  # noqa: NPY002  (the buffer draws from the global generator, as SB3 seeds it)
    buf = _filled_buffer(n_rows, buffer_size, n_envs)
    stored = min(n_rows, buffer_size)
    first_time = n_rows - stored  # oldest time step still in the buffer
    recent_len, old_len = 10, 25
    for _ in range(20):
        batch = buf.sample_windows(recent_len, old_len)
        stamps = batch.observations[:, 0].numpy().astype(int)
        times, envs = stamps // 10, stamps % 10
        per_env = len(stamps) // n_envs
        assert per_env == recent_len + old_len
        for e in range(n_envs):
            t_env = times[e * per_env : (e + 1) * per_env]
            assert (envs[e * per_env : (e + 1) * per_env] == e).all()
            recent, old = t_env[:recent_len], t_env[recent_len:]
            np.testing.assert_array_equal(recent, np.arange(n_rows - recent_len, n_rows))
            np.testing.assert_array_equal(np.diff(old), 1)  # contiguous in time, across the wrap-around
            assert old[0] >= first_time and old[-1] < n_rows - recent_len  # older than the recent window
        cuts = batch.cuts.numpy().reshape(n_envs, per_env)
        assert (cuts[:, recent_len - 1] == 1).all() and (cuts[:, -1] == 1).all()
        assert batch.recent.numpy().reshape(n_envs, per_env)[:, :recent_len].all()
        assert batch.n_recent_rows == recent_len
        np.testing.assert_allclose(batch.costs.numpy(), stamps / 100, rtol=1e-6)


def test_windows_shrink_while_buffer_is_short_and_cut_at_dones() -> None:
    buf = _filled_buffer(30, 100, 1, done_every=7)
    batch = buf.sample_windows(20, 50)
    times = batch.observations[:, 0].numpy().astype(int) // 10
    np.testing.assert_array_equal(times, np.r_[np.arange(10, 30), np.arange(0, 10)])
    cuts = batch.cuts.numpy()
    fails = batch.fails.numpy()
    for i, t in enumerate(times):
        episode_end = (t + 1) % 7 == 0
        assert cuts[i] == float(episode_end or i in (19, 29))
        assert fails[i] == float(episode_end and t % 2 == 1)  # even steps were time-outs
    with pytest.raises(ValueError, match="behaviour"):
        buf.add(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1), np.zeros(1), [{}])


# ------------------------------------------------------------------------- KL / Hessian
def test_kl_hessian_vector_product_matches_finite_differences() -> None:
    th.manual_seed(0)
    net = th.nn.Sequential(th.nn.Linear(3, 8), th.nn.Tanh(), th.nn.Linear(8, 4)).double()
    obs = th.randn(50, 3, dtype=th.float64)
    params = list(net.parameters())

    def dist() -> tuple[th.Tensor, th.Tensor]:
        out = net(obs)
        return out[:, :2], out[:, 2:].exp()

    with th.no_grad():
        mean_k, std_k = dist()
        mean_k, std_k = mean_k + 0.1, std_k * 1.2  # evaluate away from the minimum so H v is non-trivial
    mean, std = dist()
    product = kl_hessian_vector_product(diag_gaussian_kl(mean_k, std_k, mean, std).mean(), params, damping=0.0)
    vec = th.randn(sum(p.numel() for p in params), dtype=th.float64)

    def grad_at(theta: th.Tensor) -> th.Tensor:
        th.nn.utils.vector_to_parameters(theta, params)
        m, s = dist()
        grads = th.autograd.grad(diag_gaussian_kl(mean_k, std_k, m, s).mean(), params)
        return th.cat([g.reshape(-1) for g in grads])

    theta0 = th.nn.utils.parameters_to_vector(params).detach().clone()
    h = 1e-5
    fd = (grad_at(theta0 + h * vec) - grad_at(theta0 - h * vec)) / (2 * h)
    th.nn.utils.vector_to_parameters(theta0, params)
    np.testing.assert_allclose(product(vec).detach().numpy(), fd.numpy(), rtol=1e-5, atol=1e-8)
    damped = kl_hessian_vector_product(diag_gaussian_kl(mean_k, std_k, *dist()).mean(), params, damping=0.5)
    np.testing.assert_allclose((damped(vec) - product(vec)).detach().numpy(), 0.5 * vec.numpy(), atol=1e-10)


def test_fisher_product_equals_kl_hessian_at_theta_k() -> None:
    """OffTRC uses the Fisher form; at theta_k it must be the KL Hessian (checked by finite differences above)."""
    th.manual_seed(1)
    actor = GaussianActor(5, 3, [16, 16], th.nn.Tanh, -0.3, (-3.0, 2.0)).double()
    obs = th.randn(40, 5, dtype=th.float64)
    params = list(actor.parameters())
    mean, std = actor(obs)
    kl = diag_gaussian_kl(mean.detach(), std.detach(), mean, std).mean()
    reference = kl_hessian_vector_product(kl, params, damping=0.1)
    fisher = gaussian_fisher_vector_product(mean, std, params, damping=0.1)
    for _ in range(3):
        vec = th.randn(sum(p.numel() for p in params), dtype=th.float64)
        np.testing.assert_allclose(fisher(vec).detach().numpy(), reference(vec).detach().numpy(), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------ SB3 behaviour
def test_learn_logs_every_documented_key(tmp_path: Any) -> None:
    model = _model()
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(300, log_interval=1)
    import pandas as pd

    frame = pd.read_csv(tmp_path / "progress.csv")
    expected = [
        "train/objective", "train/cvar", "train/cost_mean", "train/cost_std", "train/constraint_margin",
        "train/step_case", "train/kl", "train/trust_region", "train/line_search_steps",
        "train/line_search_failed", "train/reward_critic_loss", "train/cost_critic_loss",
        "train/cost_std_critic_loss", "train/entropy", "rollout/ep_cost_mean", "rollout/ep_rew_mean",
    ]  # fmt: skip
    missing = [key for key in expected if key not in frame.columns]
    assert not missing
    last = frame.dropna(subset=["train/cvar"]).iloc[-1]
    assert last["train/step_case"] in {"feasible", "constrained", "recovery", "skipped"}
    assert last["train/trust_region"] <= model.max_kl
    # the margin is F(pi_k) - D with D = d / (1 - gamma)
    assert last["train/constraint_margin"] == pytest.approx(last["train/cvar"] - model.cost_limit / 0.01, rel=1e-4)
    assert model._n_updates == 3


def test_episode_cost_is_logged_from_info() -> None:
    model = _model(CostPendulum(cost_value=0.5))
    model.learn(200)
    assert list(model.ep_cost_buffer) == pytest.approx([25.0] * 4)  # 50 steps x 0.5


def test_buffer_keeps_unclipped_actions_and_behaviour() -> None:
    model = _model(policy_kwargs=dict(net_arch=[16, 16], log_std_init=1.0))  # wide: many samples beyond [-1, 1]
    model.learn(100)
    buf = model.replay_buffer
    actions = buf.actions[: buf.pos, 0, 0]
    assert np.abs(actions).max() > 1.0  # unclipped samples are stored
    z = (actions - buf.behaviour_mean[: buf.pos, 0, 0]) / buf.behaviour_std[: buf.pos, 0, 0]
    assert abs(z.mean()) < 0.3 and abs(z.std() - 1.0) < 0.2  # recorded mean/std are those that drew them


def test_save_load_round_trip(tmp_path: Any) -> None:
    model = _model()
    model.learn(200)
    obs = np.stack([model.env.observation_space.sample() for _ in range(8)])
    before = model.predict(obs, deterministic=True)[0]
    model.save(tmp_path / "m.zip")
    model.save_replay_buffer(tmp_path / "buf.pkl")
    loaded = OffTRC.load(tmp_path / "m.zip", env=CostPendulum())
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], before)
    assert loaded.num_timesteps == 200 and loaded._n_updates == model._n_updates
    for name in ("reward_optimizer", "cost_optimizer", "cost_std_optimizer"):
        a = getattr(model.policy, name).state_dict()["state"]
        b = getattr(loaded.policy, name).state_dict()["state"]
        assert a and set(a) == set(b)
        for key in a:
            th.testing.assert_close(a[key]["exp_avg"], b[key]["exp_avg"])
    # each optimiser steps its own critic (the authors' torch port mixed these up)
    for critic, opt in zip(
        (loaded.policy.reward_critic, loaded.policy.cost_critic, loaded.policy.cost_std_critic),
        loaded.policy.critic_optimizers,
        strict=True,
    ):
        assert {id(p) for p in critic.parameters()} == {id(p) for g in opt.param_groups for p in g["params"]}
    without_env = OffTRC.load(tmp_path / "m.zip")  # like SB3: predict works without an env
    np.testing.assert_array_equal(without_env.predict(obs, deterministic=True)[0], before)
    loaded.load_replay_buffer(tmp_path / "buf.pkl")
    assert isinstance(loaded.replay_buffer, CostReplayBuffer)
    np.testing.assert_array_equal(loaded.replay_buffer.costs, model.replay_buffer.costs)
    np.testing.assert_array_equal(loaded.replay_buffer.behaviour_std, model.replay_buffer.behaviour_std)
    loaded.learn(100, reset_num_timesteps=False)
    assert loaded.num_timesteps == 300


def test_continued_learning_cuts_the_stored_trajectory() -> None:
    model = _model(n_steps=30, n_recent=30)  # episodes last 50 steps: learn(30) stops mid-episode
    model.learn(30)
    assert model.replay_buffer.pos == 30 and model.replay_buffer.dones[29, 0] == 0.0
    model.learn(30, reset_num_timesteps=False)
    assert model.num_timesteps == 60
    assert model.replay_buffer.dones[29, 0] == 0.0  # the env was not reset: the trajectory continues
    assert model.replay_buffer.dones[49, 0] == 1.0  # ... to its real end
    model.learn(30)  # resets the env: the last stored step must now end its trajectory, as a time-out
    assert model.replay_buffer.dones[59, 0] == 1.0 and model.replay_buffer.fails[59, 0] == 0.0
    assert model.num_timesteps == 30


def test_same_seed_same_first_update() -> None:
    params = []
    for _ in range(2):
        model = _model()
        model.learn(100)
        params.append(th.nn.utils.parameters_to_vector(model.policy.parameters()).detach())
    th.testing.assert_close(params[0], params[1])
    other = OffTRC("MlpPolicy", CostPendulum(), seed=1, **SMALL)
    other.learn(100)
    assert not th.allclose(params[0], th.nn.utils.parameters_to_vector(other.policy.parameters()).detach())


@pytest.mark.parametrize("vec_cls", [DummyVecEnv, SubprocVecEnv])
def test_multi_env(vec_cls: type) -> None:
    env = make_vec_env(CostPendulum, n_envs=2, vec_env_cls=vec_cls)
    model = _model(env)
    assert model.train_freq.frequency == 50  # n_steps counts transitions over both copies
    model.learn(200)
    assert model._n_updates == 2 and model.replay_buffer.pos == 100
    env.close()


def test_vec_normalize_keeps_cost_raw() -> None:
    env = VecNormalize(make_vec_env(lambda: CostPendulum(cost_value=3.0, reward_value=-7.0), n_envs=1))
    model = _model(env)
    model.learn(200)
    buf = model.replay_buffer
    assert (buf.costs[:200] == 3.0).all()  # cost never normalised
    assert (buf.rewards[:200] == -7.0).all()  # stored raw like SAC; normalised when sampled
    batch = buf.sample_windows(50, 50, env=model._vec_normalize_env)
    assert th.all(batch.costs == 3.0)
    assert not th.allclose(batch.rewards, th.full_like(batch.rewards, -7.0))
    raw_obs = th.as_tensor(buf.observations[150:200, 0])
    assert not th.allclose(batch.observations[:50], raw_obs)  # observations normalised on sampling


# ------------------------------------------------------------------------------- errors
def test_discrete_actions_rejected() -> None:
    with pytest.raises(ValueError, match="continuous"):
        OffTRC("MlpPolicy", "CartPole-v1")


def test_missing_cost_names_the_fix() -> None:
    model = _model(NoCost())
    with pytest.raises(KeyError, match="cost_key"):
        model.learn(10)


def test_non_finite_cost_names_step_and_env() -> None:
    env = make_vec_env(lambda: CostPendulum(cost_value=float("nan")), n_envs=2)
    model = _model(env)
    with pytest.raises(ValueError, match=r"cost nan at env step 2 from env index 0"):
        model.learn(10)


def test_bad_hyperparameters() -> None:
    env = make_vec_env(CostPendulum, n_envs=3)
    with pytest.raises(ValueError, match="multiple of the number of env copies"):
        _model(env)
    with pytest.raises(ValueError, match="cvar_alpha"):
        _model(cvar_alpha=0.0)
    with pytest.raises(ValueError, match="n_recent"):
        _model(n_recent=400)


class LinearExtractor(BaseFeaturesExtractor):
    def __init__(self, observation_space: spaces.Box, frozen: bool = False) -> None:
        super().__init__(observation_space, features_dim=8)
        self.linear = th.nn.Linear(int(np.prod(observation_space.shape)), 8)
        self.linear.requires_grad_(not frozen)

    def forward(self, obs: th.Tensor) -> th.Tensor:
        return self.linear(obs)


def test_trainable_features_extractor_is_refused_frozen_one_is_used() -> None:
    # nothing in OffTRC's update would train it: refusing beats a silent frozen random projection
    with pytest.raises(ValueError, match="net_arch"):
        _model(policy_kwargs=dict(net_arch=[16], features_extractor_class=LinearExtractor))
    model = _model(
        policy_kwargs=dict(
            net_arch=[16], features_extractor_class=LinearExtractor, features_extractor_kwargs=dict(frozen=True)
        )
    )
    weight = model.policy.features_extractor.linear.weight.detach().clone()
    model.learn(200)
    assert model._n_updates == 2
    th.testing.assert_close(model.policy.features_extractor.linear.weight, weight)


# ---------------------------------------------------------------------- numerical faults
def test_nan_from_conjugate_gradient_skips_step_and_keeps_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    model.learn(100)  # one normal update
    actor_before = th.nn.utils.parameters_to_vector(model.policy.actor.parameters()).detach().clone()
    monkeypatch.setattr(offtrc_module, "conjugate_gradient_solver", lambda fn, b, max_iter: b * float("nan"))
    with pytest.warns(UserWarning, match="skipped: non-finite"):
        model.learn(100, reset_num_timesteps=False)
    after = th.nn.utils.parameters_to_vector(model.policy.actor.parameters()).detach()
    assert th.equal(actor_before, after)
    assert model._n_updates == 2  # training went on (the critics were still fitted)


def test_failed_line_search_restores_parameters_exactly() -> None:
    model = _model()
    model.learn(100)
    batch = model.replay_buffer.sample_windows(100, 200)
    params = list(model.policy.actor.parameters())
    theta = th.nn.utils.parameters_to_vector(params).detach().clone()
    obs = batch.observations
    with th.no_grad():
        mean_k, std_k = model.policy.distribution(obs)

    def surrogates() -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        mean, std = model.policy.distribution(obs)
        return th.tensor(0.0), th.tensor(0.0), mean, std, th.ones(len(obs))

    huge = th.full_like(theta, 10.0)
    tries, failed, _, _, std, _ = model._line_search(
        params, huge, surrogates, mean_k, std_k, 0.0, 0.0, -1.0, 1e-6, True
    )
    assert failed and tries == model.line_search_max_iter
    assert th.equal(th.nn.utils.parameters_to_vector(params), theta)
    assert std is std_k  # the policy is unchanged, so is its std (logged as the entropy)
    small = huge * 1e-9
    tries, failed, kl, _, std, _ = model._line_search(
        params, small, surrogates, mean_k, std_k, 0.0, 0.0, -1.0, 1.0, True
    )
    assert not failed and tries == 1 and kl <= 1.0
    with th.no_grad():
        th.testing.assert_close(std, model.policy.distribution(obs)[1])  # the accepted policy's std


def test_paper_preset_is_the_constructor_default() -> None:
    import inspect

    from sb3_offtrc import get_preset
    from sb3_offtrc.offtrc.policies import OffTRCPolicy

    paper = get_preset("paper")
    defaults = inspect.signature(OffTRC.__init__).parameters
    for key, value in paper.items():
        if key == "policy_kwargs":
            policy = OffTRCPolicy(spaces.Box(-1, 1, (3,)), spaces.Box(-1, 1, (2,)), lambda _: 1e-3)
            assert [m.out_features for m in policy.actor.body if isinstance(m, th.nn.Linear)] == value["net_arch"]
        else:
            assert defaults[key].default == value, key
    cpu = get_preset("cpu")
    cpu["n_batch"] = -1  # a copy: the registry itself is not modified
    assert get_preset("cpu")["n_batch"] == 5000
    with pytest.raises(ValueError, match="available"):
        get_preset("gpu")


def test_recommended_preset_trains_and_is_on_the_command_line() -> None:
    """The recommended preset is valid as it stands (its batch is the whole buffer) and the CLI offers
    every preset by name."""
    from sb3_offtrc import get_preset
    from sb3_offtrc.cli import PRESET_NAMES
    from sb3_offtrc.offtrc import PRESETS

    assert sorted(PRESETS) == sorted(PRESET_NAMES)
    preset = get_preset("recommended")
    assert preset["n_batch"] == preset["buffer_size"]
    assert preset["weighted_baseline"] and not preset["adaptive_trust_region"]
    # the preset with a short window and buffer: the buffer stays the whole batch
    small = {**preset, "n_steps": 100, "n_recent": 100, "buffer_size": 400, "n_batch": 400}
    model = OffTRC("MlpPolicy", CostPendulum(), seed=0, **small)
    model.learn(500)
    assert model.logger.name_to_value["train/n_updates"] == 5
    assert model.max_kl == 0.03 and model.cvar_alpha == 1.0


def test_chunked_critic_fit_is_the_full_batch_step() -> None:
    import copy

    model = _model(n_critic_epochs=4)
    model.learn(300)
    batch = model.replay_buffer.sample_windows(100, 200)
    targets = [th.randn(300) for _ in range(2)] + [th.rand(300)]
    fitted = []
    for chunk_size in (10_000, 7):  # one chunk vs 43 uneven chunks
        clone = copy.deepcopy(model)
        clone.critic_chunk_size = chunk_size
        clone._fit_critics(batch.observations, *targets)
        fitted.append(th.nn.utils.parameters_to_vector(clone.policy.parameters()).detach())
    before = th.nn.utils.parameters_to_vector(model.policy.parameters()).detach()
    assert not th.allclose(fitted[0], before)
    th.testing.assert_close(fitted[0], fitted[1], rtol=1e-4, atol=1e-6)


def test_minibatch_critic_fit_matches_a_plain_adam_loop() -> None:
    """critic_batch_size: shuffled passes of minibatch Adam steps, checked against a hand-written loop."""
    import copy

    model = _model(n_critic_epochs=3, critic_batch_size=64)
    model.learn(300)
    batch = model.replay_buffer.sample_windows(100, 200)
    targets = [th.randn(300), th.randn(300), th.rand(300)]
    reference = copy.deepcopy(model.policy)
    th.manual_seed(123)
    model._fit_critics(batch.observations, *targets)

    th.manual_seed(123)
    with th.no_grad():
        features = reference.features(batch.observations)
    critics = (reference.reward_critic, reference.cost_critic, reference.cost_std_critic)
    # the copied optimisers carry the Adam moments of the updates that learn() already made
    for critic, optimizer, target in zip(critics, reference.critic_optimizers, targets, strict=True):
        for _ in range(3):
            order = th.randperm(300)
            for start in range(0, 300, 64):  # 4 minibatches of 64 and one of 44
                rows = order[start : start + 64]
                optimizer.zero_grad()
                (0.5 * ((critic(features[rows]) - target[rows]) ** 2).mean()).backward()
                th.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
                optimizer.step()
    ours_critics = (model.policy.reward_critic, model.policy.cost_critic, model.policy.cost_std_critic)
    for ours, theirs in zip(ours_critics, critics, strict=True):
        th.testing.assert_close(
            th.nn.utils.parameters_to_vector(ours.parameters()),
            th.nn.utils.parameters_to_vector(theirs.parameters()),
        )
    # a minibatch as large as the batch is the paper's full-batch step
    full, large = copy.deepcopy(model), copy.deepcopy(model)
    full.critic_batch_size, large.critic_batch_size = None, 300
    for clone in (full, large):
        clone._fit_critics(batch.observations, *targets)
    th.testing.assert_close(
        th.nn.utils.parameters_to_vector(full.policy.parameters()),
        th.nn.utils.parameters_to_vector(large.policy.parameters()),
    )


def test_fit_minibatches_with_its_own_generator_leaves_the_global_one_alone() -> None:
    """fit_minibatches(generator=g): the hand-written loop shuffled by g; torch's global state untouched."""
    import copy

    from sb3_offtrc.offtrc.offtrc import fit_minibatches

    th.manual_seed(0)
    critic = th.nn.Sequential(th.nn.Linear(4, 8), th.nn.ReLU(), th.nn.Linear(8, 1), th.nn.Flatten(0))
    reference = copy.deepcopy(critic)
    features, target = th.randn(90, 4), th.randn(90)
    optimizer = th.optim.Adam(critic.parameters(), lr=1e-2)
    reference_optimizer = th.optim.Adam(reference.parameters(), lr=1e-2)

    state = th.get_rng_state()
    loss = fit_minibatches(
        critic,
        optimizer,
        features,
        target,
        n_passes=2,
        batch_size=40,
        max_grad_norm=0.5,
        generator=th.Generator().manual_seed(7),
    )
    assert th.equal(th.get_rng_state(), state)

    generator = th.Generator().manual_seed(7)
    for _ in range(2):
        order = th.randperm(90, generator=generator)
        total = 0.0
        for rows in order.split(40):  # 40, 40 and 10 rows
            reference_optimizer.zero_grad()
            batch_loss = 0.5 * ((reference(features[rows]) - target[rows]) ** 2).mean()
            batch_loss.backward()
            th.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
            reference_optimizer.step()
            total += batch_loss.item() * len(rows)
    th.testing.assert_close(
        th.nn.utils.parameters_to_vector(critic.parameters()), th.nn.utils.parameters_to_vector(reference.parameters())
    )
    assert loss == pytest.approx(total / 90, rel=1e-5)


def test_critic_optimisers_default_to_fused_adam_with_the_same_update() -> None:
    sgd = _model(policy_kwargs=dict(net_arch=[16, 16], optimizer_class=th.optim.SGD))
    assert not any(opt.defaults.get("fused") for opt in sgd.policy.critic_optimizers)  # only Adam is switched
    fused = _model().learn(200)  # each built and trained in turn: the seed fixes the global random state
    plain = _model(policy_kwargs=dict(net_arch=[16, 16], optimizer_kwargs=dict(fused=False))).learn(200)
    assert all(opt.defaults["fused"] for opt in fused.policy.critic_optimizers)
    assert not any(opt.defaults["fused"] for opt in plain.policy.critic_optimizers)
    th.testing.assert_close(
        th.nn.utils.parameters_to_vector(fused.policy.parameters()),
        th.nn.utils.parameters_to_vector(plain.policy.parameters()),
        rtol=1e-4,
        atol=1e-6,
    )


def test_fisher_fraction_uses_the_fisher_of_a_random_subset() -> None:
    """fisher_fraction < 1: the CG matrix is the KL Hessian on a random subset of the batch's states."""
    model = _model(fisher_fraction=0.25)
    model.learn(300)
    obs = model.replay_buffer.sample_windows(100, 200).observations
    params = list(model.policy.actor.parameters())
    mean, std = model.policy.distribution(obs)
    th.manual_seed(7)
    sub_mean, sub_std = model._fisher_outputs(obs, mean, std)
    assert sub_mean.shape == (75, mean.shape[1])
    th.manual_seed(7)
    rows = th.randperm(300)[:75]
    ref_mean, ref_std = model.policy.distribution(obs[rows])
    kl = diag_gaussian_kl(ref_mean.detach(), ref_std.detach(), ref_mean, ref_std).mean()
    reference = kl_hessian_vector_product(kl, params, damping=0.01)
    product = gaussian_fisher_vector_product(sub_mean, sub_std, params, damping=0.01)
    vec = th.randn(sum(p.numel() for p in params))
    th.testing.assert_close(product(vec), reference(vec), rtol=1e-4, atol=1e-7)
    # the whole batch (the paper) is the default: the outputs are passed through untouched
    model.fisher_fraction = 1.0
    assert model._fisher_outputs(obs, mean, std)[0] is mean
    # a full update with a subset still takes a step within the trust region
    before = th.nn.utils.parameters_to_vector(params).detach().clone()
    model.fisher_fraction = 0.25
    model.learn(200, reset_num_timesteps=False)
    assert not th.allclose(before, th.nn.utils.parameters_to_vector(params))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(critic_batch_size=0), "critic_batch_size"),
        (dict(fisher_fraction=0.0), "fisher_fraction"),
        (dict(fisher_fraction=1.5), "fisher_fraction"),
        (dict(n_critic_epochs=0), "n_critic_epochs"),
    ],
)
def test_speed_options_reject_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _model(**kwargs)


@pytest.mark.parametrize("numpy_actor", [False, True])
def test_rollout_sampling_path_matches_the_policy(numpy_actor: bool) -> None:
    """Both action-sampling paths of collection (torch, and the numpy snapshot used inside rollouts)
    give the policy's own mean and std and a sample drawn from them (with VecNormalize too)."""
    env = VecNormalize(DummyVecEnv([CostPendulum, CostPendulum]))
    model = _model(env)
    model._last_obs = env.reset()
    obs_tensor, _ = model.policy.obs_to_tensor(model._last_obs)
    mean, std = (x.detach().numpy() for x in model.policy.distribution(obs_tensor))
    if numpy_actor:
        model._rollout_actor = NumpyActor.snapshot(model.policy)
        model._rollout_rng = np.random.default_rng(3)
        noise = np.random.default_rng(3).standard_normal(mean.shape, dtype=np.float32)
    else:
        th.manual_seed(3)
        noise = th.randn(mean.shape).numpy()
        th.manual_seed(3)
    env_action, sample = model._sample_action(0, None, n_envs=2)
    assert model._behaviour is not None
    np.testing.assert_allclose(model._behaviour[0], mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model._behaviour[1], std, rtol=1e-5)
    np.testing.assert_allclose(sample, mean + std * noise, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(env_action, model.policy.unscale_action(np.clip(sample, -1, 1)), rtol=1e-6)


@pytest.mark.parametrize("activation_fn", [th.nn.ReLU, th.nn.Tanh, th.nn.LeakyReLU, th.nn.ELU])
@pytest.mark.parametrize("net_arch", [[16, 16], [], dict(pi=[8, 6, 4], vf=[4])])
def test_numpy_actor_is_the_torch_actor(activation_fn: type[th.nn.Module], net_arch: Any) -> None:
    policy_kwargs = dict(net_arch=net_arch, activation_fn=activation_fn, log_std_init=-0.5)
    model = _model(policy_kwargs=policy_kwargs)
    th.manual_seed(0)
    with th.no_grad():  # large weights: outputs spread over the squashed range
        for p in model.policy.actor.parameters():
            p.normal_(0.0, 1.0)
    space = model.observation_space
    assert isinstance(space, spaces.Box)
    obs = np.random.default_rng(0).uniform(space.low, space.high, size=(256, *space.shape))

    def both() -> tuple[np.ndarray, ...]:
        actor = NumpyActor.snapshot(model.policy)
        assert actor is not None
        mean, std = actor(obs)
        assert mean.dtype == std.dtype == np.float32
        expected = (x.detach().numpy() for x in model.policy.distribution(th.as_tensor(obs)))
        return mean, std, *expected

    mean, std, expected_mean, expected_std = both()
    assert np.ptp(expected_mean) > 1.0  # outputs spread over the squashed range
    # float32 rounding of large pre-activations, summed in another order (over ten seeds of weights
    # and observations the worst error was under a third of this tolerance)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std, expected_std, rtol=1e-4)
    for bias, bound in zip((-50.0, 50.0), model.policy.log_std_bounds, strict=True):  # the log-std clamp
        with th.no_grad():
            model.policy.actor.log_std_head.weight.zero_()
            model.policy.actor.log_std_head.bias.fill_(bias)
        _, std, _, expected_std = both()
        np.testing.assert_allclose(std, np.exp(bound), rtol=1e-6)
        np.testing.assert_allclose(expected_std, np.exp(bound), rtol=1e-6)


def test_numpy_actor_declines_what_it_cannot_copy() -> None:
    assert NumpyActor.snapshot(_model(policy_kwargs=dict(net_arch=[8], activation_fn=th.nn.GELU)).policy) is None
    model = _model()
    model.policy.actor.body[1] = th.nn.Softplus()  # an activation it has no numpy twin for
    assert NumpyActor.snapshot(model.policy) is None
    model.learn(100)  # the torch path acts instead
    assert model.num_timesteps == 100


def test_every_rollout_acts_with_the_policy_of_its_time() -> None:
    """The numpy snapshot is retaken for every rollout: the behaviour recorded for each rollout is the
    distribution of the policy as it was during that rollout, not a stale copy."""
    import copy

    from stable_baselines3.common.callbacks import BaseCallback

    class KeepActors(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.policies: list[Any] = []

        def _on_rollout_start(self) -> None:
            self.policies.append(copy.deepcopy(self.model.policy))

        def _on_step(self) -> bool:
            return True

    model = _model(max_kl=0.05)
    keep = KeepActors()
    model.learn(300, callback=keep)
    assert len(keep.policies) == 3 and model._rollout_actor is None
    buf = model.replay_buffer
    for k, policy in enumerate(keep.policies):
        rows = slice(100 * k, 100 * (k + 1))
        mean, std = policy.distribution(th.as_tensor(buf.observations[rows, 0]))
        np.testing.assert_allclose(buf.behaviour_mean[rows, 0], mean.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(buf.behaviour_std[rows, 0], std.detach().numpy(), rtol=1e-5)
    first_obs = th.as_tensor(buf.observations[:100, 0])
    first, last = (keep.policies[k].distribution(first_obs)[0] for k in (0, 2))
    assert not th.allclose(first, last, atol=1e-4)  # the policy did move, so a stale copy would fail


def test_sb3_surface_callbacks_progress_bar_set_env_get_parameters() -> None:
    from stable_baselines3.common.callbacks import BaseCallback

    class Count(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.steps = 0
            self.rollouts = 0

        def _on_step(self) -> bool:
            self.steps += 1
            return self.num_timesteps < 150  # stop early through the callback, as in SB3

        def _on_rollout_end(self) -> None:
            self.rollouts += 1

    model = _model()
    counter = Count()
    model.learn(1000, callback=counter, progress_bar=True)
    assert counter.steps == 150 and model.num_timesteps == 150
    params = model.get_parameters()
    assert {"policy", "policy.reward_optimizer", "policy.cost_optimizer", "policy.cost_std_optimizer"} <= set(params)
    model.set_env(CostPendulum(cost_value=2.0))
    updates = model._n_updates
    model.learn(100, reset_num_timesteps=False)
    # the rollout cut at 150 is completed first (update at 200), then one more (update at 300): the
    # updates stay on multiples of n_steps, as in a run that was never stopped
    assert model.num_timesteps == 300 and model._n_updates == updates + 2
    assert model.ep_cost_buffer[-1] == pytest.approx(100.0)  # 50 steps x 2.0 in the new env
    with pytest.raises(AssertionError, match="number of environments"):  # SB3's own check
        model.set_env(make_vec_env(lambda: CostPendulum(), n_envs=2))


@pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("speed_options", [{}, {"critic_batch_size": 100, "fisher_fraction": 0.5}])
def test_cuda_learns_saves_and_loads_on_cpu(tmp_path: Any, speed_options: dict[str, Any]) -> None:
    model = _model(device="cuda", **speed_options)
    model.learn(300)
    assert model._n_updates == 3  # at 100, 200 and 300 steps
    assert all(p.device.type == "cuda" for p in model.policy.parameters())
    assert model.replay_buffer.device.type == "cuda"
    obs = np.stack([model.env.observation_space.sample() for _ in range(8)])
    on_gpu = model.predict(obs, deterministic=True)[0]
    model.save(tmp_path / "m.zip")
    on_cpu = OffTRC.load(tmp_path / "m.zip", device="cpu")
    np.testing.assert_allclose(on_cpu.predict(obs, deterministic=True)[0], on_gpu, atol=1e-5)
    back = OffTRC.load(tmp_path / "m.zip", env=CostPendulum(), device="cuda")
    back.learn(100, reset_num_timesteps=False)
    assert back.num_timesteps == 400


# ------------------------------------------------------------------- env ids as strings
def test_env_id_strings_as_sb3_users_write_them() -> None:
    from sb3_offtrc.cost_signal import resolve_env_string

    env = CostPendulum()
    assert resolve_env_string(env) is env
    assert resolve_env_string("Pendulum-v1") == "Pendulum-v1"  # gymnasium's ids stay as they are
    assert resolve_env_string("NoSuchEnv-v7") == "NoSuchEnv-v7"  # gymnasium raises its own error later
    # a fresh interpreter, where nothing has imported sb3_offtrc.envs yet
    code = (
        "import gymnasium as gym\n"
        "from sb3_offtrc import OffTRC, PPOLagrangian, SACLagrangian\n"
        "assert 'HazardPoint-v0' not in gym.registry\n"
        "for cls in (OffTRC, PPOLagrangian, SACLagrangian):\n"
        "    print(cls('MlpPolicy', 'HazardPoint-v0').env.envs[0].spec.id)\n"
        "from sb3_offtrc.compat.safety_gymnasium import safety_gymnasium_available\n"
        "if safety_gymnasium_available():\n"
        "    venv = OffTRC('MlpPolicy', 'SafetyPointGoal1-v0', n_steps=100).env\n"
        "    venv.reset()\n"
        "    print('cost' in venv.step(venv.action_space.sample()[None])[3][0])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env_vars = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_vars, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    ids = result.stdout.split()
    assert ids[:3] == ["HazardPoint-v0"] * 3
    assert ids[3:] in ([], ["True"])  # the Safety-Gymnasium task, through our registration with info["cost"]


# ------------------------------------------------------------------------------ diagnostics
@pytest.mark.parametrize("discounts", [{"gamma": 0.9}, {"gamma": 0.99, "cost_gamma": 0.9}])
def test_monte_carlo_cost_return_against_a_forward_sum(discounts: dict[str, float]) -> None:
    from types import SimpleNamespace

    model = _model(**discounts)  # the cost return's discount 0.9: horizon 3 / (1 - 0.9) = 30 rows
    rng = np.random.default_rng(0)
    n_recent, n_old = 80, 40
    costs = rng.random(2 * (n_recent + n_old)).astype(np.float32) * (rng.random(240) < 0.3)
    cuts = np.zeros(240, dtype=np.float32)
    cuts[[20, 100, 130, 200]] = 1.0  # episode ends (two inside recent windows, two in old ones)
    recent = np.zeros(240, dtype=np.float32)
    recent[:n_recent] = 1.0  # env 0: recent rows 0-79, old 80-119; env 1: recent 120-199
    recent[120:200] = 1.0
    batch = SimpleNamespace(recent=th.tensor(recent), costs=th.tensor(costs), cuts=th.tensor(cuts))
    model._logger = __import__("stable_baselines3.common.logger", fromlist=["Logger"]).Logger(None, [])
    model._log_monte_carlo_cost(batch)  # type: ignore[arg-type]

    expected = []
    for start, stop in ((0, 80), (120, 200)):
        for t in range(start, stop):
            total, k, ended = 0.0, t, False
            while k < stop:
                total += 0.9 ** (k - t) * costs[k]
                if cuts[k]:
                    ended = True
                    break
                k += 1
            if ended or stop - t >= 30:
                expected.append(total)
    values = model.logger.name_to_value
    assert values["diag/mc_cost_return_mean"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert values["diag/mc_cost_return_std"] == pytest.approx(np.std(expected), rel=1e-5)


def test_updates_log_the_diagnostics() -> None:
    model = _model()
    model.split_half_interval = 1  # the split-half cosines on every update, not every tenth
    model.learn(600)
    values = model.logger.name_to_value
    for key in (
        "diag/q", "diag/s", "diag/cos2", "diag/mean_shift", "diag/std", "diag/cvar_after",
        "diag/reward_critic_holdout_mse", "diag/cost_critic_holdout_ev", "diag/reward_grad_split_cos",
        "diag/cvar_grad_split_cos", "diag/cvar_grad_split_cos_fisher", "diag/reward_grad_split_cos_fisher",
    ):  # fmt: skip
        assert key in values, key
    assert 0.0 <= values["diag/cos2"] <= 1.0 + 1e-6  # Cauchy-Schwarz in the Fisher metric
    assert -1.0 <= values["diag/reward_grad_split_cos"] <= 1.0
    assert values["diag/std"] > 0 and values["diag/reward_critic_holdout_mse"] >= 0
    assert values["diag/reward_critic_holdout_ev"] <= 1.0


@pytest.mark.parametrize("weighted_baseline", [False, True])
def test_reward_gain_is_logged_in_return_units(weighted_baseline: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``diag/reward_gain_return``: the accepted step's reward surrogate without its 1 / sd scale, over
    1 - gamma (the performance-difference lemma's units, those of J_hat); ``diag/reward_mean_window``:
    the newest window's mean reward over 1 - gamma."""
    model = _model(weighted_baseline=weighted_baseline)
    model.learn(400)
    calls: list[tuple[th.Tensor, ...]] = []
    real = offtrc_module.reward_surrogate

    def spy(ratio: th.Tensor, advantages: th.Tensor, weights: th.Tensor, wb: bool = False) -> th.Tensor:
        calls.append((ratio.detach().clone(), advantages.clone(), weights.clone()))
        return real(ratio, advantages, weights, wb)

    monkeypatch.setattr(offtrc_module, "reward_surrogate", spy)
    buffer = model.replay_buffer
    rows = (np.arange(model.n_recent) + buffer.pos - model.n_recent) % buffer.buffer_size
    window = float(buffer.rewards[rows, 0].astype(np.float64).mean()) / (1.0 - model.gamma)
    model.train(gradient_steps=1)
    values = model.logger.name_to_value
    assert values["diag/reward_mean_window"] == pytest.approx(window, rel=1e-5)
    assert values["train/line_search_failed"] == 0 and values["train/line_search_steps"] >= 1
    ratio, adv, w = calls[-1]  # the line search's last evaluation: the accepted parameters
    if weighted_baseline:
        centred = w * (adv - (adv * w).mean() / w.mean())
    else:
        centred = adv * w - (adv * w).mean()
    wanted = float((ratio * centred).mean()) / (1.0 - model.gamma)
    assert values["diag/reward_gain_return"] == pytest.approx(wanted, rel=1e-4)
    assert values["diag/reward_gain_return"] != pytest.approx(values["train/objective"])  # it is unscaled


def test_line_search_checks_the_objective_only_where_the_policy_is_feasible() -> None:
    from sb3_offtrc.core import StepCase
    from sb3_offtrc.offtrc.offtrc import objective_must_not_drop

    assert objective_must_not_drop(StepCase.FEASIBLE, -0.5)
    assert objective_must_not_drop(StepCase.CONSTRAINED, -0.5)
    assert not objective_must_not_drop(StepCase.CONSTRAINED, 0.0)  # infeasible: the CVaR comes first
    assert not objective_must_not_drop(StepCase.CONSTRAINED, 0.3)
    assert not objective_must_not_drop(StepCase.RECOVERY, 0.3)


def test_cost_gradient_shrink_is_the_share_the_halves_agree_on() -> None:
    model = _model(cost_gradient_shrinkage=True)
    identity = lambda v: v  # noqa: E731  (H = I: the products are plain dot products)
    gen = th.Generator().manual_seed(0)
    signal = th.randn(50_000, generator=gen)
    noise_1, noise_2 = th.randn(50_000, generator=gen) * 2.0, th.randn(50_000, generator=gen) * 2.0
    b1, b2 = signal + noise_1, signal + noise_2
    b = 0.5 * (b1 + b2)
    shrink = model._cost_gradient_shrink(b, b.clone(), b1, b2, identity)
    # |t|^2 / (|t|^2 + |n|^2 / 2) with |n|^2 = 4 |t|^2 per half: 1 / 3
    assert shrink == pytest.approx(1.0 / 3.0, abs=0.05)
    same = model._cost_gradient_shrink(signal, signal.clone(), signal, signal, identity)
    assert same == pytest.approx(1.0)
    opposed = model._cost_gradient_shrink(noise_1, noise_1.clone(), noise_1, -noise_1, identity)
    assert opposed == model.min_cost_gradient_shrink  # halves disagree: no reproducible share


def test_cost_gradient_shrinkage_changes_the_step_only_when_asked() -> None:
    plain, shrunk = _model(), _model(cost_gradient_shrinkage=True)
    plain.learn(400)
    shrunk.learn(400)
    assert "diag/cost_gradient_shrink" not in plain.logger.name_to_value
    value = shrunk.logger.name_to_value["diag/cost_gradient_shrink"]
    assert shrunk.min_cost_gradient_shrink <= value <= 1.0


@pytest.mark.parametrize("cost_estimate", ["window", "critic"])
def test_constraint_constants_come_from_the_chosen_estimate(cost_estimate: str) -> None:
    model = _model(cost_estimate=cost_estimate)
    model.learn(400)
    buffer = model.replay_buffer
    rows = (np.arange(model.n_recent) + buffer.pos - model.n_recent) % buffer.buffer_size  # the newest rows
    obs = th.as_tensor(buffer.observations[rows, 0])
    with th.no_grad():  # the critics before the next update fits them
        critic_mean = float(model.policy.cost_critic(model.policy.features(obs)).mean())
    window_mean = float(buffer.costs[rows, 0].astype(np.float64).mean()) / (1.0 - model.gamma)
    model.train(gradient_steps=1)
    values = model.logger.name_to_value
    assert values["diag/cost_mean_window"] == pytest.approx(window_mean, rel=1e-5, abs=1e-6)
    assert values["diag/cost_mean_critic"] == pytest.approx(critic_mean, rel=1e-5, abs=1e-6)
    assert values["train/cost_mean"] == values[f"diag/cost_mean_{cost_estimate}"]
    assert window_mean != pytest.approx(critic_mean)  # the test could tell the two apart


def test_cost_gamma_discounts_the_cost_side_only(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cost_gamma``: J_hat and the limit D both scale by 1 / (1 - cost_gamma), so their ratio is the
    mean step cost over d whatever the discount; the reward side keeps ``gamma``; saved and loaded."""
    for bad in (0.0, 1.0, 1.5, "0.9"):
        with pytest.raises((ValueError, TypeError), match="cost_gamma"):
            _model(cost_gamma=bad)
    models = {}
    for cost_gamma in (None, 0.9):
        model = _model(cost_gamma=cost_gamma)
        model.learn(400)
        buffer = model.replay_buffer
        rows = (np.arange(model.n_recent) + buffer.pos - model.n_recent) % buffer.buffer_size
        mean_cost = float(buffer.costs[rows, 0].astype(np.float64).mean())
        model.train(gradient_steps=1)
        discount = model.gamma if cost_gamma is None else cost_gamma
        assert model.cost_return_limit == pytest.approx(model.cost_limit / (1.0 - discount))
        assert model.logger.name_to_value["diag/cost_mean_window"] == pytest.approx(
            mean_cost / (1.0 - discount), rel=1e-5
        )
        models[cost_gamma] = model
    assert mean_cost > 0  # the test could tell the two discounts apart
    # the targets get it for the cost recursions only (tests/test_core_math.py checks what they do with it)
    seen: list[Any] = []
    real = offtrc_module.offpolicy_targets

    def spy(*args: Any) -> Any:
        seen.append(args)
        return real(*args)

    monkeypatch.setattr(offtrc_module, "offpolicy_targets", spy)
    models[0.9].train(gradient_steps=1)
    assert seen[-1][11] == models[0.9].gamma and seen[-1][-1] == 0.9
    models[0.9].save(tmp_path / "m.zip")
    loaded = OffTRC.load(tmp_path / "m.zip")
    assert loaded.cost_gamma == 0.9 and loaded.cost_return_limit == pytest.approx(0.025 / 0.1)


def test_cost_estimate_is_checked() -> None:
    with pytest.raises(ValueError, match="cost_estimate must be one of 'window', 'critic'"):
        _model(cost_estimate="crtic")


def test_action_value_surrogate_fits_q_critics_steps_through_them_and_round_trips(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``surrogate="action_value"``: two action-value critics are fitted to the reward and cost targets of
    the replayed actions, the step's gradients run through them (with one noise draw per update), and
    save/load keeps them."""
    with pytest.raises(ValueError, match="surrogate must be one of 'importance', 'action_value'"):
        _model(surrogate="q")
    with pytest.raises(ValueError, match="pass surrogate='action_value' to OffTRC"):
        _model(policy_kwargs=dict(net_arch=[16, 16], action_value_critics=True))
    default = _model()
    assert not hasattr(default.policy, "reward_q_critic")  # the default builds none
    # the expected-cost constraint (k = 0): the CVaR's gradient is the cost critic's pathwise one only
    model = _model(surrogate="action_value", cvar_alpha=1.0)
    before = [p.detach().clone() for p in model.policy.cost_q_critic.parameters()]
    model.learn(300)
    values = model.logger.name_to_value
    for key in ("train/reward_q_critic_loss", "train/cost_q_critic_loss", "diag/cost_q_critic_holdout_ev"):
        assert key in values and math.isfinite(values[key])
    assert any(not th.equal(a, b) for a, b in zip(before, model.policy.cost_q_critic.parameters(), strict=True))
    # at theta_k the surrogate is the measured constant: the same noise drew a_k and the first a_theta
    assert values["train/cvar"] == pytest.approx(values["train/cost_mean"], rel=1e-6, abs=1e-6)

    recorded: list[th.Tensor] = []
    real_flat_grad = offtrc_module.flat_grad

    def spy(output: th.Tensor, params: Any, **kwargs: Any) -> th.Tensor:
        grad = real_flat_grad(output, params, **kwargs)
        recorded.append(grad)
        return grad

    monkeypatch.setattr(offtrc_module, "flat_grad", spy)
    action_dim = model.action_space.shape[0]

    def step_gradients() -> tuple[float, float]:
        recorded.clear()
        model.train(gradient_steps=1)
        return float(recorded[0].abs().max()), float(recorded[1].abs().max())  # g, then b

    assert min(step_gradients()) > 0.0
    with th.no_grad():  # neither critic depends on the action any more: both gradients vanish
        model.policy.reward_q_critic.net[0].weight[:, -action_dim:] = 0.0
        model.policy.cost_q_critic.net[0].weight[:, -action_dim:] = 0.0
    with pytest.warns(UserWarning, match="the cost gradient vanishes"):  # and the solver says so
        assert step_gradients() == (0.0, 0.0)
    monkeypatch.undo()

    obs = np.stack([model.env.observation_space.sample() for _ in range(8)])
    model.save(tmp_path / "m.zip")
    loaded = OffTRC.load(tmp_path / "m.zip", env=CostPendulum())
    assert loaded.surrogate == "action_value"
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    for name in ("reward_q_critic", "cost_q_critic"):
        saved, restored = getattr(model.policy, name), getattr(loaded.policy, name)
        for a, b in zip(saved.parameters(), restored.parameters(), strict=True):
            th.testing.assert_close(a, b)
    for name in ("reward_q_optimizer", "cost_q_optimizer"):
        state = getattr(loaded.policy, name).state_dict()["state"]
        assert state and set(state) == set(getattr(model.policy, name).state_dict()["state"])
    assert len(loaded.policy.critic_optimizers) == 5  # the learning-rate schedule reaches all five
    loaded.learn(100, reset_num_timesteps=False)
    # a model keeps its surrogate: loading it with another one is refused, either way round
    default.save(tmp_path / "plain.zip")
    with pytest.raises(ValueError, match="keeps the surrogate, cost_q_target and n_q_critics it was built with"):
        OffTRC.load(tmp_path / "plain.zip", surrogate="action_value")
    with pytest.raises(ValueError, match="keeps the surrogate, cost_q_target and n_q_critics it was built with"):
        OffTRC.load(tmp_path / "m.zip", surrogate="importance")


def test_action_value_input_deviation_feeds_the_critics_the_noise_not_the_action(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``action_value_input="deviation"``: the action-value critics are fitted on ``a_t - mean_b(s_t)``
    and scored on the newest rows the same way, the step evaluates them at the candidate's action less
    pi_k's mean (at theta_k: the noise ``std_k * eps`` alone), save/load keeps the setting, and bad
    input is refused."""
    with pytest.raises(ValueError, match="action_value_input must be one of 'action', 'deviation', 'clipped'"):
        _model(surrogate="action_value", action_value_input="noise")
    with pytest.raises(ValueError, match="pass surrogate='action_value' as well, or leave action_value_input out"):
        _model(action_value_input="deviation")
    with pytest.raises(ValueError, match="not for cost_q_target='td'"):
        _model(surrogate="action_value", cost_q_target="td", action_value_input="deviation")

    def inputs_seen(model: OffTRC) -> tuple[WindowBatch, list[th.Tensor], list[th.Tensor]]:
        """One update's batch, the action columns of every ``action_values`` call and of the Q fit."""
        batches: list[WindowBatch] = []
        real_sample = model.replay_buffer.sample_windows

        def sample_spy(*args: Any, **kwargs: Any) -> WindowBatch:
            batches.append(real_sample(*args, **kwargs))
            return batches[-1]

        scored: list[th.Tensor] = []
        real_values = model.policy.action_values

        def values_spy(features: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
            scored.append(actions.detach().clone())
            return real_values(features, actions)

        fitted: list[th.Tensor] = []
        real_fit = model._fit_jobs

        def fit_spy(features: th.Tensor, jobs: Any) -> None:
            if any("q_critic" in job[0] for job in jobs):
                fitted.append(features[:, -action_dim:].clone())
            real_fit(features, jobs)

        monkeypatch.setattr(model.replay_buffer, "sample_windows", sample_spy)
        monkeypatch.setattr(model.policy, "action_values", values_spy)
        monkeypatch.setattr(model, "_fit_jobs", fit_spy)
        model.train(gradient_steps=1)
        monkeypatch.undo()
        (batch,) = batches
        return batch, scored, fitted

    for setting in ("action", "deviation"):
        model = _model(surrogate="action_value", cvar_alpha=1.0, action_value_input=setting)
        model.learn(300)
        action_dim = model.action_space.shape[0]
        with th.no_grad():  # a policy whose mean sits far from zero, so that action and deviation differ
            model.policy.actor.mean_head.bias.fill_(1.5)
        batch, scored, (fit_actions,) = inputs_seen(model)
        centre = batch.behaviour_mean if setting == "deviation" else th.zeros_like(batch.actions)
        th.testing.assert_close(fit_actions, batch.actions - centre)  # the fit's inputs
        recent = batch.recent > 0
        th.testing.assert_close(scored[0], (batch.actions - centre)[recent])  # the held-out score's
        with th.no_grad():
            mean_k, std_k = model.policy.distribution(batch.observations)
        # the step's first call is at theta_k: mean_k + std_k eps, or (deviation) std_k eps
        eps = (scored[1] - (mean_k if setting == "action" else 0.0)) / std_k
        assert abs(float(eps.mean())) < 0.2 and 0.8 < float(eps.std()) < 1.2
        assert float(mean_k.mean()) > 0.5  # so the other setting's eps would have failed the check above

    model.save(tmp_path / "dev.zip")
    assert OffTRC.load(tmp_path / "dev.zip", env=CostPendulum()).action_value_input == "deviation"
    assert OffTRC.load(tmp_path / "dev.zip", env=CostPendulum(), action_value_input="deviation").n_recent == 100
    with pytest.raises(ValueError, match="was saved with action_value_input='deviation', not 'action'"):
        OffTRC.load(tmp_path / "dev.zip", action_value_input="action")


def test_action_value_input_clipped_gives_the_critics_the_executed_action_and_no_slope_beyond_the_box(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``action_value_input="clipped"``: the critics are fitted and scored on the replayed actions clipped
    to [-1, 1], and in the step a sample beyond the box reads the edge's value with zero slope, so the
    surrogate's gradient in the std vanishes where every sample is clipped."""
    with pytest.raises(ValueError, match="pass surrogate='action_value' as well, or leave action_value_input out"):
        _model(action_value_input="clipped")
    model = _model(surrogate="action_value", cvar_alpha=1.0, action_value_input="clipped")
    model.learn(300)
    fitted: list[th.Tensor] = []
    real_fit = model._fit_jobs

    def fit_spy(features: th.Tensor, jobs: Any) -> None:
        if any("q_critic" in job[0] for job in jobs):
            fitted.append(features[:, -1:].clone())
        real_fit(features, jobs)

    with th.no_grad():  # a wide policy, so that many replayed actions lie beyond the box
        model.policy.actor.log_std_head.bias.fill_(1.0)
    model.learn(200, reset_num_timesteps=False)
    stored = th.as_tensor(model.replay_buffer.actions[: model.replay_buffer.size()].reshape(-1, 1))
    assert float((stored.abs() > 1.0).float().mean()) > 0.2  # the buffer keeps the unclipped sample
    monkeypatch.setattr(model, "_fit_jobs", fit_spy)
    model.train(gradient_steps=1)
    monkeypatch.undo()
    (fit_actions,) = fitted
    assert float(fit_actions.abs().max()) <= 1.0 and float((fit_actions.abs() == 1.0).float().mean()) > 0.2
    # the step's input: q(s, clip(mean + std eps)); beyond the box no gradient reaches mean or std
    features = th.zeros(4, 3)
    mean = th.zeros(4, 1, requires_grad=True)
    std = th.full((4, 1), 0.5, requires_grad=True)
    eps = th.tensor([[3.0], [-4.0], [5.0], [-2.5]])  # every sample beyond the box
    q_r, q_c = model.policy.action_values(features, model._q_actions(mean + std * eps, mean))
    grad_mean, grad_std = th.autograd.grad((q_r + q_c).sum(), (mean, std))
    assert float(grad_mean.abs().max()) == 0.0 and float(grad_std.abs().max()) == 0.0
    eps_inside = th.tensor([[0.5], [-1.0], [1.5], [-0.2]])
    q_r, q_c = model.policy.action_values(features, model._q_actions(mean + std * eps_inside, mean))
    assert float(th.autograd.grad((q_r + q_c).sum(), std)[0].abs().max()) > 0.0


def test_n_q_critics_two_fits_a_second_pair_and_the_step_reads_the_pessimistic_values(tmp_path: Any) -> None:
    """``n_q_critics=2``: a second Q_R and Q_C, initialised apart, are fitted to the same targets; the
    step's values are the smaller reward and the larger cost value of each pair; save/load keeps the
    pair; bad input is refused."""
    for bad in (3, 0, True):
        with pytest.raises(ValueError, match="n_q_critics must be 1 or 2"):
            _model(surrogate="action_value", n_q_critics=bad)
    with pytest.raises(ValueError, match="pass surrogate='action_value' as well, or leave n_q_critics out"):
        _model(n_q_critics=2)
    with pytest.raises(ValueError, match="not for cost_q_target='td'"):
        _model(surrogate="action_value", cost_q_target="td", n_q_critics=2)
    with pytest.raises(ValueError, match="pass n_q_critics to OffTRC instead"):
        _model(surrogate="action_value", policy_kwargs=dict(net_arch=[16, 16], n_q_critics=2))
    assert not hasattr(_model(surrogate="action_value").policy, "cost_q_critic_2")

    model = _model(surrogate="action_value", cvar_alpha=1.0, n_q_critics=2)
    policy = model.policy
    before = {name: [p.detach().clone() for p in getattr(policy, name).parameters()] for name in
              ("reward_q_critic_2", "cost_q_critic_2")}  # fmt: skip
    model.learn(300)
    for name, params in before.items():  # both second critics were fitted ...
        assert any(not th.equal(a, b) for a, b in zip(params, getattr(policy, name).parameters(), strict=True))
        assert math.isfinite(model.logger.name_to_value[f"train/{name}_loss"])
    assert len(policy.critic_optimizers) == 7
    features = th.randn(64, policy.features_extractor.features_dim)
    actions = th.rand(64, model.action_space.shape[0]) * 2 - 1
    inputs = th.cat([features, actions], dim=-1)
    with th.no_grad():
        q_r, q_c = policy.action_values(features, actions)
        r1, r2 = policy.reward_q_critic(inputs), policy.reward_q_critic_2(inputs)
        c1, c2 = policy.cost_q_critic(inputs), policy.cost_q_critic_2(inputs)
    th.testing.assert_close(q_r, th.minimum(r1, r2))
    th.testing.assert_close(q_c, th.maximum(c1, c2))
    # ... and the second critics are not copies of the first, so the two lines above read both
    assert float((r1 - r2).abs().max()) > 1e-3 and float((c1 - c2).abs().max()) > 1e-3

    model.save(tmp_path / "pair.zip")
    loaded = OffTRC.load(tmp_path / "pair.zip", env=CostPendulum())
    assert loaded.n_q_critics == 2 and loaded.policy.n_q_critics == 2
    for name in ("reward_q_critic_2", "cost_q_critic_2"):
        for a, b in zip(getattr(policy, name).parameters(), getattr(loaded.policy, name).parameters(), strict=True):
            th.testing.assert_close(a, b)
    assert _adam_steps(loaded.policy.cost_q_optimizer_2) == _adam_steps(policy.cost_q_optimizer_2) > 0
    loaded.learn(100, reset_num_timesteps=False)
    with pytest.raises(ValueError, match="keeps the surrogate, cost_q_target and n_q_critics it was built with"):
        OffTRC.load(tmp_path / "pair.zip", n_q_critics=1)


def test_cost_q_form_dynamics_forms_q_c_through_the_model_and_keeps_it_on_save(tmp_path: Any) -> None:
    """``cost_q_form="dynamics"``: ``Q_C(s, a) = U(s + scale * net(s, a))`` (checked against the modules
    called by hand); training fits both parts and logs their held-out errors; save/load keeps them and the
    change scale; a mismatched load and every combination the option is not built for are refused."""
    with pytest.raises(ValueError, match="cost_q_form must be one of 'direct', 'dynamics'"):
        _model(surrogate="action_value", cost_q_form="model")
    with pytest.raises(ValueError, match="pass surrogate='action_value' as well, or leave cost_q_form out"):
        _model(cost_q_form="dynamics")
    for option in (dict(cost_q_target="td"), dict(n_q_critics=2), dict(action_value_input="deviation")):
        name = next(iter(option))
        with pytest.raises(ValueError, match=f"not for {name}="):
            _model(surrogate="action_value", cost_q_form="dynamics", **option)
    with pytest.raises(ValueError, match="pass cost_q_form to OffTRC instead"):
        _model(surrogate="action_value", policy_kwargs=dict(net_arch=[16, 16], cost_q_form="dynamics"))
    direct = _model(surrogate="action_value").policy
    assert hasattr(direct, "cost_q_critic") and not hasattr(direct, "dynamics_model")

    model = _model(surrogate="action_value", cvar_alpha=1.0, cost_q_form="dynamics")
    policy = model.policy
    assert not hasattr(policy, "cost_q_critic")
    before = {name: [p.detach().clone() for p in getattr(policy, name).parameters()] for name in
              ("dynamics_model", "post_cost_critic")}  # fmt: skip
    model.learn(300)
    for name, params in before.items():
        assert any(not th.equal(a, b) for a, b in zip(params, getattr(policy, name).parameters(), strict=True))
    for key in ("train/dynamics_loss", "train/post_cost_critic_loss", "diag/dynamics_holdout_ev"):
        assert math.isfinite(model.logger.name_to_value[key]), key
    # the change scale is the batch's std of s' - s per feature (Pendulum: cos, sin, angular velocity)
    scale = policy.dynamics_model.delta_scale
    assert scale.shape == (3,) and bool((scale > 1e-3).all()) and not th.allclose(scale, th.ones(3))
    assert len(policy.critic_optimizers) == 6

    features = th.randn(64, 3)
    actions = th.rand(64, 1) * 2 - 1
    with th.no_grad():
        _, q_c = policy.action_values(features, actions)
        after = features + scale * policy.dynamics_model.net(th.cat([features, actions], dim=-1))
        th.testing.assert_close(q_c, policy.post_cost_critic.net(after).squeeze(-1))

    model.save(tmp_path / "dyn.zip")
    loaded = OffTRC.load(tmp_path / "dyn.zip", env=CostPendulum())
    assert loaded.cost_q_form == "dynamics" and loaded.policy.cost_q_form == "dynamics"
    th.testing.assert_close(loaded.policy.dynamics_model.delta_scale, scale)
    with th.no_grad():
        th.testing.assert_close(loaded.policy.action_values(features, actions)[1], q_c)
    assert _adam_steps(loaded.policy.dynamics_optimizer) == _adam_steps(policy.dynamics_optimizer) > 0
    loaded.learn(100, reset_num_timesteps=False)
    with pytest.raises(ValueError, match="and its cost_q_form"):
        OffTRC.load(tmp_path / "dyn.zip", cost_q_form="direct")


def test_cost_q_form_dynamics_recovers_a_linear_models_action_slope() -> None:
    """On transitions of a known linear system ``s' = s + s A + a B`` with the cost target ``2 s'_0``,
    the fitted model's slope of ``s'`` in the action is ``B``, and the slope of the formed ``Q_C`` in the
    action is the chain rule's ``2 B_0`` (closed form): the one-step model resolves what a direct critic
    would have to read off the same noise-free action variation."""
    th.manual_seed(0)
    model = _model(
        surrogate="action_value", cvar_alpha=1.0, cost_q_form="dynamics", n_critic_epochs=25,
        critic_batch_size=100, policy_kwargs=dict(net_arch=[64, 64]),
    )  # fmt: skip
    model.set_logger(configure(None, [""]))
    n = 2000
    obs = th.randn(n, 3)
    actions = th.rand(n, 1) * 2 - 1
    a_matrix = th.tensor([[0.1, 0.0, -0.05], [0.0, -0.1, 0.0], [0.05, 0.0, 0.1]])
    b_matrix = th.tensor([[0.5, -0.2, 0.3]])
    next_obs = obs + obs @ a_matrix + actions @ b_matrix
    cost_target = 2.0 * next_obs[:, 0]
    for _ in range(6):
        model._fit_cost_dynamics(obs, actions, next_obs, cost_target)
    policy = model.policy
    probe_obs = th.randn(256, 3)
    probe_actions = (th.rand(256, 1) * 2 - 1).requires_grad_(True)
    predicted = policy.dynamics_model.next_features(probe_obs, probe_actions)
    slope = th.stack([th.autograd.grad(predicted[:, k].sum(), probe_actions, retain_graph=True)[0][:, 0]
                      for k in range(3)], dim=-1)  # fmt: skip
    th.testing.assert_close(slope.mean(dim=0), b_matrix[0], atol=0.04, rtol=0.0)
    _, q_c = policy.action_values(probe_obs, probe_actions)
    (q_slope,) = th.autograd.grad(q_c.sum(), probe_actions)
    assert abs(float(q_slope.mean()) - 2.0 * float(b_matrix[0, 0])) < 0.1


def test_td_action_value_fit_reaches_the_bellman_fixed_point() -> None:
    """``fit_td_action_value`` on a two-state cycle s0 -> s1 -> s0 with cost 1 in s0 and none in s1:
    the fixed point of ``Q(s) = c(s) + gamma Q(s')`` is ``1 / (1 - gamma^2)`` in s0 and ``gamma``
    times that in s1, whatever the action (closed form); a terminal row bootstraps nothing."""
    from sb3_offtrc.offtrc.offtrc import fit_td_action_value
    from sb3_offtrc.offtrc.policies import ValueCritic

    th.manual_seed(0)
    gamma, n = 0.5, 400
    state = th.arange(n) % 2  # s0, s1, s0, ...
    features = th.nn.functional.one_hot(state, 2).float()
    next_features = th.nn.functional.one_hot(1 - state, 2).float()
    actions = th.rand(n, 1) * 2 - 1  # the replayed actions: the cost does not depend on them
    costs = (state == 0).float()
    critic = ValueCritic(3, [32, 32], th.nn.ReLU, positive=False)
    target = ValueCritic(3, [32, 32], th.nn.ReLU, positive=False)
    target.load_state_dict(critic.state_dict())
    optimizer = th.optim.Adam(critic.parameters(), lr=3e-3)
    generator = th.Generator().manual_seed(1)

    def fit(fails: th.Tensor, steps: int) -> float:
        return fit_td_action_value(
            critic, target, optimizer, th.cat([features, actions], dim=-1), next_features,
            th.zeros(n, 1), th.full((n, 1), 0.5), costs, fails,
            gamma=gamma, n_steps=steps, batch_size=64, tau=0.05, max_grad_norm=10.0, generator=generator,
        )  # fmt: skip

    loss = fit(th.zeros(n), 3000)
    assert math.isfinite(loss) and loss < 1e-3
    probe = th.tensor([[1.0, 0.0, -0.9], [1.0, 0.0, 0.9], [0.0, 1.0, -0.9], [0.0, 1.0, 0.9]])
    with th.no_grad():
        q = critic(probe)
    s0 = 1.0 / (1.0 - gamma**2)
    th.testing.assert_close(q, th.tensor([s0, s0, gamma * s0, gamma * s0]), atol=0.03, rtol=0.0)
    # the target network follows at rate tau and takes no gradient
    assert all(not p.requires_grad or p.grad is None for p in target.parameters())
    with th.no_grad():
        assert float((target(probe) - q).abs().max()) < 0.03
    # every row terminal: Q is the step cost alone
    fit(th.ones(n), 3000)
    with th.no_grad():
        th.testing.assert_close(critic(probe), th.tensor([1.0, 1.0, 0.0, 0.0]), atol=0.03, rtol=0.0)


def test_td_action_value_fit_bootstraps_with_the_next_policys_noisy_action() -> None:
    """The cost ``1[s0] + a^2`` depends on the action, and the next action is drawn from N(m, sd^2):
    ``V(s) = E[Q(s, a')]`` gets ``E[a'^2] = m^2 + sd^2``, which a bootstrap with the replayed action,
    or with the mean ``m`` alone, would miss. Closed form on the two-state cycle of the test above."""
    from sb3_offtrc.offtrc.offtrc import fit_td_action_value
    from sb3_offtrc.offtrc.policies import ValueCritic

    th.manual_seed(0)
    # E[a'^2] = 0.5; a bootstrap with the mean alone sees 0.25, with the replayed actions (uniform on
    # [-2, 2], so that the critic has seen every a' it is asked about) 4/3: off by 0.25 and 0.83 in Q,
    # where the tolerance is 0.1
    gamma, n, m, sd = 0.5, 400, 0.5, 0.5
    state = th.arange(n) % 2
    actions = th.rand(n, 1) * 4 - 2
    features = th.nn.functional.one_hot(state, 2).float()
    costs = (state == 0).float() + actions[:, 0] ** 2
    critic = ValueCritic(3, [64, 64], th.nn.ReLU, positive=False)
    target = ValueCritic(3, [64, 64], th.nn.ReLU, positive=False)
    target.load_state_dict(critic.state_dict())
    fit_td_action_value(
        critic, target, th.optim.Adam(critic.parameters(), lr=1e-3), th.cat([features, actions], dim=-1),
        th.nn.functional.one_hot(1 - state, 2).float(), th.full((n, 1), m), th.full((n, 1), sd), costs,
        th.zeros(n), gamma=gamma, n_steps=3000, batch_size=128, tau=0.05, max_grad_norm=10.0,
        generator=th.Generator().manual_seed(1),
    )  # fmt: skip
    mean_square = m**2 + sd**2
    v0 = (1.0 + mean_square + gamma * mean_square) / (1.0 - gamma**2)  # V0 = c0 + g V1, V1 = c1 + g V0
    v1 = mean_square + gamma * v0
    probe_actions = [-1.0, 0.0, 1.0]
    probe = th.tensor([[1.0, 0.0, a] for a in probe_actions] + [[0.0, 1.0, a] for a in probe_actions])
    wanted = th.tensor([1.0 + a * a + gamma * v1 for a in probe_actions] + [a * a + gamma * v0 for a in probe_actions])
    with th.no_grad():
        th.testing.assert_close(critic(probe), wanted, atol=0.1, rtol=0.0)


def _adam_steps(optimizer: th.optim.Optimizer) -> int:
    state = optimizer.state_dict()["state"]
    return int(next(iter(state.values()))["step"]) if state else 0


def test_td_cost_critic_option_fits_through_its_target_network_and_round_trips(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cost_q_target="td"``: Q_C is fitted on its own one-step targets through a target network that
    the policy keeps (and save/load restores); Q_R stays on the off-policy targets; bad input is refused."""
    with pytest.raises(ValueError, match="pass surrogate='action_value' as well"):
        _model(cost_q_target="td")
    with pytest.raises(ValueError, match="cost_q_target must be one of 'retrace', 'td'"):
        _model(surrogate="action_value", cost_q_target="sarsa")
    with pytest.raises(ValueError, match="cost_q_gradient_steps"):
        _model(surrogate="action_value", cost_q_target="td", cost_q_gradient_steps=0)
    with pytest.raises(ValueError, match="it would do nothing: pass cost_q_target='td'"):
        _model(surrogate="action_value", cost_q_gradient_steps=10)
    with pytest.raises(ValueError, match="pass cost_q_target='td' to OffTRC"):
        _model(surrogate="action_value", policy_kwargs=dict(net_arch=[16, 16], cost_q_target_network=True))
    assert not hasattr(_model(surrogate="action_value").policy, "cost_q_critic_target")  # retrace: none

    model = _model(surrogate="action_value", cost_q_target="td", cost_q_gradient_steps=50, cvar_alpha=1.0)
    policy = model.policy
    target_before = [p.detach().clone() for p in policy.cost_q_critic_target.parameters()]
    calls: list[int] = []
    real_fit_jobs = model._fit_jobs

    def spy(features: th.Tensor, jobs: Any) -> None:
        calls.append(len(jobs))
        names = [job[0] for job in jobs]
        assert "cost_q_critic_loss" not in names  # Q_C is not fitted to the off-policy targets
        real_fit_jobs(features, jobs)

    model._fit_jobs = spy  # type: ignore[method-assign]
    fitted: list[dict[str, Any]] = []
    real_td = offtrc_module.fit_td_action_value

    def td_spy(*args: Any, **kwargs: Any) -> float:
        fitted.append({"fails": args[8].clone(), "steps": kwargs["n_steps"], "gamma": kwargs["gamma"]})
        return real_td(*args, **kwargs)

    monkeypatch.setattr(offtrc_module, "fit_td_action_value", td_spy)
    adam_steps_before = _adam_steps(policy.cost_q_optimizer)
    model.learn(300)
    monkeypatch.undo()
    assert calls  # the value critics and Q_R were fitted as before
    # one TD fit per update, cost_q_gradient_steps Adam steps each, on the terminal flags (not the window
    # cuts: CostPendulum never terminates, while every window ends in a cut)
    assert len(fitted) == model._n_updates and all(f["steps"] == 50 for f in fitted)
    assert _adam_steps(policy.cost_q_optimizer) - adam_steps_before == 50 * model._n_updates
    assert all(float(f["fails"].sum()) == 0.0 and f["gamma"] == model.gamma for f in fitted)
    values = model.logger.name_to_value
    assert math.isfinite(values["train/cost_q_critic_loss"]) and math.isfinite(values["train/reward_q_critic_loss"])
    moved = [
        float((a - b).abs().max()) for a, b in zip(target_before, policy.cost_q_critic_target.parameters(), strict=True)
    ]
    assert max(moved) > 0.0  # the target network followed Q_C ...
    gaps = [
        float((a.detach() - b).abs().max())
        for a, b in zip(policy.cost_q_critic.parameters(), policy.cost_q_critic_target.parameters(), strict=True)
    ]
    assert max(gaps) > 0.0  # ... slowly: it is not Q_C itself (tau < 1)
    model.save(tmp_path / "td.zip")
    loaded = OffTRC.load(tmp_path / "td.zip", env=CostPendulum())
    assert loaded.cost_q_target == "td" and loaded.cost_q_gradient_steps == 50
    for a, b in zip(
        policy.cost_q_critic_target.parameters(), loaded.policy.cost_q_critic_target.parameters(), strict=True
    ):
        th.testing.assert_close(a, b)
    loaded.learn(100, reset_num_timesteps=False)
    with pytest.raises(ValueError, match="keeps the surrogate, cost_q_target and n_q_critics it was built with"):
        OffTRC.load(tmp_path / "td.zip", cost_q_target="retrace")
    with pytest.raises(ValueError, match="keeps the surrogate, cost_q_target and n_q_critics it was built with"):
        OffTRC.load(tmp_path / "td.zip", surrogate="importance")


def test_split_half_gradients_run_every_tenth_update_unless_shrinkage_needs_them() -> None:
    calls: dict[str, list[int]] = {"plain": [], "shrunk": []}
    for name, kwargs in (("plain", {}), ("shrunk", {"cost_gradient_shrinkage": True})):
        model = _model(**kwargs)
        original = model._split_half_gradients

        def counting(*args: Any, _name: str = name, _model: OffTRC = model, _orig: Any = original) -> Any:
            calls[_name].append(_model._n_updates)
            return _orig(*args)

        model._split_half_gradients = counting  # type: ignore[method-assign]
        model.learn(1200)  # 12 updates
    assert calls["plain"] == [0, 10]
    assert calls["shrunk"] == list(range(12))


# ----------------------------------------------------------------------------------- entropy weight
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ent_coef": "autox"}, "ent_coef must be a number >= 0, 'auto' or 'auto_<start>'"),
        ({"ent_coef": "auto_-1"}, "'auto_<start>' with a positive start"),
        ({"ent_coef": "auto_x"}, "'auto_<start>' with a positive start"),
        ({"ent_coef": -0.1}, "ent_coef must be a finite number in \\[0, inf\\)"),
        ({"ent_coef": "auto", "target_entropy": "high"}, "target_entropy must be a number or 'auto'"),
        ({"ent_coef": "auto", "target_entropy": math.inf}, "target_entropy must be a finite number"),
        ({"ent_coef_lr": -1.0}, "ent_coef_lr must be a finite number"),
    ],
)
def test_entropy_options_reject_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        _model(**kwargs)


def test_entropy_weight_raises_the_std_that_the_plain_step_lowers() -> None:
    stds = {}
    for name, kwargs in (("plain", {}), ("entropy", {"ent_coef": 1.0})):
        # a limit no policy can break: every step is a reward step (a recovery step ignores the entropy)
        model = _model(max_kl=0.03, adaptive_trust_region=False, cost_limit=1.0, **kwargs)
        model.learn(1000)
        stds[name] = model.logger.name_to_value["diag/std"]
        assert ("train/ent_coef" in model.logger.name_to_value) == (name == "entropy")
    # the entropy's gradient is +1 per action dimension on the log-std: a weight of 1 dominates
    # the reward surrogate of this task, so the policy widens where the plain one does not
    assert stds["entropy"] > stds["plain"] * 1.2


def test_learned_entropy_weight_follows_the_gap_to_its_target(tmp_path: Any) -> None:
    from sb3_offtrc.offtrc.policies import gaussian_entropy

    model = _model(ent_coef="auto_0.1", target_entropy=5.0, ent_coef_lr=0.5)  # far above: must grow
    assert model.log_ent_coef == pytest.approx(math.log(0.1))
    model.learn(100)  # one update
    values = model.logger.name_to_value
    assert values["train/ent_coef"] == pytest.approx(0.1)  # the step used the weight before adapting
    entropy = values["train/entropy"]
    with th.no_grad():  # the logged entropy is that of the policy after the step, on the batch's states
        assert entropy == pytest.approx(float(gaussian_entropy(th.tensor([values["diag/std"]]))), abs=0.2)
    # the update rule, by hand: log w += lr * (target - H) / action_dim (Pendulum: one dimension)
    assert model.log_ent_coef == pytest.approx(math.log(0.1) + 0.5 * (5.0 - entropy))
    model.learn(2000, reset_num_timesteps=False)
    assert math.exp(model.log_ent_coef) == pytest.approx(model.ent_coef_bounds[1])  # capped at 10
    path = tmp_path / "model.zip"
    model.save(path)
    loaded = OffTRC.load(path, env=CostPendulum())
    assert loaded.log_ent_coef == model.log_ent_coef  # the learned weight is kept, not restarted

    low = _model(ent_coef="auto", target_entropy=-20.0)  # far below: shrinks to its floor
    assert low.log_ent_coef == pytest.approx(math.log(0.01))
    low.learn(3000)
    assert math.exp(low.log_ent_coef) == pytest.approx(low.ent_coef_bounds[0])


def test_auto_target_entropy_is_minus_the_action_dimension() -> None:
    model = _model(ent_coef="auto")
    assert model._entropy_settings() == (True, 0.01, -1.0)
    assert _model(ent_coef=0.5, target_entropy=2.0)._entropy_settings() == (False, 0.5, 2.0)
    assert _model()._entropy_settings()[:2] == (False, 0.0)  # the paper: no entropy term


def test_fisher_split_cosine_matches_an_exact_solve() -> None:
    """The split-half cosine in the step's metric, b1' H^-1 b2 / sqrt(b1' H^-1 b1 b2' H^-1 b2), against
    a direct solve with an explicit positive definite matrix (enough CG iterations to converge)."""
    from stable_baselines3.common.logger import configure

    model = _model()
    model.set_logger(configure(None, [""]))
    model.cg_max_steps = 50
    generator = th.Generator().manual_seed(0)
    root = th.randn(6, 6, generator=generator, dtype=th.float64)
    matrix = root @ root.T + 0.5 * th.eye(6, dtype=th.float64)
    first, second = (
        th.randn(6, generator=generator, dtype=th.float64),
        th.randn(6, generator=generator, dtype=th.float64),
    )
    rng_state = th.get_rng_state()
    model._log_fisher_split_cosines({"cvar": [first, second]}, lambda v: matrix @ v)
    assert th.equal(th.get_rng_state(), rng_state)  # the solver's random start leaves the run's numbers alone
    inverse_first, inverse_second = th.linalg.solve(matrix, first), th.linalg.solve(matrix, second)
    wanted = float(first @ inverse_second / th.sqrt((first @ inverse_first) * (second @ inverse_second)))
    assert model.logger.name_to_value["diag/cvar_grad_split_cos_fisher"] == pytest.approx(wanted, rel=1e-6)
    # the plain cosine of the same vectors differs: the metric matters
    plain = float(first @ second / (first.norm() * second.norm()))
    assert abs(plain - wanted) > 1e-3


def test_cost_step_multiplier_weighs_the_cost_direction_by_the_measured_cost(tmp_path: Any) -> None:
    """``cost_step="multiplier"``: the weight rises by ``cost_multiplier_lr`` per update while every step
    costs more than the limit, each step is the weighted one (whole radius), and save/load keeps the
    weight; with no cost at all the weight stays 0 and the step is the paper's natural step."""
    import inspect

    signature = inspect.signature(OffTRC.__init__).parameters
    assert {name: signature[name].default for name in offtrc_module.COST_MULTIPLIER_DEFAULTS} == (
        offtrc_module.COST_MULTIPLIER_DEFAULTS
    )  # the check below refuses a value other than these with cost_step='dual'
    with pytest.raises(ValueError, match="cost_step must be one of 'dual', 'multiplier'"):
        _model(cost_step="lagrangian")
    with pytest.raises(ValueError, match="pass cost_step='multiplier' as well, or leave cost_multiplier_lr out"):
        _model(cost_multiplier_lr=0.3)
    with pytest.raises(ValueError, match="pass cost_step='multiplier' as well, or leave cost_multiplier_max out"):
        _model(cost_multiplier_max=3.0)
    with pytest.raises(ValueError, match="cost_limit, which must then be > 0"):
        _model(cost_step="multiplier", cost_limit=0.0)
    with pytest.raises(ValueError, match="cost_multiplier_lr must be a finite number in"):
        _model(cost_step="multiplier", cost_multiplier_lr=0.0)

    # a cost of 1 per step against a limit of 0.5: 100% over, +0.25 per update
    costly = _model(
        CostPendulum(cost_value=1.0), cost_step="multiplier", cost_multiplier_lr=0.25, cost_limit=0.5, cvar_alpha=1.0
    )
    costly.learn(400)
    assert costly._n_updates >= 3
    assert costly.cost_multiplier == pytest.approx(0.25 * costly._n_updates)
    values = costly.logger.name_to_value
    assert values["train/cost_multiplier"] == pytest.approx(costly.cost_multiplier)
    assert values["train/step_case"] == "multiplier"
    costly.save(tmp_path / "m.zip")
    loaded = OffTRC.load(tmp_path / "m.zip", env=CostPendulum(cost_value=1.0))
    assert (loaded.cost_step, loaded.cost_multiplier_lr) == ("multiplier", 0.25)
    assert loaded.cost_multiplier == pytest.approx(costly.cost_multiplier)
    loaded.learn(100, reset_num_timesteps=False)
    assert loaded.cost_multiplier == pytest.approx(costly.cost_multiplier + 0.25)
    # ... and it stops at cost_multiplier_max
    capped = _model(
        CostPendulum(cost_value=1.0), cost_step="multiplier", cost_multiplier_lr=1.0, cost_multiplier_max=2.0
    )
    capped.learn(400)
    assert capped.cost_multiplier == 2.0
    # a weight far above 1 is a cost step: it lowers the CVaR surrogate (the pendulum's angle cost
    # depends on the action; a limit of 0.001 per step is far below it)
    strict = dict(cost_multiplier_lr=100.0, cost_multiplier_max=100.0, cost_limit=0.001, cvar_alpha=1.0)
    recovering = _model(CostPendulum(), cost_step="multiplier", **strict)
    recovering.learn(500)
    values = recovering.logger.name_to_value
    assert recovering.cost_multiplier == 100.0 and values["train/line_search_failed"] == 0
    assert values["diag/cvar_after"] < values["train/cvar"] - 1.0

    # no cost: weight 0, and the step (after the same data and critics) is the dual's feasible natural step
    free = {"cvar_alpha": 1.0, "learning_starts": 0}
    dual = _model(CostPendulum(cost_value=0.0), **free)
    dual.learn(100)  # before the next model is built: each reseeds the global generators
    weighted = _model(CostPendulum(cost_value=0.0), cost_step="multiplier", **free)
    weighted.learn(100)
    assert dual.logger.name_to_value["train/step_case"] == "feasible"
    assert weighted.cost_multiplier == 0.0
    for a, b in zip(dual.policy.actor.parameters(), weighted.policy.actor.parameters(), strict=True):
        th.testing.assert_close(a, b)


def test_multiplier_line_search_accepts_by_the_weighted_change() -> None:
    """With ``lagrangian=(a, c)`` a try passes when ``a d_objective - c d_cvar >= 0``, not by the dual's checks."""
    model = _model()
    theta = th.nn.Parameter(th.zeros(2))
    mean_k, std_k = th.zeros(4, 1), th.ones(4, 1)

    def surrogates() -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        beta = theta[0]  # the step is (1, 0): theta[0] is the tried step's length
        return beta, 10.0 * beta**2, mean_k, std_k, th.ones(4)

    step = th.tensor([1.0, 0.0])
    # the dual's check (a feasible policy far from its limit): the objective rises at once, the first try passes
    tries, failed, *_ = model._line_search([theta], step, surrogates, mean_k, std_k, 0.0, 0.0, -100.0, 0.1, True)
    assert (tries, failed) == (1, False)
    with th.no_grad():
        theta.zero_()  # an accepted try stays in place
    # weighted 1:1, beta - 10 beta^2 >= 0 first at beta = 0.8^11 (< 0.1): the twelfth try
    tries, failed, _, objective, _, cvar = model._line_search(
        [theta], step, surrogates, mean_k, std_k, 0.0, 0.0, -100.0, 0.1, True, lagrangian=(1.0, 1.0)
    )
    assert (tries, failed) == (12, False)
    assert objective == pytest.approx(0.8**11) and cvar == pytest.approx(10 * 0.8**22)
    with th.no_grad():
        theta.zero_()
    # a pure cost step (a = 0) must lower the CVaR: here it only rises, so every try fails
    tries, failed, *_ = model._line_search(
        [theta], step, surrogates, mean_k, std_k, 0.0, 0.0, -100.0, 0.1, True, lagrangian=(0.0, 1.0)
    )
    assert failed and float(theta[0]) == 0.0
