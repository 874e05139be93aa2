#!/usr/bin/env bash
# A short check that the harness trains on CUDA: every method on a twin, ULE through batch norm on a
# ResNet, the same seed twice, a run killed with SIGKILL then resumed, every method in bf16 and fp16,
# --compile, and the throughput table of docs/performance.md (benchmarks/gpu_throughput.py, ResNet-50 at
# 224 px, fp32 and bf16). Run it where a GPU is; it takes about 10 minutes on an H200 (the throughput
# part is cut off after THROUGHPUT_SECONDS, default 420).
#
#   scripts/gpu_check.sh [OUTDIR]        (BENCH="python3 -m bench.cli" where bench is not installed)
#
# Prints PASS/DIFF lines, the metrics and the throughput table (also in OUTDIR/throughput.md); exits
# non-zero only when a command fails.
set -euo pipefail
out=${1:-/tmp/gpu-check}
device=${DEVICE:-cuda}  # DEVICE=cpu tries the script itself on a machine without a GPU
bench=${BENCH:-bench}
mkdir -p "$out"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'

seconds() { local start=$SECONDS; "$@" >"$out/last.log" 2>&1 || { cat "$out/last.log"; exit 1; }; echo "$((SECONDS - start)) s"; }

for method in erm groupdro jtt dfr lff ule; do
  echo "== $method on waterbirds-synth, 2 epochs, cuda: $(seconds $bench run --method $method \
    --dataset waterbirds-synth --seeds 1 --epochs 2 --device "$device" --out "$out/methods" --quiet)"
  tail -n 6 "$out/last.log" | head -n 3
done

echo "== ule on urbancars-synth with resnet18 (batch norm, double backward), 1 epoch, cuda: $(seconds \
  $bench run --method ule --dataset urbancars-synth --backbone resnet18 --epochs 1 --seeds 1 --device "$device" \
  --out "$out/resnet" --quiet)"
tail -n 6 "$out/last.log" | head -n 3

# ULE with --deterministic, 3 epochs, into folder $1 (further flags after it).
run_ule() {
  local dir=$1
  shift
  $bench run --method ule --dataset waterbirds-synth --epochs 3 --seeds 1 --device "$device" --deterministic \
    --out "$dir" --quiet "$@"
}
# The same run killed with SIGKILL after its first epoch, then run again: it resumes from its checkpoint.
killed_and_resumed() {
  run_ule "$@" >/dev/null 2>&1 &
  local pid=$!
  until [ -n "$(find "$1" -name metrics.jsonl -size +0 2>/dev/null)" ]; do sleep 0.2; done
  kill -9 $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  echo "== killed after $(find "$1" -name metrics.jsonl -exec wc -l {} + | tail -n 1 | awk '{print $1}') epoch(s); resuming"
  run_ule "$@" >/dev/null 2>&1
}
# PASS when the runs in the folders $2 and $3 selected the same metrics; $1 labels the line.
same() {
  python3 - "$@" <<'EOF'
import json, sys
from pathlib import Path
label, *folders = sys.argv[1:]
def selection(folder):
    (final,) = Path(folder).rglob("final.json")
    return json.loads(final.read_text())["selection"]
first, second = (selection(folder) for folder in folders)
print(f"{label}:", "PASS identical" if first == second else "DIFF")
for folder, runs in zip(folders, (first, second)):
    test = runs["val-worst-group"]["teacher"]["test"]
    print(" ", Path(folder).name, "teacher test worst-group", test["worst_group_accuracy"], "groups",
          test["group_accuracies"])
EOF
}

# With --deterministic: the same seed twice, then a run killed after its first epoch and resumed.
run_ule "$out/a" >/dev/null 2>&1
run_ule "$out/b" >/dev/null 2>&1
killed_and_resumed "$out/c"
same "same seed twice, --deterministic" "$out/a" "$out/b"
same "killed + resumed vs uninterrupted" "$out/a" "$out/c"

# Mixed precision and compile: every method one epoch in bf16 and fp16 (ULE's double backward included),
# an fp16 ULE run killed and resumed against an uninterrupted one, and ERM compiled.
for precision in bf16 fp16; do
  for method in erm groupdro jtt dfr lff ule rrr; do
    echo "== $method, $precision: $(seconds $bench run --method $method --dataset waterbirds-synth --seeds 1 --epochs 1 \
      --precision $precision --device "$device" --out "$out/precision" --quiet)"
    tail -n 6 "$out/last.log" | head -n 3
  done
done
run_ule "$out/fp16-a" --precision fp16 >/dev/null 2>&1
killed_and_resumed "$out/fp16-c" --precision fp16
same "fp16: killed + resumed vs uninterrupted" "$out/fp16-a" "$out/fp16-c"
echo "== erm --compile, 2 epochs: $(seconds $bench run --method erm --dataset waterbirds-synth --seeds 1 --epochs 2 \
  --compile --device "$device" --out "$out/compile" --quiet)"
tail -n 6 "$out/last.log" | head -n 3

echo "== throughput (benchmarks/gpu_throughput.py, ResNet-50 at 224 px, fp32 and bf16)"
timeout "${THROUGHPUT_SECONDS:-420}" python3 "$(dirname "$0")/../benchmarks/gpu_throughput.py" --n 4096 --epochs 2 \
  --workers 8 --precisions fp32,bf16 | tee "$out/throughput.md"
