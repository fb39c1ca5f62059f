"""Chapter 5 benchmark: the convolution's backward pass, derivlib against jax.vjp.

usage: JAX_PLATFORMS=cpu python benchmarks/bench_layers.py [--repeats N] [--all-threads]

derivlib.conv2d_vjp (at stride 1, eq. 5.20: nine products with shifted slices) against
jax.jit(lambda X, K, G: jax.vjp(lax.conv_general_dilated, X, K)[1](G)), both in float64,
both returning (Xbar, Kbar) from (X, K, G). JAX is timed after compilation. Both run
side by side in this one process and the best of several repeats is kept. A ratio
above 1 means derivlib is faster.

By default both run on one thread (OpenBLAS for NumPy, XLA's CPU backend for JAX), so
that on a shared machine neither waits for a helper thread that has been descheduled;
--all-threads lets both use every core.

1. N = 32 images, C = 16 channels, 32 x 32, 32 filters of 3 x 3, stride 1, padding 1.
2. The digits size: N = 64, C = 1, 8 x 8, 16 filters of 3 x 3, stride 1, padding 1.
3. As 2 with C = 4 channels: as small, but several channels.

Beside them, the im2col form of the same rules (eq. 5.5-5.6 as written), which
conv2d_vjp uses at stride 2 and above; sizes 2 and 3 show why conv2d_vjp does not switch
to it for small stride-1 inputs (at 2 the two forms are close, at 3 eq. 5.20 is
ahead). Then the memory of the patch matrix phi(X) against the input.
"""

import argparse
import os
import sys

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

from derivlib.layers import _conv2d_vjp_im2col, conv2d_vjp, im2col  # noqa: E402
from timing import best_of, best_times  # noqa: E402

jax.config.update("jax_enable_x64", True)

SIZES = [
    ("N=32 C=16 32x32 O=32 3x3", (32, 16, 32, 32), 32),
    ("N=64 C=1 8x8 O=16 3x3 (digits)", (64, 1, 8, 8), 16),
    ("N=64 C=4 8x8 O=16 3x3", (64, 4, 8, 8), 16),
]


def jax_conv_vjp():
    f = lambda X, K: lax.conv_general_dilated(X, K, (1, 1), [(1, 1), (1, 1)])  # noqa: E731
    return jax.jit(lambda X, K, G: jax.vjp(f, X, K)[1](G))


def bench(label, x_shape, filters, repeats):
    rng = np.random.default_rng(0)
    X = rng.standard_normal(x_shape)
    K = rng.standard_normal((filters, x_shape[1], 3, 3))
    G = rng.standard_normal((x_shape[0], filters) + x_shape[2:])
    peer = jax_conv_vjp()
    Xj, Kj, Gj = (jax.device_put(a) for a in (X, K, G))
    jax.block_until_ready(peer(Xj, Kj, Gj))  # compile

    def run_peer():
        return jax.block_until_ready(peer(Xj, Kj, Gj))

    t_ours, t_peer, ours, theirs = best_times(
        lambda: conv2d_vjp(X, K, G, padding=1), run_peer, repeats
    )
    err = max(
        np.linalg.norm(a - np.asarray(b)) / np.linalg.norm(b)
        for a, b in zip(ours, theirs)
    )

    # where derivlib's time goes: eq. 5.20 (stride 1) against eq. 5.5-5.6 as written
    # (im2col), and the part of eq. 5.20 that only lays out the strips
    N, C, H, W = x_shape

    def strips():
        Xs = np.zeros((C, N, H + 2, W + 2))
        Xs[:, :, 1:-1, 1:-1] = X.transpose(1, 0, 2, 3)
        Gs = np.zeros((filters, N, H + 2, W + 2))
        Gs[:, :, :H, :W] = G.transpose(1, 0, 2, 3)
        return Xs, Gs

    parts = {
        "im2col form (5.5)-(5.6)": best_of(
            lambda: _conv2d_vjp_im2col(X, K, G, 1, 1), repeats
        ),
        "of which im2col": best_of(
            lambda: im2col(X, 3, 3, stride=1, padding=1), repeats
        ),
        "conv2d_vjp Kbar only (input_grad=False)": best_of(
            lambda: conv2d_vjp(X, K, G, padding=1, input_grad=False), repeats
        ),
        "strips of (5.20)": best_of(strips, repeats),
    }
    phi_bytes = N * H * W * C * 9 * 8
    return label, t_ours, t_peer, err, parts, phi_bytes, X.nbytes


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
        f"conv2d_vjp (Xbar and Kbar), float64, {'one thread each' if ONE_THREAD else 'all threads'}, "
        f"best of {args.repeats} repeats; "
        "ratio = peer time / derivlib time (> 1: derivlib faster)\n"
    )
    header = f"{'size':<32} {'derivlib':>10} {'jax.jit(jax.vjp)':>17} {'ratio':>6}  agreement"
    print(header)
    print("-" * len(header))
    for label, t_ours, t_peer, err, _, _, _ in rows:
        print(
            f"{label:<32} {t_ours * 1e3:>8.2f}ms {t_peer * 1e3:>15.2f}ms {t_peer / t_ours:>5.2f}x  "
            f"relative diff = {err:.1e}{'' if err < 1e-12 else '  (TOO LARGE)'}"
        )
    print(
        "\nwhere derivlib's time goes (each timed alone, ms; conv2d_vjp uses eq. 5.20 at stride 1):"
    )
    for label, t_ours, _, _, parts, _, _ in rows:
        print(
            f"  {label:<32} conv2d_vjp {t_ours * 1e3:.2f}  "
            + "  ".join(f"{k} {v * 1e3:.2f}" for k, v in parts.items())
        )
    print(
        "\nmemory of the patch matrix phi(X) of the im2col form against the input X (eq. 5.20 forms none):"
    )
    for label, _, _, _, _, cols_bytes, x_bytes in rows:
        print(
            f"  {label:<32} phi(X) {cols_bytes / 2**20:7.2f} MiB, X {x_bytes / 2**20:6.2f} MiB: "
            f"{cols_bytes / x_bytes:.1f} x (kh kw entries per output pixel, padding zeros included)"
        )
    print()


if __name__ == "__main__":
    main()
