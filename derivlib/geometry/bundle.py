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


def _ba_right_blocks(problem, x):
    """The Jacobian blocks for the update of `bundle_adjust`, R_j Exp(delta_j) and
    t_j + dt_j (eq. 6.36): A_k = J_pi [-R_j [X_i]x | I] (N, 2, 6), (6.18) without
    J_r, and B_k = J_pi R_j (N, 2, 3). With B_k from ba_jacobian_blocks, each row b
    of J_pi R_j gives b^T [X_i]x = (b x X_i)^T."""
    A, B = ba_jacobian_blocks(problem, x)
    X = x[6 * problem.m :].reshape(problem.n, 3)
    A[:, :, :3] = -np.cross(B, X[problem.point][:, None, :])
    return A, B


def _pose_update(problem, x, delta):
    """x after the step delta: R(w_j) Exp(delta_w) stored as its logarithm (|w| <=
    pi, eq. 6.31) for each camera whose rotation moves, t + delta_t, X + delta_X."""
    from .lie import so3_log

    m = problem.m
    out = x + delta
    D = delta[: 6 * m].reshape(m, 6)[:, :3]
    moving = np.flatnonzero(np.any(D != 0, axis=1))
    w = x[: 6 * m].reshape(m, 6)[moving, :3]
    R = _so3_exp_many(w) @ _so3_exp_many(D[moving])
    out[6 * moving[:, None] + np.arange(3)] = [so3_log(Rj) for Rj in R]
    return out


def bundle_adjust(problem, x0, tol=1e-12, max_iter=200, lam0=1e-6, check_gauge=True):
    """Levenberg-Marquardt for bundle adjustment with the Schur complement (eqs.
    6.18-6.21), each rotation updated on the right, R_j Exp(delta_j) (eq. 6.36).

    Damps the normal equations by lam diag(J^T J), eliminates the points with W kept
    as one block per observation (as `reduced_camera_system` does), and holds the
    pose parameters outside problem.free at their values in x0 (the gauge); a
    camera's rotation is held whole or not at all. The rotation vectors of x are
    logarithms of the updated rotations (|w| <= pi) once they move. Stops, and
    raises ConvergenceError, as `solve_least_squares` does: after the step that
    lowered E by at most tol * E. Unlike `sparse_bundle_adjust` it does not stop
    early on a predicted decrease: the step that reaches the tolerance is taken, for
    an x as close to the minimum as the cost can tell (Chapter 8 differentiates
    through x by re-solves). The test on an accepted step counts only for a step
    taken at a damping of at most 1 (_TRUSTED_DAMPING). With check_gauge (the
    default) it first raises ValueError if the fixed parameters leave a gauge
    direction free at x0 (gauge_is_fixed), as the default `fixed` does when camera
    1's centre is straight ahead of or behind camera 0 as seen from camera 1
    (forward motion); pass check_gauge=False to run without a fixed gauge on
    purpose. Before solving it also raises ValueError when x0 is not finite, a
    camera has fewer residuals than free pose parameters, a point is seen by fewer
    than two cameras, there are fewer residuals than unknowns, or a point's 3 x 3
    block V_i is singular at x0 (its cameras see it along one ray). Returns (x,
    LeastSquaresHistory)."""
    _solver_options(tol, max_iter, lam0)
    x = require_finite(as_float_array(x0, "x0", ndims=1).copy(), "x0")
    problem.unpack(x)
    _refuse_degenerate_bundle(problem)
    rot_free = problem.free.reshape(problem.m, 6)[:, :3].sum(axis=1)
    partial = np.flatnonzero((rot_free > 0) & (rot_free < 3))
    if partial.size:
        raise ValueError(
            f"bundle_adjust updates each rotation on the right, R Exp(delta), so a "
            f"camera's rotation is held whole or not at all; camera {partial[0]} has "
            f"{rot_free[partial[0]]} of its 3 rotation parameters free"
        )
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
    A, B = _ba_right_blocks(problem, x)
    _refuse_singular_points(problem, B)
    free_idx = np.flatnonzero(problem.free)
    hist = LeastSquaresHistory(n_residual=1)
    r = ba_residual(problem, x)
    E = float(r @ r)
    lam, nu = lam0, 2.0
    hist.cost.append(E)
    for it in range(max_iter):
        if it:
            A, B = _ba_right_blocks(problem, x)
        hist.n_jacobian += 1
        hist.damping.append(lam)
        blocks = _camera_blocks(problem, A, B, r)
        WT, U, V, gc, gp = blocks
        dU, dV = np.einsum("mii->mi", U).ravel(), np.einsum("nii->ni", V).ravel()
        predicted, damping = [], []

        def trial(lam):
            S, rhs, Vinv = _reduce(problem, blocks, lam)
            dc = np.zeros(6 * problem.m)
            try:
                dc[free_idx] = np.linalg.solve(
                    S[np.ix_(free_idx, free_idx)], rhs[free_idx]
                )
            except np.linalg.LinAlgError:
                raise ValueError(
                    "the reduced camera system S = U - W V^-1 W^T is singular on the "
                    "free pose parameters: the observations do not determine them (a "
                    "gauge direction left free, or a camera with too few "
                    "observations)"
                ) from None
            dp = _back_substitute(problem, WT.transpose(0, 2, 1), Vinv, gp, dc).ravel()
            # the step solves (J^T J + lam D) delta = -g on the free parameters, so
            # E - ||r + J delta||^2 = -delta^T g + lam delta^T D delta
            pred = -(dc @ gc.ravel() + dp @ gp.ravel()) + lam * (
                dU @ (dc * dc) + dV @ (dp * dp)
            )
            predicted.append(float(pred))
            damping.append(lam)
            return np.concatenate([dc, dp]), predicted[-1]

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
            lambda y, d: _pose_update(problem, y, d),
        )
        hist.n_iter += 1
        trusted = damping[-1] <= _TRUSTED_DAMPING
        if stationary:
            hist.cost.append(E)
            hist.converged = True
            return x, hist
        short = np.linalg.norm(delta) <= tol * (np.linalg.norm(x) + tol)
        x, r, E = _pose_update(problem, x, delta), r_new, E_new
        hist.cost.append(E)
        if trusted and (short or _settled(hist.cost, tol, False)):
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
    """Exp([delta]x) for each row of D (m, 3), by Rodrigues' formula (eq. 6.5) with
    the coefficients of lie.rotation_coefficients (Taylor series below its
    SMALL_ANGLE, 2 sin^2(t / 2) above), all rows at once."""
    from .lie import MAX_ROTATION_VECTOR, SMALL_ANGLE

    D = np.asarray(D, dtype=np.float64)
    if D.size and not (
        np.all(np.isfinite(D)) and np.abs(D).max() <= MAX_ROTATION_VECTOR
    ):
        return np.stack([rodrigues(d) for d in D])  # its ValueError names the fault
    t2 = np.einsum("ij,ij->i", D, D)
    t = np.sqrt(t2)
    small = t < SMALL_ANGLE
    ts = np.where(small, 1.0, t)
    a = np.where(
        small, 1.0 - t2 / 6.0 * (1.0 - t2 / 20.0 * (1.0 - t2 / 42.0)), np.sin(ts) / ts
    )
    b = np.where(
        small,
        0.5 - t2 / 24.0 * (1.0 - t2 / 30.0 * (1.0 - t2 / 56.0)),
        2.0 * (np.sin(0.5 * ts) / ts) ** 2,
    )
    W = _hat_many(D.T)
    return np.eye(3) + a[:, None, None] * W + b[:, None, None] * (W @ W)


def _sparse_residual(recon, state):
    """The residuals alone (eqs. 6.40-6.41), without the Jacobian blocks."""
    return _sparse_images(recon, state)[-1].ravel(order="F")


def _sparse_images(recon, state):
    """Bundler's model at every observation (eqs. 6.40-6.41): the points X (3, N),
    their camera-frame coordinates P (3, N), p = P_xy / -P_z, s = |p|^2, the
    intrinsics f, k1, k2 (N,) each, rho = 1 + k1 s + k2 s^2, and the residuals u
    (2, N). Raises ValueError if a point is not in front of a camera that sees it."""
    from .bundler import _behind

    cam = recon.cam
    X = state.X[:, recon.point]
    P = np.einsum("kab,bk->ak", state.R[cam], X)
    P += state.t[cam].T
    _behind(P[2])
    p = P[:2] / -P[2]
    s = p[0] * p[0] + p[1] * p[1]
    f, k1, k2 = state.intrinsics[cam].T
    rho = 1 + s * (k1 + k2 * s)
    u = (f * rho) * p
    u -= recon.u
    return X, P, p, s, (f, k1, k2), rho, u


def bundler_residual(recon, state):
    """The reprojection residuals u_k - u_bar_k of every observation of recon under
    Bundler's model (eqs. 6.40-6.41, 6.46) at state (a SparseBundleState), (2N,),
    x and y of each observation together. Raises ValueError if a point is not in
    front of a camera that sees it."""
    return _sparse_residual(recon, state)


def _sparse_blocks(recon, state):
    """The residuals r (2N,) and the Jacobian blocks of every observation,
    [A_k | C_k] (N, 2, 9) and B_k (N, 2, 3) (eq. 6.45), written out entry by entry
    (bundler._blocks is the same formula through small matrix products; the tests
    hold the two together): with c = -f / P_z, du/dP = c [rho I + g p p^T | (rho +
    g s) p], g = 2 (k1 + 2 k2 s); B = du/dP R; the rotation block's row a is
    -(B_a x X)^T; C = p [rho, f s, f s^2]. The rotations are applied camera by
    camera over contiguous slices when the observations are sorted by camera."""
    cam, N = recon.cam, recon.cam.size
    X, P, p, s, (f, k1, k2), rho, u = _sparse_images(recon, state)
    g = 2 * (k1 + 2 * k2 * s)
    c = f / -P[2]
    A = np.empty((N, 2, 9))
    JP = A[:, :, 3:6]  # du/dP, the translation block
    gp = g * p
    for a in range(2):
        JP[:, a, 0] = c * gp[a] * p[0]
        JP[:, a, 1] = c * gp[a] * p[1]
        JP[:, a, a] += c * rho
        JP[:, a, 2] = c * (rho + g * s) * p[a]
    B = np.matmul(JP, state.R[cam])
    for a in range(2):  # -(B_a x X): the rotation block
        b0, b1, b2 = B[:, a, 0], B[:, a, 1], B[:, a, 2]
        A[:, a, 0] = X[1] * b2 - X[2] * b1
        A[:, a, 1] = X[2] * b0 - X[0] * b2
        A[:, a, 2] = X[0] * b1 - X[1] * b0
        A[:, a, 6] = rho * p[a]
        A[:, a, 7] = f * s * p[a]
        A[:, a, 8] = A[:, a, 7] * s
    return u.ravel(order="F"), A, B


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
    M = V / d[:, :, None] / d[:, None, :]
    # fast path: M has a unit diagonal, so its eigenvalues sum to at most 3 and the
    # two largest multiply to at most 9 / 4: det(M) > 27 / 4 * 1e-12 proves the
    # smallest above 1e-12 times the largest; the rest go to eigvalsh
    det = (
        M[:, 0, 0] * (M[:, 1, 1] * M[:, 2, 2] - M[:, 1, 2] * M[:, 2, 1])
        - M[:, 0, 1] * (M[:, 1, 0] * M[:, 2, 2] - M[:, 1, 2] * M[:, 2, 0])
        + M[:, 0, 2] * (M[:, 1, 0] * M[:, 2, 1] - M[:, 1, 1] * M[:, 2, 0])
    )
    bad = np.flatnonzero(~(det > 6.75e-12))
    if bad.size:
        w = np.linalg.eigvalsh(M[bad])
        bad = bad[w[:, 0] <= 1e-12 * w[:, -1]]
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
    """The pairs (k, l), k != l, of observations of the same point whose cameras
    have cam[k] <= cam[l] (both orders when one camera sees a point twice), sorted
    by camera pair, and where each camera pair's run starts: (k (P,), l (P,), run
    starts (R + 1,), the camera pair j * m + l of each run (R,)). The pairs k = l
    are the diagonal blocks, summed camera by camera. Cached on recon."""
    cache = recon.__dict__.setdefault("_pairs", {})
    if "kl" not in cache:
        cam, m = recon.cam, recon.m
        order = np.argsort(recon.point, kind="stable")
        c = np.bincount(recon.point, minlength=recon.n)
        starts = np.concatenate([[0], np.cumsum(c)[:-1]])
        c2 = c * c
        first = np.concatenate([[0], np.cumsum(c2)[:-1]])
        pt = np.repeat(np.arange(recon.n), c2)
        q = np.arange(c2.sum()) - first[pt]
        cp = c[pt]
        a, b = q // cp, q % cp
        keep = a != b
        k = order[starts[pt[keep]] + a[keep]]
        l = order[starts[pt[keep]] + b[keep]]
        keep = cam[k] <= cam[l]
        k, l = k[keep], l[keep]
        jl = cam[k] * m + cam[l]
        by = np.argsort(jl, kind="stable")
        k, l, jl = k[by], l[by], jl[by]
        runs = np.flatnonzero(np.diff(jl, prepend=-1))
        cache["kl"] = (k, l, np.append(runs, k.size), jl[runs])
    return cache["kl"]


def _by_camera(recon):
    """The observations of each camera: (order (N,), starts (m + 1,)), order None
    when recon's observations are already sorted by camera. Cached."""
    cache = recon.__dict__.setdefault("_pairs", {})
    if "cam" not in cache:
        cam = recon.cam
        if cam.size < 2 or np.all(cam[1:] >= cam[:-1]):
            cache["cam"] = (None, np.searchsorted(cam, np.arange(recon.m + 1)))
        else:
            order = np.argsort(cam, kind="stable")
            cache["cam"] = (
                order,
                np.searchsorted(cam[order], np.arange(recon.m + 1)),
            )
    return cache["cam"]


def _sorted_by_camera(recon):
    """recon with its observations reordered camera by camera (the same cameras,
    points and observations: only the order of the sum E changes), so that each
    camera's blocks are one contiguous slice."""
    from dataclasses import is_dataclass, replace

    cam = np.asarray(recon.cam)
    if cam.size < 2 or np.all(cam[1:] >= cam[:-1]) or not is_dataclass(recon):
        return recon  # (any other object is solved in its own order)
    order = np.argsort(cam, kind="stable")
    return replace(
        recon,
        cam=cam[order],
        point=np.asarray(recon.point)[order],
        u=np.asarray(recon.u)[:, order],
    )


def _inv3(V, what="V"):
    """The inverses of n symmetric positive definite 3 x 3 blocks V (n, 3, 3), by
    cofactors after scaling each to a unit diagonal (the scaled block's
    determinant tells a singular one). Raises ValueError naming the first block
    that is singular to rounding."""
    d = np.sqrt(np.einsum("nii->ni", V))
    with np.errstate(divide="ignore"):
        s = np.where(d > 0, 1.0 / d, 0.0)
    M = V * s[:, :, None] * s[:, None, :]
    a, b, c = M[:, 0, 0], M[:, 0, 1], M[:, 0, 2]
    e, f, i = M[:, 1, 1], M[:, 1, 2], M[:, 2, 2]
    C = np.empty_like(M)
    C[:, 0, 0] = e * i - f * f
    C[:, 0, 1] = C[:, 1, 0] = c * f - b * i
    C[:, 0, 2] = C[:, 2, 0] = b * f - c * e
    C[:, 1, 1] = a * i - c * c
    C[:, 1, 2] = C[:, 2, 1] = b * c - a * f
    C[:, 2, 2] = a * e - b * b
    det = a * C[:, 0, 0] + b * C[:, 1, 0] + c * C[:, 2, 0]
    bad = ~(det > 1e-13)  # NaN too
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"the 3 x 3 block {what}_{i} of point {i} is singular: its observations "
            f"do not determine it (fewer than two cameras, or all along one ray)"
        )
    C /= det[:, None, None]
    return C * s[:, :, None] * s[:, None, :]


# OpenBLAS runs a product M x K times K x N on one thread when M N K <= 262144 and
# wakes every thread above; a 9 x K by K x 9 product gains nothing from a second
# thread (it only synchronises), so the long products are summed in slices of K
_GRAM_ROWS = 3000


def _gram(X, Y):
    """X^T Y for X (K, 9) and Y (K, 9), summed over slices of K rows, each small
    enough to stay on one BLAS thread."""
    out = X[:_GRAM_ROWS].T @ Y[:_GRAM_ROWS]
    for s in range(_GRAM_ROWS, X.shape[0], _GRAM_ROWS):
        out += X[s : s + _GRAM_ROWS].T @ Y[s : s + _GRAM_ROWS]
    return out


# pairs of observations per chunk of the reduced camera system: bounds the memory
# of the gathered blocks (2 x 27 numbers a pair) whatever the problem's size
_PAIR_CHUNK = 1 << 12


def _camera_blocks(recon, A, B, r):
    """What the reduced camera system needs that does not depend on the damping:
    WT_k = W_k^T = B_k^T A_k (N, 3, 9), U_j (m, 9, 9), V_i (n, 3, 3), g_c (m, 9)
    and g_p (n, 3), as batched products over the N observations; U_j and g_c are
    one product per camera of
    its contiguous (2 N_j, 9) stack when the observations are sorted by camera."""
    m, c = recon.m, A.shape[2]
    r2 = r.reshape(-1, 2)
    Bt = np.ascontiguousarray(B.transpose(0, 2, 1))
    WT = Bt @ A
    V = _sum_by(recon, "point", Bt @ B)
    gp = _sum_by(recon, "point", (Bt @ r2[:, :, None])[:, :, 0])
    del Bt
    order, cstart = _by_camera(recon)
    U = np.empty((m, c, c))
    gc = np.empty((m, c))
    for j in range(m):  # U_j = A_j^T A_j with A_j the (2 N_j, 9) stack of camera j
        sl = slice(cstart[j], cstart[j + 1])
        idx = sl if order is None else order[sl]
        Aj = A[idx].reshape(-1, c)
        U[j] = _gram(Aj, Aj)
        gc[j] = Aj.T @ r2[idx].ravel()
    return WT, U, V, gc, gp


def _reduce(recon, blocks, lam):
    """S and rhs of eq. 6.47 at the damping lam from _camera_blocks' output, and
    Vinv (n, 3, 3), through YT_k = V_i^-1 W_k^T (N, 3, c) for camera blocks of width
    c (9, or 6 for bundle_adjust's poses). The diagonal blocks S_jj are one product
    per camera over its observations; the blocks S_jl, j < l, one product
    (c, 3p) @ (3p, c) per camera pair over the p points both see, on blocks gathered
    in chunks of whole camera pairs, at most _PAIR_CHUNK pairs each unless one
    camera pair alone has more (then that pair is one chunk)."""
    WT, U, V, gc, gp = blocks
    m, point, c = recon.m, recon.point, U.shape[1]
    Vd = V + lam * np.einsum("nii->ni", V)[:, :, None] * np.eye(3)
    Vinv = _inv3(Vd, "V")
    YT = Vinv[point] @ WT
    order, cstart = _by_camera(recon)
    S = np.zeros((m, c, m, c))
    diag = np.einsum("mii->mi", U)
    for j in range(m):
        sl = slice(cstart[j], cstart[j + 1])
        idx = sl if order is None else order[sl]
        S[j, :, j, :] = U[j] - _gram(YT[idx].reshape(-1, c), WT[idx].reshape(-1, c))
        S[j, np.arange(c), j, np.arange(c)] += lam * diag[j]
    k, l, runs, pairs = _point_pairs(recon)
    r0 = 0
    while r0 < pairs.size:  # chunks of whole runs, about _PAIR_CHUNK pairs each
        r1 = max(
            int(np.searchsorted(runs, runs[r0] + _PAIR_CHUNK, "right")) - 1, r0 + 1
        )
        s0, s1 = runs[r0], runs[r1]
        Yk = np.take(YT.reshape(YT.shape[0], -1), k[s0:s1], axis=0).reshape(-1, c)
        Wl = np.take(WT.reshape(WT.shape[0], -1), l[s0:s1], axis=0).reshape(-1, c)
        for s, e, jl in zip(runs[r0:r1] - s0, runs[r0 + 1 : r1 + 1] - s0, pairs[r0:r1]):
            j, q = divmod(int(jl), m)
            block = _gram(Yk[3 * s : 3 * e], Wl[3 * s : 3 * e])
            S[j, :, q, :] -= block
            if j != q:
                S[q, :, j, :] -= block.T
        r0 = r1
    S = S.reshape(c * m, c * m)
    rhs = -(gc - _sum_by(recon, "cam", np.einsum("kab,ka->kb", YT, gp[point])))
    return S, rhs.ravel(), Vinv


def reduced_camera_system(recon, A, B, r, lam=0.0):
    """The reduced camera system of eq. 6.47 from the per-observation blocks, without
    a dense W: A (N, 2, 9) and B (N, 2, 3) the Jacobian blocks of each observation,
    r (2N,) the residuals, lam the Levenberg-Marquardt damping (the diagonals of U
    and V scaled by 1 + lam). W_k = A_k^T B_k is kept as N blocks; the point blocks
    V_i (n, 3, 3) are inverted in closed form, and S = U - sum_i W_i V_i^-1 W_i^T is
    summed camera by camera for its diagonal blocks and camera pair by camera pair
    (j < l) for the others, over the points both see, as one matrix product
    (9, 3p) @ (3p, 9) per pair; S is symmetric, so the pairs j > l are its
    transpose. Memory grows with the number of observations N (for tracks of
    bounded length) and with (9m)^2 for S itself.

    Returns S (9m, 9m), rhs (9m,), and the pieces the back-substitution needs:
    (W (N, 9, 3), Vinv (n, 3, 3), g_p (n, 3), the undamped U (m, 9, 9), V (n, 3, 3),
    g_c (m, 9))."""
    N = recon.cam.size
    A, B, r = np.asarray(A), np.asarray(B), np.asarray(r)
    if A.shape != (N, 2, 9) or B.shape != (N, 2, 3) or r.shape != (2 * N,):
        raise ValueError(
            f"A, B and r must have shapes ({N}, 2, 9), ({N}, 2, 3) and ({2 * N},) for "
            f"{N} observations, got {A.shape}, {B.shape} and {r.shape}"
        )
    blocks = _camera_blocks(recon, A, B, r)
    WT, U, V, gc, gp = blocks
    S, rhs, Vinv = _reduce(recon, blocks, lam)
    return S, rhs, (WT.transpose(0, 2, 1), Vinv, gp, U, V, gc)


def _back_substitute(recon, W, Vinv, gp, dc):
    """dp_i = -V_i^-1 (g_i + sum_k W_k^T dc_j) over the observations k of point i."""
    Wt_dc = np.einsum("kab,ka->kb", W, dc.reshape(-1, W.shape[1])[recon.cam])
    return -np.einsum("nab,nb->na", Vinv, gp + _sum_by(recon, "point", Wt_dc))


# A stop on a small decrease or a short step is trusted only for a step taken at a
# Marquardt damping lam <= 1 (lam diag(J^T J) at most the curvature itself): a more
# heavily damped step is short because of the damping, and a crawl, for example of
# Triggs' equations far from the minimum (robust costs, eq. 6.38), would otherwise
# stop there and be called converged. Every converged bundle adjustment of the
# chapter ends with lam below 1e-3.
_TRUSTED_DAMPING = 1.0


def _settled(cost, tol, clean):
    """The stopping rule on the costs E_0, ..., E_k of the accepted iterates: the
    last decrease d_k = E_(k-1) - E_k is at most tol * E_k, or, after a step taken
    at its first trial (`clean`) and three decreases that shrink, d_(k-2) > d_(k-1)
    > d_k, the decrease still to come, estimated as a geometric series with the
    larger of the last two ratios q, d_k q / (1 - q), is. Near the minimum
    Gauss-Newton's decreases shrink by a steady factor (a few hundredths in the
    chapter's problems), so the second test stops one iteration earlier than the
    first, without an iteration spent only to see a negligible decrease. A single
    sudden drop, as in a crawl whose decreases jump about, is not a steady factor:
    estimated from the last ratio alone, it stopped the crawl of plain least squares
    on the chapter's corrupted Balbianello at a cost 1.7e-8 relative above where the
    first test stops. Neither test knows why the decrease is small: a step shortened
    by a large damping decreases little far from the minimum too, so the solvers
    trust them only for a step taken at a damping of at most _TRUSTED_DAMPING."""
    E = cost[-1]
    d = cost[-2] - E
    if d <= tol * E:
        return True
    if not clean or len(cost) < 4:
        return False
    d1, d2 = cost[-3] - cost[-2], cost[-4] - cost[-3]
    if not d < d1 < d2:
        return False
    q = max(d / d1, d1 / d2)
    return d * q <= tol * E * (1 - q)


def _check_determined(S, free_idx, names):
    """Refuse, before solving, a reduced system that the data leave singular."""
    from scipy.linalg import LinAlgError, cho_factor
    from scipy.linalg.lapack import dpocon

    Sf = S[np.ix_(free_idx, free_idx)]
    d = np.sqrt(np.abs(np.diag(Sf)))
    d[d == 0] = 1.0
    Ss = Sf / d[:, None] / d[None, :]
    # fast path: a Cholesky factor whose reciprocal condition number (1-norm
    # estimate, within a factor n of the 2-norm one) is above n * 1e-12 proves that
    # no scaled eigenvalue is below 1e-12 of the largest; otherwise decide by eigh
    try:
        c, _ = cho_factor(Ss, lower=False, check_finite=False)
        rcond, info = dpocon(c, np.abs(Ss).sum(axis=0).max())
        if info == 0 and rcond > Ss.shape[0] * 1e-12:
            return
    except LinAlgError:
        pass
    w, Q = np.linalg.eigh(Ss)
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
    image centre, where only f rho is determined). Stops, converged, after a step
    taken at a damping of at most 1 (_TRUSTED_DAMPING) when the decrease of E, or
    the decrease still to come estimated as a geometric series from three
    shrinking decreases (_settled), is at most tol * E, or the step is below tol
    relative; raises
    ConvergenceError after max_iter iterations (a crawl at a larger damping too).

    loss ('linear', 'huber' or 'cauchy') with the scale f_scale (pixels) minimises
    the robust cost E_rho of eq. 6.37 over the 2N residuals instead of E, by
    Triggs' corrected normal equations (weighting='triggs') or iteratively
    reweighted least squares ('irls') (eq. 6.38), as the plain normal equations of
    the rescaled problem of eq. 6.49; E_rho is twice the cost of
    scipy.optimize.least_squares with the same loss and f_scale. ValueError for an
    unknown loss or weighting, or an f_scale that is not finite and > 0. From a start
    where most residuals exceed f_scale, Triggs' curvature (clamped at eps there)
    leaves a step that lowers E_rho only at a damping of order 1 / eps: then
    ConvergenceError (stuck, or a crawl that does not converge), never a
    "converged" start; run weighting='irls' to a loose tol first, then 'triggs'.
    Returns (SparseBundleState, SparseBundleHistory)."""

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
    _solver_options(tol, max_iter, lam0)
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
    with _one_blas_thread(free_idx.size):
        return _sparse_lm(
            recon, state, free_idx, names, tol, max_iter, lam0, cost, rescale
        )


# Above this many free camera parameters S is left to the BLAS's threads; below, its
# Cholesky factor takes milliseconds and every product in an iteration is small, so a
# second thread only synchronises (and on a busy machine waits for its core)
_THREADED_SIZE = 2000


def _one_blas_thread(size):
    """A context that runs the BLAS on one thread (`derivlib._threads`) while solving a
    system of `size` free camera parameters between 64 (below which OpenBLAS factors on
    one thread anyway) and _THREADED_SIZE; outside that range it changes nothing."""
    from contextlib import nullcontext

    from .._threads import one_blas_thread

    if not 64 <= size <= _THREADED_SIZE:
        return nullcontext()
    return one_blas_thread()


def _sparse_lm(recon, state, free_idx, names, tol, max_iter, lam0, cost, rescale):
    """sparse_bundle_adjust's iterations, after its checks."""
    from scipy.linalg import cho_factor, cho_solve

    m = recon.m
    recon = _sorted_by_camera(recon)
    r, A, B = _sparse_blocks(recon, state)
    _refuse_singular_points(recon, B)
    E = cost(r)
    hist = SparseBundleHistory(cost=[E], damping=[])
    lam, nu = lam0, 2.0
    first = True
    for _ in range(max_iter):
        hist.damping.append(lam)
        rejected_before = hist.n_rejected
        rw, Aw, Bw = _weigh_blocks(r, A, B, rescale)
        blocks = _camera_blocks(recon, Aw, Bw, rw)
        if first:  # one validation per solve, on the undamped, unweighted system
            plain = blocks if rescale is None else _camera_blocks(recon, A, B, r)
            _check_determined(_reduce(recon, plain, 0.0)[0], free_idx, names)
            del plain
            first = False
        del A, B, Aw, Bw  # the blocks hold what the iteration needs: keep the peak low
        WT, U, V, gc, gp = blocks
        W = WT.transpose(0, 2, 1)
        while True:
            S, rhs, Vinv = _reduce(recon, blocks, lam)
            dc = np.zeros(9 * m)
            Sf = S[np.ix_(free_idx, free_idx)]
            try:
                dc[free_idx] = cho_solve(
                    cho_factor(Sf, check_finite=False), rhs[free_idx]
                )
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
            # predicted decrease -(2 delta^T g + delta^T J^T J delta); the step
            # solves (J^T J + lam D) delta = -g on the free parameters (and is 0 on
            # the others), so delta^T J^T J delta = -delta^T g - lam delta^T D delta
            # with D the diagonals of U and V
            pred = -(np.sum(d * gc) + np.sum(dp * gp)) + lam * (
                np.sum(np.einsum("mii->mi", U) * d * d)
                + np.sum(np.einsum("nii->ni", V) * dp * dp)
            )
            try:
                r_new = _sparse_residual(recon, trial)
                E_new = cost(r_new)
            except ValueError:  # a point went behind a camera: reject the step
                E_new = np.inf
            if E_new < E and pred > 0:
                taken = lam  # the damping of the step taken
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
        state, r, E = trial, r_new, E_new
        hist.n_iter += 1
        hist.cost.append(E)
        if taken <= _TRUSTED_DAMPING and (
            _settled(hist.cost, tol, rejected_before == hist.n_rejected)
            or step <= tol * size
        ):
            hist.converged = True
            return state, hist
        del blocks, WT, W
        r, A, B = _sparse_blocks(recon, state)
    raise ConvergenceError(
        f"sparse bundle adjustment did not converge in {max_iter} iterations "
        f"(cost {E:.6g})"
    )
