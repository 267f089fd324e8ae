// Tensor-core and asynchronous-copy primitives shared by the decode-attention
// kernels (kvcomp's fused kernel, the KIVI kernel, the fp16 flash baseline).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace kvcomp {
namespace detail {

/// d += A B (mma.m16n8k16, fp16 operands, fp32 accumulation). Fragments as in
/// the PTX ISA (lane = 4 r + q): A regs a0 = (row r, cols 2q, 2q+1), a1 = (row
/// r + 8, same cols), a2 = (row r, cols 2q + 8, + 9), a3 = (row r + 8, cols
/// + 8); B regs b0 = (rows 2q, 2q + 1, col r), b1 = (rows 2q + 8, + 9, col r);
/// C/D d0, d1 = (row r, cols 2q, 2q + 1), d2, d3 = (row r + 8, same cols).
/// Low half of a register = the lower column (A) or row (B).
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
/// The same with A as one uint4 {a0, a1, a2, a3}.
__device__ __forceinline__ void mma_16816(float (&d)[4], uint4 a, uint32_t b0, uint32_t b1) {
  mma_16816(d, a.x, a.y, a.z, a.w, b0, b1);
}

/// The same with bf16 operands.
__device__ __forceinline__ void mma_16816_bf16(float (&d)[4], uint4 a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

/// The fragment of an 8x8 matrix of 16-bit elements (lane 4 r + q holds row
/// r, columns 2q, 2q + 1) turned into its transpose's (movmatrix): rows of
/// memory become the columns an mma operand wants.
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

/// Two floats as an fp16x2 register (round to nearest; `lo` in the low half).
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

/// Two floats as a bf16x2 register (round to nearest; `lo` in the low half).
__device__ __forceinline__ uint32_t pack_bf162(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

/// 16-byte asynchronous copy global -> shared (shared-window address), through L2 only.
__device__ __forceinline__ void cp_async16(uint32_t smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_dst), "l"(gmem_src) : "memory");
}
/// The same with src_bytes of it read (0: 16 zero bytes written, nothing read), 128-byte L2 fetches.
__device__ __forceinline__ void cp_async16_zfill(uint32_t smem_dst, const void* gmem_src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}
/// 8-byte asynchronous copy global -> shared (shared-window address); 8-byte copies go through L1 (.ca).
__device__ __forceinline__ void cp_async8(uint32_t smem_dst, const void* gmem_src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/// Waits until at most N of this thread's committed groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace detail
}  // namespace kvcomp
