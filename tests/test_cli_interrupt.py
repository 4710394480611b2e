"""Interrupting and resuming ``python -m sb3_offtrc train`` (issue 22, items 3 and 4): SIGINT/SIGTERM
save the run and exit 130/143, and ``--resume`` into the same ``--out`` continues its files, so that an
interrupted and resumed run ends with the files of an uninterrupted one apart from its run record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from sb3_offtrc.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_OFFTRC = ["n_steps=100", "n_recent=100", "n_batch=200", "buffer_size=1000", "n_critic_epochs=1",
               "policy_kwargs={'net_arch': [8]}"]  # fmt: skip
EPISODE = 100  # HazardPoint-v0's fixed episode length


def _rows(path: str) -> list[str]:
    """The data rows of a monitor file (after its JSON header and column line)."""
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return handle.read().splitlines()[2:]


def _config(out: str) -> dict[str, Any]:
    with open(os.path.join(out, "config.json")) as handle:
        return json.load(handle)  # type: ignore[no-any-return]


def _num_timesteps(model_path: str) -> int:
    from sb3_offtrc import OffTRC

    return int(OffTRC.load(model_path, device="cpu").num_timesteps)


# --------------------------------------------------------------- item 4: resuming in place


def _train(out: str, timesteps: int, *extra: str) -> int:
    return main(["train", "--timesteps", str(timesteps), "--out", out, "--eval-freq", "200", "--eval-episodes", "1",
                 "--checkpoint-freq", "200", "--hyperparams", *TINY_OFFTRC, *extra])  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[str]]:
    """An uninterrupted 500-step run, and one of 300 steps resumed in place for 200 more."""
    base = tmp_path_factory.mktemp("resume")
    whole, split = str(base / "whole"), str(base / "split")
    assert _train(whole, 500) == 0
    assert _train(split, 300) == 0
    first_rows = _rows(os.path.join(split, "monitor", "0.costs.csv"))
    assert _train(split, 200, "--resume", os.path.join(split, "model.zip")) == 0
    return whole, split, first_rows


def test_a_resumed_run_appends_to_its_files(runs: tuple[str, str, list[str]]) -> None:
    whole, split, first_rows = runs
    for name in ("0.costs.csv", "0.monitor.csv"):
        rows = _rows(os.path.join(split, "monitor", name))
        assert len(rows) == len(_rows(os.path.join(whole, "monitor", name))) == 5, name
        if name == "0.costs.csv":
            assert rows[: len(first_rows)] == first_rows  # the first run's episodes, unchanged
        times = [float(row.split(",")[2]) for row in rows]
        assert times == sorted(times)  # t counts from the first run's start
    assert _num_timesteps(os.path.join(split, "model.zip")) == 500
    # checkpoints and evaluations fall on the steps of the uninterrupted run
    assert sorted(os.listdir(os.path.join(split, "checkpoints"))) == sorted(
        os.listdir(os.path.join(whole, "checkpoints"))
    )
    with (
        np.load(os.path.join(split, "eval", "evaluations.npz")) as a,
        np.load(os.path.join(whole, "eval", "evaluations.npz")) as b,
    ):
        assert a["timesteps"].tolist() == b["timesteps"].tolist() == [200, 400]


def test_a_resumed_run_keeps_its_configuration_and_records_the_resume(runs: tuple[str, str, list[str]]) -> None:
    whole, split, _ = runs
    config, reference = _config(split), _config(whole)
    segments = config.pop("segments")
    reference.pop("segments")
    assert config == reference  # the first run's configuration, the budget it asked for included
    assert [(s["start_timesteps"], s["end_timesteps"], s["status"]) for s in segments] == [
        (0, 300, "completed"),
        (300, 500, "completed"),
    ]
    assert segments[0]["resumed_from"] is None
    assert segments[1]["resumed_from"] == os.path.join(split, "model.zip") and segments[1]["timesteps"] == 200


def test_resuming_in_place_refuses_what_would_mix_runs(runs: tuple[str, str, list[str]], capsys: Any) -> None:
    whole, split, _ = runs
    before = _rows(os.path.join(split, "monitor", "0.costs.csv"))
    cases = [
        (["--resume", os.path.join(whole, "model.zip")], "holds another run"),
        (["--resume", os.path.join(split, "model.zip"), "--algo", "sac"], "--algo"),
        (["--resume", os.path.join(split, "checkpoints", "rl_model_200_steps.zip")], "already went on to step 500"),
    ]
    for flags, needle in cases:
        assert main(["train", "--timesteps", "100", "--out", split, *flags]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert _rows(os.path.join(split, "monitor", "0.costs.csv")) == before


def test_offtrc_resumed_mid_rollout_updates_on_the_same_steps() -> None:
    from stable_baselines3.common.callbacks import BaseCallback

    import sb3_offtrc.envs  # noqa: F401
    from sb3_offtrc import OffTRC

    class StopAt(BaseCallback):
        def _on_step(self) -> bool:
            return self.num_timesteps < 150

    model = OffTRC("MlpPolicy", "HazardPoint-v0", n_steps=100, n_recent=100, n_batch=200,
                   buffer_size=1000, n_critic_epochs=1, policy_kwargs={"net_arch": [8]}, seed=0)  # fmt: skip
    model.learn(1000, callback=StopAt())
    assert model.num_timesteps == 150 and model._n_updates == 1  # stopped half-way through the second rollout
    model.learn(150, reset_num_timesteps=False)
    # the second rollout is completed (update at 200), then one more: the budget is met exactly
    assert model.num_timesteps == 300 and model._n_updates == 3


# ------------------------------------------------------------- item 3: SIGINT and SIGTERM


def _signal_after_first_episode(path: str, sig: int, pid: int) -> threading.Thread:
    def send() -> None:
        deadline = time.monotonic() + 120
        while not _rows(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pid, sig)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_sigint_saves_the_run_exits_130_and_restores_the_handlers(tmp_path: Any, capsys: Any) -> None:
    out = str(tmp_path / "run")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = _signal_after_first_episode(os.path.join(out, "monitor", "0.costs.csv"), signal.SIGINT, os.getpid())
    code = main(["train", "--timesteps", "50000", "--out", out, "--save-replay-buffer", "--hyperparams", *TINY_OFFTRC])
    thread.join()
    assert code == 130
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    captured = capsys.readouterr()
    assert "SIGINT: stopping after the current env step" in captured.err
    steps = _num_timesteps(os.path.join(out, "model.zip"))
    assert EPISODE <= steps < 50000
    assert f"training stopped at step {steps} of 50000" in captured.out
    for path in ("model.zip", "replay_buffer.npz", "config.json", "monitor", "curves.png"):
        assert os.path.join(out, path) in captured.out, path
    resume = f"--resume {os.path.join(out, 'model.zip')} --timesteps {50000 - steps} --resume-replay-buffer"
    assert resume in captured.out
    segment = _config(out)["segments"][-1]
    assert (segment["status"], segment["signal"], segment["end_timesteps"]) == ("interrupted", "SIGINT", steps)
    assert len(_rows(os.path.join(out, "monitor", "0.costs.csv"))) == steps // EPISODE


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the workers' signal masks from /proc")
def test_subprocess_workers_ignore_the_stop_signals(tmp_path: Any) -> None:
    from sb3_offtrc.cli import make_train_env

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    venv = make_train_env("HazardPoint-v0", 2, 0, None, subproc=True)
    try:
        for process in venv.processes:  # type: ignore[attr-defined]
            with open(f"/proc/{process.pid}/status") as handle:
                ignored = int(next(line for line in handle if line.startswith("SigIgn:")).split()[1], 16)
            for sig in (signal.SIGINT, signal.SIGTERM):
                assert ignored >> (sig - 1) & 1, (process.pid, sig)
    finally:
        venv.close()
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_three_sigterms_and_resumes_give_the_whole_budget_and_every_episode_once(tmp_path: Any) -> None:
    """Fault injection: SIGTERM a CLI run three times (each after at least one episode of the current
    segment), resume it in place each time, and let the fourth run finish."""
    budget = 3000
    out = str(tmp_path / "run")
    log = os.path.join(out, "monitor", "0.costs.csv")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    base = [sys.executable, "-m", "sb3_offtrc", "train", "--out", out, "--save-replay-buffer", "--hyperparams",
            *TINY_OFFTRC]  # fmt: skip
    snapshots: list[list[str]] = []
    remaining = budget
    for attempt in range(4):
        resume = [] if attempt == 0 else ["--resume", os.path.join(out, "model.zip"), "--resume-replay-buffer"]
        command = [*base, "--timesteps", str(remaining), *resume]
        logged = len(_rows(log))
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if attempt < 3:
            deadline = time.monotonic() + 120
            while len(_rows(log)) <= logged and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=300)
        assert "Traceback" not in stderr, stderr
        if attempt < 3:
            assert process.returncode == 143, (stdout, stderr)
            assert "continue with:" in stdout
        else:
            assert process.returncode == 0, (stdout, stderr)
        done = _num_timesteps(os.path.join(out, "model.zip"))
        remaining = budget - done
        snapshots.append(_rows(log))
    assert done == budget
    segments = _config(out)["segments"]
    assert [s["status"] for s in segments] == ["interrupted"] * 3 + ["completed"]
    assert [s["start_timesteps"] for s in segments[1:]] == [s["end_timesteps"] for s in segments[:-1]]
    assert segments[-1]["end_timesteps"] == budget
    # every episode exactly once: each run starts with fresh episodes and logs the ones it finishes,
    # and a later run only appends
    final = snapshots[-1]
    assert len(final) == sum((s["end_timesteps"] - s["start_timesteps"]) // EPISODE for s in segments)
    for earlier in snapshots[:-1]:
        assert final[: len(earlier)] == earlier
    assert all(row.split(",")[1] == str(EPISODE) for row in final)
    times = [float(row.split(",")[2]) for row in final]
    assert times == sorted(times) and len(set(times)) == len(times)
