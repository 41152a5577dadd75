"""The ``lorein`` command line: simulate, recon, replay, serve, demo.

    lorein simulate --sequence qalas -o raw.h5 --truth truth.npz --png preview.png
    lorein recon raw.h5 -o maps.h5 --truth truth.npz --png maps.png
    lorein replay raw.h5 -o out.h5 -c lorein.xml          # through a running Gadgetron
    lorein serve --port 18000                              # passive mode (lorein_connect.xml)
    lorein demo                                            # simulate -> gadget -> maps -> figure

Exit status: 0 success; 2 a mistake in the command (bad option, missing or unreadable input,
unwritable output, a setting or protocol the reconstruction cannot use, data outside the contract),
reported as one line on stderr; 1 an unexpected failure (one line; the traceback with
``--verbose`` or LOREIN_DEBUG=1); 130 interrupted.

Heavy modules (torch, the reconstruction, the gadget) are imported inside the commands, after the
arguments have been checked, so that mistakes are reported at once.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import __version__

PROG = "lorein"
SEQUENCES = ("qalas", "mrf")
METHODS = ("lorein", "pmr", "lrr", "cg", "llr", "zerofill")     # = recon.METHODS (checked in tests)
DEFAULT_ACCEL = {"qalas": 16.0, "mrf": 200.0}
DEFAULT_MATRIX = (64, 64, 48)
# The demo's default size: the whole demo (simulation, LoREIN fit on CPU, figure) in a few minutes
# on 2 cores (measured timings in README.md).
DEMO_MATRIX = (48, 48, 32)
DEMO_GROUP = "demo"
MATRIX_MIN, MATRIX_MAX = 8, 512
COILS_MAX = 128
MAP_ORDER = ("T1", "T2", "PD", "B1")

log = logging.getLogger("gadget_lorein.cli")


class UsageError(Exception):
    """A mistake in the command; exit status 2, one line on stderr."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, so that main() reports them and returns 2)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------------
# argument types and checks
# --------------------------------------------------------------------------------------------

def _int_at_least(low: int, what: str = "an integer"):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} >= {low} expected, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{what} >= {low} expected, got {v}")
        return v
    parse.__name__ = "int"
    return parse


def _float_range(low: float, high: float = math.inf, low_open: bool = False, what: str = "a number"):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} expected, got {text!r}") from None
        bad = not math.isfinite(v) or v > high or (v <= low if low_open else v < low)
        if bad:
            lo = f"> {low:g}" if low_open else f">= {low:g}"
            rng = lo if high == math.inf else f"{lo} and <= {high:g}"
            raise argparse.ArgumentTypeError(f"{what} {rng} expected, got {text!r}")
        return v
    parse.__name__ = "float"
    return parse


def _port(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a TCP port (0-65535) expected, got {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port (0-65535) expected, got {v}")
    return v


def _check_matrix(matrix) -> tuple[int, int, int]:
    nx, ny, nz = matrix
    for name, v in (("nx", nx), ("ny", ny), ("nz", nz)):
        if not MATRIX_MIN <= v <= MATRIX_MAX:
            raise UsageError(f"--matrix {nx} {ny} {nz}: {name} = {v} is outside {MATRIX_MIN}..{MATRIX_MAX}")
    return int(nx), int(ny), int(nz)


def _check_output(path, what: str = "output") -> Path:
    """The output file's folder must exist and take a new file; the path must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {what} {path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lorein-write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write {what} {path}: {err.strerror or err}") from None
    return path


def _check_input(path, what: str = "input", hdf5: bool = True) -> Path:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    if not path.is_file():
        raise UsageError(f"{what} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path} is not readable")
    if hdf5:
        import h5py
        if not h5py.is_hdf5(path):
            raise UsageError(f"{what} {path} is not an HDF5 file (an ISMRMRD raw file is expected)")
        try:
            with h5py.File(path, "r") as f:
                groups = sorted(f.keys())
                ok = "dataset" in f and "xml" in f["dataset"]
        except OSError as err:
            raise UsageError(f"{what} {path} cannot be read: {err}") from None
        if not ok:
            raise UsageError(f"{what} {path} has no ISMRMRD raw data (/dataset/xml); groups: "
                             f"{', '.join(groups) or 'none'}")
    return path


def _setup_logging(args) -> None:
    level = logging.WARNING if getattr(args, "quiet", False) else (
        logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    root = logging.getLogger()
    if not root.handlers:      # (in-process callers such as tests keep their own handlers)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("gadget_lorein").setLevel(level)


def _say(args, text: str) -> None:
    """A progress line on stderr (not with --quiet)."""
    if not getattr(args, "quiet", False):
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# simulate
# --------------------------------------------------------------------------------------------

def _load_protocol(sequence: str | None, protocol_path: str | None):
    from .physics import protocol as protocol_mod
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
    """Check and complete the simulation options: (protocol, dict of simulate() arguments)."""
    from .sim import sampling
    matrix = _check_matrix(args.matrix)
    proto = _load_protocol(args.sequence, args.protocol)
    accel = args.accel if args.accel is not None else DEFAULT_ACCEL.get(proto.kind, 16.0)
    n_frames = proto.n_frames
    mode = args.calib_mode or "union"   # the simulator's default: a shared block big enough for coil maps
    nx, ny, nz = matrix
    calib = tuple(args.calib) if args.calib else None
    try:
        if calib is None:
            calib = sampling.auto_calib(n_frames, ny, nz, accel, mode)
        # the masks themselves (cheap): every budget and calibration check of the simulator
        sampling.sampling_masks(n_frames, ny, nz, accel, calib=calib, calib_mode=mode, seed=args.seed)
    except ValueError as err:
        raise UsageError(f"sampling: {err}") from None
    if calib[0] * calib[1] == 0:
        raise UsageError("--calib 0 0: the reconstruction needs a calibration region (coil maps)")
    return proto, dict(matrix=matrix, n_coils=args.coils, accel=accel, noise=args.noise,
                       seed=args.seed, calib=calib, calib_mode=mode)


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
    out = {k: np.asarray(t[k], np.float32) for k in MAP_ORDER if k in t}
    out["labels"] = np.asarray(t["labels"], np.uint8)
    out["brain_mask"] = np.asarray(t["labels"] > 0)
    out["fov_mm"] = np.asarray(sim.scan.fov_mm, np.float64)
    out["protocol"] = np.asarray(proto.name)
    nz, ny, nx = out["T1"].shape
    out["matrix"] = np.asarray([nx, ny, nz], np.int64)
    return out


def load_truth(path) -> dict:
    """A truth .npz as written by ``lorein simulate`` (also accepts lower-case t1/t2/pd/b1 keys)."""
    import numpy as np
    _check_input(path, "truth file", hdf5=False)
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


def simulate_to_files(proto, plan: dict, raw_path, truth_path=None, png_path=None, oversampling=1,
                      say=None):
    """Simulate, write the raw file (replacing it), the truth .npz and the preview figure.
    Returns (simulation, number of acquisitions written)."""
    from .sim import sampling, simulate
    from .physics import sequences
    from .io import rawfile
    say = say or (lambda text: None)
    nx, ny, nz = plan["matrix"]
    say(f"simulating {proto.name} ({proto.n_frames} frames), matrix {nx}x{ny}x{nz}, {plan['n_coils']} coils, "
        f"R = {plan['accel']:g}, calibration {plan['calib'][0]}x{plan['calib'][1]} ({plan['calib_mode']}), "
        f"noise {plan['noise']:g}, seed {plan['seed']}")
    t0 = time.perf_counter()
    sim = simulate.simulate(proto, **plan)
    scan = sim.scan
    say(f"simulated {len(scan.lines.frame)} k-space lines in {time.perf_counter() - t0:.1f} s")
    raw_path = Path(raw_path)
    if raw_path.exists():
        raw_path.unlink()
    t0 = time.perf_counter()
    calib_region = sampling.calib_region(ny, nz, plan["calib"])
    n = rawfile.write_raw(raw_path, scan.lines, None, calib_region, scan.noise, proto.name, proto.yaml_text,
                      scan.fov_mm, sequences.sequence_parameters(proto), oversampling=oversampling)
    say(f"wrote {raw_path}: {n} acquisitions ({n - len(scan.lines.frame)} noise) in "
        f"{time.perf_counter() - t0:.1f} s")
    if truth_path:
        save_npz(truth_path, truth_arrays(sim, proto))
        say(f"wrote {truth_path}: ground-truth maps, labels and brain mask")
    if png_path:
        from . import plots
        plots.simulation_figure(sim, proto, png_path, accel=plan["accel"])
        say(f"wrote {png_path}")
    return sim, n


def cmd_simulate(args) -> int:
    raw = _check_output(args.output, "raw file")
    truth = _check_output(args.truth, "truth file") if args.truth else None
    png = _check_output(args.png, "figure") if args.png else None
    proto, plan = simulation_plan(args)
    _, n = simulate_to_files(proto, plan, raw, truth, png, oversampling=args.oversampling,
                             say=lambda t: _say(args, t))
    print(f"{raw}: {proto.name}, {n} acquisitions, matrix {'x'.join(map(str, plan['matrix']))}, "
          f"{plan['n_coils']} coils, R = {plan['accel']:g}")
    return 0


# --------------------------------------------------------------------------------------------
# recon
# --------------------------------------------------------------------------------------------

def _add_settings_arguments(p: argparse.ArgumentParser, with_method=True) -> None:
    """The reconstruction settings (recon.ReconSettings / the chain's properties); unset = default."""
    g = p.add_argument_group("reconstruction settings (default: the gadget's, see gadget_lorein/node/gadget.py)")
    if with_method:
        g.add_argument("--method", choices=METHODS, help="reconstruction method (default: the gadget's, "
                       "recon.ReconSettings.method)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--rank", type=_int_at_least(0), help="subspace rank; 0 = from --energy (default)")
    g.add_argument("--energy", type=_float_range(0.0, 1.0, low_open=True),
                   help="dictionary energy the subspace keeps when rank is 0 (default 0.999)")
    g.add_argument("--iterations", type=_int_at_least(0), help="iterations; 0 = the method's default")
    g.add_argument("--coil-maps", choices=("lowres", "espirit"), help="coil sensitivities (default lowres)")
    g.add_argument("--virtual-coils", type=_int_at_least(0), help="coil compression; 0 = off (default)")
    g.add_argument("--coil-batch", type=_int_at_least(0),
                   help="coils per FFT batch in the fit; 0 = all (default; halved on GPU out-of-memory)")
    g.add_argument("--coil-subset", type=_int_at_least(0),
                   help="speed: coils drawn at random per fit step for the data terms; 0 = all (default)")
    g.add_argument("--coil-refine", type=_int_at_least(0),
                   help="network methods: refine the coil maps jointly, a smooth correction of this many "
                        "central k-space coefficients per axis (default 8); 0 = off")
    g.add_argument("--couple-weight", type=_float_range(0.0),
                   help="lorein: weight of the coupling between its two blocks (default 0.1)")
    g.add_argument("--holdout", type=_float_range(0.0, 0.5),
                   help="network methods: fraction of the measured lines held out of the fit; its maps "
                        "are those where the held-out lines were predicted best (default 0.05; 0 = off)")
    g.add_argument("--grid-levels", type=_int_at_least(1), help="network methods: hash-grid levels (default 12)")
    g.add_argument("--grid-features", type=_int_at_least(1), help="features per hash-grid level (default 2)")
    g.add_argument("--grid-log2-table", type=_int_at_least(0),
                   help="log2 of the hash-table entries per level (10-24); 0 = from the voxel count (default)")
    g.add_argument("--grid-base", type=_int_at_least(1), help="coarsest hash-grid resolution (default 4)")
    g.add_argument("--grid-finest", type=_int_at_least(0),
                   help="finest hash-grid resolution; 0 = the largest matrix dimension (default)")
    g.add_argument("--mlp-width", type=_int_at_least(1), help="hidden units per MLP layer (default 64)")
    g.add_argument("--mlp-layers", type=_int_at_least(0), help="hidden MLP layers (default 2)")
    g.add_argument("--lrr-finest", type=_int_at_least(0),
                   help="lorein: the LRR network's finest hash-grid resolution; 0 = the PMR network's "
                        "own (default)")
    g.add_argument("--support-threshold", type=_float_range(0.0, 1.0),
                   help="object support: low-resolution image above this fraction of its 99th "
                        "percentile (default 0.08; below 1)")
    g.add_argument("--amp", action="store_true", default=None,
                   help="speed: the fit's network MLPs in bfloat16 (for GPUs)")
    g.add_argument("--protocol", dest="recon_protocol", metavar="NAME_OR_YAML",
                   help="override the protocol named in the data")
    g.add_argument("--seed", type=int, help="seed of the network initialisation (default 0)")
    g.add_argument("--output", dest="output_kind", choices=("maps", "maps+coefficients"),
                   help="images to return (default maps)")
    g.add_argument("--max-memory-gb", type=float, help="memory ceiling of one reconstruction in GB "
                   "(default: 80%% of the available memory; gadget_lorein/limits.py has every limit)")
    g.add_argument("--images-2d", action="store_true", default=None,
                   help="one 2D image per partition instead of one 3D image per map")


def settings_from_args(args) -> dict:
    """The settings mapping for gadget.recon_file / gadget.serve: only what was given."""
    names = dict(method="method", device="device", rank="rank", energy="energy", iterations="iterations",
                 coil_maps="coil_maps", virtual_coils="virtual_coils", coil_batch="coil_batch",
                 coil_subset="coil_subset", amp="amp", coil_refine="coil_refine", recon_protocol="protocol",
                 seed="seed", output_kind="output", images_2d="images_2d", couple_weight="couple_weight",
                 grid_levels="grid_levels", grid_features="grid_features",
                 grid_log2_table="grid_log2_table", grid_base="grid_base", grid_finest="grid_finest",
                 mlp_width="mlp_width", mlp_layers="mlp_layers", support_threshold="support_threshold",
                 holdout="holdout", lrr_finest="lrr_finest", max_memory_gb="max_memory_gb")
    out = {}
    for attr, name in names.items():
        v = getattr(args, attr, None)
        if v is not None:
            out[name] = v
    if out.get("protocol"):
        p = Path(out["protocol"])
        if p.suffix in (".yaml", ".yml") and not p.is_file():
            raise UsageError(f"--protocol {p}: no such file")
    return out


def _validate_settings(settings: dict) -> None:
    from .node import gadget
    try:
        gadget.parse_settings(settings)
    except ValueError as err:
        raise UsageError(str(err)) from None


def nrmse_table(maps: dict, truth: dict) -> str:
    """NRMSE per map over the brain and the tissue (WM, GM, lesions), as a text table."""
    from . import metrics
    brain = metrics.map_errors(maps, truth, "brain")
    tissue = metrics.map_errors(maps, truth, "tissue")
    lines = ["NRMSE   brain    tissue (WM, GM, lesions)"]
    for k in MAP_ORDER:
        if k in brain:
            lines.append(f"{k:<6}  {brain[k]:6.4f}   {tissue[k]:6.4f}")
    lines.append("(PD after a least-squares scale; CSF's long T2 dominates the whole-brain T2 figure)")
    return "\n".join(lines)


def _check_truth_shape(maps: dict, truth: dict, path) -> None:
    shape = next(iter(maps.values())).shape if maps else None
    if shape is not None and truth["T1"].shape != shape:
        raise UsageError(f"truth file {path} has volumes of shape {truth['T1'].shape} (nz, ny, nx) "
                         f"but the maps have {shape}: not the truth of this scan")


def _check_truth_matrix(raw, truth: dict, path) -> None:
    """Before a long reconstruction: the truth must have the raw header's recon matrix."""
    from .io import header, rawfile
    xml, _ = rawfile.iter_raw(raw)
    space = header.parse_header(xml).encoding[0].reconSpace.matrixSize
    want = (int(space.z), int(space.y), int(space.x))
    if tuple(truth["T1"].shape) != want:
        raise UsageError(f"truth file {path} has volumes of shape {tuple(truth['T1'].shape)} (nz, ny, nx) "
                         f"but {raw} has a {want[2]}x{want[1]}x{want[0]} matrix: not the truth of this scan")


def _replace_group(path: Path, group: str) -> None:
    """Remove ``group`` from an existing output file (the images would otherwise be appended)."""
    if not path.exists():
        return
    import h5py
    if not h5py.is_hdf5(path):
        raise UsageError(f"output {path} exists and is not an HDF5 file; remove it or choose another name")
    with h5py.File(path, "a") as f:
        if group in f:
            del f[group]


def run_recon(raw, out, settings: dict, group: str | None, say=None):
    """gadget.recon_file (the gadget's own code path) -> (maps dict, images, seconds)."""
    from .io import map_images
    from .node import gadget
    say = say or (lambda text: None)
    if group:
        _replace_group(Path(out), group)
    t0 = time.perf_counter()
    images = gadget.recon_file(str(raw), str(out), settings, group=group)
    seconds = time.perf_counter() - t0
    maps = map_images.images_to_maps([im for im in images if int(im.image_series_index) < 100])
    say(f"reconstructed {', '.join(k for k in MAP_ORDER if k in maps)} in {seconds:.1f} s -> {out}")
    return maps, images, seconds


def cmd_recon(args) -> int:
    raw = _check_input(args.input, "raw file")
    out = _check_output(args.out, "output")
    png = _check_output(args.png, "figure") if args.png else None
    truth = load_truth(args.truth) if args.truth else None
    if out.resolve() == raw.resolve():
        raise UsageError("the output file must not be the raw file")
    settings = settings_from_args(args)
    _validate_settings(settings)
    if truth is not None:
        _check_truth_matrix(raw, truth, args.truth)
    _say(args, f"reconstructing {raw} ({settings.get('method', 'lorein')})")
    maps, images, seconds = run_recon(raw, out, settings, args.group, say=lambda t: _say(args, t))
    if truth is not None:
        _check_truth_shape(maps, truth, args.truth)
        print(nrmse_table(maps, truth))
    if png:
        from . import plots
        method = settings.get("method", "lorein")
        plots.maps_figure(maps, png, truth=truth, title=f"{method} reconstruction of {raw.name}")
        _say(args, f"wrote {png}")
    print(f"{out}: {len(images)} images ({', '.join(k for k in MAP_ORDER if k in maps)}), "
          f"{seconds:.1f} s")
    return 0


# --------------------------------------------------------------------------------------------
# replay, serve
# --------------------------------------------------------------------------------------------

def cmd_replay(args) -> int:
    from .node import replay
    _check_input(args.input, "raw file")
    if args.config_local:
        _check_input(args.config_local, "chain file", hdf5=False)
    if not 0 < args.port <= 65535:
        raise UsageError(f"--port {args.port}: a TCP port (1-65535) expected")
    _check_output(args.outfile, "output")
    return replay.run_replay(args)


def _check_port_free(host: str, port: int) -> None:
    """Bind (and close) a socket as the gadget will, so that a busy port is reported at once."""
    import socket
    if port == 0:
        return
    families = [socket.AF_INET6, socket.AF_INET] if not host or ":" in host else [socket.AF_INET]
    for fam in families:
        try:
            sock = socket.socket(fam, socket.SOCK_STREAM)
        except OSError:
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as err:
                raise UsageError(f"cannot listen on port {port}: {err.strerror or err}") from None
        return


def cmd_serve(args) -> int:
    from .node import gadget
    settings = settings_from_args(args)
    _validate_settings(settings)
    _check_port_free(args.host, args.port)
    try:
        gadget.serve(args.port, settings or None, once=not args.forever, host=args.host)
    except OSError as err:
        if getattr(err, "errno", None) in (98, 99, 13):   # in use, cannot assign, permission
            raise UsageError(f"cannot listen on port {args.port}: {err.strerror or err}") from None
        raise
    return 0


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create {out}: {err.strerror or err}") from None
    _check_output(out / "raw.h5", "demo file")
    args.calib = None
    proto, plan = simulation_plan(args)
    settings = {"method": args.method}
    for name in ("iterations", "device", "rank"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.coil_maps:
        settings["coil_maps"] = args.coil_maps
    _validate_settings(settings)
    raw, truth_path = out / "raw.h5", out / "truth.npz"
    maps_path, png = out / "maps.h5", out / "maps.png"
    t_all = time.perf_counter()
    say = (lambda t: _say(args, t))
    say(f"demo 1/3: simulate ({proto.name}) -> {raw}")
    t0 = time.perf_counter()
    sim, _ = simulate_to_files(proto, plan, raw, truth_path, out / "simulation.png", say=say)
    t_sim = time.perf_counter() - t0
    say(f"demo 2/3: reconstruct through the gadget (method {args.method}) -> {maps_path}")
    if maps_path.exists():
        maps_path.unlink()
    maps, images, t_rec = run_recon(raw, maps_path, settings, DEMO_GROUP, say=say)
    say(f"demo 3/3: compare with the truth -> {png}")
    truth = load_truth(truth_path)
    _check_truth_shape(maps, truth, truth_path)
    from . import plots
    nx, ny, nz = plan["matrix"]
    plots.maps_figure(maps, png, truth=truth,
                      title=f"{args.method} | {proto.name}, {nx}x{ny}x{nz}, {plan['n_coils']} coils, "
                            f"R = {plan['accel']:g}, noise {plan['noise']:g}")
    total = time.perf_counter() - t_all
    print(nrmse_table(maps, truth))
    print(f"\nsimulation {t_sim:.1f} s, reconstruction {t_rec:.1f} s, total {total:.1f} s")
    print(f"files in {out}/:")
    for path, what in ((raw, "raw ISMRMRD data (input of the gadget)"),
                       (truth_path, "ground truth (T1, T2, PD, labels, brain mask)"),
                       (out / "simulation.png", "ground truth and one undersampled contrast"),
                       (maps_path, f"maps as ISMRMRD images (group '{DEMO_GROUP}')"),
                       (png, "truth, maps and error per map")):
        print(f"  {path.name:<15} {what}")
    return 0


# --------------------------------------------------------------------------------------------
# parser and main
# --------------------------------------------------------------------------------------------

def _common(verbose_only: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks of failures")
    if not verbose_only:
        p.add_argument("-q", "--quiet", action="store_true", help="warnings and results only")
    return p


def _add_simulation_arguments(p, matrix_default, accel_help) -> None:
    p.add_argument("--sequence", choices=SEQUENCES, help="shipped protocol (default qalas)")
    p.add_argument("--protocol", metavar="YAML", help="a protocol YAML file instead of a shipped one")
    p.add_argument("--matrix", nargs=3, type=int, metavar=("NX", "NY", "NZ"), default=list(matrix_default),
                   help=f"matrix (readout x phase x partition, {MATRIX_MIN}..{MATRIX_MAX}; "
                        f"default {' '.join(map(str, matrix_default))})")
    p.add_argument("--coils", type=_int_at_least(1, "a number of coils"), default=8,
                   help="receive coils (default 8)")
    p.add_argument("--accel", type=_float_range(1.0, what="an acceleration"), help=accel_help)
    p.add_argument("--noise", type=_float_range(0.0, what="a noise level"), default=0.01,
                   help="noise standard deviation relative to the largest image magnitude (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="phantom, coils, masks and noise (default 0)")
    p.add_argument("--calib-mode", choices=("per_frame", "union"),
                   help="calibration region in every frame, or split among frames (default: union, "
                        "which leaves room for a block big enough for good coil maps)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="gadget_lorein: LoREIN multi-parametric quantitative MRI "
                     "as a Gadgetron node (simulation, reconstruction, Gadgetron client and server).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__} (gadget_lorein)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    accel_help = f"acceleration R (default {DEFAULT_ACCEL['qalas']:g} for qalas, {DEFAULT_ACCEL['mrf']:g} for mrf)"

    p = sub.add_parser("simulate", parents=[_common()], help="simulate a raw ISMRMRD file and its ground truth",
                       description="Simulate an undersampled multi-coil 3D scan of the head phantom: raw "
                       "ISMRMRD file (-o), ground truth (--truth .npz, never in the raw file), preview (--png).")
    _add_simulation_arguments(p, DEFAULT_MATRIX, accel_help)
    p.add_argument("--calib", nargs=2, type=_int_at_least(0), metavar=("CY", "CZ"),
                   help="calibration region in ky x kz lines (default: chosen from the budget)")
    p.add_argument("--oversampling", type=int, choices=(1, 2), default=1, help="readout oversampling (default 1)")
    p.add_argument("-o", "--output", required=True, metavar="RAW.h5", help="raw file to write (replaced)")
    p.add_argument("--truth", metavar="TRUTH.npz", help="ground truth to write")
    p.add_argument("--png", metavar="PREVIEW.png", help="figure: truth maps and one zero-filled contrast")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("recon", parents=[_common()], help="reconstruct maps from a raw file (the gadget's code)",
                       description="Reconstruct parameter maps from a raw ISMRMRD file with the gadget's own "
                       "code path (gadget.recon_file) and write them as ISMRMRD images.")
    p.add_argument("input", metavar="RAW.h5")
    p.add_argument("-o", "--out", required=True, metavar="MAPS.h5", help="output file (images appended as "
                   "GROUP/image_<series>)")
    p.add_argument("-G", "--group", help="output group (default: local date and time, as the stock client; "
                   "an existing group of that name is replaced)")
    p.add_argument("--truth", metavar="TRUTH.npz", help="ground truth: print the NRMSE table")
    p.add_argument("--png", metavar="MAPS.png", help="figure of the maps (with truth and error if --truth)")
    _add_settings_arguments(p)
    p.set_defaults(func=cmd_recon)

    from_replay = None
    try:
        from .node.replay import add_replay_arguments
        from_replay = add_replay_arguments
    except ImportError:       # pragma: no cover - replay imports only h5py/ismrmrd/numpy/tqdm
        pass
    p = sub.add_parser("replay", parents=[_common(verbose_only=True)],
                       help="send a raw file through a running Gadgetron (like gadgetron_ismrmrd_client)",
                       description="Send an ISMRMRD raw file through a Gadgetron chain and write the images "
                       "back, with the stock client's options.")
    if from_replay is not None:
        from_replay(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("serve", parents=[_common()], help="passive mode: wait for Gadgetron to connect",
                       description="Run the gadget and wait for Gadgetron to connect (chain "
                       "config_xml/lorein_connect.xml, <connect port=.../>). Settings given here override "
                       "the chain's.")
    p.add_argument("-p", "--port", type=_port, default=18000, help="TCP port (default 18000; 0 = any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, "
                   "loopback only; '' or 0.0.0.0 = all interfaces, logged as a warning)")
    p.add_argument("--forever", action="store_true", help="serve connections until interrupted "
                   "(default: one connection, then exit)")
    _add_settings_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", parents=[_common()], help="simulate, reconstruct through the gadget, compare",
                       description="The whole path on the default phantom: simulate a scan, reconstruct it "
                       "through the gadget's code, write maps and a figure, print the errors.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    _add_simulation_arguments(p, DEMO_MATRIX, accel_help)
    p.add_argument("--method", choices=METHODS, default="lorein", help="reconstruction method (default lorein)")
    p.add_argument("--iterations", type=_int_at_least(0), help="iterations; 0 = the method's default")
    p.add_argument("--rank", type=_int_at_least(0), help="subspace rank; 0 = automatic")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument("--coil-maps", choices=("lowres", "espirit"), help="coil sensitivities (default lowres)")
    p.set_defaults(func=cmd_demo)
    return parser


def _user_error_types() -> tuple:
    """Exceptions that mean the input or the settings are wrong (not a bug)."""
    types = [UsageError]
    mods = {"gadget_lorein.io.header": "MRDError", "gadget_lorein.recon.pipeline": "ReconError",
            "gadget_lorein.physics.protocol": "ProtocolError", "gadget_lorein.recon.calibration": "CalibrationError",
            "gadget_lorein.node.gadget": "SettingsError", "gadget_lorein.node.replay": "ReplayError"}
    for mod, name in mods.items():
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, name):
            types.append(getattr(m, name))
    return tuple(types)


def main(argv=None) -> int:
    parser = build_parser()
    prog = PROG
    args = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_usage(sys.stderr)
            print(f"{PROG}: error: a command is required: simulate, recon, replay, serve or demo "
                  f"(see '{PROG} --help')", file=sys.stderr)
            return 2
        prog = f"{PROG} {args.command}"
        _setup_logging(args)
        return int(args.func(args) or 0)
    except UsageError as err:
        msg = " ".join(str(err).split())          # one line, whatever the message held
        print(msg if msg.startswith(PROG) else f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:     # noqa: BLE001 - the last line of defence
        debug = bool(os.environ.get("LOREIN_DEBUG")) or bool(getattr(args, "verbose", False))
        text = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, _user_error_types()):
            if debug:
                traceback.print_exc()
            print(f"{prog}: error: {text}", file=sys.stderr)
            return 2
        if debug:
            traceback.print_exc()
        print(f"{prog}: internal error: {type(err).__name__}: {text} (run with --verbose or LOREIN_DEBUG=1 "
              "for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
