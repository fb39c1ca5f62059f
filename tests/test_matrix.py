"""Appendix A: every operator and identity, on random matrices of many shapes.

Shapes are drawn independently (1 x n, n x 1 and unequal sizes included): identities
that only hold by accident for square matrices, or with two indices swapped, fail here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from derivlib.check import jax_jacobian, to_vec_layout
from derivlib.matrix import (
    blocks,
    commutation_apply,
    commutation_matrix,
    commutation_permutation,
    diag,
    diag_inv,
    hadamard,
    khatri_rao,
    kron,
    trace,
    tracy_singh,
    unvec,
    vec,
)

dims = st.integers(1, 4)
seeds = st.integers(0, 2**32 - 1)


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@st.composite
def partitions(draw, total, max_blocks=3):
    """Positive block sizes adding up to `total`."""
    n_blocks = draw(st.integers(1, min(total, max_blocks)))
    cuts = (
        sorted(
            draw(
                st.sets(
                    st.integers(1, total - 1),
                    min_size=n_blocks - 1,
                    max_size=n_blocks - 1,
                )
            )
        )
        if n_blocks > 1
        else []
    )
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges, edges[1:])]


@st.composite
def sizes(draw, n_blocks):
    return [draw(st.integers(1, 3)) for _ in range(n_blocks)]


# ----- A.1.1 vec -----


def test_vec_of_the_2x3_example_is_column_major():
    # eq. (A.1), with x_ij written as the two-digit number ij
    X = np.array([[11, 12, 13], [21, 22, 23]])
    assert vec(X).tolist() == [11, 21, 12, 22, 13, 23]


@given(dims, dims, seeds)
def test_vec_stacks_the_columns_and_unvec_inverts_it(m, n, seed):
    A = randn(seed, m, n)
    close(vec(A), np.concatenate([A[:, j] for j in range(n)]))
    close(unvec(vec(A), (m, n)), A)
    close(vec(unvec(vec(A), (m, n))), vec(A))
    close(unvec(vec(A)[:, None], (m, n)), A)  # a column vector is accepted


@given(dims, dims)
def test_unvec_rejects_a_shape_that_the_vector_cannot_fill(m, n):
    with pytest.raises(ValueError, match=f"length {m * n}.*needs {m * n + 1}"):
        unvec(np.zeros(m * n), (m * n + 1, 1))


def test_unvec_rejects_a_matrix():
    with pytest.raises(ValueError, match=r"needs a vector.*\(2, 3\)"):
        unvec(np.zeros((2, 3)), (3, 2))


@given(dims, dims, dims, dims, seeds)
@settings(max_examples=12)  # JAX traces afresh for every example
def test_to_vec_layout_gives_the_jacobian_of_vec_F_and_C_order_does_not(
    m, n, p, q, seed
):
    # F(X) = A X B with X (n, p): by (A.5) the vec-layout Jacobian is B^T (x) A.
    rng = np.random.default_rng(seed)
    A, B, X = (
        rng.standard_normal((m, n)),
        rng.standard_normal((p, q)),
        rng.standard_normal((n, p)),
    )
    f = lambda X: jnp.asarray(A) @ X @ jnp.asarray(B)  # noqa: E731
    J = jax.jacobian(f)(jnp.asarray(X))
    expected = np.kron(B.T, A)
    close(to_vec_layout(J, (m, q), (n, p)), expected)
    close(jax_jacobian(f, X), expected)
    naive = np.asarray(J).reshape(m * q, n * p)  # row-major: the Jacobian of the rows
    if (m > 1 and q > 1) or (n > 1 and p > 1):
        assert not np.allclose(naive, expected)
    # the C-order reshape is the row-major Jacobian, a permutation of the right one
    close(naive, commutation_matrix(m, q) @ expected @ commutation_matrix(n, p).T)


# ----- A.1.2 Hadamard product -----


@given(dims, dims, seeds)
def test_hadamard_is_elementwise(m, n, seed):
    A, B = randn(seed, m, n), randn(seed + 1, m, n)
    H = hadamard(A, B)
    for i in range(m):
        for j in range(n):
            assert H[i, j] == A[i, j] * B[i, j]
    close(hadamard(A, B), hadamard(B, A))


def test_hadamard_rejects_unequal_shapes():
    with pytest.raises(
        ValueError, match=r"A of shape \(2, 3\) and B of shape \(3, 2\)"
    ):
        hadamard(np.ones((2, 3)), np.ones((3, 2)))


@pytest.mark.parametrize("which", ["A", "B"])
def test_hadamard_converts_and_names_each_argument(which):
    # each argument goes through the same float conversion, and a bad one is named
    good, bad = np.ones((2, 2)), [["a", "b"], ["c", "d"]]
    args = (bad, good) if which == "A" else (good, bad)
    with pytest.raises(ValueError, match=rf"^{which} must be a real array"):
        hadamard(*args)
    # numeric strings convert to float; left unconverted, "2" * 2.0 is a TypeError
    ints, strings = np.array([1, 2]), ["1.5", "2"]
    out = hadamard(strings, ints) if which == "A" else hadamard(ints, strings)
    assert out.dtype == np.float64 and np.array_equal(out, [1.5, 4.0])


# ----- A.1.3 Kronecker product -----


@given(dims, dims, dims, dims, seeds)
def test_kron_is_the_block_matrix_of_a_ij_B(m, n, p, q, seed):
    A, B = randn(seed, m, n), randn(seed + 1, p, q)
    K = kron(A, B)
    assert K.shape == (m * p, n * q)
    for i in range(m):
        for j in range(n):
            close(K[i * p : (i + 1) * p, j * q : (j + 1) * q], A[i, j] * B)
    close(K, np.kron(A, B))


@given(dims, dims, dims, dims, dims, dims, seeds)
def test_kron_mixed_product(m, n, p, q, r, s, seed):
    rng = np.random.default_rng(seed)
    A, C = rng.standard_normal((m, n)), rng.standard_normal((n, r))
    B, D = rng.standard_normal((p, q)), rng.standard_normal((q, s))
    close(kron(A, B) @ kron(C, D), kron(A @ C, B @ D))


# ----- A.1.4 Commutation matrices -----


@given(dims, dims, seeds)
def test_commutation_matrix_transposes_vec(m, n, seed):
    A = randn(seed, m, n)
    K = commutation_matrix(m, n)
    assert K.shape == (m * n, m * n)
    close(K @ vec(A), vec(A.T))
    close(commutation_apply(vec(A), m, n), vec(A.T))
    close(vec(A)[commutation_permutation(m, n)], vec(A.T))


@given(dims, dims)
def test_commutation_matrix_is_an_orthogonal_permutation(m, n):
    K = commutation_matrix(m, n)
    assert set(np.unique(K)) <= {0, 1}
    assert (K.sum(axis=0) == 1).all() and (K.sum(axis=1) == 1).all()
    assert (K.T @ K == np.eye(m * n, dtype=int)).all()
    assert (K.T == commutation_matrix(n, m)).all()  # K_mn^{-1} = K_mn^T = K_nm
    if m == 1 or n == 1:
        assert (K == np.eye(m * n, dtype=int)).all()


@given(dims, dims, dims, seeds)
def test_commutation_apply_acts_on_the_rows_of_a_matrix(m, n, k, seed):
    M = randn(seed, m * n, k)
    close(commutation_apply(M, m, n), commutation_matrix(m, n) @ M)


def test_commutation_rejects_bad_sizes():
    with pytest.raises(ValueError, match="length 6.*got shape \\(5,\\)"):
        commutation_apply(np.zeros(5), 2, 3)
    with pytest.raises(ValueError, match="positive integer"):
        commutation_matrix(0, 3)
    with pytest.raises(ValueError, match="positive integer"):
        commutation_matrix(2.5, 3)


# ----- A.1.5 Khatri-Rao and Tracy-Singh products -----


@given(dims, dims, dims, seeds)
def test_column_khatri_rao_matches_scipy(m, p, n, seed):
    E, F = randn(seed, m, n), randn(seed + 1, p, n)
    KR = khatri_rao(E, F)
    assert KR.shape == (m * p, n)
    close(KR, scipy.linalg.khatri_rao(E, F))
    for j in range(n):
        close(KR[:, j], np.kron(E[:, j], F[:, j]))


def partitioned_pair(data, seed):
    """E and F with the same grid of blocks and blocks of independent sizes:
    E, F and their partitions (m, n) and (p, q)."""
    n_rows, n_cols = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    m, n = data.draw(sizes(n_rows)), data.draw(sizes(n_cols))
    p, q = data.draw(sizes(n_rows)), data.draw(sizes(n_cols))
    E, F = randn(seed, sum(m), sum(n)), randn(seed + 1, sum(p), sum(q))
    return E, F, (m, n), (p, q)


@given(st.data(), seeds)
def test_partitioned_khatri_rao_is_the_kronecker_product_of_matching_blocks(data, seed):
    E, F, (m, n), (p, q) = partitioned_pair(data, seed)
    KR = khatri_rao(E, F, (m, n), (p, q))
    # the order stated under A.1.5
    assert KR.shape == (
        sum(mi * pi for mi, pi in zip(m, p)),
        sum(nj * qj for nj, qj in zip(n, q)),
    )
    Eb, Fb = blocks(E, m, n), blocks(F, p, q)
    rows = [mi * pi for mi, pi in zip(m, p)]
    cols = [nj * qj for nj, qj in zip(n, q)]
    for i, row in enumerate(blocks(KR, rows, cols, name="E * F")):
        for j, block in enumerate(row):
            close(block, np.kron(Eb[i][j], Fb[i][j]))


def test_khatri_rao_example_A4_pairs_E12_with_F12():
    rng = np.random.default_rng(4)
    E, F = rng.standard_normal((3, 5)), rng.standard_normal((4, 3))
    part_E, part_F = ([1, 2], [2, 3]), ([3, 1], [1, 2])
    (E11, E12), (E21, E22) = blocks(E, *part_E)
    (F11, F12), (F21, F22) = blocks(F, *part_F)
    corrected = np.block(
        [[np.kron(E11, F11), np.kron(E12, F12)], [np.kron(E21, F21), np.kron(E22, F22)]]
    )
    close(khatri_rao(E, F, part_E, part_F), corrected)
    # as printed, with F12 (x) F12 and F22 (x) F22, the blocks do not even have the right shapes
    with pytest.raises(ValueError):
        np.block(
            [
                [np.kron(E11, F11), np.kron(F12, F12)],
                [np.kron(E21, F21), np.kron(F22, F22)],
            ]
        )


@given(dims, dims, dims, dims, seeds)
def test_khatri_rao_with_one_block_is_kron(m, n, p, q, seed):
    E, F = randn(seed, m, n), randn(seed + 1, p, q)
    close(khatri_rao(E, F, ([m], [n]), ([p], [q])), np.kron(E, F))


def test_khatri_rao_rejects_bad_partitions():
    E, F = np.ones((3, 4)), np.ones((2, 4))
    with pytest.raises(
        ValueError, match=r"row partition of E.*adding up to 3.*\(3, 4\).*\[1, 1\]"
    ):
        khatri_rao(E, F, ([1, 1], [2, 2]), ([1, 1], [2, 2]))
    with pytest.raises(
        ValueError, match=r"column partition of F.*adding up to 4.*\[2, 2, 1\]"
    ):
        khatri_rao(E, F, ([1, 2], [2, 2]), ([1, 1], [2, 2, 1]))
    with pytest.raises(ValueError, match="positive block sizes"):
        khatri_rao(E, F, ([3, 0], [2, 2]), ([1, 1], [2, 2]))
    with pytest.raises(
        ValueError, match=r"same grid of blocks: E has 2 x 2 blocks, F has 1 x 2"
    ):
        khatri_rao(E, F, ([1, 2], [2, 2]), ([2], [2, 2]))
    with pytest.raises(ValueError, match="both E and F, or of neither"):
        khatri_rao(E, F, ([1, 2], [2, 2]))
    with pytest.raises(ValueError, match=r"as many columns.*\(3, 4\).*\(2, 3\)"):
        khatri_rao(E, np.ones((2, 3)))


@given(st.data(), seeds)
def test_tracy_singh_pairs_every_block_of_E_with_every_block_of_F(data, seed):
    m, n = data.draw(dims), data.draw(dims)
    p, q = data.draw(dims), data.draw(dims)
    part_E = (data.draw(partitions(m)), data.draw(partitions(n)))
    part_F = (data.draw(partitions(p)), data.draw(partitions(q)))
    E, F = randn(seed, m, n), randn(seed + 1, p, q)
    TS = tracy_singh(E, F, part_E, part_F)
    assert TS.shape == (m * p, n * q)
    Eb, Fb = blocks(E, *part_E), blocks(F, *part_F)
    rows = [mi * pk for mi in part_E[0] for pk in part_F[0]]
    cols = [nj * ql for nj in part_E[1] for ql in part_F[1]]
    TSb = blocks(TS, rows, cols, name="Tracy-Singh")
    nk, nl = len(part_F[0]), len(part_F[1])
    for i in range(len(part_E[0])):
        for j in range(len(part_E[1])):
            for k in range(nk):
                for l in range(nl):
                    close(TSb[i * nk + k][j * nl + l], np.kron(Eb[i][j], Fb[k][l]))
    # a rearrangement of the Kronecker product: the same entries
    close(np.sort(TS, axis=None), np.sort(np.kron(E, F), axis=None))


@given(dims, dims, dims, dims, seeds)
def test_tracy_singh_without_partitions_is_kron(m, n, p, q, seed):
    E, F = randn(seed, m, n), randn(seed + 1, p, q)
    close(tracy_singh(E, F), np.kron(E, F))
    # E in 1 x 1 blocks: block (i, j) is e_ij F, whatever the partition of F
    close(tracy_singh(E, F, ([1] * m, [1] * n), ([p], [q])), np.kron(E, F))


@given(st.data(), seeds)
def test_khatri_rao_blocks_sit_inside_tracy_singh(data, seed):
    E, F, (m, n), (p, q) = partitioned_pair(data, seed)
    TS = blocks(
        tracy_singh(E, F, (m, n), (p, q)),
        [mi * pk for mi in m for pk in p],
        [nj * ql for nj in n for ql in q],
    )
    KR = blocks(
        khatri_rao(E, F, (m, n), (p, q)),
        [a * b for a, b in zip(m, p)],
        [a * b for a, b in zip(n, q)],
    )
    n_rows, n_cols = len(m), len(n)
    for i in range(n_rows):
        for j in range(n_cols):
            close(KR[i][j], TS[i * n_rows + i][j * n_cols + j])


def test_tracy_singh_rejects_bad_partitions():
    with pytest.raises(ValueError, match=r"column partition of F.*adding up to 2"):
        tracy_singh(np.ones((2, 2)), np.ones((2, 2)), None, ([2], [1]))


# ----- A.2 diag and its pseudo-inverse -----


@given(dims, seeds)
def test_diag_lays_a_vector_on_the_diagonal(d, seed):
    x = randn(seed, d)
    D = diag(x)
    assert D.shape == (d, d)
    close(np.diagonal(D), x)
    close(D - np.diag(np.diagonal(D)), np.zeros((d, d)))
    close(diag(x[:, None]), D)
    close(diag(x[None, :]), D)


def test_diag_rejects_a_matrix():
    with pytest.raises(ValueError, match=r"takes a vector x, got x of shape \(2, 3\)"):
        diag(np.ones((2, 3)))


@given(dims, seeds)
def test_diag_inv_is_a_left_inverse_of_diag(d, seed):
    x = randn(seed, d)
    close(diag_inv(diag(x)), x)


@given(dims, seeds)
def test_diag_of_diag_inv_recovers_a_matrix_only_when_it_is_diagonal(d, seed):
    A = randn(seed, d, d)
    close(diag(diag_inv(np.diag(np.diagonal(A)))), np.diag(np.diagonal(A)))
    if d > 1:
        assert not np.allclose(diag(diag_inv(A)), A)


@given(dims, dims)
def test_diag_inv_rejects_non_square_matrices(m, n):
    if m == n:
        return
    with pytest.raises(
        ValueError, match=rf"square matrix A \(d, d\), got A of shape \({m}, {n}\)"
    ):
        diag_inv(np.ones((m, n)))
    with pytest.raises(ValueError, match="must be 2-D"):
        diag_inv(np.ones(m))


# ----- A.3 Identities -----


@given(dims, dims, dims, dims, seeds)
def test_A5_vec_ABC(m, n, q, s, seed):
    # A (m, n), B (n, q), C (q, s): A.5 needs p = n and r = q
    rng = np.random.default_rng(seed)
    A, B, C = (
        rng.standard_normal((m, n)),
        rng.standard_normal((n, q)),
        rng.standard_normal((q, s)),
    )
    close(vec(A @ B @ C), kron(C.T, A) @ vec(B))


@given(dims, dims, dims, dims, seeds)
def test_A6_corrected_K_pm_kron_A_B_equals_kron_B_A_K_qn(m, n, p, q, seed):
    A, B = randn(seed, m, n), randn(seed + 1, p, q)
    close(commutation_matrix(p, m) @ kron(A, B), kron(B, A) @ commutation_matrix(q, n))
    # the same without building either commutation matrix
    # (B (x) A) K_qn = (K_qn^T (B (x) A)^T)^T and K_qn^T = K_nq
    close(commutation_apply(kron(A, B), p, m), commutation_apply(kron(B, A).T, n, q).T)


@given(dims, dims, dims, dims, seeds)
def test_A6_as_printed_holds_only_when_the_subscripts_cannot_be_swapped(
    m, n, p, q, seed
):
    A, B = randn(seed, m, n), randn(seed + 1, p, q)
    printed = commutation_matrix(m, p) @ kron(A, B)
    right = kron(B, A) @ commutation_matrix(n, q)
    if (m == p or m == 1 or p == 1) and (n == q or n == 1 or q == 1):
        close(printed, right)  # K_mp = K_pm and K_nq = K_qn here
    else:
        assert not np.allclose(printed, right)


@given(dims, dims, dims, dims, seeds)
def test_A6_proof_corrected_step_by_step(m, n, p, q, seed):
    rng = np.random.default_rng(seed)
    A, B, X = (
        rng.standard_normal((m, n)),
        rng.standard_normal((p, q)),
        rng.standard_normal((q, n)),
    )
    steps = [
        commutation_matrix(p, m) @ kron(A, B) @ vec(X),
        commutation_matrix(p, m) @ vec(B @ X @ A.T),  # (A.5); B X A^T is p x m
        vec(A @ X.T @ B.T),
        kron(B, A) @ vec(X.T),  # (A.5) again
        kron(B, A) @ commutation_matrix(q, n) @ vec(X),  # X is q x n
    ]
    for a, b in zip(steps, steps[1:]):
        close(a, b)


@given(dims, seeds)
def test_A7_diag_of_a_hadamard_product_of_vectors(d, seed):
    e, f = randn(seed, d), randn(seed + 1, d)
    close(diag(hadamard(e, f)), hadamard(diag(e), diag(f)))
    close(diag(hadamard(e, f)), diag(e) @ diag(f))


@given(dims, seeds)
def test_A8_diag_inv_of_a_hadamard_product_of_square_matrices(d, seed):
    E, F = randn(seed, d, d), randn(seed + 1, d, d)
    close(diag_inv(hadamard(E, F)), hadamard(diag_inv(E), diag_inv(F)))


@given(dims, seeds, st.floats(-3, 3), st.floats(-3, 3))
def test_A9_diag_is_linear(d, seed, alpha, beta):
    e, f = randn(seed, d), randn(seed + 1, d)
    close(diag(alpha * e + beta * f), alpha * diag(e) + beta * diag(f))


@given(dims, seeds, st.floats(-3, 3), st.floats(-3, 3))
def test_A10_diag_inv_is_linear(d, seed, alpha, beta):
    E, F = randn(seed, d, d), randn(seed + 1, d, d)
    close(diag_inv(alpha * E + beta * F), alpha * diag_inv(E) + beta * diag_inv(F))


@given(st.integers(2, 4), st.integers(1, 4), seeds)
def test_A7_to_A10_as_printed_for_m_x_n_matrices_are_undefined(m, extra, seed):
    n = m + extra  # E, F in R^{m x n}, m != n
    E, F = randn(seed, m, n), randn(seed + 1, m, n)
    with pytest.raises(ValueError):
        diag(hadamard(E, F))
    with pytest.raises(ValueError):
        diag_inv(hadamard(E, F))


@given(dims, dims, dims, seeds)
def test_trace_is_cyclic(m, n, o, seed):
    # X (m, n), Y (n, o), Z (o, m): Z must have m columns for XYZ to be square
    rng = np.random.default_rng(seed)
    X, Y, Z = (
        rng.standard_normal((m, n)),
        rng.standard_normal((n, o)),
        rng.standard_normal((o, m)),
    )
    t = trace(X @ Y @ Z)
    np.testing.assert_allclose(
        [trace(Z @ X @ Y), trace(Y @ Z @ X)], [t, t], rtol=1e-10, atol=1e-12
    )
    close(trace(X @ Y @ Z), np.trace(X @ Y @ Z))


@given(dims, dims, dims, dims, seeds)
def test_trace_cycle_as_printed_needs_a_square_product(m, n, o, p, seed):
    # as printed, Z is (o, p): XYZ is m x p, and its trace is undefined unless p = m
    rng = np.random.default_rng(seed)
    X, Y, Z = (
        rng.standard_normal((m, n)),
        rng.standard_normal((n, o)),
        rng.standard_normal((o, p)),
    )
    if p != m:
        with pytest.raises(
            ValueError, match=rf"square matrix A \(d, d\), got A of shape \({m}, {p}\)"
        ):
            trace(X @ Y @ Z)


@given(dims, dims, seeds)
def test_trace_of_ET_F_is_a_sum_of_a_hadamard_product(m, n, seed):
    E, F = randn(seed, m, n), randn(seed + 1, m, n)
    t = np.trace(E.T @ F)
    np.testing.assert_allclose(vec(E) @ vec(F), t, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        np.ones(m * n) @ vec(hadamard(E, F)), t, rtol=1e-10, atol=1e-12
    )


@given(dims, dims, seeds, st.data())
def test_A11_trace_is_unchanged_by_one_rearrangement_of_both(m, n, seed, data):
    E, F = randn(seed, m, n), randn(seed + 1, m, n)
    t = np.trace(E.T @ F)
    perm = np.random.default_rng(seed).permutation(m * n)
    rows = data.draw(
        st.sampled_from([k for k in range(1, m * n + 1) if (m * n) % k == 0])
    )
    star = lambda M: unvec(vec(M)[perm], (rows, m * n // rows))  # noqa: E731
    np.testing.assert_allclose(np.trace(star(E).T @ star(F)), t, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        np.trace(E @ F.T), t, rtol=1e-10, atol=1e-12
    )  # (.)^* = transpose
    if not (perm == np.arange(m * n)).all():
        # a rearrangement of F alone does not keep it
        assert not np.isclose(vec(E) @ vec(F)[perm], t)
