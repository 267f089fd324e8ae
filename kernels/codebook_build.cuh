// A layer's codebooks built on the device from its histograms, bit for bit
// what Codebook::from_histograms builds on the host (both run the steps of
// kernels/huffman_build.cuh), with no host round trip: CUDA-graph safe.
//
//   build_codebooks_kernel: one CTA per codebook, one warp per low-bit count
//       k: the warp sorts its row by rank (strided), one lane merges the
//       tree, the warp halves and repeats while the limit is not met; then
//       the CTA picks the k with the fewest bits and writes the encoder and
//       decode tables (strided over symbols, then over table entries).
//   mark_ready_kernel: launched after it on the same stream, so every table
//       is written when it sets the ready flag.
#pragma once

#include <cstdint>

#include "huffman_build.cuh"
#include "kvcomp/codebook.hpp"
#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

constexpr int kBuildThreads = 32 * format::kLowBitChoices;  // a warp per k
constexpr int kBookCounts = format::kLowBitChoices * format::kNumSymbols;

struct BuildShared {
  huffman::LengthWork work[format::kLowBitChoices];
  huffman::BitTotal bits[format::kLowBitChoices];
  huffman::CanonicalCode code;
  uint8_t by_length[format::kNumSymbols];
};
static_assert(sizeof(BuildShared) <= 48 * 1024, "static shared memory limit");

/// Whether any of counts[0..n) is nonzero; every thread of the CTA calls it
/// and gets the same answer.
__device__ inline bool block_any_count(const unsigned long long* counts, size_t n) {
  constexpr int kPerThread = 8;
  for (size_t base = 0; base < n; base += size_t(kPerThread) * blockDim.x) {
    bool any = false;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const size_t i = base + size_t(j) * blockDim.x + threadIdx.x;
      if (i < n && counts[i] != 0) any = true;
    }
    if (__syncthreads_or(any)) return true;
  }
  return false;
}

/// grid: n_books CTAs of kBuildThreads threads. books[b] gets the tables of
/// Codebook::from_histograms(hist + b * kBookCounts) unless *ready != 0 or
/// every count of every book is zero.
__global__ void __launch_bounds__(kBuildThreads) build_codebooks_kernel(const unsigned long long* hist, int n_books,
                                                                        CodebookTables* books, const int32_t* ready) {
  if (*ready != 0) return;
  const unsigned long long* mine = hist + size_t(blockIdx.x) * kBookCounts;
  // Mostly decided by this CTA's own counts; all books only when those are empty.
  if (!block_any_count(mine, kBookCounts) && !block_any_count(hist, size_t(n_books) * kBookCounts)) return;

  __shared__ BuildShared sh;
  const int k = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  huffman::LengthWork& w = sh.work[k];
  // unsigned long long and uint64_t are distinct types of the same width.
  const uint64_t* row = reinterpret_cast<const uint64_t*>(mine) + k * format::kNumSymbols;
  huffman::load_step(w, row, true, lane, 32);
  __syncwarp();
  if (lane == 0) huffman::finish_load(w);
  __syncwarp();
  for (;;) {
    huffman::rank_step(w, lane, 32);
    __syncwarp();
    if (lane == 0) huffman::merge_step(w);
    __syncwarp();
    if (w.max_depth <= format::kMaxCodeLen) break;  // the same value in every lane
    huffman::halve_step(w, lane, 32);
    __syncwarp();  // also: every lane has read max_depth before the next merge writes it
  }
  if (lane == 0) sh.bits[k] = huffman::total_bits(w.length, k, row);
  __syncthreads();

  int best = 0;  // strictly fewer bits: a tie keeps the smaller k
  for (int j = 1; j < format::kLowBitChoices; ++j)
    if (huffman::fewer_bits(sh.bits[j], sh.bits[best])) best = j;
  const uint8_t* lengths = sh.work[best].length;
  CodebookTables& out = books[blockIdx.x];
  if (threadIdx.x == 0) {
    huffman::canonical_code(lengths, sh.code);
    out.low_bits = uint32_t(best);
    for (uint32_t& p : out.pad) p = 0;
  }
  __syncthreads();
  huffman::enc_step(lengths, sh.code, out.enc, sh.by_length, int(threadIdx.x), kBuildThreads);
  __syncthreads();
  huffman::lut_step(sh.code, sh.by_length, best, out.lut, int(threadIdx.x), kBuildThreads);
}

/// One CTA, after build_codebooks_kernel on the same stream: *ready = 1 if it
/// was 0 and some count is nonzero (then that kernel built every book).
__global__ void __launch_bounds__(kBuildThreads) mark_ready_kernel(const unsigned long long* hist, size_t n_counts,
                                                                   int32_t* ready) {
  if (*ready != 0) return;
  if (block_any_count(hist, n_counts) && threadIdx.x == 0) *ready = 1;
}

}  // namespace detail
}  // namespace kvcomp
