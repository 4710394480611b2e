"""Would one batched ensemble of the three critics fit faster than three separate networks?

    python benchmarks/critic_ensemble.py              # both shapes, one torch thread
    python benchmarks/critic_ensemble.py --quick      # fewer repeats (a smoke run)

The issue on speed lists "the three critics as one batched ensemble" as a candidate. This script
measures it before it is built: it times OffTRC's own critic fit (three MLPs, three fused Adam
optimisers, per-critic gradient clipping) against the same fit done by one module whose three
members' weights are stacked and multiplied with ``torch.baddbmm`` (one forward, one backward and
one Adam step per minibatch for all three). The ensemble starts from the same weights and gets the
same minibatch order, so both fits compute the same update; the script checks that (largest
parameter difference) before it trusts the timings. Two shapes: the ``cpu`` preset (2 x 128, five
passes of minibatches of 500) and the paper's settings (2 x 512, full-batch steps; ten of the
paper's hundred, to keep the run short). Prints a table and writes
``benchmarks/results/critic_ensemble.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.logger import configure
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's sb3_offtrc


class StackedCritics(nn.Module):
    """Three MLP critics as one module: weights stacked along a leading member axis."""

    def __init__(self, critics: list[nn.Module]) -> None:
        super().__init__()
        linears = [[m for m in critic.modules() if isinstance(m, nn.Linear)] for critic in critics]
        self.weights = nn.ParameterList(
            nn.Parameter(th.stack([layers[i].weight.detach().t() for layers in linears]).clone())
            for i in range(len(linears[0]))
        )
        self.biases = nn.ParameterList(
            nn.Parameter(th.stack([layers[i].bias.detach()[None] for layers in linears]).clone())
            for i in range(len(linears[0]))
        )
        self.positive = [bool(getattr(critic, "positive", False)) for critic in critics]

    def forward(self, features: th.Tensor) -> th.Tensor:
        """``(members, rows)`` values."""
        hidden = features.expand(len(self.positive), *features.shape)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            hidden = th.baddbmm(bias, hidden, weight)
            if i < len(self.weights) - 1:
                hidden = th.relu(hidden)
        out = hidden.squeeze(-1)
        positive = th.tensor(self.positive, device=out.device)[:, None]
        return th.where(positive, nn.functional.softplus(out), out)


def ensemble_fit(
    ensemble: StackedCritics, optimizer: th.optim.Optimizer, features: th.Tensor, targets: th.Tensor,
    orders: list[th.Tensor], batch_size: int, max_grad_norm: float,
) -> None:  # fmt: skip
    """The update of ``OffTRC._fit_minibatches`` for all three members at once (one order per pass)."""
    params = list(ensemble.parameters())
    for order in orders:
        shuffled_features, shuffled_targets = features[order], targets[:, order]
        for start in range(0, features.shape[0], batch_size):
            inputs, wanted = (
                shuffled_features[start : start + batch_size],
                shuffled_targets[:, start : start + batch_size],
            )
            optimizer.zero_grad()
            loss = 0.5 * ((ensemble(inputs) - wanted) ** 2).mean(dim=1).sum()
            loss.backward()
            with th.no_grad():  # clip each member's gradient norm on its own, as three clip_grad_norm_ calls
                norms = th.sqrt(sum(p.grad.pow(2).flatten(1).sum(1) for p in params))  # type: ignore[union-attr]
                scale = th.clamp(max_grad_norm / (norms + 1e-6), max=1.0)
                for p in params:
                    p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)))  # type: ignore[union-attr]
            optimizer.step()


class ShapeOnlyEnv(gym.Env):
    """An env with SafetyPointGoal1's spaces (60 observations, 2 actions); the fits never step it."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (60,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


def measure(name: str, preset: dict[str, Any], repeats: int) -> dict[str, Any]:
    from sb3_offtrc import OffTRC

    if preset.get("surrogate", "importance") != "importance":
        # the separate side would time the action-value critics' fits as well, the stacked side not
        raise ValueError(
            f"critic_ensemble.py stacks the three state-value critics only; {name!r} has "
            f"surrogate={preset['surrogate']!r}: measure a preset without it"
        )
    model = OffTRC("MlpPolicy", ShapeOnlyEnv(), seed=0, device="cpu", **preset)
    model.set_logger(configure(None, []))  # _fit_critics records its losses
    policy = model.policy
    n_rows, obs_dim = model.n_batch, int(np.prod(model.observation_space.shape))
    gen = th.Generator().manual_seed(0)
    obs = th.randn(n_rows, obs_dim, generator=gen)
    targets = th.stack(
        [th.randn(n_rows, generator=gen), th.randn(n_rows, generator=gen), th.rand(n_rows, generator=gen)]
    )
    batch_size = model.critic_batch_size or n_rows
    passes = model.n_critic_epochs
    critics = [policy.reward_critic, policy.cost_critic, policy.cost_std_critic]
    ensemble = StackedCritics(critics)
    optimizer = th.optim.Adam(ensemble.parameters(), lr=model.learning_rate, fused=True)  # type: ignore[arg-type]

    def separate() -> None:
        th.manual_seed(1)
        model._fit_critics(obs, targets[0], targets[1], targets[2])

    def stacked() -> None:
        th.manual_seed(1)
        orders = [th.randperm(n_rows) for _ in range(passes)]
        ensemble_fit(ensemble, optimizer, obs, targets, orders, batch_size, model.max_grad_norm)

    # Equality check on copies, from the same start: OffTRC._fit_critics draws its own order per
    # critic and pass, so the separate side is written out here with the ensemble's shared orders.
    check_model, check_ensemble = copy.deepcopy(model), copy.deepcopy(ensemble)
    check_optimizer = th.optim.Adam(check_ensemble.parameters(), lr=model.learning_rate, fused=True)  # type: ignore[arg-type]
    th.manual_seed(1)
    orders = [th.randperm(n_rows) for _ in range(passes)]
    ensemble_fit(check_ensemble, check_optimizer, obs, targets, orders, batch_size, model.max_grad_norm)
    check_policy = check_model.policy
    check_critics = [check_policy.reward_critic, check_policy.cost_critic, check_policy.cost_std_critic]
    # the three state-value critics' own optimisers (an action-value model has two more, not stacked here)
    check_optimizers = [check_policy.reward_optimizer, check_policy.cost_optimizer, check_policy.cost_std_optimizer]
    for critic, optimizer_k, target in zip(check_critics, check_optimizers, targets, strict=True):
        for order in orders:
            for start in range(0, n_rows, batch_size):
                rows = order[start : start + batch_size]
                optimizer_k.zero_grad()
                (0.5 * ((critic(obs[rows]) - target[rows]) ** 2).mean()).backward()
                nn.utils.clip_grad_norm_(critic.parameters(), model.max_grad_norm)
                optimizer_k.step()
    reference = StackedCritics(check_critics)
    max_diff = max(
        float((a - b).detach().abs().max())
        for a, b in zip(check_ensemble.parameters(), reference.parameters(), strict=True)
    )

    times: dict[str, list[float]] = {"separate": [], "ensemble": []}
    separate(), stacked()  # warm-up
    for _ in range(repeats):  # interleaved, so that a load change hits both
        for key, fit in (("separate", separate), ("ensemble", stacked)):
            start = time.perf_counter()
            fit()
            times[key].append(time.perf_counter() - start)
    row = {
        "shape": name,
        "net_arch": preset["policy_kwargs"]["net_arch"],
        "rows": n_rows,
        "batch_size": batch_size,
        "passes": passes,
        "adam_steps_per_critic": passes * math.ceil(n_rows / batch_size),
        "separate_s": float(np.median(times["separate"])),
        "ensemble_s": float(np.median(times["ensemble"])),
        "max_param_difference": max_diff,
    }
    row["ensemble_over_separate"] = row["ensemble_s"] / row["separate_s"]
    return row


def main() -> None:
    from onerun import code_version  # the commit of this checkout (the script's folder is on sys.path)

    from sb3_offtrc import get_preset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "critic_ensemble.json"))
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    repeats = 3 if args.quick else 15
    paper = {**get_preset("paper"), "n_critic_epochs": 10}
    rows = [measure("cpu preset", get_preset("cpu"), repeats), measure("paper (10 of 100 steps)", paper, repeats)]
    print(f"{'shape':<26}{'Adam steps':>11}{'separate (s)':>14}{'ensemble (s)':>14}{'ratio':>8}{'max diff':>11}")
    for r in rows:
        print(
            f"{r['shape']:<26}{r['adam_steps_per_critic']:>11}{r['separate_s']:>14.3f}{r['ensemble_s']:>14.3f}"
            f"{r['ensemble_over_separate']:>8.2f}{r['max_param_difference']:>11.1e}"
        )
    load = os.getloadavg()[0]
    print(f"torch threads {th.get_num_threads()}, 1-minute load average {load:.1f}")
    result = {
        "threads": th.get_num_threads(), "load_average": load, "torch": th.__version__, "rows": rows,
        "code": code_version("benchmarks/critic_ensemble.py"),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
