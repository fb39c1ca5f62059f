"""derivlib: the results of "Differentials for Applied Computer Vision" (S. Albanie)
as a small NumPy library. Each function names the equation of the note it implements.

The verification machinery, which needs JAX, lives in ``derivlib.check`` and is not
imported here: the library itself needs only NumPy.
"""

from .differentials import identify
from .matrix import unvec, vec
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
    "elementwise_jacobian",
    "identify",
    "sigmoid",
    "sigmoid_derivative",
    "sigmoid_jacobian",
    "softmax",
    "softmax_jacobian",
    "softmax_jacobian_blocks",
    "unvec",
    "vec",
]
