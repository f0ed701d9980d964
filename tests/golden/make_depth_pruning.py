"""Golden values for the depth-pruning analyzers, computed with plain PyTorch on transformers' forward pass.

Setup and run (from the repo root, after make_golden.py has written tests/data/tiny-*):
    tests/golden/setup_env.sh            # venv at ~/.cache/scalpel/pyenv: torch 2.11.0, transformers 5.24.0
    ~/.cache/scalpel/pyenv/bin/python tests/golden/make_depth_pruning.py

For each MODEL in tiny-llama, tiny-gpt2 this writes tests/data/depth-pruning/:
    MODEL.ids.safetensors   input_ids int64 [N, T]: fixed random windows, the calibration scalpel is given
    MODEL.json              {"model", "made_by", "windows": [N, T],
                             "bi": [L],                 block influence per block
                             "distance": [[...]] ,      distance[l][n-1] = d(l, n), n = 1..L-l
                             "best": [{"n", "start", "distance"}],
                             "loss": full-model loss,
                             "ppl_importance": [L]}     loss with block l skipped minus the full loss

Definitions (scalpel's): x_l is the residual stream entering block l (x_0: the embeddings; GPT-2: wte + wpe) and
x_L the output of the last block BEFORE the final norm. transformers' output_hidden_states applies the final norm
to its last entry, so make_golden.py's hooks on the blocks take the states instead (and check them against it).
    BI_l    = 1 - mean over every token of every window of cos(x_l, x_{l+1})
    d(l, n) = mean over windows of arccos(cos(x_l, x_{l+n})) / pi at the window's last token
    ppl_importance(l) = loss with block l removed from the model - the full model's loss, where the loss is
                        transformers' own (labels = input_ids: mean next-token cross-entropy over all windows)
Model in float32 (eager attention, as scalpel's forward pass); metrics in float64 from those float32 states.
"""

import json
import math
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from make_golden import golden  # the residual stream, taken as for the other golden files

DATA = Path(__file__).resolve().parents[1] / "data"
OUT = DATA / "depth-pruning"
WINDOWS, TOKENS = 6, 24


def residual_stream(model, ids):
    """[x_0, ..., x_L], each float32 [N, T, d]: block inputs, then the last block's output before the final norm.
    make_golden.py takes them with hooks on the blocks and checks them against output_hidden_states."""
    g = golden(model, ids)
    return [g[f"hidden.{i}"] for i in range(model.config.num_hidden_layers + 1)]


def cosine(a, b):
    """Cosine along the last axis, float64, clamped into [-1, 1]."""
    a, b = a.double(), b.double()
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).clamp(-1.0, 1.0)


def block_influence(xs):
    return [1.0 - cosine(xs[l], xs[l + 1]).mean().item() for l in range(len(xs) - 1)]


def angular_distances(xs):
    L = len(xs) - 1
    last = [x[:, -1, :] for x in xs]
    return [[(torch.arccos(cosine(last[l], last[l + n])) / math.pi).mean().item() for n in range(1, L - l + 1)]
            for l in range(L)]


def best_starts(distance):
    L = len(distance)
    best = []
    for n in range(1, L + 1):
        starts = [distance[l][n - 1] for l in range(L - n + 1)]
        start = min(range(len(starts)), key=lambda l: (starts[l], l))
        best.append({"n": n, "start": start, "distance": starts[start]})
    return best


def blocks(model):
    """The ModuleList of decoder blocks (Llama: model.layers, GPT-2: transformer.h)."""
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def loss(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids, use_cache=False).loss.item()


def ppl_importance(model, ids):
    """The loss with each block taken out of the model (transformers' own forward), minus the full loss."""
    full = loss(model, ids)
    layers = blocks(model)
    out = []
    for l in range(len(layers)):
        removed = layers[l]
        del layers[l]
        out.append(loss(model, ids) - full)
        layers.insert(l, removed)
    return full, out


def write(name):
    model = AutoModelForCausalLM.from_pretrained(DATA / name, attn_implementation="eager").float().eval()
    g = torch.Generator().manual_seed(2403)
    ids = torch.randint(0, model.config.vocab_size, (WINDOWS, TOKENS), generator=g)
    xs = residual_stream(model, ids)
    distance = angular_distances(xs)
    golden = {
        "model": name,
        "made_by": f"tests/golden/make_depth_pruning.py, torch {torch.__version__}, transformers {transformers.__version__}",
        "windows": [WINDOWS, TOKENS],
        "bi": block_influence(xs),
        "distance": distance,
        "best": best_starts(distance),
    }
    golden["loss"], golden["ppl_importance"] = ppl_importance(model, ids)
    save_file({"input_ids": ids.contiguous()}, OUT / f"{name}.ids.safetensors")
    (OUT / f"{name}.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(name, "BI", [round(b, 4) for b in golden["bi"]], "best", [(b["n"], b["start"]) for b in golden["best"]])


if __name__ == "__main__":
    transformers.utils.logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ["tiny-llama", "tiny-gpt2"]:
        write(name)
