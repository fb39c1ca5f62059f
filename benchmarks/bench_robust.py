"""Chapter 6 benchmark: robust perspective-n-point, derivlib's Levenberg-Marquardt on
Triggs' corrected normal equations against scipy.optimize.least_squares with the same
loss.

usage: JAX_PLATFORMS=cpu python benchmarks/bench_robust.py [--repeats N] [--points N]

The problem: n world points (default 2000) in [-1, 1]^3 seen by one camera at the
chapter's K, 0.5 pixel noise, 20% of the images moved by up to 60 pixels; the start is
the true pose moved by 0.02 in each coordinate. For each loss ('huber', 'cauchy', scale
2 pixels) derivlib's `solve_pnp_robust` (tol = 1e-12) gives the reference cost E*
(E_rho, twice scipy's cost). scipy's trust-region solver (method="trf", the analytic
Jacobian `reprojection_jacobian`, x_scale="jac", ftol = xtol = gtol = 1e-15) stops,
through its callback, at the first iteration whose cost is within 1e-8 relative of
E* (or at its own rule, and then the table says whether it got there). The two are
interleaved in every round and the best of several repeats is kept; the ratio is
scipy's time over derivlib's (above 1: derivlib is faster).

Two tables: BLAS at the libraries' default threads, then limited to one thread
(threadpoolctl), for both solvers alike.
"""

import argparse

import numpy as np
from scipy.optimize import least_squares
from threadpoolctl import threadpool_limits
from timing import best_times

import derivlib as dl

RTOL = 1e-8
K = np.array([[520.0, 1.5, 310.0], [0.0, 480.0, 250.0], [0.0, 0.0, 1.0]])
XI = np.array([0.1, -0.3, 0.2, 0.2, -0.1, 4.0])


def scene(n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (3, n))
    u = dl.project(dl.transform(XI, X), K) + 0.5 * rng.standard_normal((2, n))
    out = rng.choice(n, n // 5, replace=False)
    u[:, out] += rng.uniform(-60, 60, (2, out.size))
    return X, u


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--points", type=int, default=2000)
    args = parser.parse_args()
    for threads in ["default", 1]:
        if threads == 1:
            with threadpool_limits(limits=1):
                table(args, threads)
        else:
            table(args, threads)


def table(args, threads):
    X, u = scene(args.points)
    xi0 = XI + 0.02
    print(
        f"robust PnP, {args.points} points (20% outliers), BLAS threads: "
        f"{threads}, best of {args.repeats}"
    )
    print(
        f"{'loss':8} {'derivlib s':>11} {'iters':>6} {'scipy s':>9} {'nfev':>6} "
        f"{'ratio':>6}  scipy reached E* to 1e-8"
    )
    for loss in ["huber", "cauchy"]:
        _, hist = dl.solve_pnp_robust(X, K, u, loss=loss, f_scale=2.0, xi0=xi0)
        E_ref = hist.cost[-1]

        def ours():
            return dl.solve_pnp_robust(X, K, u, loss=loss, f_scale=2.0, xi0=xi0)

        def stop(intermediate_result):
            if 2 * intermediate_result.cost <= E_ref * (1 + RTOL):
                raise StopIteration

        def peer():
            return least_squares(
                lambda xi: dl.reprojection_residual(xi, X, K, u),
                xi0,
                jac=lambda xi: dl.reprojection_jacobian(xi, X, K),
                loss=loss,
                f_scale=2.0,
                x_scale="jac",
                ftol=1e-15,
                xtol=1e-15,
                gtol=1e-15,
                callback=stop,
            )

        t_ours, t_peer, (_, h), res = best_times(ours, peer, args.repeats)
        reached = 2 * res.cost <= E_ref * (1 + RTOL)
        print(
            f"{loss:8} {t_ours:11.4f} {h.n_iter:6d} {t_peer:9.4f} {res.nfev:6d} "
            f"{t_peer / t_ours:6.2f}  {reached}"
        )


if __name__ == "__main__":
    main()
