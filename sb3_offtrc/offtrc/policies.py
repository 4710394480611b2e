"""OffTRC policy: a squashed-mean Gaussian actor and the three state-value critics (ALGORITHM.md §2)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, FlattenExtractor, create_mlp
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn

# The authors initialise log-std at -1 for actions in [0, 1]; our policy acts in [-1, 1], where the
# same spread is twice as wide: -1 + ln 2.
DEFAULT_LOG_STD_INIT = -1.0 + math.log(2.0)


class GaussianActor(nn.Module):
    """Diagonal Gaussian with a tanh-squashed mean and a state-dependent, clamped log-std head."""

    def __init__(
        self,
        features_dim: int,
        action_dim: int,
        net_arch: list[int],
        activation_fn: type[nn.Module],
        log_std_init: float,
        log_std_bounds: tuple[float, float],
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(*create_mlp(features_dim, -1, net_arch, activation_fn))
        last = net_arch[-1] if net_arch else features_dim
        self.mean_head = nn.Linear(last, action_dim)
        self.log_std_head = nn.Linear(last, action_dim)
        self.log_std_bounds = log_std_bounds
        nn.init.orthogonal_(self.mean_head.weight, gain=0.01)
        nn.init.zeros_(self.mean_head.bias)
        nn.init.orthogonal_(self.log_std_head.weight, gain=0.01)
        nn.init.constant_(self.log_std_head.bias, log_std_init)

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """Mean in [-1, 1] and std, each shaped ``(batch, action_dim)``."""
        hidden = self.body(features)
        mean = th.tanh(self.mean_head(hidden))
        log_std = th.clamp(self.log_std_head(hidden), *self.log_std_bounds)
        return mean, log_std.exp()


def _leaky_relu(module: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    assert isinstance(module, nn.LeakyReLU)
    slope = np.float32(module.negative_slope)
    return lambda x: np.where(x >= 0.0, x, slope * x)


def _elu(module: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    assert isinstance(module, nn.ELU)
    alpha = np.float32(module.alpha)
    return lambda x: np.where(x > 0.0, x, alpha * np.expm1(np.minimum(x, 0.0)))


#: Activation modules the numpy actor reproduces, each mapped to a maker of its numpy function.
_NUMPY_ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module], Callable[[np.ndarray], np.ndarray]]] = {
    nn.ReLU: lambda _m: lambda x: np.maximum(x, 0.0),
    nn.Tanh: lambda _m: np.tanh,
    nn.LeakyReLU: _leaky_relu,
    nn.ELU: _elu,
}


class NumpyActor:
    """A float32 numpy copy of a :class:`GaussianActor`, to act one env step at a time.

    At a batch of one observation every torch operator costs microseconds of dispatch, so the
    actor's forward pass took about 250 us per env step inside the collection loop, against about
    65 us for this copy (docs/speed.md). It computes the same function as the torch actor (float32,
    the same layers, squashing and log-std clamp) but is a *snapshot*: it must be taken again after
    the actor's parameters change. OffTRC takes one at the start of every rollout; the updates run
    between rollouts.
    """

    def __init__(
        self,
        layers: list[tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]]],
        mean_head: tuple[np.ndarray, np.ndarray],
        log_std_head: tuple[np.ndarray, np.ndarray],
        log_std_bounds: tuple[float, float],
    ) -> None:
        self.layers = layers
        self.mean_head = mean_head
        self.log_std_head = log_std_head
        self.log_std_bounds = log_std_bounds

    @classmethod
    def snapshot(cls, policy: OffTRCPolicy) -> NumpyActor | None:
        """The policy's actor as numpy arrays, or ``None`` when it is not a plain MLP on flattened
        (non-image) observations with a supported activation; the caller then uses torch."""
        space = policy.observation_space
        if (
            type(policy.features_extractor) is not FlattenExtractor
            or type(policy.actor) is not GaussianActor
            or not isinstance(space, spaces.Box)
            or (policy.normalize_images and is_image_space(space))
        ):
            return None

        def arrays(linear: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
            weight = linear.weight.detach().to("cpu", th.float32).numpy()
            return np.ascontiguousarray(weight.T), linear.bias.detach().to("cpu", th.float32).numpy().copy()

        modules = list(policy.actor.body)  # create_mlp's [Linear, activation] * n_layers
        if len(modules) % 2:
            return None
        layers = []
        for linear, activation in zip(modules[::2], modules[1::2], strict=True):
            make = _NUMPY_ACTIVATIONS.get(type(activation))
            if not isinstance(linear, nn.Linear) or linear.bias is None or make is None:
                return None
            layers.append((*arrays(linear), make(activation)))
        actor = policy.actor
        return cls(layers, arrays(actor.mean_head), arrays(actor.log_std_head), actor.log_std_bounds)

    def __call__(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean in [-1, 1] and std of the policy at a batch of raw VecEnv observations."""
        hidden = np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)
        for weight, bias, activation in self.layers:
            hidden = activation(hidden @ weight + bias)
        mean = np.tanh(hidden @ self.mean_head[0] + self.mean_head[1])
        log_std = np.clip(hidden @ self.log_std_head[0] + self.log_std_head[1], *self.log_std_bounds)
        return mean, np.exp(log_std)


def gaussian_log_prob(actions: th.Tensor, mean: th.Tensor, std: th.Tensor) -> th.Tensor:
    """Log-density of a diagonal Gaussian at (unclipped) ``actions``, summed over action dims."""
    z = (actions - mean) / std
    return th.sum(-0.5 * z * z - th.log(std) - 0.5 * math.log(2.0 * math.pi), dim=-1)


def gaussian_entropy(std: th.Tensor) -> th.Tensor:
    return th.sum(th.log(std) + 0.5 * math.log(2.0 * math.pi * math.e), dim=-1)


class ValueCritic(nn.Module):
    """State-value MLP ``V(s)``; ``positive=True`` puts a softplus on the output (the cost-std critic)."""

    def __init__(self, features_dim: int, net_arch: list[int], activation_fn: type[nn.Module], positive: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(*create_mlp(features_dim, 1, net_arch, activation_fn))
        self.positive = positive

    def forward(self, features: th.Tensor) -> th.Tensor:
        out = self.net(features).squeeze(-1)
        return nn.functional.softplus(out) if self.positive else out


class DynamicsModel(nn.Module):
    """One-step model of the features: ``f(s, a) = s + delta_scale * net(s, a)``.

    ``net`` is fitted to the per-dimension standardised change ``(s' - s) / delta_scale``, so that every
    feature counts alike whatever its scale; ``delta_scale`` (a buffer, saved with the model) is the
    change's std over the batch, set by ``set_delta_scale`` before each fit.
    """

    #: smallest ``delta_scale``: a feature that never changes keeps a target of zero, not 0 / 0
    min_delta_scale: float = 1e-6
    delta_scale: th.Tensor

    def __init__(self, features_dim: int, action_dim: int, net_arch: list[int], activation_fn: type[nn.Module]) -> None:
        super().__init__()
        self.net = nn.Sequential(*create_mlp(features_dim + action_dim, features_dim, net_arch, activation_fn))
        self.register_buffer("delta_scale", th.ones(features_dim))

    def set_delta_scale(self, delta: th.Tensor) -> None:
        self.delta_scale.copy_(th.clamp(delta.std(dim=0), min=self.min_delta_scale))

    def forward(self, inputs: th.Tensor) -> th.Tensor:
        """The standardised change predicted from ``[features, action]`` side by side (what is fitted)."""
        return self.net(inputs)

    def next_features(self, features: th.Tensor, actions: th.Tensor) -> th.Tensor:
        return features + self.delta_scale * self.net(th.cat([features, actions], dim=-1))


#: How the action-value cost ``Q_C(s, a)`` is formed: ``"direct"`` an MLP on ``(s, a)``; ``"dynamics"``
#: ``U(f(s, a))``, a critic of the state after the step through a one-step model of the features
COST_Q_FORMS = ("direct", "dynamics")


class OffTRCPolicy(BasePolicy):
    """Actor and distributional cost critic of Off-Policy TRC.

    :param observation_space: Observation space (``Box``)
    :param action_space: Action space (``Box``; the policy acts in [-1, 1] and SB3 rescales)
    :param lr_schedule: Learning-rate schedule of the three critic optimisers
    :param net_arch: Hidden layers, either a list shared by actor and critics or
        ``dict(pi=[...], vf=[...])``. Default ``[512, 512]`` (the authors').
    :param activation_fn: Activation function (default ReLU, the authors')
    :param log_std_init: Initial log-std in [-1, 1] action units (default ``-1 + ln 2``, i.e. the
        authors' -1 in [0, 1] units)
    :param log_std_bounds: Clamp of the log-std head in [0, 1] units shifted to [-1, 1] units
    :param features_extractor_class: Features extractor (default flatten). It must have no trainable
        parameters (a frozen pretrained encoder is fine): OffTRC updates only the actor and critics
    :param features_extractor_kwargs: Its keyword arguments
    :param normalize_images: Whether to divide image observations by 255
    :param optimizer_class: Critic optimiser class (default Adam)
    :param optimizer_kwargs: Critic optimiser keyword arguments. With Adam and neither ``fused`` nor
        ``foreach`` given, ``fused=True`` is added (torch's single-kernel Adam step, same update)
    :param action_value_critics: Also build action-value critics ``Q_R(s, a)`` and ``Q_C(s, a)`` (MLPs
        on the features and the action), used by ``OffTRC(surrogate="action_value")``, which sets it
    :param cost_q_target_network: Also keep a slowly following copy of ``Q_C`` (``cost_q_critic_target``),
        the bootstrap of ``OffTRC(cost_q_target="td")``, which sets it
    :param n_q_critics: Action-value critics per side, 1 or 2 (``OffTRC(n_q_critics=...)`` sets it). With
        2, ``action_values`` gives the smaller reward and the larger cost value of the pair
    :param cost_q_form: ``"direct"`` (default): ``Q_C(s, a)`` is an MLP on the features and the action;
        ``"dynamics"``: ``Q_C(s, a) = U(f(s, a))``, with ``f`` a one-step model of the features
        (``dynamics_model``) and ``U`` a critic of the features after the step (``post_cost_critic``);
        ``OffTRC(cost_q_form=...)`` sets it
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        log_std_init: float = DEFAULT_LOG_STD_INIT,
        log_std_bounds: tuple[float, float] = (-4.0 + math.log(2.0), 2.0 + math.log(2.0)),
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        action_value_critics: bool = False,
        cost_q_target_network: bool = False,
        n_q_critics: int = 1,
        cost_q_form: str = "direct",
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            features_extractor_class,
            features_extractor_kwargs,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            squash_output=True,  # actions live in [-1, 1]; predict() rescales them to [low, high]
            normalize_images=normalize_images,
        )
        if net_arch is None:
            net_arch = [512, 512]
        if isinstance(net_arch, dict):
            actor_arch, critic_arch = list(net_arch["pi"]), list(net_arch["vf"])
        else:
            actor_arch, critic_arch = list(net_arch), list(net_arch)
        self.net_arch = net_arch
        self.activation_fn = activation_fn
        self.log_std_init = log_std_init
        self.log_std_bounds = tuple(log_std_bounds)

        self.features_extractor = self.make_features_extractor()
        trainable = [name for name, p in self.features_extractor.named_parameters() if p.requires_grad]
        if trainable:
            # Neither the trust-region step (over the actor's parameters) nor the critic fits (on
            # features computed without gradients) would update them: they would silently stay
            # at their random initialisation.
            raise ValueError(
                f"OffTRC does not train features-extractor parameters, but "
                f"{type(self.features_extractor).__name__} has trainable ones ({', '.join(trainable[:3])}"
                f"{', ...' if len(trainable) > 3 else ''}). Put those layers in net_arch instead, or freeze "
                "them in the extractor's __init__ (requires_grad_(False), e.g. for a pretrained encoder)."
            )
        features_dim = self.features_extractor.features_dim
        action_dim = int(spaces.flatdim(action_space))
        self.actor = GaussianActor(features_dim, action_dim, actor_arch, activation_fn, log_std_init, log_std_bounds)
        self.reward_critic = ValueCritic(features_dim, critic_arch, activation_fn, positive=False)
        self.cost_critic = ValueCritic(features_dim, critic_arch, activation_fn, positive=False)
        self.cost_std_critic = ValueCritic(features_dim, critic_arch, activation_fn, positive=True)
        self.action_value_critics = bool(action_value_critics)
        if cost_q_form not in COST_Q_FORMS:
            raise ValueError(f"cost_q_form must be one of {', '.join(map(repr, COST_Q_FORMS))}, got {cost_q_form!r}")
        if cost_q_form != "direct" and not action_value_critics:
            raise ValueError(f"cost_q_form={cost_q_form!r} needs action_value_critics=True (it forms Q_C)")
        self.cost_q_form = cost_q_form
        if self.action_value_critics:
            # Q(s, a): the same MLP on the features and the [-1, 1]-unit action side by side (unclipped unless
            # OffTRC(action_value_input="clipped"), which clips it to the box)
            self.reward_q_critic = ValueCritic(features_dim + action_dim, critic_arch, activation_fn, positive=False)
            if cost_q_form == "direct":
                self.cost_q_critic = ValueCritic(features_dim + action_dim, critic_arch, activation_fn, positive=False)
            else:
                self.dynamics_model = DynamicsModel(features_dim, action_dim, critic_arch, activation_fn)
                self.post_cost_critic = ValueCritic(features_dim, critic_arch, activation_fn, positive=False)
        if n_q_critics not in (1, 2) or isinstance(n_q_critics, bool):
            raise ValueError(f"n_q_critics must be 1 or 2, got {n_q_critics!r}")
        if n_q_critics == 2 and not self.action_value_critics:
            raise ValueError("n_q_critics=2 needs action_value_critics=True (it pairs Q_R and Q_C)")
        if n_q_critics == 2 and cost_q_form != "direct":
            raise ValueError(f"n_q_critics=2 pairs direct critics only, not cost_q_form={cost_q_form!r}")
        self.n_q_critics = int(n_q_critics)
        if self.n_q_critics == 2:
            # a second pair, initialised apart and fitted to the same targets (SAC's clipped pair)
            self.reward_q_critic_2 = ValueCritic(features_dim + action_dim, critic_arch, activation_fn, positive=False)
            self.cost_q_critic_2 = ValueCritic(features_dim + action_dim, critic_arch, activation_fn, positive=False)
        self.cost_q_target_network = bool(cost_q_target_network)
        if self.cost_q_target_network:
            if not self.action_value_critics or cost_q_form != "direct":
                raise ValueError(
                    "cost_q_target_network=True needs action_value_critics=True and cost_q_form='direct' (it "
                    "follows the MLP Q_C)"
                )
            self.cost_q_critic_target = copy.deepcopy(self.cost_q_critic).requires_grad_(False)

        # One optimiser per critic over its own parameters (the authors' torch port gives the
        # std critic's optimiser the mean critic's parameters; ALGORITHM.md §3.9).
        lr = lr_schedule(1)
        kwargs = dict(self.optimizer_kwargs)
        if optimizer_class is th.optim.Adam and not {"fused", "foreach"} & kwargs.keys():
            # Adam's element-wise step as one kernel per tensor, not a dozen operators: the same
            # update (up to float rounding), ~10% of a cpu-preset critic fit saved (docs/speed.md).
            kwargs["fused"] = True
        self.reward_optimizer = optimizer_class(  # type: ignore[call-arg]
            self.reward_critic.parameters(), lr=lr, **kwargs
        )
        self.cost_optimizer = optimizer_class(  # type: ignore[call-arg]
            self.cost_critic.parameters(), lr=lr, **kwargs
        )
        self.cost_std_optimizer = optimizer_class(  # type: ignore[call-arg]
            self.cost_std_critic.parameters(), lr=lr, **kwargs
        )
        if self.action_value_critics:
            self.reward_q_optimizer = optimizer_class(  # type: ignore[call-arg]
                self.reward_q_critic.parameters(), lr=lr, **kwargs
            )
        if self.action_value_critics and cost_q_form == "direct":
            self.cost_q_optimizer = optimizer_class(  # type: ignore[call-arg]
                self.cost_q_critic.parameters(), lr=lr, **kwargs
            )
        if self.action_value_critics and cost_q_form == "dynamics":
            self.dynamics_optimizer = optimizer_class(  # type: ignore[call-arg]
                self.dynamics_model.parameters(), lr=lr, **kwargs
            )
            self.post_cost_optimizer = optimizer_class(  # type: ignore[call-arg]
                self.post_cost_critic.parameters(), lr=lr, **kwargs
            )
        if self.n_q_critics == 2:
            self.reward_q_optimizer_2 = optimizer_class(  # type: ignore[call-arg]
                self.reward_q_critic_2.parameters(), lr=lr, **kwargs
            )
            self.cost_q_optimizer_2 = optimizer_class(  # type: ignore[call-arg]
                self.cost_q_critic_2.parameters(), lr=lr, **kwargs
            )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            net_arch=self.net_arch,
            activation_fn=self.activation_fn,
            log_std_init=self.log_std_init,
            log_std_bounds=self.log_std_bounds,
            features_extractor_class=self.features_extractor_class,
            features_extractor_kwargs=self.features_extractor_kwargs,
            optimizer_class=self.optimizer_class,
            optimizer_kwargs=self.optimizer_kwargs,
            lr_schedule=self._dummy_schedule,
            action_value_critics=self.action_value_critics,
            cost_q_target_network=self.cost_q_target_network,
            n_q_critics=self.n_q_critics,
            cost_q_form=self.cost_q_form,
        )
        return data

    @staticmethod
    def _dummy_schedule(_progress: float) -> float:
        return 0.0

    @property
    def critic_optimizers(self) -> list[th.optim.Optimizer]:
        optimizers = [self.reward_optimizer, self.cost_optimizer, self.cost_std_optimizer]
        if self.action_value_critics:
            optimizers.append(self.reward_q_optimizer)
            if self.cost_q_form == "direct":
                optimizers.append(self.cost_q_optimizer)
            else:
                optimizers += [self.dynamics_optimizer, self.post_cost_optimizer]
        if self.n_q_critics == 2:
            optimizers += [self.reward_q_optimizer_2, self.cost_q_optimizer_2]
        return optimizers

    def features(self, obs: th.Tensor) -> th.Tensor:
        return self.extract_features(obs, self.features_extractor)

    def distribution(self, obs: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """Mean and std of ``pi(.|obs)`` in [-1, 1] action units (obs already preprocessed as a tensor)."""
        return self.actor(self.features(obs))

    def values(self, obs: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """``V_R(s)``, ``V_C(s)`` and ``S_C(s)`` (the cost-return std)."""
        feats = self.features(obs)
        return self.reward_critic(feats), self.cost_critic(feats), self.cost_std_critic(feats)

    def action_values(self, features: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """``Q_R(s, a)`` and ``Q_C(s, a)`` from the features of ``s`` (``action_value_critics=True`` only); with
        ``n_q_critics=2`` the smaller reward and the larger cost value of the two critics of each side; with
        ``cost_q_form="dynamics"`` ``Q_C(s, a) = U(f(s, a))``."""
        if not self.action_value_critics:
            raise ValueError("this policy has no action-value critics: build it with action_value_critics=True")
        inputs = th.cat([features, actions], dim=-1)
        q_r = self.reward_q_critic(inputs)
        if self.cost_q_form == "dynamics":
            q_c = self.post_cost_critic(self.dynamics_model.next_features(features, actions))
        else:
            q_c = self.cost_q_critic(inputs)
        if self.n_q_critics == 2:
            q_r = th.minimum(q_r, self.reward_q_critic_2(inputs))
            q_c = th.maximum(q_c, self.cost_q_critic_2(inputs))
        return q_r, q_c

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
        return self._predict(obs, deterministic=deterministic)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        assert isinstance(observation, th.Tensor)
        mean, std = self.distribution(observation)
        if deterministic:
            return mean
        # The env sees the clipped sample; the buffer keeps the unclipped one (OffTRC._sample_action).
        return th.clamp(mean + std * th.randn_like(mean), -1.0, 1.0)


MlpPolicy = OffTRCPolicy
