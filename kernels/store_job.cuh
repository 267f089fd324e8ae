// What the store kernels are told about each block pair they compress.
// Shared by the launch code (src/store.cu) and the kernels.
#pragma once

#include <cstdint>

#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

/// One (sequence, kv head, token block): a K block and a V block.
/// Row t of the block is tail row t for t < tail_tokens (rows the cache held
/// back), else input row t - tail_tokens (the engine's strided buffer).
struct StoreJob {
  const void* k_in;          // input K row of the first new token, this head
  const void* v_in;          // input V row of the first new token, this head
  const void* k_tail;        // tail K rows [T][D], contiguous, the input's type
  const void* v_tail;        // tail V rows [T][D], contiguous, the input's type
  int64_t in_token_stride;   // elements between consecutive input tokens
  ErrorBound eb_k;
  ErrorBound eb_v;
  int32_t tail_tokens;
  uint32_t codebook;         // K codebook index; the V codebook is codebook + 1
  uint32_t table_index;      // BlockRef slot this pair fills
  uint32_t extent;           // allocation (per sequence) the pair is placed in
};

/// Rows an append leaves uncompressed: input rows -> tail rows (copied as they are).
struct TailCopy {
  const void* k_in;          // first input row, this head
  const void* v_in;
  void* k_dst;               // first tail row to write
  void* v_dst;
  int64_t in_token_stride;
  int32_t rows;
};

}  // namespace detail
}  // namespace kvcomp
