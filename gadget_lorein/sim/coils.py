"""Receive-coil sensitivities (loop coils around the head, Biot-Savart by reciprocity) and the
receiver-noise covariance: the simulator's coil model, beside the phantom it images
(the same millimetre geometry, :mod:`gadget_lorein.sim.grid`)."""
from __future__ import annotations

import math

import numpy as np

from .grid import axes_mm, check_shape, ellipsoid, keys_matrix, separable
from .phantom import SKULL_SEMI, default_fov_mm


def _loop_field(points, centre, normal, radius, n_seg=24, soft_mm=5.0):
    """Biot-Savart field (arbitrary units) of a circular current loop at points (N, 3) mm; the
    distance is softened by soft_mm so that points near the wire stay finite."""
    normal = normal / np.linalg.norm(normal)
    a = np.cross(normal, [0.0, 0.0, 1.0])
    if np.linalg.norm(a) < 1e-6:
        a = np.cross(normal, [1.0, 0.0, 0.0])
    a /= np.linalg.norm(a)
    b = np.cross(normal, a)
    phi = (np.arange(n_seg) + 0.5) * 2 * np.pi / n_seg
    seg = centre + radius * (np.cos(phi)[:, None] * a + np.sin(phi)[:, None] * b)      # K, 3
    dl = radius * (2 * np.pi / n_seg) * (-np.sin(phi)[:, None] * a + np.cos(phi)[:, None] * b)
    seg, dl = seg.astype(np.float32), dl.astype(np.float32)
    pts = points.astype(np.float32)
    field = np.empty(points.shape, np.float64)
    step = 16384
    for i0 in range(0, len(pts), step):
        p = pts[i0:i0 + step]
        rx = p[:, 0:1] - seg[:, 0]                                                  # N, K
        ry = p[:, 1:2] - seg[:, 1]
        rz = p[:, 2:3] - seg[:, 2]
        inv = (rx * rx + ry * ry + rz * rz + np.float32(soft_mm ** 2)) ** np.float32(-1.5)
        field[i0:i0 + step, 0] = ((dl[:, 1] * rz - dl[:, 2] * ry) * inv).sum(1)
        field[i0:i0 + step, 1] = ((dl[:, 2] * rx - dl[:, 0] * rz) * inv).sum(1)
        field[i0:i0 + step, 2] = ((dl[:, 0] * ry - dl[:, 1] * rx) * inv).sum(1)
    return field


def coil_layout(n_coils: int):
    """Loop coils on an elliptic cylinder 22 mm outside the skull: up to 8 per ring, rings spread
    along z (alternate rings rotated by half a step). Returns a list of (centre, inward normal,
    loop radius) in mm."""
    n_coils = int(n_coils)
    if n_coils < 1:
        raise ValueError(f"n_coils must be >= 1, got {n_coils}")
    ax, ay = SKULL_SEMI[0] + 22.0, SKULL_SEMI[1] + 22.0
    n_rings = -(-n_coils // 8)
    per_ring = [len(a) for a in np.array_split(np.arange(n_coils), n_rings)]
    zs = [10.0] if n_rings == 1 else list(np.linspace(-1, 1, n_rings) * min(24.0 * (n_rings - 1), 50.0) + 10.0)
    perimeter = math.pi * (3 * (ax + ay) - math.sqrt((3 * ax + ay) * (ax + 3 * ay)))
    out = []
    for r, (n, zc) in enumerate(zip(per_ring, zs)):
        radius = min(0.55 * perimeter / n, 55.0)
        if n_rings > 1:
            radius = min(radius, 0.6 * (zs[1] - zs[0]))
        for k in range(n):
            phi = 2 * np.pi * (k + 0.5 * (r % 2)) / n + np.pi / 2
            c = np.array([ax * math.cos(phi), ay * math.sin(phi), zc])
            nrm = -np.array([math.cos(phi) / ax, math.sin(phi) / ay, 0.0])
            out.append((c, nrm / np.linalg.norm(nrm), radius))
    return out


def coil_sensitivities(shape_zyx, n_coils: int = 8, seed: int = 0, fov_mm=None) -> np.ndarray:
    """Complex64 receive sensitivities (n_coils, nz, ny, nx) of loop coils around the head
    (``coil_layout``), from the Biot-Savart field by reciprocity, S ~ B_x - i B_y, times a random
    constant phase per coil (seeded). fov_mm = (x, y, z), default ``default_fov_mm`` of the matrix,
    i.e. the geometry matches ``head_phantom`` of the same matrix.

    Not normalised to unit root-sum-of-squares: the scale is such that the median RSS inside the
    skull is 1; for 8 coils the RSS is about 0.6-0.7 in the centre of the brain, 0.4-0.5 at the
    vertex (the ring sits around the head, like a real head coil), and 2-3 at the brain's
    periphery next to the coils. sigpy.mri.birdcage_maps is not used: it normalises to RSS = 1.
    Fields are computed on a grid of at most 24 points per axis and interpolated (cubic), which is
    exact enough for these smooth fields and fast at any matrix size."""
    nz, ny, nx = check_shape(shape_zyx, "shape_zyx (nz, ny, nx)")
    fov = default_fov_mm((nx, ny, nz)) if fov_mm is None else tuple(float(v) for v in fov_mm)
    axes = axes_mm((nz, ny, nx), fov)
    grids, mats = [], []
    g_max = 24
    for a in axes:
        if a.size <= g_max:
            grids.append(a)
            mats.append(None)
        else:
            g = np.linspace(a[0], a[-1], g_max)
            grids.append(g)
            mats.append(keys_matrix(g_max, (a - g[0]) / (g[1] - g[0])))
    gz, gy, gx = np.meshgrid(*grids, indexing="ij")
    pts = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1)
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0, 2 * np.pi, n_coils)
    out = np.empty((n_coils, nz, ny, nx), np.complex64)
    layout = coil_layout(n_coils)
    coarse = []
    for c, nrm, rad in layout:
        b = _loop_field(pts, c, nrm, rad)
        coarse.append((b[:, 0] - 1j * b[:, 1]).reshape(gz.shape))
    coarse = np.stack(coarse) * np.exp(1j * phases)[:, None, None, None]
    # scale: median RSS inside the skull = 1
    rss = np.sqrt((np.abs(coarse) ** 2).sum(0))
    inside = ellipsoid(gx, gy, gz, (0, 0, 0), SKULL_SEMI) < 1
    scale = 1.0 / np.median(rss[inside]) if inside.any() else 1.0 / np.median(rss)
    coarse = (coarse * scale).astype(np.complex64)
    if all(m is None for m in mats):
        out[:] = coarse
        return out
    eye = [(np.eye(len(g)) if m is None else m).astype(np.float32) for g, m in zip(grids, mats)]
    for i in range(n_coils):
        re_im = separable(np.stack([coarse[i].real, coarse[i].imag]), *eye)
        out[i].real = re_im[0]
        out[i].imag = re_im[1]
    return out


def noise_covariance(n_coils: int, seed: int = 0, correlation: float = 0.2) -> np.ndarray:
    """Complex Hermitian positive-definite receiver-noise covariance (n_coils, n_coils), complex128.

    Variances drawn uniformly in [0.7, 1.3]; the correlation matrix is (1 - w) I + w K with K the
    normalised Gram matrix of random complex rank-3 loadings (rank 1 if ``correlation`` is too
    large for rank 3), w chosen so that the mean magnitude of the off-diagonal correlation
    coefficients equals ``correlation`` (0 <= correlation < 1)."""
    n_coils = int(n_coils)
    if n_coils < 1:
        raise ValueError(f"n_coils must be >= 1, got {n_coils}")
    if not 0.0 <= correlation < 1.0:
        raise ValueError(f"correlation must be in [0, 1), got {correlation}")
    rng = np.random.default_rng(seed)
    var = rng.uniform(0.7, 1.3, n_coils)
    corr = np.eye(n_coils, dtype=np.complex128)
    if n_coils > 1 and correlation > 0:
        off = ~np.eye(n_coils, dtype=bool)
        for rank in (3, 1):
            load = rng.standard_normal((n_coils, rank)) + 1j * rng.standard_normal((n_coils, rank))
            k = load @ load.conj().T
            d = np.sqrt(np.real(np.diag(k)))
            k = k / d[:, None] / d[None, :]
            w = correlation / np.abs(k[off]).mean()
            if w < 0.98 or rank == 1:
                break
        corr = (1 - w) * np.eye(n_coils) + w * k
    s = np.sqrt(var)
    cov = s[:, None] * corr * s[None, :]
    return 0.5 * (cov + cov.conj().T)
