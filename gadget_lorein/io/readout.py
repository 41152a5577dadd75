"""One acquisition's line: its ISMRMRD flag bits (which lines are noise, calibration, reversed
or not ours) and readout oversampling (added by the raw-file writer, removed by the acquisition
buffer), shared by :mod:`gadget_lorein.io.rawfile` and :mod:`gadget_lorein.io.buffer`."""
from __future__ import annotations

import ismrmrd
import numpy as np


# Acquisitions the buffer does not use (returned as 'ignored' so a gadget may pass them on).
IGNORED_FLAGS = (ismrmrd.ACQ_IS_NAVIGATION_DATA, ismrmrd.ACQ_IS_PHASECORR_DATA,
                  ismrmrd.ACQ_IS_HPFEEDBACK_DATA, ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
                  ismrmrd.ACQ_IS_RTFEEDBACK_DATA, ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA,
                  30, 31)   # ACQ_IS_PHASE_STABILIZATION_REFERENCE / _STABILIZATION (not in older ismrmrd)


def bit(flag: int) -> int:
    return 1 << (flag - 1)


IGNORE_MASK = 0
for _f in IGNORED_FLAGS:
    IGNORE_MASK |= bit(_f)
NOISE_BIT = bit(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
CALIB_BITS = bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) | bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
REF_ONLY_BIT = bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)     # without _AND_IMAGING: reference only
CALIB_AND_IMAGING_BIT = bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
REVERSE_BIT = bit(ismrmrd.ACQ_IS_REVERSE)


def fft1c(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Centred orthonormal 1D FFT (same convention as gadget_lorein.fft, numpy flavour)."""
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x, axes=axis), axis=axis, norm="ortho"), axes=axis)


def ifft1c(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(x, axes=axis), axis=axis, norm="ortho"), axes=axis)


def centre_start(big: int, small: int) -> int:
    """First index of a length-``small`` window in a length-``big`` axis with the centres
    (index n//2) on top of each other."""
    return big // 2 - small // 2


def pad_readout(lines: np.ndarray, n_enc: int) -> np.ndarray:
    """k-space lines (..., nx) -> (..., n_enc): image zero-padded in x (readout FOV enlarged)."""
    nx = lines.shape[-1]
    if n_enc == nx:
        return lines
    img = ifft1c(lines)
    out = np.zeros(lines.shape[:-1] + (n_enc,), dtype=np.complex64)
    s = centre_start(n_enc, nx)
    out[..., s:s + nx] = img
    return fft1c(out).astype(np.complex64)


def crop_readout(lines: np.ndarray, nx: int) -> np.ndarray:
    """Remove readout oversampling: 1D iFFT, keep the central ``nx`` pixels, FFT back."""
    n_enc = lines.shape[-1]
    if n_enc == nx:
        return lines
    img = ifft1c(lines)
    s = centre_start(n_enc, nx)
    return fft1c(img[..., s:s + nx])
