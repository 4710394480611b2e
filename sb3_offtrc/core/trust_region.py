"""Trust-region pieces: Gaussian KL, the adaptive radius and the constrained step (ALGORITHM.md §3.6-3.7)."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import NamedTuple

import torch as th
from sb3_contrib.common.utils import conjugate_gradient_solver


def diag_gaussian_kl(mean_p: th.Tensor, std_p: th.Tensor, mean_q: th.Tensor, std_q: th.Tensor) -> th.Tensor:
    """KL(p || q) of diagonal Gaussians, summed over the last (action) dimension."""
    var_ratio = (std_p / std_q) ** 2
    mahalanobis = ((mean_p - mean_q) / std_q) ** 2
    return 0.5 * th.sum(var_ratio + mahalanobis - 1.0 - th.log(var_ratio), dim=-1)


def adaptive_trust_region(max_kl: float, kappa: float) -> float:
    """``eps' = max(0, eps - (sqrt(kappa (eps + kappa/4)) - kappa/2))`` (§3.6).

    ``kappa`` is the mean KL between the behaviour policies in the batch and ``pi_k``: the further
    the data already is from ``pi_k``, the smaller the step may be, so that the new policy stays
    within ``eps`` of the data in the paper's bound.
    """
    if kappa < 0 or math.isnan(kappa):
        raise ValueError(f"kappa must be a non-negative KL, got {kappa}")
    shrink = math.sqrt(kappa * (max_kl + kappa / 4.0)) - kappa / 2.0
    return max(0.0, max_kl - shrink)


class StepCase(enum.IntEnum):
    """Which branch of the dual produced the step (logged as ``train/step_case``)."""

    SKIPPED = -1  # no step, parameters kept: a numerical fault, or nothing the step could gain (see reason)
    FEASIBLE = 0  # the whole trust region satisfies the constraint: natural-gradient step
    CONSTRAINED = 1  # the constraint plane cuts the trust region: CPO dual
    RECOVERY = 2  # a step along -H^-1 b only, lowering the CVaR (no feasible point, or nothing else to gain)
    MULTIPLIER = 3  # cost_step="multiplier": the whole radius along the weighted difference of the two directions


class StepSolution(NamedTuple):
    case: StepCase
    lam: float  # Lagrange multiplier of the trust region (step = (H^-1 g - nu H^-1 b) / lam)
    nu: float  # Lagrange multiplier of the cost constraint
    recovery_scale: float  # step = -recovery_scale * H^-1 b in the recovery case
    reason: str  # why the step was skipped, "" otherwise


#: Below this, q = g'H^-1 g or s = b'H^-1 b counts as zero: the gradient carries no direction.
_TINY = 1e-8
#: g and b count as colinear in the Fisher metric when A = q - r^2/s (the part of q outside b's
#: direction) is below this fraction of q, i.e. when the squared cosine of H^-1 g and H^-1 b exceeds
#: 1 - 1e-6. Below it the dual's lambda = sqrt(A/B) tends to 0 and nu to r/s, so that the caller's
#: (H^-1 g - nu H^-1 b) / lambda cancels to float32 round-off and CG error divided by ~0.
_COLINEAR = 1e-6


def _skip(reason: str) -> StepSolution:
    return StepSolution(StepCase.SKIPPED, math.nan, math.nan, 0.0, reason)


def _nothing_to_gain(q: float) -> str:
    return f"the reward gradient vanishes (g'H^-1 g = {q:.3g}) and the policy is feasible: nothing to gain"


def _step(case: StepCase, lam: float, nu: float = 0.0) -> StepSolution:
    return StepSolution(case, lam, nu, 0.0, "")


def _recovery(scale: float) -> StepSolution:
    return StepSolution(StepCase.RECOVERY, math.nan, math.nan, scale, "")


def solve_constrained_step(q: float, r: float, s: float, c: float, eps: float, b_norm_sq: float) -> StepSolution:
    """Closed-form dual of ``max g'x  s.t.  x'Hx/2 <= eps,  c + b'x <= 0`` (CPO, §3.7).

    ``q = g'H^-1 g``, ``r = g'H^-1 b``, ``s = b'H^-1 b``, ``b_norm_sq = |b|^2`` (reported when the cost
    gradient vanishes). The primal solution is ``x = (H^-1 g - nu H^-1 b) / lam`` or, in the recovery
    case, ``x = -recovery_scale H^-1 b``.

    Contract (tests/test_core_math.py checks it in exact arithmetic): a returned step satisfies
    ``x'Hx/2 <= eps (1 + 1e-6)`` and ``c + b'x <= 1e-6 max(|c|, sqrt(2 eps s))`` (``sqrt(2 eps s)`` is
    the most ``b'x`` can change inside the trust region), except the full-radius recovery step
    ``recovery_scale = sqrt(2 eps / s)``, returned only when no point of the region is feasible
    (``c >= sqrt(2 eps s)``). The corner cases:

    - the whole region is feasible (``c < 0`` and ``sqrt(2 eps s) <= -c``, which includes a vanishing
      cost gradient): the natural step (FEASIBLE), as in the paper. The authors' test ``|b|^2 <= 1e-8``
      is not used: with an ill-conditioned H, ``s`` can be far larger than ``|b|^2`` and the natural
      step then crosses a constraint that is only just satisfied;
    - ``s <= 1e-8`` otherwise: SKIPPED, "cost gradient vanishes" (its direction is round-off);
    - ``q <= 1e-8`` (the reward gradient vanishes; a negative ``q`` below ``-1e-8`` is a fault of H or CG):
      the reward gradient is taken as 0, so the step is the smallest that satisfies the constraint:
      none when ``c <= 0`` (SKIPPED), ``-(c/s) H^-1 b`` to the constraint boundary when ``c > 0``
      (RECOVERY), the full-radius recovery step when nothing is feasible;
    - g and b colinear in the H metric (``q - r^2/s <= 1e-6 q``): the step along ``H^-1 b`` that the
      exact dual tends to, without the vanishing ``lambda``: the natural step shortened to the
      constraint boundary when the reward rises along b and ``c < 0`` (CONSTRAINED, ``nu = 0``),
      ``-(c/s) H^-1 b`` when it rises along b and ``c > 0`` (RECOVERY), no step at ``c = 0`` (SKIPPED),
      the natural step when the reward falls along b (CONSTRAINED, ``nu = 0``);
    - any other numerical fault (NaN/inf, ``eps = 0``, negative ``q`` or ``s``) is SKIPPED with a
      reason instead of a NaN step (the authors' code has no such guard).
    """
    values = {"q": q, "r": r, "s": s, "c": c, "eps": eps, "|b|^2": b_norm_sq}
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        return _skip(f"non-finite {', '.join(bad)} (conjugate gradient diverged?)")
    if eps <= 1e-12:  # below this the step underflows
        return _skip("trust region radius is zero (behaviour data too far from the policy)")
    for name, value, grad in (("g'H^-1 g", q, "reward"), ("b'H^-1 b", s, "cost")):
        if value < -_TINY:
            return _skip(
                f"{name} = {value:.3g} < 0: the Fisher-vector product is not positive definite along the "
                f"{grad} gradient (or conjugate gradient failed)"
            )

    reach = math.sqrt(2.0 * eps * max(s, 0.0))  # max of |b'x| over the trust region
    reward_vanishes = q <= _TINY
    if c < 0.0 and reach <= -c:  # = the paper's "c < 0 and B <= 0": every point of the region is feasible
        if reward_vanishes:
            return _skip(_nothing_to_gain(q))
        return _step(StepCase.FEASIBLE, math.sqrt(q / (2.0 * eps)))
    if s <= _TINY:
        return _skip(
            f"the cost gradient vanishes (b'H^-1 b = {s:.3g}, |b|^2 = {b_norm_sq:.3g}) while the constraint is "
            f"violated or within reach of its limit (c = {c:.3g})"
        )
    if c >= reach:  # the paper's "c >= 0 and B <= 0": no point of the region is feasible
        return _recovery(math.sqrt(2.0 * eps / s))
    # From here on |c| < reach: the constraint plane cuts the trust region (B > 0).
    if reward_vanishes:
        if c / s <= 0.0:  # c <= 0, or a positive c so small that the step underflows
            return _skip(_nothing_to_gain(q))
        return _recovery(c / s)
    lam_natural = math.sqrt(q / (2.0 * eps))
    big_a = q - r * r / s
    if big_a <= _COLINEAR * q:
        if r < 0.0:  # the natural step lowers the cost too; it is feasible since c < reach
            return _step(StepCase.CONSTRAINED, lam_natural)
        # up the cost gradient to the constraint boundary: b'x = r / lam = -c (unless -c is so small,
        # e.g. subnormal, that r / -c overflows: then the boundary is where the policy already is)
        if c < 0.0 and math.isfinite(-r / c):
            return _step(StepCase.CONSTRAINED, max(lam_natural, -r / c))
        if c / s > 0.0:  # every reward gain costs CVaR: only back to the boundary
            return _recovery(c / s)
        return _skip(
            f"the reward gradient points along the cost gradient and the constraint is at its limit (c = {c:.3g}): "
            "no step raises the reward without raising the CVaR"
        )

    big_b = 2.0 * eps - c * c / s
    # Split lam >= 0 at the point where lam c + r changes sign (nu > 0 on one side only).
    if abs(c) > _TINY:
        boundary = max(0.0, -r / c)
        if c > 0.0:
            interval_a, interval_b = (boundary, math.inf), (0.0, boundary)
        else:
            interval_a, interval_b = (0.0, boundary), (boundary, math.inf)
    elif r > 0.0:
        interval_a, interval_b = (0.0, math.inf), (0.0, 0.0)
    else:
        interval_a, interval_b = (0.0, 0.0), (0.0, math.inf)

    lam_a = min(max(math.sqrt(big_a / big_b), interval_a[0]), interval_a[1])
    lam_b = min(max(lam_natural, interval_b[0]), interval_b[1])

    def f_a(lam: float) -> float:
        return -0.5 * (big_a / lam + big_b * lam) + r * c / s if lam > 0.0 else -math.inf

    def f_b(lam: float) -> float:
        return -0.5 * (q / lam + 2.0 * eps * lam) if lam > 0.0 else -math.inf

    lam = lam_a if f_a(lam_a) >= f_b(lam_b) else lam_b
    if not (lam > 0.0 and math.isfinite(lam)):
        return _skip(f"dual gave lambda = {lam}")
    nu = max(0.0, lam * c + r) / s
    return _step(StepCase.CONSTRAINED, lam, nu)


def kl_hessian_vector_product(
    kl: th.Tensor, params: list[th.nn.Parameter], damping: float
) -> Callable[[th.Tensor], th.Tensor]:
    """``v -> (H + damping I) v`` with ``H`` the Hessian of ``kl`` w.r.t. ``params`` (double backprop).

    ``kl`` must still hold its graph; the gradient is built once and reused by every product.
    """
    grads = th.autograd.grad(kl, params, create_graph=True, retain_graph=True)
    kl_grad = th.cat([grad.reshape(-1) for grad in grads])

    def product(vector: th.Tensor) -> th.Tensor:
        hvp = th.autograd.grad(th.dot(kl_grad, vector), params, retain_graph=True)
        return th.cat([h.reshape(-1) for h in hvp]) + damping * vector

    return product


def gaussian_fisher_vector_product(
    mean: th.Tensor, std: th.Tensor, params: list[th.nn.Parameter], damping: float
) -> Callable[[th.Tensor], th.Tensor]:
    """``v -> (F + damping I) v`` with ``F = mean_s J' M J`` the Fisher matrix of a diagonal Gaussian policy.

    ``mean`` and ``std`` are the policy outputs at ``theta_k`` (with their graph), ``J`` their Jacobian
    w.r.t. ``params`` and ``M = diag(1/std^2, 2)`` the Fisher of N(mean, std) in (mean, log std).
    At ``theta = theta_k`` this *is* the Hessian of ``mean KL(pi_k || pi_theta)`` (the term with the
    outputs' second derivatives is multiplied by the KL's gradient, which vanishes there), but it
    costs two linear passes instead of differentiating a gradient graph: about 1.5x faster here.
    ``J v`` comes from the double-vjp trick: ``J' u`` is linear in a dummy ``u``, so differentiating
    ``(J' u) . v`` w.r.t. ``u`` gives ``J v``.
    """
    outputs = th.cat([mean, th.log(std)], dim=-1)
    weight = th.cat([1.0 / std.detach() ** 2, th.full_like(std, 2.0)], dim=-1) / outputs.shape[0]
    dummy = th.zeros_like(outputs, requires_grad=True)
    jt_dummy = th.autograd.grad(outputs, params, grad_outputs=dummy, create_graph=True)
    jt_dummy_flat = th.cat([g.reshape(-1) for g in jt_dummy])

    def product(vector: th.Tensor) -> th.Tensor:
        (jv,) = th.autograd.grad(jt_dummy_flat, dummy, grad_outputs=vector, retain_graph=True)
        grads = th.autograd.grad(outputs, params, grad_outputs=weight * jv, retain_graph=True)
        return th.cat([g.reshape(-1) for g in grads]) + damping * vector

    return product


def fisher_cosine(
    hessian_vector_product: Callable[[th.Tensor], th.Tensor], first: th.Tensor, second: th.Tensor, max_iter: int
) -> float:
    """``b1' H^-1 b2 / sqrt(b1' H^-1 b1 b2' H^-1 b2)``: the cosine of two gradients in the metric of the
    step (``H^-1`` by conjugate gradients of ``max_iter`` iterations, as the step solves it; they
    start from random numbers drawn from torch's global generator). NaN if ``H`` is not positive
    along either gradient."""
    h_first = conjugate_gradient_solver(hessian_vector_product, first, max_iter=max_iter)
    h_second = conjugate_gradient_solver(hessian_vector_product, second, max_iter=max_iter)
    scale = float(th.dot(first, h_first)) * float(th.dot(second, h_second))
    return float(th.dot(first, h_second)) / math.sqrt(scale) if scale > 0 else math.nan


def multiplier_step(q: float, r: float, s: float, weight: float, eps: float) -> tuple[float, float] | None:
    """``(a, c)`` of the step ``x = a H^-1 g - c H^-1 b`` that maximises ``(g / sqrt(q) - weight b / sqrt(s))' x``
    subject to ``x'Hx/2 <= eps`` (``cost_step="multiplier"``).

    Both gradients are scaled to unit length in the metric of the step, so ``weight`` is the cost
    direction's share relative to the reward direction's, whatever the two surrogates' units: 0 is
    the natural reward step, 1 bisects the two directions, a large weight tends to the full-radius
    recovery step. The step spends the whole radius: ``x = sqrt(2 eps / m) (H^-1 g / sqrt(q) - weight
    H^-1 b / sqrt(s))`` with ``m = 1 + weight^2 - 2 weight r / sqrt(q s)`` its squared length. A
    gradient with ``q`` (or ``s``) at or below 1e-8 carries no direction and drops out. ``None``
    when nothing is left to step along (both drop out, ``weight = 0`` with a vanishing reward
    gradient, or a non-finite input).
    """
    if not all(math.isfinite(value) for value in (q, r, s, weight, eps)) or eps <= 0.0 or weight < 0.0:
        return None
    unit_g = 1.0 / math.sqrt(q) if q > _TINY else 0.0
    unit_b = weight / math.sqrt(s) if s > _TINY else 0.0
    # squared length of H^-1 g unit_g - H^-1 b unit_b in the metric H
    length_sq = unit_g**2 * q + unit_b**2 * s - 2.0 * unit_g * unit_b * r
    if not length_sq > _TINY:
        return None
    scale = math.sqrt(2.0 * eps / length_sq)
    return scale * unit_g, scale * unit_b


def update_cost_multiplier(weight: float, step_cost: float, cost_limit: float, lr: float, max_weight: float) -> float:
    """One projected step of the cost direction's weight on the measured cost:
    ``clip(weight + lr (step_cost - cost_limit) / cost_limit, 0, max_weight)``.

    ``step_cost`` is the mean cost per step measured on the newest windows and ``cost_limit`` the
    per-step limit ``d`` (> 0): the weight rises while the measured cost is above the limit and falls
    while it is below, as a Lagrange multiplier does, by ``lr`` times the relative excess. The
    excess is not clipped: the weight settles where the *mean* measured cost is at the limit. (A
    first version clipped it to [-1, 1]; with episode costs skewed, as on the Goal tasks, that
    settles where the median window is at the limit and the mean above it: docs/diagnosis.md,
    finding 34.) A non-finite ``step_cost`` leaves the weight as it is.
    """
    if cost_limit <= 0.0:
        raise ValueError(f"the cost multiplier needs a positive cost limit, got {cost_limit}")
    if not math.isfinite(step_cost):
        return weight
    return min(max_weight, max(0.0, weight + lr * (step_cost - cost_limit) / cost_limit))
