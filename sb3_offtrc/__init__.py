"""sb3-offtrc: Off-Policy TRC (Kim & Oh, RA-L 2022) for Stable-Baselines3.

The public names are imported lazily so that ``import sb3_offtrc`` stays cheap and works
without MuJoCo or Safety-Gymnasium installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "OffTRC": "sb3_offtrc.offtrc",
    "OffTRCPolicy": "sb3_offtrc.offtrc",
    "CostReplayBuffer": "sb3_offtrc.offtrc",
    "get_preset": "sb3_offtrc.offtrc",
    "CostMonitor": "sb3_offtrc.common.monitor",
    "CostLoggerCallback": "sb3_offtrc.common.monitor",
    "evaluate_safe_policy": "sb3_offtrc.common.evaluation",
    "SafeEvalCallback": "sb3_offtrc.common.evaluation",
    "SACLagrangian": "sb3_offtrc.lagrangian",
    "PPOLagrangian": "sb3_offtrc.lagrangian",
    "make_safety_env": "sb3_offtrc.envs",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sb3_offtrc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
