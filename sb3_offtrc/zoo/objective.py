"""The constrained tuning objective and where Optuna studies are stored.

Objective. A trial is scored on its evaluation episodes (deterministic actions, like rl-zoo3):
with ``R`` the mean episode return, ``C`` the episode-cost figure (mean, or empirical CVaR of the
episode costs) and ``D`` the episode cost limit,

    value = R                            if C <= D   (feasible)
    value = R - cost_penalty * (C - D)   otherwise

``D`` defaults to ``d * T``: the per-step ``cost_limit`` of the hyperparameter file times the
episode length, i.e. the undiscounted episode cost the evaluation measures (the algorithms
constrain the *discounted* cost return against ``d / (1 - gamma)``; see
:mod:`sb3_offtrc.common.evaluation`). The penalty is linear so that a trial slightly over the
limit still ranks above a useless one and TPE gets a gradient toward feasibility; it is in
return units per unit of episode cost, so pick it with the task's return scale in mind. Each
evaluation also stores the raw numbers as trial user attributes (:data:`TRIAL_ATTRS`), so a
study can be re-ranked afterwards with any other rule, and the report names the best *feasible*
trial separately from the best value.

Storage. ``None`` means an SQLite file (one machine, any number of worker processes); a plain
path ending in ``.db``/``.sqlite`` is that SQLite file; a path ending in ``.log`` is an Optuna
journal file (a shared file system without a database server); anything with ``://`` is handed
to Optuna as an RDB URL (``postgresql://...``, ``mysql+pymysql://...``: several machines).

Dead workers. RDB storages (SQLite included) get Optuna's heartbeat: every running trial's
worker refreshes a time stamp every ``heartbeat_interval`` seconds, and a trial whose stamp is
older than the grace period is *stale*: its worker was killed (SIGKILL, a lost machine, ...).
Whichever worker next looks marks it FAIL, and :func:`retry_stale_callback` queues a copy of it
(same parameters, state WAITING) that the next free worker runs. :func:`trials_still_needed`
counts a study's trials for ``--max-total-trials`` with that in mind.
"""

from __future__ import annotations

import inspect
import os
import random
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import gymnasium as gym
import optuna
from stable_baselines3.common.vec_env import VecEnv

from sb3_offtrc.common.evaluation import SafeEvalCallback, SafeEvalResult

#: user attributes written on every trial at every evaluation (the latest evaluation wins)
TRIAL_ATTRS = (
    "eval_return",
    "eval_cost_mean",
    "eval_cost_cvar",
    "eval_cost",
    "episode_cost_limit",
    "feasible",
    "constraint_metric",
    "cost_penalty",
    "eval_timesteps",
)

T = TypeVar("T")


@dataclass(frozen=True)
class ConstraintSpec:
    """How a trial's evaluation is scored.

    :param episode_cost_limit: ``D``, the limit on the undiscounted episode cost; ``None`` scores
        the return alone (every trial feasible)
    :param constraint_metric: ``"mean"`` (mean episode cost) or ``"cvar"`` (empirical CVaR of the
        episode costs at ``cvar_alpha``)
    :param cvar_alpha: tail fraction of the empirical CVaR
    :param cost_penalty: return units subtracted per unit of episode cost over the limit
    """

    episode_cost_limit: float | None
    constraint_metric: str = "mean"
    cvar_alpha: float = 1.0
    cost_penalty: float = 10.0

    def __post_init__(self) -> None:
        if self.constraint_metric not in ("mean", "cvar"):
            raise ValueError(f"constraint_metric must be 'mean' or 'cvar', got {self.constraint_metric!r}")
        if self.cost_penalty < 0:
            raise ValueError(f"cost_penalty must be >= 0, got {self.cost_penalty}")
        if self.episode_cost_limit is not None and self.episode_cost_limit < 0:
            raise ValueError(f"the episode cost limit must be >= 0, got {self.episode_cost_limit}")

    def cost_of(self, result: SafeEvalResult) -> float:
        return result.mean_cost if self.constraint_metric == "mean" else result.cost_cvar

    def is_feasible(self, cost: float) -> bool:
        return self.episode_cost_limit is None or cost <= self.episode_cost_limit

    def value(self, mean_return: float, cost: float) -> float:
        """The objective: the return, less ``cost_penalty`` per unit of cost over the limit."""
        if self.episode_cost_limit is None or cost <= self.episode_cost_limit:
            return float(mean_return)
        return float(mean_return - self.cost_penalty * (cost - self.episode_cost_limit))

    def trial_attrs(self, result: SafeEvalResult, timesteps: int) -> dict[str, Any]:
        cost = self.cost_of(result)
        return {
            "eval_return": result.mean_reward,
            "eval_cost_mean": result.mean_cost,
            "eval_cost_cvar": result.cost_cvar,
            "eval_cost": cost,
            "episode_cost_limit": self.episode_cost_limit,
            "feasible": self.is_feasible(cost),
            "constraint_metric": self.constraint_metric,
            "cost_penalty": self.cost_penalty,
            "eval_timesteps": int(timesteps),
        }


class SafeTrialEvalCallback(SafeEvalCallback):
    """Evaluate periodically, report the constrained value to Optuna and stop pruned trials.

    The cost-aware counterpart of rl-zoo3's ``TrialEvalCallback``: the intermediate value reported
    at evaluation ``k`` (step ``k`` of the trial) is :meth:`ConstraintSpec.value`, the same number
    the trial finally returns, so pruning compares like with like. ``best_model_save_path`` keeps
    the best feasible model of the trial (see :class:`SafeEvalCallback`).
    """

    def __init__(
        self,
        eval_env: gym.Env | VecEnv,
        trial: optuna.Trial,
        spec: ConstraintSpec,
        cost_key: str = "cost",
        n_eval_episodes: int = 5,
        eval_freq: int = 10000,
        deterministic: bool = True,
        verbose: int = 0,
        best_model_save_path: str | None = None,
        log_path: str | None = None,
    ) -> None:
        super().__init__(
            eval_env,
            cost_limit=spec.episode_cost_limit,
            constraint_metric=spec.constraint_metric,
            cvar_alpha=spec.cvar_alpha,
            cost_key=cost_key,
            n_eval_episodes=n_eval_episodes,
            eval_freq=eval_freq,
            log_path=log_path,
            best_model_save_path=best_model_save_path,
            deterministic=deterministic,
            verbose=verbose,
        )
        self.trial = trial
        self.spec = spec
        self.eval_idx = 0
        self.is_pruned = False
        self.last_value = float("nan")

    def record(self, result: SafeEvalResult) -> float:
        """Store ``result`` on the trial and return its constrained value."""
        self.last_value = self.spec.value(result.mean_reward, self.spec.cost_of(result))
        for key, item in self.spec.trial_attrs(result, self.num_timesteps).items():
            self.trial.set_user_attr(key, item)
        return self.last_value

    def _on_step(self) -> bool:
        if not (self.eval_freq > 0 and self.n_calls % self.eval_freq == 0):
            return True
        continue_training = super()._on_step()
        assert self.last_result is not None
        value = self.record(self.last_result)
        self.eval_idx += 1
        self.trial.report(value, self.eval_idx)
        if self.trial.should_prune():
            self.is_pruned = True
            return False
        return continue_training


# ------------------------------------------------------------------------------------- storage
def _retry(make: Callable[[], T], what: str, attempts: int = 8) -> T:
    """Run ``make`` again after a short random wait when another worker holds the database.

    Workers that start together race to create the SQLite schema and the study; SQLite answers
    the loser with "database is locked" or "table already exists" instead of waiting.
    """
    transient: tuple[type[BaseException], ...] = (
        optuna.exceptions.StorageInternalError,
        optuna.exceptions.DuplicatedStudyError,
    )
    try:
        from sqlalchemy.exc import SQLAlchemyError

        transient += (SQLAlchemyError,)
    except ImportError:  # no RDB support installed: nothing of it can fail either
        pass
    for attempt in range(attempts):
        try:
            return make()
        except transient as exc:
            if attempt == attempts - 1:
                raise RuntimeError(f"could not {what} after {attempts} attempts: {exc}") from exc
            time.sleep(0.2 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


def _journal_storage(path: str) -> optuna.storages.BaseStorage:
    try:  # optuna >= 4
        from optuna.storages.journal import JournalFileBackend

        backend: Any = JournalFileBackend(path)
    except ImportError:  # optuna 3.x
        backend = optuna.storages.JournalFileStorage(path)  # type: ignore[attr-defined]
    return optuna.storages.JournalStorage(backend)


def storage_url(storage: str) -> str:
    """Normalise a user's ``--storage``: a bare ``.db``/``.sqlite`` path becomes an SQLite URL."""
    if "://" in storage or storage.endswith(".log"):
        return storage
    return f"sqlite:///{os.path.abspath(storage)}"


def retry_stale_callback(max_retry: int) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """Optuna's callback that re-queues a stale trial (its parameters, state WAITING) up to ``max_retry`` times.

    The copy's ``system_attrs`` name the original (``failed_trial``) and every earlier attempt
    (``retry_history``).
    """
    # renamed in Optuna 4.9 (RetryFailedTrialCallback is kept as a deprecated alias)
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=max_retry)  # type: ignore[no-any-return]


def open_storage(
    storage: str,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int = 3,
) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``storage`` (see the module docstring for the accepted forms).

    RDB storages get a heartbeat every ``heartbeat_interval`` seconds (``None`` or 0: none), so
    the running trial of a worker that died is marked FAIL once its heartbeat is ``grace_period``
    seconds old (default: four intervals) and then run again by another worker, at most
    ``max_retry`` times (0: never). SQLite connections wait up to a minute for a lock.
    """
    url = storage_url(storage)
    if url.endswith(".log") and "://" not in url:
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
        return _journal_storage(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(url[len("sqlite:///") :]) or ".", exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval:
        if grace_period is not None and grace_period <= heartbeat_interval:
            # a live worker's trial would be failed between two of its heartbeats
            raise ValueError(
                f"the grace period ({grace_period} s) must exceed the heartbeat interval ({heartbeat_interval} s)"
            )
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period or 4 * heartbeat_interval}
        if max_retry > 0:
            # failed_trial_callback was renamed in Optuna 4.9
            parameters = inspect.signature(optuna.storages.RDBStorage).parameters
            name = (
                "heartbeat_stale_trial_callback"
                if "heartbeat_stale_trial_callback" in parameters
                else "failed_trial_callback"
            )
            heartbeat[name] = retry_stale_callback(max_retry)

    def make() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            # the heartbeat is flagged experimental, but it has been in Optuna since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)

    return _retry(make, f"open the Optuna storage {shown_url(url)!r}")


def shown_url(storage: str) -> str:
    """``storage`` as it may be printed: the password of a database URL replaced by ``***``."""
    if "://" not in storage:
        return storage
    try:
        from sqlalchemy.engine import make_url

        return str(make_url(storage).render_as_string(hide_password=True))
    except Exception:  # not a URL SQLAlchemy can parse: Optuna will say so when it opens it
        return storage


def heartbeat_settings(storage: optuna.storages.BaseStorage) -> tuple[int, int] | None:
    """``(heartbeat_interval, grace_period)`` of a storage made by :func:`open_storage`, ``None`` without a heartbeat.

    (Ask the storage itself, not ``study._storage``: Optuna wraps an RDB storage in a cache.)
    """
    if not isinstance(storage, optuna.storages.RDBStorage) or not storage.heartbeat_interval:
        return None
    interval = int(storage.heartbeat_interval)
    return interval, int(storage.grace_period or 2 * interval)  # Optuna's own default grace


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark the trials of dead workers FAIL now (and queue their retries), instead of at the next ask."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


#: trial states that count toward ``--max-total-trials``; a WAITING retry is not counted, it replaces a FAIL
COUNTED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)


def trials_still_needed(
    study: optuna.Study, max_trials: int, wait_seconds: float = 0.0, poll_seconds: float = 1.0
) -> bool:
    """Whether this worker should start another trial so that the study reaches ``max_trials``.

    Running trials count, or every worker would start one more than needed. But a running trial
    may belong to a worker that was killed, and with a heartbeat that only shows once the grace
    period has passed. So when the running trials are all that make up the count, wait up to
    ``wait_seconds`` (a grace period and a heartbeat: :func:`heartbeat_settings`) for them to
    finish or go stale: a stale one is marked FAIL and queued again (:func:`open_storage`), and
    this worker runs it.
    """
    deadline = time.monotonic() + wait_seconds
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    while True:
        fail_stale_trials(study)  # a no-op without a heartbeat
        trials = study.get_trials(deepcopy=False, states=COUNTED_STATES)
        done = sum(t.state in finished for t in trials)
        if done >= max_trials:
            return False
        if len(trials) < max_trials:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_seconds)


class TotalTrialsCallback:
    """Stop a worker's ``study.optimize`` once the study needs no more trials (:func:`trials_still_needed`)."""

    def __init__(self, max_trials: int, wait_seconds: float = 0.0, poll_seconds: float = 1.0) -> None:
        self.max_trials = max_trials
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not trials_still_needed(study, self.max_trials, self.wait_seconds, self.poll_seconds):
            study.stop()


def create_or_load_study(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    user_attrs: dict[str, Any] | None = None,
) -> optuna.Study:
    """Create the maximising study ``study_name`` in ``storage``, or join it if it exists.

    ``user_attrs`` describe the objective; they are written by whichever worker creates the study.
    """
    study = _retry(
        lambda: optuna.create_study(
            storage=storage,
            study_name=study_name,
            sampler=sampler,
            pruner=pruner,
            direction="maximize",
            load_if_exists=True,
        ),
        f"create or load the study {study_name!r}",
    )
    for key, item in (user_attrs or {}).items():
        if key not in study.user_attrs:
            study.set_user_attr(key, item)
    return study


def best_feasible_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete trial with the highest evaluation return among those within the limit."""
    feasible = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs.get("feasible")
    ]
    if not feasible:
        return None
    return max(feasible, key=lambda t: float(t.user_attrs.get("eval_return", float("-inf"))))


# --------------------------------------------------------------------- a trial, back into training
#: entries that rl-zoo3 evaluates as Python expressions when a hyperparameter file gives them as strings
EXPRESSION_KEYS = ("policy_kwargs", "replay_buffer_class", "replay_buffer_kwargs")
_NN_NAME = re.compile(r"^nn\.[A-Za-z_]\w*$")


def python_expression(value: Any) -> str:
    """``value`` (as stored in a trial's ``hyperparams``) as the Python expression rl-zoo3 evaluates.

    Dicts become ``dict(key=...)`` calls, and a ``"nn.ReLU"`` string the name ``nn.ReLU`` itself
    (rl-zoo3 evaluates with ``torch.nn`` in scope as ``nn``).
    """
    if isinstance(value, dict):
        if all(isinstance(key, str) and key.isidentifier() for key in value):
            return "dict(" + ", ".join(f"{key}={python_expression(item)}" for key, item in value.items()) + ")"
        return "{" + ", ".join(f"{key!r}: {python_expression(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(python_expression(item) for item in value) + "]"
    if isinstance(value, str) and _NN_NAME.match(value):
        return value
    return repr(value)


def hyperparams_entry(hyperparams: dict[str, Any]) -> dict[str, Any]:
    """A trial's ``hyperparams`` user attribute as hyperparameter-file values (YAML-ready).

    ``policy_kwargs`` and the other :data:`EXPRESSION_KEYS` become the expression strings that
    the shipped files use (``"dict(net_arch=[64, 64], activation_fn=nn.ReLU)"``); the rest stays
    as it is. Merge the result into the env's entry of a file given with ``--conf-file``.
    """
    return {
        key: python_expression(value) if key in EXPRESSION_KEYS and not isinstance(value, str) else value
        for key, value in hyperparams.items()
    }


def zoo_params(hyperparams: dict[str, Any]) -> list[str]:
    """A trial's ``hyperparams`` user attribute as ``zoo train -params`` arguments (one ``key:value`` each).

    rl-zoo3 evaluates every value as Python, so each is written as an expression.
    """
    return [f"{key}:{python_expression(value)}" for key, value in hyperparams.items()]


__all__ = [
    "COUNTED_STATES",
    "EXPRESSION_KEYS",
    "TRIAL_ATTRS",
    "ConstraintSpec",
    "SafeTrialEvalCallback",
    "TotalTrialsCallback",
    "best_feasible_trial",
    "create_or_load_study",
    "fail_stale_trials",
    "heartbeat_settings",
    "hyperparams_entry",
    "open_storage",
    "python_expression",
    "retry_stale_callback",
    "shown_url",
    "storage_url",
    "trials_still_needed",
    "zoo_params",
]
