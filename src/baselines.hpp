// Baselines that kvcomp is measured against (tests check them against the
// same CPU reference; bench/ times them on the same data).
#pragma once

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace kvcomp {
namespace baseline {

/// Uncompressed fp16 cache of `batch` equal-length sequences: by default
/// K, V [batch][kv_heads][tokens][head_dim]; q, out [batch][q_heads][head_dim].
/// seq_stride / head_stride (elements, -1 = that default) let a cache keep
/// spare capacity per head, or let every query of a batch read one sequence
/// (seq_stride 0).
struct Fp16Attention {
  const __half* k;
  const __half* v;
  int batch, kv_heads, q_heads, head_dim, tokens;
  int64_t seq_stride = -1;
  int64_t head_stride = -1;
};

/// Workspace floats flash_decode_fp16 needs.
size_t flash_workspace_floats(const Fp16Attention& a, int sms);
/// Our fused fp16 flash-decoding kernel (split along the sequence + merge).
void flash_decode_fp16(const Fp16Attention& a, const __half* q, __half* out, float* workspace, int sms,
                       cudaStream_t s);

/// Workspace bytes cublas_attention needs (scores fp32 + probabilities fp16).
size_t cublas_workspace_bytes(const Fp16Attention& a);
/// cuBLAS attention as the KVComp paper measures it: batched GEMM for the
/// scores, a softmax kernel, batched GEMM for P.V (default layout only).
void cublas_attention(cublasHandle_t h, const Fp16Attention& a, const __half* q, __half* out, void* workspace,
                      cudaStream_t s);

}  // namespace baseline
}  // namespace kvcomp
