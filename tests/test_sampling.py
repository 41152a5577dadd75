"""Undersampling masks: exact acceleration, calibration regions, randomness, error messages."""
import numpy as np
import pytest

from gadget_lorein.sim import sampling as sp


@pytest.mark.parametrize("n_frames,ny,nz,accel,mode", [
    (5, 64, 48, 48, "per_frame"),
    (5, 64, 48, 7.3, "per_frame"),
    (5, 64, 48, 2.0, "per_frame"),
    (400, 64, 48, 300, "union"),
    (37, 40, 30, 11.7, "union"),
    (3, 8, 8, 1.0, "per_frame"),
    (3, 8, 8, 1.0, "union"),
])
def test_acceleration_exact(n_frames, ny, nz, accel, mode):
    m = sp.sampling_masks(n_frames, ny, nz, accel, calib_mode=mode, seed=0)
    assert m.shape == (n_frames, nz, ny) and m.dtype == bool
    assert m.sum() == round(n_frames * ny * nz / accel)
    assert abs(sp.acceleration(m) / accel - 1) < 1.0 / m.sum() + 1e-12
    assert np.all(m.sum(axis=(1, 2)) >= 1)


def test_per_frame_calibration_full_in_every_frame():
    calib = (8, 6)
    m = sp.sampling_masks(7, 64, 48, 12, calib=calib, calib_mode="per_frame", seed=1)
    zs, ys = sp.calib_slices(64, 48, calib)
    assert (zs, ys) == (slice(21, 27), slice(28, 36))
    assert m[:, zs, ys].all()
    region = sp.calib_region(64, 48, calib)
    assert region.sum() == 48 and region[24, 32]
    extra = m.sum(axis=(1, 2)) - region.sum()
    assert extra.max() - extra.min() <= 1           # non-calibration budget spread evenly


def test_union_calibration_covered():
    calib = (12, 10)
    m = sp.sampling_masks(400, 64, 48, 300, calib=calib, calib_mode="union", seed=2)
    region = sp.calib_region(64, 48, calib)
    assert m.any(axis=0)[region].all()
    assert not m[:, region].all(axis=0).any()       # no point in every frame: it is split
    totals = m.sum(axis=(1, 2))
    assert totals.max() - totals.min() <= 1


def test_brief_targets_with_auto_calib():
    # R = 48 for a 5-frame 64x48 grid (320 lines): per-frame calibration must shrink
    assert sp.auto_calib(5, 64, 48, 48, "per_frame") == (6, 5)
    m = sp.sampling_masks(5, 64, 48, 48, seed=0)
    assert m.sum() == 320 and m[:, sp.calib_slices(64, 48, (6, 5))[0],
                                 sp.calib_slices(64, 48, (6, 5))[1]].all()
    # several hundred for ~400 frames in union mode
    assert sp.auto_calib(400, 64, 48, 500, "union") == (16, 12)
    m = sp.sampling_masks(400, 64, 48, 500, calib_mode="union", seed=0)
    assert m.sum() == round(400 * 64 * 48 / 500)


def test_auto_calib_rules():
    for n, ny, nz, r in [(5, 64, 48, 4), (5, 64, 48, 16), (10, 128, 96, 20), (5, 24, 16, 6)]:
        cy, cz = sp.auto_calib(n, ny, nz, r, "per_frame")
        per_frame = sp.n_samples(n, ny, nz, r) // n
        assert cy * cz <= max(per_frame / 2, 16) and min(cy, cz) >= 4 and abs(cy - cz) <= 1
        sp.sampling_masks(n, ny, nz, r, calib=(cy, cz))
    # a 4x4 block is returned even where it takes more than half of a frame
    assert sp.auto_calib(5, 64, 48, 100, "per_frame") == (4, 4)
    with pytest.raises(ValueError, match="union"):
        sp.auto_calib(5, 64, 48, 250, "per_frame")
    # union: about ny/4 x nz/4 (at least 12 where the grid allows), shrunk to at most 60 % of all lines
    assert sp.auto_calib(5, 64, 48, 48, "union") == (16, 12)
    cy, cz = sp.auto_calib(2, 64, 48, 100, "union")
    assert cy * cz <= 0.6 * sp.n_samples(2, 64, 48, 100) and (cy, cz) != (16, 12)
    with pytest.raises(ValueError, match="calibration"):
        sp.auto_calib(2, 64, 48, 400, "union")
    assert sp.auto_calib(5, 3, 2, 1, "union") == (3, 2)


def test_reproducible_seeded_and_frames_differ():
    a = sp.sampling_masks(6, 64, 48, 10, seed=5)
    np.testing.assert_array_equal(a, sp.sampling_masks(6, 64, 48, 10, seed=5))
    assert not np.array_equal(a, sp.sampling_masks(6, 64, 48, 10, seed=6))
    for i in range(6):
        for j in range(i):
            assert not np.array_equal(a[i], a[j])
    u = sp.sampling_masks(50, 64, 48, 100, calib_mode="union", seed=5)
    assert not np.array_equal(u[0], u[1])


def test_variable_density():
    m = sp.sampling_masks(200, 64, 48, 20, calib=(0, 0), seed=0, density_power=1.0)
    frac = m.mean(axis=0)
    centre = frac[24 - 4:24 + 4, 32 - 4:32 + 4].mean()
    edge = np.concatenate([frac[:4].ravel(), frac[-4:].ravel()]).mean()
    assert centre > 4 * edge
    flat = sp.sampling_masks(200, 64, 48, 20, calib=(0, 0), seed=0, density_power=0.0).mean(axis=0)
    assert flat[20:28, 28:36].mean() < 2 * flat[:4].mean()
    w = sp.density(64, 48, 1.0)
    assert w.shape == (48, 64) and w.argmax() == np.ravel_multi_index((24, 32), w.shape)


def test_no_calibration():
    m = sp.sampling_masks(4, 32, 24, 6, calib=(0, 0), seed=0)
    assert m.sum() == round(4 * 32 * 24 / 6)


def test_acceleration_function():
    m = np.zeros((2, 4, 4), bool)
    assert sp.acceleration(m) == np.inf
    m[0, 0, 0] = m[1, 2, 3] = True
    assert sp.acceleration(m) == 16.0


def test_error_messages():
    with pytest.raises(ValueError, match="accel"):
        sp.sampling_masks(5, 64, 48, 0.5)
    with pytest.raises(ValueError, match="accel"):
        sp.sampling_masks(5, 64, 48, float("nan"))
    with pytest.raises(ValueError, match="n_frames"):
        sp.sampling_masks(0, 64, 48, 4)
    with pytest.raises(ValueError, match="ny"):
        sp.sampling_masks(5, 0, 48, 4)
    with pytest.raises(ValueError, match="calib_mode"):
        sp.sampling_masks(5, 64, 48, 4, calib_mode="interleaved")
    with pytest.raises(ValueError, match="larger than the 64x48"):
        sp.sampling_masks(5, 64, 48, 4, calib=(70, 10))
    with pytest.raises(ValueError, match=r"at most 8x8 fits.*union"):
        sp.sampling_masks(5, 64, 48, 48, calib=(12, 12), calib_mode="per_frame")
    with pytest.raises(ValueError, match="smaller calib"):
        sp.sampling_masks(400, 64, 48, 3000, calib=(24, 24), calib_mode="union")
    with pytest.raises(ValueError, match="at least one line"):
        sp.sampling_masks(5, 64, 48, 5000)
    with pytest.raises(ValueError, match="pair"):
        sp.sampling_masks(5, 64, 48, 4, calib=12)
    with pytest.raises(ValueError, match="both"):
        sp.sampling_masks(5, 64, 48, 4, calib=(0, 4))
    with pytest.raises(ValueError, match="density_power"):
        sp.sampling_masks(5, 64, 48, 4, density_power=-1)


def test_shared_pattern_and_centre():
    """'shared': one mask (calibration block in full) for every frame; centre=True: the k-space
    centre in every frame, also where the block is split among the frames; both within the budget."""
    m = sp.sampling_masks(5, 32, 24, 8, calib=(6, 6), calib_mode="union", pattern="shared", seed=1)
    assert (m == m[:1]).all() and m[:, sp.calib_region(32, 24, (6, 6))].all()
    assert m.sum() == 5 * round(32 * 24 / 8)
    u = sp.sampling_masks(200, 24, 16, 100, calib=(8, 8), calib_mode="union", seed=1, centre=True)
    assert u[:, 8, 12].all() and u.sum() == sp.n_samples(200, 24, 16, 100)
    assert u[:, sp.calib_region(24, 16, (8, 8))].any(0).all()
    p = sp.sampling_masks(6, 24, 16, 4, calib=(0, 0), seed=1, centre=True)
    assert p[:, 8, 12].all() and p.sum() == sp.n_samples(6, 24, 16, 4)
    # the defaults leave the masks as they were
    np.testing.assert_array_equal(sp.sampling_masks(5, 24, 16, 8, calib_mode="union", seed=3),
                                  sp.sampling_masks(5, 24, 16, 8, calib_mode="union", seed=3,
                                                          pattern="per_frame", centre=False))
    with pytest.raises(ValueError, match="pattern"):
        sp.sampling_masks(5, 24, 16, 8, pattern="same")
    with pytest.raises(ValueError, match="centre"):
        sp.sampling_masks(100, 24, 16, 384, calib=(4, 4), calib_mode="union", centre=True)
