#!/usr/bin/env python3
"""Design study for the next format (an EMULATION, not the library): rotate K and V (Hadamard), quantize every
token on arrival with per-token groups (K as well as V), hold the codes fixed-width until a block closes, then
Huffman-code them (lossless: no second rounding). No fp16 tail at all.

Quality: teacher-forced perplexity through kvcomp.hf's token path with an emulated cache (PyTorch: quantize and
dequantize each token as it arrives, attention over the reconstruction). Bytes: estimated, not stored: closed
blocks at the empirical entropy of their (layer, head, K|V) code histogram + 0.05 bit (Huffman's usual excess) +
4 bytes of params per token and group + 64-byte lane table + 8-byte header + 8-byte block-table entry per pair;
open blocks at ceil(log2(levels)) bits per value + params. Averaged over the decode like bench/perplexity.py.

    PYTHONPATH=build/python python3 bench/quantizer_study.py --windows 64 --variants "eb=0.1 eb=0.15,group=32 ..."
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


def hadamard(n, device=None):
    """The orthonormal n x n Hadamard matrix (n a power of two), fp32."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device=device, dtype=torch.float32)


def per_token_quantize(x, eb, group):
    """x [..., D] -> (reconstruction fp32, codes int) with relative bound eb x range per `group` channels."""
    shape = x.shape
    xf = x.float().reshape(*shape[:-1], shape[-1] // group, group)
    lo = xf.amin(-1, keepdim=True).half().float()  # fp16 min, rounded to nearest (emulation)
    hi = xf.amax(-1, keepdim=True)
    step = (2 * eb * (hi - lo)).half().float()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    code = torch.where(step > 0, torch.round((xf - lo) / safe), torch.zeros_like(xf))
    rec = lo + code * step
    return rec.reshape(shape), code.to(torch.int32).reshape(shape)


def make_emulated_cache(hf, model, eb, group, rot, T):
    class Layer(hf._Layer):
        def __init__(self, owner, index):
            super().__init__(owner, index)
            self.k = self.v = None
            self.hist = [torch.zeros(512, dtype=torch.int64, device="cuda") for _ in range(2)]
            self.max_code = 0

        def _prep(self, x):
            R = self.owner.R
            return x.float() @ R if R is not None else x.float()

        def _store(self, k, v):  # k, v [B, H, n, D]
            B, H, n, D = k.shape
            if self.k is None:
                self.k = torch.empty(B, H, 0, D, device=k.device)
                self.v = torch.empty_like(self.k)
            outs = []
            for which, x in enumerate((k, v)):
                rec, code = per_token_quantize(self._prep(x), eb, group)
                self.hist[which] += torch.bincount(code.flatten().clamp(0, 511), minlength=512)
                self.max_code = max(self.max_code, int(code.max()))
                outs.append(rec)
            self.k = torch.cat([self.k, outs[0]], 2)
            self.v = torch.cat([self.v, outs[1]], 2)

        def _store_prompt(self, k, v):
            self._store(k, v)

        def _store_token(self, k, v):
            self._store(k.unsqueeze(2), v.unsqueeze(2))

        def _attend_token(self, q, scaling):
            n = self.length
            qr = self._prep(q)
            o = torch.nn.functional.scaled_dot_product_attention(qr.unsqueeze(2), self.k[:, :, :n], self.v[:, :, :n],
                                                                 scale=scaling, enable_gqa=True)[:, :, 0]
            R = self.owner.R
            return (o @ R.T if R is not None else o).to(q.dtype)

        def bytes(self):
            return 0  # estimated at the end from the histograms

    class Cache(hf._CacheBase):
        layer_class = Layer

        def _allocate(self, key_states):
            self.R = hadamard(self.head_dim, key_states.device) if rot else None

    return Cache(model, prefill="cache")


def estimate_bytes_per_token(cache, W, group, T):
    """Time-averaged bytes per token (all layers) over a decode of W tokens, from the code histograms."""
    D, H, L = cache.head_dim, cache.kv_heads, cache.n_layers
    total_bits_per_token_closed = 0.0
    fixed_bits = max(1, math.ceil(math.log2(max(layer.max_code for layer in cache.layers) + 1)))
    for layer in cache.layers:
        for h in layer.hist:
            p = h.double() / h.sum()
            ent = -(p[p > 0] * p[p > 0].log2()).sum().item()
            total_bits_per_token_closed += (ent + 0.05) * D * H  # payload bits for one token of this layer and kind
    params_bits = 2 * L * H * (D // group) * 32  # per token: K and V, fp16 min + fp16 step per group
    block_fixed_bits = 2 * L * H * (64 + 8) * 8 + L * H * 8 * 8  # lane tables + headers, block-table entries
    open_bits = 2 * L * H * D * fixed_bits
    sum_bits = 0.0
    sum_tokens = 0
    for t in range(1, W + 1):
        closed = (t // T) * T
        sum_bits += closed * total_bits_per_token_closed + (t - closed) * open_bits + t * params_bits + \
            (t // T) * block_fixed_bits
        sum_tokens += t
    return sum_bits / sum_tokens / 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-llama-hd64"))
    ap.add_argument("--text", default=os.path.join(ROOT, "data", "valid.txt"))
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--variants", default="eb=0.05 eb=0.1 eb=0.15 eb=0.1,group=32 eb=0.15,group=32")
    args = ap.parse_args()
    import kvcomp.hf as hf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16).cuda().eval()
    hf.enable(model)
    tok = AutoTokenizer.from_pretrained(args.model)
    W = model.config.max_position_embeddings
    x, _ = harness.windows_of(tok, args.text, args.windows, W)
    x = x.cuda()
    base = math.exp(harness.nll_of(model, x, None))
    L, _, H, D = hf._model_shape(model)
    fp16 = L * H * D * 4
    print(f"fp16 ppl {base:.4f}; EMULATED per-token quantization on arrival, {args.windows} windows x {W}")
    print("| variant | perplexity | change | est. bytes/token | est. ratio |\n|---|---:|---:|---:|---:|")
    for spec in args.variants.split():
        o = dict(kv.split("=") for kv in spec.split(","))
        eb, group, rot, T = float(o.get("eb", 0.1)), int(o.get("group", 64)), o.get("rot", "1") == "1", \
            int(o.get("T", 64))
        cache = make_emulated_cache(hf, model, eb, group, rot, T)
        ppl = math.exp(harness.nll_of(model, x, cache))
        bpt = estimate_bytes_per_token(cache, W, group, T)
        print(f"| emu {spec} | {ppl:.4f} | {100 * (ppl / base - 1):+.3f}% | {bpt:.1f} | {fp16 / bpt:.2f}x |",
              flush=True)
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
