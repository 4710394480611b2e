"""Import Safety-Gymnasium 1.0.0 on Python 3.11 next to gymnasium 0.29 and SB3 2.9.

Why this exists
---------------
Safety-Gymnasium 1.0.0 pins ``gymnasium==0.28.1``, ``mujoco==2.3.3``, ``pygame==2.1.0`` and
``gymnasium-robotics==1.2.2``; pip cannot resolve those pins next to stable-baselines3 2.9, so the
supported install puts it in with ``--no-deps`` (see the Makefile). Its single-agent navigation
tasks run fine on gymnasium 0.29 and mujoco 3.x, but a plain ``import safety_gymnasium`` fails
twice before any task is built, and rendering fails on MuJoCo >= 3.2:

1. Python 3.11 rejects a dataclass field whose default is unhashable (``ValueError: mutable
   default <class 'numpy.ndarray'> for field color``). Safety-Gymnasium's geom/mocap classes use
   numpy arrays from its colour and group tables as plain defaults (Python <= 3.10 accepted them).
   While the package is imported we route its ``@dataclass`` classes through a wrapper that turns
   such defaults into ``default_factory`` copies and then puts the original array back as the
   class attribute, so instance and class look the same as on Python 3.10.
2. ``safety_gymnasium/__init__.py`` imports its multi-agent module, which imports
   ``gymnasium_robotics`` (pinned to a version that wants gymnasium 0.28) only to build
   multi-agent MuJoCo tasks. When ``gymnasium_robotics`` is not importable we place a stub in
   ``sys.modules`` for the duration of the import; the stub class raises a clear error if a
   multi-agent task is ever constructed, and the stub is removed again afterwards so nothing
   else believes ``gymnasium_robotics`` is installed.
3. Rendering (``render_mode="rgb_array"``) goes through gymnasium 0.29.1's
   ``BaseRender._add_marker_to_scene``, which writes ``MjvGeom.texid``; MuJoCo 3.2 removed that
   field (textures moved to materials), so every frame with a marker -- Safety-Gymnasium draws
   lidar and goal markers on each one -- fails with ``AttributeError``. On such MuJoCo versions
   :func:`patch_marker_rendering` replaces that one method by one that fills the geom with
   ``mujoco.mjv_initGeom`` (public API, MuJoCo's own defaults) and then applies the marker's
   fields as gymnasium does. ``render_mode="human"`` (a window, never used here) still reads
   ``MjData.solver_iter`` and is left unsupported on MuJoCo >= 3.2.

Patches 1 and 2 are scoped to the import of ``safety_gymnasium`` and undone when it finishes.
Patch 3 is global and stays: it only replaces a method that cannot work on the installed MuJoCo.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "SafetyGymnasiumUnavailable",
    "import_safety_gymnasium",
    "missing_safety_modules",
    "patch_marker_rendering",
    "safety_gymnasium_available",
]

_PACKAGE = "safety_gymnasium"
_ROBOTICS_MODULES = (
    "gymnasium_robotics",
    "gymnasium_robotics.envs",
    "gymnasium_robotics.envs.multiagent_mujoco",
    "gymnasium_robotics.envs.multiagent_mujoco.mujoco_multi",
)
_RUNTIME_MODULES = (_PACKAGE, "mujoco", "xmltodict", "yaml", "imageio")
_INSTALL_HINT = (
    "Safety-Gymnasium is not usable in this environment. Install it the supported way: "
    "`make setup` (or `pip install -e '.[safety]' -c constraints.txt` followed by "
    "`pip install --no-deps safety-gymnasium==1.0.0`)."
)
_lock = threading.Lock()


class SafetyGymnasiumUnavailable(ImportError):
    """Raised when Safety-Gymnasium (or MuJoCo, which it needs) cannot be imported."""


def missing_safety_modules() -> list[str]:
    """Top-level modules that ``import safety_gymnasium`` needs and that cannot be found.

    Installing Safety-Gymnasium with ``--no-deps`` leaves its small runtime needs (xmltodict,
    PyYAML, imageio) to the ``safety`` extra, so they are checked too. Nothing is imported.
    """
    return [name for name in _RUNTIME_MODULES if importlib.util.find_spec(name) is None]


def safety_gymnasium_available() -> bool:
    """Whether Safety-Gymnasium, MuJoCo and their runtime needs are installed (imports none)."""
    return not missing_safety_modules()


def _is_unhashable_default(value: Any) -> bool:
    # Python 3.11's dataclasses rule: a plain default whose class sets __hash__ = None is "mutable".
    return not isinstance(value, dataclasses.Field) and type(value).__hash__ is None


def _copying_factory(value: Any) -> Callable[[], Any]:
    def factory() -> Any:
        return copy.deepcopy(value)

    return factory


def _patched_dataclass(original: Callable[..., Any]) -> Callable[..., Any]:
    def wrap(cls: type, kwargs: dict[str, Any]) -> type:
        if not cls.__module__.startswith(_PACKAGE):
            return original(cls, **kwargs)  # type: ignore[no-any-return]
        moved: dict[str, Any] = {}
        for name in cls.__dict__.get("__annotations__", {}):
            value = cls.__dict__.get(name, dataclasses.MISSING)
            if value is not dataclasses.MISSING and _is_unhashable_default(value):
                moved[name] = value
                setattr(cls, name, dataclasses.field(default_factory=_copying_factory(value)))
        result: type = original(cls, **kwargs)
        if not kwargs.get("slots", False):
            # dataclasses deletes the class attribute of a default_factory field; code that reads
            # e.g. ``Goal.color`` off the class expects the array to still be there.
            for name, value in moved.items():
                setattr(result, name, value)
        return result

    def dataclass(cls: type | None = None, /, **kwargs: Any) -> Any:
        if cls is None:
            return lambda c: wrap(c, kwargs)
        return wrap(cls, kwargs)

    return dataclass


@contextlib.contextmanager
def _array_defaults_allowed() -> Iterator[None]:
    original = dataclasses.dataclass
    dataclasses.dataclass = _patched_dataclass(original)  # type: ignore[assignment]
    try:
        yield
    finally:
        dataclasses.dataclass = original  # type: ignore[assignment]


class _MultiAgentMujocoUnavailable:
    """Stands in for gymnasium_robotics' MultiAgentMujocoEnv when that package is missing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise SafetyGymnasiumUnavailable(
            "Safety-Gymnasium's multi-agent tasks need gymnasium-robotics, which is not installed "
            "(sb3-offtrc supports the single-agent tasks only)."
        )


@contextlib.contextmanager
def _robotics_stub_if_missing() -> Iterator[None]:
    if importlib.util.find_spec("gymnasium_robotics") is not None:
        yield
        return
    stubs: dict[str, types.ModuleType] = {}
    for name in _ROBOTICS_MODULES:
        module = types.ModuleType(name, "stub installed by sb3_offtrc.compat while importing safety_gymnasium")
        module.__path__ = []  # mark as a package so the dotted children resolve
        stubs[name] = module
    stubs[_ROBOTICS_MODULES[-1]].MultiAgentMujocoEnv = _MultiAgentMujocoUnavailable  # type: ignore[attr-defined]
    for parent, child in zip(_ROBOTICS_MODULES, _ROBOTICS_MODULES[1:], strict=False):
        setattr(stubs[parent], child.rsplit(".", 1)[1], stubs[child])
    previous = {name: sys.modules.get(name) for name in _ROBOTICS_MODULES}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name, saved in previous.items():
            if saved is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved


def _add_marker_to_scene(self: Any, marker: dict[str, Any]) -> None:
    import mujoco
    import numpy as np

    scene = self.scn
    if scene.ngeom >= scene.maxgeom:
        raise RuntimeError(f"Ran out of geoms. maxgeom: {scene.maxgeom}")
    geom = scene.geoms[scene.ngeom]
    mujoco.mjv_initGeom(
        geom,
        int(mujoco.mjtGeom.mjGEOM_BOX),
        np.full(3, 0.1),
        np.zeros(3),
        np.eye(3).ravel(),
        np.ones(4, dtype=np.float32),
    )
    geom.category = int(mujoco.mjtCatBit.mjCAT_DECOR)
    # Same look as gymnasium 0.29.1's marker defaults.
    geom.emission, geom.specular, geom.shininess, geom.reflectance = 0.0, 0.5, 0.5, 0.0
    for key, value in marker.items():
        if key == "label":
            geom.label = "" if value is None else str(value)
        elif isinstance(value, tuple | list | np.ndarray):
            field = getattr(geom, key)
            field[:] = np.asarray(value).reshape(field.shape)
        elif hasattr(geom, key):
            # enums such as mjtGeom are no longer ints on MuJoCo >= 3.2, while the geom fields are
            setattr(geom, key, value if isinstance(value, float) else int(value))
        else:
            raise ValueError(f"mjvGeom has no field {key!r}")
    scene.ngeom += 1


def patch_marker_rendering() -> bool:
    """Make gymnasium 0.29.1's offscreen marker drawing work on MuJoCo >= 3.2 (see module doc).

    :return: whether the patch was needed (and is now in place).
    """
    import mujoco
    from gymnasium.envs.mujoco import mujoco_rendering

    if hasattr(mujoco.MjvGeom, "texid"):
        return False
    # Idempotent: assigning the same function again changes nothing.
    mujoco_rendering.BaseRender._add_marker_to_scene = _add_marker_to_scene  # type: ignore[method-assign]
    return True


def import_safety_gymnasium() -> types.ModuleType:
    """Import and return the ``safety_gymnasium`` module, patched to load on Python 3.11.

    Importing it also registers the ``Safety*-v0`` ids in Safety-Gymnasium's registry and the
    ``Safety*Gymnasium-v0`` ids (five-tuple ``step``, cost in ``info["cost"]``) in gymnasium's.

    :raises SafetyGymnasiumUnavailable: if Safety-Gymnasium or MuJoCo is not installed.
    """
    loaded = sys.modules.get(_PACKAGE)
    if loaded is not None:
        patch_marker_rendering()
        return loaded
    missing = missing_safety_modules()
    if missing:
        raise SafetyGymnasiumUnavailable(f"{_INSTALL_HINT} Missing: {', '.join(missing)}.")
    with _lock:
        loaded = sys.modules.get(_PACKAGE)
        if loaded is not None:
            patch_marker_rendering()
            return loaded
        with _array_defaults_allowed(), _robotics_stub_if_missing():
            try:
                module = importlib.import_module(_PACKAGE)
            except ImportError as exc:
                raise SafetyGymnasiumUnavailable(f"{_INSTALL_HINT} (import failed: {exc})") from exc
        patch_marker_rendering()
        return module
