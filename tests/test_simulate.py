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
from gadget_lorein.usage import UsageError

from gadget_lorein.physics import protocol

from gadget_lorein.sim import files, sampling, simulate

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
    raw, truth = run_simulate(tmp_path, "--ideal", "--matrix", nx, ny, nz, "--coils", coils,
                              "--accel", accel, "--noise", 0.005, "--seed", 0, *extra)
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
    truth = files.load_truth(s.truth)
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
    raw, _ = run_simulate(tmp_path, "--ideal", "--matrix", nx, ny, nz, "--coils", coils, "--accel", 1,
                          "--noise", 0,
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
    raw, _ = run_simulate(tmp_path, "--ideal", "--sequence", "qalas", "--matrix", nx, ny, nz,
                          "--coils", 2, "--accel", 48, "--noise", 0.01)
    r, n = _header_acceleration(raw)
    lines = 5 * ny * nz // 48
    assert r == pytest.approx(48.0) and n == lines + N_NOISE_SAMPLES // nx
    heads, _ = read_table(raw)
    imaging = heads[(heads["flags"].astype(np.uint64) & np.uint64(NOISE_BIT)) == 0]
    per_frame = np.bincount(imaging["idx"]["contrast"], minlength=5)
    assert per_frame.min() >= lines // 5 - 1                 # every contrast gets its share


def test_mrf_reaches_several_hundred(tmp_path):
    nx, ny, nz = 32, 32, 16
    raw, _ = run_simulate(tmp_path, "--ideal", "--sequence", "mrf", "--matrix", nx, ny, nz,
                          "--coils", 2, "--accel", 400, "--noise", 0.01)
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
    q = files.simulation_plan(parser.parse_args(["simulate", "-o", "x.h5"]))
    m = files.simulation_plan(parser.parse_args(["simulate", "--sequence", "mrf", "-o", "x.h5"]))
    assert q[0].kind == "qalas" and q[1]["accel"] == 8 and q[1]["mode"] == "realistic"
    assert q[1]["calib_mode"] == "per_frame" and q[1]["pattern"] == "per_frame"
    assert q[1]["matrix"] == (64, 64, 48) and q[1]["n_coils"] == 8 and q[1]["snr"] == 30
    assert "noise" not in q[1]
    # mrf: a few lines per TR leave no room for a block in every frame: split, centre every TR
    assert m[0].kind == "mrf" and m[1]["accel"] == 200 and m[1]["calib_mode"] == "union"
    assert m[1]["pattern"] == "per_frame"
    i = files.simulation_plan(parser.parse_args(["simulate", "--ideal", "-o", "x.h5"]))
    assert i[1]["mode"] == "ideal" and i[1]["noise"] == 0.01 and i[1]["calib_mode"] == "union"
    assert "snr" not in i[1] and i[1]["pattern"] == "per_frame"
    p = files.simulation_plan(parser.parse_args(["simulate", "--pattern", "per-frame", "-o", "x.h5"]))
    assert p[1]["pattern"] == "per_frame" and p[1]["calib_mode"] == "per_frame"
    s = files.simulation_plan(parser.parse_args(["simulate", "--ideal", "--pattern", "shared",
                                               "--calib-mode", "union", "-o", "x.h5"]))
    assert s[1]["pattern"] == "shared" and s[1]["calib_mode"] == "per_frame"
    for bad, what in ((["--noise", "0.01"], "--ideal"), (["--ideal", "--snr", "20"], "--snr")):
        with pytest.raises(UsageError, match=what):
            files.simulation_plan(parser.parse_args(["simulate", "-o", "x.h5", *bad]))


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


# ----------------------------------------------------------------------------------------------
# realistic mode
# ----------------------------------------------------------------------------------------------

def _fingerprint(sim):
    """A scan's sampling (exact: a hash of its lines' frame, kz, ky and calibration flags) and its
    data and noise scan (the norm, the sums of the real and imaginary parts, and 6 samples spread
    over the array, real then imaginary): compared with a tolerance, as float rounding differs
    between CPU kinds (an AMD EPYC and an Intel Xeon give different bytes)."""
    import hashlib
    lines = sim.scan.lines
    h = hashlib.sha256()
    for a in (lines.frame, lines.kz, lines.ky, lines.calib):
        h.update(np.ascontiguousarray(a).tobytes())
    values = []
    for a in (lines.data, sim.scan.noise):
        a = np.asarray(a).ravel()
        pick = a[np.linspace(0, a.size - 1, 6).astype(int)]
        values.append([np.linalg.norm(a), a.real.sum(), a.imag.sum(), *pick.real, *pick.imag])
    return h.hexdigest()[:16], values


def test_ideal_mode_unchanged():
    """mode 'ideal' (the default of simulate.simulate) gives the scans of the simulator before the
    realistic mode existed: the same sampling, and data and noise to float rounding (values
    recorded from that simulator's output)."""
    q = protocol.load("qalas")
    m = protocol.load("mrf").with_overrides(n_tr=40, epg_states=16)
    scans = {
        "qalas": simulate.simulate(q, matrix=(16, 16, 8), n_coils=3, accel=4, noise=0.005, seed=2),
        "qalas b1": simulate.simulate(q, matrix=(16, 16, 8), n_coils=3, accel=4, noise=0.005, seed=2,
                                      b1_mismatch=True, mode="ideal"),
        "mrf": simulate.simulate(m, matrix=(16, 16, 8), n_coils=2, accel=20, noise=0.01, seed=1,
                                 calib_mode="union"),
    }
    want = {
        "qalas": ("4f79669c1438e892",
            [1.054494, -3.482673, 3.571497, 0.0006234803, -0.0007061943, 0.001284153, 0.0005139071,
             0.0005166709, 0.0002746617, 0.0005488295, 0.001221303, -0.0003392418, -0.0002740752,
             -0.0007990001, 0.0002654459],
            [0.009972546, -0.01555591, 0.01942443, -0.0001898204, 0.0001038867, 0.0001536508, 8.408812e-05,
             -0.0001629566, -0.0003029098, -7.574668e-05, 0.0002285375, 1.016064e-05, 8.626652e-05,
             -0.0002439781, 0.0001271295]),
        "qalas b1": ("4f79669c1438e892",
            [1.042543, -3.749715, 3.814471, 0.0006278678, -0.0006725257, 0.001312836, 0.0004540396,
             0.0004769285, 0.0002400211, 0.0004431544, 0.001180499, -0.0003441923, -0.0003098004,
             -0.0009056155, 0.0001417486],
            [0.0104295, -0.0162687, 0.02031448, -0.0001985182, 0.0001086469, 0.0001606912, 8.794113e-05,
             -0.0001704234, -0.0003167895, -7.921748e-05, 0.0002390093, 1.062622e-05, 9.021935e-05,
             -0.0002551575, 0.0001329548]),
        "mrf": ("7230c9fa8bb1973a",
            [11.82769, 52.88354, -8.81219, -0.01064358, 0.01783723, -0.004626929, -0.03519961, 1.196406,
             -0.0814968, -0.007798099, -0.03562038, -0.006872716, 0.05119785, -0.405021, 0.003592744],
            [0.1834358, -0.3544922, 0.08612373, 0.001806254, -0.00260738, -0.002666223, -0.01295155,
             0.0009115814, -0.003132508, -0.005201963, 0.003266369, -0.0007018325, 0.002817461, 0.002980873,
             -0.004004394]),
    }
    for name, sim in scans.items():
        sampling, values = _fingerprint(sim)
        assert sampling == want[name][0], name
        for got, ref in zip(values, want[name][1:]):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * ref[0], err_msg=name)


def test_fine_grid_truth_is_the_pd_weighted_block_mean():
    from gadget_lorein.sim import phantom as ph
    fine = simulate.fine_phantom((16, 16, 8), seed=0)
    assert fine.shape == (16, 32, 32) and fine.fov_mm == pytest.approx(ph.default_fov_mm((16, 16, 8)))
    b1 = fine.b1[fine.labels > 0]
    assert 0.85 < b1.min() < 0.95 and 1.05 < b1.max() < 1.15          # about +-12 %
    coarse, pure = ph.block_average(fine, 2)
    assert coarse.shape == (8, 16, 16) and pure.shape == (8, 16, 16) and pure.dtype == bool
    rng = np.random.default_rng(0)
    inside = np.argwhere(coarse.labels > 0)
    for z, y, x in inside[rng.choice(len(inside), 40, replace=False)]:
        blk = (slice(2 * z, 2 * z + 2), slice(2 * y, 2 * y + 2), slice(2 * x, 2 * x + 2))
        pd = fine.pd[blk].astype(np.float64)
        for name in ("t1", "t2", "b1"):
            want = (getattr(fine, name)[blk] * pd).sum() / pd.sum()
            assert getattr(coarse, name)[z, y, x] == pytest.approx(want, rel=1e-5), name
        assert coarse.pd[z, y, x] == pytest.approx(pd.mean(), rel=1e-5)
        lab = fine.labels[blk].ravel()
        assert np.sum(lab == coarse.labels[z, y, x]) == np.bincount(lab).max()
        assert pure[z, y, x] == (len(set(lab.tolist())) == 1)


def test_pure_true_inside_tissue_false_at_boundaries():
    from gadget_lorein.sim import phantom as ph
    coarse, pure = ph.block_average(simulate.fine_phantom((32, 32, 24), seed=1), 2)
    lab = coarse.labels
    same = np.ones(lab.shape, bool)          # all 26 neighbours carry the voxel's label
    for d in np.ndindex(3, 3, 3):
        same &= np.roll(lab, tuple(np.array(d) - 1), (0, 1, 2)) == lab
    wm_interior = same & (lab == ph.WM)
    assert wm_interior.sum() > 50 and pure[wm_interior].mean() > 0.95
    edge = (lab > 0) & ~same
    assert edge.sum() > 50 and pure[edge].mean() < 0.7
    skull = (lab > 0) & (np.roll(lab, 1, 2) == 0)     # the brain's outer surface along x
    assert pure[skull].mean() < 0.5


def test_crop_keeps_intensities():
    """The central k-space of a fine grid, scaled: a uniform object keeps its value; a smooth one
    gives about the mean of each FINE^3 block (the truth), not one fine voxel's value."""
    import torch

    from gadget_lorein.fft import fftnc, ifftnc
    from gadget_lorein.sim.phantom import _blocks
    for shape in ((8, 10, 12), (7, 9, 11)):
        fine_shape = tuple(2 * n for n in shape)
        img = ifftnc(simulate._crop_kspace(fftnc(torch.full(fine_shape, 3.0 + 0j)), shape))
        np.testing.assert_allclose(img.numpy(), 3.0, atol=1e-5)
        z, y, x = np.meshgrid(*[np.arange(n) - n / 2 for n in fine_shape], indexing="ij")
        g = np.exp(-((x - 1.3) ** 2 + (y + 0.7) ** 2 + z ** 2) / 36.0).astype(np.float32)
        img = ifftnc(simulate._crop_kspace(fftnc(torch.from_numpy(g).to(torch.complex64)), shape))
        blk = _blocks(g, 2).mean(-1)
        assert np.abs(img.numpy() - blk).max() < 0.03 * blk.max()


def test_interpolated_fine_signals_match_the_model(tmp_path):
    _, proto = small_mrf_yaml(tmp_path, n_tr=30)
    fine = simulate.fine_phantom((16, 16, 8), seed=0)
    _, exact = simulate._fine_signals(proto, fine, interpolate=False)
    _, interp = simulate._fine_signals(proto, fine, interpolate=True)
    err = (interp - exact).abs().amax(1) / exact.abs().amax(1)
    assert float(err.max()) < 5e-3


@pytest.mark.parametrize("seq,accel,pattern", [("qalas", 8, None), ("qalas", 8, "per_frame"),
                                               ("mrf", 60, None)])
def test_realistic_sampling_calibrates_every_frame(tmp_path, seq, accel, pattern):
    proto = protocol.load("qalas") if seq == "qalas" else small_mrf_yaml(tmp_path, n_tr=100)[1]
    ny, nz = 24, 16
    mask, calib, mode, pat = simulate.scan_masks(proto, ny, nz, accel, pattern=pattern,
                                                 mode="realistic")
    assert sampling.acceleration(mask) == pytest.approx(accel, rel=0.02)
    assert mask[:, nz // 2, ny // 2].all()                          # the centre, every frame
    region = sampling.calib_region(ny, nz, calib)
    if seq == "qalas":
        assert mode == "per_frame" and pat == (pattern or "per_frame") and region.sum() >= 16
        assert mask[:, region].all()                                # the whole block, every frame
        assert (pat == "shared") == bool((mask == mask[:1]).all())
    else:
        assert mode == "union" and pat == "per_frame" and mask[:, region].any(0).all()
    sim = simulate.simulate(proto, matrix=(16, ny, nz), n_coils=2, accel=accel, seed=0,
                            mode="realistic", pattern=pattern, snr=30)
    lines = sim.scan.lines
    got = np.zeros_like(mask)
    got[lines.frame, lines.kz, lines.ky] = True
    np.testing.assert_array_equal(got, mask)
    assert np.array_equal(lines.calib, region[lines.kz, lines.ky])


def test_realistic_white_matter_snr():
    """Fully sampled, coil-combined (optimal combination after whitening with the noise scan's
    covariance): white matter's SNR in the brightest contrast is the snr asked for."""
    import torch

    from gadget_lorein.recon import calibration
    from gadget_lorein.sim import phantom as ph
    from gadget_lorein.fft import ifftnc
    proto, snr = protocol.load("qalas"), 20.0
    kw = dict(matrix=(24, 24, 16), n_coils=4, accel=1, seed=0, mode="realistic")
    noisy = simulate.simulate(proto, snr=snr, **kw)
    clean = simulate.simulate(proto, snr=None, **kw)
    assert clean.noise_sigma == 0 and noisy.noise_sigma > 0
    w = calibration.whitening_matrix(noisy.scan.noise)

    def images(sim, data):
        lines = sim.scan.lines
        k = np.zeros((lines.n_coils, lines.n_frames, lines.nz, lines.ny, data.shape[-1]), np.complex64)
        k[:, lines.frame, lines.kz, lines.ky, :] = np.moveaxis(data, 0, 1)
        return np.einsum("dc,c...->d...", w, ifftnc(torch.from_numpy(k)).numpy())

    y0 = images(clean, clean.scan.lines.data)
    n = images(noisy, noisy.scan.lines.data - clean.scan.lines.data)
    truth = noisy.truth()
    wm = (truth["labels"] == ph.WM) & truth["pure"]
    assert wm.sum() > 300
    mag = np.sqrt((np.abs(y0) ** 2).sum(0))                     # = the optimal combination's |.|
    t = int(np.argmax([mag[f][wm].mean() for f in range(mag.shape[0])]))
    s_hat = y0[:, t][:, wm] / mag[t][wm]
    proj = (np.conj(s_hat) * n[:, t][:, wm]).sum(0)             # the combination's noise
    sd = np.sqrt(np.mean(np.abs(proj) ** 2) / 2)                # per real / imaginary part
    measured = mag[t][wm].mean() / sd
    assert measured == pytest.approx(snr, rel=0.15), measured


def test_realistic_truth_file_has_pure(tmp_path):
    _, truth = run_simulate(tmp_path, "--matrix", 16, 16, 8, "--coils", 2, "--accel", 4)
    t = files.load_truth(truth)
    assert t["pure"].dtype == bool and t["pure"].shape == t["T1"].shape
    assert 0.05 < t["pure"][t["labels"] > 0].mean() < 1.0        # large voxels: mostly mixed
    _, truth = run_simulate(tmp_path, "--ideal", "--matrix", 16, 16, 8, "--coils", 2, "--accel", 4,
                            name="ideal")
    assert "pure" not in files.load_truth(truth)                  # ideal (and older) files: absent
