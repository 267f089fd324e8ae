// Plan-based decode (include/kvcomp/cache.hpp, "CUDA graphs"): a plan owns
// fixed device buffers for a batch of slots; append(plan) derives its jobs on
// the device from the token counts (kernels/decode_jobs.cuh) and attend(plan)
// reads slots and lengths from device memory, so both can be captured.
#include <algorithm>
#include <string>

#include "cache_impl.hpp"
#include "config_check.hpp"
#include "launch.hpp"

namespace kvcomp {

using detail::check_cuda;

namespace {
std::string str(long long v) { return std::to_string(v); }
}  // namespace

Cache::Impl::Plan& Cache::Impl::plan(const DecodePlan& p, const char* call) {
  if (p.id < 0 || p.id >= int(plans.size()) || plans[p.id]->batch != p.batch || plans[p.id]->tokens != p.tokens)
    throw Error(std::string(call) + ": not a plan of this cache (id " + str(p.id) + ", batch " + str(p.batch) +
                ", tokens " + str(p.tokens) + ")");
  return *plans[p.id];
}

DecodePlan Cache::make_plan(int batch, int tokens_per_slot) {
  Impl& m = *impl_;
  const int limit = detail::attend_batch_limit(m.cfg);
  if (tokens_per_slot < 1 || tokens_per_slot > m.T)
    throw Error("make_plan: tokens_per_slot " + str(tokens_per_slot) + " out of range [1, " + str(m.T) +
                "] (block_tokens)");
  if (batch < 1 || int64_t(batch) * tokens_per_slot > limit)
    throw Error("make_plan: batch " + str(batch) + " x tokens_per_slot " + str(tokens_per_slot) +
                " query rows out of range [1, " + str(limit) + "] (Config::max_attend_batch)");
  auto p = std::make_unique<Impl::Plan>();
  p->batch = batch;
  p->tokens = tokens_per_slot;
  // Splits and CTA size for the longest sequences (max_tokens_per_seq). The lengths of a replay are unknown
  // here: the kernel cuts each sequence into ceil(units / per) splits of per = ceil(units / spread) units
  // and decides whether its tail rides with its last block's split (tail_rides); plan_spread says why.
  const int tile_rows = detail::attention_tile_rows(m.D, tokens_per_slot * m.G);
  const int tiles = batch * ((tokens_per_slot * m.G + tile_rows - 1) / tile_rows);
  const auto split = m.attend_plan(m.max_blocks + 1, false, tiles, tile_rows);
  p->splits = std::min(split.splits, m.part_splits);
  p->warps = split.warps;
  p->spread = detail::plan_spread(p->splits, split.ctas_per_sm, m.sms, 1LL * tiles * m.H);
  p->slots.allocate(batch, "plan slots");
  const size_t jobs = size_t(batch) * m.H;
  p->scratch.reserve(jobs, jobs * p->copy_runs(), batch, "plan buffers");
  if (m.cfg.transform == Transform::Hadamard)
    p->scratch.rotated.allocate(2 * jobs * tokens_per_slot * m.D * dtype_size(m.cfg.dtype), "plan buffers");
  std::vector<int32_t> idle(batch, -1);
  check_cuda(cudaMemcpy(p->slots.ptr, idle.data(), batch * sizeof(int32_t), cudaMemcpyHostToDevice), "plan slots");
  p->seq_ids.assign(batch, -1);
  m.plans.push_back(std::move(p));
  return {int(m.plans.size()) - 1, batch, tokens_per_slot};
}

void Cache::set_plan(const DecodePlan& plan, const std::vector<int>& seq_ids, cudaStream_t stream) {
  Impl& m = *impl_;
  Impl::Plan& p = m.plan(plan, "set_plan");
  m.poll_failures("set_plan");
  if (int(seq_ids.size()) != p.batch)
    throw Error("set_plan: " + str(seq_ids.size()) + " sequence ids for a plan of batch " + str(p.batch));
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    if (seq_ids[i] == -1) continue;
    m.check_seq(seq_ids[i]);
    for (size_t j = 0; j < i; ++j)
      if (seq_ids[j] == seq_ids[i]) throw Error("set_plan: sequence " + str(seq_ids[i]) + " appears twice");
  }
  // Pageable: staged by the runtime before the call returns.
  check_cuda(cudaMemcpyAsync(p.slots.ptr, seq_ids.data(), seq_ids.size() * sizeof(int32_t), cudaMemcpyHostToDevice,
                             stream),
             "plan slot upload");
  p.seq_ids = seq_ids;
}

void Cache::append(const DecodePlan& plan, int layer, const void* k, const void* v, cudaStream_t stream,
                   int64_t token_stride, int64_t head_stride) {
  Impl& m = *impl_;
  Impl::Plan& p = m.plan(plan, "append");
  m.check_layer(layer);
  const int H = m.H;
  m.resolve_strides(token_stride, head_stride);
  if (!k || !v) throw Error("append: k and v must be device pointers, got null");
  AppendScratch& s = p.scratch;
  if (m.cfg.transform == Transform::Hadamard)
    m.rotate_input(s, int64_t(p.batch) * p.tokens, k, v, token_stride, head_stride, stream);
  detail::DecodeJobsParams d{};
  d.slots = p.slots.ptr;
  d.tokens = m.tokens.ptr;
  d.closed = m.closed.ptr;
  d.bounds = m.bounds.ptr + size_t(layer) * H * 2;
  d.g = {static_cast<const uint8_t*>(k), static_cast<const uint8_t*>(v), token_stride, head_stride,
         dtype_size(m.cfg.dtype), m.tail_layout(), layer, m.max_blocks};
  d.layers = m.cfg.layers;
  d.batch = p.batch;
  d.tokens_per_slot = p.tokens;
  d.copy_runs = p.copy_runs();
  d.max_rollback = m.R;
  d.jobs = s.jobs.ptr;
  d.copies = s.copies.ptr;
  d.entries = s.entries.ptr;
  detail::launch_decode_jobs(d, stream);
  const int n = p.batch * H;
  // The build kernels skip themselves once the layer's books exist.
  m.run_store(layer, s, n, p.batch, n * p.copy_runs(), true, false, stream);
  m.tokens_stale = true;
}

void Cache::attend(const DecodePlan& plan, int layer, const void* q, void* out, DType q_type, cudaStream_t stream) {
  Impl& m = *impl_;
  Impl::Plan& p = m.plan(plan, "attend");
  m.check_layer(layer);
  Impl::check_attend_io(q, out, q_type);
  detail::AttendParams a{};
  a.batch = p.batch;
  a.splits = p.splits;
  a.spread = p.spread;
  a.units_per_split = 1;  // the kernel spreads each sequence over up to `spread` splits (make_plan)
  a.warps = p.warps;
  a.slots = p.slots.ptr;
  m.fill_attend(layer, q, out, a);
  if (p.tokens > 1) {  // slot b's queries: rows b tokens .., its last `tokens` tokens
    a.multi_query = 1;
    for (int b = 0; b < p.batch; ++b) {
      a.q_first[b] = b * p.tokens;
      a.q_count[b] = p.tokens;
    }
  }
  detail::launch_attention(q_type, m.D, m.G, a, stream);
}

void Cache::rollback(const DecodePlan& plan, const int32_t* n_rejected, cudaStream_t stream) {
  Impl& m = *impl_;
  Impl::Plan& p = m.plan(plan, "rollback");
  if (!n_rejected) throw Error("rollback: n_rejected must be a device pointer to plan.batch int32 counts, got null");
  detail::launch_rollback(p.slots.ptr, n_rejected, p.batch, -1, 0, m.R, m.T, m.seq_state(), stream);
  m.tokens_stale = true;
}

}  // namespace kvcomp
