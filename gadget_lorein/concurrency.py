"""Resource-aware concurrency on one machine: how many CPU threads one reconstruction uses (setting
``threads``) and how many fits run at once on one device (setting ``device_slots``).

Several reconstructions run at once when one Gadgetron server serves several clients (one gadget
process per connection) or ``lorein serve --forever`` serves several connections. On a GPU two fits
can run each other out of memory; on the CPU, N fits of T threads each on fewer than N x T cores
only slow each other down. ``device_slot`` is a queue across processes: a device has N slots, each
a file lock (``fcntl.flock``) in a folder of the machine's temporary directory (env
``LOREIN_SLOT_DIR`` overrides it; processes that should share a queue must see the same folder); a
fit takes a free slot or waits, logging that it waits, and the slot is freed when the fit ends or
its process dies (the kernel drops the lock). Only the fit holds a slot: receiving, buffering and
sending images do not.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

POLL_S = 0.2           # how often a waiting fit tries the slots again


def set_threads(n: int) -> None:
    """Bound the CPU threads of this process's reconstructions (0: torch's default, all cores)."""
    if n and n > 0:
        import torch
        torch.set_num_threads(int(n))
        log.info("threads: %d per reconstruction", n)


def slot_count(device, setting: int) -> int:
    """Slots of ``device``: the setting when > 0, else 1 on a GPU and no queue (0) on the CPU."""
    if setting and setting > 0:
        return int(setting)
    return 1 if _device_type(device) == "cuda" else 0


def _device_type(device) -> str:
    return getattr(device, "type", str(device).split(":")[0])


def device_name(device) -> str:
    """A name for the device that every process on the machine agrees on: cpu, or a GPU's UUID
    (indices differ between processes with different CUDA_VISIBLE_DEVICES), else cudaN."""
    kind = _device_type(device)
    if kind != "cuda":
        return kind
    import torch
    index = getattr(device, "index", None)
    if index is None:
        index = torch.cuda.current_device()
    try:
        return f"cuda-{torch.cuda.get_device_properties(index).uuid}"
    except Exception:       # an older torch without uuid
        return f"cuda{index}"


def slot_dir() -> Path:
    d = os.environ.get("LOREIN_SLOT_DIR") or os.path.join(tempfile.gettempdir(),
                                                           f"gadget_lorein-slots-{os.getuid()}")
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _try_lock(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def device_slot(device, setting: int, what: str = "", check: Callable | None = None,
                poll_s: float = POLL_S):
    """Hold one of the device's slots while the block runs (module docstring); no queue when the
    device has 0 slots. ``check()`` is called while waiting (raises to give up, e.g. a vanished
    peer)."""
    n = slot_count(device, setting)
    if n <= 0:
        yield None
        return
    name = device_name(device)
    files = [slot_dir() / f"{name}.slot{i}.lock" for i in range(n)]
    t0 = time.monotonic()
    fd = slot = None
    waited = False
    while fd is None:
        for i, path in enumerate(files):
            fd = _try_lock(path)
            if fd is not None:
                slot = i
                break
        if fd is None:
            if not waited:
                log.info("%swaiting for a free slot on %s (%d fit(s) at once: setting device_slots)",
                         what, device, n)
                waited = True
            if check is not None:
                check()
            time.sleep(poll_s)
    if waited:
        log.info("%sgot slot %d on %s after waiting %.1f s", what, slot, device, time.monotonic() - t0)
    try:
        yield slot
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
