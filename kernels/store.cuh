// Store path: blockwise quantize + Huffman-encode on the GPU.
//
// One CTA of W warps compresses one block (K or V of one StoreJob; W =
// kStoreWarps, or kStoreWarpsFew for launches of few blocks: store_job.cuh). It
// first stages the block's T x D input values in shared memory as fp32 (16-byte
// vector loads, one read of the input per kernel), computes the group params
// from there, then walks the 32 lane sub-streams of the format (format.hpp):
// each lane stream is cut into W segments of whole "units" (the 8 or
// 4 pairs of one (chunk, k16[, m16]) step of pair_position() order), segment w
// walked by warp w, so a block keeps W warps busy instead of one
// (a decode step closes only batch x kv_heads blocks per layer). measure hands
// the segment lengths to encode, which walks once. Three kernels share the
// walk (for_each_unit_pair):
//   histogram_kernel: stream symbols (pair_symbol under every low-bit count
//                     k = 0..kMaxLowBits) -> kLowBitChoices histograms per
//                     codebook (used once per (layer, head, K|V) to build the
//                     codebook, which picks its k from them);
//   measure_kernel:   compressed size of every block (for place_kernel);
//   encode_kernel:    writes blocks at their final pool offsets.
// Bit counts and bits come from format::pair_bits / format::put_pair under
// the codebook's k (CodebookTables::low_bits), the functions the CPU
// reference encodes with. Segments start at the exclusive prefix sum of the
// segment lengths (lane-major); a word wholly inside one segment is stored
// plainly, a word a segment shares with its neighbours is zeroed first and
// then OR-ed in with atomicOr (the contributions have disjoint bits, so the
// order-free checksum can also be summed per contribution).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kvcomp/codebook.hpp"
#include "kvcomp/format.hpp"
#include "kvcomp/tail_codes.hpp"
#include "store_job.cuh"

namespace kvcomp {
namespace detail {

constexpr int kStoreThreads = 32 * kStoreWarps;
constexpr int kMaxGroups = 256;

// Input elements as fp32, exactly as kvcomp::load_as_float (dtype.hpp) on the
// host, NaN payloads included: an escaped value's raw bits must match the
// reference bit for bit, and the hardware conversions may canonicalize NaNs.
__device__ __forceinline__ float load_exact(__half x) {
  const uint16_t h = __half_as_ushort(x);
  // A NaN keeps sign and payload, as format::half_to_float; a select, not a branch.
  const uint32_t nan = (uint32_t(h & 0x8000u) << 16) | 0x7F800000u | (uint32_t(h & 0x3FFu) << 13);
  return (h & 0x7FFFu) > 0x7C00u ? __uint_as_float(nan) : __half2float(x);  // exact for non-NaN
}
__device__ __forceinline__ float load_exact(__nv_bfloat16 x) {
  return format::bits_float(uint32_t(__bfloat16_as_ushort(x)) << 16);
}
__device__ __forceinline__ float load_exact(float x) { return x; }

/// A block staged in shared memory: value (t, c) at v[t * stride + c].
/// Row strides avoid bank conflicts in the walk: K reads float2 (c, c + 1) of
/// rows 8 n8 + row (stride D + 8: a half warp hits 16 distinct bank pairs), V
/// reads single floats of tokens 2 quad + {0, 1, 8, 9} at channel row
/// (stride D + 4: 32 distinct banks). D is a multiple of 16.
struct StagedRows {
  const float* v;
  int stride;
  KVCOMP_HD static int stride_of(Kind kind, int D) { return D + (kind == Kind::Key ? 8 : 4); }
  KVCOMP_HD const float* row(int t) const { return v + t * stride; }
  KVCOMP_HD float load(const float* r, int c) const { return r[c]; }
  /// r[c], r[c + 1]; c even (8-byte aligned: stride and the base are even).
  KVCOMP_HD void load2(const float* r, int c, float& a, float& b) const {
    const float2 x = *reinterpret_cast<const float2*>(r + c);
    a = x.x;
    b = x.y;
  }
};

/// Shared memory of one block: staged values, then the small tables.
template <typename Extra>
struct StoreSmem {
  KVCOMP_HD static size_t values_bytes(int T, int D) {
    const int widest = StagedRows::stride_of(Kind::Key, D);
    return size_t(T) * widest * sizeof(float);
  }
  KVCOMP_HD static size_t bytes(int T, int D) { return values_bytes(T, D) + sizeof(Extra); }
};

/// The V elements of a 16-byte load as fp32, exactly as load_exact. fp16:
/// one integer test for a NaN among all eight (a half is a NaN iff its low 15
/// bits exceed 0x7C00: adding 0x3FF carries into bit 15, never past it); the
/// hardware conversion where there is none (exact for every non-NaN), the
/// payload-keeping one per element where there is.
__device__ __forceinline__ void convert16(const uint4& raw, float (&x)[8], __half) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  uint32_t nan = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) nan |= (w[j] & 0x7FFF7FFFu) + 0x03FF03FFu;
  if ((nan & 0x80008000u) == 0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[j]));
      x[2 * j] = f.x;
      x[2 * j + 1] = f.y;
    }
  } else {
    const __half* e = reinterpret_cast<const __half*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = load_exact(e[j]);
  }
}
template <typename Elem, int V>
__device__ __forceinline__ void convert16(const uint4& raw, float (&x)[V], Elem) {
  const Elem* e = reinterpret_cast<const Elem*>(&raw);
#pragma unroll
  for (int j = 0; j < V; ++j) x[j] = load_exact(e[j]);
}

template <typename Elem> constexpr int tail_elem_of();
template <> constexpr int tail_elem_of<__half>() { return format::kTailElemF16; }
template <> constexpr int tail_elem_of<__nv_bfloat16>() { return format::kTailElemBF16; }
template <> constexpr int tail_elem_of<float>() { return format::kTailElemF32; }

/// A token's vector through the Codes8 / Codes6 codec (kvcomp/tail_codes.hpp;
/// `bits` code bits), by one warp: lane l holds x[j] = channel l + 32 j
/// (D <= 256); returns its params.
template <typename Elem>
__device__ format::TailQuant tail_quant_of_row(const float (&x)[8], int D, int bits) {
  const int lane = threadIdx.x % 32;
  float lo = format::kEmptyLo, hi = format::kEmptyHi;
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (lane + 32 * j < D) format::range_add(x[j], lo, hi);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xFFFFFFFFu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xFFFFFFFFu, hi, o));
  }
  return format::make_tail_quant(lo, hi, tail_elem_of<Elem>(), bits);
}

/// stage_block for code tails (job.tail_codes: 8 or 6 code bits): a warp a
/// row; tail rows are decoded from their codes, input rows go through the
/// codes (encoded and decoded), so a block holds the same values whichever
/// way its tokens came.
template <typename Elem>
__device__ void stage_block_codes(const StoreJob& job, Kind kind, int T, int D, float* vals, int stride) {
  const int lane = threadIdx.x % 32, warps = int(blockDim.x) / 32, bits = job.tail_codes;
  const uint8_t* tail = static_cast<const uint8_t*>(kind == Kind::Key ? job.k_tail : job.v_tail);
  const Elem* in = static_cast<const Elem*>(kind == Kind::Key ? job.k_in : job.v_in);
  const size_t row_bytes = format::tail_code_row_bytes(D, sizeof(Elem), bits);
  for (int t = int(threadIdx.x) / 32; t < T; t += warps) {
    float x[8];
    if (t < job.tail_tokens) {
      const uint8_t* r = tail + size_t(t) * row_bytes;
      const Elem* prm = reinterpret_cast<const Elem*>(r + format::tail_code_bytes(D, bits));
      const float lo = load_exact(prm[0]), step = load_exact(prm[1]);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (lane + 32 * j < D) x[j] = format::tail_value(format::tail_code8(r, lane + 32 * j, bits), lo, step);
    } else {
      const Elem* r = in + int64_t(t - job.tail_tokens) * job.in_token_stride;
#pragma unroll
      for (int j = 0; j < 8; ++j) x[j] = lane + 32 * j < D ? load_exact(r[lane + 32 * j]) : 0.f;
      const format::TailQuant q = tail_quant_of_row<Elem>(x, D, bits);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (lane + 32 * j < D) x[j] = format::tail_round(x[j], q, bits);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (lane + 32 * j < D) vals[t * stride + lane + 32 * j] = x[j];
  }
  __syncthreads();
}

/// Stages rows 0..T-1 of job's `kind` block (tail rows, then input rows) as
/// fp32 with load_exact. Vector loads where a row is 16-byte aligned (the
/// usual case), element loads otherwise. Ends with __syncthreads.
template <typename Elem>
__device__ void stage_block(const StoreJob& job, Kind kind, int T, int D, float* vals, int stride) {
  if (job.tail_codes) {
    stage_block_codes<Elem>(job, kind, T, D, vals, stride);
    return;
  }
  constexpr int V = 16 / sizeof(Elem);  // elements per 16-byte load
  constexpr int kInFlight = 4;          // loads a thread issues before it waits on the first
  const Elem* tail = static_cast<const Elem*>(kind == Kind::Key ? job.k_tail : job.v_tail);
  const Elem* in = static_cast<const Elem*>(kind == Kind::Key ? job.k_in : job.v_in);
  // Vector i = t * per_row + j (channels V j ..) is taken by thread i % blockDim: a cursor (t, j)
  // moves by blockDim vectors at a time (no division per load: per_row need not be a power of two).
  const int per_row = D / V, step_rows = int(blockDim.x) / per_row, step_cols = int(blockDim.x) % per_row;
  int t = int(threadIdx.x) / per_row, j = int(threadIdx.x) % per_row;
  // Element (t, c) of the block: the tail's row t, or input row t - tail_tokens.
  auto source = [&](int t, int c) {
    return (t < job.tail_tokens ? tail + size_t(t) * D : in + int64_t(t - job.tail_tokens) * job.in_token_stride) + c;
  };
  while (t < T) {
    uint4 raw[kInFlight];
    int at[kInFlight];     // staged position t * stride + V j; -1: past the block
    uint32_t aligned = 0;  // bit k: load k was a vector load
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const Elem* src = source(min(t, T - 1), V * j);  // past the end: the last row again, not stored
      at[k] = t < T ? t * stride + V * j : -1;
      if ((reinterpret_cast<uintptr_t>(src) & 15u) == 0) {
        raw[k] = __ldg(reinterpret_cast<const uint4*>(src));
        aligned |= 1u << k;
      }
      t += step_rows;
      j += step_cols;
      if (j >= per_row) { j -= per_row; ++t; }
    }
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      if (at[k] < 0) break;
      float x[V];
      if (aligned >> k & 1) {
        convert16(raw[k], x, Elem{});
      } else {  // a row that is not 16-byte aligned (rare: found again from the staged position)
        const Elem* src = source(at[k] / stride, at[k] % stride);
#pragma unroll
        for (int e = 0; e < V; ++e) x[e] = load_exact(src[e]);
      }
      float4* dst = reinterpret_cast<float4*>(vals + at[k]);
#pragma unroll
      for (int e = 0; e < V / 4; ++e) dst[e] = make_float4(x[4 * e], x[4 * e + 1], x[4 * e + 2], x[4 * e + 3]);
    }
  }
  __syncthreads();
}

/// params[G] (shared) = the quantizer of every group of the staged block.
/// Ends with __syncthreads.
__device__ inline void block_params(const StagedRows& rows, Kind kind, ErrorBound eb, int T, int D,
                             format::GroupQuant* params) {
  if (format::groups_are_channels(kind, T, D)) {  // per channel: thread c owns channel c (consecutive banks)
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
      float lo = format::kEmptyLo, hi = format::kEmptyHi;
      for (int t = 0; t < T; ++t) format::range_add(rows.row(t)[c], lo, hi);
      params[c] = format::make_group_quant(lo, hi, eb);
    }
  } else {
    // Per token: blockDim / T consecutive lanes share a row (a power of two, 2..16: every thread has
    // one), each reads every parts-th channel, a shuffle tree combines them, and the first computes
    // the params (a warp computes 32 / parts rows' at once, not one).
    const int parts = int(blockDim.x) / T, t = int(threadIdx.x) / parts, part = int(threadIdx.x) % parts;
    float lo = format::kEmptyLo, hi = format::kEmptyHi;
    const float* r = rows.row(t);
    for (int c = part; c < D; c += parts) format::range_add(rows.load(r, c), lo, hi);
    for (int o = parts / 2; o > 0; o >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xFFFFFFFFu, lo, o));
      hi = fmaxf(hi, __shfl_xor_sync(0xFFFFFFFFu, hi, o));
    }
    if (part == 0) params[t] = format::make_group_quant(lo, hi, eb);
  }
  __syncthreads();
}

/// Units of one lane stream: K (T / 32) (D / 16) units of 8 pairs, V
/// (T / 32) 2 (D / 16) units of 4 pairs.
KVCOMP_HD int lane_units(Kind kind, int T, int D) {
  return (T / format::kChunkTokens) * (D / 16) * (kind == Kind::Key ? 1 : 2);
}
/// Segment w of W (the CTA's warps): units [w U / W, (w + 1) U / W).
KVCOMP_HD int segment_begin(int w, int units, int warps) { return w * units / warps; }

/// Calls f(a, b, va, vb) for each pair of units [u_begin, u_end) of lane
/// `lane`'s stream, in stream order: pair i holds the values at
/// format::pair_position(kind, D, lane, i) (va at (t0, c0), vb at (t1, c1))
/// and a, b are their quantization codes (0..254 or kEscape) under their
/// groups' params (shared memory).
///   K unit (chunk, k16): for n8: token 8 n8 + row, channels 16 k16 + 2 quad
///      + {0, 1}, then + 8 (params of 4 channels);
///   V unit (chunk, k16 in 0..2, m16): channel 16 m16 + row and + 8 at tokens
///      16 k16 + 2 quad + {0, 1}, then both at tokens + 8 (rows of 4 tokens;
///      params of those 4 tokens, or of the 2 channels where V's groups are
///      channels: format::groups_are_channels).
#pragma nv_exec_check_disable
template <typename F>
__host__ __device__ __forceinline__ void for_each_unit_pair(Kind kind, int T, int D, int lane, int u_begin, int u_end,
                                                            const StagedRows& rows, const format::GroupQuant* params,
                                                            F&& f) {
  const int row = lane / 4, quad = lane % 4;
  const int k16s = D / 16;
  for (int u = u_begin; u < u_end; ++u) {
    if (kind == Kind::Key) {
      const int t_base = format::kChunkTokens * (u / k16s), c = 16 * (u % k16s) + 2 * quad;
      const format::GroupQuant g0 = params[c], g1 = params[c + 1], g8 = params[c + 8], g9 = params[c + 9];
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8) {
        const float* r = rows.row(t_base + 8 * n8 + row);
        float v0, v1, v8, v9;
        rows.load2(r, c, v0, v1);
        rows.load2(r, c + 8, v8, v9);
        f(format::quantize(v0, g0), format::quantize(v1, g1), v0, v1);
        f(format::quantize(v8, g8), format::quantize(v9, g9), v8, v9);
      }
    } else {
      const int chunk = u / (2 * k16s), k16 = (u / k16s) % 2, m16 = u % k16s;
      const int t = format::kChunkTokens * chunk + 16 * k16 + 2 * quad, c = 16 * m16 + row;
      // Groups of channel c at tokens t, t + 1, t + 8, t + 9 (g0 g1 g8 g9) and of channel c + 8 (h0 h1 h8 h9).
      format::GroupQuant g0, g1, g8, g9, h0, h1, h8, h9;
      if (format::groups_are_channels(kind, T, D)) {
        g0 = g1 = g8 = g9 = params[c];
        h0 = h1 = h8 = h9 = params[c + 8];
      } else {
        g0 = h0 = params[t];
        g1 = h1 = params[t + 1];
        g8 = h8 = params[t + 8];
        g9 = h9 = params[t + 9];
      }
      const float *r0 = rows.row(t), *r1 = rows.row(t + 1), *r8 = rows.row(t + 8), *r9 = rows.row(t + 9);
      const float a0 = rows.load(r0, c), a1 = rows.load(r1, c);          // channel c, tokens t, t + 1
      const float b0 = rows.load(r0, c + 8), b1 = rows.load(r1, c + 8);  // channel c + 8
      const float a8 = rows.load(r8, c), a9 = rows.load(r9, c);          // channel c, tokens t + 8, t + 9
      const float b8 = rows.load(r8, c + 8), b9 = rows.load(r9, c + 8);
      f(format::quantize(a0, g0), format::quantize(a1, g1), a0, a1);
      f(format::quantize(b0, h0), format::quantize(b1, h1), b0, b1);
      f(format::quantize(a8, g8), format::quantize(a9, g9), a8, a9);
      f(format::quantize(b8, h8), format::quantize(b9, h9), b8, b9);
    }
  }
}

/// This thread's (lane, segment) of the walk: lane = threadIdx % 32, segment = warp (of W).
template <int W = kStoreWarps>
struct SegmentWalk {
  int lane, seg, u_begin, u_end;
  __device__ SegmentWalk(Kind kind, int T, int D)
      : lane(int(threadIdx.x % 32)), seg(int(threadIdx.x / 32)) {
    const int units = lane_units(kind, T, D);
    u_begin = segment_begin(seg, units, W);
    u_end = segment_begin(seg + 1, units, W);
  }
  template <typename F>
  __device__ __forceinline__ void operator()(Kind kind, int T, int D, const StagedRows& rows,
                                             const format::GroupQuant* params, F&& f) const {
    for_each_unit_pair(kind, T, D, lane, u_begin, u_end, rows, params, f);
  }
};

/// The block's staged values and params: everything before the walk.
/// Returns the rows; params land in `params`.
template <typename Elem>
__device__ StagedRows stage_and_params(const StoreJob& job, Kind kind, int T, int D, float* vals,
                                       format::GroupQuant* params) {
  const StagedRows rows{vals, StagedRows::stride_of(kind, D)};
  stage_block<Elem>(job, kind, T, D, vals, rows.stride);
  block_params(rows, kind, kind == Kind::Key ? job.eb_k : job.eb_v, T, D, params);
  return rows;
}

/// Copies a codebook's encoder table into shared `dst` (read with
/// data-dependent indices by every lane, so shared beats __ldg per pair) and
/// returns its low-bit count k (format.hpp: 0..kMaxLowBits; the tables come
/// from Codebook, which checks it). The caller syncs before use.
__device__ __forceinline__ int load_enc(const CodebookTables* book, uint32_t* dst) {
  for (int s = threadIdx.x; s < format::kNumSymbols; s += blockDim.x) dst[s] = __ldg(&book->enc[s]);
  return int(__ldg(&book->low_bits));
}

/// Sum of v over a CTA of W warps (every thread gets it). `red` holds W entries.
template <int W, typename T>
__device__ __forceinline__ T block_sum(T v, T* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  T total = 0;
#pragma unroll
  for (int w = 0; w < W; ++w) total += red[w];
  __syncthreads();
  return total;
}

/// The CTA's item (block): job item / 2, kind item % 2.
struct StoreItem {
  int job;
  Kind kind;
  __device__ StoreItem() : job(int(blockIdx.x) / 2), kind(Kind(blockIdx.x % 2)) {}
};

struct HistogramSmem {
  format::GroupQuant params[kMaxGroups];
  uint32_t counts[format::kLowBitChoices * format::kNumSymbols];  // [k][symbol]
};

/// grid: 2 n_jobs CTAs of kStoreThreads, dynamic shared memory
/// StoreSmem<HistogramSmem>::bytes(T, D). hist: [codebooks][kLowBitChoices]
/// [kNumSymbols] counts of stream symbols, hist[book][k][s] = pairs with
/// format::pair_symbol(a, b, k) == s (what ref::add_histogram adds;
/// codebook-independent), accumulated with atomics. A block has at most
/// T D / 2 = 16384 pairs, so 32-bit local counts.
template <typename Elem>
__global__ void __launch_bounds__(kStoreThreads) histogram_kernel(const StoreJob* jobs, int T, int D,
                                                                 unsigned long long* hist, const int32_t* ready) {
  extern __shared__ __align__(16) uint8_t smem[];
  if (ready && *ready != 0) return;
  const StoreItem item;
  const StoreJob job = jobs[item.job];
  if (job.tail_tokens < 0) return;
  float* vals = reinterpret_cast<float*>(smem);
  HistogramSmem& s = *reinterpret_cast<HistogramSmem*>(smem + StoreSmem<HistogramSmem>::values_bytes(T, D));
  constexpr int kCounts = format::kLowBitChoices * format::kNumSymbols;
  for (int i = threadIdx.x; i < kCounts; i += blockDim.x) s.counts[i] = 0;
  const StagedRows rows = stage_and_params<Elem>(job, item.kind, T, D, vals, s.params);  // syncs: counts are zero
  SegmentWalk<>(item.kind, T, D)(item.kind, T, D, rows, s.params, [&](int a, int b, float, float) {
#pragma unroll
    for (int k = 0; k < format::kLowBitChoices; ++k)
      atomicAdd(&s.counts[k * format::kNumSymbols + format::pair_symbol(a, b, k)], 1u);
  });
  __syncthreads();
  unsigned long long* out = hist + size_t(job.codebook + int(item.kind)) * kCounts;
  for (int i = threadIdx.x; i < kCounts; i += blockDim.x)
    if (s.counts[i]) atomicAdd(&out[i], (unsigned long long)s.counts[i]);
}

template <int W>
struct MeasureSmem {
  format::GroupQuant params[kMaxGroups];
  uint32_t enc[format::kNumSymbols];
  uint32_t red[W];
};

/// sizes16[2 * job + kind] = block bytes / 16 (0 for an idle job); a job's V
/// block directly follows its K block in the pool (place_kernel).
/// seg_bits[(2 * job + kind) * kMaxStoreSegments + lane * W + segment]:
/// the segment's length in bits (< 2^16: max_lane_bits), which encode (of the
/// same W) takes instead of walking the block twice.
/// grid: 2 n_jobs CTAs of 32 W threads, StoreSmem<MeasureSmem<W>>::bytes(T, D).
template <typename Elem, int W>
__global__ void __launch_bounds__(32 * W) measure_kernel(const StoreJob* jobs, int T, int D,
                                                               const CodebookTables* books, uint32_t* sizes16,
                                                               uint16_t* seg_bits) {
  extern __shared__ __align__(16) uint8_t smem[];
  const StoreItem item;
  const StoreJob job = jobs[item.job];
  if (job.tail_tokens < 0) {
    if (threadIdx.x == 0) sizes16[blockIdx.x] = 0;
    return;
  }
  float* vals = reinterpret_cast<float*>(smem);
  MeasureSmem<W>& s = *reinterpret_cast<MeasureSmem<W>*>(smem + StoreSmem<MeasureSmem<W>>::values_bytes(T, D));
  const int k = load_enc(&books[job.codebook + int(item.kind)], s.enc);
  const StagedRows rows = stage_and_params<Elem>(job, item.kind, T, D, vals, s.params);  // syncs: enc is loaded
  uint32_t bits = 0;
  const SegmentWalk<W> walk(item.kind, T, D);
  walk(item.kind, T, D, rows, s.params, [&](int a, int b, float, float) { bits += format::pair_bits(s.enc, k, a, b); });
  seg_bits[size_t(blockIdx.x) * kMaxStoreSegments + walk.lane * W + walk.seg] = uint16_t(bits);
  const uint32_t total = block_sum<W>(bits, s.red);
  if (threadIdx.x == 0) sizes16[blockIdx.x] = uint32_t(format::block_bytes(item.kind, T, D, total) / format::kBlockAlign);
}

/// Appends bits LSB first to the payload from bit `start`: completed words
/// wholly inside the segment are stored, a first word shared with earlier
/// segments and the last partial word are OR-ed in (zeroed beforehand), and
/// every contribution is added to the checksum `sum`.
/// put(bits, n): 0 <= n <= 32, bits above n zero (put_pair's codewords, 2k
/// low bits, 8-bit fields and raw words are). fill < 32 between calls, so acc
/// holds fill + n <= 63 bits and at most one word completes per call.
struct SegmentWriter {
  uint32_t* payload;
  uint64_t acc;
  int fill;
  uint32_t word;
  bool shared_first;  // the first word holds bits of an earlier segment
  uint64_t sum;

  __device__ SegmentWriter(uint32_t* p, uint32_t start_bit)
      : payload(p), acc(0), fill(int(start_bit & 31)), word(start_bit >> 5), shared_first((start_bit & 31) != 0),
        sum(0) {}

  __device__ __forceinline__ void put(uint32_t bits, int n) {
    acc |= uint64_t(bits) << fill;
    fill += n;
    if (fill >= 32) {
      const uint32_t w = uint32_t(acc);
      if (shared_first) { atomicOr(&payload[word], w); shared_first = false; }
      else payload[word] = w;
      format::checksum_add(sum, w);
      ++word;
      acc >>= 32;
      fill -= 32;
    }
  }
  /// The last partial word (bits beyond the segment are zero).
  __device__ void finish() {
    if (fill > 0 && uint32_t(acc) != 0) {
      atomicOr(&payload[word], uint32_t(acc));
      format::checksum_add(sum, uint32_t(acc));
    }
  }
};

template <int W>
struct EncodeSmem {
  format::GroupQuant params[kMaxGroups];
  uint32_t enc[format::kNumSymbols];
  uint32_t seg_bits[format::kLanes * W];   // [lane][segment]
  uint32_t seg_start[format::kLanes * W];
  unsigned long long red[W];
  uint32_t total_bits;
};

/// Writes job j's K block at pool + 16 * pair_at16[j] and its V block right
/// after (place_kernel's offsets), unless the job is idle or its entry failed.
/// sizes16 and seg_bits: measure_kernel's, for the same jobs and codebooks.
/// grid: 2 n_jobs CTAs of 32 W threads, StoreSmem<EncodeSmem<W>>::bytes(T, D).
template <typename Elem, int W>
__global__ void __launch_bounds__(32 * W) encode_kernel(const StoreJob* jobs, int T, int D,
                                                              const CodebookTables* books, const uint32_t* sizes16,
                                                              const uint16_t* seg_bits, const uint32_t* pair_at16,
                                                              const int32_t* entry_ok, uint8_t* pool,
                                                              format::BlockRef* table) {
  extern __shared__ __align__(16) uint8_t smem[];
  const StoreItem item;
  const StoreJob job = jobs[item.job];
  if (job.tail_tokens < 0 || entry_ok[job.entry] == 0) return;
  const Kind kind = item.kind;
  float* vals = reinterpret_cast<float*>(smem);
  EncodeSmem<W>& s = *reinterpret_cast<EncodeSmem<W>*>(smem + StoreSmem<EncodeSmem<W>>::values_bytes(T, D));
  const int k = load_enc(&books[job.codebook + int(kind)], s.enc);
  const uint32_t k16 = sizes16[2 * item.job], v16 = sizes16[2 * item.job + 1];
  const int64_t pair16 = pair_at16[item.job];
  uint32_t* block = reinterpret_cast<uint32_t*>(pool + (pair16 + (kind == Kind::Key ? 0 : k16)) * format::kBlockAlign);
  const uint32_t block_words = (kind == Kind::Key ? k16 : v16) * (format::kBlockAlign / 4);
  if (kind == Kind::Key && threadIdx.x == 0)
    table[job.table_index] = {uint32_t(pair16), uint16_t(k16), uint16_t(v16)};
  const StagedRows rows = stage_and_params<Elem>(job, kind, T, D, vals, s.params);  // syncs: enc is loaded
  const SegmentWalk<W> walk(kind, T, D);
  const int at = walk.lane * W + walk.seg;  // stream order: lane-major

  // Segment lengths (measure's) -> starts (warp 0 scans the lanes).
  const uint32_t bits = seg_bits[size_t(blockIdx.x) * kMaxStoreSegments + at];
  s.seg_bits[at] = bits;
  __syncthreads();
  uint64_t sum = 0;
  if (walk.seg == 0) {
    uint32_t lane_bits = 0;
#pragma unroll
    for (int w = 0; w < W; ++w) lane_bits += s.seg_bits[walk.lane * W + w];
    uint32_t incl = lane_bits;
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
      if (walk.lane >= o) incl += v;
    }
    uint32_t start = incl - lane_bits;
#pragma unroll
    for (int w = 0; w < W; ++w) {
      s.seg_start[walk.lane * W + w] = start;
      start += s.seg_bits[walk.lane * W + w];
    }
    if (walk.lane == 31) s.total_bits = incl;
    // The lane table: uint16 lengths, two per word.
    const uint32_t next_bits = __shfl_down_sync(0xFFFFFFFFu, lane_bits, 1);
    if (walk.lane % 2 == 0) {
      const uint32_t w = lane_bits | (next_bits << 16);
      block[format::lane_bits_offset(kind, T, D) / 4 + walk.lane / 2] = w;
      format::checksum_add(sum, w);
    }
  }
  const int groups = format::num_groups(kind, T, D);
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    const uint32_t w = s.params[g].stored.min_bits | (uint32_t(s.params[g].stored.step_bits) << 16);
    block[format::params_offset() / 4 + g] = w;
    format::checksum_add(sum, w);
  }
  __syncthreads();

  // Zero the words this segment shares (its first and last, where partial)
  // and the padding after the payload, before anyone ORs into them.
  uint32_t* payload = block + format::payload_offset(kind, T, D) / 4;
  const uint32_t start = s.seg_start[at], end = start + bits;
  if (bits > 0) {
    if (start & 31) payload[start >> 5] = 0;
    if (end & 31) payload[end >> 5] = 0;
  }
  const uint32_t used = uint32_t(format::payload_offset(kind, T, D) / 4) + (s.total_bits + 31) / 32;
  for (uint32_t w = used + threadIdx.x; w < block_words; w += blockDim.x) block[w] = 0;
  __syncthreads();

  // The bits.
  SegmentWriter wr(payload, start);
  walk(kind, T, D, rows, s.params, [&](int a, int b, float va, float vb) {
    format::put_pair(s.enc, k, a, b, va, vb, [&](uint32_t v, int n) { wr.put(v, n); });
  });
  wr.finish();
  sum = block_sum<W, unsigned long long>(sum + wr.sum, s.red);
  if (threadIdx.x == 0) {
    sum += job.codebook + uint32_t(kind);
    block[0] = format::kMagic | (uint32_t(kind) << 16) | (uint32_t(format::kVersion) << 24);
    block[1] = (job.codebook + uint32_t(kind)) | (uint32_t(format::checksum_fold(sum)) << 16);
  }
}

}  // namespace detail
}  // namespace kvcomp

namespace kvcomp {
namespace detail {

/// Copies input rows into a tail (in the input's type) unless the copy's
/// entry failed: grid = number of copies. 16-byte vectors where the input row
/// is aligned (tail rows always are), elements otherwise.
template <typename Elem>
__global__ void tail_copy_kernel(const TailCopy* copies, int D, const int32_t* entry_ok) {
  const TailCopy c = copies[blockIdx.x];
  if (c.rows <= 0 || entry_ok[c.entry] == 0) return;
  constexpr int V = 16 / sizeof(Elem);
  const int per_row = D / V;
  for (int i = threadIdx.x; i < 2 * c.rows * per_row; i += blockDim.x) {
    const bool key = i < c.rows * per_row;
    const int r = key ? i : i - c.rows * per_row;
    const int t = r / per_row, d = (r % per_row) * V;
    const Elem* src = static_cast<const Elem*>(key ? c.k_in : c.v_in) + int64_t(t) * c.in_token_stride + d;
    Elem* dst = static_cast<Elem*>(key ? c.k_dst : c.v_dst) + size_t(t) * D + d;
    if ((reinterpret_cast<uintptr_t>(src) & 15u) == 0) {
      *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) dst[j] = src[j];
    }
  }
}

/// tail_copy_kernel for code tails (`bits`: 8 or 6): each input row (a token
/// of one kv head) becomes D codes and its params (kvcomp/tail_codes.hpp), a
/// warp a row. Codes6: lane 4u gathers its quad's 4 codes (channels 4u ..
/// 4u + 3 of the 32 a pass holds) and writes their 3 bytes.
template <typename Elem>
__global__ void tail_code_copy_kernel(const TailCopy* copies, int D, int bits, const int32_t* entry_ok) {
  const TailCopy c = copies[blockIdx.x];
  if (c.rows <= 0 || entry_ok[c.entry] == 0) return;
  const int lane = threadIdx.x % 32, warps = int(blockDim.x) / 32;
  const size_t row_bytes = format::tail_code_row_bytes(D, sizeof(Elem), bits);
  const size_t code_bytes = format::tail_code_bytes(D, bits);  // where the params start
  for (int i = int(threadIdx.x) / 32; i < 2 * c.rows; i += warps) {
    const bool key = i < c.rows;
    const int t = key ? i : i - c.rows;
    const Elem* src = static_cast<const Elem*>(key ? c.k_in : c.v_in) + int64_t(t) * c.in_token_stride;
    uint8_t* dst = static_cast<uint8_t*>(key ? c.k_dst : c.v_dst) + size_t(t) * row_bytes;
    float x[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = lane + 32 * j < D ? load_exact(src[lane + 32 * j]) : 0.f;
    const format::TailQuant q = tail_quant_of_row<Elem>(x, D, bits);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (32 * j >= D) break;  // warp-uniform (D is a multiple of 16: a pass's quads are whole)
      const int ch = lane + 32 * j;
      const uint32_t code = ch < D ? format::tail_code(x[j], q, bits) : 0u;
      if (bits == 8) {
        if (ch < D) dst[ch] = uint8_t(code);
      } else {
        const uint32_t c1 = __shfl_down_sync(0xFFFFFFFFu, code, 1), c2 = __shfl_down_sync(0xFFFFFFFFu, code, 2);
        const uint32_t c3 = __shfl_down_sync(0xFFFFFFFFu, code, 3);
        const uint32_t unit = code | c1 << 6 | c2 << 12 | c3 << 18;
        if (lane % 4 == 0 && ch < D) {
          uint8_t* u = dst + 3 * ch / 4;
          u[0] = uint8_t(unit);
          u[1] = uint8_t(unit >> 8);
          u[2] = uint8_t(unit >> 16);
        }
      }
    }
    if (lane == 0) {
      if constexpr (sizeof(Elem) == 2) {
        reinterpret_cast<uint16_t*>(dst + code_bytes)[0] = uint16_t(q.lo_bits);
        reinterpret_cast<uint16_t*>(dst + code_bytes)[1] = uint16_t(q.step_bits);
      } else {
        reinterpret_cast<uint32_t*>(dst + code_bytes)[0] = q.lo_bits;
        reinterpret_cast<uint32_t*>(dst + code_bytes)[1] = q.step_bits;
      }
    }
  }
}

}  // namespace detail
}  // namespace kvcomp
