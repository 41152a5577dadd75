"""Simulated multi-coil, undersampled 3D acquisitions of the head phantom, with ground truth.

Images of frame t are PD * s_t(T1, T2, B1) inside the head (zero outside); coil images are the
product with smooth complex receive sensitivities; k-space is their centred orthonormal 3D FFT,
sampled on the (ky, kz) lines of each frame's mask, plus complex Gaussian receiver noise that is
correlated across coils (covariance ``coils.noise_covariance``) and of standard deviation
``noise`` x (the largest contrast-image magnitude), per real and imaginary part.
A noise-only scan with the same covariance is returned for prewhitening.

That is mode 'ideal': the object lives on the reconstruction's own grid and is made by its own
signal model (the "inverse crime"). Mode 'realistic' (``simulate_realistic``) avoids it where a
scanner would: the object is simulated on a grid ``FINE`` times finer per axis (same FOV), with the
coil sensitivities on that grid, and only the central k-space of the reconstruction matrix is kept,
so that every tissue boundary has partial volume; the truth is the block average
(``phantom.block_average``, with the mask ``pure`` of voxels without partial volume). Every scan has
a smooth transmit field (about +-``B1_SPREAD``; for qalas, which does not encode B1, a model error,
as on a scanner). The noise is set by an SNR (``snr_sigma``), the sampling by ``scan_masks``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from . import phantom as ph
from .coils import coil_sensitivities, noise_covariance
from . import sampling
from ..physics import sequences
from ..data import KSpaceLines, Scan
from ..fft import fftnc, ifftnc
from ..physics.protocol import Protocol


@dataclass
class Simulation:
    scan: Scan
    phantom: ph.Phantom
    coils: np.ndarray             # (coils, nz, ny, nx) complex64, unit RSS, on the recon grid
                                  # (realistic mode: the data came from the same coils on the fine grid)
    noise_sigma: float
    noise_cov: np.ndarray         # (coils, coils)
    mode: str = "ideal"
    pure: np.ndarray | None = None  # realistic: voxels without partial volume (one label)

    def truth(self) -> dict[str, np.ndarray]:
        """Ground-truth maps (T1, T2 ms; PD; B1 where the protocol encodes it) and masks
        (labels; ``pure`` in realistic mode)."""
        p = self.phantom
        out = dict(T1=p.t1, T2=p.t2, PD=p.pd, labels=p.labels)
        if sampling_b1(self.protocol):
            out["B1"] = p.b1
        if self.pure is not None:
            out["pure"] = self.pure
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


MODES = ("ideal", "realistic")


def _add_noise(data: np.ndarray, sigma: float, cov: np.ndarray, seed: int, n_noise: int):
    """(lines + receiver noise, noise scan): complex Gaussian noise of ``sigma`` per real and
    imaginary part, correlated across coils by ``cov``, drawn line samples first, then the noise
    scan (unit level when sigma is 0), from one generator seeded ``seed + 1``."""
    n_lines, n_coils, nx = data.shape
    rng = np.random.default_rng(seed + 1)
    chol = np.linalg.cholesky(cov)

    def samples(n):
        w = (rng.standard_normal((n_coils, n)) + 1j * rng.standard_normal((n_coils, n)))
        return (chol @ w).astype(np.complex64)

    if sigma > 0:
        w = samples(n_lines * nx).reshape(n_coils, n_lines, nx)
        data = data + sigma * np.moveaxis(w, 0, 1)
    return data.astype(np.complex64), (sigma if sigma > 0 else 1.0) * samples(n_noise)


def simulate(proto: Protocol, matrix=(64, 64, 48), n_coils=8, accel=16.0, noise=0.01, seed=0,
             calib=None, calib_mode=None, n_noise=512, frame_chunk=8, b1_mismatch=False,
             mode="ideal", snr=30.0, pattern=None, noise_seed=None) -> Simulation:
    """Mode 'ideal' (the module docstring) with ``noise`` x the largest image magnitude, or
    'realistic' (``simulate_realistic``, which takes ``snr`` and ``pattern``; ``noise`` and
    ``b1_mismatch`` are the ideal mode's knobs).

    ``b1_mismatch``: put the phantom's transmit field (0.8-1.2) into the signal even where the
    protocol does not encode B1 (qalas), whose reconstruction takes B1 = 1: a model mismatch, for
    measuring how the methods cope with one (benchmarks/accuracy.py --b1-mismatch).
    ``noise_seed`` (default ``seed``): the receiver noise's own seed, e.g. a repetition of the same
    scan (same object, coils and sampling) with fresh noise."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "realistic":
        return simulate_realistic(proto, matrix, n_coils, accel, snr, seed, calib, calib_mode,
                                  pattern, n_noise, noise_seed)
    nx, ny, nz = (int(v) for v in matrix)
    phantom = ph.head_phantom((nx, ny, nz), seed=seed)
    coils = coil_sensitivities((nz, ny, nx), n_coils, seed=seed).astype(np.complex64)
    # prescan normalisation (as a body-coil reference scan gives): unit root-sum-of-squares, so
    # the reconstructed PD is PD itself rather than PD x the receive field
    coils = coils / np.sqrt((np.abs(coils) ** 2).sum(0, keepdims=True)).clip(1e-12)
    cov = noise_covariance(n_coils, seed=seed)
    n_frames = proto.n_frames
    # union by default: the calibration block is shared out among the frames, which leaves room
    # for a block large enough for good coil maps even at R=48 with five contrasts
    mask, calib, calib_mode, pattern = scan_masks(proto, ny, nz, accel, calib, calib_mode, pattern,
                                                  seed, "ideal")
    calib_region = np.zeros((nz, ny), bool)
    cy, cz = calib
    calib_region[nz // 2 - cz // 2: nz // 2 - cz // 2 + cz, ny // 2 - cy // 2: ny // 2 - cy // 2 + cy] = True

    # the images of a chunk of frames at a time, from the inside voxels' signals: all frames' images
    # at once would be frames x volume (630 MB for mrf's 400 TRs at 64x64x48, 5.0 GB at 128x128x96)
    inside, sig = _voxel_signals(proto, phantom, b1=True if b1_mismatch else None)
    sigma = float(noise) * float(sig.abs().max()) if sig.numel() else 0.0

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
    data, noise_scan = _add_noise(data, sigma, cov, seed if noise_seed is None else noise_seed, n_noise)
    lines = KSpaceLines(data, f, z, y, calib_region[z, y], n_frames, nz, ny)
    scan = Scan(lines, noise_scan, proto.yaml_text, proto.name, tuple(phantom.fov_mm))
    return Simulation(scan, phantom, coils, sigma, cov)


# ----------------------------------------------------------------------------------------------
# realistic mode
# ----------------------------------------------------------------------------------------------

FINE = 2              # the object's grid is this many times finer per axis than the recon's
B1_SPREAD = 0.12      # realistic transmit field: 1 +- about this (the phantom's is 1 +- 0.2)
_FINE_CHUNK = 2 ** 24  # complex values per FFT batch on the fine grid (128 MB)


def default_pattern(proto: Protocol) -> str:
    """'per_frame' (variable density, a new draw per contrast or TR): accelerated multi-contrast
    scans meant for a subspace reconstruction vary the phase encodes between contrasts, and MRF's
    readouts change with every TR. 'shared' (the same phase encodes in every readout of a QALAS
    repetition, as unaccelerated protocols acquire them) stays selectable; with it the contrasts
    add no encoding, and at R = 16 on 6 coils zero-filled matching beats every data-consistent
    method (benchmarks/RESULTS.md)."""
    return "per_frame"


def scan_masks(proto: Protocol, ny: int, nz: int, accel: float, calib=None, calib_mode=None,
               pattern=None, seed: int = 0, mode: str = "ideal"):
    """(masks (n_frames, nz, ny), calib, calib_mode, pattern) as ``simulate`` samples them.

    'ideal': calibration split among the frames ('union') unless asked otherwise, per-frame draws.
    'realistic': as a scanner does it, a fully sampled calibration block in every frame
    (``default_pattern``; calib_mode 'per_frame'); where no block fits in every frame (mrf's few
    lines per TR, or a tiny matrix) the block is split among frames drawn each their own pattern
    ('union'), and every frame samples the k-space centre, as each spiral MRF readout does."""
    n = proto.n_frames
    if mode == "ideal":
        calib_mode = calib_mode or "union"
        pattern = pattern or "per_frame"
        centre = False
    else:
        asked, pattern = pattern, pattern or default_pattern(proto)
        if calib_mode is None:
            calib_mode = "per_frame"
            if calib is None:
                try:
                    sampling.auto_calib(1 if pattern == "shared" else n, ny, nz, accel, "per_frame")
                except ValueError:
                    if asked == "shared":
                        raise
                    calib_mode, pattern = "union", "per_frame"
        centre = True
    if pattern == "shared":
        calib_mode = "per_frame"        # one pattern holds the whole block, so every frame does
    if calib is None:
        calib = sampling.auto_calib(1 if pattern == "shared" else n, ny, nz, accel,
                                    "per_frame" if pattern == "shared" else calib_mode)
    calib = tuple(int(v) for v in calib)
    if pattern == "per_frame" and not centre:     # exactly the call of the ideal simulator
        mask = sampling.sampling_masks(n, ny, nz, accel, calib=calib, calib_mode=calib_mode,
                                       seed=seed)
    else:
        mask = sampling.sampling_masks(n, ny, nz, accel, calib=calib, calib_mode=calib_mode,
                                       seed=seed, pattern=pattern, centre=centre)
    return mask, calib, calib_mode, pattern


def fine_phantom(matrix, seed: int = 0) -> ph.Phantom:
    """The head phantom on a grid FINE times finer than ``matrix`` (nx, ny, nz), same FOV, with the
    transmit field scaled to 1 +- about B1_SPREAD."""
    fov = ph.default_fov_mm(matrix)
    p = ph.head_phantom(tuple(FINE * int(v) for v in matrix), seed=seed, fov_mm=fov)
    b1 = 1.0 + (p.b1 - 1.0) * (B1_SPREAD / 0.2)
    return dataclasses.replace(p, b1=b1.astype(np.float32))


def _crop_kspace(k: torch.Tensor, shape_zyx) -> torch.Tensor:
    """The central (nz, ny, nx) of a centred fine k-space (..., FINE nz, FINE ny, FINE nx), scaled
    so that image intensities keep their values (orthonormal FFTs: sqrt(N_coarse / N_fine)), and
    moved by a quarter voxel so that coarse voxel i holds the centre of fine voxels FINE i ...
    FINE i + FINE - 1 (``phantom.block_average``'s block) rather than the centre of one of them."""
    out = k
    for ax, n in zip((-3, -2, -1), shape_zyx):
        nf = k.shape[ax]
        start = nf // 2 - n // 2
        out = out.narrow(ax, start, n)
        # coarse sample i lies on fine voxel FINE*i + (FINE*n//2 - FINE*(n//2)); the block centre
        # on FINE*i + (FINE - 1)/2: shift by d coarse voxels, f(x + d) <-> F(k) exp(2 pi i k d)
        d = ((FINE - 1) / 2 - (nf // 2 - FINE * (n // 2))) / FINE
        kk = (torch.arange(n, dtype=torch.float64) - n // 2) / n
        ph_ = torch.exp(2j * np.pi * kk * d).to(torch.complex64)
        out = out * ph_.reshape([n] + [1] * (-ax - 1))
    return out * float(np.sqrt(np.prod(shape_zyx) / np.prod(k.shape[-3:])))


INTERP_STEP = (0.04, 0.04, 0.005)  # fine-grid signals: grid step in (log T1, log T2, B1)


def _fine_signals(proto: Protocol, phantom: ph.Phantom, interpolate: bool | None = None):
    """(inside mask, PD * s_t of the voxels inside) with the transmit field, for the many voxels of
    a fine grid: the signal model is evaluated on a small grid in (log T1, log T2, B1) spanning each
    label's values and interpolated (trilinear; smooth there, so far below any noise: checked in
    tests/test_simulate.py) where that takes fewer evaluations than the voxels themselves (EPG for
    mrf's 400 TRs costs about 3 ms a voxel on one core); ``interpolate`` forces either way."""
    inside_np = phantom.labels > 0
    inside = torch.from_numpy(inside_np)
    lab = phantom.labels[inside_np]
    par = np.stack([np.log(phantom.t1[inside_np]), np.log(phantom.t2[inside_np]),
                    phantom.b1[inside_np]], 1).astype(np.float64)
    step = np.array(INTERP_STEP)
    grids = {}
    for k in np.unique(lab):
        p = par[lab == k]
        lo, hi = p.min(0), p.max(0)
        n = np.maximum(2, np.ceil((hi - lo) / step).astype(int) + 1)
        grids[k] = (lo, np.maximum(hi - lo, 1e-9) / (n - 1), n)
    if interpolate is None:
        interpolate = sum(int(np.prod(g[2])) for g in grids.values()) * 4 <= len(lab)
    if not interpolate:
        return _voxel_signals(proto, phantom, b1=True)
    sig = torch.zeros((len(lab), proto.n_frames), dtype=torch.complex64)
    for k, (lo, h, n) in grids.items():
        axes = [lo[i] + h[i] * np.arange(n[i]) for i in range(3)]
        g = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        table = sequences.signal(proto, torch.from_numpy(np.exp(g[:, 0])).float(),
                                 torch.from_numpy(np.exp(g[:, 1])).float(),
                                 torch.from_numpy(g[:, 2]).float()).to(torch.complex64)
        sel = np.nonzero(lab == k)[0]
        u = np.clip((par[sel] - lo) / h, 0, n - 1 - 1e-9)
        i0 = np.minimum(np.floor(u).astype(int), n - 2)
        fr = u - i0
        acc = torch.zeros((len(sel), proto.n_frames), dtype=torch.complex64)
        for corner in np.ndindex(2, 2, 2):
            c = np.array(corner)
            idx = np.ravel_multi_index(tuple((i0 + c).T), tuple(n))
            w = np.prod(np.where(c, fr, 1 - fr), 1)
            acc += torch.from_numpy(w.astype(np.float32))[:, None] * table[idx]
        sig[sel] = acc
    pd = torch.from_numpy(phantom.pd[inside_np])
    return inside, sig * pd[:, None]


def snr_sigma(coil_images_wm_mean: np.ndarray, snr: float) -> float:
    """Per-channel noise sigma (per real and imaginary part, before the coil covariance) for a
    white-matter SNR ``snr``: the largest per-frame WM mean of the noise-free, whitened
    root-sum-of-squares image (which equals the optimal coil combination's magnitude, whose noise
    is sigma per part) divided by snr."""
    return float(np.max(coil_images_wm_mean)) / float(snr)


def simulate_realistic(proto: Protocol, matrix=(64, 64, 48), n_coils=8, accel=16.0, snr=30.0,
                       seed=0, calib=None, calib_mode=None, pattern=None, n_noise=512,
                       noise_seed=None) -> Simulation:
    """Mode 'realistic' (module docstring). ``snr``: white matter's per-voxel SNR in the brightest
    frame of the fully sampled, optimally coil-combined image (``snr_sigma``; None or inf: no
    noise). ``pattern``: 'shared' or 'per_frame' (``scan_masks``)."""
    nx, ny, nz = (int(v) for v in matrix)
    shape = (nz, ny, nx)
    fine = fine_phantom((nx, ny, nz), seed=seed)
    truth, pure = ph.block_average(fine, FINE)
    fshape = fine.shape
    coils_f = coil_sensitivities(fshape, n_coils, seed=seed, fov_mm=fine.fov_mm)
    coils_f = coils_f.astype(np.complex64)
    coils_f /= np.sqrt((np.abs(coils_f) ** 2).sum(0, keepdims=True)).clip(1e-12)
    coils = coil_sensitivities(shape, n_coils, seed=seed, fov_mm=fine.fov_mm).astype(np.complex64)
    coils /= np.sqrt((np.abs(coils) ** 2).sum(0, keepdims=True)).clip(1e-12)
    cov = noise_covariance(n_coils, seed=seed)
    chol = np.linalg.cholesky(cov)
    white = torch.from_numpy(np.linalg.inv(chol).astype(np.complex64))
    n_frames = proto.n_frames
    mask, calib, calib_mode, pattern = scan_masks(proto, ny, nz, accel, calib, calib_mode, pattern,
                                                  seed, "realistic")
    region = sampling.calib_region(ny, nz, calib)

    inside, sig = _fine_signals(proto, fine)
    wm = (truth.labels == ph.WM) & pure
    if not wm.any():
        wm = truth.labels == ph.WM if (truth.labels == ph.WM).any() else truth.labels > 0
    wm = torch.from_numpy(wm)
    c = torch.from_numpy(coils_f)
    chunk = max(1, _FINE_CHUNK // (n_coils * int(np.prod(fshape))))
    parts, wm_mean = [], []
    for t0 in range(0, n_frames, chunk):
        imgs = _images(inside, sig[:, t0:t0 + chunk])
        k = _crop_kspace(fftnc(c[:, None] * imgs[None]), shape)           # C, t, z, y, x
        # the noise-free coil images, whitened: their RSS = the optimal combination's magnitude
        img = torch.einsum("dc,ct...->dt...", white, ifftnc(k))
        rss = img.abs().square().sum(0).sqrt()
        wm_mean.extend(rss[:, wm].mean(1).tolist())
        k = k.numpy()
        f, z, y = np.nonzero(mask[t0:t0 + chunk])
        parts.append((f + t0, z, y, np.moveaxis(k[:, f, z, y, :], 0, 1)))
    f, z, y, data = (np.concatenate([a[i] for a in parts]) for i in range(4))
    sigma = 0.0 if snr is None or not np.isfinite(snr) else snr_sigma(np.array(wm_mean), snr)
    data, noise_scan = _add_noise(data, sigma, cov, seed if noise_seed is None else noise_seed, n_noise)
    lines = KSpaceLines(data, f, z, y, region[z, y], n_frames, nz, ny)
    scan = Scan(lines, noise_scan, proto.yaml_text, proto.name, tuple(truth.fov_mm))
    return Simulation(scan, truth, coils, sigma, cov, mode="realistic", pure=pure)
