"""Chapter 8 benchmark: implicit differentiation through solvers, against jaxopt's
implicit differentiation and against unrolled jax.grad.

usage: JAX_PLATFORMS=cpu python benchmarks/bench_implicit.py [--repeats N] [--threads T]

Without --threads the script runs itself twice, in subprocesses, and prints both tables:
once at the libraries' default threads, once at one thread (OPENBLAS_NUM_THREADS=1 and
XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1, set before
NumPy and JAX are imported).

1. The logistic hypergradient (section 8.2): dV/ds for the validation loss V of the
   L2-regularised logistic fit at s = log l2 = 0, on scikit-learn's digits (odd against
   even, 64 pixels and a constant, d = 65; 600 training and 1197 validation images).
   - derivlib: `logistic_fit` (Newton, to max |grad| <= 1e-14 n, the rounding level
     the JAX solvers reach) and `logistic_fit_vjp`
     (one LU factorisation of the d x d Hessian; eq. 8.8). Timed together, and the
     backward pass alone against the forward fit.
   - jaxopt: `custom_root` around a JAX Newton solver (12 steps from 0, which reach the
     same gradient tolerance), with `linear_solve.solve_cholesky` for the backward
     system (the best of jaxopt's solvers for a small SPD system), jax.jit of jax.grad
     of V.
   - unrolled: jax.jit of jax.grad of V through the same 12 Newton steps.
   All are compiled before timing; the rows are the best of 10 x repeats calls (70 at
   the default 7), and the ratio is peer time / derivlib time (> 1: derivlib
   faster). Agreement is the relative difference from derivlib's hypergradient; the
   central difference of refits (h = 1e-4) is printed as the reference.
2. Undistortion (section 8.3), 20000 points uniform in [-0.5, 0.5]^2, k = (-0.2,
   0.05): derivlib's `undistort` (fixed-point iteration to 1e-13) and
   `undistort_vjp` against jax.jit of jax.vjp through 60 iterations of the same map
   (enough for the same accuracy).
3. The PnP pose (section 8.4), two scenes, 50 and 500 points, 1 pixel of noise, from
   the DLT start: the gradient in u of L = <G_R, R> + <G_t, t>. derivlib:
   `pnp_pose_pullback` (the layer: the inputs validated once; Chapter 6's
   Levenberg-Marquardt on the manifold, tol 1e-12, as one compiled loop over the
   points; then the linearisation at the pose with the exact Hessian and its LU,
   eq. 8.20) and one call of its vjp. Printed below the table: `pnp_pose` and
   `pnp_pose_vjp` timed alone, each validating its inputs, as every public call
   does.
   jaxopt: `custom_root` (the gradient of the cost in (w, t) as optimality condition,
   `solve_cholesky`) around 8 Gauss-Newton steps in JAX from the same start, which reach
   the same cost; unrolled: jax.grad through the same 8 steps. jax.jit throughout.
   Each call takes under a millisecond, so these rows, and derivlib's forward and
   backward passes alone, are the best of 50 x repeats calls (350 at the default 7).
4. Memory: the temporary buffers XLA allocates for jax.grad through k unrolled Newton
   steps (scan) and through k gradient-descent steps, from the compiled executable's
   memory_analysis(), against jaxopt's implicit gradient, whose memory does not grow
   with k, and derivlib's backward pass (peak of NumPy allocations under tracemalloc).
"""

import argparse
import os
import subprocess
import sys

ONE_THREAD = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=None, help="0: default threads, 1: one thread"
    )
    return parser.parse_args()


def spawn(args):
    for threads in (0, 1):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        if threads == 1:
            env.update(ONE_THREAD)
        command = [sys.executable, __file__, "--threads", str(threads)]
        command += ["--repeats", str(args.repeats)]
        subprocess.run(command, env=env, check=True)


def run(args):
    import tracemalloc
    import warnings

    import jax
    import jax.numpy as jnp
    import numpy as np
    from sklearn.datasets import load_digits

    import derivlib as dl
    from timing import best_of, best_times

    jax.config.update("jax_enable_x64", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jaxopt import linear_solve
        from jaxopt.implicit_diff import custom_root

    def rel(a, b):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    # ----- 1. The logistic hypergradient -----
    digits = load_digits()
    order = np.random.default_rng(0).permutation(digits.target.size)
    X_all = np.vstack([digits.data[order].T / 16.0, np.ones(order.size)])
    y_all = (digits.target[order] % 2).astype(float)
    X, y, Xv, yv = X_all[:, :600], y_all[:600], X_all[:, 600:], y_all[600:]
    d, s0 = X.shape[0], 0.0

    def ours():
        theta = dl.logistic_fit(X, s0, y=y, tol=1e-14)
        G = dl.logistic_grad(theta, Xv, yv) / yv.size
        return float(dl.logistic_fit_vjp(X, s0, G, y=y, theta=theta)[1])

    theta_star = dl.logistic_fit(X, s0, y=y, tol=1e-14)
    G_star = dl.logistic_grad(theta_star, Xv, yv) / yv.size

    def forward():
        return dl.logistic_fit(X, s0, y=y, tol=1e-14)

    def backward():
        return dl.logistic_fit_vjp(X, s0, G_star, y=y, theta=theta_star)

    def V(theta):
        return jnp.mean(jnp.logaddexp(0.0, (1.0 - 2.0 * yv) * (Xv.T @ theta)))

    def newton_step(th, s):
        p = jax.nn.sigmoid(X.T @ th)
        H = (X * (p * (1 - p))) @ X.T + jnp.exp(s) * jnp.eye(d)
        return th - jnp.linalg.solve(H, X @ (p - y) + jnp.exp(s) * th)

    def newton(s, k=12):
        return jax.lax.fori_loop(0, k, lambda _, th: newton_step(th, s), jnp.zeros(d))

    def optimality(theta, s):
        return X @ (jax.nn.sigmoid(X.T @ theta) - y) + jnp.exp(s) * theta

    @custom_root(optimality, solve=linear_solve.solve_cholesky)
    def fit_jaxopt(theta0, s):
        return newton(s)

    theta0 = jnp.zeros(d)
    jaxopt_grad = jax.jit(jax.grad(lambda s: V(fit_jaxopt(theta0, s))))
    unrolled_grad = jax.jit(jax.grad(lambda s: V(newton(s))))
    reference = ours()
    jax_theta = np.asarray(jax.jit(newton)(s0))
    gap = np.abs(dl.logistic_grad(jax_theta, X, y, l2=1.0)).max() / y.size
    h = 1e-4
    central = (
        dl.logistic_loss(dl.logistic_fit(X, s0 + h, y=y), Xv, yv)
        - dl.logistic_loss(dl.logistic_fit(X, s0 - h, y=y), Xv, yv)
    ) / (2 * h * yv.size)
    rows = []
    hyper_repeats = 10 * args.repeats  # a few milliseconds a call
    for name, peer in [
        ("jaxopt custom_root", jaxopt_grad),
        ("unrolled jax.grad, 12 Newton", unrolled_grad),
    ]:
        peer(s0).block_until_ready()
        t_ours, t_peer, _, value = best_times(
            ours, lambda: peer(s0).block_until_ready(), hyper_repeats
        )
        rows.append(
            ("hypergradient dV/ds", name, t_ours, t_peer, rel(value, reference))
        )
    t_fwd = best_of(forward, hyper_repeats)
    t_bwd = best_of(backward, hyper_repeats)

    # ----- 2. Undistortion -----
    rng = np.random.default_rng(1)
    u = rng.uniform(-0.5, 0.5, (2, 20000))
    kd = np.array([-0.2, 0.05])
    Gu = rng.standard_normal(u.shape)

    def undistort_jax(u, kd):
        def step(_, x):
            r = jnp.sum(x * x, axis=0)
            return u / (1 + kd[0] * r + kd[1] * r**2)

        return jax.lax.fori_loop(0, 60, step, u)

    jax_und = jax.jit(lambda u, kd, G: jax.vjp(undistort_jax, u, kd)[1](G))
    jax_und(u, kd, Gu)[0].block_until_ready()

    def ours_und():
        x = dl.undistort(u, kd)
        return dl.undistort_vjp(u, kd, Gu, x=x)

    t_ours, t_peer, mine, theirs = best_times(
        ours_und,
        lambda: [g.block_until_ready() for g in jax_und(u, kd, Gu)],
        args.repeats,
    )
    rows.append(
        (
            "undistort, 20000 points",
            "jax.vjp, 60 iterations",
            t_ours,
            t_peer,
            max(rel(mine[0], theirs[0]), rel(mine[1], theirs[1])),
        )
    )

    # ----- 3. The PnP pose -----
    Kp = np.array([[500.0, 0.0, 320.0], [0.0, 480.0, 240.0], [0.0, 0.0, 1.0]])
    xi_true = np.array([0.1, -0.2, 0.15, 0.1, -0.1, 5.0])
    pnp_repeats = 50 * args.repeats  # each call takes about a millisecond or less

    def pnp_problem(Xp, up, xi0, GR, Gt):
        """derivlib and its two peers on one PnP problem: their rows, the JAX
        solver's cost against derivlib's, and derivlib's forward and backward times."""

        def ours_pnp():
            xi, vjp = dl.pnp_pose_pullback(Xp, Kp, up, xi0=xi0)
            A = dl.rodrigues(xi[:3]).T @ GR  # <G_R, R [d]x> = d . vee(A - A^T)
            Gd = np.array([A[2, 1] - A[1, 2], A[0, 2] - A[2, 0], A[1, 0] - A[0, 1]])
            return vjp(np.concatenate([Gd, Gt]))[0]

        def rot(w):
            th2 = w @ w
            th = jnp.sqrt(th2)
            W = jnp.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])
            return jnp.eye(3) + jnp.sin(th) / th * W + (1 - jnp.cos(th)) / th2 * W @ W

        def pnp_res(x, u):
            p = rot(x[:3]) @ Xp + x[3:, None]
            return ((Kp @ p)[:2] / p[2] - u).ravel()

        def pnp_cost_grad(x, u):
            return jax.grad(lambda x: 0.5 * jnp.sum(pnp_res(x, u) ** 2))(x)

        def gauss_newton(u, k=8):
            def step(_, x):
                r, J = pnp_res(x, u), jax.jacfwd(pnp_res)(x, u)
                return x - jnp.linalg.solve(J.T @ J, J.T @ r)

            return jax.lax.fori_loop(0, k, step, jnp.asarray(xi0))

        @custom_root(pnp_cost_grad, solve=linear_solve.solve_cholesky)
        def pnp_jaxopt(x0, u):
            return gauss_newton(u)

        def pnp_loss(x):
            return jnp.sum(GR * rot(x[:3])) + Gt @ x[3:]

        x0p = jnp.asarray(xi0)
        pnp_peers = [
            (
                "jaxopt custom_root, 8 GN",
                jax.jit(jax.grad(lambda u: pnp_loss(pnp_jaxopt(x0p, u)))),
            ),
            (
                "unrolled jax.grad, 8 GN",
                jax.jit(jax.grad(lambda u: pnp_loss(gauss_newton(u)))),
            ),
        ]
        xi_jax = np.asarray(jax.jit(gauss_newton)(up))
        xi_ours = dl.pnp_pose(Xp, Kp, up, xi0=xi0)
        cost_gap = abs(
            np.sum(dl.reprojection_residual(xi_jax, Xp, Kp, up) ** 2)
            / np.sum(dl.reprojection_residual(xi_ours, Xp, Kp, up) ** 2)
            - 1
        )
        n = Xp.shape[1]
        for name, peer in pnp_peers:
            peer(up).block_until_ready()
            t_ours, t_peer, mine, theirs = best_times(
                ours_pnp, lambda: peer(up).block_until_ready(), pnp_repeats
            )
            rows.append(
                (f"PnP pose, {n} points", name, t_ours, t_peer, rel(theirs, mine))
            )
        t_fwd = best_of(lambda: dl.pnp_pose(Xp, Kp, up, xi0=xi0), pnp_repeats)
        t_bwd = best_of(
            lambda: dl.pnp_pose_vjp(Xp, Kp, up, np.ones(6), xi=xi_ours), pnp_repeats
        )
        return n, cost_gap, t_fwd, t_bwd

    def pnp_scene(n, draw):
        Xp = draw.uniform(-1.0, 1.0, (3, n))
        pc = dl.rodrigues(xi_true[:3]) @ Xp + xi_true[3:, None]
        up = (Kp @ pc)[:2] / pc[2] + draw.standard_normal((2, n))
        xi0 = dl.dlt_pose(Xp, Kp, up)
        return Xp, up, xi0, draw.standard_normal((3, 3)), draw.standard_normal(3)

    pnp_runs = [pnp_problem(*pnp_scene(50, rng))]
    pnp_runs.append(pnp_problem(*pnp_scene(500, np.random.default_rng(500))))

    threads = "one thread" if args.threads == 1 else "default threads"
    print(
        f"\n== {threads}: best of {args.repeats} interleaved repeats ({hyper_repeats} "
        f"for the hypergradient, {pnp_repeats} for PnP); ratio = peer time / derivlib "
        "time (> 1: derivlib faster)\n"
    )
    header = (
        f"{'task':<24} {'peer':<30} {'derivlib':>10} {'peer':>10} {'ratio':>6}  "
        "rel. diff."
    )
    print(header)
    print("-" * len(header))
    for task, peer, a, b, err in rows:
        print(
            f"{task:<24} {peer:<30} {a * 1e3:8.2f}ms {b * 1e3:8.2f}ms {b / a:6.2f}  "
            f"{err:.1e}"
        )
    print(
        f"\nhypergradient: central difference of refits {central:.10f}, derivlib "
        f"{reference:.10f} (rel. diff. {rel(reference, central):.1e}); the JAX Newton "
        f"solver's 12 steps reach max |grad| / n = {gap:.1e}"
    )
    print(
        f"logistic fit at d = {d}, n = {y.size}: forward (Newton) "
        f"{t_fwd * 1e3:.2f} ms, "
        f"backward (logistic_fit_vjp, one LU of the Hessian) {t_bwd * 1e3:.2f} ms, "
        f"backward / forward = {t_bwd / t_fwd:.2f}"
    )

    for n, cost_gap, t_pnp_fwd, t_pnp_bwd in pnp_runs:
        print(
            f"PnP, {n} points: the JAX solver's final cost differs from derivlib's by "
            f"a relative {cost_gap:.1e}; forward (pnp_pose) {t_pnp_fwd * 1e3:.2f} ms, "
            f"backward (pnp_pose_vjp) {t_pnp_bwd * 1e3:.2f} ms"
        )

    # ----- 4. Memory against k -----
    def temp_bytes(fn, *primals):
        return fn.lower(*primals).compile().memory_analysis().temp_size_in_bytes

    L = float(np.linalg.eigvalsh(X @ X.T / 4).max()) + 1.0

    def gd(s, k):
        def body(th, _):
            g = X @ (jax.nn.sigmoid(X.T @ th) - y) + jnp.exp(s) * th
            return th - g / L, None

        return jax.lax.scan(body, jnp.zeros(d), None, length=k)[0]

    def newton_scan(s, k):
        return jax.lax.scan(
            lambda th, _: (newton_step(th, s), None), jnp.zeros(d), None, length=k
        )[0]

    print("\nmemory of the backward pass (XLA temporary buffers; derivlib: NumPy peak)")
    print(
        f"{'k':>6} {'unrolled Newton':>16} {'unrolled GD':>13} {'jaxopt implicit':>16}"
    )
    jaxopt_mem = temp_bytes(jaxopt_grad, s0)
    for k in (10, 100, 1000):
        newton_mem = temp_bytes(
            jax.jit(jax.grad(lambda s, k=k: V(newton_scan(s, k)))), s0
        )
        gd_mem = temp_bytes(jax.jit(jax.grad(lambda s, k=k: V(gd(s, k)))), s0)
        print(
            f"{k:>6} {newton_mem / 1e6:13.2f} MB {gd_mem / 1e6:10.2f} MB "
            f"{jaxopt_mem / 1e6:13.2f} MB"
        )
    tracemalloc.start()
    backward()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"derivlib logistic_fit_vjp: {peak / 1e6:.2f} MB, whatever the solver's k")


def main():
    args = parse()
    if args.threads is None:
        spawn(args)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        run(args)


if __name__ == "__main__":
    main()
