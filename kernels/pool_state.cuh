// The device state of the paged pool and of the sequences (plain data, host
// and device): see kernels/pool_pages.cuh for how the kernels use it.
#pragma once

#include <cstdint>

#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

/// Why an entry was not stored (SeqState::fail).
enum FailReason : int32_t { kFailNone = 0, kFailPoolFull = 1, kFailMaxTokens = 2, kFailStale = 3 };

/// The device state of the pool and the sequences (all device memory, except
/// fail_flag: host-mapped pinned memory).
struct PoolState {
  int32_t* free_pages;    // stack of free page numbers, [n_pages]
  int32_t* free_count;    // [1]
  int32_t* owner;         // [n_pages]: slot holding the page, or -1
  int32_t* open_page;     // [max_seqs]: page being filled, or -1
  uint32_t* open_fill16;  // [max_seqs]: units of the open page in use
  uint32_t page_units16;  // page size, 16-byte units
  int32_t n_pages;
};
struct SeqState {
  int32_t* tokens;        // [layer][max_seqs]
  uint64_t* units16;      // [layer][max_seqs]: pool units of the sequence's blocks
  int32_t* fail;          // [layer][max_seqs]: FailReason of the last failed append
  int32_t* fail_flag;     // host-mapped: set when any fail is recorded
  int32_t max_seqs;
  int32_t max_tokens;
  int32_t layers;
};

/// A sequence's fill position: `page` (-1: none open) and units used in it.
struct PageCursor {
  int32_t page;
  uint32_t fill16;
};

/// Advances the cursor over one pair of `units16` (0: an idle job, nothing
/// placed). Returns whether the pair opens a new page (then the caller puts a
/// page number in cursor.page) and sets `at16` to its offset in the page.
KVCOMP_HD bool place_pair(PageCursor& c, uint32_t units16, uint32_t page_units16, uint32_t& at16) {
  if (units16 == 0) return false;
  const bool fresh = c.page < 0 || c.fill16 + units16 > page_units16;
  if (fresh) c.fill16 = 0;
  at16 = c.fill16;
  c.fill16 += units16;
  return fresh;
}

}  // namespace detail
}  // namespace kvcomp
