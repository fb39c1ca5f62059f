"""Chapter 8, differentiating through solvers: the implicit function theorem read off
a differential.

If x*(theta) solves F(x, theta) = 0, differentiating the identity F(x*(theta), theta)
= 0 gives A dx* + B dtheta = 0 with A = dF/dx and B = dF/dtheta (eq. 8.2). The
forward rule solves A dx* = -B dtheta (eq. 8.3); the backward rule solves A^T lam = G
and returns -B^T lam (eq. 8.4). For an argmin, F is the gradient and A the Hessian.

Every JVP here is written from the forward differential and every VJP from its
adjoint, separately, so that the dot-product test compares two derivations. A rule
refuses a point that is not a solution (the residual F is above tolerance) and a
singular A (the solution is then not a smooth function of theta).
"""

import math

import numpy as np

from ._validate import as_float_array, require_finite
from .geometry.camera import BehindCameraError, _in_front, project
from .geometry.lie import (
    MAX_ROTATION_VECTOR,
    _log_rotation,
    _rotation_vector,
)
from .geometry.linear import dlt_pose
from .geometry.solvers import MAX_DAMPING, _pnp_problem, _pose, _solver_options, _stuck
from .losses import (
    ConvergenceError,
    _check_binary_labels,
    _check_label_columns,
    fit_logistic,
    fit_multinomial,
    logistic_hessian,
    multinomial_hessian,
)
from .vector import sigmoid, sigmoid_derivative, softmax

RCOND = 1e-12  # below this reciprocal condition number, A is refused as singular


# ----- 8.1 The theorem from a differential -----


def _check_converged(residual, tol, what, tested="max |F(x, theta)|"):
    """Refuse a point that does not solve F = 0: the theorem holds only at a root.
    `residual` is the quantity compared with `tol` (max norm), and `tested` names it in
    the message: F itself, or a scaled form of it."""
    if residual is None:
        return
    r = as_float_array(residual, "residual")
    worst = float(np.abs(r).max())
    if not np.isfinite(worst):
        require_finite(r, "residual")
    if not worst <= tol:
        raise ValueError(
            f"{what}: the solver did not converge: {tested} = {worst:.3g} > "
            f"tol = {tol:.3g}; the implicit function theorem gives the derivative of "
            "x*(theta) only at a solution of F = 0"
        )


def _square(A, name="A"):
    A = require_finite(as_float_array(A, name, ndims=2), name)
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} = dF/dx must be square, got shape {A.shape}")
    return A


def factor(A, rcond=RCOND, what="implicit differentiation"):
    """LU-factorise A = dF/dx, refusing a singular A with the smallest pivot and the
    reciprocal condition number (LAPACK's estimate) in the message. Returns the
    factorisation (LU and pivots, as ``scipy.linalg.lu_factor`` returns them; both
    call LAPACK's dgetrf, here directly, without the wrapper's checks)."""
    from scipy.linalg.lapack import dgecon, dgetrf

    A = _square(A)
    anorm = float(np.max(np.sum(np.abs(A), axis=0)))
    lu, piv, _ = dgetrf(A)  # info > 0 (an exact zero pivot) is refused below
    pivots = np.abs(lu.diagonal())
    smallest = float(pivots.min())
    estimate = dgecon(lu, anorm, norm="1")[0] if smallest > 0 and anorm > 0 else 0.0
    if not estimate >= rcond:
        raise _singular(what, A.shape[0], smallest, estimate, rcond)
    return lu, piv


def _singular(what, n, smallest, rcond_found, rcond):
    return ValueError(
        f"{what}: A = dF/dx ({n} x {n}) is singular to working precision: smallest "
        f"LU pivot {smallest:.3g}, reciprocal condition number {rcond_found:.3g} < "
        f"{rcond:.0e}; x* is not a locally unique, differentiable function of theta "
        "(add regularisation, or fix a gauge)"
    )


def _lu_solve(factors, b, trans=0):
    """Solve A x = b (trans=0) or A^T x = b (trans=1) with `factor`'s LU (LAPACK's
    dgetrs, as ``scipy.linalg.lu_solve`` calls it)."""
    from scipy.linalg.lapack import dgetrs

    x, info = dgetrs(*factors, b, trans=trans)
    if info != 0:
        raise ValueError(f"dgetrs: illegal argument {-info}")
    return x


def _linearisation(A, B):
    A = _square(A)
    B = require_finite(as_float_array(B, "B", ndims=2), "B")
    if B.shape[0] != A.shape[0]:
        raise ValueError(
            f"B = dF/dtheta must have {A.shape[0]} rows (one per equation of F), got "
            f"shape {B.shape}"
        )
    return A, B


def implicit_jvp(A, B, dtheta, *, residual=None, tol=1e-8, rcond=RCOND):
    """Eq. (8.3): the forward rule dx* = -A^-1 B dtheta of a solution x*(theta) of
    F(x, theta) = 0, from the linearisation A = dF/dx (m, m), B = dF/dtheta (m, p) at
    the solution, for a tangent dtheta (p,). Returns dx*, shape (m,).

    `residual`, F at the point, is checked against `tol` (max norm) when given."""
    A, B = _linearisation(A, B)
    dtheta = require_finite(as_float_array(dtheta, "dtheta", ndims=1), "dtheta")
    if dtheta.shape != (B.shape[1],):
        raise ValueError(
            f"dtheta must have shape ({B.shape[1]},) (one entry per column of B), got "
            f"shape {dtheta.shape}"
        )
    _check_converged(residual, tol, "implicit_jvp")
    factors = factor(A, rcond, "implicit_jvp")
    # A dx + B dtheta = 0, solved for dx
    return _lu_solve(factors, -(B @ dtheta))


def implicit_vjp(A, B, G, *, residual=None, tol=1e-8, rcond=RCOND):
    """Eq. (8.4): the backward rule theta_bar = -B^T lam with A^T lam = G, for a
    cotangent G (m,) on x*. Shapes and checks as `implicit_jvp`; returns (p,)."""
    A, B = _linearisation(A, B)
    G = require_finite(as_float_array(G, "G", ndims=1), "G")
    if G.shape != (A.shape[0],):
        raise ValueError(
            f"G must have shape ({A.shape[0]},) (shaped like x*), got shape {G.shape}"
        )
    _check_converged(residual, tol, "implicit_vjp")
    factors = factor(A, rcond, "implicit_vjp")
    # <G, dx> = <G, -A^-1 B dtheta> = <-B^T A^-T G, dtheta>
    lam = _lu_solve(factors, G, trans=1)
    return -(B.T @ lam)


# ----- 8.2 A fitted model as a layer -----


def _log_l2(log_l2):
    s = as_float_array(log_l2, "log_l2")
    if s.shape not in ((), (1,)):
        raise ValueError(f"log_l2 must be a scalar, got shape {s.shape}")
    s = float(s.reshape(()))
    with np.errstate(over="ignore"):
        l2 = np.exp(s)
    if not np.isfinite(s) or not np.isfinite(l2) or l2 == 0.0:
        raise ValueError(
            f"log_l2 must be finite with exp(log_l2) a positive float, got {s}"
        )
    return s


def _scalar(x, name):
    s = as_float_array(x, name)
    if s.shape not in ((), (1,)):
        raise ValueError(f"{name} must be a scalar, got shape {s.shape}")
    return float(require_finite(s, name).reshape(()))


def logistic_fit(X, log_l2, *, y, tol=1e-10, max_iter=100):
    """The fitted parameters theta*(X, log l2) of Chapter 3's L2-regularised logistic
    regression, minimising L(theta) + (l2 / 2) |theta|^2 with l2 = exp(log_l2)
    (eq. 8.5). X (d, n), y in {0, 1}^n (a constant, keyword-only). Returns (d,)."""
    return fit_logistic(X, y, l2=np.exp(_log_l2(log_l2)), tol=tol, max_iter=max_iter)


def _logistic_point(X, log_l2, y, theta, tol):
    X = require_finite(as_float_array(X, "X", ndims=2), "X")
    y = _check_binary_labels(y)
    if y.shape != (X.shape[1],):
        raise ValueError(
            f"y must have one label per column of X, shape ({X.shape[1]},), got shape "
            f"{y.shape}"
        )
    l2 = np.exp(_log_l2(log_l2))
    if theta is None:
        theta = fit_logistic(X, y, l2=l2)
    theta = require_finite(as_float_array(theta, "theta", ndims=1), "theta")
    if theta.shape != (X.shape[0],):
        raise ValueError(
            f"theta must have shape ({X.shape[0]},) (one entry per row of X), got "
            f"shape {theta.shape}"
        )
    z = X.T @ theta
    e = sigmoid(z) - y  # pi - y
    grad = X @ e + l2 * theta
    _check_converged(
        grad / X.shape[1],
        tol,
        "the logistic fit",
        "max |gradient| / n (n = columns of X)",
    )
    H = logistic_hessian(theta, X, y, l2=l2)
    return X, l2, y, theta, z, e, H


def logistic_fit_jvp(X, log_l2, dX, dlog_l2, *, y, theta=None, tol=1e-8):
    """Eq. (8.7): the forward rule of `logistic_fit`, d theta* = -H^-1 [dX (pi - y) +
    X diag(w) dX^T theta + l2 theta dlog_l2], w = pi o (1 - pi), for tangents dX
    (d, n) and dlog_l2 (scalar). `theta` is the fit at (X, log_l2) if already known
    (its gradient / n is checked against `tol`). Returns (d,)."""
    X, l2, y, theta, z, e, H = _logistic_point(X, log_l2, y, theta, tol)
    dX = require_finite(as_float_array(dX, "dX", ndims=2), "dX")
    if dX.shape != X.shape:
        raise ValueError(f"dX must have the shape of X, {X.shape}, got {dX.shape}")
    ds = _scalar(dlog_l2, "dlog_l2")
    w = sigmoid_derivative(z)
    dF = dX @ e + X @ (w * (dX.T @ theta)) + l2 * ds * theta  # B dtheta
    return _lu_solve(factor(H, what="logistic_fit_jvp"), -dF)


def logistic_fit_vjp(X, log_l2, G, *, y, theta=None, tol=1e-8):
    """Eq. (8.8): the backward rule of `logistic_fit`: with H lam = G,
    X_bar = -[lam (pi - y)^T + theta (w o X^T lam)^T] and log_l2_bar = -l2 theta^T lam.
    G (d,); returns (X_bar (d, n), log_l2_bar (a 0-d array))."""
    X, l2, y, theta, z, e, H = _logistic_point(X, log_l2, y, theta, tol)
    G = require_finite(as_float_array(G, "G", ndims=1), "G")
    if G.shape != theta.shape:
        raise ValueError(
            f"G must have the shape of theta, {theta.shape}, got {G.shape}"
        )
    lam = _lu_solve(factor(H, what="logistic_fit_vjp"), G, trans=1)
    w = sigmoid_derivative(z)
    X_bar = -(np.outer(lam, e) + np.outer(theta, w * (X.T @ lam)))
    return X_bar, np.array(-l2 * float(theta @ lam))


def multinomial_fit(X, log_l2, *, Y, tol=1e-10, max_iter=100):
    """Theta*(X, log l2) of Chapter 3's L2-regularised multinomial logistic regression
    (eq. 8.5 with the multinomial loss): X (d, n), Y (k, n) one-hot. Returns (d, k)."""
    return fit_multinomial(X, Y, l2=np.exp(_log_l2(log_l2)), tol=tol, max_iter=max_iter)


def _multinomial_point(X, log_l2, Y, Theta, tol):
    X = require_finite(as_float_array(X, "X", ndims=2), "X")
    Y = _check_label_columns(Y)
    if Y.shape[1] != X.shape[1]:
        raise ValueError(
            f"Y must have one column per column of X ({X.shape[1]}), got shape "
            f"{Y.shape}"
        )
    l2 = np.exp(_log_l2(log_l2))
    if Theta is None:
        Theta = fit_multinomial(X, Y, l2=l2)
    Theta = require_finite(as_float_array(Theta, "Theta", ndims=2), "Theta")
    if Theta.shape != (X.shape[0], Y.shape[0]):
        raise ValueError(
            f"Theta must have shape {(X.shape[0], Y.shape[0])}, got {Theta.shape}"
        )
    Pi = softmax(Theta.T @ X)
    grad = X @ (Pi - Y).T + l2 * Theta
    _check_converged(
        grad / X.shape[1],
        tol,
        "the multinomial fit",
        "max |gradient| / n (n = columns of X)",
    )
    H = multinomial_hessian(Theta, X, Y, l2=l2)
    return X, l2, Y, Theta, Pi, H


def _softmax_tangent(Pi, dZ):
    """The differential of the column-wise softmax: dPi = Pi o dZ - Pi o 1 1^T (Pi o
    dZ) (eq. 2.10, column by column); self-adjoint."""
    P = Pi * dZ
    return P - Pi * P.sum(axis=0)


def multinomial_fit_jvp(X, log_l2, dX, dlog_l2, *, Y, Theta=None, tol=1e-8):
    """Eq. (8.9): the forward rule of `multinomial_fit`: vec dTheta* = -H^-1
    vec[dX (Pi - Y)^T + X S(Theta^T dX)^T + l2 Theta dlog_l2], with S the softmax
    differential and H the (dk, dk) Hessian of Chapter 3. Returns (d, k)."""
    X, l2, Y, Theta, Pi, H = _multinomial_point(X, log_l2, Y, Theta, tol)
    dX = require_finite(as_float_array(dX, "dX", ndims=2), "dX")
    if dX.shape != X.shape:
        raise ValueError(f"dX must have the shape of X, {X.shape}, got {dX.shape}")
    ds = _scalar(dlog_l2, "dlog_l2")
    dF = dX @ (Pi - Y).T + X @ _softmax_tangent(Pi, Theta.T @ dX).T + l2 * ds * Theta
    dvec = _lu_solve(factor(H, what="multinomial_fit_jvp"), -dF.ravel(order="F"))
    return dvec.reshape(Theta.shape, order="F")


def multinomial_fit_vjp(X, log_l2, G, *, Y, Theta=None, tol=1e-8):
    """Eq. (8.10): the backward rule of `multinomial_fit`: with H vec Lam = vec G,
    X_bar = -[Lam (Pi - Y) + Theta S(Lam^T X)] and log_l2_bar = -l2 <Theta, Lam>.
    G (d, k); returns (X_bar (d, n), log_l2_bar (0-d))."""
    X, l2, Y, Theta, Pi, H = _multinomial_point(X, log_l2, Y, Theta, tol)
    G = require_finite(as_float_array(G, "G", ndims=2), "G")
    if G.shape != Theta.shape:
        raise ValueError(
            f"G must have the shape of Theta, {Theta.shape}, got {G.shape}"
        )
    lam = _lu_solve(factor(H, what="multinomial_fit_vjp"), G.ravel(order="F"), trans=1)
    Lam = lam.reshape(Theta.shape, order="F")
    X_bar = -(Lam @ (Pi - Y) + Theta @ _softmax_tangent(Pi, Lam.T @ X))
    return X_bar, np.array(-l2 * float(np.sum(Theta * Lam)))


# ----- 8.3 Fixed points: undistorting image points -----
#
# A fixed point x = T(x, theta) is a root of F = x - T: A = I - dT/dx (eq. 8.11).


def _distortion(u, k):
    u = require_finite(as_float_array(u, "u", ndims=2), "u")
    if u.shape[0] != 2:
        raise ValueError(
            f"u must hold normalised image points as columns, shape (2, n), got "
            f"shape {u.shape}"
        )
    k = require_finite(as_float_array(k, "k", ndims=1), "k")
    if k.shape != (2,):
        raise ValueError(f"k must be (k1, k2), shape (2,), got shape {k.shape}")
    return u, k


def undistort(u, k, *, tol=1e-13, max_iter=500):
    """The undistorted normalised points x (2, n) with x (1 + k1 |x|^2 + k2 |x|^4) = u,
    by the fixed-point iteration x <- u / (1 + k1 |x|^2 + k2 |x|^4) from x = u
    (eq. 8.12). Raises ValueError when the iteration does not settle to `tol` (max
    step) within `max_iter` iterations (it is not a contraction there)."""
    u, k = _distortion(u, k)
    x = u.copy()
    for _ in range(max_iter):
        rho = np.sum(x * x, axis=0)
        x_new = u / (1.0 + k[0] * rho + k[1] * rho**2)
        step = float(np.max(np.abs(x_new - x)))
        x = x_new
        if not np.all(np.isfinite(x)):
            break
        if step <= tol:
            rho = np.sum(x * x, axis=0)
            c = 1.0 + k[0] * rho + k[1] * rho**2
            if np.any(c <= 0):
                i = int(np.argmin(c))
                raise ValueError(
                    f"undistort: the iteration settled at point {i} on a root with "
                    f"1 + k1 r^2 + k2 r^4 = {c[i]:.3g} <= 0, beyond the fold of the "
                    "distortion, where no camera images a point"
                )
            return x
    raise ValueError(
        f"undistort: the fixed-point iteration did not converge in {max_iter} "
        f"iterations for k = ({k[0]:.3g}, {k[1]:.3g}) (last step {step:.3g} > tol "
        f"{tol:.0e}): the map x -> u / (1 + k1 r^2 + k2 r^4) is not a contraction there"
    )


def _undistort_point(u, k, x, tol):
    """Per-point linearisation of F = x c(x) - u: A_i = c_i I + 2 (k1 + 2 k2 rho_i)
    x_i x_i^T (2 x 2, symmetric), with its determinant checked."""
    if x is None:
        x = undistort(u, k)
    x = require_finite(as_float_array(x, "x", ndims=2), "x")
    if x.shape != u.shape:
        raise ValueError(f"x must have the shape of u, {u.shape}, got {x.shape}")
    rho = np.sum(x * x, axis=0)
    c = 1.0 + k[0] * rho + k[1] * rho**2
    _check_converged(x * c - u, tol, "undistort", "max |x c(x) - u|")
    a = 2.0 * (k[0] + 2.0 * k[1] * rho)
    A = c[:, None, None] * np.eye(2) + a[:, None, None] * np.einsum("in,jn->nij", x, x)
    det = np.linalg.det(A)
    worst = int(np.argmin(np.abs(det)))
    scale = np.max(np.abs(A), axis=(1, 2)) ** 2
    if not np.abs(det[worst]) > RCOND * scale[worst]:
        raise ValueError(
            f"undistort: A = dF/dx is singular at point {worst} "
            f"(det {det[worst]:.3g}): "
            "the distortion folds there, and the undistorted point is not a "
            "differentiable function of u and k"
        )
    return x, rho, A


def undistort_jvp(u, k, du, dk, *, x=None, tol=1e-10):
    """Eq. (8.13): the forward rule of `undistort`, A_i dx_i = du_i - x_i (rho_i dk1 +
    rho_i^2 dk2), one 2 x 2 solve per point. Returns dx (2, n)."""
    u, k = _distortion(u, k)
    du, dk = _distortion(du, dk)
    if du.shape != u.shape:
        raise ValueError(f"du must have the shape of u, {u.shape}, got {du.shape}")
    x, rho, A = _undistort_point(u, k, x, tol)
    rhs = du - x * (rho * dk[0] + rho**2 * dk[1])
    return np.linalg.solve(A, rhs.T[:, :, None])[:, :, 0].T


def undistort_vjp(u, k, G, *, x=None, tol=1e-10):
    """Eq. (8.14): the backward rule of `undistort`: lam_i = A_i^-T G_i, u_bar = lam,
    k_bar = -sum_i (x_i^T lam_i) (rho_i, rho_i^2).
    Returns (u_bar (2, n), k_bar (2,))."""
    u, k = _distortion(u, k)
    G = require_finite(as_float_array(G, "G", ndims=2), "G")
    if G.shape != u.shape:
        raise ValueError(f"G must have the shape of u, {u.shape}, got {G.shape}")
    x, rho, A = _undistort_point(u, k, x, tol)
    At = np.transpose(A, (0, 2, 1))
    lam = np.linalg.solve(At, G.T[:, :, None])[:, :, 0].T
    xl = np.sum(x * lam, axis=0)
    return lam, -np.array([xl @ rho, xl @ rho**2])


# ----- 8.4 Through nonlinear least squares: the PnP pose as a layer -----


def _pnp_inputs(X, K, u, weights):

    X, K, u = _pnp_problem(X, K, u)
    n = X.shape[1]
    if weights is None:
        return X, K, u, np.ones(n)
    wts = require_finite(as_float_array(weights, "weights", ndims=1), "weights")
    if wts.shape != (n,):
        raise ValueError(
            f"weights must have shape ({n},) (one per point), got shape {wts.shape}"
        )
    if not np.all(wts > 0):
        raise ValueError(
            f"weights must be positive, got min {wts.min():.3g} at point "
            f"{int(np.argmin(wts))}"
        )
    return X, K, u, wts


def pnp_pose(X, K, u, *, weights=None, xi0=None, tol=1e-12, max_iter=100):
    """The pose xi = (w, t) minimising E = 1/2 sum_i w_i |pi(R X_i + t) - u_i|^2 (eq.
    8.15) by Levenberg-Marquardt on the manifold (the iteration of Chapter 6's
    `solve_least_squares` with `pose_retract`, each residual scaled by sqrt(w_i);
    see `_pnp_lm`). X (3, n), K (3, 3), u (2, n), weights (n,) positive (all ones
    when None); start xi0 (6,) or the DLT pose. Returns xi (6,); raises
    ConvergenceError when the solver does not converge."""
    X, K, u, wts = _pnp_inputs(X, K, u, weights)
    return _pnp_solve(X, K, u, wts, weights is None, xi0, tol, max_iter)[0]


def _pnp_solve(X, K, u, wts, unweighted, xi0, tol, max_iter):
    """`pnp_pose` for validated X, K, u and weights (all ones when unweighted):
    `_pnp_lm`'s (xi, R, t)."""

    _solver_options(tol, max_iter, 1e-3)
    if xi0 is None:
        xi0 = dlt_pose(X, K, u)
    else:  # finite, and a rotation vector that Rodrigues' formula can take
        xi0 = _pose(xi0, "xi0")
        if np.abs(xi0[:3]).max() > MAX_ROTATION_VECTOR:  # |w|^2 would overflow
            _rotation_vector(xi0[:3], "xi0[:3]")  # raises
    # the minimiser does not change when every weight is scaled: divide by the largest,
    # so that extreme weights neither overflow nor underflow E
    sw = wts if unweighted else np.sqrt(wts / wts.max())
    return _pnp_lm(X, K, u, sw, xi0, tol, max_iter)


def _rotation(w):
    """R(w) (3, 3) for a checked rotation vector w (3,), by the Rodrigues formula of
    the compiled loops (`_pnp_kernels._rodrigues`), so that the pose they start from
    and linearise at is built as their steps are."""
    from . import _pnp_kernels

    R = np.empty((3, 3))
    _pnp_kernels._rodrigues(*w.tolist(), R)
    return R


def _pnp_lm(X, K, u, sw, xi0, tol, max_iter, lam0=1e-3):
    """Chapter 6's Levenberg-Marquardt (`solve_least_squares(method="lm",
    retract=pose_retract)`: the same damping, updates and stopping rules) on the
    residuals sqrt(w_i) r_i, for inputs validated once by the caller. The rotation is
    kept as a matrix, R <- R Exp(delta_w), and the whole iteration is one compiled
    loop (`_pnp_kernels.lm`), with no per-step checks, that forms the Jacobian in the
    right perturbation from closed forms point by point. A step that puts a point
    behind the camera (or whose image overflows) counts as raising E. Returns (xi,
    R, t): the pose, and its rotation matrix and translation as the iteration left
    them. The two round differently, so near the stopping rule they may stop an
    iteration apart: the poses agree to the solver's accuracy (tested below 1e-8
    relative at tol = 1e-12), not bit for bit."""
    from . import _pnp_kernels as kernels

    R, t = _rotation(xi0[:3]), xi0[3:].copy()
    u_off = u - K[:2, 2:3]  # r = K12 (p_xy / p_z) - (u - K[:2, 2])
    xi = np.empty(6)
    status, E, lam, logged = kernels.lm(
        X, K, u_off, sw, R, t, float(tol), int(max_iter), float(lam0), MAX_DAMPING, xi
    )
    if status == kernels.INVALID_START:
        _in_front(R @ X + t[:, None], "R(w) X + t")
        raise BehindCameraError("the image of R(w) X + t overflows at the start xi0")
    if status == kernels.SINGULAR:
        raise np.linalg.LinAlgError("Singular matrix")
    if status == kernels.STUCK:
        raise _stuck(E, lam, "Levenberg-Marquardt")
    if status == kernels.NOT_CONVERGED:
        raise ConvergenceError(
            f"lm did not converge in {max_iter} iterations (cost {E:.6g})"
        )
    if not logged:  # an angle of NEAR_PI or more: so3_log's own branch
        xi[:3] = _log_rotation(R)
    return xi, R, t


def _pnp_linearisation(X, K, u, wts, xi, tol, hessian, damping):
    """At the pose xi: the residuals r (2, n) (row k: coordinate k of every point),
    their Jacobian in the right perturbation J (6, 2, n) (unweighted), the gradient
    check, and the Hessian H (6, 6) of E in the perturbation
    (eq. 8.17): sum_i w_i J_i^T J_i, plus, when hessian='exact', the second-order term
    sum_i w_i r_i . Hess r_i (eq. 8.18), plus damping * I. The weights are divided by s
    = max w_i first, so that extreme weights neither overflow nor underflow: the H
    returned is the Hessian over s, and s is returned too."""

    damping = _pnp_options(hessian, damping)
    xi = _pose(xi)
    _rotation_vector(xi[:3], "xi[:3]")  # |w|^2 finite, as Rodrigues' formula needs
    R = _rotation(xi[:3])
    return _pnp_linearise(X, K, u, wts, R, xi[3:], tol, hessian == "exact", damping)


def _pnp_options(hessian, damping):
    if hessian not in ("exact", "gauss-newton"):
        raise ValueError(f"hessian must be 'exact' or 'gauss-newton', got {hessian!r}")
    damping = float(damping)
    if not (np.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be finite and >= 0, got {damping}")
    return damping


def _pnp_linearise(X, K, u, wts, R, t, tol, exact, damping):
    """`_pnp_linearisation` at the pose (R, t), its options checked by the caller."""
    from . import _pnp_kernels

    n = X.shape[1]
    r, J, H = np.empty((2, n)), np.empty((6, 2, n)), np.empty((6, 6))
    # the second-order term (eq. 8.18), as `_pnp_kernels.linearise` sums it: residual
    # i's phi_i = a_i . r_i (a_i = w_i r_i) is (e1 x + e2 y) / z + const, (e1, e2) =
    # K12^T a_i, so with m = (e1, e2, 0) its Hessian in p is -(m e3^T + e3 m^T) / z^2
    # + (2 m^T p / z^3) e3 e3^T. Sandwiched by P_i = dp_i / d(delta_w, delta_t): with
    # q = P_i^T e3 = dz / d(delta) and v = P_i^T m / z^2, and P_i^T e_k = z d(p_k / z)
    # / d(delta) + (p_k / z) q for k = 1, 2, it is -(v q^T + q v^T) + (2 m^T p / z^3)
    # q q^T = -(s q^T + q s^T), with s = (e1 d(x / z) + e2 d(y / z)) / z: the
    # Jacobian of the normalised images again. The curvature of R Exp(delta_w) X_i,
    # summed over i, adds (C X^T + X C^T) / 2 - tr(C X^T) I to the rotation block,
    # with c_i = R^T b_i and b_i = ((e1, e2) / z, -(e1 x + e2 y) / z^2) the gradient
    # of phi_i in p
    status, g, trace, wrr, s_w, wbar = _pnp_kernels.linearise(
        X, K, u, wts, R, t, exact, r, J, H
    )
    if status:  # raise the camera model's own error, naming the point
        p = R @ X + t[:, None]
        _in_front(p, "R(w) X + t")
        with np.errstate(over="ignore", invalid="ignore"):
            project(p, K)
        raise BehindCameraError("the residuals at xi are not finite")
    # relative stationarity: |grad E| against |W^1/2 J| (1 + |W^1/2 r|), with the
    # weights divided by their mean wbar, so that scaling every weight (which leaves
    # the pose unchanged) leaves the test unchanged too: |W^1/2 J|^2 = tr H_GN / wbar
    scale = math.sqrt(trace / wbar) * (1.0 + math.sqrt(wrr / wbar))
    _check_converged(
        g / (wbar * scale),
        tol,
        "pnp_pose",
        "the relative gradient max |g| / (|W^1/2 J| (1 + |W^1/2 r|)) (W the weights "
        "over their mean)",
    )
    if damping:
        H.flat[::7] += damping / s_w
    return r, J, H, s_w


def pnp_pose_hessian(X, K, u, *, weights=None, xi=None, hessian="exact", tol=1e-6):
    """The (6, 6) Hessian of E (eq. 8.15) in the right perturbation of the pose at
    xi (the solution of `pnp_pose` when None): eq. (8.17), with the second-order term
    (8.18) when hessian='exact', without it for 'gauss-newton'."""
    X, K, u, wts = _pnp_inputs(X, K, u, weights)
    if xi is None:
        xi = pnp_pose(X, K, u, weights=wts)
    _, _, H, s_w = _pnp_linearisation(X, K, u, wts, xi, tol, hessian, 0.0)
    with np.errstate(over="ignore"):  # inf only where the Hessian passes the floats
        return s_w * H


def pnp_pose_jvp(
    X,
    K,
    u,
    du,
    dweights,
    *,
    weights=None,
    xi=None,
    hessian="exact",
    damping=0.0,
    tol=1e-6,
):
    """Eq. (8.19): the forward rule of `pnp_pose` in u (2, n) and the weights (n,):
    H delta = sum_i w_i J_i^T du_i - dw_i J_i^T r_i, with delta (6,) the tangent of the
    pose in its right perturbation (R Exp(delta_w), t + delta_t), rotation first.

    xi is the converged pose (solved when None); its relative gradient, max |g| /
    (|W^1/2 J| (1 + |W^1/2 r|)) with the weights W over their mean, must be below
    `tol`, else ValueError. hessian='gauss-newton' drops eq. (8.18) and damping > 0
    adds damping * I to H: both are the approximations that section 8.4 measures."""
    X, K, u, wts = _pnp_inputs(X, K, u, weights)
    du = require_finite(as_float_array(du, "du", ndims=2), "du")
    if du.shape != u.shape:
        raise ValueError(f"du must have the shape of u, {u.shape}, got {du.shape}")
    dw = require_finite(as_float_array(dweights, "dweights", ndims=1), "dweights")
    if dw.shape != wts.shape:
        raise ValueError(
            f"dweights must have shape {wts.shape} (one per point), got {dw.shape}"
        )
    if xi is None:
        xi = pnp_pose(X, K, u, weights=wts)
    r, J, H, s_w = _pnp_linearisation(X, K, u, wts, xi, tol, hessian, damping)
    # d(grad E) = H delta + sum_i J_i^T (dw_i r_i - w_i du_i) = 0, all over s_w
    dgrad = J.reshape(6, -1) @ ((dw / s_w) * r - (wts / s_w) * du).reshape(-1)
    return _lu_solve(_pnp_factor(H, "pnp_pose_jvp"), -dgrad)


def pnp_pose_vjp(
    X, K, u, G, *, weights=None, xi=None, hessian="exact", damping=0.0, tol=1e-6
):
    """Eq. (8.20): the backward rule of `pnp_pose`: H^T lam = G (6,), then u_bar_i =
    w_i J_i lam and weights_bar_i = -r_i^T J_i lam. Returns (u_bar (2, n),
    weights_bar (n,)). Options and checks as `pnp_pose_jvp`."""
    X, K, u, wts = _pnp_inputs(X, K, u, weights)
    G = _pnp_cotangent(G)
    if xi is None:
        xi = pnp_pose(X, K, u, weights=wts)
    r, J, H, s_w = _pnp_linearisation(X, K, u, wts, xi, tol, hessian, damping)
    return _pnp_backward(r, J, wts, s_w, _pnp_factor(H, "pnp_pose_vjp"), G)


def _pnp_cotangent(G):
    G = require_finite(as_float_array(G, "G", ndims=1), "G")
    if G.shape != (6,):
        raise ValueError(
            f"G must have shape (6,) (shaped like the pose), got {G.shape}"
        )
    return G


def _pnp_factor(H, what):
    """`factor` for the 6 x 6 Hessian of the PnP rules, compiled
    (`_pnp_kernels.factor`): the same LU and the same message, with the reciprocal
    condition number computed exactly (from the inverse) instead of estimated by
    dgecon (whose |A^-1|_1 is a lower bound in exact arithmetic): the two refuse
    alike except where the estimate's error straddles RCOND."""
    from . import _pnp_kernels

    lu, piv, smallest, rcond = _pnp_kernels.factor(H)
    if not rcond >= RCOND:
        raise _singular(what, 6, smallest, rcond, RCOND)
    return lu, piv


def _pnp_backward(r, J, wts, s_w, factors, G):
    """Eq. (8.20) from the linearisation at the pose (`_pnp_linearisation`'s r, J and
    s_w) and `_pnp_factor`'s LU of its H: H^T lam = G, u_bar_i = w_i J_i lam,
    weights_bar_i = -r_i^T J_i lam (all over s_w, which the H and so lam carry
    too)."""
    from . import _pnp_kernels

    lam = np.empty(6)  # s_w times lam
    _pnp_kernels.solve(*factors, G, 1, lam)
    Jl = (lam @ J.reshape(6, -1)).reshape(r.shape)  # (2, n): r moved by lam
    with np.errstate(over="ignore"):  # inf only where weights_bar passes the floats
        return (wts / s_w) * Jl, -np.sum(r * Jl, axis=0) / s_w


def pnp_pose_pullback(
    X,
    K,
    u,
    *,
    weights=None,
    xi0=None,
    hessian="exact",
    damping=0.0,
    tol=1e-12,
    max_iter=100,
):
    """`pnp_pose` and its backward rule as one layer, for a training loop: returns
    (xi, vjp), where xi = pnp_pose(X, K, u, weights=weights, xi0=xi0, tol=tol,
    max_iter=max_iter) and vjp(G) = pnp_pose_vjp(X, K, u, G, weights=weights, xi=xi,
    hessian=hessian, damping=damping) to rounding (eq. 8.20, linearised at the
    solver's own rotation matrix rather than Exp(xi[:3]); its check of the solution
    at its default tolerance). The inputs are validated once, and the linearisation
    at xi and the LU of its Hessian are computed here, once, for every G that vjp is
    given: each call of vjp costs one solve with the 6 x 6 LU (two triangular
    solves) and two products with the Jacobian."""
    X, K, u, wts = _pnp_inputs(X, K, u, weights)
    damping = _pnp_options(hessian, damping)
    xi, R, t = _pnp_solve(X, K, u, wts, weights is None, xi0, tol, max_iter)
    # at the solver's own R and t, which Exp(Log R) gives back to rounding
    exact = hessian == "exact"
    r, J, H, s_w = _pnp_linearise(X, K, u, wts, R, t, 1e-6, exact, damping)
    factors = _pnp_factor(H, "pnp_pose_vjp")

    def vjp(G):
        """(u_bar (2, n), weights_bar (n,)) for the cotangent G (6,) of the pose."""
        return _pnp_backward(r, J, wts, s_w, factors, _pnp_cotangent(G))

    return xi, vjp


def pnp_pose_covariance(X, K, u, *, sigma=1.0, weights=None, xi=None, tol=1e-6):
    """Eq. (8.21): the first-order covariance (6, 6) of the pose's right perturbation
    when every image coordinate carries independent noise of standard deviation sigma:
    sigma^2 H^-1 (sum_i w_i^2 J_i^T J_i) H^-1, with H the exact Hessian (8.17)."""
    X, K, u, wts = _pnp_inputs(X, K, u, weights)
    sigma = float(sigma)
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be finite and positive, got {sigma}")
    if xi is None:
        xi = pnp_pose(X, K, u, weights=wts)
    _, J, H, s_w = _pnp_linearisation(X, K, u, wts, xi, tol, "exact", 0.0)
    factors = _pnp_factor(H, "pnp_pose_covariance")
    S = _lu_solve(factors, (J * (wts / s_w)).reshape(6, -1))
    return sigma**2 * S @ S.T


# ----- 8.5 A closed-form argmin: Kabsch / Umeyama -----

# Below this size of lambda_2 + lambda_3 relative to sigma_1 the rotation is refused.
ALIGN_GAP = 1e-8


def _point_pairs(X, Y):
    X = require_finite(as_float_array(X, "X", ndims=2), "X")
    Y = require_finite(as_float_array(Y, "Y", ndims=2), "Y")
    if X.shape[0] != 3 or X.shape != Y.shape:
        raise ValueError(
            f"X and Y must be corresponding points as columns, both of shape (3, n), "
            f"got {X.shape} and {Y.shape}"
        )
    if X.shape[1] < 3:
        raise ValueError(f"alignment needs at least 3 point pairs, got {X.shape[1]}")
    return X, Y


def _alignment(X, Y, with_scale):
    """The SVD solution of Umeyama's problem, with the gap lambda_i + lambda_j of
    eq. (8.23) checked. Returns (R, s, t, U, V, lam, mx, Xc, Yc, var)."""
    n = X.shape[1]
    mx, my = X.mean(axis=1), Y.mean(axis=1)
    Xc, Yc = X - mx[:, None], Y - my[:, None]
    var = float(np.sum(Xc * Xc)) / n
    if not var > 0:
        raise ValueError("alignment is degenerate: all points X coincide")
    M = Yc @ Xc.T / n
    U, sig, Vt = np.linalg.svd(M)
    sign = 1.0 if np.linalg.det(U) * np.linalg.det(Vt) >= 0 else -1.0
    lam = sig * np.array([1.0, 1.0, sign])
    R = U @ np.diag([1.0, 1.0, sign]) @ Vt
    gap = lam[1] + lam[2]
    if not gap > ALIGN_GAP * sig[0]:
        raise ValueError(
            f"alignment is degenerate: sigma_2 {'+' if sign > 0 else '-'} sigma_3 = "
            f"{gap:.3g} <= {ALIGN_GAP:.0e} sigma_1 (sigma = {sig[0]:.3g}, "
            f"{sig[1]:.3g}, {sig[2]:.3g}): the best rotation with det R = +1 is not "
            "unique (points on a line, or sigma_2 = sigma_3 where the best orthogonal "
            "fit is a reflection), and its derivative (8.23) divides by this gap"
        )
    s = float(lam.sum()) / var if with_scale else 1.0
    t = my - s * (R @ mx)
    return R, s, t, U, Vt.T, lam, mx, Xc, Yc, var


def umeyama(X, Y, *, with_scale=True):
    """Eq. (8.22): the similarity (R, s, t), det R = +1, minimising sum_i |Y_i - (s R
    X_i + t)|^2 for corresponding points X, Y (3, n) (Umeyama; Kabsch with
    with_scale=False, s = 1). Raises ValueError when lambda_2 + lambda_3 (sigma_2 -
    sigma_3 when the SVD's rotation would be a reflection) is below ALIGN_GAP sigma_1,
    where R is not unique and its derivative blows up."""
    X, Y = _point_pairs(X, Y)
    R, s, t = _alignment(X, Y, with_scale)[:3]
    return R, s, t


def umeyama_jvp(X, Y, dX, dY, *, with_scale=True):
    """Eq. (8.23): the forward rule of `umeyama`: E = S U^T dM V with dM the
    differential of the cross-covariance, Omega_ij = (E_ij - E_ji) / (lambda_i +
    lambda_j), dR = R [d omega]x with [d omega]x = V Omega V^T, then ds and dt.
    Returns (dR (3, 3), ds, dt (3,))."""
    X, Y = _point_pairs(X, Y)
    dX, dY = _point_pairs(dX, dY)
    if dX.shape != X.shape:
        raise ValueError(f"dX, dY must have the shape of X, {X.shape}, got {dX.shape}")
    R, s, t, U, V, lam, mx, Xc, Yc, var = _alignment(X, Y, with_scale)
    n = X.shape[1]
    dmx, dmy = dX.mean(axis=1), dY.mean(axis=1)
    dXc, dYc = dX - dmx[:, None], dY - dmy[:, None]
    dM = (dYc @ Xc.T + Yc @ dXc.T) / n
    E = np.sign(lam)[:, None] * (U.T @ dM @ V)  # S U^T dM V, S = sign(lam)
    L = lam[:, None] + lam[None, :]
    np.fill_diagonal(L, 1.0)
    Omega = (E - E.T) / L
    np.fill_diagonal(Omega, 0.0)
    W = V @ Omega @ V.T  # [d omega]x
    dR = R @ W
    if with_scale:
        dvar = 2.0 * float(np.sum(Xc * dXc)) / n
        ds = (float(np.sum(R * dM)) - s * dvar) / var
    else:
        ds = 0.0
    dt = dmy - ds * (R @ mx) - s * (dR @ mx) - s * (R @ dmx)
    return dR, ds, dt


def umeyama_vjp(X, Y, G, *, with_scale=True):
    """Eq. (8.24): the backward rule of `umeyama` for a cotangent G = (G_R (3, 3), G_s,
    G_t (3,)). Returns (X_bar, Y_bar), both (3, n)."""
    X, Y = _point_pairs(X, Y)
    if not isinstance(G, (tuple, list)) or len(G) != 3:
        raise ValueError(
            "G must be a triple (G_R (3, 3), G_s, G_t (3,)) like umeyama's"
        )
    GR = require_finite(as_float_array(G[0], "G_R", ndims=2), "G_R")
    Gs = _scalar(G[1], "G_s")
    Gt = require_finite(as_float_array(G[2], "G_t", ndims=1), "G_t")
    if GR.shape != (3, 3) or Gt.shape != (3,):
        raise ValueError(f"G_R must be (3, 3) and G_t (3,), got {GR.shape}, {Gt.shape}")
    R, s, t, U, V, lam, mx, Xc, Yc, var = _alignment(X, Y, with_scale)
    n = X.shape[1]
    RtGt = R.T @ Gt
    # t = my - s R mx: through s, through R (its right perturbation), through mx
    Gs_all = (Gs - (R @ mx) @ Gt) if with_scale else 0.0
    A = R.T @ GR - s * np.outer(RtGt, mx)  # cotangent of [d omega]x in R^T dR
    Wbar = A - A.T  # <A, W> for a skew W is <(A - A^T) / 2, W>; the 1/2 is below
    Obar = 0.5 * V.T @ Wbar @ V
    L = lam[:, None] + lam[None, :]
    np.fill_diagonal(L, 1.0)
    Ebar = (Obar - Obar.T) / L
    np.fill_diagonal(Ebar, 0.0)
    Mbar = U @ (np.sign(lam)[:, None] * Ebar) @ V.T  # E = S U^T dM V
    Xc_bar = np.zeros_like(X)
    if with_scale:
        Mbar = Mbar + (Gs_all / var) * R
        Xc_bar -= (2.0 * s * Gs_all / (var * n)) * Xc
    Yc_bar = Mbar @ Xc / n
    Xc_bar += Mbar.T @ Yc / n
    X_bar = Xc_bar - Xc_bar.mean(axis=1, keepdims=True) - (s / n) * RtGt[:, None]
    Y_bar = Yc_bar - Yc_bar.mean(axis=1, keepdims=True) + Gt[:, None] / n
    return X_bar, Y_bar


# ----- 8.6 Sinkhorn's algorithm as a fixed point -----


def _sinkhorn_problem(C, eps, a, b):
    C = require_finite(as_float_array(C, "C", ndims=2), "C")
    n, m = C.shape
    if n < 1 or m < 2:
        raise ValueError(
            f"C must be (n, m) with n >= 1 and m >= 2, got shape {C.shape}"
        )
    eps = float(eps)
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and positive, got {eps}")
    a = np.full(n, 1.0 / n) if a is None else as_float_array(a, "a", ndims=1)
    b = np.full(m, 1.0 / m) if b is None else as_float_array(b, "b", ndims=1)
    a, b = require_finite(a, "a"), require_finite(b, "b")
    if a.shape != (n,) or b.shape != (m,):
        raise ValueError(
            f"a and b must have shapes ({n},) and ({m},), got {a.shape} and {b.shape}"
        )
    if not (np.all(a > 0) and np.all(b > 0)) or abs(a.sum() - b.sum()) > 1e-12 * (
        a.sum()
    ):
        raise ValueError(
            f"a and b must be positive with equal sums, got sums {a.sum():.6g} and "
            f"{b.sum():.6g}, minima {a.min():.3g} and {b.min():.3g}"
        )
    return C, eps, a, b


def _logsumexp(Z, axis):
    top = Z.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(Z - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def sinkhorn(C, *, eps, a=None, b=None, tol=1e-12, max_iter=10000):
    """Eq. (8.25): the entropic transport plan P (n, m) = exp((f_i + g_j - C_ij) /
    eps) with row sums a and column sums b (uniform when None), by Sinkhorn's
    iteration in the log domain from f = g = 0 (stable for small eps). Raises
    ValueError when the row sums are not within tol of a after max_iter iterations."""
    C, eps, a, b = _sinkhorn_problem(C, eps, a, b)
    f, g = np.zeros(C.shape[0]), np.zeros(C.shape[1])
    la, lb = np.log(a), np.log(b)
    for _ in range(max_iter):
        f = eps * (la - _logsumexp((g[None, :] - C) / eps, axis=1))
        g = eps * (lb - _logsumexp((f[:, None] - C) / eps, axis=0))
        P = np.exp((f[:, None] + g[None, :] - C) / eps)
        err = float(np.max(np.abs(P.sum(axis=1) - a)))
        if err <= tol:
            return P
    raise ValueError(
        f"sinkhorn did not converge in {max_iter} iterations at eps = {eps:.3g}: row "
        f"sums off by {err:.3g} > tol {tol:.0e} (raise max_iter, or eps)"
    )


def _sinkhorn_system(P, C, a, b, eps, tol):
    """The marginal equations F(f, g[:-1]) = (P 1 - a, (P^T 1 - b)[:-1]) with g_m
    fixed (the gauge f + c, g - c leaves P unchanged): A = dF/dz, (n + m - 1)
    square, symmetric, checked for convergence and factorised. P must also have the
    form exp((f_i + g_j - C_ij) / eps): where P > 0 everywhere, eps log P + C is
    checked to be a sum f_i + g_j (its double centring vanishes)."""
    P = require_finite(as_float_array(P, "P", ndims=2), "P")
    if P.shape != C.shape:
        raise ValueError(f"P must have the shape of C, {C.shape}, got {P.shape}")
    _check_converged(
        np.concatenate([P.sum(axis=1) - a, P.sum(axis=0) - b]),
        tol,
        "sinkhorn",
        "max |(P 1 - a, P^T 1 - b)|",
    )
    if np.all(P > 0):
        K = eps * np.log(P) + C
        K = K - K.mean(axis=1, keepdims=True) - K.mean(axis=0, keepdims=True) + K.mean()
        off = float(np.max(np.abs(K))) / (1.0 + np.abs(C).max())
        if not off <= 1e3 * tol:
            raise ValueError(
                "sinkhorn: P is not of the form exp((f_i + g_j - C_ij) / eps) for "
                "this C: eps log P + C, centred by rows and columns, is "
                f"{off:.3g} (max |.| / (1 + max |C|)) > {1e3 * tol:.3g}; the rule "
                "differentiates the plan of this C only"
            )
    n, m = P.shape
    A = np.zeros((n + m - 1, n + m - 1))
    A[:n, :n] = np.diag(P.sum(axis=1))
    A[n:, n:] = np.diag(P.sum(axis=0)[:-1])
    A[:n, n:] = P[:, :-1]
    A[n:, :n] = P[:, :-1].T
    return factor(A / eps, RCOND, "sinkhorn")


def sinkhorn_jvp(C, dC, *, eps, a=None, b=None, P=None, tol=1e-9):
    """Eq. (8.26): the forward rule of `sinkhorn` in the cost: A (df, dg) = (rows and
    columns of P o dC) / eps with dg_m = 0, then dP = P o (df_i + dg_j - dC_ij) / eps.
    Returns dP (n, m). P is the converged plan (solved when None)."""
    C, eps, a, b = _sinkhorn_problem(C, eps, a, b)
    dC = require_finite(as_float_array(dC, "dC", ndims=2), "dC")
    if dC.shape != C.shape:
        raise ValueError(f"dC must have the shape of C, {C.shape}, got {dC.shape}")
    if P is None:
        P = sinkhorn(C, eps=eps, a=a, b=b)
    n = C.shape[0]
    factors = _sinkhorn_system(P, C, a, b, eps, tol)
    PdC = P * dC
    dz = _lu_solve(
        factors, np.concatenate([PdC.sum(axis=1), PdC.sum(axis=0)[:-1]]) / eps
    )
    dg = np.append(dz[n:], 0.0)
    return P * (dz[:n, None] + dg[None, :] - dC) / eps


def sinkhorn_vjp(C, G, *, eps, a=None, b=None, P=None, tol=1e-9):
    """Eq. (8.27): the backward rule of `sinkhorn` for a cotangent G (n, m) on P: Q = G
    o P / eps, A^T lam = (Q 1, (Q^T 1)[:-1]), C_bar = -Q + P o (lam_f,i + lam_g,j) /
    eps with lam_g,m = 0. Returns C_bar (n, m)."""
    C, eps, a, b = _sinkhorn_problem(C, eps, a, b)
    G = require_finite(as_float_array(G, "G", ndims=2), "G")
    if G.shape != C.shape:
        raise ValueError(f"G must have the shape of C, {C.shape}, got {G.shape}")
    if P is None:
        P = sinkhorn(C, eps=eps, a=a, b=b)
    n = C.shape[0]
    factors = _sinkhorn_system(P, C, a, b, eps, tol)
    Q = G * P / eps
    lam = _lu_solve(
        factors, np.concatenate([Q.sum(axis=1), Q.sum(axis=0)[:-1]]), trans=1
    )
    lam_g = np.append(lam[n:], 0.0)
    return -Q + P * (lam[:n, None] + lam_g[None, :]) / eps


# ----- 8.8 Bundle adjustment: a gradient modulo the gauge -----

# Above this part of |G| along the gauge directions, bundle_adjust_vjp refuses G.
GAUGE_TOL = 1e-8


def _bundle_point(problem, x, tol):
    """At a solution x of `bundle_adjust`: the residuals r (2N,), the dense Jacobian
    J (2N, P) in x (P = 6m + 3n), and the exact Hessian H (P, P) of E = 1/2 |r|^2 in
    x (eqs. 8.31, 8.32). The relative gradient max |J^T r| / (|J| (1 + |r|)) must be
    below tol."""
    from .geometry.bundle import (
        BundleProblem,
        ba_jacobian,
        ba_residual,
    )
    from .geometry.lie import _hat_many, right_jacobian, rodrigues

    if not isinstance(problem, BundleProblem):
        raise ValueError(
            "problem must be a BundleProblem (BundleProblem.create or make_scene), "
            f"got {type(problem).__name__}"
        )
    x = require_finite(as_float_array(x, "x", ndims=1), "x")
    poses, X = problem.unpack(x)
    r = ba_residual(problem, x)
    J = ba_jacobian(problem, x).toarray()
    g = J.T @ r
    scale = np.linalg.norm(J) * (1.0 + np.linalg.norm(r))
    _check_converged(
        g / scale,
        tol,
        "bundle adjustment",
        "the relative gradient max |J^T r| / (|J| (1 + |r|))",
    )
    m, n, cam, point, K = problem.m, problem.n, problem.cam, problem.point, problem.K
    R = np.stack([rodrigues(w) for w in poses[:, :3]])
    Rk, Xk = R[cam], X[:, point].T  # (N, 3, 3), (N, 3)
    p = np.einsum("kab,kb->ka", Rk, Xk) + poses[cam, 3:]  # (N, 3)
    a = r.reshape(-1, 2)  # the weight of each residual's Hessian
    e = a @ K[:2, :2]  # phi_k = (e1 p1 + e2 p2) / p3 + const
    mvec = np.concatenate([e, np.zeros((len(e), 1))], axis=1)
    z = p[:, 2]
    mp = np.sum(mvec * p, axis=1)
    e3 = np.array([0.0, 0.0, 1.0])
    Phi = -(mvec[:, :, None] * e3 + e3[:, None] * mvec[:, None, :]) / z[
        :, None, None
    ] ** 2 + (2 * mp / z**3)[:, None, None] * np.outer(e3, e3)  # (N, 3, 3)
    # dp_k / d(delta_w, delta_t, delta_X) = P_k = [-R [X]x, I, R] (N, 3, 9)
    P = np.concatenate(
        [-Rk @ _hat_many(Xk.T), np.broadcast_to(np.eye(3), Rk.shape), Rk], axis=2
    )
    S = np.einsum("kai,kab,kbj->kij", P, Phi, P)
    b = e / z[:, None]  # J_pi^T a_k, the gradient of phi_k in p
    b = np.concatenate(
        [b, -np.sum(b * p[:, :2], axis=1, keepdims=True) / z[:, None]], 1
    )
    c = np.einsum("kab,ka->kb", Rk, b)  # R^T b
    M = 0.5 * (c[:, :, None] * Xk[:, None, :] + Xk[:, :, None] * c[:, None, :])
    M -= np.sum(c * Xk, axis=1)[:, None, None] * np.eye(3)
    S[:, :3, :3] += M  # the curvature of R Exp(delta_w) X
    C = -_hat_many(c.T)  # c^T [dw]x dX = dw^T C dX
    S[:, :3, 6:] += C
    S[:, 6:, :3] += np.transpose(C, (0, 2, 1))
    idx = np.concatenate(
        [6 * cam[:, None] + np.arange(6), 6 * m + 3 * point[:, None] + np.arange(3)],
        axis=1,
    )
    size = 6 * m + 3 * n
    Sd = np.zeros((size, size))
    np.add.at(Sd, (idx[:, :, None], idx[:, None, :]), S)
    # to x: delta_w = J_r(w) dw at a stationary point (the term in g vanishes)
    Tinv = np.eye(size)
    for j in range(m):
        Tinv[6 * j : 6 * j + 3, 6 * j : 6 * j + 3] = right_jacobian(poses[j, :3])
    H = J.T @ J + Tinv.T @ Sd @ Tinv
    return r, J, H


def bundle_adjust_hessian(problem, x, *, hessian="exact", tol=1e-6):
    """The (P, P) Hessian of E = 1/2 |r(x)|^2 (eq. 8.31) at a solution x of
    `bundle_adjust` (P = 6m + 3n, in the layout of x): J^T J plus, when
    hessian='exact', the second-order term (8.32). It is singular: H N = 0 for the 7
    gauge directions N = `gauge_directions(problem, x)`."""
    if hessian not in ("exact", "gauss-newton"):
        raise ValueError(f"hessian must be 'exact' or 'gauss-newton', got {hessian!r}")
    r, J, H = _bundle_point(problem, x, tol)
    return H if hessian == "exact" else J.T @ J


def _gauge_basis(problem, x):
    from .geometry.bundle import gauge_directions

    Q, _ = np.linalg.qr(gauge_directions(problem, x))
    return Q


def bundle_adjust_jvp(problem, x, du, *, tol=1e-6):
    """Eq. (8.34): the forward rule of the gauge-fixed solution x*(u) of
    `bundle_adjust` (the pose parameters outside problem.free held, as the solver
    holds them): H_ff dx_f = (J^T du)_f, dx = 0 on the fixed parameters. du (2, N) is
    the tangent of the image points problem.u. Returns dx (6m + 3n,). Raises
    ValueError when the fixed parameters do not fix the gauge (gauge_is_fixed)."""
    from .geometry.bundle import gauge_is_fixed

    du = require_finite(as_float_array(du, "du", ndims=2), "du")
    if du.shape != problem.u.shape:
        raise ValueError(
            f"du must have the shape of problem.u, {problem.u.shape}, got {du.shape}"
        )
    r, J, H = _bundle_point(problem, x, tol)
    if not gauge_is_fixed(problem, x):
        raise ValueError(
            "bundle_adjust_jvp: the fixed pose parameters (fixed = "
            f"{np.flatnonzero(~problem.free).tolist()}) do not fix the gauge at x, so "
            "the solution is not a function of u; fix it (BundleProblem.create(fixed="
            "...))"
        )
    f = np.flatnonzero(problem.free_mask())
    # dg = H dx - J^T du = 0 on the free rows, dx = 0 on the fixed ones
    rhs = J.T @ du.ravel(order="F")
    dx = np.zeros(H.shape[0])
    dx[f] = _lu_solve(factor(H[np.ix_(f, f)], RCOND, "bundle_adjust_jvp"), rhs[f])
    return dx


def bundle_adjust_vjp(problem, x, G, *, tol=1e-6, gauge_tol=GAUGE_TOL):
    """Eq. (8.33): the backward rule of the solution of `bundle_adjust` for a
    cotangent G (6m + 3n,) on x that does not see the gauge: H lam = G with lam
    orthogonal to the gauge directions N, then u_bar_k = J_k lam (2, N). The result
    does not depend on how the gauge is fixed.

    G must be orthogonal to the 7 gauge directions N = gauge_directions(problem, x)
    (the gradient of a loss invariant to rotating, shifting and scaling the whole
    scene): |Q^T G| <= gauge_tol |G| with Q an orthonormal basis of N, else
    ValueError, since the gradient of a loss that sees the gauge depends on the
    choice of gauge (bundle_adjust_jvp differentiates one choice)."""
    r, J, H = _bundle_point(problem, x, tol)
    G = require_finite(as_float_array(G, "G", ndims=1), "G")
    if G.shape != (H.shape[0],):
        raise ValueError(
            f"G must have the shape of x, ({H.shape[0]},), got shape {G.shape}"
        )
    gauge_tol = float(gauge_tol)
    if not (np.isfinite(gauge_tol) and gauge_tol >= 0):
        raise ValueError(f"gauge_tol must be finite and >= 0, got {gauge_tol}")
    top = float(np.max(np.abs(G)))
    if top == 0:
        return np.zeros_like(problem.u)
    G = G / top  # so that |G| neither underflows nor overflows; scaled back below
    Q = _gauge_basis(problem, x)
    size = float(np.linalg.norm(G))
    seen = float(np.linalg.norm(Q.T @ G))
    if not seen <= gauge_tol * size:
        raise ValueError(
            f"bundle_adjust_vjp: G sees the gauge: its part along the 7 gauge "
            f"directions (eq. 6.21) is {seen / size:.3g} of |G| > gauge_tol = "
            f"{gauge_tol:.0e}. A loss that changes when the whole scene is rotated, "
            "shifted or scaled has no gradient in u until a gauge is chosen, and then "
            "one per choice; differentiate a gauge-invariant loss (relative rotations, "
            "ratios of distances), or one gauge-fixed solution with bundle_adjust_jvp"
        )
    # H is singular along N only: (H + alpha Q Q^T) lam = G has the solution of
    # H lam = G orthogonal to N, since G and H lam are both orthogonal to N
    alpha = float(np.trace(H)) / H.shape[0]
    lam = _lu_solve(factor(H + alpha * Q @ Q.T, RCOND, "bundle_adjust_vjp"), G)
    with np.errstate(over="ignore"):  # a G near the largest float: u_bar may be inf
        return top * (J @ lam).reshape(-1, 2).T
