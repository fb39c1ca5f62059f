"""Chapter 7 (derivlib.matfun) against jax.vjp, scipy and a high-precision reference.

The oracles are a few lines of jax.numpy through jnp.linalg.eigh, jnp.linalg.svd and
jnp.linalg.solve; they never call derivlib's derivative code. Every backward rule also
passes the dot-product test against its own forward rule. Eigenvector signs are fixed
the same way on both sides (the entry of largest magnitude of each column positive).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal

from derivlib import matfun
from derivlib.check import (
    check_dot_product,
    divided_differences_reference,
    jax_vjp,
    relative_error,
    spd_function_vjp_reference,
)
from derivlib.matfun import (
    covariance_pool,
    covariance_pool_jvp,
    covariance_pool_vjp,
    eigh,
    eigvalsh_jvp,
    eigvalsh_vjp,
    eigvecsh_jvp,
    eigvecsh_vjp,
    gaussian_nll,
    gaussian_nll_grad,
    loewner_matrix,
    polar,
    polar_jvp,
    polar_vjp,
    procrustes,
    procrustes_jvp,
    procrustes_vjp,
    spd_function,
    spd_function_jvp,
    spd_function_vjp,
    svdvals_jvp,
    svdvals_vjp,
)

TOL = 1e-10
FUNCTIONS = {"log": jnp.log, "sqrt": jnp.sqrt, "invsqrt": lambda x: 1 / jnp.sqrt(x)}
seeds = st.integers(0, 2**32 - 1)
sizes = st.sampled_from([1, 2, 3, 5])  # a small fixed set: JAX compiles once per shape

# ----- Oracles -----


def jax_spd_function(name):
    def f(S):
        lam, Q = jnp.linalg.eigh(S)
        return (Q * FUNCTIONS[name](lam)) @ Q.T

    return f


JAX_SPD_VJP = {
    name: jax.jit(lambda S, G, f=jax_spd_function(name): jax.vjp(f, S)[1](G)[0])
    for name in FUNCTIONS
}
# All three values and gradients in one compiled call per shape, for the property test.
JAX_SPD_ALL = jax.jit(
    lambda S, G: {
        name: (jax_spd_function(name)(S), jax.vjp(jax_spd_function(name), S)[1](G)[0])
        for name in FUNCTIONS
    }
)


def jax_eigvals(S):
    return jnp.linalg.eigh(S)[0]


def jax_svdvals(M):
    return jnp.linalg.svd(M, compute_uv=False)


def jax_eigvecs(S):
    lam, Q = jnp.linalg.eigh(S)
    rows = jnp.argmax(jnp.abs(Q), axis=0)
    return Q * jnp.where(Q[rows, jnp.arange(Q.shape[1])] < 0, -1.0, 1.0)


def jax_polar(M):
    U, _, Vt = jnp.linalg.svd(M)
    return U @ Vt


def jax_nll(X, mu, Sigma):
    R = X - mu[:, None]
    return (
        0.5 * jnp.sum(R * jnp.linalg.solve(Sigma, R))
        + 0.5 * X.shape[1] * jnp.linalg.slogdet(Sigma)[1]
    )


def jitted_vjp(f):
    """jax.vjp of f, compiled once per shape (the property tests reuse a few shapes)."""
    pullback = jax.jit(lambda primals, G: jax.vjp(f, *primals)[1](G))
    return lambda primals, G: tuple(np.asarray(g) for g in pullback(tuple(primals), G))


JAX_NLL_GRAD = jax.jit(jax.grad(jax_nll, argnums=(1, 2)))
VJP = {
    f.__name__: jitted_vjp(f)
    for f in (jax_eigvals, jax_eigvecs, jax_svdvals, jax_polar)
}
VJP["procrustes"] = jitted_vjp(lambda A, B: jax_polar(B @ A.T))


def random_orthogonal(rng, n):
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def spd_with_spectrum(rng, lam):
    Q = random_orthogonal(rng, len(lam))
    S = (Q * lam) @ Q.T
    return 0.5 * (S + S.T), Q


def random_spd(rng, n):
    A = rng.standard_normal((n, n))
    return A @ A.T + n * np.eye(n)


def symmetric(rng, n):
    A = rng.standard_normal((n, n))
    return A + A.T


def assert_close(actual, expected, tol=TOL):
    assert np.all(np.isfinite(actual))
    err = relative_error(actual, expected)
    assert err < tol, f"relative error {err:.3e}: ours {actual}, oracle {expected}"


def assert_adjoint(jvp, vjp, primals, tangents, W):
    check_dot_product("rule", jvp, vjp, [(primals, tangents, W)])


# ----- Gaussian negative log-likelihood -----


@settings(max_examples=30)
@given(seeds, st.sampled_from([1, 3]), st.sampled_from([1, 4]))
def test_gaussian_nll_matches_scipy_and_jax(seed, d, n):
    rng = np.random.default_rng(seed)
    X, mu, Sigma = (
        rng.standard_normal((d, n)),
        rng.standard_normal(d),
        random_spd(rng, d),
    )
    expected = -np.sum(multivariate_normal.logpdf(np.atleast_2d(X.T), mu, Sigma))
    assert gaussian_nll(X, mu, Sigma) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    mu_bar, Sigma_bar = gaussian_nll_grad(X, mu, Sigma)
    jmu, jSigma = JAX_NLL_GRAD(X, mu, Sigma)
    assert_close(mu_bar, np.asarray(jmu))
    assert_close(Sigma_bar, np.asarray(jSigma))
    np.testing.assert_array_equal(Sigma_bar, Sigma_bar.T)


def test_gaussian_gradient_is_zero_at_the_mle(rng):
    X = rng.standard_normal((3, 50))
    mu = X.mean(axis=1)
    R = X - mu[:, None]
    mu_bar, Sigma_bar = gaussian_nll_grad(X, mu, R @ R.T / 50)
    assert np.max(np.abs(mu_bar)) < 1e-12 and np.max(np.abs(Sigma_bar)) < 1e-12


def test_double_counting_symmetric_gradient_fails(rng):
    X, mu, Sigma = (
        rng.standard_normal((3, 4)),
        rng.standard_normal(3),
        random_spd(rng, 3),
    )
    _, G = gaussian_nll_grad(X, mu, Sigma)
    dS = symmetric(rng, 3)
    exact = np.sum(
        np.asarray(JAX_NLL_GRAD(X, mu, Sigma)[1]) * dS
    )  # the derivative along dS
    assert np.sum(G * dS) == pytest.approx(float(exact), rel=1e-12)
    wrong = G + G.T - np.diag(np.diag(G))
    assert abs(np.sum(wrong * dS) - float(exact)) > 1e-3 * abs(float(exact))


@pytest.mark.parametrize(
    "args, message",
    [
        (((3, 4), (2,), (3, 3)), r"mu must have shape \(3,\).*got \(2,\)"),
        (((3, 4), (3,), (2, 2)), r"Sigma must have shape \(3, 3\).*got \(2, 2\)"),
        (((3,), (3,), (3, 3)), r"X must be 2-D, got shape \(3,\)"),
    ],
)
def test_gaussian_bad_shapes(args, message):
    X, mu, Sigma = (np.ones(s) for s in args)
    Sigma = np.eye(Sigma.shape[0]) if Sigma.ndim == 2 else Sigma
    with pytest.raises(ValueError, match=message):
        gaussian_nll(X, mu, Sigma)


def test_gaussian_needs_spd_sigma():
    with pytest.raises(
        ValueError, match="Sigma must be symmetric positive definite .* down to -1"
    ):
        gaussian_nll_grad(np.ones((2, 3)), np.zeros(2), np.diag([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"Sigma must be symmetric.*shape \(2, 2\)"):
        gaussian_nll(np.ones((2, 3)), np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))


# ----- Symmetric eigendecomposition -----


@settings(max_examples=30)
@given(seeds, sizes)
def test_eigh_rules_match_jax(seed, n):
    rng = np.random.default_rng(seed)
    S, dS, G, g = (
        symmetric(rng, n),
        rng.standard_normal((n, n)),
        rng.standard_normal((n, n)),
        rng.standard_normal(n),
    )
    lam, Q = eigh(S)
    np.testing.assert_allclose((Q * lam) @ Q.T, S, atol=1e-12 * np.max(np.abs(S)))
    assert_close(eigvalsh_vjp(S, g), VJP["jax_eigvals"]((S,), g)[0])
    assert_adjoint(eigvalsh_jvp, eigvalsh_vjp, (S,), (dS,), g)
    gap = np.min(np.diff(lam)) if n > 1 else np.inf
    if n > 1 and gap > 1e-3:  # well separated: the eigenvector rule is well conditioned
        assert_close(eigvecsh_vjp(S, G), VJP["jax_eigvecs"]((S,), G)[0], tol=1e-8)
        assert_adjoint(eigvecsh_jvp, eigvecsh_vjp, (S,), (dS,), G)


def test_eigenvector_sign_convention(rng):
    S = symmetric(rng, 4)
    _, Q = eigh(S)
    _, Q_neg = eigh(S.copy())
    np.testing.assert_array_equal(Q, Q_neg)
    rows = np.argmax(np.abs(Q), axis=0)
    assert np.all(Q[rows, np.arange(4)] > 0)


def test_eigenvectors_of_a_repeated_eigenvalue_raise():
    with pytest.raises(
        ValueError, match="eigvecsh_jvp needs distinct eigenvalues.*eigengap of 0"
    ):
        eigvecsh_jvp(np.diag([1.0, 2.0, 1.0]), np.eye(3))
    with pytest.raises(ValueError, match="eigvecsh_vjp needs distinct eigenvalues"):
        eigvecsh_vjp(np.eye(2), np.eye(2))


def test_eigenvalue_rules_at_a_repeated_eigenvalue_are_finite():
    # lam is not differentiable at a tie, but g -> Q diag(g) Q^T is the gradient of any
    # symmetric function of the eigenvalues, e.g. the trace (g = 1 gives I).
    np.testing.assert_allclose(
        eigvalsh_vjp(np.eye(3), np.ones(3)), np.eye(3), atol=1e-15
    )
    S = np.diag(
        [2.0, 5.0, 2.0]
    )  # log det: g = 1 / lam is constant on the tie, gradient S^-1
    np.testing.assert_allclose(
        eigvalsh_vjp(S, 1 / eigh(S)[0]), np.linalg.inv(S), rtol=1e-15
    )


def test_eigenvalue_rules_refuse_a_tie_where_there_is_no_derivative(rng):
    Q = random_orthogonal(rng, 3)
    S = (Q * np.array([1.0, 1.0, 4.0])) @ Q.T
    S = 0.5 * (S + S.T)
    with pytest.raises(
        ValueError,
        match=r"eigvalsh_vjp: lam\[0:2\] are repeated eigenvalues \(1\); <g, lam> is "
        r"differentiable there only if g is constant on them, got g\[0:2\] spread over 1",
    ):
        eigvalsh_vjp(S, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(
        ValueError,
        match=r"eigvalsh_jvp needs distinct eigenvalues.*lam\[0:2\] equal to 1",
    ):
        eigvalsh_jvp(S, symmetric(rng, 3))
    # constant on the tie: the basis inside the eigenspace does not matter
    g = np.array([0.5, 0.5, 3.0])
    P = Q[:, :2] @ Q[:, :2].T
    np.testing.assert_allclose(
        eigvalsh_vjp(S, g), 0.5 * P + 3.0 * (np.eye(3) - P), atol=1e-13
    )


# ----- Functions of SPD matrices -----


@settings(max_examples=30)
@given(seed=seeds, n=sizes)
def test_spd_functions_match_jax(seed, n):
    rng = np.random.default_rng(seed)
    lam = np.sort(rng.uniform(0.5, 4.0, n)) + np.arange(n) * 0.1  # gaps >= 0.1
    S, _ = spd_with_spectrum(rng, lam)
    G, dS = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    oracle = JAX_SPD_ALL(S, G)
    for name in FUNCTIONS:
        value, grad = (np.asarray(a) for a in oracle[name])
        assert_close(spd_function(S, f=name), value, 1e-12)
        assert_close(spd_function_vjp(S, G, f=name), grad)
        assert_adjoint(
            lambda S, dS: spd_function_jvp(S, dS, f=name),
            lambda S, W: spd_function_vjp(S, W, f=name),
            (S,),
            (dS,),
            G,
        )


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@given(
    seed=seeds,
    n=st.sampled_from([2, 3, 5]),
    log_gap=st.sampled_from([-1.0, -4.0, -8.0, -12.0, -14.0, -np.inf]),
)
def test_repeated_and_nearly_repeated_eigenvalues(name, seed, n, log_gap):
    """Never NaN, and accurate against the decimal reference at every gap, ties included."""
    rng = np.random.default_rng(seed)
    gap = 10.0**log_gap
    lam = np.concatenate(
        [2.0 + gap * np.arange(min(n, 3)), np.linspace(3.0, 6.0, n - min(n, 3))]
    )
    S, Q = spd_with_spectrum(rng, lam)
    G = rng.standard_normal((n, n))
    ours = spd_function_vjp(S, G, f=name)
    assert np.all(np.isfinite(ours))
    assert_close(ours, spd_function_vjp_reference(Q, lam, G, name), 1e-12)
    assert_adjoint(
        lambda S, dS: spd_function_jvp(S, dS, f=name),
        lambda S, W: spd_function_vjp(S, W, f=name),
        (S,),
        (rng.standard_normal((n, n)),),
        G,
    )


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_exact_ties_where_jax_gives_nan(name):
    S = np.diag([3.0, 3.0, 5.0])  # eigh returns the diagonal exactly: an exact tie
    G = np.arange(9.0).reshape(3, 3)
    assert not np.all(np.isfinite(np.asarray(JAX_SPD_VJP[name](S, G))))
    ours = spd_function_vjp(S, G, f=name)
    assert_close(
        ours, spd_function_vjp_reference(np.eye(3), np.diag(S), G, name), 1e-14
    )


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@given(seed=seeds, n=st.sampled_from([2, 4]))
def test_loewner_matrix_against_decimal_reference(name, seed, n):
    rng = np.random.default_rng(seed)
    lam = rng.uniform(0.01, 100.0, n)
    lam = np.concatenate(
        [lam, lam + np.array([0.0, 1e-13] * (n // 2)), np.nextafter(lam, 200.0)]
    )
    L = loewner_matrix(lam, name)
    assert_close(L, divided_differences_reference(lam, name), 1e-13)
    np.testing.assert_array_equal(L, L.T)


@pytest.mark.parametrize(
    "a, b",
    [
        (1e100, 3.7e100),
        (3.7e-100, 1e-100),
        (1e300, 1e-300),
        (1.7e308, 1.6e308),
        (2e200, 5e200),
        (7.0, 1e-5),
    ],
)
def test_log_divided_difference_at_large_and_small_scales(a, b):
    """Far from 1 both logarithms are large and log a - log b cancels; log(a / b) does not."""
    lam = np.array([a, b])
    L = loewner_matrix(lam, "log")
    R = divided_differences_reference(lam, "log")
    np.testing.assert_allclose(L, R, rtol=4e-16, atol=0)
    np.testing.assert_array_equal(L, L.T)


@pytest.mark.parametrize("kind", ["clustered", "equal"])
def test_logm_spd_vjp_within_1e_14_at_clustered_and_equal_eigenvalues(kind):
    """The VJP's Loewner matrix takes the plain quotient of the logarithms where they do
    not cancel and (7.15) where they do: with a third of the spectrum in a cluster
    1e-13 apart, or exactly repeated, the gradient is within 1e-14 of the 40-digit
    reference and every divided difference within 2e-15 (relative), far pairs, close
    pairs and ties alike."""
    rng = np.random.default_rng(7)
    n = 24
    lam = np.linspace(1.0, 10.0, n)
    lam[:8] = 3.0 + (1e-13 * np.arange(8) if kind == "clustered" else 0.0)
    lam = np.sort(lam)
    S, Q = spd_with_spectrum(rng, lam)
    G = symmetric(rng, n)
    reference = spd_function_vjp_reference(Q, lam, G, "log")
    assert relative_error(matfun.logm_spd_vjp(S, G), reference) < 1e-14
    L = loewner_matrix(lam, "log")
    entrywise = np.abs(L / divided_differences_reference(lam, "log") - 1)
    assert entrywise.max() < 2e-15


@pytest.mark.parametrize(
    "lam, message",
    [
        (
            np.array([np.inf, 1.0]),
            r"lam must be finite, got inf in lam of shape \(2,\)",
        ),
        (
            np.array([1.0, np.nan]),
            r"lam must be finite, got nan in lam of shape \(2,\)",
        ),
        (np.array([1.0, 0.0]), "lam must be positive, got min 0"),
    ],
)
def test_loewner_matrix_bad_spectrum(lam, message):
    for name in FUNCTIONS:
        with pytest.raises(ValueError, match=message):
            loewner_matrix(lam, name)


def test_identity_and_scalar_matrices():
    S = 4.0 * np.eye(3)
    G = np.arange(9.0).reshape(3, 3)
    np.testing.assert_allclose(
        matfun.logm_spd_vjp(S, G), 0.25 * 0.5 * (G + G.T), rtol=1e-15
    )
    np.testing.assert_allclose(
        matfun.sqrtm_spd_vjp(S, G), 0.25 * 0.5 * (G + G.T), rtol=1e-15
    )
    np.testing.assert_allclose(
        matfun.invsqrtm_spd_vjp(S, G), -(1 / 16) * 0.5 * (G + G.T), rtol=1e-15
    )
    np.testing.assert_allclose(matfun.sqrtm_spd(S), 2 * np.eye(3), rtol=1e-15)
    assert matfun.logm_spd(np.array([[np.e]]))[0, 0] == pytest.approx(1.0, rel=1e-15)


@pytest.mark.parametrize(
    "S, message",
    [
        (np.diag([1.0, 0.0]), "S must be symmetric positive definite .* down to 0"),
        (
            np.diag([1.0, -2.0]),
            "S must be symmetric positive definite .* down to -2",
        ),
        (
            np.array([[1.0, 2.0], [0.0, 1.0]]),
            r"S must be symmetric, got max \|S - S\^T\| = 2 for shape \(2, 2\)",
        ),
        (np.ones((2, 3)), r"S must be square, got shape \(2, 3\)"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), "S must be finite, got nan"),
    ],
)
def test_spd_bad_input(S, message):
    with pytest.raises(ValueError, match=message):
        matfun.logm_spd_vjp(S, np.eye(2))


def test_spd_bad_cotangent_and_name():
    with pytest.raises(
        ValueError,
        match=r"the cotangent G must have the output's shape \(2, 2\), got \(3, 3\)",
    ):
        matfun.sqrtm_spd_vjp(np.eye(2), np.eye(3))
    with pytest.raises(
        ValueError, match=r"the tangent dS must have shape \(2, 2\), got \(2,\)"
    ):
        matfun.sqrtm_spd_jvp(np.eye(2), np.ones(2))
    with pytest.raises(ValueError, match="f must be one of"):
        spd_function(np.eye(2), f="exp")


@pytest.mark.parametrize("with_scipy", [True, False])
def test_spd_eigh_with_and_without_scipy(monkeypatch, rng, with_scipy):
    if not with_scipy:
        monkeypatch.setitem(
            sys.modules, "scipy.linalg.lapack", None
        )  # import fails: NumPy path
    S = random_spd(rng, 4)
    lam, Q = matfun._eigh(S)
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(S), rtol=1e-13)
    np.testing.assert_allclose(
        (Q * lam) @ Q.T, S, rtol=1e-13, atol=1e-13 * np.abs(S).max()
    )
    G = symmetric(rng, 4)
    assert_close(matfun.logm_spd_vjp(S, G), np.asarray(JAX_SPD_VJP["log"](S, G)))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_jvp_entrywise_accurate_at_wide_and_close_spectra(name):
    """At a diagonal S (eigh returns it exactly) with dS = 1 1^T, the JVP is the
    Loewner matrix itself; every entry within 1e-15 of the 40-digit reference, at a
    condition number of 5e11 (log1p(t) with t near -1 lost six digits there) and at
    gaps of 1e-14 and one ulp."""
    lam = np.array([1.4e-11, 0.3, 3.0, 3.0 + 1e-14, np.nextafter(3.0, 4.0), 7.0])
    dF = spd_function_jvp(np.diag(lam), np.ones((6, 6)), f=name)
    reference = divided_differences_reference(lam, name)
    assert np.max(np.abs(dF / reference - 1)) < 1e-15


def test_extreme_spectra_are_finite():
    for S in (np.diag([1e-150, 1e-139]), np.diag([1e139, 1e150])):  # condition 1e11
        for name in FUNCTIONS:
            assert np.all(np.isfinite(spd_function_vjp(S, np.ones((2, 2)), f=name)))
            assert np.all(np.isfinite(spd_function_jvp(S, np.ones((2, 2)), f=name)))
    # a condition number of 1e300 is past the one SPD test (lam_min > 1e-12 lam_max)
    with pytest.raises(ValueError, match="S must be symmetric positive definite"):
        spd_function_vjp(np.diag([1e-150, 1e150]), np.ones((2, 2)), f="log")


# ----- Singular values, polar factor, Procrustes -----


@settings(max_examples=20)
@given(seeds, st.sampled_from([(1, 3), (3, 1), (3, 5), (4, 4)]))
def test_svdvals_rules(seed, shape):
    m, n = shape
    rng = np.random.default_rng(seed)
    M, dM, g = (
        rng.standard_normal((m, n)),
        rng.standard_normal((m, n)),
        rng.standard_normal(min(m, n)),
    )
    s = np.linalg.svd(M, compute_uv=False)
    if min(m, n) > 1 and np.min(np.abs(np.diff(s))) < 1e-3:
        return  # singular vectors of a near tie: jax.vjp itself is ill-conditioned there
    assert_close(svdvals_vjp(M, g), VJP["jax_svdvals"]((M,), g)[0], 1e-9)
    assert_adjoint(svdvals_jvp, svdvals_vjp, (M,), (dM,), g)


def test_svdvals_at_repeated_and_zero_singular_values(rng):
    """(7.16) holds where the singular values are distinct and nonzero; elsewhere
    <g, sigma> has a gradient only for g constant on a tie and zero at a zero sigma."""
    Q = random_orthogonal(rng, 3)
    np.testing.assert_allclose(
        svdvals_vjp(2 * Q, np.ones(3)), Q, atol=1e-14
    )  # nuclear norm at 2 Q
    with pytest.raises(
        ValueError,
        match=r"svdvals_vjp: sigma\[0:3\] are repeated singular values \(2\); "
        r"<g, sigma> is differentiable there only if g is constant",
    ):
        svdvals_vjp(2 * Q, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(
        ValueError, match=r"svdvals_jvp: sigma\[0:3\] are repeated singular values"
    ):
        svdvals_jvp(2 * Q, rng.standard_normal((3, 3)))
    M = np.diag([3.0, 1.0, 0.0]) @ Q
    with pytest.raises(
        ValueError,
        match=r"svdvals_vjp: sigma\[2\] = 0 is zero to working precision.*or g\[2\] = 0",
    ):
        svdvals_vjp(M, np.ones(3))
    with pytest.raises(ValueError, match=r"svdvals_jvp: sigma\[2\] = 0 is zero"):
        svdvals_jvp(M, rng.standard_normal((3, 3)))
    g = np.array([1.0, -2.0, 0.0])  # zero on the zero singular value: differentiable
    dM = rng.standard_normal((3, 3))
    h = 1e-6
    fd = (
        (
            np.linalg.svd(M + h * dM, compute_uv=False)
            - np.linalg.svd(M - h * dM, compute_uv=False)
        )
        @ g
        / (2 * h)
    )
    assert np.sum(svdvals_vjp(M, g) * dM) == pytest.approx(fd, rel=1e-7)


@settings(max_examples=30)
@given(seeds, sizes)
def test_polar_rules(seed, n):
    rng = np.random.default_rng(seed)
    M, dM, G = (
        rng.standard_normal((n, n)),
        rng.standard_normal((n, n)),
        rng.standard_normal((n, n)),
    )
    if np.linalg.svd(M, compute_uv=False)[-1] < 1e-2:
        M = M + 2 * np.eye(n)
    R = polar(M)
    np.testing.assert_allclose(R.T @ R, np.eye(n), atol=1e-13)
    assert_close(polar_vjp(M, G), VJP["jax_polar"]((M,), G)[0], 1e-8)
    assert_adjoint(polar_jvp, polar_vjp, (M,), (dM,), G)


def test_polar_at_repeated_singular_values_is_finite(rng):
    """M = I and M = 2 Q have all singular values equal: JAX's SVD rule gives NaN,
    the 1 / (sigma_i + sigma_j) rule does not."""
    G = rng.standard_normal((3, 3))
    for M in (np.eye(3), 2 * random_orthogonal(rng, 3)):
        ours = polar_vjp(M, G)
        assert np.all(np.isfinite(ours))
        # closed form at M = s Q: polar'(M)^T[G] = (Q G^T Q)... check via central differences
        eps = 1e-6
        dM = rng.standard_normal((3, 3))
        fd = (polar(M + eps * dM) - polar(M - eps * dM)) / (2 * eps)
        assert np.sum(ours * dM) == pytest.approx(np.sum(G * fd), rel=1e-7, abs=1e-9)
    assert not np.all(np.isfinite(jax_vjp(jax_polar, (np.eye(3),), G)[0]))


@settings(max_examples=30)
@given(seeds, st.sampled_from([(2, 3), (3, 6)]))
def test_procrustes_rules(seed, shape):
    d, n = shape
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((d, n)), rng.standard_normal((d, n))
    if np.linalg.svd(B @ A.T, compute_uv=False)[-1] < 1e-2:
        return
    G, dA, dB = (
        rng.standard_normal((d, d)),
        rng.standard_normal((d, n)),
        rng.standard_normal((d, n)),
    )
    ours = procrustes_vjp(A, B, G)
    theirs = VJP["procrustes"]((A, B), G)
    assert_close(ours[0], theirs[0], 1e-8)
    assert_close(ours[1], theirs[1], 1e-8)
    assert_adjoint(procrustes_jvp, procrustes_vjp, (A, B), (dA, dB), G)


def test_procrustes_recovers_a_rotation(rng):
    A = rng.standard_normal((3, 10))
    R_true = random_orthogonal(rng, 3)
    np.testing.assert_allclose(procrustes(A, R_true @ A), R_true, atol=1e-12)


def test_polar_and_procrustes_bad_input():
    with pytest.raises(ValueError, match=r"M must be square, got shape \(2, 3\)"):
        polar(np.ones((2, 3)))
    with pytest.raises(ValueError, match="the polar factor needs an invertible M"):
        polar_vjp(np.diag([1.0, 0.0]), np.eye(2))
    with pytest.raises(
        ValueError, match=r"A and B must have the same shape.*A \(2, 3\) and B \(3, 3\)"
    ):
        procrustes(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(
        ValueError, match=r"the tangent dB must have shape \(2, 3\), got \(3, 2\)"
    ):
        procrustes_jvp(np.eye(2, 3), np.eye(2, 3), np.eye(2, 3), np.eye(3, 2))


@pytest.mark.parametrize(
    "A, B, few",
    [
        (np.eye(3, 2), np.eye(3, 2), True),  # 2 points in 3 dimensions
        (
            np.outer([1.0, 2.0, 3.0], np.ones(5)) + 0.0,
            np.arange(15.0).reshape(3, 5),
            False,
        ),  # A on a line
    ],
)
def test_procrustes_names_its_own_arguments_when_degenerate(A, B, few):
    """The error names A and B (what the caller passed), not the internal M = B A^T."""
    for call in (
        lambda: procrustes(A, B),
        lambda: procrustes_vjp(A, B, np.eye(3)),
        lambda: procrustes_jvp(A, B, A, B),
    ):
        with pytest.raises(
            ValueError,
            match=r"procrustes needs point sets A and B \(d, n\) whose cross-covariance "
            r"B A\^T \(d, d\) is invertible",
        ) as info:
            call()
        assert "invertible M" not in str(info.value)
        assert (
            "with n = 2 points in d = 3 dimensions it always is" in str(info.value)
        ) == few


# ----- Covariance pooling -----


def jax_covariance_pool(F, W, eps):
    """eq. 7.22 and log C through jnp.linalg.eigh, for one image (d, p) or a batch (N, d, p)."""
    M = W @ (F - F.mean(axis=-1, keepdims=True))
    C = M @ jnp.swapaxes(M, -1, -2) / F.shape[-1] + eps * jnp.eye(W.shape[0])
    lam, Q = jnp.linalg.eigh(C)
    return (Q * jnp.log(lam)[..., None, :]) @ jnp.swapaxes(Q, -1, -2)


POOL_EPS = 0.05
POOL_ALL = jax.jit(
    lambda F, W, G: (
        jax_covariance_pool(F, W, eps=POOL_EPS),  # value and vjp, one compile per shape
        *jax.vjp(lambda F, W: jax_covariance_pool(F, W, eps=POOL_EPS), F, W)[1](G),
    )
)
POOL_SHAPES = [
    ((4, 9), 2),
    ((2, 5, 12), 3),
    ((3, 3, 6), 1),
]  # (F's shape, k): one image, a batch, k = 1


@settings(max_examples=20)
@given(seeds, st.sampled_from(POOL_SHAPES))
def test_covariance_pool_matches_jax(seed, case):
    shape, k = case
    rng = np.random.default_rng(seed)
    F, W = rng.standard_normal(shape), rng.standard_normal((k, shape[-2]))
    dF, dW = rng.standard_normal(shape), rng.standard_normal(W.shape)
    G = rng.standard_normal(shape[:-2] + (k, k))
    F_bar, W_bar = covariance_pool_vjp(F, W, G, eps=POOL_EPS)
    jL, jF, jW = (np.asarray(a) for a in POOL_ALL(F, W, G))
    assert F_bar.shape == F.shape and W_bar.shape == W.shape
    assert_close(F_bar, jF)
    assert_close(W_bar, jW)
    assert_close(covariance_pool(F, W, eps=POOL_EPS), jL)
    assert_adjoint(
        lambda F, W, dF, dW: covariance_pool_jvp(F, W, dF, dW, eps=POOL_EPS),
        lambda F, W, G: covariance_pool_vjp(F, W, G, eps=POOL_EPS),
        (F, W),
        (dF, dW),
        G,
    )


def test_covariance_pool_batch_is_a_stack_of_images(rng):
    F, W, G = (
        rng.standard_normal((3, 4, 10)),
        rng.standard_normal((2, 4)),
        rng.standard_normal((3, 2, 2)),
    )
    F_bar, W_bar = covariance_pool_vjp(F, W, G, eps=0.1)
    singles = [covariance_pool_vjp(F[i], W, G[i], eps=0.1) for i in range(3)]
    np.testing.assert_allclose(
        F_bar, np.stack([s[0] for s in singles]), rtol=1e-13, atol=1e-15
    )
    np.testing.assert_allclose(
        W_bar, sum(s[1] for s in singles), rtol=1e-13, atol=1e-15
    )


def test_covariance_pool_rank_deficient_input_is_finite(rng):
    """p = 3 pixels, k = 4: C - eps I has rank 2, and C's two smallest eigenvalues are
    both eps, a repeated eigenvalue where the Daleckii-Krein rule stays exact."""
    F, W, G = (
        rng.standard_normal((5, 3)),
        rng.standard_normal((4, 5)),
        rng.standard_normal((4, 4)),
    )
    eps = 1e-3
    L = covariance_pool(F, W, eps=eps)
    assert np.all(np.isfinite(L))
    np.testing.assert_allclose(
        np.sort(np.linalg.eigvalsh(L))[:2], np.log(eps), rtol=1e-10
    )
    F_bar, W_bar = covariance_pool_vjp(F, W, G, eps=eps)
    assert np.all(np.isfinite(F_bar)) and np.all(np.isfinite(W_bar))
    h, dF, dW = 1e-6, rng.standard_normal(F.shape), rng.standard_normal(W.shape)
    central = np.sum(
        G
        * (
            covariance_pool(F + h * dF, W + h * dW, eps=eps)
            - covariance_pool(F - h * dF, W - h * dW, eps=eps)
        )
    ) / (2 * h)
    assert np.sum(F_bar * dF) + np.sum(W_bar * dW) == pytest.approx(central, rel=1e-6)
    constant = np.ones((5, 8))  # no variation at all: C = eps I, L = log(eps) I
    np.testing.assert_allclose(
        covariance_pool(constant, W, eps=eps), np.log(eps) * np.eye(4), rtol=1e-12
    )


@pytest.mark.parametrize("eps", [0.0, -1e-3, np.inf, np.nan])
def test_covariance_pool_refuses_eps_not_positive(rng, eps):
    F, W = rng.standard_normal((3, 8)), rng.standard_normal((2, 3))
    for call in (
        lambda: covariance_pool(F, W, eps=eps),
        lambda: covariance_pool_vjp(F, W, np.eye(2), eps=eps),
    ):
        with pytest.raises(
            ValueError,
            match=r"eps must be a positive finite float, got .*an eigenvalue of -inf",
        ):
            call()


@pytest.mark.parametrize("eps", [True, "0.1", None, [0.1]])
def test_covariance_pool_refuses_eps_that_is_not_a_number(rng, eps):
    F, W = rng.standard_normal((3, 8)), rng.standard_normal((2, 3))
    with pytest.raises(ValueError, match=r"eps must be a positive float, got "):
        covariance_pool(F, W, eps=eps)


def test_covariance_pool_refuses_eps_below_the_rounding_error(rng):
    """p = 3, k = 4: two eigenvalues of M M^T / p are zero, computed at about 1e-16 times
    its trace, of either sign. An eps near that level would give log(eps) with few or no
    correct digits: refused, naming the image and the smallest eps accepted. At the
    floor, log(eps) keeps about eight digits."""
    F, W = rng.standard_normal((2, 5, 3)), rng.standard_normal((4, 5))
    F[1] *= 1e3
    trace = np.trace(
        (lambda M: M @ M.T / 3)(W @ (F[1] - F[1].mean(axis=1, keepdims=True)))
    )
    with pytest.raises(
        ValueError, match=r"eps = 1e-16 is below 1e-08 times the trace .* of image 0"
    ):
        covariance_pool(F, W, eps=1e-16)
    with pytest.raises(
        ValueError,
        match=r"eps = 0.0001 is below 1e-08 times the trace .* of image 1: .*"
        r"raise eps to at least",
    ):
        covariance_pool(F, W, eps=1e-4)
    eps = 1.01e-8 * trace
    L = covariance_pool(F[1], W, eps=eps)
    np.testing.assert_allclose(
        np.sort(np.linalg.eigvalsh(L))[:2], np.log(eps), rtol=0, atol=1e-7
    )


def test_covariance_pool_names_an_overflow():
    F, W = np.full((3, 8), 1e200), np.ones((2, 3))
    F[0, 0] = -1e200
    with pytest.raises(
        ValueError,
        match=r"F and W are too large: the projected covariance of image 0 overflows",
    ):
        covariance_pool(F, W, eps=0.1)


@pytest.mark.parametrize(
    "F, W, G, message",
    [
        (
            (3, 8),
            (2, 4),
            (2, 2),
            r"W must have shape \(k, 3\) to match F \(3, 8\) \(d = 3 features\), got \(2, 4\)",
        ),
        (
            (2, 3, 8),
            (2, 4),
            (2, 2, 2),
            r"W must have shape \(k, 3\) to match F \(2, 3, 8\)",
        ),
        ((8,), (2, 8), (2, 2), r"F must be 2-D or 3-D, got shape \(8,\)"),
        (
            (3, 8),
            (2, 3),
            (3, 3),
            r"the cotangent G must have the output's shape \(2, 2\), got \(3, 3\)",
        ),
        (
            (4, 3, 8),
            (2, 3),
            (2, 2),
            r"the cotangent G must have the output's shape \(4, 2, 2\), got \(2, 2\)",
        ),
    ],
)
def test_covariance_pool_bad_shapes(F, W, G, message):
    with pytest.raises(ValueError, match=message):
        covariance_pool_vjp(np.ones(F), np.ones(W), np.zeros(G), eps=0.1)


def test_covariance_pool_bad_tangent():
    with pytest.raises(
        ValueError, match=r"the tangent dW must have shape \(2, 3\), got \(3, 2\)"
    ):
        covariance_pool_jvp(
            np.ones((3, 8)), np.ones((2, 3)), np.ones((3, 8)), np.ones((3, 2)), eps=0.1
        )


# ----- Independent JVPs: a symmetric mistake in a VJP's helper is caught -----


def _points(rng, primal_shapes, tangent_shapes, out_shape, count=3):
    return [
        (
            tuple(rng.standard_normal(s) for s in primal_shapes),
            tuple(rng.standard_normal(s) for s in tangent_shapes),
            rng.standard_normal(out_shape),
        )
        for _ in range(count)
    ]


def _spd_points(rng, n=4, count=3):
    points = []
    for _ in range(count):
        B = rng.standard_normal((n, n))
        S = B @ B.T + n * np.eye(n)
        points.append(
            ((S,), (rng.standard_normal((n, n)),), rng.standard_normal((n, n)))
        )
    return points


def _wrong_loewner(lam, f, _right=matfun._loewner):
    """A planted mistake that keeps L symmetric: off-diagonal entries 10 % too large.
    A self-adjoint Daleckii-Krein map shared by JVP and VJP would pass the dot-product
    test with it; the independent JVP does not."""
    L = _right(lam, f)
    n = L.shape[-1]
    return L * (1.0 + 0.1 * (1.0 - np.eye(n)))


def _wrong_polar_rule(U, s, Vt, X):
    """eq. 7.19 with C_ij = 1 / (sigma_i + sigma_j + 1): a symmetric mistake."""
    K = U.T @ X @ Vt.T
    return U @ ((K - K.T) / (s[:, None] + s[None, :] + 1.0)) @ Vt


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_spd_dot_product_test_catches_a_symmetric_mistake(name, monkeypatch):
    rng = np.random.default_rng(7)
    points = _spd_points(rng)
    jvp = lambda S, dS: spd_function_jvp(S, dS, f=name)  # noqa: E731
    vjp = lambda S, G: spd_function_vjp(S, G, f=name)  # noqa: E731
    check_dot_product(name, jvp, vjp, points)
    monkeypatch.setattr(matfun, "_loewner", _wrong_loewner)
    with pytest.raises(AssertionError, match="fails the dot-product test"):
        check_dot_product(name, jvp, vjp, points)


def test_covariance_pool_dot_product_test_catches_a_symmetric_mistake(monkeypatch):
    rng = np.random.default_rng(8)
    d, p, k = 3, 6, 2
    points = _points(rng, [(d, p), (k, d)], [(d, p), (k, d)], (k, k))
    jvp = lambda F, W, dF, dW: covariance_pool_jvp(F, W, dF, dW, eps=0.1)  # noqa: E731
    vjp = lambda F, W, G: covariance_pool_vjp(F, W, G, eps=0.1)  # noqa: E731
    check_dot_product("covariance_pool", jvp, vjp, points)
    monkeypatch.setattr(matfun, "_loewner", _wrong_loewner)
    with pytest.raises(AssertionError, match="fails the dot-product test"):
        check_dot_product("covariance_pool", jvp, vjp, points)


def test_polar_and_procrustes_dot_product_tests_catch_a_symmetric_mistake(
    monkeypatch,
):
    rng = np.random.default_rng(9)
    polar_points = _points(rng, [(3, 3)], [(3, 3)], (3, 3))
    pro_points = _points(rng, [(3, 5), (3, 5)], [(3, 5), (3, 5)], (3, 3))
    check_dot_product("polar", polar_jvp, polar_vjp, polar_points)
    check_dot_product("procrustes", procrustes_jvp, procrustes_vjp, pro_points)
    monkeypatch.setattr(matfun, "_polar_rule", _wrong_polar_rule)
    for name, jvp, vjp, points in [
        ("polar", polar_jvp, polar_vjp, polar_points),
        ("procrustes", procrustes_jvp, procrustes_vjp, pro_points),
    ]:
        with pytest.raises(AssertionError, match="fails the dot-product test"):
            check_dot_product(name, jvp, vjp, points)


# ----- One SPD test: rank-deficient matrices refused whatever the rounding -----


def _rank_deficient(rng, n=4, rank=2, count=40):
    mats = []
    for _ in range(count):
        B = rng.standard_normal((n, rank))
        mats.append(B @ B.T)
    return mats


SPD_USERS = {
    "logm_spd": lambda S: matfun.logm_spd(S),
    "sqrtm_spd": lambda S: matfun.sqrtm_spd(S),
    "invsqrtm_spd": lambda S: matfun.invsqrtm_spd(S),
    "logm_spd_jvp": lambda S: matfun.logm_spd_jvp(S, np.eye(len(S))),
    "sqrtm_spd_vjp": lambda S: matfun.sqrtm_spd_vjp(S, np.eye(len(S))),
    "invsqrtm_spd_jvp": lambda S: matfun.invsqrtm_spd_jvp(S, np.eye(len(S))),
    "spd_function_vjp": lambda S: spd_function_vjp(S, np.eye(len(S)), f="log"),
    "gaussian_nll": lambda S: gaussian_nll(np.ones((len(S), 2)), np.zeros(len(S)), S),
    "gaussian_nll_grad": lambda S: gaussian_nll_grad(
        np.ones((len(S), 2)), np.zeros(len(S)), S
    ),
}


@pytest.mark.parametrize("name", sorted(SPD_USERS))
def test_rank_deficient_matrix_is_refused_whatever_the_sign_of_rounding(name):
    mats = _rank_deficient(np.random.default_rng(10))
    # the zero eigenvalues come out of LAPACK with either sign: a test lam_min > 0
    # would accept some of these matrices and refuse others
    noise = [np.linalg.eigvalsh(S)[0] for S in mats]
    assert min(noise) < 0 < max(noise)
    for S in mats:
        with pytest.raises(ValueError, match="must be symmetric positive definite"):
            SPD_USERS[name](S)


def test_gaussian_nll_grad_against_finite_differences():
    """A second check of gaussian_nll_grad, besides jax.grad: central differences of
    gaussian_nll along random directions (dmu, dSigma symmetric)."""
    rng = np.random.default_rng(11)
    d, n = 3, 5
    X, mu = rng.standard_normal((d, n)), rng.standard_normal(d)
    B = rng.standard_normal((d, d))
    Sigma = B @ B.T + d * np.eye(d)
    mu_bar, Sigma_bar = gaussian_nll_grad(X, mu, Sigma)
    h = 1e-5
    for _ in range(3):
        dmu, dB = rng.standard_normal(d), rng.standard_normal((d, d))
        dSigma = dB + dB.T
        fd = (
            gaussian_nll(X, mu + h * dmu, Sigma + h * dSigma)
            - gaussian_nll(X, mu - h * dmu, Sigma - h * dSigma)
        ) / (2 * h)
        ours = mu_bar @ dmu + np.sum(Sigma_bar * dSigma)
        assert abs(ours - fd) <= 1e-7 * max(1.0, abs(fd))


def logm_spd_jvp_nan_primal():
    return matfun.logm_spd_jvp(np.array([[1.0, np.nan], [np.nan, 1.0]]), np.eye(2))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: spd_function_jvp(np.eye(2), np.full((2, 2), np.nan), f="log"), "dS"),
        (lambda: spd_function_vjp(np.eye(2), np.full((2, 2), np.nan), f="log"), "G"),
        (lambda: polar_jvp(np.eye(2), np.full((2, 2), np.inf)), "dM"),
        (lambda: polar_vjp(np.eye(2), np.full((2, 2), np.nan)), "G"),
        (
            lambda: procrustes_jvp(
                np.eye(2), np.eye(2), np.eye(2), np.full((2, 2), np.nan)
            ),
            "dB",
        ),
        (
            lambda: covariance_pool_jvp(
                np.ones((2, 4)), np.eye(2), np.full((2, 4), np.nan), np.eye(2), eps=0.1
            ),
            "dF",
        ),
        (
            lambda: covariance_pool_vjp(
                np.ones((2, 4)), np.eye(2), np.full((2, 2), np.nan), eps=0.1
            ),
            "G",
        ),
        (lambda: eigvecsh_vjp(np.diag([1.0, 2.0]), np.full((2, 2), np.nan)), "G"),
        (lambda: svdvals_jvp(np.diag([1.0, 2.0]), np.full((2, 2), np.nan)), "dM"),
        (lambda: svdvals_vjp(np.diag([1.0, 2.0]), np.array([1.0, np.nan])), "g"),
        (lambda: eigvalsh_vjp(np.diag([1.0, 2.0]), np.array([np.inf, 1.0])), "g"),
        (lambda: eigvalsh_jvp(np.diag([1.0, 2.0]), np.full((2, 2), np.nan)), "dS"),
        (lambda: polar_jvp(np.full((2, 2), np.nan), np.eye(2)), "M"),
        (lambda: logm_spd_jvp_nan_primal(), "S"),
        (lambda: matfun.sym(np.array([[1.0, np.nan], [0.0, 1.0]])), "A"),
    ],
)
def test_non_finite_primal_tangent_or_cotangent_is_named(call, name):
    with pytest.raises(ValueError, match=rf"^{name} must be finite"):
        call()


# ----- An exact result beyond float64: a ValueError, never an infinity or a NaN -----


@pytest.mark.parametrize(
    "call, message",
    [
        # d S^(-1/2) has the eigenvalue -lam^(-3/2) / 2 = -3.5e374 at lam = 1e-250
        (
            lambda: matfun.invsqrtm_spd_jvp(
                1e-250 * np.diag([1.0, 2.0]), np.ones((2, 2))
            ),
            r"spd_function_jvp \(f = 'invsqrt'\): the result overflows float64 at S "
            r"with eigenvalues from 2e-250 down to 1e-250",
        ),
        (
            lambda: matfun.invsqrtm_spd_vjp(
                1e-250 * np.diag([1.0, 2.0]), np.ones((2, 2))
            ),
            r"spd_function_vjp \(f = 'invsqrt'\): the result overflows float64",
        ),
        # d log S has 1 / lam = 1e310 at lam = 1e-310
        (
            lambda: matfun.logm_spd_vjp(1e-310 * np.diag([1.0, 2.0]), np.ones((2, 2))),
            r"spd_function_vjp \(f = 'log'\): the result overflows float64",
        ),
        (
            lambda: gaussian_nll_grad(np.ones((2, 3)), np.zeros(2), 1e-300 * np.eye(2)),
            "gaussian_nll_grad: the result overflows float64",
        ),
        (
            lambda: gaussian_nll(1e200 * np.ones((2, 3)), np.zeros(2), np.eye(2)),
            "gaussian_nll: the result overflows float64",
        ),
        (
            lambda: covariance_pool_vjp(
                np.ones((2, 4)), np.eye(2), np.ones((2, 2)), eps=1e-310
            ),
            r"covariance_pool_vjp: the result overflows float64 .*; raise eps",
        ),
    ],
)
def test_a_result_beyond_float64_is_refused(call, message):
    with np.errstate(all="ignore"), pytest.raises(ValueError, match=message):
        call()


def test_large_finite_tangents_do_not_overflow_in_the_symmetrization():
    """(A + A^T) / 2 overflows at entries near 1.8e308 where A / 2 + A^T / 2 does not;
    the derivatives below are representable and exact."""
    A = np.full((2, 2), 1e308)
    np.testing.assert_array_equal(matfun.sym(A), A)
    np.testing.assert_allclose(matfun.sqrtm_spd_jvp(np.eye(2), A), A / 2, rtol=1e-15)
    np.testing.assert_allclose(matfun.sqrtm_spd_vjp(np.eye(2), A), A / 2, rtol=1e-15)
    np.testing.assert_allclose(
        eigvalsh_jvp(np.diag([1.0, 2.0]), A), [1e308, 1e308], rtol=1e-15
    )


def test_eigvecsh_dot_product_test_catches_a_mistake_in_the_vjp_gap_matrix(
    monkeypatch,
):
    """F scaled by 1.1 in the VJP's helper: shared by the JVP it would pass the
    dot-product test (both sides scale by 1.1); the JVP's own Omega does not."""
    rng = np.random.default_rng(12)
    points = []
    for _ in range(3):
        B = rng.standard_normal((4, 4))
        points.append(
            ((B + B.T,), (rng.standard_normal((4, 4)),), rng.standard_normal((4, 4)))
        )
    check_dot_product("eigvecsh", eigvecsh_jvp, eigvecsh_vjp, points)
    right = matfun._gap_matrix
    monkeypatch.setattr(matfun, "_gap_matrix", lambda lam: 1.1 * right(lam))
    with pytest.raises(AssertionError, match="fails the dot-product test"):
        check_dot_product("eigvecsh", eigvecsh_jvp, eigvecsh_vjp, points)


def test_complex_input_and_a_non_string_f_are_refused():
    with pytest.raises(ValueError, match="S must be a real array, got a complex"):
        spd_function(np.eye(2) * (1 + 0j), f="log")
    with pytest.raises(ValueError, match=r"f must be one of .*, got \[\]"):
        spd_function(np.eye(2), f=[])
