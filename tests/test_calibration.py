"""Calibration k-space and the object support where the calibration block is shared out among the
frames (MRF) or sampled in every frame (QALAS)."""
import numpy as np
from scipy import ndimage

from gadget_lorein.data import KSpaceLines
from gadget_lorein.physics import protocol
from gadget_lorein.recon import calibration
from gadget_lorein.recon import pipeline as recon
from gadget_lorein.sim import simulate


def _lines(coeffs, basis, frames_of):
    """One readout point, one coil: location i holds basis[frames_of[i]] @ coeffs[i], flagged calib."""
    rows = [(i, t) for i, frames in enumerate(frames_of) for t in frames]
    loc = np.array([i for i, _ in rows])
    frame = np.array([t for _, t in rows])
    data = np.einsum("lk,lk->l", basis[frame], coeffs[loc])[:, None, None].astype(np.complex64)
    n = len(frames_of)
    return KSpaceLines(data=data, frame=frame, kz=np.zeros(len(rows), int), ky=loc,
                       calib=np.ones(len(rows), bool), n_frames=basis.shape[0], nz=1, ny=n)


def test_calibration_kspace_exact_with_every_frame_and_prior_estimate_with_few():
    """Where every frame sampled a location, the first coefficient is exact, prior or not. Where
    two frames did, least squares lets the other coefficients leak in; the dictionary prior's
    minimum-mean-square estimate has a lower error over coefficients drawn from that prior."""
    sub = recon.build_subspace(protocol.load("mrf"), None, 0.999, device="cpu")
    basis = sub.basis.numpy().astype(np.complex128)
    prior = sub.coefficient_covariance()
    assert np.allclose(prior, prior.conj().T) and np.linalg.eigvalsh(prior).min() > -1e-9
    rng = np.random.default_rng(0)
    n, T = 400, basis.shape[0]
    chol = np.linalg.cholesky(prior + 1e-12 * np.eye(sub.rank))
    coeffs = (rng.standard_normal((n, sub.rank)) + 1j * rng.standard_normal((n, sub.rank))) @ chol.T
    few = [rng.choice(T, 2, replace=False) for _ in range(n)]
    every = [np.arange(T)] * 8
    for frames_of, exact in ((every, True), (few, False)):
        lines = _lines(coeffs[:len(frames_of)], basis, frames_of)
        truth = coeffs[:len(frames_of), 0]
        ls = calibration.calibration_kspace(lines, basis)[0, 0, :, 0]
        mmse = calibration.calibration_kspace(lines, basis, prior)[0, 0, :, 0]
        if exact:
            np.testing.assert_allclose(ls, truth, rtol=1e-4, atol=1e-6 * np.abs(truth).max())
            np.testing.assert_array_equal(mmse, ls)
        else:
            err_ls, err_mmse = (np.mean(np.abs(e - truth) ** 2) for e in (ls, mmse))
            assert err_mmse < 0.5 * err_ls, (err_mmse, err_ls)


def test_object_support_raises_its_threshold_over_a_bright_background():
    """A floor of noise at 0.15 of the object (root-sum-of-squares over 6 coils, as the
    low-resolution image is): the plain threshold (0.08) takes nearly the whole box; the raised one
    keeps the object, its faint one-voxel rim and one voxel around them, and nothing farther out.
    With a dark background the support is the plain threshold's."""
    rng = np.random.default_rng(1)
    obj = np.zeros((24, 24, 24), bool)
    obj[6:18, 6:18, 6:18] = True
    rim = ndimage.binary_dilation(obj) & ~obj
    head = obj | rim
    for floor, raised in ((0.15, True), (0.01, False)):
        noise = np.sqrt((rng.standard_normal((12,) + obj.shape) ** 2).mean(0))
        low = np.where(obj, 1.0, 0.0) + np.where(rim, 0.35, 0.0) + floor * noise
        support, threshold = recon.object_support(low, 0.08)
        assert threshold == 0.08 * np.percentile(low, 99)
        if raised:
            assert (low > threshold).mean() > 0.95
            assert support[head].all() and not (support & ~ndimage.binary_dilation(head)).any()
        else:
            np.testing.assert_array_equal(support, low > threshold)


def test_mrf_support_is_the_head_not_the_box():
    """A realistic MRF scan at SNR 15 (calibration shared out among 400 frames): the support covers
    the head and not much more (it took 98 % of the box with least-squares calibration and the plain
    threshold); a QALAS scan (the block in every frame) keeps the plain threshold's support."""
    for seq, accel, snr in (("mrf", 200, 15.0), ("qalas", 8, 30.0)):
        sim = simulate.simulate(protocol.load(seq), matrix=[40, 32, 24], n_coils=6, accel=accel, seed=0,
                                mode="realistic", snr=snr)
        _, sub, op, support, _ = recon.prepare(sim.scan, recon.ReconSettings(method="zerofill"))
        support = support.cpu().numpy()
        head = sim.truth()["labels"] > 0
        near = ndimage.binary_dilation(head, iterations=2)
        assert (head & ~support).sum() <= 0.005 * head.sum(), seq
        assert (support & ~near).sum() <= 0.1 * head.sum(), (seq, int(support.sum()))
