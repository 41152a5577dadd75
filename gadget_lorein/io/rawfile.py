"""Raw ISMRMRD HDF5 files: :func:`write_raw` (one Cartesian encoding, a noise scan, then one
acquisition per sampled (frame, kz, ky) readout line) and :func:`read_raw` / :func:`iter_raw`, which
read a file through the same :class:`AcquisitionBuffer` as the node; :func:`read_stream` gives what
``lorein replay`` sends (header as stored, acquisitions, waveforms). The package's one reader of
acquisitions from files.

Speed: ``ismrmrd.Dataset.append_acquisition`` resizes the HDF5 table by one row per call (about
3 ms per acquisition) and ``read_acquisition`` costs about 4 ms each, so files are written and read
here in blocks with h5py, using ismrmrd's own HDF5 types (``ismrmrd.hdf5.acquisition_dtype``): the
layout is the one ``ismrmrd.Dataset`` and the C++ ``ISMRMRD::Dataset`` read and append to."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import h5py
import ismrmrd
import numpy as np
from ismrmrd.hdf5 import acquisition_dtype, acquisition_header_dtype, waveform_header_dtype

from ..data import KSpaceLines
from .buffer import AcquisitionBuffer
from .header import BANDWIDTH_PER_PIXEL_HZ, MRDError, RawScan, _vec3, build_header
from .readout import NOISE_BIT, bit, pad_readout


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def _fill_common_head(heads: np.ndarray, n_coils: int, n_samples: int, dwell_us: float,
                      measurement_uid: int) -> None:
    heads["version"] = 1
    heads["measurement_uid"] = measurement_uid
    heads["number_of_samples"] = n_samples
    heads["available_channels"] = n_coils
    heads["active_channels"] = n_coils
    cm = np.zeros(16, dtype=np.uint64)
    for c in range(n_coils):
        cm[c // 64] |= np.uint64(1) << np.uint64(c % 64)
    heads["channel_mask"] = cm
    heads["center_sample"] = n_samples // 2
    heads["sample_time_us"] = dwell_us
    heads["read_dir"] = (1.0, 0.0, 0.0)
    heads["phase_dir"] = (0.0, 1.0, 0.0)
    heads["slice_dir"] = (0.0, 0.0, 1.0)


def _vlen_column(rows: np.ndarray) -> np.ndarray:
    """(n, m) float32 -> object array of n float32 rows (h5py vlen)."""
    col = np.empty(rows.shape[0], dtype=object)
    for i in range(rows.shape[0]):
        col[i] = rows[i]
    return col


def _volume(kspace, mask, calib_region_mask):
    """One volume's sampled lines: (dims, frame, kz, ky, gather(sel) -> lines, calib flags)."""
    if isinstance(kspace, KSpaceLines):
        lines_obj = kspace
        dims = (lines_obj.n_coils, lines_obj.n_frames, lines_obj.nz, lines_obj.ny, lines_obj.nx)
        frame = np.asarray(lines_obj.frame, dtype=np.int64)
        kz = np.asarray(lines_obj.kz, dtype=np.int64)
        ky = np.asarray(lines_obj.ky, dtype=np.int64)
        order = np.lexsort((ky, kz, frame))
        frame, kz, ky = frame[order], kz[order], ky[order]

        def gather(sel):
            return np.asarray(lines_obj.data[order[sel]], dtype=np.complex64)
        calib = np.asarray(lines_obj.calib, dtype=bool)[order]
    else:
        kspace = np.asarray(kspace)
        if kspace.ndim != 5:
            raise ValueError(f"kspace must be (coils, frames, nz, ny, nx), got shape {kspace.shape}")
        dims = kspace.shape
        _, n_frames, nz, ny, _ = dims
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (n_frames, nz, ny):
            raise ValueError(f"mask shape {mask.shape} does not match k-space (frames, nz, ny) "
                             f"= {(n_frames, nz, ny)}")
        frame, kz, ky = np.nonzero(mask)            # C order: by frame, then kz, then ky

        def gather(sel):
            return np.ascontiguousarray(
                np.moveaxis(kspace[:, frame[sel], kz[sel], ky[sel], :], 0, 1)).astype(np.complex64)
        calib = np.zeros(len(frame), bool)
    nz, ny = dims[2], dims[3]
    if calib_region_mask is not None:
        if np.shape(calib_region_mask) != (nz, ny):
            raise ValueError(f"calib_region_mask shape {np.shape(calib_region_mask)} is not "
                             f"(nz, ny) = {(nz, ny)}")
        calib = np.asarray(calib_region_mask, dtype=bool)[kz, ky]
    if len(frame) == 0:
        raise ValueError("nothing is sampled")
    return dims, frame, kz, ky, gather, calib


def _noise_rows(noise, n_coils: int, n_samples: int):
    if noise is None:
        return None
    noise = np.asarray(noise, dtype=np.complex64)
    if noise.ndim != 2 or noise.shape[0] != n_coils:
        raise ValueError(f"noise must be (coils={n_coils}, samples), got {noise.shape}")
    n_noise = noise.shape[1] // n_samples
    if n_noise == 0:
        raise ValueError(f"noise needs at least {n_samples} samples (one readout)")
    return np.ascontiguousarray(
        noise[:, :n_noise * n_samples].reshape(n_coils, n_noise, n_samples).transpose(1, 0, 2))


def write_raw(path, kspace, mask, calib_region_mask, noise, protocol_name: str,
              protocol_yaml: str | None, fov_mm, sequence_parameters: dict | None,
              oversampling: int = 1, *, group: str = "dataset", measurement_uid: int = 1,
              field_strength_T: float = 3.0, extra_user_parameters: dict | None = None,
              block: int = 4096) -> int:
    """Write a raw ISMRMRD HDF5 file per the contract (docs/data-format.md).

    ``kspace``: (coils, frames, nz, ny, nx) complex at the recon matrix with ``mask``
    (frames, nz, ny) bool, or a :class:`KSpaceLines` (then ``mask`` may be None); or a list of
    KSpaceLines, one per repetition (a multi-volume scan: ``noise`` is then a list too, each
    repetition's noise scan written before its lines with its ``repetition`` index, and the header's
    repetition limit and ``lorein.n_lines`` are per repetition).
    ``calib_region_mask`` (nz, ny) bool: sampled lines inside it carry
    ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING (None: the KSpaceLines' own calib flags, else none).
    ``noise`` (coils, n) complex: written as n // (readout samples) noise acquisitions (a
    remainder is dropped); None writes no noise scan.
    ``oversampling`` > 1 writes oversampling x nx readout samples: each line's image is zero-padded
    along x (FOV x doubled for 2) and transformed back, as a scanner with readout oversampling does.
    An existing ``group`` in the file is replaced. Returns the number of acquisitions written.
    """
    os_ = int(oversampling)
    if os_ < 1:
        raise ValueError("oversampling must be >= 1")
    multi = isinstance(kspace, (list, tuple))
    spaces = list(kspace) if multi else [kspace]
    noises = list(noise) if multi and isinstance(noise, (list, tuple)) else [noise] * len(spaces)
    if not spaces or len(noises) != len(spaces):
        raise ValueError("give one noise scan (or None) per repetition")
    vols = [_volume(k, mask, calib_region_mask) for k in spaces]
    dims = vols[0][0]
    if any(v[0] != dims for v in vols):
        raise ValueError("the repetitions differ in coils, frames or matrix")
    n_coils, n_frames, nz, ny, nx = dims
    n_samples = nx * os_
    dwell_us = 1e6 / (BANDWIDTH_PER_PIXEL_HZ * n_samples)
    fov_mm = _vec3(fov_mm)
    noise_rows = [_noise_rows(n, n_coils, n_samples) for n in noises]
    n_lines = max(len(v[1]) for v in vols)

    full = n_frames * nz * ny
    xml = build_header(matrix=(nx, ny, nz), fov_mm=fov_mm, n_coils=n_coils, n_frames=n_frames,
                       protocol_name=protocol_name, protocol_yaml=protocol_yaml,
                       sequence_parameters=sequence_parameters, oversampling=os_,
                       measurement_uid=measurement_uid, field_strength_T=field_strength_T,
                       n_calibration_lines=int(np.count_nonzero(calib_region_mask))
                       if calib_region_mask is not None else None,
                       acceleration=full / len(vols[0][1]), n_lines=n_lines,
                       extra_user_parameters=extra_user_parameters, n_repetitions=len(vols))

    n_total = sum(len(v[1]) for v in vols) + sum(0 if r is None else r.shape[0] for r in noise_rows)
    with h5py.File(path, "a") as f:
        if group in f:
            del f[group]
        g = f.create_group(group)
        xd = g.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        xd[0] = xml.encode("utf-8")
        dset = g.create_dataset("data", shape=(n_total,), maxshape=(None,), dtype=acquisition_dtype,
                                chunks=(max(1, min(n_total, 1024)),))
        at = 0
        for rep, (vol, rows) in enumerate(zip(vols, noise_rows)):
            at = _write_volume(dset, at, vol, rows, rep, rep == len(vols) - 1, n_samples, dwell_us,
                               measurement_uid, block)
    return n_total


def _write_volume(dset, at: int, vol, noise_rows, rep: int, last: bool, n_samples: int,
                  dwell_us: float, measurement_uid: int, block: int) -> int:
    """One repetition's noise scan and lines, from row ``at``; returns the next row."""
    (n_coils, *_), frame, kz, ky, gather, calib = vol
    n_lines = len(frame)
    empty_traj = np.zeros(0, dtype=np.float32)
    stamp0 = 1000 + at
    n_noise = 0 if noise_rows is None else noise_rows.shape[0]
    if n_noise:
        rows = np.zeros(n_noise, dtype=acquisition_dtype)
        heads = np.zeros(n_noise, dtype=acquisition_header_dtype)
        _fill_common_head(heads, n_coils, n_samples, dwell_us, measurement_uid)
        heads["flags"] = NOISE_BIT
        heads["scan_counter"] = at + np.arange(1, n_noise + 1)
        heads["acquisition_time_stamp"] = stamp0 + np.arange(n_noise)
        heads["idx"]["repetition"] = rep
        rows["head"] = heads
        rows["data"] = _vlen_column(noise_rows.view(np.float32).reshape(n_noise, -1))
        rows["traj"] = _vlen_column(np.broadcast_to(empty_traj, (n_noise, 0)))
        dset[at:at + n_noise] = rows
    for s in range(0, n_lines, block):
        sel = slice(s, min(s + block, n_lines))
        m = sel.stop - sel.start
        data = pad_readout(gather(sel), n_samples)             # (m, coils, n_samples)
        heads = np.zeros(m, dtype=acquisition_header_dtype)
        _fill_common_head(heads, n_coils, n_samples, dwell_us, measurement_uid)
        idx = heads["idx"]
        idx["kspace_encode_step_1"] = ky[sel]
        idx["kspace_encode_step_2"] = kz[sel]
        idx["contrast"] = frame[sel]
        idx["repetition"] = rep
        li = np.arange(sel.start, sel.stop)
        heads["scan_counter"] = at + n_noise + 1 + li
        heads["acquisition_time_stamp"] = stamp0 + n_noise + 10 + li
        flags = np.where(calib[sel], np.uint64(bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)),
                         np.uint64(0))
        fr = frame[sel]
        prev_fr = np.where(li == 0, -1, frame[np.maximum(li - 1, 0)])
        next_fr = np.where(li == n_lines - 1, -1, frame[np.minimum(li + 1, n_lines - 1)])
        flags |= np.where(fr != prev_fr, np.uint64(bit(ismrmrd.ACQ_FIRST_IN_CONTRAST)), np.uint64(0))
        flags |= np.where(fr != next_fr, np.uint64(bit(ismrmrd.ACQ_LAST_IN_CONTRAST)), np.uint64(0))
        if sel.start == 0:
            flags[0] |= np.uint64(bit(ismrmrd.ACQ_FIRST_IN_SLICE) | bit(ismrmrd.ACQ_FIRST_IN_REPETITION))
        if sel.stop == n_lines:
            flags[-1] |= np.uint64(bit(ismrmrd.ACQ_LAST_IN_SLICE) | bit(ismrmrd.ACQ_LAST_IN_REPETITION)
                                   | (bit(ismrmrd.ACQ_LAST_IN_MEASUREMENT) if last else 0))
        heads["flags"] = flags
        rows = np.zeros(m, dtype=acquisition_dtype)
        rows["head"] = heads
        rows["data"] = _vlen_column(data.view(np.float32).reshape(m, -1))
        rows["traj"] = _vlen_column(np.broadcast_to(empty_traj, (m, 0)))
        dset[at + n_noise + sel.start:at + n_noise + sel.stop] = rows
    return at + n_noise + n_lines


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def _header_bytes(g) -> bytes:
    """The group's XML header as stored (a client sends it verbatim)."""
    if "xml" not in g:
        raise MRDError("the file has no ISMRMRD XML header (/<group>/xml)")
    x = g["xml"][0]
    return x if isinstance(x, bytes) else str(x).encode("utf-8")


def _rows(path, group: str, table: str, block: int):
    """The rows of ``/<group>/<table>``, read ``block`` rows at a time (row by row is ~100x slower);
    nothing when the group has no such table."""
    with h5py.File(path, "r") as f:
        if group not in f:
            raise MRDError(f"{path} has no group '{group}'")
        g = f[group]
        if table not in g:
            return
        d = g[table]
        for s in range(0, d.shape[0], block):
            yield from d[s:s + block]


def _acquisitions(path, group: str, block: int) -> Iterator[ismrmrd.Acquisition]:
    for row in _rows(path, group, "data", block):
        head = row["head"]
        nc, ns = int(head["active_channels"]), int(head["number_of_samples"])
        td = int(head["trajectory_dimensions"])
        raw = np.asarray(row["data"], dtype=np.float32)
        if raw.size != 2 * nc * ns:
            raise MRDError(f"acquisition {int(head['scan_counter'])} in {path}: {raw.size // 2} "
                           f"complex samples stored, header says {nc} x {ns}")
        traj = None
        if td:
            traj = np.asarray(row["traj"], dtype=np.float32).reshape(ns, td).copy()
        yield ismrmrd.Acquisition(head.tobytes(), data=raw.view(np.complex64).reshape(nc, ns).copy(),
                                  trajectory=traj)


def _waveforms(path, group: str, block: int) -> Iterator[ismrmrd.Waveform]:
    """Waveforms from ``/<group>/waveforms`` (as ``ismrmrd.Dataset.read_waveform``)."""
    for row in _rows(path, group, "waveforms", block):
        head = np.zeros((1,), dtype=waveform_header_dtype)
        head[0] = row["head"]
        wav = ismrmrd.Waveform(head)
        wav.data[:] = row["data"].view(np.uint32).reshape((wav.channels, wav.number_of_samples))
        yield wav


def iter_raw(path, group: str = "dataset", block: int = 4096) -> tuple[str, Iterator[ismrmrd.Acquisition]]:
    """(header_xml, acquisitions): the XML header text and a lazy iterator over the file's
    acquisitions as ``ismrmrd.Acquisition`` (in file order, read in blocks; the file is opened
    read-only). Waveforms and images in the group are not returned (:func:`read_stream` has them)."""
    with h5py.File(path, "r") as f:
        if group not in f:
            raise MRDError(f"{path} has no group '{group}' (groups: {list(f.keys())})")
        xml = _header_bytes(f[group]).decode("utf-8")
    return xml, _acquisitions(path, group, block)


@dataclass
class RawStream:
    """What a client sends of a raw file (``lorein replay``): the header as stored, and the
    acquisitions and waveforms, each a lazy iterator in file order (read in blocks)."""
    header: bytes
    n_acquisitions: int
    n_waveforms: int
    acquisitions: Iterator[ismrmrd.Acquisition]
    waveforms: Iterator[ismrmrd.Waveform]


def read_stream(path, group: str = "dataset", block: int = 256) -> RawStream:
    """The header, acquisitions and waveforms of ``/<group>``. Raises ``MRDError`` when the group
    or its header is missing, ``OSError`` when the file cannot be opened as HDF5."""
    with h5py.File(path, "r") as f:
        if group not in f:
            raise MRDError(f"{path} has no group '{group}' (groups: {list(f.keys())})")
        g = f[group]
        header = _header_bytes(g)
        n_acq = g["data"].shape[0] if "data" in g else 0
        n_wav = g["waveforms"].shape[0] if "waveforms" in g else 0
    return RawStream(header, n_acq, n_wav, _acquisitions(path, group, block),
                     _waveforms(path, group, block))


def read_raw(path, group: str = "dataset") -> RawScan:
    """Read a raw ISMRMRD file through :class:`AcquisitionBuffer`."""
    xml, acqs = iter_raw(path, group)
    buf = AcquisitionBuffer(xml)
    for acq in acqs:
        buf.add(acq)
    return buf.finish()
