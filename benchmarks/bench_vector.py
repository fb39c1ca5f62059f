"""Time and memory of the column-wise softmax Jacobian at m = 10, n = 1000.

Compares, in one process, derivlib.softmax_jacobian_blocks (the n diagonal m x m blocks,
corrected eq. 2.13) with what a user would otherwise write: jax.jacobian of the
column-wise softmax, as is and under jax.jit (timed after compilation), and derivlib's
own dense softmax_jacobian. The blocks are checked against the JAX result first.

usage: python benchmarks/bench_vector.py [--m 10] [--n 1000] [--repeats 5]
"""

import argparse
import os
import time
import tracemalloc

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import derivlib as dl  # noqa: E402
from derivlib import check  # noqa: E402


def best_time(fn, repeats):
    """Best wall time of `repeats` calls, and the last result."""
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if hasattr(result, "block_until_ready"):
            result.block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best, result


def numpy_peak_bytes(fn):
    """Peak memory allocated by NumPy (traced Python allocations) during one call."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=10)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    m, n = args.m, args.n
    X = np.random.default_rng(0).standard_normal((m, n))

    colwise = lambda X: jax.nn.softmax(X, axis=0)  # noqa: E731
    jacobian = jax.jacobian(colwise)
    jitted = jax.jit(jacobian)
    jitted(jnp.asarray(X)).block_until_ready()  # compile outside the timing

    t_blocks, blocks = best_time(lambda: dl.softmax_jacobian_blocks(X), args.repeats)
    t_jax, J = best_time(lambda: jacobian(jnp.asarray(X)), max(2, args.repeats // 2))
    t_jit, _ = best_time(lambda: jitted(jnp.asarray(X)), max(2, args.repeats // 2))
    t_dense, _ = best_time(lambda: dl.softmax_jacobian(X), max(2, args.repeats // 2))

    J = check.to_vec_layout(J, (m, n), (m, n))
    jax_blocks = np.stack(
        [J[i * m : (i + 1) * m, i * m : (i + 1) * m] for i in range(n)]
    )
    err = check.relative_error(blocks, jax_blocks)
    assert err < 1e-12, f"blocks disagree with jax.jacobian: relative error {err:.2e}"
    del J, jax_blocks

    mem_blocks = numpy_peak_bytes(lambda: dl.softmax_jacobian_blocks(X))
    mem_dense = numpy_peak_bytes(lambda: dl.softmax_jacobian(X))
    jax_bytes = (m * n) ** 2 * 8

    mib = 2.0**20
    print(f"column-wise softmax Jacobian, m = {m}, n = {n} ({m * n} x {m * n} dense)")
    print(f"blocks agree with jax.jacobian: relative error {err:.1e}")
    print(
        f"{'method':<42}{'time (ms)':>12}{'memory (MiB)':>15}{'slower than blocks':>21}"
    )
    rows = [
        ("derivlib.softmax_jacobian_blocks", t_blocks, mem_blocks / mib),
        ("jax.jacobian (no jit)", t_jax, jax_bytes / mib),
        ("jax.jit(jax.jacobian), after compiling", t_jit, jax_bytes / mib),
        ("derivlib.softmax_jacobian (dense)", t_dense, mem_dense / mib),
    ]
    for name, t, mem in rows:
        print(f"{name:<42}{t * 1e3:>12.2f}{mem:>15.1f}{t / t_blocks:>20.0f}x")
    print(
        "memory: traced NumPy peak for derivlib; for JAX the size of its (mn, mn) result"
    )


if __name__ == "__main__":
    main()
