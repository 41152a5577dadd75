"""The Gadgetron node: acquisitions in, parameter maps (ISMRMRD images) out.

Gadgetron starts it as an external Python gadget (``config_xml/lorein.xml``)::

    python -m gadgetron PORT gadget_lorein.node.gadget reconstruct

or connects to it when it is already running (passive mode, ``config_xml/lorein_connect.xml``,
started with ``lorein serve --port 18000``, i.e. :func:`serve`). ``lorein recon`` runs the very same
code on a raw file (:func:`recon_file`), so the chain and the command line give identical maps.

API
    ``reconstruct(connection, settings=None)``  the chain's target (a gadgetron-python Connection)
    ``process(header_xml, items, settings, send)``  the core: header + acquisitions -> send(images)
    ``recon_file(raw_path, out_path, settings, group=None, in_group="dataset")``  offline recon
    ``serve(port, settings=None, once=True)``  passive mode: listen, serve Gadgetron connections
    ``parse_settings(mapping)`` -> (recon.ReconSettings, GadgetSettings)  validation only

What happens to the stream
    - the first acquisitions flagged ACQ_IS_NOISE_MEASUREMENT are kept for prewhitening;
    - imaging acquisitions are placed on the Cartesian grid (``buffer.AcquisitionBuffer``; the raw-data
      contract is docs/data-format.md);
    - acquisitions the buffer does not use (navigators, phase correction, dummy scans, feedback ...)
      and anything that is not an acquisition (waveforms, images) go on to the next gadget unchanged;
    - at the acquisition flagged ACQ_LAST_IN_MEASUREMENT the scan is reconstructed
      (``recon.reconstruct``) and one float32 image per map is sent (T1 [ms], T2 [ms], PD [a.u.],
      and B1 [fraction] for protocols that encode it; series 1, 2, 3, 4; geometry and meta as in
      docs/data-format.md). Acquisitions after it start a new measurement;
    - a stream that ends (CLOSE) before ACQ_LAST_IN_MEASUREMENT is an error: no maps are sent.

Errors
    Every failure (bad header or data, unknown protocol, bad setting, calibration, a bug) is logged
    as one line ``lorein: error: <Type>: <message>`` and sent to Gadgetron as an ERROR message
    (message id 8), which Gadgetron logs and forwards to its client as ``... ERROR: ...`` text; the
    rest of the stream is then read and dropped until Gadgetron's CLOSE (at most 30 s of silence),
    so that Gadgetron can finish the connection cleanly; the exception then propagates, so that
    ``python -m gadgetron`` exits non-zero (and ``lorein serve`` too). If Gadgetron vanishes without a
    CLOSE (killed, network cut), reading raises ``ConnectionError`` at once instead of spinning
    (gadgetron-python 1.4.1 loops forever on an empty ``recv``; this module guards its own
    connections only). Limitation: in the ``python -m gadgetron`` path gadgetron-python reads the
    configuration and header before this module is imported, so a peer that vanishes during those
    first two messages, or a header that does not parse as XML, is handled by gadgetron-python alone.

Settings
    From the chain's ``<configuration>`` (``<property name=... value=.../>``, values are strings), from
    ``lorein serve`` (overriding the chain's) or from ``lorein recon``'s options (a plain mapping).
    An empty value means the default. Unknown names are logged as a warning and ignored; bad values
    are errors (sent to Gadgetron as above, before any data is read).

    ================== ============ ==============================================================
    name               default      meaning
    ================== ============ ==============================================================
    method             lorein       lorein (joint low-rank + parameter-map networks), pmr, lrr,
                                    cg (subspace CG least squares + dictionary matching), llr
                                    (locally low-rank), zerofill
    device             auto         auto (cuda if torch sees one, else cpu), cpu, cuda, cuda:N
    rank               0            subspace rank K; 0 = the smallest K capturing ``energy``
    energy             0.999        dictionary energy the subspace must capture when rank = 0
                                    (0 < energy <= 1)
    iterations         0            iterations of the method; 0 = its default (lorein/pmr/lrr 1200
                                    with early stop, cg 30, llr 80)
    coil_maps          lowres       coil sensitivities from the calibration region: lowres
                                    (windowed low-resolution images) or espirit (needs a
                                    calibration region of at least 6 x 6 (kz x ky) lines)
    virtual_coils      0            compress to this many virtual coils; 0 = no compression
    coil_batch         0            coils per FFT batch in the fit (0 = all); smaller needs less
                                    GPU memory (halved automatically when the GPU runs out, then
                                    the CPU)
    coil_subset        0            speed: coils drawn at random per fit step for the data terms
                                    (an unbiased estimate, fewer FFTs, a noisier fit); 0 = all
    amp                false        speed: the fit's network MLPs in bfloat16 (for GPUs; true/false)
    coil_refine        8            lorein/pmr/lrr: the coil maps are refined jointly with the fit,
                                    as a smooth correction (this many central k-space coefficients
                                    per axis and coil; in lorein fitted by the PMR block's data
                                    term); 0 = calibration maps as they are
    couple_weight      0.1          lorein: weight of the coupling between the PMR block's
                                    coefficients and the LRR block's (relative to the data terms;
                                    see gadget_lorein/recon/lorein/fit.py); 0 = two independent blocks
                                    (the maps are then PMR's alone)
    holdout            0.05         lorein/pmr/lrr: this fraction of the measured lines (drawn at
                                    random, seeded) is left out of the fit; their loss is checked
                                    every 20 steps, the maps are those of the last check within 1 %
                                    of its lowest, and the fit stops when there has been none such
                                    for 200 steps; 0 = off: every line fitted, the last step's maps
                                    (see gadget_lorein/recon/lorein/fit.py)
    grid_levels        12           lorein/pmr/lrr, both coordinate networks: hash-grid levels
    grid_features      2            features per hash-grid level
    grid_log2_table    0            log2 of the hash-table entries per level (10-24); 0 = from
                                    the voxel count (2^12 to 2^19)
    grid_base          4            coarsest hash-grid resolution (cells per axis)
    grid_finest        0            finest hash-grid resolution; 0 = the largest matrix dimension
    mlp_width          64           hidden units per layer of the networks' MLP heads
    mlp_layers         2            hidden layers of the MLP heads (0 = a linear head)
    lrr_finest         0            lorein: the LRR block's finest hash-grid resolution; 0 = the
                                    PMR block's own; lrr alone always keeps the full grid (see
                                    gadget_lorein/recon/lorein/fit.py, "LRR grid")
    protocol           (empty)      sequence protocol: empty = the one in the data
                                    (userParameter lorein.protocol_yaml, else lorein.protocol /
                                    protocolName), else a shipped name (qalas, mrf); a YAML path
                                    only from lorein serve / recon options, never from the chain
    seed               0            seed of the network initialisation (CPU results repeat exactly)
    support_threshold  0.08         object support: low-resolution image above this fraction of
                                    its 99th percentile (0 <= value < 1); maps are 0 outside
    output             maps         maps: the parameter maps only; maps+coefficients: also the K
                                    subspace coefficient images (complex float, series 101, 102,
                                    ...; ``LOREIN_Map`` coef1, coef2, ...): the reconstruction's
                                    own when it returns them, else the signal model's coefficients
                                    at the fitted maps (PD x U^H s(T1, T2, B1), meta
                                    ``LOREIN_CoefficientSource`` = model)
    images_2d          false        true: one 2D image per partition and map instead of one 3D
                                    image per map (true/false, 1/0, yes/no, on/off)
    log_level          INFO         level of the gadget_lorein loggers: DEBUG, INFO, WARNING,
                                    ERROR (the chain's external-gadget log goes to Gadgetron's log)
    max_memory_gb      0            memory ceiling of one reconstruction (GB); 0 = 80 % of the
                                    memory available (gadget_lorein/limits.py lists every limit)
    ================== ============ ==============================================================

    All but the last four are ``recon.ReconSettings`` (their defaults are that class's; the same names as
    ``lorein recon``'s options, with - for _); the last four belong to the gadget. The shipped
    chains (config_xml/*.xml) list most of them with their defaults.
"""
from __future__ import annotations

import logging
import math
import socket
import struct
import time
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace
from typing import Callable, Iterable

import ismrmrd
import numpy as np

from .. import __version__, limits

from ..recon import pipeline as recon
from ..io import buffer, header, map_images, rawfile
from ..physics import protocol as protocol_mod
from . import guard

log = logging.getLogger(__name__)

__all__ = ["reconstruct", "process", "recon_file", "serve", "parse_settings", "config_settings",
           "describe_error", "send_error", "GadgetSettings", "SettingsError", "GADGET_DEFAULTS",
           "RECON_SETTING_NAMES", "METHOD_LABELS", "ERROR_MESSAGE_ID"]

ERROR_MESSAGE_ID = 8                   # Gadgetron's GADGET_MESSAGE_ERROR: <HQ id, length, text
OUTPUTS = ("maps", "maps+coefficients")
COIL_MAPS = ("lowres", "espirit")
COEFFICIENT_SERIES_BASE = 100          # coefficient k (1-based) goes to series 100 + k
DRAIN_TIMEOUT_S = 30.0                 # after an error: longest silence while draining the stream
METHOD_LABELS = {"lorein": "LoREIN", "pmr": "PMR", "lrr": "LRR", "cg": "CG", "llr": "LLR",
                 "zerofill": "zerofill"}
GADGET_DEFAULTS = {"output": "maps", "images_2d": "false", "log_level": "INFO", "max_memory_gb": "0"}
RECON_SETTING_NAMES = tuple(f.name for f in fields(recon.ReconSettings))
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A setting with a value the gadget cannot use; the message names it."""


@dataclass
class GadgetSettings:
    """The gadget's own settings (the reconstruction's are ``recon.ReconSettings``)."""
    output: str = "maps"
    images_2d: bool = False
    log_level: str = "INFO"
    max_memory_gb: float = 0.0      # memory ceiling; 0 = limits.MEMORY_FRACTION of the available


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------

def config_settings(config) -> dict:
    """{name: value} of the ``<property>`` children of the chain's <configuration> (None: {})."""
    if config is None:
        return {}
    return {p.get("name"): p.get("value") for p in config.findall("property")}


def _bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise SettingsError(f"setting {name}={value!r} is not a boolean (true/false, 1/0, yes/no, on/off)")


def parse_settings(values: dict | None) -> tuple[recon.ReconSettings, GadgetSettings]:
    """Validate a settings mapping (strings or typed values; empty = default). Unknown names are
    logged as a warning. Raises SettingsError / recon.ReconError naming a bad value."""
    values = {str(k): v for k, v in (values or {}).items() if k is not None}
    unknown = sorted(k for k in values if k not in RECON_SETTING_NAMES and k not in GADGET_DEFAULTS)
    if unknown:
        log.warning("ignoring unknown setting(s) %s; known: %s", ", ".join(unknown),
                    ", ".join(RECON_SETTING_NAMES + tuple(GADGET_DEFAULTS)))
    given = {k: (v.strip() if isinstance(v, str) else v) for k, v in values.items()
             if v is not None and not (isinstance(v, str) and v.strip() == "")}
    rs = recon.ReconSettings.from_mapping({k: v for k, v in given.items() if k in RECON_SETTING_NAMES})
    checks = (
        ("rank", rs.rank >= 0, "must be >= 0 (0 = from energy)"),
        ("energy", 0.0 < rs.energy <= 1.0, "must be in (0, 1]"),
        ("iterations", rs.iterations >= 0, "must be >= 0 (0 = the method's default)"),
        ("virtual_coils", rs.virtual_coils >= 0, "must be >= 0 (0 = no compression)"),
        ("coil_batch", rs.coil_batch >= 0, "must be >= 0 (0 = all coils at once)"),
        ("coil_subset", rs.coil_subset >= 0, "must be >= 0 (0 = all coils every step)"),
        ("coil_refine", rs.coil_refine >= 0, "must be >= 0 (0 = no coil-map refinement)"),
        ("couple_weight", math.isfinite(rs.couple_weight) and rs.couple_weight >= 0,
         "must be a finite number >= 0"),
        ("holdout", rs.holdout == 0 or 0 < rs.holdout < 0.5,
         "must be 0 (off) or a fraction of the lines below 0.5"),
        ("grid_levels", 1 <= rs.grid_levels <= 32, "must be in 1..32"),
        ("grid_features", 1 <= rs.grid_features <= 16, "must be in 1..16"),
        ("grid_log2_table", rs.grid_log2_table == 0 or 10 <= rs.grid_log2_table <= 24,
         "must be 0 (automatic) or in 10..24"),
        ("grid_base", rs.grid_base >= 1, "must be >= 1"),
        ("grid_finest", rs.grid_finest == 0 or rs.grid_finest >= rs.grid_base,
         f"must be 0 (the matrix size) or >= grid_base ({rs.grid_base})"),
        ("mlp_width", rs.mlp_width >= 1, "must be >= 1"),
        ("mlp_layers", 0 <= rs.mlp_layers <= 16, "must be in 0..16"),
        ("lrr_finest", rs.lrr_finest == 0 or rs.lrr_finest >= rs.grid_base,
         f"must be 0 (PMR's own) or >= grid_base ({rs.grid_base})"),
        ("support_threshold", 0.0 <= rs.support_threshold < 1.0, "must be in [0, 1)"),
        ("coil_maps", rs.coil_maps in COIL_MAPS, f"must be one of {', '.join(COIL_MAPS)}"),
    )
    for name, ok, why in checks:
        if not ok:
            raise SettingsError(f"setting {name}={getattr(rs, name)!r} {why}")
    limits.check_settings(rs)
    try:
        recon.resolve_device(rs.device)
    except recon.ReconError:
        raise
    except Exception as err:   # torch.device('foo') raises RuntimeError
        raise SettingsError(f"setting device={rs.device!r} is not a device (auto, cpu, cuda, "
                            f"cuda:N): {err}") from None
    if rs.protocol:
        try:
            protocol_mod.load(rs.protocol)
        except protocol_mod.ProtocolError as err:
            raise SettingsError(f"setting protocol={rs.protocol!r}: {err}") from None

    gs = GadgetSettings()
    if "output" in given:
        gs.output = str(given["output"]).lower()
        if gs.output not in OUTPUTS:
            raise SettingsError(f"setting output={given['output']!r} must be one of {', '.join(OUTPUTS)}")
    if "images_2d" in given:
        gs.images_2d = _bool("images_2d", given["images_2d"])
    if "log_level" in given:
        gs.log_level = str(given["log_level"]).upper()
        if gs.log_level not in _LEVELS:
            raise SettingsError(f"setting log_level={given['log_level']!r} must be one of {', '.join(_LEVELS)}")
    if "max_memory_gb" in given:
        try:
            gs.max_memory_gb = float(given["max_memory_gb"])
        except (TypeError, ValueError):
            gs.max_memory_gb = -1.0
        if not (math.isfinite(gs.max_memory_gb) and gs.max_memory_gb >= 0):
            raise SettingsError(f"setting max_memory_gb={given['max_memory_gb']!r} must be a number >= 0 "
                                "(0 = 80% of the available memory)")
    return rs, gs


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


def _check_protocol(buf: buffer.AcquisitionBuffer, rs: recon.ReconSettings) -> protocol_mod.Protocol:
    """The protocol the reconstruction will use, resolved before any data is read."""
    if not rs.protocol and not buf.protocol_yaml and not buf.protocol_name:
        raise recon.ReconError(
            f"the header names no protocol (userParameter {header.UP_PROTOCOL_YAML} or {header.UP_PROTOCOL}, "
            f"or measurementInformation/protocolName) and no 'protocol' setting was given; shipped "
            f"protocols: {', '.join(protocol_mod.available())}")
    proto = recon.scan_protocol(SimpleNamespace(protocol_yaml=buf.protocol_yaml,
                                                protocol_name=buf.protocol_name), rs.protocol)
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


def _coefficient_images(result: recon.ReconResult, scan, rs: recon.ReconSettings,
                        geometry: header.Geometry, as_2d: bool) -> list[ismrmrd.Image]:
    """Subspace coefficient images (complex float32, series 101, 102, ...)."""
    coeffs = getattr(result, "coefficients", None)
    source = "reconstruction"
    if coeffs is None:     # recon.reconstruct returns maps only: the model's coefficients at the maps
        import torch
        from ..physics.subspace import build_subspace
        proto = recon.scan_protocol(scan, rs.protocol)
        sub = build_subspace(proto, rs.rank or None, rs.energy, device="cpu")
        sup = np.asarray(result.support, bool)
        m = {k: torch.from_numpy(np.asarray(v, np.float32)[sup]) for k, v in result.maps.items()}
        b1 = m.get("B1")
        with torch.no_grad():
            c = (m["PD"][:, None] * sub.coefficients(m["T1"].clamp_min(1e-3), m["T2"].clamp_min(1e-3),
                                                     b1)).numpy()
        coeffs = np.zeros((c.shape[1],) + sup.shape, np.complex64)
        coeffs[:, sup] = c.T
        source = "model"
    coeffs = np.asarray(coeffs, np.complex64)
    nz = geometry.shape[0]
    dz = geometry.fov_mm[2] / nz
    pos0, sdir = np.asarray(geometry.position, float), np.asarray(geometry.slice_dir, float)
    images = []
    for k in range(coeffs.shape[0]):
        series = COEFFICIENT_SERIES_BASE + k + 1
        if as_2d:
            parts = [(z, coeffs[k, z:z + 1], pos0 + (z - nz // 2) * dz * sdir,
                      (geometry.fov_mm[0], geometry.fov_mm[1], dz)) for z in range(nz)]
        else:
            parts = [(0, coeffs[k], pos0, geometry.fov_mm)]
        for z, data, pos, fov in parts:
            img = ismrmrd.Image.from_array(np.ascontiguousarray(data), transpose=False)
            map_images._set_geometry(img, geometry, pos, fov, z, z + 1, series)
            img.image_type = ismrmrd.IMTYPE_COMPLEX
            meta = ismrmrd.Meta()
            meta.update({"GADGETRON_DataRole": "LOREIN_COEFFICIENT", "GADGETRON_ImageComment": f"coef{k + 1}",
                         "GADGETRON_SeqDescription": f"LOREIN_coef{k + 1}",
                         "GADGETRON_ImageProcessingHistory": ["LOREIN", f"coef{k + 1}"],
                         "GADGETRON_ImageNumber": str(z + 1), "LOREIN_Map": f"coef{k + 1}",
                         "LOREIN_Unit": "a.u.", "LOREIN_Method": METHOD_LABELS.get(rs.method, rs.method),
                         "LOREIN_CoefficientSource": source})
            img.meta = meta
            images.append(img)
    return images


def _reconstruct_scan(buf: buffer.AcquisitionBuffer, rs: recon.ReconSettings, gs: GadgetSettings,
                      send: Callable, clock: _Clock, counts: dict, check_peer: Callable | None = None) -> None:
    t = time.perf_counter()
    raw = buf.finish()
    scan = raw.to_scan()
    clock.add("finish_buffer", time.perf_counter() - t)
    lines = scan.lines
    noise = 0 if raw.noise is None else raw.noise.shape[1]
    log.info("scan: protocol %s, %d frames, matrix %s (x, y, z), %d coils, %d lines (R = %.1f, "
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
    result = recon.reconstruct(scan, rs, progress=progress)
    if check_peer is not None:
        check_peer()
    total = time.perf_counter() - t
    for name, sec in result.timings.items():
        clock.add(name, sec)
    info = result.info
    t = time.perf_counter()
    extra = {"LOREIN_Protocol": info.get("protocol", raw.protocol_name), "LOREIN_Rank": info.get("rank", ""),
             "LOREIN_Version": __version__}
    images = map_images.maps_to_images(result.maps, raw.geometry, as_2d=gs.images_2d,
                                method=METHOD_LABELS.get(rs.method, rs.method), extra=extra)
    if gs.output == "maps+coefficients":
        images += _coefficient_images(result, scan, rs, raw.geometry, gs.images_2d)
    clock.add("images", time.perf_counter() - t)
    t = time.perf_counter()
    for img in images:
        send(img)
    clock.add("send", time.perf_counter() - t)
    counts["images"] += len(images)
    counts["measurements"] += 1
    iters = info.get("iterations") or rs.iterations or "default"
    log.info("lorein: done: method %s, protocol %s, rank %s, iterations %s, reconstruction %.1f s; "
             "sent %d images (%s)", rs.method, info.get("protocol"), info.get("rank"), iters, total,
             len(images), ", ".join(sorted(result.maps)))


def _check_resources(buf: buffer.AcquisitionBuffer, proto, rs: recon.ReconSettings,
                     gs: GadgetSettings) -> None:
    """The protocol's sizes and the memory estimate against gadget_lorein/limits.py, before any
    data is read (the header's sizes were checked by the buffer)."""
    atoms = limits.check_protocol(proto)
    n_coils = buf.n_coils or 1
    n_lines = buf.n_lines_hint or 0          # without the hint the buffer checks its own growth
    est = limits.estimate_bytes(buf.nx, buf.ny, buf.nz, buf.n_frames, n_coils, n_lines, atoms,
                                rs.rank, rs.virtual_coils)
    limits.check_memory(est, gs.max_memory_gb, recon.resolve_device(rs.device))


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
    rs, gs = parse_settings(settings)
    if settings and "log_level" in settings:
        _apply_log_level(gs.log_level)
    log.info("settings: %s", ", ".join(f"{k}={v}" for k, v in {**asdict(rs), **asdict(gs)}.items()))
    if isinstance(header_xml, (bytes, bytearray)):
        header_xml = bytes(header_xml).decode("utf-8")
    t = time.perf_counter()
    budget = limits.memory_budget(gs.max_memory_gb)
    buf = buffer.AcquisitionBuffer(header_xml, max_bytes=budget)
    proto = _check_protocol(buf, rs)
    _check_resources(buf, proto, rs, gs)
    clock.add("header", time.perf_counter() - t)
    log.info("header: protocol %s (%s, %d frames), matrix %dx%dx%d, %s coils", proto.name, proto.kind,
             proto.n_frames, buf.nx, buf.ny, buf.nz, buf.n_coils if buf.n_coils is not None else "?")
    counts = {"acquisitions": 0, "noise": 0, "passed": 0, "images": 0, "measurements": 0}
    t_read = time.perf_counter()
    for item in items:
        if not isinstance(item, ismrmrd.Acquisition):
            send(item)
            counts["passed"] += 1
            continue
        if buf is None:
            buf = buffer.AcquisitionBuffer(header_xml, max_bytes=budget)
        kind = buf.add(item)
        counts["acquisitions"] += 1
        if kind == "noise":
            counts["noise"] += 1
        elif kind == "ignored":
            send(item)
            counts["passed"] += 1
        if item.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT):
            clock.add("receive", time.perf_counter() - t_read)
            _reconstruct_scan(buf, rs, gs, send, clock, counts, check_peer)
            buf = None
            t_read = time.perf_counter()
    clock.add("receive", time.perf_counter() - t_read)
    pending = 0 if buf is None else len(buf)
    if pending or counts["measurements"] == 0:
        raise header.MRDError(
            f"the stream ended before ACQ_LAST_IN_MEASUREMENT: {counts['acquisitions']} acquisitions "
            f"received ({pending} imaging lines not reconstructed); no maps")
    log.info("lorein: %d acquisitions (%d noise, %d passed on), %d measurement(s), %d images; timings: "
             "%s; total %.2f s", counts["acquisitions"], counts["noise"], counts["passed"],
             counts["measurements"], counts["images"], _fmt_timings(clock.timings),
             time.perf_counter() - t_start)


# --------------------------------------------------------------------------------------------
# Gadgetron connections
# --------------------------------------------------------------------------------------------

class _GuardedSocket:
    """A socket whose ``recv`` raises ConnectionError when the peer has gone (an empty read)
    instead of returning b'' (on which gadgetron-python's reader loops forever), and whose reads
    time out after ``timeout`` seconds of silence (gadgetron-python's ``settimeout(None)`` keeps it)."""

    def __init__(self, sock, timeout: float | None = None):
        self._sock = sock
        self.timeout = timeout
        sock.settimeout(timeout)

    def settimeout(self, value):
        self._sock.settimeout(self.timeout if value is None else value)

    def recv(self, nbytes, *flags):
        try:
            data = self._sock.recv(nbytes, *flags)
        except socket.timeout:
            raise TimeoutError(f"no message from Gadgetron for {self._sock.gettimeout():g} s") from None
        if not data and nbytes > 0:
            raise ConnectionError("Gadgetron closed the connection without a CLOSE message")
        return data

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _guard(connection) -> None:
    wrapper = connection.socket
    if not isinstance(wrapper.socket, _GuardedSocket):
        wrapper.socket = _GuardedSocket(wrapper.socket)
    wrapper.socket.timeout = limits.MESSAGE_TIMEOUT_S      # between messages, from now on
    wrapper.socket.settimeout(None)
    guard.strict_readers(connection)


def _check_network_protocol(config: dict, settings: dict | None) -> None:
    """A protocol named by the chain's configuration (it comes over the socket) must be a shipped
    name: file paths are taken only from ``lorein serve``'s own options."""
    value = str(config.get("protocol") or "").strip()
    if value and not (settings or {}).get("protocol") and value not in protocol_mod.available():
        raise SettingsError(f"setting protocol from the chain's configuration must be a shipped "
                            f"protocol name ({', '.join(protocol_mod.available())}), not "
                            f"{value[:80]!r}; a YAML file can be given to lorein serve --protocol")


def describe_error(err: BaseException) -> str:
    """One line: '<Type>: <message>'."""
    text = " ".join(str(err).split()) or repr(err)
    return f"{type(err).__name__}: {text}"


def send_error(connection, text: str) -> bool:
    """Send Gadgetron an ERROR message (id 8, uint64 length, UTF-8 text). False if it failed."""
    msg = text.encode("utf-8", "replace")
    try:
        connection.socket.write(struct.pack("<HQ", ERROR_MESSAGE_ID, len(msg)) + msg)
        return True
    except OSError as err:
        log.warning("could not send the ERROR message to Gadgetron: %s", err)
        return False


def _drain(connection, timeout: float = DRAIN_TIMEOUT_S) -> int:
    """Read and drop messages until Gadgetron's CLOSE (or silence / a closed peer)."""
    n = 0
    try:
        connection.socket.socket.settimeout(timeout)
        for _ in connection:
            n += 1
    except (OSError, ConnectionError, ValueError, EOFError) as err:
        log.debug("draining stopped after %d messages: %s", n, err)
    except Exception as err:   # a malformed message: nothing more to do
        log.debug("draining stopped after %d messages: %s", n, describe_error(err))
    return n


def reconstruct(connection, settings: dict | None = None) -> None:
    """The chain's target: ``python -m gadgetron PORT gadget_lorein.node.gadget reconstruct``.

    Settings come from the chain's <configuration> (``connection.config``); ``settings`` (passive
    mode, ``lorein serve``) override them. Errors: logged, sent to Gadgetron as ERROR, re-raised."""
    _guard(connection)
    state = {"closed": False}
    watchdog = guard.PeerWatchdog(connection.socket)

    def items():
        yield from connection
        state["closed"] = True

    try:
        conf = config_settings(connection.config)
        _check_network_protocol(conf, settings)
        merged = {**conf, **(settings or {})}
        level = str(merged.get("log_level") or "INFO").upper()
        if level in _LEVELS:
            _apply_log_level(level)
        log.info("gadget_lorein %s: connection open (settings given: %s)", __version__,
                 ", ".join(f"{k}={v}" for k, v in merged.items()) or "none")
        watchdog.start()
        process(connection.raw_bytes.header, items(), merged, connection.send, watchdog.check)
    except BaseException as err:
        text = describe_error(err) if not isinstance(err, KeyboardInterrupt) else "interrupted"
        log.error("lorein: error: %s", text)
        if not isinstance(err, ConnectionError):
            if send_error(connection, f"gadget_lorein: {text}") and not state["closed"]:
                n = _drain(connection)
                log.info("dropped %d messages after the error, until Gadgetron's CLOSE", n)
        raise
    finally:
        watchdog.stop()


def _listener(port: int, host: str = limits.DEFAULT_HOST) -> socket.socket:
    """Listening socket: on loopback by default (``limits.DEFAULT_HOST``); on '' as
    gadgetron.external.listen makes it (AF_INET6, dual stack, all interfaces), with an IPv4
    fallback where IPv6 is unavailable; on any other address in its own family."""
    if host:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(8)
        return sock
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            pass
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(8)
    return sock


def _serve_connection(conn_sock: socket.socket, settings: dict | None) -> None:
    from gadgetron.external import Connection

    guarded = _GuardedSocket(conn_sock, limits.CONFIG_TIMEOUT_S)   # the configuration and header
    try:
        connection = Connection(guarded)    # reads the configuration and the header
    except BaseException as err:
        log.error("lorein: error: could not read the configuration and header: %s", describe_error(err))
        try:
            msg = f"gadget_lorein: {describe_error(err)}".encode()
            conn_sock.sendall(struct.pack("<HQ", ERROR_MESSAGE_ID, len(msg)) + msg + struct.pack("<H", 4))
        except OSError:
            pass
        conn_sock.close()
        raise
    try:
        reconstruct(connection, settings)
    finally:
        try:
            connection.socket.close()       # CLOSE, then close the socket
        except OSError as err:
            log.debug("closing the connection: %s", err)
            conn_sock.close()


def serve(port: int, settings: dict | None = None, once: bool = True, host: str = limits.DEFAULT_HOST,
          ready: Callable[[int], None] | None = None) -> None:
    """Passive mode (``config_xml/lorein_connect.xml``, ``lorein serve``): listen on ``port`` (on
    loopback unless ``host`` says otherwise: '' = all interfaces, IPv6 and IPv4, as
    ``gadgetron.external.listen``; a warning is logged) and serve Gadgetron's connections with
    :func:`reconstruct`; ``settings`` override the chain's. ``once``: serve one connection in this
    process and return (its error propagates); otherwise serve each connection in its own process
    (``node/guard.py``), at most ``limits.MAX_CONNECTIONS`` at once (more are refused with an
    ERROR), until interrupted. Reads time out (``limits.CONFIG_TIMEOUT_S`` for the configuration and
    header, ``limits.MESSAGE_TIMEOUT_S`` between messages). ``ready(port)`` is called once the
    socket listens."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s [lorein serve %(process)d] %(message)s",
                            level=logging.INFO)
    if settings:
        parse_settings(settings)     # bad overrides fail before anything listens
    listener = _listener(port, host)
    port = listener.getsockname()[1]
    if not limits.is_loopback(host):
        log.warning("lorein serve: listening on %s, not only on loopback: anyone who can reach this "
                    "port can send data to reconstruct", host or "all interfaces")
    log.info("lorein serve: waiting for Gadgetron on port %d (%s)", port,
             "one connection" if once else "until interrupted")
    if ready is not None:
        ready(port)
    children: list = []
    try:
        while True:
            conn_sock, address = listener.accept()
            log.info("lorein serve: connection from %s", address[0] if address else "?")
            if once:
                _serve_connection(conn_sock, settings)
                return
            children = [c for c in children if c.poll() is None]
            if len(children) >= limits.MAX_CONNECTIONS:
                log.error("lorein serve: refused a connection: %d in progress (limit %d)",
                          len(children), limits.MAX_CONNECTIONS)
                guard.refuse(conn_sock, f"busy: {len(children)} connections in progress (limit "
                             f"{limits.MAX_CONNECTIONS}); try again later")
                continue
            try:
                children.append(guard.spawn(conn_sock, settings))
            finally:
                conn_sock.close()
    finally:
        listener.close()
        for child in children:
            if child.poll() is None:
                child.terminate()


# --------------------------------------------------------------------------------------------
# offline
# --------------------------------------------------------------------------------------------

def recon_file(raw_path, out_path, settings: dict | None = None, group: str | None = None,
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
