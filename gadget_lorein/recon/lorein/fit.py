"""The LoREIN fit (arXiv 2506.09100): the LRR and PMR blocks (:mod:`.model`) fitted jointly to the
measured k-space, scan-specifically. Methods: ``lorein`` (both blocks, tied by a coupling term; maps
from PMR, its T2 bounded by the LRR block's, for a long series, from the LRR block matched to the
dictionary for a short one: ``series_defaults``, ``combine_maps``), ``pmr`` (PMR alone), ``lrr``
(LRR alone, then dictionary matching).

Objective, relative to ||y||^2: DC(X_lrr) + DC(X_pmr) + couple_weight * density * ||X_pmr - X_lrr||^2
+ lambda * sum over randomly shifted blocks of ||X_lrr block||_* (short series: the llr baseline's
locally low-rank prior on the LRR block), DC computed in the subspace (operators.py). Start: a linear estimate, matched to the dictionary and
smoothed. Adam on a cosine schedule whose length (``default_iterations``) is the main regulariser;
held-out lines choose the state returned. Deterministic on the CPU for a given seed. docs/design.md
explains each choice and benchmarks/RESULTS.md holds the measurements behind it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import torch

from ...physics.subspace import SubspaceModel
from ...settings import fit_fields
from .. import baselines
from ..operators import SubspaceOperator
from .model import (
    LRR,
    PMR,
    CoilRefinement,
    grid_config,
    lrr_grid_config,
    map_coefficients,
    map_volumes,
    scatter,
    support_coords,
)

log = logging.getLogger(__name__)


@fit_fields
class FitConfig:
    """The fit's knobs. The user-facing ones (couple_weight, coil_subset, amp, coil_refine, the
    grid_* and mlp_* of the networks, lrr_finest) are the fit settings of gadget_lorein/settings.py,
    added as fields with the same defaults by ``fit_fields``; the internal ones are below."""
    iterations: int = 0              # 0: default_iterations(frames); the count is the fit's regulariser
    lr: float = 2e-2
    adam_eps: float = 1e-8           # torch's Adam defaults; Instant-NGP's 1e-15 / 0.99 were
    adam_beta2: float = 0.999        # tried and not kept (module docstring, Optimiser)
    init_cg_iterations: int = 20
    init: str = "cg"          # linear estimate the maps start from: zerofill | cg | llr
    init_llr_iterations: int = 40    # init "llr": FISTA steps of the locally low-rank start
    output: str = "auto"             # maps from: pmr | lrr (LRR coefficients matched) | guard (PMR,
    #                                  but matched LRR where the two disagree by more than ``guard``)
    #                                  | blend (lrr's, with T2 the geometric mean of both blocks' T2)
    #                                  | auto (series_defaults)
    guard: float = 0.4               # output "guard": |log(T_pmr / T_lrr)| above this -> LRR's maps
    t2_cap: float = -1.0             # lorein, output pmr or lrr: T2 at most exp(t2_cap) x the other
    #                                  block's T2 (0: the lower of the two; inf: off; <0: auto)
    t2_cap_depth: float = -1.0       # the cap lowers T2 by at most exp(-t2_cap_depth) (inf: no
    #                                  limit; <0: auto)
    pv_reach: float = -1.0           # lorein, output pmr or lrr: where the other block's T1 is above
    #                                  exp(pv_margin) x this one's and its T2 above exp(pv_margin_t2) x
    #                                  this one's, next to CSF (pv_near_t2), T1 and T2 move up towards
    #                                  the other's by at most exp(pv_reach) (0: off; <0: auto)
    pv_margin: float = -1.0          # (<0: auto)
    pv_margin_t2: float = -1.0       # (<0: auto)
    pv_near_t2: float = 200.0        # "next to CSF": the output block's T2 exceeds this (ms) in a
    #                                  voxel of the 3x3x3 neighbourhood (itself included); 0: anywhere
    patience: int = 40
    tol: float = 1e-4
    # held-out lines (the operator's ``held_out``, see recon's ``holdout``): their loss is checked
    # every ``holdout_every`` steps; a check within ``holdout_tol`` (relative) of the lowest so far
    # is good; the fit returns the state of the last good check and stops when there has been none
    # for ``holdout_patience`` steps (module docstring, Held-out lines)
    holdout_every: int = 20
    holdout_patience: int = 200
    holdout_tol: float = 0.01
    finest_fraction: float = 1.0     # finest hash-grid resolution as a fraction of the matrix
    tv_weight: float = 0.0           # total variation of log T1, log T2 (and B1) maps, per voxel
    init_smooth: float = 2.0         # Gaussian sigma (voxels) on the initial maps; <0 = constant
    b1_grid: int = 6                 # B1 from a coarse control grid of this many points per axis; 0 = network
    b1_smooth: float = 4.0           # separate sigma for the initial B1 map (a smooth field); 0 = init_smooth
    lrr_init: str = "maps"            # LRR start: cg (linear estimate) | maps (the PMR start's coefficients)
    coil_lr: float = 2e-3            # Adam step of the coil-map correction
    llr_weight: float = -1.0         # lorein/lrr: locally low-rank penalty on the LRR block's coefficient
    #                                  images, in units of the llr baseline's lambda (0: off; < 0:
    #                                  series_defaults)
    llr_block: int = 6               # its block size (voxels per axis), randomly shifted each step
    coil_from_lrr: bool = False      # lorein: the LRR data term fits the coil correction too (module
    #                                  docstring, Coil maps: off, PMR's data term alone fits it)


def _smooth_init(init: dict, support: torch.Tensor, sigmas: dict) -> dict:
    """Normalised Gaussian smoothing of log T1, log T2, B1 and complex PD inside the support, each
    with its own sigma (sigma < 0: the support mean)."""
    from scipy.ndimage import gaussian_filter
    sup = support.cpu().numpy()
    w = sup.astype(np.float64)
    norms = {}                    # smoothed support, once per sigma
    out = {}
    for key, val in init.items():
        sigma = sigmas[key]
        v = val.detach().cpu().numpy().astype(np.complex128 if key == "pd" else np.float64)
        if key in ("t1", "t2"):
            v = np.log(v)
        if sigma < 0:
            sm = np.full(v.shape, v.mean())
        else:
            vol = np.zeros(sup.shape, v.dtype)
            vol[sup] = v
            if key == "pd":
                f = gaussian_filter(vol.real, sigma) + 1j * gaussian_filter(vol.imag, sigma)
            else:
                f = gaussian_filter(vol, sigma)
            if sigma not in norms:
                norms[sigma] = np.maximum(gaussian_filter(w, sigma), 1e-6)
            sm = (f / norms[sigma])[sup]
        if key in ("t1", "t2"):
            sm = np.exp(sm)
        out[key] = torch.from_numpy(sm).to(val.device, val.dtype)
    return out


def _tv(maps: dict, support: torch.Tensor) -> torch.Tensor:
    """Mean absolute finite difference of log T1, log T2 (and B1) between support neighbours."""
    total = torch.zeros((), device=support.device)
    for key in ("t1", "t2", "b1"):
        vals = torch.log(maps[key]) if key != "b1" else maps[key]
        vol = torch.zeros(support.shape, dtype=vals.dtype, device=vals.device)
        vol[support] = vals
        for d in range(3):
            both = support.narrow(d, 1, support.shape[d] - 1) & support.narrow(d, 0, support.shape[d] - 1)
            diff = vol.narrow(d, 1, vol.shape[d] - 1) - vol.narrow(d, 0, vol.shape[d] - 1)
            total = total + diff[both].abs().sum()
    return total / support.sum()


class HeldOutRule:
    """When to keep a state and when to stop, from the held-out losses of successive checks: a
    check within ``tol`` (relative) of the lowest loss so far is good and its state is kept
    ("keep"); once no check has been good for ``patience`` steps, "stop"; else None."""

    def __init__(self, tol: float, patience: int):
        self.tol, self.patience = tol, patience
        self.lowest, self.kept = float("inf"), 0

    def update(self, step: int, loss: float) -> str | None:
        self.lowest = min(self.lowest, loss)
        if loss <= self.lowest * (1 + self.tol):
            self.kept = step
            return "keep"
        return "stop" if step - self.kept >= self.patience else None


def fit(method: str, op: SubspaceOperator, sub: SubspaceModel, support: torch.Tensor,
        encodes_b1: bool, iterations: int = 0, seed: int = 0, progress=None,
        config: FitConfig | None = None, monitor=None, blocks: dict | None = None) -> tuple[dict, dict]:
    """Fit ``method`` (lorein | pmr | lrr); returns (maps, info). On the CPU the fit uses
    deterministic kernels (the hash tables' gradient accumulation is otherwise order-dependent
    across threads), so a seed gives bit-identical maps. With held-out lines (``op.held_out``)
    the maps are those of the last check within ``holdout_tol`` of the lowest held-out loss
    (``info["held_out_step"]``). ``monitor(step, losses,
    maps)``, if given, is called at every held-out check with the held-out losses ({"pmr": ...,
    "lrr": ...}, the blocks fitted) and the per-voxel maps (PMR's, or the LRR coefficients for lrr),
    for studies of the stopping rule. ``blocks``, if given (a dict), receives both blocks' final
    per-voxel maps ("pmr" and, matched, "lrr") for studies of the output rule (``combine_maps``)."""
    previous = torch.are_deterministic_algorithms_enabled()
    if op.device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        return _fit(method, op, sub, support, encodes_b1, iterations, seed, progress, config, monitor,
                    blocks)
    finally:
        torch.use_deterministic_algorithms(previous)


SHORT_SERIES = 32      # frames: a series this short (qalas-type) takes the short-series defaults


def series_defaults(n_frames: int) -> dict:
    """The fit's defaults that depend on the series length ("auto" in FitConfig). A short series
    (a few contrasts) encodes each voxel weakly: at scanner-like SNR and with partial volume the
    PMR block reaches for the ends of its range in mixed voxels, so the maps come from the LRR
    block's coefficients, matched to the dictionary, and the LRR block carries a locally low-rank
    penalty (the llr baseline's prior on a network's output); PMR only nudges them (T2 down by at
    most 5 %, T1 and T2 up by at most 15 % next to CSF where both of PMR's are 5 % higher:
    ``combine_maps``). A
    long series (MRF-type) encodes T1 and T2 well enough for the physics block, whose maps are the
    output; the penalty and the LRR output cost accuracy there, and PMR's T2 is capped by the LRR
    block's (``t2_cap`` 0): next to the CSF it reaches for CSF-like values that the LRR
    coefficients do not support. The other way round, next to CSF, where the LRR block's T1 is
    above exp(0.4) (1.5) x PMR's and its T2 above e x PMR's, T1 and T2 are the LRR block's: a voxel
    that holds much CSF, which PMR's smooth maps give a tissue's values. docs/design.md gives the
    measurements."""
    if n_frames <= SHORT_SERIES:
        return dict(output="lrr", llr_weight=2.0, t2_cap=0.0, t2_cap_depth=0.05, pv_reach=0.15,
                    pv_margin=0.05, pv_margin_t2=0.05)
    return dict(output="pmr", llr_weight=0.0, t2_cap=0.0, t2_cap_depth=math.inf, pv_reach=math.inf,
                pv_margin=0.4, pv_margin_t2=1.0)


def default_iterations(n_frames: int) -> int:
    """Steps of the cosine schedule when none are asked for. On realistic scans (partial volume,
    an unmodelled transmit field, SNR 15-30) the maps get worse past a few hundred steps while the
    held-out loss still falls: the networks fit model error, which the held-out lines share. A
    short schedule is the regulariser; long series (MRF) carry more data per voxel and take more
    steps before that point (docs/design.md, benchmarks/RESULTS.md)."""
    return 200 if n_frames <= SHORT_SERIES else 400


OUTPUTS = ("pmr", "lrr", "blend", "guard")


def near_csf(t2: torch.Tensor, support: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per support voxel: does a voxel of its 3x3x3 neighbourhood (itself included) have a T2
    (per-voxel ``t2`` over ``support``) above ``threshold`` ms? Partial volume with CSF happens
    only there; threshold 0: every voxel."""
    if threshold <= 0:
        return torch.ones_like(t2, dtype=torch.bool)
    vol = torch.zeros(support.shape, dtype=t2.dtype, device=t2.device)
    vol[support] = t2
    near = torch.nn.functional.max_pool3d(vol[None, None], 3, stride=1, padding=1)[0, 0]
    return near[support] > threshold


def combine_maps(output: str, m: dict, ml: dict, cfg: FitConfig, support: torch.Tensor) -> dict:
    """The maps of a lorein fit from PMR's per-voxel maps ``m`` and the LRR block's matched ones
    ``ml`` (both over ``support``), by ``output`` and FitConfig's (resolved) ``pv_*``, ``t2_cap``
    and ``t2_cap_depth``. For output pmr or lrr, that block's maps, then: where the other block's
    T1 is above this one's by more than exp(pv_margin), its T2 by more than exp(pv_margin_t2), and
    the voxel is next to CSF (``near_csf`` on this block's T2: partial volume with CSF, the one
    compartment long in both), T1 and T2 move up towards the other's by at most exp(pv_reach);
    T2 is at most exp(t2_cap) x the other block's, lowered by at most
    exp(-t2_cap_depth) (docs/design.md, "Output: one block's maps, bounded by the other's")."""
    if output in ("pmr", "lrr"):
        base, other = (m, ml) if output == "pmr" else (ml, m)
        out = dict(base)
        o1, o2 = (other[k].to(base[k].dtype) for k in ("t1", "t2"))
        if cfg.pv_reach > 0:
            up = (o1 > base["t1"] * math.exp(cfg.pv_margin)) & (o2 > base["t2"] * math.exp(cfg.pv_margin_t2))
            up &= near_csf(base["t2"], support, cfg.pv_near_t2)
            for k, o in (("t1", o1), ("t2", o2)):
                out[k] = torch.where(up, torch.minimum(o, base[k] * math.exp(cfg.pv_reach)), base[k])
            log.info("lorein: T1 and T2 of %d of %d voxels raised towards the other block's",
                     int(up.sum()), up.numel())
        if math.isfinite(cfg.t2_cap):
            cap = o2 * math.exp(cfg.t2_cap)
            if math.isfinite(cfg.t2_cap_depth):
                cap = torch.maximum(cap, base["t2"] * math.exp(-cfg.t2_cap_depth))
            log.info("lorein: T2 of %d of %d voxels capped by the other block's",
                     int((out["t2"] > cap).sum()), cap.numel())
            out["t2"] = torch.minimum(out["t2"], cap)
        return out
    if output == "blend":        # two partly independent T2 estimates, averaged in log
        return dict(ml, t2=(ml["t2"] * m["t2"].to(ml["t2"].dtype)).sqrt())
    if output == "guard":
        off = ((m["t1"] / ml["t1"]).log().abs() > cfg.guard) | ((m["t2"] / ml["t2"]).log().abs() > cfg.guard)
        log.info("lorein: %d of %d voxels from the LRR block (guard %g)", int(off.sum()), off.numel(),
                 cfg.guard)
        return {k: torch.where(off, ml[k].to(m[k].dtype), m[k]) for k in m}
    raise ValueError(f"unknown output {output!r}: one of {', '.join(OUTPUTS)}")


def _fit(method, op, sub, support, encodes_b1, iterations, seed, progress, config, monitor=None,
         blocks=None):
    cfg = config or FitConfig()
    n_frames = sub.basis.shape[0]
    iterations = iterations or cfg.iterations or default_iterations(n_frames)
    auto = series_defaults(n_frames)
    output = auto["output"] if cfg.output == "auto" else cfg.output
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}: auto or one of {', '.join(OUTPUTS)}")
    llr_weight = auto["llr_weight"] if cfg.llr_weight < 0 else cfg.llr_weight
    for knob in ("t2_cap", "t2_cap_depth", "pv_reach", "pv_margin", "pv_margin_t2"):
        if getattr(cfg, knob) < 0:
            cfg = dataclasses.replace(cfg, **{knob: auto[knob]})
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if cfg.init == "cg":
        x_lin = baselines.cg_recon(op, iters=cfg.init_cg_iterations)
    elif cfg.init == "llr":
        x_lin = baselines.llr_recon(op, iters=cfg.init_llr_iterations, seed=seed)
    else:
        x_lin = baselines.zero_filled(op)
    x0 = x_lin[:, support].T.contiguous()                               # N, K
    init = sub.match(x0)
    init = {k: v.to(op.device) for k, v in init.items()}
    if cfg.init_smooth:
        sigmas = {k: cfg.init_smooth for k in init}
        sigmas["b1"] = cfg.b1_smooth or cfg.init_smooth
        init = _smooth_init(init, support, sigmas)
    grid = grid_config(support, cfg)
    coords = support_coords(support)
    density = op.mean_density
    y2 = max(op.y_norm2, 1e-30)

    use_pmr = method in ("lorein", "pmr")
    use_lrr = method in ("lorein", "lrr")
    pmr = PMR(sub, init, encodes_b1, grid, seed, cfg.b1_grid).to(op.device) if use_pmr else None
    if pmr is not None:
        pmr.set_coords(coords)
    if use_lrr and cfg.lrr_init == "maps":
        with torch.no_grad():
            x0 = map_coefficients(sub, init)
    lrr = LRR(x0, lrr_grid_config(grid, cfg) if use_pmr else grid, seed + 1).to(op.device) \
        if use_lrr else None
    params = []
    for m in (pmr, lrr):
        if m is not None:
            m.net.amp_dtype = torch.bfloat16 if cfg.amp else None
            m.net.precompute(coords)
            params += list(m.parameters())
    coil_model = CoilRefinement(op.maps, cfg.coil_refine) if cfg.coil_refine else None
    n_coils = op.maps.shape[0]
    subset = cfg.coil_subset if 0 < cfg.coil_subset < n_coils else 0
    coil_gen = torch.Generator().manual_seed(seed + 2)
    groups = [dict(params=params)]
    if coil_model is not None:
        groups.append(dict(params=list(coil_model.parameters()), lr=cfg.coil_lr))
    opt = torch.optim.Adam(groups, lr=cfg.lr, eps=cfg.adam_eps, betas=(0.9, cfg.adam_beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, iterations) / iterations)))
    held = getattr(op, "held_out", None)
    modules = [m for m in (pmr, lrr, coil_model) if m is not None]

    def snapshot():
        return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]

    def held_loss(step):
        """Held-out loss of the block the maps come from (PMR, or LRR alone), relative to the
        held-out lines' ||y||^2; in lorein the LRR block's too, for the record."""
        with torch.no_grad():
            s_maps = coil_model() if coil_model is not None else op.maps
            rel = lambda v: held.loss(scatter(v, support), s_maps) / max(held.y_norm2, 1e-30)  # noqa: E731
            losses = {}
            if use_pmr:
                shown = pmr()
                losses["pmr"] = rel(pmr.coefficients(shown))
            if use_lrr:
                x_ = lrr()
                losses["lrr"] = rel(x_)
                if not use_pmr:
                    shown = x_
        if monitor:
            monitor(step, losses, shown)
        held_log.append((step, losses))
        return losses["pmr" if use_pmr else "lrr"]

    llr_lam, llr_gen = 0.0, torch.Generator().manual_seed(seed + 3)
    if use_lrr and llr_weight:
        # the llr baseline minimises ||Ax-y||^2/2 + lam sum ||X_b||_*; data_loss is ||Ax-y||^2
        llr_lam = 2 * llr_weight * baselines.llr_lambda(op, cfg.llr_block)

    def llr_penalty(x_vox):
        vol = scatter(x_vox, support)
        shift = tuple(int(v) for v in torch.randint(0, cfg.llr_block, (3,), generator=llr_gen))
        blocks = baselines.block_matrices(torch.roll(vol, shifts=shift, dims=(1, 2, 3)), cfg.llr_block)
        return torch.linalg.svdvals(blocks).sum()

    rule = HeldOutRule(cfg.holdout_tol, cfg.holdout_patience)
    held_state, held_log = None, []
    if held is not None:
        rule.update(0, held_loss(0))
        held_state = snapshot()
    lrr_coils_fixed = use_pmr and not cfg.coil_from_lrr   # lorein: PMR's data term alone fits the coils
    best, best_it, history = float("inf"), 0, []
    for it in range(iterations):
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=op.device)
        coils = None
        if subset:           # one random subset of the coils for both data terms of this step
            coils = torch.randperm(n_coils, generator=coil_gen)[:subset].sort().values.to(op.device)
        maps = coil_model() if coil_model is not None else None
        if use_lrr:
            x = lrr()
            loss = loss + op.data_loss(scatter(x, support), coils,
                                       maps.detach() if maps is not None and lrr_coils_fixed else maps) / y2
        if llr_lam:
            loss = loss + llr_lam * llr_penalty(x) / y2
        if use_pmr:
            pm = pmr()
            xp = pmr.coefficients(pm)
            loss = loss + op.data_loss(scatter(xp, support), coils, maps) / y2
        if use_pmr and cfg.tv_weight:
            loss = loss + cfg.tv_weight * _tv(pm, support)
        if use_lrr and use_pmr:
            loss = loss + cfg.couple_weight * density * (xp - x).abs().pow(2).sum() / y2
        loss.backward()
        if coil_model is not None and coils is not None:
            coil_model.skip_coils(coils)
        opt.step()
        sched.step()
        val = float(loss.detach())
        history.append(val)
        if progress:
            progress(it + 1, iterations, val)
        if held is not None and ((it + 1) % cfg.holdout_every == 0 or it + 1 == iterations):
            verdict = rule.update(it + 1, held_loss(it + 1))
            if verdict == "keep":
                held_state = snapshot()
            elif verdict == "stop":
                log.info("lorein: held-out loss more than %g above its lowest since step %d: stopped "
                         "at %d, maps of step %d", cfg.holdout_tol, rule.kept, it + 1, rule.kept)
                break
        if val < best * (1 - cfg.tol):
            best, best_it = val, it
        elif it - best_it > cfg.patience and not subset:    # a coil subset's loss is noisy: no
            # early stop on it (seen on an H200: it stopped at 56 of 300 steps, maps much worse)
            log.info("lorein: converged after %d iterations (loss %.6g)", it + 1, val)
            break
    if held_state is not None:            # back to the state the held-out lines liked best
        for m, state in zip(modules, held_state):
            m.load_state_dict(state)
    with torch.no_grad():
        m = pmr() if use_pmr else sub.match(lrr())   # maps from PMR, or matched LRR coefficients
        if use_pmr and use_lrr:                      # lorein: the output rule sees both blocks
            ml = sub.match(lrr())
            if blocks is not None:
                blocks.update(pmr=m, lrr=ml)
            m = combine_maps(output, m, ml, cfg, support)
        maps = map_volumes(m, support, encodes_b1)
    info = dict(iterations=len(history), final_loss=history[-1] if history else None,
                fit_seconds=time.perf_counter() - t0, voxels=int(support.sum()))
    if held is not None:
        info.update(held_out_lines=held.n_lines, held_out_step=rule.kept,
                    held_out_steps=[step for step, _ in held_log],
                    **{f"held_out_loss_{k}": [round(v[k], 6) for _, v in held_log] for k in held_log[0][1]})
    return maps, info
