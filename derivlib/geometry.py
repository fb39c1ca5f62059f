"""Chapter 6: camera geometry. Projection, rotations, and least squares over poses.

Conventions, fixed once for the chapter:

- Points are columns: a set of n points is an array of shape (3, n).
- A rotation is a 3-vector w (axis times angle); R(w) = exp([w]x) (eq. 6.5).
- A camera pose is the 6-vector xi = (w, t), rotation first, then translation. It
  maps a world point X to the camera frame by p = R(w) X + t.
- Perturbations are on the right: R(w + dw) = R(w) exp([J_r(w) dw]x) to first order
  (eq. 6.9), so d(R p) = -R [p]x J_r(w) dw (eq. 6.11). The solvers update w
  additively, so they need exactly this derivative, J_r included.
- Residuals are in pixels; the cost is E = ||r||^2, the sum of squared reprojection
  errors (eq. 6.14). scipy.optimize.least_squares reports E / 2.
"""

from dataclasses import dataclass, field

import numpy as np

from ._validate import as_float_array, require_finite
from .losses import ConvergenceError

# ----- Pinhole projection -----


class BehindCameraError(ValueError):
    """A point has no image: its depth p_z is <= 0 (behind the camera or on its
    plane), or so close to 0 that its image overflows. The solvers catch this error,
    and only this one, to reject a step; any other error of a residual propagates."""


def _points(P, name="P"):
    """P as a (3, n) float array (a single point (3,) becomes (3, 1)); flag for 1-D."""
    P = as_float_array(P, name, ndims=(1, 2))
    single = P.ndim == 1
    if single:
        P = P[:, None]
    if P.shape[0] != 3:
        raise ValueError(
            f"{name} must have shape (3,) or (3, n) (points are columns), got shape "
            f"{P.shape}"
        )
    require_finite(P, name)
    return P, single


def _intrinsics(K):
    K = as_float_array(K, "K", ndims=2)
    if K.shape != (3, 3):
        raise ValueError(f"K must be a 3 x 3 camera matrix, got shape {K.shape}")
    require_finite(K, "K")
    if not (K[2, 0] == 0 and K[2, 1] == 0 and K[2, 2] == 1 and K[1, 0] == 0):
        raise ValueError(
            f"K must be upper triangular with K[2, 2] = 1, got last row "
            f"{K[2].tolist()} and K[1, 0] = {K[1, 0]}"
        )
    return K


def _in_front(P, name):
    """Raise unless every depth p_z is positive (a point behind the camera has no
    image)."""
    bad = np.flatnonzero(~(P[2] > 0))
    if bad.size:
        i = bad[0]
        raise BehindCameraError(
            f"{name} has {bad.size} point(s) with depth p_z <= 0 (behind the camera or "
            f"on its plane), first at column {i} with p_z = {P[2, i]:.6g}; their "
            f"projection does not exist (select points with in_front({name}))"
        )


def _finite_image(values, P, name):
    """Raise unless every image (or Jacobian) is finite: a depth p_z > 0 so small
    that p_x / p_z overflows (p_z = 1e-320, say) leaves the image undefined in
    floating point."""
    per_point = (
        values if values.ndim == 2 else values.reshape(P.shape[1], -1).T
    )  # (., n)
    bad = np.flatnonzero(~np.isfinite(per_point).all(axis=0))
    if bad.size:
        i = bad[0]
        raise BehindCameraError(
            f"{name} has {bad.size} point(s) whose image overflows (depth p_z too "
            f"close to 0 for its p_x, p_y), first at column {i} with p_z = "
            f"{P[2, i]:.6g}"
        )
    return values


def in_front(P):
    """The mask of columns of P (3, n) with positive depth p_z > 0, shape (n,)."""
    P, _ = _points(P)
    return P[2] > 0


def project(P, K):
    """The pinhole projection (eq. 6.1): u = K_2 [p_x / p_z, p_y / p_z, 1]^T, where
    K_2 is the top two rows of the camera matrix K. P (3, n) -> (2, n); P (3,) ->
    (2,).

    Raises BehindCameraError (a ValueError) if a point has p_z <= 0, or p_z > 0 so
    small that its image overflows (as at p_z = 1e-320); the image returned is always
    finite."""
    P, single = _points(P)
    K = _intrinsics(K)
    _in_front(P, "P")
    with np.errstate(over="ignore", invalid="ignore"):
        u = _finite_image(K[:2, :2] @ (P[:2] / P[2]) + K[:2, 2:3], P, "P")
    return u[:, 0] if single else u


def project_jacobian(P, K):
    """The 2 x 3 Jacobian of the projection (eq. 6.3) at each point:
    (1 / p_z) K_22 [[1, 0, -p_x / p_z], [0, 1, -p_y / p_z]], where K_22 = K[:2, :2].

    P (3, n) -> (n, 2, 3), the n diagonal blocks of the (2n, 3n) Jacobian of vec u with
    respect to vec P; P (3,) -> (2, 3). Raises BehindCameraError as `project` does (the
    Jacobian, with its 1 / p_z^2, overflows sooner than the image: it is always finite).
    """
    P, single = _points(P)
    K = _intrinsics(K)
    _in_front(P, "P")
    with np.errstate(over="ignore", invalid="ignore"):
        J = _finite_image(_project_jacobian(P, K), P, "P")
    return J[0] if single else J


def _project_jacobian(P, K):
    n = P.shape[1]
    inv_z = 1.0 / P[2]
    D = np.zeros((n, 2, 3))
    D[:, 0, 0] = inv_z
    D[:, 1, 1] = inv_z
    D[:, 0, 2] = -P[0] * inv_z**2
    D[:, 1, 2] = -P[1] * inv_z**2
    return K[:2, :2] @ D


# ----- Rotations -----


def _rotation_vector(w, name="w"):
    w = as_float_array(w, name, ndims=1)
    if w.shape != (3,):
        raise ValueError(
            f"{name} must be a rotation vector of shape (3,), got shape {w.shape}"
        )
    return require_finite(w, name)


def hat(w):
    """[w]x, the 3 x 3 skew-symmetric matrix with [w]x v = w x v (eq. 6.4)."""
    w = _rotation_vector(w)
    return _hat(w)


def _hat(w):
    return np.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])


def _hat_many(V):
    """[v]x for each column of V (3, n) -> (n, 3, 3)."""
    n = V.shape[1]
    H = np.zeros((n, 3, 3))
    H[:, 0, 1], H[:, 0, 2] = -V[2], V[1]
    H[:, 1, 0], H[:, 1, 2] = V[2], -V[0]
    H[:, 2, 0], H[:, 2, 1] = -V[1], V[0]
    return H


# Below this angle the coefficients use their Taylor series in t^2; the terms kept make
# the truncation error smaller than 1e-19, and the closed forms are accurate above it.
SMALL_ANGLE = 1e-2


def rotation_coefficients(t):
    """(sin t / t, (1 - cos t) / t^2, (t - sin t) / t^3) for an angle t >= 0,
    accurately. Raises ValueError unless t is finite and >= 0.

    The closed forms cancel catastrophically as t -> 0 (and are 0 / 0 at t = 0):
    below SMALL_ANGLE we use their Taylor series, and above it (1 - cos t) is
    computed as 2 sin^2(t / 2), which does not cancel. (t - sin t) / t^3 still loses
    about log10(1 / t^2) digits there, but it multiplies [w]x^2, of size t^2, so J_r
    does not."""
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise ValueError(f"t must be a real angle t >= 0, got {t!r}") from None
    if not (np.isfinite(t) and t >= 0):
        raise ValueError(
            f"t must be a finite angle t >= 0 (the norm of a rotation vector), got "
            f"{t!r}"
        )
    if t < SMALL_ANGLE:
        t2 = t * t
        a = 1.0 - t2 / 6.0 * (1.0 - t2 / 20.0 * (1.0 - t2 / 42.0))
        b = 0.5 - t2 / 24.0 * (1.0 - t2 / 30.0 * (1.0 - t2 / 56.0))
        c = 1.0 / 6.0 - t2 / 120.0 * (1.0 - t2 / 42.0 * (1.0 - t2 / 72.0))
        return a, b, c
    s = np.sin(t)
    return float(s / t), float(2.0 * (np.sin(0.5 * t) / t) ** 2), float((t - s) / t**3)


def rodrigues(w):
    """R(w) = exp([w]x) = I + (sin t / t) [w]x + ((1 - cos t) / t^2) [w]x^2, t = |w|
    (eq. 6.5).

    w (3,) -> R (3, 3), a rotation matrix; exact at w = 0 and accurate near it."""
    w = _rotation_vector(w)
    a, b, _ = rotation_coefficients(np.linalg.norm(w))
    W = _hat(w)
    return np.eye(3) + a * W + b * (W @ W)


def right_jacobian(w):
    """J_r(w) = I - ((1 - cos t) / t^2) [w]x + ((t - sin t) / t^3) [w]x^2 (eq. 6.10),
    with R(w)^T dR = [J_r(w) dw]x (eq. 6.9). w (3,) -> (3, 3)."""
    w = _rotation_vector(w)
    _, b, c = rotation_coefficients(np.linalg.norm(w))
    W = _hat(w)
    return np.eye(3) - b * W + c * (W @ W)


def left_jacobian(w):
    """J_l(w) = J_r(-w) = R(w) J_r(w) (eq. 6.12), with dR R(w)^T = [J_l(w) dw]x. (3,)
    -> (3, 3)."""
    return right_jacobian(-_rotation_vector(w))


def rotate_jacobian(w, P):
    """The Jacobian of R(w) p with respect to w, -R(w) [p]x J_r(w) (eq. 6.11), at each
    column p of P. P (3, n) -> (n, 3, 3); P (3,) -> (3, 3)."""
    w = _rotation_vector(w)
    P, single = _points(P)
    J = -np.einsum("ab,nbc,cd->nad", rodrigues(w), _hat_many(P), right_jacobian(w))
    return J[0] if single else J


# ----- Poses and perspective-n-point -----


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


def _stationary(E, predicted, delta, x, tol):
    """At the first trial of an iteration, a rejected step that the model says cannot
    gain more than tol * E, or that is shorter than tol * |x|: x is a minimum to the
    tolerance (the cost only failed to fall through rounding)."""
    return predicted <= tol * E or np.linalg.norm(delta) <= tol * (
        np.linalg.norm(x) + tol
    )


def _stuck(E, lam, what):
    return ConvergenceError(
        f"{what} is stuck: no step lowered the cost E = {E:.6g}, even with the damping "
        f"raised to {lam:.3g} (a Jacobian that is not the residual's, or a residual "
        f"that has no finite value near x)"
    )


def _lm_steps(residual, trial, x, E, lam, nu, tol, hist, what):
    """One Levenberg-Marquardt iteration at x, of cost E: try the step of trial(lam),
    which returns (delta, E - ||r + J delta||^2 predicted by the linear model), and
    raise the damping until a step lowers E (gain ratio rho > 0). A step that puts a
    point behind the camera counts as raising E. Counts each residual evaluation in
    hist. Returns (delta, r_new, E_new, lam, nu, stationary): stationary when the
    first step tried is rejected but the model says x is already a minimum to tol
    (_stationary), and then delta must not be taken. Raises ConvergenceError (stuck)
    when lam passes MAX_DAMPING."""
    first = True
    while True:
        delta, predicted = trial(lam)
        try:
            r_new = residual(x + delta)
            E_new = float(r_new @ r_new)
        except BehindCameraError:
            E_new = np.inf
        hist.n_residual += 1
        rho = (E - E_new) / predicted if predicted > 0 else -1.0
        if rho > 0:
            lam, nu = _lm_update(lam, nu, rho)
            return delta, r_new, E_new, lam, nu, False
        if first and np.isfinite(E_new) and _stationary(E, predicted, delta, x, tol):
            return delta, r_new, E_new, lam, nu, True
        first = False
        lam, nu = _lm_update(lam, nu, rho)
        if lam > MAX_DAMPING:
            raise _stuck(E, lam, what)


def solve_least_squares(
    residual, jacobian, x0, method="lm", tol=1e-12, max_iter=100, lam0=1e-3
):
    """Minimise E(x) = ||r(x)||^2 by Gauss-Newton or Levenberg-Marquardt (eqs. 6.16,
    6.17).

    Gauss-Newton solves J^T J delta = -J^T r and always steps; Levenberg-Marquardt
    solves (J^T J + lam diag(J^T J)) delta = -J^T r and steps only if E falls,
    raising lam otherwise. Both stop when an accepted step lowers E by at most tol *
    E or is shorter than tol * |x|; LM also stops, at x, when the first step it tries
    in an iteration is rejected although the model predicts a gain of at most tol * E
    (or the step is that short). Returns (x, LeastSquaresHistory) with converged =
    True.

    A step that puts a point behind the camera (BehindCameraError from the residual)
    is rejected like a step that raises E; any other exception of the residual
    propagates. Raises ConvergenceError after max_iter iterations, when LM's damping
    passes MAX_DAMPING with no step accepted (stuck), and when a Gauss-Newton step
    puts a point behind the camera."""
    if method not in ("gn", "lm"):
        raise ValueError(f"method must be 'gn' or 'lm', got {method!r}")
    x = np.array(x0, dtype=np.float64)
    hist = LeastSquaresHistory(n_residual=1)
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
                r_new = residual(x + delta)
                E_new = float(r_new @ r_new)
            except BehindCameraError:
                raise ConvergenceError(
                    "a Gauss-Newton step put a point behind the camera; try method='lm'"
                ) from None
            hist.n_residual += 1
        else:
            delta, r_new, E_new, lam, nu, stationary = _lm_steps(
                residual, trial, x, E, lam, nu, tol, hist, "Levenberg-Marquardt"
            )
        done = stationary or _finished(E, E_new, delta, x, tol, abs_gain=method == "gn")
        if not stationary and (E_new <= E or method == "gn"):
            x, r, E = x + delta, r_new, E_new
        hist.n_iter += 1
        hist.cost.append(E)
        hist.iterates.append(x.copy())
        if done:
            hist.converged = True
            return x, hist
    raise ConvergenceError(
        f"{method} did not converge in {max_iter} iterations (cost {E:.6g})"
    )


def solve_pnp(X, u, K, xi0, method="lm", tol=1e-12, max_iter=100):
    """The pose xi = (w, t) minimising the squared reprojection error of the known
    world points X (3, n) observed at u (2, n) (perspective-n-point), from the start
    xi0 (6,), by Gauss-Newton ('gn') or Levenberg-Marquardt ('lm'). Returns (xi,
    LeastSquaresHistory)."""
    X, _ = _points(X, "X")
    K = _intrinsics(K)
    u = _observations(u, X.shape[1])
    xi0 = _pose(xi0, "xi0")
    return solve_least_squares(
        lambda xi: reprojection_residual(xi, X, K, u),
        lambda xi: reprojection_jacobian(xi, X, K),
        xi0,
        method,
        tol,
        max_iter,
    )


# ----- Bundle adjustment -----


@dataclass
class BundleProblem:
    """Observations of n points by m cameras with one camera matrix K.

    cam (N,) and point (N,) index the camera and the point of each of N observations,
    u (2, N) their image points. The parameters are x = [xi_1, ..., xi_m, vec X], the m
    poses (6 each, (w, t)) then the points (3 each, column-major vec of X (3, n)).
    `free` (6m,) marks the pose parameters that move; the points all move.
    """

    K: np.ndarray
    cam: np.ndarray
    point: np.ndarray
    u: np.ndarray
    m: int
    n: int
    free: np.ndarray

    @classmethod
    def create(cls, K, cam, point, u, m, n, fixed=None):
        """Validate and build. `fixed` is the list of pose parameter indices (into
        the 6m, each in 0..6m - 1) held at their initial value; the default fixes the
        gauge as in the chapter: the first camera's six parameters and the first
        translation coordinate of the second camera (eq. 6.21). Holding camera 0
        fixes the rotation and the shift of the scene but not a scaling about camera
        0's centre c_0, which changes t_1 by (sigma - 1) R_1 (c_0 - c_1): t_x of
        camera 1 pins the scale only if R_1 (c_0 - c_1) has a non-zero x component.
        Under forward motion (camera 1 moving along its own optical axis) it does
        not, and J stays rank-deficient; `bundle_adjust` checks this at its start
        (gauge_is_fixed)."""
        K = _intrinsics(K)
        cam = np.asarray(cam)
        point = np.asarray(point)
        if cam.ndim != 1 or point.shape != cam.shape:
            raise ValueError(
                f"cam and point must be 1-D of equal length, got shapes {cam.shape} "
                f"and {point.shape}"
            )
        if not (
            np.issubdtype(cam.dtype, np.integer)
            and np.issubdtype(point.dtype, np.integer)
        ):
            raise ValueError(
                f"cam and point must hold integers, got {cam.dtype} and {point.dtype}"
            )
        if cam.size == 0 or cam.min() < 0 or cam.max() >= m:
            raise ValueError(
                f"cam must index cameras 0..{m - 1}, got values in [{cam.min()}, "
                f"{cam.max()}]"
            )
        if point.min() < 0 or point.max() >= n:
            raise ValueError(
                f"point must index points 0..{n - 1}, got values in [{point.min()}, "
                f"{point.max()}]"
            )
        if np.unique(cam * n + point).size != cam.size:
            raise ValueError("each (camera, point) pair may be observed at most once")
        u = _observations(u, cam.size)
        if fixed is None:
            fixed = list(range(6)) + ([9] if m > 1 else [])
        fixed_arr = np.asarray(fixed)
        if fixed_arr.size == 0:
            fixed_arr = fixed_arr.astype(np.intp)
        if fixed_arr.ndim != 1 or not np.issubdtype(fixed_arr.dtype, np.integer):
            raise ValueError(
                f"fixed must be a 1-D list of integer pose parameter indices, got "
                f"{fixed_arr.dtype} of shape {fixed_arr.shape}"
            )
        if fixed_arr.size and (fixed_arr.min() < 0 or fixed_arr.max() >= 6 * m):
            raise ValueError(
                f"fixed must index the pose parameters 0..{6 * m - 1} (6 per camera, m "
                f"= {m}), got values in [{fixed_arr.min()}, {fixed_arr.max()}]"
            )
        free = np.ones(6 * m, dtype=bool)
        free[fixed_arr] = False
        return cls(K, cam.astype(np.intp), point.astype(np.intp), u, m, n, free)

    def pack(self, poses, X):
        """x = [xi_1, ..., xi_m, vec X] from poses (m, 6) and X (3, n)."""
        poses = as_float_array(poses, "poses", ndims=2)
        X, _ = _points(X, "X")
        if poses.shape != (self.m, 6) or X.shape != (3, self.n):
            raise ValueError(
                f"poses and X must have shapes ({self.m}, 6) and (3, {self.n}), "
                f"got {poses.shape} and {X.shape}"
            )
        return np.concatenate([poses.ravel(), X.ravel(order="F")])

    def free_mask(self):
        """The mask of the parameters that move, (6m + 3n,): problem.free, then all
        points."""
        return np.concatenate([self.free, np.ones(3 * self.n, dtype=bool)])

    def unpack(self, x):
        """(poses (m, 6), X (3, n)) from the parameter vector x."""
        x = as_float_array(x, "x", ndims=1)
        if x.shape != (6 * self.m + 3 * self.n,):
            raise ValueError(
                f"x must have shape ({6 * self.m + 3 * self.n},), got shape {x.shape}"
            )
        return x[: 6 * self.m].reshape(self.m, 6), x[6 * self.m :].reshape(
            3, self.n, order="F"
        )


def _rotation_and_jacobian(w):
    """R(w) and J_r(w) from one evaluation of the coefficients (w already validated)."""
    a, b, c = rotation_coefficients(np.linalg.norm(w))
    W = _hat(w)
    WW = W @ W
    return np.eye(3) + a * W + b * WW, np.eye(3) - b * W + c * WW


def _camera_frame(problem, poses, X):
    """Rotations (m, 3, 3), right Jacobians (m, 3, 3), the rotations of the observations
    R_k (N, 3, 3), the observed points (3, N) and p = R X + t per observation (3, N)."""
    R, Jr = (
        np.stack(M) for M in zip(*[_rotation_and_jacobian(w) for w in poses[:, :3]])
    )
    Rk = R[problem.cam]
    Xo = X[:, problem.point]
    p = np.einsum("kab,bk->ak", Rk, Xo) + poses[problem.cam, 3:].T
    return R, Jr, Rk, Xo, p


def ba_residual(problem, x):
    """The reprojection residuals of all N observations, (2N,), in the order of the
    observations, x and y of each together (eq. 6.18)."""
    poses, X = problem.unpack(x)
    *_, p = _camera_frame(problem, poses, X)
    _in_front(p, "the camera-frame points R X + t")
    return (_project(p, problem.K) - problem.u).ravel(order="F")


def _project(p, K):
    return K[:2, :2] @ (p[:2] / p[2]) + K[:2, 2:3]


def ba_jacobian_blocks(problem, x):
    """The non-zero blocks of the bundle-adjustment Jacobian (eq. 6.18): for
    observation k of point i by camera j, A_k = dr_k / dxi_j (N, 2, 6) and B_k = dr_k
    / dX_i (N, 2, 3)."""
    poses, X = problem.unpack(x)
    R, Jr, Rk, Xo, p = _camera_frame(problem, poses, X)
    _in_front(p, "the camera-frame points R X + t")
    Jpi = _project_jacobian(p, problem.K)  # (N, 2, 3)
    B = Jpi @ Rk
    # J_pi (-R [X]x J_r) = -(B [X]x) J_r, and each row b of B gives b^T [X]x = (b x X)^T
    A = np.concatenate([-np.cross(B, Xo.T[:, None, :]) @ Jr[problem.cam], Jpi], axis=2)
    return A, B


def ba_jacobian(problem, x, free_only=False):
    """The (2N, 6m + 3n) Jacobian of ba_residual as a scipy.sparse CSR matrix (needs
    scipy), built from the blocks A_k, B_k (eq. 6.18). With free_only=True the
    columns of the fixed pose parameters are left out: (2N, number of free
    parameters)."""
    from scipy.sparse import csr_matrix

    A, B = ba_jacobian_blocks(problem, x)
    _, cols, _ = ba_sparsity_pattern(problem, coordinates=True)
    vals = np.concatenate([A, B], axis=2).ravel()  # 9 entries per row, in row order
    rows = 2 * problem.cam.size
    width = 6 * problem.m + 3 * problem.n
    counts = np.full(rows, 9)
    if free_only:
        keep = problem.free_mask()
        sel = keep[cols]
        cols, vals = (np.cumsum(keep) - 1)[cols[sel]], vals[sel]
        counts, width = sel.reshape(rows, 9).sum(axis=1), int(keep.sum())
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return csr_matrix((vals, cols, indptr), shape=(rows, width))


def ba_sparsity_pattern(problem, coordinates=False):
    """Where the Jacobian can be non-zero: row 2k, 2k + 1 (observation k) meets the
    six columns of its camera and the three of its point. Returns a scipy.sparse 0/1
    matrix (needs scipy), or with coordinates=True the (rows, cols, None) in the
    order of the blocks [A_k | B_k]."""
    N = problem.cam.size
    rows = np.repeat(
        2 * np.arange(N)[:, None] + np.arange(2)[None, :], 9, axis=1
    )  # (N, 18)
    cam_cols = 6 * problem.cam[:, None] + np.arange(6)
    pt_cols = 6 * problem.m + 3 * problem.point[:, None] + np.arange(3)
    cols = np.tile(np.concatenate([cam_cols, pt_cols], axis=1), (1, 2))  # (N, 18)
    rows, cols = rows.ravel(), cols.ravel()  # (N, 2, 9) blocks [A_k | B_k], row-major
    if coordinates:
        return rows, cols, None
    from scipy.sparse import csr_matrix

    return csr_matrix(
        (np.ones(rows.size), (rows, cols)), shape=(2 * N, 6 * problem.m + 3 * problem.n)
    )


def _sum_by(problem, by, values):
    """Sum the rows of values (N, ...) of the observations of each camera (by="cam") or
    each point (by="point"): one product with a sparse 0/1 matrix built once per problem
    (much faster than np.add.at, which is the fallback without scipy)."""
    index = getattr(problem, by)
    size = problem.m if by == "cam" else problem.n
    cache = problem.__dict__.setdefault("_indicators", {})
    if by not in cache:
        try:
            from scipy.sparse import csr_matrix
        except ImportError:  # scipy is optional for derivlib
            cache[by] = None
        else:
            cache[by] = csr_matrix(
                (np.ones(index.size), (index, np.arange(index.size))),
                shape=(size, index.size),
            )
    M = cache[by]
    if M is None:
        out = np.zeros((size,) + values.shape[1:])
        np.add.at(out, index, values)
        return out
    return (M @ values.reshape(values.shape[0], -1)).reshape((size,) + values.shape[1:])


def ba_normal_equations(problem, A, B, r):
    """The blocks of J^T J and J^T r (eq. 6.19): U (6m, 6m) block-diagonal, W (6m, 3n),
    V (n, 3, 3) the diagonal blocks, and the gradients g_c (6m,), g_p (3n,)."""
    m, n, cam, point = problem.m, problem.n, problem.cam, problem.point
    r2 = r.reshape(-1, 2)
    # contiguous transposes: A^T @ A on a transposed view of A itself is several times
    # slower
    At, Bt = (
        np.ascontiguousarray(A.transpose(0, 2, 1)),
        np.ascontiguousarray(B.transpose(0, 2, 1)),
    )
    Ublocks = _sum_by(problem, "cam", At @ A)
    V = _sum_by(problem, "point", Bt @ B)
    W = np.zeros((m, 6, n, 3))
    W[cam, :, point, :] = At @ B
    gc = _sum_by(problem, "cam", np.einsum("ki,kij->kj", r2, A))
    gp = _sum_by(problem, "point", np.einsum("ki,kij->kj", r2, B))
    U = np.zeros((m, 6, m, 6))
    U[np.arange(m), :, np.arange(m), :] = Ublocks
    return U.reshape(6 * m, 6 * m), W.reshape(6 * m, 3 * n), V, gc.ravel(), gp.ravel()


def schur_solve(U, W, V, gc, gp, free):
    """Solve [[U, W], [W^T, blockdiag V]] [dc; dp] = -[gc; gp] by eliminating the points
    (eq. 6.20): S = U - W V^-1 W^T, S dc = -(gc - W V^-1 gp), dp = -V^-1 (gp + W^T dc).
    Pose parameters outside `free` are held at zero. Returns (dc (6m,), dp (3n,))."""
    n = V.shape[0]
    Vinv = np.linalg.inv(V)  # (n, 3, 3)
    # Y = W V^-1, block column by block column: n products of (6m, 3) by (3, 3)
    Y = (
        (W.reshape(-1, n, 3).transpose(1, 0, 2) @ Vinv)
        .transpose(1, 0, 2)
        .reshape(W.shape)
    )
    S = U - Y @ W.T
    rhs = -(gc - Y @ gp)
    dc = np.zeros_like(gc)
    f = np.flatnonzero(free)
    dc[f] = np.linalg.solve(S[np.ix_(f, f)], rhs[f])
    dp = -(Vinv @ (gp + W.T @ dc).reshape(n, 3, 1)).ravel()
    return dc, dp


def gauge_directions(problem, x):
    """The 7 directions of the similarity gauge (eq. 6.21) at x: G (6m + 3n, 7), whose
    columns are dx for an infinitesimal rotation omega (3), shift b (3) and scale s (1)
    of the scene; J G = 0. For camera j, R_j Q^T = R_j exp(-[omega]x) gives
    J_r(w_j) dw_j = -omega, and dt_j = s t_j - R_j b; each point moves by
    dX_i = omega x X_i + b + s X_i."""
    poses, X = problem.unpack(x)
    G = np.zeros((problem.m, 6, 7))
    for j, (w, t) in enumerate(zip(poses[:, :3], poses[:, 3:])):
        G[j, :3, :3] = -np.linalg.inv(right_jacobian(w))
        G[j, 3:, 3:6] = -rodrigues(w)
        G[j, 3:, 6] = t
    Gp = np.concatenate(
        [-_hat_many(X), np.broadcast_to(np.eye(3), (problem.n, 3, 3)), X.T[:, :, None]],
        axis=2,
    )
    return np.concatenate([G.reshape(6 * problem.m, 7), Gp.reshape(3 * problem.n, 7)])


def gauge_is_fixed(problem, x, rtol=1e-8):
    """True if holding the fixed pose parameters removes all 7 gauge directions at x:
    the rows of gauge_directions(problem, x) at the fixed parameters have rank 7
    (each column scaled to unit norm, smallest singular value above rtol times the
    largest)."""
    G = gauge_directions(problem, x)[: 6 * problem.m]
    G = G / np.linalg.norm(G, axis=0)
    Gf = G[~problem.free]
    if Gf.shape[0] < 7:
        return False
    s = np.linalg.svd(Gf, compute_uv=False)
    return bool(s[-1] > rtol * s[0])


def _predicted_decrease(U, W, V, gc, gp, dc, dp):
    """E - ||r + J delta||^2 = -(2 delta^T g + delta^T J^T J delta) for delta = (dc,
    dp), from the blocks of J^T J = [[U, W], [W^T, blockdiag V]] (eq. 6.19), without
    J."""
    dp3 = dp.reshape(-1, 3)
    dHd = dc @ U @ dc + 2 * dc @ (W @ dp) + np.einsum("ni,nij,nj->", dp3, V, dp3)
    return -(2 * (dc @ gc + dp @ gp) + float(dHd))


def bundle_adjust(problem, x0, tol=1e-12, max_iter=200, lam0=1e-3, check_gauge=True):
    """Levenberg-Marquardt for bundle adjustment with the Schur complement (eqs.
    6.18-6.21).

    Damps the normal equations by lam diag(J^T J), eliminates the points, and holds
    the pose parameters outside problem.free at their values in x0 (the gauge).
    Stops, and raises ConvergenceError, as `solve_least_squares` does. With
    check_gauge (the default) it first raises ValueError if the fixed parameters
    leave a gauge direction free at x0 (gauge_is_fixed), as the default `fixed` does
    when camera 1's centre is straight ahead of or behind camera 0 as seen from
    camera 1 (forward motion); pass check_gauge=False to run without a fixed gauge on
    purpose. Returns (x, LeastSquaresHistory)."""
    x = as_float_array(x0, "x0", ndims=1).copy()
    problem.unpack(x)
    if check_gauge and not gauge_is_fixed(problem, x):
        raise ValueError(
            f"the fixed pose parameters (fixed = "
            f"{np.flatnonzero(~problem.free).tolist()}) do not fix the gauge at x0: "
            f"some rotation, shift or scale of the scene (eq. 6.21) leaves them and "
            f"every residual unchanged, so J^T J is singular. With the default fixed, "
            f"the baseline c_0 - c_1 seen from camera 1, R_1 (c_0 - c_1), needs a "
            f"non-zero x component; hold another coordinate of camera 1 "
            f"(BundleProblem.create(fixed=...)), or pass check_gauge=False"
        )
    hist = LeastSquaresHistory(n_residual=1)
    r = ba_residual(problem, x)
    E = float(r @ r)
    lam, nu = lam0, 2.0
    hist.cost.append(E)
    for _ in range(max_iter):
        A, B = ba_jacobian_blocks(problem, x)
        hist.n_jacobian += 1
        hist.damping.append(lam)
        U, W, V, gc, gp = ba_normal_equations(problem, A, B, r)
        gc = gc * problem.free
        dU, dV = np.diag(U).copy(), np.einsum("nii->ni", V).copy()

        def trial(lam):
            dc, dp = schur_solve(
                U + lam * np.diag(dU),
                W,
                V + lam * dV[:, :, None] * np.eye(3),
                gc,
                gp,
                problem.free,
            )
            return np.concatenate([dc, dp]), _predicted_decrease(
                U, W, V, gc, gp, dc, dp
            )

        delta, r_new, E_new, lam, nu, stationary = _lm_steps(
            lambda y: ba_residual(problem, y),
            trial,
            x,
            E,
            lam,
            nu,
            tol,
            hist,
            "bundle adjustment",
        )
        done = stationary or _finished(E, E_new, delta, x, tol)
        if not stationary:
            x, r, E = x + delta, r_new, E_new
        hist.n_iter += 1
        hist.cost.append(E)
        if done:
            hist.converged = True
            return x, hist
    raise ConvergenceError(
        f"bundle adjustment did not converge in {max_iter} iterations (cost {E:.6g})"
    )


# ----- Synthetic scenes -----


@dataclass
class Scene:
    """A synthetic bundle-adjustment scene with its ground truth and a perturbed
    start."""

    problem: BundleProblem
    poses: np.ndarray  # (m, 6) true poses (w, t)
    X: np.ndarray  # (3, n) true points
    x0: np.ndarray  # start: true gauge camera and scale, other parameters perturbed


def make_scene(m=6, n=200, noise=1.0, seed=0, visibility=0.7, perturbation=1.0):
    """m cameras on an arc of radius 5 around n points in the unit ball, looking at it,
    with K = [[500, 0, 320], [0, 500, 240], [0, 0, 1]]. Each camera sees each point with
    probability `visibility` (every point is seen at least twice); image points get
    Gaussian noise of `noise` pixels. The start x0 keeps the gauge parameters (camera 0,
    t_x of camera 1) at their true values and perturbs the rest by `perturbation` times
    0.02 rad (rotations), 0.1 (translations) and 0.05 (points)."""
    if m < 2 or n < 1:
        raise ValueError(
            f"a scene needs m >= 2 cameras and n >= 1 points, got m = {m}, n = {n}"
        )
    rng = np.random.default_rng(seed)
    K = np.array([[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]])
    X = rng.standard_normal((3, n))
    X *= rng.random(n) ** (1 / 3) / np.linalg.norm(X, axis=0)
    phi = np.linspace(-0.6, 0.6, m)
    poses = np.zeros((m, 6))
    for j in range(m):
        w = np.array([0.0, phi[j], 0.0]) + 0.05 * rng.standard_normal(3)
        centre = 5.0 * np.array(
            [np.sin(phi[j]), 0.0, -np.cos(phi[j])]
        ) + 0.2 * rng.standard_normal(3)
        poses[j] = np.concatenate([w, -rodrigues(w) @ centre])
    seen = rng.random((m, n)) < visibility
    for i in np.flatnonzero(seen.sum(axis=0) < 2):
        seen[rng.choice(m, 2, replace=False), i] = True
    cam, point = np.nonzero(seen)
    p = np.stack(
        [rodrigues(poses[j, :3]) @ X[:, i] + poses[j, 3:] for j, i in zip(cam, point)],
        axis=1,
    )
    u = _project(p, K) + noise * rng.standard_normal((2, cam.size))
    problem = BundleProblem.create(K, cam, point, u, m, n)
    start = poses + perturbation * np.concatenate(
        [0.02 * rng.standard_normal((m, 3)), 0.1 * rng.standard_normal((m, 3))], axis=1
    )
    start[~problem.free.reshape(m, 6)] = poses[~problem.free.reshape(m, 6)]
    X0 = X + perturbation * 0.05 * rng.standard_normal(X.shape)
    return Scene(problem, poses, X, problem.pack(start, X0))
