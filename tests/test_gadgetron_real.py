"""The gadget inside a real Gadgetron server (tests/gadgetron_server.py): the stock client, the chains
installed as docker/Dockerfile installs them, passive mode, ``lorein replay``, bad input and load.

Marked ``gadgetron``; skipped with a one-line hint when no Gadgetron is found, failed instead when
CI=true. To keep the file short, most cases run a copy of lorein.xml with method cg, 5 iterations and
coil_maps lowres (``lorein_fast.xml``); the cases marked "as shipped" run the installed chain file
unchanged (by name, ``-c lorein.xml``) or lorein_connect.xml with only its port replaced, that is
LoREIN at its defaults, on the 16 x 16 x 8 cases qalas_tiny and mrf_tiny (conftest) so that each
default fit takes about 30 s on 2 cores.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import (REPO, stop_process, unknown_protocol, chain_copy, check_accuracy, check_images, check_plumbing, gadget_env,
                      header_bytes_without_attr_len, read_chain, serve_command, wait_listening)
from gadget_lorein.node import gadget
from gadget_lorein.io import header, map_images
from gadget_lorein.node import replay as rp
from gadgetron_server import GadgetronServer, free_port, require_gadgetron

pytestmark = pytest.mark.gadgetron

LOREIN_XML = REPO / "config_xml" / "lorein.xml"
CONNECT_XML = REPO / "config_xml" / "lorein_connect.xml"
FAST = {"method": "cg", "iterations": "5", "coil_maps": "lowres"}
LORE = Path(sys.executable).with_name("lorein")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    gt = require_gadgetron()
    work = tmp_path_factory.mktemp("gadgetron_real")
    fast = chain_copy(LOREIN_XML, work / "lorein_fast.xml", FAST)
    with GadgetronServer(gt, work / "server", chains=[fast],
                         env={"GADGETRON_EXTERNAL_LOG_LEVEL": "INFO",
                              "PYTHONPATH": str(REPO)}) as srv:   # the gadget from this checkout
        srv.fast_chain = srv.home / "share" / "gadgetron" / "config" / "lorein_fast.xml"
        yield srv


def stock(server, args, timeout=120):
    """Run the stock client. Its input (-f) is given as a private copy when it is committed test
    data: the client opens its input read-write (ISMRMRD's C library), and a client killed on a
    timeout once left test_data/mrf_small.h5 changed (test_test_data caught it)."""
    args = [str(a) for a in args]
    with tempfile.TemporaryDirectory() as tmp:
        if "-f" in args:
            i = args.index("-f") + 1
            src = Path(args[i]).resolve()
            if src.is_relative_to((REPO / "test_data").resolve()):
                args[i] = str(shutil.copyfile(src, Path(tmp) / src.name))
        t0 = time.monotonic()
        proc = server.run_client(args, timeout=timeout)
        print(f"stock client {' '.join(args)}: {time.monotonic() - t0:.1f} s")
    return proc


def lorein_replay(server, raw, out, *args, timeout=120):
    cmd = [str(LORE), "replay", str(raw), "-o", str(out), "-p", str(server.port), "-q", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=server.environment())


def same_files(a, b, group):
    """The same image datasets (names, dtypes, shapes), the same pixel bytes, the same headers and
    the same meta attributes in both files. Headers are compared without attribute_string_len and
    attributes as parsed ismrmrd.Meta: `lorein replay` stores ismrmrd-python's re-serialisation of the
    meta (same entries, other text) where the stock client stores the server's text verbatim."""
    import ismrmrd
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert list(fa.keys()) == list(fb.keys()) == [group]
        assert sorted(fa[group].keys()) == sorted(fb[group].keys())
        for name in fa[group]:
            assert sorted(fa[group][name].keys()) == sorted(fb[group][name].keys()) == ["attributes", "data", "header"]
            for part in ("data", "header", "attributes"):
                da, db = fa[group][name][part], fb[group][name][part]
                assert da.dtype == db.dtype and da.shape == db.shape, (part, name)
            assert fa[group][name]["data"][()].tobytes() == fb[group][name]["data"][()].tobytes(), name
            ha, hb = fa[group][name]["header"][()], fb[group][name]["header"][()]
            ha["attribute_string_len"] = hb["attribute_string_len"] = 0
            assert ha.tobytes() == hb.tobytes(), name
            for x, y in zip(fa[group][name]["attributes"][()], fb[group][name]["attributes"][()]):
                x, y = (v.decode() if isinstance(v, bytes) else v for v in (x, y))
                assert dict(ismrmrd.Meta.deserialize(x)) == dict(ismrmrd.Meta.deserialize(y)), name


def assert_maps_equal(images, reference_images):
    """The same maps, synthetic images and confidence maps (float tolerance), the same meta
    attributes and the same image headers (but attribute_string_len, which HDF5 writers fill
    differently)."""
    for kind in ("map", "synthetic", "confidence"):
        got = map_images.images_to_maps(images, kind)
        ref = map_images.images_to_maps(reference_images, kind)
        assert sorted(got) == sorted(ref)
        if not got:
            continue
        diff = max(float(np.max(np.abs(got[k] - ref[k]))) for k in got)
        print(f"{kind} vs reference: largest difference {diff:.3g}")
        for name in got:
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
    by_series = {i.image_series_index: i for i in reference_images}
    for img in images:
        ref_img = by_series[img.image_series_index]
        assert dict(img.meta) == dict(ref_img.meta), img.image_series_index
        assert header_bytes_without_attr_len(img) == header_bytes_without_attr_len(ref_img)


def new_log(server, start: int) -> str:
    return server.log_text()[start:]


def chain_method(path) -> str:
    return gadget.METHOD_LABELS[read_chain(path).properties["method"]]


def offline(raw, tmp_path, chain_path, name="offline.h5"):
    """lorein recon (gadget.recon_file) with the chain's properties."""
    return gadget.recon_file(raw, tmp_path / name, read_chain(chain_path).properties, group="offline")


# --------------------------------------------------------------------------------------------
# stock client, lorein replay, recon_file: the same images
# --------------------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_stock_client_replay_and_recon_agree_qalas(server, qalas_small, tmp_path):
    """-C chain file: stock client -> right images; lorein replay -> the same file layout and
    bytes; lorein recon -> the same maps."""
    start = len(server.log_text())
    out_stock, out_replay = tmp_path / "stock.h5", tmp_path / "replay.h5"
    proc = stock(server, ["-f", qalas_small.raw, "-C", server.fast_chain, "-o", out_stock, "-G", "run"])
    assert proc.returncode == 0 and "ERROR" not in proc.stdout, proc.stdout + proc.stderr + new_log(server, start)
    images = map_images.read_images(out_stock, "run")
    check_images(images, qalas_small, "CG")
    check_plumbing(map_images.images_to_maps(images), qalas_small, "qalas")

    proc = lorein_replay(server, qalas_small.raw, out_replay, "-C", server.fast_chain, "-G", "run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    same_files(out_replay, out_stock, "run")

    assert_maps_equal(images, offline(qalas_small.raw, tmp_path, server.fast_chain))
    log = new_log(server, start)
    assert log.count("lorein: done: method cg, protocol qalas") == 2, log[-4000:]
    assert "lorein: error" not in log


@pytest.mark.timeout(180)
def test_stock_client_mrf(server, mrf_small, tmp_path):
    out = tmp_path / "stock.h5"
    proc = stock(server, ["-f", mrf_small.raw, "-C", server.fast_chain, "-o", out, "-G", "run"])
    assert proc.returncode == 0 and "ERROR" not in proc.stdout, proc.stdout + proc.stderr + server.log_text()[-4000:]
    images = map_images.read_images(out, "run")
    check_images(images, mrf_small, "CG")
    check_plumbing(map_images.images_to_maps(images), mrf_small, "mrf")
    assert_maps_equal(images, offline(mrf_small.raw, tmp_path, server.fast_chain))


# --------------------------------------------------------------------------------------------
# the chains as shipped
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped_reference(qalas_tiny, tmp_path_factory):
    """lorein recon of qalas_tiny with lorein.xml's own properties (the as-shipped runs below
    must give the same images)."""
    return offline(qalas_tiny.raw, tmp_path_factory.mktemp("shipped"), LOREIN_XML)


@pytest.mark.timeout(600)
def test_by_name_as_shipped_mrf(server, mrf_tiny, tmp_path):
    """-c lorein.xml: the chain installed in the server's config folder as docker/Dockerfile does,
    unchanged (default lorein), on an MRF scan (B1 too): the maps meet the accuracy thresholds.
    (That these runs equal ``lorein recon`` is checked on qalas_tiny below, and for MRF with the
    fast chain above.)"""
    installed = server.home / "share" / "gadgetron" / "config" / "lorein.xml"
    assert installed.read_bytes() == LOREIN_XML.read_bytes()
    assert (installed.parent / "lorein_connect.xml").read_bytes() == CONNECT_XML.read_bytes()
    out = tmp_path / "stock.h5"
    t0 = time.monotonic()
    proc = stock(server, ["-f", mrf_tiny.raw, "-c", "lorein.xml", "-o", out, "-G", "run"], timeout=590)
    print(f"as shipped ({read_chain(LOREIN_XML).properties}): {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0 and "ERROR" not in proc.stdout, proc.stdout + proc.stderr + server.log_text()[-4000:]
    images = map_images.read_images(out, "run")
    method = read_chain(LOREIN_XML).properties["method"]
    check_images(images, mrf_tiny, chain_method(LOREIN_XML))
    assert method == "lorein"
    check_accuracy(map_images.images_to_maps(images), mrf_tiny, "mrf")


@pytest.mark.timeout(600)
def test_by_name_as_shipped_qalas(server, qalas_tiny, shipped_reference, tmp_path):
    """The default chain, by name: maps, synthetic images and confidence maps come back as
    separate series, each its own dataset in the stock client's file, named for a PACS."""
    out = tmp_path / "stock.h5"
    proc = stock(server, ["-f", qalas_tiny.raw, "-c", "lorein.xml", "-o", out, "-G", "run"], timeout=590)
    assert proc.returncode == 0 and "ERROR" not in proc.stdout, proc.stdout + proc.stderr + server.log_text()[-4000:]
    images = map_images.read_images(out, "run")
    check_images(images, qalas_tiny, chain_method(LOREIN_XML))
    assert_maps_equal(images, shipped_reference)
    with h5py.File(out, "r") as f:
        datasets = sorted(f["run"].keys())
    series = {1: "T1", 2: "T2", 3: "PD", 11: "T1w", 12: "T2w", 13: "PDw", 14: "FLAIR", 15: "STIR",
              21: "T1_SD", 22: "T2_SD", 25: "UNDETERMINED"}
    assert datasets == sorted(f"image_{n}" for n in series)
    described = {i.image_series_index: (i.meta["LOREIN_Map"], i.meta["SeriesDescription"],
                                        i.meta["ImageType"]) for i in images}
    for n, name in series.items():
        kind = "QMAP" if n < 10 else "SYNTHETIC" if n < 20 else "CONFIDENCE"
        assert described[n][0] == name and name.split("_")[0].lower() in described[n][1].lower()
        assert described[n][2] == ["DERIVED", "SECONDARY" if kind == "CONFIDENCE" else "PRIMARY",
                                   kind, name.upper()]


@pytest.mark.timeout(600)
def test_passive_serve_as_shipped(server, qalas_tiny, shipped_reference, tmp_path):
    """`lorein serve --port P` + lorein_connect.xml with only its port changed, sent by
    `lorein replay -C`: the server connects to the running gadget."""
    port = free_port()
    chain = chain_copy(CONNECT_XML, tmp_path / "lorein_connect.xml", port=port)
    assert read_chain(chain).properties == read_chain(CONNECT_XML).properties
    gadget_proc = subprocess.Popen(serve_command(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, cwd=tmp_path, env=gadget_env())
    try:
        wait_listening(port, gadget_proc, 60)
        out = tmp_path / "out.h5"
        proc = lorein_replay(server, qalas_tiny.raw, out, "-C", chain, "-G", "run", timeout=500)
        rc = gadget_proc.wait(30)
        log = gadget_proc.stdout.read()
    finally:
        stop_process(gadget_proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-3000:]
    assert rc == 0, log[-4000:]
    images = map_images.read_images(out, "run")
    check_images(images, qalas_tiny, chain_method(CONNECT_XML))
    assert_maps_equal(images, shipped_reference)


# --------------------------------------------------------------------------------------------
# bad input through the server
# --------------------------------------------------------------------------------------------

def _cut_copy(raw, path):
    """The raw file without its second half: no ACQ_LAST_IN_MEASUREMENT."""
    shutil.copyfile(raw, path)
    with h5py.File(path, "r+") as f:
        d = f["dataset/data"]
        d.resize((d.shape[0] // 2,))
    return path


def _header_edit_copy(edit):
    def make(raw, path):
        import ismrmrd
        shutil.copyfile(raw, path)
        with h5py.File(path, "r+") as f:
            h = ismrmrd.xsd.CreateFromDocument(f["dataset/xml"][0])
            edit(h)
            f["dataset/xml"][0] = header.header_to_xml(h).encode("utf-8")
        return path
    return make


def _matrix_bomb(h):
    for space in (h.encoding[0].encodedSpace, h.encoding[0].reconSpace):
        space.matrixSize.x = space.matrixSize.y = space.matrixSize.z = 4096
    h.encoding[0].encodingLimits.kspace_encoding_step_1.maximum = 4095
    h.encoding[0].encodingLimits.kspace_encoding_step_1.center = 2048
    h.encoding[0].encodingLimits.kspace_encoding_step_2.maximum = 4095
    h.encoding[0].encodingLimits.kspace_encoding_step_2.center = 2048


def _lines_bomb(h):
    for p in h.userParameters.userParameterLong:
        if p.name == "lorein.n_lines":
            p.value = 10 ** 12


BAD = {
    "cut_short": (_cut_copy, "MRDError: the stream ended before ACQ_LAST_IN_MEASUREMENT"),
    "unknown_protocol": (_header_edit_copy(unknown_protocol), "ReconError: unknown protocol 'qalas_v9'"),
    "matrix_4096": (_header_edit_copy(_matrix_bomb),
                    "ResourceError: encoded readout (encodedSpace matrixSize x) = 4096 exceeds the limit"),
    "lines_1e12": (_header_edit_copy(_lines_bomb),
                   "ResourceError: imaging lines (userParameter lorein.n_lines) = 1000000000000 exceeds"),
    "protocol_path": (_header_edit_copy(lambda h: unknown_protocol(h, "/etc/lorein/../qalas.yaml")),
                      "ReconError: unknown protocol '/etc/lorein/../qalas.yaml'"),
}


def _no_images(path) -> bool:
    if not Path(path).exists():
        return True
    with h5py.File(path, "r") as f:
        return not any(k.startswith("image_") for g in f.values() for k in g.keys())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_through_server(case, server, qalas_small, tmp_path):
    """Stock client and lorein replay with the installed chain (-c lorein.xml, as shipped): both end
    within bounded time, no maps are written, the server log holds the gadget's error; the next
    good replay on the same server succeeds."""
    make, expected = BAD[case]
    bad = make(qalas_small.raw, tmp_path / "bad.h5")
    start = len(server.log_text())

    t0 = time.monotonic()
    proc = stock(server, ["-f", bad, "-c", "lorein.xml", "-o", tmp_path / "stock.h5"], timeout=60)
    took = time.monotonic() - t0
    assert took < 60
    assert "ERROR" in proc.stdout and expected in proc.stdout, proc.stdout + proc.stderr
    assert _no_images(tmp_path / "stock.h5")

    t0 = time.monotonic()
    with pytest.raises(rp.ReplayError, match=re.escape(expected.split(": ", 1)[1])):
        rp.replay(bad, tmp_path / "replay.h5", port=server.port, config_name="lorein.xml", timeout=60,
                  progress=False)
    assert time.monotonic() - t0 < 60
    assert _no_images(tmp_path / "replay.h5")

    log = new_log(server, start)
    errors = [l for l in log.splitlines() if "lorein: error:" in l]
    assert len(errors) == 2 and all(expected in l for l in errors), log[-4000:]

    good = rp.replay(qalas_small.raw, tmp_path / "good.h5", port=server.port, config_file=server.fast_chain,
                     out_group="run", timeout=120, progress=False)
    # maps 1-3, synthetic images 11-15, T1/T2 SD and the undetermined voxels 21, 22, 25
    assert good.images == {f"image_{n}": 1 for n in (1, 2, 3, 11, 12, 13, 14, 15, 21, 22, 25)}
    assert not good.errors
    check_images(map_images.read_images(tmp_path / "good.h5", "run"), qalas_small, "CG")


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------

def _descendants(pid: int) -> list:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@pytest.mark.timeout(240)
def test_four_replays_at_once(server, qalas_small, tmp_path):
    """Four `lorein replay` at once on one server, each from its own copy of the input: all right."""
    reference = offline(qalas_small.raw, tmp_path, server.fast_chain)
    raws = []
    for i in range(4):
        raws.append(tmp_path / f"raw{i}.h5")
        shutil.copyfile(qalas_small.raw, raws[-1])
    pid = server.process.pid
    peak = {"total_kb": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            total = sum(_status_kb(p, "VmRSS") for p in _descendants(pid))
            peak["total_kb"] = max(peak["total_kb"], total)
            stop.wait(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    cmds = [[str(LORE), "replay", str(raw), "-o", str(tmp_path / f"out{i}.h5"), "-p", str(server.port),
             "-C", str(server.fast_chain), "-G", "run", "-q"] for i, raw in enumerate(raws)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=server.environment()) for c in cmds]
    try:
        outputs = [p.communicate(timeout=200)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        stop.set()
        sampler.join(2)
    wall = time.monotonic() - t0
    server_peak = _status_kb(pid, "VmHWM")
    print(f"4 replays at once: wall {wall:.1f} s; server peak RSS {server_peak / 1024:.0f} MiB (VmHWM); "
          f"server + gadget processes peak {peak['total_kb'] / 1024:.0f} MiB (sampled every 0.1 s)")
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    for i in range(4):
        assert_maps_equal(map_images.read_images(tmp_path / f"out{i}.h5", "run"), reference)


@pytest.mark.timeout(300)
def test_server_killed_mid_fit_gadget_exits(qalas_small, tmp_path):
    """The server is killed (SIGKILL) while its gadget fits: the gadget notices that its peer has
    gone and exits within 30 s; no process is left behind."""
    gt = require_gadgetron()
    slow = chain_copy(LOREIN_XML, tmp_path / "lorein_slow.xml",
                      {"method": "lorein", "iterations": "1200", "holdout": "0"})
    with GadgetronServer(gt, tmp_path / "server", chains=[slow],
                         env={"GADGETRON_EXTERNAL_LOG_LEVEL": "INFO", "PYTHONPATH": str(REPO)}) as srv:
        client = subprocess.Popen([str(LORE), "replay", str(qalas_small.raw), "-o", str(tmp_path / "o.h5"),
                                   "-p", str(srv.port), "-c", "lorein_slow.xml", "-q"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=srv.environment())
        try:
            deadline = time.monotonic() + 200
            while time.monotonic() < deadline and "iteration" not in srv.log_text():
                time.sleep(0.5)
            assert "iteration" in srv.log_text(), srv.log_text()[-3000:]
            pid = srv.process.pid
            procs = {p: _cmdline(p) for p in _descendants(pid)}
            gadgets = [p for p, cmd in procs.items() if "gadget_lorein" in cmd]
            servers = [p for p in procs if p not in gadgets]     # the server and its own children
            assert gadgets, f"no gadget process under the server: {procs}"
            t0 = time.monotonic()
            for p in servers:
                os.kill(p, signal.SIGKILL)
            srv.process.wait(10)
            alive = gadgets
            while alive and time.monotonic() - t0 < 30:
                time.sleep(0.2)
                alive = [p for p in gadgets if _running(p)]
            took = time.monotonic() - t0
        finally:
            if client.poll() is None:
                client.kill()
            client.communicate(10)
        log = srv.log_text()
    print(f"gadget processes gone {took:.1f} s after the server was killed: {procs}")
    assert not alive, f"gadget processes {alive} still running 30 s after the server was killed\n{log[-3000:]}"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
