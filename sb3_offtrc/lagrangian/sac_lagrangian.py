"""SAC-Lagrangian: SAC with a cost Q-critic and a learned Lagrange multiplier on the expected cost."""

from __future__ import annotations

import io
import pathlib
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from stable_baselines3 import SAC
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.policies import BasePolicy, ContinuousCritic
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import polyak_update
from torch.nn import functional as F

from sb3_offtrc.common.replay_buffer_io import check_loaded_replay_buffer
from sb3_offtrc.cost_signal import CostReturnLimitMixin, resolve_env_string
from sb3_offtrc.lagrangian.buffers import LagrangianReplayBuffer
from sb3_offtrc.lagrangian.common import EpisodeCostTracker, LagrangeMultiplier, costs_from_infos
from sb3_offtrc.lagrangian.policies import SACLagrangianPolicy
from sb3_offtrc.validation import check_float, check_int, check_lagrangian, check_schedule

SelfSACLagrangian = TypeVar("SelfSACLagrangian", bound="SACLagrangian")


class SACLagrangian(CostReturnLimitMixin, SAC):
    """
    SAC-Lagrangian: Soft Actor-Critic for a constrained MDP, ``max J_R  s.t.  J_C <= d / (1 - gamma)``.

    Besides SAC's reward critics it learns a cost critic ``Q_C(s, a)`` (an ensemble of
    ``n_critics`` members, targets ``c + gamma (1 - terminated) mean_i Q_C,i^targ(s', a')``, no
    entropy term) and a multiplier ``lambda >= 0`` (:class:`LagrangeMultiplier`). Per gradient step:

    1. ``lambda`` takes one projected Adam ascent step on ``lambda (J_C - D)``, with
       ``J_C = mean over the batch of Q_C(s, a ~ pi(s))`` (the critic's cost-return estimate
       under the current policy) and ``D = cost_limit / (1 - gamma)``;
    2. the actor minimises ``alpha log pi(a|s) - (min_i Q_R,i(s, a) - lambda Q_C(s, a)) / (1 + lambda)``
       with ``a ~ pi(s)``. Dividing the penalised objective by ``1 + lambda`` keeps its scale
       bounded as ``lambda`` grows, so the entropy term and the learning rate keep their meaning.

    The step cost is read from ``info[cost_key]`` and stored in the replay buffer unnormalised.
    Only ``MlpPolicy`` with Box observations is supported; n-step returns are not.

    :param cost_limit: per-step cost limit ``d`` (the constraint is on the discounted cost return,
        ``D = d / (1 - gamma)``; 0.025 is OffTRC's default).
    :param cost_key: info key that carries the step cost.
    :param lagrangian_lr: Adam learning rate of the multiplier.
    :param initial_lagrange: starting value of the multiplier.
    :param max_lagrange: optional upper bound on the multiplier.

    Other parameters: see :class:`stable_baselines3.SAC`.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"MlpPolicy": SACLagrangianPolicy}
    policy: SACLagrangianPolicy
    cost_critic: ContinuousCritic
    cost_critic_target: ContinuousCritic
    replay_buffer: LagrangianReplayBuffer  # type: ignore[assignment]
    lagrange: LagrangeMultiplier

    def __init__(
        self,
        policy: str | type[SACLagrangianPolicy],
        env: GymEnv | str,
        cost_limit: float = 0.025,
        cost_key: str = "cost",
        lagrangian_lr: float = 3e-4,
        initial_lagrange: float = 0.0,
        max_lagrange: float | None = None,
        learning_rate: float | Schedule = 3e-4,
        buffer_size: int = 1_000_000,
        learning_starts: int = 100,
        batch_size: int = 256,
        tau: float = 0.005,
        gamma: float = 0.99,
        train_freq: int | tuple[int, str] = 1,
        gradient_steps: int = 1,
        action_noise: ActionNoise | None = None,
        replay_buffer_class: type[ReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        optimize_memory_usage: bool = False,
        ent_coef: str | float = "auto",
        target_update_interval: int = 1,
        target_entropy: str | float = "auto",
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        use_sde_at_warmup: bool = False,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        if replay_buffer_class is None:
            replay_buffer_class = LagrangianReplayBuffer
        if not issubclass(replay_buffer_class, LagrangianReplayBuffer):
            raise ValueError("SACLagrangian needs a replay buffer that stores costs (a LagrangianReplayBuffer)")
        replay_buffer_kwargs = {"cost_key": cost_key, **(replay_buffer_kwargs or {})}
        self.cost_limit = cost_limit
        self.cost_key = cost_key
        self.lagrangian_lr = lagrangian_lr
        self.initial_lagrange = initial_lagrange
        self.max_lagrange = max_lagrange
        check_lagrangian(type(self).__name__, self)
        super().__init__(
            policy,
            resolve_env_string(env),
            learning_rate=learning_rate,
            buffer_size=buffer_size,
            learning_starts=learning_starts,
            batch_size=batch_size,
            tau=tau,
            gamma=gamma,
            train_freq=train_freq,
            gradient_steps=gradient_steps,
            action_noise=action_noise,
            replay_buffer_class=replay_buffer_class,
            replay_buffer_kwargs=replay_buffer_kwargs,
            optimize_memory_usage=optimize_memory_usage,
            n_steps=1,
            ent_coef=ent_coef,
            target_update_interval=target_update_interval,
            target_entropy=target_entropy,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            use_sde_at_warmup=use_sde_at_warmup,
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
        check_schedule(owner, "learning_rate", self.learning_rate, allow_zero=after_load)
        for name, minimum in (("buffer_size", 1), ("learning_starts", 0), ("batch_size", 1)):
            setattr(self, name, check_int(owner, name, getattr(self, name), minimum))
        self.target_update_interval = check_int(owner, "target_update_interval", self.target_update_interval)
        self.gradient_steps = check_int(owner, "gradient_steps", self.gradient_steps, -1)  # -1: as many as steps
        check_float(owner, "tau", self.tau, 0.0, 1.0, low_open=True)
        if not isinstance(self.ent_coef, str):  # "auto" / "auto_<initial value>" are SAC's own
            check_float(owner, "ent_coef", self.ent_coef, 0.0, low_open=True, hint="or 'auto'")

    def _setup_model(self) -> None:
        # also after load(), where a rate of 0 (rl-zoo3's enjoy) freezes the model; __init__ then
        # checks strictly
        self._check_hyperparameters(after_load=True)
        super()._setup_model()
        self.lagrange = LagrangeMultiplier(
            self.initial_lagrange, lr=self.lagrangian_lr, max_value=self.max_lagrange, device=self.device
        )
        self._cost_tracker = EpisodeCostTracker(self.n_envs, self._stats_window_size)

    def _create_aliases(self) -> None:
        super()._create_aliases()
        self.cost_critic = self.policy.cost_critic
        self.cost_critic_target = self.policy.cost_critic_target

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: np.ndarray | None = None) -> None:
        super()._update_info_buffer(infos, dones)
        costs = costs_from_infos(infos, self.cost_key, owner=type(self).__name__, env_step=self.num_timesteps)
        self._cost_tracker.update(costs, np.zeros(len(infos), dtype=bool) if dones is None else dones)

    def dump_logs(self) -> None:
        ep_cost = self._cost_tracker.mean()
        if ep_cost is not None:
            self.logger.record("rollout/ep_cost_mean", ep_cost)
        super().dump_logs()

    def train(self, gradient_steps: int, batch_size: int = 64) -> None:
        self.policy.set_training_mode(True)
        optimizers = [self.actor.optimizer, self.critic.optimizer, self.cost_critic.optimizer]
        if self.ent_coef_optimizer is not None:
            optimizers.append(self.ent_coef_optimizer)
        self._update_learning_rate(optimizers)

        ent_coef_losses, ent_coefs = [], []
        actor_losses, critic_losses, cost_critic_losses = [], [], []
        cost_estimates, multipliers = [], []

        for gradient_step in range(gradient_steps):
            data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]

            if self.use_sde:
                self.actor.reset_noise()
            actions_pi, log_prob = self.actor.action_log_prob(data.observations)
            log_prob = log_prob.reshape(-1, 1)

            # entropy temperature, exactly as SAC
            ent_coef_loss = None
            if self.ent_coef_optimizer is not None and self.log_ent_coef is not None:
                ent_coef = th.exp(self.log_ent_coef.detach())
                assert isinstance(self.target_entropy, float)
                ent_coef_loss = -(self.log_ent_coef * (log_prob + self.target_entropy).detach()).mean()
                ent_coef_losses.append(ent_coef_loss.item())
                self.ent_coef_optimizer.zero_grad()
                ent_coef_loss.backward()
                self.ent_coef_optimizer.step()
            else:
                ent_coef = self.ent_coef_tensor
            ent_coefs.append(ent_coef.item())

            with th.no_grad():
                next_actions, next_log_prob = self.actor.action_log_prob(data.next_observations)
                not_terminal = 1.0 - data.dones
                next_q = th.cat(self.critic_target(data.next_observations, next_actions), dim=1)
                next_q = th.min(next_q, dim=1, keepdim=True)[0] - ent_coef * next_log_prob.reshape(-1, 1)
                target_q = data.rewards + not_terminal * self.gamma * next_q
                # the cost return carries no entropy bonus; the ensemble mean avoids the compounding
                # bias a min (optimistic) or max (pessimistic) target would add to the constraint
                next_qc = th.cat(self.cost_critic_target(data.next_observations, next_actions), dim=1)
                target_qc = data.costs + not_terminal * self.gamma * next_qc.mean(dim=1, keepdim=True)

            current_q = self.critic(data.observations, data.actions)
            critic_loss = 0.5 * sum(F.mse_loss(q, target_q) for q in current_q)
            assert isinstance(critic_loss, th.Tensor)
            critic_losses.append(critic_loss.item())
            self.critic.optimizer.zero_grad()
            critic_loss.backward()
            self.critic.optimizer.step()

            current_qc = self.cost_critic(data.observations, data.actions)
            cost_critic_loss = 0.5 * sum(F.mse_loss(qc, target_qc) for qc in current_qc)
            assert isinstance(cost_critic_loss, th.Tensor)
            cost_critic_losses.append(cost_critic_loss.item())
            self.cost_critic.optimizer.zero_grad()
            cost_critic_loss.backward()
            self.cost_critic.optimizer.step()

            qc_pi = th.cat(self.cost_critic(data.observations, actions_pi), dim=1).mean(dim=1, keepdim=True)
            cost_estimate = qc_pi.mean().item()
            multiplier = self.lagrange.update(cost_estimate, self.cost_return_limit)
            cost_estimates.append(cost_estimate)
            multipliers.append(multiplier)

            q_pi = th.min(th.cat(self.critic(data.observations, actions_pi), dim=1), dim=1, keepdim=True)[0]
            penalised = (q_pi - multiplier * qc_pi) / (1.0 + multiplier)
            actor_loss = (ent_coef * log_prob - penalised).mean()
            actor_losses.append(actor_loss.item())
            self.actor.optimizer.zero_grad()
            actor_loss.backward()
            self.actor.optimizer.step()

            if gradient_step % self.target_update_interval == 0:
                polyak_update(self.critic.parameters(), self.critic_target.parameters(), self.tau)
                polyak_update(self.cost_critic.parameters(), self.cost_critic_target.parameters(), self.tau)
                polyak_update(self.batch_norm_stats, self.batch_norm_stats_target, 1.0)

        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/ent_coef", np.mean(ent_coefs))
        self.logger.record("train/actor_loss", np.mean(actor_losses))
        self.logger.record("train/critic_loss", np.mean(critic_losses))
        self.logger.record("train/cost_critic_loss", np.mean(cost_critic_losses))
        self.logger.record("train/cost_return_estimate", np.mean(cost_estimates))
        self.logger.record("train/lagrange_multiplier", self.lagrange.value)
        if len(ent_coef_losses) > 0:
            self.logger.record("train/ent_coef_loss", np.mean(ent_coef_losses))

    def learn(
        self: SelfSACLagrangian,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "SACLagrangian",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfSACLagrangian:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    def load_replay_buffer(self, path: str | pathlib.Path | io.BufferedIOBase, truncate_last_traj: bool = True) -> None:
        """SB3's ``load_replay_buffer``, which unpickles ``path`` (load only files you trust); a buffer that
        does not fit this model (class, number of env copies, spaces) is refused with a ``ValueError``."""
        previous = self.replay_buffer
        super().load_replay_buffer(path, truncate_last_traj)
        check_loaded_replay_buffer(self, path, previous)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "cost_critic", "cost_critic_target", "_cost_tracker"]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, variables = super()._get_torch_save_params()
        return [*state_dicts, "cost_critic.optimizer", "lagrange", "lagrange.optimizer"], variables
