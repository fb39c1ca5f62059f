"""Chapter 6, poses and perspective-n-point: Gauss-Newton and Levenberg-Marquardt.

The conventions are stated once, in derivlib/geometry/__init__.py."""

import math
from dataclasses import dataclass, field

import numpy as np

from .._validate import as_float_array, require_finite
from ..losses import ConvergenceError
from .camera import (
    BehindCameraError,
    _in_front,
    _intrinsics,
    _points,
    _project_jacobian,
    project,
)
from .lie import _hat_many, right_jacobian, rodrigues, so3_log


def _pose(xi, name="xi"):
    xi = as_float_array(xi, name, ndims=1)
    if xi.shape != (6,):
        raise ValueError(
            f"{name} must be a pose (w, t) of shape (6,), rotation first, got shape "
            f"{xi.shape}"
        )
    return require_finite(xi, name)


def transform(xi, X):
    """p = R(w) X + t for the pose xi = (w, t): world points X (3, n) to the camera
    frame."""
    xi = _pose(xi)
    X, single = _points(X, "X")
    p = rodrigues(xi[:3]) @ X + xi[3:, None]
    return p[:, 0] if single else p


def reprojection_residual(xi, X, K, u):
    """r(xi) = vec(project(R(w) X + t) - u) (eq. 6.14): X (3, n), u (2, n) -> (2n,).

    vec is column-major, so the residuals of point i are entries 2i and 2i + 1.
    """
    xi = _pose(xi)
    X, _ = _points(X, "X")
    K = _intrinsics(K)
    u = _observations(u, X.shape[1])
    p = rodrigues(xi[:3]) @ X + xi[3:, None]
    _in_front(p, "R(w) X + t")
    return (project(p, K) - u).ravel(order="F")


def reprojection_jacobian(xi, X, K):
    """The (2n, 6) Jacobian of the residual (eq. 6.14) with respect to xi = (w, t):
    rows 2i, 2i + 1 are J_pi(p_i) [-R [X_i]x J_r(w) | I] (eq. 6.15)."""
    xi = _pose(xi)
    X, _ = _points(X, "X")
    K = _intrinsics(K)
    w, t = xi[:3], xi[3:]
    R = rodrigues(w)
    p = R @ X + t[:, None]
    _in_front(p, "R(w) X + t")
    Jpi = _project_jacobian(p, K)  # (n, 2, 3)
    Jw = -np.einsum("ab,nbc,cd->nad", R, _hat_many(X), right_jacobian(w))  # (n, 3, 3)
    J = np.concatenate([Jpi @ Jw, Jpi], axis=2)  # (n, 2, 6)
    return J.reshape(-1, 6)


def _observations(u, n, name="u"):
    u = as_float_array(u, name, ndims=2)
    if u.shape != (2, n):
        raise ValueError(
            f"{name} must have shape (2, {n}) (one image point per column), got shape "
            f"{u.shape}"
        )
    return require_finite(u, name)


@dataclass
class LeastSquaresHistory:
    """What a solver did: the cost E = ||r||^2 at the start and after each iteration,
    the damping lam of each iteration (0 for Gauss-Newton), and the evaluation
    counts."""

    cost: list = field(default_factory=list)
    damping: list = field(default_factory=list)
    iterates: list = field(default_factory=list)
    n_iter: int = 0
    n_residual: int = 0
    n_jacobian: int = 0
    converged: bool = False


def _lm_update(lam, nu, rho):
    """Nielsen's damping update after a step with gain ratio rho: (lam, nu)."""
    if rho > 0:
        return lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 2.0
    return lam * nu, 2.0 * nu


def _finished(E, E_new, delta, x, tol, abs_gain=False):
    """The stopping rule: the cost changed by at most tol * E, or the step is below
    tol * |x|. (An accepted Levenberg-Marquardt step always lowers E; a Gauss-Newton
    step may not.)"""
    gain = abs(E - E_new) if abs_gain else E - E_new
    return gain <= tol * E or np.linalg.norm(delta) <= tol * (np.linalg.norm(x) + tol)


# Levenberg-Marquardt gives up when the damping passes this without any step lowering E.
MAX_DAMPING = 1e16


def _stationary(E, predicted, delta, x, tol, flat=False):
    """At the first trial of an iteration, a rejected step that the model says cannot
    gain more than tol * E, or that is shorter than tol * |x|, or taken where the
    gradient is flat to tol (`_flat`, when the caller computed it): x is a minimum to
    the tolerance (the cost only failed to fall through rounding)."""
    return (
        flat
        or predicted <= tol * E
        or np.linalg.norm(delta) <= tol * (np.linalg.norm(x) + tol)
    )


def _flat(g, H, E, tol):
    """Every gradient component small against its own column of J: |(J^T r)_a| <=
    tol |J_a| (1 + |r|) for g = J^T r, H = J^T J (|J_a|^2 = H_aa) and E = |r|^2, the
    component of r along each column at most tol (1 + |r|). Column by column, so that
    a parameter whose column is small (a badly scaled one) is not declared flat by the
    size of the others. Unlike the tests relative to E and to |x|, it holds at a
    minimum of zero residual, where E is rounding noise that the model predicts it can
    remove, and at x = 0, where no step is shorter than tol * |x|, as long as that
    noise along each column stays below tol (rounding of pixel coordinates in the
    thousands can pass tol = 1e-12, and then LM still ends stuck there). Its 1 + |r|
    makes it absolute where |r| < 1: residuals that are all below tol count as flat."""
    bound = tol * np.sqrt(np.maximum(np.diag(H), 0.0)) * (1.0 + math.sqrt(E))
    return bool(np.all(np.abs(g) <= bound))


def _stuck(E, lam, what):
    return ConvergenceError(
        f"{what} is stuck: no step lowered the cost E = {E:.6g}, even with the damping "
        f"raised to {lam:.3g} (a Jacobian that is not the residual's, or a residual "
        f"that has no finite value near x)"
    )


def _lm_steps(
    residual, trial, x, E, lam, nu, tol, hist, what, retract=None, cost=None, flat=False
):
    """One Levenberg-Marquardt iteration at x, of cost E: try the step of trial(lam),
    which returns (delta, E - ||r + J delta||^2 predicted by the linear model), and
    raise the damping until a step lowers E (gain ratio rho > 0). A step that puts a
    point behind the camera counts as raising E. Counts each residual evaluation in
    hist. Returns (delta, r_new, E_new, lam, nu, stationary): stationary when the
    first step tried is rejected but the model says x is already a minimum to tol
    (_stationary, given `flat`, whether the gradient at x is flat to tol), and then
    delta must not be taken. Raises ConvergenceError (stuck) when lam passes
    MAX_DAMPING. The trial point is retract(x, delta), x + delta by default; E of a
    residual is cost(r), r^T r by default (a robust cost's E_rho)."""
    first = True
    while True:
        delta, predicted = trial(lam)
        try:
            r_new = residual(x + delta if retract is None else retract(x, delta))
            E_new = float(r_new @ r_new) if cost is None else cost(r_new)
        except BehindCameraError:
            E_new = np.inf
        hist.n_residual += 1
        rho = (E - E_new) / predicted if predicted > 0 else -1.0
        if rho > 0:
            lam, nu = _lm_update(lam, nu, rho)
            return delta, r_new, E_new, lam, nu, False
        if (
            first
            and np.isfinite(E_new)
            and _stationary(E, predicted, delta, x, tol, flat)
        ):
            return delta, r_new, E_new, lam, nu, True
        first = False
        lam, nu = _lm_update(lam, nu, rho)
        if lam > MAX_DAMPING:
            raise _stuck(E, lam, what)


def _solver_options(tol, max_iter, lam0):
    """Refuse options a solver cannot run with: tol a finite number >= 0, max_iter an
    integer >= 1, lam0 a finite number >= 0."""
    if not (isinstance(tol, (int, float, np.number)) and np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if not (isinstance(max_iter, (int, np.integer)) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not (
        isinstance(lam0, (int, float, np.number)) and np.isfinite(lam0) and lam0 >= 0
    ):
        raise ValueError(f"lam0 must be a finite number >= 0, got {lam0!r}")


def solve_least_squares(
    residual,
    jacobian,
    x0,
    method="lm",
    tol=1e-12,
    max_iter=100,
    lam0=1e-3,
    *,
    retract=None,
):
    """Minimise E(x) = ||r(x)||^2 by Gauss-Newton or Levenberg-Marquardt (eqs. 6.16,
    6.17).

    Gauss-Newton solves J^T J delta = -J^T r and always steps; Levenberg-Marquardt
    solves (J^T J + lam diag(J^T J)) delta = -J^T r and steps only if E falls,
    raising lam otherwise. Both stop when an accepted step lowers E by at most tol *
    E or is shorter than tol * |x|; LM also stops, at x, when the first step it tries
    in an iteration is rejected although the model predicts a gain of at most tol * E
    (or the step is that short, or the gradient at x is flat: |(J^T r)_a| <= tol |J_a|
    (1 + |r|) for every column J_a of J). Returns (x, LeastSquaresHistory) with
    converged = True.

    A step that puts a point behind the camera (BehindCameraError from the residual)
    is rejected like a step that raises E; any other exception of the residual
    propagates. Raises ConvergenceError after max_iter iterations, when LM's damping
    passes MAX_DAMPING with no step accepted (stuck), and when a Gauss-Newton step
    puts a point behind the camera.

    retract(x, delta) is the update: x + delta by default; on a manifold, the point
    reached from x along the tangent delta (see `pose_retract`), and then jacobian(x)
    must be the Jacobian with respect to that delta at delta = 0."""
    if method not in ("gn", "lm"):
        raise ValueError(f"method must be 'gn' or 'lm', got {method!r}")
    _solver_options(tol, max_iter, lam0)
    x = require_finite(as_float_array(x0, "x0", ndims=1).copy(), "x0")
    hist = LeastSquaresHistory(n_residual=1)

    def move(x, delta):
        return x + delta if retract is None else retract(x, delta)

    r = residual(x)
    E = float(r @ r)
    lam, nu = (lam0 if method == "lm" else 0.0), 2.0
    hist.cost.append(E)
    hist.iterates.append(x.copy())
    for _ in range(max_iter):
        J = jacobian(x)
        hist.n_jacobian += 1
        hist.damping.append(lam)
        g, H = J.T @ r, J.T @ J

        def step(lam):
            return np.linalg.solve(H + lam * np.diag(np.diag(H)), -g)

        def trial(lam):
            delta = step(lam)
            return delta, -float(delta @ (2 * g + H @ delta))  # E - ||r + J delta||^2

        if method == "gn":
            delta, stationary = step(lam), False
            try:
                r_new = residual(move(x, delta))
                E_new = float(r_new @ r_new)
            except BehindCameraError:
                raise ConvergenceError(
                    "a Gauss-Newton step put a point behind the camera; try method='lm'"
                ) from None
            hist.n_residual += 1
        else:
            delta, r_new, E_new, lam, nu, stationary = _lm_steps(
                residual,
                trial,
                x,
                E,
                lam,
                nu,
                tol,
                hist,
                "Levenberg-Marquardt",
                retract,
                flat=_flat(g, H, E, tol),
            )
        done = stationary or _finished(E, E_new, delta, x, tol, abs_gain=method == "gn")
        if not stationary and (E_new <= E or method == "gn"):
            x, r, E = move(x, delta), r_new, E_new
        hist.n_iter += 1
        hist.cost.append(E)
        hist.iterates.append(x.copy())
        if done:
            hist.converged = True
            return x, hist
    raise ConvergenceError(
        f"{method} did not converge in {max_iter} iterations (cost {E:.6g})"
    )


def pose_retract(xi, delta):
    """The update of a pose on the manifold (eq. 6.36): R(w') = R(w) Exp(delta_w), w' =
    Log(R(w) Exp(delta_w)) (so |w'| <= pi), and t' = t + delta_t. xi, delta (6,) ->
    (6,)."""
    xi, delta = _pose(xi), _pose(delta, "delta")
    w = so3_log(rodrigues(xi[:3]) @ rodrigues(delta[:3]))
    return np.concatenate([w, xi[3:] + delta[3:]])


def reprojection_jacobian_right(xi, X, K):
    """The (2n, 6) Jacobian of the residual (eq. 6.14) with respect to the update
    delta = (delta_w, delta_t) of `pose_retract`, at delta = 0: rows 2i, 2i + 1 are
    J_pi(p_i) [-R [X_i]x | I] (eq. 6.36), with no J_r: exact at every rotation."""
    xi = _pose(xi)
    X, _ = _points(X, "X")
    K = _intrinsics(K)
    R = rodrigues(xi[:3])
    p = R @ X + xi[3:, None]
    _in_front(p, "R(w) X + t")
    Jpi = _project_jacobian(p, K)  # (n, 2, 3)
    Jw = -np.einsum("ab,nbc->nac", R, _hat_many(X))  # (n, 3, 3)
    return np.concatenate([Jpi @ Jw, Jpi], axis=2).reshape(-1, 6)


# Relative size below which a singular value of the centred points counts as zero.
DEGENERATE = 1e-9


def _pnp_problem(X, K, u):
    """Validate a PnP problem and refuse a degenerate one before solving: fewer than 3
    points (2n residuals < 6 unknowns), points on one line (a rotation about it leaves
    every residual unchanged), or all images at one pixel (the points on one ray)."""
    X, _ = _points(X, "X")
    K = _intrinsics(K)
    n = X.shape[1]
    u = _observations(u, n)
    if n < 3:
        raise ValueError(
            f"PnP needs at least 3 points (2n = {2 * n} residuals for 6 unknowns), "
            f"got X with {n} point(s)"
        )
    from .. import _pnp_kernels

    # the largest distance of an image point from their mean, and the singular values
    # of the centred points (LAPACK's divide-and-conquer SVD, as np.linalg.svd)
    spread, umax, s0, s1 = _pnp_kernels.degeneracy(X, u)
    if spread <= DEGENERATE * (1.0 + umax):
        raise ValueError(
            f"PnP is degenerate: all {n} image points u coincide (the points lie on "
            f"one ray through the camera centre), so the pose is not determined"
        )
    if s1 <= DEGENERATE * s0:
        raise ValueError(
            f"PnP is degenerate: the {n} points X lie on one line (singular values of "
            f"the centred points {s0:.3g}, {s1:.3g}), so a rotation about it is "
            f"not determined"
        )
    return X, K, u


def solve_pnp(X, K, u, *, xi0=None, method="lm", tol=1e-12, max_iter=100):
    """The pose xi = (w, t) minimising the squared reprojection error (eq. 6.14) of the
    known world points X (3, n) observed at u (2, n) by the camera K (the arguments of
    `reprojection_residual`), by Gauss-Newton ('gn') or Levenberg-Marquardt ('lm'),
    updating the rotation on the manifold, R Exp(delta) (eq. 6.36). The start is xi0
    (6,), or the linear DLT pose (`dlt_pose`, eq. 6.39; at least 6 points, not
    coplanar) when xi0 is None. Returns (xi, LeastSquaresHistory); the rotation
    vector returned has |w| <= pi.

    Raises ValueError before solving for a degenerate problem: fewer than 3 points,
    points on one line, or all image points equal (the points on one ray)."""
    X, K, u = _pnp_problem(X, K, u)
    xi0 = _pnp_start(X, K, u, xi0, "solve_pnp")
    return solve_least_squares(
        lambda xi: reprojection_residual(xi, X, K, u),
        lambda xi: reprojection_jacobian_right(xi, X, K),
        xi0,
        method,
        tol,
        max_iter,
        retract=pose_retract,
    )


def _pnp_start(X, K, u, xi0, what):
    """xi0 checked as a pose, or the DLT pose (eq. 6.39) when xi0 is None; a ValueError
    naming `what` when the DLT cannot give a start."""
    if xi0 is None:
        from .linear import dlt_pose

        try:
            xi0 = dlt_pose(X, K, u)
        except ValueError as exc:
            raise ValueError(
                f"{what} has no start: xi0 is None and the DLT start fails ({exc}); "
                f"pass xi0"
            ) from None
    return _pose(xi0, "xi0")
