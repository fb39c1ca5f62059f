"""Chapter 3: loss functions (cross entropy, binary and multinomial logistic
regression).

Conventions of the note: observations are the columns of X, shape (d, n); labels are
y in {0, 1}^n (binary: a 1-D array (n,) of zeros and ones) or, for the multinomial
model, either class indices, a 1-D integer array (n,) in [0, k), or the columns of Y,
shape (k, n), one probability vector per observation: one-hot, or soft labels such as
label smoothing (both forms are checked and converted by
``derivlib._validate.as_label_columns``, shared with every fitting function of
Chapters 4 and 5); the parameters are theta, shape (d,), or Theta, shape (d, k).
Gradients have the shape of the parameter. The multinomial Hessian is taken with
respect to vec Theta (column-major), shape (dk, dk).

Every loss accepts `l2` >= 0 and then adds (l2 / 2) ||theta||^2 (the Frobenius norm
for Theta): l2 = 1 / C in scikit-learn's terms (with fit_intercept=False).

The fits take data, labels, then keyword-only options (``l2``, ``tol``, ``max_iter``,
``return_history``), named as in every fitting function of derivlib. They return the
parameter array. With ``return_history=True`` they return the
pair (parameters, FitHistory), where FitHistory records the loss and the largest
gradient entry at every iterate. A fit that cannot converge says why:
SeparableDataError when the data are separable and l2 = 0 (the loss has no minimum),
ConvergenceError when max_iter is reached or the Newton system breaks down. It never
returns NaN."""

from dataclasses import dataclass, field

import numpy as np

from ._threads import one_blas_thread
from ._validate import as_binary_labels, as_finite_array, as_label_columns
from .vector import _log_softmax, _softmax_complement, sigmoid, sigmoid_derivative

# ----- Errors and the fit record -----


class ConvergenceError(RuntimeError):
    """A fit stopped without reaching its tolerance (the message says why)."""


class SeparableDataError(ConvergenceError):
    """The data are separable and l2 = 0: the negative log-likelihood has no minimum."""


@dataclass
class FitHistory:
    """What a Newton fit did: one entry per iterate, the starting point first.

    `loss` is the objective (with its l2 term); `grad_max` is max |gradient|, the
    quantity the stopping rule compares with tol * n; `step_sizes` holds the line-search
    step taken at each iteration (1.0 is a full Newton step).
    """

    loss: list = field(default_factory=list)
    grad_max: list = field(default_factory=list)
    step_sizes: list = field(default_factory=list)
    converged: bool = False

    @property
    def n_iter(self):
        """The number of Newton steps taken."""
        return len(self.step_sizes)


# ----- Input checks -----


def _check_l2(l2):
    try:
        l2 = float(l2)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"l2 must be a number >= 0, got {l2!r}") from exc
    if not (np.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    return l2


def _check_data(X, n_labels, label_name):
    X = as_finite_array(X, "X", ndims=2)
    if X.shape[1] != n_labels:
        raise ValueError(
            f"X must have one column per observation: {label_name} has {n_labels} "
            f"observations but X has shape {X.shape} (expected (d, {n_labels}))"
        )
    return X


def _check_binary_labels(y):
    return as_binary_labels(y, "y")


def _check_label_columns(Y, k=None):
    """Y as (k, n) probability columns: one-hot, soft labels, or class indices (n,)
    converted to one-hot (see ``as_label_columns``)."""
    return as_label_columns(Y, "Y", k)


def _is_one_hot(Y):
    return bool(np.all((Y == 0) | (Y == 1)))


def _check_logistic(theta, X, y):
    y = _check_binary_labels(y)
    X = _check_data(X, y.size, "y")
    theta = as_finite_array(theta, "theta", ndims=1)
    if theta.size != X.shape[0]:
        raise ValueError(
            f"theta must have one entry per row of X: X has shape {X.shape} "
            f"(d = {X.shape[0]}) but theta has shape {theta.shape}"
        )
    return theta, X, y


def _check_multinomial(Theta, X, Y):
    Theta = as_finite_array(Theta, "Theta", ndims=2)
    Y = _check_label_columns(Y, Theta.shape[1] if np.ndim(Y) == 1 else None)
    k, n = Y.shape
    X = _check_data(X, n, "Y")
    if Theta.shape != (X.shape[0], k):
        raise ValueError(
            f"Theta must have shape (d, k) = ({X.shape[0]}, {k}) for X of shape "
            f"{X.shape} and Y of shape {Y.shape}, got {Theta.shape}"
        )
    return Theta, X, Y


def _check_distribution(p, name, tol=1e-9):
    p = as_finite_array(p, name, ndims=1)
    if np.any(p < 0):
        i = int(np.flatnonzero(p < 0)[0])
        raise ValueError(
            f"{name} must be a probability vector (entries >= 0), got {name}[{i}] = "
            f"{p[i]}"
        )
    total = float(p.sum())
    if abs(total - 1.0) > tol * max(1, p.size):
        raise ValueError(f"{name} must sum to one, got a sum of {total:.12g}")
    return p


def _check_pair(p, q):
    p, q = _check_distribution(p, "p"), _check_distribution(q, "q")
    if p.shape != q.shape:
        raise ValueError(
            f"p and q must have the same shape, got {p.shape} and {q.shape}"
        )
    return p, q


# ----- 3.1 Cross entropy -----


def _plogq(p, q):
    """p_i log q_i with 0 log q = 0 and p log 0 = -inf, without a warning."""
    out = np.zeros_like(p)
    pos = p > 0
    with np.errstate(divide="ignore"):
        out[pos] = p[pos] * np.log(q[pos])
    return out


def cross_entropy(p, q):
    """Eq. (3.1): H[p, q] = -sum_x p(x) log q(x) = -p^T log[q], in nats.

    `p` and `q` are probability vectors of one length m (entries >= 0, summing to one).
    Terms with p_i = 0 count as zero; H is +inf when q_i = 0 where p_i > 0.
    """
    p, q = _check_pair(p, q)
    return float(-np.sum(_plogq(p, q)))


def entropy(p):
    """H[p] = -sum_x p(x) log p(x), the first term of eq. (3.2); 0 log 0 = 0."""
    p = _check_distribution(p, "p")
    return float(-np.sum(_plogq(p, p)))


def kl_divergence(p, q):
    """D_KL(p || q) = sum_x p(x) log(p(x) / q(x)), the second term of eq. (3.2)."""
    p, q = _check_pair(p, q)
    return float(np.sum(_plogq(p, p) - _plogq(p, q)))


def cross_entropy_grad(p, q):
    """The gradient of H[p, q] = -p^T log[q] with respect to q: -diag(q)^-1 p, shape
    (m,).

    From dH = -p^T diag(q)^-1 dq (section 3.1, with the minus sign of eq. 3.1 kept).
    It is the gradient of the function of q on the open orthant q > 0, so every q_i
    must be positive."""
    p, q = _check_pair(p, q)
    if np.any(q <= 0):
        i = int(np.flatnonzero(q <= 0)[0])
        raise ValueError(f"the gradient needs q > 0 everywhere, got q[{i}] = {q[i]}")
    return -p / q


# ----- 3.2 Binary logistic regression -----


def _logistic_objective(z, y, theta, l2):
    """sum_i log(1 + exp(-s_i z_i)) with s_i = 2 y_i - 1, plus the l2 term.

    Each term is the log-sigmoid form of -y_i log pi_i - (1 - y_i) log(1 - pi_i):
    np.logaddexp(0, t) = log(1 + e^t) is finite for every finite t.
    """
    loss = float(np.sum(np.logaddexp(0.0, (1.0 - 2.0 * y) * z)))
    return loss + 0.5 * l2 * float(theta @ theta)


def logistic_loss(theta, X, y, l2=0.0):
    """Section 3.2: L(theta) = -y^T log[pi] - (1 - y)^T log[1 - pi], pi = sigma[X^T
    theta].

    theta (d,), X (d, n) with observations as columns, y in {0, 1}^n. Returns a
    float; with l2 > 0, (l2 / 2) ||theta||^2 is added."""
    theta, X, y = _check_logistic(theta, X, y)
    return _logistic_objective(X.T @ theta, y, theta, _check_l2(l2))


def _logistic_residual(z, y):
    """pi - y, written -s sigma(-s z) with s = 2y - 1: for y = 1 this is -(1 - pi)
    without the cancellation of 1 - pi when pi rounds to one."""
    s = 2.0 * y - 1.0
    return -s * sigmoid(-s * z)


def logistic_grad(theta, X, y, l2=0.0):
    """Eq. (3.9): dL = (pi - y)^T X^T dtheta, so grad L(theta) = X (pi - y), shape (d,).

    The note says this gradient is in R^n; it has one entry per parameter, R^d.
    With l2 > 0, l2 * theta is added.
    """
    theta, X, y = _check_logistic(theta, X, y)
    return X @ _logistic_residual(X.T @ theta, y) + _check_l2(l2) * theta


def _weighted_gram(X, w):
    """X diag(w) X^T for w >= 0, as R R^T with R = X diag(sqrt(w)).

    NumPy computes R @ R.T with a symmetric rank-k update (half the work of a
    general product) because both operands are views of the same array.
    """
    R = X * np.sqrt(w)
    return R @ R.T


def logistic_hessian(theta, X, y, l2=0.0):
    """Eq. (3.14): d^2 L = dtheta^T X diag(pi o (1 - pi)) X^T dtheta, so the Hessian is
    X diag(pi o (1 - pi)) X^T, shape (d, d) (plus l2 * I).

    The weights pi o (1 - pi) come from sigma' = e / (1 + e)^2 with e = exp(-|z|),
    which does not cancel when pi is close to one.
    """
    theta, X, y = _check_logistic(theta, X, y)
    l2 = _check_l2(l2)
    H = _weighted_gram(X, sigmoid_derivative(X.T @ theta))
    H.flat[:: H.shape[0] + 1] += l2  # the diagonal
    return H


# ----- Newton's method (IRLS), shared by both fits -----


def _cholesky_solve(H, g):
    """Solve H s = g for a symmetric positive definite H; None if H is not."""
    try:
        from scipy.linalg.lapack import dpotrf, dpotrs
    except ImportError:  # NumPy only: the same factorisation, general triangular solves
        try:
            L = np.linalg.cholesky(H)
        except np.linalg.LinAlgError:
            return None
        return np.linalg.solve(L.T, np.linalg.solve(L, g))
    # LAPACK's Cholesky factorisation and solve, as scipy.linalg.cho_factor and
    # cho_solve call them, without their wrappers (tens of us a call at d = 65)
    c, info = dpotrf(H, lower=1, clean=0)
    if info != 0:  # info > 0: H is not positive definite
        return None
    s, info = dpotrs(c, g, lower=1)
    return s if info == 0 else None


def _newton(model, params, n, tol, max_iter, what):
    """Minimise a convex model by Newton's method with a backtracking line search.

    `model` supplies logits(params), loss(params, z), gradient(params, z) ->
    (g, state) with g the gradient over the free parameters, hessian(state) over the
    same parameters, expand(step) (the step as a parameter array) and separated(z) (a
    certificate that the loss has no minimum). Stops when max |g| <= tol * n, the rule
    scikit-learn applies to its objective L / n.

    The BLAS runs on one thread throughout (`derivlib._threads`): each iteration
    alternates NumPy's products with SciPy's Cholesky, two OpenBLAS libraries whose
    thread pools, at two threads each, wait for each other's cores. On a 2-core
    machine the logistic fit took, in one run, 2.5 against 1.4 ms at d = 65, n = 600,
    51 against 31 ms at d = 65, n = 20000, and 732 against 443 ms at d = 400, n =
    20000 (whose Hessian product alone is faster on two threads); the margin depends
    on the load of the other core (another run: 1.2 against 1.0, 23 against 20 and 630
    against 435 ms).
    """
    with one_blas_thread():
        return _newton_steps(model, params, n, tol, max_iter, what)


def _newton_steps(model, params, n, tol, max_iter, what):
    history = FitHistory()
    z = model.logits(params)
    loss = model.loss(params, z)
    for it in range(max_iter + 1):
        g, state = model.gradient(params, z)
        gmax = float(np.max(np.abs(g)))
        history.loss.append(loss)
        history.grad_max.append(gmax)
        if not (np.isfinite(loss) and np.isfinite(gmax)):
            raise ConvergenceError(
                f"{what}: the loss or gradient became non-finite at iteration {it}"
            )
        if gmax <= tol * n:
            history.converged = True
            return params, history
        if model.separated(z):
            raise SeparableDataError(
                f"{what}: the data are separable (the iterate after {it} Newton "
                f"step{'' if it == 1 else 's'} puts every one of the {n} observations "
                f"strictly on the side of its label), so with l2 = 0 the loss has no "
                f"minimum: it decreases towards 0 while the norm of the parameters "
                f"grows without bound. Use l2 > 0 (for example l2=1.0)."
            )
        if it == max_iter:
            break
        step = _cholesky_solve(model.hessian(state), g)
        if step is None:
            raise ConvergenceError(
                f"{what}: the Hessian is not positive definite at iteration {it} "
                "(collinear features or near-separable data with l2 = 0); use l2 > 0"
            )
        slope = float(g @ step)
        step = model.expand(step)
        dz = model.logits(step)
        t = 1.0
        while True:
            new_params, new_z = params - t * step, z - t * dz
            new_loss = model.loss(new_params, new_z)
            # Armijo's condition, with room for the rounding error of the loss itself
            if new_loss <= loss - 1e-4 * t * slope + 1e-13 * abs(loss):
                break
            t *= 0.5
            if t < 1e-10:
                raise ConvergenceError(
                    f"{what}: the line search failed at iteration {it} (max |gradient| "
                    f"= {gmax:.3e}, tolerance tol * n = {tol * n:.3e}); the tolerance "
                    f"may be below rounding error"
                )
        params, z, loss = new_params, new_z, new_loss
        history.step_sizes.append(t)
    raise ConvergenceError(
        f"{what}: no convergence in max_iter = {max_iter} Newton steps "
        f"(max |gradient| = {history.grad_max[-1]:.3e} > tol * n = {tol * n:.3e})"
    )


def _require_full_row_rank(X, what):
    """With l2 = 0 a fit is degenerate unless X (d, n) has rank d: a direction v with
    v^T X = 0 changes no logit, so the data do not constrain the parameters along it
    and the Hessian is singular. Refuse such a problem before solving it, naming the
    features that are zero in every observation."""
    rank = int(np.linalg.matrix_rank(X))
    d = X.shape[0]
    if rank < d:
        zero = np.flatnonzero(~np.any(X != 0, axis=1))
        shown = ", ".join(str(i) for i in zero[:10]) + (
            ", ..." if zero.size > 10 else ""
        )
        rows = (
            f"; {zero.size} feature{'s are' if zero.size > 1 else ' is'} zero in every "
            f"observation (row{'s' if zero.size > 1 else ''} {shown} of X)"
            if zero.size
            else ""
        )
        raise ValueError(
            f"{what} with l2 = 0 needs X (d, n) of rank d = {d}, so that the data "
            f"constrain every parameter; X of shape {X.shape} has rank {rank}{rows}. "
            f"Use l2 > 0, or drop the redundant features"
        )


def _check_fit_options(tol, max_iter):
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol}")
    if int(max_iter) != max_iter or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter}")
    return float(tol), int(max_iter)


class _Logistic:
    def __init__(self, X, y, l2):
        self.X, self.y, self.l2 = X, y, l2
        self.sign = 2.0 * y - 1.0

    def logits(self, theta):
        return self.X.T @ theta

    def loss(self, theta, z):
        return _logistic_objective(z, self.y, theta, self.l2)

    def gradient(self, theta, z):
        return self.X @ _logistic_residual(z, self.y) + self.l2 * theta, z

    def hessian(self, z):
        H = _weighted_gram(self.X, sigmoid_derivative(z))
        H.flat[:: H.shape[0] + 1] += self.l2  # the diagonal
        return H

    def expand(self, step):
        return step

    def separated(self, z):
        return self.l2 == 0 and bool(np.all(self.sign * z > 0))


def fit_logistic(X, y, *, l2=0.0, tol=1e-10, max_iter=100, return_history=False):
    """IRLS (Newton's method) for section 3.2, with the derived gradient (3.9) and
    Hessian (3.14): theta <- theta - t H^-1 g, H factorised by Cholesky, t from a
    backtracking line search (t = 1 near the minimum).

    X (d, n) with observations as columns, y (n,) in {0, 1} (an integer, boolean or
    float array of zeros and ones; ValueError for anything else, such as one-hot
    columns (2, n)); options keyword-only. Starts at theta = 0 and stops
    when max |grad L| <= tol * n (scikit-learn's rule on its objective L / n). Returns
    theta, shape (d,), or (theta, FitHistory) with return_history=True.

    With l2 = 0 on separable data the minimum does not exist: the fit raises
    SeparableDataError as soon as an iterate separates the data. With l2 = 0 and X of
    rank below d (a feature that is zero in every observation, collinear features,
    fewer observations than features) the problem is degenerate and is refused with
    a ValueError before Newton's method starts.
    """
    y = _check_binary_labels(y)
    X = _check_data(X, y.size, "y")
    l2 = _check_l2(l2)
    tol, max_iter = _check_fit_options(tol, max_iter)
    if l2 == 0:
        _require_full_row_rank(X, "fit_logistic")
    theta, history = _newton(
        _Logistic(X, y, l2), np.zeros(X.shape[0]), y.size, tol, max_iter, "fit_logistic"
    )
    return (theta, history) if return_history else theta


# ----- 3.3 Multinomial logistic regression -----


def _multinomial_objective(Z, Y, Theta, l2):
    """-tr(Y^T log sigma(Z)) + (l2 / 2) ||Theta||_F^2."""
    return float(-np.sum(Y * _log_softmax(Z))) + 0.5 * l2 * float(np.sum(Theta * Theta))


def multinomial_loss(Theta, X, Y, l2=0.0):
    """Section 3.3, in trace form (eq. 3.15c of the book): with Pi = sigma(Theta^T X),
    L(Theta) = -sum_i y_i^T log sigma(Theta^T x_i) = -tr(Y^T log[Pi]).

    Theta (d, k), X (d, n), Y (k, n) with one probability vector per column (one-hot,
    or soft labels). log[Pi] is computed by log-sum-exp, so the loss is finite for any
    finite logits. Adds (l2 / 2) ||Theta||_F^2.
    """
    Theta, X, Y = _check_multinomial(Theta, X, Y)
    return _multinomial_objective(Theta.T @ X, Y, Theta, _check_l2(l2))


def multinomial_grad(Theta, X, Y, l2=0.0):
    """Eq. 3.20b of the book: dL = tr((X (Pi - Y)^T)^T dTheta) (eq. 3.20a), so the
    gradient is X (Pi - Y)^T, shape (d, k), like Theta. Adds l2 * Theta.

    Y (k, n) may hold soft labels: the simplification in eq. 3.19' needs only that each
    column of Y sums to one.
    """
    Theta, X, Y = _check_multinomial(Theta, X, Y)
    return X @ _multinomial_residual(Theta.T @ X, Y).T + _check_l2(l2) * Theta


def _one_minus(Pi, E):
    """1 - Pi as the sum of the other classes' probabilities, without cancellation.

    E holds the shifted exponentials of the logits (Pi = E / 1^T E). 1 - pi_a is the sum
    over b != a of pi_b: a prefix sum plus a suffix sum of positive terms, accurate even
    when pi_a rounds to 1.
    """
    return _softmax_complement(E, axis=0) / E.sum(axis=0, keepdims=True)


def _multinomial_residual(Z, Y):
    """Pi - Y, with the entries where y_ai = 1, pi_a - 1, computed as minus the sum of
    the other probabilities (accurate when pi_a rounds to one)."""
    E = np.exp(Z - Z.max(axis=0, keepdims=True))
    Pi = E / E.sum(axis=0, keepdims=True)
    return np.where(Y == 1, -_one_minus(Pi, E), Pi - Y)


def _multinomial_hessian(X, Z, l2):
    """sum_i (diag(pi_i) - pi_i pi_i^T) kron x_i x_i^T (+ l2 I), shape (dk, dk).

    Block (a, b), of shape (d, d), is X diag(pi_a o (delta_ab - pi_b)) X^T. All the
    -pi_i pi_i^T kron x_i x_i^T terms together are -W W^T, where column i of W (dk, n)
    is pi_i kron x_i: one symmetric product for every off-diagonal block. The k diagonal
    blocks are then formed directly as X diag(pi_a o (1 - pi_a)) X^T, with 1 - pi_a
    computed without cancellation.
    """
    d, n = X.shape
    k = Z.shape[0]
    E = np.exp(Z - Z.max(axis=0, keepdims=True))
    Pi = E / E.sum(axis=0, keepdims=True)
    W = (Pi[:, None, :] * X[None, :, :]).reshape(k * d, n)
    H = W @ W.T
    np.negative(H, out=H)
    weights = Pi * _one_minus(Pi, E)
    for a in range(k):
        block = slice(a * d, (a + 1) * d)
        H[block, block] = _weighted_gram(X, weights[a])
    H.flat[:: H.shape[0] + 1] += l2  # the diagonal
    return H


def multinomial_hessian(Theta, X, Y, l2=0.0):
    """The Hessian with respect to vec Theta (column-major), shape (dk, dk) (eq.
    3.20f):

        d^2 L = dvec(Theta)^T [sum_i (diag(pi_i) - pi_i pi_i^T) kron x_i x_i^T]
        dvec(Theta)

    Block (a, b) is X diag(pi_a o (delta_ab - pi_b)) X^T. With all k columns free the
    model is over-parametrised (adding a vector to every column of Theta changes
    nothing), so this matrix is singular; l2 > 0 adds l2 * I and makes it definite.
    It does not depend on Y (for one-hot or soft labels alike)."""
    Theta, X, Y = _check_multinomial(Theta, X, Y)
    return _multinomial_hessian(X, Theta.T @ X, _check_l2(l2))


class _Multinomial:
    """Newton on vec Theta. With l2 = 0 the last column of Theta is held at zero (the
    model is over-parametrised) and the Newton system is solved for the other
    columns."""

    def __init__(self, X, Y, l2):
        self.X, self.Y, self.l2 = X, Y, l2
        self.d, self.k = X.shape[0], Y.shape[0]
        self.label = np.argmax(Y, axis=0)
        self.one_hot = _is_one_hot(Y)
        self.free = self.d * self.k if l2 > 0 else self.d * (self.k - 1)

    def logits(self, Theta):
        return Theta.T @ self.X

    def loss(self, Theta, Z):
        return _multinomial_objective(Z, self.Y, Theta, self.l2)

    def gradient(self, Theta, Z):
        G = self.X @ _multinomial_residual(Z, self.Y).T + self.l2 * Theta
        return G.reshape(-1, order="F")[: self.free], Z

    def hessian(self, Z):
        return _multinomial_hessian(self.X, Z, self.l2)[: self.free, : self.free]

    def expand(self, step):
        full = np.zeros(self.d * self.k)
        full[: self.free] = step
        return full.reshape((self.d, self.k), order="F")

    def separated(self, Z):
        if self.l2 > 0 or not self.one_hot:
            return False
        true = Z[self.label, np.arange(Z.shape[1])]
        others = np.where(self.Y > 0, -np.inf, Z).max(axis=0)
        return bool(np.all(true > others))


def fit_multinomial(X, Y, *, l2=0.0, tol=1e-10, max_iter=100, return_history=False):
    """Newton's method for section 3.3 with the derived gradient X (Pi - Y)^T and the
    Kronecker-structured Hessian, Cholesky-factorised, with a backtracking line search.

    X (d, n); Y either class indices, a 1-D integer array (n,) in [0, k) with k the
    largest index plus one, or (k, n) with one probability vector per column (one-hot,
    or soft labels); anything else (float indices, negative entries, columns not
    summing to one) is a ValueError. Options keyword-only. Starts at Theta = 0 and
    stops when max |grad L| <= tol * n. Returns Theta, shape (d, k), or (Theta,
    FitHistory) with return_history=True. With l2 > 0 the minimiser
    is unique (and its rows sum to zero). With l2 = 0 the last column is fixed at zero
    during the fit (the Hessian is singular with all k columns free) and Theta is then
    centred so each row sums to zero (the minimum-norm representative); one-hot labels
    that the data separate raise SeparableDataError, and X of rank below d is refused
    (ValueError) before the fit starts, as in fit_logistic.
    """
    Y = _check_label_columns(Y)
    X = _check_data(X, Y.shape[1], "Y")
    l2 = _check_l2(l2)
    tol, max_iter = _check_fit_options(tol, max_iter)
    if l2 == 0 and Y.shape[0] < 2:
        raise ValueError(
            f"fit_multinomial with l2 = 0 needs k >= 2 classes, got Y of shape "
            f"{Y.shape}"
        )
    if l2 == 0:
        _require_full_row_rank(X, "fit_multinomial")
    model = _Multinomial(X, Y, l2)
    Theta, history = _newton(
        model,
        np.zeros((X.shape[0], Y.shape[0])),
        Y.shape[1],
        tol,
        max_iter,
        "fit_multinomial",
    )
    if l2 == 0:
        Theta = Theta - Theta.mean(axis=1, keepdims=True)
    return (Theta, history) if return_history else Theta
