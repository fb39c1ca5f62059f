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
    """The inverse of vec: the vector `v` of length prod(shape) laid out
    column-major."""
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
    A, B = as_float_array(A, "A"), as_float_array(B, "B")
    if A.shape != B.shape:
        raise ValueError(
            f"the Hadamard product needs A and B of one shape, got A of shape "
            f"{A.shape} and B of shape {B.shape}"
        )
    return A * B


# ----- A.1.3 Kronecker product -----


def kron(A, B):
    """Eq. (A.2): the Kronecker product A (x) B = (a_ij B), shape (m*p, n*q) for A of
    shape (m, n) and B of shape (p, q).

    Built block by block, as the definition reads: block (i, j) is a_ij B.
    """
    A = _matrix(A, "A")
    B = _matrix(B, "B")
    (m, n), (p, q) = A.shape, B.shape
    # out[i, k, j, l] = a_ij b_kl; rows (i, k) -> i*p + k, columns (j, l) -> j*q + l.
    return (A[:, None, :, None] * B[None, :, None, :]).reshape(m * p, n * q)


# ----- A.1.4 Commutation matrices -----


def commutation_permutation(m, n):
    """The permutation behind K_mn: vec(A.T) == vec(A)[perm] for A of shape (m, n).

    Entry a_ij sits at position i + j*m of vec(A) and at position j + i*n of vec(A.T);
    the array of the former positions, laid out as A.T and vectorised, is `perm`.
    """
    m, n = _size(m, "m"), _size(n, "n")
    positions = np.arange(m * n).reshape((m, n), order="F")  # positions[i, j] = i + j*m
    return vec(positions.T)


def commutation_matrix(m, n):
    """The commutation matrix K_mn of A.1.4, shape (m*n, m*n), as integers:
    K_mn @ vec(A) == vec(A.T) for every A of shape (m, n).

    A permutation matrix: row k has its single one in column perm[k]
    (`commutation_permutation`), so it is built by indexing, without a loop.
    """
    perm = commutation_permutation(m, n)
    K = np.zeros((perm.size, perm.size), dtype=np.int64)
    K[np.arange(perm.size), perm] = 1
    return K


def commutation_apply(v, m, n):
    """K_mn @ v without building K_mn: the rows of `v` (a vector of length m*n, or a
    matrix with m*n rows) permuted. For v = vec(A), A of shape (m, n), gives
    vec(A.T)."""
    perm = commutation_permutation(m, n)
    v = np.asarray(v)
    if v.ndim not in (1, 2) or v.shape[0] != perm.size:
        raise ValueError(
            f"K_{m},{n} acts on vectors of length {perm.size} (or matrices with "
            f"{perm.size} rows), got shape {v.shape}"
        )
    return v[perm]


# ----- A.1.5 Partitioned matrices: Khatri-Rao and Tracy-Singh products -----


def blocks(E, row_sizes, col_sizes, name="E"):
    """The blocks E_ij of the matrix E partitioned into rows `row_sizes` and columns
    `col_sizes`: a list of lists, block (i, j) of shape (row_sizes[i], col_sizes[j])."""
    E = _matrix(E, name)
    rows = _partition(row_sizes, E.shape[0], f"the row partition of {name}", E.shape)
    cols = _partition(col_sizes, E.shape[1], f"the column partition of {name}", E.shape)
    r0 = np.concatenate([[0], np.cumsum(rows)])
    c0 = np.concatenate([[0], np.cumsum(cols)])
    return [
        [E[r0[i] : r0[i + 1], c0[j] : c0[j + 1]] for j in range(len(cols))]
        for i in range(len(rows))
    ]


def khatri_rao(E, F, E_partition=None, F_partition=None):
    """The Khatri-Rao product E * F of A.1.5: (E_ij (x) F_ij)_ij, block by block.

    `E_partition` = (row_sizes, col_sizes) splits E (shape (m, n)) into blocks E_ij of
    shape (m_i, n_j); `F_partition` splits F into blocks F_ij of shape (p_i, q_j), with
    as many block rows and block columns as E. The result has shape
    (sum_i m_i p_i, sum_j n_j q_j).

    Without partitions, every column is a block: the column-wise product
    [e_1 (x) f_1 | ... | e_n (x) f_n] of shape (m*p, n) that machine-learning papers
    (and ``scipy.linalg.khatri_rao``) call the Khatri-Rao product.
    """
    E = _matrix(E, "E")
    F = _matrix(F, "F")
    if (E_partition is None) != (F_partition is None):
        raise ValueError("khatri_rao needs partitions of both E and F, or of neither")
    if E_partition is None:
        if E.shape[1] != F.shape[1]:
            raise ValueError(
                f"the column-wise Khatri-Rao product needs as many columns in F as in "
                f"E, got E of shape {E.shape} and F of shape {F.shape}"
            )
        E_partition = ([E.shape[0]], [1] * E.shape[1])
        F_partition = ([F.shape[0]], [1] * F.shape[1])
    Eb = blocks(E, *E_partition, name="E")
    Fb = blocks(F, *F_partition, name="F")
    if (len(Eb), len(Eb[0])) != (len(Fb), len(Fb[0])):
        raise ValueError(
            f"the Khatri-Rao product pairs block (i, j) of E with block (i, j) of F, "
            f"so both need the same grid of blocks: E has {len(Eb)} x {len(Eb[0])} "
            f"blocks, F has {len(Fb)} x {len(Fb[0])}"
        )
    return np.block(
        [[kron(e, f) for e, f in zip(Erow, Frow)] for Erow, Frow in zip(Eb, Fb)]
    )


def tracy_singh(E, F, E_partition=None, F_partition=None):
    """The Tracy-Singh product of A.1.5 (Tracy and Singh, 1972): block (i, j) of the
    result is the partitioned matrix (E_ij (x) F_kl)_kl, every block of E paired with
    every block of F.

    Partitions are (row_sizes, col_sizes) as in `khatri_rao`; E and F may have
    different block grids. The result has the shape of kron(E, F), shape (m*p, n*q),
    and its rows and columns are a permutation of those of kron(E, F); with E or F
    left unpartitioned (one block, the default) it is kron(E, F) itself.
    """
    E = _matrix(E, "E")
    F = _matrix(F, "F")
    Eb = blocks(E, *(E_partition or ([E.shape[0]], [E.shape[1]])), name="E")
    Fb = blocks(F, *(F_partition or ([F.shape[0]], [F.shape[1]])), name="F")
    return np.block(
        [
            [np.block([[kron(e, f) for f in Frow] for Frow in Fb]) for e in Erow]
            for Erow in Eb
        ]
    )


# ----- A.2 The diag operator and its pseudo-inverse -----


def diag(x):
    """diag: R^d -> R^(d x d), the vector x laid along the diagonal of a square
    matrix."""
    x = as_float_array(x, "x")
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(
            f"diag takes a vector x, got x of shape {x.shape} (for a matrix X, "
            "diag(vec(X)) is probably meant)"
        )
    return np.diag(x)


def diag_inv(A):
    """The pseudo-inverse diag^{-1}: R^(d x d) -> R^d of A.2 (Minka, 2000): the diagonal
    of the square matrix A as a vector, shape (d,).

    diag_inv(diag(x)) == x for every vector x, but diag(diag_inv(A)) == A only when A
    is diagonal. A non-square matrix has no diagonal in this sense: ValueError.
    """
    A = as_float_array(A, "A", ndims=2)
    if A.shape[0] != A.shape[1]:
        raise ValueError(
            f"diag_inv takes a square matrix A (d, d), got A of shape {A.shape}"
        )
    return np.diagonal(A).copy()


# ----- A.3 The trace -----


def trace(A):
    """tr(A), the sum of the diagonal of the square matrix A (the identities of A.3).

    ``np.trace`` also sums the diagonal of a non-square matrix, which hides a product
    whose sizes are wrong; this raises ValueError instead.
    """
    A = as_float_array(A, "A", ndims=2)
    if A.shape[0] != A.shape[1]:
        raise ValueError(
            f"the trace needs a square matrix A (d, d), got A of shape {A.shape}"
        )
    return float(np.trace(A))


# ----- Input checks -----


def _matrix(A, name):
    return as_float_array(A, name, ndims=2)


def _size(k, name):
    if not isinstance(k, (int, np.integer)) or isinstance(k, (bool, np.bool_)) or k < 1:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def _partition(sizes, total, what, shape):
    try:
        sizes = [int(s) for s in sizes]
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{what} must be a list of block sizes, got {sizes!r}"
        ) from exc
    if not sizes or any(s < 1 for s in sizes) or sum(sizes) != total:
        raise ValueError(
            f"{what} must be positive block sizes adding up to {total} (the matrix has "
            f"shape {shape}), got {sizes} (sum {sum(sizes)})"
        )
    return sizes
