#!/usr/bin/env bash
# The main job as a user runs it, at an older commit and at this checkout, back to back on the same
# machine: wall time, CPU time, XLA compilations (count and seconds) and the pre-edit / per-sample
# phases, plus whether the two runs wrote the same results. Issue 13's "samples per second in single
# mode, before and after" is this, for the commit the issue was filed against (263b1b8).
#
#   bash benchmarks/launch_before_after.sh [BEFORE_COMMIT] [ROUNDS]    # from the repository root
#
# Each round runs: before, after with a cold --compile_cache, after again with it warm. Extra launch
# flags: LAUNCH_ARGS (default: FT-M, QAEdit 0-19, single, both evaluations, chat_temp).
set -euo pipefail
before=${1:-263b1b8}
rounds=${2:-1}
args=${LAUNCH_ARGS:---method=FT-M --dataset=qaedit --ds_size=20 --evaluation=both --context_type=chat_temp}
here=$(pwd)
work=$(mktemp -d)
git worktree add -q --detach "$work/before" "$before"
trap 'git worktree remove --force "$work/before"; rm -rf "$work"' EXIT

run() {  # tag, checkout, extra flags
  local tag=$1 dir=$2; shift 2
  local t0 t1
  t0=$(date +%s.%N)
  if ! (cd "$dir" && JAX_LOG_COMPILES=1 PYTHONPATH="$dir" /usr/bin/time -f "%U %S" -o "$work/$tag.cpu" \
          python launch.py $args --output_dir="$work/out_$tag" "$@" > "$work/$tag.log" 2>&1); then
    echo "$tag: launch.py failed; the end of its log:"; tail -20 "$work/$tag.log"; exit 1
  fi
  t1=$(date +%s.%N)
  python - "$tag" "$work" "$t0" "$t1" <<'PY'
import json, re, sys
from pathlib import Path
tag, work, t0, t1 = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
log = (work / f"{tag}.log").read_text(errors="ignore").replace("\r", "\n")
compiles = [float(x) for x in re.findall(r"Finished XLA compilation of jit\(\w+\) in ([\d.e-]+) sec", log)]
phases = {m.group(1): m.group(2) for m in re.finditer(r"^(pre-edit eval|\S+ single): 100%.*?\[(\d+:\d+)<", log, re.M)}
user, sys_ = (float(x) for x in (work / f"{tag}.cpu").read_text().split()[-2:])
[rows] = [p for p in (work / f"out_{tag}").glob("*.jsonl") if not p.name.endswith("_curve.jsonl")]
n = len(rows.read_text().splitlines())
print(f"{tag:12s} wall {t1 - t0:6.1f} s  cpu {user + sys_:6.1f} s  {n} samples  {n / (t1 - t0):.3f} samples/s  "
      f"compilations {len(compiles)} ({sum(compiles):.1f} s)  phases {phases}", flush=True)
PY
}

strip() {  # every metric and answer of a run, without the edit's info (its time; its final loss, which
           # packed LM-head reads change in the 7th digit)
  python - "$1" <<'PY'
import json, sys
from pathlib import Path
[p] = [p for p in Path(sys.argv[1]).glob("*.jsonl") if not p.name.endswith("_curve.jsonl")]
for line in p.read_text().splitlines():
    row = json.loads(line)
    row.pop("edit", None)
    print(json.dumps(row, sort_keys=True))
PY
}

cache="$work/xla"
for r in $(seq 1 "$rounds"); do
  run "before$r" "$work/before"
  rm -rf "$cache"
  run "after${r}cold" "$here" --compile_cache="$cache"
  run "after${r}warm" "$here" --compile_cache="$cache"
  for tag in "after${r}cold" "after${r}warm"; do
    if diff -q <(strip "$work/out_before$r") <(strip "$work/out_$tag") > /dev/null; then
      echo "$tag: results identical to before$r"
    else
      echo "$tag: $(diff <(strip "$work/out_before$r") <(strip "$work/out_$tag") | grep -c '^>') of the result rows differ from before$r"
    fi
  done
done
