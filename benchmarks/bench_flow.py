"""Chapter 9, dense motion, in one run at the libraries' default threads and at one
thread: windowed Lucas-Kanade at every pixel on scikit-image's `stereo_motorcycle`
pair (500 x 741, Middlebury 2014 at a quarter of the resolution, shipped with
scikit-image: nothing downloads) against its ground-truth disparity.

The flow is from the left image I0 to the right image I1, I1(x + u, y + v) ~ I0(x, y).
The ground truth is indexed by the left image's pixels, and the matching pixel of the
right image sits at x - d, checked here on the data (see `sign_check`); scikit-image's
docstring says the same from the right image (img_left[10, 10 + disp[10, 10]] matches
img_right[10, 10]). So the estimated disparity is -u.
Errors are |-u - d| over the pixels with finite ground truth; the vertical flow is not
scored (it is zero in truth: the pair is rectified).

derivlib's `lucas_kanade_flow` (Gaussian window of radius 7; and a box window of radius
7, scikit-image's default window) against `skimage.registration.optical_flow_ilk` at its
default settings (box window of radius 7, 10 warps per level) and with its Gaussian
window, and `optical_flow_tvl1` at its default settings, all on the same gray images
(float64 in [0, 1]; scikit-image's two compute in float32, their default `dtype`, and
derivlib in float64). Times are the best of 3, interleaved. derivlib's default `rtol`
(1e-5, the eigenvalue below which a direction is left out, relative to the largest
trace of the structure tensor) was chosen on this pair; the rows at 1e-4 and 1e-6 show
how much the result depends on it.

Run: .venv/bin/python benchmarks/bench_flow.py
"""

import os
import subprocess
import sys
import time

ONE_THREAD = "--one-thread" in sys.argv
if ONE_THREAD:
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import skimage  # noqa: E402
import skimage.data  # noqa: E402
from skimage.color import rgb2gray  # noqa: E402
from skimage.registration import optical_flow_ilk, optical_flow_tvl1  # noqa: E402

import derivlib as dl  # noqa: E402

REPEATS = 3


def data():
    left, right, disparity = skimage.data.stereo_motorcycle()
    return rgb2gray(left), rgb2gray(right), np.asarray(disparity, dtype=np.float64)


def sign_check(I0, I1, d, samples=400, seed=0):
    """Median absolute difference of 7 x 7 patches of the left image at (x, y) and of
    the right image at (x - d, y), and at (x + d, y): the smaller names the sign."""
    rng = np.random.default_rng(seed)
    H, W = I0.shape
    rows, cols = np.nonzero(np.isfinite(d))
    out = {-1: [], 1: []}
    for k in rng.choice(len(rows), samples, replace=False):
        r, c = rows[k], cols[k]
        for s in out:
            cc = int(round(c + s * d[r, c]))
            if 3 <= r < H - 3 and 3 <= c < W - 3 and 3 <= cc < W - 3:
                a = I0[r - 3 : r + 4, c - 3 : c + 4]
                out[s].append(np.abs(a - I1[r - 3 : r + 4, cc - 3 : cc + 4]).mean())
    return {s: float(np.median(v)) for s, v in out.items()}


def ours(window, rtol=1e-5):
    def run(I0, I1):
        R = dl.lucas_kanade_flow(I0, I1, radius=7, window=window, rtol=rtol)
        return R.flow[0], R.reported.mean()

    return run


METHODS = {
    "derivlib lucas_kanade_flow, Gaussian window, radius 7": ours("gaussian"),
    "derivlib lucas_kanade_flow, box window, radius 7": ours("box"),
    "derivlib, Gaussian window, rtol 1e-4 (default 1e-5)": ours("gaussian", 1e-4),
    "derivlib, Gaussian window, rtol 1e-6 (default 1e-5)": ours("gaussian", 1e-6),
    "skimage optical_flow_ilk (defaults: box window, radius 7)": lambda I0, I1: (
        optical_flow_ilk(I0, I1)[1],
        None,
    ),
    "skimage optical_flow_ilk, gaussian=True": lambda I0, I1: (
        optical_flow_ilk(I0, I1, gaussian=True)[1],
        None,
    ),
    "skimage optical_flow_tvl1 (defaults)": lambda I0, I1: (
        optical_flow_tvl1(I0, I1)[1],
        None,
    ),
}


def rows():
    I0, I1, d = data()
    valid = np.isfinite(d)
    best = {k: np.inf for k in METHODS}
    out = {}
    for _ in range(REPEATS):
        for name, run in METHODS.items():  # interleaved
            start = time.perf_counter()
            u, reported = run(I0, I1)
            best[name] = min(best[name], time.perf_counter() - start)
            out[name] = (u, reported)
    table = []
    for name, (u, reported) in out.items():
        err = np.abs(-np.asarray(u, dtype=np.float64) - d)[valid]
        table.append(
            (name, np.median(err), np.mean(err > 3), np.mean(err), reported, best[name])
        )
    return I0.shape, int(valid.sum()), sign_check(I0, I1, d), table


def report():
    threads = "one thread" if ONE_THREAD else "default threads"
    shape, n_valid, signs, table = rows()
    print(
        f"\n## Dense motion, stereo_motorcycle {shape[0]} x {shape[1]}, scikit-image "
        f"{skimage.__version__} ({threads})\n"
    )
    print(
        f"{n_valid} pixels with ground truth. Patch difference, left (x, y) against "
        f"right (x - d, y): {signs[-1]:.4f}; against right (x + d, y): {signs[1]:.4f} "
        "(so disparity = -u)\n"
    )
    print(
        "| method | median error (px) | more than 3 px off | mean error (px) | "
        "pixels reported | time (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, median, off, mean, reported, t in table:
        rep = "-" if reported is None else f"{100 * reported:.1f}%"
        print(
            f"| {name} | {median:.3f} | {100 * off:.1f}% | {mean:.2f} | {rep} | "
            f"{t:.2f} |"
        )


if __name__ == "__main__":
    report()
    if not ONE_THREAD:
        sys.stdout.flush()
        subprocess.run([sys.executable, __file__, "--one-thread"], check=True)
