"""Layer 1: the mathematics of Off-Policy TRC as pure tensor functions.

Nothing here knows about environments, replay buffers or SB3 base classes; every function is
unit-tested against an independent reference (a slow loop, numpy/scipy, Monte Carlo).
Section numbers refer to ``shared/ALGORITHM.md``.
"""

from sb3_offtrc.core.cvar import cvar_coefficient, gaussian_cvar
from sb3_offtrc.core.surrogates import (
    SurrogateConstants,
    action_value_cost_surrogates,
    action_value_gain,
    cost_surrogates,
    reward_surrogate,
)
from sb3_offtrc.core.targets import OffPolicyTargets, linear_recurrence_backward, offpolicy_targets
from sb3_offtrc.core.trust_region import (
    StepCase,
    StepSolution,
    adaptive_trust_region,
    diag_gaussian_kl,
    fisher_cosine,
    gaussian_fisher_vector_product,
    kl_hessian_vector_product,
    multiplier_step,
    solve_constrained_step,
    update_cost_multiplier,
)

__all__ = [
    "OffPolicyTargets",
    "StepCase",
    "StepSolution",
    "SurrogateConstants",
    "action_value_cost_surrogates",
    "action_value_gain",
    "adaptive_trust_region",
    "cost_surrogates",
    "cvar_coefficient",
    "diag_gaussian_kl",
    "fisher_cosine",
    "gaussian_cvar",
    "gaussian_fisher_vector_product",
    "kl_hessian_vector_product",
    "linear_recurrence_backward",
    "multiplier_step",
    "offpolicy_targets",
    "reward_surrogate",
    "solve_constrained_step",
    "update_cost_multiplier",
]
