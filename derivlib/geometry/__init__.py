"""Chapter 6: camera geometry. Projection, rotations, and least squares over poses.

Conventions, fixed once for the chapter:

- Points are columns: a set of n points is an array of shape (3, n).
- A rotation is a 3-vector w (axis times angle); R(w) = exp([w]x) (eq. 6.5).
- A camera pose is the 6-vector xi = (w, t), rotation first, then translation. It
  maps a world point X to the camera frame by p = R(w) X + t.
- Perturbations are on the right: R(w + dw) = R(w) exp([J_r(w) dw]x) to first order
  (eq. 6.9), so d(R p) = -R [p]x J_r(w) dw (eq. 6.11): the derivative an additive
  update of w needs, J_r included (solve_least_squares by default; ba_jacobian and
  ba_jacobian_blocks, eq. 6.18).
- On the manifold the update is R Exp(delta), delta in the body frame, and the
  derivative of R Exp(delta) p at delta = 0 is -R [p]x, exactly, at every R (eq. 6.30);
  the adjoint Ad_R = R turns it into the left (world) increment, R Exp(delta) =
  Exp(R delta) R (eq. 6.32). solve_pnp, solve_pnp_robust and bundle_adjust update
  this way (pose_retract, eq. 6.36; bundle_adjust's rotation blocks are those of eq.
  6.18 without J_r), and so does sparse_bundle_adjust (eq. 6.46). An se(3) tangent
  is (phi, rho), rotation first.
- Residuals are in pixels; the cost is E = ||r||^2, the sum of squared reprojection
  errors (eq. 6.14). scipy.optimize.least_squares reports E / 2.
"""

from .camera import (  # noqa: F401
    BehindCameraError,
    _finite_image,
    _in_front,
    _intrinsics,
    _points,
    _project_jacobian,
    in_front,
    project,
    project_jacobian,
)
from .lie import (  # noqa: F401
    SMALL_ANGLE,
    _hat,
    _hat_many,
    _rotation_vector,
    hat,
    left_jacobian,
    right_jacobian,
    rodrigues,
    rotate_jacobian,
    rotation_coefficients,
)
from .solvers import (  # noqa: F401
    LeastSquaresHistory,
    MAX_DAMPING,
    _finished,
    _lm_steps,
    _lm_update,
    _observations,
    _pose,
    _stationary,
    _stuck,
    reprojection_jacobian,
    reprojection_residual,
    solve_least_squares,
    solve_pnp,
    transform,
)
from .bundle import (  # noqa: F401
    BundleProblem,
    _camera_frame,
    _predicted_decrease,
    _project,
    _rotation_and_jacobian,
    _sum_by,
    ba_jacobian,
    ba_jacobian_blocks,
    ba_normal_equations,
    ba_residual,
    ba_sparsity_pattern,
    bundle_adjust,
    gauge_directions,
    gauge_is_fixed,
    schur_solve,
)

# Chapter 6, part B: updates on the manifold, robust costs, linear starts.
from .lie import (  # noqa: F401
    NEAR_PI,
    left_jacobian_inverse,
    right_jacobian_inverse,
    rotate_jacobian_right,
    se3_adjoint,
    se3_exp,
    se3_left_jacobian,
    se3_left_jacobian_inverse,
    se3_log,
    se3_right_jacobian,
    se3_right_jacobian_inverse,
    so3_adjoint,
    so3_exp,
    so3_log,
)
from .solvers import (  # noqa: F401
    DEGENERATE,
    pose_retract,
    reprojection_jacobian_right,
)
from .robust import (  # noqa: F401
    LOSSES,
    BundlerChart,
    corrupt_observations,
    first_points,
    robust_rescaling,
    robust_cost,
    robust_loss,
    robust_weights,
    solve_pnp_robust,
    solve_robust_least_squares,
)
from .linear import (  # noqa: F401
    dlt_pose,
    triangulate,
)
from .scenes import (  # noqa: F401
    Scene,
    make_scene,
)

# ----- Chapter 6, part A: real reconstructions, Bundler's camera, sparse BA -----
from .io import (  # noqa: F401
    Reconstruction,
    gtsam_data_dir,
    read_bal,
    read_bundler,
)
from .bundler import (  # noqa: F401
    bundler_jacobians,
    bundler_project,
)
from .bundle import (  # noqa: F401
    SparseBundleHistory,
    SparseBundleState,
    bundler_residual,
    default_gauge,
    reduced_camera_system,
    sparse_bundle_adjust,
)
from .scenes import make_bundler_scene, perturb_reconstruction  # noqa: F401
