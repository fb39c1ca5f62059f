"""Timing helpers shared by the benchmark scripts (imported, never run on its own)."""

import time

import numpy as np


def best_times(ours, peer, repeats):
    """The fastest of `repeats` runs of each (seconds) and their last results.

    The two are interleaved, ours then peer in every round, so that a burst of other
    work on the machine slows both rather than one of them.
    """
    best, results = [np.inf, np.inf], [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((ours, peer)):
            start = time.perf_counter()
            results[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1], results[0], results[1]


def best_of(fn, repeats):
    """The fastest of `repeats` runs of `fn` (seconds)."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
