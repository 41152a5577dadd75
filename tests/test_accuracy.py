"""Accuracy of every method on the small qalas phantom at R = 8 (test_data/qalas_small: 24 x 24 x 16,
6 coils, noise 0.005), against the simulation's ground truth, all through ``recon.reconstruct`` with
the methods' defaults (what ``lorein recon --method NAME`` runs).

The network methods (lrr, pmr, lorein) are chaotic in float rounding: the seed, the thread count
and the versions of numpy, scipy and torch each move a single fit by as much as pmr and lorein
differ. A one-seed comparison of the two therefore passed on one machine and failed on the next
(2026-12-03, the same code: seed 0, two threads, brain T1/T2/PD lorein 0.138/0.290/0.073 against
pmr 0.109/0.338/0.066, where an earlier machine had measured 0.080/0.240/0.053 against
0.135/0.326/0.079). So these tests compare the network methods by their mean over seeds 0-3, each
fit on one thread (bit-identical for a given seed there), two fits at a time.

Measured (2026-12-03, AMD EPYC, torch 2.13.0+cpu, numpy 2.4, scipy 1.17; brain T1 / T2 / PD), the
defaults (5 % of the lines held out):
    lorein seeds 0-3  0.091/0.290/0.054  0.115/0.339/0.062  0.080/0.248/0.051  0.114/0.344/0.072
                      mean 0.100 / 0.305 / 0.060
    pmr    seeds 0-3  0.090/0.295/0.060  0.092/0.406/0.058  0.092/0.312/0.061  0.118/0.447/0.074
                      mean 0.098 / 0.365 / 0.063
    the deterministic baselines: zerofill 0.785/0.892/0.496, cg 0.483/0.725/0.381,
    llr 0.348/0.784/0.226; lrr (seed 0) 0.207/0.566/0.127.
With every line fitted (``holdout`` 0) the same seeds gave lorein 0.104 / 0.278 / 0.062 and pmr
0.124 / 0.339 / 0.074 (an earlier machine, 2026-12-01: 0.105 / 0.288 / 0.062 against
0.123 / 0.339 / 0.074): lower on every map. With the held-out lines, which the defaults use, PMR's
brain T1 gains more than LoREIN's and the two are level on T1 and PD; LoREIN is lower on T2 and on
every tissue map (tissue mean 0.079/0.082/0.037 against 0.082/0.090/0.039).

So what is asserted, and what is not:
- LoREIN's mean is below every deterministic baseline and LRR alone on every brain map.
- LoREIN's mean is not above PMR's by more than a seed's spread, and is below it on brain T2.
- LoREIN's mean is under thresholds that a broken fit cannot pass.
- NOT asserted: LoREIN below PMR alone on brain T1 and PD. That is issue #4's target, and at the
  defaults on this scan it does not hold (the means above); README, "Accuracy".
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

LINEAR = ("zerofill", "cg", "llr")
SEEDS = (0, 1, 2, 3)
MAPS = ("T1", "T2", "PD")
# LoREIN's mean brain NRMSE must stay below these (measured mean 0.100 / 0.305 / 0.060, worst seed
# 0.115 / 0.344 / 0.072); a fit that does not move from its smoothed start gave about
# 0.53 / 0.90 / 0.33 (measured on the 8-coil variant of this case), zero-filled matching gives
# 0.79 / 0.89 / 0.50 here
LOREIN_LIMITS = {"T1": 0.16, "T2": 0.36, "PD": 0.09}
# how far LoREIN's mean may lie above PMR's (about the standard error of a 4-seed mean here:
# the seeds' sd is 0.01-0.02 on T1, 0.04-0.07 on T2, 0.005-0.01 on PD)
PMR_SLACK = {"T1": 0.02, "T2": 0.0, "PD": 0.01}

# one process: fits the (method, seed) jobs it is given on one thread, prints brain NRMSE as JSON
_RUNNER = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from gadget_lorein import metrics
    from gadget_lorein.recon import pipeline as recon
    from gadget_lorein.io import rawfile
    torch.set_num_threads(1)
    raw, truth_path, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    scan = rawfile.read_raw(raw)
    with np.load(truth_path) as z:
        truth = {k: z[k] for k in z.files}
    out = []
    for method, seed in jobs:
        res = recon.reconstruct(scan, recon.ReconSettings(method=method, seed=seed))
        out.append([method, seed, metrics.map_errors(res.maps, truth)])
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def errors(qalas_small, tmp_path_factory):
    """{method: [brain errors of each seed]} (the linear methods once, lrr with seed 0)."""
    truth = tmp_path_factory.mktemp("accuracy") / "truth.npz"
    np.savez(truth, **{k: qalas_small.truth[k] for k in ("T1", "T2", "PD", "labels")})
    jobs = [[m, 0] for m in LINEAR + ("lrr",)] + [[m, s] for m in ("lorein", "pmr") for s in SEEDS]
    halves = [jobs[0::2], jobs[1::2]]       # two processes, each with half the seeds of each method
    procs = [subprocess.Popen([sys.executable, "-c", _RUNNER, str(qalas_small.raw), str(truth),
                               json.dumps(half)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for half in halves]
    out = {}
    for p in procs:
        stdout, stderr = p.communicate(timeout=1500)
        assert p.returncode == 0, f"accuracy runner failed:\n{stderr[-3000:]}"
        for method, seed, err in json.loads(stdout.strip().splitlines()[-1]):
            out.setdefault(method, {})[seed] = err
    return {m: [by_seed[s] for s in sorted(by_seed)] for m, by_seed in out.items()}


def _mean(errs: list[dict]) -> dict:
    return {k: float(np.mean([e[k] for e in errs])) for k in MAPS}


def _fmt(err: dict) -> str:
    return "/".join(f"{err[k]:.3f}" for k in MAPS)


def _table(errors) -> str:
    return "; ".join(f"{m} (mean of {len(errs)}) {_fmt(_mean(errs))}" for m, errs in errors.items())


@pytest.mark.timeout(1500)
def test_lorein_below_the_linear_baselines_and_lrr(errors):
    msg = f"brain NRMSE T1/T2/PD: {_table(errors)}"
    print(msg)
    lorein = _mean(errors["lorein"])
    for base in LINEAR + ("lrr",):
        for key in MAPS:
            assert lorein[key] < _mean(errors[base])[key], f"lorein {key} not below {base}: {msg}"


def test_lorein_against_pmr(errors):
    """Level with PMR alone within a seed's spread, and lower on brain T2 (module docstring: it is
    not lower on brain T1 and PD at the defaults on this scan)."""
    lorein, pmr = _mean(errors["lorein"]), _mean(errors["pmr"])
    msg = f"brain NRMSE over seeds {SEEDS}: lorein {_fmt(lorein)}, pmr {_fmt(pmr)}"
    print(msg)
    for key in MAPS:
        assert lorein[key] < pmr[key] + PMR_SLACK[key], f"lorein {key} above pmr + {PMR_SLACK[key]}: {msg}"


def test_lorein_thresholds(errors):
    lorein = _mean(errors["lorein"])
    bad = {k: round(lorein[k], 3) for k, v in LOREIN_LIMITS.items() if not lorein[k] <= v}
    assert not bad, f"lorein mean NRMSE above {LOREIN_LIMITS}: {bad} ({_table(errors)})"
