"""One BLAS thread for products too small to share.

OpenBLAS splits a matrix product over its threads once it passes a small size (about
2.6e5 multiply-adds in its GEMM). For products above that but still small, like those
of a training step or a solver iteration, a second thread costs more to start and join
than it saves, and on a busy machine it waits for a core. `one_blas_thread()` holds the
BLAS to one thread for a block of code, through threadpoolctl when it is installed (it
comes with scikit-learn, and with derivlib's `fast` extra); without it, it changes
nothing. Entering and leaving the context costs about ten microseconds.
"""

import contextlib

_CONTROLLER = []


def one_blas_thread():
    """A context in which the BLAS runs on one thread (threadpoolctl), or, without
    threadpoolctl, a context that does nothing."""
    if not _CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _CONTROLLER.append(None)
        else:
            _CONTROLLER.append(ThreadpoolController())
    if _CONTROLLER[0] is None:
        return contextlib.nullcontext()
    return _CONTROLLER[0].limit(limits=1, user_api="blas")
