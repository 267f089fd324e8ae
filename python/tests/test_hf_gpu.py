"""kvcomp.hf on the GPU with the shipped tiny Llama: generate() through kvcomp,
the token-by-token cache path against the model's own forward, and the KIVI
emulation against the fused KIVI baseline kernel. Skips without torch,
transformers or a CUDA device."""
import os
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "tiny-llama-hd64")

try:
    import torch
    import transformers  # noqa: F401
    HAVE = torch.cuda.is_available()
except ImportError:  # CPU-only machines: nothing to run here
    HAVE = False

PROMPT = "It was a dark and stormy night, and the old man"


@unittest.skipUnless(HAVE, "needs torch, transformers and a CUDA device")
class HfGpu(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import kvcomp.hf as hf

        cls.hf = hf
        cls.tok = AutoTokenizer.from_pretrained(MODEL)
        cls.model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float16).cuda().eval()
        cls.ref_model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float16).cuda().eval()
        hf.enable(cls.model)
        cls.ids = cls.tok(PROMPT, return_tensors="pt")["input_ids"].cuda()

    def generate(self, model, cache, n=24):
        with torch.no_grad():
            return model.generate(self.ids, attention_mask=torch.ones_like(self.ids), past_key_values=cache,
                                  max_new_tokens=n, do_sample=False, pad_token_id=0)

    def test_generate_at_tight_bound_matches_transformers_cache(self):
        import kvcomp

        ref = self.generate(self.ref_model, None)
        for prefill, transform in (("fp16", None), ("cache", None), ("fp16", "hadamard")):
            cfg = kvcomp.Config()
            cfg.k_bound = kvcomp.ErrorBound(kvcomp.BoundMode.Relative, 0.001)
            cfg.v_bound = kvcomp.ErrorBound(kvcomp.BoundMode.Relative, 0.001)
            cache = self.hf.KvcompCache(self.model, cfg, prefill=prefill, transform=transform)
            out = self.generate(self.model, cache)
            self.assertEqual(out.tolist(), ref.tolist(),
                             f"prefill={prefill}, transform={transform}: " + self.tok.decode(out[0]))
            # The prompt and every generated token but the last went through the cache.
            self.assertEqual(cache.cache.tokens(cache.seqs[0], 0), out.shape[1] - 1)

    def test_padded_batch_generates_each_row_as_alone(self):
        """Left-padded prompts of different lengths: each row's tokens equal that prompt generated alone."""
        import kvcomp

        prompts = [PROMPT, "The ship", "She said that the house was"]
        n = 16
        alone = []
        for p in prompts:
            ids = self.tok(p, return_tensors="pt")["input_ids"].cuda()
            with torch.no_grad():
                out = self.ref_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                              do_sample=False, pad_token_id=0)
            alone.append(out[0, ids.shape[1]:].tolist())
        rows = [self.tok(p)["input_ids"] for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows]).cuda()
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]).cuda()
        for prefill in ("fp16", "cache"):
            cfg = kvcomp.Config()
            cfg.k_bound = kvcomp.ErrorBound(kvcomp.BoundMode.Relative, 0.001)
            cfg.v_bound = kvcomp.ErrorBound(kvcomp.BoundMode.Relative, 0.001)
            cache = self.hf.KvcompCache(self.model, cfg, prefill=prefill)
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n,
                                          do_sample=False, pad_token_id=0)
            for i, r in enumerate(rows):
                self.assertEqual(out[i, width:].tolist(), alone[i], f"prefill={prefill}, row {i}")
                # Only the row's real tokens are stored: its prompt and all generated tokens but the last.
                self.assertEqual(cache.cache.tokens(cache.seqs[i], 0), len(r) + n - 1)
        with self.assertRaisesRegex(NotImplementedError, "padded batches"):
            with torch.no_grad():
                self.model(ids, attention_mask=mask, past_key_values=self.hf.KiviCache(self.model))

    def test_generate_at_default_bound_gives_text(self):
        cache = self.hf.KvcompCache(self.model)
        out = self.generate(self.model, cache, n=48)
        text = self.tok.decode(out[0])
        print("\nkvcomp.hf generate (default bound):", repr(text))
        self.assertTrue(text.startswith(PROMPT))
        self.assertGreater(len(set(out[0, self.ids.shape[1]:].tolist())), 8, "degenerate output")
        st = cache.stats()
        self.assertEqual(st.tokens, cache.n_layers * (out.shape[1] - 1))

    def test_reorder_and_select_fork_rows_that_decode_as_fresh_rows(self):
        """reorder_cache / batch_select_indices (beam search): the reordered cache decodes exactly as a cache
        filled in the new order, while the copied rows share their closed blocks."""
        with open(os.path.join(ROOT, "examples", "data", "eval_excerpt.txt")) as f:
            x = self.tok(f.read(), return_tensors="pt")["input_ids"][0, :260].cuda()
        L, n = 70, 4  # prompts past one 64-token block: a fork shares a closed block
        prompts = torch.stack([x[s:s + L] for s in (0, 90, 180)])
        steps = torch.stack([x[s + L:s + L + n] for s in (0, 90, 180)])

        def decode(cache, prompt_rows, step_rows, reorder=None):
            with torch.no_grad():
                self.model(prompt_rows, past_key_values=cache)
                if reorder is not None:
                    reorder(cache)
                return torch.cat([self.model(step_rows[:, t:t + 1], past_key_values=cache).logits.float()
                                  for t in range(step_rows.shape[1])], 1)

        order = [2, 0, 0]
        moved = self.hf.KvcompCache(self.model)
        got = decode(moved, prompts, steps[order], lambda c: c.reorder_cache(torch.tensor(order, device="cuda")))
        fresh = self.hf.KvcompCache(self.model)
        want = decode(fresh, prompts[order], steps[order])
        self.assertLess((got - want).abs().max().item(), 1e-3)
        self.assertTrue(torch.equal(got.argmax(-1), want.argmax(-1)))
        self.assertEqual(moved.batch, 3)
        for s in moved.seqs:
            self.assertEqual(moved.cache.tokens(s, 0), L + n)
        # Rows 1 and 2 share prompt 0's closed blocks; the fresh cache compressed prompt 0 twice.
        self.assertLess(moved.stats().compressed_bytes, fresh.stats().compressed_bytes)

        # Keep row 1 only: it decodes on as prompt 0 alone.
        more = x[L + n:L + n + 2][None]
        with torch.no_grad():
            moved.batch_select_indices(torch.tensor([1]))
            got = torch.cat([self.model(more[:, t:t + 1], past_key_values=moved).logits.float() for t in range(2)], 1)
        alone = self.hf.KvcompCache(self.model)
        want = decode(alone, prompts[:1], torch.cat([steps[:1], more], 1))[:, n:]
        self.assertLess((got - want).abs().max().item(), 1e-3)
        self.assertEqual(moved.batch, 1)
        with self.assertRaisesRegex(ValueError, "twice its first batch"):
            moved.batch_repeat_interleave(8)

    def test_beam_search_at_tight_bound_matches_transformers_cache(self):
        import kvcomp

        with torch.no_grad():
            ref = self.ref_model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=12,
                                          num_beams=3, do_sample=False, pad_token_id=0)
            cfg = kvcomp.Config()
            cfg.k_bound = kvcomp.ErrorBound(kvcomp.BoundMode.Relative, 0.001)
            cfg.v_bound = kvcomp.ErrorBound(kvcomp.BoundMode.Relative, 0.001)
            cache = self.hf.KvcompCache(self.model, cfg)
            out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), past_key_values=cache,
                                      max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
        self.assertEqual(out.tolist(), ref.tolist(), self.tok.decode(out[0]))
        self.assertEqual(cache.batch, 3)  # one kvcomp sequence per beam

    def test_prompt_lookup_decoding_takes_rejected_drafts_back(self):
        """Prompt-lookup decoding (speculative: drafts from n-grams of the prompt, verified as multi-token
        queries, the rejected ones cropped through kvcomp.Cache.rollback): at a tight bound, greedy tokens equal
        plain greedy decoding through transformers' cache; without rollback room, crop is a clear error."""
        import kvcomp

        text = PROMPT + " sat by the fire. " + PROMPT + " sat by the window. " + PROMPT
        ids = self.tok(text, return_tensors="pt")["input_ids"].cuda()
        mask = torch.ones_like(ids)
        cfg = kvcomp.Config()
        cfg.k_bound = kvcomp.ErrorBound(kvcomp.BoundMode.Relative, 0.001)
        cfg.v_bound = kvcomp.ErrorBound(kvcomp.BoundMode.Relative, 0.001)
        with torch.no_grad():
            ref = self.ref_model.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                                          pad_token_id=0)
            cache = self.hf.KvcompCache(self.model, cfg, max_rollback=16)
            out = self.model.generate(ids, attention_mask=mask, past_key_values=cache, prompt_lookup_num_tokens=6,
                                      max_new_tokens=48, do_sample=False, pad_token_id=0)
        self.assertEqual(out.tolist(), ref.tolist(), self.tok.decode(out[0]))
        self.assertGreater(cache.rolled_back, 0, "no draft was rejected: the test did not exercise crop")
        for layer in range(cache.n_layers):
            self.assertEqual(cache.cache.tokens(cache.seqs[0], layer), cache.get_seq_length())
        no_room = self.hf.KvcompCache(self.model, cfg)
        with torch.no_grad(), self.assertRaisesRegex(ValueError, "made with max_rollback=0"):
            self.model.generate(ids, attention_mask=mask, past_key_values=no_room, prompt_lookup_num_tokens=6,
                                max_new_tokens=48, do_sample=False, pad_token_id=0)

    def test_cache_path_matches_model_forward(self):
        """Teacher-forced: the token-by-token fp16 path equals the model's own causal forward."""
        with open(os.path.join(ROOT, "examples", "data", "eval_excerpt.txt")) as f:
            text = f.read()
        x = self.tok(text, return_tensors="pt")["input_ids"][:, :200].cuda()
        with torch.no_grad():
            ref = torch.log_softmax(self.ref_model(x).logits.float(), -1)
            got = torch.log_softmax(self.model(x, past_key_values=self.hf.Fp16Cache(self.model, prefill="cache"))
                                    .logits.float(), -1)
        self.assertLess((ref - got).abs().max().item(), 0.05)

    def test_other_caches_keep_sdpa_semantics(self):
        """With kvcomp enabled but a DynamicCache: a continuation of several tokens sees its prefix."""
        from transformers import DynamicCache

        with open(os.path.join(ROOT, "examples", "data", "eval_excerpt.txt")) as f:
            x = self.tok(f.read(), return_tensors="pt")["input_ids"][:, :120].cuda()
        with torch.no_grad():
            ref = self.ref_model(x).logits[:, 100:].float()
            cache = DynamicCache(config=self.model.config)
            self.model(x[:, :100], past_key_values=cache)
            got = self.model(x[:, 100:], past_key_values=cache).logits.float()
        self.assertLess((ref - got).abs().max().item(), 0.05)

    def test_the_callers_config_is_not_changed(self):
        import kvcomp

        cfg = kvcomp.Config()
        cache = self.hf.KvcompCache(self.model, cfg, transform="hadamard")
        self.generate(self.model, cache, n=2)
        self.assertEqual(cfg.transform, kvcomp.Transform.None_)
        self.assertEqual((cfg.layers, cfg.head_dim, cfg.max_seqs), (1, 128, 64))
        self.assertEqual(cache.cache.config.transform, kvcomp.Transform.Hadamard)
        self.assertEqual(cache.cache.config.max_seqs, 2)  # the batch of 1, and room for a reorder's fork

    def test_kivi_emulation_matches_fused_kivi_kernel(self):
        import kvcomp

        if not hasattr(kvcomp, "baselines"):
            self.skipTest("kvcomp.baselines not built")
        g = torch.Generator(device="cuda").manual_seed(1234)
        B, H, Hq, D, N = 2, 2, 8, 64, 200
        k = torch.randn(B, H, N, D, device="cuda", generator=g).half()
        v = torch.randn(B, H, N, D, device="cuda", generator=g).half()
        k[..., 5] = k[..., 5] * 10 + 3  # an outlier channel
        q = torch.randn(B, Hq, D, device="cuda", generator=g).half()
        for bits in (2, 4):
            fused = kvcomp.baselines.KiviCache(B, H, Hq, D, N, bits, 32)
            fused.build(k.contiguous(), v.contiguous())
            out = torch.empty_like(q)
            fused.attend(q, out)
            torch.cuda.synchronize()
            # Emulation: store all N tokens in one go, then attend.
            cache = self.hf.KiviCache(self.model, bits=bits, window=32)
            cache.n_layers, cache.kv_heads, cache.head_dim = 1, H, D
            layer = cache.layers[0]
            layer.dtype, layer.device, layer.is_initialized = torch.float16, k.device, True
            cache.batch = B
            layer._store_prompt(k, v)
            layer.length = N
            emu = layer._attend_token(q, D ** -0.5)
            err = (emu.float() - out.float()).abs().max().item()
            self.assertLess(err, 4e-3, f"{bits}-bit: fused KIVI vs emulation differ by {err}")
            self.assertEqual(fused.bytes(), layer.bytes(), f"{bits}-bit byte count")


if __name__ == "__main__":
    if not HAVE:
        print("python_hf_gpu: skipped: needs torch, transformers and a CUDA device")
        sys.exit(77)
    unittest.main(verbosity=2)
