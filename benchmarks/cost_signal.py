"""Is there a cost signal in OffTRC's replay buffer, and where does its gradient point?

    python benchmarks/cost_signal.py                        # SafetyPointGoal1-v0, seed 0, 200k steps (~12 min)
    python benchmarks/cost_signal.py --steps 100000 --seed 1
    python benchmarks/cost_signal.py --quick                # a smoke run (HazardPoint-v0, 3k steps)

Trains the recommended preset for ``--steps`` env steps on one env copy and then, on its replay
buffer (the last 50 episodes) and its policy, measures three things with Monte-Carlo returns as
targets (independent of any critic the run fitted):

1. **Critic generalisation.** A fresh 2 x 128 MLP is fitted to the discounted cost return of every
   fifth episode's complement and scored on those held-out episodes (explained variance: 1 is
   perfect, 0 no better than a constant, 2,000 Adam steps of 500 rows, checked every 250), for cost
   discounts 0 (the step cost itself), 0.9 and 0.99, on the standardised native observation and on
   the same with one more input, the largest hazard-lidar bin (the hazard signal: the point is in a
   hazard when that bin exceeds about 0.93). The reward return (discount 0.99) is the control.
2. **Which parameters the cost gradient lives on.** The gradient of OffTRC's expected-cost
   surrogate at the current policy (truncated importance weights, the weighted baseline, advantage
   = Monte-Carlo cost return minus a fitted value), as each parameter tensor's share of its
   squared norm, and the first layer's share split by the sensor its inputs come from.
3. **Signal or noise.** The same gradient on two random halves of the episodes (three splits): the
   cosine of the halves in the plain parameter metric (what ``diag/*_grad_split_cos`` logs in
   training) and in the Fisher metric of the step, ``b1' F^-1 b2 / sqrt(b1' F^-1 b1 b2' F^-1 b2)``
   (conjugate gradients as in the step: 10 iterations, damping 0.01), for three advantages: the
   0.99-discounted return minus a fitted value (about what OffTRC's lambda = 0.97 targets give), and
   the one-step TD error of a value of the 0.9-discounted return (``cost_gamma=0.9,
   cost_gae_lambda=0``) on the native inputs and with the largest hazard bin added.

Prints the tables and writes ``benchmarks/results/cost_signal_<env>_seed<k>_<steps//1000>k.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from sb3_contrib.common.utils import flat_grad
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's sb3_offtrc

from sb3_offtrc.core.surrogates import centred_corrections  # noqa: E402
from sb3_offtrc.core.trust_region import fisher_cosine, gaussian_fisher_vector_product  # noqa: E402
from sb3_offtrc.envs.observations import sensor_slices  # noqa: E402
from sb3_offtrc.envs.safety import make_safety_env  # noqa: E402
from sb3_offtrc.offtrc import OffTRC, get_preset  # noqa: E402
from sb3_offtrc.offtrc.policies import gaussian_log_prob  # noqa: E402


def discounted_returns(values: np.ndarray, ends: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Discounted return of every row to its episode's end, and how many rows that episode has left."""
    out, left = np.zeros(len(values)), np.zeros(len(values), dtype=int)
    running, count = 0.0, 0
    for t in range(len(values) - 1, -1, -1):
        if ends[t]:
            running, count = 0.0, 0
        running = values[t] + gamma * running
        count += 1
        out[t], left[t] = running, count
    return out.astype(np.float32), left


def mlp(n_in: int, width: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


def explained_variance(prediction: np.ndarray, target: np.ndarray) -> float:
    return float(1.0 - np.var(target - prediction) / np.var(target)) if np.var(target) > 0 else float("nan")


def value_fit(
    inputs: th.Tensor,
    target: np.ndarray,
    rows: np.ndarray,
    steps: int,
    seed: int,
    check: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """A fresh MLP fitted to ``target`` on ``rows`` by ``steps`` Adam steps of 500 rows (lr 1e-3,
    gradient norm clipped to 1, as OffTRC's critics); ``check(net)`` every 250 steps."""
    th.manual_seed(seed)
    net = mlp(inputs.shape[1])
    optimizer = th.optim.Adam(net.parameters(), lr=1e-3)
    y, idx, rng = th.tensor(target), np.flatnonzero(rows), np.random.default_rng(seed)
    for step in range(1, steps + 1):
        batch = th.tensor(rng.choice(idx, 500))
        loss = 0.5 * ((net(inputs[batch]).squeeze(-1) - y[batch]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        if check is not None and step % 250 == 0:
            check(net)
    return net


def fit_and_score(
    inputs: th.Tensor, target: np.ndarray, train: np.ndarray, test: np.ndarray, steps: int, seed: int
) -> dict[str, float]:
    """Fit a fresh MLP on ``train`` rows; held-out explained variance at the end and at its best check."""
    checks: list[float] = []

    def score(net: nn.Module) -> None:
        with th.no_grad():
            checks.append(explained_variance(net(inputs[test]).squeeze(-1).numpy(), target[test]))

    value_fit(inputs, target, train, steps, seed, check=score)
    return {"final": checks[-1], "best": max(checks), "best_step": 250 * (int(np.argmax(checks)) + 1)}


def main() -> None:
    from onerun import code_version  # the commit of this checkout (the script's folder is on sys.path)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="SafetyPointGoal1-v0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200_000, help="env steps of training before the measurement")
    parser.add_argument("--fit-steps", type=int, default=2000, help="Adam steps of each held-out critic fit")
    parser.add_argument("--quick", action="store_true", help="smoke run: HazardPoint-v0, 3k steps, short fits")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.env, args.steps, args.fit_steps = "HazardPoint-v0", 3000, 250
    th.set_num_threads(1)
    started = time.perf_counter()

    env = make_safety_env(args.env)
    hyper = get_preset("recommended")
    if args.quick:
        hyper.update(n_steps=500, n_recent=500, n_batch=3000, buffer_size=3000)
    model = OffTRC("MlpPolicy", env, seed=args.seed, **hyper)
    model.learn(args.steps)
    buffer = model.replay_buffer
    size = buffer.buffer_size if buffer.full else buffer.pos
    order = (np.arange(size) + buffer.pos) % size if buffer.full else np.arange(size)
    obs = buffer.observations[order, 0].astype(np.float32)
    actions = buffer.actions[order, 0].astype(np.float32)
    costs, rewards = buffer.costs[order, 0], buffer.rewards[order, 0]
    ends = (buffer.dones[order, 0] + buffer.timeouts[order, 0]) > 0
    episode = np.cumsum(np.r_[0, ends[:-1]])
    n_episodes = int(episode.max()) + 1
    horizon = 1 if args.quick else 300  # rows whose return the episode's end cuts by under gamma^300 = 5%
    sensors = sensor_slices(getattr(env.unwrapped, "task", None))
    hazard = sensors.get("hazards_lidar")
    inputs = {"native": obs}
    if hazard is not None:
        inputs["native + max hazard bin"] = np.concatenate([obs, obs[:, hazard].max(axis=1, keepdims=True)], axis=1)
    held_out = episode % 5 == 4
    report: dict[str, Any] = {
        "env": args.env, "seed": args.seed, "steps": args.steps, "episodes": n_episodes,
        "cost_per_episode": float(costs.sum() / n_episodes), "critics": [], "gradient": {},
        "code": code_version("benchmarks/cost_signal.py"),
    }  # fmt: skip

    # 1. critic generalisation
    print(f"{args.env}, seed {args.seed}, after {args.steps} steps: {n_episodes} episodes in the buffer, "
          f"{report['cost_per_episode']:.1f} cost per episode")  # fmt: skip
    print("held-out explained variance (final / best at Adam step)")
    jobs = [("reward", 0.99, "native")] + [("cost", g, name) for g in (0.0, 0.9, 0.99) for name in inputs]
    for kind, gamma, name in jobs:
        target, left = discounted_returns(costs if kind == "cost" else rewards, ends, gamma)
        valid = left >= (horizon if gamma > 0.5 else 1)
        x = th.tensor(inputs[name])
        x = (x - x[~held_out].mean(0)) / (x[~held_out].std(0) + 1e-6)
        score = fit_and_score(x, target, ~held_out & valid, held_out & valid, args.fit_steps, args.seed)
        report["critics"].append({"target": kind, "gamma": gamma, "inputs": name, **score})
        print(
            f"  {kind:6s} gamma {gamma:4.2f} {name:26s} "
            f"{score['final']:6.3f} / {score['best']:6.3f} at {score['best_step']}"
        )

    # 2-3. the cost gradient of the expected-cost surrogate at the current policy
    policy = model.policy
    params = [p for p in policy.actor.parameters() if p.requires_grad]
    names = [n for n, p in policy.actor.named_parameters() if p.requires_grad]
    o, a = th.tensor(obs), th.tensor(actions)
    with th.no_grad():
        mean_k, std_k = policy.distribution(o)
        behaviour = gaussian_log_prob(
            a, th.tensor(buffer.behaviour_mean[order, 0]), th.tensor(buffer.behaviour_std[order, 0])
        )
        rho = th.clamp(th.exp(gaussian_log_prob(a, mean_k, std_k) - behaviour), max=1.0)
    next_obs = buffer.next_observations[order, 0].astype(np.float32)
    fails = th.tensor(buffer.fails[order, 0].astype(np.float32))
    next_inputs = {"native": next_obs}
    if hazard is not None:
        next_inputs["native + max hazard bin"] = np.concatenate(
            [next_obs, next_obs[:, hazard].max(axis=1, keepdims=True)], axis=1
        )

    def standardised(name: str) -> tuple[th.Tensor, th.Tensor]:
        here, there = th.tensor(inputs[name]), th.tensor(next_inputs[name])
        shift, scale = here.mean(0), here.std(0) + 1e-6
        return (here - shift) / scale, (there - shift) / scale

    def cost_gradient(rows: np.ndarray, seed: int, estimator: tuple[str, float, str]) -> th.Tensor:
        """The surrogate's gradient with the advantage of ``estimator`` = (kind, cost discount, inputs):
        ``mc``, the discounted return minus a value fitted to it; ``td``, that value's one-step TD error
        (OffTRC's advantage with ``cost_gae_lambda=0``)."""
        kind, gamma, name = estimator
        target, _ = discounted_returns(costs, ends, gamma)
        x, x_next = standardised(name)
        value = value_fit(x, target, rows, args.fit_steps, seed)
        r = th.tensor(np.flatnonzero(rows))
        with th.no_grad():
            if kind == "mc":
                advantage = th.tensor(target)[r] - value(x[r]).squeeze(-1)
            else:
                step = th.tensor(costs.astype(np.float32))[r]
                advantage = step + gamma * (1.0 - fails[r]) * value(x_next[r]).squeeze(-1) - value(x[r]).squeeze(-1)
        mean, std = policy.distribution(o[r])
        ratio = th.exp(gaussian_log_prob(a[r], mean, std) - gaussian_log_prob(a[r], mean_k[r], std_k[r]))
        centred = centred_corrections(advantage, rho[r], weighted_baseline=True)
        return flat_grad((ratio * centred).mean() / (1.0 - gamma), params)

    _, left = discounted_returns(costs, ends, model.gamma)
    valid = left >= horizon
    estimators = [("mc", model.gamma, "native"), ("td", 0.9, "native")]
    if hazard is not None:
        estimators.append(("td", 0.9, "native + max hazard bin"))

    full = cost_gradient(valid, args.seed, estimators[0])
    shares = {
        n: float(chunk @ chunk) / float(full @ full)
        for n, chunk in zip(names, th.split(full, [p.numel() for p in params]), strict=True)
    }
    report["gradient"]["norm_share"] = shares
    first_layer = next(p for p in params if p.dim() == 2 and p.shape[1] == obs.shape[1])
    offset = sum(p.numel() for p in params[: [id(q) for q in params].index(id(first_layer))])
    columns = (full[offset : offset + first_layer.numel()].view_as(first_layer) ** 2).sum(0)
    by_sensor = {key: float(columns[where].sum() / columns.sum()) for key, where in sensors.items()}
    report["gradient"]["first_layer_share_by_sensor"] = by_sensor
    report["gradient"]["input_std_by_sensor"] = {
        key: float(obs[:, where].std(0).mean()) for key, where in sensors.items()
    }
    report["gradient"]["policy_std"] = float(std_k.mean())
    print(f"policy std {float(std_k.mean()):.3f}; the cost gradient's squared norm by parameter tensor:")
    print("  " + ", ".join(f"{n} {v:.2f}" for n, v in shares.items()))
    if by_sensor:
        print("the first layer's share by sensor (input std):")
        stds = report["gradient"]["input_std_by_sensor"]
        print("  " + ", ".join(f"{k} {v:.2f} ({stds[k]:.2f})" for k, v in by_sensor.items()))
    fisher_rows = th.randperm(len(o), generator=th.Generator().manual_seed(args.seed))[: max(1, len(o) // 10)]
    fisher_mean, fisher_std = policy.distribution(o[fisher_rows])
    hvp = gaussian_fisher_vector_product(fisher_mean, fisher_std, params, model.damping)
    report["gradient"]["split_half"] = {}
    print("cosine of the two halves' cost gradients (plain / Fisher metric), three random splits of the episodes:")
    for estimator in estimators:
        splits = []
        for split in range(3):
            halves = np.random.default_rng(100 + split).permutation(n_episodes)[episode] % 2 == 0
            first = cost_gradient(valid & halves, split, estimator)
            second = cost_gradient(valid & ~halves, split, estimator)
            plain = float(first @ second / (first.norm() * second.norm()))
            fisher = fisher_cosine(hvp, first, second, model.cg_max_steps)
            splits.append({"plain": plain, "fisher": fisher})
        label = f"{estimator[0]} advantage, cost discount {estimator[1]}, {estimator[2]}"
        report["gradient"]["split_half"][label] = splits
        print(f"  {label:55s} " + "   ".join(f"{c['plain']:6.3f} / {c['fisher']:6.3f}" for c in splits))
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    out = args.out or RESULTS / f"cost_signal_{args.env}_seed{args.seed}_{args.steps // 1000}k.json"
    if not args.quick or args.out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
