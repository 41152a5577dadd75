"""One reconstruction path for the gadget, ``lorein recon``, the benchmarks and the tests:
Scan -> prewhitening -> subspace -> calibration (+ compression, coil maps) -> method -> maps."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from scipy import ndimage

from . import baselines, calibration, confidence

from ..physics import protocol as protocol_mod
from ..data import KSpaceLines, Maps, Scan
from ..fft import ifftnc
from .operators import HeldOutLines, SubspaceOperator
from ..physics.subspace import SubspaceModel, build_subspace
from ..settings import FIT_NAMES, METHODS, NETWORK_METHODS, ReconSettings  # noqa: F401 (the pipeline's names)

log = logging.getLogger(__name__)

class ReconError(ValueError):
    """Input the reconstruction cannot use; the message says what is wrong."""


@dataclass
class ReconResult:
    maps: Maps                     # T1, T2 [ms], PD [a.u.], B1 where encoded; mask = the support
    #                                less its ringing islands (ringing_islands)
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    subspace: SubspaceModel | None = None   # the temporal subspace the maps were fitted in (CPU)
    noise: confidence.NoiseModel | None = None  # what the Cramér-Rao confidence maps need

    @property
    def support(self) -> np.ndarray:
        """(nz, ny, nx) bool: the object support the maps were fitted in, less its ringing islands
        (``maps.mask``)."""
        return self.maps.mask


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReconError(f"device '{name}' asked for, but torch sees no CUDA device")
    return dev


def choose_protocol(override: str = "", yaml_text: str = "", name: str = "") -> protocol_mod.Protocol:
    """The protocol of a scan: the ``protocol`` setting if given, else the YAML the data carries,
    else the shipped protocol the data names."""
    try:
        if override:
            return protocol_mod.load(override)
        if yaml_text:
            return protocol_mod.from_yaml(yaml_text)
        return protocol_mod.load_shipped(name)   # data names no file paths
    except protocol_mod.ProtocolError as err:
        raise ReconError(str(err)) from None


def scan_protocol(scan: Scan, override: str = "") -> protocol_mod.Protocol:
    return choose_protocol(override, scan.protocol_yaml, scan.protocol_name)


def pd_reference(pd: np.ndarray, support: np.ndarray) -> float:
    """The 99th percentile of |PD| inside the support: the PD map's unit (see normalise_pd)."""
    ref = np.percentile(np.abs(pd)[support], 99) if support.any() else 1.0
    return max(float(ref), 1e-30)


def normalise_pd(pd: np.ndarray, support: np.ndarray) -> np.ndarray:
    """|PD| scaled so that its 99th percentile inside the support is 1 (CSF is about 1)."""
    return (np.abs(pd) / pd_reference(pd, support)).astype(np.float32)


class Stage:
    """Times named stages into a dict."""
    def __init__(self, timings: dict):
        self.timings = timings

    def __call__(self, name):
        stage = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                stage.timings[name] = stage.timings.get(name, 0.0) + time.perf_counter() - self.t0
        return _Ctx()


def prepare(scan: Scan, settings: ReconSettings, timings: dict | None = None,
            protocol: protocol_mod.Protocol | None = None, device: torch.device | None = None):
    """Shared front end: returns (protocol, subspace, operator, support, info). ``protocol`` and
    ``device``: as resolved by the caller (default: from the settings and the scan)."""
    timings = {} if timings is None else timings
    stage = Stage(timings)
    dev = device if device is not None else resolve_device(settings.device)
    proto = protocol if protocol is not None else scan_protocol(scan, settings.protocol)
    lines = scan.lines
    if proto.n_frames != lines.n_frames:
        raise ReconError(f"protocol '{proto.name}' has {proto.n_frames} frames but the data has "
                         f"{lines.n_frames}")
    if not np.all(np.isfinite(lines.data)):
        raise ReconError("k-space data contains NaN or Inf values")
    white = None
    with stage("prewhitening"):
        if scan.noise is not None and scan.noise.size:
            white = calibration.whitening_matrix(scan.noise)
            lines = calibration.apply_coil_matrix(lines, white)
            noise_var = 1.0             # whitened: unit variance per sample and coil
        else:
            noise_var = confidence.noise_variance_from_lines(lines.data)
    with stage("subspace"):
        sub = build_subspace(proto, settings.rank or None, settings.energy, device="cpu")
    with stage("coil_maps"):
        basis = sub.basis.numpy()
        try:
            calib = calibration.calibration_kspace(lines, basis, sub.coefficient_covariance())
            maps = calibration.coil_maps(calib, settings.coil_maps, white)
            if settings.virtual_coils:
                cc = calibration.coil_compression(calib, settings.virtual_coils)
                lines = calibration.apply_coil_matrix(lines, cc)
                calib = np.einsum("dc,c...->d...", cc, calib)
                maps = np.einsum("dc,c...->d...", cc, maps)
        except calibration.CalibrationError as err:
            raise ReconError(str(err)) from None
        low = np.sqrt((np.abs(ifftnc(torch.from_numpy(calib)).numpy()) ** 2).sum(0))
        support, threshold = object_support(low, settings.support_threshold)
        islands = ringing_islands(low, support, threshold)
    ref = getattr(scan, "reference_only", None)
    if ref is not None and np.any(ref):       # reference-only calibration lines: coil maps only
        lines = lines.select(~np.asarray(ref, bool))
        if len(lines.frame) == 0:
            raise ReconError("the scan has calibration reference lines but no imaging lines")
    held, measured = None, lines
    if settings.holdout > 0 and settings.method in NETWORK_METHODS:
        lines, held = split_lines(lines, settings.holdout, settings.seed)
    with stage("operator"):
        op = SubspaceOperator(lines, sub.basis, torch.from_numpy(maps), device=dev,
                              coil_batch=settings.coil_batch)
        if held is not None:
            op.held_out = HeldOutLines(held, sub.basis, device=dev, coil_batch=settings.coil_batch)
    info = dict(protocol=proto.name, rank=sub.rank, energy=sub.energy, device=str(dev),
                coils=lines.n_coils, frames=lines.n_frames, lines=len(measured.frame),
                acceleration=measured.acceleration(), settings=asdict(settings), noise_var=noise_var,
                _frame_fraction=np.bincount(lines.frame, minlength=lines.n_frames) / (lines.nz * lines.ny),
                _islands=islands)
    return proto, sub.to(dev), op, torch.from_numpy(support).to(dev), info


def split_lines(lines: KSpaceLines, fraction: float, seed: int = 0):
    """(fitted, held out): ``fraction`` of the lines, drawn at random (seeded), held out; (lines,
    None) when that rounds to no line (a scan of under 10 lines at the default 0.05)."""
    if not 0 < fraction < 0.5:
        raise ReconError(f"holdout={fraction:g}: want a fraction of the lines between 0 and 0.5")
    n = len(lines.frame)
    n_held = int(round(fraction * n))
    if n_held < 1:
        log.info("recon: holdout=%g of %d lines is no line: every line fitted", fraction, n)
        return lines, None
    pick = np.zeros(n, bool)
    pick[np.random.default_rng(seed + 3).choice(n, n_held, replace=False)] = True
    return lines.select(~pick), lines.select(pick)


def match_maps(sub: SubspaceModel, x: torch.Tensor, support: torch.Tensor, encodes_b1: bool) -> dict:
    """Dictionary matching of coefficient images X (K, nz, ny, nx) inside the support."""
    vox = x[:, support].T
    m = sub.match(vox)
    out = {}
    for name, key in (("T1", "t1"), ("T2", "t2"), ("B1", "b1"), ("PD", "pd")):
        if name == "B1" and not encodes_b1:
            continue
        vol = torch.zeros(support.shape, dtype=m[key].dtype, device=support.device)
        vol[support] = m[key].to(support.device)
        out[name] = vol
    return out


def reconstruct(scan: Scan, settings: ReconSettings | None = None, progress=None,
                protocol: protocol_mod.Protocol | None = None,
                device: torch.device | None = None) -> ReconResult:
    """Maps from one scan. ``protocol`` and ``device``: as the caller resolved them (the gadget, at
    the header); default: resolved here, once, from the settings and the scan. When the GPU runs
    out of memory the reconstruction degrades instead of failing, with a warning in the log at each
    step: it is repeated with half as many coils per FFT batch (the operator's coil-sized tensors
    shrink in proportion) down to one coil at a time, and only then on the CPU."""
    settings = settings or ReconSettings()
    protocol = protocol if protocol is not None else scan_protocol(scan, settings.protocol)
    device = device if device is not None else resolve_device(settings.device)
    steps = []
    while True:
        try:
            result = _reconstruct(scan, settings, progress, protocol=protocol, device=device)
            if steps:
                result.info["fallback"] = "; ".join(steps)
            return result
        except torch.cuda.OutOfMemoryError as err:
            if device.type != "cuda":
                raise
            why = str(err).splitlines()[0]
            torch.cuda.empty_cache()
            coils = settings.virtual_coils or scan.lines.n_coils
            batch = settings.coil_batch if 0 < settings.coil_batch < coils else coils
            if batch > 1:
                settings = replace(settings, coil_batch=batch // 2)
                steps.append(f"coil_batch {batch // 2} after CUDA out of memory")
                log.warning("recon: out of GPU memory (%s); retrying with %d coils per batch "
                            "instead of %d", why, batch // 2, batch)
                continue
            log.warning("recon: out of GPU memory (%s) even one coil at a time; falling back to "
                        "the CPU, which is much slower", why)
            settings = replace(settings, device="cpu", coil_batch=0)
            device = torch.device("cpu")
            steps.append("cpu after CUDA out of memory")


def _reconstruct(scan: Scan, settings: ReconSettings, progress=None, protocol=None,
                 device=None) -> ReconResult:
    timings: dict = {}
    stage = Stage(timings)
    torch.manual_seed(settings.seed)
    proto, sub, op, support, info = prepare(scan, settings, timings, protocol, device)
    with stage("fit"):
        if settings.method in NETWORK_METHODS:
            from .lorein import fit as lorein
            config = fit_config(settings)
            maps, fit_info = lorein.fit(settings.method, op, sub, support, proto.encodes_b1,
                                        iterations=settings.iterations, seed=settings.seed,
                                        progress=progress, config=config)
            info.update(fit_info)
        else:
            it = settings.iterations
            if settings.method == "zerofill":
                x = baselines.zero_filled(op)
            elif settings.method == "cg":
                x = baselines.cg_recon(op, iters=it or 30)
            else:
                x = baselines.llr_recon(op, iters=it or 80)
            maps = match_maps(sub, x, support, proto.encodes_b1)
    sup_np = support.cpu().numpy() & ~info.pop("_islands")     # the maps' mask
    gain = data_scale(op, sub, maps, support)
    info["data_scale"] = gain
    noise = confidence.NoiseModel(
        coil_rss2=(op.maps.abs() ** 2).sum(0).cpu().numpy(), frame_fraction=info.pop("_frame_fraction"),
        noise_var=info["noise_var"],
        pd_scale=gain * pd_reference(maps["PD"].detach().cpu().numpy(), sup_np))
    info["method"] = settings.method
    return ReconResult(finish_maps(maps, torch.from_numpy(sup_np)), timings, info, subspace=sub.to("cpu"),
                       noise=noise)


def object_support(low: np.ndarray, fraction: float, background_factor: float = 2.5,
                   cap: float = 0.3, edge: int = 2) -> tuple[np.ndarray, float]:
    """(support, threshold): the low-resolution image above ``fraction`` of its 99th percentile
    (the threshold), unless the background is brighter than that allows. The background's level is
    the 25th percentile over the box's outer ``edge`` voxels (mostly outside a head even where the
    neck leaves the box). Where ``background_factor`` x that level (at most ``cap`` x the 99th
    percentile) exceeds the threshold, as when a calibration block shared out among the frames
    leaves a floor of noise and leaked contrast, the support is the voxels above that raised level
    grown by one voxel into those above the threshold."""
    p99 = float(np.percentile(low, 99))
    threshold = fraction * p99
    support = low > threshold
    w = min(edge, min(low.shape) // 4)
    if w < 1:
        return support, threshold
    rim = np.ones(low.shape, bool)
    rim[w:-w, w:-w, w:-w] = False
    background = float(np.percentile(low[rim], 25))
    raised = min(background_factor * background, cap * p99)
    if raised > threshold:
        support = ndimage.binary_dilation(low > raised) & support
        log.info("support: background at %.3f of the 99th percentile; threshold raised from %.3f "
                 "to %.3f (%d voxels)", background / p99, fraction, raised / p99,
                 int(support.sum()))
    return support, threshold


def ringing_islands(low: np.ndarray, support: np.ndarray, threshold: float,
                    factor: float = 3.0) -> np.ndarray:
    """The parts of the support that are ringing, not object: connected components (face-connected)
    of the low-resolution image above ``threshold`` whose brightest voxel stays below ``factor`` x
    the threshold (and below half the image's maximum). Side lobes of the truncated calibration
    image outside the head are such islands; an object, however small, is brighter inside. The fit
    runs in the whole support; the maps are zero in the islands."""
    labels, n = ndimage.label(support)
    if n == 0:
        return np.zeros_like(support, dtype=bool)
    peaks = np.asarray(ndimage.maximum(low, labels, index=np.arange(1, n + 1)))
    faint = np.concatenate([[False], peaks < min(factor * threshold, 0.5 * float(low.max()))])
    return faint[labels]


def data_scale(op: SubspaceOperator, sub: SubspaceModel, maps: dict, support: torch.Tensor) -> float:
    """The least-squares gain a of the maps' model signal X = PD U^H s(T1, T2, B1) against the
    data, min ||a A X - y||: 1 when PD is in the data's units (a fit), far from it when the
    method's PD is not (zero-filled matching of a sparse MRF train picks up the cross-talk between
    coefficients, PD 50x too high). The confidence maps use PD x a, the signal the data support."""
    with torch.no_grad():
        def vox(name):
            return maps[name].detach()[support].real.float() if name in maps else None
        c = maps["PD"].detach()[support].to(torch.complex64)[:, None] * sub.coefficients(
            vox("T1").clamp_min(1e-3), vox("T2").clamp_min(1e-3), vox("B1"))
        x = torch.zeros((sub.rank,) + tuple(support.shape), dtype=torch.complex64, device=support.device)
        x[:, support] = c.T.to(x.device)
        num = float((x.conj() * op.adjoint_data()).sum().real)
        den = float((x.conj() * op.normal(x)).sum().real)
    return num / den if den > 0 and num > 0 else 1.0


def model_coefficients(result: ReconResult) -> np.ndarray:
    """The signal model's subspace coefficients at the fitted maps, PD x U^H s(T1, T2, B1):
    (K, nz, ny, nx) complex64, zero outside the support."""
    maps = result.maps
    sup = np.asarray(maps.mask, bool)

    def inside(vol):
        return None if vol is None else torch.from_numpy(np.asarray(vol, np.float32)[sup])
    with torch.no_grad():
        c = (inside(maps.pd)[:, None] * result.subspace.coefficients(
            inside(maps.t1).clamp_min(1e-3), inside(maps.t2).clamp_min(1e-3), inside(maps.b1))).numpy()
    coeffs = np.zeros((c.shape[1],) + sup.shape, np.complex64)
    coeffs[:, sup] = c.T
    return coeffs


def fit_config(settings: ReconSettings):
    """The network methods' lorein.FitConfig for these settings."""
    from .lorein import fit as lorein
    return lorein.FitConfig(**{name: getattr(settings, name) for name in FIT_NAMES})


def finish_maps(maps: dict, support: torch.Tensor) -> Maps:
    """Device maps {name: tensor} (the fit's and match_maps') -> the float32 numpy :class:`Maps`
    returned (PD normalised, zero outside the support, which becomes the mask)."""
    sup = support.cpu().numpy()
    out = {k: v.detach().cpu().numpy() for k, v in maps.items()}
    out = {k: np.where(sup, normalise_pd(v, sup) if k == "PD" else v.real, 0).astype(np.float32)
           for k, v in out.items()}
    return Maps.from_dict(out, sup)
