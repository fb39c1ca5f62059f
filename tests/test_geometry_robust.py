"""Chapter 6, part B: robust costs against scipy, and the linear (DLT) starts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import least_squares

import derivlib as dl
from derivlib import geometry as geo
from derivlib.losses import ConvergenceError

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
    # image points spread in one coordinate only do not coincide: the spread is a
    # distance in the image, both coordinates
    from derivlib.geometry.solvers import _pnp_problem

    for k in (0, 1):
        spread_k = np.full((2, 8), 300.0)
        spread_k[k] += np.linspace(-50.0, 50.0, 8)
        _pnp_problem(X, K, spread_k)


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


def test_robust_terms_stay_finite_where_r_squared_overflows():
    # |r| / c = 5e199: z = (r / c)^2 overflows, the robust cost does not
    r, c = np.array([0.5, 1e200]), 2.0
    huber = 0.5**2 + c * (2 * 1e200 - c)
    assert dl.robust_cost(r, "huber", c) == pytest.approx(huber, rel=1e-15)
    cauchy = c**2 * np.log1p(0.25**2 / 1.0) + 2 * c**2 * np.log(1e200 / c)
    assert dl.robust_cost(r, "cauchy", c) == pytest.approx(cauchy, rel=1e-15)
    b, h = dl.robust_weights(r, "huber", c)
    assert b[1] == pytest.approx(c / 1e200, rel=1e-15) and h[1] == np.finfo(float).eps
    b, h = dl.robust_weights(r, "cauchy", c, weighting="irls")
    assert b[1] == pytest.approx((c / 1e200) ** 2, rel=1e-15) and np.all(b == h)
    # and the two forms agree where both apply
    for loss in ["huber", "cauchy"]:
        for x in [1e149, 1e151]:
            rho = dl.robust_loss(np.array([(x / c) ** 2]), loss)[0][0]
            assert dl.robust_cost(np.array([x]), loss, c) == pytest.approx(
                c * c * rho, rel=1e-15
            )


def test_dlt_pose_in_extreme_units_and_degenerate_images(rng):
    X = rng.uniform(-1, 1, (3, 8))
    u = dl.project(dl.transform(XI, X), K)
    for s in [1e-150, 1e150]:  # det P[:, :3] under- or overflows; its sign does not
        xi = dl.dlt_pose(s * X, K, u)
        assert np.abs(xi[:3] - XI[:3]).max() < 1e-10
        assert np.abs(xi[3:] / s - XI[3:]).max() < 1e-10
    with pytest.raises(ValueError, match="all 8 image points u coincide"):
        dl.dlt_pose(X, K, np.tile(u[:, :1], 8))


# ----- robust bundle adjustment (sparse_bundle_adjust with a loss) -----

F_SCALE = 2.0


@pytest.fixture(scope="module")
def balbianello_outliers():
    """The first 40 points of Balbianello (5 cameras, 157 observations), 7 % of all
    observations moved by 20-60 pixels, from the chapter's perturbed start."""
    recon = geo.read_bundler(geo.gtsam_data_dir() + "/Balbianello.out")
    start = geo.perturb_reconstruction(recon, seed=0)
    corrupted, _ = geo.corrupt_observations(recon, 0.07, seed=18)
    sub, sub_start, _ = geo.first_points(corrupted, start, 40)
    return sub, sub_start


@pytest.fixture(scope="module")
def scipy_huber(balbianello_outliers):
    return scipy_cost(*balbianello_outliers, "huber")


def robust_ba(recon, start, loss):
    """IRLS to a loose tolerance, then Triggs' corrected normal equations."""
    mid, _ = geo.sparse_bundle_adjust(
        recon, start, loss=loss, f_scale=F_SCALE, weighting="irls", tol=1e-3
    )
    return geo.sparse_bundle_adjust(recon, mid, loss=loss, f_scale=F_SCALE)


def scipy_cost(recon, start, loss):
    chart = geo.BundlerChart(recon, start)
    res = least_squares(
        chart.residual,
        chart.x0,
        jac=lambda x: chart.jacobian(x).toarray(),
        tr_solver="exact",
        loss=loss,
        f_scale=F_SCALE,
        x_scale="jac",
        ftol=1e-15,
        xtol=1e-15,
        gtol=1e-15,
    )
    return 2 * res.cost  # E_rho


def test_robust_bundle_adjust_matches_scipy_huber(balbianello_outliers, scipy_huber):
    recon, start = balbianello_outliers
    state, hist = robust_ba(recon, start, "huber")
    E = hist.cost[-1]
    r = geo.bundler_residual(recon, state)
    assert E == pytest.approx(dl.robust_cost(r, "huber", F_SCALE), rel=1e-14)
    assert abs(E - scipy_huber) <= 1e-8 * E


def test_robust_bundle_adjust_matches_scipy_cauchy():
    rec, _, start = geo.make_bundler_scene(m=3, n=20, views=3, seed=1)
    recon, _ = geo.corrupt_observations(rec, 0.1, seed=2)
    _, hist = robust_ba(recon, start, "cauchy")
    E = hist.cost[-1]
    assert abs(E - scipy_cost(recon, start, "cauchy")) <= 1e-8 * E


def test_robust_bundle_adjust_resists_outliers(balbianello_outliers):
    recon, start = balbianello_outliers
    full = geo.read_bundler(geo.gtsam_data_dir() + "/Balbianello.out")
    clean, _, kept = geo.first_points(full, start, 40)
    _, outlier = geo.corrupt_observations(full, 0.07, seed=18)
    good = ~outlier[kept]

    def median_clean(state):
        e = np.linalg.norm(geo.bundler_residual(clean, state).reshape(-1, 2), axis=1)
        return np.median(e[good])

    plain, _ = geo.sparse_bundle_adjust(recon, start)
    robust, _ = robust_ba(recon, start, "cauchy")
    assert median_clean(robust) < median_clean(plain) / 2


def test_robust_bundle_adjust_refuses_bad_options(balbianello_outliers):
    recon, start = balbianello_outliers
    for kwargs, message in [
        ({"loss": "tukey"}, r"loss must be one of .*got 'tukey'"),
        ({"loss": "huber", "f_scale": 0.0}, r"f_scale must be finite and > 0, got 0"),
        ({"loss": "huber", "f_scale": -2.0}, r"f_scale must be finite and > 0"),
        ({"loss": "cauchy", "f_scale": np.nan}, r"f_scale must be finite and > 0"),
        ({"loss": "cauchy", "f_scale": "2 px"}, r"f_scale must be a positive number"),
        ({"loss": "huber", "weighting": "newton"}, "weighting must be 'irls' or"),
    ]:
        with pytest.raises(ValueError, match=message):
            geo.sparse_bundle_adjust(recon, start, **kwargs)


def test_linear_loss_is_the_plain_solver(balbianello_outliers):
    recon, start = balbianello_outliers
    _, h_plain = geo.sparse_bundle_adjust(recon, start)
    _, h_linear = geo.sparse_bundle_adjust(recon, start, loss="linear", f_scale=3.0)
    assert h_linear.cost == h_plain.cost


def test_triggs_far_from_the_minimum_is_stuck_not_converged():
    # from a start about ten pixels off, most residuals are beyond f_scale, where
    # Triggs' curvature is clamped at eps: only a damping of order 1 / eps gives a
    # step that lowers E_rho, and the damping passes its limit before it gets there
    recon = geo.read_bundler(geo.gtsam_data_dir() + "/Balbianello.out")
    corrupted, _ = geo.corrupt_observations(recon, 0.07, seed=18)
    start = geo.perturb_reconstruction(recon, seed=0)
    with pytest.raises(ConvergenceError, match="robust sparse bundle adjustment is"):
        geo.sparse_bundle_adjust(corrupted, start, loss="huber", f_scale=F_SCALE)
    # started at such a damping, the steps lower E_rho but crawl: never "converged"
    for loss in ["huber", "cauchy"]:
        with pytest.raises(ConvergenceError, match="did not converge in 10"):
            geo.sparse_bundle_adjust(
                corrupted, start, loss=loss, f_scale=F_SCALE, lam0=1e15, max_iter=10
            )


def test_robust_cost_at_extreme_scales():
    """f_scale far above every residual gives the plain cost, not inf * 0 = NaN."""
    r = np.array([1.0, -3.0, 1e-200, 0.0])
    for loss in ["linear", "huber", "cauchy"]:
        for c in [1e160, 1e300]:
            assert dl.robust_cost(r, loss, c) == 10.0
            s_r, s_J = geo.robust_rescaling(r, loss, c)
            assert np.all(s_r == 1.0) and np.all(s_J == 1.0)


def test_robust_bundle_helpers_refuse_bad_input(balbianello_outliers):
    recon, start = balbianello_outliers
    chart = geo.BundlerChart(recon, start)
    for call in (chart.residual, chart.jacobian, chart.state):
        with pytest.raises(ValueError, match=r"x must have shape \(\d+,\)"):
            call(np.zeros(3))
    short = geo.SparseBundleState(start.R[:2], start.t, start.intrinsics, start.X)
    with pytest.raises(ValueError, match=r"start must hold R \(5, 3, 3\)"):
        geo.BundlerChart(recon, short)
    with pytest.raises(ValueError, match=r"state must hold R \(5, 3, 3\)"):
        geo.first_points(recon, short, 3)
    with pytest.raises(ValueError, match="n must be an integer"):
        geo.first_points(recon, start, True)
    with pytest.raises(ValueError, match="fraction must be a number in"):
        geo.corrupt_observations(recon, "0.1")
    for kwargs, message in [
        ({"lam0": -1.0}, "lam0 must be a finite number >= 0"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            geo.sparse_bundle_adjust(recon, start, **kwargs)


def test_rescaled_blocks_give_triggs_normal_equations(rng):
    r = np.concatenate([rng.normal(0, 1, 20), rng.normal(0, 30, 20)])
    J = rng.standard_normal((40, 7))
    for loss in ["huber", "cauchy"]:
        for weighting in ["irls", "triggs"]:
            b, h = dl.robust_weights(r, loss, F_SCALE, weighting)
            s_r, s_J = geo.robust_rescaling(r, loss, F_SCALE, weighting)
            Jt, rt = s_J[:, None] * J, s_r * r
            assert np.allclose(Jt.T @ Jt, J.T @ (h[:, None] * J), rtol=1e-13, atol=0)
            assert np.allclose(Jt.T @ rt, J.T @ (b * r), rtol=1e-13, atol=0)
    # a planted wrong scaling (the residual by sqrt(b), as if the weights were
    # IRLS's, with Triggs' Jacobian) does not give the gradient
    b, h = dl.robust_weights(r, "cauchy", F_SCALE)
    assert not np.allclose(
        (np.sqrt(h)[:, None] * J).T @ (np.sqrt(b) * r), J.T @ (b * r), rtol=1e-3
    )


def test_planted_wrong_weight_misses_scipys_cost(
    balbianello_outliers, scipy_huber, monkeypatch
):
    recon, start = balbianello_outliers
    E_scipy = scipy_huber
    hooks = geo.bundle._robust_hooks

    def wrong_hooks(loss, f_scale, weighting):
        cost, rescale = hooks(loss, f_scale, weighting)

        def wrong(r):  # the residual scaled by sqrt(b) instead of b / sqrt(h)
            s_r, s_J = rescale(r)
            return np.sqrt(s_r * s_J), s_J

        return cost, (None if rescale is None else wrong)

    monkeypatch.setattr(geo.bundle, "_robust_hooks", wrong_hooks)
    try:
        _, hist = robust_ba(recon, start, "huber")
    except ConvergenceError:
        return  # refused: also a failure to reach scipy's minimum
    assert abs(hist.cost[-1] - E_scipy) > 1e-6 * E_scipy


def test_bundler_chart_jacobian_matches_central_differences(balbianello_outliers):
    recon, start = balbianello_outliers
    chart = geo.BundlerChart(recon, start)
    x = 1e-3 * np.random.default_rng(3).standard_normal(chart.x0.size)
    J = chart.jacobian(x).toarray()
    eps = 1e-6
    cols = [0, 5, chart.n_cam - 1, chart.n_cam, chart.x0.size - 1]
    for j in cols:
        e = np.zeros_like(x)
        e[j] = eps
        fd = (chart.residual(x + e) - chart.residual(x - e)) / (2 * eps)
        assert np.allclose(J[:, j], fd, rtol=1e-5, atol=1e-5 * np.abs(fd).max())


def test_solver_rescaling_is_robust_rescaling(rng):
    """The factors sparse_bundle_adjust applies (its hooks) are those of
    robust_rescaling, which the chapter checks against (6.38)."""
    r = np.concatenate([rng.normal(0, 1, 20), rng.normal(0, 30, 20), [0.0, 1e200]])
    for loss in ["huber", "cauchy"]:
        for weighting in ["irls", "triggs"]:
            cost, rescale = geo.bundle._robust_hooks(loss, F_SCALE, weighting)
            for a, b in zip(
                rescale(r), geo.robust_rescaling(r, loss, F_SCALE, weighting)
            ):
                assert np.array_equal(a, b)
            assert cost(r) == dl.robust_cost(r, loss, F_SCALE)
