"""Multiresolution hash encoding (Mueller et al., Instant-NGP, 2022) in plain PyTorch, and the small
coordinate networks built on it.

The reconstruction always evaluates the networks on the same voxel centres, so the corner indices and
trilinear weights of every level are computed once (``HashGridEncoding.precompute``) and stored as a
sparse matrix S (points x levels rows, table-entry columns, 8 weights per row) in CSR form, with its
transpose: each step is then one sparse-dense product S @ table forwards and S^T @ grad backwards.
Both are row-wise sums in a fixed order (deterministic, no atomics) and use cuSPARSE / MKL. Measured
against the previous weighted gather (``embedding_bag``) + ``index_add_`` backward: on an H200 at
160x160x128 (2 M voxels, 12 levels) forward + backward per network 32.3 -> 23.0 ms (the iteration
134 -> 114 ms; still only ~7 % of the copy bandwidth, so a fused kernel is the next step); on the
CPU (82 k voxels) the backward 70 -> 8 ms, at 32x32x24 the iteration 121 -> 86 ms. Points given
explicitly (``forward(coords)``) still use the gather. ``precompute`` also keeps only the table
entries those voxels reach (a few % of a level's entries on small volumes): the others never
receive a gradient, so dropping them changes no result but saves the optimiser's and the
gradient's work on them.
"""
from __future__ import annotations

import math
import warnings
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
        self._s = None               # CSR interpolation matrix of the precomputed points, and S^T
        self._st = None
        self._n_points = 0
        self.compact = False

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
            idx_all.append(idx + level * 2 ** self.cfg.log2_table)
            w_all.append(w)
        return torch.stack(idx_all), torch.stack(w_all)

    def precompute(self, coords: torch.Tensor, compact: bool = True):
        """Fix the evaluation points; with ``compact`` the table keeps only the entries they reach
        (sorted, so gradients accumulate in the same order as with the full table). Call before
        building the optimiser: the table parameter is replaced."""
        if self.compact:
            raise RuntimeError("the hash table is already compacted to other points")
        idx, w = self.corners(coords)
        if compact:
            used, inv = torch.unique(idx, return_inverse=True)
            with torch.no_grad():
                table = self.table.reshape(-1, self.table.shape[-1])[used].clone()
            self.table = nn.Parameter(table)
            idx = inv.reshape(idx.shape)
            self.compact = True
        self._n_points = idx.shape[1]
        self._s, self._st = _interpolation_matrices(idx, w, self.table.numel() // self.table.shape[-1])

    def forward(self, coords: torch.Tensor | None = None) -> torch.Tensor:
        flat = self.table.reshape(-1, self.table.shape[-1])
        if coords is None:
            if self._s is None:
                raise RuntimeError("no points: call precompute(coords) or pass coords")
            return _SparseInterpolate.apply(flat, self._s, self._st).view(self._n_points, -1)
        if self.compact:
            raise RuntimeError("a compacted hash table is only evaluated at its precomputed points")
        idx, w = self.corners(coords)
        feats = _Interpolate.apply(flat, idx, w).view(idx.shape[0], idx.shape[1], -1)   # L, N, F
        return feats.permute(1, 0, 2).reshape(idx.shape[1], -1)

    def _apply(self, fn, *args, **kwargs):
        """Module.to / .cuda move the interpolation matrices with the table."""
        out = super()._apply(fn, *args, **kwargs)
        if self._s is not None:
            dev = self.table.device
            self._s, self._st = self._s.to(dev), self._st.to(dev)
        return out


def _interpolation_matrices(idx: torch.Tensor, w: torch.Tensor, n_entries: int):
    """CSR matrices S (N*L x entries; row n*L + l holds point n's 8 corner weights at level l) and
    S^T, from corner indices and weights (L, N, 8). Indices are int32 where they fit."""
    L, N, _ = idx.shape
    dev = idx.device
    col = idx.permute(1, 0, 2).reshape(-1)                      # (N, L, 8): rows n-major, as out
    val = w.permute(1, 0, 2).reshape(-1).contiguous()
    rows = N * L
    itype = torch.int32 if max(col.numel(), n_entries, rows) < 2 ** 31 - 1 else torch.int64
    crow = torch.arange(0, 8 * rows + 1, 8, device=dev, dtype=itype)
    order = torch.argsort(col, stable=True)                    # stable: a fixed summation order
    counts = torch.bincount(col, minlength=n_entries)
    crow_t = torch.zeros(n_entries + 1, dtype=torch.int64, device=dev)
    crow_t[1:] = torch.cumsum(counts, 0)
    row_of = torch.div(order, 8, rounding_mode="floor")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        warnings.filterwarnings("ignore", message=".*[Ss]parse invariant checks.*")
        s = torch.sparse_csr_tensor(crow, col.to(itype), val, (rows, n_entries), check_invariants=False)
        st = torch.sparse_csr_tensor(crow_t.to(itype), row_of.to(itype), val[order], (n_entries, rows),
                                     check_invariants=False)
    return s, st


class _SparseInterpolate(torch.autograd.Function):
    """S @ table forwards, S^T @ grad backwards (precomputed CSR matrices, see the module doc)."""

    @staticmethod
    def forward(ctx, table, s, st):
        ctx.st = st
        return s @ table

    @staticmethod
    def backward(ctx, g):
        return ctx.st @ g.contiguous(), None, None


class _Interpolate(torch.autograd.Function):
    """Weighted sum of 8 table rows per point: ``embedding_bag`` forward (no (L, N, 8, F)
    intermediate) and an ``index_add_`` backward (2-3x faster on CPU than autograd's gather
    backward, and deterministic there)."""

    @staticmethod
    def forward(ctx, table, idx, w):
        ctx.save_for_backward(idx, w)
        ctx.rows = table.shape[0]
        return torch.nn.functional.embedding_bag(idx.reshape(-1, 8), table, mode="sum",
                                                 per_sample_weights=w.reshape(-1, 8))

    @staticmethod
    def backward(ctx, g):
        idx, w = ctx.saved_tensors
        grad = torch.zeros(ctx.rows, g.shape[-1], dtype=g.dtype, device=g.device)
        grad.index_add_(0, idx.reshape(-1), (w.reshape(-1, 8, 1) * g[:, None, :]).reshape(-1, g.shape[-1]))
        return grad, None, None


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
        self.amp_dtype: torch.dtype | None = None    # e.g. torch.bfloat16: autocast the MLP

    def _mlp(self, feats):
        if self.amp_dtype is None:
            return self.mlp(feats)
        with torch.autocast(feats.device.type, dtype=self.amp_dtype):
            return self.mlp(feats).float()

    def precompute(self, coords):
        """Fix the evaluation points (see HashGridEncoding.precompute) and record the initial
        output; set ``amp_dtype`` first, so that the offset is computed in the same precision."""
        self.encoding.precompute(coords)
        with torch.no_grad():
            self.u0 = self._mlp(self.encoding())

    def forward(self, coords=None):
        out = self._mlp(self.encoding(coords))
        return out - self.u0 if coords is None and self.u0.numel() else out
