"""Dictionary, temporal subspace and the subspace signal table.

The dictionary is the signal model evaluated on the protocol's regular (T1, T2, B1) grid (T1 and
T2 log-spaced). Its first K right singular vectors form the temporal basis U (frames x K, orthonormal
columns): a time course s is represented by its coefficients alpha = U^H s and s ~ U alpha.
The captured energy sum_{k<K} sigma_k^2 / sum sigma^2 over the unit-norm atoms (with T2 <= T1) equals
one minus their mean squared relative projection error.

``SubspaceModel.coefficients(t1, t2, b1)`` interpolates U^H s(T1, T2, B1) from the table (trilinear in
log T1, log T2, B1; differentiable), so a parameter-map network costs the same for 5 or 500 frames.
``SubspaceModel.match`` is dictionary matching in the subspace.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import cache, sequences
from .protocol import Protocol

log = logging.getLogger(__name__)


def grid_axes(proto: Protocol) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = proto["dictionary"]
    t1 = np.geomspace(d["t1_ms"][0], d["t1_ms"][1], int(d["t1_ms"][2]))
    t2 = np.geomspace(d["t2_ms"][0], d["t2_ms"][1], int(d["t2_ms"][2]))
    if proto.encodes_b1:
        b1 = np.linspace(d["b1"][0], d["b1"][1], int(d["b1"][2]))
    else:
        b1 = np.array([1.0])
    return t1, t2, b1


def simulate_dictionary(proto: Protocol, device="cpu", chunk=8192) -> torch.Tensor:
    """Signals on the full grid: complex64 tensor (n_b1, n_t2, n_t1, n_frames)."""
    t1, t2, b1 = grid_axes(proto)
    B, T2, T1 = np.meshgrid(b1, t2, t1, indexing="ij")
    flat = [torch.tensor(a.ravel(), dtype=torch.float32, device=device) for a in (T1, T2, B)]
    out = [sequences.signal(proto, flat[0][i:i + chunk], flat[1][i:i + chunk], flat[2][i:i + chunk])
           for i in range(0, flat[0].numel(), chunk)]
    return torch.cat(out).reshape(len(b1), len(t2), len(t1), -1)


def temporal_basis(atoms: torch.Tensor, rank: int | None = None, energy: float = 0.999):
    """Rank-K basis of the rows of ``atoms`` (N x T), each normalised to unit norm first.

    Returns (U: T x K complex64, captured energy, all normalised singular values squared)."""
    a = atoms.to(torch.complex128)
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    gram = a.conj().T @ a                       # T x T: its eigenvectors are the right singular vectors
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    frac = torch.cumsum(evals, 0) / evals.sum()
    if rank is None or rank <= 0:
        rank = int(torch.searchsorted(frac, torch.tensor(energy, dtype=frac.dtype)).item()) + 1
    rank = min(rank, atoms.shape[-1])
    return evecs[:, :rank].to(torch.complex64), float(frac[rank - 1]), (evals / evals.sum()).float()


@dataclass
class SubspaceModel:
    basis: torch.Tensor          # (T, K) complex64
    energy: float                # captured energy of the valid unit-norm atoms
    table: torch.Tensor          # (n_b1, n_t2, n_t1, K) complex64: U^H s on the grid
    t1: np.ndarray
    t2: np.ndarray
    b1: np.ndarray
    protocol_hash: str

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def to(self, device) -> "SubspaceModel":
        return SubspaceModel(self.basis.to(device), self.energy, self.table.to(device), self.t1,
                             self.t2, self.b1, self.protocol_hash)

    # -- differentiable signal table --------------------------------------------------------
    def _norm_coords(self, t1, t2, b1):
        def norm(v, lo, hi):
            return 2 * (v - lo) / (hi - lo) - 1 if hi > lo else torch.zeros_like(v)
        x = norm(torch.log(t1), np.log(self.t1[0]), np.log(self.t1[-1]))
        y = norm(torch.log(t2), np.log(self.t2[0]), np.log(self.t2[-1]))
        z = norm(b1, self.b1[0], self.b1[-1])
        return torch.stack([x, y, z], dim=-1)

    def coefficients(self, t1, t2, b1=None) -> torch.Tensor:
        """U^H s(T1, T2, B1) for unit PD, interpolated: (..., K) complex64."""
        if b1 is None:
            b1 = torch.ones_like(t1)
        shape = t1.shape
        coords = self._norm_coords(t1.reshape(-1), t2.reshape(-1), b1.reshape(-1))
        tab = self.table
        vol = torch.cat([tab.real, tab.imag], dim=-1).permute(3, 0, 1, 2)[None]  # 1,2K,B,T2,T1
        if vol.shape[2] == 1:  # no B1 axis: duplicate so that trilinear sampling works
            vol = vol.expand(-1, -1, 2, -1, -1)
        out = F.grid_sample(vol, coords.view(1, -1, 1, 1, 3).to(vol.dtype), mode="bilinear",
                            padding_mode="border", align_corners=True)[0, :, :, 0, 0]  # 2K, V
        k = self.rank
        return torch.complex(out[:k], out[k:]).T.reshape(*shape, k)

    def _grid(self):
        """(T1, T2, B1) of every table entry in the table's order, and the valid atoms (T2 <= T1)."""
        B, T2, T1 = (a.ravel() for a in np.meshgrid(self.b1, self.t2, self.t1, indexing="ij"))
        return T1, T2, B, T2 <= T1

    def coefficient_covariance(self) -> np.ndarray:
        """E[c c^H] (K x K, complex128) over the valid atoms for unit PD: the prior of the
        calibration's minimum-mean-square estimate where a location has too few frames."""
        valid = self._grid()[3]
        atoms = self.table.reshape(-1, self.rank).cpu().numpy()[valid].astype(np.complex128)
        return atoms.T @ atoms.conj() / len(atoms)

    # -- dictionary matching -----------------------------------------------------------------
    def match(self, coeffs: torch.Tensor, chunk: int = 4096) -> dict[str, torch.Tensor]:
        """Best atom for each row of ``coeffs`` (V x K): returns t1, t2, b1 (float) and pd (complex)."""
        T1, T2, B, valid = self._grid()
        atoms = self.table.reshape(-1, self.rank)[torch.from_numpy(valid).to(self.table.device)]
        norms = atoms.norm(dim=-1).clamp_min(1e-12)
        unit = (atoms / norms[:, None]).conj().T   # K x N
        idx, inner = [], []
        x = coeffs.to(self.table.device, torch.complex64)
        for i in range(0, x.shape[0], chunk):
            c = x[i:i + chunk] @ unit
            j = c.abs().argmax(dim=1)
            idx.append(j)
            inner.append(c.gather(1, j[:, None])[:, 0])
        j = torch.cat(idx)
        par = [torch.from_numpy(a[valid]).float().to(j.device) for a in (T1, T2, B)]
        return dict(t1=par[0][j], t2=par[1][j], b1=par[2][j], pd=torch.cat(inner) / norms[j])


def default_cache_dir() -> Path:
    return cache.default_dir()


def build_subspace(proto: Protocol, rank: int | None = None, energy: float = 0.999,
                   device="cpu", cache_dir: Path | str | None = "default") -> SubspaceModel:
    """Dictionary -> basis -> table; cached on disk (physics/cache.py: key = hash of the protocol,
    rank, energy and code version; plain .npz arrays, nothing unpickled)."""
    folder = None if cache_dir is None else (default_cache_dir() if cache_dir == "default" else Path(cache_dir))
    k = cache.key(proto.params, rank, energy)
    if folder is not None:
        d = cache.load(folder, k)
        if d is not None:
            try:
                return SubspaceModel(torch.from_numpy(d["basis"]).to(device), float(d["energy"]),
                                     torch.from_numpy(d["table"]).to(device), d["t1"], d["t2"], d["b1"],
                                     str(d["protocol_hash"]))
            except KeyError as err:
                log.warning("subspace cache: entry without %s; rebuilding", err)
    t0 = time.perf_counter()
    atoms = simulate_dictionary(proto, device=device)
    t1, t2, b1 = grid_axes(proto)
    B, T2, T1 = np.meshgrid(b1, t2, t1, indexing="ij")
    valid = torch.from_numpy((T2 <= T1).ravel()).to(atoms.device)
    flat = atoms.reshape(-1, atoms.shape[-1])
    basis, captured, _ = temporal_basis(flat[valid], rank, energy)
    basis = basis.to(atoms.device)
    table = (flat @ basis.conj()).reshape(*atoms.shape[:3], -1)
    model = SubspaceModel(basis, captured, table, t1, t2, b1, proto.hash)
    log.info("subspace: %s, %d atoms x %d frames, rank %d captures %.6f of the energy (%.1f s)",
             proto.name, flat.shape[0], flat.shape[1], basis.shape[1], captured,
             time.perf_counter() - t0)
    if folder is not None:
        cache.store(folder, k, {"basis": basis.cpu().numpy(), "energy": np.float64(captured),
                                "table": table.cpu().numpy(), "t1": t1, "t2": t2, "b1": b1,
                                "protocol_hash": np.array(proto.hash),
                                "label": np.array(str(proto.name)[:200])})
    return model
