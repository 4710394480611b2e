"""OffTRC and the Lagrangian baselines behave like every SB3 algorithm (issue 22, item 13).

The behaviours SB3's own generic tests pin for SAC (tests/test_save_load.py, test_predict.py,
test_run.py, test_callbacks.py, test_vec_normalize.py, test_deterministic.py and
test_train_eval_mode.py in DLR-RM/stable-baselines3), checked here for OffTRC, SACLagrangian and
PPOLagrangian with tiny networks and budgets: save/load with and without the replay buffer into 1 and
N env copies, get/set_parameters, ``learn(reset_num_timesteps=False)``, every callback hook,
VecNormalize statistics, train/eval mode, ``predict`` on single and batched observations of every
supported space, seeding, and device placement.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    EveryNTimesteps,
    StopTrainingOnMaxEpisodes,
)
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecNormalize

import sb3_offtrc.envs  # noqa: F401  (registers HazardPoint-v0)
from sb3_offtrc import OffTRC, PPOLagrangian, SACLagrangian
from sb3_offtrc.common.replay_buffer_io import load_replay_buffer_npz, save_replay_buffer_npz

ENV = "HazardPoint-v0"  # Box(6) observations, Box(2) actions, 100-step episodes, info["cost"]
EPISODE = 100
TINY: dict[type[BaseAlgorithm], dict[str, Any]] = {
    OffTRC: dict(n_steps=100, n_recent=100, n_batch=200, buffer_size=1000, n_critic_epochs=2),
    SACLagrangian: dict(learning_starts=100, batch_size=32, buffer_size=1000, train_freq=4),  # a rollout: 4 steps
    PPOLagrangian: dict(n_steps=100, batch_size=50, n_epochs=1),
}
ALGOS = list(TINY)
OFF_POLICY = [OffTRC, SACLagrangian]
every_algo = pytest.mark.parametrize("algo", ALGOS, ids=lambda cls: cls.__name__)


def _make(algo: type[BaseAlgorithm], env: Any = ENV, **kwargs: Any) -> Any:
    settings: dict[str, Any] = {"seed": 0, "device": "cpu", "policy_kwargs": dict(net_arch=[16, 16])}
    return algo("MlpPolicy", env, **{**settings, **TINY[algo], **kwargs})


def _observations(n: int = 10) -> np.ndarray:
    """Observations the policy will meet: a random walk in HazardPoint-v0."""
    env = gym.make(ENV)
    obs, _ = env.reset(seed=1)
    env.action_space.seed(1)
    seen = []
    for _ in range(n):
        seen.append(obs)
        obs, *_ = env.step(env.action_space.sample())
    return np.array(seen)


def _same_parameters(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Equal network parameters (optimiser states are laid out differently and not compared)."""
    return all(
        th.allclose(first[name][key].cpu(), second[name][key].cpu())
        for name in first
        if "optim" not in name
        for key in first[name]
    )


# ---------------------------------------------------------------- get/set_parameters, save/load


@every_algo
@pytest.mark.filterwarnings("ignore:OffTRC update")  # random critics: some policy steps are skipped, with a warning
def test_set_parameters_save_and_load_keep_the_policy(algo: type[BaseAlgorithm], tmp_path: Any) -> None:
    model = _make(algo)
    model.learn(200)
    original = copy.deepcopy(model.get_parameters())
    assert "policy" in original and any("optim" in name for name in original)

    with pytest.raises(ValueError, match="not_an_object"):  # an unknown object, in either mode
        model.set_parameters({**original, "not_an_object": {}}, exact_match=True)
    with pytest.raises(ValueError, match="not_an_object"):
        model.set_parameters({**original, "not_an_object": {}}, exact_match=False)
    with pytest.raises(ValueError, match="policy"):  # an object missing, with exact_match
        model.set_parameters({k: v for k, v in original.items() if k != "policy"}, exact_match=True)
    last = list(original["policy"])[-1]
    partial = {**original, "policy": OrderedDict((k, v) for k, v in original["policy"].items() if k != last)}
    with pytest.raises(RuntimeError):  # a tensor missing inside a state dict, with exact_match (torch's error)
        model.set_parameters(partial, exact_match=True)

    # new values for every tensor but the last of each network: those change, the last does not
    randomized = {
        name: params
        if "optim" in name
        else OrderedDict((k, th.rand_like(v) if k != list(params)[-1] else v) for k, v in params.items())
        for name, params in original.items()
    }
    model.set_parameters(randomized, exact_match=True)
    now = model.get_parameters()
    for name, params in original.items():
        if "optim" in name:
            continue
        for key, value in params.items():
            assert th.equal(now[name][key], value) == (key == list(params)[-1]), (name, key)

    observations = _observations()
    actions, _ = model.predict(observations, deterministic=True)
    path = tmp_path / "model.zip"
    model.save(path)
    loaded = algo.load(path, env=make_vec_env(ENV), device="cpu")
    assert _same_parameters(model.get_parameters(), loaded.get_parameters())
    np.testing.assert_allclose(loaded.predict(observations, deterministic=True)[0], actions, atol=1e-5)
    # set_parameters also reads a saved zip
    other = _make(algo, seed=1)
    other.set_parameters(str(path), exact_match=True)
    np.testing.assert_allclose(other.predict(observations, deterministic=True)[0], actions, atol=1e-5)
    loaded.learn(100, reset_num_timesteps=False)  # and training goes on from the loaded model
    assert loaded.num_timesteps == 300


@every_algo
def test_save_can_exclude_and_include_attributes(algo: type[BaseAlgorithm], tmp_path: Any) -> None:
    model = _make(algo, verbose=2)
    model.save(tmp_path / "without", exclude=["verbose"])
    assert algo.load(tmp_path / "without.zip", device="cpu").verbose == 0
    model.save(tmp_path / "with", exclude=["verbose"], include=["verbose"])
    assert algo.load(tmp_path / "with.zip", device="cpu").verbose == 2


@every_algo
def test_load_into_n_env_copies_and_train_on(algo: type[BaseAlgorithm], tmp_path: Any) -> None:
    model = _make(algo)
    model.learn(200)
    model.save(tmp_path / "model.zip")
    for n_envs in (1, 2):
        loaded = algo.load(tmp_path / "model.zip", env=make_vec_env(ENV, n_envs=n_envs), device="cpu")
        assert loaded.n_envs == n_envs and loaded.get_env().num_envs == n_envs
        buffer = getattr(loaded, "replay_buffer", None) or loaded.rollout_buffer
        assert buffer.n_envs == n_envs
        loaded.learn(200, reset_num_timesteps=False)
        assert loaded.num_timesteps == 400


@pytest.mark.parametrize("algo", OFF_POLICY, ids=lambda cls: cls.__name__)
def test_replay_buffer_save_and_load(algo: type[BaseAlgorithm], tmp_path: Any) -> None:
    model = _make(algo)
    model.learn(200)
    model.save(tmp_path / "model.zip")
    model.save_replay_buffer(tmp_path / "buffer.pkl")  # SB3's pickle: this test's own file, so trusted
    save_replay_buffer_npz(model.replay_buffer, tmp_path / "buffer.npz")
    saved = copy.deepcopy(model.replay_buffer)
    arrays = [key for key, value in vars(saved).items() if isinstance(value, np.ndarray)]
    assert {"observations", "actions", "rewards", "dones", "costs"} <= set(arrays)

    def pickled(target: Any) -> None:
        target.load_replay_buffer(tmp_path / "buffer.pkl")

    def npz(target: Any) -> None:
        load_replay_buffer_npz(target.replay_buffer, tmp_path / "buffer.npz")

    for load_buffer in (pickled, npz):
        one = algo.load(tmp_path / "model.zip", env=make_vec_env(ENV), device="cpu")
        assert one.replay_buffer.pos == 0 and not one.replay_buffer.full  # the zip never holds the buffer
        load_buffer(one)
        assert one.replay_buffer.pos == saved.pos == 200
        for key in arrays:
            np.testing.assert_array_equal(getattr(one.replay_buffer, key), getattr(saved, key), err_msg=key)
        one.learn(100, reset_num_timesteps=False)  # appends to the loaded transitions
        assert one.replay_buffer.pos == 300 and one.num_timesteps == 300

    # a buffer of one env copy does not fit a model of two: a clear error, and the model keeps its buffer
    two = algo.load(tmp_path / "model.zip", env=make_vec_env(ENV, n_envs=2), device="cpu")
    fresh = two.replay_buffer
    with pytest.raises(ValueError, match="saved with n_envs=1, the model has n_envs=2"):
        two.load_replay_buffer(tmp_path / "buffer.pkl")
    assert two.replay_buffer is fresh
    with pytest.raises(ValueError, match="n_envs=1.*n_envs=2"):
        load_replay_buffer_npz(two.replay_buffer, tmp_path / "buffer.npz")
    two.learn(200, reset_num_timesteps=False)  # without the old buffer it trains on
    assert two.replay_buffer.pos == 100 and two.num_timesteps == 400


# --------------------------------------------------------------------- learn, callbacks, seeds


@every_algo
def test_learn_continues_or_restarts_the_step_count(algo: type[BaseAlgorithm]) -> None:
    model = _make(algo)
    model.learn(200)
    assert model.num_timesteps == 200 and len(model.ep_info_buffer) == 2
    updates = model._n_updates
    model.learn(200, reset_num_timesteps=False)
    assert model.num_timesteps == 400 and len(model.ep_info_buffer) == 4
    assert model._n_updates > updates
    model.learn(100)  # reset_num_timesteps=True: a new count, as in SB3
    assert model.num_timesteps == 100


class HookRecorder(BaseCallback):
    """Counts every hook SB3 calls and what the callback sees."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = dict.fromkeys(("training_start", "rollout_start", "step", "rollout_end", "training_end"), 0)
        self.locals_seen: set[str] = set()
        self.training_modes: set[bool] = set()

    def _on_training_start(self) -> None:
        self.calls["training_start"] += 1

    def _on_rollout_start(self) -> None:
        self.calls["rollout_start"] += 1

    def _on_step(self) -> bool:
        self.calls["step"] += 1
        self.locals_seen |= set(self.locals)
        self.training_modes.add(self.model.policy.training)
        return True

    def _on_rollout_end(self) -> None:
        self.calls["rollout_end"] += 1

    def _on_training_end(self) -> None:
        self.calls["training_end"] += 1


@every_algo
def test_every_callback_hook_is_called(algo: type[BaseAlgorithm]) -> None:
    recorder = HookRecorder()
    model = _make(algo)
    model.learn(300, callback=recorder)
    assert recorder.model is model and recorder.training_env is model.get_env()
    assert recorder.calls["training_start"] == recorder.calls["training_end"] == 1
    assert recorder.calls["step"] == recorder.n_calls == 300 and recorder.num_timesteps == 300
    # a rollout per update: every n_steps = 100 steps for OffTRC and PPO, train_freq = 4 for SAC
    rollouts = 300 // 4 if algo is SACLagrangian else 3
    assert recorder.calls["rollout_start"] == recorder.calls["rollout_end"] == rollouts
    assert {"infos", "dones", "new_obs"} <= recorder.locals_seen
    assert recorder.training_modes == {False}  # collection runs in eval mode


@every_algo
def test_a_callback_returning_false_stops_learning(algo: type[BaseAlgorithm]) -> None:
    class StopAt150(BaseCallback):
        def _on_step(self) -> bool:
            return self.num_timesteps < 150

    model = _make(algo)
    model.learn(1000, callback=StopAt150())
    assert model.num_timesteps == 150


@every_algo
def test_sb3_callbacks_work(algo: type[BaseAlgorithm], tmp_path: Any) -> None:
    every = HookRecorder()
    callbacks = CallbackList(
        [
            CheckpointCallback(save_freq=100, save_path=str(tmp_path / "checkpoints")),
            EvalCallback(
                Monitor(gym.make(ENV)),
                eval_freq=100,
                n_eval_episodes=1,
                log_path=str(tmp_path / "eval"),
                best_model_save_path=str(tmp_path / "best"),
                verbose=0,
            ),
            EveryNTimesteps(n_steps=100, callback=every),
            StopTrainingOnMaxEpisodes(max_episodes=2),  # ends the run after two episodes: step 200
        ]
    )
    model = _make(algo)
    model.learn(1000, callback=callbacks)
    assert model.num_timesteps == 2 * EPISODE
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["rl_model_100_steps.zip", "rl_model_200_steps.zip"]
    assert algo.load(tmp_path / "checkpoints" / "rl_model_100_steps.zip", device="cpu").num_timesteps == 100
    with np.load(tmp_path / "eval" / "evaluations.npz") as evaluations:
        assert evaluations["timesteps"].tolist() == [100, 200]
    assert (tmp_path / "best" / "best_model.zip").is_file()
    assert every.calls["step"] == 2


@every_algo
def test_the_same_seed_gives_the_same_training(algo: type[BaseAlgorithm]) -> None:
    observations = _observations()

    def run(seed: int) -> tuple[dict[str, Any], np.ndarray]:
        # built, trained and sampled one after the other: seeding sets torch's global generator
        model = _make(algo, seed=seed)
        model.learn(200)
        return model.get_parameters(), model.predict(observations)[0]  # stochastic actions: seeded too

    (first, actions), (second, again) = run(3), run(3)
    assert _same_parameters(first, second)
    np.testing.assert_array_equal(actions, again)
    other, _ = run(4)
    assert not _same_parameters(first, other)


# -------------------------------------------------------------------------------- VecNormalize


@every_algo
def test_vec_normalize_statistics_save_and_load(algo: type[BaseAlgorithm], tmp_path: Any) -> None:
    venv = VecNormalize(make_vec_env(ENV), gamma=0.99)
    model = _make(algo, env=venv)
    model.learn(200)
    assert model.get_vec_normalize_env() is venv
    assert venv.obs_rms.count > 200  # the statistics were updated while training
    model.save(tmp_path / "model.zip")
    venv.save(str(tmp_path / "vec_normalize.pkl"))  # SB3's pickle: this test's own file
    observations = _observations()
    actions, _ = model.predict(venv.normalize_obs(observations), deterministic=True)

    restored = VecNormalize.load(str(tmp_path / "vec_normalize.pkl"), make_vec_env(ENV))
    restored.training = False  # evaluation: frozen statistics
    loaded = algo.load(tmp_path / "model.zip", env=restored, device="cpu")
    assert loaded.get_vec_normalize_env() is restored
    np.testing.assert_allclose(restored.obs_rms.mean, venv.obs_rms.mean)
    np.testing.assert_allclose(restored.obs_rms.var, venv.obs_rms.var)
    normalized = restored.normalize_obs(observations)
    np.testing.assert_allclose(loaded.predict(normalized, deterministic=True)[0], actions, atol=1e-5)
    mean = restored.obs_rms.mean.copy()
    loaded.learn(100, reset_num_timesteps=False)
    np.testing.assert_array_equal(restored.obs_rms.mean, mean)


# ------------------------------------------------------------------------------ train/eval mode


class BatchNormExtractor(BaseFeaturesExtractor):
    """Flatten, then BatchNorm without weights: running statistics change only in training mode.

    (OffTRC's extractor must have no trainable parameters; ``affine=False`` has none.)
    """

    def __init__(self, observation_space: spaces.Box) -> None:
        super().__init__(observation_space, int(np.prod(observation_space.shape)))
        self.norm = th.nn.BatchNorm1d(self.features_dim, affine=False)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.norm(th.flatten(observations, start_dim=1))


def _running_means(model: Any) -> list[th.Tensor]:
    return [m.running_mean.clone() for m in model.policy.modules() if isinstance(m, th.nn.BatchNorm1d)]


@every_algo
def test_predict_and_collection_use_eval_mode_and_updates_train_mode(algo: type[BaseAlgorithm]) -> None:
    kwargs = dict(policy_kwargs=dict(net_arch=[16, 16], features_extractor_class=BatchNormExtractor))
    model = _make(algo, **kwargs)
    before = _running_means(model)
    assert before
    observations = _observations()
    for _ in range(3):
        model.predict(observations)
        model.predict(observations[0])
    assert all(th.equal(a, b) for a, b in zip(before, _running_means(model), strict=True))
    recorder = HookRecorder()
    model.learn(200, callback=recorder)
    assert recorder.training_modes == {False}
    assert any(not th.equal(a, b) for a, b in zip(before, _running_means(model), strict=True))
    after = _running_means(model)
    model.predict(observations)  # predict after training is in eval mode again
    assert all(th.equal(a, b) for a, b in zip(after, _running_means(model), strict=True))


# ------------------------------------------------------------------------------------- predict


class SpaceEnv(gym.Env[Any, Any]):
    """Random observations of any space, 20-step episodes, a constant cost."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        self.observation_space, self.action_space = observation_space, action_space
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.observation_space.seed(seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        assert self.action_space.contains(np.asarray(action, dtype=self.action_space.dtype)), action
        self.t += 1
        return self.observation_space.sample(), 0.0, False, self.t >= 20, {"cost": 0.1}


OBSERVATION_SPACES = {
    "box": spaces.Box(-1.0, 1.0, (3,), np.float32),
    "box_2d": spaces.Box(-1.0, 1.0, (2, 3), np.float32),
    "discrete": spaces.Discrete(4),
    "multi_discrete": spaces.MultiDiscrete([2, 3]),
    "multi_binary": spaces.MultiBinary(3),
}
ACTION_SPACES = {
    "box": spaces.Box(-2.0, 3.0, (2,), np.float32),
    "discrete": spaces.Discrete(3),
    "multi_discrete": spaces.MultiDiscrete([2, 3]),
    "multi_binary": spaces.MultiBinary(2),
}
SUPPORTED = [
    (algo, obs, act)
    for algo in ALGOS
    for obs in OBSERVATION_SPACES
    for act in ACTION_SPACES
    if act == "box" or algo is PPOLagrangian  # OffTRC and SAC act in a Box only
]


@pytest.mark.parametrize(
    ("algo", "obs_name", "act_name"), SUPPORTED, ids=[f"{a.__name__}-{o}-{c}" for a, o, c in SUPPORTED]
)
def test_predict_on_every_supported_space(algo: type[BaseAlgorithm], obs_name: str, act_name: str) -> None:
    observation_space, action_space = OBSERVATION_SPACES[obs_name], ACTION_SPACES[act_name]
    model = _make(
        algo, env=SpaceEnv(observation_space, action_space), **({"learning_starts": 0} if algo is SACLagrangian else {})
    )
    model.learn(100)  # collection and an update on this space
    observation_space.seed(0)
    single = observation_space.sample()
    action, state = model.predict(single)
    assert state is None and action.shape == action_space.shape and action_space.contains(action)
    batch = np.stack([observation_space.sample() for _ in range(5)])
    actions, _ = model.predict(batch)
    assert actions.shape == (5, *action_space.shape)
    assert all(action_space.contains(a) for a in actions)
    np.testing.assert_array_equal(
        model.predict(batch, deterministic=True)[0], model.predict(batch, deterministic=True)[0]
    )
    vec_obs = model.get_env().reset()
    assert model.predict(vec_obs)[0].shape == (1, *action_space.shape)


@every_algo
def test_predict_refuses_an_observation_of_the_wrong_shape(algo: type[BaseAlgorithm]) -> None:
    model = _make(algo)
    with pytest.raises(ValueError, match="observation"):
        model.predict(np.zeros(7, dtype=np.float32))


@pytest.mark.parametrize("algo", OFF_POLICY, ids=lambda cls: cls.__name__)
def test_a_discrete_action_space_is_refused(algo: type[BaseAlgorithm]) -> None:
    with pytest.raises((ValueError, AssertionError), match="Box"):
        _make(algo, env=SpaceEnv(OBSERVATION_SPACES["box"], ACTION_SPACES["discrete"]))


# -------------------------------------------------------------------------------------- device


@every_algo
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_device_placement(algo: type[BaseAlgorithm], device: str, tmp_path: Any) -> None:
    if device == "cuda" and not th.cuda.is_available():
        pytest.skip("no CUDA device")
    model = _make(algo, device=device)
    model.learn(200)
    assert model.device.type == device
    assert all(p.device.type == device for p in model.policy.parameters())
    assert all(t.device.type == device for params in model.get_parameters().values() for t in params.values()
               if isinstance(t, th.Tensor))  # fmt: skip
    buffer = getattr(model, "replay_buffer", None) or model.rollout_buffer
    assert buffer.device.type == device
    observations = _observations()
    actions, _ = model.predict(observations, deterministic=True)
    assert isinstance(actions, np.ndarray)
    model.save(tmp_path / "model.zip")
    for target in ("cpu", device):  # a model saved on one device loads onto another
        loaded = algo.load(tmp_path / "model.zip", device=target)
        assert all(p.device.type == target for p in loaded.policy.parameters())
        np.testing.assert_allclose(loaded.predict(observations, deterministic=True)[0], actions, atol=1e-4)
