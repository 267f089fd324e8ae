#!/usr/bin/env python3
"""The fp16 yardstick: PyTorch SDPA (flash backend) decode attention on the shapes of bench_attention.

Writes Google-Benchmark-style JSON (label "sdpa-fp16", names BM_attention/<context>/<batch>/6/<G>/<D>)
that bench/report.py merges with bench_attention's output, so kvcomp / SDPA ratios come from one
session:

    build/bench/bench_attention --benchmark_out=a.json --benchmark_out_format=json
    python3 bench/sdpa_anchor.py --json sdpa.json
    python3 bench/report.py a.json sdpa.json

Shapes: 8 KV heads, 8 x G query heads, one query token per sequence, fp16 K/V [batch, 8, context, D]
(the layout SDPA reads without a copy), GQA through enable_gqa (no K/V expansion). Time per call:
CUDA events around 20 back-to-back calls, median of 15 repetitions, after warm-up.

QUERIES (bench_attention's BM_attention_queries, names .../<G>/<D>/<n>/<window>): n query tokens per
sequence, causal against the last n keys (torch's causal_lower_right bias; if this torch cannot run it
on the chosen backend, no mask: the label says which). A window W is timed as SDPA over the last
W + n - 1 keys (a rolling-buffer engine's fp16 cache).
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

MAIN = [(n, b, 4, 128) for n in (1024, 4096, 16384, 32768, 65536, 131072) for b in (1, 8)]
MAIN += [(524288, 1, 4, 128)] + [(n, 32, 4, 128) for n in (1024, 4096, 16384, 32768)]
QUERIES = [(32768, 8, 4, 128, n, 0) for n in (1, 2, 4, 8, 16)] + [(32768, 8, 1, 128, n, 0) for n in (1, 4)]
QUERIES += [(32768, 8, 4, 128, 1, 4096), (32768, 8, 4, 128, 4, 4096)]
SWEEP = [(32768, 8, 1, 128), (32768, 8, 8, 128), (32768, 8, 4, 64), (32768, 8, 2, 128), (32768, 8, 3, 128),
         (32768, 8, 7, 128), (32768, 8, 16, 128), (32768, 8, 4, 80), (32768, 8, 4, 96), (32768, 8, 4, 256)]


def time_call(fn, reps=15, inner=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / inner)  # us per call
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--backend", default="flash", choices=["flash", "efficient", "math", "cudnn", "any"])
    ap.add_argument("--context", type=int, default=0, help="only shapes of this context (0: all)")
    ap.add_argument("--batch", type=int, default=0, help="only shapes of this batch (0: all)")
    args = ap.parse_args()
    backends = {"flash": [SDPBackend.FLASH_ATTENTION], "efficient": [SDPBackend.EFFICIENT_ATTENTION],
                "math": [SDPBackend.MATH], "cudnn": [SDPBackend.CUDNN_ATTENTION],
                "any": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]}
    H = 8
    out = {"context": {"host_name": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "sdpa_backend": args.backend}, "benchmarks": []}
    for name, shapes in (("BM_attention", MAIN), ("BM_attention_sweep", SWEEP)):
        for n, batch, g, d in shapes:
            if (args.context and n != args.context) or (args.batch and batch != args.batch):
                continue
            gen = torch.Generator(device="cuda").manual_seed(n + batch + g + d)
            k = torch.randn(batch, H, n, d, device="cuda", dtype=torch.float16, generator=gen)
            v = torch.randn(batch, H, n, d, device="cuda", dtype=torch.float16, generator=gen)
            q = torch.randn(batch, H * g, 1, d, device="cuda", dtype=torch.float16, generator=gen)
            with sdpa_kernel(backends[args.backend]):
                us = time_call(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=g > 1))
            fp16_bytes = 2 * batch * H * n * d * 2
            out["benchmarks"].append({"name": f"{name}/{n}/{batch}/6/{g}/{d}", "run_type": "iteration",
                                      "label": "sdpa-fp16", "real_time": us, "time_unit": "us",
                                      "eff_TBps": fp16_bytes / (us * 1e-6) / 1e12, "bytes_read": fp16_bytes})
            print(f"{name} context {n:7d} batch {batch:2d} G {g} D {d:3d}: {us:9.1f} us "
                  f"({fp16_bytes / (us * 1e-6) / 1e12:.2f} TB/s)", flush=True)
            del k, v, q
            torch.cuda.empty_cache()
    for n, batch, g, d, nq, window in QUERIES:
        if (args.context and n != args.context) or (args.batch and batch != args.batch):
            continue
        keys = min(n, window + nq - 1) if window else n
        gen = torch.Generator(device="cuda").manual_seed(n + batch + g + d + nq)
        k = torch.randn(batch, H, keys, d, device="cuda", dtype=torch.float16, generator=gen)
        v = torch.randn(batch, H, keys, d, device="cuda", dtype=torch.float16, generator=gen)
        q = torch.randn(batch, H * g, nq, d, device="cuda", dtype=torch.float16, generator=gen)
        label = "sdpa-fp16"
        with sdpa_kernel(backends[args.backend]):
            try:
                from torch.nn.attention.bias import causal_lower_right
                mask = causal_lower_right(nq, keys) if nq > 1 else None
                fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=g > 1)
                fn()
                label += " causal" if nq > 1 else ""
            except Exception as e:  # noqa: BLE001 -- fall back to the unmasked call, say so
                print(f"causal_lower_right not available here ({type(e).__name__}: {e}); timing without a mask")
                fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=g > 1)
                label += " no-mask"
            us = time_call(fn)
        out["benchmarks"].append({"name": f"BM_attention_queries/{n}/{batch}/{g}/{d}/{nq}/{window}",
                                  "run_type": "iteration", "label": label, "real_time": us, "time_unit": "us"})
        print(f"BM_attention_queries context {n:7d} batch {batch:2d} G {g} D {d:3d} n {nq:2d} window {window}: "
              f"{us:9.1f} us ({label})", flush=True)
        del k, v, q
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
