#!/usr/bin/env bash
# Every GPU check of scalpel in one run, for a machine with PyTorch 2.11 (CUDA) and no Rust:
#   here:  cargo xtask dist            (stripped host + plugins + bench-metrics into dist/, no libtorch)
#   there: scripts/gpu-check.sh [LOG_DIR]
# It points the binaries at that machine's torch/lib, then:
#   1. scalpel --version               CUDA backend loaded, GPU visible
#   2. a plugin on Cuda(0) tensors     block-influence on tiny-llama, device printed by the plugin
#   3. forward pass CUDA vs CPU        max |diff| of logits and attention, four tiny models
#   4. analyzers on CUDA vs CPU        attn-rank/attn-mass reports identical on tiny-llama
#   5. metric kernel timing            k* and m* of 72,000 100x100 matrices on the GPU (target: under 1 s)
# and prints a short table last. Logs go to LOG_DIR (default: $OUT when set, else ./gpu-logs).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-${OUT:-gpu-logs}}
mkdir -p "$LOG"
TORCH_LIB=${TORCH_LIB:-$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')}
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
S=dist/scalpel
declare -a ROWS
row() { ROWS+=("$(printf '%-34s %-6s %s' "$1" "$2" "$3")"); }

$S --version > "$LOG/version.txt" 2>&1
grep -q "cuda: available" "$LOG/version.txt" && row "CUDA backend" ok "$(grep cuda: "$LOG/version.txt")" || row "CUDA backend" FAIL "$(tail -1 "$LOG/version.txt")"

$S --device cuda analyze -a block-influence tests/data/tiny-llama --calib tests/data/depth-pruning/tiny-llama.ids.safetensors > "$LOG/plugin.txt" 2>&1
grep -q "Cuda(0)" "$LOG/plugin.txt" && row "plugin on Cuda(0) tensors" ok "$(grep -o 'float64 on Cuda(0)' "$LOG/plugin.txt")" || row "plugin on Cuda(0) tensors" FAIL "see plugin.txt"

for m in tiny-gpt2 tiny-llama tiny-llama-tied tiny-qwen2; do
  $S --device cuda device-check "tests/data/$m" > "$LOG/device-check-$m.txt" 2>&1 \
    && row "forward CUDA vs CPU: $m" ok "$(cut -d: -f2- "$LOG/device-check-$m.txt")" \
    || row "forward CUDA vs CPU: $m" FAIL "$(tail -1 "$LOG/device-check-$m.txt")"
done

python3 - "$LOG/ids.npy" <<'PY'
import struct, sys
rows, cols = 8, 32
header = "{'descr': '<i8', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, cols)
header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
data = b"".join(struct.pack("<q", i * 7 % 103) for i in range(rows * cols))
open(sys.argv[1], "wb").write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data)
PY
for d in cpu cuda; do
  $S --device $d analyze -a attn-rank -a attn-mass tests/data/tiny-llama --calib "$LOG/ids.npy" --json > "$LOG/analyze-$d.json" 2> "$LOG/analyze-$d.log"
done
python3 - "$LOG" <<'PY' && row "analyzers CUDA = CPU" ok "max_rank and avg_mass identical" || row "analyzers CUDA = CPU" FAIL "see analyze-*.json"
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/analyze-{d}.json")) for d in ("cpu", "cuda"))
for name in ("attn-rank", "attn-mass"):
    ma = {m["name"]: m["per_layer"] for m in a[name]["metrics"]}
    mb = {m["name"]: m["per_layer"] for m in b[name]["metrics"]}
    assert all(abs(x - y) < 1e-6 for k in ma for x, y in zip(ma[k], mb[k])), name
PY

dist/bench-metrics --device cuda --matrices 72000 > "$LOG/bench-cuda.json" 2> "$LOG/bench-cuda.log"
dist/bench-metrics --device cpu --matrices 7200 > "$LOG/bench-cpu.json" 2> "$LOG/bench-cpu.log"
row "72,000 matrices on the GPU" "$(python3 -c "import json;r=json.load(open('$LOG/bench-cuda.json'));print('ok' if r['rank_and_mass_s']<1 else 'SLOW')" 2>/dev/null || echo FAIL)" \
  "$(python3 -c "import json;r=json.load(open('$LOG/bench-cuda.json'));print(f\"{r['rank_and_mass_s']:.2f} s, batched SVD est. {r['batched_svd_s_estimated']:.1f} s\")" 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$LOG/gpu.txt" 2>&1

echo
echo "scalpel GPU checks on $(cat "$LOG/gpu.txt" 2>/dev/null | head -1), $(date -u +%F)"
printf '%s\n' "${ROWS[@]}" | tee "$LOG/summary.txt"
