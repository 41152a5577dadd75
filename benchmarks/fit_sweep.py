"""Fit variants on realistic scans: for each case x SNR x seed, one simulated scan, one prepared
operator, then the linear baselines and every LoREIN variant (FitConfig overrides) on it. Prints
one line per fit as it finishes (JSON with --jsonl) and a summary table: mean per variant.

    python benchmarks/fit_sweep.py --cases qalas8 --snr 30 --seeds 1 \
        --variant base= --variant llrinit=init:llr --variant guard=output:guard
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from gadget_lorein import metrics
from gadget_lorein.physics import protocol
from gadget_lorein.recon import pipeline as recon
from gadget_lorein.recon.lorein import fit as lorein
from gadget_lorein.sim import simulate

sys.path.insert(0, str(Path(__file__).parent))     # the benchmarks are scripts, not a package
from accuracy import parse_case  # noqa: E402


KEYS = ("T1 pure", "T2 pure", "T1 all", "T2 all", "T1 p99", "T2 p99")


def parse_variant(text: str):
    name, _, spec = text.partition("=")
    over, method = {}, "lorein"
    for item in filter(None, spec.split(",")):
        k, _, v = item.partition(":")
        if k == "method":
            method = v
            continue
        typ = type(getattr(lorein.FitConfig(), k))
        over[k] = typ(v) if typ is not bool else v.lower() in ("1", "true")
    return name, method, over


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", type=parse_case, default=[parse_case("qalas8")],
                    help="qalas<R> / mrf<R>")
    ap.add_argument("--snr", nargs="+", type=float, default=[30.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--matrix", nargs=3, type=int, default=[40, 32, 24])
    ap.add_argument("--coils", type=int, default=6)
    ap.add_argument("--baselines", nargs="*", default=["llr"])
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jsonl")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant] or [("base", "lorein", {})]
    dev = recon.resolve_device(args.device)
    rows = {}
    out = open(args.jsonl, "a") if args.jsonl else None
    for seq, R in args.cases:
        case = f"{seq}{R:g}"
        proto = protocol.load(seq)
        for snr in args.snr:
            for seed in args.seeds:
                sim = simulate.simulate(proto, matrix=args.matrix, n_coils=args.coils, accel=R,
                                        seed=seed, mode="realistic", snr=snr)
                truth = sim.truth()
                runs = []
                for b in args.baselines:
                    t0 = time.perf_counter()
                    res = recon.reconstruct(sim.scan, recon.ReconSettings(method=b, seed=seed,
                                                                          device=str(dev)))
                    runs.append((b, res.maps.as_dict(), time.perf_counter() - t0, {}))
                    report(case, snr, seed, *runs[-1], truth, rows, out)
                prepared = {}
                for name, method, over in variants:
                    t0 = time.perf_counter()
                    key = method
                    if key not in prepared:
                        prepared[key] = recon.prepare(sim.scan, recon.ReconSettings(
                            method=method, seed=seed, device=str(dev)))
                    proto_, sub, op, support, _ = prepared[key]
                    cfg = lorein.FitConfig(**over)
                    maps, info = lorein.fit(method, op, sub, support, proto_.encodes_b1, seed=seed,
                                            config=cfg)
                    maps = recon.finish_maps(maps, support).as_dict()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    report(case, snr, seed, name, maps, time.perf_counter() - t0,
                           {"it": info["iterations"], "held": info.get("held_out_step")},
                           truth, rows, out)
    print("\n| case | SNR | variant | " + " | ".join(KEYS) + " | s |")
    print("|" + "---|" * (len(KEYS) + 4))
    for (case, snr, name), errs in rows.items():
        cells = [f"{statistics.mean(e[k] for e, _ in errs):.3f}" for k in KEYS]
        wall = statistics.mean(w for _, w in errs)
        print(f"| {case} | {snr:g} | {name} | " + " | ".join(cells) + f" | {wall:.0f} |")
    sys.stdout.flush()


def report(case, snr, seed, name, maps, wall, info, truth, rows, out):
    e = metrics.tissue_errors(maps, truth)
    rows.setdefault((case, snr, name), []).append((e, wall))
    line = dict(case=case, snr=snr, seed=seed, variant=name, wall=round(wall, 1), **info,
                **{k: round(v, 4) for k, v in e.items()})
    print(json.dumps(line), flush=True)
    if out:
        out.write(json.dumps(line) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
