#!/usr/bin/env bash
# Inheritune against zero-shot depth pruning on SmolLM2-135M-Instruct (30 layers), at 22 and at 15 kept layers:
# one `scalpel compare` per depth, on the same calibration windows, evaluation windows and (HEAL > 0) training.
# Run from the repository root after `cargo xtask demo` (it imports the model to runs/smollm2-135m):
#   examples/compare/run.sh                 # zero-shot: about 10 minutes on 2 cores
#   HEAL=40 examples/compare/run.sh         # and 40 steps of healing per method (batch 8 x 128 tokens)
# The reports are copied next to this script (result-22/, result-15/); the models stay in $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
S=${S:-target/release/scalpel}
MODEL=runs/smollm2-135m
OUT=${OUT:-runs/compare-smollm2}
HEAL=${HEAL:-0}

$S data fetch brown > /dev/null
[ -d "$OUT/data" ] || $S data tokenize brown --tokenizer "$MODEL" -o "$OUT/data"
for depth in ${DEPTHS:-22 15}; do
    $S compare "$MODEL" --recipes examples/compare/recipes-$depth/*.toml \
        --eval "$OUT/data" --eval-tokens 128 --eval-windows 64 -n 32 -t 128 \
        -a attn-rank -a attn-mass -a block-influence -a angular-distance -a ppl-importance \
        --heal-steps "$HEAL" --data "$OUT/data" --heal-set batch=8 --heal-set seq=128 --heal-set lr=3e-4 --heal-set warmup=4 \
        -o "$OUT/$depth" --force
    dest=examples/compare/result-$depth$([ "$HEAL" = 0 ] || echo "-healed")
    mkdir -p "$dest"
    for f in compare.md compare.html compare.json profile.svg profile.png profile.csv healing.svg healing.png healing.csv; do
        [ ! -e "$OUT/$depth/$f" ] || cp "$OUT/$depth/$f" "$dest/"
    done
done
