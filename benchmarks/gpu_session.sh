#!/bin/bash
# The runs of one lent-GPU session, in one call (the device time is short): a small CUDA smoke run
# of the node path (stops here if CUDA fails), then the full speed benchmark (160x160x128, 16 coils,
# R=16) with its floors, the speed switches and the converged run, recorded into RESULTS.md.
# Logs and the updated RESULTS.md go to $OUT. Dependencies the GPU image lacks come as wheels in
# .whl/ (on 2026-11-26, for its Python 3.12: ismrmrd 1.15.0, xsdata 26.10, sigpy 0.1.27 and
# PyWavelets 1.9.0 cp312, fetched with `pip download --no-deps --only-binary=:all: --python-version
# 3.12 ...`); the package itself runs from the checkout, on the image's torch and numpy.
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh
# Knobs (environment): SMALL_TIMEOUT, FULL_TIMEOUT (s), FULL_ARGS (extra speed.py options, e.g.
# --no-converged), VARIANTS (the --variants list).
set -u
OUT=${OUT:-/tmp/lorein-gpu}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
{ date -u; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, numpy, ismrmrd; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
timeout "${SMALL_TIMEOUT:-120}" python3 benchmarks/speed.py --small --device cuda --record 2>&1 | tee "$OUT/small.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "small CUDA run failed"; cp benchmarks/RESULTS.md "$OUT/"; exit 1; }
timeout "${FULL_TIMEOUT:-440}" python3 benchmarks/speed.py --device cuda --record ${FULL_ARGS:-} \
    --variants ${VARIANTS:-coil_subset=8 virtual_coils=8 amp=1} 2>&1 | tee "$OUT/full.log"
echo "full run exit ${PIPESTATUS[0]}"
cp benchmarks/RESULTS.md "$OUT/"
