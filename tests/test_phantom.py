"""Head phantom: conventions, values, reproducibility."""
import numpy as np
import pytest

from gadget_lorein.sim import phantom as ph


@pytest.fixture(scope="module")
def p64():
    return ph.head_phantom((64, 64, 48), seed=0)


def test_shape_order_dtypes_and_fov():
    p = ph.head_phantom((40, 32, 24), seed=0)            # (nx, ny, nz)
    assert p.shape == (24, 32, 40)                       # (nz, ny, nx)
    for a in (p.t1, p.t2, p.pd, p.b1):
        assert a.shape == (24, 32, 40) and a.dtype == np.float32
    assert p.labels.dtype == np.uint8 and p.labels.shape == (24, 32, 40)
    # default FOV: isotropic voxels of 220 mm / max(nx, ny), in (x, y, z) order
    assert p.fov_mm == pytest.approx((220.0, 176.0, 132.0))
    assert p.voxel_mm == pytest.approx((5.5, 5.5, 5.5))
    assert ph.head_phantom((64, 64, 48)).fov_mm == pytest.approx((220.0, 220.0, 165.0))
    q = ph.head_phantom((40, 32, 24), fov_mm=(200.0, 200.0, 150.0))
    assert q.fov_mm == (200.0, 200.0, 150.0)
    assert set(p.maps()) == {"t1", "t2", "pd", "b1"}
    assert p.maps()["t1"] is p.t1


def test_head_orientation(p64):
    """x = left-right (narrower), y = anterior-posterior (longer), z = superior-inferior."""
    m = p64.brain_mask
    ext = [np.ptp(np.nonzero(m.any(axis=ax))[0]) for ax in ((0, 1), (0, 2))]   # x, y extents
    vx, vy, _ = p64.voxel_mm
    assert ext[1] * vy > ext[0] * vx * 1.15
    # left-right symmetric labels apart from the random GM/WM border and lesions
    csf = p64.labels == ph.CSF
    assert abs(int(csf[..., :32].sum()) - int(csf[..., 33:].sum())) < 0.15 * csf.sum()


@pytest.mark.parametrize("matrix", [(24, 24, 16), (64, 64, 48)])
def test_all_tissues_present_and_values(matrix):
    p = ph.head_phantom(matrix, seed=0)
    counts = np.bincount(p.labels.ravel(), minlength=5)
    assert counts.size == 5 and np.all(counts > 0)
    assert counts[ph.GM] > 0.4 * counts[ph.WM]
    bands = {  # (T1, T2, PD) bands around the 3 T values
        ph.WM: ((750, 920), (70, 90), (0.64, 0.74)),
        ph.GM: ((1200, 1460), (98, 122), (0.75, 0.85)),
        ph.CSF: ((3900, 4400), (1650, 1950), (0.97, 1.03)),
        ph.LESION: ((1100, 1500), (140, 200), (0.74, 0.86)),
    }
    for lab, limits in bands.items():
        sel = p.labels == lab
        for m, (lo, hi), ref in zip((p.t1, p.t2, p.pd), limits, ph.TISSUES[lab]):
            assert lo <= m[sel].min() and m[sel].max() <= hi, (lab, lo, hi)
            assert abs(np.median(m[sel]) / ref - 1) < 0.03
    bg = p.labels == 0
    assert np.all(p.t1[bg] == 0) and np.all(p.t2[bg] == 0) and np.all(p.pd[bg] == 0)
    assert p.pd.max() <= 1.05
    np.testing.assert_array_equal(p.brain_mask, p.labels > 0)
    np.testing.assert_array_equal(p.tissue_mask, np.isin(p.labels, (1, 2, 4)))


def test_texture_is_smooth_and_small(p64):
    wm = p64.labels == ph.WM
    rel = p64.t1[wm] / ph.TISSUES[ph.WM][0] - 1
    assert 0.01 < rel.std() < 0.06
    # neighbouring WM voxels differ far less than the texture's range (smooth, not white noise)
    both = wm[:, :, 1:] & wm[:, :, :-1]
    d = np.abs(np.diff(p64.t1, axis=2))[both] / ph.TISSUES[ph.WM][0]
    assert np.median(d) < 0.3 * rel.std()


def test_b1_smooth_and_realistic(p64):
    b = p64.b1
    assert b.min() >= 0.7 and b.max() <= 1.3
    inside = p64.brain_mask
    assert 0.75 < b[inside].min() < 0.95 and 1.05 < b[inside].max() < 1.25
    assert 0.9 < b[inside].mean() < 1.1
    for ax in range(3):
        assert np.abs(np.diff(b, axis=ax)).max() < 0.05


def test_reproducible_and_seed_dependent():
    a = ph.head_phantom((32, 32, 24), seed=3)
    b = ph.head_phantom((32, 32, 24), seed=3)
    c = ph.head_phantom((32, 32, 24), seed=4)
    for name in ("t1", "t2", "pd", "b1", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.t1, c.t1)
    assert not np.array_equal(a.b1, c.b1)


def test_same_anatomy_at_every_matrix():
    """Geometry and texture live in mm: the 64 grid at even indices samples the 32 grid's points."""
    lo = ph.head_phantom((32, 32, 24), seed=1)
    hi = ph.head_phantom((64, 64, 48), seed=1)
    sub = hi.labels[::2, ::2, ::2]
    same = sub == lo.labels
    assert same.mean() > 0.95
    both = same & (lo.labels > 0)
    np.testing.assert_allclose(hi.t1[::2, ::2, ::2][both], lo.t1[both], rtol=1e-5)
    np.testing.assert_allclose(hi.b1[::2, ::2, ::2], lo.b1, rtol=1e-5)


def test_scales_to_large_matrices_quickly():
    import time
    t = time.perf_counter()
    p = ph.head_phantom((96, 96, 72), seed=0)
    assert time.perf_counter() - t < 5.0
    assert p.shape == (72, 96, 96)


def test_bad_arguments():
    with pytest.raises(ValueError, match="matrix"):
        ph.head_phantom((64, 64))
    with pytest.raises(ValueError, match="fov_mm"):
        ph.head_phantom((16, 16, 16), fov_mm=(100, -1, 100))
