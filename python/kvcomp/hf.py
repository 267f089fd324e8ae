"""kvcomp.hf: Hugging Face transformers models decoding through kvcomp.

    import kvcomp.hf
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).cuda()
    kvcomp.hf.enable(model)                          # registers the "kvcomp" attention
    cache = kvcomp.hf.KvcompCache(model, kvcomp.Config(k_bound=..., v_bound=...))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64, do_sample=False)

How it plugs in: the cache's `update()` does not store anything itself. It
hands the new K/V to the model's attention call (tagged with the cache layer),
and the registered attention function stores them and attends:
  - one query token per sequence (decode): append the token's K/V to kvcomp,
    then run the fused kernel over the compressed cache;
  - a prompt into an empty cache with prefill="fp16" (what engines do): the
    prompt attends to itself exactly (PyTorch SDPA, causal), then all of its
    K/V are appended in one call;
  - several new tokens after a prefix with prefill="fp16" (speculative
    verification, a continued prompt; KvcompCache): appended together, then
    attended as multi-token queries (each causal over the cache and the new
    tokens before it; blocks decoded once for all of a row's queries);
  - anything else (prefill="cache"; the other caches): token by token, append
    then attend, so every query reads the cache exactly as a decode step
    would (teacher-forced decoding; what the perplexity harness uses).
The same layer protocol serves `KiviCache` (KIVI-style fixed-width
quantization, emulated exactly in PyTorch) and `Fp16Cache` (an uncompressed
cache through the same token-by-token path), so one harness runs all three.

Padded batches (generate() on prompts of different lengths, left padding):
KvcompCache stores only each row's real tokens (a kvcomp sequence per row, of
its own length); KiviCache and Fp16Cache refuse padding.

Beam search and other batch reordering (reorder_cache, batch_select_indices,
batch_repeat_interleave): KvcompCache makes each new row a fork of the row it
copies (kvcomp.Cache.fork: closed blocks are shared, not copied; the open tail
is copied), so reordering moves no compressed bytes. The kvcomp cache is made
for twice the first batch of sequences, room for the forks of a reorder.
Assisted and prompt-lookup decoding (generate(assistant_model=...) or
prompt_lookup_num_tokens=...): KvcompCache.crop takes the rejected draft
tokens back (kvcomp.Cache.rollback); make the cache with max_rollback at
least the most draft tokens a step verifies (assistant_model:
num_assistant_tokens, 20 by default; prompt lookup: prompt_lookup_num_tokens)
and at most block_tokens, e.g. KvcompCache(model, cfg, max_rollback=24).
Limits (each raises a clear error): cropping and reordering are KvcompCache's
only (KiviCache and Fp16Cache are harness caches); crop takes back at most
max_rollback tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

import kvcomp

ATTENTION_NAME = "kvcomp"

__all__ = ["enable", "KvcompCache", "KiviCache", "Fp16Cache", "attention_forward", "ATTENTION_NAME"]


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention function registered as "kvcomp" (transformers' attention interface).

    query [B, Hq, n, D]; key/value [B, Hkv, n, D] are the step's new tokens as
    handed over by a kvcomp.hf cache. Returns ([B, n, Hq, D], None).
    """
    for name in ("sliding_window", "softcap", "s_aux"):  # attention variants neither path here implements
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"kvcomp.hf: attention with {name} (this model's) is not supported")
    layer = getattr(key, "_kvcomp_layer", None)
    if layer is None:  # no kvcomp.hf cache in this call (e.g. use_cache=False, a DynamicCache): plain SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        mask = _as_sdpa_mask(attention_mask, query.shape[2], key.shape[2], query.device)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = layer.attend(query, key, value, attention_mask, float(scaling))
    return out.transpose(1, 2).contiguous(), None


def padding_mask(batch_size=None, q_length=None, kv_length=None, attention_mask=None, **kwargs):
    """The mask function registered for "kvcomp": the 2D padding mask [B, kv_length] as it is (True = a real
    token), or None. The kvcomp attention needs no causal mask (a query sees the cache as it is when it
    attends), only which of the step's tokens are padding."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    return (attention_mask[:, -kv_length:] if kv_length else attention_mask).bool()


def _as_sdpa_mask(attention_mask, q_length, kv_length, device):
    """SDPA's 4D boolean mask for q_length queries that are the last of kv_length keys (causal, bottom-right,
    and the 2D padding mask if given), or None where SDPA's own is_causal is right: no padding and as many
    queries as keys, or a single query."""
    if attention_mask is not None and attention_mask.dim() != 2:
        return attention_mask  # already 4D
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (q_length == 1 or q_length == kv_length):
        return None
    q_pos = torch.arange(kv_length - q_length, kv_length, device=device)
    keys = torch.arange(kv_length, device=device)
    mask = (keys[None, :] <= q_pos[:, None])[None]  # [1, q, kv]
    if padded:
        mask = mask & attention_mask[:, None, -kv_length:].bool()
        mask = mask | (keys[None, :] == q_pos[:, None])[None]  # a query sees itself: no empty row
    return mask[:, None]


def enable(model):
    """Registers the "kvcomp" attention and mask functions and switches `model` to them."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:
        model.config._attn_implementation = ATTENTION_NAME
    return model


def _model_shape(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    q_heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or q_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
    return cfg.num_hidden_layers, q_heads, kv_heads, head_dim


def _valid_tokens(attention_mask, n):
    """[B, n] bool of the step's real (not padding) tokens, or None when all are real.

    The mask function registered for "kvcomp" (padding_mask) passes the 2D mask
    [B, past + n] through; False/0 marks padding.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    valid = attention_mask[:, -n:].bool()
    return None if bool(valid.all()) else valid


class _Layer(CacheLayerMixin):
    """One decoder layer's view of a kvcomp.hf cache (transformers' layer protocol)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner, index):
        super().__init__()
        self.owner, self.index = owner, index
        self.length = 0          # tokens stored per sequence (all rows equal)
        self.pending = False     # update() handed K/V over; attention has not taken them yet

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.pending:
            raise RuntimeError("kvcomp.hf: the previous step's K/V never reached the kvcomp attention function; "
                               "call kvcomp.hf.enable(model) before decoding with a kvcomp.hf cache")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.owner._start(key_states)
        self.pending = True
        key_states._kvcomp_layer = self
        return key_states, value_states

    def attend(self, q, k, v, attention_mask, scaling):
        """Stores k/v [B, Hkv, n, D] and returns attention of q [B, Hq, n, D] (same layout)."""
        self.pending = False
        n = q.shape[2]
        valid = _valid_tokens(attention_mask, n)
        if valid is not None:
            if not self.supports_padding:
                raise NotImplementedError(f"kvcomp.hf: padded batches are not supported by {type(self.owner).__name__}"
                                          " (every row must have the same length)")
            return self._attend_padded(q, k, v, valid, scaling)
        if n > 1 and self.length == 0 and self.owner.prefill == "fp16":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                 enable_gqa=q.shape[1] != k.shape[1])
            self._store_prompt(k, v)
            self.length = n
            self.owner._note_bytes(self)
            return out
        out = torch.empty_like(q)
        for t in range(n):  # decode semantics: each query sees the cache holding tokens <= its own
            self._store_token(k[:, :, t], v[:, :, t])
            self.length += 1
            self.owner._note_bytes(self)
            out[:, :, t] = self._attend_token(q[:, :, t], scaling)
        return out

    def get_seq_length(self):
        return self.length

    def get_mask_sizes(self, query_length):
        return self.length + query_length, 0

    def get_max_length(self):
        return -1

    def reset(self):
        raise NotImplementedError("kvcomp.hf: reset() is not supported; make a new cache")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("kvcomp.hf: beam search (cache reordering) is not supported")

    def crop(self, tokens_to_remove):
        raise NotImplementedError("kvcomp.hf: cropping the cache is not supported")

    def batch_repeat_interleave(self, repeats):
        raise NotImplementedError("kvcomp.hf: expanding the batch of a cache is not supported")

    def batch_select_indices(self, indices):
        raise NotImplementedError("kvcomp.hf: selecting batch rows of a cache is not supported")

    supports_padding = False

    # Backend hooks.
    def _attend_padded(self, q, k, v, valid, scaling):
        raise NotImplementedError

    def _store_prompt(self, k, v):
        raise NotImplementedError

    def _store_token(self, k, v):
        raise NotImplementedError

    def _attend_token(self, q, scaling):
        raise NotImplementedError

    def bytes(self):
        """KV bytes this layer holds now, everything counted."""
        raise NotImplementedError


class _CacheBase(Cache):
    """Shared by the kvcomp, KIVI and fp16 caches: layers, byte accounting."""

    layer_class = _Layer
    track_bytes = False  # set True to accumulate mean_bytes_per_token() (one stats() per layer and token)

    def __init__(self, model, prefill="fp16"):
        if prefill not in ("fp16", "cache"):
            raise ValueError("prefill must be 'fp16' (prompt attends exactly, then is stored) or 'cache' "
                             "(every prompt token reads the cache as in decode)")
        self.n_layers, self.q_heads, self.kv_heads, self.head_dim = _model_shape(model)
        super().__init__(layers=[self.layer_class(self, i) for i in range(self.n_layers)])
        self.prefill = prefill
        self.batch = None
        # Sum over decode moments of the bytes held and of the tokens held: their
        # ratio is the mean KV bytes per token over the cache's life.
        self.byte_steps = 0
        self.token_steps = 0

    def _start(self, key_states):
        b = key_states.shape[0]
        if self.batch is None:
            self.batch = b
            self._allocate(key_states)
        elif b != self.batch:
            raise ValueError(f"kvcomp.hf: the cache holds a batch of {self.batch}, got {b}")

    def _allocate(self, key_states):
        pass

    def _note_bytes(self, layer):
        if self.track_bytes:
            self.byte_steps += layer.bytes()
            self.token_steps += layer.length * self.batch

    def bytes(self):
        return sum(layer.bytes() for layer in self.layers)

    def fp16_bytes(self):
        return sum(layer.length for layer in self.layers) * (self.batch or 0) * self.kv_heads * self.head_dim * 4

    def mean_bytes_per_token(self):
        """KV bytes per token (all layers), averaged over every moment a token was added."""
        return self.n_layers * self.byte_steps / max(self.token_steps, 1)


# ----------------------------------------------------------------------------- kvcomp


_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_CONFIG_FIELDS = ("layers", "kv_heads", "q_heads", "head_dim", "dtype", "block_tokens", "k_bound", "v_bound",
                  "overrides", "pool_bytes", "pool_page_bytes", "max_seqs", "max_attend_batch", "max_tokens_per_seq",
                  "transform", "max_rollback", "tail_format")


class _KvcompLayer(_Layer):
    # Padded batches (e.g. generate() on prompts of different lengths): every
    # kvcomp sequence holds only its row's real tokens, so its length is its
    # own; padding is never stored and never attended to.
    supports_padding = True

    def _attend_padded(self, q, k, v, valid, scaling):
        B, Hq, n, D = q.shape
        if n > 1 and self.length == 0 and self.owner.prefill == "fp16":
            # Prompt: exact causal attention over the row's real tokens; a padding query attends to itself only.
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            mask = causal[None] & valid[:, None, :]
            mask |= torch.eye(n, dtype=torch.bool, device=q.device)[None] & ~valid[:, :, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scaling,
                                                 enable_gqa=Hq != k.shape[1])
            counts = valid.sum(1).tolist()
            kt = k.transpose(1, 2)[valid]  # [real tokens of row 0, of row 1, ...] x H x D
            vt = v.transpose(1, 2)[valid]
            self.owner.cache.append(self.index, self.owner.seqs, counts, kt, vt)
            self.length = n
            return out.masked_fill(~valid[:, None, :, None], 0.0)
        out = torch.zeros_like(q)
        for t in range(n):
            rows = valid[:, t]
            counts = rows.int().tolist()
            if any(counts):
                self.owner.cache.append(self.index, self.owner.seqs, counts, k[:, :, t][rows].contiguous(),
                                        v[:, :, t][rows].contiguous())
            self.length += 1
            o = self._attend_token(q[:, :, t], scaling)
            out[:, :, t] = o.masked_fill(~rows[:, None, None], 0.0)
        return out

    def _store_prompt(self, k, v):
        B, H, n, D = k.shape
        kt = k.transpose(1, 2).reshape(B * n, H, D)  # [tokens of seq 0, tokens of seq 1, ...]
        vt = v.transpose(1, 2).reshape(B * n, H, D)
        self.owner.cache.append(self.index, self.owner.seqs, [n] * B, kt, vt)

    def _store_token(self, k, v):
        # k, v: [B, H, D] views of the step's [B, H, n, D]; contiguous copies so K and V share strides
        # whatever layout the model produced them in (the binding requires equal strides).
        self.owner.cache.append(self.index, self.owner.seqs, self.owner.ones, k.contiguous(), v.contiguous())

    @staticmethod
    def _q_for_kernel(q, scaling):
        """q in float16/bfloat16, pre-scaled so that the kernel's 1/sqrt(D) gives `scaling`."""
        qt = q if q.dtype in (torch.float16, torch.bfloat16) else q.to(torch.float16)
        if abs(scaling * math.sqrt(qt.shape[-1]) - 1.0) > 1e-6:
            qt = qt * (scaling * math.sqrt(qt.shape[-1]))
        return qt.contiguous()

    def _attend_token(self, q, scaling):
        qt = self._q_for_kernel(q, scaling)
        out = torch.empty_like(qt)
        self.owner.cache.attend(self.index, self.owner.seqs, qt, out)
        return out.to(q.dtype)

    def attend(self, q, k, v, attention_mask, scaling):
        n = q.shape[2]
        if n > 1 and self.length > 0 and self.owner.prefill == "fp16" and _valid_tokens(attention_mask, n) is None:
            self.pending = False
            return self._attend_chunk(q, k, v, scaling)
        return super().attend(q, k, v, attention_mask, scaling)

    def _attend_chunk(self, q, k, v, scaling):
        """Several new tokens after a prefix (speculative verification, a prompt continued): append them, then
        attend them as multi-token queries (each causal over the cache and the new tokens before it); a block is
        decoded once for all of a row's queries. In chunks of at most max_attend_batch query rows a call."""
        B, Hq, n, D = q.shape
        H = k.shape[1]
        per = max(1, self.owner.attend_rows // B)
        out = torch.empty_like(q)
        for t0 in range(0, n, per):
            c = min(per, n - t0)
            kt = k[:, :, t0:t0 + c].transpose(1, 2).reshape(B * c, H, D).contiguous()
            vt = v[:, :, t0:t0 + c].transpose(1, 2).reshape(B * c, H, D).contiguous()
            self.owner.cache.append(self.index, self.owner.seqs, [c] * B, kt, vt)
            self.length += c
            self.owner._note_bytes(self)
            qt = self._q_for_kernel(q[:, :, t0:t0 + c].transpose(1, 2).reshape(B * c, Hq, D), scaling)
            o = torch.empty_like(qt)
            self.owner.cache.attend(self.index, self.owner.seqs, qt, o, n_queries=[c] * B)
            out[:, :, t0:t0 + c] = o.reshape(B, c, Hq, D).transpose(1, 2).to(q.dtype)
        return out

    def bytes(self):
        o = self.owner
        if o.cache is None:
            return 0
        st = o.cache.stats().per_layer[self.index]
        T = o.config.block_tokens
        blocks = (st.tokens - st.tail_tokens) // T * o.kv_heads  # closed blocks of every sequence, K/V pairs
        tail_bytes = st.tail_bytes  # as held: the input type, or Codes8 / Codes6 rows
        if o.tail_value_bytes and o.config.tail_format == kvcomp.TailFormat.Input:
            tail_bytes = st.tail_tokens * o.kv_heads * 2 * o.head_dim * o.tail_value_bytes
        books = 2 * o.kv_heads * 256 if blocks else 0  # code lengths of the K and V codebooks
        return st.compressed_bytes + tail_bytes + blocks * 8 + books  # 8 B block-table entry per K/V pair


class KvcompCache(_CacheBase):
    """A transformers Cache whose K/V live compressed in a kvcomp.Cache.

    `config` is a kvcomp.Config; its shape fields (layers, heads, head_dim,
    dtype, max_seqs) are filled from the model and the first batch.
    """

    layer_class = _KvcompLayer
    tail_value_bytes = None  # an Input tail is held in the K/V input's type; set 4 to count it as fp32 (format v2)

    def __init__(self, model, config=None, prefill="fp16", max_tokens=None, transform=None, max_rollback=None):
        super().__init__(model, prefill)
        # A copy: the shape fields, max_seqs and the transform are set here, not in the caller's Config.
        self.config = kvcomp.Config(**{f: getattr(config, f) for f in _CONFIG_FIELDS}) if config is not None \
            else kvcomp.Config()
        self.max_tokens = max_tokens
        self.cache = None
        self.seqs = []
        self.rolled_back = 0  # tokens crop() took back
        if transform not in (None, "hadamard"):
            raise ValueError("transform must be None or 'hadamard'")
        if transform == "hadamard":  # the library stores K/V rotated (Config.transform)
            self.config.transform = kvcomp.Transform.Hadamard
        if max_rollback is not None:  # crop() (assisted / prompt-lookup decoding) takes back up to this many tokens
            self.config.max_rollback = max_rollback

    def _allocate(self, key_states):
        c = self.config
        c.layers, c.q_heads, c.kv_heads, c.head_dim = self.n_layers, self.q_heads, self.kv_heads, self.head_dim
        if key_states.dtype not in _DTYPES:
            raise ValueError(f"kvcomp.hf: K/V of type {key_states.dtype} are not supported")
        c.dtype = getattr(kvcomp.DType, _DTYPES[key_states.dtype])
        self.element_bytes = key_states.element_size()
        c.max_seqs = 2 * self.batch  # a sequence per batch row, and room for a reorder's forks
        if self.max_tokens:
            c.max_tokens_per_seq = self.max_tokens
        if c.max_attend_batch == 0:  # room for multi-token queries: 16 a row (more go in chunks)
            c.max_attend_batch = min(256, 16 * self.batch)
        self.attend_rows = c.max_attend_batch
        self.cache = kvcomp.Cache(c)
        self.seqs = [self.cache.add_sequence() for _ in range(self.batch)]
        self.ones = [1] * self.batch

    def stats(self):
        return self.cache.stats() if self.cache is not None else None

    # Batch reordering (transformers' Cache API, used by beam search): new row i
    # continues old row rows[i]. Done once for the whole cache (a kvcomp sequence
    # holds every layer), not per layer.
    def _reseat(self, rows, call):
        if self.cache is None:  # nothing stored yet: the first update sets the batch
            return
        if any(r < 0 or r >= self.batch for r in rows):
            raise IndexError(f"kvcomp.hf: {call}: rows {rows} outside the batch of {self.batch}")
        forks = len(rows) - len(set(rows))
        live = self.batch + forks
        if live > self.config.max_seqs:
            raise ValueError(f"kvcomp.hf: {call} needs {live} sequences at once; this cache was made for "
                             f"{self.config.max_seqs} (twice its first batch)")
        old, new, taken = self.seqs, [], set()
        for r in rows:
            if r in taken:
                new.append(self.cache.fork(old[r]))  # shares old[r]'s closed blocks, copies its tail
            else:
                new.append(old[r])
                taken.add(r)
        for i, s in enumerate(old):
            if i not in taken:
                self.cache.remove_sequence(s)
        self.seqs = new
        self.batch = len(new)
        self.ones = [1] * self.batch

    def reorder_cache(self, beam_idx):
        self._reseat([int(i) for i in beam_idx.tolist()], "reorder_cache")

    def batch_select_indices(self, indices):
        self._reseat([int(i) for i in torch.as_tensor(indices).tolist()], "batch_select_indices")

    def batch_repeat_interleave(self, repeats):
        self._reseat([i for i in range(self.batch or 0) for _ in range(repeats)], "batch_repeat_interleave")

    def crop(self, tokens_to_remove):
        """Takes back rejected draft tokens, as transformers' assisted and prompt-lookup decoding ask:
        crop(-n) removes the last n tokens (crop(0): nothing), crop(m > 0) keeps the first m (the older form).
        kvcomp.Cache.rollback on every row, once for all layers: at most config.max_rollback tokens
        (KvcompCache(max_rollback=...)) below the most the cache held; more raises kvcomp.Error."""
        length = self.get_seq_length()
        n = max(0, length - tokens_to_remove) if tokens_to_remove > 0 else min(length, -tokens_to_remove)
        if self.cache is None or n == 0:
            return
        if n > self.config.max_rollback:  # checked here so that no row is cut when it fails
            raise ValueError(f"kvcomp.hf: crop takes back {n} tokens but this cache was made with max_rollback="
                             f"{self.config.max_rollback}; make it with KvcompCache(..., max_rollback=k), k at least "
                             "the draft tokens a step verifies (assistant_model: num_assistant_tokens, 20 by "
                             "default; prompt lookup: prompt_lookup_num_tokens) and at most block_tokens")
        for s in self.seqs:
            self.cache.rollback(s, n)
        for layer in self.layers:
            layer.length = length - n
        self.rolled_back += n


# ----------------------------------------------------------------------------- fp16


class _BufferedLayer(_Layer):
    """K/V held in PyTorch buffers [B, H, capacity, D] that grow by doubling."""

    def __init__(self, owner, index):
        super().__init__(owner, index)
        self.k = self.v = None

    def _buffer_dtype(self):
        return self.dtype

    def _grow(self, n):
        B, H, D = self.owner.batch, self.owner.kv_heads, self.owner.head_dim
        need = self.length + n
        if self.k is None or self.k.shape[2] < need:
            cap = max(need, 2 * (0 if self.k is None else self.k.shape[2]), 256)
            k = torch.empty(B, H, cap, D, dtype=self._buffer_dtype(), device=self.device)
            v = torch.empty_like(k)
            if self.k is not None:
                k[:, :, :self.length] = self.k[:, :, :self.length]
                v[:, :, :self.length] = self.v[:, :, :self.length]
            self.k, self.v = k, v


class _Fp16Layer(_BufferedLayer):
    """Uncompressed K/V through the same token-by-token path (a check of the harness)."""

    def _store_prompt(self, k, v):
        n = k.shape[2]
        self._grow(n)
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v

    def _store_token(self, k, v):
        self._grow(1)
        self.k[:, :, self.length] = k
        self.v[:, :, self.length] = v

    def _attend_token(self, q, scaling):
        n = self.length
        o = F.scaled_dot_product_attention(q.unsqueeze(2), self.k[:, :, :n], self.v[:, :, :n], scale=scaling,
                                           enable_gqa=q.shape[1] != self.k.shape[1])
        return o[:, :, 0]

    def bytes(self):
        return self.length * self.owner.batch * self.owner.kv_heads * self.owner.head_dim * 4


class Fp16Cache(_CacheBase):
    layer_class = _Fp16Layer


# ----------------------------------------------------------------------------- KIVI


def kivi_quantize(x, bits, group_dim):
    """KIVI-style fixed-width quantization of x [..., 32, D] chunks, as kernels/kivi_attention.cuh.

    group_dim = -2: per channel over the 32 tokens (K); group_dim = -1: per token over
    32-channel groups (V). fp16 scale = (max - min) / (2^bits - 1), fp16 zero = min,
    code = clamp(rint((x - zero) / scale), 0, 2^bits - 1), x' = code * scale + zero (fp32).
    """
    max_code = float((1 << bits) - 1)
    xf = x.float()
    if group_dim == -1:
        shape = xf.shape
        xf = xf.reshape(*shape[:-1], shape[-1] // 32, 32)
    lo = xf.amin(dim=-1 if group_dim == -1 else -2, keepdim=True)
    hi = xf.amax(dim=-1 if group_dim == -1 else -2, keepdim=True)
    scale = ((hi - lo) / max_code).half().float()
    zero = lo.half().float()
    code = torch.where(scale > 0, torch.clamp(torch.round((xf - zero) / scale), 0, max_code), torch.zeros_like(xf))
    out = torch.addcmul(zero, code, scale)  # one rounding, as fmaf
    if group_dim == -1:
        out = out.reshape(shape)
    return out


class _KiviLayer(_BufferedLayer):
    """KIVI: tokens older than the last `window` + (0..31) are quantized in chunks of 32.

    Emulated exactly in PyTorch: one fp32 buffer per K and V holds what the
    fused baseline kernel would read, the fp16 inputs (exact in fp32) until
    their chunk is formed, then the chunk's reconstruction; attention over it
    with SDPA.
    """

    def __init__(self, owner, index):
        super().__init__(owner, index)
        self.chunks = 0  # chunks of 32 tokens quantized so far

    def _buffer_dtype(self):
        return torch.float32  # fp16 inputs (exact in fp32), then the chunks' reconstructions

    def _store(self, k, v, n):
        self._grow(n)
        self.k[:, :, self.length:self.length + n] = k.float()
        self.v[:, :, self.length:self.length + n] = v.float()
        held = self.length + n
        w, bits = self.owner.window, self.owner.bits
        target = (held - w) // 32 if held > w else 0
        if target > self.chunks:
            a, b = self.chunks * 32, target * 32
            B, H, D = self.owner.batch, self.owner.kv_heads, self.owner.head_dim
            kc = self.k[:, :, a:b].reshape(B, H, -1, 32, D)
            self.k[:, :, a:b] = kivi_quantize(kc, bits, -2).reshape(B, H, b - a, D)
            self.v[:, :, a:b] = kivi_quantize(self.v[:, :, a:b], bits, -1)
            self.chunks = target

    def _store_prompt(self, k, v):
        self._store(k, v, k.shape[2])

    def _store_token(self, k, v):
        self._store(k.unsqueeze(2), v.unsqueeze(2), 1)

    def _attend_token(self, q, scaling):
        n = self.length
        o = F.scaled_dot_product_attention(q.unsqueeze(2).float(), self.k[:, :, :n], self.v[:, :, :n], scale=scaling,
                                           enable_gqa=q.shape[1] != self.k.shape[1])
        return o[:, :, 0].to(q.dtype)

    def bytes(self):
        o = self.owner
        values = self.chunks * 32 * o.head_dim
        per_head = values * o.bits // 8 + values // 32 * 4 + (self.length - self.chunks * 32) * o.head_dim * 2
        return 2 * per_head * o.batch * o.kv_heads


class KiviCache(_CacheBase):
    """KIVI-style fixed-width cache (2, 3 or 4 bits, group 32, fp16 window)."""

    layer_class = _KiviLayer

    def __init__(self, model, bits=4, window=32, prefill="fp16"):
        if bits not in (2, 3, 4, 8):
            raise ValueError("KIVI bits must be 2, 3, 4 or 8")
        super().__init__(model, prefill)
        self.bits, self.window = bits, window
