#include "baselines.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/flash_decode_fp16.cuh"
#include "kvcomp/error.hpp"
#include "launch.hpp"
#include "merge_launch.hpp"
#include "smem_opt_in.hpp"

namespace kvcomp {
namespace baseline {
namespace {

/// Split of the flash kernel, in kFlashTile-token tiles, at least one per warp of a CTA. The kernel is
/// memory-bound and a CTA keeps ~96 KB in flight, far more than its share of the bandwidth needs, so
/// equal CTAs that are all resident at once stream at equal rates and finish together (no wave tail):
/// when the (sequence, KV head) pairs fit the resident CTA slots (kFlashCtasPerSm per SM), each is cut
/// into as many equal splits as one wave holds. With more pairs than slots, there are waves anyway:
/// CTAs of at most kFlashMaxTiles tiles (2 MB at D = 128) bound what runs alone at the end.
detail::SplitPlan flash_plan(const Fp16Attention& a, int sms) {
  constexpr long long kFlashMaxTiles = 256;
  const long long tiles = (std::max(a.tokens, 0) + detail::kFlashTile - 1) / detail::kFlashTile;
  const long long heads = std::max(1LL * a.batch * a.kv_heads, 1LL);
  const long long slots = 1LL * std::max(sms, 1) * detail::kFlashCtasPerSm;
  long long splits = heads <= slots ? slots / heads : (tiles + kFlashMaxTiles - 1) / kFlashMaxTiles;
  splits = std::max(splits, 1LL);
  const long long per = std::max<long long>(detail::kFlashWarps, (tiles + splits - 1) / splits);
  splits = std::max((tiles + per - 1) / per, 1LL);
  return {int(per), int(splits)};
}

void check_cublas(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS) throw Error(std::string(what) + ": cuBLAS status " + std::to_string(int(st)));
}

}  // namespace

size_t flash_workspace_floats(const Fp16Attention& a, int sms) {
  return size_t(a.batch) * a.q_heads * flash_plan(a, sms).splits * (a.head_dim + 2);
}

void flash_decode_fp16(const Fp16Attention& a, const __half* q, __half* out, float* workspace, int sms,
                       cudaStream_t s) {
  const auto plan = flash_plan(a, sms);
  const int64_t head_stride = a.head_stride >= 0 ? a.head_stride : int64_t(a.tokens) * a.head_dim;
  const int64_t seq_stride = a.seq_stride >= 0 ? a.seq_stride : head_stride * a.kv_heads;
  // The kernel reads rows in 16-byte pieces (cp.async, 128-bit loads): a misaligned address would fault.
  if (reinterpret_cast<uintptr_t>(a.k) % 16 || reinterpret_cast<uintptr_t>(a.v) % 16 || head_stride % 8 ||
      seq_stride % 8)
    throw Error("flash_decode_fp16: K and V must be 16-byte aligned with sequence and head strides that are "
                "multiples of 8 elements");
  detail::FlashParams p{a.k, a.v, q, out, workspace, a.tokens, a.kv_heads, plan.units_per_split, plan.splits,
                        float(1.4426950408889634 / std::sqrt(double(a.head_dim))), seq_stride, head_stride};
  const int G = a.q_heads / a.kv_heads;
  const dim3 grid(plan.splits, a.kv_heads, a.batch);
  auto go = [&](auto d, auto g) {
    constexpr auto kernel = detail::flash_decode_fp16_kernel<d.value, g.value>;
    constexpr int kBytes = detail::FlashSmem<d.value>::kBytes;
    detail::opt_in_dynamic_smem<kernel>(kBytes, "flash decode shared-memory opt-in");
    kernel<<<grid, 32 * detail::kFlashWarps, kBytes, s>>>(p);
    detail::check_cuda(cudaGetLastError(), "flash decode launch");
    if (plan.splits == 1) return;  // the kernel wrote the output
    detail::launch_merge<__half, d.value>(workspace, plan.splits, out, false, a.batch * a.q_heads, s,
                                          "flash merge launch");
  };
  using I64 = std::integral_constant<int, 64>;
  using I128 = std::integral_constant<int, 128>;
  auto with_g = [&](auto d) {
    switch (G) {
      case 1: return go(d, std::integral_constant<int, 1>{});
      case 4: return go(d, std::integral_constant<int, 4>{});
      case 8: return go(d, std::integral_constant<int, 8>{});
    }
    throw Error("flash baseline: G must be 1, 4 or 8");
  };
  if (a.head_dim == 64) return with_g(I64{});
  if (a.head_dim == 128) return with_g(I128{});
  throw Error("flash baseline: head_dim must be 64 or 128");
}

size_t cublas_workspace_bytes(const Fp16Attention& a) {
  const size_t rows = size_t(a.batch) * a.q_heads;
  return rows * a.tokens * (sizeof(float) + sizeof(__half));
}

void cublas_attention(cublasHandle_t h, const Fp16Attention& a, const __half* q, __half* out, void* workspace,
                      cudaStream_t s) {
  const int G = a.q_heads / a.kv_heads, D = a.head_dim, N = a.tokens;
  if ((a.head_stride >= 0 && a.head_stride != int64_t(N) * D) ||
      (a.seq_stride >= 0 && a.seq_stride != int64_t(N) * D * a.kv_heads))
    throw Error("cuBLAS baseline: needs the default [batch][kv_heads][tokens][head_dim] layout");
  const int batches = a.batch * a.kv_heads;
  float* scores = static_cast<float*>(workspace);
  __half* probs = reinterpret_cast<__half*>(scores + size_t(a.batch) * a.q_heads * N);
  check_cublas(cublasSetStream(h, s), "cublasSetStream");
  const float scale = float(1.0 / std::sqrt(double(D))), one = 1.f, zero = 0.f;
  // Column-major view: scores^T [N x G] = K [N x D] (row-major = col-major D x N, transposed) * q^T [D x G].
  check_cublas(cublasGemmStridedBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, G, D, &scale, a.k, CUDA_R_16F, D,
                                          size_t(N) * D, q, CUDA_R_16F, D, size_t(G) * D, &zero, scores, CUDA_R_32F, N,
                                          size_t(G) * N, batches, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "scores GEMM");
  detail::softmax_rows_kernel<<<a.batch * a.q_heads, 256, 0, s>>>(scores, probs, N);
  detail::check_cuda(cudaGetLastError(), "softmax launch");
  // out^T [D x G] = V^T [D x N] * P^T [N x G].
  check_cublas(cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, D, G, N, &one, a.v, CUDA_R_16F, D,
                                          size_t(N) * D, probs, CUDA_R_16F, N, size_t(G) * N, &zero, out, CUDA_R_16F,
                                          D, size_t(G) * D, batches, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "P.V GEMM");
}

}  // namespace baseline
}  // namespace kvcomp
