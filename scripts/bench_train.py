"""The peer `scalpel train` and `scalpel eval` are timed against: what a PyTorch user would write.

train: the HF model folder in float32, SDPA attention, fused AdamW (β = (0.9, 0.95), weight decay 0.1 on
       matrices), global-norm clipping at 1.0, constant learning rate, over the same [steps·B, T] batches
       scalpel reads (rows in order, B per step), optionally under torch.autocast(bfloat16). Steps after the
       first `warmup` are timed.
eval:  transformers with SDPA, the same [N, T] windows in batches of 8, mean next-token NLL.

Prints one JSON line: tokens/s, the per-step losses (so the caller can check both sides trained alike) or
the mean NLL and wall time.

Token data is an llm.c token file (`scalpel data tokenize` writes train.bin / val.bin), read the way
`scalpel train --shuffle false` and `scalpel eval --data` read it: consecutive windows of `--seq` tokens from
the start, window `step·B + b` at step `step`.

usage: python scripts/bench_train.py train MODEL_DIR TRAIN.bin --batch B --seq T --steps S [--bf16] [--threads N]
       python scripts/bench_train.py eval MODEL_DIR VAL.bin --seq T --windows N [--threads N]
"""
import argparse
import json
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

WARMUP = 2
MAGIC = {20240520: np.uint16, 20240801: np.uint32}


def windows(path, seq, count):
    """The first `count` consecutive windows of `seq` tokens of an llm.c token file, as int64 [count, seq]."""
    header = np.fromfile(path, dtype="<i4", count=256)
    dtype = MAGIC[int(header[0])]
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=256 * 4, shape=(int(header[2]),))
    assert count * seq <= len(tokens), f"{path} holds {len(tokens)} tokens, fewer than {count} windows of {seq}"
    return torch.from_numpy(np.asarray(tokens[:count * seq], dtype=np.int64).reshape(count, seq))


def train(args):
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    ids = windows(args.data, args.seq, args.steps * args.batch)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    losses, started = [], None
    for step in range(args.steps):
        if step == WARMUP:
            started = time.perf_counter()
        batch = ids[step * args.batch:(step + 1) * args.batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    elapsed = time.perf_counter() - started
    tokens = (args.steps - WARMUP) * args.batch * ids.shape[1]
    print(json.dumps({"tokens_per_s": tokens / elapsed, "timed_s": elapsed, "loss": losses}))


def evaluate(args):
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    ids = windows(args.data, args.seq, args.windows)
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in ids.split(8):
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            nll += per_token.double().sum().item()
            count += per_token.numel()
    print(json.dumps({"mean_nll": nll / count, "wall_s": time.perf_counter() - started}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "eval"])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--seq", type=int, default=100)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (train if args.mode == "train" else evaluate)(args)


if __name__ == "__main__":
    main()
