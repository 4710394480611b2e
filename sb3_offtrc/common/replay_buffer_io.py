"""Replay buffers in a file format that cannot run code: numpy ``.npz`` plus JSON metadata.

SB3's ``model.save_replay_buffer`` / ``load_replay_buffer`` pickle the whole buffer object, and
unpickling a crafted file runs arbitrary code, so such files must come from a trusted source. The
command line stores its replay buffers with :func:`save_replay_buffer_npz` instead: every numpy
array of the buffer (observations, actions, rewards, dones, time-outs and, for OffTRC and the
Lagrangian baselines, costs, fail flags and the behaviour policy's mean and std) as one entry of
an ``.npz`` archive, plus an entry ``__metadata__`` holding a JSON string (format, buffer class,
``pos``, ``full``, ``buffer_size``, ``n_envs`` and each array's shape and dtype).
:func:`load_replay_buffer_npz` reads it with ``allow_pickle=False`` into a buffer of the same class
and layout, and refuses anything else.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np
from stable_baselines3.common.buffers import ReplayBuffer

FORMAT = "sb3-offtrc-replay-buffer"
VERSION = 1
METADATA_KEY = "__metadata__"


def _class_name(buffer: Any) -> str:
    return f"{type(buffer).__module__}.{type(buffer).__qualname__}"


def _arrays(buffer: ReplayBuffer) -> dict[str, np.ndarray]:
    return {
        name: value
        for name, value in vars(buffer).items()
        if isinstance(value, np.ndarray) and value.dtype != np.dtype(object)
    }


def save_replay_buffer_npz(buffer: ReplayBuffer, path: str | os.PathLike[str]) -> str:
    """Write ``buffer`` to ``path`` (``.npz`` is appended when missing); returns the file's path."""
    name = os.fspath(path)
    if not name.endswith(".npz"):
        name += ".npz"
    arrays = _arrays(buffer)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "class": _class_name(buffer),
        "pos": int(buffer.pos),
        "full": bool(buffer.full),
        "buffer_size": int(buffer.buffer_size),
        "n_envs": int(buffer.n_envs),
        "arrays": {key: {"shape": list(value.shape), "dtype": value.dtype.str} for key, value in arrays.items()},
    }
    directory = os.path.dirname(os.path.abspath(name))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{name}.tmp.npz"  # written whole, then renamed: an interrupted save leaves the old file intact
    entries: dict[str, Any] = {METADATA_KEY: np.array(json.dumps(metadata)), **arrays}
    np.savez(tmp, **entries)
    os.replace(tmp, name)
    return name


def check_loaded_replay_buffer(model: Any, path: Any, previous: ReplayBuffer | None) -> None:
    """After SB3's ``model.load_replay_buffer(path)``: refuse a buffer that does not fit ``model``.

    SB3 puts whatever the pickle holds in place, and a buffer of another class, saved with another
    number of env copies or for other spaces fails only later, in the middle of ``learn``, with a numpy
    broadcasting error. Here the model gets ``previous`` back and a ``ValueError`` says what differs.
    """
    buffer = model.replay_buffer
    wanted = model.replay_buffer_class
    owner = type(model).__name__
    problem = None
    if not isinstance(buffer, wanted):
        problem = f"it holds a {type(buffer).__name__}, {owner} needs a {wanted.__name__}"
    elif buffer.n_envs != model.n_envs:
        problem = (
            f"it was saved with n_envs={buffer.n_envs}, the model has n_envs={model.n_envs}: load it into a model "
            f"whose env has {buffer.n_envs} cop{'y' if buffer.n_envs == 1 else 'ies'} (or train on with a fresh buffer)"
        )
    elif buffer.observation_space != model.observation_space or buffer.action_space != model.action_space:
        problem = (
            f"it was saved for observations {buffer.observation_space} and actions {buffer.action_space}, the "
            f"model has {model.observation_space} and {model.action_space}"
        )
    if problem is not None:
        model.replay_buffer = previous
        raise ValueError(f"{owner}.load_replay_buffer({os.fspath(path)!r}): {problem}")


def load_replay_buffer_npz(buffer: ReplayBuffer, path: str | os.PathLike[str]) -> None:
    """Fill ``buffer`` (already built for the model's spaces and env copies) from a file of
    :func:`save_replay_buffer_npz`; a ``ValueError`` names the path and what does not match."""
    name = os.fspath(path)
    try:
        with np.load(name, allow_pickle=False) as data:
            if METADATA_KEY not in data.files:
                raise ValueError(f"{name!r} is not a replay buffer saved by sb3_offtrc (no {METADATA_KEY} entry)")
            metadata = json.loads(str(data[METADATA_KEY]))
            if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
                raise ValueError(f"{name!r} is not a replay buffer saved by sb3_offtrc (format {metadata!r})")
            if metadata.get("version") != VERSION:
                raise ValueError(f"{name!r}: replay buffer format version {metadata.get('version')} is not {VERSION}")
            if metadata["class"] != _class_name(buffer):
                raise ValueError(
                    f"{name!r} holds a {metadata['class']}, but the model's replay buffer is a {_class_name(buffer)}"
                )
            for key in ("n_envs", "buffer_size"):
                if metadata[key] != getattr(buffer, key):
                    raise ValueError(
                        f"{name!r} was saved with {key}={metadata[key]}, the model's replay buffer has "
                        f"{key}={getattr(buffer, key)}: resume with the same number of env copies (--n-envs) "
                        "and buffer size"
                    )
            wanted = _arrays(buffer)
            if set(metadata["arrays"]) != set(wanted) or not set(wanted) <= set(data.files):
                raise ValueError(f"{name!r} has the arrays {sorted(data.files)}, the buffer needs {sorted(wanted)}")
            loaded = {}
            for key, current in wanted.items():
                array = data[key]
                if array.shape != current.shape or array.dtype != current.dtype:
                    raise ValueError(
                        f"{name!r}: array {key!r} is {array.dtype}{list(array.shape)}, the buffer's is "
                        f"{current.dtype}{list(current.shape)}"
                    )
                loaded[key] = array
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as exc:
        raise ValueError(f"cannot read the replay buffer {name!r} ({type(exc).__name__}: {exc})") from None
    for key, array in loaded.items():
        setattr(buffer, key, array)
    buffer.pos = int(metadata["pos"])
    buffer.full = bool(metadata["full"])
