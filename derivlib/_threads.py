"""One BLAS thread for products too small to share.

OpenBLAS splits a matrix product over its threads once it passes a small size (about
2.6e5 multiply-adds in its GEMM). For products above that but still small, like those
of a training step or a solver iteration, a second thread costs more to start and join
than it saves, and when the other core is busy (another process, or the thread pool of
XLA in the same process) it waits for it. `one_blas_thread()` holds the BLAS to one
thread for a block of code, through threadpoolctl when it is installed (it comes with
scikit-learn, and with derivlib's `fast` extra); without it, it changes nothing.

The BLAS libraries are found once, at the first call; entering and leaving the context
then reads and sets each one's thread count directly (about 3 to 4 us for NumPy's and
SciPy's OpenBLAS together, against 10 to 12 us for threadpoolctl's own `limit`).
"""

import contextlib

# [] before the first call; then [the BLAS libraries' threadpoolctl controllers], or
# [None] without threadpoolctl
_CONTROLLER = []


class _OneThread:
    """Each BLAS library on one thread inside, its own count restored on leaving."""

    __slots__ = ("_libraries", "_saved")

    def __init__(self, libraries):
        self._libraries = libraries

    def __enter__(self):
        self._saved = [lib.get_num_threads() for lib in self._libraries]
        for lib in self._libraries:
            lib.set_num_threads(1)
        return self

    def __exit__(self, *exc_info):
        for lib, threads in zip(self._libraries, self._saved):
            lib.set_num_threads(threads)
        return False


def one_blas_thread():
    """A context in which the BLAS runs on one thread (threadpoolctl), or, without
    threadpoolctl, a context that does nothing."""
    if not _CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _CONTROLLER.append(None)
        else:
            controllers = ThreadpoolController().lib_controllers
            _CONTROLLER.append([c for c in controllers if c.user_api == "blas"])
    if _CONTROLLER[0] is None:
        return contextlib.nullcontext()
    return _OneThread(_CONTROLLER[0])
