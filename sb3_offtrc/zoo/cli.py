"""``python -m sb3_offtrc.zoo train|enjoy|optimize [rl-zoo3 flags] [constraint flags]``.

``train`` and ``enjoy`` are rl-zoo3's scripts of the same names; ``optimize`` is rl-zoo3's
``train -optimize``. Before handing over, this module

1. registers ``offtrc``, ``sac_lag``, ``ppo_lag`` and our env ids (:func:`sb3_offtrc.zoo.register`);
2. maps user-facing env names to registered ids (``--env SafetyPointGoal1-v0`` becomes
   ``OffTRC/SafetyPointGoal1-v0``, whose step info carries the cost; see
   :func:`sb3_offtrc.envs.resolve_env_id`);
3. points ``--conf-file`` at the packaged ``sb3_offtrc/zoo/hyperparams/<algo>.yml`` for our algorithms
   when it is not given;
4. takes out the constraint flags below and installs :class:`SafeExperimentManager` with them.

Constraint flags (train and optimize):

``--cost-penalty X``       return units per unit of episode cost over the limit (default 10)
``--constraint-metric M``  ``mean``, ``cvar`` or ``auto`` (CVaR for OffTRC, else the mean)
``--eval-cost-limit D``    episode cost limit (default: ``cost_limit`` of the file x episode length)

Study flags (optimize, RDB storages: SQLite, PostgreSQL, MySQL):

``--heartbeat-interval S``  seconds between a running trial's heartbeats (default 60; 0: none)
``--heartbeat-grace S``     heartbeat age that marks a trial's worker dead (default 4 intervals)
``--max-retry N``           how often a dead worker's trial is run again by another (default 3)

Cost flags (enjoy): ``--cost-key K`` (default ``cost``) and ``--cvar-alpha A`` (default 0.125);
``enjoy`` prints each episode's cost and violations next to rl-zoo3's reward lines, and their
mean and CVaR at the end (:class:`sb3_offtrc.zoo.enjoy.VecEpisodeCostReporter`).

Everything else is rl-zoo3's: ``python -m sb3_offtrc.zoo train --help`` lists it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

COMMANDS = ("train", "enjoy", "optimize")
USAGE = f"usage: python -m sb3_offtrc.zoo {{{','.join(COMMANDS)}}} [rl-zoo3 flags] (try: train --help)"


def constraint_parser() -> argparse.ArgumentParser:
    # add_help=False and allow_abbrev=False: every other flag (--help included) goes to rl-zoo3 untouched
    parser = argparse.ArgumentParser(
        prog="python -m sb3_offtrc.zoo train|optimize",
        description="Constraint flags of sb3_offtrc.zoo (all other flags are rl-zoo3's, listed below).",
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--cost-penalty", type=float, default=10.0, help="return units per unit of episode cost over the limit"
    )
    parser.add_argument(
        "--constraint-metric",
        choices=("auto", "mean", "cvar"),
        default="auto",
        help="episode-cost figure compared with the limit (auto: cvar for offtrc, else mean)",
    )
    parser.add_argument(
        "--eval-cost-limit",
        type=float,
        default=None,
        help="episode cost limit D (default: cost_limit of the hyperparameters x episode length)",
    )
    study = parser.add_argument_group("study flags of sb3_offtrc.zoo optimize (RDB storages)")
    study.add_argument(
        "--heartbeat-interval",
        type=_non_negative_int,
        default=60,
        help="seconds between a running trial's heartbeats (0: no heartbeat, a killed worker's trial stays RUNNING)",
    )
    study.add_argument(
        "--heartbeat-grace",
        type=_non_negative_int,
        default=None,
        help="seconds without a heartbeat after which a trial is marked FAIL (default: 4 heartbeat intervals)",
    )
    study.add_argument(
        "--max-retry",
        type=_non_negative_int,
        default=3,
        help="how often a FAIL trial of a killed worker is queued again, for any worker (0: never)",
    )
    return parser


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _flag_value(argv: list[str], *names: str) -> tuple[int, str] | None:
    """Index and value of the first ``--name value`` or ``--name=value`` in ``argv``."""
    for i, token in enumerate(argv):
        for name in names:
            if token == name and i + 1 < len(argv):
                return i + 1, argv[i + 1]
            if token.startswith(name + "="):
                return i, token.split("=", 1)[1]
    return None


def _set_flag_value(argv: list[str], index: int, value: str) -> None:
    argv[index] = argv[index].split("=", 1)[0] + "=" + value if "=" in argv[index] else value


def rewrite_env(argv: list[str]) -> None:
    """Replace the value of ``--env`` by the id registered for it (unknown ids are left to rl-zoo3)."""
    from sb3_offtrc.envs import resolve_env_id

    found = _flag_value(argv, "--env")
    if found is None:
        return
    index, env_id = found
    try:
        resolved = resolve_env_id(env_id)
    except ValueError:
        return
    if resolved != env_id:
        print(f"sb3_offtrc.zoo: --env {env_id} -> {resolved}")
        _set_flag_value(argv, index, resolved)


def add_default_config(argv: list[str]) -> None:
    """``--conf-file sb3_offtrc/zoo/hyperparams/<algo>.yml`` for our algorithms, unless one is given."""
    from sb3_offtrc.zoo import ZOO_ALGOS, default_config

    if _flag_value(argv, "--conf-file", "-conf") is not None:
        return
    found = _flag_value(argv, "--algo")
    if found is None or found[1] not in ZOO_ALGOS:
        return
    path = default_config(found[1])
    if not path.is_file():
        raise SystemExit(
            f"sb3_offtrc.zoo: {path} not found (a broken install? reinstall sb3-offtrc); pass --conf-file <file.yml>"
        )
    argv += ["--conf-file", str(path)]


def enjoy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sb3_offtrc.zoo enjoy",
        description="Cost flags of sb3_offtrc.zoo enjoy (all other flags are rl-zoo3's, listed below).",
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("--cost-key", default="cost", help="info key of the step cost")
    parser.add_argument("--cvar-alpha", type=float, default=0.125, help="tail fraction of the episode-cost CVaR")
    return parser


def _enjoy_with_costs(rest: list[str]) -> None:
    """rl-zoo3's ``enjoy`` with its test env wrapped in :class:`VecEpisodeCostReporter`."""
    import rl_zoo3.enjoy

    from sb3_offtrc.zoo.enjoy import VecEpisodeCostReporter

    parser = enjoy_parser()
    if {"-h", "--help"} & set(rest):
        parser.print_help()
        print()
    settings, rest = parser.parse_known_args(rest)
    if not 0.0 < settings.cvar_alpha <= 1.0:
        raise SystemExit(f"--cvar-alpha must lie in (0, 1], got {settings.cvar_alpha}")
    found = _flag_value(rest, "--verbose")
    verbose = int(found[1]) if found is not None else 1  # rl-zoo3's default
    original = rl_zoo3.enjoy.create_test_env

    def create_test_env(*args: Any, **kwargs: Any) -> VecEpisodeCostReporter:
        return VecEpisodeCostReporter(
            original(*args, **kwargs), cost_key=settings.cost_key, cvar_alpha=settings.cvar_alpha, verbose=verbose
        )

    # enjoy() looks create_test_env up in its module's namespace when it runs
    vars(rl_zoo3.enjoy)["create_test_env"] = create_test_env
    try:
        sys.argv = ["python -m sb3_offtrc.zoo enjoy", *rest]
        rl_zoo3.enjoy.enjoy()
    finally:
        vars(rl_zoo3.enjoy)["create_test_env"] = original


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m sb3_offtrc.zoo``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        raise SystemExit(USAGE)
    command, rest = args[0], args[1:]

    from sb3_offtrc.zoo import ZOO_MISSING, register

    try:
        register()
        import rl_zoo3.enjoy
        import rl_zoo3.train
    except ImportError as exc:
        raise SystemExit(f"{ZOO_MISSING}\n({exc})") from exc
    from sb3_offtrc.zoo.experiment import SafeExperimentManager

    rewrite_env(rest)
    if command == "enjoy":
        _enjoy_with_costs(rest)
        return

    parser = constraint_parser()
    if {"-h", "--help"} & set(rest):
        parser.print_help()
        print()
    settings, rest = parser.parse_known_args(rest)
    add_default_config(rest)
    if command == "optimize" and not {"-optimize", "--optimize-hyperparameters"} & set(rest):
        rest.append("--optimize-hyperparameters")
    configured = type(
        "ConfiguredSafeExperimentManager",
        (SafeExperimentManager,),
        {
            "cost_penalty": settings.cost_penalty,
            "constraint_metric": settings.constraint_metric,
            "eval_cost_limit": settings.eval_cost_limit,
            "heartbeat_interval": settings.heartbeat_interval,
            "heartbeat_grace": settings.heartbeat_grace or None,
            "max_retry": settings.max_retry,
        },
    )
    # rl-zoo3's train() looks the manager class up in its module's namespace when it runs
    vars(rl_zoo3.train)["ExperimentManager"] = configured
    sys.argv = [f"python -m sb3_offtrc.zoo {command}", *rest]
    rl_zoo3.train.train()


__all__ = ["COMMANDS", "add_default_config", "constraint_parser", "enjoy_parser", "main", "rewrite_env"]
