"""Chapter 6, part B: SO(3) and SE(3) on the manifold, against independent JAX code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import derivlib as dl
from derivlib import check

K = np.array([[520.0, 1.5, 310.0], [0.0, 480.0, 250.0], [0.0, 0.0, 1.0]])


def hat_jax(w):
    return jnp.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])


def twist_jax(tau):
    """[[hat(phi), rho], [0, 0]] for tau = (phi, rho)."""
    top = jnp.concatenate([hat_jax(tau[:3]), tau[3:, None]], axis=1)
    return jnp.concatenate([top, jnp.zeros((1, 4))], axis=0)


def vee_se3(M):
    return jnp.array([M[2, 1], M[0, 2], M[1, 0], M[0, 3], M[1, 3], M[2, 3]])


def vee_so3(M):
    return jnp.array([M[2, 1], M[0, 2], M[1, 0]])


def log_jax(R):
    """Log by arccos, valid away from 0 and pi (where derivlib needs its branches)."""
    theta = jnp.arccos((jnp.trace(R) - 1) / 2)
    return theta / (2 * jnp.sin(theta)) * vee_so3(R - R.T)


def rodrigues_jax(w):
    """exp([w]x) by the textbook closed form, with its own Taylor branch."""
    t2 = w @ w
    small = t2 < 1e-6
    t2s = jnp.where(small, 1.0, t2)
    t = jnp.sqrt(t2s)
    a = jnp.where(small, 1 - t2 / 6 + t2**2 / 120, jnp.sin(t) / t)
    b = jnp.where(small, 0.5 - t2 / 24 + t2**2 / 720, (1 - jnp.cos(t)) / t2s)
    W = hat_jax(w)
    return jnp.eye(3) + a * W + b * W @ W


def se3_exp_jax(tau, nodes=40):
    """[[R, V rho], [0, 1]] with V = int_0^1 exp(s [phi]x) ds by Gauss-Legendre
    quadrature (40 nodes: exact to rounding for |phi| <= pi), not by a closed form."""
    s, wts = np.polynomial.legendre.leggauss(nodes)
    s, wts = 0.5 * (s + 1), 0.5 * wts
    Rs = jax.vmap(rodrigues_jax)(jnp.asarray(s)[:, None] * tau[:3])  # (nodes, 3, 3)
    V = jnp.tensordot(jnp.asarray(wts), Rs, axes=1)
    top = jnp.concatenate([rodrigues_jax(tau[:3]), (V @ tau[3:])[:, None]], axis=1)
    return jnp.concatenate([top, jnp.array([[0.0, 0.0, 0.0, 1.0]])], axis=0)


expm4 = jax.jit(se3_exp_jax)
d_expm4 = jax.jit(jax.jacobian(se3_exp_jax))
expm3 = jax.jit(rodrigues_jax)


@jax.jit
def jr_inv_jax(w):
    """d/d delta Log(Exp(w) Exp(delta)) at delta = 0, by jax.jacobian."""
    R = expm3(w)
    return jax.jacobian(lambda d: log_jax(R @ expm3(d)))(jnp.zeros(3))


@jax.jit
def rotate_right_jax(R, p):
    """d/d delta R Exp(delta) p at delta = 0."""
    return jax.jacobian(lambda d: R @ expm3(d) @ p)(jnp.zeros(3))


def unit(rng):
    a = rng.standard_normal(3)
    return a / np.linalg.norm(a)


ANGLES = [0.0, 1e-300, 1e-15, 1e-9, 5e-3, 1e-2, 0.7, 1.5, 2.5, 3.0]
NEAR_PI = [np.pi - 1e-3, np.pi - 1e-6, np.pi - 1e-9, np.pi - 1e-12]


@pytest.mark.parametrize("theta", ANGLES + NEAR_PI)
def test_so3_log_inverts_exp(theta, rng):
    w = theta * unit(rng)
    w_back = dl.so3_log(dl.so3_exp(w))
    scale = max(theta, 1e-300)
    assert np.linalg.norm(w_back - w) <= 4e-16 * scale + 1e-320


@pytest.mark.parametrize("theta", ANGLES + NEAR_PI + [np.pi, 6.0])
def test_the_solvers_float_exp_and_log_are_rodrigues_and_so3_log(theta, rng):
    """The Exp and Log that the PnP solver calls (the compiled loops', with so3_log's
    own branch from NEAR_PI on) agree with rodrigues and so3_log, on both sides of
    SMALL_ANGLE and of NEAR_PI."""
    from derivlib._pnp_kernels import _log, _rodrigues
    from derivlib.geometry.lie import _log_rotation

    w = theta * unit(rng)
    R = np.empty((3, 3))
    _rodrigues(*w.tolist(), R)
    assert np.abs(R - dl.rodrigues(w)).max() <= 1e-15
    w_back = np.empty(3)
    angle = np.arctan2(np.linalg.norm(R - R.T) / 2**1.5, (np.trace(R) - 1) / 2)
    assert _log(R, w_back) == (angle < np.pi / 2)  # False: so3_log's other branch
    if angle >= np.pi / 2:
        w_back = _log_rotation(R)
    if theta < np.pi:
        scale = max(theta, 1e-300)
        assert np.linalg.norm(w_back - w) <= 4e-16 * scale + 1e-320
    elif theta == np.pi:  # w and -w are both logarithms
        assert min(np.linalg.norm(w_back - w), np.linalg.norm(w_back + w)) <= 1e-15
    else:  # beyond pi, the logarithm turns the other way: angle 2 pi - theta
        assert np.linalg.norm(w_back - (theta - 2 * np.pi) * w / theta) <= 1e-15
    assert np.linalg.norm(w_back - dl.so3_log(R)) <= 1e-15


def test_so3_log_at_pi_is_a_logarithm(rng):
    for _ in range(5):
        w = np.pi * unit(rng)
        w_back = dl.so3_log(dl.so3_exp(w))
        assert abs(np.linalg.norm(w_back) - np.pi) < 1e-15
        assert np.allclose(dl.so3_exp(w_back), dl.so3_exp(w), atol=1e-15, rtol=0)
        assert min(np.linalg.norm(w_back - w), np.linalg.norm(w_back + w)) < 1e-14


def test_so3_log_wraps_to_the_principal_angle(rng):
    a = unit(rng)
    w = (2 * np.pi - 0.3) * a  # the same rotation as -0.3 a
    assert np.allclose(dl.so3_log(dl.so3_exp(w)), -0.3 * a, atol=1e-14, rtol=0)


def test_so3_exp_matches_jax_rodrigues(rng):
    for theta in [1e-9, 0.5, 3.1, 6.0]:
        w = theta * unit(rng)
        err = check.relative_error(dl.so3_exp(w), np.asarray(expm3(w)))
        assert err < 1e-14


def test_so3_log_refuses_a_matrix_that_is_no_rotation():
    with pytest.raises(ValueError, match=r"R must be a rotation.*det R = -1"):
        dl.so3_log(np.diag([1.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match=r"R must be a 3 x 3 rotation matrix"):
        dl.so3_log(np.eye(2))
    with pytest.raises(ValueError, match="R must be finite"):
        dl.so3_log(np.full((3, 3), np.nan))


@pytest.mark.parametrize("theta", [1e-9, 5e-3, 0.4, 1.5, 2.9, 4.0, 6.0])
def test_right_jacobian_inverse(theta, rng):
    w = theta * unit(rng)
    Ji = dl.right_jacobian_inverse(w)
    assert np.abs(Ji @ dl.right_jacobian(w) - np.eye(3)).max() < 1e-13
    assert (
        np.abs(dl.left_jacobian_inverse(w) @ dl.left_jacobian(w) - np.eye(3)).max()
        < 1e-13
    )
    if theta < np.pi - 0.1 and theta > 1e-3:  # where the arccos oracle is accurate
        assert check.relative_error(Ji, np.asarray(jr_inv_jax(w))) < 1e-10


def test_right_jacobian_inverse_planted_sign_fails(rng):
    w = 1.2 * unit(rng)
    W = dl.hat(w)
    wrong = dl.right_jacobian_inverse(w) - W  # + (1/2)[w]x becomes - (1/2)[w]x
    assert check.relative_error(wrong, np.asarray(jr_inv_jax(w))) > 0.1
    del W


def test_right_jacobian_inverse_refuses_2pi(rng):
    with pytest.raises(ValueError, match=r"J_r\(w\) is singular at \|w\|"):
        dl.right_jacobian_inverse(2 * np.pi * unit(rng))


def test_rotate_jacobian_right_is_exact_at_every_rotation(rng):
    P = rng.standard_normal((3, 4))
    for theta in [0.0, 1.0, 3.0, np.pi]:
        R = dl.so3_exp(theta * unit(rng))
        J = dl.rotate_jacobian_right(R, P)
        for i in range(P.shape[1]):
            oracle = np.asarray(rotate_right_jax(R, P[:, i]))
            assert check.relative_error(J[i], oracle) < 1e-14
    # the additive Jacobian -R [p]x J_r(w) answers a different question
    w = 2.0 * unit(rng)
    R = dl.so3_exp(w)
    wrong = dl.rotate_jacobian(w, P[:, 0])
    assert check.relative_error(wrong, np.asarray(rotate_right_jax(R, P[:, 0]))) > 0.1


def test_so3_adjoint_converts_right_to_left(rng):
    R = dl.so3_exp(2.2 * unit(rng))
    d = 0.3 * unit(rng)
    lhs = R @ dl.so3_exp(d)
    rhs = dl.so3_exp(dl.so3_adjoint(R) @ d) @ R
    assert np.abs(lhs - rhs).max() < 1e-15
    w = 1.7 * unit(rng)
    assert (
        np.abs(dl.left_jacobian(w) - dl.so3_exp(w) @ dl.right_jacobian(w)).max() < 1e-15
    )


def se3_cases(rng):
    cases = []
    for theta in [0.0, 1e-9, 1e-3, 0.05, 0.0999, 0.1, 0.8, 2.5, 3.1]:
        cases.append(np.concatenate([theta * unit(rng), rng.standard_normal(3)]))
    return cases


def test_se3_exp_log(rng):
    for tau in se3_cases(rng):
        T = dl.se3_exp(tau)
        assert check.relative_error(T, np.asarray(expm4(tau))) < 1e-14
        assert np.abs(dl.se3_log(T) - tau).max() < 1e-14 * (1 + np.abs(tau).max())


def test_se3_jacobians_match_jax(rng):
    for tau in se3_cases(rng):
        T = np.asarray(expm4(tau))
        dT = np.asarray(d_expm4(tau))  # (4, 4, 6)
        Ti = np.linalg.inv(T)
        Jr = np.stack([np.asarray(vee_se3(Ti @ dT[:, :, i])) for i in range(6)], 1)
        Jl = np.stack([np.asarray(vee_se3(dT[:, :, i] @ Ti)) for i in range(6)], 1)
        assert check.relative_error(dl.se3_right_jacobian(tau), Jr) < 1e-12
        assert check.relative_error(dl.se3_left_jacobian(tau), Jl) < 1e-12
        Jri = dl.se3_right_jacobian_inverse(tau)
        assert np.abs(Jri @ dl.se3_right_jacobian(tau) - np.eye(6)).max() < 1e-12
        Jli = dl.se3_left_jacobian_inverse(tau)
        assert np.abs(Jli @ dl.se3_left_jacobian(tau) - np.eye(6)).max() < 1e-12


def test_se3_adjoint(rng):
    T = dl.se3_exp(np.concatenate([2.0 * unit(rng), rng.standard_normal(3)]))
    tau = np.concatenate([0.4 * unit(rng), rng.standard_normal(3)])
    lhs = T @ scipy.linalg.expm(np.asarray(twist_jax(tau)))
    rhs = scipy.linalg.expm(np.asarray(twist_jax(dl.se3_adjoint(T) @ tau))) @ T
    assert np.abs(lhs - rhs).max() < 1e-13
    # and it converts the right Jacobian into the left one: J_l = Ad_Exp(tau) J_r
    Ad = dl.se3_adjoint(dl.se3_exp(tau))
    assert (
        np.abs(dl.se3_left_jacobian(tau) - Ad @ dl.se3_right_jacobian(tau)).max()
        < 1e-13
    )


def test_se3_refuses_bad_input():
    with pytest.raises(ValueError, match=r"tau must be an se\(3\) tangent"):
        dl.se3_exp(np.zeros(3))
    with pytest.raises(ValueError, match=r"last row \[0, 0, 0, 1\]"):
        dl.se3_log(np.ones((4, 4)))


def pnp_scene(rng, n=20):
    X = rng.uniform(-1, 1, (3, n))
    xi = np.array([0.1, -0.3, 0.2, 0.2, -0.1, 4.0])
    return X, xi, dl.project(dl.transform(xi, X), K)


def test_pose_retract_and_its_jacobian(rng):
    X, xi, u = pnp_scene(rng, 5)
    J = dl.reprojection_jacobian_right(xi, X, K)
    for _ in range(3):
        d = 1e-6 * rng.standard_normal(6)
        r1 = dl.reprojection_residual(dl.pose_retract(xi, d), X, K, u)
        r0 = dl.reprojection_residual(dl.pose_retract(xi, -d), X, K, u)
        assert check.relative_error((r1 - r0) / 2, J @ d) < 1e-8


def test_manifold_update_converges_near_2pi_where_additive_crawls(rng):
    X, xi, u = pnp_scene(rng)
    d = np.array([1.0, 0.5, -0.7]) / np.linalg.norm([1.0, 0.5, -0.7])
    wp = xi[:3] + 0.3 * d
    w0 = -wp / np.linalg.norm(wp) * (2 * np.pi - 0.01)
    xi0 = np.concatenate([w0, xi[3:] + [0.1, 0.1, 0.3]])
    x, hist = dl.solve_pnp(X, K, u, xi0=xi0)
    assert hist.n_iter <= 8 and np.abs(x - xi).max() < 1e-12
    x, h_add = dl.solve_least_squares(
        lambda v: dl.reprojection_residual(v, X, K, u),
        lambda v: dl.reprojection_jacobian(v, X, K),
        xi0,
    )
    assert h_add.n_iter >= 3 * hist.n_iter
    with pytest.raises(dl.ConvergenceError, match="Gauss-Newton step put a point"):
        dl.solve_least_squares(
            lambda v: dl.reprojection_residual(v, X, K, u),
            lambda v: dl.reprojection_jacobian(v, X, K),
            xi0,
            method="gn",
        )
    x, hist = dl.solve_pnp(X, K, u, xi0=xi0, method="gn")
    assert np.abs(x - xi).max() < 1e-12
