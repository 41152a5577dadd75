#!/usr/bin/env bash
# The demo on a fresh machine: set up .venv if needed, then `lorein demo` (arguments are passed on,
# e.g. bash scripts/demo.sh --out /tmp/demo --method cg).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec lorein demo "$@"
