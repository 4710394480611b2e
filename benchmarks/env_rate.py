"""How fast Safety-Gymnasium steps, and whether it renders headless, with the installed MuJoCo.

Used to choose the MuJoCo pin (figures in README.md, "Which MuJoCo: measured"); run it once per candidate venv::

    MUJOCO_GL=egl python benchmarks/env_rate.py --steps 20000 --render-frames 50

Prints one JSON object: MuJoCo version, random-action steps per second of wall-clock time and of
this process's CPU time (single process, resets included; the CPU figure is the one to compare on
a shared machine), and whether ``render_mode="rgb_array"`` produced a non-blank frame and how fast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from typing import Any

# Must be decided before mujoco is imported; EGL needs no display (Mesa's surfaceless EGL works on CPU).
os.environ.setdefault("MUJOCO_GL", "egl")


def step_rate(sg: Any, env_id: str, steps: int, seed: int) -> tuple[float, float]:
    """Steps per wall-clock second and per CPU second of this process (robust to a busy machine)."""
    env = sg.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(steps)]
    start, cpu_start = time.perf_counter(), time.process_time()
    for action in actions:
        *_, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    env.close()
    return steps / elapsed, steps / cpu


def render_check(sg: Any, env_id: str, frames: int, seed: int) -> dict[str, Any]:
    try:
        env = sg.make(env_id, render_mode="rgb_array")
        env.reset(seed=seed)
        env.action_space.seed(seed)
        frame = env.render()
        start = time.perf_counter()
        for _ in range(frames):  # Mesa's software EGL renders on the CPU
            env.step(env.action_space.sample())
            frame = env.render()
        elapsed = time.perf_counter() - start
        env.close()
    except Exception as exc:  # the point is to report any failure, whatever its type
        last = traceback.extract_tb(exc.__traceback__)[-1]
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "where": f"{last.filename}:{last.lineno}"}
    blank = frame is None or float(frame.std()) == 0.0
    return {
        "ok": not blank,
        "shape": None if frame is None else list(frame.shape),
        "frames_per_s": round(frames / elapsed, 1) if frames else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="SafetyPointGoal1-v0")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="best of N timed runs")
    parser.add_argument("--render-frames", type=int, default=50, help="0 skips the rendering check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import mujoco

    from sb3_offtrc.compat import import_safety_gymnasium

    sg = import_safety_gymnasium()
    runs = [step_rate(sg, args.env, args.steps, args.seed) for _ in range(args.repeats)]
    result: dict[str, Any] = {
        "env": args.env,
        "mujoco": mujoco.__version__,
        "python": platform.python_version(),
        "steps": args.steps,
        "steps_per_s_best": round(max(wall for wall, _ in runs)),
        "steps_per_cpu_s_best": round(max(cpu for _, cpu in runs)),
        "steps_per_s_all": [round(wall) for wall, _ in runs],
        "MUJOCO_GL": os.environ["MUJOCO_GL"],
    }
    if args.render_frames:
        result["render"] = render_check(sg, args.env, args.render_frames, args.seed)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
