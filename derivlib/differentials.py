"""Appendix B: differentials, the remainder that defines them, and the first and
second identification theorems as code."""

import numpy as np

from ._validate import as_finite_array, require_finite
from .matrix import unvec, vec


def identify(differential, X):
    """The first identification theorem (Magnus and Neudecker, 1988), as a function.

    `differential` maps an increment dX (same shape as the point X) to dF and must be
    linear in dX (eq. B.5: dF = A(X) dX). Returns the Jacobian J, of shape
    (dF.size, X.size), with vec(dF) = J @ vec(dX): the vec layout of the book.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.size == 0:
        raise ValueError(f"identify needs a non-empty point X, got shape {X.shape}")
    require_finite(X, "X")
    columns = []
    out_shape = None
    for j in range(X.size):
        e = np.zeros(X.size)
        e[j] = 1.0
        dF = np.asarray(differential(unvec(e, X.shape)), dtype=np.float64)
        if out_shape is None:
            out_shape = dF.shape
        elif dF.shape != out_shape:
            raise ValueError(
                f"the differential returned shape {dF.shape} for one increment and "
                f"{out_shape} for another"
            )
        columns.append(vec(dF))
    J = np.stack(columns, axis=1)
    if not np.all(np.isfinite(J)):
        j = int(np.flatnonzero(~np.all(np.isfinite(J), axis=0))[0])
        raise ValueError(
            f"the differential returned a non-finite dF for the unit increment {j} "
            f"(vec layout) at X of shape {X.shape}"
        )
    _require_linear(differential, X, J)
    return J


def _require_linear(differential, X, J):
    """Raise unless the differential agrees with J on a random increment (linearity)."""
    rng = np.random.default_rng(0)
    dX = rng.standard_normal(X.shape)
    got = vec(np.asarray(differential(dX), dtype=np.float64))
    want = J @ vec(dX)
    scale = max(np.linalg.norm(want), np.linalg.norm(got), 1e-300)
    if np.linalg.norm(got - want) > 1e-8 * scale:
        raise ValueError(
            "the differential is not linear in its increment: on a random dX it gives "
            f"{np.linalg.norm(got):.3g} in norm where the linear map it defines on the "
            f"unit increments gives {np.linalg.norm(want):.3g}"
        )


# ----- B.1, B.2 The remainder of the first-order expansion -----


def remainder(f, differential, p, h):
    """The remainder r_p(h) = f(p + h) - f(p) - df(p; h) of eqs. (B.1) and (B.4).

    `f` maps an array shaped like `p` to an array (or a scalar); `differential` is the
    linear map h -> df(p; h) = A(p) h at the point `p` (eqs. B.3, B.5). Returns an array
    shaped like f(p). f is differentiable at p with this differential exactly when
    |r_p(h)| / |h| -> 0 as h -> 0 (eq. B.2 and the condition under B.4).
    """
    p = as_finite_array(p, "p")
    h = as_finite_array(h, "h")
    if h.shape != p.shape:
        raise ValueError(
            f"the increment h must have the shape of p, {p.shape}, got {h.shape}"
        )
    f_p = np.asarray(f(p), dtype=np.float64)
    df = np.asarray(differential(h), dtype=np.float64)
    if df.shape != f_p.shape:
        raise ValueError(
            f"the differential returned shape {df.shape} but f(p) has shape {f_p.shape}"
        )
    r = np.asarray(f(p + h), dtype=np.float64) - f_p - df
    if not np.all(np.isfinite(r)):
        raise ValueError(
            "the remainder is not finite: f(p), f(p + h) or the differential returned "
            "NaN or infinity"
        )
    return r


def loglog_slope(x, y):
    """The least-squares slope of log10(y) against log10(x): the exponent k in y ~
    x^k."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(
            f"loglog_slope needs x and y, two 1-D arrays of one length >= 2, got x of "
            f"shape {x.shape} and y of shape {y.shape}"
        )
    for name, values in (("x", x), ("y", y)):
        require_finite(values, name)
        if np.any(values <= 0):
            i = int(np.flatnonzero(values <= 0)[0])
            raise ValueError(
                f"loglog_slope needs positive numbers on both axes, got {name}[{i}] = "
                f"{values[i]} in {name} of shape {values.shape}"
            )
    return float(np.polyfit(np.log10(x), np.log10(y), 1)[0])


# ----- The second identification theorem -----


def identify_hessian(second_differential, X):
    """The second identification theorem (Magnus and Neudecker, 1988), as a function.

    `second_differential` maps an increment dX (shaped like the point X) to the scalar
    d^2 f, and must be a quadratic form in dX: d^2 f = vec(dX)^T B vec(dX) for some
    matrix B, which need not be symmetric. The theorem says the Hessian is the
    symmetric part H = (B + B^T) / 2; this returns H, shape (X.size, X.size), in the
    vec layout of the book, read off from the quadratic form by polarisation:
    H_jj = q(e_j) and H_jk = (q(e_j + e_k) - q(e_j) - q(e_k)) / 2.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.size == 0:
        raise ValueError(
            f"identify_hessian needs a non-empty point X, got shape {X.shape}"
        )
    require_finite(X, "X")
    N = X.size

    def q(v):
        value = np.asarray(second_differential(unvec(v, X.shape)), dtype=np.float64)
        if value.size != 1:
            raise ValueError(
                f"the second differential must be a scalar, got an array of shape "
                f"{value.shape}"
            )
        if not np.isfinite(value).all():
            raise ValueError("the second differential returned NaN or infinity")
        return float(value.reshape(()))

    eye = np.eye(N)
    diagonal = np.array([q(eye[j]) for j in range(N)])
    H = np.diag(diagonal)
    for j in range(N):
        for k in range(j + 1, N):
            H[j, k] = H[k, j] = (q(eye[j] + eye[k]) - diagonal[j] - diagonal[k]) / 2
    _require_quadratic(q, H, N)
    return H


def _require_quadratic(q, H, N):
    """Raise unless q agrees with the quadratic form of H on random increments."""
    rng = np.random.default_rng(0)
    for _ in range(2):
        v = rng.standard_normal(N)
        got, want = q(v), float(v @ H @ v)
        scale = max(
            abs(want), abs(got), float(v @ v) * float(np.linalg.norm(H)), 1e-300
        )
        if abs(got - want) > 1e-8 * scale:
            raise ValueError(
                f"the second differential is not a quadratic form in its increment: on "
                f"a random dX it gives {got:.3g} where the quadratic form it defines "
                f"on the unit increments gives {want:.3g}"
            )
