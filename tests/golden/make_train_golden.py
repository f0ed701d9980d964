"""The training fidelity reference: a plain PyTorch loop on the tiny models, to compare `scalpel train` with.

Setup and run (from the repo root):
    tests/golden/setup_env.sh            # venv at ~/.cache/scalpel/pyenv: torch 2.11.0, transformers 5.24.0
    ~/.cache/scalpel/pyenv/bin/python tests/golden/make_train_golden.py

For each model NAME in MODELS this writes tests/data/train/:
    NAME-batches.safetensors   input_ids int64 [STEPS * BATCH, SEQ]: the batches, in order (step s uses rows
                               s*BATCH .. (s+1)*BATCH), so `scalpel train --data … --shuffle false` sees the same
    NAME-losses.json           {"settings": …, "loss": [STEPS floats], "grad_norm": [STEPS floats]}

The loop is what a PyTorch user writes: the model from tests/data/NAME (float32, dropout off), AdamW with
β = (0.9, 0.95), ε = 1e-8, weight decay 0.1 on tensors of rank ≥ 2 only, constant learning rate, global-norm
clipping at 1.0, and transformers' own loss (`labels = input_ids`). `foreach=False` selects PyTorch's
single-tensor AdamW, the reference implementation of its update. Everything is seeded; CPU only.
"""

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

DATA = Path(__file__).resolve().parents[1] / "data"
OUT = DATA / "train"
MODELS = ["tiny-llama", "tiny-gpt2"]
STEPS, BATCH, SEQ = 20, 4, 32
LR, WEIGHT_DECAY, CLIP = 3e-3, 0.1, 1.0


def learnable_batches(vocab):
    """Rows that follow a rule (next = 7·current + 3 mod vocab) with 10 % random tokens: the loss can fall,
    so a wrong update shows in the curve, not only in its noise."""
    gen = torch.Generator().manual_seed(1234)
    rows = torch.empty((STEPS * BATCH, SEQ), dtype=torch.int64)
    rows[:, 0] = torch.randint(0, vocab, (STEPS * BATCH,), generator=gen)
    for t in range(1, SEQ):
        rows[:, t] = (rows[:, t - 1] * 7 + 3) % vocab
    noise = torch.rand((STEPS * BATCH, SEQ), generator=gen) < 0.1
    rows[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=gen)
    return rows


def train(name):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(DATA / name, dtype=torch.float32)
    # No dropout: scalpel trains without it (and these configs set it to 0 anyway).
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
        assert getattr(model.config, key, 0.0) == 0.0, f"{name}: {key} is not 0"
    model.train()
    vocab = model.config.vocab_size
    ids = learnable_batches(vocab)

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False)
    losses, norms = [], []
    for step in range(STEPS):
        batch = ids[step * BATCH:(step + 1) * BATCH]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        norms.append(norm.item())
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids}, OUT / f"{name}-batches.safetensors")
    settings = {"steps": STEPS, "batch": BATCH, "seq": SEQ, "lr": LR, "weight_decay": WEIGHT_DECAY, "clip": CLIP,
                "betas": [0.9, 0.95], "eps": 1e-8, "schedule": "constant", "warmup": 0,
                "torch": torch.__version__, "transformers": transformers.__version__}
    (OUT / f"{name}-losses.json").write_text(json.dumps({"settings": settings, "loss": losses, "grad_norm": norms}, indent=1) + "\n")
    print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {STEPS} steps")


if __name__ == "__main__":
    for name in MODELS:
        train(name)
