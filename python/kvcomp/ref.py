"""The CPU reference codec (include/kvcomp/reference.hpp), for tests and inspection.

decode_block(data, kind, tokens, head_dim, codebook) -> bytes
    One stored block (Cache.read_block) decoded to tokens x head_dim float32
    values, row-major, as bytes: torch.frombuffer(bytearray(b), dtype=torch.float32)
    or array.array("f", b) reads them. Raises kvcomp.Error on a corrupt block.
encode_block(kind, x, tokens, head_dim, eb, codebook, codebook_id=0) -> bytes
    Encodes tokens x head_dim float32 values (bytes or array("f")) as one block.
"""
from ._kvcomp import ref as _ref

decode_block = _ref.decode_block
encode_block = _ref.encode_block

__all__ = ["decode_block", "encode_block"]
