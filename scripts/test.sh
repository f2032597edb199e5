#!/usr/bin/env bash
# The test command: sets up both CPU environments (idempotent), then runs the whole suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k reward -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
