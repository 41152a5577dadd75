"""Numerical 3D head phantom: the ground-truth maps of the simulator (the coils that image it are
in :mod:`gadget_lorein.sim.coils`, the shared millimetre grids in :mod:`gadget_lorein.sim.grid`).

Geometry is defined in physical millimetres (x = left-right, y = posterior-anterior, z =
inferior-superior, origin at the voxel of index n//2 along every axis) and sampled at the voxel
centres, so one seed gives the same anatomy at every matrix size; only sub-voxel details (a thin
CSF rim, a small lesion) change with resolution, and every layer is at least about one voxel thick
so that tiny test matrices still contain every tissue class.

Structure (outside in): background (label 0, T1 = T2 = PD = 0) | CSF rim under the skull |
cortical GM shell with a randomly undulating (gyrus-like) GM/WM border | WM, with an
interhemispheric fissure (CSF, lined by GM) above the corpus callosum, deep GM (thalamus/basal
ganglia) and two lateral ventricles (CSF) | 3-5 small MS-like lesions inside the WM.

Relaxation and density values at 3 T (the phantom uses the ``TISSUES`` table below):

- WM  T1 832 ms, T2 80 ms; GM T1 1331 ms, T2 110 ms: Wansapura JP, Holland SK, Dunn RS, Ball WS.
  "NMR relaxation times in the human brain at 3.0 tesla", JMRI 9:531-538 (1999).  (Stanisz GJ et
  al., MRM 54:507-512 (2005) report WM 1084/69 ms and GM 1820/99 ms: WM/GM T1 at 3 T depends
  strongly on the method; the values used here are in the range of the MRF and 3D-QALAS brain
  literature, e.g. Ma D et al., Nature 495:187 (2013); Fujita S et al., NeuroImage (2019).)
- CSF T1 4160 ms: Lu H et al., "Routine clinical brain MRI sequences for use at 3.0 Tesla",
  JMRI 22:13-22 (2005) (4163 +- 263 ms); CSF T2 1800 ms: reported values at 3 T lie around
  1.5-2 s (e.g. Spijkerman JM et al., "T2 mapping of cerebrospinal fluid: 3 T versus 7 T",
  MAGMA (2018)).
- PD (water content relative to CSF): WM 0.69, GM 0.80, CSF 1.0 (e.g. Whittall KP et al.,
  MRM 37:34-43 (1997); Neeb H, Zilles K, Shah NJ, NeuroImage (2006)).
- MS lesions: T1 1300 ms, T2 170 ms, PD 0.80, between normal-appearing WM and CSF, mid-range of
  what quantitative MRI reports for chronic T2-hyperintense lesions at 3 T (e.g. synthetic MRI /
  QALAS: Blystad I et al., AJNR (2016)); real lesions vary widely.

Every tissue carries a smooth random texture (correlation length ~1 cm, a few % amplitude,
clipped at 2.5 standard deviations, see ``TEXTURE``), T1, T2 and PD textures partially correlated.
B1 (flip-angle scale) is a smooth, centre-bright field as at 3 T: about 1.15-1.2 in the centre of
the brain and 0.8-0.9 at its periphery, with a seeded tilt and shift; it is defined everywhere
(also in the background) and clipped to [0.7, 1.3].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grid import axes_mm, check_shape, ellipsoid, keys_matrix, separable

BACKGROUND, WM, GM, CSF, LESION = 0, 1, 2, 3, 4
LABEL_NAMES = {BACKGROUND: "background", WM: "WM", GM: "GM", CSF: "CSF", LESION: "lesion"}

# label -> (T1 ms, T2 ms, PD): 3 T values, references in the module docstring
TISSUES = {
    WM: (832.0, 80.0, 0.69),
    GM: (1331.0, 110.0, 0.80),
    CSF: (4160.0, 1800.0, 1.00),
    LESION: (1300.0, 170.0, 0.80),
}
# relative standard deviation of the texture of (T1, T2, PD) per label (clipped at 2.5 sd)
TEXTURE = {
    WM: (0.03, 0.03, 0.015),
    GM: (0.03, 0.03, 0.015),
    CSF: (0.01, 0.01, 0.005),
    LESION: (0.04, 0.04, 0.02),
}
TEXTURE_CLIP = 2.5

# Geometry in mm (semi-axes x, y, z). Inner skull surface = outer boundary of the CSF rim.
SKULL_SEMI = (70.0, 88.0, 64.0)
CSF_RIM_MM = 4.0          # CSF between brain and skull
CORTEX_MM = 11.0          # mean cortical GM depth (a smooth shell standing in for the folded cortex)
FOLD_MM = 4.0             # standard deviation of the GM/WM border undulation (sulci and gyri)
MIN_CORTEX_MM = 3.0       # the cortex is never thinner than this (nor than one voxel)
FISSURE_HALF_MM = 1.5     # half-width of the interhemispheric fissure (CSF)
MEDIAL_GM_MM = 4.0        # GM lining the fissure
CALLOSUM_TOP_MM = 18.0    # the fissure reaches down to this z (mm) between |y| < FISSURE_Y_MM
FISSURE_Y_MM = 45.0
VENTRICLES = [  # centre (x, y, z) mm, semi-axes, rotation about z (deg)
    ((-10.0, 4.0, 10.0), (6.0, 24.0, 9.0), 10.0),
    ((10.0, 4.0, 10.0), (6.0, 24.0, 9.0), -10.0),
]
DEEP_GM = [
    ((-20.0, -4.0, 0.0), (10.0, 16.0, 10.0), 0.0),
    ((20.0, -4.0, 0.0), (10.0, 16.0, 10.0), 0.0),
]
LESION_SEMI_MM = (2.5, 6.0)
DEFAULT_INPLANE_FOV_MM = 220.0

# random fields live on a fixed coarse grid (mm) so that a seed means the same thing at any matrix
_FIELD_SPACING_MM = 6.0
_FIELD_HALF_MM = 132.0


@dataclass
class Phantom:
    """Ground-truth maps (float32 (nz, ny, nx)): T1, T2 in ms (0 in the background), PD relative
    (0 in the background), B1 flip-angle scale (defined everywhere); labels uint8 (0 background,
    1 WM, 2 GM, 3 CSF, 4 lesion); fov_mm = (x, y, z) field of view in mm."""
    t1: np.ndarray
    t2: np.ndarray
    pd: np.ndarray
    b1: np.ndarray
    labels: np.ndarray
    fov_mm: tuple

    @property
    def shape(self) -> tuple:
        """(nz, ny, nx)."""
        return tuple(self.t1.shape)

    @property
    def voxel_mm(self) -> tuple:
        """Voxel size (x, y, z) in mm."""
        nz, ny, nx = self.t1.shape
        return (self.fov_mm[0] / nx, self.fov_mm[1] / ny, self.fov_mm[2] / nz)

    @property
    def brain_mask(self) -> np.ndarray:
        """Everything inside the skull (labels > 0, CSF included)."""
        return self.labels > 0

    @property
    def tissue_mask(self) -> np.ndarray:
        """WM, GM and lesions (no CSF)."""
        return (self.labels == WM) | (self.labels == GM) | (self.labels == LESION)

    def maps(self) -> dict:
        """The quantitative maps: {'t1', 't2', 'pd', 'b1'} -> float32 (nz, ny, nx)."""
        return {"t1": self.t1, "t2": self.t2, "pd": self.pd, "b1": self.b1}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def default_fov_mm(matrix) -> tuple:
    """Default (x, y, z) FOV for a matrix (nx, ny, nz): isotropic voxels of 220 mm / max(nx, ny),
    e.g. (220, 220, 165) for (64, 64, 48)."""
    nx, ny, nz = (int(v) for v in matrix)
    vox = DEFAULT_INPLANE_FOV_MM / max(nx, ny)
    return (vox * nx, vox * ny, vox * nz)


class _SmoothField:
    """Unit-variance smooth Gaussian random field on a fixed coarse grid in mm, evaluated anywhere
    by cubic interpolation (fast on grids: separable matrix products)."""

    def __init__(self, rng: np.random.Generator, corr_mm: float, half_mm: float):
        h = _FIELD_SPACING_MM
        self.half = max(_FIELD_HALF_MM, half_mm + 2 * h)
        self.n = int(round(2 * self.half / h)) + 1
        white = rng.standard_normal((self.n,) * 3)
        sig = corr_mm / h
        k = np.arange(self.n)
        g = np.exp(-0.5 * ((k[:, None] - k[None, :]) / sig) ** 2)
        g /= g.sum(axis=1, keepdims=True)
        f = separable(white, g, g, g)
        self.coarse = f / f.std()

    def _index(self, x):
        return (np.asarray(x, dtype=np.float64) + self.half) / _FIELD_SPACING_MM

    def on_grid(self, z, y, x) -> np.ndarray:
        w = [keys_matrix(self.n, self._index(a)) for a in (z, y, x)]
        return np.clip(separable(self.coarse, *w), -TEXTURE_CLIP, TEXTURE_CLIP)

    def at_points(self, z, y, x) -> np.ndarray:
        wz, wy, wx = (keys_matrix(self.n, self._index(np.ravel(a))) for a in (z, y, x))
        v = np.einsum("pc,pb,pa,cba->p", wz, wy, wx, self.coarse)
        return np.clip(v, -TEXTURE_CLIP, TEXTURE_CLIP).reshape(np.shape(z))


def _anatomy(x, y, z, fold, vox_mm):
    """Labels (before lesions) at points (x, y, z) (broadcastable, mm); fold: GM/WM border
    undulation (unit-variance field) at the same points; vox_mm: largest voxel size, used to keep
    every layer at least about one voxel thick."""
    rim = max(CSF_RIM_MM, 1.0 * vox_mm)
    cortex = max(CORTEX_MM, 1.5 * vox_mm)
    min_cortex = max(MIN_CORTEX_MM, 1.0 * vox_mm)
    fiss = max(FISSURE_HALF_MM, 0.5 * vox_mm)
    medial = max(MEDIAL_GM_MM, 1.0 * vox_mm)
    skull = np.array(SKULL_SEMI)
    brain = skull - rim
    wm = brain - cortex
    shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
    lab = np.zeros(shape, np.uint8)
    lab[ellipsoid(x, y, z, (0, 0, 0), skull) < 1] = CSF
    r_brain = np.sqrt(ellipsoid(x, y, z, (0, 0, 0), brain))
    in_brain = r_brain < 1
    lab[in_brain] = GM
    # GM/WM border: the WM ellipsoid's surface moved outwards by FOLD_MM * fold (gyri where
    # fold > 0, sulci where fold < 0), at least min_cortex below the brain surface
    r_wm = np.sqrt(ellipsoid(x, y, z, (0, 0, 0), wm))
    depth = (1.0 - r_brain) * float(np.cbrt(np.prod(brain)))
    white = ((r_wm - 1.0) * float(np.cbrt(np.prod(wm))) < FOLD_MM * fold) & (depth > min_cortex)
    lab[in_brain & white] = WM
    # interhemispheric fissure above the corpus callosum (deeper at the front and the back)
    ax = np.abs(x)
    upper = (z > CALLOSUM_TOP_MM) | (np.abs(y) > FISSURE_Y_MM)
    lab[in_brain & upper & (ax < fiss + medial)] = GM
    lab[in_brain & upper & (ax < fiss)] = CSF
    for c, s, r in DEEP_GM:
        lab[ellipsoid(x, y, z, c, s, r) < 1] = GM
    for c, s, r in VENTRICLES:
        lab[ellipsoid(x, y, z, c, s, r) < 1] = CSF
    return lab


def _place_lesions(rng, fold_field, vox_mm, n_lesions):
    """Lesion ellipsoids (centre, semi, rotation) entirely inside WM, not touching each other."""
    skull = np.array(SKULL_SEMI)
    lesions = []
    for _ in range(2000):
        if len(lesions) == n_lesions:
            break
        c = rng.uniform(-0.6, 0.6, 3) * skull
        semi = rng.uniform(*LESION_SEMI_MM, 3)
        rot = rng.uniform(0, 180)
        # centre and the ellipsoid's extremes (with a margin) must lie in WM
        u = np.array([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1],
                      [0, 0, -1], [.7, .7, 0], [-.7, .7, 0], [.7, -.7, 0], [-.7, -.7, 0]], float)
        pts = c + 1.4 * u * semi
        fold = fold_field.at_points(pts[:, 2], pts[:, 1], pts[:, 0])
        lab = _anatomy(pts[:, 0], pts[:, 1], pts[:, 2], fold, vox_mm)
        if np.any(lab != WM):
            continue
        if any(np.linalg.norm(c - c2) < 1.5 * (semi.max() + s2.max()) for c2, s2, _ in lesions):
            continue
        lesions.append((c, semi, rot))
    if len(lesions) < n_lesions:  # pragma: no cover - the WM is large, this never happens
        raise RuntimeError("could not place the lesions")
    return lesions


def head_phantom(matrix=(64, 64, 48), seed: int = 0, fov_mm=None) -> Phantom:
    """3D head phantom. ``matrix`` = (nx, ny, nz) as on the command line; the arrays are
    (nz, ny, nx). ``fov_mm`` = (x, y, z) in mm, default ``default_fov_mm(matrix)`` (isotropic
    voxels, 220 mm in-plane). The anatomy has a fixed physical size (about 140 x 176 x 128 mm);
    a smaller FOV crops it. Everything random (texture, GM/WM border, lesions, B1 tilt) follows
    ``seed`` and is the same at every matrix size."""
    nx, ny, nz = check_shape(matrix, "matrix (nx, ny, nz)")
    fov = tuple(float(v) for v in (default_fov_mm((nx, ny, nz)) if fov_mm is None else fov_mm))
    if len(fov) != 3 or min(fov) <= 0:
        raise ValueError(f"fov_mm must be 3 positive numbers (x, y, z), got {fov_mm}")
    vox = max(fov[0] / nx, fov[1] / ny, fov[2] / nz)
    za, ya, xa = axes_mm((nz, ny, nx), fov)
    z, y, x = za[:, None, None], ya[None, :, None], xa[None, None, :]

    rng = np.random.default_rng(seed)
    half = max(fov) / 2
    fold_field = _SmoothField(rng, corr_mm=6.0, half_mm=half)
    tex_fields = [_SmoothField(rng, corr_mm=9.0, half_mm=half) for _ in range(3)]
    b1_shift = rng.uniform(-8.0, 8.0, 3)
    b1_tilt = rng.normal(0.0, 1.0, 3)
    b1_tilt *= rng.uniform(0.03, 0.06) / np.linalg.norm(b1_tilt)
    n_lesions = int(rng.integers(3, 6))
    # placed in the nominal anatomy (no voxel-size dependent thickening): the same at every matrix
    lesions = _place_lesions(rng, fold_field, 0.0, n_lesions)

    # labels
    fold = fold_field.on_grid(za, ya, xa)
    labels = _anatomy(x, y, z, fold, vox)
    for c, semi, rot in lesions:
        inside = ellipsoid(x, y, z, c, semi, rot) < 1
        if not inside.any():  # smaller than a voxel: keep the nearest voxel
            idx = tuple(int(np.argmin(np.abs(a - ci))) for a, ci in zip((za, ya, xa), c[::-1]))
            inside = np.zeros(labels.shape, bool)
            inside[idx] = True
        labels[inside & ((labels == WM) | (labels == LESION))] = LESION
        if not np.any(inside & (labels == LESION)):
            labels[inside] = LESION

    # maps with texture: T1 ~ a, T2 ~ 0.6 a + 0.8 b, PD ~ 0.6 a + 0.8 c (a, b, c independent)
    fa, fb, fc = (f.on_grid(za, ya, xa) for f in tex_fields)
    tex = (fa, 0.6 * fa + 0.8 * fb, 0.6 * fa + 0.8 * fc)
    maps = [np.zeros(labels.shape, np.float32) for _ in range(3)]
    for lab, values in TISSUES.items():
        sel = labels == lab
        for m, v, t, amp in zip(maps, values, tex, TEXTURE[lab]):
            m[sel] = v * (1.0 + amp * t[sel])
    t1, t2, pd = maps

    # B1: centre-bright Gaussian bump plus a linear tilt, clipped to [0.7, 1.3]
    skull = np.array(SKULL_SEMI)
    u = (x - b1_shift[0]) / skull[0]
    v = (y - b1_shift[1]) / skull[1]
    w = (z - b1_shift[2]) / skull[2]
    b1 = 0.80 + 0.38 * np.exp(-(u ** 2 + v ** 2 + w ** 2) / (2 * 0.55 ** 2))
    b1 = b1 + b1_tilt[0] * x / skull[0] + b1_tilt[1] * y / skull[1] + b1_tilt[2] * z / skull[2]
    b1 = np.clip(b1, 0.7, 1.3).astype(np.float32)
    return Phantom(t1=t1, t2=t2, pd=pd, b1=b1, labels=labels, fov_mm=fov)


# ----------------------------------------------------------------------------------------------
# partial volume
# ----------------------------------------------------------------------------------------------

def _blocks(a: np.ndarray, f: int) -> np.ndarray:
    """(nz, ny, nx, f^3) view of the f x f x f blocks of a (f nz, f ny, f nx) array."""
    nz, ny, nx = (n // f for n in a.shape)
    b = a.reshape(nz, f, ny, f, nx, f).transpose(0, 2, 4, 1, 3, 5)
    return b.reshape(nz, ny, nx, f ** 3)


def block_average(fine: Phantom, factor: int = 2) -> tuple[Phantom, np.ndarray]:
    """The truth on a grid ``factor`` times coarser (same FOV) of a phantom simulated finely:
    (coarse phantom, ``pure``). PD is the mean of each block; T1, T2 and B1 the PD-weighted means
    (what a voxel's signal mostly carries; B1 the plain mean where the block holds no PD); labels
    the majority (a tie between background and tissue goes to the tissue). ``pure``: boolean,
    the block holds one single label, so the voxel has no partial volume."""
    f = int(factor)
    if f < 1 or any(n % f for n in fine.shape):
        raise ValueError(f"factor {factor} must divide the fine shape {fine.shape}")
    pd = _blocks(fine.pd.astype(np.float64), f)
    w = pd.sum(-1)
    safe = np.where(w > 0, w, 1.0)

    def weighted(a):
        b = _blocks(a.astype(np.float64), f)
        return np.where(w > 0, (b * pd).sum(-1) / safe, b.mean(-1)).astype(np.float32)

    lab = _blocks(fine.labels, f)
    counts = np.stack([(lab == k).sum(-1) for k in range(len(LABEL_NAMES))], -1).astype(np.float64)
    counts[..., BACKGROUND] -= 0.5
    labels = counts.argmax(-1).astype(np.uint8)
    pure = (lab == lab[..., :1]).all(-1)
    coarse = Phantom(t1=weighted(fine.t1), t2=weighted(fine.t2), pd=pd.mean(-1).astype(np.float32),
                     b1=weighted(fine.b1), labels=labels, fov_mm=fine.fov_mm)
    return coarse, pure
