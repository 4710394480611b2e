"""Layer-1 maths against independent references: slow loops, scipy, Monte Carlo, finite differences."""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction

import numpy as np
import pytest
import torch as th
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sb3_offtrc.core import (
    StepCase,
    SurrogateConstants,
    action_value_cost_surrogates,
    action_value_gain,
    adaptive_trust_region,
    cost_surrogates,
    cvar_coefficient,
    diag_gaussian_kl,
    gaussian_cvar,
    linear_recurrence_backward,
    multiplier_step,
    offpolicy_targets,
    reward_surrogate,
    solve_constrained_step,
    update_cost_multiplier,
)


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    """Reference comparisons in double precision, restored afterwards for the other test modules."""
    previous = th.get_default_dtype()
    th.set_default_dtype(th.float64)
    yield
    th.set_default_dtype(previous)


def _rand(rng: np.random.Generator, n: int) -> th.Tensor:
    return th.as_tensor(rng.normal(size=n))


# --------------------------------------------------------------------------- recurrences / targets
def test_linear_recurrence_matches_loop() -> None:
    rng = np.random.default_rng(0)
    for length in (1, 2, 3, 7, 64, 1000):
        a = rng.normal(size=(length, 3))
        b = rng.uniform(0, 1, size=(length, 3)) * (rng.uniform(size=(length, 3)) > 0.1)
        expected = np.zeros_like(a)
        nxt = np.zeros(3)
        for t in reversed(range(length)):
            nxt = a[t] + b[t] * nxt
            expected[t] = nxt
        got = linear_recurrence_backward(th.as_tensor(a), th.as_tensor(b)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


def _gae_loop(rewards, values, next_values, dones, fails, gamma, lam):
    """Textbook GAE(lambda) written as a plain per-step loop."""
    n = len(rewards)
    adv = np.zeros(n)
    last = 0.0
    for t in reversed(range(n)):
        delta = rewards[t] + gamma * (1 - fails[t]) * next_values[t] - values[t]
        last = delta + gamma * lam * (1 - dones[t]) * last
        adv[t] = last
    return adv, adv + values


def test_targets_reduce_to_gae_when_on_policy() -> None:
    rng = np.random.default_rng(1)
    n, gamma, lam = 300, 0.99, 0.97
    r, c = rng.normal(size=n), rng.uniform(size=n)
    vr, vr_next = rng.normal(size=n), rng.normal(size=n)
    vc, vc_next = rng.normal(size=n), rng.normal(size=n)
    dones = (rng.uniform(size=n) < 0.03).astype(float)
    fails = dones * (rng.uniform(size=n) < 0.5)
    dones[-1] = 1.0
    t = th.as_tensor
    out = offpolicy_targets(
        t(r),
        t(c),
        t(dones),
        t(fails),
        th.ones(n),
        t(vr),
        t(vr_next),
        t(vc),
        t(vc_next),
        th.ones(n),
        th.ones(n),
        gamma,
        lam,
    )
    adv_r, ret_r = _gae_loop(r, vr, vr_next, dones, fails, gamma, lam)
    adv_c, ret_c = _gae_loop(c, vc, vc_next, dones, fails, gamma, lam)
    np.testing.assert_allclose(out.reward_advantage.numpy(), adv_r, atol=1e-9)
    np.testing.assert_allclose(out.reward_target.numpy(), ret_r, atol=1e-9)
    np.testing.assert_allclose(out.cost_advantage.numpy(), adv_c, atol=1e-9)
    np.testing.assert_allclose(out.cost_target.numpy(), ret_c, atol=1e-9)


def _slow_targets(r, c, dones, fails, rho, vr, vr_n, vc, vc_n, var, var_n, gamma, lam, cost_lam=None, cost_gamma=None):
    """Per-step reference written directly from the equations of ALGORITHM.md §3.3 (``cost_lam`` and
    ``cost_gamma``: the trace decay and discount of the cost-mean and cost-variance recursions,
    ``lam`` and ``gamma`` if None)."""
    cost_lam = lam if cost_lam is None else cost_lam
    g = gamma if cost_gamma is None else cost_gamma
    n = len(r)
    y_r, y_c, z = np.zeros(n), np.zeros(n), np.zeros(n)
    d_r = d_c = eta = 0.0
    for t in reversed(range(n)):
        if dones[t]:
            d_r = d_c = eta = 0.0
        y_r[t] = r[t] + gamma * (1 - fails[t]) * vr_n[t] + gamma * d_r
        y_c[t] = c[t] + g * (1 - fails[t]) * vc_n[t] + g * d_c
        z[t] = (c[t] + g * (1 - fails[t]) * vc_n[t]) ** 2 - vc[t] ** 2 + g**2 * (1 - fails[t]) * var_n[t] + g**2 * eta
        d_r = lam * rho[t] * (y_r[t] - vr[t])
        d_c = cost_lam * rho[t] * (y_c[t] - vc[t])
        eta = cost_lam * rho[t] * (z[t] - var[t])
    return y_r, y_c, z


def test_targets_with_truncated_weights_match_slow_reference() -> None:
    rng = np.random.default_rng(2)
    n, gamma, lam = 257, 0.95, 0.9
    arrays = [rng.normal(size=n) for _ in range(3)] + [rng.uniform(0.1, 2, size=n) for _ in range(2)]
    vr, vr_n, vc = arrays[0], arrays[1], arrays[2]
    var, var_n = arrays[3], arrays[4]
    vc_n = rng.normal(size=n)
    r, c = rng.normal(size=n), rng.uniform(size=n)
    rho = np.minimum(1.0, rng.uniform(0.2, 2.0, size=n))
    assert rho.min() < 0.5
    dones = (rng.uniform(size=n) < 0.05).astype(float)
    fails = dones * (rng.uniform(size=n) < 0.5)
    assert dones[:-1].sum() >= 3  # several episode ends inside the window
    t = th.as_tensor
    out = offpolicy_targets(
        t(r), t(c), t(dones), t(fails), t(rho), t(vr), t(vr_n), t(vc), t(vc_n), t(var), t(var_n), gamma, lam
    )
    y_r, y_c, z = _slow_targets(r, c, dones, fails, rho, vr, vr_n, vc, vc_n, var, var_n, gamma, lam)
    np.testing.assert_allclose(out.reward_target.numpy(), y_r, atol=1e-9)
    np.testing.assert_allclose(out.cost_target.numpy(), y_c, atol=1e-9)
    np.testing.assert_allclose(out.var_target.numpy(), z, atol=1e-9)
    np.testing.assert_allclose(out.var_advantage.numpy(), z - var, atol=1e-9)

    # a separate trace decay for the cost recursions leaves the reward targets as they were
    cost_lam = 0.5
    split = offpolicy_targets(
        t(r), t(c), t(dones), t(fails), t(rho), t(vr), t(vr_n), t(vc), t(vc_n), t(var), t(var_n), gamma, lam,
        cost_lam,
    )  # fmt: skip
    y_r2, y_c2, z2 = _slow_targets(r, c, dones, fails, rho, vr, vr_n, vc, vc_n, var, var_n, gamma, lam, cost_lam)
    np.testing.assert_allclose(y_r2, y_r)
    assert np.abs(y_c2 - y_c).max() > 1e-3  # the reference does see the other decay
    np.testing.assert_allclose(split.reward_target.numpy(), y_r, atol=1e-9)
    np.testing.assert_allclose(split.cost_target.numpy(), y_c2, atol=1e-9)
    np.testing.assert_allclose(split.var_target.numpy(), z2, atol=1e-9)
    np.testing.assert_allclose(split.cost_advantage.numpy(), y_c2 - vc, atol=1e-9)

    # ... and so does a separate discount of the cost recursions (with or without its own decay)
    for lam_c in (None, cost_lam):
        short = offpolicy_targets(
            t(r), t(c), t(dones), t(fails), t(rho), t(vr), t(vr_n), t(vc), t(vc_n), t(var), t(var_n), gamma, lam,
            lam_c, 0.8,
        )  # fmt: skip
        y_r3, y_c3, z3 = _slow_targets(r, c, dones, fails, rho, vr, vr_n, vc, vc_n, var, var_n, gamma, lam, lam_c, 0.8)
        np.testing.assert_allclose(y_r3, y_r)
        same_discount = y_c if lam_c is None else y_c2  # the reference's cost targets at gamma, computed above
        assert np.abs(y_c3 - same_discount).max() > 1e-3
        np.testing.assert_allclose(short.reward_target.numpy(), y_r, atol=1e-9)
        np.testing.assert_allclose(short.cost_target.numpy(), y_c3, atol=1e-9)
        np.testing.assert_allclose(short.var_target.numpy(), z3, atol=1e-9)


def test_variance_target_fixed_point_is_monte_carlo_variance() -> None:
    """On a 2-state chain with known values, z equals the true variance of the cost return."""
    # State 0: cost 1 w.p. p else 0, then terminates. V = p, Var = p(1-p).
    p = 0.3
    rng = np.random.default_rng(3)
    samples = (rng.uniform(size=200_000) < p).astype(float)
    n = len(samples)
    ones, zeros = th.ones(n), th.zeros(n)
    out = offpolicy_targets(
        zeros,
        th.as_tensor(samples),
        ones,
        ones,
        ones,
        zeros,
        zeros,
        th.full((n,), p),
        zeros,
        th.full((n,), p * (1 - p)),
        zeros,
        0.99,
        0.97,
    )
    assert abs(out.var_target.mean().item() - samples.var()) < 5e-3
    assert abs(out.var_target.mean().item() - p * (1 - p)) < 5e-3


# --------------------------------------------------------------------------------------- CVaR
@pytest.mark.parametrize("alpha", [0.05, 0.125, 0.25, 0.5, 0.9])
def test_cvar_matches_monte_carlo(alpha: float) -> None:
    rng = np.random.default_rng(4)
    mean, std = 2.0, 1.5
    x = np.sort(rng.normal(mean, std, size=2_000_000))
    tail = x[int(len(x) * (1 - alpha)) :]
    mc = tail.mean()
    got = gaussian_cvar(th.tensor(mean), th.tensor(std**2), alpha).item()
    assert abs(got - mc) < 0.01


def test_cvar_coefficient_values_and_errors() -> None:
    assert abs(cvar_coefficient(0.125) - 1.647) < 1e-3
    assert cvar_coefficient(1.0) == 0.0
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="cvar_alpha"):
            cvar_coefficient(bad)


# --------------------------------------------------------------------------------- surrogates
def test_surrogates_equal_constants_at_theta_k_and_have_expected_gradient() -> None:
    rng = np.random.default_rng(5)
    n = 100
    adv, adv_c, adv_s = _rand(rng, n), _rand(rng, n), _rand(rng, n)
    w = th.as_tensor(rng.uniform(0.3, 1.0, size=n))
    log_ratio = th.zeros(n, requires_grad=True)
    consts = SurrogateConstants(cost_mean=3.0, cost_var=4.0, gamma=0.99, k_alpha=cvar_coefficient(0.125))
    ratio = th.exp(log_ratio)
    out = cost_surrogates(ratio, adv_c, adv_s, w, consts)
    assert out.cost_mean.item() == pytest.approx(3.0, abs=1e-10)
    assert out.cost_var.item() == pytest.approx(4.0, abs=1e-10)
    assert out.cvar.item() == pytest.approx(3.0 + consts.k_alpha * 2.0, abs=1e-10)
    assert reward_surrogate(ratio, adv, w).item() == pytest.approx(0.0, abs=1e-10)
    (grad,) = th.autograd.grad(out.cvar, log_ratio)
    wc, ws = (adv_c * w).numpy(), (adv_s * w).numpy()
    expected = (wc - wc.mean()) / n / (1 - 0.99) + consts.k_alpha / (2 * 2.0) * (ws - ws.mean()) / n / (1 - 0.99**2)
    np.testing.assert_allclose(grad.numpy(), expected, atol=1e-10)


def test_action_value_gain_is_the_pathwise_gradient_of_the_expected_value() -> None:
    """With Q(a) = -(a - c)^2 per dimension, E[Q(m + s eps)] = -(m - c)^2 - s^2: the reparameterised
    gain's gradient must be -2 (m - c) for the mean and -2 s for the std (Monte Carlo over eps)."""
    gen = th.Generator().manual_seed(7)
    n, centre = 200_000, th.tensor([0.3, -0.5], dtype=th.float64)
    mean_k, std_k = th.tensor([0.1, 0.2], dtype=th.float64), th.tensor([0.4, 0.7], dtype=th.float64)
    noise = th.randn(n, 2, generator=gen, dtype=th.float64)

    def q(actions: th.Tensor) -> th.Tensor:
        return -th.sum((actions - centre) ** 2, dim=-1)

    values_k = q(mean_k + std_k * noise)
    mean, std = mean_k.clone().requires_grad_(True), std_k.clone().requires_grad_(True)
    gain = action_value_gain(q(mean + std * noise), values_k)
    assert gain.item() == 0.0  # zero at theta_k
    grad_mean, grad_std = th.autograd.grad(gain, (mean, std))
    np.testing.assert_allclose(grad_mean.numpy(), (-2 * (mean_k - centre)).numpy(), atol=0.01)
    np.testing.assert_allclose(grad_std.numpy(), (-2 * std_k).numpy(), atol=0.01)
    # a finite move: the gain is the change of the expected value
    moved_mean, moved_std = th.tensor([0.3, -0.1], dtype=th.float64), th.tensor([0.2, 0.5], dtype=th.float64)
    expected = float((-((moved_mean - centre) ** 2) - moved_std**2 + (mean_k - centre) ** 2 + std_k**2).sum())
    assert action_value_gain(q(moved_mean + moved_std * noise), values_k).item() == pytest.approx(expected, abs=0.01)


def test_action_value_cost_surrogates_read_the_mean_off_the_critic() -> None:
    """``J_C = J_hat + gain / (1 - gamma)``; ``V_C`` is the importance-weighted one of cost_surrogates."""
    rng = np.random.default_rng(8)
    n = 100
    adv_s, w = _rand(rng, n), th.as_tensor(rng.uniform(0.3, 1.0, size=n))
    ratio = th.exp(_rand(rng, n) * 0.1)
    q_k, q_theta = _rand(rng, n), _rand(rng, n)
    consts = SurrogateConstants(cost_mean=3.0, cost_var=4.0, gamma=0.95, k_alpha=cvar_coefficient(0.25))
    out = action_value_cost_surrogates(q_theta, q_k, ratio, adv_s, w, consts)
    gain = float((q_theta - q_k).numpy().mean())
    assert out.cost_mean.item() == pytest.approx(3.0 + gain / 0.05, rel=1e-12)
    reference = cost_surrogates(ratio, th.zeros(n, dtype=th.float64), adv_s, w, consts)  # its mean term is 0
    assert out.cost_var.item() == pytest.approx(reference.cost_var.item(), rel=1e-12)
    assert out.cvar.item() == pytest.approx(
        3.0 + gain / 0.05 + consts.k_alpha * math.sqrt(reference.cost_var.item()), rel=1e-12
    )
    at_k = action_value_cost_surrogates(q_k, q_k, th.ones(n, dtype=th.float64), adv_s, w, consts)
    assert at_k.cvar.item() == pytest.approx(3.0 + consts.k_alpha * 2.0, abs=1e-10)


# ------------------------------------------------------------------------------- trust region
def test_adaptive_radius() -> None:
    assert adaptive_trust_region(0.001, 0.0) == 0.001
    eps, kappa = 0.01, 0.002
    expected = eps - (math.sqrt(kappa * (eps + kappa / 4)) - kappa / 2)
    assert adaptive_trust_region(eps, kappa) == pytest.approx(expected)
    # the shrink x = eps - eps' is the positive root of x (x + kappa) = kappa eps
    for eps, kappa in [(0.001, 0.0005), (0.01, 0.3), (0.05, 1e-6)]:
        x = eps - adaptive_trust_region(eps, kappa)
        assert x * (x + kappa) == pytest.approx(kappa * eps, rel=1e-9)
    assert 0.0 <= adaptive_trust_region(0.001, 10.0) < 1e-6
    # monotone decreasing in kappa
    vals = [adaptive_trust_region(0.01, k) for k in np.linspace(0, 0.05, 50)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))
    with pytest.raises(ValueError):
        adaptive_trust_region(0.01, -1.0)


def test_kl_matches_torch_distributions() -> None:
    rng = np.random.default_rng(6)
    m1, m2 = _rand(rng, 12).view(4, 3), _rand(rng, 12).view(4, 3)
    s1 = th.as_tensor(rng.uniform(0.2, 2, size=(4, 3)))
    s2 = th.as_tensor(rng.uniform(0.2, 2, size=(4, 3)))
    ref = th.distributions.kl_divergence(th.distributions.Normal(m1, s1), th.distributions.Normal(m2, s2)).sum(-1)
    np.testing.assert_allclose(diag_gaussian_kl(m1, s1, m2, s2).numpy(), ref.numpy(), atol=1e-12)


def _random_problem(rng: np.random.Generator, dim: int):
    m = rng.normal(size=(dim, dim))
    h = m @ m.T + 0.5 * np.eye(dim)
    return h, rng.normal(size=dim), rng.normal(size=dim)


def _closed_form(h, g, b, c, eps):
    hinv_g, hinv_b = np.linalg.solve(h, g), np.linalg.solve(h, b)
    q, r, s = g @ hinv_g, g @ hinv_b, b @ hinv_b
    sol = solve_constrained_step(q, r, s, c, eps, float(b @ b))
    if sol.case == StepCase.RECOVERY:
        return sol, -sol.recovery_scale * hinv_b
    return sol, (hinv_g - sol.nu * hinv_b) / sol.lam


def test_step_solver_matches_slsqp() -> None:
    from scipy.optimize import minimize

    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(60):
        dim = int(rng.integers(2, 6))
        h, g, b = _random_problem(rng, dim)
        eps = float(rng.uniform(0.01, 1.0))
        c = float(rng.normal() * 1.5)
        sol, x = _closed_form(h, g, b, c, eps)
        seen.add(sol.case)
        if sol.case == StepCase.RECOVERY:
            # infeasible: no x in the trust region satisfies the constraint
            assert c - math.sqrt(2 * eps * (b @ np.linalg.solve(h, b))) > 0
            assert x @ h @ x / 2 == pytest.approx(eps, rel=1e-8)
            continue
        cons = [
            {"type": "ineq", "fun": lambda x: eps - x @ h @ x / 2, "jac": lambda x: -h @ x},
            {"type": "ineq", "fun": lambda x: -(c + b @ x), "jac": lambda x: -b},
        ]
        # SLSQP sometimes stops with "positive directional derivative" on this linear objective:
        # keep the best feasible point over several starts instead of trusting its flag.
        best = None
        for start in (np.zeros(dim), x * 0.5, rng.normal(size=dim) * 0.1):
            res = minimize(
                lambda x: -g @ x,
                start,
                jac=lambda x: -g,
                constraints=cons,
                method="SLSQP",
                options={"ftol": 1e-12, "maxiter": 500},
            )
            feasible = res.x @ h @ res.x / 2 <= eps + 1e-7 and c + b @ res.x <= 1e-7
            if feasible and (best is None or g @ res.x > g @ best):
                best = res.x
        assert best is not None
        assert g @ x >= g @ best - 1e-6  # the closed form is at least as good as SLSQP ...
        assert g @ x == pytest.approx(g @ best, rel=1e-4, abs=1e-6)  # ... and SLSQP finds it
        np.testing.assert_allclose(x, best, atol=2e-3)
        assert x @ h @ x / 2 <= eps * (1 + 1e-6)
        assert c + b @ x <= 1e-6
    assert {StepCase.FEASIBLE, StepCase.CONSTRAINED, StepCase.RECOVERY} <= seen


def test_feasible_case_when_gradient_of_cost_vanishes() -> None:
    sol = solve_constrained_step(q=2.0, r=0.0, s=0.0, c=-1.0, eps=0.01, b_norm_sq=0.0)
    assert sol.case == StepCase.FEASIBLE and sol.nu == 0.0
    assert sol.lam == pytest.approx(math.sqrt(2.0 / 0.02))


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(q=float("nan"), r=0.1, s=1.0, c=0.1, eps=0.01, b_norm_sq=1.0), "non-finite"),
        (dict(q=-1.0, r=0.1, s=1.0, c=0.1, eps=0.01, b_norm_sq=1.0), "not positive"),
        (dict(q=1.0, r=0.0, s=0.0, c=0.1, eps=0.01, b_norm_sq=1e-20), "cost gradient vanishes"),
        (dict(q=1.0, r=0.1, s=1.0, c=0.1, eps=0.0, b_norm_sq=1.0), "radius is zero"),
    ],
)
def test_step_solver_skips_numerical_faults(kwargs: dict, reason: str) -> None:
    sol = solve_constrained_step(**kwargs)
    assert sol.case == StepCase.SKIPPED and reason in sol.reason


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=400, deadline=None)
@given(q=positive, r=finite, s=positive, c=finite, eps=positive, b2=positive)
# found by this test: colinear g and b with a subnormal negative margin made r / -c overflow to
# an infinite lambda (a zero step labelled CONSTRAINED)
@example(q=1.0, r=1.0, s=1.0, c=-2.225073858507e-311, eps=1.0, b2=0.0)
def test_step_solver_never_returns_nan(q: float, r: float, s: float, c: float, eps: float, b2: float) -> None:
    sol = solve_constrained_step(q, r, s, c, eps, b2)
    if sol.case == StepCase.SKIPPED:
        assert sol.reason
    elif sol.case == StepCase.RECOVERY:
        assert math.isfinite(sol.recovery_scale) and sol.recovery_scale > 0
    else:
        assert math.isfinite(sol.lam) and sol.lam > 0
        assert math.isfinite(sol.nu) and sol.nu >= 0


# ------------------------------------------------ the step solver's corner cases (issue 22, item 12)
# The solver's contract, checked in exact rational arithmetic from the scalars it was given (so that the
# check itself does not cancel): a step it returns satisfies x'Hx/2 <= eps (1 + TOL) and
# c + b'x <= TOL * max(|c|, sqrt(2 eps s)), where sqrt(2 eps s) is the most b'x can change in the region.
TOL = 1e-6


def _exact_step(sol, q: float, r: float, s: float) -> tuple[Fraction, Fraction, Fraction]:
    """(x'Hx / 2, b'x, g'x) of the returned step, exactly, from q = g'H^-1 g, r = g'H^-1 b, s = b'H^-1 b."""
    q_, r_, s_ = Fraction(q), Fraction(r), Fraction(s)
    if sol.case == StepCase.RECOVERY:
        t = -Fraction(sol.recovery_scale)  # x = t H^-1 b
        return t * t * s_ / 2, t * s_, t * r_
    lam, nu = Fraction(sol.lam), Fraction(sol.nu)  # x = (H^-1 g - nu H^-1 b) / lam
    return (q_ - 2 * nu * r_ + nu * nu * s_) / (2 * lam * lam), (r_ - nu * s_) / lam, (q_ - nu * r_) / lam


def _optimum(q: float, r: float, s: float, c: float, eps: float) -> float | None:
    """max g'x over the trust region and the constraint, solved in the plane of H^-1 g and H^-1 b
    (an H-orthonormal basis: b's direction and the rest of g); None when no point is feasible."""
    radius = math.sqrt(2 * eps)
    g_along, g_across = r / math.sqrt(s), math.sqrt(max(q - r * r / s, 0.0))
    alpha_max = -c / math.sqrt(s)  # the constraint: alpha <= alpha_max
    if alpha_max < -radius:
        return None
    if q > 0 and radius * g_along / math.sqrt(q) <= alpha_max:
        return radius * math.sqrt(q)  # the natural step is feasible
    alpha = min(alpha_max, radius)
    return g_along * alpha + g_across * math.sqrt(max(radius * radius - alpha * alpha, 0.0))


def _assert_feasible(sol, q: float, r: float, s: float, c: float, eps: float) -> None:
    half_norm, bx, _ = _exact_step(sol, q, r, s)
    reach = math.sqrt(2 * eps * max(s, 0.0))
    assert half_norm <= Fraction(eps) * (1 + Fraction(TOL)), (sol, float(half_norm) / eps)
    if sol.case == StepCase.RECOVERY and sol.recovery_scale == pytest.approx(math.sqrt(2 * eps / s), rel=1e-12):
        assert c >= reach * (1 - TOL), sol  # the full-radius recovery only when nothing is feasible
    else:
        assert Fraction(c) + bx <= Fraction(TOL * max(abs(c), reach)), (sol, float(Fraction(c) + bx))


def _colinear(k: float, s: float) -> tuple[float, float]:
    """q and r for g = k b (exactly colinear gradients)."""
    return k * k * s, k * s


@pytest.mark.parametrize(
    ("k", "c", "case", "lam", "nu", "scale"),
    [
        # the reward rises along the cost gradient (k > 0) ...
        (2.0, -0.5, StepCase.FEASIBLE, math.sqrt(4 / 0.02), 0.0, None),  # ... the whole region is safe
        (2.0, -0.05, StepCase.CONSTRAINED, 2 / 0.05, 0.0, None),  # ... up to the constraint boundary
        (2.0, 0.05, StepCase.RECOVERY, None, None, 0.05),  # ... violated: back to the boundary, no further
        (2.0, 0.5, StepCase.RECOVERY, None, None, math.sqrt(0.02)),  # ... nothing feasible: full radius
        # the reward falls along the cost gradient (k < 0): the natural step lowers both
        (-2.0, -0.05, StepCase.CONSTRAINED, math.sqrt(4 / 0.02), 0.0, None),
        (-2.0, 0.05, StepCase.CONSTRAINED, math.sqrt(4 / 0.02), 0.0, None),
        (-2.0, 0.5, StepCase.RECOVERY, None, None, math.sqrt(0.02)),
    ],
)
def test_colinear_gradients_step_along_the_cost_direction(
    k: float, c: float, case: StepCase, lam: float | None, nu: float | None, scale: float | None
) -> None:
    q, r = _colinear(k, 1.0)
    sol = solve_constrained_step(q, r, 1.0, c, 0.01, 1.0)
    assert sol.case == case, sol
    if lam is not None:
        assert sol.lam == pytest.approx(lam, rel=1e-9) and sol.nu == nu
    if scale is not None:
        assert sol.recovery_scale == pytest.approx(scale, rel=1e-9)
    _assert_feasible(sol, q, r, 1.0, c, 0.01)


def test_colinear_gradients_at_the_constraint_limit_take_no_step() -> None:
    sol = solve_constrained_step(*_colinear(2.0, 1.0), 1.0, 0.0, 0.01, 1.0)
    assert sol.case == StepCase.SKIPPED and "along the cost gradient" in sol.reason


def test_nearly_colinear_gradients_keep_the_multipliers_bounded() -> None:
    # cos^2 = 1 - 2e-12: the dual's lambda = sqrt(A / B) would be ~0 and nu ~ r / s, so the caller's
    # (H^-1 g - nu H^-1 b) / lambda would cancel to nothing in float32; the step is taken along b instead
    q, r, s, c, eps = 9828.270083489486, 14.511648785230705, 0.021426756558110438, 1.9e-12, 2.1e-4
    sol = solve_constrained_step(q, r, s, c, eps, 1.0)
    assert sol.case == StepCase.RECOVERY and sol.recovery_scale == pytest.approx(c / s)
    _assert_feasible(sol, q, r, s, c, eps)


@pytest.mark.parametrize(
    ("q", "c", "case", "reason"),
    [
        (1e-10, -0.05, StepCase.SKIPPED, "reward gradient vanishes"),  # nothing to gain, nothing to fix
        (0.0, -0.5, StepCase.SKIPPED, "reward gradient vanishes"),
        (1e-10, 0.05, StepCase.RECOVERY, ""),  # only the constraint to fix: to its boundary
        (1e-10, 0.5, StepCase.RECOVERY, ""),  # nothing feasible: full radius
        (-1e-3, 0.05, StepCase.SKIPPED, "not positive definite"),
    ],
)
def test_a_vanishing_reward_gradient(q: float, c: float, case: StepCase, reason: str) -> None:
    sol = solve_constrained_step(q, 0.0, 1.0, c, 0.01, 1.0)
    assert sol.case == case and reason in sol.reason, sol
    assert "not positive" not in sol.reason or q < 0  # a tiny positive q is not "not positive"
    if case == StepCase.RECOVERY:
        assert sol.recovery_scale == pytest.approx(min(c, math.sqrt(0.02)) / 1.0, rel=1e-9)
        _assert_feasible(sol, q, 0.0, 1.0, c, 0.01)


@pytest.mark.parametrize(
    ("s", "c", "case"),
    [
        (5e-7, -1e-6, StepCase.CONSTRAINED),  # |b|^2 ~ 0 but H^-1 b is not (ill-conditioned H): b'x reaches 1e-4
        (5e-7, -1e-3, StepCase.FEASIBLE),  # ... and here the whole region is safe
        (1e-10, -1e-3, StepCase.FEASIBLE),
        (1e-10, -1e-7, StepCase.SKIPPED),  # b'H^-1 b ~ 0 too, and c within its reach of 0: cannot tell
        (0.0, -1e-7, StepCase.FEASIBLE),  # exactly no cost gradient: any step is safe
    ],
)
def test_a_vanishing_cost_gradient_with_a_small_negative_margin(s: float, c: float, case: StepCase) -> None:
    q, r = 2.0, math.sqrt(2.0 * s) * 0.3
    sol = solve_constrained_step(q, r, s, c, 0.01, 1e-10)
    assert sol.case == case, sol
    if case == StepCase.SKIPPED:
        assert "cost gradient vanishes" in sol.reason
    else:
        _assert_feasible(sol, q, r, s, c, 0.01)


def _ill_conditioned(rng: np.random.Generator, dim: int, condition: float) -> np.ndarray:
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return (basis * np.geomspace(1.0, condition, dim)) @ basis.T * 0.01  # eigenvalues 0.01 (damping) ... 0.01 cond


def test_ill_conditioned_fisher_steps_are_feasible_and_optimal() -> None:
    rng = np.random.default_rng(12)
    for _ in range(300):
        dim = int(rng.integers(2, 8))
        h = _ill_conditioned(rng, dim, 10 ** rng.uniform(2, 9))
        g, b = rng.normal(size=dim) * 10 ** rng.uniform(-3, 1), rng.normal(size=dim) * 10 ** rng.uniform(-5, 1)
        if rng.random() < 0.3:  # nearly colinear gradients
            g = b * rng.choice([-1, 1]) * 10 ** rng.uniform(-1, 1) + rng.normal(size=dim) * 1e-7
        hinv_g, hinv_b = np.linalg.solve(h, g), np.linalg.solve(h, b)
        q, r, s = float(g @ hinv_g), float(g @ hinv_b), float(b @ hinv_b)
        eps = float(10 ** rng.uniform(-4, -1))
        c = float(rng.choice([-1, 1]) * math.sqrt(2 * eps * s) * 10 ** rng.uniform(-3, 0.5))
        sol = solve_constrained_step(q, r, s, c, eps, float(b @ b))
        if sol.case == StepCase.SKIPPED:  # only for a gradient lost in round-off
            assert s <= 1e-8 and "cost gradient vanishes" in sol.reason or q <= 1e-8 and c <= 0, sol
            continue
        _assert_feasible(sol, q, r, s, c, eps)
        x = -sol.recovery_scale * hinv_b if sol.case == StepCase.RECOVERY else (hinv_g - sol.nu * hinv_b) / sol.lam
        reach = math.sqrt(2 * eps * s)
        # the step as the caller builds it, in float64 with the explicit matrix
        assert x @ h @ x / 2 <= eps * (1 + 1e-5)
        if sol.case != StepCase.RECOVERY or c < reach:
            assert c + b @ x <= 1e-5 * max(abs(c), reach)
        best = _optimum(q, r, s, c, eps)
        if best is not None and q > 1e-8:  # below, the reward gradient is taken as 0
            assert g @ x >= best - 1e-3 * math.sqrt(2 * eps * q)


def _consistent_r(q: float, s: float, cosine: float) -> float:
    """r = cos sqrt(q s), nudged towards 0 until r^2 <= q s holds in floats (any real H gives that)."""
    r = cosine * math.sqrt(q * s)
    while r * r > q * s:
        r = math.nextafter(r, 0.0)
    return r


magnitude = st.one_of(
    st.just(0.0),
    st.floats(min_value=-14, max_value=5).map(lambda e: 10.0**e),
)
cosines = st.one_of(
    st.floats(min_value=-1.0, max_value=1.0),
    st.sampled_from([-1.0, 1.0, 0.0]),
    st.floats(min_value=-16, max_value=-2).map(lambda e: 1.0 - 10.0**e),
    st.floats(min_value=-16, max_value=-2).map(lambda e: -1.0 + 10.0**e),
)
margins = st.one_of(
    st.just(0.0),
    st.tuples(st.sampled_from([-1.0, 1.0]), st.floats(min_value=-14, max_value=3)).map(lambda t: t[0] * 10.0 ** t[1]),
)
SKIP_REASONS = ("reward gradient vanishes", "cost gradient vanishes", "along the cost gradient")


@settings(max_examples=2000, deadline=None)
@given(q=magnitude, s=magnitude, cosine=cosines, c=margins, eps=st.floats(-6, 0).map(lambda e: 10.0**e))
def test_every_step_is_feasible_or_a_stated_skip(q: float, s: float, cosine: float, c: float, eps: float) -> None:
    r = _consistent_r(q, s, cosine)
    sol = solve_constrained_step(q, r, s, c, eps, s)
    reach = math.sqrt(2 * eps * s)
    if sol.case == StepCase.SKIPPED:
        assert any(reason in sol.reason for reason in SKIP_REASONS), sol
        # only where nothing is to be gained or the cost direction is lost in round-off
        vanishing = q <= 1e-8 or "along the cost gradient" in sol.reason
        assert s <= 1e-8 or vanishing and c / s <= 0.0, sol
        return
    _assert_feasible(sol, q, r, s, c, eps)
    if c < 0 and reach <= -c:
        assert sol.case == StepCase.FEASIBLE  # the whole region is safe: the paper's natural step
    best = None if s == 0.0 else _optimum(q, r, s, c, eps)
    _, _, objective = _exact_step(sol, q, r, s)
    if best is None:
        assert sol.case in (StepCase.RECOVERY, StepCase.FEASIBLE)
    elif q > 1e-8:
        assert float(objective) >= best - 1e-3 * math.sqrt(2 * eps * q), (sol, float(objective), best)


# ------------------------------------------------------------------ cost_step="multiplier"
@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0, 4.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiplier_step_is_the_best_point_of_the_region_for_the_weighted_objective(weight: float, seed: int) -> None:
    """Against a general-purpose constrained optimiser (scipy's SLSQP) on an explicit H."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    n, eps = 5, 0.02
    root = rng.normal(size=(n, n))
    hessian = root @ root.T + 0.5 * np.eye(n)
    g, b = rng.normal(size=n), rng.normal(size=n)
    hinv_g, hinv_b = np.linalg.solve(hessian, g), np.linalg.solve(hessian, b)
    q, r, s = g @ hinv_g, g @ hinv_b, b @ hinv_b
    coefficients = multiplier_step(q, r, s, weight, eps)
    assert coefficients is not None
    step = coefficients[0] * hinv_g - coefficients[1] * hinv_b
    direction = g / math.sqrt(q) - weight * b / math.sqrt(s)
    reference = minimize(
        lambda x: -direction @ x,
        np.zeros(n),
        jac=lambda x: -direction,
        constraints=[{"type": "ineq", "fun": lambda x: eps - 0.5 * x @ hessian @ x, "jac": lambda x: -hessian @ x}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert reference.success
    assert 0.5 * step @ hessian @ step == pytest.approx(eps, rel=1e-9)  # the whole radius
    np.testing.assert_allclose(step, reference.x, rtol=1e-4, atol=1e-6)


def test_multiplier_step_ends_and_corner_cases() -> None:
    q, r, s, eps = 2.0, 0.5, 3.0, 0.01
    # weight 0: the natural reward step sqrt(2 eps / q) H^-1 g
    assert multiplier_step(q, r, s, 0.0, eps) == pytest.approx((math.sqrt(2 * eps / q), 0.0))
    # a very large weight: the full-radius recovery step sqrt(2 eps / s) H^-1 b
    a, c = multiplier_step(q, r, s, 1e9, eps)  # type: ignore[misc]
    assert a == pytest.approx(0.0, abs=1e-9) and c == pytest.approx(math.sqrt(2 * eps / s), rel=1e-6)
    # a vanishing cost gradient drops out: the natural step whatever the weight
    assert multiplier_step(q, 0.0, 1e-12, 3.0, eps) == pytest.approx((math.sqrt(2 * eps / q), 0.0))
    # a vanishing reward gradient: the recovery step if weighted, nothing otherwise
    assert multiplier_step(1e-12, 0.0, s, 2.0, eps) == pytest.approx((0.0, math.sqrt(2 * eps / s)))
    assert multiplier_step(1e-12, 0.0, s, 0.0, eps) is None
    # colinear and opposite unit directions at weight 1 cancel: nothing to step along
    assert multiplier_step(1.0, 1.0, 1.0, 1.0, eps) is None
    for bad in ((math.nan, r, s, 1.0, eps), (q, r, math.inf, 1.0, eps), (q, r, s, -1.0, eps), (q, r, s, 1.0, 0.0)):
        assert multiplier_step(*bad) is None


def test_cost_multiplier_follows_the_measured_relative_excess() -> None:
    limit, lr = 0.05, 0.1
    assert update_cost_multiplier(0.0, 0.075, limit, lr, 10.0) == pytest.approx(0.05)  # 50% over: +lr/2
    assert update_cost_multiplier(0.0, 0.5, limit, lr, 10.0) == pytest.approx(0.9)  # 900% over: +9 lr
    assert update_cost_multiplier(1.0, 0.0, limit, lr, 10.0) == pytest.approx(0.9)  # no cost: -lr
    assert update_cost_multiplier(1.0, 0.025, limit, lr, 10.0) == pytest.approx(0.95)
    assert update_cost_multiplier(0.02, 0.0, limit, lr, 10.0) == 0.0  # projected at 0
    assert update_cost_multiplier(9.95, 1.0, limit, lr, 10.0) == 10.0  # and at the largest weight
    assert update_cost_multiplier(0.7, math.nan, limit, lr, 10.0) == 0.7
    with pytest.raises(ValueError, match="positive cost limit"):
        update_cost_multiplier(0.0, 0.1, 0.0, lr, 10.0)
    # it settles where the mean cost is at the limit, also for skewed costs (the median far below)
    rng = np.random.default_rng(0)
    weight, history = 0.0, []
    for _ in range(20_000):
        # the cost falls with the weight; most windows cost nothing, a few a lot
        cost = rng.exponential(0.2) if rng.random() < 0.6 / (1.0 + weight) else 0.0
        weight = update_cost_multiplier(weight, cost, limit, 0.01, 100.0)
        history.append(cost)
    assert np.mean(history[-10_000:]) == pytest.approx(limit, rel=0.1)
    assert np.median(history[-10_000:]) == 0.0
