"""Centred, orthonormal FFT helpers (torch.fft with the shifts that MRI uses).

For even sizes the shifts are done as sign modulations, which avoids torch.roll's copies:
fftshift(fft(ifftshift(x))) = (-1)^(N/2) (-1)^k fft((-1)^n x), and likewise for the inverse.
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def _checker(shape: tuple, device: torch.device) -> torch.Tensor:
    """(-1)^(n_1 + n_2 + ...) on a grid of ``shape`` (all even)."""
    sign = torch.ones((), device=device)
    for axis, n in enumerate(shape):
        v = (1 - 2 * (torch.arange(n, device=device) % 2)).float()
        v = v.reshape([n] + [1] * (len(shape) - axis - 1))
        sign = sign * v
    return sign


def _centred(x: torch.Tensor, dims, transform) -> torch.Tensor:
    dims = tuple(d % x.ndim for d in dims)
    sizes = tuple(x.shape[d] for d in dims)
    if all(n % 2 == 0 for n in sizes) and dims == tuple(range(x.ndim - len(dims), x.ndim)):
        s = _checker(sizes, x.device)
        out = s * transform(x * s, dim=dims, norm="ortho")
        return -out if sum(n // 2 for n in sizes) % 2 else out
    x = torch.fft.ifftshift(x, dim=dims)
    x = transform(x, dim=dims, norm="ortho")
    return torch.fft.fftshift(x, dim=dims)


def fftnc(x: torch.Tensor, dims=(-3, -2, -1)) -> torch.Tensor:
    """Centred orthonormal forward FFT over ``dims`` (image -> k-space)."""
    return _centred(x, dims, torch.fft.fftn)


def ifftnc(x: torch.Tensor, dims=(-3, -2, -1)) -> torch.Tensor:
    """Centred orthonormal inverse FFT over ``dims`` (k-space -> image)."""
    return _centred(x, dims, torch.fft.ifftn)
