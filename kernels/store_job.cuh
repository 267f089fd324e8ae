// What the store kernels are told about each block pair they compress, each
// tail copy and each (sequence, layer) of an append. Shared by the host
// planner (src/store_plan.cpp), the device planner of plan-based decode
// (kernels/decode_jobs.cuh) and the kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvcomp/format.hpp"
#include "kvcomp/tail_codes.hpp"

namespace kvcomp {
namespace detail {

/// Warps of a store kernel's CTA (one block); each lane stream of the block is
/// cut into this many segments, one per warp (kernels/store.cuh). measure
/// hands the segment lengths to encode in a scratch of kMaxStoreSegments
/// uint16 per block. Launches of many blocks (prefill) take kStoreWarps;
/// launches whose blocks do not fill the GPU twice over (a decode step that
/// closes batch x kv_heads blocks) take kStoreWarpsFew, which shortens each
/// block (store_warps). H100 (bench_codec, 32k prefill / 32-layer
/// block-closing step through a graph, at 0faddae): 8 warps 0.65 ms / 1.27 ms,
/// 16 warps 0.78-0.81 / 1.12.
constexpr int kStoreWarps = 8;
constexpr int kStoreWarpsFew = 16;
constexpr int kMaxStoreSegments = format::kLanes * kStoreWarpsFew;

/// The warps of measure_kernel and encode_kernel (the same for both) for n_jobs
/// jobs on a GPU of `sms` multiprocessors: their 2 n_jobs blocks fill it at
/// most twice over when n_jobs <= sms.
inline int store_warps(int n_jobs, int sms) { return n_jobs <= sms ? kStoreWarpsFew : kStoreWarps; }

/// One (sequence, kv head, token block): a K block and a V block.
/// Row t of the block is tail row t for t < tail_tokens (rows the cache held
/// back), else input row t - tail_tokens (the engine's strided buffer).
/// tail_tokens < 0: an idle job (plan-based decode: no block closes), which
/// every store kernel skips.
struct StoreJob {
  const void* k_in;          // input K row of the first new token, this head
  const void* v_in;          // input V row of the first new token, this head
  const void* k_tail;        // the block's first tail K row (rows contiguous, TailLayout::row_bytes() each)
  const void* v_tail;        // the block's first tail V row
  int64_t in_token_stride;   // elements between consecutive input tokens
  ErrorBound eb_k;
  ErrorBound eb_v;
  int32_t tail_tokens;
  int32_t tail_codes;        // 8 or 6: tail rows are Codes8 / Codes6 rows, and input rows go through the codes too
  uint32_t codebook;         // K codebook index; the V codebook is codebook + 1
  uint32_t table_index;      // BlockRef slot this pair fills
  uint32_t entry;            // the AppendEntry this job belongs to
};

/// Rows an append leaves uncompressed: input rows -> tail rows (copied as
/// they are), unless the append of its entry failed.
struct TailCopy {
  const void* k_in;          // first input row, this head
  const void* v_in;
  void* k_dst;               // first tail row to write (TailLayout: of the input's type, or a Codes8 row)
  void* v_dst;
  int64_t in_token_stride;
  int32_t rows;              // 0: nothing to copy
  uint32_t entry;
};

/// One (sequence, layer) of an append: the place kernel checks it, places its
/// jobs' blocks in the sequence's pool pages and advances its token count,
/// all or nothing (kernels/pool_pages.cuh).
struct AppendEntry {
  int32_t slot;        // sequence slot; ignored when n_tokens == 0
  int32_t n_tokens;    // tokens appended (0: nothing to do)
  int32_t expected;    // tokens the layer holds before the append, as planned
  int32_t closed;      // blocks it holds before the append (closed: compressed in the pool)
  int32_t new_blocks;  // blocks the append closes (its jobs, kv_heads per block, unless idle)
  uint32_t job_begin;  // its StoreJobs: [job_begin, job_end)
  uint32_t job_end;
};

/// Where tail rows live: one buffer [layer][K|V][slot][kv head][rows] of
/// row_bytes() each: D elements of the input's type (elem_bytes each), or
/// with `codes` (Config::tail_format = Codes8 / Codes6) a row of D codes and its params
/// (kvcomp/tail_codes.hpp). The tail of (slot, head) is a
/// ring: token t sits in row t % rows. rows = T, or 2 T when the cache keeps
/// tokens back for rollback (Config::max_rollback > 0: a tail then holds up
/// to T + max_rollback - 1 tokens). Either way a block's T rows are
/// contiguous (they start at row 0 or T).
struct TailLayout {
  uint8_t* base;
  int max_seqs;
  int kv_heads;
  int block_tokens;
  int head_dim;
  size_t elem_bytes;
  int rows;
  int32_t codes = 0;  // 0: rows of the input type; 8 or 6: Codes8 / Codes6 rows (code bits)
  KVCOMP_HD size_t row_bytes() const {
    return codes ? format::tail_code_row_bytes(head_dim, elem_bytes, codes) : size_t(head_dim) * elem_bytes;
  }
  KVCOMP_HD int ring_row(int64_t token) const { return int(token % rows); }
  /// Tail row `row` of (layer, slot, head, kind).
  KVCOMP_HD uint8_t* row_ptr(int layer, int slot, int head, Kind kind, int row = 0) const {
    return base + ((((size_t(layer) * 2 + int(kind)) * max_seqs + slot) * kv_heads + head) * rows + row) * row_bytes();
  }
};

/// Blocks a layer of a sequence closes when it holds `held` tokens in its
/// tail (tokens past its closed blocks): a block closes once max_rollback
/// newer tokens follow it, so the newest max_rollback tokens always stay in
/// the tail (rollback() takes them back without touching a closed block).
KVCOMP_HD int32_t blocks_to_close(int64_t held, int block_tokens, int max_rollback) {
  return held >= block_tokens + max_rollback ? int32_t((held - max_rollback) / block_tokens) : 0;
}

/// The BlockRef slot of (layer, slot, block, head) in the block tables [layer][slot][max_blocks][H].
KVCOMP_HD uint32_t table_slot(int layer, int slot, int64_t block, int head, int max_seqs, int max_blocks, int H) {
  return uint32_t(((size_t(layer) * max_seqs + slot) * max_blocks + size_t(block)) * H + head);
}

/// Where an eager append's input rows and the layer's tails are (plan_store
/// on the host and append_jobs_kernel on the device both make jobs from it).
struct AppendGeometry {
  const uint8_t* k;        // input: token t's head h at k + (t token_stride + h head_stride) elem_bytes
  const uint8_t* v;
  int64_t token_stride;    // elements
  int64_t head_stride;
  size_t elem_bytes;
  TailLayout tails;
  int32_t layer;
  int32_t max_blocks;
  /// Byte offset of input token t's head h from k (and from v).
  KVCOMP_HD size_t input_offset(int64_t t, int h) const {
    return size_t(t * token_stride + int64_t(h) * head_stride) * elem_bytes;
  }
};

/// The tail copies of kv head h of a sequence in `slot` whose layer held
/// `stored` tokens and whose new tokens start at input token tok0: tokens
/// [from, end) go to ring rows t % rows, in at most two runs (the ring
/// wraps). Writes out[0], out[1] (rows 0: nothing to copy).
KVCOMP_HD void tail_copy_runs(const AppendGeometry& g, int slot, int h, uint32_t entry, int64_t stored, int64_t tok0,
                              int64_t from, int64_t end, TailCopy out[2]) {
  int64_t t = from;
  for (int run = 0; run < 2; ++run) {
    TailCopy c{};
    c.entry = entry;
    c.in_token_stride = g.token_stride;
    if (t < end) {
      const int row = g.tails.ring_row(t);
      c.rows = int32_t(end - t < int64_t(g.tails.rows - row) ? end - t : int64_t(g.tails.rows - row));
      const size_t in = g.input_offset(tok0 + (t - stored), h);
      c.k_in = g.k + in;
      c.v_in = g.v + in;
      c.k_dst = g.tails.row_ptr(g.layer, slot, h, Kind::Key, row);
      c.v_dst = g.tails.row_ptr(g.layer, slot, h, Kind::Value, row);
      t += c.rows;
    }
    out[run] = c;
  }
}

/// The job of block b (0: the first block this append closes) and kv head h
/// of a sequence in `slot` whose layer held `stored` tokens, `closed` of
/// them in blocks, and whose new tokens start at input token tok0: the
/// block's rows are the tail's (held = stored - closed T of them, block b
/// takes rows b T .. of those) and then input rows.
KVCOMP_HD StoreJob append_job(const AppendGeometry& g, int slot, int64_t stored, int32_t closed, int64_t tok0, int b,
                              int h, uint32_t entry, ErrorBound eb_k, ErrorBound eb_v) {
  const int T = g.tails.block_tokens, H = g.tails.kv_heads;
  const int64_t held = stored - int64_t(closed) * T, before = int64_t(b) * T;  // tail rows; rows of blocks before b
  const int from_tail = held <= before ? 0 : held - before >= T ? T : int(held - before);
  const int64_t first = from_tail == T ? tok0 : tok0 + (before + from_tail - held);  // first input row (if any)
  const size_t in = g.input_offset(first, h);
  const int row0 = g.tails.ring_row(int64_t(closed + b) * T);
  StoreJob j{};
  j.k_in = g.k + in;
  j.v_in = g.v + in;
  j.k_tail = g.tails.row_ptr(g.layer, slot, h, Kind::Key, row0);
  j.v_tail = g.tails.row_ptr(g.layer, slot, h, Kind::Value, row0);
  j.in_token_stride = g.token_stride;
  j.eb_k = eb_k;
  j.eb_v = eb_v;
  j.tail_tokens = from_tail;
  j.tail_codes = g.tails.codes;
  j.codebook = uint32_t((g.layer * H + h) * 2);
  j.table_index = table_slot(g.layer, slot, closed + b, h, g.tails.max_seqs, g.max_blocks, H);
  j.entry = entry;
  return j;
}

/// What append_jobs_kernel (kernels/append_jobs.cuh) is told: the jobs of
/// an eager append, made on the device from its entries (a prefill closes
/// thousands of blocks: the host would spend ~20 ns a job making them and
/// upload 72 bytes a job).
struct AppendJobsParams {
  AppendGeometry g;
  const ErrorBound* bounds;     // this layer: [H][K|V]
  const AppendEntry* entries;   // [n_entries], jobs in order
  const int64_t* tok0;          // [n_entries]: each entry's first input token
  int32_t n_entries;
  uint32_t n_jobs;
  StoreJob* jobs;               // [n_jobs]
};

/// What decode_jobs_kernel (kernels/decode_jobs.cuh) is told: one plan-based decode append of
/// `tokens` tokens per slot (1..T: at most one block closes).
struct DecodeJobsParams {
  const int32_t* slots;       // [batch]
  const int32_t* tokens;      // [layer][max_seqs]
  const int32_t* closed;      // [layer][max_seqs]: blocks
  const ErrorBound* bounds;   // this layer: [H][K|V]
  AppendGeometry g;           // input rows: slot b's token j is row b * tokens + j
  int32_t layers;
  int32_t batch;
  int32_t tokens_per_slot;
  int32_t copy_runs;          // 1 when tokens_per_slot = 1, else 2
  int32_t max_rollback;
  StoreJob* jobs;             // [batch][H]
  TailCopy* copies;           // [batch][H][copy_runs]: the rows kept in the tail ring (a ring: up to two runs)
  AppendEntry* entries;       // [batch]
};

}  // namespace detail
}  // namespace kvcomp
