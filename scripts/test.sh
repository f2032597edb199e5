#!/usr/bin/env bash
# The test command: sets up both CPU environments (idempotent), then runs the whole suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k reward -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
# The SLURM launch test submits the sbatch script to a real single-node SLURM on localhost; installing it
# (Debian's slurm-wlm + munge) needs root. Elsewhere that one test is skipped, and says why.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  bash scripts/setup_slurm.sh
else
  echo "test.sh: not root: tests/test_launch_slurm.py will be skipped (needs: sudo bash scripts/setup_slurm.sh)"
fi
# Tests never reach a model hub (set before huggingface_hub is imported anywhere).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
