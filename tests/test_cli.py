"""CLI smoke tests: a few hundred steps of training, then eval, record, plot and resume."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sb3_offtrc.cli import main, parse_hyperparams

SMALL_SAC = ["learning_starts=100", "batch_size=32", "policy_kwargs={'net_arch': [16]}"]


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


@pytest.fixture(scope="module")
def sac_run(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("runs") / "sac")
    code = main(
        ["train", "--algo", "sac", "--env", "HazardPoint-v0", "--timesteps", "300", "--seed", "1", "--out", out,
         "--checkpoint-freq", "200", "--cost-limit", "0.05", "--hyperparams", *SMALL_SAC]
    )  # fmt: skip
    assert code == 0
    return out


def test_parse_hyperparams() -> None:
    params = parse_hyperparams(["gamma=0.98", "net={'a': [1, 2]}", "device=cpu", "use_sde=True"])
    assert params == {"gamma": 0.98, "net": {"a": [1, 2]}, "device": "cpu", "use_sde": True}
    with pytest.raises(SystemExit):
        parse_hyperparams(["novalue"])


def test_train_writes_the_run_layout(sac_run: str, capsys) -> None:
    for name in ("model.zip", "config.json", "curves.png", "monitor/0.monitor.csv", "monitor/0.costs.csv"):
        assert os.path.isfile(os.path.join(sac_run, name)), name
    assert os.listdir(os.path.join(sac_run, "checkpoints")) == ["rl_model_200_steps.zip"]
    tb_runs = os.listdir(os.path.join(sac_run, "tb"))
    assert tb_runs and any(f.startswith("events.out") for f in os.listdir(os.path.join(sac_run, "tb", tb_runs[0])))
    with open(os.path.join(sac_run, "config.json")) as handle:
        config = json.load(handle)
    assert config["algo"] == "sac" and config["env_id"] == "HazardPoint-v0" and config["cost_limit"] == 0.05
    from sb3_offtrc.common.monitor import load_cost_results

    data = load_cost_results(os.path.join(sac_run, "monitor"))
    assert data["l"].tolist() == [100, 100, 100]


def test_eval_table_and_json(sac_run: str, capsys) -> None:
    assert main(["eval", sac_run, "--episodes", "3"]) == 0
    table = capsys.readouterr().out
    assert "cost_cvar(0.125)" in table and "violation_rate" in table
    assert main(["eval", os.path.join(sac_run, "model.zip"), "--episodes", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["episode_costs"]) == 3
    assert result["cost_limit"] == pytest.approx(0.05 * 100)  # d * T, T = HazardPoint's 100 steps
    assert result["mean_ep_length"] == 100.0


def test_record_every_kth_frame_keeps_real_time(tmp_path, capsys) -> None:
    from PIL import Image

    gif = str(tmp_path / "v.gif")
    assert (
        main(["record", "--env", "HazardPoint-v0", "--steps", "9", "--every", "3", "--fps", "30", "--output", gif]) == 0
    )
    assert "(3 frames," in capsys.readouterr().out
    with Image.open(gif) as image:
        assert image.info["duration"] == 100  # each frame stands for 3 env steps at 30 steps/s
    assert main(["record", "--env", "HazardPoint-v0", "--every", "0", "--output", gif]) == 2
    assert "--every must be a positive number, got 0" in capsys.readouterr().err


def test_record_gif_and_mp4(sac_run: str, tmp_path) -> None:
    import imageio.v2 as imageio

    gif = str(tmp_path / "v.gif")
    assert main(["record", sac_run, "--steps", "5", "--output", gif]) == 0
    frames = imageio.mimread(gif)
    # GIF writers merge identical consecutive frames (a barely trained policy may not move a pixel)
    assert 1 <= len(frames) <= 5 and np.asarray(frames[0]).shape[:2] == (128, 128)
    if _has("imageio_ffmpeg"):
        mp4 = str(tmp_path / "v.mp4")
        assert main(["record", "--env", "HazardPoint-v0", "--steps", "5", "--fps", "5", "--output", mp4]) == 0
        assert len(imageio.mimread(mp4)) == 5


def test_plot_several_runs(sac_run: str, tmp_path) -> None:
    png = str(tmp_path / "curves.png")
    assert main(["plot", sac_run, os.path.join(sac_run, "monitor"), "--output", png, "--window", "2"]) == 0
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100
    assert main(["plot", str(tmp_path / "empty"), "--output", png]) == 2


def test_resume_continues_the_step_count(sac_run: str, tmp_path) -> None:
    out = str(tmp_path / "resumed")
    args = ["train", "--algo", "sac", "--env", "HazardPoint-v0", "--timesteps", "100", "--out", out]
    assert main([*args, "--resume", os.path.join(sac_run, "model.zip")]) == 0
    from stable_baselines3 import SAC

    assert SAC.load(os.path.join(out, "model.zip")).num_timesteps == 400


def test_ppo_with_two_envs(tmp_path, capsys) -> None:
    out = str(tmp_path / "ppo")
    hp = ["n_steps=100", "batch_size=50", "n_epochs=1", "policy_kwargs={'net_arch': [16]}"]
    assert (
        main(["train", "--algo", "ppo", "--n-envs", "2", "--timesteps", "200", "--out", out, "--hyperparams", *hp]) == 0
    )
    assert sorted(os.listdir(os.path.join(out, "monitor"))) == [
        "0.costs.csv",
        "0.monitor.csv",
        "1.costs.csv",
        "1.monitor.csv",
    ]
    printed = capsys.readouterr().out
    assert "curves:" in printed and os.path.join(out, "curves.png") in printed


def test_unknown_env_lists_ids(tmp_path, capsys) -> None:
    assert main(["train", "--env", "NoSuchEnv-v9", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "HazardPoint-v0" in err and "OffTRC/SafetyPointGoal1-v0" in err


USER_ENV_MODULE = """
import gymnasium as gym
import numpy as np


class CostLine(gym.Env):
    observation_space = gym.spaces.Box(-10, 10, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.x = np.zeros(1, np.float32)
        return self.x.copy(), {}

    def step(self, action):
        self.x = np.clip(self.x + 0.1 * np.asarray(action, np.float32), -10, 10)
        return self.x.copy(), float(self.x[0]), False, False, {"cost": float(self.x[0] > 1.0)}


gym.register("CliUserCostLine-v0", entry_point=CostLine, max_episode_steps=50)
"""


def test_train_and_eval_a_user_env_by_module_prefix(tmp_path, monkeypatch, capsys) -> None:
    # the env is registered only when its module is imported: "module:EnvId" must import it
    (tmp_path / "cli_user_envs.py").write_text(USER_ENV_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = str(tmp_path / "user")
    env = "cli_user_envs:CliUserCostLine-v0"
    argv = ["train", "--algo", "sac", "--env", env, "--timesteps", "150", "--out", out, "--hyperparams", *SMALL_SAC]
    assert main(argv) == 0
    with open(os.path.join(out, "config.json")) as handle:
        assert json.load(handle)["env_id"] == env
    capsys.readouterr()
    assert main(["eval", out, "--episodes", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mean_ep_length"] == 50.0 and result["cost_limit"] is None


def test_env_kwargs_reach_training_eval_and_the_config(tmp_path, capsys) -> None:
    out = str(tmp_path / "kw")
    argv = ["train", "--algo", "sac", "--timesteps", "200", "--out", out, "--hyperparams", *SMALL_SAC,
            "--env-kwargs", "hazard_radius=0.0"]  # fmt: skip
    assert main(argv) == 0
    with open(os.path.join(out, "config.json")) as handle:
        assert json.load(handle)["env_kwargs"] == {"hazard_radius": 0.0}
    from sb3_offtrc.common.monitor import load_cost_results

    assert load_cost_results(os.path.join(out, "monitor"))["c"].sum() == 0.0  # no hazard, no cost
    capsys.readouterr()
    assert main(["eval", out, "--episodes", "1", "--json"]) == 0  # the run's kwargs by default
    assert json.loads(capsys.readouterr().out)["mean_cost"] == 0.0
    # a hazard that covers the whole arena: every step costs 1
    assert main(["eval", out, "--episodes", "1", "--json", "--env-kwargs", "hazard_radius=50.0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mean_cost"] == result["mean_ep_length"] == 100.0


def test_observation_flag_names_the_fix_for_bad_input(tmp_path, capsys) -> None:
    out = str(tmp_path / "obs")
    # HazardPoint has one observation: another is a usage error naming the fix, before anything is built
    assert main(["train", "--env", "HazardPoint-v0", "--observation", "paper", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "Safety-Gymnasium tasks only" in err and "leave it out" in err and "Traceback" not in err
    assert not os.path.exists(out)  # refused before the run directory is made
    # the paper's layout exists for the Goal tasks only
    assert main(["train", "--env", "SafetyPointButton1-v0", "--observation", "paper", "--out", out]) == 2
    assert "Goal tasks" in capsys.readouterr().err
    # native is every env's own observation: nothing is added, and HazardPoint (no such keyword) trains
    native = str(tmp_path / "native")
    argv = ["train", "--algo", "sac", "--env", "HazardPoint-v0", "--observation", "native", "--timesteps", "100",
            "--out", native, "--hyperparams", *SMALL_SAC]  # fmt: skip
    assert main(argv) == 0
    with open(os.path.join(native, "config.json")) as handle:
        assert json.load(handle)["env_kwargs"] == {}
    from sb3_offtrc.cli import OBSERVATION_CHOICES
    from sb3_offtrc.envs.safety import OBSERVATION_CHOICES as ENV_CHOICES

    assert OBSERVATION_CHOICES == ENV_CHOICES  # the CLI spells them out so that --help needs no import
    argv = ["train", "--env", "SafetyPointGoal1-v0", "--observation", "paper", "--env-kwargs", "observation=lidar_max",
            "--out", out]  # fmt: skip
    assert main(argv) == 2
    assert "disagree" in capsys.readouterr().err


@pytest.mark.safety
def test_observation_flag_reaches_training_eval_and_the_config(tmp_path, capsys) -> None:
    from sb3_offtrc.compat.safety_gymnasium import safety_gymnasium_available

    if not safety_gymnasium_available():
        pytest.skip("safety_gymnasium not installed")
    out = str(tmp_path / "paper_obs")
    argv = ["train", "--algo", "sac", "--env", "SafetyPointGoal1-v0", "--observation", "paper", "--timesteps", "150",
            "--out", out, "--hyperparams", *SMALL_SAC]  # fmt: skip
    assert main(argv) == 0
    with open(os.path.join(out, "config.json")) as handle:
        assert json.load(handle)["env_kwargs"] == {"observation": "paper"}
    from stable_baselines3 import SAC

    assert SAC.load(os.path.join(out, "model.zip")).observation_space.shape == (24,)  # the paper's layout
    capsys.readouterr()
    # eval rebuilds the env from config.json: a native 60-dim observation would not load the model
    assert main(["eval", out, "--episodes", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_ep_length"] == 1000.0


def test_unimportable_env_module_names_the_fix(tmp_path, capsys) -> None:
    assert main(["train", "--env", "no_such_module_xyz:Foo-v0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no_such_module_xyz" in err and "PYTHONPATH" in err


def test_module_entry_point_help() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "sb3_offtrc", "--help"], capture_output=True, text=True, check=False, env=env
    )
    assert result.returncode == 0
    assert all(cmd in result.stdout for cmd in ("train", "eval", "record", "plot"))


def test_train_offtrc(tmp_path) -> None:
    out = str(tmp_path / "offtrc")
    hp = ["n_steps=100", "n_recent=100", "n_batch=200", "buffer_size=1000", "n_critic_epochs=2",
          "policy_kwargs={'net_arch': [16]}"]  # fmt: skip
    assert main(["train", "--algo", "offtrc", "--timesteps", "200", "--cost-limit", "0.025", "--out", out,
                 "--hyperparams", *hp]) == 0  # fmt: skip
    with open(os.path.join(out, "config.json")) as handle:
        assert json.load(handle)["cost_limit"] == 0.025
    assert main(["eval", out, "--episodes", "2"]) == 0


def test_train_offtrc_preset_with_overrides(tmp_path) -> None:
    from sb3_offtrc import OffTRC

    out = str(tmp_path / "preset")
    hp = ["n_steps=100", "n_recent=100", "n_batch=200", "n_critic_epochs=1"]
    assert main(["train", "--algo", "offtrc", "--preset", "cpu", "--timesteps", "100", "--out", out,
                 "--hyperparams", *hp]) == 0  # fmt: skip
    model = OffTRC.load(os.path.join(out, "model.zip"))
    assert model.policy.net_arch == {"pi": [128, 128], "vf": [128, 128]}  # from the preset
    assert model.n_critic_epochs == 1  # the explicit override wins
    assert main(["train", "--algo", "sac", "--preset", "cpu", "--timesteps", "10", "--out", out]) == 2


@pytest.mark.parametrize("algo", ["sac_lag", "ppo_lag"])
def test_train_lagrangian(tmp_path, algo: str) -> None:
    if not _has("sb3_offtrc.lagrangian"):
        pytest.skip("sb3_offtrc.lagrangian not written yet")
    out = str(tmp_path / algo)
    hp = SMALL_SAC if algo == "sac_lag" else ["n_steps=100", "batch_size=50", "n_epochs=1"]
    assert main(["train", "--algo", algo, "--timesteps", "200", "--out", out, "--hyperparams", *hp]) == 0


@pytest.mark.safety
def test_record_safety_task_headless(tmp_path) -> None:
    from sb3_offtrc.compat.safety_gymnasium import safety_gymnasium_available

    if not safety_gymnasium_available():
        pytest.skip("safety_gymnasium not installed")
    os.environ.setdefault("MUJOCO_GL", "egl")
    gif = str(tmp_path / "goal.gif")
    assert main(["record", "--env", "SafetyPointGoal1-v0", "--cost", "smooth", "--steps", "3", "--output", gif]) == 0
    import imageio.v2 as imageio

    frames = imageio.mimread(gif)
    assert 1 <= len(frames) <= 3 and np.asarray(frames[0]).std() > 0  # not a blank image
