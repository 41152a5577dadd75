"""Output rules of a lorein fit on realistic scans: for each case x SNR x seed, one simulated scan
and one fit at the defaults; then the maps that each rule (FitConfig ``output``, with its margin)
makes from the same fit's two blocks (``lorein.combine_maps``), so that the rules differ only in
the rule. Prints one JSON line per scan and rule and a table of means.

    python benchmarks/output_rules.py --cases mrf200 --snr 15 30 --seeds 0 1 2 \
        --rules pmr pmr:0 pmr:0.1 pmr:0.2 guard:0.7
    python benchmarks/output_rules.py --cases qalas8 --snr 15 30 --seeds 0 1 --rules lrr lrr:0:0.05:0.15:0.05:200 pmr \
        --baselines llr
    python benchmarks/output_rules.py --cases mrf100 --matrix 24 24 16 --protocol n_tr=100 epg_states=32

A rule is OUTPUT (pmr, lrr: that block's maps as they are) or
OUTPUT:CAP[:DEPTH[:REACH[:MARGIN[:NEAR[:MARGIN_T2]]]]] (pmr, lrr: T2 capped at exp(CAP) x the
other block's, ``t2_cap``; the cap lowers T2 by at most exp(-DEPTH), ``t2_cap_depth``; T1 and T2
raised towards the other block's by at most exp(REACH), ``pv_reach``, where its T1 is above
exp(MARGIN) x this block's (``pv_margin``, default 0.05) and its T2 above exp(MARGIN_T2) x
(``pv_margin_t2``, default MARGIN), next to CSF, ``pv_near_t2`` NEAR ms, 0: anywhere) or
guard:MARGIN (``guard``). The default fit's own rule is pmr:0:inf:inf:0.4:200:1 for a long series
and lrr:0:0.05:0.15:0.05:200 for a short one.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from gadget_lorein import metrics
from gadget_lorein.physics import protocol
from gadget_lorein.recon import pipeline as recon
from gadget_lorein.recon.lorein import fit as lorein
from gadget_lorein.recon.lorein.model import map_volumes
from gadget_lorein.sim import simulate

sys.path.insert(0, str(Path(__file__).parent))     # the benchmarks are scripts, not a package
from accuracy import parse_case  # noqa: E402


KEYS = ("T1 pure", "T2 pure", "T1 all", "T2 all", "T1 p99", "T2 p99")


def rule_config(rule: str) -> tuple[str, lorein.FitConfig]:
    output, *rest = rule.split(":")
    if output in ("pmr", "lrr"):
        knobs = dict(zip(("t2_cap", "t2_cap_depth", "pv_reach", "pv_margin", "pv_near_t2", "pv_margin_t2"),
                         map(float, rest)))
        knobs.setdefault("pv_margin", 0.05)
        knobs.setdefault("pv_margin_t2", knobs["pv_margin"])
        return output, lorein.FitConfig(**{"t2_cap": math.inf, "t2_cap_depth": math.inf, "pv_reach": 0.0,
                                           **knobs})
    return output, lorein.FitConfig(**({"guard": float(rest[0])} if rest else {}))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", type=parse_case, default=[parse_case("mrf200")],
                    help="qalas<R> / mrf<R>")
    ap.add_argument("--snr", nargs="+", type=float, default=[30.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--matrix", nargs=3, type=int, default=[40, 32, 24])
    ap.add_argument("--coils", type=int, default=6)
    ap.add_argument("--protocol", nargs="*", default=[], metavar="KEY=VALUE",
                    help="protocol overrides, e.g. n_tr=100 (a shorter train)")
    ap.add_argument("--rules", nargs="+", default=["pmr", "pmr:0", "lrr", "lrr:0", "guard:0.7"])
    ap.add_argument("--baselines", nargs="*", default=[], metavar="METHOD",
                    help="methods also run at their defaults on each scan (e.g. llr), rows named so")
    ap.add_argument("--iterations", type=int, default=0, help="fit steps (0: the default schedule)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    dev = recon.resolve_device(args.device)
    over = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.protocol)}
    rows: dict = {}
    for seq, R in args.cases:
        case = f"{seq}{R:g}"
        proto = protocol.load(seq)
        if over:
            proto = proto.with_overrides(**over)
        for snr in args.snr:
            for seed in args.seeds:
                t0 = time.perf_counter()
                sim = simulate.simulate(proto, matrix=args.matrix, n_coils=args.coils, accel=R,
                                        seed=seed, mode="realistic", snr=snr)
                truth = sim.truth()
                proto_, sub, op, support, _ = recon.prepare(sim.scan, recon.ReconSettings(
                    method="lorein", seed=seed, device=str(dev)))
                blocks: dict = {}
                lorein.fit("lorein", op, sub, support, proto_.encodes_b1, iterations=args.iterations,
                           seed=seed, blocks=blocks)
                wall = time.perf_counter() - t0
                results = {}
                for rule in args.rules:
                    output, cfg = rule_config(rule)
                    m = lorein.combine_maps(output, blocks["pmr"], blocks["lrr"], cfg, support)
                    results[rule] = recon.finish_maps(map_volumes(m, support, proto_.encodes_b1), support)
                for method in args.baselines:
                    results[method] = recon.reconstruct(sim.scan, recon.ReconSettings(
                        method=method, seed=seed, device=str(dev))).maps
                for rule, maps in results.items():
                    e = metrics.tissue_errors(maps.as_dict(), truth)
                    rows.setdefault((case, snr, rule), []).append(e)
                    print(json.dumps(dict(case=case, snr=snr, seed=seed, rule=rule, fit_s=round(wall, 1),
                                          **{k: round(e[k], 4) for k in KEYS})), flush=True)
    print("\n| case | SNR | rule | " + " | ".join(KEYS) + " |")
    print("|" + "---|" * (len(KEYS) + 3))
    for (case, snr, rule), errs in rows.items():
        cells = [f"{statistics.mean(e[k] for e in errs):.3f}" for k in KEYS]
        print(f"| {case} | {snr:g} | {rule} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
