"""Linear subspace reconstructions followed by dictionary matching (the baselines, and LoREIN's
initialisation): zero-filled, CG least squares, and locally-low-rank regularised (FISTA)."""
from __future__ import annotations

import logging

import torch

from .operators import SubspaceOperator

log = logging.getLogger(__name__)


def _dot(a, b):
    return torch.vdot(a.reshape(-1), b.reshape(-1))


def cg_solve(op: SubspaceOperator, rhs: torch.Tensor, lam: float, iters: int, x0=None,
             tol: float = 1e-6, progress=None) -> torch.Tensor:
    """Conjugate gradients on (A^H A + lam I) x = rhs."""
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - (op.normal(x) + lam * x)
    p = r.clone()
    rr = _dot(r, r).real
    r0 = float(rr.sqrt())
    for it in range(iters):
        ap = op.normal(p) + lam * p
        alpha = rr / _dot(p, ap).real
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = _dot(r, r).real
        if progress:
            progress(it + 1, iters, float(rr_new.sqrt()) / max(r0, 1e-30))
        if float(rr_new.sqrt()) < tol * r0:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def zero_filled(op: SubspaceOperator) -> torch.Tensor:
    """A^H y scaled by the mean sampling density and, per voxel, by the coils' summed squared
    sensitivity (the subspace projection of the zero-filled, coil-combined frames)."""
    gain = (op.maps.abs() ** 2).sum(0)
    return op.adjoint_data() / (max(op.mean_density, 1e-12) * gain.clamp_min(1e-6 * float(gain.max())))


def cg_recon(op: SubspaceOperator, iters: int = 30, lam_rel: float = 1e-3, progress=None):
    lam = lam_rel * op.max_eig()
    return cg_solve(op, op.adjoint_data(), lam, iters, progress=progress)


LLR_LAM_REL = 0.01      # the llr baseline's lambda, relative to llr_lambda's scale


def block_matrices(x: torch.Tensor, block: int) -> torch.Tensor:
    """(K, nz, ny, nx) -> (n_blocks, block^3, K), zero-padded to whole blocks."""
    K, nz, ny, nx = x.shape
    pz, py, px = (-nz) % block, (-ny) % block, (-nx) % block
    xp = torch.nn.functional.pad(x, (0, px, 0, py, 0, pz)) if (pz or py or px) else x
    Z, Y, X = xp.shape[1:]
    b = xp.reshape(K, Z // block, block, Y // block, block, X // block, block)
    return b.permute(1, 3, 5, 2, 4, 6, 0).reshape(-1, block ** 3, K)


def _llr_prox(x: torch.Tensor, thresh: float, block: int, shift) -> torch.Tensor:
    """Singular-value soft thresholding of (block^3 voxels x K) matrices on a shifted block grid."""
    K, nz, ny, nx = x.shape
    x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
    blocks = block_matrices(x, block)
    Z, Y, X = (-(-n // block) * block for n in (nz, ny, nx))
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
    s = torch.clamp(s - thresh, min=0)
    blocks = (u * s[:, None, :].to(u.dtype)) @ vh
    xp = blocks.reshape(Z // block, Y // block, X // block, block, block, block, K)
    xp = xp.permute(6, 0, 3, 1, 4, 2, 5).reshape(K, Z, Y, X)
    x = xp[:, :nz, :ny, :nx]
    return torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))


def llr_lambda(op: SubspaceOperator, block: int, lam_rel: float = LLR_LAM_REL) -> float:
    """The locally low-rank weight lam: ``lam_rel`` x the 90th percentile of the blocks' leading
    singular values in the zero-filled estimate x the mean sampling density (the scale of A^H A),
    so that it is independent of the data scale, the sampling density and the number of frames.
    Shared by llr_recon and the LoREIN fit's low-rank penalty."""
    with torch.no_grad():
        blocks = block_matrices(zero_filled(op), block)
        s_ref = float(torch.linalg.svdvals(blocks)[:, 0].quantile(0.9))
    return lam_rel * s_ref * op.mean_density


def llr_recon(op: SubspaceOperator, iters: int = 80, lam_rel: float = LLR_LAM_REL, block: int = 6,
              seed: int = 0, progress=None):
    """FISTA on ||A X - y||^2/2 + lam sum_blocks ||X_block||_* with random block shifts, lam from
    :func:`llr_lambda`."""
    L = op.max_eig()
    rhs = op.adjoint_data()
    x = torch.zeros_like(rhs)
    z = x.clone()
    t = 1.0
    thresh = llr_lambda(op, block, lam_rel) / L
    g = torch.Generator().manual_seed(seed)
    for it in range(iters):
        grad = op.normal(z) - rhs
        shift = tuple(int(v) for v in torch.randint(0, block, (3,), generator=g))
        x_new = _llr_prox(z - grad / L, thresh, block, shift)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
        if progress:
            progress(it + 1, iters, None)
    return x
