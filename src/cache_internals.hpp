// The Cache's device buffers, for tests that must reach under the API (to
// corrupt the pool or the block tables and check that attention stays in
// bounds). Not part of the public API.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvcomp/cache.hpp"
#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

struct CacheInternals {
  static uint8_t* pool(Cache& c);
  static size_t pool_bytes(const Cache& c);
  /// Layer `layer`'s block table: [max_seqs][max_blocks][kv_heads] entries.
  static format::BlockRef* table(Cache& c, int layer);
  static size_t table_entries(const Cache& c);  // per layer
};

}  // namespace detail
}  // namespace kvcomp
