"""Chapter 5 benchmark: the convolution's backward pass, derivlib against jax.vjp.

usage: JAX_PLATFORMS=cpu python benchmarks/bench_layers.py [--repeats N] [--all-threads]

derivlib.conv2d_vjp (im2col, one matrix product per rule, col2im) against
jax.jit(lambda X, K, G: jax.vjp(lax.conv_general_dilated, X, K)[1](G)), both in float64,
both returning (Xbar, Kbar) from (X, K, G). JAX is timed after compilation. Both run
side by side in this one process and the best of several repeats is kept. A ratio
above 1 means derivlib is faster.

By default both run on one thread (OpenBLAS for NumPy, XLA's CPU backend for JAX), so
that on a shared machine neither waits for a helper thread that has been descheduled;
--all-threads lets both use every core.

1. N = 32 images, C = 16 channels, 32 x 32, 32 filters of 3 x 3, stride 1, padding 1.
2. The digits size: N = 64, C = 1, 8 x 8, 16 filters of 3 x 3, stride 1, padding 1.

Then the time of derivlib's backward pass split into its parts, and the memory of the
patch matrix phi(X) against the input.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ONE_THREAD = "--all-threads" not in sys.argv
if ONE_THREAD:  # must be set before NumPy and JAX load their thread pools
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from derivlib.layers import col2im, conv2d_vjp, im2col  # noqa: E402

jax.config.update("jax_enable_x64", True)

SIZES = [("N=32 C=16 32x32 O=32 3x3", (32, 16, 32, 32), 32),
         ("N=64 C=1 8x8 O=16 3x3 (digits)", (64, 1, 8, 8), 16)]


def best_times(ours, peer, repeats):
    """The fastest of `repeats` runs of each (seconds) and their last results, interleaved."""
    best, results = [np.inf, np.inf], [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((ours, peer)):
            start = time.perf_counter()
            results[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1], results[0], results[1]


def best_of(fn, repeats):
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


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

    t_ours, t_peer, ours, theirs = best_times(lambda: conv2d_vjp(X, K, G, padding=1), run_peer, repeats)
    err = max(np.linalg.norm(a - np.asarray(b)) / np.linalg.norm(b) for a, b in zip(ours, theirs))

    # where derivlib's time goes: the steps of conv2d_vjp, each timed alone
    O = filters
    GT = G.transpose(1, 0, 2, 3).reshape(O, -1)
    phi = im2col(X, 3, 3, 1, 1)
    F = K.reshape(O, -1).T
    dphi = (F @ GT).T
    parts = {
        "G^T": best_of(lambda: G.transpose(1, 0, 2, 3).reshape(O, -1), repeats),
        "im2col": best_of(lambda: im2col(X, 3, 3, 1, 1), repeats),
        "phi^T G": best_of(lambda: GT @ phi, repeats),
        "G F^T": best_of(lambda: F @ GT, repeats),
        "col2im": best_of(lambda: col2im(dphi, X.shape, 3, 3, 1, 1), repeats),
    }
    return label, t_ours, t_peer, err, parts, phi.nbytes, X.nbytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--all-threads", action="store_true", help="let NumPy and JAX use every core")
    args = parser.parse_args()
    rows = [bench(label, shape, filters, args.repeats) for label, shape, filters in SIZES]
    print(f"conv2d_vjp (Xbar and Kbar), float64, {'one thread each' if ONE_THREAD else 'all threads'}, "
          f"best of {args.repeats} repeats; "
          "ratio = peer time / derivlib time (> 1: derivlib faster)\n")
    header = f"{'size':<32} {'derivlib':>10} {'jax.jit(jax.vjp)':>17} {'ratio':>6}  agreement"
    print(header)
    print("-" * len(header))
    for label, t_ours, t_peer, err, _, _, _ in rows:
        print(f"{label:<32} {t_ours * 1e3:>8.2f}ms {t_peer * 1e3:>15.2f}ms {t_peer / t_ours:>5.2f}x  "
              f"relative diff = {err:.1e}{'' if err < 1e-12 else '  (TOO LARGE)'}")
    print("\nwhere derivlib's time goes (each step timed alone, ms):")
    for label, t_ours, _, _, parts, _, _ in rows:
        print(f"  {label:<32} " + "  ".join(f"{k} {v * 1e3:.2f}" for k, v in parts.items())
              + f"  (sum {sum(parts.values()) * 1e3:.2f}, whole {t_ours * 1e3:.2f})")
    print("\nmemory of the patch matrix phi(X) against the input X:")
    for label, _, _, _, _, cols_bytes, x_bytes in rows:
        print(f"  {label:<32} phi(X) {cols_bytes / 2**20:7.2f} MiB, X {x_bytes / 2**20:6.2f} MiB: "
              f"{cols_bytes / x_bytes:.1f} x (kh kw = 9, less at the zero-padded border)")
    print()


if __name__ == "__main__":
    main()
