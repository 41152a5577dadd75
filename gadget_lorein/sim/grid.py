"""Millimetre grids shared by the phantom and the coils: voxel-centre coordinates, cubic
(Keys) interpolation matrices applied separably, and ellipsoids. Both models are defined in
physical millimetres and sampled here, so that one seed means the same object at every matrix."""
from __future__ import annotations

import math

import numpy as np


def check_shape(shape, what):
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{what} must be 3 positive integers, got {shape}")
    return shape


def axes_mm(shape_zyx, fov_mm):
    """Voxel-centre coordinates (z, y, x) in mm, index n//2 at 0."""
    nz, ny, nx = shape_zyx
    fx, fy, fz = (float(v) for v in fov_mm)
    ax = [(np.arange(n) - n // 2) * (f / n) for n, f in ((nz, fz), (ny, fy), (nx, fx))]
    return ax  # z, y, x


def keys_matrix(n_src: int, t: np.ndarray) -> np.ndarray:
    """(len(t), n_src) cubic-convolution (Keys, a = -0.5) interpolation weights at positions t
    given in source-index units; indices beyond the edges are clamped."""
    t = np.asarray(t, dtype=np.float64)
    i0 = np.floor(t).astype(np.int64)
    w = np.zeros((t.size, n_src))
    rows = np.arange(t.size)
    for k in (-1, 0, 1, 2):
        d = np.abs(t - (i0 + k))
        wk = np.where(d <= 1, (1.5 * d - 2.5) * d * d + 1,
                      np.where(d < 2, ((-0.5 * d + 2.5) * d - 4) * d + 2, 0.0))
        np.add.at(w, (rows, np.clip(i0 + k, 0, n_src - 1)), wk)
    return w


def separable(field: np.ndarray, wz, wy, wx) -> np.ndarray:
    """Apply 1D matrices along the last three axes of a (..., gz, gy, gx) array -> (..., nz, ny, nx).
    (np.einsum's own loops: as fast as BLAS here, and immune to a busy multi-threaded BLAS.)"""
    out = np.einsum("xa,...cba->...cbx", wx, field)
    out = np.einsum("yb,...cbx->...cyx", wy, out)
    return np.einsum("zc,...cyx->...zyx", wz, out)


def ellipsoid(x, y, z, centre, semi, rot_deg=0.0):
    """Squared normalised radius of (x, y, z) for an ellipsoid rotated about z."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    if rot_deg:
        c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return (dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2
