"""Appendix A: matrix manipulation (the vec operator and the products built on it).

The note vectorises column by column (A.1). NumPy stores arrays row by row, so
every function here passes ``order="F"`` explicitly.
"""

import numpy as np

from ._validate import as_float_array

# ----- A.1.1 The vec operator -----


def vec(A):
    """vec(A) of eq. (A.1): the columns of A stacked into one vector, shape (m*n,)."""
    A = np.asarray(A)
    return A.reshape(-1, order="F")


def unvec(v, shape):
    """The inverse of vec: the vector `v` of length prod(shape) laid out column-major."""
    v = np.asarray(v)
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    if v.ndim == 2 and 1 in v.shape:
        v = v.reshape(-1)
    if v.ndim != 1:
        raise ValueError(f"unvec needs a vector, got an array of shape {v.shape}")
    if v.size != int(np.prod(shape)):
        raise ValueError(
            f"unvec: a vector of length {v.size} cannot fill shape {shape} "
            f"(which needs {int(np.prod(shape))} entries)"
        )
    return v.reshape(shape, order="F")


# ----- A.1.2 Hadamard product -----


def hadamard(A, B):
    """The Hadamard product A o B: (A o B)_ij = A_ij B_ij, for A and B of one shape."""
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    if A.shape != B.shape:
        raise ValueError(f"the Hadamard product needs equal shapes, got {A.shape} and {B.shape}")
    return A * B


# ----- A.2 The diag operator -----


def diag(x):
    """diag: R^d -> R^(d x d), the vector x laid along the diagonal of a square matrix."""
    x = as_float_array(x, "x")
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(
            f"diag takes a vector, got shape {x.shape} (for a matrix X, diag(vec(X)) "
            "is probably meant)"
        )
    return np.diag(x)
