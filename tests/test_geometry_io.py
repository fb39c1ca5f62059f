"""Chapter 6, part A: the Bundler and BAL readers, on the files that GTSAM ships."""

import os

import numpy as np
import pytest

from derivlib.geometry import io

DATA = io.gtsam_data_dir()
BALBIANELLO = os.path.join(DATA, "Balbianello.out")
DUBROVNIK = os.path.join(DATA, "dubrovnik-3-7-pre.txt")


@pytest.fixture(scope="module")
def balbianello():
    return io.read_bundler(BALBIANELLO)


def test_bundler_shapes_and_counts(balbianello):
    r = balbianello
    assert (r.m, r.n, r.cam.size) == (5, 544, 1417)
    assert r.R.shape == (5, 3, 3) and r.t.shape == (5, 3)
    assert r.intrinsics.shape == (5, 3) and r.X.shape == (3, 544)
    assert r.u.shape == (2, 1417) and r.colors.shape == (3, 544)
    assert r.cam.dtype == np.intp and r.point.dtype == np.intp
    # every point is seen by at least two cameras, each pair at most once
    assert np.bincount(r.point).min() >= 2
    assert np.unique(r.cam * r.n + r.point).size == r.cam.size
    # the rotations are rotations
    np.testing.assert_allclose(
        r.R @ r.R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.R.shape), atol=1e-7
    )


def test_bundler_hand_checked_entries(balbianello):
    r = balbianello
    # the first camera's block of the file, read by hand
    np.testing.assert_array_equal(
        r.intrinsics[0], [5.1869203975e02, -1.1457014134e-01, -3.4479818947e-02]
    )
    np.testing.assert_array_equal(
        r.R[0, 0], [9.9972739831e-01, 5.9754666132e-03, 2.2570397996e-02]
    )
    np.testing.assert_array_equal(
        r.t[0], [7.1074927420e-02, 4.4169219329e-02, 5.6191022645e-01]
    )


def test_bundler_round_trip(tmp_path, balbianello):
    """A file written from the parsed numbers reads back to the same numbers."""
    r = balbianello
    lines = ["# Bundle file v0.3", f"{r.m} {r.n}"]
    for j in range(r.m):
        lines.append(" ".join(f"{v:.17g}" for v in r.intrinsics[j]))
        lines += [" ".join(f"{v:.17g}" for v in row) for row in r.R[j]]
        lines.append(" ".join(f"{v:.17g}" for v in r.t[j]))
    for i in range(r.n):
        lines.append(" ".join(f"{v:.17g}" for v in r.X[:, i]))
        lines.append(" ".join(f"{int(v)}" for v in r.colors[:, i]))
        ks = np.flatnonzero(r.point == i)
        views = [f"{r.cam[k]} 0 {r.u[0, k]:.17g} {r.u[1, k]:.17g}" for k in ks]
        lines.append(f"{ks.size} " + " ".join(views))
    path = tmp_path / "copy.out"
    path.write_text("\n".join(lines) + "\n")
    s = io.read_bundler(path)
    for name in ["R", "t", "intrinsics", "X", "cam", "point", "u"]:
        np.testing.assert_array_equal(getattr(s, name), getattr(r, name))


def test_stored_reconstruction_reprojects_to_a_fraction_of_a_pixel(balbianello):
    """Bundler's model (camera down -z, radial factor on p) fits the stored numbers;
    the opposite sign of p misses by hundreds of pixels."""
    from derivlib.geometry import bundler_project

    r = balbianello
    err = np.concatenate(
        [
            np.linalg.norm(
                bundler_project(r.R[j], r.t[j], r.intrinsics[j], r.X[:, r.point[ks]])
                - r.u[:, ks],
                axis=0,
            )
            for j in range(r.m)
            for ks in [np.flatnonzero(r.cam == j)]
        ]
    )
    assert np.sqrt(np.mean(err**2)) < 1.0 and err.max() < 10.0


def test_bal_reader():
    b = io.read_bal(DUBROVNIK)
    assert (b.m, b.n, b.cam.size) == (3, 7, 19)
    assert b.colors is None
    # the first observation line: "0 0     -3.859900e+02 3.871200e+02"
    assert (b.cam[0], b.point[0]) == (0, 0)
    np.testing.assert_array_equal(b.u[:, 0], [-385.99, 387.12])
    np.testing.assert_allclose(
        b.R @ b.R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), b.R.shape), atol=1e-12
    )
    assert np.all(b.intrinsics[:, 0] > 1000)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "Bundle file v0.3"),
        ("# Bundle file v0.3\n2\n", "counts"),
        ("# Bundle file v0.3\n1 0\n500 0 0\n1 0 0\n0 1 0\n", "1 cameras"),
        ("# Bundle file v0.3\n-1 0\n", "non-negative"),
        ("# Bundle file v0.3\n0 1\n0 0 0 255 255 255\n1 0 0 1.0 2.0\n", "camera"),
        ("# Bundle file v0.3\n0 0\n7\n", "left"),
        ("# Bundle file v0.3\n1 0\n500 0 0\n1 0 0\n0 1 0\n0 0 1\n0 0 x\n", "numbers"),
        (
            "# Bundle file v0.3\n0 1\n0 0 nan 255 255 255\n0\n",
            "finite numbers, got nan",
        ),
    ],
)
def test_bundler_refuses_malformed_files(tmp_path, text, message):
    path = tmp_path / "bad.out"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        io.read_bundler(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 1", "header"),
        ("1 1 1 0 0 1.0 2.0", "holds"),
        ("1 1 1 0 5 1 2 " + "0 " * 9 + "0 0 0", "point indices"),
        ("1 1 1 0.5 0 1 2 " + "0 " * 9 + "0 0 0", "integers"),
        ("1 1 1 0 0 inf 2 " + "0 " * 9 + "0 0 0", "finite numbers, got inf"),
    ],
)
def test_bal_refuses_malformed_files(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        io.read_bal(path)
