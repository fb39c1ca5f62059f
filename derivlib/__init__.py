"""derivlib: the results of "Differentials for Applied Computer Vision" (S. Albanie)
as a small NumPy library. Each function names the equation of the note it implements.

The verification machinery, which needs JAX, lives in ``derivlib.check`` and is not
imported here: the library itself needs only NumPy.
"""

from .differentials import identify, identify_hessian, loglog_slope, remainder
from .matrix import (
    blocks,
    commutation_apply,
    commutation_matrix,
    commutation_permutation,
    diag,
    diag_inv,
    hadamard,
    khatri_rao,
    kron,
    trace,
    tracy_singh,
    unvec,
    vec,
)
from .vector import (
    elementwise_jacobian,
    sigmoid,
    sigmoid_derivative,
    sigmoid_jacobian,
    softmax,
    softmax_jacobian,
    softmax_jacobian_blocks,
)

__all__ = [
    "blocks",
    "commutation_apply",
    "commutation_matrix",
    "commutation_permutation",
    "diag",
    "diag_inv",
    "elementwise_jacobian",
    "hadamard",
    "identify",
    "identify_hessian",
    "khatri_rao",
    "kron",
    "loglog_slope",
    "remainder",
    "sigmoid",
    "sigmoid_derivative",
    "sigmoid_jacobian",
    "softmax",
    "softmax_jacobian",
    "softmax_jacobian_blocks",
    "trace",
    "tracy_singh",
    "unvec",
    "vec",
]
