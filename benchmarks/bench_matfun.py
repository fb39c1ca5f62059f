"""Chapter 7 benchmark: the SPD matrix-logarithm backward rule against jax.vjp through eigh,
and the covariance-pooling layer's backward rule against the same for the whole layer.

usage: JAX_PLATFORMS=cpu python benchmarks/bench_matfun.py [--repeats N]

The task is the gradient of <G, log S> for an SPD S (n x n) and a symmetric G, at
n = 64 and n = 256. derivlib's `logm_spd_vjp` is the Daleckii-Krein rule (eq. 7.14) with
divided differences free of cancellation (eq. 7.15's artanh form where the eigenvalues are
within a factor 3, the literal quotient of the logarithms elsewhere); the peer is
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

Then where derivlib's time goes at the generic spectrum, each part timed alone: the
eigendecomposition (dsyevd), the Loewner matrix, and the four matrix products of eq. 7.14
with the Hadamard product.

Covariance pooling (section 7.5): the gradients (F_bar, W_bar) of <G, covariance_pool(F, W,
eps)> for a batch of N images with d features at p pixels, projected to k, at the size the
chapter trains on the digits (N = 64, d = 8, p = 64, k = 4) and at a larger one (N = 32,
d = 32, p = 196, k = 16); the peer is jax.jit of jax.vjp of the same layer through
jnp.linalg.eigh, batched. The two agree to the printed relative difference (random data:
well-separated eigenvalues, where JAX is accurate).

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

from derivlib import covariance_pool_vjp, logm_spd_vjp, matfun  # noqa: E402
from derivlib.check import relative_error, spd_function_vjp_reference  # noqa: E402
from timing import best_of, best_times  # noqa: E402

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
    t_ours, t_peer, ours, theirs = best_times(
        lambda: logm_spd_vjp(S, G), lambda: jax_vjp(Sj, Gj).block_until_ready(), repeats
    )
    reference = spd_function_vjp_reference(Q, lam, G, "log")
    return (
        f"n={n} {kind}",
        t_ours,
        t_peer,
        describe(ours, reference),
        describe(np.asarray(theirs), reference),
    )


def parts(n, repeats):
    """derivlib's logm_spd_vjp in its parts (ms), at the generic spectrum."""
    S, G, _, _ = problem(n, "generic")
    S = matfun.sym(S)
    lam, Q = matfun._eigh(S.copy())
    Qt, X = Q.T, matfun.sym(G)
    L = matfun._loewner(lam, "log")
    return {
        "total": best_of(lambda: logm_spd_vjp(S, G), repeats),
        "dsyevd": best_of(lambda: matfun._eigh(S.copy(), overwrite=True), repeats),
        "Loewner matrix": best_of(lambda: matfun._loewner(lam, "log"), repeats),
        "products": best_of(lambda: Q @ (L * (Qt @ X @ Q)) @ Qt, repeats),
    }


def pool_through_eigh(F, W, eps):
    M = W @ (F - F.mean(axis=-1, keepdims=True))
    C = M @ jnp.swapaxes(M, -1, -2) / F.shape[-1] + eps * jnp.eye(W.shape[0])
    lam, Q = jnp.linalg.eigh(C)
    return (Q * jnp.log(lam)[..., None, :]) @ jnp.swapaxes(Q, -1, -2)


POOL_EPS = 1e-3
pool_vjp = jax.jit(
    lambda F, W, G: jax.vjp(lambda F, W: pool_through_eigh(F, W, POOL_EPS), F, W)[1](G)
)


def bench_pool(N, d, p, k, repeats, seed=0):
    rng = np.random.default_rng(seed)
    F, W, G = (
        rng.standard_normal((N, d, p)),
        rng.standard_normal((k, d)),
        rng.standard_normal((N, k, k)),
    )
    Fj, Wj, Gj = map(jnp.asarray, (F, W, G))
    jax.block_until_ready(pool_vjp(Fj, Wj, Gj))  # compile
    t_ours, t_peer, ours, theirs = best_times(
        lambda: covariance_pool_vjp(F, W, G, eps=POOL_EPS),
        lambda: jax.block_until_ready(pool_vjp(Fj, Wj, Gj)),
        repeats,
    )
    difference = max(relative_error(a, np.asarray(b)) for a, b in zip(ours, theirs))
    return f"N={N} d={d} p={p} k={k}", t_ours, t_peer, difference


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rows = [
        bench(n, kind, args.repeats)
        for n in (64, 256)
        for kind in ("generic", "near-degenerate", "repeated")
    ]
    print(
        "gradient of <G, log S>: derivlib logm_spd_vjp vs jax.jit(jax.vjp) through jnp.linalg.eigh"
    )
    print(
        f"best of {args.repeats} repeats; ratio = jax time / derivlib time (> 1: derivlib faster); "
        f"errors relative to the 40-digit reference\n"
    )
    header = f"{'task':<22} {'derivlib':>9} {'jax':>9} {'ratio':>6}  {'derivlib error':>14}  {'jax error':>10}"
    print(header)
    print("-" * len(header))
    for task, t_ours, t_peer, (e_ours, ok_ours), (e_peer, _) in rows:
        print(
            f"{task:<22} {t_ours * 1e3:>7.2f}ms {t_peer * 1e3:>7.2f}ms {t_peer / t_ours:>5.2f}x  "
            f"{e_ours:>14}  {e_peer:>10}{'' if ok_ours else '  (derivlib error TOO LARGE)'}"
        )
    print("\nwhere derivlib's time goes, generic spectrum (each part timed alone, ms):")
    for n in (64, 256):
        timed = parts(n, args.repeats)
        print(
            f"  n={n:<4} " + "  ".join(f"{k} {v * 1e3:.3f}" for k, v in timed.items())
        )
    pools = [
        bench_pool(64, 8, 64, 4, args.repeats),
        bench_pool(32, 32, 196, 16, args.repeats),
    ]
    print(
        "\ncovariance pooling, gradients (F_bar, W_bar) of a batch: derivlib covariance_pool_vjp vs "
        "jax.jit(jax.vjp) through jnp.linalg.eigh\n"
    )
    header = f"{'task':<24} {'derivlib':>9} {'jax':>9} {'ratio':>6}  {'difference':>10}"
    print(header)
    print("-" * len(header))
    for task, t_ours, t_peer, difference in pools:
        print(
            f"{task:<24} {t_ours * 1e3:>7.2f}ms {t_peer * 1e3:>7.2f}ms {t_peer / t_ours:>5.2f}x  {difference:>10.1e}"
        )


if __name__ == "__main__":
    main()
