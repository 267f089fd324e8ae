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

    def make_cache(self, dtype):
        # kv head 1 has its own bounds: absolute for K, a tighter relative one for V.
        over = kvcomp.BoundOverride(layer=0, kv_head=1, k=kvcomp.ErrorBound(kvcomp.BoundMode.Absolute, 0.02),
                                    v=kvcomp.ErrorBound(kvcomp.BoundMode.Relative, 0.02))
        cfg = kvcomp.Config(layers=1, kv_heads=self.H, q_heads=self.HQ, head_dim=self.D, dtype=dtype,
                            block_tokens=self.T, pool_bytes=64 << 20, max_seqs=8, max_tokens_per_seq=4096,
                            overrides=[over])
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
