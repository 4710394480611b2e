"""Per-episode cost bookkeeping for any SB3 algorithm.

:class:`CostMonitor` is a gymnasium wrapper that sums the step cost (``info[cost_key]``, or a
user ``cost_fn``) and counts constraint violations over each episode. At episode end it adds
``c`` (cost sum) and ``cv`` (violation count) to ``info["episode"]``, next to SB3's ``r``, ``l``
and ``t``; when no :class:`~stable_baselines3.common.monitor.Monitor` is below it, it creates
``info["episode"]`` itself (with ``r``, ``l``, ``t`` too), so it can also be used alone.

Wrapping order: put CostMonitor *outside* SB3's Monitor, which is what
``make_vec_env(env_id, wrapper_class=CostMonitor)`` and :func:`make_cost_vec_env` do. A Monitor
outside a CostMonitor rebuilds ``info["episode"]`` and drops ``c``/``cv``; for that order
CostMonitor also sets ``info["episode_cost"]`` / ``info["episode_cv"]`` at episode end, which
:class:`CostLoggerCallback` reads and ``Monitor(env, info_keywords=EPISODE_INFO_KEYWORDS)``
writes as extra columns of its own CSV.

CSV: with ``filename`` set, CostMonitor writes its own file ``<filename>.costs.csv`` (a JSON
header line like Monitor's, then columns ``r,l,t,c,cv``). It is a separate file because SB3's
Monitor writes its row before the wrapper above it sees the step; the suffix is chosen so that
SB3's ``load_results`` (which globs ``*monitor.csv``) does not pick it up. Read these files
with :func:`load_cost_results`.

:class:`CostLoggerCallback` turns the episode costs into ``rollout/ep_cost_mean`` and
``rollout/ep_cv_mean`` in the algorithm's logger.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, SupportsFloat

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from sb3_offtrc.cost_signal import check_cost

if TYPE_CHECKING:
    import pandas

CostFn = Callable[[Any, Any, dict[str, Any]], float]
ViolationFn = Callable[[float, dict[str, Any]], bool]

#: info keys read as a per-step violation flag when present (first match wins)
DEFAULT_VIOLATION_KEYS = ("cv", "violation")
#: flat episode-end info keys set by CostMonitor (for ``Monitor(info_keywords=...)``)
EPISODE_INFO_KEYWORDS = ("episode_cost", "episode_cv")


def step_violation(
    cost: float, info: dict[str, Any], violation_key: str | None = None, violation_threshold: float = 0.0
) -> bool:
    """Whether one step is a constraint violation.

    ``info[violation_key] > 0`` when a key is given; otherwise the first of
    :data:`DEFAULT_VIOLATION_KEYS` found in info (Safety-Gymnasium's native 0/1 cost when the
    training cost is the smooth one); otherwise ``cost > violation_threshold``.
    """
    if violation_key is not None:
        return _violation_flag(info, violation_key) > 0.0
    for key in DEFAULT_VIOLATION_KEYS:
        if key in info:
            return _violation_flag(info, key) > 0.0
    if math.isnan(cost):  # NaN > threshold is False: it would pass as safe
        raise ValueError("step_violation: the step cost is NaN; a NaN cost cannot be judged safe or unsafe")
    return cost > violation_threshold


def _violation_flag(info: dict[str, Any], key: str) -> float:
    flag = float(info.get(key, 0.0))
    if math.isnan(flag):
        raise ValueError(f"the violation flag info[{key!r}] is NaN; a NaN flag cannot be judged safe or unsafe")
    return flag


class CostMonitor(gym.Wrapper):
    """Track episode cost sum ``c`` and constraint-violation count ``cv``.

    :param env: the environment (may already be wrapped in SB3's ``Monitor``).
    :param cost_key: info key holding the step cost.
    :param cost_fn: ``cost_fn(next_obs, action, info) -> float`` used instead of ``info[cost_key]``;
        its value is also written to ``info[cost_key]`` so that algorithms reading the cost from
        info (OffTRC, the Lagrangian baselines) see it.
    :param violation_key: info key holding a per-step violation flag. ``None`` (default) uses the
        first of ``"cv"``, ``"violation"`` present in info, else counts ``cost > violation_threshold``.
    :param violation_threshold: a step violates when its cost exceeds this (used only when no
        violation flag is found in info).
    :param violation_fn: ``violation_fn(cost, info) -> bool``; overrides the two options above.
    :param filename: where to write ``<filename>.costs.csv`` (a directory gets ``costs.csv``);
        ``None`` writes nothing.
    :param override_existing: ``False`` appends to an existing file (a resumed run) and keeps its
        ``t_start``, so that ``t`` goes on counting from the first run's start; a missing file or one
        without a header is written anew. ``True`` (default) rewrites it, as SB3's ``Monitor`` does.
    """

    EXT = "costs.csv"

    def __init__(
        self,
        env: gym.Env,
        cost_key: str = "cost",
        cost_fn: CostFn | None = None,
        violation_key: str | None = None,
        violation_threshold: float = 0.0,
        violation_fn: ViolationFn | None = None,
        filename: str | None = None,
        override_existing: bool = True,
    ) -> None:
        super().__init__(env)
        self.cost_key = cost_key
        self.cost_fn = cost_fn
        self.violation_key = violation_key
        self.violation_threshold = float(violation_threshold)
        self.violation_fn = violation_fn
        self.t_start = time.time()
        self._file: IO[str] | None = None
        self._writer: csv.DictWriter | None = None
        if filename is not None:
            self._open(filename, override_existing)
        self._ep_return = 0.0
        self._ep_length = 0
        self._ep_cost = 0.0
        self._ep_cv = 0
        self.episode_returns: list[float] = []
        self.episode_lengths: list[int] = []
        self.episode_costs: list[float] = []
        self.episode_cvs: list[int] = []
        self.total_steps = 0

    def _open(self, filename: str, override_existing: bool = True) -> None:
        if os.path.isdir(filename):
            path = os.path.join(filename, self.EXT)
        elif filename.endswith(self.EXT):
            path = filename
        else:
            path = f"{filename}.{self.EXT}"
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        t_start = None if override_existing else monitor_t_start(path)
        if t_start is not None:
            self.t_start = t_start
            self._file = open(path, "a", newline="")  # noqa: SIM115 (closed in close())
            self._writer = csv.DictWriter(self._file, fieldnames=("r", "l", "t", "c", "cv"))
        else:
            self._file = open(path, "w", newline="")  # noqa: SIM115 (closed in close())
            env_id = self.env.spec.id if self.env.spec is not None else None
            self._file.write("#" + json.dumps({"t_start": self.t_start, "env_id": str(env_id)}) + "\n")
            self._writer = csv.DictWriter(self._file, fieldnames=("r", "l", "t", "c", "cv"))
            self._writer.writeheader()
            self._file.flush()
        self.filename = path

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self._ep_return = 0.0
        self._ep_length = 0
        self._ep_cost = 0.0
        self._ep_cv = 0
        return self.env.reset(**kwargs)

    def _step_cost(self, obs: Any, action: Any, info: dict[str, Any]) -> float:
        env_id = self.env.spec.id if self.env.spec is not None else type(self.env.unwrapped).__name__
        where = f" at step {self._ep_length + 1} of an episode of {env_id}"
        if self.cost_fn is not None:
            cost = check_cost(self.cost_fn(obs, action, info), self.cost_key, "CostMonitor (cost_fn)", where)
            info[self.cost_key] = cost
            return cost
        if self.cost_key not in info:
            raise KeyError(
                f"CostMonitor: the step info of {env_id} has no {self.cost_key!r} key (keys: {sorted(info)}). "
                f"Pass cost_key=<the key your env uses>, or cost_fn=lambda obs, action, info: ..., "
                "or build a Safety-Gymnasium env with sb3_offtrc.envs.make_safety_env, which fills info['cost']."
            )
        return check_cost(info[self.cost_key], self.cost_key, "CostMonitor", where)

    def _violated(self, cost: float, info: dict[str, Any]) -> bool:
        if self.violation_fn is not None:
            return bool(self.violation_fn(cost, info))
        return step_violation(cost, info, self.violation_key, self.violation_threshold)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        cost = self._step_cost(obs, action, info)
        self._ep_return += float(reward)
        self._ep_length += 1
        self._ep_cost += cost
        self._ep_cv += int(self._violated(cost, info))
        self.total_steps += 1
        if terminated or truncated:
            ep_cost, ep_cv = self._ep_cost, self._ep_cv
            episode = info.get("episode")
            if not isinstance(episode, dict):
                episode = {
                    "r": round(self._ep_return, 6),
                    "l": self._ep_length,
                    "t": round(time.time() - self.t_start, 6),
                }
                info["episode"] = episode
            episode["c"] = ep_cost
            episode["cv"] = ep_cv
            # flat copies survive a Monitor *outside* this wrapper (which rebuilds info["episode"]);
            # Monitor(env, info_keywords=EPISODE_INFO_KEYWORDS) also writes them as CSV columns
            info["episode_cost"] = ep_cost
            info["episode_cv"] = ep_cv
            self.episode_returns.append(self._ep_return)
            self.episode_lengths.append(self._ep_length)
            self.episode_costs.append(ep_cost)
            self.episode_cvs.append(ep_cv)
            if self._writer is not None and self._file is not None:
                self._writer.writerow(
                    {
                        "r": round(self._ep_return, 6),
                        "l": self._ep_length,
                        "t": round(time.time() - self.t_start, 6),
                        "c": round(ep_cost, 6),
                        "cv": ep_cv,
                    }
                )
                self._file.flush()
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        super().close()
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None

    def get_episode_costs(self) -> list[float]:
        return list(self.episode_costs)

    def get_episode_cvs(self) -> list[int]:
        return list(self.episode_cvs)

    def get_episode_rewards(self) -> list[float]:
        return list(self.episode_returns)

    def get_episode_lengths(self) -> list[int]:
        return list(self.episode_lengths)

    def get_total_steps(self) -> int:
        return self.total_steps


def monitor_t_start(path: str) -> float | None:
    """``t_start`` from the JSON header line of a Monitor or CostMonitor file; ``None`` when the file is
    missing, empty or has no such header (then there is nothing to append to)."""
    try:
        with open(path) as handle:
            first = handle.readline()
    except OSError:
        return None
    if not first.startswith("#"):
        return None
    try:
        header = json.loads(first[1:])
    except json.JSONDecodeError:
        return None
    t_start = header.get("t_start") if isinstance(header, dict) else None
    return float(t_start) if isinstance(t_start, int | float) else None


def _sb3_monitor(env: gym.Env, path: str | None, override_existing: bool) -> gym.Env:
    """SB3's ``Monitor``, appending to ``<path>.monitor.csv`` when asked and the file has a header.

    SB3's own ``override_existing=False`` appends without a header to a missing file (which its
    ``load_results`` then rejects) and restarts ``t`` at 0; here a missing file gets a header, and
    an appended file keeps its ``t_start``.
    """
    from stable_baselines3.common.monitor import Monitor

    t_start = None
    if path is not None and not override_existing:
        t_start = monitor_t_start(f"{path}.{Monitor.EXT}")
    monitor: Monitor = Monitor(env, filename=path, override_existing=t_start is None)
    if t_start is not None:
        monitor.t_start = t_start
    return monitor


def get_cost_monitor_files(path: str) -> list[str]:
    """All ``*costs.csv`` files in ``path`` (recursively), or ``[path]`` for a single file."""
    if os.path.isfile(path):
        return [path]
    return sorted(glob.glob(os.path.join(path, "**", f"*{CostMonitor.EXT}"), recursive=True))


def load_cost_results(path: str) -> pandas.DataFrame:
    """Load CostMonitor CSV files (a directory, searched recursively, or one file).

    Rows from all files are sorted by wall-clock time (``t`` relative to the earliest
    ``t_start``), like SB3's ``load_results``; an extra column ``timesteps`` is the running sum of
    episode lengths, i.e. the env steps collected when each episode ended (over all env copies).

    :return: a DataFrame with columns ``r, l, t, c, cv, timesteps``.
    """
    import pandas

    files = get_cost_monitor_files(path)
    if not files:
        raise FileNotFoundError(f"no *{CostMonitor.EXT} files under {path!r} (written by CostMonitor(filename=...))")
    frames, starts = [], []
    for name in files:
        with open(name) as handle:
            first = handle.readline()
            if not first.startswith("#"):
                raise ValueError(f"{name} is not a CostMonitor file (no JSON header line)")
            header = json.loads(first[1:])
            frame = pandas.read_csv(handle, index_col=None)
        frame["t"] += header["t_start"]
        starts.append(header["t_start"])
        frames.append(frame)
    data = pandas.concat(frames, ignore_index=True).sort_values("t", kind="stable").reset_index(drop=True)
    data["t"] -= min(starts)
    data["timesteps"] = data["l"].cumsum()
    return data


class CostLoggerCallback(BaseCallback):
    """Log ``rollout/ep_cost_mean`` and ``rollout/ep_cv_mean`` for any SB3 algorithm.

    Reads ``c`` and ``cv`` from ``info["episode"]`` (put there by :class:`CostMonitor`) and
    averages them over the last ``stats_window_size`` episodes (default: the model's own
    ``stats_window_size``, as for ``rollout/ep_rew_mean``).

    :param stats_window_size: number of recent episodes to average over.
    :param verbose: verbosity level.
    """

    def __init__(self, stats_window_size: int | None = None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.stats_window_size = stats_window_size
        self.ep_costs: deque[float] = deque(maxlen=100)
        self.ep_cvs: deque[float] = deque(maxlen=100)
        self._warned = False

    def _init_callback(self) -> None:
        size = self.stats_window_size or getattr(self.model, "_stats_window_size", 100)
        self.ep_costs = deque(self.ep_costs, maxlen=size)
        self.ep_cvs = deque(self.ep_cvs, maxlen=size)

    def _on_step(self) -> bool:
        infos = self.locals.get("infos") or []
        dones = self.locals.get("dones")
        for i, info in enumerate(infos):
            episode = info.get("episode")
            if isinstance(episode, dict) and "c" in episode:
                self.ep_costs.append(float(episode["c"]))
                self.ep_cvs.append(float(episode.get("cv", 0.0)))
            elif "episode_cost" in info:
                self.ep_costs.append(float(info["episode_cost"]))
                self.ep_cvs.append(float(info.get("episode_cv", 0.0)))
            elif dones is not None and bool(dones[i]) and not self._warned:
                self._warned = True
                self.logger.warn(
                    "CostLoggerCallback: an episode ended without info['episode']['c']; wrap the env in "
                    "CostMonitor, e.g. make_vec_env(id, wrapper_class=CostMonitor) or make_cost_vec_env(id)"
                )
        if self.ep_costs:
            # recorded every step: the logger forgets values at each dump, and dumps happen at
            # algorithm-specific moments (after a rollout for PPO, every log_interval episodes for SAC)
            self.logger.record("rollout/ep_cost_mean", float(np.mean(self.ep_costs)))
            self.logger.record("rollout/ep_cv_mean", float(np.mean(self.ep_cvs)))
        return True


def make_cost_vec_env(
    env_id: str | Callable[..., gym.Env],
    n_envs: int = 1,
    seed: int | None = None,
    monitor_dir: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    vec_env_cls: type | None = None,
    vec_env_kwargs: dict[str, Any] | None = None,
    cost_monitor_kwargs: dict[str, Any] | None = None,
    override_existing: bool = True,
) -> VecEnv:
    """SB3's ``make_vec_env`` with ``CostMonitor(Monitor(env))`` around every copy.

    Each copy ``i`` writes ``<monitor_dir>/<i>.monitor.csv`` and ``<monitor_dir>/<i>.costs.csv``
    (``make_vec_env(wrapper_class=CostMonitor)`` cannot give each copy its own cost file).

    :param env_id: a registered id (``import sb3_offtrc.envs`` first for ours) or an env factory.
    :param n_envs: number of env copies.
    :param seed: seed of the first copy (copy ``i`` gets ``seed + i``).
    :param monitor_dir: where to write the CSV files; ``None`` writes none.
    :param env_kwargs: passed to ``gym.make`` (or to the factory).
    :param vec_env_cls: ``DummyVecEnv`` (default) or ``SubprocVecEnv``.
    :param vec_env_kwargs: passed to the VecEnv class.
    :param cost_monitor_kwargs: passed to :class:`CostMonitor` (``cost_fn``, ``cost_key``, ...).
    :param override_existing: ``False`` appends to the monitor files already in ``monitor_dir`` (a
        resumed run), keeping their ``t_start``; ``True`` (default) rewrites them.
    """
    from stable_baselines3.common.vec_env import DummyVecEnv

    env_kwargs = env_kwargs or {}
    cost_kwargs = cost_monitor_kwargs or {}
    if monitor_dir is not None:
        os.makedirs(monitor_dir, exist_ok=True)

    def factory(rank: int) -> Callable[[], gym.Env]:
        def _init() -> gym.Env:
            import sb3_offtrc.envs  # noqa: F401  (registers our ids in spawned SubprocVecEnv workers)

            env = gym.make(env_id, **env_kwargs) if isinstance(env_id, str) else env_id(**env_kwargs)
            path = None if monitor_dir is None else os.path.join(monitor_dir, str(rank))
            monitored = _sb3_monitor(env, path, override_existing)
            return CostMonitor(monitored, filename=path, override_existing=override_existing, **cost_kwargs)

        return _init

    cls = DummyVecEnv if vec_env_cls is None else vec_env_cls
    venv: VecEnv = cls([factory(i) for i in range(n_envs)], **(vec_env_kwargs or {}))
    if seed is not None:
        venv.seed(seed)
    return venv
