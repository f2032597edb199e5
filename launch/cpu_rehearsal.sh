#!/usr/bin/env bash
# The whole curriculum on a machine without GPUs: stage 1 -> 2 -> 3 through launch/curriculum.sh with verl's default
# trainer, vLLM rollouts (vLLM's CPU build), the recipe's reward, validation, checkpoints and the stage merges, on
# tiny Qwen-VL models and small Blender renders; then eval.dig (vLLM backend) scores the last merged checkpoint.
#   bash launch/cpu_rehearsal.sh [--out-dir DIR] [--no-eval] [hydra overrides...]
#   STAGES="1 2" bash launch/cpu_rehearsal.sh       INIT_MODEL=HF_DIR: the first stage's weights (default: the tiny model)
# Everything it writes goes under DIR (default runs/cpu_rehearsal): data/<model>, models/<model>, checkpoints/,
# eval/<model>. Reruns resume: the data and the tiny model are kept, finished stages are skipped and an interrupted
# stage resumes from its last checkpoint. Model: base_model=tiny_qwen3_vl_thinking (default) or
# base_model=tiny_qwen2_5_vl. The CPU choices are config/profile/cpu.yaml (profile=cpu); docs/cpu_rehearsal.md
# says what it proves and what only a GPU run proves.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { echo "[dig] cpu_rehearsal: $*"; }
die() { echo "launch/cpu_rehearsal.sh: error: $*" >&2; exit 2; }

out_dir=$REPO/runs/cpu_rehearsal
overrides=()
run_eval=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out-dir) [ $# -ge 2 ] && [ -n "$2" ] || die "--out-dir needs a folder"; out_dir=$2; shift 2 ;;
    --out-dir=*) out_dir=${1#--out-dir=}; shift ;;
    --no-eval) run_eval=0; shift ;;
    -h | --help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option '$1' (options: --out-dir DIR, --no-eval; everything else is a Hydra override such as key=value)" ;;
    *) overrides+=("$1"); shift ;;
  esac
done
out_dir=$(mkdir -p "$out_dir" && cd "$out_dir" && pwd)

model=tiny_qwen3_vl_thinking
rest=()
for o in ${overrides[@]+"${overrides[@]}"}; do
  case "$o" in
    base_model=*) model=${o#base_model=} ;;
    profile=*) [ "$o" = profile=cpu ] || die "$o: the CPU rehearsal runs profile=cpu only; drop the override" ;;
    *) rest+=("$o") ;;
  esac
done
case "$model" in
  tiny_*) ;;
  *) die "base_model=$model: the CPU rehearsal trains the tiny models only (base_model=tiny_qwen3_vl_thinking or tiny_qwen2_5_vl); real models need GPUs (bash launch/curriculum.sh)" ;;
esac
[ -f "$REPO/dig_common/base_model/$model.yaml" ] || die "base_model=$model: no dig_common/base_model/$model.yaml"
init_model=${INIT_MODEL:-}
for name in MODEL DATA_DIR CKPT_DIR RAY_ADDRESS DRY_RUN INIT_MODEL; do
  [ -z "${!name:-}" ] || [ "$name" = INIT_MODEL ] || say "ignoring $name from the environment (the rehearsal sets its own)"
  unset "$name"
done

py=${DIG_PYTHON:-$REPO/.venv/bin/python}
probe='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("vllm", "verl", "recipes.dig.launch")))'
if ! [ -x "$py" ] || ! "$py" -c "$probe" 2>/dev/null; then
  if [ "${SETUP_ENV:-0}" = 1 ] && [ -z "${DIG_PYTHON:-}" ]; then
    bash "$REPO/scripts/setup_env.sh"
  else
    die "$py cannot import vllm/verl/recipes: build the CPU environment first with 'bash scripts/setup_env.sh' (or SETUP_ENV=1 bash launch/cpu_rehearsal.sh)"
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$REPO"

data=$out_dir/data  # pairs/ (shared by both tiny models) and $model/ (its parquets), as data_prep.build writes
weights=$out_dir/models/$model
# small renders: 8 train / 4 val pairs per stage, 1 test pair per K, 96x64 at 4 samples (about a minute on 2 cores)
say "data: $data/$model"
"$py" -m data_prep.build --out-dir "$data" --model "$model" --stage all --num-train 8 \
  --num-val 4 --num-test 1 --width 96 --height 64 --samples 4 --workers 1 --no-progress
if [ ! -f "$weights/config.json" ]; then
  say "tiny model: $weights (built offline, warm-started on stage 1's train split)"
  "$py" -m recipes.dig.rehearsal.tiny_models --model "$model" --out "$weights" --data "$data/$model/stage1/train.parquet"
fi

stages=${STAGES:-1 2 3}
read -r -a stage_list <<<"$stages"
# stage 1 starts from the tiny model; a later first stage from the previous stage's merge, as on GPUs (INIT_MODEL
# given: the first stage of the list starts from it, as in curriculum.sh)
init=()
if [ -n "$init_model" ]; then
  init=("INIT_MODEL=$init_model")
elif [ "${stage_list[0]}" = 1 ]; then
  init=("INIT_MODEL=$weights")
fi
say "curriculum: stages $stages"
env ${init[@]+"${init[@]}"} STAGES="$stages" DIG_PYTHON="$py" bash "$REPO/launch/curriculum.sh" profile=cpu \
  "base_model=$model" "curriculum.data_dir=$data" "curriculum.ckpt_dir=$out_dir/checkpoints" ${rest[@]+"${rest[@]}"}

if [ "$run_eval" = 0 ]; then
  say "done (no eval): $out_dir"
  exit 0
fi
last_stage=${stage_list[${#stage_list[@]}-1]}
last=$(ls -d "$out_dir/checkpoints/dig/${model}_stage$last_stage/hf_merged/global_step_"* 2>/dev/null | sort -V | tail -n 1)
[ -n "$last" ] || die "no merged checkpoint of stage $last_stage under $out_dir/checkpoints (did the curriculum finish?)"
say "eval: $last"
# vLLM's CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB), else from most of the machine's memory:
# 1 GiB, as config/profile/cpu.yaml gives the training rollouts
VLLM_CPU_KVCACHE_SPACE=1 "$py" -m eval.dig --data "$data/$model/test/test.parquet" --model "$model" --model-path "$last" --backend vllm \
  --out "$out_dir/eval/$model/results.json"
say "done: $out_dir"
