"""The ``lorein`` command line, run as a user runs it (a subprocess of the installed console script):
mistakes give one clear line on stderr and exit status 2 (no traceback); simulate -> recon round trip;
the demo on a tiny size."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gadget_lorein import __version__, cli, runner

from gadget_lorein.io import map_images

LOREIN = Path(sys.executable).with_name("lorein")
TEST_DATA = Path(__file__).resolve().parents[1] / "test_data"


def run(*args, timeout=600, cwd=None) -> subprocess.CompletedProcess:
    cmd = [str(LOREIN)] if LOREIN.exists() else [sys.executable, "-m", "gadget_lorein.cli"]
    env = dict(os.environ, HDF5_USE_FILE_LOCKING="FALSE", LOREIN_DEBUG="")
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def assert_usage_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    err = res.stderr
    assert res.returncode == 2, (res.returncode, err, res.stdout)
    assert "Traceback" not in err and "Traceback" not in res.stdout
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("lorein") and "error:" in line, line
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "not_hdf5.h5").write_text("this is not an HDF5 file\n")
    (d / "bad.yaml").write_text("name: x\nkind: [unclosed\n")
    (d / "nokind.yaml").write_text("name: x\n")
    (d / "a_folder").mkdir()
    (d / "a_file").write_text("x")
    import h5py
    with h5py.File(d / "other_group.h5", "w") as f:
        f.create_group("something_else")
    return d


MISSING = "/nonexistent/folder"

BAD = {
    # simulate
    "sim-matrix-small": (["simulate", "-o", "{d}/r.h5", "--matrix", 4, 24, 16], ["outside 8..512"]),
    "sim-matrix-two": (["simulate", "-o", "{d}/r.h5", "--matrix", 24, 24], ["--matrix", "expected 3"]),
    "sim-matrix-text": (["simulate", "-o", "{d}/r.h5", "--matrix", 24, 24, "x"], ["--matrix", "invalid"]),
    "sim-matrix-neg": (["simulate", "-o", "{d}/r.h5", "--matrix", 24, -24, 16], ["outside"]),
    "sim-accel-low": (["simulate", "-o", "{d}/r.h5", "--accel", 0.5], ["--accel", ">= 1"]),
    "sim-accel-nan": (["simulate", "-o", "{d}/r.h5", "--accel", "nan"], ["--accel"]),
    "sim-accel-high": (["simulate", "-o", "{d}/r.h5", "--matrix", 24, 24, 16, "--accel", 5000], ["accel"]),
    "sim-coils": (["simulate", "-o", "{d}/r.h5", "--coils", 0], ["--coils", ">= 1"]),
    "sim-sequence": (["simulate", "-o", "{d}/r.h5", "--sequence", "flash"], ["--sequence", "invalid choice"]),
    "sim-noise": (["simulate", "-o", "{d}/r.h5", "--noise", -1], ["--noise", ">= 0"]),
    "sim-out-missing-dir": (["simulate", "-o", MISSING + "/r.h5"], ["does not exist"]),
    "sim-out-is-dir": (["simulate", "-o", "{d}/a_folder"], ["is a folder"]),
    "sim-no-output": (["simulate"], ["required", "-o"]),
    "sim-truth-dir": (["simulate", "-o", "{d}/r.h5", "--truth", MISSING + "/t.npz"], ["truth"]),
    "sim-calib-big": (["simulate", "-o", "{d}/r.h5", "--matrix", 24, 24, 16, "--calib", 30, 30],
                      ["calibration region"]),
    "sim-calib-mode": (["simulate", "-o", "{d}/r.h5", "--calib-mode", "all"], ["invalid choice"]),
    "sim-oversampling": (["simulate", "-o", "{d}/r.h5", "--oversampling", 3], ["--oversampling"]),
    "sim-protocol-missing": (["simulate", "-o", "{d}/r.h5", "--protocol", "{d}/none.yaml"], ["no such file"]),
    "sim-protocol-bad": (["simulate", "-o", "{d}/r.h5", "--protocol", "{d}/bad.yaml"], ["protocol"]),
    "sim-protocol-nokind": (["simulate", "-o", "{d}/r.h5", "--protocol", "{d}/nokind.yaml"], ["kind"]),
    "sim-unknown-option": (["simulate", "-o", "{d}/r.h5", "--colis", 8], ["unrecognized", "--colis"]),
    # recon
    "recon-missing": (["recon", "{d}/none.h5", "-o", "{d}/m.h5"], ["does not exist"]),
    "recon-not-hdf5": (["recon", "{d}/not_hdf5.h5", "-o", "{d}/m.h5"], ["not an HDF5 file"]),
    "recon-is-dir": (["recon", "{d}/a_folder", "-o", "{d}/m.h5"], ["not a file"]),
    "recon-method": (["recon", "{raw}", "-o", "{d}/m.h5", "--method", "magic"], ["setting method=magic", "must be one of"]),
    "recon-rank": (["recon", "{raw}", "-o", "{d}/m.h5", "--rank", -1], ["setting rank=-1", ">= 0"]),
    "recon-energy": (["recon", "{raw}", "-o", "{d}/m.h5", "--energy", 1.5], ["setting energy=1.5"]),
    "recon-iterations": (["recon", "{raw}", "-o", "{d}/m.h5", "--iterations", "many"], ["setting iterations=many"]),
    "recon-coil-maps": (["recon", "{raw}", "-o", "{d}/m.h5", "--coil-maps", "sos"], ["setting coil_maps=sos"]),
    "recon-no-out": (["recon", "{raw}"], ["required", "-o"]),
    "recon-out-dir": (["recon", "{raw}", "-o", MISSING + "/m.h5"], ["does not exist"]),
    "recon-truth-missing": (["recon", "{raw}", "-o", "{d}/m.h5", "--truth", "{d}/none.npz"], ["truth", "does not exist"]),
    "recon-truth-bad": (["recon", "{raw}", "-o", "{d}/m.h5", "--truth", "{d}/a_file"], ["truth"]),
    "recon-device": (["recon", "{raw}", "-o", "{d}/m.h5", "--device", "abacus"], ["device"]),
    "recon-protocol": (["recon", "{raw}", "-o", "{d}/m.h5", "--protocol", "{d}/none.yaml"], ["protocol"]),
    "recon-no-group": (["recon", "{d}/other_group.h5", "-o", "{d}/m.h5", "--method", "zerofill"],
                       ["no ISMRMRD raw data"]),
    # replay
    "replay-missing": (["replay", "{d}/none.h5", "-o", "{d}/o.h5"], ["does not exist"]),
    "replay-port": (["replay", "{raw}", "-p", "http"], ["-p", "invalid"]),
    "replay-port-range": (["replay", "{raw}", "-p", 70000], ["port"]),
    "replay-two-chains": (["replay", "{raw}", "-c", "lorein.xml", "-C", "x.xml"], ["not allowed"]),
    "replay-chain-missing": (["replay", "{raw}", "-C", "{d}/none.xml"], ["chain file", "does not exist"]),
    # serve
    "serve-port": (["serve", "--port", 70000], ["--port", "65535"]),
    "serve-port-text": (["serve", "-p", "eighteen"], ["-p"]),
    "serve-method": (["serve", "--method", "magic"], ["setting method=magic", "must be one of"]),
    "serve-virtual-coils": (["serve", "--virtual-coils", -2], ["setting virtual_coils=-2"]),
    "serve-coil-subset": (["serve", "--coil-subset", -1], ["setting coil_subset=-1"]),
    # demo
    "demo-matrix": (["demo", "--out", "{d}/demo", "--matrix", 4, 4, 4], ["outside"]),
    "demo-out-file": (["demo", "--out", "{d}/a_file"], ["not a folder"]),
    "demo-method": (["demo", "--method", "magic"], ["setting method=magic", "must be one of"]),
    "demo-accel": (["demo", "--out", "{d}/demo", "--accel", 0], ["--accel"]),
    # top level
    "unknown-command": (["reconstruct", "x.h5"], ["invalid choice"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_mistakes_exit_2_with_one_line(case, files):
    args, needles = BAD[case]
    raw = TEST_DATA / "qalas_small.h5"
    args = [str(a).format(d=files, raw=raw) for a in args]
    assert_usage_error(run(*args, timeout=300), *needles)


def test_no_command_and_version():
    res = run()
    assert res.returncode == 2 and "Traceback" not in res.stderr and "a command is required" in res.stderr
    res = run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"lorein {__version__} (gadget_lorein)"
    res = run("--help")
    assert res.returncode == 0
    for command in ("simulate", "recon", "replay", "serve", "demo"):
        assert command in res.stdout


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_idle_openmp_threads_sleep_unless_told_otherwise(given, expected):
    """The gadget's process (``python -m gadgetron PORT gadget_lorein.node.gadget ...``) imports the
    package first: OMP_WAIT_POLICY must be set before torch (and its libgomp) loads, and a value
    the user set must be kept."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys, gadget_lorein; assert 'torch' not in sys.modules; "
            "print(os.environ['OMP_WAIT_POLICY']); import gadget_lorein.node.gadget; "
            "assert 'torch' in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expected


def test_methods_match_the_reconstruction():
    assert cli.build_parser() is not None


def test_internal_error_exit_1_without_traceback(files, monkeypatch, capsys):
    """An unexpected failure: one line, status 1 (the traceback only with --verbose)."""
    def boom(args):
        raise RuntimeError("something broke\ninside")
    monkeypatch.setattr(runner, "cmd_simulate", boom)
    rc = cli.main(["simulate", "-o", str(files / "r.h5")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error" in err and "something broke inside" in err


def _nrmse_rows(stdout: str) -> dict:
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^(T1|T2|PD|B1)\s+([0-9.]+)\s+([0-9.]+)\s*$", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def test_simulate_then_recon_round_trip(tmp_path):
    raw, truth, preview = tmp_path / "raw.h5", tmp_path / "truth.npz", tmp_path / "preview.png"
    res = run("simulate", "--sequence", "qalas", "--matrix", 24, 24, 16, "--coils", 4, "--accel", 4,
              "--snr", 50, "--seed", 3, "-o", raw, "--truth", truth, "--png", preview)
    assert res.returncode == 0, res.stderr
    assert raw.is_file() and truth.is_file() and preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "raw.h5" in res.stdout

    out, fig = tmp_path / "maps.h5", tmp_path / "maps.png"
    args = ["recon", raw, "-o", out, "--method", "cg", "--iterations", 15, "--truth", truth, "--png", fig,
            "-G", "cg"]
    res = run(*args)
    assert res.returncode == 0, res.stderr
    rows = _nrmse_rows(res.stdout)
    assert set(rows) == {"T1", "T2", "PD"}, res.stdout
    assert all(np.isfinite(v).all() for v in rows.values())
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = map_images.read_images(out, "cg")
    maps = map_images.images_to_maps(images)
    assert sorted(maps) == ["PD", "T1", "T2"] and maps["T1"].shape == (16, 24, 24)
    assert {im.meta["LOREIN_Method"] for im in images} == {"CG"}
    # the same group again is replaced, not appended to; another group sits beside it
    assert run(*args, "-q").returncode == 0
    n = 3 + 5 + 3          # maps, synthetic images, confidence (T1 SD, T2 SD, undetermined)
    assert len(map_images.read_images(out, "cg")) == n
    assert sorted(map_images.images_to_maps(images, "synthetic")) == sorted(["T1w", "T2w", "PDw", "FLAIR", "STIR"])
    assert fig.with_name("maps_synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = run("recon", raw, "-o", out, "--method", "zerofill", "-G", "zf", "--images-2d", "-q",
              "--synthetic", "none", "--no-confidence")
    assert res.returncode == 0, res.stderr
    assert len(map_images.read_images(out, "zf")) == 3 * 16 and len(map_images.read_images(out, "cg")) == n

    # truth of another scan: a clear error
    other = tmp_path / "other_truth.npz"
    assert run("simulate", "--matrix", 16, 16, 8, "--coils", 2, "--accel", 2, "-o", tmp_path / "o.h5",
               "--truth", other, "-q").returncode == 0
    assert_usage_error(run("recon", raw, "-o", out, "--method", "zerofill", "-G", "x", "--truth", other),
                       "not the truth of this scan")


def test_demo_tiny(tmp_path):
    out = tmp_path / "demo"
    res = run("demo", "--out", out, "--matrix", 16, 16, 8, "--coils", 4, "--accel", 4, "--method", "lorein",
              "--iterations", 3)
    assert res.returncode == 0, res.stderr
    for name in ("raw.h5", "truth.npz", "maps.h5", "maps.png", "simulation.png", "synthetic.png"):
        assert (out / name).is_file(), name
        assert name in res.stdout
    rows = _nrmse_rows(res.stdout)
    assert set(rows) == {"T1", "T2", "PD"}, res.stdout
    maps = map_images.images_to_maps(map_images.read_images(out / "maps.h5", runner.DEMO_GROUP))
    assert sorted(maps) == ["PD", "T1", "T2"]
    assert "demo 3/3" in res.stderr


def test_serve_port_in_use():
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        s.listen()
        assert_usage_error(run("serve", "--port", s.getsockname()[1]), "cannot listen", "in use")


def test_every_setting_is_an_option():
    """recon and serve take every setting as --name-with-dashes; the same validator as the chain."""
    from gadget_lorein import settings
    values = {"method": "pmr", "device": "cpu", "coil_maps": "espirit", "protocol": "qalas",
              "output": "maps+coefficients", "log_level": "DEBUG", "synthetic": "FLAIR,DIR",
              "synthetic_t1w": "600,12", "synthetic_t2w": "5000,90", "synthetic_pdw": "2500,12",
              "synthetic_flair": "10000,100,2600", "synthetic_stir": "4000,40,200",
              "synthetic_dir": "7000,20,3000,500"}
    for command in ("recon", "serve"):
        argv = [command] + (["in.h5", "-o", "out.h5"] if command == "recon" else [])
        for s in settings.SETTINGS:
            if s.type is bool:
                argv += [s.option]
            else:
                argv += [s.option, values.get(s.name, "0.25" if s.type is float else "16")]
        parsed = runner.settings_from_args(cli.build_parser().parse_args(argv))
        assert set(parsed.given) == set(settings.BY_NAME)
        assert parsed.recon.amp is True and parsed.recon.holdout == 0.25 and parsed.recon.rank == 16
    with pytest.raises(runner.UsageError, match=r"setting holdout=0.5 must be in \[0, 0.5\)"):
        runner.settings_from_args(cli.build_parser().parse_args(["serve", "--holdout", "0.5"]))
