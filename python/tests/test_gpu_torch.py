"""GPU tests of the kvcomp Python package through PyTorch tensors.

Skips without torch or a CUDA device (as a script: exit code 77, which CTest
reports as a skip). Fresh random data each run; KVCOMP_TEST_SEED=n repeats one.

Tolerances. kvcomp, KIVI and the fp16 baseline compute attention in fp32
(scalar FMAs, exp2f, an online softmax merged across splits) and round the
output once to fp16 (half an ulp: 2^-11 = 4.9e-4 relative) or bf16 (2^-8 =
3.9e-3). Against float64 attention over exactly the K/V the kernel reads (the
reconstruction from read_block + ref.decode_block, kivi_reference, or the fp16
input) each output element must be within REL x |ref| (fp16: 2e-3, 4x the
rounding; bf16: 1e-2) plus ABS x max|V| (1e-4: fp32 accumulation over these
few hundred tokens is ~1e-6 of the largest value; near-zero outputs have no
relative slack).
"""
import array
import math
import os
import random
import sys
import unittest

import kvcomp
from kvcomp import _kvcomp

try:
    import torch
except ImportError:  # the test skips
    torch = None


def _skip_reason():
    if torch is None:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


SKIP = _skip_reason()
SEED = int(os.environ.get("KVCOMP_TEST_SEED", random.SystemRandom().randrange(1 << 31)))
ABS = 1e-4
REL = {"float16": 2e-3, "bfloat16": 1e-2}


def floats(b, *shape):
    """float32 bytes (decode_block, kivi_reference) as a CPU tensor."""
    return torch.frombuffer(bytearray(b), dtype=torch.float32).view(*shape)


def host_f32(t):
    """A tensor's values as float32 host data (array('f'); no numpy needed)."""
    return array.array("f", t.detach().float().cpu().flatten().tolist())


def attention64(q, k, v):
    """softmax(q K^T / sqrt(D)) V in float64; q [Hq, D], k/v [N, H, D]; q head h reads KV head h // (Hq / H)."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    g = q.shape[0] // k.shape[1]
    kh = k.permute(1, 0, 2).repeat_interleave(g, dim=0)  # [Hq, N, D]
    vh = v.permute(1, 0, 2).repeat_interleave(g, dim=0)
    p = torch.softmax(torch.einsum("hd,hnd->hn", q, kh) / math.sqrt(q.shape[1]), dim=-1)
    return torch.einsum("hn,hnd->hd", p, vh)


class CaiView:
    """A torch tensor re-exposed through a hand-written CUDA array interface (to flag it read-only, ...)."""

    def __init__(self, t, readonly=False, ptr=None):
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape), "typestr": {torch.float16: "<f2", torch.float32: "<f4"}[t.dtype],
            "data": (t.data_ptr() if ptr is None else ptr, readonly),
            "strides": tuple(s * t.element_size() for s in t.stride()), "version": 2}


@unittest.skipIf(SKIP, SKIP or "")
class TorchBase(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(SEED)
        self.dev = torch.device("cuda")

    def assert_attention_close(self, got, ref, v, rel, what):
        """Every element of got [Hq, D] within rel |ref| + ABS max|v| of the float64 ref."""
        got = got.double().cpu()
        self.assertTrue(torch.isfinite(got).all(), f"{what}: unwritten or non-finite output (seed {SEED})")
        err = (got - ref).abs()
        allowed = rel * ref.abs() + ABS * v.double().abs().max().item()
        worst = (err - allowed).max().item()
        self.assertLessEqual(worst, 0.0, f"{what}: max |err| {err.max().item():.3g} exceeds the tolerance "
                                         f"by {worst:.3g} (seed {SEED})")


class CacheTorch(TorchBase):
    H, HQ, D, T = 2, 8, 128, 64
    PREFILL = [130, 64, 37]  # 2 closed blocks + tail, exactly 1 block, tail only
    STEPS = 70               # decode steps: every sequence closes at least one more block

    def make_cache(self, dtype, **fields):
        # kv head 1 has its own bounds: absolute for K, a tighter relative one for V.
        over = kvcomp.BoundOverride(layer=0, kv_head=1, k=kvcomp.ErrorBound(kvcomp.BoundMode.Absolute, 0.02),
                                    v=kvcomp.ErrorBound(kvcomp.BoundMode.Relative, 0.02))
        cfg = kvcomp.Config(layers=1, kv_heads=self.H, q_heads=self.HQ, head_dim=self.D, dtype=dtype,
                            block_tokens=self.T, pool_bytes=64 << 20, max_seqs=8, max_tokens_per_seq=4096,
                            overrides=[over], **fields)
        return kvcomp.Cache(cfg)

    def fill(self, cache, tdtype, stream=None):
        """Prefill (one call, strided K/V) then STEPS batched single-token steps; returns ids and the inputs."""
        H, D = self.H, self.D
        seqs = [cache.add_sequence() for _ in self.PREFILL]
        total = sum(self.PREFILL)
        # [tokens, heads, 2D] buffers sliced to D channels: token stride 2HD, head stride 2D (elements).
        kbuf = torch.randn(total, H, 2 * D, device=self.dev).to(tdtype)
        vbuf = torch.randn(total, H, 2 * D, device=self.dev).to(tdtype)
        k, v = kbuf[..., :D], vbuf[..., :D]
        cache.append(0, seqs, self.PREFILL, k, v, stream=stream)
        ks, vs, at = [], [], 0
        for n in self.PREFILL:
            ks.append([k[at:at + n].float().cpu()])
            vs.append([v[at:at + n].float().cpu()])
            at += n
        for _ in range(self.STEPS):
            kd = torch.randn(len(seqs), H, D, device=self.dev).to(tdtype)
            vd = torch.randn(len(seqs), H, D, device=self.dev).to(tdtype)
            cache.append(0, seqs, [1] * len(seqs), kd, vd, stream=stream)
            for i in range(len(seqs)):
                ks[i].append(kd[i:i + 1].float().cpu())
                vs[i].append(vd[i:i + 1].float().cpu())
        return seqs, [torch.cat(x) for x in ks], [torch.cat(x) for x in vs]

    def bound(self, eb, lo, hi):
        """The largest |reconstruction - x| eb allows for a group with range [lo, hi] (fp32 slack)."""
        width = eb.value * (hi - lo) if eb.mode == kvcomp.BoundMode.Relative else torch.full_like(hi, eb.value)
        return width * (1 + 1e-6)

    def reconstruct_and_check_bounds(self, cache, seq, k, v):
        """K/V [n, H, D] as the cache holds them: decoded closed blocks, exact tail. Checks every element's bound."""
        cfg, T = cache.config, self.T
        kr, vr = k.double().clone(), v.double().clone()
        for h in range(self.H):
            eb_k = cfg.overrides[0].k if h == 1 else cfg.k_bound
            eb_v = cfg.overrides[0].v if h == 1 else cfg.v_bound
            books = {kind: cache.codebook(0, h, kind) for kind in (kvcomp.Kind.Key, kvcomp.Kind.Value)}
            for b in range(k.shape[0] // T):
                rows = slice(b * T, (b + 1) * T)
                for kind, x, r in ((kvcomp.Kind.Key, k, kr), (kvcomp.Kind.Value, v, vr)):
                    block = cache.read_block(0, seq, h, b, kind)
                    r[rows, h] = floats(kvcomp.ref.decode_block(block, kind, T, self.D, books[kind]), T, self.D).double()
                    xb = x[rows, h].double()
                    if kind == kvcomp.Kind.Key:  # groups: channels over the block
                        allowed = self.bound(eb_k, xb.min(0).values, xb.max(0).values)[None, :]
                    else:  # groups: tokens over their channels
                        allowed = self.bound(eb_v, xb.min(1).values, xb.max(1).values)[:, None]
                    excess = ((r[rows, h] - xb).abs() - allowed).max().item()
                    self.assertLessEqual(excess, 0.0, f"{kind} seq {seq} head {h} block {b}: error bound "
                                                      f"exceeded by {excess:.3g} (seed {SEED})")
        return kr, vr

    def check_attention(self, cache, seqs, ks, vs, qdtype):
        q = torch.randn(len(seqs), self.HQ, self.D, device=self.dev).to(qdtype)
        out = torch.full_like(q, float("nan"))
        cache.attend(0, seqs, q, out)
        torch.cuda.synchronize()
        rel = REL[str(qdtype).replace("torch.", "")]
        for i, s in enumerate(seqs):
            kr, vr = self.reconstruct_and_check_bounds(cache, s, ks[i], vs[i])
            self.assert_attention_close(out[i], attention64(q[i], kr, vr), vr, rel, f"seq {s}")
        return q, out

    def run_case(self, dtype, tdtype, qdtype):
        cache = self.make_cache(dtype)
        seqs, ks, vs = self.fill(cache, tdtype)
        lengths = [n + self.STEPS for n in self.PREFILL]
        self.assertEqual([cache.tokens(s, 0) for s in seqs], lengths)
        st = cache.stats()
        self.assertEqual(st.tokens, sum(lengths))
        self.assertEqual(st.per_layer[0].tail_tokens, sum(n % self.T for n in lengths))
        elem = 4 if dtype == kvcomp.DType.F32 else 2
        self.assertEqual(st.per_layer[0].tail_bytes, st.per_layer[0].tail_tokens * self.H * 2 * self.D * elem)
        self.assertEqual(st.tail_bytes, st.per_layer[0].tail_bytes)
        self.assertGreater(st.compressed_bytes, 0)
        self.assertGreater(st.ratio_vs_fp16, 1.0)
        self.check_attention(cache, seqs, ks, vs, qdtype)
        in_use = st.pool_bytes_in_use
        cache.remove_sequence(seqs[0])
        self.assertLess(cache.stats().pool_bytes_in_use, in_use)
        with self.assertRaisesRegex(kvcomp.Error, f"unknown or removed sequence id {seqs[0]}"):
            cache.tokens(seqs[0], 0)

    def test_fp16_append_attend_read_block(self):
        self.run_case(kvcomp.DType.F16, torch.float16, torch.float16)

    def test_multi_token_queries_with_a_window_and_sinks(self):
        """attend(n_queries=...): query j of n sits at position L - n + j and sees the tokens up to it that lie in
        the window (60) or the sinks (3), against float64 over the stored K/V."""
        window, sinks, counts = 60, 3, [3, 1, 5]
        cache = self.make_cache(kvcomp.DType.F16, window=window, sink_tokens=sinks, max_attend_batch=16)
        seqs, ks, vs = self.fill(cache, torch.float16)
        q = torch.randn(sum(counts), self.HQ, self.D, device=self.dev).half()
        out = torch.full_like(q, float("nan"))
        cache.attend(0, seqs, q, out, n_queries=counts)
        torch.cuda.synchronize()
        row = 0
        for i, s in enumerate(seqs):
            kr, vr = self.reconstruct_and_check_bounds(cache, s, ks[i], vs[i])
            for j in range(counts[i]):
                pos = kr.shape[0] - counts[i] + j
                keep = [t for t in range(pos + 1) if t > pos - window or t < sinks]
                self.assert_attention_close(out[row], attention64(q[row], kr[keep], vr[keep]), vr[keep],
                                            REL["float16"], f"seq {s} query {j} of {counts[i]}")
                row += 1
        with self.assertRaisesRegex(kvcomp.Error, r"attend: q must be \[sum\(n_queries\), q_heads, head_dim\]"):
            cache.attend(0, seqs[:1], q, out, n_queries=[2])

    def test_fork_shares_blocks_and_either_may_go_first(self):
        """fork: the child holds the parent's tokens without new pool bytes; both attend alike; removing the
        parent leaves the child intact; the pool ends empty."""
        cache = self.make_cache(kvcomp.DType.F16)
        seqs, _, _ = self.fill(cache, torch.float16)
        before = cache.stats()
        child = cache.fork(seqs[0])
        self.assertEqual(cache.stats().compressed_bytes, before.compressed_bytes)
        self.assertEqual(cache.stats().pool_bytes_in_use, before.pool_bytes_in_use)
        self.assertEqual(cache.tokens(child, 0), cache.tokens(seqs[0], 0))
        q = torch.randn(1, self.HQ, self.D, device=self.dev).half()
        out = torch.full((2, self.HQ, self.D), float("nan"), device=self.dev, dtype=torch.float16)
        cache.attend(0, [seqs[0], child], q.expand(2, -1, -1).contiguous(), out)
        torch.cuda.synchronize()
        self.assertTrue(torch.isfinite(out).all())
        self.assertTrue(torch.equal(out[0], out[1]))
        for s in seqs:
            cache.remove_sequence(s)
        alone = torch.full_like(q, float("nan"))
        cache.attend(0, [child], q, alone)
        torch.cuda.synchronize()
        # (a batch of one splits the work differently: fp32 rounding, not bits)
        self.assertTrue(torch.allclose(alone[0].float(), out[1].float(), rtol=2e-3, atol=1e-3))
        cache.remove_sequence(child)
        self.assertEqual(cache.stats().pool_bytes_in_use, 0)
        self.assertEqual(cache.stats().compressed_bytes, 0)

    def test_bf16_kv_through_dlpack(self):
        # torch's CUDA array interface spells bfloat16 '<V2': kvcomp reads these through DLPack.
        t = torch.zeros(4, 2, 64, dtype=torch.bfloat16, device=self.dev)
        self.assertEqual(_kvcomp._array_info(t), (t.data_ptr(), (4, 2, 64), (128, 64, 1), "bfloat16"))
        self.run_case(kvcomp.DType.BF16, torch.bfloat16, torch.bfloat16)

    def test_array_info_of_torch_tensors(self):
        t = torch.zeros(5, 2, 256, dtype=torch.float16, device=self.dev)[..., 64:192]
        self.assertEqual(_kvcomp._array_info(t), (t.data_ptr(), (5, 2, 128), (512, 256, 1), "float16"))
        with self.assertRaisesRegex(kvcomp.Error, "k: __dlpack__\\(\\) failed"):  # torch refuses to export it
            _kvcomp._array_info(torch.zeros(3, device=self.dev, requires_grad=True), "k")

    def test_streams_none_follows_torch_and_objects_work(self):
        side = torch.cuda.Stream()
        x = torch.zeros(1, device=self.dev)
        with torch.cuda.stream(side):
            self.assertEqual(kvcomp.resolve_stream(None, x), side.cuda_stream)
        self.assertEqual(kvcomp.resolve_stream(side), side.cuda_stream)
        # The same data on a side stream (stream=None inside its context, then the stream object) and on
        # the default stream gives bit-identical outputs.
        outs = []
        for use_side in (False, True):
            torch.manual_seed(SEED)
            cache = self.make_cache(kvcomp.DType.F16)
            if use_side:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    seqs, _, _ = self.fill(cache, torch.float16)
                    q = torch.randn(len(seqs), self.HQ, self.D, device=self.dev).half()
                    out = torch.empty_like(q)
                cache.attend(0, seqs, q, out, stream=side)
                side.synchronize()
            else:
                seqs, _, _ = self.fill(cache, torch.float16)
                q = torch.randn(len(seqs), self.HQ, self.D, device=self.dev).half()
                out = torch.empty_like(q)
                cache.attend(0, seqs, q, out)
                torch.cuda.synchronize()
            outs.append(out.cpu())
        self.assertTrue(torch.equal(outs[0], outs[1]))

    def test_bad_arrays_raise_kvcomp_error(self):
        cache = self.make_cache(kvcomp.DType.F16)
        s = cache.add_sequence()
        H, D = self.H, self.D
        good = torch.randn(3, H, D, device=self.dev).half()
        cases = [
            ((good.float(), good), "append: k must be float16, got float32"),
            ((good[:, :1], good), r"append: k must be \[total_tokens, kv_heads, head_dim\] = \[3, 2, 128\], got \[3, 1, 128\]"),
            ((good, good[:2]), r"append: v must be .* = \[3, 2, 128\], got \[2, 2, 128\]"),
            ((good.cpu(), good), r"k is not a CUDA array \(DLPack device: CPU\)"),
            ((good, good.transpose(1, 2).contiguous().transpose(1, 2)), "unit stride along head_dim"),
            ((good, torch.randn(3, H, 2 * D, device=self.dev).half()[..., :D]), "k and v must have the same strides"),
            ((CaiView(good.cpu()), good), "k is not in CUDA device memory"),
        ]
        for (k, v), pattern in cases:
            with self.subTest(pattern=pattern), self.assertRaisesRegex(kvcomp.Error, pattern):
                cache.append(0, [s], [3], k, v)
        self.assertEqual(cache.tokens(s, 0), 0)  # nothing was stored
        cache.append(0, [s], [3], good, good)
        q = torch.randn(1, self.HQ, D, device=self.dev).half()
        out = torch.empty_like(q)
        cases = [
            ((q.float(), out), "attend: q must be float16 or bfloat16, got float32"),
            ((q, out.bfloat16()), "attend: out must be float16, got bfloat16"),
            ((q[:, :4], out), r"attend: q must be \[batch = len\(seq_ids\), q_heads, head_dim\] = \[1, 8, 128\]"),
            ((torch.randn(1, D, self.HQ, device=self.dev).half().transpose(1, 2), out), "q must be contiguous"),
            ((q, CaiView(out, readonly=True)), "attend: out is read-only"),
        ]
        for (qq, oo), pattern in cases:
            with self.subTest(pattern=pattern), self.assertRaisesRegex(kvcomp.Error, pattern):
                cache.attend(0, [s], qq, oo)
        with self.assertRaisesRegex(kvcomp.Error, "unknown or removed sequence id 5"):
            cache.attend(0, [5], q, out)
        with self.assertRaisesRegex(kvcomp.Error, "read_block: block 0 not stored"):
            cache.read_block(0, s, 0, 0, kvcomp.Kind.Key)


class PlanDecodeTorch(TorchBase):
    """Plan-based decode (make_plan, set_plan, append_plan, attend_plan, check), run directly and in a CUDA graph."""
    L, H, HQ, D, T = 2, 2, 8, 128, 64
    PREFILL = [130, 64, 37]  # 2 closed blocks + tail, exactly 1 block, tail only
    STEPS = 70               # every sequence closes at least one more block in every layer
    SLOTS = [0, None, 1, 2]  # plan slot -> index into PREFILL; None: an idle slot

    def make_cache(self, pool_bytes=64 << 20, kv_heads=None, q_heads=None, pool_page_bytes=0):
        cfg = kvcomp.Config(layers=self.L, kv_heads=kv_heads or self.H, q_heads=q_heads or self.HQ,
                            head_dim=self.D, block_tokens=self.T, pool_bytes=pool_bytes, max_seqs=8,
                            max_tokens_per_seq=4096, pool_page_bytes=pool_page_bytes)
        return kvcomp.Cache(cfg)

    def prefill(self, cache, k, v):
        """Eager prefill of PREFILL tokens, every layer in order; k, v: [layers, sum(PREFILL), H, D]."""
        seqs = [cache.add_sequence() for _ in self.PREFILL]
        for layer in range(self.L):
            cache.append(layer, seqs, self.PREFILL, k[layer], v[layer])
        return seqs

    def assert_tokens(self, cache, seqs, steps, what):
        got = [[cache.tokens(s, layer) for layer in range(self.L)] for s in seqs]
        self.assertEqual(got, [[n + steps] * self.L for n in self.PREFILL], f"{what}: tokens after {steps} steps")

    def inputs(self):
        """Prefill K/V, then per step and layer: K/V rows for the plan's slots ([..., :D] of 2D-wide buffers:
        row stride 2HD, head stride 2D) and q."""
        L, H, HQ, D, B, N = self.L, self.H, self.HQ, self.D, len(self.SLOTS), self.STEPS
        kp = torch.randn(L, sum(self.PREFILL), H, D, device=self.dev).half()
        vp = torch.randn(L, sum(self.PREFILL), H, D, device=self.dev).half()
        kd = torch.randn(N, L, B, H, 2 * D, device=self.dev).half()[..., :D]
        vd = torch.randn(N, L, B, H, 2 * D, device=self.dev).half()[..., :D]
        qd = torch.randn(N, L, B, HQ, D, device=self.dev).half()
        return kp, vp, kd, vd, qd

    def plan_slots(self, seqs):
        return [-1 if i is None else seqs[i] for i in self.SLOTS]

    def run_plan_direct(self, kp, vp, kd, vd, qd):
        cache = self.make_cache()
        seqs = self.prefill(cache, kp, vp)
        plan = cache.make_plan(len(self.SLOTS))
        self.assertEqual(plan.batch, len(self.SLOTS))
        self.assertEqual(repr(plan), f"DecodePlan(id={plan.id}, batch={plan.batch}, tokens=1)")
        cache.set_plan(plan, self.plan_slots(seqs))
        outs = torch.full(qd.shape, float("nan"), dtype=qd.dtype, device=self.dev)
        for step in range(self.STEPS):
            for layer in range(self.L):
                cache.append_plan(plan, layer, kd[step, layer], vd[step, layer])
                cache.attend_plan(plan, layer, qd[step, layer], outs[step, layer])
            self.assert_tokens(cache, seqs, step + 1, "plan")
        cache.check()
        return outs

    def run_plan_graph(self, kp, vp, kd, vd, qd):
        """One step for all layers captured once, replayed per token on static inputs."""
        cache = self.make_cache()
        seqs = self.prefill(cache, kp, vp)
        plan = cache.make_plan(len(self.SLOTS))
        cache.set_plan(plan, self.plan_slots(seqs))
        k_in = torch.zeros(kd.shape[1:], dtype=kd.dtype, device=self.dev)  # contiguous [L, B, H, D]
        v_in = torch.zeros_like(k_in)
        q_in = torch.zeros(qd.shape[1:], dtype=qd.dtype, device=self.dev)
        out_in = torch.zeros_like(q_in)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for layer in range(self.L):
                cache.append_plan(plan, layer, k_in[layer], v_in[layer])
                cache.attend_plan(plan, layer, q_in[layer], out_in[layer])
        self.assert_tokens(cache, seqs, 0, "graph after capture")  # capturing stores nothing
        outs = torch.full(qd.shape, float("nan"), dtype=qd.dtype, device=self.dev)
        for step in range(self.STEPS):
            k_in.copy_(kd[step])
            v_in.copy_(vd[step])
            q_in.copy_(qd[step])
            graph.replay()
            outs[step].copy_(out_in)
            self.assert_tokens(cache, seqs, step + 1, "graph")
        cache.check()
        return cache, seqs, outs

    def run_eager(self, kp, vp, kd, vd, qd):
        """The same steps through the eager calls, for the live slots only."""
        cache = self.make_cache()
        seqs = self.prefill(cache, kp, vp)
        live = torch.tensor([i for i, x in enumerate(self.SLOTS) if x is not None], device=self.dev)
        order = [seqs[x] for x in self.SLOTS if x is not None]
        outs = torch.full(qd.shape, float("nan"), dtype=qd.dtype, device=self.dev)
        out = torch.empty(len(order), self.HQ, self.D, dtype=qd.dtype, device=self.dev)
        for step in range(self.STEPS):
            for layer in range(self.L):
                cache.append(layer, order, [1] * len(order), kd[step, layer, live], vd[step, layer, live])
                cache.attend(layer, order, qd[step, layer, live], out)
                outs[step, layer, live] = out
        self.assert_tokens(cache, seqs, self.STEPS, "eager")
        return cache, seqs, outs

    def assert_close_to_eager(self, got, eager, v_max, what):
        """Both attend over the same stored K/V: each within fp16 rounding and fp32 noise of the other."""
        got, eager = got.double().cpu(), eager.double().cpu()
        self.assertTrue(torch.isfinite(got).all(), f"{what}: unwritten or non-finite output (seed {SEED})")
        err = (got - eager).abs()
        worst = (err - (REL["float16"] * eager.abs() + ABS * v_max)).max().item()
        self.assertLessEqual(worst, 0.0, f"{what}: max |plan - eager| {err.max().item():.3g} exceeds the "
                                         f"tolerance by {worst:.3g} (seed {SEED})")

    def test_plan_decode_direct_graph_and_eager_agree(self):
        kp, vp, kd, vd, qd = self.inputs()
        direct = self.run_plan_direct(kp, vp, kd, vd, qd)
        graph_cache, graph_seqs, graph = self.run_plan_graph(kp, vp, kd, vd, qd)
        eager_cache, eager_seqs, eager = self.run_eager(kp, vp, kd, vd, qd)
        torch.cuda.synchronize()
        self.assertTrue(torch.equal(direct, graph), f"plan calls direct and replayed in a CUDA graph differ "
                                                    f"(seed {SEED})")
        idle = [i for i, x in enumerate(self.SLOTS) if x is None]
        self.assertTrue(bool((direct[:, :, idle] == 0).all()), "an idle slot's output must be zero")
        live = [i for i, x in enumerate(self.SLOTS) if x is not None]
        v_max = max(vp.abs().max().item(), vd.abs().max().item())
        self.assert_close_to_eager(direct[:, :, live], eager[:, :, live], v_max, "plan vs eager")

        # Eager calls after plan-based appends continue where the plan left off.
        order_g = [graph_seqs[x] for x in self.SLOTS if x is not None]
        order_e = [eager_seqs[x] for x in self.SLOTS if x is not None]
        k1 = torch.randn(self.L, len(order_g), self.H, self.D, device=self.dev).half()
        v1 = torch.randn(self.L, len(order_g), self.H, self.D, device=self.dev).half()
        q1 = torch.randn(self.L, len(order_g), self.HQ, self.D, device=self.dev).half()
        outs = []
        for cache, order in ((graph_cache, order_g), (eager_cache, order_e)):
            out = torch.empty(self.L, len(order), self.HQ, self.D, dtype=torch.float16, device=self.dev)
            for layer in range(self.L):
                cache.append(layer, order, [1] * len(order), k1[layer], v1[layer])
                cache.attend(layer, order, q1[layer], out[layer])
            self.assertEqual([cache.tokens(s, layer) for s in order for layer in range(self.L)],
                             [n + self.STEPS + 1 for n in self.PREFILL for _ in range(self.L)])
            outs.append(out)
        self.assert_close_to_eager(outs[0], outs[1], max(v_max, v1.abs().max().item()), "eager after plan")

    def test_plan_misuse_raises_before_device_work(self):
        cache, other = self.make_cache(), self.make_cache()
        s = cache.add_sequence()
        plan = cache.make_plan(2)
        foreign = other.make_plan(2)
        B, H, HQ, D = 2, self.H, self.HQ, self.D
        k = torch.randn(B, H, D, device=self.dev).half()
        q = torch.randn(B, HQ, D, device=self.dev).half()
        out = torch.empty_like(q)
        with self.assertRaisesRegex(kvcomp.Error, r"set_plan: DecodePlan\(id=\d+, batch=2, tokens=1\) was made by another Cache"):
            cache.set_plan(foreign, [s, -1])
        with self.assertRaisesRegex(kvcomp.Error, r"append_plan: DecodePlan\(id=-1, batch=0, tokens=1\) was not made by a"):
            cache.append_plan(kvcomp.DecodePlan(), 0, k, k)
        cache.set_plan(plan, [s, -1])
        cases = [
            (lambda: cache.append_plan(plan, 0, k[:1], k[:1]),
             r"append_plan: k must be \[plan.batch \* plan.tokens, kv_heads, head_dim\] = \[2, 2, 128\], got \[1, 2, 128\]"),
            (lambda: cache.append_plan(plan, 0, k, k.float()), "append_plan: v must be float16, got float32"),
            (lambda: cache.append_plan(plan, 0, k, torch.randn(B, H, 2 * D, device=self.dev).half()[..., :D]),
             "append_plan: k and v must have the same strides"),
            (lambda: cache.append_plan(plan, 0, k.cpu(), k), r"k is not a CUDA array \(DLPack device: CPU\)"),
            (lambda: cache.attend_plan(plan, 0, q.float(), out), "attend_plan: q must be float16 or bfloat16"),
            (lambda: cache.attend_plan(plan, 0, q[:1], out[:1]),
             r"attend_plan: q must be \[plan.batch \* plan.tokens, q_heads, head_dim\] = \[2, 8, 128\], got \[1, 8, 128\]"),
            (lambda: cache.attend_plan(plan, 0, q, CaiView(out, readonly=True)), "attend_plan: out is read-only"),
            (lambda: cache.attend_plan(foreign, 0, q, out), "attend_plan: .* was made by another Cache"),
        ]
        for call, pattern in cases:
            with self.subTest(pattern=pattern), self.assertRaisesRegex(kvcomp.Error, pattern):
                call()
        cache.check()  # nothing failed on the device
        self.assertEqual(cache.tokens(s, 0), 0)

    def test_pool_full_raises_from_check_and_a_replay_after_remove_sequence_completes_the_step(self):
        # One KV head: a sequence's blocks of a block round (K+V of each layer) are small next to a page.
        H, HQ, B = 1, 4, 2
        page = self.make_cache(pool_bytes=4 << 20, kv_heads=H, q_heads=HQ).stats().pool_page_bytes
        self.assertGreater(page, 0)
        cache = self.make_cache(pool_bytes=3 * page, pool_page_bytes=page, kv_heads=H, q_heads=HQ)
        st = cache.stats()
        self.assertEqual(st.pool_page_bytes, page)
        self.assertLessEqual(st.pool_capacity, 3 * page)
        # Eager prefill: `other` one block per layer, `s` one block and a tail.
        other, s = cache.add_sequence(), cache.add_sequence()
        lengths = [self.T, self.T + 40]
        for layer in range(self.L):
            kv = torch.randn(sum(lengths), H, self.D, device=self.dev).half()
            cache.append(layer, [other, s], lengths, kv, kv.clone())
        cache.check()
        st = cache.stats()
        self.assertGreater(st.pool_bytes_in_use, 0)
        self.assertEqual(st.pool_bytes_in_use % page, 0)

        plan = cache.make_plan(B)
        cache.set_plan(plan, [s, -1])  # only s decodes
        k_in = torch.zeros(self.L, B, H, self.D, dtype=torch.float16, device=self.dev)
        v_in = torch.zeros_like(k_in)
        q_in = torch.zeros(self.L, B, HQ, self.D, dtype=torch.float16, device=self.dev)
        out_in = torch.zeros_like(q_in)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for layer in range(self.L):
                cache.append_plan(plan, layer, k_in[layer], v_in[layer])
                cache.attend_plan(plan, layer, q_in[layer], out_in[layer])

        def new_token():
            for t in (k_in, v_in, q_in):
                t.copy_(torch.randn(t.shape, device=self.dev))

        def tokens(seq):
            return [cache.tokens(seq, layer) for layer in range(self.L)]

        n, failure = lengths[1], None
        for _ in range(40 * self.T):  # far more blocks than 3 pages hold
            new_token()
            graph.replay()
            try:
                cache.check()
            except kvcomp.Error as e:
                failure = e
                break
            n += 1
            self.assertEqual(tokens(s), [n] * self.L)
        self.assertIsNotNone(failure, f"the pool of {3 * page} bytes never filled")
        self.assertRegex(str(failure), "pool is full")
        self.assertIn(str(s), str(failure))  # names the failed sequence
        cache.check()  # the raise cleared the records
        self.assertEqual(n % self.T, self.T - 1, "only a step that closes blocks needs pool space")
        got = tokens(s)
        # A layer stores only after the layer before it: the last layer failed, the first may have stored.
        self.assertEqual(got[-1], n, got)
        self.assertTrue(all(x in (n, n + 1) for x in got) and got == sorted(got, reverse=True), got)
        self.assertEqual(tokens(other), [self.T] * self.L)

        graph.replay()  # still full: fails again, stores nothing more
        with self.assertRaisesRegex(kvcomp.Error, "pool is full"):
            cache.check()
        self.assertEqual(tokens(s), got)

        in_use = cache.stats().pool_bytes_in_use
        cache.remove_sequence(other)
        self.assertLess(cache.stats().pool_bytes_in_use, in_use)
        graph.replay()  # the same step, the same inputs: stores exactly what is missing
        cache.check()
        self.assertEqual(tokens(s), [n + 1] * self.L)
        new_token()
        graph.replay()
        cache.check()
        self.assertEqual(tokens(s), [n + 2] * self.L)
        torch.cuda.synchronize()
        self.assertTrue(bool(torch.isfinite(out_in[:, 0]).all()))
        self.assertTrue(bool((out_in[:, 1] == 0).all()), "an idle slot's output must be zero")


class SpeculativeTorch(TorchBase):
    """A verification step of several tokens per slot (make_plan(batch, tokens=n)) captured in a torch CUDA graph
    with rollback_plan of the rejected drafts (counts in a CUDA int32 tensor): the same tokens and outputs as eager appends and
    multi-token attends of the same rows (the same values: outputs within float rounding of other splits)."""
    L, H, HQ, D, T, N, R = 2, 2, 8, 128, 32, 3, 3

    def make_cache(self):
        cfg = kvcomp.Config(layers=self.L, kv_heads=self.H, q_heads=self.HQ, head_dim=self.D, block_tokens=self.T,
                            pool_bytes=32 << 20, max_seqs=4, max_attend_batch=8, max_tokens_per_seq=2048,
                            max_rollback=self.R)
        return kvcomp.Cache(cfg)

    def test_verify_steps_in_a_graph_with_rollbacks(self):
        L, H, HQ, D, N, B = self.L, self.H, self.HQ, self.D, self.N, 2
        graphed, eager = self.make_cache(), self.make_cache()
        gs = [graphed.add_sequence() for _ in range(B)]
        es = [eager.add_sequence() for _ in range(B)]
        prompt = [45, 20]
        for layer in range(L):
            k = torch.randn(sum(prompt), H, D, device=self.dev).half()
            v = torch.randn(sum(prompt), H, D, device=self.dev).half()
            graphed.append(layer, gs, prompt, k, v)
            eager.append(layer, es, prompt, k, v)
        plan = graphed.make_plan(B, tokens=N)
        self.assertEqual((plan.batch, plan.tokens), (B, N))
        graphed.set_plan(plan, gs)
        k_in = torch.zeros(L, B * N, H, D, dtype=torch.float16, device=self.dev)
        v_in = torch.zeros_like(k_in)
        q_in = torch.zeros(L, B * N, HQ, D, dtype=torch.float16, device=self.dev)
        out_in = torch.zeros_like(q_in)
        rejected_in = torch.zeros(B, dtype=torch.int32, device=self.dev)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for layer in range(L):
                graphed.append_plan(plan, layer, k_in[layer], v_in[layer])
                graphed.attend_plan(plan, layer, q_in[layer], out_in[layer])
            graphed.rollback_plan(plan, rejected_in)  # the rejected drafts go, inside the graph
        lengths = list(prompt)
        gen = torch.Generator().manual_seed(SEED)
        for step in range(40):
            for t in (k_in, v_in, q_in):
                t.copy_(torch.randn(t.shape, device=self.dev))
            rejected = torch.randint(0, N + 1, (B,), generator=gen, dtype=torch.int32)
            rejected_in.copy_(rejected)
            graph.replay()
            graphed.check()
            out = torch.empty_like(out_in)
            for layer in range(L):
                eager.append(layer, es, [N] * B, k_in[layer], v_in[layer])
                eager.attend(layer, es, q_in[layer], out[layer], n_queries=[N] * B)
            torch.cuda.synchronize()
            err = (out_in.float() - out.float()).abs().max().item()
            self.assertLess(err, 2e-3 * max(1.0, out.float().abs().max().item()), f"step {step}")
            for b in range(B):
                eager.rollback(es[b], int(rejected[b]))
                lengths[b] += N - int(rejected[b])
            self.assertEqual([[graphed.tokens(s, layer) for layer in range(L)] for s in gs],
                             [[n] * L for n in lengths])
        self.assertEqual([eager.tokens(s, 0) for s in es], lengths)
        with self.assertRaisesRegex(kvcomp.Error, "n_rejected must be int32"):
            graphed.rollback_plan(plan, rejected_in.float())
        with self.assertRaisesRegex(kvcomp.Error, r"n_rejected must be \[plan.batch\] = \[2\]"):
            graphed.rollback_plan(plan, rejected_in[:1])
        graphed.rollback_plan(plan, torch.tensor([self.R + 1, 0], dtype=torch.int32, device=self.dev))
        with self.assertRaisesRegex(kvcomp.Error, f"rollback refused: sequence {gs[0]}"):
            graphed.check()
        self.assertEqual(graphed.tokens(gs[0], 0), lengths[0])
        with self.assertRaisesRegex(kvcomp.Error, r"tokens_per_slot 33 out of range \[1, 32\]"):
            graphed.make_plan(1, tokens=33)
        with self.assertRaisesRegex(kvcomp.Error, r"query rows out of range \[1, 8\]"):
            graphed.make_plan(3, tokens=3)


class BaselinesTorch(TorchBase):
    def test_kivi_against_float64_over_its_reconstruction(self):
        B, H, HQ, D, N = 2, 2, 8, 128, 300
        for bits in (2, 4):
            with self.subTest(bits=bits):
                k = torch.randn(B, H, N, D, device=self.dev).half()
                v = torch.randn(B, H, N, D, device=self.dev).half()
                q = torch.randn(B, HQ, D, device=self.dev).half()
                out = torch.full_like(q, float("nan"))
                cache = kvcomp.baselines.KiviCache(B, H, HQ, D, N, bits=bits, window=32)
                with self.assertRaisesRegex(kvcomp.Error, "call build\\(\\) first"):
                    cache.attend(q, out)
                cache.build(k, v)
                cache.attend(q, out)
                torch.cuda.synchronize()
                self.assertLess(cache.bytes(), 2 * B * H * N * D * 2)  # smaller than fp16 K+V
                kb, vb = kvcomp.baselines.kivi_reference(B, H, HQ, D, N, bits, 32, host_f32(k), host_f32(v))
                kr, vr = floats(kb, B, H, N, D), floats(vb, B, H, N, D)
                for b in range(B):
                    ref = attention64(q[b], kr[b].permute(1, 0, 2), vr[b].permute(1, 0, 2))
                    self.assert_attention_close(out[b], ref, vr[b], REL["float16"], f"KIVI-{bits} seq {b}")

    def test_flash_decode_fp16_strided(self):
        B, H, HQ, D, N = 3, 2, 8, 64, 1000
        # Spare capacity per head: [B, H, N + 16, D] sliced to N tokens (head stride (N + 16) D).
        k = torch.randn(B, H, N + 16, D, device=self.dev).half()[:, :, :N]
        v = torch.randn(B, H, N + 16, D, device=self.dev).half()[:, :, :N]
        q = torch.randn(B, HQ, D, device=self.dev).half()
        out = torch.full_like(q, float("nan"))
        kvcomp.baselines.flash_decode_fp16(k, v, q, out)
        torch.cuda.synchronize()
        for b in range(B):
            ref = attention64(q[b], k[b].permute(1, 0, 2), v[b].permute(1, 0, 2))
            self.assert_attention_close(out[b], ref, v[b], REL["float16"], f"flash seq {b}")
        with self.assertRaisesRegex(kvcomp.Error, "k and v must have the same strides"):
            kvcomp.baselines.flash_decode_fp16(k, v.contiguous(), q, out)


if __name__ == "__main__":
    if SKIP:
        print(f"python_package_gpu: skipped: {SKIP}")
        sys.exit(77)
    print(f"seed {SEED} (KVCOMP_TEST_SEED={SEED} repeats it)")
    unittest.main(verbosity=2)
