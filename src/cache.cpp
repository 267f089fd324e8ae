// kvcomp::Cache (include/kvcomp/cache.hpp): the facade. It validates the
// configuration and every call's arguments and orchestrates the store path
// and the fused attention on the caller's stream. Its parts: cache_impl.hpp
// (the buffers and host bookkeeping), cache_plan.cpp (plan-based decode),
// cache_failures.cpp (device failure records -> kvcomp::Error), store_plan
// (an eager append's jobs), pool_pages (the paged pool), layer_codebooks,
// config_check. A call that throws leaves the cache as it was.
#include "kvcomp/cache.hpp"
#include "cache_internals.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "cache_impl.hpp"
#include "config_check.hpp"
#include "kvcomp/codebook.hpp"
#include "launch.hpp"
#include "layer_codebooks.hpp"
#include "store_plan.hpp"

namespace kvcomp {

using detail::check_cuda;
using format::BlockRef;

namespace {
std::string str(long long v) { return std::to_string(v); }

/// PoolState::page_classes: 2 when windowed and full-attention layers are mixed (each class fills its own pages).
int page_classes_of(const Config& c) {
  bool windowed = false, full = false;
  for (int l = 0; l < c.layers; ++l) {
    const int w = c.layer_windows.empty() ? c.window : c.layer_windows[size_t(l)];
    (w > 0 ? windowed : full) = true;
  }
  return windowed && full ? 2 : 1;
}
}  // namespace

Cache::Impl::Impl(const Config& c)
    : cfg(c), T(c.block_tokens), D(c.head_dim), H(c.kv_heads), G(c.q_heads / c.kv_heads), R(c.max_rollback),
      tail_rows(c.max_rollback > 0 ? 2 * c.block_tokens : c.block_tokens),
      max_blocks((c.max_tokens_per_seq + c.block_tokens - 1) / c.block_tokens) {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "device attribute");
  page_classes = page_classes_of(c);
  // Automatic pages: room for two open pages per sequence and page class.
  pages = detail::plan_pages(c.pool_bytes, c.max_seqs * page_classes, T, D, c.pool_page_bytes);
  const size_t pool_bytes = size_t(pages.pages) * pages.page_units16 * format::kBlockAlign;
  // The fused kernel's decoders may read a little past a block: the pool is followed by that much.
  pool.allocate(pool_bytes + detail::kDecodeOverread, "the compressed pool");
  table.allocate(size_t(c.layers) * c.max_seqs * max_blocks * H, "block tables");
  tails.allocate(size_t(c.layers) * c.max_seqs * H * 2 * tail_rows * tail_layout().row_bytes(), "tail buffers");
  books.allocate(size_t(c.layers) * H * 2, "codebook tables");
  for (int t = 0; t < 2; ++t)
    for (int i = 0; i < 3; ++i) {
      const int rows = detail::kMmaRows << t, warps = detail::fused_cta_warps(D, rows, i);
      ctas_per_sm[t][i] = warps > 0 ? detail::attention_ctas_per_sm(D, G, rows, warps) : 0;
      // The most splits any plan takes (one sequence: the smallest CTAs' plan).
      if (ctas_per_sm[t][i] > 0)
        part_splits =
            std::max(part_splits, detail::plan_splits(max_blocks + 1, 1, H, sms, ctas_per_sm[t][i], warps).splits);
    }
  part.allocate(size_t(detail::attend_batch_limit(c)) * c.q_heads * part_splits * (D + 2), "attention workspace");

  const size_t slots = size_t(c.layers) * c.max_seqs;
  free_pages.allocate(pages.pages, "pool page stack");
  free_count.allocate(1, "pool page stack");
  users.allocate(size_t(pages.pages) * user_words(), "pool page users");
  layer_units16.allocate(size_t(pages.pages) * c.layers, "pool page sizes");
  layer_units.allocate(c.layers, "stats scratch");
  std::vector<int32_t> w(c.layers);
  for (int l = 0; l < c.layers; ++l) {
    w[l] = layer_window(l);
    windowed = windowed || w[l] > 0;
  }
  if (windowed) {
    windows.allocate(c.layers, "layer windows");
    alive_pages.allocate((size_t(pages.pages) + 31) / 32, "window scratch");
    check_cuda(cudaMemcpy(windows.ptr, w.data(), w.size() * sizeof(int32_t), cudaMemcpyHostToDevice),
               "cache initialization");
  }
  open_page.allocate(size_t(page_classes) * c.max_seqs, "sequence pages");
  open_fill16.allocate(size_t(page_classes) * c.max_seqs, "sequence pages");
  tokens.allocate(slots, "token counts");
  closed.allocate(slots, "block counts");
  high.allocate(slots, "token counts");
  fail.allocate(slots, "failure records");
  const size_t per_layer_hist = size_t(H) * 2 * format::kLowBitChoices * format::kNumSymbols;
  hist.allocate(size_t(c.layers) * per_layer_hist, "histogram scratch");
  ready.allocate(c.layers, "codebook flags");
  bounds.allocate(size_t(c.layers) * H * 2, "error bounds");
  fail_flag.reserve(sizeof(int32_t));
  *static_cast<volatile int32_t*>(fail_flag.ptr) = 0;
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&fail_flag_device), fail_flag.ptr, 0),
             "failure flag address");

  // Every page free (page 0 on top), used by no one, nothing stored.
  std::vector<int32_t> stack(pages.pages), none(open_page.count, -1);
  for (int32_t i = 0; i < pages.pages; ++i) stack[i] = pages.pages - 1 - i;
  std::vector<ErrorBound> b(bounds.count);
  for (int l = 0; l < c.layers; ++l)
    for (int h = 0; h < H; ++h) {
      b[(size_t(l) * H + h) * 2] = bound(l, h, Kind::Key);
      b[(size_t(l) * H + h) * 2 + 1] = bound(l, h, Kind::Value);
    }
  auto up = [](void* dst, const void* src, size_t bytes) {
    check_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cache initialization");
  };
  up(free_pages.ptr, stack.data(), stack.size() * sizeof(int32_t));
  up(free_count.ptr, &pages.pages, sizeof(int32_t));
  up(open_page.ptr, none.data(), none.size() * sizeof(int32_t));
  up(bounds.ptr, b.data(), b.size() * sizeof(ErrorBound));
  auto zero = [](void* p, size_t bytes) { check_cuda(cudaMemset(p, 0, bytes), "cache initialization"); };
  zero(open_fill16.ptr, open_fill16.count * sizeof(uint32_t));
  zero(tokens.ptr, tokens.count * sizeof(int32_t));
  zero(closed.ptr, closed.count * sizeof(int32_t));
  zero(high.ptr, high.count * sizeof(int32_t));
  zero(users.ptr, users.count * sizeof(uint32_t));
  zero(layer_units16.ptr, layer_units16.count * sizeof(uint32_t));
  zero(fail.ptr, fail.count * sizeof(int32_t));
  zero(hist.ptr, hist.count * sizeof(unsigned long long));
  zero(ready.ptr, ready.count * sizeof(int32_t));
  check_cuda(cudaDeviceSynchronize(), "cache initialization");

  live.assign(c.max_seqs, false);
  h_tokens.assign(slots, 0);
  h_closed.assign(slots, 0);
  h_high.assign(slots, 0);
  books_built.assign(c.layers, false);
}

detail::SeqState Cache::Impl::seq_state() const {
  return {tokens.ptr, closed.ptr, high.ptr, fail.ptr, fail_flag_device, cfg.max_seqs, cfg.max_tokens_per_seq,
          cfg.layers};
}

ErrorBound Cache::Impl::bound(int layer, int head, Kind kind) const {
  ErrorBound b = kind == Kind::Key ? cfg.k_bound : cfg.v_bound;
  for (const auto& o : cfg.overrides)
    if (o.layer == layer && (o.kv_head == -1 || o.kv_head == head)) b = kind == Kind::Key ? o.k : o.v;
  return b;
}

void Cache::Impl::check_seq(int id) const {
  if (id < 0 || id >= cfg.max_seqs || !live[id]) throw Error("unknown or removed sequence id " + str(id));
}

void Cache::Impl::resolve_strides(int64_t& token_stride, int64_t& head_stride) const {
  if (token_stride < 0) token_stride = int64_t(H) * D;
  if (head_stride < 0) head_stride = D;
  if (head_stride < D && H > 1) throw Error("append: head_stride " + str(head_stride) + " < head_dim " + str(D));
  if (token_stride < D) throw Error("append: token_stride " + str(token_stride) + " < head_dim " + str(D));
}

void Cache::Impl::check_attend_io(const void* q, const void* out, DType q_type) {
  if (q_type != DType::F16 && q_type != DType::BF16) throw Error("attend: q/out must be float16 or bfloat16");
  if (!q || !out) throw Error("attend: q and out must be device pointers, got null");
}

void Cache::Impl::check_layer(int layer) const {
  if (layer < 0 || layer >= cfg.layers)
    throw Error("layer " + str(layer) + " out of range [0, " + str(cfg.layers) + ")");
}

void Cache::Impl::refresh_tokens() {
  if (!tokens_stale) return;
  check_cuda(cudaDeviceSynchronize(), "token count sync");
  check_cuda(cudaMemcpy(h_tokens.data(), tokens.ptr, h_tokens.size() * sizeof(int32_t), cudaMemcpyDeviceToHost),
             "token count copy");
  check_cuda(cudaMemcpy(h_closed.data(), closed.ptr, h_closed.size() * sizeof(int32_t), cudaMemcpyDeviceToHost),
             "block count copy");
  check_cuda(cudaMemcpy(h_high.data(), high.ptr, h_high.size() * sizeof(int32_t), cudaMemcpyDeviceToHost),
             "token count copy");
  tokens_stale = false;
}

void Cache::Impl::fill_attend(int layer, const void* q, void* out, detail::AttendParams& p) const {
  p.pool = pool.ptr;
  p.pool_units16 = uint64_t(pages.pages) * pages.page_units16;
  p.table = table.ptr + size_t(layer) * cfg.max_seqs * max_blocks * H;
  p.books = books.ptr + size_t(layer) * H * 2;
  p.k_tail = tail_layout().row_ptr(layer, 0, 0, Kind::Key);
  p.v_tail = tail_layout().row_ptr(layer, 0, 0, Kind::Value);
  p.q = q;
  p.out = out;
  p.part = part.ptr;
  p.tokens_per_block = T;
  p.kv_heads = H;
  p.max_blocks = max_blocks;
  p.scale_log2 = float(1.4426950408889634 / std::sqrt(double(D)));
  p.tail_dtype = int32_t(cfg.dtype);
  p.tail_codes = tail_layout().codes;
  p.tail_row_bytes = int32_t(tail_layout().row_bytes());
  p.transform = int32_t(cfg.transform);
  p.tail_rows = tail_rows;
  p.lengths = tokens.ptr + size_t(layer) * cfg.max_seqs;
  p.closed = closed.ptr + size_t(layer) * cfg.max_seqs;
  p.window = layer_window(layer);
  p.sinks = p.window > 0 ? cfg.sink_tokens : 0;
}

void Cache::Impl::rotate_input(AppendScratch& s, int64_t rows, const void*& k, const void*& v, int64_t& token_stride,
                               int64_t& head_stride, cudaStream_t stream) {
  // Everything below stores x R: rotate the input into contiguous scratch
  // once, then take it as the input (default strides).
  const size_t rows_bytes = size_t(rows) * H * D * dtype_size(cfg.dtype);
  s.rotated.reserve(2 * rows_bytes, "append scratch");
  uint8_t* k_rot = s.rotated.ptr;
  uint8_t* v_rot = s.rotated.ptr + rows_bytes;
  detail::launch_hadamard_rows(cfg.dtype, D, k, token_stride, head_stride, rows, H, k_rot, stream);
  detail::launch_hadamard_rows(cfg.dtype, D, v, token_stride, head_stride, rows, H, v_rot, stream);
  k = k_rot;
  v = v_rot;
  token_stride = int64_t(H) * D;
  head_stride = D;
}

int32_t Cache::Impl::trim_queries() const { return detail::attend_batch_limit(cfg) + R; }

bool Cache::Impl::behind_window(int seq, int layer, int64_t block) const {
  const int32_t first = detail::first_live_block(host_tokens(seq, layer), layer_window(layer), trim_queries(), T);
  return block < first && block >= detail::sink_blocks(cfg.sink_tokens, T);
}

void Cache::Impl::run_store(int layer, AppendScratch& s, int n_jobs, int n_entries, int n_copies, bool build_books,
                            bool trim_every_call, cudaStream_t stream) {
  const int warps = detail::store_warps(n_jobs, sms);  // the same for measure and encode
  if (n_jobs > 0) {
    if (build_books) {
      // Built on the device from the histograms of the first blocks the layer closes.
      const size_t per_book = size_t(format::kLowBitChoices) * format::kNumSymbols;
      const size_t layer_books = size_t(2) * H, first = size_t(layer) * layer_books;
      detail::launch_histogram(cfg.dtype, s.jobs.ptr, n_jobs, T, D, hist.ptr, stream, ready.ptr + layer);
      detail::launch_build_codebooks(hist.ptr + first * per_book, int(layer_books), books.ptr + first,
                                     ready.ptr + layer, stream);
    }
    detail::launch_measure(cfg.dtype, warps, s.jobs.ptr, n_jobs, T, D, books.ptr, s.sizes16.ptr, s.seg_bits.ptr,
                           stream);
  }
  detail::launch_place(s.entries.ptr, n_entries, layer, s.sizes16.ptr, s.pair_at16.ptr, s.entry_ok.ptr,
                       s.page_base.ptr, place_state(layer), seq_state(), stream);
  if (n_jobs > 0)
    detail::launch_encode(cfg.dtype, warps, s.jobs.ptr, n_jobs, T, D, books.ptr, s.sizes16.ptr, s.seg_bits.ptr,
                          s.pair_at16.ptr, s.entry_ok.ptr, pool.ptr, table.ptr, stream);
  detail::launch_tail_copy(cfg.dtype, tail_layout().codes, s.copies.ptr, n_copies, D, s.entry_ok.ptr, stream);
  if (windowed && layer == cfg.layers - 1) {
    const detail::WindowTrim w{table.ptr, windows.ptr, alive_pages.ptr, max_blocks, H, T, cfg.sink_tokens,
                               trim_queries()};
    detail::launch_trim(s.entries.ptr, n_entries, trim_every_call, w, pool_state(), seq_state(), stream);
  }
}

Cache::Cache(const Config& config) {
  detail::validate(config);
  impl_ = std::make_unique<Impl>(config);
}
Cache::~Cache() = default;
Cache::Cache(Cache&&) noexcept = default;
Cache& Cache::operator=(Cache&&) noexcept = default;

const Config& Cache::config() const { return impl_->cfg; }

int Cache::add_sequence() {
  Impl& m = *impl_;
  m.poll_failures("add_sequence");
  for (int i = 0; i < m.cfg.max_seqs; ++i) {
    if (m.live[i]) continue;
    m.live[i] = true;  // the device state of a free slot is empty (construction, remove_sequence)
    return i;
  }
  throw Error("all " + str(m.cfg.max_seqs) + " sequence slots are in use (config.max_seqs)");
}

int Cache::fork(int seq, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_seq(seq);
  m.poll_failures("fork");
  m.refresh_tokens();
  int child = -1;
  for (int i = 0; i < m.cfg.max_seqs && child < 0; ++i)
    if (!m.live[i]) child = i;
  if (child < 0) throw Error("fork: all " + str(m.cfg.max_seqs) + " sequence slots are in use (config.max_seqs)");
  // The child's block table rows and tails are the parent's: [layer][slot][...] rows, one per layer
  // (tails: per layer and kind).
  const size_t table_row = size_t(m.max_blocks) * m.H * sizeof(BlockRef);
  check_cuda(cudaMemcpy2DAsync(m.table.ptr + size_t(child) * m.max_blocks * m.H, m.cfg.max_seqs * table_row,
                               m.table.ptr + size_t(seq) * m.max_blocks * m.H, m.cfg.max_seqs * table_row, table_row,
                               m.cfg.layers, cudaMemcpyDeviceToDevice, stream),
             "fork: block table copy");
  const detail::TailLayout tl = m.tail_layout();
  const size_t tail_row = size_t(m.H) * m.tail_rows * tl.row_bytes();
  check_cuda(cudaMemcpy2DAsync(tl.row_ptr(0, child, 0, Kind::Key), m.cfg.max_seqs * tail_row,
                               tl.row_ptr(0, seq, 0, Kind::Key), m.cfg.max_seqs * tail_row, tail_row,
                               size_t(m.cfg.layers) * 2, cudaMemcpyDeviceToDevice, stream),
             "fork: tail copy");
  detail::launch_fork(seq, child, m.pool_state(), m.seq_state(), stream);
  m.live[child] = true;
  for (int l = 0; l < m.cfg.layers; ++l) {
    m.h_tokens[m.at(l, child)] = m.h_tokens[m.at(l, seq)];
    m.h_closed[m.at(l, child)] = m.h_closed[m.at(l, seq)];
    m.h_high[m.at(l, child)] = m.h_high[m.at(l, seq)];
  }
  return child;
}

void Cache::remove_sequence(int id, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_seq(id);
  detail::launch_release(id, m.pool_state(), m.seq_state(), stream);
  m.live[id] = false;
  for (int l = 0; l < m.cfg.layers; ++l) m.h_tokens[m.at(l, id)] = m.h_closed[m.at(l, id)] = m.h_high[m.at(l, id)] = 0;
}

void Cache::rollback(int seq, int n_tokens, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_seq(seq);
  if (n_tokens < 0) throw Error("rollback: negative token count " + str(n_tokens));
  // The host's counts must be the device's: appends queued on `stream` could still fail.
  check_cuda(cudaStreamSynchronize(stream), "rollback sync");
  m.poll_failures("rollback");
  m.tokens_stale = true;
  m.refresh_tokens();
  if (n_tokens == 0) return;
  for (int l = 1; l < m.cfg.layers; ++l)  // the same n leaves every layer's tokens its own otherwise
    if (m.host_tokens(seq, l) != m.host_tokens(seq, 0))
      throw Error("rollback: sequence " + str(seq) + " holds " + str(m.host_tokens(seq, 0)) + " tokens in layer 0 but " +
                  str(m.host_tokens(seq, l)) + " in layer " + str(l) +
                  ": finish the step first (append the missing layers, or replay a step that failed part way)");
  for (int l = 0; l < m.cfg.layers; ++l) {
    // Blocks closed R tokens behind the most tokens held, and window trims kept R tokens of room
    // (Impl::trim_queries): no count may go below high - R (so the n tokens are tail tokens).
    const int32_t L = m.host_tokens(seq, l), high = std::max(m.h_high[m.at(l, seq)], L);
    const int32_t room = std::min(L, m.R - (high - L));
    if (n_tokens > room)
      throw Error("rollback: sequence " + str(seq) + " can take back at most " + str(std::max(room, 0)) +
                  " tokens in layer " + str(l) + " (it holds " + str(L) + "; Config::max_rollback = " + str(m.R) +
                  " counts from the most it held, " + str(high) + ")");
  }
  detail::launch_rollback(nullptr, nullptr, 1, seq, n_tokens, m.R, m.T, m.seq_state(), stream);
  for (int l = 0; l < m.cfg.layers; ++l) {
    int32_t& high = m.h_high[m.at(l, seq)];
    high = std::max(high, m.h_tokens[m.at(l, seq)]);
    m.h_tokens[m.at(l, seq)] -= n_tokens;
  }
}

int64_t Cache::tokens(int seq, int layer) const {
  Impl& m = *impl_;
  m.check_layer(layer);
  m.check_seq(seq);
  m.poll_failures("tokens");
  m.tokens_stale = true;  // the device is the truth: read it
  m.refresh_tokens();
  return m.host_tokens(seq, layer);
}

namespace {
constexpr size_t kHostJobsMax = 256;  // appends of more jobs make them on the device (append_jobs_kernel)
}  // namespace

void Cache::append(int layer, const std::vector<int>& seq_ids, const std::vector<int>& n_tokens, const void* k,
                   const void* v, cudaStream_t stream, int64_t token_stride, int64_t head_stride) {
  Impl& m = *impl_;
  const int T = m.T, H = m.H;
  m.check_layer(layer);
  m.poll_failures("append");
  m.refresh_tokens();
  if (seq_ids.size() != n_tokens.size())
    throw Error("append: " + str(seq_ids.size()) + " sequence ids but " + str(n_tokens.size()) + " token counts");
  m.resolve_strides(token_stride, head_stride);
  int64_t total = 0;
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    m.check_seq(seq_ids[i]);
    for (size_t j = 0; j < i; ++j)
      if (seq_ids[j] == seq_ids[i]) throw Error("append: sequence " + str(seq_ids[i]) + " appears twice");
    if (n_tokens[i] < 0) throw Error("append: negative token count " + str(n_tokens[i]));
    const int64_t have = m.host_tokens(seq_ids[i], layer);
    if (have + n_tokens[i] > m.cfg.max_tokens_per_seq)
      throw Error("append: sequence " + str(seq_ids[i]) + " would exceed max_tokens_per_seq (" +
                  str(m.cfg.max_tokens_per_seq) + ")");
    // Layers are appended in order: a token reaches layer l after layer l - 1.
    if (layer > 0 && have + n_tokens[i] > m.host_tokens(seq_ids[i], layer - 1))
      throw Error("append: layer " + str(layer) + " of sequence " + str(seq_ids[i]) + " would hold " +
                  str((long long)(have + n_tokens[i])) + " tokens, more than layer " + str(layer - 1) + " (" +
                  str((long long)m.host_tokens(seq_ids[i], layer - 1)) + "): append the layers of a token in order");
    total += n_tokens[i];
  }
  if (total == 0) return;
  if (!k || !v) throw Error("append: k and v must be device pointers, got null");
  AppendScratch& s = m.eager;
  if (m.cfg.transform == Transform::Hadamard) m.rotate_input(s, total, k, v, token_stride, head_stride, stream);

  // Jobs (blocks to close), tail copies and entries, sequence by sequence.
  detail::AppendRequest req{layer, T, H, m.cfg.max_seqs, m.max_blocks, m.R, k, v, token_stride, head_stride,
                            dtype_size(m.cfg.dtype), m.tail_layout(), {}, {}, {}};
  for (int h = 0; h < H; ++h) {
    req.k_bounds.push_back(m.bound(layer, h, Kind::Key));
    req.v_bounds.push_back(m.bound(layer, h, Kind::Value));
  }
  for (size_t i = 0; i < seq_ids.size(); ++i)
    req.seqs.push_back({seq_ids[i], m.host_tokens(seq_ids[i], layer), m.host_closed(seq_ids[i], layer), n_tokens[i]});
  // The jobs (72 bytes each) are made on the host for a few blocks (a decode step), on the device for
  // many (a prefill: ~20 ns a job on the host, plus the upload, against one small kernel launch).
  const bool jobs_on_device = detail::count_jobs(req) > kHostJobsMax;
  detail::plan_store(req, s.plan, !jobs_on_device);
  const detail::StorePlan& plan = s.plan;
  s.reserve(std::max<size_t>(plan.n_jobs, 1), std::max<size_t>(plan.copies.size(), 1), plan.entries.size(),
            "append scratch");
  auto upload = [&](void* dst, const void* src, size_t bytes) {
    if (bytes)
      check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream), "append job upload");
  };
  upload(s.jobs.ptr, plan.jobs.data(), plan.jobs.size() * sizeof(plan.jobs[0]));  // none if made on the device
  upload(s.copies.ptr, plan.copies.data(), plan.copies.size() * sizeof(plan.copies[0]));
  upload(s.entries.ptr, plan.entries.data(), plan.entries.size() * sizeof(plan.entries[0]));
  // Pageable uploads are staged by the runtime before returning: the host vectors may be reused.
  if (jobs_on_device) {
    upload(s.entry_tok0.ptr, plan.tok0.data(), plan.tok0.size() * sizeof(plan.tok0[0]));
    detail::launch_append_jobs({req.geometry(), m.bounds.ptr + size_t(layer) * H * 2, s.entries.ptr,
                                s.entry_tok0.ptr, int32_t(plan.entries.size()), uint32_t(plan.n_jobs), s.jobs.ptr},
                               stream);
  }
  const bool build = plan.n_jobs > 0 && !m.books_built[layer];
  m.run_store(layer, s, int(plan.n_jobs), int(plan.entries.size()), int(plan.copies.size()), build, true, stream);
  if (build) m.books_built[layer] = true;  // closed blocks make the build kernels build
  // The mirror assumes success; a failure is reported (poll_failures) and refreshes it.
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    m.h_tokens[m.at(layer, seq_ids[i])] += n_tokens[i];
    m.h_closed[m.at(layer, seq_ids[i])] += plan.entries[i].new_blocks;
  }
}

void Cache::attend(int layer, const std::vector<int>& seq_ids, const void* q, void* out, DType q_type,
                   cudaStream_t stream) {
  impl_->attend(layer, seq_ids, nullptr, q, out, q_type, stream);
}

void Cache::attend(int layer, const std::vector<int>& seq_ids, const std::vector<int>& n_queries, const void* q,
                   void* out, DType q_type, cudaStream_t stream) {
  if (n_queries.size() != seq_ids.size())
    throw Error("attend: " + str(n_queries.size()) + " query counts for " + str(seq_ids.size()) + " sequences");
  impl_->attend(layer, seq_ids, n_queries.data(), q, out, q_type, stream);
}

void Cache::Impl::attend(int layer, const std::vector<int>& seq_ids, const int* n_queries_or_null, const void* q,
                         void* out, DType q_type, cudaStream_t stream) {
  check_layer(layer);
  poll_failures("attend");
  refresh_tokens();
  if (seq_ids.empty()) return;
  auto n_of = [&](size_t i) { return n_queries_or_null ? n_queries_or_null[i] : 1; };
  long long rows = 0;
  for (size_t i = 0; i < seq_ids.size(); ++i) rows += std::max(n_of(i), 1);  // n < 1 is refused below
  if (rows > detail::attend_batch_limit(cfg))
    throw Error("attend: " + str(rows) + " query tokens exceed " + str(detail::attend_batch_limit(cfg)) +
                " (Config::max_attend_batch)");
  Impl::check_attend_io(q, out, q_type);
  detail::AttendParams p{};
  fill_attend(layer, q, out, p);
  p.multi_query = 1;
  int max_units = 0, tiles = 0, max_rows = 0;
  bool max_tail = false;  // a sequence of max_units ends in its tail
  for (size_t i = 0; i < seq_ids.size(); ++i) max_rows = std::max(max_rows, n_of(i) * G);
  const int tile_rows = detail::attention_tile_rows(D, max_rows);  // as launch_attention picks
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    check_seq(seq_ids[i]);
    const int n = n_of(i);
    const int64_t L = host_tokens(seq_ids[i], layer);
    // One query may attend to a sequence without tokens (output 0); n > 1 are the sequence's last n tokens.
    if (n < 1 || (n > 1 && n > L))
      throw Error("attend: sequence " + str(seq_ids[i]) + " has " + str(n) + " queries but " + str(L) +
                  " tokens in layer " + str(layer) + " (n queries are its last n tokens: append them first)");
    p.seq_slot[i] = seq_ids[i];
    p.q_first[i] = int32_t(i == 0 ? 0 : p.q_first[i - 1] + p.q_count[i - 1]);
    p.q_count[i] = n;
    // The units its queries see (the window bounds them).
    const int hi_first = int(L - n + 1);
    const int blocks = host_closed(seq_ids[i], layer);
    const int units =
        detail::unit_range(p.window > 0 ? hi_first - p.window : 0, int(L), p.sinks, T, blocks).count;
    const bool tail = L > int64_t(blocks) * T && units > 0;  // the rows see the last token: the tail's
    if (units > max_units || (units == max_units && tail)) max_tail = tail;
    max_units = std::max(max_units, units);
    tiles += (n * G + tile_rows - 1) / tile_rows;
  }
  // Lengths come from the device; the mirror bounds them (failures only make them shorter).
  const auto plan = attend_plan(max_units, max_tail, tiles, tile_rows);
  // The workspace holds part_splits splits for every query row of a call.
  const int cut = plan.tail_rides ? max_units - 1 : max_units;  // the units the splits cut (detail::tail_rides)
  const int per = std::max(plan.units_per_split, (cut + part_splits - 1) / part_splits);
  p.units_per_split = per;
  p.splits = std::max(1, (cut + per - 1) / per);
  p.spread = p.splits;
  p.warps = plan.warps;
  p.batch = int(seq_ids.size());
  detail::launch_attention(q_type, D, G, p, stream);
}

std::vector<uint8_t> Cache::read_block(int layer, int seq, int kv_head, int64_t block, Kind kind,
                                       cudaStream_t stream) const {
  Impl& m = *impl_;
  m.check_layer(layer);
  m.check_seq(seq);
  m.poll_failures("read_block");
  m.refresh_tokens();
  if (kv_head < 0 || kv_head >= m.H) throw Error("read_block: kv head " + str(kv_head) + " out of range");
  if (block < 0 || block >= m.host_closed(seq, layer))
    throw Error("read_block: block " + str(block) + " not stored");
  if (m.behind_window(seq, layer, block))
    throw Error("read_block: block " + str(block) + " of layer " + str(layer) +
                " is behind the sliding window (no query can see it; its pool page may be reused)");
  BlockRef r;
  const size_t idx = detail::table_slot(layer, seq, block, kv_head, m.cfg.max_seqs, m.max_blocks, m.H);
  check_cuda(cudaMemcpyAsync(&r, m.table.ptr + idx, sizeof(r), cudaMemcpyDeviceToHost, stream), "block ref copy");
  check_cuda(cudaStreamSynchronize(stream), "read_block sync");
  const size_t off = size_t(r.offset16) * 16 + (kind == Kind::Key ? 0 : size_t(r.k_size16) * 16);
  std::vector<uint8_t> bytes(size_t(kind == Kind::Key ? r.k_size16 : r.v_size16) * 16);
  check_cuda(cudaMemcpyAsync(bytes.data(), m.pool.ptr + off, bytes.size(), cudaMemcpyDeviceToHost, stream),
             "block copy");
  check_cuda(cudaStreamSynchronize(stream), "read_block sync");
  return bytes;
}

Codebook Cache::codebook(int layer, int kv_head, Kind kind) const {
  const Impl& m = *impl_;
  m.check_layer(layer);
  if (kv_head < 0 || kv_head >= m.H) throw Error("codebook: kv head " + str(kv_head) + " out of range");
  // The tables are built by device work queued on the caller's stream.
  check_cuda(cudaDeviceSynchronize(), "codebook sync");
  int32_t built = 0;
  check_cuda(cudaMemcpy(&built, m.ready.ptr + layer, sizeof(built), cudaMemcpyDeviceToHost), "codebook flag copy");
  if (!built) throw Error("codebook: layer " + str(layer) + " has no codebooks yet");
  return detail::read_codebook(m.books.ptr + (size_t(layer) * m.H + kv_head) * 2 + int(kind));
}

Stats Cache::stats() const {
  Impl& m = *impl_;
  m.poll_failures("stats");
  m.tokens_stale = true;
  m.refresh_tokens();
  // Bytes of the blocks in pages in use: a block shared through fork counts once.
  std::vector<unsigned long long> units(m.cfg.layers);
  int32_t free_pages = 0;
  detail::launch_layer_units(m.pool_state(), m.cfg.layers, m.layer_units.ptr, 0);
  check_cuda(cudaMemcpy(units.data(), m.layer_units.ptr, units.size() * sizeof(unsigned long long),
                        cudaMemcpyDeviceToHost),
             "stats copy");
  check_cuda(cudaMemcpy(&free_pages, m.free_count.ptr, sizeof(int32_t), cudaMemcpyDeviceToHost), "stats copy");
  Stats st;
  st.per_layer.resize(m.cfg.layers);
  const size_t page_bytes = size_t(m.pages.page_units16) * format::kBlockAlign;
  for (int l = 0; l < m.cfg.layers; ++l) {
    LayerStats& ls = st.per_layer[l];
    for (int s = 0; s < m.cfg.max_seqs; ++s) {
      if (!m.live[s]) continue;
      ls.tokens += size_t(m.host_tokens(s, l));
      ls.tail_tokens += size_t(m.host_tail(s, l));
    }
    ls.compressed_bytes = size_t(units[l]) * format::kBlockAlign;
    st.compressed_bytes += ls.compressed_bytes;
    st.tokens += ls.tokens;
    ls.tail_bytes = ls.tail_tokens * size_t(m.H) * 2 * m.tail_layout().row_bytes();
    st.tail_bytes += ls.tail_bytes;
  }
  st.metadata_bytes = m.table.count * sizeof(BlockRef) + m.books.count * sizeof(CodebookTables) + m.tails.count;
  st.pool_page_bytes = page_bytes;
  st.pool_capacity = size_t(m.pages.pages) * page_bytes;
  st.pool_bytes_in_use = size_t(m.pages.pages - free_pages) * page_bytes;
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
