"""Accuracy of every method on the small qalas phantom at R = 8 (test_data/qalas_small: 24 x 24 x 16,
6 coils, noise 0.005), against the simulation's ground truth, all through ``recon.reconstruct`` with
the methods' defaults (what ``lorein recon --method NAME`` runs).

Measured on 2 CPU cores (torch 2.13.0, seed 0), brain NRMSE T1 / T2 / PD:
    zerofill 0.785 / 0.892 / 0.496      cg  0.483 / 0.725 / 0.381     llr 0.348 / 0.784 / 0.226
    lrr      0.220 / 0.557 / 0.132      pmr 0.215 / 0.461 / 0.116     lorein 0.196 / 0.449 / 0.114
(before the coil maps were normalised before whitening and refined jointly: pmr 0.254 / 0.475 /
0.191, lorein 0.267 / 0.461 / 0.193.) LoREIN is far below every linear baseline and LRR alone.
Against PMR alone (SUMMIT-like) this small case cannot decide, although seed 0 happens to put
LoREIN lower on all three maps: over seeds 0-8 (one thread each) LoREIN's brain T1 / T2 / PD were
0.177 / 0.437 / 0.096 +- 0.028 / 0.043 / 0.015 and PMR's (seeds 0-9) 0.180 / 0.430 / 0.102 +- 0.025 /
0.053 / 0.016; seed by seed LoREIN was lower on PD 7 times of 9, on T1 6, on T2 5, and the same
fit on one thread instead of two moves by more than the gaps. Issue #4's "lower than every
baseline" is therefore not asserted against PMR; the comparison is reported in the message and
checked as "within 10 %". At the benchmark's sizes it does not hold everywhere either (README,
Benchmarks).
"""
from __future__ import annotations

import pytest

from gadget_lorein import metrics, mrd, recon

BASELINES = ("zerofill", "cg", "llr", "lrr")
# LoREIN's brain NRMSE must stay below these (measured: 0.196 / 0.449 / 0.114 at seed 0; the worst of
# seeds 0-8 on one thread 0.216 / 0.508 / 0.118); a fit that does not move from its smoothed start
# gave about 0.53 / 0.90 / 0.33 (measured on the 8-coil variant of this case), zero-filled matching
# gives 0.79 / 0.89 / 0.50 here
LOREIN_LIMITS = {"T1": 0.26, "T2": 0.57, "PD": 0.15}


@pytest.fixture(scope="module")
def errors(qalas_small):
    scan = mrd.read_raw(qalas_small.raw)
    out = {}
    for method in BASELINES + ("pmr", "lorein"):
        res = recon.reconstruct(scan, recon.ReconSettings(method=method))
        out[method] = metrics.map_errors(res.maps, qalas_small.truth)
    return out


def _table(errors) -> str:
    return "; ".join(f"{m} " + "/".join(f"{e[k]:.3f}" for k in ("T1", "T2", "PD")) for m, e in errors.items())


@pytest.mark.timeout(900)
def test_lorein_beats_the_linear_baselines_and_lrr(errors):
    msg = f"brain NRMSE T1/T2/PD: {_table(errors)}"
    print(msg)
    for key in ("T1", "T2", "PD"):
        for base in BASELINES:
            assert errors["lorein"][key] < errors[base][key], f"lorein {key} not below {base}: {msg}"


def test_lorein_thresholds(errors):
    bad = {k: round(errors["lorein"][k], 3) for k, v in LOREIN_LIMITS.items() if not errors["lorein"][k] <= v}
    assert not bad, f"lorein NRMSE above {LOREIN_LIMITS}: {bad} ({_table(errors)})"


def test_lorein_against_pmr(errors):
    """Within 10 % of PMR alone on every map (this size cannot rank them, see the module docstring)."""
    msg = f"brain NRMSE T1/T2/PD: {_table(errors)}"
    print(msg)
    for key in ("T1", "T2", "PD"):
        assert errors["lorein"][key] < 1.10 * errors["pmr"][key], f"lorein {key}: {msg}"
