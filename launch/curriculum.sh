#!/usr/bin/env bash
# The DiG curriculum: stage 1 -> 2 -> 3, each from the previous stage's merged checkpoint. Finished stages
# (those with a dig_stage_done.json) are skipped and an interrupted stage resumes (trainer.resume_mode=auto),
# so rerunning this script, or a requeued SLURM job, continues where it stopped.
#   bash launch/curriculum.sh [hydra overrides...]        STAGES="2 3" bash launch/curriculum.sh
# With DRY_RUN=1 every stage is checked; stages k > 1 are planned on the checkpoint stage k-1 will produce.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck disable=SC2086  # STAGES is a list
run_launcher --curriculum ${STAGES:-1 2 3} -- "$@"
