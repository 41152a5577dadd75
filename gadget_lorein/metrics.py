"""Accuracy against ground truth: NRMSE = ||est - ref|| / ||ref|| over a mask.

PD is in arbitrary units (its scale depends on the receive chain), so PD is compared after the
least-squares scale that best matches the truth inside the mask. Tissue metrics (``tissue_errors``)
separate the voxels without partial volume (``pure``, realistic simulation) from all tissue voxels."""
from __future__ import annotations

import numpy as np

from .data import MAP_NAMES, Maps, named

LABELS = {"WM": 1, "GM": 2, "CSF": 3, "lesion": 4}


def nrmse(est: np.ndarray, ref: np.ndarray, mask: np.ndarray, fit_scale: bool = False) -> float:
    e, r = np.asarray(est, np.float64)[mask], np.asarray(ref, np.float64)[mask]
    if fit_scale:
        e = e * (e @ r) / max(e @ e, 1e-30)
    return float(np.linalg.norm(e - r) / max(np.linalg.norm(r), 1e-30))


def map_errors(maps: Maps | dict, truth: dict, region: str = "brain") -> dict:
    """NRMSE of every map present in both, over the brain (labels > 0) or the tissue
    (WM, GM, lesions: CSF's long T2 is weakly encoded and would dominate a whole-brain T2 figure)."""
    maps = named(maps)
    labels = truth["labels"]
    mask = labels > 0 if region == "brain" else np.isin(labels, [1, 2, 4])
    return {k: nrmse(maps[k], truth[k], mask, fit_scale=(k == "PD"))
            for k in MAP_NAMES if k in maps and k in truth}


TISSUE = (LABELS["WM"], LABELS["GM"], LABELS["lesion"])


def tissue_masks(truth: dict) -> tuple[np.ndarray, np.ndarray]:
    """(pure tissue, all tissue): WM, GM and lesion voxels, the first without partial volume
    (truth's ``pure``, from the realistic simulation; where it is absent, as in the ideal
    simulation whose voxels hold one tissue each, every tissue voxel)."""
    tissue = np.isin(truth["labels"], TISSUE)
    pure = truth.get("pure")
    return (tissue & np.asarray(pure, bool) if pure is not None else tissue), tissue


def p99_relative_error(est: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """99th percentile of |est - ref| / ref over a mask: the runaway values an NRMSE averages away
    (non-finite estimates count as infinitely wrong)."""
    e, r = np.asarray(est, np.float64)[mask], np.asarray(ref, np.float64)[mask]
    rel = np.abs(e - r) / np.maximum(np.abs(r), 1e-30)
    return float(np.percentile(np.where(np.isfinite(rel), rel, np.inf), 99)) if rel.size else np.nan


def tissue_errors(maps: Maps | dict, truth: dict) -> dict:
    """'{map} pure' and '{map} all': NRMSE over pure and over all tissue voxels (``tissue_masks``;
    PD after its least-squares scale), and '{map} p99' (T1, T2, B1: ``p99_relative_error`` over
    all tissue voxels), for every map present in both."""
    maps = named(maps)
    pure, tissue = tissue_masks(truth)
    out = {}
    for k in MAP_NAMES:
        if k in maps and k in truth:
            out[f"{k} pure"] = nrmse(maps[k], truth[k], pure, fit_scale=(k == "PD"))
            out[f"{k} all"] = nrmse(maps[k], truth[k], tissue, fit_scale=(k == "PD"))
            if k != "PD":
                out[f"{k} p99"] = p99_relative_error(maps[k], truth[k], tissue)
    return out


def nrmse_table(maps: dict, truth: dict) -> str:
    """NRMSE per map over the brain and the tissue (WM, GM, lesions), as a text table."""
    brain = map_errors(maps, truth, "brain")
    tissue = map_errors(maps, truth, "tissue")
    lines = ["NRMSE   brain    tissue (WM, GM, lesions)"]
    for k in brain:                     # T1, T2, PD, B1 (map_errors' order)
        lines.append(f"{k:<6}  {brain[k]:6.4f}   {tissue[k]:6.4f}")
    lines.append("(PD after a least-squares scale; CSF's long T2 dominates the whole-brain T2 figure)")
    return "\n".join(lines)
