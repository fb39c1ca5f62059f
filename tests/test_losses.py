"""Chapter 3 (derivlib.losses) against JAX and scikit-learn.

The oracles are written here in a few lines of jax.numpy (jax.nn.log_sigmoid,
jax.nn.log_softmax) and never call derivlib's derivative code.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from derivlib import losses
from derivlib.check import check_close, jax_grad, jax_hessian, to_vec_layout
from derivlib.losses import (
    ConvergenceError,
    SeparableDataError,
    cross_entropy,
    cross_entropy_grad,
    entropy,
    fit_logistic,
    fit_multinomial,
    kl_divergence,
    logistic_grad,
    logistic_hessian,
    logistic_loss,
    multinomial_grad,
    multinomial_hessian,
    multinomial_loss,
)

TOL = 1e-10

# ----- Oracles -----


def jax_logistic_loss(theta, X, y, l2):
    z = X.T @ theta
    nll = -(y @ jax.nn.log_sigmoid(z) + (1 - y) @ jax.nn.log_sigmoid(-z))
    return nll + 0.5 * l2 * theta @ theta


def jax_multinomial_loss(Theta, X, Y, l2):
    return -jnp.sum(Y * jax.nn.log_softmax(Theta.T @ X, axis=0)) + 0.5 * l2 * jnp.sum(
        Theta**2
    )


def jax_logistic(X, y, l2):
    """The oracle as a function of theta alone (for derivlib.check)."""
    return lambda theta: jax_logistic_loss(theta, jnp.asarray(X), jnp.asarray(y), l2)


def jax_multinomial(X, Y, l2):
    return lambda Theta: jax_multinomial_loss(Theta, jnp.asarray(X), jnp.asarray(Y), l2)


# Compiled once per shape, so the property tests below stay fast: value, gradient and
# Hessian of each oracle in one call.
@jax.jit
def jax_logistic_all(theta, X, y, l2):
    return (
        jax_logistic_loss(theta, X, y, l2),
        jax.grad(jax_logistic_loss)(theta, X, y, l2),
        jax.hessian(jax_logistic_loss)(theta, X, y, l2),
    )


@jax.jit
def jax_multinomial_all(Theta, X, Y, l2):
    return (
        jax_multinomial_loss(Theta, X, Y, l2),
        jax.grad(jax_multinomial_loss)(Theta, X, Y, l2),
        jax.hessian(jax_multinomial_loss)(Theta, X, Y, l2),
    )


def binary_problem(seed, d, n, scale=1.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((d, n))
    y = (rng.random(n) < 0.5).astype(float)
    theta = scale * rng.standard_normal(d)
    return theta, X, y


def multinomial_problem(seed, d, n, k, scale=1.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((d, n))
    Y = np.eye(k)[:, rng.integers(0, k, n)]
    Theta = scale * rng.standard_normal((d, k))
    return Theta, X, Y


seeds = st.integers(0, 2**32 - 1)
dims = st.sampled_from([1, 2, 3, 7])  # d = 1 (X is 1 x n), n = 1, d > n and d < n
l2s = st.sampled_from([0.0, 0.3, 2.0])
scales = st.sampled_from([0.1, 1.0, 5.0, 1e3])  # 1e3: logits far beyond exp overflow

# ----- 3.1 Cross entropy -----


def distribution(rng, m, zeros=False):
    p = rng.random(m)
    if zeros and m > 1:
        p[rng.random(m) < 0.4] = 0.0
        p[rng.integers(m)] = 1.0
    return p / p.sum()


@given(seeds, st.integers(1, 9))
def test_cross_entropy_is_entropy_plus_kl(seed, m):
    rng = np.random.default_rng(seed)
    p, q = distribution(rng, m, zeros=True), distribution(rng, m)
    assert cross_entropy(p, q) == pytest.approx(
        entropy(p) + kl_divergence(p, q), rel=1e-12, abs=1e-14
    )
    assert cross_entropy(p, q) == pytest.approx(
        -float(np.sum(np.where(p > 0, p * np.log(q), 0.0)))
    )
    assert kl_divergence(p, q) >= -1e-15
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-15)


@given(seeds, st.integers(1, 9))
def test_cross_entropy_grad_matches_jax(seed, m):
    rng = np.random.default_rng(seed)
    p, q = distribution(rng, m, zeros=True), distribution(rng, m)
    expected = jax_grad(lambda q_: -jnp.asarray(p) @ jnp.log(q_), q)
    check_close(
        "cross_entropy_grad", cross_entropy_grad(p, q), expected, "jax.grad", TOL
    )


def test_cross_entropy_grad_has_the_minus_sign(rng):
    p, q = distribution(rng, 5), distribution(rng, 5)
    expected = jax_grad(lambda q_: -jnp.asarray(p) @ jnp.log(q_), q)
    printed = p / q  # the note's diag(q)^-1 p, from p^T log[q] without the minus sign
    with pytest.raises(AssertionError):
        check_close("printed gradient", printed, expected, "jax.grad", TOL)


def test_cross_entropy_edge_values():
    assert cross_entropy([1.0, 0.0], [0.5, 0.5]) == pytest.approx(np.log(2))
    assert cross_entropy([0.0, 1.0], [1.0, 0.0]) == np.inf
    assert cross_entropy([1.0, 0.0], [1.0, 0.0]) == 0.0
    assert entropy([0.25] * 4) == pytest.approx(np.log(4))


@pytest.mark.parametrize(
    "p, q, message",
    [
        ([0.5, 0.5], [0.2, 0.3, 0.5], "same shape"),
        ([1.2, -0.2], [0.5, 0.5], r"p\[1\] = -0.2"),
        ([0.5, 0.6], [0.5, 0.5], "p must sum to one"),
        ([0.5, 0.5], [0.7, 0.7], "q must sum to one"),
        ([[0.5, 0.5]], [0.5, 0.5], "1-D"),
        ([0.5, np.nan], [0.5, 0.5], "finite"),
    ],
)
def test_cross_entropy_bad_input(p, q, message):
    with pytest.raises(ValueError, match=message):
        cross_entropy(p, q)


def test_cross_entropy_grad_needs_positive_q():
    with pytest.raises(ValueError, match=r"q > 0.*q\[1\] = 0"):
        cross_entropy_grad([0.5, 0.5], [1.0, 0.0])


# ----- 3.2 Binary logistic regression -----


@given(seeds, dims, dims, l2s, scales)
def test_logistic_matches_jax(seed, d, n, l2, scale):
    theta, X, y = binary_problem(seed, d, n, scale)
    value, grad, hess = (np.asarray(a) for a in jax_logistic_all(theta, X, y, l2))
    assert logistic_loss(theta, X, y, l2) == pytest.approx(
        float(value), rel=1e-12, abs=1e-12
    )
    check_close("logistic_grad", logistic_grad(theta, X, y, l2), grad, "jax.grad", TOL)
    H = logistic_hessian(theta, X, y, l2)
    if scale < 1e3:
        check_close("logistic_hessian", H, hess, "jax.hessian", TOL)
    else:  # see test_multinomial_matches_jax
        assert np.linalg.norm(H - hess) <= 1e-12 * (np.sum(X**2) + l2)


def test_logistic_hessian_is_symmetric_and_semidefinite(rng):
    theta, X, y = binary_problem(1, 6, 4)  # d > n: rank at most n
    H = logistic_hessian(theta, X, y)
    assert np.array_equal(H, H.T)
    eig = np.linalg.eigvalsh(H)
    assert eig.min() > -1e-12 and np.sum(eig > 1e-10) == 4


def test_logistic_large_logits_are_finite():
    # logits of +-1e4: exp would overflow; the log-sigmoid form gives the exact answer
    X = np.array([[1.0, -1.0, 1.0, -1.0]])
    y = np.array([1.0, 1.0, 0.0, 0.0])
    theta = np.array([1e4])
    assert logistic_loss(theta, X, y) == pytest.approx(
        2e4
    )  # two wrong by 1e4, two right
    assert np.allclose(logistic_grad(theta, X, y), [2.0])  # pi - y = 0, -1, 1, 0
    assert np.all(np.isfinite(logistic_hessian(theta, X, y)))
    f = jax_logistic(X, y, 0.0)
    check_close(
        "grad at 1e4", logistic_grad(theta, X, y), jax_grad(f, theta), "jax.grad", TOL
    )


@pytest.mark.parametrize(
    "theta_shape, X_shape, y, message",
    [
        (
            (3,),
            (4, 5),
            [0, 1, 0, 1, 1],
            r"X has shape \(4, 5\) \(d = 4\) but theta has shape \(3,\)",
        ),
        ((4,), (4, 5), [0, 1, 0, 1], r"y has 4 observations but X has shape \(4, 5\)"),
        ((4,), (4, 5), [0, 1, 2, 1, 1], r"labels in \{0, 1\}, got y\[2\] = 2"),
        ((4,), (4, 5), [0, 1, -1, 1, 1], r"y\[2\] = -1"),
        ((4, 1), (4, 5), [0, 1, 0, 1, 1], r"theta must be 1-D, got shape \(4, 1\)"),
        ((4,), (20,), [0, 1, 0, 1, 1], r"X must be 2-D, got shape \(20,\)"),
    ],
)
@pytest.mark.parametrize("fn", [logistic_loss, logistic_grad, logistic_hessian])
def test_logistic_bad_input(fn, theta_shape, X_shape, y, message):
    with pytest.raises(ValueError, match=message):
        fn(np.zeros(theta_shape), np.ones(X_shape), np.array(y, dtype=float))


@pytest.mark.parametrize("l2", [-1.0, np.nan, "a"])
def test_bad_l2(l2):
    theta, X, y = binary_problem(0, 3, 4)
    with pytest.raises(ValueError, match="l2 must be"):
        logistic_loss(theta, X, y, l2)


# ----- 3.3 Multinomial logistic regression -----


@given(seeds, dims, dims, st.sampled_from([1, 2, 4]), l2s, scales)
def test_multinomial_matches_jax(seed, d, n, k, l2, scale):
    Theta, X, Y = multinomial_problem(seed, d, n, k, scale)
    value, grad, hess = (np.asarray(a) for a in jax_multinomial_all(Theta, X, Y, l2))
    assert multinomial_loss(Theta, X, Y, l2) == pytest.approx(
        float(value), rel=1e-12, abs=1e-12
    )
    check_close(
        "multinomial_grad", multinomial_grad(Theta, X, Y, l2), grad, "jax.grad", TOL
    )
    H = multinomial_hessian(Theta, X, Y, l2)
    assert H.shape == (d * k, d * k)
    hess = to_vec_layout(hess, (d, k), (d, k))
    if scale < 1e3:
        check_close("multinomial_hessian", H, hess, "jax.hessian", TOL)
    else:
        # logits near 1e3: the exact entries are as small as exp(-1000) or 0, below
        # JAX's own rounding error, so compare on the scale of the Hessian at Theta = 0
        assert np.linalg.norm(H - hess) <= 1e-12 * (np.sum(X**2) + l2)


def test_multinomial_hessian_through_check_module(rng):
    # the same comparison through derivlib.check's own vec-layout conversion
    Theta, X, Y = multinomial_problem(7, 3, 2, 4)
    H = jax_hessian(jax_multinomial(X, Y, 0.5), Theta)
    check_close(
        "multinomial_hessian",
        multinomial_hessian(Theta, X, Y, 0.5),
        H,
        "jax.hessian",
        TOL,
    )


def test_multinomial_hessian_kronecker_form(rng):
    # sum_i (diag(pi_i) - pi_i pi_i^T) kron x_i x_i^T, term by term
    Theta, X, Y = multinomial_problem(3, 3, 5, 4)
    Z = Theta.T @ X
    Pi = np.exp(Z) / np.exp(Z).sum(axis=0)
    H = sum(
        np.kron(np.diag(p) - np.outer(p, p), np.outer(x, x)) for p, x in zip(Pi.T, X.T)
    )
    check_close(
        "Kronecker sum", multinomial_hessian(Theta, X, Y), H, "the sum over i", TOL
    )


def test_multinomial_is_over_parametrised(rng):
    # adding v to every column of Theta changes nothing: the Hessian kills vec(v 1^T)
    Theta, X, Y = multinomial_problem(4, 3, 6, 4)
    v = rng.standard_normal(3)
    shifted = Theta + v[:, None]
    assert multinomial_loss(shifted, X, Y) == pytest.approx(
        multinomial_loss(Theta, X, Y)
    )
    H = multinomial_hessian(Theta, X, Y)
    assert np.linalg.norm(H @ np.tile(v, 4)) < 1e-12 * np.linalg.norm(H)


def test_multinomial_hessian_without_cancellation():
    # pi = (1 - 1e-32, 1e-32): pi_1 (1 - pi_1) is 1e-32, not 1 - 1 = 0 (nor JAX's rounding)
    X, Y = np.ones((1, 1)), np.array([[1.0], [0.0]])
    Theta = np.array([[0.0, -np.log(1e32)]])
    H = multinomial_hessian(Theta, X, Y)
    assert H == pytest.approx(
        1e-32 * np.array([[1.0, -1.0], [-1.0, 1.0]]), rel=1e-12, abs=0
    )


def test_multinomial_large_logits_are_finite():
    X = np.array([[1.0, -1.0, 2.0]])
    Y = np.eye(3)[:, [0, 0, 2]]
    Theta = np.array([[1e4, 0.0, -1e4]])
    # logits columns: (1e4, 0, -1e4), (-1e4, 0, 1e4), (2e4, 0, -2e4)
    assert multinomial_loss(Theta, X, Y) == pytest.approx(2e4 + 4e4)
    f = jax_multinomial(X, Y, 0.0)
    check_close(
        "grad at 1e4",
        multinomial_grad(Theta, X, Y),
        jax_grad(f, Theta),
        "jax.grad",
        TOL,
    )
    assert np.all(np.isfinite(multinomial_hessian(Theta, X, Y)))


@pytest.mark.parametrize(
    "Theta_shape, X_shape, Y, message",
    [
        (
            (4, 3),
            (4, 2),
            np.eye(3)[:, [0, 1, 2]],
            r"Y has 3 observations but X has shape \(4, 2\)",
        ),
        (
            (4, 2),
            (4, 3),
            np.eye(3)[:, [0, 1, 2]],
            r"Theta must have shape \(d, k\) = \(4, 3\).*got \(4, 2\)",
        ),
        ((3, 3), (4, 3), np.eye(3)[:, [0, 1, 2]], r"\(d, k\) = \(4, 3\).*got \(3, 3\)"),
        (
            (4, 3),
            (4, 3),
            np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1.0]]),
            r"^Y must hold one probability vector per column.*Y has shape \(k, n\) = \(3, 3\): column 0 sums to 2$",
        ),
        (
            (4, 3),
            (4, 3),
            np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1.0]]),
            r"\(k, n\) = \(3, 3\): column 1 sums to 0$",
        ),
        (
            (4, 3),
            (4, 3),
            np.array([[0.5, 0, 0], [0.4, 1, 0], [0, 0, 1.0]]),
            r"\(3, 3\): column 0 sums to 0.9$",
        ),
        (
            (4, 3),
            (4, 3),
            np.array([[1.5, 0, 0], [-0.5, 1, 0], [0, 0, 1.0]]),
            r"^Y must hold one probability vector per column \(entries >= 0\), Y has shape \(k, n\) = \(3, 3\): got Y\[1, 0\] = -0.5$",
        ),
        (
            (4, 3),
            (4, 3),
            np.array([[np.nan, 0, 0], [0, 1, 0], [0, 0, 1.0]]),
            "^Y must be finite",
        ),
        (
            (4, 3),
            (4, 3),
            np.array([0, 1, 2.0]),
            "class indices must have an integer dtype",
        ),
    ],
)
@pytest.mark.parametrize(
    "fn", [multinomial_loss, multinomial_grad, multinomial_hessian]
)
def test_multinomial_bad_input(fn, Theta_shape, X_shape, Y, message):
    with pytest.raises(ValueError, match=message):
        fn(np.zeros(Theta_shape), np.ones(X_shape), Y)


# ----- Soft labels: each column of Y a probability vector -----


def soft_labels(seed, k, n, kind):
    rng = np.random.default_rng(seed)
    if (
        kind == "dirichlet"
    ):  # arbitrary probability vectors, some entries exactly 1 or 0
        Y = rng.dirichlet(np.ones(k), n).T
        Y[:, :1] = np.eye(k)[:, :1]
        return Y
    eps = 0.1  # label smoothing: (1 - eps) one-hot + eps / k
    return (1 - eps) * np.eye(k)[:, rng.integers(0, k, n)] + eps / k


@given(
    seeds,
    dims,
    dims,
    st.sampled_from([2, 4]),
    l2s,
    st.sampled_from(["dirichlet", "smoothing"]),
)
def test_multinomial_soft_labels_match_jax(seed, d, n, k, l2, kind):
    Theta, X, _ = multinomial_problem(seed, d, n, k)
    Y = soft_labels(seed, k, n, kind)
    value, grad, hess = (np.asarray(a) for a in jax_multinomial_all(Theta, X, Y, l2))
    assert multinomial_loss(Theta, X, Y, l2) == pytest.approx(
        float(value), rel=1e-12, abs=1e-12
    )
    check_close(
        "multinomial_grad, soft labels",
        multinomial_grad(Theta, X, Y, l2),
        grad,
        "jax.grad",
        TOL,
    )
    check_close(
        "multinomial_hessian, soft labels",
        multinomial_hessian(Theta, X, Y, l2),
        to_vec_layout(hess, (d, k), (d, k)),
        "jax.hessian",
        TOL,
    )


def test_soft_label_gradient_keeps_precision_at_large_logits():
    # a one-hot column next to a smoothed one, with logits of 1e3: the residual of the
    # one-hot column is computed without cancellation, the smoothed one as Pi - Y
    X = np.array([[1.0, 1.0]])
    Y = np.array([[1.0, 0.9], [0.0, 0.1]])
    Theta = np.array([[1e3, 0.0]])
    check_close(
        "grad at 1e3",
        multinomial_grad(Theta, X, Y),
        jax_grad(jax_multinomial(X, Y, 0.0), Theta),
        "jax.grad",
        TOL,
    )


def test_fit_multinomial_soft_labels_match_weighted_sklearn(rng):
    # -sum_i sum_a y_ai log pi_ai is the loss of k weighted copies of each observation,
    # copy a with label a and weight y_ai: scikit-learn fits that with sample_weight
    from sklearn.linear_model import LogisticRegression

    d, n, k, l2 = 3, 60, 3, 0.5
    X = rng.standard_normal((d, n))
    Y = soft_labels(5, k, n, "dirichlet")
    Theta = fit_multinomial(X, Y, l2=l2)
    assert np.max(np.abs(multinomial_grad(Theta, X, Y, l2))) < 1e-9 * n
    model = LogisticRegression(
        C=1.0 / l2,
        fit_intercept=False,
        solver="newton-cholesky",
        tol=1e-12,
        max_iter=200,
    )
    model.fit(
        np.tile(X.T, (k, 1)), np.repeat(np.arange(k), n), sample_weight=Y.reshape(-1)
    )
    assert np.max(np.abs(Theta - model.coef_.T)) < 1e-7


def test_fit_multinomial_soft_labels_without_l2():
    # smoothed labels give every class positive weight: the loss has a minimum with
    # l2 = 0 even where the one-hot labels are separable
    rng = np.random.default_rng(3)
    X, y = separable(rng)
    Y = np.stack([1 - y, y])
    with pytest.raises(SeparableDataError):
        fit_multinomial(X, Y)
    Y_smooth = 0.9 * Y + 0.05
    Theta = fit_multinomial(X, Y_smooth)
    assert np.allclose(Theta.sum(axis=1), 0, atol=1e-12)
    assert np.max(np.abs(multinomial_grad(Theta, X, Y_smooth))) < 1e-8


# ----- Fits against scikit-learn (rows there, columns here) -----


@pytest.fixture(scope="module")
def breast_cancer():
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    X, y = load_breast_cancer(return_X_y=True)
    return StandardScaler().fit_transform(X), y.astype(float)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


def sklearn_fit(X_rows, y, l2):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(
        C=1.0 / l2,
        fit_intercept=False,
        solver="newton-cholesky",
        tol=1e-12,
        max_iter=200,
    )
    return model.fit(X_rows, y).coef_


@pytest.mark.parametrize("l2", [1.0, 0.1])
def test_fit_logistic_matches_sklearn(breast_cancer, l2):
    X_rows, y = breast_cancer
    theta, history = fit_logistic(X_rows.T, y, l2=l2, return_history=True)
    assert history.converged and history.n_iter < 20
    assert np.max(np.abs(theta - sklearn_fit(X_rows, y, l2).ravel())) < 1e-8
    assert np.all(np.diff(history.loss) < 0)
    assert np.linalg.norm(
        logistic_grad(theta, X_rows.T, y, l2)
    ) <= 1e-10 * y.size * np.sqrt(y.size)


def test_fit_multinomial_matches_sklearn(digits):
    X_rows, labels = digits
    Y = np.eye(10)[:, labels]
    Theta, history = fit_multinomial(X_rows.T, Y, l2=1.0, return_history=True)
    assert Theta.shape == (64, 10) and history.converged
    assert np.max(np.abs(Theta - sklearn_fit(X_rows, labels, 1.0).T)) < 1e-6
    assert np.allclose(Theta.sum(axis=1), 0, atol=1e-10)  # the l2 solution is centred


def test_fit_multinomial_without_l2_fixes_the_gauge(rng):
    # overlapping classes: the unregularised minimum exists, up to v 1^T
    X = rng.standard_normal((3, 200))
    Y = np.eye(3)[:, rng.integers(0, 3, 200)]
    Theta = fit_multinomial(X, Y)
    assert np.allclose(Theta.sum(axis=1), 0, atol=1e-12)
    assert np.max(np.abs(multinomial_grad(Theta, X, Y))) < 1e-8


def test_fit_multinomial_k2_is_binary_logistic(breast_cancer):
    # softmax over two classes is the sigmoid of the difference of the two logits
    X_rows, y = breast_cancer
    Theta = fit_multinomial(X_rows.T, np.stack([1 - y, y]), l2=2.0)
    theta = fit_logistic(
        X_rows.T, y, l2=1.0
    )  # theta = Theta_1 - Theta_0, ||.||^2 doubles
    assert np.max(np.abs((Theta[:, 1] - Theta[:, 0]) - theta)) < 1e-8


def separable(rng, n=40):
    X = rng.standard_normal((2, n))
    y = (X[0] + 0.5 * X[1] > 0).astype(float)
    return X, y


def test_fit_logistic_separable_raises(rng):
    X, y = separable(rng)
    with pytest.raises(SeparableDataError, match=r"separable.*no minimum.*l2 > 0"):
        fit_logistic(X, y)
    theta = fit_logistic(X, y, l2=1.0)  # the cure
    assert np.all(np.isfinite(theta))


def test_fit_multinomial_separable_raises(rng):
    X, y = separable(rng)
    Y = np.stack([1 - y, y])
    with pytest.raises(SeparableDataError, match="no minimum"):
        fit_multinomial(X, Y)
    assert np.all(np.isfinite(fit_multinomial(X, Y, l2=1.0)))


def test_separable_error_is_a_convergence_error():
    assert issubclass(SeparableDataError, ConvergenceError)


def test_fit_logistic_max_iter(breast_cancer):
    X_rows, y = breast_cancer
    with pytest.raises(ConvergenceError, match=r"no convergence in max_iter = 2"):
        fit_logistic(X_rows.T, y, l2=1.0, max_iter=2)


def test_fit_degenerate_problem_is_refused_before_solving():
    # a zero feature and l2 = 0: nothing constrains its coefficient; refused up front
    X = np.array([[1.0, -1.0, 2.0, -0.5], [0.0, 0.0, 0.0, 0.0]])
    y = np.array([1.0, 1.0, 0.0, 0.0])
    message = r"needs X .*rank d = 2.* has rank 1; 1 feature is zero in every observation \(row 1"
    with pytest.raises(ValueError, match="fit_logistic with l2 = 0 " + message):
        fit_logistic(X, y)
    with pytest.raises(ValueError, match="fit_multinomial with l2 = 0 " + message):
        fit_multinomial(X, y.astype(int))
    # collinear features, and fewer observations than features
    with pytest.raises(ValueError, match=r"has rank 1\. Use l2 > 0"):
        fit_logistic(np.vstack([X[0], 2 * X[0]]), y)
    with pytest.raises(ValueError, match=r"rank d = 5.* has rank 4"):
        fit_multinomial(np.random.default_rng(0).standard_normal((5, 4)), np.arange(4))
    assert np.all(np.isfinite(fit_logistic(X, y, l2=1.0)))  # the cure


def test_fit_returns_array_by_default(breast_cancer):
    X_rows, y = breast_cancer
    theta = fit_logistic(X_rows.T, y, l2=1.0)
    assert isinstance(theta, np.ndarray) and theta.shape == (X_rows.shape[1],)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tol": 0.0}, "tol must be"),
        ({"max_iter": -1}, "max_iter must be"),
        ({"l2": -2.0}, "l2 must be"),
    ],
)
def test_fit_bad_options(breast_cancer, kwargs, message):
    X_rows, y = breast_cancer
    with pytest.raises(ValueError, match=message):
        fit_logistic(X_rows.T, y, **kwargs)


def test_fit_bad_shapes():
    with pytest.raises(
        ValueError, match=r"y has 3 observations but X has shape \(2, 4\)"
    ):
        fit_logistic(np.ones((2, 4)), np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="one-hot"):
        fit_multinomial(np.ones((2, 3)), np.ones((2, 3)))


def test_cholesky_without_scipy(monkeypatch, breast_cancer):
    X_rows, y = breast_cancer
    with_scipy = fit_logistic(X_rows.T, y, l2=1.0)
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)  # import fails
    assert np.max(np.abs(fit_logistic(X_rows.T, y, l2=1.0) - with_scipy)) < 1e-12
    assert losses._cholesky_solve(np.zeros((2, 2)), np.ones(2)) is None


# ----- Labels in one form across every fitting function (Chapters 3-5) -----


def _label_data(n=24, d=3, k=3, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.arange(n) % k
    X = rng.standard_normal((d, n)) + 2.0 * np.eye(d, k)[:, idx]
    return X, idx


def _cnn_call(fn):
    import derivlib.layers as L

    rng = np.random.default_rng(0)
    params = L.cnn_init(rng, filters=2, classes=3)
    X = rng.random((6, 1, 8, 8))
    if fn == "cnn_fit":
        return lambda labels: L.cnn_fit(
            X, labels, params=params, epochs=1, batch_size=3, seed=0
        )
    return lambda labels: getattr(L, fn)(params, X, labels)


def _fitter(fn):
    from derivlib.backprop import fit_mlp

    X, _ = _label_data(n=6)
    return {
        "fit_multinomial": lambda labels: fit_multinomial(X, labels, l2=1.0),
        "fit_mlp": lambda labels: fit_mlp(X, labels, n_hidden=2, epochs=1),
        "cnn_fit": _cnn_call("cnn_fit"),
        "cnn_grad": _cnn_call("cnn_grad"),
        "cnn_loss": _cnn_call("cnn_loss"),
    }[fn]


MULTICLASS_FITTERS = ["fit_multinomial", "fit_mlp", "cnn_fit", "cnn_grad", "cnn_loss"]
WRONG_LABELS = [
    (np.array([0.0, 1, 2, 0, 1, 2]), "class indices must have an integer dtype"),
    (np.array([0, 1, 2, 0, 1, -1]), r"class indices must lie in \[0, \d+\), got -1"),
    (np.array([0.5, 0.5, 0, 0, 1, 1]), "class indices must have an integer dtype"),
    # indices as a (1, n) row: not probability columns
    (np.array([[0, 1, 2, 0, 1, 2]]), r"column 0 sums to 0|must have shape \(3, n\)"),
    (
        np.array([[1.5, 0, 0, 1, 0, 0], [-0.5, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 1]]),
        r"entries >= 0\), .*\[1, 0\] = -0.5",  # a negative weight
    ),
    (np.ones((3, 6)), "column 0 sums to 3"),
    (np.array([["a"] * 6]), "must be class indices, .* or label columns"),
    (np.zeros((3, 6, 1)), "must be class indices, .* got an array of shape"),
]


@pytest.mark.parametrize("fn", MULTICLASS_FITTERS)
@pytest.mark.parametrize("labels, message", WRONG_LABELS)
def test_fitting_functions_refuse_a_wrong_label_form(fn, labels, message):
    with pytest.raises(ValueError, match=message):
        _fitter(fn)(labels)


@pytest.mark.parametrize("fn", MULTICLASS_FITTERS)
def test_fitting_functions_accept_indices_and_one_hot_alike(fn):
    idx = np.array([0, 1, 2, 0, 1, 2])
    a, b = _fitter(fn)(idx), _fitter(fn)(np.eye(3)[:, idx])
    if fn == "cnn_grad":  # (loss, grads, cotangents): compare loss and grads
        a, b = (a[0], *a[1]), (b[0], *b[1])
    elif fn == "fit_mlp":  # (params, history)
        a, b = list(a[0].values()), list(b[0].values())
    elif fn == "cnn_fit":  # (params, history)
        a, b = (*a[0], *a[1]), (*b[0], *b[1])
    for u, v in (
        zip(np.atleast_1d(a), np.atleast_1d(b))
        if fn
        in (
            "fit_multinomial",
            "cnn_loss",
        )
        else zip(a, b)
    ):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize(
    "y, message",
    [
        (
            np.array([0, 1, 2, 0, 1, 0]),
            r"y must hold labels in \{0, 1\}, got y\[2\] = 2",
        ),
        (np.array([0, 0.5, 1, 0, 1, 0]), r"got y\[1\] = 0.5"),
        (np.eye(2)[:, [0, 1, 1, 0, 1, 0]], r"1-D array \(n,\).*pass their second row"),
        (np.array([0, 1, 1, 0, 1]), "y has 5 observations but X has shape"),
    ],
)
def test_fit_logistic_refuses_a_wrong_label_form(y, message):
    X, _ = _label_data(n=6, d=2, k=2)
    with pytest.raises(ValueError, match=message):
        fit_logistic(X, y, l2=1.0)


def test_fit_logistic_accepts_int_bool_and_float_labels_alike():
    X, idx = _label_data(n=6, d=2, k=2)
    fits = [fit_logistic(X, idx.astype(t), l2=1.0) for t in (int, bool, float)]
    assert all(np.array_equal(fits[0], f) for f in fits[1:])


def test_fitting_options_are_keyword_only():
    X, idx = _label_data(n=6, d=2, k=2)
    with pytest.raises(TypeError):
        fit_logistic(X, idx, 1.0)
    with pytest.raises(TypeError):
        fit_multinomial(X, idx, 1.0)
    from derivlib.backprop import fit_mlp
    from derivlib.layers import cnn_fit, cnn_init

    with pytest.raises(TypeError):
        fit_mlp(X, idx, 4)
    params = cnn_init(np.random.default_rng(0), filters=2, classes=2)
    with pytest.raises(TypeError):
        cnn_fit(np.zeros((2, 1, 8, 8)), np.array([0, 1]), params)
