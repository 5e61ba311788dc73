#!/usr/bin/env bash
# Regenerates BENCHMARKS.md: the `bench` tiny preset (llava_next, E5-V geometry, ~54 M parameters) exported,
# quantized and measured on this machine against the PyTorch reference. Usage: scripts/benchmarks.sh [WORKDIR]
set -euo pipefail
WORK="${1:-bench-out}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$WORK"
pue-export tiny-model "$WORK/checkpoint" --preset bench --overwrite
pue-export onnx "$WORK/checkpoint" -o "$WORK/fp32" --overwrite
pue-export quantize "$WORK/fp32" -o "$WORK/int8" --precision int8 --overwrite
pue-export quantize "$WORK/fp32" -o "$WORK/int8-dynamic" --precision int8-dynamic --overwrite
pue-export quantize "$WORK/fp32" -o "$WORK/fp16" --precision fp16 --overwrite
BACKENDS=auto  # plus OpenVINO rows where the `openvino` extra is installed
if python -c "import openvino" 2> /dev/null; then BACKENDS=auto,openvino; fi
pue-bench latency "$WORK/fp32" "$WORK/int8" "$WORK/int8-dynamic" "$WORK/fp16" --reference "$WORK/checkpoint" \
  --batch-sizes 1,8 --warmup 1 --iters 5 --rounds 2 --backends "$BACKENDS" --report "$WORK/latency" --overwrite
for b in int8 int8-dynamic fp32; do
  pue-bench profile "$WORK/$b" --batch-size 8 -o "$WORK/profile-$b.json" --overwrite
done
MINI=pmeb-mini
pue-bench pmeb "$WORK/fp32" "$WORK/int8" "$WORK/int8-dynamic" "$WORK/fp16" --data "$MINI" \
  --reference "$WORK/checkpoint" --report "$WORK/pmeb" --cache-dir "$WORK/cache" --overwrite
python "$ROOT/scripts/bench_serve.py" "$WORK/fp32" --batch-size 8 --concurrency 1,8,32 --requests 96 \
  --json "$WORK/serve.json"
python "$ROOT/scripts/write_benchmarks.py" "$WORK" > "$ROOT/BENCHMARKS.md"
echo "wrote $ROOT/BENCHMARKS.md"
