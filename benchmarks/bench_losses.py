"""Chapter 3 benchmark: derivlib's derived Newton fits and Hessian against their peers.

usage: JAX_PLATFORMS=cpu python benchmarks/bench_losses.py [--repeats N]

Each pair runs side by side in this one process, on the same data, and the best of
several repeats is kept (the machine may be busy; the ratios are what matter). A ratio
above 1 means derivlib is faster.

1. fit_logistic, synthetic d = 100, n = 100,000, l2 = 1, against scikit-learn's
   LogisticRegression(solver="newton-cholesky", fit_intercept=False, C = 1 / l2).
   scikit-learn minimises L / n: its loss and l2 / 2 ||theta||^2 are both divided by n
   (l2_reg_strength = 1 / (C n)), and it stops when max |grad (L / n)| <= tol. derivlib
   stops when max |grad L| <= tol * n: the same rule, so both get the same tol.
2. fit_multinomial, the full digits set (n = 1797, d = 64, k = 10, pixels / 16),
   l2 = 1, against the same scikit-learn solver (multinomial; coef_.T is Theta).
3. logistic_hessian at d = 100, n = 100,000 against jax.jit(jax.hessian(loss)), timed
   after compilation.
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from derivlib import fit_logistic, fit_multinomial, logistic_hessian  # noqa: E402
from timing import best_times  # noqa: E402

jax.config.update("jax_enable_x64", True)

TOL = 1e-10


def sklearn_newton(X_rows, labels, l2):
    model = LogisticRegression(
        C=1.0 / l2, fit_intercept=False, solver="newton-cholesky", tol=TOL, max_iter=100
    )
    return model.fit(X_rows, labels).coef_


def synthetic_binary(d=100, n=100_000, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((d, n))
    theta_true = rng.standard_normal(d) / np.sqrt(d) * 3
    y = (rng.random(n) < 1 / (1 + np.exp(-X.T @ theta_true))).astype(float)
    return X, y


def bench_logistic(repeats):
    X, y = synthetic_binary()
    X_rows = np.ascontiguousarray(X.T)  # scikit-learn's layout, made outside the timing
    t_ours, t_peer, theta, coef = best_times(
        lambda: fit_logistic(X, y, l2=1.0, tol=TOL),
        lambda: sklearn_newton(X_rows, y, 1.0),
        repeats,
    )
    diff = np.max(np.abs(theta - coef.ravel()))
    return (
        "fit_logistic d=100 n=100000 l2=1",
        "sklearn newton-cholesky",
        t_ours,
        t_peer,
        f"max |theta diff| = {diff:.1e}",
        diff < 1e-8,
    )


def bench_multinomial(repeats):
    X_rows, labels = load_digits(return_X_y=True)
    X_rows = X_rows / 16.0
    X, Y = np.ascontiguousarray(X_rows.T), np.eye(10)[:, labels]
    t_ours, t_peer, Theta, coef = best_times(
        lambda: fit_multinomial(X, Y, l2=1.0, tol=TOL),
        lambda: sklearn_newton(X_rows, labels, 1.0),
        repeats,
    )
    diff = np.max(np.abs(Theta - coef.T))
    return (
        "fit_multinomial digits k=10 l2=1",
        "sklearn newton-cholesky",
        t_ours,
        t_peer,
        f"max |Theta diff| = {diff:.1e}",
        diff < 1e-6,
    )


def bench_hessian(repeats):
    X, y = synthetic_binary()
    theta = np.random.default_rng(1).standard_normal(X.shape[0]) * 0.1
    Xj, yj = jnp.asarray(X), jnp.asarray(y)

    def loss(t):
        z = Xj.T @ t
        return -(yj @ jax.nn.log_sigmoid(z) + (1 - yj) @ jax.nn.log_sigmoid(-z))

    jax_hess = jax.jit(jax.hessian(loss))
    tj = jnp.asarray(theta)
    jax_hess(tj).block_until_ready()  # compile
    t_ours, t_peer, H, H_jax = best_times(
        lambda: logistic_hessian(theta, X, y),
        lambda: jax_hess(tj).block_until_ready(),
        repeats,
    )
    err = np.linalg.norm(H - np.asarray(H_jax)) / np.linalg.norm(H_jax)
    return (
        "logistic_hessian d=100 n=100000",
        "jax.jit(jax.hessian)",
        t_ours,
        t_peer,
        f"relative diff = {err:.1e}",
        err < 1e-10,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows = [
        bench(args.repeats)
        for bench in (bench_logistic, bench_multinomial, bench_hessian)
    ]
    print(
        f"best of {args.repeats} repeats; ratio = peer time / derivlib time (> 1: derivlib faster)\n"
    )
    header = (
        f"{'task':<34} {'peer':<24} {'derivlib':>9} {'peer':>9} {'ratio':>6}  agreement"
    )
    print(header)
    print("-" * len(header))
    for task, peer, t_ours, t_peer, agreement, ok in rows:
        print(
            f"{task:<34} {peer:<24} {t_ours:>8.3f}s {t_peer:>8.3f}s {t_peer / t_ours:>5.2f}x  "
            f"{agreement}{'' if ok else '  (TOO LARGE)'}"
        )
    print()
    for task, peer, t_ours, t_peer, *_ in rows:
        print(f"ratio {task} vs {peer}: {t_peer / t_ours:.2f}x")


if __name__ == "__main__":
    main()
