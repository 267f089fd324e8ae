// The compressed pool's pages (kernels/pool_pages.cuh): their size, and the
// launches that place an append's blocks and free a sequence's pages.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/pool_state.cuh"
#include "kernels/store_job.cuh"

namespace kvcomp {
namespace detail {

struct PageGeometry {
  uint32_t page_units16;  // 16-byte units per page
  int32_t pages;
};

/// Bytes of the largest K+V block pair the format allows (every pair escaped).
size_t worst_pair_bytes(int block_tokens, int head_dim);

/// Pages of at least one worst-case pair, 256 KiB when the pool is large
/// enough, smaller so that a pool holds two pages per sequence where it can.
/// pages == 0: the pool cannot hold one worst-case pair. page_bytes != 0
/// (Config::pool_page_bytes, checked by config_check) fixes the page size.
PageGeometry plan_pages(size_t pool_bytes, int max_seqs, int block_tokens, int head_dim, size_t page_bytes = 0);

void launch_place(const AppendEntry* entries, int n_entries, int layer, const uint32_t* sizes16, uint32_t* pair_at16,
                  int32_t* entry_ok, int32_t* page_base, const PoolState& pool, const SeqState& seqs, cudaStream_t s);
void launch_release(int slot, const PoolState& pool, const SeqState& seqs, cudaStream_t s);
/// With sliding windows, after an append to the last layer (kernels/pool_pages.cuh, trim_kernel).
void launch_trim(const AppendEntry* entries, int n_entries, bool every_call, const WindowTrim& w,
                 const PoolState& pool, const SeqState& seqs, cudaStream_t s);
void launch_fork(int parent, int child, const PoolState& pool, const SeqState& seqs, cudaStream_t s);
/// rollback_kernel: every layer of a sequence holds n tokens fewer, where allowed (else a kFailRollback record):
/// slots/counts (device, [batch]) for a plan, or slots = counts = null and one (slot, n).
void launch_rollback(const int32_t* slots, const int32_t* counts, int batch, int slot, int n, int max_rollback,
                     int block_tokens, const SeqState& seqs, cudaStream_t s);
/// out[layer] (device, `layers` entries): units of the blocks in pages in use, by layer.
void launch_layer_units(const PoolState& pool, int layers, unsigned long long* out, cudaStream_t s);

}  // namespace detail
}  // namespace kvcomp
