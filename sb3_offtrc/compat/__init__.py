"""Import shims for third-party packages that do not install cleanly next to SB3 2.9.

Nothing here imports MuJoCo or Safety-Gymnasium at module import time: the heavy import
happens only when a function such as :func:`import_safety_gymnasium` is called.
"""

from sb3_offtrc.compat.safety_gymnasium import (
    SafetyGymnasiumUnavailable,
    import_safety_gymnasium,
    missing_safety_modules,
    patch_marker_rendering,
    safety_gymnasium_available,
)

__all__ = [
    "SafetyGymnasiumUnavailable",
    "import_safety_gymnasium",
    "missing_safety_modules",
    "patch_marker_rendering",
    "safety_gymnasium_available",
]
