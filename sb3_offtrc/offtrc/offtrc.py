"""Off-Policy TRC as a Stable-Baselines3 ``OffPolicyAlgorithm`` (ALGORITHM.md §3).

This module is wiring: it collects behaviour-aware transitions, asks the replay buffer for windows
and calls the pure maths of :mod:`sb3_offtrc.core` for targets, surrogates and the step.
"""

from __future__ import annotations

import io
import math
import pathlib
import warnings
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.utils import conjugate_gradient_solver, flat_grad
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, RolloutReturn, Schedule, TrainFreq
from stable_baselines3.common.utils import polyak_update
from stable_baselines3.common.vec_env import VecEnv
from torch.nn.utils import clip_grad_norm_, parameters_to_vector, vector_to_parameters

from sb3_offtrc.common.replay_buffer_io import check_loaded_replay_buffer
from sb3_offtrc.core import (
    StepCase,
    StepSolution,
    SurrogateConstants,
    action_value_cost_surrogates,
    action_value_gain,
    adaptive_trust_region,
    cost_surrogates,
    cvar_coefficient,
    diag_gaussian_kl,
    fisher_cosine,
    gaussian_fisher_vector_product,
    multiplier_step,
    offpolicy_targets,
    reward_surrogate,
    solve_constrained_step,
    update_cost_multiplier,
)
from sb3_offtrc.core.surrogates import centred_corrections
from sb3_offtrc.cost_signal import CostReturnLimitMixin, EpisodeCostTracker, costs_from_infos, resolve_env_string
from sb3_offtrc.offtrc.buffers import CostReplayBuffer, WindowBatch
from sb3_offtrc.offtrc.policies import COST_Q_FORMS, NumpyActor, OffTRCPolicy, gaussian_entropy, gaussian_log_prob
from sb3_offtrc.validation import (
    check_finite_observation,
    check_float,
    check_int,
    check_model_zip,
    check_schedule,
)

SelfOffTRC = TypeVar("SelfOffTRC", bound="OffTRC")
#: the sources of the constraint's constants J_hat and V_hat (``OffTRC(cost_estimate=...)``)
COST_ESTIMATES = ("window", "critic")
#: how the step's reward objective and expected-cost term are estimated (``OffTRC(surrogate=...)``)
SURROGATES = ("importance", "action_value")
COST_Q_TARGETS = ("retrace", "td")
ACTION_VALUE_INPUTS = ("action", "deviation", "clipped")
#: how the step weighs the cost direction (``OffTRC(cost_step=...)``)
COST_STEPS = ("dual", "multiplier")
#: the defaults of the options that only ``cost_step="multiplier"`` reads (as in ``OffTRC.__init__``)
COST_MULTIPLIER_DEFAULTS: dict[str, float] = {"cost_multiplier_lr": 0.1, "cost_multiplier_max": 10.0}


class OffTRC(CostReturnLimitMixin, OffPolicyAlgorithm):
    """Off-Policy Trust Region CVaR (Kim & Oh, RA-L 2022).

    Maximises return subject to ``CVaR_alpha(cost return) <= cost_limit / (1 - cost_gamma)`` with a
    trust-region step computed from off-policy data. Every ``n_steps`` environment steps one update
    takes the ``n_recent`` newest transitions plus older ones up to ``n_batch``, computes
    Retrace-style targets for the reward value, the cost-return mean and its variance, takes one
    constrained natural-gradient step on the policy and fits the three critics.

    :param policy: The policy model to use (``"MlpPolicy"`` or an ``OffTRCPolicy`` subclass)
    :param env: The environment to learn from (if registered in Gym, can be str); it must put the
        per-step cost into ``info[cost_key]``
    :param learning_rate: Critic learning rate (Adam); it can be a function of the remaining progress
    :param n_steps: Environment steps between two updates, summed over all env copies (must be a
        multiple of ``n_envs``)
    :param n_recent: Newest transitions per update (all env copies), used for the cost constants
    :param n_batch: Transitions per update: ``n_recent`` plus one random older window per env copy
    :param buffer_size: Replay buffer size (all env copies)
    :param gamma: Discount factor
    :param gae_lambda: Trace-decay lambda of the off-policy targets
    :param cost_gae_lambda: Trace-decay lambda of the cost-mean and cost-variance targets, or ``None``
        (default) for ``gae_lambda`` (the paper). A smaller value leans on the cost critics sooner:
        less variance in the cost advantages that steer the constraint, more bias (a deviation from
        the paper; docs/diagnosis.md).
    :param cost_gamma: Discount of the cost return, or ``None`` (default) for ``gamma`` (the paper).
        ``J_hat`` (mean step cost / (1 - cost_gamma)) and the limit ``D = d / (1 - cost_gamma)``
        scale alike, so the test ``J_hat <= D`` is unchanged; a smaller value credits each cost to
        fewer of the actions before it (less variance in the cost advantages, the cost of a shorter
        horizon; a deviation from the paper, docs/diagnosis.md).
    :param cost_limit: Per-step cost limit ``d``; the constraint is ``CVaR <= d / (1 - cost_gamma)``
    :param cvar_alpha: CVaR level in (0, 1]; 1.0 gives an expected-cost constraint
    :param cost_estimate: Where the constants ``J_hat`` and ``V_hat`` of the constraint come from:
        ``"window"`` (default, the paper): the recent windows' mean step cost / (1 - cost_gamma) and mean
        variance target; ``"critic"``: the cost critics' mean ``V_C(s)`` and ``S_C(s)^2`` over the
        recent windows' states. The critics average over the whole replay buffer, so the estimate
        does not jump with the hazards one short window happened to meet (a deviation from the
        paper; docs/diagnosis.md).
    :param surrogate: How the step's reward objective and the mean of its cost constraint depend on
        the policy: ``"importance"`` (default, the paper): importance-weighted advantages of the
        replayed actions (§3.5), whose gradient is a likelihood-ratio (score-function) estimate;
        ``"action_value"``: two more critics ``Q_R(s, a)`` and ``Q_C(s, a)`` are fitted to the same
        off-policy targets (``y_t`` is a target for the replayed action ``a_t``), and the surrogates
        are ``mean[Q(s, a_theta) - Q(s, a_k)]`` over the batch's states, with the reparameterised
        action ``a = mean(s) + std(s) eps`` and one noise draw per state and update: a pathwise
        gradient through the critics, as SAC's actor takes it. The reward surrogate is divided by
        the reward advantages' std, the cost term by ``1 - cost_gamma``; the CVaR's variance term
        stays importance-weighted. The trust region, the dual and the line search are unchanged
        (a deviation from the paper; docs/diagnosis.md).
    :param cost_q_target: How ``surrogate="action_value"`` fits its cost critic ``Q_C(s, a)``:
        ``"retrace"`` (default) on the off-policy cost targets the other critics get; ``"td"`` as
        SAC-Lagrangian fits its cost critic, on one-step targets ``c_t + cost_gamma (1 - fail_t)
        Q_C'(s_{t+1}, a')`` with ``a'`` drawn from the policy after the step and ``Q_C'`` a copy of
        ``Q_C`` that follows it by Polyak averaging (by 0.005 per Adam step, SAC's rate; the class
        attribute ``OffTRC.cost_q_tau``), in
        ``cost_q_gradient_steps`` minibatch steps per update drawn at random from the batch (a
        deviation from the paper; docs/diagnosis.md).
    :param action_value_input: What the action-value critics of ``surrogate="action_value"`` see beside
        the state: ``"action"`` (default) the replayed action ``a_t``; ``"deviation"`` its deviation
        ``a_t - mean_b(s_t)`` from the mean of the policy that took it (the exploration noise), and in
        the step the candidate policy's action less the current policy's mean. Each window is one
        policy, so the action tells the critics which policy acted, and through it how lucky that
        policy's episode was; the deviation carries only what the noise did; ``"clipped"`` the action
        clipped to the action box, as the env executed it, in the fit and in the step alike: a
        sample beyond the box then has the edge's value and no slope, so that a step cannot gain on
        what the critics make of actions the env never executes, e.g. by widening the std (a
        deviation from the paper; docs/diagnosis.md).
    :param n_q_critics: Action-value critics per side for ``surrogate="action_value"``, 1 (default) or
        2: a second ``Q_R`` and ``Q_C``, initialised apart and fitted to the same targets; the step
        reads the smaller reward and the larger cost value of each pair, as SAC reads the smaller of
        its two critics, so that a step cannot gain on one critic's error alone (a deviation from the
        paper; docs/diagnosis.md).
    :param cost_q_form: How ``surrogate="action_value"`` forms its cost value ``Q_C(s, a)``: ``"direct"``
        (default) an MLP on the state and the action; ``"dynamics"`` ``U(f(s, a))``, where ``f`` is a
        one-step model of the (flattened) observation fitted on the batch's transitions (its change per
        dimension, standardised) and ``U`` a critic of the observation after the step fitted to the cost
        targets of the transitions into it. The step's cost slope in the action is then the model's,
        which the nearly deterministic physics pins down from the exploration noise alone, times the
        post-state critic's slope across states, instead of the direct critic's slope in the action,
        which the noisy cost returns leave unresolved (docs/diagnosis.md, finding 31). Not with
        ``cost_q_target="td"``, ``n_q_critics=2`` or ``action_value_input="deviation"`` (a deviation from
        the paper).
    :param cost_q_gradient_steps: Adam steps of the ``"td"`` cost-critic fit per update, each on
        ``critic_batch_size`` rows (256 if that is None); ``None`` (default): one per env step collected
        since the last update (``n_steps``), as SAC-Lagrangian takes them
    :param cost_step: How the step weighs the cost direction against the reward direction. ``"dual"``
        (default, the paper): the closed-form dual of the linear constraint model ``c + b'x <= 0``
        decides (feasible, constrained or recovery step), so the cost term's weight follows the
        step's *predicted* cost change. ``"multiplier"``: the step spends the whole radius along
        ``H^-1 g / sqrt(g'H^-1 g) - w H^-1 b / sqrt(b'H^-1 b)``, with a weight ``w >= 0`` that rises
        while the cost *measured* on the newest windows (mean cost per step) is above ``cost_limit``
        and falls while below, as a Lagrange multiplier does (``train/cost_multiplier``). The
        measured mean cost is what it holds at the limit, whatever ``cvar_alpha``.
    :param cost_multiplier_lr: Change of the weight ``w`` of ``cost_step="multiplier"`` per update for
        every 100% by which the measured cost exceeds (or falls short of) ``cost_limit``
    :param cost_multiplier_max: Largest weight ``w`` of ``cost_step="multiplier"``
    :param max_kl: Trust-region radius ``epsilon`` (mean KL between successive policies)
    :param adaptive_trust_region: Shrink the radius by the KL between the behaviour policies in the
        batch and the current policy (§3.6). ``False`` uses ``max_kl`` as is.
    :param damping: Damping added to the KL Hessian in the conjugate gradient
    :param cg_max_steps: Conjugate-gradient iterations
    :param line_search_decay: Step shrink factor of the backtracking line search
    :param line_search_max_iter: Maximum backtracking tries; after that the policy is kept
        unchanged and ``train/line_search_failed`` is 1
    :param n_critic_epochs: Passes over the batch per critic and update. With the default
        ``critic_batch_size=None`` each pass is one full-batch Adam step (the paper).
    :param critic_batch_size: Minibatch size of the critic fit, or ``None`` (default) for full-batch
        steps. With a size, every pass shuffles the batch and takes one Adam step per minibatch
        (a deviation from the paper, used by the ``cpu`` preset; docs/speed.md).
    :param fisher_fraction: Fraction of the batch's states, drawn at random each update, on which
        the Fisher-vector products of the conjugate gradient are computed. ``1.0`` (default) is
        the paper; the original TRPO implementation used 0.1. Gradients, surrogates and the line
        search always use the whole batch.
    :param cost_gradient_shrinkage: Shrink the CVaR gradient ``b`` towards zero by the share of it
        that two halves of the batch agree on, ``clip(b1' H^-1 b2 / b' H^-1 b, 0.01, 1)`` (a deviation
        from the paper; docs/diagnosis.md). With a noisy ``b`` the linearised constraint otherwise
        promises cost reductions that the step does not deliver. ``False`` (default) is the paper.
    :param weighted_baseline: Subtract the surrogates' batch baseline inside the importance weight,
        ``ratio w (A - mean(A w) / mean(w))``, instead of the paper's ``ratio (A w - mean(A w))``
        (a deviation from the paper; ALGORITHM.md §5, docs/diagnosis.md). The paper's form puts
        ``-m ratio`` on replayed rows that the current policy would almost never take, where
        ``ratio`` explodes for a small step and can carry the line search's checks to +-inf.
        ``False`` (default) is the paper.
    :param ent_coef: Weight of the policy's entropy in the reward objective of the step, as in SAC:
        the step maximises ``reward surrogate + ent_coef * H``, with ``H`` the mean Gaussian entropy
        over the batch's states (summed over action dimensions). ``0.0`` (default) is the paper.
        ``"auto"`` (or ``"auto_0.05"`` for another start than 0.01) learns the weight so that ``H``
        stays near ``target_entropy``: after every update ``log ent_coef`` moves by
        ``ent_coef_lr * (target_entropy - H) / action_dim``, kept within [1e-4, 10]. The entropy
        enters only the reward objective: a recovery step ignores it, and a constrained step trades
        it against the cost like any other gain (a deviation from the paper; docs/diagnosis.md).
    :param target_entropy: The entropy that a learned ``ent_coef`` aims at: ``"auto"`` (default)
        is SAC's ``-action_dim``; a Gaussian of std ``sigma`` (in the policy's [-1, 1] action units)
        has ``action_dim * (1.4189 + ln sigma)``, so ``-action_dim`` is about ``sigma = 0.089``
    :param ent_coef_lr: Step of ``log ent_coef`` per update and nat of entropy gap per action dimension
    :param max_grad_norm: Gradient-norm clip of each critic step
    :param cost_key: Key of the per-step cost in the env's ``info``
    :param check_observations: Refuse observations with NaN or inf entries, with an error naming the
        env copy and the components, during collection and in ``predict`` (``False``: let them through;
        the policy then acts, and stores, NaN)
    :param learning_starts: Steps to collect before the first update. Unlike SAC, OffTRC always acts
        with its Gaussian policy (uniform warm-up actions have no behaviour density to record).
    :param replay_buffer_kwargs: Keyword arguments of the ``CostReplayBuffer``
    :param stats_window_size: Window of the rollout logging averages
    :param tensorboard_log: The log location for tensorboard (if None, no logging)
    :param policy_kwargs: Additional arguments for the policy on creation
    :param verbose: Verbosity level: 0 no output, 1 info messages, 2 debug messages
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"MlpPolicy": OffTRCPolicy}
    #: Rows per chunk when the critic gradient is accumulated (an implementation detail: the step is
    #: the same full-batch Adam step whatever the value, up to float rounding).
    critic_chunk_size: ClassVar[int] = 2500
    policy: OffTRCPolicy
    replay_buffer: CostReplayBuffer  # type: ignore[assignment]

    def __init__(
        self,
        policy: str | type[OffTRCPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 3e-4,
        n_steps: int = 1000,
        n_recent: int = 1000,
        n_batch: int = 5000,
        buffer_size: int = 50_000,
        gamma: float = 0.99,
        gae_lambda: float = 0.97,
        cost_gae_lambda: float | None = None,
        cost_gamma: float | None = None,
        cost_limit: float = 0.025,
        cvar_alpha: float = 0.125,
        cost_estimate: str = "window",
        surrogate: str = "importance",
        cost_q_target: str = "retrace",
        cost_q_gradient_steps: int | None = None,
        action_value_input: str = "action",
        n_q_critics: int = 1,
        cost_q_form: str = "direct",
        cost_step: str = "dual",
        cost_multiplier_lr: float = 0.1,
        cost_multiplier_max: float = 10.0,
        max_kl: float = 0.001,
        adaptive_trust_region: bool = True,
        damping: float = 0.01,
        cg_max_steps: int = 10,
        line_search_decay: float = 0.8,
        line_search_max_iter: int = 15,
        n_critic_epochs: int = 100,
        critic_batch_size: int | None = None,
        fisher_fraction: float = 1.0,
        cost_gradient_shrinkage: bool = False,
        weighted_baseline: bool = False,
        ent_coef: float | str = 0.0,
        target_entropy: float | str = "auto",
        ent_coef_lr: float = 0.2,
        max_grad_norm: float = 1.0,
        cost_key: str = "cost",
        check_observations: bool = True,
        learning_starts: int = 0,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        try:
            super().__init__(
                policy,
                resolve_env_string(env),
                learning_rate,
                buffer_size=buffer_size,
                learning_starts=learning_starts,
                batch_size=n_batch,
                gamma=gamma,
                train_freq=1,  # replaced below once n_envs is known
                gradient_steps=1,
                replay_buffer_class=CostReplayBuffer,
                replay_buffer_kwargs=replay_buffer_kwargs,
                policy_kwargs=policy_kwargs,
                stats_window_size=stats_window_size,
                tensorboard_log=tensorboard_log,
                verbose=verbose,
                device=device,
                support_multi_env=True,
                seed=seed,
                sde_support=False,
                supported_action_spaces=None,  # checked below with a clearer message
            )
        except ValueError as exc:
            # SB3's "use MultiInputPolicy" hint (or "Policy MultiInputPolicy unknown"): OffTRC has none
            if "MultiInputPolicy" in str(exc):
                space = getattr(self, "observation_space", None) or getattr(env, "observation_space", None)
                raise _observation_space_error(space) from None
            raise
        # OffTRC.load() builds the model without an env: the spaces then come from the saved data.
        if getattr(self, "action_space", None) is not None and not isinstance(self.action_space, spaces.Box):
            raise ValueError(
                f"OffTRC needs a continuous (Box) action space, got {self.action_space}. Its policy is a "
                "Gaussian whose density must be recorded for every transition; for discrete actions use "
                "e.g. PPO/PPOLagrangian, or wrap the env with a continuous parametrisation of the actions."
            )
        if isinstance(getattr(self, "observation_space", None), spaces.Dict | spaces.Tuple):
            raise _observation_space_error(self.observation_space)
        self.n_steps = n_steps  # OffPolicyAlgorithm's n-step returns are not used (n_steps=1 there)
        self.n_recent = n_recent
        self.n_batch = n_batch
        self.gae_lambda = gae_lambda
        self.cost_gae_lambda = cost_gae_lambda
        self.cost_gamma = cost_gamma
        self.cost_limit = cost_limit
        self.cvar_alpha = cvar_alpha
        self.cost_estimate = cost_estimate
        self.surrogate = surrogate
        self.cost_q_target = cost_q_target
        self.cost_q_gradient_steps = cost_q_gradient_steps
        self.action_value_input = action_value_input
        self.n_q_critics = n_q_critics
        self.cost_q_form = cost_q_form
        self.cost_step = cost_step
        self.cost_multiplier_lr = cost_multiplier_lr
        self.cost_multiplier_max = cost_multiplier_max
        #: the weight of the cost direction of ``cost_step="multiplier"`` (saved with the model)
        self.cost_multiplier = 0.0
        self.max_kl = max_kl
        self.adaptive_trust_region = adaptive_trust_region
        self.damping = damping
        self.cg_max_steps = cg_max_steps
        self.line_search_decay = line_search_decay
        self.line_search_max_iter = line_search_max_iter
        self.n_critic_epochs = n_critic_epochs
        self.critic_batch_size = critic_batch_size
        self.fisher_fraction = fisher_fraction
        self.cost_gradient_shrinkage = cost_gradient_shrinkage
        self.weighted_baseline = weighted_baseline
        self.ent_coef = ent_coef
        self.target_entropy = target_entropy
        self.ent_coef_lr = ent_coef_lr
        #: the learned entropy weight's logarithm (``ent_coef="auto"``); set by ``_setup_model``
        self.log_ent_coef: float | None = None
        self.max_grad_norm = max_grad_norm
        self.cost_key = cost_key
        self.check_observations = check_observations
        self._check_hyperparameters()
        self._cost_tracker = EpisodeCostTracker(getattr(self, "n_envs", 1), stats_window_size)
        self._behaviour: tuple[np.ndarray, np.ndarray] | None = None
        # set for the duration of collect_rollouts only (a snapshot of the actor and its noise source)
        self._rollout_actor: NumpyActor | None = None
        self._rollout_rng: np.random.Generator | None = None
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------------------------ setup
    def _check_hyperparameters(self, after_load: bool = False) -> None:
        """Range checks of every hyperparameter, each error naming its argument.

        Run by ``__init__`` and again by ``_setup_model``, i.e. also after ``OffTRC.load`` has put the
        saved values, its keyword arguments and ``custom_objects`` in place.
        """
        owner = "OffTRC"
        check_schedule(owner, "learning_rate", self.learning_rate, allow_zero=after_load)
        for name, minimum in (
            ("n_steps", 1),
            ("n_recent", 1),
            ("n_batch", 1),
            ("buffer_size", 1),
            ("cg_max_steps", 1),
            ("line_search_max_iter", 1),
            ("n_critic_epochs", 1),
            ("learning_starts", 0),
        ):
            setattr(self, name, check_int(owner, name, getattr(self, name), minimum))
        if self.critic_batch_size is not None:
            self.critic_batch_size = check_int(owner, "critic_batch_size", self.critic_batch_size)
        if self.n_recent > self.n_batch:
            raise ValueError(f"n_recent={self.n_recent} cannot exceed n_batch={self.n_batch}")
        if self.n_batch > self.buffer_size:
            raise ValueError(f"n_batch={self.n_batch} cannot exceed buffer_size={self.buffer_size}")
        check_float(owner, "gamma", self.gamma, 0.0, 1.0, low_open=True, high_open=True)
        check_float(owner, "gae_lambda", self.gae_lambda, 0.0, 1.0)
        if self.cost_gae_lambda is not None:
            check_float(owner, "cost_gae_lambda", self.cost_gae_lambda, 0.0, 1.0)
        if self.cost_gamma is not None:
            check_float(owner, "cost_gamma", self.cost_gamma, 0.0, 1.0, low_open=True, high_open=True)
        check_float(owner, "cost_limit", self.cost_limit, 0.0, hint="it is the per-step cost limit d")
        cvar_coefficient(self.cvar_alpha)  # raises with its own message
        if self.cost_estimate not in COST_ESTIMATES:
            choices = ", ".join(map(repr, COST_ESTIMATES))
            raise ValueError(f"OffTRC: cost_estimate must be one of {choices}, got {self.cost_estimate!r}")
        if self.surrogate not in SURROGATES:
            choices = ", ".join(map(repr, SURROGATES))
            raise ValueError(f"OffTRC: surrogate must be one of {choices}, got {self.surrogate!r}")
        # models saved before the option existed load with the default
        self.cost_q_target = getattr(self, "cost_q_target", "retrace")
        self.cost_q_gradient_steps = getattr(self, "cost_q_gradient_steps", None)
        if self.cost_q_target not in COST_Q_TARGETS:
            choices = ", ".join(map(repr, COST_Q_TARGETS))
            raise ValueError(f"OffTRC: cost_q_target must be one of {choices}, got {self.cost_q_target!r}")
        mismatched = (self.cost_q_target != "retrace" and self.surrogate != "action_value") or (
            self.cost_q_gradient_steps is not None and self.cost_q_target != "td"
        )
        if after_load and mismatched:
            raise ValueError(
                f"OffTRC.load: surrogate={self.surrogate!r} with cost_q_target={self.cost_q_target!r} (and "
                f"cost_q_gradient_steps={self.cost_q_gradient_steps!r}) do not go together: a model keeps the "
                "surrogate, cost_q_target and n_q_critics it was built with (their critics are part of the "
                "policy). Load it without surrogate=... or cost_q_target=..., or train a new model with the "
                "settings you want."
            )
        if self.cost_q_target != "retrace" and self.surrogate != "action_value":
            raise ValueError(
                f"OffTRC: cost_q_target={self.cost_q_target!r} fits the action-value cost critic, which only "
                "surrogate='action_value' has: pass surrogate='action_value' as well, or leave cost_q_target out"
            )
        if self.cost_q_gradient_steps is not None:
            if self.cost_q_target != "td":
                raise ValueError(
                    "OffTRC: cost_q_gradient_steps sets the Adam steps of cost_q_target='td'; with "
                    f"cost_q_target={self.cost_q_target!r} it would do nothing: pass cost_q_target='td' or leave it out"
                )
            self.cost_q_gradient_steps = check_int(owner, "cost_q_gradient_steps", self.cost_q_gradient_steps)
        self.action_value_input = getattr(self, "action_value_input", "action")
        if self.action_value_input not in ACTION_VALUE_INPUTS:
            choices = ", ".join(map(repr, ACTION_VALUE_INPUTS))
            raise ValueError(f"OffTRC: action_value_input must be one of {choices}, got {self.action_value_input!r}")
        self.n_q_critics = getattr(self, "n_q_critics", 1)
        if isinstance(self.n_q_critics, bool) or self.n_q_critics not in (1, 2):
            raise ValueError(f"OffTRC: n_q_critics must be 1 or 2, got {self.n_q_critics!r}")
        self.cost_q_form = getattr(self, "cost_q_form", "direct")
        if self.cost_q_form not in COST_Q_FORMS:
            choices = ", ".join(map(repr, COST_Q_FORMS))
            raise ValueError(f"OffTRC: cost_q_form must be one of {choices}, got {self.cost_q_form!r}")
        # options of the action-value critics, set away from their defaults: they need those critics, and
        # they are built for the off-policy targets only (cost_q_target='td' draws its next action afresh)
        for name, value, default in (
            ("action_value_input", self.action_value_input, "action"),
            ("n_q_critics", self.n_q_critics, 1),
            ("cost_q_form", self.cost_q_form, "direct"),
        ):
            if value == default:
                continue
            if self.surrogate != "action_value":
                raise ValueError(
                    f"OffTRC: {name}={value!r} sets the action-value critics, which only surrogate='action_value' "
                    f"has: pass surrogate='action_value' as well, or leave {name} out"
                )
            if self.cost_q_target == "td":
                raise ValueError(
                    f"OffTRC: {name}={value!r} is built for the off-policy targets only, not for "
                    "cost_q_target='td': leave one of them out"
                )
        if self.cost_q_form != "direct":  # one critic of the replayed action: no pair, no other input
            for name, value, default in (
                ("n_q_critics", self.n_q_critics, 1),
                ("action_value_input", self.action_value_input, "action"),
            ):
                if value != default:
                    raise ValueError(
                        f"OffTRC: cost_q_form={self.cost_q_form!r} is built for a single critic of the replayed "
                        f"action, not for {name}={value!r}: leave one of them out"
                    )
        self.cost_step = getattr(self, "cost_step", "dual")
        if self.cost_step not in COST_STEPS:
            choices = ", ".join(map(repr, COST_STEPS))
            raise ValueError(f"OffTRC: cost_step must be one of {choices}, got {self.cost_step!r}")
        self.cost_multiplier = getattr(self, "cost_multiplier", 0.0)
        for option, default_number in COST_MULTIPLIER_DEFAULTS.items():
            number = getattr(self, option, default_number)  # absent from models saved before the option
            setattr(self, option, number)
            check_float(owner, option, number, 0.0, low_open=True)
            if self.cost_step == "dual" and number != default_number:
                raise ValueError(
                    f"OffTRC: {option}={number!r} sets the weight of cost_step='multiplier'; with cost_step='dual' "
                    f"it would do nothing: pass cost_step='multiplier' as well, or leave {option} out"
                )
        if self.cost_step == "multiplier" and self.cost_limit <= 0.0:
            raise ValueError(
                "OffTRC: cost_step='multiplier' moves its weight by the measured cost's excess relative to "
                f"cost_limit, which must then be > 0 (got {self.cost_limit}); use cost_step='dual' for a zero limit"
            )
        check_float(owner, "max_kl", self.max_kl, 0.0, low_open=True)
        check_float(owner, "damping", self.damping, 0.0, low_open=True)
        check_float(owner, "line_search_decay", self.line_search_decay, 0.0, 1.0, low_open=True, high_open=True)
        check_float(owner, "fisher_fraction", self.fisher_fraction, 0.0, 1.0, low_open=True)
        check_float(owner, "max_grad_norm", self.max_grad_norm, 0.0, low_open=True)
        self._entropy_settings()  # raises for a malformed ent_coef / target_entropy
        check_float(owner, "ent_coef_lr", self.ent_coef_lr, 0.0)
        if not isinstance(self.adaptive_trust_region, bool):
            raise TypeError(f"OffTRC: adaptive_trust_region must be True or False, got {self.adaptive_trust_region!r}")
        if not isinstance(self.check_observations, bool):
            raise TypeError(f"OffTRC: check_observations must be True or False, got {self.check_observations!r}")
        if not isinstance(self.cost_key, str) or not self.cost_key:
            raise TypeError(f"OffTRC: cost_key must be the non-empty info key of the step cost, got {self.cost_key!r}")

    def _check_env_copies(self) -> None:
        """The transition counts must split evenly over the env copies (known once an env is attached)."""
        n_envs = getattr(self, "n_envs", 1)
        for name in ("n_steps", "n_recent", "n_batch"):
            value = getattr(self, name)
            if value % n_envs != 0:
                raise ValueError(
                    f"{name}={value} must be a positive multiple of the number of env copies ({n_envs}): "
                    f"it counts transitions over all copies. Pass e.g. {name}={max(1, value // n_envs) * n_envs} "
                    f"to OffTRC(...), or to OffTRC.load(path, env, {name}=...) for a saved model"
                )

    def _entropy_settings(self) -> tuple[bool, float, float]:
        """(learned?, the fixed weight or the learned one's start, the target entropy), checked."""
        value, learned, start = self.ent_coef, False, 0.0
        if isinstance(value, str):
            head, _, tail = value.partition("_")
            try:
                start = float(tail) if tail else 0.01
            except ValueError:
                start = math.nan
            if head != "auto" or not (start > 0.0 and math.isfinite(start)):
                raise ValueError(
                    f"OffTRC: ent_coef must be a number >= 0, 'auto' or 'auto_<start>' with a positive start "
                    f"(e.g. 'auto_0.05'), got {value!r}"
                )
            learned = True
        else:
            start = check_float("OffTRC", "ent_coef", value, 0.0)
        target = self.target_entropy
        action_space = getattr(self, "action_space", None)
        if isinstance(target, str):
            if target != "auto":
                raise ValueError(f"OffTRC: target_entropy must be a number or 'auto' (-action_dim), got {target!r}")
            target = -float(np.prod(action_space.shape)) if action_space is not None else math.nan
        else:
            target = check_float("OffTRC", "target_entropy", target)
        return learned, start, target

    @property
    def _cost_discount(self) -> float:
        """The discount of the cost return: ``cost_gamma``, or ``gamma`` when it is None."""
        return self.gamma if self.cost_gamma is None else float(self.cost_gamma)

    @property
    def cost_return_limit(self) -> float:
        """``D = cost_limit / (1 - cost_gamma)``, the limit on the discounted cost return."""
        return self.cost_limit / (1.0 - self._cost_discount)

    #: bounds of a learned entropy weight
    ent_coef_bounds: ClassVar[tuple[float, float]] = (1e-4, 10.0)

    def _entropy_weight(self) -> float:
        learned, start, _ = self._entropy_settings()
        if learned and self.log_ent_coef is not None:
            return math.exp(self.log_ent_coef)
        return start

    def _adapt_entropy_weight(self, entropy: float) -> None:
        learned, _, target = self._entropy_settings()
        if not learned or self.log_ent_coef is None or not math.isfinite(entropy):
            return
        action_dim = float(np.prod(self.action_space.shape or (1,)))
        low, high = (math.log(bound) for bound in self.ent_coef_bounds)
        updated = self.log_ent_coef + self.ent_coef_lr * (target - entropy) / action_dim
        self.log_ent_coef = min(high, max(low, updated))

    def _setup_model(self) -> None:
        # OffTRC.load() skips __init__'s values: check what it put in place, now that n_envs is known
        # (__init__ has checked strictly already; after load a rate of 0 freezes the model)
        self._check_hyperparameters(after_load=True)
        self._check_env_copies()
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        if self.replay_buffer is None:
            self.replay_buffer = CostReplayBuffer(
                self.buffer_size,
                self.observation_space,
                self.action_space,
                device=self.device,
                n_envs=self.n_envs,
                **self.replay_buffer_kwargs,
            )
        policy_kwargs = dict(self.policy_kwargs)
        for key, instead in (
            ("action_value_critics", "surrogate='action_value'"),
            ("cost_q_target_network", "cost_q_target='td'"),
            ("n_q_critics", "n_q_critics"),
            ("cost_q_form", "cost_q_form"),
        ):
            if key in policy_kwargs:
                raise ValueError(
                    f"OffTRC builds the action-value critics itself: pass {instead} to OffTRC instead of {key} "
                    "in policy_kwargs"
                )
        if self.surrogate == "action_value":
            policy_kwargs["action_value_critics"] = True
        if self.cost_q_target == "td":
            policy_kwargs["cost_q_target_network"] = True
        if self.n_q_critics == 2:
            policy_kwargs["n_q_critics"] = 2
        if self.cost_q_form != "direct":
            policy_kwargs["cost_q_form"] = self.cost_q_form
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, **policy_kwargs
        )
        self.policy = self.policy.to(self.device)
        self.train_freq = (self.n_steps // self.n_envs, "step")
        self._convert_train_freq()
        learned, start, _ = self._entropy_settings()
        if learned and self.log_ent_coef is None:  # a loaded model keeps its learned weight
            self.log_ent_coef = math.log(start)

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, Any]:
        env_will_reset = reset_num_timesteps or self._last_obs is None
        if env_will_reset and self.replay_buffer is not None:
            # The stored trajectories stop here; without a cut the targets would run into the next episode.
            self.replay_buffer.mark_last_as_truncated()
        result = super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        if reset_num_timesteps:
            self._cost_tracker = EpisodeCostTracker(self.n_envs, self._stats_window_size)
        elif env_will_reset:
            self._cost_tracker.running = np.zeros(self.n_envs)  # the interrupted episodes are not counted
        return result

    @property
    def ep_cost_buffer(self) -> deque[float]:
        """Undiscounted costs of the last ``stats_window_size`` training episodes (``rollout/ep_cost_mean``)."""
        return self._cost_tracker.ep_costs

    def learn(
        self: SelfOffTRC,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "OffTRC",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfOffTRC:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    # ------------------------------------------------------------------------- data collection
    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        train_freq: TrainFreq,
        replay_buffer: ReplayBuffer,
        action_noise: ActionNoise | None = None,
        learning_starts: int = 0,
        log_interval: int | None = None,
    ) -> RolloutReturn:
        # The policy is fixed during a rollout (updates run between rollouts), so the actor can act
        # from a numpy snapshot: a quarter of the per-step cost of torch at batch size 1. Its noise
        # comes from a generator seeded by torch's, so SB3's seeding still fixes every sample.
        self._rollout_actor = NumpyActor.snapshot(self.policy)
        self._rollout_rng = np.random.default_rng(int(th.randint(0, 2**62, (1,)).item()))
        collected = self.num_timesteps % self.n_steps
        if collected:
            # Resumed mid-rollout (an interrupted run, a checkpoint saved between updates): collect only
            # what this rollout lacks, so that the updates fall on the same env steps (multiples of
            # n_steps) as in a run that was never stopped, and a budget that is such a multiple is met
            # exactly instead of up to n_steps past it.
            remaining = -(-(self.n_steps - collected) // self.n_envs)  # ceil: whole steps of every copy
            train_freq = TrainFreq(remaining, train_freq.unit)
        try:
            return super().collect_rollouts(
                env, callback, train_freq, replay_buffer, action_noise, learning_starts, log_interval
            )
        finally:
            self._rollout_actor = self._rollout_rng = None

    def _sample_action(
        self,
        learning_starts: int,
        action_noise: ActionNoise | None = None,
        n_envs: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        # SB3's default goes through predict(), which clips the sample and forgets the distribution;
        # the targets need the unclipped sample and the behaviour mean/std (SB3_NOTES.md).
        assert self._last_obs is not None, "self._last_obs was not set"
        assert isinstance(self._last_obs, np.ndarray)  # Dict observation spaces are refused in __init__
        if self.check_observations:
            self._check_observation(self._last_obs, f" at env step {self.num_timesteps}")
        if self._rollout_actor is not None and self._rollout_rng is not None:
            mean_np, std_np = self._rollout_actor(self._last_obs)
            sample_np = mean_np + std_np * self._rollout_rng.standard_normal(mean_np.shape, dtype=np.float32)
        else:
            with th.no_grad():
                # VecEnv observations are already batched: obs_to_tensor()'s checks are not needed here.
                mean, std = self.policy.distribution(th.as_tensor(self._last_obs, device=self.device))
                sample = mean + std * th.randn_like(mean)
            mean_np, std_np, sample_np = (x.cpu().numpy() for x in (mean, std, sample))
        sample_np = sample_np.reshape(n_envs, -1)
        self._behaviour = (mean_np.reshape(n_envs, -1), std_np.reshape(n_envs, -1))
        env_action = self.policy.unscale_action(np.clip(sample_np, -1.0, 1.0))
        return env_action, sample_np

    def _check_observation(self, obs: Any, where: str) -> None:
        shape = self.observation_space.shape or ()
        check_finite_observation(obs, shape, "OffTRC", where, "pass check_observations=False to OffTRC")

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        if self.check_observations and not isinstance(observation, dict):
            self._check_observation(observation, " given to predict()")
        return super().predict(observation, state, episode_start, deterministic)

    def _check_finite(self, name: str, values: np.ndarray) -> None:
        if np.isfinite(values).all():
            return
        idx = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ValueError(
            f"Non-finite {name} {values[idx]} at env step {self.num_timesteps} from env index {idx}; "
            f"OffTRC cannot learn from NaN/inf {name}s — check the environment (or its {name} wrapper)."
        )

    def _store_transition(
        self,
        replay_buffer: ReplayBuffer,
        buffer_action: np.ndarray,
        new_obs: np.ndarray | dict[str, np.ndarray],
        reward: np.ndarray,
        dones: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        assert isinstance(replay_buffer, CostReplayBuffer)
        assert self._behaviour is not None
        # checked there: a real, finite, non-negative number
        costs = costs_from_infos(infos, self.cost_key, owner="OffTRC", env_step=self.num_timesteps).astype(np.float64)
        if self._vec_normalize_env is not None:
            new_obs_ = self._vec_normalize_env.get_original_obs()
            reward_ = self._vec_normalize_env.get_original_reward()
        else:
            self._last_original_obs, new_obs_, reward_ = self._last_obs, new_obs, reward
        self._check_finite("reward", np.asarray(reward_, dtype=np.float64))

        assert isinstance(new_obs_, np.ndarray)
        next_obs = new_obs_.copy()
        for i in np.flatnonzero(dones):
            terminal = infos[i].get("terminal_observation")
            if terminal is not None:
                # the VecEnv already reset: the true s' of the last transition is in the info
                next_obs[i] = terminal
                if self._vec_normalize_env is not None:
                    next_obs[i] = self._vec_normalize_env.unnormalize_obs(next_obs[i, :])
        if self.check_observations:
            self._check_observation(next_obs, f" (the next observation) at env step {self.num_timesteps}")

        replay_buffer.add(
            self._last_original_obs,  # type: ignore[arg-type]
            next_obs,
            buffer_action,
            reward_,
            dones,
            infos,
            cost=costs,
            behaviour_mean=self._behaviour[0],
            behaviour_std=self._behaviour[1],
        )
        self._last_obs = new_obs  # type: ignore[assignment]
        if self._vec_normalize_env is not None:
            self._last_original_obs = new_obs_

        self._cost_tracker.update(costs, np.asarray(dones))

    def dump_logs(self) -> None:
        ep_cost_mean = self._cost_tracker.mean()
        if ep_cost_mean is not None:
            self.logger.record("rollout/ep_cost_mean", ep_cost_mean)
        super().dump_logs()

    # ------------------------------------------------------------------------------------ update
    def train(self, gradient_steps: int, batch_size: int = 0) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.critic_optimizers)
        n_envs = self.n_envs
        for _ in range(gradient_steps):
            batch = self.replay_buffer.sample_windows(
                self.n_recent // n_envs, (self.n_batch - self.n_recent) // n_envs, env=self._vec_normalize_env
            )
            self._update(batch)
        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def _update(self, batch: WindowBatch) -> None:
        policy = self.policy
        gamma, gamma_c = self.gamma, self._cost_discount
        obs, actions = batch.observations, batch.actions
        n = obs.shape[0]

        with th.no_grad():
            mean_k, std_k = policy.distribution(obs)
            log_pi_k = gaussian_log_prob(actions, mean_k, std_k)
            log_mu = gaussian_log_prob(actions, batch.behaviour_mean, batch.behaviour_std)
            rho = th.clamp(th.exp(log_pi_k - log_mu), max=1.0)  # truncated importance weight (§3.2)
            v_r, v_c, s_c = policy.values(th.cat([obs, batch.next_observations]))  # V(s) and V(s') in one pass
            var_c = s_c**2
            targets = offpolicy_targets(
                batch.rewards, batch.costs, batch.cuts, batch.fails, rho,
                v_r[:n], v_r[n:], v_c[:n], v_c[n:], var_c[:n], var_c[n:], gamma, self.gae_lambda,
                self.cost_gae_lambda, gamma_c,
            )  # fmt: skip
            recent = batch.recent.bool()
            window_step_cost = float(batch.costs[recent].mean())  # measured: cost_step="multiplier" reads it
            cost_mean = window_step_cost / (1.0 - gamma_c)  # J_hat (§3.4)
            cost_var = float(th.clamp(targets.var_target[recent], min=0.0).mean())  # V_hat
            # the same two constants read off the cost critics at the recent windows' states
            critic_mean = float(v_c[:n][recent].mean())
            critic_var = float((s_c[:n][recent] ** 2).mean())
            self.logger.record("diag/cost_mean_window", cost_mean)
            # the recent windows' reward return in the same units, to set against the reward steps'
            # predicted changes (diag/reward_gain_return)
            self.logger.record("diag/reward_mean_window", float(batch.rewards[recent].mean()) / (1.0 - gamma))
            self.logger.record("diag/cost_mean_critic", critic_mean)
            self.logger.record("diag/cost_std_critic", math.sqrt(critic_var))
            if self.cost_estimate == "critic":
                cost_mean, cost_var = critic_mean, critic_var
            kappa = float(diag_gaussian_kl(batch.behaviour_mean, batch.behaviour_std, mean_k, std_k).mean())
            if bool((~recent).any()):
                # how much of the replayed (older) data the truncated weights keep: the mean weight,
                # and the effective sample size (sum w)^2 / sum w^2 as a share of those rows
                rho_old = rho[~recent]
                self.logger.record("diag/rho_old_mean", float(rho_old.mean()))
                ess = float(rho_old.sum() ** 2 / th.clamp(th.sum(rho_old**2), min=1e-12))
                self.logger.record("diag/ess_old_share", ess / rho_old.numel())

        std_target = th.sqrt(th.clamp(targets.var_target, 0.0))
        self._log_critic_holdout(
            recent, (v_r[:n], v_c[:n], s_c[:n]), (targets.reward_target, targets.cost_target, std_target)
        )
        if self.surrogate == "action_value":
            # only the held-out (recent) rows are scored: no forward pass over the whole batch for a log line
            with th.no_grad():
                q_r, q_c = policy.action_values(
                    policy.features(obs[recent]), self._q_actions(actions[recent], batch.behaviour_mean[recent])
                )
            self._log_critic_holdout(
                th.ones_like(q_r, dtype=th.bool),
                (q_r, q_c),
                (targets.reward_target[recent], targets.cost_target[recent]),
                ("reward_q_critic", "cost_q_critic"),
            )
            if self.cost_q_form == "dynamics":
                self._log_dynamics_holdout(batch, recent)
        self._log_monte_carlo_cost(batch)
        if self.cost_step == "multiplier":
            self.cost_multiplier = update_cost_multiplier(
                self.cost_multiplier, window_step_cost, self.cost_limit, self.cost_multiplier_lr,
                self.cost_multiplier_max,
            )  # fmt: skip
            self.logger.record("train/cost_multiplier", self.cost_multiplier)
        self._policy_step(batch, targets, rho, mean_k, std_k, log_pi_k, cost_mean, cost_var, kappa)
        q_actions = self._q_actions(actions, batch.behaviour_mean)
        self._fit_critics(
            obs, targets.reward_target, targets.cost_target, std_target, actions=q_actions,
            next_obs=batch.next_observations,
        )  # fmt: skip
        if self.cost_q_target == "td":
            self._fit_cost_q_td(batch)

    def _q_actions(self, actions: th.Tensor, centre: th.Tensor) -> th.Tensor:
        """The action input of the action-value critics: ``actions`` as they are, (``action_value_input=
        "deviation"``) less ``centre``, the mean of the policy whose deviation they are, or (``"clipped"``)
        clipped to the box [-1, 1] the env executes them in."""
        if self.action_value_input == "deviation":
            return actions - centre
        if self.action_value_input == "clipped":
            return th.clamp(actions, -1.0, 1.0)
        return actions

    def _log_critic_holdout(
        self,
        recent: th.Tensor,
        predictions: tuple[th.Tensor, ...],
        wanted: tuple[th.Tensor, ...],
        names: tuple[str, ...] = ("reward_critic", "cost_critic", "cost_std_critic"),
    ) -> None:
        """Critic error on the newest windows before the critics have been fitted to them.

        Those rows were collected after the last fit, so this is an error on unseen data (the fit's
        own ``*_critic_loss`` is on the rows it was fitted to). ``*_holdout_ev`` is the explained
        variance 1 - MSE / Var(target): 1 is perfect, 0 is no better than a constant.
        """
        for name, prediction, target in zip(names, predictions, wanted, strict=True):
            error = prediction[recent] - target[recent]
            mse = float(th.mean(error**2))
            variance = float(th.var(target[recent])) if int(recent.sum()) > 1 else math.nan
            self.logger.record(f"diag/{name}_holdout_mse", mse)
            self.logger.record(f"diag/{name}_holdout_ev", 1.0 - mse / variance if variance > 0 else math.nan)

    def _log_dynamics_holdout(self, batch: WindowBatch, recent: th.Tensor) -> None:
        """``cost_q_form="dynamics"``: the one-step model's error on the newest windows before it is fitted
        to them, as the explained variance of the standardised change averaged over the features that
        change (``diag/dynamics_holdout_ev``), and the same for the change of the cost value along the
        model (``diag/post_cost_step_holdout_ev``: ``U(f(s, a))`` against ``U(s')``, which says whether the
        model moves the state the way the critic reads it)."""
        policy = self.policy
        with th.no_grad():
            features = policy.features(batch.observations[recent])
            next_features = policy.features(batch.next_observations[recent])
            model = policy.dynamics_model
            predicted = model(th.cat([features, batch.actions[recent]], dim=-1))
            wanted = (next_features - features) / model.delta_scale
            variance = wanted.var(dim=0)
            moving = variance > 0
            if int(recent.sum()) > 1 and bool(moving.any()):
                error = ((predicted - wanted) ** 2).mean(dim=0)
                self.logger.record("diag/dynamics_holdout_ev", float((1.0 - error[moving] / variance[moving]).mean()))
                u_now = policy.post_cost_critic(features)
                u_model = policy.post_cost_critic(model.next_features(features, batch.actions[recent]))
                u_true = policy.post_cost_critic(next_features)
                true_change = u_true - u_now
                change_variance = float(true_change.var())
                if change_variance > 0:
                    change_error = float(((u_model - u_true) ** 2).mean())
                    self.logger.record("diag/post_cost_step_holdout_ev", 1.0 - change_error / change_variance)

    def _log_monte_carlo_cost(self, batch: WindowBatch) -> None:
        """Monte-Carlo mean and variance of the discounted cost return on the recent windows.

        The return of each recent row is summed forward to the episode's end or to the window's end;
        only rows with at least ``3 / (1 - gamma)`` steps of window ahead (or whose episode ends in
        the window) are used, so the truncation costs under gamma^300 = 5% at gamma 0.99. Compare
        with ``train/cost_mean`` (J_hat) and ``train/cost_std`` (sqrt V_hat).
        """
        recent = batch.recent.cpu().numpy() > 0
        costs, cuts = batch.costs.cpu().numpy(), batch.cuts.cpu().numpy()
        horizon = int(3.0 / (1.0 - self._cost_discount))
        returns: list[float] = []
        rows = np.flatnonzero(recent)
        if rows.size == 0:
            return
        # recent rows come as one contiguous block per env copy
        blocks = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
        for block in blocks:
            ahead, running, seen_cut = np.zeros(len(block)), 0.0, False
            valid = np.zeros(len(block), dtype=bool)
            for j in range(len(block) - 1, -1, -1):
                i = block[j]
                if cuts[i] > 0:
                    running, seen_cut = 0.0, True
                running = costs[i] + self._cost_discount * running
                ahead[j] = running
                valid[j] = seen_cut or (len(block) - j) >= horizon
            returns.extend(ahead[valid].tolist())
        if len(returns) > 1:
            self.logger.record("diag/mc_cost_return_mean", float(np.mean(returns)))
            self.logger.record("diag/mc_cost_return_std", float(np.std(returns)))

    def _policy_step(
        self,
        batch: WindowBatch,
        targets: Any,
        rho: th.Tensor,
        mean_k: th.Tensor,
        std_k: th.Tensor,
        log_pi_k: th.Tensor,
        cost_mean: float,
        cost_var: float,
        kappa: float,
    ) -> None:
        policy = self.policy
        obs, actions = batch.observations, batch.actions
        params = [p for p in policy.actor.parameters() if p.requires_grad]
        k_alpha = cvar_coefficient(self.cvar_alpha)
        constants = SurrogateConstants(cost_mean, cost_var, self._cost_discount, k_alpha)
        eps = adaptive_trust_region(self.max_kl, kappa) if self.adaptive_trust_region else self.max_kl
        limit = self.cost_return_limit  # the CVaR limit D
        ent_coef = self._entropy_weight()
        action_value = self.surrogate == "action_value"
        if action_value:
            # one noise draw per state, fixed for the update: the reparameterised actions of pi_k and of
            # every policy the line search tries differ only by the policy
            features = policy.features(obs)
            noise = th.randn_like(mean_k)
            with th.no_grad():
                q_r_k, q_c_k = policy.action_values(features, self._q_actions(mean_k + std_k * noise, mean_k))
            reward_scale = float(targets.reward_advantage.std()) + 1e-8

        def terms(
            rows: th.Tensor | slice, mean: th.Tensor, std: th.Tensor, ratio: th.Tensor
        ) -> tuple[th.Tensor, th.Tensor]:
            """The reward objective (without entropy) and the CVaR surrogate on the given rows."""
            if action_value:
                q_r, q_c = policy.action_values(
                    features[rows], self._q_actions(mean[rows] + std[rows] * noise[rows], mean_k[rows])
                )
                objective = action_value_gain(q_r, q_r_k[rows]) / reward_scale
                cvar = action_value_cost_surrogates(
                    q_c, q_c_k[rows], ratio[rows], targets.var_advantage[rows], rho[rows], constants,
                    self.weighted_baseline,
                ).cvar  # fmt: skip
                return objective, cvar
            objective = reward_surrogate(ratio[rows], targets.reward_advantage[rows], rho[rows], self.weighted_baseline)
            cvar = cost_surrogates(
                ratio[rows], targets.cost_advantage[rows], targets.var_advantage[rows], rho[rows], constants,
                self.weighted_baseline,
            ).cvar  # fmt: skip
            return objective, cvar

        def surrogates() -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
            mean, std = policy.distribution(obs)
            ratio = th.exp(gaussian_log_prob(actions, mean, std) - log_pi_k)
            objective, cvar = terms(slice(None), mean, std, ratio)
            if ent_coef > 0.0:
                objective = objective + ent_coef * gaussian_entropy(std).mean()
            return objective, cvar, mean, std, ratio

        objective, cvar, mean, std, ratio = surrogates()
        cvar_k = cvar.item()  # = J_hat + k sqrt(V_hat): the surrogate's corrections vanish at theta_k
        margin = cvar_k - limit  # c (§3.7)
        g = flat_grad(objective, params, retain_graph=True)
        b = flat_grad(cvar, params, retain_graph=True)
        halves = None
        if self.cost_gradient_shrinkage or self._n_updates % self.split_half_interval == 0:
            halves = self._split_half_gradients(params, ratio.shape[0], lambda rows: terms(rows, mean, std, ratio))
        # The Hessian of the mean KL at theta_k, as the Fisher product (same matrix, cheaper; see core).
        fisher_mean, fisher_std = self._fisher_outputs(obs, mean, std)
        hessian_vector_product = gaussian_fisher_vector_product(fisher_mean, fisher_std, params, self.damping)

        hinv_g = conjugate_gradient_solver(hessian_vector_product, g, max_iter=self.cg_max_steps)
        hinv_b = conjugate_gradient_solver(hessian_vector_product, b, max_iter=self.cg_max_steps)
        if halves is not None and self._n_updates % self.split_half_interval == 0:
            self._log_fisher_split_cosines(halves, hessian_vector_product)
        if self.cost_gradient_shrinkage and halves is not None:
            b_first, b_second = halves["cvar"]
            shrink = self._cost_gradient_shrink(b, hinv_b, b_first, b_second, hessian_vector_product)
            b, hinv_b = shrink * b, shrink * hinv_b
            self.logger.record("diag/cost_gradient_shrink", shrink)
        q, r, s = float(th.dot(g, hinv_g)), float(th.dot(g, hinv_b)), float(th.dot(b, hinv_b))
        # cost_step="multiplier": the step a H^-1 g - c H^-1 b; (a, c) also weigh the objective's and the
        # CVaR's changes in the line search (a d_objective - c d_cvar is the Lagrangian's change, scaled)
        coefficients: tuple[float, float] | None = None
        if self.cost_step == "multiplier":
            coefficients = multiplier_step(q, r, s, self.cost_multiplier, eps)
            if coefficients is None:
                reason = (
                    f"nothing to step along (g'H^-1 g = {q:.3g}, b'H^-1 b = {s:.3g}, "
                    f"cost weight {self.cost_multiplier:.3g})"
                )
                solution = StepSolution(StepCase.SKIPPED, math.nan, math.nan, 0.0, reason)
            else:
                solution = StepSolution(StepCase.MULTIPLIER, math.nan, math.nan, 0.0, "")
        else:
            solution = solve_constrained_step(q, r, s, margin, eps, float(th.dot(b, b)))

        self.logger.record("train/cvar", cvar_k)
        self.logger.record("train/cost_mean", cost_mean)
        self.logger.record("train/cost_std", math.sqrt(cost_var))
        self.logger.record("train/constraint_margin", margin)
        self.logger.record("train/behaviour_kl", kappa)
        self.logger.record("train/trust_region", eps)
        self.logger.record("train/step_case", solution.case.name.lower())
        self.logger.record("train/step_case_id", int(solution.case))
        # the dual's scalars; cos2 = r^2 / (q s) is the squared cosine of the reward and cost
        # directions in the Fisher metric (1: the constraint blocks the reward step entirely)
        self.logger.record("diag/q", q)
        self.logger.record("diag/r", r)
        self.logger.record("diag/s", s)
        self.logger.record("diag/cos2", r * r / (q * s) if q > 0 and s > 0 else math.nan)
        self.logger.record("diag/lambda", solution.lam)
        self.logger.record("diag/nu", solution.nu)

        ls_steps, ls_failed, kl_new, objective_new, std_after = 0, False, 0.0, 0.0, std.detach()
        cvar_after = cvar_k
        if solution.case == StepCase.SKIPPED:
            warnings.warn(f"OffTRC update {self._n_updates}: policy step skipped: {solution.reason}", stacklevel=2)
            self.logger.record("train/skip_reason", solution.reason, exclude="tensorboard")
        else:
            if coefficients is not None:
                step = coefficients[0] * hinv_g - coefficients[1] * hinv_b
            elif solution.case == StepCase.RECOVERY:
                step = -solution.recovery_scale * hinv_b
            else:
                step = (hinv_g - solution.nu * hinv_b) / solution.lam
            ls_steps, ls_failed, kl_new, objective_new, std_after, cvar_after = self._line_search(
                params, step, surrogates, mean_k, std_k, objective.item(), cvar_k, margin, eps,
                check_objective=objective_must_not_drop(solution.case, margin), lagrangian=coefficients,
            )  # fmt: skip

        entropy = float(gaussian_entropy(std_after).mean())
        with th.no_grad():
            mean_after = policy.distribution(obs)[0] if ls_steps and not ls_failed else mean_k
            self.logger.record("diag/mean_shift", float(th.linalg.vector_norm(mean_after - mean_k, dim=-1).mean()))
        self.logger.record("diag/std", float(std_after.mean()))
        self.logger.record("diag/cvar_after", cvar_after)
        self.logger.record("train/objective", objective_new)
        # the reward objective is divided by a scale (the advantages' spread); undone, and without an
        # entropy term, it is the step's predicted change of the discounted reward return
        reward_gain = 0.0
        if ls_steps and not ls_failed:
            reward_gain = objective_new - ent_coef * entropy
        if action_value:
            scale = reward_scale
        else:
            scale = float(centred_corrections(targets.reward_advantage, rho, self.weighted_baseline).std()) + 1e-8
        self.logger.record("diag/reward_gain_return", reward_gain * scale / (1.0 - self.gamma))
        self.logger.record("train/kl", kl_new)
        self.logger.record("train/line_search_steps", ls_steps)
        self.logger.record("train/line_search_failed", int(ls_failed))
        self.logger.record("train/entropy", entropy)
        if ent_coef > 0.0 or self.log_ent_coef is not None:
            self.logger.record("train/ent_coef", ent_coef)
        self._adapt_entropy_weight(entropy)

    #: smallest factor of the cost-gradient shrinkage (no reproducible share at all)
    min_cost_gradient_shrink: ClassVar[float] = 0.01
    #: the split-half gradients (``diag/*_grad_split_cos``) cost four extra backward passes, a fifth
    #: of an update with a large batch: without ``cost_gradient_shrinkage``, which needs them every
    #: time, they are computed on every this-many-th update only
    split_half_interval: ClassVar[int] = 10

    def _cost_gradient_shrink(
        self,
        b: th.Tensor,
        hinv_b: th.Tensor,
        b_first: th.Tensor,
        b_second: th.Tensor,
        hessian_vector_product: Any,
    ) -> float:
        """The share of ``b' H^-1 b`` that the two half-batch gradients agree on, clipped to [0.01, 1].

        With ``b_i = t + n_i`` (signal plus independent noise of the halves), ``b1' H^-1 b2`` estimates
        ``t' H^-1 t`` without the noise, while ``b' H^-1 b`` carries half of it; their ratio is the
        factor that shrinks ``b`` to its best linear estimate of ``t``.
        """
        total = float(th.dot(b, hinv_b))
        hinv_second = conjugate_gradient_solver(hessian_vector_product, b_second, max_iter=self.cg_max_steps)
        agreed = float(th.dot(b_first, hinv_second))
        if not (math.isfinite(total) and math.isfinite(agreed)) or total <= 0.0:
            return 1.0  # nothing to correct; the solver handles a degenerate b
        return min(1.0, max(self.min_cost_gradient_shrink, agreed / total))

    def _split_half_gradients(
        self, params: list[th.nn.Parameter], n: int, half_terms: Any
    ) -> dict[str, list[th.Tensor]] | None:
        """The reward and CVaR gradients of two halves of the batch, and their cosines (logged).

        The halves are alternating blocks of 100 consecutive rows (neighbouring steps are strongly
        correlated, so alternate rows would look alike for no good reason). Cosine near 1: the
        gradient is signal; near 0: the step follows noise. ``half_terms(rows)`` gives the reward
        objective and the CVaR surrogate on a boolean row mask.
        """
        block = (th.arange(n, device=self.device) // 100) % 2 == 0
        if int(block.sum()) < 2 or int((~block).sum()) < 2:
            return None
        grads: dict[str, list[th.Tensor]] = {"reward": [], "cvar": []}
        for half in (block, ~block):
            objective, cvar = half_terms(half)
            grads["reward"].append(flat_grad(objective, params, retain_graph=True))
            grads["cvar"].append(flat_grad(cvar, params, retain_graph=True))
        for name, (first, second) in grads.items():
            cosine = th.nn.functional.cosine_similarity(first, second, dim=0)
            self.logger.record(f"diag/{name}_grad_split_cos", float(cosine))
        return grads

    def _log_fisher_split_cosines(self, halves: dict[str, list[th.Tensor]], hessian_vector_product: Any) -> None:
        """The split-half cosines in the metric of the step, ``b1' H^-1 b2 / sqrt(b1' H^-1 b1 b2' H^-1 b2)``.

        The plain cosine (``diag/*_grad_split_cos``) weighs every parameter alike: on an unscaled
        observation the first layer's weights on the largest inputs carry most of a gradient's norm,
        so that cosine reads those few weights (docs/diagnosis.md, finding 18). The step moves along
        ``H^-1 b``; this cosine measures agreement where the step goes. Same solver and iterations
        as the step. The solver starts from random numbers: drawn from a forked generator, so that
        the run learns what it learns without this diagnostic.
        """
        device = next(iter(halves.values()))[0].device
        with th.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for name, (first, second) in halves.items():
                cosine = fisher_cosine(hessian_vector_product, first, second, self.cg_max_steps)
                self.logger.record(f"diag/{name}_grad_split_cos_fisher", cosine)

    def _fisher_outputs(self, obs: th.Tensor, mean: th.Tensor, std: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """The policy outputs (with graph) on which the Fisher-vector products are computed."""
        n_rows = obs.shape[0]
        n_fisher = max(1, round(self.fisher_fraction * n_rows))
        if n_fisher >= n_rows:
            return mean, std
        # A fresh forward pass on the subset: slicing the full outputs would backpropagate
        # through every row's graph and save nothing.
        rows = th.randperm(n_rows, device=obs.device)[:n_fisher]
        return self.policy.distribution(obs[rows])

    def _line_search(
        self,
        params: list[th.nn.Parameter],
        step: th.Tensor,
        surrogates: Any,
        mean_k: th.Tensor,
        std_k: th.Tensor,
        objective_k: float,
        cvar_k: float,
        margin: float,
        eps: float,
        check_objective: bool,
        lagrangian: tuple[float, float] | None = None,
    ) -> tuple[int, bool, float, float, th.Tensor, float]:
        """Bounded backtracking (§3.8).

        With ``lagrangian = (a, c)`` (``cost_step="multiplier"``) a try is accepted when its KL is
        inside the radius and ``a (objective - objective_k) - c (cvar - cvar_k) >= 0``, in place of the
        objective and CVaR checks of the dual's steps.

        Returns (tries, failed, kl, objective, std of the new policy, its CVaR surrogate); restores
        theta_k on failure.
        """
        theta_k = parameters_to_vector(params).detach().clone()
        with th.no_grad():
            for attempt in range(self.line_search_max_iter):
                beta = self.line_search_decay**attempt
                vector_to_parameters(theta_k + beta * step, params)
                objective, cvar, mean, std, _ = surrogates()
                kl = float(diag_gaussian_kl(mean_k, std_k, mean, std).mean())
                # a non-finite surrogate (an importance ratio overflowing on a far-off replayed
                # action) would pass both checks below (+inf objective, -inf CVaR): refuse it
                finite = math.isfinite(kl) and math.isfinite(float(objective)) and math.isfinite(float(cvar))
                if lagrangian is not None:
                    gain = lagrangian[0] * (float(objective) - objective_k) - lagrangian[1] * (float(cvar) - cvar_k)
                    ok = finite and kl <= eps and gain >= 0.0
                else:
                    ok = (
                        finite
                        and kl <= eps
                        and (not check_objective or float(objective) >= objective_k)
                        and float(cvar) - cvar_k <= max(-margin, 0.0)
                    )
                if ok:
                    return attempt + 1, False, kl, float(objective), std, float(cvar)
            vector_to_parameters(theta_k, params)
        return self.line_search_max_iter, True, 0.0, objective_k, std_k, cvar_k

    def _fit_critics(
        self,
        obs: th.Tensor,
        reward_target: th.Tensor,
        cost_target: th.Tensor,
        std_target: th.Tensor,
        actions: th.Tensor | None = None,
        next_obs: th.Tensor | None = None,
    ) -> None:
        policy = self.policy
        with th.no_grad():
            features = policy.features(obs)
        jobs = [
            ("reward_critic_loss", policy.reward_critic, policy.reward_optimizer, reward_target),
            ("cost_critic_loss", policy.cost_critic, policy.cost_optimizer, cost_target),
            ("cost_std_critic_loss", policy.cost_std_critic, policy.cost_std_optimizer, std_target),
        ]
        self._check_critic_targets(jobs)
        self._fit_jobs(features, jobs)
        if self.surrogate == "action_value":
            # Q(s_t, a_t) on the same targets: y_t starts with the replayed action's own reward or cost
            if actions is None:
                raise ValueError(
                    "OffTRC(surrogate='action_value') fits its action-value critics on the batch's actions"
                )
            q_jobs = [("reward_q_critic_loss", policy.reward_q_critic, policy.reward_q_optimizer, reward_target)]
            if self.cost_q_form == "dynamics":
                self._fit_cost_dynamics(features, actions, next_obs, cost_target)
            elif self.cost_q_target == "retrace":  # "td": fitted on its own targets by _fit_cost_q_td
                q_jobs.append(("cost_q_critic_loss", policy.cost_q_critic, policy.cost_q_optimizer, cost_target))
            if self.n_q_critics == 2:
                q_jobs += [
                    ("reward_q_critic_2_loss", policy.reward_q_critic_2, policy.reward_q_optimizer_2, reward_target),
                    ("cost_q_critic_2_loss", policy.cost_q_critic_2, policy.cost_q_optimizer_2, cost_target),
                ]
            self._fit_jobs(th.cat([features, actions], dim=-1), q_jobs)

    def _fit_cost_dynamics(
        self, features: th.Tensor, actions: th.Tensor, next_obs: th.Tensor | None, cost_target: th.Tensor
    ) -> None:
        """``cost_q_form="dynamics"``: fit the one-step model on the batch's transitions and the post-state
        critic ``U(s')`` on the cost targets of the transitions into ``s'`` (as many Adam steps each as a
        critic)."""
        if next_obs is None:
            raise ValueError("OffTRC(cost_q_form='dynamics') fits its one-step model on the batch's next observations")
        policy = self.policy
        with th.no_grad():
            next_features = policy.features(next_obs)
            delta = next_features - features
            policy.dynamics_model.set_delta_scale(delta)
            delta_target = delta / policy.dynamics_model.delta_scale
        self._fit_jobs(
            next_features,
            [("post_cost_critic_loss", policy.post_cost_critic, policy.post_cost_optimizer, cost_target)],
        )
        self._fit_jobs(
            th.cat([features, actions], dim=-1),
            [("dynamics_loss", policy.dynamics_model, policy.dynamics_optimizer, delta_target)],
        )

    #: Polyak rate of the ``cost_q_target="td"`` target network per Adam step (SAC's default)
    cost_q_tau: ClassVar[float] = 0.005

    def _fit_cost_q_td(self, batch: WindowBatch) -> None:
        """Fit ``Q_C`` on one-step TD targets through its target network (``cost_q_target="td"``)."""
        policy = self.policy
        with th.no_grad():
            features = policy.features(batch.observations)
            next_features = policy.features(batch.next_observations)
            next_mean, next_std = policy.distribution(batch.next_observations)  # the policy after the step
        steps = self.cost_q_gradient_steps if self.cost_q_gradient_steps is not None else self.n_steps
        loss = fit_td_action_value(
            policy.cost_q_critic,
            policy.cost_q_critic_target,
            policy.cost_q_optimizer,
            th.cat([features, batch.actions], dim=-1),
            next_features,
            next_mean,
            next_std,
            batch.costs,
            batch.fails,
            gamma=self._cost_discount,
            n_steps=steps,
            batch_size=self.critic_batch_size or 256,
            tau=self.cost_q_tau,
            max_grad_norm=self.max_grad_norm,
        )
        self.logger.record("train/cost_q_critic_loss", loss)
        # the TD targets are discounted cost returns: the largest step cost / (1 - cost_gamma) bounds them
        scale = batch.costs / (1.0 - self._cost_discount)
        self._check_critic_parameters([("cost_q_critic_loss", policy.cost_q_critic, None, scale)])

    def _fit_jobs(self, features: th.Tensor, jobs: Sequence[tuple[str, th.nn.Module, Any, th.Tensor]]) -> None:
        """Fit each critic of ``jobs`` to its target on the input rows ``features``."""
        n_rows = features.shape[0]
        if self.critic_batch_size is not None and self.critic_batch_size < n_rows:
            for name, critic, optimizer, target in jobs:
                self.logger.record(f"train/{name}", self._fit_minibatches(features, target, critic, optimizer))
            self._check_critic_parameters(jobs)
            return
        chunks = [
            (features[i : i + self.critic_chunk_size], slice(i, i + self.critic_chunk_size))
            for i in range(0, n_rows, self.critic_chunk_size)
        ]
        for name, critic, optimizer, target in jobs:
            total = th.zeros((), device=features.device)
            for _ in range(self.n_critic_epochs):
                optimizer.zero_grad()
                total = th.zeros((), device=features.device)
                # One full-batch step, its gradient accumulated over row chunks: the same maths,
                # but the activations stay in cache (docs/speed.md: ~25% faster, linear in n_batch).
                for chunk, rows in chunks:
                    loss = 0.5 * th.sum((critic(chunk) - target[rows]) ** 2) / n_rows
                    loss.backward()
                    total = total + loss.detach()
                clip_grad_norm_(critic.parameters(), self.max_grad_norm)
                optimizer.step()
            self.logger.record(f"train/{name}", total.item())
        self._check_critic_parameters(jobs)

    def _check_critic_targets(self, jobs: Sequence[tuple[str, th.nn.Module, Any, th.Tensor]]) -> None:
        """Stop on a non-finite critic target: fitting to it would turn the critic into NaN, and every
        later policy step would then be skipped with a warning only (issue 22)."""
        for name, _, _, target in jobs:
            if not bool(th.isfinite(target).all()):
                finite = target[th.isfinite(target)]
                largest = float(finite.abs().max()) if finite.numel() else math.nan
                raise ValueError(
                    f"OffTRC update {self._n_updates}: the target of the {name.removesuffix('_loss')} is not "
                    f"finite ({int((~th.isfinite(target)).sum())} of {target.numel()} rows; the largest finite "
                    f"one is {largest:.3g}). Costs or rewards this large overflow float32 in the targets "
                    f"(the cost variance grows with cost^2 / (1 - gamma)^2): rescale them in the environment."
                )

    def _check_critic_parameters(self, jobs: Sequence[tuple[str, th.nn.Module, Any, th.Tensor]]) -> None:
        """Stop when a critic's fit has produced non-finite parameters, instead of training on."""
        for name, critic, _, target in jobs:
            if not all(bool(th.isfinite(p).all()) for p in critic.parameters()):
                raise ValueError(
                    f"OffTRC update {self._n_updates}: the {name.removesuffix('_loss')} diverged (its parameters "
                    f"are no longer finite; its targets reach {float(target.abs().max()):.3g}). Rescale the "
                    "environment's costs/rewards, or lower learning_rate or max_grad_norm."
                )

    def _fit_minibatches(
        self, features: th.Tensor, target: th.Tensor, critic: th.nn.Module, optimizer: th.optim.Optimizer
    ) -> float:
        """``n_critic_epochs`` shuffled passes of minibatch Adam steps; returns the last pass's mean loss."""
        assert self.critic_batch_size is not None
        return fit_minibatches(
            critic,
            optimizer,
            features,
            target,
            n_passes=self.n_critic_epochs,
            batch_size=self.critic_batch_size,
            max_grad_norm=self.max_grad_norm,
        )

    # ------------------------------------------------------------------------------ persistence
    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfOffTRC],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfOffTRC:
        """SB3's ``load``; a truncated, corrupt or foreign file (e.g. a SAC zip) is a ``ValueError`` naming it.

        The saved settings, ``kwargs`` and ``custom_objects`` are range-checked as in ``__init__``, against
        the ``env`` given here (any number of env copies that ``n_steps``, ``n_recent`` and ``n_batch``
        split over). Like every SB3 model file, the zip holds cloudpickled objects: load only files from
        a trusted source.
        """
        check_model_zip(path, "OffTRC", ("n_recent", "n_batch", "cvar_alpha"))
        if "action_value_input" in kwargs:
            # the critics' weights fit either input alike: only the saved setting can tell them apart
            wanted = kwargs.pop("action_value_input")
            model = cls.load(path, env, device, custom_objects, print_system_info, force_reset, **kwargs)
            if model.action_value_input != wanted:
                raise ValueError(
                    f"{path} was saved with action_value_input={model.action_value_input!r}, not {wanted!r}: "
                    "its action-value critics were fitted on that input. Load it without action_value_input=..., "
                    "or train a new model with the setting you want."
                )
            return model
        try:
            return super().load(  # type: ignore[return-value]
                path,
                env=env,
                device=device,
                custom_objects=custom_objects,
                print_system_info=print_system_info,
                force_reset=force_reset,
                **kwargs,
            )
        except RuntimeError as exc:
            # the policy's state dict lacks (or has extra) action-value critics or their target network
            given = [key for key in ("surrogate", "cost_q_target", "n_q_critics", "cost_q_form") if key in kwargs]
            if not any(part in str(exc) for part in ("q_critic", "dynamics_model", "post_cost_critic")) or not given:
                raise
            settings = ", ".join(f"{key}={kwargs[key]!r}" for key in given)
            raise ValueError(
                f"{path} was saved with other settings than {settings}: a model keeps the surrogate, "
                "cost_q_target and n_q_critics it was built with, and its cost_q_form (their critics are part of the "
                "policy). Load it "
                f"without {', '.join(f'{key}=...' for key in given)}, or train a new model with the settings you want."
            ) from None

    def load_replay_buffer(self, path: str | pathlib.Path | io.BufferedIOBase, truncate_last_traj: bool = True) -> None:
        """SB3's ``load_replay_buffer``, which unpickles ``path`` (load only files you trust); a buffer that
        does not fit this model (class, number of env copies, spaces) is refused with a ``ValueError``."""
        previous = self.replay_buffer
        super().load_replay_buffer(path, truncate_last_traj)
        check_loaded_replay_buffer(self, path, previous)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_behaviour", "_rollout_actor", "_rollout_rng"]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        names = ["policy", "policy.reward_optimizer", "policy.cost_optimizer", "policy.cost_std_optimizer"]
        if getattr(self.policy, "action_value_critics", False):
            names.append("policy.reward_q_optimizer")
            if getattr(self.policy, "cost_q_form", "direct") == "direct":
                names.append("policy.cost_q_optimizer")
            else:
                names += ["policy.dynamics_optimizer", "policy.post_cost_optimizer"]
        if getattr(self.policy, "n_q_critics", 1) == 2:
            names += ["policy.reward_q_optimizer_2", "policy.cost_q_optimizer_2"]
        return names, []


def _observation_space_error(space: spaces.Space | None) -> ValueError:
    if isinstance(space, spaces.Box):  # only the policy name was wrong
        return ValueError(f"OffTRC has no MultiInputPolicy; use 'MlpPolicy' for its observation space {space}")
    return ValueError(
        f"OffTRC supports Box observation spaces only (its actor and critics are MLPs on one flat "
        f"vector; there is no MultiInputPolicy), got {space if space is not None else 'a Dict space'}. "
        "Flatten the observation, e.g. gymnasium.wrappers.FlattenObservation(env) (for a goal-conditioned "
        "env, after choosing the keys with gymnasium.wrappers.FilterObservation)."
    )


def objective_must_not_drop(case: StepCase, margin: float) -> bool:
    """Whether the line search also requires the reward surrogate not to drop (§3.8).

    Only where the current policy is feasible (``c < 0``), as in the authors' code: when it violates
    the constraint (``c >= 0``: a constrained or a recovery step) the step's first job is to lower
    the CVaR, and a step that does so at some cost in reward is accepted.
    """
    return case != StepCase.RECOVERY and margin < 0.0


def fit_td_action_value(
    critic: th.nn.Module,
    target_critic: th.nn.Module,
    optimizer: th.optim.Optimizer,
    inputs: th.Tensor,
    next_features: th.Tensor,
    next_mean: th.Tensor,
    next_std: th.Tensor,
    costs: th.Tensor,
    fails: th.Tensor,
    *,
    gamma: float,
    n_steps: int,
    batch_size: int,
    tau: float,
    max_grad_norm: float,
    generator: th.Generator | None = None,
) -> float:
    """Fit the action-value ``critic`` to one-step TD targets, as SAC fits its critics.

    Each of ``n_steps`` Adam steps draws ``batch_size`` rows with replacement, draws the next action
    ``a' = next_mean + next_std * eps`` per row and minimises half the mean squared error to
    ``costs + gamma * (1 - fails) * target_critic(next_features, a')`` (no gradient through the
    target), with the gradient norm clipped to ``max_grad_norm``; ``target_critic`` then moves a
    share ``tau`` of the way to ``critic``. ``inputs`` are the rows' features and actions side by
    side. Rows and noise come from ``generator`` (torch's global one if None, as in training).
    Returns the mean loss of the last (up to) 100 steps.
    """
    n_rows = inputs.shape[0]
    params: list[th.Tensor] = list(critic.parameters())
    target_params: list[th.Tensor] = list(target_critic.parameters())
    losses: deque[th.Tensor] = deque(maxlen=100)
    for _ in range(n_steps):
        rows = th.randint(n_rows, (batch_size,), generator=generator, device=inputs.device)
        with th.no_grad():
            noise = th.randn(next_mean[rows].shape, generator=generator, device=inputs.device)
            next_action = next_mean[rows] + next_std[rows] * noise
            bootstrap = target_critic(th.cat([next_features[rows], next_action], dim=-1))
            wanted = costs[rows] + gamma * (1.0 - fails[rows]) * bootstrap
        optimizer.zero_grad()
        loss = 0.5 * th.mean((critic(inputs[rows]) - wanted) ** 2)
        loss.backward()
        clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        polyak_update(params, target_params, tau)
        losses.append(loss.detach())  # kept on the device: no sync per step
    return float(th.stack(list(losses)).mean()) if losses else math.nan


def fit_minibatches(
    critic: th.nn.Module,
    optimizer: th.optim.Optimizer,
    features: th.Tensor,
    target: th.Tensor,
    *,
    n_passes: int,
    batch_size: int,
    max_grad_norm: float,
    generator: th.Generator | None = None,
) -> float:
    """Fit ``critic`` to ``target`` by ``n_passes`` shuffled passes of minibatch steps of ``optimizer``.

    Each minibatch step minimises half the mean squared error, with the gradient norm clipped to
    ``max_grad_norm``. The rows are shuffled by ``generator`` (torch's global generator if None,
    as in training). Returns the mean loss of the last pass.
    """
    n_rows = features.shape[0]
    params = list(critic.parameters())
    last_pass = 0.0
    for _ in range(n_passes):
        order = th.randperm(n_rows, generator=generator, device=features.device)
        # one gather per pass; the minibatches are then contiguous slices of the shuffled rows
        shuffled_features, shuffled_target = features[order], target[order]
        total = th.zeros((), device=features.device)
        for start in range(0, n_rows, batch_size):
            inputs, wanted = shuffled_features[start : start + batch_size], shuffled_target[start : start + batch_size]
            optimizer.zero_grad()
            loss = 0.5 * th.mean((critic(inputs) - wanted) ** 2)
            loss.backward()
            clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            total = total + loss.detach() * wanted.shape[0]
        last_pass = float(total) / n_rows
    return last_pass
