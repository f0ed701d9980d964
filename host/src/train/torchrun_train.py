"""Training job exported by `scalpel train --export`: the same run, on PyTorch's torchrun with FSDP2.

It trains what `scalpel train` would have trained: the same model (model/), the same batches in the
same order (data/order.npy indexes the token data; every rank takes its share of each batch), AdamW with the
same β, ε and weight decay (matrices and embeddings only), the same warm-up and cosine schedule, global-norm
clipping, transformers' next-token loss, and no dropout. It does not evaluate on validation data or save
intermediate checkpoints: it saves the final model. Parameters are sharded across ranks with FSDP2
(`torch.distributed.fsdp.fully_shard`, one unit per decoder block plus the root).

Run it with launch.sh (see README.md). Checkpoints are HF folders (out/model), which `scalpel` reads back.
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
MAGIC = {20240520: np.uint16, 20240801: np.uint32}


def lr_at(c, step):
    """scalpel's schedule: linear warm-up, then cosine decay to min_lr (or constant)."""
    if step < c["warmup"]:
        return c["lr"] * (step + 1) / c["warmup"]
    if c["schedule"] == "constant":
        return c["lr"]
    span = max(c["steps"] - c["warmup"], 1)
    ratio = min((step - c["warmup"]) / span, 1.0)
    return c["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c["lr"] - c["min_lr"])


class Data:
    """The exported token data: an llm.c token file (order = window start offsets) or [N, T] rows (order = row ids)."""

    def __init__(self, job, seq):
        self.seq = seq
        self.order = np.load(HERE / "data" / "order.npy")
        if job["data"]["kind"] == "stream":
            path = HERE / "data" / job["data"]["file"]
            header = np.fromfile(path, dtype="<i4", count=256)
            self.tokens = np.memmap(path, dtype=MAGIC[int(header[0])], mode="r", offset=1024, shape=(int(header[2]),))
            self.rows = None
        else:
            self.rows = np.load(HERE / "data" / job["data"]["file"])

    def micro_batch(self, step, micro, rank, world):
        ids = self.order[step][micro]
        ids = ids[rank * len(ids) // world:(rank + 1) * len(ids) // world]
        if self.rows is None:
            windows = [np.asarray(self.tokens[o:o + self.seq], dtype=np.int64) for o in ids]
        else:
            windows = [self.rows[r][:self.seq].astype(np.int64) for r in ids]
        return torch.from_numpy(np.stack(windows))


def main():
    job = json.loads((HERE / "job.json").read_text())
    c = job["config"]
    device_type = os.environ.get("SCALPEL_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if c["batch"] % world:
        sys.exit(f"the batch of {c['batch']} windows does not split evenly over {world} ranks")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    torch.manual_seed(c["seed"])

    model = AutoModelForCausalLM.from_pretrained(HERE / "model", dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.train()
    # scalpel trains without dropout: GPT-2 configs ask for 0.1 by default.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.0
    for block in model.base_model.layers if hasattr(model.base_model, "layers") else model.base_model.h:
        fully_shard(block)
    fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=c["lr"], betas=(0.9, 0.95), eps=1e-8)
    data = Data(job, c["seq"])
    out = Path(os.environ.get("SCALPEL_OUT", HERE / "out"))
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "w") if rank == 0 else None
    started, tokens = time.perf_counter(), 0
    for step in range(c["steps"]):
        lr = lr_at(c, step)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for micro in range(c["grad_accum"]):
            ids = data.micro_batch(step, micro, rank, world).to(device)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=c["dtype"] == "bf16"):
                loss = model(input_ids=ids, labels=ids).loss
            (loss / c["grad_accum"]).backward()
            loss_sum += loss.detach()
        loss = loss_sum / c["grad_accum"]
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        norm = torch.nn.utils.clip_grad_norm_(params, c["clip"] if c["clip"] > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += c["batch"] * c["grad_accum"] * c["seq"]
        if log:
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            line = {"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": float(norm), "tokens": tokens, "elapsed_s": time.perf_counter() - started}
            log.write(json.dumps(line) + "\n")
            log.flush()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out / "model", state_dict=state)
        print(f"trained {c['steps']} steps on {world} ranks: loss {loss.item():.4f}; model in {out / 'model'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
