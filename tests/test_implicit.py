"""Chapter 8 (derivlib.implicit) against jax.vjp of unrolled JAX solvers, finite
differences of refits, and the dot-product test.

The oracles are JAX solvers run to convergence (Newton's method for the fits, the
fixed-point iteration for undistortion) and differentiated through every iteration;
they never call derivlib's derivative code.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derivlib.check import check_dot_product, jax_vjp, relative_error
from derivlib.implicit import (
    umeyama,
    umeyama_jvp,
    umeyama_vjp,
    implicit_jvp,
    implicit_vjp,
    logistic_fit,
    logistic_fit_jvp,
    logistic_fit_vjp,
    multinomial_fit,
    multinomial_fit_jvp,
    multinomial_fit_vjp,
    pnp_pose,
    pnp_pose_covariance,
    pnp_pose_hessian,
    pnp_pose_jvp,
    pnp_pose_pullback,
    pnp_pose_vjp,
    sinkhorn,
    sinkhorn_jvp,
    sinkhorn_vjp,
    undistort,
    undistort_jvp,
    undistort_vjp,
)

D, N, K = 4, 30, 3


def _data(rng):
    X = rng.standard_normal((D, N))
    y = (rng.random(N) < 1 / (1 + np.exp(-X[0]))).astype(float)
    Y = np.eye(K)[:, rng.integers(0, K, N)]
    return X, y, Y


@partial(jax.jit, static_argnums=3)
def _newton_logistic(X, y, s, k=25):
    l2 = jnp.exp(s)

    def step(_, th):
        p = jax.nn.sigmoid(X.T @ th)
        g = X @ (p - y) + l2 * th
        H = (X * (p * (1 - p))) @ X.T + l2 * jnp.eye(X.shape[0])
        return th - jnp.linalg.solve(H, g)

    return jax.lax.fori_loop(0, k, step, jnp.zeros(X.shape[0]))


@jax.jit
def _newton_multinomial(X, Y, s):
    l2 = jnp.exp(s)
    d, k = X.shape[0], Y.shape[0]

    def step(_, T):
        P = jax.nn.softmax(T.T @ X, axis=0)
        g = (X @ (P - Y).T + l2 * T).ravel(order="F")
        S = jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p), in_axes=1)(P)
        H = jnp.einsum("nab,cn,en->acbe", S, X, X).reshape(d * k, d * k)
        H = H + l2 * jnp.eye(d * k)
        return T - jnp.linalg.solve(H, g).reshape(k, d).T

    return jax.lax.fori_loop(0, 20, step, jnp.zeros((d, k)))


# ----- The general pair -----


def test_implicit_pair_solves_the_linearised_equation(rng):
    A = rng.standard_normal((5, 5)) + 3 * np.eye(5)
    B = rng.standard_normal((5, 3))
    dtheta, G = rng.standard_normal(3), rng.standard_normal(5)
    dx = implicit_jvp(A, B, dtheta)
    assert relative_error(A @ dx, -B @ dtheta) < 1e-12
    J = -np.linalg.solve(A, B)
    assert relative_error(implicit_vjp(A, B, G), J.T @ G) < 1e-12
    check_dot_product(
        "implicit_jvp / implicit_vjp",
        lambda theta, dtheta: implicit_jvp(A, B, dtheta),
        lambda theta, W: implicit_vjp(A, B, W),
        [((np.zeros(3),), (dtheta,), G)],
    )


def test_singular_A_is_refused_with_its_pivot_and_condition(rng):
    A = np.outer(rng.standard_normal(4), rng.standard_normal(4))
    B = rng.standard_normal((4, 2))
    with pytest.raises(ValueError, match="singular.*smallest LU pivot.*condition"):
        implicit_jvp(A, B, np.ones(2))
    with pytest.raises(ValueError, match="singular"):
        implicit_vjp(A, B, np.ones(4))
    nearly = np.diag([1.0, 1.0, 1e-14])
    with pytest.raises(ValueError, match="reciprocal condition number"):
        implicit_vjp(nearly, np.eye(3), np.ones(3))


def test_unconverged_solver_is_refused():
    A, B = np.eye(2), np.eye(2)
    with pytest.raises(ValueError, match="did not converge.*0.001"):
        implicit_jvp(A, B, np.ones(2), residual=np.array([1e-3, 0.0]))
    assert implicit_vjp(A, B, np.ones(2), residual=np.array([1e-12, 0.0])).shape == (2,)


def test_bad_shapes_are_refused(rng):
    with pytest.raises(ValueError, match="square"):
        implicit_jvp(np.ones((2, 3)), np.ones((2, 1)), np.ones(1))
    with pytest.raises(ValueError, match="2 rows"):
        implicit_vjp(np.eye(2), np.ones((3, 1)), np.ones(2))
    with pytest.raises(ValueError, match=r"dtheta must have shape \(1,\)"):
        implicit_jvp(np.eye(2), np.ones((2, 1)), np.ones(2))


# ----- Fitted models -----


def test_logistic_fit_rules_match_jax_through_newton(rng):
    X, y, _ = _data(rng)
    s = np.array(np.log(0.3))
    G = rng.standard_normal(D)
    theirs = jax_vjp(lambda X, s: _newton_logistic(X, y, s), (X, s), G)
    ours = logistic_fit_vjp(X, s, G, y=y)
    for a, b in zip(ours, theirs):
        assert relative_error(a, b) < 1e-9
    points = [
        ((X, s), (rng.standard_normal((D, N)), np.array(rng.standard_normal())), G)
        for _ in range(3)
    ]
    check_dot_product(
        "logistic_fit_jvp / _vjp",
        partial(logistic_fit_jvp, y=y),
        partial(logistic_fit_vjp, y=y),
        points,
    )


def test_logistic_hypergradient_matches_finite_differences_of_refits(rng):
    X, y, _ = _data(rng)
    s, h, G = np.log(0.5), 1e-5, rng.standard_normal(D)
    fd = G @ (logistic_fit(X, s + h, y=y) - logistic_fit(X, s - h, y=y)) / (2 * h)
    assert relative_error(logistic_fit_vjp(X, s, G, y=y)[1], fd) < 1e-7


def test_logistic_fit_refuses_an_unconverged_theta(rng):
    X, y, _ = _data(rng)
    theta = np.zeros(D)  # the starting point of Newton's method, not a solution
    with pytest.raises(
        ValueError,
        match=r"logistic fit: the solver did not converge: max \|gradient\| / n",
    ):
        logistic_fit_vjp(X, 0.0, np.ones(D), y=y, theta=theta)
    with pytest.raises(ValueError, match="log_l2 must be finite"):
        logistic_fit(X, 1e4, y=y)
    with pytest.raises(ValueError, match="labels in"):
        logistic_fit_vjp(X, 0.0, np.ones(D), y=2 * y, theta=theta)
    with pytest.raises(ValueError, match="one label per column"):
        logistic_fit_jvp(X, 0.0, X, 1.0, y=y[:-1], theta=theta)


def test_multinomial_fit_rules_match_jax_through_newton(rng):
    X, _, Y = _data(rng)
    s = np.array(np.log(0.7))
    G = rng.standard_normal((D, K))
    theirs = jax_vjp(lambda X, s: _newton_multinomial(X, Y, s), (X, s), G)
    ours = multinomial_fit_vjp(X, s, G, Y=Y)
    for a, b in zip(ours, theirs):
        assert relative_error(a, b) < 1e-9
    assert (
        relative_error(multinomial_fit(X, s, Y=Y), _newton_multinomial(X, Y, s)) < 1e-9
    )
    check_dot_product(
        "multinomial_fit_jvp / _vjp",
        partial(multinomial_fit_jvp, Y=Y),
        partial(multinomial_fit_vjp, Y=Y),
        [((X, s), (rng.standard_normal((D, N)), np.array(0.3)), G)],
    )


# ----- Fixed points -----


@jax.jit
def _undistort_jax(u, k):
    def step(_, x):
        r = jnp.sum(x * x, axis=0)
        return u / (1 + k[0] * r + k[1] * r**2)

    return jax.lax.fori_loop(0, 200, step, u)


def test_undistort_rules_match_jax_through_the_iteration(rng):
    u, k = 0.4 * rng.standard_normal((2, 6)), np.array([-0.2, 0.05])
    x = undistort(u, k)
    rho = np.sum(x * x, axis=0)
    assert relative_error(x * (1 + k[0] * rho + k[1] * rho**2), u) < 1e-13
    G = rng.standard_normal((2, 6))
    for a, b in zip(undistort_vjp(u, k, G), jax_vjp(_undistort_jax, (u, k), G)):
        assert relative_error(a, b) < 1e-10
    check_dot_product(
        "undistort_jvp / _vjp",
        undistort_jvp,
        undistort_vjp,
        [((u, k), (rng.standard_normal((2, 6)), rng.standard_normal(2)), G)],
    )


def test_undistort_refuses_divergence_and_a_fold(rng):
    with pytest.raises(ValueError, match="did not converge.*not a contraction"):
        undistort(np.array([[1.5], [0.0]]), np.array([-0.5, 0.0]))  # no root
    with pytest.raises(ValueError, match="beyond the fold"):
        undistort(np.array([[2.0], [0.0]]), np.array([-0.5, 0.0]))  # x = -2
    # at r^2 = 1/3 with k1 = -1 the map x (1 - r^2) folds: d/dr [r (1 - r^2)] = 0
    x = np.array([[np.sqrt(1 / 3)], [0.0]])
    u = x * (1 - 1 / 3)
    with pytest.raises(ValueError, match="singular at point 0"):
        undistort_vjp(u, np.array([-1.0, 0.0]), np.ones((2, 1)), x=x)
    with pytest.raises(ValueError, match=r"shape \(2, n\)"):
        undistort(np.ones((3, 2)), np.zeros(2))


# ----- the PnP pose as a layer -----

KCAM = np.array([[500.0, 0.0, 320.0], [0.0, 480.0, 240.0], [0.0, 0.0, 1.0]])


def _pnp_scene(rng, n=8, noise=2.0):
    from derivlib.geometry.lie import rodrigues

    X = rng.uniform(-1, 1, (3, n))
    p = rodrigues(np.array([0.1, -0.2, 0.15])) @ X + np.array([[0.1], [-0.1], [5.0]])
    u = (KCAM @ p)[:2] / p[2] + rng.normal(0, noise, (2, n))
    wts = rng.uniform(0.5, 1.5, n)
    return X, u, wts, pnp_pose(X, KCAM, u, weights=wts)


def _exp_series(w):
    """Exp by its series to order 4: exact derivatives at w = 0 up to order 3 (the
    Hessian needs 2), with none of the 0/0 of Rodrigues' formula at the origin."""
    W = jnp.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])
    out, term = jnp.eye(3), jnp.eye(3)
    for k in range(1, 5):
        term = term @ W / k
        out = out + term
    return out


def _pnp_cost(delta, R0, t0, X, u, wts):
    p = R0 @ _exp_series(delta[:3]) @ X + (t0 + delta[3:])[:, None]
    q = (KCAM @ p)[:2] / p[2]
    return 0.5 * jnp.sum(wts * jnp.sum((q - u) ** 2, axis=0))


def _pnp_residuals(delta, R0, t0, X, u):  # (2n,): the pixel residuals, unweighted
    p = R0 @ _exp_series(delta[:3]) @ X + (t0 + delta[3:])[:, None]
    return ((KCAM @ p)[:2] / p[2] - u).ravel(order="F")


def _gauss_newton_pnp(R0, t0, X, u, wts):
    """Ten Gauss-Newton steps on the pose's right perturbation, from the converged
    pose: jax.vjp through them is the unrolled oracle (each step contracts the error
    of the derivative by |H_GN^-1 (H - H_GN)|, about 0.02 here)."""

    def residual(delta, u, wts):
        p = R0 @ _exp_series(delta[:3]) @ X + (t0 + delta[3:])[:, None]
        return (jnp.sqrt(wts) * ((KCAM @ p)[:2] / p[2] - u)).ravel()

    def step(_, delta):
        r = residual(delta, u, wts)
        J = jax.jacfwd(residual)(delta, u, wts)
        return delta - jnp.linalg.solve(J.T @ J, J.T @ r)

    return jax.lax.fori_loop(0, 10, step, jnp.zeros(6))


@jax.jit
def _gauss_newton_pnp_vjp(R0, t0, X, u, wts, G):
    _, pullback = jax.vjp(lambda u, w: _gauss_newton_pnp(R0, t0, X, u, w), u, wts)
    return pullback(G)


_pnp_hessian_jax = jax.jit(jax.hessian(_pnp_cost))


def test_pnp_hessian_matches_jax_hessian_and_gauss_newton_drops_a_term(rng):
    from derivlib.geometry.lie import rodrigues

    X, u, wts, xi = _pnp_scene(rng)
    R0, t0 = rodrigues(xi[:3]), xi[3:]
    theirs = np.asarray(_pnp_hessian_jax(jnp.zeros(6), R0, t0, X, u, wts))
    exact = pnp_pose_hessian(X, KCAM, u, weights=wts, xi=xi)
    gn = pnp_pose_hessian(X, KCAM, u, weights=wts, xi=xi, hessian="gauss-newton")
    assert relative_error(exact, theirs) < 1e-12
    assert relative_error(gn, theirs) > 1e-4  # the second-order term is not small
    # E, and so H, is linear in the weights
    tripled = pnp_pose_hessian(X, KCAM, u, weights=3 * wts, xi=xi)
    assert relative_error(tripled, 3 * exact) < 1e-12


def test_pnp_rules_match_jax_through_unrolled_gauss_newton(rng):
    from derivlib.geometry.lie import rodrigues

    X, u, wts, xi = _pnp_scene(rng)
    R0, t0 = rodrigues(xi[:3]), xi[3:]
    G = rng.standard_normal(6)
    theirs = [np.asarray(g) for g in _gauss_newton_pnp_vjp(R0, t0, X, u, wts, G)]
    ours = pnp_pose_vjp(X, KCAM, u, G, weights=wts, xi=xi)
    for a, b in zip(ours, theirs):
        # the pose is stationary to the solver's tolerance, not exactly
        assert relative_error(a, b) < 1e-7
    gn = pnp_pose_vjp(X, KCAM, u, G, weights=wts, xi=xi, hessian="gauss-newton")
    assert relative_error(gn[0], theirs[0]) > 1e-4  # the check has teeth
    du, dw = rng.standard_normal(u.shape), rng.standard_normal(wts.shape)
    check_dot_product(
        "pnp_pose_jvp / pnp_pose_vjp",
        lambda u, w, du, dw: pnp_pose_jvp(X, KCAM, u, du, dw, weights=w, xi=xi),
        lambda u, w, G: pnp_pose_vjp(X, KCAM, u, G, weights=w, xi=xi),
        [((u, wts), (du, dw), G)],
    )


def test_pnp_jvp_matches_finite_differences_of_resolves(rng):
    from derivlib.geometry.lie import rodrigues, so3_log

    X, u, wts, xi = _pnp_scene(rng)
    R0 = rodrigues(xi[:3])
    du, dw = rng.standard_normal(u.shape), rng.standard_normal(wts.shape)
    h = 5e-3

    def local(e):
        # tol 1e-15: the cost is then converged to rounding; a tol below the rounding
        # of E leaves the stop to how the last rejected step rounds
        x = pnp_pose(X, KCAM, u + e * du, weights=wts + e * dw, tol=1e-15)
        return np.concatenate([so3_log(R0.T @ rodrigues(x[:3])), x[3:] - xi[3:]])

    # the five-point stencil, O(h^4): a re-solve's own error is divided by h, so a
    # larger h than the two-point difference allows keeps that error small too
    fd = (8 * (local(h) - local(-h)) - local(2 * h) + local(-2 * h)) / (12 * h)
    ours = pnp_pose_jvp(X, KCAM, u, du, dw, weights=wts, xi=xi)
    assert relative_error(ours, fd) < 1e-6
    gn = pnp_pose_jvp(X, KCAM, u, du, dw, weights=wts, xi=xi, hessian="gauss-newton")
    assert relative_error(gn, fd) > 1e-3


def test_pnp_gauss_newton_is_exact_at_zero_residual_and_damping_biases(rng):
    X, u, wts, xi = _pnp_scene(rng, noise=0.0)
    du, dw = rng.standard_normal(u.shape), rng.standard_normal(wts.shape)
    exact = pnp_pose_jvp(X, KCAM, u, du, dw, weights=wts, xi=xi)
    gn = pnp_pose_jvp(X, KCAM, u, du, dw, weights=wts, xi=xi, hessian="gauss-newton")
    assert relative_error(gn, exact) < 1e-8
    damped = pnp_pose_jvp(X, KCAM, u, du, dw, weights=wts, xi=xi, damping=1e3)
    assert relative_error(damped, exact) > 1e-3
    # damping adds 1e3 I to the Hessian of E itself (not to E over the largest weight):
    # H dx_exact = -d(grad E), so the damped rule is (H + 1e3 I)^-1 H dx_exact
    H = pnp_pose_hessian(X, KCAM, u, weights=wts, xi=xi)
    assert (
        relative_error(damped, np.linalg.solve(H + 1e3 * np.eye(6), H @ exact)) < 1e-10
    )


def test_pnp_covariance_is_the_jvp_of_pixel_noise(rng):
    X, u, wts, xi = _pnp_scene(rng)
    C = pnp_pose_covariance(X, KCAM, u, sigma=0.5, weights=wts, xi=xi)
    E = rng.standard_normal((200,) + u.shape)
    zero = np.zeros_like(wts)
    D = np.array(
        [pnp_pose_jvp(X, KCAM, u, 0.5 * e, zero, weights=wts, xi=xi) for e in E]
    )
    assert np.allclose(C, C.T) and np.all(np.linalg.eigvalsh(C) > 0)
    assert relative_error(D.T @ D / len(E), C) < 0.3  # 200 samples: a loose check
    # exactly: C = sigma^2 Jac Jac^T, with Jac = d xi / d u column by column (the
    # forward rule along each pixel coordinate)
    Jac = np.array(
        [
            pnp_pose_jvp(X, KCAM, u, e.reshape(u.shape), zero, weights=wts, xi=xi)
            for e in np.eye(u.size)
        ]
    ).T
    assert relative_error(C, 0.25 * Jac @ Jac.T) < 1e-10


def test_pnp_pose_pullback_is_the_pose_and_its_vjp(rng):
    # the layer's pose is pnp_pose's, bit for bit; its vjp is pnp_pose_vjp at that
    # pose, linearised at the solver's own rotation matrix instead of Exp(Log R), so
    # equal to rounding; one linearisation serves every cotangent
    X, u, wts, _ = _pnp_scene(rng, n=12)
    start = pnp_pose(X, KCAM, u) + 0.05
    for weights in (None, wts, 1e-100 * wts):
        for hessian, damping in (("exact", 0.0), ("gauss-newton", 0.0), ("exact", 3.0)):
            xi, vjp = pnp_pose_pullback(
                X, KCAM, u, weights=weights, xi0=start, hessian=hessian, damping=damping
            )
            assert np.array_equal(xi, pnp_pose(X, KCAM, u, weights=weights, xi0=start))
            for G in rng.standard_normal((3, 6)):
                ours = vjp(G)
                theirs = pnp_pose_vjp(
                    X,
                    KCAM,
                    u,
                    G,
                    weights=weights,
                    xi=xi,
                    hessian=hessian,
                    damping=damping,
                )
                for a, b in zip(ours, theirs):
                    assert relative_error(a, b) < 1e-12
    with pytest.raises(ValueError, match=r"G must have shape \(6,\)"):
        vjp(np.ones(5))
    with pytest.raises(ValueError, match="G must be finite"):
        vjp(np.full(6, np.nan))
    with pytest.raises(ValueError, match="hessian must be"):
        pnp_pose_pullback(X, KCAM, u, hessian="newton")
    with pytest.raises(ValueError, match="damping must be finite"):
        pnp_pose_pullback(X, KCAM, u, damping=-1.0)
    with pytest.raises(ValueError, match="weights must be positive"):
        pnp_pose_pullback(X, KCAM, u, weights=-wts)


def test_the_pnp_rules_lu_is_lapacks_with_the_exact_condition_number(rng):
    # the compiled 6 x 6 LU that the PnP rules solve with: the factors and pivots of
    # LAPACK's dgetrf (scipy's lu_factor), solves with A and A^T, and the reciprocal
    # condition number 1 / (|A|_1 |A^-1|_1) from NumPy's inverse; a singular or NaN
    # Hessian is refused with the message of `factor`
    import scipy.linalg

    from derivlib import _pnp_kernels
    from derivlib.implicit import _pnp_factor

    for _ in range(50):
        A = rng.standard_normal((6, 6)) * np.exp(rng.uniform(-5, 5, 6))
        lu, piv, smallest, rcond = _pnp_kernels.factor(A)
        lu_ref, piv_ref = scipy.linalg.lu_factor(A)
        assert np.array_equal(piv, piv_ref) and relative_error(lu, lu_ref) < 1e-13
        assert abs(smallest / np.abs(np.diag(lu_ref)).min() - 1) < 1e-13
        exact = 1 / (np.linalg.norm(A, 1) * np.linalg.norm(np.linalg.inv(A), 1))
        assert abs(rcond / exact - 1) < 1e-8
        b, x = rng.standard_normal(6), np.empty(6)
        for trans, M in ((0, A), (1, A.T)):
            _pnp_kernels.solve(lu, piv, b, trans, x)
            assert relative_error(x, np.linalg.solve(M, b)) < 1e-10
    A[:, 5] = A[:, 4]  # singular: refused, whatever rounding leaves in the pivot
    for bad in (A, np.full((6, 6), np.nan)):
        with pytest.raises(ValueError, match="singular to working precision"):
            _pnp_factor(bad, "pnp_pose_vjp")


def test_pnp_rules_refuse_unconverged_singular_and_bad_input(rng):
    X, u, wts, xi = _pnp_scene(rng)
    G = np.ones(6)
    # the relative gradient that the message reports, against its definition with
    # JAX's gradient of E and Jacobian of the residuals at the pose xi + 1e-3
    from derivlib.geometry.lie import rodrigues

    far = xi + 1e-3
    R1, t1 = rodrigues(far[:3]), far[3:]
    g = np.asarray(jax.grad(_pnp_cost)(jnp.zeros(6), R1, t1, X, u, wts))
    Jw = np.asarray(
        jax.jacfwd(lambda d: _pnp_residuals(d, R1, t1, X, u))(jnp.zeros(6))
    )  # (2n, 6), unweighted
    rw = np.asarray(_pnp_residuals(jnp.zeros(6), R1, t1, X, u))
    wbar = wts.mean()
    w2 = np.repeat(wts / wbar, 2)  # the weights over their mean, per residual
    expected = np.abs(g / wbar).max() / (
        np.sqrt(np.sum(w2[:, None] * Jw**2)) * (1.0 + np.sqrt(np.sum(w2 * rw**2)))
    )
    for c in (1e-12, 1.0, 1e12):  # scaling every weight leaves the pose, and the test
        with pytest.raises(
            ValueError, match="did not converge: the relative gradient"
        ) as e:
            pnp_pose_vjp(X, KCAM, u, G, weights=c * wts, xi=far)
        reported = float(str(e.value).split(") = ")[1].split(" >")[0])  # 3 digits
        assert abs(reported / expected - 1) < 5e-3, (reported, expected)
    with pytest.raises(ValueError, match="singular"):
        # points a billion units away: a translation moves no image point
        # measurably, so H is singular to working precision
        from derivlib.geometry.lie import rodrigues

        Xfar = X.copy()
        Xfar[2] += 1e9
        p = rodrigues(xi[:3]) @ Xfar + xi[3:, None]
        ufar = (KCAM @ p)[:2] / p[2]
        pnp_pose_vjp(X=Xfar, K=KCAM, u=ufar, G=G, xi=xi)
    with pytest.raises(ValueError, match="weights must be positive"):
        pnp_pose_vjp(X, KCAM, u, G, weights=-wts, xi=xi)
    with pytest.raises(ValueError, match="shape"):
        pnp_pose_jvp(X, KCAM, u, u[:, :3], wts, weights=wts, xi=xi)
    with pytest.raises(ValueError, match="hessian must be"):
        pnp_pose_vjp(X, KCAM, u, G, weights=wts, xi=xi, hessian="newton")
    huge = np.concatenate([[1e200, 0.0, 0.0], xi[3:]])  # |w|^2 overflows
    with pytest.raises(ValueError, match=r"xi\[:3\] must have components of size"):
        pnp_pose_vjp(X, KCAM, u, G, weights=wts, xi=huge)
    with pytest.raises(ValueError, match=r"xi0\[:3\] must have components of size"):
        pnp_pose(X, KCAM, u, weights=wts, xi0=huge)


# ----- Kabsch / Umeyama -----


def _align_jax(X, Y, with_scale=True):
    """Umeyama's solution written with jnp.linalg.svd, whose derivative JAX takes
    through the SVD (distinct singular values): an oracle independent of (8.23)."""
    mx, my = X.mean(axis=1), Y.mean(axis=1)
    Xc, Yc = X - mx[:, None], Y - my[:, None]
    n = X.shape[1]
    U, sig, Vt = jnp.linalg.svd(Yc @ Xc.T / n)
    S = jnp.diag(jnp.ones(3).at[2].set(jnp.sign(jnp.linalg.det(U @ Vt))))
    R = U @ S @ Vt
    s = jnp.trace(jnp.diag(sig) @ S) / (jnp.sum(Xc**2) / n) if with_scale else 1.0
    return R, s, my - s * R @ mx


@partial(jax.jit, static_argnums=4)
def _align_jax_jvp(X, Y, dX, dY, with_scale):
    return jax.jvp(lambda a, b: _align_jax(a, b, with_scale), (X, Y), (dX, dY))[1]


@partial(jax.jit, static_argnums=3)
def _align_jax_vjp(X, Y, G, with_scale):
    return jax.vjp(lambda a, b: _align_jax(a, b, with_scale), X, Y)[1](G)


def _align_pair(rng, reflect):
    from derivlib.geometry.lie import rodrigues

    X = rng.standard_normal((3, 7))
    Y = 1.7 * rodrigues(np.array([0.3, -1.0, 2.0])) @ X + 0.3 * rng.standard_normal(
        (3, 7)
    )
    if reflect:  # the unconstrained best fit is a reflection: S = diag(1, 1, -1)
        Y = np.diag([1.0, 1.0, -1.0]) @ Y
    return X, Y


@pytest.mark.parametrize("reflect", [False, True])
@pytest.mark.parametrize("with_scale", [True, False])
def test_align_rules_match_jax_through_the_svd(rng, reflect, with_scale):
    X, Y = _align_pair(rng, reflect)
    R, s, t = umeyama(X, Y, with_scale=with_scale)
    assert abs(np.linalg.det(R) - 1) < 1e-12
    dX, dY = rng.standard_normal(X.shape), rng.standard_normal(Y.shape)
    theirs = _align_jax_jvp(X, Y, dX, dY, with_scale)
    ours = umeyama_jvp(X, Y, dX, dY, with_scale=with_scale)
    for a, b in zip(ours, theirs):
        assert relative_error(a, np.asarray(b)) < 1e-12
    G = (
        rng.standard_normal((3, 3)),
        0.7 if with_scale else 0.0,
        rng.standard_normal(3),
    )
    G_jax = tuple(jnp.asarray(g, dtype=jnp.float64) for g in G)
    theirs = [np.asarray(g) for g in _align_jax_vjp(X, Y, G_jax, with_scale)]
    for a, b in zip(umeyama_vjp(X, Y, G, with_scale=with_scale), theirs):
        assert relative_error(a, b) < 1e-12
    check_dot_product(
        "align_jvp / align_vjp",
        lambda X, Y, dX, dY: np.concatenate(
            [np.ravel(v) for v in umeyama_jvp(X, Y, dX, dY, with_scale=with_scale)]
        ),
        lambda X, Y, W: umeyama_vjp(
            X, Y, (W[:9].reshape(3, 3), W[9], W[10:]), with_scale=with_scale
        ),
        [((X, Y), (dX, dY), rng.standard_normal(13))],
    )
    h = 1e-6
    central = [
        (a - b) / (2 * h)
        for a, b in zip(
            umeyama(X + h * dX, Y + h * dY, with_scale=with_scale),
            umeyama(X - h * dX, Y - h * dY, with_scale=with_scale),
        )
    ]
    assert relative_error(ours[0], central[0]) < 1e-7


def test_align_planted_rule_without_the_sign_fails_on_a_reflection(rng):
    X, Y = _align_pair(rng, reflect=True)
    dX, dY = rng.standard_normal(X.shape), rng.standard_normal(Y.shape)
    dR = _align_jax_jvp(X, Y, dX, dY, True)[0]
    # sigma_2 + sigma_3 in place of sigma_2 - sigma_3: the polar factor's rule
    M = (Y - Y.mean(1, keepdims=True)) @ (X - X.mean(1, keepdims=True)).T / 7
    U, sig, Vt = np.linalg.svd(M)
    R = umeyama(X, Y)[0]
    dM = (
        (dY - dY.mean(1, keepdims=True)) @ (X - X.mean(1, keepdims=True)).T
        + (Y - Y.mean(1, keepdims=True)) @ (dX - dX.mean(1, keepdims=True)).T
    ) / 7
    E = np.diag([1.0, 1.0, -1.0]) @ U.T @ dM @ Vt.T
    L = sig[:, None] + sig[None, :]
    wrong = R @ Vt.T @ ((E - E.T) / L) @ Vt
    assert relative_error(wrong, np.asarray(dR)) > 1e-2
    assert relative_error(umeyama_jvp(X, Y, dX, dY)[0], np.asarray(dR)) < 1e-12


def test_align_derivative_grows_as_the_gap_closes_and_is_refused_at_it(rng):
    # points near a line, mapped to twice themselves: sigma_2 + sigma_3 closes
    X = np.vstack([rng.standard_normal((1, 6)), np.zeros((2, 6))])
    sizes = []
    for eps in (1e-1, 1e-2, 1e-3):
        Xe = X + eps * rng.standard_normal((3, 6))
        dX = rng.standard_normal((3, 6))
        sizes.append(np.linalg.norm(umeyama_jvp(Xe, 2 * Xe, dX, 0 * dX)[0]))
    assert sizes[1] > 3 * sizes[0] and sizes[2] > 3 * sizes[1]
    with pytest.raises(ValueError, match="alignment is degenerate: sigma_2"):
        umeyama(X, 2 * X)
    # the best orthogonal fit a reflection, M with singular values (3, 1 + delta, 1):
    # lambda_2 + lambda_3 = sigma_2 - sigma_3 = delta closes; as a rotation it does not
    Xw = rng.standard_normal((3, 8))
    Xw -= Xw.mean(axis=1, keepdims=True)
    Xw = np.linalg.solve(np.linalg.cholesky(Xw @ Xw.T / 8), Xw)
    U, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    V, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    dX, dY = rng.standard_normal((3, 8)), rng.standard_normal((3, 8))
    for sign, grows in ((-1.0, True), (1.0, False)):
        sizes = []
        for delta in (1e-1, 1e-2, 1e-3):
            Y = (
                U
                @ np.diag([3.0, 1.0 + delta, sign * np.linalg.det(U @ V.T)])
                @ V.T
                @ Xw
            )
            sizes.append(np.linalg.norm(umeyama_jvp(Xw, Y, dX, dY)[0]))
        assert (sizes[2] > 50 * sizes[0]) == grows
    Y = U @ np.diag([3.0, 1.0, -np.linalg.det(U @ V.T)]) @ V.T @ Xw
    with pytest.raises(ValueError, match="degenerate: sigma_2 - sigma_3"):
        umeyama(Xw, Y)
    with pytest.raises(ValueError, match="all points X coincide"):
        umeyama(np.ones((3, 4)), rng.standard_normal((3, 4)))
    with pytest.raises(ValueError, match="shape \\(3, n\\)"):
        umeyama(np.ones((2, 4)), np.ones((2, 4)))
    X, Y = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    with pytest.raises(ValueError, match=r"G_s must be a scalar, got shape \(2,\)"):
        umeyama_vjp(X, Y, (np.eye(3), np.ones(2), np.ones(3)))


# ----- Sinkhorn -----


@jax.jit
def _sinkhorn_unrolled_vjp(C, G):
    """jax.vjp through 300 log-domain Sinkhorn iterations from f = g = 0."""

    def plan(C, eps=0.5):
        n, m = C.shape
        la, lb = -jnp.log(n) * jnp.ones(n), -jnp.log(m) * jnp.ones(m)

        def step(_, fg):
            f = eps * (la - jax.nn.logsumexp((fg[1][None, :] - C) / eps, axis=1))
            g = eps * (lb - jax.nn.logsumexp((f[:, None] - C) / eps, axis=0))
            return f, g

        f, g = jax.lax.fori_loop(0, 300, step, (jnp.zeros(n), jnp.zeros(m)))
        return jnp.exp((f[:, None] + g[None, :] - C) / eps)

    return jax.vjp(plan, C)[1](G)[0]


def _sinkhorn_cost(rng):
    x, y = rng.standard_normal((2, 5)), rng.standard_normal((2, 6))
    return np.sum((x[:, :, None] - y[:, None, :]) ** 2, axis=0)


def test_sinkhorn_rules_match_jax_unrolled_and_finite_differences(rng):
    C = _sinkhorn_cost(rng)
    G, dC = rng.standard_normal(C.shape), rng.standard_normal(C.shape)
    P = sinkhorn(C, eps=0.5)
    assert np.allclose(P.sum(axis=1), 0.2) and np.allclose(P.sum(axis=0), 1 / 6)
    ours = sinkhorn_vjp(C, G, eps=0.5, P=P)
    theirs = np.asarray(_sinkhorn_unrolled_vjp(C, G))
    assert relative_error(ours, theirs) < 1e-10
    assert relative_error(-G * P / 0.5, theirs) > 1e-2  # potentials held fixed
    h = 1e-6
    central = (sinkhorn(C + h * dC, eps=0.5) - sinkhorn(C - h * dC, eps=0.5)) / (2 * h)
    assert relative_error(sinkhorn_jvp(C, dC, eps=0.5, P=P), central) < 1e-8
    check_dot_product(
        "sinkhorn_jvp / sinkhorn_vjp",
        lambda C, dC: sinkhorn_jvp(C, dC, eps=0.5),
        lambda C, G: sinkhorn_vjp(C, G, eps=0.5),
        [(C, dC, G)],
    )


def test_sinkhorn_refuses_unconverged_and_bad_input(rng):
    C = _sinkhorn_cost(rng)
    with pytest.raises(ValueError, match="did not converge"):
        sinkhorn(C, eps=0.01, max_iter=3)
    with pytest.raises(ValueError, match=r"did not converge: max \|\(P 1 - a"):
        sinkhorn_vjp(C, C, eps=0.5, P=np.full(C.shape, 1 / 25))
    # the right marginals, but not the plan of this C
    with pytest.raises(ValueError, match="P is not of the form"):
        sinkhorn_vjp(C, C, eps=0.5, P=np.full(C.shape, 1 / 30))
    with pytest.raises(ValueError, match="a must be finite"):
        sinkhorn(C, eps=0.5, a=np.r_[np.inf, np.ones(4)], b=np.r_[np.inf, np.ones(5)])
    with pytest.raises(ValueError, match="equal sums"):
        sinkhorn(C, eps=0.5, a=np.ones(5), b=np.ones(6))
    with pytest.raises(ValueError, match="eps must be finite and positive"):
        sinkhorn(C, eps=0.0)


# ----- 8.7 weights trained through the pose -----


def _rot(w):
    from derivlib.geometry.lie import rodrigues

    return rodrigues(w)


def _rot_jax(w):  # Rodrigues' formula in JAX (w away from 0)
    th2 = w @ w
    th = jnp.sqrt(th2)
    W = jnp.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])
    return jnp.eye(3) + jnp.sin(th) / th * W + (1 - jnp.cos(th)) / th2 * W @ W


def test_training_gradient_through_pnp_weights_matches_finite_differences(rng):
    # theta_bar = sum_i w_bar_i w_i (1 - w_i) z_i (8.30) for the pose error loss
    # (8.29), against central differences of re-solves
    Kc = np.array([[500.0, 0.0, 320.0], [0.0, 480.0, 240.0], [0.0, 0.0, 1.0]])
    X = rng.uniform(-1.0, 1.0, (3, 12))
    xi_true = np.array([0.1, -0.2, 0.15, 0.1, -0.1, 5.0])
    p = _rot(xi_true[:3]) @ X + xi_true[3:, None]
    u = (Kc @ p)[:2] / p[2] + rng.standard_normal((2, 12))
    u[:, :3] += 30.0
    Z = np.vstack([np.ones(12), rng.random(12)])

    from derivlib import rodrigues, so3_log

    def sig(a):
        return 1.0 / (1.0 + np.exp(-a))

    def loss(theta, grad=False):
        w = sig(theta @ Z)
        xi = pnp_pose(X, Kc, u, weights=w, xi0=xi_true)
        e_R = so3_log(rodrigues(xi_true[:3]).T @ rodrigues(xi[:3]))
        e_t = xi[3:] - xi_true[3:]
        if not grad:
            return 0.5 * (e_R @ e_R + e_t @ e_t)
        G = np.concatenate([e_R, e_t])
        w_bar = pnp_pose_vjp(X, Kc, u, G, weights=w, xi=xi)[1]
        return Z @ (w_bar * w * (1 - w))

    theta = np.array([0.3, -0.5])
    central = np.array(
        [(loss(theta + 1e-4 * e) - loss(theta - 1e-4 * e)) / 2e-4 for e in np.eye(2)]
    )
    assert relative_error(loss(theta, grad=True), central) < 1e-6


# ----- 8.8 bundle adjustment modulo the gauge -----


@pytest.fixture(scope="module")
def bundle():
    from derivlib import bundle_adjust, make_scene

    scene = make_scene(m=3, n=8, noise=1.0, seed=5, visibility=1.0)
    x = bundle_adjust(scene.problem, scene.x0, tol=1e-14)[0]
    return scene.problem, x


def _shape_gradient(problem, x):  # of |X_0 - X_1|^2 / |X_2 - X_3|^2, gauge-invariant
    X = problem.unpack(x)[1]
    a, b = X[:, 0] - X[:, 1], X[:, 2] - X[:, 3]
    L = (a @ a) / (b @ b)
    G = np.zeros_like(x)
    s = 6 * problem.m
    G[s : s + 12] = np.concatenate([a, -a, -L * b, L * b]) * 2 / (b @ b)
    return G


def _resolve(problem, x, du, h, fixed=None):
    from derivlib import BundleProblem, bundle_adjust

    moved = BundleProblem.create(
        problem.K,
        problem.cam,
        problem.point,
        problem.u + h * du,
        problem.m,
        problem.n,
        fixed=fixed,
    )
    return bundle_adjust(moved, x, tol=1e-14)[0]


def test_bundle_hessian_matches_jax_and_is_singular_along_the_gauge(bundle, rng):
    from derivlib import gauge_directions
    from derivlib.implicit import bundle_adjust_hessian

    problem, x = bundle
    m, n, cam, point, K = problem.m, problem.n, problem.cam, problem.point, problem.K

    def E(x):
        poses, X = x[: 6 * m].reshape(m, 6), x[6 * m :].reshape(n, 3).T
        Rs = jax.vmap(_rot_jax)(poses[:, :3])
        p = jnp.einsum("kab,bk->ak", Rs[cam], X[:, point]) + poses[cam, 3:].T
        r = K[:2, :2] @ (p[:2] / p[2]) + K[:2, 2:3] - problem.u
        return 0.5 * jnp.sum(r**2)

    V = rng.standard_normal((x.size, 2))
    hvp = jax.jit(lambda v: jax.jvp(jax.grad(E), (x,), (v,))[1])
    HV = np.stack([np.asarray(hvp(v)) for v in V.T], axis=1)
    H = bundle_adjust_hessian(problem, x)
    assert relative_error(H @ V, HV) < 1e-10
    gn = bundle_adjust_hessian(problem, x, hessian="gauss-newton")
    assert relative_error(gn @ V, HV) > 1e-5
    N = gauge_directions(problem, x)
    # H N = 0 at an exact minimum; here to the solver's residual gradient
    assert np.linalg.norm(H @ N) < 1e-10 * np.linalg.norm(H) * np.linalg.norm(N)
    assert np.sum(np.abs(np.linalg.eigvalsh(H)) < 1e-10 * np.linalg.norm(H, 2)) == 7


def test_bundle_vjp_of_an_invariant_loss_is_the_same_under_two_gauges(bundle, rng):
    from derivlib.implicit import bundle_adjust_jvp, bundle_adjust_vjp

    problem, x = bundle
    G = _shape_gradient(problem, x)
    du = rng.standard_normal(problem.u.shape)
    expected = np.sum(bundle_adjust_vjp(problem, x, G) * du)
    for fixed in (None, [6, 7, 8, 9, 10, 11, 15]):
        xp, xm = (_resolve(problem, x, du, h, fixed) for h in (1e-3, -1e-3))
        # the re-solves stop where the cost's decrease reaches rounding, which leaves
        # x off by about 1e-8: central differences with h = 1e-3 agree to ~1e-5
        assert relative_error(G @ (xp - xm) / 2e-3, expected) < 5e-5
    xp, xm = (_resolve(problem, x, du, h) for h in (1e-3, -1e-3))
    dx = bundle_adjust_jvp(problem, x, du)
    assert relative_error(dx, (xp - xm) / 2e-3) < 1e-4
    check_dot_product(
        "bundle_adjust_jvp / bundle_adjust_vjp",
        lambda u, du: bundle_adjust_jvp(problem, x, du),
        lambda u, G: bundle_adjust_vjp(problem, x, G),
        [(problem.u, du, G)],
        tol=1e-9,  # H N = 0 and the two solves hold to the solver's tolerance
    )


def test_bundle_rules_refuse_a_gauge_dependent_loss_and_bad_input(bundle, rng):
    from derivlib import BundleProblem
    from derivlib.implicit import bundle_adjust_jvp, bundle_adjust_vjp

    problem, x = bundle
    G = np.zeros_like(x)
    G[6 * problem.m] = 1.0  # the x coordinate of point 0 sees the gauge
    with pytest.raises(ValueError, match="G sees the gauge"):
        bundle_adjust_vjp(problem, x, G)
    u_bar = bundle_adjust_vjp(problem, x, np.zeros_like(x))
    assert u_bar.shape == problem.u.shape and not np.any(u_bar)
    with pytest.raises(ValueError, match="did not converge"):
        bundle_adjust_vjp(problem, x + 1e-3, _shape_gradient(problem, x))
    with pytest.raises(ValueError, match="G must have the shape of x"):
        bundle_adjust_vjp(problem, x, np.ones(3))
    with pytest.raises(ValueError, match="du must have the shape"):
        bundle_adjust_jvp(problem, x, np.ones((2, 3)))
    loose = BundleProblem.create(
        problem.K,
        problem.cam,
        problem.point,
        problem.u,
        problem.m,
        problem.n,
        fixed=[0, 1, 2],
    )
    with pytest.raises(ValueError, match="do not fix the gauge"):
        bundle_adjust_jvp(loose, x, rng.standard_normal(problem.u.shape))


def test_bundle_vjp_refuses_bad_options_and_scales_extreme_cotangents(bundle):
    from derivlib.implicit import bundle_adjust_hessian, bundle_adjust_vjp

    problem, x = bundle
    G = _shape_gradient(problem, x)
    u_bar = bundle_adjust_vjp(problem, x, G)
    for s in (1e-300, 1e300):  # |G| would underflow / overflow unscaled
        assert relative_error(bundle_adjust_vjp(problem, x, s * G) / s, u_bar) < 1e-12
    sees = np.zeros_like(x)
    sees[6 * problem.m] = 1e-300  # tiny, and still a loss that sees the gauge
    with pytest.raises(ValueError, match="G sees the gauge"):
        bundle_adjust_vjp(problem, x, sees)
    for bad in (-1.0, np.nan):
        with pytest.raises(ValueError, match="gauge_tol must be finite"):
            bundle_adjust_vjp(problem, x, G, gauge_tol=bad)
    with pytest.raises(ValueError, match="problem must be a BundleProblem"):
        bundle_adjust_hessian("problem", x)


def test_pnp_pose_gives_chapter_6_solvers_answer(rng):
    # pnp_pose runs Chapter 6's Levenberg-Marquardt (solve_least_squares with
    # pose_retract) on validated inputs; the two round differently, so they agree to
    # the solver's accuracy, not bit for bit
    from derivlib import (
        pose_retract,
        reprojection_jacobian_right,
        reprojection_residual,
        rodrigues,
        so3_log,
        solve_least_squares,
    )

    Kc = np.array([[500.0, 0.0, 320.0], [0.0, 480.0, 240.0], [0.0, 0.0, 1.0]])
    for trial in range(20):
        n = int(rng.integers(5, 30))
        X = rng.uniform(-1.0, 1.0, (3, n))
        xi_true = np.concatenate(
            [rng.normal(0.0, 1.0, 3), rng.normal(0.0, 0.3, 2), [rng.uniform(3, 8)]]
        )
        p = _rot(xi_true[:3]) @ X + xi_true[3:, None]
        u = (Kc @ p)[:2] / p[2] + rng.standard_normal((2, n))
        u[:, : n // 4] += rng.uniform(-60.0, 60.0, (2, n // 4))  # outliers
        w = rng.uniform(0.01, 2.0, n)
        start = xi_true + rng.normal(0.0, 0.2, 6)
        s = np.repeat(np.sqrt(w), 2)
        theirs = solve_least_squares(
            lambda xi: s * reprojection_residual(xi, X, Kc, u),
            lambda xi: s[:, None] * reprojection_jacobian_right(xi, X, Kc),
            start,
            "lm",
            1e-12,
            100,
            retract=pose_retract,
        )[0]
        ours = pnp_pose(X, Kc, u, weights=w, xi0=start)
        dw = so3_log(rodrigues(theirs[:3]).T @ rodrigues(ours[:3]))
        gap = np.linalg.norm(np.concatenate([dw, ours[3:] - theirs[3:]]))
        assert gap < 1e-8 * np.linalg.norm(theirs), (trial, gap)


def test_pnp_pose_takes_chapter_6_solvers_steps(rng):
    # not only the same answer: the same iterates. Stopped after k iterations, both
    # solvers report the cost they reached (weights with largest 1, so that pnp_pose's
    # cost, over the largest weight, is the same number), equal to the digits printed
    from derivlib import (
        pose_retract,
        reprojection_jacobian_right,
        reprojection_residual,
        solve_least_squares,
    )
    from derivlib.losses import ConvergenceError

    Kc = np.array([[500.0, 0.0, 320.0], [0.0, 480.0, 240.0], [0.0, 0.0, 1.0]])
    for _ in range(5):
        X = rng.uniform(-1.0, 1.0, (3, 12))
        xi_true = np.concatenate(
            [rng.normal(0.0, 1.0, 3), rng.normal(0.0, 0.3, 2), [rng.uniform(3, 8)]]
        )
        p = _rot(xi_true[:3]) @ X + xi_true[3:, None]
        u = (Kc @ p)[:2] / p[2] + rng.standard_normal((2, 12))
        u[:, :3] += rng.uniform(-60.0, 60.0, (2, 3))  # outliers
        w = rng.uniform(0.01, 2.0, 12)
        w /= w.max()
        start = xi_true + rng.normal(0.0, 0.3, 6)
        s = np.repeat(np.sqrt(w), 2)
        for k in (1, 2, 3):
            with pytest.raises(ConvergenceError) as theirs:
                solve_least_squares(
                    lambda xi: s * reprojection_residual(xi, X, Kc, u),
                    lambda xi: s[:, None] * reprojection_jacobian_right(xi, X, Kc),
                    start,
                    "lm",
                    1e-12,
                    k,
                    retract=pose_retract,
                )
            with pytest.raises(ConvergenceError) as ours:
                pnp_pose(X, Kc, u, weights=w, xi0=start, max_iter=k)
            assert str(ours.value) == str(theirs.value)


def test_pnp_pose_stops_where_chapter_6_solver_stops(rng):
    # at a tol well above rounding, the stopping rules (the gain of E against tol * E,
    # the step against tol * |(w, t)|) decide at the same iteration in both solvers,
    # so they return the same pose to rounding; large rotations and a close scene, so
    # that the angle's share of |(w, t)| matters
    from derivlib import (
        pose_retract,
        reprojection_jacobian_right,
        reprojection_residual,
        solve_least_squares,
    )

    Kc = np.array([[500.0, 0.0, 320.0], [0.0, 480.0, 240.0], [0.0, 0.0, 1.0]])
    for _ in range(30):
        X = rng.uniform(-1.0, 1.0, (3, 12))
        xi_true = np.concatenate(
            [rng.normal(0.0, 1.7, 3), rng.normal(0.0, 0.3, 2), [rng.uniform(2.5, 3.5)]]
        )
        p = _rot(xi_true[:3]) @ X + xi_true[3:, None]
        u = (Kc @ p)[:2] / p[2] + rng.standard_normal((2, 12))
        w = rng.uniform(0.01, 2.0, 12)
        w /= w.max()
        start = xi_true + rng.normal(0.0, 0.3, 6)
        s = np.repeat(np.sqrt(w), 2)
        for tol in (3e-2, 1e-2, 3e-3, 1e-3, 1e-4):
            theirs = solve_least_squares(
                lambda xi: s * reprojection_residual(xi, X, Kc, u),
                lambda xi: s[:, None] * reprojection_jacobian_right(xi, X, Kc),
                start,
                "lm",
                tol,
                100,
                retract=pose_retract,
            )[0]
            ours = pnp_pose(X, Kc, u, weights=w, xi0=start, tol=tol)
            assert relative_error(ours, theirs) < 1e-12, tol


def test_pnp_pose_rejects_a_step_behind_the_camera_as_chapter_6_does(rng):
    # a close scene and a start far off: some trial steps put a point behind the
    # camera; both solvers count them as raising E, and so reach the same pose (at a
    # tol above rounding, where both stop at the same iteration)
    from derivlib import (
        BehindCameraError,
        pose_retract,
        reprojection_jacobian_right,
        reprojection_residual,
        solve_least_squares,
    )

    Kc = np.array([[500.0, 0.0, 320.0], [0.0, 480.0, 240.0], [0.0, 0.0, 1.0]])
    behind = [0]

    def residual(xi, X, u):
        try:
            return reprojection_residual(xi, X, Kc, u)
        except BehindCameraError:
            behind[0] += 1
            raise

    cases = 0
    while cases < 5:
        X = rng.uniform(-1.0, 1.0, (3, 10))
        xi_true = np.concatenate(
            [rng.normal(0.0, 0.3, 3), rng.normal(0.0, 0.3, 2), [rng.uniform(1.3, 1.8)]]
        )
        p = _rot(xi_true[:3]) @ X + xi_true[3:, None]
        start = xi_true + rng.normal(0.0, 0.4, 6)
        if p[2].min() <= 0.05 or (_rot(start[:3]) @ X + start[3:, None])[2].min() <= 0:
            continue
        u = (Kc @ p)[:2] / p[2] + 3.0 * rng.standard_normal((2, 10))
        before = behind[0]
        theirs = solve_least_squares(
            lambda xi: residual(xi, X, u),
            lambda xi: reprojection_jacobian_right(xi, X, Kc),
            start,
            "lm",
            1e-6,
            100,
            retract=pose_retract,
        )[0]
        if behind[0] == before:
            continue  # no step went behind the camera
        cases += 1
        ours = pnp_pose(X, Kc, u, xi0=start, tol=1e-6)
        assert relative_error(ours, theirs) < 1e-12


def test_pnp_rules_are_unchanged_by_scaling_every_weight(rng):
    # the minimiser of (8.15) does not see a common scale of the weights; extreme
    # scales must neither overflow nor underflow (u_bar is unchanged, w_bar / s)
    Kc = np.array([[500.0, 0.0, 320.0], [0.0, 480.0, 240.0], [0.0, 0.0, 1.0]])
    X = rng.uniform(-1.0, 1.0, (3, 8))
    xi_true = np.array([0.1, -0.2, 0.15, 0.1, -0.1, 5.0])
    p = _rot(xi_true[:3]) @ X + xi_true[3:, None]
    u = (Kc @ p)[:2] / p[2] + 2.0 * rng.standard_normal((2, 8))
    w, G = rng.uniform(0.5, 1.5, 8), rng.standard_normal(6)
    xi = pnp_pose(X, Kc, u, weights=w)
    u_bar, w_bar = pnp_pose_vjp(X, Kc, u, G, weights=w, xi=xi)
    for s in (1e-300, 1e306):
        assert relative_error(pnp_pose(X, Kc, u, weights=s * w), xi) < 1e-12
        a, b = pnp_pose_vjp(X, Kc, u, G, weights=s * w, xi=xi)
        assert relative_error(a, u_bar) < 1e-12
        assert relative_error(b * s, w_bar) < 1e-12
