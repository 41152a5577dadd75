# Sourced by gpu_session.sh and gpu_accuracy.sh: makes $OUT, installs the wheels the GPU image lacks
# (.whl/*.whl, if any, into /tmp/site) and puts them and the checkout on PYTHONPATH.
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
