"""Round trip: the HF folders scalpel writes load in HF transformers unchanged and compute what they should.

Run from the repo root (needs the venv of setup_env.sh and the tiny-* checkpoints of make_golden.py):
    ~/.cache/scalpel/pyenv/bin/python tests/golden/roundtrip.py [path/to/scalpel]   # default target/release/scalpel

In a temp dir, scalpel `apply` writes a few cutoff / stack / duplicate / slices results; each is loaded with
`AutoModelForCausalLM.from_pretrained(out/"model")` (eager attention, float32 unless the case says otherwise),
must load with no missing / unexpected / mismatched keys and no warning from transformers, and its logits
(on the source model's golden `input_ids`) are compared with a reference. Prints a table and writes it to
tests/data/roundtrip.json; exits 1 if any check fails.
"""

import copy
import json
import logging
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
OUT_JSON = DATA / "roundtrip.json"


# ---------------------------------------------------------------- helpers

class Fail(Exception):
    pass


class Case:
    """Collects the checks of one case: (check, max_abs_diff or None, ok, note)."""

    def __init__(self, name):
        self.name = name
        self.checks = []

        self.main = None  # index of the case's headline check

    def check(self, what, ok, diff=None, note="", main=False):
        """ok=None: informational row, never a failure."""
        if main:
            self.main = len(self.checks)
        self.checks.append({"check": what, "max_abs_diff": diff, "ok": None if ok is None else bool(ok), "note": note})
        return ok

    def close(self, what, got, want, tol, main=False):
        diff = max_abs_diff(got, want)
        return self.check(f"{what} (tol {tol:g})", diff <= tol, diff, main=main)


def max_abs_diff(a, b):
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        raise Fail(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return (a - b).abs().max().item()


def run_scalpel(binary, tmp, case, model, strategy, sets, dtype=None):
    out = Path(tmp) / case
    cmd = [str(binary), "apply", str(DATA / model), "-s", strategy]
    for s in sets:
        cmd += ["--set", s]
    if dtype:
        cmd += ["--dtype", dtype]
    cmd += ["-o", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise Fail(f"scalpel failed (rc {p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    if not (out / "model" / "config.json").is_file():
        raise Fail(f"no {out / 'model' / 'config.json'}")
    return out / "model"


class CaptureLogs(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def load(path, case, dtype=torch.float32):
    """from_pretrained with transformers' log captured; records a check that nothing was reported."""
    handler = CaptureLogs()
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(handler)
    old_level = tf_logger.level
    tf_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation="eager", output_loading_info=True)
    finally:
        tf_logger.removeHandler(handler)
        tf_logger.setLevel(old_level)
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    msgs = handler.records + [f"{w.category.__name__}: {w.message}" for w in caught]
    keyish = [m for m in msgs if any(s in m.lower() for s in ("missing", "unexpected", "mismatch", "load report",
                                                                "newly initialized", "not used", "not initialized"))]
    note = "; ".join([f"{k}={v}" for k, v in problems.items()] + msgs)[:2000]
    case.check("loads: no missing/unexpected/mismatched keys, no warnings",
               not problems and not keyish and not msgs, note=note)
    return model.eval()


def golden(model_name):
    return load_file(DATA / model_name / "golden.safetensors")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def decoder_blocks(model):
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


def n_layers_check(case, model, want):
    got_cfg = model.config.num_hidden_layers
    got_mod = len(decoder_blocks(model))
    case.check(f"{want} layers (config {got_cfg}, modules {got_mod})", got_cfg == want and got_mod == want)


def safetensors_dtypes(folder):
    dts = set()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                dts.add(str(sf.get_slice(k).get_dtype()))
    return dts


# ---------------------------------------------------------------- the cases

def case_identity_llama(c, binary, tmp):
    out = run_scalpel(binary, tmp, c.name, "tiny-llama", "cutoff", ["keep=4"])
    g = golden("tiny-llama")
    m = load(out, c)
    n_layers_check(c, m, 4)
    c.close("logits == golden logits", logits(m, g["input_ids"]), g["logits"], 1e-5, main=True)


def case_bf16_llama(c, binary, tmp):
    out = run_scalpel(binary, tmp, c.name, "tiny-llama", "cutoff", ["keep=4"], dtype="bf16")
    cfg = json.loads((out / "config.json").read_text())
    cfg_dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    st = safetensors_dtypes(out)
    c.check(f"config dtype {cfg_dtype!r}, safetensors {sorted(st)}", cfg_dtype == "bfloat16" and st == {"BF16"})
    g = golden("tiny-llama")
    m = load(out, c, dtype="auto")  # as the config says
    pd = {p.dtype for p in m.parameters()}
    c.check(f"dtype='auto' loads as {sorted(map(str, pd))}", pd == {torch.bfloat16})
    fp32 = AutoModelForCausalLM.from_pretrained(DATA / "tiny-llama", dtype=torch.float32,
                                                attn_implementation="eager").eval()
    naive = copy.deepcopy(fp32).to(torch.bfloat16)
    # `.to(bfloat16)` also casts the non-persistent RoPE buffers (rotary_emb.inv_freq, original_inv_freq),
    # which transformers itself keeps in float32 when it loads a bf16 checkpoint (it computes them at init,
    # they are not in the file). Restore them so the reference differs from a bf16 load only in the weights.
    ref = copy.deepcopy(naive)
    for name, buf in fp32.named_buffers():
        mod_name, _, leaf = name.rpartition(".")
        ref.get_submodule(mod_name)._buffers[leaf] = buf.clone()
    ref_loaded = AutoModelForCausalLM.from_pretrained(DATA / "tiny-llama", dtype=torch.bfloat16,
                                                      attn_implementation="eager").eval()
    bufs = {k: str(v.dtype) for k, v in m.named_buffers()}
    c.check(f"loaded model keeps RoPE buffers in float32: {bufs}",
            all(v.dtype == torch.float32 for v in m.buffers()))
    # same tensors bit for bit?
    sd_m, sd_r = m.state_dict(), ref.state_dict()
    wdiff = max((max_abs_diff(sd_m[k], sd_r[k]) for k in sd_r), default=0.0)
    c.check("weights == original .to(bfloat16) (bit-exact)", set(sd_m) == set(sd_r) and wdiff == 0.0, wdiff)
    ids = g["input_ids"]
    got = logits(m, ids)
    c.close("logits == original.to(bfloat16) logits, RoPE buffers kept float32", got, logits(ref, ids), 1e-3,
            main=True)
    c.close("logits == from_pretrained(original, dtype=bfloat16) logits", got, logits(ref_loaded, ids), 1e-3)
    c.check("info: vs plain original.to(bfloat16), which also rounds RoPE inv_freq to bf16",
            None, max_abs_diff(got, logits(naive, ids)))
    c.check("info: vs float32 golden logits (bf16 rounding)", None, max_abs_diff(got, g["logits"]))


def case_llama_pro_llama(c, binary, tmp):
    out = run_scalpel(binary, tmp, c.name, "tiny-llama", "duplicate", ["layers=[1,3]", "zero_copies=true"])
    g = golden("tiny-llama")
    m = load(out, c)
    n_layers_check(c, m, 6)
    c.close("logits == original golden logits", logits(m, g["input_ids"]), g["logits"], 1e-4, main=True)


def case_llama_pro_gpt2(c, binary, tmp):
    out = run_scalpel(binary, tmp, c.name, "tiny-gpt2", "duplicate", ["layers=[0]", "zero_copies=true"])
    g = golden("tiny-gpt2")
    m = load(out, c)
    n_layers_check(c, m, 4)
    c.check("config scale_attn_by_inverse_layer_idx still true", m.config.scale_attn_by_inverse_layer_idx)
    c.close("logits == original golden logits", logits(m, g["input_ids"]), g["logits"], 1e-4, main=True)
    # control: undo the query rescale of the moved blocks (old 1 -> 2, old 2 -> 3); the check must then fail
    raw = copy.deepcopy(m)
    n = m.config.n_embd
    with torch.no_grad():
        for new, old in [(2, 1), (3, 2)]:
            attn = raw.transformer.h[new].attn.c_attn
            attn.weight[:, :n] *= (old + 1) / (new + 1)
            attn.bias[:n] *= (old + 1) / (new + 1)
    d = max_abs_diff(logits(raw, g["input_ids"]), g["logits"])
    c.check("control: without the query rescale logits differ (> 1e-4 = tol)", d > 1e-4, d)


def case_llama_pro_qwen2(c, binary, tmp):
    out = run_scalpel(binary, tmp, c.name, "tiny-qwen2", "duplicate", ["layers=[2]", "zero_copies=true"])
    g = golden("tiny-qwen2")
    m = load(out, c)
    n_layers_check(c, m, 4)
    c.close("logits == original golden logits", logits(m, g["input_ids"]), g["logits"], 1e-4, main=True)


def case_stack_llama_tied(c, binary, tmp):
    out = run_scalpel(binary, tmp, c.name, "tiny-llama-tied", "stack", ["times=2"])
    g = golden("tiny-llama-tied")
    m = load(out, c)
    n_layers_check(c, m, 6)
    head, emb = m.lm_head.weight, m.model.embed_tokens.weight
    c.check(f"tied head: config tie_word_embeddings={m.config.tie_word_embeddings}, "
            f"lm_head shares storage with embed_tokens={head.data_ptr() == emb.data_ptr()}",
            m.config.tie_word_embeddings and head.data_ptr() == emb.data_ptr() and torch.equal(head, emb))
    src = load_file(DATA / "tiny-llama-tied" / "model.safetensors")
    c.close("embed_tokens == source embed_tokens", emb, src["model.embed_tokens.weight"], 0.0)
    lg = logits(m, g["input_ids"])
    print(f"[{c.name}] logits shape {tuple(lg.shape)}, [0, -1, :6] = {lg[0, -1, :6].tolist()}")
    c.check(f"logits finite (no reference); |logits| max {lg.abs().max().item():.4g}, mean {lg.mean().item():.4g}",
            bool(torch.isfinite(lg).all()), main=True)


def case_cut_gpt2(c, binary, tmp):
    out = run_scalpel(binary, tmp, c.name, "tiny-gpt2", "cutoff", ["keep=2"])
    g = golden("tiny-gpt2")
    m = load(out, c)
    n_layers_check(c, m, 2)
    ref = AutoModelForCausalLM.from_pretrained(DATA / "tiny-gpt2", dtype=torch.float32,
                                               attn_implementation="eager").eval()
    ref.transformer.h = ref.transformer.h[:2]
    ref.config.n_layer = 2
    c.close("logits == original with h[:2] (Python-built)", logits(m, g["input_ids"]), logits(ref, g["input_ids"]), 1e-5, main=True)


def case_slices_gpt2_moved(c, binary, tmp):
    out = run_scalpel(binary, tmp, c.name, "tiny-gpt2", "slices", ["ranges=[[1,3]]"])
    g = golden("tiny-gpt2")
    ids = g["input_ids"]
    m = load(out, c)
    n_layers_check(c, m, 2)
    orig = AutoModelForCausalLM.from_pretrained(DATA / "tiny-gpt2", dtype=torch.float32,
                                                attn_implementation="eager").eval()

    def out_of(o):
        return o[0] if isinstance(o, tuple) else o

    # original: the input and output of block 1 and the output of block 2
    seen = {}
    hs = [orig.transformer.h[1].register_forward_pre_hook(
              lambda mod, a, kw: seen.__setitem__("in1", a[0] if a else kw["hidden_states"]), with_kwargs=True),
          orig.transformer.h[1].register_forward_hook(lambda mod, a, o: seen.__setitem__("out1", out_of(o))),
          orig.transformer.h[2].register_forward_hook(lambda mod, a, o: seen.__setitem__("out2", out_of(o)))]
    with torch.no_grad():
        orig(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    # the hooks see what make_golden recorded
    c.close("hook sanity: original block 1 input == golden hidden.1", seen["in1"], g["hidden.1"], 1e-6)  # float noise of the thread count only

    # new model: block 0 fed the original block 1's input (pre-hook swaps it in), outputs of blocks 0 and 1
    got, block_args = {}, {}

    def swap_in(mod, a, kw):
        block_args["a"], block_args["kw"] = a, kw
        if a:
            return (seen["in1"],) + tuple(a[1:]), kw
        kw = dict(kw)
        kw["hidden_states"] = seen["in1"]
        return a, kw

    hs = [m.transformer.h[0].register_forward_pre_hook(swap_in, with_kwargs=True),
          m.transformer.h[0].register_forward_hook(lambda mod, a, o: got.__setitem__("out0", out_of(o))),
          m.transformer.h[1].register_forward_hook(lambda mod, a, o: got.__setitem__("out1", out_of(o)))]
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    c.check(f"new block 0 attn.layer_idx={m.transformer.h[0].attn.layer_idx}, "
            f"scaling={m.transformer.h[0].attn.scaling:.6g} (original block 1: {orig.transformer.h[1].attn.scaling:.6g})",
            m.transformer.h[0].attn.layer_idx == 0)
    c.close("new block 0 (orig block 1 input) == original block 1 output", got["out0"], seen["out1"], 1e-5, main=True)
    c.close("new block 1 (chained) == original block 2 output", got["out1"], seen["out2"], 1e-5)

    # control: the same block without the query rescale at index 0 must NOT match (the check can fail)
    raw = copy.deepcopy(m.transformer.h[0])
    raw.load_state_dict(orig.transformer.h[1].state_dict())
    with torch.no_grad():
        a = (seen["in1"],) + tuple(block_args["a"][1:]) if block_args["a"] else ()
        kw = dict(block_args["kw"])
        if not block_args["a"]:
            kw["hidden_states"] = seen["in1"]
        raw_out = out_of(raw(*a, **kw))
    d = max_abs_diff(raw_out, seen["out1"])
    c.check("control: unrescaled block 1 weights at index 0 differ (> 1e-4 = 10x tol)", d > 1e-4, d)

    # what scalpel changed: the query third of c_attn scaled by (0+1)/(1+1), the rest copied
    sd_new = load_file(out / "model.safetensors")
    src = load_file(DATA / "tiny-gpt2" / "model.safetensors")
    n = m.config.n_embd
    w_new, w_src = sd_new["transformer.h.0.attn.c_attn.weight"], src["transformer.h.1.attn.c_attn.weight"]
    b_new, b_src = sd_new["transformer.h.0.attn.c_attn.bias"], src["transformer.h.1.attn.c_attn.bias"]
    dq = max(max_abs_diff(w_new[:, :n], w_src[:, :n] * 0.5), max_abs_diff(b_new[:n], b_src[:n] * 0.5))
    dkv = max(max_abs_diff(w_new[:, n:], w_src[:, n:]), max_abs_diff(b_new[n:], b_src[n:]))
    c.check("weights: h.0 c_attn query third == source h.1 * 1/2, k/v thirds copied", dq <= 1e-7 and dkv == 0.0,
            max(dq, dkv))


def truncated_or_reordered(name, order):
    """transformers' own model `name` with its decoder blocks taken in `order`, as a layer map would take
    them; each block module keeps the attention type (full or sliding) it was built with."""
    ref = AutoModelForCausalLM.from_pretrained(DATA / name, dtype=torch.float32, attn_implementation="eager").eval()
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in order])
    ref.config.num_hidden_layers = len(order)
    if getattr(ref.config, "layer_types", None):
        ref.config.layer_types = [ref.config.layer_types[i] for i in order]
    return ref


def case_cut_family(c, binary, tmp, name, keep):
    out = run_scalpel(binary, tmp, c.name, name, "cutoff", [f"keep={keep}"])
    g = golden(name)
    m = load(out, c)
    n_layers_check(c, m, keep)
    ref = truncated_or_reordered(name, range(keep))
    c.check(f"layer_types {m.config.layer_types} == the source's first {keep}", m.config.layer_types == ref.config.layer_types)
    c.close(f"logits == original with layers[:{keep}] (Python-built)", logits(m, g["input_ids"]),
            logits(ref, g["input_ids"]), 1e-5, main=True)


def case_moved_family(c, binary, tmp, name, ranges, order):
    """Blocks moved between full and sliding attention: layer_types must follow them."""
    out = run_scalpel(binary, tmp, c.name, name, "slices", [f"ranges={ranges}"])
    g = golden(name)
    m = load(out, c)
    n_layers_check(c, m, len(order))
    ref = truncated_or_reordered(name, order)
    c.check(f"layer_types {m.config.layer_types} follow the blocks {order}", m.config.layer_types == ref.config.layer_types)
    c.close(f"logits == original with layers {order} (Python-built)", logits(m, g["input_ids"]),
            logits(ref, g["input_ids"]), 1e-5, main=True)
    # control: the same weights with the source's layer_types (not carried) must NOT match
    cfg = json.loads((out / "config.json").read_text())
    cfg["layer_types"] = json.loads((DATA / name / "config.json").read_text())["layer_types"][:len(order)]
    stale = Path(tmp) / f"{c.name}-stale"
    stale.mkdir()
    (stale / "config.json").write_text(json.dumps(cfg))
    (stale / "model.safetensors").symlink_to(out / "model.safetensors")
    raw = AutoModelForCausalLM.from_pretrained(stale, dtype=torch.float32, attn_implementation="eager").eval()
    d = max_abs_diff(logits(raw, g["input_ids"]), logits(ref, g["input_ids"]))
    c.check(f"control: with layer_types left as the source's {cfg['layer_types']}, logits differ (> 1e-4)", d > 1e-4, d)


def case_trained_checkpoint(c, binary, tmp):
    """`scalpel train` checkpoints: an HF folder transformers loads as is, whose loss is the trainer's."""
    for name in ("tiny-llama", "tiny-gpt2"):
        batches = DATA / "train" / f"{name}-batches.safetensors"
        out = Path(tmp) / f"{c.name}-{name}"
        cmd = [str(binary), "train", str(DATA / name), "--data", str(batches), "--val", str(batches), "-o", str(out),
               "--steps", "5", "--batch", "4", "--seq", "32", "--eval-windows", "8", "--shuffle", "false"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise Fail(f"scalpel failed (rc {p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
        val = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["val_loss"]
        m = load(out / "model", c)
        ids = load_file(batches)["input_ids"][:8]
        with torch.no_grad():
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        c.close(f"{name}: transformers' loss == the trainer's validation loss", loss, torch.tensor(val), 1e-5, main=name == "tiny-llama")


CASES = [
    ("identity-llama", case_identity_llama),
    ("bf16-llama", case_bf16_llama),
    ("llama-pro-llama", case_llama_pro_llama),
    ("llama-pro-gpt2", case_llama_pro_gpt2),
    ("llama-pro-qwen2", case_llama_pro_qwen2),
    ("stack-llama-tied", case_stack_llama_tied),
    ("cut-gpt2", case_cut_gpt2),
    ("slices-gpt2-moved", case_slices_gpt2_moved),
    ("trained-checkpoint", case_trained_checkpoint),
    ("cut-qwen3", lambda c, b, t: case_cut_family(c, b, t, "tiny-qwen3", 2)),
    ("moved-qwen3", lambda c, b, t: case_moved_family(c, b, t, "tiny-qwen3", "[[1,3],[0,1]]", [1, 2, 0])),
    ("cut-gemma3", lambda c, b, t: case_cut_family(c, b, t, "tiny-gemma3", 3)),
    ("moved-gemma3", lambda c, b, t: case_moved_family(c, b, t, "tiny-gemma3", "[[1,3],[0,1]]", [1, 2, 0])),
]


# ---------------------------------------------------------------- main

def fmt(d):
    return "-" if d is None else f"{d:.3g}"


def main():
    binary = Path(sys.argv[1] if len(sys.argv) > 1 else "target/release/scalpel")
    if not binary.exists() and (ROOT / binary).exists():
        binary = ROOT / binary
    binary = binary.resolve()
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True)
    scalpel_version = version.stdout.strip().splitlines()[0]

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    results = []
    with tempfile.TemporaryDirectory(prefix="scalpel-roundtrip-") as tmp:
        for name, fn in CASES:
            c = Case(name)
            try:
                fn(c, binary, tmp)
            except Exception as e:  # a crash is a failed check, the other cases still run
                c.check("ran without error", False, note=f"{type(e).__name__}: {e}")
                traceback.print_exc()
            results.append(c)

    verdict = lambda ok: "info" if ok is None else "ok" if ok else "FAIL"
    rows = [(c.name, k["check"], fmt(k["max_abs_diff"]), verdict(k["ok"])) for c in results for k in c.checks]
    w = [max(len(r[i]) for r in rows + [("case", "check", "max abs diff", "verdict")]) for i in range(4)]
    line = lambda r: "  ".join(s.ljust(w[i]) for i, s in enumerate(r))
    print(line(("case", "check", "max abs diff", "verdict")))
    print("  ".join("-" * x for x in w))
    for r in rows:
        print(line(r))
    for c in results:
        for k in c.checks:
            if k["ok"] is False and k["note"]:
                print(f"\n{c.name} / {k['check']}:\n  {k['note']}")

    report = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "scalpel": scalpel_version},
        "cases": {},
    }
    for c in results:
        main_check = c.checks[c.main] if c.main is not None else c.checks[-1]
        report["cases"][c.name] = {
            "check": main_check["check"],
            "max_abs_diff": main_check["max_abs_diff"],
            "ok": all(k["ok"] is not False for k in c.checks),
            "checks": c.checks,
        }
    OUT_JSON.write_text(json.dumps(report, indent=2) + "\n")
    n_fail = sum(k["ok"] is False for c in results for k in c.checks)
    n_checks = sum(k["ok"] is not None for c in results for k in c.checks)
    print(f"\n{n_checks - n_fail}/{n_checks} checks ok; wrote {OUT_JSON.relative_to(ROOT)}")
    sys.exit(1 if n_fail else 0)


if __name__ == "__main__":
    main()
