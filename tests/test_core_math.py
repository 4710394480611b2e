"""Layer-1 maths against independent references: slow loops, scipy, Monte Carlo, finite differences."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch as th
from hypothesis import given, settings
from hypothesis import strategies as st

from sb3_offtrc.core import (
    StepCase,
    SurrogateConstants,
    adaptive_trust_region,
    cost_surrogates,
    cvar_coefficient,
    diag_gaussian_kl,
    gaussian_cvar,
    linear_recurrence_backward,
    offpolicy_targets,
    reward_surrogate,
    solve_constrained_step,
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


def _slow_targets(r, c, dones, fails, rho, vr, vr_n, vc, vc_n, var, var_n, gamma, lam, cost_lam=None):
    """Per-step reference written directly from the equations of ALGORITHM.md §3.3 (``cost_lam``: the
    trace decay of the cost-mean and cost-variance recursions, ``lam`` if None)."""
    cost_lam = lam if cost_lam is None else cost_lam
    n = len(r)
    y_r, y_c, z = np.zeros(n), np.zeros(n), np.zeros(n)
    d_r = d_c = eta = 0.0
    for t in reversed(range(n)):
        if dones[t]:
            d_r = d_c = eta = 0.0
        y_r[t] = r[t] + gamma * (1 - fails[t]) * vr_n[t] + gamma * d_r
        y_c[t] = c[t] + gamma * (1 - fails[t]) * vc_n[t] + gamma * d_c
        z[t] = (
            (c[t] + gamma * (1 - fails[t]) * vc_n[t]) ** 2
            - vc[t] ** 2
            + gamma**2 * (1 - fails[t]) * var_n[t]
            + gamma**2 * eta
        )
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
        (dict(q=1.0, r=0.0, s=0.0, c=0.1, eps=0.01, b_norm_sq=1e-20), "~0"),
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
def test_step_solver_never_returns_nan(q: float, r: float, s: float, c: float, eps: float, b2: float) -> None:
    sol = solve_constrained_step(q, r, s, c, eps, b2)
    if sol.case == StepCase.SKIPPED:
        assert sol.reason
    elif sol.case == StepCase.RECOVERY:
        assert math.isfinite(sol.recovery_scale) and sol.recovery_scale > 0
    else:
        assert math.isfinite(sol.lam) and sol.lam > 0
        assert math.isfinite(sol.nu) and sol.nu >= 0
