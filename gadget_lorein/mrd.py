"""ISMRMRD input/output: the raw-data contract, the acquisition buffer and the map images.

This is the only module (besides the gadget and the command line) that speaks ISMRMRD; the
reconstruction sees plain numpy containers (:mod:`gadget_lorein.data`). The raw-file contract is
written out in ``docs/data-format.md``.

Raw data
    :func:`build_header` / :func:`write_raw` write a raw ISMRMRD HDF5 file (one Cartesian encoding,
    a noise scan, then one acquisition per sampled (frame, kz, ky) readout line).
    :class:`AcquisitionBuffer` places streamed acquisitions (from Gadgetron, or from a file) on the
    k-space grid, removes readout oversampling and collects the noise scan; :meth:`finish` gives a
    :class:`RawScan`. :func:`read_raw` / :func:`iter_raw` read a file through the same buffer.

Images
    :func:`maps_to_images` turns parameter maps (T1, T2, PD, B1, ...) into float32 ISMRMRD images
    with Gadgetron meta attributes; :func:`images_to_maps` is the inverse. :func:`write_images` /
    :func:`read_images` store them like ``gadgetron_ismrmrd_client`` does
    (``/<group>/image_<series index>``).

Speed: ``ismrmrd.Dataset.append_acquisition`` resizes the HDF5 table by one row per call (about
3 ms per acquisition, minutes for 50k lines) and ``read_acquisition`` costs about 4 ms each, so the
raw file is written and read here in blocks with h5py, using ismrmrd's own HDF5 types
(``ismrmrd.hdf5.acquisition_dtype``): the file is byte-for-byte the same layout that
``ismrmrd.Dataset`` and the C++ ``ISMRMRD::Dataset`` read and append to.

Works with ismrmrd-python 1.14 and 1.15, numpy 1.26 and 2.x (:func:`header_to_xml` mends the one
place where ismrmrd 1.14 breaks beside the xsdata that the official Gadgetron images pin).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
from ismrmrd.hdf5 import acquisition_dtype, acquisition_header_dtype

from .data import KSpaceLines, Scan

__all__ = [
    "MRDError", "Geometry", "RawScan", "AcquisitionBuffer",
    "build_header", "header_to_xml", "write_raw", "read_raw", "iter_raw", "parse_header", "user_parameters",
    "maps_to_images", "images_to_maps", "write_images", "read_images",
    "MAP_SERIES", "MAP_UNITS", "MAP_DATA_ROLES",
]

FORMAT_VERSION = 1
GAMMA_HZ_PER_T = 42.57747892e6           # proton gyromagnetic ratio / 2 pi
BANDWIDTH_PER_PIXEL_HZ = 250.0           # simulated readout bandwidth -> sample_time_us

# user parameters of the raw header
UP_PROTOCOL = "lorein.protocol"
UP_PROTOCOL_YAML = "lorein.protocol_yaml"
UP_N_FRAMES = "lorein.n_frames"
UP_OVERSAMPLING = "lorein.readout_oversampling"
UP_N_CALIB = "lorein.n_calibration_lines"
UP_ACCEL = "lorein.acceleration"
UP_N_LINES = "lorein.n_lines"
UP_FORMAT = "lorein.format_version"

# Acquisitions the buffer does not use (returned as 'ignored' so a gadget may pass them on).
_IGNORED_FLAGS = (ismrmrd.ACQ_IS_NAVIGATION_DATA, ismrmrd.ACQ_IS_PHASECORR_DATA,
                  ismrmrd.ACQ_IS_HPFEEDBACK_DATA, ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
                  ismrmrd.ACQ_IS_RTFEEDBACK_DATA, ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA,
                  30, 31)   # ACQ_IS_PHASE_STABILIZATION_REFERENCE / _STABILIZATION (not in older ismrmrd)


def _bit(flag: int) -> int:
    return 1 << (flag - 1)


_IGNORE_MASK = 0
for _f in _IGNORED_FLAGS:
    _IGNORE_MASK |= _bit(_f)
_NOISE_BIT = _bit(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
_CALIB_BITS = _bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) | _bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
_REVERSE_BIT = _bit(ismrmrd.ACQ_IS_REVERSE)


class MRDError(ValueError):
    """ISMRMRD data that does not meet the raw-data contract (docs/data-format.md)."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def _fft1c(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Centred orthonormal 1D FFT (same convention as gadget_lorein.fft, numpy flavour)."""
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x, axes=axis), axis=axis, norm="ortho"), axes=axis)


def _ifft1c(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(x, axes=axis), axis=axis, norm="ortho"), axes=axis)


def _centre_start(big: int, small: int) -> int:
    """First index of a length-``small`` window in a length-``big`` axis with the centres
    (index n//2) on top of each other."""
    return big // 2 - small // 2


def _pad_readout(lines: np.ndarray, n_enc: int) -> np.ndarray:
    """k-space lines (..., nx) -> (..., n_enc): image zero-padded in x (readout FOV enlarged)."""
    nx = lines.shape[-1]
    if n_enc == nx:
        return lines
    img = _ifft1c(lines)
    out = np.zeros(lines.shape[:-1] + (n_enc,), dtype=np.complex64)
    s = _centre_start(n_enc, nx)
    out[..., s:s + nx] = img
    return _fft1c(out).astype(np.complex64)


def _crop_readout(lines: np.ndarray, nx: int) -> np.ndarray:
    """Remove readout oversampling: 1D iFFT, keep the central ``nx`` pixels, FFT back."""
    n_enc = lines.shape[-1]
    if n_enc == nx:
        return lines
    img = _ifft1c(lines)
    s = _centre_start(n_enc, nx)
    return _fft1c(img[..., s:s + nx])


def _vec3(v) -> tuple[float, float, float]:
    return tuple(float(a) for a in v)


# --------------------------------------------------------------------------------------------
# geometry and the raw scan container
# --------------------------------------------------------------------------------------------

@dataclass
class Geometry:
    """Where the reconstructed volume sits (ISMRMRD patient coordinates, mm).

    ``matrix`` (nx, ny, nz) and ``fov_mm`` (x, y, z) are the recon space; ``position`` is the centre
    of the volume, i.e. of voxel (nz//2, ny//2, nx//2) under the centred-FFT convention; the three
    direction cosines give the readout (x), phase (y) and partition (z) axes.
    """
    matrix: tuple[int, int, int]
    fov_mm: tuple[float, float, float]
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    read_dir: tuple[float, float, float] = (1.0, 0.0, 0.0)
    phase_dir: tuple[float, float, float] = (0.0, 1.0, 0.0)
    slice_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)
    patient_table_position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    measurement_uid: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape (nz, ny, nx)."""
        nx, ny, nz = self.matrix
        return (nz, ny, nx)

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        return tuple(f / n for f, n in zip(self.fov_mm, self.matrix))


@dataclass
class RawScan:
    """A raw scan as read from ISMRMRD.

    The sampled lines are kept compactly in ``lines`` (:class:`gadget_lorein.data.KSpaceLines`,
    readout oversampling already removed, sorted by frame, kz, ky, repeated lines averaged);
    ``kspace``, ``mask`` and ``calib_mask`` are the dense views the contract describes, computed on
    demand (a dense MRF k-space with hundreds of frames does not fit in memory; use ``lines``).
    """
    lines: KSpaceLines
    noise: np.ndarray | None                # (coils, samples) complex64 noise-only samples
    geometry: Geometry
    protocol_name: str
    protocol_yaml: str | None
    n_frames: int
    header_xml: str
    sample_time_us: float | None = None     # dwell time of the imaging lines (as acquired)
    noise_sample_time_us: float | None = None
    n_ignored: int = 0                      # acquisitions skipped (navigators, dummies, ...)
    n_repeated: int = 0                     # lines acquired more than once (averaged)

    @property
    def kspace(self) -> np.ndarray:
        """Dense (coils, frames, nz, ny, nx) complex64, zeros where not sampled."""
        return self.lines.dense()

    @property
    def mask(self) -> np.ndarray:
        """(frames, nz, ny) bool: the sampled lines."""
        return self.lines.mask()

    @property
    def calib_mask(self) -> np.ndarray:
        """(nz, ny) bool: lines flagged as parallel-imaging calibration in any frame."""
        return self.lines.calib_mask()

    @property
    def n_coils(self) -> int:
        return self.lines.n_coils

    def to_scan(self) -> Scan:
        """The reconstruction's input container."""
        return Scan(self.lines, self.noise, self.protocol_yaml, self.protocol_name,
                    tuple(self.geometry.fov_mm))


# --------------------------------------------------------------------------------------------
# header
# --------------------------------------------------------------------------------------------

_SEQ_LIST_KEYS = ("TR", "TE", "TI", "flipAngle_deg", "echo_spacing")


def _as_float_list(v) -> list[float]:
    if v is None:
        return []
    if np.ndim(v) == 0:
        return [float(v)]
    return [float(a) for a in np.asarray(v, dtype=float).ravel()]


def _clean_text(text: str, what: str) -> str:
    """XML can carry neither \\r (normalised to \\n by parsers) nor most control characters."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", text):
        raise ValueError(f"{what} contains control characters that XML cannot carry")
    return text


def build_header(*, matrix, fov_mm, n_coils: int, n_frames: int, protocol_name: str,
                 protocol_yaml: str | None = None, sequence_parameters: dict | None = None,
                 oversampling: int = 1, measurement_uid: int = 1, field_strength_T: float = 3.0,
                 n_calibration_lines: int | None = None, acceleration: float | None = None,
                 n_lines: int | None = None, extra_user_parameters: dict | None = None) -> str:
    """The ISMRMRD XML header (``ismrmrd.xsd`` serialised, UTF-8) of a raw scan.

    ``matrix`` (nx, ny, nz) and ``fov_mm`` (x, y, z) are the recon space; the encoded space has
    ``oversampling`` x nx readout samples over ``oversampling`` x the x FOV. ``sequence_parameters``
    holds TR, TE, TI, flipAngle_deg, echo_spacing (ms / degrees, scalars or lists) and
    sequence_type (see ``gadget_lorein.sequences.sequence_parameters``).
    ``extra_user_parameters`` {name: value} adds userParameterLong (int), userParameterDouble
    (float) or userParameterString (str) entries.
    """
    nx, ny, nz = (int(v) for v in matrix)
    fx, fy, fz = (float(v) for v in fov_mm)
    os_ = int(oversampling)
    if min(nx, ny, nz) < 1 or os_ < 1 or n_frames < 1 or n_coils < 1:
        raise ValueError("matrix, oversampling, n_frames and n_coils must be positive")

    def space(mx, fovx):
        return xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=mx, y=ny, z=nz),
                                     fieldOfView_mm=xsd.fieldOfViewMm(x=fovx, y=fy, z=fz))

    limits = xsd.encodingLimitsType(
        kspace_encoding_step_0=xsd.limitType(minimum=0, maximum=nx * os_ - 1, center=(nx * os_) // 2),
        kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=ny - 1, center=ny // 2),
        kspace_encoding_step_2=xsd.limitType(minimum=0, maximum=nz - 1, center=nz // 2),
        average=xsd.limitType(minimum=0, maximum=0, center=0),
        slice=xsd.limitType(minimum=0, maximum=0, center=0),
        contrast=xsd.limitType(minimum=0, maximum=int(n_frames) - 1, center=0),
        phase=xsd.limitType(minimum=0, maximum=0, center=0),
        repetition=xsd.limitType(minimum=0, maximum=0, center=0),
        set=xsd.limitType(minimum=0, maximum=0, center=0),
        segment=xsd.limitType(minimum=0, maximum=0, center=0),
    )
    encoding = xsd.encodingType(encodedSpace=space(nx * os_, fx * os_), reconSpace=space(nx, fx),
                                encodingLimits=limits, trajectory=xsd.trajectoryType("cartesian"))

    seq = dict(sequence_parameters or {})
    unknown = set(seq) - set(_SEQ_LIST_KEYS) - {"sequence_type"}
    if unknown:
        raise ValueError(f"unknown sequence_parameters keys {sorted(unknown)}; "
                         f"known: {list(_SEQ_LIST_KEYS) + ['sequence_type']}")
    seq_params = xsd.sequenceParametersType(
        TR=_as_float_list(seq.get("TR")), TE=_as_float_list(seq.get("TE")),
        TI=_as_float_list(seq.get("TI")), flipAngle_deg=_as_float_list(seq.get("flipAngle_deg")),
        echo_spacing=_as_float_list(seq.get("echo_spacing")),
        sequence_type=str(seq["sequence_type"]) if seq.get("sequence_type") else None)

    ups = xsd.userParametersType()
    ups.userParameterString.append(xsd.userParameterStringType(name=UP_PROTOCOL, value=str(protocol_name)))
    if protocol_yaml is not None:
        ups.userParameterString.append(xsd.userParameterStringType(
            name=UP_PROTOCOL_YAML, value=_clean_text(protocol_yaml, "protocol YAML")))
    ups.userParameterLong.append(xsd.userParameterLongType(name=UP_N_FRAMES, value=int(n_frames)))
    ups.userParameterLong.append(xsd.userParameterLongType(name=UP_OVERSAMPLING, value=os_))
    ups.userParameterLong.append(xsd.userParameterLongType(name=UP_FORMAT, value=FORMAT_VERSION))
    if n_calibration_lines is not None:
        ups.userParameterLong.append(xsd.userParameterLongType(name=UP_N_CALIB, value=int(n_calibration_lines)))
    if n_lines is not None:
        ups.userParameterLong.append(xsd.userParameterLongType(name=UP_N_LINES, value=int(n_lines)))
    if acceleration is not None:
        ups.userParameterDouble.append(xsd.userParameterDoubleType(name=UP_ACCEL, value=float(acceleration)))
    for name, value in (extra_user_parameters or {}).items():
        if isinstance(value, (bool, int, np.integer)):
            ups.userParameterLong.append(xsd.userParameterLongType(name=name, value=int(value)))
        elif isinstance(value, (float, np.floating)):
            ups.userParameterDouble.append(xsd.userParameterDoubleType(name=name, value=float(value)))
        else:
            ups.userParameterString.append(xsd.userParameterStringType(
                name=name, value=_clean_text(str(value), f"user parameter {name}")))

    header = xsd.ismrmrdHeader(
        measurementInformation=xsd.measurementInformationType(
            measurementID=f"LOREIN_{protocol_name}_{int(measurement_uid)}",
            patientPosition=xsd.patientPositionType("HFS"),
            protocolName=str(protocol_name),
            sequenceName=seq_params.sequence_type),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="gadget_lorein simulator", systemModel="gadget_lorein",
            systemFieldStrength_T=float(field_strength_T),
            relativeReceiverNoiseBandwidth=1.0,        # simulated white noise, no receiver filter
            receiverChannels=int(n_coils)),
        experimentalConditions=xsd.experimentalConditionsType(
            H1resonanceFrequency_Hz=int(round(GAMMA_HZ_PER_T * float(field_strength_T)))),
        encoding=[encoding],
        sequenceParameters=seq_params,
        userParameters=ups,
    )
    return header_to_xml(header)


def header_to_xml(header: xsd.ismrmrdHeader) -> str:
    """``ismrmrd.xsd.ToXML(header, encoding="utf-8")``, also under ismrmrd-python 1.14 with xsdata
    >= 24 (the official Gadgetron images pin ismrmrd-python 1.14.0 with xsdata 24.5). There 1.14's
    ToXML passes its SerializerConfig positionally, into the field that xsdata 24 made the first
    (``context``), and fails with AttributeError; 1.15 passes it by name, as done here."""
    try:
        return xsd.ToXML(header, encoding="utf-8")
    except AttributeError:
        from xsdata.formats.dataclass.serializers import XmlSerializer
        from xsdata.formats.dataclass.serializers.config import SerializerConfig
        serializer = XmlSerializer(config=SerializerConfig(encoding="utf-8", indent=" "))
        return serializer.render(header, ns_map={"": "http://www.ismrm.org/ISMRMRD"})


def parse_header(header) -> xsd.ismrmrdHeader:
    """An ``ismrmrd.xsd.ismrmrdHeader`` from XML text/bytes (or passed through)."""
    if isinstance(header, xsd.ismrmrdHeader):
        return header
    try:
        return xsd.CreateFromDocument(header)
    except Exception as err:  # xsdata raises its own ParserError
        raise MRDError(f"the ISMRMRD XML header does not parse: {err}") from None


def user_parameters(header) -> dict:
    """All userParameters {name: value} (Long -> int, Double -> float, String -> str)."""
    h = parse_header(header)
    out = {}
    ups = h.userParameters
    if ups is None:
        return out
    for p in ups.userParameterLong:
        out[p.name] = int(p.value)
    for p in ups.userParameterDouble:
        out[p.name] = float(p.value)
    for p in ups.userParameterString:
        out[p.name] = p.value
    return out


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


def write_raw(path, kspace, mask, calib_region_mask, noise, protocol_name: str,
              protocol_yaml: str | None, fov_mm, sequence_parameters: dict | None,
              oversampling: int = 1, *, group: str = "dataset", measurement_uid: int = 1,
              field_strength_T: float = 3.0, extra_user_parameters: dict | None = None,
              block: int = 4096) -> int:
    """Write a raw ISMRMRD HDF5 file per the contract (docs/data-format.md).

    ``kspace``: (coils, frames, nz, ny, nx) complex at the recon matrix with ``mask``
    (frames, nz, ny) bool, or a :class:`KSpaceLines` (then ``mask`` may be None).
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
    if isinstance(kspace, KSpaceLines):
        lines_obj = kspace
        n_coils, nx = lines_obj.n_coils, lines_obj.nx
        n_frames, nz, ny = lines_obj.n_frames, lines_obj.nz, lines_obj.ny
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
        n_coils, n_frames, nz, ny, nx = kspace.shape
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (n_frames, nz, ny):
            raise ValueError(f"mask shape {mask.shape} does not match k-space (frames, nz, ny) "
                             f"= {(n_frames, nz, ny)}")
        frame, kz, ky = np.nonzero(mask)            # C order: by frame, then kz, then ky

        def gather(sel):
            return np.ascontiguousarray(
                np.moveaxis(kspace[:, frame[sel], kz[sel], ky[sel], :], 0, 1)).astype(np.complex64)
        calib = np.zeros(len(frame), bool)
    if calib_region_mask is not None:
        if np.shape(calib_region_mask) != (nz, ny):
            raise ValueError(f"calib_region_mask shape {np.shape(calib_region_mask)} is not "
                             f"(nz, ny) = {(nz, ny)}")
        calib = np.asarray(calib_region_mask, dtype=bool)[kz, ky]
    n_lines = len(frame)
    if n_lines == 0:
        raise ValueError("nothing is sampled")

    n_samples = nx * os_
    dwell_us = 1e6 / (BANDWIDTH_PER_PIXEL_HZ * n_samples)
    fov_mm = _vec3(fov_mm)

    # noise scan
    noise_rows = None
    if noise is not None:
        noise = np.asarray(noise, dtype=np.complex64)
        if noise.ndim != 2 or noise.shape[0] != n_coils:
            raise ValueError(f"noise must be (coils={n_coils}, samples), got {noise.shape}")
        n_noise = noise.shape[1] // n_samples
        if n_noise == 0:
            raise ValueError(f"noise needs at least {n_samples} samples (one readout)")
        noise_rows = np.ascontiguousarray(
            noise[:, :n_noise * n_samples].reshape(n_coils, n_noise, n_samples).transpose(1, 0, 2))
    n_noise = 0 if noise_rows is None else noise_rows.shape[0]

    full = n_frames * nz * ny
    xml = build_header(matrix=(nx, ny, nz), fov_mm=fov_mm, n_coils=n_coils, n_frames=n_frames,
                       protocol_name=protocol_name, protocol_yaml=protocol_yaml,
                       sequence_parameters=sequence_parameters, oversampling=os_,
                       measurement_uid=measurement_uid, field_strength_T=field_strength_T,
                       n_calibration_lines=int(np.count_nonzero(calib_region_mask))
                       if calib_region_mask is not None else None,
                       acceleration=full / n_lines, n_lines=n_lines,
                       extra_user_parameters=extra_user_parameters)

    n_total = n_noise + n_lines
    empty_traj = np.zeros(0, dtype=np.float32)
    with h5py.File(path, "a") as f:
        if group in f:
            del f[group]
        g = f.create_group(group)
        xd = g.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        xd[0] = xml.encode("utf-8")
        dset = g.create_dataset("data", shape=(n_total,), maxshape=(None,), dtype=acquisition_dtype,
                                chunks=(max(1, min(n_total, 1024)),))
        stamp0 = 1000
        if n_noise:
            rows = np.zeros(n_noise, dtype=acquisition_dtype)
            heads = np.zeros(n_noise, dtype=acquisition_header_dtype)
            _fill_common_head(heads, n_coils, n_samples, dwell_us, measurement_uid)
            heads["flags"] = _NOISE_BIT
            heads["scan_counter"] = np.arange(1, n_noise + 1)
            heads["acquisition_time_stamp"] = stamp0 + np.arange(n_noise)
            rows["head"] = heads
            rows["data"] = _vlen_column(noise_rows.view(np.float32).reshape(n_noise, -1))
            rows["traj"] = _vlen_column(np.broadcast_to(empty_traj, (n_noise, 0)))
            dset[0:n_noise] = rows
        for s in range(0, n_lines, block):
            sel = slice(s, min(s + block, n_lines))
            m = sel.stop - sel.start
            data = _pad_readout(gather(sel), n_samples)             # (m, coils, n_samples)
            heads = np.zeros(m, dtype=acquisition_header_dtype)
            _fill_common_head(heads, n_coils, n_samples, dwell_us, measurement_uid)
            idx = heads["idx"]
            idx["kspace_encode_step_1"] = ky[sel]
            idx["kspace_encode_step_2"] = kz[sel]
            idx["contrast"] = frame[sel]
            li = np.arange(sel.start, sel.stop)
            heads["scan_counter"] = n_noise + 1 + li
            heads["acquisition_time_stamp"] = stamp0 + n_noise + 10 + li
            flags = np.where(calib[sel], np.uint64(_bit(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)),
                             np.uint64(0))
            fr = frame[sel]
            prev_fr = np.where(li == 0, -1, frame[np.maximum(li - 1, 0)])
            next_fr = np.where(li == n_lines - 1, -1, frame[np.minimum(li + 1, n_lines - 1)])
            flags |= np.where(fr != prev_fr, np.uint64(_bit(ismrmrd.ACQ_FIRST_IN_CONTRAST)), np.uint64(0))
            flags |= np.where(fr != next_fr, np.uint64(_bit(ismrmrd.ACQ_LAST_IN_CONTRAST)), np.uint64(0))
            if sel.start == 0:
                flags[0] |= np.uint64(_bit(ismrmrd.ACQ_FIRST_IN_SLICE) | _bit(ismrmrd.ACQ_FIRST_IN_REPETITION))
            if sel.stop == n_lines:
                flags[-1] |= np.uint64(_bit(ismrmrd.ACQ_LAST_IN_SLICE) | _bit(ismrmrd.ACQ_LAST_IN_REPETITION)
                                       | _bit(ismrmrd.ACQ_LAST_IN_MEASUREMENT))
            heads["flags"] = flags
            rows = np.zeros(m, dtype=acquisition_dtype)
            rows["head"] = heads
            rows["data"] = _vlen_column(data.view(np.float32).reshape(m, -1))
            rows["traj"] = _vlen_column(np.broadcast_to(empty_traj, (m, 0)))
            dset[n_noise + sel.start:n_noise + sel.stop] = rows
    return n_total


# --------------------------------------------------------------------------------------------
# the acquisition buffer
# --------------------------------------------------------------------------------------------

def _limit(limits, name):
    return None if limits is None else getattr(limits, name, None)


class AcquisitionBuffer:
    """Collects streamed ISMRMRD acquisitions of one scan onto the Cartesian grid.

    Per acquisition only its (readout-oversampling-free) line and three small indices are kept,
    in arrays that grow geometrically; noise acquisitions are kept as their samples.
    """

    def __init__(self, header, header_xml: str | None = None):
        if isinstance(header, (str, bytes)):
            header_xml = header.decode("utf-8") if isinstance(header, bytes) else header
        self.header = h = parse_header(header)
        self._header_xml = header_xml
        if not h.encoding:
            raise MRDError("the ISMRMRD header has no encoding")
        if len(h.encoding) != 1:
            raise MRDError(f"the ISMRMRD header has {len(h.encoding)} encodings; exactly one is supported")
        enc = h.encoding[0]
        traj = getattr(enc.trajectory, "value", enc.trajectory)
        if str(traj) != "cartesian":
            raise MRDError(f"trajectory '{traj}' is not supported: only 'cartesian'")
        if enc.encodedSpace is None or enc.reconSpace is None:
            raise MRDError("the encoding has no encodedSpace or reconSpace")
        em, rm = enc.encodedSpace.matrixSize, enc.reconSpace.matrixSize
        for name, m in (("encodedSpace", em), ("reconSpace", rm)):
            if m is None or min(int(m.x), int(m.y), int(m.z)) < 1:
                raise MRDError(f"{name} matrixSize is missing or not positive")
        self.nx_enc, self.nx = int(em.x), int(rm.x)
        self.ny, self.nz = int(em.y), int(em.z)
        if self.nx_enc < self.nx:
            raise MRDError(f"encodedSpace x ({self.nx_enc}) is smaller than reconSpace x ({self.nx})")
        if (int(rm.y), int(rm.z)) != (self.ny, self.nz):
            raise MRDError(f"encodedSpace y, z ({self.ny}, {self.nz}) differ from reconSpace y, z "
                           f"({rm.y}, {rm.z}): phase/partition oversampling is not supported")
        rf = enc.reconSpace.fieldOfView_mm
        self.fov_mm = (float(rf.x), float(rf.y), float(rf.z)) if rf is not None else (0.0, 0.0, 0.0)

        lim = enc.encodingLimits
        self._off_y, self._max_y = self._axis_limits(_limit(lim, "kspace_encoding_step_1"), self.ny,
                                                     "kspace_encoding_step_1")
        self._off_z, self._max_z = self._axis_limits(_limit(lim, "kspace_encoding_step_2"), self.nz,
                                                     "kspace_encoding_step_2")
        self._other_max = {}
        for name in ("slice", "repetition", "set", "phase"):
            lm = _limit(lim, name)
            self._other_max[name] = int(lm.maximum) if lm is not None else 0
        for name, mx in self._other_max.items():
            if mx != 0:
                raise MRDError(f"encoding limits allow {name} up to {mx}: only one {name} "
                               "(3D, single slab) is supported")

        ups = user_parameters(h)
        self.user_parameters = ups
        lc = _limit(lim, "contrast")
        n_from_limits = int(lc.maximum) + 1 if lc is not None else None
        if UP_N_FRAMES in ups:
            self.n_frames = int(ups[UP_N_FRAMES])
            if n_from_limits is not None and n_from_limits != self.n_frames:
                raise MRDError(f"userParameter {UP_N_FRAMES}={self.n_frames} disagrees with the "
                               f"contrast encoding limit (maximum {lc.maximum})")
        else:
            self.n_frames = n_from_limits if n_from_limits is not None else 1
        if self.n_frames < 1:
            raise MRDError("the scan has no frames (contrast limits)")

        protocol_name = ups.get(UP_PROTOCOL)
        if protocol_name is None and h.measurementInformation is not None:
            protocol_name = h.measurementInformation.protocolName
        self.protocol_name = str(protocol_name or "")
        self.protocol_yaml = ups.get(UP_PROTOCOL_YAML)

        asi = h.acquisitionSystemInformation
        self.n_coils = int(asi.receiverChannels) if asi is not None and asi.receiverChannels else None
        self._n = 0
        self._cap = 0
        self._data = self._frame = self._kz = self._ky = self._calib = None
        # readout oversampling removal (iFFT, crop, FFT) is done on blocks of staged lines
        self._crop = self.nx_enc != self.nx
        self._stage = None
        self._stage_rows = np.zeros(256, dtype=np.int64)
        self._stage_n = 0
        # expected number of imaging lines (written by write_raw): one allocation instead of growth
        hint = int(ups.get(UP_N_LINES, 0))
        self._initial_cap = hint if 0 < hint <= self.n_frames * self.ny * self.nz * 4 else 1024
        if self.n_coils is not None:
            self._grow(self._initial_cap)
        self._noise: list[np.ndarray] = []
        self._noise_dwell = None
        self._dwell = None
        self._last = None
        self.n_ignored = 0
        self._finished = False

    @staticmethod
    def _axis_limits(lm, n, name):
        """(offset, max counter): k index = counter + offset, where offset = n//2 - center."""
        if lm is None:
            return 0, n - 1
        lo, hi, c = int(lm.minimum), int(lm.maximum), int(lm.center)
        if not (0 <= lo <= hi):
            raise MRDError(f"{name} limits are not sane: minimum {lo}, maximum {hi}")
        off = n // 2 - c
        if lo + off < 0 or hi + off >= n:
            raise MRDError(f"{name} limits {lo}..{hi} with centre {c} do not fit the encoded matrix "
                           f"size {n} (centre at index {n // 2})")
        return off, hi

    def _grow(self, need: int):
        cap = max(self._cap, 1)
        while cap < need:
            cap *= 2
        if cap == self._cap:
            return
        C = self.n_coils

        def grow(a, shape, dtype):
            b = np.empty(shape, dtype=dtype)    # rows >= _n are written before they are read
            if a is not None:
                b[:self._n] = a[:self._n]
            return b
        self._data = grow(self._data, (cap, C, self.nx), np.complex64)
        if self._crop and self._stage is None:
            self._stage = np.zeros((len(self._stage_rows), C, self.nx_enc), dtype=np.complex64)
        self._frame = grow(self._frame, (cap,), np.int32)
        self._kz = grow(self._kz, (cap,), np.int32)
        self._ky = grow(self._ky, (cap,), np.int32)
        self._calib = grow(self._calib, (cap,), bool)
        self._cap = cap

    def _check_channels(self, acq, what):
        nc = int(acq.active_channels)
        if self.n_coils is None:
            self.n_coils = nc
            self._grow(self._initial_cap)
        if nc != self.n_coils:
            raise MRDError(f"{what} acquisition (scan_counter {acq.scan_counter}) has {nc} channels; "
                           f"the header says {self.n_coils} receiver channels")

    def add(self, acq: ismrmrd.Acquisition) -> str:
        """Place one acquisition. Returns 'data', 'noise' or 'ignored' (navigators, phase
        correction, dummy scans, feedback ...: not used here, a gadget may pass them on)."""
        if self._finished:
            raise MRDError("the buffer is finished; start a new one")
        flags = int(acq.flags)
        if flags & _NOISE_BIT:
            self._check_channels(acq, "noise")
            data = np.asarray(acq.data)
            if not np.isfinite(data).all():
                raise MRDError(f"noise acquisition (scan_counter {acq.scan_counter}) contains NaN or Inf")
            self._noise.append(np.array(data, dtype=np.complex64, copy=True))
            self._noise_dwell = float(acq.sample_time_us)
            return "noise"
        if flags & _IGNORE_MASK:
            self.n_ignored += 1
            return "ignored"
        self._check_channels(acq, "data")
        idx = acq.idx
        ky, kz, frame = int(idx.kspace_encode_step_1), int(idx.kspace_encode_step_2), int(idx.contrast)
        sc = acq.scan_counter
        if ky > self._max_y or ky + self._off_y < 0 or ky + self._off_y >= self.ny:
            raise MRDError(f"acquisition (scan_counter {sc}): kspace_encode_step_1 = {ky} is outside "
                           f"the encoding limits (maximum {self._max_y}, matrix y {self.ny})")
        if kz > self._max_z or kz + self._off_z < 0 or kz + self._off_z >= self.nz:
            raise MRDError(f"acquisition (scan_counter {sc}): kspace_encode_step_2 = {kz} is outside "
                           f"the encoding limits (maximum {self._max_z}, matrix z {self.nz})")
        if frame >= self.n_frames:
            raise MRDError(f"acquisition (scan_counter {sc}): contrast (frame) = {frame} is outside "
                           f"the encoding limits (n_frames {self.n_frames})")
        for name, mx in self._other_max.items():
            v = int(getattr(idx, name))
            if v > mx:
                raise MRDError(f"acquisition (scan_counter {sc}): {name} = {v} is outside the "
                               f"encoding limits (maximum {mx})")

        data = np.asarray(acq.data)
        ns = int(acq.number_of_samples)
        pre, post = int(acq.discard_pre), int(acq.discard_post)
        centre = int(acq.center_sample) - pre
        if pre or post:
            if pre + post >= ns:
                raise MRDError(f"acquisition (scan_counter {sc}) discards all its samples")
            data = data[:, pre:ns - post]
        n_use = data.shape[1]
        if flags & _REVERSE_BIT:
            data = data[:, ::-1]
            centre = n_use - 1 - centre
        start = self.nx_enc // 2 - centre
        if start < 0 or start + n_use > self.nx_enc:
            raise MRDError(f"acquisition (scan_counter {sc}) has {ns} samples with centre sample "
                           f"{acq.center_sample}: it does not fit the encoded readout of "
                           f"{self.nx_enc} samples (centre at {self.nx_enc // 2})")
        if not np.isfinite(data).all():
            raise MRDError(f"acquisition (scan_counter {sc}) contains NaN or Inf")

        if self._n >= self._cap:
            self._grow(self._n + 1)
        i = self._n
        if not self._crop:
            if n_use == self.nx:
                self._data[i] = data
            else:
                self._data[i] = 0
                self._data[i, :, start:start + n_use] = data
        else:   # oversampled: staged at the encoded size, cropped in blocks (_flush)
            j = self._stage_n
            st = self._stage[j]
            if n_use != self.nx_enc:
                st[:] = 0
            st[:, start:start + n_use] = data
            self._stage_rows[j] = i
            self._stage_n = j + 1
            if self._stage_n == len(self._stage_rows):
                self._flush()
        self._frame[i] = frame
        self._kz[i] = kz + self._off_z
        self._ky[i] = ky + self._off_y
        self._calib[i] = bool(flags & _CALIB_BITS)
        self._n += 1
        self._dwell = float(acq.sample_time_us)
        # geometry comes from the last data acquisition: keep a copy of its header (a byte copy
        # of the ctypes struct; getHead() deep-copies field by field, ~20x slower)
        head = getattr(acq, "_head", None)
        self._last = (ismrmrd.AcquisitionHeader.from_buffer_copy(head)
                      if isinstance(head, ismrmrd.AcquisitionHeader) else acq.getHead())
        return "data"

    def _flush(self):
        m = self._stage_n
        if m:
            self._data[self._stage_rows[:m]] = _crop_readout(self._stage[:m], self.nx)
            self._stage_n = 0

    def __len__(self) -> int:
        return self._n

    def geometry(self) -> Geometry:
        h = self._last
        if h is None:
            return Geometry((self.nx, self.ny, self.nz), self.fov_mm)
        return Geometry((self.nx, self.ny, self.nz), self.fov_mm, position=_vec3(h.position),
                        read_dir=_vec3(h.read_dir), phase_dir=_vec3(h.phase_dir),
                        slice_dir=_vec3(h.slice_dir),
                        patient_table_position=_vec3(h.patient_table_position),
                        measurement_uid=int(h.measurement_uid))

    def finish(self) -> RawScan:
        """The collected scan (lines sorted by frame, kz, ky; repeated lines averaged)."""
        if self._n == 0:
            raise MRDError("no imaging acquisitions were received")
        self._flush()
        n = self._n
        frame, kz, ky = self._frame[:n], self._kz[:n], self._ky[:n]
        lin = (frame.astype(np.int64) * self.nz + kz) * self.ny + ky
        order = np.argsort(lin, kind="stable")
        lin_s = lin[order]
        first = np.ones(n, bool)
        first[1:] = lin_s[1:] != lin_s[:-1]
        n_repeated = 0
        if first.all():
            if np.all(order[1:] > order[:-1]):      # already in order (the writer's order)
                data = self._data[:n] if self._cap == n else self._data[:n].copy()
                calib = self._calib[:n].copy()
            else:
                data = self._data[:n][order]
                calib = self._calib[:n][order]
            sel = order
        else:
            starts = np.flatnonzero(first)
            counts = np.diff(np.append(starts, n))
            n_repeated = int(np.count_nonzero(counts > 1))
            data = (np.add.reduceat(self._data[:n][order], starts, axis=0)
                    / counts[:, None, None]).astype(np.complex64)
            calib = np.logical_or.reduceat(self._calib[:n][order], starts)
            sel = order[starts]
        lines = KSpaceLines(np.ascontiguousarray(data), frame[sel].astype(np.int64),
                            kz[sel].astype(np.int64), ky[sel].astype(np.int64), calib,
                            self.n_frames, self.nz, self.ny)
        noise = np.concatenate(self._noise, axis=1) if self._noise else None
        xml = self._header_xml if self._header_xml is not None else header_to_xml(self.header)
        scan = RawScan(lines=lines, noise=noise, geometry=self.geometry(),
                       protocol_name=self.protocol_name, protocol_yaml=self.protocol_yaml,
                       n_frames=self.n_frames, header_xml=xml, sample_time_us=self._dwell,
                       noise_sample_time_us=self._noise_dwell, n_ignored=self.n_ignored,
                       n_repeated=n_repeated)
        self._data = self._frame = self._kz = self._ky = self._calib = self._stage = None
        self._noise = []
        self._finished = True
        return scan


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def _read_xml(g) -> str:
    if "xml" not in g:
        raise MRDError("the file has no ISMRMRD XML header (/<group>/xml)")
    x = g["xml"][0]
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _acquisitions(path, group: str, block: int) -> Iterator[ismrmrd.Acquisition]:
    with h5py.File(path, "r") as f:
        if group not in f:
            raise MRDError(f"{path} has no group '{group}'")
        g = f[group]
        if "data" not in g:
            return
        d = g["data"]
        for s in range(0, d.shape[0], block):
            rows = d[s:s + block]
            for row in rows:
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


def iter_raw(path, group: str = "dataset", block: int = 4096) -> tuple[str, Iterator[ismrmrd.Acquisition]]:
    """(header_xml, acquisitions): the XML header text and a lazy iterator over the file's
    acquisitions as ``ismrmrd.Acquisition`` (in file order, read in blocks; the file is opened
    read-only). Waveforms and images in the group are not returned."""
    with h5py.File(path, "r") as f:
        if group not in f:
            raise MRDError(f"{path} has no group '{group}' (groups: {list(f.keys())})")
        xml = _read_xml(f[group])
    return xml, _acquisitions(path, group, block)


def read_raw(path, group: str = "dataset") -> RawScan:
    """Read a raw ISMRMRD file through :class:`AcquisitionBuffer`."""
    xml, acqs = iter_raw(path, group)
    buf = AcquisitionBuffer(xml)
    for acq in acqs:
        buf.add(acq)
    return buf.finish()


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------

MAP_SERIES = {"T1": 1, "T2": 2, "PD": 3, "B1": 4}
MAP_UNITS = {"T1": "ms", "T2": "ms", "PD": "a.u.", "B1": "fraction"}
# GADGETRON_DataRole values from gadgetron toolboxes/mri_core/mri_core_def.h
# (GADGETRON_IMAGE_T1MAP "T1", GADGETRON_IMAGE_T2MAP "T2", GADGETRON_IMAGE_PD "PD",
#  GADGETRON_IMAGE_B1MAP "B1MAP").
MAP_DATA_ROLES = {"T1": "T1", "T2": "T2", "PD": "PD", "B1": "B1MAP"}

# meta attribute names (the GADGETRON_* spellings are those of mri_core_def.h)
META_DATA_ROLE = "GADGETRON_DataRole"
META_IMAGE_COMMENT = "GADGETRON_ImageComment"
META_SEQ_DESCRIPTION = "GADGETRON_SeqDescription"
META_PROCESSING_HISTORY = "GADGETRON_ImageProcessingHistory"
META_WINDOW_CENTER = "GADGETRON_WindowCenter"
META_WINDOW_WIDTH = "GADGETRON_WindowWidth"
META_SCALE_RATIO = "GADGETRON_ScaleRatio"
META_IMAGE_NUMBER = "GADGETRON_ImageNumber"
META_MAP = "LOREIN_Map"
META_UNIT = "LOREIN_Unit"
META_METHOD = "LOREIN_Method"


def _window(vol: np.ndarray) -> tuple[float, float]:
    """(centre, width) from the 1st and 99th percentiles of the finite, non-zero values."""
    v = vol[np.isfinite(vol) & (vol != 0)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1.0, 99.0])
    width = float(hi - lo)
    if not width > 0:
        width = max(abs(float(hi)), 1.0) * 1e-3
    return float((lo + hi) / 2), width


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _set_geometry(img: ismrmrd.Image, g: Geometry, position, fov, slice_index: int,
                  image_index: int, series: int) -> None:
    img.image_type = ismrmrd.IMTYPE_MAGNITUDE
    img.image_series_index = series
    img.image_index = image_index
    img.slice = slice_index
    img.measurement_uid = int(g.measurement_uid)
    img.field_of_view = tuple(float(f) for f in fov)
    img.position = tuple(float(p) for p in position)
    img.read_dir = _vec3(g.read_dir)
    img.phase_dir = _vec3(g.phase_dir)
    img.slice_dir = _vec3(g.slice_dir)
    img.patient_table_position = _vec3(g.patient_table_position)


def maps_to_images(maps: dict, geometry: Geometry, units: dict | None = None, as_2d: bool = False,
                   series_offset: int = 0, extra: dict | None = None,
                   method: str = "LoREIN") -> list[ismrmrd.Image]:
    """Parameter maps {name: (nz, ny, nx)} -> float32 magnitude ISMRMRD images.

    One 3D image per map (matrix_size (nx, ny, nz), the recon FOV, position = volume centre), or
    with ``as_2d`` one image per partition (slice k at position + (k - nz//2) * dz * slice_dir,
    field_of_view z = dz, ``slice`` = k, ``image_index`` = k + 1). Series index: T1 1, T2 2, PD 3,
    B1 4, other maps 5, 6, ... in name order; plus ``series_offset``. Non-finite values become 0.
    Meta: GADGETRON_DataRole, _ImageComment ("T1_ms"), _SeqDescription, _ImageProcessingHistory,
    _WindowCenter/_WindowWidth (1st-99th percentile of the non-zero values), _ScaleRatio (1),
    _ImageNumber, LOREIN_Map, LOREIN_Unit, LOREIN_Method, and ``extra`` {name: value}.
    """
    units = {**MAP_UNITS, **(units or {})}
    shape = geometry.shape
    nz = shape[0]
    known = [k for k in MAP_SERIES if k in maps]
    others = sorted(k for k in maps if k not in MAP_SERIES)
    series_of = {k: MAP_SERIES[k] for k in known}
    nxt = max(MAP_SERIES.values()) + 1
    for k in others:
        series_of[k] = nxt
        nxt += 1
    pos0 = np.asarray(geometry.position, dtype=float)
    sdir = np.asarray(geometry.slice_dir, dtype=float)
    dz = geometry.fov_mm[2] / nz
    images = []
    for name in known + others:
        vol = np.asarray(maps[name], dtype=np.float32)
        if vol.shape != shape:
            raise ValueError(f"map '{name}' has shape {vol.shape}; the geometry says (nz, ny, nx) = {shape}")
        vol = np.where(np.isfinite(vol), vol, np.float32(0)).astype(np.float32)
        unit = str(units.get(name, "a.u."))
        centre, width = _window(vol)
        series = series_of[name] + int(series_offset)
        base_meta = {
            META_DATA_ROLE: MAP_DATA_ROLES.get(name, name),
            META_IMAGE_COMMENT: f"{name}_{unit}",
            META_SEQ_DESCRIPTION: f"LOREIN_{name}",
            META_PROCESSING_HISTORY: ["LOREIN", name],
            META_WINDOW_CENTER: _fmt(centre),
            META_WINDOW_WIDTH: _fmt(width),
            META_SCALE_RATIO: "1",
            META_MAP: name,
            META_UNIT: unit,
            META_METHOD: str(method),
        }
        for k, v in (extra or {}).items():
            base_meta[k] = v if isinstance(v, list) else str(v)
        if as_2d:
            parts = [(k, vol[k:k + 1], pos0 + (k - nz // 2) * dz * sdir,
                      (geometry.fov_mm[0], geometry.fov_mm[1], dz)) for k in range(nz)]
        else:
            parts = [(0, vol, pos0, geometry.fov_mm)]
        for k, data, pos, fov in parts:
            img = ismrmrd.Image.from_array(np.ascontiguousarray(data), transpose=False)
            image_index = k + 1
            _set_geometry(img, geometry, pos, fov, k, image_index, series)
            meta = ismrmrd.Meta()
            meta.update(base_meta)
            meta[META_IMAGE_NUMBER] = str(image_index)
            img.meta = meta
            images.append(img)
    return images


def _meta_str(meta, key):
    v = meta.get(key)
    if isinstance(v, list):
        v = v[0] if v else None
    return v


def images_to_maps(images) -> dict:
    """Inverse of :func:`maps_to_images`: {map name: (nz, ny, nx) float32}. 2D images of one map
    are stacked in ``slice`` order; the name comes from LOREIN_Map (else GADGETRON_DataRole)."""
    inv_roles = {v: k for k, v in MAP_DATA_ROLES.items()}
    groups: dict[str, list] = {}
    for img in images:
        meta = img.meta
        name = _meta_str(meta, META_MAP)
        if name is None:
            role = _meta_str(meta, META_DATA_ROLE)
            name = inv_roles.get(role, role) if role is not None else f"series_{img.image_series_index}"
        groups.setdefault(name, []).append(img)
    out = {}
    for name, imgs in groups.items():
        if len(imgs) == 1:
            d = np.asarray(imgs[0].data)
            out[name] = np.array(d[0] if d.shape[0] == 1 else d, dtype=np.float32)
            continue
        imgs = sorted(imgs, key=lambda im: (int(im.slice), int(im.image_index)))
        out[name] = np.concatenate([np.asarray(im.data)[0] for im in imgs], axis=0).astype(np.float32)
    return out


def write_images(path, group: str, images) -> None:
    """Append images to ``/<group>/image_<image_series_index>`` (gadgetron_ismrmrd_client layout)."""
    ds = ismrmrd.Dataset(str(path), group, create_if_needed=True)
    try:
        for img in images:
            ds.append_image(f"image_{int(img.image_series_index)}", img)
    finally:
        ds.close()


def _series_key(name: str):
    m = re.fullmatch(r"image_(\d+)", name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


def read_images(path, group: str | None = None) -> list[ismrmrd.Image]:
    """All images of ``group`` (None: the only group, else the first in name order), series by
    series. The file is opened read-only."""
    out = []
    with h5py.File(path, "r") as f:
        if group is None:
            groups = sorted(k for k in f.keys() if isinstance(f[k], h5py.Group))
            if not groups:
                raise MRDError(f"{path} has no groups")
            group = groups[0]
        if group not in f:
            raise MRDError(f"{path} has no group '{group}'")
        g = f[group]
        for name in sorted(g.keys(), key=_series_key):
            sub = g[name]
            if not (isinstance(sub, h5py.Group) and "header" in sub and "data" in sub):
                continue
            heads, attrs, data = sub["header"], sub.get("attributes"), sub["data"]
            for i in range(heads.shape[0]):
                a = "" if attrs is None else attrs[i]
                if isinstance(a, bytes):
                    a = a.decode("utf-8")
                img = ismrmrd.Image(heads[i].tobytes(), attribute_string=a)
                d = data[i]
                if d.dtype.names and "real" in d.dtype.names:
                    d = d["real"] + 1j * d["imag"]
                img.data[:] = d.reshape(img.data.shape)
                out.append(img)
    return out
