// A layer's codebooks on the device. The Cache keeps one CodebookTables per
// (layer, kv head, K|V) in a device array laid out [layer][kv_heads][K|V].
// A layer's codebooks are built once, on the device, from the symbol
// histograms (one per low-bit count k) of the first blocks it compresses, and
// then kept: blocks stored later are encoded with them, and attention decodes
// every block of the layer with them. Building needs no host round trip.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kvcomp/codebook.hpp"
#include "kvcomp/dtype.hpp"

namespace kvcomp {
namespace detail {

/// Builds n_books codebooks on the device: books[b] = Codebook::from_histograms(hist + b * kLowBitChoices *
/// kNumSymbols).tables(), bit for bit, unless *ready != 0 (then does nothing). If every histogram is empty (all
/// counts zero: no block was closed), builds nothing and leaves *ready == 0; otherwise sets *ready = 1 once all
/// n_books tables are written. hist: [n_books][kLowBitChoices][kNumSymbols] (histogram_kernel's layout for one
/// layer's books, book = 2 * kv_head + kind); hist, books and ready are device memory. No host
/// synchronization, no allocation: safe inside CUDA graph capture. Throws kvcomp::Error on a launch error.
void launch_build_codebooks(const unsigned long long* hist, int n_books, CodebookTables* books, int32_t* ready,
                            cudaStream_t s);

/// The codebook whose tables are at the device address `tables` (cudaMemcpy,
/// synchronous): rebuilt from the code lengths the encoder table holds and
/// the tables' low-bit count k.
Codebook read_codebook(const CodebookTables* tables);

}  // namespace detail
}  // namespace kvcomp
