#!/usr/bin/env bash
# The tests on a fresh machine: set up .venv if needed, then pytest (arguments are passed on, e.g.
# bash scripts/test.sh -k cli). Tests marked `gadgetron` need a Gadgetron server and client
# (GADGETRON_HOME, gadgetron on PATH, or ../shared/gadgetron; see tests/gadgetron_server.py);
# without one they are skipped, or fail when CI=true.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest -q "$@"
