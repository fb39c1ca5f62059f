"""Chapter 6 benchmark: bundle adjustment, derivlib's Levenberg-Marquardt with analytic
Jacobians and the Schur complement against scipy.optimize.least_squares.

usage: JAX_PLATFORMS=cpu python benchmarks/bench_geometry.py [--repeats N] [--cameras M]
       [--points N] [--noise PIXELS]

The problem: make_scene(m=10, n=500, noise=0.5 pixel, seed=0), a synthetic scene with
partial visibility, and the chapter's gauge (camera 0 and the x-translation of camera 1
held fixed, so every solver works on the same free parameters). The measure is the time
to reach the same cost: derivlib runs to its own stopping rule (tol = 1e-12), and its
final cost E* = ||r||^2 is the reference; each scipy run stops, through its callback, at the
first iteration whose cost is within 1e-8 relative of E* (scipy's cost is E / 2).

The peers, with the settings that serve them best:
1. least_squares(method="trf", jac="2-point", jac_sparsity=the block pattern,
   x_scale="jac", ftol = xtol = gtol = 1e-15): grouped finite differences, so one
   Jacobian costs about ten residual evaluations, and the sparse trust-region solver
   (tr_solver="lsmr", the default for a sparse Jacobian).
2. The same, given derivlib's analytic sparse Jacobian (jac=ba_jacobian(free_only=True)).

Each solver starts from the same point; the three are interleaved in every round and
the best of several repeats is kept. The ratio is each solver's time over derivlib's:
above 1 means derivlib is faster. The whole comparison runs twice, each time in a fresh
process: at the libraries' default threads (OpenBLAS's) and with OPENBLAS_NUM_THREADS=1
for all three.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np
from scipy.optimize import least_squares

from derivlib import (
    ba_jacobian,
    ba_residual,
    ba_sparsity_pattern,
    bundle_adjust,
    make_scene,
)  # noqa: E402

RTOL = 1e-8


def scipy_to_cost(problem, x0, E_ref, analytic):
    """Run least_squares on the free parameters until its cost 2 * cost <= E_ref."""
    keep = problem.free_mask()

    def full(z):
        x = x0.copy()
        x[keep] = z
        return x

    calls = [0]

    def residual(z):
        calls[0] += 1
        return ba_residual(problem, full(z))

    def stop(intermediate_result):
        if 2 * intermediate_result.cost <= E_ref * (1 + RTOL):
            raise StopIteration

    kwargs = dict(
        method="trf",
        x_scale="jac",
        ftol=1e-15,
        xtol=1e-15,
        gtol=1e-15,
        max_nfev=100_000,
        callback=stop,
    )
    if analytic:
        kwargs["jac"] = lambda z: ba_jacobian(problem, full(z), free_only=True)
    else:
        kwargs["jac"] = "2-point"
        kwargs["jac_sparsity"] = ba_sparsity_pattern(problem)[:, keep]
    res = least_squares(residual, x0[keep], **kwargs)
    res.calls = calls[
        0
    ]  # every residual evaluation, those of finite differences included
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cameras", type=int, default=10)
    parser.add_argument("--points", type=int, default=500)
    parser.add_argument("--noise", type=float, default=0.5, help="image noise (pixels)")
    parser.add_argument(
        "--worker", action="store_true", help="run one thread setting (internal)"
    )
    parser.add_argument(
        "--perturbation",
        type=float,
        default=1.0,
        help="scale of the start's error (1: 0.02 rad, 0.1 and 0.05 in translation and points)",
    )
    args = parser.parse_args()
    if not args.worker:
        for threads in ("default", "1"):
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                if threads == "1":
                    env[var] = "1"
                else:
                    env.pop(var, None)
            print(f"\n=== BLAS threads: {threads} ===", flush=True)
            subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--worker", *sys.argv[1:]],
                env=env,
                check=True,
            )
        return
    scene = make_scene(
        m=args.cameras,
        n=args.points,
        noise=args.noise,
        seed=0,
        perturbation=args.perturbation,
    )
    problem, x0 = scene.problem, scene.x0

    runs = {
        "derivlib LM + Schur": lambda: bundle_adjust(problem, x0),
        "scipy trf, 2-point + sparsity": None,
        "scipy trf, derivlib's jacobian": None,
    }
    x_ours, hist = runs["derivlib LM + Schur"]()
    E_ref = hist.cost[-1]
    runs["scipy trf, 2-point + sparsity"] = lambda: scipy_to_cost(
        problem, x0, E_ref, analytic=False
    )
    runs["scipy trf, derivlib's jacobian"] = lambda: scipy_to_cost(
        problem, x0, E_ref, analytic=True
    )

    best, results = {k: np.inf for k in runs}, {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)

    N = problem.cam.size
    print(
        f"bundle adjustment: m = {problem.m} cameras, n = {problem.n} points, {N} observations "
        f"({2 * N} residuals, {int(problem.free_mask().sum())} free parameters), noise "
        f"{args.noise:g} pixel, "
        f"start perturbation x{args.perturbation:g}"
    )
    print(
        f"reference: derivlib's final cost E* = ||r||^2 = {E_ref:.10g}; scipy stops within "
        f"{RTOL:.0e} relative of it (its cost is E / 2)"
    )
    print(f"best of {args.repeats} repeats; ratio = solver time / derivlib time\n")
    header = (
        f"{'solver':<32} {'time':>9} {'ratio':>7} {'residual evals':>15} {'jacobian evals':>15}"
        f"  final cost E"
    )
    print(header)
    print("-" * len(header))
    t_ours = best["derivlib LM + Schur"]
    for name in runs:
        if name == "derivlib LM + Schur":
            nfev, njev, E = hist.n_residual, hist.n_jacobian, hist.cost[-1]
        else:
            res = results[name]
            nfev, njev, E = (
                res.calls,
                res.njev if res.njev is not None else 0,
                2 * res.cost,
            )
            if not (abs(E - E_ref) <= RTOL * E_ref or E < E_ref):
                raise AssertionError(
                    f"{name} stopped at cost {E:.12g}, not within {RTOL} of {E_ref:.12g}"
                )
        print(
            f"{name:<32} {best[name]:>8.3f}s {best[name] / t_ours:>6.1f}x {nfev:>15d} {njev:>15d}  {E:.10g}"
        )
    print(
        "\nresidual evals count every call of the residual, finite differences included "
        "(scipy's own nfev leaves those out); jacobian evals are iterations' Jacobians."
    )


if __name__ == "__main__":
    main()
