"""Chapter 7: matrix functions and structured layers.

The Gaussian negative log-likelihood (built on the inverse, log-determinant and solve
rules of ``derivlib.backprop``), the symmetric eigendecomposition, functions of SPD
matrices (logarithm, square root, inverse square root) with the Daleckii-Krein backward
rule, the singular values and the polar factor behind orthogonal Procrustes.

As in ``derivlib.backprop``, every rule is a pair ``<name>_jvp(*primals, *tangents,
**options)`` and ``<name>_vjp(*primals, G, **options)`` in the shapes of the forward
function, options keyword-only (``f`` of the SPD functions, ``eps`` of covariance
pooling), except ``gaussian_nll_grad``, which returns the gradient of a scalar directly.
Layouts: a matrix argument keeps its own shape (never vec); point sets and features are
columns, A, B (d, n) and F (d, p) or a batch (N, d, p). Each JVP is written from the
forward differential, by code separate from its VJP's (the SPD functions and covariance
pooling through the differentials of the eigendecomposition, eqs. 7.8-7.9, the VJP
through the Loewner matrix; polar and Procrustes through the Sylvester equation of the
symmetric factor, the VJP through eq. 7.19), so the dot-product test compares two
derivations. A matrix that must be symmetric positive definite (Sigma, the S of the SPD
functions) passes the one test of ``derivlib._validate.as_spd``: smallest eigenvalue
above SPD_RTOL = 1e-12 times the largest. A function of a
symmetric matrix S accepts only S symmetric to 1e-10 (relative; ValueError otherwise);
tangents and cotangents may be any square matrices and are symmetrized, so each rule is
the derivative of S -> f(sym(S)), sym(S) = (S + S^T) / 2 (eq. 7.6), which is also what
``jnp.linalg.eigh`` differentiates, and every gradient with respect to S is symmetric.
A result whose exact value overflows float64 (the derivative of S^(-1/2) at eigenvalues
below about 1e-205, of log S below about 1e-308) is a ValueError, never an infinity or
a NaN.
"""

import numbers

import numpy as np

from ._validate import (
    SPD_RTOL,
    as_array_of_shape,
    as_finite_array,
    as_float_array,
    as_spd,
    as_symmetric,
    require_finite,
    require_spd_eigenvalues,
)
from ._validate import as_cotangent as _cotangent
from .backprop import logdet, logdet_vjp, solve, solve_vjp

# ----- Gaussian negative log-likelihood -----


def gaussian_nll(X, mu, Sigma):
    """The negative log-likelihood of the columns of X under N(mu, Sigma) (eq. 7.3).

    X (d, n) holds n observations as columns, mu (d,), Sigma (d, d) symmetric positive
    definite; returns a float.
    """
    X, mu, Sigma = _gaussian_args(X, mu, Sigma)
    d, n = X.shape
    R = X - mu[:, None]
    value = float(
        0.5 * np.sum(R * solve(Sigma, R))
        + 0.5 * n * logdet(Sigma)
        + 0.5 * n * d * np.log(2 * np.pi)
    )
    return _finite_result(value, "gaussian_nll")


def gaussian_nll_grad(X, mu, Sigma):
    """The gradients (mu_bar (d,), Sigma_bar (d, d)) of gaussian_nll (eq. 7.5):
    mu_bar = -Sigma^-1 R 1 and Sigma_bar = (n Sigma^-1 - Sigma^-1 R R^T Sigma^-1) / 2,
    with R = X - mu 1^T, read off Chapter 4's rules for solve and log det."""
    X, mu, Sigma = _gaussian_args(X, mu, Sigma)
    n = X.shape[1]
    R = X - mu[:, None]
    # (1/2) <R, Sigma^-1 R>: the solve rule with cotangent R / 2, plus the direct R
    # term.
    Sigma_bar_quad, R_bar_solve = solve_vjp(Sigma, R, 0.5 * R)
    R_bar = R_bar_solve + 0.5 * solve(Sigma, R)
    Sigma_bar = Sigma_bar_quad + logdet_vjp(Sigma, 0.5 * n)
    return _finite_result(
        (-R_bar.sum(axis=1), 0.5 * Sigma_bar + 0.5 * Sigma_bar.T), "gaussian_nll_grad"
    )


def _gaussian_args(X, mu, Sigma):
    X = as_finite_array(X, "X", 2)
    mu = as_finite_array(mu, "mu", 1)
    d = X.shape[0]
    if mu.shape != (d,):
        raise ValueError(
            f"mu must have shape ({d},) to match X {X.shape}, got {mu.shape}"
        )
    Sigma = as_spd(Sigma, "Sigma")
    if Sigma.shape != (d, d):
        raise ValueError(
            f"Sigma must have shape ({d}, {d}) to match X {X.shape}, got {Sigma.shape}"
        )
    return X, mu, Sigma


# ----- Gradients with respect to a symmetric matrix -----


def sym(A):
    """sym(A) = (A + A^T) / 2, the orthogonal projection onto symmetric matrices (eq.
    7.6)."""
    A = as_finite_array(A, "A", 2)
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be square, got shape {A.shape}")
    return 0.5 * A + 0.5 * A.T  # not 0.5 * (A + A^T), which overflows near 1.8e308


# ----- Symmetric eigendecomposition -----


def eigh(S):
    """S = Q diag(lam) Q^T (eq. 7.7) for a symmetric S (n, n): lam (n,) ascending and
    Q (n, n) orthogonal, each column's entry of largest magnitude made positive (the
    first such entry, if several have that magnitude).

    The convention is locally constant, so eq. 7.9 is its derivative, except where a
    column's two largest |entries| tie: there the sign, and so Q, jumps, and which side
    of the jump S lands on depends on the last bits LAPACK returns (S = [[2, 1], [1, 2]]
    is such a point)."""
    S = as_symmetric(S, "S")
    lam, Q = np.linalg.eigh(S)
    return lam, Q * _column_signs(Q)


def _column_signs(Q):
    rows = np.argmax(np.abs(Q), axis=0)
    return np.where(Q[rows, np.arange(Q.shape[1])] < 0, -1.0, 1.0)


def eigvalsh_jvp(S, dS):
    """d lam_i = q_i^T dS q_i (eq. 7.8): the (n,) differential of the eigenvalues.

    Raises ValueError at a repeated eigenvalue (to 1e3 eps max|lam|), where the
    individual lam_i are not differentiable and q_i^T dS q_i depends on the basis."""
    lam, Q = eigh(S)
    dS = _tangent(dS, Q.shape, "dS")
    for group in _tied_groups(lam):
        raise ValueError(
            f"eigvalsh_jvp needs distinct eigenvalues: lam is not differentiable "
            f"where eigenvalues repeat; got lam[{group[0]}:{group[-1] + 1}] equal "
            f"to {lam[group[0]]:.6g}"
        )
    return _finite_result(np.einsum("ji,jk,ki->i", Q, sym(dS), Q), "eigvalsh_jvp")


def eigvalsh_vjp(S, g):
    """The gradient of <g, lam(S)>: Q diag(g) Q^T (eq. 7.10), g of shape (n,).

    At a repeated eigenvalue (to 1e3 eps max|lam|) <g, lam> is differentiable only if g
    is constant on the tied group (then Q diag(g) Q^T does not depend on the basis of
    the eigenspace); otherwise this raises ValueError."""
    lam, Q = eigh(S)
    g = _cotangent(g, lam.shape, name="g")
    _require_constant_on_ties(lam, g, "eigvalsh_vjp", "eigenvalues", "lam")
    return _finite_result((Q * g) @ Q.T, "eigvalsh_vjp")


def _tied_groups(vals):
    """Index arrays of the runs of sorted vals that agree to 1e3 eps max|vals|."""
    scale = max(float(np.max(np.abs(vals))), np.finfo(float).tiny) if vals.size else 1.0
    close = np.abs(np.diff(vals)) <= 1e3 * np.finfo(float).eps * scale
    groups, start = [], 0
    for i in range(1, vals.size + 1):
        if i == vals.size or not close[i - 1]:
            if i - start > 1:
                groups.append(np.arange(start, i))
            start = i
    return groups


def _require_constant_on_ties(vals, g, what, noun, symbol):
    g_scale = float(np.max(np.abs(g))) if g.size else 0.0
    for group in _tied_groups(vals):
        spread = float(np.ptp(g[group]))
        if spread > 1e-10 * g_scale:
            raise ValueError(
                f"{what}: {symbol}[{group[0]}:{group[-1] + 1}] are repeated {noun} "
                f"({vals[group[0]]:.6g}); <g, {symbol}> is differentiable there only "
                f"if g is constant on them, got g[{group[0]}:{group[-1] + 1}] spread "
                f"over {spread:.3g}"
            )


def _require_distinct_eigenvalues(lam, what):
    """ValueError unless every two eigenvalues differ by more than 1e3 eps max|lam|."""
    scale = max(float(np.max(np.abs(lam))), np.finfo(float).tiny)
    gap = float(np.min(np.diff(lam))) if lam.size > 1 else np.inf  # lam ascending
    if gap <= 1e3 * np.finfo(float).eps * scale:
        raise ValueError(
            f"{what} needs distinct eigenvalues: the eigenvectors of a repeated "
            f"eigenvalue are not differentiable; got an eigengap of {gap:.3g} at "
            f"|lam|max = {scale:.3g}"
        )


def _gap_matrix(lam):
    """F_ij = 1 / (lam_j - lam_i) off the diagonal, 0 on it (eq. 7.9), for the VJP."""
    diff = lam[None, :] - lam[:, None]
    off = ~np.eye(lam.size, dtype=bool)
    F = np.zeros_like(diff)
    F[off] = 1.0 / diff[off]
    return F


def eigvecsh_jvp(S, dS):
    """dQ = Q (F o Q^T dS Q), F_ij = 1 / (lam_j - lam_i) (eq. 7.9); (n, n).

    Computed by its own code, not the VJP's `_gap_matrix`: Omega = Q^T dQ solves the
    off-diagonal of Q^T dS Q = dLambda + Omega Lambda - Lambda Omega entry by entry,
    Omega_ij (lam_j - lam_i) = (Q^T dS Q)_ij, with Omega_ii = 0. Raises ValueError
    when two eigenvalues are equal to working precision.
    """
    lam, Q = eigh(S)
    dS = _tangent(dS, Q.shape, "dS")
    _require_distinct_eigenvalues(lam, "eigvecsh_jvp")
    K = Q.T @ sym(dS) @ Q
    gaps = lam[None, :] - lam[:, None]  # lam_j - lam_i
    np.fill_diagonal(gaps, 1.0)  # the diagonal of K is dLambda, not Omega's
    Omega = K / gaps
    np.fill_diagonal(Omega, 0.0)
    return _finite_result(Q @ Omega, "eigvecsh_jvp")


def eigvecsh_vjp(S, G):
    """The gradient of <G, Q(S)>: sym(Q (F o Q^T G) Q^T) (eq. 7.10); G (n, n)."""
    lam, Q = eigh(S)
    G = _cotangent(G, Q.shape)
    _require_distinct_eigenvalues(lam, "eigvecsh_vjp")
    F = _gap_matrix(lam)
    return _finite_result(sym(Q @ (F * (Q.T @ G)) @ Q.T), "eigvecsh_vjp")


# ----- Functions of SPD matrices: the Daleckii-Krein rule -----


# The plain quotient (log a - log b) / (a - b) loses to cancellation only where the two
# logarithms are close to each other relative to their size: their rounding errors
# (half an ulp of each) are then large against the difference. Where |log a - log b| >
# (|log a| + |log b|) / 16, they add up to less than 8 eps |log a - log b| (eps =
# 2.2e-16), so with the other roundings the quotient's relative error stays below
# about 2e-15, and the careful form is not needed.
_LOG_CANCELS = 1.0 / 16.0


def _log_dd(a, b):
    """(log a - log b) / (a - b), accurate for every a, b > 0 (eq. 7.15), for the
    Loewner matrix of a spectrum lam (n,) or a stack (N, n): a = lam[..., :, None] and
    b = lam[..., None, :], a column and a row of the same eigenvalues.

    With x = (a - b) / (a + b), log a - log b = 2 atanh(x): where |x| < 1/2 (a / b
    between 1/3 and 3) that form is used, with no cancellation at close pairs (at ties,
    where it is 0 / 0, its limit 1 / a); elsewhere, the plain quotient of the two
    logarithms, which cancels there only when both logarithms are large, |log a - log b|
    = log 3 or more against (|log a| + |log b|) / 16 (`_LOG_CANCELS`): only when an
    eigenvalue lies beyond e^(8 log 3) = 6561 or below its inverse. Both forms run over
    the whole matrix (a few element-wise passes and one arctanh per entry, cheaper than
    gathering and scattering the pairs of each form). A spectrum that reaches outside
    [1 / 6561, 6561] is left to `_log_dd_masked`."""
    if not (1.0 / _LOG_FAR_SAFE <= a.min() and a.max() <= _LOG_FAR_SAFE):
        return _log_dd_masked(a, b)
    la, lb = np.log(a), np.log(b)
    d = a - b
    x = d / (a + b)
    near = np.abs(x) < 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        L = la - lb
        L /= d  # the plain quotient; NaN at ties, replaced below
        A = np.arctanh(x)
        A /= 0.5 * d
    np.copyto(L, A, where=near)
    tie = d == 0
    np.copyto(L, np.broadcast_to(1.0 / a, L.shape), where=tie)
    return L


# log 6561 = 8 log 3: inside [1 / 6561, 6561] two logarithms add up to at most 16 log 3,
# so (|log a| + |log b|) / 16 <= log 3 <= |log a - log b| wherever a / b is 3 or more
# (the plain quotient's pairs in `_log_dd`, |x| >= 1/2, also take a / b an ulp short of
# 3 when x rounds up to 1/2: a relative change of 1e-16 in the bound), and the plain
# quotient does not cancel
_LOG_FAR_SAFE = 6561.0


def _log_dd_masked(a, b):
    """`_log_dd` at any spectrum: the plain quotient of the two logarithms is
    computed everywhere; the pairs where those logarithms cancel, |log a - log b| <=
    (|log a| + |log b|) / 16 (ties included), are found by a mask and recomputed by
    `_log_dd_careful`. Elsewhere the plain quotient is within about 2e-15, relative
    (`_LOG_CANCELS`)."""
    la, lb = np.log(a), np.log(b)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L = la - lb
        cancels = np.abs(L) <= _LOG_CANCELS * np.abs(la) + _LOG_CANCELS * np.abs(lb)
        L /= a - b
    if cancels.any():
        *stack, i, j = np.nonzero(cancels)  # a is (..., n, 1), b is (..., 1, n)
        L[(*stack, i, j)] = _log_dd_careful(a[(*stack, i, 0)], b[(*stack, 0, j)])
    return L


def _log_dd_careful(a, b):
    """(log a - log b) / (a - b), accurate for every a, b > 0 (eq. 7.15): with
    x = (a - b) / (a + b), log a - log b = 2 atanh(x), used where |x| < 1/2; elsewhere
    a / b > 3 or < 1/3 and +-log(max(a, b) / min(a, b)) does not cancel (log a - log b
    would, when both logarithms are large: at a = 1e100, b = 3.7e100 it keeps only 14
    digits). Where that ratio overflows, |log a - log b| > 700 and the plain difference
    loses nothing."""
    d = a - b
    with np.errstate(over="ignore"):
        s = a + b
    x = d / s
    # the usual case: the artanh form at every pair (and a + b finite)
    if (np.abs(x) < 0.5).all() and (s < np.inf).all():
        L = 2.0 * np.arctanh(x)
        tie = d == 0
        np.divide(L, d, out=L, where=~tie)
        np.copyto(L, np.broadcast_to(1.0 / a, L.shape), where=tie)
        return L
    with np.errstate(over="ignore", under="ignore", divide="ignore"):
        s = a + b
        x = np.where(np.isfinite(s), d / s, (0.5 * d) / (0.5 * a + 0.5 * b))
        r = np.maximum(a, b) / np.minimum(a, b)  # >= 1, the same for (a, b) and (b, a)
    ratio_ok = np.isfinite(r)
    L = np.sign(d) * np.log(np.where(ratio_ok, r, 1.0))
    if not ratio_ok.all():
        np.copyto(L, np.log(a) - np.log(b), where=~ratio_ok)
    np.copyto(L, 2.0 * np.arctanh(np.clip(x, -0.5, 0.5)), where=np.abs(x) < 0.5)
    tie = d == 0
    np.divide(L, d, out=L, where=~tie)
    np.copyto(L, np.broadcast_to(1.0 / a, L.shape), where=tie)
    return L


def _sqrt_dd(a, b):
    return 1.0 / (np.sqrt(a) + np.sqrt(b))


def _invsqrt_dd(a, b):
    ra, rb = np.sqrt(a), np.sqrt(b)
    return -1.0 / (ra * rb * (ra + rb))


_FUNCTIONS = {
    "log": (np.log, _log_dd),
    "sqrt": (np.sqrt, _sqrt_dd),
    "invsqrt": (lambda x: 1.0 / np.sqrt(x), _invsqrt_dd),
}


def loewner_matrix(lam, f):
    """L_ij = (f(lam_i) - f(lam_j)) / (lam_i - lam_j), L_ii = f'(lam_i) (eq. 7.13),
    for f one of "log", "sqrt", "invsqrt", in a form exact at ties (eq. 7.15)."""
    lam = as_float_array(lam, "lam", 1)
    _require_function(f)
    if not np.all(np.isfinite(lam)):
        bad = float(lam[~np.isfinite(lam)][0])
        raise ValueError(f"lam must be finite, got {bad} in lam of shape {lam.shape}")
    if not np.all(lam > 0):
        raise ValueError(f"lam must be positive, got min {float(np.min(lam)):.3g}")
    return _loewner(lam, f)


def _loewner(lam, f):
    """The Loewner matrix of each spectrum in lam (n,) or a stack (N, n)."""
    return _FUNCTIONS[f][1](lam[..., :, None], lam[..., None, :])


def spd_function(S, *, f):
    """f(S) = Q f(Lambda) Q^T (eq. 7.11) for an SPD S (n, n), f one of "log", "sqrt",
    "invsqrt" (keyword-only)."""
    lam, Q = _spd_eigh(S, f)
    return (Q * _FUNCTIONS[f][0](lam)) @ Q.T


def spd_function_jvp(S, dS, *, f):
    """dF = Q (L o Q^T dS Q) Q^T (eq. 7.12), finite when eigenvalues repeat.

    Computed from the equation that defines f(S) (F F = S, F S F = I, or eq. 7.11
    differentiated with eqs. 7.8-7.9 for the logarithm), by code separate from the
    VJP's Loewner matrix (see `_spd_function_differential`)."""
    lam, Q = _spd_eigh(S, f)
    dF = _spd_function_differential(lam, Q, f, _tangent(dS, Q.shape, "dS"))
    return _finite_result(dF, f"spd_function_jvp (f = {f!r})", lambda: _spectrum(lam))


def spd_function_vjp(S, G, *, f):
    """The gradient of <G, f(S)>: Q (L o Q^T sym(G) Q) Q^T (eq. 7.14); (n, n)."""
    lam, Q = _spd_eigh(S, f)
    S_bar = _daleckii_krein(lam, Q, f, _cotangent(G, Q.shape))
    return _finite_result(
        S_bar, f"spd_function_vjp (f = {f!r})", lambda: _spectrum(lam)
    )


def _daleckii_krein(lam, Q, f, X):
    """Q (L o Q^T sym(X) Q) Q^T: eq. 7.12 for X = dS, eq. 7.14 for X = G (L is
    symmetric, so the map is self-adjoint and the two rules are the same map). For one
    matrix, or a stack of them: lam (N, n), Q and X (N, n, n)."""
    Qt = np.swapaxes(Q, -1, -2)
    return (
        Q
        @ (_loewner(lam, f) * (Qt @ (0.5 * X + 0.5 * np.swapaxes(X, -1, -2)) @ Q))
        @ Qt
    )


def _spd_function_differential(lam, Q, f, dS):
    """dF of F = f(S) in the direction dS, for one matrix or a stack (lam (N, n), Q
    and dS (N, n, n)), each from the equation that defines F, written in the
    eigenbasis of S = Q Lambda Q^T, where K = Q^T sym(dS) Q and dF = Q D Q^T:

    - sqrt: F F = S, so F dF + dF F = dS, and D_ij (r_i + r_j) = K_ij, r = sqrt(lam);
    - invsqrt: F S F = I, so dF S F + F dS F + F S dF = 0, and D_ij (r_i + r_j) =
      -K_ij / (r_i r_j);
    - log: F = Q log(Lambda) Q^T differentiated with eqs. 7.8-7.9, dF = dQ log(Lambda)
      Q^T + Q Lambda^-1 dLambda Q^T + Q log(Lambda) dQ^T, so D_ij = K_ij (log lam_j -
      log lam_i) / (lam_j - lam_i), taken as log1p(t) / |lam_j - lam_i| with t =
      |lam_j - lam_i| / min(lam_i, lam_j) >= 0 (1 / lam_i at t = 0; free of
      cancellation near t = 0, and, since t >= 0, also where one eigenvalue is far
      below the other: log1p of t = (lam_j - lam_i) / lam_i near -1 would lose digits
      to 1 + t, six of them at lam_i / lam_j = 5e11).

    This is the JVP's own code, independent of `_daleckii_krein` and the divided
    differences of `_loewner` that the VJP uses, so the dot-product test compares two
    derivations."""
    Qt = np.swapaxes(Q, -1, -2)
    K = Qt @ (0.5 * dS + 0.5 * np.swapaxes(dS, -1, -2)) @ Q
    li, lj = lam[..., :, None], lam[..., None, :]
    if f == "log":
        h = np.abs(lj - li)
        D = np.log1p(h / np.minimum(li, lj))  # log(max / min), t >= 0
        np.divide(D, h, out=D, where=h != 0)
        np.copyto(D, np.broadcast_to(1.0 / li, D.shape), where=h == 0)
        D = D * K
    else:
        r = np.sqrt(lam)
        ri, rj = r[..., :, None], r[..., None, :]
        D = K / (ri + rj) if f == "sqrt" else -K / (ri * rj * (ri + rj))
    return Q @ D @ Qt


def logm_spd(S):
    """log S for SPD S (eq. 7.11)."""
    return spd_function(S, f="log")


def logm_spd_jvp(S, dS):
    """d log S (eq. 7.12)."""
    return spd_function_jvp(S, dS, f="log")


def logm_spd_vjp(S, G):
    """The gradient of <G, log S> (eq. 7.14)."""
    return spd_function_vjp(S, G, f="log")


def sqrtm_spd(S):
    """S^(1/2) for SPD S (eq. 7.11)."""
    return spd_function(S, f="sqrt")


def sqrtm_spd_jvp(S, dS):
    """d S^(1/2) (eq. 7.12)."""
    return spd_function_jvp(S, dS, f="sqrt")


def sqrtm_spd_vjp(S, G):
    """The gradient of <G, S^(1/2)> (eq. 7.14)."""
    return spd_function_vjp(S, G, f="sqrt")


def invsqrtm_spd(S):
    """S^(-1/2) for SPD S (eq. 7.11): the whitening matrix."""
    return spd_function(S, f="invsqrt")


def invsqrtm_spd_jvp(S, dS):
    """d S^(-1/2) (eq. 7.12)."""
    return spd_function_jvp(S, dS, f="invsqrt")


def invsqrtm_spd_vjp(S, G):
    """The gradient of <G, S^(-1/2)> (eq. 7.14)."""
    return spd_function_vjp(S, G, f="invsqrt")


def _require_function(f):
    if not isinstance(f, str) or f not in _FUNCTIONS:
        raise ValueError(f"f must be one of {sorted(_FUNCTIONS)}, got {f!r}")


def _spd_eigh(S, f):
    _require_function(f)
    S = as_symmetric(S, "S")
    lam, Q = _eigh(S, overwrite=True)  # S is sym(S), our own copy
    # the SPD test lam_min > SPD_RTOL max |lam| on the ascending eigenvalues, whose
    # largest magnitude is at one end, in Python floats (a NumPy reduction costs more
    # than the eigenvalues of a small S); `require_spd_eigenvalues` writes the message
    # (abs(hi) first: max(nan, x) is nan, so a NaN at the top fails as before)
    lo, hi = float(lam[0]), float(lam[-1])
    if not lo > SPD_RTOL * max(abs(hi), abs(lo)):
        require_spd_eigenvalues(lam, "S")
    return lam, Q


def _eigh(S, overwrite=False):
    """LAPACK's divide-and-conquer dsyevd, called directly through SciPy when it is
    installed (as jax.numpy does on the CPU), else through NumPy (the same routine,
    with more checks around it). With overwrite=True LAPACK may overwrite S: pass a
    symmetric array of your own.

    Of SciPy's drivers, dsyevd was the fastest in our measurements at n = 64 and
    n = 256, one thread: dsyevr took 1.3 to 1.4 times as long, and dsyev (QR
    iteration) 1.3 to 2.2 times."""
    try:
        from scipy.linalg.lapack import dsyevd
    except ImportError:
        return np.linalg.eigh(S)
    # S is symmetric: its transpose is the same matrix, and for a C-ordered S it is in
    # the Fortran order LAPACK reads, so passing S.T (whose upper triangle is S's lower
    # one) saves the copy into Fortran order when LAPACK may overwrite S.
    lam, Q, info = dsyevd(S.T, compute_v=1, lower=0, overwrite_a=int(overwrite))
    if info != 0:
        raise np.linalg.LinAlgError(
            f"dsyevd did not converge (info = {info}) for shape {S.shape}"
        )
    return lam, Q


# ----- Singular values, the polar factor and orthogonal Procrustes -----


def svdvals_jvp(M, dM):
    """d sigma_i = u_i^T dM v_i (eq. 7.16) for M (m, n); returns (min(m, n),).

    Raises ValueError where eq. 7.16 does not hold: at a repeated or a zero singular
    value (to 1e3 eps sigma_max), where sigma is not differentiable."""
    M = as_finite_array(M, "M", 2)
    dM = _tangent(dM, M.shape, "dM")
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    _require_differentiable_sigma(s, np.ones_like(s), "svdvals_jvp")
    return np.einsum("ji,jk,ik->i", U, dM, Vt)


def svdvals_vjp(M, g):
    """The gradient of <g, sigma(M)>: U diag(g) V^T (eq. 7.16).

    Where singular values repeat (to 1e3 eps sigma_max), <g, sigma> is differentiable
    only if g is constant on the tied group, and at a zero singular value only if g is
    zero there; then U diag(g) V^T does not depend on the singular vectors the SVD
    picks, and is returned (g = 1 at M = 2 Q gives Q). Otherwise: ValueError."""
    M = as_finite_array(M, "M", 2)
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    g = _cotangent(g, s.shape, name="g")
    _require_differentiable_sigma(s, g, "svdvals_vjp")
    return (U * g) @ Vt


def _require_differentiable_sigma(s, g, what):
    tol = 1e3 * np.finfo(float).eps * float(s[0]) if s.size else 0.0
    zero = s <= tol
    if np.any(zero & (g != 0)):
        i = int(np.argmax(zero & (g != 0)))
        unless = f" or g[{i}] = 0" if what.endswith("vjp") else ""
        raise ValueError(
            f"{what}: sigma[{i}] = {s[i]:.3g} is zero to working precision (sigma_max "
            f"= {s[0]:.3g}), where sigma_i is not differentiable (a kink, as |x| at "
            f"0); eq. 7.16 needs nonzero singular values{unless}"
        )
    if what.endswith("jvp"):
        for group in _tied_groups(s):
            raise ValueError(
                f"{what}: sigma[{group[0]}:{group[-1] + 1}] are repeated singular "
                f"values ({s[group[0]]:.6g}), where sigma is not differentiable; eq. "
                f"7.16 needs distinct singular values"
            )
    else:
        _require_constant_on_ties(s, g, what, "singular values", "sigma")


def polar(M):
    """The orthogonal polar factor R = U V^T of a square, invertible M = U Sigma V^T
    (eq. 7.17): the orthogonal matrix nearest to M."""
    U, s, Vt = _polar_svd(M)
    return U @ Vt


def polar_jvp(M, dM):
    """dR = U (C o (K - K^T)) V^T, K = U^T dM V, C_ij = 1 / (sigma_i + sigma_j) (eq.
    7.18), computed from the forward differential by its own code (see
    `_polar_differential`), not by the VJP's."""
    U, s, Vt = _polar_svd(M)
    dR = _polar_differential(U, s, Vt, _tangent(dM, U.shape, "dM"))
    return _finite_result(dR, "polar_jvp")


def _polar_differential(U, s, Vt, dM):
    """dR for R = polar(M), M = U diag(s) V^T, from the forward differential: R is
    orthogonal, so dR = R Omega with Omega skew, and P = R^T M = V diag(s) V^T is
    symmetric, so dP = -Omega P + R^T dM equals its transpose:

        Omega P + P Omega = R^T dM - dM^T R,

    a Sylvester equation solved in the eigenbasis V of P: (V^T Omega V)_ij =
    (V^T (R^T dM - dM^T R) V)_ij / (s_i + s_j). Separate code from `_polar_rule` (the
    VJP's eq. 7.19)."""
    R = U @ Vt
    A = R.T @ dM - dM.T @ R
    Omega = (Vt @ A @ Vt.T) / (s[:, None] + s[None, :])
    return R @ (Vt.T @ Omega @ Vt)


def polar_vjp(M, G):
    """The gradient of <G, polar(M)>: U (C o (H - H^T)) V^T, H = U^T G V (eq. 7.19)."""
    U, s, Vt = _polar_svd(M)
    return _finite_result(_polar_rule(U, s, Vt, _cotangent(G, U.shape)), "polar_vjp")


def _polar_rule(U, s, Vt, X):
    """U (C o (K - K^T)) V^T with K = U^T X V: eq. 7.18 for X = dM, eq. 7.19 for X =
    G."""
    K = U.T @ X @ Vt.T
    return U @ ((K - K.T) / (s[:, None] + s[None, :])) @ Vt


def _polar_svd(M, what="M"):
    M = as_finite_array(M, "M", 2)
    if M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be square, got shape {M.shape}")
    U, s, Vt = np.linalg.svd(M)
    if not s[-1] > 1e3 * np.finfo(float).eps * s[0]:
        if what != "M":
            raise ValueError(what.format(top=s[0], bottom=s[-1]))
        raise ValueError(
            f"the polar factor needs an invertible M, got singular values "
            f"from {s[0]:.3g} down to {s[-1]:.3g}"
        )
    return U, s, Vt


def procrustes(A, B):
    """The rotation-or-reflection R minimising ||R A - B||_F over orthogonal R
    (eq. 7.20): R = polar(B A^T), for point sets A, B of shape (d, n) as columns."""
    A, B = _point_sets(A, B)
    U, s, Vt = _polar_svd(B @ A.T, _degenerate_points(A))
    return U @ Vt


def procrustes_jvp(A, B, dA, dB):
    """dR = polar_jvp(B A^T, dM) with dM = dB A^T + B dA^T: eq. 7.18 through the
    Procrustes layer R(A, B) = polar(B A^T) of eq. 7.20."""
    A, B = _point_sets(A, B)
    dA, dB = _tangent(dA, A.shape, "dA"), _tangent(dB, B.shape, "dB")
    U, s, Vt = _polar_svd(B @ A.T, _degenerate_points(A))
    dR = _polar_differential(U, s, Vt, dB @ A.T + B @ dA.T)
    return _finite_result(dR, "procrustes_jvp")


def procrustes_vjp(A, B, G):
    """The gradients (A_bar, B_bar) of <G, procrustes(A, B)> (eq. 7.21):
    M_bar = polar_vjp(B A^T, G), A_bar = M_bar^T B, B_bar = M_bar A."""
    A, B = _point_sets(A, B)
    U, s, Vt = _polar_svd(B @ A.T, _degenerate_points(A))
    M_bar = _polar_rule(U, s, Vt, _cotangent(G, U.shape))
    return _finite_result((M_bar.T @ B, M_bar @ A), "procrustes_vjp")


def _point_sets(A, B):
    A = as_finite_array(A, "A", 2)
    B = as_finite_array(B, "B", 2)
    if A.shape != B.shape:
        raise ValueError(
            f"A and B must have the same shape (d, n), got A {A.shape} and B {B.shape}"
        )
    return A, B


def _degenerate_points(A):
    d, n = A.shape
    few = f"; with n = {n} points in d = {d} dimensions it always is" if n < d else ""
    return (
        "procrustes needs point sets A and B (d, n) whose cross-covariance B A^T (d, "
        "d) is invertible, so that the best rotation is unique; got B A^T with "
        "singular values from {top:.3g} down to {bottom:.3g} (as when A or B spans "
        "fewer than d dimensions)" + few
    )


# ----- Input checks -----


def _finite_result(out, what, where="", fix="rescale the input"):
    """`out` (an array, a float or a tuple of them) unchanged if every entry is finite;
    otherwise the exact result overflows float64 (as the derivative of S^(-1/2) does,
    -lam^(-3/2) / 2, below lam = 1e-205), and a ValueError says so rather than return
    an infinity or a NaN. `where` describes the point (see `_spectrum`), or is a
    function that returns the description, called only to write the message."""
    parts = out if isinstance(out, tuple) else (out,)
    if not all(np.isfinite(a).all() for a in parts):
        where = where() if callable(where) else where
        raise ValueError(f"{what}: the result overflows float64{where}; {fix}")
    return out


def _spectrum(lam, name="S"):
    lam = np.asarray(lam)
    return f" at {name} with eigenvalues from {lam.max():.3g} down to {lam.min():.3g}"


def _tangent(dX, shape, name):
    return as_array_of_shape(dX, name, shape, "the tangent {name} must have shape")


# ----- Covariance pooling -----


def covariance_pool(F, W, *, eps):
    """The log-covariance descriptor L = log C of local features (eqs. 7.22, 7.24): C
    = W F J F^T W^T / p + eps I (eq. 7.22), J = I - 1 1^T / p the centring matrix.

    F (d, p) holds d features at each of p pixels (or a batch (N, d, p)), W (k, d) is
    the projection and eps > 0 a float; returns L (k, k) (or (N, k, k)), symmetric.
    eps must be positive: with p <= k pixels, or features that are collinear over the
    image, the projected covariance is singular and its logarithm has an eigenvalue
    of -inf; eps bounds the eigenvalues of C below by eps. It must also stand above
    the rounding error of the covariance: the zero eigenvalues of M M^T / p come out
    of floating point at about 1e-16 times its trace, of either sign, so an eps below
    EPS_FLOOR = 1e-8 times that trace is refused (its logarithm would keep fewer than
    about eight correct digits)."""
    F, W, eps, batched = _pool_args(F, W, eps)
    lam, Q = _pooled_eigh(_pooled_covariance(F, W, eps)[1])
    L = (Q * np.log(lam)[:, None, :]) @ Q.transpose(0, 2, 1)  # eq. 7.11 for each image
    return L if batched else L[0]


def covariance_pool_jvp(F, W, dF, dW, *, eps):
    """dL = Q (L o Q^T dC Q) Q^T (eq. 7.12) with dC = (dM M^T + M dM^T) / p and
    dM = dW F J + W dF J (eq. 7.23); shapes as covariance_pool. The log stage is the
    forward differential of the eigendecomposition (`_spd_function_differential`),
    independent of the VJP's Loewner matrix."""
    F, W, eps, batched = _pool_args(F, W, eps)
    dF = _tangent(dF, F.shape if batched else F.shape[1:], "dF").reshape(F.shape)
    dW = _tangent(dW, W.shape, "dW")
    M, C = _pooled_covariance(F, W, eps)
    p = F.shape[2]
    dM = dW @ _centre(F) + W @ _centre(dF)
    dC = (dM @ M.transpose(0, 2, 1) + M @ dM.transpose(0, 2, 1)) / p
    lam, Q = _pooled_eigh(C)
    dL = _spd_function_differential(lam, Q, "log", dC)  # (7.12), each image
    dL = _finite_result(
        dL, "covariance_pool_jvp", _spectrum(lam, "C"), "raise eps or rescale F, W"
    )
    return dL if batched else dL[0]


def covariance_pool_vjp(F, W, G, *, eps):
    """The gradients (F_bar, W_bar) of <G, covariance_pool(F, W, eps=eps)> (eq. 7.26):
    C_bar = logm_spd_vjp(C, G) (eq. 7.14, for all N images at once), M_bar = 2 C_bar
    M / p, F_bar = W^T M_bar J and W_bar = M_bar J F^T, summed over a batch. G has
    the output's shape, (k, k) or (N, k, k); F_bar has F's shape, W_bar W's."""
    F, W, eps, batched = _pool_args(F, W, eps)
    k, p = W.shape[0], F.shape[2]
    G = _cotangent(G, (F.shape[0], k, k) if batched else (k, k)).reshape(
        F.shape[0], k, k
    )
    M, C = _pooled_covariance(F, W, eps)
    lam, Q = _pooled_eigh(C)
    C_bar = _daleckii_krein(lam, Q, "log", G)  # eq. 7.14 for each image; symmetric
    M_bar = (2.0 / p) * C_bar @ M
    F_bar = _centre(W.T @ M_bar)
    W_bar = np.einsum("nkp,ndp->kd", M_bar, _centre(F))
    _finite_result(
        (F_bar, W_bar), "covariance_pool_vjp", _spectrum(lam, "C"), "raise eps"
    )
    return (F_bar if batched else F_bar[0]), W_bar


def _pooled_eigh(C):
    """The eigenvalues and eigenvectors of each C of a stack (N, k, k), all in one
    call to NumPy's eigh (which runs LAPACK's dsyevd on each). C's eigenvalues are at
    least eps, which _pooled_covariance holds above the rounding error of the rest, so
    none comes out non-positive; if one did, the one SPD test of derivlib (`as_spd`)
    says so rather than take its logarithm."""
    lam, Q = np.linalg.eigh(C)
    require_spd_eigenvalues(lam, "the pooled covariance", " of image {i} (raise eps)")
    return lam, Q


def _centre(X):
    """X J: each row of each (., p) matrix minus its mean (the centring of eq. 7.22)."""
    return X - X.mean(axis=-1, keepdims=True)


# eps must be at least this multiple of tr(M M^T / p), image by image (covariance_pool).
EPS_FLOOR = 1e-8


def _pooled_covariance(F, W, eps):
    """M = W F J (N, k, p) and C = M M^T / p + eps I (N, k, k), symmetric to the bit."""
    with np.errstate(over="ignore", invalid="ignore"):
        M = W @ _centre(F)
        C = M @ M.transpose(0, 2, 1) / F.shape[2]
    scale = np.trace(C, axis1=1, axis2=2)
    if not np.all(np.isfinite(C)):
        raise ValueError(
            f"F and W are too large: the projected covariance of image "
            f"{int(np.argmin(np.isfinite(scale)))} overflows; scale the features down"
        )
    too_small = np.flatnonzero(eps < EPS_FLOOR * scale)
    if too_small.size:
        i = too_small[0]
        raise ValueError(
            f"eps = {eps:.3g} is below {EPS_FLOOR:g} times the trace {scale[i]:.3g} of "
            f"the projected covariance of image {i}: its zero eigenvalues are known "
            f"only to about 1e-16 times that trace, so log(eps) would keep fewer than "
            f"eight correct digits; raise eps to at least {EPS_FLOOR * scale[i]:.3g} "
            f"or scale the features"
        )
    C = 0.5 * (C + C.transpose(0, 2, 1)) + eps * np.eye(W.shape[0])
    return M, C


def _pool_args(F, W, eps):
    F = require_finite(as_float_array(F, "F", (2, 3)), "F")
    W = require_finite(as_float_array(W, "W", 2), "W")
    batched = F.ndim == 3
    d = F.shape[-2]
    if W.shape[1] != d:
        raise ValueError(
            f"W must have shape (k, {d}) to match F {F.shape} (d = {d} features), "
            f"got {W.shape}"
        )
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    eps = float(eps)
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(
            f"eps must be a positive finite float, got {eps!r}: a covariance of "
            f"p pixels has rank at most p - 1 and may be singular, and the "
            f"logarithm of a singular matrix has an eigenvalue of -inf"
        )
    return (F if batched else F[None]), W, eps, batched
