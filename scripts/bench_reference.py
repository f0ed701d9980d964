"""The paper's analysis as a researcher would write it in Python: the references scalpel is timed against.

transformers (eager attention, output_attentions=True) over the same [N, T] token windows scalpel used, in
batches of 16 windows, then k* (tau = 0.9) and m* (eta = 0.9) of every sequence, layer and head:
  strong (default): one batched float32 torch.linalg.svdvals per layer over its [N * heads, T, T] matrices,
                    and the column energies of the whole layer at once, what a researcher who cares about
                    speed writes (on SmolLM2 it gives the same k* on every head as float64);
  --loop:           every matrix converted to float64 and one svdvals call each, as the paper's analysis is
                    written.
Prints one JSON line: timings (load, forward, metric stage), and per head the mean k* and m* over sequences,
so the caller can check that both sides computed the same numbers.

usage: python scripts/bench_reference.py MODEL_DIR CALIBRATION.safetensors [--loop]
"""
import json
import sys
import time

import torch
import transformers
from safetensors.torch import load_file

TAU = ETA = 0.9


def smallest_reaching(energy, fraction):
    """Fewest of the (descending) energies along the last dim whose sum reaches `fraction` of their total."""
    cum = torch.cumsum(energy.double(), -1)
    threshold = fraction * cum[..., -1:] * (1 - 1e-9)
    return torch.searchsorted(cum, threshold).squeeze(-1) + 1


def strong(attentions):
    """k* and m*, [heads, N], of one layer's attention [N, heads, T, T] (float32)."""
    a = attentions.transpose(0, 1)
    k = smallest_reaching(torch.linalg.svdvals(a) ** 2, TAU)
    m = smallest_reaching(torch.sort((a * a).sum(-2), descending=True).values, ETA)
    return k.double(), m.double()


def loop(attentions):
    """The same, one float64 matrix at a time."""
    n, heads = attentions.shape[:2]
    k = torch.zeros(heads, n, dtype=torch.float64)
    m = torch.zeros(heads, n, dtype=torch.float64)
    for i in range(n):
        for h in range(heads):
            a = attentions[i, h].double()
            k[h, i] = smallest_reaching(torch.linalg.svdvals(a) ** 2, TAU)
            m[h, i] = smallest_reaching(torch.sort((a * a).sum(0), descending=True).values, ETA)
    return k, m


def main(model_dir, ids_file, per_matrix):
    ids = load_file(ids_file)["input_ids"]
    start = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    loaded = time.time()
    n, _ = ids.shape
    forward = metrics = 0.0
    ranks, masses = [], []
    with torch.no_grad():
        if per_matrix:
            for b in range(0, n, 16):
                t = time.time()
                attentions = model.model(ids[b : b + 16], output_attentions=True).attentions
                forward += time.time() - t
                t = time.time()
                parts = [loop(att) for att in attentions]
                metrics += time.time() - t
                ranks.append(torch.stack([k for k, _ in parts]))
                masses.append(torch.stack([m for _, m in parts]))
            ranks, masses = torch.cat(ranks, -1), torch.cat(masses, -1)
        else:
            t = time.time()
            batches = [model.model(ids[b : b + 16], output_attentions=True).attentions for b in range(0, n, 16)]
            layers = [torch.cat(parts) for parts in zip(*batches)]
            del batches
            forward = time.time() - t
            t = time.time()
            parts = [strong(att) for att in layers]
            metrics = time.time() - t
            ranks, masses = torch.stack([k for k, _ in parts]), torch.stack([m for _, m in parts])
    end = time.time()
    print(json.dumps({
        "method": "float64 svdvals per matrix" if per_matrix else "float32 batched svdvals per layer",
        "load_s": loaded - start,
        "forward_s": forward,
        "metrics_s": metrics,
        "total_s": end - start,
        "matrices": ranks.numel(),
        "max_rank": ranks.mean(-1).max(-1).values.tolist(),
        "avg_mass": masses.mean(-1).mean(-1).tolist(),
        "rank_per_head": ranks.mean(-1).tolist(),
        "mass_per_head": masses.mean(-1).tolist(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--loop"]
    if len(args) != 2:
        sys.exit(__doc__)
    main(args[0], args[1], "--loop" in sys.argv[1:])
