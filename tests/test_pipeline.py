"""recon/pipeline.py, the reconstruction path: settings, device fallback, the typed maps it returns,
and LoREIN against the baselines."""
import math
from unittest import mock

import numpy as np
import pytest
import torch

from gadget_lorein import metrics

from gadget_lorein.physics import protocol

from gadget_lorein.recon import pipeline as recon

from gadget_lorein.sim import simulate


@pytest.fixture(scope="module")
def tiny():
    return simulate.simulate(protocol.load("qalas"), matrix=(16, 16, 12), n_coils=4, accel=2,
                             noise=0.01, seed=0)


def test_settings_empty_value_means_default_and_bad_values_are_named():
    s = recon.ReconSettings.from_mapping({"energy": "", "iterations": "7", "unknown": "x"})
    assert s.energy == 0.999 and s.iterations == 7
    with pytest.raises(ValueError, match="iterations=abc is not an integer"):
        recon.ReconSettings.from_mapping({"iterations": "abc"})
    with pytest.raises(ValueError, match="method=foo must be one of"):
        recon.ReconSettings.from_mapping({"method": "foo"})


def test_network_settings_reach_the_fit(tiny):
    """The ReconSettings named in settings.FIT_NAMES are lorein.FitConfig's fields with the same
    defaults, and the hash-grid / MLP settings build the networks the fit uses."""
    from gadget_lorein.recon.lorein import fit as lorein, model
    assert recon.fit_config(recon.ReconSettings()) == lorein.FitConfig()
    rs = recon.ReconSettings(method="pmr", couple_weight=0.5, grid_levels=6, grid_features=4,
                             grid_log2_table=11, grid_base=2, grid_finest=10, mlp_width=16, mlp_layers=1)
    cfg = recon.fit_config(rs)
    assert (cfg.couple_weight, cfg.grid_levels) == (0.5, 6)
    grid = model.grid_config(torch.ones((12, 16, 16), dtype=torch.bool), cfg)
    assert (grid.levels, grid.features, grid.log2_table, grid.base_resolution, grid.finest_resolution,
            grid.hidden, grid.hidden_layers) == (6, 4, 11, 2, 10, 16, 1)
    auto = model.grid_config(torch.ones((12, 16, 16), dtype=torch.bool), lorein.FitConfig())
    assert (auto.finest_resolution, auto.log2_table) == (16, 13)      # the matrix; 3072 voxels -> 2^13
    built = []
    real = model.CoordinateNet

    def spy(out_dim, cfg=None, seed=0):
        built.append(cfg)
        return real(out_dim, cfg, seed)
    with mock.patch.object(model, "CoordinateNet", spy):
        res = recon.reconstruct(tiny.scan, replace_settings(rs, iterations=3))
    assert res.info["iterations"] == 3 and built and all(c == grid for c in built), built


def replace_settings(rs, **kw):
    from dataclasses import replace
    return replace(rs, **kw)


def test_out_of_gpu_memory_halves_the_coil_batch_before_the_cpu(tiny, caplog):
    """4 coils: batches of 2, then 1, then the CPU; a batch that fits ends the descent there."""
    from dataclasses import replace
    orig, tried = recon._reconstruct, []

    def fake(scan, settings, progress=None, fits_at=None, **kw):
        tried.append((settings.device, settings.coil_batch))
        if settings.device != "cpu" and settings.coil_batch != fits_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40 GiB")
        return orig(scan, replace(settings, device="cpu"), progress)

    with mock.patch.object(recon, "resolve_device",
                           lambda n: torch.device("cpu" if n == "cpu" else "cuda")):
        with mock.patch.object(recon, "_reconstruct", fake):
            res = recon.reconstruct(tiny.scan, recon.ReconSettings(method="cg", device="cuda"))
        assert tried == [("cuda", 0), ("cuda", 2), ("cuda", 1), ("cpu", 0)]
        assert res.info["fallback"].endswith("cpu after CUDA out of memory")
        assert "retrying with 2 coils per batch instead of 4" in caplog.text
        assert "even one coil at a time; falling back to the CPU" in caplog.text
        tried.clear()
        with mock.patch.object(recon, "_reconstruct", lambda s, st, p=None, **kw: fake(s, st, p, fits_at=2)):
            res = recon.reconstruct(tiny.scan, recon.ReconSettings(method="cg", device="cuda"))
        assert tried == [("cuda", 0), ("cuda", 2)]
        assert res.info["fallback"] == "coil_batch 2 after CUDA out of memory"


def test_coil_batches_give_the_same_fit(tiny):
    """The operator's coil batching changes memory, not results: the data term, its gradient in X
    and in the coil maps agree to float rounding, and so does a short fit, but for the odd voxel
    whose map sits where a bounded output saturates. (There the rounding of the other summation
    order grows over the steps: on an AVX-512 machine one of 3072 voxels, T1 103.0 vs 103.6 ms at
    the range's lower end, after 5 steps; with the default held-out lines, 7 of 3072 voxels' T2,
    by up to 0.8 %, after 5 steps on that machine, 0 with every line fitted: Adam's first steps
    are nearly sign steps, so where a gradient element is near zero the rounding can flip one.
    Maps matched to the dictionary, a short series' output, can then move to the neighbouring
    dictionary entry: one of 1536 voxels' T1 by 1.1 % of the largest T1 on an AMD EPYC, 22 of
    3072 voxels' T2, by up to 3.0 % of the largest T2, on an Intel Xeon.)"""
    _, _, op, _, _ = recon.prepare(tiny.scan, recon.ReconSettings(method="lorein"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((op.K,) + op.shape, generator=g, dtype=torch.complex64)
    whole = op.loss_and_grad(x, maps_grad=True)
    op.coil_batch = 1
    batched = op.loss_and_grad(x, maps_grad=True)
    for u, v in zip(whole, batched):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-5 * float(u.abs().max()))
    a = recon.reconstruct(tiny.scan, recon.ReconSettings(method="lorein", iterations=5))
    b = recon.reconstruct(tiny.scan, recon.ReconSettings(method="lorein", iterations=5, coil_batch=1))
    for k, u in a.maps.as_dict().items():
        v = b.maps.as_dict()[k]
        close = np.isclose(u, v, rtol=1e-3, atol=1e-3 * np.abs(u).max())
        worst = np.max(np.abs(u - v)) / np.abs(u).max()
        assert close.mean() > 0.99 and worst < 0.05, (k, close.mean(), worst)


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
    for u, v in zip(a.maps.as_dict().values(), b.maps.as_dict().values()):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a.maps.mask, b.maps.mask)


def test_coil_compression_keeps_the_maps(tiny):
    full = recon.reconstruct(tiny.scan, recon.ReconSettings(method="cg"))
    cc = recon.reconstruct(tiny.scan, recon.ReconSettings(method="cg", virtual_coils=3))
    assert cc.info["coils"] == 3 and full.info["coils"] == 4
    truth = tiny.truth()
    e_full, e_cc = metrics.map_errors(full.maps, truth), metrics.map_errors(cc.maps, truth)
    assert all(np.isfinite(v).all() for v in cc.maps.as_dict().values())
    assert e_cc["T1"] < e_full["T1"] + 0.1, (e_full, e_cc)
    with pytest.raises(recon.ReconError, match="virtual_coils=9"):
        recon.reconstruct(tiny.scan, recon.ReconSettings(method="cg", virtual_coils=9))


def test_a_coil_subset_gives_an_unbiased_data_term(tiny):
    """Averaged over every subset of 2 of the 4 coils, the scaled estimates are the full loss and
    gradient (each coil is in half of the subsets, each scaled by 4 / 2)."""
    from itertools import combinations
    _, _, op, _, _ = recon.prepare(tiny.scan, recon.ReconSettings(device="cpu"))
    x = torch.randn((op.K,) + op.shape, generator=torch.Generator().manual_seed(0), dtype=torch.complex64)
    loss, grad = op.loss_and_grad(x)
    subsets = [torch.tensor(c) for c in combinations(range(4), 2)]
    est = [op.loss_and_grad(x, c) for c in subsets]
    torch.testing.assert_close(sum(e[0] for e in est) / len(est), loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(sum(e[1] for e in est) / len(est), grad, rtol=1e-4, atol=1e-4 * grad.abs().max())
    assert not torch.allclose(est[0][1], grad, rtol=1e-2)          # one subset alone is not the full term


def test_speed_switches_keep_the_maps(tiny):
    """coil_subset and amp (both off by default) run the whole fit, seeded, and stay near the
    default fit's accuracy; a subset's noisy loss does not stop the fit early. Seen here (brain
    T1/T2/PD, 2 threads): default .482/.662/.277, coil_subset=2 of 4 .569/.824/.295 (half the coils
    of a 4-coil scan: the hardest case; at 16 coils on an H200, 8 of 16 cost about .01,
    RESULTS.md). The subset's cost here depends on the seed (its draws): over seeds 0-3 its T2 was
    -0.04 to +0.23 from the default's (and +0.00 to +0.18 before the coil maps were normalised
    before whitening), hence the 0.25 margin."""
    truth = tiny.truth()
    base = recon.reconstruct(tiny.scan, recon.ReconSettings(method="lorein", iterations=60))
    e_base = metrics.map_errors(base.maps, truth)
    for kw in (dict(coil_subset=2), dict(amp=True)):
        a = recon.reconstruct(tiny.scan, recon.ReconSettings(method="lorein", iterations=60, **kw))
        b = recon.reconstruct(tiny.scan, recon.ReconSettings(method="lorein", iterations=60, **kw))
        e = metrics.map_errors(a.maps, truth)
        assert a.info["iterations"] == 60, (kw, a.info["iterations"])
        for k, u, v in (("T1", a.maps.t1, b.maps.t1), ("T2", a.maps.t2, b.maps.t2),
                        ("PD", a.maps.pd, b.maps.pd)):
            np.testing.assert_array_equal(u, v)
            assert e[k] < e_base[k] + 0.25, (kw, k, e, e_base)


def test_the_data_term_gradient_in_the_coil_maps_is_exact(tiny):
    """The loss is quadratic in the sensitivities, so a central difference is exact: it must match
    the closed-form gradient (the one the joint coil refinement descends), in batches too."""
    _, _, op, _, _ = recon.prepare(tiny.scan, recon.ReconSettings(device="cpu"))
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn((op.K,) + op.shape, generator=g, dtype=torch.complex64)
    d = torch.randn(op.maps.shape, generator=g, dtype=torch.complex64)
    op.y_norm2 = 0.0       # a constant of the loss; without it float32 resolves the difference better
    for batch in (0, 3):
        op.coil_batch = batch
        maps = op.maps.clone().requires_grad_(True)
        op.data_loss(x, maps=maps).backward()
        with torch.no_grad():
            numeric = float(op.data_loss(x, maps=maps + d) - op.data_loss(x, maps=maps - d)) / 2
        analytic = float((maps.grad.conj() * d).real.sum())
        assert analytic == pytest.approx(numeric, rel=1e-3), (batch, analytic, numeric)
    op.coil_batch = 0


def test_detached_coil_maps_give_the_same_data_term_and_gradient_in_x(tiny):
    """Maps passed without a gradient (LoREIN's LRR data term) skip the coil-map gradient but give
    the same loss and gradient in X as maps that carry one."""
    _, _, op, _, _ = recon.prepare(tiny.scan, recon.ReconSettings(device="cpu"))
    g = torch.Generator().manual_seed(0)
    x0 = 0.1 * torch.randn((op.K,) + op.shape, generator=g, dtype=torch.complex64)
    out = []
    for wants in (True, False):
        x = x0.clone().requires_grad_(True)
        maps = op.maps.clone().requires_grad_(wants)
        loss = op.data_loss(x, maps=maps)
        loss.backward()
        out.append((loss.detach(), x.grad, maps.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert out[0][2] is not None and out[1][2] is None


def test_coil_refinement_starts_at_the_maps_and_moves_no_common_profile():
    from gadget_lorein.recon.lorein.model import CoilRefinement
    g = torch.Generator().manual_seed(1)
    s0 = torch.randn((4, 8, 10, 12), generator=g, dtype=torch.complex64)
    ref = CoilRefinement(s0, 4)
    assert torch.equal(ref(), s0)
    with torch.no_grad():
        for p in ref.coef:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.complex64))
        s = ref()
    along = (s0.conj() * (s - s0)).sum(0)            # the change's component along S0, per voxel
    assert float(along.abs().max()) < 1e-4 * float((s - s0).abs().max())
    assert float((s - s0).abs().max()) > 0.1


def test_coil_maps_keep_pd_free_of_the_noise_covariance():
    """After prewhitening with a correlated noise covariance, the maps are W S with S normalised in
    the coils' own space: the image they give is PD x signal, not PD x sqrt(S^H Psi^-1 S). Measured
    here through the PD of the zero-filled reconstruction at R=1 against the truth."""
    sim = simulate.simulate(protocol.load("qalas"), matrix=(24, 24, 16), n_coils=6, accel=1,
                            noise=0.002, seed=0)
    truth = sim.truth()
    res = recon.reconstruct(sim.scan, recon.ReconSettings(method="zerofill"))
    err = metrics.map_errors(res.maps, truth, "tissue")["PD"]
    # maps normalised after whitening (the profile sqrt(S^H Psi^-1 S) in PD) gave 0.117 here
    assert err < 0.04, f"tissue PD NRMSE {err:.3f}"


def test_the_fit_uses_the_configured_adam_settings(tiny):
    """adam_eps / adam_beta2 reach the optimiser (lorein.py's docstring: why the defaults)."""
    from gadget_lorein.recon.lorein import fit as lorein
    seen = []
    real = torch.optim.Adam

    def spy(*args, **kw):
        seen.append(kw)
        return real(*args, **kw)
    with mock.patch.object(torch.optim, "Adam", spy):
        _, sub, op, support, _ = recon.prepare(tiny.scan, recon.ReconSettings(method="pmr"))
        lorein.fit("pmr", op, sub, support, False, iterations=2,
                   config=lorein.FitConfig(adam_eps=1e-12, adam_beta2=0.99))
    assert seen and seen[0]["eps"] == 1e-12 and seen[0]["betas"] == (0.9, 0.99)
    assert (lorein.FitConfig().adam_eps, lorein.FitConfig().adam_beta2) == (1e-8, 0.999)


def test_held_out_lines_loss_is_the_data_term_on_those_lines(tiny):
    """HeldOutLines predicts each held-out line directly; its loss is ||A_h X - y_h||^2, the same
    as a SubspaceOperator built from those lines alone (which goes through the Gram instead)."""
    from gadget_lorein.recon.operators import HeldOutLines, SubspaceOperator
    _, sub, op, _, _ = recon.prepare(tiny.scan, recon.ReconSettings(device="cpu"))
    fitted, held = recon.split_lines(tiny.scan.lines, 0.1, seed=0)
    assert len(fitted.frame) + len(held.frame) == len(tiny.scan.lines.frame)
    assert len(held.frame) == round(0.1 * len(tiny.scan.lines.frame))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((sub.rank,) + op.shape, generator=g, dtype=torch.complex64)
    direct = HeldOutLines(held, sub.basis).loss(x, op.maps)
    batched = HeldOutLines(held, sub.basis, coil_batch=3).loss(x, op.maps)
    via_gram = float(SubspaceOperator(held, sub.basis, op.maps).loss_and_grad(x)[0])
    assert direct == pytest.approx(via_gram, rel=1e-4) and batched == pytest.approx(direct, rel=1e-5)
    with pytest.raises(recon.ReconError, match="holdout=0.7"):
        recon.split_lines(tiny.scan.lines, 0.7)
    few = tiny.scan.lines.select(np.arange(9))          # 0.05 of 9 lines rounds to none
    fitted, held = recon.split_lines(few, 0.05)
    assert fitted is few and held is None


def test_holdout_returns_the_maps_of_the_last_good_held_out_check(tiny):
    """With ``holdout`` the fit leaves those lines out of its data terms, checks their loss every
    ``holdout_every`` steps and returns the maps of the last check within ``holdout_tol`` of the
    lowest, stopping when none has been for ``holdout_patience`` steps."""
    from gadget_lorein.recon.lorein import fit as lorein
    rs = recon.ReconSettings(method="pmr", device="cpu", holdout=0.1)
    proto, sub, op, support, info = recon.prepare(tiny.scan, rs)
    assert op.held_out is not None and info["lines"] == len(tiny.scan.lines.frame)
    assert op.n_lines + op.held_out.n_lines == info["lines"]
    # on this easy case the held-out loss falls throughout; a scripted one, lowest at step 15 and
    # within 1 % of that at step 20, checks that the fit goes back to step 20 and stops 15 steps
    # (the patience) later
    scripted = iter([v * op.held_out.y_norm2 for v in (5.0, 4.0, 3.0, 1.0, 1.005, 2.0, 3.0, 4.0, 5.0)])
    real_loss = op.held_out.loss
    op.held_out.loss = lambda x, m: (real_loss(x, m), next(scripted))[1]
    seen = {}
    cfg = lorein.FitConfig(holdout_every=5, holdout_patience=15, holdout_tol=0.01)
    maps, fi = lorein.fit("pmr", op, sub, support, proto.encodes_b1, iterations=40, config=cfg,
                          monitor=lambda step, loss, m: seen.update({step: (loss, m["t1"].clone())}))
    assert sorted(seen) == [0, 5, 10, 15, 20, 25, 30, 35] and fi["iterations"] == 35
    assert fi["held_out_step"] == 20 and fi["held_out_steps"] == sorted(seen)
    assert fi["held_out_loss_pmr"][3] == 1.0 and "held_out_loss_lrr" not in fi
    assert torch.equal(maps["T1"][support], seen[20][1])
    assert not torch.equal(seen[35][1], seen[20][1]) and not torch.equal(seen[15][1], seen[20][1])
    plain = recon.reconstruct(tiny.scan, recon.ReconSettings(method="cg", holdout=0.1))
    assert "held_out_lines" not in plain.info          # linear methods use every line


def test_without_the_coupling_lorein_maps_are_pmr_maps(tiny):
    """The LRR block reaches LoREIN's maps only through the coupling: with the coupling weight at 0,
    lorein's maps taken from PMR (output pmr) are pmr's bit for bit (same seed), because PMR's data
    term alone fits the coil-map
    correction (``coil_from_lrr`` off). With the LRR data term fitting it too (the build before
    that change), they are not: at high R that shared correction, not the coupling, cost LoREIN
    brain T1 against PMR (lorein.py's docstring, Coil maps)."""
    from gadget_lorein.recon.lorein import fit as lorein
    proto, sub, op, support, _ = recon.prepare(tiny.scan, recon.ReconSettings(method="lorein", device="cpu"))
    fit = lambda method, **kw: lorein.fit(method, op, sub, support, proto.encodes_b1, iterations=10,  # noqa: E731
                                          config=lorein.FitConfig(couple_weight=0.0, output="pmr",
                                                                  t2_cap=math.inf, pv_reach=0.0, **kw))[0]
    pmr, joint, shared = fit("pmr"), fit("lorein"), fit("lorein", coil_from_lrr=True)
    for k in pmr:
        assert torch.equal(joint[k], pmr[k]), k
    assert not all(torch.equal(shared[k], pmr[k]) for k in pmr)


def test_series_defaults(tiny):
    """"auto" output and LLR weight follow the series length: a short series (qalas-type) takes the
    maps from the LRR block under the locally low-rank penalty, nudged by PMR's (test_output_bounds),
    a long one (MRF-type) from PMR with its T2 bounded by the LRR block's; auto gives exactly the
    explicit settings, and the penalty changes the maps."""
    from gadget_lorein.recon.lorein import fit as lorein
    short = dict(output="lrr", llr_weight=2.0, t2_cap=0.0, t2_cap_depth=0.05, pv_reach=0.15,
                 pv_margin=0.05, pv_margin_t2=0.05)
    assert lorein.series_defaults(5) == short
    assert lorein.series_defaults(lorein.SHORT_SERIES + 1) == dict(
        output="pmr", llr_weight=0.0, t2_cap=0.0, t2_cap_depth=math.inf, pv_reach=math.inf,
        pv_margin=0.4, pv_margin_t2=1.0)
    proto, sub, op, support, _ = recon.prepare(tiny.scan, recon.ReconSettings(method="lorein", device="cpu"))
    assert sub.basis.shape[0] <= lorein.SHORT_SERIES
    fit = lambda **kw: lorein.fit("lorein", op, sub, support, proto.encodes_b1, iterations=10,  # noqa: E731
                                  config=lorein.FitConfig(**kw))[0]
    auto, explicit = fit(), fit(**short)
    plain = fit(**dict(short, llr_weight=0.0))
    for k in auto:
        assert torch.equal(auto[k], explicit[k]), k
    assert not all(torch.equal(auto[k], plain[k]) for k in auto)
    bare = dict(t2_cap=math.inf, pv_reach=0.0)
    pmr, lrr = fit(output="pmr", **bare), fit(output="lrr", **bare)  # same fit
    blend = fit(output="blend")
    for k in ("T1", "PD"):
        assert torch.equal(blend[k], lrr[k]), k
    assert torch.allclose(blend["T2"], (lrr["T2"] * pmr["T2"]).sqrt(), rtol=1e-5)


def test_output_bounds(tiny):
    """Output pmr or lrr: that block's maps, bounded by the other block's, all from the same fit
    (``blocks`` receives both blocks' maps). T2 is at most exp(t2_cap) x the other's (0: the lower
    of the two; inf: off), lowered by at most exp(-t2_cap_depth); where the other's T1 is above
    exp(pv_margin) x this one's and its T2 above exp(pv_margin_t2) x, and a voxel of the 3x3x3
    neighbourhood has this block's T2 above pv_near_t2 (0: anywhere), both rise towards the
    other's by at most exp(pv_reach); PD is untouched. An unknown output is refused
    before fitting."""
    from scipy.ndimage import maximum_filter

    from gadget_lorein.recon.lorein import fit as lorein
    from gadget_lorein.recon.lorein.model import map_volumes
    proto, sub, op, support, _ = recon.prepare(tiny.scan, recon.ReconSettings(method="lorein", device="cpu"))
    # 30 steps: by 10 the two blocks have barely left their shared start inside the head
    fit = lambda **kw: lorein.fit("lorein", op, sub, support, proto.encodes_b1, iterations=30,  # noqa: E731
                                  config=lorein.FitConfig(**kw))[0]
    blocks: dict = {}
    lorein.fit("lorein", op, sub, support, proto.encodes_b1, iterations=30, blocks=blocks)
    own = {k: map_volumes(v, support, proto.encodes_b1) for k, v in blocks.items()}
    assert torch.equal(fit(output="pmr", t2_cap=math.inf, pv_reach=0.0)["T2"], own["pmr"]["T2"])
    for output, other in (("pmr", "lrr"), ("lrr", "pmr")):
        mine, theirs = own[output], {k: v.to(own[output][k].dtype) for k, v in own[other].items()}
        for margin, depth in ((0.0, math.inf), (0.3, math.inf), (0.0, 0.05)):
            capped = fit(output=output, t2_cap=margin, t2_cap_depth=depth, pv_reach=0.0)
            for k in capped:
                if k != "T2":
                    assert torch.equal(capped[k], mine[k]), (output, k)
            want = torch.minimum(mine["T2"], torch.maximum(theirs["T2"] * math.exp(margin),
                                                           mine["T2"] * math.exp(-depth)))
            assert torch.allclose(capped["T2"], want), (output, margin, depth)
        near_t2 = float(mine["T2"][support].quantile(0.9))   # this tiny phantom has little CSF
        near = torch.from_numpy(maximum_filter(mine["T2"].numpy(), size=3, mode="constant") > near_t2)
        for m1, m2, reach in ((0.1, 0.1, 0.15), (0.05, 0.2, math.inf)):
            higher = (theirs["T1"] > mine["T1"] * math.exp(m1)) & (theirs["T2"] > mine["T2"] * math.exp(m2))
            for gate, up in ((0.0, higher & support), (near_t2, higher & near & support)):
                raised = fit(output=output, t2_cap=math.inf, pv_reach=reach, pv_margin=m1, pv_margin_t2=m2,
                             pv_near_t2=gate)
                assert bool(up.any()) and bool((support & ~up).any()), (output, m2)
                for k in ("T1", "T2"):
                    want = torch.where(up, torch.minimum(theirs[k], mine[k] * math.exp(reach)), mine[k])
                    assert torch.allclose(raised[k][support], want[support]), (output, k, gate, m2)
                assert torch.equal(raised["PD"], mine["PD"])
            assert bool((higher & support & ~near).any()), (output, m2)   # the gate keeps some as they are
    t2 = own["pmr"]["T2"][support], own["lrr"]["T2"][support]
    assert bool((t2[0] > t2[1]).any()) and bool((t2[1] > t2[0]).any())    # the cap acts both ways
    with pytest.raises(ValueError, match="unknown output 'lrr2'"):
        fit(output="lrr2")


def test_lrr_finest_sets_lorein_lrr_grid_and_lrr_alone_keeps_the_full_grid(tiny):
    """lrr_finest sets only the finest level of lorein's LRR network; 0 (the default): PMR's own
    grid. The lrr method (maps from LRR alone) keeps the full grid whatever it is."""
    from gadget_lorein.recon.lorein import fit as lorein, model
    from gadget_lorein.recon.lorein.hashgrid import HashGridConfig
    grid = HashGridConfig(base_resolution=4, finest_resolution=64)
    assert model.lrr_grid_config(grid, lorein.FitConfig()) is grid
    assert model.lrr_grid_config(grid, lorein.FitConfig(lrr_finest=32)).finest_resolution == 32
    assert model.lrr_grid_config(grid, lorein.FitConfig(lrr_finest=2)).finest_resolution == 4
    assert model.lrr_grid_config(grid, lorein.FitConfig(lrr_finest=64)) is grid
    proto, sub, op, support, _ = recon.prepare(tiny.scan, recon.ReconSettings(method="lrr", device="cpu"))
    # 10 steps: after 5 the held-out lines still prefer the start, which is the same for both grids
    fit = lambda method, **kw: lorein.fit(method, op, sub, support, proto.encodes_b1, iterations=10,  # noqa: E731
                                          config=lorein.FitConfig(**kw))[0]
    a, b = fit("lrr"), fit("lrr", lrr_finest=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, d = fit("lorein"), fit("lorein", lrr_finest=4)
    assert not all(torch.equal(c[k], d[k]) for k in c)


def test_held_out_rule_goes_back_past_a_minimum_and_runs_on_along_a_plateau():
    """The rule on the two measured traces of benchmarks/RESULTS.md (mrf R = 400: lowest at step 180,
    2-6 % above from 200 on; qalas R = 8: flat within 0.5 % from step 460)."""
    from gadget_lorein.recon.lorein.fit import HeldOutRule
    rule = HeldOutRule(0.01, 200)
    mrf = [(160, .0089), (180, .008556), (200, .008736), (220, .008703), (240, .008799), (260, .008915),
           (280, .008733), (300, .009005), (320, .009067), (340, .008894), (360, .009060), (380, .009114)]
    verdicts = [rule.update(step, loss) for step, loss in mrf]
    assert verdicts[:2] == ["keep", "keep"] and verdicts[2:-1] == [None] * 9 and verdicts[-1] == "stop"
    assert rule.kept == 180
    rule = HeldOutRule(0.01, 200)
    plateau = [(440, .000874), (460, .000876), (480, .000872), (500, .000875), (700, .000871), (900, .000872)]
    assert [rule.update(s, v) for s, v in plateau] == ["keep"] * 6 and rule.kept == 900


def test_the_result_is_typed_maps_with_the_support_as_mask(tiny):
    """ReconResult.maps is a data.Maps: T1, T2, PD (B1 None for qalas, which does not encode it),
    zero outside the mask, which is the result's support; as_dict() names them as images do."""
    res = recon.reconstruct(tiny.scan, recon.ReconSettings(method="zerofill"))
    maps = res.maps
    assert isinstance(maps, recon.Maps) and maps.b1 is None
    assert res.support is maps.mask and maps.mask.dtype == bool and maps.mask.any()
    assert list(maps.as_dict()) == ["T1", "T2", "PD"]
    for v in (maps.t1, maps.t2, maps.pd):
        assert v.dtype == np.float32 and v.shape == maps.mask.shape and not v[~maps.mask].any()
    again = recon.Maps.from_dict(maps.as_dict(), maps.mask)
    assert again.as_dict().keys() == maps.as_dict().keys() and again.b1 is None


def test_ringing_islands_are_left_out_of_the_maps_and_small_objects_kept():
    """ringing_islands: a faint part of the support (side lobes, peak under 3x the threshold) is an
    island; the object and a small bright part are not. On a realistic scan the maps' mask is the
    fitted support less its islands, and T1 inside the mask is the same as with the islands kept."""
    low = np.zeros((16, 16, 16))
    low[4:12, 4:12, 4:12] = 1.0                     # the object
    low[1, 1, 1:3] = 0.15                           # a side lobe: above 0.08, peak under 0.24
    low[14, 14, 14] = 0.9                           # a one-voxel bright object
    support = low > 0.08
    islands = recon.ringing_islands(low, support, 0.08)
    assert islands.sum() == 2 and islands[1, 1, 1:3].all()
    assert not recon.ringing_islands(low, support, 0.0).any()         # no threshold: nothing faint
    assert not recon.ringing_islands(low, np.zeros_like(support), 0.08).any()

    sim = simulate.simulate(protocol.load("qalas"), matrix=[40, 32, 24], n_coils=6, accel=8, seed=0,
                            mode="realistic", snr=30)
    _, _, _, support, info = recon.prepare(sim.scan, recon.ReconSettings(method="zerofill"))
    support = support.cpu().numpy()
    res = recon.reconstruct(sim.scan, recon.ReconSettings(method="zerofill"))
    assert info["_islands"].any() and not (info["_islands"] & ~support).any()
    np.testing.assert_array_equal(res.maps.mask, support & ~info["_islands"])
    with mock.patch.object(recon, "ringing_islands", lambda low, s, t: np.zeros_like(s)):
        whole = recon.reconstruct(sim.scan, recon.ReconSettings(method="zerofill"))
    np.testing.assert_array_equal(whole.maps.mask, support)
    np.testing.assert_array_equal(res.maps.t1, np.where(res.maps.mask, whole.maps.t1, 0))
