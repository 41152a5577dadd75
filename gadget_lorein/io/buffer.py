"""The acquisition buffer: streamed ISMRMRD acquisitions (from Gadgetron, or from a file) placed on
the k-space grid, readout oversampling removed, the noise scan collected; :meth:`finish` gives a
:class:`~gadget_lorein.io.header.RawScan` (plain numpy containers from :mod:`gadget_lorein.data`).
The flag bits and the readout FFTs it uses are in :mod:`gadget_lorein.io.readout`."""
from __future__ import annotations

import ismrmrd
import numpy as np

from .. import limits
from ..data import KSpaceLines
from .header import (UP_N_FRAMES, UP_N_LINES, UP_PROTOCOL, UP_PROTOCOL_YAML, Geometry, MRDError,
                     RawScan, _vec3, header_to_xml, parse_header, user_parameters)
from .readout import (CALIB_AND_IMAGING_BIT, CALIB_BITS, IGNORE_MASK, NOISE_BIT, REF_ONLY_BIT,
                      REVERSE_BIT, crop_readout)

# --------------------------------------------------------------------------------------------
# the acquisition buffer
# --------------------------------------------------------------------------------------------

VOLUME_AXES = ("repetition", "slice")    # the indices that tell the volumes of a stream apart

def _limit(limits, name):
    return None if limits is None else getattr(limits, name, None)


class AcquisitionBuffer:
    """Collects streamed ISMRMRD acquisitions of one scan onto the Cartesian grid.

    Per acquisition only its (readout-oversampling-free) line and three small indices are kept,
    in arrays that grow geometrically; noise acquisitions are kept as their samples.
    """

    def __init__(self, header, header_xml: str | None = None, max_bytes: int | None = None,
                 volumes: bool = False):
        """``max_bytes``: ceiling of the lines buffer (default: limits.memory_budget()); the
        header's sizes are checked against gadget_lorein/limits.py before anything is allocated.
        ``volumes``: accept ``repetition`` / ``slice`` encoding limits above 0 (the buffer then holds
        the one volume its caller routes to it: io.volumes.VolumeRouter); otherwise refused."""
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
            if mx != 0 and not (volumes and name in VOLUME_AXES):
                raise MRDError(f"encoding limits allow {name} up to {mx}: only one {name} is "
                               "supported" + (" here (a multi-volume stream goes through "
                                              "io.volumes.VolumeRouter)" if name in VOLUME_AXES else ""))
        self.n_repetitions = self._other_max["repetition"] + 1
        self.n_slices = self._other_max["slice"] + 1
        self.n_volumes = self.n_repetitions * self.n_slices
        limits.check("volumes (repetitions x slices in the encoding limits)", self.n_volumes,
                     limits.MAX_VOLUMES)

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
        self._data = self._frame = self._kz = self._ky = self._calib = self._ref = None
        # readout oversampling removal (iFFT, crop, FFT) is done on blocks of staged lines
        self._crop = self.nx_enc != self.nx
        self._stage = None
        self._stage_rows = np.zeros(256, dtype=np.int64)
        self._stage_n = 0
        # expected number of imaging lines (written by write_raw): one allocation instead of growth
        hint = int(ups.get(UP_N_LINES, 0))
        limits.check_scan(self.nx_enc, self.nx, self.ny, self.nz, self.n_frames, self.n_coils,
                          hint if hint > 0 else None)
        self.max_bytes = limits.memory_budget() if max_bytes is None else int(max_bytes)
        self.n_lines_hint = hint if hint > 0 else None
        self._noise_samples = 0
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
        limits.check("imaging lines received", need, limits.MAX_LINES)
        nbytes = cap * C * self.nx * 8
        if nbytes > self.max_bytes:
            raise limits.ResourceError(
                f"the k-space lines buffer would need {nbytes / limits.GIB:.3g} GB for {cap} lines of "
                f"{C} coils x {self.nx} samples, over the memory limit {self.max_bytes / limits.GIB:.3g} GB "
                "(setting max_memory_gb)")

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
        self._ref = grow(self._ref, (cap,), bool)
        self._cap = cap

    def _check_channels(self, acq, what):
        nc = int(acq.active_channels)
        if self.n_coils is None:
            limits.check(f"{what} acquisition (scan_counter {acq.scan_counter}) active_channels", nc,
                         limits.MAX_COILS)
            if nc < 1:
                raise MRDError(f"{what} acquisition (scan_counter {acq.scan_counter}) has no channels")
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
        if flags & NOISE_BIT:
            self._check_channels(acq, "noise")
            data = np.asarray(acq.data)
            if not np.isfinite(data).all():
                raise MRDError(f"noise acquisition (scan_counter {acq.scan_counter}) contains NaN or Inf")
            self._noise_samples += data.shape[-1]
            limits.check("noise samples per coil", self._noise_samples, limits.MAX_NOISE_SAMPLES)
            self._noise.append(np.array(data, dtype=np.complex64, copy=True))
            self._noise_dwell = float(acq.sample_time_us)
            return "noise"
        if flags & IGNORE_MASK:
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
        if flags & REVERSE_BIT:
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
        self._calib[i] = bool(flags & CALIB_BITS)
        self._ref[i] = bool(flags & REF_ONLY_BIT) and not flags & CALIB_AND_IMAGING_BIT
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
            self._data[self._stage_rows[:m]] = crop_readout(self._stage[:m], self.nx)
            self._stage_n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes held by the lines buffer (what max_bytes bounds)."""
        return self._cap * (self.n_coils or 0) * self.nx * 8 if self._data is not None else 0

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
        ref = self._ref[:n]
        # reference-only calibration lines are kept apart from imaging lines at the same place
        lin = ((frame.astype(np.int64) * self.nz + kz) * self.ny + ky) * 2 + ref
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
                       n_repeated=n_repeated, reference_only=ref[sel].copy() if ref.any() else None)
        self._data = self._frame = self._kz = self._ky = self._calib = self._ref = self._stage = None
        self._noise = []
        self._finished = True
        return scan


# --------------------------------------------------------------------------------------------
