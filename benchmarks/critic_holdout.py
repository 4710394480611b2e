"""Do the cost critics predict their targets on data they have not been fitted on?

    python benchmarks/critic_holdout.py                    # SafetyPointGoal1-v0, seed 0, 40,000 steps (~24 min)
    python benchmarks/critic_holdout.py --seed 1 --configs preset paper_fit_128
    python benchmarks/critic_holdout.py --quick            # a smoke run on HazardPoint-v0

In ``--train-log`` runs the ``cpu`` preset's cost critics, as the preset then fitted them (5 passes
per update; 10 since), ended their fits at a larger training loss than the paper's
(docs/benchmarks.md). A lower training loss is only worth its time if it carries
over to new data: every update computes the advantages of its newest window (``n_recent`` rows)
with critics that have not yet been fitted on those rows. This script trains OffTRC with that
5-pass preset and keeps, next to its own critics, "shadow" cost-mean and cost-std critics of other
fit configurations. At every update each shadow first predicts that update's targets on the newest
window (its held-out error), then is fitted on the whole batch, on the same targets, as its
configuration says (its training error, after the fit). The shadows never act on training: the
run is the preset's, whatever shadows it carries (they draw their own random numbers). Errors are
``0.5 * mean squared error``, the critics' training loss; for scale the table also gives
``0.5 * variance`` of the held-out targets, the error of the best constant for that window. The
run's own critics are listed too, but their values enter the targets (the lambda-targets
bootstrap from them), so only the shadows compare fairly with each other; the ``preset`` shadow
is the 5-pass preset's fit, started from other weights; ``preset_10passes`` is the present
preset's.

Prints a table and writes ``benchmarks/results/critic_holdout_<env>_seed<k>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's sb3_offtrc

from sb3_offtrc.offtrc import OffTRC, WindowBatch, get_preset  # noqa: E402
from sb3_offtrc.offtrc.offtrc import fit_minibatches  # noqa: E402
from sb3_offtrc.offtrc.policies import ValueCritic  # noqa: E402


@dataclass(frozen=True)
class FitConfig:
    """Width of the two hidden layers, passes over the batch, minibatch size (None: full batch), Adam lr."""

    width: int
    passes: int
    minibatch: int | None
    lr: float


#: The configuration this script trains with: the cpu preset as it was when this diagnosis was made.
PRESET_5PASSES: dict[str, Any] = {**get_preset("cpu"), "n_critic_epochs": 5}


def fit_of_preset(preset: dict[str, Any]) -> FitConfig:
    """The critic fit of an OffTRC preset (the critics' width, passes, minibatch and lr)."""
    arch = preset["policy_kwargs"]["net_arch"]
    return FitConfig(
        (arch["vf"] if isinstance(arch, dict) else arch)[0],
        preset["n_critic_epochs"],
        preset.get("critic_batch_size"),
        preset["learning_rate"],
    )


_PRESET_FIT, _PAPER_FIT = fit_of_preset(PRESET_5PASSES), fit_of_preset(get_preset("paper"))
CONFIGS: dict[str, FitConfig] = {
    # the 5-pass preset's own fit (a second, independently initialised copy of what the run does)
    "preset": _PRESET_FIT,
    "preset_10passes": replace(_PRESET_FIT, passes=10),  # the present cpu preset's fit
    "paper_fit_128": replace(_PAPER_FIT, width=_PRESET_FIT.width),  # the paper's critic fit, preset's width
    "preset_fit_512": replace(_PRESET_FIT, width=_PAPER_FIT.width),  # the paper's width, fitted as the preset fits
    "paper": _PAPER_FIT,  # the paper's critics and fit (slow: ~27 s an update here)
}
DEFAULT_CONFIGS = ["preset", "preset_10passes", "paper_fit_128", "preset_fit_512", "paper"]


def half_mse(prediction: th.Tensor, target: th.Tensor) -> float:
    return float(0.5 * th.mean((prediction - target) ** 2))


class Shadow:
    """A cost-mean and a cost-std critic fitted on the run's targets by their own configuration."""

    def __init__(self, name: str, config: FitConfig, features_dim: int, seed: int, max_grad_norm: float = 1.0) -> None:
        self.name, self.config, self.max_grad_norm = name, config, max_grad_norm
        self.generator = th.Generator().manual_seed(seed)
        with th.random.fork_rng(devices=[]):  # the run's own random numbers stay untouched
            th.manual_seed(seed)
            arch = [config.width, config.width]
            self.critics = {
                "cost": ValueCritic(features_dim, arch, nn.ReLU, positive=False),
                "cost_std": ValueCritic(features_dim, arch, nn.ReLU, positive=True),
            }
        self.optimizers = {key: th.optim.Adam(c.parameters(), lr=config.lr) for key, c in self.critics.items()}
        self.records: list[dict[str, float]] = []

    def step(self, features: th.Tensor, targets: dict[str, th.Tensor], held_out: th.Tensor) -> dict[str, float]:
        """Held-out error on the ``held_out`` rows, then the fit on all rows and its training error."""
        record: dict[str, float] = {}
        start = time.perf_counter()
        for key, critic in self.critics.items():
            with th.no_grad():
                record[f"{key}_held_out"] = half_mse(critic(features[held_out]), targets[key][held_out])
            self._fit(critic, self.optimizers[key], features, targets[key])
            with th.no_grad():
                record[f"{key}_train"] = half_mse(critic(features), targets[key])
        record["fit_seconds"] = time.perf_counter() - start
        self.records.append(record)
        return record

    def _fit(self, critic: nn.Module, optimizer: th.optim.Optimizer, features: th.Tensor, target: th.Tensor) -> None:
        # OffTRC's minibatch fit (a full batch is one step per pass), shuffled by the shadow's own
        # generator so that the run's random numbers stay untouched.
        fit_minibatches(
            critic,
            optimizer,
            features,
            target,
            n_passes=self.config.passes,
            batch_size=self.config.minibatch or features.shape[0],
            max_grad_norm=self.max_grad_norm,
            generator=self.generator,
        )


class ProbedOffTRC(OffTRC):
    """OffTRC that shows each update's batch and targets to its shadows before fitting its own critics."""

    shadows: list[Shadow]
    own_records: list[dict[str, float]]
    _held_out: th.Tensor | None = None

    def _update(self, batch: WindowBatch) -> None:
        self._held_out = batch.recent.bool()
        super()._update(batch)

    def _fit_critics(
        self,
        obs: th.Tensor,
        reward_target: th.Tensor,
        cost_target: th.Tensor,
        std_target: th.Tensor,
        actions: th.Tensor | None = None,
        next_obs: th.Tensor | None = None,
    ) -> None:
        assert self._held_out is not None
        held_out = self._held_out
        with th.no_grad():
            features = self.policy.features(obs)
            own = {
                "cost_held_out": half_mse(self.policy.cost_critic(features[held_out]), cost_target[held_out]),
                "cost_std_held_out": half_mse(self.policy.cost_std_critic(features[held_out]), std_target[held_out]),
                "cost_target_half_var": float(0.5 * cost_target[held_out].var(unbiased=False)),
                "cost_std_target_half_var": float(0.5 * std_target[held_out].var(unbiased=False)),
            }
        targets = {"cost": cost_target, "cost_std": std_target}
        for shadow in self.shadows:
            shadow.step(features, targets, held_out)
        super()._fit_critics(obs, reward_target, cost_target, std_target, actions=actions, next_obs=next_obs)
        with th.no_grad():
            own["cost_train"] = half_mse(self.policy.cost_critic(features), cost_target)
            own["cost_std_train"] = half_mse(self.policy.cost_std_critic(features), std_target)
        self.own_records.append(own)


def summarise(records: list[dict[str, float]], skip: int) -> dict[str, float]:
    """Mean of every recorded quantity over the updates after the first ``skip``."""
    kept = records[skip:]
    if not kept:
        raise SystemExit(f"no update after the first {skip}: train longer or lower --skip")
    return {key: float(np.mean([r[key] for r in kept])) for key in kept[0]}


def run(env_id: str, seed: int, steps: int, configs: list[str], skip: int, hyperparams: dict[str, Any]) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from onerun import make_env  # the benchmark harness's env construction
    from stable_baselines3.common.vec_env import DummyVecEnv

    env = DummyVecEnv([lambda: make_env(env_id, seed)])
    model = ProbedOffTRC("MlpPolicy", env, seed=seed, device="cpu", **hyperparams)
    features_dim = model.policy.features_extractor.features_dim
    model.shadows = [Shadow(name, CONFIGS[name], features_dim, seed=1000 + i) for i, name in enumerate(configs)]
    model.own_records = []
    start = time.perf_counter()
    model.learn(steps)
    result = {
        "env_id": env_id,
        "seed": seed,
        "env_steps": int(model.num_timesteps),
        "updates": len(model.own_records),
        "skipped_updates": skip,
        "wall_time": round(time.perf_counter() - start, 1),
        "hyperparams": hyperparams,
        "run_critics": summarise(model.own_records, skip),
        "shadows": {
            s.name: {"config": s.config.__dict__, **summarise(s.records, skip)} for s in model.shadows
        },  # fmt: skip
        "torch_threads": th.get_num_threads(),
    }
    return result


def table(result: dict) -> str:
    own = result["run_critics"]
    lines = [
        f"{result['env_id']}, seed {result['seed']}: {result['env_steps']:,} env steps, {result['updates']} updates, "
        f"means over updates {result['skipped_updates'] + 1}-{result['updates']}",
        f"0.5 x variance of the held-out targets: cost {own['cost_target_half_var']:.3f}, "
        f"cost std {own['cost_std_target_half_var']:.3f}",
        "",
        f"{'critics':<16} {'cost held-out':>14} {'cost train':>11} {'std held-out':>13} {'std train':>10} {'fit s':>7}",
        f"{'run (preset)':<16} {own['cost_held_out']:>14.3f} {own['cost_train']:>11.3f} "
        f"{own['cost_std_held_out']:>13.3f} {own['cost_std_train']:>10.3f} {'':>7}",
    ]
    for name, s in result["shadows"].items():
        lines.append(
            f"{name:<16} {s['cost_held_out']:>14.3f} {s['cost_train']:>11.3f} "
            f"{s['cost_std_held_out']:>13.3f} {s['cost_std_train']:>10.3f} {s['fit_seconds']:>7.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from onerun import code_version  # the commit of this checkout (the script's folder is on sys.path)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="SafetyPointGoal1-v0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40_000)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=sorted(CONFIGS))
    parser.add_argument("--skip", type=int, default=5, help="first updates left out of the means (warm-up)")
    parser.add_argument("--cost-limit", type=float, default=0.025)
    parser.add_argument("--quick", action="store_true", help="HazardPoint-v0, 3,000 steps, small batches")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/critic_holdout_*.json)")
    args = parser.parse_args(argv)
    th.set_num_threads(args.threads)
    os.environ.setdefault("MUJOCO_GL", "egl")

    hyperparams: dict[str, Any] = {**PRESET_5PASSES, "cost_limit": args.cost_limit}
    if args.quick:
        args.env, args.steps, args.skip = "HazardPoint-v0", 3_000, 0
        hyperparams.update(n_steps=500, n_recent=500, n_batch=1_500, buffer_size=3_000)
    result = run(args.env, args.seed, args.steps, args.configs, args.skip, hyperparams)
    result["code"] = code_version("benchmarks/critic_holdout.py")
    print(table(result))
    out = Path(args.out) if args.out else RESULTS / f"critic_holdout_{args.env.replace('/', '_')}_seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
