#!/usr/bin/env python3
"""Design study for the open tail (an EMULATION, not the library): hold the tokens of the open block as
quantization codes instead of fp16, with the codes they will keep when the block closes (no second rounding).

  today  the library's scheme: K per channel over each closed T-token block (bound relative to that block's
         channel range), V per token; the open block's K and V held exactly (fp16 tail).
  prevk  V quantized per token on arrival (the same codes the closed block gets today); K of block b >= 1
         quantized on arrival per channel with the parameters of block b - 1's range (step = 2 eb x its
         channel range, min = its channel min - `margin` steps), values outside 0..254 escaped (exact);
         block 0's K as today (held exactly until it closes).
  vtail  V as prevk, K as today;  ktail  K as prevk, V as today (which of the two costs the quality).
  R=r    (today only) blocks close when the tail holds T + r tokens, as Config::max_rollback = r makes the
         library do: an exact recent window of r to r + T - 1 tokens.
  pk=n   (today only) compact group params, 16 bits instead of 32: the step rounded toward zero to 5 exponent
         bits (fp16's range) and 11 - n mantissa bits, the min on the step's grid (min = j x step, j = floor(gmin /
         step), stored in n signed bits); a group whose j does not fit keeps today's params and costs 32 bits
         more (an overflow entry). Rounding the step down keeps every value within the bound.
  kd=n   (today) closed K blocks coded as differences along tokens of the same codes (quality unchanged): 1 every
         channel, 2 per (block, channel) where the differences spread less, two codebooks and a flag bit.
  sink=s (today) the first s tokens of a sequence held exactly (fp16), outside block 0's ranges and codes.
  ps=m   (today only) the min kept as today (fp16), the step rounded toward zero to 5 exponent bits and m
         mantissa bits: 21 + m bits a group.
  tq=f   (today only) the open block held in a narrower type than fp16, and closed from those values (the
         tail is the only copy, so the block's bound adds to the tail's rounding): e4m3 (fp8, no scale:
         8 bits), e4m3s (fp8 times an fp16 scale per token and kv head, amax -> 448: 8 + 16 / D bits), iN
         (N-bit codes per token and kv head over its range, fp16 min and step: N + 32 / D bits).
  tqk=f, tqv=f  (today only) tq for K or V alone (overrides tq). tqk=cN: K's open block as N-bit codes per
         channel on a grid from the previous closed block's channel range r (lo - r/2 .. hi + r/2, so no
         parameters are stored); a value off the grid is held exactly (32 bits); block 0 as i8.
  vg=ch  (today only) V quantized per channel over each closed block's T tokens, as K is (params per channel and
         block) instead of per token.

Quality: teacher-forced perplexity through kvcomp.hf's token path with the emulated cache (PyTorch). Bytes:
estimated like bench/quantizer_study.py: closed blocks at the empirical entropy of their (layer, K|V) code
histogram + 0.05 bit, escapes at 32 raw bits + an 8-bit field, 4 bytes of params per group (K: per channel and
block, V: per token), 64-byte lane table + 8-byte header per block, 8-byte block-table entry per pair; the open
block at 16 bits a value (today) or at a fixed width chosen per (K|V) from the code histogram, codes above it
escaped at 32 bits (prevk), V's params included. Averaged over every moment of a decode of W tokens (sum of
bytes held / sum of tokens held), as bench/perplexity.py counts the library.

    PYTHONPATH=build-py/python python3 bench/tail_study.py --windows 64 --variants "mode=today,eb=0.1 mode=prevk,eb=0.1"
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import study_common as study  # noqa: E402

MAX_CODE = 254


def half_down(x):
    """Finite x rounded toward -inf to fp16 (as float32): round to nearest, then one fp16 step down if above."""
    h = x.half()
    bits = h.view(torch.int16).to(torch.int32)
    below = torch.where(h > 0, bits - 1, torch.where(h < 0, bits + 1, torch.full_like(bits, -32767)))  # -0 -> -tiny
    h = torch.where(h.float() > x, below.to(torch.int16).view(torch.float16), h)
    return h.float()


def half_toward_zero(x):
    """Non-negative x rounded toward zero to fp16 (as float32)."""
    h = x.half()
    bits = h.view(torch.int16)
    h = torch.where(h.float() > x, (bits - 1).view(torch.float16), h)
    return h.float()


def quantize(x, eb_abs, step, mn):
    """kvcomp's quantizer: (reconstruction, codes with -1 = escaped). Every argument broadcasts to x."""
    inv = torch.where(step > 0, 1.0 / torch.where(step > 0, step, torch.ones_like(step)), torch.zeros_like(step))
    r = torch.round((x - mn) * inv)
    ok = (r >= 0) & (r <= MAX_CODE) & torch.isfinite(x)
    q = torch.where(ok, r, torch.zeros_like(r))
    rec = q * step + mn
    ok &= (rec - x).abs() <= eb_abs
    return torch.where(ok, rec, x), torch.where(ok, q, torch.full_like(q, -1)).to(torch.int64)


def group_params(lo, hi, eb):
    eb_abs = eb * (hi - lo)
    return eb_abs, half_toward_zero(2 * eb_abs), half_down(lo)


def step_down(step, mant_bits):
    """Non-negative step rounded toward zero to `mant_bits` explicit mantissa bits (fp32 in, fp32 out)."""
    m, e = torch.frexp(step)  # step = m 2^e, m in [0.5, 1)
    scale = float(2 ** (mant_bits + 1))
    return torch.ldexp(torch.floor(m * scale) / scale, e)


def compact_params(lo, hi, eb, k_bits):
    """pk=n: (eb_abs, step, min, overflow mask) with the min on the step's grid, j in n signed bits."""
    eb_abs, step, mn = group_params(lo, hi, eb)
    step_c = step_down(step, 11 - k_bits)
    safe = torch.where(step_c > 0, step_c, torch.ones_like(step_c))
    j = torch.floor(lo / safe)
    fits = (step_c > 0) & (j >= -(2 ** (k_bits - 1))) & (j < 2 ** (k_bits - 1))
    return eb_abs, torch.where(fits, step_c, step), torch.where(fits, j * step_c, mn), ~fits


def tail_round(x, tq):
    """tq=: x [B, H, D] (fp32) as the open block would hold it, per (token, kv head) over D."""
    if tq == "e4m3":
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    if tq == "e4m3s":
        amax = x.abs().amax(-1, keepdim=True)
        s = torch.where(amax > 0, amax / 448, torch.ones_like(amax)).half().float()
        return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    if tq.startswith("i"):
        n = int(tq[1:])
        lo = half_down(x.amin(-1, keepdim=True))
        step = ((x.amax(-1, keepdim=True) - lo) / (2 ** n - 1)).half().float()
        safe = torch.where(step > 0, step, torch.ones_like(step))
        q = torch.round((x - lo) / safe).clamp(0, 2 ** n - 1)
        return torch.where(step > 0, q * step + lo, x)
    raise SystemExit(f"tq={tq}: e4m3, e4m3s or iN")


def tail_round_channels(x, lo, hi, n):
    """tqk=cN: x [B, H, D] on the N-bit grid of the previous block's channel ranges (lo, hi [B, H, 1, D]);
    returns (values, off-grid mask); off-grid values stay exact."""
    lo, hi = lo[:, :, 0], hi[:, :, 0]
    r = hi - lo
    base = half_down(lo - r / 2)
    step = (2 * r / (2 ** n - 1)).half().float()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((x - base) / safe)
    off = (q < 0) | (q > 2 ** n - 1) | (step <= 0) | ~torch.isfinite(x)
    return torch.where(off, x, q * step + base), off


def tail_value_bits(tq, D):
    if not tq:
        return 16.0
    return 8.0 if tq == "e4m3" else 8.0 + 16.0 / D if tq == "e4m3s" else int(tq[1:]) + 32.0 / D


def v_on_arrival(mode):
    return mode in ("prevk", "vtail")


def k_on_arrival(mode):
    return mode in ("prevk", "ktail")


def make_cache(hf, model, mode, eb_of, margin, rot, T, R, basis_of=None, abs_eb_of=None, codebooks=0, k_bits=0,
               step_bits=0, k_delta=0, sinks=0, tq="", tqk=None, tqv=None, v_channels=False):
    """basis_of(layer) -> (K's, V's) [H, D, D] orthonormal per kv head (instead of `rot`; q rotates with K,
    the output back with V), or (A_k, A_q, A_v, A_out) [H, D, D] (k' = k A_k, q' = q A_q with A_q A_k^T = I;
    v' = v A_v, the output o' A_out with A_v A_out = I), codebooks: 0 = bytes from one code histogram per
    (layer, K|V), n = from n per
    (layer, kv head, K|V), each for D / n consecutive channels (components), abs_eb_of(layer) -> [2, H]:
    absolute bounds per (K|V, head) instead of eb x each group's range (an entry None: that one relative;
    bench/transform_study.py)."""
    v_now, k_now = v_on_arrival(mode), k_on_arrival(mode)
    assert R == 0 or mode == "today", "R: today's scheme only"
    assert abs_eb_of is None or (mode == "today" and R == 0), "absolute bounds: today's scheme only"
    assert (k_bits == 0 and step_bits == 0) or (mode == "today" and abs_eb_of is None), "compact params: today only"
    assert sinks == 0 or (mode == "today" and R == 0 and sinks < T), "sinks: today's scheme, fewer than T"
    assert not tq or (mode == "today" and sinks == 0), "tq: today's scheme, no sinks"
    tqk = tq if tqk is None else tqk
    tqv = tq if tqv is None else tqv
    assert not (tqk or tqv) or (mode == "today" and sinks == 0), "tqk/tqv: today's scheme, no sinks"
    assert not tqk.startswith("c") or R == 0, "tqk=cN: blocks close every T tokens (R 0)"
    assert not tqv.startswith("c"), "tqv: cN is K's"
    assert not v_channels or (mode == "today" and sinks == 0 and R == 0 and abs_eb_of is None), "vg: today's"

    class Layer(hf._Layer):
        def __init__(self, owner, index):
            super().__init__(owner, index)
            self.eb = eb_of(index)
            self.basis = basis_of(index) if basis_of else None
            if self.basis is not None and len(self.basis) == 2:  # orthonormal: q with K, the output back with V^T
                self.basis = (self.basis[0], self.basis[0], self.basis[1], self.basis[1].transpose(1, 2))
            self.abs_eb = abs_eb_of(index) if abs_eb_of else None
            self.k = self.v = self.k_exact = None
            self.hist = [torch.zeros(MAX_CODE + 1, dtype=torch.int64, device="cuda") for _ in range(2)]
            self.codebooks = codebooks
            self.ghist = [None, None]  # [H, codebooks, MAX_CODE + 1] when codebooks
            self.escapes = [0, 0]
            self.groups = [0, 0]     # groups counted (pk: params of K per channel and block, V per token)
            self.overflow = [0, 0]   # of them, groups whose min did not fit the grid (pk)
            self.prev = None  # (lo, hi) of the last closed K block, per channel [B, H, 1, D]
            # kd: closed K blocks' codes along tokens. dhist: code differences q_t - q_{t-1} (+ MAX_CODE);
            # first: the first token's codes; chosen: kd=2's per-(block, channel) choice, [plain hist, delta hist].
            self.dhist = torch.zeros(2 * MAX_CODE + 1, dtype=torch.int64, device="cuda")
            self.first = torch.zeros(MAX_CODE + 1, dtype=torch.int64, device="cuda")
            self.chosen = [torch.zeros(2 * MAX_CODE + 1, dtype=torch.int64, device="cuda") for _ in range(2)]
            self.k_groups = [0, 0]  # kd=2: channel blocks coded plain, as differences
            self.tail_off = [0, 0]  # tqk=cN: K tail values of blocks >= 1 off the grid, of all such values

        def _basis_for(self, which, heads):  # q heads share their kv head's basis
            M = self.basis[which]
            return M if heads == M.shape[0] else M.repeat_interleave(heads // M.shape[0], 0)

        def _prep(self, x, which=0):  # x [B, heads, D]; which: the basis index, 0 k, 1 q, 2 v (R: all alike)
            if self.basis is not None:
                return torch.einsum("bhd,hde->bhe", x.float(), self._basis_for(which, x.shape[1]))
            R = self.owner.R
            return x.float() @ R if R is not None else x.float()

        def _rel(self, which):
            return self.abs_eb is None or self.abs_eb[which] is None

        def _unprep(self, o):
            if self.basis is not None:
                return torch.einsum("bhd,hde->bhe", o, self._basis_for(3, o.shape[1]))
            R = self.owner.R
            return o @ R.T if R is not None else o

        def _params(self, lo, hi, which, count=True):
            eb = self.eb[which] if isinstance(self.eb, tuple) else self.eb  # (K's, V's) or one for both
            if self._rel(which) and k_bits:
                eb_abs, step, mn, over = compact_params(lo, hi, eb, k_bits)
                if count:
                    self.groups[which] += over.numel()
                    self.overflow[which] += int(over.sum())
                return eb_abs, step, mn
            if self._rel(which) and step_bits:
                eb_abs, step, mn = group_params(lo, hi, eb)
                return eb_abs, step_down(step, step_bits), mn
            if self._rel(which):
                return group_params(lo, hi, eb)
            e = self.abs_eb[which].view([1, -1] + [1] * (lo.dim() - 2)).expand_as(lo)
            return e, half_toward_zero(2 * e), half_down(lo)

        def _count(self, which, codes):
            self.hist[which] += torch.bincount(codes[codes >= 0].flatten(), minlength=MAX_CODE + 1)
            if self.codebooks:  # codes [B, H, ..., D]: (head, channel group, code) per value
                H, D, n = codes.shape[1], codes.shape[-1], self.codebooks
                lead = [1] * (codes.dim() - 3)
                head = torch.arange(H, device=codes.device).view(1, H, *lead, 1)
                group = (torch.arange(D, device=codes.device) // (D // n)).view(1, 1, *lead, D)
                idx = ((head * n + group) * (MAX_CODE + 1) + codes)[codes >= 0]
                counts = torch.bincount(idx, minlength=H * n * (MAX_CODE + 1)).view(H, n, MAX_CODE + 1)
                self.ghist[which] = counts if self.ghist[which] is None else self.ghist[which] + counts
            self.escapes[which] += int((codes < 0).sum())

        def _count_delta(self, code):  # code [B, H, T, D] of one closed K block (-1: escaped)
            ok = (code[:, :, 1:] >= 0) & (code[:, :, :-1] >= 0)
            d = code[:, :, 1:] - code[:, :, :-1]
            self.dhist += torch.bincount((d[ok] + MAX_CODE).flatten(), minlength=2 * MAX_CODE + 1)
            f = code[:, :, 0]
            self.first += torch.bincount(f[f >= 0].flatten(), minlength=MAX_CODE + 1)
            # kd=2: per channel, differences where their spread is smaller than the codes' own (a proxy of cost:
            # sum |d - median| vs sum |q - median|); each choice has its histogram (two codebooks).
            med_q = code.float().median(2, keepdim=True).values
            cost_q = (code.float() - med_q).abs().sum(2)
            med_d = d.float().median(2, keepdim=True).values
            cost_d = (d.float() - med_d).abs().sum(2) + (f.float() - med_q[:, :, 0]).abs()
            use_d = cost_d < cost_q  # [B, H, D]
            self.k_groups[0] += int((~use_d).sum())
            self.k_groups[1] += int(use_d.sum())
            okq = (code >= 0) & ~use_d.unsqueeze(2)
            self.chosen[0] += torch.bincount((code[okq] + MAX_CODE).flatten(), minlength=2 * MAX_CODE + 1)
            okd = ok & use_d.unsqueeze(2)
            self.chosen[1] += torch.bincount((d[okd] + MAX_CODE).flatten(), minlength=2 * MAX_CODE + 1)
            f_d = (f >= 0) & use_d
            self.chosen[1] += torch.bincount((f[f_d] + MAX_CODE).flatten(), minlength=2 * MAX_CODE + 1)

        def _store_token(self, k, v):  # k, v [B, H, D]
            i = self.length
            x, y = self._prep(k), self._prep(v, 2)
            if tqk.startswith("c"):  # the open block's only copy, in the narrower type
                if i >= T:
                    x, off = tail_round_channels(x, *self.prev, int(tqk[1:]))
                    self.tail_off[0] += int(off.sum())
                    self.tail_off[1] += off.numel()
                else:
                    x = tail_round(x, "i8")
            elif tqk:
                x = tail_round(x, tqk)
            if tqv:
                y = tail_round(y, tqv)
            if self.k is None:
                B, H, D = x.shape
                W = self.owner.window
                self.k = torch.zeros(B, H, W, D, device=x.device)
                self.v = torch.zeros_like(self.k)
                self.k_exact = torch.zeros(B, H, W, D, device=x.device)
            # V: per token. Today the open block holds it exactly; its codes are counted when the block closes.
            closing = i >= R and (i - R) % T == T - 1  # block (i - R) // T closes after token i
            first = i - R - T + 1  # its first token
            if v_channels:  # vg=ch: per channel over the block when it closes
                self.v[:, :, i] = y
                if closing:
                    blk = self.v[:, :, first:first + T]
                    lo, hi = blk.amin(2, keepdim=True), blk.amax(2, keepdim=True)
                    rec, code = quantize(blk, *self._params(lo, hi, 1))
                    self.v[:, :, first:first + T] = rec
                    self._count(1, code)
            else:
                lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
                rec_v, code_v = quantize(y, *self._params(lo, hi, 1))
                self.v[:, :, i] = rec_v if v_now else y
                if i >= sinks:
                    self._count(1, code_v)
            if not v_now and not v_channels and closing:
                exact = self.v[:, :, first:first + sinks].clone() if first == 0 else None
                self.v[:, :, first:first + T] = self._requant_v(first)
                if exact is not None:  # the sink tokens stay exact
                    self.v[:, :, :sinks] = exact
            # K: per channel over the block.
            b = i // T
            self.k_exact[:, :, i] = x
            if k_now and b >= 1:
                lo, hi = self.prev
                eb_k = self.eb[0] if isinstance(self.eb, tuple) else self.eb
                eb_abs, step, mn = group_params(lo, hi, eb_k)
                rec, code = quantize(x, eb_abs[:, :, 0], step[:, :, 0], (mn - margin * step)[:, :, 0])
                self.k[:, :, i] = rec
                self._count(0, code)
            else:
                self.k[:, :, i] = x
            if closing:
                blk = self.k_exact[:, :, first:first + T]
                s0 = sinks if first == 0 else 0  # exact sink tokens: outside the block's ranges and codes
                lo, hi = blk[:, :, s0:].amin(2, keepdim=True), blk[:, :, s0:].amax(2, keepdim=True)
                if not k_now or first == 0:
                    rec, code = quantize(blk, *self._params(lo, hi, 0))
                    rec[:, :, :s0] = blk[:, :, :s0]
                    code = code[:, :, s0:]
                    self.k[:, :, first:first + T] = rec
                    self._count(0, code)
                    if k_delta:
                        self._count_delta(code)
                self.prev = (lo, hi)

        def _requant_v(self, first):
            y = self.v[:, :, first:first + T]
            lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
            return quantize(y, *self._params(lo, hi, 1, count=False))[0]

        def _attend_token(self, q, scaling):
            n = self.length
            o = torch.nn.functional.scaled_dot_product_attention(self._prep(q, 1).unsqueeze(2), self.k[:, :, :n],
                                                                 self.v[:, :, :n], scale=scaling, enable_gqa=True)[:, :, 0]
            return self._unprep(o).to(q.dtype)

        def bytes(self):
            return 0  # estimated at the end from the histograms

    c = study.emulated_cache(hf, model, Layer, rot)
    c.window = model.config.max_position_embeddings
    c.k_bits, c.step_bits, c.k_delta, c.sinks, c.tq = k_bits, step_bits, k_delta, sinks, tq
    c.tqk, c.tqv, c.v_channels = tqk, tqv, v_channels
    return c


def entropy_bits(hist):
    p = hist.double() / max(1, int(hist.sum()))
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def pair_huffman_bits(hist):
    """Bits per value of a Huffman code over PAIRS of codes (the library codes pairs), the pair distribution taken
    as the product of the single-code histogram: at least 0.5 bit a value, whatever the entropy. Not the library's
    exact code: no 11-bit length cap, no PAIR_ESC for codes >= 15 << k (a lower bound where codes run high)."""
    import heapq
    p = hist.double() / max(1, int(hist.sum()))
    p = p[p > 0]
    pairs = (p[:, None] * p[None, :]).flatten().tolist()
    if len(pairs) == 1:
        return 0.5
    heap = list(pairs)
    heapq.heapify(heap)
    total = 0.0  # expected length = sum of the merged weights
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        total += a + b
        heapq.heappush(heap, a + b)
    return total / 2


def tail_width_bits(hist, escapes):
    """Fixed width w for open-block codes: codes >= 2^w escape at 32 bits; returns bits per value."""
    total = int(hist.sum()) + escapes
    best = 16.0
    for w in range(1, 9):
        above = int(hist[1 << w:].sum()) + escapes if (1 << w) <= MAX_CODE else escapes
        best = min(best, w + 32.0 * above / total)
    return best


def estimate_bytes_per_token(cache, mode, W, T, R, pairs=False):
    D, H = cache.head_dim, cache.kv_heads
    sum_bits, sum_tokens = 0.0, 0
    for layer in cache.layers:
        closed_bits, tail_bits = [], []
        for which in (0, 1):
            h, esc = layer.hist[which], layer.escapes[which]
            n = int(h.sum()) + esc
            if layer.codebooks:  # the value-weighted entropy of the codebooks' histograms
                g = layer.ghist[which].flatten(0, 1)
                ent = sum(entropy_bits(gi) * int(gi.sum()) for gi in g) / n
            else:
                ent = (pair_huffman_bits(h) if pairs else entropy_bits(h)) * (n - esc) / n
            kd = getattr(cache, "k_delta", 0)
            if which == 0 and kd:
                plain = ent
                if kd == 1:  # every code as the difference from the token before (the first token's as is)
                    nd, nf = int(layer.dhist.sum()), int(layer.first.sum())
                    ent = (entropy_bits(layer.dhist) * nd + entropy_bits(layer.first) * nf) / n
                else:  # per (block, channel) choice, two codebooks, a flag bit per channel and block
                    ent = sum(entropy_bits(c) * int(c.sum()) for c in layer.chosen) / n + 1.0 / T
                share = layer.k_groups[1] / max(1, sum(layer.k_groups))
                chosen = f" (differences in {share:.0%} of channel blocks)" if kd == 2 else ""
                print(f"  layer {cache.layers.index(layer)} K: codes {plain:.3f} bit, differences "
                      f"{entropy_bits(layer.dhist):.3f} bit, kd={kd}: {ent:.3f} bit{chosen}", flush=True)
            closed_bits.append((ent + 0.05 + esc / n * 40.0) * D * H)  # per token
            on_arrival = k_on_arrival(mode) if which == 0 else v_on_arrival(mode)
            tqw = getattr(cache, "tqk" if which == 0 else "tqv", getattr(cache, "tq", ""))
            if on_arrival:
                tail_bits.append(tail_width_bits(h, esc) * D * H)
            elif tqw.startswith("c"):  # blocks >= 1: N bits + 32 per off-grid value; block 0 as i8
                off = layer.tail_off[0] / max(1, layer.tail_off[1])
                tail_bits.append((int(tqw[1:]) + 32.0 * off) * D * H)
            else:
                tail_bits.append(tail_value_bits(tqw, D) * D * H)
        # Per token: 4 bytes per group (K: per channel and block, V: per token); pk: 2, plus 4 per overflow.
        pk, ps = getattr(cache, "k_bits", 0), getattr(cache, "step_bits", 0)
        group_bits = [21.0 + ps] * 2 if ps else [32.0, 32.0] if not pk else \
            [16.0 + 32.0 * layer.overflow[w] / max(1, layer.groups[w]) for w in (0, 1)]
        k_params = group_bits[0] * D * H / T
        v_params = group_bits[1] * H * (D / T if getattr(cache, "v_channels", False) else 1)
        block_fixed = 2 * H * (64 + 8) * 8 + H * 8 * 8
        books = 2 * H * layer.codebooks * 256 * 8  # 256-byte codebooks, held all along
        for t in range(1, W + 1):
            blocks = max(0, t - R) // T
            closed = blocks * T
            open_ = t - closed
            bits = closed * (closed_bits[0] + closed_bits[1] + k_params + v_params) + blocks * block_fixed
            # Block 0's K is held exactly until it closes; V's params come with its codes.
            k_bits = tail_bits[0] if t >= T or mode == "today" else 16.0 * D * H
            if t < T and getattr(cache, "tqk", "").startswith("c"):
                k_bits = tail_value_bits("i8", D) * D * H
            bits += open_ * (k_bits + tail_bits[1] + (v_params if v_on_arrival(mode) else 0.0))
            # Sink tokens held exactly (fp16 K and V) besides their block (which is counted as if whole).
            bits += min(t, getattr(cache, "sinks", 0)) * 32.0 * D * H
            sum_bits += bits + books
            sum_tokens += t if layer is cache.layers[0] else 0
    return sum_bits / sum_tokens / 8


def main():
    args, hf, model, _, x = study.parse_and_load("mode=today,eb=0.1 mode=prevk,eb=0.1")
    W = x.shape[1]

    def make(o):
        eb = float(o.get("eb", 0.1))
        l0 = float(o.get("l0", eb))
        return make_cache(hf, model, o.get("mode", "today"), lambda i: l0 if i == 0 else eb,
                          float(o.get("margin", 1)), o.get("rot", "0") == "1", int(o.get("T", 64)), int(o.get("R", 0)),
                          k_bits=int(o.get("pk", 0)), step_bits=int(o.get("ps", 0)), k_delta=int(o.get("kd", 0)),
                          sinks=int(o.get("sink", 0)), tq=o.get("tq", ""), tqk=o.get("tqk"), tqv=o.get("tqv"),
                          v_channels=o.get("vg", "") == "ch")

    def estimate(cache, o):
        return estimate_bytes_per_token(cache, o.get("mode", "today"), W, int(o.get("T", 64)), int(o.get("R", 0)))

    study.run_variants(hf, model, x, args.variants, make, estimate, "tail study")

if __name__ == "__main__":
    main()
