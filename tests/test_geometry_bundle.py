"""Chapter 6, part A: Bundler's camera model against JAX, and sparse bundle
adjustment with per-camera intrinsics against scipy and GTSAM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derivlib import check
from derivlib.geometry import (
    SparseBundleState,
    bundle,
    bundler_jacobians,
    bundler_project,
    default_gauge,
    io,
    make_bundler_scene,
    reduced_camera_system,
    sparse_bundle_adjust,
)
from derivlib.losses import ConvergenceError


def hat_jax(w):
    return jnp.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])


def project_jax(R, t, fk, X):
    """Bundler's projection in a few lines of jax.numpy (eqs. 6.40-6.41)."""
    P = R @ X + t
    p = -P[:2] / P[2]
    s = p @ p
    return fk[0] * (1 + fk[1] * s + fk[2] * s * s) * p


def exp_at_zero(d):
    """I + [d]x + [d]x^2 / 2: Exp(d) to second order, so its value and first
    derivative at d = 0 are exact (the Jacobians below are taken at d = 0)."""
    D = hat_jax(d)
    return jnp.eye(3) + D + D @ D / 2


@jax.jit
@jax.vmap
def jacobians_jax(R, t, fk, X):
    pose = jax.jacfwd(
        lambda xi: project_jax(
            R @ jax.scipy.linalg.expm(hat_jax(xi[:3])), t + xi[3:], fk, X
        )
    )(jnp.zeros(6))
    point = jax.jacfwd(lambda x: project_jax(R, t, fk, x))(X)
    intr = jax.jacfwd(lambda k: project_jax(R, t, k, X))(fk)
    return pose, point, intr


@pytest.fixture(scope="module")
def balbianello():
    return io.read_bundler(io.gtsam_data_dir() + "/Balbianello.out")


def test_jacobians_match_jax_on_the_real_cameras(balbianello):
    """Three observations of each camera of Balbianello, against jax.jacfwd."""
    r = balbianello
    ks = np.concatenate([np.flatnonzero(r.cam == j)[:3] for j in range(r.m)])
    c, X = r.cam[ks], r.X[:, r.point[ks]]
    pose, point, intr = jacobians_jax(r.R[c], r.t[c], r.intrinsics[c], X.T)
    for k, j in enumerate(c):
        A, B, C = bundler_jacobians(r.R[j], r.t[j], r.intrinsics[j], X[:, k : k + 1])
        assert check.relative_error(A[0], np.asarray(pose[k])) < 1e-10
        assert check.relative_error(B[0], np.asarray(point[k])) < 1e-10
        assert check.relative_error(C[0], np.asarray(intr[k])) < 1e-10
        u = bundler_project(r.R[j], r.t[j], r.intrinsics[j], X[:, k])
        ujax = project_jax(r.R[j], r.t[j], r.intrinsics[j], X[:, k])
        np.testing.assert_allclose(u, ujax, rtol=1e-12)


def test_project_refuses_points_behind_and_bad_shapes():
    R, t, fk = np.eye(3), np.zeros(3), np.array([500.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="P_z < 0"):
        bundler_project(R, t, fk, np.array([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(f, k1, k2\)"):
        bundler_project(R, t, fk[:2], np.array([0.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="intrinsics must be finite"):
        bundler_project(R, t, [np.inf, 0.0, 0.0], np.array([0.0, 0.0, -1.0]))


def test_reduced_system_matches_the_dense_schur_complement():
    """S and its right-hand side from the blocks equal the dense J^T J eliminated
    by hand (a small scene, every block materialised)."""
    recon, _, start = make_bundler_scene(m=4, n=30, views=3, seed=1)
    r, A, B = bundle._sparse_blocks(recon, start)
    S, rhs, _ = reduced_camera_system(recon, A, B, r, lam=0.1)
    m, n, N = recon.m, recon.n, recon.cam.size
    J = np.zeros((2 * N, 9 * m + 3 * n))
    for k in range(N):
        J[2 * k : 2 * k + 2, 9 * recon.cam[k] : 9 * recon.cam[k] + 9] = A[k]
        c = 9 * m + 3 * recon.point[k]
        J[2 * k : 2 * k + 2, c : c + 3] = B[k]
    H = J.T @ J
    H = H + 0.1 * np.diag(np.diag(H))
    g = J.T @ r
    Hcc, Hcp, Hpp = H[: 9 * m, : 9 * m], H[: 9 * m, 9 * m :], H[9 * m :, 9 * m :]
    S_dense = Hcc - Hcp @ np.linalg.solve(Hpp, Hcp.T)
    rhs_dense = -(g[: 9 * m] - Hcp @ np.linalg.solve(Hpp, g[9 * m :]))
    assert check.relative_error(S, S_dense) < 1e-10
    assert check.relative_error(rhs, rhs_dense) < 1e-10


def test_balbianello_cost_agrees_with_gtsam(balbianello):
    """GTSAM's error of the stored reconstruction, in its own camera convention, is
    E / 2 of derivlib's (the conversion in io.to_gtsam is right)."""
    r = bundle._sparse_residual(
        balbianello,
        SparseBundleState(
            balbianello.R, balbianello.t, balbianello.intrinsics, balbianello.X
        ),
    )
    graph, values = io.to_gtsam(balbianello)
    assert 2 * graph.error(values) == pytest.approx(r @ r, rel=1e-9)


def test_synthetic_scene_matches_gtsam_final_cost():
    """From the same start, derivlib and GTSAM's Levenberg-Marquardt on the same
    model reach the same cost (E = 2 x GTSAM's error)."""
    import gtsam

    recon, _, start = make_bundler_scene(m=4, n=40, views=3, seed=8)
    state, hist = sparse_bundle_adjust(recon, start)
    graph, values = io.to_gtsam(recon, start.R, start.t, start.intrinsics, start.X)
    assert 2 * graph.error(values) == pytest.approx(hist.cost[0], rel=1e-9)
    params = gtsam.LevenbergMarquardtParams()
    params.setRelativeErrorTol(1e-12)
    params.setAbsoluteErrorTol(0.0)
    params.setMaxIterations(100)
    params.setDiagonalDamping(True)  # lam diag(J^T J), as derivlib and Ceres damp
    result = gtsam.LevenbergMarquardtOptimizer(graph, values, params).optimize()
    assert hist.converged and hist.cost[-1] < hist.cost[0]
    assert hist.cost[-1] == pytest.approx(2 * graph.error(result), rel=1e-7)
    # the gauge is held: camera 0's pose does not move
    np.testing.assert_array_equal(state.R[0], start.R[0])
    np.testing.assert_array_equal(state.t[0], start.t[0])


def test_synthetic_scene_matches_scipy():
    from scipy.optimize import least_squares

    recon, truth, start = make_bundler_scene(m=3, n=25, views=3, seed=2)
    state, hist = sparse_bundle_adjust(recon, start)
    free = default_gauge(start)

    def unpack(x):
        d = np.zeros((recon.m, 9))
        d[free] = x[: free.sum()]
        return SparseBundleState(
            start.R @ bundle._so3_exp_many(d[:, :3]),
            start.t + d[:, 3:6],
            start.intrinsics + d[:, 6:],
            start.X + x[free.sum() :].reshape(recon.n, 3).T,
        )

    x0 = np.zeros(free.sum() + 3 * recon.n)
    sol = least_squares(
        lambda x: bundle._sparse_residual(recon, unpack(x)),
        x0,
        method="lm",
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
    )
    assert hist.cost[-1] == pytest.approx(2 * sol.cost, rel=1e-8)
    assert hist.cost[-1] < 2 * recon.cam.size  # near the noise level


def test_memory_of_w_grows_with_observations():
    """W is kept as one (9, 3) block per observation, never (9m, 3n)."""
    recon, _, start = make_bundler_scene(m=6, n=200, views=3, seed=3)
    r, A, B = bundle._sparse_blocks(recon, start)
    *_, (W, Vinv, gp, U, V, gc) = reduced_camera_system(recon, A, B, r)
    assert W.shape == (recon.cam.size, 9, 3)
    assert Vinv.shape == (recon.n, 3, 3)


def _tiny():
    return make_bundler_scene(m=3, n=20, views=2, seed=4)


def test_refuses_a_point_seen_once():
    recon, _, start = _tiny()
    keep = np.ones(recon.cam.size, bool)
    keep[np.flatnonzero(recon.point == 5)[0]] = False
    recon = io.Reconstruction(
        recon.R, recon.t, recon.intrinsics, recon.X, recon.cam[keep],
        recon.point[keep], recon.u[:, keep],
    )  # fmt: skip
    with pytest.raises(ValueError, match="point 5 is seen by 1 camera"):
        sparse_bundle_adjust(recon, start)


def test_refuses_a_camera_with_too_few_observations():
    recon, _, start = make_bundler_scene(m=3, n=20, views=2, seed=5)
    # keep only two observations of camera 2, give its other points to camera 0/1
    ks = np.flatnonzero(recon.cam == 2)
    keep = np.ones(recon.cam.size, bool)
    keep[ks[2:]] = False
    sub = io.Reconstruction(
        recon.R, recon.t, recon.intrinsics, recon.X, recon.cam[keep],
        recon.point[keep], recon.u[:, keep],
    )  # fmt: skip
    with pytest.raises(ValueError, match="camera 2 has 2 observations"):
        sparse_bundle_adjust(sub, start)


def test_refuses_fewer_residuals_than_unknowns():
    recon, _, start = make_bundler_scene(m=2, n=20, views=2, seed=6)
    # 40 observations, 80 residuals; 60 point unknowns + 12 camera ones (camera 0's
    # pose held): fine. Keep 7 points: 28 residuals for 21 + 12 = 33 -> refused
    free = np.ones((2, 9), bool)
    free[0, :6] = False
    sub_keep = recon.point < 7
    sub = io.Reconstruction(
        recon.R, recon.t, recon.intrinsics, recon.X[:, :7], recon.cam[sub_keep],
        recon.point[sub_keep], recon.u[:, sub_keep],
    )  # fmt: skip
    start7 = SparseBundleState(start.R, start.t, start.intrinsics, start.X[:, :7])
    with pytest.raises(ValueError, match="residuals for 33 unknowns"):
        sparse_bundle_adjust(sub, start7, free=free)


def test_refuses_a_free_gauge():
    recon, _, start = make_bundler_scene(m=3, n=40, views=3, seed=7)
    with pytest.raises(ValueError, match="do not determine"):
        sparse_bundle_adjust(recon, start, free=np.ones((3, 9), bool))


def test_bad_shapes_and_convergence_error():
    recon, _, start = _tiny()
    with pytest.raises(ValueError, match="free must have shape"):
        sparse_bundle_adjust(recon, start, free=np.ones((2, 9), bool))
    bad = SparseBundleState(start.R, start.t, start.intrinsics, start.X[:, :3])
    with pytest.raises(ValueError, match="state0 must hold"):
        sparse_bundle_adjust(recon, bad)
    with pytest.raises(ConvergenceError):
        sparse_bundle_adjust(recon, start, max_iter=1, tol=0.0)


def test_refuses_a_point_seen_twice_by_one_camera():
    """Two observations of a point by the same camera do not triangulate it."""
    recon, _, start = _tiny()
    cam = recon.cam.copy()
    ks = np.flatnonzero(recon.point == 5)
    cam[ks] = cam[ks[0]]
    dup = io.Reconstruction(
        recon.R, recon.t, recon.intrinsics, recon.X, cam, recon.point, recon.u
    )
    with pytest.raises(ValueError, match="point 5 is seen by 1 camera"):
        sparse_bundle_adjust(dup, start)


def test_refuses_a_point_its_cameras_see_along_one_ray():
    """With f = 0 every B_k vanishes: V_i is singular, refused before any solve."""
    recon, _, start = _tiny()
    flat = start.copy()
    flat.intrinsics[:, 0] = 0.0
    with pytest.raises(ValueError, match="do not determine point 0"):
        sparse_bundle_adjust(recon, flat)


def test_refuses_observations_that_do_not_fit_the_reconstruction():
    recon, _, start = _tiny()

    def with_(**kw):
        fields = dict(cam=recon.cam, point=recon.point, u=recon.u)
        fields.update(kw)
        return io.Reconstruction(recon.R, recon.t, recon.intrinsics, recon.X, **fields)

    with pytest.raises(ValueError, match=r"recon.cam must lie in 0..2"):
        sparse_bundle_adjust(with_(cam=recon.cam + 1), start)
    with pytest.raises(ValueError, match="must hold integers"):
        sparse_bundle_adjust(with_(cam=recon.cam.astype(float)), start)
    with pytest.raises(ValueError, match=r"shapes \(N,\), \(N,\) and \(2, N\)"):
        sparse_bundle_adjust(with_(u=recon.u[:, :-1]), start)
    u = recon.u.copy()
    u[0, 3] = np.nan
    with pytest.raises(ValueError, match="must be finite"):
        sparse_bundle_adjust(with_(u=u), start)
    bad = start.copy()
    bad.X[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"state0.X must be finite"):
        sparse_bundle_adjust(recon, bad)
    with pytest.raises(ValueError, match="tol must be"):
        sparse_bundle_adjust(recon, start, tol=-1.0)
    with pytest.raises(ValueError, match=r"A, B and r must have shapes"):
        reduced_camera_system(
            recon, np.zeros((5, 2, 9)), np.zeros((5, 2, 3)), np.zeros(10)
        )


def test_a_free_gauge_names_a_parameter_whatever_basis_eigh_picks():
    """The refusal counts the singular directions (7 for a free similarity) and names
    the parameter by its weight in all of them, not in one eigenvector."""
    recon, _, start = make_bundler_scene(m=3, n=40, views=3, seed=7)
    with pytest.raises(ValueError, match=r"singular in 7 direction\(s\)"):
        sparse_bundle_adjust(recon, start, free=np.ones((3, 9), bool))


def test_refuses_intrinsics_that_the_points_leave_undetermined():
    """Every point of camera 3 at one distance from the image centre: u = f rho p
    with one rho, so only f rho is determined (2 singular directions)."""
    from derivlib.geometry.bundler import _blocks

    recon, truth, _ = make_bundler_scene(m=4, n=40, views=3, seed=1)
    X, j = truth.X.copy(), 3
    for i in np.unique(recon.point[recon.cam == j]):
        P = truth.R[j] @ X[:, i] + truth.t[j]
        p = -P[:2] / P[2]
        p *= 0.3 / np.linalg.norm(p)
        X[:, i] = truth.R[j].T @ (
            np.array([-P[2] * p[0], -P[2] * p[1], P[2]]) - truth.t[j]
        )
    u, *_ = _blocks(
        truth.R[recon.cam], truth.t[recon.cam], truth.intrinsics[recon.cam],
        X[:, recon.point],
    )  # fmt: skip
    ring = io.Reconstruction(
        truth.R, truth.t, truth.intrinsics, X, recon.cam, recon.point,
        u + np.random.default_rng(0).standard_normal(u.shape),
    )  # fmt: skip
    start = SparseBundleState(truth.R, truth.t, truth.intrinsics, X)
    with pytest.raises(ValueError, match=r"(f|k1|k2) of camera 3: .* 2 direction"):
        sparse_bundle_adjust(ring, start)


def test_fast_blocks_match_bundlers_products():
    """The solver's entry-by-entry Jacobian and residual-only projection equal
    bundler._blocks (the same formulas through small matrix products) and the
    residual of bundler_residual, on a scene with distortion."""
    from derivlib.geometry.bundler import _blocks

    recon, _, start = make_bundler_scene(m=4, n=40, views=3, seed=5)
    r, A, B = bundle._sparse_blocks(recon, start)
    u, A6, B0, C = _blocks(
        start.R[recon.cam],
        start.t[recon.cam],
        start.intrinsics[recon.cam],
        start.X[:, recon.point],
    )
    assert check.relative_error(r, (u - recon.u).ravel(order="F")) < 1e-14
    assert check.relative_error(A, np.concatenate([A6, C], axis=2)) < 1e-14
    assert check.relative_error(B, B0) < 1e-14
    assert check.relative_error(bundle._sparse_residual(recon, start), r) < 1e-14


def test_closed_form_inverse_of_the_point_blocks():
    """_inv3 against np.linalg.inv on badly scaled blocks, and a singular block
    refused by name."""
    rng = np.random.default_rng(0)
    M = rng.standard_normal((50, 3, 5))
    D = np.array([1e-2, 1.0, 1e2])
    V = D[:, None] * (M @ M.transpose(0, 2, 1)) * D  # D M M^T D, scales 1e-4..1e4
    assert check.relative_error(bundle._inv3(V), np.linalg.inv(V)) < 1e-12
    V[7] = np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="V_7 of point 7 is singular"):
        bundle._inv3(V)


def test_reduced_system_in_any_order_of_observations():
    """The same S whether the observations come camera by camera or shuffled,
    and whether the pairs are summed in one chunk or many."""
    from dataclasses import replace

    recon, _, start = make_bundler_scene(m=5, n=60, views=3, seed=6)
    perm = np.random.default_rng(1).permutation(recon.cam.size)
    shuffled = replace(
        recon, cam=recon.cam[perm], point=recon.point[perm], u=recon.u[:, perm]
    )
    S1, b1, _ = reduced_camera_system(recon, *_blocks_of(recon, start), lam=0.01)
    old = bundle._PAIR_CHUNK
    bundle._PAIR_CHUNK = 7
    try:
        S2, b2, _ = reduced_camera_system(
            shuffled, *_blocks_of(shuffled, start), lam=0.01
        )
    finally:
        bundle._PAIR_CHUNK = old
    assert check.relative_error(S2, S1) < 1e-12
    assert check.relative_error(b2, b1) < 1e-12


def _blocks_of(recon, state):
    r, A, B = bundle._sparse_blocks(recon, state)
    return A, B, r


def test_the_stopping_rule():
    """A decrease below tol E stops; so does a geometric tail below it after a
    clean step and three shrinking decreases; a rejected step, a growing decrease
    or a sudden drop does not."""
    assert bundle._settled([10.0, 5.0, 5.0 - 1e-12], 1e-10, clean=False)
    tail = [10.0, 5.0, 4.99, 4.99 - 1e-7]  # the tail after it: about 1e-12
    assert bundle._settled(tail, 1e-10, clean=True)
    assert not bundle._settled(tail, 1e-10, clean=False)
    assert not bundle._settled([10.0, 9.0, 8.0, 7.0], 1e-10, clean=True)
    # a sudden drop after a larger decrease is no steady factor (a crawl)
    assert not bundle._settled([20.0, 19.0, 14.0, 14.0 - 1e-6], 1e-10, clean=True)


def test_vectorised_exp_matches_rodrigues():
    """_so3_exp_many, all rows at once, equals rodrigues row by row on both sides
    of the series' switch, and refuses what rodrigues refuses."""
    from derivlib.geometry import rodrigues

    rng = np.random.default_rng(2)
    D = np.concatenate(
        [rng.standard_normal((20, 3)) * s for s in (0.0, 1e-9, 4e-3, 2e-2, 1.0, 3.0)]
    )
    many = bundle._so3_exp_many(D)
    assert np.abs(many - np.stack([rodrigues(d) for d in D])).max() < 1e-15 * 4
    with pytest.raises(ValueError, match="finite"):
        bundle._so3_exp_many(np.array([[np.nan, 0.0, 0.0]]))
