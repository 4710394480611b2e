"""The Safety-Gymnasium import layer: the Goal tasks build and step on Python 3.11 through it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from sb3_offtrc.compat import safety_gymnasium as compat

# `make test` sets SB3_OFFTRC_REQUIRE_SAFETY=1: there the safety extra is always installed, so a
# missing module is a broken setup and must fail rather than skip.
_MISSING = compat.missing_safety_modules()
_REQUIRED = os.environ.get("SB3_OFFTRC_REQUIRE_SAFETY", "") not in ("", "0")
needs_safety = pytest.mark.skipif(
    bool(_MISSING) and not _REQUIRED, reason=f"Safety-Gymnasium stack incomplete, missing: {_MISSING}"
)
GOAL_TASKS = ["SafetyPointGoal1-v0", "SafetyCarGoal1-v0"]


def test_import_sb3_offtrc_stays_light() -> None:
    # Runs in a child interpreter so modules imported by other tests do not leak in.
    code = (
        "import sys, sb3_offtrc, sb3_offtrc.compat; "
        "heavy = [m for m in ('mujoco', 'safety_gymnasium') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_array_defaults_become_copies_only_inside_safety_gymnasium() -> None:
    patched = compat._patched_dataclass(dataclasses.dataclass)
    colour = np.array([0.0, 1.0, 0.0, 1.0])

    Geom = type("Geom", (), {"__annotations__": {"color": np.ndarray}, "color": colour})
    Geom.__module__ = "safety_gymnasium.assets.fake"
    Geom = patched(Geom)
    first, second = Geom(), Geom()
    np.testing.assert_array_equal(first.color, colour)
    assert first.color is not second.color  # no state shared between instances
    assert Geom.color is colour  # the class attribute is still the original table entry

    Other = type("Other", (), {"__annotations__": {"color": np.ndarray}, "color": colour})
    with pytest.raises(ValueError, match="mutable default"):
        patched(Other)  # classes outside safety_gymnasium keep Python's own rule


def test_unavailable_raises_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "safety_gymnasium", raising=False)
    monkeypatch.setattr(compat, "missing_safety_modules", lambda: ["mujoco"])
    with pytest.raises(ImportError, match="Missing: mujoco"):
        compat.import_safety_gymnasium()


@pytest.mark.safety
@needs_safety
def test_import_leaves_no_patches_behind() -> None:
    robotics_before = "gymnasium_robotics" in sys.modules
    original = dataclasses.dataclass
    sg = compat.import_safety_gymnasium()
    assert compat.import_safety_gymnasium() is sg
    assert dataclasses.dataclass is original
    assert ("gymnasium_robotics" in sys.modules) == robotics_before


@pytest.mark.safety
@needs_safety
@pytest.mark.parametrize("env_id", GOAL_TASKS)
def test_goal_task_builds_and_steps(env_id: str) -> None:
    sg = compat.import_safety_gymnasium()
    env = sg.make(env_id)
    try:
        obs, _ = env.reset(seed=0)
        assert env.observation_space.contains(obs.astype(env.observation_space.dtype))
        env.action_space.seed(0)
        for _ in range(20):
            obs, reward, cost, terminated, truncated, _ = env.step(env.action_space.sample())
            assert obs.shape == env.observation_space.shape
            assert np.isfinite(reward) and cost >= 0.0
            assert not terminated
    finally:
        env.close()


@pytest.mark.safety
@needs_safety
@pytest.mark.parametrize("env_id", GOAL_TASKS)
def test_gymnasium_id_puts_cost_in_info(env_id: str) -> None:
    import gymnasium as gym

    compat.import_safety_gymnasium()
    env = gym.make(env_id.replace("-v0", "Gymnasium-v0"))
    try:
        env.reset(seed=0)
        result = env.step(env.action_space.sample())
        assert len(result) == 5
        assert result[4]["cost"] >= 0.0
    finally:
        env.close()


@pytest.mark.safety
@needs_safety
def test_multi_agent_tasks_fail_clearly_without_robotics() -> None:
    import importlib.util

    if importlib.util.find_spec("gymnasium_robotics") is not None:
        pytest.skip("gymnasium-robotics is installed; the stub is not used")
    compat.import_safety_gymnasium()
    from safety_gymnasium.tasks.safe_multi_agent import safe_mujoco_multi

    with pytest.raises(compat.SafetyGymnasiumUnavailable, match="multi-agent"):
        safe_mujoco_multi.MultiAgentMujocoEnv("Ant", "2x4")


_RENDER_ONE_FRAME = """
import numpy as np
from sb3_offtrc.compat import import_safety_gymnasium

env = import_safety_gymnasium().make(
    "SafetyPointGoal1-v0", render_mode="rgb_array", width=64, height=64, camera_name="fixedfar"
)
env.reset(seed=0)
env.step(env.action_space.sample())
frame = env.render()
assert frame.shape == (64, 64, 3) and frame.std() > 0, (frame.shape, frame.std())
"""


@pytest.mark.safety
@needs_safety
def test_headless_rgb_array_rendering() -> None:
    # A child process, because MUJOCO_GL is read once, when mujoco is first imported.
    import ctypes.util

    if ctypes.util.find_library("EGL") is None:
        pytest.skip("no libEGL on this machine (apt-get install libegl1)")
    env = {**os.environ, "MUJOCO_GL": "egl"}
    subprocess.run([sys.executable, "-c", _RENDER_ONE_FRAME], check=True, env=env, timeout=120)


@needs_safety
@pytest.mark.parametrize(
    ("model", "env_id"),
    [
        ("offtrc_SafetyPointGoal1-v0.zip", "SafetyPointGoal1-v0"),
        ("offtrc_HalfCheetahFlip-v4.zip", "OffTRC/HalfCheetahFlip-v4"),
    ],
)
def test_shipped_demo_policies_load_and_act_on_their_task(model: str, env_id: str) -> None:
    """`make demo` evaluates these files: each must load with the present code and act on its task."""
    from pathlib import Path

    from sb3_offtrc import OffTRC
    from sb3_offtrc.envs import make_safety_env

    path = Path(__file__).resolve().parents[1] / "demo" / model
    env = make_safety_env(env_id)
    policy = OffTRC.load(path, device="cpu")
    assert policy.observation_space.shape == env.observation_space.shape
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        action, _ = policy.predict(obs, deterministic=True)
        assert env.action_space.contains(action.astype(env.action_space.dtype))
        obs, *_ = env.step(action)
    env.close()
