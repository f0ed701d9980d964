"""Golden outputs of mergekit's `passthrough` merge (layer cut / stack / overlap) for the tiny checkpoints.

scalpel's layer surgery must give, tensor for tensor, what mergekit's passthrough merge gives for the
same layer ranges; these files let the Rust tests check that without Python.

Setup and run (from the repo root; needs tests/data/tiny-* from make_golden.py):
    tests/golden/setup_mergekit_env.sh   # setup_env.sh's venv + mergekit 0.1.5 (pinned deps)
    ~/.cache/scalpel/pyenv/bin/python tests/golden/make_mergekit.py

For each case NAME below this writes tests/data/mergekit/NAME/:
    case.json          {"model": "tiny-llama", "ranges": [[0, 2], [1, 4]]}  (half-open layer ranges, in order)
    config.json        as mergekit writes it (source config with the layer count replaced, re-saved by transformers)
    model.safetensors  as mergekit writes it (one shard; mergekit's default 5B shard size)
Only those files are kept: the YAML, README.md (model card) and mergekit_config.yml that mergekit
writes are dropped, and no tokenizer is copied (--no-copy-tokenizer).

mergekit runs through its own `mergekit-yaml` CLI on CPU, eager (non-lazy) loading, dtype float32.
Output is deterministic: rerunning gives the same bytes.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
OUT = DATA / "mergekit"

CASES = {
    "llama-cut": ("tiny-llama", [[0, 2]]),
    "llama-stack": ("tiny-llama", [[0, 4], [0, 4]]),
    "llama-overlap": ("tiny-llama", [[0, 3], [1, 4]]),
    "gpt2-cut": ("tiny-gpt2", [[0, 2]]),
    "gpt2-overlap": ("tiny-gpt2", [[0, 2], [1, 3]]),
}

# Files mergekit writes that we keep; anything else it writes is dropped.
KEEP = ("config.json", "model.safetensors")


def yaml_config(model_path, ranges):
    """A mergekit passthrough config: one slice per range, each with a single source."""
    lines = ["merge_method: passthrough", "dtype: float32", "slices:"]
    for lo, hi in ranges:
        lines += [
            "  - sources:",
            f"      - model: {model_path}",
            f"        layer_range: [{lo}, {hi}]",
        ]
    return "\n".join(lines) + "\n"


def mergekit_yaml_cli():
    exe = Path(sys.executable).parent / "mergekit-yaml"
    if not exe.exists():
        sys.exit(f"{exe} not found: run tests/golden/setup_mergekit_env.sh first")
    return str(exe)


def run_case(name, model, ranges, cli):
    model_path = DATA / model
    if not (model_path / "model.safetensors").exists():
        sys.exit(f"{model_path} missing: run tests/golden/make_golden.py first")
    dest = OUT / name
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = tmp / "merge.yml"
        cfg.write_text(yaml_config(model_path, ranges))
        out = tmp / "out"
        subprocess.run(
            [cli, str(cfg), str(out),
             "--device", "cpu", "--no-cuda", "--no-lazy-unpickle", "--no-read-to-gpu",
             "--no-copy-tokenizer", "--no-write-model-card", "--clone-tensors",
             "--no-async-write", "--quiet"],
            check=True,
        )
        written = sorted(p.name for p in out.iterdir())
        unexpected = [f for f in written if f not in KEEP]
        missing = [f for f in KEEP if f not in written]
        if missing:
            sys.exit(f"{name}: mergekit did not write {missing} (wrote {written})")
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for f in KEEP:
            shutil.copyfile(out / f, dest / f)
    (dest / "case.json").write_text(json.dumps({"model": model, "ranges": ranges}) + "\n")
    print(f"{name}: kept {list(KEEP)}" + (f", dropped {unexpected}" if unexpected else ""))


def main():
    import mergekit.merge  # noqa: F401  (fail early if the venv lacks mergekit)
    from importlib.metadata import version

    print("mergekit", version("mergekit"), "torch", version("torch"),
          "transformers", version("transformers"), "safetensors", version("safetensors"))
    cli = mergekit_yaml_cli()
    for name, (model, ranges) in CASES.items():
        run_case(name, model, ranges, cli)


if __name__ == "__main__":
    main()
