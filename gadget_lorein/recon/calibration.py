"""Noise prewhitening, coil compression and coil sensitivities (plain arrays in, arrays out)."""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..data import KSpaceLines
from ..fft import ifftnc

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """Calibration data that cannot give coil maps or a whitening matrix."""


def whitening_matrix(noise: np.ndarray) -> np.ndarray:
    """W with W Psi W^H = I, Psi the noise covariance of ``noise`` (coils x samples)."""
    if noise.ndim != 2 or noise.shape[1] < noise.shape[0]:
        raise CalibrationError(f"noise scan has shape {noise.shape}: need coils x (>= coils) samples")
    psi = (noise @ noise.conj().T) / noise.shape[1]
    try:
        chol = np.linalg.cholesky(psi)
    except np.linalg.LinAlgError:
        raise CalibrationError("noise covariance is not positive definite (dead or duplicated "
                               "channel in the noise scan?)") from None
    return np.linalg.inv(chol).astype(np.complex64)


def apply_coil_matrix(lines: KSpaceLines, mat: np.ndarray) -> KSpaceLines:
    """Lines with their coils mixed by ``mat`` (new_coils x coils)."""
    data = np.einsum("dc,lcx->ldx", mat.astype(np.complex64), lines.data)
    return KSpaceLines(data, lines.frame, lines.kz, lines.ky, lines.calib, lines.n_frames,
                       lines.nz, lines.ny)


def calibration_kspace(lines: KSpaceLines, basis: np.ndarray, prior: np.ndarray | None = None,
                       prior_floor: float = 0.1) -> np.ndarray:
    """Consistent calibration k-space (coils, nz, ny, nx) of the first subspace coefficient.

    Frames have different contrasts (QALAS even changes sign), so averaging them would mix
    inconsistent images. Where every frame sampled a calibration location, the first coefficient
    is the least-squares fit sum_t conj(u_t0) y_t / sum_t |u_t0|^2 (exact: U's columns are
    orthonormal). Where only some did (a block shared out among the frames, as for MRF), that fit
    divides by a few u_t0, some near zero, and the other coefficients leak in at random from
    location to location: on the MRF scans the image's floor outside the head reached 0.1-0.4 of
    its 99th percentile. There, given ``prior`` (K x K, E[c c^H] of the dictionary's coefficients),
    the linear minimum-mean-square estimate from the location's frames S is used instead:
    e_0^T C U_S^H (U_S C U_S^H + prior_floor * mean diag I)^-1 y_S, the floor standing for noise
    and model error. Zeros where nothing was sampled."""
    sel = np.flatnonzero(lines.calib)
    if not sel.size:
        raise CalibrationError("no calibration lines (ACQ_IS_PARALLEL_CALIBRATION*) in the scan")
    nl = lines.nz * lines.ny
    loc = lines.kz[sel] * lines.ny + lines.ky[sel]
    u0 = basis[:, 0]
    w = np.conj(u0[lines.frame[sel]])
    num = np.zeros((nl, lines.n_coils, lines.nx), np.complex64)
    np.add.at(num, loc, w[:, None, None] * lines.data[sel])
    den = np.zeros(nl)
    np.add.at(den, loc, np.abs(w) ** 2)
    num[den > 0] /= den[den > 0][:, None, None]
    if prior is not None:
        frames = np.zeros((nl, basis.shape[0]), bool)
        frames[loc, lines.frame[sel]] = True
        partial = np.flatnonzero((den > 0) & ~frames.all(1))
        if partial.size:
            order = np.argsort(loc, kind="stable")
            bounds = np.searchsorted(loc[order], np.stack([partial, partial + 1]))
            for where, a, b in zip(partial, *bounds):
                rows = sel[order[a:b]]
                u = basis[lines.frame[rows]]                        # (s, K)
                cu = prior @ u.conj().T                             # (K, s): C U_S^H
                gram = u @ cu
                gram += prior_floor * np.trace(gram).real / len(rows) * np.eye(len(rows))
                weights = np.linalg.solve(gram.T, cu[0])
                num[where] = np.einsum("s,scx->cx", weights, lines.data[rows])
    return np.moveaxis(num.reshape(lines.nz, lines.ny, lines.n_coils, lines.nx), 2, 0)


def coil_compression(calib: np.ndarray, n_virtual: int) -> np.ndarray:
    """Compression matrix (n_virtual x coils) from the SVD of the calibration data."""
    nc = calib.shape[0]
    if not 0 < n_virtual <= nc:
        raise CalibrationError(f"virtual_coils={n_virtual} must be between 1 and the {nc} coils")
    flat = calib.reshape(nc, -1)
    u, s, _ = np.linalg.svd(flat[:, np.abs(flat).sum(0) > 0], full_matrices=False)
    kept = (s[:n_virtual] ** 2).sum() / (s ** 2).sum()
    log.info("coil compression: %d -> %d virtual coils keep %.4f of the calibration energy",
             nc, n_virtual, kept)
    return u[:, :n_virtual].conj().T.astype(np.complex64)


def _calib_box(calib: np.ndarray):
    nz_idx, ny_idx = np.nonzero(np.abs(calib).sum(axis=(0, 3)) > 0)
    return nz_idx.min(), nz_idx.max() + 1, ny_idx.min(), ny_idx.max() + 1


def lowres_maps(calib: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Sensitivities from a Hann-windowed low-resolution image of each coil, normalised to unit
    root-sum-of-squares, with the phase of the first principal virtual coil removed."""
    nc, nz, ny, nx = calib.shape
    z0, z1, y0, y1 = _calib_box(calib)
    win = np.zeros((nz, ny, nx))
    hz, hy = np.hanning(z1 - z0 + 2)[1:-1], np.hanning(y1 - y0 + 2)[1:-1]
    cx = max(z1 - z0, y1 - y0) * nx // max(nz, ny)
    hx = np.zeros(nx)
    hx[nx // 2 - cx // 2: nx // 2 - cx // 2 + cx] = np.hanning(cx + 2)[1:-1]
    win[z0:z1, y0:y1, :] = hz[:, None, None] * hy[None, :, None] * hx[None, None, :]
    img = ifftnc(torch.from_numpy(calib * win[None].astype(np.float32))).numpy()
    rss = np.sqrt((np.abs(img) ** 2).sum(0))
    # phase reference: the first principal component across coils, as the top eigenvector of the
    # coils x coils Gram matrix (an SVD of the coils x voxels matrix took 8 of the stage's 10.6 s at
    # 160x160x128, 16 coils), its phase fixed by its largest entry
    flat = img.reshape(nc, -1)
    sel = flat[:, rss.ravel() > 0.05 * rss.max()]
    _, vecs = np.linalg.eigh(sel @ sel.conj().T)
    u0 = vecs[:, -1]
    u0 = u0 * np.exp(-1j * np.angle(u0[np.argmax(np.abs(u0))]))
    ref = (u0.conj() @ flat).reshape(nz, ny, nx)
    phase = np.exp(-1j * np.angle(ref))
    return (img * phase / np.maximum(rss, eps * rss.max())).astype(np.complex64)


def espirit_maps(calib: np.ndarray, kernel_width: int = 4, thresh: float = 0.02) -> np.ndarray:
    """ESPIRiT sensitivities (SigPy's EspiritCalib) from the calibration region, without the
    eigenvalue crop (a crop zeroes the maps over parts of the brain with small calibration
    regions), normalised to unit root-sum-of-squares."""
    import sigpy.mri

    z0, z1, y0, y1 = _calib_box(calib)
    width = int(min(z1 - z0, y1 - y0))
    if width < kernel_width + 2:
        raise CalibrationError(f"calibration region {z1 - z0}x{y1 - y0} (kz x ky) is too small for "
                               f"ESPIRiT with kernel {kernel_width}; use coil_maps=lowres")
    maps = sigpy.mri.app.EspiritCalib(calib, calib_width=width, kernel_width=kernel_width,
                                      thresh=thresh, crop=0.0, show_pbar=False).run()
    rss = np.sqrt((np.abs(maps) ** 2).sum(0))
    return (maps / np.maximum(rss, 1e-6)).astype(np.complex64)


def coil_maps(calib: np.ndarray, method: str = "lowres", white: np.ndarray | None = None) -> np.ndarray:
    """Sensitivities (coils, nz, ny, nx) from calibration k-space.

    ``white``: the prewhitening matrix W the data went through. The maps are then estimated in the
    coils' own space, normalised to unit root-sum-of-squares there and whitened (W S), and scaled
    by one global constant (their median root-sum-of-squares). Normalising the whitened maps
    instead would divide PD by sqrt(S^H Psi^-1 S), a smooth profile of the noise covariance Psi
    (0.85-1.16 over the brain of the simulated 8-coil head, PD NRMSE 0.085 on its own), so PD is
    relative to the receive field as acquired (prescan-normalised on a scanner), not to the
    noise-weighted one."""
    if white is not None:
        raw = np.einsum("dc,c...->d...", np.linalg.inv(white).astype(np.complex64), calib)
        maps = np.einsum("dc,c...->d...", white.astype(np.complex64), coil_maps(raw, method))
        rss = np.sqrt((np.abs(maps) ** 2).sum(0))
        return (maps / max(float(np.median(rss)), 1e-30)).astype(np.complex64)
    if method == "espirit":
        return espirit_maps(calib)
    if method == "lowres":
        return lowres_maps(calib)
    raise CalibrationError(f"unknown coil_maps method '{method}': use 'espirit' or 'lowres'")
