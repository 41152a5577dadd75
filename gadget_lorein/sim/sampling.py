"""Cartesian (ky, kz) undersampling masks for multi-frame 3D acquisitions.

Masks are boolean (n_frames, nz, ny) arrays (k-space centre at index n//2). The acceleration R is
(n_frames * ny * nz) / (number of sampled lines, calibration included); ``sampling_masks`` samples
exactly round(n_frames * ny * nz / R) lines.

Calibration region: the centred block of cy x cz points with ky in [ny//2 - cy//2, ... + cy) and
kz in [nz//2 - cz//2, ... + cz) (``calib_slices``).
- calib_mode 'per_frame': every frame samples the whole block;
- calib_mode 'union': the block's points are dealt out at random, round-robin over the frames
  (each point to one frame), so the union over frames covers the block at least once.
The remaining lines of each frame are drawn at random, without replacement, among the lines the
frame has not sampled yet (in 'union' mode this includes the rest of the calibration block, which
thus gets its share of the density's centre), from the variable density (1 + (r / r0)^2)^(-density_power) with r the
radius normalised to 1 at the grid's edge along ky and kz and r0 = 0.25 (a new draw per frame).
Per-frame totals (calibration included) differ by at most one line across frames in 'union' mode;
in 'per_frame' mode the non-calibration lines differ by at most one across frames.

``centre=True`` adds the central (ky, kz) line to every frame (within the budget), as a readout
through the k-space centre every repetition does (MRF's spirals) where a block per frame cannot fit.
Pattern 'shared' (``PATTERNS``): one frame's mask (calibration block in full) for every frame, as
3D-QALAS acquires the same phase encodes in each of the readouts of a repetition.
"""
from __future__ import annotations

import math

import numpy as np

CALIB_MODES = ("per_frame", "union")
PATTERNS = ("per_frame", "shared")
DENSITY_R0 = 0.25
_CALIB_CAP = 24      # auto_calib never picks more than this along an axis
_CALIB_MIN = 4       # nor less than this (or the grid size, if smaller)


def _check_grid(n_frames, ny, nz):
    for name, v in (("n_frames", n_frames), ("ny", ny), ("nz", nz)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(n_frames), int(ny), int(nz)


def _check_accel(accel):
    try:
        r = float(accel)
    except (TypeError, ValueError):
        raise ValueError(f"accel must be a number >= 1, got {accel!r}") from None
    if not math.isfinite(r) or r < 1.0:
        raise ValueError(f"accel (acceleration R) must be a finite number >= 1, got {accel!r}")
    return r


def _check_mode(calib_mode):
    if calib_mode not in CALIB_MODES:
        raise ValueError(f"calib_mode must be one of {CALIB_MODES}, got {calib_mode!r}")
    return calib_mode


def n_samples(n_frames: int, ny: int, nz: int, accel: float) -> int:
    """Number of sampled (ky, kz) lines, all frames together: round(n_frames * ny * nz / accel)."""
    n_frames, ny, nz = _check_grid(n_frames, ny, nz)
    r = _check_accel(accel)
    n = int(math.floor(n_frames * ny * nz / r + 0.5))
    if n < n_frames:
        raise ValueError(
            f"accel={accel} leaves {n} lines for {n_frames} frames of {ny}x{nz} (ky x kz); every "
            f"frame needs at least one line: accel must be <= {ny * nz}")
    return n


def calib_slices(ny: int, nz: int, calib) -> tuple:
    """(kz slice, ky slice) of the centred calibration block calib = (cy, cz), for indexing
    (..., nz, ny) arrays."""
    cy, cz = _check_calib(calib, ny, nz)
    return (slice(nz // 2 - cz // 2, nz // 2 - cz // 2 + cz),
            slice(ny // 2 - cy // 2, ny // 2 - cy // 2 + cy))


def calib_region(ny: int, nz: int, calib) -> np.ndarray:
    """Boolean (nz, ny) mask of the calibration block."""
    out = np.zeros((int(nz), int(ny)), bool)
    out[calib_slices(ny, nz, calib)] = True
    return out


def _check_calib(calib, ny, nz):
    try:
        cy, cz = calib
    except (TypeError, ValueError):
        raise ValueError(f"calib must be a pair (cy, cz) of integers, got {calib!r}") from None
    if int(cy) != cy or int(cz) != cz or cy < 0 or cz < 0:
        raise ValueError(f"calib (cy, cz) must be non-negative integers, got {calib!r}")
    cy, cz = int(cy), int(cz)
    if cy > ny or cz > nz:
        raise ValueError(f"calibration region {cy}x{cz} (ky x kz) is larger than the "
                         f"{ny}x{nz} (ky x kz) grid")
    if (cy == 0) != (cz == 0):
        raise ValueError(f"calib {calib!r}: cy and cz must both be 0 (no calibration) or both > 0")
    return cy, cz


def density(ny: int, nz: int, density_power: float = 1.0) -> np.ndarray:
    """Unnormalised variable-density weights (nz, ny): (1 + (r / r0)^2)^(-density_power)."""
    ky = (np.arange(ny) - ny // 2) / (ny / 2)
    kz = (np.arange(nz) - nz // 2) / (nz / 2)
    r2 = kz[:, None] ** 2 + ky[None, :] ** 2
    return (1.0 + r2 / DENSITY_R0 ** 2) ** (-float(density_power))


def _square_ish(limit, ny, nz, cap=_CALIB_CAP):
    """Largest (cy, cz) with cy*cz <= limit, |cy - cz| <= 1 (before clipping to the grid; the
    larger side along ky), at least min(4, n) per axis; None if even that does not fit."""
    lo_y, lo_z = min(_CALIB_MIN, ny), min(_CALIB_MIN, nz)
    for s in range(max(cap, _CALIB_MIN), _CALIB_MIN - 1, -1):
        for a, b in ((s, s), (s, s - 1)):
            cy, cz = max(min(a, ny), lo_y), max(min(b, nz), lo_z)
            if cy * cz <= limit:
                return cy, cz
    return None


def auto_calib(n_frames: int, ny: int, nz: int, accel: float, calib_mode: str = "per_frame") -> tuple:
    """A calibration size (cy, cz) that fits the sampling budget.

    'union': about ny/4 x nz/4 (even numbers, 12 to 24 per axis where the grid allows: smaller
    regions give poor coil maps), shrunk if needed to at most 60 % of all lines. 'per_frame': the largest square-ish block (at most
    24x24) using at most half of each frame's lines; at least 4x4 (that even if it takes more
    than half); ValueError if a 4x4 block does not fit in a frame at all.
    """
    n_frames, ny, nz = _check_grid(n_frames, ny, nz)
    _check_mode(calib_mode)
    total = n_samples(n_frames, ny, nz, accel)
    lo_y, lo_z = min(_CALIB_MIN, ny), min(_CALIB_MIN, nz)
    if calib_mode == "union":
        cy = min(ny, max(12, min(_CALIB_CAP, 2 * round(ny / 8))))
        cz = min(nz, max(12, min(_CALIB_CAP, 2 * round(nz / 8))))
        while cy * cz > 0.6 * total and (cy > lo_y or cz > lo_z):
            if cy >= cz and cy > lo_y or cz <= lo_z:
                cy -= 1
            else:
                cz -= 1
        if cy * cz > total:
            raise ValueError(
                f"accel={accel} leaves {total} lines in all, fewer than a {cy}x{cz} calibration "
                f"region: lower accel or give calib explicitly")
        return cy, cz
    per_frame = total // n_frames
    c = _square_ish(per_frame / 2, ny, nz)
    if c is not None:
        return c
    if lo_y * lo_z <= per_frame:
        return lo_y, lo_z
    raise ValueError(
        f"accel={accel} leaves {per_frame} lines per frame, fewer than a {lo_y}x{lo_z} "
        f"calibration region in every frame: use calib_mode='union' or a lower accel")


def sampling_masks(n_frames: int, ny: int, nz: int, accel: float, calib=None,
                   calib_mode: str = "per_frame", seed: int = 0,
                   density_power: float = 1.0, pattern: str = "per_frame",
                   centre: bool = False) -> np.ndarray:
    """Boolean (n_frames, nz, ny) masks with exactly round(n_frames*ny*nz/accel) True entries
    (pattern 'shared': n_frames x round(ny*nz/accel)).

    calib = (cy, cz) calibration block (default ``auto_calib``; (0, 0) for none), sampled in
    every frame ('per_frame') or split among the frames ('union'); the other lines are drawn
    from the variable density ``density(ny, nz, density_power)`` (0 = uniform), a new draw per
    frame, reproducibly from ``seed``. ``pattern`` and ``centre``: see the module docstring.
    """
    n_frames, ny, nz = _check_grid(n_frames, ny, nz)
    _check_mode(calib_mode)
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if pattern == "shared":
        one = sampling_masks(1, ny, nz, accel, calib, "per_frame", seed, density_power,
                             centre=centre)
        return np.repeat(one, n_frames, axis=0)
    total = n_samples(n_frames, ny, nz, accel)
    if calib is None:
        calib = auto_calib(n_frames, ny, nz, accel, calib_mode)
    cy, cz = _check_calib(calib, ny, nz)
    n_cal = cy * cz
    if not math.isfinite(float(density_power)) or density_power < 0:
        raise ValueError(f"density_power must be >= 0, got {density_power!r}")
    region = calib_region(ny, nz, (cy, cz)) if n_cal else np.zeros((nz, ny), bool)

    if calib_mode == "per_frame" and n_frames * n_cal > total:
        per_frame = total // n_frames
        fit = _square_ish(per_frame, ny, nz, cap=max(ny, nz))
        hint = (f"at most {fit[0]}x{fit[1]} fits" if fit is not None
                else "not even a 4x4 block fits")
        raise ValueError(
            f"calibration region {cy}x{cz} (ky x kz) = {n_cal} lines in every frame does not fit "
            f"the budget: accel={accel} leaves {per_frame} lines per frame "
            f"(per-frame calibration of {n_cal} lines needs accel <= {ny * nz / n_cal:.4g}); "
            f"{hint}, or use calib_mode='union' to split the region among the frames")
    if calib_mode == "union" and n_cal > total:
        raise ValueError(
            f"calibration region {cy}x{cz} (ky x kz) = {n_cal} lines is more than the {total} "
            f"lines that accel={accel} leaves for all {n_frames} frames together "
            f"(needs accel <= {n_frames * ny * nz / n_cal:.4g}); use a smaller calib")

    rng = np.random.default_rng(seed)
    masks = np.zeros((n_frames, nz, ny), bool)
    cz0, cy0 = nz // 2, ny // 2
    if calib_mode == "per_frame":
        masks[:, region] = True
        extra = total - n_frames * n_cal
        if centre and not region[cz0, cy0]:
            masks[:, cz0, cy0] = True
            extra -= n_frames
        if extra < 0:
            raise ValueError(f"accel={accel} leaves {total} lines, fewer than the k-space centre "
                             f"in each of the {n_frames} frames")
        quota = np.full(n_frames, extra // n_frames)
        quota[rng.permutation(n_frames)[: extra % n_frames]] += 1
    else:
        order = rng.permutation(n_frames)           # frames in the order they are dealt to
        cal_z, cal_y = np.nonzero(region)
        perm = rng.permutation(n_cal)
        frame_of = order[np.arange(n_cal) % n_frames]
        masks[frame_of, cal_z[perm], cal_y[perm]] = True
        n_cal_f = np.bincount(frame_of, minlength=n_frames)
        if centre:
            n_cal_f += ~masks[:, cz0, cy0]
            masks[:, cz0, cy0] = True
        # frames that got one calibration line more also get the larger total, so that the
        # totals differ by at most one and no frame's calibration exceeds its total
        totals = np.full(n_frames, total // n_frames)
        totals[order[: total % n_frames]] += 1
        quota = totals - n_cal_f
        if np.any(quota < 0):
            raise ValueError(f"accel={accel} leaves {total} lines for {n_frames} frames, fewer "
                             f"than the calibration block and the k-space centre in every frame")

    # the other lines: a new variable-density draw per frame among the lines that the frame has
    # not sampled yet (a weighted draw without replacement, Efraimidis-Spirakis, written as an
    # exponential race: the `quota` smallest E / w, E ~ Exp(1))
    weights = density(ny, nz, density_power).ravel()
    flat = masks.reshape(n_frames, nz * ny)
    chunk = max(1, 2 ** 22 // (nz * ny))
    for f0 in range(0, n_frames, chunk):
        q = quota[f0:f0 + chunk]
        qmax = int(q.max())
        if qmax == 0:
            continue
        keys = rng.standard_exponential((q.size, nz * ny)) / weights
        keys[flat[f0:f0 + chunk]] = np.inf
        ranks = np.argsort(keys, axis=1)[:, :qmax]
        take = np.arange(qmax)[None, :] < q[:, None]
        rows = np.broadcast_to(np.arange(f0, f0 + q.size)[:, None], ranks.shape)
        flat[rows[take], ranks[take]] = True
    return flat.reshape(n_frames, nz, ny)


def acceleration(mask) -> float:
    """R = (number of entries) / (number sampled) of a (n_frames, nz, ny) mask (inf if empty)."""
    mask = np.asarray(mask, bool)
    n = int(mask.sum())
    return float(mask.size) / n if n else math.inf
