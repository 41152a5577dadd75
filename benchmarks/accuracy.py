"""Accuracy benchmark: method x sequence x acceleration -> NRMSE of each map (brain and tissue),
wall time and peak memory, on the simulated head phantom. Prints a Markdown table.

    python benchmarks/accuracy.py                      # the issue's case: 64x64x48, 8 coils
    python benchmarks/accuracy.py --matrix 24 24 16 --qalas-accel 4 8 --mrf-accel   # quick
"""
from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from gadget_lorein import metrics, protocol, recon, simulate

METHODS = ["zerofill", "cg", "llr", "lrr", "pmr", "lorein"]


def peak_rss_mb() -> float:
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
    args = ap.parse_args(argv)
    dev = recon.resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"# accuracy: matrix {args.matrix}, {args.coils} coils, noise {args.noise}, device {dev} "
          f"({name}), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| sequence | R | method | T1 brain | T2 brain | PD brain | B1 brain | T1 tissue | T2 tissue "
          "| PD tissue | wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [("qalas", r) for r in args.qalas_accel] + [("mrf", r) for r in args.mrf_accel]
    for seq, R in cases:
        proto = protocol.load(seq)
        if seq == "mrf" and args.mrf_frames:
            proto = proto.with_overrides(n_tr=args.mrf_frames)
        sim = simulate.simulate(proto, matrix=args.matrix, n_coils=args.coils, accel=R,
                                noise=args.noise, seed=0)
        truth = sim.truth()
        for method in args.methods:
            t0 = time.perf_counter()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            res = recon.reconstruct(sim.scan, recon.ReconSettings(method=method, device=args.device,
                                                                  iterations=args.iterations))
            wall = time.perf_counter() - t0
            eb = metrics.map_errors(res.maps, truth)
            et = metrics.map_errors(res.maps, truth, "tissue")
            mem = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_rss_mb())
            f = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
            print(f"| {seq} | {R:g} | {method} | {f(eb,'T1')} | {f(eb,'T2')} | {f(eb,'PD')} | {f(eb,'B1')} "
                  f"| {f(et,'T1')} | {f(et,'T2')} | {f(et,'PD')} | {wall:.1f} | {mem:.0f} |", flush=True)


if __name__ == "__main__":
    main()
