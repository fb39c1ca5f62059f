"""derivlib.vector (Chapter 2) against JAX, over shapes and values."""

import warnings
from decimal import Decimal, localcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import derivlib as dl
from derivlib import check
from derivlib.vector import softmax_axis

RTOL = 1e-11
# Entries of these Jacobians lie in [-1, 1], and an oracle that forms 1 - s for s near
# one loses about one unit in the last place of 1 (derivlib sums the other entries
# instead). Where the Jacobian itself is tiny (saturated inputs), that absolute error is
# all that can be asked of the comparison; test_softmax_jacobian_is_accurate_when_saturated
# holds derivlib to a relative error.
ATOL = 4e-16


def matrices(min_side=1, max_side=6, elements=st.floats(-30, 30)):
    shapes = st.tuples(st.integers(min_side, max_side), st.integers(min_side, max_side))
    return arrays(np.float64, shapes, elements=elements)


def vectors(max_len=8, elements=st.floats(-30, 30)):
    return arrays(np.float64, st.integers(1, max_len), elements=elements)


def compiled_jacobian(f):
    """check.jax_jacobian for an element-wise or column-wise f, compiled once per input
    shape and reused by every example of that shape (eager jax.jacobian traces f again
    on every call, three to ten times slower over a property test's examples)."""
    jacobian = jax.jit(jax.jacobian(f))
    return lambda x: check.to_vec_layout(
        jacobian(jnp.asarray(x, dtype=jnp.float64)), x.shape, x.shape
    )


def jax_softmax(x):
    """The note's softmax in plain jax.numpy, along the first non-singleton axis."""
    axis = softmax_axis(x.shape)
    z = jnp.exp(x - jnp.max(x, axis=axis, keepdims=True))
    return z / jnp.sum(z, axis=axis, keepdims=True)


SOFTMAX_JACOBIAN = compiled_jacobian(jax_softmax)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=atol, err_msg="derivlib vs jax"
    )


# ----- Sigmoid -----


@given(st.one_of(vectors(), matrices()))
def test_sigmoid_matches_jax(x):
    assert_close(dl.sigmoid(x), np.asarray(jax.nn.sigmoid(x)))


@given(st.one_of(vectors(), matrices()))
def test_sigmoid_derivative_matches_jax_grad(x):
    # JAX differentiates sigma as sigma (1 - sigma), which loses digits to cancellation
    # for large positive x (at x = 30 only two digits are right). sigma' is even, so the
    # oracle is evaluated at -|x|, where that product is accurate.
    expected = np.vectorize(lambda t: float(jax.grad(jax.nn.sigmoid)(-abs(t))))(x)
    assert_close(dl.sigmoid_derivative(x), expected)


SIGMOID_JACOBIAN = compiled_jacobian(jax.nn.sigmoid)


def test_compiled_jacobian_is_check_jax_jacobian(rng):
    for x in [rng.standard_normal(5), rng.standard_normal((3, 4))]:
        np.testing.assert_array_equal(
            SIGMOID_JACOBIAN(x), check.jax_jacobian(jax.nn.sigmoid, x)
        )
        np.testing.assert_allclose(
            SOFTMAX_JACOBIAN(x),
            check.jax_jacobian(jax_softmax, x),
            rtol=1e-15,
            atol=1e-16,
        )


@given(st.one_of(vectors(), matrices()))
def test_sigmoid_jacobian_matches_jax(x):
    assert_close(dl.sigmoid_jacobian(x), SIGMOID_JACOBIAN(x))


@given(vectors(elements=st.floats(-1e4, 1e4)))
def test_sigmoid_is_finite_and_warning_free_for_large_inputs(x):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s, ds = dl.sigmoid(x), dl.sigmoid_derivative(x)
    assert np.all((s >= 0) & (s <= 1)) and np.all((ds >= 0) & (ds <= 0.25))
    assert_close(s, np.asarray(jax.nn.sigmoid(x)))


def test_sigmoid_extremes_are_exact():
    x = np.array([-1e4, -745.0, 0.0, 745.0, 1e4, np.inf, -np.inf])
    np.testing.assert_array_equal(
        dl.sigmoid(x)[[0, 2, 4, 5, 6]], [0.0, 0.5, 1.0, 1.0, 0.0]
    )
    assert dl.sigmoid_derivative(np.array(0.0)) == 0.25


def test_elementwise_jacobian_is_diag_of_fprime(rng):
    X = rng.standard_normal((3, 2))
    J = dl.elementwise_jacobian(np.cos, X)
    assert_close(J, check.jax_jacobian(jnp.sin, X))


def test_elementwise_jacobian_rejects_a_non_elementwise_fprime():
    with pytest.raises(
        ValueError, match=r"x has shape \(3,\) but fprime\(x\) has shape \(\)"
    ):
        dl.elementwise_jacobian(np.sum, np.ones(3))


# ----- Softmax -----


@given(st.one_of(vectors(), matrices()))
def test_softmax_matches_jax_along_first_non_singleton_axis(x):
    axis = softmax_axis(x.shape)
    assert_close(dl.softmax(x), np.asarray(jax.nn.softmax(x, axis=axis)))


@given(st.integers(2, 9))
def test_softmax_of_a_row_acts_along_the_row(n):
    row = np.arange(n, dtype=float).reshape(1, n)
    np.testing.assert_allclose(dl.softmax(row).sum(), 1.0)
    assert_close(dl.softmax(row), dl.softmax(row.ravel()).reshape(1, n))


@given(st.one_of(vectors(), matrices()))
def test_softmax_jacobian_matches_jax_in_vec_layout(x):
    assert_close(dl.softmax_jacobian(x), SOFTMAX_JACOBIAN(x))


def test_softmax_jacobian_is_accurate_when_saturated():
    # s_1 = 1 - 5e^-17.5 / (1 + 5e^-17.5) rounds to within a few ulps of one; the
    # diagonal entry s_1 (1 - s_1), about 1.26e-7, from a 50-digit decimal computation.
    x = np.array([0.0] + [-17.5] * 5)
    with localcontext() as ctx:
        ctx.prec = 50
        e = [Decimal(float(v)).exp() for v in x]
        s1 = e[0] / sum(e)
        exact = float(s1 * (1 - s1))
    J = dl.softmax_jacobian(x)
    B = dl.softmax_jacobian_blocks(np.column_stack([x, x]))
    for entry in [J[0, 0], B[0][0, 0], B[1][0, 0]]:
        assert abs(entry - exact) <= 4 * np.finfo(np.float64).eps * exact, (
            entry,
            exact,
        )


@given(matrices(max_side=5))
def test_softmax_jacobian_blocks_are_the_diagonal_blocks(X):
    blocks = dl.softmax_jacobian_blocks(X)
    J = dl.softmax_jacobian(X)
    k = blocks.shape[1]
    assert blocks.shape == (J.shape[0] // k, k, k)
    for i, block in enumerate(blocks):
        assert_close(
            block, J[i * k : (i + 1) * k, i * k : (i + 1) * k], rtol=1e-15, atol=0
        )


@given(matrices(elements=st.floats(-1e4, 1e4)))
def test_softmax_is_finite_for_large_logits(X):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S = dl.softmax(X)
        B = dl.softmax_jacobian_blocks(X)
    assert np.all(np.isfinite(S)) and np.all(np.isfinite(B))
    np.testing.assert_allclose(S.sum(axis=softmax_axis(X.shape)), 1.0)
    assert_close(S, np.asarray(jax.nn.softmax(X, axis=softmax_axis(X.shape))))


def test_vector_jacobian_is_eq_2_10(rng):
    x = rng.standard_normal(5)
    s = dl.softmax(x)
    np.testing.assert_allclose(
        dl.softmax_jacobian(x), np.diag(s) - np.outer(s, s), rtol=0, atol=1e-16
    )


@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (1, 4), (3, 5), (5, 3)])
def test_block_counts_follow_the_softmax_axis(shape):
    blocks = dl.softmax_jacobian_blocks(np.zeros(shape))
    m, n = shape
    expected = (1, n, n) if m == 1 else (n, m, m)
    assert blocks.shape == expected


# ----- Bad input -----


@pytest.mark.parametrize(
    "fn, arg, message",
    [
        (
            dl.softmax,
            np.zeros((2, 2, 2)),
            r"^x must be 1-D or 2-D, got shape \(2, 2, 2\)$",
        ),
        (dl.softmax, np.array(1.0), r"^x must be 1-D or 2-D, got shape \(\)$"),
        (dl.softmax, np.array([1.0, np.nan]), "x must be finite, got nan"),
        (dl.softmax, np.array([1.0, np.inf]), "x must be finite, got inf"),
        (dl.softmax, np.zeros((0, 3)), r"x must not be empty, got shape \(0, 3\)"),
        (
            dl.softmax_jacobian,
            np.zeros((2, 2, 2)),
            r"^x must be 1-D or 2-D, got shape \(2, 2, 2\)$",
        ),
        (dl.softmax_jacobian_blocks, np.array([np.nan]), "X must be finite"),
        (
            dl.softmax_jacobian_blocks,
            np.zeros((2, 2, 2)),
            r"^X must be 1-D or 2-D, got shape \(2, 2, 2\)$",
        ),
        (dl.sigmoid, np.array([0.0, np.nan]), "x must not contain NaN"),
        (dl.sigmoid_jacobian, "abc", "x must be a real array, got str"),
    ],
)
def test_bad_input_raises_a_clear_value_error(fn, arg, message):
    with pytest.raises(ValueError, match=message):
        fn(arg)


# ----- The check machinery itself -----


def test_check_close_raises_with_both_numbers():
    with pytest.raises(
        AssertionError, match=r"does not match jax.jacobian: relative error 1\.000e-01"
    ):
        check.check_close("f", np.array([1.1]), np.array([1.0]))


def test_check_steps_names_the_broken_step(rng):
    points = [(rng.standard_normal(3), rng.standard_normal(3))]
    steps = [
        ("jax.jvp", check.jvp(jax.nn.sigmoid)),
        ("right", lambda x, dx: dl.sigmoid_derivative(x) * dx),
        ("wrong", lambda x, dx: dl.sigmoid(x) * dx),
    ]
    with pytest.raises(AssertionError, match="wrong != right"):
        check.check_steps("sigmoid", steps, points)


def test_check_fails_refuses_a_formula_that_is_right(rng):
    x = rng.standard_normal(4)
    with pytest.raises(AssertionError, match="expected to fail"):
        check.check_fails(
            "(2.10)",
            lambda: dl.softmax_jacobian(x),
            check.jax_jacobian(jax.nn.softmax, x),
        )


def test_to_vec_layout_is_column_major(rng):
    A = rng.standard_normal((2, 3))
    J = check.jax_jacobian(lambda X: X.T, np.zeros((3, 2)))
    # the Jacobian of the transpose is the commutation matrix: vec(X^T) = K vec(X)
    np.testing.assert_array_equal(J @ dl.vec(A.T), dl.vec(A))


def test_elementwise_jacobian_refuses_nan_and_a_non_finite_derivative():
    from derivlib.vector import elementwise_jacobian

    with pytest.raises(ValueError, match="x must not contain NaN"):
        elementwise_jacobian(np.cos, np.array([0.0, np.nan]))
    with pytest.raises(
        ValueError, match=r"fprime\(x\) must be finite, got inf at x = 0"
    ):
        elementwise_jacobian(
            lambda x: np.where(x == 0, np.inf, 1.0), np.array([1.0, 0.0])
        )
    assert np.array_equal(
        elementwise_jacobian(lambda x: np.zeros_like(x), np.array([np.inf])), [[0.0]]
    )
