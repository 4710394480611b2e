"""Summarise OffTRC's per-update telemetry of benchmark runs made with ``run.py --train-log``.

For every ``<env>/<algo>/seed<k>/progress.csv`` under a results directory, one row per algorithm
(medians over its updates, averaged over seeds) of the numbers that say why a run does or does not
improve (docs/diagnosis.md explains each):

- the share of updates in each step case (feasible / constrained / recovery / skipped, or multiplier
  with ``cost_step="multiplier"``, whose median weight of the cost direction is ``cost_weight``);
- the trust region used against ``max_kl`` and the KL the line search reached;
- the reward-surrogate gain of the accepted step and the policy mean's displacement;
- the CVaR estimate, the share of it that is the variance term ``k sqrt(V_hat)``, ``J_hat`` against
  the Monte-Carlo discounted cost return of the same windows;
- the critics' explained variance on the newest windows before they are fitted (held-out);
- the split-half cosines of the reward and CVaR gradients, ``cos2`` of the dual, the action std at
  the start and at the end;
- whether the steps' cost side does what it predicts (after the first fifth of the updates): the
  mean ``J_hat`` of the next five windows after a recovery step minus that after a feasible step,
  against the same difference of the CVaR changes the steps predicted (finding 21);
- the same over the whole run (after the first fifth): how far the CVaR estimate moved against the
  sum of the changes the accepted steps predicted, and their ratio; likewise the recent windows'
  reward return against the steps' predicted reward changes, where logged (finding 25).

Usage::

    python benchmarks/diagnose.py --results benchmarks/results/learn [--env SafetyPointGoal1-v0]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

CASES = ("feasible", "constrained", "recovery", "multiplier", "skipped")


def summarise_run(progress: Path, max_kl: float) -> dict[str, float]:
    """The telemetry summary of one run (medians over its updates)."""
    frame = pd.read_csv(progress)
    updates = frame.dropna(subset=["train/step_case_id"])
    if updates.empty:
        return {}
    row: dict[str, float] = {}
    cases = updates["train/step_case"].value_counts(normalize=True)
    for case in CASES:
        row[case] = float(cases.get(case, 0.0))

    def median(column: str) -> float:
        return float(updates[column].median()) if column in updates else math.nan

    row["cost_weight"] = median("train/cost_multiplier")
    row["radius/max_kl"] = median("train/trust_region") / max_kl
    row["kl"] = median("train/kl")
    # the logger is dumped at episode ends, so with several env copies not every update has a row:
    # the summed KL is the mean over the logged updates times the number of updates
    row["kl_sum"] = float(updates["train/kl"].mean() * updates["train/n_updates"].max())
    row["gain"] = median("train/objective")
    row["mean_shift"] = median("diag/mean_shift")
    row["cvar"] = median("train/cvar")
    if "train/cost_std" in updates:
        variance_share = (updates["train/cvar"] - updates["train/cost_mean"]) / updates["train/cvar"].where(
            updates["train/cvar"] > 0
        )
        row["var_share"] = float(variance_share.median())
    row["J_hat"] = float(updates["train/cost_mean"].mean())
    mc_mean = "diag/mc_cost_return_mean"
    row["J_mc"] = float(updates[mc_mean].mean()) if mc_mean in updates else math.nan
    row["sd_hat"] = median("train/cost_std")
    row["sd_mc"] = median("diag/mc_cost_return_std")
    for name in ("reward", "cost", "cost_std"):
        row[f"ev_{name}"] = median(f"diag/{name}_critic_holdout_ev")
    row["cos_reward"] = median("diag/reward_grad_split_cos")
    row["cos_cvar"] = median("diag/cvar_grad_split_cos")
    row["cos2"] = median("diag/cos2")
    stds = updates["diag/std"].dropna() if "diag/std" in updates else pd.Series(dtype=float)
    row["std_first"] = float(stds.iloc[0]) if len(stds) else math.nan
    row["std_last"] = float(stds.iloc[-1]) if len(stds) else math.nan
    if "diag/cvar_after" in updates:
        settled = updates.iloc[len(updates) // 5 :]
        row["dJ_after_recovery"], row["dJ_predicted"] = case_followup(settled)
        for side, name in (("cost", "dCVaR_run"), ("reward", "dJR_run")):
            realised, predicted = run_calibration(settled, side=side)
            row[name], row[f"{name}_predicted"] = realised, predicted
            row[f"{side}_calibration"] = realised / predicted if predicted != 0 else math.nan
    return row


def run_calibration(updates: pd.DataFrame, edge: int = 50, side: str = "cost") -> tuple[float, float]:
    """(realised, predicted): how far an estimate moved over the logged updates, against the steps' predictions.

    ``side="cost"``: the CVaR estimate ``train/cvar`` and the accepted steps' predicted changes
    ``diag/cvar_after - train/cvar``; ``side="reward"``: the recent windows' reward return
    ``diag/reward_mean_window`` and the predicted changes ``diag/reward_gain_return`` (logged since
    round 8). Realised: the mean estimate of the last ``edge`` updates minus that of the first
    ``edge``. Predicted: the same difference of the cumulative predicted changes, where the ``k``-th
    update's is the sum over the updates before it (the ``k``-th window is collected by the policy
    those steps made). If every step changed the return by what it predicted, the two would be equal;
    their ratio says what share of the predicted changes happened. NaN where the columns are missing,
    the rows skip updates (several env copies: not every update is logged) or there are fewer than
    ``2 * edge`` of them.
    """
    columns = {
        "cost": ("train/cvar", "diag/cvar_after"),
        "reward": ("diag/reward_mean_window", "diag/reward_gain_return"),
    }
    if side not in columns:
        raise ValueError(f"side must be 'cost' or 'reward', got {side!r}")
    estimate, after = columns[side]
    if len(updates) < 2 * edge or estimate not in updates or after not in updates:
        return math.nan, math.nan
    if "train/n_updates" in updates and not np.all(np.diff(updates["train/n_updates"].to_numpy(dtype=float)) == 1):
        return math.nan, math.nan
    value = updates[estimate].to_numpy(dtype=float)
    # the cost side logs the CVaR after the step, the reward side the change itself
    change = (
        (updates[after] - updates[estimate]).to_numpy(dtype=float)
        if side == "cost"
        else updates[after].to_numpy(dtype=float)
    )
    before = np.concatenate([[0.0], np.cumsum(np.nan_to_num(change))[:-1]])  # predicted change before each update
    realised = float(value[-edge:].mean() - value[:edge].mean())
    return realised, float(before[-edge:].mean() - before[:edge].mean())


def case_followup(updates: pd.DataFrame, ahead: int = 5) -> tuple[float, float]:
    """(realised, predicted): how much lower the cost is after a recovery step than after a feasible one.

    Realised: the mean ``J_hat`` of the ``ahead`` windows after each recovery step minus the same
    mean after each feasible step. Predicted: the mean CVaR change the line search accepted
    (``diag/cvar_after - train/cvar``) on those recovery steps minus that on those feasible steps.
    If each step changed the cost by what it predicts and the cases were decided by noise, the two
    would agree; NaN where either case is missing. A step counts only where the next ``ahead``
    logged rows are the next ``ahead`` updates (``train/n_updates``; the logger writes at episode
    ends, so with several env copies rows can skip updates) and its predicted change is logged.
    """
    cost = updates["train/cost_mean"].to_numpy(dtype=float)
    case = updates["train/step_case"].to_numpy()
    predicted = (updates["diag/cvar_after"] - updates["train/cvar"]).to_numpy(dtype=float)
    number = updates["train/n_updates"].to_numpy(dtype=float) if "train/n_updates" in updates else None
    later = np.full(len(cost), np.nan)
    steps = np.arange(1, ahead + 1)
    for i in range(len(cost) - ahead):
        if number is not None and not np.array_equal(number[i + 1 : i + 1 + ahead] - number[i], steps):
            continue
        later[i] = cost[i + 1 : i + 1 + ahead].mean()
    usable = ~np.isnan(later) & ~np.isnan(predicted)
    recovery, feasible = (case == "recovery") & usable, (case == "feasible") & usable
    if not recovery.any() or not feasible.any():
        return math.nan, math.nan
    realised = float(later[recovery].mean() - later[feasible].mean())
    return realised, float(predicted[recovery].mean() - predicted[feasible].mean())


def summarise(results: Path, env: str | None) -> pd.DataFrame:
    rows = []
    for progress in sorted(results.glob("*/*/seed*/progress.csv")):
        run_dir = progress.parent
        if env and run_dir.parent.parent.name != env.replace("/", "_"):
            continue
        summary_path = run_dir / "summary.json"
        if not summary_path.exists():
            continue  # unfinished
        summary = json.loads(summary_path.read_text())
        max_kl = float(summary.get("hyperparams", {}).get("max_kl", 0.001))
        row = summarise_run(progress, max_kl)
        if not row:
            continue
        final = summary.get("final_eval", {})
        row.update(
            env=run_dir.parent.parent.name,
            algo=run_dir.parent.name,
            seed=summary["seed"],
            eval_return=final.get("eval_return", math.nan),
            eval_cost=final.get("eval_cost", math.nan),
        )
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    numeric = [c for c in frame.columns if c not in ("env", "algo", "seed")]
    grouped = frame.groupby(["env", "algo"])[numeric].mean()
    grouped.insert(0, "seeds", frame.groupby(["env", "algo"]).size())
    return grouped


def markdown(table: pd.DataFrame) -> str:
    """The summary as a markdown table, one column per (env, algorithm), numbers to 3 digits."""
    columns = [algo for _env, algo in table.index]
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in table.columns:
        numeric = (int, float, np.floating, np.integer)
        cells = [f"{float(v):.3g}" if isinstance(v, numeric) else str(v) for v in table[name]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="a run.py results directory")
    parser.add_argument("--env", default=None, help="only this env id")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    table = summarise(args.results, args.env)
    if table.empty:
        hint = "train with run.py --train-log"
        print(f"no finished run with a progress.csv under {args.results} ({hint})", file=sys.stderr)
        return 1
    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.float_format", "{:.3g}".format):
        print(table.T.to_string())
    if args.out:
        args.out.write_text(markdown(table) + "\n")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
