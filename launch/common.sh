#!/usr/bin/env bash
# Shared by launch/grpo_stage{1,2,3}.sh, launch/curriculum.sh and launch/slurm/*.sbatch (source it).
# Picks the Python, checks that it can run the recipe (or installs the GPU stack with SETUP_ENV=1), and hands
# over to the one implementation: python -m recipes.dig.launch (config, checks, data, handoff, training).
#
# Settings are Hydra overrides (the extra arguments, e.g. base_model=qwen2_5_vl_7b); environment variables are
# launcher behaviour only: the tables in docs/launch.md (recipes/dig/settings.py parses the launcher's; booleans
# here use dig_bool, the same truth table).

DIG_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DIG_REPO
# recipes/ and reward_fns/ importable even without `pip install -e .` (Ray workers inherit this)
export PYTHONPATH="$DIG_REPO${PYTHONPATH:+:$PYTHONPATH}"

# dig_bool NAME [DEFAULT]: prints 1 or 0 for the boolean knob NAME with recipes/dig/settings.py's truth table
# (1/true/yes, 0/false/no, any case; unset or empty: DEFAULT, else 0); anything else: an error naming NAME.
dig_bool() {
  local name=$1 raw value
  raw=${!name:-}
  value=$(printf '%s' "$raw" | tr -d '[:space:]' | tr '[:upper:]' '[:lower:]')
  case "$value" in
    "") echo "${2:-0}" ;;
    1 | true | yes) echo 1 ;;
    0 | false | no) echo 0 ;;
    *) echo "[dig] ERROR: $name='$raw': expected one of 1/true/yes/0/false/no" >&2; return 1 ;;
  esac
}

# dig_ray_gpus GPUS: GPUs each node's Ray declares: GPUS (the node's count), 0 for a dry run SLURM gave no GPUs.
dig_ray_gpus() {
  local dry_run slurm_gpus=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  dry_run=$(dig_bool DRY_RUN) || return 1
  if [ "$dry_run" = 1 ] && [ -z "${slurm_gpus##*:}" ]; then echo 0; else echo "${1:-0}"; fi
}

# dig_python: DIG_PYTHON, else the GPU venv (present, or about to be built by SETUP_ENV=1), else the CPU .venv.
dig_python() {
  local setup_env
  setup_env=$(dig_bool SETUP_ENV) || return 1
  if [ -n "${DIG_PYTHON:-}" ]; then
    echo "$DIG_PYTHON"
  elif [ -x "$DIG_REPO/.venv-gpu/bin/python" ] || [ "$setup_env" = 1 ]; then
    echo "$DIG_REPO/.venv-gpu/bin/python"
  elif [ -x "$DIG_REPO/.venv/bin/python" ]; then
    echo "$DIG_REPO/.venv/bin/python"
  else
    command -v python3 || command -v python
  fi
}

# dig_setup_gpu PY: scripts/setup_gpu.sh for PY. It installs only into a venv: it builds the repo's .venv-gpu,
# or updates another venv's python, and refuses a system interpreter (naming the fix): SETUP_ENV never installs
# into it.
dig_setup_gpu() {
  local py=$1
  echo "[dig] setting up the training environment for $py (bash scripts/setup_gpu.sh)" >&2
  if [ "$py" = "$DIG_REPO/.venv-gpu/bin/python" ]; then
    bash "$DIG_REPO/scripts/setup_gpu.sh" >&2
  else
    bash "$DIG_REPO/scripts/setup_gpu.sh" --into "$py" >&2
  fi
}

# Verify the environment (imports the launcher needs); SETUP_ENV=1 installs the pinned GPU stack instead of failing.
dig_check_env() {
  local py=$1
  # find_spec: locate without importing (importing verl costs seconds; the launcher imports it anyway)
  local probe='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("verl", "hydra", "recipes.dig.launch", "reward_fns")))'
  # Blender renders the data in its own venv (bpy pins numpy<2): build it on request when it is missing
  local setup_env
  setup_env=$(dig_bool SETUP_ENV) || return 1
  if [ "$setup_env" = 1 ] && [ -z "${DIG_RENDER_PYTHON:-}" ] && [ ! -x "$DIG_REPO/.venv-render/bin/python" ]; then
    bash "$DIG_REPO/scripts/setup_env.sh" render || return 1
  fi
  # a GPU setup that stopped half way (scripts/setup_gpu.sh's marker, removed when it finishes) imports verl and
  # hydra but may lack flash-attn, the import checks and the frozen requirements: finish it, or name the step
  local venv_dir unfinished
  venv_dir=$(cd "$(dirname "$py")/.." 2>/dev/null && pwd) || venv_dir=""
  unfinished=$venv_dir/.dig-gpu-setup-unfinished
  if [ -n "$venv_dir" ] && [ -f "$unfinished" ]; then
    if [ "$setup_env" = 1 ]; then
      echo "[dig] the GPU setup of $venv_dir stopped at step '$(cat "$unfinished")': finishing it" >&2
      dig_setup_gpu "$py" || return 1
    else
      echo "[dig] ERROR: the GPU setup of $venv_dir stopped at step '$(cat "$unfinished")' and never finished" \
           "($unfinished): finish it with SETUP_ENV=1 or 'bash scripts/setup_gpu.sh'" \
           "(--into $py for a venv of your own), or point DIG_PYTHON at another interpreter" >&2
      return 1
    fi
  fi
  if "$py" -c "$probe" 2>/dev/null; then
    return 0
  fi
  if [ "$setup_env" = 1 ]; then
    dig_setup_gpu "$py" || return 1
    "$py" -c "$probe" && return 0
  fi
  echo "[dig] ERROR: $py cannot import verl/hydra/recipes: install the training stack" \
       "(GPU node: SETUP_ENV=1 or 'bash scripts/setup_gpu.sh';" \
       "CPU/dry runs: 'bash scripts/setup_env.sh'), or point DIG_PYTHON at an interpreter that has it" >&2
  return 1
}

# dig_require_gpu ARGS...: a real run on this machine needs a GPU; checked before any setup or download.
# Passes for DRY_RUN, a Ray cluster (RAY_ADDRESS: the GPUs are there), the CPU rehearsal (profile=cpu) and
# DIG_SKIP_GPU_CHECK=1.
dig_require_gpu() {
  local dry_run skip arg
  dry_run=$(dig_bool DRY_RUN) || return 1
  skip=$(dig_bool DIG_SKIP_GPU_CHECK) || return 1
  [ "$dry_run" = 0 ] && [ "$skip" = 0 ] && [ -z "${RAY_ADDRESS:-}" ] || return 0
  for arg in "$@"; do [ "$arg" != profile=cpu ] || return 0; done
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    return 0
  fi
  echo "[dig] ERROR: no GPU on this machine (nvidia-smi lists none), so nothing was installed or started:" \
       "'bash launch/cpu_rehearsal.sh' runs the whole curriculum here on CPU with tiny models, 'DRY_RUN=1'" \
       "checks a stage's config; on a GPU cluster set RAY_ADDRESS or submit launch/slurm/dig_grpo.sbatch" >&2
  return 2
}

# run_launcher ARGS...: exec python -m recipes.dig.launch (the trainer inherits this process and its signals).
run_launcher() {
  local py
  dig_require_gpu "$@" || return $?
  py=$(dig_python) || { echo "[dig] ERROR: no python found (set DIG_PYTHON)" >&2; return 1; }
  dig_check_env "$py" || return 1
  cd "$DIG_REPO" || return 1
  exec "$py" -m recipes.dig.launch "$@"
}

# run_stage K [overrides...]: one curriculum stage.
run_stage() {
  local stage=$1
  shift
  run_launcher --stage "$stage" -- "$@"
}
