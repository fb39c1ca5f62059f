"""Chapter 6, robust costs: Huber and Cauchy, by reweighting and by Triggs' correction.

A robust cost replaces the squared residual r_k^2 by c^2 rho(r_k^2 / c^2), with c the
scale (scipy's f_scale) and rho(z) = z for the plain cost:

    E_rho(x) = sum_k c^2 rho(z_k),  z_k = r_k(x)^2 / c^2                     (eq. 6.37)

so E_rho = ||r||^2 = E of eq. 6.14 for rho(z) = z, and scipy.optimize.least_squares
reports E_rho / 2 as its `cost` (it applies rho to each residual, as here). Its gradient
is 2 J^T diag(rho'(z)) r; its Hessian, without the second derivatives of r, is
2 J^T diag(rho'(z) + 2 z rho''(z)) J (eq. 6.38). Bundle adjustment solves those as
the plain normal equations of a rescaled problem (eq. 6.49, `robust_rescaling`,
`sparse_bundle_adjust(loss=...)`). The conventions of the chapter are stated once, in
derivlib/geometry/__init__.py."""

import numpy as np

from .._validate import as_float_array, require_finite
from ..losses import ConvergenceError
from .solvers import (
    LeastSquaresHistory,
    _finished,
    _lm_steps,
    _pnp_problem,
    _pnp_start,
    pose_retract,
    reprojection_jacobian_right,
    reprojection_residual,
)

LOSSES = ("linear", "huber", "cauchy")

# The smallest curvature weight rho' + 2 z rho'' kept in Triggs' corrected normal
# equations, as scipy keeps it: a residual on Huber's linear branch has exactly 0.
MIN_CURVATURE = np.finfo(np.float64).eps


def robust_loss(z, loss):
    """(rho(z), rho'(z), rho''(z)) for z = r^2 / c^2 >= 0, element-wise (eq. 6.37):
    'linear' rho = z; 'huber' rho = z for z <= 1, 2 sqrt(z) - 1 above; 'cauchy' rho =
    log(1 + z). Each has rho(0) = 0 and rho'(0) = 1, so small residuals count as in
    least squares. Raises ValueError for an unknown loss or a negative or non-finite
    z."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    z = require_finite(as_float_array(z, "z"), "z")
    if np.any(z < 0):
        raise ValueError(f"z = r^2 / c^2 must be >= 0, got {z.min()!r}")
    if loss == "linear":
        return z.copy(), np.ones_like(z), np.zeros_like(z)
    if loss == "cauchy":
        d1 = 1.0 / (1.0 + z)
        return np.log1p(z), d1, -(d1 * d1)  # not -1 / (1 + z)^2, which overflows
    inner = z <= 1.0
    sz = np.sqrt(np.where(inner, 1.0, z))
    rho = np.where(inner, z, 2.0 * sz - 1.0)
    d1 = np.where(inner, 1.0, 1.0 / sz)
    d2 = np.where(inner, 0.0, -0.5 / sz / np.where(inner, 1.0, z))  # no overflow
    return rho, d1, d2


# Above this |r| / c, z = (r / c)^2 would be near overflow (about 1.3e154 overflows):
# there the terms are evaluated from their exact forms in |r| / c instead of from z.
BIG_RATIO = 1e150


def _robust_terms(r, c, loss):
    """(c^2 rho(z), rho'(z), rho'(z) + 2 z rho''(z)) for z = (r / c)^2, element-wise
    (eqs. 6.37, 6.38), finite wherever the cost is: for |r| / c > BIG_RATIO, where z
    overflows, Huber's outer branch is c (2 |r| - c), rho' = c / |r|, curvature 0, and
    Cauchy's log(1 + z) = 2 log(|r| / c) + O(c^2 / r^2), rho' = c^2 / r^2 and curvature
    -c^2 / r^2 to rounding. (The plain cost r^2 itself overflows there.)"""
    with np.errstate(over="ignore"):
        a = np.abs(r) / c
    big = a > BIG_RATIO
    z = np.where(big, 0.0, a) ** 2
    rho, d1, d2 = robust_loss(z, loss)
    h = d1 + 2.0 * z * d2
    # c^2 rho(z) = r^2 rho(z) / z on z <= 1, where rho(z) / z is in [log 2, 1]: c^2
    # overflows for f_scale above about 1e154, and z underflows to 0 where r << c
    inner = (z <= 1.0) & ~big
    with np.errstate(over="ignore", invalid="ignore"):  # inf * 0 on z <= 1, replaced
        cost = np.where(inner, 0.0, c * c * rho)
    zi = z[inner]
    ratio = np.ones_like(zi)
    if loss == "cauchy":
        pos = zi > 0
        ratio[pos] = rho[inner][pos] / zi[pos]
    cost[inner] = np.asarray(r, dtype=np.float64)[inner] ** 2 * ratio
    if big.any():
        rb = np.abs(r[big])
        with np.errstate(over="ignore", under="ignore"):  # inf only if the cost is
            if loss == "linear":
                cost[big], d1[big], h[big] = rb * rb, 1.0, 1.0
            elif loss == "huber":
                cost[big], d1[big], h[big] = c * (2.0 * rb - c), c / rb, 0.0
            else:
                w = (c / rb) ** 2
                cost[big] = 2.0 * c * c * (np.log(rb) - np.log(c))
                d1[big], h[big] = w, -w
    return cost, d1, h


def robust_cost(r, loss, f_scale=1.0):
    """E_rho = sum_k c^2 rho(r_k^2 / c^2) with c = f_scale (eq. 6.37); ||r||^2 for
    loss='linear', and twice scipy's cost. Finite for every finite r with the robust
    losses, also where r^2 / c^2 overflows."""
    r = require_finite(as_float_array(r, "r", ndims=1), "r")
    c = _scale(f_scale)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return float(_robust_terms(r, c, loss)[0].sum())


def _scale(f_scale):
    try:
        c = float(f_scale)
    except (TypeError, ValueError):
        raise ValueError(
            f"f_scale must be a positive number, got {f_scale!r}"
        ) from None
    if not (np.isfinite(c) and c > 0):
        raise ValueError(f"f_scale must be finite and > 0, got {f_scale!r}")
    return c


def robust_weights(r, loss, f_scale=1.0, weighting="triggs"):
    """The per-residual weights (b, h) of the robust normal equations (eq. 6.38),
    J^T diag(h) J delta = -J^T diag(b) r: b = rho'(z) always (the gradient); h =
    rho'(z) for weighting='irls' (iteratively reweighted least squares), or h =
    max(rho'(z) + 2 z rho''(z), MIN_CURVATURE) for weighting='triggs' (Triggs'
    corrected normal equations, whose J^T diag(h) J is the Gauss-Newton Hessian of
    E_rho / 2 wherever it is positive). r (N,) -> (b, h), each (N,)."""
    if weighting not in ("irls", "triggs"):
        raise ValueError(f"weighting must be 'irls' or 'triggs', got {weighting!r}")
    r = require_finite(as_float_array(r, "r", ndims=1), "r")
    c = _scale(f_scale)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    _, d1, h = _robust_terms(r, c, loss)
    if weighting == "irls":
        return d1, d1.copy()
    return d1, np.maximum(h, MIN_CURVATURE)


def solve_robust_least_squares(
    residual,
    jacobian,
    x0,
    *,
    loss="huber",
    f_scale=1.0,
    weighting="triggs",
    tol=1e-12,
    max_iter=200,
    lam0=1e-3,
    retract=None,
):
    """Minimise E_rho(x) = sum_k c^2 rho(r_k(x)^2 / c^2) (eq. 6.37) by
    Levenberg-Marquardt on the robust normal equations (eq. 6.38):
    (H + lam diag(H)) delta = -g, H = J^T diag(h) J, g = J^T diag(b) r, with (b, h)
    from `robust_weights`. A step is taken only if E_rho falls; the damping follows
    Nielsen's rule with the decrease predicted by the quadratic model
    -(2 g^T delta + delta^T H delta). Stops as `solve_least_squares` does. The update is
    retract(x, delta), x + delta by default. Returns (x, LeastSquaresHistory), whose
    cost is E_rho (twice scipy's cost).

    weighting='irls' is iteratively reweighted least squares: each iteration solves
    the weighted problem with the weights rho'(z) frozen; 'triggs' adds the curvature
    of rho. Both have the same gradient, so the same minima; they differ in the path.
    Raises ConvergenceError after max_iter iterations or when stuck."""
    c = _scale(f_scale)
    robust_weights(np.zeros(1), loss, c, weighting)  # validates loss and weighting
    x = np.array(x0, dtype=np.float64)
    hist = LeastSquaresHistory(n_residual=1)

    def move(x, delta):
        return x + delta if retract is None else retract(x, delta)

    def cost(r):
        return float(_robust_terms(r, c, loss)[0].sum())

    r = residual(x)
    E = cost(r)
    lam, nu = lam0, 2.0
    hist.cost.append(E)
    hist.iterates.append(x.copy())
    for _ in range(max_iter):
        J = jacobian(x)
        hist.n_jacobian += 1
        hist.damping.append(lam)
        b, h = robust_weights(r, loss, c, weighting)
        g, H = J.T @ (b * r), J.T @ (h[:, None] * J)

        def trial(lam):
            delta = np.linalg.solve(H + lam * np.diag(np.diag(H)), -g)
            return delta, -float(delta @ (2 * g + H @ delta))

        delta, r_new, E_new, lam, nu, stationary = _lm_steps(
            residual,
            trial,
            x,
            E,
            lam,
            nu,
            tol,
            hist,
            "robust Levenberg-Marquardt",
            retract,
            cost,
        )
        done = stationary or _finished(E, E_new, delta, x, tol)
        if not stationary:
            x, r, E = move(x, delta), r_new, E_new
        hist.n_iter += 1
        hist.cost.append(E)
        hist.iterates.append(x.copy())
        if done:
            hist.converged = True
            return x, hist
    raise ConvergenceError(
        f"robust Levenberg-Marquardt did not converge in {max_iter} iterations (cost "
        f"{E:.6g})"
    )


def solve_pnp_robust(
    X,
    K,
    u,
    *,
    loss="huber",
    f_scale=1.0,
    xi0=None,
    weighting="triggs",
    tol=1e-12,
    max_iter=200,
):
    """The pose xi = (w, t) minimising the robust reprojection cost E_rho (eq. 6.37)
    of the points X (3, n) observed at u (2, n) by the camera K, each of the 2n pixel
    residuals through rho with the scale f_scale (pixels), by
    `solve_robust_least_squares` with the update on the manifold (eq. 6.36). The start
    is xi0, or the DLT pose (eq. 6.39) when xi0 is None (which outliers can spoil:
    pass a start then). Returns (xi, LeastSquaresHistory). Degenerate problems are
    refused as in `solve_pnp`."""
    X, K, u = _pnp_problem(X, K, u)
    xi0 = _pnp_start(X, K, u, xi0, "solve_pnp_robust")
    return solve_robust_least_squares(
        lambda xi: reprojection_residual(xi, X, K, u),
        lambda xi: reprojection_jacobian_right(xi, X, K),
        xi0,
        loss=loss,
        f_scale=f_scale,
        weighting=weighting,
        tol=tol,
        max_iter=max_iter,
        retract=pose_retract,
    )


# ----- Robust bundle adjustment (eqs. 6.38, 6.49) -----


def robust_rescaling(r, loss, f_scale=1.0, weighting="triggs"):
    """The factors (s_r, s_J), each (N,) like r, that turn the robust normal
    equations (eq. 6.38) into the plain normal equations of a rescaled problem (eq.
    6.49): with r~ = s_r o r and J~ = diag(s_J) J, J~^T J~ = J^T diag(h) J and J~^T r~
    = J^T diag(b) r, for s_J = sqrt(h) and s_r = b / sqrt(h), (b, h) from
    `robust_weights`. Triggs' h is at least MIN_CURVATURE, so the division is safe;
    a weight that underflows to 0 (IRLS, Cauchy, |r| / c above about 1e154) gives
    s_r = s_J = 0. scipy.optimize.least_squares rescales its residuals and Jacobian
    the same way for its loss."""
    b, h = robust_weights(r, loss, f_scale, weighting)
    s = np.sqrt(h)
    return np.divide(b, s, out=np.zeros_like(b), where=s > 0), s


def _robust_hooks(loss, f_scale, weighting):
    """Validate a robust cost once and return (cost, rescale) for a solver's loop:
    cost(r) = E_rho (eq. 6.37), and rescale(r) = (s_r, s_J) of eq. 6.49, or None for
    loss='linear', whose cost is r^T r (the plain solver, unchanged)."""
    c = _scale(f_scale)
    robust_weights(np.zeros(1), loss, c, weighting)  # validates loss and weighting
    if loss == "linear":
        return (lambda r: float(r @ r)), None

    def cost(r):
        return float(_robust_terms(r, c, loss)[0].sum())

    def rescale(r):
        _, d1, h = _robust_terms(r, c, loss)
        h = d1 if weighting == "irls" else np.maximum(h, MIN_CURVATURE)
        s = np.sqrt(h)
        return np.divide(d1, s, out=np.zeros_like(d1), where=s > 0), s

    return cost, rescale


def _check_state(recon, state, name, n=None):
    """Refuse a SparseBundleState whose shapes do not fit recon's m cameras and n
    points (with n given: at least n points, of which the first n are used)."""
    m, exact = recon.m, n is None
    n = recon.n if exact else n
    shapes = [np.shape(getattr(state, a, None)) for a in ("R", "t", "intrinsics", "X")]
    X = shapes[3]
    if shapes[:3] != [(m, 3, 3), (m, 3), (m, 3)] or not (
        len(X) == 2 and X[0] == 3 and (X[1] == n if exact else X[1] >= n)
    ):
        raise ValueError(
            f"{name} must hold R ({m}, 3, 3), t ({m}, 3), intrinsics ({m}, 3) and X "
            f"(3, {n}{'' if exact else ' or more'}) for {m} cameras and {n} points, "
            f"got {shapes}"
        )


class BundlerChart:
    """The free parameters of a Bundler-model problem as one vector, for solvers
    that update additively (scipy.optimize.least_squares): x = [the free (delta, t,
    f, k1, k2) of each camera, in camera order (free (m, 9), default_gauge(start));
    vec of the point offsets (3 per point)], with the cameras at R0 Exp(delta), t0 +
    dt, ..., and the points at X0 + dX. x = 0 is the start."""

    def __init__(self, recon, start, free=None):
        from .bundle import default_gauge

        _check_state(recon, start, "start")
        self.recon, self.start = recon, start
        self.free = default_gauge(start) if free is None else np.asarray(free, bool)
        if self.free.shape != (recon.m, 9):
            raise ValueError(
                f"free must have shape ({recon.m}, 9), got {self.free.shape}"
            )
        self.n_cam = int(self.free.sum())
        self.x0 = np.zeros(self.n_cam + 3 * recon.n)

    def _x(self, x):
        x = np.asarray(x, dtype=np.float64)
        if x.shape != self.x0.shape:
            raise ValueError(
                f"x must have shape {self.x0.shape} (the free camera parameters, then "
                f"3 per point), got {x.shape}"
            )
        return x

    def state(self, x):
        """The SparseBundleState at x."""
        from .bundle import SparseBundleState, _so3_exp_many

        x = self._x(x)
        d = np.zeros((self.recon.m, 9))
        d[self.free] = x[: self.n_cam]
        s = self.start
        return SparseBundleState(
            s.R @ _so3_exp_many(d[:, :3]),
            s.t + d[:, 3:6],
            s.intrinsics + d[:, 6:],
            s.X + x[self.n_cam :].reshape(-1, 3).T,
        )

    def residual(self, x):
        """The residuals of bundler_residual at x, (2N,); all inf when a point is
        not in front of a camera that sees it (scipy's trust-region solver then
        rejects the step and shrinks its region)."""
        from .bundle import _sparse_residual

        x = self._x(x)  # a wrong x raises here, not as an inf residual
        try:
            return _sparse_residual(self.recon, self.state(x))
        except ValueError:  # Bundler's model raises ValueError for P_z >= 0
            return np.full(2 * self.recon.cam.size, np.inf)

    def jacobian(self, x):
        """The (2N, len(x)) Jacobian of residual at x, scipy.sparse CSR: the blocks
        [A_k | C_k] and B_k of eq. 6.46, each rotation column block times J_r(delta_j)
        (d/d delta of R0 Exp(delta) is R0 Exp(delta) [J_r(delta) d delta]x)."""
        from scipy.sparse import csr_matrix

        from .bundle import _sparse_blocks
        from .lie import right_jacobian

        recon, m = self.recon, self.recon.m
        x = self._x(x)
        d = np.zeros((m, 9))
        d[self.free] = x[: self.n_cam]
        _, A, B = _sparse_blocks(recon, self.state(x))
        Jr = np.stack([right_jacobian(w) for w in d[:, :3]])
        A = A.copy()
        A[:, :, :3] = A[:, :, :3] @ Jr[recon.cam]
        col = -np.ones(9 * m, dtype=np.intp)
        col[self.free.ravel()] = np.arange(self.n_cam)
        N = recon.cam.size
        cam_cols = col[9 * recon.cam[:, None] + np.arange(9)]  # (N, 9), -1 if held
        pt_cols = self.n_cam + 3 * recon.point[:, None] + np.arange(3)
        cols = np.concatenate([cam_cols, pt_cols], axis=1)  # (N, 12)
        vals = np.concatenate([A, B], axis=2)  # (N, 2, 12)
        rows = 2 * np.arange(N)[:, None, None] + np.arange(2)[:, None]  # (N, 2, 1)
        rows = np.broadcast_to(rows, vals.shape)
        cols = np.broadcast_to(cols[:, None, :], vals.shape)
        keep = cols >= 0
        return csr_matrix(
            (vals[keep], (rows[keep], cols[keep])), shape=(2 * N, self.x0.size)
        )


def corrupt_observations(recon, fraction, seed=0, low=20.0, high=60.0):
    """A copy of recon with round(fraction N) of its N observations, drawn without
    replacement, each moved by a distance uniform in [low, high] pixels in a
    direction uniform on the circle: outliers for robust bundle adjustment. Returns
    (Reconstruction, outlier (N,) bool)."""
    from .io import Reconstruction

    if not (isinstance(fraction, (int, float, np.number)) and 0 <= fraction <= 1):
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if not all(isinstance(v, (int, float, np.number)) for v in (low, high)) or not (
        0 <= low <= high and np.isfinite(high)
    ):
        raise ValueError(f"need 0 <= low <= high < inf pixels, got {low!r}, {high!r}")
    rng = np.random.default_rng(seed)
    N = recon.cam.size
    bad = rng.choice(N, int(round(fraction * N)), replace=False)
    angle = rng.uniform(0, 2 * np.pi, bad.size)
    size = rng.uniform(low, high, bad.size)
    u = np.array(recon.u, dtype=np.float64)
    u[:, bad] += size * np.array([np.cos(angle), np.sin(angle)])
    outlier = np.zeros(N, dtype=bool)
    outlier[bad] = True
    return (
        Reconstruction(
            recon.R, recon.t, recon.intrinsics, recon.X, recon.cam, recon.point, u
        ),
        outlier,
    )


def first_points(recon, state, n):
    """The sub-problem of the first n points of recon and their observations, with
    every camera: (Reconstruction, SparseBundleState of state restricted to it, kept
    (N,) bool over recon's observations)."""
    from .bundle import SparseBundleState
    from .io import Reconstruction

    if not (
        isinstance(n, (int, np.integer))
        and not isinstance(n, bool)
        and 1 <= n <= recon.n
    ):
        raise ValueError(f"n must be an integer in 1..{recon.n}, got {n!r}")
    _check_state(recon, state, "state", n)
    kept = recon.point < n
    sub = Reconstruction(
        recon.R,
        recon.t,
        recon.intrinsics,
        recon.X[:, :n],
        recon.cam[kept],
        recon.point[kept],
        recon.u[:, kept],
    )
    return (
        sub,
        SparseBundleState(state.R, state.t, state.intrinsics, state.X[:, :n]),
        kept,
    )
