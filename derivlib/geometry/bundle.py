"""Chapter 6, bundle adjustment: the problem, its Jacobian blocks, the Schur
complement and the Levenberg-Marquardt solver.

The conventions are stated once, in derivlib/geometry/__init__.py."""

from dataclasses import dataclass

import numpy as np

from .._validate import as_float_array, require_finite
from ..losses import ConvergenceError
from .camera import _in_front, _intrinsics, _points, _project_jacobian
from .lie import _hat, _hat_many, right_jacobian, rodrigues, rotation_coefficients
from .robust import _robust_hooks
from .solvers import (
    LeastSquaresHistory,
    _finished,
    _lm_steps,
    _observations,
    _solver_options,
)


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
        for name, size in (("m", m), ("n", n)):
            if not (isinstance(size, (int, np.integer)) and size >= 1):
                raise ValueError(
                    f"{name} must be a positive integer (the number of "
                    f"{'cameras' if name == 'm' else 'points'}), got {size!r}"
                )
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
    Pose parameters outside `free` are held at zero. Returns (dc (6m,), dp (3n,)).

    Raises ValueError when the shapes do not fit U (6m, 6m), W (6m, 3n), V (n, 3, 3),
    gc (6m,), gp (3n,) and free (6m,) of booleans, or when a block V_i or the reduced
    system S on the free parameters is singular (a point or a camera parameter that
    the observations do not determine)."""
    U, W, V, gc, gp = (np.asarray(a, dtype=np.float64) for a in (U, W, V, gc, gp))
    free = np.asarray(free)
    c = U.shape[0] if U.ndim == 2 else -1
    n = V.shape[0] if V.ndim == 3 else -1
    if (
        U.shape != (c, c)
        or V.shape != (n, 3, 3)
        or W.shape != (c, 3 * n)
        or gc.shape != (c,)
        or gp.shape != (3 * n,)
        or free.shape != (c,)
        or free.dtype != bool
    ):
        raise ValueError(
            f"schur_solve needs U (6m, 6m), W (6m, 3n), V (n, 3, 3), gc (6m,), gp "
            f"(3n,) and a boolean free (6m,), got U {U.shape}, W {W.shape}, V "
            f"{V.shape}, gc {gc.shape}, gp {gp.shape}, free {free.shape} of "
            f"{free.dtype}"
        )
    try:
        Vinv = np.linalg.inv(V)  # (n, 3, 3)
    except np.linalg.LinAlgError:
        i = int(np.flatnonzero(np.linalg.matrix_rank(V) < 3)[0])
        raise ValueError(
            f"the 3 x 3 block V_{i} of point {i} is singular: its observations do not "
            f"determine it (fewer than two cameras, or all along one ray)"
        ) from None
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
    try:
        dc[f] = np.linalg.solve(S[np.ix_(f, f)], rhs[f])
    except np.linalg.LinAlgError:
        raise ValueError(
            "the reduced camera system S = U - W V^-1 W^T is singular on the free pose "
            "parameters: the observations do not determine them (a gauge direction "
            "left free, or a camera with too few observations)"
        ) from None
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


def _refuse_lonely_points(cam, point, m, n):
    """Refuse a point seen by fewer than two distinct cameras (two observations of a
    point by one camera do not triangulate it), for observations (cam, point) of n
    points by m cameras."""
    per_point = np.bincount(np.unique(point * m + cam) // m, minlength=n)
    lonely = np.flatnonzero(per_point < 2)
    if lonely.size:
        i = int(lonely[0])
        raise ValueError(
            f"point {i} is seen by {per_point[i]} camera(s): a point needs at least 2 "
            f"to be triangulated; {lonely.size} point(s) are seen by fewer than 2"
        )


def _refuse_degenerate_bundle(problem):
    """Refuse, before solving, a problem whose observations cannot determine its
    unknowns: a camera with fewer residuals than free pose parameters, a point seen
    by fewer than two cameras (each pair is observed once, so its observations are
    by distinct cameras), or fewer residuals than unknowns."""
    m, n = problem.m, problem.n
    n_free = problem.free.reshape(m, 6).sum(axis=1)
    per_cam = np.bincount(problem.cam, minlength=m)
    few = np.flatnonzero(2 * per_cam < n_free)
    if few.size:
        j = int(few[0])
        raise ValueError(
            f"camera {j} has {per_cam[j]} observation(s) ({2 * per_cam[j]} residuals) "
            f"for {n_free[j]} free pose parameters; {few.size} camera(s) have fewer "
            f"residuals than free parameters"
        )
    _refuse_lonely_points(problem.cam, problem.point, m, n)
    unknowns = int(problem.free.sum()) + 3 * n
    if 2 * problem.cam.size < unknowns:
        raise ValueError(
            f"{2 * problem.cam.size} residuals for {unknowns} unknowns: bundle "
            f"adjustment needs at least as many residuals as unknowns"
        )


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
    purpose. Before solving it also raises ValueError when x0 is not finite, a camera
    has fewer residuals than free pose parameters, a point is seen by fewer than two
    cameras, there are fewer residuals than unknowns, or a point's 3 x 3 block V_i is
    singular at x0 (its cameras see it along one ray). Returns (x,
    LeastSquaresHistory)."""
    _solver_options(tol, max_iter, lam0)
    x = require_finite(as_float_array(x0, "x0", ndims=1).copy(), "x0")
    problem.unpack(x)
    _refuse_degenerate_bundle(problem)
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
    _refuse_singular_points(problem, ba_jacobian_blocks(problem, x)[1])
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


# ----- Sparse bundle adjustment with per-camera intrinsics (eqs. 6.46-6.48) -----


@dataclass
class SparseBundleState:
    """The unknowns of a Bundler-model problem: R (m, 3, 3), t (m, 3), intrinsics
    (m, 3) as (f, k1, k2), and the points X (3, n). Rotations are updated on the
    manifold, R Exp(delta), so they are stored as matrices."""

    R: np.ndarray
    t: np.ndarray
    intrinsics: np.ndarray
    X: np.ndarray

    def copy(self):
        return SparseBundleState(
            self.R.copy(), self.t.copy(), self.intrinsics.copy(), self.X.copy()
        )


@dataclass
class SparseBundleHistory:
    """cost E = ||r||^2 (E_rho of eq. 6.37 with a robust loss) after each iteration
    (the start first), damping lam, and the counts of iterations and of rejected
    steps."""

    cost: list
    damping: list
    n_iter: int = 0
    n_rejected: int = 0
    converged: bool = False


def _so3_exp_many(D):
    """Exp([delta]x) for each row of D (m, 3), by Rodrigues' formula."""
    return np.stack([rodrigues(d) for d in D])


def _sparse_residual(recon, state):
    from .bundler import _blocks

    u, *_ = _blocks(
        state.R[recon.cam],
        state.t[recon.cam],
        state.intrinsics[recon.cam],
        state.X[:, recon.point],
    )
    return (u - recon.u).ravel(order="F")


def bundler_residual(recon, state):
    """The reprojection residuals u_k - u_bar_k of every observation of recon under
    Bundler's model (eqs. 6.40-6.41, 6.46) at state (a SparseBundleState), (2N,),
    x and y of each observation together. Raises ValueError if a point is not in
    front of a camera that sees it."""
    return _sparse_residual(recon, state)


def _sparse_blocks(recon, state):
    from .bundler import _blocks

    u, A, B, C = _blocks(
        state.R[recon.cam],
        state.t[recon.cam],
        state.intrinsics[recon.cam],
        state.X[:, recon.point],
    )
    return (u - recon.u).ravel(order="F"), np.concatenate([A, C], axis=2), B


def default_gauge(state):
    """The (m, 9) mask of the camera parameters (delta, t, f, k1, k2) that move, for
    the gauge of eq. 6.48: camera 0's rotation and translation are held, and so is
    the coordinate of t_1 along which the baseline R_1 (c_0 - c_1) is longest (it
    pins the scale). Every intrinsic moves."""
    m = state.R.shape[0]
    free = np.ones((m, 9), dtype=bool)
    free[0, :6] = False
    if m > 1:
        c = -np.einsum("mba,mb->ma", state.R, state.t)  # centres c = -R^T t
        free[1, 3 + int(np.argmax(np.abs(state.R[1] @ (c[0] - c[1]))))] = False
    return free


def _check_observations(recon):
    """Refuse observations that do not index recon's cameras and points."""
    cam, point, u = (np.asarray(a) for a in (recon.cam, recon.point, recon.u))
    N = cam.shape[0] if cam.ndim == 1 else -1
    if cam.ndim != 1 or point.shape != (N,) or u.shape != (2, N):
        raise ValueError(
            f"recon's cam, point and u must have shapes (N,), (N,) and (2, N), got "
            f"{cam.shape}, {point.shape} and {u.shape}"
        )
    for name, idx, size in (("cam", cam, recon.m), ("point", point, recon.n)):
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"recon.{name} must hold integers, got dtype {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise ValueError(
                f"recon.{name} must lie in 0..{size - 1}, got values in "
                f"[{idx.min()}, {idx.max()}]"
            )
    if not np.all(np.isfinite(u)):
        raise ValueError("recon.u, the observed image points, must be finite")


def _refuse_singular_points(recon, B):
    """Refuse a point whose 3 x 3 block V_i = sum_k B_k^T B_k is singular at the
    start (its cameras see it along one ray, or their f is 0): the data do not
    determine it, and V_i^-1 does not exist."""
    V = _sum_by(recon, "point", np.ascontiguousarray(B.transpose(0, 2, 1)) @ B)
    d = np.sqrt(np.abs(np.einsum("nii->ni", V)))
    d[d == 0] = 1.0
    w = np.linalg.eigvalsh(V / d[:, :, None] / d[:, None, :])
    bad = np.flatnonzero(w[:, 0] <= 1e-12 * w[:, -1])
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"the observations do not determine point {i}: its 3 x 3 block V_i is "
            f"singular at the start (its cameras see it along a single ray, or their "
            f"focal length is 0); {bad.size} point(s) are undetermined"
        )


def _refuse_underdetermined(recon, free):
    m, n = recon.m, recon.n
    per_cam = np.bincount(recon.cam, minlength=m)
    need = np.ceil(free.sum(axis=1) / 2).astype(int)
    few = np.flatnonzero(per_cam < need)
    if few.size:
        j = int(few[0])
        raise ValueError(
            f"camera {j} has {per_cam[j]} observations ({2 * per_cam[j]} residuals) "
            f"for {free[j].sum()} free parameters: it needs at least {need[j]}; "
            f"{few.size} camera(s) are underdetermined"
        )
    _refuse_lonely_points(recon.cam, recon.point, m, n)
    unknowns = int(free.sum()) + 3 * n
    if 2 * recon.cam.size < unknowns:
        raise ValueError(
            f"{2 * recon.cam.size} residuals for {unknowns} unknowns: bundle "
            f"adjustment needs at least as many residuals as unknowns"
        )


def _point_pairs(recon):
    """The pairs (k, l) of observations of the same point whose cameras j = cam[k],
    l = cam[l] have j <= l, sorted by camera pair, and where each camera pair's run
    starts: (k (P,), l (P,), pair starts, (j, l) of each run). Cached on recon."""
    cache = recon.__dict__.setdefault("_pairs", {})
    if "kl" not in cache:
        order = np.argsort(recon.point, kind="stable")
        c = np.bincount(recon.point, minlength=recon.n)
        starts = np.concatenate([[0], np.cumsum(c)[:-1]])
        c2 = c * c
        first = np.concatenate([[0], np.cumsum(c2)[:-1]])
        pt = np.repeat(np.arange(recon.n), c2)
        q = np.arange(c2.sum()) - first[pt]
        cp = c[pt]
        k = order[starts[pt] + q // cp]
        l = order[starts[pt] + q % cp]
        keep = recon.cam[k] <= recon.cam[l]
        k, l = k[keep], l[keep]
        jl = recon.cam[k] * recon.m + recon.cam[l]
        by = np.argsort(jl, kind="stable")
        k, l, jl = k[by], l[by], jl[by]
        runs = np.flatnonzero(np.diff(jl, prepend=-1))
        cache["kl"] = (k, l, np.append(runs, k.size), jl[runs])
    return cache["kl"]


def _by_camera(recon):
    """The observations of each camera: (order (N,), starts (m + 1,)). Cached."""
    cache = recon.__dict__.setdefault("_pairs", {})
    if "cam" not in cache:
        order = np.argsort(recon.cam, kind="stable")
        cache["cam"] = (
            order,
            np.searchsorted(recon.cam[order], np.arange(recon.m + 1)),
        )
    return cache["cam"]


def reduced_camera_system(recon, A, B, r, lam=0.0):
    """The reduced camera system of eq. 6.47 from the per-observation blocks, without
    a dense W: A (N, 2, 9) and B (N, 2, 3) the Jacobian blocks of each observation,
    r (2N,) the residuals, lam the Levenberg-Marquardt damping (the diagonals of U
    and V scaled by 1 + lam). W_k = A_k^T B_k is kept as N blocks (N, 9, 3); the
    point blocks V_i (n, 3, 3) are inverted one by one, and S = U - sum_i W_i V_i^-1
    W_i^T is summed camera pair by camera pair (j <= l), over the points both see,
    as one matrix product (9, 3p) @ (3p, 9) per pair; S is symmetric, so the pairs
    j > l are its transpose. Memory grows with the number of observations N (for
    tracks of bounded length) and with (9m)^2 for S itself.

    Returns S (9m, 9m), rhs (9m,), and the pieces the back-substitution needs:
    (W (N, 9, 3), Vinv (n, 3, 3), g_p (n, 3), the undamped U (m, 9, 9), V (n, 3, 3),
    g_c (m, 9))."""
    m, point, N = recon.m, recon.point, recon.cam.size
    A, B, r = np.asarray(A), np.asarray(B), np.asarray(r)
    if A.shape != (N, 2, 9) or B.shape != (N, 2, 3) or r.shape != (2 * N,):
        raise ValueError(
            f"A, B and r must have shapes ({N}, 2, 9), ({N}, 2, 3) and ({2 * N},) for "
            f"{N} observations, got {A.shape}, {B.shape} and {r.shape}"
        )
    r2 = r.reshape(-1, 2)
    order, cstart = _by_camera(recon)
    U = np.empty((m, 9, 9))
    gc = np.empty((m, 9))
    for j in range(m):  # U_j = A_j^T A_j with A_j the (2 N_j, 9) stack of camera j
        idx = order[cstart[j] : cstart[j + 1]]
        Aj = A[idx].reshape(-1, 9)
        U[j] = Aj.T @ Aj
        gc[j] = Aj.T @ r2[idx].ravel()
    Bt = np.ascontiguousarray(B.transpose(0, 2, 1))
    V = _sum_by(recon, "point", Bt @ B)
    W = np.ascontiguousarray(A.transpose(0, 2, 1)) @ B  # (N, 9, 3)
    del Bt
    gp = _sum_by(recon, "point", np.einsum("ki,kij->kj", r2, B))
    Ud = U + lam * np.einsum("mii->mi", U)[:, :, None] * np.eye(9)
    Vd = V + lam * np.einsum("nii->ni", V)[:, :, None] * np.eye(3)
    Vinv = np.linalg.inv(Vd)
    k, l, runs, pairs = _point_pairs(recon)
    S = np.zeros((m, 9, m, 9))
    for s, e, jl in zip(runs[:-1], runs[1:], pairs):
        j, q = divmod(int(jl), m)
        Yk = W[k[s:e]] @ Vinv[point[k[s:e]]]  # (p, 9, 3)
        block = Yk.transpose(1, 0, 2).reshape(9, -1) @ W[l[s:e]].transpose(
            0, 2, 1
        ).reshape(-1, 9)
        S[j, :, q, :] -= block
        if j != q:
            S[q, :, j, :] -= block.T
    S[np.arange(m), :, np.arange(m), :] += Ud
    S = S.reshape(9 * m, 9 * m)
    Vg = np.einsum("nab,nb->na", Vinv, gp)
    rhs = -(gc - _sum_by(recon, "cam", np.einsum("kab,kb->ka", W, Vg[point])))
    return S, rhs.ravel(), (W, Vinv, gp, U, V, gc)


def _back_substitute(recon, W, Vinv, gp, dc):
    """dp_i = -V_i^-1 (g_i + sum_k W_k^T dc_j) over the observations k of point i."""
    Wt_dc = np.einsum("kab,ka->kb", W, dc.reshape(-1, 9)[recon.cam])
    return -np.einsum("nab,nb->na", Vinv, gp + _sum_by(recon, "point", Wt_dc))


def _check_determined(S, free_idx, names):
    """Refuse, before solving, a reduced system that the data leave singular."""
    Sf = S[np.ix_(free_idx, free_idx)]
    d = np.sqrt(np.abs(np.diag(Sf)))
    d[d == 0] = 1.0
    w, Q = np.linalg.eigh(Sf / d[:, None] / d[None, :])
    null = int(np.sum(w <= 1e-12 * w[-1]))
    if null:
        # the weight of each parameter in the null space (the diagonal of its
        # projector), which does not depend on the basis eigh picks for it
        k = int(np.argmax(np.sum(Q[:, :null] ** 2, axis=1)))
        raise ValueError(
            f"the observations do not determine {names[free_idx[k]]}: the reduced "
            f"camera system is singular in {null} direction(s) (scaled eigenvalues "
            f"below 1e-12 of the largest), and this parameter weighs most in them; "
            f"hold it fixed or add observations (a gauge direction left free shows "
            f"here too; default_gauge holds one)"
        )


def _weigh_blocks(r, A, B, rescale):
    """The blocks of the rescaled problem of eq. 6.49: each of the 2N residuals r and
    its row of A (N, 2, 9) and B (N, 2, 3) scaled by rescale(r) = (s_r, s_J)
    (robust._robust_hooks), so that the normal equations built from them are Triggs'
    (eq. 6.38). rescale None (the plain cost) leaves them as they are."""
    if rescale is None:
        return r, A, B
    s_r, s_J = rescale(r)
    s = s_J.reshape(-1, 2, 1)
    return s_r * r, s * A, s * B


def sparse_bundle_adjust(
    recon,
    state0=None,
    free=None,
    tol=1e-10,
    max_iter=100,
    lam0=1e-6,
    *,
    loss="linear",
    f_scale=1.0,
    weighting="triggs",
):
    """Levenberg-Marquardt bundle adjustment of Bundler's model with per-camera
    intrinsics (eqs. 6.46-6.48), W held as per-observation blocks.

    recon: a Reconstruction (derivlib.geometry.io) whose cam, point and u are the
    observations; state0 the start (default: the stored cameras and points); free
    (m, 9) the camera parameters (delta, t, f, k1, k2) that move (default:
    default_gauge). Every point moves. Before solving it raises ValueError when the
    observations do not index recon's cameras and points or are not finite, a
    camera has fewer residuals than free parameters, a point is seen by fewer than
    two distinct cameras, there are fewer residuals than unknowns, a point's block
    V_i is singular at the start, or the reduced camera system at the start is
    singular (a parameter the data cannot determine, such as a gauge direction left
    free, or k1 and k2 of a camera whose points all lie at one distance from the
    image centre, where only f rho is determined). Stops when
    the relative decrease of E or the relative step falls below tol; raises
    ConvergenceError after max_iter iterations.

    loss ('linear', 'huber' or 'cauchy') with the scale f_scale (pixels) minimises
    the robust cost E_rho of eq. 6.37 over the 2N residuals instead of E, by
    Triggs' corrected normal equations (weighting='triggs') or iteratively
    reweighted least squares ('irls') (eq. 6.38), as the plain normal equations of
    the rescaled problem of eq. 6.49; E_rho is twice the cost of
    scipy.optimize.least_squares with the same loss and f_scale. ValueError for an
    unknown loss or weighting, or an f_scale that is not finite and > 0. From a start
    where most residuals exceed f_scale, Triggs' curvature (clamped at eps there) can
    leave no step that lowers E_rho: then ConvergenceError (stuck), never a
    "converged" start; run weighting='irls' to a loose tol first, then 'triggs'.
    Returns (SparseBundleState, SparseBundleHistory)."""
    from scipy.linalg import cho_factor, cho_solve

    if state0 is None:
        state0 = SparseBundleState(recon.R, recon.t, recon.intrinsics, recon.X)
    state = state0.copy()
    m, n = recon.m, recon.n
    if (
        state.R.shape != (m, 3, 3)
        or state.t.shape != (m, 3)
        or state.intrinsics.shape != (m, 3)
        or state.X.shape != (3, n)
    ):
        raise ValueError(
            f"state0 must hold R ({m}, 3, 3), t ({m}, 3), intrinsics ({m}, 3) and X "
            f"(3, {n}), got {state.R.shape}, {state.t.shape}, "
            f"{state.intrinsics.shape} and {state.X.shape}"
        )
    for name in ("R", "t", "intrinsics", "X"):
        if not np.all(np.isfinite(getattr(state, name))):
            raise ValueError(f"state0.{name} must be finite")
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    _check_observations(recon)
    cost, rescale = _robust_hooks(loss, f_scale, weighting)
    free = default_gauge(state) if free is None else np.asarray(free, dtype=bool)
    if free.shape != (m, 9):
        raise ValueError(f"free must have shape ({m}, 9), got {free.shape}")
    _refuse_underdetermined(recon, free)
    free_idx = np.flatnonzero(free.ravel())
    names = [
        f"{q} of camera {j}"
        for j in range(m)
        for q in ["delta_x", "delta_y", "delta_z", "t_x", "t_y", "t_z", "f", "k1", "k2"]
    ]
    r, A, B = _sparse_blocks(recon, state)
    _refuse_singular_points(recon, B)
    E = cost(r)
    hist = SparseBundleHistory(cost=[E], damping=[])
    lam, nu = lam0, 2.0
    first = True
    for _ in range(max_iter):
        hist.damping.append(lam)
        rw, Aw, Bw = _weigh_blocks(r, A, B, rescale)
        while True:
            S, rhs, (W, Vinv, gp, U, V, gc) = reduced_camera_system(
                recon, Aw, Bw, rw, lam
            )
            if first:
                S0, *_ = reduced_camera_system(recon, A, B, r, 0.0)
                _check_determined(S0, free_idx, names)
                first = False
            dc = np.zeros(9 * m)
            Sf = S[np.ix_(free_idx, free_idx)]
            try:
                dc[free_idx] = cho_solve(cho_factor(Sf), rhs[free_idx])
            except np.linalg.LinAlgError:
                lam, nu = lam * nu, 2 * nu
                hist.n_rejected += 1
                continue
            dp = _back_substitute(recon, W, Vinv, gp, dc)
            d = dc.reshape(m, 9)
            trial = SparseBundleState(
                state.R @ _so3_exp_many(d[:, :3]),
                state.t + d[:, 3:6],
                state.intrinsics + d[:, 6:],
                state.X + dp.T,
            )
            # predicted decrease -(2 delta^T g + delta^T J^T J delta), from the blocks
            dcb, dpb = d, dp
            Wdp = np.einsum("kab,kb->ka", W, dpb[recon.point])
            dHd = (
                np.einsum("ma,mab,mb->", dcb, U, dcb)
                + 2 * np.einsum("ka,ka->", dcb[recon.cam], Wdp)
                + np.einsum("na,nab,nb->", dpb, V, dpb)
            )
            pred = -(2 * (np.sum(dcb * gc) + np.sum(dpb * gp)) + dHd)
            try:
                r_new = _sparse_residual(recon, trial)
                E_new = cost(r_new)
            except ValueError:  # a point went behind a camera: reject the step
                E_new = np.inf
            if E_new < E and pred > 0:
                rho = (E - E_new) / pred
                lam *= max(1 / 10, 1 - (2 * rho - 1) ** 3)
                nu = 2.0
                break
            hist.n_rejected += 1
            lam, nu = lam * nu, 2 * nu
            if lam > 1e16:
                if rescale is not None:  # a robust model that no damping fixes
                    raise ConvergenceError(
                        f"robust sparse bundle adjustment is stuck: no step lowered "
                        f"E_rho = {E:.6g} with the damping raised to {lam:.3g} (with "
                        f"weighting='triggs', residuals beyond f_scale have almost "
                        f"no curvature; try weighting='irls')"
                    )
                hist.converged = True
                return state, hist
        step = np.linalg.norm(dc) + np.linalg.norm(dp)
        size = np.linalg.norm(state.t) + np.linalg.norm(state.X) + 1.0
        state, r, E_old, E = trial, r_new, E, E_new
        hist.n_iter += 1
        hist.cost.append(E)
        if (E_old - E) <= tol * E_old or step <= tol * size:
            hist.converged = True
            return state, hist
        r, A, B = _sparse_blocks(recon, state)
    raise ConvergenceError(
        f"sparse bundle adjustment did not converge in {max_iter} iterations "
        f"(cost {E:.6g})"
    )
