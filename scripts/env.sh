# Sourced by scripts/demo.sh and scripts/test.sh: makes sure .venv (in the repo root) exists and has
# gadget_lorein with its test extras installed, then puts .venv/bin first on PATH.
#
#   python3 -m venv .venv                      (when .venv is missing)
#   pip install torch==$TORCH_VERSION          (CPU wheel here; GPU users: install their torch build first,
#                                               any torch >= 2.1 already in .venv is kept)
#   pip install -e ".[test]"                   (when pyproject.toml changed since the last install)
#
# Environment: PYTHON (default python3), TORCH_VERSION (default 2.13.0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "[setup] creating $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi
stamp="$VENV/.gadget_lorein-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import gadget_lorein.cli, torch, ismrmrd, gadgetron, sigpy, pytest" 2>/dev/null; then
  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==${TORCH_VERSION:-2.13.0}" >&2
    "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  fi
  echo "[setup] installing gadget_lorein (editable) with its test extras" >&2
  "$PY" -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
