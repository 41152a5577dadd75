"""Bounded resources and untrusted input (gadget_lorein/limits.py, physics/cache.py, node/guard.py):
size bombs refused before anything is allocated, the subspace cache kept inside its folder and free
of pickle, protocols from the header only inline or shipped, the listener on loopback, reads that
time out, reference-only calibration lines kept out of the fit, unknown message ids named, and a
peer that vanishes during the fit ending it. The same classes through the real Gadgetron server are
in test_gadgetron_real.py."""
from __future__ import annotations

import copy
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from conftest import (REPO, PlayResult, _Receiver, chain_copy, gadget_env, header_bytes, raw_items,
                      read_chain, stop_process, wait_listening)
from gadget_lorein import limits
from gadget_lorein.io import buffer, header
from gadget_lorein import settings as settings_mod
from gadget_lorein.node import gadget, guard, server
from gadget_lorein.physics import cache, protocol
from gadget_lorein.physics.subspace import build_subspace

LOREIN_XML = REPO / "config_xml" / "lorein.xml"
CONNECT_XML = REPO / "config_xml" / "lorein_connect.xml"
FAST = {"method": "cg", "iterations": "3", "coil_maps": "lowres"}


def bomb_header(matrix=(16, 16, 8), n_frames=None, n_lines=None, n_coils=4, name="qalas", yaml_text=None,
                extra=None) -> str:
    proto = protocol.load("qalas")
    return header.build_header(matrix=matrix, fov_mm=(200, 200, 100), n_coils=n_coils,
                               n_frames=n_frames or proto.n_frames, protocol_name=name,
                               protocol_yaml=yaml_text, n_lines=n_lines, extra_user_parameters=extra)


# --------------------------------------------------------------------------------------------
# size bombs: refused within a second, the process's memory unchanged
# --------------------------------------------------------------------------------------------

_BOMB_SCRIPT = r"""
import json, resource, sys, time
from gadget_lorein.io import header
from gadget_lorein.node import gadget
from gadget_lorein.physics import protocol
case = sys.argv[1]
proto = protocol.load("qalas")
kw = dict(matrix=(16, 16, 8), fov_mm=(200, 200, 100), n_coils=4, n_frames=proto.n_frames,
          protocol_name="qalas")
if case == "matrix":
    kw["matrix"] = (4096, 4096, 4096)
elif case == "lines":
    kw["n_lines"] = 10 ** 12
elif case == "coils":
    kw["n_coils"] = 100000
elif case == "memory":
    kw.update(matrix=(512, 512, 512), n_coils=64, n_lines=5_000_000)
xml = header.build_header(**kw)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.monotonic()
try:
    gadget.process(xml, iter(()), {"method": "cg"}, lambda item: None)
    error = None
except Exception as err:
    error = gadget.describe_error(err)
took = time.monotonic() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"error": error, "seconds": took, "maxrss_kb": [before, after]}))
"""


@pytest.mark.parametrize("case, expected", [
    ("matrix", "ResourceError: encoded readout (encodedSpace matrixSize x) = 4096 exceeds the limit 1024"),
    ("lines", f"ResourceError: imaging lines (userParameter lorein.n_lines) = {10 ** 12} exceeds the limit"),
    ("coils", "ResourceError: receiver channels = 100000 exceeds the limit 128"),
    ("memory", "over the memory limit"),
])
def test_size_bomb_refused_at_once_without_memory(case, expected):
    """A header asking for a 4096^3 matrix, 10^12 lines, 10^5 coils or more memory than the
    machine has: refused within a second, peak RSS (ru_maxrss) unchanged."""
    env = dict(gadget_env(), LOREIN_CACHE_DIR=os.environ["LOREIN_CACHE_DIR"])
    if case == "memory":
        env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", _BOMB_SCRIPT, case], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(case, res)
    assert res["error"] and expected in res["error"], res
    assert res["seconds"] < 1.0, res
    before, after = res["maxrss_kb"]
    assert after - before < 2048, f"peak RSS grew by {after - before} kB"


def test_memory_ceiling_is_one_setting():
    """max_memory_gb raises (or lowers) the one ceiling; the error names the estimate and the limit."""
    est = limits.estimate_bytes(256, 256, 256, 5, 32, 100_000, 10_000)
    with pytest.raises(limits.ResourceError, match=r"over the memory limit 0.001 GB \(setting max_memory_gb"):
        limits.check_memory(est, 0.001)
    limits.check_memory(est, 10_000)
    assert limits.memory_budget(2) == 2 * limits.GIB
    assert 0 < limits.memory_budget(0) <= limits.host_available_bytes()
    with pytest.raises(settings_mod.SettingsError, match="max_memory_gb=x is not a number"):
        settings_mod.parse({"max_memory_gb": "x"})
    assert settings_mod.parse({"max_memory_gb": "3.5"}).node.max_memory_gb == 3.5


def test_buffer_growth_is_bounded(qalas_small):
    """Without an n_lines hint the buffer checks its own growth against the ceiling."""
    import re
    xml, acqs = raw_items(qalas_small.raw)
    xml = re.sub(r"<userParameterLong>\s*<name>lorein.n_lines</name>.*?</userParameterLong>", "",
                 xml.decode(), flags=re.S)
    buf = buffer.AcquisitionBuffer(xml, max_bytes=2 * 1024 ** 2)    # the first 1024 lines fit
    assert buf.n_lines_hint is None
    with pytest.raises(limits.ResourceError, match="k-space lines buffer would need .* over the memory limit"):
        for _ in range(20):                                          # the scan, again and again
            for a in raw_items(qalas_small.raw)[1]:
                buf.add(a)


@pytest.mark.parametrize("setting, value", [("iterations", 10 ** 7), ("mlp_width", 100_000),
                                             ("grid_finest", 10 ** 6), ("rank", 500), ("lrr_finest", 10 ** 5)])
def test_fit_settings_bounded(setting, value):
    with pytest.raises(limits.ResourceError, match=f"setting {setting} = {value} exceeds the limit"):
        settings_mod.parse({setting: str(value)})


@pytest.mark.parametrize("override, expected", [
    ({"n_tr": 10 ** 6}, "protocol n_tr = 1000000 exceeds the limit"),
    ({"epg_states": 10 ** 5}, "protocol epg_states = 100000 exceeds the limit"),
    ({"dictionary": {"t1_ms": [100, 5000, 1999], "t2_ms": [10, 3000, 1999], "b1": [0.5, 1.5, 9]}},
     "dictionary atoms = 35964009 exceeds the limit"),
    ({"dictionary": {"t1_ms": [100, 5000, 10 ** 7], "t2_ms": [10, 3000, 3], "b1": [0.5, 1.5, 3]}},
     "dictionary t1_ms points = 10000000 exceeds the limit"),
])
def test_protocol_sizes_bounded(override, expected):
    proto = protocol.load("mrf").with_overrides(**override)
    with pytest.raises(limits.ResourceError, match=expected.replace("(", r"\(")):
        limits.check_protocol(proto)


def test_inline_protocol_bomb_refused_before_simulation():
    """An inline protocol in the header with a huge dictionary: refused at the header, in < 1 s."""
    proto = protocol.load("qalas").with_overrides(
        dictionary={"t1_ms": [100, 5000, 1900], "t2_ms": [10, 3000, 1900]})
    xml = bomb_header(yaml_text=proto.yaml_text)
    t0 = time.monotonic()
    with pytest.raises(limits.ResourceError, match="dictionary atoms = 3610000 exceeds the limit"):
        gadget.process(xml, iter(()), {"method": "cg"}, lambda item: None)
    assert time.monotonic() - t0 < 1.0


# --------------------------------------------------------------------------------------------
# the subspace cache
# --------------------------------------------------------------------------------------------

def _tiny(name):
    p = protocol.load("qalas").with_overrides(name=name, dictionary={"t1_ms": [100, 4000, 6],
                                                                     "t2_ms": [10, 2000, 5]})
    return p


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/../../b", "..", "x\x00y"])
def test_cache_names_cannot_escape(name, tmp_path):
    folder = tmp_path / "cache" / "inner"
    before = {p for p in tmp_path.rglob("*")}
    model = build_subspace(_tiny(name), cache_dir=folder)
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == folder or folder in p.parents or p == folder.parent for p in created), created
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].name.startswith("sub-") and len(files[0].stem) == 4 + 64
    again = build_subspace(_tiny(name), cache_dir=folder)        # from the cache
    assert torch_equal(model.table, again.table)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_cache_never_unpickles(tmp_path, monkeypatch):
    """Reads use numpy.load(allow_pickle=False); a file holding a pickled object is rebuilt, and
    pickle.loads / torch.load are never called."""
    import pickle
    import torch
    proto = _tiny("qalas")
    folder = tmp_path / "c"
    build_subspace(proto, cache_dir=folder)
    (path,) = folder.iterdir()
    calls = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append("pickle.loads"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append("pickle.load"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append("torch.load"))
    build_subspace(proto, cache_dir=folder)                       # a read
    np.savez(path, key=np.array(cache.key(proto.params, None, 0.999)),
             basis=np.array([object()], dtype=object))            # a pickled payload
    model = build_subspace(proto, cache_dir=folder)               # refused, rebuilt
    assert calls == [] and model.rank > 0
    with np.load(path, allow_pickle=False) as z:                  # rewritten without objects
        assert all(z[k].dtype != object for k in z.files)


def test_cache_key_has_code_version_and_eviction(tmp_path):
    proto = _tiny("qalas")
    k = cache.key(proto.params, None, 0.999)
    assert k != cache.key(proto.params, 3, 0.999)
    old = cache.CACHE_VERSION
    try:
        cache.CACHE_VERSION = old + 1
        assert cache.key(proto.params, None, 0.999) != k
    finally:
        cache.CACHE_VERSION = old
    folder = tmp_path / "c"
    paths = []
    for i in range(4):
        paths.append(cache.store(folder, f"{i:064x}", {"a": np.zeros(1000)}, max_bytes=10 ** 9))
        os.utime(paths[-1], (1000 + i, 1000 + i))
    size = paths[0].stat().st_size
    cache.trim(folder, 2 * size)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths[2:])
    assert not list(folder.glob(".tmp-*"))
    with pytest.raises(ValueError):
        cache.path_for(folder, "../" + "0" * 61)


# --------------------------------------------------------------------------------------------
# protocols from the header: inline YAML or a shipped name
# --------------------------------------------------------------------------------------------

def test_header_protocol_path_is_not_read(tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text("name: qalas\nkind: qalas\nsecret_value: hunter2\n  bad: [\n")
    buf_xml = bomb_header(name=str(secret))
    with pytest.raises(Exception) as info:
        gadget.process(buf_xml, iter(()), {"method": "cg"}, lambda item: None)
    text = gadget.describe_error(info.value)
    assert "unknown protocol" in text and "hunter2" not in text


def test_inline_yaml_errors_do_not_echo_content():
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.from_yaml("name: x\nkind: qalas\nsecret: hunter2\n  bad: [\n")
    assert "hunter2" not in str(info.value) and "line" in str(info.value)
    with pytest.raises(protocol.ProtocolError, match="aliases"):
        protocol.from_yaml("a: &a [1, 2]\nb: [*a, *a]\n")
    with pytest.raises(protocol.ProtocolError, match="exceeds the limit"):
        protocol.from_yaml("x: 1\n" * 100_000)


def test_chain_configuration_cannot_name_a_file(tmp_path, qalas_small):
    path = tmp_path / "p.yaml"
    path.write_text(protocol.load("qalas").yaml_text)
    with pytest.raises(settings_mod.SettingsError, match="must be a shipped protocol name"):
        gadget._check_network_protocol({"protocol": str(path)}, None)
    gadget._check_network_protocol({"protocol": "qalas"}, None)
    gadget._check_network_protocol({"protocol": str(path)}, {"protocol": str(path)})   # lorein serve's own


def test_cli_protocol_may_still_be_a_path(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(protocol.load("qalas").yaml_text)
    assert protocol.load(str(path)).kind == "qalas"
    with pytest.raises(protocol.ProtocolError, match="unknown protocol"):
        protocol.load_shipped(str(path))


# --------------------------------------------------------------------------------------------
# reference-only calibration lines
# --------------------------------------------------------------------------------------------

_REF = ismrmrd.ACQ_IS_PARALLEL_CALIBRATION
_REF_AND_IMAGING = ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING


def _with_reference_lines(acqs):
    """Calibration lines become imaging-only, and each is preceded by a reference-only copy whose
    data are scaled by 1000 (so that fitting it would show)."""
    n_ref = 0
    for a in acqs:
        if a.is_flag_set(_REF_AND_IMAGING):
            ref = copy.deepcopy(a)
            ref.clear_flag(_REF_AND_IMAGING)
            ref.clear_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
            ref.set_flag(_REF)
            ref.data[:] = a.data * 1000
            n_ref += 1
            yield ref
            a.clear_flag(_REF_AND_IMAGING)
        yield a


def test_reference_lines_calibrate_but_are_not_fitted(qalas_small):
    from gadget_lorein.io import rawfile
    from gadget_lorein.recon import pipeline as recon
    xml, acqs = rawfile.iter_raw(qalas_small.raw)
    plain = buffer.AcquisitionBuffer(xml)
    for a in rawfile.iter_raw(qalas_small.raw)[1]:
        plain.add(a)
    plain = plain.finish()
    buf = buffer.AcquisitionBuffer(xml)
    for a in _with_reference_lines(acqs):
        buf.add(a)
    raw = buf.finish()
    ref = raw.reference_only
    assert ref is not None and ref.sum() == plain.lines.calib.sum() > 0
    imaging = raw.lines.select(~ref)
    np.testing.assert_array_equal(imaging.data, plain.lines.data)    # not averaged with the x1000 copies
    assert not imaging.calib.any() and raw.lines.calib[ref].all()
    settings = recon.ReconSettings(method="cg", iterations=1, device="cpu")
    *_, info = recon.prepare(raw.to_scan(), settings)
    assert info["lines"] == len(plain.lines.frame)


# --------------------------------------------------------------------------------------------
# the connection: unknown message ids, a vanished peer during the fit, timeouts, the listener
# --------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_in_thread(port, settings=None):
    outcome = {}

    def run():
        try:
            server.serve(port, settings)
            outcome["ok"] = True
        except BaseException as err:
            outcome["error"] = err
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_listening(port, None, 10)
    return thread, outcome


def _send_stream(sock, config_text, hdr, items, tail: bytes = b"", close=True):
    from ismrmrd.serialization import ConfigText, ProtocolSerializer
    result = PlayResult()
    receiver = _Receiver(sock, result)
    receiver.start()
    wfile = sock.makefile("wb")
    ser = ProtocolSerializer(wfile)
    ser.serialize(ConfigText(config_text))
    hb = header_bytes(hdr)
    wfile.write(struct.pack("<HI", 3, len(hb)) + hb)
    for item in items:
        ser.serialize(item)
    wfile.write(tail)
    wfile.flush()
    if close:
        ser.close()
    return receiver, result


@pytest.mark.timeout(60)
def test_unknown_message_id_is_named(qalas_small, tmp_path):
    port = _free_port()
    chain = read_chain(chain_copy(CONNECT_XML, tmp_path / "c.xml", FAST, port=port))
    thread, outcome = _serve_in_thread(port)
    hdr, acqs = raw_items(qalas_small.raw)
    first = [a for _, a in zip(range(20), acqs)]
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        receiver, result = _send_stream(sock, chain.config_text, hdr, first, tail=struct.pack("<H", 77) + b"x" * 64)
        receiver.join(20)
    thread.join(20)
    assert len(result.errors) == 1 and "unknown message id 77" in result.errors[0], result.errors
    assert "stream ended" not in result.errors[0]
    assert isinstance(outcome.get("error"), header.MRDError)


@pytest.mark.timeout(120)
def test_peer_vanishing_during_fit_ends_it(qalas_small, tmp_path):
    """lorein at 1200 iterations; Gadgetron goes away after ACQ_LAST: the fit stops within seconds."""
    port = _free_port()
    chain = read_chain(chain_copy(CONNECT_XML, tmp_path / "c.xml",
                                  {"method": "lorein", "iterations": "1200", "holdout": "0"}, port=port))
    proc = subprocess.Popen([sys.executable, "-m", "gadget_lorein.cli", "serve", "--port", str(port), "-v"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=gadget_env())
    try:
        wait_listening(port, proc, 60)
        hdr, acqs = raw_items(qalas_small.raw)
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        receiver, result = _send_stream(sock, chain.config_text, hdr, acqs, close=False)
        log_lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:           # wait until the fit runs
            line = proc.stdout.readline()
            log_lines.append(line)
            if "iteration" in line:
                break
        assert any("iteration" in l for l in log_lines), "".join(log_lines)[-3000:]
        t0 = time.monotonic()
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        rc = proc.wait(30)
        took = time.monotonic() - t0
        rest = proc.stdout.read()
    finally:
        stop_process(proc)
    print(f"the gadget ended {took:.1f} s after its peer went")
    assert rc != 0 and took < 15, rest[-3000:]
    assert "Gadgetron closed the connection during the reconstruction" in rest, rest[-3000:]


@pytest.mark.timeout(60)
def test_silent_peer_times_out(monkeypatch):
    """A peer that connects and says nothing: the configuration read times out."""
    monkeypatch.setattr(limits, "CONFIG_TIMEOUT_S", 1.0)
    port = _free_port()
    thread, outcome = _serve_in_thread(port)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        thread.join(15)
        data = sock.recv(4096)
    assert not thread.is_alive() and time.monotonic() - t0 < 10
    assert isinstance(outcome.get("error"), TimeoutError), outcome
    assert b"no message from Gadgetron for 1 s" in data


def test_listener_is_loopback_by_default():
    sock = server._listener(0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()
    assert limits.is_loopback("127.0.0.1") and limits.is_loopback("::1") and not limits.is_loopback("")
    assert not limits.is_loopback("0.0.0.0")


@pytest.mark.timeout(60)
def test_serve_cli_binds_loopback_and_warns_when_widened(tmp_path):
    for args, expect_warning in (([], False), (["--host", "0.0.0.0"], True)):
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "gadget_lorein.cli", "serve", "--port", str(port), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env=gadget_env())
        try:
            wait_listening(port, proc, 30)
            rows = [l.split() for l in Path("/proc/net/tcp").read_text().splitlines()[1:]]
            local = [r[1] for r in rows if r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == port]
            assert local == (["00000000:%04X" % port] if expect_warning else ["0100007F:%04X" % port]), local
        finally:
            proc.terminate()
            out = proc.communicate(10)[0]
        assert ("not only on loopback" in out) == expect_warning, out


@pytest.mark.timeout(120)
def test_serve_forever_one_process_per_connection(qalas_small, tmp_path):
    """A silent peer does not block the next connection: each is served in its own process."""
    port = _free_port()
    chain = read_chain(chain_copy(CONNECT_XML, tmp_path / "c.xml", FAST, port=port))
    proc = subprocess.Popen([sys.executable, "-m", "gadget_lorein.cli", "serve", "--port", str(port), "--forever"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=gadget_env())
    try:
        wait_listening(port, proc, 30)
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)     # says nothing
        hdr, acqs = raw_items(qalas_small.raw)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            receiver, result = _send_stream(sock, chain.config_text, hdr, acqs)
            receiver.join(90)
        silent.close()
    finally:
        proc.terminate()
        out = proc.communicate(10)[0]
    # 3 maps, 5 synthetic images, 3 confidence maps
    assert result.closed and not result.errors and len(result.images) == 11, (result, out[-3000:])


def test_refusal_when_busy():
    a, b = socket.socketpair()
    guard.refuse(a, "busy: 4 connections in progress (limit 4); try again later")
    data = b.recv(4096)
    b.close()
    mid, n = struct.unpack("<HQ", data[:10])
    assert mid == 8 and b"busy" in data[10:10 + n] and struct.unpack("<H", data[10 + n:12 + n])[0] == 4
