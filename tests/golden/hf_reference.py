"""What transformers says about an HF model folder that the real-model tests (tests/e2e/qwen25.rs,
tests/e2e/gemma3.rs) check: the folder scalpel imported, or one it cut.

Run (the pyenv of tests/golden/setup_env.sh: torch 2.11, transformers 5.24):
    scalpel import ~/.cache/scalpel/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf /tmp/qwen25-f32
    ~/.cache/scalpel/pyenv/bin/python tests/golden/hf_reference.py /tmp/qwen25-f32
    ~/.cache/scalpel/pyenv/bin/python tests/golden/hf_reference.py /tmp/gemma3-f32 --bos

The import's dequantisation is checked bit for bit against gguf-py elsewhere (make_gguf_fixtures.py),
so this loads the folder with `from_pretrained` (float32), with the tokenizer.json in it, and prints:
- the mean NLL over the first two windows of 128 tokens of the first 8 KB of the Brown corpus, the
  windows `scalpel eval --tokens 128 --windows 2` takes; with --bos each window is BOS + 127 text
  tokens and the BOS is context only, as `eval --bos` does it;
- the greedy continuation of "The capital of France is" (12 tokens), the prompt encoded as the
  tokenizer encodes it by itself (Gemma's puts BOS first).
Results (2026-11-30):
- Qwen2.5-Coder-0.5B-Instruct: mean NLL 4.702059679840983 over 254 predicted tokens;
  " Paris. Paris is located in the northwestern part of France".
- Gemma 3 270M, --bos: mean NLL 3.591555186128172 over 252 predicted tokens (transformers' own GGUF
  loading gives the same: gemma3_reference.py); " the capital of the country of France. It is the largest".
"""

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

model_dir, bos = sys.argv[1], "--bos" in sys.argv[2:]
tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
brown = Path.home() / ".cache" / "scalpel" / "brown.txt"
ids = tok.encode(brown.read_text()[:8192], add_special_tokens=False).ids
prompt = tok.encode("The capital of France is").ids
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
bos_id = [tok.token_to_id(json.loads((Path(model_dir) / "tokenizer_config.json").read_text())["bos_token"])] if bos else []

T, WINDOWS = 128, 2
body, first = T - bos, int(bos)
nll, n = 0.0, 0
with torch.no_grad():
    for w in range(WINDOWS):
        x = torch.tensor([bos_id + ids[w * body:(w + 1) * body]])
        logp = model(x).logits[0].double()[first:-1].log_softmax(-1)
        nll -= logp.gather(1, x[0, first + 1:, None]).sum().item()
        n += T - 1 - first
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
print(json.dumps({"mean_nll": nll / n, "tokens": n, "greedy": tok.decode(out[0, len(prompt):].tolist())}))
