#!/usr/bin/env python3
"""Perplexity harness: teacher-forced decoding of validation text through each KV cache.

Every variant runs the same model on the same windows. A window's tokens go
through the model in one forward call whose attention, layer by layer, stores
each token in the cache and then attends with that token's query over the
cache as it is at that moment (kvcomp.hf, prefill="cache"): every prediction
reads the cache exactly as a decode step would. For kvcomp this is the real
store path and the fused kernel; KIVI is emulated exactly in PyTorch
(kvcomp.hf.KiviCache); "fp16" is the model's own SDPA forward and "fp16-loop"
the same token-by-token path over an uncompressed cache (a check of the path).

Bytes per token count everything a cache holds for the tokens: for kvcomp the
blocks (headers, group params, lane tables, payload), 8-byte block-table
entries, the open tail as stored (in the K/V input type, or as 8- or 6-bit codes with `tail=codes` / `tail=codes6`;
`tailbytes=4` counts it as format v2's fp32) and the K/V codebooks (256 code lengths each); for KIVI the codes, fp16 scale/zero per group and the fp16
window. They are averaged over every moment of decoding (sum of bytes held /
sum of tokens held, over all tokens and layers), so a tail or window is
counted as it is carried, not only at a lucky block boundary.

Each change of perplexity (against the first variant, fp16) comes with its
standard error over the windows: the per-window NLL differences, paired (every
variant reads the same windows). Two variants whose changes differ by less than
about two standard errors are not told apart by this many windows.

    PYTHONPATH=build/python python3 bench/perplexity.py --json ppl.json --plot bench/perplexity.png
"""
import argparse
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DEFAULT_VARIANTS = ("fp16 fp16-loop kivi:bits=4 kivi:bits=3 kivi:bits=2 "
                    "kvcomp:eb=0.01 kvcomp:eb=0.02 kvcomp:eb=0.05 kvcomp:eb=0.1 kvcomp:eb=0.15 kvcomp:eb=0.2")


def parse_variant(spec):
    name, _, rest = spec.partition(":")
    opts = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        opts[k] = v
    return name, opts


@torch.no_grad()
def calibrate(model, tokenizer, path, tokens=8192):
    """RMS of K and V per (layer, kv head) on training text: the scale of absolute bounds (calib=1)."""
    from transformers import DynamicCache

    with open(path, encoding="utf-8") as f:
        ids = tokenizer(f.read(400_000))["input_ids"]
    w = model.config.max_position_embeddings
    n = max(1, min(len(ids) // w, tokens // w))
    x = torch.tensor([ids[i * w:(i + 1) * w] for i in range(n)]).cuda()
    cache = DynamicCache(config=model.config)
    model(x, past_key_values=cache, use_cache=True)
    scales = []
    for layer in cache.layers:
        k, v = layer.keys.float(), layer.values.float()  # [B, H, N, D]
        scales.append([(k[:, h].pow(2).mean().sqrt().item(), v[:, h].pow(2).mean().sqrt().item())
                       for h in range(k.shape[1])])
    return scales


def make_cache(spec, model, kvcomp, hf, scales=None, pool_bytes=256 << 20, max_tokens=4096):
    name, o = parse_variant(spec)
    if name == "fp16-loop":
        return hf.Fp16Cache(model, prefill="cache")
    if name == "kivi":
        return hf.KiviCache(model, bits=int(o.get("bits", 4)), window=int(o.get("window", 32)), prefill="cache")
    if name == "kvcomp":
        cfg = kvcomp.Config()
        eb = float(o.get("eb", 0.05))
        mode = kvcomp.BoundMode.Absolute if o.get("mode", "rel").startswith("abs") else kvcomp.BoundMode.Relative
        cfg.k_bound = kvcomp.ErrorBound(mode, float(o.get("k", eb)))
        cfg.v_bound = kvcomp.ErrorBound(mode, float(o.get("v", eb)))
        cfg.block_tokens = int(o.get("T", 64))
        cfg.pool_bytes = pool_bytes
        if "tail" in o:  # tail=codes (or codes8): the open tail as 8-bit codes (Config.tail_format = Codes8);
            formats = {"codes": kvcomp.TailFormat.Codes8, "codes8": kvcomp.TailFormat.Codes8,  # codes6; input
                       "codes6": kvcomp.TailFormat.Codes6, "input": kvcomp.TailFormat.Input}
            if o["tail"] not in formats:
                raise SystemExit("tail= codes8 (codes), codes6 or input")
            cfg.tail_format = formats[o["tail"]]
        if o.get("calib"):  # absolute bounds: eb x the (layer, head)'s RMS on training text
            if scales is None:
                raise SystemExit("calib=1 needs --calib-text")
            ovs = []
            for l, heads in enumerate(scales):
                for h, (ks, vs) in enumerate(heads):
                    ov = kvcomp.BoundOverride()
                    ov.layer, ov.kv_head = l, h
                    ov.k = kvcomp.ErrorBound(kvcomp.BoundMode.Absolute, cfg.k_bound.value * ks)
                    ov.v = kvcomp.ErrorBound(kvcomp.BoundMode.Absolute, cfg.v_bound.value * vs)
                    ovs.append(ov)
            cfg.overrides = ovs
        # Per-layer bounds: l<i>=eb (K and V of layer i), lk<i>= / lv<i>= (one of them), same mode.
        per_layer = {}
        for key, val in o.items():
            for prefix, which in (("lk", "k"), ("lv", "v"), ("l", "kv")):
                if key.startswith(prefix) and key[len(prefix):].isdigit():
                    b = per_layer.setdefault(int(key[len(prefix):]), [cfg.k_bound.value, cfg.v_bound.value])
                    if "k" in which:
                        b[0] = float(val)
                    if "v" in which:
                        b[1] = float(val)
                    break
        layer_ovs = []
        for layer, (kb, vb) in sorted(per_layer.items()):
            ov = kvcomp.BoundOverride()
            ov.layer, ov.kv_head = layer, -1
            ov.k, ov.v = kvcomp.ErrorBound(mode, kb), kvcomp.ErrorBound(mode, vb)
            layer_ovs.append(ov)
        if layer_ovs:
            if o.get("calib"):
                raise SystemExit("per-layer bounds and calib=1 do not combine")
            cfg.overrides = layer_ovs
        cache = hf.KvcompCache(model, cfg, prefill="cache", max_tokens=int(o.get("max_tokens", max_tokens)),
                               transform=o.get("rot"))
        if "tailbytes" in o and o.get("tail", "input") != "input":
            raise SystemExit("tailbytes= counts an Input tail; not with tail=codes")
        if "tailbytes" in o:  # count the open tail at this many bytes a value (4: format v2's fp32 tail)
            cache.tail_value_bytes = int(o["tailbytes"])
        return cache
    raise SystemExit(f"unknown variant {spec!r}")


def windows_of(tokenizer, path, n, w):
    with open(path, encoding="utf-8") as f:
        ids = tokenizer(f.read())["input_ids"]
    stride = len(ids) // n
    if stride < w:
        raise SystemExit(f"{path}: {len(ids)} tokens are too few for {n} windows of {w}")
    return torch.tensor([ids[i * stride:i * stride + w] for i in range(n)]), len(ids)


@torch.no_grad()
def nll_of(model, x, cache, per_window=False):
    """Mean negative log-likelihood of x[:, 1:] given the prefixes, in float64 (per_window: one per row of x)."""
    out = model(x, past_key_values=cache, use_cache=cache is not None)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1).double()
    return nll.mean(-1).cpu() if per_window else nll.mean().item()


def paired_change(nll, base_nll):
    """(perplexity change in %, its standard error in %) of per-window NLLs against the base's, windows
    paired: the windows are the independent samples (each variant sees the same ones)."""
    d = nll - base_nll
    n = d.numel()
    se = float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    mean = float(d.mean())
    return 100.0 * math.expm1(mean), 100.0 * math.exp(mean) * se


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-llama-hd64"))
    ap.add_argument("--text", default=None, help="validation text (default: data/valid.txt, else "
                    "../shared/data/text/valid.txt)")
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--window", type=int, default=0, help="tokens per window (default: the model's context)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--calib-text", default=None, help="training text for calib=1 variants (never valid.txt)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()

    sys.path.insert(0, os.path.join(ROOT, "build", "python"))
    import kvcomp
    import kvcomp.hf as hf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = args.text
    if text is None:
        for cand in (os.path.join(ROOT, "data", "valid.txt"), os.path.join(ROOT, "..", "shared", "data", "text",
                                                                           "valid.txt")):
            if os.path.exists(cand):
                text = cand
                break
    if text is None:
        raise SystemExit("no validation text: pass --text")

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16).cuda().eval()
    hf.enable(model)
    tok = AutoTokenizer.from_pretrained(args.model)
    w = args.window or model.config.max_position_embeddings
    x, total = windows_of(tok, text, args.windows, w)
    x = x.cuda()
    L, Hq, H, D = hf._model_shape(model)
    fp16_per_token = L * H * D * 2 * 2
    print(f"model {os.path.basename(args.model.rstrip('/'))}: {L} layers, {Hq} q / {H} kv heads, head_dim {D}; "
          f"text {os.path.basename(text)} ({total} tokens), {args.windows} windows x {w} tokens", flush=True)

    scales = None
    if args.calib_text:
        if "valid" in os.path.basename(args.calib_text):
            raise SystemExit("calibrate on training text, never on the validation split")
        scales = calibrate(model, tok, args.calib_text)

    rows = []
    base = base_nll = None
    for spec in args.variants.split():
        t0 = time.time()
        if spec == "fp16":
            nll = nll_of(model, x, None, per_window=True)
            bpt = float(fp16_per_token)
        else:
            # The pool holds every window at fp16 size: enough at any bound.
            cache = make_cache(spec, model, kvcomp, hf, scales, pool_bytes=x.numel() * fp16_per_token + (64 << 20),
                               max_tokens=max(w, 64))
            cache.track_bytes = True
            nll = nll_of(model, x, cache, per_window=True)
            bpt = cache.mean_bytes_per_token()
            del cache
            torch.cuda.empty_cache()
        ppl = math.exp(float(nll.mean()))
        if base is None:
            base, base_nll = ppl, nll
        # The standard error of the change: per-window differences, paired (0 for the base itself).
        _, se = paired_change(nll, base_nll)
        row = {"variant": spec, "ppl": ppl, "delta_pct": 100.0 * (ppl / base - 1.0), "delta_se_pct": se,
               "bytes_per_token": bpt, "ratio": fp16_per_token / bpt, "seconds": time.time() - t0}
        rows.append(row)
        print(f"  {spec:28s} ppl {ppl:8.4f} ({row['delta_pct']:+.3f}% +- {se:.3f})  {bpt:8.1f} B/token  "
              f"{row['ratio']:5.2f}x  [{row['seconds']:.1f} s]", flush=True)

    print()
    print(f"| variant | perplexity | change vs fp16 | std. error of the change | KV bytes/token (all layers) | "
          f"ratio vs fp16 |")
    print(f"|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['ppl']:.4f} | {r['delta_pct']:+.3f}% | {r['delta_se_pct']:.3f}% | "
              f"{r['bytes_per_token']:.1f} | {r['ratio']:.2f}x |")
    print()
    for limit in (0.5, 1.0):
        best = {}
        for r in rows:
            fam = r["variant"].split(":")[0]
            if r["delta_pct"] <= limit and r["ratio"] > best.get(fam, (0, ""))[0]:
                best[fam] = (r["ratio"], r["variant"])
        print(f"best ratio at <= {limit}% perplexity increase: " +
              ", ".join(f"{f} {v[0]:.2f}x ({v[1]})" for f, v in sorted(best.items())))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "text": text, "windows": args.windows, "window": w,
                       "fp16_bytes_per_token": fp16_per_token, "rows": rows}, f, indent=1)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for fam, marker in (("kvcomp", "o"), ("kivi", "s"), ("fp16-loop", "^")):
            pts = [r for r in rows if r["variant"].split(":")[0] == fam]
            if pts:
                ax.plot([r["ratio"] for r in pts], [r["delta_pct"] for r in pts], marker=marker, label=fam)
                for r in pts:
                    ax.annotate(r["variant"].split(":", 1)[-1], (r["ratio"], r["delta_pct"]), fontsize=7)
        ax.axhline(0.5, color="gray", lw=0.5, ls="--")
        ax.axhline(1.0, color="gray", lw=0.5, ls=":")
        ax.set_xlabel("KV ratio vs fp16 (everything counted)")
        ax.set_ylabel("perplexity change vs fp16 (%)")
        ax.set_title(f"{os.path.basename(args.model.rstrip('/'))}, {args.windows} x {w} validation tokens")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
