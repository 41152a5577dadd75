"""Figures for the command line (matplotlib, Agg: no display needed).

- :func:`simulation_figure`: ground-truth maps, tissue labels, one contrast of the simulated scan
  (noise-free truth, and zero-filled from the undersampled k-space, coil-combined with the simulator's
  coil maps) and that frame's sampling mask.
- :func:`maps_figure`: reconstructed maps; with the truth, rows truth / reconstruction / |error|.
- :func:`derived_figure`: synthetic weighted images (from the truth and the reconstruction) and
  the confidence maps with the undetermined voxels.

Slices are the central partition (axial, z = nz // 2) shown with anterior (+y) up. Every panel has a
colour bar with the unit. PD is relative: against a truth it is shown after the least-squares scale
that best matches the truth in the brain (the scale the NRMSE uses, ``metrics.nrmse(fit_scale=True)``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .data import MAP_NAMES

UNITS = {"T1": "ms", "T2": "ms", "PD": "a.u.", "B1": "fraction of nominal"}
CMAPS = {"T1": "magma", "T2": "viridis", "PD": "gray", "B1": "coolwarm"}
# display ranges: brain tissue contrast first (T2 of CSF, about 1800 ms, is clipped)
RANGES = {"T1": (0.0, 4500.0), "T2": (0.0, 250.0), "PD": (0.0, 1.2), "B1": (0.6, 1.4)}
ERROR_RANGES = {"T1": 900.0, "T2": 60.0, "PD": 0.25, "B1": 0.2}
LABEL_NAMES = ["background", "WM", "GM", "CSF", "lesion"]


def _slice(vol, z=None):
    vol = np.asarray(vol)
    if vol.ndim == 2:
        return vol
    return vol[vol.shape[0] // 2 if z is None else z]


def _panel(fig, ax, img, title, cmap, vmin, vmax, unit, bad="black"):
    import matplotlib
    cm = matplotlib.colormaps[cmap].with_extremes(bad=bad)
    im = ax.imshow(img, cmap=cm, vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label(unit, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return im


def _save(fig: Figure, path) -> None:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")


def _ls_scale(est, ref, mask) -> float:
    e, r = np.asarray(est, np.float64)[mask], np.asarray(ref, np.float64)[mask]
    den = float(e @ e)
    return float(e @ r) / den if den > 0 else 1.0


def simulation_figure(sim, proto, path, accel: float | None = None, frame: int = 0) -> None:
    """Truth maps + labels (top), one contrast: truth, zero-filled, sampling mask (bottom)."""
    import torch

    from .fft import ifftnc
    from .sim.simulate import contrast_images

    truth = sim.truth()
    maps = [k for k in MAP_NAMES if k in truth]
    lines = sim.scan.lines
    nz, ny, nx = truth["T1"].shape
    z = nz // 2
    frame = int(min(max(frame, 0), lines.n_frames - 1))

    # zero-filled image of one frame, coil-combined with the simulator's coil maps
    sel = lines.frame == frame
    k = np.zeros((lines.n_coils, nz, ny, nx), np.complex64)
    k[:, lines.kz[sel], lines.ky[sel], :] = np.moveaxis(lines.data[sel], 0, 1)
    coil_imgs = ifftnc(torch.from_numpy(k)).numpy()
    s = sim.coils
    combined = (np.conj(s) * coil_imgs).sum(0) / np.maximum((np.abs(s) ** 2).sum(0), 1e-12)
    mask = np.zeros((nz, ny), bool)
    mask[lines.kz[sel], lines.ky[sel]] = True
    true_img = contrast_images(proto, sim.phantom, frames=[frame])[0].numpy()

    ncol = max(len(maps) + 1, 3)
    fig = Figure(figsize=(3.3 * ncol, 6.6), layout="constrained")
    axes = fig.subplots(2, ncol)
    for j, name in enumerate(maps):
        lo, hi = RANGES[name]
        _panel(fig, axes[0, j], _slice(truth[name], z), f"true {name}", CMAPS[name], lo, hi,
               f"{name} [{UNITS[name]}]")
    lab = _slice(truth["labels"], z)
    im = axes[0, len(maps)].imshow(lab, cmap="tab10", vmin=-0.5, vmax=9.5, origin="lower",
                                   interpolation="nearest")
    axes[0, len(maps)].set_title("tissue labels", fontsize=9)
    axes[0, len(maps)].set_xticks([])
    axes[0, len(maps)].set_yticks([])
    cb = fig.colorbar(im, ax=axes[0, len(maps)], shrink=0.9, ticks=range(5))
    cb.ax.set_yticklabels(LABEL_NAMES, fontsize=7)
    cb.ax.set_ylim(-0.5, 4.5)
    for ax in axes[0, len(maps) + 1:]:
        ax.axis("off")

    ref = np.abs(_slice(true_img, z))
    hi = float(np.percentile(ref[ref > 0], 99.5)) if np.any(ref > 0) else 1.0
    _panel(fig, axes[1, 0], ref, f"frame {frame}: noise-free image", "gray", 0, hi, "|signal| [a.u.]")
    zf = np.abs(_slice(combined, z))
    n_lines = int(sel.sum())
    r_frame = ny * nz / max(n_lines, 1)
    zf_hi = float(np.percentile(zf, 99.5)) or 1.0
    _panel(fig, axes[1, 1], zf, f"frame {frame}: zero-filled, {n_lines} lines (R = {r_frame:.1f})",
           "gray", 0, zf_hi, "|signal| [a.u.]")
    axes[1, 2].imshow(mask, cmap="gray_r", origin="lower", interpolation="nearest", aspect="auto")
    axes[1, 2].set_title(f"frame {frame}: sampled (ky, kz) lines", fontsize=9)
    axes[1, 2].set_xlabel("ky", fontsize=8)
    axes[1, 2].set_ylabel("kz", fontsize=8)
    axes[1, 2].tick_params(labelsize=7)
    for ax in axes[1, 3:]:
        ax.axis("off")
    r_all = f", R = {accel:g} overall" if accel else ""
    fig.suptitle(f"simulated {proto.name}: matrix {nx}x{ny}x{nz}, {lines.n_coils} coils{r_all}; "
                 f"slice z = {z}", fontsize=11)
    _save(fig, path)


def maps_figure(maps: dict, path, truth: dict | None = None, title: str = "") -> None:
    """Maps (central axial slice). With ``truth``: rows truth / reconstruction / |error| (in the
    brain), NRMSE over the brain in the titles."""
    names = [k for k in MAP_NAMES if k in maps] + sorted(k for k in maps if k not in MAP_NAMES)
    if truth is not None:
        names = [k for k in names if k in truth] or names
    if not names:
        raise ValueError("no maps to draw")
    shape = np.asarray(maps[names[0]]).shape
    z = shape[0] // 2 if len(shape) == 3 else None
    rows = 3 if truth is not None else 1
    fig = Figure(figsize=(3.4 * len(names), 3.0 * rows + 0.5), layout="constrained")
    axes = np.asarray(fig.subplots(rows, len(names), squeeze=False))
    brain = None
    if truth is not None:
        brain = np.asarray(truth["labels"]) > 0
    from .metrics import nrmse
    for j, name in enumerate(names):
        est = np.asarray(maps[name], np.float64)
        lo, hi = RANGES.get(name, (float(np.nanpercentile(est, 1)), float(np.nanpercentile(est, 99))))
        unit = UNITS.get(name, "a.u.")
        cmap = CMAPS.get(name, "viridis")
        label = f"{name} [{unit}]"
        if truth is None or name not in truth:
            _panel(fig, axes[0, j], _slice(est, z), f"{name}", cmap, lo, hi, label)
            continue
        ref = np.asarray(truth[name], np.float64)
        note = ""
        if name == "PD":
            est = est * _ls_scale(est, ref, brain)
            note = " (scaled to truth)"
        err = nrmse(est, ref, brain)
        _panel(fig, axes[0, j], _slice(ref, z), f"true {name}", cmap, lo, hi, label)
        _panel(fig, axes[1, j], _slice(est, z), f"reconstructed {name}{note}", cmap, lo, hi, label)
        diff = np.where(brain, np.abs(est - ref), np.nan)
        _panel(fig, axes[2, j], _slice(diff, z), f"|error| {name}: NRMSE {err:.3f} (brain)", "inferno", 0,
               ERROR_RANGES.get(name, hi - lo), f"|error| [{unit}]")
    fig.suptitle((title + "; " if title else "") + (f"slice z = {z}" if z is not None else ""), fontsize=11)
    _save(fig, path)


CONFIDENCE_ORDER = ("T1_SD", "T2_SD", "B1_SD")


def derived_figure(synthetic: dict, confidence: dict, path, maps: dict | None = None,
                   truth_synthetic: dict | None = None, title: str = "") -> None:
    """Synthetic weighted images and confidence maps (central axial slice): a row of the synthetic
    images from the truth (``truth_synthetic``, when given), a row from the reconstruction, and a
    row of the Cramér-Rao SDs (T1, T2, B1) with the undetermined voxels drawn in red over PD
    (``maps``)."""
    names = list(synthetic)
    conf = [k for k in CONFIDENCE_ORDER if k in confidence]
    ncol = max(len(names), len(conf) + 1, 1)
    rows = [r for r in (truth_synthetic, synthetic) if r] + ([confidence] if confidence else [])
    if not rows:
        raise ValueError("nothing to draw")
    fig = Figure(figsize=(3.1 * ncol, 2.9 * len(rows) + 0.5), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), ncol, squeeze=False))
    r = 0
    for label, imgs in (("true", truth_synthetic), ("", synthetic)):
        if not imgs:
            continue
        for j, name in enumerate(names):
            ref = synthetic[name]          # one window per contrast, from the reconstruction
            hi = float(np.percentile(ref[ref > 0], 99.5)) if np.any(ref > 0) else 1.0
            _panel(fig, axes[r, j], _slice(imgs[name]), f"{label} {name}".strip(), "gray", 0, hi, "a.u.")
        for ax in axes[r, len(names):]:
            ax.axis("off")
        r += 1
    if confidence:
        flagged = np.asarray(confidence.get("UNDETERMINED", 0)) > 0
        for j, name in enumerate(conf):
            vol = np.asarray(confidence[name], np.float64)
            v = vol[(vol > 0) & ~flagged]          # the window from the determined voxels
            hi = float(np.percentile(v, 98)) if v.size else 1.0
            unit = "fraction" if name == "B1_SD" else "ms"
            _panel(fig, axes[r, j], _slice(vol), f"{name[:2]} SD (Cramér-Rao)", "inferno", 0, hi, unit)
        ax = axes[r, len(conf)]
        base = _slice(maps["PD"]) if maps is not None and "PD" in maps else np.zeros_like(_slice(vol))
        _panel(fig, ax, base, "undetermined (red)", "gray", 0, 1.2, "PD [a.u.]")
        flag = _slice(confidence.get("UNDETERMINED", np.zeros_like(vol)))
        from matplotlib.colors import ListedColormap
        ax.imshow(np.ma.masked_where(flag <= 0, flag), cmap=ListedColormap(["red"]), vmin=0, vmax=1,
                  origin="lower", interpolation="nearest", alpha=0.7)
        for ax in axes[r, len(conf) + 1:]:
            ax.axis("off")
    z = np.asarray(next(iter(synthetic.values()) if synthetic else confidence[conf[0]])).shape[0] // 2
    fig.suptitle((title + "; " if title else "") + f"slice z = {z}", fontsize=11)
    _save(fig, path)


def derived_figure_of_images(images, path, maps: dict | None = None, truth: dict | None = None,
                             title: str = "") -> bool:
    """:func:`derived_figure` of the synthetic images and confidence maps among ISMRMRD ``images``
    (with ``truth``: the same synthetic contrasts from the true maps, from each image's
    LOREIN_Timing); False, and no figure, when there are none. A multi-volume stream: the first volume."""
    from .io import map_images
    from .recon import synthetic
    images = next(iter(map_images.split_volumes(images).values()), [])
    synth = map_images.images_to_maps(images, "synthetic")
    conf = map_images.images_to_maps(images, "confidence")
    if not synth and not conf:
        return False
    true_synth = None
    if truth is not None and synth:
        timings = {m.meta["LOREIN_Map"]: tuple(float(v) for v in str(m.meta["LOREIN_Timing"]).split(","))
                   for m in images if m.meta.get("LOREIN_Kind") == "synthetic"}
        true_synth = synthetic.synthetic_images(truth, timings)
    derived_figure(synth, conf, path, maps=maps, truth_synthetic=true_synth, title=title)
    return True

