"""Multiresolution hash encoding (Mueller et al., Instant-NGP, 2022) in plain PyTorch, and the small
coordinate networks built on it.

The reconstruction always evaluates the networks on the same voxel centres, so the corner indices and
trilinear weights of every level are computed once (``HashGridEncoding.precompute``) and each step is
a gather and a weighted sum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

PRIMES = (1, 2654435761, 805459861)


@dataclass
class HashGridConfig:
    levels: int = 12
    features: int = 2
    log2_table: int = 17
    base_resolution: int = 4
    finest_resolution: int = 64
    hidden: int = 64
    hidden_layers: int = 2


class HashGridEncoding(nn.Module):
    def __init__(self, cfg: HashGridConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        L, T, Fdim = cfg.levels, 2 ** cfg.log2_table, cfg.features
        growth = math.exp((math.log(cfg.finest_resolution) - math.log(cfg.base_resolution))
                          / max(L - 1, 1))
        self.resolutions = [int(math.floor(cfg.base_resolution * growth ** level)) for level in range(L)]
        self.sizes = [min(T, (r + 1) ** 3) for r in self.resolutions]
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter((torch.rand(L, T, Fdim, generator=g) * 2 - 1) * 1e-4)
        self._idx = None
        self._w = None

    @property
    def out_dim(self) -> int:
        return self.cfg.levels * self.cfg.features

    def corners(self, coords: torch.Tensor):
        """Flat table indices (L, N, 8) and trilinear weights (L, N, 8) of coords in [0, 1]^3."""
        idx_all, w_all = [], []
        offs = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], device=coords.device)
        for level, (res, size) in enumerate(zip(self.resolutions, self.sizes)):
            pos = coords * res
            base = pos.floor().long().clamp(0, res - 1)
            frac = pos - base
            c = base[:, None, :] + offs[None]                            # N, 8, 3
            w = torch.where(offs[None].bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)
            if (res + 1) ** 3 <= size:
                idx = (c[..., 0] * (res + 1) + c[..., 1]) * (res + 1) + c[..., 2]
            else:
                idx = (c[..., 0] * PRIMES[0]) ^ (c[..., 1] * PRIMES[1]) ^ (c[..., 2] * PRIMES[2])
                idx = idx % size
            idx_all.append(idx + level * self.table.shape[1])
            w_all.append(w)
        return torch.stack(idx_all), torch.stack(w_all)

    def precompute(self, coords: torch.Tensor):
        self._idx, self._w = self.corners(coords)

    def forward(self, coords: torch.Tensor | None = None) -> torch.Tensor:
        if coords is None:
            idx, w = self._idx, self._w
        else:
            idx, w = self.corners(coords)
        flat = self.table.reshape(-1, self.table.shape[-1])
        feats = (flat[idx] * w[..., None]).sum(2)                         # L, N, F
        return feats.permute(1, 0, 2).reshape(idx.shape[1], -1)


class CoordinateNet(nn.Module):
    """Hash-grid encoding followed by a small ReLU MLP. ``offset()`` (after ``precompute``)
    records the initial output; ``forward`` returns the change since then, so a network added to
    an initial estimate starts exactly at that estimate while every layer receives gradients from
    the first step (a zero last layer would starve the hash tables and hidden layers)."""

    def __init__(self, out_dim: int, cfg: HashGridConfig | None = None, seed: int = 0):
        super().__init__()
        cfg = cfg or HashGridConfig()
        torch.manual_seed(seed)
        self.encoding = HashGridEncoding(cfg, seed)
        layers, width = [], self.encoding.out_dim
        for _ in range(cfg.hidden_layers):
            layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
            width = cfg.hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, out_dim))
        self.register_buffer("u0", torch.zeros(0))

    def precompute(self, coords):
        self.encoding.precompute(coords)
        with torch.no_grad():
            self.u0 = self.mlp(self.encoding())

    def forward(self, coords=None):
        out = self.mlp(self.encoding(coords))
        return out - self.u0 if coords is None and self.u0.numel() else out
