"""Chapter 5 (derivlib.layers) against JAX.

The oracles are a few lines of JAX (lax.conv_general_dilated, lax.reduce_window,
jax.nn.softmax) that never call derivlib's derivative code; each is jitted once per
shape, and the property tests draw shapes from small fixed sets so that JAX compiles a
handful of times only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from derivlib import layers as L
from derivlib.check import dot_product_gap, relative_error
from derivlib.matrix import kron

TOL = 1e-11
seeds = st.integers(0, 2**32 - 1)


def close(a, b, tol=TOL):
    assert np.all(np.isfinite(a)), "not finite"
    err = relative_error(a, b)
    assert err < tol, f"relative error {err:.3e}"


def draw(rng, *shapes):
    return tuple(rng.standard_normal(s) for s in shapes)


# ----- Oracles (jitted once per configuration) -----


@functools.lru_cache(maxsize=None)
def jax_conv(stride, padding):
    """(Y, (Xbar, Kbar)) of the convolution, one compiled function per configuration."""
    f = lambda X, K: lax.conv_general_dilated(
        X, K, (stride, stride), [(padding, padding)] * 2
    )  # noqa: E731

    def both(X, K, G):
        Y, pullback = jax.vjp(f, X, K)
        return Y, pullback(G)

    return jax.jit(both)


@functools.lru_cache(maxsize=None)
def jax_pool(kind, size, stride, padding=0):
    """(Y, Xbar, dY) of max or average pooling (padding -inf or 0 on every side) in one
    compiled function."""
    window, strides = (1, 1, size, size), (1, 1, stride, stride)
    pad = ((0, 0), (0, 0), (padding, padding), (padding, padding))
    if kind == "max":
        f = lambda X: lax.reduce_window(X, -jnp.inf, lax.max, window, strides, pad)  # noqa: E731
    else:
        f = lambda X: lax.reduce_window(X, 0.0, lax.add, window, strides, pad) / size**2  # noqa: E731

    def all_three(X, G, dX):
        Y, pullback = jax.vjp(f, X)
        return Y, pullback(G)[0], jax.jvp(f, (X,), (dX,))[1]

    return jax.jit(all_three)


def jax_norm(X, gamma, beta, eps, axis):
    mu = X.mean(axis=axis, keepdims=True)
    var = ((X - mu) ** 2).mean(axis=axis, keepdims=True)
    return gamma[:, None] * (X - mu) / jnp.sqrt(var + eps) + beta[:, None]


@functools.lru_cache(maxsize=None)
def jax_norm_vjp(axis):
    """(Y, (Xbar, gammabar, betabar)) of batch norm (axis 1) or layer norm (axis 0)."""

    def both(X, g, b, G, eps):
        Y, pullback = jax.vjp(lambda X, g, b: jax_norm(X, g, b, eps, axis), X, g, b)
        return Y, pullback(G)

    return jax.jit(both)


def jax_attention(Q, K, V, mask):
    S = Q @ K.T / jnp.sqrt(Q.shape[1])
    return jax.nn.softmax(S, axis=1, where=mask) @ V


@jax.jit
def jax_attention_vjp(Q, K, V, mask, G):
    """(O, (Qbar, Kbar, Vbar)); jax.nn.softmax gives a fully masked row zeros."""
    O, pullback = jax.vjp(lambda Q, K, V: jax_attention(Q, K, V, mask), Q, K, V)
    return O, pullback(G)


# ----- Convolution -----

# (N, C, H, W, O, k, stride, padding): strides 1-3, paddings 0-2, 1-4 channels, non-square;
# at stride 1, conv2d_vjp takes the patch form of eq. 5.20 below C k k = 36 and the
# offset form from 36 on (the last line)
CONV = [
    (2, 3, 7, 5, 4, 3, 2, 1),
    (1, 1, 6, 6, 2, 2, 1, 0),
    (3, 2, 5, 8, 3, 3, 1, 2),
    (2, 2, 9, 7, 1, 3, 3, 0),
    (2, 1, 8, 8, 3, 5, 2, 2),
    (2, 2, 6, 7, 3, 3, 1, 1),
    (2, 4, 5, 6, 3, 3, 1, 1),
]


@settings(max_examples=30)
@given(st.sampled_from(CONV), seeds)
def test_conv2d_forward_vjp_and_dot_product(cfg, seed):
    N, C, H, W, O, k, s, p = cfg
    rng = np.random.default_rng(seed)
    X, K = draw(rng, (N, C, H, W), (O, C, k, k))
    Y = L.conv2d(X, K, stride=s, padding=p)
    (G,) = draw(rng, Y.shape)
    Yj, (Xj, Kj) = jax_conv(s, p)(X, K, G)
    close(Y, np.asarray(Yj))
    Xbar, Kbar = L.conv2d_vjp(X, K, G, stride=s, padding=p)
    close(Xbar, np.asarray(Xj))
    close(Kbar, np.asarray(Kj))
    # every way of taking the sums: eq. 5.5-5.6 with phi(X), and at stride 1 eq. 5.20
    # in both of its forms (offset by offset, and the patch matrix of a group of images)
    paths = {"im2col": lambda X, K, G: L._conv2d_vjp_im2col(X, K, G, s, p)}
    if s == 1:
        for form in ["offsets", "patches"]:
            paths[form] = functools.partial(L._conv2d_vjp_shifts, padding=p, form=form)
    for Xbar_, Kbar_ in (path(X, K, G) for path in paths.values()):
        close(Xbar_, np.asarray(Xj))
        close(Kbar_, np.asarray(Kj))
    tangents = draw(rng, X.shape, K.shape)
    for name, vjp in paths.items():
        gap = dot_product_gap(
            lambda X, K, dX, dK: L.conv2d_jvp(X, K, dX, dK, stride=s, padding=p),
            vjp,
            (X, K),
            tangents,
            G,
        )
        assert gap < 1e-12, (name, gap)
    assert L.conv2d_vjp(X, K, G, stride=s, padding=p, input_grad=False)[0] is None
    close(
        L.conv2d_vjp(X, K, G, stride=s, padding=p, input_grad=False)[1], np.asarray(Kj)
    )
    gap = dot_product_gap(
        lambda X, K, dX, dK: L.conv2d_jvp(X, K, dX, dK, stride=s, padding=p),
        lambda X, K, G: L.conv2d_vjp(X, K, G, stride=s, padding=p),
        (X, K),
        draw(rng, X.shape, K.shape),
        G,
    )
    assert gap < 1e-12


@pytest.mark.parametrize("cfg", CONV[:4])
def test_conv_is_a_matrix_product_through_h(cfg, rng):
    """vec phi(x) = H vec x, and vec y = (F^T kron I) H vec x, eq. 5.3 (A.5)."""
    N, C, H, W, O, k, s, p = cfg
    x, K = draw(rng, (C, H, W), (O, C, k, k))
    Hm = L.im2col_matrix(x.shape, k, k, stride=s, padding=p)
    phi = L.im2col(x[None], k, k, stride=s, padding=p)
    close(Hm @ x.ravel(), phi.ravel(order="F"))
    assert set(np.unique(Hm)) <= {0.0, 1.0} and np.all(Hm.sum(axis=1) <= 1)
    y = L.conv2d(x[None], K, stride=s, padding=p)[0]
    F = L.kernel_matrix(K)
    close(kron(F.T, np.eye(phi.shape[0])) @ Hm @ x.ravel(), y.ravel())
    close(L.image_matrix(y), phi @ F)


@settings(max_examples=30)
@given(st.sampled_from(CONV), seeds)
def test_col2im_is_the_adjoint_of_im2col(cfg, seed):
    N, C, H, W, O, k, s, p = cfg
    rng = np.random.default_rng(seed)
    (X,) = draw(rng, (N, C, H, W))
    cols = L.im2col(X, k, k, stride=s, padding=p)
    (D,) = draw(rng, cols.shape)
    left, right = (
        np.sum(D * cols),
        np.sum(L.col2im(D, X.shape, k, k, stride=s, padding=p) * X),
    )
    assert abs(left - right) < 1e-12 * (np.sum(np.abs(D * cols)) + 1)


def test_conv2d_vjp_takes_eq_5_20_at_stride_1_and_can_skip_xbar(rng, monkeypatch):
    X, K = draw(rng, (2, 2, 6, 7), (3, 2, 3, 3))  # a shape of CONV: compiled once
    (G,) = draw(rng, (2, 3, 6, 7))
    Yj, (Xj, Kj) = jax_conv(1, 1)(X, K, G)
    calls, original = [], L._conv2d_vjp_shifts
    monkeypatch.setattr(
        L, "_conv2d_vjp_shifts", lambda *a: calls.append(a) or original(*a)
    )
    Xbar, Kbar = L.conv2d_vjp(X, K, G, padding=1)
    assert len(calls) == 1
    close(Xbar, np.asarray(Xj))
    close(Kbar, np.asarray(Kj))
    none, Kbar = L.conv2d_vjp(X, K, G, padding=1, input_grad=False)
    assert none is None and len(calls) == 2
    close(Kbar, np.asarray(Kj))


@pytest.mark.parametrize("C, form", [(1, "patches"), (3, "patches"), (4, "offsets")])
def test_conv2d_vjp_chooses_the_form_of_eq_5_20_by_shape(rng, monkeypatch, C, form):
    """Under a 3 x 3 kernel, C k k = 9 and 27 patch rows take the patch form and 36
    the offset form: conv2d_vjp takes that form, returns exactly what the form forced
    by name returns, and the gradients of jax.vjp."""
    X, K = draw(rng, (3, C, 6, 5), (2, C, 3, 3))
    (G,) = draw(rng, (3, 2, 6, 5))
    Yj, (Xj, Kj) = jax_conv(1, 1)(X, K, G)
    taken, original = [], L._conv2d_form
    monkeypatch.setattr(
        L, "_conv2d_form", lambda *a: taken.append(original(*a)) or taken[-1]
    )
    chosen = L.conv2d_vjp(X, K, G, padding=1)
    assert taken == [form]
    forced = L._conv2d_vjp_shifts(X, K, G, 1, form=form)
    for a, b, ref in zip(chosen, forced, (Xj, Kj)):
        np.testing.assert_array_equal(a, b)
        close(a, np.asarray(ref))


@pytest.mark.parametrize("form", ["offsets", "patches"])
def test_conv2d_vjp_in_groups_of_images(rng, monkeypatch, form):
    """Eq. 5.20 takes the batch a group of images at a time (as many as fit in
    _CHUNK_BYTES): with room for two images of five, the groups are 2, 2 and 1, and
    the gradients are those of jax.vjp, with and without X bar."""
    X, K = draw(rng, (5, 2, 6, 7), (3, 2, 3, 3))
    (G,) = draw(rng, (5, 3, 6, 7))
    Yj, (Xj, Kj) = jax_conv(1, 1)(X, K, G)
    work = 2 * 2 * 9 if form == "patches" else 2
    monkeypatch.setattr(L, "_CHUNK_BYTES", 2 * 8 * 8 * 9 * (2 * 2 + 3 + work))
    Xbar, Kbar = L._conv2d_vjp_shifts(X, K, G, 1, form=form)
    close(Xbar, np.asarray(Xj))
    close(Kbar, np.asarray(Kj))
    none, Kbar = L._conv2d_vjp_shifts(X, K, G, 1, False, form=form)
    assert none is None
    close(Kbar, np.asarray(Kj))


def test_conv_errors_name_the_argument():
    X, K = np.zeros((2, 3, 5, 5)), np.zeros((4, 2, 3, 3))
    with pytest.raises(
        ValueError, match=r"K must have X's 3 input channels.*\(4, 2, 3, 3\)"
    ):
        L.conv2d(X, K)
    with pytest.raises(ValueError, match=r"X must be 4-D, got shape \(5, 5\)"):
        L.conv2d(np.zeros((5, 5)), K)
    with pytest.raises(
        ValueError,
        match=r"cotangent G must have the output's shape \(2, 4, 3, 3\), got \(2, 4, 5, 5\)",
    ):
        L.conv2d_vjp(X, np.zeros((4, 3, 3, 3)), np.zeros((2, 4, 5, 5)))
    with pytest.raises(ValueError, match="stride must be a positive integer, got 0"):
        L.conv2d(X, np.zeros((4, 3, 3, 3)), stride=0)
    with pytest.raises(
        ValueError, match=r"a 7 x 7 kernel does not fit images of shape \(2, 3, 5, 5\)"
    ):
        L.conv2d(X, np.zeros((4, 3, 7, 7)))
    with pytest.raises(ValueError, match="X must be finite, got nan"):
        L.conv2d(np.full((1, 3, 5, 5), np.nan), np.zeros((4, 3, 3, 3)))
    with pytest.raises(ValueError, match="kh must be a positive integer, got 2.5"):
        L.im2col(X, 2.5, 3)
    with pytest.raises(ValueError, match="kw must be a positive integer, got None"):
        L.im2col(X, 3, None)
    with pytest.raises(
        ValueError, match="padding must be a non-negative integer, got -1"
    ):
        L.col2im(np.zeros((18, 27)), X.shape, 3, 3, stride=1, padding=-1)
    assert (
        L.im2col(X, 3.0, 3).shape == L.im2col(X, 3, 3).shape
    )  # integral floats are integers


# ----- ReLU and pooling -----


def test_relu_rejects_nan_and_keeps_infinities():
    """The forward map keeps infinities; its rules refuse a non-finite x."""
    with pytest.raises(ValueError, match="x must not contain NaN"):
        L.relu(np.nan)
    with pytest.raises(ValueError, match="x must be finite, got nan"):
        L.relu_vjp(np.array([1.0, np.nan]), np.ones(2))
    with pytest.raises(ValueError, match="x must be finite, got inf"):
        L.relu_jvp(np.array([1.0, np.inf]), np.ones(2))
    np.testing.assert_array_equal(L.relu(np.array([np.inf, -np.inf])), [np.inf, 0.0])


def test_relu_derivative_at_zero_is_zero_as_in_jax():
    x = np.array([-1.0, 0.0, 0.0, 2.0])
    G = np.array([1.0, 1.0, -3.0, 1.0])
    expected = np.asarray(jax.vjp(jax.nn.relu, jnp.asarray(x))[1](jnp.asarray(G))[0])
    np.testing.assert_array_equal(L.relu_vjp(x, G), expected)
    np.testing.assert_array_equal(
        L.relu_jvp(x, G), np.asarray(jax.jvp(jax.nn.relu, (x,), (G,))[1])
    )
    np.testing.assert_array_equal(L.relu_vjp(x, G), [0.0, 0.0, 0.0, 1.0])


# (size, stride, padding): tiling, overlapping, gaps, padded
POOL = [(2, 2, 0), (3, 1, 0), (3, 2, 0), (2, 3, 0), (3, 1, 1), (2, 2, 1), (3, 2, 1)]


@settings(max_examples=30)
@given(st.sampled_from(POOL), st.booleans(), seeds)
def test_max_pool_with_ties_matches_jax(pool, ties, seed):
    """With ties (small integers), the first maximum in row-major window order gets it all."""
    size, stride, padding = pool
    geometry = {"size": size, "stride": stride, "padding": padding}
    rng = np.random.default_rng(seed)
    shape = (2, 3, 7, 6)
    X = rng.integers(0, 3, shape).astype(float) if ties else rng.standard_normal(shape)
    Y = L.max_pool(X, **geometry)
    G, dX = draw(rng, Y.shape, X.shape)
    Yj, Xbar, dY = jax_pool("max", size, stride, padding)(X, G, dX)
    np.testing.assert_array_equal(Y, np.asarray(Yj))
    close(L.max_pool_vjp(X, G, **geometry), np.asarray(Xbar))
    if not ties or padding == 0:
        # on ties in padded windows, JAX's JVP of reduce_window max (select and gather)
        # need not pick the first maximum that its VJP picks; the dot-product test
        # below ties derivlib's JVP to its VJP, which matches jax.vjp
        close(L.max_pool_jvp(X, dX, **geometry), np.asarray(dY))
    assert (
        dot_product_gap(
            lambda X, dX: L.max_pool_jvp(X, dX, **geometry),
            lambda X, G: L.max_pool_vjp(X, G, **geometry),
            (X,),
            (dX,),
            G,
        )
        < 1e-12
    )
    S = L.max_pool_matrix(X[0], **geometry)
    np.testing.assert_array_equal(S @ X[0].ravel(), Y[0].ravel())
    assert np.all(S.sum(axis=1) == 1)
    # the selection against an independent oracle: S^T vec G is JAX's gradient
    close((S.T @ G[0].ravel()).reshape(X[0].shape), np.asarray(Xbar)[0])


def test_max_pool_tie_goes_to_the_first_entry():
    X = np.ones((1, 1, 2, 2))
    np.testing.assert_array_equal(
        L.max_pool_vjp(X, np.ones((1, 1, 1, 1)))[0, 0], [[1, 0], [0, 0]]
    )


@settings(max_examples=20)
@given(st.sampled_from(POOL), seeds)
def test_avg_pool_matches_jax(pool, seed):
    size, stride, padding = pool
    geometry = {"size": size, "stride": stride, "padding": padding}
    rng = np.random.default_rng(seed)
    (X,) = draw(rng, (2, 3, 7, 6))
    Y = L.avg_pool(X, **geometry)
    G, dX = draw(rng, Y.shape, X.shape)
    Yj, Xbar, _ = jax_pool("avg", size, stride, padding)(X, G, dX)
    close(Y, np.asarray(Yj))
    close(L.avg_pool_vjp(X, G, **geometry), np.asarray(Xbar))
    assert (
        dot_product_gap(
            lambda X, dX: L.avg_pool_jvp(X, dX, **geometry),
            lambda X, G: L.avg_pool_vjp(X, G, **geometry),
            (X,),
            (dX,),
            G,
        )
        < 1e-12
    )


def test_avg_pool_of_entries_near_the_largest_float_does_not_overflow():
    big = np.finfo(float).max
    X = np.full((1, 1, 3, 3), big)
    same = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-15, atol=0)  # noqa: E731
    same(L.avg_pool(X, size=3), np.full((1, 1, 1, 1), big))  # not inf
    Y = L.avg_pool(X, size=3, padding=1)  # zeros of the padding count in the mean
    same(Y[0, 0, 0, 0], big / 9 * 4)
    same(L.avg_pool_jvp(X, X, size=2, stride=1), np.full((1, 1, 2, 2), big))
    same(L.avg_pool(np.full((1, 1, 2, 2), 5e-324)), np.full((1, 1, 1, 1), 5e-324))


def test_pool_errors_name_the_argument():
    with pytest.raises(ValueError, match="size must be a positive integer, got 0"):
        L.max_pool(np.zeros((1, 1, 4, 4)), size=0)
    with pytest.raises(
        ValueError,
        match=r"cotangent G must have the output's shape \(1, 1, 2, 2\), got \(1, 1, 4, 4\)",
    ):
        L.max_pool_vjp(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 4)))
    with pytest.raises(ValueError, match=r"dX must have the primal's shape"):
        L.avg_pool_jvp(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4)))
    with pytest.raises(ValueError, match="size must be a positive integer, got 2.5"):
        L.max_pool(np.zeros((1, 1, 4, 4)), size=2.5)
    with pytest.raises(ValueError, match="stride must be a positive integer, got 1.5"):
        L.avg_pool(np.zeros((1, 1, 4, 4)), size=2, stride=1.5)
    X = np.arange(16.0).reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(
        L.max_pool(X, size=2.0), L.max_pool(X, size=2)
    )  # integral floats are integers
    np.testing.assert_array_equal(
        L.max_pool_matrix(X[0], size=2.0), L.max_pool_matrix(X[0], size=2)
    )


# ----- Batch and layer normalisation -----

NORM_SHAPES = [(1, 5), (4, 1), (6, 9)]


@pytest.mark.parametrize("name, axis", [("batch_norm", 1), ("layer_norm", 0)])
@settings(max_examples=30)
@given(
    shape=st.sampled_from(NORM_SHAPES),
    eps=st.sampled_from([1e-5, 0.1, 1.0]),
    seed=seeds,
)
def test_norm_vjp_and_dot_product(name, axis, shape, eps, seed):
    fwd, jvp, vjp = (getattr(L, name + suffix) for suffix in ("", "_jvp", "_vjp"))
    if name == "batch_norm" and shape[1] == 1:
        shape = (shape[0], 2)  # a batch of one is refused in training mode
    rng = np.random.default_rng(seed)
    X, gamma, beta, G = draw(rng, shape, shape[:1], shape[:1], shape)
    Yj, theirs = jax_norm_vjp(axis)(X, gamma, beta, G, eps)
    close(fwd(X, gamma, beta, eps=eps), np.asarray(Yj))
    ours = vjp(X, gamma, beta, G, eps=eps)
    scale = np.linalg.norm(theirs[1]) + np.linalg.norm(theirs[2])
    for a, b in zip(
        ours, theirs
    ):  # Xbar is exactly 0 when a row (column) has one entry
        assert np.linalg.norm(a - np.asarray(b)) < TOL * (np.linalg.norm(b) + scale)
    tangents = draw(rng, shape, shape[:1], shape[:1])
    gap = dot_product_gap(
        lambda *a: jvp(*a, eps=eps),
        lambda *a: vjp(*a, eps=eps),
        (X, gamma, beta),
        tangents,
        G,
    )
    assert gap < 1e-12


def test_batch_norm_wrong_form_fails(rng):
    """Treating the mean and variance as constants gives diag(gamma / s) G: wrong."""
    X, gamma, beta, G = draw(rng, (3, 6), (3,), (3,), (3, 6))
    s = np.sqrt(X.var(axis=1, keepdims=True) + 1e-5)
    Xbar_jax = np.asarray(jax_norm_vjp(1)(X, gamma, beta, G, 1e-5)[1][0])
    assert relative_error(gamma[:, None] * G / s, Xbar_jax) > 0.1
    close(L.batch_norm_vjp(X, gamma, beta, G)[0], Xbar_jax)


def test_norm_extremes_and_errors():
    X = np.ones((2, 4))
    Y = L.batch_norm(
        X, np.ones(2), np.array([3.0, -1.0])
    )  # constant rows: y = beta, finite
    np.testing.assert_array_equal(Y, [[3.0] * 4, [-1.0] * 4])
    assert np.all(
        np.isfinite(L.batch_norm_vjp(X, np.ones(2), np.zeros(2), np.ones((2, 4)))[0])
    )
    with pytest.raises(ValueError, match="constant row and eps = 0"):
        L.batch_norm(X, np.ones(2), np.zeros(2), eps=0.0)
    with pytest.raises(
        ValueError,
        match=r"gamma must have shape \(2,\) \(one per row of X \(2, 4\)\), got \(4,\)",
    ):
        L.layer_norm(X, np.ones(4), np.zeros(2))
    with pytest.raises(ValueError, match="eps must be a finite, non-negative number"):
        L.batch_norm(X, np.ones(2), np.zeros(2), eps=-1)
    for eps in ("1e-5", None, np.nan):
        with pytest.raises(ValueError, match=r"eps must be a finite, non-negative"):
            L.batch_norm_eval(
                X, np.ones(2), np.zeros(2), mean=[0, 0], var=[1, 1], eps=eps
            )


@pytest.mark.parametrize("n", [3, 7])
@pytest.mark.parametrize("value", [0.1, 0.7, 1 / 3, 2.0, -0.3])
def test_constant_row_with_eps_zero_raises_even_when_the_mean_is_inexact(n, value):
    """Constancy is tested directly: X - mean(X) is rounding noise, not 0, for a row of
    0.1s, and normalising that noise would give -1s and gradients near 1e17."""
    X = np.stack([np.full(n, value), np.arange(n, dtype=float)])
    for f in (L.batch_norm, L.batch_norm_vjp):
        args = (X, np.ones(2), np.zeros(2)) + (
            (np.ones((2, n)),) if f is L.batch_norm_vjp else ()
        )
        with pytest.raises(ValueError, match="constant row and eps = 0"):
            f(*args, eps=0.0)
    with pytest.raises(ValueError, match="constant column and eps = 0"):
        L.layer_norm(X.T.copy(), np.ones(n), np.zeros(n), eps=0.0)
    Y = L.batch_norm(
        X, np.ones(2), np.zeros(2), eps=1e-5
    )  # eps > 0: the row maps to exactly 0
    assert np.all(Y[0] == 0)
    assert (
        np.abs(L.batch_norm_vjp(X, np.ones(2), np.zeros(2), np.ones((2, n)))[0]).max()
        < 10
    )


@pytest.mark.parametrize("name, axis", [("batch_norm", 1), ("layer_norm", 0)])
@pytest.mark.parametrize(
    "row", [[1e308, 1e308, -1e308], [1e200, -1e200, 0.0], [1e-200, -1e-200, 0.0]]
)
def test_norm_of_huge_and_tiny_values_matches_the_scaled_row(name, axis, row):
    """Normalisation is scale-invariant at eps = 0: x and x / max|x| give the same Xhat,
    and Xbar scales by 1 / max|x|. No overflow to NaN or silent zeros."""
    x = np.array(row)
    X = x[None] if axis == 1 else x[:, None]
    g, b = np.ones(X.shape[0]), np.zeros(X.shape[0])
    G = np.arange(1.0, 4.0).reshape(X.shape)
    fwd, vjp = getattr(L, name), getattr(L, name + "_vjp")
    m = np.abs(x).max()
    close(fwd(X, g, b, eps=0.0), fwd(X / m, g, b, eps=0.0))
    close(vjp(X, g, b, G, eps=0.0)[0] * m, vjp(X / m, g, b, G, eps=0.0)[0], tol=1e-9)
    assert np.all(np.isfinite(fwd(X, g, b)))


def test_norm_gradient_that_overflows_raises():
    X = np.array([[1e-310, -1e-310, 0.0]])  # a subnormal standard deviation
    with pytest.raises(
        ValueError, match="Xbar overflows: X has a standard deviation of"
    ):
        L.batch_norm_vjp(
            X, np.ones(1), np.zeros(1), np.array([[1.0, 2.0, 4.0]]), eps=0.0
        )
    assert np.all(
        np.isfinite(L.batch_norm_vjp(X, np.ones(1), np.zeros(1), np.ones((1, 3)))[0])
    )


# ----- Attention -----

ATT = [(5, 4, 3, 2), (1, 3, 2, 4), (6, 2, 1, 3)]  # (n, m, d, e)


@settings(max_examples=30)
@given(
    st.sampled_from(ATT),
    st.sampled_from(["none", "random", "causal", "dead rows"]),
    seeds,
)
def test_attention_vjp_and_masks(shape, kind, seed):
    n, m, d, e = shape
    rng = np.random.default_rng(seed)
    Q, K, V, G = draw(rng, (n, d), (m, d), (m, e), (n, e))
    mask = {
        "none": np.ones((n, m), bool),
        "random": rng.random((n, m)) < 0.6,
        "causal": np.tri(n, m, dtype=bool),
        "dead rows": rng.random((n, m)) < 0.5,
    }[kind]
    if kind == "dead rows":
        mask[rng.integers(n)] = False  # at least one fully masked row
    arg = None if kind == "none" else mask
    O = L.attention(Q, K, V, mask=arg)
    Oj, theirs = jax_attention_vjp(Q, K, V, mask, G)
    close(O, np.asarray(Oj))
    ours = L.attention_vjp(Q, K, V, G, mask=arg)
    for a, b in zip(ours, theirs):
        assert np.all(np.isfinite(a))
        assert np.linalg.norm(a - np.asarray(b)) < TOL * (np.linalg.norm(b) + 1)
    dead = ~mask.any(axis=1)
    assert np.all(O[dead] == 0) and np.all(ours[0][dead] == 0)
    tangents = draw(rng, Q.shape, K.shape, V.shape)
    gap = dot_product_gap(
        lambda *a: L.attention_jvp(*a, mask=arg),
        lambda *a: L.attention_vjp(*a, mask=arg),
        (Q, K, V),
        tangents,
        G,
    )
    assert gap < 1e-12


def test_attention_extremes_and_errors(rng):
    Q, K, V = draw(rng, (3, 2), (4, 2), (4, 2))
    O = L.attention(1e6 * Q, K, V)  # saturated softmax: finite, a selection
    assert np.all(np.isfinite(O))
    assert np.all(L.attention(Q, K, V, mask=np.zeros((3, 4), bool)) == 0)
    with pytest.raises(
        ValueError,
        match=r"mask must be a boolean array of shape \(3, 4\), got int64 \(3, 4\)",
    ):
        L.attention(Q, K, V, mask=np.ones((3, 4), int))
    with pytest.raises(
        ValueError, match=r"K with Q's 2 columns, got Q \(3, 2\) and K \(4, 3\)"
    ):
        L.attention(Q, np.zeros((4, 3)), V)
    with pytest.raises(
        ValueError, match=r"V with K's 4 rows, got K \(4, 2\) and V \(3, 2\)"
    ):
        L.attention(Q, K, np.zeros((3, 2)))
    with pytest.raises(
        ValueError, match=r"the scores S = Q K\^T / sqrt\(d\) must be finite, got -?inf"
    ):
        L.attention(1e200 * Q, 1e200 * K, V)
    # one key: every query attends to it with probability 1 (the softmax runs along rows)
    np.testing.assert_array_equal(L.attention_probs(Q, K[:1]), np.ones((3, 1)))
    close(L.attention(Q, K[:1], V[:1]), np.repeat(V[:1], 3, axis=0))


# ----- The convolutional network -----


def jax_cnn(params, X, labels, eps):
    """An independent JAX model; eps adds a zero perturbation to every layer's output, so
    that the gradient with respect to eps is that layer's cotangent."""
    K, b, W, c = params
    A = (
        lax.conv_general_dilated(X, K, (1, 1), [(1, 1), (1, 1)])
        + b[None, :, None, None]
        + eps["A"]
    )
    R = jax.nn.relu(A) + eps["R"]
    M = (
        lax.reduce_window(R, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
        + eps["M"]
    )
    h = M.reshape(M.shape[0], -1).T + eps["h"]
    Z = W @ h + c[:, None] + eps["Z"]
    return -jnp.mean(
        jnp.take_along_axis(jax.nn.log_softmax(Z, axis=0), labels[None], axis=0)
    )


def test_cnn_gradient_matches_jax_at_every_layer(rng):
    params = L.cnn_init(rng, filters=4)
    X = rng.random((6, 1, 8, 8))
    labels = rng.integers(0, 10, 6)
    loss, grads, cot = L.cnn_grad(params, X, labels)
    act = L.cnn_forward(params, X)
    eps = {k: jnp.zeros(act[k].shape) for k in cot}
    value, (gp, ge) = jax.jit(jax.value_and_grad(jax_cnn, argnums=(0, 3)))(
        params, X, labels, eps
    )
    assert abs(loss - float(value)) < 1e-12
    for a, b in zip(grads, gp):
        close(a, np.asarray(b))
    for k in cot:
        close(cot[k], np.asarray(ge[k]))
    assert L.cnn_loss(params, X, labels) == loss
    with pytest.raises(
        ValueError,
        match=r"labels as class indices must lie in \[0, 10\), got 1[0-4]",
    ):
        L.cnn_grad(params, X, labels + 5)


# ----- Two derivations: a mistake in a VJP's helper fails the dot-product test -----


def _pool_point(rng):
    X = rng.standard_normal((1, 2, 6, 6))
    return (X,), (rng.standard_normal(X.shape),), rng.standard_normal((1, 2, 3, 3))


def _norm_point(rng):
    X, g, b = draw(rng, (3, 5), (3,), (3,))
    return (X, g, b), draw(rng, (3, 5), (3,), (3,)), rng.standard_normal((3, 5))


def _attention_point(rng):
    Q, K, V = draw(rng, (4, 3), (5, 3), (5, 2))
    return (Q, K, V), draw(rng, (4, 3), (5, 3), (5, 2)), rng.standard_normal((4, 2))


# family: (the helper that JVP and VJP used to share, a symmetric mistake in it, the
# JVP, the VJP, a point). With one shared helper, the mistake would sit in both rules
# and they would stay transposes of each other; now only the VJP reads the helper.
PLANTS = {
    "relu": (
        "_relu_mask",
        lambda x: x > -0.5,  # a shifted kink
        L.relu_jvp,
        L.relu_vjp,
        lambda rng: (
            (rng.standard_normal(7),),
            (rng.standard_normal(7),),
            draw(rng, 7)[0],
        ),
    ),
    "max_pool": (
        "max_pool_argmax",
        lambda X, size, stride: (
            L._windows(X, size, stride).reshape(1, 2, 3, 3, 4).argmin(axis=-1)
        ),  # routes every window through its smallest entry
        L.max_pool_jvp,
        L.max_pool_vjp,
        _pool_point,
    ),
    "avg_pool": (
        "_add_windows",
        lambda shape, value, size, stride, padding: np.zeros(shape),  # spreads nothing
        L.avg_pool_jvp,
        L.avg_pool_vjp,
        _pool_point,
    ),
    "batch_norm": (
        "_finite_over_s",
        lambda A, s, name: A / (2 * s),  # the standard deviation doubled
        L.batch_norm_jvp,
        L.batch_norm_vjp,
        _norm_point,
    ),
    "layer_norm": (
        "_finite_over_s",
        lambda A, s, name: A / (2 * s),
        L.layer_norm_jvp,
        L.layer_norm_vjp,
        lambda rng: _norm_point(rng),
    ),
    "attention": (
        "_softmax_rows_vjp",
        lambda P, Pbar: P * Pbar,  # the softmax's projection dropped
        L.attention_jvp,
        L.attention_vjp,
        _attention_point,
    ),
}


@pytest.mark.parametrize("family", sorted(PLANTS))
def test_a_mistake_in_the_vjp_helper_fails_the_dot_product_test(family, monkeypatch):
    helper, wrong, jvp, vjp, point = PLANTS[family]
    rng = np.random.default_rng(3)
    primals, tangents, W = point(rng)
    if family == "max_pool":
        wrong_argmax = wrong
        wrong = lambda X, *, size=2, stride=None, padding=0: wrong_argmax(  # noqa: E731
            X, size, size
        )
    assert dot_product_gap(jvp, vjp, primals, tangents, W) < 1e-12
    monkeypatch.setattr(L, helper, wrong)
    assert dot_product_gap(jvp, vjp, primals, tangents, W) > 1e-3


# ----- Every rule refuses a non-finite argument and names it -----

NAN_RULES = {
    "conv2d_jvp": (
        L.conv2d_jvp,
        [(1, 2, 5, 5), (3, 2, 3, 3), (1, 2, 5, 5), (3, 2, 3, 3)],
        ["X", "K", "dX", "dK"],
    ),
    "conv2d_vjp": (
        L.conv2d_vjp,
        [(1, 2, 5, 5), (3, 2, 3, 3), (1, 3, 3, 3)],
        ["X", "K", "G"],
    ),
    "conv2d_bias_jvp": (
        L.conv2d_bias_jvp,
        [(1, 2, 5, 5), (3, 2, 3, 3), (3,), (1, 2, 5, 5), (3, 2, 3, 3), (3,)],
        ["X", "K", "b", "dX", "dK", "db"],
    ),
    "conv2d_bias_vjp": (
        L.conv2d_bias_vjp,
        [(1, 2, 5, 5), (3, 2, 3, 3), (3,), (1, 3, 3, 3)],
        ["X", "K", "b", "G"],
    ),
    "col2im": (
        lambda cols: L.col2im(cols, (1, 2, 5, 5), 3, 3),
        [(9, 18)],
        ["cols"],
    ),
    "relu_jvp": (L.relu_jvp, [(3, 4), (3, 4)], ["x", "dx"]),
    "relu_vjp": (L.relu_vjp, [(3, 4), (3, 4)], ["x", "G"]),
    "max_pool_jvp": (L.max_pool_jvp, [(1, 2, 4, 4)] * 2, ["X", "dX"]),
    "max_pool_vjp": (L.max_pool_vjp, [(1, 2, 4, 4), (1, 2, 2, 2)], ["X", "G"]),
    "avg_pool_jvp": (L.avg_pool_jvp, [(1, 2, 4, 4)] * 2, ["X", "dX"]),
    "avg_pool_vjp": (L.avg_pool_vjp, [(1, 2, 4, 4), (1, 2, 2, 2)], ["X", "G"]),
    "batch_norm_jvp": (
        L.batch_norm_jvp,
        [(3, 5), (3,), (3,), (3, 5), (3,), (3,)],
        ["X", "gamma", "beta", "dX", "dgamma", "dbeta"],
    ),
    "batch_norm_vjp": (
        L.batch_norm_vjp,
        [(3, 5), (3,), (3,), (3, 5)],
        ["X", "gamma", "beta", "G"],
    ),
    "layer_norm_jvp": (
        L.layer_norm_jvp,
        [(3, 5), (3,), (3,), (3, 5), (3,), (3,)],
        ["X", "gamma", "beta", "dX", "dgamma", "dbeta"],
    ),
    "layer_norm_vjp": (
        L.layer_norm_vjp,
        [(3, 5), (3,), (3,), (3, 5)],
        ["X", "gamma", "beta", "G"],
    ),
    "batch_norm2d_jvp": (
        L.batch_norm2d_jvp,
        [(2, 3, 2, 2), (3,), (3,), (2, 3, 2, 2), (3,), (3,)],
        ["X", "gamma", "beta", "dX", "dgamma", "dbeta"],
    ),
    "batch_norm2d_vjp": (
        L.batch_norm2d_vjp,
        [(2, 3, 2, 2), (3,), (3,), (2, 3, 2, 2)],
        ["X", "gamma", "beta", "G"],
    ),
    "batch_norm_eval_jvp": (
        lambda X, g, b, dX, dg, db, m, v: L.batch_norm_eval_jvp(
            X, g, b, dX, dg, db, mean=m, var=np.abs(v)
        ),
        [(2, 3, 2, 2), (3,), (3,), (2, 3, 2, 2), (3,), (3,), (3,), (3,)],
        ["X", "gamma", "beta", "dX", "dgamma", "dbeta", "mean", "var"],
    ),
    "batch_norm_eval_vjp": (
        lambda X, g, b, G, m, v: L.batch_norm_eval_vjp(
            X, g, b, G, mean=m, var=np.abs(v)
        ),
        [(3, 4), (3,), (3,), (3, 4), (3,), (3,)],
        ["X", "gamma", "beta", "G", "mean", "var"],
    ),
    "attention_jvp": (
        L.attention_jvp,
        [(4, 3), (5, 3), (5, 2), (4, 3), (5, 3), (5, 2)],
        ["Q", "K", "V", "dQ", "dK", "dV"],
    ),
    "attention_vjp": (
        L.attention_vjp,
        [(4, 3), (5, 3), (5, 2), (4, 2)],
        ["Q", "K", "V", "G"],
    ),
}


@pytest.mark.parametrize(
    "rule, which",
    [(rule, i) for rule, (_, _, names) in NAN_RULES.items() for i in range(len(names))],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_every_rule_names_the_non_finite_argument(rule, which, bad):
    f, shapes, names = NAN_RULES[rule]
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s) for s in shapes]
    args[which].flat[-1] = bad
    with pytest.raises(ValueError, match=rf"^{names[which]} must be finite, got"):
        f(*args)


def test_batch_norm_refuses_a_batch_of_one():
    X, g, b = np.ones((3, 1)), np.ones(3), np.zeros(3)
    for call in (
        lambda: L.batch_norm(X, g, b),
        lambda: L.batch_norm_jvp(X, g, b, X, g, b),
        lambda: L.batch_norm_vjp(X, g, b, X),
    ):
        with pytest.raises(ValueError, match=r"at least 2 observations.*\(3, 1\)"):
            call()


# ----- Batch norm over images, and in evaluation mode -----


def jax_bn2d(X, g, b, eps):
    mu = X.mean(axis=(0, 2, 3), keepdims=True)
    var = ((X - mu) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    shape = (1, -1, 1, 1)
    return g.reshape(shape) * (X - mu) / jnp.sqrt(var + eps) + b.reshape(shape)


def jax_bn_eval(X, g, b, mean, var, eps):
    shape = (-1, 1) if X.ndim == 2 else (1, -1, 1, 1)
    s = jnp.sqrt(var + eps).reshape(shape)
    return g.reshape(shape) * (X - mean.reshape(shape)) / s + b.reshape(shape)


@functools.lru_cache(maxsize=None)
def jax_bn_oracle(kind):
    """(Y, (Xbar, gammabar, betabar)), jitted once per kind and shape."""

    def both(X, g, b, G, mean, var, eps):
        if kind == "2d":
            f = lambda X, g, b: jax_bn2d(X, g, b, eps)  # noqa: E731
        else:
            f = lambda X, g, b: jax_bn_eval(X, g, b, mean, var, eps)  # noqa: E731
        Y, pullback = jax.vjp(f, X, g, b)
        return Y, pullback(G)

    return jax.jit(both)


BN_SHAPES = [(2, 3, 4, 5), (1, 2, 3, 3), (3, 1, 1, 2)]


@settings(max_examples=15)
@given(st.sampled_from(BN_SHAPES), st.sampled_from(["2d", "eval", "eval2d"]), seeds)
def test_batch_norm_2d_and_eval_against_jax_and_by_dot_product(shape, kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "eval":
        shape = (shape[1] + 1, shape[0] * shape[2])  # features as rows, (d, n)
    c = shape[0] if len(shape) == 2 else shape[1]
    X, g, b, mean = draw(rng, shape, (c,), (c,), (c,))
    var = rng.random(c)
    eps = 1e-3
    opts = {"eps": eps} if kind == "2d" else {"eps": eps, "mean": mean, "var": var}
    name = "batch_norm2d" if kind == "2d" else "batch_norm_eval"
    fwd, jvp, vjp = (getattr(L, name + suffix) for suffix in ("", "_jvp", "_vjp"))
    (G,) = draw(rng, shape)
    Yj, theirs = jax_bn_oracle("2d" if kind == "2d" else "eval")(
        X, g, b, G, mean, var, eps
    )
    close(fwd(X, g, b, **opts), np.asarray(Yj))
    for ours, their in zip(vjp(X, g, b, G, **opts), theirs):
        close(ours, np.asarray(their))
    for _ in range(3):  # several points
        primals = (rng.standard_normal(shape),) + draw(rng, (c,), (c,))
        gap = dot_product_gap(
            lambda *a: jvp(*a, **opts),
            lambda *a: vjp(*a, **opts),
            primals,
            draw(rng, shape, (c,), (c,)),
            rng.standard_normal(shape),
        )
        assert gap < 1e-12


def test_batch_norm_eval_is_training_mode_frozen_at_the_batch_statistics(rng):
    """At the batch's own (biased) statistics the two modes give the same Y, and the
    evaluation rule is diag(gamma / s) G, the training rule without its two
    projections: they differ."""
    X, g, b, G = draw(rng, (3, 6), (3,), (3,), (3, 6))
    mean, var = X.mean(axis=1), X.var(axis=1)
    close(L.batch_norm_eval(X, g, b, mean=mean, var=var), L.batch_norm(X, g, b))
    Xbar_eval = L.batch_norm_eval_vjp(X, g, b, G, mean=mean, var=var)[0]
    assert relative_error(Xbar_eval, L.batch_norm_vjp(X, g, b, G)[0]) > 0.1


def test_batch_norm_eval_refuses_an_overflow_rather_than_return_inf_or_nan():
    tiny = {"mean": [0.0], "var": [1e-300], "eps": 0.0}  # sqrt(var + eps) = 1e-150
    X, G = np.array([[1e200, 1.0]]), np.array([[0.0, 1.0]])
    with pytest.raises(ValueError, match="Y overflows float64"):
        L.batch_norm_eval(X, [1.0], [0.0], **tiny)
    with pytest.raises(ValueError, match="Xbar overflows float64"):
        L.batch_norm_eval_vjp(np.ones((1, 2)), [1e300], [0.0], G, **tiny)
    with pytest.raises(ValueError, match="dY overflows float64"):
        L.batch_norm_eval_jvp(np.ones((1, 2)), [1e300], [0.0], G, [0.0], [0.0], **tiny)
    Y = L.batch_norm_eval(np.ones((1, 2)), [1.0], [0.0], **tiny)  # small but finite
    close(Y, np.full((1, 2), 1e150))


def test_conv_and_attention_refuse_a_result_that_overflows():
    big = np.full((1, 1, 3, 3), 1e200)  # products of 1e400: inf, and inf - inf = NaN
    with pytest.raises(ValueError, match=r"^conv2d overflows float64.*1e\+200"):
        L.conv2d(big, -big)
    with pytest.raises(ValueError, match="^conv2d_vjp overflows float64"):
        L.conv2d_vjp([[[[1.0, 2.0]]]], [[[[1e200]]]], [[[[1e200, 1.0]]]])  # Xbar
    Q, K, V = draw(np.random.default_rng(0), (3, 2), (4, 2), (4, 2))
    with pytest.raises(ValueError, match="^attention_vjp overflows float64"):
        L.attention_vjp(Q, 10 * K, V, np.full((3, 2), 1e308))
    with pytest.raises(ValueError, match="^attention_jvp overflows float64"):
        L.attention_jvp(Q, 10 * K, V, 1e308 * Q, 0 * K, 0 * V)


def test_batch_norm_running_stats(rng):
    X = rng.standard_normal((2, 3, 4, 5))
    m0, v0 = np.zeros(3), np.ones(3)
    m1, v1 = L.batch_norm_running_stats(X, m0, v0, momentum=0.25)
    rows = X.transpose(1, 0, 2, 3).reshape(3, -1)
    close(m1, 0.25 * rows.mean(axis=1))
    close(v1, 0.75 + 0.25 * rows.var(axis=1, ddof=1))
    with pytest.raises(ValueError, match="at least 2 values per feature"):
        L.batch_norm_running_stats(np.ones((3, 1)), m0, v0)
    for momentum in (2, -0.1, np.nan, "0.1", True):
        with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\]"):
            L.batch_norm_running_stats(X, m0, v0, momentum=momentum)
    with pytest.raises(ValueError, match="var must be non-negative"):
        L.batch_norm_running_stats(X, m0, -v0)
    with pytest.raises(ValueError, match="the variance of X overflows float64"):
        L.batch_norm_running_stats(X * 1e300, m0, v0)


def test_batch_norm2d_refuses_one_value_per_channel_and_names_arguments():
    g, b = np.ones(3), np.zeros(3)
    with pytest.raises(
        ValueError, match=r"at least 2 values per channel.*\(1, 3, 1, 1\)"
    ):
        L.batch_norm2d(np.ones((1, 3, 1, 1)), g, b)
    L.batch_norm2d(np.arange(12.0).reshape(1, 3, 2, 2), g, b)  # one image: 4 pixels
    with pytest.raises(ValueError, match=r"var must be non-negative"):
        L.batch_norm_eval(np.ones((3, 2)), g, b, mean=g, var=-g)
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
        L.batch_norm_eval(np.ones((3, 2)), g, b, mean=np.ones(2), var=g)


def test_pool_padding_is_at_most_half_the_window():
    X = np.zeros((1, 1, 4, 4))
    with pytest.raises(
        ValueError, match=r"padding must be at most size // 2 = 1.*got 2"
    ):
        L.max_pool(X, size=3, padding=2)
    with pytest.raises(ValueError, match="padding must be a non-negative integer"):
        L.avg_pool_vjp(X, np.zeros((1, 1, 2, 2)), padding=-1)


# ----- Convolution with dilation, groups, per-axis padding and a bias -----

# (N, C, H, W, O, kh, kw, stride, padding, dilation, groups)
CONV_MORE = [
    (2, 4, 7, 8, 6, 3, 3, 1, 1, 2, 2),  # dilation 2, two groups
    (1, 3, 6, 7, 3, 3, 2, 1, ((1, 0), (2, 1)), 1, 3),  # depthwise, asymmetric padding
    (2, 2, 8, 6, 4, 2, 3, 2, (0, 1), 2, 1),  # stride 2, dilation 2, (p_h, p_w)
    (1, 2, 5, 5, 2, 3, 3, 1, (1, 2), 1, 1),  # stride 1, unequal padding: im2col path
]


@functools.lru_cache(maxsize=None)
def jax_conv_more(cfg):
    _, _, _, _, _, _, _, s, p, d, g = cfg
    pairs = L._padding_pairs(p)

    def f(X, K, b):
        Y = lax.conv_general_dilated(
            X, K, (s, s), pairs, rhs_dilation=(d, d), feature_group_count=g
        )
        return Y + b[None, :, None, None]

    def both(X, K, b, G):
        Y, pullback = jax.vjp(f, X, K, b)
        return Y, pullback(G)

    return jax.jit(both)


@pytest.mark.parametrize("cfg", CONV_MORE)
def test_conv2d_bias_dilation_groups_padding_against_jax(cfg):
    N, C, H, W, O, kh, kw, s, p, d, g = cfg
    opts = {"stride": s, "padding": p, "dilation": d, "groups": g}
    rng = np.random.default_rng(17)
    X, K, b = draw(rng, (N, C, H, W), (O, C // g, kh, kw), (O,))
    Y = L.conv2d_bias(X, K, b, **opts)
    (G,) = draw(rng, Y.shape)
    Yj, theirs = jax_conv_more(cfg)(X, K, b, G)
    close(Y, np.asarray(Yj))
    for ours, their in zip(L.conv2d_bias_vjp(X, K, b, G, **opts), theirs):
        close(ours, np.asarray(their))
    close(L.conv2d_vjp(X, K, G, input_grad=False, **opts)[1], np.asarray(theirs[1]))
    for _ in range(3):
        gap = dot_product_gap(
            lambda *a: L.conv2d_bias_jvp(*a, **opts),
            lambda *a: L.conv2d_bias_vjp(*a, **opts),
            draw(rng, X.shape, K.shape, b.shape),
            draw(rng, X.shape, K.shape, b.shape),
            rng.standard_normal(Y.shape),
        )
        assert gap < 1e-12


def test_conv_groups_and_padding_errors():
    X = np.zeros((1, 4, 5, 5))
    with pytest.raises(ValueError, match="groups must divide X's 4 input channels"):
        L.conv2d(X, np.zeros((6, 1, 3, 3)), groups=3)
    with pytest.raises(ValueError, match="K must have X's 2 input channels per group"):
        L.conv2d(X, np.zeros((4, 4, 3, 3)), groups=2)
    with pytest.raises(ValueError, match=r"padding must be p, \(p_h, p_w\)"):
        L.conv2d(X, np.zeros((4, 4, 3, 3)), padding=((1, 2, 3), (0, 0)))
    with pytest.raises(ValueError, match="kernel with dilation 3 does not fit"):
        L.conv2d(X, np.zeros((4, 4, 3, 3)), dilation=3)
    with pytest.raises(ValueError, match=r"b must have shape \(4,\)"):
        L.conv2d_bias(X, np.zeros((4, 4, 3, 3)), np.zeros(3))
