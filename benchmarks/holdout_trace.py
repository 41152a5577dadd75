"""The held-out lines along one fit: at every held-out check of a network method (``holdout``, see
gadget_lorein/recon/lorein/fit.py), the held-out loss of each block and the NRMSE of the maps at that step
against the phantom's truth, as a Markdown table. It runs the reconstruction's own computation
(``recon.prepare`` + ``lorein.fit``, with the fit's ``monitor`` hook) but without the stop, so the
whole planned run is seen; the last line names the step the fit keeps and where it would stop.

    python benchmarks/holdout_trace.py --sequence mrf --accel 400          # 64x64x48, 8 coils
    python benchmarks/holdout_trace.py --sequence qalas --accel 8 --method pmr
    python benchmarks/holdout_trace.py --matrix 24 24 16 --iterations 300   # quick

The tables in benchmarks/RESULTS.md ("held-out lines choose when the fit stops") came from this
computation (one thread, seed 0).
"""
from __future__ import annotations

import argparse
import time

import torch

from gadget_lorein.recon.lorein import fit as lorein, model

from gadget_lorein import metrics

from gadget_lorein.physics import protocol

from gadget_lorein.recon import pipeline as recon

from gadget_lorein.sim import simulate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequence", choices=("qalas", "mrf"), default="mrf")
    ap.add_argument("--accel", type=float, default=400)
    ap.add_argument("--matrix", nargs=3, type=int, default=[64, 64, 48])
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.005)
    ap.add_argument("--method", choices=recon.NETWORK_METHODS, default="lorein")
    ap.add_argument("--holdout", type=float, default=recon.ReconSettings().holdout)
    ap.add_argument("--iterations", type=int, default=0, help="planned steps; 0 = the fit's default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if not args.holdout > 0:
        ap.error("--holdout must be above 0: the trace is of the held-out loss")
    proto = protocol.load(args.sequence)
    sim = simulate.simulate(proto, matrix=args.matrix, n_coils=args.coils, accel=args.accel,
                            noise=args.noise, seed=0)
    truth = sim.truth()
    settings = recon.ReconSettings(method=args.method, device=args.device, holdout=args.holdout,
                                   seed=args.seed, iterations=args.iterations)
    proto, sub, op, support, info = recon.prepare(sim.scan, settings)
    cfg = recon.fit_config(settings)
    patience, cfg.holdout_patience = cfg.holdout_patience, 10 ** 9   # see the whole run; the stop is worked out below
    names = ["T1", "T2", "PD"] + (["B1"] if proto.encodes_b1 else [])
    blocks = {"lorein": ["pmr", "lrr"], "pmr": ["pmr"], "lrr": ["lrr"]}[args.method]
    print(f"# held-out trace: {args.sequence} R={args.accel:g}, matrix {args.matrix}, {args.coils} coils, "
          f"{args.method}, holdout {args.holdout:g} ({op.held_out.n_lines} of {info['lines']} lines), "
          f"seed {args.seed}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    maps_cols = [(r, k) for r in ("brain", "tissue") for k in names]
    print("| step | " + " | ".join(f"held {b}" for b in blocks) + " | "
          + " | ".join(f"{k} {r}" for r, k in maps_cols) + " | s |")
    print("|---" * (2 + len(blocks) + len(maps_cols)) + "|")
    t0 = time.perf_counter()
    trace = []

    def monitor(step, losses, m):
        if args.method == "lrr":
            m = sub.match(m)
        out = recon.finish_maps(model.map_volumes(m, support, proto.encodes_b1), support)
        err = {r: metrics.map_errors(out, truth, r) for r in ("brain", "tissue")}
        trace.append((step, losses[blocks[0]]))
        print(f"| {step} | " + " | ".join(f"{losses[b]:.6f}" for b in blocks) + " | "
              + " | ".join(f"{err[r][k]:.3f}" for r, k in maps_cols)
              + f" | {time.perf_counter() - t0:.0f} |", flush=True)

    lorein.fit(args.method, op, sub, support, proto.encodes_b1, iterations=settings.iterations,
               seed=args.seed, config=cfg, monitor=monitor)
    rule, stop = lorein.HeldOutRule(cfg.holdout_tol, patience), None
    for step, loss in trace:                      # lorein.fit's own rule, on the whole trace
        if rule.update(step, loss) == "stop":
            stop = step
            break
    kept = rule.kept
    print(f"kept: step {kept}; " + (f"the fit stops at step {stop}" if stop else "no stop before the end"))


if __name__ == "__main__":
    main()
