"""rl-baselines3-zoo integration: ``python -m sb3_offtrc.zoo train|enjoy|optimize ...``.

:func:`register` adds ``offtrc``, ``sac_lag`` and ``ppo_lag`` to rl-zoo3's algorithm table
(``rl_zoo3.utils.ALGOS``) and to its table of Optuna samplers, and registers this package's env
ids in gymnasium. The command line in :mod:`sb3_offtrc.zoo.cli` then hands over to rl-zoo3's own
``train`` / ``enjoy`` entry points, so all their flags keep working, with three changes that safe
RL needs (:mod:`sb3_offtrc.zoo.experiment`):

- evaluation during training reports episode costs and keeps the best *feasible* model;
- ``optimize`` scores a trial by its evaluation return when the evaluation episode cost is
  within the limit and penalises it otherwise (:mod:`sb3_offtrc.zoo.objective`);
- the Optuna study lives in an SQLite file by default, so several worker processes (or machines,
  with a database URL) can share it.

Hyperparameter files ship with the package in ``sb3_offtrc/zoo/hyperparams/`` (``offtrc.yml``,
``sac_lag.yml``, ``ppo_lag.yml``). Nothing here imports rl-zoo3 until it is used: install it with
the ``zoo`` extra (``pip install -c constraints.txt -e ".[zoo]"``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

#: zoo algorithm name -> (module, class) of the algorithms this package adds
ZOO_ALGOS: dict[str, tuple[str, str]] = {
    "offtrc": ("sb3_offtrc.offtrc", "OffTRC"),
    "sac_lag": ("sb3_offtrc.lagrangian", "SACLagrangian"),
    "ppo_lag": ("sb3_offtrc.lagrangian", "PPOLagrangian"),
}

#: the hyperparameter files shipped with the package (package data, so every install has them)
HYPERPARAMS_DIR = Path(__file__).resolve().parent / "hyperparams"

ZOO_MISSING = (
    "rl-zoo3 is not installed. Install the `zoo` extra without upgrading gymnasium: "
    'pip install -c constraints.txt -e ".[zoo]"  (rl-zoo3 2.3.0 is the newest that keeps gymnasium 0.29)'
)


def algo_class(name: str) -> type[BaseAlgorithm]:
    """The class of one of :data:`ZOO_ALGOS`."""
    module, cls = ZOO_ALGOS[name]
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def default_config(algo: str) -> Path:
    """``<algo>.yml`` of the hyperparameter files shipped in ``sb3_offtrc/zoo/hyperparams/``."""
    return HYPERPARAMS_DIR / f"{algo}.yml"


def register() -> None:
    """Add our algorithms and samplers to rl-zoo3's tables and register our env ids (idempotent)."""
    try:
        from rl_zoo3.hyperparams_opt import HYPERPARAMS_SAMPLER
        from rl_zoo3.utils import ALGOS
    except ImportError as exc:
        raise ImportError(ZOO_MISSING) from exc

    import sb3_offtrc.envs  # noqa: F401  (registers HazardPoint-v0 and the OffTRC/... ids)
    from sb3_offtrc.zoo.samplers import SAMPLERS

    for name in ZOO_ALGOS:
        ALGOS[name] = algo_class(name)
    # rl-zoo3 types the table by its own signature; ours take the same four arguments
    HYPERPARAMS_SAMPLER.update(SAMPLERS)  # type: ignore[arg-type]


__all__ = ["HYPERPARAMS_DIR", "ZOO_ALGOS", "algo_class", "default_config", "register"]
