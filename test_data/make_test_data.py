"""Regenerate the small test scans in this folder, byte for byte, and their SHA256SUMS.

    python test_data/make_test_data.py            # rewrite the files and SHA256SUMS here
    python test_data/make_test_data.py --out DIR  # write them elsewhere (SHA256SUMS not touched)
    python test_data/make_test_data.py --check    # regenerate into a temporary folder, compare

Files (the same code path as ``lorein simulate``: ``gadget_lorein.sim.files.simulate_to_files``):

Both are realistic scans (the default mode of ``lorein simulate``: the object on a 2x finer grid,
so partial volume at every boundary; a transmit field the qalas model lacks; scanner-like sampling;
white-matter SNR 30), seed 0:

- ``qalas_small.h5`` + ``qalas_small_truth.npz``: shipped qalas protocol, matrix 24 x 24 x 16,
  6 coils, R = 8; the same as
  ``lorein simulate --sequence qalas --matrix 24 24 16 --coils 6 --accel 8 --snr 30 --seed 0``.
- ``mrf_small.h5`` + ``mrf_small_truth.npz``: shipped mrf protocol with n_tr = 100, epg_states = 32
  and a dictionary grid T1 [100, 6000] ms x 40, T2 [10, 3000] ms x 40, B1 [0.6, 1.4] x 5 (the
  protocol YAML in the raw header carries these); matrix 24 x 24 x 16, 6 coils, R = 100.

The raw files follow docs/data-format.md; the truth files hold T1, T2 [ms], PD, B1 (mrf), labels,
brain_mask, pure (voxels without partial volume), fov_mm, protocol, matrix. Reproducible: HDF5 objects carry no time stamps (h5py does
not record them by default) and the .npz is written with fixed zip time stamps
(``gadget_lorein.sim.files.save_npz``). The numbers come from numpy's seeded generators and torch on CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

MATRIX = (24, 24, 16)
# the realistic simulation, as ``lorein simulate`` makes it by default (calibration and sampling
# pattern chosen by the simulator)
COMMON = dict(n_coils=6, snr=30.0, seed=0, mode="realistic")
MRF_OVERRIDES = dict(n_tr=100, epg_states=32,
                     dictionary={"t1_ms": [100.0, 6000.0, 40], "t2_ms": [10.0, 3000.0, 40],
                                 "b1": [0.6, 1.4, 5]})
CASES = {
    "qalas_small": dict(protocol="qalas", overrides=None, accel=8.0),
    "mrf_small": dict(protocol="mrf", overrides=MRF_OVERRIDES, accel=100.0),
}
FILES = [f"{name}{suffix}" for name in CASES for suffix in (".h5", "_truth.npz")]


def protocol_of(name: str):
    from gadget_lorein.physics import protocol
    case = CASES[name]
    proto = protocol.load(case["protocol"])
    if case["overrides"]:
        proto = proto.with_overrides(**case["overrides"])
    return proto


def plan_of(name: str, proto) -> dict:
    from gadget_lorein.sim import simulate
    case = CASES[name]
    nx, ny, nz = MATRIX
    _, calib, calib_mode, pattern = simulate.scan_masks(proto, ny, nz, case["accel"], seed=COMMON["seed"],
                                                        mode=COMMON["mode"])
    return dict(matrix=MATRIX, accel=case["accel"], calib=calib, calib_mode=calib_mode, pattern=pattern,
                **COMMON)


def generate(out: Path) -> dict:
    """Write every file into ``out``; return {file name: sha256}."""
    from gadget_lorein.sim.files import simulate_to_files
    out.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        proto = protocol_of(name)
        simulate_to_files(proto, plan_of(name, proto), out / f"{name}.h5", out / f"{name}_truth.npz")
    return {f: sha256(out / f) for f in FILES}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_sums(path: Path = HERE / "SHA256SUMS") -> dict:
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


def write_sums(sums: dict, path: Path = HERE / "SHA256SUMS") -> None:
    path.write_text("".join(f"{sums[f]}  {f}\n" for f in FILES))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write here instead of test_data/ (SHA256SUMS untouched)")
    ap.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare "
                    "with SHA256SUMS")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            got = generate(Path(tmp))
        want = read_sums()
        bad = [f for f in FILES if got.get(f) != want.get(f)]
        for f in FILES:
            print(f"{'ok  ' if f not in bad else 'DIFF'} {f}")
        if bad:
            print("(byte for byte on the kind of CPU that made them; on another, the float32 samples may "
                  "differ in their last bits: README, Test data, and tests/test_test_data.py)")
        return 1 if bad else 0
    out = args.out or HERE
    sums = generate(out)
    if args.out is None:
        write_sums(sums)
    for f in FILES:
        print(f"{sums[f]}  {f} ({(out / f).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
