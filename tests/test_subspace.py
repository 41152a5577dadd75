"""The temporal subspace: projecting the dictionary's atoms on the rank-K basis loses exactly the
energy that the SVD (eigen-decomposition of the Gram matrix) says it leaves out."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gadget_lorein.physics import protocol
from gadget_lorein.physics.subspace import build_subspace, grid_axes, simulate_dictionary, temporal_basis


def small_mrf():
    return protocol.load("mrf").with_overrides(
        n_tr=100, epg_states=32,
        dictionary={"t1_ms": [100.0, 6000.0, 40], "t2_ms": [10.0, 3000.0, 40], "b1": [0.6, 1.4, 5]})


PROTOCOLS = {"qalas": lambda: protocol.load("qalas"), "mrf_small": small_mrf}


@pytest.fixture(scope="module", params=sorted(PROTOCOLS))
def atoms(request):
    proto = PROTOCOLS[request.param]()
    d = simulate_dictionary(proto)
    t1, t2, b1 = grid_axes(proto)
    B, T2, T1 = np.meshgrid(b1, t2, t1, indexing="ij")
    valid = torch.from_numpy((T2 <= T1).ravel())
    return proto, d.reshape(-1, d.shape[-1])[valid]


def projection_loss(atoms: torch.Tensor, basis: torch.Tensor) -> float:
    """Relative energy of the unit-norm atoms outside span(basis): sum ||a - U U^H a||^2 / sum ||a||^2."""
    a = atoms.to(torch.complex128)
    a = a / a.norm(dim=-1, keepdim=True)
    u = basis.to(torch.complex128)
    resid = a - (a @ u.conj()) @ u.T               # rows: a^T - (U U^H a)^T
    return float(resid.norm() ** 2 / a.norm() ** 2)


def test_projection_error_matches_reported_energy(atoms):
    proto, a = atoms
    basis, energy, spectrum = temporal_basis(a, rank=None, energy=0.999)
    k = basis.shape[1]
    assert energy >= 0.999
    assert k == 1 or float(spectrum[:k - 1].sum()) < 0.999       # the smallest such rank
    assert projection_loss(a, basis) == pytest.approx(1 - energy, rel=1e-3, abs=1e-6)
    # the basis is orthonormal
    gram = (basis.conj().T @ basis).to(torch.complex128)
    assert torch.allclose(gram, torch.eye(k, dtype=torch.complex128), atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_every_rank(atoms, rank):
    proto, a = atoms
    basis, energy, spectrum = temporal_basis(a, rank=rank)
    assert basis.shape == (a.shape[1], rank)
    assert energy == pytest.approx(float(spectrum[:rank].sum()), rel=1e-5)
    assert projection_loss(a, basis) == pytest.approx(1 - energy, rel=1e-3, abs=1e-6)


def test_build_subspace_table_is_the_projection(atoms, tmp_path):
    proto, a = atoms
    model = build_subspace(proto, rank=None, energy=0.999, cache_dir=tmp_path)
    basis, energy, _ = temporal_basis(a, rank=None, energy=0.999)
    assert model.rank == basis.shape[1] and model.energy == pytest.approx(energy, rel=1e-9)
    full = simulate_dictionary(proto)
    table = (full.reshape(-1, full.shape[-1]).to(torch.complex128)
             @ model.basis.conj().to(torch.complex128))
    assert torch.allclose(model.table.reshape(table.shape).to(torch.complex128), table,
                          rtol=1e-4, atol=1e-6 * float(table.abs().max()))
    # cached: the second build loads the same model
    again = build_subspace(proto, rank=None, energy=0.999, cache_dir=tmp_path)
    assert torch.equal(again.basis, model.basis) and again.energy == model.energy
