"""A mistake in a command (:class:`UsageError`: the CLI reports it as one line and exits 2) and
the checks of a command's input and output files. Used by the CLI, the command runner and the
simulation's file writer, before anything heavy is loaded (standard library only; h5py on use)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


class UsageError(Exception):
    """A mistake in the command or its files; the CLI exits with status 2 and this one line."""


def check_output(path, what: str = "output") -> Path:
    """The output file's folder must exist and take a new file; the path must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {what} {path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lorein-write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write {what} {path}: {err.strerror or err}") from None
    return path


def check_input(path, what: str = "input", hdf5: bool = True) -> Path:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    if not path.is_file():
        raise UsageError(f"{what} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path} is not readable")
    if hdf5:
        import h5py
        if not h5py.is_hdf5(path):
            raise UsageError(f"{what} {path} is not an HDF5 file (an ISMRMRD raw file is expected)")
        try:
            with h5py.File(path, "r") as f:
                groups = sorted(f.keys())
                ok = "dataset" in f and "xml" in f["dataset"]
        except OSError as err:
            raise UsageError(f"{what} {path} cannot be read: {err}") from None
        if not ok:
            raise UsageError(f"{what} {path} has no ISMRMRD raw data (/dataset/xml); groups: "
                             f"{', '.join(groups) or 'none'}")
    return path
