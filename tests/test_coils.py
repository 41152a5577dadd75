"""Coil sensitivities and noise covariance (sim/coils.py): coverage, smoothness, reproducibility."""
import numpy as np
import pytest

from gadget_lorein.sim import coils, phantom as ph


@pytest.fixture(scope="module")
def p64():
    return ph.head_phantom((64, 64, 48), seed=0)


@pytest.fixture(scope="module")
def p32():
    return ph.head_phantom((32, 32, 24), seed=0)


@pytest.fixture(scope="module")
def coils32(p32):
    return coils.coil_sensitivities(p32.shape, n_coils=8, seed=0)


def test_coil_sensitivities_cover_the_head(p32, coils32):
    c = coils32
    assert c.shape == (8, 24, 32, 32) and c.dtype == np.complex64
    assert np.all(np.isfinite(c))
    rss = np.sqrt((np.abs(c) ** 2).sum(0))
    inside = p32.brain_mask
    assert rss[inside].min() > 0.05 * rss[inside].max()
    # not normalised: a realistic, non-uniform receive field (median 1 inside the skull)
    assert 0.8 < np.median(rss[inside]) < 1.25
    assert rss[inside].max() / rss[inside].min() > 3
    # every coil sees a different part of the head
    peak = [np.unravel_index(np.argmax(np.abs(ci) * inside), ci.shape) for ci in c]
    assert len(set(peak)) == 8


def test_coil_sensitivities_interpolated_grid(p64):
    """Large matrices use a coarse grid and cubic interpolation: same field, smooth."""
    c = coils.coil_sensitivities(p64.shape, n_coils=8, seed=0)
    assert c.shape == (8, 48, 64, 64)
    inside = p64.brain_mask
    scale = np.abs(c[:, inside]).max()
    for ax in range(3):
        d = np.abs(np.diff(c, axis=ax + 1)).max(axis=0)
        m = inside[tuple(slice(0, -1) if a == ax else slice(None) for a in range(3))]
        assert d[m].max() < 0.15 * scale
    rss = np.sqrt((np.abs(c) ** 2).sum(0))
    assert rss[inside].min() > 0.05 * rss[inside].max()


def test_coil_sensitivities_seeded(p32, coils32):
    np.testing.assert_array_equal(coils32, coils.coil_sensitivities(p32.shape, 8, seed=0))
    c2 = coils.coil_sensitivities(p32.shape, 8, seed=1)
    assert not np.allclose(coils32, c2)
    np.testing.assert_allclose(np.abs(coils32), np.abs(c2), rtol=1e-4, atol=1e-6)  # same geometry


@pytest.mark.parametrize("n_coils", [1, 4, 12, 16])
def test_coil_counts(n_coils):
    shape = (16, 24, 24)
    c = coils.coil_sensitivities(shape, n_coils=n_coils)
    assert c.shape == (n_coils,) + shape
    p = ph.head_phantom((24, 24, 16))
    rss = np.sqrt((np.abs(c) ** 2).sum(0))
    assert rss[p.brain_mask].min() > (0.01 if n_coils == 1 else 0.05) * rss[p.brain_mask].max()


def test_coil_layout_and_errors():
    assert len(coils.coil_layout(32)) == 32
    with pytest.raises(ValueError, match="n_coils"):
        coils.coil_sensitivities((8, 8, 8), n_coils=0)


@pytest.mark.parametrize("n_coils", [2, 8, 32])
def test_noise_covariance(n_coils):
    cov = coils.noise_covariance(n_coils, seed=0, correlation=0.2)
    assert cov.shape == (n_coils, n_coils) and np.iscomplexobj(cov)
    np.testing.assert_allclose(cov, cov.conj().T, atol=1e-12)
    assert np.linalg.eigvalsh(cov).min() > 0
    d = np.real(np.diag(cov))
    assert d.min() >= 0.7 and d.max() <= 1.3
    corr = cov / np.sqrt(d[:, None] * d[None, :])
    off = ~np.eye(n_coils, dtype=bool)
    assert abs(np.abs(corr[off]).mean() - 0.2) < 1e-9
    np.linalg.cholesky(cov)
    np.testing.assert_array_equal(cov, coils.noise_covariance(n_coils, seed=0))
    assert not np.allclose(cov, coils.noise_covariance(n_coils, seed=1))


def test_noise_covariance_extremes():
    np.testing.assert_allclose(coils.noise_covariance(4, correlation=0.0),
                               np.diag(np.diag(coils.noise_covariance(4, correlation=0.0))))
    cov = coils.noise_covariance(8, correlation=0.9)
    assert np.linalg.eigvalsh(cov).min() > 0
    assert coils.noise_covariance(1).shape == (1, 1)
    with pytest.raises(ValueError, match="correlation"):
        coils.noise_covariance(4, correlation=1.0)
    with pytest.raises(ValueError, match="n_coils"):
        coils.noise_covariance(0)
