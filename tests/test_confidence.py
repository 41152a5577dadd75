"""Confidence maps (recon/confidence.py): the Cramér-Rao bound against the actual error of a
simulated scan, its scaling, and its cost."""
import time

import numpy as np
import pytest
from scipy.stats import spearmanr

from gadget_lorein.physics import protocol
from gadget_lorein.recon import confidence
from gadget_lorein.recon import pipeline as recon
from gadget_lorein.sim import simulate

# a random map's Spearman correlation with the error is 0 +- 1/sqrt(n) (n ~ 3000 brain voxels
# here, so |rho| < 0.06 at 3 SD); a map that ranks voxels by their error must be well above it
MIN_SPEARMAN = 0.3


def _scan(accel, method):
    proto = protocol.load("qalas")
    sim = simulate.simulate(proto, matrix=(24, 24, 16), n_coils=6, accel=accel, noise=0.02, seed=0)
    res = recon.reconstruct(sim.scan, recon.ReconSettings(method=method, device="cpu"))
    return proto, sim.truth(), res, confidence.confidence_maps(proto, res.maps, res.support, res.noise)


@pytest.fixture(scope="module")
def full():
    return _scan(1.0, "zerofill")        # fully sampled, per-voxel matching: the bound's own case


def test_the_bound_is_the_error_of_per_voxel_matching_on_a_fully_sampled_scan(full):
    _, truth, res, conf = full
    for label in (1, 2):                  # WM, GM (CSF's T2 sits at the dictionary's edge)
        m = truth["labels"] == label
        for k in ("T1", "T2"):
            err = (res.maps.as_dict()[k] - truth[k])[m]
            ratio = np.sqrt(np.mean(err ** 2)) / np.sqrt(np.mean(conf[f"{k}_SD"][m] ** 2))
            print(f"label {label} {k}: measured error / bound {ratio:.3f}")
            assert 0.8 < ratio < 1.25, (label, k, ratio)


@pytest.mark.parametrize("case", ["full", "undersampled"])
def test_the_bound_ranks_voxels_by_their_error(full, case):
    _, truth, res, conf = full if case == "full" else _scan(8.0, "cg")
    brain = truth["labels"] > 0
    rng = np.random.default_rng(0)
    for k in ("T1", "T2"):
        sd, err = conf[f"{k}_SD"][brain], np.abs(res.maps.as_dict()[k] - truth[k])[brain]
        rho = spearmanr(sd, err).statistic
        rho_random = spearmanr(rng.permutation(sd), err).statistic
        print(f"{case} {k}: Spearman {rho:.3f}, shuffled {rho_random:.3f}")
        assert rho > MIN_SPEARMAN and abs(rho_random) < MIN_SPEARMAN / 3


def test_the_bound_scales_with_noise_sampling_and_pd():
    proto = protocol.load("qalas")
    t1, t2 = np.array([800.0, 1300.0, 4000.0]), np.array([80.0, 110.0, 1500.0])
    b1, pd, w = np.ones(3), np.full(3, 10.0), np.ones(3)
    f = np.full(proto.n_frames, 0.25)
    ref = confidence.fisher_sd(proto, t1, t2, b1, pd, w, f)
    for k, scale, kw in (("noise", 2.0, dict(noise_var=4.0)), ("pd", 0.5, dict(pd=2 * pd)),
                         ("sampling", np.sqrt(2), dict(frame_fraction=f / 2)),
                         ("coils", 0.5, dict(weight=4 * w))):
        args = {**dict(t1=t1, t2=t2, b1=b1, pd=pd, weight=w, frame_fraction=f), **kw}
        got = confidence.fisher_sd(proto, **args)
        for name in ("T1", "T2"):
            np.testing.assert_allclose(got[name], scale * ref[name], rtol=1e-6, err_msg=k)
    # longer T1 is harder to pin down with the same number of frames
    assert ref["T1"][2] / t1[2] > ref["T1"][0] / t1[0]


def test_undetermined_voxels_are_marked_and_the_bound_is_cheap():
    proto = protocol.load("qalas")
    shape = (24, 32, 40)                       # 40 x 32 x 24
    rng = np.random.default_rng(1)
    maps = dict(T1=rng.uniform(600, 2000, shape).astype(np.float32),
                T2=rng.uniform(50, 150, shape).astype(np.float32),
                PD=rng.uniform(0.5, 1.0, shape).astype(np.float32))
    maps["PD"][0] = 1e-4                       # no signal: nothing determined there
    support = np.ones(shape, bool)
    support[-1] = False
    noise = confidence.NoiseModel(np.ones(shape), np.full(proto.n_frames, 1 / 8), 1.0, 3000.0)
    t = time.perf_counter()
    conf = confidence.confidence_maps(proto, maps, support, noise, max_rel_sd=0.5)
    seconds = time.perf_counter() - t
    print(f"confidence maps of {np.prod(shape)} voxels: {seconds:.2f} s")
    assert seconds < 3.0
    assert sorted(conf) == ["T1_SD", "T2_SD", "UNDETERMINED"]
    assert np.all(conf["UNDETERMINED"][0] == 1) and np.all(conf["T1_SD"][0] > 0.5 * maps["T1"][0])
    assert conf["UNDETERMINED"][1:-1].mean() < 0.05
    assert np.all(conf["T1_SD"][-1] == 0) and np.all(conf["UNDETERMINED"][-1] == 0)


def test_mrf_gives_a_b1_bound_and_the_subspace_bound_is_close_to_the_models():
    from gadget_lorein.physics.subspace import build_subspace
    proto = protocol.load("mrf")
    assert proto.encodes_b1
    args = (np.array([800.0, 1300.0]), np.array([80.0, 110.0]), np.array([1.0, 0.9]),
            np.full(2, 10.0), np.ones(2), np.full(proto.n_frames, 1 / 200))
    exact = confidence.fisher_sd(proto, *args)
    table = confidence.fisher_sd(proto, *args, subspace=build_subspace(proto))
    assert sorted(exact) == sorted(table) == ["B1", "T1", "T2"]
    for k in exact:
        assert np.all(np.isfinite(exact[k]) & (exact[k] > 0))
        ratio = table[k] / exact[k]
        print(k, ratio)
        # the subspace's bound is the higher one (the fit cannot use what leaves the subspace)
        assert np.all((ratio > 0.97) & (ratio < {"T1": 1.1, "T2": 1.5, "B1": 2.0}[k])), (k, ratio)


def test_without_a_noise_scan_the_noise_comes_from_the_readout_edges():
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(500, 4, 64)) + 1j * rng.normal(size=(500, 4, 64))) * np.sqrt(0.5) * 3
    data[..., 24:40] += 100                    # the object's signal sits in the centre
    assert confidence.noise_variance_from_lines(data) == pytest.approx(9.0, rel=0.05)
