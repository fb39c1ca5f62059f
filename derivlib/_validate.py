"""Input checks shared by every module: clear ValueErrors, never silent NaNs."""

import numpy as np


def as_float_array(x, name, ndims=None):
    """`x` as a float64 array, with `ndims` (an int or a tuple of ints) checked. A
    complex array is refused, not cast (the cast would drop its imaginary part)."""
    if type(x) is np.ndarray and x.dtype == np.float64:  # the common case, no copy
        arr = x
    else:
        arr = _converted(x, name)
    if ndims is not None:
        if arr.ndim != ndims and (isinstance(ndims, int) or arr.ndim not in ndims):
            allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
            wanted = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {wanted}, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    return arr


def _converted(x, name):
    """x as a float64 array, refusing a complex or non-numeric x."""
    if np.iscomplexobj(x):
        raise ValueError(
            f"{name} must be a real array, got a complex {type(x).__name__}"
        )
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name} must be a real array, got {type(x).__name__}"
        ) from exc
    return arr


def require_finite(arr, name):
    """Raise if `arr` holds NaN or infinity."""
    if not np.isfinite(arr).all():
        bad = arr[~np.isfinite(arr)].ravel()[0]
        raise ValueError(f"{name} must be finite, got {bad}")
    return arr


def require_no_nan(arr, name):
    """Raise if `arr` holds NaN (infinities are allowed)."""
    if np.any(np.isnan(arr)):
        raise ValueError(f"{name} must not contain NaN")
    return arr


def as_finite_array(x, name, ndims=None):
    """`x` as a float64 array (as `as_float_array`), checked for NaN and infinity. A
    small array is scanned entry by entry (``isfinite``); a large one is summed,
    since any NaN or infinity makes the sum non-finite, so a finite sum (one pass, no
    temporary) proves the array finite, and only a non-finite sum (or one that
    overflowed) needs the scan."""
    arr = as_float_array(x, name, ndims)
    if arr.size < _LARGE:
        finite = np.isfinite(arr).all()
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(np.add.reduce(arr, axis=None))
    return arr if finite else require_finite(arr, name)


_LARGE = (
    1 << 16
)  # entries; below this, entering np.errstate costs more than the scan saves


def as_array_of_shape(x, name, shape, expected, finite=True):
    """`x` as a float64 array (finite unless finite=False) of exactly `shape`;
    otherwise a ValueError "<expected> <shape>, got <its shape>", where `expected`
    names the argument and whose shape it must have, and may refer to the argument as
    {name}."""
    arr = as_finite_array(x, name) if finite else as_float_array(x, name)
    if arr.shape != tuple(shape):
        raise ValueError(
            f"{expected.format(name=name)} {tuple(shape)}, got {arr.shape}"
        )
    return arr


def as_cotangent(G, shape, finite=True, name="G"):
    """The cotangent of an output of shape `shape`, named `name` in messages (G, or g
    for a vector output; see `as_array_of_shape`)."""
    return as_array_of_shape(
        G, name, shape, "the cotangent {name} must have the output's shape", finite
    )


# ----- Symmetric and symmetric positive definite matrices -----

# A symmetric matrix is accepted when max |S - S^T| <= SYMMETRY_RTOL * max |S|.
SYMMETRY_RTOL = 1e-10

# A symmetric S is positive definite for derivlib when its smallest eigenvalue exceeds
# SPD_RTOL times its largest: lam_min > SPD_RTOL * lam_max (condition number below
# 1e12). LAPACK returns the zero eigenvalues of a rank-deficient n x n matrix as
# rounding noise of either sign, about n * 1e-16 * lam_max, so this threshold, far
# above that noise, refuses every rank-deficient matrix whatever the sign of its
# noise; the exact test lam_min > 0 would accept some and refuse others.
SPD_RTOL = 1e-12


def as_symmetric(S, name):
    """sym(S) as float64, after checking that S is square, finite and symmetric to
    SYMMETRY_RTOL relative (ValueError naming `name` otherwise)."""
    S = as_float_array(S, name, 2)
    if S.shape[0] != S.shape[1]:
        raise ValueError(f"{name} must be square, got shape {S.shape}")
    scale = float(np.max(np.abs(S)))
    if not np.isfinite(scale):  # a NaN or an infinity somewhere: say which
        require_finite(S, name)
    D = S - S.T
    asym = float(np.max(np.abs(D)))
    if asym > SYMMETRY_RTOL * max(scale, np.finfo(float).tiny):
        raise ValueError(
            f"{name} must be symmetric, got max |{name} - {name}^T| = {asym:.3g} "
            f"for shape {S.shape}"
        )
    return S - 0.5 * D


def require_spd_eigenvalues(lam, name, what=""):
    """Raise unless the ascending eigenvalues `lam` (n,) of a symmetric matrix, or
    those of a stack (N, n), pass the SPD test lam_min > SPD_RTOL * lam_max. `what`
    names the matrix of a stack, e.g. "of image {i}" (formatted with the index)."""
    lam = np.atleast_2d(lam)
    top = np.max(np.abs(lam), axis=1)
    bad = np.flatnonzero(~(lam[:, 0] > SPD_RTOL * top))
    if bad.size:
        i = int(bad[0])
        where = what.format(i=i)
        raise ValueError(
            f"{name}{where} must be symmetric positive definite (smallest eigenvalue "
            f"above {SPD_RTOL:g} times the largest), got eigenvalues from "
            f"{lam[i, -1]:.3g} down to {lam[i, 0]:.3g}"
        )


def as_spd(S, name):
    """sym(S), checked square, finite, symmetric (`as_symmetric`) and positive
    definite by the one SPD test of derivlib (`require_spd_eigenvalues`)."""
    S = as_symmetric(S, name)
    require_spd_eigenvalues(np.linalg.eigvalsh(S), name)
    return S


# ----- Labels and targets -----
#
# Every fitting function accepts labels in one of two forms and converts them here:
#   class indices: a 1-D array (n,) of an integer dtype, entries in [0, k);
#   label columns: a 2-D float array (k, n), one probability vector per column
#     (one-hot, or soft labels), entries >= 0, each column summing to one.
# Binary labels (logistic regression) are a 1-D array (n,) with entries in {0, 1}.


def _describe(arr):
    return f"an array of shape {arr.shape} and dtype {arr.dtype}"


def as_label_columns(labels, name, k=None, tol=1e-9):
    """`labels` as a (k, n) float64 matrix of probability vectors (columns).

    Accepts class indices (n,) of an integer dtype in [0, k) (k is then `k`, or the
    largest index plus one), converted to one-hot columns, or a (k, n) matrix whose
    columns are probability vectors. Anything else is a ValueError saying what was
    expected and what came: a float or boolean 1-D array (class indices must be
    integers), indices out of range, a matrix with a negative entry or a column not
    summing to one (within tol * k), or k rows where `k` were required.
    """
    arr = np.asarray(labels)
    expected = (
        f"{name} must be class indices, a 1-D integer array (n,) with entries in "
        f"[0, {'k' if k is None else k}), or label columns, a (k, n) float array of "
        f"probability vectors (one-hot or soft labels)"
    )
    if arr.dtype == object or arr.ndim not in (1, 2) or arr.size == 0:
        raise ValueError(f"{expected}; got {_describe(arr)}")
    if arr.ndim == 1:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"{expected}; got a 1-D array of dtype {arr.dtype} (class indices must "
                f"have an integer dtype)"
            )
        low, high = int(arr.min()), int(arr.max())
        kk = high + 1 if k is None else int(k)
        if low < 0 or high >= kk:
            bad = low if low < 0 else high
            raise ValueError(
                f"{name} as class indices must lie in [0, {kk}), got {bad}"
            )
        return np.eye(kk)[:, arr]
    if not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{expected}; got {_describe(arr)}")
    Y = as_finite_array(arr, name, 2)
    rows, n = Y.shape
    if k is not None and rows != k:
        raise ValueError(
            f"{name} as label columns must have shape ({k}, n), one row per class, "
            f"got {Y.shape}"
        )
    if np.any(Y < 0):
        a, i = (int(v[0]) for v in np.nonzero(Y < 0))
        raise ValueError(
            f"{name} must hold one probability vector per column (entries >= 0), "
            f"{name} has shape (k, n) = {Y.shape}: got {name}[{a}, {i}] = {Y[a, i]}"
        )
    sums = Y.sum(axis=0)
    bad = np.abs(sums - 1.0) > tol * max(1, rows)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} must hold one probability vector per column (one-hot, or soft "
            f"labels summing to one), {name} has shape (k, n) = {Y.shape}: column {i} "
            f"sums to {sums[i]:.12g}"
        )
    return Y


def as_binary_labels(y, name="y"):
    """Binary labels y (n,) with entries in {0, 1}, as float64: an integer, boolean
    or float array whose every entry is exactly 0 or 1 (ValueError otherwise, e.g.
    for a (2, n) one-hot matrix: give its second row)."""
    arr = np.asarray(y)
    if arr.dtype == object or arr.ndim != 1 or arr.size == 0:
        hint = (
            f" (for one-hot columns (2, n) pass their second row, {name}[1])"
            if arr.ndim == 2
            else ""
        )
        raise ValueError(
            f"{name} must be binary labels, a non-empty 1-D array (n,) with entries "
            f"in {{0, 1}}; got {_describe(arr)}{hint}"
        )
    y = as_float_array(arr, name, 1)
    bad = ~((y == 0) | (y == 1))
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} must hold labels in {{0, 1}}, got {name}[{i}] = {y[i]}"
        )
    return y


# ----- Options of the fitting functions -----
#
# Every fitting function takes data, labels, then keyword-only options with these
# names: l2, epochs, batch_size, learning_rate, seed (an int >= 0 for
# numpy.random.default_rng), tol, max_iter.


def as_positive_int(value, name):
    """A positive Python int (not a bool), else ValueError."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def as_positive_float(value, name):
    """A positive, finite float (ints allowed, bools not), else ValueError."""
    if (
        not isinstance(value, (int, float, np.integer, np.floating))
        or isinstance(value, bool)
        or not np.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive, finite number, got {value!r}")
    return float(value)


def as_seed(seed, name="seed"):
    """A seed for numpy.random.default_rng: an int >= 0 (not a bool)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}")
    return int(seed)
