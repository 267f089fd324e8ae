"""Baselines kvcomp is measured against, callable from the same Python harness.

KiviCache(batch, kv_heads, q_heads, head_dim, tokens, bits=4, window=32)
    KIVI-style fixed-width cache of one layer: build(k, v, stream=None) from fp16
    K, V [batch][kv_heads][tokens][head_dim] (contiguous), then
    attend(q, out, stream=None) with fp16 q, out [batch][q_heads][head_dim];
    bytes() is what attention reads.
flash_decode_fp16(k, v, q, out, stream=None)
    fp16 flash-decoding over uncompressed K, V [batch][kv_heads][tokens][head_dim].
kivi_reference(batch, kv_heads, q_heads, head_dim, tokens, bits, window, k, v)
    CPU: (k, v) as KIVI reconstructs them, float32 bytes, from float32 inputs.
"""
from . import _kvcomp as _C
from ._stream import resolve_stream

__all__ = ["KiviCache", "flash_decode_fp16", "kivi_reference"]

kivi_reference = _C.baselines.kivi_reference


class KiviCache(_C.baselines.KiviCache):
    __doc__ = _C.baselines.KiviCache.__doc__

    def build(self, k, v, stream=None):
        super().build(k, v, resolve_stream(stream, k))

    def attend(self, q, out, stream=None):
        super().attend(q, out, resolve_stream(stream, q))

    def __repr__(self):
        return (f"KiviCache(batch={self.batch}, kv_heads={self.kv_heads}, q_heads={self.q_heads}, "
                f"head_dim={self.head_dim}, tokens={self.tokens}, bits={self.bits}, window={self.window})")


def flash_decode_fp16(k, v, q, out, stream=None):
    """out = attention of q over fp16 K, V (kvcomp's fused flash-decoding kernel)."""
    _C.baselines.flash_decode_fp16(k, v, q, out, resolve_stream(stream, q))
