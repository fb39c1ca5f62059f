"""Chapter 5 benchmark: the convolution's backward pass, derivlib against jax.vjp.

usage: JAX_PLATFORMS=cpu python benchmarks/bench_layers.py [--repeats N] [--all-threads]

derivlib.conv2d_vjp (at stride 1, eq. 5.20, a cache-sized group of images at a time, in
the form chosen by shape) against jax.jit(lambda X, K, G: jax.vjp(conv, X, K)[1](G))
with conv = lax.conv_general_dilated, both in float64, both returning (Xbar, Kbar) from
(X, K, G). The peer runs in two layouts, NCHW images with OIHW kernels (JAX's
default, derivlib's) and NHWC images with HWIO kernels (XLA's preferred layout on the
CPU), each given its inputs in its layout, and the faster of the two is its time (its
results are compared after transposing back). JAX is timed after compilation. All three
run side by side in this one process, taking turns in every round, and the best of
several repeats is kept. A ratio above 1 means derivlib is faster.

By default both run on one thread (OpenBLAS for NumPy, XLA's CPU backend for JAX), so
that on a shared machine neither waits for a helper thread that has been descheduled;
--all-threads lets both use every core.

1. N = 32 images, C = 16 channels, 32 x 32, 32 filters of 3 x 3, stride 1, padding 1:
   conv2d_vjp takes the offset form of eq. 5.20 (C kh kw = 144 patch rows).
2. The digits size: N = 256 images, C = 1, 8 x 8, 8 filters of 3 x 3, stride 1,
   padding 1: the patch form (9 patch rows).
3. N = 64, C = 4, 8 x 8, 16 filters of 3 x 3: as small, several channels (36 patch
   rows, the offset form).

Beside them, where derivlib's time goes: each form of eq. 5.20 forced, the im2col form
of the same rules (eq. 5.5-5.6 as written), which conv2d_vjp uses at stride 2 and above,
and K bar alone (input_grad=False). Then the memory of the patch matrix phi(X) of the
im2col form against the input.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ONE_THREAD = "--all-threads" not in sys.argv
if ONE_THREAD:  # must be set before NumPy and JAX load their thread pools
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from derivlib.layers import (  # noqa: E402
    _conv2d_vjp_im2col,
    _conv2d_vjp_shifts,
    conv2d_vjp,
)
from timing import best_of  # noqa: E402

jax.config.update("jax_enable_x64", True)

SIZES = [
    ("N=32 C=16 32x32 O=32 3x3", (32, 16, 32, 32), 32),
    ("N=256 C=1 8x8 O=8 3x3 (digits)", (256, 1, 8, 8), 8),
    ("N=64 C=4 8x8 O=16 3x3", (64, 4, 8, 8), 16),
]


# the peer's layouts: (dimension numbers, image axes from NCHW, kernel axes from OIHW)
LAYOUTS = {
    "NCHW": (("NCHW", "OIHW", "NCHW"), (0, 1, 2, 3), (0, 1, 2, 3)),
    "NHWC": (("NHWC", "HWIO", "NHWC"), (0, 2, 3, 1), (2, 3, 1, 0)),
}


def jax_conv_vjp(dimension_numbers):
    def conv(X, K):
        return lax.conv_general_dilated(
            X, K, (1, 1), [(1, 1), (1, 1)], dimension_numbers=dimension_numbers
        )

    return jax.jit(lambda X, K, G: jax.vjp(conv, X, K)[1](G))


def peers(X, K, G):
    """The peer in each layout: {name: (a function of no arguments that runs it, one
    that returns its (Xbar, Kbar) in NCHW / OIHW)}, compiled."""
    out = {}
    for name, (numbers, x_axes, k_axes) in LAYOUTS.items():
        peer = jax_conv_vjp(numbers)
        Xj, Gj = (jax.device_put(a.transpose(x_axes)) for a in (X, G))
        Kj = jax.device_put(K.transpose(k_axes))
        jax.block_until_ready(peer(Xj, Kj, Gj))  # compile

        def run(peer=peer, Xj=Xj, Kj=Kj, Gj=Gj):
            return jax.block_until_ready(peer(Xj, Kj, Gj))

        def results(run=run, x_axes=x_axes, k_axes=k_axes):
            Xbar, Kbar = run()
            return (
                np.asarray(Xbar).transpose(np.argsort(x_axes)),
                np.asarray(Kbar).transpose(np.argsort(k_axes)),
            )

        out[name] = (run, results)
    return out


def interleaved(fns, repeats):
    """The fastest of `repeats` runs of each function (seconds), the functions taking
    turns in every round, so that a burst of other work slows all of them."""
    best = [np.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def bench(label, x_shape, filters, repeats):
    rng = np.random.default_rng(0)
    X = rng.standard_normal(x_shape)
    K = rng.standard_normal((filters, x_shape[1], 3, 3))
    G = rng.standard_normal((x_shape[0], filters) + x_shape[2:])
    layouts = peers(X, K, G)
    t_ours, *t_layouts = interleaved(
        [lambda: conv2d_vjp(X, K, G, padding=1)] + [run for run, _ in layouts.values()],
        repeats,
    )
    # the peer at its best: the faster of its layouts in this run
    t_peer, layout = min(zip(t_layouts, layouts))
    ours, theirs = conv2d_vjp(X, K, G, padding=1), layouts[layout][1]()
    err = max(
        np.linalg.norm(a - np.asarray(b)) / np.linalg.norm(b)
        for a, b in zip(ours, theirs)
    )

    # where derivlib's time goes: each form of eq. 5.20 (stride 1), eq. 5.5-5.6 as
    # written (im2col), and K bar alone
    N, C, H, W = x_shape
    parts = {
        "offset form": best_of(
            lambda: _conv2d_vjp_shifts(X, K, G, 1, form="offsets"), repeats
        ),
        "patch form": best_of(
            lambda: _conv2d_vjp_shifts(X, K, G, 1, form="patches"), repeats
        ),
        "im2col form (5.5)-(5.6)": best_of(
            lambda: _conv2d_vjp_im2col(X, K, G, 1, 1), repeats
        ),
        "Kbar only (input_grad=False)": best_of(
            lambda: conv2d_vjp(X, K, G, padding=1, input_grad=False), repeats
        ),
    }
    phi_bytes = N * H * W * C * 9 * 8
    return label, t_ours, t_peer, layout, err, parts, phi_bytes, X.nbytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--all-threads", action="store_true", help="let NumPy and JAX use every core"
    )
    args = parser.parse_args()
    rows = [
        bench(label, shape, filters, args.repeats) for label, shape, filters in SIZES
    ]
    print(
        f"conv2d_vjp (Xbar and Kbar), float64, "
        f"{'one thread each' if ONE_THREAD else 'all threads'}, "
        f"best of {args.repeats} interleaved repeats; the peer in its faster layout; "
        "ratio = peer time / derivlib time (> 1: derivlib faster)\n"
    )
    header = (
        f"{'size':<32} {'derivlib':>10} {'jax.jit(jax.vjp)':>17} {'layout':>6} "
        f"{'ratio':>6}  agreement"
    )
    print(header)
    print("-" * len(header))
    for label, t_ours, t_peer, layout, err, _, _, _ in rows:
        print(
            f"{label:<32} {t_ours * 1e3:>8.2f}ms {t_peer * 1e3:>15.2f}ms {layout:>6} "
            f"{t_peer / t_ours:>5.2f}x  relative diff = {err:.1e}"
            f"{'' if err < 1e-12 else '  (TOO LARGE)'}"
        )
    print("\nwhere derivlib's time goes (each timed alone, ms):")
    for label, t_ours, _, _, _, parts, _, _ in rows:
        print(
            f"  {label:<32} conv2d_vjp {t_ours * 1e3:.2f}  "
            + "  ".join(f"{k} {v * 1e3:.2f}" for k, v in parts.items())
        )
    print(
        "\nmemory of the patch matrix phi(X) of the im2col form against the input X "
        "(eq. 5.20 forms at most the patch matrix of one group of images, 512 KiB):"
    )
    for label, _, _, _, _, _, cols_bytes, x_bytes in rows:
        print(
            f"  {label:<32} phi(X) {cols_bytes / 2**20:7.2f} MiB, "
            f"X {x_bytes / 2**20:6.2f} MiB: {cols_bytes / x_bytes:.1f} x "
            "(kh kw entries per output pixel, padding zeros included)"
        )
    print()


if __name__ == "__main__":
    main()
