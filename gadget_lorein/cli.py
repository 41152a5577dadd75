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
import time
import traceback
from pathlib import Path

from . import __version__

from .sim.files import (DEFAULT_ACCEL, DEFAULT_NOISE, DEFAULT_SNR, MAP_ORDER, MATRIX_MAX, MATRIX_MIN,
                        SEQUENCES, UsageError, noise_text,
                        check_input as _check_input, check_output as _check_output,
                        check_truth_matrix as _check_truth_matrix,
                        check_truth_shape as _check_truth_shape, load_truth, nrmse_table, run_recon,
                        simulate_to_files, simulation_plan)

PROG = "lorein"
DEFAULT_MATRIX = (64, 64, 48)
# The demo's default size: the whole demo (simulation, LoREIN fit on CPU, figure) in a few minutes
# on 2 cores (measured timings in README.md).
DEMO_MATRIX = (48, 48, 32)
DEMO_GROUP = "demo"
COILS_MAX = 128

log = logging.getLogger("gadget_lorein.cli")


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

def _settings(args):
    """The settings given on the command line, parsed by the one validator (settings.parse)."""
    from . import settings as settings_mod
    try:
        return settings_mod.parse(settings_mod.from_args(args), unknown="error")
    except settings_mod.SettingsError as err:
        raise UsageError(str(err)) from None


def cmd_recon(args) -> int:
    raw = _check_input(args.input, "raw file")
    out = _check_output(args.out, "output")
    png = _check_output(args.png, "figure") if args.png else None
    truth = load_truth(args.truth) if args.truth else None
    if out.resolve() == raw.resolve():
        raise UsageError("the output file must not be the raw file")
    settings = _settings(args)
    if truth is not None:
        _check_truth_matrix(raw, truth, args.truth)
    _say(args, f"reconstructing {raw} ({settings.recon.method})")
    maps, images, seconds = run_recon(raw, out, settings, args.group, say=lambda t: _say(args, t))
    if truth is not None:
        _check_truth_shape(maps, truth, args.truth)
        print(nrmse_table(maps, truth))
    if png:
        from . import plots
        method = settings.recon.method
        plots.maps_figure(maps, png, truth=truth, title=f"{method} reconstruction of {raw.name}")
        _say(args, f"wrote {png}")
        derived = png.with_name(png.stem + "_synthetic.png")
        if plots.derived_figure_of_images(images, derived, maps, truth,
                                          f"{method} reconstruction of {raw.name}"):
            _say(args, f"wrote {derived} (synthetic images and confidence maps)")
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
    from .node import server
    from .settings import from_args
    _settings(args)
    _check_port_free(args.host, args.port)
    try:
        server.serve(args.port, from_args(args) or None, once=not args.forever, host=args.host)
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
    settings = _settings(args)
    method = settings.recon.method
    raw, truth_path = out / "raw.h5", out / "truth.npz"
    maps_path, png = out / "maps.h5", out / "maps.png"
    t_all = time.perf_counter()
    say = (lambda t: _say(args, t))
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
    _check_truth_shape(maps, truth, truth_path)
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
    p.add_argument("--ideal", action="store_true",
                   help="the idealised simulation (object on the reconstruction grid, its own signal "
                        "model, no transmit field for qalas): the inverse crime; default: realistic "
                        "(2x finer object, partial volume, transmit field, scanner-like sampling)")
    p.add_argument("--snr", type=_float_range(0.0, low_open=True, what="an SNR"),
                   help=f"realistic mode: white matter's SNR in the brightest fully sampled, "
                        f"coil-combined contrast (default {DEFAULT_SNR:g})")
    p.add_argument("--noise", type=_float_range(0.0, what="a noise level"),
                   help=f"--ideal: noise standard deviation relative to the largest image magnitude "
                        f"(default {DEFAULT_NOISE:g})")
    p.add_argument("--pattern", type=lambda t: t.replace("-", "_"), choices=("shared", "per_frame"),
                   help="one sampling pattern for every frame, or a new variable-density draw per frame "
                        "(default per-frame, as accelerated subspace scans vary the encodes between "
                        "contrasts)")
    p.add_argument("--seed", type=int, default=0, help="phantom, coils, masks and noise (default 0)")
    p.add_argument("--calib-mode", choices=("per_frame", "union"),
                   help="calibration region in every frame, or split among frames (default: realistic "
                        "per_frame, as a scanner samples it, union where no block fits in every "
                        "frame; --ideal union, which leaves room for a block big enough for good "
                        "coil maps)")


def _add_setting_options(p, scopes=("recon", "node"), exclude=()) -> None:
    from . import settings as settings_mod
    g = p.add_argument_group("settings (the chain's; every one in docs/settings.md)")
    settings_mod.add_arguments(g, scopes, exclude)


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
    _add_setting_options(p)
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
    _add_setting_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", parents=[_common()], help="simulate, reconstruct through the gadget, compare",
                       description="The whole path on the default phantom: simulate a scan, reconstruct it "
                       "through the gadget's code, write maps and a figure, print the errors.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    _add_simulation_arguments(p, DEMO_MATRIX, accel_help)
    _add_setting_options(p, scopes=("recon",), exclude=("protocol", "seed"))
    p.set_defaults(func=cmd_demo)
    return parser


def _user_error_types() -> tuple:
    """Exceptions that mean the input or the settings are wrong (not a bug)."""
    types = [UsageError]
    mods = {"gadget_lorein.io.header": "MRDError", "gadget_lorein.recon.pipeline": "ReconError",
            "gadget_lorein.physics.protocol": "ProtocolError", "gadget_lorein.recon.calibration": "CalibrationError",
            "gadget_lorein.settings": "SettingsError", "gadget_lorein.node.replay": "ReplayError"}
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
