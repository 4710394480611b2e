"""rl-zoo3's ``ExperimentManager`` taught about costs.

rl-zoo3 2.3.0 evaluates with SB3's ``EvalCallback`` and tunes on the evaluation return alone: its
objective never sees a cost. :class:`SafeExperimentManager` keeps everything else (argument
handling, env creation, wrappers, VecNormalize, schedules, saving) and replaces four methods:

- ``read_hyperparameters``: an env id missing from the file falls back to the file's ``default``
  entry (rl-zoo3 2.3.0 has no such fallback; our files define ``default`` as a YAML anchor that
  the per-env entries merge in with ``<<: *default``).
- ``create_callbacks``: training-time evaluation uses :class:`~sb3_offtrc.SafeEvalCallback`
  (episode costs in ``evaluations.npz`` and the logs; ``best_model.zip`` is the best *feasible*
  model, not the best return).
- ``objective``: the constrained value of :mod:`sb3_offtrc.zoo.objective`, with our samplers.
- ``hyperparameters_optimization``: the study lives in a storage that several workers share (an
  SQLite file by default) with a heartbeat, so a killed worker's trial is run again by another
  (:func:`~sb3_offtrc.zoo.objective.open_storage`), and the report names the best feasible trial.

The safe behaviour applies to ``offtrc``, ``sac_lag`` and ``ppo_lag``, and to any other algorithm
when an episode cost limit is given explicitly (e.g. ``--eval-cost-limit 2.5`` with ``--algo
sac`` to tune an unconstrained baseline under the same rule); otherwise rl-zoo3's methods run
unchanged.
"""

from __future__ import annotations

import importlib
import inspect
import os
import shlex
import socket
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from pprint import pprint
from typing import Any

import gymnasium as gym
import optuna
import yaml
from optuna.trial import TrialState
from rl_zoo3.callbacks import SaveVecNormalizeCallback
from rl_zoo3.exp_manager import ExperimentManager
from rl_zoo3.hyperparams_opt import HYPERPARAMS_SAMPLER
from rl_zoo3.utils import ALGOS, get_callback_list
from stable_baselines3 import HerReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback

from sb3_offtrc.common.evaluation import SafeEvalCallback, evaluate_safe_policy
from sb3_offtrc.zoo import ZOO_ALGOS
from sb3_offtrc.zoo.objective import (
    ConstraintSpec,
    SafeTrialEvalCallback,
    TotalTrialsCallback,
    best_feasible_trial,
    create_or_load_study,
    heartbeat_settings,
    hyperparams_entry,
    open_storage,
    shown_url,
    trials_still_needed,
    zoo_params,
)

#: the key of the fallback entry in a hyperparameter file
DEFAULT_ENTRY = "default"
#: the study's storage when --storage is not given, relative to the log folder
DEFAULT_STORAGE_FILE = "optuna.db"


def load_hyperparams_file(config: str) -> dict[str, Any]:
    """The entries of a hyperparameter file: YAML, a Python file or a module with ``hyperparams``."""
    if config.endswith((".yml", ".yaml")):
        with open(config) as handle:
            loaded = yaml.safe_load(handle)
    elif config.endswith(".py"):
        namespace: dict[str, Any] = {}
        exec(Path(config).read_text(), namespace)  # rl-zoo3's own convention for .py configs
        loaded = namespace["hyperparams"]
    else:
        loaded = importlib.import_module(config).hyperparams
    if not isinstance(loaded, dict):
        raise ValueError(f"{config}: expected a mapping of env id -> hyperparameters, got {type(loaded).__name__}")
    return loaded


def episode_horizon(env: gym.Env) -> int | None:
    """``max_episode_steps`` of the innermost time limit found by walking the wrappers."""
    found = None
    current: Any = env
    while current is not None:
        # rl-zoo3 swaps gymnasium's TimeLimit for a subclass, so look for the attribute, not the type
        steps = current.__dict__.get("_max_episode_steps")
        if steps is not None:
            found = int(steps)
        current = current.__dict__.get("env")
    return found


def _json_safe(value: Any) -> Any:
    """``value`` with everything a storage cannot hold as JSON (classes, functions) as its repr."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, type) and value.__module__.startswith("torch.nn"):
        return f"nn.{value.__name__}"  # as the hyperparameter files write it (rl-zoo3 has nn in scope)
    return getattr(value, "__name__", repr(value))


def algo_default(algo_class: type, name: str) -> Any:
    """Default value of constructor argument ``name`` (``None`` when it has none)."""
    parameter = inspect.signature(algo_class).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


class SafeExperimentManager(ExperimentManager):
    """rl-zoo3's experiment manager with cost-aware evaluation and tuning (see the module docstring).

    The class attributes are the settings of the constrained objective; the command line makes a
    subclass with the values of its flags (:func:`sb3_offtrc.zoo.cli.main`).
    """

    #: return units subtracted per unit of episode cost over the limit
    cost_penalty: float = 10.0
    #: "mean", "cvar", or "auto" (CVaR for algorithms with a ``cvar_alpha``, else the mean)
    constraint_metric: str = "auto"
    #: explicit episode cost limit ``D``; ``None`` derives ``d * T`` from the hyperparameters
    eval_cost_limit: float | None = None
    #: seconds between a running trial's heartbeats in an RDB storage (0: no heartbeat)
    heartbeat_interval: int = 60
    #: seconds without a heartbeat after which a trial counts as its worker's death (None: 4 intervals)
    heartbeat_grace: int | None = None
    #: how often a dead worker's trial is queued again (0: never)
    max_retry: int = 3

    _file_constraint: dict[str, Any]
    _spec: ConstraintSpec | None

    # ------------------------------------------------------------------------- hyperparameters
    def read_hyperparameters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        print(f"Loading hyperparameters from: {self.config}")
        entries = load_hyperparams_file(self.config)
        env_id = self.env_name.gym_id
        if env_id in entries:
            hyperparams = dict(entries[env_id])
        elif DEFAULT_ENTRY in entries:
            print(f"No entry for {env_id} in {self.config}: using its {DEFAULT_ENTRY!r} entry")
            hyperparams = dict(entries[DEFAULT_ENTRY])
        elif self._is_atari and "atari" in entries:
            hyperparams = dict(entries["atari"])
        else:
            raise ValueError(f"Hyperparameters not found for {self.algo}-{env_id} in {self.config} (and no 'default')")
        if self.custom_hyperparams is not None:
            hyperparams.update(self.custom_hyperparams)
        saved_hyperparams = OrderedDict([(key, hyperparams[key]) for key in sorted(hyperparams)])
        print("Default hyperparameters for environment (ones being tuned will be overridden):")
        pprint(saved_hyperparams)
        return hyperparams, saved_hyperparams

    def _preprocess_hyperparams(self, hyperparams: dict[str, Any]) -> Any:
        # read before rl-zoo3 turns values into objects; the constraint is fixed by the file
        self._file_constraint = {k: hyperparams.get(k) for k in ("cost_limit", "cvar_alpha", "cost_key")}
        self._spec = None
        with warnings.catch_warnings():
            # rl-zoo3 2.3.0 builds constant schedules with constant_fn, which SB3 2.9 flags as deprecated
            warnings.filterwarnings("ignore", message=r"constant_fn\(\) is deprecated")
            return super()._preprocess_hyperparams(hyperparams)

    # ------------------------------------------------------------------------------ constraint
    @property
    def is_safe(self) -> bool:
        """Whether evaluation and tuning go through the constrained machinery."""
        return self.algo in ZOO_ALGOS or self.eval_cost_limit is not None

    def _constraint_value(self, name: str) -> Any:
        value = getattr(self, "_file_constraint", {}).get(name)
        return value if value is not None else algo_default(ALGOS[self.algo], name)

    @property
    def cost_key(self) -> str:
        return str(self._constraint_value("cost_key") or "cost")

    def constraint_spec(self) -> ConstraintSpec:
        """The episode cost limit and scoring rule of this experiment (computed once)."""
        if getattr(self, "_spec", None) is not None:
            assert self._spec is not None
            return self._spec
        cvar_alpha = self._constraint_value("cvar_alpha")
        metric = self.constraint_metric
        if metric == "auto":
            metric = "cvar" if cvar_alpha is not None else "mean"
        limit = self.eval_cost_limit
        if limit is None:
            d = self._constraint_value("cost_limit")
            env = gym.make(self.env_name.gym_id, **self.eval_env_kwargs)
            horizon = episode_horizon(env)
            env.close()
            if d is None or horizon is None:
                raise ValueError(
                    f"Cannot derive the episode cost limit for {self.env_name.gym_id}: "
                    f"cost_limit={d}, episode length={horizon}. Pass --eval-cost-limit D (episode cost)."
                )
            limit = float(d) * horizon
        self._spec = ConstraintSpec(
            episode_cost_limit=limit,
            constraint_metric=metric,
            cvar_alpha=float(cvar_alpha) if cvar_alpha is not None else 1.0,
            cost_penalty=self.cost_penalty,
        )
        return self._spec

    # ------------------------------------------------------------------------------- training
    def create_callbacks(self) -> None:
        if not self.is_safe:
            super().create_callbacks()
            return
        evaluate = self.eval_freq > 0 and not self.optimize_hyperparameters
        eval_freq = self.eval_freq
        self.eval_freq = -1  # rl-zoo3 builds everything but its return-only EvalCallback
        super().create_callbacks()
        self.eval_freq = eval_freq
        if not evaluate:
            return
        self.eval_freq = max(self.eval_freq // self.n_envs, 1)  # EvalCallback counts env.step calls
        spec = self.constraint_spec()
        if self.verbose > 0:
            print(
                f"Creating test environment (episode cost limit {spec.episode_cost_limit:g}, {spec.constraint_metric})"
            )
        self.callbacks.append(
            SafeEvalCallback(
                self.create_envs(self.n_eval_envs, eval_env=True),
                cost_limit=spec.episode_cost_limit,
                constraint_metric=spec.constraint_metric,
                cvar_alpha=spec.cvar_alpha,
                cost_key=self.cost_key,
                callback_on_new_best=SaveVecNormalizeCallback(save_freq=1, save_path=self.params_path),
                n_eval_episodes=self.n_eval_episodes,
                eval_freq=self.eval_freq,
                log_path=self.save_path,
                best_model_save_path=self.save_path,
                deterministic=self.deterministic_eval,
            )
        )

    # ------------------------------------------------------------------------------- tuning
    def objective(self, trial: optuna.Trial) -> float:
        if not self.is_safe:
            return float(super().objective(trial))
        spec = self.constraint_spec()
        kwargs = self._hyperparams.copy()
        additional_args = {
            "using_her_replay_buffer": kwargs.get("replay_buffer_class") == HerReplayBuffer,
            "her_kwargs": kwargs.get("replay_buffer_kwargs", {}),
            "hyperparams": self._hyperparams,
        }
        sampled = HYPERPARAMS_SAMPLER[self.algo](trial, self.n_actions, self.n_envs, additional_args)
        kwargs.update(sampled)
        # what to paste into a hyperparameter file (params hold the raw choices, e.g. n_batch_factor)
        trial.set_user_attr("hyperparams", _json_safe(sampled))
        # which machine and process ran it (a retried trial names the worker of its last attempt)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")

        env = self.create_envs(self.n_envs, no_log=True)
        model = ALGOS[self.algo](
            env=env,
            tensorboard_log=None,
            seed=None,  # as in rl-zoo3: trials are not seeded
            verbose=self.verbose if self.verbose >= 2 else 0,
            device=self.device,
            **kwargs,
        )
        eval_env = self.create_envs(n_envs=self.n_eval_envs, eval_env=True)
        n_evaluations = max(int(self.n_evaluations or 1), 1)
        eval_freq = max(int(self.n_timesteps / n_evaluations) // self.n_envs, 1)
        path = None
        if self.optimization_log_path is not None:
            path = os.path.join(self.optimization_log_path, f"trial_{trial.number!s}")
        eval_callback = SafeTrialEvalCallback(
            eval_env,
            trial,
            spec,
            cost_key=self.cost_key,
            n_eval_episodes=self.n_eval_episodes,
            eval_freq=eval_freq,
            deterministic=self.deterministic_eval,
            best_model_save_path=path,
            log_path=path,
        )
        callbacks: list[BaseCallback] = [*get_callback_list({"callback": self.specified_callbacks}), eval_callback]
        try:
            model.learn(self.n_timesteps, callback=callbacks)
            if eval_callback.last_result is None:  # stopped before the first evaluation
                eval_callback.record(
                    evaluate_safe_policy(
                        model,
                        eval_env,
                        n_eval_episodes=self.n_eval_episodes,
                        deterministic=self.deterministic_eval,
                        cvar_alpha=spec.cvar_alpha,
                        cost_key=self.cost_key,
                        cost_limit=spec.episode_cost_limit,
                    )
                )
        except (AssertionError, ValueError) as exc:
            # as rl-zoo3 does: hyperparameters that make the run fail (NaNs, ...) are pruned
            print(f"Trial {trial.number} failed: {exc}\nSampled hyperparameters:")
            pprint(sampled)
            trial.set_user_attr("error", str(exc))
            raise optuna.exceptions.TrialPruned() from exc
        finally:
            env.close()
            eval_env.close()
        if eval_callback.is_pruned:
            raise optuna.exceptions.TrialPruned()
        return eval_callback.last_value

    def default_storage(self) -> str:
        return os.path.join(self.log_folder, DEFAULT_STORAGE_FILE)

    def default_study_name(self) -> str:
        return f"{self.algo}-{self.env_name}"

    def hyperparameters_optimization(self) -> None:
        storage_arg = self.storage or self.default_storage()
        study_name = self.study_name or self.default_study_name()
        if self.verbose > 0:
            print(f"Optimizing hyperparameters: study {study_name!r} in {shown_url(storage_arg)}")
        if self.tensorboard_log is not None:
            print("TensorBoard logging is off while optimizing hyperparameters")
            self.tensorboard_log = None
        user_attrs: dict[str, Any] = {"algo": self.algo, "env": self.env_name.gym_id}
        if self.is_safe:
            spec = self.constraint_spec()
            user_attrs.update(
                objective="eval return if eval episode cost <= limit, else return - cost_penalty * (cost - limit)",
                episode_cost_limit=spec.episode_cost_limit,
                constraint_metric=spec.constraint_metric,
                cvar_alpha=spec.cvar_alpha,
                cost_penalty=spec.cost_penalty,
            )
        storage = open_storage(
            storage_arg,
            heartbeat_interval=self.heartbeat_interval or None,
            grace_period=self.heartbeat_grace,
            max_retry=self.max_retry,
        )
        study = create_or_load_study(
            storage,
            study_name,
            sampler=self._create_sampler(self.sampler),
            pruner=self._create_pruner(self.pruner),
            user_attrs=user_attrs,
        )
        if self.verbose > 0:
            print(f"Sampler: {self.sampler} - Pruner: {self.pruner}")
        try:
            if self.max_total_trials is not None:
                # running trials count too, but those of dead workers are failed and retried first
                heartbeat = heartbeat_settings(storage)
                wait = float(sum(heartbeat)) if heartbeat else 0.0
                if trials_still_needed(study, self.max_total_trials, wait):
                    study.optimize(
                        self.objective,
                        n_jobs=self.n_jobs,
                        callbacks=[TotalTrialsCallback(self.max_total_trials, wait)],
                    )
            else:
                study.optimize(self.objective, n_jobs=self.n_jobs, n_trials=self.n_trials)
        except KeyboardInterrupt:
            pass
        self.report(study)

    def report(self, study: optuna.Study) -> str | None:
        """Print the best trials and write the study's trials to a CSV file; return its path."""
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        print(f"Number of finished trials: {len(study.trials)} ({len(complete)} complete)")
        if not complete:
            return None
        best = study.best_trial
        print(f"Best value: {best.value} (trial {best.number})")
        for key, value in best.params.items():
            print(f"    {key}: {value}")
        chosen = best
        if self.is_safe:
            feasible = best_feasible_trial(study)
            if feasible is None:
                print("No complete trial met the cost limit.")
            else:
                attrs = feasible.user_attrs
                print(
                    f"Best feasible trial: {feasible.number} (return {attrs.get('eval_return')}, "
                    f"episode cost {attrs.get('eval_cost')} <= {attrs.get('episode_cost_limit')})"
                )
                chosen = feasible
        hyperparams = chosen.user_attrs.get("hyperparams")  # written by our objective only
        if hyperparams is not None:
            print(f"Trial {chosen.number} as hyperparameter-file values (merge them into the env's entry):")
            for key, value in hyperparams_entry(hyperparams).items():
                print(f"    {key}: {value!r}" if isinstance(value, str) else f"    {key}: {value}")
            print("Or for zoo train: -params " + " ".join(shlex.quote(token) for token in zoo_params(hyperparams)))
        name = f"report_{self.env_name}_{study.study_name}_{int(time.time())}.csv".replace("/", "-")
        path = os.path.join(self.log_folder, self.algo, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        study.trials_dataframe().to_csv(path)
        if self.verbose > 0:
            print(f"Writing report to {path}")
        return path


__all__ = ["DEFAULT_ENTRY", "DEFAULT_STORAGE_FILE", "SafeExperimentManager", "episode_horizon", "load_hyperparams_file"]
