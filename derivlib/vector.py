"""Chapter 2: vector functions (element-wise operators, the sigmoid, the softmax).

Every function takes and returns NumPy float64 arrays. Vectors are 1-D arrays (the
note's column vectors); Jacobians are in numerator layout, J[i, j] = d f_i / d x_j,
and a Jacobian of a matrix function is taken between vec F and vec X (column-major).
"""

import numpy as np

from ._validate import as_float_array, require_finite, require_no_nan
from .matrix import vec

# ----- 2.1 Element-wise operators -----


def elementwise_jacobian(fprime, x):
    """Eq. (2.2): d phi(x) = diag(f'[x]) dx, so the Jacobian is diag(vec f'[x]).

    `fprime` is the derivative of the scalar function, applied element-wise to `x`
    (a vector or a matrix). Returns the (N, N) diagonal matrix, N = x.size.
    """
    x = require_no_nan(as_float_array(x, "x"), "x")
    d = np.asarray(fprime(x), dtype=np.float64)
    if d.shape != x.shape:
        raise ValueError(
            f"fprime must act element-wise: x has shape {x.shape} but fprime(x) "
            f"has shape {d.shape}"
        )
    if not np.all(np.isfinite(d)):
        i = int(np.flatnonzero(~np.isfinite(d.ravel()))[0])
        raise ValueError(
            f"fprime(x) must be finite, got {d.ravel()[i]} at x = {x.ravel()[i]} "
            f"(entry {i} in C order)"
        )
    return np.diag(vec(d))


# ----- 2.2 Sigmoid -----


def sigmoid(x):
    """Eq. (2.3): sigma(x) = 1 / (1 + exp(-x)), element-wise.

    Computed from exp(-|x|), which never overflows, so every finite input (and
    +-inf) gives a correct value in [0, 1].
    """
    x = require_no_nan(as_float_array(x, "x"), "x")
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def sigmoid_derivative(x):
    """sigma'(x) = sigma(x) (1 - sigma(x)), element-wise (derived before eq. 2.4).

    Evaluated as sigma(|x|) sigma(-|x|), using 1 - sigma(x) = sigma(-x): the same
    number, but both factors come from e = exp(-|x|) without the cancellation in
    1 - sigma(x) when sigma(x) is close to one.
    """
    x = require_no_nan(as_float_array(x, "x"), "x")
    e = np.exp(-np.abs(x))
    return (1.0 / (1.0 + e)) * (e / (1.0 + e))


def sigmoid_jacobian(x):
    """Eq. (2.4): the Jacobian diag(sigma[x] o (1 - sigma[x])) of the element-wise
    sigmoid.

    `x` is a vector (n,) or a matrix (m, n); the result is (N, N) with N = x.size,
    taken with respect to vec x."""
    return elementwise_jacobian(sigmoid_derivative, x)


# ----- 2.3 Softmax -----


def softmax_axis(shape):
    """The axis the softmax acts along: the first non-singleton one (0 if there is
    none)."""
    for axis, size in enumerate(shape):
        if size != 1:
            return axis
    return 0


def _as_logits(x, name="x"):
    x = as_float_array(x, name, ndims=(1, 2))
    return require_finite(x, name)


def softmax(x):
    """Eq. (2.5): sigma(x) = exp[x] / (1^T exp[x]), along the first non-singleton
    axis.

    A vector (n,) gives a vector; a matrix X (m, n) gives [sigma(x_1) | ... |
    sigma(x_n)], column by column (or along the row when m == 1). The maximum is
    subtracted before exponentiating, which leaves the result unchanged and keeps exp
    from overflowing."""
    x = _as_logits(x)
    axis = softmax_axis(x.shape)
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def _log_softmax(X, axis=0):
    """log softmax(X) along `axis` of a checked X, by the log-sum-exp trick (finite for
    finite X whose entries along `axis` are less than the largest float apart)."""
    shifted = X - X.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _vector_softmax_jacobian(s):
    """Eq. (2.10) from the softmax values s: diag(s) - s s^T, with its diagonal
    s_a (1 - s_a) formed from the accurate complement (see `_softmax_complement`)."""
    J = -np.outer(s, s)
    J[np.diag_indices_from(J)] = s * _softmax_complement(s, axis=0)
    return J


def _softmax_complement(S, axis):
    """1 - s_a for softmax values S along `axis`, as the sum of the other entries.

    Where s_a rounds to nearly 1, 1 - s_a computed by subtraction keeps only the few
    digits of s_a below its last place, and the diagonal s_a (1 - s_a) of the Jacobian
    loses its relative accuracy. The sum over b != a of s_b, a prefix sum plus a suffix
    sum of positive terms, keeps it.
    """
    S = np.moveaxis(S, axis, 0)
    zero = np.zeros_like(S[:1])
    before = np.concatenate([zero, np.cumsum(S[:-1], axis=0)])  # sum over b < a
    after = np.concatenate([np.cumsum(S[:0:-1], axis=0)[::-1], zero])  # sum over b > a
    return np.moveaxis(before + after, 0, axis)


def softmax_jacobian_blocks(X):
    """The diagonal blocks of the Jacobian of the column-wise softmax (corrected 2.13).

    For X of shape (m, n), m > 1, returns the n blocks diag(s_i) - s_i s_i^T of shape
    (m, m), stacked as (n, m, m); s_i is the softmax of column i. Only these blocks
    are non-zero, and the dense (mn, mn) matrix is never built. A vector (n,) and a
    1 x n matrix each have a single block of shape (n, n).
    """
    X = _as_logits(X, "X")
    S = softmax(X)
    if X.ndim == 1 or softmax_axis(X.shape) == 1:
        columns = S.reshape(1, -1)
    else:
        columns = S.T
    k = columns.shape[1]
    blocks = -columns[:, :, None] * columns[:, None, :]
    diagonal = np.arange(k)
    blocks[:, diagonal, diagonal] = columns * _softmax_complement(columns, axis=1)
    return blocks


def softmax_jacobian(x):
    """The Jacobian of the softmax, numerator layout.

    A vector x (n,): eq. (2.10), diag(sigma(x)) - sigma(x) sigma(x)^T, shape (n, n).
    A matrix X (m, n): the (mn, mn) Jacobian of vec sigma(X) with respect to vec X,
    block diagonal with the blocks of `softmax_jacobian_blocks` (the corrected
    eq. 2.13; see the errata).
    """
    x = _as_logits(x)
    if x.ndim == 1:
        return _vector_softmax_jacobian(softmax(x))
    blocks = softmax_jacobian_blocks(x)
    n_blocks, k, _ = blocks.shape
    J = np.zeros((n_blocks * k, n_blocks * k))
    for i, block in enumerate(blocks):
        J[i * k : (i + 1) * k, i * k : (i + 1) * k] = block
    return J
