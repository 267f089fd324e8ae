"""Stream resolution: what `stream=` means in every kvcomp call.

The C++ calls take a cudaStream_t; here it is a Python int. Frameworks are
imported only when an array (or an already-imported module) says they are in
use, so kvcomp itself depends on none.
"""
import sys

from ._kvcomp import Error

__all__ = ["resolve_stream"]


def _is_handle(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _current_stream(array):
    """The caller's current stream for `array`'s framework; 0 (the legacy default stream) otherwise."""
    module = (type(array).__module__ or "") if array is not None else ""
    if module.startswith("torch"):
        import torch
        if array.device.type != "cuda":
            return 0  # not a CUDA tensor: the array check will say so
        return torch.cuda.current_stream(array.device).cuda_stream
    if module.startswith("cupy"):
        import cupy
        return cupy.cuda.get_current_stream().ptr
    if array is None:
        # No array to ask (read_block): follow a framework that is already in use.
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            return torch.cuda.current_stream().cuda_stream
        cupy = sys.modules.get("cupy")
        if cupy is not None:
            return cupy.cuda.get_current_stream().ptr
    return 0


def resolve_stream(stream, array=None):
    """cudaStream_t (as an int) for `stream`.

    None: the current stream of `array`'s framework (torch, cupy), else the
    legacy default stream 0. Also accepted: an int (a cudaStream_t), an object
    with the __cuda_stream__ protocol, with `cuda_stream` (torch.cuda.Stream) or
    with `ptr` (cupy.cuda.Stream).
    """
    if stream is None:
        return _current_stream(array)
    if _is_handle(stream):
        if stream < 0:
            raise Error(f"kvcomp: stream must be a non-negative cudaStream_t, got {stream}")
        return stream
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        value = protocol() if callable(protocol) else protocol
        # The CUDA stream protocol returns (version, handle).
        if isinstance(value, tuple) and len(value) == 2 and _is_handle(value[1]):
            return value[1]
        raise Error(f"kvcomp: __cuda_stream__ of {type(stream).__name__} returned {value!r}, "
                    "expected (version, handle)")
    for attr in ("cuda_stream", "ptr"):
        handle = getattr(stream, attr, None)
        if _is_handle(handle):
            return handle
    raise Error(f"kvcomp: stream must be None, an int (cudaStream_t) or a stream object "
                f"(__cuda_stream__, .cuda_stream or .ptr), got {type(stream).__name__}")
