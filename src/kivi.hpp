// Baseline: KIVI-style fixed-width (2- or 4-bit) quantized KV cache with a
// fused decode-attention kernel (kernels/kivi_attention.cuh describes the
// quantizer and layout), plus its CPU reference for tests and the quality
// harness.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/kivi_params.cuh"

namespace kvcomp {
namespace baseline {

/// `batch` equal-length sequences; the last `window` + (0..31) tokens stay fp16.
struct KiviShape {
  int batch = 1, kv_heads = 8, q_heads = 32, head_dim = 128, tokens = 0;
  int bits = 4;      // 2 or 4
  int window = 32;   // full-precision recent tokens (at least)
  int chunks() const { return tokens > window ? (tokens - window) / 32 : 0; }
  int tail() const { return tokens - 32 * chunks(); }
  int tail_cap() const { return window + 31; }
  /// Bytes attention reads for the whole batch: codes, fp16 params, fp16 tail.
  size_t bytes() const;
};

/// Device storage of one layer's KIVI cache.
class KiviCache {
 public:
  explicit KiviCache(const KiviShape& shape);  // throws kvcomp::Error on bad shapes or allocation failure
  ~KiviCache();
  KiviCache(const KiviCache&) = delete;
  KiviCache& operator=(const KiviCache&) = delete;

  /// Quantizes fp16 K, V [batch][kv_heads][tokens][head_dim] (device).
  void build(const __half* k, const __half* v, cudaStream_t s);
  size_t workspace_floats(int sms) const;
  /// out [batch][q_heads][head_dim] = attention of q over the cache.
  void attend(const __half* q, __half* out, float* workspace, int sms, cudaStream_t s) const;

  const KiviShape& shape() const { return shape_; }
  const detail::KiviParams& params() const { return p_; }
  size_t record_words() const;  // uint32 words of one chunk's record (codes and params of K and V)
  size_t records() const;       // chunk records: batch x kv_heads x chunks

 private:
  void release();
  KiviShape shape_;
  detail::KiviParams p_{};
  int ctas_per_sm_ = 1;  // resident attention CTAs an SM (the smaller of the 2- and 4-bit kernels')
};

/// CPU reference: K and V as the KIVI cache reconstructs them (fp32,
/// [batch][kv_heads][tokens][head_dim]) from fp16-valued inputs of that layout.
void kivi_reference(const KiviShape& s, const float* k, const float* v, float* k_out, float* v_out);

}  // namespace baseline
}  // namespace kvcomp
