"""Cost- and behaviour-aware replay buffer serving contiguous windows (ALGORITHM.md §2, §3.1)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env import VecNormalize


class WindowBatch(NamedTuple):
    """Transitions of all windows laid end to end along dim 0 (torch tensors on the buffer device).

    ``cuts`` is 1 where the backward recursion must stop: at an episode end or at the last row of a
    window. ``recent`` is 1 on rows of the recent windows (used for the §3.4 constants).
    """

    observations: th.Tensor
    actions: th.Tensor  # unclipped Gaussian samples in [-1, 1] units
    next_observations: th.Tensor
    rewards: th.Tensor
    costs: th.Tensor
    cuts: th.Tensor
    fails: th.Tensor
    behaviour_mean: th.Tensor
    behaviour_std: th.Tensor
    recent: th.Tensor
    n_recent_rows: int  # rows per env copy in the recent window


class CostReplayBuffer(ReplayBuffer):
    """SB3 ``ReplayBuffer`` that also stores the step cost, the done/fail flags and the mean and std
    of the behaviour policy, per env copy in time order.

    ``add`` takes the extra arrays as keyword arguments; ``sample_windows`` returns, for each env copy,
    the most recent window and one contiguous window starting at a uniformly random older position.
    ``sample`` (uniform single transitions) still works for other uses.
    """

    costs: np.ndarray
    fails: np.ndarray
    behaviour_mean: np.ndarray
    behaviour_std: np.ndarray

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
    ) -> None:
        if optimize_memory_usage:
            raise ValueError("CostReplayBuffer keeps next observations explicitly; use optimize_memory_usage=False")
        if not isinstance(action_space, spaces.Box):
            raise ValueError(f"CostReplayBuffer needs a Box action space, got {action_space}")
        super().__init__(
            buffer_size, observation_space, action_space, device, n_envs, False, handle_timeout_termination
        )
        # Gaussian samples are stored unclipped and in float32 whatever the env's action dtype.
        self.actions = np.zeros((self.buffer_size, self.n_envs, self.action_dim), dtype=np.float32)
        self.costs = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)
        self.fails = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)
        self.behaviour_mean = np.zeros((self.buffer_size, self.n_envs, self.action_dim), dtype=np.float32)
        self.behaviour_std = np.ones((self.buffer_size, self.n_envs, self.action_dim), dtype=np.float32)

    def add(  # type: ignore[override]
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
        *,
        cost: np.ndarray | None = None,
        behaviour_mean: np.ndarray | None = None,
        behaviour_std: np.ndarray | None = None,
    ) -> None:
        if cost is None or behaviour_mean is None or behaviour_std is None:
            raise ValueError(
                "CostReplayBuffer.add needs cost=, behaviour_mean= and behaviour_std=; it is filled by OffTRC, "
                "which records the behaviour policy of every transition"
            )
        pos = self.pos
        self.costs[pos] = np.asarray(cost, dtype=np.float32).reshape(self.n_envs)
        self.behaviour_mean[pos] = np.asarray(behaviour_mean).reshape(self.n_envs, self.action_dim)
        self.behaviour_std[pos] = np.asarray(behaviour_std).reshape(self.n_envs, self.action_dim)
        timeouts = np.array([info.get("TimeLimit.truncated", False) for info in infos], dtype=np.float32)
        self.fails[pos] = np.asarray(done, dtype=np.float32) * (1.0 - timeouts)
        super().add(obs, next_obs, action, reward, done, infos)

    def n_rows(self) -> int:
        """Rows (time steps per env copy) currently stored."""
        return self.buffer_size if self.full else self.pos

    def mark_last_as_truncated(self) -> None:
        """End the stored trajectories without termination, e.g. before the env is reset by ``learn``."""
        if self.n_rows() == 0:
            return
        last = (self.pos - 1) % self.buffer_size
        self.dones[last] = 1.0
        self.timeouts[last] = 1.0 - self.fails[last]

    def sample_windows(
        self,
        n_recent_rows: int,
        n_old_rows: int,
        env: VecNormalize | None = None,
    ) -> WindowBatch:
        """Recent window (``n_recent_rows`` per env copy) plus one random older window per env copy.

        Older windows lie entirely before the recent one (in time order, wrapping around the
        circular storage); while the buffer is short they are shortened to what is there.
        """
        rows = self.n_rows()
        if rows == 0:
            raise RuntimeError("The replay buffer is empty: collect transitions before training")
        recent_len = min(n_recent_rows, rows)
        old_len = min(n_old_rows, rows - recent_len)
        oldest = self.pos if self.full else 0  # physical index of the oldest row
        # chronological offsets (0 = oldest) -> physical rows
        recent_offsets = np.arange(rows - recent_len, rows)
        offset_lists = []
        for _ in range(self.n_envs):
            parts = [recent_offsets]
            if old_len > 0:
                # np.random is seeded by SB3's set_random_seed, so a seed fixes the windows
                start = np.random.randint(0, rows - recent_len - old_len + 1)  # noqa: NPY002
                parts.append(np.arange(start, start + old_len))
            offset_lists.append(np.concatenate(parts))
        env_idx = np.concatenate([np.full(len(offs), i) for i, offs in enumerate(offset_lists)])
        phys = (oldest + np.concatenate(offset_lists)) % self.buffer_size
        window_end = np.zeros(len(phys), dtype=np.float32)
        recent = np.zeros(len(phys), dtype=np.float32)
        cursor = 0
        for offs in offset_lists:
            recent[cursor : cursor + recent_len] = 1.0
            window_end[cursor + recent_len - 1] = 1.0
            window_end[cursor + len(offs) - 1] = 1.0
            cursor += len(offs)

        cuts = np.maximum(self.dones[phys, env_idx], window_end)
        data = (
            self._normalize_obs(self.observations[phys, env_idx], env),
            self.actions[phys, env_idx],
            self._normalize_obs(self.next_observations[phys, env_idx], env),
            self._normalize_reward(self.rewards[phys, env_idx], env),
            self.costs[phys, env_idx],
            cuts,
            self.fails[phys, env_idx],
            self.behaviour_mean[phys, env_idx],
            self.behaviour_std[phys, env_idx],
            recent,
        )
        tensors = [self.to_torch(np.asarray(x, dtype=np.float32)) for x in data]
        return WindowBatch._make([*tensors, recent_len])
