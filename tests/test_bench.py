"""Smoke test of the benchmark harness: benchmarks/run.py + report.py on a tiny grid."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

from sb3_offtrc.core.trust_region import StepCase

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _offtrc_importable() -> bool:
    try:
        importlib.import_module("sb3_offtrc.offtrc")
    except ImportError:
        return False
    return True


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_steps_until_cost_stays_under_limit() -> None:
    report = _load("report")
    curve = pd.DataFrame({"env_steps": [0, 100, 200, 300, 400], "eval_cost": [0.0, 5.0, 1.0, 3.0, 2.0]})
    assert report.steps_until_under_limit(curve, 2.5) == 400
    assert report.steps_until_under_limit(curve, 10.0) == 0
    assert np.isnan(report.steps_until_under_limit(curve, 1.5))  # the last eval is above: never


def test_update_doc_replaces_only_the_marked_section(tmp_path: Path) -> None:
    report = _load("report")
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- BEGIN report:quick -->\nold\n<!-- END report:quick -->\noutro\n")
    report.update_doc(doc, "quick", "new table\n")
    assert doc.read_text() == "intro\n<!-- BEGIN report:quick -->\nnew table\n<!-- END report:quick -->\noutro\n"
    with pytest.raises(SystemExit):
        report.update_doc(doc, "full", "x")


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    algos = ["sac", "ppo_lag"] + (["offtrc"] if _offtrc_importable() else [])
    proc = _run("benchmarks/run.py", "--quick", "--algos", *algos, "--budget", "600", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run("benchmarks/report.py", "--results", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_run_writes_consistent_per_run_records(bench_dir: Path) -> None:
    lines = (bench_dir / "runs.jsonl").read_text().splitlines()
    summaries = {s["algo"]: s for s in map(json.loads, lines)}
    expected = {"sac", "ppo_lag"} | ({"offtrc"} if _offtrc_importable() else set())
    assert set(summaries) == expected
    for algo, summary in summaries.items():
        run_dir = bench_dir / "HazardPoint-v0" / algo / "seed0"
        assert json.loads((run_dir / "summary.json").read_text()) == summary
        assert summary["env_steps"] >= 600 and summary["wall_time"] > 0 and summary["env_steps_per_s"] > 0
        assert summary["episode_length"] == 100 and summary["episode_cost_limit"] == pytest.approx(2.5)

        episodes = pd.read_csv(run_dir / "episodes.csv")
        # HazardPoint never terminates: every episode is 100 steps and ends on a multiple of 100
        assert len(episodes) == summary["env_steps"] // 100
        assert (episodes["length"] == 100).all()
        assert (episodes["env_steps"] % 100 == 0).all()
        assert episodes["cv"].sum() == summary["train_cv_total"]
        assert (episodes["cost"] >= 0).all()

        curve = pd.read_csv(run_dir / "curve.csv")
        assert curve["env_steps"].iloc[0] == 0 and curve["env_steps"].iloc[-1] == summary["env_steps"]
        assert curve["env_steps"].is_monotonic_increasing
        # the CVaR of episode costs is the mean of the worst tail, never below the mean
        assert (curve["eval_cost_cvar"] >= curve["eval_cost"] - 1e-9).all()
        assert curve["train_cv_total"].iloc[-1] == summary["train_cv_total"]


def test_report_writes_table_and_png(bench_dir: Path) -> None:
    report = (bench_dir / "report.md").read_text()
    assert "### HazardPoint-v0" in report
    assert "| SAC | 1 |" in report and "| PPO-Lag | 1 |" in report
    png = bench_dir / "curves_HazardPoint-v0.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "![curves_HazardPoint-v0](curves_HazardPoint-v0.png)" in report


def test_rerun_skips_finished_runs(bench_dir: Path) -> None:
    summary = bench_dir / "HazardPoint-v0" / "sac" / "seed0" / "summary.json"
    before = summary.stat().st_mtime_ns
    proc = _run("benchmarks/run.py", "--quick", "--algos", "sac", "--budget", "600", "--out", str(bench_dir))
    assert proc.returncode == 0, proc.stderr
    assert "finished earlier" in proc.stdout and "0 run(s) to do" in proc.stdout
    assert summary.stat().st_mtime_ns == before
    assert len((bench_dir / "runs.jsonl").read_text().splitlines()) == (3 if _offtrc_importable() else 2)


def test_force_reruns_and_replaces_the_record(bench_dir: Path) -> None:
    summary = bench_dir / "HazardPoint-v0" / "ppo_lag" / "seed0" / "summary.json"
    before = summary.stat().st_mtime_ns
    n_lines = len((bench_dir / "runs.jsonl").read_text().splitlines())
    proc = _run(
        "benchmarks/run.py", "--quick", "--algos", "ppo_lag", "--budget", "600", "--out", str(bench_dir), "--force"
    )
    assert proc.returncode == 0, proc.stderr
    assert summary.stat().st_mtime_ns > before
    lines = (bench_dir / "runs.jsonl").read_text().splitlines()
    assert len(lines) == n_lines
    assert sum(json.loads(line)["algo"] == "ppo_lag" for line in lines) == 1
    # both invocations that trained something are on record, and the report names them
    commands = (bench_dir / "command.txt").read_text().splitlines()
    assert len(commands) == 2 and commands[1].endswith("--force") and "--algos ppo_lag" in commands[1]
    proc = _run("benchmarks/report.py", "--results", str(bench_dir), "--out", str(bench_dir / "again"))
    assert proc.returncode == 0, proc.stderr
    report = (bench_dir / "again" / "report.md").read_text()
    assert all(f"    {command}\n" in report for command in commands)


def test_report_keeps_a_longer_run_apart(tmp_path: Path) -> None:
    """A trend run at a larger budget gets its own table row and figure, not averaged into the grid's."""
    report = _load("report")

    def run(algo: str, seed: int, budget: int, final_return: float) -> object:
        steps = np.linspace(0, budget, 3)
        curve = pd.DataFrame(
            {
                "env_steps": steps,
                "train_time": steps / 10,
                "eval_return": [0.0, 1.0, final_return],
                "eval_cost": [50.0, 30, 10],
            }
        )
        episodes = pd.DataFrame({"env_steps": steps, "return": [0.0, 1, 2], "cost": [40.0, 20, 5]})
        summary = {
            "algo": algo, "env_id": "E-v0", "seed": seed, "budget": budget, "env_steps": budget,
            "episode_cost_limit": 25.0, "cost_limit": 0.025, "episode_length": 1000,
            "final_eval": {"eval_return": final_return, "eval_cost": 10.0, "eval_cost_cvar": 20.0},
            "train_cv_total": 100, "env_steps_per_s": 10.0, "env_steps_per_cpu_s": 10.0, "wall_time": 1.0,
        }  # fmt: skip
        return report.Run(summary, curve, episodes)

    runs = [run("offtrc_cpu", 0, 1000, 2.0), run("offtrc_cpu", 1, 1000, 4.0), run("offtrc_cpu", 9, 5000, 100.0)]
    rows = [line for line in report.table(runs).splitlines() if line.startswith("| OffTRC (cpu preset)")]
    assert len(rows) == 2
    # the longest budget's rows first, whichever has more runs
    assert "| 1 | 5,000 | 100.00 |" in rows[0] and "| 2 | 1,000 | 3.00 ± 1.00 |" in rows[1]
    # the longest runs' figure is unsuffixed whichever budget has more runs
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    expected = ["curves_E-v0.png", "curves_E-v0_1k.png", "curves_E-v0_1k_wallclock.png", "curves_E-v0_wallclock.png"]
    assert sorted(path.name for path in report.plot(runs, tmp_path / "a")) == expected
    more = runs[:1] + [run("offtrc_cpu", 7, 5000, 90.0), run("offtrc_cpu", 8, 5000, 80.0)]
    assert sorted(path.name for path in report.plot(more, tmp_path / "b")) == expected


def test_report_judges_costs_against_the_native_arms_limit() -> None:
    report = _load("report")

    def run(algo: str, limit: float, env: dict[str, str] | None) -> object:
        summary = {"algo": algo, "episode_cost_limit": limit, "hyperparams": {"env": env} if env else {}}
        return report.Run(summary=summary, curve=pd.DataFrame(), episodes=pd.DataFrame())

    smooth = run("rec_smooth", 50.0, {"cost": "smooth"})  # trains under its own limit, reported on the native cost
    native = run("rec", 25.0, None)
    assert report.reported_cost_limit([smooth, native]) == 25.0
    assert report.reported_cost_limit([native, smooth]) == 25.0
    assert report.reported_cost_limit([smooth]) == 50.0


def test_report_marks_runs_made_by_other_code() -> None:
    """A run whose commit's algorithm or harness code differs from the present (or is unknown) is
    marked; one made by the code of HEAD (when the working tree's is HEAD's) is not."""
    report = _load("report")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *report.RUN_CODE], cwd=ROOT, check=False)
    status = report.code_changed_since({head.stdout.strip(), "0" * 40, None})
    assert status[head.stdout.strip()] == ("" if clean.returncode == 0 else "changed since")
    assert status["0" * 40] == "unknown commit" and status[None] == "no commit recorded"

    def run(commit: str | None) -> object:
        summary = {
            "algo": "ppo", "env_id": "E-v0", "seed": 0, "budget": 10, "env_steps": 10,
            "episode_cost_limit": 25.0, "cost_limit": 0.025, "episode_length": 1000,
            "final_eval": {"eval_return": 1.0, "eval_cost": 1.0, "eval_cost_cvar": 1.0},
            "train_cv_total": 1, "env_steps_per_s": 1.0, "env_steps_per_cpu_s": 1.0, "wall_time": 1.0,
            "code": {"commit": commit, "dirty": False},
        }  # fmt: skip
        curve = pd.DataFrame({"env_steps": [10], "eval_cost": [1.0]})
        return report.Run(summary, curve, pd.DataFrame())

    assert "| PPO † |" in report.table([run("0" * 40)]) and "(no commit recorded: 1 run)" in report.table([run(None)])
    if clean.returncode == 0:
        assert "†" not in report.table([run(head.stdout.strip())])


def test_a_change_to_offtrc_marks_offtrc_runs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run is checked against the files its numbers depend on: a commit that differs from the
    present only in OffTRC's code leaves the baselines' runs unmarked, and the reverse."""
    report = _load("report")
    changed = {"offtrc": "sb3_offtrc/offtrc/offtrc.py", "lagrangian": "sb3_offtrc/lagrangian"}

    def runs() -> list[object]:
        made = []
        for algo, algo_class in (
            ("offtrc_recommended", "sb3_offtrc.offtrc.OffTRC"),
            ("ppo_lag", "sb3_offtrc.lagrangian.PPOLagrangian"),
            ("ppo", "stable_baselines3.ppo.ppo.PPO"),
        ):
            summary = {"algo": algo, "algo_class": algo_class, "code": {"commit": "a" * 40}}
            made.append(report.Run(summary, pd.DataFrame(), pd.DataFrame()))
        return made

    for what, path in changed.items():

        def fake(commits: set, root: object = None, paths: list | None = None, _path: str = path) -> dict:
            return {c: ("changed since" if _path in (paths or []) else "") for c in commits}

        monkeypatch.setattr(report, "code_changed_since", fake)
        made = runs()
        marked = {r.summary["algo"] for r in made if id(r) in report.stale_runs(made)}
        assert marked == ({"offtrc_recommended"} if what == "offtrc" else {"ppo_lag", "ppo"})
    assert (
        "sb3_offtrc/cost_signal.py" in report.OFFTRC_RUN_CODE
        and "sb3_offtrc/cost_signal.py" in report.BASELINE_RUN_CODE
    )


def test_early_table_reads_each_run_at_the_same_step_and_counts_a_seed_once() -> None:
    """--at: a long run's evaluation at the step, a short run's final one, PPO's first one past it;
    a seed that two grids both ran counts once, a run that stopped before the step not at all."""
    report = _load("report")

    def run(algo: str, seed: int, steps: list[int], returns: list[float], cv: list[float]) -> object:
        curve = pd.DataFrame(
            {"env_steps": steps, "eval_return": returns, "eval_cost": [10.0] * len(steps),
             "train_cv_total": cv, "wall_time": [float(x) / 100 for x in steps]}
        )  # fmt: skip
        return report.Run({"algo": algo, "env_id": "E-v0", "seed": seed}, curve, pd.DataFrame())

    runs = [
        run("ppo_lag", 0, [0, 50_000, 100_352, 1_000_000], [0, 1, 4, 9], [0, 10, 20, 90]),
        run("ppo_lag", 0, [0, 100_352], [0, 99], [0, 99]),  # the same seed in a 100k grid: ignored
        run("ppo_lag", 1, [0, 100_000], [0, 6], [0, 40]),
        run("sac_lag", 0, [0, 50_000], [0, 5], [0, 5]),  # stopped before 100k
    ]
    text = report.early_table(runs, 100_000)
    assert "| PPO-Lag | 2 | 5.00 ± 1.00 | 10.00 ± 0.00 | 30 ± 10 | 1,002 ± 2 |" in text
    assert "SAC-Lag" not in text


@pytest.mark.skipif(not _offtrc_importable(), reason="needs sb3_offtrc.offtrc")
def test_preset_variant_runs_its_base_class_with_its_own_hyperparameters(tmp_path: Path) -> None:
    """A preset's variant (e.g. offtrc_cpu_fisher0.2) instantiates OffTRC with the variant's settings."""
    run = _load("run")
    grid = _load("grid")
    variant = "offtrc_cpu_fisher0.2"
    assert run.PRESET_CHECK.variants[variant] == "offtrc"
    proc = _run(
        "benchmarks/run.py", "--preset-check", "--algos", variant, "--seeds", "0", "--budget", "300",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = (tmp_path / "runs.jsonl").read_text().splitlines()
    summary = json.loads(line)
    assert summary["algo"] == variant and summary["algo_class"] == "sb3_offtrc.offtrc.OffTRC"
    assert summary["hyperparams"]["fisher_fraction"] == 0.2
    assert summary["hyperparams"] == {**grid._CPU_5PASSES, "max_kl": 0.01, "fisher_fraction": 0.2}
    assert (tmp_path / "HazardPoint-v0" / variant / "seed0" / "summary.json").exists()


@pytest.mark.skipif(not _offtrc_importable(), reason="needs sb3_offtrc.offtrc")
def test_train_log_keeps_the_logger_output_of_every_episode(tmp_path: Path, bench_dir: Path) -> None:
    proc = _run(
        "benchmarks/run.py", "--quick", "--algos", "offtrc", "--budget", "800", "--train-log", "--out", str(tmp_path)
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "HazardPoint-v0" / "offtrc" / "seed0"
    progress = pd.read_csv(run_dir / "progress.csv")
    episodes = pd.read_csv(run_dir / "episodes.csv")
    # one logger row per episode, and its running means agree with the harness's own episode record
    steps = json.loads((run_dir / "summary.json").read_text())["env_steps"]
    assert steps >= 800 and len(progress) == len(episodes) == steps // 100
    assert progress["time/total_timesteps"].tolist() == episodes["env_steps"].tolist()
    expected_return = episodes["return"].expanding().mean()
    np.testing.assert_allclose(progress["rollout/ep_rew_mean"], expected_return, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(progress["rollout/ep_cost_mean"], episodes["cost"].expanding().mean(), atol=1e-9)
    # the updates' own keys are there: the constraint estimate and which case of the step rule was taken
    updates = progress.dropna(subset=["train/step_case"])
    assert len(updates) >= 1
    assert set(updates["train/step_case"]) <= {case.name.lower() for case in StepCase}
    assert np.isfinite(updates["train/cvar"]).all()
    # without the flag no logger file is written
    assert not (bench_dir / "HazardPoint-v0" / "offtrc" / "seed0" / "progress.csv").exists()


@pytest.mark.skipif(not _offtrc_importable(), reason="needs sb3_offtrc.offtrc")
def test_save_model_keeps_a_model_that_loads_and_acts(tmp_path: Path, bench_dir: Path) -> None:
    from sb3_offtrc import OffTRC

    proc = _run(
        "benchmarks/run.py", "--quick", "--algos", "offtrc", "--budget", "500", "--save-model", "--out", str(tmp_path)
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "HazardPoint-v0" / "offtrc" / "seed0"
    model = OffTRC.load(run_dir / "model.zip", device="cpu")
    assert model.num_timesteps == json.loads((run_dir / "summary.json").read_text())["env_steps"]
    action, _ = model.predict(np.zeros(model.observation_space.shape, dtype=np.float32), deterministic=True)
    assert model.action_space.contains(action)
    assert not (run_dir / "vecnormalize.pkl").exists()  # the quick grid does not normalise observations
    # without the flag no model is kept
    assert not (bench_dir / "HazardPoint-v0" / "offtrc" / "seed0" / "model.zip").exists()


def _fake_runs(root: Path, values: list[float], first_seed: int = 0) -> str:
    for seed, value in enumerate(values, start=first_seed):
        run_dir = root / f"seed{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps({"seed": seed, "train_cv_total": value}))
    (root / "seed9").mkdir()  # unfinished: no summary.json, not counted
    return str(root / "seed*")


def test_compare_violations_of_two_groups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scipy import stats

    compare = _load("compare")
    a, b = [100.0, 140.0, 90.0], [150.0, 130.0, 170.0, 160.0]
    # group B from two directories
    pattern_b = [_fake_runs(tmp_path / "b1", b[:2]), _fake_runs(tmp_path / "b2", b[2:], first_seed=2)]
    assert compare.main(["violations", "--a", _fake_runs(tmp_path / "a", a), "--b", *pattern_b]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"3 runs, violations {np.mean(a):,.0f} ± {np.std(a):,.0f}" in out[0]
    assert f"4 runs, violations {np.mean(b):,.0f} ± {np.std(b):,.0f}" in out[1]
    expected = stats.permutation_test(
        (a, b), lambda x, y: np.mean(y) - np.mean(x), permutation_type="independent",
        alternative="greater", n_resamples=np.inf,
    ).pvalue  # fmt: skip
    diff = np.mean(b) - np.mean(a)
    assert out[2] == f"B - A: {diff:+,.0f}; one-sided permutation p (B above A by chance): {expected:.3f}"
    # seeds 0-2 in both groups: compared pair by pair
    paired = stats.permutation_test(
        (a, b[:3]), lambda x, y: np.mean(y - x), permutation_type="samples", alternative="greater",
        n_resamples=np.inf,
    ).pvalue  # fmt: skip
    same = np.mean(b[:3]) - np.mean(a)
    assert out[3] == (
        f"same seeds (3): A {np.mean(a):,.0f}, B {np.mean(b[:3]):,.0f}, mean B - A {same:+,.0f}; "
        f"one-sided paired p (sign flips): {paired:.3f}"
    )
    # two runs of one seed in a group: no pairing
    twice = [_fake_runs(tmp_path / "d1", b[:2]), _fake_runs(tmp_path / "d2", b[2:])]
    assert compare.main(["violations", "--a", _fake_runs(tmp_path / "e", a), "--b", *twice]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    with pytest.raises(SystemExit, match="at least 2"):
        compare.main(["violations", "--a", _fake_runs(tmp_path / "c", [1.0]), "--b", *pattern_b])


def test_compare_update_statistics(tmp_path: Path) -> None:
    compare = _load("compare")
    rows = {
        "time/total_timesteps": [1000, 2000, 3000, 4000],
        "train/step_case": [None, "recovery", "constrained", "recovery"],  # first row: before any update
        "train/trust_region": [None, 1e-3, 2e-4, 3e-4],
        "train/kl": [None, 9e-4, 1e-4, 2e-4],
        "train/behaviour_kl": [None, 0.0, 4e-3, 2e-3],
        "train/entropy": [None, 2.2, 2.1, 2.3],
        "train/line_search_steps": [None, 1, 3, 2],
        "train/line_search_failed": [None, 0, 1, 0],
        "train/reward_critic_loss": [None, 1e-3, 5e-4, 6e-4],
        "train/cost_critic_loss": [None, 4.0, 1.0, 2.0],
        "train/cost_std_critic_loss": [None, 3.0, 2.0, 7.0],
    }
    pd.DataFrame(rows).to_csv(tmp_path / "progress.csv", index=False)
    got = compare.update_statistics(tmp_path)
    assert got["updates"] == 3 and got["step_case"] == {"recovery": 2, "constrained": 1}
    assert got["line_search_failed"] == 1
    assert got["trust_region mean"] == pytest.approx(5e-4) and got["kl median"] == pytest.approx(2e-4)
    assert got["entropy min"] == pytest.approx(2.1) and got["entropy max"] == pytest.approx(2.3)
    assert got["cost_critic_loss mean"] == pytest.approx(7.0 / 3) and got["cost_std_critic_loss median"] == 3.0
    with pytest.raises(SystemExit, match="--train-log"):
        compare.update_statistics(tmp_path / "missing")


def test_an_arm_with_its_own_cost_limit_trains_with_it_and_the_others_keep_the_presets() -> None:
    """learn4's arms train on the smooth cost with limits of their own (Preset.cost_limits); every other
    arm and preset gets the preset's limit, which onerun passes to the constrained algorithms."""
    run = _load("run")
    learn4 = run.PRESETS["learn4"]
    specs = {spec.algo: spec for spec in run.expand(learn4, BENCH / "results" / "x", None, None, [0], None)}
    assert {algo: spec.cost_limit for algo, spec in specs.items()} == {
        "rec_smooth_limit2x": 0.05,
        "rec_smooth_limit4x": 0.1,
        "rec_smooth_limit2x_ent0.2": 0.05,
        "rec_recent5k": 0.025,
        "rec_cost_gamma0.9": 0.025,
    }
    assert all(spec.hyperparams["env"] == {"cost": "smooth"} for algo, spec in specs.items() if "smooth" in algo)
    learn7 = {(s.algo, s.env_id): s for s in run.expand(run.PRESETS["learn7"], BENCH, None, None, [0], None)}
    assert learn7[("rec_actionvalue_smooth_limit2x", "SafetyPointGoal1-v0")].cost_limit == 0.05
    assert learn7[("rec_actionvalue_smooth_limit2x", "SafetyPointGoal1-v0")].hyperparams["env"] == {"cost": "smooth"}
    assert {s.cost_limit for (algo, _), s in learn7.items() if algo != "rec_actionvalue_smooth_limit2x"} == {0.025}
    learn8 = {s.algo: s for s in run.expand(run.PRESETS["learn8"], BENCH, None, None, [0], None)}
    assert learn8["rec_actionvalue_smooth_limit2x_cg0.9"].cost_limit == 0.05
    assert learn8["rec_actionvalue_smooth_limit2x_cg0.9"].hyperparams["cost_gamma"] == 0.9
    learn9 = {(s.algo, s.env_id): s for s in run.expand(run.PRESETS["learn9"], BENCH, None, None, [0], None)}
    assert learn9[("rec_actionvalue_smooth_limit1.6x", "SafetyPointGoal1-v0")].cost_limit == 0.04
    assert learn9[("rec_actionvalue_smooth_limit2x", "SafetyCarGoal1-v0")].cost_limit == 0.05
    assert learn9[("rec_actionvalue_smooth_limit1.6x", "SafetyCarGoal1-v0")].cost_limit == 0.04
    assert all(s.hyperparams["env"] == {"cost": "smooth"} for s in learn9.values())
    assert all(s.hyperparams["surrogate"] == "action_value" for s in learn9.values())
    learn10 = {s.algo: s for s in run.expand(run.PRESETS["learn10"], BENCH, None, None, [0], None)}
    assert all(s.cost_limit == 0.05 and s.hyperparams["env"] == {"cost": "smooth"} for s in learn10.values())
    td = learn10["rec_actionvalue_smooth_limit2x_tdcost"].hyperparams
    assert (td["cost_q_target"], td["cost_q_gradient_steps"]) == ("td", 1000)
    assert learn10["rec_actionvalue_smooth_limit2x_dev"].hyperparams["action_value_input"] == "deviation"
    assert learn10["rec_actionvalue_smooth_limit2x_twinq"].hyperparams["n_q_critics"] == 2
    (mult,) = run.expand(run.PRESETS["learn11"], BENCH, None, None, [0], None)
    assert (mult.algo, mult.cost_limit, mult.budget) == ("rec_actionvalue_smooth_limit2x_mult", 0.05, 1_000_000)
    assert (mult.hyperparams["cost_step"], mult.hyperparams["env"]) == ("multiplier", {"cost": "smooth"})
    dynq, clip, floor = run.expand(run.PRESETS["learn12"], BENCH, None, None, [0], None)
    assert (floor.budget, floor.hyperparams["action_value_input"]) == (300_000, "clipped")
    assert math.isclose(math.exp(floor.hyperparams["policy_kwargs"]["log_std_bounds"][0]), 0.15, rel_tol=1e-4)
    assert (dynq.algo, dynq.cost_limit, dynq.budget) == ("rec_actionvalue_smooth_limit2x_dynq", 0.05, 300_000)
    assert (dynq.hyperparams["cost_q_form"], dynq.hyperparams["env"]) == ("dynamics", {"cost": "smooth"})
    assert (clip.algo, clip.cost_limit, clip.budget) == ("rec_actionvalue_smooth_limit2x_clip", 0.05, 1_000_000)
    assert (clip.hyperparams["action_value_input"], clip.hyperparams["env"]) == ("clipped", {"cost": "smooth"})
    for preset in run.PRESETS.values():
        if preset.name not in ("learn4", "learn7", "learn8", "learn9", "learn10", "learn11", "learn12"):
            limits = {spec.cost_limit for spec in run.expand(preset, BENCH, None, None, None, None)}
            assert limits == {preset.cost_limit}, preset.name


def test_code_version_marks_a_changed_measurement_script_dirty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # onerun imports the grid beside it
    onerun = _load("onerun")
    for name in ("sb3_offtrc/__init__.py", "benchmarks/onerun.py", "benchmarks/speed.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for command in (["init", "-q"], ["add", "."], ["commit", "-qm", "init"]):
        subprocess.run([*git, *command], cwd=tmp_path, check=True)
    monkeypatch.setattr(onerun, "__file__", str(tmp_path / "benchmarks" / "onerun.py"))
    assert onerun.code_version("benchmarks/speed.py")["dirty"] is False
    (tmp_path / "benchmarks" / "speed.py").write_text("x = 2\n")
    assert onerun.code_version()["dirty"] is False  # the package and the harness are as committed
    version = onerun.code_version("benchmarks/speed.py")
    assert version["dirty"] is True and len(version["commit"]) == 40


def test_unknown_algorithm_is_refused_with_the_choices() -> None:
    proc = _run("benchmarks/run.py", "--quick", "--algos", "offtrc_cpu_fisher0.2", "--dry-run")
    assert proc.returncode == 2
    assert "not in the quick grid" in proc.stderr and "sac_lag" in proc.stderr


@pytest.mark.parametrize(
    "results, preset",
    [
        ("full", "FULL"),
        ("preset_check", "PRESET_CHECK"),
        ("train_log", "FULL"),
        ("quick", "QUICK"),
        ("quick_40k", "QUICK"),
        ("learn", "LEARN"),
        ("learn2", "LEARN2"),
        ("learn2_1m", "LEARN2_1M"),
        ("main", "MAIN"),
    ],
)
def test_committed_runs_were_made_with_the_present_definitions(results: str, preset: str) -> None:
    """Renaming a configuration (e.g. when a preset changes) must keep each committed run under a name
    whose definition in grid.py is what the run used: the report labels it so, and a rerun skips it."""
    run = _load("run")
    grid = getattr(run, preset)
    out = BENCH / "results" / results
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert lines
    for line in lines:
        summary = json.loads(line)
        algo, env_id, seed = summary["algo"], summary["env_id"], summary["seed"]
        assert algo in grid.hyperparams, f"{results}: {summary['key']} has no definition in grid.py"
        specs = run.expand(grid, out, [algo], [env_id], [seed], summary["budget"])
        (spec,) = [spec for spec in specs if spec.key == summary["key"]]
        # the resume check itself: same budget and hyperparameters in the run's summary.json
        assert run.finished(spec), summary["key"]
        assert json.loads((spec.run_dir / "summary.json").read_text())["key"] == spec.key


def test_permutation_p_value_matches_scipy() -> None:
    from scipy import stats

    report = _load("report")
    rng = np.random.default_rng(3)
    for n_ref, n_other, shift in ((5, 10, 0.0), (3, 3, 2.0), (4, 7, -1.0), (2, 2, 0.5)):
        ref = rng.normal(size=n_ref).round(1).tolist()  # rounding makes ties, which must count as "at least"
        other = (rng.normal(size=n_other) + shift).round(1).tolist()
        expected = stats.permutation_test(
            (ref, other), lambda x, y: np.mean(y) - np.mean(x), permutation_type="independent",
            alternative="greater", n_resamples=np.inf,
        ).pvalue  # fmt: skip
        assert report.permutation_p_value(ref, other) == pytest.approx(expected, abs=1e-12)
        # the Monte Carlo branch estimates the same number (standard error below 0.004 here)
        estimate = report.permutation_p_value(ref, other, max_exact=0, n_resamples=20_000)
        assert estimate == pytest.approx(expected, abs=0.02)
    with pytest.raises(ValueError):
        report.permutation_p_value([], [1.0])


def test_paired_p_value_matches_scipy() -> None:
    from scipy import stats

    report = _load("report")
    rng = np.random.default_rng(5)
    for n, shift in ((3, 1.0), (8, 0.0), (10, 0.7), (2, 2.0)):
        seed_effect = rng.normal(scale=3.0, size=n)  # shared by both members of a pair
        ref = (seed_effect + rng.normal(size=n)).round(1).tolist()
        other = (seed_effect + rng.normal(size=n) + shift).round(1).tolist()
        expected = stats.permutation_test(
            (ref, other), lambda x, y: np.mean(y - x), permutation_type="samples", alternative="greater",
            n_resamples=np.inf,
        ).pvalue  # fmt: skip
        assert report.paired_p_value(ref, other) == pytest.approx(expected, abs=1e-12)
        estimate = report.paired_p_value(ref, other, max_exact=0, n_resamples=20_000)
        assert estimate == pytest.approx(expected, abs=0.02)
    # every pair of the other group above its reference: only the observed flip of 2**4 is as large
    assert report.paired_p_value([1.0, 5.0, 2.0, 9.0], [2.0, 6.0, 3.0, 10.0]) == pytest.approx(1 / 16)
    with pytest.raises(ValueError, match="same, nonzero length"):
        report.paired_p_value([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="same, nonzero length"):
        report.paired_p_value([], [])


def test_report_compares_violations_with_the_paper_settings() -> None:
    report = _load("report")

    def run(algo: str, seed: int, violations: int) -> object:
        curve = pd.DataFrame({"env_steps": [0, 100], "eval_return": [0.0, 1.0], "eval_cost": [5.0, 1.0]})
        summary = {
            "algo": algo, "env_id": "E-v0", "seed": seed, "budget": 100, "env_steps": 100,
            "train_cv_total": violations,
        }  # fmt: skip
        return report.Run(summary, curve, curve)

    runs = [run("offtrc", s, v) for s, v in enumerate((10, 20, 30))]
    runs += [run("offtrc_cpu", s, v) for s, v in enumerate((40, 50, 60))] + [run("sac", 0, 5)]
    text = report.violations_against_reference(runs)
    # all three preset seeds above all three paper seeds: 1 split in C(6, 3) = 20
    # ... and on the same seeds every pair differs by +30: 1 sign flip in 2**3 reaches it
    assert "| OffTRC (cpu preset) | 3 | 50 | +30 | 0.050 | 3 | +30 | 0.125 |" in text
    assert "SAC" not in text  # one seed is not compared
    assert report.violations_against_reference(runs[3:]) == ""  # no paper-settings runs
    assert report.format_p(0.0004) == "< 0.001" and report.format_p(0.0006) == "0.001"


@pytest.mark.skipif(not _offtrc_importable(), reason="needs sb3_offtrc.offtrc")
def test_stacked_critics_of_the_ensemble_benchmark_are_the_three_critics() -> None:
    """benchmarks/critic_ensemble.py times a stacked ensemble against OffTRC's three critics: it must
    compute the same values and the same gradients (and so, with per-member clipping, the same step)."""
    import torch as th

    from sb3_offtrc.offtrc.policies import ValueCritic

    bench = _load("critic_ensemble")
    with pytest.raises(ValueError, match="state-value critics only"):
        bench.measure("av", {"surrogate": "action_value"}, 1)
    th.manual_seed(0)
    critics = [ValueCritic(7, [16, 8], th.nn.ReLU, positive=positive) for positive in (False, False, True)]
    stacked = bench.StackedCritics(critics)
    features, targets = th.randn(64, 7), th.randn(3, 64)
    values = stacked(features)
    for member, critic in enumerate(critics):
        th.testing.assert_close(values[member], critic(features))
    (0.5 * ((values - targets) ** 2).mean(dim=1).sum()).backward()
    for member, critic in enumerate(critics):
        (0.5 * ((critic(features) - targets[member]) ** 2).mean()).backward()
        linears = [m for m in critic.modules() if isinstance(m, th.nn.Linear)]
        for layer, weight, bias in zip(linears, stacked.weights, stacked.biases, strict=True):
            assert weight.grad is not None and bias.grad is not None and layer.weight.grad is not None
            th.testing.assert_close(weight.grad[member], layer.weight.grad.t())
            th.testing.assert_close(bias.grad[member, 0], layer.bias.grad)


@pytest.mark.skipif(not _offtrc_importable(), reason="needs sb3_offtrc.offtrc")
def test_holdout_shadow_scores_before_it_fits_and_leaves_the_global_rng_alone() -> None:
    import torch as th

    bench = _load("critic_holdout")
    th.manual_seed(0)
    features = th.randn(200, 5)
    targets = {"cost": features[:, 0] * 3.0 + 1.0, "cost_std": features[:, 1].abs() + 0.5}
    held_out = th.zeros(200, dtype=th.bool)
    held_out[150:] = True
    shadow = bench.Shadow("s", bench.FitConfig(width=16, passes=20, minibatch=50, lr=1e-2), 5, seed=3)
    with th.no_grad():
        before = {
            k: float(0.5 * ((c(features[150:]) - targets[k][150:]) ** 2).mean()) for k, c in shadow.critics.items()
        }
    rng_state = th.get_rng_state()
    record = shadow.step(features, targets, held_out)
    assert th.equal(th.get_rng_state(), rng_state)  # the run's random numbers are not consumed
    for key, critic in shadow.critics.items():
        assert record[f"{key}_held_out"] == pytest.approx(before[key], rel=1e-6)
        with th.no_grad():
            after = float(0.5 * ((critic(features) - targets[key]) ** 2).mean())
        assert record[f"{key}_train"] == pytest.approx(after, rel=1e-6)
        assert after < 0.5 * before[key]  # 80 Adam steps on a near-linear target fit it
    assert bench.summarise([record, {**record, "fit_seconds": 0.0}], skip=1)["fit_seconds"] == 0.0
    with pytest.raises(SystemExit, match="no update after"):
        bench.summarise([record], skip=1)


@pytest.mark.skipif(not _offtrc_importable(), reason="needs sb3_offtrc.offtrc")
def test_holdout_shadows_do_not_change_the_run() -> None:
    """The shadows watch the preset's run: with or without them it learns the same policy."""
    import torch as th
    from stable_baselines3.common.vec_env import DummyVecEnv

    from sb3_offtrc.envs import HazardPointEnv
    from sb3_offtrc.offtrc import OffTRC

    bench = _load("critic_holdout")
    hyperparams = {**bench.PRESET_5PASSES, "n_steps": 500, "n_recent": 500, "n_batch": 1_000, "buffer_size": 2_000}
    hyperparams["policy_kwargs"] = {"net_arch": [16, 16]}
    models = []
    for cls in (OffTRC, bench.ProbedOffTRC):
        env = DummyVecEnv([HazardPointEnv])
        model = cls("MlpPolicy", env, seed=4, device="cpu", **hyperparams)
        if isinstance(model, bench.ProbedOffTRC):
            features_dim = model.policy.features_extractor.features_dim
            model.shadows = [bench.Shadow("s", bench.FitConfig(8, 2, 250, 1e-3), features_dim, seed=9)]
            model.own_records = []
        model.learn(1_500)
        models.append(model)
    plain, probed = models
    for (name, a), (_, b) in zip(plain.policy.state_dict().items(), probed.policy.state_dict().items(), strict=True):
        assert th.equal(a, b), name
    assert len(probed.own_records) == len(probed.shadows[0].records) == 3
    record = probed.own_records[-1]
    assert record["cost_held_out"] >= 0.0 and record["cost_target_half_var"] >= 0.0


@pytest.mark.skipif(not _offtrc_importable(), reason="needs the package's OffTRC")
def test_speed_batch_scaling_times_updates_whose_flops_grow_with_the_batch() -> None:
    speed = _load("speed")
    params = {"n_steps": 200, "n_recent": 200, "policy_kwargs": {"net_arch": [16, 16]}, "n_critic_epochs": 2}
    rows = speed.batch_scaling("HazardPoint-v0", params, sizes=(400, 800), max_repeats=3, budget_s=60.0)
    assert [row["n_batch"] for row in rows] == [400, 800]
    for row in rows:
        assert len(row["update_s_all"]) == 3  # tiny updates: all repeats fit in the budget
        assert row["update_s"] == pytest.approx(float(np.median(row["update_s_all"])))
    # every matmul of the targets, the policy step and the full-batch critic fit runs over the batch
    assert rows[1]["update_gflop"] == pytest.approx(2 * rows[0]["update_gflop"], rel=0.05)
    # a budget smaller than one update: that one update is all that is timed
    (only,) = speed.batch_scaling("HazardPoint-v0", params, sizes=(400,), max_repeats=3, budget_s=0.0)
    assert len(only["update_s_all"]) == 1


def test_speed_refuses_cuda_without_a_gpu() -> None:
    import torch as th

    if th.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    proc = _run("benchmarks/speed.py", "--quick", "--device", "cuda")
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr


def test_speed_times_updates_on_the_gpu_when_present() -> None:
    import torch as th

    if not th.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    speed = _load("speed")
    params = {"n_steps": 200, "n_recent": 200, "policy_kwargs": {"net_arch": [16, 16]}, "n_critic_epochs": 2}
    (row,) = speed.batch_scaling("HazardPoint-v0", params, sizes=(400,), max_repeats=2, device="cuda")
    assert row["update_gflop"] > 0 and all(t > 0 for t in row["update_s_all"])
    assert speed.gemm_rate(size=256, repeats=2, device="cuda") > 0


def test_diagnose_summarises_the_committed_learning_runs() -> None:
    diagnose = _load("diagnose")
    table = diagnose.summarise(BENCH / "results" / "learn", "SafetyPointGoal1-v0")
    assert len(table) >= 2 and (table["seeds"] >= 3).all()
    shares = table[["feasible", "constrained", "recovery", "skipped"]].sum(axis=1)
    np.testing.assert_allclose(shares.to_numpy(), 1.0)
    fixed = table.loc[("SafetyPointGoal1-v0", "kl0.01_fixed")]
    assert fixed["radius/max_kl"] == pytest.approx(1.0)  # a fixed radius is max_kl itself
    assert "| kl_sum |" in diagnose.markdown(table)


def test_case_followup_compares_the_cost_after_recovery_and_feasible_steps() -> None:
    diagnose = _load("diagnose")
    frame = pd.DataFrame(
        {
            "train/step_case": ["recovery", "feasible", "recovery", "constrained", "feasible", "recovery"],
            "train/cost_mean": [9.0, 1.0, 8.0, 2.0, 4.0, 6.0],
            "train/cvar": [9.0, 1.0, 8.0, 2.0, 4.0, 6.0],
            "diag/cvar_after": [8.0, 1.5, 7.0, 2.0, 7.0, 2.0],
            "train/n_updates": [1, 2, 3, 4, 5, 6],
        }
    )
    realised, predicted = diagnose.case_followup(frame, ahead=2)
    # two windows ahead: recovery rows 0 and 2 -> (1+8)/2 and (2+4)/2; feasible row 1 -> (8+2)/2; rows 4
    # and 5 have fewer than two windows ahead and are left out, their predicted changes (+3, -4) too
    assert realised == pytest.approx(((4.5 + 3.0) / 2) - 5.0)
    assert predicted == pytest.approx(-1.0 - 0.5)  # recovery rows 0 and 2 predicted -1, feasible row 1 +0.5
    assert all(math.isnan(v) for v in diagnose.case_followup(frame.iloc[:1], ahead=2))
    # a logged row that skips an update (several env copies) does not count as the next window
    gappy = frame.assign(**{"train/n_updates": [1, 2, 3, 4, 6, 7]})
    realised, _ = diagnose.case_followup(gappy, ahead=2)
    assert realised == pytest.approx(4.5 - 5.0)  # row 2's next rows are updates 4 and 6: row 2 is left out


def test_run_calibration_compares_the_cost_moved_with_the_steps_predictions() -> None:
    diagnose = _load("diagnose")
    rng = np.random.default_rng(0)
    steps = rng.normal(-0.1, 0.5, size=300)  # each update's predicted change of the CVaR
    exact = 10.0 + np.concatenate([[0.0], np.cumsum(steps)[:-1]])  # each step did what it predicted
    frame = pd.DataFrame({"train/cvar": exact, "diag/cvar_after": exact + steps, "train/n_updates": np.arange(1, 301)})
    realised, predicted = diagnose.run_calibration(frame, edge=20)
    assert realised == pytest.approx(predicted)
    assert predicted == pytest.approx(exact[-20:].mean() - exact[:20].mean())
    # the same predictions on a cost that did not move: nothing of them happened
    flat = frame.assign(**{"train/cvar": 10.0, "diag/cvar_after": 10.0 + steps})
    realised, predicted_flat = diagnose.run_calibration(flat, edge=20)
    assert realised == pytest.approx(0.0) and predicted_flat == pytest.approx(predicted)
    # a tenth of each predicted change happened
    tenth = 10.0 + 0.1 * np.concatenate([[0.0], np.cumsum(steps)[:-1]])
    realised, _ = diagnose.run_calibration(
        frame.assign(**{"train/cvar": tenth, "diag/cvar_after": tenth + steps}), edge=20
    )
    assert realised / predicted == pytest.approx(0.1)
    # rows that skip updates, or too few rows: not measured
    assert all(math.isnan(v) for v in diagnose.run_calibration(frame.iloc[::2], edge=20))
    assert all(math.isnan(v) for v in diagnose.run_calibration(frame.iloc[:39], edge=20))
    # the reward side reads its own columns, and is not measured where they were not logged
    assert all(math.isnan(v) for v in diagnose.run_calibration(frame, edge=20, side="reward"))
    reward = pd.DataFrame(
        {"diag/reward_mean_window": 2.0 + 0.5 * (exact - 10.0), "diag/reward_gain_return": steps,
         "train/n_updates": np.arange(1, 301)}
    )  # fmt: skip
    realised, predicted_reward = diagnose.run_calibration(reward, edge=20, side="reward")
    assert realised / predicted_reward == pytest.approx(0.5)


def test_cost_signal_returns_match_a_direct_sum() -> None:
    bench = _load("cost_signal")
    rng = np.random.default_rng(0)
    values = rng.random(30)
    ends = np.zeros(30, dtype=bool)
    ends[[9, 20, 29]] = True
    returns, left = bench.discounted_returns(values, ends, 0.9)
    starts = [0, 10, 21]
    for first, last in zip(starts, [9, 20, 29], strict=True):
        for t in range(first, last + 1):
            wanted = sum(0.9 ** (k - t) * values[k] for k in range(t, last + 1))
            assert returns[t] == pytest.approx(wanted, rel=1e-5)
            assert left[t] == last + 1 - t


@pytest.mark.skipif(not _offtrc_importable(), reason="needs sb3_offtrc.offtrc")
def test_cost_signal_quick_run_writes_its_tables(tmp_path: Path) -> None:
    out = tmp_path / "signal.json"
    result = _run("benchmarks/cost_signal.py", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {c["target"] for c in report["critics"]} == {"reward", "cost"}
    assert set(report["code"]) == {"commit", "dirty"}  # which code measured it
    assert {c["gamma"] for c in report["critics"] if c["target"] == "cost"} == {0.0, 0.9, 0.99}
    assert sum(report["gradient"]["norm_share"].values()) == pytest.approx(1.0, rel=1e-4)
    splits = report["gradient"]["split_half"]
    assert len(splits) == 2  # no hazard lidar on HazardPoint-v0: the two estimators on native inputs
    assert all(len(v) == 3 and all(-1.0 <= c["plain"] <= 1.0 for c in v) for v in splits.values())


def test_cost_signal_sensor_slices_tile_the_goal_observation() -> None:
    from sb3_offtrc.compat import safety_gymnasium as compat

    if compat.missing_safety_modules() and os.environ.get("SB3_OFFTRC_REQUIRE_SAFETY", "") in ("", "0"):
        pytest.skip("Safety-Gymnasium stack incomplete")
    from sb3_offtrc.envs.safety import make_safety_env

    bench = _load("cost_signal")
    env = make_safety_env("SafetyPointGoal1-v0")
    obs, _ = env.reset(seed=0)
    sensors = bench.sensor_slices(env.unwrapped.task)
    assert sensors["hazards_lidar"].stop - sensors["hazards_lidar"].start == 16
    cursor = 0
    for where in sensors.values():  # contiguous, in order, covering the whole vector
        assert where.start == cursor
        cursor = where.stop
    assert cursor == obs.shape[0]
    for key in ("goal_lidar", "hazards_lidar", "vases_lidar"):
        assert 0.0 <= obs[sensors[key]].min() and obs[sensors[key]].max() <= 1.0
    assert bench.sensor_slices(getattr(make_safety_env("HazardPoint-v0").unwrapped, "task", None)) == {}
