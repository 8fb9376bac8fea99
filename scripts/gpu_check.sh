#!/usr/bin/env bash
# The GPU check, prepared for a lent H100/H200 (the device has its own torch, transformers and peft,
# nvcc and no network). Runs the named stages in order; the build is incremental, so later calls on
# a still-warm machine can skip straight to the stages they need.
#
#   bash scripts/gpu_check.sh build test bench-attention bench-decode bench-generate
#   bash scripts/gpu_check.sh all                      # the same
#
# Stages and their time limits (seconds): build 300, test 240, racecheck 2 x 240 (compute-sanitizer
# racecheck and memcheck over a few small CUDA tests; not in "all"), bench-attention 200, bench-decode 90,
# bench-generate 200; with the default model carried (scripts/gpu_carry.sh): train 3 x 150 (one GPU
# bf16, FSDP2 through accelerate, FSDP through torchrun --fsdp), extension 600. Each stage's
# output goes to $OUT/gpu_check.log, each bench's JSON to $OUT/<stage>.json; the summary (one line
# per stage, then each bench's table) is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench/out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log  # $OUT gets the log and one JSON per bench (the device returns at most 8 files)
TABLES=$(mktemp -d)
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} SINKLORA_FORCE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)} NVCC_THREADS=${NVCC_THREADS:-2}
SUMMARY=()
TEXT=.gpu_carry/a/text

need_model() {  # the default model travels in two halves, with the gguf wheel and the text (scripts/gpu_carry.sh)
  [[ -n ${MODEL:-} ]] && return 0
  if [[ ! -f .gpu_carry/a/model.part || ! -f .gpu_carry/b/model.part ]]; then
    echo "the default model is not here: carry .gpu_carry/a and .gpu_carry/b (scripts/gpu_carry.sh)" | tee -a "$LOG"
    return 1
  fi
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/a/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
  MODEL=/tmp/smollm2/$(cat .gpu_carry/a/model.name)
  mkdir -p /tmp/smollm2 && cat .gpu_carry/a/model.part .gpu_carry/b/model.part >"$MODEL"
  if [[ $(sha256sum "$MODEL" | cut -d' ' -f1) != $(cat .gpu_carry/a/model.sha256) ]]; then
    echo "model checksum mismatch" | tee -a "$LOG"
    MODEL=
    return 1
  fi
}

run_stage() {  # name limit command...
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  SUMMARY+=("$name: rc=$rc in $(($(date +%s) - start))s")
  echo "=== $name rc=$rc in $(($(date +%s) - start))s" | tee -a "$LOG"
  return $rc
}

bench() {  # stage name, then the bench's arguments; the JSON is the last stdout line
  local name=$1 limit=$2
  shift 2
  run_stage "$name" "$limit" bash -c "$PY -m sinklora_ext.cli bench $* --json | tee $TABLES/$name.txt"
  tail -n 1 "$TABLES/$name.txt" >"$OUT/$name.json" 2>/dev/null
  sed -i '$d' "$TABLES/$name.txt" 2>/dev/null
}

stages=("$@")
[[ ${#stages[@]} -eq 0 || ${stages[0]} == all ]] && stages=(build test bench-attention bench-decode bench-generate)
{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)"
  nvcc --version | tail -n 1
} 2>&1 | tee -a "$LOG"

for stage in "${stages[@]}"; do
  case $stage in
    build) run_stage build 300 $PY setup.py build_ext --inplace || break ;;
    test)
      run_stage test 240 $PY -m pytest -q --maxfail=25 -p no:cacheprovider \
        python_tests/test_sf_attention.py python_tests/test_paged_ops.py python_tests/test_kv_cache.py \
        python_tests/test_engine_cuda.py -k "cuda or device_mismatch"
      tail -n 5 "$LOG" ;;
    racecheck)  # shared-memory races and out-of-bounds accesses in a few small kernel runs
      for tool in racecheck memcheck; do
        run_stage "$tool" 240 compute-sanitizer --tool "$tool" --error-exitcode 3 $PY -m pytest -q -x -p no:cacheprovider \
          python_tests/test_sf_attention.py python_tests/test_paged_ops.py -k "cuda and (edge or long_split or few_long or evictions_matches or paged_write_exact or column_scores_varlen)"
      done ;;
    bench-attention) bench bench-attention 200 attention ;;
    bench-decode) bench bench-decode 90 decode ;;
    bench-generate) bench bench-generate 200 generate ;;
    train)  # one-GPU bf16 LoRA+ with SF-Attn, then the same under FSDP (accelerate, one process)
      need_model || continue
      run_stage train 150 $PY -m sinklora_ext.cli train --model "$MODEL" --data "$TEXT/debian-reference.txt" \
        --context 8192 --attn sf --steps 10 --output /tmp/run-sf --json
      run_stage train-fsdp 150 accelerate launch --num_processes 1 --mixed_precision bf16 --use_fsdp --fsdp_version 2 \
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer \
        --fsdp_state_dict_type FULL_STATE_DICT -m sinklora_ext.cli train --model "$MODEL" --data "$TEXT/debian-reference.txt" \
        --context 8192 --attn sf --steps 5 --output /tmp/run-fsdp --json
      run_stage train-torchrun-fsdp 150 torchrun --nproc_per_node 1 -m sinklora_ext.cli train --model "$MODEL" \
        --data "$TEXT/debian-reference.txt" --context 8192 --attn sf --steps 5 --fsdp "full_shard auto_wrap" \
        --output /tmp/run-fsdp1 --json ;;
    extension)
      need_model || continue
      bench extension 600 extension --model "$MODEL" --steps "${EXTENSION_STEPS:-50}" \
        --train-text $TEXT/debian-reference.txt $TEXT/bash-reference.txt --eval-text $TEXT/gnu-standards.txt ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done

echo
printf '%s\n' "${SUMMARY[@]}"
for stage in "${stages[@]}"; do
  [[ -s $TABLES/$stage.txt ]] && { echo "--- $stage"; grep -v '%|' "$TABLES/$stage.txt" | tail -n 12; }
done
exit 0
