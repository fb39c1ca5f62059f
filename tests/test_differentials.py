"""Appendix B: the remainder that defines a differential, and the first and second
identification theorems, checked against JAX on vectors and matrices of many shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derivlib.check import jax_hessian, jax_jacobian, jvp, second_differential
from derivlib.differentials import identify, identify_hessian, loglog_slope, remainder
from derivlib.matrix import kron, vec
from derivlib.vector import sigmoid, sigmoid_jacobian, softmax, softmax_jacobian

dims = st.integers(1, 4)
seeds = st.integers(0, 2**32 - 1)

# JAX traces its oracle afresh for every example: fewer examples where it is called
jax_oracle = settings(max_examples=12)


def close(a, b, tol=1e-10):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# ----- The first identification theorem -----


@given(dims, dims, dims, dims, seeds)
@jax_oracle
def test_identify_reads_off_the_jacobian_of_A_dX_B(m, n, p, q, seed):
    # d(A X B) = A dX B, and by (A.5) its Jacobian is B^T (x) A
    rng = np.random.default_rng(seed)
    A, B, X = (
        rng.standard_normal((m, n)),
        rng.standard_normal((p, q)),
        rng.standard_normal((n, p)),
    )
    J = identify(lambda dX: A @ dX @ B, X)
    assert J.shape == (m * q, n * p)
    close(J, kron(B.T, A))
    close(J, jax_jacobian(lambda X: jnp.asarray(A) @ X @ jnp.asarray(B), X))


@given(dims, dims, seeds)
@jax_oracle
def test_identify_matches_jax_for_the_product_X_transpose_X(m, n, seed):
    X = np.random.default_rng(seed).standard_normal((m, n))
    J = identify(lambda dX: dX.T @ X + X.T @ dX, X)
    close(J, jax_jacobian(lambda X: X.T @ X, X))


@given(dims, seeds)
@jax_oracle
def test_identify_recovers_the_sigmoid_and_softmax_jacobians(n, seed):
    x = np.random.default_rng(seed).standard_normal(n)
    s = sigmoid(x)
    close(identify(lambda dx: s * (1 - s) * dx, x), sigmoid_jacobian(x))
    p = softmax(x)
    close(identify(lambda dx: p * dx - p * (p @ dx), x), softmax_jacobian(x))
    close(softmax_jacobian(x), jax_jacobian(jax.nn.softmax, x))


def test_identify_rejects_a_map_that_is_not_linear():
    with pytest.raises(ValueError, match="not linear"):
        identify(lambda dX: dX**2, np.ones((2, 3)))
    with pytest.raises(ValueError, match="not linear"):
        identify(lambda dX: dX + 1.0, np.ones(3))


def test_identify_rejects_a_map_with_changing_output_shape():
    with pytest.raises(ValueError, match="shape"):
        identify(lambda dX: dX[: int(np.argmax(dX)) + 1], np.ones(3))


def test_identify_rejects_an_empty_point():
    with pytest.raises(ValueError, match="non-empty"):
        identify(lambda dX: dX, np.ones((0, 2)))


# ----- The second identification theorem -----


@given(dims, seeds)
def test_identify_hessian_takes_the_symmetric_part(n, seed):
    B = np.random.default_rng(seed).standard_normal((n, n))  # not symmetric
    H = identify_hessian(lambda dx: dx @ B @ dx, np.zeros(n))
    close(H, (B + B.T) / 2)
    close(H, H.T, tol=0)
    if n > 1:
        assert not np.allclose(H, B)  # reading B off as the Hessian would be wrong


@given(dims, dims, seeds)
@jax_oracle
def test_identify_hessian_of_the_logistic_loss(d, n, seed):
    # (3.14): d^2 L = dtheta^T X diag(pi o (1 - pi)) X^T dtheta
    rng = np.random.default_rng(seed)
    X, theta = rng.standard_normal((d, n)), rng.standard_normal(d)
    y = (rng.random(n) < 0.5).astype(float)
    pi = sigmoid(X.T @ theta)
    d2L = lambda dtheta: dtheta @ X @ np.diag(pi * (1 - pi)) @ X.T @ dtheta  # noqa: E731

    def loss(theta):
        z = jnp.asarray(X).T @ theta
        return -jnp.sum(
            jnp.asarray(y) * jax.nn.log_sigmoid(z)
            + (1 - jnp.asarray(y)) * jax.nn.log_sigmoid(-z)
        )

    H = identify_hessian(d2L, theta)
    close(H, X @ np.diag(pi * (1 - pi)) @ X.T)
    close(H, jax_hessian(loss, theta))
    # the quadratic form is the second differential JAX computes
    dtheta = rng.standard_normal(d)
    close(d2L(dtheta), second_differential(loss)(theta, dtheta))


@given(dims, dims, seeds)
@jax_oracle
def test_identify_hessian_of_a_matrix_function(m, n, seed):
    # f(X) = tr(X^T A X), d^2 f = 2 tr(dX^T A dX) = vec(dX)^T 2 (I_n (x) A) vec(dX)
    rng = np.random.default_rng(seed)
    A, X = rng.standard_normal((m, m)), rng.standard_normal((m, n))
    H = identify_hessian(lambda dX: 2 * np.trace(dX.T @ A @ dX), X)
    assert H.shape == (m * n, m * n)
    close(H, np.kron(np.eye(n), A + A.T))
    close(H, jax_hessian(lambda X: jnp.trace(X.T @ jnp.asarray(A) @ X), X))


def test_identify_hessian_rejects_what_is_not_a_quadratic_form():
    with pytest.raises(ValueError, match="not a quadratic form"):
        identify_hessian(lambda dx: np.sum(dx**3), np.ones(3))
    with pytest.raises(ValueError, match="not a quadratic form"):
        identify_hessian(lambda dx: dx @ dx + np.sum(dx), np.ones(2))
    with pytest.raises(ValueError, match=r"must be a scalar.*\(2,\)"):
        identify_hessian(lambda dx: dx * dx, np.ones(2))
    with pytest.raises(ValueError, match="non-empty"):
        identify_hessian(lambda dx: 0.0, np.ones(0))


# ----- B.1, B.2 The remainder -----


def test_remainder_of_an_affine_function_is_zero():
    A, b = np.arange(6.0).reshape(2, 3), np.ones(2)
    r = remainder(
        lambda x: A @ x + b, lambda h: A @ h, np.ones(3), np.array([0.1, -0.2, 0.3])
    )
    close(r, np.zeros(2), tol=1e-14)


@given(dims, seeds)
def test_remainder_of_a_quadratic_is_its_second_order_term(n, seed):
    rng = np.random.default_rng(seed)
    B, p, h = (
        rng.standard_normal((n, n)),
        rng.standard_normal(n),
        rng.standard_normal(n),
    )
    f = lambda x: x @ B @ x  # noqa: E731
    r = remainder(f, lambda h: p @ (B + B.T) @ h, p, h)
    close(r, h @ B @ h)


@given(st.floats(-4, 4).filter(lambda p: abs(p) > 0.3))
def test_sigmoid_remainder_vanishes_faster_than_h(p):
    # sigma'' is non-zero away from 0, so |r(h)| / |h| ~ |h|: slope one on log-log axes
    steps = np.logspace(-1, -5, 9)
    ratios = [
        abs(
            float(remainder(sigmoid, lambda h: sigmoid(p) * (1 - sigmoid(p)) * h, p, t))
        )
        / t
        for t in steps
    ]
    assert ratios[-1] < 1e-3 * ratios[0]
    assert abs(loglog_slope(steps, ratios) - 1) < 0.05


@given(dims, seeds)
@jax_oracle
def test_softmax_remainder_ratio_has_slope_one_and_the_jvp_is_the_differential(n, seed):
    rng = np.random.default_rng(seed)
    p, u = rng.standard_normal(n + 1), rng.standard_normal(n + 1)
    J = softmax_jacobian(p)
    close(J @ u, jvp(jax.nn.softmax)(p, u))
    steps = np.logspace(-1, -4, 7)
    ratios = [
        np.linalg.norm(remainder(softmax, lambda h: J @ h, p, t * u))
        / np.linalg.norm(t * u)
        for t in steps
    ]
    assert abs(loglog_slope(steps, ratios) - 1) < 0.1


def test_remainder_with_a_wrong_derivative_does_not_vanish():
    p = 0.7
    steps = np.logspace(-1, -5, 9)
    wrong = lambda h: sigmoid(p) * h  # noqa: E731  (sigma instead of sigma')
    ratios = [abs(float(remainder(sigmoid, wrong, p, t))) / t for t in steps]
    assert (
        abs(loglog_slope(steps, ratios)) < 0.05
    )  # slope zero: the ratio tends to a constant


def test_remainder_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"shape of p, \(3,\), got \(2,\)"):
        remainder(lambda x: x, lambda h: h, np.ones(3), np.ones(2))
    with pytest.raises(
        ValueError,
        match=r"differential returned shape \(2,\) but f\(p\) has shape \(3,\)",
    ):
        remainder(lambda x: x, lambda h: h[:2], np.ones(3), np.ones(3))


@given(st.floats(-3, 3), st.floats(0.1, 10))
def test_loglog_slope_of_a_power_law(k, c):
    x = np.logspace(-3, 0, 5)
    assert abs(loglog_slope(x, c * x**k) - k) < 1e-9


def test_loglog_slope_rejects_bad_input():
    with pytest.raises(
        ValueError, match=r"positive.*got y\[1\] = 0.0 in y of shape \(2,\)$"
    ):
        loglog_slope(np.array([1.0, 2.0]), np.array([1.0, 0.0]))
    with pytest.raises(
        ValueError, match=r"positive.*got x\[0\] = -1.0 in x of shape \(2,\)$"
    ):
        loglog_slope(np.array([-1.0, 2.0]), np.array([1.0, 1.0]))
    with pytest.raises(
        ValueError, match=r"1-D arrays.*got x of shape \(1,\) and y of shape \(1,\)$"
    ):
        loglog_slope(np.array([1.0]), np.array([1.0]))
    with pytest.raises(
        ValueError, match=r"got x of shape \(3,\) and y of shape \(2,\)$"
    ):
        loglog_slope(np.ones(3), np.ones(2))


def test_vec_layout_of_identify_agrees_with_jvp(rng):
    X, dX = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    f = lambda X: jnp.tanh(X) @ X.T  # noqa: E731
    t = np.tanh(X)
    J = identify(lambda dX: ((1 - t**2) * dX) @ X.T + t @ dX.T, X)
    close(J @ vec(dX), vec(jvp(f)(X, dX)))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: identify(lambda dX: dX, np.array([np.nan, 1.0])), "X must be finite"),
        (
            lambda: identify(lambda dX: dX * np.nan, np.ones(2)),
            "non-finite dF for the unit increment 0",
        ),
        (
            lambda: identify_hessian(lambda dX: dX @ dX, np.array([np.inf, 1.0])),
            "X must be finite",
        ),
        (
            lambda: identify_hessian(lambda dX: np.nan * (dX @ dX), np.ones(2)),
            "second differential returned NaN",
        ),
        (lambda: remainder(np.sin, lambda h: h, np.nan, 0.1), "p must be finite"),
        (lambda: remainder(np.sin, lambda h: h, 0.0, np.inf), "h must be finite"),
        (
            lambda: remainder(
                lambda x: np.where(x > 0, np.inf, x), lambda h: h, 0.0, 0.1
            ),
            "remainder is not finite",
        ),
        (lambda: loglog_slope([1.0, 2.0], [np.nan, 1.0]), "y must be finite"),
    ],
)
def test_non_finite_input_is_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()
