"""Accuracy against ground truth: NRMSE = ||est - ref|| / ||ref|| over a mask.

PD is in arbitrary units (its scale depends on the receive chain), so PD is compared after the
least-squares scale that best matches the truth inside the mask."""
from __future__ import annotations

import numpy as np

LABELS = {"WM": 1, "GM": 2, "CSF": 3, "lesion": 4}


def nrmse(est: np.ndarray, ref: np.ndarray, mask: np.ndarray, fit_scale: bool = False) -> float:
    e, r = np.asarray(est, np.float64)[mask], np.asarray(ref, np.float64)[mask]
    if fit_scale:
        e = e * (e @ r) / max(e @ e, 1e-30)
    return float(np.linalg.norm(e - r) / max(np.linalg.norm(r), 1e-30))


def map_errors(maps: dict, truth: dict, region: str = "brain") -> dict:
    """NRMSE of every map present in both, over the brain (labels > 0) or the tissue
    (WM, GM, lesions: CSF's long T2 is weakly encoded and would dominate a whole-brain T2 figure)."""
    labels = truth["labels"]
    mask = labels > 0 if region == "brain" else np.isin(labels, [1, 2, 4])
    return {k: nrmse(maps[k], truth[k], mask, fit_scale=(k == "PD"))
            for k in ("T1", "T2", "PD", "B1") if k in maps and k in truth}
