// What the KIVI-style baseline kernels are told (plain data, host and device;
// kivi_attention.cuh describes the layout).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace kvcomp {
namespace detail {

struct KiviParams {
  uint32_t* records;   // [batch][kv_heads][chunks][KiviLayout::kWords]: codes and params of a chunk
  float* scale_max;    // [2]: the largest K and V scale in the cache (fp16 range guards), 0 without chunks
  __half* k_tail;
  __half* v_tail;
  int32_t kv_heads;
  int32_t chunks;     // quantized 32-token chunks per sequence
  int32_t tail;       // fp16 tokens per sequence after them
  int32_t tail_cap;   // rows reserved per tail
};

}  // namespace detail
}  // namespace kvcomp
