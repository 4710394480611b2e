"""HazardPoint: a tiny constrained navigation task in pure numpy.

A point starts near ``(-1.5, 0)`` and must reach a goal at ``(1.5, 0)``. A circular hazard of
radius 0.5 sits at the origin, exactly on the straight line between them. Driving straight is
the fastest way to the goal and therefore the unconstrained optimum, but it spends about ten
steps inside the hazard; going around costs roughly three extra steps and no hazard time. So a
cost limit between the two makes the constraint bind.

Dynamics: the action is a velocity command in ``[-1, 1]^2``; its Euclidean norm is clipped to 1
(so diagonal moves are not faster) and the point moves ``max_speed * a`` per step. Positions are
clipped to the arena ``[-arena, arena]^2``.

Reward (dense): ``(d_prev - d_now) / max_speed`` (progress toward the goal, at most 1 per step)
plus ``goal_bonus`` for every step that ends within ``goal_radius`` of the goal. There is no
termination: every episode lasts exactly ``max_episode_steps`` steps and ends with
``truncated=True``, so the episode cost limit is simply ``d * max_episode_steps``.

Cost (``info["cost"]``):
- ``cost_type="binary"`` (default): 1.0 for each step that ends inside the hazard, else 0.
- ``cost_type="smooth"``: ``1 / (1 + exp(10 (h - hazard_radius)))`` with ``h`` the distance to
  the hazard centre (the paper's shape, §5 of ALGORITHM.md, scaled to this hazard).
Either way ``info["cv"]`` is 1.0 when the step ends inside the hazard (a constraint violation).

Reference numbers (defaults, 100 steps, measured with :func:`straight_policy` /
:func:`detour_policy` from the nominal start, see ``tests/test_envs_hazard_point.py``):

=========== ======== ================== ===========
policy      return   episode cost (0/1) cost / step
=========== ======== ================== ===========
straight    ~100     10                 0.10
detour      ~98      0                  0.00
=========== ======== ================== ===========

A per-step limit ``d = 0.025`` (episode limit 2.5, the paper's default ``d``) makes the straight
path infeasible and the detour feasible.

Learning reference (one seed, ``[64, 64]`` networks, shared CPU): SAC learns the straight path,
return ~100 and episode cost ~10 after 15k steps; OffTRC with ``cost_limit=0.025``,
``max_kl=0.01``, ``n_critic_epochs=20`` keeps the episode cost under 2.5 from about 15k steps on
(deterministic evaluation at 30k: cost 0, return ~25, still rising).
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

CostType = Literal["binary", "smooth"]

#: Per-step cost limit under which the straight path is infeasible and a detour feasible.
SUGGESTED_COST_LIMIT = 0.025


class HazardPointEnv(gym.Env[np.ndarray, np.ndarray]):
    """Reach a goal while avoiding a circular hazard on the direct path.

    Observation (float32, 6): position, goal minus position, hazard centre minus position.

    :param cost_type: ``"binary"`` (1 inside the hazard) or ``"smooth"`` (sigmoid of the distance
        to the hazard centre).
    :param max_speed: distance covered per step at full action.
    :param hazard_radius: radius of the hazard disc centred at the origin.
    :param goal_radius: the goal bonus is paid while within this distance of the goal.
    :param goal_bonus: reward per step spent at the goal.
    :param start_noise: half-width of the uniform noise added to the start position.
    :param render_mode: ``"rgb_array"`` for a small top-down image, or ``None``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        cost_type: CostType = "binary",
        max_speed: float = 0.1,
        hazard_radius: float = 0.5,
        goal_radius: float = 0.1,
        goal_bonus: float = 1.0,
        start_noise: float = 0.05,
        render_mode: str | None = None,
    ) -> None:
        if cost_type not in ("binary", "smooth"):
            raise ValueError(f"cost_type must be 'binary' or 'smooth', got {cost_type!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None")
        self.cost_type = cost_type
        self.max_speed = float(max_speed)
        self.hazard_radius = float(hazard_radius)
        self.goal_radius = float(goal_radius)
        self.goal_bonus = float(goal_bonus)
        self.start_noise = float(start_noise)
        self.render_mode = render_mode
        self.arena = 2.0
        self.start = np.array([-1.5, 0.0])
        self.goal = np.array([1.5, 0.0])
        self.hazard = np.array([0.0, 0.0])
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        high = np.full(6, 2 * self.arena, dtype=np.float32)
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.pos = self.start.copy()

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.pos, self.goal - self.pos, self.hazard - self.pos]).astype(np.float32)

    def hazard_distance(self) -> float:
        return float(np.hypot(*(self.pos - self.hazard)))

    def cost_at(self, h: float) -> float:
        """Step cost when the point ends a step at distance ``h`` from the hazard centre."""
        if self.cost_type == "binary":
            return 1.0 if h < self.hazard_radius else 0.0
        # clip the exponent: far from the hazard exp() would overflow for no benefit
        return float(1.0 / (1.0 + np.exp(min(10.0 * (h - self.hazard_radius), 50.0))))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        noise = self.np_random.uniform(-self.start_noise, self.start_noise, size=2)
        self.pos = self.start + noise
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        norm = float(np.hypot(a[0], a[1]))
        if norm > 1.0:
            a = a / norm
        d_prev = float(np.hypot(*(self.goal - self.pos)))
        self.pos = np.clip(self.pos + self.max_speed * a, -self.arena, self.arena)
        d_now = float(np.hypot(*(self.goal - self.pos)))
        at_goal = d_now < self.goal_radius
        reward = (d_prev - d_now) / self.max_speed + (self.goal_bonus if at_goal else 0.0)
        h = self.hazard_distance()
        inside = h < self.hazard_radius
        info = {"cost": self.cost_at(h), "cv": float(inside), "goal_reached": at_goal}
        # never terminates: the TimeLimit wrapper ends every episode with truncated=True
        return self._obs(), float(reward), False, False, info

    def render(self) -> np.ndarray | None:  # type: ignore[override]
        if self.render_mode != "rgb_array":
            return None
        size = 128
        scale = size / (2 * self.arena)
        ys, xs = np.mgrid[0:size, 0:size]
        wx = (xs + 0.5) / scale - self.arena
        wy = self.arena - (ys + 0.5) / scale
        img = np.full((size, size, 3), 255, dtype=np.uint8)
        img[np.hypot(wx - self.hazard[0], wy - self.hazard[1]) < self.hazard_radius] = (230, 120, 120)
        img[np.hypot(wx - self.goal[0], wy - self.goal[1]) < max(self.goal_radius, 0.08)] = (100, 200, 100)
        img[np.hypot(wx - self.pos[0], wy - self.pos[1]) < 0.07] = (40, 60, 200)
        return img


def straight_policy(obs: np.ndarray) -> np.ndarray:
    """Full speed straight at the goal (the unconstrained optimum)."""
    to_goal = np.asarray(obs, dtype=np.float64)[2:4]
    norm = np.linalg.norm(to_goal)
    return (to_goal / norm if norm > 1e-8 else np.zeros(2)).astype(np.float32)


def detour_policy(obs: np.ndarray, margin: float = 0.12, hazard_radius: float = 0.5) -> np.ndarray:
    """Head for the goal but slide along the hazard's edge (above it) when the direct line is blocked.

    A simple scripted reference: when the straight step toward the goal would come closer than
    ``hazard_radius + margin`` to the hazard centre, move tangentially around the hazard instead.
    """
    o = np.asarray(obs, dtype=np.float64)
    to_goal, to_hazard = o[2:4], o[4:6]
    direction = to_goal / max(float(np.linalg.norm(to_goal)), 1e-8)
    safe = hazard_radius + margin
    away = -to_hazard  # from hazard centre to the point
    dist = float(np.linalg.norm(away))
    # closest approach of the segment along `direction` to the hazard centre
    along = float(np.dot(to_hazard, direction))
    closest = float(np.linalg.norm(to_hazard - along * direction)) if along > 0 else dist
    if along > 0 and closest < safe:
        radial = away / max(dist, 1e-8)
        tangent = np.array([-radial[1], radial[0]])
        if np.dot(tangent, direction) < 0:
            tangent = -tangent
        # push outward when inside the safety ring, inward pull otherwise, to stay on it
        correction = (safe - dist) * 5.0
        step = tangent + correction * radial
        direction = step / max(float(np.linalg.norm(step)), 1e-8)
    return direction.astype(np.float32)
