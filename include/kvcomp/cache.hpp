// kvcomp::Cache: a compressed KV cache on the GPU, for engines that run
// decode attention straight from it.
//
//   kvcomp::Config cfg;              // shapes, error bounds, pool size
//   kvcomp::Cache cache(cfg);        // allocates every device buffer once
//   int s = cache.add_sequence();          // or cache.fork(parent): shares its blocks
//   cache.append(layer, {s}, {n}, k, v, stream);     // prefill or decode
//   cache.attend(layer, {s}, q, out, stream);         // fused attention
//   cache.stats();                                    // memory, per layer
//
// Decode through CUDA graphs (plan once, capture, replay every token):
//   kvcomp::DecodePlan plan = cache.make_plan(8);      // a batch of 8 slots
//   cache.set_plan(plan, {s0, s1, ..., -1}, stream);    // -1: an idle slot
//   // captured: for every layer
//   cache.append(plan, layer, k, v, stream);           // plan.tokens tokens per sequence (1 by default)
//   cache.attend(plan, layer, q, out, q_type, stream);
//   cache.check(stream);                               // after replays: throws on a failed step
//
// Errors: every call throws kvcomp::Error with a message naming what is wrong
// (bad shapes, unknown ids, unsupported types, CUDA failures); a call that
// throws leaves the cache as it was. Failures only the device can see (a full
// pool, a sequence at max_tokens_per_seq) are recorded on the device and
// turned into kvcomp::Error by check(), or by the next eager append/attend,
// add_sequence, fork, rollback, set_plan, tokens, stats or read_block once
// the failing work has run: see "Pool full" below.
//
// Streams and synchronization: every call takes (or defaults to) a
// cudaStream_t and runs in order on it. append() and attend() never
// synchronize (codebooks are built and blocks placed in the pool on the
// device). Synchronizing: tokens(), stats(), read_block(), codebook(),
// check(), rollback(), and the first eager append/attend after plan-based
// appends (they refresh the host's copy of the token counts). All calls must be made with
// the same current CUDA device. The cache's scratch buffers (eager append
// jobs, the Hadamard scratch, attention workspace) are shared by its calls:
// calls on different streams must be ordered by the caller (e.g. with
// events), as calls on one stream are.
//
// CUDA graphs: append(plan, ...), attend(plan, ...) may be captured; their
// kernels take every pointer from the plan and every length from device
// memory, so a replay appends the next plan.tokens tokens. A plan's attention
// split is made for max_tokens_per_seq; its kernel spreads each shorter
// sequence over the chip (H100, batch 1, a plan for 128k tokens: 25 us a
// replay at 1k tokens against 23 us for a plan of 1k; equal from 32k on).
// The eager calls may not be captured. A plan-based decode step is idempotent per (sequence,
// layer): layer l stores a sequence's plan.tokens tokens only while layer l
// holds as many tokens as the last layer and (l > 0) at least plan.tokens
// fewer than layer l - 1, so replaying a step that failed part way stores
// exactly what is missing for that sequence.
//
// Pool full: the pool is cut into pages; each sequence fills its own pages
// with its blocks (a page holds at least one worst-case K+V block pair). When
// the blocks one append closes for a (sequence, layer) do not fit, none of
// them is stored and neither are that append's tail rows: the layer keeps the
// tokens it had (tokens() tells), other sequences and layers go on, and the
// failure is recorded. check() then throws an Error naming each failed
// sequence and its layers; remove_sequence() frees pages; redo the step for
// the failed sequences (plan: set_plan with only them, the others -1, and
// replay; eager: append what tokens() says is missing). Replaying with a
// sequence whose step had completed would append its token again.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kvcomp/codebook.hpp"
#include "kvcomp/dtype.hpp"
#include "kvcomp/error.hpp"
#include "kvcomp/format.hpp"

namespace kvcomp {

namespace detail {
struct CacheInternals;  // device buffers, for tests that corrupt them (src/cache_internals.hpp)
}

/// An orthonormal transform of every K and V vector before it is stored (Config::transform).
enum class Transform : uint8_t { None = 0, Hadamard = 1 };

/// How the open tail (the tokens of a block not yet closed) is held
/// (Config::tail_format).
enum class TailFormat : uint8_t { Input = 0, Codes8 = 1, Codes6 = 2 };
/// Code bits of a tail row: 8 (Codes8), 6 (Codes6), 0 (Input: the input's type).
constexpr int tail_code_bits(TailFormat f) { return f == TailFormat::Codes8 ? 8 : f == TailFormat::Codes6 ? 6 : 0; }

/// A batch layout for plan-based decode (make_plan): `batch` sequence slots
/// whose device buffers stay fixed, so calls with it can be captured in a
/// CUDA graph. Valid for the Cache that made it.
struct DecodePlan {
  int id = -1;
  int batch = 0;
  int tokens = 1;  // tokens each slot appends and queries a step (speculative verification: 1 + drafts)
};

/// Error bounds for one (layer, kv head); kv_head = -1 means every head.
struct BoundOverride {
  int layer = 0;
  int kv_head = -1;
  ErrorBound k;
  ErrorBound v;
};

struct Config {
  int layers = 1;
  int kv_heads = 8;
  int q_heads = 32;               // q_heads / kv_heads in 1..128 (up to 16 query heads of a KV head, 8 at
                                  // head_dim 256, share one decode of its blocks; more decode them again
                                  // per 16 or 8: multi-query models, Falcon-7B 71, StarCoder 48)
  int head_dim = 128;             // 64, 80, 96, 128 or 256 (Hadamard: 64, 128 or 256)
  DType dtype = DType::F16;       // of the K/V the engine appends
  int block_tokens = 64;          // T: 32, 64 or 128
  /// Every element of a closed block is within its group's bound (Relative:
  /// eb x the group's finite range) of what was appended. Groups: K per
  /// channel over the block's T tokens; V per token over its head_dim
  /// channels, or per channel over the block as K where block_tokens >
  /// head_dim (128-token blocks at head_dim 64/80/96: fewer params; format.hpp).
  ErrorBound k_bound{BoundMode::Relative, 0.05f};
  ErrorBound v_bound{BoundMode::Relative, 0.05f};
  std::vector<BoundOverride> overrides;  // later entries win
  /// Sliding-window attention (Mistral; Gemma's local layers): a query at
  /// position t sees tokens t - window + 1 .. t, plus tokens 0 ..
  /// sink_tokens - 1 (attention sinks, as in StreamingLLM). 0: every token.
  /// layer_windows, if not empty, gives each layer its own (one entry per
  /// layer, 0 = full attention), e.g. Gemma's mix of local and global layers.
  /// attend() skips the blocks no query sees. Blocks no future query can
  /// see (every query of an attend call is among the sequence's last
  /// max_attend_batch tokens, and rollback() takes back at most
  /// max_rollback) are dropped: after an append to the last layer, a
  /// sequence lets go of the pool pages that hold none of its live blocks,
  /// and a page no sequence uses is freed (plan-based decode: when its
  /// count passes a multiple of block_tokens). Freeing is per page: when windowed and
  /// full-attention layers are mixed (layer_windows), the windowed layers
  /// fill pages of their own, so their dead blocks are freed while the full
  /// layers keep theirs (a sequence then fills two pages at a time).
  /// read_block() refuses blocks behind the window.
  int window = 0;
  std::vector<int> layer_windows;
  int sink_tokens = 0;
  size_t pool_bytes = size_t(1) << 30;   // compressed blocks
  /// The pool is handed to sequences in pages of this many bytes (a multiple
  /// of 16, at least one worst-case K+V block pair: about 92 KiB at T = 64,
  /// D = 128). 0: 256 KiB, or less down to that minimum so that the pool
  /// holds two pages per sequence (max_seqs; per sequence and page class
  /// with mixed windowed and full layers, see `window`) where it can.
  size_t pool_page_bytes = 0;
  int max_seqs = 64;              // live sequences at once
  /// Query tokens per attend call (summed over its sequences, see the
  /// multi-token attend); 0 = min(max_seqs, 256); at most 256.
  int max_attend_batch = 0;
  int max_tokens_per_seq = 32768;
  /// rollback() can take back up to this many tokens (0..block_tokens;
  /// speculative decoding: the most draft tokens verified in one step). A
  /// block is compressed only once max_rollback newer tokens follow it, so
  /// tails hold up to block_tokens + max_rollback - 1 tokens (the tail
  /// buffers double when it is > 0).
  int max_rollback = 0;
  /// Hadamard: each appended K and V vector x (one token of one kv head, D =
  /// head_dim values, D a power of two) is stored as y = x R, computed in fp32
  /// and rounded to nearest in dtype, R = H_D / sqrt(D) (symmetric,
  /// orthonormal, its own inverse; kvcomp/transform.hpp reproduces y bit for
  /// bit). Rotation spreads outlier channels over all channels, so a looser
  /// bound can keep the same quality.
  /// - Stored: blocks and tails hold rotated values (read_block returns them
  ///   so; decode and multiply by R to get back to the input domain).
  /// - Bounded, in the rotated domain: every element z_j of a block is within
  ///   its group's bound eb_j of y_j (K: groups are channels of the rotated
  ///   block, V: rotated token vectors, or channels where block_tokens >
  ///   head_dim); a tail token holds y itself (z = y).
  /// - In the input domain the bound is per vector, in L2, not per element:
  ///   x' = z R satisfies
  ///     ||x' - x||_2 <= sqrt(sum_j eb_j^2) + eps ||x||_2 + delta sqrt(D)
  ///   (sum_j eb_j^2 = 0 for tail tokens; with tail_format = Codes8 / Codes6 each
  ///   element's tail-code error, below, adds to its eb_j, blocks and tail
  ///   alike). eps ||x||_2 + delta sqrt(D) bounds
  ///   ||y - x R||_2: the fp32 transform (at most 2^-20 ||x||_2 for D <= 128)
  ///   plus the rounding of y to dtype:
  ///     F16:  eps = 2^-11 + 2^-19, delta = 2^-25 (rotated values below 2^-14
  ///           round to fp16 subnormals, absolute error <= 2^-25);
  ///     BF16: eps = 2^-8 + 2^-19,  delta = 0;
  ///     F32:  eps = 2^-20,         delta = 0
  ///   (BF16/F32 ignoring fp32 underflow, below 2^-126). Valid while nothing
  ///   overflows: D max_i |x_i| < 2^128 (the unnormalized butterfly), and for
  ///   F16 ||x||_2 <= 65504 (every |y_j| <= ||x||_2). A non-finite element
  ///   makes all D elements of its rotated vector non-finite (stored exactly,
  ///   as escapes); other vectors keep their bounds.
  /// - attend() rotates q and rotates the output back (fp32, in the fused
  ///   kernel and in its merge): it returns softmax(q K'^T / sqrt(D)) V' of
  ///   the input-domain K', V' above, up to fp32 rounding.
  /// None: vectors are stored as given, every element within its bound (plus
  /// the tail codes' half step with tail_format = Codes8 / Codes6).
  Transform transform = Transform::None;
  /// Input: the open tail holds each token as given (in dtype), exactly.
  /// Codes8: it holds each token's vector (one kv head) as 8-bit codes over
  /// the vector's range plus its min and step in dtype (kvcomp/tail_codes.hpp
  /// is the definition): D + 4 bytes a vector instead of 2 D (D + 8 instead
  /// of 4 D for F32), about half the tail's bytes. Every appended vector goes
  /// through these codes first, prefill too, so each value is within half a
  /// step, about (max - min) / 504 of its vector, of the input before its
  /// block quantizes it (blocks: within their bound of those values, so
  /// within the bound plus that half step of the input; blocks do not depend
  /// on how tokens were split into appends). With Hadamard the codes hold the
  /// rotated vector. Non-finite values keep their class (-Inf, +Inf, NaN).
  /// On the tiny Llama at 1k tokens (bench/RESULTS.md) Codes8 stores 12-13%
  /// fewer bytes at the same perplexity (eb 0.1: 659.7 vs 748.3 B/token,
  /// +0.484% vs +0.478%); its tail is attended on tensor cores as an
  /// fp16/bf16 tail is (fp32 params: CUDA cores; H100, a full open tail of 63
  /// tokens: 26 us at 1087 x 1, 363 vs 360 us at 32831 x 8). Not the default: its error
  /// does not shrink with the bound (tight bounds, e.g. 0.001, would get the
  /// per-vector half step on top), and a channel far from its vector's range
  /// can see more than its own K bound.
  /// Codes6: the same with 6-bit codes (3 D / 4 + 4 bytes a vector; a step
  /// about (max - min) / 60 of its vector, so each value within about
  /// (max - min) / 120 of the input before its block quantizes it).
  /// On the tiny Llama (128-token blocks, eb 0.1, layer 0 at 0.05;
  /// bench/RESULTS.md) it stores 632.6 B/token against Codes8's 680.4 at
  /// +0.398% vs +0.340% perplexity (format v3; with v4's V per channel 603.5
  /// B/token, and eb 0.09 gives 4.93x at +0.38%: 1.57x the ratio of 3-bit KIVI
  /// at <= 0.5%). Its tail costs what Codes8's costs (H100: 26.2 vs 26.3 us
  /// at 1087 x 1, 369 vs 368 us at 32831 x 8).
  TailFormat tail_format = TailFormat::Input;
};

struct LayerStats {
  size_t compressed_bytes = 0;  // blocks in the pool (K and V), once however many sequences share them
  size_t tail_tokens = 0;       // tokens held uncompressed, summed over sequences
  size_t tail_bytes = 0;        // those tokens' K and V as held (input type, or Codes8 / Codes6 rows)
  size_t tokens = 0;            // tokens stored, summed over sequences
};

struct Stats {
  size_t compressed_bytes = 0;      // all blocks in pages in use (shared blocks once)
  size_t tail_bytes = 0;            // open-tail tokens in use, as held (input type, or Codes8 / Codes6 rows)
  size_t metadata_bytes = 0;        // block tables, codebooks, tail buffers reserved
  size_t pool_bytes_in_use = 0;     // pool pages held by sequences (>= compressed_bytes)
  size_t pool_page_bytes = 0;       // the pool is handed out in pages of this size
  size_t pool_capacity = 0;
  size_t tokens = 0;                // summed over layers and sequences
  double ratio_vs_fp16 = 0;         // fp16 K+V bytes / (compressed + tail bytes)
  std::vector<LayerStats> per_layer;
};

class Cache {
 public:
  explicit Cache(const Config& config);
  ~Cache();
  Cache(Cache&&) noexcept;
  Cache& operator=(Cache&&) noexcept;
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

  const Config& config() const;

  /// A new, empty sequence; throws when max_seqs are live.
  int add_sequence();
  /// Frees the sequence's id and its pages, on `stream` (no host sync): work
  /// queued on other streams that reads the sequence must be complete. Plans
  /// that hold the sequence must be set again (set_plan) before they run.
  /// Pages shared through fork() are freed when their last user goes.
  void remove_sequence(int seq, cudaStream_t stream = 0);
  /// A new sequence that starts as a copy of `seq` (beam search, parallel
  /// sampling, a cached prompt): it shares seq's closed blocks (immutable:
  /// no copy, no new pool bytes; stats() counts them once) and gets a copy
  /// of its open tail; from then on each appends its own tokens. Either may
  /// be removed first. Runs on `stream`, after the work queued before it
  /// (no host sync unless plan-based appends ran since the last sync, as for
  /// eager calls); throws when max_seqs are live.
  int fork(int seq, cudaStream_t stream = 0);
  /// Takes back the last n tokens of `seq` in every layer (speculative
  /// decoding: the draft tokens the target model rejected; HF's cache
  /// crop()), as if they had never been appended. Possible while no layer
  /// goes below the most tokens it has held minus Config::max_rollback:
  /// e.g. append k <= max_rollback draft tokens, attend, roll back the
  /// rejected ones. Those tokens are always still in the tail (blocks close
  /// only max_rollback tokens behind the newest), so no compressed block
  /// changes: every closed block holds what it would hold had only the kept
  /// tokens been appended (a block may have closed a few tokens earlier, at
  /// the drafts' peak). Every layer must hold the same count (a step that
  /// failed part way is redone first: see "Pool full"). Synchronizes
  /// `stream` (the counts it checks must be the device's); throws, changing
  /// nothing, when n is too large.
  void rollback(int seq, int n_tokens, cudaStream_t stream = 0);
  /// Tokens stored for `seq` in `layer` (synchronizes the device).
  int64_t tokens(int seq, int layer) const;

  /// Appends n_tokens[i] tokens to sequence seq_ids[i] in `layer`. k and v
  /// (device, dtype of the config) hold the sequences' tokens one after the
  /// other: token j's head h starts at k + j * token_stride + h * head_stride
  /// (in elements, channels contiguous). Defaults: [tokens, kv_heads, head_dim].
  /// Layers are appended in order: layer l of a sequence may not hold more
  /// tokens than layer l - 1.
  void append(int layer, const std::vector<int>& seq_ids, const std::vector<int>& n_tokens, const void* k,
              const void* v, cudaStream_t stream, int64_t token_stride = -1, int64_t head_stride = -1);

  /// out[i] = attention of q[i] over sequence seq_ids[i]'s tokens in `layer`
  /// (within the window, if the layer has one; 0 for a sequence without
  /// tokens). q and out: device [batch, q_heads, head_dim] of q_type (F16 or
  /// BF16). A sequence may appear more than once.
  void attend(int layer, const std::vector<int>& seq_ids, const void* q, void* out, DType q_type,
              cudaStream_t stream);
  /// Multi-token queries (speculative verification, chunked prefill):
  /// sequence seq_ids[i] has n_queries[i] >= 1 query tokens, which are its
  /// last n_queries[i] tokens (append them first; one query may attend to a
  /// sequence without tokens, and gets 0). q and out: device
  /// [sum n_queries, q_heads, head_dim], the sequences' queries one after
  /// the other; query j of a sequence of L tokens sits at position
  /// L - n + j and attends causally to tokens 0 .. L - n + j (and within
  /// the window). Every block is decoded once per tile of (query, query
  /// head) rows of its KV head: 16 rows when a sequence has more than 8 and
  /// head_dim <= 128, else 8; n_queries x (q_heads / kv_heads) <= 16 (8 at
  /// head_dim 256) decodes it once for all of a sequence's queries.
  /// sum n_queries <= Config::max_attend_batch.
  void attend(int layer, const std::vector<int>& seq_ids, const std::vector<int>& n_queries, const void* q,
              void* out, DType q_type, cudaStream_t stream);

  /// A plan for decode batches of `batch` sequences: allocates its device
  /// buffers once. Many plans may coexist (e.g. one per captured batch
  /// size). tokens_per_slot (1..block_tokens; batch x tokens_per_slot <=
  /// max_attend_batch): each step appends that many tokens per slot and
  /// attends that many queries per slot, its last tokens, causally (a
  /// speculative verification step in a CUDA graph; rollback() between
  /// replays takes the rejected drafts back).
  DecodePlan make_plan(int batch, int tokens_per_slot = 1);
  /// Puts sequences in the plan's slots (seq_ids.size() == plan.batch; -1
  /// leaves a slot idle: nothing is appended, its attention output is zero).
  /// Not capturable; call it again whenever the batch changes. The ids must
  /// be live and distinct.
  void set_plan(const DecodePlan& plan, const std::vector<int>& seq_ids, cudaStream_t stream);
  /// Decode append of plan.tokens tokens per plan slot to `layer`: rows
  /// i tokens .. (i + 1) tokens - 1 of k and v (same layout and strides as
  /// the eager append, batch x tokens rows) are slot i's. Stores them only
  /// where the step has not yet done so (see "CUDA graphs" above); checks
  /// max_tokens_per_seq on the device.
  void append(const DecodePlan& plan, int layer, const void* k, const void* v, cudaStream_t stream,
              int64_t token_stride = -1, int64_t head_stride = -1);
  /// Attention for the plan's slots: q and out are [plan.batch x plan.tokens, q_heads, head_dim], slot i's
  /// queries (its last plan.tokens tokens, causal) one after the other.
  void attend(const DecodePlan& plan, int layer, const void* q, void* out, DType q_type, cudaStream_t stream);
  /// Rollback for the plan's slots, capturable: slot i's sequence gives back
  /// n_rejected[i] tokens in every layer (device int32 [plan.batch], e.g.
  /// written by the engine's draft verification; 0 or an idle slot:
  /// nothing). Allowed as for rollback(); a refused one leaves that sequence
  /// as it was and check() reports it.
  void rollback(const DecodePlan& plan, const int32_t* n_rejected, cudaStream_t stream);
  /// Synchronizes `stream`, then throws kvcomp::Error if device work failed
  /// (pool full, max_tokens_per_seq reached) naming the sequences and
  /// layers; the records are cleared by the throw.
  void check(cudaStream_t stream);

  /// Synchronizes the device.
  Stats stats() const;

  /// A copy of one stored block (synchronizes `stream`): for inspection,
  /// export and tests. `block` counts the sequence's closed blocks. With
  /// Config::transform = Hadamard it holds the rotated values (x R).
  std::vector<uint8_t> read_block(int layer, int seq, int kv_head, int64_t block, Kind kind,
                                  cudaStream_t stream) const;
  /// The codebook a layer's head uses for K or V (after its first block).
  /// Synchronizes the device (the tables are built by queued device work).
  Codebook codebook(int layer, int kv_head, Kind kind) const;

 private:
  friend struct detail::CacheInternals;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvcomp
