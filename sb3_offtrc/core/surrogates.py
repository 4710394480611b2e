"""Surrogate objective and CVaR-constraint surrogates (ALGORITHM.md §3.4-3.5).

Each surrogate is an importance-weighted correction around the value measured at ``pi_k``:
``ratio = pi_theta / pi_k`` is differentiable, ``w = min(1, pi_k / mu)`` is not. Subtracting the
batch mean ``m_X`` of ``A_X w`` makes every correction vanish at ``theta = theta_k``, so the
surrogates equal the measured constants there — the paper's remedy for distribution shift.

``weighted_baseline=True`` (a deviation from the paper, ``OffTRC(weighted_baseline=True)``) subtracts
the baseline inside the weight instead: ``ratio w (A - m_w)`` with ``m_w = mean(A w) / mean(w)``,
which also vanishes at ``theta_k``. The paper's ``ratio (A w - m)`` puts ``-m ratio`` on every row,
including replayed rows that ``pi_k`` would almost never take (``w`` near 0): there ``ratio =
pi_theta / pi_k`` can grow without bound for a small step, and its expectation under the behaviour
policy is not 1, so the baseline biases the gradient by ``-m E_mu[grad log pi_k]``. With the
baseline inside the weight, ``ratio w = min(pi_theta / pi_k, pi_theta / mu)`` multiplies every term
(docs/diagnosis.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch as th


class SurrogateConstants(NamedTuple):
    """Quantities fixed for one update, measured at ``pi_k``."""

    cost_mean: float  # J_hat, mean discounted cost return from the recent windows
    cost_var: float  # V_hat, variance of the cost return from the recent windows
    gamma: float
    k_alpha: float  # CVaR coefficient, see cvar_coefficient


def centred_corrections(advantages: th.Tensor, weights: th.Tensor, weighted_baseline: bool = False) -> th.Tensor:
    """The per-row terms that multiply ``ratio``: ``A w - mean(A w)`` (the paper), or with
    ``weighted_baseline`` ``w (A - mean(A w) / mean(w))``. Both have mean zero over the batch."""
    weighted = advantages * weights
    if not weighted_baseline:
        return weighted - weighted.mean()
    return weights * (advantages - weighted.mean() / th.clamp(weights.mean(), min=1e-8))


def reward_surrogate(
    ratio: th.Tensor, advantages: th.Tensor, weights: th.Tensor, weighted_baseline: bool = False
) -> th.Tensor:
    """``L = mean[ratio (A w - m_R)] / (sd_R + 1e-8)``, zero at ``theta_k`` (with
    ``weighted_baseline``: ``mean[ratio w (A - m_w)] / (sd + 1e-8)``, see the module docstring)."""
    centred = centred_corrections(advantages, weights, weighted_baseline)
    return th.mean(ratio * centred) / (centred.std() + 1e-8)


class CostSurrogates(NamedTuple):
    cost_mean: th.Tensor  # J_C(theta)
    cost_var: th.Tensor  # V_C(theta)
    cvar: th.Tensor  # F(theta)


def cost_surrogates(
    ratio: th.Tensor,
    cost_advantages: th.Tensor,
    var_advantages: th.Tensor,
    weights: th.Tensor,
    constants: SurrogateConstants,
    weighted_baseline: bool = False,
) -> CostSurrogates:
    """``J_C``, ``V_C`` and the CVaR surrogate ``F = J_C + k sqrt(max(V_C, 1e-8))``."""
    centred_c = centred_corrections(cost_advantages, weights, weighted_baseline)
    mean_term = th.mean(ratio * centred_c) / (1.0 - constants.gamma)
    return _with_variance(constants.cost_mean + mean_term, ratio, var_advantages, weights, constants, weighted_baseline)


def _with_variance(
    cost_mean: th.Tensor,
    ratio: th.Tensor,
    var_advantages: th.Tensor,
    weights: th.Tensor,
    constants: SurrogateConstants,
    weighted_baseline: bool,
) -> CostSurrogates:
    """``V_C`` by the importance-weighted surrogate, and ``F = J_C + k sqrt(max(V_C, 1e-8))``."""
    centred_s = centred_corrections(var_advantages, weights, weighted_baseline)
    cost_var = constants.cost_var + th.mean(ratio * centred_s) / (1.0 - constants.gamma**2)
    cvar = cost_mean + constants.k_alpha * th.sqrt(th.clamp(cost_var, min=1e-8))
    return CostSurrogates(cost_mean, cost_var, cvar)


def action_value_gain(values: th.Tensor, values_k: th.Tensor) -> th.Tensor:
    """``mean[Q(s, a_theta) - Q(s, a_k)]``: the change of the mean action value over the batch's states
    when the reparameterised action ``a = mean(s) + std(s) eps`` moves from ``pi_k`` to ``pi_theta``
    with the same noise ``eps`` (``OffTRC(surrogate="action_value")``). Zero at ``theta_k``; its
    gradient is the pathwise (reparameterisation) gradient through the critic."""
    return th.mean(values - values_k)


def action_value_cost_surrogates(
    cost_values: th.Tensor,
    cost_values_k: th.Tensor,
    ratio: th.Tensor,
    var_advantages: th.Tensor,
    weights: th.Tensor,
    constants: SurrogateConstants,
    weighted_baseline: bool = False,
) -> CostSurrogates:
    """``cost_surrogates`` with the mean read off an action-value cost critic: ``J_C = J_hat +
    action_value_gain(Q_C(s, a_theta), Q_C(s, a_k)) / (1 - gamma)``; ``V_C`` stays importance-weighted."""
    cost_mean = constants.cost_mean + action_value_gain(cost_values, cost_values_k) / (1.0 - constants.gamma)
    return _with_variance(cost_mean, ratio, var_advantages, weights, constants, weighted_baseline)
