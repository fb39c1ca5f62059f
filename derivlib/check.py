"""Verification machinery: JAX as an independent oracle, in the book's vec layout.

Importing this module turns on float64 in JAX (``jax_enable_x64``): the checks
compare at relative errors near 1e-12, which single precision cannot reach.

Every check prints one verdict line that reads the same on every machine (it names
the tolerance that was met, never the raw error) and raises AssertionError with
both numbers when it fails.
"""

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

TOL = 1e-12

# ----- Layout -----


def to_vec_layout(J, out_shape, in_shape):
    """Turn a Jacobian as JAX returns it, shape out_shape + in_shape, into the book's
    (prod out_shape, prod in_shape) matrix between vec F and vec X (column-major).

    One line does it: reading the whole array in column-major order and refilling
    a 2-D array in column-major order keeps entry (i, j) of F's and X's multi-indices
    at (vec index of i, vec index of j).
    """
    rows, cols = int(np.prod(out_shape)), int(np.prod(in_shape))
    return np.asarray(J).reshape(rows, cols, order="F")


def _jax_input(X):
    return jnp.asarray(np.asarray(X, dtype=np.float64))


def jax_jacobian(f, X):
    """The Jacobian of vec f(X) with respect to vec X, by ``jax.jacobian``."""
    X = _jax_input(X)
    J = jax.jacobian(f)(X)
    out_shape = jax.eval_shape(f, X).shape
    return to_vec_layout(J, out_shape, X.shape)


def jax_hessian(f, X):
    """The Hessian of the scalar f with respect to vec X, by ``jax.hessian``."""
    X = _jax_input(X)
    return to_vec_layout(jax.hessian(f)(X), X.shape, X.shape)


def jax_grad(f, X):
    """The gradient of the scalar f at X, by ``jax.grad``, shaped like X."""
    return np.asarray(jax.grad(f)(_jax_input(X)))


def jvp(f):
    """The first differential of the JAX function f as a function of (x, dx)."""

    def df(x, dx):
        return np.asarray(jax.jvp(f, (_jax_input(x),), (_jax_input(dx),))[1])

    return df


def second_differential(f):
    """The second differential d^2 f = dx^T H(x) dx of a scalar JAX function f."""

    def d2f(x, dx):
        x, dx = _jax_input(x), _jax_input(dx)
        directional = lambda y: jax.jvp(f, (y,), (dx,))[1]  # noqa: E731
        return np.asarray(jax.jvp(directional, (x,), (dx,))[1])

    return d2f


# ----- Comparisons -----


def relative_error(actual, expected):
    """norm(actual - expected) / norm(expected); the absolute error if expected is
    zero."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(
            f"cannot compare shape {actual.shape} with shape {expected.shape}"
        )
    scale = np.linalg.norm(expected)
    diff = np.linalg.norm(actual - expected)
    return float(diff / scale) if scale > 0 else float(diff)


def _mismatch(name, oracle, actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return f"{name} has shape {actual.shape} but {oracle} gives {expected.shape}"
    if not np.all(np.isfinite(actual)):
        return f"{name} is not finite"
    return None


def check_close(name, actual, expected, oracle="jax.jacobian", tol=TOL):
    """Print that `actual` matches the oracle's `expected` to `tol`, or raise."""
    problem = _mismatch(name, oracle, actual, expected)
    if problem:
        raise AssertionError(problem)
    err = relative_error(actual, expected)
    if not err < tol:
        raise AssertionError(
            f"{name} does not match {oracle}: relative error {err:.3e} >= {tol:.0e}\n  "
            f"{name}: {np.array2string(np.asarray(actual), precision=6, threshold=20)}"
            f"\n  {oracle}: "
            f"{np.array2string(np.asarray(expected), precision=6, threshold=20)}"
        )
    print(f"{name} matches {oracle}: relative error < {tol:.0e}")
    return err


def check_fails(name, compute, expected, oracle="jax.jacobian", tol=TOL):
    """Show that a wrong formula fails the check, and how.

    `compute` is a function of no arguments that evaluates the formula. The check
    passes (and prints the reason) when it raises ValueError, returns the wrong shape,
    or differs from `expected` by more than `tol`; it raises AssertionError when the
    formula turns out to be right after all.
    """
    try:
        actual = compute()
    except ValueError as exc:
        print(f"{name} fails: ValueError: {exc}")
        return None
    problem = _mismatch(name, oracle, actual, expected)
    if problem:
        print(f"{name} fails: {problem}")
        return None
    err = relative_error(actual, expected)
    if err < tol:
        raise AssertionError(
            f"{name} was expected to fail but matches {oracle} ({err:.3e})"
        )
    print(f"{name} fails: relative error {err:.2g} against {oracle}")
    return err


def check_steps(name, steps, points, tol=TOL):
    """Check every '=' of a derivation at random points.

    `steps` is a list of (label, fn) pairs, each fn(x, dx) one line of the derivation
    (a differential, a function of the point x and the increment dx). Each line is
    compared with the one before it at every (x, dx) in `points`; put an oracle such
    as ``("jax.jvp", jvp(f))`` first to anchor the chain. Prints one line per '='.
    """
    points = list(points)
    if len(steps) < 2:
        raise ValueError(
            f"a derivation needs at least two lines to compare, got {len(steps)}"
        )
    if not points:
        raise ValueError("check_steps needs at least one point (x, dx)")
    count = len(steps) - 1
    print(
        f"{name}: {count} step{'s' if count > 1 else ''} at {len(points)} random "
        f"point{'s' if len(points) > 1 else ''}"
    )
    width = max(len(label) for label, _ in steps)
    for (prev_label, prev), (label, fn) in zip(steps, steps[1:]):
        worst = 0.0
        for x, dx in points:
            a, b = np.asarray(fn(x, dx)), np.asarray(prev(x, dx))
            problem = _mismatch(label, prev_label, a, b)
            if problem:
                raise AssertionError(f"{name}: {problem}")
            worst = max(worst, relative_error(a, b))
        if not worst < tol:
            raise AssertionError(
                f"{name}: {label} != {prev_label}: relative error {worst:.3e} >= "
                f"{tol:.0e}"
            )
        print(f"  {label:<{width}} = {prev_label:<{width}}  relative error < {tol:.0e}")


# ----- Backward rules (Part II) -----


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def jax_vjp(f, primals, G):
    """The gradients of <G, f(*primals)> with respect to each primal, by ``jax.vjp``.

    `primals` is a tuple of arrays; returns a tuple of NumPy arrays shaped like them.
    """
    primals = tuple(_jax_input(p) for p in _as_tuple(primals))
    _, pullback = jax.vjp(f, *primals)
    return tuple(np.asarray(g) for g in pullback(_jax_input(G)))


def inner(A, B):
    """<A, B> = tr(A^T B) = vec(A)^T vec(B): the sum of the products of the entries."""
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    if A.shape != B.shape:
        raise ValueError(f"<A, B> needs equal shapes, got {A.shape} and {B.shape}")
    return float(np.sum(A * B))


def dot_product_gap(jvp, vjp, primals, tangents, W):
    """Relative gap between <W, J V> and <J^T W, V> at one point.

    `jvp(*primals, *tangents)` is J V, shaped like the output; `vjp(*primals, W)` is
    J^T W, one array or a tuple of arrays shaped like the primals. Both sides are sums
    of products, so the gap is measured against the sum of their absolute values:
    rounding is then the only thing that can make it exceed a few ulps.
    """
    primals, tangents = _as_tuple(primals), _as_tuple(tangents)
    JV = np.asarray(jvp(*primals, *tangents), dtype=np.float64)
    JtW = _as_tuple(vjp(*primals, W))
    if len(JtW) != len(tangents):
        raise ValueError(
            f"the VJP returned {len(JtW)} gradients for {len(tangents)} inputs"
        )
    W = np.asarray(W, dtype=np.float64)
    if JV.shape != W.shape:
        raise ValueError(
            f"the JVP has shape {JV.shape} but the cotangent W has shape {W.shape}"
        )
    left = float(np.sum(W * JV))
    right = sum(inner(g, v) for g, v in zip(JtW, tangents))
    scale = float(np.sum(np.abs(W * JV))) + sum(
        float(np.sum(np.abs(np.asarray(g) * np.asarray(v))))
        for g, v in zip(JtW, tangents)
    )
    return abs(left - right) / scale if scale > 0 else abs(left - right)


def check_dot_product(name, jvp, vjp, points, tol=TOL):
    """The dot-product test <W, J V> = <J^T W, V> between a JVP and a VJP.

    `points` is a list of (primals, tangents, W) triples. J comes from `jvp` and J^T
    from `vjp`, so the test checks that the two rules are transposes of each other
    without forming J. Like any check, it only sees what the test points show: a
    missing transpose that vanishes at a symmetric input passes there, so draw general
    (non-symmetric) points. Prints one verdict line or raises AssertionError with the
    worst gap.
    """
    points = list(points)
    if not points:
        raise ValueError(
            "check_dot_product needs at least one point (primals, tangents, W)"
        )
    worst = max(dot_product_gap(jvp, vjp, p, t, W) for p, t, W in points)
    if not worst < tol:
        raise AssertionError(
            f"{name} fails the dot-product test: relative gap {worst:.3e} >= {tol:.0e}"
        )
    print(
        f"{name} passes the dot-product test <W, J V> = <J^T W, V> at {len(points)} "
        f"point{'s' if len(points) > 1 else ''}: relative gap < {tol:.0e}"
    )
    return worst


def check_vjp(name, vjp, f, primals, W, tol=TOL):
    """Compare the VJP `vjp(*primals, W)` with ``jax.vjp`` of the JAX function `f`.

    Prints one verdict line (every gradient within `tol`) or raises AssertionError
    naming the gradient that differs.
    """
    primals = _as_tuple(primals)
    ours = _as_tuple(vjp(*primals, W))
    theirs = jax_vjp(f, primals, W)
    if len(ours) != len(theirs):
        raise AssertionError(
            f"{name} returned {len(ours)} gradients, jax.vjp {len(theirs)}"
        )
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        label = f"{name} (gradient {i + 1} of {len(ours)})" if len(ours) > 1 else name
        problem = _mismatch(label, "jax.vjp", a, b)
        if problem:
            raise AssertionError(problem)
        err = relative_error(a, b)
        if not err < tol:
            raise AssertionError(
                f"{label} does not match jax.vjp: relative error {err:.3e} >= {tol:.0e}"
            )
        worst = max(worst, err)
    print(f"{name} matches jax.vjp: relative error < {tol:.0e}")
    return worst


# ----- Chapter 4: a wrong rule failing the dot-product test -----


def check_dot_product_fails(name, jvp, vjp, points, tol=TOL):
    """Show that a pair of rules that are not transposes of each other fails the
    dot-product test, and by how much.

    The arguments are those of `check_dot_product`. Prints the worst relative gap when
    it is at least `tol`; raises AssertionError when the pair passes after all.
    """
    points = list(points)
    if not points:
        raise ValueError(
            "check_dot_product_fails needs at least one point (primals, tangents, W)"
        )
    worst = max(dot_product_gap(jvp, vjp, p, t, W) for p, t, W in points)
    if worst < tol:
        raise AssertionError(
            f"{name} was expected to fail the dot-product test but passes (gap "
            f"{worst:.3e})"
        )
    print(f"{name} fails the dot-product test: relative gap {worst:.2g}")
    return worst


# ----- Matrix functions (Chapter 7) -----


def divided_differences_reference(lam, f, digits=40):
    """L_ij = (f(lam_i) - f(lam_j)) / (lam_i - lam_j), L_ii = f'(lam_i), in
    `digits`-digit decimal arithmetic from the exact binary values of lam, rounded to
    float64 at the end.

    `f` is "log", "sqrt" or "invsqrt". An independent high-precision reference for
    the Loewner matrix: no cancellation survives 40 digits at the gaps float64 can
    represent."""
    from decimal import Decimal, localcontext

    lam = np.asarray(lam, dtype=np.float64)
    n = lam.size
    L = np.empty((n, n))
    with localcontext() as ctx:
        ctx.prec = digits
        x = [Decimal(float(v)) for v in lam]
        value = {
            "log": lambda t: t.ln(),
            "sqrt": lambda t: t.sqrt(),
            "invsqrt": lambda t: 1 / t.sqrt(),
        }[f]
        slope = {
            "log": lambda t: 1 / t,
            "sqrt": lambda t: 1 / (2 * t.sqrt()),
            "invsqrt": lambda t: -1 / (2 * t * t.sqrt()),
        }[f]
        fx = [value(t) for t in x]
        for i in range(n):
            for j in range(i, n):
                if x[i] == x[j]:
                    L[i, j] = L[j, i] = float(slope(x[i]))
                else:
                    L[i, j] = L[j, i] = float((fx[i] - fx[j]) / (x[i] - x[j]))
    return L


def spd_function_vjp_reference(Q, lam, G, f):
    """The gradient of <G, f(S)> at S = Q diag(lam) Q^T for a known orthogonal Q and a
    known spectrum lam: Q (L o Q^T sym(G) Q) Q^T with L from
    `divided_differences_reference` (the eigendecomposition is never computed)."""
    Q, G = np.asarray(Q, dtype=np.float64), np.asarray(G, dtype=np.float64)
    L = divided_differences_reference(lam, f)
    return Q @ (L * (Q.T @ (0.5 * (G + G.T)) @ Q)) @ Q.T
