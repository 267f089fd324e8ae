// Cache::Impl: the device buffers and host bookkeeping behind kvcomp::Cache
// (include/kvcomp/cache.hpp). The device holds the truth about sequences
// (token counts, pool pages, failure records: kernels/pool_state.cuh); the
// host keeps a mirror of the token counts for eager argument checks, marked
// stale after plan-based appends (whose effect only the device sees).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "device_buffer.hpp"
#include "kernels/attention_params.cuh"
#include "kvcomp/cache.hpp"
#include "pool_pages.hpp"
#include "store_plan.hpp"

namespace kvcomp {

/// The device buffers of one append's work: jobs, copies, entries and what the
/// place kernel writes. Eager appends grow one set on demand; each plan owns
/// one of fixed size (its pointers are captured in graphs).
struct AppendScratch {
  detail::StorePlan plan;  // host: the jobs of the last append, kept for their capacity
  detail::DeviceBuffer<detail::StoreJob> jobs;
  detail::DeviceBuffer<detail::TailCopy> copies;
  detail::DeviceBuffer<detail::AppendEntry> entries;
  detail::DeviceBuffer<int64_t> entry_tok0;  // eager appends: each entry's first input token
  detail::DeviceBuffer<uint32_t> sizes16, pair_at16;
  detail::DeviceBuffer<uint16_t> seg_bits;  // measure -> encode (kernels/store.cuh)
  detail::DeviceBuffer<int32_t> entry_ok, page_base;
  detail::DeviceBuffer<uint8_t> rotated;  // Transform::Hadamard: K then V rows
  void reserve(size_t jobs_n, size_t copies_n, size_t entries_n, const char* what) {
    jobs.reserve(jobs_n, what);
    copies.reserve(copies_n, what);
    entries.reserve(entries_n, what);
    entry_tok0.reserve(entries_n, what);
    sizes16.reserve(2 * jobs_n, what);
    seg_bits.reserve(2 * jobs_n * detail::kMaxStoreSegments, what);
    pair_at16.reserve(jobs_n, what);
    entry_ok.reserve(entries_n, what);
    page_base.reserve(2 * entries_n, what);  // two per entry (kernels/pool_pages.cuh)
  }
};

struct Cache::Impl {
  Config cfg;
  int T, D, H, G;
  int R;          // Config::max_rollback: blocks close when R newer tokens follow them
  int tail_rows;  // of each (slot, head) tail ring: T, or 2 T when R > 0 (TailLayout)
  int max_blocks;
  int sms = 132;
  // CTAs an SM of each of the fused kernel's CTA sizes (detail::fused_cta_warps), for rows of 8 and of 16.
  int ctas_per_sm[2][3] = {};

  detail::DeviceBuffer<uint8_t> pool;             // pages + decoder overread room
  detail::PageGeometry pages{};
  detail::DeviceBuffer<format::BlockRef> table;   // [layer][slot][max_blocks][H]
  detail::DeviceBuffer<uint8_t> tails;            // [layer][K|V][slot][H][tail_rows] rows (TailLayout)
  detail::DeviceBuffer<CodebookTables> books;     // [layer][H][K|V]
  detail::DeviceBuffer<ErrorBound> bounds;        // [layer][H][K|V]
  detail::DeviceBuffer<float> part;               // attention workspace
  int part_splits = 0;

  /// The fused kernel's split and CTA size for `tiles` (sequence, row tile)
  /// items of up to `max_units` units, tiles of `tile_rows` rows.
  /// tail: the longest's last unit is its tail.
  detail::SplitPlan attend_plan(int max_units, bool tail, int tiles, int tile_rows) const {
    const int t = tile_rows > detail::kMmaRows;
    int warps[3];
    for (int i = 0; i < 3; ++i) warps[i] = detail::fused_cta_warps(D, tile_rows, i);
    const int tail_q = tail ? detail::tail_cost_quarters(int(cfg.dtype)) : 0;
    return detail::plan_attention(max_units, tiles, H, sms, warps, ctas_per_sm[t], tail_q);
  }

  // Device state (kernels/pool_state.cuh).
  detail::DeviceBuffer<int32_t> free_pages, free_count, open_page;
  detail::DeviceBuffer<uint32_t> users;           // [page][user_words]: which slots use it
  detail::DeviceBuffer<uint32_t> layer_units16;   // [page][layer]
  detail::DeviceBuffer<uint32_t> open_fill16;
  detail::DeviceBuffer<int32_t> tokens;           // [layer][slot]
  detail::DeviceBuffer<int32_t> closed;           // [layer][slot]: blocks in the pool (the rest: the tail)
  detail::DeviceBuffer<int32_t> high;             // [layer][slot]: the most tokens held (SeqState::high)
  detail::DeviceBuffer<unsigned long long> layer_units;  // [layer]: stats scratch
  // Sliding windows (Config::window): freeing the pages behind them.
  bool windowed = false;                          // some layer has a window
  int page_classes = 1;                           // 2: windowed and full layers mixed (PoolState)
  detail::DeviceBuffer<int32_t> windows;          // [layer]: W, 0 = full attention
  detail::DeviceBuffer<uint32_t> alive_pages;     // trim scratch: [ceil(pages / 32)] bits
  detail::DeviceBuffer<int32_t> fail;             // [layer][slot]
  detail::PinnedBuffer fail_flag;                 // one int32, host-mapped
  int32_t* fail_flag_device = nullptr;            // its device address
  detail::DeviceBuffer<unsigned long long> hist;  // [layer][H][K|V][kLowBitChoices][kNumSymbols]
  detail::DeviceBuffer<int32_t> ready;            // [layer]: codebooks built

  // Host side.
  std::vector<bool> live;                   // [slot]
  std::vector<int32_t> h_tokens;            // mirror of `tokens`
  std::vector<int32_t> h_closed;            // mirror of `closed`
  std::vector<int32_t> h_high;              // mirror of `high` as of the last refresh or rollback (appends
                                            // since only raised it to the count: rollback takes the max)
  bool tokens_stale = false;                // plan-based appends ran since the last refresh
  std::vector<bool> books_built;            // known built (eager appends that closed blocks)
  AppendScratch eager;

  struct Plan {
    int batch = 0;
    int tokens = 1;  // per slot and step
    int splits = 1;
    int spread = 1;                  // AttendParams::spread: the splits one sequence is cut into, at most
    int warps = detail::kAttnWarps;  // per CTA of the fused kernel
    int copy_runs() const { return tokens > 1 ? 2 : 1; }  // tail copies per (slot, head): the ring may wrap
    detail::DeviceBuffer<int32_t> slots;
    std::vector<int> seq_ids;
    AppendScratch scratch;
  };
  std::vector<std::unique_ptr<Plan>> plans;

  explicit Impl(const Config& c);

  detail::PoolState pool_state() const {
    return {free_pages.ptr,  free_count.ptr,      users.ptr,    layer_units16.ptr, open_page.ptr,
            open_fill16.ptr, pages.page_units16, pages.pages, user_words(),      page_classes,
            cfg.max_seqs};
  }
  /// What place_kernel fills `layer`'s blocks with: the pool and the page cursors of the layer's class.
  detail::PoolState place_state(int layer) const {
    detail::PoolState p = pool_state();
    const int c = page_class(layer);
    p.open_page += size_t(c) * cfg.max_seqs;
    p.open_fill16 += size_t(c) * cfg.max_seqs;
    p.page_classes = 1;
    return p;
  }
  /// 1 for windowed layers when windowed and full-attention layers are mixed (their own pages), else 0.
  int page_class(int layer) const { return page_classes > 1 && layer_window(layer) > 0 ? 1 : 0; }
  detail::SeqState seq_state() const;
  detail::TailLayout tail_layout() const {
    return {tails.ptr, cfg.max_seqs, H, T, D, dtype_size(cfg.dtype), tail_rows,
            tail_code_bits(cfg.tail_format)};
  }
  size_t at(int layer, int slot) const { return size_t(layer) * cfg.max_seqs + slot; }
  int32_t user_words() const { return (cfg.max_seqs + 31) / 32; }
  ErrorBound bound(int layer, int head, Kind kind) const;

  void check_seq(int id) const;
  /// The default strides for negative ones; throws on strides that overlap heads or channels.
  void resolve_strides(int64_t& token_stride, int64_t& head_stride) const;
  /// Throws on a q/out type attention does not take or null pointers.
  static void check_attend_io(const void* q, const void* out, DType q_type);
  void check_layer(int layer) const;
  Plan& plan(const DecodePlan& p, const char* call);
  /// Throws the recorded device failures, if the flag is up (see cache.hpp).
  void poll_failures(const char* call);
  /// Makes h_tokens, h_closed and h_high current (synchronizes the device) if plan-based calls ran.
  void refresh_tokens();
  int32_t host_tokens(int slot, int layer) const { return h_tokens[at(layer, slot)]; }
  int32_t host_closed(int slot, int layer) const { return h_closed[at(layer, slot)]; }
  /// Tokens of (slot, layer) in its tail (not in closed blocks).
  int32_t host_tail(int slot, int layer) const { return host_tokens(slot, layer) - host_closed(slot, layer) * T; }

  /// Everything of AttendParams but the batch, its slots and the split.
  void fill_attend(int layer, const void* q, void* out, detail::AttendParams& p) const;
  /// Cache::attend: n_queries[i] query tokens for seq_ids[i] (nullptr: one each).
  void attend(int layer, const std::vector<int>& seq_ids, const int* n_queries, const void* q, void* out,
              DType q_type, cudaStream_t stream);
  /// The store kernels for `n_jobs` jobs, `n_entries` entries and `n_copies`
  /// copies already in `s` (device), on `stream`.
  /// After the last layer's append, with windows: frees the pages behind them (every call, or
  /// plan-based: when a count passes a multiple of T).
  void run_store(int layer, AppendScratch& s, int n_jobs, int n_entries, int n_copies, bool build_books,
                 bool trim_every_call, cudaStream_t stream);
  /// Query positions a window trim must keep visible: an attend call's queries, and rollback (R).
  int32_t trim_queries() const;
  int32_t layer_window(int layer) const { return cfg.layer_windows.empty() ? cfg.window : cfg.layer_windows[layer]; }
  /// Block `block` of (seq, layer) can no longer be seen by any query (behind the window), so its
  /// page may have been freed.
  bool behind_window(int seq, int layer, int64_t block) const;
  /// Hadamard: rotates rows into s.rotated; returns the rotated K and V (default strides).
  void rotate_input(AppendScratch& s, int64_t rows, const void*& k, const void*& v, int64_t& token_stride,
                    int64_t& head_stride, cudaStream_t stream);
};

}  // namespace kvcomp
