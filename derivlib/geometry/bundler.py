"""Chapter 6, Bundler's camera model with radial distortion and its Jacobians
(eqs. 6.40-6.45).

A camera is a rotation R, a translation t and the intrinsics (f, k1, k2). A world
point X goes to the camera frame, P = R X + t; the camera looks down -z, so the
normalised image point is p = -P_xy / P_z (eq. 6.40); the radial factor is
rho = 1 + k1 |p|^2 + k2 |p|^4 and the image point u = f rho p (eq. 6.41), measured
from the image centre with x to the right and y up. Poses are perturbed on the
right, R Exp(delta), and a pose tangent is (delta, dt), rotation first."""

import numpy as np

from .._validate import as_float_array, require_finite
from .camera import _points


def _camera(R, t, intrinsics):
    R = as_float_array(R, "R", ndims=2)
    t = as_float_array(t, "t", ndims=1)
    intrinsics = as_float_array(intrinsics, "intrinsics", ndims=1)
    if R.shape != (3, 3) or t.shape != (3,) or intrinsics.shape != (3,):
        raise ValueError(
            f"R, t and intrinsics (f, k1, k2) must have shapes (3, 3), (3,) and "
            f"(3,), got {R.shape}, {t.shape} and {intrinsics.shape}"
        )
    for name, a in (("R", R), ("t", t), ("intrinsics", intrinsics)):
        require_finite(a, name)
    return R, t, intrinsics


def _behind(Pz, name="P = R X + t"):
    if np.any(Pz >= 0):
        k = int(np.flatnonzero(Pz >= 0)[0])
        raise ValueError(
            f"a Bundler camera looks down -z: every point of {name} needs P_z < 0, "
            f"point {k} has P_z = {Pz[k]:.3g}"
        )


def _blocks(Rk, tk, fk, Xo):
    """Per observation k (vectorised over N): the image point u_k (2, N) and the
    Jacobian blocks A_k = du/d(delta, t) (N, 2, 6), B_k = du/dX (N, 2, 3) and
    C_k = du/d(f, k1, k2) (N, 2, 3) (eqs. 6.43-6.45). Rk (N, 3, 3), tk (N, 3),
    fk (N, 3), Xo (3, N)."""
    RX = np.einsum("kab,bk->ak", Rk, Xo)
    P = RX + tk.T
    _behind(P[2])
    p = -P[:2] / P[2]
    s = (p * p).sum(axis=0)
    f, k1, k2 = fk.T
    rho = 1 + k1 * s + k2 * s * s
    u = f * rho * p
    # du = f (rho I + 2 (k1 + 2 k2 s) p p^T) dp, dp = -(1/P_z) [I | p] dP
    g = 2 * (k1 + 2 * k2 * s)
    Du = f[:, None, None] * (
        rho[:, None, None] * np.eye(2)
        + g[:, None, None] * np.einsum("ak,bk->kab", p, p)
    )
    Jp = (
        np.concatenate(
            [np.broadcast_to(np.eye(2), (p.shape[1], 2, 2)), p.T[:, :, None]], axis=2
        )
        / -P[2][:, None, None]
    )
    JP = Du @ Jp  # (N, 2, 3) = du/dP
    B = JP @ Rk
    # dP = -R [X]x delta + dt: each row b of JP R gives b^T [X]x = (b x X)^T
    A = np.concatenate([-np.cross(B, Xo.T[:, None, :]), JP], axis=2)
    C = np.stack([rho * p, f * s * p, f * s * s * p], axis=2).transpose(1, 0, 2)
    return u, A, B, C


def bundler_project(R, t, intrinsics, X):
    """Bundler's projection (eqs. 6.40-6.41): u = f rho(p) p with p = -P_xy / P_z,
    P = R X + t. R (3, 3), t (3,), intrinsics (f, k1, k2), X (3, n) -> u (2, n), or
    (3,) -> (2,). Raises ValueError if a point is not in front (P_z >= 0)."""
    R, t, intrinsics = _camera(R, t, intrinsics)
    X, single = _points(X, "X")
    P = R @ X + t[:, None]
    _behind(P[2])
    p = -P[:2] / P[2]
    s = (p * p).sum(axis=0)
    f, k1, k2 = intrinsics
    u = f * (1 + k1 * s + k2 * s * s) * p
    return u[:, 0] if single else u


def bundler_jacobians(R, t, intrinsics, X):
    """The Jacobians of bundler_project for each of the n points (eqs. 6.43-6.45):
    with respect to the pose, for R Exp(delta) and t + dt, (n, 2, 6) (delta first);
    the point X_i, (n, 2, 3); and the intrinsics (f, k1, k2), (n, 2, 3)."""
    R, t, intrinsics = _camera(R, t, intrinsics)
    X, _ = _points(X, "X")
    n = X.shape[1]
    _, A, B, C = _blocks(
        np.broadcast_to(R, (n, 3, 3)),
        np.broadcast_to(t, (n, 3)),
        np.broadcast_to(intrinsics, (n, 3)),
        X,
    )
    return A, B, C
