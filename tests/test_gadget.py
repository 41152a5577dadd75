"""The gadget end to end without a Gadgetron: the tests play Gadgetron's side of the external-gadget
protocol on loopback (conftest.play / converse): they start ``python -m gadgetron PORT
gadget_lorein.node.gadget reconstruct`` exactly as config_xml/lorein.xml's <execute> says (or connect to
``lorein serve``, as lorein_connect.xml's <connect> does), send the chain's <configuration> as the
CONFIG message, the header and every acquisition, and read back images, ERROR messages and CLOSE.

Speed: plumbing tests use method cg with few iterations through a copy of the chain with changed
properties, and check only that the maps are not zero (conftest.PLUMBING) besides comparing them
with the library's own; one test runs the default method (lorein) at its defaults on the realistic
qalas test scan and checks its accuracy (conftest.ACCURACY: NRMSE over single-tissue voxels, limits
that zero-filled matching and cg do not meet).
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from conftest import (REPO, stop_process, unknown_protocol, chain_copy, check_accuracy, check_images, check_plumbing, converse, expected_geometry,
                      gadget_env, header_bytes_without_attr_len, meta, play, raw_items, read_chain, serve_command, wait_listening)
from gadget_lorein.node import gadget, server
from gadget_lorein.recon import pipeline as recon
from gadget_lorein.io import header, map_images, rawfile

LOREIN_XML = REPO / "config_xml" / "lorein.xml"
CONNECT_XML = REPO / "config_xml" / "lorein_connect.xml"


def fast_chain(tmp_path, **props) -> Path:
    """lorein.xml with some properties changed (all others as shipped)."""
    props = {"coil_maps": "lowres", **props}
    return chain_copy(LOREIN_XML, tmp_path / "lorein_test.xml", props)


def check_clean(result):
    assert result.returncode == 0, result.log[-4000:]
    assert result.closed and not result.errors and result.receive_error is None, (result, result.log[-4000:])
    assert result.send_error is None


# --------------------------------------------------------------------------------------------
# the chain, end to end
# --------------------------------------------------------------------------------------------

@pytest.mark.timeout(300, func_only=True)
def test_chain_lorein_qalas(qalas_small, tmp_path):
    """Method lorein at its defaults: three maps, right geometry and meta, and the default
    method's accuracy (limits that zero-filled matching and cg do not meet)."""
    chain = read_chain(fast_chain(tmp_path, method="lorein"))
    assert (chain.module, chain.target) == ("gadget_lorein.node.gadget", "reconstruct")
    header, acqs = raw_items(qalas_small.raw)
    result = play(chain, header, acqs, timeout=290)
    check_clean(result)
    check_images(result.images, qalas_small, "LoREIN")
    check_accuracy(result.maps(), qalas_small, "qalas")
    assert re.search(r"lorein: done: method lorein, protocol qalas, rank \d+, iterations \d+", result.log)
    assert "timings:" in result.log


@pytest.mark.timeout(60, func_only=True)
def test_chain_mrf_cg(mrf_small, tmp_path):
    """MRF: four maps (B1 too)."""
    chain = read_chain(fast_chain(tmp_path, method="cg", iterations="5"))
    header, acqs = raw_items(mrf_small.raw)
    result = play(chain, header, acqs, timeout=55)
    check_clean(result)
    check_images(result.images, mrf_small, "CG")
    check_plumbing(result.maps(), mrf_small, "mrf")
    # the library on the same file, without the gadget: the very same maps
    reference = recon.reconstruct(rawfile.read_raw(mrf_small.raw).to_scan(),
                                  recon.ReconSettings(method="cg", iterations=5, coil_maps="lowres"))
    maps = result.maps()
    assert sorted(maps) == sorted(reference.maps.as_dict())
    for name in maps:
        assert np.array_equal(maps[name], reference.maps.as_dict()[name]), name


def with_extras(acqs, at=40):
    """The acquisitions with a navigator (a copy of acquisition ``at``) and a waveform before it."""
    for i, a in enumerate(acqs):
        if i == at:
            nav = ismrmrd.Acquisition(a.getHead(), data=a.data.copy())
            nav.set_flag(ismrmrd.ACQ_IS_NAVIGATION_DATA)
            yield nav
            wav = ismrmrd.Waveform.from_array(np.arange(16, dtype=np.uint32).reshape(2, 8))
            wav.time_stamp = a.acquisition_time_stamp
            yield wav
        yield a


@pytest.mark.timeout(60, func_only=True)
def test_recon_file_equals_chain(qalas_small, tmp_path):
    """`lorein recon` (recon_file) and the chain give identical maps and image headers; a
    navigator and a waveform in the stream are passed on unchanged and change nothing."""
    chain = read_chain(fast_chain(tmp_path, method="cg", iterations="5"))
    header, acqs = raw_items(qalas_small.raw)
    result = play(chain, header, with_extras(acqs), timeout=55)
    check_clean(result)
    check_plumbing(result.maps(), qalas_small, "qalas")
    assert [type(x).__name__ for x in result.other] == ["Acquisition", "Waveform"]
    nav, wav = result.other
    assert nav.is_flag_set(ismrmrd.ACQ_IS_NAVIGATION_DATA) and nav.scan_counter == 41
    _, again = raw_items(qalas_small.raw)
    original = next(a for i, a in enumerate(again) if i == 40)
    assert np.array_equal(nav.data, original.data)
    assert np.array_equal(wav.data, np.arange(16, dtype=np.uint32).reshape(2, 8))
    assert "2 passed on" in result.log

    settings = dict(chain.properties)
    offline = gadget.recon_file(qalas_small.raw, tmp_path / "out.h5", settings, group="run")
    stored = map_images.read_images(tmp_path / "out.h5", "run")
    # 3 maps, 5 synthetic images, T1/T2 SD and the undetermined voxels
    assert len(offline) == len(stored) == len(result.images) == 3 + 5 + 3
    for kind in ("map", "synthetic", "confidence"):
        chain_maps = map_images.images_to_maps(result.images, kind)
        file_maps = map_images.images_to_maps(stored, kind)
        assert sorted(chain_maps) == sorted(file_maps) and chain_maps
        for name in chain_maps:
            assert np.array_equal(chain_maps[name], file_maps[name]), name
    by_series = {i.image_series_index: i for i in result.images}
    for img in stored:   # (a stored header has attribute_string_len 0: the attributes are a dataset)
        assert header_bytes_without_attr_len(img) == header_bytes_without_attr_len(by_series[img.image_series_index])
        assert dict(img.meta) == dict(by_series[img.image_series_index].meta)


@pytest.mark.timeout(900, func_only=True)
def test_chain_without_configuration(qalas_tiny, tmp_path):
    """A chain without <configuration>: Gadgetron sends only an XML declaration, gadgetron-python
    gives connection.config = None, the gadget runs with its defaults
    (the default method, lorein with 1200 iterations: the slowest test here)."""
    chain = read_chain(fast_chain(tmp_path))
    chain.config_text = '<?xml version="1.0"?>'
    header, acqs = raw_items(qalas_tiny.raw)
    result = play(chain, header, acqs, timeout=890)
    check_clean(result)
    default = recon.ReconSettings()
    check_images(result.images, qalas_tiny, gadget.METHOD_LABELS[default.method])
    assert f"settings: method={default.method}, device=auto" in result.log


@pytest.mark.timeout(60, func_only=True)
def test_chain_options(qalas_small, tmp_path):
    """images_2d, output=maps+coefficients, synthetic images chosen, no confidence maps, an
    unknown setting (warning only)."""
    chain = read_chain(fast_chain(tmp_path, method="cg", iterations="3", images_2d="true",
                                  output="maps+coefficients", synthetic="FLAIR,dir",
                                  synthetic_flair="10000,100,2600", confidence="false",
                                  no_such_setting="1"))
    header, acqs = raw_items(qalas_small.raw)
    result = play(chain, header, acqs, timeout=55)
    check_clean(result)
    assert re.search(r"WARNING .*ignoring unknown setting\(s\) no_such_setting", result.log)
    nx, ny, nz = expected_geometry(qalas_small.raw)["matrix"]
    maps = [i for i in result.images if i.image_series_index < 10]
    coefs = [i for i in result.images if i.image_series_index > 100]
    derived = [i for i in result.images if 10 < i.image_series_index < 100]
    assert len(maps) == 3 * nz and all(i.data.shape == (1, 1, ny, nx) for i in maps)
    assert sorted({i.image_series_index for i in derived}) == [14, 16] and len(derived) == 2 * nz
    assert {i.meta["SeriesDescription"] for i in derived if i.image_series_index == 14} == \
        {"LOREIN synthetic FLAIR TR 10000 TE 100 TI 2600"}
    t1 = sorted((i for i in maps if i.image_series_index == 1), key=lambda i: i.slice)
    assert [i.slice for i in t1] == list(range(nz)) and [i.image_index for i in t1] == list(range(1, nz + 1))
    dz = t1[1].position[2] - t1[0].position[2]
    assert np.isclose(dz, t1[0].field_of_view[2])
    rank = len({i.image_series_index for i in coefs})
    assert rank >= 1 and len(coefs) == rank * nz
    assert all(i.data.dtype == np.complex64 for i in coefs)
    assert sorted({i.image_series_index for i in coefs}) == list(range(101, 101 + rank))


# --------------------------------------------------------------------------------------------
# passive mode (lorein serve + lorein_connect.xml)
# --------------------------------------------------------------------------------------------

def _serve_cmd(port):
    if (REPO / "gadget_lorein" / "cli.py").exists():
        return serve_command(port)
    return [sys.executable, "-c", f"from gadget_lorein.node.server import serve; serve({port})"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60, func_only=True)
def test_serve_loopback(qalas_small, tmp_path):
    """`lorein serve --port P`; the test connects as Gadgetron does for lorein_connect.xml."""
    port = _free_port()
    chain = read_chain(chain_copy(CONNECT_XML, tmp_path / "connect.xml",
                                  {"method": "cg", "iterations": "5", "coil_maps": "lowres"}, port=port))
    assert chain.connect_port == port and chain.module is None
    proc = subprocess.Popen(_serve_cmd(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=gadget_env())
    try:
        wait_listening(port, proc, 30)
        header, acqs = raw_items(qalas_small.raw)
        with socket.create_connection(("localhost", port), timeout=10) as sock:
            result = converse(sock, chain.config_text, header, acqs, timeout=50)
        rc = proc.wait(20)
        log = proc.stdout.read()
    finally:
        stop_process(proc)
    assert rc == 0, log[-4000:]
    assert result.closed and not result.errors and result.receive_error is None, log[-4000:]
    check_images(result.images, qalas_small, "CG")
    check_plumbing(result.maps(), qalas_small, "qalas")


@pytest.mark.timeout(60, func_only=True)
def test_serve_settings_override_chain(qalas_small, tmp_path):
    """serve(port, settings): its settings win over the chain's."""
    port = _free_port()
    chain = read_chain(chain_copy(CONNECT_XML, tmp_path / "connect.xml", {"method": "lorein"}, port=port))
    outcome = {}

    def run():
        try:
            server.serve(port, {"method": "cg", "iterations": "3", "coil_maps": "lowres"})
            outcome["ok"] = True
        except BaseException as err:    # reported below
            outcome["error"] = err
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_listening(port, None, 10)
    header, acqs = raw_items(qalas_small.raw)
    with socket.create_connection(("localhost", port), timeout=10) as sock:
        result = converse(sock, chain.config_text, header, acqs, timeout=50)
    thread.join(10)
    assert outcome == {"ok": True}
    assert result.closed and not result.errors
    assert {meta(i, "LOREIN_Method") for i in result.images} == {"CG"}


@pytest.mark.timeout(60)
def test_serve_peer_vanishes_before_config():
    """Gadgetron connects and goes away without a word: serve fails at once, no busy loop."""
    port = _free_port()
    outcome = {}

    def run():
        try:
            server.serve(port)
        except BaseException as err:
            outcome["error"] = err
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_listening(port, None, 10)
    t0 = time.monotonic()
    socket.create_connection(("localhost", port), timeout=5).close()
    thread.join(10)
    assert not thread.is_alive(), "serve still running after its peer vanished"
    assert isinstance(outcome.get("error"), ConnectionError), outcome
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------------------------
# bad input: a clear error, an ERROR message, nothing hangs, the gadget exits non-zero
# --------------------------------------------------------------------------------------------

def _header(raw_path, edit):
    xml, _ = rawfile.iter_raw(raw_path)
    h = ismrmrd.xsd.CreateFromDocument(xml.encode())
    edit(h)
    return header.header_to_xml(h).encode("utf-8")


def _no_encoding(h):
    h.encoding = []


def _radial(h):
    h.encoding[0].trajectory = ismrmrd.xsd.trajectoryType.RADIAL


def _edit_acq(n, fn):
    def items(acqs):
        for i, a in enumerate(acqs):
            if i == n:
                fn(a)
            yield a
    return items


def _cut(n):
    def items(acqs):
        for i, a in enumerate(acqs):
            if i >= n:
                return
            yield a
    return items


def _counter(a):
    a.idx.kspace_encode_step_1 = 99


def _nan(a):
    a.data[0, 3] = np.nan


BAD = {
    # name: (header edit, acquisition stream edit, expected error text)
    "no_encoding": (_no_encoding, None, "MRDError: the ISMRMRD header has no encoding"),
    "non_cartesian": (_radial, None, "MRDError: trajectory 'radial' is not supported"),
    "counter_outside_limits": (None, _edit_acq(60, _counter),
                               "MRDError: acquisition (scan_counter 61): kspace_encode_step_1 = 99 is outside"),
    "close_before_last": (None, _cut(150), "MRDError: the stream ended before ACQ_LAST_IN_MEASUREMENT"),
    "nan": (None, _edit_acq(80, _nan), "MRDError: acquisition (scan_counter 81) contains NaN"),
    "unknown_protocol": (unknown_protocol, None, "ReconError: unknown protocol 'qalas_v9'"),
    "bad_iterations": ("iterations=abc", None, "SettingsError: setting iterations=abc is not an integer"),
    "bad_method": ("method=foo", None, "SettingsError: setting method=foo must be one of"),
}


@pytest.mark.timeout(60, func_only=True)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, qalas_small, tmp_path):
    edit_header, edit_items, expected = BAD[case]
    props = {"method": "cg", "iterations": "3"}
    if isinstance(edit_header, str):
        key, value = edit_header.split("=")
        props[key], edit_header = value, None
    chain = read_chain(fast_chain(tmp_path, **props))
    header, acqs = raw_items(qalas_small.raw)
    if edit_header:
        header = _header(qalas_small.raw, edit_header)
    if edit_items:
        acqs = edit_items(acqs)
    t0 = time.monotonic()
    result = play(chain, header, acqs, timeout=40, child_timeout=20)
    assert time.monotonic() - t0 < 45
    assert result.returncode not in (0, None), f"exit status {result.returncode}\n{result.log[-4000:]}"
    assert len(result.errors) == 1 and expected in result.errors[0], (result.errors, result.log[-3000:])
    assert result.errors[0].startswith("gadget_lorein: ")
    assert result.closed and not result.images
    line = next(l for l in result.log.splitlines() if "lorein: error:" in l)
    assert expected in line, line
    assert result.receive_error is None and result.send_error is None


@pytest.mark.timeout(60, func_only=True)
def test_peer_vanishes_mid_stream(qalas_small, tmp_path):
    """Gadgetron's side disappears without CLOSE: the gadget exits non-zero promptly, no busy loop."""
    chain = read_chain(fast_chain(tmp_path, method="cg", iterations="3"))
    header, acqs = raw_items(qalas_small.raw)
    t0 = time.monotonic()
    result = play(chain, header, _cut(100)(acqs), abort=True, timeout=10, child_timeout=20)
    assert result.returncode not in (0, None), result.log[-3000:]
    assert time.monotonic() - t0 < 30
    assert "ConnectionError: Gadgetron closed the connection without a CLOSE message" in result.log


