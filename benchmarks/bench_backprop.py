"""Chapter 4 benchmark: derivlib's backward rules against JAX and against Jacobians.

usage: JAX_PLATFORMS=cpu python benchmarks/bench_backprop.py [--repeats N]

Each pair runs side by side in this one process, on the same data, and the best of
several repeats is kept (the machine may be busy; the ratios are what matter). A ratio
above 1 means derivlib is faster. Everything is float64.

1. The softmax VJP (eq. 4.9) at m = n = 1000 (softmax of each column), against
   jax.jit of jax.vjp of jax.nn.softmax(X, axis=0), timed after compilation. Both
   compute the softmax from X and then pull G back.
2. The same VJP against forming the n Jacobian blocks diag(s_i) - s_i s_i^T
   (derivlib.softmax_jacobian_blocks, corrected eq. 2.13) and multiplying each by its
   column of G, in chunks of 10 columns (10 blocks, 80 MB, at a time; all 1000 blocks
   would take 8 GB). It takes seconds, so it runs once.
3. One gradient evaluation of the MLP of eq. 4.19 (digits, 64 -> 64 tanh -> 10
   softmax, batch of 256 training images): derivlib's loss and backward pass
   (eq. 4.20, mlp_loss_and_grad) against jax.jit(jax.value_and_grad(loss)) of the
   same loss written in jax.numpy, timed after compilation. Twice: with derivlib's
   default checks of every input for NaN and infinity, and with check_finite=False,
   which is how fit_mlp calls it inside its training loop after checking the data once.

Then the memory traffic of item 1 (Chapter 4, "Passes over memory"): the formula (4.9)
in plain NumPy (nine passes) timed against the same jax.jit(jax.vjp); the time of one
pass over an 8 MB array (a read, a copy, a copy into a new array, an exp in place, a
subtraction of a row from every row);
the kernels of XLA's compiled pullback with the (m, n) arrays each reads and writes
(from the compiled HLO); and those times converted into the memory traffic of
softmax_vjp's three passes, of XLA's kernels, of the NumPy formula's nine passes (17
arrays), and of the three arrays that any implementation must move; then softmax_vjp's
time stage by stage (`softmax_vjp_stages`).

The last lines print the log-log slopes of wall time against the size m of a vector
softmax, for forming the Jacobian and multiplying and for the VJP (the chapter's figure
counts operations instead, which is machine-independent).

Both sides run on one thread by default (NumPy's BLAS through threadpoolctl, XLA's CPU
backend through XLA_FLAGS), so that neither gains from, or pays for, threads on small
matrices; --threads 0 leaves both at their defaults.

With --seeds, it also repeats the chapter's comparison of test accuracy on the digits,
derivlib's fit_mlp against scikit-learn's MLPClassifier, for seeds 0 to 4 (the chapter
runs seeds 0 to 2); that takes a few seconds per seed.
"""

import argparse
import contextlib
import os
import re
import sys
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if (
    "--threads" not in sys.argv or sys.argv[sys.argv.index("--threads") + 1] != "0"
):  # before jax is imported
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import derivlib as dl  # noqa: E402
from timing import best_of, best_times  # noqa: E402

jax.config.update("jax_enable_x64", True)


def relative_error(a, b):
    return float(
        np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
    )


def softmax_problem(m=1000, n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, n)) * 3, rng.standard_normal((m, n))


def softmax_pullback():
    """jax.jit of the pullback of jax.nn.softmax down the columns, the peer of every
    softmax row."""
    return jax.jit(
        lambda X, G: jax.vjp(lambda Y: jax.nn.softmax(Y, axis=0), X)[1](G)[0]
    )


def bench_softmax_against_jax(ours, task, repeats):
    """`ours(X, G)` on the softmax problem against the compiled JAX pullback,
    interleaved."""
    X, G = softmax_problem()
    pullback = softmax_pullback()
    Xj, Gj = jnp.asarray(X), jnp.asarray(G)
    pullback(Xj, Gj).block_until_ready()  # compile
    t_ours, t_peer, mine, theirs = best_times(
        lambda: ours(X, G),
        lambda: pullback(Xj, Gj).block_until_ready(),
        5 * repeats,  # 5 ms each: more samples for the best of
    )
    err = relative_error(mine, theirs)
    return (
        task,
        "jax.jit(jax.vjp)",
        t_ours,
        t_peer,
        f"relative diff = {err:.1e}",
        err < 1e-12,
    )


def bench_softmax_jax(repeats):
    return bench_softmax_against_jax(dl.softmax_vjp, "softmax_vjp m=n=1000", repeats)


def softmax_vjp_numpy(X, G):
    """(4.9) in NumPy, one operation at a time (Chapter 4's cell in "Passes over
    memory"): nine passes over whole arrays."""
    S = np.exp(X - X.max(axis=0))
    S /= S.sum(axis=0)
    return S * (G - (S * G).sum(axis=0))


def bench_softmax_numpy_jax(repeats):
    """The same comparison as bench_softmax_jax, with the formula in plain NumPy on
    derivlib's side: what fusing the passes is worth."""
    return bench_softmax_against_jax(
        softmax_vjp_numpy, "(4.9) in plain NumPy m=n=1000", repeats
    )


def xla_kernels(pullback, Xj, Gj):
    """The kernels of the compiled pullback (the ops of its entry computation) and, for
    each, how many arrays of the size of X it reads and writes: a lower bound on its
    passes over memory (a kernel may read an operand more than once)."""
    text = pullback.lower(Xj, Gj).compile().as_text()
    entry = text[text.index("\nENTRY") :].splitlines()[1:]
    big = f"f64[{Xj.shape[0]},{Xj.shape[1]}]"
    shapes, kernels = {}, []
    for line in entry:
        found = re.match(
            r"\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? (\w+)\((.*?)\)", line
        )
        if not found:
            continue
        name, shape, op, args = found.groups()
        shapes[name] = shape
        if op in ("parameter", "constant"):
            continue
        reads = sum(shapes.get(a.strip().lstrip("%")) == big for a in args.split(","))
        kernels.append((name, reads, int(shape == big)))
    return kernels


def memory_passes(repeats):
    """The time of one pass over an 8 MB array (X of the softmax problem), and what
    memory bandwidth alone allows a softmax VJP: any implementation reads X and G and
    writes Xbar, three arrays of 8 MB."""
    X, G = softmax_problem()
    out = np.empty_like(X)
    t_read = best_of(lambda: np.add.reduce(X, axis=None), repeats * 3)
    t_copy = best_of(lambda: np.copyto(out, X), repeats * 3)
    t_fresh = best_of(lambda: X.copy(), repeats * 3)
    t_exp = best_of(lambda: np.exp(X, out=out), repeats * 3)
    M = X.max(axis=0)
    t_row = best_of(lambda: np.subtract(X, M, out=out), repeats * 3)
    kernels = xla_kernels(softmax_pullback(), jnp.asarray(X), jnp.asarray(G))
    mb = X.nbytes / 1e6
    print(f"\none pass over an {mb:.0f} MB array (X of the softmax problem):")
    for what, t, moved in [
        ("read (sum of X)", t_read, mb),
        ("read and write (copy into an array)", t_copy, 2 * mb),
        ("read and write into a new array", t_fresh, 2 * mb),
        ("exp of every entry, in place", t_exp, 2 * mb),
        ("X - 1 M^T (a row broadcast) into an array", t_row, 2 * mb),
    ]:
        print(f"  {what:<42} {t * 1e3:6.2f} ms, {moved / t / 1e3:5.1f} GB/s")
    transfers = sum(r + w for _, r, w in kernels)
    print(
        f"XLA's pullback: {len(kernels)} kernels, "
        f"{sum(1 for _, r, w in kernels if r + w)} of them over (m, n) arrays, "
        f"reading or writing at least {transfers} arrays of {mb:.0f} MB"
    )
    per_array = t_copy / 2  # one array read or written, at the copy's rate
    print(
        f"softmax_vjp: 3 passes, 7 arrays of {mb:.0f} MB read or written; "
        f"at the copy's rate {7 * per_array * 1e3:.2f} ms of memory traffic, XLA's "
        f"{transfers * per_array * 1e3:.2f} ms, the NumPy formula's (17 arrays) "
        f"{17 * per_array * 1e3:.2f} ms; any implementation moves at least 3 "
        f"arrays: {3 * per_array * 1e3:.2f} ms"
    )


def softmax_vjp_stages(repeats):
    """Where softmax_vjp's time goes: its passes (derivlib.backprop's
    `_softmax_vjp_columns`, the same operations on the same blocks of rows) with a
    clock around each kind of operation, the best of `repeats` runs of each. The
    stages' sum exceeds the whole by the clocks' own cost (about a microsecond for
    each of the 180 or so readings)."""
    from time import perf_counter

    from derivlib.backprop import _BLOCK

    X, G = softmax_problem()
    m, n = X.shape
    rows = max(1, _BLOCK // n)
    names = [
        "pass 1: column maxima M (reads X)",
        "pass 2: X - M into the result",
        "pass 2: its column sums (the finiteness test)",
        "pass 2: exp, in place",
        "pass 2: column sums s of E",
        "pass 2: E o G and its column sums d",
        "pass 3: G - d / s, then two products in place",
    ]
    best = dict.fromkeys(names, np.inf)
    for _ in range(repeats):
        spent = dict.fromkeys(names, 0.0)
        out, work = np.empty((m, n)), np.empty((min(rows, m), n))
        s, d, x_sums, part = np.zeros(n), np.zeros(n), np.zeros(n), np.empty(n)
        t0 = perf_counter()
        M = X.max(axis=0)
        spent[names[0]] += perf_counter() - t0
        for start in range(0, m, rows):
            E, Gb = out[start : start + rows], G[start : start + rows]
            T = work[: E.shape[0]]
            t0 = perf_counter()
            np.subtract(X[start : start + rows], M, out=E)
            t1 = perf_counter()
            x_sums += np.add.reduce(E, axis=0, out=part)
            t2 = perf_counter()
            np.exp(E, out=E)
            t3 = perf_counter()
            s += np.add.reduce(E, axis=0, out=part)
            t4 = perf_counter()
            d += np.add.reduce(np.multiply(E, Gb, out=T), axis=0, out=part)
            t5 = perf_counter()
            for name, a, b in zip(
                names[1:6], (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)
            ):
                spent[name] += b - a
        r = 1.0 / s
        d *= r
        t0 = perf_counter()
        for start in range(0, m, rows):
            E = out[start : start + rows]
            T = work[: E.shape[0]]
            np.subtract(G[start : start + rows], d, out=T)
            E *= T
            E *= r
        spent[names[6]] += perf_counter() - t0
        for name in names:
            best[name] = min(best[name], spent[name])
    whole = best_of(lambda: dl.softmax_vjp(X, G), repeats)
    print(f"\nsoftmax_vjp by stage, m = n = {m} (best of {repeats} each):")
    for name in names:
        print(f"  {name:<48} {best[name] * 1e3:6.2f} ms")
    print(
        f"  {'sum of the stages':<48} {sum(best.values()) * 1e3:6.2f} ms; "
        f"softmax_vjp itself {whole * 1e3:.2f} ms"
    )


def jacobian_blocks_then_multiply(X, G, chunk=10):
    """J^T G column by column, from the formed (m, m) Jacobian blocks."""
    out = np.empty_like(G)
    for start in range(0, X.shape[1], chunk):
        cols = slice(start, start + chunk)
        blocks = dl.softmax_jacobian_blocks(X[:, cols])  # (chunk, m, m)
        out[:, cols] = np.matmul(blocks.transpose(0, 2, 1), G[:, cols].T[:, :, None])[
            :, :, 0
        ].T
    return out


def bench_softmax_blocks(repeats):
    X, G = softmax_problem()
    t_ours, t_peer, ours, theirs = best_times(
        lambda: dl.softmax_vjp(X, G), lambda: jacobian_blocks_then_multiply(X, G), 1
    )
    err = relative_error(ours, theirs)
    return (
        "softmax_vjp m=n=1000",
        "Jacobian blocks, then J^T G",
        t_ours,
        t_peer,
        f"relative diff = {err:.1e}",
        err < 1e-12,
    )


def mlp_loss_jax(P, X, Y):
    H = jnp.tanh(P["W1"] @ X + P["b1"][:, None])
    Z = P["W2"] @ H + P["b2"][:, None]
    return -jnp.sum(Y * jax.nn.log_softmax(Z, axis=0)) / X.shape[1]


def bench_mlp_step(repeats, check_finite):
    D, digit = load_digits(return_X_y=True)
    D_train, _, digit_train, _ = train_test_split(
        D / 16.0, digit, test_size=0.25, random_state=0, stratify=digit
    )
    X = np.ascontiguousarray(D_train[:256].T)
    Y = np.eye(10)[:, digit_train[:256]]
    params = dl.mlp_init(64, 64, 10, np.random.default_rng(0))
    grad_jax = jax.jit(jax.value_and_grad(mlp_loss_jax))
    Pj, Xj, Yj = (
        {k: jnp.asarray(v) for k, v in params.items()},
        jnp.asarray(X),
        jnp.asarray(Y),
    )
    jax.block_until_ready(grad_jax(Pj, Xj, Yj))  # compile
    t_ours, t_peer, (loss, ours), (loss_jax, theirs) = best_times(
        lambda: dl.mlp_loss_and_grad(params, X, Y, check_finite=check_finite),
        lambda: jax.block_until_ready(grad_jax(Pj, Xj, Yj)),
        repeats * 30,
    )
    err = max(relative_error(ours[k], theirs[k]) for k in dl.backprop.MLP_PARAMETERS)
    err = max(err, relative_error(loss, loss_jax))
    task = "MLP gradient, batch 256" + ("" if check_finite else ", unchecked")
    return (
        task,
        "jax.jit(jax.value_and_grad)",
        t_ours,
        t_peer,
        f"max relative diff = {err:.1e}",
        err < 1e-12,
    )


def wall_time_slopes(repeats):
    """Log-log slopes of wall time against the size m of a vector softmax: forming the
    Jacobian and multiplying for m = 256 ... 4096 (the Jacobian of m = 4096 is 134 MB),
    the VJP for m = 2^14 ... 2^20 (below that, its time is mostly fixed overhead)."""
    rng = np.random.default_rng(1)
    sizes_jacobian, sizes_vjp = 2 ** np.arange(8, 13), 2 ** np.arange(14, 21, 2)
    jacobian, vjp = [], []
    for m in sizes_jacobian:
        x, g = rng.standard_normal(m), rng.standard_normal(m)
        jacobian.append(best_of(lambda: dl.softmax_jacobian(x).T @ g, repeats))
    for m in sizes_vjp:
        x, g = rng.standard_normal(m), rng.standard_normal(m)
        vjp.append(best_of(lambda: dl.softmax_vjp(x, g), repeats * 3))
    return (
        sizes_jacobian,
        dl.loglog_slope(sizes_jacobian, np.array(jacobian)),
        sizes_vjp,
        dl.loglog_slope(sizes_vjp, np.array(vjp)),
    )


def seed_spread(seeds=range(5)):
    """Test accuracy of the chapter's two MLPs on the digits split, seed by seed."""
    D, digit = load_digits(return_X_y=True)
    D_train, D_test, digit_train, digit_test = train_test_split(
        D / 16.0, digit, test_size=0.25, random_state=0, stratify=digit
    )
    X, Y, X_test = D_train.T, np.eye(10)[:, digit_train], D_test.T
    print("\ntest accuracy on the digits (450 test images; one image = 0.22 points)")
    print(f"{'seed':>4} {'derivlib':>9} {'scikit-learn':>13} {'difference':>11}")
    diffs = []
    for seed in seeds:
        mlp, _ = dl.fit_mlp(
            X, Y, n_hidden=64, epochs=30, batch_size=8, learning_rate=0.05, seed=seed
        )
        ours = 100 * np.mean(dl.mlp_predict(mlp, X_test) == digit_test)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sk = MLPClassifier(
                hidden_layer_sizes=(64,),
                activation="tanh",
                max_iter=1000,
                random_state=seed,
            )
            theirs = 100 * sk.fit(D_train, digit_train).score(D_test, digit_test)
        diffs.append(ours - theirs)
        print(f"{seed:>4} {ours:>8.1f}% {theirs:>12.1f}% {ours - theirs:>+10.1f}")
    print(
        f"mean difference {np.mean(diffs):+.2f} points, range {min(diffs):+.1f} to {max(diffs):+.1f}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS and XLA threads: 1 (default) for both, 0 for each library's default",
    )
    parser.add_argument(
        "--seeds",
        action="store_true",
        help="also compare test accuracy over seeds 0 to 4",
    )
    args = parser.parse_args()
    limit = (
        threadpool_limits(1, user_api="blas")
        if args.threads == 1
        else contextlib.nullcontext()
    )
    with limit:
        run(args)
    if args.seeds:
        seed_spread()


def run(args):
    rows = [
        bench_softmax_jax(args.repeats),
        bench_softmax_numpy_jax(args.repeats),
        bench_softmax_blocks(args.repeats),
        bench_mlp_step(args.repeats, check_finite=True),
        bench_mlp_step(args.repeats, check_finite=False),
    ]
    threads = "one thread each" if args.threads == 1 else "default threads"
    print(
        f"best of {5 * args.repeats} runs (Jacobian blocks: 1 run; MLP: {30 * args.repeats}), {threads}; "
        "ratio = peer time / derivlib time (> 1: derivlib faster)\n"
    )
    header = f"{'task':<32} {'peer':<28} {'derivlib':>10} {'peer':>10} {'ratio':>7}  agreement"
    print(header)
    print("-" * len(header))
    for task, peer, t_ours, t_peer, agreement, ok in rows:
        print(
            f"{task:<32} {peer:<28} {t_ours * 1e3:>8.2f}ms {t_peer * 1e3:>8.2f}ms {t_peer / t_ours:>6.2f}x  "
            f"{agreement}{'' if ok else '  (TOO LARGE)'}"
        )
    print()
    for task, peer, t_ours, t_peer, *_ in rows:
        print(f"ratio {task} vs {peer}: {t_peer / t_ours:.2f}x")
    memory_passes(args.repeats)
    softmax_vjp_stages(5 * args.repeats)
    sizes_j, slope_j, sizes_v, slope_v = wall_time_slopes(args.repeats)
    print(
        f"\nwall-time log-log slopes for a vector softmax of size m: form J then J^T g {slope_j:.1f} "
        f"(m = {sizes_j[0]} ... {sizes_j[-1]}), softmax_vjp {slope_v:.1f} (m = {sizes_v[0]} ... {sizes_v[-1]})"
    )


if __name__ == "__main__":
    main()
