#!/usr/bin/env bash
# GRPO curriculum stage 1. Starts from the base model (base_model=NAME, default qwen3_vl_8b_thinking).
#   bash launch/grpo_stage1.sh [hydra overrides...]      DRY_RUN=1 bash launch/grpo_stage1.sh  (CPU check)
# Knobs: see launch/common.sh and docs/launch.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_stage 1 "$@"
