"""Speed benchmark of the node: where the time goes, how close each step is to the device's limits,
and how the fit scales. Prints Markdown tables; ``--record`` appends them, dated, to
benchmarks/RESULTS.md.

    python benchmarks/speed.py --small                 # reduced qalas case (about 2 min on 2 CPU cores)
    python benchmarks/speed.py                         # 160x160x128, 16 coils, R=16 (meant for a GPU)
    python benchmarks/speed.py --device cuda --record  # the GPU run
    bash benchmarks/gpu_session.sh                     # a lent GPU's whole session, logs to $OUT
    python benchmarks/speed.py --scaling               # fit time vs matrix size and MRF train length

1. Node path. A qalas (or mrf) scan is simulated (not a node stage), written with rawfile.write_raw
   into a temporary directory, and then processed as the node does it, in a fresh process (so that
   its peak RSS is the node's own): buffering (rawfile.iter_raw -> AcquisitionBuffer.add -> finish),
   recon.reconstruct (its own timings: prewhitening, subspace, coil_maps, operator, fit; the
   per-iteration times come from its progress callback) and image output (map_images.maps_to_images).
   The subspace is also built once from scratch (dictionary simulation + SVD, what the first scan
   of a protocol costs; later scans load it from the on-disk cache, a temporary one here).
   NRMSE of every map against the phantom (brain and tissue, gadget_lorein.metrics), and of the same
   fit run to 5x the iterations ('converged'; it may stop early on its own criterion).
2. Floors. The fit's dominant operations timed in isolation at the case's sizes, and the device's
   measured ceilings (large complex FFT in GFLOP/s with 5 N log2 N, large float32 matmul, and a
   device-to-device copy in GB/s counting read + write); each op's achieved rate against the
   matching ceiling. Work models are stated in the table (minimal traffic / nominal FLOPs).
   The node path's fit is then repeated to 5x the iterations ('converged'; last but one, as it is
   the longest run).
2b. Speed switches (``--variants coil_subset=8 virtual_coils=8 amp=1 coil_refine=0 ...``): the fit alone, in this
   process, on the node path's scan, once per variant and once with the defaults (baseline): fit
   time, time per iteration, peak device memory and NRMSE, so each switch's cost in accuracy sits
   beside its gain.
3. Scaling (``--scaling``). The fit at a fixed iteration count for several matrix sizes (qalas)
   and MRF train lengths (coarse dictionary), plus 1 vs 2 threads on CPU.

All device handling goes through recon.resolve_device (``--device auto|cpu|cuda|cuda:N``); on CUDA
every timed op is synchronised and warmed up. CPU timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gadget_lorein.recon.lorein import fit as lorein, model

from gadget_lorein import metrics
from gadget_lorein.physics import protocol, sequences
from gadget_lorein.recon import pipeline as recon
from gadget_lorein.sim import simulate
from gadget_lorein.io import buffer, map_images, rawfile
from gadget_lorein.fft import fftnc
from gadget_lorein.recon.lorein.hashgrid import CoordinateNet, HashGridEncoding
from gadget_lorein.physics.subspace import build_subspace

RESULTS = Path(__file__).with_name("RESULTS.md")
COARSE_DICTIONARY = {"t1_ms": [100.0, 6000.0, 40], "t2_ms": [10.0, 3000.0, 40], "b1": [0.6, 1.4, 5]}
HEADER = """# Speed benchmarks

Produced by `benchmarks/speed.py` (see its docstring); each run with `--record` appends a dated
section below. What is measured:

- **Node path**: a simulated scan is written as a raw ISMRMRD file and processed as the node does it,
  in a fresh process: buffering (reading the file through `buffer.AcquisitionBuffer`; in the chain the
  acquisitions arrive over the socket instead), prewhitening, subspace (cache load; the cold build, i.e.
  dictionary simulation + SVD on the first scan of a protocol, is listed separately), coil maps,
  operator set-up, fit (set-up = CG initialisation + dictionary matching + network set-up, then the
  iterations), and image output (`map_images.maps_to_images`). Peak host RSS is that process's
  `getrusage` maximum (it includes torch itself, listed as "RSS after imports"); peak device memory is
  `torch.cuda.max_memory_allocated`. NRMSE of each map against the phantom, after the benchmark's
  iteration count and after 5x as many ("converged"; the fit may stop early on its own criterion).
- **Floors**: the fit's dominant operations alone at the case's sizes, against the device's measured
  ceilings (complex FFT GFLOP/s with 5 N log2 N; float32 matmul TFLOP/s; copy GB/s counting read +
  write). Rates use stated work models (nominal FLOPs or minimal memory traffic), so a percentage is
  an upper bound on how well an op uses the device, not a profile.
- **Scaling**: time per iteration of the fit (fixed iteration count) and of each stage, vs matrix size
  (qalas) and MRF train length (coarse dictionary).

CPU timings come from a shared 2-core machine (other processes were running): expect +-30 % noise
and more; compare rows of one run rather than runs.
"""


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(fn, dev, min_time=0.3, max_reps=50, warmup=1):
    """Median seconds of fn() (warmed up; synchronised on CUDA); one timed call when it is slow."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    t_start = time.perf_counter()
    while len(times) < max_reps:
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - t_start > min_time and len(times) >= (3 if times[0] < 0.5 else 1):
            break
    return statistics.median(times)


def fmt_s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def make_protocol(args, n_tr: int | None = None) -> protocol.Protocol:
    proto = protocol.load(args.sequence if n_tr is None else "mrf")
    over = {}
    if proto.kind == "mrf":
        n = n_tr or args.n_tr
        if n:
            over["n_tr"] = int(n)
        if args.coarse_dictionary or n_tr is not None:
            over["dictionary"] = dict(COARSE_DICTIONARY)
    return proto.with_overrides(**over) if over else proto


def write_scan(sim: simulate.Simulation, proto: protocol.Protocol, path: Path) -> float:
    t = time.perf_counter()
    rawfile.write_raw(path, sim.scan.lines, None, None, sim.scan.noise, proto.name, proto.yaml_text,
                  sim.scan.fov_mm, sequences.sequence_parameters(proto))
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------------
# 1. the node path (run in a fresh process for an honest peak RSS)
# ------------------------------------------------------------------------------------------------

def node_path(raw_path: str, settings: dict, threads: int = 0, cold_subspace: bool = True,
              images: bool = True) -> dict:
    """Buffering -> recon.reconstruct -> maps_to_images on one raw file, timed as the node does it."""
    if threads:
        torch.set_num_threads(threads)
    rss_imports = peak_rss_mb()
    rs = recon.ReconSettings.from_mapping(settings)
    dev = recon.resolve_device(rs.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    out: dict = {"stages": {}, "rss_imports_mb": rss_imports}
    st = out["stages"]

    t = time.perf_counter()
    xml, acqs = rawfile.iter_raw(raw_path)
    buf = buffer.AcquisitionBuffer(xml)
    for acq in acqs:
        buf.add(acq)
    raw = buf.finish()
    scan = raw.to_scan()
    st["buffering"] = time.perf_counter() - t

    if cold_subspace:      # what the first scan of a protocol pays (then cached on disk)
        proto = recon.scan_protocol(scan, rs.protocol)
        t = time.perf_counter()
        build_subspace(proto, rs.rank or None, rs.energy, device="cpu")
        st["subspace_cold"] = time.perf_counter() - t

    stamps: list[float] = []
    losses: list[float] = []

    def progress(it, total, loss):
        stamps.append(time.perf_counter())
        losses.append(loss)

    t = time.perf_counter()
    result = recon.reconstruct(scan, rs, progress=progress)
    sync(dev)
    st["reconstruct"] = time.perf_counter() - t
    for k, v in result.timings.items():
        st[k] = v
    n_it = int(result.info.get("iterations") or 0)
    if len(stamps) >= 2:
        per_it = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        out["per_iteration"] = per_it
        out["per_iteration_median"] = statistics.median(np.diff(stamps))
        st["fit_iterations"] = per_it * len(stamps)       # the 1st iteration's warm-up excess lands in set-up
        st["fit_setup"] = st["fit"] - st["fit_iterations"]
    elif n_it:
        out["per_iteration"] = st["fit"] / n_it
    if not n_it and rs.method == "cg":
        n_it = rs.iterations or 30
        out["per_iteration"] = st["fit"] / n_it
    out["iterations"] = n_it

    if images:
        t = time.perf_counter()
        imgs = map_images.maps_to_images(result.maps.as_dict(), raw.geometry, method=rs.method,
                                  extra={"LOREIN_Protocol": result.info.get("protocol", "")})
        st["image_output"] = time.perf_counter() - t
        out["n_images"] = len(imgs)
    out["peak_rss_mb"] = peak_rss_mb()
    out["peak_device_mb"] = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None)
    out["voxels"] = int(np.count_nonzero(result.support))
    out["maps"] = result.maps.as_dict()
    out["info"] = {k: v for k, v in result.info.items() if k != "settings"}
    out["final_loss"] = losses[-1] if losses else None
    out["shape"] = tuple(raw.geometry.shape)
    out["threads"] = torch.get_num_threads()
    return out


def run_isolated(fn, *a, in_process=False, **kw):
    if in_process:
        return fn(*a, **kw)
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(fn, *a, **kw).result()


def node_section(args, dev, tmp: Path) -> tuple[str, dict]:
    nx, ny, nz = args.matrix
    proto = make_protocol(args)
    t = time.perf_counter()
    sim = simulate.simulate(proto, matrix=(nx, ny, nz), n_coils=args.coils, accel=args.accel,
                            noise=args.noise, seed=0)
    t_sim = time.perf_counter() - t
    raw_path = tmp / "raw.h5"
    t_write = write_scan(sim, proto, raw_path)
    truth = sim.truth()
    settings = dict(method=args.method, device=args.device, iterations=args.iterations,
                    coil_batch=args.coil_batch)
    print(f"simulated in {t_sim:.1f} s, raw file written in {t_write:.1f} s "
          f"({raw_path.stat().st_size / 2**20:.1f} MiB); running the node path ...", file=sys.stderr,
          flush=True)
    res = run_isolated(node_path, str(raw_path), settings, args.threads, in_process=args.in_process)

    info, st = res["info"], res["stages"]
    lines = []
    lines.append(f"Case: {proto.name} ({proto.n_frames} frames), matrix {nx}x{ny}x{nz} (x, y, z), "
                 f"{args.coils} coils, R = {args.accel:g} ({info.get('lines')} lines), noise "
                 f"{args.noise:g}, method {args.method}, rank K = {info.get('rank')}, support "
                 f"{res['voxels']} voxels, torch threads: {res['threads']}. Simulation "
                 f"{t_sim:.1f} s and writing the raw file {t_write:.1f} s (not node stages).")
    lines.append("")
    per_it = res.get("per_iteration")
    rows = [["buffering (read raw file -> AcquisitionBuffer)", fmt_s(st["buffering"]), ""],
            ["prewhitening", fmt_s(st.get("prewhitening")), ""],
            ["subspace (on-disk cache load)", fmt_s(st.get("subspace")), ""],
            ["coil maps (+ support)", fmt_s(st.get("coil_maps")), ""],
            ["operator (A^H y, Gram)", fmt_s(st.get("operator")), ""],
            ["fit: set-up (CG init, matching, networks, 1st-iteration warm-up) + final maps", fmt_s(st.get("fit_setup")), ""],
            ["fit: iterations", fmt_s(st.get("fit_iterations", st.get("fit"))),
             (f"{res['iterations']} x {fmt_s(per_it)} (median {fmt_s(res.get('per_iteration_median'))})"
              if "fit_iterations" in st else
              f"{res['iterations']} iterations, {fmt_s(per_it)} each incl. power iteration and matching")],
            ["fit total", fmt_s(st.get("fit")), ""],
            ["image output (maps_to_images)", fmt_s(st.get("image_output")),
             f"{res.get('n_images', 0)} images"],
            ["**node total** (buffering + reconstruct + images)",
             fmt_s(st["buffering"] + st["reconstruct"] + st.get("image_output", 0)), ""],
            ["subspace, cold build (first scan of a protocol; not in the total)",
             fmt_s(st.get("subspace_cold")), "dictionary simulation + SVD + table"]]
    lines.append(table(["stage", "time", "note"], rows))
    lines.append("")
    dmem = res["peak_device_mb"]
    lines.append(f"Peak host RSS {res['peak_rss_mb']:.0f} MB (RSS after imports "
                 f"{res['rss_imports_mb']:.0f} MB); peak device memory "
                 f"{'%.0f MB' % dmem if dmem is not None else 'n/a (CPU)'}.")
    lines.append("")

    lines.append(nrmse_table(truth, [("benchmark", res)]))
    ctx = dict(sim=sim, proto=proto, K=info.get("rank"), coils=info.get("coils"), res=res,
               raw_path=raw_path, settings=settings, truth=truth,
               shape=res["shape"], voxels=res["voxels"], per_iteration=per_it)
    return "\n".join(lines), ctx


def nrmse_keys(maps: dict, truth: dict) -> list[str]:
    return [k for k in ("T1", "T2", "PD", "B1") if k in maps and k in truth]


def nrmse_header(keys: list[str]) -> list[str]:
    return [f"{k} brain" for k in keys] + [f"{k} tissue" for k in keys]


def nrmse_cells(maps: dict, truth: dict, keys: list[str]) -> list[str]:
    """NRMSE of each map over the brain, then over the tissue (gadget_lorein.metrics)."""
    eb, et = metrics.map_errors(maps, truth), metrics.map_errors(maps, truth, "tissue")
    return [f"{eb[k]:.3f}" for k in keys] + [f"{et[k]:.3f}" for k in keys]


def nrmse_table(truth: dict, runs: list) -> str:
    """NRMSE of each map (brain and tissue) for each (label, node_path result)."""
    keys = nrmse_keys(runs[0][1]["maps"], truth)
    rows = [[label, r["iterations"], fmt_s(r["stages"].get("fit"))] + nrmse_cells(r["maps"], truth, keys)
            for label, r in runs]
    return "NRMSE against the phantom:\n\n" + table(["run", "iterations", "fit time"] + nrmse_header(keys), rows)


def converged_section(args, ctx: dict) -> str:
    """The node path's fit again at 5x the iterations (last, as it is the longest run)."""
    res = ctx["res"]
    base = res["iterations"] or args.iterations or lorein.FitConfig().iterations
    print(f"converged run: {5 * base} iterations ...", file=sys.stderr, flush=True)
    conv = run_isolated(node_path, str(ctx["raw_path"]), {**ctx["settings"], "iterations": 5 * base},
                        args.threads, cold_subspace=False, images=False, in_process=args.in_process)
    return ("The same fit to 5x the iterations (it may stop earlier on its own convergence test):\n\n"
            + nrmse_table(ctx["truth"], [("benchmark", res), ("converged (5x)", conv)]))


# ------------------------------------------------------------------------------------------------
# 2. floors and ceilings
# ------------------------------------------------------------------------------------------------

def ceilings(dev: torch.device) -> dict:
    gpu = dev.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    out = {}
    # complex FFT: batch of 3D volumes
    shape = (8, 128, 128, 128) if gpu else (2, 128, 128, 128)
    x = torch.randn(shape, generator=g, dtype=torch.complex64).to(dev)
    n = shape[1] * shape[2] * shape[3]
    t = bench(lambda: torch.fft.fftn(x, dim=(-3, -2, -1)), dev)
    out["fft"] = dict(label=f"complex64 3D FFT {shape[0]}x128^3", seconds=t,
                      gflops=shape[0] * 5 * n * math.log2(n) / t / 1e9)
    del x
    # float32 matmul
    m = 8192 if gpu else 2048
    a = torch.randn(m, m, generator=g).to(dev)
    b = torch.randn(m, m, generator=g).to(dev)
    t = bench(lambda: a @ b, dev)
    out["matmul"] = dict(label=f"float32 matmul {m}^3", seconds=t, tflops=2 * m ** 3 / t / 1e12)
    del a, b
    # device-to-device copy (read + write)
    nbytes = (2 << 30) if gpu else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), dev)
    out["copy"] = dict(label=f"copy {nbytes >> 20} MiB", seconds=t, gbs=2 * nbytes / t / 1e9)
    return out


def floors_section(args, dev, ctx: dict, ceil: dict) -> str:
    sim, proto = ctx["sim"], ctx["proto"]
    g = torch.Generator(device="cpu").manual_seed(0)
    rs = recon.ReconSettings(method=args.method, device=args.device, coil_batch=args.coil_batch)
    t = time.perf_counter()
    prepared = recon.prepare(sim.scan, rs)
    ctx["prepared"] = {(0, args.coil_batch): (prepared, time.perf_counter() - t)}   # for the variants
    _, sub, op, support, _ = prepared
    K, C = op.K, op.maps.shape[0]
    shape = op.shape
    V = shape[0] * shape[1] * shape[2]
    N = int(support.sum())
    fft_peak, mm_peak, bw_peak = ceil["fft"]["gflops"], ceil["matmul"]["tflops"] * 1e3, ceil["copy"]["gbs"]
    rows = []

    def row(name, t, work, rate, peak, unit):
        pct = f"{100 * rate / peak:.0f} %" if peak else "-"
        rows.append([name, fmt_s(t), work, f"{rate:.1f} {unit}", pct])

    def crandn(*s):
        return torch.randn(s, generator=g, dtype=torch.complex64).to(dev)

    # FFT of the (coils x K x volume) tensor
    x5 = crandn(C, K, *shape)
    t = bench(lambda: fftnc(x5), dev)
    fl = C * K * 5 * V * math.log2(V)
    row(f"fftnc ({C}x{K}x{'x'.join(map(str, shape))})", t, f"{fl / 1e9:.2f} GFLOP", fl / t / 1e9,
        fft_peak, "GFLOP/s")
    t_fft = t
    t = bench(lambda: op.apply_gram(x5), dev)
    fl = 8 * C * K * K * V
    row(f"Gram apply (einsum, {K}x{K} per k-space location)", t, f"{fl / 1e9:.2f} GFLOP", fl / t / 1e9,
        mm_peak, "GFLOP/s")
    del x5
    # data term of the fit: scatter + ||A X - y||^2, forward and backward
    xv = crandn(N, K).requires_grad_(True)

    def data_term():
        loss = op.data_loss(model.scatter(xv, support))
        loss.backward()
    t = bench(data_term, dev)
    t_data = t
    fl = 2 * C * K * 5 * V * math.log2(V)
    row("data term fwd+bwd (scatter, coil FFT, Gram, adjoint)", t, f"{fl / 1e9:.2f} GFLOP (FFTs only)",
        fl / t / 1e9, fft_peak, "GFLOP/s")
    xk = crandn(K, *shape)
    t = bench(lambda: op.normal(xk), dev)
    row("A^H A (one CG iteration's operator)", t, f"{fl / 1e9:.2f} GFLOP (FFTs only)", fl / t / 1e9,
        fft_peak, "GFLOP/s")
    del xk
    # hash-grid encoding on the support voxels
    cfg = model.grid_config(support, lorein.FitConfig())          # as the fit builds it
    coords = model.support_coords(support)
    enc = HashGridEncoding(cfg).to(dev)
    L, T, Fd = cfg.levels, 2 ** cfg.log2_table, cfg.features
    enc.precompute(coords)                 # keeps only the table entries the voxels reach
    reachable = enc.table.shape[0]

    def enc_fwd():
        with torch.no_grad():
            enc()

    def enc_fb():
        enc.table.grad = None
        enc().sum().backward()
    t = bench(enc_fwd, dev)
    by = L * N * 8 * (4 + 4 + 4 * Fd) + L * N * Fd * 4        # CSR: int32 column + weight + gathered row
    row(f"hash-grid encoding fwd ({L} levels, {N} voxels)", t, f"{by / 1e6:.0f} MB", by / t / 1e9, bw_peak,
        "GB/s")
    t_enc = bench(enc_fb, dev)
    by2 = 2 * by + 2 * reachable * Fd * 4                        # + table gradient (zero + write)
    row(f"hash-grid encoding fwd+bwd ({reachable} reachable of {L * T} table entries)", t_enc,
        f"{by2 / 1e6:.0f} MB", by2 / t_enc / 1e9, bw_peak, "GB/s")
    del enc
    # both coordinate networks and Adam, as in the fit
    out_pmr = 3 + int(proto.encodes_b1 and sub.b1[-1] > sub.b1[0]) + 1     # as model.PMR
    nets = [CoordinateNet(out_pmr, cfg, 0).to(dev), CoordinateNet(2 * K, cfg, 1).to(dev)]
    for net in nets:
        net.precompute(coords)
    params = [p for net in nets for p in net.parameters()]
    n_params = sum(p.numel() for p in params)

    def nets_fb():
        for net in nets:
            net.zero_grad(set_to_none=True)
            net().square().sum().backward()
    t_nets = bench(nets_fb, dev)
    rows.append([f"both coordinate networks fwd+bwd (encoding + MLP, outputs {out_pmr} and {2 * K})",
                 fmt_s(t_nets), "", "", ""])
    opt = torch.optim.Adam(params, lr=1e-2)
    nets_fb()
    t_adam = bench(opt.step, dev)
    by = n_params * 4 * 7                                          # p, grad, m, v read; p, m, v written
    row(f"Adam step ({n_params / 1e6:.2f} M parameters: reachable hash entries + MLPs)", t_adam,
        f"{by / 1e6:.0f} MB", by / t_adam / 1e9, bw_peak, "GB/s")
    del nets, opt, params
    # signal-table lookup and the full signal model
    t1 = torch.exp(torch.empty(N, device=dev).uniform_(math.log(300), math.log(3000))).requires_grad_(True)
    t2 = torch.exp(torch.empty(N, device=dev).uniform_(math.log(30), math.log(300))).requires_grad_(True)
    b1 = torch.empty(N, device=dev).uniform_(0.8, 1.2).requires_grad_(True)

    def coeff_fb():
        c = sub.coefficients(t1, t2, b1)
        c.abs().sum().backward()
    t_coef = bench(coeff_fb, dev)
    by = N * (8 * 2 * K * 4 * 2 + 2 * K * 4 * 2)                  # 8 corners x 2K floats, fwd + bwd
    row(f"signal table lookup fwd+bwd (SubspaceModel.coefficients, {N} voxels)", t_coef,
        f"{by / 1e6:.0f} MB", by / t_coef / 1e9, bw_peak, "GB/s")
    nsig = min(N, 4096) if proto.kind == "mrf" else N             # EPG is slow: a subset for mrf

    def signal_fb():
        s = sequences.signal(proto, t1[:nsig], t2[:nsig], b1[:nsig])
        s.abs().sum().backward()
    t_sig = bench(signal_fb, dev)
    by = nsig * proto.n_frames * 8
    row(f"signal model fwd+bwd (sequences.signal, {nsig} voxels x {proto.n_frames} frames; not in "
        f"the fit loop)", t_sig, f"{by / 1e6:.1f} MB output", by / t_sig / 1e9, bw_peak, "GB/s")
    # dictionary matching of the support voxels (fit set-up and the cg/lrr methods)
    xm = crandn(N, K)
    b1g, t2g, t1g = np.meshgrid(sub.b1, sub.t2, sub.t1, indexing="ij")
    atoms = int((t2g <= t1g).sum())                                 # the atoms match() uses
    t_match = bench(lambda: sub.match(xm), dev, min_time=0.1)
    by = N * atoms * (8 + 8 + 4 + 4)            # N x atoms inner products and |.| written + read
    row(f"dictionary matching ({N} voxels x {atoms} atoms, K = {K})", t_match,
        f"{by / 1e6:.0f} MB (N x atoms products)", by / t_match / 1e9, bw_peak, "GB/s")
    del xm

    est = 2 * t_data + t_nets + t_coef + t_adam
    lines = [table(["operation (at the case's sizes)", "time", "work", "achieved", "of ceiling"], rows), ""]
    lines.append("Ceilings measured on this device: " + "; ".join([
        f"{ceil['fft']['label']}: {ceil['fft']['gflops']:.1f} GFLOP/s",
        f"{ceil['matmul']['label']}: {ceil['matmul']['tflops']:.3f} TFLOP/s",
        f"{ceil['copy']['label']}: {ceil['copy']['gbs']:.1f} GB/s"]) + ".")
    lines.append("(Above 100 %: the op's data fit in cache, the ceiling's did not. The hash tables keep "
                 "only the entries the support voxels reach.)")
    lines.append("")
    pi = ctx.get("per_iteration")
    lines.append(f"One lorein iteration from these parts (2 data terms + both networks + table lookup + "
                 f"Adam, without the coupling term and autograd glue): {fmt_s(est)}; measured in the node "
                 f"path: {fmt_s(pi)}. Its FFTs alone (4 x fftnc): {fmt_s(4 * t_fft)}; hash-grid "
                 f"fwd+bwd x 2: {fmt_s(2 * t_enc)}.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# 2b. speed switches (fit only, on the node path's scan)
# ------------------------------------------------------------------------------------------------

VARIANT_KEYS = {"iterations": int, "virtual_coils": int, "coil_subset": int, "amp": int,
                "coil_batch": int, "coil_refine": int}


def parse_variant(spec: str) -> dict:
    """'coil_subset=8,amp=1' -> {'coil_subset': 8, 'amp': 1}; 'baseline' -> {}."""
    out = {}
    if spec in ("", "baseline"):
        return out
    for item in spec.split(","):
        key, _, val = item.partition("=")
        if key not in VARIANT_KEYS or not val:
            raise ValueError(f"variant '{spec}': '{item}' is not KEY=VALUE with KEY one of "
                             f"{', '.join(VARIANT_KEYS)}")
        out[key] = VARIANT_KEYS[key](val)
    return out


def variants_section(args, dev, ctx: dict) -> str:
    """The fit alone (after prepare: prewhitening, coil maps, operator) for each speed switch, on
    the scan of the node path, in this process; same seed, same iteration count unless the variant
    sets one. Prepare is redone only when the variant changes it (virtual_coils)."""
    sim, proto = ctx["sim"], ctx["proto"]
    truth = sim.truth()
    specs = ["baseline"] + [v for v in args.variants if v != "baseline"]
    rows, prepared = [], ctx.pop("prepared", {})
    for spec in specs:
        kv = parse_variant(spec)
        prep_key = (kv.get("virtual_coils", 0), kv.get("coil_batch", args.coil_batch))
        if prep_key not in prepared:
            prepared.clear()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            rs = recon.ReconSettings(method=args.method, device=args.device, virtual_coils=prep_key[0],
                                     coil_batch=prep_key[1])
            t = time.perf_counter()
            prepared[prep_key] = (recon.prepare(sim.scan, rs), time.perf_counter() - t)
        (_, sub, op, support, info), t_prep = prepared[prep_key]
        cfg = lorein.FitConfig(coil_subset=kv.get("coil_subset", 0), amp=bool(kv.get("amp", 0)),
                               coil_refine=kv.get("coil_refine", lorein.FitConfig.coil_refine))
        iterations = kv.get("iterations", args.iterations or cfg.iterations)
        stamps = []
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        print(f"variant {spec} ...", file=sys.stderr, flush=True)
        sync(dev)
        t = time.perf_counter()
        maps, fit_info = lorein.fit(args.method, op, sub, support, proto.encodes_b1, iterations=iterations,
                                    seed=0, config=cfg,
                                    progress=lambda it, total, loss: stamps.append(time.perf_counter()))
        sync(dev)
        t_fit = time.perf_counter() - t
        per_it = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
        out = recon.finish_maps(maps, support).as_dict()
        keys = nrmse_keys(out, truth)
        mem = f"{torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MB" if dev.type == "cuda" else "-"
        rows.append([spec, f"{info['coils']} coils, prepare {fmt_s(t_prep)}", fit_info["iterations"],
                     fmt_s(t_fit), fmt_s(per_it), mem] + nrmse_cells(out, truth, keys))
        print(" | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
    lines = [f"Speed switches: the {args.method} fit alone on the same scan (seed 0), after prepare; "
             "peak device memory of the fit. Every speed switch is off by default and coil_refine is "
             "on (8) by default (recon.ReconSettings).", ""]
    lines.append(table(["variant", "operator", "iterations", "fit time", "per iteration",
                        "peak device memory"] + nrmse_header(keys), rows))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# 3. scaling
# ------------------------------------------------------------------------------------------------

def scaling_case(args, proto, matrix, accel, tmp: Path, iterations: int, threads: int = 0,
                 isolated: bool = False, env: dict | None = None) -> dict:
    nx, ny, nz = matrix
    sim = simulate.simulate(proto, matrix=(nx, ny, nz), n_coils=args.scaling_coils, accel=accel,
                            noise=args.noise, seed=0)
    case_dir = Path(tempfile.mkdtemp(dir=tmp))
    os.environ["LOREIN_CACHE_DIR"] = str(case_dir / "cache")        # cold subspace per case
    raw = case_dir / "raw.h5"
    write_scan(sim, proto, raw)
    settings = dict(method=args.method, device=args.device, iterations=iterations)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})             # read by a spawned process's OpenMP runtime at start
    try:
        res = run_isolated(node_path, str(raw), settings, threads, cold_subspace=True, images=True,
                           in_process=not isolated)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    res.pop("maps")
    return res


def scaling_section(args, dev, tmp: Path) -> str:
    it = args.scaling_iterations
    cols = ["buffering", "subspace_cold", "subspace", "coil_maps", "operator", "fit_setup"]
    head = ["K", "support voxels", "lines", "buffering", "subspace cold", "subspace (cache)",
            "coil maps", "operator", "fit set-up", "s / iteration", "fit total"]

    def cells(r):
        st = r["stages"]
        return ([r["info"].get("rank"), r["voxels"], r["info"].get("lines")]
                + [fmt_s(st.get(c)) for c in cols] + [fmt_s(r.get("per_iteration")), fmt_s(st.get("fit"))])

    lines = [f"Fit: method {args.method}, {it} iterations (no early stop within that), "
             f"{args.scaling_coils} coils, torch threads: {args.threads or torch.get_num_threads()}.", ""]
    rows = []
    mid = None
    for m in args.scaling_matrices:
        mat = tuple(int(v) for v in m.split("x"))
        print(f"scaling: qalas {m} ...", file=sys.stderr, flush=True)
        r = scaling_case(args, protocol.load("qalas"), mat, args.accel_scaling, tmp, it, args.threads)
        rows.append([m] + cells(r))
        if mid is None and m == args.scaling_matrices[len(args.scaling_matrices) // 2]:
            mid = mat
    lines.append(f"qalas, R = {args.accel_scaling:g}, matrix x*y*z:")
    lines.append("")
    lines.append(table(["matrix"] + head, rows))
    lines.append("")
    rows = []
    mrf_mat = tuple(int(v) for v in args.mrf_matrix.split("x"))
    for n in args.mrf_ntr:
        print(f"scaling: mrf n_tr {n} ...", file=sys.stderr, flush=True)
        proto = make_protocol(args, n_tr=n)
        r = scaling_case(args, proto, mrf_mat, args.mrf_accel, tmp, it, args.threads)
        rows.append([n] + cells(r))
    d = COARSE_DICTIONARY
    if rows:
        lines.append(f"mrf, matrix {args.mrf_matrix}, R = {args.mrf_accel:g} (lines grow with the train), "
                     f"coarse dictionary t1 {d['t1_ms']} t2 {d['t2_ms']} b1 {d['b1']}:")
        lines.append("")
        lines.append(table(["n_tr"] + head, rows))
    if dev.type == "cpu" and args.thread_counts and mid is not None:
        rows = []
        variants = [(th, {}) for th in args.thread_counts]
        variants += [(th, {"OMP_WAIT_POLICY": "PASSIVE"}) for th in args.thread_counts if th > 1]
        for th, env in variants:
            label = f"{th}" + (" (OMP_WAIT_POLICY=PASSIVE)" if env else "")
            print(f"scaling: qalas {'x'.join(map(str, mid))} with {label} threads ...", file=sys.stderr,
                  flush=True)
            r = scaling_case(args, protocol.load("qalas"), mid, args.accel_scaling, tmp, it, th,
                             isolated=True, env=env)
            rows.append([label, fmt_s(r.get("per_iteration")), fmt_s(r.get("per_iteration_median")),
                         fmt_s(r["stages"].get("fit_setup")), fmt_s(r["stages"].get("coil_maps"))])
        lines.append("")
        lines.append(f"CPU threads (torch.set_num_threads in a fresh process each), qalas "
                     f"{'x'.join(map(str, mid))}. On a shared machine, as many threads as cores lets a "
                     f"descheduled OpenMP thread stall every parallel op (libgomp spin-waits by default):")
        lines.append("")
        lines.append(table(["threads", "s / iteration (mean)", "median", "fit set-up", "coil maps"], rows))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true",
                    help="reduced case: 32x32x24, 8 coils, R=16, 30 iterations (converged: 150)")
    ap.add_argument("--matrix", nargs=3, type=int, default=None, metavar=("NX", "NY", "NZ"),
                    help="default 160 160 128 (--small: 32 32 24)")
    ap.add_argument("--coils", type=int, default=None, help="default 16 (--small: 8)")
    ap.add_argument("--accel", type=float, default=16.0)
    ap.add_argument("--noise", type=float, default=0.005)
    ap.add_argument("--sequence", default="qalas", choices=["qalas", "mrf"])
    ap.add_argument("--n-tr", type=int, default=0, help="mrf train length override")
    ap.add_argument("--coarse-dictionary", action="store_true", help="mrf: coarse dictionary grid")
    ap.add_argument("--method", default="lorein", choices=list(recon.METHODS))
    ap.add_argument("--iterations", type=int, default=None,
                    help="fit iterations; 0 = the method's default (default: 0, --small: 30)")
    ap.add_argument("--no-converged", action="store_true", help="skip the 5x-iterations run")
    ap.add_argument("--no-floors", action="store_true", help="skip the floor measurements")
    ap.add_argument("--variants", nargs="*", default=[], metavar="KEY=VAL[,KEY=VAL]",
                    help="also time the fit alone with these speed switches (and a baseline), e.g. "
                         "coil_subset=8 virtual_coils=8 amp=1 iterations=100; keys: "
                         + ", ".join(VARIANT_KEYS))
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--coil-batch", type=int, default=0,
                    help="coils per FFT batch in the operator (0 = all; smaller = less memory)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    ap.add_argument("--in-process", action="store_true",
                    help="run the node path in this process (peak RSS then includes the simulation)")
    ap.add_argument("--scaling", action="store_true", help="run the scaling tables instead of the node path")
    ap.add_argument("--scaling-matrices", nargs="*", default=["24x24x16", "32x32x24", "48x48x32"])
    ap.add_argument("--scaling-iterations", type=int, default=20)
    ap.add_argument("--scaling-coils", type=int, default=8)
    ap.add_argument("--accel-scaling", type=float, default=16.0)
    ap.add_argument("--mrf-ntr", nargs="*", type=int, default=[100, 200, 400])
    ap.add_argument("--mrf-matrix", default="32x32x24")
    ap.add_argument("--mrf-accel", type=float, default=200.0)
    ap.add_argument("--thread-counts", nargs="*", type=int, default=[1, 2],
                    help="--scaling on CPU: also time the middle matrix with these thread counts")
    ap.add_argument("--record", action="store_true", help=f"append the tables to {RESULTS}")
    args = ap.parse_args(argv)
    for spec in args.variants:
        try:
            parse_variant(spec)
        except ValueError as err:
            ap.error(str(err))
    if args.variants and args.method not in ("lorein", "pmr", "lrr"):
        ap.error(f"--variants times the network fit; --method {args.method} has none")
    if args.matrix is None:
        args.matrix = [32, 32, 24] if args.small else [160, 160, 128]
    if args.coils is None:
        args.coils = 8 if args.small else 16
    if args.iterations is None:
        args.iterations = 30 if args.small else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dev = recon.resolve_device(args.device)
    except recon.ReconError as err:
        ap.error(str(err))

    with tempfile.TemporaryDirectory(prefix="lorein-speed-") as tmpdir:
        tmp = Path(tmpdir)
        os.environ["LOREIN_CACHE_DIR"] = str(tmp / "cache")          # a cold, private subspace cache
        t0 = time.perf_counter()
        what = "scaling" if args.scaling else ("small" if args.small else "full") + " node path"
        title = (f"## {time.strftime('%Y-%m-%d %H:%M')} — {what}, device {dev} ({device_name(dev)}), "
                 f"torch {torch.__version__}")
        cmd = "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
        parts = [title, "", f"`{cmd}`", ""]
        if args.scaling:
            parts.append(scaling_section(args, dev, tmp))
        else:
            text, ctx = node_section(args, dev, tmp)
            parts.append(text)
            print(text, file=sys.stderr, flush=True)          # as it comes; the report is on stdout
            if not args.no_floors:
                print("floors ...", file=sys.stderr, flush=True)
                ceil = ceilings(dev)
                parts += ["", "Floors:", "", floors_section(args, dev, ctx, ceil)]
                print(parts[-1], file=sys.stderr, flush=True)
            if not args.no_converged and args.method in ("lorein", "pmr", "lrr"):
                parts += ["", converged_section(args, ctx)]
                print(parts[-1], file=sys.stderr, flush=True)
            if args.variants:
                parts += ["", variants_section(args, dev, ctx)]
        parts += ["", f"Benchmark wall time {time.perf_counter() - t0:.0f} s."]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.record:
        if not RESULTS.exists():
            RESULTS.write_text(HEADER)
        with RESULTS.open("a") as f:
            f.write("\n" + text)
        print(f"appended to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
