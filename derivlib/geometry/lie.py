"""Chapter 6, rotations: the hat map, Rodrigues' formula and the Jacobians of SO(3).

The conventions are stated once, in derivlib/geometry/__init__.py."""

import numpy as np

from .._validate import as_float_array, require_finite
from .camera import _points


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
