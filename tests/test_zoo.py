"""rl-zoo3 integration: zoo train smoke run, two optimize workers sharing one SQLite study, every
hyperparameter file entry builds a model, and the pieces of the constrained objective.

Importing rl_zoo3 replaces gymnasium's TimeLimit for the whole process (rl_zoo3/gym_patches.py),
so this module does not import it at collection time: the ``zoo`` fixture imports it and puts
gymnasium's class back, and the command-line tests run in subprocesses.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import gymnasium as gym
import numpy as np
import pytest


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


if not (_has("rl_zoo3") and _has("optuna")):
    pytest.skip("rl-zoo3 / optuna not installed (the `zoo` extra)", allow_module_level=True)

import yaml  # noqa: E402  (rl-zoo3 depends on it)

from sb3_offtrc.compat.safety_gymnasium import safety_gymnasium_available  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HYPERPARAMS = ROOT / "sb3_offtrc" / "zoo" / "hyperparams"
ZOO_FILES = {algo: HYPERPARAMS / f"{algo}.yml" for algo in ("offtrc", "sac_lag", "ppo_lag")}
# small enough for a few hundred steps on two busy cores
TINY_OFFTRC = {
    "policy": "MlpPolicy",
    "n_timesteps": 300,
    "n_steps": 100,
    "n_recent": 100,
    "n_batch": 200,
    "buffer_size": 1000,
    "n_critic_epochs": 2,
    "max_kl": 0.01,
    "cost_limit": 0.025,
    "cvar_alpha": 0.125,
    "policy_kwargs": "dict(net_arch=[16, 16])",
}


_PATCHED = ((gym.wrappers, "TimeLimit"), (gym.wrappers.time_limit, "TimeLimit"), (gym.envs.registration, "TimeLimit"))


@pytest.fixture(scope="module")
def zoo() -> Iterator[ModuleType]:
    missing = object()
    saved = [getattr(module, name, missing) for module, name in _PATCHED]
    try:
        pytest.importorskip("rl_zoo3")
        import sb3_offtrc.zoo as zoo_module
        import sb3_offtrc.zoo.experiment  # noqa: F401  (imports rl_zoo3.exp_manager)

        zoo_module.register()
    finally:
        for (module, name), value in zip(_PATCHED, saved, strict=True):
            if value is missing:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, value)
    yield zoo_module


def _zoo_cmd(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "sb3_offtrc.zoo", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _popen_zoo(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "sb3_offtrc.zoo", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _write_conf(path: Path, entries: dict[str, dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump(entries))
    return path


# ------------------------------------------------------------------------------ command line
def test_zoo_train_smoke(tmp_path: Path) -> None:
    conf = _write_conf(tmp_path / "tiny.yml", {"HazardPoint-v0": TINY_OFFTRC})
    result = _zoo_cmd(
        "train", "--algo", "offtrc", "--env", "HazardPoint-v0", "--conf-file", str(conf), "-f", "logs",
        "--seed", "3", "-tb", "tb", "--eval-freq", "200", "--eval-episodes", "2", "--log-interval", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "logs" / "offtrc" / "HazardPoint-v0_1"
    assert (run / "HazardPoint-v0.zip").is_file()
    # rl-zoo3's own bookkeeping still happens ...
    saved = yaml.load((run / "HazardPoint-v0" / "config.yml").read_text(), Loader=yaml.UnsafeLoader)  # an OrderedDict
    assert dict(saved)["n_recent"] == 100
    assert any((tmp_path / "tb").rglob("events.out.tfevents*"))
    # ... and the evaluation saw costs (SafeEvalCallback, not EvalCallback)
    evaluations = np.load(run / "evaluations.npz")
    assert "costs" in evaluations.files and evaluations["costs"].shape == (1, 2)
    assert "episode cost limit 2.5" in result.stdout

    from sb3_offtrc import OffTRC

    model = OffTRC.load(run / "HazardPoint-v0.zip", device="cpu")
    assert model.n_recent == 100 and model.cost_limit == 0.025

    # enjoy replays it and prints costs next to rl-zoo3's reward lines (HazardPoint: 100-step episodes)
    result = _zoo_cmd(
        "enjoy", "--algo", "offtrc", "--env", "HazardPoint-v0", "-f", "logs", "--exp-id", "1", "--no-render",
        "-n", "250", "--cvar-alpha", "0.5", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    costs = [float(m) for m in re.findall(r"^Episode Cost: ([0-9.]+) \(violations: \d+\)$", result.stdout, re.M)]
    assert len(costs) == 2 and result.stdout.count("Episode Reward:") == 2
    mean = re.search(r"^Mean episode cost: ([0-9.]+) \+/- ([0-9.]+)$", result.stdout, re.M)
    cvar = re.search(r"^Episode cost CVaR\(0.5\): ([0-9.]+)$", result.stdout, re.M)
    assert mean and cvar
    assert float(mean.group(1)) == pytest.approx(np.mean(costs), abs=0.01)
    assert float(cvar.group(1)) == pytest.approx(max(costs), abs=0.01)  # the worse half of two episodes


def test_zoo_optimize_two_workers_share_sqlite(tmp_path: Path) -> None:
    import optuna

    from sb3_offtrc.zoo.objective import TRIAL_ATTRS
    from sb3_offtrc.zoo.samplers import NET_ARCHS

    conf = _write_conf(tmp_path / "tiny.yml", {"HazardPoint-v0": {**TINY_OFFTRC, "n_timesteps": 200}})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    workers = []
    for seed in (11, 12):  # different seeds, or both random samplers would draw the same point
        args = [
            "optimize", "--algo", "offtrc", "--env", "HazardPoint-v0", "--conf-file", str(conf),
            "-f", f"logs{seed}", "--seed", str(seed), "--storage", storage, "--study-name", "shared",
            "--n-trials", "1", "--n-evaluations", "1", "--eval-episodes", "2", "--sampler", "random",
            "--pruner", "median", "--cost-penalty", "5",
        ]  # fmt: skip
        workers.append(_popen_zoo(*args, cwd=tmp_path))
    outputs = [worker.communicate(timeout=400)[0] for worker in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-4000:]

    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2
    assert study.user_attrs["episode_cost_limit"] == pytest.approx(2.5)
    assert study.user_attrs["cost_penalty"] == 5.0
    assert study.user_attrs["constraint_metric"] == "cvar"
    for trial in trials:
        attrs = trial.user_attrs
        assert set(TRIAL_ATTRS) <= set(attrs)
        assert attrs["episode_cost_limit"] == pytest.approx(2.5)
        assert attrs["eval_cost"] == attrs["eval_cost_cvar"]
        assert attrs["feasible"] == (attrs["eval_cost"] <= 2.5)
        over = max(attrs["eval_cost"] - 2.5, 0.0)
        assert trial.value == pytest.approx(attrs["eval_return"] - 5.0 * over)
        assert set(trial.params) == {"max_kl", "learning_rate", "n_critic_epochs", "n_batch_factor", "net_arch"}
        # the sampled hyperparameters as they went into the model, ready for a hyperparameter file
        assert attrs["hyperparams"]["n_batch"] == 100 * trial.params["n_batch_factor"]
        assert attrs["hyperparams"]["policy_kwargs"]["net_arch"] == NET_ARCHS[trial.params["net_arch"]]
        # the constrained value was also reported for pruning
        assert trial.intermediate_values == {1: pytest.approx(trial.value)}
    assert any("Best feasible trial" in out or "No complete trial met" in out for out in outputs)


def test_enjoy_rejects_a_bad_cvar_alpha(zoo: ModuleType) -> None:
    from sb3_offtrc.zoo.cli import main

    with pytest.raises(SystemExit, match="cvar-alpha"):
        main(["enjoy", "--algo", "offtrc", "--env", "HazardPoint-v0", "--cvar-alpha", "1.5"])


def test_zoo_rejects_unknown_command() -> None:
    from sb3_offtrc.zoo.cli import main

    with pytest.raises(SystemExit, match="usage"):
        main(["fly"])


def test_help_lists_constraint_and_zoo_flags(zoo: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    from sb3_offtrc.zoo.cli import main

    argv = sys.argv
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["optimize", "--help"])
    finally:
        sys.argv = argv
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--cost-penalty" in out and "--eval-cost-limit" in out  # ours
    assert "--n-trials" in out and "offtrc" in out and "ppo_lag" in out  # rl-zoo3's, with our algorithms


def test_rewrite_env_and_default_config(zoo: ModuleType) -> None:
    from sb3_offtrc.zoo.cli import add_default_config, rewrite_env

    argv = ["--algo", "offtrc", "--env", "SafetyPointGoal1-v0"]
    rewrite_env(argv)
    assert argv[-1] == "OffTRC/SafetyPointGoal1-v0"
    argv = ["--env=HalfCheetah-v4"]
    rewrite_env(argv)
    assert argv == ["--env=OffTRC/HalfCheetahFlip-v4"]
    argv = ["--env", "NoSuchEnv-v9"]  # left for rl-zoo3 to report
    rewrite_env(argv)
    assert argv == ["--env", "NoSuchEnv-v9"]

    argv = ["--algo", "sac_lag"]
    add_default_config(argv)
    assert argv[-2:] == ["--conf-file", str(ZOO_FILES["sac_lag"])]
    argv = ["--algo", "offtrc", "-conf", "mine.yml"]
    add_default_config(argv)
    assert argv == ["--algo", "offtrc", "-conf", "mine.yml"]
    argv = ["--algo", "sac"]  # rl-zoo3's own algorithms keep rl-zoo3's files
    add_default_config(argv)
    assert argv == ["--algo", "sac"]


def test_register_adds_algorithms_and_samplers(zoo: ModuleType) -> None:
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_SAMPLER
    from rl_zoo3.utils import ALGOS

    from sb3_offtrc import OffTRC, PPOLagrangian, SACLagrangian

    assert ALGOS["offtrc"] is OffTRC and ALGOS["sac_lag"] is SACLagrangian and ALGOS["ppo_lag"] is PPOLagrangian
    assert {"offtrc", "sac_lag", "ppo_lag"} <= set(HYPERPARAMS_SAMPLER)
    assert "HazardPoint-v0" in gym.registry and "OffTRC/SafetyPointGoal1-v0" in gym.registry


# ------------------------------------------------------------------------- objective pieces
def test_constraint_spec_value_and_feasibility() -> None:
    from sb3_offtrc.zoo.objective import ConstraintSpec

    spec = ConstraintSpec(episode_cost_limit=2.5, cost_penalty=4.0)
    assert spec.value(10.0, 2.5) == 10.0  # on the limit is feasible
    assert spec.value(10.0, 3.0) == pytest.approx(8.0)
    assert spec.is_feasible(2.5) and not spec.is_feasible(2.6)
    assert ConstraintSpec(episode_cost_limit=None).value(7.0, 1e9) == 7.0
    with pytest.raises(ValueError, match="constraint_metric"):
        ConstraintSpec(episode_cost_limit=1.0, constraint_metric="max")
    with pytest.raises(ValueError, match="cost_penalty"):
        ConstraintSpec(episode_cost_limit=1.0, cost_penalty=-1.0)


def test_storage_forms(tmp_path: Path) -> None:
    import optuna

    from sb3_offtrc.zoo.objective import create_or_load_study, open_storage, storage_url

    assert storage_url(str(tmp_path / "a.db")) == f"sqlite:///{tmp_path / 'a.db'}"
    assert storage_url("postgresql://u@host/db") == "postgresql://u@host/db"
    for storage in (str(tmp_path / "sub" / "s.db"), str(tmp_path / "journal.log")):
        sampler, pruner = optuna.samplers.RandomSampler(seed=0), optuna.pruners.NopPruner()
        first = create_or_load_study(open_storage(storage), "s", sampler, pruner, user_attrs={"cost_penalty": 1.0})
        first.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
        again = create_or_load_study(open_storage(storage), "s", sampler, pruner, user_attrs={"cost_penalty": 9.0})
        assert len(again.trials) == 1
        assert again.user_attrs["cost_penalty"] == 1.0  # written once, by the creator


def test_offtrc_sampler_keeps_fixed_and_valid_values() -> None:
    import optuna

    from sb3_offtrc.zoo.samplers import sample_offtrc_params

    base = {"n_recent": 1000, "buffer_size": 4000, "cost_limit": 0.025, "cvar_alpha": 0.125,
            "policy_kwargs": {"activation_fn": "relu-placeholder"}}  # fmt: skip
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = sample_offtrc_params(study.ask(), 2, 1, {"hyperparams": base})
        assert "cost_limit" not in params and "cvar_alpha" not in params and "gamma" not in params
        assert params["n_batch"] % 1000 == 0 and params["n_batch"] >= 1000
        assert params["buffer_size"] >= max(params["n_batch"], 4000)
        assert params["policy_kwargs"]["activation_fn"] == "relu-placeholder"
        assert 1e-4 <= params["max_kl"] <= 3e-2


def test_default_entry_is_the_fallback(zoo: ModuleType, tmp_path: Path) -> None:
    import argparse

    from sb3_offtrc.zoo.experiment import SafeExperimentManager

    conf = _write_conf(tmp_path / "c.yml", {"default": {**TINY_OFFTRC, "max_kl": 0.02}, "Other-v0": {"policy": "x"}})
    manager = SafeExperimentManager(
        argparse.Namespace(), "offtrc", "HazardPointSmooth-v0", str(tmp_path), config=str(conf)
    )
    hyperparams, _ = manager.read_hyperparameters()
    assert hyperparams["max_kl"] == 0.02
    manager._preprocess_hyperparams(hyperparams)
    spec = manager.constraint_spec()
    assert spec.episode_cost_limit == pytest.approx(2.5)  # d = 0.025 times 100 steps
    assert spec.constraint_metric == "cvar" and spec.cvar_alpha == 0.125


# ---------------------------------------------------------------- hyperparameter file entries
def _entries() -> list[tuple[str, str]]:
    found = []
    for algo, path in ZOO_FILES.items():
        for env_id in yaml.safe_load(path.read_text()):
            found.append((algo, env_id))
    return found


_ENVS: dict[str, gym.Env] = {}


@pytest.fixture(scope="module")
def env_cache() -> Iterator[dict[str, gym.Env]]:
    yield _ENVS
    for env in _ENVS.values():
        env.close()
    _ENVS.clear()


@pytest.mark.parametrize(("algo", "env_id"), _entries(), ids=lambda v: str(v).replace("/", "_"))
def test_hyperparams_entry_builds_a_model(
    zoo: ModuleType, env_cache: dict[str, gym.Env], tmp_path: Path, algo: str, env_id: str
) -> None:
    import argparse

    from rl_zoo3.utils import ALGOS

    from sb3_offtrc.zoo.experiment import SafeExperimentManager

    target = "HazardPoint-v0" if env_id == "default" else env_id
    if target.startswith("OffTRC/") and not safety_gymnasium_available():
        pytest.skip("safety_gymnasium / mujoco not installed")
    manager = SafeExperimentManager(argparse.Namespace(), algo, target, str(tmp_path), config=str(ZOO_FILES[algo]))
    if env_id == "default":
        entries = yaml.safe_load(ZOO_FILES[algo].read_text())
        hyperparams = dict(entries["default"])
    else:
        hyperparams, _ = manager.read_hyperparameters()
    assert hyperparams["n_timesteps"] > 0
    assert hyperparams["cost_limit"] == 0.025  # one constraint for every algorithm and task
    kwargs, *_ = manager._preprocess_hyperparams(hyperparams)
    if target not in env_cache:
        env_cache[target] = gym.make(target)
    model = ALGOS[algo](env=env_cache[target], device="cpu", **kwargs)
    assert model.cost_limit == 0.025
    if algo == "offtrc" and env_id in ("OffTRC/SafetyPointGoal1-v0", "OffTRC/HalfCheetahFlip-v4"):
        # the recommended preset, spelled in the zoo's format: the same model
        from sb3_offtrc import OffTRC, get_preset

        preset = OffTRC("MlpPolicy", env_cache[target], device="cpu", **get_preset("recommended"))
        for name in {*get_preset("recommended")} - {"policy_kwargs", "learning_rate"}:
            assert getattr(model, name) == getattr(preset, name), name
        assert model.lr_schedule(1.0) == preset.lr_schedule(1.0)  # rl-zoo3 hands a constant schedule
        assert str(model.policy.actor.body) == str(preset.policy.actor.body)
        assert model.cvar_alpha == 1.0
    elif algo == "offtrc":
        assert model.cvar_alpha == 0.125


# ------------------------------------------------------------------------------ enjoy's cost lines
def test_enjoy_cost_reporter_matches_cost_monitor() -> None:
    import io

    from stable_baselines3.common.vec_env import DummyVecEnv

    import sb3_offtrc.envs  # noqa: F401
    from sb3_offtrc.common.monitor import CostMonitor
    from sb3_offtrc.zoo.enjoy import VecEpisodeCostReporter

    monitors = [CostMonitor(gym.make("HazardPoint-v0")) for _ in range(2)]
    out = io.StringIO()
    venv = VecEpisodeCostReporter(DummyVecEnv([lambda m=m: m for m in monitors]), cvar_alpha=0.5, stream=out)
    venv.seed(0)
    venv.reset()
    rng = np.random.default_rng(0)
    for _ in range(250):  # two full 100-step episodes per copy, the third unfinished
        venv.step(rng.uniform(-1, 1, size=(2, 2)).astype(np.float32))
    expected = sorted(c for m in monitors for c in m.get_episode_costs())
    assert len(expected) == 4 and sorted(venv.episode_costs) == pytest.approx(expected)
    assert sorted(venv.episode_cvs) == sorted(v for m in monitors for v in m.get_episode_cvs())
    assert out.getvalue().count("[env 1] Episode Cost:") == 2
    stats = venv.summary()
    assert stats is not None and stats["cost_cvar"] == pytest.approx(np.mean(expected[2:]))
    venv.close()
    assert "Mean episode cost:" in out.getvalue()


def test_enjoy_cost_reporter_without_cost_says_so_once() -> None:
    import io

    from stable_baselines3.common.vec_env import DummyVecEnv

    from sb3_offtrc.zoo.enjoy import VecEpisodeCostReporter

    out = io.StringIO()
    venv = VecEpisodeCostReporter(DummyVecEnv([lambda: gym.make("Pendulum-v1")]), stream=out)
    venv.reset()
    for _ in range(210):
        venv.step(np.zeros((1, 1), dtype=np.float32))
    venv.close()
    assert out.getvalue().count("episode costs are not reported") == 1 and venv.summary() is None


def test_hyperparameter_files_ship_with_the_package() -> None:
    import fnmatch

    import tomllib

    from sb3_offtrc.zoo import HYPERPARAMS_DIR, ZOO_ALGOS, default_config

    package = ROOT / "sb3_offtrc"
    assert HYPERPARAMS_DIR.is_relative_to(package)
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sb3_offtrc"]
    files = sorted(HYPERPARAMS_DIR.iterdir())
    assert {default_config(algo) for algo in ZOO_ALGOS} <= set(files)
    for path in files:  # a file no package-data pattern matches would be missing from wheels
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
