#!/usr/bin/env bash
# The GPU node's environment in one command: a venv (never the system Python) with the pinned stack from
# requirements.txt, then flash-attn built against the torch it just installed (or a prebuilt wheel you point
# to, or, when neither works, no flash-attn: training then runs on sdpa and the launcher says so), an import
# check of what training needs, and a stamp so a rerun with unchanged inputs takes a second.
# Its own venv, not the tests' .venv: vLLM 0.24 pins torch 2.11.0, the CPU test stack (scripts/setup_env.sh)
# torch 2.14.1, and each setup would reinstall the other's torch.
#
# Usage: bash scripts/setup_gpu.sh [options]
#   --venv DIR            venv to build or update (default .venv-gpu: the one the launcher uses with SETUP_ENV=1)
#   --into PY             install into this existing venv's interpreter instead (refused unless it is a venv's)
#   --base-python PY      interpreter that creates the venv (default: first of python3.11 python3.12 python3.10
#                         python3 that is 3.10+)
#   --flash-attn MODE     auto (default): the wheel if given, else `pip install flash-attn --no-build-isolation`
#                         (flash-attn's own setup fetches a matching prebuilt wheel when one exists, else
#                         compiles with nvcc); on failure go on without it. require: fail instead. skip: never.
#   --flash-attn-wheel W  a prebuilt flash-attn wheel, path or URL (env FLASH_ATTN_WHEEL); it must match this
#                         Python, torch 2.11 and its CUDA
#   --render              also build the Blender render venv (bash scripts/setup_env.sh render)
#   --requirements FILE   the pinned stack (default requirements.txt)
#   --cpu-rehearsal       for tests on machines without a GPU: installs FILE (a small stand-in), skips the
#                         GPU-stack imports (torch, vllm, verl) and, unless --flash-attn is given, flash-attn;
#                         everything else runs as usual
#   --force               redo every step even if the stamp says the venv is up to date
#   --dry-run             print the steps and their commands, change nothing
# Environment: MAX_JOBS (flash-attn compile jobs; default: the core count, capped at one job per 6 GB of RAM),
#              FLASH_ATTN_VERSION (default 2.8.3.post2), FLASH_ATTN_WHEEL (as --flash-attn-wheel).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '/^# Usage:/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
say() { echo "setup_gpu: $*"; }
# fail STEP WHAT FIX: every failure names its step and the way out
fail() { echo "setup_gpu: FAILED at step '$1': $2" >&2; echo "setup_gpu: fix: $3" >&2; exit 1; }
usage_error() { echo "setup_gpu: $*" >&2; echo "run 'bash scripts/setup_gpu.sh --help' for the options" >&2; exit 2; }

venv=$REPO/.venv-gpu into="" base_python="" flash_mode="" wheel=${FLASH_ATTN_WHEEL:-} render=0
requirements=$REPO/requirements.txt rehearsal=0 force=0 dry=0
flash_version=${FLASH_ATTN_VERSION:-2.8.3.post2}
while [ $# -gt 0 ]; do
  case "$1" in
    --venv | --into | --base-python | --flash-attn | --flash-attn-wheel | --requirements)
      [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || usage_error "$1 needs a value"
      case "$1" in
        --venv) venv=$2 ;; --into) into=$2 ;; --base-python) base_python=$2 ;; --flash-attn) flash_mode=$2 ;;
        --flash-attn-wheel) wheel=$2 ;; --requirements) requirements=$2 ;;
      esac
      shift 2 ;;
    --render) render=1; shift ;;
    --cpu-rehearsal) rehearsal=1; shift ;;
    --force) force=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
# a CPU rehearsal has no CUDA to build against: no flash-attn unless asked for (tests ask, to rehearse the fallback)
[ -n "$flash_mode" ] || { [ "$rehearsal" = 1 ] && flash_mode=skip || flash_mode=auto; }
case "$flash_mode" in auto | require | skip) ;; *) usage_error "--flash-attn must be auto, require or skip, got '$flash_mode'" ;; esac
[ "$flash_mode" != skip ] || [ -z "$wheel" ] || usage_error "--flash-attn skip and a flash-attn wheel contradict each other"
[ -f "$requirements" ] || usage_error "requirements file not found: $requirements"
requirements=$(cd "$(dirname "$requirements")" && pwd)/$(basename "$requirements")

# run CMD...: print it; execute it unless --dry-run
run() { echo "+ $*"; [ "$dry" = 1 ] || "$@"; }
is_venv_python() { "$1" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; }

# -- step 1: the interpreter (a venv's, never a system one) --------------------------------------------------
if [ -n "$into" ]; then
  command -v "$into" >/dev/null || fail interpreter "--into $into: no such interpreter" \
    "give the python of an existing venv, or drop --into to build .venv-gpu"
  if ! is_venv_python "$into"; then
    echo "setup_gpu: refusing to install into $into: it is not a virtual environment's Python" \
         "(sys.prefix == sys.base_prefix), and this script never installs into a system or base interpreter." >&2
    echo "setup_gpu: fix: run 'bash scripts/setup_gpu.sh' (builds $REPO/.venv-gpu, which SETUP_ENV=1 uses)," \
         "or, for an environment you manage yourself (a container image, conda), install requirements.txt there" \
         "and point DIG_PYTHON at its python" >&2
    exit 2
  fi
  py=$(realpath -s "$(command -v "$into")")   # absolute: the import check runs from another directory
  venv=$("$py" -c 'import sys; print(sys.prefix)')
else
  if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then
    echo "setup_gpu: refusing to use $venv: it exists but is not a venv (no pyvenv.cfg)" >&2
    echo "setup_gpu: fix: remove it, or pass --venv with another directory" >&2
    exit 2
  fi
  venv=$(realpath -m "$venv")
  py=$venv/bin/python
fi
stamp_file=$venv/.dig-gpu-stamp
flash_note=$venv/.dig-flash-attn   # what happened to flash-attn last time (the launcher probes it anyway)
# the step a setup is in, removed when the stamp is written at its end: a setup that stopped (killed, a failed
# step) leaves it, and launch/common.sh's dig_check_env refuses that venv naming the step (SETUP_ENV=1 finishes it)
progress_file=$venv/.dig-gpu-setup-unfinished
# enter_step NAME: record it. DIG_SETUP_STOP_AT=NAME kills the setup there (tests: a crash at a chosen point)
enter_step() {
  [ "$dry" = 0 ] || return 0
  echo "$1" >"$progress_file"
  if [ "${DIG_SETUP_STOP_AT:-}" = "$1" ]; then echo "setup_gpu: killed at step '$1' (DIG_SETUP_STOP_AT)" >&2; kill -9 $$; fi
}
want=$({
  cat "${BASH_SOURCE[0]}" "$REPO/pyproject.toml" "$requirements"
  echo "$flash_mode $wheel $flash_version $rehearsal"
} | sha256sum | cut -c1-16)
if [ "$force" = 0 ] && [ -x "$py" ] && [ ! -e "$progress_file" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$want" ]; then
  say "$venv is up to date (stamp $want; --force redoes it). flash-attn: $(cat "$flash_note" 2>/dev/null || echo unknown)"
  if [ "$render" = 1 ]; then run bash "$REPO/scripts/setup_env.sh" render; fi
  exit 0
fi

if [ ! -x "$py" ]; then
  if [ -z "$base_python" ]; then
    for cand in python3.11 python3.12 python3.10 python3; do
      if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        base_python=$cand; break
      fi
    done
    [ -n "$base_python" ] || fail venv "no Python 3.10+ found to create the venv" \
      "install Python 3.11 (e.g. 'uv python install 3.11' or your cluster's module) or pass --base-python"
  fi
  command -v "$base_python" >/dev/null || fail venv "--base-python $base_python: no such interpreter" \
    "pass the path of a Python 3.10+"
  say "step 1/5 venv: creating $venv with $base_python"
  run "$base_python" -m venv "$venv" || fail venv "'$base_python -m venv $venv' failed" \
    "on Debian/Ubuntu install python3-venv (apt-get install python3.11-venv), or pass another --base-python"
  # the pip a venv starts with can be years old: pip 23.2 took over 12 min to resolve this stack, pip 26 ~80 s
  run "$py" -m pip install -q --upgrade pip || fail venv "could not upgrade pip in $venv" \
    "rerun (network); pip needs to reach the package index"
else
  say "step 1/5 venv: using $py"
fi
[ "$dry" = 1 ] || rm -f "$stamp_file"   # not up to date until this run finishes
enter_step venv

# -- step 2: the pinned stack ---------------------------------------------------------------------------------
enter_step stack
say "step 2/5 stack: $requirements (first time: several minutes, several GB of wheels: torch, vllm, CUDA libraries)"
run "$py" -m pip install -r "$requirements" || fail stack "pip could not install $requirements" \
  "read pip's message above: a network error -> rerun (pip resumes from its cache); a resolver conflict -> a package you added to requirements.txt clashes with the pins"

# -- step 3: this recipe (editable, so the checkout is what runs) ---------------------------------------------
enter_step recipe
say "step 3/5 recipe: editable install of $REPO"
run "$py" -m pip install -e "$REPO" --no-deps || fail recipe "pip install -e $REPO --no-deps failed" \
  "pip's message above names it; the build needs setuptools>=77 from the package index"

# -- step 4: flash-attn, against the torch installed in step 2 ------------------------------------------------
enter_step flash-attn
flash_result="not installed (--flash-attn skip): training uses sdpa"
if [ "$flash_mode" != skip ]; then
  log=$venv/flash-attn-install.log
  if [ -n "$wheel" ]; then
    say "step 4/5 flash-attn: prebuilt wheel $wheel"
    flash_cmd=("$py" -m pip install --no-deps "$wheel")
  else
    cores=$(nproc 2>/dev/null || echo 4)
    mem_gb=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo 2>/dev/null || echo 0)
    cap=$((mem_gb / 6))   # flash-attn's README: many parallel jobs exhaust RAM below ~96 GB
    [ "$cap" -ge 1 ] || cap=1
    jobs=${MAX_JOBS:-$((cores < cap ? cores : cap))}
    say "step 4/5 flash-attn $flash_version: MAX_JOBS=$jobs ($cores cores, ${mem_gb} GB free); a prebuilt wheel" \
        "from flash-attn's releases when one matches, else a CUDA compile (published: 3-5 min on 64 cores with" \
        "ninja, up to 2 h without); log: $log"
    run "$py" -m pip install -q ninja packaging psutil wheel setuptools || fail flash-attn "could not install flash-attn's build tools" \
      "rerun (network), or skip flash-attn with --flash-attn skip"
    flash_cmd=(env "MAX_JOBS=$jobs" "$py" -m pip install --no-build-isolation "flash-attn==$flash_version")
  fi
  if [ "$dry" = 1 ]; then
    echo "+ ${flash_cmd[*]}"
    flash_result="(dry run)"
  elif "${flash_cmd[@]}" >"$log" 2>&1 && "$py" -c "import flash_attn" >>"$log" 2>&1; then
    flash_result="installed ($("$py" -c 'import flash_attn; print(flash_attn.__version__)'))"
  else
    # a flash_attn that is installed but does not import (ABI mismatch) is worse than none: transformers sees
    # the package and verl's Qwen2-VL patch imports it at load time
    "$py" -m pip uninstall -y -q flash-attn >>"$log" 2>&1 || true
    why=$(grep -m1 -iE "error|not found|undefined symbol" "$log" || tail -n1 "$log")
    if [ "$flash_mode" = require ]; then
      fail flash-attn "flash-attn did not install or import (log: $log): $why" \
        "point --flash-attn-wheel (FLASH_ATTN_WHEEL) at a wheel matching this Python / torch 2.11 / CUDA, or install a CUDA toolkit (nvcc) and rerun, or drop --flash-attn require to train on sdpa"
    fi
    flash_result="not installed ($why; log: $log): training uses sdpa, Qwen2.5-VL without remove-padding"
    say "step 4/5 flash-attn: going on WITHOUT it: $flash_result"
    say "  to get it later: FLASH_ATTN_WHEEL=/path/or/url.whl bash scripts/setup_gpu.sh, or a CUDA toolkit + rerun"
  fi
else
  say "step 4/5 flash-attn: skipped"
fi

# -- step 5: the imports training needs -----------------------------------------------------------------------
enter_step imports
required="hydra recipes.dig.launch reward_fns data_prep"
[ "$rehearsal" = 1 ] && required="dig_common.models recipes.dig.attention reward_fns data_prep"
[ "$rehearsal" = 1 ] || required="torch vllm verl $required"
say "step 5/5 imports: $required"
if [ "$dry" = 0 ]; then
  missing=$(cd /tmp && "$py" -c '
import importlib, sys
bad = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as error:  # any failure to import is what we report
        bad.append(f"{name} ({type(error).__name__}: {error})")
print("; ".join(bad))' $required 2>/dev/null) || missing="the import check itself failed"
  [ -z "$missing" ] || fail imports "$py cannot import: $missing" \
    "rerun with --force; if it persists, 'pip check' in $venv names the broken package"
  if [ "$rehearsal" = 0 ]; then
    "$py" -c '
import torch
n = torch.cuda.device_count()
print("setup_gpu: torch", torch.__version__, "built for CUDA", torch.version.cuda, "| GPUs visible:", n)
if n == 0:
    print("setup_gpu: WARNING: torch sees no GPU. Fine on a login node; on a GPU node check nvidia-smi: the"
          " driver must support CUDA", torch.version.cuda)' || true
  fi
  # what exactly got installed, to keep next to checkpoints (the stack floats below the four exact pins)
  "$py" -m pip freeze --exclude-editable >"$venv/requirements-frozen.txt" 2>/dev/null || true
  echo "$flash_result" >"$flash_note"
  echo "$want" >"$stamp_file"
  rm -f "$progress_file"
fi
if [ "$render" = 1 ]; then run bash "$REPO/scripts/setup_env.sh" render; fi
say "ready: $py (flash-attn: $flash_result; installed versions: $venv/requirements-frozen.txt)"
[ -n "$into" ] || [ "$venv" = "$REPO/.venv-gpu" ] || say "point the launcher at it: DIG_PYTHON=$py"
