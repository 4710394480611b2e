"""Off-policy lambda-targets for the reward, cost-mean and cost-variance critics (ALGORITHM.md §3.3).

All three recursions have the form ``x_t = a_t + b_t * x_{t+1}`` with ``x_T = 0``; they are solved
with a log-depth parallel scan instead of a per-step Python loop, so a batch of 5000 transitions
costs about thirteen vector operations.
"""

from __future__ import annotations

from typing import NamedTuple

import torch as th


def linear_recurrence_backward(a: th.Tensor, b: th.Tensor) -> th.Tensor:
    """Solve ``x_t = a_t + b_t x_{t+1}`` backwards along dim 0 with ``x_T = 0``.

    Hillis-Steele doubling: after the step with shift ``s`` each entry holds ``(A_t, B_t)`` such that
    ``x_t = A_t + B_t x_{t+s}``; composing two such maps is ``(A_t + B_t A_{t+s}, B_t B_{t+s})``.
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    acc_a, acc_b = a.clone(), b.clone()
    length = a.shape[0]
    shift = 1
    while shift < length:
        tail_a = th.zeros_like(acc_a)
        tail_b = th.zeros_like(acc_b)
        tail_a[: length - shift] = acc_a[shift:]
        tail_b[: length - shift] = acc_b[shift:]
        acc_a = acc_a + acc_b * tail_a
        acc_b = acc_b * tail_b
        shift *= 2
    return acc_a


class OffPolicyTargets(NamedTuple):
    """Targets and advantages for one batch (each shaped like the inputs)."""

    reward_target: th.Tensor  # y_t for V_R
    reward_advantage: th.Tensor  # A_t = y_t - V_R(s_t)
    cost_target: th.Tensor  # y^C_t for V_C
    cost_advantage: th.Tensor  # A^C_t
    var_target: th.Tensor  # z_t, the cost-return variance target (may be negative before clamping)
    var_advantage: th.Tensor  # A^S_t = z_t - Var_C(s_t)


def offpolicy_targets(
    rewards: th.Tensor,
    costs: th.Tensor,
    dones: th.Tensor,
    fails: th.Tensor,
    rho: th.Tensor,
    reward_values: th.Tensor,
    next_reward_values: th.Tensor,
    cost_values: th.Tensor,
    next_cost_values: th.Tensor,
    cost_vars: th.Tensor,
    next_cost_vars: th.Tensor,
    gamma: float,
    gae_lambda: float,
    cost_gae_lambda: float | None = None,
    cost_gamma: float | None = None,
) -> OffPolicyTargets:
    """Retrace-style lambda-targets over contiguous windows laid along dim 0.

    ``dones`` (episode ended, or the window ends: the recursion is cut there) and ``fails``
    (terminated: no bootstrap from ``s'``) are 0/1 floats. ``rho`` is the truncated importance weight
    ``min(1, pi_k / mu)``. With ``rho = 1`` the reward and cost targets are GAE(lambda) returns.
    ``cost_gae_lambda`` (default: ``gae_lambda``) is the trace decay and ``cost_gamma`` (default:
    ``gamma``) the discount of the cost-mean and cost-variance recursions.
    """
    not_fail = 1.0 - fails
    trace = gae_lambda * rho
    # the cost-mean and cost-variance recursions may decay and discount faster than the reward's
    cost_trace = trace if cost_gae_lambda is None else cost_gae_lambda * rho
    gamma_c = gamma if cost_gamma is None else cost_gamma

    def _value_targets(
        x: th.Tensor, values: th.Tensor, next_values: th.Tensor, trace: th.Tensor, discount: float
    ) -> tuple[th.Tensor, th.Tensor]:
        carry = discount * (1.0 - dones)
        one_step = x + discount * not_fail * next_values
        # delta_t = lambda rho_t (one_step_t - V_t + gamma (1 - done_t) delta_{t+1})
        delta = linear_recurrence_backward(trace * (one_step - values), trace * carry)
        shifted = th.zeros_like(delta)
        shifted[:-1] = delta[1:]
        target = one_step + carry * shifted
        return target, target - values

    y_r, adv_r = _value_targets(rewards, reward_values, next_reward_values, trace, gamma)
    y_c, adv_c = _value_targets(costs, cost_values, next_cost_values, cost_trace, gamma_c)

    one_step_var = (
        (costs + gamma_c * not_fail * next_cost_values) ** 2 - cost_values**2 + gamma_c**2 * not_fail * next_cost_vars
    )
    carry_var = gamma_c**2 * (1.0 - dones)
    eta = linear_recurrence_backward(cost_trace * (one_step_var - cost_vars), cost_trace * carry_var)
    shifted_eta = th.zeros_like(eta)
    shifted_eta[:-1] = eta[1:]
    z = one_step_var + carry_var * shifted_eta
    return OffPolicyTargets(y_r, adv_r, y_c, adv_c, z, z - cost_vars)
