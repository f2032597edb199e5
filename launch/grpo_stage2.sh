#!/usr/bin/env bash
# GRPO curriculum stage 2. Starts from the merged HF checkpoint of stage 1's last step (merged here if needed).
#   bash launch/grpo_stage2.sh [hydra overrides...]      DRY_RUN=1 bash launch/grpo_stage2.sh  (CPU check)
# Knobs: see launch/common.sh and docs/launch.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_stage 2 "$@"
