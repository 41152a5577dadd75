"""The two blocks of LoREIN as torch modules: PMR (a coordinate network giving bounded parameter maps,
turned into subspace coefficients by the sequence's signal table), LRR (a coordinate network giving
each voxel's K subspace coefficients) and the jointly refined coil maps; plus the hash-grid choices
and the voxel <-> volume helpers they share. The fit that ties them together is :mod:`.fit`."""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from ...fft import ifftnc
from ...physics.subspace import SubspaceModel
from .hashgrid import CoordinateNet, HashGridConfig

if TYPE_CHECKING:
    from .fit import FitConfig

def _p99(x: torch.Tensor) -> float:
    """99th percentile; torch.quantile refuses more than 2**24 elements, so large inputs are
    subsampled with a fixed stride (deterministic)."""
    flat = x.reshape(-1)
    step = -(-flat.numel() // 2 ** 24)
    return float(flat[::step].float().quantile(0.99))


def _logit(p):
    p = p.clamp(1e-4, 1 - 1e-4)
    return torch.log(p) - torch.log1p(-p)


def map_coefficients(sub: SubspaceModel, maps: dict) -> torch.Tensor:
    """Subspace coefficients PD * U^H s(T1, T2, B1) of per-voxel maps (t1, t2, b1, pd): (N, K)."""
    return maps["pd"][:, None] * sub.coefficients(maps["t1"], maps["t2"], maps["b1"])


class PMR(torch.nn.Module):
    """Parameter maps from a coordinate network, bounded, initialised at given maps. B1, a smooth
    transmit field, comes from a coarse trilinear control grid (``b1_grid`` points per axis) rather
    than from the network when ``b1_grid`` > 0: the fine detail a network could give it is noise."""

    def __init__(self, sub: SubspaceModel, init: dict, encodes_b1: bool, cfg: HashGridConfig, seed,
                 b1_grid: int = 0):
        super().__init__()
        self.sub = sub
        self.encodes_b1 = encodes_b1
        self.lo = dict(t1=math.log(sub.t1[0]), t2=math.log(sub.t2[0]), b1=float(sub.b1[0]))
        self.hi = dict(t1=math.log(sub.t1[-1]), t2=math.log(sub.t2[-1]), b1=float(sub.b1[-1]))
        pd = init["pd"]
        self.pd_max = _p99(pd.abs()) * 2 + 1e-30
        z = dict(t1=_logit((init["t1"].log() - self.lo["t1"]) / (self.hi["t1"] - self.lo["t1"])),
                 t2=_logit((init["t2"].log() - self.lo["t2"]) / (self.hi["t2"] - self.lo["t2"])),
                 pd=_logit(pd.abs() / self.pd_max))
        if encodes_b1 and sub.b1[-1] > sub.b1[0]:
            z["b1"] = _logit((init["b1"] - self.lo["b1"]) / (self.hi["b1"] - self.lo["b1"]))
        self.register_buffer("z0", torch.stack([z[k] for k in sorted(z)], -1))
        self.keys = sorted(z)
        self.register_buffer("phase0", torch.angle(pd))
        self.net = CoordinateNet(len(self.keys) + 1, cfg, seed)
        self.b1_grid = torch.nn.Parameter(torch.zeros(1, 1, b1_grid, b1_grid, b1_grid)) \
            if ("b1" in z and b1_grid) else None
        self.register_buffer("grid_coords", torch.zeros(0))

    def set_coords(self, coords: torch.Tensor):
        """Voxel coordinates in [0, 1]^3 (z, y, x) for the B1 control grid."""
        self.grid_coords = (coords * 2 - 1).flip(-1).reshape(1, -1, 1, 1, 3)

    def forward(self):
        u = self.net()
        z = self.z0 + u[:, :-1]
        if self.b1_grid is not None:      # B1's column: smoothed start + coarse grid, not the network
            i = self.keys.index("b1")
            coarse = torch.nn.functional.grid_sample(self.b1_grid, self.grid_coords, mode="bilinear",
                                                     padding_mode="border", align_corners=True)
            z = torch.cat([z[:, :i], (self.z0[:, i] + coarse.reshape(-1))[:, None], z[:, i + 1:]], 1)
        p = {k: torch.sigmoid(z[:, i]) for i, k in enumerate(self.keys)}
        t1 = torch.exp(self.lo["t1"] + (self.hi["t1"] - self.lo["t1"]) * p["t1"])
        t2 = torch.exp(self.lo["t2"] + (self.hi["t2"] - self.lo["t2"]) * p["t2"])
        b1 = (self.lo["b1"] + (self.hi["b1"] - self.lo["b1"]) * p["b1"]) if "b1" in p else torch.ones_like(t1)
        pd = self.pd_max * p["pd"] * torch.exp(1j * (self.phase0 + math.pi * torch.tanh(u[:, -1])))
        return dict(t1=t1, t2=t2, b1=b1, pd=pd)

    def coefficients(self, maps):
        return map_coefficients(self.sub, maps)


class LRR(torch.nn.Module):
    def __init__(self, x0: torch.Tensor, cfg: HashGridConfig, seed):
        super().__init__()
        self.register_buffer("x0", x0)                                 # N, K complex
        self.scale = _p99(x0.abs()) + 1e-30
        self.net = CoordinateNet(2 * x0.shape[1], cfg, seed)

    def forward(self):
        u = self.net()
        k = self.x0.shape[1]
        return self.x0 + self.scale * torch.complex(u[:, :k], u[:, k:])


class CoilRefinement(torch.nn.Module):
    """Sensitivities refined jointly with the networks: S = S0 + E - S0 <S0, E> / |S0|^2, with E
    a smooth correction (the central ``width`` k-space coefficients per axis of every coil, zero
    elsewhere: smoothness kept by the parameterisation). The projection removes E's component
    along S0 at every voxel, so no common profile can move between the coils and PD."""

    def __init__(self, maps0: torch.Tensor, width: int):
        super().__init__()
        c, *shape = maps0.shape
        self.register_buffer("s0", maps0)
        self.register_buffer("s0_norm", (maps0.abs() ** 2).sum(0).clamp_min(1e-12))
        w = [max(1, min(width, n)) for n in shape]
        self.index = tuple(slice(n // 2 - wi // 2, n // 2 - wi // 2 + wi) for n, wi in zip(shape, w))
        self.gain = math.sqrt(math.prod(shape) / math.prod(w))    # a unit coefficient ~ a unit map
        # one parameter per coil: with a coil subset per step, the coils not drawn get no gradient
        # at all (grad None, see skip_coils), so Adam leaves them and their moments alone
        self.coef = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(w, dtype=maps0.dtype, device=maps0.device)) for _ in range(c))

    def skip_coils(self, drawn: torch.Tensor):
        """Drop the (zero) gradients of the coils not in ``drawn`` before the optimiser's step."""
        keep = set(drawn.tolist())
        for i, p in enumerate(self.coef):
            if i not in keep:
                p.grad = None

    def forward(self) -> torch.Tensor:
        k = torch.zeros_like(self.s0)
        k[(slice(None),) + self.index] = torch.stack(list(self.coef))
        e = ifftnc(k) * self.gain
        along = (self.s0.conj() * e).sum(0) / self.s0_norm
        return self.s0 + e - self.s0 * along


def scatter(vox: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """(N, K) voxel values -> (K, nz, ny, nx) images, zero outside the support."""
    img = torch.zeros((vox.shape[1],) + tuple(support.shape), dtype=vox.dtype, device=vox.device)
    img[:, support] = vox.T
    return img


def grid_config(support: torch.Tensor, cfg: FitConfig) -> HashGridConfig:
    """Hash grid and MLP of both networks, from the FitConfig's ``grid_*`` / ``mlp_*`` fields.
    Automatic (0) choices: finest level at ``finest_fraction`` of the matrix (at least 8, and not
    below the base); tables no larger than the voxels can use (at least 2**12, at most 2**19
    entries per level)."""
    finest = cfg.grid_finest or max(8, cfg.grid_base, int(cfg.finest_fraction * max(support.shape)))
    log2_table = cfg.grid_log2_table or \
        int(min(19, max(12, math.ceil(math.log2(max(int(support.sum()), 2))) + 1)))
    return HashGridConfig(levels=cfg.grid_levels, features=cfg.grid_features, log2_table=log2_table,
                          base_resolution=cfg.grid_base, finest_resolution=finest,
                          hidden=cfg.mlp_width, hidden_layers=cfg.mlp_layers)


def lrr_grid_config(grid: HashGridConfig, cfg: FitConfig) -> HashGridConfig:
    """The LRR network's grid in lorein: PMR's, with its finest resolution at ``lrr_finest`` when
    that is set (never below the base; the levels in between follow from base and finest)."""
    finest = max(grid.base_resolution, cfg.lrr_finest or grid.finest_resolution)
    return grid if finest == grid.finest_resolution else \
        dataclasses.replace(grid, finest_resolution=finest)


def support_coords(support: torch.Tensor) -> torch.Tensor:
    """Voxel centres of the support in [0, 1]^3 (z, y, x order), isotropic over the largest axis."""
    idx = torch.nonzero(support).float()
    n = max(support.shape)
    return (idx + 0.5) / n


def map_volumes(m: dict, support: torch.Tensor, encodes_b1: bool) -> dict:
    """Per-voxel maps (t1, t2, pd, b1 over the support) -> named volumes T1, T2, PD (, B1)."""
    names = {"T1": "t1", "T2": "t2", "PD": "pd", **({"B1": "b1"} if encodes_b1 else {})}
    return {k: scatter(m[key][:, None], support)[0] for k, key in names.items()}
