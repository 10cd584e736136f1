#!/usr/bin/env bash
# Issue 13's "single mode >= 10x more samples/s on a GPU with the 7B-shaped model": the issue's own
# setting (FT-M, QAEdit 0-19, WILD, seed stop rule, chat_temp) through `launch.py` at the commit the
# issue was filed against and at this checkout, on one random-weight Llama-2-7B-shaped bfloat16
# checkpoint written on the device first (the configs' llama-2-7b hyper-parameters). Prints each
# run's wall time, samples/s and the pre-edit / single-edit phases.
#
# The device machine has no git history and no default model: carry the old tree and a tokenizer,
# written here first (about 7 MB together):
#   rm -rf out/before && mkdir -p out/before && git archive 263b1b8 | tar -x -C out/before
#   python -c "from mirage_jax.model import load_model; load_model('default').tokenizer.save_pretrained('out/tokenizer')"
# then, on the device (carry: ["out/tokenizer", "out/before"]), from the repository root:
#   PYTHONPATH=. TOKENIZER=out/tokenizer timeout 590 bash benchmarks/gpu_single_before_after.sh
# WHICH (default "before after after": the second "after" reuses the first's persistent compilation
# cache, as a user's next run does), N (records, 20), SECS (each run's limit, 250).
set -uo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false
here=$(pwd)
out=${OUT:-/tmp}
ckpt=${CKPT:-/tmp/random_llama7b}
before=$(cd "${BEFORE:-out/before}" && pwd)
args=(--method=FT-M --dataset=qaedit --ds_size="${N:-20}" --evaluation=wild --stop_rule=seed --context_type=chat_temp
      --model="$ckpt" --dtype=bfloat16 --hparams_for=llama-2-7b)
if [[ ! -f $ckpt/config.json ]]; then
  echo "=== writing the random 7B-shaped checkpoint to $ckpt ($(date +%T))"
  PYTHONPATH=$here python - "$ckpt" "${TOKENIZER:-}" <<'PY' || exit 1
import sys
sys.path.insert(0, "benchmarks")
from common import random_llama7b_model
random_llama7b_model(sys.argv[2] or None).save(sys.argv[1])
PY
fi
i=0
for which in ${WHICH:-before after after}; do
  i=$((i + 1))
  dir=$here; [[ $which == before ]] && dir=$before
  echo "=== $which ($(date +%T), at most ${SECS:-250} s)"
  t0=$(date +%s.%N)
  (cd "$dir" && PYTHONPATH="$dir" timeout "${SECS:-250}" python launch.py "${args[@]}" \
     --output_dir="/tmp/single_${i}_$which") > "$out/single_${i}_$which.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  python - "$which" "$out/single_${i}_$which.log" "$t0" "$t1" "$rc" "${N:-20}" <<'PY'
import re, sys
which, log, t0, t1, rc, n = sys.argv[1], open(sys.argv[2], errors="ignore").read().replace("\r", "\n"), *map(float, sys.argv[3:])
phases = {m.group(1): m.group(2) for m in re.finditer(r"^(pre-edit eval|\S+ single): 100%.*?\[(\d+:\d+)<", log, re.M)}
wall = t1 - t0
print(f"{which:7s} rc {int(rc)}  wall {wall:6.1f} s  {int(n) / wall:.3f} samples/s  phases {phases}")
if rc:
    print("\n".join(log.splitlines()[-15:]))
PY
done
