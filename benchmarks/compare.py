"""Compare two groups of finished ``benchmarks/run.py`` runs, or summarise their logged updates.

``violations``: the training violations (``train_cv_total``) of two groups of run directories
(each ``.../<algo>/seed<k>`` with a ``summary.json``), mean ± std over seeds (as in report.py),
the difference of means and the one-sided permutation p-value of ``report.py`` for "group B has
more violations than group A by chance"; where the groups share two or more seeds (and each group
has one run per seed), also the paired comparison on those seeds. Groups may come from different
results directories, e.g. the same settings run by two versions of the code.

``updates``: for runs made with ``run.py --train-log``, statistics of OffTRC's logged updates from
``progress.csv``: how often each case of the step rule was taken, the trust region and the KL of
the steps, the behaviour policy's KL from the current one, the policy's entropy, and the three
critics' training losses at the end of each fit.

Usage::

    python benchmarks/compare.py violations --a 'DIR_A/seed*' --b 'DIR_B/seed*' ['DIR_C/seed*' ...]
    python benchmarks/compare.py updates RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

_UPDATE_KEYS = [
    "train/trust_region",
    "train/kl",
    "train/behaviour_kl",
    "train/entropy",
    "train/line_search_steps",
    # each critic's training loss over its last pass (full-batch fit: the last epoch's loss)
    "train/reward_critic_loss",
    "train/cost_critic_loss",
    "train/cost_std_critic_loss",
]


def _report_module():  # noqa: ANN202 - the sibling script, loaded by path (benchmarks/ is no package)
    spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).resolve().parent / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def violations(patterns: list[str]) -> dict[str, tuple[int, float]]:
    """``(seed, train_cv_total)`` of every finished run directory matching one of ``patterns``, by directory."""
    found = {}
    for run_dir in sorted({path for pattern in patterns for path in glob.glob(pattern)}):
        summary = Path(run_dir) / "summary.json"
        if summary.exists():
            data = json.loads(summary.read_text())
            found[run_dir] = (int(data["seed"]), float(data["train_cv_total"]))
    if len(found) < 2:
        raise SystemExit(f"{' '.join(patterns)}: {len(found)} finished run(s) (summary.json); a group needs at least 2")
    return found


def compare_violations(patterns_a: list[str], patterns_b: list[str]) -> str:
    report = _report_module()
    runs_a, runs_b = list(violations(patterns_a).values()), list(violations(patterns_b).values())
    a, b = np.array([v for _, v in runs_a]), np.array([v for _, v in runs_b])
    p = report.permutation_p_value(a.tolist(), b.tolist())
    lines = [
        f"{name}: {' '.join(patterns)}: {len(values)} runs, violations {values.mean():,.0f} ± {values.std():,.0f} "
        f"({', '.join(f'{v:,.0f}' for v in values)})"
        for name, values, patterns in (("A", a, patterns_a), ("B", b, patterns_b))
    ]
    lines.append(
        f"B - A: {b.mean() - a.mean():+,.0f}; one-sided permutation p (B above A by chance): {report.format_p(p)}"
    )
    # a seed fixes the env's layouts: the seeds both groups ran, compared pair by pair
    by_seed_a, by_seed_b = dict(runs_a), dict(runs_b)
    pairs_a, pairs_b = report.seed_pairs(by_seed_a, by_seed_b)
    if len(by_seed_a) == len(runs_a) and len(by_seed_b) == len(runs_b) and len(pairs_a) >= 2:
        paired = report.paired_p_value(pairs_a, pairs_b)
        lines.append(
            f"same seeds ({len(pairs_a)}): A {np.mean(pairs_a):,.0f}, B {np.mean(pairs_b):,.0f}, mean B - A "
            f"{np.mean(pairs_b) - np.mean(pairs_a):+,.0f}; one-sided paired p (sign flips): {report.format_p(paired)}"
        )
    return "\n".join(lines)


def update_statistics(run_dir: Path) -> dict[str, float | int | dict[str, int]]:
    """Statistics of the updates logged in ``run_dir/progress.csv`` (``run.py --train-log``)."""
    path = run_dir / "progress.csv"
    if not path.exists():
        raise SystemExit(f"{path}: not found; run benchmarks/run.py with --train-log")
    updates = pd.read_csv(path).dropna(subset=["train/step_case"])
    stats: dict[str, float | int | dict[str, int]] = {
        "updates": len(updates),
        "step_case": {str(k): int(v) for k, v in updates["train/step_case"].value_counts().items()},
        "line_search_failed": int(updates["train/line_search_failed"].sum()),
    }
    for key in _UPDATE_KEYS:
        stats[f"{key.removeprefix('train/')} mean"] = float(updates[key].mean())
        stats[f"{key.removeprefix('train/')} median"] = float(updates[key].median())
    stats["entropy min"] = float(updates["train/entropy"].min())
    stats["entropy max"] = float(updates["train/entropy"].max())
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    vio = sub.add_parser("violations", help="training violations of two groups of runs, with a permutation p")
    vio.add_argument("--a", nargs="+", required=True, help="glob(s) of group A's run directories (the reference)")
    vio.add_argument("--b", nargs="+", required=True, help="glob(s) of group B's run directories")
    upd = sub.add_parser("updates", help="statistics of the updates logged by run.py --train-log")
    upd.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)

    if args.command == "violations":
        print(compare_violations(args.a, args.b))
        return 0
    for run_dir in args.run_dirs:
        stats = update_statistics(run_dir)
        print(run_dir)
        for key, value in stats.items():
            print(f"  {key}: {value:.6g}" if isinstance(value, float) else f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
