"""Chapter 6, part B: robust costs against scipy, and the linear (DLT) starts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import least_squares

import derivlib as dl

K = np.array([[520.0, 1.5, 310.0], [0.0, 480.0, 250.0], [0.0, 0.0, 1.0]])
XI = np.array([0.1, -0.3, 0.2, 0.2, -0.1, 4.0])


def rho_jax(z, loss):
    if loss == "huber":
        return jnp.where(z <= 1.0, z, 2.0 * jnp.sqrt(jnp.maximum(z, 1.0)) - 1.0)
    return jnp.log1p(z)


@pytest.mark.parametrize("loss", ["huber", "cauchy"])
def test_robust_loss_derivatives_match_jax(loss):
    z = np.array([0.0, 1e-8, 0.3, 0.999, 1.001, 2.0, 50.0, 1e6])
    d1 = jax.vmap(jax.grad(lambda s: rho_jax(s, loss)))
    d2 = jax.vmap(jax.grad(jax.grad(lambda s: rho_jax(s, loss))))
    rho, r1, r2 = dl.robust_loss(z, loss)
    assert np.allclose(rho, np.asarray(jax.vmap(lambda s: rho_jax(s, loss))(z)))
    assert np.allclose(r1, np.asarray(d1(z)), rtol=1e-14, atol=0)
    assert np.allclose(r2, np.asarray(d2(z)), rtol=1e-14, atol=0)


def test_robust_loss_refuses_bad_input():
    with pytest.raises(ValueError, match=r"loss must be one of .*got 'tukey'"):
        dl.robust_loss(np.ones(2), "tukey")
    with pytest.raises(ValueError, match="z = r\\^2 / c\\^2 must be >= 0"):
        dl.robust_loss(-np.ones(2), "huber")
    with pytest.raises(ValueError, match="f_scale must be finite and > 0, got 0"):
        dl.robust_cost(np.ones(2), "huber", f_scale=0)
    with pytest.raises(ValueError, match="weighting must be 'irls' or 'triggs'"):
        dl.robust_weights(np.ones(2), "huber", weighting="newton")


def outlier_scene(rng, n=30, n_out=6):
    X = rng.uniform(-1, 1, (3, n))
    u = dl.project(dl.transform(XI, X), K) + 0.5 * rng.standard_normal((2, n))
    out = rng.choice(n, n_out, replace=False)
    u[:, out] += rng.uniform(-60, 60, (2, n_out))
    return X, u


@pytest.mark.parametrize("loss", ["huber", "cauchy"])
@pytest.mark.parametrize("weighting", ["irls", "triggs"])
def test_robust_pnp_matches_scipy(loss, weighting, rng):
    X, u = outlier_scene(rng)
    xi0 = XI + 0.02
    xi, hist = dl.solve_pnp_robust(
        X, K, u, loss=loss, f_scale=2.0, xi0=xi0, weighting=weighting
    )
    res = least_squares(
        lambda v: dl.reprojection_residual(v, X, K, u),
        xi0,
        jac=lambda v: dl.reprojection_jacobian(v, X, K),
        loss=loss,
        f_scale=2.0,
        ftol=1e-15,
        xtol=1e-15,
        gtol=1e-15,
    )
    E = hist.cost[-1]
    assert abs(E - 2 * res.cost) <= 1e-8 * E  # scipy's cost is E_rho / 2
    r = dl.reprojection_residual(xi, X, K, u)
    assert E == pytest.approx(dl.robust_cost(r, loss, 2.0), rel=1e-15)


def test_robust_pnp_resists_outliers_where_least_squares_breaks(rng):
    X, u = outlier_scene(rng)
    xi_ls, _ = dl.solve_pnp(X, K, u, xi0=XI)
    xi_c, _ = dl.solve_pnp_robust(X, K, u, loss="cauchy", f_scale=2.0, xi0=XI)
    err_ls, err_c = np.abs(xi_ls - XI).max(), np.abs(xi_c - XI).max()
    assert err_c < err_ls / 4


def test_linear_loss_is_plain_least_squares(rng):
    X, u = outlier_scene(rng, n_out=0)
    xi_a, h_a = dl.solve_pnp(X, K, u, xi0=XI + 0.02)
    xi_b, h_b = dl.solve_pnp_robust(X, K, u, loss="linear", xi0=XI + 0.02)
    assert np.abs(xi_a - xi_b).max() < 1e-9
    assert h_b.cost[-1] == pytest.approx(h_a.cost[-1], rel=1e-10)


def test_triggs_weights_are_the_gauss_newton_hessian_where_positive():
    r = np.array([0.1, 0.5, 1.9, 2.1, 30.0])
    b, h = dl.robust_weights(r, "cauchy", f_scale=2.0)
    z = (r / 2.0) ** 2
    assert np.allclose(b, 1 / (1 + z), rtol=1e-15)
    assert np.allclose(h[z < 1], ((1 - z) / (1 + z) ** 2)[z < 1], rtol=1e-14)
    assert np.all(h[z > 1] == np.finfo(float).eps)  # negative curvature: clamped
    b, h = dl.robust_weights(r, "huber", f_scale=2.0, weighting="irls")
    assert np.array_equal(b, h)


# ----- linear starts -----


def test_dlt_pose_is_exact_on_exact_data(rng):
    X = rng.uniform(-1, 1, (3, 8))
    u = dl.project(dl.transform(XI, X), K)
    assert np.abs(dl.dlt_pose(X, K, u) - XI).max() < 1e-10
    xi, hist = dl.solve_pnp(X, K, u + 0.3 * rng.standard_normal(u.shape))
    assert hist.converged and np.abs(xi - XI).max() < 0.05


def test_dlt_pose_refuses_degenerate_input(rng):
    X = rng.uniform(-1, 1, (3, 8))
    u = dl.project(dl.transform(XI, X), K)
    with pytest.raises(ValueError, match=r"at least 6 points.*got X with 5 point"):
        dl.dlt_pose(X[:, :5], K, u[:, :5])
    Xp = X.copy()
    Xp[2] = 0.5 * Xp[0] - Xp[1]  # one plane
    up = dl.project(dl.transform(XI, Xp), K)
    with pytest.raises(ValueError, match="degenerate for coplanar points"):
        dl.dlt_pose(Xp, K, up)
    with pytest.raises(ValueError, match="degenerate for coplanar points"):
        dl.solve_pnp(Xp, K, up)  # no xi0: the DLT start is refused
    xi, _ = dl.solve_pnp(Xp, K, up, xi0=XI + 0.02)  # with a start, planar PnP is fine
    assert np.abs(xi - XI).max() < 1e-9


def test_solve_pnp_refuses_degenerate_problems(rng):
    X = rng.uniform(-1, 1, (3, 8))
    u = dl.project(dl.transform(XI, X), K)
    with pytest.raises(ValueError, match=r"at least 3 points \(2n = 4 residuals"):
        dl.solve_pnp(X[:, :2], K, u[:, :2], xi0=XI)
    line = np.outer([1.0, 2.0, -0.5], np.linspace(-1, 1, 8))
    ul = dl.project(dl.transform(XI, line), K)
    with pytest.raises(ValueError, match="lie on one line"):
        dl.solve_pnp(line, K, ul, xi0=XI)
    # points on one ray of the camera: every image the same pixel
    R = dl.rodrigues(XI[:3])
    ray = R.T @ (np.outer([0.1, 0.2, 1.0], np.linspace(2, 6, 8)) - XI[3:, None])
    ur = dl.project(dl.transform(XI, ray), K)
    with pytest.raises(ValueError, match="all 8 image points u coincide"):
        dl.solve_pnp(ray, K, ur, xi0=XI)
    with pytest.raises(ValueError, match="all 8 image points u coincide"):
        dl.solve_pnp_robust(ray, K, ur, xi0=XI)


def two_views(rng, n=10):
    X = rng.uniform(-1, 1, (3, n))
    xis = np.stack([XI, np.array([0.0, 0.3, 0.0, -1.0, 0.0, 4.2])])
    U = np.stack([dl.project(dl.transform(x, X), K) for x in xis])
    return X, xis, U


def test_triangulate_is_exact_on_exact_data(rng):
    X, xis, U = two_views(rng)
    assert np.abs(dl.triangulate(xis, K, U) - X).max() < 1e-10
    xis3 = np.vstack([xis, [[0.2, -0.2, 0.1, 1.0, 0.5, 4.0]]])
    U3 = np.concatenate([U, dl.project(dl.transform(xis3[2], X), K)[None]])
    assert np.abs(dl.triangulate(xis3, K, U3) - X).max() < 1e-10


def test_triangulate_refuses_degenerate_input(rng):
    X, xis, U = two_views(rng)
    same = np.stack([XI, XI])  # one camera centre (a pure rotation would do too)
    with pytest.raises(ValueError, match="the 2 camera centres coincide"):
        dl.triangulate(same, K, np.stack([U[0], U[0]]))
    with pytest.raises(ValueError, match=r"xis must hold m >= 2 poses"):
        dl.triangulate(XI[None], K, U[:1])
    with pytest.raises(ValueError, match=r"u must have shape \(2, 2, n\)"):
        dl.triangulate(xis, K, U[:1])
    # parallel rays: a point seen at the same direction by two translated cameras
    xs = np.stack([np.zeros(6), np.array([0.0, 0.0, 0.0, -1.0, 0.0, 0.0])])
    u_far = np.stack([np.array([[310.0], [250.0]])] * 2)
    with pytest.raises(ValueError, match="rays are parallel"):
        dl.triangulate(xs, K, u_far)


def test_solve_pnp_without_a_start_asks_for_one(rng):
    X = rng.uniform(-1, 1, (3, 4))
    u = dl.project(dl.transform(XI, X), K)
    with pytest.raises(
        ValueError, match=r"solve_pnp has no start.*at least 6.*pass xi0"
    ):
        dl.solve_pnp(X, K, u)
    with pytest.raises(ValueError, match=r"solve_pnp_robust has no start.*pass xi0"):
        dl.solve_pnp_robust(X, K, u)
    xi, hist = dl.solve_pnp(X, K, u, xi0=XI + 0.01)  # 4 points and a start: fine
    assert hist.converged and np.abs(xi - XI).max() < 1e-9
