"""Layer surgery at disk speed: `scalpel apply` against mergekit 0.1.5's passthrough merge and a byte-copy floor.

Four cases (synthetic models with real shapes, made by scripts/make_synthetic_model.py on first use):
  GPT-2-medium shape, f32, one file: cut [0,12); stacked [0,12) twice
  0.85 B Llama shape (TinyLlama's widths, 16 layers), bf16, two shards: duplicate [0,16)+[8,16); cut [0,8)
scalpel runs the `slices` strategy (mergekit's passthrough ranges); mergekit runs `mergekit-yaml` with the
same ranges. The floor copies scalpel's own output folder with `cp -r`: the same bytes, written by the
fastest tool there is. Each timing includes fsync of every output file (scalpel fsyncs already; the
others get it afterwards). The three are interleaved within each repetition, so a noisy neighbour
slows all of them alike; the table gives the median of --runs repetitions and the ratios.

    python scripts/bench_surgery.py [--mergekit VENV/bin/mergekit-yaml] [--runs 3] [--append]

Needs a release build (target/release/scalpel) and a venv with mergekit 0.1.5 (see --mergekit).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODELS = {
    "gpt2-medium-f32": ["--family", "gpt2", "--dtype", "f32", "--layers", "24", "--d-model", "1024", "--heads", "16",
                        "--ff", "4096", "--vocab", "50257", "--context", "1024"],
    "llama-0.85b-bf16": ["--family", "llama", "--dtype", "bf16", "--layers", "16", "--d-model", "2048", "--heads", "32",
                         "--kv-heads", "4", "--ff", "5632", "--vocab", "32000", "--context", "2048", "--shard-bytes", "1000000000"],
}

CASES = [
    ("GPT-2-medium shape f32, cut [0,12)", "gpt2-medium-f32", [[0, 12]]),
    ("same, stacked [0,12) twice", "gpt2-medium-f32", [[0, 12], [0, 12]]),
    ("0.85B Llama shape bf16, sharded, duplicate [0,16)+[8,16)", "llama-0.85b-bf16", [[0, 16], [8, 16]]),
    ("same, cut [0,8)", "llama-0.85b-bf16", [[0, 8]]),
]

MARKER = "<!-- surgery rows -->"


def fsync_tree(path):
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def timed(cmd, out, keep=False):
    """Seconds from start to every output file on disk. `out` is removed before, and after unless `keep`."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{r.stderr}")
    fsync_tree(out)
    seconds = time.perf_counter() - start
    if not keep:
        shutil.rmtree(out)
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-surgery")
    ap.add_argument("--mergekit", type=Path, default=Path(os.environ.get("MERGEKIT_YAML", "/work/wt/mk-venv/bin/mergekit-yaml")),
                    help="mergekit 0.1.5's mergekit-yaml (pip install mergekit==0.1.5 into a venv with torch)")
    ap.add_argument("--python", default=os.environ.get("SCALPEL_PYTHON", str(Path.home() / ".cache/scalpel/pyenv/bin/python")),
                    help="a Python with torch, to make the synthetic models")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--append", action="store_true", help="add the rows to BENCHMARKS.md above its surgery marker")
    ap.add_argument("--clean", action="store_true", help="remove the work folder (the synthetic models) at the end")
    a = ap.parse_args()
    scalpel = REPO / "target/release/scalpel"
    for exe in (scalpel, a.mergekit):
        if not exe.exists():
            sys.exit(f"{exe} not found")
    a.work.mkdir(parents=True, exist_ok=True)
    for name, args in MODELS.items():
        model = a.work / name
        if not (model / "config.json").exists():
            subprocess.run([a.python, REPO / "scripts/make_synthetic_model.py", model, *args], check=True)

    rows = []
    for label, name, ranges in CASES:
        model = a.work / name
        dtype = "float32" if "f32" in name else "bfloat16"
        slices = "".join(f"  - sources:\n      - model: {model}\n        layer_range: [{lo}, {hi}]\n" for lo, hi in ranges)
        yml = a.work / "mergekit.yml"
        yml.write_text(f"merge_method: passthrough\ndtype: {dtype}\nslices:\n{slices}")
        sets = "ranges=[" + ",".join(f"[{lo},{hi}]" for lo, hi in ranges) + "]"
        out = {t: a.work / f"out-{t}" for t in ("scalpel", "mergekit", "floor")}
        reference = a.work / "reference"
        commands = {
            "scalpel": [scalpel, "apply", model, "-s", "slices", "--set", sets, "-o", out["scalpel"]],
            "mergekit": [a.mergekit, yml, out["mergekit"], "--no-copy-tokenizer"],
            "floor": ["cp", "-r", reference, out["floor"]],
        }
        # Warm-up: the inputs in the page cache, and the floor's source (scalpel's own output folder).
        timed(commands["scalpel"], out["scalpel"], keep=True)
        shutil.rmtree(reference, ignore_errors=True)
        shutil.move(out["scalpel"] / "model", reference)
        times = {t: [] for t in commands}
        for run in range(a.runs):
            for tool, cmd in commands.items():
                times[tool].append(timed(cmd, out[tool]))
            print(f"{label}, run {run + 1}: " + ", ".join(f"{t} {v[-1]:.2f} s" for t, v in times.items()), flush=True)
        med = {t: statistics.median(v) for t, v in times.items()}
        written = sum(f.stat().st_size for f in reference.rglob("*") if f.is_file())
        rows.append(
            f"| {time.strftime('%Y-%m-%d')} | {machine()} | {label} | {written / 1e9:.2f} | {med['scalpel']:.2f} | {med['mergekit']:.2f} | {med['floor']:.2f} "
            f"| **{med['scalpel'] / med['floor']:.2f}** | {med['mergekit'] / med['scalpel']:.1f}x |"
        )
        for path in (*out.values(), reference):
            shutil.rmtree(path, ignore_errors=True)

    print(f"median of {a.runs}")
    print("| date | machine | case | GB written | scalpel (s) | mergekit (s) | floor (s) | scalpel / floor | mergekit / scalpel |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if a.append:
        bench = REPO / "BENCHMARKS.md"
        text = bench.read_text()
        if MARKER not in text:
            sys.exit(f"BENCHMARKS.md has no `{MARKER}` line under its surgery table")
        bench.write_text(text.replace(MARKER, "\n".join([*rows, MARKER])))
    if a.clean:
        shutil.rmtree(a.work, ignore_errors=True)


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
    return f"{cpu}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
