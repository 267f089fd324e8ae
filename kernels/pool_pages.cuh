// The compressed pool on the device: fixed-size pages handed to sequences.
//
// A page holds at least one worst-case K+V block pair (format::block_bytes at
// max_lane_bits), so any pair fits an empty page. A sequence fills its own
// open page pair after pair (bump allocation); a pair that does not fit opens
// a new page, popped from a free stack. A page records which sequences use
// it (a bitmap): the one that fills it, and after fork() the sequences that
// share its blocks; remove_sequence drops the sequence from its pages and
// pushes a page back when its last user goes. Each page also counts its
// blocks' units by layer (stats). Both run as single-CTA kernels on the caller's stream: no host
// round trip, so appends can be captured in CUDA graphs, and the order is
// deterministic (the same appends place the same blocks at the same offsets).
//
// place_kernel handles one append to one layer, entry by entry (a sequence),
// all or nothing per entry: it checks the entry (the layer holds `expected`
// tokens and `closed` blocks, it stays within max_tokens_per_seq and behind layer - 1), counts the
// new pages its pairs need, takes them in entry order while the stack holds
// enough, then gives every pair its offset and advances the token count. A
// failed entry stores nothing (its jobs and tail copies skip themselves on
// entry_ok == 0) and is recorded in fail[layer][slot] and a host-mapped flag.
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/warp/warp_reduce.cuh>
#include <cub/warp/warp_scan.cuh>
#include <cuda/functional>

#include <cstdint>

#include "kvcomp/format.hpp"
#include "pool_state.cuh"
#include "store_job.cuh"

namespace kvcomp {
namespace detail {

constexpr int kPlaceThreads = 256;
constexpr uint32_t kWalkAlone = 64;  // an entry of more jobs, among the first 32, is a long one (the CTA walks it)
constexpr int kPlaceItems = 8;       // jobs a thread takes in the CTA-wide passes
constexpr int kPlaceChunk = kPlaceThreads * kPlaceItems;  // jobs of a long entry walked at a time

/// A page popped from the free stack becomes `slot`'s (no user bits are set
/// on a free page: release_kernel frees a page when its last user goes).
__device__ __forceinline__ void take_page(const PoolState& pool, int32_t page, int32_t slot) {
  pool.users[size_t(page) * pool.user_words + slot / 32] = 1u << (slot % 32);
}

/// One CTA. sizes16[2 j], [2 j + 1]: job j's K and V block units (measure);
/// writes pair_at16[j] (K at it, V right after) and entry_ok[e]. Scratch,
/// two per entry: page_base[2 e] the new pages entry e needs, then (step 2)
/// its first new page's stack position + 1; page_base[2 e + 1] its open
/// page's fill after the append. Step 1 leaves each pair's offset in its page
/// in pair_at16, step 3 adds the page.
__global__ void __launch_bounds__(kPlaceThreads, 1) place_kernel(const AppendEntry* entries, int n_entries, int layer,
                                                                 const uint32_t* sizes16, uint32_t* pair_at16,
                                                                 int32_t* entry_ok, int32_t* page_base,
                                                                 PoolState pool, SeqState seqs) {
  using BlockScan = cub::BlockScan<int32_t, kPlaceThreads>;
  using WarpScan = cub::WarpScan<int32_t>;
  __shared__ union {
    typename BlockScan::TempStorage block;
    typename WarpScan::TempStorage warp;
  } scan;
  __shared__ uint32_t long_mask;                       // bit e: entry e is a long one (below)
  __shared__ int32_t chunk_s[kPlaceChunk + 1];         // a long entry's units before each job of a chunk
  __shared__ int32_t chunk_next[kPlaceChunk];          // next(k): the job opening the page after one opened at k
  __shared__ uint32_t chunk_open[kPlaceChunk / 32];    // bit k: job k opens a page
  __shared__ int32_t chunk_openers[kPlaceChunk];       // the jobs that open pages, in order
  __shared__ int32_t walk_base, walk_need, chunk_n_openers;  // the current page's start; pages opened
  __shared__ int32_t w_need[32];
  // Step 3's long entries that took their pages, in order.
  __shared__ uint32_t w_begin[32], w_end[32];
  __shared__ int32_t w_opened[32], w_top[32], w_page0[32], w_slot[32], w_n;
  const uint32_t P = pool.page_units16;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint2* sizes = reinterpret_cast<const uint2*>(sizes16);  // {K, V} of a job
  auto units16 = [&](uint32_t j) {
    const uint2 s = sizes[j];
    return s.x + s.y;
  };
  if (threadIdx.x == 0) long_mask = 0;
  __syncthreads();

  // 1. Check each entry and walk its jobs once, counting the new pages. A
  // short entry (decode: one job per kv head) is walked by its thread from
  // global memory, 16 sizes a round trip (walk_step: add, compare, select, ~14
  // cycles a pair on an H100). A long one (prefill: thousands of jobs) by the
  // CTA (below).
  for (int e = threadIdx.x; e < n_entries; e += blockDim.x) {
    const AppendEntry a = entries[e];
    int32_t reason = kFailNone, need = 0;
    if (a.n_tokens > 0) {
      const int32_t* tok = seqs.tokens + a.slot;
      const int32_t have = tok[size_t(layer) * seqs.max_seqs];
      if (have != a.expected || seqs.closed[size_t(layer) * seqs.max_seqs + a.slot] != a.closed ||
          (layer > 0 && have + a.n_tokens > tok[size_t(layer - 1) * seqs.max_seqs]))
        reason = kFailStale;
      else if (have + a.n_tokens > seqs.max_tokens)
        reason = kFailMaxTokens;
      if (reason == kFailNone && e < 32 && a.job_end - a.job_begin > kWalkAlone) {
        atomicOr(&long_mask, 1u << e);
      } else if (reason == kFailNone) {
        PageCursor c{pool.open_page[a.slot], pool.open_fill16[a.slot]};
        need = walk_pairs<16>(units16, a.job_begin, a.job_end, c, P, pair_at16);
        page_base[2 * e + 1] = int32_t(c.fill16);
      }
    }
    entry_ok[e] = reason == kFailNone ? 1 : -reason;
    page_base[2 * e] = need;
  }
  __syncthreads();
  // Long entries (prefill: thousands of jobs), one after another, the CTA
  // together, kPlaceChunk jobs at a time. With s(k) the units of the entry's
  // jobs before job k and `base` the s at which the current page starts, job j
  // opens a page iff s(j + 1) - base > P (an idle job never does: s(j + 1) =
  // s(j)). So the job after an opener k that opens the next page, next(k), is
  // the first j with s(j + 1) > s(k) + P: a binary search over the chunk's
  // prefix sums, for every k at once. One thread then follows the openers,
  // one shared-memory load a page (~120 pages for 4096 jobs, instead of a
  // dependent step per job: a warp walking job after job took ~20 cycles a
  // job, 68 us at 4096). A max-scan gives every job its page's opener.
  const uint32_t long_entries = long_mask;
  for (uint32_t left = long_entries; left; left &= left - 1) {
    const int e = __ffs(left) - 1;
    const AppendEntry a = entries[e];
    const PageCursor c0{pool.open_page[a.slot], pool.open_fill16[a.slot]};
    if (threadIdx.x == 0) {
      // Relative to the entry's first job: the open page starts its fill before it; with no page
      // open, base + P = 0 makes the first job holding units open one.
      walk_base = c0.page >= 0 ? -int32_t(c0.fill16) : -int32_t(P);
      walk_need = 0;
    }
    int32_t carry = 0;  // units of the chunks before
    for (uint32_t j0 = a.job_begin; j0 < a.job_end; j0 += kPlaceChunk) {
      __syncthreads();  // walk_base is set; the chunk arrays and scan storage are free
      const int32_t base_in = walk_base;
      const int n = int(min(uint32_t(kPlaceChunk), a.job_end - j0));
      const int k0 = int(threadIdx.x) * kPlaceItems;  // this thread's jobs: k0 .. k0 + kPlaceItems - 1 of the chunk
      int32_t u[kPlaceItems], s[kPlaceItems];
#pragma unroll
      for (int i = 0; i < kPlaceItems; ++i) u[i] = k0 + i < n ? int32_t(units16(j0 + k0 + i)) : 0;
      int32_t total;
      BlockScan(scan.block).ExclusiveSum(u, s, total);
#pragma unroll
      for (int i = 0; i < kPlaceItems; ++i) chunk_s[k0 + i] = carry + s[i];
      if (threadIdx.x == 0) chunk_s[kPlaceChunk] = carry + total;
      for (int w = threadIdx.x; w < kPlaceChunk / 32; w += blockDim.x) chunk_open[w] = 0;
      __syncthreads();
      // next(k) is the last index j >= k + 1 with chunk_s[j] <= s(k) + P (chunk_s[k + 1] is, as a pair's
      // units fit a page; kPlaceChunk: none in the chunk): a fixed-step search, the thread's eight
      // interleaved (independent loads, no data-dependent loop).
      auto search = [&](int32_t (&pos)[kPlaceItems], const int32_t (&target)[kPlaceItems]) {
#pragma unroll 1
        for (int step = kPlaceChunk; step > 0; step >>= 1)
#pragma unroll
          for (int i = 0; i < kPlaceItems; ++i) {
            const int at = pos[i] + step;
            if (at <= kPlaceChunk && chunk_s[min(at, kPlaceChunk)] <= target[i]) pos[i] = at;
          }
      };
      {
        int32_t pos[kPlaceItems], target[kPlaceItems];
#pragma unroll
        for (int i = 0; i < kPlaceItems; ++i) {
          pos[i] = k0 + i + 1;
          target[i] = u[i] != 0 ? carry + s[i] + int32_t(P) : INT32_MIN;  // an idle job opens no page
        }
        search(pos, target);
#pragma unroll
        for (int i = 0; i < kPlaceItems; ++i)
          if (u[i] != 0) chunk_next[k0 + i] = pos[i];
      }
      __syncthreads();
      if (threadIdx.x == 0) {  // the openers, in order: one load a page on the chain
        int32_t pos[kPlaceItems] = {}, target[kPlaceItems];
#pragma unroll
        for (int i = 0; i < kPlaceItems; ++i) target[i] = base_in + int32_t(P);  // the first opener after base_in
        search(pos, target);
        int m = 0;
        for (int k = pos[0]; k < n; k = chunk_next[k]) chunk_openers[m++] = k;
        walk_base = m > 0 ? chunk_s[chunk_openers[m - 1]] : base_in;
        walk_need += m;
        chunk_n_openers = m;
      }
      __syncthreads();
      for (int i = threadIdx.x; i < chunk_n_openers; i += blockDim.x)
        atomicOr(&chunk_open[chunk_openers[i] / 32], 1u << (chunk_openers[i] % 32));
      __syncthreads();
      int32_t opener[kPlaceItems], last[kPlaceItems];  // the chunk's last opener at or before each job, -1: none
#pragma unroll
      for (int i = 0; i < kPlaceItems; ++i) opener[i] = chunk_open[(k0 + i) / 32] >> ((k0 + i) % 32) & 1 ? k0 + i : -1;
      BlockScan(scan.block).InclusiveScan(opener, last, cuda::maximum<int32_t>{});
#pragma unroll
      for (int i = 0; i < kPlaceItems; ++i)
        if (u[i] != 0)
          pair_at16[j0 + k0 + i] = uint32_t(chunk_s[k0 + i] - (last[i] >= 0 ? chunk_s[last[i]] : base_in));
      carry += total;
    }
    if (threadIdx.x == 0) {
      const bool open = c0.page >= 0 || carry > 0;  // units > 0: a job was placed
      page_base[2 * e] = walk_need;
      page_base[2 * e + 1] = int32_t(open ? uint32_t(carry - walk_base) : c0.fill16);
      w_need[e] = walk_need;
    }
    __syncthreads();  // walk_base and the chunk arrays are reused
  }
  __syncthreads();

  // 2. Take pages in entry order (deterministic), all or nothing per entry:
  // warp 0, 32 entries a step, by a scan when they all fit (the usual case),
  // else entry by entry.
  if (warp == 0) {
    int32_t free = *pool.free_count;
    for (int e0 = 0; e0 < n_entries; e0 += 32) {
      const int e = e0 + lane;
      const bool ok = e < n_entries && entry_ok[e] == 1;
      const int32_t need = ok ? page_base[2 * e] : 0;
      int32_t before, total;
      WarpScan(scan.warp).ExclusiveSum(need, before, total);
      __syncwarp();
      if (total <= free) {
        if (ok) page_base[2 * e] = free - before;  // its i-th new page is free_pages[page_base - 1 - i]
        free -= total;
      } else {
        for (int i = 0; i < 32; ++i) {
          const bool ok_i = __shfl_sync(~0u, ok, i);
          const int32_t need_i = __shfl_sync(~0u, need, i);
          if (lane == i && ok) {
            if (need > free) entry_ok[e] = -kFailPoolFull;
            else page_base[2 * e] = free;
          }
          if (ok_i && need_i <= free) free -= need_i;
        }
      }
    }
    if (lane == 0) *pool.free_count = free;
  }
  __syncthreads();

  // 3. Offsets, page ownership, counts; or the failure record. A pair opened
  // a page iff its offset is 0: an open page always holds some units (a
  // page is opened by a pair of units > 0, idle jobs place nothing, and
  // release_kernel closes the page with the sequence), so the k-th pair at 0
  // of an entry is on its k-th new page, free_pages[page_base - k], the pairs
  // after it too, and those before any on the page open before the append.
  // Long entries: the CTA together, an inclusive scan of those flags
  // over all their jobs (kPlaceThreads * kPlaceItems a step, ~2-3k cycles).
  if (long_entries) {
    if (warp == 0) {
      const bool ok = (long_entries >> lane & 1) && entry_ok[lane] == 1;
      const uint32_t oks = __ballot_sync(~0u, ok);
      const int r = __popc(oks & ((1u << lane) - 1));
      const int32_t need = ok ? w_need[lane] : 0;
      int32_t before;
      WarpScan(scan.warp).ExclusiveSum(need, before);  // pages the ones before open
      if (ok) {
        const AppendEntry a = entries[lane];
        const int32_t top = page_base[2 * lane], page0 = pool.open_page[a.slot];
        w_begin[r] = a.job_begin;
        w_end[r] = a.job_end;
        w_opened[r] = before;
        w_top[r] = top + before;
        w_page0[r] = page0;
        w_slot[r] = a.slot;
        const size_t at = size_t(layer) * seqs.max_seqs + a.slot;
        pool.open_page[a.slot] = need > 0 ? pool.free_pages[top - need] : page0;
        pool.open_fill16[a.slot] = uint32_t(page_base[2 * lane + 1]);
        seqs.tokens[at] += a.n_tokens;
        seqs.closed[at] += a.new_blocks;
        seqs.high[at] = max(seqs.high[at], seqs.tokens[at]);
      }
      if (lane == 0) w_n = __popc(oks);
    }
    __syncthreads();
    const int n = w_n;
    int32_t carry = 0;  // pages the jobs of the steps before open
    for (uint32_t j0 = n ? w_begin[0] : 0, last = n ? w_end[n - 1] : 0; j0 < last;
         j0 += kPlaceThreads * kPlaceItems) {
      uint32_t u[kPlaceItems], at16[kPlaceItems];
      int32_t opens[kPlaceItems], k[kPlaceItems], r[kPlaceItems];
#pragma unroll
      for (int i = 0; i < kPlaceItems; ++i) {
        const uint32_t j = j0 + threadIdx.x * kPlaceItems + i;
        r[i] = 0;  // the last entry starting at or before j (j may be another entry's job)
        for (int step = 16; step; step >>= 1)
          if (r[i] + step < n && w_begin[r[i] + step] <= j) r[i] += step;
        const bool mine = j < w_end[r[i]];
        u[i] = mine ? units16(j) : 0;
        at16[i] = mine ? pair_at16[j] : 0;
        opens[i] = u[i] != 0 && at16[i] == 0;
      }
      int32_t total;
      BlockScan(scan.block).InclusiveSum(opens, k, total);
#pragma unroll
      for (int i = 0; i < kPlaceItems; ++i) {
        if (!u[i]) continue;
        const int32_t opened = carry + k[i];
        const int32_t page = opened > w_opened[r[i]] ? pool.free_pages[w_top[r[i]] - opened] : w_page0[r[i]];
        if (opens[i]) take_page(pool, page, w_slot[r[i]]);
        atomicAdd(pool.layer_units16 + size_t(page) * seqs.layers + layer, u[i]);
        pair_at16[j0 + threadIdx.x * kPlaceItems + i] = uint32_t(uint64_t(page) * P + at16[i]);
      }
      carry += total;
      __syncthreads();
    }
  }
  // The other entries, a thread each, and every failure record.
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
    if (e < 32 && (long_entries >> e & 1)) continue;
    const int32_t top = page_base[2 * e];
    int32_t page = pool.open_page[a.slot], opened = 0;
    for (uint32_t j = a.job_begin; j < a.job_end; j += 16) {
      uint32_t u[16], at16[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        u[i] = j + i < a.job_end ? units16(j + i) : 0;
        at16[i] = j + i < a.job_end ? pair_at16[j + i] : 0;
      }
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        if (u[i]) {
          if (at16[i] == 0) {
            page = pool.free_pages[top - ++opened];
            take_page(pool, page, a.slot);
          }
          atomicAdd(pool.layer_units16 + size_t(page) * seqs.layers + layer, u[i]);
          pair_at16[j + i] = uint32_t(uint64_t(page) * P + at16[i]);
        }
      }
    }
    pool.open_page[a.slot] = page;
    pool.open_fill16[a.slot] = uint32_t(page_base[2 * e + 1]);
    seqs.tokens[at] += a.n_tokens;
    seqs.closed[at] += a.new_blocks;
    seqs.high[at] = max(seqs.high[at], seqs.tokens[at]);
  }
}

constexpr int kReleaseThreads = 512;

/// The whole CTA (kReleaseThreads): `slot` stops using every page it uses
/// for which keep(page) is false; a page left with no user is pushed on the
/// free stack (from the highest page number down, so the lowest is popped
/// first) and its layer counts cleared.
template <class Keep>
__device__ void drop_pages(int slot, const PoolState& pool, int layers, Keep keep) {
  using Scan = cub::BlockScan<int, kReleaseThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int32_t top;
  if (threadIdx.x == 0) top = *pool.free_count;
  __syncthreads();
  const uint32_t bit = 1u << (slot % 32);
  for (int base = 0; base < pool.n_pages; base += kReleaseThreads) {
    const int i = base + int(threadIdx.x);
    const int page = pool.n_pages - 1 - i;
    int freed = 0;
    if (i < pool.n_pages && !keep(page)) {
      uint32_t* users = pool.users + size_t(page) * pool.user_words;
      if (users[slot / 32] & bit) {
        users[slot / 32] &= ~bit;
        uint32_t any = 0;
        for (int w = 0; w < pool.user_words; ++w) any |= users[w];
        freed = any == 0;
      }
    }
    int pos = 0, total = 0;
    Scan(scan).ExclusiveSum(freed, pos, total);
    if (freed) {
      pool.free_pages[top + pos] = page;
      for (int l = 0; l < layers; ++l) pool.layer_units16[size_t(page) * layers + l] = 0;
    }
    __syncthreads();
    if (threadIdx.x == 0) top += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) *pool.free_count = top;
  __syncthreads();
}

/// One CTA: `slot` stops using its pages (its own and, after fork, shared
/// ones); a page no sequence uses any more is pushed back (from the highest
/// page number down, so the lowest is popped first), its layer counts
/// cleared. Clears the slot's state.
__global__ void __launch_bounds__(kReleaseThreads) release_kernel(int slot, PoolState pool, SeqState seqs) {
  drop_pages(slot, pool, seqs.layers, [](int) { return false; });
  for (int c = threadIdx.x; c < pool.page_classes; c += blockDim.x) {
    pool.open_page[c * pool.max_seqs + slot] = -1;
    pool.open_fill16[c * pool.max_seqs + slot] = 0;
  }
  for (int l = threadIdx.x; l < seqs.layers; l += blockDim.x) {
    const size_t at = size_t(l) * seqs.max_seqs + slot;
    seqs.tokens[at] = 0;
    seqs.closed[at] = 0;
    seqs.high[at] = 0;
    seqs.fail[at] = 0;
  }
}

/// One CTA: `child` (a free slot) starts as a copy of `parent`: it uses
/// every page the parent uses (the closed blocks are immutable, so they are
/// shared), holds its token counts, and opens pages of its own for the
/// blocks it closes later. (The block table rows and tails are copied by the
/// caller.)
__global__ void __launch_bounds__(kReleaseThreads) fork_kernel(int parent, int child, PoolState pool, SeqState seqs) {
  for (int page = threadIdx.x; page < pool.n_pages; page += blockDim.x) {
    uint32_t* users = pool.users + size_t(page) * pool.user_words;
    if (users[parent / 32] >> (parent % 32) & 1) users[child / 32] |= 1u << (child % 32);
  }
  for (int c = threadIdx.x; c < pool.page_classes; c += blockDim.x) {
    pool.open_page[c * pool.max_seqs + child] = -1;
    pool.open_fill16[c * pool.max_seqs + child] = 0;
  }
  for (int l = threadIdx.x; l < seqs.layers; l += blockDim.x) {
    seqs.tokens[size_t(l) * seqs.max_seqs + child] = seqs.tokens[size_t(l) * seqs.max_seqs + parent];
    seqs.closed[size_t(l) * seqs.max_seqs + child] = seqs.closed[size_t(l) * seqs.max_seqs + parent];
    seqs.high[size_t(l) * seqs.max_seqs + child] = seqs.high[size_t(l) * seqs.max_seqs + parent];
    seqs.fail[size_t(l) * seqs.max_seqs + child] = 0;
  }
}

/// Cache::rollback: every layer of a sequence gives back its last n tokens,
/// a thread a sequence: slots[b] and counts[b] (plan-based, device), or
/// `slot` and `n` (slots null). Taken back only if every layer holds the
/// same count L and L - n >= high - max_rollback (so the n tokens are tail
/// tokens, and window trims left them visible); otherwise nothing changes
/// and the failure is recorded for check() (kFailRollback, layer 0).
__global__ void rollback_kernel(const int32_t* slots, const int32_t* counts, int batch, int slot, int n,
                                int max_rollback, int block_tokens, SeqState seqs) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  if (slots) {
    slot = slots[b];
    n = counts[b];
  }
  if (slot < 0 || n == 0) return;
  const size_t S = seqs.max_seqs;
  const int32_t L = seqs.tokens[slot];
  bool ok = n > 0;
  for (int l = 0; l < seqs.layers && ok; ++l) {
    const size_t at = size_t(l) * S + slot;
    const int32_t have = seqs.tokens[at], high = max(seqs.high[at], have);
    ok = have == L && have - n >= high - max_rollback && have - n >= seqs.closed[at] * block_tokens;
  }
  if (!ok) {
    seqs.fail[slot] = kFailRollback;
    *reinterpret_cast<volatile int32_t*>(seqs.fail_flag) = 1;
    __threadfence_system();
    return;
  }
  for (int l = 0; l < seqs.layers; ++l) {
    const size_t at = size_t(l) * S + slot;
    seqs.high[at] = max(seqs.high[at], seqs.tokens[at]);
    seqs.tokens[at] -= n;
  }
}

/// One CTA, after an append to the last layer: for each entry's sequence
/// (in order, so the free stack's order is deterministic), the pages it uses
/// that hold none of its live blocks (WindowTrim: in no layer visible to a
/// future query, sinks live) and are not one of its open pages: it stops
/// using them, and a page no one uses is freed. every_call = false
/// (plan-based decode, a few tokens a step): a sequence is looked at when
/// its last layer's token count passed a multiple of T in this append, as
/// blocks die at most once every T tokens a layer.
__global__ void __launch_bounds__(kReleaseThreads) trim_kernel(const AppendEntry* entries, int n_entries,
                                                               bool every_call, WindowTrim w, PoolState pool,
                                                               SeqState seqs) {
  const int words = (pool.n_pages + 31) / 32, T = w.block_tokens;
  for (int e = 0; e < n_entries; ++e) {
    const AppendEntry a = entries[e];
    if (a.n_tokens <= 0) continue;
    const int slot = a.slot;
    const int32_t last = seqs.tokens[size_t(seqs.layers - 1) * seqs.max_seqs + slot];
    if (!every_call && last % T >= a.n_tokens) continue;  // no multiple of T passed in this append
    for (int i = threadIdx.x; i < words; i += blockDim.x) w.alive[i] = 0;
    __syncthreads();
    // Mark the pages of the live blocks: the sinks and the window's, every layer (all of a full-attention one).
    for (int l = 0; l < seqs.layers; ++l) {
      const int32_t tokens = seqs.tokens[size_t(l) * seqs.max_seqs + slot];
      const int32_t n = seqs.closed[size_t(l) * seqs.max_seqs + slot];
      const int32_t first = first_live_block(tokens, w.windows[l], w.max_queries, T);
      const int32_t sinks = first > 0 ? min(sink_blocks(w.sinks, T), n) : 0;
      const format::BlockRef* row = w.table + (size_t(l) * seqs.max_seqs + slot) * w.max_blocks * w.kv_heads;
      const int32_t live = sinks + (n - first);
      for (int i = threadIdx.x; i < live * w.kv_heads; i += blockDim.x) {
        const int32_t v = i / w.kv_heads, block = v < sinks ? v : first + (v - sinks);
        const uint32_t page = row[size_t(block) * w.kv_heads + i % w.kv_heads].offset16 / pool.page_units16;
        if (page < uint32_t(pool.n_pages)) atomicOr(&w.alive[page / 32], 1u << (page % 32));
      }
    }
    __syncthreads();
    const int32_t open0 = pool.open_page[slot];
    const int32_t open1 = pool.page_classes > 1 ? pool.open_page[pool.max_seqs + slot] : -1;
    drop_pages(slot, pool, seqs.layers, [&](int page) {
      return page == open0 || page == open1 || (w.alive[page / 32] >> (page % 32) & 1);
    });
  }
}

/// Per layer (one CTA each): the pool units of the blocks in pages some
/// sequence uses (each stored block once, however many sequences share it).
__global__ void __launch_bounds__(256) layer_units_kernel(PoolState pool, int layers, unsigned long long* out) {
  using Sum = cub::BlockReduce<unsigned long long, 256>;
  __shared__ typename Sum::TempStorage sum;
  const int layer = blockIdx.x;
  unsigned long long units = 0;
  for (int page = threadIdx.x; page < pool.n_pages; page += blockDim.x) {
    const uint32_t* users = pool.users + size_t(page) * pool.user_words;
    uint32_t any = 0;
    for (int w = 0; w < pool.user_words; ++w) any |= users[w];
    if (any) units += pool.layer_units16[size_t(page) * layers + layer];
  }
  units = Sum(sum).Sum(units);
  if (threadIdx.x == 0) out[layer] = units;
}

}  // namespace detail
}  // namespace kvcomp
