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
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "build", "python"))

import study_common as study  # noqa: E402


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

    return study.emulated_cache(hf, model, Layer, rot)


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
    args, hf, model, _, x = study.parse_and_load("eb=0.05 eb=0.1 eb=0.15 eb=0.1,group=32 eb=0.15,group=32")
    W = x.shape[1]

    def make(o):
        return make_emulated_cache(hf, model, float(o.get("eb", 0.1)), int(o.get("group", 64)),
                                   o.get("rot", "1") == "1", int(o.get("T", 64)))

    def estimate(cache, o):
        return estimate_bytes_per_token(cache, W, int(o.get("group", 64)), int(o.get("T", 64)))

    study.run_variants(hf, model, x, args.variants, make, estimate, "per-token quantization on arrival")

if __name__ == "__main__":
    main()
