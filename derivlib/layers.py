"""Chapter 5: the layers of a vision network, with backward rules read off
differentials.

Images are NCHW arrays (batch, channels, height, width) and kernels OIHW (output
channels, input channels, height, width), JAX's default for
``lax.conv_general_dilated``. The derivations use matrices instead: one image
``x`` of shape (C, H, W) is the pixels-by-channels matrix ``image_matrix(x)`` of
shape (HW, C), pixels numbered row by row, and the column-major vec of that matrix
is ``x.ravel()``. That is the one place where the two layouts meet.

As in Chapter 4, ``<name>_jvp(*primals, *tangents, **options)`` is the differential
and ``<name>_vjp(*primals, G, **options)`` its adjoint (a tuple with several inputs),
both in the shapes of the forward function; options such as ``stride``, ``size``,
``eps`` and ``mask`` are keyword-only, in the forward functions too. Each JVP is
written from the forward differential, independently of its VJP (they share forward
values, never a derivative helper), so that the dot-product test compares two
derivations. Every rule refuses a non-finite primal, tangent or cotangent with a
ValueError naming the argument at fault (``dX``, ``dK``, ``G``, ...).

Max pooling: where a window holds its maximum more than once, the whole derivative
goes to the first maximum in row-major order inside the window, as in JAX's
``lax.reduce_window`` max and its VJP (JAX's JVP does the same without padding, but
with padding it can give a tied window the increment of another of its maxima)."""

import functools

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._validate import (
    as_array_of_shape,
    as_cotangent,
    as_finite_array,
    as_float_array,
    as_label_columns,
    as_positive_float,
    as_positive_int,
    as_seed,
    require_no_nan,
)
from .backprop import matmul_vjp
from .vector import _log_softmax, softmax


def _finite_results(rule):
    """Run `rule` without overflow warnings and refuse a result that is not finite.

    With finite inputs (every rule checks them), an infinity or a NaN in the result
    means that a product or a sum left float64 (entries near 1e154 and above); the
    rule then raises ValueError rather than return inf, or NaN from inf - inf."""

    @functools.wraps(rule)
    def checked(*args, **options):
        with np.errstate(over="ignore", invalid="ignore"):
            out = rule(*args, **options)
        parts = out if isinstance(out, tuple) else (out,)
        if not all(np.all(np.isfinite(a)) for a in parts if a is not None):
            largest = max(
                (float(np.max(np.abs(a))) for a in map(_as_floats, args) if a.size),
                default=float("nan"),
            )
            raise ValueError(
                f"{rule.__name__} overflows float64: its result is not finite (the "
                f"largest input entry is {largest:.3g})"
            )
        return out

    return checked


def _as_floats(a):
    try:
        return np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError):
        return np.empty(0)


# ----- Layout: NCHW images and the matrices of the derivations -----


def image_matrix(x):
    """The (HW, C) pixels-by-channels matrix of one image x of shape (C, H, W).

    Its column-major vec is x.ravel(): vec of the matrix = the NCHW image read in order.
    """
    x = as_float_array(x, "x", 3)
    return x.reshape(x.shape[0], -1).T


def kernel_matrix(K):
    """The (C kh kw, O) filter matrix F of eq. 5.2 from OIHW kernels K."""
    K = as_float_array(K, "K", 4)
    return K.reshape(K.shape[0], -1).T


# ----- Convolution as a matrix product -----


def conv_output_size(size, k, stride, padding):
    """(size + 2 padding - k) // stride + 1, the output length of eq. 5.1."""
    return (size + 2 * padding - k) // stride + 1


def im2col(X, kh, kw, *, stride=1, padding=0, dilation=1):
    """The patch matrix phi(X) of eqs. 5.2 and 5.25 for a batch, (N H'W', C kh kw).

    Row (n, i, j) is the patch of output pixel (i, j) of image n (images stacked, pixels
    row by row); column (c, u, v) holds pixel (i stride + u dilation, j stride + v
    dilation) of channel c of the padded image. `padding` is p, (p_h, p_w) or ((top,
    bottom), (left, right)); zero padding is explicit. The array is the transpose of
    a contiguous (C kh kw, N H'W') array, the layout in which the backward products
    are single matrix products.
    """
    X = _images(X, "X")
    kh, kw, stride, pads, d, Ho, Wo = _conv_geometry(
        X.shape, kh, kw, stride, padding, dilation
    )
    N, C = X.shape[:2]
    Xp = np.pad(X, ((0, 0), (0, 0)) + pads) if any(sum(pads, ())) else X
    span = ((kh - 1) * d + 1, (kw - 1) * d + 1)
    win = sliding_window_view(Xp, span, axis=(2, 3))[:, :, ::stride, ::stride, ::d, ::d]
    return win.transpose(1, 4, 5, 0, 2, 3).reshape(C * kh * kw, N * Ho * Wo).T


def col2im(cols, x_shape, kh, kw, *, stride=1, padding=0, dilation=1):
    """The adjoint of im2col, eq. 5.6: scatter patch entries back to their pixels,
    the overlaps adding. cols has im2col's shape (N H'W', C kh kw); returns x_shape
    (NCHW)."""
    N, C, H, W = _shape4(x_shape)
    kh, kw, stride, pads, d, Ho, Wo = _conv_geometry(
        (N, C, H, W), kh, kw, stride, padding, dilation
    )
    cols = as_finite_array(cols, "cols", 2)
    if cols.shape != (N * Ho * Wo, C * kh * kw):
        raise ValueError(
            f"cols must have shape {(N * Ho * Wo, C * kh * kw)} for images {x_shape}, "
            f"got {cols.shape}"
        )
    (top, bottom), (left, right) = pads
    D = cols.T.reshape(C, kh, kw, N, Ho, Wo)
    Xp = np.zeros((C, N, H + top + bottom, W + left + right))
    for u in range(kh):
        for v in range(kw):
            Xp[
                :,
                :,
                u * d : u * d + stride * (Ho - 1) + 1 : stride,
                v * d : v * d + stride * (Wo - 1) + 1 : stride,
            ] += D[:, u, v]
    return Xp[:, :, top : top + H, left : left + W].transpose(1, 0, 2, 3).copy()


def im2col_matrix(x_shape, kh, kw, *, stride=1, padding=0, dilation=1):
    """The 0/1 selection matrix Phi of eq. 5.3, vec phi(x) = Phi vec x, for one image.

    x_shape is (C, H, W); Phi has shape (H'W' C kh kw, C H W) and is dense (for small
    images): at most one 1 per row, and a zero row where a patch entry is padding.
    """
    C, H, W = _shape3(x_shape)
    n = C * H * W
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    # im2col of every basis image e_q at once: phi(e_q) is block q of the rows
    phis = im2col(np.eye(n).reshape(n, C, H, W), kh, kw, **geometry)
    P = phis.shape[0] // n
    # column q of Phi is vec phi(e_q), the (P, C kh kw) block read column by column
    return phis.reshape(n, P, -1).transpose(0, 2, 1).reshape(n, -1).T.copy()


@_finite_results
def conv2d(X, K, *, stride=1, padding=0, dilation=1, groups=1):
    """Cross-correlation (no kernel flip) with zero padding, eqs. 5.1, 5.2 and 5.25.

    X (N, C, H, W), K (O, C / groups, kh, kw) -> Y (N, O, H', W'); per image and
    group g, Y_ng = phi(x_ng) F_g, where x_ng holds the C / groups channels of group g
    and F_g the O / groups filters of group g (groups = C: depthwise). `padding` is
    p, (p_h, p_w) or ((top, bottom), (left, right)); `dilation` spaces the kernel's
    taps.
    """
    X, K, groups = _conv_pair(X, K, groups)
    kh, kw = K.shape[2:]
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    Ho, Wo = _out_hw(X, K, stride, padding, dilation)
    N, O = X.shape[0], K.shape[0]
    Cg, Og = X.shape[1] // groups, O // groups
    Y = np.empty((N, O, Ho, Wo))
    for g in range(groups):
        phi = im2col(X[:, g * Cg : (g + 1) * Cg], kh, kw, **geometry)
        YT = kernel_matrix(K[g * Og : (g + 1) * Og]).T @ phi.T  # (phi F_g)^T
        Y[:, g * Og : (g + 1) * Og] = YT.reshape(Og, N, Ho, Wo).transpose(1, 0, 2, 3)
    return Y


@_finite_results
def conv2d_jvp(X, K, dX, dK, *, stride=1, padding=0, dilation=1, groups=1):
    """dY = conv(dX, K) + conv(X, dK): the layer is bilinear (eqs. 5.4 and 5.25)."""
    X, K, groups = _conv_pair(X, K, groups)
    dX, dK = _like(dX, X, "dX"), _like(dK, K, "dK")
    geometry = {
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
    }
    return conv2d(dX, K, **geometry) + conv2d(X, dK, **geometry)


@_finite_results
def conv2d_vjp(X, K, G, *, stride=1, padding=0, dilation=1, groups=1, input_grad=True):
    """The backward rules of eqs. 5.5, 5.6 and 5.25: (Xbar, Kbar) for the cotangent G
    (N, O, H', W').

    Kbar: F bar = phi(X)^T G (images stacked).  Xbar: vec xbar = Phi^T vec(G F^T),
    i.e. col2im of G F^T; group by group. With stride 1, dilation 1, one group and
    the same padding on every side the same sums are taken by eq. 5.20, a group of
    images at a time, in a form chosen by shape (`_conv2d_vjp_shifts`): with C kh kw
    >= 36 patch rows one kernel offset at a time, without forming phi(X); with fewer
    (one input channel, as for the digits) through the patch matrix of the group,
    one matrix product per rule. With input_grad=False, Xbar is not
    computed and None is returned in its place (for a first layer, whose input is
    data)."""
    X, K, groups = _conv_pair(X, K, groups)
    N, O = X.shape[0], K.shape[0]
    _, _, stride, pads, dilation, Ho, Wo = _conv_geometry(
        X.shape, K.shape[2], K.shape[3], stride, padding, dilation
    )
    G = _cotangent(G, (N, O, Ho, Wo))
    if stride == 1 and dilation == 1 and groups == 1 and len(set(sum(pads, ()))) == 1:
        return _conv2d_vjp_shifts(X, K, G, pads[0][0], input_grad)
    return _conv2d_vjp_im2col(X, K, G, stride, pads, input_grad, dilation, groups)


def _conv2d_vjp_im2col(X, K, G, stride, padding, input_grad=True, dilation=1, groups=1):
    """Eqs. 5.5 and 5.6 as written, group by group: one product with phi(X), and
    col2im of G F^T."""
    O, kh, kw = K.shape[0], K.shape[2], K.shape[3]
    Cg, Og = X.shape[1] // groups, O // groups
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    Kbar = np.empty(K.shape)
    Xbar = np.empty(X.shape) if input_grad else None
    for g in range(groups):
        Xg = X[:, g * Cg : (g + 1) * Cg]
        GT = G[:, g * Og : (g + 1) * Og].transpose(1, 0, 2, 3).reshape(Og, -1)  # G^T
        phi = im2col(Xg, kh, kw, **geometry)  # (N H'W', C/groups kh kw)
        Kbar[g * Og : (g + 1) * Og] = (GT @ phi).reshape(Og, Cg, kh, kw)  # eq. 5.5
        if input_grad:
            F = kernel_matrix(K[g * Og : (g + 1) * Og])  # (C/groups kh kw, O/groups)
            Xbar[:, g * Cg : (g + 1) * Cg] = col2im(
                (F @ GT).T, Xg.shape, kh, kw, **geometry
            )  # eq. 5.6: Phi^T vec(G F^T)
    return Xbar, Kbar


@_finite_results
def conv2d_bias(X, K, b, *, stride=1, padding=0, dilation=1, groups=1):
    """Eq. 5.25: conv2d(X, K, ...) + b, the bias b (O,) added to every pixel of output
    channel o."""
    X, K, b = _conv_bias_args(X, K, b)
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    return conv2d(X, K, groups=groups, **geometry) + b[None, :, None, None]


@_finite_results
def conv2d_bias_jvp(X, K, b, dX, dK, db, *, stride=1, padding=0, dilation=1, groups=1):
    """Eq. 5.25: dY = conv(dX, K) + conv(X, dK) + db at every pixel."""
    X, K, b = _conv_bias_args(X, K, b)
    db = _like(db, b, "db")
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    dY = conv2d_jvp(X, K, dX, dK, groups=groups, **geometry)
    return dY + db[None, :, None, None]


@_finite_results
def conv2d_bias_vjp(
    X, K, b, G, *, stride=1, padding=0, dilation=1, groups=1, input_grad=True
):
    """Eq. 5.25: (Xbar, Kbar, bbar), with (Xbar, Kbar) of `conv2d_vjp` and bbar = the
    sum of G over the images and pixels of each channel."""
    X, K, b = _conv_bias_args(X, K, b)
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    Xbar, Kbar = conv2d_vjp(
        X, K, G, groups=groups, input_grad=input_grad, **geometry
    )  # G is checked here
    return Xbar, Kbar, np.asarray(G, dtype=np.float64).sum(axis=(0, 2, 3))


# The forms of eq. 5.20 and the size of the pieces it is taken in (see
# `_conv2d_vjp_shifts`): the patch form below this many patch rows C kh kw, the
# offset form from it on; and the bytes of the arrays one group of images works in,
# a quarter of a core's level-2 cache on the machine we measured (2 MiB), so that the
# products read what the copies have just written.
_PATCH_ROWS_MAX = 36
_CHUNK_BYTES = 1 << 19


def _conv2d_form(C, kh, kw):
    """The form of eq. 5.20 that `_conv2d_vjp_shifts` takes for C channels under a
    kh x kw kernel: "patches" below `_PATCH_ROWS_MAX` patch rows C kh kw, else
    "offsets"."""
    return "patches" if C * kh * kw < _PATCH_ROWS_MAX else "offsets"


def _conv2d_vjp_shifts(X, K, G, padding, input_grad=True, *, form=None):
    """Eq. 5.20, stride 1: the padded images laid end to end, one row per channel (a
    strip); the patch entries of kernel offset (u, v) are then the strip shifted by
    u W_p + v, a slice, and G sits at the top-left H' x W' of each padded frame
    (zeros elsewhere).

    The batch is taken a group of images at a time, as many as keep the group's strips
    and products within `_CHUNK_BYTES`, so that each strip is read from the cache by
    the products that follow its copy. Within a group, one of two forms, chosen by
    shape (`form` None), or forced with form="offsets" or form="patches":

    - "offsets", for C kh kw >= `_PATCH_ROWS_MAX` patch rows: k_h k_w products per
      rule with the shifted slices, no copies (eq. 5.20 as written);
    - "patches", for fewer (one input channel, as for the digits): with C small,
      those products are matrix-vector products, so the k_h k_w shifted slices are
      copied into the group's patch matrix (C k_h k_w rows, im2col of the group), and
      each rule is one matrix product: K bar += G~ phi^T, and D = F G~ (the patch
      gradients) added back slice by slice."""
    N, C, H, W = X.shape
    O, _, kh, kw = K.shape
    if form is None:
        form = _conv2d_form(C, kh, kw)
    Hp, Wp = H + 2 * padding, W + 2 * padding
    Ho, Wo, frame = Hp - kh + 1, Wp - kw + 1, Hp * Wp
    halo = (kh - 1) * Wp + (kw - 1)  # strip positions at the end without a patch
    # bytes per image: the strips of X, G and X bar, then the patch matrix and the
    # patch gradients (patches) or one product's block (offsets)
    work = 2 * C * kh * kw if form == "patches" else C
    per_image = 8 * frame * (2 * C + O + work)
    b = int(max(1, min(N, _CHUNK_BYTES // per_image)))
    Xs_b, Gs_b = np.zeros((C, b, Hp, Wp)), np.zeros((O, b, Hp, Wp))
    inner = (slice(None), slice(None), slice(padding, padding + H))
    inner += (slice(padding, padding + W),)
    Kbar = np.zeros((O, C * kh * kw) if form == "patches" else K.shape)
    Xbar = np.empty(X.shape) if input_grad else None
    if form == "patches":
        F = K.reshape(O, C * kh * kw)
    else:
        KT = np.ascontiguousarray(K.transpose(2, 3, 1, 0))  # K[:, :, u, v]^T
    for n0 in range(0, N, b):
        m = min(b, N - n0)
        T = m * frame
        L = T - halo  # positions t whose patch fits: every output pixel among them
        Xs, Gs = Xs_b[:, :m], Gs_b[:, :m]  # the padding stays zero across groups
        Xs[inner] = X[n0 : n0 + m].transpose(1, 0, 2, 3)
        Gs[:, :, :Ho, :Wo] = G[n0 : n0 + m].transpose(1, 0, 2, 3)
        Xs, Gl = Xs.reshape(C, T), Gs.reshape(O, T)[:, :L]
        Xb = np.zeros((C, T)) if input_grad else None
        if form == "patches":
            P = np.empty((C, kh * kw, L))
            for u in range(kh):
                for v in range(kw):
                    P[:, u * kw + v] = Xs[:, u * Wp + v : u * Wp + v + L]
            Kbar += Gl @ P.reshape(C * kh * kw, L).T  # phi^T G, eq. 5.5
            if input_grad:
                D = (F.T @ Gl).reshape(C, kh * kw, L)  # G F^T, eq. 5.6 ...
                for u in range(kh):
                    for v in range(kw):
                        shift = u * Wp + v
                        Xb[:, shift : shift + L] += D[:, u * kw + v]  # ... Phi^T
        else:
            block = np.empty((C, L)) if input_grad else None
            for u in range(kh):
                for v in range(kw):
                    shift = u * Wp + v
                    # rows (., u, v) of phi^T G
                    Kbar[:, :, u, v] += Gl @ Xs[:, shift : shift + L].T
                    if input_grad:
                        # columns (., u, v) of G F^T, added back where they came from
                        np.matmul(KT[u, v], Gl, out=block)
                        Xb[:, shift : shift + L] += block
        if input_grad:
            Xbar[n0 : n0 + m] = Xb.reshape(C, m, Hp, Wp)[inner].transpose(1, 0, 2, 3)
    return Xbar, Kbar.reshape(K.shape)


# ----- ReLU -----


def relu(x):
    """max(x, 0), element-wise (eq. 5.7). Infinities are allowed, NaN raises."""
    return np.maximum(_relu_input(x), 0.0)


def relu_jvp(x, dx):
    """d relu = diag(x > 0) dx (eq. 5.7): the derivative at 0 is taken to be 0, as in
    JAX. Read off the forward map, relu(x) = x where x > 0 and 0 elsewhere, so its
    differential copies dx where relu(x) copies x; x must be finite."""
    x = as_finite_array(x, "x")
    dx = _like(dx, x, "dx")
    out = np.zeros_like(x)
    np.copyto(out, dx, where=np.maximum(x, 0.0) == x)  # where relu copies x ...
    out[x == 0] = 0.0  # ... except at 0, where the derivative is taken to be 0
    return out


def relu_vjp(x, G):
    """xbar = diag(x > 0) G: the mask is its own transpose; x must be finite."""
    x = as_finite_array(x, "x")
    return np.where(_relu_mask(x), _cotangent(G, x.shape), 0.0)


def _relu_mask(x):
    """The boolean array of positive entries (the VJP only)."""
    return x > 0


# ----- Pooling -----


def max_pool(X, *, size=2, stride=None, padding=0):
    """The largest entry of each size x size window (eq. 5.8), X (N, C, H, W);
    stride None means size. `padding` rows and columns of -inf on every side (eq.
    5.24; at most size // 2, so that every window holds an entry of X). Its
    derivatives (`max_pool_jvp`, `max_pool_vjp`, `max_pool_matrix`) give a tied
    window's whole derivative to its first maximum in row-major order, as JAX's VJP
    does."""
    X = _images(X, "X")
    size, stride, padding = _pool_geometry(X.shape, size, stride, padding)
    return _windows(_pad(X, padding, -np.inf), size, stride).max(axis=(-2, -1))


def max_pool_argmax(X, *, size=2, stride=None, padding=0):
    """The window offset u size + v of the selected entry of every window, (N, C, H',
    W'), offsets counted in the padded image.

    Ties go to the first maximum in row-major order inside the window, as in JAX's
    reduce_window and its VJP."""
    X = _images(X, "X")
    size, stride, padding = _pool_geometry(X.shape, size, stride, padding)
    win = _windows(_pad(X, padding, -np.inf), size, stride)
    return win.reshape(win.shape[:4] + (size * size,)).argmax(axis=-1)


def max_pool_matrix(x, *, size=2, stride=None, padding=0):
    """The 0/1 selection matrix S(x) E of eqs. 5.8 and 5.24 for one image x (C, H,
    W): vec y = S(x) E vec x, shape (C H'W', C H W). A tied window selects its first
    maximum in row-major order."""
    x = as_finite_array(x, "x", 3)
    geometry = {"size": size, "stride": stride, "padding": padding}
    arg = max_pool_argmax(x[None], **geometry)[0]
    size, stride, padding = _pool_geometry(x[None].shape, size, stride, padding)
    C, Ho, Wo = arg.shape
    c, i, j = np.indices(arg.shape)
    rows = np.arange(arg.size)
    row_in_x = i * stride + arg // size - padding  # the padded row, less the padding
    col_in_x = j * stride + arg % size - padding
    cols = (c * x.shape[1] + row_in_x) * x.shape[2] + col_in_x
    S = np.zeros((arg.size, x.size))
    S[rows, cols.ravel()] = 1.0
    return S


def max_pool_jvp(X, dX, *, size=2, stride=None, padding=0):
    """dy = S(x) E dx (eqs. 5.8 and 5.24): the increment at the selected entry of each
    window.

    Read off the forward map, without `max_pool_argmax`: an entry is selected where it
    equals its window's maximum and no earlier entry (row-major) does, so a tied
    window takes the increment of its first maximum; padding never wins."""
    X = _images(X, "X")
    dX = _like(dX, X, "dX")
    size, stride, padding = _pool_geometry(X.shape, size, stride, padding)
    win = _windows(_pad(X, padding, -np.inf), size, stride)
    flat = win.reshape(win.shape[:4] + (size * size,))
    hit = flat == flat.max(axis=-1, keepdims=True)
    first = hit & (np.cumsum(hit, axis=-1) == 1)
    dwin = _windows(_pad(dX, padding, 0.0), size, stride).reshape(flat.shape)
    return np.where(first, dwin, 0.0).sum(axis=-1)


def max_pool_vjp(X, G, *, size=2, stride=None, padding=0):
    """xbar = E^T S(x)^T G (eqs. 5.9 and 5.24): each window's cotangent goes to its
    selected entry (the first maximum in row-major order where the window ties),
    adding where overlapping windows select the same entry; E^T drops the padding."""
    X = _images(X, "X")
    size, stride, padding = _pool_geometry(X.shape, size, stride, padding)
    arg = max_pool_argmax(X, size=size, stride=stride, padding=padding)
    G = _cotangent(G, arg.shape)
    return _add_windows(
        X.shape, lambda u, v: G * (arg == u * size + v), size, stride, padding
    )


def avg_pool(X, *, size=2, stride=None, padding=0):
    """The mean of each size x size window (eq. 5.10), X (N, C, H, W). `padding` rows
    and columns of zeros on every side (eq. 5.24; at most size // 2), which count in
    the mean: every window divides by size^2."""
    X = _images(X, "X")
    size, stride, padding = _pool_geometry(X.shape, size, stride, padding)
    # scaled by a power of two near max |X| (exact), so that a window's sum cannot
    # overflow where its mean is a float (entries near 1.8e308)
    scale = np.ldexp(1.0, int(np.frexp(np.abs(X).max())[1]) - 1)
    windows = _windows(_pad(X / scale, padding, 0.0), size, stride)
    return scale * windows.mean(axis=(-2, -1))


def avg_pool_jvp(X, dX, *, size=2, stride=None, padding=0):
    """Average pooling is linear: dy = avg_pool(dx)."""
    X = _images(X, "X")
    return avg_pool(_like(dX, X, "dX"), size=size, stride=stride, padding=padding)


def avg_pool_vjp(X, G, *, size=2, stride=None, padding=0):
    """xbar = E^T A^T G (eqs. 5.10 and 5.24): each window spreads G / size^2 over its
    entries, and the padding's share is dropped."""
    X = _images(X, "X")
    size, stride, padding = _pool_geometry(X.shape, size, stride, padding)
    Ho, Wo = (
        conv_output_size(X.shape[2], size, stride, padding),
        conv_output_size(X.shape[3], size, stride, padding),
    )
    G = _cotangent(G, X.shape[:2] + (Ho, Wo)) / size**2
    return _add_windows(X.shape, lambda u, v: G, size, stride, padding)


def _add_windows(x_shape, value, size, stride, padding=0):
    """The pooling VJPs' scatter: value(u, v), shaped like the output, added to the
    entry at offset (u, v) of every window of the padded image, then the padding
    dropped (E^T of eq. 5.24; the VJPs only)."""
    N, C, H, W = x_shape
    Ho = conv_output_size(H, size, stride, padding)
    Wo = conv_output_size(W, size, stride, padding)
    Xbar = np.zeros((N, C, H + 2 * padding, W + 2 * padding))
    for u in range(size):
        for v in range(size):
            Xbar[
                :,
                :,
                u : u + stride * (Ho - 1) + 1 : stride,
                v : v + stride * (Wo - 1) + 1 : stride,
            ] += value(u, v)
    return Xbar[:, :, padding : padding + H, padding : padding + W].copy()


def _pad(X, padding, value):
    """X with `padding` rows and columns of `value` on every side of each image."""
    if padding == 0:
        return X
    width = ((0, 0), (0, 0), (padding, padding), (padding, padding))
    return np.pad(X, width, constant_values=value)


# ----- Batch and layer normalisation (training mode) -----


def batch_norm(X, gamma, beta, *, eps=1e-5):
    """Eq. 5.11-5.13: each row (feature) of X (d, n) normalised over the n observations
    (columns) with the biased variance and eps inside the square root, then scaled by
    gamma (d,) and shifted by beta (d,). For images, X is (C, N H W)."""
    X, gamma, beta, eps = _norm_args(X, gamma, beta, eps)
    _training_batch(X)
    Xhat, _ = _normalise(X, eps, axis=1)
    return gamma[:, None] * Xhat + beta[:, None]


def batch_norm_jvp(X, gamma, beta, dX, dgamma, dbeta, *, eps=1e-5):
    """Eq. 5.14: dY = dgamma Xhat + diag(gamma) diag(s)^-1 (dX C - diag((Xhat o dX) 1
    / n) Xhat) + dbeta 1^T."""
    _training_batch(as_finite_array(X, "X", 2))
    return _norm_jvp(X, gamma, beta, dX, dgamma, dbeta, eps, axis=1)


def batch_norm_vjp(X, gamma, beta, G, *, eps=1e-5):
    """The compact backward rule, eq. 5.15: (Xbar, gammabar, betabar) with Xbar =
    diag(s)^-1 (Ghat C - diag((Ghat o Xhat) 1 / n) Xhat), Ghat = diag(gamma) G."""
    _training_batch(as_finite_array(X, "X", 2))
    return _norm_vjp(X, gamma, beta, G, eps, axis=1)


def layer_norm(X, gamma, beta, *, eps=1e-5):
    """Eq. 5.16: each column (observation) of X (d, n) normalised over its d features,
    then scaled by gamma (d,) and shifted by beta (d,)."""
    X, gamma, beta, eps = _norm_args(X, gamma, beta, eps)
    Xhat, _ = _normalise(X, eps, axis=0)
    return gamma[:, None] * Xhat + beta[:, None]


def layer_norm_jvp(X, gamma, beta, dX, dgamma, dbeta, *, eps=1e-5):
    """Eq. 5.14 on the transpose: the normalisation runs down the columns."""
    return _norm_jvp(X, gamma, beta, dX, dgamma, dbeta, eps, axis=0)


def layer_norm_vjp(X, gamma, beta, G, *, eps=1e-5):
    """Eq. 5.15 on the transpose, eq. 5.16: (Xbar, gammabar, betabar)."""
    return _norm_vjp(X, gamma, beta, G, eps, axis=0)


# ----- Batch normalisation over images, and in evaluation mode -----


def batch_norm2d(X, gamma, beta, *, eps=1e-5):
    """Eq. 5.23: batch norm of NCHW images X (N, C, H, W) in training mode, each
    channel normalised over its N H W values (the batch and every pixel), then scaled
    by gamma (C,) and shifted by beta (C,). It is eq. 5.11-5.13 on the (C, N H W)
    matrix of channel rows, a permutation of X's entries."""
    X = _training_images(X)
    return _from_channel_rows(batch_norm(_channel_rows(X), gamma, beta, eps=eps), X)


def batch_norm2d_jvp(X, gamma, beta, dX, dgamma, dbeta, *, eps=1e-5):
    """Eq. 5.23: the permutation is linear, so dY is eq. 5.14 on the channel rows of
    X and dX, permuted back to NCHW."""
    X = _training_images(X)
    dX = _like(dX, X, "dX")
    dY = batch_norm_jvp(
        _channel_rows(X), gamma, beta, _channel_rows(dX), dgamma, dbeta, eps=eps
    )
    return _from_channel_rows(dY, X)


def batch_norm2d_vjp(X, gamma, beta, G, *, eps=1e-5):
    """Eq. 5.23: the permutation is orthogonal, its adjoint its inverse: (Xbar,
    gammabar, betabar) is eq. 5.15 on the channel rows of X and G, Xbar permuted back
    to NCHW."""
    X = _training_images(X)
    G = _cotangent(G, X.shape)
    Xbar, gbar, bbar = batch_norm_vjp(
        _channel_rows(X), gamma, beta, _channel_rows(G), eps=eps
    )
    return _from_channel_rows(Xbar, X), gbar, bbar


def _training_images(X):
    X = _images(X, "X")
    if X.shape[0] * X.shape[2] * X.shape[3] < 2:
        raise ValueError(
            f"batch norm in training mode needs at least 2 values per channel (N H W), "
            f"got X of shape {X.shape}"
        )
    return X


def _channel_rows(X):
    """The (C, N H W) matrix of an NCHW array: row c holds channel c of every image."""
    return X.transpose(1, 0, 2, 3).reshape(X.shape[1], -1)


def _from_channel_rows(M, X):
    N, C, H, W = X.shape
    return M.reshape(C, N, H, W).transpose(1, 0, 2, 3).copy()


def batch_norm_eval(X, gamma, beta, *, mean, var, eps=1e-5):
    """Eq. 5.21: batch norm in evaluation mode, with fixed (running) statistics:
    Y = diag(gamma / s) (X - mean 1^T) + beta 1^T, s = sqrt(var + eps), an affine map
    of X. X is (d, n) (features as rows) or NCHW images (N, C, H, W) (channels on
    axis 1); gamma, beta, mean and var have one entry per feature or channel."""
    X, gamma, beta, mean, s = _eval_args(X, gamma, beta, mean, var, eps)
    b = _feature_shape(X)
    with np.errstate(over="ignore", invalid="ignore"):
        Y = (gamma / s).reshape(b) * (X - mean.reshape(b)) + beta.reshape(b)
    return _finite_eval(Y, "Y", s)


def batch_norm_eval_jvp(X, gamma, beta, dX, dgamma, dbeta, *, mean, var, eps=1e-5):
    """Eq. 5.21: dY = diag(gamma / s) dX + diag(dgamma) Xhat + dbeta 1^T, with Xhat =
    diag(s)^-1 (X - mean 1^T); the statistics are constants."""
    X, gamma, beta, mean, s = _eval_args(X, gamma, beta, mean, var, eps)
    dX = _like(dX, X, "dX")
    dgamma, dbeta = _like(dgamma, gamma, "dgamma"), _like(dbeta, beta, "dbeta")
    b = _feature_shape(X)
    with np.errstate(over="ignore", invalid="ignore"):
        Xhat = (X - mean.reshape(b)) / s.reshape(b)
        dY = (
            gamma.reshape(b) * dX / s.reshape(b)
            + dgamma.reshape(b) * Xhat
            + dbeta.reshape(b)
        )
    return _finite_eval(dY, "dY", s)


def batch_norm_eval_vjp(X, gamma, beta, G, *, mean, var, eps=1e-5):
    """Eq. 5.21: (Xbar, gammabar, betabar) = (diag(gamma / s) G, (G o Xhat) 1, G 1),
    the sums over everything but the feature (channel) axis."""
    X, gamma, beta, mean, s = _eval_args(X, gamma, beta, mean, var, eps)
    G = _cotangent(G, X.shape)
    b = _feature_shape(X)
    axes = (1,) if X.ndim == 2 else (0, 2, 3)  # all but the feature axis
    with np.errstate(over="ignore", invalid="ignore"):
        Xhat = (X - mean.reshape(b)) / s.reshape(b)
        Xbar, gbar = (gamma / s).reshape(b) * G, (G * Xhat).sum(axis=axes)
    return (
        _finite_eval(Xbar, "Xbar", s),
        _finite_eval(gbar, "gammabar", s),
        G.sum(axis=axes),
    )


def _finite_eval(A, name, s):
    """A, or a ValueError if it overflowed float64 (a standard deviation sqrt(var +
    eps) so small, or an input so large, that the affine map of eq. 5.21 leaves the
    floats): never an infinity or a NaN."""
    if not np.all(np.isfinite(A)):
        raise ValueError(
            f"{name} overflows float64: the smallest sqrt(var + eps) is {s.min():.3g}; "
            f"use a larger eps or smaller inputs"
        )
    return A


def batch_norm_running_stats(X, mean, var, *, momentum=0.1):
    """Eq. 5.22: the running statistics after one training batch X, (1 - momentum)
    times the old plus momentum times the batch's: its mean, and its unbiased variance
    (the biased variance of eq. 5.11 times n / (n - 1), n values per feature), as
    PyTorch's BatchNorm stores it and as Ioffe and Szegedy's inference rule uses it
    (Flax's BatchNorm averages the biased variance instead). X is (d, n) or NCHW;
    returns (mean, var)."""
    X = as_finite_array(X, "X", (2, 4))
    rows = X if X.ndim == 2 else _channel_rows(X)
    d, n = rows.shape
    if n < 2:
        raise ValueError(
            f"running statistics need at least 2 values per feature, got X of shape "
            f"{X.shape}"
        )
    mean = as_array_of_shape(mean, "mean", (d,), "{name} must have shape")
    var = as_array_of_shape(var, "var", (d,), "{name} must have shape")
    if np.any(var < 0):
        raise ValueError(f"var must be non-negative, got {var.min():.3g}")
    if not (_is_real_number(momentum) and 0 <= momentum <= 1):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    mu = rows.mean(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        v = ((rows - mu[:, None]) ** 2).sum(axis=1) / (n - 1)
        new_var = (1 - momentum) * var + momentum * v
    if not np.all(np.isfinite(new_var)):
        raise ValueError(
            f"the variance of X overflows float64 (largest |X| = {np.abs(X).max():.3g})"
        )
    return (1 - momentum) * mean + momentum * mu, new_var


def _feature_shape(X):
    """The broadcast shape of a per-feature vector: (d, 1) for (d, n), (1, C, 1, 1)
    for NCHW."""
    return (X.shape[0], 1) if X.ndim == 2 else (1, X.shape[1], 1, 1)


def _eval_args(X, gamma, beta, mean, var, eps):
    X = as_finite_array(X, "X", (2, 4))
    d = X.shape[0] if X.ndim == 2 else X.shape[1]
    what = "one per row of X" if X.ndim == 2 else "one per channel of X"
    args = []
    for name, v in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var)):
        v = as_finite_array(v, name, 1)
        if v.shape != (d,):
            raise ValueError(
                f"{name} must have shape {(d,)} ({what} {X.shape}), got {v.shape}"
            )
        args.append(v)
    gamma, beta, mean, var = args
    if np.any(var < 0):
        raise ValueError(f"var must be non-negative, got {var.min():.3g}")
    eps = _eps(eps)
    s = np.sqrt(var + eps)
    if np.any(s == 0):
        raise ValueError("var + eps must be positive for every feature; use eps > 0")
    return X, gamma, beta, mean, s


def _normalise(X, eps, axis):
    """(Xhat, s) of eq. 5.11-5.12 along `axis`, without overflow or silent rounding
    noise.

    Each row (column) is first divided by its largest magnitude m, so that its mean
    and variance cannot overflow (rows like [1e200, -1e200, 0]), and a constant row
    becomes exactly constant (x / x = 1), its centred values exactly 0. Then s =
    sqrt(v + eps) = hypot(m sqrt(v_scaled), sqrt(eps)), and Xhat = Xc_scaled / (s /
    m)."""
    line = "row" if axis == 1 else "column"
    if eps == 0 and np.any(
        X.max(axis=axis) == X.min(axis=axis)
    ):  # constant, tested exactly
        raise ValueError(
            f"X has a constant {line} and eps = 0: its standard deviation is 0; use "
            f"eps > 0"
        )
    m = np.abs(X).max(axis=axis, keepdims=True)
    m = np.where(m > 0, m, 1.0)
    Xc = X / m
    Xc = Xc - Xc.mean(axis=axis, keepdims=True)
    s = np.hypot(m * np.sqrt((Xc * Xc).mean(axis=axis, keepdims=True)), np.sqrt(eps))
    if np.any(s == 0):
        raise ValueError(
            f"X has a {line} whose standard deviation underflows to 0 and eps = 0; use "
            f"eps > 0"
        )
    with np.errstate(
        over="ignore"
    ):  # s / m = inf only where Xhat is 0 to double precision
        return Xc / (s / m), s


def _norm_jvp(X, gamma, beta, dX, dgamma, dbeta, eps, axis):
    X, gamma, beta, eps = _norm_args(X, gamma, beta, eps)
    dX, dgamma, dbeta = (
        _like(dX, X, "dX"),
        _like(dgamma, gamma, "dgamma"),
        _like(dbeta, beta, "dbeta"),
    )
    Xhat, s = _normalise(X, eps, axis)
    # the forward differential, line by line: dXc = dX - mean(dX), dv = 2 mean(Xc o
    # dXc), ds = dv / (2 s) = mean(Xhat o dXc), dXhat = (dXc - Xhat ds) / s
    dXc = dX - dX.mean(axis=axis, keepdims=True)
    ds = (Xhat * dXc).mean(axis=axis, keepdims=True)
    with np.errstate(over="ignore"):
        dXhat = (dXc - Xhat * ds) / s
    if not np.all(np.isfinite(dXhat)):
        raise ValueError(
            f"dY overflows: X has a standard deviation of {s.min():.3g}; use eps > 0"
        )
    return dgamma[:, None] * Xhat + gamma[:, None] * dXhat + dbeta[:, None]


def _norm_vjp(X, gamma, beta, G, eps, axis):
    X, gamma, beta, eps = _norm_args(X, gamma, beta, eps)
    G = _cotangent(G, X.shape)
    Xhat, s = _normalise(X, eps, axis)
    Ghat = gamma[:, None] * G
    Xbar = _finite_over_s(
        Ghat
        - Ghat.mean(axis=axis, keepdims=True)
        - Xhat * (Ghat * Xhat).mean(axis=axis, keepdims=True),
        s,
        "Xbar",
    )
    return Xbar, (G * Xhat).sum(axis=1), G.sum(axis=1)


def _training_batch(X):
    """Refuse a batch of one: its statistics are the observation itself, so Xhat = 0
    and the layer's output and gradient say nothing about X."""
    if X.shape[1] < 2:
        raise ValueError(
            f"batch norm in training mode needs a batch of at least 2 observations "
            f"(columns of X), got X of shape {X.shape}"
        )


def _finite_over_s(A, s, name):
    """A / s, or a ValueError if a standard deviation s so small (eps = 0) overflows
    it (the VJPs only)."""
    with np.errstate(over="ignore"):
        out = A / s
    if not np.all(np.isfinite(out)):
        raise ValueError(
            f"{name} overflows: X has a standard deviation of {s.min():.3g}; use eps > "
            f"0"
        )
    return out


# ----- Attention -----


@_finite_results
def attention(Q, K, V, *, mask=None):
    """O = P V with P = softmax_rows(Q K^T / sqrt(d)), eq. 5.17.

    Q (n, d) queries, K (m, d) keys, V (m, e) values, as rows. mask (n, m) boolean, True
    where query i may attend to key j; masked scores count as -inf. A fully masked row
    attends to nothing: its row of P, and of O, is zero (never NaN).
    """
    P, _ = _attention_probs(Q, K, V, mask)
    return P @ np.asarray(V, dtype=np.float64)


def attention_probs(Q, K, *, mask=None):
    """P = softmax_rows(Q K^T / sqrt(d)) with the mask convention of ``attention``,
    (n, m)."""
    Q = as_float_array(Q, "Q", 2)
    return _attention_probs(
        Q, K, np.zeros((as_float_array(K, "K", 2).shape[0], 1)), mask
    )[0]


@_finite_results
def attention_jvp(Q, K, V, dQ, dK, dV, *, mask=None):
    """Eq. 5.18: dO = dP V + P dV, dP = P o (dS - (P o dS) 1 1^T), dS = (dQ K^T + Q
    dK^T) / sqrt(d)."""
    P, (Q, K, V) = _attention_probs(Q, K, V, mask)
    dQ, dK, dV = _like(dQ, Q, "dQ"), _like(dK, K, "dK"), _like(dV, V, "dV")
    dS = (dQ @ K.T + Q @ dK.T) / np.sqrt(Q.shape[1])
    dP = P * (dS - (P * dS).sum(axis=1, keepdims=True))
    return dP @ V + P @ dV


@_finite_results
def attention_vjp(Q, K, V, G, *, mask=None):
    """Eq. 5.19: (Qbar, Kbar, Vbar) = (Sbar K / sqrt(d), Sbar^T Q / sqrt(d), P^T G),
    with Pbar = G V^T and Sbar = P o (Pbar - (P o Pbar) 1 1^T). Masked entries, and
    fully masked rows, get a zero gradient."""
    P, (Q, K, V) = _attention_probs(Q, K, V, mask)
    G = _cotangent(G, (Q.shape[0], V.shape[1]))
    Pbar = G @ V.T
    Sbar = _softmax_rows_vjp(P, Pbar)
    r = np.sqrt(Q.shape[1])
    return Sbar @ K / r, Sbar.T @ Q / r, P.T @ G


def _softmax_rows_vjp(P, Pbar):
    """Sbar = P o (Pbar - (P o Pbar) 1 1^T), the row softmax's adjoint (the VJP
    only; the JVP writes its own differential)."""
    return P * (Pbar - (P * Pbar).sum(axis=1, keepdims=True))


def _attention_probs(Q, K, V, mask):
    Q = as_finite_array(Q, "Q", 2)
    K = as_finite_array(K, "K", 2)
    V = as_finite_array(V, "V", 2)
    if K.shape[1] != Q.shape[1]:
        raise ValueError(
            f"Q K^T needs K with Q's {Q.shape[1]} columns, got Q {Q.shape} and K "
            f"{K.shape}"
        )
    if V.shape[0] != K.shape[0]:
        raise ValueError(
            f"P V needs V with K's {K.shape[0]} rows, got K {K.shape} and V {V.shape}"
        )
    with np.errstate(over="ignore"):
        S = Q @ K.T / np.sqrt(Q.shape[1])
    if not np.all(np.isfinite(S)):
        raise ValueError(
            f"the scores S = Q K^T / sqrt(d) must be finite, got "
            f"{S[~np.isfinite(S)].ravel()[0]} (Q and K too large: max |Q| = "
            f"{np.abs(Q).max():.3g}, max |K| = {np.abs(K).max():.3g})"
        )
    if mask is None:
        mask = np.ones(S.shape, dtype=bool)  # the row-wise softmax, also when m = 1
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != S.shape:
        raise ValueError(
            f"mask must be a boolean array of shape {S.shape}, got {mask.dtype} "
            f"{mask.shape}"
        )
    alive = mask.any(axis=1, keepdims=True)
    shift = np.where(alive, np.where(mask, S, -np.inf).max(axis=1, keepdims=True), 0.0)
    E = np.where(mask, np.exp(np.where(mask, S - shift, 0.0)), 0.0)
    Z = E.sum(axis=1, keepdims=True)
    return E / np.where(alive, Z, 1.0), (Q, K, V)


# ----- A small convolutional network -----


def cnn_init(rng, filters=16, classes=10, size=8, kernel=3, pool=2):
    """Parameters (K, b, W, c) of conv (padding kernel // 2) -> ReLU -> max pool ->
    linear for one-channel size x size images: K (filters, 1, kernel, kernel), b
    (filters,), W (classes, filters (size / pool)^2), c (classes,). K is He-scaled,
    normal with variance 2 / fan-in = 2 / kernel^2 (a ReLU follows it); W is normal
    with variance 1 / fan-in = 1 / features (LeCun's scaling: no ReLU follows it); the
    biases are zero. `rng` is a numpy.random.Generator."""
    features = filters * (size // pool) ** 2
    K = rng.standard_normal((filters, 1, kernel, kernel)) * np.sqrt(2.0 / kernel**2)
    W = rng.standard_normal((classes, features)) * np.sqrt(1.0 / features)
    return K, np.zeros(filters), W, np.zeros(classes)


def cnn_forward(params, X):
    """The activations of every layer for images X (N, 1, H, W), as a dict: 'A' conv
    plus bias, 'R' ReLU, 'M' max pool, 'h' features (F, N) (observations as columns),
    'Z' logits (classes, N)."""
    K, b, W, c = params
    A = conv2d(X, K, padding=K.shape[2] // 2) + b[None, :, None, None]
    R = relu(A)
    M = max_pool(R, size=2)
    h = M.reshape(M.shape[0], -1).T
    return {"A": A, "R": R, "M": M, "h": h, "Z": W @ h + c[:, None]}


def cnn_loss(params, X, labels):
    """The mean cross entropy of softmax(Z) against the labels, eq. 3.15c / N. The
    labels take either form of every fitting function of derivlib
    (``derivlib._validate.as_label_columns``): class indices, a 1-D integer array (N,)
    in [0, classes), or (classes, N) columns of probabilities (one-hot or soft)."""
    Z = cnn_forward(params, X)["Z"]
    return _mean_cross_entropy(Z, _one_hot(labels, Z.shape[0], Z.shape[1]))


def cnn_grad(params, X, labels):
    """(loss, gradients (Kbar, bbar, Wbar, cbar), cotangents of every layer's output) by
    the chain of backward rules: softmax cross entropy, linear, reshape, max pool, ReLU,
    bias, convolution. Labels as in `cnn_loss`."""
    K, b, W, c = params
    act = cnn_forward(params, X)
    Z, N = act["Z"], X.shape[0]
    Y = _one_hot(labels, Z.shape[0], N)
    Zbar = (softmax(Z) - Y) / N  # eq. 3.20b, per observation
    Wbar, hbar = matmul_vjp(W, act["h"], Zbar)
    Mbar = hbar.T.reshape(act["M"].shape)
    Rbar = max_pool_vjp(act["R"], Mbar, size=2)
    Abar = relu_vjp(act["A"], Rbar)
    _, Kbar = conv2d_vjp(
        X, K, Abar, padding=K.shape[2] // 2, input_grad=False
    )  # images are data
    grads = (Kbar, Abar.sum(axis=(0, 2, 3)), Wbar, Zbar.sum(axis=1))
    cotangents = {"Z": Zbar, "h": hbar, "M": Mbar, "R": Rbar, "A": Abar}
    return _mean_cross_entropy(Z, Y), grads, cotangents


def cnn_fit(
    X,
    labels,
    *,
    params,
    epochs=10,
    batch_size=32,
    learning_rate=0.05,
    momentum=0.9,
    seed=0,
):
    """Minibatch SGD with heavy-ball momentum on cnn_grad, from the initial parameters
    `params` (as cnn_init returns them). X holds the images (N, 1, H, W), labels their
    classes in either form of `cnn_loss`; the options are keyword-only and named as in
    every fitting function of derivlib. Every epoch visits the images in an order drawn
    from ``default_rng(seed)``. Returns the parameters and the mean training loss of
    each epoch (over its minibatches)."""
    params = [np.array(p, dtype=np.float64) for p in params]
    X = as_finite_array(X, "X", 4)
    Y = _one_hot(labels, params[2].shape[0], X.shape[0])
    epochs = as_positive_int(epochs, "epochs")
    batch_size = as_positive_int(batch_size, "batch_size")
    learning_rate = as_positive_float(learning_rate, "learning_rate")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    rng = np.random.default_rng(as_seed(seed))
    velocity = [np.zeros_like(p) for p in params]
    history = []
    for _ in range(epochs):
        order, losses = rng.permutation(X.shape[0]), []
        for start in range(0, X.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss, grads, _ = cnn_grad(params, X[idx], Y[:, idx])
            for p, v, g in zip(params, velocity, grads):
                v *= momentum
                v -= learning_rate * g
                p += v
            losses.append(loss)
        history.append(float(np.mean(losses)))
    return tuple(params), history


def cnn_predict(params, X):
    """The predicted class of each image, (N,)."""
    return cnn_forward(params, X)["Z"].argmax(axis=0)


def _one_hot(labels, k, n=None):
    """The labels as (k, n) probability columns (``as_label_columns``), with one label
    per image when n is given."""
    Y = as_label_columns(labels, "labels", k)
    if n is not None and Y.shape[1] != n:
        raise ValueError(
            f"labels must have one label per image, {n} images, got labels for "
            f"{Y.shape[1]}"
        )
    return Y


def _mean_cross_entropy(Z, Y):
    return float(-np.sum(Y * _log_softmax(Z)) / Z.shape[1])


# ----- Input checks -----


def _relu_input(x):
    return require_no_nan(as_float_array(x, "x"), "x")


def _images(X, name):
    return as_finite_array(X, name, 4)


def _like(dx, x, name):
    return as_array_of_shape(dx, name, x.shape, "{name} must have the primal's shape")


def _cotangent(G, shape):
    return as_cotangent(G, shape)


def _shape4(shape):
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(
            f"x_shape must be (N, C, H, W) with positive entries, got {shape}"
        )
    return shape


def _shape3(shape):
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"x_shape must be (C, H, W) with positive entries, got {shape}"
        )
    return shape


def _integer(value, name, least):
    """value as an int, if it is an integer (2 or 2.0) of at least `least`; else
    ValueError."""
    try:
        ok = not isinstance(value, bool) and int(value) == value and value >= least
    except (TypeError, ValueError):
        ok = False
    if not ok:
        kind = "a positive integer" if least == 1 else "a non-negative integer"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def _geometry(x_shape, kh, kw, stride, padding):
    """(kh, kw, stride, padding) as ints, checked, and the kernel checked to fit."""
    kh, kw = _integer(kh, "kh", 1), _integer(kw, "kw", 1)
    stride, padding = _integer(stride, "stride", 1), _integer(padding, "padding", 0)
    H, W = x_shape[2] + 2 * padding, x_shape[3] + 2 * padding
    if kh > H or kw > W:
        raise ValueError(
            f"a {kh} x {kw} kernel does not fit images of shape {tuple(x_shape)} "
            f"with padding {padding}"
        )
    return kh, kw, stride, padding


def _conv_pair(X, K, groups=1):
    X, K = _images(X, "X"), as_finite_array(K, "K", 4)
    groups = _integer(groups, "groups", 1)
    C, O = X.shape[1], K.shape[0]
    if C % groups or O % groups:
        raise ValueError(
            f"groups must divide X's {C} input channels and K's {O} filters, got "
            f"groups = {groups}"
        )
    if K.shape[1] != C // groups:
        per = " per group" if groups > 1 else ""
        raise ValueError(
            f"K must have X's {C // groups} input channels{per} in axis 1 (OIHW), "
            f"got X {X.shape} and K {K.shape}"
        )
    return X, K, groups


def _conv_bias_args(X, K, b):
    K = as_finite_array(K, "K", 4)
    b = as_finite_array(b, "b", 1)
    if b.shape != (K.shape[0],):
        raise ValueError(
            f"b must have shape {(K.shape[0],)} (one per filter of K {K.shape}), got "
            f"{b.shape}"
        )
    return _images(X, "X"), K, b


def _padding_pairs(padding):
    """((top, bottom), (left, right)) from p, (p_h, p_w) or ((top, bottom), (left,
    right)), each a non-negative integer."""
    if isinstance(padding, (tuple, list)) and len(padding) == 2:
        pairs = [p if isinstance(p, (tuple, list)) else (p, p) for p in padding]
        if all(len(p) == 2 for p in pairs):
            return tuple(
                tuple(_integer(v, "padding", 0) for v in pair) for pair in pairs
            )
        raise ValueError(
            f"padding must be p, (p_h, p_w) or ((top, bottom), (left, right)), got "
            f"{padding!r}"
        )
    p = _integer(padding, "padding", 0)
    return ((p, p), (p, p))


def _conv_geometry(x_shape, kh, kw, stride, padding, dilation):
    """(kh, kw, stride, padding pairs, dilation, H', W'), checked, and the dilated
    kernel checked to fit the padded image."""
    kh, kw = _integer(kh, "kh", 1), _integer(kw, "kw", 1)
    stride, d = _integer(stride, "stride", 1), _integer(dilation, "dilation", 1)
    pads = _padding_pairs(padding)
    H = x_shape[2] + pads[0][0] + pads[0][1]
    W = x_shape[3] + pads[1][0] + pads[1][1]
    eh, ew = (kh - 1) * d + 1, (kw - 1) * d + 1
    if eh > H or ew > W:
        dilated = f" with dilation {d}" if d > 1 else ""
        raise ValueError(
            f"a {kh} x {kw} kernel{dilated} does not fit images of shape "
            f"{tuple(x_shape)} with padding {padding}"
        )
    return kh, kw, stride, pads, d, (H - eh) // stride + 1, (W - ew) // stride + 1


def _out_hw(X, K, stride, padding, dilation=1):
    geometry = _conv_geometry(
        X.shape, K.shape[2], K.shape[3], stride, padding, dilation
    )
    return geometry[5:]


def _pool_geometry(x_shape, size, stride, padding=0):
    """(size, stride, padding) as ints, checked; stride None means size. The padding
    is at most size // 2, so that every window holds an entry of the image."""
    size = _integer(size, "size", 1)
    stride = size if stride is None else stride
    padding = _integer(padding, "padding", 0)
    if padding > size // 2:
        raise ValueError(
            f"padding must be at most size // 2 = {size // 2} (every window must hold "
            f"an entry of X), got {padding}"
        )
    size, _, stride, padding = _geometry(x_shape, size, size, stride, padding)
    return size, stride, padding


def _windows(X, size, stride):
    return sliding_window_view(X, (size, size), axis=(2, 3))[:, :, ::stride, ::stride]


def _norm_args(X, gamma, beta, eps):
    X = as_finite_array(X, "X", 2)
    gamma = as_finite_array(gamma, "gamma", 1)
    beta = as_finite_array(beta, "beta", 1)
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v.shape != (X.shape[0],):
            raise ValueError(
                f"{name} must have shape {(X.shape[0],)} (one per row of X {X.shape}), "
                f"got {v.shape}"
            )
    return X, gamma, beta, _eps(eps)


def _is_real_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    )


def _eps(eps):
    """eps as a float, if it is a finite, non-negative real number; else ValueError."""
    if not (_is_real_number(eps) and np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite, non-negative number, got {eps!r}")
    return float(eps)
