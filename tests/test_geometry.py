"""Chapter 6: projection, rotations, pose and bundle adjustment, against JAX and scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import least_squares

import derivlib as dl
from derivlib import check

K = np.array([[520.0, 1.5, 310.0], [0.0, 480.0, 250.0], [0.0, 0.0, 1.0]])  # with a skew


# ----- Independent JAX forward functions -----


def hat_jax(w):
    return jnp.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])


def rodrigues_jax(w):
    """exp([w]x) with its own Taylor branch (t < 1e-3) and the textbook closed form above."""
    t2 = w @ w
    small = t2 < 1e-6
    t2s = jnp.where(small, 1.0, t2)
    t = jnp.sqrt(t2s)
    a = jnp.where(small, 1 - t2 / 6 + t2**2 / 120, jnp.sin(t) / t)
    b = jnp.where(small, 0.5 - t2 / 24 + t2**2 / 720, (1 - jnp.cos(t)) / t2s)
    W = hat_jax(w)
    return jnp.eye(3) + a * W + b * W @ W


@jax.jit
def expm_jax(w):
    return jax.scipy.linalg.expm(hat_jax(w))


def project_jax(P, Kj):
    return Kj[:2, :2] @ (P[:2] / P[2]) + Kj[:2, 2:3]


rodrigues_jvp = jax.jit(lambda w, dw: jax.jvp(rodrigues_jax, (w,), (dw,))[1])
project_jac_jax = jax.jit(jax.jacobian(lambda P: project_jax(P, jnp.asarray(K))))
rot_jac_jax = jax.jit(jax.jacobian(lambda w, p: rodrigues_jax(w) @ p))


def random_w(rng, t):
    d = rng.standard_normal(3)
    return t * d / np.linalg.norm(d)


def points_in_front(rng, n):
    P = rng.standard_normal((3, n))
    P[2] = rng.uniform(0.5, 5.0, n)
    return P


# ----- Pinhole projection -----


@given(n=st.sampled_from([1, 4, 9]), seed=st.integers(0, 2**16))
def test_project_and_jacobian_match_jax(n, seed):
    rng = np.random.default_rng(seed)
    P = points_in_front(rng, n)
    u = dl.project(P, K)
    check_u = np.asarray(project_jax(jnp.asarray(P), jnp.asarray(K)))
    assert check.relative_error(u, check_u) < 1e-14
    J_vec = check.to_vec_layout(
        project_jac_jax(jnp.asarray(P)), (2, n), (3, n)
    )  # (2n, 3n)
    blocks = dl.project_jacobian(P, K)
    assert blocks.shape == (n, 2, 3)
    assert check.relative_error(scipy.linalg.block_diag(*blocks), J_vec) < 1e-13


def test_project_single_point_and_shapes():
    p = np.array([0.3, -0.2, 2.0])
    assert dl.project(p, K).shape == (2,)
    assert dl.project_jacobian(p, K).shape == (2, 3)
    with pytest.raises(
        ValueError, match=r"P must have shape \(3,\) or \(3, n\).*got shape \(2, 5\)"
    ):
        dl.project(np.ones((2, 5)), K)
    with pytest.raises(
        ValueError, match=r"K must be a 3 x 3 camera matrix, got shape \(2, 3\)"
    ):
        dl.project(p, K[:2])
    with pytest.raises(ValueError, match=r"K must be upper triangular"):
        dl.project(p, K.T)


@pytest.mark.parametrize("z", [0.0, -1.0, -1e-300])
def test_points_behind_the_camera_raise(z):
    P = np.array([[0.1, 0.2, 0.3], [0.0, 0.1, 0.2], [1.0, z, 2.0]])
    for fn in (dl.project, dl.project_jacobian):
        with pytest.raises(
            ValueError, match=r"P has 1 point\(s\) with depth p_z <= 0.*column 1"
        ):
            fn(P, K)
    assert dl.in_front(P).tolist() == [True, False, True]
    assert np.all(np.isfinite(dl.project(P[:, dl.in_front(P)], K)))


def test_the_in_front_check_refuses_a_nan_depth():
    # the solvers' own points (R X + t, unchecked) are NaN where R X overflows to
    # inf - inf; the fast path of the check must not let a NaN depth through
    from derivlib.geometry.camera import _in_front

    P = np.array([[0.1, 0.2, 0.3], [0.0, 0.1, 0.2], [1.0, np.nan, 2.0]])
    with pytest.raises(dl.BehindCameraError, match=r"1 point\(s\).*column 1"):
        _in_front(P, "P")
    _in_front(P[:, [0, 2]], "P")  # positive depths pass


@pytest.mark.parametrize("z", [1e-320, 1e-160])
def test_points_whose_image_overflows_raise(z):
    """p_z > 0 so small that p_x / p_z (or the Jacobian's p_x / p_z^2) overflows: an explicit
    BehindCameraError, never a NaN (1e-160 overflows only the Jacobian)."""
    P = np.array([[0.1, 1.0], [0.2, 1.0], [1.0, z]])
    fns = (dl.project, dl.project_jacobian) if z < 1e-300 else (dl.project_jacobian,)
    for fn in fns:
        with pytest.raises(
            dl.BehindCameraError,
            match=r"P has 1 point\(s\) whose image overflows.*column 1",
        ):
            fn(P, K)
    if z > 1e-300:
        assert np.all(np.isfinite(dl.project(P, K)))


def test_nan_points_raise():
    with pytest.raises(ValueError, match="P must be finite"):
        dl.project(np.array([0.0, np.nan, 1.0]), K)


# ----- Rotations -----


def test_hat_is_the_cross_product(rng):
    w, v = rng.standard_normal(3), rng.standard_normal(3)
    assert np.allclose(dl.hat(w) @ v, np.cross(w, v), rtol=0, atol=1e-15)
    with pytest.raises(
        ValueError,
        match=r"w must be a rotation vector of shape \(3,\), got shape \(4,\)",
    ):
        dl.hat(np.ones(4))


ANGLES = [
    0.0,
    1e-300,
    1e-12,
    1e-9,
    3e-8,
    1e-5,
    1e-3,
    9.99e-3,
    1e-2,
    1.01e-2,
    0.3,
    1.0,
    2.5,
    np.pi - 1e-6,
    np.pi,
    np.pi + 1e-6,
    5.0,
]


@pytest.mark.parametrize("t", ANGLES)
def test_rodrigues_and_its_jacobian_match_jax(t, rng):
    w, p = random_w(rng, t), rng.standard_normal(3)
    R = dl.rodrigues(w)
    assert check.relative_error(R, np.asarray(expm_jax(jnp.asarray(w)))) < 1e-14
    assert (
        np.allclose(R.T @ R, np.eye(3), rtol=0, atol=4e-15)
        and abs(np.linalg.det(R) - 1) < 1e-14
    )
    J = dl.rotate_jacobian(w, p)
    assert (
        check.relative_error(J, np.asarray(rot_jac_jax(jnp.asarray(w), jnp.asarray(p))))
        < 1e-12
    )


@pytest.mark.parametrize("t", [0.0, 1e-9, 0.7, np.pi - 1e-9])
def test_left_and_right_jacobians(t, rng):
    w = random_w(rng, t)
    R, Jr, Jl = dl.rodrigues(w), dl.right_jacobian(w), dl.left_jacobian(w)
    assert np.allclose(Jl, R @ Jr, rtol=0, atol=1e-15)
    dw = rng.standard_normal(3)
    dR = np.asarray(rodrigues_jvp(jnp.asarray(w), jnp.asarray(dw)))
    assert check.relative_error(R.T @ dR, dl.hat(Jr @ dw)) < 1e-12  # right: R^T dR
    assert check.relative_error(dR @ R.T, dl.hat(Jl @ dw)) < 1e-12  # left: dR R^T


def test_taylor_branch_joins_the_closed_form():
    t = dl.geometry.SMALL_ANGLE
    below, above = (
        dl.rotation_coefficients(t * (1 - 1e-12)),
        dl.rotation_coefficients(t),
    )
    assert np.allclose(below[:2], above[:2], rtol=1e-14, atol=0)
    # (t - sin t) / t^3 keeps a relative error near eps / t^2 = 2e-12 here; it multiplies
    # [w]x^2, of size t^2, so its contribution to J_r is accurate to a few eps.
    assert np.allclose(below[2], above[2], rtol=1e-11, atol=0)
    assert dl.rotation_coefficients(0.0) == (1.0, 0.5, 1.0 / 6.0)


@pytest.mark.parametrize("t", [-5.0, -1e-300, np.nan, np.inf, "angle"])
def test_rotation_coefficients_reject_bad_angles(t):
    with pytest.raises(
        ValueError, match=r"t must be a (finite|real) angle t >= 0.*got"
    ):
        dl.rotation_coefficients(t)


def test_rotate_jacobian_many_points(rng):
    w, P = rng.standard_normal(3), rng.standard_normal((3, 5))
    blocks = dl.rotate_jacobian(w, P)
    assert blocks.shape == (5, 3, 3)
    for i in range(5):
        assert np.allclose(
            blocks[i], dl.rotate_jacobian(w, P[:, i]), rtol=0, atol=1e-15
        )


# ----- Pose: perspective-n-point -----


def pnp_problem(rng, n=12, noise=0.0):
    X = rng.uniform(-1, 1, (3, n))
    xi = np.concatenate([random_w(rng, 0.4), [0.1, -0.2, 4.0]])
    u = dl.project(dl.transform(xi, X), K) + noise * rng.standard_normal((2, n))
    return X, u, xi


def test_reprojection_jacobian_matches_jax(rng):
    X, u, xi = pnp_problem(rng)
    Xj, Kj = jnp.asarray(X), jnp.asarray(K)

    @jax.jit
    def residual_jax(x):
        return (project_jax(rodrigues_jax(x[:3]) @ Xj + x[3:, None], Kj) - u).ravel(
            order="F"
        )

    xi0 = xi + 0.05 * rng.standard_normal(6)
    r = dl.reprojection_residual(xi0, X, K, u)
    assert check.relative_error(r, np.asarray(residual_jax(jnp.asarray(xi0)))) < 1e-13
    J_jax = np.asarray(jax.jit(jax.jacobian(residual_jax))(jnp.asarray(xi0)))
    assert check.relative_error(dl.reprojection_jacobian(xi0, X, K), J_jax) < 1e-12


@pytest.mark.parametrize("method", ["gn", "lm"])
def test_pnp_recovers_the_pose(method, rng):
    X, u, xi = pnp_problem(rng)
    xi_hat, hist = dl.solve_pnp(
        X, K, u, xi0=xi + 0.1 * rng.standard_normal(6), method=method
    )
    assert hist.converged and np.max(np.abs(xi_hat - xi)) < 1e-9
    assert hist.cost[-1] < 1e-12


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_lm_stops_at_a_zero_residual_minimum_even_at_x_zero(offset, rng):
    # noise-free images: at the minimum E is rounding noise, which every model step
    # predicts it can remove, so neither the gain nor the predicted gain falls below
    # tol * E; at the identity pose (x = 0) no step is shorter than tol * |x| either.
    # The flat gradient (|(J^T r)_a| <= tol |J_a| (1 + |r|) for every column a) stops
    # both Levenberg-Marquardt iterations there: Chapter 6's and the compiled one of
    # pnp_pose
    X = rng.uniform(-1.0, 1.0, (3, 20)) + np.array([[0.0], [0.0], [5.0]])
    xi = np.full(6, offset) * np.array([0.1, -0.2, 0.1, 0.3, -0.2, 1.0])
    p = dl.rodrigues(xi[:3]) @ X + xi[3:, None]
    u = (K @ p)[:2] / p[2]
    start = xi + 0.05 * rng.standard_normal(6)
    xi_hat, hist = dl.solve_pnp(X, K, u, xi0=start)
    assert hist.converged and np.abs(xi_hat - xi).max() < 1e-12
    assert np.abs(dl.pnp_pose(X, K, u, xi0=start) - xi).max() < 1e-12
    xi_layer, vjp = dl.pnp_pose_pullback(X, K, u, xi0=start)
    assert np.abs(xi_layer - xi).max() < 1e-12 and np.isfinite(vjp(np.ones(6))[0]).all()


def test_a_flat_gradient_does_not_stop_lm_at_a_badly_scaled_parameter():
    # at x = (0, -3) the first step in x_2 overshoots and is rejected, and x_2's
    # gradient is tiny against the large column of x_1 (|g_2| = 2.5e-7 < 1e-12 |J|):
    # a gradient test against the whole of J would stop there, at E = 2.5e-5, short
    # of the zero-residual minimum x_2 = log 5; column by column it is not flat
    def residual(x):
        return np.array([1e6 * x[0], 1e-3 * (np.exp(x[1]) - 5.0)])

    def jacobian(x):
        return np.array([[1e6, 0.0], [0.0, 1e-3 * np.exp(x[1])]])

    x, hist = dl.solve_least_squares(residual, jacobian, np.array([0.0, -3.0]))
    assert hist.converged and abs(x[1] - np.log(5.0)) < 1e-12 and hist.n_iter > 1


def test_pnp_with_noise_matches_scipy(rng):
    X, u, xi = pnp_problem(rng, n=30, noise=1.0)
    xi_hat, hist = dl.solve_pnp(X, K, u, xi0=xi + 0.05 * rng.standard_normal(6))
    res = least_squares(
        lambda x: dl.reprojection_residual(x, X, K, u),
        xi,
        jac=lambda x: dl.reprojection_jacobian(x, X, K),
        ftol=1e-15,
        xtol=1e-15,
        gtol=1e-15,
    )
    assert (
        abs(2 * res.cost - hist.cost[-1]) <= 1e-10 * hist.cost[-1]
    )  # scipy's cost is E / 2


def test_least_squares_errors(rng):
    X, u, xi = pnp_problem(rng)
    with pytest.raises(ValueError, match="method must be 'gn' or 'lm', got 'newton'"):
        dl.solve_pnp(X, K, u, xi0=xi, method="newton")
    with pytest.raises(
        ValueError,
        match=r"xi0 must be a pose \(w, t\) of shape \(6,\).*got shape \(3,\)",
    ):
        dl.solve_pnp(X, K, u, xi0=xi[:3])
    with pytest.raises(
        ValueError, match=r"u must have shape \(2, 12\).*got shape \(2, 11\)"
    ):
        dl.solve_pnp(X, K, u[:, :11], xi0=xi)
    behind = xi.copy()
    behind[5] = -4.0  # the camera now looks away from the points
    with pytest.raises(
        ValueError, match=r"R\(w\) X \+ t has 12 point\(s\) with depth p_z <= 0"
    ):
        dl.reprojection_residual(behind, X, K, u)
    with pytest.raises(dl.ConvergenceError, match="did not converge in 1 iterations"):
        dl.solve_least_squares(
            lambda x: dl.reprojection_residual(x, X, K, u),
            lambda x: dl.reprojection_jacobian(x, X, K),
            xi + 0.1,
            max_iter=1,
        )


def test_a_stuck_levenberg_marquardt_raises(rng):
    """No step can lower E (a wrong Jacobian; a residual that is infinite, or whose points
    are all behind the camera, away from x0): ConvergenceError, never converged = True."""
    X, u, xi = pnp_problem(rng, noise=0.5)
    x0 = xi + 0.05
    r = lambda x: dl.reprojection_residual(x, X, K, u)
    J = lambda x: dl.reprojection_jacobian(x, X, K)

    def infinite_away(x):
        return r(x) if np.array_equal(x, x0) else np.full(2 * X.shape[1], np.inf)

    def behind_away(x):
        if np.array_equal(x, x0):
            return r(x)
        raise dl.BehindCameraError("every step puts a point behind the camera")

    for residual, jacobian in [
        (r, lambda x: -J(x)),
        (infinite_away, J),
        (behind_away, J),
    ]:
        with pytest.raises(dl.ConvergenceError, match="Levenberg-Marquardt is stuck"):
            dl.solve_least_squares(residual, jacobian, x0)


def test_only_behind_the_camera_is_caught(rng):
    """A ValueError of the user's residual propagates; it is not taken for a rejected step."""
    X, u, xi = pnp_problem(rng)
    calls = []

    def residual(x):
        calls.append(1)
        if len(calls) > 1:
            raise ValueError("a bug in the residual")
        return dl.reprojection_residual(x, X, K, u)

    with pytest.raises(ValueError, match="a bug in the residual"):
        dl.solve_least_squares(
            residual, lambda x: dl.reprojection_jacobian(x, X, K), xi + 0.05
        )
    assert len(calls) == 2


# ----- Bundle adjustment -----


@pytest.fixture(scope="module")
def small_scene():
    return dl.make_scene(m=3, n=12, noise=1.0, seed=4)


def ba_residual_jax(problem):
    cam, point, Kj = problem.cam, problem.point, jnp.asarray(problem.K)
    m, n = problem.m, problem.n

    def residual(x):
        poses, X = x[: 6 * m].reshape(m, 6), x[6 * m :].reshape(n, 3).T
        R = jax.vmap(rodrigues_jax)(poses[:, :3])
        p = jnp.einsum("kab,bk->ak", R[cam], X[:, point]) + poses[cam, 3:].T
        return (project_jax(p, Kj) - problem.u).ravel(order="F")

    return jax.jit(residual)


def test_ba_jacobian_matches_jax(small_scene):
    pr, x = small_scene.problem, small_scene.x0
    residual = ba_residual_jax(pr)
    assert (
        check.relative_error(
            dl.ba_residual(pr, x), np.asarray(residual(jnp.asarray(x)))
        )
        < 1e-13
    )
    J_jax = np.asarray(jax.jit(jax.jacobian(residual))(jnp.asarray(x)))
    J = dl.ba_jacobian(pr, x).toarray()
    assert check.relative_error(J, J_jax) < 1e-12
    assert np.array_equal(
        dl.ba_jacobian(pr, x, free_only=True).toarray(), J[:, pr.free_mask()]
    )
    pattern = dl.ba_sparsity_pattern(pr).toarray()
    assert np.all(J_jax[pattern == 0] == 0) and pattern.sum() == 18 * pr.cam.size


def test_schur_complement_solves_the_normal_equations(small_scene, rng):
    pr, x = small_scene.problem, small_scene.x0
    A, B = dl.ba_jacobian_blocks(pr, x)
    r = dl.ba_residual(pr, x)
    U, W, V, gc, gp = dl.ba_normal_equations(pr, A, B, r)
    J = dl.ba_jacobian(pr, x).toarray()
    H, g = J.T @ J, J.T @ r
    c = 6 * pr.m
    assert (
        check.relative_error(U, H[:c, :c]) < 1e-14
        and check.relative_error(W, H[:c, c:]) < 1e-14
    )
    assert check.relative_error(scipy.linalg.block_diag(*V), H[c:, c:]) < 1e-14
    assert check.relative_error(np.concatenate([gc, gp]), g) < 1e-14
    dc, dp = dl.schur_solve(U, W, V, gc, gp, pr.free)
    keep = np.concatenate([pr.free, np.ones(3 * pr.n, dtype=bool)])
    dense = np.zeros_like(g)
    dense[keep] = np.linalg.solve(H[np.ix_(keep, keep)], -g[keep])
    assert check.relative_error(np.concatenate([dc, dp]), dense) < 1e-9
    assert np.all(dc[~pr.free] == 0)


def test_predicted_decrease_from_the_blocks(small_scene, rng):
    """bundle_adjust's model decrease from U, W, V equals ||r||^2 - ||r + J delta||^2."""
    pr, x = small_scene.problem, small_scene.x0
    A, B = dl.ba_jacobian_blocks(pr, x)
    r = dl.ba_residual(pr, x)
    U, W, V, gc, gp = dl.ba_normal_equations(pr, A, B, r)
    dc, dp = rng.standard_normal(gc.size), rng.standard_normal(gp.size)
    r_lin = r + dl.ba_jacobian(pr, x) @ np.concatenate([dc, dp])
    expected = r @ r - r_lin @ r_lin
    assert abs(
        dl.geometry._predicted_decrease(U, W, V, gc, gp, dc, dp) - expected
    ) <= 1e-10 * abs(r_lin @ r_lin)


def test_gauge_freedom_has_seven_dimensions(small_scene):
    pr = small_scene.problem
    J = dl.ba_jacobian(pr, pr.pack(small_scene.poses, small_scene.X)).toarray()
    s = np.linalg.svd(J, compute_uv=False)
    assert np.sum(s < 1e-9 * s[0]) == 7 and s[-8] > 1e-6 * s[0]
    keep = np.concatenate([pr.free, np.ones(3 * pr.n, dtype=bool)])
    s_fixed = np.linalg.svd(J[:, keep], compute_uv=False)
    assert s_fixed[-1] > 1e-6 * s_fixed[0]


def test_bundle_adjustment_matches_scipy_and_the_truth(small_scene):
    pr = small_scene.problem
    x_hat, hist = dl.bundle_adjust(pr, small_scene.x0)
    keep = np.concatenate([pr.free, np.ones(3 * pr.n, dtype=bool)])

    def full(z):
        x = small_scene.x0.copy()
        x[keep] = z
        return x

    res = least_squares(
        lambda z: dl.ba_residual(pr, full(z)),
        small_scene.x0[keep],
        jac=lambda z: dl.ba_jacobian(pr, full(z))[:, keep],
        x_scale="jac",
        ftol=1e-15,
        xtol=1e-15,
        gtol=1e-15,
    )
    assert hist.converged and abs(2 * res.cost - hist.cost[-1]) <= 1e-8 * hist.cost[-1]
    poses, X = pr.unpack(x_hat)
    assert np.max(np.abs(X - small_scene.X)) < 0.1  # 1 pixel is 0.01 at depth 5
    assert (
        np.all(poses[0] == small_scene.poses[0])
        and poses[1, 3] == small_scene.poses[1, 3]
    )


def test_bundle_problem_errors():
    with pytest.raises(
        ValueError, match=r"cam must index cameras 0..1, got values in \[0, 2\]"
    ):
        dl.BundleProblem.create(
            K, np.array([0, 2]), np.array([0, 1]), np.zeros((2, 2)), 2, 2
        )
    with pytest.raises(ValueError, match="at most once"):
        dl.BundleProblem.create(
            K, np.array([0, 0]), np.array([1, 1]), np.zeros((2, 2)), 2, 2
        )
    with pytest.raises(ValueError, match=r"u must have shape \(2, 2\)"):
        dl.BundleProblem.create(
            K, np.array([0, 1]), np.array([1, 1]), np.zeros((2, 3)), 2, 2
        )
    pr = dl.BundleProblem.create(
        K, np.array([0, 1]), np.array([1, 1]), np.zeros((2, 2)), 2, 2
    )
    with pytest.raises(
        ValueError, match=r"x must have shape \(18,\), got shape \(5,\)"
    ):
        dl.ba_residual(pr, np.zeros(5))


def test_a_stuck_bundle_adjustment_raises(small_scene, monkeypatch):
    """With the Jacobian's sign flipped no step lowers E: ConvergenceError, not converged."""
    blocks = dl.geometry.ba_jacobian_blocks
    monkeypatch.setattr(
        dl.geometry.bundle,
        "ba_jacobian_blocks",
        lambda pr, x: tuple(-M for M in blocks(pr, x)),
    )
    with pytest.raises(dl.ConvergenceError, match="bundle adjustment is stuck"):
        dl.bundle_adjust(small_scene.problem, small_scene.x0)


def test_evaluation_counts_and_a_restart_at_the_minimum(small_scene, rng):
    """The history counts every residual and Jacobian evaluation; restarted at its own
    solution, bundle adjustment stops after one iteration (one Jacobian and one trial
    residual), whose step lowers the cost by at most tol * E and moves x by rounding
    and the solution's own error only."""
    X, u, xi = pnp_problem(rng, noise=0.5)
    calls = {"r": 0, "J": 0}

    def residual(x):
        calls["r"] += 1
        return dl.reprojection_residual(x, X, K, u)

    def jacobian(x):
        calls["J"] += 1
        return dl.reprojection_jacobian(x, X, K)

    for method in ("gn", "lm"):
        calls.update(r=0, J=0)
        _, hist = dl.solve_least_squares(residual, jacobian, xi + 0.05, method=method)
        assert (hist.n_residual, hist.n_jacobian) == (calls["r"], calls["J"])
    pr = small_scene.problem
    x_hat, _ = dl.bundle_adjust(pr, small_scene.x0)
    x_again, hist = dl.bundle_adjust(pr, x_hat)
    assert hist.converged and 0 <= hist.cost[0] - hist.cost[-1] <= 1e-12 * hist.cost[0]
    assert np.linalg.norm(x_again - x_hat) <= 1e-8 * np.linalg.norm(x_hat)
    assert (hist.n_iter, hist.n_jacobian, hist.n_residual) == (1, 1, 2)


def test_fixed_indices_are_validated():
    args = (K, np.array([0, 1]), np.array([1, 1]), np.zeros((2, 2)), 2, 2)
    for fixed in ([100], [-1], [12]):
        with pytest.raises(
            ValueError,
            match=r"fixed must index the pose parameters 0..11 .*got values in",
        ):
            dl.BundleProblem.create(*args, fixed=fixed)
    for fixed in ([1.5], [[0, 1]]):
        with pytest.raises(ValueError, match=r"fixed must be a 1-D list of integer"):
            dl.BundleProblem.create(*args, fixed=fixed)
    assert dl.BundleProblem.create(*args, fixed=[11]).free.tolist() == [True] * 11 + [
        False
    ]


def test_the_gauge_check(small_scene):
    """The default gauge fixes all 7 directions, and the 7 directions of
    gauge_directions are the null space of J; under forward motion (camera 1 straight
    ahead of camera 0) t_x of camera 1 no longer pins the scale, and bundle_adjust says so."""
    pr, x = small_scene.problem, small_scene.x0
    assert dl.gauge_is_fixed(pr, x)
    G = dl.gauge_directions(pr, x)
    assert G.shape == (6 * pr.m + 3 * pr.n, 7) and np.linalg.matrix_rank(G) == 7
    poses, X = pr.unpack(x)
    J = dl.ba_jacobian(pr, x).toarray()
    assert np.linalg.norm(J @ G) < 1e-9 * np.linalg.norm(J) * np.linalg.norm(G)
    free = dl.BundleProblem.create(pr.K, pr.cam, pr.point, pr.u, pr.m, pr.n, fixed=[])
    assert not dl.gauge_is_fixed(free, x)
    forward = poses.copy()
    R0 = dl.rodrigues(poses[0, :3])
    forward[1, :3] = poses[0, :3]
    forward[1, 3:] = poses[0, 3:] - [0.0, 0.0, 1.0]  # camera 1's centre: c_0 + R0^T e_z
    x_fwd = pr.pack(forward, X)
    centre = lambda xi: -dl.rodrigues(xi[:3]).T @ xi[3:]
    assert (
        abs((R0 @ (centre(forward[0]) - centre(forward[1])))[0]) < 1e-15
    )  # no x component
    assert not dl.gauge_is_fixed(pr, x_fwd)
    with pytest.raises(
        ValueError, match=r"fixed = \[0, 1, 2, 3, 4, 5, 9\]\) do not fix the gauge"
    ):
        dl.bundle_adjust(pr, x_fwd)
    s = np.linalg.svd(
        dl.ba_jacobian(pr, x_fwd, free_only=True).toarray(), compute_uv=False
    )
    assert s[-1] < 1e-12 * s[0]


def test_bundle_adjustment_without_noise_recovers_the_truth():
    scene = dl.make_scene(m=3, n=12, noise=0.0, seed=4)
    x_hat, hist = dl.bundle_adjust(scene.problem, scene.x0)
    assert hist.cost[-1] < 1e-20
    assert np.max(np.abs(x_hat - scene.problem.pack(scene.poses, scene.X))) < 1e-10


def test_bundle_adjust_refuses_a_degenerate_problem(small_scene):
    """Observations that cannot determine the unknowns are refused before solving,
    with a ValueError naming the camera or point at fault (a point seen once used to
    'converge' anywhere along its ray; an unseen camera raised LinAlgError)."""
    pr, x0 = small_scene.problem, small_scene.x0

    def sub(keep):
        return dl.BundleProblem.create(
            pr.K, pr.cam[keep], pr.point[keep], pr.u[:, keep], pr.m, pr.n
        )

    once = np.ones(pr.cam.size, dtype=bool)
    once[np.flatnonzero(pr.point == 0)[1:]] = False
    with pytest.raises(ValueError, match="point 0 is seen by 1 camera"):
        dl.bundle_adjust(sub(once), x0)
    with pytest.raises(ValueError, match="camera 2 has 0 observation"):
        dl.bundle_adjust(sub(pr.cam != 2), x0)
    bad = x0.copy()
    bad[-1] = np.nan
    with pytest.raises(ValueError, match="x0 must be finite"):
        dl.bundle_adjust(pr, bad)
    # two cameras at one centre see every point along one ray: each V_i is singular
    two = dl.make_scene(m=2, n=12, noise=1.0, seed=4)
    poses, X = two.problem.unpack(two.x0)
    c0 = -dl.rodrigues(poses[0, :3]).T @ poses[0, 3:]
    poses[1, 3:] = -dl.rodrigues(poses[1, :3]) @ c0
    with pytest.raises(ValueError, match="do not determine point"):
        dl.bundle_adjust(two.problem, two.problem.pack(poses, X), check_gauge=False)


def test_solver_options_and_degenerate_cameras_are_refused(small_scene):
    """tol, max_iter and lam0 a solver cannot run with, a NaN start, a camera matrix
    with a zero focal length and scene parameters outside their range give a
    ValueError naming the argument, where they used to run into ConvergenceError,
    LinAlgError or a silent result."""
    pr, x0 = small_scene.problem, small_scene.x0
    X = np.random.default_rng(0).uniform(-1, 1, (3, 8))
    xi = np.array([0.1, 0.2, 0.3, 0.0, 0.0, 5.0])
    K = pr.K
    u = dl.project(dl.transform(xi, X), K)
    for kwargs, name in [
        (dict(tol=np.nan), "tol"),
        (dict(tol=-1.0), "tol"),
        (dict(max_iter=0), "max_iter"),
    ]:
        with pytest.raises(ValueError, match=name):
            dl.solve_pnp(X, K, u, xi0=xi, **kwargs)
        with pytest.raises(ValueError, match=name):
            dl.bundle_adjust(pr, x0, **kwargs)
    with pytest.raises(ValueError, match="lam0"):
        dl.bundle_adjust(pr, x0, lam0=-1.0)
    with pytest.raises(ValueError, match="x0 must be finite"):
        dl.solve_least_squares(
            lambda x: x, lambda x: np.eye(2), np.array([np.nan, 1.0])
        )
    with pytest.raises(ValueError, match="K must be invertible"):
        dl.solve_pnp(X, np.diag([0.0, 500.0, 1.0]), u, xi0=xi)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        dl.BundleProblem.create(pr.K, pr.cam, pr.point, pr.u, pr.m, 12.5)
    with pytest.raises(ValueError, match="noise"):
        dl.make_scene(m=3, n=10, noise=-1.0)
    with pytest.raises(ValueError, match="visibility"):
        dl.make_scene(m=3, n=10, visibility=1.5)
    # a finite rotation vector too long for float64 is named, without an overflow
    # warning (it used to blame the angle t = inf)
    with pytest.raises(ValueError, match=r"w must have components of size at most"):
        dl.rotate_jacobian(1e160 * np.array([0.6, 0.8, 0.0]), np.ones(3))
    assert np.isfinite(dl.right_jacobian(1e100 * np.array([0.6, 0.8, 0.0]))).all()
    A, B = dl.ba_jacobian_blocks(pr, x0)
    U, W, V, gc, gp = dl.ba_normal_equations(pr, A, B, dl.ba_residual(pr, x0))
    with pytest.raises(ValueError, match="schur_solve needs"):
        dl.schur_solve(U, W, V, gc, gp[:-1], pr.free)
    V0 = V.copy()
    V0[3] = 0.0
    with pytest.raises(ValueError, match="V_3 of point 3 is singular"):
        dl.schur_solve(U, W, V0, gc, gp, pr.free)
    U2, W2 = U.copy(), W.copy()  # camera 2 with no information at all: S singular
    U2[12:18], U2[:, 12:18], W2[12:18] = 0.0, 0.0, 0.0
    with pytest.raises(ValueError, match="reduced camera system"):
        dl.schur_solve(U2, W2, V, gc, gp, pr.free)


@given(
    log_t=st.floats(-12.0, np.log10(3.1)),
    near_pi=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rotate_jacobian_over_angles(log_t, near_pi, seed):
    """Any angle from 1e-12 to 3.1, or within 1e-3 of pi, against jax.jacobian."""
    rng = np.random.default_rng(seed)
    t = np.pi + (10.0 ** (log_t / 4) - 1.0) * 1e-3 if near_pi else 10.0**log_t
    w, P = random_w(rng, t), rng.standard_normal(3)
    J_jax = np.asarray(rot_jac_jax(jnp.asarray(w), jnp.asarray(P)))
    assert check.relative_error(dl.rotate_jacobian(w, P), J_jax) < 1e-12


def test_normal_equations_without_scipy_sparse(small_scene):
    """The np.add.at fallback (scipy is optional for derivlib) gives the same blocks."""
    pr, x = small_scene.problem, small_scene.x0
    A, B = dl.ba_jacobian_blocks(pr, x)
    r = dl.ba_residual(pr, x)
    fast = dl.ba_normal_equations(pr, A, B, r)
    plain = dl.make_scene(m=3, n=12, noise=1.0, seed=4).problem
    plain.__dict__["_indicators"] = {"cam": None, "point": None}
    for a, b in zip(fast, dl.ba_normal_equations(plain, A, B, r)):
        assert np.allclose(a, b, rtol=1e-14, atol=1e-12)


def test_bundle_adjust_blocks_are_the_right_update_at_every_rotation(small_scene):
    """bundle_adjust's blocks (6.18 without J_r) are the Jacobian of the residual
    for the update R_j Exp(delta_j), t_j + dt_j, X + dX at delta = 0 (jax.jacfwd
    through expm), with cameras at 0, 1 rad, pi - 1e-7 and pi, where J_r of the
    additive update is singular or near it."""
    from derivlib.geometry.bundle import _ba_right_blocks

    pr = small_scene.problem
    x = small_scene.x0.copy()
    rng = np.random.default_rng(7)
    for j, angle in enumerate([np.pi - 1e-7, np.pi, 1.0][: pr.m]):
        a = rng.standard_normal(3)
        x[6 * j : 6 * j + 3] = angle * a / np.linalg.norm(a)
    m, Kj = pr.m, jnp.asarray(pr.K)
    R0 = jnp.stack([jnp.asarray(dl.rodrigues(x[6 * j : 6 * j + 3])) for j in range(m)])

    def residual(d):
        dR = jax.vmap(lambda w: jax.scipy.linalg.expm(hat_jax(w)))(
            d[: 6 * m].reshape(m, 6)[:, :3]
        )
        t = (x[: 6 * m] + d[: 6 * m]).reshape(m, 6)[:, 3:]
        X = (x[6 * m :] + d[6 * m :]).reshape(-1, 3).T
        P = jnp.einsum("kab,kbc,ck->ak", R0[pr.cam], dR[pr.cam], X[:, pr.point])
        return (project_jax(P + t[pr.cam].T, Kj) - pr.u).ravel(order="F")

    J_jax = np.asarray(jax.jacfwd(residual)(jnp.zeros(x.size)))
    A, B = _ba_right_blocks(pr, x)
    J = np.zeros_like(J_jax)
    for k, (j, i) in enumerate(zip(pr.cam, pr.point)):
        J[2 * k : 2 * k + 2, 6 * j : 6 * j + 6] = A[k]
        J[2 * k : 2 * k + 2, 6 * m + 3 * i : 6 * m + 3 * i + 3] = B[k]
    assert check.relative_error(J, J_jax) < 1e-12
    # the additive update's blocks (with J_r) are not these at a generic rotation
    A_add, _ = dl.ba_jacobian_blocks(pr, x)
    assert check.relative_error(A_add, A) > 1e-3


def test_bundle_adjust_refuses_a_partly_held_rotation(small_scene):
    """The right update moves a rotation as a whole: holding some of its three
    parameters is refused by name, before solving."""
    pr = small_scene.problem
    held = dl.BundleProblem.create(
        pr.K, pr.cam, pr.point, pr.u, pr.m, pr.n, fixed=[0, 1, 2, 3, 4, 5, 6]
    )
    with pytest.raises(ValueError, match="camera 1 has 2 of its 3 rotation"):
        dl.bundle_adjust(held, small_scene.x0)
