"""Chapter 9: bilinear interpolation, the spatial transformer's sampler, warps and
Lucas-Kanade, against few-line JAX implementations and finite differences."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derivlib import check
from derivlib import images as im


@jax.jit
def bilinear_jax(I, P):
    H, W = I.shape[-2:]
    x, y = P
    x0 = jnp.minimum(jnp.floor(x), W - 2)
    y0 = jnp.minimum(jnp.floor(y), H - 2)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.astype(int), y0.astype(int)

    def at(a, b):
        return I[..., b, a]

    top = (1 - fx) * at(x0, y0) + fx * at(x0 + 1, y0)
    bottom = (1 - fx) * at(x0, y0 + 1) + fx * at(x0 + 1, y0 + 1)
    return (1 - fy) * top + fy * bottom


@jax.jit
def stn_jax(U, theta):
    N, C, H, W = U.shape
    ys, xs = jnp.mgrid[0:H, 0:W]
    X = jnp.stack([xs.ravel(), ys.ravel(), jnp.ones(H * W)])
    P = theta @ X
    x, y = P[:, 0], P[:, 1]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.astype(int), y0.astype(int)

    def at(a, b):
        ok = (a >= 0) & (a < W) & (b >= 0) & (b < H)
        a, b = jnp.clip(a, 0, W - 1), jnp.clip(b, 0, H - 1)
        v = jax.vmap(lambda Uk, ak, bk: Uk[:, bk, ak])(U, a, b)
        return v * ok[:, None]

    w = [(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy]
    V = w[0][:, None] * at(x0, y0) + w[1][:, None] * at(x0 + 1, y0)
    V = V + w[2][:, None] * at(x0, y0 + 1) + w[3][:, None] * at(x0 + 1, y0 + 1)
    return V.reshape(N, C, H, W)


def off_grid(rng, n, H, W):
    P = np.stack([rng.uniform(0, W - 1, n), rng.uniform(0, H - 1, n)])
    return P + 1e-3 * (np.abs(P - np.round(P)) < 1e-3)


@pytest.mark.parametrize("shape", [(5, 6), (3, 5, 6)])
def test_bilinear_against_jax(rng, shape):
    I = rng.standard_normal(shape)
    P = off_grid(rng, 7, *shape[-2:])
    out = (shape[0], 7) if len(shape) == 3 else (7,)
    G = rng.standard_normal(out)
    check.check_close("bilinear", im.bilinear(I, P), np.asarray(bilinear_jax(I, P)))
    check.check_vjp("bilinear_vjp", im.bilinear_vjp, bilinear_jax, (I, P), G)
    tangents = (rng.standard_normal(shape), rng.standard_normal(P.shape))
    check.check_dot_product(
        "bilinear", im.bilinear_jvp, im.bilinear_vjp, [((I, P), tangents, G)]
    )
    jac = jax.jit(jax.jacobian(bilinear_jax, argnums=1))(I, P)
    dP = tangents[1]
    expected = np.einsum("...kij,ij->...k", np.asarray(jac), dP)
    got = im.bilinear_jvp(I, P, np.zeros(shape), dP)
    check.check_close("bilinear_jvp in P", got, expected)


def test_bilinear_hessian_against_jax(rng):
    I = rng.standard_normal((5, 6))
    P = off_grid(rng, 4, 5, 6)
    ours = im.bilinear_hessian(I, P)
    hessian = jax.jit(jax.hessian(lambda p: bilinear_jax(I, p.reshape(2, 1))[0]))
    for k in range(4):
        Hk = hessian(P[:, k])
        check.check_close("bilinear_hessian", ours[k], np.asarray(Hk), "jax.hessian")
        assert ours[k][0, 0] == 0 and ours[k][1, 1] == 0


def test_grid_lines_take_the_larger_side_and_the_last_line_the_smaller(rng):
    I = rng.standard_normal((4, 5))
    h = 1e-6
    for x, side in [(2.0, +1), (4.0, -1), (0.0, +1)]:
        P = np.array([[x], [1.3]])
        fd = (im.bilinear(I, P + [[side * h], [0]]) - im.bilinear(I, P)) / (side * h)
        other = 0 if x in (0.0, 4.0) else 1
        got = im.bilinear_jvp(I, P, np.zeros_like(I), np.array([[1.0], [0.0]]))
        assert abs(got[0] - fd[0]) < 1e-6
        if other:
            fd_left = (im.bilinear(I, P) - im.bilinear(I, P - [[h], [0]])) / h
            assert abs(got[0] - fd_left[0]) > 1e-3  # the two limits differ here


def test_bilinear_refuses_outside_and_bad_input(rng):
    I = rng.standard_normal((4, 5))
    with pytest.raises(ValueError, match="outside the image"):
        im.bilinear(I, np.array([[4.0 + 1e-9], [1.0]]))
    with pytest.raises(ValueError, match="outside the image"):
        im.bilinear(I, np.array([[1.0], [-1e-9]]))
    assert np.isfinite(im.bilinear(I, np.array([[4.0], [3.0]])))[0]
    with pytest.raises(ValueError, match=r"\(H, W\) or \(C, H, W\)"):
        im.bilinear(np.zeros(5), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="dtype"):
        im.bilinear(np.zeros((4, 5), dtype=complex), np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"\(2, n\)"):
        im.bilinear(I, np.zeros((3, 1)))
    with pytest.raises(ValueError, match="non-finite"):
        im.bilinear(I, np.array([[np.nan], [1.0]]))


def test_stn_sampler_against_jax(rng):
    U = rng.standard_normal((2, 3, 6, 7))
    theta = np.array(
        [[[0.9, 0.2, 0.3], [-0.1, 1.1, -0.4]], [[1.2, -0.3, 1.5], [0.2, 0.8, 0.7]]]
    )
    theta = theta + 1e-3 * rng.standard_normal(theta.shape)
    G = rng.standard_normal(U.shape)
    check.check_close(
        "stn_sample", im.stn_sample(U, theta), np.asarray(stn_jax(U, theta))
    )
    check.check_vjp("stn_sample_vjp", im.stn_sample_vjp, stn_jax, (U, theta), G)
    tangents = (rng.standard_normal(U.shape), rng.standard_normal(theta.shape))
    check.check_dot_product(
        "stn_sample", im.stn_sample_jvp, im.stn_sample_vjp, [((U, theta), tangents, G)]
    )
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        im.stn_sample(U[0], theta)


def test_scatter_without_scipy_agrees(rng, monkeypatch):
    """The backward rules scatter through scipy.sparse when it is installed and
    through NumPy's bincount otherwise: the two paths agree, and against JAX."""
    U = rng.standard_normal((2, 3, 6, 7))
    theta = np.array(
        [[[0.9, 0.2, 0.3], [-0.1, 1.1, -0.4]], [[1.2, -0.3, 1.5], [0.2, 0.8, 0.7]]]
    )
    G = rng.standard_normal((2, 3, 4, 5))
    I, P = U[0], off_grid(rng, 9, 6, 7)
    Gb = rng.standard_normal((3, 9))
    with_scipy = (
        im.stn_sample_vjp(U, theta, G, out_shape=(4, 5)),
        im.bilinear_vjp(I, P, Gb),
    )
    monkeypatch.setattr(im, "_sparse", None)
    without = (
        im.stn_sample_vjp(U, theta, G, out_shape=(4, 5)),
        im.bilinear_vjp(I, P, Gb),
    )
    for a, b in zip(with_scipy, without):
        for x, y in zip(a, b):
            check.check_close("scatter, bincount", y, x, oracle="scipy.sparse")
    check.check_vjp(
        "bilinear_vjp (bincount)", im.bilinear_vjp, bilinear_jax, (I, P), Gb
    )


@pytest.mark.parametrize("kind", ["translation", "affine", "homography"])
def test_warp_jacobian_against_jax(rng, kind):
    k = {"translation": 2, "affine": 6, "homography": 8}[kind]
    p = 0.01 * rng.standard_normal(k)
    X = rng.uniform(0, 20, (2, 5))
    cols = jnp.array(im._COLUMNS[kind])

    def warp_jax(p):
        M = jnp.eye(3) + jnp.zeros(9).at[cols].set(p).reshape(3, 3)
        u = M[:, :2] @ X + M[:, 2:]
        return (u[:2] / u[2]).T

    expected = np.asarray(jax.jit(jax.jacobian(warp_jax))(jnp.asarray(p)))
    check.check_close(kind, im.warp_jacobian(kind, p, X), expected)
    np.testing.assert_allclose(im.warp(kind, p, X), np.asarray(warp_jax(p)).T)
    assert np.allclose(im.warp_params(kind, im.warp_matrix(kind, p)), p)


def smooth_image(H, W):
    ys, xs = np.mgrid[0:H, 0:W] / 7.0
    return (
        0.5
        + 0.2 * np.sin(xs + 0.3 * ys) * np.cos(0.7 * ys - 0.2 * xs)
        + 0.1 * (np.sin(2.1 * xs) * np.sin(1.7 * ys))
    )


@pytest.mark.parametrize("method", ["ic", "fa"])
def test_align_recovers_a_homography(rng, method):
    I = smooth_image(80, 80)
    T, M_true, M0 = im.make_pair(I, (24, 24), 32, 3, rng, noise=0.0)
    p0 = im.warp_params("homography", M0)
    res = im.align(T, I, p0, method=method, tol=1e-6, smooth=False)
    assert res.converged
    assert im.corner_error(res.M, M_true, T.shape) < 1e-6


def test_align_refuses_textureless_and_outside(rng):
    I = smooth_image(60, 60)
    p0 = np.array([10.0, 10, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="textureless"):
        im.align(np.full((20, 20), 0.3), I, np.zeros(8) + [0, 0, 10, 0, 0, 10, 0, 0])
    stripes = np.tile(np.sin(np.arange(20.0)), (20, 1))  # varies along x only
    with pytest.raises(ValueError, match="textureless"):
        im.align(stripes, I, p0, kind="affine")
    with pytest.raises(ValueError, match="outside the image"):
        im.align(I[:20, :20], I, np.array([50.0, 50.0]), kind="translation")
    with pytest.raises(ValueError, match="gray images"):
        im.align(np.zeros((3, 20, 20)), I, p0, kind="affine")


@pytest.mark.parametrize("kind", ["translation", "affine"])
def test_align_recovers_translation_and_affine(rng, kind):
    I = smooth_image(80, 80)
    X = np.stack(np.meshgrid(np.arange(32.0), np.arange(32.0))).reshape(2, -1)
    p_true = np.array([22.6, 25.3]) if kind == "translation" else None
    if kind == "affine":
        p_true = np.array([0.04, -0.05, 22.6, 0.03, -0.02, 25.3])
    T = im.bilinear(I, im.warp(kind, p_true, X)).reshape(32, 32)
    p0 = np.round(p_true) if kind == "translation" else np.array([0, 0, 24.0, 0, 0, 24])
    res = im.align(T, I, p0, kind=kind, tol=1e-8, smooth=False, photometric=False)
    assert res.converged
    np.testing.assert_allclose(res.p, p_true, atol=1e-6)


def keys_jax(t, a=-0.5):
    t = jnp.abs(t)
    inner = (a + 2) * t**3 - (a + 3) * t**2 + 1
    outer = a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return jnp.where(t <= 1, inner, jnp.where(t < 2, outer, 0.0))


@jax.jit
def bicubic_jax(I, P):
    H, W = I.shape[-2:]
    x0 = jnp.minimum(jnp.floor(P[0]), W - 3)
    y0 = jnp.minimum(jnp.floor(P[1]), H - 3)
    fx, fy = P[0] - x0, P[1] - y0
    x0, y0 = x0.astype(int), y0.astype(int)
    offsets = jnp.arange(-1, 3)[:, None]
    kx, ky = keys_jax(fx - offsets), keys_jax(fy - offsets)
    patch = I[..., y0 + offsets[:, None], x0 + offsets]
    return jnp.einsum("...jin,jn,in->...n", patch, ky, kx)


def test_bicubic_against_jax_and_c1_on_grid_lines(rng):
    I = rng.standard_normal((2, 7, 8))
    P = np.stack([rng.uniform(1, 6, 5), rng.uniform(1, 5, 5)])
    G = rng.standard_normal((2, 5))
    check.check_close("bicubic", im.bicubic(I, P), np.asarray(bicubic_jax(I, P)))
    check.check_vjp("bicubic_vjp", im.bicubic_vjp, bicubic_jax, (I, P), G)
    tangents = (rng.standard_normal(I.shape), rng.standard_normal(P.shape))
    check.check_dot_product(
        "bicubic", im.bicubic_jvp, im.bicubic_vjp, [((I, P), tangents, G)]
    )
    I0, p, h = I[0], np.array([[3.0], [2.4]]), 1e-6
    right = (im.bicubic(I0, p + [[h], [0]]) - im.bicubic(I0, p))[0] / h
    left = (im.bicubic(I0, p) - im.bicubic(I0, p - [[h], [0]]))[0] / h
    d = im.bicubic_jvp(I0, p, np.zeros_like(I0), np.array([[1.0], [0.0]]))[0]
    assert abs(right - d) < 1e-4 and abs(left - d) < 1e-4
    with pytest.raises(ValueError, match="bicubic domain"):
        im.bicubic(I0, np.array([[0.5], [2.0]]))


def test_align_polish_removes_the_template_noise_from_the_fixed_point():
    # noise-free: both endings are exact; with a noisy template the inverse-
    # compositional fixed point carries the noise of the template's gradient, the
    # forward-compositional finish (the warped image's gradient) does not
    rng = np.random.default_rng(0)
    I = smooth_image(100, 100)
    T, M_true, M0 = im.make_pair(I, (24, 24), 32, 3, rng, noise=0.0)
    p0 = im.warp_params("homography", M0)
    for polish in (True, False):
        res = im.align(T, I, p0, levels=2, tol=1e-6, polish=polish)
        assert res.converged
        assert im.corner_error(res.M, M_true, T.shape) < 1e-6
    errors = {True: [], False: []}
    for _ in range(6):
        T, M_true, M0 = im.make_pair(I, (24, 24), 48, 3, rng, noise=0.05)
        for polish in (True, False):
            res = im.align(T, I, im.warp_params("homography", M0), levels=2,
                           tol=1e-4, polish=polish)  # fmt: skip
            errors[polish].append(im.corner_error(res.M, M_true, T.shape))
    assert np.mean(errors[True]) < 0.8 * np.mean(errors[False])


def test_refusals_of_the_sampler_warps_and_corners(rng):
    U, theta = rng.standard_normal((1, 1, 5, 5)), np.array([[[1.0, 0, 0], [0, 1, 0]]])
    with pytest.raises(ValueError, match="non-finite"):
        im.stn_sample(np.full((1, 1, 5, 5), np.nan), theta)
    with pytest.raises(ValueError, match="non-finite"):
        im.stn_sample(U, theta * np.nan)
    with pytest.raises(ValueError, match="dtype"):
        im.stn_sample(U > 0, theta)
    with pytest.raises(ValueError, match="out_shape"):
        im.stn_sample(U, theta, out_shape=(0, 4))
    with pytest.raises(ValueError, match="not finite"):
        im.warp("affine", np.full(6, np.nan), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        im.warp_params("homography", np.full((3, 3), np.inf))
    with pytest.raises(ValueError, match="finite"):
        im.corner_error(np.full((3, 3), np.nan), np.eye(3), (4, 4))
    square = np.array([[0.0, 1, 1, 0], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="collinear"):
        im.homography_from_corners(np.array([[0.0, 1, 2, 3], [0, 1, 2, 5]]), square)
    with pytest.raises(ValueError, match="collinear"):
        im.homography_from_corners(square, np.array([[0.0, 0, 1, 1], [0, 0, 0, 1]]))


def test_align_refuses_bad_options_and_a_constant_image_and_scales(rng):
    I = smooth_image(60, 60)
    T, p0 = I[10:30, 10:30], np.array([10.0, 10.0])
    for options, word in [
        ({"max_iter": 0}, "max_iter"),
        ({"tol": -1.0}, "tol"),
        ({"min_overlap": 0.0}, "min_overlap"),
        ({"min_overlap": np.nan}, "min_overlap"),
    ]:
        with pytest.raises(ValueError, match=word):
            im.align(T, I, p0, kind="translation", **options)
    for method in ("ic", "fa"):
        with pytest.raises(ValueError, match="warped image is constant"):
            im.align(T, np.full((60, 60), 0.3), p0, kind="translation", method=method)
    # the same problem at 1e-200 and 1e300: the same warp, the bias scaled
    start = np.array([11.0, 9.5])
    ref = im.align(T, I, start, kind="translation", tol=1e-6, smooth=False)
    for s in (1e-200, 1e300):
        res = im.align(s * T, s * I, start, kind="translation", tol=1e-6, smooth=False)
        np.testing.assert_allclose(res.p, ref.p, rtol=0, atol=1e-9)
        assert np.isclose(res.gain, ref.gain) and np.isclose(res.bias / s, ref.bias)


def test_align_without_threadpoolctl_gives_the_same_warp(monkeypatch):
    """threadpoolctl is optional: without it align keeps BLAS's threads and finds the
    same warp."""
    I = smooth_image(60, 60)
    T, start = I[10:30, 12:32], np.array([0.01, 0, 11.4, 0, -0.01, 9.6, 0, 0])
    ref = im.align(T, I, start, levels=2)
    from derivlib import _threads

    monkeypatch.setattr(_threads, "_CONTROLLER", [])
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    res = im.align(T, I, start, levels=2)
    assert _threads._CONTROLLER == [None]
    np.testing.assert_allclose(res.M, ref.M, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["huber", "tukey"])
def test_robust_weights_are_rho_prime_over_r(kind):
    c = im.ROBUST[kind]

    def rho(r):  # (9.24) in JAX
        if kind == "huber":
            return jnp.where(jnp.abs(r) <= c, 0.5 * r * r, c * jnp.abs(r) - 0.5 * c * c)
        return (c * c / 6) * (1 - jnp.clip(1 - (r / c) ** 2, 0, None) ** 3)

    r = np.linspace(-3 * c, 3 * c, 61) + 1e-3  # no point exactly at 0 or +-c
    rho_and_slope = jax.jit(lambda r: (rho(r), jax.vmap(jax.grad(rho))(r)))
    values, drho = (np.asarray(a) for a in rho_and_slope(jnp.asarray(r)))
    np.testing.assert_allclose(im._robust_rho(kind, r), values)
    check.check_close(f"{kind} weights", im._robust_weights(kind, r) * r, drho)


def test_robust_align_survives_an_occluder_and_refuses_bad_options(rng):
    rng = np.random.default_rng(0)
    I = smooth_image(100, 100)
    T, M_true, M0 = im.make_pair(I, (24, 24), 48, 3, rng, noise=0.01)
    T[4:22, 6:24] = 0.5  # an occluding patch over 14% of the template
    p0 = im.warp_params("homography", M0)
    plain = im.align(T, I, p0)
    robust = im.align(T, I, p0, robust="tukey")
    assert im.corner_error(robust.M, M_true, T.shape) < 0.1
    assert im.corner_error(plain.M, M_true, T.shape) > 1
    assert robust.weights.shape == T.shape
    inside = np.zeros(T.shape, dtype=bool)
    inside[4:22, 6:24] = True  # the patch's pixels weigh less than the others
    assert robust.weights[inside].mean() < 0.5 * robust.weights[~inside].mean()
    for robust, method in (("cauchy", "ic"), ("huber", "fa")):
        with pytest.raises(ValueError, match="robust"):
            im.align(T, I, p0, robust=robust, method=method)
    with pytest.raises(ValueError, match="polish must be None, True or False"):
        im.align(T, I, p0, polish="no")


def test_sl3_matrix_and_jacobian_against_jax_and_scipy(rng):
    import scipy.linalg

    X = rng.uniform(0, 30, (2, 7))
    G = jnp.asarray(im.SL3_GENERATORS)

    def expm_series(A):  # its first terms: exact in value and slope at A = 0
        E, term = jnp.eye(3), jnp.eye(3)
        for k in range(1, 4):
            term = term @ A / k
            E = E + term
        return E

    def warp_sl3(p):  # (9.26) in JAX
        M = expm_series(jnp.einsum("i,ijk->jk", p, G))
        u = M[:, :2] @ X + M[:, 2:]
        return (u[:2] / u[2]).T

    expected = np.asarray(jax.jit(jax.jacobian(warp_sl3))(jnp.zeros(8)))
    check.check_close("sl3_jacobian", im.sl3_jacobian(X), expected)
    assert np.max(np.abs(im.sl3_jacobian(X) - im.warp_jacobian("homography",
                  np.zeros(8), X))) > 1  # fmt: skip
    for scale in (0.01, 1.0, 5.0):
        p = scale * rng.standard_normal(8)
        A = np.einsum("i,ijk->jk", p, im.SL3_GENERATORS)
        M = im.sl3_matrix(p)
        np.testing.assert_allclose(M, scipy.linalg.expm(A), rtol=1e-12, atol=1e-14)
        assert np.isclose(np.linalg.det(M), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="8 parameters"):
        im.sl3_matrix(np.zeros(6))


def test_warped_image_gradient_of_the_finish_against_jax(rng):
    """The finest level's (9.23) rows use the exact gradient of x -> I(W(x)) for the
    bilinear interpolant, from the four corners that give the value: jax.grad of the
    same composition at template pixels whose warped positions are off the grid."""
    I = rng.standard_normal((40, 50))
    M = im.warp_matrix(
        "homography", np.array([0.05, 0.02, 6, -0.03, 0.04, 5, 1e-3, 5e-4])
    )
    X = np.stack([rng.uniform(0, 30, 200), rng.uniform(0, 25, 200)])
    X = X[:, np.all(np.abs(im._apply(M, X)[0] % 1 - 0.5) < 0.499, axis=0)]
    Iw, ok, gx, gy = im._sample(I, M, X, 1.0, grad=True)
    assert ok is None

    def at(x):
        u = jnp.asarray(M) @ jnp.stack([x[0], x[1], jnp.ones_like(x[0])])
        return bilinear_jax(jnp.asarray(I), u[:2] / u[2])

    grads = jax.jit(jax.vmap(jax.grad(lambda x: at(x[:, None])[0]), 1, 1))(X)
    check.check_close("I(W(x))", Iw, np.asarray(at(X)), "jax bilinear")
    check.check_close("grad I(W(x))", np.stack([gx, gy]), np.asarray(grads), "jax.grad")
    # planted: grad I at W(x) without the Jacobian of W (the chain rule forgotten)
    P = jnp.asarray(im._apply(M, X)[0])
    gI = jax.jit(
        jax.vmap(jax.grad(lambda q: bilinear_jax(jnp.asarray(I), q[:, None])[0]), 1, 1)
    )
    check.check_fails(
        "grad I(W(x)) without dW/dx",
        lambda: np.asarray(gI(P)),
        np.asarray(grads),
        "jax.grad",
    )
    # planted: dW/dx = M[:2, :2] / u3, the quotient rule's term -W M[2, :2] / u3 lost
    u3 = M[2] @ np.vstack([X, np.ones(X.shape[1])])
    check.check_fails(
        "grad I(W(x)) with dW/dx = M[:2, :2] / u3",
        lambda: M[:2, :2].T @ np.asarray(gI(P)) / u3,
        np.asarray(grads),
        "jax.grad",
    )


def test_align_takes_the_exact_gradient_on_the_finest_level_only(monkeypatch):
    """The default finish runs (9.23) on the two finest levels: the finest reads the
    interpolant's exact gradient (`_gather_grad`), the coarser levels only values."""
    I = smooth_image(60, 60)
    T, start = I[10:30, 12:32], np.array([0.01, 0, 11.4, 0, -0.01, 9.6, 0, 0])
    exact, plain = [], []
    real_grad, real = im._gather_grad, im._gather

    def recording_grad(J, px, py):
        exact.append(J.shape)
        return real_grad(J, px, py)

    def recording(J, px, py):
        plain.append(J.shape)
        return real(J, px, py)

    monkeypatch.setattr(im, "_gather_grad", recording_grad)
    monkeypatch.setattr(im, "_gather", recording)
    im.align(T, I, start, levels=3)
    assert len(set(exact)) == 1 and len(set(plain)) == 2
    (finest,) = set(exact)
    assert all(s[0] < finest[0] and s[1] < finest[1] for s in plain)


def test_a_complex_or_text_tangent_or_cotangent_is_refused(rng):
    I, P = rng.random((6, 7)), rng.uniform(0, 5, (2, 4))
    z, s = np.zeros((6, 7), complex), np.full((2, 4), "a")
    with pytest.raises(ValueError, match="dI must be a real array, got dtype complex"):
        im.bilinear_jvp(I, P, z, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="dP must be a real array, got dtype <U1"):
        im.bilinear_jvp(I, P, np.zeros((6, 7)), s)
    with pytest.raises(ValueError, match="G must be a real array, got dtype complex"):
        im.bilinear_vjp(I, P, np.zeros(4, complex))
    # an integer or boolean cotangent is real, and taken as floats
    np.testing.assert_array_equal(
        im.bilinear_vjp(I, P, np.ones(4, int))[0], im.bilinear_vjp(I, P, np.ones(4))[0]
    )
