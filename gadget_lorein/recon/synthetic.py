"""Synthetic weighted images from the quantitative maps (numpy only; no ISMRMRD, no torch).

A reading room reads weighted images, not T1/T2 numbers. Each contrast is the textbook magnitude
signal of an idealised sequence (ideal 90/180 degree pulses, TE << TR, full recovery of the
transverse magnetisation between repetitions), evaluated voxel by voxel on the fitted maps:

- spin echo (T1w, T2w, PDw; no TI):   S = PD (1 - exp(-TR/T1)) exp(-TE/T2)
- inversion recovery (FLAIR, STIR):   S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)
- double inversion recovery (DIR):    S = PD |1 - 2 exp(-TI2/T1) + 2 exp(-TI1/T1) - exp(-TR/T1)|
  exp(-TE/T2), TI1 from the first inversion and TI2 from the second to the excitation

(magnitude reconstruction, as scanners show IR images by default). B1 is not used: the formulas
assume nominal pulses, like the images they stand in for. PD is the relative PD map (99th
percentile 1); the images are that signal times ``SCALE`` = 1000, so that a DICOM writer that stores
integers keeps three digits. Voxels outside the support (T1 or T2 not positive) are 0.

The contrasts and their default (TR, TE, TI) are the settings ``synthetic`` and ``synthetic_<name>``
(gadget_lorein/settings.py, docs/settings.md).
"""
from __future__ import annotations

import numpy as np

from ..data import named
from ..settings import SYNTHETIC_CONTRASTS, synthetic_selection, synthetic_timing

SCALE = 1000.0
CONTRASTS = SYNTHETIC_CONTRASTS
SERIES = {name: 11 + i for i, name in enumerate(CONTRASTS)}     # T1w 11 ... DIR 16


def weighting(t1, t2, tr: float, te: float, ti: float | None = None, ti2: float | None = None):
    """The magnitude signal of unit PD (see the module docstring) for T1, T2 in ms (arrays)."""
    t1 = np.asarray(t1, np.float64)
    t2 = np.asarray(t2, np.float64)
    ok = (t1 > 0) & (t2 > 0)
    r1 = np.where(ok, 1.0 / np.where(ok, t1, 1.0), 0.0)
    r2 = np.where(ok, 1.0 / np.where(ok, t2, 1.0), 0.0)
    if ti is None:
        mz = 1.0 - np.exp(-tr * r1)
    elif ti2 is None:
        mz = 1.0 - 2.0 * np.exp(-ti * r1) + np.exp(-tr * r1)
    else:
        mz = 1.0 - 2.0 * np.exp(-ti2 * r1) + 2.0 * np.exp(-ti * r1) - np.exp(-tr * r1)
    return np.where(ok, np.abs(mz) * np.exp(-te * r2), 0.0)


def contrast_image(maps: dict, timing) -> np.ndarray:
    """One synthetic image (float32, same shape as the maps) for ``timing`` = (TR, TE[, TI[, TI2]])."""
    tr, te, *ti = (float(v) for v in timing)
    w = weighting(maps["T1"], maps["T2"], tr, te, *(ti + [None] * (2 - len(ti))))
    pd = np.nan_to_num(np.asarray(maps["PD"], np.float64))
    return (SCALE * np.abs(pd) * w).astype(np.float32)


def timings_from_settings(node_settings) -> dict:
    """{contrast: (TR, TE, ...)} of the contrasts the node settings select, in series order."""
    chosen = synthetic_selection(node_settings.synthetic)
    return {c: synthetic_timing(c, getattr(node_settings, f"synthetic_{c.lower()}"))
            for c in CONTRASTS if c in chosen}


def synthetic_images(maps, timings: dict) -> dict:
    """{contrast: (nz, ny, nx) float32} for every ``timings`` entry {contrast: (TR, TE[, TI[, TI2]])};
    ``maps``: a reconstruction's Maps or {name: map}."""
    maps = named(maps)
    return {name: contrast_image(maps, t) for name, t in timings.items()}


def describe(name: str, timing) -> str:
    """'FLAIR TR 9000 TE 90 TI 2500' (a series description's detail)."""
    labels = ("TR", "TE", "TI", "TI2") if len(timing) < 4 else ("TR", "TE", "TI1", "TI2")
    return name + " " + " ".join(f"{k} {v:g}" for k, v in zip(labels, timing))
