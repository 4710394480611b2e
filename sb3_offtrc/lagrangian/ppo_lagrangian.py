"""PPO-Lagrangian: PPO with a cost value network, cost GAE and a learned Lagrange multiplier."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import explained_variance, obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch.nn import functional as F

from sb3_offtrc.cost_signal import CostReturnLimitMixin, resolve_env_string
from sb3_offtrc.lagrangian.buffers import LagrangianRolloutBuffer
from sb3_offtrc.lagrangian.common import EpisodeCostTracker, LagrangeMultiplier, costs_from_infos
from sb3_offtrc.lagrangian.policies import PPOLagrangianPolicy
from sb3_offtrc.validation import check_float, check_int, check_lagrangian, check_schedule

SelfPPOLagrangian = TypeVar("SelfPPOLagrangian", bound="PPOLagrangian")


class PPOLagrangian(CostReturnLimitMixin, PPO):
    """
    PPO-Lagrangian: PPO for a constrained MDP, ``max J_R  s.t.  J_C <= d / (1 - gamma)``.

    Each rollout also records the step cost ``info[cost_key]`` and a cost value ``V_C(s)``
    (:class:`PPOLagrangianPolicy`); cost advantages and returns come from their own GAE(lambda)
    with the same ``gamma`` / ``gae_lambda``, bootstrapping through time-outs as SB3 does for the
    reward. Once per rollout, before the policy epochs, the multiplier ``lambda >= 0``
    (:class:`LagrangeMultiplier`) takes one projected Adam ascent step on ``lambda (J_C - D)`` with
    the on-policy estimate ``J_C = (mean step cost of the rollout) / (1 - gamma)`` (the estimate
    OffTRC uses for its constant term) and ``D = cost_limit / (1 - gamma)``. The clipped surrogate
    then uses the advantage

        A = (A_R - lambda A_C) / (1 + lambda)

    where, with ``normalize_advantage``, ``A_R`` and ``A_C`` are each standardised per minibatch
    (so ``lambda`` weighs two unit-scale signals; the ``1 + lambda`` keeps the result unit-scale).
    The cost value loss is added to the loss with weight ``vf_coef`` like the reward value loss.

    :param cost_limit: per-step cost limit ``d`` (constraint on the discounted cost return
        ``D = d / (1 - gamma)``; 0.025 is OffTRC's default).
    :param cost_key: info key that carries the step cost.
    :param lagrangian_lr: Adam learning rate of the multiplier (one step per rollout).
    :param initial_lagrange: starting value of the multiplier.
    :param max_lagrange: optional upper bound on the multiplier.

    Other parameters: see :class:`stable_baselines3.PPO`. Box observations only.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"MlpPolicy": PPOLagrangianPolicy}
    policy: PPOLagrangianPolicy
    rollout_buffer: LagrangianRolloutBuffer
    lagrange: LagrangeMultiplier

    def __init__(
        self,
        policy: str | type[PPOLagrangianPolicy],
        env: GymEnv | str,
        cost_limit: float = 0.025,
        cost_key: str = "cost",
        lagrangian_lr: float = 0.05,
        initial_lagrange: float = 0.0,
        max_lagrange: float | None = None,
        learning_rate: float | Schedule = 3e-4,
        n_steps: int = 2048,
        batch_size: int = 64,
        n_epochs: int = 10,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_range: float | Schedule = 0.2,
        clip_range_vf: float | Schedule | None = None,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        target_kl: float | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        if rollout_buffer_class is None:
            rollout_buffer_class = LagrangianRolloutBuffer
        if not issubclass(rollout_buffer_class, LagrangianRolloutBuffer):
            raise ValueError("PPOLagrangian needs a rollout buffer with costs (a LagrangianRolloutBuffer subclass)")
        self.cost_limit = cost_limit
        self.cost_key = cost_key
        self.lagrangian_lr = lagrangian_lr
        self.initial_lagrange = initial_lagrange
        self.max_lagrange = max_lagrange
        check_lagrangian(type(self).__name__, self)
        # before PPO's own asserts on these two
        check_int(type(self).__name__, "n_steps", n_steps)
        check_int(type(self).__name__, "batch_size", batch_size)
        super().__init__(
            policy,
            resolve_env_string(env),
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            n_epochs=n_epochs,
            gamma=gamma,
            gae_lambda=gae_lambda,
            clip_range=clip_range,
            clip_range_vf=clip_range_vf,
            normalize_advantage=normalize_advantage,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            target_kl=target_kl,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
        )
        if _init_setup_model:
            self._check_hyperparameters()

    def _check_hyperparameters(self, after_load: bool = False) -> None:
        """Range checks of the arguments, each error naming its argument (also after ``load``)."""
        owner = type(self).__name__
        check_lagrangian(owner, self)
        # D = cost_limit / (1 - gamma) needs gamma < 1
        check_float(owner, "gamma", self.gamma, 0.0, 1.0, low_open=True, high_open=True)
        check_float(owner, "gae_lambda", self.gae_lambda, 0.0, 1.0)
        check_schedule(owner, "learning_rate", self.learning_rate, allow_zero=after_load)
        for name in ("n_steps", "batch_size", "n_epochs"):
            setattr(self, name, check_int(owner, name, getattr(self, name)))
        check_schedule(owner, "clip_range", self.clip_range, allow_zero=after_load)
        if self.clip_range_vf is not None:
            check_schedule(owner, "clip_range_vf", self.clip_range_vf, allow_zero=after_load)
        check_float(owner, "ent_coef", self.ent_coef)
        check_float(owner, "vf_coef", self.vf_coef, 0.0)
        check_float(owner, "max_grad_norm", self.max_grad_norm, 0.0, low_open=True)
        if self.target_kl is not None:
            check_float(owner, "target_kl", self.target_kl, 0.0, low_open=True, hint="or None for no early stop")

    def _setup_model(self) -> None:
        # also after load(), where a rate of 0 (rl-zoo3's enjoy) freezes the model; __init__ then
        # checks strictly
        self._check_hyperparameters(after_load=True)
        super()._setup_model()
        self.lagrange = LagrangeMultiplier(
            self.initial_lagrange, lr=self.lagrangian_lr, max_value=self.max_lagrange, device=self.device
        )
        self._cost_tracker = EpisodeCostTracker(self.n_envs, self._stats_window_size)
        self._last_costs = np.zeros(self.n_envs, dtype=np.float32)
        self._rollout_mean_step_cost = 0.0

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: np.ndarray | None = None) -> None:
        super()._update_info_buffer(infos, dones)
        self._last_costs = costs_from_infos(
            infos, self.cost_key, owner=type(self).__name__, env_step=self.num_timesteps
        )
        self._cost_tracker.update(self._last_costs, np.zeros(len(infos), dtype=bool) if dones is None else dones)

    def dump_logs(self, iteration: int = 0) -> None:
        ep_cost = self._cost_tracker.mean()
        if ep_cost is not None:
            self.logger.record("rollout/ep_cost_mean", ep_cost)
        super().dump_logs(iteration)

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """SB3's on-policy collection loop, also recording ``info[cost_key]`` and ``V_C(s)``."""
        assert isinstance(rollout_buffer, LagrangianRolloutBuffer)
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        if self.use_sde:
            self.policy.reset_noise(env.num_envs)
        callback.on_rollout_start()

        n_steps = 0
        cost_sum = 0.0
        while n_steps < n_rollout_steps:
            if self.use_sde and self.sde_sample_freq > 0 and n_steps % self.sde_sample_freq == 0:
                self.policy.reset_noise(env.num_envs)

            with th.no_grad():
                obs_tensor = obs_as_tensor(self._last_obs, self.device)  # type: ignore[arg-type]
                actions_t, values, log_probs = self.policy(obs_tensor)
                cost_values = self.policy.predict_cost_values(obs_tensor)
            actions = actions_t.cpu().numpy()

            env_actions = actions
            if isinstance(self.action_space, spaces.Box):
                if self.policy.squash_output:
                    env_actions = self.policy.unscale_action(env_actions)
                else:
                    env_actions = np.clip(actions, self.action_space.low, self.action_space.high)

            new_obs, rewards, dones, infos = env.step(env_actions)
            self.num_timesteps += env.num_envs

            callback.update_locals(locals())
            if not callback.on_step():
                return False

            # reads the costs into self._last_costs (and raises if the env does not report them)
            self._update_info_buffer(infos, dones)
            costs = self._last_costs.copy()
            cost_sum += float(costs.sum())
            n_steps += 1

            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)

            # a time-out is not a termination: bootstrap the reward (SB3 GH#633) and the cost with
            # their critics at the true final observation
            for idx, done in enumerate(dones):
                terminal_obs = infos[idx].get("terminal_observation")
                if done and terminal_obs is not None and infos[idx].get("TimeLimit.truncated", False):
                    obs_t = self.policy.obs_to_tensor(terminal_obs)[0]
                    with th.no_grad():
                        rewards[idx] += self.gamma * self.policy.predict_values(obs_t).item()
                        costs[idx] += self.gamma * self.policy.predict_cost_values(obs_t).item()

            rollout_buffer.add(
                self._last_obs,  # type: ignore[arg-type]
                actions,
                rewards,
                self._last_episode_starts,  # type: ignore[arg-type]
                values,
                log_probs,
                cost=costs,
                cost_value=cost_values,
            )
            self._last_obs = new_obs  # type: ignore[assignment]
            self._last_episode_starts = dones

        self._rollout_mean_step_cost = cost_sum / (n_steps * env.num_envs)
        with th.no_grad():
            new_obs_tensor = obs_as_tensor(new_obs, self.device)  # type: ignore[arg-type]
            values = self.policy.predict_values(new_obs_tensor)
            cost_values = self.policy.predict_cost_values(new_obs_tensor)
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones, last_cost_values=cost_values)

        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def train(self) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        clip_range_vf = None
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]

        # the rollout was generated by the current policy, so its mean step cost is an on-policy
        # estimate of J_C (1 - gamma); the multiplier moves before the policy does
        cost_estimate = self._rollout_mean_step_cost / (1.0 - self.gamma)
        multiplier = self.lagrange.update(cost_estimate, self.cost_return_limit)

        entropy_losses, pg_losses, value_losses, cost_value_losses, clip_fractions = [], [], [], [], []
        approx_kl_divs: list[float] = []
        continue_training = True
        loss = th.zeros(())
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for data in self.rollout_buffer.get(self.batch_size):
                actions = data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    actions = data.actions.long().flatten()

                values, log_prob, entropy = self.policy.evaluate_actions(data.observations, actions)
                values = values.flatten()
                cost_values = self.policy.predict_cost_values(data.observations).flatten()

                advantages = data.advantages
                cost_advantages = data.cost_advantages
                if self.normalize_advantage and len(advantages) > 1:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                    cost_advantages = (cost_advantages - cost_advantages.mean()) / (cost_advantages.std() + 1e-8)
                # the cost is to be lowered, so its advantage enters with a minus sign
                advantages = (advantages - multiplier * cost_advantages) / (1.0 + multiplier)

                ratio = th.exp(log_prob - data.old_log_prob)
                surrogate = th.min(advantages * ratio, advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range))
                policy_loss = -surrogate.mean()
                pg_losses.append(policy_loss.item())
                clip_fractions.append(th.mean((th.abs(ratio - 1) > clip_range).float()).item())

                if clip_range_vf is None:
                    values_pred, cost_values_pred = values, cost_values
                else:
                    values_pred = data.old_values + th.clamp(values - data.old_values, -clip_range_vf, clip_range_vf)
                    cost_values_pred = data.old_cost_values + th.clamp(
                        cost_values - data.old_cost_values, -clip_range_vf, clip_range_vf
                    )
                value_loss = F.mse_loss(data.returns, values_pred)
                cost_value_loss = F.mse_loss(data.cost_returns, cost_values_pred)
                value_losses.append(value_loss.item())
                cost_value_losses.append(cost_value_loss.item())

                entropy_loss = -th.mean(-log_prob) if entropy is None else -th.mean(entropy)
                entropy_losses.append(entropy_loss.item())

                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * (value_loss + cost_value_loss)

                with th.no_grad():
                    log_ratio = log_prob - data.old_log_prob
                    approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio).item()
                    approx_kl_divs.append(approx_kl_div)
                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl_div:.2f}")
                    break

                self.policy.optimizer.zero_grad()
                loss.backward()
                th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()

            self._n_updates += 1
            if not continue_training:
                break

        buf = self.rollout_buffer
        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/cost_critic_loss", np.mean(cost_value_losses))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_variance(buf.values.flatten(), buf.returns.flatten()))
        self.logger.record(
            "train/cost_explained_variance",
            explained_variance(buf.cost_values.flatten(), buf.cost_returns.flatten()),
        )
        self.logger.record("train/cost_return_estimate", cost_estimate)
        self.logger.record("train/lagrange_multiplier", multiplier)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)

    def learn(
        self: SelfPPOLagrangian,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "PPOLagrangian",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfPPOLagrangian:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_cost_tracker", "_last_costs"]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, variables = super()._get_torch_save_params()
        return [*state_dicts, "lagrange", "lagrange.optimizer"], variables
