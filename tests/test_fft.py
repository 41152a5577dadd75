import numpy as np
import pytest
import torch

from gadget_lorein.fft import fftnc, ifftnc


@pytest.mark.parametrize("shape", [(2, 8, 6, 4), (2, 10, 6, 10), (2, 7, 6, 5), (3, 9, 8, 6)])
def test_centred_fft_matches_numpy_shift_definition(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    ax = (1, 2, 3)
    ref = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=ax), axes=ax, norm="ortho"), axes=ax)
    np.testing.assert_allclose(fftnc(torch.from_numpy(x)).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(ifftnc(fftnc(torch.from_numpy(x))).numpy(), x, atol=1e-12)
