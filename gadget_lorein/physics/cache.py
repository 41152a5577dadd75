"""The on-disk subspace cache: plain arrays in .npz files, nothing unpickled.

- the file name is the key's hash alone (``sub-<sha256>.npz``); the protocol name is only a label
  inside the file, so no protocol name (``../../x``, ``/tmp/x``) can place a file anywhere;
- the key covers the protocol's canonical parameters, rank, energy, CACHE_VERSION and a hash of the
  code that computes the entries (physics/sequences.py and physics/subspace.py): a changed signal
  model never reads an old table;
- every path is resolved and checked to lie inside the cache folder;
- files are read with ``numpy.load(allow_pickle=False)`` and their stored key is compared;
- writes go to a unique temporary file in the same folder (tempfile) and are renamed into place
  (os.replace), so concurrent builders never see half a file;
- the folder is trimmed to ``max_bytes`` (limits.CACHE_MAX_BYTES), least recently used first (a
  read refreshes a file's time).

The folder is $LOREIN_CACHE_DIR, else ~/.cache/gadget_lorein.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger(__name__)

CACHE_VERSION = 2          # raise when the stored arrays change meaning or layout
PREFIX, SUFFIX = "sub-", ".npz"
_CODE_FILES = ("sequences.py", "subspace.py")
_code_hash: str | None = None


def default_dir() -> Path:
    return Path(os.environ.get("LOREIN_CACHE_DIR") or Path.home() / ".cache" / "gadget_lorein")


def code_hash() -> str:
    """Hash of the source of the modules that compute the cached arrays."""
    global _code_hash
    if _code_hash is None:
        h = hashlib.sha256()
        here = Path(__file__).resolve().parent
        for name in _CODE_FILES:
            try:
                h.update((here / name).read_bytes())
            except OSError:
                h.update(name.encode())
        _code_hash = h.hexdigest()[:16]
    return _code_hash


def key(params: dict, rank: int | None, energy: float) -> str:
    """The cache key (hex sha256) of a protocol's parameters, rank and energy."""
    canon = yaml.safe_dump(params, sort_keys=True)
    text = f"v{CACHE_VERSION}|{code_hash()}|r{int(rank or 0)}|e{float(energy)!r}|{canon}"
    return hashlib.sha256(text.encode()).hexdigest()


def path_for(folder: Path | str, k: str) -> Path:
    """The file of key ``k`` inside ``folder`` (checked to stay inside it)."""
    if not (len(k) == 64 and all(c in "0123456789abcdef" for c in k)):
        raise ValueError(f"not a cache key: {k!r}")
    root = Path(folder).resolve()
    path = (root / f"{PREFIX}{k}{SUFFIX}").resolve()
    if path.parent != root:
        raise ValueError(f"cache path {path} is outside the cache folder {root}")
    return path


def load(folder: Path | str, k: str) -> dict | None:
    """The arrays stored under key ``k`` (a dict of numpy arrays), or None (missing, unreadable,
    or another key)."""
    path = path_for(folder, k)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
        if str(data.pop("key", "")) != k:
            raise ValueError("stored key differs")
    except Exception as err:          # a broken cache file is rebuilt, not fatal
        log.warning("subspace cache: %s unreadable (%s); rebuilding", path, err)
        return None
    try:
        os.utime(path)                 # recently used: evicted last
    except OSError:
        pass
    log.info("subspace: loaded %s from cache (%s)", data.get("label", ""), path)
    return data


def store(folder: Path | str, k: str, arrays: dict, max_bytes: int | None = None) -> Path | None:
    """Write ``arrays`` (numpy arrays of plain dtypes) under key ``k`` atomically, then trim the
    folder. Returns the path, or None when it could not be written (logged)."""
    from .. import limits
    max_bytes = limits.CACHE_MAX_BYTES if max_bytes is None else max_bytes
    root = Path(folder)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = path_for(root, k)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(k), **arrays)
        os.replace(tmp, path)
        tmp = None
    except (OSError, ValueError) as err:
        log.warning("subspace cache: could not write to %s: %s", root, err)
        return None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    trim(root, max_bytes, keep=path)
    return path


def trim(folder: Path | str, max_bytes: int, keep: Path | None = None) -> int:
    """Delete cache files, least recently used first, until the folder's cache files take at most
    ``max_bytes`` (``keep`` is never deleted). Returns how many were deleted."""
    entries = []
    for p in Path(folder).glob(f"{PREFIX}*{SUFFIX}"):
        try:
            st = p.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(e[1] for e in entries)
    removed = 0
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if keep is not None and p.resolve() == Path(keep).resolve():
            continue
        try:
            p.unlink()
            total -= size
            removed += 1
            log.info("subspace cache: evicted %s (cache over %d bytes)", p.name, max_bytes)
        except OSError:
            pass
    return removed
