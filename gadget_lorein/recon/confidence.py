"""Per-voxel confidence of the maps: the Cramér-Rao standard deviation of T1, T2 (and B1) under the
sequence's own signal model, at the fitted values (torch and numpy; no ISMRMRD).

Model of one voxel: frame t of coil c is y_ct = S_c PD s_t(T1, T2, B1) + n, with s the protocol's
signal model (physics/sequences.py, the one the dictionary and the fit use), S_c the whitened coil
sensitivities and n circular complex Gaussian noise of variance ``noise_var`` per k-space sample
(1 after prewhitening with the noise scan). The unknowns are T1, T2, B1 (where the protocol encodes
it) and the complex PD (two real nuisance parameters). The Fisher information is

    F = (2 / noise_var) sum_c |S_c|^2 sum_t f_t Re(J_t^H J_t),   J_t = d(PD s_t) / d(T1, T2, B1, Re PD, Im PD)

and the bound is SD(theta_i) = sqrt((F^-1)_ii). For QALAS (a closed form) the Jacobian is taken
by forward finite differences of the signal model itself (relative step 1e-3, float64). For MRF an
EPG simulation of every voxel and its neighbours costs tens of seconds, so the bound is taken in
the temporal subspace the fit works in: J_t = U_t c with c = U^H s from the subspace model's signal
table (physics/subspace.py, trilinear in log T1, log T2, B1), differentiated by central differences
over one table cell, and sum_t f_t J_t^H J_t = c^H (U^H diag(f) U) c. That is the bound of an
estimator confined to the subspace, as the fit is: derivatives leave the subspace more than the
signals do, and the table resolves them only to its grid, so it lies above the full model's bound
(on WM, GM, lesion, CSF test voxels: T1 1.01-1.05x, T2 1.05-1.3x, B1 1.1-7x, the largest for CSF,
whose B1 the train hardly encodes); 40x32x24 voxels take about 0.3 s instead of tens of seconds.

The approximation, stated: f_t is the fraction of the (kz, ky) grid sampled in frame t. A fully
sampled frame with orthonormal FFTs gives each voxel the information of one noisy sample per coil;
an undersampled frame is taken to give the fraction f_t of it, as if the missing lines cost SNR
only (sqrt(R)), with no aliasing, no g-factor (no coil-geometry noise amplification) and no
regularisation. It is therefore a bound for an unbiased, unregularised estimator; a regularised
fit (LLR, the LoREIN networks) can have a smaller variance than this and a bias it does not show,
and the g-factor at high R makes the true noise larger. Its use is relative: which voxels are
poorly determined by this sequence at this SNR (short T2 in a T1-weighted train, tiny PD, long T1
in CSF, ...); benchmarks/confidence.py measures how its ranking follows the actual error.

A voxel is undetermined where SD(T1)/T1 or SD(T2)/T2 exceeds ``max_rel_sd`` (setting
``confidence_max_rel_sd``), or where F is singular.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import named
from ..physics import sequences

SERIES = {"T1_SD": 21, "T2_SD": 22, "B1_SD": 24, "UNDETERMINED": 25}
UNITS = {"T1_SD": "ms", "T2_SD": "ms", "B1_SD": "fraction", "UNDETERMINED": "flag"}
SD_CAP = 1e6          # SDs are written at most this large (a singular F gives infinity)


@dataclass
class NoiseModel:
    """What the bound needs from the reconstruction (recon.pipeline fills it)."""
    coil_rss2: np.ndarray          # (nz, ny, nx): sum_c |S_c|^2 of the whitened coil maps
    frame_fraction: np.ndarray     # (frames,): sampled fraction of the (kz, ky) grid per frame
    noise_var: float               # noise variance per k-space sample (1 after prewhitening)
    pd_scale: float                # PD map x pd_scale = |PD| in the data's units


def noise_variance_from_lines(data: np.ndarray, edge: float = 0.125) -> float:
    """Noise variance per sample without a noise scan: the mean |y|^2 over the outer ``edge`` of
    each readout on both sides (mostly noise for an object well inside the FOV; an over-estimate
    when the object's high frequencies reach there). ``data``: (lines, coils, nx)."""
    nx = data.shape[-1]
    n = max(1, int(edge * nx))
    outer = np.concatenate([data[..., :n], data[..., nx - n:]], axis=-1)
    return float(np.mean(np.abs(outer) ** 2))


def _exact_jacobian(proto, p, n):
    """Signal (V, T) and its derivatives in the first ``n`` parameters (forward differences)."""
    base = sequences.signal(proto, *p)
    cols = []
    for j in range(n):
        h = 1e-3 * (p[j] if j < 2 else torch.ones_like(p[j]))
        moved = [q + h if k == j else q for k, q in enumerate(p)]
        cols.append((sequences.signal(proto, *moved) - base) / h[:, None])
    return base, cols


def _table_jacobian(sub, p, n):
    """Subspace coefficients (V, K) and their derivatives by central differences over one cell of
    the signal table (log-spaced T1 and T2, linear B1)."""
    p32 = [q.float() for q in p]
    base = sub.coefficients(*p32).to(torch.complex128)
    cols = []
    for j in range(n):
        axis = (sub.t1, sub.t2, sub.b1)[j]
        if j < 2:
            r = float(np.exp(np.log(axis[-1] / axis[0]) / max(len(axis) - 1, 1) / 2))
            lo, hi = p[j] / r, p[j] * r
        else:
            d = float(axis[-1] - axis[0]) / max(len(axis) - 1, 1) / 2
            lo, hi = p[j] - d, p[j] + d
        moved = [[q.float() for q in p] for _ in range(2)]
        moved[0][j], moved[1][j] = lo.float(), hi.float()
        diff = sub.coefficients(*moved[1]) - sub.coefficients(*moved[0])
        cols.append(diff.to(torch.complex128) / (hi - lo)[:, None])
    return base, cols


def fisher_sd(proto, t1, t2, b1, pd, weight, frame_fraction, noise_var: float = 1.0,
              subspace=None, chunk: int = 8192) -> dict:
    """Cramér-Rao SDs for voxels given as 1D arrays (T1, T2 ms; B1 fraction; |PD| in data units;
    ``weight`` = sum_c |S_c|^2). ``subspace`` (a physics.subspace.SubspaceModel): the bound in the
    subspace (see the module docstring), used for protocols other than QALAS; without one the
    signal model itself. Returns {'T1': sd, 'T2': sd, ['B1': sd]} (float64 arrays; inf where F
    is singular)."""
    names = ["T1", "T2"] + (["B1"] if proto.encodes_b1 else [])
    f = torch.as_tensor(np.asarray(frame_fraction, np.float64))
    use_table = subspace is not None and proto.kind != "qalas"
    if use_table:
        u = subspace.basis.cpu().to(torch.complex128)
        gram = u.conj().T @ (f[:, None] * u)                   # K x K: U^H diag(f) U
    out = {k: np.empty(len(t1)) for k in names}
    for i in range(0, len(t1), chunk):
        sl = slice(i, i + chunk)
        p = [torch.as_tensor(np.asarray(a[sl], np.float64)) for a in (t1, t2, b1)]
        if use_table:
            base, cols = _table_jacobian(subspace, p, len(names))
        else:
            base, cols = _exact_jacobian(proto, p, len(names))
        base = base.to(torch.complex128)
        mag = torch.as_tensor(np.asarray(pd[sl], np.float64))[:, None]
        jac = torch.stack([mag * c.to(torch.complex128) for c in cols] + [base, 1j * base], dim=-1)
        if use_table:
            fis = torch.einsum("vkp,kl,vlq->vpq", jac.conj(), gram, jac).real
        else:
            fis = torch.einsum("vtp,vtq,t->vpq", jac.conj(), jac, f.to(torch.complex128)).real
        fis = fis * (2.0 / noise_var) * torch.as_tensor(np.asarray(weight[sl], np.float64))[:, None, None]
        # scale to unit diagonal before inverting (T1 in ms and PD differ by orders of magnitude)
        d = fis.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).sqrt()
        corr = fis / (d[:, :, None] * d[:, None, :])
        eye = torch.eye(corr.shape[-1], dtype=corr.dtype)
        inv, info = torch.linalg.inv_ex(corr + 1e-12 * eye)
        var = inv.diagonal(dim1=-2, dim2=-1) / d ** 2
        bad = (info != 0)[:, None] | ~torch.isfinite(var) | (var <= 0)
        sd = torch.where(bad, torch.full_like(var, np.inf), var.clamp_min(0).sqrt())
        for j, k in enumerate(names):
            out[k][sl] = sd[:, j].numpy()
    return out


def confidence_maps(proto, maps, support: np.ndarray, noise: NoiseModel,
                    max_rel_sd: float = 0.5, subspace=None) -> dict:
    """{'T1_SD', 'T2_SD', ['B1_SD'], 'UNDETERMINED'}: (nz, ny, nx) float32 volumes, 0 outside the
    support (``subspace``: see :func:`fisher_sd`); SDs in the maps' units (capped at SD_CAP), UNDETERMINED 1 where SD(T1)/T1 or
    SD(T2)/T2 > ``max_rel_sd`` or the bound is infinite, else 0."""
    maps = named(maps)
    sup = np.asarray(support, bool) & (np.asarray(maps["T1"]) > 0) & (np.asarray(maps["T2"]) > 0)
    t1 = np.asarray(maps["T1"], np.float64)[sup]
    t2 = np.asarray(maps["T2"], np.float64)[sup]
    b1 = np.asarray(maps["B1"], np.float64)[sup] if "B1" in maps else np.ones_like(t1)
    pd = np.abs(np.asarray(maps["PD"], np.float64)[sup]) * noise.pd_scale
    sd = fisher_sd(proto, t1, t2, b1, pd, np.asarray(noise.coil_rss2, np.float64)[sup],
                   noise.frame_fraction, noise.noise_var, subspace)
    rel = np.maximum(sd["T1"] / t1, sd["T2"] / t2)
    out = {}
    for k, v in sd.items():
        vol = np.zeros(sup.shape, np.float32)
        vol[sup] = np.minimum(v, SD_CAP)
        out[f"{k}_SD"] = vol
    flag = np.zeros(sup.shape, np.float32)
    flag[sup] = ~(rel <= max_rel_sd)
    out["UNDETERMINED"] = flag
    return out
