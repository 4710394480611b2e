"""The paper's observation of the Safety-Gymnasium Goal tasks (the ``observation="paper"`` option).

The authors do not train on Safety-Gymnasium's 60-dimensional vector (accelerometer, velocimeter,
gyro and magnetometer with three axes each, then 16-bin lidars of the goal, the hazards and the
vases). They build a 24-dimensional one from the simulator, each part scaled by hand to roughly unit
size (facts read from rllab-snu/Off-Policy-TRC, ``utils/env.py``):

====================  ====  =========================
part                  dims  scaling
====================  ====  =========================
goal compass          2     / 0.7  (unit ego-frame XY direction)
goal distance         1     (d - 1.5) / 0.6
accelerometer (x, y)  2     / 8
velocimeter (x, y)    2     / 0.2
gyro (z)              1     / 2
hazard lidar          16    (l - 0.3) / 0.3
====================  ====  =========================

The vases (which cost nothing in the Goal1 tasks) and the constant parts (gravity on the
accelerometer's z axis, the magnetometer) are left out. In the raw vector the accelerometer varies
with a standard deviation up to 8.9 while the lidar and velocity inputs vary by 0.03-0.37, so
without this (or a running normalisation) the informative inputs are drowned.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

#: Dimension of the paper's Goal observation.
PAPER_GOAL_DIM = 2 + 1 + 2 + 2 + 1 + 16


def _safety_task(env: gym.Env) -> Any:
    """The Safety-Gymnasium task object under the wrappers, or a clear error."""
    task = getattr(env.unwrapped, "task", None)
    if task is not None:
        return task
    raise ValueError(
        f"observation='paper' needs a Safety-Gymnasium Goal task, got {env.spec.id if env.spec else env!r}"
    )


def sensor_slices(task: Any) -> dict[str, slice]:
    """Where each sensor of a Safety-Gymnasium task sits in its flat observation (the task flattens
    its sensors in the order of ``obs_info.obs_space_dict``); empty for an object without that layout."""
    spaces = getattr(getattr(task, "obs_info", None), "obs_space_dict", None)
    out: dict[str, slice] = {}
    start = 0
    for key, space in (spaces or {}).items():
        size = int(np.prod(space.shape))
        out[key] = slice(start, start + size)
        start += size
    return out


class PaperGoalObservation(gym.ObservationWrapper):
    """Replace a Safety-Gymnasium Goal task's observation with the paper's 24-dimensional one."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        task = _safety_task(env)
        for part in ("goal", "hazards", "agent"):
            if not hasattr(task, part):
                raise ValueError(
                    f"observation='paper' is defined for the Goal tasks with hazards; this task has no {part!r}"
                )
        self._task = task
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(PAPER_GOAL_DIM,), dtype=np.float64)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        del observation  # rebuilt from the simulator state, as the authors do
        task = self._task
        agent = task.agent
        compass = task._obs_compass(task.goal.pos)  # noqa: SLF001  (Safety-Gymnasium has no public one)
        distance = np.array([task.dist_goal()])
        acc = agent.get_sensor("accelerometer")[:2]
        vel = agent.get_sensor("velocimeter")[:2]
        gyro = agent.get_sensor("gyro")[2:]
        lidar = task._obs_lidar(task.hazards.pos, task.hazards.group)  # noqa: SLF001
        return np.concatenate(
            [compass / 0.7, (distance - 1.5) / 0.6, acc / 8.0, vel / 0.2, gyro / 2.0, (lidar - 0.3) / 0.3]
        ).astype(np.float64)


class LidarMaxObservation(gym.ObservationWrapper):
    """Safety-Gymnasium's own vector with, per lidar, its largest bin appended (``observation="lidar_max"``).

    With the Goal tasks' lidar (range 3) a bin reads ``1 - distance / 3`` for the nearest object of
    its kind in its sector, so the largest bin is the proximity of the nearest such object, and the
    point is inside a hazard (radius 0.2) exactly when the hazard lidar's largest bin exceeds
    ``1 - 0.2 / 3`` (about 0.93): a threshold on the maximum of 16 inputs that sit in a narrow
    range, which the critics did not learn from the 60-dim vector
    (docs/diagnosis.md, finding 18: held-out explained variance of the step cost about 0 without
    this input, 0.6 with it). The appended values are the same readings the vector holds; nothing
    new is sensed.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        sensors = sensor_slices(_safety_task(env))
        self._lidars = [where for key, where in sensors.items() if key.endswith("_lidar")]
        size = max((where.stop for where in sensors.values()), default=0)
        base = env.observation_space
        if not isinstance(base, gym.spaces.Box) or base.shape != (size,) or not self._lidars:
            raise ValueError(
                f"observation='lidar_max' needs a Safety-Gymnasium task with a flat observation and a lidar, got {base}"
            )
        self.observation_space = gym.spaces.Box(
            np.concatenate([base.low, np.zeros(len(self._lidars))]),
            np.concatenate([base.high, np.ones(len(self._lidars))]),
            dtype=np.float64,
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        maxima = [observation[where].max() for where in self._lidars]
        return np.concatenate([observation, maxima]).astype(np.float64)
