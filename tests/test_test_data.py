"""test_data/: the committed small scans match SHA256SUMS, regenerate byte for byte with
test_data/make_test_data.py, and read as what they claim to be."""
from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import ismrmrd.xsd
import numpy as np
import pytest
from conftest import GEN as gen
from conftest import TEST_DATA


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_committed_files_match_sums():
    sums = gen.read_sums()
    assert sorted(sums) == sorted(gen.FILES)
    for name in gen.FILES:
        path = TEST_DATA / name
        assert path.is_file(), f"{name} missing: run python test_data/make_test_data.py"
        assert path.stat().st_size < 4 * 2 ** 20, f"{name} is larger than a few MB"
        assert sha(path) == sums[name], f"{name} does not match SHA256SUMS"


# float32 samples may differ in their last bits between CPUs: numpy and torch pick vector kernels
# by the CPU (AVX2 vs AVX-512 on these machines: up to 3e-8 of a peak near 1). Byte-identical on
# the same kind of CPU; within this relative rounding elsewhere.
ROUNDING = 1e-6


def _differences(a: Path, b: Path) -> str | None:
    """What differs between two files of the same kind (for the failure message); None when only
    the samples' float rounding differs."""
    if a.suffix == ".npz":
        with np.load(a) as x, np.load(b) as y:
            if sorted(x.files) != sorted(y.files):
                return f"keys {sorted(x.files)} != {sorted(y.files)}"
            bad = [k for k in x.files if not np.array_equal(x[k], y[k])]
            return f"arrays differ: {bad}" if bad else "same arrays, different bytes"
    with h5py.File(a, "r") as f, h5py.File(b, "r") as g:
        if f["dataset/xml"][0] != g["dataset/xml"][0]:
            return "XML headers differ"
        ra, rb = f["dataset/data"][:], g["dataset/data"][:]
        if len(ra) != len(rb):
            return f"{len(ra)} != {len(rb)} acquisitions"
        if ra["head"].tobytes() != rb["head"].tobytes():
            return "acquisition headers differ"
        worst = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(ra["data"], rb["data"]))
        peak = max(float(np.max(np.abs(np.asarray(x)))) for x in ra["data"])
        if 0 < worst <= ROUNDING * peak:        # rounding only; equal samples in other bytes still fail
            return None
        return f"samples differ by up to {worst:g} (peak {peak:g})" if worst else "same content, different bytes"


def test_regenerates_identically(tmp_path):
    sums = gen.generate(tmp_path)
    want = gen.read_sums()
    diffs = {name: _differences(TEST_DATA / name, tmp_path / name) for name in gen.FILES
             if sums[name] != want[name]}
    diffs = {name: why for name, why in diffs.items() if why is not None}
    assert not diffs, f"regenerated test data differ from test_data/ (rerun make_test_data.py if intended): {diffs}"


@pytest.mark.parametrize("name,kind,n_frames,accel", [("qalas_small", "qalas", 5, 8.0),
                                                      ("mrf_small", "mrf", 100, 100.0)])
def test_files_are_what_they_claim(name, kind, n_frames, accel):
    # read-only through h5py: ismrmrd.Dataset opens for writing, which HDF5's file locking refuses
    # while another process (a gadget, a parallel test run) has the shared file open
    with h5py.File(TEST_DATA / f"{name}.h5", "r") as f:
        xml = f["dataset/xml"][0]
        n = f["dataset/data"].shape[0]
    header = ismrmrd.xsd.CreateFromDocument(xml.decode("utf-8") if isinstance(xml, bytes) else xml)
    enc = header.encoding[0]
    assert (enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y, enc.reconSpace.matrixSize.z) == gen.MATRIX
    assert header.acquisitionSystemInformation.receiverChannels == 6
    assert enc.encodingLimits.contrast.maximum == n_frames - 1
    doubles = {p.name: p.value for p in header.userParameters.userParameterDouble}
    assert doubles["lorein.acceleration"] == pytest.approx(accel)
    nx, ny, nz = gen.MATRIX
    assert n == round(n_frames * ny * nz / accel) + 512 // nx
    strings = {p.name: p.value for p in header.userParameters.userParameterString}
    assert strings["lorein.protocol"] == kind
    with np.load(TEST_DATA / f"{name}_truth.npz") as z:
        assert z["T1"].shape == (nz, ny, nx)
        assert ("B1" in z.files) == (kind == "mrf")
    if kind == "mrf":
        import yaml
        p = yaml.safe_load(strings["lorein.protocol_yaml"])
        assert p["n_tr"] == 100 and p["epg_states"] == 32
        assert p["dictionary"] == gen.MRF_OVERRIDES["dictionary"]
