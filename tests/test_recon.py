"""The reconstruction path: settings, device fallback, and LoREIN against the baselines."""
from unittest import mock

import numpy as np
import pytest
import torch

from gadget_lorein import metrics, protocol, recon, simulate


@pytest.fixture(scope="module")
def tiny():
    return simulate.simulate(protocol.load("qalas"), matrix=(16, 16, 12), n_coils=4, accel=2,
                             noise=0.01, seed=0)


def test_settings_empty_value_means_default_and_bad_values_are_named():
    s = recon.ReconSettings.from_mapping({"energy": "", "iterations": "7", "unknown": "x"})
    assert s.energy == 0.999 and s.iterations == 7
    with pytest.raises(recon.ReconError, match="iterations='abc'"):
        recon.ReconSettings.from_mapping({"iterations": "abc"})
    with pytest.raises(recon.ReconError, match="unknown method 'foo'"):
        recon.ReconSettings.from_mapping({"method": "foo"})


def test_out_of_gpu_memory_falls_back_to_cpu(tiny, caplog):
    orig = recon._reconstruct

    def fake(scan, settings, progress=None):
        if settings.device != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40 GiB")
        return orig(scan, settings, progress)

    with mock.patch.object(recon, "_reconstruct", fake), \
            mock.patch.object(recon, "resolve_device",
                              lambda n: torch.device("cpu" if n == "cpu" else "cuda")):
        res = recon.reconstruct(tiny.scan, recon.ReconSettings(method="cg", device="cuda"))
    assert res.info["fallback"].startswith("cpu")
    assert "falling back to the CPU" in caplog.text


def test_nan_in_data_is_refused(tiny):
    lines = tiny.scan.lines
    bad = simulate.Scan(simulate.KSpaceLines(lines.data.copy(), lines.frame, lines.kz, lines.ky,
                                             lines.calib, lines.n_frames, lines.nz, lines.ny),
                        tiny.scan.noise, tiny.scan.protocol_yaml, "qalas", tiny.scan.fov_mm)
    bad.lines.data[3, 0, 0] = np.nan
    with pytest.raises(recon.ReconError, match="NaN"):
        recon.reconstruct(bad, recon.ReconSettings(method="cg"))


def test_cpu_fit_is_deterministic(tiny):
    a = recon.reconstruct(tiny.scan, recon.ReconSettings(method="lorein", iterations=5))
    b = recon.reconstruct(tiny.scan, recon.ReconSettings(method="lorein", iterations=5))
    for k in a.maps:
        np.testing.assert_array_equal(a.maps[k], b.maps[k])


def test_coil_compression_keeps_the_maps(tiny):
    full = recon.reconstruct(tiny.scan, recon.ReconSettings(method="cg"))
    cc = recon.reconstruct(tiny.scan, recon.ReconSettings(method="cg", virtual_coils=3))
    assert cc.info["coils"] == 3 and full.info["coils"] == 4
    truth = tiny.truth()
    e_full, e_cc = metrics.map_errors(full.maps, truth), metrics.map_errors(cc.maps, truth)
    assert all(np.isfinite(cc.maps[k]).all() for k in cc.maps)
    assert e_cc["T1"] < e_full["T1"] + 0.1, (e_full, e_cc)
    with pytest.raises(recon.ReconError, match="virtual_coils=9"):
        recon.reconstruct(tiny.scan, recon.ReconSettings(method="cg", virtual_coils=9))
