"""The command line's errors (issue 22, item 11): one ``error:`` line on stderr naming the flag, a
non-zero exit and no traceback, for every bad flag value tried by hand."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from sb3_offtrc.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_OFFTRC = ["n_steps=100", "n_recent=100", "n_batch=200", "buffer_size=1000", "n_critic_epochs=1",
               "policy_kwargs={'net_arch': [8]}"]  # fmt: skip


def _fails(argv: list[str], capsys: Any, *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0, f"{argv} exited 0"
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"sb3-offtrc {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--timesteps", "0"], "--timesteps"),
        (["--timesteps", "-5"], "--timesteps"),
        (["--n-envs", "0"], "--n-envs"),
        (["--checkpoint-freq", "-1"], "--checkpoint-freq"),
        (["--eval-freq", "-1"], "--eval-freq"),
        (["--eval-episodes", "0"], "--eval-episodes"),
        (["--env-kwargs", '{"hazard_radius": 0.1}'], "--env-kwargs"),
        (["--env-kwargs", "no_such_kwarg=1"], "--env-kwargs"),
        (["--hyperparams", "no_such_hyperparameter=1"], "no_such_hyperparameter"),
        (["--hyperparams", "max_grad_norm=-1"], "max_grad_norm"),
        (["--cost-limit", "nan"], "cost_limit"),
    ],
)
def test_train_flag_errors_are_one_line_and_save_nothing(tmp_path: Any, capsys: Any, flags: list, needle: str) -> None:
    out = tmp_path / "run"
    _fails(["train", "--out", str(out), "--hyperparams", *TINY_OFFTRC, *flags], capsys, needle)
    assert not (out / "model.zip").exists()
    assert not (out / "checkpoints").exists()


def test_missing_model_files_are_named_as_given(tmp_path: Any, capsys: Any) -> None:
    missing = str(tmp_path / "nope.zip")
    err = _fails(["eval", missing], capsys, missing, "no such model file")
    assert "nope.zip.zip" not in err
    err = _fails(["train", "--resume", missing, "--out", str(tmp_path / "r")], capsys, "--resume", missing)
    assert "nope.zip.zip" not in err
    _fails(["eval", str(tmp_path)], capsys, "no model.zip")


def test_unwritable_out_names_the_flag(tmp_path: Any, capsys: Any) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    _fails(["train", "--out", str(blocker / "run")], capsys, "--out", str(blocker / "run"))


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_model_zip_is_named(tmp_path: Any, capsys: Any, damage: str) -> None:
    from sb3_offtrc import OffTRC

    path = tmp_path / "model.zip"
    OffTRC("MlpPolicy", "HazardPoint-v0", n_steps=100, n_recent=100, n_batch=200, buffer_size=1000,
           policy_kwargs={"net_arch": [8]}).save(path)  # fmt: skip
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    else:
        path.write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # an empty zip archive: no SB3 data in it
    _fails(["eval", str(path), "--algo", "offtrc", "--env", "HazardPoint-v0"], capsys, str(path))


def test_module_entry_point_exits_non_zero_without_a_traceback(tmp_path: Any) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "sb3_offtrc", "train", "--timesteps", "0", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, check=False, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--timesteps" in result.stderr
    assert not (tmp_path / "run" / "model.zip").exists()


# ------------------------------------------------------- item 5: nothing unpickled implicitly
class _Planted:
    """Unpickling this creates the file ``marker``: what a crafted replay buffer could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def offtrc_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("runs") / "offtrc")
    argv = ["train", "--algo", "offtrc", "--timesteps", "200", "--out", out, "--save-replay-buffer",
            "--checkpoint-freq", "100", "--hyperparams", *TINY_OFFTRC]  # fmt: skip
    assert main(argv) == 0
    return out


def test_the_cli_stores_replay_buffers_as_npz_only(offtrc_run: str) -> None:
    files = {os.path.relpath(os.path.join(d, f), offtrc_run) for d, _, names in os.walk(offtrc_run) for f in names}
    assert "replay_buffer.npz" in files and os.path.join("checkpoints", "rl_model_replay_buffer_100_steps.npz") in files
    assert not [f for f in files if f.endswith(".pkl")]
    import numpy as np

    with np.load(os.path.join(offtrc_run, "replay_buffer.npz"), allow_pickle=False) as data:
        assert {"costs", "behaviour_mean", "behaviour_std", "observations", "__metadata__"} <= set(data.files)


def test_resume_never_unpickles_and_loads_the_npz_buffer_only_when_asked(
    offtrc_run: str, tmp_path: Any, capsys: Any
) -> None:
    import pickle
    import shutil

    run = tmp_path / "run"
    shutil.copytree(offtrc_run, run)
    marker = tmp_path / "code_ran"
    (run / "replay_buffer.pkl").write_bytes(pickle.dumps(_Planted(str(marker))))
    model = str(run / "model.zip")
    base = ["train", "--algo", "offtrc", "--timesteps", "100", "--resume", model, "--hyperparams", *TINY_OFFTRC]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "not loading the replay buffer" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "b"), "--resume-replay-buffer"]) == 0
    assert f"resumed replay buffer from {run / 'replay_buffer.npz'}" in capsys.readouterr().out
    _fails([*base, "--out", str(tmp_path / "c"), "--resume-replay-buffer", str(run / "replay_buffer.pkl")], capsys,
           "never unpickles")  # fmt: skip
    assert not marker.exists()


def test_npz_replay_buffer_round_trip_and_refusals(offtrc_run: str, tmp_path: Any) -> None:
    import numpy as np
    from stable_baselines3.common.env_util import make_vec_env

    import sb3_offtrc.envs  # noqa: F401
    from sb3_offtrc import OffTRC
    from sb3_offtrc.common.replay_buffer_io import load_replay_buffer_npz, save_replay_buffer_npz

    saved = os.path.join(offtrc_run, "replay_buffer.npz")
    model = OffTRC.load(os.path.join(offtrc_run, "model.zip"), env=make_vec_env("HazardPoint-v0"))
    load_replay_buffer_npz(model.replay_buffer, saved)
    assert model.replay_buffer.pos == 200 and model.replay_buffer.costs.dtype == np.float32
    again = save_replay_buffer_npz(model.replay_buffer, tmp_path / "again")
    with np.load(saved) as first, np.load(again) as second:
        for key in first.files:
            np.testing.assert_array_equal(first[key], second[key])
    two = OffTRC.load(os.path.join(offtrc_run, "model.zip"), env=make_vec_env("HazardPoint-v0", n_envs=2))
    with pytest.raises(ValueError, match="n_envs=1.*n_envs=2"):
        load_replay_buffer_npz(two.replay_buffer, saved)
    np.savez(tmp_path / "foreign.npz", observations=np.zeros(3))
    with pytest.raises(ValueError, match="not a replay buffer saved by sb3_offtrc"):
        load_replay_buffer_npz(model.replay_buffer, tmp_path / "foreign.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="cannot read the replay buffer"):
        load_replay_buffer_npz(model.replay_buffer, tmp_path / "corrupt.npz")


def test_offtrc_load_names_a_foreign_or_truncated_zip(tmp_path: Any) -> None:
    from stable_baselines3 import SAC

    from sb3_offtrc import OffTRC

    sac = tmp_path / "sac.zip"
    SAC("MlpPolicy", "Pendulum-v1", buffer_size=100, policy_kwargs={"net_arch": [8]}).save(sac)
    with pytest.raises(ValueError, match=r"sac.zip' is not an OffTRC model .*stable_baselines3.sac.policies"):
        OffTRC.load(sac)
    truncated = tmp_path / "cut.zip"
    truncated.write_bytes(sac.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"cut.zip' is not a readable Stable-Baselines3 model file"):
        OffTRC.load(truncated)
