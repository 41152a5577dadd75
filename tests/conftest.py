"""Shared fixtures and helpers for the gadget tests.

Data: ``qalas_small`` and ``mrf_small`` (session scope) are a raw ISMRMRD file and its ground truth
(``qalas_tiny`` and ``mrf_tiny``, 16 x 16 x 8 and 4 coils, are always simulated: the tests that run
the chains at their defaults).
They come from ``test_data/qalas_small.h5`` + ``test_data/qalas_small_truth.npz`` (and the mrf pair)
when those exist, else they are simulated once per session into a temporary folder with the
parameters that test_data/make_test_data.py holds (``GEN``: realistic scans, white-matter SNR 30;
qalas: matrix (24, 24, 16), 6 coils, R = 8; mrf: the shipped protocol with n_tr = 100,
epg_states = 32 and a 40 x 40 x 5 dictionary grid, the same matrix and coils, R = 100).

Gadgetron's side of an external gadget (:class:`GadgetronSide`, :func:`play`): the tests play the
server: they start ``python -m gadgetron PORT MODULE TARGET`` exactly as a chain's <execute> says
(or connect to a gadget that listens, as a chain's <connect> does), send the chain's <configuration>
element as the CONFIG message, the header and the acquisitions, and read what comes back (images,
passed-on items, ERROR messages) until the gadget's CLOSE.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

# importing the package sets OMP_WAIT_POLICY=PASSIVE before torch loads (gadget_lorein/__init__.py):
# the in-process reference fits here, and every gadget and server started from this environment,
# let idle OpenMP threads sleep while they share the cores (a default fit of qalas_tiny took 88 s
# here against 35 s in the gadget before the pytest process had it)
from gadget_lorein import metrics
from gadget_lorein.io import header, map_images, rawfile

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "test_data"

# a subspace cache folder of this session's own (the gadget and server processes inherit it through
# the environment): no test reads or writes the user's cache, and no stale entry hides a change
_SESSION_CACHE = tempfile.mkdtemp(prefix="lorein-test-cache-")
os.environ["LOREIN_CACHE_DIR"] = _SESSION_CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
CONFIG_TEXT_ID, HEADER_ID, CLOSE_ID, ERROR_ID = 2, 3, 4, 8

def load_script(path: Path):
    """A repository script that is not in the package (test_data/, benchmarks/) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GEN = load_script(TEST_DATA / "make_test_data.py")   # the test scans' own parameters


def small_spec(name: str) -> dict:
    """``simulate.simulate``'s arguments for test scan ``name``, from test_data/make_test_data.py
    (the calibration block is chosen by simulate, as make_test_data's plan_of chooses it)."""
    case = GEN.CASES[name]
    return dict(matrix=GEN.MATRIX, accel=case["accel"], **GEN.COMMON)


QALAS_SPEC = small_spec("qalas_small")
# smaller cases for the tests that run LoREIN at its defaults through a chain (a default fit of
# qalas_tiny takes about a third of qalas_small's, mrf_tiny about a quarter of mrf_small's: ~30 s
# on 2 cores); simulated once per session, not stored
QALAS_TINY_SPEC = dict(QALAS_SPEC, matrix=(16, 16, 8), n_coils=4)
MRF_SPEC = small_spec("mrf_small")
MRF_OVERRIDES = GEN.MRF_OVERRIDES
MRF_TINY_SPEC = dict(MRF_SPEC, matrix=(16, 16, 8), n_coils=4, accel=40)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

@dataclass
class RawCase:
    """A raw file and its ground truth (T1, T2, PD, labels; B1 where the protocol encodes it)."""
    name: str
    raw: Path
    truth: dict
    maps: tuple          # the maps the reconstruction returns
    source: str          # "test_data" or "simulated"

    @property
    def brain(self) -> np.ndarray:
        return self.truth["labels"] > 0


_TRUTH_KEYS = {"t1": "T1", "t2": "T2", "pd": "PD", "b1": "B1", "labels": "labels"}


def unknown_protocol(h, name: str = "qalas_v9") -> None:
    """Edit an ismrmrd.xsd header so that it names a protocol that is not shipped (and carries no
    protocol YAML)."""
    ups = h.userParameters.userParameterString
    ups[:] = [p for p in ups if p.name != "lorein.protocol_yaml"]
    for p in ups:
        if p.name == "lorein.protocol":
            p.value = name
    h.measurementInformation.protocolName = name


def load_truth(path) -> dict:
    with np.load(path) as z:
        return {_TRUTH_KEYS.get(k.lower(), k): np.asarray(z[k]) for k in z.files}


def simulator(sequence: str, spec: dict, overrides: dict | None = None):
    """A function of a path that simulates the shipped ``sequence`` protocol (with ``overrides``)
    at ``spec`` into that raw file, its truth beside it, and returns the truth."""
    def make(path: Path) -> dict:
        from gadget_lorein.physics import protocol
        from gadget_lorein.sim import simulate
        proto = protocol.load(sequence)
        if overrides:
            proto = proto.with_overrides(**overrides)
        return _write(path, proto, simulate.simulate(proto, **spec))
    return make


def _write(path: Path, proto, sim) -> dict:
    from gadget_lorein.physics import sequences
    scan = sim.scan
    rawfile.write_raw(path, scan.lines, None, None, scan.noise, proto.name, proto.yaml_text, scan.fov_mm,
                  sequences.sequence_parameters(proto))
    truth = sim.truth()
    np.savez_compressed(path.with_name(path.stem + "_truth.npz"), **truth)
    return truth


def warm_subspace(raw) -> None:
    """Build (or load) the subspace of the file's protocol with the default rank/energy, so that it
    is in the on-disk cache ($LOREIN_CACHE_DIR: the session's own folder, set above) before a gadget process
    needs it: the dictionary simulation is then not charged to a test's timeout."""
    from gadget_lorein.physics import protocol
    from gadget_lorein.recon import pipeline as recon
    from gadget_lorein.physics.subspace import build_subspace
    xml, _ = rawfile.iter_raw(raw)
    ups = header.user_parameters(xml)
    proto = (protocol.from_yaml(ups[header.UP_PROTOCOL_YAML]) if header.UP_PROTOCOL_YAML in ups
             else protocol.load(ups[header.UP_PROTOCOL]))
    s = recon.ReconSettings()
    build_subspace(proto, s.rank or None, s.energy, device="cpu")


def _case(name, make, tmp_path_factory, maps) -> RawCase:
    raw, truth_path = TEST_DATA / f"{name}.h5", TEST_DATA / f"{name}_truth.npz"
    if raw.exists() and truth_path.exists():
        case = RawCase(name, raw, load_truth(truth_path), maps, "test_data")
    else:
        raw = tmp_path_factory.mktemp("data") / f"{name}.h5"
        case = RawCase(name, raw, make(raw), maps, "simulated")
    warm_subspace(case.raw)
    return case


@pytest.fixture(scope="session")
def qalas_small(tmp_path_factory) -> RawCase:
    return _case("qalas_small", simulator("qalas", QALAS_SPEC), tmp_path_factory, ("T1", "T2", "PD"))


@pytest.fixture(scope="session")
def qalas_tiny(tmp_path_factory) -> RawCase:
    """QALAS_TINY_SPEC, simulated once per session (no file in test_data)."""
    return _case("qalas_tiny", simulator("qalas", QALAS_TINY_SPEC), tmp_path_factory, ("T1", "T2", "PD"))


@pytest.fixture(scope="session")
def mrf_tiny(tmp_path_factory) -> RawCase:
    """MRF_TINY_SPEC (the mrf_small protocol, 16 x 16 x 8, 4 coils, R = 40), simulated once per
    session (no file in test_data)."""
    return _case("mrf_tiny", simulator("mrf", MRF_TINY_SPEC, MRF_OVERRIDES), tmp_path_factory,
                 ("T1", "T2", "PD", "B1"))


@pytest.fixture(scope="session")
def mrf_small(tmp_path_factory) -> RawCase:
    return _case("mrf_small", simulator("mrf", MRF_SPEC, MRF_OVERRIDES), tmp_path_factory,
                 ("T1", "T2", "PD", "B1"))


# --------------------------------------------------------------------------------------------
# checks of the output
# --------------------------------------------------------------------------------------------

# Accuracy of the default method (lorein at its defaults) on the realistic test scans, as NRMSE over
# the voxels that hold one tissue (metrics.tissue_errors' "pure"; PD after its scale): checked on
# qalas_small (the chain at its defaults) and mrf_tiny (the shipped chain through the real server).
# Every limit is below what zero-filled matching and cg reach on that scan
# (test_accuracy.py::test_chain_limits_fail_linear_maps checks it). Measured on one thread, seed 0:
# qalas_small lorein T1 0.125, T2 0.159, PD 0.087; zerofill 0.188 / 0.215 / 0.158; cg (5 it) 0.269 /
# 0.236 / 0.140; llr 0.139 / 0.184 / 0.136.
# mrf_tiny (100 frames, R = 40, 16 x 16 x 8, 4 coils: a weak scan; at R = 50 the default's PD was
# no better than zero-filled matching's, at R = 25 cg's T1 beat it) lorein T1 pure 0.244-0.269,
# T2 pure 0.202-0.218, PD all 0.108, B1 all 0.048-0.049 (2 threads / 1 thread, AMD EPYC);
# zerofill 1.41 / 0.464 / 0.224 / 0.061; cg (5 it) 0.590 / 0.773 / 0.257 / 0.240; cg 0.514 / 2.08 /
# 0.226 / 0.275 (PD and B1 are checked over all tissue voxels: on single-tissue voxels zero-filled
# matching's B1, 0.050, is too close to the default's 0.040; over all tissue voxels T2 is near
# 0.7-0.8 for every method there, set by boundary voxels with CSF).
ACCURACY = {
    "qalas": {"T1 pure": 0.15, "T2 pure": 0.20, "PD pure": 0.125},
    "mrf": {"T1 pure": 0.42, "T2 pure": 0.38, "PD all": 0.17, "B1 all": 0.055},
}
# Plumbing runs (cg, 5 iterations): limits that catch zero or empty maps and nothing finer (zero maps
# score 1); these runs' maps are also compared exactly with the library's own. Measured cg (5 it):
# qalas_small T1 0.269, T2 0.236, PD 0.140; mrf_small PD 0.458, B1 0.189 (its T1 and T2, at 100
# frames and R = 100 on a 24 x 24 x 16 grid, are worse than zero maps and not checked).
PLUMBING = {
    "qalas": {"T1 pure": 0.45, "T2 pure": 0.45, "PD pure": 0.35},
    "mrf": {"PD pure": 0.65, "B1 pure": 0.35},
}
SERIES = {"T1": 1, "T2": 2, "PD": 3, "B1": 4}
UNITS = {"T1": "ms", "T2": "ms", "PD": "a.u.", "B1": "fraction"}
ROLES = {"T1": "T1", "T2": "T2", "PD": "PD", "B1": "B1MAP"}


def meta(img, key):
    v = img.meta.get(key)
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def expected_geometry(raw_path):
    """Recon matrix and FOV from the header, position and directions from the last imaging line."""
    xml, acqs = rawfile.iter_raw(raw_path)
    enc = header.parse_header(xml).encoding[0].reconSpace
    last = None
    for a in acqs:
        if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            last = a
    return dict(matrix=(int(enc.matrixSize.x), int(enc.matrixSize.y), int(enc.matrixSize.z)),
                fov=(float(enc.fieldOfView_mm.x), float(enc.fieldOfView_mm.y), float(enc.fieldOfView_mm.z)),
                position=tuple(last.position), read_dir=tuple(last.read_dir), phase_dir=tuple(last.phase_dir),
                slice_dir=tuple(last.slice_dir), uid=int(last.measurement_uid))


# the derived series the default settings add (docs/data-format.md)
SYNTHETIC_SERIES = {"T1w": 11, "T2w": 12, "PDw": 13, "FLAIR": 14, "STIR": 15}
CONFIDENCE_SERIES = {"T1_SD": 21, "T2_SD": 22, "B1_SD": 24, "UNDETERMINED": 25}


def check_images(images, case, method_label, derived=True):
    """One 3D float image per map, series/units/meta as documented, geometry from the raw file;
    with ``derived``, also the default synthetic images and confidence maps, one series each."""
    geo = expected_geometry(case.raw)
    kinds = {}
    for img in images:
        kinds.setdefault(meta(img, "LOREIN_Kind"), []).append(img)
    assert sorted(meta(i, "LOREIN_Map") for i in kinds.get("map", [])) == sorted(case.maps)
    if derived:
        assert sorted(kinds) == ["confidence", "map", "synthetic"]
        assert sorted(meta(i, "LOREIN_Map") for i in kinds["synthetic"]) == sorted(SYNTHETIC_SERIES)
        want = [k for k in CONFIDENCE_SERIES if k != "B1_SD" or "B1" in case.maps]
        assert sorted(meta(i, "LOREIN_Map") for i in kinds["confidence"]) == sorted(want)
    else:
        assert sorted(kinds) == ["map"]
    series = [i.image_series_index for i in images]
    assert len(set(series)) == len(series), series
    for img in images:
        name = meta(img, "LOREIN_Map")
        head = img.getHead()
        kind = meta(img, "LOREIN_Kind")
        assert meta(img, "LOREIN_Method") == method_label
        assert img.meta["ImageType"][0] == "DERIVED" and meta(img, "SeriesDescription")
        assert float(meta(img, "WindowWidth")) > 0
        if kind == "synthetic":
            assert img.image_series_index == SYNTHETIC_SERIES[name]
            assert meta(img, "SeriesDescription").startswith(f"LOREIN synthetic {name} TR ")
            assert float(meta(img, "EchoTime")) > 0 and float(meta(img, "RepetitionTime")) > 0
        elif kind == "confidence":
            assert img.image_series_index == CONFIDENCE_SERIES[name]
            assert meta(img, "LOREIN_Unit") == ("flag" if name == "UNDETERMINED" else UNITS[name[:2]])
        else:
            assert img.image_series_index == SERIES[name]
            assert meta(img, "LOREIN_Unit") == UNITS[name]
            assert meta(img, "GADGETRON_DataRole") == ROLES[name]
            assert meta(img, "GADGETRON_ImageComment") == f"{name}_{UNITS[name]}"
        assert head.data_type == ismrmrd.DATATYPE_FLOAT and head.image_type == ismrmrd.IMTYPE_MAGNITUDE
        assert tuple(head.matrix_size) == geo["matrix"]
        assert img.data.shape == (1, geo["matrix"][2], geo["matrix"][1], geo["matrix"][0])
        assert np.allclose(tuple(head.field_of_view), geo["fov"])
        for key in ("position", "read_dir", "phase_dir", "slice_dir"):
            assert np.allclose(tuple(getattr(head, key)), geo[key]), key
        assert head.measurement_uid == geo["uid"]
        assert np.all(np.isfinite(img.data))


def header_bytes_without_attr_len(img) -> bytes:
    """The image header's bytes with attribute_string_len zeroed (HDF5 files store 0 there)."""
    head = img.getHead()
    head.attribute_string_len = 0
    return bytes(head)


def check_accuracy(maps, case, protocol, limits=None):
    """The maps' errors (tissue_errors) within ``limits`` (default: ACCURACY[protocol], the default
    method's)."""
    limits = ACCURACY[protocol] if limits is None else limits
    errors = metrics.tissue_errors(maps, case.truth)
    print(f"NRMSE {protocol} {case.name}: " + ", ".join(f"{k} {errors[k]:.3f} (<= {v})" for k, v in limits.items()))
    bad = {k: round(errors[k], 3) for k, v in limits.items() if not errors[k] <= v}
    assert not bad, f"NRMSE above the limits {limits}: {bad}"


def check_plumbing(maps, case, protocol):
    """A plumbing run's maps are not zero or empty (PLUMBING)."""
    check_accuracy(maps, case, protocol, PLUMBING[protocol])


# --------------------------------------------------------------------------------------------
# chains
# --------------------------------------------------------------------------------------------

@dataclass
class Chain:
    """What a Gadgetron chain file says about its external node."""
    path: Path
    module: str | None          # <execute name=...>
    target: str | None          # <execute target=...>
    connect_port: int | None    # <connect port=...>
    config_text: str            # the node's <configuration> element, as the server sends it
    properties: dict


def read_chain(path) -> Chain:
    root = ET.parse(path).getroot()
    ext = root.find("stream/external")
    assert ext is not None, f"{path}: no <stream><external> node"
    ex, co, cfg = ext.find("execute"), ext.find("connect"), ext.find("configuration")
    text = ET.tostring(cfg, encoding="unicode") if cfg is not None else ""
    props = {} if cfg is None else {p.get("name"): p.get("value") for p in cfg.findall("property")}
    return Chain(Path(path), ex.get("name") if ex is not None else None,
                 ex.get("target") if ex is not None else None,
                 int(co.get("port")) if co is not None else None, text, props)


def chain_copy(source, target: Path, properties: dict | None = None, port: int | None = None) -> Path:
    """A copy of a chain file with some <property> values changed (or added) and/or the
    <connect port> replaced; everything else is kept as it is."""
    tree = ET.parse(source)
    cfg = tree.getroot().find(".//external/configuration")
    for name, value in (properties or {}).items():
        prop = next((p for p in cfg.findall("property") if p.get("name") == name), None)
        if prop is None:
            prop = ET.SubElement(cfg, "property", name=name)
        prop.set("value", str(value))
    if port is not None:
        tree.getroot().find(".//external/connect").set("port", str(port))
    tree.write(target, encoding="UTF-8", xml_declaration=True)
    return Path(target)


# --------------------------------------------------------------------------------------------
# Gadgetron's side of the external-gadget protocol
# --------------------------------------------------------------------------------------------

@dataclass
class PlayResult:
    images: list = field(default_factory=list)      # ismrmrd.Image received
    other: list = field(default_factory=list)       # anything else received (passed-on items)
    errors: list = field(default_factory=list)      # ERROR (id 8) texts
    texts: list = field(default_factory=list)       # TEXT (id 5)
    closed: bool = False                            # the gadget sent CLOSE
    receive_error: str | None = None
    send_error: str | None = None
    sent: int = 0
    returncode: int | None = None                   # child's exit status (execute mode)
    log: str = ""                                   # child's stdout + stderr
    seconds: float = 0.0

    def maps(self) -> dict:
        return map_images.images_to_maps([i for i in self.images if i.image_series_index < 100])


class _Receiver(threading.Thread):
    def __init__(self, sock, result: PlayResult):
        super().__init__(daemon=True)
        self.sock, self.result = sock, result

    def run(self):
        from ismrmrd.serialization import ProtocolDeserializer
        stream = self.sock.makefile("rb")
        try:
            while True:
                try:
                    for item in ProtocolDeserializer(stream).deserialize():
                        if isinstance(item, ismrmrd.Image):
                            self.result.images.append(item)
                        elif isinstance(item, str):
                            self.result.texts.append(item)
                        else:
                            self.result.other.append(item)
                    self.result.closed = True
                    return
                except ValueError as err:     # the deserializer does not know ERROR (8)
                    if "MessageID: 8" not in str(err):
                        raise
                    (n,) = struct.unpack("<Q", _read_exact(stream, 8))
                    self.result.errors.append(_read_exact(stream, n).decode("utf-8", "replace"))
        except BaseException as err:
            self.result.receive_error = f"{type(err).__name__}: {err}"


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("connection closed inside a message")
    return data


def header_bytes(header) -> bytes:
    if isinstance(header, bytes):
        return header
    if isinstance(header, str):
        return header.encode("utf-8")
    return header.header_to_xml(header).encode("utf-8")


def converse(sock, config_text: str, header, items, close: bool = True, abort: bool = False,
             timeout: float = 60.0) -> PlayResult:
    """Play Gadgetron on a connected socket: CONFIG, HEADER, items, then CLOSE (``close``), or an
    abrupt socket close without CLOSE (``abort``); read until the gadget's CLOSE (or ``timeout``)."""
    from ismrmrd.serialization import ConfigText, ProtocolSerializer
    result = PlayResult()
    t0 = time.monotonic()
    sock.settimeout(timeout)
    receiver = _Receiver(sock, result)
    receiver.start()
    wfile = sock.makefile("wb")
    try:
        ser = ProtocolSerializer(wfile)
        ser.serialize(ConfigText(config_text))
        hb = header_bytes(header)
        wfile.write(struct.pack("<HI", HEADER_ID, len(hb)) + hb)
        for item in items:
            ser.serialize(item)
            result.sent += 1
        if abort:
            wfile.flush()
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        elif close:
            ser.close()
        else:
            wfile.flush()
    except OSError as err:
        result.send_error = f"{type(err).__name__}: {err}"
    receiver.join(max(1.0, timeout - (time.monotonic() - t0)))
    if receiver.is_alive():
        result.receive_error = result.receive_error or f"no CLOSE within {timeout} s"
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        receiver.join(5)
    result.seconds = time.monotonic() - t0
    return result


def gadget_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def play(chain: Chain, header, items, close: bool = True, abort: bool = False, timeout: float = 60.0,
         child_timeout: float = 30.0) -> PlayResult:
    """Start the chain's gadget as Gadgetron does (``python -m gadgetron PORT MODULE TARGET``,
    connecting back to a port we listen on), converse, and wait for the child to exit."""
    assert chain.module and chain.target, f"{chain.path} has no <execute>"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        cmd = [sys.executable, "-m", "gadgetron", str(port), chain.module, chain.target]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 cwd=REPO, env=gadget_env())
        out: list = []
        reader = threading.Thread(target=lambda: out.append(child.stdout.read()), daemon=True)
        reader.start()
        try:
            listener.settimeout(60)
            sock, _ = listener.accept()
            with sock:
                result = converse(sock, chain.config_text, header, items, close=close, abort=abort,
                                  timeout=timeout)
            try:
                result.returncode = child.wait(child_timeout)
            except subprocess.TimeoutExpired:
                result.returncode = None       # hung: killed below
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            reader.join(10)
            child.stdout.close()
    result.log = "".join(out)
    return result


def raw_items(path):
    """(header bytes, acquisitions) of a raw file."""
    xml, acqs = rawfile.iter_raw(path)
    return xml.encode("utf-8"), acqs


def wait_listening(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    from gadgetron_server import listening
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the gadget exited with {proc.returncode} before listening")
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def serve_command(port: int, *args: str) -> list:
    """``lorein serve --port P`` (the console script of this environment)."""
    lorein = Path(sys.executable).with_name("lorein")
    return [str(lorein), "serve", "--port", str(port), *args]


def stop_process(proc) -> None:
    """Kill a child that is still running, reap it and close its stdout (test teardown)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
