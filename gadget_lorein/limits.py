"""Resource limits: every bound the node puts on its input, in one place, and the memory budget.

Input from the network (the ISMRMRD header, the acquisitions, the chain's configuration) is checked
against these bounds *before* anything large is allocated or started, so that a header asking for a
4096^3 matrix or 10^12 lines is refused at once with an error that names the number and the limit.

The bounds are module constants (raise them here, in one place, if a real scan needs more); the
memory ceiling is the one setting ``max_memory_gb`` (gadget setting / ``--max-memory-gb``): 0 (the
default) means ``MEMORY_FRACTION`` of the memory available when the scan starts (MemAvailable of
/proc/meminfo; on a CUDA device also that fraction of the GPU's free memory, torch.cuda.mem_get_info,
logged as a warning when the operator will not fit there: the fit then shrinks its coil batches,
and falls back to the CPU).

The memory estimate is deliberately simple (bytes of the largest arrays, not a profile): the k-space
lines buffer (lines x coils x readout x 8 bytes), the dictionary simulation and its SVD (atoms x
frames x 40 bytes: complex64 signals plus two complex128 copies) and the operator (coil maps,
coefficient images and FFT work arrays, voxels x 8 bytes x (coils x (2 + rank))). It errs on the high
side; ``max_memory_gb`` raises the ceiling where it is too cautious.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# --- the scan (ISMRMRD header and acquisitions) ------------------------------------------------
MAX_MATRIX = 1024                  # per axis: encoded readout (oversampling included), ky, kz
MAX_VOXELS = 512 * 512 * 512       # reconstructed voxels (nx * ny * nz)
MAX_COILS = 128                    # receiver channels
MAX_FRAMES = 5000                  # frames (contrasts / TRs)
MAX_LINES = 20_000_000             # imaging lines (userParameter lorein.n_lines, and as received)
MAX_NOISE_SAMPLES = 10_000_000     # noise samples per coil, all noise acquisitions together
MAX_VOLUMES = 4096                 # volumes of one stream: (repetitions) x (slices) in the encoding limits
MAX_OPEN_VOLUMES = 4               # volumes buffered at once (interleaved repetitions / slabs); all of
                                   # them together stay under the memory ceiling (max_memory_gb)

# --- the protocol (sequence YAML) ---------------------------------------------------------------
MAX_PROTOCOL_YAML_BYTES = 256 * 1024   # inline protocol YAML in the header
MAX_DICTIONARY_ATOMS = 2_000_000       # T1 x T2 x B1 grid points
MAX_DICTIONARY_AXIS = 2000             # points along one dictionary axis
MAX_EPG_STATES = 512                   # MRF: EPG dephasing states
MAX_N_TR = MAX_FRAMES                  # MRF: TRs (= frames)

# --- the reconstruction settings ----------------------------------------------------------------
MAX_ITERATIONS = 100_000
MAX_RANK = 64
MAX_MLP_WIDTH = 1024
MAX_GRID_RESOLUTION = 4096         # grid_base, grid_finest, lrr_finest
MAX_VIRTUAL_COILS = MAX_COILS

# --- memory ---------------------------------------------------------------------------------------
MEMORY_FRACTION = 0.8              # default ceiling: this fraction of the available memory

# --- the listener (lorein serve) ------------------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"         # loopback; --host widens it (a warning is logged)
CONFIG_TIMEOUT_S = 30.0            # longest wait for the configuration and the header
MESSAGE_TIMEOUT_S = 300.0          # longest silence between two messages of a stream
MAX_CONNECTIONS = 4                # lorein serve --forever: connections served at once (one process each)
PEER_POLL_S = 0.5                  # during the fit: how often the watchdog checks that the peer is there

# --- the subspace cache ---------------------------------------------------------------------------
CACHE_MAX_BYTES = 2 * 1024 ** 3    # the cache folder is trimmed (oldest first) to this size

GIB = 1024 ** 3


class ResourceError(ValueError):
    """Input over a resource limit; the message names the number, the limit and how to raise it."""


def check(what: str, value, limit, hint: str = "") -> None:
    """Raise ResourceError when ``value`` exceeds ``limit``."""
    if value is not None and value > limit:
        raise ResourceError(f"{what} = {value} exceeds the limit {limit}"
                            + (f" ({hint})" if hint else " (gadget_lorein/limits.py)"))


def check_scan(nx_enc: int, nx: int, ny: int, nz: int, n_frames: int, n_coils: int | None,
               n_lines: int | None) -> None:
    """The header's sizes (before the acquisition buffer allocates anything)."""
    check("encoded readout (encodedSpace matrixSize x)", nx_enc, MAX_MATRIX)
    check("matrix y", ny, MAX_MATRIX)
    check("matrix z", nz, MAX_MATRIX)
    check("voxels (x * y * z)", nx * ny * nz, MAX_VOXELS)
    check("frames", n_frames, MAX_FRAMES)
    check("receiver channels", n_coils, MAX_COILS)
    check("imaging lines (userParameter lorein.n_lines)", n_lines, MAX_LINES)


def dictionary_atoms(params: dict) -> int:
    d = params.get("dictionary") or {}
    n = 1
    for key in ("t1_ms", "t2_ms") + (("b1",) if params.get("encodes_b1") else ()):
        axis = d.get(key)
        size = int(axis[2]) if isinstance(axis, (list, tuple)) and len(axis) >= 3 else 1
        check(f"dictionary {key} points", size, MAX_DICTIONARY_AXIS)
        n *= max(size, 1)
    return n


def check_protocol(proto) -> int:
    """A protocol's sizes (before its dictionary is simulated). Returns the number of atoms."""
    params = proto.params
    if proto.kind == "mrf":
        check("protocol n_tr", int(params.get("n_tr", 0)), MAX_N_TR)
        check("protocol epg_states", int(params.get("epg_states", 64)), MAX_EPG_STATES)
    check("protocol frames", proto.n_frames, MAX_FRAMES)
    atoms = dictionary_atoms(params)
    check("dictionary atoms", atoms, MAX_DICTIONARY_ATOMS)
    return atoms


def check_settings(rs) -> None:
    """The reconstruction settings that size the fit (recon.ReconSettings)."""
    check("setting iterations", rs.iterations, MAX_ITERATIONS)
    check("setting rank", rs.rank, MAX_RANK)
    check("setting mlp_width", rs.mlp_width, MAX_MLP_WIDTH)
    check("setting virtual_coils", rs.virtual_coils, MAX_VIRTUAL_COILS)
    for name in ("grid_base", "grid_finest", "lrr_finest"):
        check(f"setting {name}", getattr(rs, name), MAX_GRID_RESOLUTION)


def host_available_bytes() -> int:
    """MemAvailable (Linux), else physical memory, else 0 (unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def gpu_free_bytes(device) -> int | None:
    """Free memory of a CUDA device (torch.cuda.mem_get_info), None for other devices."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    import torch
    try:
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    except Exception:       # no driver, no such device: the reconstruction reports it itself
        return None


def memory_budget(max_memory_gb: float = 0.0) -> int:
    """The host memory ceiling in bytes: ``max_memory_gb`` when > 0, else MEMORY_FRACTION of the
    available memory (unknown: no ceiling)."""
    if max_memory_gb and max_memory_gb > 0:
        return int(max_memory_gb * GIB)
    avail = host_available_bytes()
    return int(MEMORY_FRACTION * avail) if avail > 0 else 1 << 62


def estimate_bytes(nx: int, ny: int, nz: int, n_frames: int, n_coils: int, n_lines: int,
                   atoms: int, rank: int = 0, virtual_coils: int = 0) -> dict:
    """{'buffer', 'dictionary', 'operator'}: bytes of the reconstruction's largest arrays."""
    k = rank or 16                      # the automatic rank is rarely above this
    c = min(virtual_coils, n_coils) if virtual_coils else n_coils
    vox = nx * ny * nz
    return {"buffer": n_lines * n_coils * nx * 8,
            "dictionary": atoms * n_frames * 40 + atoms * k * 8,
            "operator": vox * 8 * c * (2 + k)}


def _gb(n: int) -> str:
    return f"{n / GIB:.3g} GB"


def check_memory(estimate: dict, max_memory_gb: float = 0.0, device=None) -> None:
    """Raise ResourceError when the estimate exceeds the ceiling (see the module docstring)."""
    total = sum(estimate.values())
    budget = memory_budget(max_memory_gb)
    parts = ", ".join(f"{k} {_gb(v)}" for k, v in estimate.items())
    if total > budget:
        raise ResourceError(
            f"the reconstruction needs an estimated {_gb(total)} ({parts}), over the memory limit "
            f"{_gb(budget)} (setting max_memory_gb; default {MEMORY_FRACTION:.0%} of the available memory)")
    free = gpu_free_bytes(device) if device is not None else None
    if free is not None and estimate["operator"] > MEMORY_FRACTION * free:
        # not refused: the reconstruction halves its coil batches on a CUDA out-of-memory, down to
        # one coil, and then runs on the CPU (whose memory was checked above)
        log.warning("the operator needs an estimated %s on %s, which has %s free: expect smaller coil "
                    "batches or the CPU fallback", _gb(estimate["operator"]), device, _gb(free))


def is_loopback(host: str) -> bool:
    import ipaddress
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

