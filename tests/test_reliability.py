"""Bad input must fail early and clearly (issue 22): constructor and load-time range checks, cost and
observation values, the Dict-space message, and the CLI's errors."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env

from sb3_offtrc import OffTRC, PPOLagrangian, SACLagrangian

TINY: dict[str, Any] = dict(
    n_steps=60,
    n_recent=60,
    n_batch=120,
    buffer_size=600,
    n_critic_epochs=2,
    policy_kwargs=dict(net_arch=[8]),
)
TINY_SAC: dict[str, Any] = dict(learning_starts=10, batch_size=16, policy_kwargs=dict(net_arch=[8]))
TINY_PPO: dict[str, Any] = dict(n_steps=32, batch_size=16, n_epochs=1, policy_kwargs=dict(net_arch=[8]))


COMPUTED = object()


class CostLine(gym.Env[np.ndarray, np.ndarray]):
    """A point on a line; the step cost is ``cost`` (any value, to probe the checks) or ``|x| > 0.5``.

    ``bad_obs_at`` makes the observation of that step (counted from reset) ``bad_obs``.
    """

    observation_space = spaces.Box(-10.0, 10.0, (2,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, cost: Any = COMPUTED, bad_obs_at: int | None = None, bad_obs: float = math.nan) -> None:
        self.cost, self.bad_obs_at, self.bad_obs = cost, bad_obs_at, bad_obs
        self.x, self.t = 0.0, 0

    def _obs(self) -> np.ndarray:
        obs = np.array([self.x, 1.0], dtype=np.float32)
        if self.bad_obs_at is not None and self.t == self.bad_obs_at:
            obs[0] = self.bad_obs
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.x, self.t = 0.0, 0
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.x = float(np.clip(self.x + 0.1 * float(np.asarray(action).reshape(-1)[0]), -10.0, 10.0))
        self.t += 1
        cost = float(abs(self.x) > 0.5) if self.cost is COMPUTED else self.cost
        return self._obs(), -abs(self.x), False, self.t >= 20, {"cost": cost}


def _offtrc(env: Any = None, **kwargs: Any) -> OffTRC:
    return OffTRC("MlpPolicy", env if env is not None else CostLine(), seed=0, **{**TINY, **kwargs})


# ------------------------------------------------------------- item 6: constructor range checks
NAN = float("nan")
INF = float("inf")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_grad_norm", 0.0),
        ("max_grad_norm", -1.0),
        ("damping", 0.0),
        ("damping", -0.1),
        ("learning_rate", 0.0),
        ("learning_rate", -3e-4),
        ("learning_rate", NAN),
        ("learning_rate", lambda progress: -1.0),
        ("learning_rate", lambda progress: progress - 0.5),  # <= 0 half way through
        ("learning_starts", -1),
        ("cg_max_steps", 0),
        ("line_search_decay", 0.0),
        ("line_search_decay", 1.0),
        ("line_search_decay", NAN),
        ("line_search_max_iter", 0),
        ("line_search_max_iter", NAN),
        ("n_critic_epochs", NAN),
        ("n_critic_epochs", 2.5),
        ("n_steps", NAN),
        ("n_batch", INF),
        ("critic_batch_size", NAN),
        ("buffer_size", 0),
        ("cost_limit", -1.0),
        ("cost_limit", INF),
        ("cost_limit", NAN),
        ("max_kl", INF),
        ("max_kl", NAN),
        ("max_kl", 0.0),
        ("gamma", 1.0),
        ("gamma", NAN),
        ("gae_lambda", 1.5),
        ("fisher_fraction", NAN),
    ],
)
def test_offtrc_rejects_out_of_range_arguments_by_name(name: str, value: Any) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        _offtrc(**{name: value})


def test_offtrc_accepts_integral_floats_and_a_schedule_that_decays_to_zero() -> None:
    model = _offtrc(n_critic_epochs=2.0, learning_rate=lambda progress: 1e-3 * progress)
    assert model.n_critic_epochs == 2 and isinstance(model.n_critic_epochs, int)
    assert model.lr_schedule(1.0) == pytest.approx(1e-3)


@pytest.mark.parametrize("algo", [SACLagrangian, PPOLagrangian])
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("cost_limit", -1.0),
        ("cost_limit", NAN),
        ("cost_limit", INF),
        ("lagrangian_lr", 0.0),
        ("lagrangian_lr", NAN),
        ("initial_lagrange", -0.5),
        ("initial_lagrange", NAN),
        ("max_lagrange", -1.0),
        ("learning_rate", 0.0),
        ("learning_rate", lambda progress: -1.0),
        ("gamma", 1.0),
        ("batch_size", 0),
    ],
)
def test_lagrangian_baselines_reject_out_of_range_arguments_by_name(algo: Any, name: str, value: Any) -> None:
    kwargs = TINY_SAC if algo is SACLagrangian else TINY_PPO
    with pytest.raises((ValueError, TypeError), match=name):
        algo("MlpPolicy", CostLine(), **{**kwargs, name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [("tau", 0.0), ("learning_starts", -1), ("buffer_size", 0), ("gradient_steps", NAN), ("ent_coef", -0.1)],
)
def test_sac_lagrangian_rejects_sac_arguments_by_name(name: str, value: Any) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        SACLagrangian("MlpPolicy", CostLine(), **{**TINY_SAC, name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [("n_steps", 0), ("n_epochs", NAN), ("gae_lambda", 2.0), ("max_grad_norm", 0.0), ("clip_range", 0.0),
     ("vf_coef", -1.0), ("target_kl", 0.0)],
)  # fmt: skip
def test_ppo_lagrangian_rejects_ppo_arguments_by_name(name: str, value: Any) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        PPOLagrangian("MlpPolicy", CostLine(), **{**TINY_PPO, name: value})


# ---------------------------------------------------------- items 1 and 2: load and validate
@pytest.fixture(scope="module")
def saved_offtrc(tmp_path_factory: pytest.TempPathFactory) -> str:
    model = OffTRC("MlpPolicy", CostLine(), seed=0, **{**TINY, "n_steps": 120, "n_recent": 120, "n_batch": 240})
    model.learn(120)
    path = str(tmp_path_factory.mktemp("saved") / "offtrc.zip")
    model.save(path)
    return path


@pytest.mark.parametrize("n_envs", [3, 6])
def test_load_into_another_number_of_env_copies(saved_offtrc: str, n_envs: int) -> None:
    # the constructor's defaults (n_steps=1000, ...) do not split over 3 or 6 copies; the saved 120 do
    venv = make_vec_env(CostLine, n_envs=n_envs)
    model = OffTRC.load(saved_offtrc, env=venv)
    assert model.n_envs == n_envs and model.n_steps == 120
    actions, _ = model.predict(venv.reset(), deterministic=True)
    assert actions.shape == (n_envs, 1)
    model.learn(120, reset_num_timesteps=False)
    assert model.num_timesteps == 240 and model._n_updates == 2


def test_load_names_the_setting_that_does_not_split_over_the_env_copies(saved_offtrc: str) -> None:
    venv = make_vec_env(CostLine, n_envs=7)
    with pytest.raises(ValueError, match=r"n_steps=120 must be a positive multiple .* \(7\).*OffTRC.load"):
        OffTRC.load(saved_offtrc, env=venv)
    fixed = OffTRC.load(saved_offtrc, env=venv, n_steps=119, n_recent=119, n_batch=238)
    assert fixed.train_freq.frequency == 17


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(gamma=1.0), "gamma"),
        (dict(n_recent=500), "n_recent=500 cannot exceed n_batch=240"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(custom_objects={"cost_limit": NAN}), "cost_limit"),
        (dict(custom_objects={"learning_rate": -1e-3}), "learning_rate"),
    ],
)
def test_load_validates_its_overrides_like_the_constructor(saved_offtrc: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OffTRC.load(saved_offtrc, **kwargs)


def test_a_zero_learning_rate_is_refused_when_training_but_freezes_a_loaded_model(saved_offtrc: str) -> None:
    """rl-zoo3's enjoy loads with learning_rate=0.0 (and PPO's clip_range=0.0) so that nothing trains."""
    with pytest.raises(ValueError, match="learning_rate"):
        OffTRC("MlpPolicy", CostLine(), learning_rate=0.0)
    model = OffTRC.load(saved_offtrc, custom_objects={"learning_rate": 0.0, "lr_schedule": lambda _: 0.0})
    assert model.lr_schedule(1.0) == 0.0


@pytest.mark.parametrize("algo", [SACLagrangian, PPOLagrangian])
def test_lagrangian_load_validates_its_overrides(algo: Any, tmp_path: Any) -> None:
    kwargs = TINY_SAC if algo is SACLagrangian else TINY_PPO
    path = str(tmp_path / "model.zip")
    algo("MlpPolicy", CostLine(), **kwargs).save(path)
    with pytest.raises(ValueError, match="gamma"):
        algo.load(path, gamma=1.0)
    with pytest.raises(ValueError, match="cost_limit"):
        algo.load(path, custom_objects={"cost_limit": -1.0})
    assert algo.load(path, cost_limit=0.5).cost_limit == 0.5


# ------------------------------------------------------------- items 8 and 9: cost values
BAD_COSTS = [("1.0", TypeError), (True, TypeError), (None, TypeError), ([1.0], TypeError), (-0.5, ValueError)]


@pytest.mark.parametrize(("cost", "error"), [*BAD_COSTS, (NAN, ValueError), (INF, ValueError)])
@pytest.mark.parametrize("algo", ["offtrc", "sac_lag", "ppo_lag"])
def test_bad_step_costs_are_refused_naming_the_info_key_and_value(algo: str, cost: Any, error: type) -> None:
    env = CostLine(cost=cost)
    if algo == "offtrc":
        model: Any = _offtrc(env)
    elif algo == "sac_lag":
        model = SACLagrangian("MlpPolicy", env, **TINY_SAC)
    else:
        model = PPOLagrangian("MlpPolicy", env, **TINY_PPO)
    shown = "nan" if cost is NAN else "inf" if cost is INF else repr(cost)
    with pytest.raises(error, match=r"info\['cost'\]") as caught:
        model.learn(40)
    message = str(caught.value)
    assert "info['cost']" in message and shown in message and "env index 0" in message


def test_a_huge_cost_stops_training_with_what_happened() -> None:
    model = _offtrc(CostLine(cost=1e30))
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(ValueError, match=r"not finite.*rescale"):
        model.learn(60)


def test_a_diverging_critic_stops_training(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _offtrc()
    # a fit that leaves a NaN in the cost critic, as an exploding gradient would
    fit = model._fit_critics

    def poisoned_fit(*args: Any, **kwargs: Any) -> None:
        next(model.policy.cost_critic.parameters()).data[0] = NAN
        fit(*args, **kwargs)

    monkeypatch.setattr(model, "_fit_critics", poisoned_fit)
    with pytest.raises(ValueError, match=r"cost_critic diverged"):
        model.learn(60)


@pytest.mark.parametrize(("cost", "error"), [*BAD_COSTS, (NAN, ValueError)])
def test_cost_monitor_refuses_bad_costs(cost: Any, error: type) -> None:
    from sb3_offtrc.common.monitor import CostMonitor

    env = CostMonitor(CostLine(cost=cost))
    env.reset(seed=0)
    with pytest.raises(error, match=r"CostMonitor.*info\['cost'\]"):
        env.step(np.zeros(1, np.float32))
    with_fn = CostMonitor(CostLine(cost=0.0), cost_fn=lambda obs, action, info: cost)
    with_fn.reset(seed=0)
    with pytest.raises(error, match=r"cost_fn"):
        with_fn.step(np.zeros(1, np.float32))


def test_nan_costs_and_flags_never_count_as_safe() -> None:
    from sb3_offtrc.common.evaluation import SafeEvalCallback, evaluate_safe_policy
    from sb3_offtrc.common.monitor import step_violation

    model = _offtrc()
    with pytest.raises(ValueError, match=r"evaluate_safe_policy: Non-finite cost nan"):
        evaluate_safe_policy(model, CostLine(cost=NAN), n_eval_episodes=1)
    with pytest.raises(ValueError, match="cost_limit"):
        evaluate_safe_policy(model, CostLine(), n_eval_episodes=1, cost_limit=NAN)
    with pytest.raises(ValueError, match="cost_limit"):
        SafeEvalCallback(CostLine(), cost_limit=NAN)
    with pytest.raises(ValueError, match="NaN"):
        step_violation(NAN, {})
    with pytest.raises(ValueError, match=r"info\['cv'\]"):
        step_violation(0.0, {"cv": NAN})
    # a real evaluation still works, and its violation rate is a number
    result = evaluate_safe_policy(model, CostLine(cost=1.0), n_eval_episodes=2, cost_limit=5.0)
    assert result.violation_rate == 1.0 and result.mean_cost == 20.0


# ----------------------------------------------------------------- item 7: observations
@pytest.mark.parametrize("bad_obs", [NAN, INF, -INF])
@pytest.mark.parametrize("at", [0, 3])  # the reset observation, and one returned by step()
def test_non_finite_observations_stop_collection(bad_obs: float, at: int) -> None:
    env = make_vec_env(lambda: CostLine(bad_obs_at=at, bad_obs=bad_obs), n_envs=2)
    model = _offtrc(env)
    with pytest.raises(ValueError, match=r"non-finite observation.*env step.*env index 0.*check_observations=False"):
        model.learn(20)
    assert model.replay_buffer.pos <= at  # nothing non-finite was stored
    assert np.isfinite(model.replay_buffer.observations).all()


def test_non_finite_terminal_observation_is_refused() -> None:
    model = _offtrc(CostLine(bad_obs_at=20))  # the last observation of each 20-step episode
    with pytest.raises(ValueError, match=r"non-finite observation \(the next observation\) at env step 20"):
        model.learn(40)


def test_predict_refuses_non_finite_observations_unless_told_not_to() -> None:
    model = _offtrc()
    good = np.array([0.1, 1.0], np.float32)
    bad = np.array([NAN, 1.0], np.float32)
    assert np.isfinite(model.predict(good)[0]).all()
    with pytest.raises(ValueError, match=r"non-finite observation given to predict\(\): component\(s\) \[0\]"):
        model.predict(bad)
    with pytest.raises(ValueError, match=r"from env index 1"):
        model.predict(np.stack([good, bad]))
    model.check_observations = False
    assert np.isnan(model.predict(bad, deterministic=True)[0]).all()
    with pytest.raises(TypeError, match="check_observations"):
        _offtrc(check_observations="yes")


# ----------------------------------------------------------------- item 10: Dict observations
class DictCostLine(CostLine):
    observation_space = spaces.Dict({"x": spaces.Box(-10.0, 10.0, (2,), np.float32)})  # type: ignore[assignment]


@pytest.mark.parametrize("policy", ["MlpPolicy", "MultiInputPolicy"])
def test_dict_observations_say_what_offtrc_supports(policy: str) -> None:
    with pytest.raises(ValueError, match=r"Box observation spaces only.*FlattenObservation") as caught:
        OffTRC(policy, DictCostLine())
    assert "Dict(" in str(caught.value) and "You must use" not in str(caught.value)
    with pytest.raises(ValueError, match="use 'MlpPolicy'"):
        OffTRC("MultiInputPolicy", CostLine())
