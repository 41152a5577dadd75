"""``lorein simulate``: the raw file is ISMRMRD that ismrmrd-python reads and validates, holds exactly the
sampled lines and the noise scan, and (fully sampled, noise-free) inverse-FFTs back to the simulated
contrast images; the ground truth goes to the .npz and never into the raw file; masks reach the
accelerations the sequences are used at (R = 48 for qalas, several hundred for mrf).

The checks read the file with ismrmrd.Dataset and h5py directly, and do their own FFTs, so that they
do not depend on gadget_lorein's reader (tests/test_mrd.py tests that)."""
from __future__ import annotations

import argparse

import h5py
import ismrmrd
import ismrmrd.xsd
import numpy as np
import pytest
import yaml

from gadget_lorein import cli

from gadget_lorein.physics import protocol

from gadget_lorein.sim import sampling, simulate

NOISE_BIT = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)
CALIB_BIT = 1 << (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING - 1)
LAST_BIT = 1 << (ismrmrd.ACQ_LAST_IN_MEASUREMENT - 1)
N_NOISE_SAMPLES = 512          # simulate()'s noise scan length


def small_mrf_yaml(tmp_path, n_tr=100):
    proto = protocol.load("mrf").with_overrides(
        n_tr=n_tr, epg_states=32,
        dictionary={"t1_ms": [100.0, 6000.0, 20], "t2_ms": [10.0, 3000.0, 20], "b1": [0.6, 1.4, 3]})
    path = tmp_path / f"mrf_{n_tr}.yaml"
    path.write_text(proto.yaml_text)
    return path, proto


def run_simulate(tmp_path, *args, name="raw"):
    raw, truth = tmp_path / f"{name}.h5", tmp_path / f"{name}_truth.npz"
    rc = cli.main(["simulate", "-q", "-o", str(raw), "--truth", str(truth), *map(str, args)])
    assert rc == 0
    return raw, truth


def read_table(path):
    """(heads, complex data (n, coils, samples)) of every acquisition, straight from the HDF5 table."""
    with h5py.File(path, "r") as f:
        rows = f["dataset/data"][:]
    heads = rows["head"]
    data = np.stack([np.asarray(d, np.float32).view(np.complex64).reshape(int(h["active_channels"]),
                                                                          int(h["number_of_samples"]))
                     for d, h in zip(rows["data"], heads)])
    return heads, data


def ifft3c(k, axes=(-3, -2, -1)):
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho"), axes=axes)


@pytest.fixture(params=["qalas", "mrf"])
def simulated(request, tmp_path):
    """A simulated file of each sequence (small) with what was asked for."""
    nx, ny, nz, coils = 24, 24, 16, 6
    if request.param == "qalas":
        proto = protocol.load("qalas")
        accel, extra = 8, []
    else:
        ypath, proto = small_mrf_yaml(tmp_path)
        accel, extra = 100, ["--protocol", ypath, "--calib-mode", "union"]
    raw, truth = run_simulate(tmp_path, "--matrix", nx, ny, nz, "--coils", coils, "--accel", accel,
                              "--noise", 0.005, "--seed", 0, *extra)
    return argparse.Namespace(raw=raw, truth=truth, proto=proto, matrix=(nx, ny, nz), coils=coils,
                              accel=accel)


def test_ismrmrd_reads_and_validates(simulated):
    s = simulated
    nx, ny, nz = s.matrix
    d = ismrmrd.Dataset(str(s.raw), "dataset", False)
    try:
        xml = d.read_xml_header()
        header = ismrmrd.xsd.CreateFromDocument(xml)
        n_acq = d.number_of_acquisitions()
        first, last = d.read_acquisition(0), d.read_acquisition(n_acq - 1)
    finally:
        d.close()
    n_lines = sampling.n_samples(s.proto.n_frames, ny, nz, s.accel)
    n_noise = N_NOISE_SAMPLES // nx
    assert n_acq == n_lines + n_noise

    enc = header.encoding[0]
    assert enc.trajectory.value == "cartesian"
    assert (enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y, enc.reconSpace.matrixSize.z) == (nx, ny, nz)
    assert enc.encodingLimits.contrast.maximum == s.proto.n_frames - 1
    assert header.acquisitionSystemInformation.receiverChannels == s.coils
    ups = {p.name: p.value for p in header.userParameters.userParameterString}
    assert ups["lorein.protocol"] == s.proto.name
    assert yaml.safe_load(ups["lorein.protocol_yaml"]) == s.proto.params

    heads, data = read_table(s.raw)
    flags = heads["flags"].astype(np.uint64)
    noise = (flags & np.uint64(NOISE_BIT)) != 0
    assert noise.sum() == n_noise and noise[:n_noise].all()          # the noise scan comes first
    assert int(flags[-1]) & LAST_BIT
    assert np.all(heads["number_of_samples"] == nx) and np.all(heads["active_channels"] == s.coils)
    assert data.shape == (n_acq, s.coils, nx)
    # the same rows through ismrmrd.Dataset
    np.testing.assert_array_equal(first.data, data[0])
    np.testing.assert_array_equal(last.data, data[-1])
    assert first.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    # every imaging line once, frame counter in idx.contrast, calibration lines flagged
    idx = heads["idx"][~noise]
    keys = set(zip(idx["contrast"].tolist(), idx["kspace_encode_step_2"].tolist(),
                   idx["kspace_encode_step_1"].tolist()))
    assert len(keys) == n_lines
    assert ((flags[~noise] & np.uint64(CALIB_BIT)) != 0).sum() > 0
    frames = np.bincount(idx["contrast"], minlength=s.proto.n_frames)
    assert frames.min() >= 1 and len(frames) == s.proto.n_frames
    # ground truth: in the .npz, never in the raw file
    with h5py.File(s.raw, "r") as f:
        assert sorted(f.keys()) == ["dataset"] and sorted(f["dataset"].keys()) == ["data", "xml"]
    truth = cli.load_truth(s.truth)
    for k in ("T1", "T2", "PD", "labels", "brain_mask"):
        assert truth[k].shape == (nz, ny, nx), k
    assert ("B1" in truth) == s.proto.encodes_b1
    assert np.array_equal(truth["brain_mask"], truth["labels"] > 0)
    assert set(np.unique(truth["labels"])) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("sequence,oversampling", [("qalas", 1), ("qalas", 2), ("mrf", 1)])
def test_fully_sampled_kspace_gives_the_contrast_images(tmp_path, sequence, oversampling):
    """accel 1, noise 0: inverse FFT, coil-combine with the simulator's coil maps
    (sum conj(S) x / sum |S|^2) = the simulated contrast images (NRMSE < 1e-3)."""
    nx, ny, nz, coils = 16, 16, 8, 4
    if sequence == "qalas":
        proto, extra = protocol.load("qalas"), []
    else:
        ypath, proto = small_mrf_yaml(tmp_path, n_tr=12)
        extra = ["--protocol", ypath]
    raw, _ = run_simulate(tmp_path, "--matrix", nx, ny, nz, "--coils", coils, "--accel", 1, "--noise", 0,
                          "--oversampling", oversampling, *extra)
    d = ismrmrd.Dataset(str(raw), "dataset", False)
    try:
        n_acq = d.number_of_acquisitions()
    finally:
        d.close()
    heads, data = read_table(raw)
    nf = proto.n_frames
    noise = (heads["flags"].astype(np.uint64) & np.uint64(NOISE_BIT)) != 0
    assert n_acq == nf * ny * nz + noise.sum()
    assert data.shape[-1] == oversampling * nx
    idx = heads["idx"][~noise]
    k = np.zeros((coils, nf, nz, ny, oversampling * nx), np.complex64)
    filled = np.zeros((nf, nz, ny), int)
    f, z, y = idx["contrast"], idx["kspace_encode_step_2"], idx["kspace_encode_step_1"]
    k[:, f, z, y, :] = np.moveaxis(data[~noise], 0, 1)
    np.add.at(filled, (f, z, y), 1)
    assert np.all(filled == 1)

    img = ifft3c(k)
    x0 = (oversampling * nx) // 2 - nx // 2
    img = img[..., x0:x0 + nx]                          # readout oversampling: keep the central FOV
    sim = simulate.simulate(proto, matrix=(nx, ny, nz), n_coils=coils, accel=1, noise=0, seed=0)
    s = sim.coils[:, None]
    combined = (np.conj(s) * img).sum(0) / np.maximum((np.abs(s) ** 2).sum(0), 1e-12)
    ref = simulate.contrast_images(proto, sim.phantom).numpy()
    for t in range(nf):
        mag = np.linalg.norm(np.abs(combined[t]) - np.abs(ref[t])) / np.linalg.norm(ref[t])
        cplx = np.linalg.norm(combined[t] - ref[t]) / np.linalg.norm(ref[t])
        assert mag < 1e-3 and cplx < 1e-3, (t, mag, cplx)


def _header_acceleration(raw):
    d = ismrmrd.Dataset(str(raw), "dataset", False)
    try:
        header = ismrmrd.xsd.CreateFromDocument(d.read_xml_header())
        n = d.number_of_acquisitions()
    finally:
        d.close()
    ups = {p.name: p.value for p in header.userParameters.userParameterDouble}
    return ups["lorein.acceleration"], n


def test_qalas_reaches_r48(tmp_path):
    nx, ny, nz = 64, 64, 48
    raw, _ = run_simulate(tmp_path, "--sequence", "qalas", "--matrix", nx, ny, nz, "--coils", 2,
                          "--accel", 48, "--noise", 0.01)
    r, n = _header_acceleration(raw)
    lines = 5 * ny * nz // 48
    assert r == pytest.approx(48.0) and n == lines + N_NOISE_SAMPLES // nx
    heads, _ = read_table(raw)
    imaging = heads[(heads["flags"].astype(np.uint64) & np.uint64(NOISE_BIT)) == 0]
    per_frame = np.bincount(imaging["idx"]["contrast"], minlength=5)
    assert per_frame.min() >= lines // 5 - 1                 # every contrast gets its share


def test_mrf_reaches_several_hundred(tmp_path):
    nx, ny, nz = 32, 32, 16
    raw, _ = run_simulate(tmp_path, "--sequence", "mrf", "--matrix", nx, ny, nz, "--coils", 2,
                          "--accel", 400, "--noise", 0.01)
    r, n = _header_acceleration(raw)
    assert r == pytest.approx(400.0) and n == 400 * ny * nz // 400 + N_NOISE_SAMPLES // nx
    heads, _ = read_table(raw)
    imaging = heads[(heads["flags"].astype(np.uint64) & np.uint64(NOISE_BIT)) == 0]
    assert np.bincount(imaging["idx"]["contrast"], minlength=400).min() >= 1
    # and at the default matrix the masks reach R = 600 with every frame sampled
    m = sampling.sampling_masks(400, 64, 48, 600, calib_mode="union")
    assert sampling.acceleration(m) == pytest.approx(600, rel=1e-3) and m.sum(axis=(1, 2)).min() >= 1


def test_defaults_per_sequence():
    parser = cli.build_parser()
    q = cli.simulation_plan(parser.parse_args(["simulate", "-o", "x.h5"]))
    m = cli.simulation_plan(parser.parse_args(["simulate", "--sequence", "mrf", "-o", "x.h5"]))
    assert q[0].kind == "qalas" and q[1]["accel"] == 16 and q[1]["calib_mode"] == "union"
    assert q[1]["matrix"] == (64, 64, 48) and q[1]["n_coils"] == 8 and q[1]["noise"] == 0.01
    assert m[0].kind == "mrf" and m[1]["accel"] == 200 and m[1]["calib_mode"] == "union"


def test_same_seed_same_file_and_truth(tmp_path):
    a = run_simulate(tmp_path, "--matrix", 16, 16, 8, "--coils", 3, "--accel", 4, name="a")
    b = run_simulate(tmp_path, "--matrix", 16, 16, 8, "--coils", 3, "--accel", 4, name="b")
    c = run_simulate(tmp_path, "--matrix", 16, 16, 8, "--coils", 3, "--accel", 4, "--seed", 1, name="c")
    assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()


def test_b1_mismatch_puts_the_transmit_field_into_a_qalas_signal():
    """qalas does not encode B1, so by default its scan has B1 = 1; b1_mismatch=True gives the
    phantom's field to the signal (the images change inside the head, the model's nominal B1 does not)."""
    proto = protocol.load("qalas")
    nominal = simulate.simulate(proto, matrix=(16, 16, 8), n_coils=2, accel=4, noise=0, seed=0)
    mismatch = simulate.simulate(proto, matrix=(16, 16, 8), n_coils=2, accel=4, noise=0, seed=0,
                                 b1_mismatch=True)
    b1 = nominal.phantom.b1[nominal.phantom.labels > 0]
    assert b1.min() < 0.9 and b1.max() > 1.1
    np.testing.assert_array_equal(nominal.scan.lines.ky, mismatch.scan.lines.ky)
    diff = np.linalg.norm(mismatch.scan.lines.data - nominal.scan.lines.data)
    assert diff > 0.05 * np.linalg.norm(nominal.scan.lines.data), diff
    with_b1 = simulate.contrast_images(proto, nominal.phantom, b1=True).numpy()
    default = simulate.contrast_images(proto, nominal.phantom).numpy()
    assert not np.allclose(with_b1, default)
    assert "B1" not in mismatch.truth()            # not a reconstructed map for qalas
