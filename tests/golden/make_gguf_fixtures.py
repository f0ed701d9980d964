"""Generate the GGUF fixtures that host/src/gguf.rs tests against.

Setup and run (from the repo root):
    python3 -m venv ~/.cache/scalpel/gguf-venv
    ~/.cache/scalpel/gguf-venv/bin/pip install gguf==0.19.0 numpy==2.4.6 safetensors==0.8.0
    ~/.cache/scalpel/gguf-venv/bin/python tests/golden/make_gguf_fixtures.py

`gguf` is llama.cpp's own Python package (gguf-py): its writer produces the files and its
dequantiser produces the reference values, so the Rust importer is checked against
llama.cpp's semantics, not against a re-implementation of them.

Writes tests/data/gguf/:
    quants.gguf               one tensor per ggml type that gguf-py dequantises (named by the
                              type: F32, F16, BF16, F64, Q4_0 ... Q6_K, IQ1_S ... IQ4_XS, TQ1_0,
                              TQ2_0, MXFP4, NVFP4) of random valid blocks, fp16 scales kept
                              finite and moderate; and, for the types gguf-py can quantise
                              (gguf.quants.quantize), a tensor `TYPE.quantized` of Gaussian
                              weights it quantised. Alignment 64 and metadata of every value
                              type, nested arrays included
    quants.ref.safetensors    float32 [rows, cols] per tensor name: gguf.quants.dequantize()
                              (F64: numpy's astype(float32), gguf-py has no F64 dequantiser)
    tiny_llama.gguf           a 2-layer llama-arch model as convert_hf_to_gguf.py writes one:
                              q/k rows permuted, tensors in F32, F16 and Q8_0, tied embeddings,
                              a toy byte-level BPE vocabulary with merges and control tokens
    tiny_llama.hf.safetensors the same weights, HF names and HF layout (unpermuted), exactly the
                              values the importer must return (F16/Q8_0 storage rounding applied)
Everything is seeded, so reruns give the same bytes.
"""

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parents[1] / "data" / "gguf"
rng = np.random.default_rng(20240611)


# ---------------------------------------------------------------- (a) dequantisation references

# Byte offsets of the fp16 scale fields in one block of each quantised type (gguf-py quants.py).
# Random bytes there could make inf or NaN; every other byte of a block is valid whatever its
# value (the IQ grid and sign indices included), so the rest stays random.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ2_XXS: [0], T.IQ2_XS: [0], T.IQ2_S: [0], T.IQ3_XXS: [0], T.IQ3_S: [0], T.IQ1_S: [0],
    T.IQ1_M: [],  # its f16 d is spread over the top nibbles of bytes 49, 51, 53 and 55
    T.IQ4_NL: [0], T.IQ4_XS: [0], T.TQ1_0: [52], T.TQ2_0: [64],
    T.MXFP4: [],  # byte 0 is an e8m0 exponent, kept moderate below
    T.NVFP4: [],  # e4m3 scales: every byte is finite
}

# Every type gguf-py can dequantise, plus F64 (gguf-py has no dequantiser for it: its reader
# hands out float64 arrays, and the reference is numpy's astype(float32)).
TYPES = [T.F32, T.F16, T.BF16, T.F64, *F16_FIELDS]


def random_raw(qtype: T, rows: int, cols: int) -> np.ndarray:
    """Random valid bytes for `rows` x `cols` values of `qtype`, as uint8 [rows, bytes_per_row]."""
    if qtype in (T.F32, T.F64):
        dtype = np.float32 if qtype == T.F32 else np.float64
        return rng.standard_normal((rows, cols)).astype(dtype).view(np.uint8)
    if qtype == T.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        f32 = rng.standard_normal((rows, cols)).astype(np.float32)
        return (f32.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        blocks[:, at:at + 2] = random_scales(len(blocks)).view(np.uint8).reshape(-1, 2)
    if qtype == T.IQ1_M:
        d = random_scales(len(blocks)).view(np.uint16)
        for i, at in enumerate([49, 51, 53, 55]):
            blocks[:, at] = (blocks[:, at] & 0x0F) | (((d >> (4 * i)) & 0x0F) << 4).astype(np.uint8)
    if qtype == T.MXFP4:
        blocks[:, 0] = rng.integers(110, 135, len(blocks), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def random_scales(n: int) -> np.ndarray:
    return (rng.standard_normal(n) * 0.02).astype(np.float16)


def gguf_py_dequantize(raw: np.ndarray, qtype: T, shape: tuple[int, int]) -> np.ndarray:
    if qtype == T.F64:
        return raw.view(np.float64).astype(np.float32).reshape(shape)
    if qtype == T.BF16:
        raw = raw.view(np.uint8)
    return dequantize(raw, qtype).reshape(shape).astype(np.float32)


def has_quantiser(qtype: T) -> bool:
    try:
        quantize(np.zeros((1, 256), dtype=np.float32), qtype)
        return True
    except NotImplementedError:
        return False


def make_quants() -> None:
    w = gguf.GGUFWriter(OUT / "quants.gguf", "scalpel-test")
    w.add_custom_alignment(64)
    # One key per metadata value type, plus arrays and a nested array.
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4_000_000_000)
    w.add_int32("test.i32", -2_000_000_000)
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float32("test.f32", 0.25)
    w.add_float64("test.f64", -1.0e300)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "héllo")
    w.add_array("test.arr_str", ["a", "bc"])
    w.add_array("test.nested", [[1, 2], [3]])

    refs = {}

    def add(name: str, qtype: T, raw: np.ndarray, shape: tuple[int, int]) -> None:
        w.add_tensor(name, raw, raw_dtype=None if qtype in (T.F32, T.F16, T.F64) else qtype)
        ref = gguf_py_dequantize(raw, qtype, shape)
        assert np.isfinite(ref).all(), name
        refs[name] = ref

    for qtype in TYPES:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        # A few blocks per row and two rows (more blocks for the small-block types).
        shape = (2, 64) if block == 1 else (4, 128) if block < 256 else (2, 512)
        raw = random_raw(qtype, *shape)
        if qtype in (T.F32, T.F16, T.F64):
            raw = raw.view({T.F32: np.float32, T.F16: np.float16, T.F64: np.float64}[qtype])
        add(qtype.name, qtype, raw, shape)
        # Where gguf-py can quantise, also what it makes of Gaussian weights.
        if block > 1 and has_quantiser(qtype):
            add(qtype.name + ".quantized", qtype, quantize(rng.standard_normal(shape).astype(np.float32) * 0.05, qtype), shape)
    write(w)
    save_file(refs, OUT / "quants.ref.safetensors")


# ---------------------------------------------------------------- (b) a tiny llama-arch model

HIDDEN, FFN, LAYERS, N_HEAD, N_KV = 32, 64, 2, 4, 2
HEAD_DIM = HIDDEN // N_HEAD


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def vocab() -> tuple[list[str], list[int], list[str]]:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "1 2", "l l", "o w"]
    tokens = specials + bytes_to_unicode() + [m.replace(" ", "") for m in merges] + ["<tool>"]
    types = [3] * len(specials) + [1] * (256 + len(merges)) + [4]
    return tokens, types, merges


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (q with n_head, k with n_head_kv)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored(hf: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray]:
    """(value the importer must return, array to hand the writer) for one HF-layout tensor."""
    if qtype == T.F32:
        return hf, hf
    if qtype == T.F16:
        h = hf.astype(np.float16)
        return h.astype(np.float32), h
    q = quantize(hf, qtype)
    # Quantisation blocks run along rows and the q/k permutation moves whole rows, so
    # dequantize(quantize(permute(w))) == permute(dequantize(quantize(w))): exact either way.
    return dequantize(q, qtype).reshape(hf.shape).astype(np.float32), q


def make_tiny_llama() -> None:
    # Its own seed, so that adding quantisation types does not change this model.
    global rng
    rng = np.random.default_rng(20240612)
    tokens, types, merges = vocab()
    w = gguf.GGUFWriter(OUT / "tiny_llama.gguf", "llama")
    w.add_name("tiny llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_file_type(7)  # MOSTLY_Q8_0
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    expected = {}

    def tensor(gguf_name: str, hf_name: str, hf: np.ndarray, qtype: T, n_perm: int = 0) -> None:
        value, raw = stored(hf, qtype)
        if n_perm:
            raw = permute(raw, n_perm)
        w.add_tensor(gguf_name, raw, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
        expected[hf_name] = value

    tensor("token_embd.weight", "model.embed_tokens.weight", rand(len(tokens), HIDDEN), T.Q8_0)
    # Types vary per layer so each of F32/F16/Q8_0 meets the q/k permutation.
    layer_types = [
        dict(q=T.F32, k=T.F16, v=T.Q8_0, o=T.F32, gate=T.Q8_0, up=T.F16, down=T.F32),
        dict(q=T.Q8_0, k=T.Q8_0, v=T.F16, o=T.Q8_0, gate=T.F16, up=T.F32, down=T.Q8_0),
    ]
    for i, ty in enumerate(layer_types):
        g, h = f"blk.{i}.", f"model.layers.{i}."
        tensor(g + "attn_norm.weight", h + "input_layernorm.weight", 1 + rand(HIDDEN), T.F32)
        tensor(g + "attn_q.weight", h + "self_attn.q_proj.weight", rand(N_HEAD * HEAD_DIM, HIDDEN), ty["q"], N_HEAD)
        tensor(g + "attn_q.bias", h + "self_attn.q_proj.bias", rand(N_HEAD * HEAD_DIM), T.F32, N_HEAD)
        tensor(g + "attn_k.weight", h + "self_attn.k_proj.weight", rand(N_KV * HEAD_DIM, HIDDEN), ty["k"], N_KV)
        tensor(g + "attn_k.bias", h + "self_attn.k_proj.bias", rand(N_KV * HEAD_DIM), T.F32, N_KV)
        tensor(g + "attn_v.weight", h + "self_attn.v_proj.weight", rand(N_KV * HEAD_DIM, HIDDEN), ty["v"])
        tensor(g + "attn_v.bias", h + "self_attn.v_proj.bias", rand(N_KV * HEAD_DIM), T.F32)
        tensor(g + "attn_output.weight", h + "self_attn.o_proj.weight", rand(HIDDEN, N_HEAD * HEAD_DIM), ty["o"])
        tensor(g + "attn_output.bias", h + "self_attn.o_proj.bias", rand(HIDDEN), T.F32)
        tensor(g + "ffn_norm.weight", h + "post_attention_layernorm.weight", 1 + rand(HIDDEN), T.F32)
        tensor(g + "ffn_gate.weight", h + "mlp.gate_proj.weight", rand(FFN, HIDDEN), ty["gate"])
        tensor(g + "ffn_up.weight", h + "mlp.up_proj.weight", rand(FFN, HIDDEN), ty["up"])
        tensor(g + "ffn_down.weight", h + "mlp.down_proj.weight", rand(HIDDEN, FFN), ty["down"])
    tensor("output_norm.weight", "model.norm.weight", 1 + rand(HIDDEN), T.F32)
    write(w)
    save_file(expected, OUT / "tiny_llama.hf.safetensors")


def write(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    make_quants()
    make_tiny_llama()
    for f in sorted(OUT.iterdir()):
        print(f"{f.stat().st_size:8d}  {f.relative_to(OUT.parents[2])}")
