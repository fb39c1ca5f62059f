"""Input checks shared by every module: clear ValueErrors, never silent NaNs."""

import numpy as np


def as_float_array(x, name, ndims=None):
    """`x` as a float64 array, with `ndims` (an int or a tuple of ints) checked."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real array, got {type(x).__name__}") from exc
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
