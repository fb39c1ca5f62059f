"""Chapter 4 (derivlib.backprop): every backward rule against jax.vjp and by the
dot-product test, over shapes; the MLP's gradient against jax.grad; errors and extremes.

The oracles are JAX forward functions written here (jnp.linalg.inv, jax.nn.log_softmax,
...) and never call derivlib's derivative code. Shapes come from a few small buckets,
so that JAX traces each primitive for a handful of shapes only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import derivlib as dl
from derivlib import backprop as bp
from derivlib.check import (
    check_dot_product,
    check_dot_product_fails,
    check_vjp,
    dot_product_gap,
    relative_error,
)

TOL = 1e-12
seeds = st.integers(0, 2**32 - 1)
# Every shape is built from one of these (a, b, c): few shapes, so JAX compiles each
# oracle a few times only (jax.jit caches one program per shape).
SIZES = [(1, 1, 1), (2, 3, 1), (4, 2, 3)]
sizes = st.sampled_from(SIZES)

# ----- The rules: JAX forward, derivlib JVP and VJP, shapes -----


def softplus_jvp(X, dX):
    return bp.elementwise_jvp(X, dX, fprime=dl.sigmoid)


def softplus_vjp(X, G):
    return bp.elementwise_vjp(X, G, fprime=dl.sigmoid)


def ce_jax(Z, Y):
    return -jnp.sum(Y * jax.nn.log_softmax(Z, axis=0))


# name: (JAX forward, JVP, VJP, shapes(a, b, c) -> (primal shapes, output shape))
RULES = {
    "matmul": (
        jnp.matmul,
        bp.matmul_jvp,
        bp.matmul_vjp,
        lambda a, b, c: ([(a, b), (b, c)], (a, c)),
    ),
    "hadamard": (
        jnp.multiply,
        bp.hadamard_jvp,
        bp.hadamard_vjp,
        lambda a, b, c: ([(a, b), (a, b)], (a, b)),
    ),
    "softplus": (
        jax.nn.softplus,
        softplus_jvp,
        softplus_vjp,
        lambda a, b, c: ([(a, b)], (a, b)),
    ),
    "tanh": (jnp.tanh, bp.tanh_jvp, bp.tanh_vjp, lambda a, b, c: ([(a, b)], (a, b))),
    "softmax": (
        lambda X: jax.nn.softmax(X, axis=0),
        bp.softmax_jvp,
        bp.softmax_vjp,
        lambda a, b, c: ([(a + 1, b)], (a + 1, b)),
    ),
    "log_softmax": (
        lambda X: jax.nn.log_softmax(X, axis=0),
        bp.log_softmax_jvp,
        bp.log_softmax_vjp,
        lambda a, b, c: ([(a + 1, b)], (a + 1, b)),
    ),
    "softmax_cross_entropy": (
        ce_jax,
        bp.softmax_cross_entropy_jvp,
        bp.softmax_cross_entropy_vjp,
        lambda a, b, c: ([(a + 1, b), (a + 1, b)], ()),
    ),
    "transpose": (
        jnp.transpose,
        bp.transpose_jvp,
        bp.transpose_vjp,
        lambda a, b, c: ([(a, b)], (b, a)),
    ),
    "inverse": (
        jnp.linalg.inv,
        bp.inverse_jvp,
        bp.inverse_vjp,
        lambda a, b, c: ([(a, a)], (a, a)),
    ),
    "logdet": (
        lambda A: jnp.linalg.slogdet(A)[1],
        bp.logdet_jvp,
        bp.logdet_vjp,
        lambda a, b, c: ([(a, a)], ()),
    ),
    "solve": (
        jnp.linalg.solve,
        bp.solve_jvp,
        bp.solve_vjp,
        lambda a, b, c: ([(a, a), (a, c)], (a, c)),
    ),
    "trace": (jnp.trace, bp.trace_jvp, bp.trace_vjp, lambda a, b, c: ([(a, a)], ())),
    "frobenius_norm": (
        jnp.linalg.norm,
        bp.frobenius_norm_jvp,
        bp.frobenius_norm_vjp,
        lambda a, b, c: ([(a, b)], ()),
    ),
    "add_bias": (
        lambda X, b: X + b[:, None],
        bp.add_bias_jvp,
        bp.add_bias_vjp,
        lambda a, b, c: ([(a, b), (a,)], (a, b)),
    ),
}


def jit_vjp(f):
    """jax.vjp of f as one compiled function of (*primals, W)."""
    return jax.jit(lambda *args: jax.vjp(f, *args[:-1])[1](args[-1]))


ORACLES = {name: jit_vjp(rule[0]) for name, rule in RULES.items()}


def oracle(name, primals, W):
    return tuple(np.asarray(g) for g in ORACLES[name](*primals, W))


def as_tuple(grads):
    return grads if isinstance(grads, tuple) else (grads,)


def assert_matches_oracle(name, ours, theirs, tol=1e-11):
    ours = as_tuple(ours)
    assert len(ours) == len(theirs), name
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert np.shape(a) == b.shape, (name, i, np.shape(a), b.shape)
        assert relative_error(a, b) < tol, (name, i, relative_error(a, b))


def draw(rng, shape):
    """A random array; a square matrix gets 3 I added, so it is safely invertible."""
    M = rng.standard_normal(shape)
    if len(shape) == 2 and shape[0] == shape[1]:
        M = M + 3 * np.eye(shape[0])
    return M


def point(seed, shapes, out_shape):
    rng = np.random.default_rng(seed)
    primals = tuple(draw(rng, s) for s in shapes)
    tangents = tuple(rng.standard_normal(s) for s in shapes)
    return primals, tangents, rng.standard_normal(out_shape)


@pytest.mark.parametrize("name", sorted(RULES))
@settings(max_examples=8)
@given(seed=seeds, abc=sizes)
def test_rule_matches_jax_vjp_and_passes_dot_product(name, seed, abc):
    """The VJP against jax.vjp, and the JVP against the VJP by (4.5). A VJP equal to
    J^T and <W, JV> = <J^T W, V> for random W pin the JVP down as well."""
    _, jvp, vjp, shapes = RULES[name]
    primals, tangents, W = point(seed, *shapes(*abc))
    assert_matches_oracle(name, vjp(*primals, W), oracle(name, primals, W))
    assert dot_product_gap(jvp, vjp, primals, tangents, W) < TOL


def test_check_helpers_agree_with_the_jitted_oracle(rng, capsys):
    primals, tangents, W = point(7, [(3, 2), (2, 4)], (3, 4))
    check_vjp("matmul", bp.matmul_vjp, jnp.matmul, primals, W)
    check_dot_product("matmul", bp.matmul_jvp, bp.matmul_vjp, [(primals, tangents, W)])
    out = capsys.readouterr().out
    assert "matmul matches jax.vjp" in out and "passes the dot-product test" in out


def test_vjp_shapes_follow_the_primals(rng):
    for name, (_, _, vjp, shapes) in RULES.items():
        primals, _, W = point(int(rng.integers(2**32)), *shapes(2, 3, 5))
        grads = vjp(*primals, W)
        grads = grads if isinstance(grads, tuple) else (grads,)
        assert [np.shape(g) for g in grads] == [p.shape for p in primals], name


def test_solve_vjp_with_a_vector_right_hand_side(rng):
    A, b, g = draw(rng, (4, 4)), rng.standard_normal(4), rng.standard_normal(4)
    assert_matches_oracle(
        "solve, vector b", bp.solve_vjp(A, b, g), oracle("solve", (A, b), g)
    )
    tangents = (rng.standard_normal((4, 4)), rng.standard_normal(4))
    assert dot_product_gap(bp.solve_jvp, bp.solve_vjp, (A, b), tangents, g) < TOL


def test_softmax_of_a_vector(rng):
    x, g = rng.standard_normal(6), rng.standard_normal(6)
    assert_matches_oracle(
        "softmax, vector", bp.softmax_vjp(x, g), oracle("softmax", (x,), g)
    )
    assert_matches_oracle(
        "log_softmax, vector", bp.log_softmax_vjp(x, g), oracle("log_softmax", (x,), g)
    )


def test_softmax_rules_of_a_single_row_act_along_the_row(rng):
    """As derivlib.softmax (eq. 2.5): a (1, n) matrix is one softmax along its row."""
    X, G = (
        rng.standard_normal((1, 2)),
        rng.standard_normal((1, 2)),
    )  # X.T is (2, 1), a shape of SIZES
    for name, vjp in [("softmax", bp.softmax_vjp), ("log_softmax", bp.log_softmax_vjp)]:
        ours = vjp(X, G)
        assert (
            relative_error(ours, oracle(name, (X.T,), G.T)[0].T) < TOL
        )  # the column-wise rule on X^T
        assert relative_error(ours[0], vjp(X[0], G[0])) < TOL
    Y = np.array([[0.0, 1.0]])
    assert bp.softmax_cross_entropy(X, Y) == pytest.approx(
        bp.softmax_cross_entropy(X.T, Y.T), rel=1e-15
    )
    assert (
        bp.softmax_cross_entropy(X, Y) > 0
    )  # column by column, each 1 x 1 softmax would give 0


def test_a_symmetric_point_hides_a_missing_transpose_from_the_dot_product_test(rng):
    """-C G C instead of -C^T G C^T: passes at a symmetric A, fails at a general one."""
    wrong = lambda A, G: -np.linalg.inv(A) @ G @ np.linalg.inv(A)  # noqa: E731
    S = rng.standard_normal((4, 4))
    S = S + S.T + 8 * np.eye(4)
    sym = [
        ((S,), (rng.standard_normal((4, 4)),), rng.standard_normal((4, 4)))
        for _ in range(3)
    ]
    assert max(dot_product_gap(bp.inverse_jvp, wrong, *p) for p in sym) < TOL
    gen = [
        (
            (draw(rng, (4, 4)),),
            (rng.standard_normal((4, 4)),),
            rng.standard_normal((4, 4)),
        )
        for _ in range(3)
    ]
    assert max(dot_product_gap(bp.inverse_jvp, wrong, *p) for p in gen) > 1e-3


# ----- Planted mistakes fail both checks -----

PLANTED = {  # name: (rule, wrong VJP), at the sizes (a, b, c) = (4, 2, 3) of SIZES
    "inverse without transposes": (
        "inverse",
        lambda A, G: -np.linalg.inv(A) @ G @ np.linalg.inv(A),
    ),
    "solve without A^T": (
        "solve",
        lambda A, B, G: (
            -np.linalg.solve(A, G) @ np.linalg.solve(A, B).T,
            np.linalg.solve(A, G),
        ),
    ),
    "softmax summed along rows": (
        "softmax",
        lambda X, G: (
            dl.softmax(X) * (G - (dl.softmax(X) * G).sum(axis=1, keepdims=True))
        ),
    ),
    "log-softmax with its JVP formula": (
        "log_softmax",
        lambda X, G: G - (dl.softmax(X) * G).sum(axis=0),
    ),
    "log det with A^-1": ("logdet", lambda A, g: g * np.linalg.inv(A)),
    "tanh with 1 - X o X": ("tanh", lambda X, G: G * (1 - X * X)),
    "bias as a mean": ("add_bias", lambda X, b, G: (G, G.mean(axis=1))),
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_rule_fails_both_checks(name, rng, capsys):
    rule, wrong_vjp = PLANTED[name]
    _, jvp, _, shapes = RULES[rule]
    points = [point(int(rng.integers(2**32)), *shapes(*SIZES[2])) for _ in range(3)]
    primals, _, W = points[0]
    with pytest.raises(AssertionError):
        assert_matches_oracle(name, wrong_vjp(*primals, W), oracle(rule, primals, W))
    check_dot_product_fails(name, jvp, wrong_vjp, points)
    assert "fails the dot-product test" in capsys.readouterr().out


def test_matmul_with_transposed_factors_fails_both_checks(rng, capsys):
    """A_bar = B^T G and B_bar = G A^T: the shapes only fit for square factors."""
    wrong = lambda A, B, G: (B.T @ G, G @ A.T)  # noqa: E731
    points = [
        point(int(rng.integers(2**32)), [(3, 3), (3, 3)], (3, 3)) for _ in range(3)
    ]
    primals, _, W = points[0]
    with pytest.raises(AssertionError):
        assert_matches_oracle(
            "matmul transposed", wrong(*primals, W), oracle("matmul", primals, W)
        )
    check_dot_product_fails("matmul transposed", bp.matmul_jvp, wrong, points)
    capsys.readouterr()


def test_dot_product_fails_raises_for_a_right_pair(rng):
    points = [point(1, [(3, 3)], (3, 3))]
    with pytest.raises(AssertionError, match="expected to fail"):
        check_dot_product_fails("inverse", bp.inverse_jvp, bp.inverse_vjp, points)


def test_matching_mistakes_pass_the_dot_product_test_only(rng):
    """A JVP and a VJP wrong in the same way are still adjoints: only jax.vjp sees it."""
    wrong = lambda X, V: dl.softmax(X) * (V + (dl.softmax(X) * V).sum(axis=0))  # noqa: E731
    p = point(3, [(4, 3)], (4, 3))
    assert dot_product_gap(wrong, wrong, *p) < TOL
    with pytest.raises(AssertionError):
        assert_matches_oracle(
            "flipped softmax", wrong(*p[0], p[2]), oracle("softmax", p[0], p[2])
        )


# ----- Extreme but valid inputs -----


def test_softmax_rules_at_huge_logits():
    X = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1.0], [0.0, 0.0, -1e4]])
    G = np.arange(9.0).reshape(3, 3)
    for name, vjp in [("softmax", bp.softmax_vjp), ("log_softmax", bp.log_softmax_vjp)]:
        ours = vjp(X, G)
        assert np.all(np.isfinite(ours)), name
        np.testing.assert_allclose(
            ours, oracle(name, (X,), G)[0], rtol=1e-12, atol=1e-12
        )


def test_fused_cross_entropy_where_the_label_probability_underflows():
    Z = np.array([[800.0, 0.0], [-800.0, 1.0]])
    Y = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert bp.softmax_cross_entropy(Z, Y) == pytest.approx(
        1600.0 + 1.0 + np.log1p(np.exp(-1.0)), rel=1e-12
    )
    Zbar, Ybar = bp.softmax_cross_entropy_vjp(Z, Y, 1.0)
    assert np.all(np.isfinite(Zbar)) and np.all(np.isfinite(Ybar))
    np.testing.assert_allclose(Zbar, dl.softmax(Z) - Y, atol=1e-15)
    np.testing.assert_allclose(
        Zbar, oracle("softmax_cross_entropy", (Z, Y), 1.0)[0], atol=1e-15
    )


def test_tanh_vjp_saturates_to_zero_not_nan():
    X = np.array([[-1e5, 0.0, 1e5]])
    assert np.array_equal(bp.tanh_vjp(X, np.ones((1, 3))), np.array([[0.0, 1.0, 0.0]]))


def test_frobenius_norm_of_huge_entries():
    A = np.full((2, 2), 1e300)
    assert bp.frobenius_norm(A) == pytest.approx(2e300, rel=1e-15)
    np.testing.assert_allclose(
        bp.frobenius_norm_vjp(A, 1.0), np.full((2, 2), 0.5), rtol=1e-15
    )


def test_logdet_of_a_negative_determinant(rng):
    A = np.diag([-2.0, 3.0, 0.5])
    assert bp.logdet(A) == pytest.approx(np.log(3.0), rel=1e-15)
    assert_matches_oracle(
        "logdet, det < 0", bp.logdet_vjp(A, 1.5), oracle("logdet", (A,), 1.5)
    )


# ----- Errors name the argument and its shape -----


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: bp.matmul_vjp(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3))),
            r"A \(2, 3\) and B \(2, 3\)",
        ),
        (
            lambda: bp.matmul_vjp(np.ones((2, 3)), np.ones((3, 4)), np.ones((4, 2))),
            r"cotangent G .*\(2, 4\), got \(4, 2\)",
        ),
        (
            lambda: bp.matmul_jvp(
                np.ones((2, 3)), np.ones((3, 4)), np.ones((3, 2)), np.ones((3, 4))
            ),
            r"dA .*\(2, 3\), got \(3, 2\)",
        ),
        (
            lambda: bp.hadamard_vjp(np.ones((2, 3)), np.ones((3, 2)), np.ones((2, 3))),
            r"B to have A's shape \(2, 3\), got B \(3, 2\)",
        ),
        (
            lambda: bp.elementwise_vjp(
                np.ones((2, 3)), np.ones((2, 3)), fprime=lambda x: x.sum()
            ),
            r"fprime must act element-wise",
        ),
        (
            lambda: bp.softmax_vjp(np.ones((2, 3, 4)), np.ones((2, 3, 4))),
            r"X must be 1-D or 2-D, got shape \(2, 3, 4\)",
        ),
        (
            lambda: bp.softmax_vjp(np.ones((2, 3)), np.full((2, 3), np.inf)),
            r"G must be finite",
        ),
        (
            lambda: bp.softmax_vjp(np.array([[np.nan, 1.0]]), np.ones((1, 2))),
            r"X must be finite",
        ),
        (
            lambda: bp.softmax_cross_entropy_vjp(np.ones((3, 2)), np.ones((2, 3)), 1.0),
            r"Y must have the shape \(3, 2\) .* got \(2, 3\)",
        ),
        (
            lambda: bp.softmax_cross_entropy_vjp(
                np.ones((3, 2)), np.ones((3, 2)), np.ones(2)
            ),
            r"cotangent g .* scalar, got shape \(2,\)",
        ),
        (
            lambda: bp.transpose_vjp(np.ones((2, 3)), np.ones((2, 3))),
            r"\(3, 2\), got \(2, 3\)",
        ),
        (
            lambda: bp.inverse_vjp(np.ones((2, 3)), np.ones((2, 3))),
            r"A must be square, got shape \(2, 3\)",
        ),
        (
            lambda: bp.inverse_vjp(np.ones((2, 2)), np.ones((2, 2))),
            r"invertible A, got a singular matrix of shape \(2, 2\)",
        ),
        (lambda: bp.logdet_vjp(np.zeros((3, 3)), 1.0), r"invertible A"),
        (
            lambda: bp.solve_vjp(np.eye(3), np.ones((2, 2)), np.ones((2, 2))),
            r"B to have 3 rows, got B \(2, 2\)",
        ),
        (
            lambda: bp.solve_vjp(np.ones((2, 2)), np.ones((2, 1)), np.ones((2, 1))),
            r"singular matrix of shape \(2, 2\)",
        ),
        (
            lambda: bp.trace_vjp(np.ones((2, 3)), 1.0),
            r"A must be square, got shape \(2, 3\)",
        ),
        (
            lambda: bp.frobenius_norm_vjp(np.zeros((2, 3)), 1.0),
            r"not differentiable at A = 0 \(A of shape \(2, 3\)",
        ),
        (
            lambda: bp.add_bias_vjp(np.ones((3, 4)), np.ones(4), np.ones((3, 4))),
            r"b of shape \(3,\) for X \(3, 4\), got b \(4,\)",
        ),
        (
            lambda: bp.add_bias(np.ones((3, 4)), np.ones((3, 1))),
            r"b must be 1-D, got shape \(3, 1\)",
        ),
        (
            lambda: bp.elementwise_vjp(np.ones((2, 3)), np.ones((2, 3)), fprime=None),
            r"fprime must be a function .*\(2, 3\), got NoneType",
        ),
        (
            lambda: bp.elementwise_jvp(np.ones((2, 3)), np.ones((2, 3)), fprime=3.0),
            r"fprime must be a function .* got float",
        ),
        (
            lambda: bp.softmax_cross_entropy_vjp(
                np.array([[1e308, 0.0], [-1e308, 1.0]]), np.eye(2), 1.0
            ),
            r"Z of shape \(2, 2\) has logits too far apart",
        ),
        (
            lambda: bp.softmax_cross_entropy(
                np.array([[1e308, 0.0], [-1e308, 1.0]]), np.eye(2)
            ),
            r"Z of shape \(2, 2\) has logits too far apart",
        ),
    ],
)
def test_errors_name_the_argument_and_shape(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----- The multilayer perceptron -----


def mlp_loss_jax(P, X, Y):
    H = jnp.tanh(P["W1"] @ X + P["b1"][:, None])
    Z = P["W2"] @ H + P["b2"][:, None]
    return -jnp.sum(Y * jax.nn.log_softmax(Z, axis=0)) / X.shape[1]


mlp_value_and_grad_jax = jax.jit(jax.value_and_grad(mlp_loss_jax))


def small_problem(seed, d=6, h=5, k=3, n=8):
    rng = np.random.default_rng(seed)
    params = bp.mlp_init(d, h, k, rng)
    params = {
        name: v + 0.3 * rng.standard_normal(v.shape) for name, v in params.items()
    }
    return params, rng.standard_normal((d, n)), np.eye(k)[:, rng.integers(0, k, n)]


@settings(max_examples=6)
@given(seed=seeds)
def test_mlp_gradient_matches_jax_grad(seed):
    params, X, Y = small_problem(seed)
    loss, grads = bp.mlp_loss_and_grad(params, X, Y)
    loss_jax, grads_jax = mlp_value_and_grad_jax(params, X, Y)
    assert loss == pytest.approx(float(loss_jax), rel=1e-12)
    assert loss == pytest.approx(bp.mlp_loss(params, X, Y), rel=1e-15)
    for name in bp.MLP_PARAMETERS:
        assert relative_error(grads[name], np.asarray(grads_jax[name])) < TOL, name


def test_mlp_backward_pass_is_the_chain_of_rules(rng):
    """(4.20) line by line through the public rules gives mlp_loss_and_grad's gradients."""
    P, X, Y = small_problem(5)
    A = bp.add_bias(P["W1"] @ X, P["b1"])
    H = bp.tanh(A)
    Z = bp.add_bias(P["W2"] @ H, P["b2"])
    Zbar, _ = bp.softmax_cross_entropy_vjp(Z, Y, 1 / X.shape[1])
    WH_bar, b2_bar = bp.add_bias_vjp(P["W2"] @ H, P["b2"], Zbar)
    W2_bar, H_bar = bp.matmul_vjp(P["W2"], H, WH_bar)
    A_bar = bp.tanh_vjp(A, H_bar)
    WX_bar, b1_bar = bp.add_bias_vjp(P["W1"] @ X, P["b1"], A_bar)
    W1_bar, _ = bp.matmul_vjp(P["W1"], X, WX_bar)
    _, grads = bp.mlp_loss_and_grad(P, X, Y)
    for name, ours in [("W1", W1_bar), ("b1", b1_bar), ("W2", W2_bar), ("b2", b2_bar)]:
        np.testing.assert_allclose(grads[name], ours, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(bp.mlp_forward(P, X), Z, rtol=1e-14)


def test_fit_mlp_is_deterministic_and_learns():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 3)) * 3
    labels = rng.integers(0, 3, 120)
    X = centres[:, labels] + rng.standard_normal((4, 120))
    Y = np.eye(3)[:, labels]
    p1, h1 = bp.fit_mlp(
        X,
        Y,
        n_hidden=8,
        epochs=10,
        batch_size=16,
        learning_rate=0.1,
        seed=3,
        X_test=X[:, :30],
        Y_test=Y[:, :30],
    )
    p2, h2 = bp.fit_mlp(
        X,
        Y,
        n_hidden=8,
        epochs=10,
        batch_size=16,
        learning_rate=0.1,
        seed=3,
        X_test=X[:, :30],
        Y_test=Y[:, :30],
    )
    assert h1 == h2 and all(np.array_equal(p1[k], p2[k]) for k in p1)
    assert len(h1["train_loss"]) == len(h1["test_loss"]) == 10
    assert h1["train_loss"][-1] < 0.5 * h1["train_loss"][0]
    assert np.mean(bp.mlp_predict(p1, X) == labels) > 0.9


def test_fit_mlp_reports_divergence():
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((3, 20)) * 100, np.eye(2)[:, rng.integers(0, 2, 20)]
    with pytest.raises(ValueError, match="learning_rate .* too large"):
        bp.fit_mlp(X, Y, n_hidden=4, epochs=3, learning_rate=1e300)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda P, X, Y: bp.mlp_loss_and_grad({"W1": P["W1"]}, X, Y),
            r"keys \['W1', 'b1', 'W2', 'b2'\], got \['W1'\]",
        ),
        (
            lambda P, X, Y: bp.mlp_loss_and_grad({**P, "b1": np.ones(4)}, X, Y),
            r"b1 must have shape \(5,\), got \(4,\)",
        ),
        (
            lambda P, X, Y: bp.mlp_loss_and_grad({**P, "W2": np.ones((3, 4))}, X, Y),
            r"W2 must have 5 columns .* got shape \(3, 4\)",
        ),
        (
            lambda P, X, Y: bp.mlp_loss_and_grad(P, X[:4], Y),
            r"X must have 6 rows .* got shape \(4, 8\)",
        ),
        (
            lambda P, X, Y: bp.mlp_loss_and_grad(P, X, Y[:, :5]),
            r"Y must have shape \(3, 8\) .* got \(3, 5\)",
        ),
        (
            lambda P, X, Y: bp.fit_mlp(X, Y[:, :5]),
            r"Y must have one label per observation, X has 8 and Y has shape \(3, 5\)",
        ),
        (
            lambda P, X, Y: bp.fit_mlp(X, Y, batch_size=0),
            r"batch_size must be a positive integer, got 0",
        ),
        (
            lambda P, X, Y: bp.fit_mlp(X, Y, learning_rate=-1.0),
            r"learning_rate must be a positive, finite number, got -1.0",
        ),
        (
            lambda P, X, Y: bp.fit_mlp(X, Y, learning_rate="a"),
            r"learning_rate must be a positive, finite number, got 'a'",
        ),
        (
            lambda P, X, Y: bp.fit_mlp(X, Y, learning_rate=None),
            r"learning_rate must be a positive, finite number, got None",
        ),
        (
            lambda P, X, Y: bp.fit_mlp(X, Y, seed=-1),
            r"seed must be a non-negative integer, got -1",
        ),
        (
            lambda P, X, Y: bp.fit_mlp(X, Y, seed=1.5),
            r"seed must be a non-negative integer, got 1.5",
        ),
        (
            lambda P, X, Y: bp.fit_mlp(X, Y, X_test=X[:4], Y_test=Y),
            r"X_test must have 6 rows",
        ),
        (
            lambda P, X, Y: bp.mlp_init(6, 0, 3, np.random.default_rng(0)),
            r"n_hidden must be a positive integer, got 0",
        ),
        (
            lambda P, X, Y: bp.mlp_init(6, 5, 3, 0),
            r"rng must be a numpy.random.Generator, got int",
        ),
    ],
)
def test_mlp_errors(call, message):
    P, X, Y = small_problem(0)
    with pytest.raises(ValueError, match=message):
        call(P, X, Y)


# ----- Two derivations: a mistake in a VJP's helper fails the dot-product test -----

# family: (the helper that the JVP and the VJP used to share, a symmetric mistake in
# it, the rules). With the helper shared, both rules carried the mistake and stayed
# transposes of each other; now only the VJP reads it.
PLANTS = {
    "tanh": (
        "_tanh_vjp_from_output",
        lambda Y, G: G * (1.0 - 2.0 * Y * Y),  # tanh' = 1 - 2 tanh^2: wrong
        "tanh",
    ),
    "softmax": (
        "_softmax_vjp_columns",
        lambda X, G: dl.softmax(X) * G,  # the projection 1 1^T (S o G) dropped
        "softmax",
    ),
}


@pytest.mark.parametrize("family", sorted(PLANTS))
def test_a_mistake_in_the_vjp_helper_fails_the_dot_product_test(family, monkeypatch):
    helper, wrong, rule = PLANTS[family]
    _, jvp, vjp, shapes = RULES[rule]
    primals, tangents, W = point(5, *shapes(*SIZES[2]))
    assert dot_product_gap(jvp, vjp, primals, tangents, W) < TOL
    monkeypatch.setattr(bp, helper, wrong)
    assert dot_product_gap(jvp, vjp, primals, tangents, W) > 1e-3


# ----- Every rule refuses a non-finite argument and names it -----


def _nan_cases():
    for name in sorted(RULES):
        _, jvp, vjp, shapes = RULES[name]
        for kind, f in (("jvp", jvp), ("vjp", vjp)):
            for i in range(len(shapes(*SIZES[2])[0]) * (2 if kind == "jvp" else 1)):
                yield name, kind, i
            if kind == "vjp":
                yield name, kind, len(shapes(*SIZES[2])[0])  # the cotangent


def _arg_names(f):
    """The parameter names of a rule (the test's softplus wrappers name X, dX, G)."""
    import inspect

    return [
        p.name
        for p in inspect.signature(f).parameters.values()
        if p.kind is p.POSITIONAL_OR_KEYWORD
    ]


@pytest.mark.parametrize("name, kind, which", list(_nan_cases()))
def test_every_rule_names_the_non_finite_argument(name, kind, which):
    """A NaN in each primal, tangent and cotangent, one at a time: the ValueError
    names that argument (dA, G, g, ...), not a primal it was checked through."""
    _, jvp, vjp, shapes = RULES[name]
    primals, tangents, W = point(11, *shapes(*SIZES[2]))
    args = list(primals) + (list(tangents) if kind == "jvp" else [W])
    args = [np.array(a, dtype=float) for a in args]
    args[which][...] = np.nan  # every entry: a scalar cotangent too
    f = jvp if kind == "jvp" else vjp
    with pytest.raises(ValueError, match=rf"^{_arg_names(f)[which]} must be finite"):
        f(*args)


# ----- softmax_vjp in blocks of rows: the same result, every entry checked -----


def _softmax_vjp_plain(X, G):
    """Eq. 4.9 in whole-array NumPy, along derivlib's softmax axis."""
    axis = dl.vector.softmax_axis(np.shape(X))
    S = dl.softmax(X)
    return S * (G - (S * G).sum(axis=axis, keepdims=True))


BLOCK_SHAPES = [(7, 3), (13, 5), (6, 1), (1, 9), (11,), (4, 6)]


@pytest.mark.parametrize("shape", BLOCK_SHAPES)
def test_softmax_vjp_in_blocks_of_rows_matches_the_plain_formula(shape, monkeypatch):
    """With blocks of 2 or 6 entries (so of one to three rows), several blocks and a
    short last one: the blocked passes give the whole-array formula to rounding."""
    rng = np.random.default_rng(3)
    X, G = 3 * rng.standard_normal(shape), rng.standard_normal(shape)
    expected = _softmax_vjp_plain(X, G)
    for block in (2, 6, 1 << 16):
        monkeypatch.setattr(bp, "_BLOCK", block)
        np.testing.assert_allclose(bp.softmax_vjp(X, G), expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("shape", BLOCK_SHAPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_softmax_vjp_in_blocks_refuses_every_non_finite_entry(shape, bad, monkeypatch):
    """A NaN or an infinity at any entry of X or of G, in any block, is refused and
    named; -inf in X (whose exponential is a harmless 0) and an infinity in G where
    the softmax underflows to 0 (0 * inf) included."""
    monkeypatch.setattr(bp, "_BLOCK", 2)
    rng = np.random.default_rng(4)
    X, G = rng.standard_normal(shape), rng.standard_normal(shape)
    X.flat[0] = -800.0  # exp(-800 - max) = 0: an infinity of G there is times 0
    for name in ("X", "G"):
        for i in range(X.size):
            args = {"X": X.copy(), "G": G.copy()}
            args[name].flat[i] = bad
            with pytest.raises(ValueError, match=rf"^{name} must be finite, got"):
                bp.softmax_vjp(args["X"], args["G"])


def test_softmax_vjp_with_logits_far_apart_is_finite():
    """Logits 1.5e308 apart overflow the check's sum of X - max X, which then scans X,
    finds it finite and returns the (finite) gradient."""
    X = np.array([[1.5e308, 0.0], [-1.5e308, 1.0], [-1.5e308, 2.0]])
    G = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    with np.errstate(all="raise"):  # no floating-point warning escapes
        Xbar = bp.softmax_vjp(X, G)
    with np.errstate(over="ignore"):  # X - max X = -inf, whose exponential is 0
        expected = _softmax_vjp_plain(X, G)
    np.testing.assert_allclose(Xbar, expected, rtol=1e-14, atol=0)
    assert np.all(np.isfinite(Xbar))


@pytest.mark.parametrize("name", ["W1", "b1", "W2", "b2", "X", "Y"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_mlp_loss_and_grad_names_a_non_finite_argument(name, bad):
    """The one scan of the folded copies catches a NaN or an infinity in any parameter
    or input, and the error names it."""
    P, X, Y = small_problem(0)
    args = {**{k: np.array(v, dtype=float) for k, v in P.items()}, "X": X, "Y": Y}
    args = {k: np.array(v, dtype=float) for k, v in args.items()}
    args[name].flat[-1] = bad
    params = {k: args[k] for k in bp.MLP_PARAMETERS}
    with pytest.raises(ValueError, match=rf"^{name} must be finite"):
        bp.mlp_loss_and_grad(params, args["X"], args["Y"])


@pytest.mark.parametrize(
    "column, g, name",
    [
        ([np.inf, np.nan, 0.0], [1.0, 1.0, 1.0], "X"),  # a NaN where the max is inf
        ([np.nan, np.inf, 0.0], [1.0, 1.0, 1.0], "X"),
        ([-np.inf, -np.inf, -np.inf], [1.0, 1.0, 1.0], "X"),  # -inf everywhere
        ([0.0, -800.0, 0.0], [1.0, np.inf, 1.0], "G"),  # inf where the softmax is 0
        ([0.0, -800.0, 0.0], [1.0, np.nan, 1.0], "G"),
        ([0.0, 0.0, 0.0], [np.inf, 1.0, -np.inf], "G"),  # infinities of both signs
        ([np.inf, 0.0, 0.0], [np.nan, 1.0, 1.0], "X"),  # both at fault: X is named
    ],
)
def test_softmax_vjp_refuses_non_finite_columns(column, g, name):
    """Whole columns of the corner cases: the check inside the passes sees them all."""
    X, G = np.zeros((3, 2)), np.ones((3, 2))
    X[:, 1], G[:, 1] = column, g
    with pytest.raises(ValueError, match=rf"^{name} must be finite, got"):
        bp.softmax_vjp(X, G)


def test_softmax_vjp_with_a_cotangent_near_the_largest_float_is_finite():
    """1^T (E o G) overflows when a column of G is near the largest float and many
    entries of E are 1; the sum is then taken again from S = E / s, and the gradient
    (0 for a constant column of G) is finite."""
    X, G = np.zeros((1000, 3)), np.full((1000, 3), 1e308)
    G[:, 2] = np.linspace(-1.0, 1.0, 1000) * 1e308
    Xbar = bp.softmax_vjp(X, G)
    assert np.all(np.isfinite(Xbar))
    S = np.full((1000, 3), 1e-3)
    expected = S * (G - (S * G).sum(axis=0))
    np.testing.assert_allclose(Xbar, expected, rtol=0, atol=1e-15 * 1e308 * 1e-3)


def test_one_blas_thread_limits_the_blas_or_does_nothing(monkeypatch):
    """With threadpoolctl the context holds every BLAS to one thread and restores it;
    without it (its import failing), the context is a no-op, not an error."""
    import builtins

    from threadpoolctl import threadpool_info, threadpool_limits

    from derivlib import _threads

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    monkeypatch.setattr(_threads, "_CONTROLLER", [])
    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() == {2}
        with _threads.one_blas_thread():
            assert blas_threads() == {1}
        assert blas_threads() == {2}
    real_import = builtins.__import__

    def no_threadpoolctl(name, *args, **kwargs):
        if name == "threadpoolctl":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_threads, "_CONTROLLER", [])
    monkeypatch.setattr(builtins, "__import__", no_threadpoolctl)
    with _threads.one_blas_thread() as context:
        assert context is None
    assert _threads._CONTROLLER == [None]


def test_mlp_holds_small_products_to_one_blas_thread_and_gives_the_same_result(
    monkeypatch,
):
    """mlp_loss_and_grad enters one_blas_thread for the digits' size and not above
    _ONE_THREAD_WORK multiply-adds; the result is the same either way."""
    from derivlib import backprop

    rng = np.random.default_rng(3)
    params = dl.mlp_init(64, 64, 10, rng)
    X = rng.standard_normal((64, 256))
    Y = np.eye(10)[rng.integers(0, 10, 256)].T
    loss, grads = dl.mlp_loss_and_grad(params, X, Y)
    entered = []
    real = backprop.one_blas_thread

    def counting():
        entered.append(True)
        return real()

    monkeypatch.setattr(backprop, "one_blas_thread", counting)
    loss1, grads1 = dl.mlp_loss_and_grad(params, X, Y)
    assert entered == [True]
    monkeypatch.setattr(backprop, "_ONE_THREAD_WORK", 64 * 65 * 256 - 1)
    loss2, grads2 = dl.mlp_loss_and_grad(params, X, Y)
    assert entered == [True]
    for other_loss, other in ((loss1, grads1), (loss2, grads2)):
        assert other_loss == loss
        for k in grads:
            np.testing.assert_allclose(other[k], grads[k], rtol=1e-13, atol=1e-15)
