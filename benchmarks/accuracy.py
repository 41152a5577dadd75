"""Accuracy benchmark: case (sequence, R) x SNR x method -> errors of each map against the truth,
wall time and peak memory, on the simulated head phantom. Prints a Markdown table with a "lowest"
row after each case and SNR run with several methods, naming per column the method with the
lowest value (so the table says where LoREIN is not the lowest).

By default the realistic simulation (simulate.simulate's mode 'realistic': object on a 2x finer
grid, partial volume, transmit field in every scan, scanner-like sampling, noise from a white
matter SNR): the decision table, 40x32x24, 6 coils, qalas R = 8, 16, 48 and mrf R = 200, SNR 15 and
30, mean +- sd over seeds 0-2. The seed changes the scan (phantom texture, coils, sampling, noise)
and the network methods' initialisation, so every method runs once per seed.

Columns per map: NRMSE over pure tissue voxels (WM, GM, lesions without partial volume), over all
tissue voxels (boundaries included), and for T1, T2 (and B1) the 99th percentile of
|est - truth| / truth over all tissue voxels (runaway values); gadget_lorein.metrics.tissue_errors.
Peak memory is each reconstruction's own: the GPU allocator's peak, or on the CPU the resident-set
high-water mark reset before it (Linux; elsewhere the process's peak so far).

    python benchmarks/accuracy.py                          # the decision table (slow on a CPU)
    python benchmarks/accuracy.py --confirm                # 64x64x48, 8 coils, SNR 30, one seed
    python benchmarks/accuracy.py --ideal                  # the idealised simulation (inverse crime)
    python benchmarks/accuracy.py --cases qalas8 --snr 30 --seeds 1 --methods zerofill llr
    python benchmarks/accuracy.py --set coil_refine=0      # any reconstruction setting (ablation)
    python benchmarks/accuracy.py --cases qalas8 qalas16 --pattern shared   # one pattern for all contrasts

``--ideal`` simulates on the reconstruction grid with its own model, noise ``--noise`` x the
largest image magnitude (0.005; no SNR column), qalas without a transmit field unless
``--b1-mismatch``. BART (benchmarks/bart_peer.py: subspace PICS with locally low rank, the package's
matching) joins the methods when ``bart`` is on PATH; asked for without it, it is skipped with a
note in the header.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import re
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from gadget_lorein import metrics


def _load_bart_peer():
    """benchmarks/bart_peer.py beside this script, however this script was loaded."""
    spec = importlib.util.spec_from_file_location("bart_peer", Path(__file__).with_name("bart_peer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bart_peer = _load_bart_peer()

from gadget_lorein.physics import protocol

from gadget_lorein.recon import pipeline as recon

from gadget_lorein.sim import sampling, simulate

METHODS = ["zerofill", "cg", "llr", "lrr", "pmr", "lorein"]
DEFAULT_CASES = ["qalas8", "qalas16", "qalas48", "mrf200"]
CONFIRM = dict(matrix=[64, 64, 48], coils=8, seeds=1, snr=[30.0], cases=["qalas8", "mrf200"])
# the table's columns: tissue_errors keys
COLUMNS = ["T1 pure", "T1 all", "T1 p99", "T2 pure", "T2 all", "T2 p99", "PD pure", "PD all",
           "B1 pure", "B1 all", "B1 p99"]


def parse_case(text: str) -> tuple[str, float]:
    """'qalas8' -> ('qalas', 8.0), 'mrf200' -> ('mrf', 200.0)."""
    m = re.fullmatch(r"(qalas|mrf)(\d+(?:\.\d+)?)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"a case is qalas<R> or mrf<R>, e.g. qalas8, got {text!r}")
    return m.group(1), float(m.group(2))


def summarise(values: list[float]) -> str:
    """'0.123' for one value, '0.123 +- 0.004' (mean, sample sd) for several."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def lowest_row(label: str, table: dict[str, dict]) -> str:
    """The "lowest" row of one case: for each column, the method(s) with the lowest mean as printed
    (3 decimals; a tie names each, "lorein = pmr"); "-" where no method has the column.
    ``table``: method -> {column: mean}."""
    cells = []
    for col in COLUMNS:
        vals = {m: round(v[col], 3) for m, v in table.items() if col in v}
        best = min(vals.values(), default=None)
        cells.append(" = ".join(m for m, v in vals.items() if v == best) if vals else "-")
    return f"| {label} | lowest | " + " | ".join(cells) + " | | |"


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux: /proc/self/clear_refs), so that
    each reconstruction's peak is its own rather than the largest so far (the phantom's simulation
    included). False where the system cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set since the last reset_peak_rss (VmHWM), else the process's getrusage peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", type=parse_case, help="qalas<R> / mrf<R> (default: "
                    + " ".join(DEFAULT_CASES) + "; --confirm: " + " ".join(CONFIRM["cases"]) + ")")
    ap.add_argument("--snr", nargs="*", type=float, help="white matter SNRs (default 15 30)")
    ap.add_argument("--seeds", type=int, help="seeds per case (default 3; --confirm 1)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds start here (runs split over machines)")
    ap.add_argument("--methods", nargs="*", default=None, help="default: " + " ".join(METHODS) + " (+ bart)")
    ap.add_argument("--matrix", nargs=3, type=int, help="default 40 32 24 (--confirm 64 64 48)")
    ap.add_argument("--coils", type=int, help="default 6 (--confirm 8)")
    ap.add_argument("--confirm", action="store_true", help="the confirmation case: " + str(CONFIRM))
    ap.add_argument("--ideal", action="store_true", help="the idealised simulation (inverse crime)")
    ap.add_argument("--noise", type=float, default=0.005, help="--ideal: noise level (default 0.005)")
    ap.add_argument("--b1-mismatch", action="store_true",
                    help="--ideal: qalas with the phantom's transmit field, which its model lacks")
    ap.add_argument("--pattern", type=lambda t: t.replace("-", "_"), choices=sampling.PATTERNS,
                    help="realistic scans: one sampling pattern for every frame, or a new draw per "
                         "frame (default: the simulator's, per frame)")
    ap.add_argument("--mrf-frames", type=int, default=0, help="override the MRF train length")
    ap.add_argument("--iterations", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="a reconstruction setting (recon.ReconSettings) for every method, e.g. "
                         "coil_refine=0; repeatable; named in the table's header")
    args = ap.parse_args(argv)
    base = CONFIRM if args.confirm else dict(matrix=[40, 32, 24], coils=6, seeds=3, snr=[15.0, 30.0],
                                             cases=DEFAULT_CASES)
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, [parse_case(c) for c in value] if key == "cases" else value)
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    if args.ideal:
        args.snr = [None]
    elif args.b1_mismatch:
        ap.error("--b1-mismatch is for --ideal: the realistic scans always have a transmit field")
    if args.ideal and args.pattern:
        ap.error("--pattern is for the realistic scans")
    args.overrides = {}
    for item in args.settings:
        key, eq, val = item.partition("=")
        if not eq or key not in recon.ReconSettings.__dataclass_fields__ or key in ("method", "seed"):
            ap.error(f"--set {item!r}: want KEY=VALUE with KEY a reconstruction setting other than "
                     f"method and seed (one of {', '.join(recon.ReconSettings.__dataclass_fields__)})")
        args.overrides[key] = val
    try:
        recon.ReconSettings.from_mapping(args.overrides)
    except ValueError as err:
        ap.error(f"--set: {err}")
    return args


def choose_methods(requested) -> tuple[list[str], list[str]]:
    """(methods to run, notes on the ones skipped): BART only where it can run."""
    methods = list(METHODS + ["bart"] if requested is None else requested)
    notes = []
    if "bart" in methods and not shutil.which("bart"):
        methods.remove("bart")
        if requested is not None:
            notes.append("bart skipped: not on PATH")
    return methods, notes


def run_case(args, seq, R, snr, seed, methods, dev):
    """Simulate one scan, reconstruct it with every method: {method: (errors, wall s, peak MB)}."""
    proto = protocol.load(seq)
    if seq == "mrf" and args.mrf_frames:
        proto = proto.with_overrides(n_tr=args.mrf_frames)
    kw = (dict(mode="ideal", noise=args.noise, b1_mismatch=args.b1_mismatch) if args.ideal
          else dict(mode="realistic", snr=snr, pattern=args.pattern))
    sim = simulate.simulate(proto, matrix=args.matrix, n_coils=args.coils, accel=R, seed=seed, **kw)
    truth = sim.truth()
    out = {}
    for method in methods:
        t0 = time.perf_counter()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            reset_peak_rss()
        # --set wins over --iterations / --device; the method and the seed are the table's own
        settings = dict(dict(device=args.device, iterations=args.iterations), **args.overrides)
        if method == "bart":   # the benchmark's own BART path (bart_peer.py), not the package's
            res = bart_peer.reconstruct(sim.scan)
        else:
            res = recon.reconstruct(sim.scan, recon.ReconSettings.from_mapping(
                dict(settings, method=method, seed=seed)))
        wall = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_rss_mb()
        out[method] = (metrics.tissue_errors(res.maps, truth), wall, mem)
        print(f"{seq} R={R:g} SNR {snr} seed {seed} {method}: "
              + " ".join(f"{k} {v:.3f}" for k, v in out[method][0].items() if "pure" in k)
              + f" ({wall:.0f} s)", file=sys.stderr, flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    methods, notes = choose_methods(args.methods)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    dev = recon.resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    sim_text = (f"ideal simulation, noise {args.noise}" + ("; B1 mismatch: the scan has the phantom's "
                "transmit field" if args.b1_mismatch else "") if args.ideal else "realistic simulation"
                + (f", {args.pattern} sampling pattern" if args.pattern else ""))
    print(f"# accuracy: {sim_text}, matrix {args.matrix}, {args.coils} coils, device {dev} ({name}), "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
          + (f"mean +- sd over seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}")
          + "".join(f"; {k}={v}" for k, v in args.overrides.items())
          + "".join(f"; {n}" for n in notes))
    print("| case | SNR | method | " + " | ".join(COLUMNS) + " | wall s | peak RSS MB |")
    print("|" + "---|" * (len(COLUMNS) + 5))
    for seq, R in args.cases:
        for snr in args.snr:
            runs = [run_case(args, seq, R, snr, seed, methods, dev) for seed in seeds]
            label = f"{seq}{R:g} | {'ideal' if snr is None else f'{snr:g}'}"
            case = {}
            for method in methods:
                errs = [r[method][0] for r in runs]
                case[method] = {k: statistics.mean(e[k] for e in errs) for k in errs[0]}
                cells = [summarise([e[c] for e in errs]) if c in errs[0] else "-" for c in COLUMNS]
                wall = statistics.mean(r[method][1] for r in runs)
                mem = max(r[method][2] for r in runs)
                print(f"| {label} | {method} | " + " | ".join(cells) + f" | {wall:.1f} | {mem:.0f} |",
                      flush=True)
            if len(case) > 1:
                print(lowest_row(label, case), flush=True)


if __name__ == "__main__":
    main()
