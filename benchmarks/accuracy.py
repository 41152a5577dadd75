"""Accuracy benchmark: method x sequence x acceleration -> NRMSE of each map (brain and tissue),
wall time and peak memory, on the simulated head phantom. Prints a Markdown table, with a "lowest"
row after each case run with several methods that names, per map, the method with the lowest NRMSE
(so the table says where LoREIN is not the lowest). Peak memory is each reconstruction's own: the
GPU's allocator peak, or on the CPU the process's resident-set high-water mark reset before it
(Linux; elsewhere the process's peak so far, simulation included).

    python benchmarks/accuracy.py                      # the issue's case: 64x64x48, 8 coils
    python benchmarks/accuracy.py --matrix 24 24 16 --qalas-accel 4 8 --mrf-accel   # quick
    python benchmarks/accuracy.py --seeds 4            # network methods: mean +- sd over 4 seeds
    python benchmarks/accuracy.py --b1-mismatch        # scan with a transmit field the model lacks
    python benchmarks/accuracy.py --set coil_refine=0  # any reconstruction setting, for an ablation

The network methods (lrr, pmr, lorein) start from random network weights; a single fit's NRMSE moves
by a few hundredths with the seed (benchmarks/RESULTS.md), which is as large as the differences
between them. ``--seeds N`` fits each of them with seeds 0..N-1 (``--first-seed S``: S..S+N-1) on
the same simulated scan and prints the mean and the sample standard deviation; the linear methods
are deterministic and run once.
``--b1-mismatch`` simulates a model mismatch (simulate.simulate's ``b1_mismatch``): the scan carries
the phantom's transmit field, which the qalas reconstruction takes as nominal (mrf encodes B1, so
it is unchanged there).
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time

import torch

from gadget_lorein import metrics

from gadget_lorein.physics import protocol

from gadget_lorein.recon import pipeline as recon

from gadget_lorein.sim import simulate

METHODS = ["zerofill", "cg", "llr", "lrr", "pmr", "lorein"]
SEEDED = ("lrr", "pmr", "lorein")


def summarise(values: list[float]) -> str:
    """'0.123' for one value, '0.123 +- 0.004' (mean, sample sd) for several."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


# the table's map columns: (0 brain | 1 tissue, map)
MAPS = [(0, "T1"), (0, "T2"), (0, "PD"), (0, "B1"), (1, "T1"), (1, "T2"), (1, "PD")]


def lowest_row(seq: str, R: float, table: dict[str, tuple[dict, dict]]) -> str:
    """The table's "lowest" row of one case: for each map, the method(s) with the lowest NRMSE as
    printed (mean over seeds, 3 decimals; a tie names each, "lorein = pmr"), so that where LoREIN is
    not the lowest the table itself says so. ``table``: method -> (brain, tissue) mean NRMSEs."""
    cells = []
    for i, k in MAPS:
        vals = {m: round(v[i][k], 3) for m, v in table.items() if k in v[i]}
        best = min(vals.values(), default=None)
        cells.append(" = ".join(m for m, v in vals.items() if v == best) if vals else "-")
    return f"| {seq} | {R:g} | lowest | " + " | ".join(cells) + " | | |"


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", nargs=3, type=int, default=[64, 64, 48])
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.005)
    ap.add_argument("--qalas-accel", nargs="*", type=float, default=[4, 8, 16, 48])
    ap.add_argument("--mrf-accel", nargs="*", type=float, default=[200, 400])
    ap.add_argument("--mrf-frames", type=int, default=0, help="override the MRF train length")
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--iterations", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--b1-mismatch", action="store_true",
                    help="simulate qalas with the phantom's transmit field (0.8-1.2) in the signal, "
                         "which its reconstruction takes as 1: a model mismatch")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="a reconstruction setting (recon.ReconSettings) for every method, e.g. "
                         "coil_refine=0; repeatable; named in the table's header")
    ap.add_argument("--seeds", type=int, default=1,
                    help="fit the network methods with this many seeds; mean +- sd (default 1)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="the network methods' seeds start here (default 0): runs split over machines")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    overrides = {}
    for item in args.settings:
        key, eq, val = item.partition("=")
        if not eq or key not in recon.ReconSettings.__dataclass_fields__ or key in ("method", "seed"):
            ap.error(f"--set {item!r}: want KEY=VALUE with KEY a reconstruction setting other than "
                     f"method and seed (one of {', '.join(recon.ReconSettings.__dataclass_fields__)})")
        overrides[key] = val
    try:
        recon.ReconSettings.from_mapping(overrides)
    except ValueError as err:
        ap.error(f"--set: {err}")
    dev = recon.resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"# accuracy: matrix {args.matrix}, {args.coils} coils, noise {args.noise}, device {dev} "
          f"({name}), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
          + (f"; {', '.join(SEEDED)}: mean +- sd over seeds {args.first_seed}-"
             f"{args.first_seed + args.seeds - 1}" if args.seeds > 1 else "")
          + (f"; {', '.join(SEEDED)}: seed {args.first_seed}" if args.seeds == 1 and args.first_seed else "")
          + ("; B1 mismatch: the scan has the phantom's transmit field" if args.b1_mismatch else "")
          + "".join(f"; {k}={v}" for k, v in overrides.items()))
    print("| sequence | R | method | T1 brain | T2 brain | PD brain | B1 brain | T1 tissue | T2 tissue "
          "| PD tissue | wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [("qalas", r) for r in args.qalas_accel] + [("mrf", r) for r in args.mrf_accel]
    for seq, R in cases:
        proto = protocol.load(seq)
        if seq == "mrf" and args.mrf_frames:
            proto = proto.with_overrides(n_tr=args.mrf_frames)
        sim = simulate.simulate(proto, matrix=args.matrix, n_coils=args.coils, accel=R,
                                noise=args.noise, seed=0, b1_mismatch=args.b1_mismatch)
        truth = sim.truth()
        case = {}
        for method in args.methods:
            runs = []
            for seed in (range(args.first_seed, args.first_seed + args.seeds) if method in SEEDED else [0]):
                t0 = time.perf_counter()
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                else:
                    reset_peak_rss()
                res = recon.reconstruct(sim.scan, recon.ReconSettings.from_mapping(dict(
                    overrides, method=method, device=args.device, iterations=args.iterations,
                    seed=seed)))
                wall = time.perf_counter() - t0
                mem = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
                       else peak_rss_mb())
                runs.append((metrics.map_errors(res.maps, truth),
                             metrics.map_errors(res.maps, truth, "tissue"), wall, mem))
                print(f"{seq} R={R:g} {method} seed {seed}: brain "
                      + " ".join(f"{k} {v:.3f}" for k, v in runs[-1][0].items())
                      + f" ({wall:.0f} s)", file=sys.stderr, flush=True)
            f = lambda i, k: summarise([r[i][k] for r in runs]) if k in runs[0][i] else "-"  # noqa: E731
            case[method] = tuple({k: statistics.mean(r[i][k] for r in runs) for k in runs[0][i]}
                                 for i in (0, 1))
            wall = statistics.mean(r[2] for r in runs)
            mem = max(r[3] for r in runs)
            print(f"| {seq} | {R:g} | {method} | " + " | ".join(f(i, k) for i, k in MAPS)
                  + f" | {wall:.1f} | {mem:.0f} |", flush=True)
        if len(case) > 1:
            print(lowest_row(seq, R, case), flush=True)


if __name__ == "__main__":
    main()
