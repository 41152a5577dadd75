#!/bin/bash
# Fit variants on realistic scans on a lent GPU, one process per case in parallel (the GPU has room),
# each appending JSON lines to $OUT/sweep_<case>.jsonl; then the summary over everything.
#   OUT=/tmp/sweep SWEEP_TIMEOUT=420 bash benchmarks/gpu_sweep.sh
set -u
OUT=${OUT:-/tmp/lorein-sweep}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.txt"
V=(--variant base= --variant it100=iterations:100 --variant it200=iterations:200
   --variant it400=iterations:400 --variant lrrout=output:lrr --variant guard=output:guard
   --variant llrinit=init:llr --variant llrinit_it200=init:llr,iterations:200
   --variant cw1=couple_weight:1.0 --variant nosmooth=init_smooth:0 --variant g16=grid_finest:16
   --variant pmr=method:pmr --variant lrr=method:lrr --variant tv=tv_weight:0.01)
run() { timeout "${SWEEP_TIMEOUT:-420}" python3 benchmarks/fit_sweep.py --device cuda --seeds 0 1 \
          --baselines zerofill cg llr "${V[@]}" --jsonl "$OUT/sweep_$1_$2.jsonl" --cases "$1" --snr "$2" \
          > "$OUT/log_$1_$2.txt" 2>&1; }
run qalas8 15 & run qalas8 30 & run qalas16 30 & run mrf200 30 &
wait
python3 benchmarks/sweep_table.py "$OUT"/sweep_*.jsonl | tee "$OUT/table.md"
