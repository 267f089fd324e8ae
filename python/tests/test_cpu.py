"""CPU tests of the kvcomp Python package (no GPU, no numpy, no framework).

Array parsing is checked with fake objects that expose a hand-written
__cuda_array_interface__ or a DLPack capsule built with ctypes: kvcomp reads
their metadata and touches no memory. Run: PYTHONPATH=build/python python3 python/tests/test_cpu.py
"""
import array
import ctypes
import inspect
import pathlib
import random
import re
import unittest

import kvcomp
from kvcomp import _kvcomp

ROOT = pathlib.Path(__file__).resolve().parents[2]
HAVE_GPU = _kvcomp._cuda_device_count() > 0


def cai(shape, typestr="<f2", strides=None, ptr=0x7F0000000000, readonly=False, version=3, **extra):
    """An object exposing only a CUDA array interface dict."""
    d = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, readonly), "strides": strides,
         "version": version}
    d.update(extra)
    return type("FakeCudaArray", (), {"__cuda_array_interface__": d})()


# --- A DLPack producer in ctypes (the structs of dlpack.h) ------------------
class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32), ("dtype", DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    pass


DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))
DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype = ctypes.c_char_p
_capsule_name.argtypes = [ctypes.py_object]
_DLTENSOR = ctypes.create_string_buffer(b"dltensor")  # a capsule keeps a pointer to its name
_OTHER = ctypes.create_string_buffer(b"something_else")

KDL_CPU, KDL_CUDA = 1, 2
KDL_FLOAT, KDL_BFLOAT = 2, 4


class FakeDLPack:
    """Hands out a DLManagedTensor describing (not owning) memory at `data`."""

    def __init__(self, shape, strides=None, code=KDL_FLOAT, bits=16, device_type=KDL_CUDA, data=0x7F0000000000,
                 byte_offset=0, capsule_name=_DLTENSOR):
        self.deleted = 0
        self.streams = []
        self.capsules = []
        self.device_type = device_type
        self.capsule_name = capsule_name
        n = len(shape)
        self._shape = (ctypes.c_int64 * n)(*shape)
        self._strides = (ctypes.c_int64 * n)(*strides) if strides is not None else None
        self._deleter = DELETER(self._on_delete)  # referenced so that it outlives the tensor
        t = DLTensor(ctypes.c_void_p(data), DLDevice(device_type, 0), n, DLDataType(code, bits, 1),
                     ctypes.cast(self._shape, ctypes.POINTER(ctypes.c_int64)),
                     ctypes.cast(self._strides, ctypes.POINTER(ctypes.c_int64)) if self._strides else None,
                     byte_offset)
        self._managed = DLManagedTensor(t, None, self._deleter)

    def _on_delete(self, _):
        self.deleted += 1

    def __dlpack_device__(self):
        return (self.device_type, 0)

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        cap = _capsule_new(ctypes.addressof(self._managed), self.capsule_name, None)
        self.capsules.append(cap)
        return cap


class ImportAndVersion(unittest.TestCase):
    def test_version_matches_the_project(self):
        m = re.search(r"project\(kvcomp VERSION ([0-9.]+)", (ROOT / "CMakeLists.txt").read_text())
        self.assertEqual(kvcomp.__version__, m.group(1))

    def test_public_names(self):
        for name in ["Cache", "Config", "DType", "BoundMode", "ErrorBound", "Kind", "BoundOverride", "LayerStats",
                     "Stats", "Codebook", "Error", "Transform", "DecodePlan"]:
            self.assertTrue(hasattr(kvcomp, name), name)
            self.assertIn(name, kvcomp.__all__)
        for method in ["add_sequence", "remove_sequence", "tokens", "append", "attend", "stats", "read_block",
                       "codebook", "config", "make_plan", "set_plan", "append_plan", "attend_plan", "check", "fork",
                       "rollback", "rollback_plan"]:
            self.assertTrue(hasattr(kvcomp.Cache, method), method)
        for field in ["compressed_bytes", "tail_bytes", "metadata_bytes", "pool_bytes_in_use", "pool_page_bytes",
                      "pool_capacity", "tokens", "ratio_vs_fp16", "per_layer"]:
            self.assertTrue(hasattr(kvcomp.Stats, field), field)
        for field in ["compressed_bytes", "tail_tokens", "tail_bytes", "tokens"]:
            self.assertTrue(hasattr(kvcomp.LayerStats, field), field)
        self.assertTrue(callable(kvcomp.ref.decode_block))
        self.assertTrue(callable(kvcomp.baselines.flash_decode_fp16))
        self.assertTrue(issubclass(kvcomp.Error, RuntimeError))


    def test_stream_arguments_default_to_none(self):
        # Every call that runs on a stream takes stream=None (the caller's current stream), last.
        for method, params in [("remove_sequence", ["seq"]), ("append", ["layer", "seq_ids", "n_tokens", "k", "v"]),
                               ("attend", ["layer", "seq_ids", "q", "out", "n_queries"]), ("fork", ["seq"]),
                               ("rollback", ["seq", "n_tokens"]), ("rollback_plan", ["plan", "n_rejected"]),
                               ("set_plan", ["plan", "seq_ids"]),
                               ("append_plan", ["plan", "layer", "k", "v"]),
                               ("attend_plan", ["plan", "layer", "q", "out"]), ("check", []),
                               ("read_block", ["layer", "seq", "kv_head", "block", "kind"])]:
            with self.subTest(method=method):
                sig = inspect.signature(getattr(kvcomp.Cache, method))
                self.assertEqual(list(sig.parameters), ["self"] + params + ["stream"])
                self.assertIsNone(sig.parameters["stream"].default)


class DecodePlanType(unittest.TestCase):
    def test_placeholder_fields_and_repr(self):
        # DecodePlan() is the C++ default (id -1, batch 0): a placeholder no cache accepts.
        p = kvcomp.DecodePlan()
        self.assertEqual((p.id, p.batch), (-1, 0))
        self.assertEqual(repr(p), "DecodePlan(id=-1, batch=0, tokens=1)")

    def test_fields_are_read_only(self):
        p = kvcomp.DecodePlan()
        for field in ("id", "batch", "tokens"):
            with self.subTest(field=field), self.assertRaises(AttributeError):
                setattr(p, field, 3)
        self.assertEqual((p.id, p.batch, p.tokens), (-1, 0, 1))


class ConfigFields(unittest.TestCase):
    def test_defaults_match_cpp(self):
        c = kvcomp.Config()
        self.assertEqual((c.layers, c.kv_heads, c.q_heads, c.head_dim, c.block_tokens), (1, 8, 32, 128, 64))
        self.assertEqual(c.dtype, kvcomp.DType.F16)
        self.assertEqual(c.k_bound, kvcomp.ErrorBound(kvcomp.BoundMode.Relative, 0.05))
        self.assertEqual((c.pool_bytes, c.max_seqs, c.max_attend_batch, c.max_tokens_per_seq), (1 << 30, 64, 0, 32768))
        self.assertEqual(c.overrides, [])
        self.assertEqual(c.transform, kvcomp.Transform.None_)

    def test_every_field_round_trips(self):
        o = kvcomp.BoundOverride(layer=1, kv_head=2, k=kvcomp.ErrorBound(kvcomp.BoundMode.Absolute, 0.25),
                                 v=kvcomp.ErrorBound(value=0.125))
        values = dict(layers=3, kv_heads=4, q_heads=16, head_dim=64, dtype=kvcomp.DType.BF16, block_tokens=32,
                      k_bound=kvcomp.ErrorBound(kvcomp.BoundMode.Absolute, 0.5),
                      v_bound=kvcomp.ErrorBound(kvcomp.BoundMode.Relative, 0.0625), pool_bytes=(1 << 33) + 16,
                      max_seqs=7, max_attend_batch=5, max_tokens_per_seq=123456, transform=kvcomp.Transform.Hadamard,
                      window=4096, layer_windows=[4096, 0, 1024], sink_tokens=4, max_rollback=16,
                      tail_format=kvcomp.TailFormat.Codes8)
        by_kwargs = kvcomp.Config(overrides=[o], **values)
        by_setattr = kvcomp.Config()
        for name, value in values.items():
            setattr(by_setattr, name, value)
        by_setattr.overrides = [o]
        for c in (by_kwargs, by_setattr):
            for name, value in values.items():
                self.assertEqual(getattr(c, name), value, name)
            (got,) = c.overrides
            self.assertEqual((got.layer, got.kv_head, got.k, got.v), (1, 2, o.k, o.v))
        r = repr(by_kwargs)
        for text in ["layers=3", "head_dim=64", "dtype=DType.BF16", "BoundMode.Absolute", "pool_bytes=8589934608",
                     "BoundOverride(layer=1, kv_head=2", "max_tokens_per_seq=123456", "transform=Transform.Hadamard",
                     "window=4096, layer_windows=[4096, 0, 1024], sink_tokens=4, max_rollback=16",
                     "tail_format=TailFormat.Codes8"]:
            self.assertIn(text, r)
        six = kvcomp.Config(tail_format=kvcomp.TailFormat.Codes6)
        self.assertEqual(six.tail_format, kvcomp.TailFormat.Codes6)
        self.assertIn("tail_format=TailFormat.Codes6", repr(six))

    def test_unknown_field_and_wrong_type(self):
        with self.assertRaisesRegex(TypeError, "no field 'heads'"):
            kvcomp.Config(heads=3)
        with self.assertRaises(TypeError):
            kvcomp.Config(layers="three")

    def test_bad_config_raises_the_cpp_message_before_device_work(self):
        # Config validation runs first in Cache's constructor, so this holds with or without a GPU.
        with self.assertRaises(kvcomp.Error) as e:
            kvcomp.Cache(kvcomp.Config(head_dim=72))
        self.assertEqual(str(e.exception), "kvcomp: config: head_dim must be 64, 80, 96, 128 or 256, got 72")
        with self.assertRaisesRegex(kvcomp.Error, r"^kvcomp: config: q_heads / kv_heads must be 1..128, got 129$"):
            kvcomp.Cache(kvcomp.Config(kv_heads=2, q_heads=258))
        with self.assertRaisesRegex(kvcomp.Error, "override names layer 4"):
            kvcomp.Cache(kvcomp.Config(overrides=[kvcomp.BoundOverride(layer=4)]))
        with self.assertRaisesRegex(kvcomp.Error, "layer_windows has 1 entries for 2 layers"):
            kvcomp.Cache(kvcomp.Config(layers=2, layer_windows=[4096]))
        with self.assertRaisesRegex(kvcomp.Error, r"max_rollback must be 0..block_tokens \(32\), got 33"):
            kvcomp.Cache(kvcomp.Config(block_tokens=32, max_rollback=33))

    @unittest.skipIf(HAVE_GPU, "a CUDA device is present")
    def test_cache_without_gpu_names_the_cuda_failure(self):
        with self.assertRaises(kvcomp.Error) as e:
            kvcomp.Cache(kvcomp.Config())
        msg = str(e.exception)
        self.assertTrue(msg.startswith("kvcomp: "), msg)
        self.assertRegex(msg, "(?i)cuda")

    @unittest.skipIf(HAVE_GPU, "a CUDA device is present")
    def test_kivi_without_gpu_raises(self):
        with self.assertRaisesRegex(kvcomp.Error, "KIVI baseline: cudaMalloc failed"):
            kvcomp.baselines.KiviCache(1, 2, 8, 64, 100)
        with self.assertRaisesRegex(kvcomp.Error, "bits must be 2 or 4"):
            kvcomp.baselines.KiviCache(1, 2, 8, 64, 100, bits=3)


class ArrayParsing(unittest.TestCase):
    def test_cai_contiguous_when_strides_are_none(self):
        ptr, shape, strides, dtype = _kvcomp._array_info(cai((5, 8, 64), strides=None, ptr=0x1000))
        self.assertEqual((ptr, shape, strides, dtype), (0x1000, (5, 8, 64), (512, 64, 1), "float16"))

    def test_cai_explicit_strides_in_bytes_become_elements(self):
        # A [tokens, heads, D] view into a [tokens, heads, 2D] float32 buffer.
        info = _kvcomp._array_info(cai((3, 2, 64), "<f4", strides=(2 * 128 * 4, 128 * 4, 4), version=2))
        self.assertEqual(info[1:], ((3, 2, 64), (256, 128, 1), "float32"))

    def test_cai_errors(self):
        cases = [
            (cai((2, 3), "<f8"), r"unsupported dtype \(typestr '<f8'\)"),
            (cai((2, 3), "<i4"), "unsupported dtype"),
            (cai((2, 3), strides=(7, 2)), "not a multiple of the element size"),
            (cai((2, 3), strides=(-6, 2)), "negative strides"),
            (cai((2, 3), version=1), "unsupported __cuda_array_interface__ version 1"),
            (cai((2, 3), mask=object()), "masked arrays"),
            (cai((2, 3), "<V2"), "through DLPack"),
            (cai(("two", 3)), "k: malformed array metadata"),
        ]
        for obj, pattern in cases:
            with self.subTest(pattern=pattern), self.assertRaisesRegex(kvcomp.Error, pattern):
                _kvcomp._array_info(obj, "k")

    def test_read_only_is_refused_where_written(self):
        ro = cai((2, 3), readonly=True)
        _kvcomp._array_info(ro)  # reading is fine
        with self.assertRaisesRegex(kvcomp.Error, "out is read-only"):
            _kvcomp._array_info(ro, "out", writable=True)

    def test_host_and_foreign_objects(self):
        host = type("HostArray", (), {"__array_interface__": {"shape": (2,), "typestr": "<f2", "data": (1, False)}})()
        for obj, pattern in [(host, "q is a host \\(CPU\\) array"), (bytearray(8), "host \\(CPU\\) array"),
                             (array.array("f", [1.0]), "host"), (object(), "q is not a CUDA array"),
                             (None, "q is None")]:
            with self.subTest(obj=type(obj).__name__), self.assertRaisesRegex(kvcomp.Error, pattern):
                _kvcomp._array_info(obj, "q")

    def test_dlpack_bf16_capsule_is_consumed_and_deleted(self):
        t = FakeDLPack((4, 2, 64), code=KDL_BFLOAT, bits=16, data=0x2000, byte_offset=64)
        ptr, shape, strides, dtype = _kvcomp._array_info(t)
        self.assertEqual((ptr, shape, strides, dtype), (0x2040, (4, 2, 64), (128, 64, 1), "bfloat16"))
        self.assertEqual(t.deleted, 1)
        self.assertEqual(t.streams, [None])
        self.assertEqual(_capsule_name(t.capsules[0]), b"used_dltensor")

    def test_dlpack_explicit_strides_and_errors(self):
        t = FakeDLPack((3, 64), strides=(256, 1), code=KDL_FLOAT, bits=32)
        self.assertEqual(_kvcomp._array_info(t)[1:], ((3, 64), (256, 1), "float32"))
        self.assertEqual(t.deleted, 1)
        bad = FakeDLPack((3,), code=KDL_FLOAT, bits=64)
        with self.assertRaisesRegex(kvcomp.Error, r"v: unsupported DLPack dtype \(code 2, 64 bits\)"):
            _kvcomp._array_info(bad, "v")
        self.assertEqual(bad.deleted, 1)  # also on failure
        cpu = FakeDLPack((3,), device_type=KDL_CPU)
        with self.assertRaisesRegex(kvcomp.Error, r"k is not a CUDA array \(DLPack device: CPU\)"):
            _kvcomp._array_info(cpu, "k")
        self.assertEqual(cpu.streams, [])  # refused before asking for the capsule
        odd = FakeDLPack((3,), capsule_name=_OTHER)
        with self.assertRaisesRegex(kvcomp.Error, "did not return an unused 'dltensor' capsule"):
            _kvcomp._array_info(odd)
        self.assertEqual(odd.deleted, 0)  # not ours to delete

    def test_void2_cai_falls_back_to_dlpack(self):
        # torch spells bfloat16 '<V2' in its CUDA array interface; DLPack says what it is.
        t = FakeDLPack((2, 64), code=KDL_BFLOAT, bits=16, data=0x3000)
        t.__class__ = type("TorchLike", (FakeDLPack,), {"__cuda_array_interface__": {
            "shape": (2, 64), "typestr": "<V2", "data": (0x3000, False), "strides": None, "version": 2}})
        self.assertEqual(_kvcomp._array_info(t), (0x3000, (2, 64), (64, 1), "bfloat16"))

    def test_validation_before_any_device_work(self):
        # Wrong dtype / shape is reported from metadata alone (these pointers are never touched).
        k = cai((1, 2, 1, 64), "<f4")
        q = cai((1, 8, 64))
        with self.assertRaisesRegex(kvcomp.Error, "flash_decode_fp16: k must be float16, got float32"):
            kvcomp.baselines.flash_decode_fp16(k, k, q, q, stream=0)
        k16 = cai((1, 2, 5, 64))
        with self.assertRaisesRegex(kvcomp.Error, r"q must be \[batch, q_heads, head_dim\]"):
            kvcomp.baselines.flash_decode_fp16(k16, k16, cai((2, 8, 64)), cai((2, 8, 64)), stream=0)
        with self.assertRaisesRegex(kvcomp.Error, "out is read-only"):
            kvcomp.baselines.flash_decode_fp16(k16, k16, q, cai((1, 8, 64), readonly=True), stream=0)
        strided = cai((1, 2, 5, 64), strides=(2 * 5 * 128 * 2, 5 * 128 * 2, 128 * 2, 2))
        with self.assertRaisesRegex(kvcomp.Error, "each head's tokens contiguously"):
            kvcomp.baselines.flash_decode_fp16(strided, strided, q, q, stream=0)


class Streams(unittest.TestCase):
    def test_resolution(self):
        rs = kvcomp.resolve_stream
        self.assertEqual(rs(None), 0)
        self.assertEqual(rs(None, cai((1,))), 0)  # not from torch or cupy: the legacy default stream
        self.assertEqual(rs(0), 0)
        self.assertEqual(rs(0x55AA), 0x55AA)
        self.assertEqual(rs(type("TorchStream", (), {"cuda_stream": 77})()), 77)
        self.assertEqual(rs(type("CupyStream", (), {"ptr": 99})()), 99)
        self.assertEqual(rs(type("Protocol", (), {"__cuda_stream__": lambda self: (0, 1234)})()), 1234)
        for bad, pattern in [(-1, "non-negative"), ("s", "stream must be None, an int"), (True, "got bool"),
                             (type("P", (), {"__cuda_stream__": lambda self: 5})(), "expected \\(version, handle\\)")]:
            with self.subTest(bad=bad), self.assertRaisesRegex(kvcomp.Error, pattern):
                rs(bad)


class ReferenceCodec(unittest.TestCase):
    def test_encode_decode_round_trip_within_the_bound(self):
        T, D, eb = 64, 64, 0.05
        rng = random.Random(7)
        # Counts of stream symbols: pairs a * 15 + b of small codes (frequent when both are small),
        # then PAIR_ESC (225); symbols 226..255 never have a codeword.
        book = kvcomp.Codebook.from_histogram([1000 // (1 + s // 15 + s % 15) for s in range(225)] + [10] + [0] * 30)
        self.assertEqual(len(book.lengths), 256)
        self.assertGreater(book.lengths[225], 0)
        self.assertEqual(book.lengths[226:], [0] * 30)
        for kind, T in ((kvcomp.Kind.Key, 64), (kvcomp.Kind.Value, 64), (kvcomp.Kind.Value, 128)):
            x = array.array("f", [rng.gauss(0, 1) for _ in range(T * D)])
            data = kvcomp.ref.encode_block(kind, x, T, D, kvcomp.ErrorBound(value=eb), book)
            out = array.array("f", kvcomp.ref.decode_block(data, kind, T, D, book))
            # Groups: K per channel over the block's tokens, V per token over its channels, or per channel
            # where the block has more tokens than channels (format v4).
            by_channel = kind == kvcomp.Kind.Key or T > D
            if by_channel:
                groups = [[x[t * D + c] for t in range(T)] for c in range(D)]
            else:
                groups = [list(x[t * D:(t + 1) * D]) for t in range(T)]
            bounds = [eb * (max(g) - min(g)) * (1 + 1e-6) for g in groups]  # eb x range, computed in fp32
            for t in range(T):
                for c in range(D):
                    bound = bounds[c] if by_channel else bounds[t]
                    self.assertLessEqual(abs(out[t * D + c] - x[t * D + c]), bound, (kind, t, c))
            corrupt = bytearray(data)
            corrupt[len(corrupt) // 2] ^= 0x10
            with self.assertRaisesRegex(kvcomp.Error, "^kvcomp: decode_block: "):
                kvcomp.ref.decode_block(bytes(corrupt), kind, T, D, book)
            with self.assertRaisesRegex(kvcomp.Error, "too small"):
                kvcomp.ref.decode_block(data[:16], kind, T, D, book)

    def test_codebook_from_bad_lengths(self):
        with self.assertRaisesRegex(kvcomp.Error, "Kraft"):
            kvcomp.Codebook.from_lengths([1] * 3 + [0] * 222 + [1] + [0] * 30)  # not a prefix code
        with self.assertRaisesRegex(kvcomp.Error, "symbol 255"):
            kvcomp.Codebook.from_lengths([1] + [0] * 224 + [1] + [0] * 29 + [1])  # only 0..225 may have codewords
        with self.assertRaisesRegex(kvcomp.Error, "225"):
            kvcomp.Codebook.from_lengths([1, 1] + [0] * 254)  # no PAIR_ESC
        self.assertEqual(kvcomp.Codebook.from_lengths([1] + [0] * 224 + [1] + [0] * 30).lengths[225], 1)
        with self.assertRaisesRegex(kvcomp.Error, "low_bits"):
            kvcomp.Codebook.from_lengths([1] + [0] * 224 + [1] + [0] * 30, low_bits=4)
        with self.assertRaisesRegex(kvcomp.Error, "low_bits"):
            kvcomp.Codebook.from_lengths([1] + [0] * 224 + [1] + [0] * 30, low_bits=-1)

    def test_codebook_low_bits(self):
        lengths = [1] + [0] * 224 + [1] + [0] * 30
        self.assertEqual(kvcomp.Codebook.from_lengths(lengths).low_bits, 0)
        for k in range(4):
            book = kvcomp.Codebook.from_lengths(lengths, low_bits=k)
            self.assertEqual((book.low_bits, book.lengths), (k, lengths))
        counts = [1000 // (1 + s // 15 + s % 15) for s in range(225)] + [10] + [0] * 30
        self.assertEqual(kvcomp.Codebook.from_histogram(counts).low_bits, 0)
        self.assertEqual(kvcomp.Codebook.from_histogram(counts, low_bits=2).low_bits, 2)
        with self.assertRaisesRegex(kvcomp.Error, "low_bits"):
            kvcomp.Codebook.from_histogram(counts, low_bits=7)
        # 1024 counts: the histograms under k = 0..3 (row k at 256 k); the k needing the fewest bits wins.
        # Codes uniform over 0..59: under k = 0 and 1 most pairs escape, under k = 2 all fit.
        rows = [[0] * 256 for _ in range(4)]
        for a in range(60):
            for b in range(60):
                for k in range(4):
                    ha, hb = a >> k, b >> k
                    rows[k][ha * 15 + hb if ha < 15 and hb < 15 else 225] += 1
        self.assertGreaterEqual(kvcomp.Codebook.from_histogram(sum(rows, [])).low_bits, 2)
        # The same histogram under every k: low bits only cost, k = 0.
        self.assertEqual(kvcomp.Codebook.from_histogram(counts * 4).low_bits, 0)
        with self.assertRaisesRegex(kvcomp.Error, "pass 256 counts with low_bits"):
            kvcomp.Codebook.from_histogram(counts * 4, low_bits=1)
        with self.assertRaisesRegex(kvcomp.Error, "expected 256 counts .* or 1024 .* got 512"):
            kvcomp.Codebook.from_histogram(counts * 2)

    def test_encode_decode_with_low_bits(self):
        T, D, eb = 32, 64, 0.01
        rng = random.Random(11)
        x = array.array("f", [rng.gauss(0, 1) for _ in range(T * D)])
        # Hi parts of codes under k = 2: a histogram skewed towards the middle of 0..14.
        counts = [1 + 100 * (8 - abs(s // 15 - 6)) * (8 - abs(s % 15 - 6)) for s in range(225)] + [50] + [0] * 30
        for k in range(4):
            book = kvcomp.Codebook.from_histogram(counts, low_bits=k)
            data = kvcomp.ref.encode_block(kvcomp.Kind.Value, x, T, D, kvcomp.ErrorBound(value=eb), book)
            out = array.array("f", kvcomp.ref.decode_block(data, kvcomp.Kind.Value, T, D, book))
            for t in range(T):
                row = x[t * D:(t + 1) * D]
                bound = eb * (max(row) - min(row)) * (1 + 1e-6)
                for c in range(D):
                    self.assertLessEqual(abs(out[t * D + c] - x[t * D + c]), bound, (k, t, c))

    def test_kivi_reference_window_is_exact_and_chunks_within_half_a_step(self):
        B, H, T, D, bits = 1, 2, 100, 64, 4
        rng = random.Random(3)
        k = array.array("f", [rng.uniform(-2, 2) for _ in range(B * H * T * D)])
        v = array.array("f", [rng.uniform(-2, 2) for _ in range(B * H * T * D)])
        ko, vo = kvcomp.baselines.kivi_reference(B, H, 8, D, T, bits, 32, k, v)
        ko, vo = array.array("f", ko), array.array("f", vo)
        chunks = (T - 32) // 32  # quantized tokens: [0, 32 * chunks)
        for i in range(len(k)):
            token = (i // D) % T
            if token >= 32 * chunks:
                self.assertEqual((ko[i], vo[i]), (k[i], v[i]))
            else:  # every group's range is within [-2, 2]: half a step is at most 4 / 15 / 2 (+ fp16 params)
                self.assertLessEqual(abs(ko[i] - k[i]), 4 / 15 / 2 * 1.01 + 2e-3)
                self.assertLessEqual(abs(vo[i] - v[i]), 4 / 15 / 2 * 1.01 + 2e-3)
        with self.assertRaisesRegex(kvcomp.Error, "expected 12800 float32 values"):
            kvcomp.baselines.kivi_reference(B, H, 8, D, T, bits, 32, k[:-1], v)


if __name__ == "__main__":
    unittest.main(verbosity=2)
