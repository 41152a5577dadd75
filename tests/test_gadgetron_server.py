"""A real Gadgetron server, the stock client and `gadget_lorein.node.replay` against stock chains and small
probe gadgets (no project physics needed). Marked `gadgetron`; skipped without a Gadgetron (see
gadgetron_server.ENABLE_HINT), failed instead when CI=true."""

import argparse
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import ismrmrd
from gadget_lorein.io import rawfile
from gadget_lorein.node import replay as rp
from gadget_lorein.settings import SETTINGS
from gadget_lorein.settings_io import text_value
from gadgetron_server import REPO, GadgetronServer, free_port, listening, require_gadgetron

HEADER = """<?xml version="1.0" encoding="UTF-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <acquisitionSystemInformation><receiverChannels>{nc}</receiverChannels></acquisitionSystemInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>256</x><y>256</y><z>5</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>256</x><y>256</y><z>5</z></fieldOfView_mm></reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>{ny1}</maximum><center>{cy}</center></kspace_encoding_step_1>
      <kspace_encoding_step_2><minimum>0</minimum><maximum>0</maximum><center>0</center></kspace_encoding_step_2>
      <slice><minimum>0</minimum><maximum>0</maximum><center>0</center></slice>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>
"""

# Probe gadgets the server starts from the chains below (PYTHONPATH points at their folder).
PROBE = '''
import json, logging, struct
import numpy as np, ismrmrd

def reconstruct(connection):
    """Log the chain's properties as JSON, count the acquisitions, send one float image."""
    props = {p.get("name"): p.get("value") for p in connection.config.findall("property")}
    logging.info("PROBE tag=%s properties=%s", connection.config.tag, json.dumps(props))
    n = sum(1 for _ in connection)
    image = ismrmrd.Image.from_array(np.full((4, 4), n, np.float32), transpose=False)
    image.image_series_index = 7
    connection.send(image)

def fail(connection):
    """Raise, as a gadget bug would (gadgetron-python then sends a normal CLOSE)."""
    for _ in connection:
        raise RuntimeError("PROBE deliberate failure")

def fail_reported(connection):
    """Raise, after telling Gadgetron: ERROR message id 8, uint64 length, text; then read on to
    Gadgetron's CLOSE, as gadget_lorein's node does. A gadget that exits with input unread makes
    its socket send a reset, which can discard its ERROR and CLOSE before the server reads them;
    without this loop the stock client (whose reader thread does not catch an end of stream that
    comes before CLOSE) aborted on "read: End of file" in about 2 of 100 runs."""
    try:
        for _ in connection:
            raise RuntimeError("PROBE deliberate failure")
    except Exception as e:
        text = f"{type(e).__name__}: {e}".encode()
        connection.socket.write(struct.pack("<HQ", 8, len(text)) + text)
        for _ in connection:
            pass
        raise
'''

# every setting with its default, as the shipped chains list them (settings.py)
LOREIN_DEFAULTS = {s.name: text_value(s.default) for s in SETTINGS}


def write_raw(path, nx=32, ny=16, nc=2, waveforms=0):
    """A tiny valid ISMRMRD raw file: one fully sampled Cartesian 2D slice (+ optional waveforms)."""
    xml = HEADER.format(nx=nx, ny=ny, nc=nc, ny1=ny - 1, cy=ny // 2)
    ismrmrd.xsd.CreateFromDocument(xml)  # valid against the schema
    rng = np.random.default_rng(0)
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as ds:
        ds.write_xml_header(xml)
        for y in range(ny):
            data = rng.standard_normal((nc, nx)) + 1j * rng.standard_normal((nc, nx))
            acq = ismrmrd.Acquisition.from_array(data.astype(np.complex64))
            acq.idx.kspace_encode_step_1 = y
            acq.center_sample = nx // 2
            acq.scan_counter = y
            acq.acquisition_time_stamp = 10 * y
            acq.read_dir[0] = acq.phase_dir[1] = acq.slice_dir[2] = 1.0
            if y == 0:
                acq.set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
            if y == ny - 1:
                acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
                acq.set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
            ds.append_acquisition(acq)
        for k in range(waveforms):
            wav = ismrmrd.Waveform.from_array(np.full((1, 8), k, np.uint32))
            wav.time_stamp = 25 * k + 5
            wav.waveform_id = 0
            ds.append_waveform(wav)
    return Path(path)


def chain_with_gadget(source: Path, target: Path, module: str, function: str) -> Path:
    """Copy a chain, replacing its <execute> (or <connect>) by one that starts ``module.function``."""
    text = source.read_text()
    start = text.index("<execute") if "<execute" in text else text.index("<connect")
    end = text.index("/>", start) + 2
    target.write_text(text[:start] + f'<execute name="{module}" target="{function}" type="python"/>' + text[end:])
    return target


def images(path, group, part="data"):
    """{image series name: array} of one output group; ``part`` is data, header or attributes."""
    with h5py.File(path, "r") as f:
        return {name: f[group][name][part][()] for name in f[group]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    gadgetron = require_gadgetron()
    work = tmp_path_factory.mktemp("gadgetron")
    probe = work / "probe"
    probe.mkdir()
    (probe / "lorein_probe.py").write_text(textwrap.dedent(PROBE))
    lorein = REPO / "config_xml" / "lorein.xml"
    chains = [chain_with_gadget(lorein, probe / f"probe_{fn}.xml", "lorein_probe", fn)
              for fn in ("reconstruct", "fail", "fail_reported")]
    env = {"PYTHONPATH": str(probe), "GADGETRON_EXTERNAL_LOG_LEVEL": "INFO"}
    with GadgetronServer(gadgetron, work / "server", chains=chains, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_raw(tmp_path_factory.mktemp("raw") / "raw.h5")


@pytest.mark.gadgetron
def test_server_log_and_home(server):
    """The server runs from a home holding our chains and logs to a file."""
    config = server.home / "share" / "gadgetron" / "config"
    assert (config / "lorein.xml").read_text() == (REPO / "config_xml" / "lorein.xml").read_text()
    assert (config / "default.xml").exists()
    assert f"Running on port {server.port}" in server.log_text()


@pytest.mark.gadgetron
def test_stock_client_and_replay_agree_on_stock_chain(server, raw, tmp_path):
    """default.xml (C++ gadgets only): same image series, shapes and values from both clients."""
    stock = server.run_client(["-f", raw, "-o", tmp_path / "stock.h5", "-c", "default.xml", "-G", "run"])
    assert stock.returncode == 0, stock.stdout + stock.stderr + server.log_text()
    result = rp.replay(raw, tmp_path / "replay.h5", port=server.port, config_name="default.xml",
                       out_group="run", timeout=60, progress=False)
    assert result.n_images > 0
    for part in ("data", "header", "attributes"):  # the same layout, byte for byte
        ours, theirs = images(tmp_path / "replay.h5", "run", part), images(tmp_path / "stock.h5", "run", part)
        assert sorted(ours) == sorted(theirs)
        for name in ours:
            assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape
            same = (list(ours[name]) == list(theirs[name]) if ours[name].dtype.kind == "O"
                    else ours[name].tobytes() == theirs[name].tobytes())
            assert same, (part, name)
    assert result.acquisitions_sent == 16 and not result.errors


@pytest.mark.gadgetron
def test_chain_configuration_reaches_gadget(server, raw, tmp_path):
    """lorein.xml's <configuration> arrives as connection.config (tag 'configuration'); also by -C."""
    for how in ({"config_name": "probe_reconstruct.xml"},
                {"config_file": server.home / "share/gadgetron/config/probe_reconstruct.xml"}):
        before = len(server.log_text())
        result = rp.replay(raw, tmp_path / "out.h5", port=server.port, timeout=60, progress=False,
                           out_group=next(iter(how)), **how)
        assert result.images == {"image_7": 1}
        line = next(l for l in server.log_text()[before:].splitlines() if "PROBE tag=" in l)
        assert "tag=configuration" in line
        assert json.loads(line.split("properties=", 1)[1]) == LOREIN_DEFAULTS
    data = images(tmp_path / "out.h5", "config_name")["image_7"]
    assert data.dtype == np.float32 and np.all(data == 16)


@pytest.mark.gadgetron
def test_waveforms_reach_gadget(server, tmp_path):
    """Waveforms go through too: the probe counts 16 acquisitions + 3 waveforms, with either client."""
    raw = write_raw(tmp_path / "raw_wav.h5", waveforms=3)
    result = rp.replay(raw, tmp_path / "out.h5", port=server.port, config_name="probe_reconstruct.xml",
                       out_group="ours", timeout=60, progress=False)
    assert (result.acquisitions_sent, result.waveforms_sent) == (16, 3)
    stock = server.run_client(["-f", raw, "-o", tmp_path / "out.h5", "-c", "probe_reconstruct.xml", "-G", "stock"])
    assert stock.returncode == 0, stock.stdout + stock.stderr
    assert np.all(images(tmp_path / "out.h5", "ours")["image_7"] == 19)
    assert np.all(images(tmp_path / "out.h5", "stock")["image_7"] == 19)


@pytest.mark.gadgetron
def test_gadget_errors(server, raw, tmp_path):
    """A gadget that raises: silent success unless it sends ERROR; then replay fails, stock exits 0."""
    silent = rp.replay(raw, tmp_path / "a.h5", port=server.port, config_name="probe_fail.xml",
                       timeout=60, progress=False)
    assert silent.n_images == 0 and not silent.errors  # gadgetron-python closes normally on exceptions

    with pytest.raises(rp.ReplayError, match="PROBE deliberate failure"):
        rp.replay(raw, tmp_path / "b.h5", port=server.port, config_name="probe_fail_reported.xml",
                  timeout=60, progress=False)
    stock = server.run_client(["-f", raw, "-o", tmp_path / "c.h5", "-c", "probe_fail_reported.xml"])
    assert stock.returncode == 0 and "ERROR: Errors received" in stock.stdout

    args = rp.add_replay_arguments(argparse.ArgumentParser()).parse_args(
        [str(raw), "-o", str(tmp_path / "d.h5"), "-p", str(server.port), "-c", "nonexistent.xml", "-q"])
    assert rp.run_replay(args) == 1


@pytest.mark.gadgetron
def test_connect_chain_with_passive_gadget(server, raw, tmp_path):
    """lorein_connect.xml: the server connects to a gadget already listening (port rewritten)."""
    port = free_port()
    chain = tmp_path / "connect.xml"
    chain.write_text((REPO / "config_xml" / "lorein_connect.xml").read_text()
                     .replace('port="18000"', f'port="{port}"'))
    probe_dir = server.extra_env["PYTHONPATH"]
    gadget = subprocess.Popen([sys.executable, "-c", "import logging, gadgetron.external, lorein_probe; "
                               "logging.basicConfig(level=logging.INFO); "
                               f"gadgetron.external.listen({port}, lorein_probe.reconstruct)"],
                              cwd=probe_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not listening(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        result = rp.replay(raw, tmp_path / "out.h5", port=server.port, config_file=chain, timeout=60,
                           progress=False)
        assert result.images == {"image_7": 1}
        assert gadget.wait(30) == 0
        assert json.loads(gadget.stdout.read().split("properties=", 1)[1].splitlines()[0]) == LOREIN_DEFAULTS
    finally:
        if gadget.poll() is None:
            gadget.kill()
            gadget.wait()


# ---- replay without a server -------------------------------------------------------------------


def test_replay_connect_refused(raw, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(rp.ReplayError, match="cannot connect"):
        rp.replay(raw, tmp_path / "out.h5", port=free_port(), progress=False)
    assert time.monotonic() - t0 < 5


def test_replay_times_out_on_silent_server(raw, tmp_path):
    """A peer that accepts and never answers: a ReplayError after the read timeout, not a hang."""
    listener = socket.create_server(("127.0.0.1", 0))
    conns = []
    threading.Thread(target=lambda: conns.append(listener.accept()), daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(rp.ReplayError, match="no message from the server for 1 s"):
            rp.replay(raw, tmp_path / "out.h5", port=listener.getsockname()[1], timeout=1, progress=False)
    finally:
        for conn, _ in conns:
            conn.close()
        listener.close()
    assert time.monotonic() - t0 < 10


def test_replay_bad_input(tmp_path):
    with pytest.raises(rp.ReplayError, match="cannot open input"):
        rp.replay(tmp_path / "missing.h5", tmp_path / "out.h5", progress=False)


def test_replay_names_the_ismrmrd_it_needs(monkeypatch):
    """ismrmrd-python 1.14 (the official images' own) has no ismrmrd.serialization: replay says
    which version is installed (1.14 and 1.15 have no __version__) and how to upgrade."""
    from importlib import metadata
    monkeypatch.setitem(sys.modules, "ismrmrd.serialization", None)   # import now fails, as in 1.14
    with pytest.raises(rp.ReplayError, match=r"needs ismrmrd-python >= 1\.15") as err:
        rp._protocol()
    assert f"installed: {metadata.version('ismrmrd')};" in str(err.value)
    assert "pip install 'ismrmrd>=1.15'" in str(err.value)


def test_interleave_matches_stock_order(tmp_path):
    """Waveforms go before an acquisition with a later time stamp (ties: acquisition first)."""
    path = write_raw(tmp_path / "raw.h5", ny=4, waveforms=3)  # acq t=0,10,20,30; waveforms t=5,30,55
    stream = rawfile.read_stream(path)
    assert (stream.n_acquisitions, stream.n_waveforms) == (4, 3)
    items = list(rp._interleave(stream.acquisitions, stream.waveforms))
    stamps = [(type(i).__name__[0], getattr(i, "acquisition_time_stamp", getattr(i, "time_stamp", None)))
              for i in items]
    assert stamps == [("A", 0), ("W", 5), ("A", 10), ("A", 20), ("A", 30), ("W", 30), ("W", 55)]
