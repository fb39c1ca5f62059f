"""Chapter 7 benchmark: the SPD matrix-logarithm backward rule against jax.vjp through eigh.

usage: JAX_PLATFORMS=cpu python benchmarks/bench_matfun.py [--repeats N]

The task is the gradient of <G, log S> for an SPD S (n x n) and a symmetric G, at
n = 64 and n = 256. derivlib's `logm_spd_vjp` is the Daleckii-Krein rule (eq. 7.14) with
divided differences free of cancellation (eq. 7.15); the peer is
`jax.jit(lambda S, G: jax.vjp(f, S)[1](G))` with f(S) = Q diag(log lam) Q^T from
`jnp.linalg.eigh`, compiled before timing. Both compute one eigendecomposition.

Three spectra, S = Q diag(lam) Q^T with a random orthogonal Q:
  generic        lam evenly spaced in [1, 10];
  near-degenerate the same, with a quarter of the eigenvalues in a cluster 3 + k 1e-13;
  repeated        the same cluster with all its eigenvalues exactly 3.
Accuracy is measured against the reference Q (L o Q^T G Q) Q^T with the Q and lam used
to build S and L from 40-digit decimal divided differences
(`derivlib.check.spd_function_vjp_reference`). The best of several interleaved repeats
is kept; a ratio above 1 means derivlib is faster.

Both eigendecompositions are LAPACK's dsyevd from the OpenBLAS that SciPy ships: derivlib
calls scipy.linalg.lapack.dsyevd directly (NumPy's eigh only if SciPy is missing), and
jaxlib's CPU kernels take their LAPACK from SciPy too. So the script sets
OPENBLAS_NUM_THREADS=1 unless it is set: on a
machine shared with other work, OpenBLAS threads that spin while waiting for a core make
a 64 x 64 eigh take a hundred times longer at random, and the table then measures the
machine's load rather than the two rules.
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from derivlib import logm_spd_vjp  # noqa: E402
from derivlib.check import relative_error, spd_function_vjp_reference  # noqa: E402
from timing import best_times  # noqa: E402

jax.config.update("jax_enable_x64", True)




def log_through_eigh(S):
    lam, Q = jnp.linalg.eigh(S)
    return (Q * jnp.log(lam)) @ Q.T


jax_vjp = jax.jit(lambda S, G: jax.vjp(log_through_eigh, S)[1](G)[0])


def spectrum(n, kind):
    lam = np.linspace(1.0, 10.0, n)
    k = n // 4
    if kind == "near-degenerate":
        lam[:k] = 3.0 + 1e-13 * np.arange(k)
    elif kind == "repeated":
        lam[:k] = 3.0
    return np.sort(lam)


def problem(n, kind, seed=0):
    rng = np.random.default_rng(seed)
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    Q = Q * np.sign(np.diag(R))
    lam = spectrum(n, kind)
    S = (Q * lam) @ Q.T
    S = 0.5 * (S + S.T)
    G = rng.standard_normal((n, n))
    G = 0.5 * (G + G.T)
    return S, G, Q, lam


def describe(X, reference):
    if not np.all(np.isfinite(X)):
        return "NaN", False
    err = relative_error(X, reference)
    return f"{err:.1e}", err < 1e-12


def bench(n, kind, repeats):
    S, G, Q, lam = problem(n, kind)
    Sj, Gj = jnp.asarray(S), jnp.asarray(G)
    jax_vjp(Sj, Gj).block_until_ready()  # compile
    t_ours, t_peer, ours, theirs = best_times(lambda: logm_spd_vjp(S, G),
                                              lambda: jax_vjp(Sj, Gj).block_until_ready(), repeats)
    reference = spd_function_vjp_reference(Q, lam, G, "log")
    return (f"n={n} {kind}", t_ours, t_peer, describe(ours, reference), describe(np.asarray(theirs), reference))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rows = [bench(n, kind, args.repeats) for n in (64, 256)
            for kind in ("generic", "near-degenerate", "repeated")]
    print("gradient of <G, log S>: derivlib logm_spd_vjp vs jax.jit(jax.vjp) through jnp.linalg.eigh")
    print(f"best of {args.repeats} repeats; ratio = jax time / derivlib time (> 1: derivlib faster); "
          f"errors relative to the 40-digit reference\n")
    header = f"{'task':<22} {'derivlib':>9} {'jax':>9} {'ratio':>6}  {'derivlib error':>14}  {'jax error':>10}"
    print(header)
    print("-" * len(header))
    for task, t_ours, t_peer, (e_ours, ok_ours), (e_peer, _) in rows:
        print(f"{task:<22} {t_ours * 1e3:>7.2f}ms {t_peer * 1e3:>7.2f}ms {t_peer / t_ours:>5.2f}x  "
              f"{e_ours:>14}  {e_peer:>10}{'' if ok_ours else '  (derivlib error TOO LARGE)'}")


if __name__ == "__main__":
    main()
