#include "config_check.hpp"
#include "pool_pages.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/attention_params.cuh"
#include "kvcomp/transform.hpp"

namespace kvcomp {
namespace detail {
namespace {

std::string str(long long v) { return std::to_string(v); }

void validate_bound(const ErrorBound& b, const char* what) {
  if (!(b.value > 0.f) || !std::isfinite(b.value))
    throw Error(std::string(what) + " error bound must be positive and finite, got " + std::to_string(b.value));
  if (b.mode != BoundMode::Relative && b.mode != BoundMode::Absolute)
    throw Error(std::string(what) + " error bound mode is invalid");
}

}  // namespace

void validate(const Config& c) {
  if (c.layers <= 0) throw Error("config: layers must be positive, got " + str(c.layers));
  if (c.kv_heads <= 0) throw Error("config: kv_heads must be positive, got " + str(c.kv_heads));
  if (c.q_heads <= 0 || c.q_heads % c.kv_heads != 0)
    throw Error("config: q_heads (" + str(c.q_heads) + ") must be a positive multiple of kv_heads (" +
                str(c.kv_heads) + ")");
  const int g = c.q_heads / c.kv_heads;
  // The kernel's row tiles hold 8 or 16 (query, head) rows, padded; more rows take more tiles (multi-query
  // models: Falcon-7B 71, StarCoder 48 query heads on one KV head).
  if (g < 1 || g > kMaxGroup)
    throw Error("config: q_heads / kv_heads must be 1.." + str(kMaxGroup) + ", got " + str(g));
  if (c.transform != Transform::None && c.transform != Transform::Hadamard)
    throw Error("config: transform must be Transform::None or Transform::Hadamard, got " + str(int(c.transform)));
  if (c.tail_format != TailFormat::Input && c.tail_format != TailFormat::Codes8 && c.tail_format != TailFormat::Codes6)
    throw Error("config: tail_format must be TailFormat::Input, TailFormat::Codes8 or TailFormat::Codes6, got " +
                str(int(c.tail_format)));
  if (c.transform == Transform::Hadamard && !is_power_of_two(c.head_dim))
    throw Error("config: transform Hadamard needs head_dim a power of two, got " + str(c.head_dim));
  if (!format::supported_head_dim(c.head_dim))
    throw Error("config: head_dim must be 64, 80, 96, 128 or 256, got " + str(c.head_dim));
  if (!format::supported_tokens(c.block_tokens))
    throw Error("config: block_tokens must be 32, 64 or 128, got " + str(c.block_tokens));
  if (c.dtype != DType::F16 && c.dtype != DType::BF16 && c.dtype != DType::F32) throw Error("config: unknown dtype");
  validate_bound(c.k_bound, "config: K");
  validate_bound(c.v_bound, "config: V");
  for (const auto& o : c.overrides) {
    if (o.layer < 0 || o.layer >= c.layers) throw Error("config: override names layer " + str(o.layer));
    if (o.kv_head < -1 || o.kv_head >= c.kv_heads) throw Error("config: override names kv head " + str(o.kv_head));
    validate_bound(o.k, "config: override K");
    validate_bound(o.v, "config: override V");
  }
  if (c.window < 0) throw Error("config: window must be 0 (full attention) or positive, got " + str(c.window));
  if (!c.layer_windows.empty() && int(c.layer_windows.size()) != c.layers)
    throw Error("config: layer_windows has " + str(c.layer_windows.size()) + " entries for " + str(c.layers) +
                " layers (one per layer, or none)");
  for (size_t l = 0; l < c.layer_windows.size(); ++l)
    if (c.layer_windows[l] < 0)
      throw Error("config: layer_windows[" + str(l) + "] must be 0 (full attention) or positive, got " +
                  str(c.layer_windows[l]));
  if (c.sink_tokens < 0) throw Error("config: sink_tokens must be 0 or positive, got " + str(c.sink_tokens));
  if (c.pool_bytes < 4096) throw Error("config: pool_bytes must be at least 4096");
  const size_t worst = worst_pair_bytes(c.block_tokens, c.head_dim);
  if (c.pool_page_bytes != 0 && (c.pool_page_bytes % format::kBlockAlign != 0 || c.pool_page_bytes < worst))
    throw Error("config: pool_page_bytes must be 0 (automatic) or a multiple of 16 of at least " + str(worst) +
                " (a worst-case K+V block pair at this block_tokens and head_dim), got " + str(c.pool_page_bytes));
  if (plan_pages(c.pool_bytes, c.max_seqs, c.block_tokens, c.head_dim, c.pool_page_bytes).pages == 0)
    throw Error("config: pool_bytes (" + str(c.pool_bytes) + ") must hold at least one pool page of " +
                str(std::max(worst, c.pool_page_bytes)) + " bytes (a page holds a worst-case K+V block pair)");
  if (c.max_seqs <= 0) throw Error("config: max_seqs must be positive");
  if (c.max_tokens_per_seq <= 0) throw Error("config: max_tokens_per_seq must be positive");
  if (c.max_rollback < 0 || c.max_rollback > c.block_tokens)
    throw Error("config: max_rollback must be 0..block_tokens (" + str(c.block_tokens) + "), got " +
                str(c.max_rollback));
  if (c.max_attend_batch < 0 || c.max_attend_batch > kMaxBatch)
    throw Error("config: max_attend_batch must be 0 (= max_seqs) or 1.." + str(kMaxBatch) + ", got " +
                str(c.max_attend_batch));
}

int attend_batch_limit(const Config& c) {
  return c.max_attend_batch > 0 ? c.max_attend_batch : std::min(c.max_seqs, kMaxBatch);
}


}  // namespace detail
}  // namespace kvcomp
