"""Chapter 4: reverse mode. Backward rules (VJPs) read off differentials.

Every rule comes in a pair: ``<name>_jvp(*primals, *tangents, **options)`` is the
differential dY = L(dX) (the forward rule) and ``<name>_vjp(*primals, G, **options)``
its adjoint L*(G), the gradient with respect to the inputs of the scalar <G, Y> (eq.
4.2); options are keyword-only. Each JVP is written from the forward differential,
independently of its VJP (they share forward values, never a derivative helper), so
the dot-product test compares two derivations; the one exception is the element-wise
rule, which is given f' and applies it in both directions. Every rule refuses a
non-finite primal, tangent or cotangent and names the argument at fault. Both take and
return arrays in the shapes of the forward function (never vec layout), so they drop
into a training loop; with several inputs the VJP returns a tuple, one gradient per
input. A scalar output has a scalar cotangent, written ``g``.

The softmax rules act along the axis of ``derivlib.softmax`` (eq. 2.5): the first axis
longer than 1, so the columns of an (m, n) matrix with m > 1, but the row of a (1, n)
matrix. The multilayer perceptron always takes its softmax over the columns (axis 0).

The public rules check their arguments and raise ValueError naming the argument, the
expected and the received shape. The multilayer perceptron at the end checks its
inputs once and then runs its own forward and backward pass (eqs. 4.19 and 4.20) on
the checked arrays: the same formulas as the public rules, written out inline so that
the loss and the softmax share one exponential and the backward pass reuses the
stored H = tanh[A]. It does not call the public rules; its gradients are checked
against jax.grad and against the chain of public rules in the tests.
"""

import contextlib

import numpy as np

from ._threads import one_blas_thread
from ._validate import (
    as_array_of_shape,
    as_finite_array,
    as_float_array,
    as_label_columns,
    as_positive_float,
    as_positive_int,
    as_seed,
    require_finite,
)
from ._validate import as_cotangent as _cotangent
from .vector import _log_softmax, softmax, softmax_axis

# ----- Matrix product -----


def matmul_jvp(A, B, dA, dB):
    """Eq. 4.6: d(AB) = dA B + A dB, for A (m, k), B (k, p); shape (m, p)."""
    A, B = _matmul_pair(A, B)
    dA, dB = _tangent(dA, A.shape, "dA"), _tangent(dB, B.shape, "dB")
    return dA @ B + A @ dB


def matmul_vjp(A, B, G):
    """Eq. 4.6: the adjoint of d(AB), (Abar, Bbar) = (G B^T, A^T G), for C = AB of
    shape (m, p); Abar is (m, k) like A and Bbar (k, p) like B."""
    A, B = _matmul_pair(A, B)
    G = _cotangent(G, (A.shape[0], B.shape[1]))
    return G @ B.T, A.T @ G


# ----- Hadamard product -----


def hadamard_jvp(A, B, dA, dB):
    """Eq. 4.7: d(A o B) = dA o B + A o dB, for A and B of one shape."""
    A, B = _same_shape_pair(A, B)
    return _tangent(dA, A.shape, "dA") * B + A * _tangent(dB, B.shape, "dB")


def hadamard_vjp(A, B, G):
    """Eq. 4.7: (Abar, Bbar) = (G o B, G o A), each of the shape of A and B."""
    A, B = _same_shape_pair(A, B)
    G = _cotangent(G, A.shape)
    return G * B, G * A


# ----- Element-wise functions -----


def elementwise_jvp(X, dX, *, fprime):
    """Eq. 4.8: d f[X] = f'[X] o dX, for a scalar function f applied entry by entry.

    `fprime` is f', applied element-wise to X (any shape); the result has X's shape.
    The map is diagonal, so the JVP and the VJP apply the same f'[X]: the dot-product
    test cannot see a wrong `fprime`, only the check against jax.vjp can.
    """
    X = as_finite_array(X, "X")
    return _fprime(fprime, X) * _tangent(dX, X.shape, "dX")


def elementwise_vjp(X, G, *, fprime):
    """Eq. 4.8: Xbar = G o f'[X], of the shape of X (the map is its own adjoint)."""
    X = as_finite_array(X, "X")
    return _cotangent(G, X.shape) * _fprime(fprime, X)


def tanh(X):
    """tanh[X], element-wise (the MLP's activation, eq. 4.19)."""
    return np.tanh(as_finite_array(X, "X"))


def tanh_jvp(X, dX):
    """Eq. 4.8 from the forward differential: d tanh[X] = sech^2[X] o dX, with
    sech^2 x = 1 / cosh^2 x (0 where cosh overflows, |x| > 710). Written
    independently of `tanh_vjp`, which reads 1 - Y o Y off the output."""
    X = as_finite_array(X, "X")
    dX = _tangent(dX, X.shape, "dX")
    with np.errstate(over="ignore"):
        cosh = np.cosh(X)
    return dX * (1.0 / cosh) ** 2


def tanh_vjp(X, G):
    """Eq. 4.8 with tanh' = 1 - tanh^2: Xbar = G o (1 - Y o Y), Y = tanh[X].

    Standalone, the rule takes X and recomputes Y; a backward pass that stored Y (as
    the MLP's does) needs only G o (1 - Y o Y)."""
    X = as_finite_array(X, "X")
    return _tanh_vjp_from_output(np.tanh(X), _cotangent(G, X.shape))


def _tanh_vjp_from_output(Y, G):
    """G o (1 - Y o Y): the VJP reads the forward output Y = tanh[X] only."""
    return G * (1.0 - Y * Y)


# ----- Softmax, log-softmax and the fused cross entropy -----


def softmax_jvp(X, dX):
    """Eq. 4.9: dS = S o (dX - 1 1^T (S o dX)), S = softmax(X), column by column.

    X is a vector (m,) or a matrix (m, n); the softmax acts along the axis of
    `derivlib.softmax` (the columns of a matrix with m > 1). O(mn), no Jacobian.
    Computed from the forward differential of S = E / (1^T E), E = exp[X - max X],
    by the quotient rule: dS = (E o dX) / s - E (1^T (E o dX)) / s^2, s = 1^T E;
    independently of `softmax_vjp`, so that the dot-product test compares two
    derivations.
    """
    X = _logits(X, "X")
    dX = _tangent(dX, X.shape, "dX")
    axis = softmax_axis(X.shape)
    E = np.exp(X - X.max(axis=axis, keepdims=True))
    s = E.sum(axis=axis, keepdims=True)
    dE = E * dX  # d exp[X] = exp[X] o dX
    ds = dE.sum(axis=axis, keepdims=True)  # d(1^T E)
    return dE / s - E * (ds / (s * s))


def softmax_vjp(X, G):
    """Eq. 4.9: Xbar = S o (G - 1 1^T (S o G)), S = softmax(X), shape of X.

    Column i is (diag(s_i) - s_i s_i^T) g_i, the transposed Jacobian block of column i
    applied to g_i. Costs O(mn) operations and memory: the (mn, mn) Jacobian is never
    formed. X and G are checked for NaN and infinity once, inside the passes that
    compute the result (see `_softmax_vjp_columns`).
    """
    X = as_float_array(X, "X", (1, 2))
    G = _cotangent(G, X.shape, finite=False)
    if softmax_axis(X.shape) == 0 and X.ndim == 2:
        return _softmax_vjp_columns(X, G)
    # a vector (m,) or a row (1, n): one softmax, computed as a single column
    column = (X.size, 1)
    return _softmax_vjp_columns(X.reshape(column), G.reshape(column)).reshape(X.shape)


# entries in a block of rows (512 KiB), so that a pass's blocks can stay in cache
_BLOCK = 1 << 16


def _softmax_vjp_columns(X, G):
    """Eq. 4.9 down the columns of X (m, n), with G (m, n), in three passes over memory.

    With M the column maxima of X, E = exp[X - 1 M^T], s = 1^T E and d = 1^T (E o G):
    S = E diag(s)^-1 and 1^T (S o G) = d / s, so Xbar = E o (G - 1 (d / s)^T) / s,
    column by column. Pass 1 reads X for M; pass 2 reads X and G a block of rows at a
    time, writes E into the result and adds the block's rows into s and d while the
    block is in cache; pass 3 reads G and E and overwrites E with Xbar. The only new
    array of the size of X is the result.

    X and G are checked for NaN and infinity on the way, without a pass of their own:
    1^T (X - 1 M^T) is finite only if X is (an infinity in X makes M or X - 1 M^T
    infinite or NaN), and d only if G is (an infinity times E in [0, 1] is infinite or
    NaN). Only when one of them is not finite (or a sum overflowed) are X and G scanned,
    in that order, so that the error names the argument at fault. When both are finite
    and d overflowed (entries of G near the largest float, in a column whose E has
    several entries near 1), 1^T (S o G) is summed again from E / s, whose terms are no
    larger than G's: one more pass, only then.
    """
    m, n = X.shape
    rows = max(1, _BLOCK // n)
    out = np.empty((m, n))
    work = np.empty((min(rows, m), n))
    s, d, x_sums, part = np.zeros(n), np.zeros(n), np.zeros(n), np.empty(n)
    with np.errstate(over="ignore", invalid="ignore"):
        M = X.max(axis=0)
        for start in range(0, m, rows):
            E, Gb = out[start : start + rows], G[start : start + rows]
            T = work[: E.shape[0]]
            np.subtract(X[start : start + rows], M, out=E)
            x_sums += np.add.reduce(E, axis=0, out=part)
            np.exp(E, out=E)
            s += np.add.reduce(E, axis=0, out=part)
            d += np.add.reduce(np.multiply(E, Gb, out=T), axis=0, out=part)
        if not (np.isfinite(x_sums).all() and np.isfinite(d).all()):
            require_finite(X, "X")
            require_finite(G, "G")
        r = 1.0 / s
        if np.isfinite(d).all():
            d *= r  # d / s = 1^T (S o G)
        else:  # X and G are finite, but a sum 1^T (E o G) overflowed
            d[:] = 0.0
            for start in range(0, m, rows):
                T = work[: min(rows, m - start)]
                np.multiply(out[start : start + rows], r, out=T)  # S
                T *= G[start : start + rows]
                d += np.add.reduce(T, axis=0, out=part)
        for start in range(0, m, rows):
            E = out[start : start + rows]
            T = work[: E.shape[0]]
            np.subtract(G[start : start + rows], d, out=T)
            E *= T
            E *= r
    return out


def log_softmax(X):
    """log softmax(X) = X - 1 log(1^T exp[X]) along the softmax axis, without
    overflow."""
    X = _logits(X, "X")
    return _log_softmax(X, softmax_axis(X.shape))


def log_softmax_jvp(X, dX):
    """Eq. 4.10: d log softmax(X) = dX - 1 1^T (S o dX), column by column."""
    X = _logits(X, "X")
    axis = softmax_axis(X.shape)
    dX = _tangent(dX, X.shape, "dX")
    return dX - (softmax(X) * dX).sum(axis=axis, keepdims=True)


def log_softmax_vjp(X, G):
    """Eq. 4.10: Xbar = G - S o (1 1^T G), S = softmax(X), shape of X."""
    X = _logits(X, "X")
    axis = softmax_axis(X.shape)
    G = _cotangent(G, X.shape)
    return G - softmax(X) * G.sum(axis=axis, keepdims=True)


def softmax_cross_entropy(Z, Y):
    """Eq. 4.11: l(Z, Y) = -1^T (Y o log softmax(Z)) 1, the summed cross entropy of the
    labels Y (columns one-hot, or any non-negative weights) with the softmax of the
    logits Z, both (k, n), k > 1 (a (1, n) input is one softmax along its row).
    Evaluated from log-softmax: no log 0, no overflow; logits whose range overflows
    float64 raise ValueError."""
    Z, Y = _logits_and_targets(Z, Y)
    return float(-np.sum(Y * _finite_log_softmax(Z, softmax_axis(Z.shape))))


def softmax_cross_entropy_jvp(Z, Y, dZ, dY):
    """Eq. 4.11, first form: dl = -<Y, d log softmax(Z)> - <log softmax(Z), dY>, a
    scalar, with d log softmax(Z) = dZ - 1 1^T (S o dZ) of eq. 4.10, S = softmax(Z).

    Written from the forward differential, independently of the VJP's gradient
    S o (1 1^T Y) - Y, so that the dot-product test compares two derivations."""
    Z, Y = _logits_and_targets(Z, Y)
    dZ, dY = _tangent(dZ, Z.shape, "dZ"), _tangent(dY, Y.shape, "dY")
    axis = softmax_axis(Z.shape)
    log_S = _finite_log_softmax(Z, axis)
    d_log_S = dZ - (softmax(Z) * dZ).sum(axis=axis, keepdims=True)
    return float(-np.sum(Y * d_log_S) - np.sum(log_S * dY))


def softmax_cross_entropy_vjp(Z, Y, g):
    """Eq. 4.11: (Zbar, Ybar) = (g (S o (1 1^T Y) - Y), -g log softmax(Z)), S =
    softmax(Z).

    For one-hot columns (1^T y_i = 1) Zbar is g (Pi - Y), the fused gradient of
    Chapter 3 (eq. 3.20b): the division by Pi in the cross entropy's own gradient
    cancels against the softmax Jacobian, so no small probability is ever divided by."""
    Z, Y = _logits_and_targets(Z, Y)
    g = _scalar_cotangent(g)
    axis = softmax_axis(Z.shape)
    log_S = _finite_log_softmax(Z, axis)
    Zbar = softmax(Z) * Y.sum(axis=axis, keepdims=True) - Y
    return g * Zbar, -g * log_S


# ----- Transposition -----


def transpose_jvp(A, dA):
    """Eq. 4.12: d(A^T) = (dA)^T, shape (n, m) for A (m, n)."""
    A = as_finite_array(A, "A", 2)
    return _tangent(dA, A.shape, "dA").T


def transpose_vjp(A, G):
    """Eq. 4.12: Abar = G^T, shape (m, n) for the cotangent G (n, m) of A^T."""
    A = as_finite_array(A, "A", 2)
    return _cotangent(G, A.T.shape).T


# ----- Inverse, log-determinant and linear solve -----


def inverse(A):
    """C = A^-1 for a square, invertible A (eq. 4.13)."""
    A = _square(A, "A")
    try:
        return np.linalg.inv(A)
    except np.linalg.LinAlgError as exc:
        raise ValueError(
            f"A^-1 needs an invertible A, got a singular matrix of shape {A.shape}"
        ) from exc


def inverse_jvp(A, dA):
    """Eq. 4.13: d(A^-1) = -A^-1 dA A^-1, shape of A."""
    C = inverse(A)
    return -C @ _tangent(dA, C.shape, "dA") @ C


def inverse_vjp(A, G):
    """Eq. 4.13: the gradient of <G, A^-1> with respect to A, Abar = -C^T G C^T,
    C = A^-1; G and Abar have the shape (d, d) of A."""
    C = inverse(A)
    G = _cotangent(G, C.shape)
    return -C.T @ G @ C.T


def logdet(A):
    """log |det A| for a square, invertible A (eq. 4.14; the sign is not
    differentiated)."""
    A = _square(A, "A")
    sign, value = np.linalg.slogdet(A)
    if sign == 0:
        raise ValueError(
            f"log det needs an invertible A, got a singular matrix of shape {A.shape}"
        )
    return float(value)


def logdet_jvp(A, dA):
    """Eq. 4.14: d log|det A| = tr(A^-1 dA), a scalar."""
    A = _square(A, "A")
    dA = _tangent(dA, A.shape, "dA")
    return float(np.trace(_solve(A, dA)))


def logdet_vjp(A, g):
    """Eq. 4.14: the gradient of g log|det A| with respect to A, g A^-T (g a scalar
    cotangent); shape (d, d) of A."""
    A = _square(A, "A")
    g = _scalar_cotangent(g)
    return g * inverse(A).T


def solve(A, B):
    """C = A^-1 B, by a linear solve (never forming A^-1); eq. 4.15.

    A is (d, d); B is (d, p) or a vector (d,), and C has the shape of B.
    """
    A = _square(A, "A")
    B = _rhs(A, B)
    return _solve(A, B)


def solve_jvp(A, B, dA, dB):
    """Eq. 4.15: dC = A^-1 (dB - dA C), C = A^-1 B: one solve with A."""
    C = solve(A, B)
    dA, dB = _tangent(dA, A.shape, "dA"), _tangent(dB, C.shape, "dB")
    return _solve(A, dB - dA @ C)


def solve_vjp(A, B, G):
    """Eq. 4.15: the adjoint of dC = A^-1 (dB - dA C): Bbar = A^-T G (one solve with
    A^T) and Abar = -Bbar C^T; Abar is (d, d), Bbar has the shape of B."""
    C = solve(A, B)
    G = _cotangent(G, C.shape)
    Bbar = _solve(np.asarray(A, dtype=np.float64).T, G)
    Cm = C if C.ndim == 2 else C[:, None]
    Bm = Bbar if Bbar.ndim == 2 else Bbar[:, None]
    return -Bm @ Cm.T, Bbar


def _solve(A, B):
    try:
        return np.linalg.solve(A, B)
    except np.linalg.LinAlgError as exc:
        raise ValueError(
            f"A^-1 B needs an invertible A, got a singular matrix of shape {A.shape}"
        ) from exc


# ----- Trace and Frobenius norm -----


def trace_jvp(A, dA):
    """Eq. 4.16: d tr(A) = tr(dA) = <I, dA>, a scalar, for a square A."""
    A = _square(A, "A")
    return float(np.trace(_tangent(dA, A.shape, "dA")))


def trace_vjp(A, g):
    """Eq. 4.16: Abar = g I, shape (d, d) of A."""
    A = _square(A, "A")
    return _scalar_cotangent(g) * np.eye(A.shape[0])


def frobenius_norm(A):
    """||A||_F = sqrt(<A, A>), for an array of any shape (eq. 4.17).

    The entries are divided by the largest |a_ij| before squaring and the factor is
    put back after the square root, so entries near the largest float do not overflow.
    """
    return _frobenius_norm(as_finite_array(A, "A"))


def _frobenius_norm(A):
    scale = float(np.max(np.abs(A)))
    if scale == 0.0:
        return 0.0
    return scale * float(np.sqrt(np.sum((A / scale) ** 2)))


def frobenius_norm_jvp(A, dA):
    """Eq. 4.17: d||A||_F = <A, dA> / ||A||_F, a scalar; A must not be zero."""
    A, norm = _nonzero_norm(A)
    return float(np.sum((A / norm) * _tangent(dA, A.shape, "dA")))


def frobenius_norm_vjp(A, g):
    """Eq. 4.17: Abar = g A / ||A||_F, shape of A; A must not be zero."""
    A, norm = _nonzero_norm(A)
    return _scalar_cotangent(g) * (A / norm)


def _nonzero_norm(A):
    A = as_finite_array(A, "A")
    norm = _frobenius_norm(A)
    if norm == 0.0:
        raise ValueError(
            f"the Frobenius norm is not differentiable at A = 0 (A of shape {A.shape} "
            f"is all zeros)"
        )
    return A, norm


# ----- Broadcast bias -----


def add_bias(X, b):
    """X + b 1^T: the bias b (m,) added to every column of X (m, n) (eq. 4.18)."""
    X, b = _bias_pair(X, b)
    return X + b[:, None]


def add_bias_jvp(X, b, dX, db):
    """Eq. 4.18: d(X + b 1^T) = dX + db 1^T, shape (m, n)."""
    X, b = _bias_pair(X, b)
    return _tangent(dX, X.shape, "dX") + _tangent(db, b.shape, "db")[:, None]


def add_bias_vjp(X, b, G):
    """Eq. 4.18: (Xbar, bbar) = (G, G 1): the bias collects the sum over the columns,
    bbar of shape (m,)."""
    X, b = _bias_pair(X, b)
    G = _cotangent(G, X.shape)
    return G, G.sum(axis=1)


# ----- A multilayer perceptron -----

MLP_PARAMETERS = ("W1", "b1", "W2", "b2")


def mlp_init(n_in, n_hidden, n_out, rng):
    """Parameters of the MLP of eq. 4.19, as a dict: W1 (n_hidden, n_in), b1
    (n_hidden,), W2 (n_out, n_hidden), b2 (n_out,).

    Weights are drawn uniformly from +-sqrt(6 / (fan_in + fan_out)) (Glorot and
    Bengio's rule, as scikit-learn's MLPClassifier does for tanh), biases likewise;
    `rng` is a ``numpy.random.Generator``, so a fixed seed gives fixed parameters."""
    sizes = {"n_in": n_in, "n_hidden": n_hidden, "n_out": n_out}
    for name, value in sizes.items():
        if (
            not isinstance(value, (int, np.integer))
            or isinstance(value, bool)
            or value < 1
        ):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}"
        )
    bound1 = np.sqrt(6.0 / (n_in + n_hidden))
    bound2 = np.sqrt(6.0 / (n_hidden + n_out))
    return {
        "W1": rng.uniform(-bound1, bound1, (n_hidden, n_in)),
        "b1": rng.uniform(-bound1, bound1, n_hidden),
        "W2": rng.uniform(-bound2, bound2, (n_out, n_hidden)),
        "b2": rng.uniform(-bound2, bound2, n_out),
    }


def mlp_forward(params, X):
    """Eq. 4.19: the logits Z = W2 tanh[W1 X + b1 1^T] + b2 1^T, shape (n_out, n), for
    observations as the columns of X (n_in, n)."""
    params = _mlp_params(params)
    X = _mlp_inputs(params, X)
    return _mlp_forward(params, X)[1]


def mlp_predict(params, X):
    """The predicted class of every column of X: the row of the largest logit, shape
    (n,)."""
    return np.argmax(mlp_forward(params, X), axis=0)


def mlp_loss(params, X, Y):
    """Eq. 4.19: the mean cross entropy L = l(Z, Y) / n of the logits Z =
    mlp_forward(params, X) with the targets Y (n_out, n)."""
    params = _mlp_params(params)
    X = _mlp_inputs(params, X)
    Y = _mlp_targets(params, X, Y)
    Z = _mlp_forward(params, X)[1]
    return float(-np.sum(Y * _log_softmax(Z, 0)) / X.shape[1])


def mlp_loss_and_grad(params, X, Y, *, check_finite=True):
    """Eq. 4.20: the loss of eq. 4.19 and its gradient with respect to every parameter,
    by the backward pass: the rules of eqs. 4.6, 4.8, 4.11 and 4.18 applied from the
    loss back to W1. Returns (L, grads), grads a dict shaped like `params`.

    Shapes are always checked. Every array is scanned once for NaN and infinity, in
    the copies with the biases folded in (`_fold_bias`); ``check_finite=False`` skips
    that scan (as in SciPy's linear algebra), for a training loop that has checked its
    data once: a non-finite input then gives non-finite or wrong results (an infinite
    weight saturates tanh, and its gradient is a finite 0).
    """
    checked = _mlp_params(params, False)
    X_checked = _mlp_inputs(checked, X, "X", False)
    Y_checked = _mlp_targets(checked, X_checked, Y, "Y", False)
    W1b, W2b = (
        _fold_bias(checked["W1"], checked["b1"]),
        _fold_bias(checked["W2"], checked["b2"]),
    )
    Xb = _append_ones(X_checked)
    if check_finite and not all(
        np.isfinite(a).all() for a in (W1b, W2b, Xb, Y_checked)
    ):
        # one scan of the folded copies; when it fails, the checks that name the
        # argument at fault, in the order params, X, Y
        checked = _mlp_params(params)
        _mlp_targets(checked, _mlp_inputs(checked, X), Y)
    with _small_products(W1b, Xb.shape[1]):
        loss, G1b, G2b = _mlp_loss_and_grad(W1b, W2b, Xb, Y_checked)
    return loss, _unfold_bias(G1b, G2b)


# Up to this many multiply-adds in the first layer's product, the products of a step
# run on one BLAS thread. Measured on a 2-core machine at the digits' size (a batch of
# 256): in a process with JAX, as in this book's chapters (XLA's thread pool holds the
# other core between its calls), two threads took 0.23 to 0.36 ms a step from one
# process to the next, one thread 0.25 ms; when the machine is busy the second thread
# waits for a core, and one thread was still faster at 1e8 (9.5 ms against 22 ms). The
# price: alone on an idle machine, two threads would take 0.19 to 0.24 ms against 0.24
# to 0.32 ms. A later re-measurement on the same machine, while others used it, did
# not show the slow two-thread steps beside JAX: in three processes the step's
# arithmetic took 0.18 ms on two threads against 0.20 ms on one. Above it, the BLAS
# keeps its threads
_ONE_THREAD_WORK = 1e8


def _small_products(W1b, n):
    """`derivlib._threads.one_blas_thread()` when the first layer's product, W1b
    times n columns, is at most _ONE_THREAD_WORK multiply-adds; otherwise a context
    that changes nothing."""
    if W1b.shape[0] * W1b.shape[1] * n > _ONE_THREAD_WORK:
        return contextlib.nullcontext()
    return one_blas_thread()


def _mlp_forward(params, X):
    A = params["W1"] @ X
    A += params["b1"][:, None]  # A = W1 X + b1 1^T
    H = np.tanh(A, out=A)  # H = tanh[A]; A itself is not needed again
    Z = params["W2"] @ H
    Z += params["b2"][:, None]  # Z = W2 H + b2 1^T
    return H, Z


def _fold_bias(W, b):
    """[W b]: the weights with the bias as one more column, so that W x + b is one
    product [W b] [x; 1] (eq. 4.18 folded into eq. 4.6)."""
    Wb = np.empty((W.shape[0], W.shape[1] + 1))
    Wb[:, :-1], Wb[:, -1] = W, b
    return Wb


def _append_ones(X):
    """[X; 1^T]: the observations with a row of ones appended, for `_fold_bias`."""
    Xb = np.empty((X.shape[0] + 1, X.shape[1]))
    Xb[:-1], Xb[-1] = X, 1.0
    return Xb


def _unfold_bias(G1b, G2b):
    """The gradients of [W1 b1] and [W2 b2] as the dict of `mlp_loss_and_grad`."""
    return {"W1": G1b[:, :-1], "b1": G1b[:, -1], "W2": G2b[:, :-1], "b2": G2b[:, -1]}


def _mlp_loss_and_grad(W1b, W2b, Xb, Y):
    """Eqs. 4.19 and 4.20 on checked inputs, with the biases folded into the products:
    W1b = [W1 b1], W2b = [W2 b2] and Xb = [X; 1^T] (`_fold_bias`, `_append_ones`), so
    that A = W1b Xb, Z = W2b [H; 1^T], and the gradients of the folded weights,
    Zbar [H; 1^T]^T = [W2bar b2bar] and Abar Xb^T = [W1bar b1bar], carry the bias
    gradients Zbar 1 and Abar 1 (eq. 4.18) as their last columns. Returns (L, [W1bar
    b1bar], [W2bar b2bar]).

    The loss and the softmax share one exponential: with Z shifted by its column
    maxima, E = exp[Z], s = 1^T E, log softmax(Z) = Z - 1 log[s]^T and Pi = E
    diag(s)^-1. Every array of the shape of H or Z is overwritten in place once it is
    not needed again, and the sums over the k rows of Z are products with 1 (BLAS),
    faster than a strided reduction."""
    h, n = W1b.shape[0], Xb.shape[1]
    Hb = np.empty((h + 1, n))
    H = Hb[:h]
    np.matmul(W1b, Xb, out=H)  # A = W1 X + b1 1^T
    np.tanh(H, out=H)  # H = tanh[A]; A itself is not needed again
    Hb[h] = 1.0
    Z = W2b @ Hb  # Z = W2 H + b2 1^T
    Z -= Z.max(axis=0)
    E = np.exp(Z)
    ones = np.ones(Z.shape[0])
    sums = ones @ E
    y_sums = ones @ Y  # 1^T Y: ones for one-hot labels
    loss = float(
        (y_sums @ np.log(sums) - np.vdot(Y, Z)) / n
    )  # -<Y, log softmax(Z)> / n
    sums *= n
    np.divide(y_sums, sums, out=sums)
    E *= sums
    E -= np.multiply(Y, 1.0 / n, out=Z)  # Z is not needed again
    Zbar = E  # eq. 4.11 with g = 1/n: (Pi o 1 1^T Y - Y) / n
    Abar = W2b[:, :h].T @ Zbar  # eq. 4.6: Hbar, the gradient of W2 H with respect to H
    G2b = Zbar @ Hb.T  # eqs. 4.6 and 4.18, second layer: [W2bar b2bar]
    np.multiply(H, H, out=H)
    np.subtract(1.0, H, out=H)
    Abar *= H  # eq. 4.8: Hbar o (1 - H o H); H is not needed again
    return loss, Abar @ Xb.T, G2b  # eqs. 4.6 and 4.18: [W1bar b1bar]


def fit_mlp(
    X,
    Y,
    *,
    n_hidden=64,
    epochs=30,
    batch_size=8,
    learning_rate=0.05,
    seed=0,
    X_test=None,
    Y_test=None,
):
    """Train the MLP of eq. 4.19 by mini-batch gradient descent with the backward pass
    of eq. 4.20.

    X (n_in, n) holds the observations as columns; Y their labels, in either form of
    every fitting function of derivlib (``derivlib._validate.as_label_columns``): class
    indices, a 1-D integer array (n,) in [0, k), or (k, n) columns of probabilities
    (one-hot or soft labels); n_out = k. Y_test takes the same forms, with the same k.
    The options are keyword-only. Every epoch visits the columns in an order drawn from
    ``default_rng(seed)``, in batches of `batch_size`, and steps every parameter by
    -learning_rate times its gradient. Returns (params, history); history is a dict of
    per-epoch lists: 'train_loss' (eq. 4.19 on all of X after the epoch) and, when a
    test set is given, 'test_loss'. The same arguments give the same result on every
    run.
    """
    X = as_finite_array(X, "X", 2)
    Y = as_label_columns(Y, "Y")
    if Y.shape[1] != X.shape[1]:
        raise ValueError(
            f"Y must have one label per observation, X has {X.shape[1]} and Y has "
            f"shape {Y.shape}"
        )
    epochs = as_positive_int(epochs, "epochs")
    batch_size = as_positive_int(batch_size, "batch_size")
    learning_rate = as_positive_float(learning_rate, "learning_rate")
    seed = as_seed(seed)
    if (X_test is None) != (Y_test is None):
        raise ValueError("X_test and Y_test must be given together")
    if Y_test is not None:
        Y_test = as_label_columns(Y_test, "Y_test", Y.shape[0])
    rng = np.random.default_rng(seed)
    params = mlp_init(X.shape[0], n_hidden, Y.shape[0], rng)
    have_test = X_test is not None
    if have_test:
        X_test = _mlp_inputs(params, X_test, "X_test")
        Y_test = _mlp_targets(params, X_test, Y_test, "Y_test")
    history = {"train_loss": [], "test_loss": []} if have_test else {"train_loss": []}
    # The loop works on the folded weights [W1 b1], [W2 b2] and [X; 1^T]
    # (`_fold_bias`): one product per layer and one update per layer.
    W1b, W2b = (
        _fold_bias(params["W1"], params["b1"]),
        _fold_bias(params["W2"], params["b2"]),
    )
    Xb = _append_ones(X)
    Xb_test = _append_ones(X_test) if have_test else None
    n = X.shape[1]
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        with np.errstate(
            over="ignore", invalid="ignore"
        ):  # divergence is reported below
            with _small_products(W1b, min(batch_size, n)):
                for start in range(0, n, batch_size):
                    batch = order[start : start + batch_size]
                    _, G1b, G2b = _mlp_loss_and_grad(
                        W1b, W2b, Xb[:, batch], Y[:, batch]
                    )
                    G1b *= learning_rate
                    W1b -= G1b
                    G2b *= learning_rate
                    W2b -= G2b
            loss = _mlp_loss_and_grad(W1b, W2b, Xb, Y)[0]
        if not (
            np.isfinite(loss) and np.isfinite(W1b).all() and np.isfinite(W2b).all()
        ):
            raise ValueError(
                f"training diverged in epoch {epoch} (the loss or a parameter is not "
                f"finite): learning_rate {learning_rate} is too large"
            )
        history["train_loss"].append(loss)
        if have_test:
            history["test_loss"].append(
                _mlp_loss_and_grad(W1b, W2b, Xb_test, Y_test)[0]
            )
    params = {
        "W1": W1b[:, :-1].copy(),
        "b1": W1b[:, -1].copy(),
        "W2": W2b[:, :-1].copy(),
        "b2": W2b[:, -1].copy(),
    }
    return params, history


def _mlp_params(params, check_finite=True):
    if not isinstance(params, dict) or set(params) != set(MLP_PARAMETERS):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            f"params must be a dict with keys {list(MLP_PARAMETERS)}, got {got}"
        )
    p = {
        name: _checked(params[name], name, 1 if name[0] == "b" else 2, check_finite)
        for name in MLP_PARAMETERS
    }
    h, o = p["W1"].shape[0], p["W2"].shape[0]
    expected = {"b1": (h,), "W2": (o, h), "b2": (o,)}
    for name, shape in expected.items():
        if name == "W2" and p[name].shape[1] != h:
            raise ValueError(
                f"W2 must have {h} columns (the rows of W1), got shape {p[name].shape}"
            )
        if name != "W2" and p[name].shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {p[name].shape}")
    return p


def _mlp_inputs(params, X, name="X", check_finite=True):
    X = _checked(X, name, 2, check_finite)
    if X.shape[0] != params["W1"].shape[1]:
        raise ValueError(
            f"{name} must have {params['W1'].shape[1]} rows (the columns of W1), got "
            f"shape {X.shape}"
        )
    return X


def _mlp_targets(params, X, Y, name="Y", check_finite=True):
    Y = _checked(Y, name, 2, check_finite)
    expected = (params["W2"].shape[0], X.shape[1])
    if Y.shape != expected:
        raise ValueError(
            f"{name} must have shape {expected} (outputs, observations), got {Y.shape}"
        )
    return Y


# ----- Input checks -----


def _checked(x, name, ndims, check_finite):
    return (
        as_finite_array(x, name, ndims)
        if check_finite
        else as_float_array(x, name, ndims)
    )


def _matmul_pair(A, B):
    A, B = as_finite_array(A, "A", 2), as_finite_array(B, "B", 2)
    if A.shape[1] != B.shape[0]:
        raise ValueError(
            f"AB needs A's columns to match B's rows, got A {A.shape} and B {B.shape}"
        )
    return A, B


def _same_shape_pair(A, B):
    A, B = as_finite_array(A, "A"), as_finite_array(B, "B")
    if A.shape != B.shape:
        raise ValueError(f"A o B needs B to have A's shape {A.shape}, got B {B.shape}")
    return A, B


def _fprime(fprime, X):
    if not callable(fprime):
        raise ValueError(
            f"fprime must be a function applied element-wise to X {X.shape}, got "
            f"{type(fprime).__name__}"
        )
    d = np.asarray(fprime(X), dtype=np.float64)
    if d.shape != X.shape:
        raise ValueError(
            f"fprime must act element-wise: X has shape {X.shape} but fprime(X) has "
            f"shape {d.shape}"
        )
    return d


def _logits(X, name):
    return as_finite_array(X, name, (1, 2))


def _finite_log_softmax(Z, axis, name="Z"):
    """log softmax(Z) of a checked Z; raises when a column's logits are so far apart
    (a range above the largest float, about 1.8e308) that Z - max Z overflows."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = _log_softmax(Z, axis)
    if not np.all(np.isfinite(out)):
        raise ValueError(
            f"{name} of shape {Z.shape} has logits too far apart for float64: the "
            f"log-softmax overflows (the largest minus the smallest logit of a column "
            f"must be finite)"
        )
    return out


def _logits_and_targets(Z, Y):
    Z = _logits(Z, "Z")
    Y = as_finite_array(Y, "Y", (1, 2))
    if Y.shape != Z.shape:
        raise ValueError(
            f"the targets Y must have the shape {Z.shape} of the logits Z, got "
            f"{Y.shape}"
        )
    return Z, Y


def _bias_pair(X, b):
    X, b = as_finite_array(X, "X", 2), as_finite_array(b, "b", 1)
    if b.shape[0] != X.shape[0]:
        raise ValueError(
            f"X + b 1^T needs b of shape ({X.shape[0]},) for X {X.shape}, got b "
            f"{b.shape}"
        )
    return X, b


def _square(A, name):
    A = as_finite_array(A, name, 2)
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be square, got shape {A.shape}")
    return A


def _rhs(A, B):
    B = as_finite_array(B, "B", (1, 2))
    if B.shape[0] != A.shape[0]:
        raise ValueError(f"A^-1 B needs B to have {A.shape[0]} rows, got B {B.shape}")
    return B


def _tangent(dX, shape, name):
    return as_array_of_shape(
        dX, name, shape, "the tangent {name} must have the input's shape"
    )


def _scalar_cotangent(g):
    g = as_finite_array(g, "g")
    if g.shape != ():
        raise ValueError(
            f"the cotangent g of a scalar output must be a scalar, got shape {g.shape}"
        )
    return float(g)
