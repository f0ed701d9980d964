"""The paper's analysis as a researcher would write it in Python: the reference scalpel is timed against.

transformers (eager attention, output_attentions=True) over the same [N, T] token windows scalpel used, then
for every sequence, layer and head one torch.linalg.svdvals call for k* and the sorted column energies for m*
(tau = eta = 0.9). Prints one JSON line: timings and MaxRank / AvgMass per layer, so the caller can check that
both sides computed the same numbers.

usage: python scripts/bench_reference.py MODEL_DIR CALIBRATION.safetensors
"""
import json
import sys
import time

import torch
import transformers
from safetensors.torch import load_file

TAU = ETA = 0.9


def rank(a):
    s2 = torch.linalg.svdvals(a) ** 2
    cum = torch.cumsum(s2, 0)
    return int(torch.searchsorted(cum, TAU * cum[-1] * (1 - 1e-9)).item()) + 1


def mass(a):
    e = torch.sort((a * a).sum(0), descending=True).values
    cum = torch.cumsum(e, 0)
    return int(torch.searchsorted(cum, ETA * cum[-1] * (1 - 1e-9)).item()) + 1


def main(model_dir, ids_file):
    ids = load_file(ids_file)["input_ids"]
    start = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    loaded = time.time()
    n, _ = ids.shape
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    ranks = torch.zeros(layers, heads, n, dtype=torch.float64)
    masses = torch.zeros(layers, heads, n, dtype=torch.float64)
    forward = 0.0
    with torch.no_grad():
        for b in range(0, n, 16):
            t = time.time()
            attentions = model.model(ids[b : b + 16], output_attentions=True).attentions
            forward += time.time() - t
            for l, att in enumerate(attentions):
                for i in range(att.shape[0]):
                    for h in range(heads):
                        a = att[i, h].double()
                        ranks[l, h, b + i] = rank(a)
                        masses[l, h, b + i] = mass(a)
    end = time.time()
    print(json.dumps({
        "load_s": loaded - start,
        "forward_s": forward,
        "metrics_s": end - loaded - forward,
        "total_s": end - start,
        "matrices": n * layers * heads,
        "max_rank": ranks.mean(2).max(1).values.tolist(),
        "avg_mass": masses.mean(2).mean(1).tolist(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
