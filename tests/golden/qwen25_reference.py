"""What transformers says about the Qwen2.5-Coder-0.5B-Instruct GGUF that tests/e2e/qwen25.rs checks.

Run (the pyenv of tests/golden/setup_env.sh: torch 2.11, transformers 5.24):
    scalpel import ~/.cache/scalpel/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf /tmp/qwen25-f32
    ~/.cache/scalpel/pyenv/bin/python tests/golden/qwen25_reference.py /tmp/qwen25-f32

The import's dequantisation is checked bit for bit against gguf-py elsewhere (make_gguf_fixtures.py),
so this loads the imported f32 folder, with the tokenizer.json the import wrote, and prints:
- the mean NLL over the first two windows of 128 tokens of the first 8 KB of the Brown corpus
  (no BOS), the windows `scalpel eval --tokens 128 --windows 2` takes;
- the greedy continuation of "The capital of France is" (12 tokens).
Result (2026-11-30): mean NLL 4.702059679840983 over 254 predicted tokens;
" Paris. Paris is located in the northwestern part of France".
"""

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

model_dir = sys.argv[1]
tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
brown = Path.home() / ".cache" / "scalpel" / "brown.txt"
ids = tok.encode(brown.read_text()[:8192], add_special_tokens=False).ids
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

T, WINDOWS = 128, 2
nll, n = 0.0, 0
with torch.no_grad():
    for w in range(WINDOWS):
        x = torch.tensor([ids[w * T:(w + 1) * T]])
        logp = model(x).logits[0].double()[:-1].log_softmax(-1)
        nll -= logp.gather(1, x[0, 1:, None]).sum().item()
        n += T - 1
    prompt = torch.tensor([tok.encode("The capital of France is", add_special_tokens=False).ids])
    out = model.generate(prompt, max_new_tokens=12, do_sample=False)
print(json.dumps({"mean_nll": nll / n, "tokens": n, "greedy": tok.decode(out[0, prompt.shape[1]:].tolist())}))
