"""Range checks of constructor arguments, shared by OffTRC and the Lagrangian baselines.

Each check raises a ``ValueError`` (a ``TypeError`` for a value of the wrong kind) that names the
argument, the value it got and what it accepts, so that a bad setting fails at construction (or at
``load``) instead of as a NaN or a ``ZeroDivisionError`` many updates later.

Layer 2 (next to the algorithms): the standard library and numpy only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

#: progress_remaining values at which a learning-rate schedule is probed (SB3 runs it from 1 to 0)
SCHEDULE_PROBES = (1.0, 0.75, 0.5, 0.25, 0.0)


def check_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int >= minimum``; an integral float (``1e3``) is accepted, NaN, inf and bools are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number) or number != math.floor(number) or number < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(number)


def check_float(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a finite float in the interval given by ``low``/``high`` (closed unless ``*_open``).

    NaN and +-inf are always refused: no argument of these algorithms means anything at infinity.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r} ({type(value).__name__})")
    number = float(value)
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or below or above:
        left = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        interval = f"{left}, {right}"
        extra = f"; {hint}" if hint else ""
        raise ValueError(f"{owner}: {name} must be a finite number in {interval}, got {value!r}{extra}")
    return number


def check_schedule(owner: str, name: str, value: float | Callable[[float], float], allow_zero: bool = False) -> None:
    """A positive finite value (a learning rate, PPO's clip range), or a schedule positive over the run.

    A schedule (a function of SB3's ``progress_remaining``, 1 at the start and 0 at the end) is
    probed at :data:`SCHEDULE_PROBES`: it must be positive everywhere before the end and not negative
    at the end (a linear decay to 0 is allowed). ``allow_zero`` (used after ``load``) also accepts 0
    everywhere: rl-zoo3's ``enjoy`` loads models with ``learning_rate=0.0`` and ``clip_range=0.0``
    so that nothing trains.
    """
    if not callable(value):
        hint = "pass a positive number or a schedule"
        check_float(owner, name, value, 0.0, low_open=not allow_zero, hint=hint)
        return
    for progress in SCHEDULE_PROBES:
        try:
            rate = float(value(progress))
        except Exception as exc:
            raise ValueError(f"{owner}: the {name} schedule fails at progress_remaining={progress}: {exc!r}") from exc
        if not math.isfinite(rate) or rate < 0.0 or (rate == 0.0 and progress > 0.0 and not allow_zero):
            raise ValueError(
                f"{owner}: the {name} schedule returns {rate!r} at progress_remaining={progress}; it must "
                "return a finite rate > 0 while training runs (0 is allowed only at progress_remaining=0)"
            )


def check_lagrangian(owner: str, model: Any) -> None:
    """The arguments the Lagrangian baselines add to SB3's: the limit, the cost key and the multiplier."""
    check_float(owner, "cost_limit", model.cost_limit, 0.0, hint="it is the per-step cost limit d")
    if not isinstance(model.cost_key, str) or not model.cost_key:
        raise TypeError(f"{owner}: cost_key must be the (non-empty) info key of the step cost, got {model.cost_key!r}")
    check_float(owner, "lagrangian_lr", model.lagrangian_lr, 0.0, low_open=True)
    check_float(owner, "initial_lagrange", model.initial_lagrange, 0.0)
    if model.max_lagrange is not None:
        check_float(
            owner, "max_lagrange", model.max_lagrange, model.initial_lagrange, hint="or None for no upper bound"
        )


def check_finite_observation(obs: Any, obs_shape: tuple[int, ...], owner: str, where: str, opt_out: str) -> None:
    """Refuse an observation (or a batch of them) with NaN or inf entries: the policy would turn it
    into a NaN action that reaches the env, or a NaN in the replay buffer.

    :param obs: one observation of shape ``obs_shape`` or a batch ``(n, *obs_shape)``.
    :param where: where it came from, for the message (e.g. ``" at env step 5"``).
    :param opt_out: how to switch the check off, for the message.
    """
    values = np.asarray(obs)
    if values.dtype.kind not in "fc":  # integers and bools are always finite
        return
    finite = np.isfinite(values)
    if finite.all():
        return
    size = int(np.prod(obs_shape)) if obs_shape else 1
    rows = (~finite).reshape(-1, size)
    row = int(np.flatnonzero(rows.any(axis=1))[0])
    components = np.flatnonzero(rows[row])
    shown = values.reshape(-1, size)[row, components[:5]].tolist()
    index = f" from env index {row}" if values.ndim > len(obs_shape) else ""
    raise ValueError(
        f"{owner}: non-finite observation{where}{index}: component(s) {components[:5].tolist()} "
        f"(flattened) are {shown}; the policy would turn them into a NaN action. Check the environment "
        f"(or its observation wrapper), or {opt_out} to let such observations through."
    )


def check_model_zip(path: Any, owner: str, required_keys: tuple[str, ...]) -> None:
    """Refuse a truncated, corrupt or foreign model file before SB3's ``load`` unpickles anything of it.

    Reads only the zip's directory and its JSON ``data`` entry. ``required_keys`` are saved
    attributes only ``owner`` has (a SAC zip has no ``n_recent``). A file-like ``path`` is left to SB3.
    """
    import json
    import os
    import zipfile

    if not isinstance(path, str | os.PathLike):
        return
    name = os.fspath(path)
    if not os.path.exists(name) and os.path.exists(f"{name}.zip"):
        name = f"{name}.zip"  # as SB3 does
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{owner}.load: no model file {name!r}")
    try:
        with zipfile.ZipFile(name) as archive:
            data = json.loads(archive.read("data"))
    except (zipfile.BadZipFile, KeyError, EOFError, OSError, ValueError) as exc:
        raise ValueError(
            f"{owner}.load: {name!r} is not a readable Stable-Baselines3 model file (truncated or corrupt? "
            f"{type(exc).__name__}: {exc})"
        ) from None
    missing = [key for key in required_keys if key not in data]
    if missing:
        module = data.get("policy_class", {}).get("__module__", "an unknown module") if isinstance(data, dict) else "?"
        raise ValueError(
            f"{owner}.load: {name!r} is not an {owner} model (it has no {', '.join(missing)}; its policy comes "
            f"from {module}). Load it with the class that saved it."
        )
