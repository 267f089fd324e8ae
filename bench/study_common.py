"""What the emulation studies share (bench/quantizer_study.py, tail_study.py, transform_study.py): finding the
texts, loading the tiny Llama with kvcomp.hf's attention, and the table of perplexity and estimated bytes per
variant."""
import argparse
import math
import os

import torch

import perplexity as harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hadamard(n, device=None):
    """The orthonormal n x n Hadamard matrix (n a power of two), fp32."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device=device, dtype=torch.float32)


def emulated_cache(hf, model, layer_class, rot):
    """A kvcomp.hf cache (token path) of `layer_class` layers; its R is the Hadamard matrix when rot."""
    class Cache(hf._CacheBase):
        def _allocate(self, key_states):
            self.R = hadamard(self.head_dim, key_states.device) if rot else None

    Cache.layer_class = layer_class
    return Cache(model, prefill="cache")


def text_path(given, name):
    """`given`, else data/<name>, else ../shared/data/text/<name> (as bench/perplexity.py looks)."""
    for path in (given, os.path.join(ROOT, "data", name), os.path.join(ROOT, "..", "shared", "data", "text", name)):
        if path and os.path.exists(path):
            return path
    raise SystemExit(f"no {name}: pass its path")


def load_model(path):
    """(kvcomp.hf, the model in fp16 on the GPU with kvcomp.hf's attention, its tokenizer)."""
    import kvcomp.hf as hf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).cuda().eval()
    hf.enable(model)
    return hf, model, AutoTokenizer.from_pretrained(path)


def parse_and_load(default_variants, windows=64, add_args=None):
    """The studies' command line (--model, --text, --windows, --variants, and what add_args(parser) adds), the
    model and the validation windows: (args, kvcomp.hf, model, tokenizer, windows [n, W] on the GPU)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-llama-hd64"))
    ap.add_argument("--text", default=None, help="validation text (default: as bench/perplexity.py)")
    ap.add_argument("--windows", type=int, default=windows)
    ap.add_argument("--variants", default=default_variants)
    if add_args:
        add_args(ap)
    args = ap.parse_args()
    hf, model, tok = load_model(args.model)
    W = model.config.max_position_embeddings
    x = harness.windows_of(tok, text_path(args.text, "valid.txt"), args.windows, W)[0].cuda()
    return args, hf, model, tok, x


def run_variants(hf, model, x, variants, make, estimate, title):
    """Prints the fp16 perplexity of windows x, then a row per variant spec ("k=v,k=v"): make(options) -> cache,
    estimate(cache, options) -> bytes per token (all layers)."""
    base_nll = harness.nll_of(model, x, None, per_window=True)
    base = math.exp(float(base_nll.mean()))
    L, _, H, D = hf._model_shape(model)
    fp16 = L * H * D * 4
    print(f"fp16 ppl {base:.4f}; EMULATED {title}, {x.shape[0]} windows x {x.shape[1]}")
    print("| variant | perplexity | change | std. error | est. bytes/token | est. ratio |\n|---|---:|---:|---:|---:|---:|")
    for spec in variants.split():
        o = dict(kv.split("=") for kv in spec.split(","))
        cache = make(o)
        nll = harness.nll_of(model, x, cache, per_window=True)
        ppl = math.exp(float(nll.mean()))
        _, se = harness.paired_change(nll, base_nll)
        bpt = estimate(cache, o)
        print(f"| emu {spec} | {ppl:.4f} | {100 * (ppl / base - 1):+.3f}% | {se:.3f}% | {bpt:.1f} | "
              f"{fp16 / bpt:.2f}x |", flush=True)
        del cache
        torch.cuda.empty_cache()
