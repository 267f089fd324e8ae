#include "kivi.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/kivi_attention.cuh"
#include "kvcomp/error.hpp"
#include "launch.hpp"
#include "merge_launch.hpp"

namespace kvcomp {
namespace baseline {
namespace {

void check_shape(const KiviShape& s) {
  if (s.bits != 2 && s.bits != 4) throw Error("KIVI baseline: bits must be 2 or 4, got " + std::to_string(s.bits));
  if (s.head_dim != 64 && s.head_dim != 128) throw Error("KIVI baseline: head_dim must be 64 or 128");
  if (s.batch <= 0 || s.kv_heads <= 0 || s.tokens < 0 || s.window < 0 || s.q_heads % s.kv_heads != 0)
    throw Error("KIVI baseline: bad shape");
  const int G = s.q_heads / s.kv_heads;
  if (G < 1 || G > 8) throw Error("KIVI baseline: q_heads / kv_heads must be 1..8");
}

/// f(D, BITS) as integral constants (G is a kernel argument: one kernel pads the rows to 8).
template <typename F>
void dispatch(const KiviShape& s, F&& f) {
  auto with_bits = [&](auto d) {
    if (s.bits == 2) return f(d, std::integral_constant<int, 2>{});
    return f(d, std::integral_constant<int, 4>{});
  };
  if (s.head_dim == 64) return with_bits(std::integral_constant<int, 64>{});
  return with_bits(std::integral_constant<int, 128>{});
}

template <typename T>
T* device_alloc(size_t n, const char* what) {
  void* p = nullptr;
  if (n == 0) n = 1;
  if (cudaMalloc(&p, n * sizeof(T)) != cudaSuccess) {
    cudaGetLastError();
    throw Error(std::string("KIVI baseline: cudaMalloc failed for ") + what);
  }
  return static_cast<T*>(p);
}

/// CTAs of the attention kernel resident on one SM of the current device; sets the kernel's carveout
/// to shared memory over L1 (the records bypass L1: 4 CTAs need 4 x ~40 KB of it).
template <int D, int BITS>
int kivi_ctas_per_sm() {
  constexpr auto kernel = detail::kivi_attention_kernel<D, BITS>;
  detail::check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                          int(cudaSharedmemCarveoutMaxShared)),
                     "KIVI attention carveout");
  int blocks = 0;
  detail::check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, 32 * detail::kAttnWarps,
                                                                   detail::KiviSmem<D, BITS>::kBytes),
                     "KIVI attention occupancy");
  return blocks > 0 ? blocks : 1;
}

/// Splits of each sequence's units (the tail's, then the chunks): the fused
/// kernel's plan (detail::plan_splits: waves x (units per warp + a CTA's fixed
/// cost), so that the grid fills the resident CTA slots instead of leaving a
/// short last wave; at least one unit per warp).
detail::SplitPlan kivi_plan(const KiviShape& s, int sms, int per_sm) {
  const int units = s.chunks() + (s.tail() + 31) / 32;
  return detail::plan_splits(units, s.batch, s.kv_heads, sms, per_sm);
}

}  // namespace

size_t KiviShape::bytes() const {
  const size_t seqs = size_t(batch) * kv_heads, values = size_t(chunks()) * 32 * head_dim;
  const size_t codes = values * bits / 8, params = values / 32 * 4;  // half2 per group of 32
  return seqs * 2 * (codes + params + size_t(tail()) * head_dim * 2);
}

size_t KiviCache::record_words() const {
  return size_t(2) * shape_.head_dim * (shape_.bits + 1);  // KiviLayout::kWords
}
size_t KiviCache::records() const { return size_t(shape_.batch) * shape_.kv_heads * shape_.chunks(); }

KiviCache::KiviCache(const KiviShape& shape) : shape_(shape) {
  check_shape(shape);
  dispatch(shape, [&](auto d, auto bits) {
    static_assert(detail::KiviLayout<d.value, bits.value>::kWords == 2 * d.value * (bits.value + 1), "record_words");
  });
  const size_t tail = size_t(shape.batch) * shape.kv_heads * shape.tail_cap() * shape.head_dim;
  try {
    p_.records = device_alloc<uint32_t>(records() * record_words(), "K/V records");
    p_.scale_max = device_alloc<float>(2, "scale maxima");
    p_.k_tail = device_alloc<__half>(tail, "K tail");
    p_.v_tail = device_alloc<__half>(tail, "V tail");
    // The smaller of the 2- and 4-bit kernels' occupancy: a workspace sized for one bit width serves
    // the other (bench_attention shares one between its KIVI-4 and KIVI-2 caches).
    ctas_per_sm_ = shape.head_dim == 64 ? std::min(kivi_ctas_per_sm<64, 2>(), kivi_ctas_per_sm<64, 4>())
                                        : std::min(kivi_ctas_per_sm<128, 2>(), kivi_ctas_per_sm<128, 4>());
  } catch (...) {
    release();
    throw;
  }
  p_.kv_heads = shape.kv_heads;
  p_.chunks = shape.chunks();
  p_.tail = shape.tail();
  p_.tail_cap = shape.tail_cap();
}

KiviCache::~KiviCache() { release(); }

void KiviCache::release() {
  cudaFree(p_.records); cudaFree(p_.scale_max); cudaFree(p_.k_tail); cudaFree(p_.v_tail);
  p_ = {};
}

void KiviCache::build(const __half* k, const __half* v, cudaStream_t s) {
  const KiviShape& sh = shape_;
  detail::check_cuda(cudaMemsetAsync(p_.scale_max, 0, 2 * sizeof(float), s), "KIVI scale maxima reset");
  if (sh.chunks() > 0) {
    dispatch(sh, [&](auto d, auto bits) {
      detail::kivi_quantize_kernel<d.value, bits.value>
          <<<dim3(sh.chunks(), sh.kv_heads, sh.batch), 32, 0, s>>>(k, v, sh.tokens, p_);
    });
    detail::check_cuda(cudaGetLastError(), "KIVI quantize launch");
  }
  // The fp16 tail: a strided 2D copy per array (rows = batch x heads).
  const size_t row = size_t(sh.tail()) * sh.head_dim * sizeof(__half);
  if (row == 0) return;
  const size_t off = size_t(sh.chunks()) * 32 * sh.head_dim;
  const int rows = sh.batch * sh.kv_heads;
  const size_t src_pitch = size_t(sh.tokens) * sh.head_dim * sizeof(__half);
  const size_t dst_pitch = size_t(sh.tail_cap()) * sh.head_dim * sizeof(__half);
  detail::check_cuda(cudaMemcpy2DAsync(p_.k_tail, dst_pitch, k + off, src_pitch, row, rows, cudaMemcpyDeviceToDevice, s),
                     "KIVI K tail copy");
  detail::check_cuda(cudaMemcpy2DAsync(p_.v_tail, dst_pitch, v + off, src_pitch, row, rows, cudaMemcpyDeviceToDevice, s),
                     "KIVI V tail copy");
}

size_t KiviCache::workspace_floats(int sms) const {
  return size_t(shape_.batch) * shape_.q_heads * kivi_plan(shape_, sms, ctas_per_sm_).splits * (shape_.head_dim + 2);
}

void KiviCache::attend(const __half* q, __half* out, float* workspace, int sms, cudaStream_t s) const {
  const KiviShape& sh = shape_;
  const auto plan = kivi_plan(sh, sms, ctas_per_sm_);
  const float scale_log2 = float(1.4426950408889634 / std::sqrt(double(sh.head_dim)));
  const int G = sh.q_heads / sh.kv_heads;
  dispatch(sh, [&](auto d, auto bits) {
    constexpr int D = d.value, BITS = bits.value;
    constexpr size_t smem = detail::KiviSmem<D, BITS>::kBytes;
    detail::kivi_attention_kernel<D, BITS><<<dim3(plan.splits, sh.kv_heads, sh.batch), 32 * detail::kAttnWarps, smem, s>>>(
        p_, q, workspace, G, plan.units_per_split, plan.splits, scale_log2);
    detail::check_cuda(cudaGetLastError(), "KIVI attention launch");
    detail::launch_merge<__half, D>(workspace, plan.splits, out, false, sh.batch * sh.q_heads, s, "KIVI merge launch");
  });
}

void kivi_reference(const KiviShape& s, const float* k, const float* v, float* k_out, float* v_out) {
  check_shape(s);
  const int D = s.head_dim, N = s.tokens;
  const float max_code = float((1 << s.bits) - 1);
  for (size_t seq = 0; seq < size_t(s.batch) * s.kv_heads; ++seq) {
    const float* K = k + seq * N * D;
    const float* V = v + seq * N * D;
    float* Ko = k_out + seq * N * D;
    float* Vo = v_out + seq * N * D;
    for (int c = 0; c < s.chunks(); ++c) {
      for (int ch = 0; ch < D; ++ch) {  // K: per channel over the chunk's 32 tokens
        float lo = INFINITY, hi = -INFINITY;
        for (int t = 0; t < 32; ++t) { lo = std::fmin(lo, K[size_t(c * 32 + t) * D + ch]); hi = std::fmax(hi, K[size_t(c * 32 + t) * D + ch]); }
        __half2 stored;
        const auto g = detail::KiviGroup::make(lo, hi, max_code, stored);
        for (int t = 0; t < 32; ++t) {
          const size_t i = size_t(c * 32 + t) * D + ch;
          Ko[i] = std::fma(float(g.code(K[i], max_code)), g.scale, g.zero);
        }
      }
      for (int t = c * 32; t < c * 32 + 32; ++t) {  // V: per token over 32-channel groups
        for (int g0 = 0; g0 < D; g0 += 32) {
          float lo = INFINITY, hi = -INFINITY;
          for (int ch = g0; ch < g0 + 32; ++ch) { lo = std::fmin(lo, V[size_t(t) * D + ch]); hi = std::fmax(hi, V[size_t(t) * D + ch]); }
          __half2 stored;
          const auto g = detail::KiviGroup::make(lo, hi, max_code, stored);
          for (int ch = g0; ch < g0 + 32; ++ch) {
            const size_t i = size_t(t) * D + ch;
            Vo[i] = std::fma(float(g.code(V[i], max_code)), g.scale, g.zero);
          }
        }
      }
    }
    for (size_t i = size_t(s.chunks()) * 32 * D; i < size_t(N) * D; ++i) { Ko[i] = K[i]; Vo[i] = V[i]; }
  }
}

}  // namespace baseline
}  // namespace kvcomp
