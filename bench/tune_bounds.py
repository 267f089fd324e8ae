#!/usr/bin/env python3
"""Per-layer K/V error bounds chosen by measured sensitivity, on TRAINING text (never the validation split).

For a pair of bounds (lo, hi): measure, through the real kernels (bench/perplexity.py's teacher-forced path),
the perplexity increase when one (layer, K|V) alone goes from lo to hi, and the bytes that saves. Then raise the
cheapest ones (perplexity cost per byte saved) while the summed cost stays within each target, and print the
harness variant to evaluate on the validation text:

    PYTHONPATH=build/python python3 bench/tune_bounds.py --text data/train_tune.txt --pairs 0.05:0.15,0.08:0.2 \\
        --targets 0.5,1.0 [--rot]
    # then: bench/perplexity.py --variants "<printed variants>"

The summed cost assumes the per-(layer, kind) effects add up; the validation run says whether they did.
"""
import argparse
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "build", "python"))

import perplexity as harness  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-llama-hd64"))
    ap.add_argument("--text", required=True, help="training text (never valid.txt)")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--pairs", default="0.05:0.15")
    ap.add_argument("--targets", default="0.5,1.0", help="perplexity increase budgets, percent")
    ap.add_argument("--rot", action="store_true", help="with Config.transform = Hadamard")
    ap.add_argument("--out", default=None, help="write the chosen variants here, one per line")
    args = ap.parse_args()
    if "valid" in os.path.basename(args.text):
        raise SystemExit("tune on training text, never on the validation split")
    import kvcomp
    import kvcomp.hf as hf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16).cuda().eval()
    hf.enable(model)
    tok = AutoTokenizer.from_pretrained(args.model)
    x, _ = harness.windows_of(tok, args.text, args.windows, model.config.max_position_embeddings)
    x = x.cuda()
    L, _, H, D = hf._model_shape(model)
    fp16_per_token = L * H * D * 4
    pool = x.numel() * fp16_per_token + (64 << 20)
    rot = ",rot=hadamard" if args.rot else ""

    def run(spec):
        cache = harness.make_cache(spec, model, kvcomp, hf, pool_bytes=pool)
        cache.track_bytes = True
        nll = harness.nll_of(model, x, cache)
        return math.exp(nll), cache.mean_bytes_per_token()

    chosen = []
    base = math.exp(harness.nll_of(model, x, None))
    print(f"fp16 perplexity on {os.path.basename(args.text)}, {args.windows} windows: {base:.4f}", flush=True)
    for pair in args.pairs.split(","):
        lo, hi = (float(v) for v in pair.split(":"))
        ppl_lo, bytes_lo = run(f"kvcomp:eb={lo}{rot}")
        d_lo = 100 * (ppl_lo / base - 1)
        print(f"\nall at {lo}: {d_lo:+.3f}% at {bytes_lo:.1f} B/token", flush=True)
        items = []
        for layer in range(L):
            for kind in ("k", "v"):
                ppl, b = run(f"kvcomp:eb={lo},l{kind}{layer}={hi}{rot}")
                cost, saved = 100 * (ppl - ppl_lo) / base, bytes_lo - b
                items.append((max(cost, 0.0) / max(saved, 1e-9), cost, saved, f"l{kind}{layer}"))
                print(f"  {kind.upper()} of layer {layer} at {hi}: {cost:+.3f}% for {saved:.1f} B/token", flush=True)
        items.sort()
        for target in (float(t) for t in args.targets.split(",")):
            total, raised = d_lo, []
            for _, cost, saved, name in items:
                if total + max(cost, 0.0) <= target:
                    total += max(cost, 0.0)
                    raised.append(name)
            spec = f"kvcomp:eb={lo}" + "".join(f",{n}={hi}" for n in raised) + rot
            print(f"target {target}%: predicted {total:+.3f}%  ->  {spec}", flush=True)
            chosen.append(spec)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(dict.fromkeys(chosen)) + "\n")


if __name__ == "__main__":
    main()
