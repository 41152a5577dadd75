"""BART (``bart`` on PATH, tested with 0.8.00) as the classical external peer of the accuracy
benchmark: a subspace PICS reconstruction with a locally low-rank penalty, then the package's own
dictionary matching. Benchmark code only: gadget_lorein never depends on BART.

    scan -> prewhiten -> kspace [x y z coils 1 T] (cfl, zeros = not sampled)
         -> ecalib -m1 on the first subspace coefficient's calibration k-space
         -> pics -B basis [1 1 1 1 1 T K] -R L:7:7:LAMBDA -> coefficients [x y z 1 1 1 K]
         -> support (recon.prepare's) -> SubspaceModel.match -> maps (PD normalised as recon)

Axes: gadget_lorein volumes are (nz, ny, nx); BART's cfl is column-major with dim0 = x, so arrays
are built as (x, y, z, ...) and written in Fortran order. Both use centred FFTs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np
import torch

from gadget_lorein.recon import calibration
from gadget_lorein.recon import pipeline as recon

# chosen once by a sweep of LAMBDA in 1e-4..1e-1 (pics scales the data itself, so LAMBDA is
# relative to the data scale) on qalas R=8, SNR 30, 40x32x24, 6 coils, seed 0: the value with the
# lowest mean of the T1 and T2 pure-tissue NRMSEs (ITERS kept at 50, not swept); the rank is
# the package subspace's own (build_subspace default energy).
LAMBDA = 0.05
ITERS = 50


def available() -> bool:
    return shutil.which("bart") is not None


def write_cfl(name: str, arr: np.ndarray) -> None:
    with open(name + ".hdr", "w") as f:
        f.write("# Dimensions\n" + " ".join(str(n) for n in arr.shape) + "\n")
    np.asarray(arr, np.complex64).ravel(order="F").tofile(name + ".cfl")


def read_cfl(name: str) -> np.ndarray:
    with open(name + ".hdr") as f:
        f.readline()
        dims = [int(n) for n in f.readline().split()]
    data = np.fromfile(name + ".cfl", np.complex64)
    return data.reshape(dims, order="F")


def bart(*args, cwd) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    res = subprocess.run(["bart", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"bart {' '.join(map(str, args))} failed: {res.stderr.strip()}")


def kspace_cfl(lines) -> np.ndarray:
    """KSpaceLines -> [x, y, z, coils, 1, T] with zeros where not sampled (a repeated line is
    averaged)."""
    ksp = np.zeros((lines.nx, lines.ny, lines.nz, lines.n_coils, 1, lines.n_frames), np.complex64)
    cnt = np.zeros((lines.ny, lines.nz, lines.n_frames))
    for i in range(len(lines.frame)):
        ky, kz, t = lines.ky[i], lines.kz[i], lines.frame[i]
        ksp[:, ky, kz, :, 0, t] += lines.data[i].T
        cnt[ky, kz, t] += 1
    ksp /= np.maximum(cnt, 1)[None, :, :, None, None, :]
    return ksp


def coefficients(scan, sub, lam: float = LAMBDA, iters: int = ITERS, workdir=None) -> np.ndarray:
    """BART's coefficient images (K, nz, ny, nx) of a scan, prewhitened."""
    lines = scan.lines
    if scan.noise is not None and scan.noise.size:
        lines = calibration.apply_coil_matrix(lines, calibration.whitening_matrix(scan.noise))
    basis = sub.basis.cpu().numpy().astype(np.complex64)           # (T, K)
    calib = calibration.calibration_kspace(lines, basis, sub.coefficient_covariance())  # (coils, nz, ny, nx)
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        write_cfl(os.path.join(d, "ksp"), kspace_cfl(lines))
        write_cfl(os.path.join(d, "basis"), basis.reshape((1,) * 5 + basis.shape))
        write_cfl(os.path.join(d, "calib"), np.transpose(calib, (3, 2, 1, 0)))
        sel = lines.calib
        box = [min(lines.nx, 24), int(np.ptp(lines.ky[sel])) + 1, int(np.ptp(lines.kz[sel])) + 1]
        # ESPIRiT's 6^3 kernel, smaller where the fully sampled centre BART finds is smaller
        # (ecalib asserts then); -c 0: no eigenvalue crop, the support masks the maps instead
        for k in range(6, 1, -1):
            kern = [min(k, b) for b in box]
            try:
                bart("ecalib", "-m1", "-c", 0, "-k", ":".join(map(str, kern)),
                     "-r", ":".join(map(str, box)), "calib", "sens", cwd=d)
                break
            except RuntimeError:
                if k == 2:
                    raise
        bart("pics", "-S", "-B", "basis", "-R", f"L:7:7:{lam:g}", "-i", iters, "ksp", "sens", "coef",
             cwd=d)
        coef = read_cfl(os.path.join(d, "coef"))                    # [x y z 1 1 1 K]
    coef = coef.reshape(coef.shape[:3] + (-1,))
    return np.ascontiguousarray(np.transpose(coef, (3, 2, 1, 0)))


def reconstruct(scan, lam: float = LAMBDA,
                iters: int = ITERS) -> recon.ReconResult:
    """Maps from one scan with BART (the subspace and support of gadget_lorein's front end)."""
    # the front end only (subspace, support): zerofill builds no network
    settings = recon.ReconSettings.from_mapping({"device": "cpu", "method": "zerofill"})
    proto, sub, _op, support, info = recon.prepare(scan, settings)
    x = torch.from_numpy(coefficients(scan, sub, lam, iters))
    maps = recon.match_maps(sub, x, support, proto.encodes_b1)
    info.update(method="bart", bart_lambda=lam, bart_iterations=iters)
    return recon.ReconResult(recon.finish_maps(maps, support), {}, info)
