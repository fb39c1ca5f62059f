"""Appendix B: differentials, and the identification theorem as code."""

import numpy as np

from .matrix import unvec, vec


def identify(differential, X):
    """The first identification theorem (Magnus and Neudecker, 1988), as a function.

    `differential` maps an increment dX (same shape as the point X) to dF and must be
    linear in dX (eq. B.5: dF = A(X) dX). Returns the Jacobian J, of shape
    (dF.size, X.size), with vec(dF) = J @ vec(dX): the vec layout of the book.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.size == 0:
        raise ValueError(f"identify needs a non-empty point X, got shape {X.shape}")
    columns = []
    out_shape = None
    for j in range(X.size):
        e = np.zeros(X.size)
        e[j] = 1.0
        dF = np.asarray(differential(unvec(e, X.shape)), dtype=np.float64)
        if out_shape is None:
            out_shape = dF.shape
        elif dF.shape != out_shape:
            raise ValueError(
                f"the differential returned shape {dF.shape} for one increment and "
                f"{out_shape} for another"
            )
        columns.append(vec(dF))
    J = np.stack(columns, axis=1)
    _require_linear(differential, X, J)
    return J


def _require_linear(differential, X, J):
    """Raise unless the differential agrees with J on a random increment (linearity)."""
    rng = np.random.default_rng(0)
    dX = rng.standard_normal(X.shape)
    got = vec(np.asarray(differential(dX), dtype=np.float64))
    want = J @ vec(dX)
    scale = max(np.linalg.norm(want), np.linalg.norm(got), 1e-300)
    if np.linalg.norm(got - want) > 1e-8 * scale:
        raise ValueError(
            "the differential is not linear in its increment: on a random dX it gives "
            f"{np.linalg.norm(got):.6g} in norm where the linear map it defines on the "
            f"unit increments gives {np.linalg.norm(want):.6g}"
        )
