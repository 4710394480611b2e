"""Optuna samplers of hyperparameters, in rl-zoo3's ``HYPERPARAMS_SAMPLER`` signature.

What is *not* sampled is as important as what is: ``cost_limit`` and ``cvar_alpha`` define the
problem (how much cost is acceptable, and how much of the tail counts), so they stay at the
values of the hyperparameter file; ``gamma`` stays too, because the constraint
``CVaR <= d / (1 - gamma)`` is stated in discounted units and changing gamma changes it.

``additional_args["hyperparams"]`` (set by :class:`sb3_offtrc.zoo.experiment.SafeExperimentManager`)
carries the file's hyperparameters, so sampled sizes can be expressed relative to them and merged
into ``policy_kwargs`` instead of replacing it. Without it (rl-zoo3's own objective) the
algorithms' defaults are assumed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

Sampler = Callable[[optuna.Trial, int, int, dict[str, Any]], dict[str, Any]]

#: net-size choice -> hidden layers, shared by actor and critics
NET_ARCHS: dict[str, list[int]] = {"small": [64, 64], "medium": [256, 256], "big": [512, 512]}


def _base(additional_args: dict[str, Any]) -> dict[str, Any]:
    return dict(additional_args.get("hyperparams") or {})


def _with_net_arch(base: dict[str, Any], net_arch: list[int]) -> dict[str, Any]:
    # keep activation_fn, log_std_init, ... from the file; replace only the layer sizes
    policy_kwargs = dict(base.get("policy_kwargs") or {})
    policy_kwargs["net_arch"] = net_arch
    return policy_kwargs


def sample_offtrc_params(
    trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict[str, Any]
) -> dict[str, Any]:
    """OffTRC: trust-region radius, critic learning rate and epochs, batch size, network size.

    ``n_batch`` is sampled as a multiple of the file's ``n_recent`` (the newest data always enter
    the batch, ALGORITHM.md §3 step 1), which keeps it a multiple of ``n_envs``; the replay buffer
    grows when the batch would not fit.
    """
    base = _base(additional_args)
    max_kl = trial.suggest_float("max_kl", 1e-4, 3e-2, log=True)
    learning_rate = trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True)
    n_critic_epochs = trial.suggest_categorical("n_critic_epochs", [10, 20, 40, 100])
    batch_factor = trial.suggest_categorical("n_batch_factor", [1, 2, 5, 10])
    net = trial.suggest_categorical("net_arch", list(NET_ARCHS))

    n_recent = int(base.get("n_recent", 1000))
    n_batch = batch_factor * n_recent
    buffer_size = max(int(base.get("buffer_size", 50_000)), n_batch)
    return {
        "max_kl": max_kl,
        "learning_rate": learning_rate,
        "n_critic_epochs": n_critic_epochs,
        "n_batch": n_batch,
        "buffer_size": buffer_size,
        "policy_kwargs": _with_net_arch(base, NET_ARCHS[net]),
    }


def sample_sac_lag_params(
    trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict[str, Any]
) -> dict[str, Any]:
    """SAC-Lagrangian: learning rates (networks and multiplier), batch size, tau, network size."""
    base = _base(additional_args)
    net = trial.suggest_categorical("net_arch", list(NET_ARCHS))
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True),
        "lagrangian_lr": trial.suggest_float("lagrangian_lr", 1e-4, 1e-1, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256, 512]),
        "tau": trial.suggest_categorical("tau", [0.002, 0.005, 0.01, 0.02]),
        "policy_kwargs": _with_net_arch(base, NET_ARCHS[net]),
    }


def sample_ppo_lag_params(
    trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict[str, Any]
) -> dict[str, Any]:
    """PPO-Lagrangian: rollout length, minibatch, epochs, GAE lambda, clip range, rates, network size."""
    base = _base(additional_args)
    n_steps = trial.suggest_categorical("n_steps", [256, 512, 1024, 2048])
    batch_size = trial.suggest_categorical("batch_size", [32, 64, 128, 256])
    net = trial.suggest_categorical("net_arch", list(NET_ARCHS))
    return {
        "n_steps": n_steps,
        # a minibatch cannot hold more than one rollout (n_steps per env copy)
        "batch_size": min(batch_size, n_steps * n_envs),
        "n_epochs": trial.suggest_categorical("n_epochs", [5, 10, 20]),
        "gae_lambda": trial.suggest_categorical("gae_lambda", [0.9, 0.95, 0.97, 0.99]),
        "clip_range": trial.suggest_categorical("clip_range", [0.1, 0.2, 0.3]),
        "learning_rate": trial.suggest_float("learning_rate", 1e-5, 3e-3, log=True),
        "lagrangian_lr": trial.suggest_float("lagrangian_lr", 1e-3, 1e-1, log=True),
        "policy_kwargs": _with_net_arch(base, NET_ARCHS[net]),
    }


#: zoo algorithm name -> sampler (merged into rl-zoo3's HYPERPARAMS_SAMPLER by register())
SAMPLERS: dict[str, Sampler] = {
    "offtrc": sample_offtrc_params,
    "sac_lag": sample_sac_lag_params,
    "ppo_lag": sample_ppo_lag_params,
}

__all__ = ["NET_ARCHS", "SAMPLERS", "sample_offtrc_params", "sample_ppo_lag_params", "sample_sac_lag_params"]
