"""kvcomp: an LLM's KV cache kept compressed on the GPU, with fused decode attention.

    import kvcomp, torch
    cfg = kvcomp.Config(layers=1, kv_heads=8, q_heads=32, head_dim=128)
    cache = kvcomp.Cache(cfg)
    s = cache.add_sequence()
    cache.append(0, [s], [n], k, v)        # k, v: [n, kv_heads, head_dim], cfg.dtype
    cache.attend(0, [s], q, out)           # q, out: [batch, q_heads, head_dim], fp16/bf16

Arrays: anything with __cuda_array_interface__ (v2/v3) or __dlpack__ (torch,
cupy, jax, ...); bfloat16 goes through DLPack. No framework is imported unless
an array comes from it. Streams: `stream=None` is the array's framework's
current stream (torch, cupy) or the legacy default stream; an int
(cudaStream_t) or a stream object (torch.cuda.Stream, cupy Stream,
__cuda_stream__) also works. Errors: kvcomp.Error (a RuntimeError) with the
C++ library's message. The GIL is released during CUDA work.
"""
from . import _kvcomp as _C
from ._kvcomp import (BoundMode, BoundOverride, Codebook, Config, DType, Error, ErrorBound, Kind, LayerStats,
                      Stats, Transform)
from ._stream import resolve_stream
from . import baselines, ref

__version__ = _C.__version__

__all__ = ["BoundMode", "BoundOverride", "Cache", "Codebook", "Config", "DType", "Error", "ErrorBound", "Kind",
           "LayerStats", "Stats", "Transform", "baselines", "ref", "resolve_stream", "__version__"]


class Cache(_C.Cache):
    """A compressed KV cache on the current CUDA device (kvcomp::Cache).

    Cache(config); add_sequence() -> int; remove_sequence(seq); tokens(seq, layer);
    append(layer, seq_ids, n_tokens, k, v, stream=None); attend(layer, seq_ids, q, out, stream=None);
    stats() -> Stats; read_block(layer, seq, kv_head, block, kind, stream=None) -> bytes;
    codebook(layer, kv_head, kind) -> Codebook; config (a copy).
    """

    def append(self, layer, seq_ids, n_tokens, k, v, stream=None):
        """Appends n_tokens[i] tokens to seq_ids[i]; k, v: [sum(n_tokens), kv_heads, head_dim] of
        config.dtype, unit stride along head_dim (token and head strides are free)."""
        super().append(layer, list(seq_ids), list(n_tokens), k, v, resolve_stream(stream, k))

    def attend(self, layer, seq_ids, q, out, stream=None):
        """out[i] = attention of q[i] over seq_ids[i]; q, out: contiguous [len(seq_ids), q_heads,
        head_dim], float16 or bfloat16 (out's dtype = q's)."""
        super().attend(layer, list(seq_ids), q, out, resolve_stream(stream, q))

    def read_block(self, layer, seq, kv_head, block, kind, stream=None):
        """A copy of one stored block (synchronizes the stream); decode with kvcomp.ref.decode_block."""
        return super().read_block(layer, seq, kv_head, block, kind, resolve_stream(stream))

    def __repr__(self):
        return f"kvcomp.Cache({self.config!r})"
