"""``python -m sb3_offtrc.zoo optimize`` on a real PostgreSQL server, as on several machines.

The ``postgres`` fixture starts a throwaway server of the installed PostgreSQL (``initdb`` and
``pg_ctl`` into a temporary directory, as the ``postgres`` user when we are root, since the
server refuses to run as root), listening on 127.0.0.1 only, on a free port, with a password;
it is stopped and deleted afterwards. Without the binaries the tests skip, unless
``SB3_OFFTRC_REQUIRE_POSTGRES=1`` (set by ``.ci/run``: CI's machine has them) makes that a failure.
``SB3_OFFTRC_PG_BIN`` names the binaries' directory if it is not found on its own.

Every worker is a separate ``python -m sb3_offtrc.zoo optimize`` process, as a user starts it;
nothing about the database is mocked.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


if not (_has("rl_zoo3") and _has("optuna")):
    pytest.skip("rl-zoo3 / optuna not installed (the `zoo` extra)", allow_module_level=True)

import optuna  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("SB3_OFFTRC_REQUIRE_POSTGRES", "") not in ("", "0")
# a few hundred steps with small networks: a trial takes seconds on two busy cores
TINY_OFFTRC = {
    "policy": "MlpPolicy",
    "n_timesteps": 200,
    "n_steps": 100,
    "n_recent": 100,
    "n_batch": 200,
    "buffer_size": 1000,
    "n_critic_epochs": 2,
    "max_kl": 0.01,
    "cost_limit": 0.025,
    "cvar_alpha": 0.125,
    "policy_kwargs": "dict(net_arch=[16, 16], activation_fn=nn.Tanh)",
}
SAMPLED = {"max_kl", "learning_rate", "n_critic_epochs", "n_batch_factor", "net_arch"}


# ------------------------------------------------------------------------------ the server
def postgres_bindir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: ``$SB3_OFFTRC_PG_BIN``, ``pg_config --bindir``,
    the newest ``/usr/lib/postgresql/<version>/bin`` (Debian, Ubuntu) or ``PATH``."""
    candidates: list[Path] = []
    if os.environ.get("SB3_OFFTRC_PG_BIN"):
        candidates.append(Path(os.environ["SB3_OFFTRC_PG_BIN"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(found.stdout.strip()))
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """A running throwaway server; :attr:`url` is what ``--storage`` gets."""

    bindir: Path
    root: Path
    port: int
    password: str
    run_as: dict[str, Any]

    @property
    def url(self) -> str:
        return f"postgresql://optuna:{self.password}@127.0.0.1:{self.port}/optuna"

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), *args],
            capture_output=True, text=True, check=False, **self.run_as,
        )  # fmt: skip

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text()[-3000:] if path.is_file() else "(no server log)"


def start_postgres(bindir: Path) -> PostgresServer:
    """initdb + pg_ctl start on 127.0.0.1 (a free port) and an ``optuna`` database owned by user ``optuna``."""
    run_as: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="sb3-offtrc-pg-"))
    if os.geteuid() == 0:  # the server will not run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.fail("running as root, PostgreSQL needs an unprivileged user to run as; there is no `postgres` user")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    password = secrets.token_hex(8)
    pwfile = root / "password"
    pwfile.write_text(password + "\n")
    if run_as:
        os.chown(pwfile, run_as["user"], run_as["group"])
    init = subprocess.run(
        [str(bindir / "initdb"), "-D", str(root / "data"), "-U", "optuna", f"--pwfile={pwfile}",
         "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"],
        capture_output=True, text=True, check=False, **run_as,
    )  # fmt: skip
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    for _attempt in range(3):  # another process may take the free port before the server binds it
        server = PostgresServer(bindir, root, _free_port(), password, run_as)
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={server.port} -c unix_socket_directories={root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"  # a throwaway server
        )
        started = server.pg_ctl("-l", str(root / "server.log"), "-o", options, "-w", "-t", "60", "start")
        if started.returncode == 0:
            break
    else:
        log = server.log()
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed:\n{started.stdout}\n{started.stderr}\n{log}")
    import psycopg

    # CREATE DATABASE cannot run inside a transaction
    with psycopg.connect(
        host="127.0.0.1", port=server.port, user="optuna", password=password, dbname="postgres", autocommit=True
    ) as connection:
        connection.execute("CREATE DATABASE optuna")
    return server


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    bindir = postgres_bindir()
    if bindir is None:
        message = "PostgreSQL's initdb/pg_ctl not found (set SB3_OFFTRC_PG_BIN, or install postgresql)"
        if REQUIRED:
            pytest.fail(message + "; SB3_OFFTRC_REQUIRE_POSTGRES=1 demands them")
        pytest.skip(message)
    if not _has("psycopg"):
        pytest.fail('psycopg is missing: it comes with the `zoo` extra (pip install -c constraints.txt -e ".[zoo]")')
    server = start_postgres(bindir)
    try:
        yield server
    finally:
        server.pg_ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(server.root, ignore_errors=True)


# ------------------------------------------------------------------------------ the workers
def _zoo(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "sb3_offtrc.zoo", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _optimize(conf: Path, storage: str, study: str, seed: int, *extra: str, cwd: Path) -> subprocess.Popen[str]:
    return _zoo(
        "optimize", "--algo", "offtrc", "--env", "HazardPoint-v0", "--conf-file", str(conf), "-f", f"logs{seed}",
        "--seed", str(seed), "--storage", storage, "--study-name", study, "--n-evaluations", "1",
        "--eval-episodes", "2", "--sampler", "random", "--pruner", "none", "--cost-penalty", "5", *extra,
        cwd=cwd,
    )  # fmt: skip


def _finish(worker: subprocess.Popen[str], timeout: float = 300) -> str:
    output = worker.communicate(timeout=timeout)[0]
    assert worker.returncode == 0, output[-4000:]
    return output


def _tiny_conf(path: Path, **overrides: Any) -> Path:
    path.write_text(yaml.safe_dump({"HazardPoint-v0": {**TINY_OFFTRC, **overrides}}))
    return path


@dataclass
class SharedStudy:
    storage: str
    name: str
    outputs: list[str]
    pids: list[int]


@pytest.fixture(scope="module")
def shared_study(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> SharedStudy:
    """Two workers started together on one new study, two trials each."""
    cwd = tmp_path_factory.mktemp("shared")
    conf = _tiny_conf(cwd / "tiny.yml")
    workers = [_optimize(conf, postgres.url, "shared", seed, "--n-trials", "2", cwd=cwd) for seed in (31, 32)]
    outputs = [_finish(worker) for worker in workers]
    return SharedStudy(postgres.url, "shared", outputs, [worker.pid for worker in workers])


# ------------------------------------------------------------------------------ the tests
def test_two_workers_share_one_postgres_study(shared_study: SharedStudy) -> None:
    from sb3_offtrc.zoo.objective import TRIAL_ATTRS

    study = optuna.load_study(study_name=shared_study.name, storage=shared_study.storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    # both processes worked on it, two trials each
    workers = sorted(t.user_attrs["worker"] for t in trials)
    assert {w.rsplit(":", 1)[1] for w in workers} == {str(pid) for pid in shared_study.pids}
    assert workers[0] == workers[1] and workers[2] == workers[3]
    # different seeds: the random samplers drew different points
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4
    assert study.user_attrs["episode_cost_limit"] == pytest.approx(2.5)
    assert study.user_attrs["cost_penalty"] == 5.0 and study.user_attrs["constraint_metric"] == "cvar"
    for trial in trials:
        attrs = trial.user_attrs
        assert set(TRIAL_ATTRS) <= set(attrs) and set(trial.params) == SAMPLED
        assert attrs["eval_cost"] == attrs["eval_cost_cvar"] and attrs["eval_timesteps"] == 200
        assert attrs["feasible"] == (attrs["eval_cost"] <= 2.5)
        assert trial.value == pytest.approx(attrs["eval_return"] - 5.0 * max(attrs["eval_cost"] - 2.5, 0.0))
    # the password stays out of the workers' logs
    password = shared_study.storage.split(":")[2].split("@")[0]
    assert all(password not in output for output in shared_study.outputs)
    assert all("Number of finished trials" in output for output in shared_study.outputs)


def test_the_best_trial_trains_again(shared_study: SharedStudy, tmp_path: Path) -> None:
    """What the report prints for the best trial goes back into ``zoo train``, as file entry and as -params."""
    from sb3_offtrc import OffTRC
    from sb3_offtrc.zoo.objective import best_feasible_trial, hyperparams_entry, zoo_params

    study = optuna.load_study(study_name=shared_study.name, storage=shared_study.storage)
    best = best_feasible_trial(study) or study.best_trial
    hyperparams = best.user_attrs["hyperparams"]
    # the file's activation function came through the storage as the name the files use
    assert hyperparams["policy_kwargs"]["activation_fn"] == "nn.Tanh"
    entry = hyperparams_entry(hyperparams)
    params = zoo_params(hyperparams)
    assert any(f"-params {' '.join(params[:2])}" in output for output in shared_study.outputs)

    # as the shipped yml format: the entry merged into the env's entry of a --conf-file
    tuned = _tiny_conf(tmp_path / "tuned.yml", **entry, n_timesteps=100)
    # and as -params on top of the untuned file
    plain = _tiny_conf(tmp_path / "plain.yml", n_timesteps=100)
    runs = {
        "file": _zoo("train", "--algo", "offtrc", "--env", "HazardPoint-v0", "--conf-file", str(tuned),
                     "-f", "file", "--seed", "1", "--eval-freq", "-1", cwd=tmp_path),
        "params": _zoo("train", "--algo", "offtrc", "--env", "HazardPoint-v0", "--conf-file", str(plain),
                       "-f", "params", "--seed", "1", "--eval-freq", "-1", "-params", *params, cwd=tmp_path),
    }  # fmt: skip
    for folder, worker in runs.items():
        _finish(worker)
        model = OffTRC.load(tmp_path / folder / "offtrc" / "HazardPoint-v0_1" / "HazardPoint-v0.zip", device="cpu")
        assert model.max_kl == pytest.approx(best.params["max_kl"])
        assert model.lr_schedule(1.0) == pytest.approx(best.params["learning_rate"])  # rl-zoo3 makes it a schedule
        assert model.n_critic_epochs == best.params["n_critic_epochs"]
        assert model.n_batch == 100 * best.params["n_batch_factor"] and model.buffer_size >= model.n_batch
        assert model.policy_kwargs["net_arch"] == hyperparams["policy_kwargs"]["net_arch"]
        assert model.policy_kwargs["activation_fn"] is __import__("torch").nn.Tanh


def _running_trial_of(study: optuna.Study, pid: int) -> optuna.trial.FrozenTrial | None:
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if str(trial.user_attrs.get("worker", "")).endswith(f":{pid}"):
            return trial
    return None


def test_a_killed_workers_trial_is_failed_and_retried(postgres: PostgresServer, tmp_path: Path) -> None:
    """SIGKILL one of two workers mid-trial: the survivor fails the trial by its heartbeat, runs it
    again (same parameters) and the study still reaches --max-total-trials complete trials."""
    conf = _tiny_conf(tmp_path / "tiny.yml")
    extra = ("--max-total-trials", "3", "--heartbeat-interval", "1")
    survivor, victim = (_optimize(conf, postgres.url, "killed", seed, *extra, cwd=tmp_path) for seed in (41, 42))
    try:
        deadline = time.monotonic() + 120
        killed = None
        while killed is None and time.monotonic() < deadline:
            assert victim.poll() is None, victim.communicate()[0][-4000:]
            try:
                study = optuna.load_study(study_name="killed", storage=postgres.url)
                killed = _running_trial_of(study, victim.pid)
            except KeyError:  # the study is not created yet
                pass
            if killed is None:
                time.sleep(0.2)
        assert killed is not None, "the second worker never started a trial"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        # killed inside the trial: nobody can have finished it
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        assert states[killed.number] == optuna.trial.TrialState.RUNNING
        output = _finish(survivor)
    finally:
        for worker in (survivor, victim):
            if worker.poll() is None:
                worker.kill()
                worker.communicate()

    trials = optuna.load_study(study_name="killed", storage=postgres.url).get_trials()
    states = [t.state for t in trials]
    assert [t.number for t in trials] == list(range(len(trials)))
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL, states
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3, states
    assert optuna.trial.TrialState.RUNNING not in states
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1, states
    retry = retries[0]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == killed.params
    assert retry.system_attrs["retry_history"] == [killed.number]
    assert retry.user_attrs["worker"].endswith(f":{survivor.pid}")
    assert re.search(r"Number of finished trials: \d+ \(3 complete\)", output), output[-3000:]
