"""Multi-volume streams: one stream may carry several 3D volumes, told apart by the acquisitions'
``repetition`` and ``slice`` indices (a repetition of the scan, a slab of a multi-slab scan).
:class:`VolumeRouter` keeps one :class:`~gadget_lorein.io.buffer.AcquisitionBuffer` per volume
and says when a volume is complete, so that it is reconstructed as soon as its last line arrives,
whether the volumes come one after the other or interleaved.

When a volume is complete (multi-volume scans; docs/data-format.md):
  - ``ACQ_LAST_IN_SLICE``: the volume (repetition, slice) of that acquisition;
  - ``ACQ_LAST_IN_REPETITION``: every open volume of that repetition;
  - ``ACQ_LAST_IN_MEASUREMENT``: every open volume;
  - the end of the stream (fallback, e.g. a writer without those flags, or a worker of a distributed
    chain that sees only its own repetitions): every open volume that holds at least the header's
    ``lorein.n_lines`` lines (per volume), or any number when the header does not say; a volume with
    fewer lines is an error (a cut stream).
A single-volume scan (no repetition / slice limits above 0) is complete at ``ACQ_LAST_IN_MEASUREMENT``
only, as before; a stream that ends before it is an error.

Noise acquisitions are kept here and given to the volumes as they complete: those of the volume's
own repetition when the stream carries any (a noise scan per repetition), else all received.

Limits (gadget_lorein/limits.py): ``MAX_VOLUMES`` volumes in the encoding limits, ``MAX_OPEN_VOLUMES``
buffered at once, and the buffers of all open volumes together under the memory ceiling.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import ismrmrd

from .. import limits
from .buffer import AcquisitionBuffer
from .header import MRDError, RawScan
from .readout import IGNORE_MASK, NOISE_BIT, bit

log = logging.getLogger(__name__)

VolumeKey = tuple   # (repetition, slice)
LAST_IN_SLICE = bit(ismrmrd.ACQ_LAST_IN_SLICE)
LAST_IN_REPETITION = bit(ismrmrd.ACQ_LAST_IN_REPETITION)
LAST_IN_MEASUREMENT = bit(ismrmrd.ACQ_LAST_IN_MEASUREMENT)


class Volume(NamedTuple):
    """A complete volume: its key, its buffer and the noise acquisitions of its measurement."""
    key: VolumeKey
    buffer: AcquisitionBuffer
    noise: dict


class VolumeRouter:
    """Routes the acquisitions of one stream to per-volume buffers (module docstring)."""

    def __init__(self, header_xml: str, max_bytes: int):
        self.header_xml = header_xml
        self.max_bytes = int(max_bytes)
        self._spare: AcquisitionBuffer | None = self._new()
        info = self._spare
        self.info = info                  # the header's facts (matrix, frames, protocol ...)
        self.n_repetitions, self.n_slices = info.n_repetitions, info.n_slices
        self.multi = info.n_volumes > 1
        self.open: dict[VolumeKey, AcquisitionBuffer] = {}
        self.done: set = set()
        self.noise: dict[int, list] = {}
        self._noise_samples = 0
        self.n_ignored = 0
        self.n_lines_hint = info.n_lines_hint

    def _new(self, max_bytes: int | None = None) -> AcquisitionBuffer:
        """A volume's buffer; it refuses to grow past ``max_bytes`` (what the open volumes leave)."""
        return AcquisitionBuffer(self.header_xml, volumes=True,
                                 max_bytes=self.max_bytes if max_bytes is None else max_bytes)

    def _room(self, key=None) -> int:
        return max(self.max_bytes - sum(b.nbytes for k, b in self.open.items() if k != key), 0)

    def volume_index(self, key: VolumeKey) -> int:
        """0, 1, ... in (repetition, slice) order: what numbers the volume's image series."""
        return int(key[0]) * self.n_slices + int(key[1])

    def _buffer(self, key: VolumeKey) -> AcquisitionBuffer:
        buf = self.open.get(key)
        if buf is not None:
            return buf
        if key in self.done:
            raise MRDError(f"an acquisition of repetition {key[0]}, slice {key[1]} arrived after that "
                           "volume was complete (ACQ_LAST_IN_SLICE / _REPETITION) and reconstructed")
        if len(self.open) >= limits.MAX_OPEN_VOLUMES:
            raise limits.ResourceError(
                f"volumes buffered at once = {len(self.open) + 1} exceeds the limit "
                f"{limits.MAX_OPEN_VOLUMES} (open: {sorted(self.open)}; interleave fewer repetitions "
                "or slabs, or raise MAX_OPEN_VOLUMES in gadget_lorein/limits.py)")
        if self._spare is not None and not self.open:
            buf, self._spare = self._spare, None
        else:
            buf = self._new(self._room())
        self.open[key] = buf
        return buf

    def add(self, acq: ismrmrd.Acquisition) -> tuple[str, list]:
        """Place one acquisition: ('data' | 'noise' | 'ignored', [the :class:`Volume` s it
        completed, in (repetition, slice) order]). Take each one's scan with :meth:`finish`."""
        flags = int(acq.flags)
        idx = acq.idx
        if flags & NOISE_BIT:
            self._noise_samples += int(acq.number_of_samples)
            limits.check("noise samples per coil", self._noise_samples, limits.MAX_NOISE_SAMPLES)
            self.noise.setdefault(int(idx.repetition), []).append(acq)
            return "noise", []
        key = (int(idx.repetition), int(idx.slice))
        if flags & IGNORE_MASK:         # counted by its volume's buffer when that is open
            if key in self.open:
                self.open[key].add(acq)
            else:
                self.n_ignored += 1
            return "ignored", []
        for name, v, n in (("repetition", key[0], self.n_repetitions), ("slice", key[1], self.n_slices)):
            if v >= n:
                raise MRDError(f"acquisition (scan_counter {acq.scan_counter}): {name} = {v} is outside "
                               f"the encoding limits (maximum {n - 1})")
        buf = self._buffer(key)
        if len(self.open) > 1:      # all open volumes together under the ceiling
            buf.max_bytes = self._room(key)
        buf.add(acq)
        if flags & LAST_IN_MEASUREMENT:
            ready = sorted(self.open)
        elif not self.multi:
            ready = []
        elif flags & LAST_IN_REPETITION:
            ready = sorted(k for k in self.open if k[0] == key[0])
        elif flags & LAST_IN_SLICE:
            ready = [key]
        else:
            ready = []
        out = [Volume(k, self.open.pop(k), self.noise) for k in ready]
        self.done.update(ready)
        if flags & LAST_IN_MEASUREMENT:
            self._measurement_done()
        return "data", out

    def _measurement_done(self) -> None:
        """After ACQ_LAST_IN_MEASUREMENT, acquisitions start a new measurement (new noise too)."""
        self.done = set()
        self.noise = {}
        self._noise_samples = 0

    @staticmethod
    def finish(volume: Volume) -> RawScan:
        """The volume's scan, with its noise (module docstring)."""
        noise, buf = volume.noise, volume.buffer
        own = noise.get(int(volume.key[0]))
        for acq in own if own else [a for k in sorted(noise) for a in noise[k]]:
            buf.add(acq)
        return buf.finish()

    def pending(self) -> int:
        return sum(len(b) for b in self.open.values())

    def end_of_stream(self) -> list:
        """The open volumes to reconstruct now that the stream has ended (module docstring), as
        :class:`Volume` s; raises MRDError for a cut stream."""
        if not self.open:
            return []
        if not self.multi:
            raise MRDError(f"the stream ended before ACQ_LAST_IN_MEASUREMENT ({self.pending()} imaging "
                           "lines not reconstructed); no maps")
        hint = self.n_lines_hint
        short = {k: len(b) for k, b in self.open.items() if hint and len(b) < hint}
        if short:
            raise MRDError("the stream ended with incomplete volume(s): " + ", ".join(
                f"repetition {k[0]} slice {k[1]} has {n} of {hint} lines" for k, n in sorted(short.items()))
                + " (lorein.n_lines); those are not reconstructed")
        for k, b in sorted(self.open.items()):
            log.warning("repetition %d slice %d: the stream ended before ACQ_LAST_IN_SLICE / "
                        "ACQ_LAST_IN_REPETITION; reconstructing its %d lines", k[0], k[1], len(b))
        out = [Volume(k, b, self.noise) for k, b in sorted(self.open.items())]
        self.open = {}
        self.done.update(v.key for v in out)
        return out
