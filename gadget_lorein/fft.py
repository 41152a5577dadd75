"""Centred, orthonormal FFT helpers (torch.fft with the shifts that MRI uses)."""
from __future__ import annotations

import torch


def fftnc(x: torch.Tensor, dims=(-3, -2, -1)) -> torch.Tensor:
    """Centred orthonormal forward FFT over ``dims`` (image -> k-space)."""
    x = torch.fft.ifftshift(x, dim=dims)
    x = torch.fft.fftn(x, dim=dims, norm="ortho")
    return torch.fft.fftshift(x, dim=dims)


def ifftnc(x: torch.Tensor, dims=(-3, -2, -1)) -> torch.Tensor:
    """Centred orthonormal inverse FFT over ``dims`` (k-space -> image)."""
    x = torch.fft.ifftshift(x, dim=dims)
    x = torch.fft.ifftn(x, dim=dims, norm="ortho")
    return torch.fft.fftshift(x, dim=dims)
