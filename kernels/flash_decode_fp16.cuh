// Baseline: fused fp16 flash-decoding over an uncompressed cache (split along
// the sequence, GQA sharing, merge by merge_kernel), as fast as we can make
// it, so that kvcomp is compared against the best. Layout: K, V
// [batch][kv_heads][N][D] by default (strides in FlashParams).
//
// It is memory-bound (G flops per byte of K/V), so the design is about the
// stream: every byte is read once, by 16-byte cp.async (coalesced: a warp's
// instruction covers 512 contiguous bytes) into a ring of shared-memory stages
// that each warp owns (no CTA barrier in the loop), 16-24 KB in flight per
// warp, 8 warps per SM. The math runs on tensor cores (mma.m16n8k16, fp16
// operands, fp32 accumulation) so that it hides behind the loads:
//   tile = 16 tokens of K and V (one stage; rows swizzled by 16-byte piece,
//   piece ^ (row & 7), so that ldmatrix reads are free of bank conflicts);
//   S[h][t] = q K^T: A = q (rows 0..G-1 = the query heads, fp16 as given: the
//     products are exact, the scale is applied in fp32), B = K straight from
//     shared memory by ldmatrix (a K row is a column of K^T);
//   online softmax on the C fragments (a quad of lanes holds one head's 16
//     scores: no shared memory);
//   O[h][c] += P V: A = P scaled by 2^14 (so small p stay normal) as fp16 hi
//     in rows 0..7 and its rounding rest in rows 8..15 (fp32-like precision
//     for free: G <= 8 leaves those rows), built from the score fragments in
//     registers; B = V by ldmatrix.trans. O of head h = row h + row h + 8.
// Each CTA (4 warps, a range of tiles of one sequence and KV head; warp w
// takes tiles w, w + 4, ...) merges its warps in shared memory and writes its
// partial; merge_kernel combines the splits (or, with one split, the CTA
// writes the output itself).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "decode_common.cuh"
#include "mma_ops.cuh"

namespace kvcomp {
namespace detail {

struct FlashParams {
  const __half* k;
  const __half* v;
  const __half* q;   // [batch][q_heads][D]
  __half* out;
  float* part;       // [batch][q_heads][splits][D + 2]
  int32_t tokens;    // N, the same for every sequence
  int32_t kv_heads;
  int32_t tiles_per_split;  // kFlashTile-token tiles per CTA
  int32_t splits;
  float scale_log2;
  int64_t seq_stride;   // elements between sequences (0: all share one)
  int64_t head_stride;  // elements between kv heads
};

constexpr int kFlashWarps = 4;
constexpr int kFlashTile = 16;       // tokens of a stage (K and V rows)
constexpr int kFlashCtasPerSm = 2;   // what the shared memory allows (the split plan assumes it)
constexpr float kFlashPScale = 16384.f;  // p x 2^14 <= 16384 as the fp16 A operand

/// Shared memory of the kernel: per warp a ring of kStages stages, each the K
/// rows then the V rows of one tile ([16][D] fp16 each, swizzled). ~24 KB a
/// warp (3 stages at D = 128, 6 at D = 64), 96 KB a CTA: 2 CTAs per SM.
template <int D>
struct FlashSmem {
  static constexpr int kRowBytes = 2 * D;
  static constexpr int kTileBytes = kFlashTile * kRowBytes;  // K (or V) rows of a tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kStages = 3 * 128 / D;
  static constexpr int kWarpBytes = kStages * kStageBytes;
  static constexpr int kBytes = kFlashWarps * kWarpBytes;
  static_assert(kFlashCtasPerSm * (kBytes + 1024) <= 228 * 1024, "2 CTAs fit an SM (H100: 228 KB)");
  static_assert(8 * (D + 2) * 4 <= kWarpBytes, "a warp's partial [G][D + 2] fits its ring");
};

/// Four 8x8 fp16 matrices from shared memory; lane l gives the address of row
/// l % 8 of matrix l / 8 (16 bytes). Matrix i lands in r[i]: lane l holds its
/// row l / 4, columns 2 (l % 4) and + 1 (low half first); .trans: column
/// l / 4, rows 2 (l % 4) and + 1. volatile: the ring's addresses repeat, the
/// data does not.
__device__ __forceinline__ void ldmatrix_x4(unsigned addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
/// grid (splits, kv_heads, batch), 32 kFlashWarps threads, FlashSmem<D>::kBytes of dynamic shared memory.
template <int D, int G>
__global__ void __launch_bounds__(32 * kFlashWarps, kFlashCtasPerSm)
    flash_decode_fp16_kernel(const __grid_constant__ FlashParams p) {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static_assert(G >= 1 && G <= 8, "the query heads of a KV head fit the mma's 8 hi rows");
  using Smem = FlashSmem<D>;
  constexpr int kS = Smem::kStages;
  constexpr int kK16 = D / 16;    // k16 steps of q.K^T; pairs of 8-channel n-tiles of P.V
  constexpr int kPieces = D / 8;  // 16-byte pieces of a row
  extern __shared__ __align__(128) unsigned char flash_smem[];
  allow_dependent_launch();  // the merge (if any) is a dependent launch, as kvcomp's
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = lane / 4, quad = lane % 4;  // mma fragment row (a query head) and column pair
  const int split = blockIdx.x, head = blockIdx.y, b = blockIdx.z;
  const int q_heads = p.kv_heads * G;
  const size_t q_row0 = size_t(b) * q_heads + size_t(head) * G;  // this KV head's first query head

  // q.K^T's A operand, k16 step ks: qa[ks][0] = q[row][16 ks + 2 quad + {0,1}] (a0a1), qa[ks][1] = the same
  // + 8 channels (a4a5); rows 8..15 (a2a3, a6a7) and rows >= G are zero. q as given (fp16).
  uint32_t qa[kK16][2];
  {
    const __half* qr = p.q + (q_row0 + (row < G ? row : 0)) * D + 2 * quad;
#pragma unroll
    for (int ks = 0; ks < kK16; ++ks)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const __half x0 = qr[16 * ks + 8 * h], x1 = qr[16 * ks + 8 * h + 1];  // 2-byte loads: q may be 2-aligned
        const __half2 x = __halves2half2(x0, x1);
        qa[ks][h] = row < G ? *reinterpret_cast<const uint32_t*>(&x) : 0u;
      }
  }

  const size_t base = size_t(b) * p.seq_stride + size_t(head) * p.head_stride;
  const __half* K = p.k + base;
  const __half* V = p.v + base;
  const int tiles = (p.tokens + kFlashTile - 1) / kFlashTile;
  const int t_begin = split * p.tiles_per_split, t_end = min(tiles, t_begin + p.tiles_per_split);
  const int first = t_begin + warp;  // this warp's tiles: first + kFlashWarps i, i < n_mine
  const int n_mine = first < t_end ? (t_end - first + kFlashWarps - 1) / kFlashWarps : 0;
  unsigned char* ring = flash_smem + size_t(warp) * Smem::kWarpBytes;
  const unsigned ring_s = static_cast<unsigned>(__cvta_generic_to_shared(ring));

  // Tile `i` of this warp -> stage `st`: K rows at st * kStageBytes, V rows after them. Row t's 16-byte
  // piece c sits at t * kRowBytes + 16 (c ^ (t & 7)). Copy j of lane l: piece 32 j + l of the tile
  // (row (32 j + l) / kPieces); rows past the sequence's end are zero-filled (the scores are masked,
  // and zero V rows keep 0 x garbage out of P.V).
  auto load_tile = [&](int i, int st) {
    const int tile = first + kFlashWarps * i;
    const int rows = min(kFlashTile, p.tokens - tile * kFlashTile);
    const __half* ks = K + size_t(tile) * kFlashTile * D;
    const __half* vs = V + size_t(tile) * kFlashTile * D;
    const unsigned kd = ring_s + st * Smem::kStageBytes, vd = kd + Smem::kTileBytes;
#pragma unroll
    for (int j = 0; j < kFlashTile * kPieces / 32; ++j) {
      const int idx = 32 * j + lane, t = idx / kPieces, c = idx % kPieces;
      const unsigned off = t * Smem::kRowBytes + ((c ^ (t & 7)) << 4);
      const bool ok = t < rows;
      const int src = ok ? 8 * idx : 0;
      cp_async16_zfill(kd + off, ks + src, ok ? 16u : 0u);
      cp_async16_zfill(vd + off, vs + src, ok ? 16u : 0u);
    }
  };

  // ldmatrix row addresses (bytes into a stage's K or V rows), per lane: m = l / 8 picks the matrix, l % 8
  // its row. K (non-transposed; B of q.K^T, n = token, k = channel): 32-channel group cg, tokens 0..7
  // (+ 8 kRowBytes for 8..15), matrix m = channels 32 cg + 8 m .. + 7: r[0] r[1] = b0b1 b2b3 of k16 step 2 cg,
  // r[2] r[3] those of step 2 cg + 1. V (transposed; B of P.V, k = token, n = channel): channel pair u,
  // matrix m = tokens 8 (m & 1) .. + 7, channels 8 (2 u + (m >> 1)) .. + 7: r[0] r[1] = b0b1 b2b3 of
  // n-tile 2 u, r[2] r[3] those of n-tile 2 u + 1.
  const int mrow = lane % 8, mat = lane / 8;
  auto k_addr = [&](int cg) { return unsigned(mrow * Smem::kRowBytes + (((4 * cg + mat) ^ mrow) << 4)); };
  auto v_addr = [&](int u) {
    return unsigned((8 * (mat & 1) + mrow) * Smem::kRowBytes + (((2 * u + (mat >> 1)) ^ mrow) << 4));
  };

  // P.V accumulators, n-tile j (channels 8 j .. + 7): o[j][0..1] = hi rows (head `row`), channels
  // 8 j + 2 quad + {0,1}; o[j][2..3] = lo rows (the same head and channels). Scaled by kFlashPScale.
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m = -INFINITY;  // head `row`'s running max (log2 units), the same in its quad
  float l = 0.f;        // this lane's share of head `row`'s sum

  // cp.async groups: one committed per prologue stage and per iteration (empty when there is nothing to
  // load), so at iteration i, after kS + i commits, wait_group kS - 1 means groups 0..i are complete:
  // tile i has landed (for this lane; the __syncwarp then shows every lane's copies to the warp).
#pragma unroll
  for (int st = 0; st < kS; ++st) {
    if (st < n_mine) load_tile(st, st);
    cp_async_commit();
  }
  int st = 0;
  for (int i = 0; i < n_mine; ++i) {
    cp_async_wait<kS - 1>();
    __syncwarp();
    const unsigned kt = ring_s + st * Smem::kStageBytes, vt = kt + Smem::kTileBytes;

    // Scores of the tile: sc[n][0..1] = q[row] . K[8 n + 2 quad + {0,1}] (sc[n][2..3]: the zero rows).
    float sc[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
    for (int cg = 0; cg < D / 32; ++cg)
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        uint32_t kb[4];
        ldmatrix_x4(kt + n * 8 * Smem::kRowBytes + k_addr(cg), kb);
        mma_16816(sc[n], qa[2 * cg][0], 0u, qa[2 * cg][1], 0u, kb[0], kb[1]);
        mma_16816(sc[n], qa[2 * cg + 1][0], 0u, qa[2 * cg + 1][1], 0u, kb[2], kb[3]);
      }

    // Online softmax of head `row` over the tile's 16 tokens (the quad holds them all).
    const int tok0 = (first + kFlashWarps * i) * kFlashTile;
    float s[2][2];
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        s[n][e] = tok0 + 8 * n + 2 * quad + e < p.tokens ? sc[n][e] * p.scale_log2 : -INFINITY;
    float mx = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 2));
    // Rescale only when some head's max grew (rare after the first tiles; warp-uniform branch). Every tile
    // has a token, so the new max is finite; from m = -inf the factor is 0 (O and l are 0 then).
    if (__any_sync(0xFFFFFFFFu, mx > m)) {
      const float m_new = fmaxf(m, mx);
      const float corr = exp2f(m - m_new);
      m = m_new;
      l *= corr;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[j][0] *= corr;
        o[j][1] *= corr;
        o[j][2] *= corr;
        o[j][3] *= corr;
      }
    }
    // P.V's A operand (k = the token in the tile): a0a1 = hi of tokens 2 quad + {0,1} (score n-tile 0),
    // a2a3 = their lo, a4a5 / a6a7 = hi / lo of tokens 8 + 2 quad + {0,1} (n-tile 1).
    uint32_t pa[4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const float p0 = exp2f(s[n][0] - m), p1 = exp2f(s[n][1] - m);  // masked: exp2(-inf) = 0
      l += p0 + p1;
      const float x0 = p0 * kFlashPScale, x1 = p1 * kFlashPScale;
      const uint32_t hi = pack_half2(x0, x1);
      const float2 hf = __half22float2(*reinterpret_cast<const __half2*>(&hi));
      pa[2 * n] = hi;
      pa[2 * n + 1] = pack_half2(x0 - hf.x, x1 - hf.y);
    }
#pragma unroll
    for (int u = 0; u < kK16; ++u) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vt + v_addr(u), vb);
      mma_16816(o[2 * u], pa[0], pa[1], pa[2], pa[3], vb[0], vb[1]);
      mma_16816(o[2 * u + 1], pa[0], pa[1], pa[2], pa[3], vb[2], vb[3]);
    }

    __syncwarp();  // every lane has read stage st before it is refilled
    if (i + kS < n_mine) load_tile(i + kS, st);
    cp_async_commit();
    st = st + 1 == kS ? 0 : st + 1;
  }

  // This warp's partial over its own ring (only empty cp.async groups can be pending; waited anyway):
  // rows[g][0..D) = O of head g (unscaled), rows[g][D] = max, rows[g][D + 1] = sum.
  cp_async_wait<0>();
  __syncwarp();
  l += __shfl_xor_sync(0xFFFFFFFFu, l, 1);
  l += __shfl_xor_sync(0xFFFFFFFFu, l, 2);
  if (row < G) {
    float* rw = reinterpret_cast<float*>(ring) + row * (D + 2);
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<float2*>(rw + 8 * j + 2 * quad) =
          make_float2((o[j][0] + o[j][2]) * (1.f / kFlashPScale), (o[j][1] + o[j][3]) * (1.f / kFlashPScale));
    if (quad == 0) {
      rw[D] = m;
      rw[D + 1] = l;
    }
  }
  __syncthreads();

  // Merge the warps: this split's (acc, max, sum) per query head, or with one split the output.
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    auto warp_row = [&](int w) {
      return reinterpret_cast<const float*>(flash_smem + size_t(w) * Smem::kWarpBytes) + g * (D + 2);
    };
    const MergedElement e = merge_warps<kFlashWarps>(warp_row, D, d);  // warps without tiles weigh 0
    if (p.splits == 1) store_out(p.out + (q_row0 + g) * D + d, e.sum > 0.f ? e.acc / e.sum : 0.f);  // as merge_kernel would
    else write_partial(p.part + ((q_row0 + g) * p.splits + split) * (D + 2), D, d, e);
  }
}

/// cuBLAS baseline's softmax: scores [rows][N] fp32 (already scaled) -> P fp16.
__global__ void softmax_rows_kernel(const float* scores, __half* probs, int n) {
  const float* s = scores + size_t(blockIdx.x) * n;
  __half* pr = probs + size_t(blockIdx.x) * n;
  __shared__ float red[32];
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, s[i]);
  m = warp_max(m);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
  __syncthreads();
  m = -INFINITY;
  for (int w = 0; w < int(blockDim.x / 32); ++w) m = fmaxf(m, red[w]);
  __syncthreads();
  float sum = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += __expf(s[i] - m);
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
  __syncthreads();
  sum = 0.f;
  for (int w = 0; w < int(blockDim.x / 32); ++w) sum += red[w];
  const float inv = 1.f / sum;
  for (int i = threadIdx.x; i < n; i += blockDim.x) pr[i] = __float2half_rn(__expf(s[i] - m) * inv);
}

}  // namespace detail
}  // namespace kvcomp
