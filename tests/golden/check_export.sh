#!/usr/bin/env bash
# Parity of `scalpel train --export` (a torchrun + FSDP2 job) with `scalpel train` itself: the exported job,
# run with torchrun on 2 CPU processes (gloo), must log the same first losses as scalpel within 1e-3.
# Opt-in, not part of CI: it needs the Python env of tests/golden/setup_env.sh (torch 2.11, transformers).
#   tests/golden/check_export.sh [path/to/scalpel]          # from the repo root, after a release build
set -euo pipefail
cd "$(dirname "$0")/../.."
S=$(realpath "${1:-target/release/scalpel}")
VENV="${SCALPEL_PYENV:-$HOME/.cache/scalpel/pyenv}"
export PATH="$VENV/bin:$PATH"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Two kinds of data: [N, T] rows in order, and an llm.c token file with shuffled windows (ChaCha8 order).
python3 - "$tmp/tokens.bin" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(0)
ids = ((np.arange(20000) * 7 + 3) % 103).astype(np.uint16)
noise = rng.random(20000) < 0.1
ids[noise] = rng.integers(0, 103, int(noise.sum()))
header = np.zeros(256, dtype="<i4"); header[0], header[1], header[2] = 20240520, 1, len(ids)
with open(sys.argv[1], "wb") as f:
    f.write(header.tobytes()); f.write(ids.astype("<u2").tobytes())
PY

fail=0
check() {  # name, data, extra flags...
  local name=$1 data=$2; shift 2
  local flags=(--data "$data" --steps 6 --batch 4 --seq 32 --lr 3e-3 --warmup 2 --min-lr 3e-4 "$@")
  "$S" train tests/data/tiny-llama "${flags[@]}" -o "$tmp/$name-scalpel" > /dev/null 2>&1
  "$S" train tests/data/tiny-llama "${flags[@]}" --export "$tmp/$name-job" > /dev/null
  (cd "$tmp/$name-job" && SCALPEL_DEVICE=cpu NPROC=2 OMP_NUM_THREADS=1 ./launch.sh > "$tmp/$name-torchrun.txt" 2>&1) || { cat "$tmp/$name-torchrun.txt"; fail=1; return; }
  python3 - "$name" "$tmp/$name-scalpel/log.jsonl" "$tmp/$name-job/out/log.jsonl" <<'PY' || fail=1
import json, sys
name, a, b = sys.argv[1:]
ours = [json.loads(l)["loss"] for l in open(a)]
theirs = [json.loads(l)["loss"] for l in open(b)]
print(f"{name}: step  scalpel train   torchrun (2 ranks, FSDP2)   |diff|")
worst = 0.0
for i, (x, y) in enumerate(zip(ours, theirs)):
    worst = max(worst, abs(x - y))
    print(f"{name}: {i + 1:>4}  {x:.6f}        {y:.6f}                  {abs(x - y):.2e}")
ok = len(ours) == len(theirs) and worst < 1e-3
print(f"{name}: {'PASS' if ok else 'FAIL'} (worst |diff| {worst:.2e}, tolerance 1e-3)")
sys.exit(0 if ok else 1)
PY
}
check rows tests/data/train/tiny-llama-batches.safetensors --shuffle false
check stream "$tmp/tokens.bin" --shuffle true --seed 3
exit $fail
