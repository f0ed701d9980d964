#!/usr/bin/env bash
# The paper's comparison at CPU scale, with the tools a user has:
#   reference:   SmolLM2-135M-Instruct (30 layers), as imported from its GGUF;
#   Inheritune:  its first 15 layers (embeddings, blocks 0-14, final norm, tied head), trained on Brown;
#   scratch:     the same 15-layer architecture freshly initialised, trained with the same steps, batches and tokens;
# and the validation loss of all three on the same held-out Brown documents.
# Run from the repository root after `cargo xtask demo` (it imports the model to runs/smollm2-135m):
#   examples/inheritune-smollm2/run.sh            # STEPS=80 (about 12 minutes on 2 cores), OUT=runs/inheritune-smollm2-train
# DTYPE=bf16 halves the time on CPUs with bf16 instructions (avx512_bf16, AMX); elsewhere it is far slower than f32.
set -euo pipefail
cd "$(dirname "$0")/../.."
S=target/release/scalpel
MODEL=runs/smollm2-135m
OUT=${OUT:-runs/inheritune-smollm2-train}
STEPS=${STEPS:-80}
DTYPE=${DTYPE:-f32}
# Both runs see the same batches (same seed), the same schedule and the same validation windows.
FLAGS=(--steps "$STEPS" --batch 8 --seq 64 --lr 6e-4 --min-lr 6e-5 --warmup 8 --dtype "$DTYPE" --eval-every 20 --eval-windows 32 --seed 0)

$S data fetch brown > /dev/null
[ -d "$OUT/data" ] || $S data tokenize brown --tokenizer "$MODEL" -o "$OUT/data"
$S inheritune --reference "$MODEL" --data "$OUT/data" -o "$OUT/inheritune" --start half --max-rounds 1 --force "${FLAGS[@]}"
$S train "$OUT/inheritune/round-1/model" --init random --data "$OUT/data" -o "$OUT/scratch" --force "${FLAGS[@]}"

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
state = json.load(open(f"{out}/inheritune/inheritune.json"))
log = lambda p: [json.loads(l) for l in open(p)]
inh, scr = log(f"{out}/inheritune/round-1/train/log.jsonl"), log(f"{out}/scratch/log.jsonl")
val = lambda rows: [r["val_loss"] for r in rows if "val_loss" in r]
r = state["rounds"][0]
print("| model | layers | parameters | steps | tokens | loss at step 1 (its first batch) | validation loss at the end |")
print("|---|---|---|---|---|---|---|")
print(f"| reference: SmolLM2-135M as released (not trained here) | {state['reference_layers']} | 134.5 M | - | - | - | {state['reference_val_loss']:.4f} |")
print(f"| Inheritune: its first {r['layers']} layers, trained | {r['layers']} | {r['parameters'] / 1e6:.1f} M | {r['steps']} | {r['tokens']} | {inh[0]['loss']:.3f} | {val(inh)[-1]:.4f} |")
print(f"| the same {r['layers']} layers from scratch, trained | {r['layers']} | {r['parameters'] / 1e6:.1f} M | {scr[-1]['step']} | {scr[-1]['tokens']} | {scr[0]['loss']:.3f} | {val(scr)[-1]:.4f} |")
print("\nvalidation loss during training (step: Inheritune / scratch):")
for a, b in zip([x for x in inh if "val_loss" in x], [x for x in scr if "val_loss" in x]):
    print(f"  {a['step']:>4}: {a['val_loss']:.4f} / {b['val_loss']:.4f}")
PY
