"""SB3 replay and rollout buffers that also keep the step cost.

Both read the cost themselves from ``info[cost_key]`` (replay buffer) or receive it from the
algorithm (rollout buffer); Dict observation spaces are not supported.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer, RolloutBuffer
from stable_baselines3.common.vec_env import VecNormalize

from sb3_offtrc.lagrangian.common import costs_from_infos


class CostReplayBufferSamples(NamedTuple):
    observations: th.Tensor
    actions: th.Tensor
    next_observations: th.Tensor
    dones: th.Tensor
    rewards: th.Tensor
    costs: th.Tensor
    # kept so that code written for SB3's ReplayBufferSamples (n-step discounts) reads the same
    discounts: th.Tensor | None = None


class CostRolloutBufferSamples(NamedTuple):
    observations: th.Tensor
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    old_cost_values: th.Tensor
    cost_advantages: th.Tensor
    cost_returns: th.Tensor


class LagrangianReplayBuffer(ReplayBuffer):
    """SB3 ``ReplayBuffer`` plus a ``costs`` array filled from ``info[cost_key]`` on ``add``.

    The cost is never normalised (VecNormalize only touches observations and rewards). Other
    parameters: see ``stable_baselines3.common.buffers.ReplayBuffer``.

    :param cost_key: info key of the step cost.
    """

    costs: np.ndarray

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        cost_key: str = "cost",
    ) -> None:
        if isinstance(observation_space, spaces.Dict):
            raise ValueError("LagrangianReplayBuffer does not support Dict observation spaces")
        super().__init__(
            buffer_size,
            observation_space,
            action_space,
            device=device,
            n_envs=n_envs,
            optimize_memory_usage=optimize_memory_usage,
            handle_timeout_termination=handle_timeout_termination,
        )
        self.cost_key = cost_key
        self.costs = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)

    def add(
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        # read the cost before super().add() advances self.pos
        self.costs[self.pos] = costs_from_infos(infos, self.cost_key, owner=type(self).__name__)
        super().add(obs, next_obs, action, reward, done, infos)

    def sample(self, batch_size: int, env: VecNormalize | None = None) -> CostReplayBufferSamples:  # type: ignore[override]
        samples = super().sample(batch_size, env=env)
        assert isinstance(samples, CostReplayBufferSamples)
        return samples

    def _get_samples(  # type: ignore[override]
        self, batch_inds: np.ndarray, env: VecNormalize | None = None
    ) -> CostReplayBufferSamples:
        # the parent draws its env indices internally; the costs must use the same ones, so the
        # whole sample is assembled here. The global numpy RNG is the one SB3's set_random_seed seeds.
        env_inds = np.random.randint(0, high=self.n_envs, size=(len(batch_inds),))  # noqa: NPY002
        if self.optimize_memory_usage:
            next_obs = self.observations[(batch_inds + 1) % self.buffer_size, env_inds, :]
        else:
            next_obs = self.next_observations[batch_inds, env_inds, :]
        # a time-out is not a termination: the critics bootstrap through it
        terminal = self.dones[batch_inds, env_inds] * (1 - self.timeouts[batch_inds, env_inds])
        data = (
            self._normalize_obs(self.observations[batch_inds, env_inds, :], env),
            self.actions[batch_inds, env_inds, :],
            self._normalize_obs(next_obs, env),
            terminal.reshape(-1, 1),
            self._normalize_reward(self.rewards[batch_inds, env_inds].reshape(-1, 1), env),
            self.costs[batch_inds, env_inds].reshape(-1, 1),
        )
        return CostReplayBufferSamples(*(self.to_torch(x) for x in data))  # type: ignore[arg-type]


def generalised_advantages(
    rewards: np.ndarray,
    values: np.ndarray,
    episode_starts: np.ndarray,
    last_values: np.ndarray,
    last_dones: np.ndarray,
    gamma: float,
    gae_lambda: float,
) -> np.ndarray:
    """GAE(lambda) over a ``(n_steps, n_envs)`` rollout, the same recursion SB3 uses for the reward.

    ``episode_starts[t]`` marks that step ``t`` begins a new episode, so the recursion is cut
    between ``t - 1`` and ``t``; ``last_dones`` does the same after the final step.
    """
    n_steps = rewards.shape[0]
    advantages = np.zeros_like(rewards, dtype=np.float32)
    running = np.zeros(rewards.shape[1], dtype=np.float32)
    for t in reversed(range(n_steps)):
        if t == n_steps - 1:
            not_done = 1.0 - last_dones.astype(np.float32)
            next_values = last_values
        else:
            not_done = 1.0 - episode_starts[t + 1]
            next_values = values[t + 1]
        delta = rewards[t] + gamma * next_values * not_done - values[t]
        running = delta + gamma * gae_lambda * not_done * running
        advantages[t] = running
    return advantages


class LagrangianRolloutBuffer(RolloutBuffer):
    """SB3 ``RolloutBuffer`` plus step costs, cost values and their own GAE advantages / returns.

    ``add`` takes the extra keyword arguments ``cost`` and ``cost_value``;
    ``compute_returns_and_advantage`` takes ``last_cost_values``.
    """

    costs: np.ndarray
    cost_values: np.ndarray
    cost_advantages: np.ndarray
    cost_returns: np.ndarray

    def reset(self) -> None:
        shape = (self.buffer_size, self.n_envs)
        self.costs = np.zeros(shape, dtype=np.float32)
        self.cost_values = np.zeros(shape, dtype=np.float32)
        self.cost_advantages = np.zeros(shape, dtype=np.float32)
        self.cost_returns = np.zeros(shape, dtype=np.float32)
        super().reset()

    def add(  # type: ignore[override]
        self,
        obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        episode_start: np.ndarray,
        value: th.Tensor,
        log_prob: th.Tensor,
        *,
        cost: np.ndarray,
        cost_value: th.Tensor,
    ) -> None:
        # written before super().add() advances self.pos
        self.costs[self.pos] = np.asarray(cost, dtype=np.float32)
        self.cost_values[self.pos] = cost_value.clone().cpu().numpy().flatten()
        super().add(obs, action, reward, episode_start, value, log_prob)

    def compute_returns_and_advantage(  # type: ignore[override]
        self, last_values: th.Tensor, dones: np.ndarray, last_cost_values: th.Tensor | None = None
    ) -> None:
        super().compute_returns_and_advantage(last_values, dones)
        if last_cost_values is None:
            raise ValueError("LagrangianRolloutBuffer needs last_cost_values to compute the cost advantages")
        self.cost_advantages = generalised_advantages(
            self.costs,
            self.cost_values,
            self.episode_starts,
            last_cost_values.clone().cpu().numpy().flatten(),
            dones,
            self.gamma,
            self.gae_lambda,
        )
        self.cost_returns = self.cost_advantages + self.cost_values

    def get(  # type: ignore[override]
        self, batch_size: int | None = None
    ) -> Generator[CostRolloutBufferSamples, None, None]:
        assert self.full, "the rollout buffer is not full yet"
        if not self.generator_ready:
            for name in (
                "observations",
                "actions",
                "values",
                "log_probs",
                "advantages",
                "returns",
                "cost_values",
                "cost_advantages",
                "cost_returns",
            ):
                self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])
            self.generator_ready = True
        total = self.buffer_size * self.n_envs
        if batch_size is None:
            batch_size = total
        indices = np.random.permutation(total)  # noqa: NPY002 (seeded by SB3's set_random_seed)
        for start in range(0, total, batch_size):
            yield self._get_samples(indices[start : start + batch_size])

    def _get_samples(  # type: ignore[override]
        self, batch_inds: np.ndarray, env: VecNormalize | None = None
    ) -> CostRolloutBufferSamples:
        data = (
            self.observations[batch_inds],
            self.actions[batch_inds].astype(np.float32, copy=False),
            self.values[batch_inds].flatten(),
            self.log_probs[batch_inds].flatten(),
            self.advantages[batch_inds].flatten(),
            self.returns[batch_inds].flatten(),
            self.cost_values[batch_inds].flatten(),
            self.cost_advantages[batch_inds].flatten(),
            self.cost_returns[batch_inds].flatten(),
        )
        return CostRolloutBufferSamples(*(self.to_torch(x) for x in data))
