"""Seed inputs for the fuzz targets that the repo does not already hold: a one-layer Llama small enough
to mutate quickly (safetensors), the same model in shards (shard_index), and .npy token-id files.
Run with the golden-test Python (tests/golden/setup_env.sh): python make_seeds.py"""
import json, os, shutil
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

here = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(0)


def model(layers):
    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=16, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


# safetensors: the fixed config.json beside the fuzzed model.safetensors, and that file as the seed.
tiny = fresh(os.path.join(here, "fixtures", "tiny-llama"))
model(1).save_pretrained(tiny)
corpus = fresh(os.path.join(here, "corpus", "safetensors"))
shutil.move(os.path.join(tiny, "model.safetensors"), os.path.join(corpus, "tiny-llama.safetensors"))
os.remove(os.path.join(tiny, "generation_config.json"))

# shard_index: two layers in shards of about 2 KB; the index is the fuzzed file.
sharded = fresh(os.path.join(here, "fixtures", "tiny-llama-sharded"))
model(2).save_pretrained(sharded, max_shard_size="2KB")
os.remove(os.path.join(sharded, "generation_config.json"))
corpus = fresh(os.path.join(here, "corpus", "shard_index"))
shutil.move(os.path.join(sharded, "model.safetensors.index.json"), os.path.join(corpus, "index.json"))

# npy: token ids as NumPy writes them, in every integer width the reader takes, one in format 2.0.
corpus = fresh(os.path.join(here, "corpus", "npy"))
ids = np.arange(12).reshape(3, 4)
for dtype in ["<i8", "<i4", "<u2", "|u1", "|i1"]:
    np.save(os.path.join(corpus, f"ids-{dtype[1:]}.npy"), ids.astype(dtype))
with open(os.path.join(corpus, "ids-v2.npy"), "wb") as f:
    np.lib.format.write_array(f, ids, version=(2, 0))
