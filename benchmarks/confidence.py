"""Confidence benchmark: does the Cramér-Rao SD map (gadget_lorein/recon/confidence.py) say where
the maps are wrong? Per case and method, on the simulated head phantom (realistic simulation by
default, as benchmarks/accuracy.py):

- Spearman rank correlation between the SD map and the actual |error| against the truth, over the
  pure tissue voxels (WM, GM, lesions without partial volume) and over the whole brain; a random
  map scores 0 +- 1/sqrt(voxels) (the "shuffled" column: the SD map permuted at random);
- measured / bound: RMS error over RMS SD in pure tissue (1 for an efficient unbiased estimator;
  below 1 where a regularised fit beats the per-voxel bound, above where bias or g-factor noise
  dominate);
- the fraction of pure tissue voxels marked undetermined, and the seconds the maps took.

    python benchmarks/confidence.py                                  # qalas8 and mrf200, SNR 30
    python benchmarks/confidence.py --cases qalas8 --methods zerofill llr --matrix 24 24 16
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from gadget_lorein import metrics
from gadget_lorein.physics import protocol
from gadget_lorein.recon import confidence
from gadget_lorein.recon import pipeline as recon
from gadget_lorein.sim import simulate

sys.path.insert(0, str(Path(__file__).parent))     # the benchmarks are scripts, not a package
from accuracy import parse_case  # noqa: E402


METHODS = ["zerofill", "llr", "lorein"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", type=parse_case, default=["qalas8", "mrf200"],
                   help="qalas<R> / mrf<R> (default qalas8 mrf200)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=recon.METHODS)
    p.add_argument("--matrix", nargs=3, type=int, default=[40, 32, 24], metavar=("NX", "NY", "NZ"))
    p.add_argument("--coils", type=int, default=6)
    p.add_argument("--snr", type=float, default=30.0, help="white-matter SNR (realistic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=0, help="0: each method's default")
    p.add_argument("--ideal", action="store_true", help="the idealised simulation (noise 0.02)")
    args = p.parse_args(argv)
    args.cases = [parse_case(c) if isinstance(c, str) else c for c in args.cases]
    return args


def scores(conf: dict, maps: dict, truth: dict, rng) -> dict:
    """Spearman (pure tissue, brain, shuffled), measured/bound and undetermined fraction per map."""
    pure, _ = metrics.tissue_masks(truth)
    brain = truth["labels"] > 0
    out = {}
    for k in ("T1", "T2", "B1"):
        if f"{k}_SD" not in conf or k not in truth:
            continue
        sd, err = conf[f"{k}_SD"], np.abs(maps[k] - truth[k])
        out[k] = dict(pure=spearmanr(sd[pure], err[pure]).statistic,
                      brain=spearmanr(sd[brain], err[brain]).statistic,
                      shuffled=spearmanr(rng.permutation(sd[pure]), err[pure]).statistic,
                      ratio=float(np.sqrt(np.mean(err[pure] ** 2)) / np.sqrt(np.mean(sd[pure] ** 2))))
    out["undetermined"] = float(conf["UNDETERMINED"][pure].mean())
    return out


def run_case(args, seq: str, R: float, method: str) -> tuple[dict, float]:
    proto = protocol.load(seq)
    if args.ideal:
        sim = simulate.simulate(proto, matrix=args.matrix, n_coils=args.coils, accel=R, noise=0.02,
                                seed=args.seed, mode="ideal")
    else:
        sim = simulate.simulate_realistic(proto, matrix=args.matrix, n_coils=args.coils, accel=R,
                                          snr=args.snr, seed=args.seed)
    res = recon.reconstruct(sim.scan, recon.ReconSettings(method=method, device="cpu",
                                                          iterations=args.iterations, seed=args.seed))
    t = time.perf_counter()
    conf = confidence.confidence_maps(proto, res.maps, res.support, res.noise, subspace=res.subspace)
    seconds = time.perf_counter() - t
    return scores(conf, res.maps.as_dict(), sim.truth(), np.random.default_rng(args.seed)), seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    nx, ny, nz = args.matrix
    sim = "idealised simulation, noise 0.02" if args.ideal else f"realistic simulation, SNR {args.snr:g}"
    print(f"confidence maps vs actual error: {sim}, {nx}x{ny}x{nz}, {args.coils} coils, seed {args.seed}; "
          "Spearman over pure tissue (brain in brackets), shuffled = the SD map permuted; "
          "measured/bound = RMS error / RMS SD in pure tissue\n")
    print("| case | method | map | Spearman pure (brain) | shuffled | measured / bound | "
          "undetermined | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for seq, R in args.cases:
        for method in args.methods:
            s, seconds = run_case(args, seq, R, method)
            for k in ("T1", "T2", "B1"):
                if k in s:
                    v = s[k]
                    print(f"| {seq}{R:g} | {method} | {k} | {v['pure']:.2f} ({v['brain']:.2f}) | "
                          f"{v['shuffled']:+.2f} | {v['ratio']:.2f} | {s['undetermined']:.3f} | "
                          f"{seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
