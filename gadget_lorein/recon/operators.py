"""The multi-coil, multi-frame Cartesian forward model, computed in the temporal subspace.

A maps subspace coefficient images X (K, nz, ny, nx) to the sampled lines: for a line of frame t at
(kz, ky), A X = sum_k U[t, k] F(S_c X_k)[kz, ky, :]. Because the sampling is Cartesian, the basis is
applied to the measured lines once: B = A^H y lives in coefficient k-space (coils, K, nz, ny, nx), and
the per-location Gram Q[kz, ky] = sum over the frames sampled there of conj(U_t)^T U_t (K x K) makes
A^H A X = sum_c conj(S_c) F^H(Q F(S_c X)). Neither is ever materialised per frame, so 500 frames
cost the same per iteration as 5. ||A X - y||^2 = <FSX, Q FSX> - 2 Re<FSX, B> + ||y||^2.

Coils are processed ``coil_batch`` at a time (0 = all at once): apart from B, which is kept whole,
the coil-sized tensors of an iteration are one batch's coefficient k-space, so a smaller batch trades
a little speed for memory (the reconstruction halves it when the GPU runs out of memory, see
recon.reconstruct). The data term's gradient is computed in closed form, 2 (A^H A X - A^H y), in the
same pass as its value, so autograd keeps no per-coil intermediates at all. A random subset of the
coils per step (``coils`` in loss_and_grad, the fit's ``coil_subset``) gives an unbiased estimate of
both at a fraction of the FFTs.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import KSpaceLines
from ..fft import fftnc, ifftnc


class SubspaceOperator:
    def __init__(self, lines: KSpaceLines, basis: torch.Tensor, maps: torch.Tensor,
                 device="cpu", coil_batch: int = 0):
        dev = torch.device(device)
        self.device = dev
        self.coil_batch = int(coil_batch)
        self.basis = basis.to(dev, torch.complex64)                  # T, K
        self.maps = maps.to(dev, torch.complex64)                    # C, nz, ny, nx
        K = self.basis.shape[1]
        C, nz, ny, nx = self.maps.shape
        if lines.n_coils != C:
            raise ValueError(f"{lines.n_coils} coils in the data but {C} coil maps")
        self.shape = (nz, ny, nx)
        self.K = K
        frame = torch.from_numpy(lines.frame.astype(np.int64)).to(dev)
        loc = torch.from_numpy((lines.kz * ny + lines.ky).astype(np.int64)).to(dev)
        u = self.basis[frame]                                       # L, K
        # Gram per location
        outer = (u.conj()[:, :, None] * u[:, None, :]).reshape(-1, K * K)
        q = torch.zeros(nz * ny, K * K, dtype=torch.complex64, device=dev)
        q.index_add_(0, loc, outer)
        self.gram = q.reshape(nz, ny, K, K)
        # mean of A^H A's diagonal: the scale of the normal operator (zero-filled scaling, the LLR
        # threshold, the LoREIN coupling weight)
        self.mean_density = float(self.gram.diagonal(dim1=-2, dim2=-1).real.mean())
        # B = A^H y in coefficient k-space, built in chunks of lines
        b = torch.zeros(nz * ny, K, C, nx, dtype=torch.complex64, device=dev)
        y_norm2 = 0.0
        for i in range(0, len(lines.frame), 4096):
            d = torch.from_numpy(lines.data[i:i + 4096]).to(dev)      # l, C, x
            y_norm2 += float((d.abs() ** 2).sum())
            b.index_add_(0, loc[i:i + 4096], u[i:i + 4096].conj()[:, :, None, None] * d[:, None])
        self.b = b.reshape(nz, ny, K, C, nx).permute(3, 2, 0, 1, 4).contiguous()  # C,K,z,y,x
        self.y_norm2 = y_norm2
        self.n_lines = len(lines.frame)
        self.held_out = None      # HeldOutLines kept out of this operator's data, if any (recon)

    def _batches(self, coils: torch.Tensor | None = None):
        """Coil batches: slices of all coils, or of the index tensor ``coils`` (a subset)."""
        c = self.maps.shape[0] if coils is None else len(coils)
        step = self.coil_batch if 0 < self.coil_batch < c else c
        if coils is None:
            return [slice(i, i + step) for i in range(0, c, step)]
        return [coils[i:i + step] for i in range(0, c, step)]

    # coefficient images <-> coefficient k-space
    def coil_kspace(self, x: torch.Tensor, coils: slice = slice(None),
                    maps: torch.Tensor | None = None) -> torch.Tensor:
        """F(S_c X_k): (C, K, nz, ny, nx) from X (K, nz, ny, nx) (the coils asked; ``maps``
        instead of the operator's sensitivities if given)."""
        return fftnc((self.maps if maps is None else maps)[coils, None] * x[None])

    def apply_gram(self, k: torch.Tensor) -> torch.Tensor:
        """Q applied over K at every (kz, ky): k is (C, K, nz, ny, nx)."""
        return torch.einsum("zyij,cjzyx->cizyx", self.gram, k)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for c in self._batches():
            k = self.apply_gram(self.coil_kspace(x, c))
            out += (self.maps[c].conj()[:, None] * ifftnc(k)).sum(0)
        return out

    def adjoint_data(self) -> torch.Tensor:
        """A^H y as coefficient images (K, nz, ny, nx)."""
        return (self.maps.conj()[:, None] * ifftnc(self.b)).sum(0)

    def loss_and_grad(self, x: torch.Tensor, coils: torch.Tensor | None = None,
                      maps: torch.Tensor | None = None, maps_grad: bool = False):
        """||A X - y||^2 and its gradient 2 (A^H A X - A^H y) (torch's convention for a real
        function of complex X), one coil batch at a time; no autograd. With ``coils`` (indices of
        a subset of the coils) both are unbiased estimates: the subset's terms scaled by
        (all coils) / (subset size), plus ||y||^2. ``maps`` replaces the operator's sensitivities
        for this call; with ``maps_grad`` the gradient in the sensitivities, 2 sum_k conj(X_k)
        F^H (Q F S X - B)_k, comes back as a third value (from the same inverse FFTs)."""
        maps = self.maps if maps is None else maps
        with torch.no_grad():
            loss = torch.zeros((), device=x.device)
            grad = torch.zeros_like(x)
            gmaps = torch.zeros_like(maps) if maps_grad else None
            for c in self._batches(coils):
                k = self.coil_kspace(x, c, maps)
                r = self.apply_gram(k) - self.b[c]              # Q F S X - B
                # <k, Qk> - 2 Re<k, B> = Re<k, Qk - B> - Re<k, B>
                loss += (k.conj() * r).real.sum() - (k.conj() * self.b[c]).real.sum()
                ir = ifftnc(r)
                grad += 2 * (maps[c].conj()[:, None] * ir).sum(0)
                if maps_grad:
                    gmaps[c] += 2 * (x.conj()[None] * ir).sum(1)
            if coils is not None:
                scale = maps.shape[0] / len(coils)
                loss, grad = loss * scale, grad * scale
                gmaps = gmaps * scale if maps_grad else None
            if maps_grad:
                return loss + self.y_norm2, grad, gmaps
            return loss + self.y_norm2, grad

    def data_loss(self, x: torch.Tensor, coils: torch.Tensor | None = None,
                  maps: torch.Tensor | None = None) -> torch.Tensor:
        """||A X - y||^2, differentiable in X (gradient in closed form, see loss_and_grad); with
        ``coils``, its unbiased estimate from that subset of the coils. ``maps``: sensitivities
        to use instead of the operator's, differentiable too (joint coil refinement) when they
        require a gradient; detached maps cost no coil-map gradient."""
        if maps is None:
            return _DataLoss.apply(x, self, coils)
        return _DataLossMaps.apply(x, maps, self, coils)

    def max_eig(self, iters: int = 20, seed: int = 0) -> float:
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn((self.K,) + self.shape, generator=g, dtype=torch.complex64).to(self.device)
        lam = 1.0
        for _ in range(iters):
            y = self.normal(x)
            lam = float(y.norm())
            x = y / lam
        return lam


class _DataLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op, coils):
        loss, grad = op.loss_and_grad(x.detach(), coils)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return g * grad, None, None


class _DataLossMaps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, maps, op, coils):
        # the gradient in the maps only where it is wanted (not for maps passed detached)
        out = op.loss_and_grad(x.detach(), coils, maps.detach(), maps_grad=ctx.needs_input_grad[1])
        ctx.save_for_backward(*out[1:])
        return out[0]

    @staticmethod
    def backward(ctx, g):
        grad, *gmaps = ctx.saved_tensors
        return g * grad, (g * gmaps[0] if gmaps else None), None, None


class HeldOutLines:
    """Measured lines kept out of the fit's data terms, to tell when the fit starts to fit noise:
    ||A_h X - y_h||^2 on these lines only, predicted line by line (U_t applied to the coefficient
    k-space at each line's (kz, ky)), so nothing per frame is materialised. A fit to the other lines
    that improves this loss is predicting k-space it has not seen; one that makes it worse is fitting
    the noise and aliasing of the lines it has."""

    def __init__(self, lines: KSpaceLines, basis: torch.Tensor, device="cpu", coil_batch: int = 0):
        dev = torch.device(device)
        ny = lines.ny
        self.coil_batch = int(coil_batch)
        self.loc = torch.from_numpy((lines.kz * ny + lines.ky).astype(np.int64)).to(dev)
        self.u = basis.to(dev, torch.complex64)[torch.from_numpy(lines.frame.astype(np.int64)).to(dev)]
        self.data = torch.from_numpy(np.ascontiguousarray(lines.data)).to(dev, torch.complex64)  # L, C, x
        self.y_norm2 = float((self.data.abs() ** 2).sum())
        self.n_lines = len(lines.frame)

    @torch.no_grad()
    def loss(self, x: torch.Tensor, maps: torch.Tensor) -> float:
        """||A_h X - y_h||^2 for coefficient images X (K, nz, ny, nx) and sensitivities ``maps``."""
        c_all = maps.shape[0]
        step = self.coil_batch if 0 < self.coil_batch < c_all else c_all
        total = 0.0
        for i in range(0, c_all, step):
            k = fftnc(maps[i:i + step, None] * x[None])                  # c, K, z, y, x
            k = k.reshape(k.shape[0], k.shape[1], -1, k.shape[-1])[:, :, self.loc]   # c, K, L, x
            pred = torch.einsum("lk,cklx->lcx", self.u, k)
            total += float((pred - self.data[:, i:i + step]).abs().pow(2).sum())
        return total
