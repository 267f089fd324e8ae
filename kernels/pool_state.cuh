// The device state of the paged pool and of the sequences (plain data, host
// and device): see kernels/pool_pages.cuh for how the kernels use it.
#pragma once

#include <cstdint>

#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

/// Why an entry was not stored (SeqState::fail).
enum FailReason : int32_t { kFailNone = 0, kFailPoolFull = 1, kFailMaxTokens = 2, kFailStale = 3, kFailRollback = 4 };

/// The device state of the pool and the sequences (all device memory, except
/// fail_flag: host-mapped pinned memory).
struct PoolState {
  int32_t* free_pages;    // stack of free page numbers, [n_pages]
  int32_t* free_count;    // [1]
  uint32_t* users;          // [n_pages][user_words]: bit s set while slot s uses the page (it placed
                            // blocks there, or shares them through fork); a free page has none
  uint32_t* layer_units16;  // [n_pages][layers]: units of the blocks placed in the page, by layer
  // A sequence fills a page per page class: with sliding windows in some layers and full attention in
  // others, windowed layers (class 1) place their blocks in pages of their own, so the pages behind
  // the window hold no full-attention block and can be freed. place_kernel is handed one class's
  // cursors (page_classes = 1); release, fork and trim see them all.
  int32_t* open_page;       // [page_classes][max_seqs]: page being filled, or -1
  uint32_t* open_fill16;    // [page_classes][max_seqs]: units of the open page in use (> 0 while one is open)
  uint32_t page_units16;    // page size, 16-byte units
  int32_t n_pages;
  int32_t user_words;       // ceil(max_seqs / 32)
  int32_t page_classes;     // 1, or 2 (windowed and full-attention layers mixed)
  int32_t max_seqs;         // the stride of open_page / open_fill16 between classes
};
struct SeqState {
  int32_t* tokens;        // [layer][max_seqs]
  int32_t* closed;        // [layer][max_seqs]: blocks in the pool (tokens - closed T are in the tail)
  int32_t* high;          // [layer][max_seqs]: the most tokens held (rollback keeps tokens >= high - max_rollback)
  int32_t* fail;          // [layer][max_seqs]: FailReason of the last failed append
  int32_t* fail_flag;     // host-mapped: set when any fail is recorded
  int32_t max_seqs;
  int32_t max_tokens;
  int32_t layers;
};

/// Sliding windows (Config::window): what trim_kernel needs to find the
/// blocks no query can see any more. An attend call takes at most
/// max_attend_batch query tokens of a sequence, its last ones, and
/// rollback() takes back at most max_rollback tokens, so in a layer of L
/// tokens every future query sits at L - max_queries or later (max_queries
/// = their sum) and, with window W, sees only tokens >= L - max_queries - W
/// + 1 (and the sinks): the blocks that end at or before that are dead.
struct WindowTrim {
  const format::BlockRef* table;  // every layer: [layer][slot][max_blocks][kv_heads]
  const int32_t* windows;         // [layers]: W, 0 = full attention
  uint32_t* alive;                // scratch: [ceil(n_pages / 32)] bits
  int32_t max_blocks;
  int32_t kv_heads;
  int32_t block_tokens;
  int32_t sinks;
  int32_t max_queries;  // Config::max_attend_batch (resolved) + Config::max_rollback
};

/// The first block of a layer of `tokens` tokens that a query can still see
/// (WindowTrim); blocks [sink_blocks, it) are dead.
KVCOMP_HD int32_t first_live_block(int32_t tokens, int32_t window, int32_t max_queries, int32_t block_tokens) {
  if (window <= 0) return 0;
  const int32_t lo = tokens - max_queries - window + 1;
  return lo > 0 ? lo / block_tokens : 0;
}
KVCOMP_HD int32_t sink_blocks(int32_t sinks, int32_t block_tokens) { return (sinks + block_tokens - 1) / block_tokens; }

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

/// place_pair for the place kernel's first pass, which only counts pages:
/// a pair opens one when fill + units16 passes its pair_limit (never for an
/// idle job, always for the first pair with no page open), so walk_step is
/// branch-free, its chain over the fill an add, a compare and a select.
KVCOMP_HD uint32_t pair_limit(uint32_t units16, bool page_open, uint32_t page_units16) {
  return units16 == 0 ? UINT32_MAX : page_open ? page_units16 : 0;
}
KVCOMP_HD bool walk_step(uint32_t& fill16, uint32_t units16, uint32_t limit, uint32_t& at16) {
  const uint32_t t = fill16 + units16;
  const bool fresh = t > limit;
  at16 = fresh ? 0 : fill16;
  fill16 = fresh ? units16 : t;
  return fresh;
}

/// place_pair over jobs [j, end), job j's units given by units16(j), counting
/// pages: writes each placed pair's offset in its page to at16[j] and returns
/// how many pairs open a new page; c.fill16 ends as place_pair leaves it,
/// c.page >= 0 once a pair is placed (not a real page). N units are read
/// first, ahead of the chain.
template <int N, class Units>
KVCOMP_HD int32_t walk_pairs(Units units16, uint32_t j, uint32_t end, PageCursor& c, uint32_t page_units16,
                             uint32_t* at16) {
  bool open = c.page >= 0;
  uint32_t fill = open ? c.fill16 : 0;  // a first pair on no page starts at 0 anyway
  int32_t fresh_pages = 0;
  for (; j < end; j += N) {
    uint32_t u[N], limit[N];
    for (int i = 0; i < N; ++i) u[i] = j + i < end ? units16(j + i) : 0;
    for (int i = 0; i < N; ++i) {
      limit[i] = pair_limit(u[i], open, page_units16);
      open = open || u[i] != 0;
    }
    for (int i = 0; i < N; ++i) {
      uint32_t at = 0;
      fresh_pages += walk_step(fill, u[i], limit[i], at);
      if (u[i]) at16[j + i] = at;
    }
  }
  if (open) c = {c.page < 0 ? 0 : c.page, fill};
  return fresh_pages;
}

}  // namespace detail
}  // namespace kvcomp
