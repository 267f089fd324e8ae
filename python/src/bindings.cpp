// kvcomp._kvcomp: pybind11 bindings of the C++ API (include/kvcomp/cache.hpp),
// the CPU reference codec and the baselines (fp16 flash-decoding, KIVI).
//
// The public package (python/kvcomp/) wraps this module: it resolves streams
// (None = the caller's current stream) and re-exports. Here: device arrays
// arrive through __cuda_array_interface__ (v2/v3) or DLPack, so no framework
// is linked; every array is checked (CUDA, dtype, shape, strides, writable)
// before any device work, and every failure is a kvcomp.Error. A DecodePlan
// remembers the cache that made it (another cache's plan is refused).
// The GIL is released around CUDA work; a mutex per object then keeps two
// Python threads from using one (not thread-safe) cache at once.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kvcomp/cache.hpp"
#include "kvcomp/reference.hpp"
#include "src/baselines.hpp"
#include "src/device_buffer.hpp"
#include "src/kivi.hpp"

#ifndef KVCOMP_VERSION
#define KVCOMP_VERSION "unknown"
#endif

namespace py = pybind11;

using kvcomp::BoundMode;
using kvcomp::BoundOverride;
using kvcomp::Cache;
using kvcomp::Codebook;
using kvcomp::Config;
using kvcomp::DecodePlan;
using kvcomp::DType;
using kvcomp::Error;
using kvcomp::ErrorBound;
using kvcomp::Kind;
using kvcomp::LayerStats;
using kvcomp::Stats;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw Error(msg); }

std::string shape_str(const std::vector<int64_t>& v) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  s << ']';
  return s.str();
}

// ---------------------------------------------------------------------------
// DLPack, legacy (unversioned) ABI, as the DLPack spec (dlpack.h) defines it.
namespace dl {
constexpr int32_t kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13;
constexpr uint8_t kDLInt = 0, kDLFloat = 2, kDLBfloat = 4;
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL = row-major contiguous
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
std::string device_name(int32_t t) {
  switch (t) {
    case kDLCPU: return "CPU";
    case kDLCUDA: return "CUDA";
    case kDLCUDAHost: return "CUDA pinned host";
    case kDLCUDAManaged: return "CUDA managed";
  }
  return "device type " + std::to_string(t);
}
}  // namespace dl

// ---------------------------------------------------------------------------
// A device array as kvcomp sees it: pointer, shape, strides in elements.
struct ArrayView {
  std::string name;
  uintptr_t ptr = 0;
  std::vector<int64_t> shape, strides;
  DType dtype = DType::F16;
  bool int32 = false;  // int32 elements: only where a call takes them (parse_array's int32_ok; dtype unused)
  bool readonly = false;
  bool has_producer_stream = false;  // CAI v3 "stream": work on it must finish before we read
  uintptr_t producer_stream = 0;
  std::shared_ptr<void> owner;       // a consumed DLPack tensor: its deleter runs when the view goes

  int ndim() const { return int(shape.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  /// Row-major contiguous; strides of size-1 dims do not matter (frameworks report them freely).
  bool contiguous() const {
    int64_t expect = 1;
    for (int i = ndim() - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
};

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> s(shape.size());
  int64_t acc = 1;
  for (int i = int(shape.size()) - 1; i >= 0; --i) {
    s[i] = acc;
    acc *= shape[i];
  }
  return s;
}

void check_dims(const ArrayView& a) {
  for (size_t i = 0; i < a.shape.size(); ++i) {
    if (a.shape[i] < 0) fail(a.name + ": negative dimension in shape " + shape_str(a.shape));
    if (a.strides[i] < 0) fail(a.name + ": negative strides are not supported, got " + shape_str(a.strides));
  }
}

// "<V2" is how torch (and ml_dtypes) spell bfloat16 in the CUDA array
// interface; it names no type, so such arrays are read through DLPack.
bool is_void2(const std::string& t) { return t.size() == 3 && t[1] == 'V' && t[2] == '2'; }

ArrayView parse_cai(const py::dict& cai, const std::string& name) {
  ArrayView a;
  a.name = name;
  const int version = cai.contains("version") ? cai["version"].cast<int>() : -1;
  if (version != 2 && version != 3)
    fail(name + ": unsupported __cuda_array_interface__ version " + std::to_string(version) + " (kvcomp reads 2 and 3)");
  if (!cai.contains("shape") || !cai.contains("typestr") || !cai.contains("data"))
    fail(name + ": __cuda_array_interface__ lacks shape, typestr or data");
  if (cai.contains("mask") && !cai["mask"].is_none()) fail(name + ": masked arrays are not supported");
  for (auto d : cai["shape"].cast<py::sequence>()) a.shape.push_back(d.cast<int64_t>());

  const std::string t = cai["typestr"].cast<std::string>();
  size_t itemsize = 0;
  // '<' little-endian; '=' native, which is little-endian on every CUDA host.
  if (t == "<f2" || t == "=f2") { a.dtype = DType::F16; itemsize = 2; }
  else if (t == "<f4" || t == "=f4") { a.dtype = DType::F32; itemsize = 4; }
  else if (t == "<i4" || t == "=i4") { a.int32 = true; itemsize = 4; }
  else if (is_void2(t))
    fail(name + ": typestr '" + t + "' (2-byte void, how bfloat16 is spelled) is ambiguous; pass bfloat16 arrays "
         "through DLPack (__dlpack__)");
  else
    fail(name + ": unsupported dtype (typestr '" + t + "'); kvcomp takes float16, bfloat16 or float32");

  const py::sequence data = cai["data"].cast<py::sequence>();
  if (data.size() != 2) fail(name + ": __cuda_array_interface__ data must be (pointer, read_only)");
  a.ptr = data[0].cast<uintptr_t>();
  a.readonly = data[1].cast<bool>();

  if (!cai.contains("strides") || cai["strides"].is_none()) {
    a.strides = contiguous_strides(a.shape);
  } else {
    const py::sequence st = cai["strides"].cast<py::sequence>();
    if (st.size() != a.shape.size()) fail(name + ": strides and shape differ in length");
    for (auto s : st) {
      const int64_t bytes = s.cast<int64_t>();
      if (bytes % int64_t(itemsize) != 0)
        fail(name + ": stride of " + std::to_string(bytes) + " bytes is not a multiple of the element size " +
             std::to_string(itemsize));
      a.strides.push_back(bytes / int64_t(itemsize));
    }
  }
  if (version >= 3 && cai.contains("stream") && !cai["stream"].is_none()) {
    a.has_producer_stream = true;
    a.producer_stream = cai["stream"].cast<uintptr_t>();
  }
  check_dims(a);
  return a;
}

// Calls a producer's protocol method; its failures become kvcomp.Error naming the array.
template <typename F>
py::object producer_call(const std::string& name, const char* what, F&& f) {
  try {
    return f();
  } catch (py::error_already_set& e) {
    fail(name + ": " + what + " failed: " + e.what());
  }
}

/// `stream`: the DLPack stream argument (None, or the consumer's stream; 1 = legacy default).
ArrayView parse_dlpack(py::handle obj, const std::string& name, const py::object& stream) {
  int32_t dev_type = dl::kDLCUDA;
  if (py::hasattr(obj, "__dlpack_device__")) {
    const py::object d = producer_call(name, "__dlpack_device__()", [&] { return obj.attr("__dlpack_device__")(); });
    dev_type = d.cast<py::sequence>()[0].cast<int32_t>();
  }
  // Asked first: the stream argument only means something for CUDA arrays.
  if (dev_type != dl::kDLCUDA && dev_type != dl::kDLCUDAManaged)
    fail(name + " is not a CUDA array (DLPack device: " + dl::device_name(dev_type) + "); kvcomp needs CUDA device memory");
  const py::object cap = producer_call(name, "__dlpack__()", [&] {
    return stream.is_none() ? obj.attr("__dlpack__")() : obj.attr("__dlpack__")(py::arg("stream") = stream);
  });
  if (!PyCapsule_IsValid(cap.ptr(), "dltensor"))
    fail(name + ": __dlpack__() did not return an unused 'dltensor' capsule");
  auto* mt = static_cast<dl::DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
  // From here the tensor is ours: rename (so the capsule's destructor leaves it
  // alone) and call its deleter when the view goes, as the protocol asks.
  PyCapsule_SetName(cap.ptr(), "used_dltensor");
  ArrayView a;
  a.name = name;
  a.owner = std::shared_ptr<void>(mt, [](void* p) {
    auto* t = static_cast<dl::DLManagedTensor*>(p);
    if (t->deleter) t->deleter(t);
  });
  const dl::DLTensor& t = mt->dl_tensor;
  if (t.device.device_type != dl::kDLCUDA && t.device.device_type != dl::kDLCUDAManaged)
    fail(name + " is not a CUDA array (DLPack device: " + dl::device_name(t.device.device_type) + ")");
  if (t.dtype.lanes != 1) fail(name + ": vector dtypes (lanes > 1) are not supported");
  if (t.dtype.code == dl::kDLFloat && t.dtype.bits == 16) a.dtype = DType::F16;
  else if (t.dtype.code == dl::kDLBfloat && t.dtype.bits == 16) a.dtype = DType::BF16;
  else if (t.dtype.code == dl::kDLFloat && t.dtype.bits == 32) a.dtype = DType::F32;
  else if (t.dtype.code == dl::kDLInt && t.dtype.bits == 32) a.int32 = true;
  else
    fail(name + ": unsupported DLPack dtype (code " + std::to_string(t.dtype.code) + ", " +
         std::to_string(t.dtype.bits) + " bits); kvcomp takes float16, bfloat16 or float32");
  if (t.ndim < 0 || (t.ndim > 0 && !t.shape)) fail(name + ": malformed DLPack tensor");
  a.shape.assign(t.shape, t.shape + t.ndim);
  a.strides = t.strides ? std::vector<int64_t>(t.strides, t.strides + t.ndim) : contiguous_strides(a.shape);
  a.ptr = reinterpret_cast<uintptr_t>(t.data) + t.byte_offset;
  check_dims(a);
  return a;
}

ArrayView parse_array_impl(py::handle obj, const std::string& name, const py::object& dlpack_stream) {
  if (obj.is_none()) fail(name + " is None; expected a CUDA array");
  const bool has_dlpack = py::hasattr(obj, "__dlpack__");
  // hasattr is false when the property raises (torch: a tensor that requires grad): DLPack then says why.
  if (py::hasattr(obj, "__cuda_array_interface__")) {
    const py::object cai = obj.attr("__cuda_array_interface__");
    if (!py::isinstance<py::dict>(cai)) fail(name + ": __cuda_array_interface__ is not a dict");
    const py::dict d = cai.cast<py::dict>();
    const bool bf16_spelled_void = d.contains("typestr") && is_void2(d["typestr"].cast<std::string>());
    if (!(bf16_spelled_void && has_dlpack)) return parse_cai(d, name);
  }
  if (has_dlpack) return parse_dlpack(obj, name, dlpack_stream);
  const std::string type = py::str(py::type::of(obj).attr("__name__")).cast<std::string>();
  if (py::hasattr(obj, "__array_interface__") || PyObject_CheckBuffer(obj.ptr()))
    fail(name + " is a host (CPU) array (" + type + "); kvcomp needs a CUDA device array");
  fail(name + " is not a CUDA array: " + type + " has neither __cuda_array_interface__ nor __dlpack__");
}

/// Any object exposing __cuda_array_interface__ (preferred) or __dlpack__.
/// int32_ok: the call takes int32 arrays (and only those); otherwise int32 is refused like any
/// dtype kvcomp does not take.
ArrayView parse_array(py::handle obj, const std::string& name, const py::object& dlpack_stream,
                      bool int32_ok = false) {
  ArrayView a;
  try {
    a = parse_array_impl(obj, name, dlpack_stream);
  } catch (const py::cast_error& e) {  // a field of the wrong type in the producer's metadata
    fail(name + ": malformed array metadata (" + e.what() + ")");
  }
  if (a.int32 && !int32_ok) fail(name + ": unsupported dtype int32; kvcomp takes float16, bfloat16 or float32");
  if (int32_ok && !a.int32) fail(name + " must be int32, got " + kvcomp::dtype_name(a.dtype));
  return a;
}

// ---------------------------------------------------------------------------
// Checks made just before device work (they need the CUDA runtime).

/// The pointer must be device (or managed) memory of the current device: a
/// kernel given anything else faults or reads the wrong GPU.
void check_device_memory(const ArrayView& a) {
  if (a.ptr == 0) {
    if (a.numel() != 0) fail(a.name + " has a null data pointer");
    return;
  }
  cudaPointerAttributes at{};
  const cudaError_t e = cudaPointerGetAttributes(&at, reinterpret_cast<const void*>(a.ptr));
  if (e != cudaSuccess) {
    cudaGetLastError();
    fail(a.name + ": cannot query its memory (" + cudaGetErrorString(e) + ")");
  }
  if (at.type != cudaMemoryTypeDevice && at.type != cudaMemoryTypeManaged)
    fail(a.name + " is not in CUDA device memory (a host pointer?)");
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) cudaGetLastError();
  if (at.type == cudaMemoryTypeDevice && at.device != dev)
    fail(a.name + " is on CUDA device " + std::to_string(at.device) + " but the current device is " +
         std::to_string(dev) + "; make its device current first");
}

/// The DLPack stream argument for a consumer stream: 1 names the legacy default stream (0 is reserved).
py::object dlpack_stream_arg(uintptr_t stream) { return py::int_(stream == 0 ? 1 : stream); }

/// CAI v3: the producer's pending work on its stream must precede ours.
void wait_for_producer(const ArrayView& a, cudaStream_t consumer) {
  if (!a.has_producer_stream) return;
  auto norm = [](uintptr_t s) { return s == 1 ? uintptr_t(0) : s; };  // 1 = legacy default = 0
  if (norm(a.producer_stream) == norm(reinterpret_cast<uintptr_t>(consumer))) return;
  cudaEvent_t ev;
  auto check = [&](cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(a.name + ": " + what + " for the producer's stream: " + cudaGetErrorString(e));
    }
  };
  check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
  const cudaError_t r = cudaEventRecord(ev, reinterpret_cast<cudaStream_t>(norm(a.producer_stream)));
  const cudaError_t w = r == cudaSuccess ? cudaStreamWaitEvent(consumer, ev, 0) : r;
  cudaEventDestroy(ev);
  check(w, "event record/wait");
}

void check_dtype(const ArrayView& a, DType want, const char* what) {
  if (a.dtype != want)
    fail(std::string(what) + ": " + a.name + " must be " + kvcomp::dtype_name(want) + ", got " +
         kvcomp::dtype_name(a.dtype));
}

void check_shape(const ArrayView& a, const std::vector<int64_t>& want, const char* what, const char* layout) {
  if (a.shape != want)
    fail(std::string(what) + ": " + a.name + " must be " + layout + " = " + shape_str(want) + ", got " +
         shape_str(a.shape));
}

void check_contiguous(const ArrayView& a, const char* what) {
  if (!a.contiguous())
    fail(std::string(what) + ": " + a.name + " must be contiguous, got strides " + shape_str(a.strides) +
         " (elements) for shape " + shape_str(a.shape));
}

void check_writable(const ArrayView& a, const char* what) {
  if (a.readonly) fail(std::string(what) + ": " + a.name + " is read-only");
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    fail(std::string(what) + ": " + cudaGetErrorString(e));
  }
}

int current_device() {
  int dev = 0;
  cuda_ok(cudaGetDevice(&dev), "cudaGetDevice");
  return dev;
}

int current_sms() {
  int sms = 0;
  cuda_ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, current_device()), "device attribute");
  return sms;
}

// ---------------------------------------------------------------------------
// The arrays of Cache calls, checked against the config: shared by the eager
// calls (append, attend) and the plan-based ones (append_plan, attend_plan),
// which differ only in how many rows they take.

/// k and v of an append, parsed and checked (the strides are the C++ call's: -1 = its default).
struct KvArrays {
  ArrayView k, v;
  int64_t token_stride = -1, head_stride = -1;
};

/// k and v: [rows, kv_heads, head_dim] of the config's dtype, unit stride along
/// head_dim; token and head strides are free but must be the same for both.
/// `layout` names the shape in messages.
KvArrays parse_kv(const Config& cfg, py::handle k_obj, py::handle v_obj, int64_t rows, const char* what,
                  const char* layout, uintptr_t stream) {
  KvArrays in{parse_array(k_obj, "k", dlpack_stream_arg(stream)), parse_array(v_obj, "v", dlpack_stream_arg(stream))};
  const std::vector<int64_t> want{rows, cfg.kv_heads, cfg.head_dim};
  for (const ArrayView* a : {&in.k, &in.v}) {
    check_dtype(*a, cfg.dtype, what);
    check_shape(*a, want, what, layout);
    if (cfg.head_dim > 1 && a->strides[2] != 1)
      fail(std::string(what) + ": " + a->name + " must have unit stride along head_dim, got strides " +
           shape_str(a->strides));
  }
  // One token stride and one head stride serve both arrays (size-1 dims: any stride).
  for (int d = 0; d < 2; ++d)
    if (want[d] > 1 && in.k.strides[d] != in.v.strides[d])
      fail(std::string(what) + ": k and v must have the same strides, got " + shape_str(in.k.strides) + " and " +
           shape_str(in.v.strides));
  if (rows > 1) in.token_stride = in.k.strides[0];
  if (cfg.kv_heads > 1) in.head_stride = in.k.strides[1];
  if (rows > 0) {
    check_device_memory(in.k);
    check_device_memory(in.v);
  }
  return in;
}

/// q and out of an attention: contiguous [rows, q_heads, head_dim], q float16
/// or bfloat16, out of q's dtype and writable.
struct QOutArrays {
  ArrayView q, out;
};

QOutArrays parse_q_out(const Config& cfg, py::handle q_obj, py::handle out_obj, int64_t rows, const char* what,
                       const char* layout, uintptr_t stream) {
  QOutArrays a{parse_array(q_obj, "q", dlpack_stream_arg(stream)),
               parse_array(out_obj, "out", dlpack_stream_arg(stream))};
  if (a.q.dtype != DType::F16 && a.q.dtype != DType::BF16)
    fail(std::string(what) + ": q must be float16 or bfloat16, got " + kvcomp::dtype_name(a.q.dtype));
  check_dtype(a.out, a.q.dtype, what);
  const std::vector<int64_t> want{rows, cfg.q_heads, cfg.head_dim};
  for (const ArrayView* x : {&a.q, &a.out}) {
    check_shape(*x, want, what, layout);
    check_contiguous(*x, what);
  }
  check_writable(a.out, what);
  if (rows > 0) {
    check_device_memory(a.q);
    check_device_memory(a.out);
  }
  return a;
}

/// Orders each array's producer stream (CAI v3) before `stream`.
void wait_for_producers(std::initializer_list<const ArrayView*> arrays, cudaStream_t stream) {
  for (const ArrayView* a : arrays) wait_for_producer(*a, stream);
}

/// A float32 host buffer (array.array('f'), memoryview, or raw bytes) of exactly `count` floats.
std::vector<float> host_floats(const py::buffer& b, const std::string& name, size_t count) {
  const py::buffer_info info = b.request();
  const bool bytes_like = info.itemsize == 1;
  if (!bytes_like && (info.itemsize != 4 || info.format != "f"))
    fail(name + ": expected float32 data or raw bytes, got buffer format '" + info.format + "'");
  int64_t expect = info.itemsize;
  for (int i = int(info.ndim) - 1; i >= 0; --i) {
    if (info.shape[i] != 1 && info.strides[i] != expect) fail(name + ": buffer must be contiguous");
    expect *= info.shape[i];
  }
  const size_t bytes = size_t(info.size) * size_t(info.itemsize);
  if (bytes != count * sizeof(float))
    fail(name + ": expected " + std::to_string(count) + " float32 values (" + std::to_string(count * 4) +
         " bytes), got " + std::to_string(bytes) + " bytes");
  std::vector<float> out(count);
  if (count) std::memcpy(out.data(), info.ptr, bytes);
  return out;
}

py::bytes float_bytes(const std::vector<float>& v) {
  return py::bytes(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

// ---------------------------------------------------------------------------
// Objects held by Python.

/// A number no other PyCache of this process has (0 is never used).
uint64_t next_cache_serial() {
  static std::atomic<uint64_t> n{0};
  return ++n;
}

struct PyCache {
  explicit PyCache(const Config& c) : cache(c) {}
  Cache cache;
  std::mutex mu;
  const uint64_t serial = next_cache_serial();
};

/// A DecodePlan with the cache that made it: a plan id means nothing to
/// another cache (it would name that cache's plan of another batch, or none).
struct PyPlan {
  DecodePlan plan;
  uint64_t cache_serial = 0;  // PyCache::serial of its maker; 0: DecodePlan(), made by no cache
};

std::string plan_repr(const PyPlan& p) {
  return "DecodePlan(id=" + std::to_string(p.plan.id) + ", batch=" + std::to_string(p.plan.batch) +
         ", tokens=" + std::to_string(p.plan.tokens) + ")";
}

/// The C++ plan of `p`, once it is known to be `self`'s.
DecodePlan plan_of(const PyCache& self, const PyPlan& p, const char* what) {
  if (p.cache_serial == 0)
    fail(std::string(what) + ": " + plan_repr(p) + " was not made by a Cache; use Cache.make_plan(batch)");
  if (p.cache_serial != self.serial) fail(std::string(what) + ": " + plan_repr(p) + " was made by another Cache");
  return p.plan;
}

/// Runs f(cache) without the GIL, one thread at a time.
template <typename F>
auto locked(PyCache& self, F&& f) {
  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(self.mu);
  return f(self.cache);
}

struct PyKivi {
  explicit PyKivi(const kvcomp::baseline::KiviShape& s) : cache(s), sms(current_sms()) {
    workspace.reserve(cache.workspace_floats(sms), "the KIVI attention workspace");
  }
  kvcomp::baseline::KiviCache cache;
  int sms;
  kvcomp::detail::DeviceBuffer<float> workspace;
  bool built = false;
  std::mutex mu;
};

/// flash_decode_fp16's workspaces, one per (device, stream): calls on one
/// stream run in order and may share one; calls on two streams must not.
/// Deliberately never freed: freeing at exit races the CUDA runtime's teardown.
struct FlashWorkspaces {
  std::mutex mu;
  std::map<std::pair<int, uintptr_t>, kvcomp::detail::DeviceBuffer<float>> by_stream;
};
FlashWorkspaces& flash_workspaces() {
  static auto* w = new FlashWorkspaces;
  return *w;
}

std::string bound_repr(const ErrorBound& b) {
  std::ostringstream s;
  s << "ErrorBound(" << (b.mode == BoundMode::Relative ? "BoundMode.Relative" : "BoundMode.Absolute") << ", "
    << b.value << ")";
  return s.str();
}

std::string override_repr(const BoundOverride& o) {
  return "BoundOverride(layer=" + std::to_string(o.layer) + ", kv_head=" + std::to_string(o.kv_head) +
         ", k=" + bound_repr(o.k) + ", v=" + bound_repr(o.v) + ")";
}

const char* dtype_repr(DType t) { return t == DType::F16 ? "DType.F16" : t == DType::BF16 ? "DType.BF16" : "DType.F32"; }

std::string config_repr(const Config& c) {
  std::ostringstream s;
  s << "Config(layers=" << c.layers << ", kv_heads=" << c.kv_heads << ", q_heads=" << c.q_heads
    << ", head_dim=" << c.head_dim << ", dtype=" << dtype_repr(c.dtype) << ", block_tokens=" << c.block_tokens
    << ", k_bound=" << bound_repr(c.k_bound) << ", v_bound=" << bound_repr(c.v_bound) << ", overrides=[";
  for (size_t i = 0; i < c.overrides.size(); ++i) s << (i ? ", " : "") << override_repr(c.overrides[i]);
  s << "], pool_bytes=" << c.pool_bytes << ", max_seqs=" << c.max_seqs << ", max_attend_batch=" << c.max_attend_batch
    << ", max_tokens_per_seq=" << c.max_tokens_per_seq << ", pool_page_bytes=" << c.pool_page_bytes
    << ", transform=" << (c.transform == kvcomp::Transform::Hadamard ? "Transform.Hadamard" : "Transform.None_")
    << ", window=" << c.window << ", layer_windows=[";
  for (size_t i = 0; i < c.layer_windows.size(); ++i) s << (i ? ", " : "") << c.layer_windows[i];
  s << "], sink_tokens=" << c.sink_tokens << ", max_rollback=" << c.max_rollback << ", tail_format="
    << (c.tail_format == kvcomp::TailFormat::Codes8   ? "TailFormat.Codes8"
        : c.tail_format == kvcomp::TailFormat::Codes6 ? "TailFormat.Codes6"
                                                      : "TailFormat.Input")
    << ")";
  return s.str();
}

/// Sets fields of a bound object from keyword arguments (through its properties,
/// so types convert and unknown names are reported).
void set_fields(py::object& obj, const py::kwargs& kw, const char* type) {
  for (auto item : kw) {
    const std::string key = item.first.cast<std::string>();
    if (key.empty() || key[0] == '_' || !py::hasattr(obj, key.c_str()))
      throw py::type_error(std::string(type) + " has no field '" + key + "'");
    py::setattr(obj, key.c_str(), item.second);
  }
}

// ---------------------------------------------------------------------------
// Bindings.

void bind_types(py::module_& m) {
  py::enum_<DType>(m, "DType", "Element type of K/V (Config.dtype) and of q/out.")
      .value("F16", DType::F16)
      .value("BF16", DType::BF16)
      .value("F32", DType::F32);
  py::enum_<BoundMode>(m, "BoundMode", "Relative: eb x (max - min) of the quantization group; Absolute: eb.")
      .value("Relative", BoundMode::Relative)
      .value("Absolute", BoundMode::Absolute);
  py::enum_<Kind>(m, "Kind").value("Key", Kind::Key).value("Value", Kind::Value);
  py::enum_<kvcomp::Transform>(m, "Transform",
                               "Orthogonal transform of K/V before storing (Config.transform); Hadamard: x H / sqrt(D).")
      .value("None_", kvcomp::Transform::None)
      .value("Hadamard", kvcomp::Transform::Hadamard);
  py::enum_<kvcomp::TailFormat>(m, "TailFormat",
                                "How the open tail is held (Config.tail_format): Input (as given), Codes8 or "
                                "Codes6 (8- or 6-bit codes per token vector, kvcomp/tail_codes.hpp).")
      .value("Input", kvcomp::TailFormat::Input)
      .value("Codes8", kvcomp::TailFormat::Codes8)
      .value("Codes6", kvcomp::TailFormat::Codes6);

  py::class_<ErrorBound>(m, "ErrorBound")
      .def(py::init([](BoundMode mode, float value) { return ErrorBound{mode, value}; }),
           py::arg("mode") = ErrorBound{}.mode, py::arg("value") = ErrorBound{}.value)
      .def_readwrite("mode", &ErrorBound::mode)
      .def_readwrite("value", &ErrorBound::value)
      .def("__eq__", [](const ErrorBound& a, const ErrorBound& b) { return a.mode == b.mode && a.value == b.value; })
      .def("__repr__", &bound_repr);

  py::class_<BoundOverride>(m, "BoundOverride")
      .def(py::init([](int layer, int kv_head, ErrorBound k, ErrorBound v) { return BoundOverride{layer, kv_head, k, v}; }),
           py::arg("layer") = 0, py::arg("kv_head") = -1, py::arg("k") = ErrorBound{}, py::arg("v") = ErrorBound{})
      .def_readwrite("layer", &BoundOverride::layer)
      .def_readwrite("kv_head", &BoundOverride::kv_head)
      .def_readwrite("k", &BoundOverride::k)
      .def_readwrite("v", &BoundOverride::v)
      .def("__repr__", &override_repr);

  py::class_<Config>(m, "Config",
                     "Cache configuration; Config(**fields). `overrides` is copied in and out: assign a "
                     "whole list (cfg.overrides = [...]), appending to the returned list changes nothing.")
      .def(py::init([](const py::kwargs& kw) {
        py::object obj = py::cast(Config{});
        set_fields(obj, kw, "Config");
        return obj.cast<Config>();
      }))
      .def_readwrite("layers", &Config::layers)
      .def_readwrite("kv_heads", &Config::kv_heads)
      .def_readwrite("q_heads", &Config::q_heads)
      .def_readwrite("head_dim", &Config::head_dim)
      .def_readwrite("dtype", &Config::dtype)
      .def_readwrite("block_tokens", &Config::block_tokens)
      .def_readwrite("k_bound", &Config::k_bound)
      .def_readwrite("v_bound", &Config::v_bound)
      .def_readwrite("overrides", &Config::overrides)
      .def_readwrite("pool_bytes", &Config::pool_bytes)
      .def_readwrite("max_seqs", &Config::max_seqs)
      .def_readwrite("max_attend_batch", &Config::max_attend_batch)
      .def_readwrite("max_tokens_per_seq", &Config::max_tokens_per_seq)
      .def_readwrite("pool_page_bytes", &Config::pool_page_bytes)
      .def_readwrite("transform", &Config::transform)
      .def_readwrite("tail_format", &Config::tail_format)
      .def_readwrite("window", &Config::window)
      .def_readwrite("layer_windows", &Config::layer_windows)
      .def_readwrite("sink_tokens", &Config::sink_tokens)
      .def_readwrite("max_rollback", &Config::max_rollback)
      .def("__repr__", &config_repr);

  py::class_<LayerStats>(m, "LayerStats")
      .def_readonly("compressed_bytes", &LayerStats::compressed_bytes)
      .def_readonly("tail_tokens", &LayerStats::tail_tokens)
      .def_readonly("tail_bytes", &LayerStats::tail_bytes)
      .def_readonly("tokens", &LayerStats::tokens)
      .def("__repr__", [](const LayerStats& s) {
        return "LayerStats(compressed_bytes=" + std::to_string(s.compressed_bytes) +
               ", tail_tokens=" + std::to_string(s.tail_tokens) + ", tail_bytes=" + std::to_string(s.tail_bytes) +
               ", tokens=" + std::to_string(s.tokens) + ")";
      });

  py::class_<Stats>(m, "Stats")
      .def_readonly("compressed_bytes", &Stats::compressed_bytes)
      .def_readonly("tail_bytes", &Stats::tail_bytes)
      .def_readonly("metadata_bytes", &Stats::metadata_bytes)
      .def_readonly("pool_bytes_in_use", &Stats::pool_bytes_in_use)
      .def_readonly("pool_page_bytes", &Stats::pool_page_bytes)
      .def_readonly("pool_capacity", &Stats::pool_capacity)
      .def_readonly("tokens", &Stats::tokens)
      .def_readonly("ratio_vs_fp16", &Stats::ratio_vs_fp16)
      .def_readonly("per_layer", &Stats::per_layer)
      .def("__repr__", [](const Stats& s) {
        std::ostringstream o;
        o << "Stats(compressed_bytes=" << s.compressed_bytes << ", tail_bytes=" << s.tail_bytes
          << ", metadata_bytes=" << s.metadata_bytes << ", pool_bytes_in_use=" << s.pool_bytes_in_use
          << ", pool_page_bytes=" << s.pool_page_bytes << ", pool_capacity=" << s.pool_capacity
          << ", tokens=" << s.tokens << ", ratio_vs_fp16=" << s.ratio_vs_fp16 << ", layers=" << s.per_layer.size()
          << ")";
        return o.str();
      });

  py::class_<PyPlan>(m, "DecodePlan",
                     "A batch layout for plan-based decode (Cache.make_plan): `batch` sequence slots whose device "
                     "buffers stay fixed, so append_plan/attend_plan can be captured in a CUDA graph. Valid only "
                     "for the Cache that made it; DecodePlan() is a placeholder no cache accepts.")
      .def(py::init<>())
      .def_property_readonly("id", [](const PyPlan& p) { return p.plan.id; })
      .def_property_readonly("batch", [](const PyPlan& p) { return p.plan.batch; })
      .def_property_readonly("tokens", [](const PyPlan& p) { return p.plan.tokens; })
      .def("__repr__", &plan_repr);

  py::class_<Codebook>(m, "Codebook", "A Huffman codebook with its low-bit count k (opaque; for kvcomp.ref).")
      .def_static("from_lengths", [](const std::vector<uint8_t>& lengths, int low_bits) {
        if (lengths.size() != size_t(kvcomp::format::kNumSymbols))
          fail("Codebook.from_lengths: expected " + std::to_string(kvcomp::format::kNumSymbols) + " code lengths");
        return Codebook::from_lengths(lengths.data(), low_bits);
      }, py::arg("lengths"), py::arg("low_bits") = 0,
         "256 code lengths of stream symbols and the low-bit count k (0..3).")
      .def_static("from_histogram", [](const std::vector<uint64_t>& counts, std::optional<int> low_bits) {
        const size_t one = size_t(kvcomp::format::kNumSymbols);
        const size_t all = size_t(kvcomp::format::kLowBitChoices) * one;
        if (counts.size() == one) return Codebook::from_histogram(counts.data(), low_bits.value_or(0));
        if (counts.size() == all) {
          if (low_bits)
            fail("Codebook.from_histogram: " + std::to_string(all) + " counts (one histogram per k) pick k "
                 "themselves; pass " + std::to_string(one) + " counts with low_bits");
          return Codebook::from_histograms(counts.data());
        }
        fail("Codebook.from_histogram: expected " + std::to_string(one) + " counts (one histogram, k = low_bits or 0) or " +
             std::to_string(all) + " (one per k = 0.." + std::to_string(kvcomp::format::kMaxLowBits) +
             ", k picked), got " + std::to_string(counts.size()));
      }, py::arg("counts"), py::arg("low_bits") = py::none(),
         "256 counts of stream symbols under k = low_bits (default 0), or 1024: the histograms under k = 0..3 "
         "(row k at 256 k), of which the k needing the fewest bits is picked.")
      .def_property_readonly("low_bits", &Codebook::low_bits)
      .def_property_readonly("lengths", [](const Codebook& c) {
        return std::vector<int>(c.lengths().begin(), c.lengths().end());
      });
}

void bind_cache(py::module_& m) {
  // Array checks happen with the GIL (they call into Python); device work without it.
  py::class_<PyCache>(m, "Cache", "The compressed KV cache (kvcomp::Cache). Streams are integers here; "
                                  "kvcomp.Cache resolves None and stream objects.")
      .def(py::init([](const Config& c) {
             py::gil_scoped_release nogil;
             return std::make_unique<PyCache>(c);
           }),
           py::arg("config"))
      .def_property_readonly("config", [](PyCache& self) { return self.cache.config(); })
      .def("add_sequence", [](PyCache& self) { return locked(self, [](Cache& c) { return c.add_sequence(); }); })
      .def("remove_sequence", [](PyCache& self, int seq, uintptr_t stream) {
             locked(self, [&](Cache& c) { c.remove_sequence(seq, as_stream(stream)); });
           },
           py::arg("seq"), py::arg("stream") = 0)
      .def("tokens", [](PyCache& self, int seq, int layer) {
             return locked(self, [&](Cache& c) { return c.tokens(seq, layer); });
           }, py::arg("seq"), py::arg("layer"))
      .def("append", [](PyCache& self, int layer, const std::vector<int>& seq_ids, const std::vector<int>& n_tokens,
                        py::handle k_obj, py::handle v_obj, uintptr_t stream) {
             if (seq_ids.size() != n_tokens.size())
               fail("append: " + std::to_string(seq_ids.size()) + " sequence ids but " +
                    std::to_string(n_tokens.size()) + " token counts");
             int64_t total = 0;
             for (int n : n_tokens) {
               if (n < 0) fail("append: negative token count " + std::to_string(n));
               total += n;
             }
             // The config is immutable after construction: read without the lock.
             const KvArrays in = parse_kv(self.cache.config(), k_obj, v_obj, total, "append",
                                          "[total_tokens, kv_heads, head_dim]", stream);
             locked(self, [&](Cache& c) {
               wait_for_producers({&in.k, &in.v}, as_stream(stream));
               c.append(layer, seq_ids, n_tokens, reinterpret_cast<const void*>(in.k.ptr),
                        reinterpret_cast<const void*>(in.v.ptr), as_stream(stream), in.token_stride, in.head_stride);
             });
           },
           py::arg("layer"), py::arg("seq_ids"), py::arg("n_tokens"), py::arg("k"), py::arg("v"), py::arg("stream") = 0)
      .def("attend", [](PyCache& self, int layer, const std::vector<int>& seq_ids, py::handle q_obj, py::handle out_obj,
                        uintptr_t stream, std::optional<std::vector<int>> n_queries) {
             // n_queries: multi-token queries (each sequence's last n tokens, causal); default one each.
             const std::vector<int> counts = n_queries ? *n_queries : std::vector<int>(seq_ids.size(), 1);
             int64_t rows = 0;
             for (int n : counts) rows += n;
             const QOutArrays a = parse_q_out(self.cache.config(), q_obj, out_obj, rows, "attend",
                                              n_queries ? "[sum(n_queries), q_heads, head_dim]"
                                                        : "[batch = len(seq_ids), q_heads, head_dim]",
                                              stream);
             locked(self, [&](Cache& c) {
               wait_for_producers({&a.q, &a.out}, as_stream(stream));
               c.attend(layer, seq_ids, counts, reinterpret_cast<const void*>(a.q.ptr),
                        reinterpret_cast<void*>(a.out.ptr), a.q.dtype, as_stream(stream));
             });
           },
           py::arg("layer"), py::arg("seq_ids"), py::arg("q"), py::arg("out"), py::arg("stream") = 0,
           py::arg("n_queries") = py::none())
      .def("fork", [](PyCache& self, int seq, uintptr_t stream) {
             return locked(self, [&](Cache& c) { return c.fork(seq, as_stream(stream)); });
           },
           py::arg("seq"), py::arg("stream") = 0)
      .def("rollback", [](PyCache& self, int seq, int n_tokens, uintptr_t stream) {
             locked(self, [&](Cache& c) { c.rollback(seq, n_tokens, as_stream(stream)); });
           },
           py::arg("seq"), py::arg("n_tokens"), py::arg("stream") = 0)
      .def("rollback_plan", [](PyCache& self, const PyPlan& plan, py::handle n_obj, uintptr_t stream) {
             const DecodePlan p = plan_of(self, plan, "rollback_plan");
             const ArrayView n = parse_array(n_obj, "n_rejected", dlpack_stream_arg(stream), true);
             check_shape(n, {p.batch}, "rollback_plan", "[plan.batch]");
             check_contiguous(n, "rollback_plan");
             check_device_memory(n);
             locked(self, [&](Cache& c) {
               wait_for_producers({&n}, as_stream(stream));
               c.rollback(p, reinterpret_cast<const int32_t*>(n.ptr), as_stream(stream));
             });
           },
           py::arg("plan"), py::arg("n_rejected"), py::arg("stream") = 0)
      .def("make_plan", [](PyCache& self, int batch, int tokens) {
             const DecodePlan p = locked(self, [&](Cache& c) { return c.make_plan(batch, tokens); });
             return PyPlan{p, self.serial};
           },
           py::arg("batch"), py::arg("tokens") = 1)
      .def("set_plan", [](PyCache& self, const PyPlan& plan, const std::vector<int>& seq_ids, uintptr_t stream) {
             const DecodePlan p = plan_of(self, plan, "set_plan");
             locked(self, [&](Cache& c) { c.set_plan(p, seq_ids, as_stream(stream)); });
           },
           py::arg("plan"), py::arg("seq_ids"), py::arg("stream") = 0)
      .def("append_plan", [](PyCache& self, const PyPlan& plan, int layer, py::handle k_obj, py::handle v_obj,
                             uintptr_t stream) {
             const DecodePlan p = plan_of(self, plan, "append_plan");
             const KvArrays in = parse_kv(self.cache.config(), k_obj, v_obj, int64_t(p.batch) * p.tokens, "append_plan",
                                          "[plan.batch * plan.tokens, kv_heads, head_dim]", stream);
             locked(self, [&](Cache& c) {
               wait_for_producers({&in.k, &in.v}, as_stream(stream));
               c.append(p, layer, reinterpret_cast<const void*>(in.k.ptr), reinterpret_cast<const void*>(in.v.ptr),
                        as_stream(stream), in.token_stride, in.head_stride);
             });
           },
           py::arg("plan"), py::arg("layer"), py::arg("k"), py::arg("v"), py::arg("stream") = 0)
      .def("attend_plan", [](PyCache& self, const PyPlan& plan, int layer, py::handle q_obj, py::handle out_obj,
                             uintptr_t stream) {
             const DecodePlan p = plan_of(self, plan, "attend_plan");
             const QOutArrays a = parse_q_out(self.cache.config(), q_obj, out_obj, int64_t(p.batch) * p.tokens,
                                              "attend_plan", "[plan.batch * plan.tokens, q_heads, head_dim]", stream);
             locked(self, [&](Cache& c) {
               wait_for_producers({&a.q, &a.out}, as_stream(stream));
               c.attend(p, layer, reinterpret_cast<const void*>(a.q.ptr), reinterpret_cast<void*>(a.out.ptr),
                        a.q.dtype, as_stream(stream));
             });
           },
           py::arg("plan"), py::arg("layer"), py::arg("q"), py::arg("out"), py::arg("stream") = 0)
      .def("check", [](PyCache& self, uintptr_t stream) {
             locked(self, [&](Cache& c) { c.check(as_stream(stream)); });
           },
           py::arg("stream") = 0)
      .def("stats", [](PyCache& self) { return locked(self, [](Cache& c) { return c.stats(); }); })
      .def("read_block", [](PyCache& self, int layer, int seq, int kv_head, int64_t block, Kind kind, uintptr_t stream) {
             const std::vector<uint8_t> b = locked(self, [&](Cache& c) {
               return c.read_block(layer, seq, kv_head, block, kind, as_stream(stream));
             });
             return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
           },
           py::arg("layer"), py::arg("seq"), py::arg("kv_head"), py::arg("block"), py::arg("kind"), py::arg("stream") = 0)
      .def("codebook", [](PyCache& self, int layer, int kv_head, Kind kind) {
             return locked(self, [&](Cache& c) { return c.codebook(layer, kv_head, kind); });
           },
           py::arg("layer"), py::arg("kv_head"), py::arg("kind"));
}

void bind_ref(py::module_& m) {
  py::module_ r = m.def_submodule("ref", "The CPU reference codec (include/kvcomp/reference.hpp).");
  r.def("decode_block", [](const py::buffer& data, Kind kind, int tokens, int head_dim, const Codebook& book) {
         if (tokens <= 0 || head_dim <= 0 || tokens > 4096 || head_dim > 4096)
           fail("decode_block: bad block shape " + std::to_string(tokens) + " x " + std::to_string(head_dim));
         const py::buffer_info info = data.request();
         if (info.ndim != 1 || info.itemsize != 1) fail("decode_block: data must be bytes");
         std::vector<float> out(size_t(tokens) * head_dim);
         const auto st = kvcomp::ref::decode_block(static_cast<const uint8_t*>(info.ptr), size_t(info.size), kind,
                                                   tokens, head_dim, book, out.data());
         if (st != kvcomp::ref::DecodeStatus::Ok) fail(std::string("decode_block: ") + kvcomp::ref::to_string(st));
         return float_bytes(out);
       },
       py::arg("data"), py::arg("kind"), py::arg("tokens"), py::arg("head_dim"), py::arg("codebook"),
       "Decodes one stored block; returns tokens x head_dim float32 values (row-major) as bytes.");
  r.def("encode_block", [](Kind kind, const py::buffer& x, int tokens, int head_dim, ErrorBound eb,
                           const Codebook& book, int codebook_id) {
         if (tokens <= 0 || head_dim <= 0 || tokens > 4096 || head_dim > 4096)
           fail("encode_block: bad block shape " + std::to_string(tokens) + " x " + std::to_string(head_dim));
         const std::vector<float> v = host_floats(x, "encode_block: x", size_t(tokens) * head_dim);
         const auto b = kvcomp::ref::encode_block(kind, v.data(), tokens, head_dim, eb, book, uint16_t(codebook_id));
         return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
       },
       py::arg("kind"), py::arg("x"), py::arg("tokens"), py::arg("head_dim"), py::arg("eb"), py::arg("codebook"),
       py::arg("codebook_id") = 0, "Encodes tokens x head_dim float32 values (bytes or array('f')) as one block.");
}

void bind_baselines(py::module_& m) {
  namespace bl = kvcomp::baseline;
  py::module_ b = m.def_submodule("baselines", "fp16 flash-decoding and the KIVI-style cache (src/baselines.hpp, src/kivi.hpp).");

  auto make_shape = [](int batch, int kv_heads, int q_heads, int head_dim, int tokens, int bits, int window) {
    bl::KiviShape s;
    s.batch = batch; s.kv_heads = kv_heads; s.q_heads = q_heads; s.head_dim = head_dim;
    s.tokens = tokens; s.bits = bits; s.window = window;
    return s;
  };

  py::class_<PyKivi>(b, "KiviCache", "One layer's KIVI-style cache of `batch` equal-length sequences.")
      .def(py::init([make_shape](int batch, int kv_heads, int q_heads, int head_dim, int tokens, int bits, int window) {
             const bl::KiviShape s = make_shape(batch, kv_heads, q_heads, head_dim, tokens, bits, window);
             py::gil_scoped_release nogil;
             return std::make_unique<PyKivi>(s);
           }),
           py::arg("batch"), py::arg("kv_heads"), py::arg("q_heads"), py::arg("head_dim"), py::arg("tokens"),
           py::arg("bits") = 4, py::arg("window") = 32)
      .def("build", [](PyKivi& self, py::handle k_obj, py::handle v_obj, uintptr_t stream) {
             const bl::KiviShape& s = self.cache.shape();
             const ArrayView k = parse_array(k_obj, "k", dlpack_stream_arg(stream));
             const ArrayView v = parse_array(v_obj, "v", dlpack_stream_arg(stream));
             for (const ArrayView* a : {&k, &v}) {
               check_dtype(*a, DType::F16, "KiviCache.build");
               check_shape(*a, {s.batch, s.kv_heads, s.tokens, s.head_dim}, "KiviCache.build",
                           "[batch, kv_heads, tokens, head_dim]");
               check_contiguous(*a, "KiviCache.build");
               if (a->numel()) check_device_memory(*a);
             }
             py::gil_scoped_release nogil;
             std::lock_guard<std::mutex> lock(self.mu);
             wait_for_producer(k, as_stream(stream));
             wait_for_producer(v, as_stream(stream));
             self.cache.build(reinterpret_cast<const __half*>(k.ptr), reinterpret_cast<const __half*>(v.ptr),
                              as_stream(stream));
             self.built = true;
           },
           py::arg("k"), py::arg("v"), py::arg("stream") = 0)
      .def("attend", [](PyKivi& self, py::handle q_obj, py::handle out_obj, uintptr_t stream) {
             const bl::KiviShape& s = self.cache.shape();
             const ArrayView q = parse_array(q_obj, "q", dlpack_stream_arg(stream));
             const ArrayView out = parse_array(out_obj, "out", dlpack_stream_arg(stream));
             for (const ArrayView* a : {&q, &out}) {
               check_dtype(*a, DType::F16, "KiviCache.attend");
               check_shape(*a, {s.batch, s.q_heads, s.head_dim}, "KiviCache.attend", "[batch, q_heads, head_dim]");
               check_contiguous(*a, "KiviCache.attend");
               check_device_memory(*a);
             }
             check_writable(out, "KiviCache.attend");
             py::gil_scoped_release nogil;
             std::lock_guard<std::mutex> lock(self.mu);
             if (!self.built) fail("KiviCache.attend: call build() first");
             wait_for_producer(q, as_stream(stream));
             wait_for_producer(out, as_stream(stream));
             self.cache.attend(reinterpret_cast<const __half*>(q.ptr), reinterpret_cast<__half*>(out.ptr),
                               self.workspace.ptr, self.sms, as_stream(stream));
           },
           py::arg("q"), py::arg("out"), py::arg("stream") = 0)
      .def("bytes", [](const PyKivi& self) { return self.cache.shape().bytes(); },
           "Bytes attention reads for the whole batch: codes, fp16 params, fp16 tail.")
      .def_property_readonly("batch", [](const PyKivi& self) { return self.cache.shape().batch; })
      .def_property_readonly("kv_heads", [](const PyKivi& self) { return self.cache.shape().kv_heads; })
      .def_property_readonly("q_heads", [](const PyKivi& self) { return self.cache.shape().q_heads; })
      .def_property_readonly("head_dim", [](const PyKivi& self) { return self.cache.shape().head_dim; })
      .def_property_readonly("tokens", [](const PyKivi& self) { return self.cache.shape().tokens; })
      .def_property_readonly("bits", [](const PyKivi& self) { return self.cache.shape().bits; })
      .def_property_readonly("window", [](const PyKivi& self) { return self.cache.shape().window; });

  b.def("kivi_reference", [make_shape](int batch, int kv_heads, int q_heads, int head_dim, int tokens, int bits,
                                       int window, const py::buffer& k, const py::buffer& v) {
         if (batch <= 0 || kv_heads <= 0 || head_dim <= 0 || tokens < 0) fail("KIVI baseline: bad shape");
         const bl::KiviShape s = make_shape(batch, kv_heads, q_heads, head_dim, tokens, bits, window);
         const size_t n = size_t(batch) * kv_heads * tokens * head_dim;
         const std::vector<float> kf = host_floats(k, "kivi_reference: k", n);
         const std::vector<float> vf = host_floats(v, "kivi_reference: v", n);
         std::vector<float> ko(n), vo(n);
         bl::kivi_reference(s, kf.data(), vf.data(), ko.data(), vo.data());
         return py::make_tuple(float_bytes(ko), float_bytes(vo));
       },
       py::arg("batch"), py::arg("kv_heads"), py::arg("q_heads"), py::arg("head_dim"), py::arg("tokens"),
       py::arg("bits"), py::arg("window"), py::arg("k"), py::arg("v"),
       "K and V as the KIVI cache reconstructs them: float32 bytes, [batch][kv_heads][tokens][head_dim], "
       "from fp16-valued float32 inputs (bytes or array('f')) of that layout.");

  b.def("flash_decode_fp16", [](py::handle k_obj, py::handle v_obj, py::handle q_obj, py::handle out_obj,
                                uintptr_t stream) {
         const char* what = "flash_decode_fp16";
         const ArrayView k = parse_array(k_obj, "k", dlpack_stream_arg(stream));
         const ArrayView v = parse_array(v_obj, "v", dlpack_stream_arg(stream));
         const ArrayView q = parse_array(q_obj, "q", dlpack_stream_arg(stream));
         const ArrayView out = parse_array(out_obj, "out", dlpack_stream_arg(stream));
         if (k.ndim() != 4) fail(std::string(what) + ": k must be [batch, kv_heads, tokens, head_dim], got " + shape_str(k.shape));
         const int64_t B = k.shape[0], H = k.shape[1], T = k.shape[2], D = k.shape[3];
         for (const ArrayView* a : {&k, &v}) {
           check_dtype(*a, DType::F16, what);
           check_shape(*a, k.shape, what, "[batch, kv_heads, tokens, head_dim]");
           // Tokens of one head are contiguous; sequences and heads may be strided.
           if ((D > 1 && a->strides[3] != 1) || (T > 1 && a->strides[2] != D))
             fail(std::string(what) + ": " + a->name + " must hold each head's tokens contiguously, got strides " +
                  shape_str(a->strides));
         }
         if ((B > 1 && k.strides[0] != v.strides[0]) || (H > 1 && k.strides[1] != v.strides[1]))
           fail(std::string(what) + ": k and v must have the same strides, got " + shape_str(k.strides) + " and " +
                shape_str(v.strides));
         if (B < 1 || H < 1 || T < 1 || D < 1)
           fail(std::string(what) + ": k must not be empty, got " + shape_str(k.shape));
         if (q.ndim() != 3 || q.shape[0] != B || q.shape[2] != D || q.shape[1] % std::max<int64_t>(H, 1) != 0)
           fail(std::string(what) + ": q must be [batch, q_heads, head_dim] with batch " + std::to_string(B) +
                ", head_dim " + std::to_string(D) + " and q_heads a multiple of kv_heads " + std::to_string(H) +
                ", got " + shape_str(q.shape));
         for (const ArrayView* a : {&q, &out}) {
           check_dtype(*a, DType::F16, what);
           check_shape(*a, q.shape, what, "[batch, q_heads, head_dim]");
           check_contiguous(*a, what);
         }
         check_writable(out, what);
         for (const ArrayView* a : {&k, &v, &q, &out}) check_device_memory(*a);
         bl::Fp16Attention att{reinterpret_cast<const __half*>(k.ptr), reinterpret_cast<const __half*>(v.ptr),
                               int(B), int(H), int(q.shape[1]), int(D), int(T),
                               B > 1 ? k.strides[0] : -1, H > 1 ? k.strides[1] : -1};
         py::gil_scoped_release nogil;
         FlashWorkspaces& ws = flash_workspaces();
         std::lock_guard<std::mutex> lock(ws.mu);
         const int sms = current_sms();
         kvcomp::detail::DeviceBuffer<float>& buf = ws.by_stream[{current_device(), stream}];
         buf.reserve(bl::flash_workspace_floats(att, sms), "the flash-decoding workspace");
         for (const ArrayView* a : {&k, &v, &q, &out}) wait_for_producer(*a, as_stream(stream));
         bl::flash_decode_fp16(att, reinterpret_cast<const __half*>(q.ptr), reinterpret_cast<__half*>(out.ptr),
                               buf.ptr, sms, as_stream(stream));
       },
       py::arg("k"), py::arg("v"), py::arg("q"), py::arg("out"), py::arg("stream") = 0,
       "Fused fp16 flash-decoding over K, V [batch][kv_heads][tokens][head_dim] (each head's tokens contiguous).");
}

}  // namespace

PYBIND11_MODULE(_kvcomp, m) {
  m.doc() = "kvcomp C++ bindings; use the kvcomp package.";
  m.attr("__version__") = KVCOMP_VERSION;
  // Carries exactly the C++ message (what()).
  py::register_exception<Error>(m, "Error", PyExc_RuntimeError);

  bind_types(m);
  bind_cache(m);
  bind_ref(m);
  bind_baselines(m);

  m.def("_array_info", [](py::handle obj, const std::string& name, bool writable) {
         const ArrayView a = parse_array(obj, name, py::none());
         if (writable) check_writable(a, "_array_info");
         py::tuple shape(a.shape.size()), strides(a.strides.size());
         for (size_t i = 0; i < a.shape.size(); ++i) {
           shape[i] = py::int_(a.shape[i]);
           strides[i] = py::int_(a.strides[i]);
         }
         return py::make_tuple(py::int_(a.ptr), shape, strides, kvcomp::dtype_name(a.dtype));
       },
       py::arg("obj"), py::arg("name") = "array", py::arg("writable") = false,
       "How kvcomp reads an array: (pointer, shape, strides in elements, dtype name). Touches no memory.");
  m.def("_cuda_device_count", [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      n = 0;
    }
    return n;
  });
}
