"""Surrogate objective and CVaR-constraint surrogates (ALGORITHM.md §3.4-3.5).

Each surrogate is an importance-weighted correction around the value measured at ``pi_k``:
``ratio = pi_theta / pi_k`` is differentiable, ``w = min(1, pi_k / mu)`` is not. Subtracting the
batch mean ``m_X`` of ``A_X w`` makes every correction vanish at ``theta = theta_k``, so the
surrogates equal the measured constants there — the paper's remedy for distribution shift.
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


def reward_surrogate(ratio: th.Tensor, advantages: th.Tensor, weights: th.Tensor) -> th.Tensor:
    """``L = mean[ratio (A w - m_R)] / (sd_R + 1e-8)``, zero at ``theta_k``."""
    weighted = advantages * weights
    return th.mean(ratio * (weighted - weighted.mean())) / (weighted.std() + 1e-8)


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
) -> CostSurrogates:
    """``J_C``, ``V_C`` and the CVaR surrogate ``F = J_C + k sqrt(max(V_C, 1e-8))``."""
    gamma = constants.gamma
    weighted_c = cost_advantages * weights
    weighted_s = var_advantages * weights
    mean_term = th.mean(ratio * (weighted_c - weighted_c.mean())) / (1.0 - gamma)
    var_term = th.mean(ratio * (weighted_s - weighted_s.mean())) / (1.0 - gamma**2)
    cost_mean = constants.cost_mean + mean_term
    cost_var = constants.cost_var + var_term
    cvar = cost_mean + constants.k_alpha * th.sqrt(th.clamp(cost_var, min=1e-8))
    return CostSurrogates(cost_mean, cost_var, cvar)
