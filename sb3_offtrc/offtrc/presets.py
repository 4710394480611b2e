"""Named hyperparameter sets for OffTRC.

``PAPER`` is the authors' configuration (it equals OffTRC's constructor defaults and is spelled out
so that a run can say which one it used). ``CPU`` is our cheaper configuration for machines without
a GPU: narrower networks and fewer critic epochs, everything else as in the paper. Its speed is
measured by ``benchmarks/speed.py`` and its learning by ``benchmarks/run.py``; see docs/speed.md.
"""

from __future__ import annotations

import copy
from typing import Any

PAPER: dict[str, Any] = {
    "learning_rate": 3e-4,
    "n_steps": 1000,
    "n_recent": 1000,
    "n_batch": 5000,
    "buffer_size": 50_000,
    "n_critic_epochs": 100,
    "policy_kwargs": {"net_arch": [512, 512]},
}

CPU: dict[str, Any] = {
    **PAPER,
    # 1/16 of the multiply-adds of a 512-wide hidden layer; the critic fit dominates an update.
    "policy_kwargs": {"net_arch": {"pi": [128, 128], "vf": [128, 128]}},
    "n_critic_epochs": 40,
    "learning_rate": 1e-3,  # fewer epochs: larger steps to track the targets
}

PRESETS: dict[str, dict[str, Any]] = {"paper": PAPER, "cpu": CPU}


def get_preset(name: str) -> dict[str, Any]:
    """A fresh copy of a named preset, to pass as ``OffTRC("MlpPolicy", env, **get_preset("cpu"))``."""
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise ValueError(f"Unknown OffTRC preset {name!r}; available: {sorted(PRESETS)}") from None
