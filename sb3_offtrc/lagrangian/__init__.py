"""Lagrangian safe-RL baselines as small SB3 subclasses: :class:`SACLagrangian` and :class:`PPOLagrangian`.

Both read the step cost from ``info[cost_key]``, learn a cost critic and a multiplier
``lambda >= 0`` on the constraint ``E[sum_t gamma^t c_t] <= cost_limit / (1 - gamma)`` (the
per-step limit convention of OffTRC), and penalise the actor with ``lambda`` times the cost
objective, normalised by ``1 + lambda``.
"""

from sb3_offtrc.lagrangian.buffers import (
    CostReplayBufferSamples,
    CostRolloutBufferSamples,
    LagrangianReplayBuffer,
    LagrangianRolloutBuffer,
    generalised_advantages,
)
from sb3_offtrc.lagrangian.common import EpisodeCostTracker, LagrangeMultiplier, costs_from_infos
from sb3_offtrc.lagrangian.policies import PPOLagrangianPolicy, SACLagrangianPolicy
from sb3_offtrc.lagrangian.ppo_lagrangian import PPOLagrangian
from sb3_offtrc.lagrangian.sac_lagrangian import SACLagrangian

__all__ = [
    "CostReplayBufferSamples",
    "CostRolloutBufferSamples",
    "EpisodeCostTracker",
    "LagrangeMultiplier",
    "LagrangianReplayBuffer",
    "LagrangianRolloutBuffer",
    "PPOLagrangian",
    "PPOLagrangianPolicy",
    "SACLagrangian",
    "SACLagrangianPolicy",
    "costs_from_infos",
    "generalised_advantages",
]
