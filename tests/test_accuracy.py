"""Accuracy of every method on the small qalas phantom at R = 8 (test_data/qalas_small: 24 x 24 x 16,
6 coils, noise 0.005), against the simulation's ground truth, all through ``recon.reconstruct`` with
the methods' defaults (what ``lorein recon --method NAME`` runs).

Measured on 2 CPU cores (torch 2.13.0, seed 0), brain NRMSE T1 / T2 / PD:
    zerofill 0.785 / 0.892 / 0.514      cg  0.532 / 0.720 / 0.416     llr 0.348 / 0.790 / 0.257
    lrr      0.346 / 0.637 / 0.231      pmr 0.254 / 0.475 / 0.191     lorein 0.267 / 0.461 / 0.193
LoREIN is far below every linear baseline and LRR alone. Against PMR alone (SUMMIT-like) this
small case cannot decide: LoREIN is lower on T2 and 1-5 % higher on T1 and PD, while seeds of the
same fit differ by more than that at this size (PMR brain T1 0.247 / 0.272 / 0.264 for seeds 0 / 1 /
2 on the 8-coil variant), and so does the same fit on one thread instead of two. Issue #4's "lower
than every baseline" therefore does not hold for PMR in this test; the comparison is reported in the
message and checked as "within 10 %". At the benchmark's 64 x 64 x 48 it does not hold everywhere
either (qalas R = 8, seed 0: LoREIN lower T2, equal PD, higher T1; see README, Benchmarks).
"""
from __future__ import annotations

import pytest

from gadget_lorein import metrics, mrd, recon

BASELINES = ("zerofill", "cg", "llr", "lrr")
# LoREIN's brain NRMSE must stay below these (measured: 0.267 / 0.461 / 0.193); a fit that does not
# move from its smoothed start gave about 0.53 / 0.90 / 0.33 (measured on the 8-coil variant of this
# case), zero-filled matching gives 0.79 / 0.89 / 0.51 here
LOREIN_LIMITS = {"T1": 0.32, "T2": 0.62, "PD": 0.23}


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
