"""Simulated multi-coil, undersampled 3D acquisitions of the head phantom, with ground truth.

Images of frame t are PD * s_t(T1, T2, B1) inside the head (zero outside); coil images are the
product with smooth complex receive sensitivities; k-space is their centred orthonormal 3D FFT,
sampled on the (ky, kz) lines of each frame's mask, plus complex Gaussian receiver noise that is
correlated across coils (covariance ``noise_covariance``) and of standard deviation
``noise`` x (the largest contrast-image magnitude), per real and imaginary part.
A noise-only scan with the same covariance is returned for prewhitening.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import phantom as ph
from . import sampling
from ..physics import sequences
from ..data import KSpaceLines, Scan
from ..fft import fftnc
from ..physics.protocol import Protocol


@dataclass
class Simulation:
    scan: Scan
    phantom: ph.Phantom
    coils: np.ndarray             # (coils, nz, ny, nx) complex64, as simulated (not normalised)
    noise_sigma: float
    noise_cov: np.ndarray         # (coils, coils)

    def truth(self) -> dict[str, np.ndarray]:
        """Ground-truth maps (T1, T2 ms; PD; B1 where the protocol encodes it) and masks."""
        p = self.phantom
        out = dict(T1=p.t1, T2=p.t2, PD=p.pd, labels=p.labels)
        if sampling_b1(self.protocol):
            out["B1"] = p.b1
        return out

    @property
    def protocol(self) -> Protocol:
        from ..physics.protocol import from_yaml
        return from_yaml(self.scan.protocol_yaml)


def sampling_b1(proto: Protocol) -> bool:
    """B1 enters the simulation only where the protocol encodes it; otherwise it is nominal,
    since the reconstruction has no other source for it (documented in docs/data-format.md)."""
    return proto.encodes_b1


def _voxel_signals(proto: Protocol, phantom: ph.Phantom, frames=None, b1: bool | None = None):
    """(inside mask, PD * s_t of the voxels inside: complex64 (voxels, frames))."""
    inside = torch.from_numpy(phantom.labels > 0)
    t1 = torch.from_numpy(phantom.t1)[inside]
    t2 = torch.from_numpy(phantom.t2)[inside]
    if b1 is None:
        b1 = sampling_b1(proto)
    b1 = torch.from_numpy(phantom.b1)[inside] if b1 else torch.ones_like(t1)
    sig = sequences.signal(proto, t1, t2, b1)                   # V, T
    if frames is not None:
        sig = sig[:, frames]
    sig = sig * torch.from_numpy(phantom.pd)[inside][:, None]
    return inside, sig.to(torch.complex64)


def _images(inside: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """(frames, nz, ny, nx) images from the inside voxels' signals (voxels, frames)."""
    img = torch.zeros((sig.shape[1],) + tuple(inside.shape), dtype=torch.complex64)
    img[:, inside] = sig.T
    return img


def contrast_images(proto: Protocol, phantom: ph.Phantom, frames=None, b1: bool | None = None
                    ) -> torch.Tensor:
    """Noise-free images PD * s_t: complex64 (n_frames, nz, ny, nx) (or the frames asked). ``b1``:
    the phantom's transmit field in the signal (None: where the protocol encodes B1, else nominal)."""
    return _images(*_voxel_signals(proto, phantom, frames, b1))


def simulate(proto: Protocol, matrix=(64, 64, 48), n_coils=8, accel=16.0, noise=0.01, seed=0,
             calib=None, calib_mode=None, n_noise=512, frame_chunk=8, b1_mismatch=False) -> Simulation:
    """``b1_mismatch``: put the phantom's transmit field (0.8-1.2) into the signal even where the
    protocol does not encode B1 (qalas), whose reconstruction takes B1 = 1: a model mismatch, for
    measuring how the methods cope with one (benchmarks/accuracy.py --b1-mismatch)."""
    nx, ny, nz = (int(v) for v in matrix)
    phantom = ph.head_phantom((nx, ny, nz), seed=seed)
    coils = ph.coil_sensitivities((nz, ny, nx), n_coils, seed=seed).astype(np.complex64)
    # prescan normalisation (as a body-coil reference scan gives): unit root-sum-of-squares, so
    # the reconstructed PD is PD itself rather than PD x the receive field (see NOTES)
    coils = coils / np.sqrt((np.abs(coils) ** 2).sum(0, keepdims=True)).clip(1e-12)
    cov = ph.noise_covariance(n_coils, seed=seed)
    n_frames = proto.n_frames
    # union by default: the calibration block is shared out among the frames, which leaves room
    # for a block large enough for good coil maps even at R=48 with five contrasts
    calib_mode = calib_mode or "union"
    if calib is None:
        calib = sampling.auto_calib(n_frames, ny, nz, accel, calib_mode)
    mask = sampling.sampling_masks(n_frames, ny, nz, accel, calib=calib, calib_mode=calib_mode,
                                   seed=seed)
    calib_region = np.zeros((nz, ny), bool)
    cy, cz = calib
    calib_region[nz // 2 - cz // 2: nz // 2 - cz // 2 + cz, ny // 2 - cy // 2: ny // 2 - cy // 2 + cy] = True

    # the images of a chunk of frames at a time, from the inside voxels' signals: all frames' images
    # at once would be frames x volume (630 MB for mrf's 400 TRs at 64x64x48, 5.0 GB at 128x128x96)
    inside, sig = _voxel_signals(proto, phantom, b1=True if b1_mismatch else None)
    sigma = float(noise) * float(sig.abs().max()) if sig.numel() else 0.0
    rng = np.random.default_rng(seed + 1)
    chol = np.linalg.cholesky(cov)

    def noise_samples(n):
        w = (rng.standard_normal((n_coils, n)) + 1j * rng.standard_normal((n_coils, n)))
        return (chol @ w).astype(np.complex64)

    c = torch.from_numpy(coils)
    chunks = []
    for t0 in range(0, n_frames, frame_chunk):
        imgs = _images(inside, sig[:, t0:t0 + frame_chunk])
        k = fftnc(c[:, None] * imgs[None]).numpy()                        # C, t, z, y, x
        sub = mask[t0:t0 + frame_chunk]
        f, z, y = np.nonzero(sub)
        lines = np.moveaxis(k[:, f, z, y, :], 0, 1)                       # L, C, x
        chunks.append((f + t0, z, y, lines))
    f = np.concatenate([a[0] for a in chunks])
    z = np.concatenate([a[1] for a in chunks])
    y = np.concatenate([a[2] for a in chunks])
    data = np.concatenate([a[3] for a in chunks])
    if sigma > 0:
        w = noise_samples(data.shape[0] * nx).reshape(n_coils, data.shape[0], nx)
        data = data + sigma * np.moveaxis(w, 0, 1)
    lines = KSpaceLines(data.astype(np.complex64), f, z, y, calib_region[z, y], n_frames, nz, ny)
    noise_scan = (sigma if sigma > 0 else 1.0) * noise_samples(n_noise)
    scan = Scan(lines, noise_scan, proto.yaml_text, proto.name, tuple(phantom.fov_mm))
    return Simulation(scan, phantom, coils, sigma, cov)
