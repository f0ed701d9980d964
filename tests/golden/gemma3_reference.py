"""What transformers says about the Gemma 3 270M GGUF that tests/e2e/gemma3.rs checks.

Run (the pyenv of tests/golden/setup_env.sh: torch 2.11, transformers 5.24, which reads GGUF itself):
    scalpel import ~/.cache/scalpel/gemma-3-270m.Q4_K_M.gguf /tmp/gemma3-f32
    ~/.cache/scalpel/pyenv/bin/python tests/golden/gemma3_reference.py ~/.cache/scalpel/gemma-3-270m.Q4_K_M.gguf /tmp/gemma3-f32

The reference is transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`: its dequantiser,
its Gemma config, its norm offset, its GemmaTokenizer rebuilt from the file), not scalpel's import. It
prints, and checks against scalpel's imported folder:
- every weight of the import equals transformers' (max abs difference);
- scalpel's tokenizer.json gives transformers' token ids on the Brown text and the prompt;
- the mean NLL over the first two windows of 128 tokens of the first 8 KB of the Brown corpus, each
  window BOS + 127 text tokens, BOS context only: the windows `scalpel eval --bos --tokens 128 --windows 2` takes;
- the greedy continuation of "The capital of France is" (BOS first, as the tokenizer adds it; 12 tokens).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, imported = Path(sys.argv[1]).expanduser(), Path(sys.argv[2])
torch.set_num_threads(2)
ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()

ours = load_file(imported / "model.safetensors")
theirs = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
assert set(ours) == set(theirs), (set(ours) ^ set(theirs))
weight_diff = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)

brown = (Path.home() / ".cache" / "scalpel" / "brown.txt").read_text()[:8192]
prompt = "The capital of France is"
our_tok = Tokenizer.from_file(str(imported / "tokenizer.json"))
ids = ref_tok(brown, add_special_tokens=False).input_ids
same_ids = our_tok.encode(brown, add_special_tokens=False).ids == ids
prompt_ids = ref_tok(prompt).input_ids
same_prompt = our_tok.encode(prompt).ids == prompt_ids

T, WINDOWS, BOS = 128, 2, ref_tok.bos_token_id
nll, n = 0.0, 0
with torch.no_grad():
    for w in range(WINDOWS):
        x = torch.tensor([[BOS] + ids[w * (T - 1):(w + 1) * (T - 1)]])
        logp = model(x).logits[0].double()[1:-1].log_softmax(-1)
        nll -= logp.gather(1, x[0, 2:, None]).sum().item()
        n += T - 2
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False)
print(json.dumps({
    "max_weight_diff": weight_diff, "same_text_ids": same_ids, "same_prompt_ids": same_prompt, "prompt_ids": prompt_ids,
    "mean_nll": nll / n, "tokens": n, "greedy": ref_tok.decode(out[0, len(prompt_ids):].tolist()),
}))
