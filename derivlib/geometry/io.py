"""Chapter 6, readers for real reconstructions: Bundler's `.out` files and the BAL
("Bundle Adjustment in the Large") problem files.

Both store the same camera model (derivlib/geometry/bundler.py, eqs. 6.40-6.41):
per camera a rotation, a translation, a focal length f and two radial distortion
coefficients k1, k2; image points are measured from the image centre, x to the
right and y up."""

import os
from dataclasses import dataclass

import numpy as np

from .lie import rodrigues


@dataclass
class Reconstruction:
    """m cameras, n points and N observations, in Bundler's camera model.

    R (m, 3, 3) and t (m, 3) map a world point X to the camera frame, P = R X + t;
    intrinsics (m, 3) holds (f, k1, k2) per camera; X (3, n) the points; cam (N,) and
    point (N,) index the camera and the point of each observation, and u (2, N) its
    image point (origin at the image centre, x right, y up). colors (3, n) (0-255) is
    None for BAL files, which store none."""

    R: np.ndarray
    t: np.ndarray
    intrinsics: np.ndarray
    X: np.ndarray
    cam: np.ndarray
    point: np.ndarray
    u: np.ndarray
    colors: np.ndarray = None

    @property
    def m(self):
        return self.R.shape[0]

    @property
    def n(self):
        return self.X.shape[1]


def gtsam_data_dir():
    """The folder of data files that the `gtsam` Python package installs."""
    import gtsam

    return os.path.join(os.path.dirname(gtsam.__file__), "Data")


def _numbers(tokens, count, what, path):
    if len(tokens) < count:
        raise ValueError(
            f"{path}: expected {count} numbers for {what}, the file ends after "
            f"{len(tokens)}"
        )
    try:
        values = np.array(tokens[:count], dtype=float)
    except ValueError as err:
        raise ValueError(f"{path}: {what} must be numbers ({err})") from None
    if not np.all(np.isfinite(values)):
        bad = values[~np.isfinite(values)][0]
        raise ValueError(f"{path}: {what} must be finite numbers, got {bad}")
    return values


def _count(token, what, path):
    try:
        value = int(token)
    except ValueError:
        raise ValueError(
            f"{path}: {what} must be a non-negative integer, got {token!r}"
        ) from None
    if value < 0:
        raise ValueError(f"{path}: {what} must be a non-negative integer, got {value}")
    return value


def _check_indices(cam, point, m, n, path):
    if cam.size and (cam.min() < 0 or cam.max() >= m):
        raise ValueError(
            f"{path}: camera indices must lie in 0..{m - 1}, got values in "
            f"[{cam.min()}, {cam.max()}]"
        )
    if point.size and (point.min() < 0 or point.max() >= n):
        raise ValueError(
            f"{path}: point indices must lie in 0..{n - 1}, got values in "
            f"[{point.min()}, {point.max()}]"
        )


def read_bundler(path):
    """Read a Bundler v0.3 `.out` file into a Reconstruction.

    Layout: a comment line "# Bundle file v0.3", then "m n"; per camera the line
    "f k1 k2", three lines of R and one of t; per point its position, its colour and
    its view list "N c_1 key_1 x_1 y_1 ... c_N key_N x_N y_N". Raises ValueError
    naming what was expected when the file does not follow it."""
    path = os.fspath(path)
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].startswith("# Bundle file v0.3"):
        raise ValueError(
            f"{path}: expected a Bundler file starting with '# Bundle file v0.3', "
            f"got {lines[0][:40] if lines else 'an empty file'!r}"
        )
    tokens = " ".join(lines[1:]).split()
    if len(tokens) < 2:
        raise ValueError(f"{path}: expected the counts 'cameras points' after line 1")
    m = _count(tokens[0], "the number of cameras", path)
    n = _count(tokens[1], "the number of points", path)
    pos = 2
    cams = _numbers(tokens[pos:], 15 * m, f"{m} cameras (15 numbers each)", path)
    pos += 15 * m
    cams = cams.reshape(m, 15)
    intrinsics = cams[:, :3].copy()
    R = cams[:, 3:12].reshape(m, 3, 3).copy()
    t = cams[:, 12:].copy()
    X = np.empty((3, n))
    colors = np.empty((3, n))
    cam, point, u = [], [], []
    for i in range(n):
        head = _numbers(tokens[pos:], 6, f"the position and colour of point {i}", path)
        X[:, i], colors[:, i] = head[:3], head[3:]
        pos += 6
        if pos >= len(tokens):
            raise ValueError(f"{path}: the view list of point {i} is missing")
        k = _count(tokens[pos], f"the number of views of point {i}", path)
        pos += 1
        views = _numbers(tokens[pos:], 4 * k, f"the {k} views of point {i}", path)
        pos += 4 * k
        views = views.reshape(k, 4)
        cam.append(views[:, 0])
        point.append(np.full(k, i))
        u.append(views[:, 2:].T)
    if pos != len(tokens):
        raise ValueError(
            f"{path}: {len(tokens) - pos} numbers left after {m} cameras and {n} "
            f"points; the counts in the header do not match the file"
        )
    cam = np.concatenate(cam) if cam else np.zeros(0)
    if np.any(cam != np.round(cam)):
        raise ValueError(f"{path}: camera indices must be integers")
    cam = cam.astype(np.intp)
    point = np.concatenate(point).astype(np.intp) if point else np.zeros(0, np.intp)
    _check_indices(cam, point, m, n, path)
    u = np.concatenate(u, axis=1) if u else np.zeros((2, 0))
    return Reconstruction(R, t, intrinsics, X, cam, point, u, colors)


def read_bal(path):
    """Read a BAL problem file into a Reconstruction.

    Layout: "m n N"; N lines "camera point x y"; then 9 numbers per camera (the
    rotation vector w, t, f, k1, k2) and 3 per point, one number a line. The rotation
    is R = exp([w]x) (eq. 6.5). Raises ValueError naming what was expected when the
    file does not follow it."""
    path = os.fspath(path)
    with open(path) as f:
        tokens = f.read().split()
    if len(tokens) < 3:
        raise ValueError(
            f"{path}: expected a BAL header 'cameras points observations', got "
            f"{' '.join(tokens)!r}"
        )
    m = _count(tokens[0], "the number of cameras", path)
    n = _count(tokens[1], "the number of points", path)
    N = _count(tokens[2], "the number of observations", path)
    expected = 3 + 4 * N + 9 * m + 3 * n
    if len(tokens) != expected:
        raise ValueError(
            f"{path}: a BAL file with {m} cameras, {n} points and {N} observations "
            f"holds {expected} numbers, this one holds {len(tokens)}"
        )
    obs = _numbers(tokens[3:], 4 * N, f"{N} observations", path).reshape(N, 4)
    if np.any(obs[:, :2] != np.round(obs[:, :2])):
        raise ValueError(f"{path}: camera and point indices must be integers")
    cam, point = obs[:, 0].astype(np.intp), obs[:, 1].astype(np.intp)
    _check_indices(cam, point, m, n, path)
    pos = 3 + 4 * N
    cams = _numbers(tokens[pos:], 9 * m, f"{m} cameras", path).reshape(m, 9)
    X = _numbers(tokens[pos + 9 * m :], 3 * n, f"{n} points", path).reshape(n, 3).T
    R = np.stack([rodrigues(w) for w in cams[:, :3]]) if m else np.zeros((0, 3, 3))
    return Reconstruction(
        R, cams[:, 3:6].copy(), cams[:, 6:].copy(), X.copy(), cam, point, obs[:, 2:].T
    )


# ----- The same problem in the peers' conventions (GTSAM, COLMAP/Ceres) -----

# GTSAM's and COLMAP's cameras look down +z with the image y axis pointing down:
# their camera frame is Bundler's turned half a turn about x, P' = F P with
# F = diag(1, -1, -1), so their normalised point is (p_x, -p_y) and an observation
# (x, y) of Bundler's is (x, -y) in theirs.
_FLIP = np.diag([1.0, -1.0, -1.0])


def to_gtsam(recon, R=None, t=None, intrinsics=None, X=None):
    """The bundle-adjustment problem as a GTSAM factor graph: one
    GeneralSFMFactorCal3Bundler (unit noise) per observation, a
    PinholeCameraCal3Bundler per camera (key C(j)) and a point per point (key P(i)).
    The cameras and points default to recon's. Returns (graph, values); 2 *
    graph.error(values) is E = ||r||^2 of eq. 6.46."""
    import gtsam

    R = recon.R if R is None else R
    t = recon.t if t is None else t
    intrinsics = recon.intrinsics if intrinsics is None else intrinsics
    X = recon.X if X is None else X
    C, L = gtsam.symbol_shorthand.C, gtsam.symbol_shorthand.P
    graph, values = gtsam.NonlinearFactorGraph(), gtsam.Values()
    for j in range(recon.m):
        Rg, tg = _FLIP @ R[j], _FLIP @ t[j]
        pose = gtsam.Pose3(gtsam.Rot3(Rg.T), -Rg.T @ tg)  # world-from-camera
        f, k1, k2 = intrinsics[j]
        cal = gtsam.Cal3Bundler(f, k1, k2, 0.0, 0.0)
        values.insert(C(j), gtsam.PinholeCameraCal3Bundler(pose, cal))
    for i in range(recon.n):
        values.insert(L(i), np.array(X[:, i], dtype=float))
    noise = gtsam.noiseModel.Unit.Create(2)
    for k in range(recon.cam.size):
        z = np.array([recon.u[0, k], -recon.u[1, k]])
        graph.add(
            gtsam.GeneralSFMFactorCal3Bundler(
                z, noise, C(int(recon.cam[k])), L(int(recon.point[k]))
            )
        )
    return graph, values


def to_colmap(recon, R=None, t=None, intrinsics=None, X=None):
    """The problem as a pycolmap Reconstruction: one RADIAL camera (f, cx, cy, k1,
    k2) per image with the principal point at 0 (Bundler measures from the image
    centre), one image per camera, one 3-D point per point with its track. Refine
    it with pycolmap's bundle adjustment (Ceres) with refine_principal_point=False;
    Ceres's cost is E / 2."""
    import pycolmap

    R = recon.R if R is None else R
    t = recon.t if t is None else t
    intrinsics = recon.intrinsics if intrinsics is None else intrinsics
    X = recon.X if X is None else X
    rec = pycolmap.Reconstruction()
    index = np.zeros(recon.cam.size, dtype=np.intp)  # the observation's 2-D index
    for j in range(recon.m):
        f, k1, k2 = intrinsics[j]
        camera = pycolmap.Camera(
            model="RADIAL",
            width=4000,
            height=4000,
            params=[f, 0.0, 0.0, k1, k2],
            camera_id=j + 1,
        )
        rec.add_camera_with_trivial_rig(camera)
        mine = np.flatnonzero(recon.cam == j)
        index[mine] = np.arange(mine.size)
        keypoints = np.column_stack([recon.u[0, mine], -recon.u[1, mine]])
        image = pycolmap.Image(
            name=f"{j}", keypoints=keypoints, camera_id=j + 1, image_id=j + 1
        )
        pose = pycolmap.Rigid3d(np.column_stack([_FLIP @ R[j], _FLIP @ t[j]]))
        rec.add_image_with_trivial_frame(image, pose)
    order = np.argsort(recon.point, kind="stable")
    starts = np.searchsorted(recon.point[order], np.arange(recon.n + 1))
    for i in range(recon.n):
        track = pycolmap.Track()
        for k in order[starts[i] : starts[i + 1]]:
            track.add_element(int(recon.cam[k]) + 1, int(index[k]))
        rec.add_point3D(np.array(X[:, i], dtype=float), track)
    return rec
