"""Plain containers between the I/O layer and the reconstruction (no ISMRMRD in here)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class KSpaceLines:
    """Sampled Cartesian readout lines of a 3D multi-frame scan, stored compactly.

    data: (n_lines, coils, nx) complex64; frame, kz, ky: (n_lines,) integer indices into the
    (n_frames, nz, ny) grid (k-space centre at n//2); calib: (n_lines,) lines flagged as calibration.
    A long time series never needs the dense frames x coils x volume array.
    """
    data: np.ndarray
    frame: np.ndarray
    kz: np.ndarray
    ky: np.ndarray
    calib: np.ndarray
    n_frames: int
    nz: int
    ny: int

    @property
    def n_coils(self) -> int:
        return self.data.shape[1]

    @property
    def nx(self) -> int:
        return self.data.shape[2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.n_frames, self.nz, self.ny, self.nx

    def mask(self) -> np.ndarray:
        m = np.zeros((self.n_frames, self.nz, self.ny), dtype=bool)
        m[self.frame, self.kz, self.ky] = True
        return m

    def calib_mask(self) -> np.ndarray:
        m = np.zeros((self.nz, self.ny), dtype=bool)
        m[self.kz[self.calib], self.ky[self.calib]] = True
        return m

    def select(self, index: np.ndarray) -> "KSpaceLines":
        """The lines at ``index`` (integer indices or a boolean mask over the lines)."""
        return KSpaceLines(self.data[index], self.frame[index], self.kz[index], self.ky[index],
                           self.calib[index], self.n_frames, self.nz, self.ny)

    def acceleration(self) -> float:
        return self.n_frames * self.nz * self.ny / max(len(self.frame), 1)

    def dense(self) -> np.ndarray:
        """(coils, frames, nz, ny, nx) with zeros where nothing was sampled; for small scans."""
        k = np.zeros((self.n_coils, self.n_frames, self.nz, self.ny, self.nx), np.complex64)
        k[:, self.frame, self.kz, self.ky, :] = np.moveaxis(self.data, 0, 1)
        return k

    @classmethod
    def from_dense(cls, kspace: np.ndarray, mask: np.ndarray, calib_region: np.ndarray | None = None):
        f, z, y = np.nonzero(mask)
        data = np.ascontiguousarray(np.moveaxis(kspace[:, f, z, y, :], 0, 1)).astype(np.complex64)
        calib = calib_region[z, y] if calib_region is not None else np.zeros(len(f), bool)
        return cls(data, f, z, y, calib, mask.shape[0], mask.shape[1], mask.shape[2])


@dataclass
class Scan:
    """Everything the reconstruction needs from one measurement."""
    lines: KSpaceLines
    noise: np.ndarray | None        # (coils, samples) complex64 noise-only samples, or None
    protocol_yaml: str | None       # the protocol the data was acquired with
    protocol_name: str
    fov_mm: tuple[float, float, float]   # (x, y, z) of the reconstructed volume
    # (n_lines,) bool over ``lines``: calibration-only reference lines (used for the coil maps,
    # not fitted as imaging data); None: every line is imaging data
    reference_only: np.ndarray | None = None


MAP_NAMES = ("T1", "T2", "PD", "B1")     # the maps' names in images, truth files and metrics


@dataclass
class Maps:
    """The parameter maps of one reconstruction, (nz, ny, nx) float32 each: T1 and T2 [ms], PD
    [a.u., 99th percentile inside the mask = 1], B1 [flip-angle scale] where the protocol encodes it
    (else None); ``mask``: bool, the object support (every map is zero outside it)."""
    t1: np.ndarray
    t2: np.ndarray
    pd: np.ndarray
    mask: np.ndarray
    b1: np.ndarray | None = None

    def as_dict(self) -> dict:
        """{name: map} in MAP_NAMES order (B1 only where present): the images', truth files' and
        metrics' names."""
        out = {"T1": self.t1, "T2": self.t2, "PD": self.pd, "B1": self.b1}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, maps: dict, mask: np.ndarray) -> "Maps":
        return cls(t1=maps["T1"], t2=maps["T2"], pd=maps["PD"], mask=mask, b1=maps.get("B1"))


def named(maps: Maps | dict) -> dict:
    """{name: map}: a reconstruction's :class:`Maps`, or maps already by name (read back from
    images, or a truth file)."""
    return maps.as_dict() if isinstance(maps, Maps) else maps
