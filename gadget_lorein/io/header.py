"""The raw header: the ISMRMRD XML header the simulator writes and the node reads, its LoREIN user
parameters (the raw-data contract, docs/data-format.md), the volume's geometry and the raw scan
the buffer makes of the data (:class:`RawScan`).

Works with ismrmrd-python 1.14 and 1.15 (:func:`header_to_xml` mends the one place where ismrmrd
1.14 breaks beside the xsdata that the official Gadgetron images pin)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import ismrmrd.xsd as xsd
import numpy as np

from ..data import KSpaceLines, Scan



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

class MRDError(ValueError):
    """ISMRMRD data that does not meet the raw-data contract (docs/data-format.md)."""

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
    # (n_lines,) bool over ``lines``: ACQ_IS_PARALLEL_CALIBRATION without _AND_IMAGING (reference
    # lines for the coil maps only, not fitted); None when there are none
    reference_only: np.ndarray | None = None

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
                    tuple(self.geometry.fov_mm), self.reference_only)


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
                 n_lines: int | None = None, extra_user_parameters: dict | None = None,
                 n_repetitions: int = 1) -> str:
    """The ISMRMRD XML header (``ismrmrd.xsd`` serialised, UTF-8) of a raw scan.

    ``matrix`` (nx, ny, nz) and ``fov_mm`` (x, y, z) are the recon space; the encoded space has
    ``oversampling`` x nx readout samples over ``oversampling`` x the x FOV. ``sequence_parameters``
    holds TR, TE, TI, flipAngle_deg, echo_spacing (ms / degrees, scalars or lists) and
    sequence_type (see ``gadget_lorein.physics.sequences.sequence_parameters``).
    ``extra_user_parameters`` {name: value} adds userParameterLong (int), userParameterDouble
    (float) or userParameterString (str) entries. ``n_repetitions`` > 1: a multi-volume scan (the
    repetition encoding limit 0..n_repetitions-1; ``n_lines`` then counts one repetition's lines).
    """
    nx, ny, nz = (int(v) for v in matrix)
    fx, fy, fz = (float(v) for v in fov_mm)
    os_ = int(oversampling)
    if min(nx, ny, nz) < 1 or os_ < 1 or n_frames < 1 or n_coils < 1 or n_repetitions < 1:
        raise ValueError("matrix, oversampling, n_frames, n_coils and n_repetitions must be positive")

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
        repetition=xsd.limitType(minimum=0, maximum=int(n_repetitions) - 1, center=0),
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
