"""Chapter 6, starting without a guess: linear (DLT) triangulation and a linear pose.

Both solve a homogeneous system A y = 0 in the least-squares sense (the right singular
vector of A for its smallest singular value), on data normalised first (Hartley): the
image points of each view, and the world points, moved to their centroid and scaled to
an average distance of sqrt(2) (images) or sqrt(3) (world), so that the entries of A
are of one size. The conventions are stated once, in derivlib/geometry/__init__.py."""

import numpy as np

from .._validate import as_float_array, require_finite
from .camera import _intrinsics, _points
from .lie import rodrigues, so3_log
from .solvers import DEGENERATE, _observations, _pose


def _similarity(P):
    """The Hartley normalisation of the columns of P (d, n): the (d + 1, d + 1) matrix
    T with T [p; 1] = [(p - c) s; 1], c the centroid, s = sqrt(d) / (mean distance to
    c), or s = 1 when every point is at c."""
    d = P.shape[0]
    c = P.mean(axis=1)
    dist = np.linalg.norm(P - c[:, None], axis=0).mean()
    s = np.sqrt(d) / dist if dist > 0 else 1.0
    T = np.eye(d + 1)
    T[:d, :d] *= s
    T[:d, d] = -s * c
    return T


def _calibrated(u, K):
    """K^{-1} [u; 1], the image points as directions in the camera frame (3, n)."""
    return np.linalg.solve(K, np.vstack([u, np.ones(u.shape[1])]))


def _null_vector(A):
    """The unit y minimising |A y| (the last right singular vector), batched."""
    return np.linalg.svd(A)[2][..., -1, :]


def dlt_pose(X, K, u):
    """A pose xi = (w, t) from n >= 6 world points X (3, n), not coplanar, and their
    images u (2, n) by the camera K, without a start (eq. 6.39): the 3 x 4 matrix P
    with [x_i]x P [X_i; 1] = 0 for the calibrated images x_i = K^{-1} [u_i; 1], by
    SVD on Hartley-normalised data, then its rotation part projected onto SO(3) (the
    nearest rotation, U V^T), and t with the same scale. Exact on exact data; a start
    for `solve_pnp` on noisy data.

    Raises ValueError for fewer than 6 points, or points on one plane (their centred
    coordinates have a singular value below 1e-9 of the largest): then P is not
    determined (the points and the camera centre admit a family of solutions)."""
    X, _ = _points(X, "X")
    K = _intrinsics(K)
    n = X.shape[1]
    u = _observations(u, n)
    if n < 6:
        raise ValueError(
            f"the DLT pose needs at least 6 points (11 unknowns of P, two equations a "
            f"point), got X with {n} point(s)"
        )
    s = np.linalg.svd(X - X.mean(axis=1, keepdims=True), compute_uv=False)
    if s[2] <= DEGENERATE * s[0]:
        raise ValueError(
            f"the DLT pose is degenerate for coplanar points: the {n} points X lie on "
            f"one plane (singular values of the centred points {s[0]:.3g}, {s[1]:.3g}, "
            f"{s[2]:.3g}); use a planar (homography) method or pass xi0 to solve_pnp"
        )
    x = _calibrated(u, K)
    x = x[:2] / x[2]
    T2, T3 = _similarity(x), _similarity(X)
    xn = T2[:2, :2] @ x + T2[:2, 2:]
    Xn = np.vstack([T3[:3, :3] @ X + T3[:3, 3:], np.ones(n)])  # (4, n)
    A = np.zeros((2 * n, 12))
    A[0::2, 0:4] = Xn.T
    A[0::2, 8:12] = -xn[0][:, None] * Xn.T
    A[1::2, 4:8] = Xn.T
    A[1::2, 8:12] = -xn[1][:, None] * Xn.T
    P = np.linalg.solve(T2, _null_vector(A).reshape(3, 4) @ T3)  # undo both
    if np.linalg.det(P[:, :3]) < 0:
        P = -P
    U, sv, Vt = np.linalg.svd(P[:, :3])
    R = U @ Vt  # det(U V^T) = sign det P[:, :3] = +1
    t = P[:, 3] / sv.mean()
    return np.concatenate([so3_log(R), t])


def triangulate(xis, K, u):
    """World points X (3, n) from their images in m >= 2 views (eq. 6.39): xis (m, 6)
    the poses (w, t) of the views, K (3, 3) their common camera, u (m, 2, n) the images
    of the n points in each view. Each point is the null vector of the (2m, 4) system
    [x_ij]x P_j [X_i; 1] = 0, P_j = [R_j | t_j], on Hartley-normalised data.

    Raises ValueError when the camera centres -R_j^T t_j coincide (to 1e-9 of their
    size: no baseline, so no depth), and for a point whose rays are parallel (its
    homogeneous solution at infinity)."""
    xis = as_float_array(xis, "xis", ndims=2)
    if xis.shape[0] < 2 or xis.shape[1] != 6:
        raise ValueError(
            f"xis must hold m >= 2 poses (w, t), shape (m, 6), got shape {xis.shape}"
        )
    require_finite(xis, "xis")
    K = _intrinsics(K)
    m = xis.shape[0]
    u = as_float_array(u, "u", ndims=3)
    if u.shape[:2] != (m, 2):
        raise ValueError(
            f"u must have shape ({m}, 2, n) (the images of n points in each of the {m} "
            f"views), got shape {u.shape}"
        )
    require_finite(u, "u")
    n = u.shape[2]
    Rs = np.stack([rodrigues(_pose(xi, "xis[j]")[:3]) for xi in xis])
    C = -np.einsum("jba,jb->ja", Rs, xis[:, 3:])  # camera centres, (m, 3)
    base = np.linalg.norm(C - C.mean(axis=0), axis=1).max()
    if base <= DEGENERATE * (1.0 + np.abs(C).max()):
        raise ValueError(
            f"triangulation is degenerate: the {m} camera centres coincide (largest "
            f"distance to their mean {base:.3g}), so the depth of a point is not "
            f"determined"
        )
    # World normalisation: centre and scale by the camera centres, X = H Xn.
    c, s = C.mean(axis=0), base
    H = np.eye(4)
    H[:3, :3] *= s
    H[:3, 3] = c
    A = np.zeros((n, 2 * m, 4))
    for j in range(m):
        x = _calibrated(u[j], K)
        x = x[:2] / x[2]
        T = _similarity(x)
        xn = T[:2, :2] @ x + T[:2, 2:]
        P = T @ np.hstack([Rs[j], xis[j, 3:, None]]) @ H
        A[:, 2 * j] = xn[0][:, None] * P[2] - P[0]
        A[:, 2 * j + 1] = xn[1][:, None] * P[2] - P[1]
    Y = _null_vector(A / np.linalg.norm(A, axis=2, keepdims=True))  # (n, 4)
    far = np.abs(Y[:, 3]) <= DEGENERATE * np.linalg.norm(Y[:, :3], axis=1)
    if far.any():
        i = int(np.flatnonzero(far)[0])
        raise ValueError(
            f"triangulation is degenerate for {int(far.sum())} point(s): their rays "
            f"are parallel (the solution is at infinity), first at column {i}"
        )
    return H[:3, :3] @ (Y[:, :3] / Y[:, 3:]).T + H[:3, 3:]
