"""Synthetic models with real models' shapes and random weights, for benchmarks of memory and speed.

By default a bf16 Llama with Llama-3-8B's shapes: 32 layers, d_model 4096, 32 heads (8 key/value heads),
feed-forward 14336, vocabulary 128256, untied head: 8.03 B parameters, 16 GB on disk as sharded
safetensors with an index, as transformers writes them. `--family gpt2` makes a GPT-2 (tied head,
position embeddings, Conv1D weights); the sizes are options. Weights are N(0, 0.02) (norms 1, biases
0), seeded: a forward pass sees a well-behaved model, not zeros. Matrices are cut at random offsets
from a 32 M-value pool of normals (drawing 8 B fresh ones would take far longer than writing them).
The script streams: each shard's header is computed from the shapes up front and tensors are
written a chunk at a time, so it needs a few hundred MB whatever the model size.

Also writes `calib.npy` beside the model folder: [8, 64] random token ids (8 windows of 64 tokens).

    ~/.cache/scalpel/pyenv/bin/python scripts/make_synthetic_model.py OUT_DIR/NAME [--layers 32] [--dtype f32]
"""

import argparse
import json
import struct
from pathlib import Path

import numpy as np
import torch

POOL_ELEMENTS = 32 << 20  # random values that chunks are cut from


def gpt2_shapes(layers, d, heads, kv_heads, ff, vocab, context):
    out = [("transformer.wte.weight", [vocab, d]), ("transformer.wpe.weight", [context, d])]
    for i in range(layers):
        p = f"transformer.h.{i}."
        out += [
            (p + "ln_1.weight", [d]),
            (p + "ln_1.bias", [d]),
            (p + "attn.c_attn.weight", [d, 3 * d]),
            (p + "attn.c_attn.bias", [3 * d]),
            (p + "attn.c_proj.weight", [d, d]),
            (p + "attn.c_proj.bias", [d]),
            (p + "ln_2.weight", [d]),
            (p + "ln_2.bias", [d]),
            (p + "mlp.c_fc.weight", [d, ff]),
            (p + "mlp.c_fc.bias", [ff]),
            (p + "mlp.c_proj.weight", [ff, d]),
            (p + "mlp.c_proj.bias", [d]),
        ]
    return out + [("transformer.ln_f.weight", [d]), ("transformer.ln_f.bias", [d])]


def llama_shapes(layers, d, heads, kv_heads, ff, vocab, context):
    hd = d // heads
    out = [("model.embed_tokens.weight", [vocab, d])]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", [d]),
            (p + "self_attn.q_proj.weight", [heads * hd, d]),
            (p + "self_attn.k_proj.weight", [kv_heads * hd, d]),
            (p + "self_attn.v_proj.weight", [kv_heads * hd, d]),
            (p + "self_attn.o_proj.weight", [d, heads * hd]),
            (p + "post_attention_layernorm.weight", [d]),
            (p + "mlp.gate_proj.weight", [ff, d]),
            (p + "mlp.up_proj.weight", [ff, d]),
            (p + "mlp.down_proj.weight", [d, ff]),
        ]
    return out + [("model.norm.weight", [d]), ("lm_head.weight", [vocab, d])]


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


DTYPES = {"bf16": (torch.bfloat16, "BF16", torch.int16), "f32": (torch.float32, "F32", torch.int32)}


def raw(t, dtype):
    """The little-endian bytes of `t` in `dtype` (numpy has no bf16, so through an integer view)."""
    kind, _, bits = DTYPES[dtype]
    return t.to(kind).view(bits).numpy().tobytes()


def write_tensor(f, name, shape, pool, gen, dtype):
    """N(0, 0.02) values (ones for norm weights, zeros for biases), a chunk at a time. Chunks are slices
    of a pool of random values at random offsets: drawing 8 B normals would take longer than writing them."""
    if name.endswith("norm.weight") or ".ln_" in name:
        fill = torch.ones if name.endswith(".weight") else torch.zeros
        f.write(raw(fill(shape), dtype))
        return
    if name.endswith(".bias"):
        f.write(raw(torch.zeros(shape), dtype))
        return
    left = numel(shape)
    while left:
        n = min(left, len(pool) // 2)
        at = int(torch.randint(0, len(pool) - n + 1, (1,), generator=gen))
        f.write(pool[at:at + n].data)
        left -= n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="the model folder to write; calib.npy goes beside it")
    ap.add_argument("--family", choices=["llama", "gpt2"], default="llama")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--shard-bytes", type=int, default=5_000_000_000, help="transformers' default max_shard_size")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ff", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model = a.model
    model.mkdir(parents=True, exist_ok=True)
    shapes = gpt2_shapes if a.family == "gpt2" else llama_shapes
    all_shapes = shapes(a.layers, a.d_model, a.heads, a.kv_heads, a.ff, a.vocab, a.context)
    elt = torch.finfo(DTYPES[a.dtype][0]).bits // 8

    # Tensors go into shards in order, a new shard when the next tensor would pass --shard-bytes.
    shards = [[]]
    size = 0
    for name, shape in all_shapes:
        n = numel(shape) * elt
        if shards[-1] and size + n > a.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n

    gen = torch.Generator().manual_seed(a.seed)
    kind, _, bits = DTYPES[a.dtype]
    pool = (torch.randn(POOL_ELEMENTS, generator=gen) * 0.02).to(kind).view(bits).numpy()
    weight_map, total = {}, 0
    for k, members in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in members:
            n = numel(shape) * elt
            header[name] = {"dtype": DTYPES[a.dtype][1], "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        total += offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors crate writes it
        tmp = model / (file + ".part")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name, shape in members:
                write_tensor(f, name, shape, pool, gen, a.dtype)
        tmp.rename(model / file)
        print(f"{file}: {len(members)} tensors, {offset / 1e9:.2f} GB", flush=True)

    if len(shards) == 1:
        (model / file).rename(model / "model.safetensors")
    else:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    torch_dtype = "bfloat16" if a.dtype == "bf16" else "float32"
    if a.family == "gpt2":
        config = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": a.d_model,
            "n_inner": a.ff,
            "n_layer": a.layers,
            "n_head": a.heads,
            "n_positions": a.context,
            "n_ctx": a.context,
            "vocab_size": a.vocab,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "torch_dtype": torch_dtype,
        }
    else:
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": a.d_model,
            "intermediate_size": a.ff,
            "num_hidden_layers": a.layers,
            "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads,
            "head_dim": a.d_model // a.heads,
            "max_position_embeddings": a.context,
            "vocab_size": a.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": torch_dtype,
        }
    (model / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    ids = np.random.default_rng(a.seed).integers(0, a.vocab, size=(8, 64), dtype=np.int64)
    np.save(model.parent / "calib.npy", ids)
    params = sum(numel(s) for _, s in all_shapes)
    print(f"{model}: {params / 1e9:.2f} B parameters, {total / 1e9:.2f} GB in {len(shards)} shards; {model.parent / 'calib.npy'}: 8 x 64 token ids")


if __name__ == "__main__":
    main()
