"""Conditional value at risk of a Gaussian cost return (ALGORITHM.md §1)."""

from __future__ import annotations

import math
from statistics import NormalDist

import torch as th


def cvar_coefficient(alpha: float) -> float:
    """``k_alpha = pdf(ppf(alpha)) / alpha`` so that ``CVaR_alpha = mean + k_alpha * std``.

    ``alpha`` is the fraction of worst outcomes averaged: ``alpha = 1`` gives ``k = 0`` (the plain
    expectation), smaller ``alpha`` is more risk-averse (``alpha = 0.125`` gives ``k = 1.647``).
    """
    if not (0.0 < alpha <= 1.0) or math.isnan(alpha):
        raise ValueError(f"cvar_alpha must lie in (0, 1], got {alpha}; use 1.0 for an expected-cost constraint")
    if alpha == 1.0:
        return 0.0
    normal = NormalDist()
    # pdf(ppf(alpha)) is symmetric, so the upper tail of width alpha has the same coefficient.
    return normal.pdf(normal.inv_cdf(alpha)) / alpha


def gaussian_cvar(mean: th.Tensor | float, variance: th.Tensor | float, alpha: float) -> th.Tensor:
    """CVaR of N(mean, variance) at level ``alpha``; the variance is floored at 1e-8 as in §3.5."""
    mean_t = th.as_tensor(mean)
    var_t = th.as_tensor(variance, dtype=mean_t.dtype if mean_t.is_floating_point() else th.float32)
    return mean_t + cvar_coefficient(alpha) * th.sqrt(th.clamp(var_t, min=1e-8))
