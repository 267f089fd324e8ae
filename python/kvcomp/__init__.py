"""kvcomp: an LLM's KV cache kept compressed on the GPU, with fused decode attention.

    import kvcomp, torch
    cfg = kvcomp.Config(layers=1, kv_heads=8, q_heads=32, head_dim=128)
    cache = kvcomp.Cache(cfg)
    s = cache.add_sequence()
    cache.append(0, [s], [n], k, v)        # k, v: [n, kv_heads, head_dim], cfg.dtype
    cache.attend(0, [s], q, out)           # q, out: [batch, q_heads, head_dim], fp16/bf16

Decode through CUDA graphs (plan once, capture, replay every token):

    plan = cache.make_plan(4)              # 4 sequence slots, device buffers fixed
    cache.set_plan(plan, [s, -1, -1, -1])  # -1: an idle slot (nothing stored, output zero)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):              # one step, every layer: k, v, q, out are static tensors
        for layer in range(cfg.layers):
            cache.append_plan(plan, layer, k[layer], v[layer])    # [plan.batch, kv_heads, head_dim]
            cache.attend_plan(plan, layer, q[layer], out[layer])  # [plan.batch, q_heads, head_dim]
    for token in ...:                      # copy the token's k, v, q in, then
        g.replay()
    cache.check()                          # raises kvcomp.Error if a step failed (pool full, ...)

Speculative decoding: Config(max_rollback=k) keeps the newest k tokens
uncompressed; a step appends and attends 1 + drafts tokens (eager: append n,
attend(..., n_queries=[n]); in a graph: make_plan(batch, tokens=n), rows
[batch * n, ...]), then cache.rollback(seq, rejected) takes the rejected
drafts back (it synchronizes the stream), or, inside the graph,
cache.rollback_plan(plan, n_rejected) with the counts in a CUDA int32 array.

A replay stores each (sequence, layer)'s token only where the step has not yet
done so: after check() raised (e.g. "pool is full"), free pages
(remove_sequence) and replay the same step. set_plan again whenever the
batch's sequences change (not capturable); the eager calls are not capturable.

Arrays: anything with __cuda_array_interface__ (v2/v3) or __dlpack__ (torch,
cupy, jax, ...); bfloat16 goes through DLPack. No framework is imported unless
an array comes from it. Streams: `stream=None` is the array's framework's
current stream (torch, cupy) or the legacy default stream; an int
(cudaStream_t) or a stream object (torch.cuda.Stream, cupy Stream,
__cuda_stream__) also works. Errors: kvcomp.Error (a RuntimeError) with the
C++ library's message. The GIL is released during CUDA work.
"""
from . import _kvcomp as _C
from ._kvcomp import (BoundMode, BoundOverride, Codebook, Config, DecodePlan, DType, Error, ErrorBound, Kind,
                      LayerStats, Stats, TailFormat, Transform)
from ._stream import resolve_stream
from . import baselines, ref

__version__ = _C.__version__

__all__ = ["BoundMode", "BoundOverride", "Cache", "Codebook", "Config", "DecodePlan", "DType", "Error", "ErrorBound",
           "Kind", "LayerStats", "Stats", "TailFormat", "Transform", "baselines", "ref", "resolve_stream", "__version__"]


class Cache(_C.Cache):
    """A compressed KV cache on the current CUDA device (kvcomp::Cache).

    Cache(config); add_sequence() -> int; fork(seq, stream=None) -> int; remove_sequence(seq, stream=None);
    rollback(seq, n_tokens, stream=None);
    tokens(seq, layer); append(layer, seq_ids, n_tokens, k, v, stream=None);
    attend(layer, seq_ids, q, out, n_queries=None, stream=None);
    make_plan(batch, tokens=1) -> DecodePlan; set_plan(plan, seq_ids, stream=None);
    append_plan(plan, layer, k, v, stream=None); attend_plan(plan, layer, q, out, stream=None);
    rollback_plan(plan, n_rejected, stream=None);
    check(stream=None); stats() -> Stats; read_block(layer, seq, kv_head, block, kind, stream=None) -> bytes;
    codebook(layer, kv_head, kind) -> Codebook; config (a copy).

    Synchronizing: tokens(), stats(), read_block(), codebook(), check(), rollback(). Failures only the device sees (a
    full pool, max_tokens_per_seq) raise from check(), or from the next eager append/attend, add_sequence,
    set_plan, tokens, stats or read_block.
    """

    def remove_sequence(self, seq, stream=None):
        """Frees the sequence's pool pages and its id, on `stream` (no host sync); plans holding it must be
        set again (set_plan) before they run."""
        super().remove_sequence(seq, resolve_stream(stream))

    def fork(self, seq, stream=None):
        """A new sequence that starts as a copy of `seq`: it shares seq's closed blocks (stats count them once)
        and copies its open tail; then each appends its own tokens. Either may be removed first."""
        return super().fork(seq, resolve_stream(stream))

    def rollback(self, seq, n_tokens, stream=None):
        """Takes back the last n_tokens of `seq` in every layer (speculative decoding: rejected draft tokens), as
        if never appended. Allowed while no layer goes below the most tokens it has held minus
        config.max_rollback (e.g. append k <= max_rollback drafts, attend, roll back the rejected ones);
        otherwise raises kvcomp.Error and changes nothing. Synchronizes `stream`."""
        super().rollback(seq, n_tokens, resolve_stream(stream))

    def append(self, layer, seq_ids, n_tokens, k, v, stream=None):
        """Appends n_tokens[i] tokens to seq_ids[i]; k, v: [sum(n_tokens), kv_heads, head_dim] of
        config.dtype, unit stride along head_dim (token and head strides are free)."""
        super().append(layer, list(seq_ids), list(n_tokens), k, v, resolve_stream(stream, k))

    def attend(self, layer, seq_ids, q, out, n_queries=None, stream=None):
        """out[i] = attention of q[i] over seq_ids[i] (within the layer's window, if any); q, out: contiguous
        [len(seq_ids), q_heads, head_dim], float16 or bfloat16 (out's dtype = q's).

        n_queries (multi-token queries: speculative verification, prefill chunks): seq_ids[i] has
        n_queries[i] query tokens, its last n_queries[i] tokens (append them first); q, out:
        [sum(n_queries), q_heads, head_dim], the sequences' queries one after the other. Query j of a
        sequence of L tokens attends causally to tokens 0 .. L - n + j."""
        counts = None if n_queries is None else list(n_queries)
        super().attend(layer, list(seq_ids), q, out, resolve_stream(stream, q), counts)

    def set_plan(self, plan, seq_ids, stream=None):
        """Puts sequences in the plan's slots: len(seq_ids) == plan.batch, live and distinct ids, -1 for an
        idle slot. Not capturable; call it again whenever the batch changes."""
        super().set_plan(plan, list(seq_ids), resolve_stream(stream))

    def append_plan(self, plan, layer, k, v, stream=None):
        """Appends plan.tokens tokens to each slot's sequence in `layer`; k, v: [plan.batch * plan.tokens,
        kv_heads, head_dim] of config.dtype, unit stride along head_dim (row and head strides are free), slot i's
        rows one after the other. Capturable in a CUDA graph; stores only what the step has not stored yet."""
        super().append_plan(plan, layer, k, v, resolve_stream(stream, k))

    def rollback_plan(self, plan, n_rejected, stream=None):
        """Slot i's sequence gives back n_rejected[i] tokens in every layer (a CUDA int32 array [plan.batch], e.g.
        written by the verification of the drafts; 0 or an idle slot: nothing). Capturable in a CUDA graph; a
        rollback past the room (as rollback() allows) changes nothing for that sequence and raises from check()."""
        super().rollback_plan(plan, n_rejected, resolve_stream(stream, n_rejected))

    def attend_plan(self, plan, layer, q, out, stream=None):
        """out[i] = attention of q[i] over slot i's sequence in `layer` (zero for an idle slot); q, out:
        contiguous [plan.batch * plan.tokens, q_heads, head_dim], float16 or bfloat16 (out's dtype = q's);
        with plan.tokens = n, slot i's n queries are its last n tokens, causal. Capturable."""
        super().attend_plan(plan, layer, q, out, resolve_stream(stream, q))

    def check(self, stream=None):
        """Synchronizes the stream, then raises kvcomp.Error naming the sequences and layers whose device
        work failed (pool full, max_tokens_per_seq reached); the records are cleared by the raise."""
        super().check(resolve_stream(stream))

    def read_block(self, layer, seq, kv_head, block, kind, stream=None):
        """A copy of one stored block (synchronizes the stream); decode with kvcomp.ref.decode_block."""
        return super().read_block(layer, seq, kv_head, block, kind, resolve_stream(stream))

    def __repr__(self):
        return f"kvcomp.Cache({self.config!r})"
