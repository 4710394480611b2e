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
