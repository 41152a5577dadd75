"""Mutation run: seeded random damage to a small scan's acquisitions, fed to the gadget's core
(``gadget.process``, the code every connection runs), counting clean errors, crashes and hangs.

    python benchmarks/mutation.py [--acquisitions 10000] [--seed 0] [--budget-s 300]

Each trial takes a fresh copy of a small simulated QALAS scan (8 x 8 x 4, 2 coils), mutates some of
its acquisitions (random flags, counters, sample counts, channel counts, centre samples, discards,
NaN data, truncation of the stream, random header sizes) and runs the reconstruction with method
zerofill. Outcomes:
    ok            maps sent
    clean error   an exception of the documented classes (MRDError, ReconError, SettingsError,
                  ResourceError, ProtocolError, CalibrationError): what the gadget sends as ERROR
    crash         any other exception (a bug: the traceback's last line is printed)
    hang          a trial over --trial-timeout-s (checked after the fact; the run is bounded by
                  --budget-s overall)
Until ``--acquisitions`` mutated acquisitions have been fed (or the budget is spent).
"""
from __future__ import annotations

import argparse
import collections
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

import ismrmrd
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gadget_lorein import limits, settings  # noqa: E402
from gadget_lorein.io import header, rawfile  # noqa: E402
from gadget_lorein.node import gadget  # noqa: E402
from gadget_lorein.physics import protocol  # noqa: E402
from gadget_lorein.recon import calibration, pipeline  # noqa: E402

CLEAN = (header.MRDError, pipeline.ReconError, settings.SettingsError, limits.ResourceError,
         protocol.ProtocolError, calibration.CalibrationError)
FLAGS = list(range(1, 33))


def make_scan(folder: Path):
    from gadget_lorein.physics import sequences
    from gadget_lorein.sim import simulate
    proto = protocol.load("qalas").with_overrides(dictionary={"t1_ms": [100, 4000, 12], "t2_ms": [10, 2000, 10]})
    sim = simulate.simulate(proto, matrix=(8, 8, 4), n_coils=2, accel=2.0, noise=0.01, seed=0)
    path = folder / "scan.h5"
    s = sim.scan
    rawfile.write_raw(path, s.lines, None, None, s.noise, proto.name, proto.yaml_text, s.fov_mm,
                      sequences.sequence_parameters(proto))
    xml, acqs = rawfile.iter_raw(path)
    return xml, list(acqs)


def mutate_acq(a: ismrmrd.Acquisition, rng) -> ismrmrd.Acquisition:
    kind = rng.integers(9)
    if kind == 0:
        a.set_flag(int(rng.choice(FLAGS)))
    elif kind == 1:
        a.flags = int(rng.integers(0, 2 ** 63))
    elif kind == 2:
        a.idx.kspace_encode_step_1 = int(rng.integers(0, 2 ** 16))
    elif kind == 3:
        a.idx.kspace_encode_step_2 = int(rng.integers(0, 2 ** 16))
    elif kind == 4:
        a.idx.contrast = int(rng.integers(0, 2 ** 16))
    elif kind == 5:
        ns = int(rng.integers(1, 64))
        nc = int(rng.integers(1, 4))
        head = a.getHead()
        head.number_of_samples, head.active_channels = ns, nc
        head.center_sample = int(rng.integers(0, ns))
        a = ismrmrd.Acquisition(head)
        a.data[:] = (rng.standard_normal((nc, ns)) + 1j * rng.standard_normal((nc, ns))).astype(np.complex64)
    elif kind == 6:
        a.discard_pre = int(rng.integers(0, 40))
        a.discard_post = int(rng.integers(0, 40))
    elif kind == 7:
        a.data[0, 0] = np.nan if rng.random() < 0.5 else np.inf
    else:
        a.center_sample = int(rng.integers(0, 2 ** 16))
    return a


def mutate_header(xml: str, rng) -> str:
    h = header.parse_header(xml)
    which = rng.integers(4)
    enc = h.encoding[0]
    if which == 0:
        enc.encodedSpace.matrixSize.x = int(rng.choice([0, 1, 7, 4096, 2 ** 20]))
    elif which == 1:
        for p in h.userParameters.userParameterLong:
            if p.name == "lorein.n_lines":
                p.value = int(rng.choice([0, 1, 10 ** 12, -5]))
    elif which == 2:
        h.acquisitionSystemInformation.receiverChannels = int(rng.choice([0, 1, 10 ** 5]))
    else:
        enc.encodingLimits.contrast.maximum = int(rng.choice([0, 1, 10 ** 6]))
    return header.header_to_xml(h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--acquisitions", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--trial-timeout-s", type=float, default=20.0)
    args = ap.parse_args(argv)
    logging.disable(logging.CRITICAL)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        import os
        os.environ.setdefault("LOREIN_CACHE_DIR", str(Path(tmp) / "cache"))
        xml, acqs = make_scan(Path(tmp))
        import copy
        outcomes = collections.Counter()
        crashes = collections.Counter()
        errors = collections.Counter()
        fed = trials = 0
        slowest = 0.0
        t_start = time.monotonic()
        while fed < args.acquisitions and time.monotonic() - t_start < args.budget_s:
            trials += 1
            items = [copy.deepcopy(a) for a in acqs]
            n_mut = int(rng.integers(1, 6))
            for i in rng.choice(len(items), n_mut, replace=False):
                items[i] = mutate_acq(items[i], rng)
            if rng.random() < 0.2:                       # truncation
                items = items[:int(rng.integers(0, len(items)))]
            hdr = mutate_header(xml, rng) if rng.random() < 0.1 else xml
            fed += n_mut
            t0 = time.monotonic()
            try:
                gadget.process(hdr, iter(items), {"method": "zerofill", "device": "cpu"}, lambda item: None)
                outcome = "ok"
            except CLEAN as err:
                outcome = "clean error"
                errors[type(err).__name__] += 1
            except Exception as err:
                outcome = "crash"
                crashes[f"{type(err).__name__}: {str(err)[:120]} @ "
                        f"{traceback.extract_tb(err.__traceback__)[-1].name}"] += 1
            took = time.monotonic() - t0
            slowest = max(slowest, took)
            if took > args.trial_timeout_s:
                outcome = "hang"
            outcomes[outcome] += 1
    wall = time.monotonic() - t_start
    print(f"mutation run: seed {args.seed}, {trials} trials, {fed} mutated acquisitions, {wall:.0f} s "
          f"(slowest trial {slowest:.2f} s)")
    for k in ("ok", "clean error", "crash", "hang"):
        print(f"  {k:12s} {outcomes.get(k, 0)}")
    print("  clean errors by class: " + ", ".join(f"{k} {v}" for k, v in errors.most_common()))
    for text, n in crashes.most_common(10):
        print(f"  crash x{n}: {text}")
    return 1 if outcomes.get("crash") or outcomes.get("hang") else 0


if __name__ == "__main__":
    sys.exit(main())
