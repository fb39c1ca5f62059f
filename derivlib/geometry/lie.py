"""Chapter 6, rotations: the hat map, Rodrigues' formula and the Jacobians of SO(3).

The conventions are stated once, in derivlib/geometry/__init__.py."""

import math

import numpy as np

from .._validate import as_float_array, require_finite
from .camera import _points


# Above this size a component of w makes [w]x^2 (and |w|^2) overflow float64.
MAX_ROTATION_VECTOR = 1e150


def _rotation_vector(w, name="w"):
    w = as_float_array(w, name, ndims=1)
    if w.shape != (3,):
        raise ValueError(
            f"{name} must be a rotation vector of shape (3,), got shape {w.shape}"
        )
    require_finite(w, name)
    if np.max(np.abs(w)) > MAX_ROTATION_VECTOR:
        raise ValueError(
            f"{name} must have components of size at most {MAX_ROTATION_VECTOR:.0e} "
            f"(beyond that |{name}|^2 and [{name}]x^2 overflow float64), got "
            f"max |{name}_i| = {np.max(np.abs(w)):.3g}; reduce the angle modulo 2 pi "
            f"along its axis first"
        )
    return w


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


# ----- Updates on the manifold: SO(3) Exp and Log, the inverse Jacobians, SE(3) -----
#
# The convention, once: a rotation R is perturbed on the right, R Exp(delta), with delta
# in the body frame; the left perturbation Exp(delta') R acts in the world frame, and
# the adjoint converts one into the other: R Exp(delta) = Exp(Ad_R delta) R, Ad_R = R
# (eq. 6.32). A pose T = (R, t) acts by p = R X + t; its tangent tau = (phi, rho) is
# rotation first, then translation, and T Exp(tau) is its right update (eq. 6.34).


def _rotation_matrix(R, name="R"):
    R = as_float_array(R, name, ndims=2)
    if R.shape != (3, 3):
        raise ValueError(f"{name} must be a 3 x 3 rotation matrix, got shape {R.shape}")
    require_finite(R, name)
    orth = np.linalg.norm(R.T @ R - np.eye(3))
    if not (orth <= 1e-8 and np.linalg.det(R) > 0):
        raise ValueError(
            f"{name} must be a rotation (R^T R = I to 1e-8, det R = +1), got "
            f"|R^T R - I| = {orth:.3g} and det R = {np.linalg.det(R):.6g}"
        )
    return R


def so3_exp(w):
    """Exp(w) = exp([w]x), the rotation by the angle |w| about w / |w| (eq. 6.5); the
    same map as `rodrigues`. w (3,) -> R (3, 3)."""
    return rodrigues(w)


# Above this angle so3_log reads the axis from the symmetric part of R (eq. 6.31),
# where sin(theta) no longer divides it; below it, from the skew part.
NEAR_PI = 0.5 * np.pi


def so3_log(R):
    """Log(R) = w with Exp(w) = R and |w| <= pi (eq. 6.31). R (3, 3) -> w (3,).

    The angle is theta = atan2(|v|, (tr R - 1) / 2), with [v]x the skew part of R
    (accurate at every angle, unlike arccos near 0 and pi). Below NEAR_PI the vector is
    w = (theta / sin theta) v (a Taylor series at tiny angles); above it the axis is the
    dominant column of the symmetric part (R + R^T) / 2 - cos(theta) I = (1 - cos
    theta) a a^T, whose sign is fixed by v, since v = sin(theta) a loses all relative
    accuracy as theta -> pi. At theta = pi exactly, w and -w are both logarithms; the
    one returned has its largest component positive. Raises ValueError unless R is a
    rotation (R^T R = I to 1e-8, det R > 0)."""
    return _log_rotation(_rotation_matrix(R))


def _log_rotation(R):
    """so3_log for an R known to be a rotation (built by the caller): no checks."""
    v = 0.5 * np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    s = np.linalg.norm(v)
    c = 0.5 * (np.trace(R) - 1.0)
    theta = float(np.arctan2(s, c))
    if theta < NEAR_PI:
        a, _, _ = rotation_coefficients(theta)  # sin(theta) / theta
        return v / a
    B = 0.5 * (R + R.T) - c * np.eye(3)  # (1 - cos theta) a a^T
    k = int(np.argmax(np.diag(B)))
    axis = B[:, k] / np.sqrt(B[k, k] * (1.0 - c))
    axis /= np.linalg.norm(axis)
    sign = np.sign(axis @ v)
    if sign == 0:  # theta = pi: either sign; pick the largest component positive
        sign = np.sign(axis[np.argmax(np.abs(axis))])
    return theta * sign * axis


def _inverse_coefficient(t):
    """d(t) = 1 / t^2 - (1 + cos t) / (2 t sin t) = 1 / t^2 - cot(t / 2) / (2 t), the
    coefficient of [w]x^2 in J_r^{-1} (eq. 6.33), accurately; 1 / 12 at t = 0."""
    if t < SMALL_ANGLE:
        t2 = t * t
        return 1.0 / 12.0 + t2 / 720.0 + t2 * t2 / 30240.0 + t2**3 / 1209600.0
    return float(1.0 / t**2 - 1.0 / (2.0 * t * np.tan(0.5 * t)))


def _check_invertible(t):
    # J_r(w) is singular where sin(t / 2) = 0, t = 2 pi k:
    # det J_r = 2 (1 - cos t) / t^2
    if t > np.pi and abs(np.sin(0.5 * t)) < 1e-8:
        raise ValueError(
            f"J_r(w) is singular at |w| = {t:.6g} (a multiple of 2 pi, where "
            f"det J_r = 2 (1 - cos |w|) / |w|^2 = 0): w -> Exp(w) has no local inverse "
            f"there; take w = Log(Exp(w)) first"
        )


def right_jacobian_inverse(w):
    """J_r(w)^{-1} = I + (1/2) [w]x + (1 / t^2 - (1 + cos t) / (2 t sin t)) [w]x^2,
    t = |w| (eq. 6.33): the derivative of Log, Log(Exp(w) Exp(delta)) = w +
    J_r(w)^{-1} delta + O(|delta|^2). w (3,) -> (3, 3). Raises ValueError where J_r is
    singular, at |w| a non-zero multiple of 2 pi (to 1e-8 in sin(|w| / 2))."""
    w = _rotation_vector(w)
    t = float(np.linalg.norm(w))
    _check_invertible(t)
    W = _hat(w)
    return np.eye(3) + 0.5 * W + _inverse_coefficient(t) * (W @ W)


def left_jacobian_inverse(w):
    """J_l(w)^{-1} = J_r(-w)^{-1} (eq. 6.33). w (3,) -> (3, 3)."""
    return right_jacobian_inverse(-_rotation_vector(w))


def so3_adjoint(R):
    """Ad_R = R, with R Exp(delta) = Exp(R delta) R (eq. 6.32): the matrix that turns a
    right (body) increment into the left (world) one. R (3, 3) -> (3, 3)."""
    return _rotation_matrix(R).copy()


def rotate_jacobian_right(R, P):
    """The Jacobian of R Exp(delta) p with respect to delta at delta = 0, -R [p]x
    (eq. 6.30): exact at every R, not a small-angle approximation. R (3, 3), P (3, n) ->
    (n, 3, 3); P (3,) -> (3, 3)."""
    R = _rotation_matrix(R)
    P, single = _points(P)
    J = -np.einsum("ab,nbc->nac", R, _hat_many(P))
    return J[0] if single else J


def _tangent(tau, name="tau"):
    tau = as_float_array(tau, name, ndims=1)
    if tau.shape != (6,):
        raise ValueError(
            f"{name} must be an se(3) tangent (phi, rho) of shape (6,), rotation "
            f"first, got shape {tau.shape}"
        )
    return require_finite(tau, name)


def _pose_matrix(T, name="T"):
    T = as_float_array(T, name, ndims=2)
    if T.shape != (4, 4):
        raise ValueError(f"{name} must be a 4 x 4 rigid transform, got shape {T.shape}")
    require_finite(T, name)
    if not np.array_equal(T[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{name} must have last row [0, 0, 0, 1], got {T[3].tolist()}")
    _rotation_matrix(T[:3, :3], f"{name}[:3, :3]")
    return T


def se3_exp(tau):
    """Exp(tau) for tau = (phi, rho), rotation first (eq. 6.34): the 4 x 4 transform
    [[Exp(phi), J_l(phi) rho], [0, 1]] = expm of the twist [[[phi]x, rho], [0, 0]].
    tau (6,) -> T (4, 4)."""
    tau = _tangent(tau)
    phi, rho = tau[:3], tau[3:]
    T = np.eye(4)
    T[:3, :3] = rodrigues(phi)
    T[:3, 3] = left_jacobian(phi) @ rho
    return T


def se3_log(T):
    """Log(T) = (phi, rho) with phi = Log(R), |phi| <= pi, and rho = J_l(phi)^{-1} t
    (eq. 6.34). T (4, 4) -> tau (6,)."""
    T = _pose_matrix(T)
    phi = so3_log(T[:3, :3])
    return np.concatenate([phi, left_jacobian_inverse(phi) @ T[:3, 3]])


def se3_adjoint(T):
    """Ad_T = [[R, 0], [[t]x R, R]] in the order (phi, rho), with T Exp(tau) =
    Exp(Ad_T tau) T (eq. 6.35). T (4, 4) -> (6, 6)."""
    T = _pose_matrix(T)
    R, t = T[:3, :3], T[:3, 3]
    A = np.zeros((6, 6))
    A[:3, :3] = R
    A[3:, 3:] = R
    A[3:, :3] = _hat(t) @ R
    return A


def _q_coefficients(t):
    """(t - sin t) / t^3, (1 - t^2 / 2 - cos t) / t^4 and
    (1/2) ((1 - t^2 / 2 - cos t) / t^4 - 3 (t - sin t - t^3 / 6) / t^5), accurately
    (Taylor series below 0.1, where the closed forms lose digits)."""
    if t < 0.1:
        t2 = t * t
        c1 = 1 / 6 - t2 / 120 + t2**2 / 5040 - t2**3 / 362880
        c2 = -1 / 24 + t2 / 720 - t2**2 / 40320 + t2**3 / 3628800
        c3 = -1 / 120 + t2 / 2520 - t2**2 / 120960 + t2**3 / 7983360
        return c1, c2, c3
    s, c = np.sin(t), np.cos(t)
    c1 = (t - s) / t**3
    c2 = (1 - t * t / 2 - c) / t**4
    c3 = 0.5 * (c2 - 3 * (t - s - t**3 / 6) / t**5)
    return float(c1), float(c2), float(c3)


def _se3_q(phi, rho):
    """Q(phi, rho), the block of J_l(tau) that maps dphi into the translation (Barfoot
    and Furgale 2014; Sola et al. 2018)."""
    P, Rh = _hat(phi), _hat(rho)
    c1, c2, c3 = _q_coefficients(float(np.linalg.norm(phi)))
    PR, RP, PRP = P @ Rh, Rh @ P, P @ Rh @ P
    return (
        0.5 * Rh
        + c1 * (PR + RP + PRP)
        - c2 * (P @ PR + RP @ P - 3 * PRP)
        - c3 * (PRP @ P + P @ PRP)
    )


def se3_left_jacobian(tau):
    """J_l(tau) = [[J_l(phi), 0], [Q(phi, rho), J_l(phi)]] in the order (phi, rho)
    (eq. 6.35), with Exp(tau + dtau) = Exp(J_l(tau) dtau) Exp(tau) to first order.
    tau (6,) -> (6, 6)."""
    tau = _tangent(tau)
    phi, rho = tau[:3], tau[3:]
    J = np.zeros((6, 6))
    J[:3, :3] = J[3:, 3:] = left_jacobian(phi)
    J[3:, :3] = _se3_q(phi, rho)
    return J


def se3_right_jacobian(tau):
    """J_r(tau) = J_l(-tau) (eq. 6.35), with Exp(tau + dtau) = Exp(tau) Exp(J_r(tau)
    dtau) to first order. tau (6,) -> (6, 6)."""
    return se3_left_jacobian(-_tangent(tau))


def se3_right_jacobian_inverse(tau):
    """J_r(tau)^{-1} = [[J_r^{-1}, 0], [-J_r^{-1} Q_r J_r^{-1}, J_r^{-1}]], with
    J_r = J_r(phi) and Q_r = Q(-phi, -rho) (eq. 6.35): the derivative of Log,
    Log(Exp(tau) Exp(delta)) = tau + J_r(tau)^{-1} delta + O(|delta|^2). Raises
    ValueError where J_r(phi) is singular. tau (6,) -> (6, 6)."""
    tau = _tangent(tau)
    Ji = right_jacobian_inverse(tau[:3])
    J = np.zeros((6, 6))
    J[:3, :3] = J[3:, 3:] = Ji
    J[3:, :3] = -Ji @ _se3_q(-tau[:3], -tau[3:]) @ Ji
    return J


def se3_left_jacobian_inverse(tau):
    """J_l(tau)^{-1} = J_r(-tau)^{-1} (eq. 6.35). tau (6,) -> (6, 6)."""
    return se3_right_jacobian_inverse(-_tangent(tau))
