"""Policies of the Lagrangian baselines: SB3's SAC / PPO policies with one more critic for the cost."""

from __future__ import annotations

from typing import Any

import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy, BaseModel, ContinuousCritic
from stable_baselines3.common.torch_layers import create_mlp
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.sac.policies import SACPolicy
from torch import nn


class SACLagrangianPolicy(SACPolicy):
    """SAC's actor and twin reward Q-critics plus a cost Q-critic ensemble ``Q_C(s, a)`` and its target.

    The cost critic has the same architecture and number of members (``n_critics``) as the reward
    critic, its own optimiser (``cost_critic.optimizer``) and its own Polyak target. All other
    parameters are SAC's (:class:`stable_baselines3.sac.policies.SACPolicy`).
    """

    cost_critic: ContinuousCritic
    cost_critic_target: ContinuousCritic

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)
        if self.share_features_extractor:
            self.cost_critic = self.make_critic(features_extractor=self.actor.features_extractor)
            # as for the reward critic: the shared extractor is trained by the actor loss only
            cost_params = [p for name, p in self.cost_critic.named_parameters() if "features_extractor" not in name]
        else:
            self.cost_critic = self.make_critic(features_extractor=None)
            cost_params = list(self.cost_critic.parameters())
        self.cost_critic_target = self.make_critic(features_extractor=None)
        self.cost_critic_target.load_state_dict(self.cost_critic.state_dict())
        self.cost_critic.optimizer = self.optimizer_class(
            cost_params,
            lr=lr_schedule(1),  # type: ignore[call-arg]
            **self.optimizer_kwargs,
        )
        self.cost_critic_target.set_training_mode(False)

    def set_training_mode(self, mode: bool) -> None:
        super().set_training_mode(mode)
        self.cost_critic.set_training_mode(mode)


class PPOLagrangianPolicy(ActorCriticPolicy):
    """PPO's actor-critic plus a cost value network ``V_C(s)``.

    ``V_C`` is a separate MLP (layers ``cost_net_arch``, default: the value network's ``vf``
    layers) on the value features; it is part of ``self.parameters()`` and so trained by the same
    optimiser as the rest of the policy. Other parameters: see
    :class:`stable_baselines3.common.policies.ActorCriticPolicy`.

    :param cost_net_arch: hidden layer sizes of the cost value network.
    """

    def __init__(self, *args: Any, cost_net_arch: list[int] | None = None, **kwargs: Any) -> None:
        self.cost_net_arch = cost_net_arch
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        if self.cost_net_arch is None:
            arch = self.net_arch
            if isinstance(arch, dict):
                self.cost_net_arch = list(arch.get("vf", []))
            else:
                self.cost_net_arch = list(arch)
        self.cost_value_net = nn.Sequential(*create_mlp(self.features_dim, 1, self.cost_net_arch, self.activation_fn))
        if self.ortho_init:
            # same gains as SB3 uses for its value branch: sqrt(2) hidden, 1 for the output
            self.cost_value_net.apply(lambda m: self.init_weights(m, gain=2**0.5))
            self.init_weights(self.cost_value_net[-1], gain=1.0)
        # the parent builds everything else and the optimiser over self.parameters(), which now
        # includes the cost value network
        super()._build(lr_schedule)

    def predict_cost_values(self, obs: PyTorchObs) -> th.Tensor:
        """Cost value ``V_C(s)``, shape ``(batch, 1)``."""
        features = BaseModel.extract_features(self, obs, self.vf_features_extractor)
        return self.cost_value_net(features)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data["cost_net_arch"] = self.cost_net_arch
        return data
