"""Generate tiny random HF checkpoints and transformers' own outputs as golden files.

Setup and run (from the repo root):
    tests/golden/setup_env.sh            # venv at ~/.cache/scalpel/pyenv: torch 2.11.0, transformers 5.24.0
    ~/.cache/scalpel/pyenv/bin/python tests/golden/make_golden.py [NAME ...]   # default: every model

For each model NAME this writes tests/data/NAME/:
    config.json, model.safetensors, generation_config.json   -- model.save_pretrained(), float32
    golden.safetensors, with (B=2, T=17, L layers, H heads, d hidden size):
        input_ids  int64   [B, T]         fixed random tokens
        logits     float32 [B, T, vocab]
        attn.{i}   float32 [B, H, T, T]   post-softmax attention probabilities of layer i (eager attention)
        hidden.{i} float32 [B, T, d]      i < L: the hidden state entering decoder block i
                                          (hidden.0 = embeddings; for GPT-2 that is wte + wpe)
                                          i = L: the output of the last block, BEFORE the final norm
Everything is seeded, so reruns give the same bytes.
"""

import shutil
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

DATA = Path(__file__).resolve().parents[1] / "data"
BATCH, SEQ = 2, 17
NOISE_STD = 0.02

CONFIGS = {
    "tiny-gpt2": lambda: GPT2Config(
        vocab_size=101, n_positions=64, n_embd=32, n_layer=3, n_head=4,
        scale_attn_by_inverse_layer_idx=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=100, eos_token_id=100),
    "tiny-llama": lambda: LlamaConfig(
        vocab_size=103, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    "tiny-llama-tied": lambda: LlamaConfig(
        vocab_size=103, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, attention_bias=True,
        # head_dim 8 gives RoPE wavelengths 6.3, 112, 1987, 35333; original_max_position_embeddings=256
        # puts them in all three llama3 regimes: < 256/4 kept, in [64, 256] smoothed, > 256 divided by 8.
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    "tiny-qwen2": lambda: Qwen2Config(
        vocab_size=107, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    # head_dim 16 with 4 heads over d_model 48: q/k/v/o are not square, so head_dim must come from the
    # config. Blocks from 1 on slide over 8 keys (SEQ 17: the window bites), giving mixed layer_types.
    "tiny-qwen3": lambda: Qwen3Config(
        vocab_size=109, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=8, max_window_layers=1),
    # Gemma 3 text: sliding blocks (window 6 < SEQ, so it bites) alternate with global ones, whose RoPE
    # has another base and a linear scaling; query_pre_attn_scalar differs from head_dim so the scale
    # must come from it; the logits are softcapped (Gemma 3 itself has no cap, Gemma 2 had one).
    "tiny-gemma3": lambda: Gemma3TextConfig(
        vocab_size=113, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24,
        max_position_embeddings=128, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        final_logit_softcapping=5.0),
}


def make_model(kind):
    """Random init (seed 0), then N(0, 0.02) noise on every parameter so no weight is trivially 0 or 1."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():  # tied weights appear once here, so get noise once
            p.add_(torch.randn_like(p) * NOISE_STD)
    return model.float().eval()


def blocks_and_final_norm(model):
    base = model.base_model
    if hasattr(base, "h"):  # GPT-2
        return base.h, base.ln_f
    return base.layers, base.norm  # Llama, Qwen2


def input_ids_for(model):
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=g)


@torch.no_grad()
def golden(model, ids):
    blocks, final_norm = blocks_and_final_norm(model)
    hidden = {}

    def grab_input(i):
        def hook(_module, args, kwargs):
            hidden[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def grab_output(_module, _args, out):
        hidden[len(blocks)] = out[0] if isinstance(out, tuple) else out

    handles = [b.register_forward_pre_hook(grab_input(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(grab_output))
    out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    for h in handles:
        h.remove()

    L = len(blocks)
    # Cross-check the hooks against transformers' own output_hidden_states, whose last
    # entry has the final norm applied.
    for i in range(L):
        torch.testing.assert_close(hidden[i], out.hidden_states[i], rtol=0, atol=0)
    torch.testing.assert_close(final_norm(hidden[L]), out.hidden_states[L])
    assert len(out.attentions) == L

    g = {"input_ids": ids, "logits": out.logits}
    g.update({f"attn.{i}": a for i, a in enumerate(out.attentions)})
    g.update({f"hidden.{i}": hidden[i] for i in range(L + 1)})
    return {k: v.contiguous() for k, v in g.items()}


def write(kind):
    out_dir = DATA / kind
    shutil.rmtree(out_dir, ignore_errors=True)
    model = make_model(kind)
    model.save_pretrained(out_dir)
    g = golden(model, input_ids_for(model))
    assert all(v.dtype == torch.float32 for k, v in g.items() if k != "input_ids")
    save_file(g, out_dir / "golden.safetensors",
              metadata={"made_by": f"torch {torch.__version__}, transformers {transformers.__version__}"})

    # The saved checkpoint alone must reproduce the logits.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=g["input_ids"]).logits, g["logits"], rtol=0, atol=0)
    print(f"{kind}: {sum(f.stat().st_size for f in out_dir.iterdir()) // 1024} KiB")


if __name__ == "__main__":
    transformers.utils.logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    names = sys.argv[1:] or list(CONFIGS)
    for kind in names:
        write(kind)
