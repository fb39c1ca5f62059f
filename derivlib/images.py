"""Chapter 9: images as functions. Bilinear interpolation and its differentials, the
sampler of a spatial transformer, warps and their Jacobians (and the sl(3)
parametrisation), Lucas-Kanade alignment (forward-additive, inverse-compositional and
forward-compositional, on the correlation criterion, optionally robust), Keys's
bicubic interpolant, and dense motion by windowed Lucas-Kanade at every pixel.

Layout, stated once: an image is a float64 array ``(H, W)`` or ``(C, H, W)``; a batch
is ``(N, C, H, W)``. Pixel centres sit at integer coordinates, and a position is
``(x, y) = (column, row)``: pixel ``I[r, c]`` is the value at ``x = c, y = r``.
Positions are columns, ``P`` of shape ``(2, n)``.

Grid lines and border (equations (9.1)-(9.6)):

- ``bilinear`` refuses a position outside ``[0, W - 1] x [0, H - 1]`` with
  ``ValueError``. Inside, the cell of ``x`` is ``floor(x)``, except on the last
  column ``x = W - 1``, which belongs to the cell on its left. So on an interior grid
  line the derivatives are the one-sided limits from the right (from below for
  ``y``: the side of larger coordinates), and on the last line from the left.
- ``stn_sample`` (the spatial transformer's sampler) extends the image by zeros
  outside, as a spatial transformer does, and always takes the cell ``floor(x)``, so
  its derivatives on every grid line are the limits from the side of larger
  coordinates.
"""

from dataclasses import dataclass, field

import numpy as np

from ._threads import one_blas_thread

try:  # the sparse scatter of the backward rules; NumPy's bincount without it
    import scipy.sparse as _sparse
except ImportError:  # pragma: no cover
    _sparse = None
try:  # the window sums of the dense flow; shifted slices without it
    import scipy.ndimage as _ndimage
except ImportError:  # pragma: no cover
    _ndimage = None

# ----- Validation -----


def _image(I, name="I"):
    I = np.asarray(I)
    if I.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real array, got dtype {I.dtype}")
    if I.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (H, W) or (C, H, W), got {I.shape}")
    if I.shape[-1] < 2 or I.shape[-2] < 2:
        raise ValueError(
            f"{name} needs at least 2 x 2 pixels to interpolate, got {I.shape}"
        )
    I = I.astype(np.float64)
    if not np.all(np.isfinite(I)):
        raise ValueError(f"{name} has non-finite values")
    return I


def _positions(P, name="P"):
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != 2:
        raise ValueError(f"{name} must be positions as columns (2, n), got {P.shape}")
    if not np.all(np.isfinite(P)):
        raise ValueError(f"{name} has non-finite positions")
    return P


def _same(A, shape, name):
    A = np.asarray(A)
    if A.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be a real array, got dtype {A.dtype}")
    A = A.astype(np.float64)
    if A.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {A.shape}")
    return A


# ----- Bilinear interpolation, (9.1)-(9.6) -----


def _cell(I, P):
    """Cell corners (x0, y0) and fractions (fx, fy) under the refusal rule."""
    H, W = I.shape[-2:]
    x, y = P
    outside = (x < 0) | (x > W - 1) | (y < 0) | (y > H - 1)
    if np.any(outside):
        k = int(np.argmax(outside))
        raise ValueError(
            f"position {k}, (x, y) = ({float(x[k])!r}, {float(y[k])!r}), is outside "
            "the image: "
            f"expected 0 <= x <= {W - 1} and 0 <= y <= {H - 1}"
        )
    x0 = np.minimum(np.floor(x), W - 2).astype(np.intp)
    y0 = np.minimum(np.floor(y), H - 2).astype(np.intp)
    return x0, y0, x - x0, y - y0


def _corners(I3, x0, y0):
    """The four corner values (C, n): I00 = I[y0, x0], I10 = I[y0, x0 + 1], ..."""
    return (
        I3[:, y0, x0],
        I3[:, y0, x0 + 1],
        I3[:, y0 + 1, x0],
        I3[:, y0 + 1, x0 + 1],
    )


def _bilinear(I, P):
    """bilinear for a checked gray image (H, W) and positions inside it."""
    H, W = I.shape
    x0 = np.minimum(np.floor(P[0]), W - 2).astype(np.intp)
    y0 = np.minimum(np.floor(P[1]), H - 2).astype(np.intp)
    fx, fy = P[0] - x0, P[1] - y0
    i = y0 * W + x0
    F = I.ravel()  # the four corners F[i], F[i + 1], F[i + W], F[i + W + 1], as views
    a, c = F[i], F[W:][i]
    top = a + fx * (F[1:][i] - a)
    bottom = c + fx * (F[W + 1 :][i] - c)
    return top + fy * (bottom - top)


def bilinear(I, P):
    """Bilinear interpolation (9.1) of the image I at the positions P (2, n).

    Returns (n,) for an image (H, W), (C, n) for (C, H, W). Positions outside the
    image raise ValueError (see the module's docstring for the grid-line rule)."""
    I, P = _image(I), _positions(P)
    I3 = I if I.ndim == 3 else I[None]
    x0, y0, fx, fy = _cell(I3, P)
    I00, I10, I01, I11 = _corners(I3, x0, y0)
    v = (1 - fx) * (1 - fy) * I00 + fx * (1 - fy) * I10
    v = v + (1 - fx) * fy * I01 + fx * fy * I11
    return v if I.ndim == 3 else v[0]


def bilinear_jvp(I, P, dI, dP):
    """The differential (9.3): dv = sum of the weights times dI at the corners plus
    the position gradient (9.2) applied to dP. Shapes as `bilinear`."""
    I, P = _image(I), _positions(P)
    dI, dP = _same(dI, I.shape, "dI"), _same(dP, P.shape, "dP")
    I3 = I if I.ndim == 3 else I[None]
    dI3 = dI if dI.ndim == 3 else dI[None]
    x0, y0, fx, fy = _cell(I3, P)
    I00, I10, I01, I11 = _corners(I3, x0, y0)
    d00, d10, d01, d11 = _corners(dI3, x0, y0)
    dv = (1 - fx) * (1 - fy) * d00 + fx * (1 - fy) * d10
    dv = dv + (1 - fx) * fy * d01 + fx * fy * d11
    vx = (1 - fy) * (I10 - I00) + fy * (I11 - I01)
    vy = (1 - fx) * (I01 - I00) + fx * (I11 - I10)
    dv = dv + vx * dP[0] + vy * dP[1]
    return dv if I.ndim == 3 else dv[0]


def _scatter_rows(F, w, Y, size):
    """S^T Y for the sparse S (m, size) whose row i holds w[i, k] in column F[i, k]:
    row i of Y, weighted, added into rows F[i, :] of a (size, c) result. This is the
    scatter of (9.4) for all channels at once (Y channels-last). scipy's sparse
    product when scipy is installed; otherwise one bincount per channel."""
    m, c = Y.shape
    if _sparse is not None:
        S = _sparse.csc_array(
            (w.ravel(), F.ravel(), np.arange(0, F.size + 1, F.shape[1])),
            shape=(size, m),
        )  # the transpose of S, built directly; each column holds one row of S
        return S @ Y
    Ff = F.ravel()
    return np.stack(
        [np.bincount(Ff, weights=(w * Y[:, j : j + 1]).ravel(), minlength=size)
         for j in range(c)],
        axis=1,
    )  # fmt: skip


def bilinear_vjp(I, P, G):
    """The backward rule (9.4)-(9.5): the gradient to the image is a scatter of G
    times the four weights onto the corners; the gradient to the positions is
    sum over channels of G times the position gradient. Returns (I_bar, P_bar)."""
    I, P = _image(I), _positions(P)
    n = P.shape[1]
    G = _same(G, (I.shape[0], n) if I.ndim == 3 else (n,), "G")
    I3 = I if I.ndim == 3 else I[None]
    G3 = G if G.ndim == 2 else G[None]
    C, H, W = I3.shape
    x0, y0, fx, fy = _cell(I3, P)
    I00, I10, I01, I11 = _corners(I3, x0, y0)
    P_bar = np.stack(
        [
            np.sum(G3 * ((1 - fy) * (I10 - I00) + fy * (I11 - I01)), axis=0),
            np.sum(G3 * ((1 - fx) * (I01 - I00) + fx * (I11 - I10)), axis=0),
        ]
    )
    i = y0 * W + x0
    F = np.stack([i, i + 1, i + W, i + W + 1], axis=1)
    w = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=1)
    I_bar = _scatter_rows(F, w, G3.T, H * W).T.reshape(C, H, W)
    return (I_bar if I.ndim == 3 else I_bar[0]), P_bar


def bilinear_hessian(I, P):
    """The second derivative (9.6) in the position, (n, 2, 2) or (C, n, 2, 2): zero
    on the diagonal (bilinear is affine in x and in y separately) and the mixed term
    I00 - I10 - I01 + I11 off it."""
    I, P = _image(I), _positions(P)
    I3 = I if I.ndim == 3 else I[None]
    x0, y0, _, _ = _cell(I3, P)
    I00, I10, I01, I11 = _corners(I3, x0, y0)
    m = I00 - I10 - I01 + I11
    Hs = np.zeros(m.shape + (2, 2))
    Hs[..., 0, 1] = Hs[..., 1, 0] = m
    return Hs if I.ndim == 3 else Hs[0]


# ----- A smoother interpolant: Keys's bicubic, (9.27)-(9.28) -----

KEYS_A = -0.5


def keys_kernel(t, a=KEYS_A):
    """Keys's cubic convolution kernel (9.27): C1, zero outside |t| < 2."""
    t = np.abs(t)
    inner = ((a + 2) * t - (a + 3)) * t * t + 1
    outer = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, inner, np.where(t < 2, outer, 0.0))


def keys_kernel_derivative(t, a=KEYS_A):
    """The derivative of `keys_kernel` in t (odd, continuous)."""
    s, t = np.sign(t), np.abs(t)
    inner = (3 * (a + 2) * t - 2 * (a + 3)) * t
    outer = (3 * a * t - 10 * a) * t + 8 * a
    return s * np.where(t <= 1, inner, np.where(t < 2, outer, 0.0))


def _bicubic_setup(I, P):
    I, P = _image(I), _positions(P)
    I3 = I if I.ndim == 3 else I[None]
    H, W = I3.shape[-2:]
    if H < 4 or W < 4:
        raise ValueError(f"bicubic needs at least 4 x 4 pixels, got {I.shape}")
    x, y = P
    outside = (x < 1) | (x > W - 2) | (y < 1) | (y > H - 2)
    if np.any(outside):
        k = int(np.argmax(outside))
        raise ValueError(
            f"position {k}, (x, y) = ({float(x[k])!r}, {float(y[k])!r}), is outside "
            f"the bicubic domain: expected 1 <= x <= {W - 2} and 1 <= y <= {H - 2} "
            "(a 4 x 4 neighbourhood)"
        )
    x0 = np.minimum(np.floor(x), W - 3).astype(np.intp)
    y0 = np.minimum(np.floor(y), H - 3).astype(np.intp)
    return I, I3, P, x0, y0, x - x0, y - y0


def bicubic(I, P):
    """Keys's bicubic interpolation (9.28) of I at the positions P (2, n): the sum
    over the 4 x 4 pixels around P of k(fx - i) k(fy - j) I[y0 + j, x0 + i],
    i, j in {-1, 0, 1, 2}. Positions outside [1, W - 2] x [1, H - 2] raise
    ValueError; the cell rule on grid lines is that of `bilinear`."""
    I, I3, P, x0, y0, fx, fy = _bicubic_setup(I, P)
    v = 0.0
    for j in range(-1, 3):
        for i in range(-1, 3):
            w = keys_kernel(fx - i) * keys_kernel(fy - j)
            v = v + w * I3[:, y0 + j, x0 + i]
    return v if I.ndim == 3 else v[0]


def bicubic_jvp(I, P, dI, dP):
    """The differential of (9.28): the interpolant of dI plus the position gradient,
    sum of k'(fx - i) k(fy - j) I and k(fx - i) k'(fy - j) I, applied to dP."""
    I, I3, P, x0, y0, fx, fy = _bicubic_setup(I, P)
    dI, dP = _same(dI, I.shape, "dI"), _same(dP, P.shape, "dP")
    dI3 = dI if dI.ndim == 3 else dI[None]
    dv = 0.0
    for j in range(-1, 3):
        for i in range(-1, 3):
            kx, ky = keys_kernel(fx - i), keys_kernel(fy - j)
            dkx, dky = keys_kernel_derivative(fx - i), keys_kernel_derivative(fy - j)
            Iij = I3[:, y0 + j, x0 + i]
            dv = dv + kx * ky * dI3[:, y0 + j, x0 + i]
            dv = dv + (dkx * ky * dP[0] + kx * dky * dP[1]) * Iij
    return dv if I.ndim == 3 else dv[0]


def bicubic_vjp(I, P, G):
    """The backward rule of (9.28): a scatter of G times the 16 weights to the image,
    and the position gradient summed over channels. Returns (I_bar, P_bar)."""
    I, I3, P, x0, y0, fx, fy = _bicubic_setup(I, P)
    n = P.shape[1]
    G = _same(G, (I.shape[0], n) if I.ndim == 3 else (n,), "G")
    G3 = G if G.ndim == 2 else G[None]
    C, H, W = I3.shape
    I_bar = np.zeros((C, H * W))
    P_bar = np.zeros((2, n))
    for j in range(-1, 3):
        for i in range(-1, 3):
            kx, ky = keys_kernel(fx - i), keys_kernel(fy - j)
            dkx, dky = keys_kernel_derivative(fx - i), keys_kernel_derivative(fy - j)
            gI = np.sum(G3 * I3[:, y0 + j, x0 + i], axis=0)
            P_bar[0] += dkx * ky * gI
            P_bar[1] += kx * dky * gI
            flat = (y0 + j) * W + (x0 + i)
            for c in range(C):
                I_bar[c] += np.bincount(flat, weights=kx * ky * G3[c], minlength=H * W)
    I_bar = I_bar.reshape(C, H, W)
    return (I_bar if I.ndim == 3 else I_bar[0]), P_bar


# ----- The spatial transformer's sampler, (9.7)-(9.9) -----


def affine_grid(theta, out_shape):
    """Sampling positions (N, 2, Ho * Wo) of an affine spatial transformer: output
    pixel (x, y) (row-major order) samples the input at theta_k [x, y, 1]^T, in pixel
    coordinates. theta is (N, 2, 3)."""
    theta = np.asarray(theta, dtype=np.float64)
    if theta.ndim != 3 or theta.shape[1:] != (2, 3):
        raise ValueError(f"theta must have shape (N, 2, 3), got {theta.shape}")
    if len(out_shape) != 2 or not all(
        isinstance(s, (int, np.integer)) and s >= 1 for s in out_shape
    ):
        raise ValueError(
            f"out_shape must be two positive integers (Ho, Wo), got {out_shape!r}"
        )
    Ho, Wo = out_shape
    ys, xs = np.mgrid[0:Ho, 0:Wo]
    X = np.stack([xs.ravel(), ys.ravel(), np.ones(Ho * Wo)]).astype(np.float64)
    return theta @ X


def _stn_setup(U, theta, out_shape):
    U = np.asarray(U)
    if U.dtype.kind not in "fiu":
        raise ValueError(f"U must be a real array, got dtype {U.dtype}")
    if U.ndim != 4:
        raise ValueError(f"U must be a batch (N, C, H, W), got shape {U.shape}")
    U = np.asarray(U, dtype=np.float64)  # no copy when it is float64 already
    if not np.all(np.isfinite(U)):
        raise ValueError("U has non-finite values")
    if np.shape(theta) != (U.shape[0], 2, 3):
        raise ValueError(
            f"theta must have shape {(U.shape[0], 2, 3)}, got {np.shape(theta)}"
        )
    if not np.all(np.isfinite(np.asarray(theta, dtype=np.float64))):
        raise ValueError("theta has non-finite entries")
    out_shape = U.shape[2:] if out_shape is None else tuple(out_shape)
    P = affine_grid(theta, out_shape)
    N, C, H, W = U.shape
    x0f, y0f = np.floor(P[:, 0]), np.floor(P[:, 1])
    fx, fy = P[:, 0] - x0f, P[:, 1] - y0f
    x0, y0 = x0f.astype(np.intp), y0f.astype(np.intp)
    idx, ok = [], []
    for dy in (0, 1):
        for dx in (0, 1):
            xc, yc = x0 + dx, y0 + dy
            inside = (xc >= 0) & (xc < W) & (yc >= 0) & (yc < H)
            idx.append(np.where(inside, yc * W + xc, 0))
            ok.append(inside.astype(np.float64))
    return U, out_shape, fx, fy, idx, ok


def _stn_gather(U, idx, ok):
    N, C, H, W = U.shape
    Uf = U.reshape(N, C, H * W)
    return [np.take_along_axis(Uf, i[:, None, :], axis=2) * m[:, None] for i, m in
            zip(idx, ok)]  # fmt: skip


def stn_sample(U, theta, *, out_shape=None):
    """The bilinear sampler of a spatial transformer (9.7): V[k, c] at output pixel
    (x, y) is the bilinear value of U[k, c] at theta_k [x, y, 1]^T, with zeros outside
    the image. U (N, C, H, W), theta (N, 2, 3); returns (N, C, Ho, Wo)."""
    U, out_shape, fx, fy, idx, ok = _stn_setup(U, theta, out_shape)
    U00, U10, U01, U11 = _stn_gather(U, idx, ok)
    fx, fy = fx[:, None], fy[:, None]
    V = (1 - fx) * (1 - fy) * U00 + fx * (1 - fy) * U10
    V = V + (1 - fx) * fy * U01 + fx * fy * U11
    return V.reshape(U.shape[:2] + out_shape)


def stn_sample_jvp(U, theta, dU, dtheta, *, out_shape=None):
    """The differential (9.8) of the sampler: the sampler applied to dU plus the
    position gradient times dP = dtheta [x, y, 1]^T."""
    U, out_shape, fx, fy, idx, ok = _stn_setup(U, theta, out_shape)
    dU = _same(dU, U.shape, "dU")
    dtheta = _same(dtheta, np.shape(theta), "dtheta")
    U00, U10, U01, U11 = _stn_gather(U, idx, ok)
    d00, d10, d01, d11 = _stn_gather(dU, idx, ok)
    dP = affine_grid(dtheta, out_shape)
    fx, fy = fx[:, None], fy[:, None]
    dV = (1 - fx) * (1 - fy) * d00 + fx * (1 - fy) * d10
    dV = dV + (1 - fx) * fy * d01 + fx * fy * d11
    Vx = (1 - fy) * (U10 - U00) + fy * (U11 - U01)
    Vy = (1 - fx) * (U01 - U00) + fx * (U11 - U10)
    dV = dV + Vx * dP[:, None, 0] + Vy * dP[:, None, 1]
    return dV.reshape(U.shape[:2] + out_shape)


def stn_sample_vjp(U, theta, G, *, out_shape=None):
    """The backward rule (9.9) of the sampler: U_bar is a scatter of G times the
    weights (entries outside the image are dropped), theta_bar = sum over pixels of
    P_bar [x, y, 1]. Returns (U_bar, theta_bar).

    The positions are shared by the channels of an image, so everything runs
    channels-last, once per position: the four corners of a position are read for all
    channels in one gather and the position gradient forms sum_c G U_k before the
    weights (it is linear in U); the scatter to U is one sparse product S^T G, S
    holding the four weights of each position, for all channels and images."""
    U, out_shape, fx, fy, idx, ok = _stn_setup(U, theta, out_shape)
    N, C, H, W = U.shape
    n = out_shape[0] * out_shape[1]
    G = _same(G, (N, C) + out_shape, "G").reshape(N, C, n)
    Ut = U.reshape(N, C, H * W).transpose(0, 2, 1).reshape(N * H * W, C)
    Gt = G.transpose(0, 2, 1).reshape(N * n, C)
    base = (np.arange(N) * (H * W))[:, None]
    F = np.stack([(base + i).ravel() for i in idx], axis=1)  # (N n, 4) corners
    m = np.stack([k.ravel() for k in ok], axis=1)  # 1 inside the image, else 0
    # s_k = sum_c G U_k, zero where corner k is outside the image
    s = np.matmul(np.take(Ut, F, axis=0), Gt[:, :, None])[:, :, 0] * m
    s00, s10, s01, s11 = s.T
    fx, fy = fx.ravel(), fy.ravel()
    gx = (s10 - s00) + fy * ((s11 - s01) - (s10 - s00))
    gy = (s01 - s00) + fx * ((s11 - s10) - (s01 - s00))
    Ho, Wo = out_shape
    ys, xs = np.mgrid[0:Ho, 0:Wo]
    Xh = np.stack([xs.ravel(), ys.ravel(), np.ones(n)]).astype(np.float64)
    theta_bar = np.stack([gx.reshape(N, n), gy.reshape(N, n)], axis=1) @ Xh.T
    w = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=1)
    U_bar = _scatter_rows(F, w * m, Gt, N * H * W)  # the scatter (9.4)
    U_bar = U_bar.reshape(N, H * W, C).transpose(0, 2, 1)
    return U_bar.reshape(U.shape), theta_bar


# ----- Warps and their Jacobians, (9.10)-(9.13) -----

_KINDS = {"translation": 2, "affine": 6, "homography": 8}
_COLUMNS = {
    "translation": [2, 5],
    "affine": list(range(6)),
    "homography": list(range(8)),
}


def _kind(kind):
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    return kind


def _params(kind, p):
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (_KINDS[_kind(kind)],):
        raise ValueError(
            f"a {kind} warp has {_KINDS[kind]} parameters, got shape {p.shape}"
        )
    if not np.all(np.isfinite(p)):
        raise ValueError(f"the {kind} parameters are not finite: {p.tolist()}")
    return p


def warp_matrix(kind, p):
    """The 3 x 3 matrix of a warp: translation [I t; 0 1] with p = t; affine
    I + [p0 p1 p2; p3 p4 p5; 0 0 0]; homography I + [p0 p1 p2; p3 p4 p5; p6 p7 0]."""
    p = _params(kind, p)
    full = np.zeros(8)
    full[_COLUMNS[kind]] = p
    return np.eye(3) + np.append(full, 0.0).reshape(3, 3)


def warp_params(kind, M):
    """The parameters of the warp with matrix M, scaled so that M[2, 2] = 1. Raises
    ValueError when M is not of that kind."""
    M = _same(M, (3, 3), "M")
    if not np.all(np.isfinite(M)):
        raise ValueError("a warp matrix needs finite entries")
    if M[2, 2] == 0:
        raise ValueError("a warp matrix needs M[2, 2] != 0")
    M = M / M[2, 2]
    A = M - np.eye(3)
    full = A.ravel()[:8]
    rest = np.delete(full, _COLUMNS[_kind(kind)])
    if np.any(np.abs(rest) > 1e-12 * max(1.0, np.abs(full).max())):
        raise ValueError(f"M is not a {kind} warp matrix: {np.round(M, 6).tolist()}")
    return full[_COLUMNS[kind]]


def _apply(M, X):
    u = M[:, :2] @ X + M[:, 2:]
    if np.any(u[2] <= 0):
        raise ValueError(
            "the homography sends a point to infinity or through it (third "
            "homogeneous coordinate <= 0)"
        )
    return u[:2] / u[2], u[2]


def warp(kind, p, X):
    """W(X; p) (9.10): the warp of the points X (2, n)."""
    return _apply(warp_matrix(kind, p), _positions(X, "X"))[0]


def warp_jacobian(kind, p, X):
    """dW/dp (9.11)-(9.13) at each point, shape (n, 2, k): row i of J[j] is the
    gradient of coordinate i of W(x_j; p)."""
    X = _positions(X, "X")
    Wx, u3 = _apply(warp_matrix(kind, p), X)
    x, y = X
    n = X.shape[1]
    J = np.zeros((n, 2, 8))
    J[:, 0, 0], J[:, 0, 1], J[:, 0, 2] = x, y, 1.0
    J[:, 1, 3], J[:, 1, 4], J[:, 1, 5] = x, y, 1.0
    J[:, :, 6] = -Wx.T * x[:, None]
    J[:, :, 7] = -Wx.T * y[:, None]
    J = J / u3[:, None, None]
    return J[:, :, _COLUMNS[kind]]


# ----- The sl(3) parametrisation of a homography, (9.26) -----

# a basis of sl(3), the traceless 3 x 3 matrices: translations in x and y, the two
# shears, two scalings (diag(1, -1, 0) and diag(0, 1, -1)), and the two projective
# terms
SL3_GENERATORS = np.zeros((8, 3, 3))
for _i, (_r, _c) in enumerate([(0, 2), (1, 2), (0, 1), (1, 0)]):
    SL3_GENERATORS[_i, _r, _c] = 1.0
SL3_GENERATORS[4] = np.diag([1.0, -1.0, 0.0])
SL3_GENERATORS[5] = np.diag([0.0, 1.0, -1.0])
SL3_GENERATORS[6, 2, 0] = SL3_GENERATORS[7, 2, 1] = 1.0


def _expm3(A):
    """exp(A) for a 3 x 3 matrix: Taylor series on A / 2^s, then s squarings."""
    norm = np.abs(A).sum(axis=0).max()
    s = max(0, int(np.ceil(np.log2(norm / 0.25)))) if norm > 0.25 else 0
    B = A / 2.0**s
    E, term = np.eye(3), np.eye(3)
    for k in range(1, 18):
        term = term @ B / k
        E = E + term
    for _ in range(s):
        E = E @ E
    return E


def sl3_matrix(p):
    """The homography exp(sum_i p_i G_i) (9.26) of the 8 sl(3) parameters p, with
    the generators SL3_GENERATORS; its determinant is 1 (the generators are traceless).
    """
    p = _params("homography", p)
    return _expm3(np.einsum("i,ijk->jk", p, SL3_GENERATORS))


def sl3_jacobian(X):
    """dW/dp (9.26) at p = 0 of the sl(3) warp, at the points X (2, n): (n, 2, 8).
    Column i is (G_i x~)_{1:2} - x (G_i x~)_3, the quotient rule (9.11) at u = x~."""
    X = _positions(X, "X")
    Xh = np.vstack([X, np.ones(X.shape[1])])
    du = np.einsum("ijk,kn->nji", SL3_GENERATORS, Xh)  # (n, 3, 8)
    return du[:, :2] - X.T[:, :, None] * du[:, 2:3]


# ----- Lucas-Kanade, (9.14)-(9.25) -----


def blur(I):
    """Separable binomial blur [1, 4, 6, 4, 1] / 16 with the border replicated."""
    I = np.asarray(I, dtype=np.float64)
    H, W = I.shape
    Ip = np.concatenate([I[:1], I[:1], I, I[-1:], I[-1:]])  # rows, border replicated
    I = (Ip[0:H] + Ip[4 : H + 4] + 4 * (Ip[1 : H + 1] + Ip[3 : H + 3])) / 16 + (
        6 / 16
    ) * Ip[2 : H + 2]
    Ip = np.concatenate([I[:, :1], I[:, :1], I, I[:, -1:], I[:, -1:]], axis=1)
    I = (Ip[:, 0:W] + Ip[:, 4 : W + 4] + 4 * (Ip[:, 1 : W + 1] + Ip[:, 3 : W + 3])) / (
        16
    ) + (6 / 16) * Ip[:, 2 : W + 2]
    return I


def _reduce(I):
    """blur(I)[::2, ::2], computing only the samples kept."""
    H, W = I.shape
    Ip = np.concatenate([I[:1], I[:1], I, I[-1:], I[-1:]])  # rows, border replicated
    I = (
        Ip[0:H:2] + Ip[4 : H + 4 : 2] + 4 * (Ip[1 : H + 1 : 2] + Ip[3 : H + 3 : 2])
    ) / (16) + (6 / 16) * Ip[2 : H + 2 : 2]
    Ip = np.concatenate([I[:, :1], I[:, :1], I, I[:, -1:], I[:, -1:]], axis=1)
    return (
        Ip[:, 0:W:2]
        + Ip[:, 4 : W + 4 : 2]
        + 4 * (Ip[:, 1 : W + 1 : 2] + Ip[:, 3 : W + 3 : 2])
    ) / 16 + (6 / 16) * Ip[:, 2 : W + 2 : 2]


def pyramid(I, levels, smooth=True):
    """[blur(I), reduce(I), ...]: each level blurred and subsampled by 2, so pixel
    (x, y) of level l + 1 sits at (2x, 2y) of level l. With `smooth` the finest level
    is blurred too (it damps the noise in the gradients, but a blur does not commute
    with a warp)."""
    I = np.asarray(I, dtype=np.float64)
    out = [blur(I) if smooth else I]
    for _ in range(levels - 1):
        out.append(_reduce(out[-1]))
    return out


def image_gradient(I):
    """Central differences (one-sided at the border): (gx, gy), each shaped like I."""
    gy, gx = np.gradient(np.asarray(I, dtype=np.float64))
    return gx, gy


@dataclass
class AlignResult:
    """The warp found by `align`: parameters p, matrix M, and what happened (the
    robust weights of the finest level, shaped like the template, when asked for)."""

    p: np.ndarray
    M: np.ndarray
    converged: bool
    iterations: int
    gain: float = 1.0
    bias: float = 0.0
    steps: list = field(default_factory=list)
    weights: np.ndarray = None


def _grid(h, w):
    X = np.empty((2, h * w))
    X[0] = np.tile(np.arange(w, dtype=np.float64), h)
    X[1] = np.repeat(np.arange(h, dtype=np.float64), w)
    return X


def _inside(P, H, W):
    return (P[0] >= 0) & (P[0] <= W - 1) & (P[1] >= 0) & (P[1] <= H - 1)


def _refuse_singular(A, what):
    d = np.diag(A)
    if not np.all(d > 0):
        raise ValueError(
            f"the Gauss-Newton Hessian of {what} is singular (a parameter moves no "
            "pixel of texture): the template is textureless along some warp direction"
        )
    s = 1 / np.sqrt(d)
    lam = np.linalg.eigvalsh(A * s[:, None] * s[None, :])
    if lam[0] < 1e-10 * lam[-1]:
        raise ValueError(
            f"the Gauss-Newton Hessian of {what} is singular (scaled condition "
            f"number {lam[-1] / max(lam[0], 1e-300):.1e} > 1e10): the template is "
            "textureless along some warp direction"
        )


def _photometric(Iw, T):
    """Gain a and bias b with T ~ (Iw - b) / a, by least squares of the template on
    the warped image: a weak correlation shrinks the corrected error rather than
    inflating it. Returns (a, b)."""
    Tc, Ic = T - T.mean(), Iw - Iw.mean()
    if not np.sum(Ic * Ic) > 1e-24 * np.sum(Iw * Iw):
        raise ValueError(
            "the warped image is constant over the template: its gain cannot be "
            "fitted and no warp can be estimated"
        )
    a = float(np.sum(Ic * Ic) / np.sum(Tc * Ic))
    if not a > 0:
        raise ValueError(
            f"the warped image is not positively correlated with the template "
            f"(gain {a:.3g}): the alignment has failed"
        )
    return a, float(Iw.mean() - a * T.mean())


def _project(S, T):
    """S minus its least-squares fit by [1, T]: the part of each column that a change
    of gain and bias cannot absorb (9.20)."""
    Q = np.stack([np.ones_like(T), T - T.mean()], axis=1)
    norms = np.sqrt(np.sum(Q * Q, axis=0))
    if not norms[1] > 1e-12 * norms[0]:
        raise ValueError(
            "the template is constant (textureless): its gain cannot be fitted and "
            "no warp can be estimated"
        )
    Q = Q / norms
    return S - Q @ (Q.T @ S)


def _level_fa(T, I, M, kind, max_iter, tol, photometric, min_overlap):
    """One pyramid level of forward-additive Lucas-Kanade (9.14)-(9.16)."""
    h, w = T.shape
    H, W = I.shape
    X = _grid(h, w)
    Tv = T.ravel()
    corners = np.array([[0, w - 1, w - 1, 0], [0, 0, h - 1, h - 1]], dtype=float)
    Ix, Iy = image_gradient(I)
    a, b, steps, converged, it = 1.0, 0.0, [], False, 0
    best, lam, u3_ok = None, 0.0, [None]

    def evaluate(M):
        P, u3 = _apply(M, X)
        ok = _inside(P, H, W)
        if ok.mean() < min_overlap:
            raise ValueError(
                f"the warp sends {100 * (1 - ok.mean()):.0f}% of the template outside "
                f"the image (at most {100 * (1 - min_overlap):.0f}% allowed)"
            )
        Iw = _bilinear(I, P[:, ok])
        u3_ok[0] = u3[ok]
        a, b = _photometric(Iw, Tv[ok]) if photometric else (1.0, 0.0)
        e = (Iw - b) / a - Tv[ok]  # the error image, photometrically corrected
        # the cost, scale-free: (1 - rho^2) / rho^2, rho the correlation
        Iwc = (Iw - Iw.mean()) / a if photometric else Tv[ok]
        return P, ok, a, b, e, float(np.sum(e * e) / np.sum(Iwc * Iwc))

    for it in range(1, max_iter + 1):
        try:
            P, ok, a, b, e, cost = evaluate(M)
        except ValueError:
            if best is None:  # the start itself: refuse
                raise
            cost = np.inf  # a trial step through infinity or out of the image
        if best is not None and not cost < best[1]:  # Levenberg-Marquardt: reject
            M, lam = best[0], max(10 * lam, 1e-4)
            A, g = best[2], best[3]
            if lam > 1e12:
                break
        else:
            lam = lam / 10 if lam > 1e-6 else 0.0
            # (9.15) written out: the gradient row times dW/dp of (9.13)
            (x, y), (Wx, Wy), u = X[:, ok], P[:, ok], a * u3_ok[0]
            gxw, gyw = _bilinear(Ix, P[:, ok]) / u, _bilinear(Iy, P[:, ok]) / u
            r = -(gxw * Wx + gyw * Wy)
            cols = [gxw * x, gxw * y, gxw, gyw * x, gyw * y, gyw, r * x, r * y]
            S = np.stack([cols[c] for c in _COLUMNS[kind]], axis=1)
            if photometric:
                S = _project(S, Tv[ok])
            A = S.T @ S
            _refuse_singular(A, "the warped image")
            g = -S.T @ e
            best = (M, cost, A, g, (a, b))
        dp = np.linalg.solve(A + lam * np.diag(np.diag(A)), g)
        M_new = warp_matrix(kind, warp_params(kind, M) + dp)
        try:
            M_new = M_new / M_new[2, 2]
            moved = _apply(M_new, corners)[0] - _apply(M, corners)[0]
            step = float(np.max(np.linalg.norm(moved, axis=0)))
        except (ValueError, ZeroDivisionError, FloatingPointError):
            step = np.inf
        steps.append(step)
        if step < tol:
            converged = True
            break
        M = M_new
    a, b = best[4]
    return best[0], converged, it, a, b, steps


def _sd(gx, gy, X, kind, out=None):
    """The steepest-descent rows s = grad^T dW/dp(x; 0) (9.18), transposed: (k, n)
    for gradients gx, gy (n,) at the points X (2, n), as dW/dp at p = 0 is (9.12)
    with u3 = 1 and W = x. Written into the first k rows of `out` when given."""
    x, y = X
    cols = _COLUMNS[kind]
    out = np.empty((len(cols), x.size)) if out is None else out
    if kind == "translation":
        out[0], out[1] = gx, gy
        return out[:2]
    np.multiply(gx, x, out=out[0])
    np.multiply(gx, y, out=out[1])
    out[2] = gx
    np.multiply(gy, x, out=out[3])
    np.multiply(gy, y, out=out[4])
    out[5] = gy
    if kind == "homography":
        r = -(out[0] + out[4])  # -(gx x + gy y)
        np.multiply(r, x, out=out[6])
        np.multiply(r, y, out=out[7])
    return out[: len(cols)]


def _gather(I, px, py):
    """Bilinear interpolation (9.1) of I (H, W) at (px, py), all inside, unchecked:
    one fused gather of the four corners."""
    H, W = I.shape
    x0 = np.minimum(px.astype(np.intp), W - 2)  # floor: px >= 0
    y0 = np.minimum(py.astype(np.intp), H - 2)
    fx, fy = px - x0, py - y0
    i = y0 * W + x0
    F = I.ravel()  # the four corners F[i], F[i + 1], F[i + W], F[i + W + 1], as views
    a, c = F[i], F[W:][i]
    top = a + fx * (F[1:][i] - a)
    bottom = c + fx * (F[W + 1 :][i] - c)
    return top + fy * (bottom - top)


def _gather_grad(I, px, py):
    """`_gather` and the exact gradient of the bilinear interpolant (9.1) there,
    from the same four corners: (value, d/dx, d/dy); on a grid line, where the
    interpolant has a kink, the one-sided derivative of the cell that gives the
    value."""
    H, W = I.shape
    x0 = np.minimum(px.astype(np.intp), W - 2)
    y0 = np.minimum(py.astype(np.intp), H - 2)
    fx, fy = px - x0, py - y0
    i = y0 * W + x0
    F = I.ravel()
    a, c = F[i], F[W:][i]
    d, d2 = F[1:][i] - a, F[W + 1 :][i] - c
    top = a + fx * d
    dy = c + fx * d2 - top
    return top + fy * dy, d + fy * (d2 - d), dy


def _sample(I, M, X, min_overlap, grad=False):
    """I(W(x)) at the template's pixels X for the warp matrix M, with no validation
    of I or X (done once in `align`). Returns (Iw, ok): ok is None when every pixel
    lands inside the image, else the mask of those that do (Iw is then sampled at the
    positions clamped to the image). With `grad`, returns (Iw, ok, gx, gy), gx, gy
    the exact gradient of x -> I(W(x)) for the bilinear interpolant (9.1): its
    gradient at W(x), from the same four corners, times the Jacobian of W at x.
    Raises ValueError when a pixel goes through infinity or too few land inside."""
    H, W = I.shape
    x, y = X
    u3 = M[2, 0] * x + M[2, 1] * y + M[2, 2]
    if not u3.min() > 0:
        raise ValueError(
            "the homography sends a point to infinity or through it (third "
            "homogeneous coordinate <= 0)"
        )
    px = (M[0, 0] * x + M[0, 1] * y + M[0, 2]) / u3
    py = (M[1, 0] * x + M[1, 1] * y + M[1, 2]) / u3
    ok = None
    if not (
        px.min() >= 0 and py.min() >= 0 and px.max() <= W - 1 and py.max() <= H - 1
    ):
        ok = (px >= 0) & (px <= W - 1) & (py >= 0) & (py <= H - 1)
        if ok.mean() < min_overlap:
            raise ValueError(
                f"the warp sends {100 * (1 - ok.mean()):.0f}% of the template "
                f"outside the image (at most {100 * (1 - min_overlap):.0f}% allowed)"
            )
        px, py = np.clip(px, 0, W - 1), np.clip(py, 0, H - 1)
    if not grad:
        return _gather(I, px, py), ok
    Iw, Ix, Iy = _gather_grad(I, px, py)
    Ix /= u3
    Iy /= u3
    # grad I(W) dW/dx, dW/dx = (M[:2, :2] - W M[2, :2]) / u3
    r = Ix * px + Iy * py
    gx = Ix * M[0, 0] + Iy * M[1, 0] - r * M[2, 0]
    gy = Ix * M[0, 1] + Iy * M[1, 1] - r * M[2, 1]
    return Iw, ok, gx, gy


def _centred(T):
    """T minus its mean, the norm of that, and the mean."""
    m = T.mean()
    Tc = T - m
    return Tc, np.sqrt(Tc @ Tc), m


def _normalise(Iw, Tc, nT):
    """The error of the correlation criterion (9.21): the warped image made zero-mean
    with the template's norm, minus the zero-mean template Tc (norm nT). Returns
    (e, Ic, nI, rho, mean of Iw); refuses a constant or anti-correlated warped
    image."""
    m = Iw.mean()
    Ic = Iw - m
    nI = np.sqrt(Ic @ Ic)
    if not nI > 1e-12 * np.sqrt(Iw @ Iw):
        raise ValueError(
            "the warped image is constant over the template: its gain cannot be "
            "fitted and no warp can be estimated"
        )
    rho = float(Ic @ Tc) / (nI * nT)
    if not rho > 0:
        raise ValueError(
            f"the warped image is not positively correlated with the template "
            f"(correlation {rho:.3g}): the alignment has failed"
        )
    return Ic * (nT / nI) - Tc, Ic, nI, rho, m


ROBUST = {"huber": 1.345, "tukey": 4.685}  # 95% efficiency at Gaussian noise


def _scale(e, T):
    """A robust scale of the residuals: 1.4826 times their median absolute value,
    floored at 1e-12 of the template's spread so that an exact fit divides by no 0."""
    mad = 1.4826 * float(np.median(np.abs(e)))
    return max(mad, 1e-12 * float(np.ptp(T)) + 1e-300)


def _robust_rho(kind, r):
    """rho(r) of (9.24): Huber's or Tukey's biweight, at the constant ROBUST[kind]."""
    c = ROBUST[kind]
    a = np.abs(r)
    if kind == "huber":
        return np.where(a <= c, 0.5 * r * r, c * a - 0.5 * c * c)
    return (c * c / 6) * (1 - np.clip(1 - (r / c) ** 2, 0, None) ** 3)


def _robust_weights(kind, r):
    """The weights w(r) = rho'(r) / r of (9.25)."""
    c = ROBUST[kind]
    a = np.abs(r)
    if kind == "huber":
        return np.minimum(1.0, c / np.maximum(a, 1e-300))
    return np.clip(1 - (r / c) ** 2, 0, None) ** 2


_STALL = 3.0  # a rejected step shorter than _STALL * tol ends a level
_POLISHED = 2  # how many of the finest levels `polish` solves by (9.23)


def _level_ic(
    T, I, M, kind, max_iter, tol, photometric, min_overlap, finish, first, robust
):
    """One pyramid level of inverse-compositional (9.17)-(9.19) Lucas-Kanade, or with
    `finish` forward-compositional (9.22)-(9.23), on the criterion (9.21): the warped
    image's gradient by central differences, or with `finish` "exact" the exact
    gradient of the bilinear interpolant through the warp (`_sample`). At the
    `first` (coarsest) level the template's Hessian is checked before any step.
    With `robust` ("huber" or "tukey") each step is reweighted, (9.24)-(9.25).

    Returns (M, converged, iterations, gain, bias, steps)."""
    h, w = T.shape
    X = _grid(h, w)
    Tv = T.ravel()
    k = _KINDS[kind]
    corners = np.array([[0, w - 1, w - 1, 0], [0, 0, h - 1, h - 1], [1, 1, 1, 1.0]])
    cols = np.array(_COLUMNS[kind])
    if not finish or first:  # (9.18): the steepest-descent rows and Hessian
        gx, gy = image_gradient(T)
        SD = _sd(gx.ravel(), gy.ravel(), X, kind)
        if photometric:
            SD = np.ascontiguousarray(_project(SD.T, Tv).T)
        Hess = SD @ SD.T
        _refuse_singular(Hess, "the template")  # before any step
    if finish:
        Hess = None  # the forward-compositional Hessian, from the first step
    if finish and photometric and not np.ptp(Tv) > 1e-12 * np.abs(Tv).max():
        raise ValueError(
            "the template is constant (textureless): its gain cannot be fitted and "
            "no warp can be estimated"
        )
    Tc0, nT0, mT0 = _centred(Tv)
    best, lam, steps, converged, it, sigma = None, 0.0, [], False, 0, None
    for it in range(1, max_iter + 1):
        try:
            if not np.all(np.isfinite(M)):  # a step that went through infinity
                raise ValueError("the warp matrix is not finite")
            if finish == "exact":
                Iw, ok, gxe, gye = _sample(I, M, X, min_overlap, grad=True)
            else:
                Iw, ok = _sample(I, M, X, min_overlap)
            Tk, Iwk = (Tv, Iw) if ok is None else (Tv[ok], Iw[ok])
            if photometric:
                Tc, nT, mT = (Tc0, nT0, mT0) if ok is None else _centred(Tk)
                e, Ic, nI, rho, mI = _normalise(Iwk, Tc, nT)
                cost = 2 - 2 * rho  # = |e|^2 / |Tc|^2
            else:
                e = Iwk - Tk
                cost = float(e @ e) / e.size
            if robust is not None:  # (9.24), at the scale of the last accepted step
                sigma = _scale(e, Tk) if sigma is None else sigma
                cost = float(np.mean(_robust_rho(robust, e / sigma)))
        except ValueError:
            if best is None:  # the start itself: refuse
                raise
            cost = np.inf  # a trial step through infinity or out of the image
        if best is not None and not cost < best[1]:  # Levenberg-Marquardt: reject
            M, lam = best[0], max(10 * lam, 1e-4)
            A, g = best[2], best[3]
            if finish:
                Hess = None  # rebuilt at the next accepted step
            if lam > 1e12:
                break
            if steps[-1] < _STALL * tol:  # too short to lower the error: done
                converged = True
                break
        else:
            lam = lam / 10 if lam > 1e-6 else 0.0
            if robust is not None:  # the scale and weights of this step (9.25)
                sigma = _scale(e, Tk)
                cost = float(np.mean(_robust_rho(robust, e / sigma)))
                wts = _robust_weights(robust, e / sigma)
            if robust is not None and not finish:
                S = SD if ok is None else SD[:, ok]
                if photometric and ok is not None:
                    S = _project(S.T, Tk).T
                A, g = (S * wts) @ S.T, S @ (wts * e)
                _refuse_singular(A, "the weighted template")
            elif not finish:  # (9.19)
                if ok is None:
                    A, g = Hess, SD @ e
                else:
                    S = SD[:, ok]
                    if photometric:
                        S = _project(S.T, Tk).T
                    A, g = S @ S.T, S @ e
            else:  # (9.23): the warped image's own gradient, exact at the finest
                if finish == "exact":  # level, by central differences above it
                    gx, gy = gxe, gye
                else:
                    gy, gx = np.gradient(Iw.reshape(h, w))
                    gx, gy = gx.ravel(), gy.ravel()
                Xk = X
                if ok is not None:
                    gx, gy, Xk = gx[ok], gy[ok], X[:, ok]
                C = np.empty((k + 3, e.size))
                _sd(gx, gy, Xk, kind, out=C)
                C[k], C[k + 1], C[k + 2] = 1 / np.sqrt(e.size), e, 0.0
                if photometric:
                    C[k + 2] = Ic / nI  # [1, Ic], orthonormal: (9.23) projects them out
                slow = len(steps) > 1 and steps[-1] > steps[-2] / 2
                if robust is not None:  # (9.25) with (9.23)'s rows, projected
                    S, s = C[:k], (nT / nI if photometric else 1.0)
                    if photometric:
                        S = S - (S @ C[k::2].T) @ C[k::2]
                    A, g = s * s * ((S * wts) @ S.T), -s * (S @ (wts * e))
                    _refuse_singular(A, "the weighted warped image")
                else:
                    if Hess is None or ok is not None or slow:  # refreshed if it lags
                        G = C @ C.T
                        A, Cq = G[:k, :k], G[:k, k:]
                    else:
                        A, Cq = Hess, C[:k] @ C[k:].T  # s^T [1, e, Ic / nI]
                    g = -Cq[:, 1]
                    if photometric:
                        s, Qe = nT / nI, (C[k::2] @ e)
                        QS = Cq[:, ::2].T
                        if A is not Hess:
                            A = s * s * (A - QS.T @ QS)
                        g = s * (g + QS.T @ Qe)
                    if A is not Hess:
                        _refuse_singular(A, "the warped image")
                        Hess = A if ok is None else Hess
            ab = (1.0, 0.0)
            if photometric:
                a = nI / (rho * nT)  # the fit of T on I(W): T ~ (I(W) - b) / a
                ab = (a, float(mI - a * mT))
            best = (M, cost, A, g, ab, None if robust is None else (wts, ok))
        dp = np.linalg.solve(A + lam * np.diag(np.diag(A)), g)
        Mdp = np.eye(3)
        Mdp.flat[cols] += dp  # M(dp) of (9.10)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if not finish:
                d = np.linalg.det(Mdp)
                Mdp = np.linalg.inv(Mdp) if abs(d) > 1e-12 else np.full((3, 3), np.nan)
            M_new = M @ Mdp  # (9.22), or (9.19) with the inverse
            M_new = M_new / M_new[2, 2]
            u, v = M_new @ corners, M @ corners
        if np.all(np.isfinite(u)) and np.all(u[2] > 0):
            moved = u[:2] / u[2] - v[:2] / v[2]
            step = float(np.sqrt(np.max(moved[0] ** 2 + moved[1] ** 2)))
        else:  # a corner through infinity: a step to reject
            step = np.inf
        steps.append(step)
        if step < tol:  # the last step is below tol pixels: take it and stop
            converged = True
            M = M_new
            break
        M = M_new
    if not converged:
        M = best[0]
    return M, converged, it, best[4][0], best[4][1], steps, best[5]


def _pyramid_levels(
    Ts, Is, M, kind, method, polish, robust, max_iter, tol, photometric, min_overlap
):
    """Coarse to fine over the pyramids Ts, Is from the coarsest level's warp M."""
    levels, total, steps, wts = len(Ts), 0, [], None
    for lev in range(levels - 1, -1, -1):
        options = (max_iter, tol if lev == 0 else 10 * tol, photometric, min_overlap)
        if method == "fa":
            M, converged, it, a, b, st = _level_fa(Ts[lev], Is[lev], M, kind, *options)
        else:
            finish = method == "fc" or (polish and lev < _POLISHED)
            if finish and lev == 0:  # (9.23) with the interpolant's exact gradient
                finish = "exact"
            M, converged, it, a, b, st, wts = _level_ic(
                Ts[lev], Is[lev], M, kind, *options, finish, lev == levels - 1, robust
            )
        total, steps = total + it, steps + st
        if lev:
            S2 = np.diag([2.0, 2.0, 1.0])
            M = S2 @ M @ np.linalg.inv(S2)
    return M, converged, total, a, b, steps, wts


def align(
    T,
    I,
    p0,
    kind="homography",
    method="ic",
    levels=1,
    max_iter=50,
    tol=1e-2,
    photometric=True,
    min_overlap=0.75,
    smooth=False,
    reach=None,
    polish=None,
    robust=None,
):
    """Lucas-Kanade alignment: find p with I(W(x; p)) ~ T(x) over the template's
    pixels x (template coordinates, (0, 0) its top-left pixel), by Gauss-Newton.

    method "ic" is inverse-compositional (9.17)-(9.19), "fc" forward-compositional
    (9.22)-(9.23), "fa" forward-additive (9.14)-(9.16). `levels` > 1 runs coarse to
    fine on a pyramid (each coarser level blurred and halved). With `photometric`
    the error is that of the correlation criterion (9.21), blind to a gain and bias
    of the image (for "fa": a gain and bias fitted at each step, (9.20)); without
    it, the plain difference (9.14). A step that raises the error is rejected and
    damped (Levenberg-Marquardt). A level stops when a step moves the template's
    corners less than `tol` pixels (10 `tol` at coarser levels), and takes that step,
    or when a rejected step was shorter than 3 `tol` (no step that short lowers the
    error: also counted as converged, for "ic" and "fc").
    Refuses a textureless template (singular Hessian) and a warp that sends more than
    1 - `min_overlap` of the template outside the image, with ValueError. Both T
    (h, w) and I (H, W) are gray images; `smooth` blurs the finest level too
    (binomial, 5 taps; off by default: a blur does not commute with a warp). Only
    the part of I within `reach` pixels (default: half the template's larger side) of
    the box the start warp sends the template to is used; beyond it counts as
    outside.

    `polish` (default: on for "ic") solves the two finest levels (the finest alone
    when `levels` is 1) forward-compositionally: the inverse-compositional step rests
    on the template's gradient, noisy when the template is, and its fixed point
    carries that noise; the forward-compositional step uses the gradient of the
    warped image (at the finest level the exact gradient of the bilinear interpolant
    through the warp, at coarser ones central differences of the warped image).
    BLAS runs on one thread inside (`derivlib._threads.one_blas_thread`): its
    products are k x n by n x k with k <= 11, too small for a second thread to pay.

    `robust` ("huber" or "tukey", not with "fa") reweights every step by the
    residuals (9.24)-(9.25), so that occluded or changed pixels count less; the
    result's `weights` are those of the last accepted step at the finest level
    (0 outside the image)."""
    T, I = _image(T, "T"), _image(I, "I")
    if T.ndim != 2 or I.ndim != 2:
        raise ValueError(
            f"align needs gray images (h, w) and (H, W), got {T.shape}, {I.shape}"
        )
    if method not in ("ic", "fc", "fa"):
        raise ValueError(f"method must be 'ic', 'fc' or 'fa', got {method!r}")
    if robust is not None and (robust not in ROBUST or method == "fa"):
        raise ValueError(
            f"robust must be None or one of {sorted(ROBUST)} (with method 'ic' or "
            f"'fc'), got {robust!r} with method {method!r}"
        )
    if not (isinstance(levels, (int, np.integer)) and levels >= 1):
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    if polish not in (None, True, False):
        raise ValueError(f"polish must be None, True or False, got {polish!r}")
    if not (isinstance(max_iter, (int, np.integer)) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive number of pixels, got {tol!r}")
    if not 0 < min_overlap <= 1:
        raise ValueError(f"min_overlap must be in (0, 1], got {min_overlap!r}")
    if min(T.shape) >> (levels - 1) < 4:
        raise ValueError(
            f"a template of shape {T.shape} is too small for {levels} pyramid levels"
        )
    # a common power of two brings the values near 1 (exact: it changes no digit)
    # so that squares neither overflow nor underflow; the bias is scaled back
    top = max(np.abs(T).max(), np.abs(I).max())
    scale = 2.0 ** np.floor(np.log2(top)) if top > 0 else 1.0
    T, I = T / scale, I / scale
    M = warp_matrix(kind, p0)
    # look only within `reach` pixels of where the start puts the template
    h, w = T.shape
    reach = max(h, w) // 2 if reach is None else int(reach)
    corners = np.array([[0, w - 1, w - 1, 0], [0, 0, h - 1, h - 1]], dtype=float)
    box = _apply(M, corners)[0]
    x_lo = int(np.clip(np.floor(box[0].min()) - reach, 0, I.shape[1] - 2))
    y_lo = int(np.clip(np.floor(box[1].min()) - reach, 0, I.shape[0] - 2))
    x_hi = int(np.clip(np.ceil(box[0].max()) + reach, x_lo + 1, I.shape[1] - 1))
    y_hi = int(np.clip(np.ceil(box[1].max()) + reach, y_lo + 1, I.shape[0] - 1))
    I = I[y_lo : y_hi + 1, x_lo : x_hi + 1]
    shift = warp_matrix("translation", np.array([x_lo, y_lo], dtype=float))
    M = np.linalg.inv(shift) @ M
    polish = (method == "ic") if polish is None else bool(polish)
    Ts, Is = pyramid(T, levels, smooth), pyramid(I, levels, smooth)
    S = np.diag([0.5 ** (levels - 1), 0.5 ** (levels - 1), 1.0])
    M = S @ M @ np.linalg.inv(S)
    with one_blas_thread():
        M, converged, total, a, b, steps, wts = _pyramid_levels(
            Ts, Is, M, kind, method, polish, robust, max_iter, tol, photometric,
            min_overlap,
        )  # fmt: skip
    weights = None
    if robust is not None:
        weights = np.zeros(T.size)
        weights[slice(None) if wts[1] is None else wts[1]] = wts[0]
        weights = weights.reshape(T.shape)
    M = shift @ M
    M = M / M[2, 2]
    return AlignResult(
        warp_params(kind, M), M, converged, total, a, b * scale, steps, weights
    )


def corner_error(M_est, M_true, shape):
    """Mean distance (pixels) between the template's four corners mapped by the two
    warps; `shape` is the template's (h, w)."""
    M_est, M_true = _same(M_est, (3, 3), "M_est"), _same(M_true, (3, 3), "M_true")
    if not (np.all(np.isfinite(M_est)) and np.all(np.isfinite(M_true))):
        raise ValueError("corner_error needs finite warp matrices")
    h, w = shape
    corners = np.array([[0, w - 1, w - 1, 0], [0, 0, h - 1, h - 1]], dtype=float)
    a, _ = _apply(M_est, corners)
    b, _ = _apply(M_true, corners)
    return float(np.mean(np.linalg.norm(a - b, axis=0)))


def homography_from_corners(src, dst):
    """The homography (3 x 3, M[2, 2] = 1) sending the 4 points src (2, 4) to dst
    (2, 4), by the direct linear transform."""
    src, dst = _same(src, (2, 4), "src"), _same(dst, (2, 4), "dst")
    for name, Q in (("src", src), ("dst", dst)):
        if not np.all(np.isfinite(Q)):
            raise ValueError(f"{name} has non-finite coordinates")
        side = max(np.ptp(Q[0]), np.ptp(Q[1]))
        for k in range(4):  # the triangle left when point k is dropped
            a, b, c = np.delete(Q, k, axis=1).T
            area = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
            if not abs(area) > 1e-9 * side**2:
                raise ValueError(
                    f"three of the {name} points are collinear (or coincide): "
                    f"no homography is determined, got {Q.tolist()}"
                )
    A, rhs = [], []
    for (x, y), (u, v) in zip(src.T, dst.T):
        A.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        A.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    h = np.linalg.solve(np.array(A), np.array(rhs))
    return np.append(h, 1.0).reshape(3, 3)


def make_pair(I, origin, size, max_shift, rng, noise=0.02, gain=(0.8, 1.2),
              bias=(-0.1, 0.1)):  # fmt: skip
    """A template cut from the photograph I by a random homography: the corners of
    the square of side `size` at `origin` (x, y) are each moved by up to `max_shift`
    pixels in x and y; the template is gain * I(W(x; p_true)) + bias + noise.

    Returns (T, M_true, M_start), M_start being the unperturbed translation."""
    I = _image(I)
    s = size - 1
    sq = np.array([[0, s, s, 0], [0, 0, s, s]], dtype=float)
    dst = sq + np.asarray(origin, dtype=float)[:, None]
    dst = dst + rng.uniform(-max_shift, max_shift, size=(2, 4))
    M_true = homography_from_corners(sq, dst)
    P, _ = _apply(M_true, _grid(size, size))
    T = bilinear(I, P).reshape(size, size)
    T = rng.uniform(*gain) * T + rng.uniform(*bias)
    T = T + noise * rng.standard_normal(T.shape)
    M_start = warp_matrix("translation", np.asarray(origin, dtype=float))
    return T, M_true, M_start


# ----- Dense motion: windowed Lucas-Kanade at every pixel, (9.29)-(9.33) -----


@dataclass
class FlowResult:
    """The flow found by `lucas_kanade_flow`.

    flow (2, H, W): flow[0] = u (along x, columns), flow[1] = v (along y, rows), so
    that I1(x + u, y + v) ~ I0(x, y). min_eigenvalue (H, W): the smaller eigenvalue
    (9.32) of each pixel's structure tensor at the last step of the finest level.
    reported (H, W), bool: the pixels where it was below `threshold` there (the
    aperture problem (9.33)): their flow is only the part the tensor determines (the
    normal flow on an edge, the coarser level's flow on a textureless patch).
    threshold: rtol times the largest trace of I0's structure tensor. levels: the
    pyramid's levels used. min_eigenvalue and threshold are in the units of the
    images squared; for images near the limits of float64 they can overflow to inf or
    underflow to 0, but `reported` is decided on the images scaled near 1."""

    flow: np.ndarray
    min_eigenvalue: np.ndarray
    reported: np.ndarray
    threshold: float
    levels: int


def _flow_kernel(window, radius):
    """The window's weights along one axis, j = -radius..radius, summing to 1: the
    2-D window w of (9.29) is their outer product."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.ones_like(t) if window == "box" else np.exp(-0.5 * (t / (radius / 2)) ** 2)
    return k / k.sum()


def _flow_filter(A, k):
    """Separable correlation of the last two axes of A with the symmetric 1-D kernel
    k, zeros outside the image: the window sums of (9.31) over the pixels inside the
    image only. scipy.ndimage's correlate1d when scipy is installed; otherwise
    shifted slices, the taps at +-j added before the one multiply."""
    r = len(k) // 2
    for axis in (A.ndim - 2, A.ndim - 1):
        if _ndimage is not None:
            A = _ndimage.correlate1d(A, k, axis=axis, mode="constant", cval=0.0)
            continue
        n = A.shape[axis]
        pad = [(0, 0)] * A.ndim
        pad[axis] = (r, r)
        P = np.moveaxis(np.pad(A, pad), axis, 0)
        out = k[r] * P[r : r + n]
        tmp = np.empty_like(out)
        for j in range(r):
            np.add(P[j : j + n], P[2 * r - j : 2 * r - j + n], out=tmp)
            tmp *= k[j]
            out += tmp
        A = np.moveaxis(out, 0, axis)
    return A


def _flow_reduce(I):
    """Blur with the binomial kernel [1, 4, 6, 4, 1] / 16 (border replicated) and
    keep every other pixel: the next level of the pyramid."""
    k = np.array([1, 4, 6, 4, 1]) / 16
    P = np.pad(I, 2, mode="edge")
    H, W = I.shape
    P = sum(kj * P[j : j + H, :] for j, kj in enumerate(k))
    P = sum(kj * P[:, j : j + W] for j, kj in enumerate(k))
    return P[::2, ::2]


def _flow_sample(I, X, Y):
    """Bilinear value (9.1) of I at (X, Y), the positions clamped to the image, and
    a mask of the positions that needed no clamping."""
    H, W = I.shape
    inside = (X >= 0) & (X <= W - 1) & (Y >= 0) & (Y <= H - 1)
    X, Y = np.clip(X, 0, W - 1), np.clip(Y, 0, H - 1)
    x0 = np.minimum(np.floor(X), W - 2).astype(np.intp)
    y0 = np.minimum(np.floor(Y), H - 2).astype(np.intp)
    fx, fy = X - x0, Y - y0
    F = I.ravel()
    i = y0 * W + x0
    top = F[i] + fx * (F[i + 1] - F[i])
    bottom = F[i + W] + fx * (F[i + W + 1] - F[i + W])
    return top + fy * (bottom - top), inside


def _flow_step(I0, I1, flow, k, threshold):
    """One Gauss-Newton step at every pixel: the window sums (9.31) of the structure
    tensor A and of the right side h, and the step (9.33): A^-1 h where both
    eigenvalues (9.32) reach `threshold`, the component along v1 alone where only
    the larger does, nothing where neither does. Returns (delta, lambda_min)."""
    H, W = I0.shape
    ys, xs = np.mgrid[0:H, 0:W]
    Iw, inside = _flow_sample(I1, xs + flow[0], ys + flow[1])
    gy, gx = np.gradient(Iw)  # g: the gradient of I1 at x + u0(x), central differences
    m = inside.astype(np.float64)  # a match outside the image leaves the window
    gx, gy = gx * m, gy * m
    t = (gx * flow[0] + gy * flow[1] - (Iw - I0)) * m  # g^T u0 - e of (9.31)
    a, b, c, cx, cy = _flow_filter(
        np.stack([gx * gx, gx * gy, gy * gy, gx * t, gy * t]), k
    )
    hx = cx - (a * flow[0] + b * flow[1])  # h = c - A u0(x)
    hy = cy - (b * flow[0] + c * flow[1])
    half, gap = (a + c) / 2, np.sqrt(((a - c) / 2) ** 2 + b * b)
    lmax, lmin = half + gap, half - gap  # (9.32)
    # both eigenvalues above the threshold (most pixels): (9.33) is A^-1 h
    full = lmin >= threshold
    det = np.where(full, a * c - b * b, 1.0)
    dx = np.where(full, (c * hx - b * hy) / det, 0.0)
    dy = np.where(full, (a * hy - b * hx) / det, 0.0)
    one = ~full & (lmax >= threshold)  # only v1 determined: the normal flow
    if one.any():
        a, b, c, hx, hy, l1 = a[one], b[one], c[one], hx[one], hy[one], lmax[one]
        # v1 is along (b, l1 - a) or (l1 - c, b), the longer of the two
        p1, q1, p2, q2 = b, l1 - a, l1 - c, b
        n1, n2 = np.hypot(p1, q1), np.hypot(p2, q2)
        first = n1 >= n2
        p = np.where(first, p1, p2) / np.maximum(n1, n2)
        q = np.where(first, q1, q2) / np.maximum(n1, n2)
        c1 = (p * hx + q * hy) / l1
        dx[one], dy[one] = c1 * p, c1 * q
    return np.stack([dx, dy]), lmin


def lucas_kanade_flow(
    I0,
    I1,
    *,
    radius=7,
    window="gaussian",
    levels=None,
    iterations=10,
    rtol=1e-5,
    flow0=None,
):
    """Dense optical flow by windowed Lucas-Kanade at every pixel (9.29)-(9.33),
    coarse to fine with warping: the flow (u, v) with I1(x + u, y + v) ~ I0(x, y).

    Each pixel's flow minimises the window-weighted brightness-constancy error (9.29)
    over the pixels around it; a Gauss-Newton step linearises each pixel of the
    window about where the current flow sends it (9.30) and solves the 2 x 2 normal
    equations (9.31) with the structure tensor summed over the window. A direction
    whose eigenvalue (9.32) is below `rtol` times the largest trace of the structure
    tensor of I0 over the image is not updated (9.33), and its pixels are reported in
    the result (`reported`), never filled with NaN.

    I0, I1: gray images (H, W), the same shape. radius: the window has 2 radius + 1
    pixels a side; window "gaussian" (sigma = radius / 2, cut at radius) or "box".
    levels: the pyramid's levels (default: halve while the smaller side stays at
    least 16 pixels and the window fits). iterations: Gauss-Newton steps (warps) per
    level. flow0: the starting flow (2, H, W) at full size (default zero).
    Returns a `FlowResult`."""
    I0, I1 = _image(I0, "I0"), _image(I1, "I1")
    if I0.ndim != 2 or I1.ndim != 2:
        raise ValueError(
            f"lucas_kanade_flow needs gray images (H, W), got {I0.shape} and {I1.shape}"
        )
    if I0.shape != I1.shape:
        raise ValueError(
            f"I0 and I1 must have the same shape, got {I0.shape} and {I1.shape}"
        )
    if window not in ("gaussian", "box"):
        raise ValueError(f"window must be 'gaussian' or 'box', got {window!r}")
    if not (isinstance(radius, (int, np.integer)) and radius >= 1):
        raise ValueError(f"radius must be a positive integer, got {radius!r}")
    size = 2 * radius + 1
    if size > min(I0.shape):
        raise ValueError(
            f"a window of {size} x {size} pixels (radius {radius}) does not fit in "
            f"an image of shape {I0.shape}"
        )
    if not (isinstance(iterations, (int, np.integer)) and iterations >= 1):
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if not (np.isfinite(rtol) and 0 < rtol < 1):
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    # a common power of two brings the values near 1 (exact: it changes no digit of
    # the flow) so that products of gradients neither overflow nor underflow
    top = max(np.abs(I0).max(), np.abs(I1).max())
    scale = 2.0 ** np.floor(np.log2(top)) if top > 0 else 1.0
    I0, I1 = I0 / scale, I1 / scale
    if levels is None:
        levels = 1
        while min(I0.shape) >> levels >= max(16, size):
            levels += 1
    if not (isinstance(levels, (int, np.integer)) and levels >= 1):
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    if min(I0.shape) >> (levels - 1) < size:
        raise ValueError(
            f"an image of shape {I0.shape} is too small for {levels} levels with a "
            f"window of {size} x {size} pixels"
        )
    if flow0 is not None:
        flow0 = _same(flow0, (2,) + I0.shape, "flow0")
        if not np.all(np.isfinite(flow0)):
            raise ValueError("flow0 has non-finite entries")
    k = _flow_kernel(window, radius)
    P0, P1 = [I0], [I1]
    for _ in range(levels - 1):
        P0.append(_flow_reduce(P0[-1]))
        P1.append(_flow_reduce(P1[-1]))
    if flow0 is None:
        flow = np.zeros((2,) + P0[-1].shape)
    else:  # the start, sampled at the coarsest level's pixels and scaled with them
        step = 2 ** (levels - 1)
        flow = flow0[:, ::step, ::step] / step
    for lev in range(levels - 1, -1, -1):
        J0, J1 = P0[lev], P1[lev]
        if flow.shape[1:] != J0.shape:  # from the coarser level: twice the flow
            ys, xs = np.mgrid[0 : J0.shape[0], 0 : J0.shape[1]] / 2
            flow = 2 * np.stack([_flow_sample(f, xs, ys)[0] for f in flow])
        gy, gx = np.gradient(J0)
        trace = _flow_filter((gx * gx + gy * gy)[None], k)[0]
        threshold = rtol * float(trace.max()) if trace.max() > 0 else np.inf
        for _ in range(iterations):
            delta, lmin = _flow_step(J0, J1, flow, k, threshold)
            flow = flow + delta
    reported = lmin < threshold
    with np.errstate(over="ignore", under="ignore"):  # in the units of I0 squared
        lmin, threshold = lmin * scale * scale, threshold * scale * scale
    return FlowResult(flow, lmin, reported, threshold, levels)
