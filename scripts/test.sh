#!/usr/bin/env bash
# The test command: sets up both CPU environments (idempotent), then runs the whole suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k reward -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
# Tests never reach a model hub (set before huggingface_hub is imported anywhere).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
