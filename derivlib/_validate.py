"""Input checks shared by every module: clear ValueErrors, never silent NaNs."""

import numpy as np


def as_float_array(x, name, ndims=None):
    """`x` as a float64 array, with `ndims` (an int or a tuple of ints) checked."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name} must be a real array, got {type(x).__name__}"
        ) from exc
    if ndims is not None:
        allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
        if arr.ndim not in allowed:
            wanted = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {wanted}, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    return arr


def require_finite(arr, name):
    """Raise if `arr` holds NaN or infinity."""
    if not np.all(np.isfinite(arr)):
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


def as_cotangent(G, shape, finite=True):
    """The cotangent G of an output of shape `shape` (see `as_array_of_shape`)."""
    return as_array_of_shape(
        G, "G", shape, "the cotangent G must have the output's shape", finite
    )
