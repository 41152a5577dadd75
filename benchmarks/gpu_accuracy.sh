#!/bin/bash
# An accuracy table (benchmarks/accuracy.py, one process per case, qalas R = 4, 8, 16, 48 and mrf
# R = 200, 400 by default; accuracy.py's own defaults otherwise: the realistic simulation at
# 40x32x24; ARGS="--confirm" for 64x64x48, or ARGS="--ideal --matrix 64 64 48 --coils 8 --seeds 1"
# for the earlier idealised table) in one call of a lent GPU, whose device time is short:
# every case is its own accuracy.py process, all at once on the one GPU (a 64x64x48 fit leaves most
# of an H200 idle), each under a timeout, so that a slow case costs only its own rows. Each case's
# rows go to $OUT/<case>.out as they finish (stderr, with the per-seed lines, to <case>.err); at the
# end $OUT/table.md has them in the table's order, with the environment in $OUT/env.txt.
#   OUT=/tmp/acc bash benchmarks/gpu_accuracy.sh
# Dependencies the GPU image lacks go in .whl/ as wheels for its Python (see gpu_session.sh), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       ismrmrd==1.15.0 xsdata sigpy==0.1.27 PyWavelets
# and travel with the run's `carry: [".whl"]`; the package runs from the checkout on the image's
# torch and numpy.
# Knobs (environment): DEVICE (default cuda), CASE_TIMEOUT (s, default 480), ARGS (extra
# accuracy.py options for every case, e.g. "--seeds 2" or "--matrix 16 16 12 --iterations 20" for a
# CPU smoke run), CASES (default "qalas:4 qalas:8 qalas:16 qalas:48 mrf:200 mrf:400").
set -u
OUT=${OUT:-/tmp/lorein-accuracy}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
PY=${PYTHON:-python3}
{ date -u; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$PY" -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
CASES=${CASES:-qalas:4 qalas:8 qalas:16 qalas:48 mrf:200 mrf:400}
threads=$(( $(nproc) / $(echo $CASES | wc -w) ))
pids=()
for case in $CASES; do
    seq=${case%%:*} R=${case#*:}
    sel="--cases $seq$R"
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 )) timeout "${CASE_TIMEOUT:-480}" \
        "$PY" benchmarks/accuracy.py --device "${DEVICE:-cuda}" $sel ${ARGS:-} \
        > "$OUT/$seq$R.out" 2> "$OUT/$seq$R.err" &
    pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; rc=$?
    [ $rc = 0 ] || { status=1; echo "case $(echo $CASES | cut -d' ' -f$((i + 1))): exit $rc" | tee -a "$OUT/env.txt"; }
done
# one table: the header of the first case that printed one, then every case's rows in order
files=()
for case in $CASES; do files+=("$OUT/${case%%:*}${case#*:}.out"); done
{ for f in "${files[@]}"; do grep -q '^# accuracy' "$f" && { head -3 "$f"; break; }; done
  for f in "${files[@]}"; do grep -E '^\| [a-z]+[0-9.]+ \| ' "$f"; done
} > "$OUT/table.md"
cat "$OUT/table.md"
exit $status
