"""A simulation's files, as a library: the simulation plan (checked options), the files it writes
(raw data, truth .npz, preview) and the truth file read back. ``lorein simulate`` / ``demo``
(gadget_lorein/runner.py) and test_data/make_test_data.py use it."""
from __future__ import annotations

import time
from pathlib import Path

from ..data import MAP_NAMES
from ..usage import UsageError, check_input

SEQUENCES = ("qalas", "mrf")
DEFAULT_ACCEL = {"qalas": 8.0, "mrf": 200.0}   # where the default method leads (RESULTS, accuracy)
DEFAULT_SNR = 30.0       # realistic mode: white matter's SNR in the brightest contrast
DEFAULT_NOISE = 0.01     # ideal mode: noise sd relative to the largest image magnitude
MATRIX_MIN, MATRIX_MAX = 8, 512


def check_matrix(matrix) -> tuple[int, int, int]:
    nx, ny, nz = matrix
    for name, v in (("nx", nx), ("ny", ny), ("nz", nz)):
        if not MATRIX_MIN <= v <= MATRIX_MAX:
            raise UsageError(f"--matrix {nx} {ny} {nz}: {name} = {v} is outside {MATRIX_MIN}..{MATRIX_MAX}")
    return int(nx), int(ny), int(nz)


def load_protocol(sequence: str | None, protocol_path: str | None):
    from ..physics import protocol as protocol_mod
    if protocol_path:
        p = Path(protocol_path)
        if not p.is_file():
            raise UsageError(f"--protocol {protocol_path}: no such file (give a YAML file; shipped "
                             f"protocols are chosen with --sequence {'|'.join(SEQUENCES)})")
        try:
            proto = protocol_mod.from_yaml(p.read_text())
        except (protocol_mod.ProtocolError, UnicodeDecodeError) as err:
            raise UsageError(f"--protocol {protocol_path}: {err}") from None
        if sequence and proto.kind != sequence:
            raise UsageError(f"--protocol {protocol_path} is a '{proto.kind}' protocol but "
                             f"--sequence {sequence} was asked for")
        return proto
    return protocol_mod.load(sequence or "qalas")


def simulation_plan(args):
    """Check and complete the simulation options: (protocol, dict of simulate() arguments).
    Realistic mode unless --ideal (simulate.simulate's modes)."""
    from . import simulate
    matrix = check_matrix(args.matrix)
    proto = load_protocol(args.sequence, args.protocol)
    accel = args.accel if args.accel is not None else DEFAULT_ACCEL.get(proto.kind, 16.0)
    ideal = getattr(args, "ideal", False)
    if not ideal and args.noise is not None:
        raise UsageError("--noise (relative to the largest image) is the idealised mode's knob: "
                         "add --ideal, or give the realistic mode an --snr")
    if ideal and getattr(args, "snr", None) is not None:
        raise UsageError("--snr is the realistic mode's knob: without --ideal, or --noise with it")
    mode = "ideal" if ideal else "realistic"
    _, ny, nz = matrix
    calib = tuple(args.calib) if getattr(args, "calib", None) else None
    try:
        # the masks themselves (cheap): every budget and calibration check of the simulator
        _, calib, calib_mode, pattern = simulate.scan_masks(
            proto, ny, nz, accel, calib, args.calib_mode, args.pattern, args.seed, mode)
    except ValueError as err:
        raise UsageError(f"sampling: {err}") from None
    if calib[0] * calib[1] == 0:
        raise UsageError("--calib 0 0: the reconstruction needs a calibration region (coil maps)")
    plan = dict(matrix=matrix, n_coils=args.coils, accel=accel, seed=args.seed, calib=calib,
                calib_mode=calib_mode, mode=mode, pattern=pattern)
    if ideal:
        plan["noise"] = DEFAULT_NOISE if args.noise is None else args.noise
    else:
        plan["snr"] = DEFAULT_SNR if args.snr is None else args.snr
    return proto, plan


def noise_text(plan: dict) -> str:
    """'noise 0.01 (ideal)' or 'SNR 30' for messages and titles."""
    return f"noise {plan['noise']:g} (ideal)" if plan.get("mode") == "ideal" else f"SNR {plan['snr']:g}"


def save_npz(path, arrays: dict) -> None:
    """np.savez_compressed, but byte-for-byte reproducible (fixed zip time stamps)."""
    import io
    import zipfile

    import numpy as np
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def truth_arrays(sim, proto) -> dict:
    """What the truth .npz holds: T1, T2 [ms], PD, B1 (protocols that encode it), labels
    (0 background, 1 WM, 2 GM, 3 CSF, 4 lesion), brain_mask, and fov_mm / protocol / matrix."""
    import numpy as np
    t = sim.truth()
    out = {k: np.asarray(t[k], np.float32) for k in MAP_NAMES if k in t}
    out["labels"] = np.asarray(t["labels"], np.uint8)
    out["brain_mask"] = np.asarray(t["labels"] > 0)
    if "pure" in t:         # realistic mode: voxels without partial volume
        out["pure"] = np.asarray(t["pure"], bool)
    out["fov_mm"] = np.asarray(sim.scan.fov_mm, np.float64)
    out["protocol"] = np.asarray(proto.name)
    nz, ny, nx = out["T1"].shape
    out["matrix"] = np.asarray([nx, ny, nz], np.int64)
    return out


def load_truth(path) -> dict:
    """A truth .npz as written by ``lorein simulate`` (also accepts lower-case t1/t2/pd/b1 keys;
    ``pure`` only where the file has it: ideal-mode and older files do not)."""
    import numpy as np
    check_input(path, "truth file", hdf5=False)
    keys = {"t1": "T1", "t2": "T2", "pd": "PD", "b1": "B1"}
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {keys.get(k, k): np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as err:
        raise UsageError(f"truth file {path} is not a .npz written by 'lorein simulate': {err}") from None
    missing = [k for k in ("T1", "T2", "PD", "labels") if k not in out]
    if missing:
        raise UsageError(f"truth file {path} has no {', '.join(missing)} "
                         "(write it with 'lorein simulate --truth')")
    return out


def repetition_noise_seed(seed: int, repetition: int) -> int:
    """The receiver noise's seed of a repetition (repetition 0: the scan's own seed)."""
    return int(seed) + 7919 * int(repetition)


def simulate_to_files(proto, plan: dict, raw_path, truth_path=None, png_path=None, oversampling=1,
                      say=None, repetitions: int = 1):
    """Simulate, write the raw file (replacing it), the truth .npz and the preview figure.
    ``repetitions`` > 1: a multi-volume scan, the same object, coils and sampling with fresh noise
    per repetition (:func:`repetition_noise_seed`), each with its own noise scan; the truth is the
    object's. Returns (simulation of repetition 0, number of acquisitions written)."""
    from . import sampling, simulate
    from ..physics import sequences
    from ..io import rawfile
    say = say or (lambda text: None)
    nx, ny, nz = plan["matrix"]
    say(f"simulating {proto.name} ({proto.n_frames} frames), matrix {nx}x{ny}x{nz}, {plan['n_coils']} coils, "
        f"R = {plan['accel']:g}, calibration {plan['calib'][0]}x{plan['calib'][1]} ({plan['calib_mode']}, "
        f"pattern {plan.get('pattern') or 'per_frame'}), {noise_text(plan)}, seed {plan['seed']}")
    t0 = time.perf_counter()
    if repetitions < 1:
        raise UsageError(f"--repetitions {repetitions}: at least 1")
    sims = [simulate.simulate(proto, **plan, noise_seed=repetition_noise_seed(plan["seed"], r))
            for r in range(repetitions)]
    sim = sims[0]
    scan = sim.scan
    say(f"simulated {len(scan.lines.frame)} k-space lines"
        + (f" x {repetitions} repetitions" if repetitions > 1 else "") + f" in {time.perf_counter() - t0:.1f} s")
    raw_path = Path(raw_path)
    if raw_path.exists():
        raw_path.unlink()
    t0 = time.perf_counter()
    calib_region = sampling.calib_region(ny, nz, plan["calib"])
    if repetitions > 1:
        lines, noise = [x.scan.lines for x in sims], [x.scan.noise for x in sims]
    else:
        lines, noise = scan.lines, scan.noise
    n = rawfile.write_raw(raw_path, lines, None, calib_region, noise, proto.name, proto.yaml_text,
                      scan.fov_mm, sequences.sequence_parameters(proto), oversampling=oversampling)
    say(f"wrote {raw_path}: {n} acquisitions ({n - repetitions * len(scan.lines.frame)} noise) in "
        f"{time.perf_counter() - t0:.1f} s")
    if truth_path:
        save_npz(truth_path, truth_arrays(sim, proto))
        say(f"wrote {truth_path}: ground-truth maps, labels and brain mask")
    if png_path:
        from .. import plots
        plots.simulation_figure(sim, proto, png_path, accel=plan["accel"])
        say(f"wrote {png_path}")
    return sim, n


