"""Chapter 4: reverse mode. Backward rules (VJPs) read off differentials.

Every rule comes in a pair: ``<name>_jvp(*primals, *tangents)`` is the differential
dY = L(dX) (the forward rule) and ``<name>_vjp(*primals, G)`` its adjoint L*(G), the
gradient with respect to the inputs of the scalar <G, Y>. Both take and return arrays
in the shapes of the forward function (never vec layout), so they drop into a
training loop; with several inputs the VJP returns a tuple, one gradient per input.
"""

import numpy as np

from ._validate import as_float_array, require_finite

# ----- Matrix product -----


def matmul_jvp(A, B, dA, dB):
    """d(AB) = dA B + A dB (eq. 4.x)."""
    A, B = _matmul_pair(A, B)
    return dA @ B + A @ dB


def matmul_vjp(A, B, G):
    """The adjoint of d(AB): (Abar, Bbar) = (G B^T, A^T G), for C = AB of shape (m, p)."""
    A, B = _matmul_pair(A, B)
    G = _cotangent(G, (A.shape[0], B.shape[1]))
    return G @ B.T, A.T @ G


# ----- Inverse, log-determinant and linear solve -----


def inverse(A):
    """C = A^-1 for a square, invertible A."""
    A = _square(A, "A")
    return np.linalg.inv(A)


def inverse_jvp(A, dA):
    """d(A^-1) = -A^-1 dA A^-1."""
    C = inverse(A)
    return -C @ dA @ C


def inverse_vjp(A, G):
    """The gradient of <G, A^-1> with respect to A: Abar = -C^T G C^T, C = A^-1."""
    C = inverse(A)
    G = _cotangent(G, C.shape)
    return -C.T @ G @ C.T


def logdet(A):
    """log |det A| for a square, invertible A (the sign is not differentiated)."""
    A = _square(A, "A")
    sign, value = np.linalg.slogdet(A)
    if sign == 0:
        raise ValueError(f"log det needs an invertible A, got a singular matrix of shape {A.shape}")
    return float(value)


def logdet_jvp(A, dA):
    """d log|det A| = tr(A^-1 dA)."""
    A = _square(A, "A")
    return float(np.trace(np.linalg.solve(A, dA)))


def logdet_vjp(A, g):
    """The gradient of g log|det A| with respect to A: g A^-T (g a scalar cotangent)."""
    A = _square(A, "A")
    g = np.asarray(g, dtype=np.float64)
    if g.shape != ():
        raise ValueError(f"the cotangent of log det must be a scalar, got shape {g.shape}")
    return float(g) * inverse(A).T


def solve(A, B):
    """C = A^-1 B, by a linear solve (never forming A^-1)."""
    A = _square(A, "A")
    B = _rhs(A, B)
    return np.linalg.solve(A, B)


def solve_jvp(A, B, dA, dB):
    """dC = A^-1 (dB - dA C), C = A^-1 B: one solve with A."""
    C = solve(A, B)
    return np.linalg.solve(A, dB - dA @ C)


def solve_vjp(A, B, G):
    """The adjoint of dC = A^-1 (dB - dA C): Bbar = A^-T G (one solve with A^T) and
    Abar = -Bbar C^T."""
    C = solve(A, B)
    G = _cotangent(G, C.shape)
    Bbar = np.linalg.solve(A.T, G)
    Cm = C if C.ndim == 2 else C[:, None]
    Bm = Bbar if Bbar.ndim == 2 else Bbar[:, None]
    return -Bm @ Cm.T, Bbar


# ----- Input checks -----


def _matmul_pair(A, B):
    A = require_finite(as_float_array(A, "A", 2), "A")
    B = require_finite(as_float_array(B, "B", 2), "B")
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"AB needs A's columns to match B's rows, got A {A.shape} and B {B.shape}")
    return A, B


def _square(A, name):
    A = require_finite(as_float_array(A, name, 2), name)
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be square, got shape {A.shape}")
    return A


def _rhs(A, B):
    B = require_finite(as_float_array(B, "B", (1, 2)), "B")
    if B.shape[0] != A.shape[0]:
        raise ValueError(f"A^-1 B needs B to have {A.shape[0]} rows, got B {B.shape}")
    return B


def _cotangent(G, shape):
    G = as_float_array(G, "G")
    if G.shape != tuple(shape):
        raise ValueError(f"the cotangent G must have the output's shape {tuple(shape)}, got {G.shape}")
    return G
