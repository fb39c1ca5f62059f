"""Chapter 9, dense motion: windowed Lucas-Kanade at every pixel (9.29)-(9.33), its
Gauss-Newton step against jax.grad and jax.hessian of the windowed cost, a known
translation recovered, the aperture problem reported, and the input rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derivlib import check
from derivlib import images as im


def smooth_image(rng, shape, passes=2):
    """Random texture, blurred a little so that its gradients are meaningful."""
    I = rng.standard_normal(shape)
    for _ in range(passes):
        I = (I + np.roll(I, 1, 0) + np.roll(I, 1, 1) + np.roll(I, (1, 1), (0, 1))) / 4
    return I


def window_matrix(shape, k):
    """W[x, x'] = w(x' - x), the 2-D window as a dense (HW, HW) matrix, zero beyond
    the window (and so beyond the image)."""
    H, W = shape
    r = len(k) // 2
    ys, xs = np.mgrid[0:H, 0:W]
    dy = ys.ravel()[None, :] - ys.ravel()[:, None]
    dx = xs.ravel()[None, :] - xs.ravel()[:, None]
    near = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    wy = np.where(near, k[np.clip(dy + r, 0, 2 * r)], 0.0)
    return wy * np.where(near, k[np.clip(dx + r, 0, 2 * r)], 0.0)


@jax.jit
def gauss_newton_jax(I0, I1, U0, Wm):
    """The cost (9.29) of every pixel, each pixel of its window linearised about
    where U0 sends it (9.30), summed over pixels with each pixel's own flow U[x];
    its Newton step from U0 (exact: the model is quadratic) by jax.grad and
    jax.hessian. Returns (the new flow (2, H, W), the 2 x 2 tensors A (HW, 2, 2))."""
    H, W = I0.shape
    ys, xs = jnp.mgrid[0:H, 0:W]
    X, Y = xs + U0[0], ys + U0[1]
    m = ((X >= 0) & (X <= W - 1) & (Y >= 0) & (Y <= H - 1)).ravel()
    X, Y = jnp.clip(X, 0, W - 1), jnp.clip(Y, 0, H - 1)
    x0 = jnp.minimum(jnp.floor(X), W - 2)
    y0 = jnp.minimum(jnp.floor(Y), H - 2)
    fx, fy = X - x0, Y - y0
    x0, y0 = x0.astype(int), y0.astype(int)
    Iw = (1 - fy) * ((1 - fx) * I1[y0, x0] + fx * I1[y0, x0 + 1]) + fy * (
        (1 - fx) * I1[y0 + 1, x0] + fx * I1[y0 + 1, x0 + 1]
    )
    gy, gx = (g.ravel() for g in jnp.gradient(Iw))
    e = (Iw - I0).ravel()
    u0, v0 = U0[0].ravel(), U0[1].ravel()

    def cost(U):  # U (HW, 2): row x is the flow of pixel x, constant on its window
        R = (
            e[None]
            + gx[None] * (U[:, :1] - u0[None])
            + gy[None] * (U[:, 1:] - v0[None])
        )
        return jnp.sum(Wm * m[None] * R**2)

    U0f = jnp.stack([u0, v0], axis=1)
    g = jax.grad(cost)(U0f)
    Hs = jax.hessian(cost)(U0f)
    n = H * W
    blocks = Hs[jnp.arange(n), :, jnp.arange(n), :]  # each pixel's own 2 x 2
    U = U0f - jnp.linalg.solve(blocks, g[..., None])[..., 0]
    return U.T.reshape(2, H, W), blocks / 2


@pytest.mark.parametrize("window", ["gaussian", "box"])
def test_gauss_newton_step_against_jax(rng, window):
    shape = (14, 16)
    I0 = smooth_image(rng, shape)
    I1 = np.roll(I0, 1, axis=1) + 0.05 * rng.standard_normal(shape)
    U0 = 0.6 + 0.4 * smooth_image(rng, (2,) + shape)  # varies across each window
    ours = im.lucas_kanade_flow(
        I0, I1, radius=2, window=window, levels=1, iterations=1, flow0=U0, rtol=1e-12
    )
    assert not ours.reported.any()
    k = im._flow_kernel(window, 2)
    flow, A = gauss_newton_jax(I0, I1, U0, window_matrix(shape, k))
    check.check_close(
        f"lucas_kanade_flow, one step ({window})",
        ours.flow,
        np.asarray(flow),
        oracle="Newton step by jax.grad, jax.hessian",
    )
    check.check_close(
        "smallest eigenvalue (9.32)",
        ours.min_eigenvalue.ravel(),
        np.linalg.eigvalsh(np.asarray(A))[:, 0],
        oracle="numpy.linalg.eigvalsh",
    )


def test_recovers_a_translation():
    def f(x, y):  # an image given by a formula: I1 is exactly I0 moved
        return np.sin(0.31 * x + 0.13 * y) + np.cos(0.17 * x - 0.23 * y)

    ys, xs = np.mgrid[0:30, 0:40].astype(float)
    # I1(x + u) = I0(x) for I1(x) = I0(x - u). A whole-pixel shift is recovered to
    # rounding; between pixels the bilinear I1 of (9.29) is not the moved image, and
    # the minimiser is off by a few hundredths of a pixel
    for true, median, worst in [((3.0, -2.0), 1e-9, 1e-6), ((3.4, -1.7), 0.05, 0.15)]:
        true = np.array(true)
        I0, I1 = f(xs, ys), f(xs - true[0], ys - true[1])
        R = im.lucas_kanade_flow(I0, I1, radius=3, levels=2)
        assert not R.reported[6:-6, 6:-6].any()
        err = np.abs(R.flow[:, 6:-6, 6:-6] - true[:, None, None])
        assert np.median(err) < median and err.max() < worst, (true, err.max())


def test_extreme_scales_give_the_same_flow():
    """Images near the limits of float64: the products of gradients would overflow
    or underflow (NaN, or texture taken for none); the flow is the same at any scale."""
    ys, xs = np.mgrid[0:30, 0:40].astype(float)
    I0 = np.sin(0.31 * xs + 0.13 * ys) + np.cos(0.17 * xs - 0.23 * ys)
    I1 = np.sin(0.31 * (xs - 3.4) + 0.13 * (ys + 1.7)) + np.cos(
        0.17 * (xs - 3.4) - 0.23 * (ys + 1.7)
    )
    ref = im.lucas_kanade_flow(I0, I1, radius=3, levels=2)
    for s in (2.0**-1000, 2.0**-500, 2.0**500, 2.0**1000):
        with np.errstate(all="raise"):
            R = im.lucas_kanade_flow(s * I0, s * I1, radius=3, levels=2)
        np.testing.assert_allclose(R.flow, ref.flow, rtol=0, atol=1e-12)
        assert (R.reported == ref.reported).all()


def test_aperture_and_textureless_are_reported(rng):
    x = np.arange(32.0)
    stripes = np.tile(np.sin(0.7 * x), (24, 1))  # depends on x only: an edge
    R = im.lucas_kanade_flow(stripes, np.roll(stripes, 1, axis=1), radius=3, levels=1)
    assert R.reported.all()  # lambda_min = 0 everywhere: the aperture problem
    assert np.all(np.isfinite(R.flow))
    assert np.abs(R.flow[1]).max() < 1e-6  # the undetermined direction stays
    assert np.median(np.abs(R.flow[0, :, 6:-6] - 1)) < 0.05  # the normal flow is
    I = smooth_image(rng, (40, 40))
    I[10:30, 10:30] = 0.3  # a textureless patch
    R = im.lucas_kanade_flow(I, np.roll(I, 1, axis=1), radius=3, levels=1)
    assert R.reported[16:24, 16:24].all()
    assert not R.reported[:5, :5].any()
    assert np.all(np.isfinite(R.flow)) and np.all(np.isfinite(R.min_eigenvalue))
    R = im.lucas_kanade_flow(np.ones((20, 20)), np.ones((20, 20)), radius=2)
    assert R.reported.all() and not R.flow.any()  # constant: nothing determined


def test_input_rules(rng):
    I = rng.standard_normal((20, 24))
    flow = im.lucas_kanade_flow
    with pytest.raises(ValueError, match=r"gray images \(H, W\)"):
        flow(np.stack([I, I]), np.stack([I, I]))
    with pytest.raises(ValueError, match="same shape"):
        flow(I, I[:, :-1])
    with pytest.raises(ValueError, match="real array"):
        flow(I.astype(complex), I)
    with pytest.raises(ValueError, match="real array"):
        flow(I > 0, I)
    with pytest.raises(ValueError, match="non-finite"):
        flow(I, np.where(I > 1, np.nan, I))
    with pytest.raises(ValueError, match="radius must be a positive integer"):
        flow(I, I, radius=0)
    with pytest.raises(ValueError, match="radius must be a positive integer"):
        flow(I, I, radius=2.5)
    with pytest.raises(ValueError, match="does not fit"):
        flow(I, I, radius=10)
    with pytest.raises(ValueError, match="window must be"):
        flow(I, I, window="triangle")
    with pytest.raises(ValueError, match="too small for 3 levels"):
        flow(I, I, radius=3, levels=3)
    with pytest.raises(ValueError, match="iterations"):
        flow(I, I, iterations=0)
    with pytest.raises(ValueError, match="rtol"):
        flow(I, I, rtol=0.0)
    with pytest.raises(ValueError, match=r"flow0 must have shape \(2, 20, 24\)"):
        flow(I, I, flow0=np.zeros((20, 24)))


def test_window_sums_without_scipy_agree(rng, monkeypatch):
    """The window sums run through scipy.ndimage when it is installed and through
    shifted slices otherwise: the two paths give the same flow."""
    I0 = smooth_image(rng, (24, 30))
    I1 = np.roll(I0, 2, axis=1)
    with_scipy = im.lucas_kanade_flow(I0, I1, radius=3, levels=2)
    monkeypatch.setattr(im, "_ndimage", None)
    without = im.lucas_kanade_flow(I0, I1, radius=3, levels=2)
    check.check_close(
        "flow, shifted slices", without.flow, with_scipy.flow, oracle="scipy.ndimage"
    )
    assert (without.reported == with_scipy.reported).all()


def test_a_complex_or_text_flow0_is_refused():
    I0 = np.random.default_rng(0).random((12, 14))
    for bad in (np.zeros((2, 12, 14), complex), np.full((2, 12, 14), "a")):
        with pytest.raises(ValueError, match="flow0 must be a real array, got dtype"):
            im.lucas_kanade_flow(I0, I0, radius=2, flow0=bad)
