"""Compiled loops for the PnP pose of section 8.4 and its linearisation.

`pnp_pose` and its rules spend their time on small arrays (6 x 6 systems, a few
dozen points), where every NumPy call costs more than the arithmetic it does. The
loops below do the same arithmetic point by point, compiled by Numba: one call runs
the whole Levenberg-Marquardt iteration (`lm`), one the linearisation at the
solution (`linearise`), one the LU of its 6 x 6 Hessian (`factor`). They take
arrays validated by their callers, never raise (but for `degeneracy`'s SVD, which
raises LinAlgError if LAPACK's does not converge), and report what went wrong as a
status code, which the callers in `implicit.py` turn into the errors of the rest of
derivlib (whose messages they reuse). Numba keeps what it compiles on disk (in
`__pycache__` beside this file, or NUMBA_CACHE_DIR), so only the first call in a
fresh install waits for the compiler, about 10 s; without Numba the loops run as
plain Python, with the same results, a hundred times slower. The cache is renewed when
this file changes, not when `lie.py` does: SMALL_ANGLE and NEAR_PI are compiled in as
constants, so after changing them, empty the cache (`make clean`).

Every per-point quantity is first formed in the camera frame: the motion p -> p +
omega x p + rho moves the normalised image (x', y') = (x / z, y / z) by the rows

    d x' = [-x' y', 1 + x'^2, -y', 1 / z, 0, -x' / z] (omega, rho)
    d y' = [-(1 + y'^2), x' y', x', 0, 1 / z, -y' / z] (omega, rho),

and M (`_to_right`, (omega, rho) = M (delta_w, delta_t)) takes them to the right
perturbation of the pose: a row a becomes M^T a, a Hessian Hc becomes M^T Hc M.
"""

import math

import numpy as np

try:
    from numba import njit

    # floating-point division as NumPy does it (inf or NaN, never ZeroDivisionError)
    compiled = njit(cache=True, error_model="numpy")
except ImportError:  # without Numba the same loops run as plain Python: slower, same

    def compiled(function):
        return function


from .geometry.lie import NEAR_PI, SMALL_ANGLE

OK, NOT_CONVERGED, STUCK, SINGULAR, INVALID_START = 0, 1, 2, 3, 4
BEHIND, NOT_FINITE = 1, 2  # the status of `linearise`


@compiled
def _rodrigues(w0, w1, w2, out):
    """out = R(w) (eq. 6.5) for the three components as floats, unchecked: `rodrigues`'s
    formula and series, with [w]x^2 = w w^T - t^2 I written out entry by entry."""
    t2 = w0 * w0 + w1 * w1 + w2 * w2
    t = math.sqrt(t2)
    if t < SMALL_ANGLE:
        a = 1.0 - t2 / 6.0 * (1.0 - t2 / 20.0 * (1.0 - t2 / 42.0))
        b = 0.5 - t2 / 24.0 * (1.0 - t2 / 30.0 * (1.0 - t2 / 56.0))
    else:
        a = math.sin(t) / t
        b = 2.0 * (math.sin(0.5 * t) / t) ** 2
    out[0, 0] = 1.0 + b * (w0 * w0 - t2)
    out[0, 1] = b * w0 * w1 - a * w2
    out[0, 2] = b * w0 * w2 + a * w1
    out[1, 0] = b * w0 * w1 + a * w2
    out[1, 1] = 1.0 + b * (w1 * w1 - t2)
    out[1, 2] = b * w1 * w2 - a * w0
    out[2, 0] = b * w0 * w2 - a * w1
    out[2, 1] = b * w1 * w2 + a * w0
    out[2, 2] = 1.0 + b * (w2 * w2 - t2)


@compiled
def _to_right(R, t, M):
    """M (6, 6) with (omega, rho) = M (delta_w, delta_t): the camera-frame motion of
    the points, p + omega x p + rho, that the right perturbation (R Exp(delta_w), t +
    delta_t) causes to first order: omega = R delta_w, rho = delta_t + [t]x R
    delta_w."""
    M[:] = 0.0
    for j in range(3):
        M[0, j], M[1, j], M[2, j] = R[0, j], R[1, j], R[2, j]
        M[3, j] = t[1] * R[2, j] - t[2] * R[1, j]
        M[4, j] = t[2] * R[0, j] - t[0] * R[2, j]
        M[5, j] = t[0] * R[1, j] - t[1] * R[0, j]
        M[3 + j, 3 + j] = 1.0


@compiled
def _camera_rows(xn, yn, iz, ax, ay):
    """The camera-frame rows of d x' and d y' (module docstring)."""
    ax[0], ax[1], ax[2] = -xn * yn, 1.0 + xn * xn, -yn
    ax[3], ax[4], ax[5] = iz, 0.0, -xn * iz
    ay[0], ay[1], ay[2] = -(1.0 + yn * yn), xn * yn, xn
    ay[3], ay[4], ay[5] = 0.0, iz, -yn * iz


@compiled
def _sandwich(M, Hc, H):
    """H = M^T Hc M."""
    T = np.zeros((6, 6))
    for a in range(6):
        for b in range(6):
            s = 0.0
            for c in range(6):
                s += Hc[a, c] * M[c, b]
            T[a, b] = s
    for a in range(6):
        for b in range(6):
            s = 0.0
            for c in range(6):
                s += M[c, a] * T[c, b]
            H[a, b] = s


@compiled
def _residual(X, K, u_off, sw, R, t, r, nxy, iz):
    """The residuals r = sqrt(w) (K12 (p_xy / p_z) - u_off) at p = R X + t, into r,
    with p_xy / p_z and 1 / p_z into nxy and iz. Returns E = |r|^2, or inf when a
    point is not in front of the camera (p_z <= 0, or NaN) or E is not finite."""
    n = X.shape[1]
    for i in range(n):
        z = R[2, 0] * X[0, i] + R[2, 1] * X[1, i] + R[2, 2] * X[2, i] + t[2]
        if not z > 0.0:
            return np.inf
        iz[i] = 1.0 / z
    E = 0.0
    for i in range(n):
        x = R[0, 0] * X[0, i] + R[0, 1] * X[1, i] + R[0, 2] * X[2, i] + t[0]
        y = R[1, 0] * X[0, i] + R[1, 1] * X[1, i] + R[1, 2] * X[2, i] + t[1]
        xn, yn = x * iz[i], y * iz[i]
        nxy[0, i], nxy[1, i] = xn, yn
        r0 = (K[0, 0] * xn + K[0, 1] * yn - u_off[0, i]) * sw[i]
        r1 = (K[1, 0] * xn + K[1, 1] * yn - u_off[1, i]) * sw[i]
        r[0, i], r[1, i] = r0, r1
        E += r0 * r0 + r1 * r1
    return E if math.isfinite(E) else np.inf


@compiled
def _normal_equations(K, sw, r, nxy, iz, M, H, g):
    """H = J J^T and g = J r for the Jacobian J (6, 2n) of the residuals of
    `_residual` in the right perturbation (both scaled by sqrt(w))."""
    Hc, gc = np.zeros((6, 6)), np.zeros(6)
    ax, ay, j0, j1 = np.empty(6), np.empty(6), np.empty(6), np.empty(6)
    for i in range(r.shape[1]):
        _camera_rows(nxy[0, i], nxy[1, i], iz[i], ax, ay)
        for a in range(6):
            j0[a] = sw[i] * (K[0, 0] * ax[a] + K[0, 1] * ay[a])
            j1[a] = sw[i] * (K[1, 0] * ax[a] + K[1, 1] * ay[a])
        for a in range(6):
            gc[a] += j0[a] * r[0, i] + j1[a] * r[1, i]
            for b in range(a, 6):
                Hc[a, b] += j0[a] * j0[b] + j1[a] * j1[b]
    _to_pose(M, Hc, gc, H, g)


@compiled
def _to_pose(M, Hc, gc, H, g):
    """H = M^T Hc M and g = M^T gc: the camera-frame normal equations (Hc's upper
    triangle, which this fills below the diagonal) in the right perturbation."""
    for a in range(6):
        for b in range(a):
            Hc[a, b] = Hc[b, a]
    _sandwich(M, Hc, H)
    for a in range(6):
        s = 0.0
        for c in range(6):
            s += M[c, a] * gc[c]
        g[a] = s


@compiled
def _pose_size(R, t):
    """|(w, t)| with w = Log R, |w| <= pi: the size of x in the stopping rule (the
    angle as `so3_log` computes it, atan2(|v|, (tr R - 1) / 2) with [v]x the skew
    part of R)."""
    angle = _angle(R)[0]
    return math.sqrt(angle * angle + t[0] * t[0] + t[1] * t[1] + t[2] * t[2])


@compiled
def _angle(R):
    """(theta, v0, v1, v2) for a rotation matrix R: [v]x its skew part and theta =
    atan2(|v|, (tr R - 1) / 2) its angle, as `so3_log` computes them."""
    v0, v1, v2 = (
        0.5 * (R[2, 1] - R[1, 2]),
        0.5 * (R[0, 2] - R[2, 0]),
        0.5 * (R[1, 0] - R[0, 1]),
    )
    theta = math.atan2(
        math.sqrt(v0 * v0 + v1 * v1 + v2 * v2), 0.5 * (R[0, 0] + R[1, 1] + R[2, 2] - 1)
    )
    return theta, v0, v1, v2


@compiled
def _log(R, w):
    """w = Log R (`lie.so3_log`'s formula below its NEAR_PI, (theta / sin theta) v
    with [v]x the skew part of R, and its series at small angles). Returns False,
    leaving w, at angles from NEAR_PI on, where `so3_log` takes the axis from the
    symmetric part instead."""
    theta, v0, v1, v2 = _angle(R)
    if not theta < NEAR_PI:
        return False
    if theta < SMALL_ANGLE:  # sin(theta) / theta, as `lie.rotation_coefficients`
        t2 = theta * theta
        a = 1.0 - t2 / 6.0 * (1.0 - t2 / 20.0 * (1.0 - t2 / 42.0))
    else:
        a = math.sin(theta) / theta
    w[0], w[1], w[2] = v0 / a, v1 / a, v2 / a
    return True


@compiled
def _lm_update(lam, nu, rho):
    """`solvers._lm_update`: Nielsen's damping update."""
    if rho > 0:
        return lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 2.0
    return lam * nu, 2.0 * nu


@compiled
def lm(X, K, u_off, sw, R, t, tol, max_iter, lam0, max_damping, xi):
    """Chapter 6's Levenberg-Marquardt on the residuals of `_residual`, from (R, t),
    with the rotation updated on the right, R <- R Exp(delta_w): the damping, its
    updates and the stopping rules of `solvers.solve_least_squares` (see
    `implicit._pnp_lm`). R and t are updated in place, and at the end xi (6,) holds
    (Log R, t). Returns (status, E, lam, logged): status OK (logged False when the
    angle of R is at least NEAR_PI, where the caller takes Log R), NOT_CONVERGED
    after max_iter iterations, STUCK when the damping passes max_damping, SINGULAR
    for an exactly singular damped system, INVALID_START when the start has no
    finite cost."""
    n = X.shape[1]
    r, nxy, iz = np.empty((2, n)), np.empty((2, n)), np.empty(n)
    r_new, nxy_new, iz_new = np.empty((2, n)), np.empty((2, n)), np.empty(n)
    M, H, Hd, g, piv = (
        np.empty((6, 6)),
        np.empty((6, 6)),
        np.empty((6, 6)),
        np.empty(6),
        np.empty(6, np.int64),
    )
    delta, Exp, R_new, t_new = (
        np.empty(6),
        np.empty((3, 3)),
        np.empty((3, 3)),
        np.empty(3),
    )
    E = _residual(X, K, u_off, sw, R, t, r, nxy, iz)
    if E == np.inf:
        return INVALID_START, E, lam0, False
    lam, nu = lam0, 2.0
    for _ in range(max_iter):
        _to_right(R, t, M)
        _normal_equations(K, sw, r, nxy, iz, M, H, g)
        x_size = _pose_size(R, t)
        flat = True
        for a in range(6):  # solvers._flat (False for a NaN gradient)
            bound = tol * math.sqrt(max(H[a, a], 0.0)) * (1.0 + math.sqrt(E))
            flat = flat and abs(g[a]) <= bound
        first = True
        while True:
            for a in range(6):
                for b in range(6):
                    Hd[a, b] = H[a, b]
                Hd[a, a] += lam * H[a, a]
            if _lu(Hd, piv)[1]:  # an exact zero pivot, where dgesv stops
                return SINGULAR, E, lam, False
            solve(Hd, piv, g, 0, delta)
            # -step^T (2 g + H step) with step = -delta, as Chapter 6 computes it
            predicted, step2 = 0.0, 0.0
            for a in range(6):
                s = 2.0 * g[a]
                for b in range(6):
                    s -= H[a, b] * delta[b]
                predicted += delta[a] * s
                step2 += delta[a] * delta[a]
            _rodrigues(-delta[0], -delta[1], -delta[2], Exp)
            for a in range(3):
                for b in range(3):
                    R_new[a, b] = (
                        R[a, 0] * Exp[0, b] + R[a, 1] * Exp[1, b] + R[a, 2] * Exp[2, b]
                    )
                t_new[a] = t[a] - delta[3 + a]
            E_new = _residual(X, K, u_off, sw, R_new, t_new, r_new, nxy_new, iz_new)
            rho = (E - E_new) / predicted if predicted > 0 else -1.0
            short = math.sqrt(step2) <= tol * (x_size + tol)
            if rho > 0:
                lam, nu = _lm_update(lam, nu, rho)
                stationary = False
                break
            if first and E_new < np.inf and (flat or predicted <= tol * E or short):
                stationary = True  # solvers._stationary
                break
            first = False
            lam, nu = _lm_update(lam, nu, rho)
            if lam > max_damping:
                return STUCK, E, lam, False
        done = stationary or E - E_new <= tol * E or short  # solvers._finished
        if not stationary and E_new <= E:
            R[:], t[:] = R_new, t_new
            r, r_new = r_new, r
            nxy, nxy_new = nxy_new, nxy
            iz, iz_new = iz_new, iz
            E = E_new
        if done:
            xi[3], xi[4], xi[5] = t[0], t[1], t[2]
            return OK, E, lam, _log(R, xi)
    return NOT_CONVERGED, E, lam, False


@compiled
def linearise(X, K, u, weights, R, t, exact, r, J, H):
    """At the pose (R, t), with the weights w_i = weights_i / s (s = max weights_i,
    so that extreme weights neither overflow nor underflow): the residuals r (2, n)
    = K12 (p_xy / p_z) + K[:2, 2] - u, their Jacobian J (6, 2, n) in the right
    perturbation (unweighted), and H = sum_i w_i J_i^T J_i (eq. 8.17), plus, when
    exact, the second-order term sum_i w_i r_i . Hess r_i (eq. 8.18); see
    `implicit._pnp_linearisation` for its derivation. Fills r, J and H; returns
    (status, g, trace of the Gauss-Newton H, sum_i w_i |r_i|^2, s, mean w_i):
    status BEHIND when a point is not in front of the camera, NOT_FINITE when an
    image is not finite."""
    n = X.shape[1]
    g = np.zeros(6)
    s_w = 0.0
    for i in range(n):
        s_w = max(s_w, weights[i])
    wts, wbar = np.empty(n), 0.0
    for i in range(n):
        wts[i] = weights[i] / s_w
        wbar += wts[i]
    wbar /= n
    p = np.empty((3, n))
    for i in range(n):
        for a in range(3):
            p[a, i] = R[a, 0] * X[0, i] + R[a, 1] * X[1, i] + R[a, 2] * X[2, i] + t[a]
        if not p[2, i] > 0.0:
            return BEHIND, g, 0.0, 0.0, s_w, wbar
    M, Hc, Sc, BX = (
        np.empty((6, 6)),
        np.zeros((6, 6)),
        np.zeros((6, 6)),
        np.zeros((3, 3)),
    )
    gc = np.zeros(6)
    ax, ay, j0, j1 = np.empty(6), np.empty(6), np.empty(6), np.empty(6)
    _to_right(R, t, M)
    wrr = 0.0
    for i in range(n):
        iz = 1.0 / p[2, i]
        xn, yn = p[0, i] * iz, p[1, i] * iz
        r0 = K[0, 0] * xn + K[0, 1] * yn + K[0, 2] - u[0, i]
        r1 = K[1, 0] * xn + K[1, 1] * yn + K[1, 2] - u[1, i]
        if not (math.isfinite(r0) and math.isfinite(r1)):
            return NOT_FINITE, g, 0.0, 0.0, s_w, wbar
        r[0, i], r[1, i] = r0, r1
        a0, a1 = wts[i] * r0, wts[i] * r1  # the weight of residual i's Hessian
        wrr += a0 * r0 + a1 * r1
        _camera_rows(xn, yn, iz, ax, ay)
        for a in range(6):
            j0[a] = K[0, 0] * ax[a] + K[0, 1] * ay[a]
            j1[a] = K[1, 0] * ax[a] + K[1, 1] * ay[a]
        for a in range(6):  # J_i = M^T (j0, j1)
            s0, s1 = 0.0, 0.0
            for c in range(6):
                s0 += M[c, a] * j0[c]
                s1 += M[c, a] * j1[c]
            J[a, 0, i], J[a, 1, i] = s0, s1
            gc[a] += j0[a] * a0 + j1[a] * a1
            for b in range(a, 6):
                Hc[a, b] += wts[i] * (j0[a] * j0[b] + j1[a] * j1[b])
        if exact:
            # (e1, e2) = K12^T a_i / z; s = e1 d x' + e2 d y' in the camera frame,
            # against q = dz / d(omega, rho) = (y, -x, 0, 0, 0, 1)
            e1 = (K[0, 0] * a0 + K[1, 0] * a1) * iz
            e2 = (K[0, 1] * a0 + K[1, 1] * a1) * iz
            q0, q1 = p[1, i], -p[0, i]
            for a in range(6):
                s = e1 * ax[a] + e2 * ay[a]
                Sc[a, 0] += s * q0
                Sc[a, 1] += s * q1
                Sc[a, 5] += s
            b2 = -(e1 * xn + e2 * yn)  # b_i = (e1, e2, b2), the gradient in p
            for a in range(3):
                BX[0, a] += e1 * X[a, i]
                BX[1, a] += e2 * X[a, i]
                BX[2, a] += b2 * X[a, i]
    _to_pose(M, Hc, gc, H, g)
    trace = H[0, 0] + H[1, 1] + H[2, 2] + H[3, 3] + H[4, 4] + H[5, 5]
    if exact:
        for a in range(6):
            for b in range(a + 1):
                Sc[a, b], Sc[b, a] = Sc[a, b] + Sc[b, a], Sc[b, a] + Sc[a, b]
        SQ = np.empty((6, 6))
        _sandwich(M, Sc, SQ)
        for a in range(6):
            for b in range(6):
                H[a, b] -= SQ[a, b]
        # the curvature of R Exp(delta_w) X_i: (C X^T + X C^T) / 2 - tr(C X^T) I,
        # C X^T = R^T B X^T
        CX = np.empty((3, 3))
        for a in range(3):
            for b in range(3):
                CX[a, b] = R[0, a] * BX[0, b] + R[1, a] * BX[1, b] + R[2, a] * BX[2, b]
        tr = CX[0, 0] + CX[1, 1] + CX[2, 2]
        for a in range(3):
            for b in range(3):
                H[a, b] += 0.5 * (CX[a, b] + CX[b, a])
            H[a, a] -= tr
    return 0, g, trace, wrr, s_w, wbar


@compiled
def degeneracy(X, u):
    """What `solvers._pnp_problem` tests a PnP problem by, for finite X (3, n) and u
    (2, n): the largest distance of an image point from their mean, the largest |u|
    entry, and the two largest singular values of the centred points X - mean."""
    n = X.shape[1]
    m0, m1 = 0.0, 0.0
    for i in range(n):
        m0 += u[0, i]
        m1 += u[1, i]
    m0, m1 = m0 / n, m1 / n
    spread, umax = 0.0, 0.0
    for i in range(n):
        d0, d1 = u[0, i] - m0, u[1, i] - m1
        spread = max(spread, d0 * d0 + d1 * d1)
        umax = max(umax, abs(u[0, i]), abs(u[1, i]))
    Xc = np.empty((n, 3))
    for a in range(3):
        mean = 0.0
        for i in range(n):
            mean += X[a, i]
        mean /= n
        for i in range(n):
            Xc[i, a] = X[a, i] - mean
    _, s, _ = np.linalg.svd(Xc, full_matrices=False)
    return math.sqrt(spread), umax, s[0], s[1]


@compiled
def _lu(LU, piv):
    """LU with partial pivoting of the 6 x 6 LU, in place (LAPACK's dgetrf): P A = L U
    for the row swaps piv (row k swapped with piv[k], in order). Returns (smallest
    |pivot|, whether a pivot is exactly zero, dgetrf's info > 0)."""
    smallest, zero = np.inf, False
    for k in range(6):
        p, best = k, abs(LU[k, k])
        for i in range(k + 1, 6):
            if abs(LU[i, k]) > best:
                p, best = i, abs(LU[i, k])
        piv[k] = p
        smallest = min(smallest, best)
        if p != k:
            for j in range(6):
                LU[k, j], LU[p, j] = LU[p, j], LU[k, j]
        if best == 0.0:
            zero = True
            continue
        for i in range(k + 1, 6):
            LU[i, k] /= LU[k, k]
            for j in range(k + 1, 6):
                LU[i, j] -= LU[i, k] * LU[k, j]
    return smallest, zero


@compiled
def factor(A):
    """The LU factorisation with partial pivoting of a 6 x 6 A (LAPACK's dgetrf):
    returns (LU, piv, smallest |pivot|, rcond), with P A = L U for the row swaps
    piv (row k swapped with piv[k], in order) and rcond = 1 / (|A|_1 |A^-1|_1)
    computed exactly, from the inverse (0 when a pivot is zero, or A not finite)."""
    LU, piv = A.copy(), np.empty(6, np.int64)
    for i in range(6):
        for j in range(6):
            if not math.isfinite(A[i, j]):
                return LU, piv, np.nan, 0.0
    smallest, _ = _lu(LU, piv)
    if not smallest > 0:  # also NaN
        return LU, piv, smallest, 0.0
    norm, inv_norm = 0.0, 0.0
    e, x = np.empty(6), np.empty(6)
    for j in range(6):
        column = 0.0
        for i in range(6):
            column += abs(A[i, j])
            e[i] = 1.0 if i == j else 0.0
        norm = max(norm, column)
        solve(LU, piv, e, 0, x)
        column = 0.0
        for i in range(6):
            column += abs(x[i])
        inv_norm = max(inv_norm, column)
    return LU, piv, smallest, 1.0 / (norm * inv_norm)


@compiled
def solve(LU, piv, b, trans, x):
    """x = A^-1 b (trans 0) or A^-T b (trans 1) from `factor`'s (LU, piv), as
    LAPACK's dgetrs."""
    for i in range(6):
        x[i] = b[i]
    if trans == 0:
        for k in range(6):  # x <- P x, then L^-1, then U^-1
            p = piv[k]
            x[k], x[p] = x[p], x[k]
        for i in range(6):
            for j in range(i):
                x[i] -= LU[i, j] * x[j]
        for i in range(5, -1, -1):
            for j in range(i + 1, 6):
                x[i] -= LU[i, j] * x[j]
            x[i] /= LU[i, i]
    else:  # A^T = U^T L^T P: U^-T, then L^-T, then P^T
        for i in range(6):
            for j in range(i):
                x[i] -= LU[j, i] * x[j]
            x[i] /= LU[i, i]
        for i in range(5, -1, -1):
            for j in range(i + 1, 6):
                x[i] -= LU[j, i] * x[j]
        for k in range(5, -1, -1):
            p = piv[k]
            x[k], x[p] = x[p], x[k]
