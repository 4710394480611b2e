"""``benchmarks/run.py --backend ray`` on real Ray clusters on this machine (no mocks).

One cluster is started by the driver itself (``--backend ray`` without ``--address``: ``ray.init``
with ``--workers`` CPUs); the other is a ``ray start --head --block`` process on loopback with its
own token (what a user starts on a head node), reached with ``--address``. Without Ray the cluster
tests skip, unless ``SB3_OFFTRC_REQUIRE_RAY=1`` (set by ``.ci/run``: CI installs the ``cluster``
extra) makes that a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RAY_IMPORTABLE = importlib.util.find_spec("ray") is not None
REQUIRED = os.environ.get("SB3_OFFTRC_REQUIRE_RAY", "") not in ("", "0")

if not RAY_IMPORTABLE and REQUIRED:
    raise RuntimeError("Ray is not importable, and SB3_OFFTRC_REQUIRE_RAY=1 demands it (the `cluster` extra)")
needs_ray = pytest.mark.skipif(not RAY_IMPORTABLE, reason="Ray is not installed (the `cluster` extra)")

#: a tiny grid: two of the quick grid's algorithms at 1,000 env steps (seconds per run)
TINY = ["--quick", "--algos", "ppo_lag", "offtrc", "--budget", "1000"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=300, check=False
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """A ``ray start --head --block`` process and what a driver needs to reach it."""

    def __init__(self, process: subprocess.Popen[bytes], address: str, env: dict[str, str]) -> None:
        self.process = process
        self.address = address
        self.env = env

    def worker_titles(self) -> list[str]:
        """The process titles (``ray::<task name>``) of the cluster's processes that run a task now.

        The cluster runs in a session of its own (the ``ray start`` process leads it), so processes
        of other Ray instances on this machine are not counted.
        """
        listing = subprocess.run(["ps", "-eo", "sid=,args="], capture_output=True, text=True, check=True).stdout
        titles = []
        for line in listing.splitlines():
            sid, _, args = line.strip().partition(" ")
            if int(sid) == self.process.pid and args.startswith("ray::HazardPoint-v0/"):
                titles.append(args.strip())
        return titles


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not RAY_IMPORTABLE:
        pytest.skip("Ray is not installed (the `cluster` extra)")
    ray_cli = Path(sys.executable).with_name("ray")
    # Ray's socket paths (<temp dir>/session_<date>_<pid>/sockets/plasma_store) must stay under
    # 108 bytes: a temp dir of its own right in the system's, not pytest's deeper one
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))
    log = temp_dir / "ray_start.log"
    port = _free_port()
    # a token of its own: the test cluster neither needs nor touches ~/.ray/auth_token
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                str(ray_cli), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                f"--object-store-memory={100 * 2**20}", f"--temp-dir={temp_dir}",
                # fixed defaults that a second Ray instance on this machine (the other test) would share
                f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
            ],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Cluster(process, f"127.0.0.1:{port}", env)
    finally:
        # --block: on SIGTERM `ray start` drains and stops every process it started
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the session this fixture started, and only it
            process.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _without_times(path: Path) -> pd.DataFrame:
    """A run's CSV without its wall-clock columns (the only ones that differ between two runs of one seed),
    the columns sorted (SB3's logger writes its keys in an order that varies from process to process)."""
    frame = pd.read_csv(path)
    frame = frame.drop(columns=[c for c in frame.columns if "time" in c and c != "time/total_timesteps"])
    return frame.sort_index(axis=1)


@needs_ray
def test_ray_backend_writes_what_the_local_backend_writes(tmp_path: Path) -> None:
    """Same seeds, same results: each backend's episode logs, curves and logger output agree."""
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    proc = _run("benchmarks/run.py", *TINY, "--train-log", "--workers", "1", "--out", str(local))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run("benchmarks/run.py", *TINY, "--train-log", "--workers", "2", "--out", str(on_ray), "--backend", "ray")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted 2 run(s) to a local Ray instance (2 CPUs)" in proc.stdout
    assert "progress: 1/2 runs done" in proc.stdout and "ETA" in proc.stdout
    assert "progress: 2/2 runs done" in proc.stdout

    for algo in ("ppo_lag", "offtrc"):
        a, b = (root / "HazardPoint-v0" / algo / "seed0" for root in (local, on_ray))
        assert sorted(p.name for p in b.iterdir()) == ["curve.csv", "episodes.csv", "progress.csv", "summary.json"]
        for name in ("episodes.csv", "curve.csv", "progress.csv"):
            pd.testing.assert_frame_equal(_without_times(a / name), _without_times(b / name), obj=f"{algo} {name}")
        assert len(pd.read_csv(b / "episodes.csv")) == 10  # 1,000 steps of 100-step episodes
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
        for key in ("key", "env_steps", "train_episodes", "train_cv_total", "hyperparams", "code"):
            assert sa[key] == sb[key], key
        evals = {k: v for k, v in sb["final_eval"].items() if "time" not in k}
        assert evals == {k: v for k, v in sa["final_eval"].items() if "time" not in k}
        assert sb["host"]["torch_threads"] == 1
    records = [json.loads(line) for line in (on_ray / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["algo"] for r in records) == ["offtrc", "ppo_lag"]
    assert "--backend ray" in (on_ray / "command.txt").read_text()

    # resumed: every run is finished, so nothing is submitted (and no Ray instance is started)
    proc = _run("benchmarks/run.py", *TINY, "--train-log", "--out", str(on_ray), "--backend", "ray")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 run(s) to do, 2 skipped" in proc.stdout and "submitted" not in proc.stdout


#: the driver of the failure test: run.py's command line with a bogus hyperparameter put into the
#: quick grid's SAC, as a user would by editing grid.py
_BOGUS_DRIVER = """
import sys
sys.path.insert(0, ".")
import grid, run
grid.QUICK.hyperparams["sac"] = {**grid.QUICK.hyperparams["sac"], "bogus_hyperparameter": 1}
sys.exit(run.main(sys.argv[1:]))
"""


@needs_ray
def test_a_run_that_raises_is_reported_with_its_key_and_the_others_finish(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run(
        "-c", _BOGUS_DRIVER, "--quick", "--algos", "sac", "ppo_lag", "--budget", "1000", "--out", str(out),
        "--backend", "ray", "--address", cluster.address,
        env=cluster.env, cwd=BENCH,  # the driver's directory is on the workers' import path: grid, onerun
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED HazardPoint-v0/sac/seed0" in proc.stdout
    assert "bogus_hyperparameter" in proc.stdout  # the remote traceback comes with it
    assert "finished HazardPoint-v0/ppo_lag/seed0" in proc.stdout
    assert "progress: 2/2 runs done, 1 failed" in proc.stdout
    assert (out / "HazardPoint-v0" / "ppo_lag" / "seed0" / "summary.json").exists()
    assert not (out / "HazardPoint-v0" / "sac").exists()
    (record,) = (out / "runs.jsonl").read_text().splitlines()
    assert json.loads(record)["algo"] == "ppo_lag"


@needs_ray
def test_ctrl_c_cancels_the_cluster_tasks(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # an earlier attempt at another budget: not finished for this grid, so it is redone, and its
    # files must not outlive the interruption as if they were this run's
    stale = out / "HazardPoint-v0" / "offtrc" / "seed0"
    stale.mkdir(parents=True)
    (stale / "summary.json").write_text(json.dumps({"budget": 10, "hyperparams": {}}))
    driver = subprocess.Popen(
        [
            sys.executable, "benchmarks/run.py", "--quick", "--algos", "ppo_lag", "offtrc", "--budget", "500000",
            "--out", str(out), "--backend", "ray", "--address", cluster.address,
        ],
        cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a terminal's Ctrl-C: SIGINT with Python's default handler, even where pytest runs with it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        expected = ["ray::HazardPoint-v0/offtrc/seed0", "ray::HazardPoint-v0/ppo_lag/seed0"]
        deadline = time.monotonic() + 120
        while sorted(cluster.worker_titles()) != expected:
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, f"the runs did not start on the cluster: {cluster.worker_titles()}"
            time.sleep(0.5)
        time.sleep(3)  # into the training loop, past the workers' start
        driver.send_signal(signal.SIGINT)
        stdout, stderr = driver.communicate(timeout=90)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 130, stdout + stderr
    assert "cancelled 2 of 2 unfinished run(s) on the cluster" in stdout
    assert "interrupted: 2 run(s) unfinished" in stderr
    assert not list(out.rglob("summary.json")) and not (out / "runs.jsonl").exists()
    assert not stale.exists()
    deadline = time.monotonic() + 30
    while cluster.worker_titles():  # the tasks' workers are gone, the cluster itself stays up
        assert time.monotonic() < deadline, cluster.worker_titles()
        time.sleep(0.5)
    assert cluster.process.poll() is None


def test_ray_backend_without_ray_is_one_clear_error() -> None:
    # sys.modules["ray"] = None makes `import ray` raise ImportError, as where Ray is not installed
    driver = (
        "import sys; sys.modules['ray'] = None; sys.path.insert(0, '.'); import run; sys.exit(run.main(sys.argv[1:]))"
    )
    proc = _run("-c", driver, "--quick", "--backend", "ray", "--dry-run", cwd=BENCH)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: --backend ray needs Ray") and "pip install 'sb3-offtrc[cluster]'" in line
    proc = _run("benchmarks/run.py", "--quick", "--address", "auto", "--dry-run")
    assert proc.returncode == 2 and "--address needs --backend ray" in proc.stderr


def test_progress_line_estimates_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    from backends import Progress

    progress = Progress(total=4)
    progress.start -= 60  # one run took a minute
    assert progress.update() == "progress: 1/4 runs done, 1m 00s elapsed, ETA 3m 00s"
    progress.start -= 60 * 60  # ... and the next one an hour
    line = progress.update(failed=True)
    assert line.startswith("progress: 2/4 runs done, 1 failed, 1h 01m elapsed, ETA 1h 01m")
    progress.update()
    assert progress.update().endswith("runs done, 1 failed, 1h 01m elapsed")  # nothing left: no ETA
