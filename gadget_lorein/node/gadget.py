"""The Gadgetron node: acquisitions in, parameter maps (ISMRMRD images) out.

Gadgetron starts it as an external Python gadget (``config_xml/lorein.xml``)::

    python -m gadgetron PORT gadget_lorein.node.gadget reconstruct

or connects to it when it is already running (passive mode, ``config_xml/lorein_connect.xml``,
``lorein serve``: node/server.py). ``lorein recon`` runs the very same code on a raw file
(:func:`recon_file`), so the chain and the command line give identical maps.

API
    ``reconstruct(connection, settings=None)``  the chain's target (a gadgetron-python Connection)
    ``process(header_xml, items, settings, send)``  the core: header + acquisitions -> send(images)
    ``recon_file(raw_path, out_path, settings, group=None, in_group="dataset")``  offline recon

What happens to the stream
    - the first acquisitions flagged ACQ_IS_NOISE_MEASUREMENT are kept for prewhitening;
    - imaging acquisitions are placed on the Cartesian grid (``buffer.AcquisitionBuffer``; the raw-data
      contract is docs/data-format.md);
    - acquisitions the buffer does not use (navigators, phase correction, dummy scans, feedback ...)
      and anything that is not an acquisition (waveforms, images) go on to the next gadget unchanged;
    - at the acquisition flagged ACQ_LAST_IN_MEASUREMENT the scan is reconstructed
      (``recon.reconstruct``) and one float32 image per map is sent (T1 [ms], T2 [ms], PD [a.u.],
      and B1 [fraction] for protocols that encode it; series 1, 2, 3, 4; geometry and meta as in
      docs/data-format.md), then the synthetic weighted images (series 11-16, recon/synthetic.py)
      and the confidence maps (series 21-25, recon/confidence.py) that the settings ask for.
      Acquisitions after it start a new measurement;
    - a stream of several volumes (``repetition`` / ``slice`` encoding limits above 0) is buffered
      per volume (``volumes.VolumeRouter``): each volume is reconstructed as soon as its last line
      arrives (ACQ_LAST_IN_SLICE / ACQ_LAST_IN_REPETITION, or the end of the stream as fallback),
      its images carry its ``repetition`` / ``slice`` and series 1000 x volume + 1, 2, ...;
    - a stream that ends (CLOSE) before ACQ_LAST_IN_MEASUREMENT is an error: no maps are sent
      (multi-volume streams: only volumes with fewer lines than the header's lorein.n_lines).

Concurrency
    The setting ``threads`` bounds the CPU threads of one reconstruction (torch); ``device_slots``
    bounds the fits that run at once on one device, across processes (a file lock per slot,
    gadget_lorein/concurrency.py); a fit that has to wait logs that it waits.

Errors
    Every failure (bad header or data, unknown protocol, bad setting, calibration, a bug) is logged
    as one line ``lorein: error: <Type>: <message>`` and sent to Gadgetron as an ERROR message
    (node/connection.py), which Gadgetron logs and forwards to its client as ``... ERROR: ...`` text;
    the rest of the stream is then read and dropped until Gadgetron's CLOSE (at most 30 s of
    silence), so that Gadgetron can finish the connection cleanly; the exception then propagates, so
    that ``python -m gadgetron`` exits non-zero (and ``lorein serve`` too). If Gadgetron vanishes
    without a CLOSE (killed, network cut), reading raises ``ConnectionError`` at once instead of
    spinning (gadgetron-python 1.4.1 loops forever on an empty ``recv``; this module guards its own
    connections only). Limitation: in the ``python -m gadgetron`` path gadgetron-python reads the
    configuration and header before this module is imported, so a peer that vanishes during those
    first two messages, or a header that does not parse as XML, is handled by gadgetron-python alone.

Settings
    From the chain's ``<configuration>`` (``<property name=... value=.../>``), from ``lorein serve``
    (overriding the chain's) or from ``lorein recon``'s options; every setting, its default and its
    meaning: docs/settings.md (generated from gadget_lorein/settings.py, which also validates them).
    Unknown names are logged as a warning and ignored; bad values are errors (sent to Gadgetron as
    above, before any data is read).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Callable, Iterable

import ismrmrd
import numpy as np

from .. import __version__, concurrency, limits
from .. import settings as settings_mod
from .. import settings_io
from ..io import header, map_images, rawfile, volumes
from ..physics import protocol as protocol_mod
from ..recon import confidence, synthetic
from ..recon import pipeline as recon
from . import guard as peer_guard
from .connection import describe_error, drain, guard, send_error

log = logging.getLogger(__name__)

__all__ = ["reconstruct", "process", "recon_file", "derived_images", "METHOD_LABELS"]

METHOD_LABELS = {"lorein": "LoREIN", "pmr": "PMR", "lrr": "LRR", "cg": "CG", "llr": "LLR",
                 "zerofill": "zerofill"}


def _apply_log_level(level: str) -> None:
    logging.getLogger("gadget_lorein").setLevel(getattr(logging, level))


# --------------------------------------------------------------------------------------------
# the core
# --------------------------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.timings: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds


def _fmt_timings(timings: dict) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())


def _check_protocol(buf, rs: settings_mod.ReconSettings) -> protocol_mod.Protocol:
    """The protocol the reconstruction will use, resolved once, before any data is read."""
    if not rs.protocol and not buf.protocol_yaml and not buf.protocol_name:
        raise recon.ReconError(
            f"the header names no protocol (userParameter {header.UP_PROTOCOL_YAML} or {header.UP_PROTOCOL}, "
            f"or measurementInformation/protocolName) and no 'protocol' setting was given; shipped "
            f"protocols: {', '.join(protocol_mod.available())}")
    proto = recon.choose_protocol(rs.protocol, buf.protocol_yaml, buf.protocol_name)
    if proto.n_frames != buf.n_frames:
        raise recon.ReconError(f"protocol '{proto.name}' has {proto.n_frames} frames but the header "
                               f"announces {buf.n_frames}")
    return proto


def _progress_logger(method: str):
    state = {"next": 0.0, "t0": time.perf_counter()}

    def progress(it, total, loss):
        frac = it / max(total, 1)
        if frac >= state["next"] or it == total:
            log.info("%s: iteration %d/%d, loss %.6g (%.1f s)", method, it, total, loss,
                     time.perf_counter() - state["t0"])
            state["next"] = frac + 0.1
        else:
            log.debug("%s: iteration %d/%d, loss %.6g", method, it, total, loss)
    return progress


def _reconstruct_scan(router: volumes.VolumeRouter, volume: volumes.Volume,
                      rs: settings_mod.ReconSettings, gs: settings_mod.NodeSettings,
                      proto: protocol_mod.Protocol, device, send: Callable, clock: _Clock,
                      counts: dict, check_peer: Callable | None = None) -> None:
    t = time.perf_counter()
    raw = router.finish(volume)
    scan = raw.to_scan()
    clock.add("finish_buffer", time.perf_counter() - t)
    lines = scan.lines
    noise = 0 if raw.noise is None else raw.noise.shape[1]
    rep, slc = volume.key
    where = f"repetition {rep}, slice {slc}: " if router.multi else ""
    log.info(where + "scan: protocol %s, %d frames, matrix %s (x, y, z), %d coils, %d lines (R = %.1f, "
             "%d calibration), %d noise samples, %d ignored, %d repeated; method %s on %s",
             raw.protocol_name or "(from YAML)", lines.n_frames, "x".join(map(str, raw.geometry.matrix)),
             lines.n_coils, len(lines.frame), lines.acceleration(), int(np.count_nonzero(lines.calib)),
             noise, raw.n_ignored, raw.n_repeated, rs.method, rs.device)
    t = time.perf_counter()
    progress = _progress_logger(rs.method)
    if check_peer is not None:      # a peer that vanishes during the fit ends it at the next step
        def progress(it, total, loss, _log=progress):
            check_peer()
            _log(it, total, loss)
    with concurrency.device_slot(device, gs.device_slots, what=where, check=check_peer):
        result = recon.reconstruct(scan, rs, progress=progress, protocol=proto, device=device)
    if check_peer is not None:
        check_peer()
    total = time.perf_counter() - t
    for name, sec in result.timings.items():
        clock.add(name, sec)
    info = result.info
    t = time.perf_counter()
    extra = {"LOREIN_Protocol": info.get("protocol", raw.protocol_name), "LOREIN_Rank": info.get("rank", ""),
             "LOREIN_Version": __version__}
    images = map_images.maps_to_images(result.maps.as_dict(), raw.geometry, as_2d=gs.images_2d,
                                method=METHOD_LABELS.get(rs.method, rs.method), extra=extra)
    if gs.output == "maps+coefficients":
        images += map_images.coefficient_images(recon.model_coefficients(result), raw.geometry,
                                                gs.images_2d, METHOD_LABELS.get(rs.method, rs.method))
    clock.add("images", time.perf_counter() - t)
    images += derived_images(result, proto, raw.geometry, gs, METHOD_LABELS.get(rs.method, rs.method),
                             extra, clock)
    if router.multi:
        map_images.place_volume(images, map_images.VolumeIndex(rep, slc, router.volume_index(volume.key)),
                                raw.geometry.shape[0], gs.images_2d)
    t = time.perf_counter()
    for img in images:
        send(img)
    clock.add("send", time.perf_counter() - t)
    counts["images"] += len(images)
    counts["volumes"] += 1
    iters = info.get("iterations") or rs.iterations or "default"
    log.info(where + "lorein: done: method %s, protocol %s, rank %s, iterations %s, reconstruction %.1f s; "
             "sent %d images (%s)", rs.method, info.get("protocol"), info.get("rank"), iters, total,
             len(images), ", ".join(sorted(result.maps.as_dict())))


def derived_images(result, proto, geometry, gs: settings_mod.NodeSettings, method: str,
                   extra: dict | None = None, clock: _Clock | None = None) -> list:
    """The synthetic weighted images (series 11-16, setting ``synthetic``) and the confidence maps
    (series 21-25, setting ``confidence``) of a reconstruction, as ISMRMRD images."""
    images = []
    t = time.perf_counter()
    timings = synthetic.timings_from_settings(gs)
    if timings:
        vols = synthetic.synthetic_images(result.maps, timings)
        desc = {k: "LOREIN synthetic " + synthetic.describe(k, v) for k, v in timings.items()}
        timing = {k: {"LOREIN_Timing": ",".join(f"{x:g}" for x in v), "EchoTime": f"{v[1]:g}",
                      "RepetitionTime": f"{v[0]:g}", **({"InversionTime": f"{v[2]:g}"} if len(v) > 2 else {})}
                  for k, v in timings.items()}
        images += map_images.derived_images(vols, geometry, "synthetic", synthetic.SERIES, {}, desc,
                                            gs.images_2d, method, extra, timing)
    if clock is not None:
        clock.add("synthetic", time.perf_counter() - t)
    t = time.perf_counter()
    if gs.confidence and result.noise is not None:
        vols = confidence.confidence_maps(proto, result.maps, result.support, result.noise,
                                          gs.confidence_max_rel_sd, result.subspace)
        desc = {k: f"LOREIN {k.split('_')[0]} SD (Cramer-Rao)" for k in vols}
        desc["UNDETERMINED"] = f"LOREIN undetermined (rel. SD > {gs.confidence_max_rel_sd:g})"
        images += map_images.derived_images(vols, geometry, "confidence", confidence.SERIES,
                                            confidence.UNITS, desc, gs.images_2d, method, extra)
    if clock is not None:
        clock.add("confidence", time.perf_counter() - t)
    return images


def _check_resources(router: volumes.VolumeRouter, proto, rs, gs, device) -> None:
    """The protocol's sizes and the memory estimate against gadget_lorein/limits.py, before any
    data is read (the header's sizes were checked by the buffer). A multi-volume stream may hold
    up to MAX_OPEN_VOLUMES volumes' lines at once."""
    buf = router.info
    atoms = limits.check_protocol(proto)
    n_open = min(buf.n_volumes, limits.MAX_OPEN_VOLUMES)
    est = limits.estimate_bytes(buf.nx, buf.ny, buf.nz, buf.n_frames, buf.n_coils or 1,
                                (buf.n_lines_hint or 0) * n_open, atoms, rs.rank, rs.virtual_coils)
    limits.check_memory(est, gs.max_memory_gb, device)


def process(header_xml, items: Iterable, settings: dict | None, send: Callable,
            check_peer: Callable | None = None) -> None:
    """Reconstruct a stream: the ISMRMRD XML header (str or bytes), an iterable of acquisitions
    (and anything else, which is passed on), the settings mapping (see the module docstring) and
    ``send(item)``, called with every passed-on item and every output image.

    Raises ``SettingsError`` / ``recon.ReconError`` (bad settings, protocol, reconstruction input),
    ``header.MRDError`` (header or data outside the contract, or a stream that ends before
    ACQ_LAST_IN_MEASUREMENT), ``limits.ResourceError`` (over a limit of gadget_lorein/limits.py),
    or whatever failed; nothing is sent for a failed measurement. ``check_peer()``, called at every
    fit step, raises to abandon the reconstruction (a vanished peer).
    """
    t_start = time.perf_counter()
    clock = _Clock()
    parsed = settings if isinstance(settings, settings_mod.Settings) else settings_mod.parse(settings)
    rs, gs = parsed.recon, parsed.node
    if "log_level" in parsed.given:
        _apply_log_level(gs.log_level)
    log.info("settings: %s", ", ".join(f"{k}={v}" for k, v in {**asdict(rs), **asdict(gs)}.items()))
    if isinstance(header_xml, (bytes, bytearray)):
        header_xml = bytes(header_xml).decode("utf-8")
    t = time.perf_counter()
    budget = limits.memory_budget(gs.max_memory_gb)
    router = volumes.VolumeRouter(header_xml, budget)
    buf = router.info
    proto = _check_protocol(buf, rs)
    device = recon.resolve_device(rs.device)
    _check_resources(router, proto, rs, gs, device)
    concurrency.set_threads(gs.threads)
    clock.add("header", time.perf_counter() - t)
    log.info("header: protocol %s (%s, %d frames), matrix %dx%dx%d, %s coils%s", proto.name, proto.kind,
             proto.n_frames, buf.nx, buf.ny, buf.nz, buf.n_coils if buf.n_coils is not None else "?",
             f", {router.n_repetitions} repetition(s) x {router.n_slices} slice(s)" if router.multi else "")
    counts = {"acquisitions": 0, "noise": 0, "passed": 0, "images": 0, "volumes": 0}
    t_read = time.perf_counter()

    def reconstruct_volumes(ready):
        nonlocal t_read
        clock.add("receive", time.perf_counter() - t_read)
        for volume in ready:
            _reconstruct_scan(router, volume, rs, gs, proto, device, send, clock, counts, check_peer)
        t_read = time.perf_counter()

    for item in items:
        if not isinstance(item, ismrmrd.Acquisition):
            send(item)
            counts["passed"] += 1
            continue
        kind, ready = router.add(item)
        counts["acquisitions"] += 1
        if kind == "noise":
            counts["noise"] += 1
        elif kind == "ignored":
            send(item)
            counts["passed"] += 1
        if ready:
            reconstruct_volumes(ready)
    pending = router.pending()
    if not pending and counts["volumes"] == 0:
        raise header.MRDError(
            f"the stream ended before ACQ_LAST_IN_MEASUREMENT: {counts['acquisitions']} acquisitions "
            f"received (0 imaging lines); no maps")
    try:
        ready = router.end_of_stream()
    except header.MRDError as err:
        raise header.MRDError(f"{err} ({counts['acquisitions']} acquisitions received, "
                              f"{counts['volumes']} volume(s) reconstructed)") from None
    reconstruct_volumes(ready)
    log.info("lorein: %d acquisitions (%d noise, %d passed on), %d volume(s), %d images; timings: "
             "%s; total %.2f s", counts["acquisitions"], counts["noise"], counts["passed"],
             counts["volumes"], counts["images"], _fmt_timings(clock.timings),
             time.perf_counter() - t_start)


# --------------------------------------------------------------------------------------------
# the chain's target
# --------------------------------------------------------------------------------------------

def reconstruct(connection, settings: dict | None = None) -> None:
    """The chain's target: ``python -m gadgetron PORT gadget_lorein.node.gadget reconstruct``.

    Settings come from the chain's <configuration> (``connection.config``); ``settings`` (passive
    mode, ``lorein serve``) override them. Errors: logged, sent to Gadgetron as ERROR, re-raised."""
    guard(connection)
    state = {"closed": False}
    watchdog = peer_guard.PeerWatchdog(connection.socket)

    def items():
        yield from connection
        state["closed"] = True

    try:
        conf = settings_io.chain_properties(connection.config)
        _check_network_protocol(conf, settings)
        merged = {**conf, **(settings or {})}
        level = str(merged.get("log_level") or "INFO").upper()
        if level in settings_mod.BY_NAME["log_level"].choices:
            _apply_log_level(level)
        log.info("gadget_lorein %s: connection open (settings given: %s)", __version__,
                 ", ".join(f"{k}={v}" for k, v in merged.items()) or "none")
        watchdog.start()
        process(connection.raw_bytes.header, items(), settings_mod.parse(merged), connection.send,
                watchdog.check)
    except BaseException as err:
        text = describe_error(err) if not isinstance(err, KeyboardInterrupt) else "interrupted"
        log.error("lorein: error: %s", text)
        if not isinstance(err, ConnectionError):
            if send_error(connection, f"gadget_lorein: {text}") and not state["closed"]:
                n = drain(connection)
                log.info("dropped %d messages after the error, until Gadgetron's CLOSE", n)
        raise
    finally:
        watchdog.stop()


def _check_network_protocol(config: dict, settings: dict | None) -> None:
    """A protocol named by the chain's configuration (it comes over the socket) must be a shipped
    name: file paths are taken only from ``lorein serve``'s own options."""
    value = str(config.get("protocol") or "").strip()
    if value and not (settings or {}).get("protocol") and value not in protocol_mod.available():
        raise settings_mod.SettingsError(
            f"setting protocol from the chain's configuration must be a shipped protocol name "
            f"({', '.join(protocol_mod.available())}), not {value[:80]!r}; a YAML file can be given "
            f"to lorein serve --protocol")


# --------------------------------------------------------------------------------------------
# offline
# --------------------------------------------------------------------------------------------

def recon_file(raw_path, out_path, settings=None, group: str | None = None,
               in_group: str = "dataset") -> list[ismrmrd.Image]:
    """``lorein recon``: reconstruct a raw ISMRMRD file exactly as the chain does (same code,
    :func:`process`) and append the images to ``out_path`` as ``/<group>/image_<series>``, the
    layout of gadgetron_ismrmrd_client (``group`` default: local date and time
    ``YYYY-MM-DD HH:MM:SS``, as the stock client and ``lorein replay``). Returns the images.
    Nothing is written when the reconstruction fails."""
    from .replay import date_time_group

    xml, acquisitions = rawfile.iter_raw(raw_path, in_group)
    sent: list = []
    process(xml, acquisitions, settings, sent.append)
    images = [x for x in sent if isinstance(x, ismrmrd.Image)]
    group = group or date_time_group()
    map_images.write_images(out_path, group, images)
    log.info("wrote %d images to %s group '%s'", len(images), out_path, group)
    return images
