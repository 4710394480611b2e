"""``python -m sb3_offtrc`` / ``sb3-offtrc``: train, eval, record and plot constrained agents.

Run layout written by ``train --out DIR``::

    DIR/model.zip               final model (also written when SIGINT/SIGTERM stops training)
    DIR/config.json             algo, env id, cost, cost limit, hyperparameters, seed, and one
                                record per invocation under "segments" (``--resume`` into DIR
                                continues the run there, appending to its monitor files)
    DIR/monitor/<rank>.monitor.csv, <rank>.costs.csv   SB3 Monitor + CostMonitor files
    DIR/tb/                     TensorBoard log (unless --tensorboard-log says otherwise)
    DIR/checkpoints/            with --checkpoint-freq
    DIR/curves.png              return and cost per episode vs env steps

The cost-limit line in plots is *episode-level*: ``d * T`` with ``d`` the per-step limit
(``cost_limit`` of OffTRC and the Lagrangian baselines) and ``T`` the median episode length found
in the monitor files. It matches the undiscounted episode cost the curves show; the algorithms
themselves constrain the discounted cost return against ``d / (1 - gamma)``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gymnasium as gym
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import VecEnv

#: algo name -> (module, class name, takes cost_limit / cost_key)
ALGOS: dict[str, tuple[str, str, bool]] = {
    "offtrc": ("sb3_offtrc", "OffTRC", True),
    "sac": ("stable_baselines3", "SAC", False),
    "ppo": ("stable_baselines3", "PPO", False),
    "sac_lag": ("sb3_offtrc", "SACLagrangian", True),
    "ppo_lag": ("sb3_offtrc", "PPOLagrangian", True),
}
OFF_POLICY = ("offtrc", "sac", "sac_lag")
#: sb3_offtrc.offtrc.presets.PRESETS's names, spelled out so that `--help` needs no torch import
PRESET_NAMES = ("cpu", "paper", "recommended")
#: sb3_offtrc.envs.safety.OBSERVATION_CHOICES, spelled out for the same reason
OBSERVATION_CHOICES = ("native", "paper", "lidar_max")
CONFIG_FILE = "config.json"


class CliError(SystemExit):
    """A usage error: :func:`main` prints it as one ``error:`` line on stderr and returns 2 (no traceback).

    A ``SystemExit`` so that code calling the helpers below outside ``main`` still stops with the message.
    """


def algo_class(name: str) -> type[BaseAlgorithm]:
    """Import an algorithm class lazily (OffTRC and the baselines may not be installed/written)."""
    import importlib

    if name not in ALGOS:
        raise CliError(f"unknown --algo {name!r}; choose from {', '.join(ALGOS)}")
    module, cls, _ = ALGOS[name]
    try:
        return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise CliError(f"--algo {name}: cannot import {module}.{cls} ({exc})") from exc


def parse_hyperparams(items: Sequence[str], flag: str = "--hyperparams") -> dict[str, Any]:
    """``["gamma=0.98", "policy_kwargs={'net_arch': [64, 64]}", "device=cpu"]`` -> dict.

    Values are Python literals when they parse as one, strings otherwise. ``flag`` names the option
    in the error message.
    """
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"{flag} expects KEY=VALUE items, got {item!r}")
        try:
            params[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            params[key.strip()] = raw
    return params


def make_env_fn(
    env_id: str,
    rank: int,
    monitor_dir: str | None,
    render_mode: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> Callable[[], gym.Env]:
    """Factory of one env copy: ``CostMonitor(Monitor(gym.make(env_id, **env_kwargs)))`` logging to ``monitor_dir``."""

    def _init() -> gym.Env:
        import gymnasium as gym
        from stable_baselines3.common.monitor import Monitor

        import sb3_offtrc.envs  # noqa: F401  (registers ids in subprocess workers too)
        from sb3_offtrc.common.monitor import CostMonitor

        kwargs = dict(env_kwargs or {})
        if render_mode:
            kwargs["render_mode"] = render_mode
        env = gym.make(env_id, **kwargs)
        path = None if monitor_dir is None else os.path.join(monitor_dir, str(rank))
        env = Monitor(env, filename=path)
        return CostMonitor(env, filename=path)

    return _init


def make_train_env(
    env_id: str,
    n_envs: int,
    seed: int | None,
    monitor_dir: str | None,
    subproc: bool = False,
    env_kwargs: dict[str, Any] | None = None,
    append: bool = False,
) -> VecEnv:
    """The training envs; ``append`` continues the monitor files of a resumed run instead of rewriting them."""
    from stable_baselines3.common.vec_env import SubprocVecEnv

    from sb3_offtrc.common.monitor import make_cost_vec_env

    vec_env_cls = SubprocVecEnv if subproc and n_envs > 1 else None
    # Worker processes inherit ignored signals: a Ctrl-C (which the terminal sends to the whole
    # process group) then stops only this process, which saves the run and closes the workers.
    with _stop_signals_ignored() if vec_env_cls is not None else contextlib.nullcontext():
        return make_cost_vec_env(
            env_id,
            n_envs=n_envs,
            seed=seed,
            monitor_dir=monitor_dir,
            vec_env_cls=vec_env_cls,
            env_kwargs=env_kwargs,
            override_existing=not append,
        )


# ---------------------------------------------------------------------------------------- signals

#: exit status after a signal stopped training: 128 + the signal's number, as shells report it
STOP_SIGNALS: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _in_main_thread() -> bool:
    # signal.signal() works in the main thread only (main() may be called from another one)
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored for the duration (for starting worker processes), then restored."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class GracefulStop:
    """While active, SIGINT and SIGTERM ask training to stop instead of killing the process.

    The handler only records the signal; :meth:`callback` returns an SB3 callback whose ``_on_step``
    returns ``False`` once one arrived, which ends ``learn()`` right after the env step in progress
    (and after an update in progress), so the caller can save the model and close the monitor files.
    A second signal restores the previous handlers and re-sends itself: the process then stops at
    once, as it would without this class. Leaving the ``with`` block restores the previous handlers.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if _in_main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now, without saving
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        message = (
            f"\n{signal.Signals(signum).name}: stopping after the current env step to save the run "
            "(send it again to stop at once, without saving)\n"
        )
        try:  # os.write, not print(): the handler may run in the middle of a print
            os.write(sys.stderr.fileno(), message.encode())
        except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor (captured)
            sys.stderr.write(message)

    def callback(self) -> BaseCallback:
        from stable_baselines3.common.callbacks import BaseCallback

        stop = self

        class StopOnSignal(BaseCallback):
            def _on_step(self) -> bool:
                return stop.signum is None

        return StopOnSignal()


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy for config.json: plain literals as they are, anything else as its repr."""
    out = {}
    for key, value in params.items():
        try:
            json.dumps(value)
            out[key] = value
        except TypeError:
            out[key] = repr(value)
    return out


def _env_kwargs(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """``--env-kwargs`` when given, else the ones the run was trained with."""
    if args.env_kwargs is not None:
        return parse_hyperparams(args.env_kwargs, "--env-kwargs")
    return dict(config.get("env_kwargs") or {})


def _with_observation(env_kwargs: dict[str, Any], observation: str, env_id: str) -> dict[str, Any]:
    """``--observation`` as the env keyword it stands for (saved in config.json with the others).

    ``native`` is every env's own observation: it adds nothing (other envs take no such keyword).
    """
    given = env_kwargs.get("observation", observation)
    if given != observation:
        raise CliError(
            f"--observation {observation} and --env-kwargs observation={given} disagree: give the observation once"
        )
    if observation == "native":
        return env_kwargs
    if "Safety" not in env_id:
        raise CliError(
            f"--observation {observation} is defined for the Safety-Gymnasium tasks only, not {env_id}; leave it out"
        )
    if observation == "paper" and "Goal" not in env_id:
        raise CliError(
            f"--observation paper is the authors' layout of the Goal tasks, not of {env_id}; "
            "use --observation lidar_max or leave it out"
        )
    return {**env_kwargs, "observation": observation}


def episode_horizon(env: gym.Env) -> int | None:
    """``max_episode_steps`` of the innermost TimeLimit, if any."""
    from gymnasium.wrappers import TimeLimit

    current: Any = env
    found = None
    while current is not None:
        if isinstance(current, TimeLimit):
            found = current._max_episode_steps
        current = getattr(current, "env", None)
    return found


def _load_config(path: str) -> dict[str, Any]:
    """config.json of a run directory, or of the run that holds a model file."""
    for folder in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        candidate = os.path.join(folder, CONFIG_FILE)
        if folder and os.path.isfile(candidate):
            with open(candidate) as handle:
                return json.load(handle)  # type: ignore[no-any-return]
    return {}


def _model_path(path: str, flag: str = "model") -> str:
    """A model file, or ``model.zip`` of a run directory (pass ``best_model/best_model.zip`` explicitly)."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "model.zip")
        if not os.path.isfile(candidate):
            raise CliError(f"{flag} {path}: no model.zip in that directory")
        return candidate
    if not os.path.isfile(path):
        # SB3's load() would append ".zip" and report the wrong name
        raise CliError(f"{flag} {path}: no such model file or run directory")
    return path


def _load_algo(cls: type[BaseAlgorithm], path: str, flag: str, **kwargs: Any) -> BaseAlgorithm:
    """``cls.load(path, **kwargs)``, with a truncated, corrupt or foreign file reported as a CliError naming it."""
    import pickle
    import zipfile

    try:
        return cls.load(path, **kwargs)
    except (zipfile.BadZipFile, EOFError, KeyError, AssertionError, pickle.UnpicklingError, RuntimeError) as exc:
        raise CliError(
            f"{flag} {path}: cannot load it as a {cls.__name__} model ({exc or type(exc).__name__})"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise CliError(f"{flag} {path}: {exc}") from exc


def _check_counts(args: argparse.Namespace, positive: Sequence[str], non_negative: Sequence[str] = ()) -> None:
    """Integer options that must be >= 1 (``positive``) or >= 0, named by their flag on error."""
    for names, minimum in ((positive, 1), (non_negative, 0)):
        for name in names:
            value = getattr(args, name)
            if value < minimum:
                flag = "--" + name.replace("_", "-")
                what = "a positive" if minimum == 1 else "a non-negative (0: off)"
                raise CliError(f"{flag} must be {what} number, got {value}")


def _make_dir(path: str, flag: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CliError(f"{flag} {path}: cannot create the directory ({exc.strerror or exc})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {path}: the directory is not writable")


REPLAY_BUFFER_FILE = "replay_buffer.npz"


def _replay_buffer_for(model_path: str) -> str | None:
    """The ``.npz`` replay buffer saved with a model (``replay_buffer.npz``, or a checkpoint's own)."""
    folder, name = os.path.split(model_path)
    stem = name[:-4] if name.endswith(".zip") else name
    candidates = [os.path.join(folder, REPLAY_BUFFER_FILE)]
    if stem.startswith("rl_model_") and stem.endswith("_steps"):
        candidates.insert(0, os.path.join(folder, stem.replace("rl_model_", "rl_model_replay_buffer_") + ".npz"))
    return next((c for c in candidates if os.path.isfile(c)), None)


def _resume_replay_buffer(model: BaseAlgorithm, args: argparse.Namespace, resume: str) -> None:
    """Load the replay buffer for ``--resume`` only when ``--resume-replay-buffer`` asks for it, and
    only from an ``.npz`` file (a pickle could run code)."""
    from sb3_offtrc.common.replay_buffer_io import load_replay_buffer_npz

    found = _replay_buffer_for(resume)
    if args.resume_replay_buffer is None:
        if found is not None:
            print(f"not loading the replay buffer {found} (pass --resume-replay-buffer to continue with it)")
        return
    path = found if args.resume_replay_buffer == "auto" else args.resume_replay_buffer
    if path is None:
        raise CliError(f"--resume-replay-buffer: no {REPLAY_BUFFER_FILE} next to {resume}; give its path")
    if not path.endswith(".npz"):
        raise CliError(
            f"--resume-replay-buffer {path}: only .npz replay buffers (saved by --save-replay-buffer) are read; "
            "the CLI never unpickles a file. Load a trusted SB3 pickle in Python with model.load_replay_buffer()"
        )
    replay_buffer = getattr(model, "replay_buffer", None)
    if replay_buffer is None:
        raise CliError(f"--resume-replay-buffer: --algo {args.algo} has no replay buffer")
    try:
        load_replay_buffer_npz(replay_buffer, path)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(f"--resume-replay-buffer: {exc}") from exc
    print(f"resumed replay buffer from {path}")


def _checkpoint_callback(save_freq: int, save_path: str, save_replay_buffer: bool) -> BaseCallback:
    """SB3's CheckpointCallback, with the replay buffer saved as ``.npz`` (not pickled) next to each model."""
    from stable_baselines3.common.callbacks import CheckpointCallback

    from sb3_offtrc.common.replay_buffer_io import save_replay_buffer_npz

    class NpzCheckpointCallback(CheckpointCallback):
        def _on_step(self) -> bool:
            result = super()._on_step()
            buffer = getattr(self.model, "replay_buffer", None)
            if save_replay_buffer and buffer is not None and self.n_calls % self.save_freq == 0:
                path = save_replay_buffer_npz(buffer, self._checkpoint_path("replay_buffer_", extension="npz"))
                if self.verbose >= 2:
                    print(f"Saving model replay buffer checkpoint to {path}")
            return result

    return NpzCheckpointCallback(save_freq=save_freq, save_path=save_path, save_replay_buffer=False)


# ---------------------------------------------------------------------------------------- train


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _run_to_continue(args: argparse.Namespace, resume: str | None, env_id: str) -> dict[str, Any] | None:
    """The config.json of the run that ``--resume`` continues in place (``--out`` holds it), else None.

    Resuming a run into its own directory appends to its monitor files and run record; a model from
    elsewhere would mix two runs' episode logs there, and another algorithm or env would mix runs too.
    """
    path = os.path.join(args.out, CONFIG_FILE)
    if resume is None or not os.path.isfile(path):
        return None
    if not _inside(resume, args.out):
        raise CliError(
            f"--out {args.out} holds another run (its {CONFIG_FILE}); continuing {resume} there would mix the two "
            f"runs' episode logs. Pass a new --out, or --resume that run's own model "
            f"({os.path.join(args.out, 'model.zip')} or one of its checkpoints)"
        )
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CliError(f"--out {args.out}: cannot read its {CONFIG_FILE} to continue the run ({exc})") from exc
    if not isinstance(config, dict):
        raise CliError(f"--out {args.out}: {path} is not a run configuration")
    for key, flag, value in (("algo", "--algo", args.algo), ("env_id", "--env / --cost", env_id)):
        if config.get(key) is not None and config[key] != value:
            raise CliError(
                f"--resume into {args.out}: that run was trained with {key} {config[key]!r}, this one would use "
                f"{value!r}; pass the same {flag}, or a new --out"
            )
    return config


def _check_resume_point(config: dict[str, Any], model: BaseAlgorithm, out: str) -> None:
    """Refuse to continue a run in place from a step before the one its files already reach."""
    segments = config.get("segments") or []
    reached = segments[-1].get("end_timesteps") if segments and isinstance(segments[-1], dict) else None
    if isinstance(reached, int) and model.num_timesteps < reached:
        raise CliError(
            f"--resume: the run in {out} already went on to step {reached}; continuing it there from step "
            f"{model.num_timesteps} would log steps {model.num_timesteps}..{reached} twice. Resume into a new --out, "
            f"or from {os.path.join(out, 'model.zip')}"
        )


def _write_config(out: str, config: dict[str, Any]) -> None:
    path = os.path.join(out, CONFIG_FILE)
    tmp = f"{path}.tmp"  # written whole, then renamed: a signal or a full disk leaves the old file
    with open(tmp, "w") as handle:
        json.dump(config, handle, indent=2)
    os.replace(tmp, path)


def _resume_command(args: argparse.Namespace, model_path: str, remaining: int) -> str:
    """The command line that continues this run in place for ``remaining`` more steps."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_train_arguments(parser)
    words = ["python", "-m", "sb3_offtrc", "train"]
    replaced = {"resume": model_path, "timesteps": remaining, "resume_replay_buffer": None}
    for action in parser._actions:  # every train flag, with this run's values
        if not action.option_strings or action.dest in replaced:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    words += ["--resume", model_path, "--timesteps", str(remaining)]
    if args.save_replay_buffer and args.algo in OFF_POLICY:
        words.append("--resume-replay-buffer")
    return shlex.join(words)


def _continue_evaluations(callback: Any, path: str, n_episodes: int) -> None:
    """Let a resumed run's SafeEvalCallback extend the evaluations.npz of the run it continues."""
    if not os.path.isfile(path):
        return
    try:
        restored = callback.restore_history(path)
    except ValueError as exc:
        raise CliError(f"--eval-freq: cannot continue the evaluations in {path} ({exc})") from exc
    if restored and n_episodes != len(callback.evaluations_results[-1]):
        raise CliError(
            f"--eval-episodes {n_episodes}: the run's {path} holds {len(callback.evaluations_results[-1])} episodes "
            "per evaluation; pass that number to continue it"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from stable_baselines3.common.callbacks import CallbackList

    from sb3_offtrc.common.monitor import CostLoggerCallback
    from sb3_offtrc.envs import resolve_env_id

    _check_counts(args, ("timesteps", "n_envs", "eval_episodes"), ("checkpoint_freq", "eval_freq"))
    try:
        env_id = resolve_env_id(args.env, args.cost)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    cls = algo_class(args.algo)
    constrained = ALGOS[args.algo][2]
    hyperparams = parse_hyperparams(args.hyperparams or [])
    env_kwargs = parse_hyperparams(args.env_kwargs or [], "--env-kwargs")
    if args.observation is not None:
        env_kwargs = _with_observation(env_kwargs, args.observation, env_id)
    if args.preset is not None:
        if args.algo != "offtrc":
            print("--preset applies to --algo offtrc only", file=sys.stderr)
            return 2
        from sb3_offtrc import get_preset

        hyperparams = {**get_preset(args.preset), **hyperparams}  # explicit overrides win
    resume = _model_path(args.resume, "--resume") if args.resume else None
    out = args.out
    _make_dir(out, "--out")
    previous = _run_to_continue(args, resume, env_id)
    tb_log = args.tensorboard_log if args.tensorboard_log is not None else os.path.join(out, "tb")
    monitor_dir = os.path.join(out, "monitor")
    try:
        venv = make_train_env(
            env_id,
            args.n_envs,
            args.seed,
            monitor_dir,
            subproc=args.subproc,
            env_kwargs=env_kwargs,
            append=previous is not None,
        )
    except ImportError as exc:  # e.g. a Safety-Gymnasium task without the safety stack installed
        print(f"error: cannot build {args.env}: {exc}", file=sys.stderr)
        return 2
    except TypeError as exc:  # an argument gym.make / the env's constructor does not take
        raise CliError(f"--env-kwargs: {env_id} does not accept {env_kwargs} ({exc})") from exc
    if constrained:
        if args.cost_limit is not None:
            hyperparams.setdefault("cost_limit", args.cost_limit)
        hyperparams.setdefault("cost_key", args.cost_key)
    try:
        if resume:
            model = _load_algo(cls, resume, "--resume", env=venv, tensorboard_log=tb_log, **hyperparams)
            if previous is not None:
                _check_resume_point(previous, model, out)
            _resume_replay_buffer(model, args, resume)
        else:
            try:
                model = cls(
                    "MlpPolicy", venv, seed=args.seed, tensorboard_log=tb_log, verbose=args.verbose, **hyperparams
                )
            except (TypeError, ValueError) as exc:
                raise CliError(f"--hyperparams (or --cost-limit / --preset): {cls.__name__}: {exc}") from exc
    except BaseException:
        venv.close()
        raise
    cost_limit = getattr(model, "cost_limit", args.cost_limit)
    start = model.num_timesteps if resume else 0
    target = start + args.timesteps  # learn(reset_num_timesteps=False) adds the loaded count
    # One record per invocation: a resumed run keeps the first one's configuration and appends its own.
    segment: dict[str, Any] = {
        "resumed_from": args.resume,
        "resume_replay_buffer": args.resume_replay_buffer,
        "start_timesteps": start,
        "timesteps": args.timesteps,
        "end_timesteps": None,
        "status": "running",
        "seed": args.seed,
        "n_envs": args.n_envs,
        "hyperparams": _jsonable(hyperparams),
    }
    if previous is not None:
        config = previous
        config["timesteps"] = target  # the run's budget, as an uninterrupted run would have asked for it
        config["segments"] = [*(config.get("segments") or []), segment]
    else:
        config = {
            "algo": args.algo,
            "env": args.env,
            "env_id": env_id,
            "env_kwargs": _jsonable(env_kwargs),
            "cost": args.cost,
            "cost_key": args.cost_key,
            "cost_limit": cost_limit,
            "gamma": getattr(model, "gamma", None),
            "seed": args.seed,
            "n_envs": args.n_envs,
            "timesteps": args.timesteps,
            "hyperparams": {
                k: repr(v) if not isinstance(v, int | float | str | bool) else v for k, v in hyperparams.items()
            },
            "resumed_from": args.resume,
            "segments": [segment],
        }
    _write_config(out, config)
    callbacks: list[Any] = [CostLoggerCallback()]
    if args.checkpoint_freq:
        callbacks.append(
            _checkpoint_callback(
                save_freq=max(args.checkpoint_freq // args.n_envs, 1),
                save_path=os.path.join(out, "checkpoints"),
                save_replay_buffer=args.save_replay_buffer and args.algo in OFF_POLICY,
            )
        )
    if args.eval_freq:
        from sb3_offtrc.common.evaluation import SafeEvalCallback

        eval_env = make_env_fn(env_id, 0, None, env_kwargs=env_kwargs)()
        horizon = episode_horizon(eval_env)
        episode_limit = cost_limit * horizon if cost_limit is not None and horizon else None
        evaluation = SafeEvalCallback(
            eval_env,
            cost_limit=episode_limit,
            cost_key=args.cost_key,
            n_eval_episodes=args.eval_episodes,
            eval_freq=max(args.eval_freq // args.n_envs, 1),
            log_path=os.path.join(out, "eval"),
            best_model_save_path=os.path.join(out, "best_model"),
            verbose=args.verbose,
        )
        if previous is not None:
            _continue_evaluations(evaluation, os.path.join(out, "eval", "evaluations.npz"), args.eval_episodes)
        callbacks.append(evaluation)
    for callback in callbacks:
        # count env steps from the run's start, so that checkpoints and evaluations of a resumed run
        # fall on the same steps as in an uninterrupted one (they fire when n_calls % freq == 0)
        callback.n_calls = start // args.n_envs
    model_path = os.path.join(out, "model.zip")
    buffer_path = None
    with GracefulStop() as stop:  # kept until the files are written: a first signal then waits for them
        model.learn(
            total_timesteps=args.timesteps,
            callback=CallbackList([*callbacks, stop.callback()]),
            progress_bar=args.progress_bar,
            reset_num_timesteps=not args.resume,
            tb_log_name=args.algo,
        )
        model.save(model_path)
        replay_buffer = getattr(model, "replay_buffer", None)
        if args.save_replay_buffer and replay_buffer is not None:
            from sb3_offtrc.common.replay_buffer_io import save_replay_buffer_npz

            buffer_path = save_replay_buffer_npz(replay_buffer, os.path.join(out, REPLAY_BUFFER_FILE))
        interrupted = stop.signum is not None and model.num_timesteps < target
        segment["end_timesteps"] = model.num_timesteps
        segment["status"] = "interrupted" if interrupted else "completed"
        if stop.signum is not None:
            segment["signal"] = stop.name
        _write_config(out, config)
        venv.close()  # closes (and so flushes) the monitor files
    png = os.path.join(out, "curves.png")
    try:
        plot_runs([out], png, cost_limit=cost_limit)
    except (FileNotFoundError, ValueError) as exc:  # e.g. no episode finished yet
        png = f"(no plot: {exc})"
    tb_dir = getattr(model.logger, "dir", None) or tb_log
    if interrupted:
        print(f"{stop.name}: training stopped at step {model.num_timesteps} of {target}; the run so far is saved")
    print(f"model:       {model_path}")
    if buffer_path is not None:
        print(f"replay buffer: {buffer_path}")
    print(f"config:      {os.path.join(out, CONFIG_FILE)}")
    print(f"tensorboard: {tb_dir}   (tensorboard --logdir {tb_log})")
    print(f"monitor:     {monitor_dir}")
    print(f"curves:      {png}")
    if interrupted:
        print(f"continue with: {_resume_command(args, model_path, target - model.num_timesteps)}")
    return STOP_SIGNALS[stop.signum] if stop.signum is not None else 0


# ----------------------------------------------------------------------------------------- eval


def _load_model(args: argparse.Namespace, config: dict[str, Any], env: gym.Env) -> BaseAlgorithm:
    algo = args.algo or config.get("algo")
    if algo is None:
        raise CliError("--algo is needed (no config.json next to the model)")
    # loading with the env checks that its spaces match the model's
    return _load_algo(algo_class(algo), _model_path(args.model), "model", env=env, device="cpu")


def _eval_env_id(args: argparse.Namespace, config: dict[str, Any]) -> str:
    from sb3_offtrc.envs import resolve_env_id

    if args.env is not None:
        return resolve_env_id(args.env, args.cost)
    if "env_id" in config:
        return str(config["env_id"])
    raise CliError("--env is needed (no config.json next to the model)")


def format_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _make_eval_env(env_id: str, args: argparse.Namespace, config: dict[str, Any], **kwargs: Any) -> gym.Env:
    env_kwargs = _env_kwargs(args, config)
    try:
        return make_env_fn(env_id, 0, None, env_kwargs=env_kwargs, **kwargs)()
    except TypeError as exc:
        raise CliError(f"--env-kwargs: {env_id} does not accept {env_kwargs} ({exc})") from exc


def cmd_eval(args: argparse.Namespace) -> int:
    from sb3_offtrc.common.evaluation import evaluate_safe_policy

    _check_counts(args, ("episodes",))
    _model_path(args.model)  # before building anything: a missing model is the likeliest mistake
    config = _load_config(args.model)
    env = _make_eval_env(_eval_env_id(args, config), args, config)
    model = _load_model(args, config, env)
    env.reset(seed=args.seed)
    d = args.cost_limit if args.cost_limit is not None else config.get("cost_limit")
    horizon = episode_horizon(env)
    episode_limit = d * horizon if d is not None and horizon else None
    result = evaluate_safe_policy(
        model,
        env,
        n_eval_episodes=args.episodes,
        deterministic=not args.stochastic,
        cvar_alpha=args.cvar_alpha,
        cost_key=args.cost_key or config.get("cost_key", "cost"),
        cost_limit=episode_limit,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    row = {
        "return": result.mean_reward,
        "return_std": result.std_reward,
        "cost": result.mean_cost,
        f"cost_cvar({args.cvar_alpha:g})": result.cost_cvar,
        "cv": result.mean_cv,
        "violation_rate": result.violation_rate,
        "ep_len": result.mean_ep_length,
        "episode_limit": episode_limit,
    }
    print(f"{args.episodes} episodes, {'stochastic' if args.stochastic else 'deterministic'} actions")
    print(format_table([row], list(row)))
    return 0


# --------------------------------------------------------------------------------------- record


def cmd_record(args: argparse.Namespace) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    import imageio.v2 as imageio
    import numpy as np

    _check_counts(args, ("steps", "fps", "every"))
    if args.model:
        _model_path(args.model)
    config = _load_config(args.model) if args.model else {}
    if args.env is None and not config:
        raise CliError("--env is needed to record without a trained run")
    env_id = _eval_env_id(args, config)
    import gymnasium as gym

    import sb3_offtrc.envs  # noqa: F401

    env_kwargs = _env_kwargs(args, config)
    try:
        env = gym.make(env_id, **{**env_kwargs, "render_mode": "rgb_array"})
    except TypeError as exc:
        raise CliError(f"--env-kwargs: {env_id} does not accept {env_kwargs} ({exc})") from exc
    model = _load_model(args, config, env) if args.model else None
    obs, _ = env.reset(seed=args.seed)
    frames = []
    total_cost = 0.0
    for step in range(args.steps):
        frame: Any = env.render() if step % args.every == 0 else None
        if frame is not None:
            frames.append(np.asarray(frame))
        if model is None:
            action = env.action_space.sample()
        else:
            action, _ = model.predict(obs, deterministic=not args.stochastic)
        obs, _, terminated, truncated, info = env.step(action)
        total_cost += float(info.get(args.cost_key or "cost", 0.0))
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    if not frames:
        raise CliError(f"{env_id} returned no frames (render_mode='rgb_array' unsupported?)")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    # --fps is env steps per second of video: with --every K each frame stands for K steps
    if args.output.lower().endswith(".gif"):
        imageio.mimsave(args.output, frames, duration=1000 * args.every / args.fps, loop=0)  # type: ignore[arg-type]
    else:
        imageio.mimsave(args.output, frames, fps=args.fps / args.every)  # type: ignore[arg-type]
    print(f"video: {args.output} ({len(frames)} frames, summed cost {total_cost:.2f})")
    return 0


# ----------------------------------------------------------------------------------------- plot


def plot_runs(
    runs: Sequence[str],
    output: str,
    cost_limit: float | None = None,
    window: int = 10,
    labels: Sequence[str] | None = None,
) -> str:
    """Plot episode return and cost vs env steps from CostMonitor files, with the limit ``d * T``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sb3_offtrc.common.monitor import load_cost_results

    fig, (ax_r, ax_c) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    lengths = []
    for i, run in enumerate(runs):
        data = load_cost_results(run)
        if data.empty:
            raise ValueError(f"{run}: no finished episodes in the monitor files")
        label = labels[i] if labels else (_load_config(run).get("algo") or os.path.basename(os.path.normpath(run)))
        x = data["timesteps"].to_numpy()
        for ax, column in ((ax_r, "r"), (ax_c, "c")):
            y = data[column].to_numpy(dtype=float)
            ax.plot(x, y, alpha=0.25, linewidth=0.8, color=f"C{i}")
            # trailing mean over up to `window` episodes, so the first episodes are drawn too
            smooth = data[column].astype(float).rolling(max(1, window), min_periods=1).mean().to_numpy()
            ax.plot(x, smooth, color=f"C{i}", label=label)
        lengths.append(data["l"].to_numpy())
        if cost_limit is None:
            cost_limit = _load_config(run).get("cost_limit")
    if cost_limit is not None:
        horizon = float(np.median(np.concatenate(lengths)))
        ax_c.axhline(cost_limit * horizon, color="k", linestyle="--", label=f"limit d*T = {cost_limit:g}*{horizon:g}")
    ax_r.set_ylabel("episode return")
    ax_c.set_ylabel("episode cost")
    ax_c.set_xlabel("env steps")
    ax_r.legend(loc="best", fontsize=8)
    ax_c.legend(loc="best", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def cmd_plot(args: argparse.Namespace) -> int:
    output = args.output or os.path.join(args.runs[0], "curves.png")
    try:
        plot_runs(args.runs, output, cost_limit=args.cost_limit, window=args.window)
    except (FileNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"curves: {output}")
    return 0


# ----------------------------------------------------------------------------------------- main


def _add_train_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("--algo", default="offtrc", choices=list(ALGOS))
    train.add_argument("--env", default="HazardPoint-v0", help="env id (unknown ids list the available ones)")
    train.add_argument("--cost", choices=("native", "smooth"), default=None, help="cost of Safety-Gymnasium tasks")
    train.add_argument("--cost-key", default="cost")
    train.add_argument("--cost-limit", type=float, default=None, help="per-step limit d (algorithm default if unset)")
    train.add_argument("--timesteps", type=int, default=20_000)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--n-envs", type=int, default=1)
    train.add_argument("--subproc", action="store_true", help="SubprocVecEnv instead of DummyVecEnv")
    train.add_argument("--hyperparams", nargs="*", metavar="KEY=VALUE", help="constructor overrides")
    train.add_argument("--env-kwargs", nargs="*", metavar="KEY=VALUE", help="keyword arguments of gym.make")
    train.add_argument(
        "--observation",
        choices=OBSERVATION_CHOICES,
        default=None,
        help="observation of a Safety-Gymnasium task: native (its own), paper (the authors' scaled 24-dim Goal "
        "observation) or lidar_max (native plus each lidar's largest bin); saved in config.json, which eval "
        "and record reuse unless given --env-kwargs of their own",
    )
    train.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default=None,
        help="OffTRC hyperparameter preset: paper (the constructor's defaults), cpu (docs/speed.md), "
        "recommended (docs/benchmarks.md)",
    )
    train.add_argument("--progress-bar", action="store_true")
    train.add_argument("--tensorboard-log", default=None, help="default: OUT/tb")
    train.add_argument("--checkpoint-freq", type=int, default=0, help="env steps between checkpoints (0: none)")
    train.add_argument(
        "--save-replay-buffer", action="store_true", help="also save the replay buffer (off-policy), as .npz"
    )
    train.add_argument("--eval-freq", type=int, default=0, help="env steps between SafeEvalCallback evaluations")
    train.add_argument("--eval-episodes", type=int, default=5)
    train.add_argument("--resume", default=None, metavar="MODEL.zip", help="continue training a saved model")
    train.add_argument(
        "--resume-replay-buffer",
        nargs="?",
        const="auto",
        default=None,
        metavar="BUFFER.npz",
        help="with --resume, also load the replay buffer saved by --save-replay-buffer (default: the .npz next "
        "to the model); pickle files are never loaded",
    )
    train.add_argument("--out", default="runs/run", help="run directory")
    train.add_argument("--verbose", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sb3-offtrc", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an agent; writes model, monitor files, TensorBoard log, curves")
    _add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a model: return / cost / CV / CVaR table")
    evaluate.add_argument("model", help="model .zip or run directory")
    evaluate.add_argument("--algo", default=None, choices=list(ALGOS))
    evaluate.add_argument("--env", default=None)
    evaluate.add_argument("--cost", choices=("native", "smooth"), default=None)
    evaluate.add_argument("--cost-key", default=None)
    evaluate.add_argument(
        "--env-kwargs", nargs="*", metavar="KEY=VALUE", help="keyword arguments of gym.make (default: the run's)"
    )
    evaluate.add_argument("--cost-limit", type=float, default=None, help="per-step d; episode limit d*T")
    evaluate.add_argument("--episodes", type=int, default=10)
    evaluate.add_argument("--cvar-alpha", type=float, default=0.125)
    evaluate.add_argument("--stochastic", action="store_true")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    record = sub.add_parser("record", help="render a policy headless (MUJOCO_GL=egl) to MP4 or GIF")
    record.add_argument("model", nargs="?", default=None, help="model .zip or run directory (none: random actions)")
    record.add_argument("--algo", default=None, choices=list(ALGOS))
    record.add_argument("--env", default=None)
    record.add_argument("--cost", choices=("native", "smooth"), default=None)
    record.add_argument("--cost-key", default=None)
    record.add_argument(
        "--env-kwargs", nargs="*", metavar="KEY=VALUE", help="keyword arguments of gym.make (default: the run's)"
    )
    record.add_argument("--steps", type=int, default=300)
    record.add_argument("--fps", type=int, default=30, help="env steps per second of video")
    record.add_argument(
        "--every",
        type=int,
        default=1,
        metavar="K",
        help="keep every K-th frame (smaller files; playback stays real-time)",
    )
    record.add_argument("--stochastic", action="store_true")
    record.add_argument("--seed", type=int, default=0)
    record.add_argument("--output", default="video.mp4", help=".mp4 (needs imageio-ffmpeg) or .gif")
    record.set_defaults(func=cmd_record)

    plot = sub.add_parser("plot", help="return and cost curves vs env steps, with the limit line")
    plot.add_argument("runs", nargs="+", help="run directories (or folders of *.costs.csv)")
    plot.add_argument("--cost-limit", type=float, default=None, help="per-step d (default: from config.json)")
    plot.add_argument("--window", type=int, default=10, help="moving-average window in episodes")
    plot.add_argument("--output", default=None, help="PNG path (default: FIRST_RUN/curves.png)")
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"sb3-offtrc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (which handles it), e.g. while building the env
        print(f"sb3-offtrc {args.command}: interrupted", file=sys.stderr)
        return STOP_SIGNALS[signal.SIGINT]


if __name__ == "__main__":
    sys.exit(main())
