"""The ``lorein`` command line: simulate, recon, replay, serve, demo (the arguments and main();
what each command does is in gadget_lorein/runner.py).

    lorein simulate --sequence qalas -o raw.h5 --truth truth.npz --png preview.png
    lorein recon raw.h5 -o maps.h5 --truth truth.npz --png maps.png
    lorein replay raw.h5 -o out.h5 -c lorein.xml          # through a running Gadgetron
    lorein serve --port 18000                              # passive mode (lorein_connect.xml)
    lorein demo                                            # simulate -> gadget -> maps -> figure

Exit status: 0 success; 2 a mistake in the command (bad option, missing or unreadable input,
unwritable output, a setting or protocol the reconstruction cannot use, data outside the contract),
reported as one line on stderr; 1 an unexpected failure (one line; the traceback with
``--verbose`` or LOREIN_DEBUG=1); 130 interrupted.

Heavy modules (torch, the reconstruction, the gadget) are imported inside the commands
(runner.py), after the arguments have been checked, so that mistakes are reported at once.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import traceback

from . import __version__

from . import runner
from .sim.files import DEFAULT_ACCEL, DEFAULT_NOISE, DEFAULT_SNR, MATRIX_MAX, MATRIX_MIN, SEQUENCES
from .sim.sampling import PATTERNS
from .usage import UsageError

PROG = "lorein"
DEFAULT_MATRIX = (64, 64, 48)
# The demo's default size: the whole demo (simulation, LoREIN fit on CPU, figure) in a few minutes
# on 2 cores (measured timings in README.md).
DEMO_MATRIX = (48, 48, 32)
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
    p.add_argument("--pattern", type=lambda t: t.replace("-", "_"), choices=PATTERNS,
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
    from . import settings_io
    g = p.add_argument_group("settings (the chain's; every one in docs/settings.md)")
    settings_io.add_arguments(g, scopes, exclude)


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
    p.add_argument("--repetitions", type=_int_at_least(1), default=1, metavar="N",
                   help="repetitions of the scan in one stream (a multi-volume scan: the same object "
                   "with fresh noise per repetition; default 1)")
    p.add_argument("-o", "--output", required=True, metavar="RAW.h5", help="raw file to write (replaced)")
    p.add_argument("--truth", metavar="TRUTH.npz", help="ground truth to write")
    p.add_argument("--png", metavar="PREVIEW.png", help="figure: truth maps and one zero-filled contrast")
    p.set_defaults(func=runner.cmd_simulate)

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
    p.set_defaults(func=runner.cmd_recon)

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
    p.set_defaults(func=runner.cmd_replay)

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
    p.set_defaults(func=runner.cmd_serve)

    p = sub.add_parser("workers", parents=[_common(verbose_only=True)],
                       help="list the Gadgetron workers that answer (GADGETRON_REMOTE_WORKER_COMMAND)",
                       description="Print, as the JSON list a distributed chain's main server reads from "
                       "GADGETRON_REMOTE_WORKER_COMMAND, the given Gadgetron servers that answer now; the "
                       "others are left out (a listed worker that is down makes Gadgetron 4.7 drop the scan). "
                       "See docs/distributed.md.")
    p.add_argument("addresses", nargs="+", metavar="HOST:PORT", help="candidate worker servers")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each (default 2)")
    p.set_defaults(func=runner.cmd_workers)

    p = sub.add_parser("demo", parents=[_common()], help="simulate, reconstruct through the gadget, compare",
                       description="The whole path on the default phantom: simulate a scan, reconstruct it "
                       "through the gadget's code, write maps and a figure, print the errors.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    _add_simulation_arguments(p, DEMO_MATRIX, accel_help)
    _add_setting_options(p, scopes=("recon",), exclude=("protocol", "seed"))
    p.set_defaults(func=runner.cmd_demo)
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
            print(f"{PROG}: error: a command is required: simulate, recon, replay, serve, workers or demo "
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
