"""Speed of OffTRC next to SB3 SAC, the environment's own rate and the machine's GEMM rate.

    python benchmarks/speed.py                 # SafetyPointGoal1-v0, paper defaults and CPU preset
    python benchmarks/speed.py --quick         # fewer steps (a smoke run, numbers are noisier)
    python benchmarks/speed.py --batch-scaling # also time updates at n_batch 2.5k/5k/10k/20k (both configurations)
    python benchmarks/speed.py --profile       # also write torch.profiler's table of one update each
    python benchmarks/speed.py --device cuda   # updates, SAC and the GEMM rate on the GPU (if present)

Prints a table, writes ``benchmarks/results/speed.json`` and ends with the line
``offtrc_preset/sac throughput ratio: <x>``. Throughputs are env steps per wall-clock second of
training (collection and updates), measured in steady state (the replay buffer already holds
``n_batch`` transitions). The GEMM rate and the env's random-action rate are measured at the start
and at the end; the larger of each is the reference. The matmul FLOPs of one update are counted
with torch's FlopCounterMode and divided by the update's wall time, next to the GEMM rate measured
in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch as th

RESULTS = Path(__file__).resolve().parent / "results"
# measure this checkout's code, whatever sb3_offtrc the interpreter has installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synchronize(device: str | th.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a no-op on the CPU)."""
    if th.device(device).type == "cuda":
        th.cuda.synchronize(device)


def seconds(device: str | th.device, fn: Callable[..., Any], *args: Any) -> float:
    """Wall time of ``fn(*args)``, including the work it queued on ``device``."""
    synchronize(device)
    start = time.perf_counter()
    fn(*args)
    synchronize(device)
    return time.perf_counter() - start


def gemm_rate(size: int = 2048, repeats: int = 20, device: str = "cpu") -> float:
    """Best fp32 matmul rate in GFLOP/s over square and critic-shaped products."""

    def products(a: th.Tensor, b: th.Tensor) -> None:
        for _ in range(repeats):
            th.mm(a, b)

    best = 0.0
    for m, k, n in ((size, size, size), (5000, 512, 512)):
        a, b = th.randn(m, k, device=device), th.randn(k, n, device=device)
        th.mm(a, b)
        elapsed = seconds(device, products, a, b)
        best = max(best, 2.0 * m * k * n * repeats / elapsed / 1e9)
    return best


def make_env(env_id: str) -> Any:
    import gymnasium as gym

    import sb3_offtrc.envs as envs

    return gym.make(envs.resolve_env_id(env_id))


def raw_env_rate(env_id: str, steps: int) -> float:
    env = make_env(env_id)
    env.reset(seed=0)
    env.action_space.seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        *_, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def timed_learn(model: Any, steps: int) -> float:
    return steps / seconds(model.device, lambda: model.learn(steps, reset_num_timesteps=False))


def sac_rate(env_id: str, steps: int, device: str = "cpu") -> float:
    from stable_baselines3 import SAC

    model = SAC("MlpPolicy", make_env(env_id), learning_starts=100, seed=0, device=device)
    model.learn(200)  # past warm-up: from here on one gradient step per env step
    return timed_learn(model, steps)


def _fill_without_updates(model: Any) -> None:
    """Collect ``n_batch`` transitions with the initial policy; the timed part runs the real updates."""
    model.learning_starts = model.n_batch
    model.learn(model.n_batch)
    model.learning_starts = 0


def _update_batch(model: Any) -> Any:
    """The batch ``OffTRC.train`` would draw: the recent window plus older ones, ``n_batch`` rows."""
    n_envs = model.n_envs
    return model.replay_buffer.sample_windows(model.n_recent // n_envs, (model.n_batch - model.n_recent) // n_envs)


def update_profile(model: Any) -> tuple[float, float]:
    """Wall time and matmul FLOPs of one full OffTRC update on a fresh batch."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = _update_batch(model)
    elapsed = seconds(model.device, model._update, batch)
    counter = FlopCounterMode(display=False)
    with counter:
        model._update(batch)
    return elapsed, float(counter.get_total_flops())


def update_breakdown(model: Any, profile_path: Path | None = None) -> dict[str, float]:
    """Seconds spent in the three phases of one update, and optionally torch.profiler's op table."""
    batch = _update_batch(model)
    phases: dict[str, float] = {}
    originals = {name: getattr(model, name) for name in ("_policy_step", "_fit_critics")}

    def timed(name: str) -> Any:
        def run(*args: Any) -> None:
            phases[name.strip("_")] = seconds(model.device, originals[name], *args)

        return run

    for name in originals:
        setattr(model, name, timed(name))

    def one_update() -> None:
        if profile_path is None:
            model._update(batch)
            return
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model._update(batch)
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        profile_path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    try:
        total = seconds(model.device, one_update)
    finally:
        for name in originals:
            delattr(model, name)  # back to the class methods
    phases["targets_and_batch"] = total - sum(phases.values())
    phases["total"] = total
    return phases


def offtrc_rate(
    env_id: str, params: dict[str, Any], steps: int, profile_path: Path | None = None, device: str = "cpu"
) -> dict[str, float]:
    from sb3_offtrc import OffTRC

    model = OffTRC("MlpPolicy", make_env(env_id), seed=0, device=device, **params)
    _fill_without_updates(model)
    update_s, flops = update_profile(model)
    phases = update_breakdown(model)
    if profile_path is not None:  # one more update, under torch.profiler (its times are not reported)
        update_breakdown(model, profile_path)
    result = {"steps_per_s": timed_learn(model, steps), "update_s": update_s, "update_gflop": flops / 1e9}
    result.update({f"phase_{name}_s": seconds for name, seconds in phases.items()})
    return result


def collection_rate(env_id: str, params: dict[str, Any], steps: int, device: str = "cpu") -> float:
    """OffTRC's collection loop alone (action sampling, replay buffer, SB3's bookkeeping), no updates."""
    from sb3_offtrc import OffTRC

    model = OffTRC("MlpPolicy", make_env(env_id), seed=0, device=device, **params)
    model.learning_starts = 10**12  # never update
    model.learn(200)
    return timed_learn(model, steps)


def batch_scaling(
    env_id: str,
    params: dict[str, Any],
    sizes: tuple[int, ...] = (2500, 5000, 10_000, 20_000),
    max_repeats: int = 3,
    budget_s: float = 30.0,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Update time and matmul FLOPs for each ``n_batch`` in ``sizes``: the median of up to ``max_repeats``
    updates on one batch (a second or third only while it fits in ``budget_s``: a paper-default update
    at 20k takes over a minute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sb3_offtrc import OffTRC

    rows = []
    for n_batch in sizes:
        cfg = {**params, "n_batch": n_batch, "buffer_size": max(50_000, n_batch)}
        model = OffTRC("MlpPolicy", make_env(env_id), seed=0, device=device, **cfg)
        _fill_without_updates(model)
        batch = _update_batch(model)
        times: list[float] = []
        while not times or (len(times) < max_repeats and sum(times) + times[-1] <= budget_s):
            times.append(seconds(device, model._update, batch))
        counter = FlopCounterMode(display=False)
        with counter:
            model._update(batch)
        rows.append(
            {
                "n_batch": n_batch,
                "update_s": float(np.median(times)),
                "update_s_all": times,
                "update_gflop": float(counter.get_total_flops()) / 1e9,
            }
        )
    return rows


def main() -> None:
    from onerun import code_version  # the commit of this checkout (the script's folder is on sys.path)

    from sb3_offtrc import get_preset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="SafetyPointGoal1-v0")
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    parser.add_argument(
        "--batch-scaling",
        action="store_true",
        help="also time updates at n_batch 2.5k..20k, paper defaults and CPU preset",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the updates (OffTRC's and SAC's) and the GEMM reference run: cpu (default) or cuda",
    )
    parser.add_argument("--out", default=str(RESULTS / "speed.json"))
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also write torch.profiler's operator table of one update per configuration next to --out "
        "(update_profile_paper.txt, update_profile_cpu.txt)",
    )
    args = parser.parse_args()
    if th.device(args.device).type == "cuda" and not th.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    if args.threads:
        th.set_num_threads(args.threads)

    steps = 1000 if args.quick else 3000
    result: dict[str, Any] = {
        "env": args.env,
        "code": code_version("benchmarks/speed.py"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": th.get_num_threads(),
            "python": platform.python_version(),
            "torch": th.__version__,
            "device": args.device,
            "load_average_at_start": os.getloadavg()[0],
        },
    }
    # The two reference rates move by 10-20% from one measurement to the next on a shared machine:
    # both are measured at the start and again at the end, and the larger of each is the reference
    # (so the fractions of them below are, if anything, too low).
    env_steps = 2000 if args.quick else 10_000
    device = args.device
    result["gemm_gflops_start"] = gemm_rate(device=device)
    result["env_steps_per_s_start"] = raw_env_rate(args.env, env_steps)
    result["sac_steps_per_s"] = sac_rate(args.env, 300 if args.quick else 1000, device)
    profiles = Path(args.out).parent if args.profile else None
    for name in ("paper", "cpu"):
        profile_path = profiles / f"update_profile_{name}.txt" if profiles is not None else None
        result[f"offtrc_{name}"] = offtrc_rate(args.env, get_preset(name), steps, profile_path, device)
    result["offtrc_collection_steps_per_s"] = collection_rate(args.env, get_preset("cpu"), 3 * steps, device)
    if args.batch_scaling:
        result["batch_scaling_paper"] = batch_scaling(args.env, get_preset("paper"), device=device)
        result["batch_scaling_cpu"] = batch_scaling(args.env, get_preset("cpu"), device=device)

    result["gemm_gflops_end"] = gemm_rate(device=device)
    result["env_steps_per_s_end"] = raw_env_rate(args.env, env_steps)
    for key in ("gemm_gflops", "env_steps_per_s"):
        result[key] = max(result[f"{key}_start"], result[f"{key}_end"])

    gemm, env_rate, sac = result["gemm_gflops"], result["env_steps_per_s"], result["sac_steps_per_s"]
    print(
        f"machine fp32 GEMM rate          : {gemm:8.1f} GFLOP/s ({device}, {th.get_num_threads()} torch threads; "
        f"{result['gemm_gflops_start']:.1f} at start, {result['gemm_gflops_end']:.1f} at end)"
    )
    print(
        f"{args.env} random actions: {env_rate:8.1f} env steps/s ({result['env_steps_per_s_start']:.1f} at start, "
        f"{result['env_steps_per_s_end']:.1f} at end)"
    )
    print(f"SB3 SAC (default MlpPolicy)     : {sac:8.1f} env steps/s")
    for key, label in (("offtrc_paper", "OffTRC paper defaults"), ("offtrc_cpu", "OffTRC CPU preset")):
        row = result[key]
        rate = row["update_gflop"] / row["update_s"]
        row["update_gflops"] = rate
        row["fraction_of_gemm"] = rate / gemm
        print(
            f"{label:<32}: {row['steps_per_s']:8.1f} env steps/s  ({row['steps_per_s'] / sac:.2f}x SAC, "
            f"{row['steps_per_s'] / env_rate:.0%} of env rate); one update {row['update_s']:.2f} s, "
            f"{row['update_gflop']:.0f} GFLOP, {rate:.1f} GFLOP/s = {rate / gemm:.0%} of GEMM rate"
        )
        phases = {k[len("phase_") : -len("_s")]: v for k, v in row.items() if k.startswith("phase_")}
        print("    phases of one update: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    collect = result["offtrc_collection_steps_per_s"]
    print(f"OffTRC collection only, no update: {collect:8.1f} env steps/s ({collect / env_rate:.0%} of env rate)")
    for key, label in (("batch_scaling_paper", "paper defaults"), ("batch_scaling_cpu", "CPU preset")):
        rows = result.get(key, [])
        # time per FLOP relative to n_batch = 5000: 1.00 throughout means linear growth
        per_flop = {row["n_batch"]: row["update_s"] / row["update_gflop"] for row in rows}
        for row in rows:
            n_batch, seconds, gflop = row["n_batch"], row["update_s"], row["update_gflop"]
            print(
                f"  {label} n_batch={n_batch:>6}: update {seconds:.2f} s (median of {len(row['update_s_all'])}), "
                f"{gflop:.0f} GFLOP, time/FLOP {per_flop[n_batch] / per_flop[5000]:.2f} x that at 5000"
            )
    result["machine"]["load_average_at_end"] = os.getloadavg()[0]
    print(
        f"1-minute load average: {result['machine']['load_average_at_start']:.1f} at start, "
        f"{result['machine']['load_average_at_end']:.1f} at end (2 cores: above ~2 the figures are shared)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    print(f"offtrc_preset/sac throughput ratio: {result['offtrc_cpu']['steps_per_s'] / sac:.2f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
