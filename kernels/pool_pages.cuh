// The compressed pool on the device: fixed-size pages handed to sequences.
//
// A page holds at least one worst-case K+V block pair (format::block_bytes at
// max_lane_bits), so any pair fits an empty page. A sequence fills its own
// open page pair after pair (bump allocation); a pair that does not fit opens
// a new page, popped from a free stack. remove_sequence pushes the sequence's
// pages back. Both run as single-CTA kernels on the caller's stream: no host
// round trip, so appends can be captured in CUDA graphs, and the order is
// deterministic (the same appends place the same blocks at the same offsets).
//
// place_kernel handles one append to one layer, entry by entry (a sequence),
// all or nothing per entry: it checks the entry (the layer holds `expected`
// tokens, it stays within max_tokens_per_seq and behind layer - 1), counts the
// new pages its pairs need, takes them in entry order while the stack holds
// enough, then gives every pair its offset and advances the token count. A
// failed entry stores nothing (its jobs and tail copies skip themselves on
// entry_ok == 0) and is recorded in fail[layer][slot] and a host-mapped flag.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "kvcomp/format.hpp"
#include "pool_state.cuh"
#include "store_job.cuh"

namespace kvcomp {
namespace detail {

constexpr int kPlaceThreads = 256;

/// One CTA. sizes16[2 j], [2 j + 1]: job j's K and V block units (measure);
/// writes pair_at16[j] (K at it, V right after), entry_ok[e], page_base[e] (scratch).
__global__ void __launch_bounds__(kPlaceThreads) place_kernel(const AppendEntry* entries, int n_entries, int layer,
                                                              const uint32_t* sizes16, uint32_t* pair_at16,
                                                              int32_t* entry_ok, int32_t* page_base, PoolState pool,
                                                              SeqState seqs) {
  const uint32_t P = pool.page_units16;
  // 1. Check each entry and count the pages it needs.
  for (int e = threadIdx.x; e < n_entries; e += blockDim.x) {
    const AppendEntry a = entries[e];
    int32_t reason = kFailNone, need = 0;
    if (a.n_tokens > 0) {
      const int32_t* tok = seqs.tokens + a.slot;
      const int32_t have = tok[size_t(layer) * seqs.max_seqs];
      if (have != a.expected || (layer > 0 && have + a.n_tokens > tok[size_t(layer - 1) * seqs.max_seqs]))
        reason = kFailStale;
      else if (have + a.n_tokens > seqs.max_tokens)
        reason = kFailMaxTokens;
      PageCursor c{pool.open_page[a.slot], pool.open_fill16[a.slot]};
      for (uint32_t j = a.job_begin; j < a.job_end && reason == kFailNone; ++j) {
        uint32_t at = 0;
        if (place_pair(c, sizes16[2 * j] + sizes16[2 * j + 1], P, at)) {
          ++need;
          c.page = 0;  // any page: only the count matters here
        }
      }
    }
    entry_ok[e] = reason == kFailNone ? 1 : -reason;
    page_base[e] = need;
  }
  __syncthreads();
  // 2. Take pages in entry order (deterministic), all or nothing per entry.
  if (threadIdx.x == 0) {
    int32_t free = *pool.free_count;
    for (int e = 0; e < n_entries; ++e) {
      if (entry_ok[e] != 1) continue;
      const int32_t need = page_base[e];
      if (need > free) { entry_ok[e] = -kFailPoolFull; continue; }
      free -= need;
      page_base[e] = free + need;  // its i-th new page is free_pages[page_base - 1 - i]
    }
    *pool.free_count = free;
  }
  __syncthreads();
  // 3. Offsets, page ownership, counts; or the failure record.
  for (int e = threadIdx.x; e < n_entries; e += blockDim.x) {
    const AppendEntry a = entries[e];
    if (a.n_tokens <= 0) continue;
    const size_t at = size_t(layer) * seqs.max_seqs + a.slot;
    if (entry_ok[e] != 1) {
      seqs.fail[at] = -entry_ok[e];
      entry_ok[e] = 0;
      *reinterpret_cast<volatile int32_t*>(seqs.fail_flag) = 1;
      __threadfence_system();
      continue;
    }
    PageCursor c{pool.open_page[a.slot], pool.open_fill16[a.slot]};
    int32_t next = page_base[e] - 1;
    uint64_t units = 0;
    for (uint32_t j = a.job_begin; j < a.job_end; ++j) {
      const uint32_t u = sizes16[2 * j] + sizes16[2 * j + 1];
      uint32_t in_page = 0;
      if (place_pair(c, u, P, in_page)) {
        c.page = pool.free_pages[next--];
        pool.owner[c.page] = a.slot;
      }
      if (u) pair_at16[j] = uint32_t(uint64_t(c.page) * P + in_page);
      units += u;
    }
    pool.open_page[a.slot] = c.page;
    pool.open_fill16[a.slot] = c.fill16;
    seqs.tokens[at] += a.n_tokens;
    seqs.units16[at] += units;
  }
}

constexpr int kReleaseThreads = 512;

/// One CTA: gives every page of `slot` back (pushed from the highest page
/// number down, so the lowest is popped first) and clears the slot's state.
__global__ void __launch_bounds__(kReleaseThreads) release_kernel(int slot, PoolState pool, SeqState seqs) {
  using Scan = cub::BlockScan<int, kReleaseThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int32_t top;
  if (threadIdx.x == 0) top = *pool.free_count;
  __syncthreads();
  for (int first = 0; first < pool.n_pages; first += kReleaseThreads) {
    const int i = first + int(threadIdx.x);
    const int page = pool.n_pages - 1 - i;
    const int mine = i < pool.n_pages && pool.owner[page] == slot ? 1 : 0;
    int pos = 0, total = 0;
    Scan(scan).ExclusiveSum(mine, pos, total);
    if (mine) {
      pool.free_pages[top + pos] = page;
      pool.owner[page] = -1;
    }
    __syncthreads();
    if (threadIdx.x == 0) top += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *pool.free_count = top;
    pool.open_page[slot] = -1;
    pool.open_fill16[slot] = 0;
  }
  for (int l = threadIdx.x; l < seqs.layers; l += blockDim.x) {
    const size_t at = size_t(l) * seqs.max_seqs + slot;
    seqs.tokens[at] = 0;
    seqs.units16[at] = 0;
    seqs.fail[at] = 0;
  }
}

}  // namespace detail
}  // namespace kvcomp
