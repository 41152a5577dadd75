"""Hash-grid encoding: the fast interpolation and the table compaction change no result."""
import pytest
import torch

from gadget_lorein.recon.lorein.hashgrid import CoordinateNet, HashGridConfig, HashGridEncoding


def _reference(enc: HashGridEncoding, coords):
    """Plain autograd gather + weighted sum over the full table."""
    idx, w = enc.corners(coords)
    flat = enc.table.reshape(-1, enc.table.shape[-1])
    feats = (flat[idx] * w[..., None]).sum(2)
    return feats.permute(1, 0, 2).reshape(idx.shape[1], -1)


@pytest.mark.parametrize("precomputed", [False, True], ids=["explicit-points", "precomputed-sparse"])
def test_interpolation_and_its_gradient_match_autograd(precomputed):
    """Explicit points use the gather (embedding_bag / index_add_); precomputed points the CSR
    matrices S and S^T. Both give the reference's values and table gradient."""
    cfg = HashGridConfig(levels=4, log2_table=10, base_resolution=2, finest_resolution=16)
    coords = torch.rand(300, 3, generator=torch.Generator().manual_seed(1))
    enc = HashGridEncoding(cfg, seed=0)
    g = torch.randn(300, enc.out_dim)
    ref = _reference(enc, coords)
    (gr,) = torch.autograd.grad((ref * g).sum(), enc.table)
    if precomputed:
        enc.precompute(coords, compact=False)
        assert enc._s.layout == torch.sparse_csr and enc._s.shape == (300 * cfg.levels, enc.table.numel() // 2)
    out = enc() if precomputed else enc(coords)
    (go,) = torch.autograd.grad((out * g).sum(), enc.table)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(go, gr, rtol=1e-5, atol=1e-7)


def test_compacted_table_keeps_outputs_and_drops_unreached_entries():
    cfg = HashGridConfig(levels=6, log2_table=12, base_resolution=4, finest_resolution=32)
    coords = torch.rand(200, 3, generator=torch.Generator().manual_seed(2))
    full, small = CoordinateNet(3, cfg, seed=0), CoordinateNet(3, cfg, seed=0)
    full.encoding.precompute(coords, compact=False)
    small.precompute(coords)
    assert small.encoding.table.shape[0] < full.encoding.table.numel() // cfg.features
    torch.testing.assert_close(small.encoding(), full.encoding(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="precomputed points"):
        small.encoding(coords)
