"""What the ``lorein`` commands do, once their arguments are parsed (gadget_lorein/cli.py parses
them): simulate to files, reconstruct a raw file through the gadget's code (:func:`run_recon`) and
compare with a truth file, replay through Gadgetron, serve, and the demo that chains them.

Each ``cmd_*`` takes the parsed arguments and returns the exit status; a mistake in the command or its
files raises :class:`~gadget_lorein.usage.UsageError`. Heavy modules (torch, the reconstruction,
the gadget) are imported inside the commands, after the arguments have been checked.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .metrics import nrmse_table
from .data import MAP_NAMES
from .sim.files import load_truth, noise_text, simulate_to_files, simulation_plan
from .usage import UsageError, check_input, check_output

DEMO_GROUP = "demo"


def tell(args, text: str) -> None:
    """A progress line on stderr (not with --quiet)."""
    if not getattr(args, "quiet", False):
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def settings_from_args(args):
    """The settings given on the command line, parsed by the one validator (settings.parse)."""
    from . import settings as settings_mod, settings_io
    try:
        return settings_mod.parse(settings_io.from_args(args), unknown="error")
    except settings_mod.SettingsError as err:
        raise UsageError(str(err)) from None


def check_truth_shape(maps: dict, truth: dict, path) -> None:
    shape = next(iter(maps.values())).shape if maps else None
    if shape is not None and truth["T1"].shape != shape:
        raise UsageError(f"truth file {path} has volumes of shape {truth['T1'].shape} (nz, ny, nx) "
                         f"but the maps have {shape}: not the truth of this scan")


def check_truth_matrix(raw, truth: dict, path) -> None:
    """Before a long reconstruction: the truth must have the raw header's recon matrix."""
    from .io import header, rawfile
    xml, _ = rawfile.iter_raw(raw)
    space = header.parse_header(xml).encoding[0].reconSpace.matrixSize
    want = (int(space.z), int(space.y), int(space.x))
    if tuple(truth["T1"].shape) != want:
        raise UsageError(f"truth file {path} has volumes of shape {tuple(truth['T1'].shape)} (nz, ny, nx) "
                         f"but {raw} has a {want[2]}x{want[1]}x{want[0]} matrix: not the truth of this scan")


def replace_group(path: Path, group: str) -> None:
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
        replace_group(Path(out), group)
    t0 = time.perf_counter()
    images = gadget.recon_file(str(raw), str(out), settings, group=group)
    seconds = time.perf_counter() - t0
    volumes = map_images.split_volumes(images)      # a multi-volume scan: the first volume's maps
    first = next(iter(volumes.values()), [])
    maps = map_images.images_to_maps([im for im in first
                                      if int(im.image_series_index) % map_images.VOLUME_SERIES_STRIDE < 100])
    say(f"reconstructed {', '.join(k for k in MAP_NAMES if k in maps)} in {seconds:.1f} s -> {out}"
        + (f" ({len(volumes)} volumes; the figure and the truth comparison take the first)"
           if len(volumes) > 1 else ""))
    return maps, images, seconds


# --------------------------------------------------------------------------------------------
# the commands
# --------------------------------------------------------------------------------------------

def cmd_simulate(args) -> int:
    raw = check_output(args.output, "raw file")
    truth = check_output(args.truth, "truth file") if args.truth else None
    png = check_output(args.png, "figure") if args.png else None
    proto, plan = simulation_plan(args)
    reps = getattr(args, "repetitions", 1)
    _, n = simulate_to_files(proto, plan, raw, truth, png, oversampling=args.oversampling,
                             say=lambda t: tell(args, t), repetitions=reps)
    print(f"{raw}: {proto.name}, {n} acquisitions, matrix {'x'.join(map(str, plan['matrix']))}, "
          f"{plan['n_coils']} coils, R = {plan['accel']:g}" + (f", {reps} repetitions" if reps > 1 else ""))
    return 0


def cmd_recon(args) -> int:
    raw = check_input(args.input, "raw file")
    out = check_output(args.out, "output")
    png = check_output(args.png, "figure") if args.png else None
    truth = load_truth(args.truth) if args.truth else None
    if out.resolve() == raw.resolve():
        raise UsageError("the output file must not be the raw file")
    settings = settings_from_args(args)
    if truth is not None:
        check_truth_matrix(raw, truth, args.truth)
    tell(args, f"reconstructing {raw} ({settings.recon.method})")
    maps, images, seconds = run_recon(raw, out, settings, args.group, say=lambda t: tell(args, t))
    if truth is not None:
        check_truth_shape(maps, truth, args.truth)
        print(nrmse_table(maps, truth))
    if png:
        from . import plots
        method = settings.recon.method
        plots.maps_figure(maps, png, truth=truth, title=f"{method} reconstruction of {raw.name}")
        tell(args, f"wrote {png}")
        derived = png.with_name(png.stem + "_synthetic.png")
        if plots.derived_figure_of_images(images, derived, maps, truth,
                                          f"{method} reconstruction of {raw.name}"):
            tell(args, f"wrote {derived} (synthetic images and confidence maps)")
    print(f"{out}: {len(images)} images ({', '.join(k for k in MAP_NAMES if k in maps)}), "
          f"{seconds:.1f} s")
    return 0


def cmd_replay(args) -> int:
    from .node import replay
    check_input(args.input, "raw file")
    if args.config_local:
        check_input(args.config_local, "chain file", hdf5=False)
    if not 0 < args.port <= 65535:
        raise UsageError(f"--port {args.port}: a TCP port (1-65535) expected")
    check_output(args.outfile, "output")
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
    from .node import server
    from .settings_io import from_args
    settings_from_args(args)
    _check_port_free(args.host, args.port)
    try:
        server.serve(args.port, from_args(args) or None, once=not args.forever, host=args.host)
    except OSError as err:
        if getattr(err, "errno", None) in (98, 99, 13):   # in use, cannot assign, permission
            raise UsageError(f"cannot listen on port {args.port}: {err.strerror or err}") from None
        raise
    return 0


def cmd_workers(args) -> int:
    from .node import workers
    try:
        print(workers.worker_list_json(args.addresses, args.timeout))
    except ValueError as err:
        raise UsageError(str(err)) from None
    return 0


def cmd_demo(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create {out}: {err.strerror or err}") from None
    check_output(out / "raw.h5", "demo file")
    args.calib = None
    proto, plan = simulation_plan(args)
    settings = settings_from_args(args)
    method = settings.recon.method
    raw, truth_path = out / "raw.h5", out / "truth.npz"
    maps_path, png = out / "maps.h5", out / "maps.png"
    t_all = time.perf_counter()
    say = (lambda t: tell(args, t))
    say(f"demo 1/3: simulate ({proto.name}) -> {raw}")
    t0 = time.perf_counter()
    sim, _ = simulate_to_files(proto, plan, raw, truth_path, out / "simulation.png", say=say)
    t_sim = time.perf_counter() - t0
    say(f"demo 2/3: reconstruct through the gadget (method {method}) -> {maps_path}")
    if maps_path.exists():
        maps_path.unlink()
    maps, images, t_rec = run_recon(raw, maps_path, settings, DEMO_GROUP, say=say)
    say(f"demo 3/3: compare with the truth -> {png}")
    truth = load_truth(truth_path)
    check_truth_shape(maps, truth, truth_path)
    from . import plots
    nx, ny, nz = plan["matrix"]
    title = (f"{method} | {proto.name}, {nx}x{ny}x{nz}, {plan['n_coils']} coils, "
             f"R = {plan['accel']:g}, {noise_text(plan)}")
    plots.maps_figure(maps, png, truth=truth, title=title)
    derived = out / "synthetic.png"
    if not plots.derived_figure_of_images(images, derived, maps, truth, title) and derived.exists():
        derived.unlink()
    total = time.perf_counter() - t_all
    print(nrmse_table(maps, truth))
    print(f"\nsimulation {t_sim:.1f} s, reconstruction {t_rec:.1f} s, total {total:.1f} s")
    print(f"files in {out}/:")
    for path, what in ((raw, "raw ISMRMRD data (input of the gadget)"),
                       (truth_path, "ground truth (T1, T2, PD, labels, brain mask)"),
                       (out / "simulation.png", "ground truth and one undersampled contrast"),
                       (maps_path, f"maps as ISMRMRD images (group '{DEMO_GROUP}')"),
                       (png, "truth, maps and error per map"),
                       (derived, "synthetic weighted images (truth, reconstruction), confidence")):
        if path.exists():
            print(f"  {path.name:<15} {what}")
    return 0
