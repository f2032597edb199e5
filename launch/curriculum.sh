#!/usr/bin/env bash
# The DiG curriculum: stage 1 -> 2 -> 3, each from the previous stage's merged checkpoint. Finished stages
# (those with a dig_stage_done.json) are skipped and an interrupted stage resumes (trainer.resume_mode=auto),
# so rerunning this script, or a requeued SLURM job, continues where it stopped.
#   bash launch/curriculum.sh [hydra overrides...]        STAGES="2 3" bash launch/curriculum.sh
# With DRY_RUN=1 every stage is checked; stages k > 1 are planned on the checkpoint stage k-1 will produce.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
py=$(dig_python)
dig_check_env "$py"
cd "$DIG_REPO"

for stage in ${STAGES:-1 2 3}; do
  if "$py" -m recipes.dig.launch --stage "$stage" --status "$@"; then
    echo "[dig] curriculum: stage $stage already finished, skipping"
    continue
  fi
  echo "[dig] curriculum: stage $stage"
  # DIG_ASSUME_PREVIOUS: in a dry run stage k-1 has not trained, but it will have by the time stage k starts
  DIG_ASSUME_PREVIOUS=${DRY_RUN:-0} "$py" -m recipes.dig.launch --stage "$stage" "$@" || {
    rc=$?
    echo "[dig] curriculum: stage $stage failed (rc=$rc); rerun this script to resume it" >&2
    exit "$rc"
  }
done
echo "[dig] curriculum: done"
