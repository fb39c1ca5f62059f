"""Chapter 6, synthetic scenes with a known ground truth.

The conventions are stated once, in derivlib/geometry/__init__.py."""

from dataclasses import dataclass

import numpy as np

from .lie import rodrigues
from .bundle import BundleProblem, _project


@dataclass
class Scene:
    """A synthetic bundle-adjustment scene with its ground truth and a perturbed
    start."""

    problem: BundleProblem
    poses: np.ndarray  # (m, 6) true poses (w, t)
    X: np.ndarray  # (3, n) true points
    x0: np.ndarray  # start: true gauge camera and scale, other parameters perturbed


def make_scene(m=6, n=200, noise=1.0, seed=0, visibility=0.7, perturbation=1.0):
    """m cameras on an arc of radius 5 around n points in the unit ball, looking at it,
    with K = [[500, 0, 320], [0, 500, 240], [0, 0, 1]]. Each camera sees each point with
    probability `visibility` (every point is seen at least twice); image points get
    Gaussian noise of `noise` pixels. The start x0 keeps the gauge parameters (camera 0,
    t_x of camera 1) at their true values and perturbs the rest by `perturbation` times
    0.02 rad (rotations), 0.1 (translations) and 0.05 (points)."""
    if m < 2 or n < 1:
        raise ValueError(
            f"a scene needs m >= 2 cameras and n >= 1 points, got m = {m}, n = {n}"
        )
    for name, value in (("noise", noise), ("perturbation", perturbation)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not 0 <= visibility <= 1:
        raise ValueError(f"visibility is a probability in [0, 1], got {visibility!r}")
    rng = np.random.default_rng(seed)
    K = np.array([[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]])
    X = rng.standard_normal((3, n))
    X *= rng.random(n) ** (1 / 3) / np.linalg.norm(X, axis=0)
    phi = np.linspace(-0.6, 0.6, m)
    poses = np.zeros((m, 6))
    for j in range(m):
        w = np.array([0.0, phi[j], 0.0]) + 0.05 * rng.standard_normal(3)
        centre = 5.0 * np.array(
            [np.sin(phi[j]), 0.0, -np.cos(phi[j])]
        ) + 0.2 * rng.standard_normal(3)
        poses[j] = np.concatenate([w, -rodrigues(w) @ centre])
    seen = rng.random((m, n)) < visibility
    for i in np.flatnonzero(seen.sum(axis=0) < 2):
        seen[rng.choice(m, 2, replace=False), i] = True
    cam, point = np.nonzero(seen)
    p = np.stack(
        [rodrigues(poses[j, :3]) @ X[:, i] + poses[j, 3:] for j, i in zip(cam, point)],
        axis=1,
    )
    u = _project(p, K) + noise * rng.standard_normal((2, cam.size))
    problem = BundleProblem.create(K, cam, point, u, m, n)
    start = poses + perturbation * np.concatenate(
        [0.02 * rng.standard_normal((m, 3)), 0.1 * rng.standard_normal((m, 3))], axis=1
    )
    start[~problem.free.reshape(m, 6)] = poses[~problem.free.reshape(m, 6)]
    X0 = X + perturbation * 0.05 * rng.standard_normal(X.shape)
    return Scene(problem, poses, X, problem.pack(start, X0))


def make_bundler_scene(m=50, n=20000, views=5, noise=1.0, perturbation=1.0, seed=0):
    """A synthetic problem in Bundler's camera model (eqs. 6.40-6.41), the size of a
    BAL problem with the defaults: m cameras on a ring of radius 10 around n points
    in the unit ball, each looking at the centre down its -z axis, with f about
    800, k1 about -0.1 and k2 about 0.02; each point is seen by `views` distinct
    cameras drawn at random (N = views * n observations), with Gaussian image noise
    of `noise` pixels. Returns (reconstruction, truth, start): the Reconstruction
    holds the noisy observations and the true cameras and points; the start
    perturbs rotations by 0.01 rad, translations by 0.05, points by 0.02 and f by
    1 %, each times `perturbation`, and keeps k1, k2 and the gauge (camera 0, t of
    camera 1) at their true values."""
    from .bundle import SparseBundleState, _so3_exp_many, default_gauge
    from .bundler import _blocks
    from .io import Reconstruction

    if m < 2 or n < 1 or not 2 <= views <= m:
        raise ValueError(
            f"a scene needs m >= 2 cameras, n >= 1 points and 2 <= views <= m, got "
            f"m = {m}, n = {n}, views = {views}"
        )
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((3, n))
    X *= rng.random(n) ** (1 / 3) / np.linalg.norm(X, axis=0)
    phi = 2 * np.pi * np.arange(m) / m
    R = np.empty((m, 3, 3))
    t = np.empty((m, 3))
    for j in range(m):
        # the camera's +z points away from the centre, so it looks at it down -z
        c = 10.0 * np.array(
            [np.sin(phi[j]), 0.3 * rng.standard_normal(), np.cos(phi[j])]
        )
        z = c / np.linalg.norm(c)
        x = np.cross([0.0, 1.0, 0.0], z)
        x /= np.linalg.norm(x)
        R[j] = np.stack([x, np.cross(z, x), z])
        t[j] = -R[j] @ c
    intrinsics = np.column_stack(
        [
            800 * (1 + 0.05 * rng.standard_normal(m)),
            -0.1 + 0.02 * rng.standard_normal(m),
            0.02 + 0.005 * rng.standard_normal(m),
        ]
    )
    cam = np.argsort(rng.random((n, m)), axis=1)[:, :views].ravel()
    point = np.repeat(np.arange(n), views)
    u, *_ = _blocks(R[cam], t[cam], intrinsics[cam], X[:, point])
    u = u + noise * rng.standard_normal(u.shape)
    recon = Reconstruction(R, t, intrinsics, X, cam, point, u)
    truth = SparseBundleState(R.copy(), t.copy(), intrinsics.copy(), X.copy())
    keep = ~default_gauge(truth)
    d = (
        perturbation
        * rng.standard_normal((m, 9))
        * np.repeat([0.01, 0.05, 0.0], [3, 3, 3])
    )
    d[:, 6] = perturbation * 0.01 * rng.standard_normal(m) * intrinsics[:, 0]
    d[keep] = 0.0
    start = SparseBundleState(
        R @ _so3_exp_many(d[:, :3]),
        t + d[:, 3:6],
        intrinsics + d[:, 6:],
        X + perturbation * 0.02 * rng.standard_normal(X.shape),
    )
    return recon, truth, start


def perturb_reconstruction(recon, rotation=0.005, translation=0.02, focal=0.02,
                           points=0.02, seed=0):  # fmt: skip
    """A start for bundle adjustment: recon's cameras and points with Gaussian noise
    of `rotation` rad (R Exp(delta)), `translation` (each coordinate of t), `focal`
    relative on f and `points` (each coordinate of X); k1, k2 and the parameters
    that default_gauge holds are left as they are. Returns a SparseBundleState."""
    from .bundle import SparseBundleState, _so3_exp_many, default_gauge

    rng = np.random.default_rng(seed)
    m = recon.m
    state = SparseBundleState(recon.R, recon.t, recon.intrinsics, recon.X)
    held = ~default_gauge(state)
    d = rng.standard_normal((m, 9)) * np.repeat([rotation, translation, 0.0], 3)
    d[:, 6] = focal * rng.standard_normal(m) * recon.intrinsics[:, 0]
    d[held] = 0.0
    return SparseBundleState(
        recon.R @ _so3_exp_many(d[:, :3]),
        recon.t + d[:, 3:6],
        recon.intrinsics + d[:, 6:],
        recon.X + points * rng.standard_normal(recon.X.shape),
    )
