"""Throughput across Gadgetron workers and across scans at once (issue #34; docs/distributed.md).
Prints Markdown tables; needs a Gadgetron server and the stock client (found as the tests find them:
tests/gadgetron_server.py).

    python benchmarks/throughput.py               # 4 volumes / 4 scans of 32x32x16, 8 coils, cg 30 iterations
    python benchmarks/throughput.py --small       # 16x16x8, 4 coils, cg 5 iterations (a smoke run)

1. Workers: one scan of N repetitions through config_xml/lorein_distributed.xml, a main server with
   1 worker and then with 2 (all on this machine's loopback), one thread per reconstruction
   (threads=1): the stock client's wall time, volumes per minute, and the speed-up of 2 workers.
2. Scans at once: K single-volume scans sent together to one server (lorein.xml), each gadget with
   ``threads`` threads, without a queue (device_slots 0: on the CPU every fit runs at once) and with
   one (device_slots 1: one fit at a time, the others wait): the wall time until the last scan is
   back and the mean time per scan.

Both include what the scans pay besides the fit: each connection starts a gadget process (Python and
torch imports, a few seconds) and the subspace comes from the cache (built once beforehand). On a
machine with fewer cores than workers x threads the workers share cores, and the speed-up says so.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from gadgetron_server import GadgetronServer, require_gadgetron  # noqa: E402

LORE = Path(sys.executable).with_name("lorein")
ENV = {"PYTHONPATH": str(REPO)}


def with_settings(source: Path, target: Path, settings: dict) -> Path:
    """A copy of a chain with some of its gadget's properties set."""
    tree = ET.parse(source)
    cfg = tree.getroot().find(".//external/configuration")
    for p in cfg.findall("property"):
        if p.get("name") in settings:
            p.set("value", str(settings[p.get("name")]))
    tree.write(target, encoding="UTF-8", xml_declaration=True)
    return target


def simulate(path: Path, args, repetitions: int) -> Path:
    nx, ny, nz = args.matrix
    subprocess.run([str(LORE), "simulate", "--sequence", "qalas", "--matrix", str(nx), str(ny), str(nz),
                    "--coils", str(args.coils), "--repetitions", str(repetitions), "-o", str(path), "-q"],
                   check=True)
    return path


def client(server: GadgetronServer, raw: Path, out: Path, chain: str) -> float:
    t0 = time.monotonic()
    proc = server.run_client(["-f", raw, "-o", out, "-c", chain, "-G", "run"], timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"client failed ({proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}\n"
                           f"{server.log_text()[-3000:]}")
    return time.monotonic() - t0


def workers_table(gt, work: Path, args, settings: dict) -> list:
    raw = simulate(work / "volumes.h5", args, args.volumes)
    chain = with_settings(REPO / "config_xml" / "lorein_distributed.xml", work / "dist.xml",
                          {**settings, "threads": 1})
    rows = []
    for n in (1, 2):
        workers = [GadgetronServer(gt, work / f"w{n}_{i}", env=ENV).start() for i in range(n)]
        command = "echo [" + ",".join(f'"localhost:{w.port}"' for w in workers) + "]"
        main = GadgetronServer(gt, work / f"main{n}", chains=[chain],
                               env={**ENV, "GADGETRON_REMOTE_WORKER_COMMAND": command}).start()
        try:
            seconds = client(main, raw, work / f"out{n}.h5", chain.name)
            done = [w.log_text().count("lorein: done") for w in workers]
        finally:
            for s in [main, *workers]:
                s.stop()
        rows.append((n, seconds, done))
    t1 = rows[0][1]
    lines = [f"{args.volumes} volumes of {'x'.join(map(str, args.matrix))}, {args.coils} coils, "
             f"{settings['method']} {settings['iterations']} iterations, threads=1 per reconstruction",
             "", "| workers | wall time (s) | volumes / min | speed-up | volumes per worker |",
             "|---|---|---|---|---|"]
    for n, sec, done in rows:
        lines.append(f"| {n} | {sec:.1f} | {60 * args.volumes / sec:.1f} | {t1 / sec:.2f} | "
                     f"{', '.join(map(str, done))} |")
    return lines


def concurrent_table(gt, work: Path, args, settings: dict) -> list:
    raw = simulate(work / "one.h5", args, 1)
    rows = []
    for slots in (0, 1):
        chain = with_settings(REPO / "config_xml" / "lorein.xml", work / f"single{slots}.xml",
                              {**settings, "threads": args.threads, "device_slots": slots})
        copies = [shutil.copyfile(raw, work / f"scan{slots}_{k}.h5") for k in range(args.scans)]
        with GadgetronServer(gt, work / f"server{slots}", chains=[chain],
                             env={**ENV, "LOREIN_SLOT_DIR": str(work / f"slots{slots}")}) as server:
            t0 = time.monotonic()
            with ThreadPoolExecutor(args.scans) as pool:
                each = list(pool.map(lambda k: client(server, copies[k], work / f"o{slots}_{k}.h5",
                                                      chain.name), range(args.scans)))
            wall = time.monotonic() - t0
            waits = server.log_text().count("waiting for a free slot")
        rows.append((slots, wall, sum(each) / len(each), waits))
    lines = [f"{args.scans} scans at once of {'x'.join(map(str, args.matrix))}, {args.coils} coils, "
             f"{settings['method']} {settings['iterations']} iterations, threads={args.threads} each",
             "", "| queue | wall time (s) | mean time per scan (s) | fits that waited |", "|---|---|---|---|"]
    for slots, wall, mean, waits in rows:
        lines.append(f"| {'device_slots=1' if slots else 'none (device_slots=0)'} | {wall:.1f} | {mean:.1f} | "
                     f"{waits} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="16x16x8, 4 coils, cg 5 iterations")
    ap.add_argument("--matrix", type=int, nargs=3, default=None, metavar=("NX", "NY", "NZ"))
    ap.add_argument("--coils", type=int, default=None)
    ap.add_argument("--method", default="cg")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--volumes", type=int, default=4, help="repetitions of the workers' scan (default 4)")
    ap.add_argument("--scans", type=int, default=4, help="scans sent at once (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="threads per reconstruction, part 2 (default 1)")
    ap.add_argument("--only", choices=("workers", "concurrent"), help="run one part")
    args = ap.parse_args(argv)
    args.matrix = args.matrix or ([16, 16, 8] if args.small else [32, 32, 16])
    args.coils = args.coils or (4 if args.small else 8)
    iterations = args.iterations or (5 if args.small else 30)
    settings = {"method": args.method, "iterations": iterations, "coil_maps": "lowres"}
    gt = require_gadgetron()
    with tempfile.TemporaryDirectory(prefix="lorein-throughput-") as tmp:
        work = Path(tmp)
        warm = simulate(work / "warm.h5", args, 1)          # the subspace into the cache once
        subprocess.run([str(LORE), "recon", str(warm), "-o", str(work / "warm_out.h5"), "-q",
                        "--method", args.method, "--iterations", "1"], check=True)
        if args.only in (None, "workers"):
            print("\n".join(workers_table(gt, work, args, settings)) + "\n")
        if args.only in (None, "concurrent"):
            print("\n".join(concurrent_table(gt, work, args, settings)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
