// kvcomp::Cache (include/kvcomp/cache.hpp): the facade. It validates the
// configuration and every call's arguments, owns the device buffers (Impl),
// keeps each sequence's token counts and pool extents, and orchestrates the
// store path (append) and the fused attention (attend) on the caller's stream.
// The parts live beside it: device_buffer.hpp (RAII device/pinned memory),
// pool_allocator (the pool's free space), layer_codebooks (building and
// reading a layer's codebooks), config_check (what a Config may hold), store_plan (an append's jobs, tail copies and
// pool placement). A call that throws leaves the cache as it was.
#include "kvcomp/cache.hpp"
#include "cache_internals.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "config_check.hpp"
#include "device_buffer.hpp"
#include "kvcomp/codebook.hpp"
#include "kvcomp/transform.hpp"
#include "launch.hpp"
#include "layer_codebooks.hpp"
#include "pool_allocator.hpp"
#include "store_plan.hpp"

namespace kvcomp {

using detail::check_cuda;
using detail::DeviceBuffer;
using detail::Extent;
using detail::PinnedBuffer;
using detail::PoolAllocator;
using format::BlockRef;

namespace {

std::string str(long long v) { return std::to_string(v); }
using detail::attend_batch_limit;

}  // namespace

struct Cache::Impl {
  Config cfg;
  int T, D, H, G;
  int max_blocks;
  int sms = 132;
  int ctas_per_sm = 2;

  DeviceBuffer<uint8_t> pool;             // pool_capacity bytes + decoder overread room
  size_t pool_capacity = 0;
  DeviceBuffer<BlockRef> table;           // [layer][slot][max_blocks][H]
  DeviceBuffer<uint8_t> tails;            // [layer][K|V][slot][H][T][D] of the input type: see tail_ptr
  DeviceBuffer<CodebookTables> books;     // [layer][H][K|V]
  DeviceBuffer<float> part;               // attention workspace
  int part_splits = 0;
  PoolAllocator alloc;

  struct Seq {
    bool live = false;
    std::vector<int64_t> tokens;               // per layer
    std::vector<std::vector<Extent>> extents;  // per layer
  };
  std::vector<Seq> seqs;
  std::vector<bool> layer_has_books;
  std::vector<size_t> layer_compressed;

  // Scratch for append, grown on demand.
  DeviceBuffer<detail::StoreJob> d_jobs;
  DeviceBuffer<detail::TailCopy> d_copies;
  DeviceBuffer<uint32_t> d_sizes, d_offsets;
  DeviceBuffer<int64_t> d_bases;
  DeviceBuffer<uint8_t> d_scan;
  DeviceBuffer<unsigned long long> d_hist;  // [layer][H][K|V][kLowBitChoices][kNumSymbols]
  DeviceBuffer<int32_t> d_ready;            // [layer]: codebooks built (launch_build_codebooks)
  DeviceBuffer<uint8_t> d_rotated;  // Transform::Hadamard: K then V rows, [tokens][H][D] of dtype
  PinnedBuffer h_stage;

  explicit Impl(const Config& c)
      : cfg(c), T(c.block_tokens), D(c.head_dim), H(c.kv_heads), G(c.q_heads / c.kv_heads),
        max_blocks((c.max_tokens_per_seq + c.block_tokens - 1) / c.block_tokens),
        alloc(c.pool_bytes / format::kBlockAlign) {
    int dev = 0;
    check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "device attribute");
    pool_capacity = c.pool_bytes / format::kBlockAlign * format::kBlockAlign;
    // The fused kernel's decoders may read a little past a block: the pool is followed by that much.
    pool.allocate(pool_capacity + detail::kDecodeOverread, "the compressed pool");
    table.allocate(size_t(c.layers) * c.max_seqs * max_blocks * H, "block tables");
    tails.allocate(size_t(c.layers) * c.max_seqs * H * 2 * T * D * dtype_size(c.dtype), "tail buffers");
    books.allocate(size_t(c.layers) * H * 2, "codebook tables");
    ctas_per_sm = detail::attention_ctas_per_sm(D, G);
    part_splits = detail::plan_splits(max_blocks + 1, 1, H, sms, ctas_per_sm).splits;
    part.allocate(size_t(attend_batch_limit(c)) * c.q_heads *
                      part_splits * (D + 2), "attention workspace");
    seqs.resize(c.max_seqs);
    layer_has_books.assign(c.layers, false);
    layer_compressed.assign(c.layers, 0);
  }

  ErrorBound bound(int layer, int head, Kind kind) const {
    ErrorBound b = kind == Kind::Key ? cfg.k_bound : cfg.v_bound;
    for (const auto& o : cfg.overrides)
      if (o.layer == layer && (o.kv_head == -1 || o.kv_head == head)) b = kind == Kind::Key ? o.k : o.v;
    return b;
  }
  /// Where tail rows are: see TailLayout (store_plan.hpp).
  detail::TailLayout tail_layout() const { return {tails.ptr, cfg.max_seqs, H, T, D, dtype_size(cfg.dtype)}; }
  /// Tail row `row` of (layer, slot, head, kind); tails hold the input's type.
  uint8_t* tail_ptr(int layer, int slot, int head, Kind kind, int row = 0) const {
    return tail_layout().row_ptr(layer, slot, head, kind, row);
  }
  const Seq& seq(int id) const {
    if (id < 0 || id >= int(seqs.size()) || !seqs[id].live) throw Error("unknown or removed sequence id " + str(id));
    return seqs[id];
  }
  void check_layer(int layer) const {
    if (layer < 0 || layer >= cfg.layers)
      throw Error("layer " + str(layer) + " out of range [0, " + str(cfg.layers) + ")");
  }
};

Cache::Cache(const Config& config) {
  detail::validate(config);
  impl_ = std::make_unique<Impl>(config);
}
Cache::~Cache() = default;
Cache::Cache(Cache&&) noexcept = default;
Cache& Cache::operator=(Cache&&) noexcept = default;

const Config& Cache::config() const { return impl_->cfg; }

int Cache::add_sequence() {
  auto& seqs = impl_->seqs;
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (seqs[i].live) continue;
    seqs[i].live = true;
    seqs[i].tokens.assign(impl_->cfg.layers, 0);
    seqs[i].extents.assign(impl_->cfg.layers, {});
    return int(i);
  }
  throw Error("all " + str(impl_->cfg.max_seqs) + " sequence slots are in use (config.max_seqs)");
}

void Cache::remove_sequence(int id) {
  impl_->seq(id);
  auto& s = impl_->seqs[id];
  for (int l = 0; l < impl_->cfg.layers; ++l)
    for (const Extent& e : s.extents[l]) {
      impl_->alloc.release(e.at16, e.units16);
      impl_->layer_compressed[l] -= e.units16 * format::kBlockAlign;
    }
  s = Impl::Seq{};
}

int64_t Cache::tokens(int seq, int layer) const {
  impl_->check_layer(layer);
  return impl_->seq(seq).tokens[layer];
}

void Cache::append(int layer, const std::vector<int>& seq_ids, const std::vector<int>& n_tokens, const void* k,
                   const void* v, cudaStream_t stream, int64_t token_stride, int64_t head_stride) {
  Impl& m = *impl_;
  const int T = m.T, D = m.D, H = m.H;
  m.check_layer(layer);
  if (seq_ids.size() != n_tokens.size())
    throw Error("append: " + str(seq_ids.size()) + " sequence ids but " + str(n_tokens.size()) + " token counts");
  if (token_stride < 0) token_stride = int64_t(H) * D;
  if (head_stride < 0) head_stride = D;
  if (head_stride < D && H > 1) throw Error("append: head_stride " + str(head_stride) + " < head_dim " + str(D));
  if (token_stride < D) throw Error("append: token_stride " + str(token_stride) + " < head_dim " + str(D));
  int64_t total = 0;
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    const auto& s = m.seq(seq_ids[i]);
    for (size_t j = 0; j < i; ++j)
      if (seq_ids[j] == seq_ids[i]) throw Error("append: sequence " + str(seq_ids[i]) + " appears twice");
    if (n_tokens[i] < 0) throw Error("append: negative token count " + str(n_tokens[i]));
    if (s.tokens[layer] + n_tokens[i] > m.cfg.max_tokens_per_seq)
      throw Error("append: sequence " + str(seq_ids[i]) + " would exceed max_tokens_per_seq (" +
                  str(m.cfg.max_tokens_per_seq) + ")");
    // Layers are appended in order: a token reaches layer l after layer l - 1.
    if (layer > 0 && s.tokens[layer] + n_tokens[i] > s.tokens[layer - 1])
      throw Error("append: layer " + str(layer) + " of sequence " + str(seq_ids[i]) + " would hold " +
                  str((long long)(s.tokens[layer] + n_tokens[i])) + " tokens, more than layer " + str(layer - 1) +
                  " (" + str((long long)s.tokens[layer - 1]) + "): append the layers of a token in order");
    total += n_tokens[i];
  }
  if (total == 0) return;
  if (!k || !v) throw Error("append: k and v must be device pointers, got null");

  const size_t esz = dtype_size(m.cfg.dtype);
  if (m.cfg.transform == Transform::Hadamard) {
    // Everything below stores x R: rotate the input into contiguous scratch
    // once, then take it as the input (default strides).
    const size_t rows_bytes = size_t(total) * H * D * esz;
    m.d_rotated.reserve(2 * rows_bytes, "append scratch");
    uint8_t* k_rot = m.d_rotated.ptr;
    uint8_t* v_rot = m.d_rotated.ptr + rows_bytes;
    detail::launch_hadamard_rows(m.cfg.dtype, D, k, token_stride, head_stride, total, H, k_rot, stream);
    detail::launch_hadamard_rows(m.cfg.dtype, D, v, token_stride, head_stride, total, H, v_rot, stream);
    k = k_rot;
    v = v_rot;
    token_stride = int64_t(H) * D;
    head_stride = D;
  }

  // Jobs (blocks to close) and tail copies, sequence by sequence.
  detail::AppendRequest req{layer, T, H, m.cfg.max_seqs, m.max_blocks, k, v, token_stride, head_stride, esz,
                            m.tail_layout(), {}, {}, {}};
  for (int h = 0; h < H; ++h) {
    req.k_bounds.push_back(m.bound(layer, h, Kind::Key));
    req.v_bounds.push_back(m.bound(layer, h, Kind::Value));
  }
  for (size_t i = 0; i < seq_ids.size(); ++i)
    req.seqs.push_back({seq_ids[i], m.seqs[seq_ids[i]].tokens[layer], n_tokens[i]});
  const detail::StorePlan plan = detail::plan_store(req);
  const std::vector<detail::StoreJob>& jobs = plan.jobs;
  const std::vector<detail::TailCopy>& copies = plan.copies;

  const int n_jobs = int(jobs.size());
  std::vector<Extent> new_extents(seq_ids.size(), Extent{0, 0});
  if (n_jobs > 0) {
    m.d_jobs.reserve(jobs.size(), "append scratch");
    check_cuda(cudaMemcpyAsync(m.d_jobs.ptr, jobs.data(), jobs.size() * sizeof(jobs[0]), cudaMemcpyHostToDevice, stream),
               "job upload");
    if (!m.layer_has_books[layer]) {
      // Built on the device from the histograms of the blocks this append
      // closes: no host round trip.
      const size_t per_book = size_t(format::kLowBitChoices) * format::kNumSymbols;
      const size_t layer_books = size_t(2) * H, first = size_t(layer) * layer_books;
      m.d_hist.reserve(size_t(m.cfg.layers) * layer_books * per_book, "histogram scratch");
      m.d_ready.reserve(size_t(m.cfg.layers), "codebook flags");
      check_cuda(cudaMemsetAsync(m.d_hist.ptr + first * per_book, 0, layer_books * per_book * sizeof(unsigned long long),
                                 stream),
                 "histogram clear");
      check_cuda(cudaMemsetAsync(m.d_ready.ptr + layer, 0, sizeof(int32_t), stream), "codebook flag clear");
      detail::launch_histogram(m.cfg.dtype, m.d_jobs.ptr, n_jobs, T, D, m.d_hist.ptr, stream);
      detail::launch_build_codebooks(m.d_hist.ptr + first * per_book, int(layer_books), m.books.ptr + first,
                                     m.d_ready.ptr + layer, stream);
      m.layer_has_books[layer] = true;
    }
    const int n_blocks = 2 * n_jobs;
    m.d_sizes.reserve(n_blocks + 1, "append scratch");
    m.d_offsets.reserve(n_blocks + 1, "append scratch");
    m.d_bases.reserve(seq_ids.size(), "append scratch");
    const size_t scan_bytes = detail::scan_workspace_bytes(n_blocks + 1);
    m.d_scan.reserve(scan_bytes, "append scratch");
    check_cuda(cudaMemsetAsync(m.d_sizes.ptr + n_blocks, 0, sizeof(uint32_t), stream), "size clear");
    detail::launch_measure(m.cfg.dtype, m.d_jobs.ptr, n_jobs, T, D, m.books.ptr, m.d_sizes.ptr, stream);
    detail::launch_scan(m.d_sizes.ptr, m.d_offsets.ptr, n_blocks + 1, m.d_scan.ptr, m.d_scan.count, stream);
    m.h_stage.reserve((n_blocks + 1) * sizeof(uint32_t));
    uint32_t* offsets = static_cast<uint32_t*>(m.h_stage.ptr);
    check_cuda(cudaMemcpyAsync(offsets, m.d_offsets.ptr, (n_blocks + 1) * sizeof(uint32_t), cudaMemcpyDeviceToHost,
                               stream),
               "offset copy");
    check_cuda(cudaStreamSynchronize(stream), "append sync");
    // Place every sequence's blocks in one extent; all or nothing.
    detail::BlockPlacement placed = detail::place_closed_blocks(m.alloc, plan.seq_jobs, offsets, m.pool_capacity);
    new_extents = std::move(placed.extents);
    const std::vector<int64_t>& bases = placed.bases;
    check_cuda(cudaMemcpyAsync(m.d_bases.ptr, bases.data(), bases.size() * sizeof(int64_t), cudaMemcpyHostToDevice,
                               stream),
               "extent upload");
    detail::launch_encode(m.cfg.dtype, m.d_jobs.ptr, n_jobs, T, D, m.books.ptr, m.d_sizes.ptr, m.d_offsets.ptr,
                          m.d_bases.ptr, m.pool.ptr, m.table.ptr, stream);
  }
  if (!copies.empty()) {
    m.d_copies.reserve(copies.size(), "append scratch");
    check_cuda(cudaMemcpyAsync(m.d_copies.ptr, copies.data(), copies.size() * sizeof(copies[0]),
                               cudaMemcpyHostToDevice, stream),
               "tail job upload");
    detail::launch_tail_copy(m.cfg.dtype, m.d_copies.ptr, int(copies.size()), D, stream);
  }
  // Pageable uploads above were staged by the runtime before returning, so
  // the host vectors may go. Commit the bookkeeping.
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    auto& s = m.seqs[seq_ids[i]];
    s.tokens[layer] += n_tokens[i];
    if (new_extents[i].units16) {
      s.extents[layer].push_back(new_extents[i]);
      m.layer_compressed[layer] += new_extents[i].units16 * format::kBlockAlign;
    }
  }
}

void Cache::attend(int layer, const std::vector<int>& seq_ids, const void* q, void* out, DType q_type,
                   cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_layer(layer);
  if (seq_ids.empty()) return;
  if (int(seq_ids.size()) > attend_batch_limit(m.cfg))
    throw Error("attend: batch of " + str(seq_ids.size()) + " exceeds " + str(attend_batch_limit(m.cfg)) +
                " (Config::max_attend_batch)");
  if (q_type != DType::F16 && q_type != DType::BF16) throw Error("attend: q/out must be float16 or bfloat16");
  if (!q || !out) throw Error("attend: q and out must be device pointers, got null");
  detail::AttendParams p{};
  int max_units = 0;
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    const auto& s = m.seq(seq_ids[i]);
    p.seqs[i] = {seq_ids[i], int32_t(s.tokens[layer])};
    max_units = std::max(max_units, int((s.tokens[layer] + m.T - 1) / m.T));
  }
  const auto plan = detail::plan_splits(max_units, int(seq_ids.size()), m.H, m.sms, m.ctas_per_sm);
  // The workspace holds part_splits splits for every sequence of a batch.
  const int per = std::max(plan.units_per_split, (max_units + m.part_splits - 1) / m.part_splits);
  p.units_per_split = per;
  p.splits = std::max(1, (max_units + per - 1) / per);
  p.pool = m.pool.ptr;
  p.pool_units16 = m.pool_capacity / format::kBlockAlign;
  p.table = m.table.ptr + size_t(layer) * m.cfg.max_seqs * m.max_blocks * m.H;
  p.books = m.books.ptr + size_t(layer) * m.H * 2;
  p.k_tail = m.tail_ptr(layer, 0, 0, Kind::Key);
  p.v_tail = m.tail_ptr(layer, 0, 0, Kind::Value);
  p.q = q;
  p.out = out;
  p.part = m.part.ptr;
  p.tokens_per_block = m.T;
  p.kv_heads = m.H;
  p.max_blocks = m.max_blocks;
  p.scale_log2 = float(1.4426950408889634 / std::sqrt(double(m.D)));
  p.tail_dtype = int32_t(m.cfg.dtype);
  p.transform = int32_t(m.cfg.transform);
  p.batch = int(seq_ids.size());
  detail::launch_attention(q_type, m.D, m.G, p, stream);
}

std::vector<uint8_t> Cache::read_block(int layer, int seq, int kv_head, int64_t block, Kind kind,
                                       cudaStream_t stream) const {
  const Impl& m = *impl_;
  m.check_layer(layer);
  const auto& s = m.seq(seq);
  if (kv_head < 0 || kv_head >= m.H) throw Error("read_block: kv head " + str(kv_head) + " out of range");
  if (block < 0 || block >= s.tokens[layer] / m.T) throw Error("read_block: block " + str(block) + " not stored");
  BlockRef r;
  const size_t idx = ((size_t(layer) * m.cfg.max_seqs + seq) * m.max_blocks + block) * m.H + kv_head;
  check_cuda(cudaMemcpyAsync(&r, m.table.ptr + idx, sizeof(r), cudaMemcpyDeviceToHost, stream), "block ref copy");
  check_cuda(cudaStreamSynchronize(stream), "read_block sync");
  const size_t off = size_t(r.offset16) * 16 + (kind == Kind::Key ? 0 : size_t(r.k_size16) * 16);
  std::vector<uint8_t> bytes(size_t(kind == Kind::Key ? r.k_size16 : r.v_size16) * 16);
  check_cuda(cudaMemcpyAsync(bytes.data(), m.pool.ptr + off, bytes.size(), cudaMemcpyDeviceToHost, stream), "block copy");
  check_cuda(cudaStreamSynchronize(stream), "read_block sync");
  return bytes;
}

Codebook Cache::codebook(int layer, int kv_head, Kind kind) const {
  const Impl& m = *impl_;
  m.check_layer(layer);
  if (kv_head < 0 || kv_head >= m.H) throw Error("codebook: kv head " + str(kv_head) + " out of range");
  if (!m.layer_has_books[layer]) throw Error("codebook: layer " + str(layer) + " has no codebooks yet");
  // The tables are built by device work queued on the caller's stream.
  check_cuda(cudaDeviceSynchronize(), "codebook sync");
  return detail::read_codebook(m.books.ptr + (size_t(layer) * m.H + kv_head) * 2 + int(kind));
}

Stats Cache::stats() const {
  const Impl& m = *impl_;
  Stats st;
  st.per_layer.resize(m.cfg.layers);
  for (const auto& s : m.seqs) {
    if (!s.live) continue;
    for (int l = 0; l < m.cfg.layers; ++l) {
      st.per_layer[l].tokens += size_t(s.tokens[l]);
      st.per_layer[l].tail_tokens += size_t(s.tokens[l] % m.T);
    }
  }
  for (int l = 0; l < m.cfg.layers; ++l) {
    st.per_layer[l].compressed_bytes = m.layer_compressed[l];
    st.compressed_bytes += m.layer_compressed[l];
    st.tokens += st.per_layer[l].tokens;
    st.tail_bytes += st.per_layer[l].tail_tokens * size_t(m.H) * m.D * 2 * dtype_size(m.cfg.dtype);
  }
  st.metadata_bytes = m.table.count * sizeof(BlockRef) + m.books.count * sizeof(CodebookTables) +
                      m.tails.count;
  st.pool_bytes_in_use = m.alloc.used() * format::kBlockAlign;
  st.pool_capacity = m.pool_capacity;
  const double fp16 = double(st.tokens) * m.H * m.D * 2 * 2;
  const double held = double(st.compressed_bytes + st.tail_bytes);
  st.ratio_vs_fp16 = held > 0 ? fp16 / held : 0.0;
  return st;
}

}  // namespace kvcomp

namespace kvcomp {
namespace detail {

uint8_t* CacheInternals::pool(Cache& c) { return c.impl_->pool.ptr; }
size_t CacheInternals::pool_bytes(const Cache& c) { return c.impl_->pool.count; }
format::BlockRef* CacheInternals::table(Cache& c, int layer) {
  c.impl_->check_layer(layer);
  return c.impl_->table.ptr + size_t(layer) * table_entries(c);
}
size_t CacheInternals::table_entries(const Cache& c) {
  const auto& m = *c.impl_;
  return size_t(m.cfg.max_seqs) * m.max_blocks * m.H;
}

}  // namespace detail
}  // namespace kvcomp
