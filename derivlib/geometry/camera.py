"""Chapter 6, the pinhole camera: projection and its Jacobian (eqs. 6.1-6.3).

The conventions are stated once, in derivlib/geometry/__init__.py."""

import numpy as np

from .._validate import as_float_array, require_finite


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
    if K[0, 0] == 0 or K[1, 1] == 0:
        raise ValueError(
            f"K must be invertible (focal lengths f_x = K[0, 0] and f_y = K[1, 1] "
            f"non-zero), got f_x = {K[0, 0]} and f_y = {K[1, 1]}"
        )
    return K


def _in_front(P, name):
    """Raise unless every depth p_z is positive (a point behind the camera has no
    image)."""
    if P[2].min() > 0:  # False for a NaN depth too
        return
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
