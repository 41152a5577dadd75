"""recon/operators.py: the subspace operator is a linear map whose adjoint is the one it uses
(as mrpro's dotproduct_adjointness_test: <A x, y> == <x, A^H y> for random complex x, y)."""
from __future__ import annotations

import numpy as np
import torch

from gadget_lorein.data import KSpaceLines
from gadget_lorein.fft import fftnc
from gadget_lorein.recon.operators import HeldOutLines, SubspaceOperator


def _case(seed=0, C=3, T=6, K=3, nz=4, ny=6, nx=5, L=40):
    rng = np.random.default_rng(seed)
    cplx = lambda *s: (rng.standard_normal(s) + 1j * rng.standard_normal(s)).astype(np.complex64)
    frame, kz, ky = rng.integers(0, T, L), rng.integers(0, nz, L), rng.integers(0, ny, L)
    lines = KSpaceLines(data=cplx(L, C, nx), frame=frame, kz=kz, ky=ky, calib=np.zeros(L, bool),
                        n_frames=T, nz=nz, ny=ny)
    basis = torch.from_numpy(np.linalg.qr(cplx(T, K))[0].astype(np.complex64))
    maps = torch.from_numpy(cplx(C, nz, ny, nx))
    return lines, basis, maps, torch.from_numpy(cplx(K, nz, ny, nx))


def _forward(lines, basis, maps, x):
    """A X line by line: sum_k U[t, k] F(S_c X_k)[kz, ky, :]  -> (L, C, nx)."""
    k = fftnc(maps[:, None] * x[None])                            # C, K, z, y, x
    u = basis[torch.from_numpy(lines.frame)]                      # L, K
    sel = k[:, :, torch.from_numpy(lines.kz), torch.from_numpy(lines.ky)]   # C, K, L, x
    return torch.einsum("lk,cklx->lcx", u, sel)


def _dot(a, b):
    return complex((a.conj() * b).sum())


def test_subspace_operator_adjoint():
    lines, basis, maps, x = _case()
    op = SubspaceOperator(lines, basis, maps)          # A^H y for y = the lines' data
    y = torch.from_numpy(lines.data)
    lhs, rhs = _dot(_forward(lines, basis, maps, x), y), _dot(x, op.adjoint_data())
    assert abs(lhs - rhs) <= 1e-5 * max(abs(lhs), abs(rhs))
    # the normal operator is A^H A, hence self-adjoint
    x2 = _case(seed=1)[3]
    a, b = _dot(op.normal(x), x2), _dot(x, op.normal(x2))
    assert abs(a - b) <= 1e-5 * max(abs(a), abs(b))
    ax = _forward(lines, basis, maps, x)
    assert abs(_dot(ax, ax) - _dot(x, op.normal(x))) <= 1e-5 * abs(_dot(ax, ax))


def test_held_out_lines_predict_the_forward_model():
    """HeldOutLines has no adjoint; its prediction is the same forward model: with zero data its
    loss is ||A x||^2."""
    lines, basis, maps, x = _case(seed=2)
    zero = KSpaceLines(data=np.zeros_like(lines.data), frame=lines.frame, kz=lines.kz, ky=lines.ky,
                       calib=lines.calib, n_frames=lines.n_frames, nz=lines.nz, ny=lines.ny)
    ax = _forward(lines, basis, maps, x)
    want = float((ax.abs() ** 2).sum())
    assert abs(HeldOutLines(zero, basis).loss(x, maps) - want) <= 1e-5 * want
