// The two KV caches the example compares, behind one small interface so the
// model code is the same for both and any difference comes from the cache:
//   KvcompKv: a kvcomp::Cache (compressed, fused decode attention).
//   Fp16Kv:   plain fp16 buffers per layer, read by kvcomp's fp16
//             flash-decoding baseline (src/baselines.hpp).
// Both hold one sequence.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "device_buffer.cuh"
#include "kernels.cuh"
#include "kvcomp/cache.hpp"
#include "src/baselines.hpp"

namespace llama {

struct KvShape {
  int layers, kv_heads, q_heads, head_dim;
  int max_tokens;  // the sequence's longest length in this run
  /// Bytes an fp16 cache of `tokens` tokens holds: K and V, 2 bytes a value.
  size_t fp16_bytes(int64_t tokens) const { return size_t(tokens) * layers * kv_heads * head_dim * 2 * 2; }
};

class KvCache {
 public:
  virtual ~KvCache() = default;
  /// Appends n tokens' K and V, device [n][kv_heads][head_dim] fp16.
  virtual void append(int layer, int n, const __half* k, const __half* v, cudaStream_t s) = 0;
  /// out = attention of one query over every token of `layer`; q, out:
  /// device [q_heads][head_dim] fp16.
  virtual void attend(int layer, const __half* q, __half* out, cudaStream_t s) = 0;
  /// n queries, the layer's last n tokens (appended first): query j attends
  /// causally to tokens 0 .. tokens - n + j. q, out: [n][q_heads][head_dim].
  virtual void attend_many(int layer, int n, const __half* q, __half* out, cudaStream_t s) = 0;
  /// Takes back the last n tokens of every layer (rejected draft tokens).
  virtual void rollback(int n, cudaStream_t s) = 0;
  /// Tokens stored (per layer, after the last layer's append).
  virtual int64_t tokens() const = 0;
  /// Bytes that hold the K/V.
  virtual size_t bytes() const = 0;
};

class KvcompKv : public KvCache {
 public:
  /// max_rollback: the most draft tokens rollback() takes back (Config::max_rollback).
  KvcompKv(const KvShape& shape, float error_bound, int max_rollback = 0) {
    kvcomp::Config c;
    c.layers = shape.layers;
    c.kv_heads = shape.kv_heads;
    c.q_heads = shape.q_heads;
    c.head_dim = shape.head_dim;
    c.dtype = kvcomp::DType::F16;
    c.k_bound = {kvcomp::BoundMode::Relative, error_bound};
    c.v_bound = {kvcomp::BoundMode::Relative, error_bound};
    c.max_seqs = 1;
    c.max_attend_batch = 64;  // query rows a call: verification of up to 63 draft tokens
    c.max_rollback = max_rollback;
    c.max_tokens_per_seq = shape.max_tokens;
    // Compressed blocks are smaller than fp16 in practice; room for 1.25x fp16
    // keeps even incompressible data (escapes) from filling the pool.
    c.pool_bytes = shape.fp16_bytes(shape.max_tokens) / 4 * 5 + (size_t(32) << 20);
    cache_ = std::make_unique<kvcomp::Cache>(c);
    seq_ = cache_->add_sequence();
  }
  void append(int layer, int n, const __half* k, const __half* v, cudaStream_t s) override {
    cache_->append(layer, {seq_}, {n}, k, v, s);
  }
  void attend(int layer, const __half* q, __half* out, cudaStream_t s) override {
    cache_->attend(layer, {seq_}, q, out, kvcomp::DType::F16, s);
  }
  void attend_many(int layer, int n, const __half* q, __half* out, cudaStream_t s) override {
    cache_->attend(layer, {seq_}, {n}, q, out, kvcomp::DType::F16, s);
  }
  void rollback(int n, cudaStream_t s) override { cache_->rollback(seq_, n, s); }
  int64_t tokens() const override {
    const int last = cache_->config().layers - 1;
    return cache_->tokens(seq_, last);
  }
  size_t bytes() const override {
    const kvcomp::Stats st = cache_->stats();
    return st.compressed_bytes + st.tail_bytes;
  }
  kvcomp::Stats stats() const { return cache_->stats(); }

 private:
  std::unique_ptr<kvcomp::Cache> cache_;
  int seq_ = -1;
};

class Fp16Kv : public KvCache {
 public:
  Fp16Kv(const KvShape& shape, int sms) : shape_(shape), sms_(sms) {
    // The flash-decoding baseline handles GQA groups of 1, 4 and 8; a group
    // of 2 is run as group 1 over each KV head stored twice (bytes() still
    // counts one copy: what an fp16 cache needs).
    const int group = shape.q_heads / shape.kv_heads;
    replicas_ = group == 2 ? 2 : 1;
    const size_t per_layer = size_t(shape.kv_heads) * replicas_ * shape.max_tokens * shape.head_dim;
    for (int l = 0; l < shape.layers; ++l) {
      k_.emplace_back(per_layer);
      v_.emplace_back(per_layer);
    }
    tokens_.assign(size_t(shape.layers), 0);
    // Workspace for the longest split plan over every length this run reaches.
    size_t ws = 0;
    for (int t = 32; t < shape.max_tokens + 32; t += 32)
      ws = std::max(ws, kvcomp::baseline::flash_workspace_floats(attention(0, std::min(t, shape.max_tokens)), sms));
    workspace_ = DeviceBuffer<float>(std::max<size_t>(ws, 1));
  }
  void append(int layer, int n, const __half* k, const __half* v, cudaStream_t s) override {
    if (tokens_[size_t(layer)] + n > shape_.max_tokens)
      throw std::runtime_error("fp16 cache: more than " + std::to_string(shape_.max_tokens) + " tokens");
    kernels::fp16_cache_append<<<n, kernels::kThreads, 0, s>>>(k, v, k_[size_t(layer)].get(), v_[size_t(layer)].get(),
                                                                shape_.kv_heads, replicas_, shape_.head_dim,
                                                                shape_.max_tokens, int(tokens_[size_t(layer)]));
    check(cudaGetLastError(), "fp16 cache append");
    tokens_[size_t(layer)] += n;
  }
  void attend(int layer, const __half* q, __half* out, cudaStream_t s) override {
    kvcomp::baseline::flash_decode_fp16(attention(layer, int(tokens_[size_t(layer)])), q, out, workspace_.get(), sms_, s);
  }
  void attend_many(int layer, int n, const __half* q, __half* out, cudaStream_t s) override {
    const size_t row = size_t(shape_.q_heads) * shape_.head_dim;  // query j over the tokens up to its own
    for (int j = 0; j < n; ++j)
      kvcomp::baseline::flash_decode_fp16(attention(layer, int(tokens_[size_t(layer)]) - n + j + 1), q + j * row,
                                          out + j * row, workspace_.get(), sms_, s);
  }
  void rollback(int n, cudaStream_t) override {
    for (int64_t& t : tokens_) {
      if (n > t) throw std::runtime_error("fp16 cache: rollback of more tokens than it holds");
      t -= n;
    }
  }
  int64_t tokens() const override { return tokens_.back(); }
  size_t bytes() const override { return shape_.fp16_bytes(tokens()); }

 private:
  KvShape shape_;
  int sms_;
  int replicas_ = 1;
  std::vector<DeviceBuffer<__half>> k_, v_;  // per layer [kv_heads * replicas][max_tokens][head_dim]
  std::vector<int64_t> tokens_;
  DeviceBuffer<float> workspace_;

  kvcomp::baseline::Fp16Attention attention(int layer, int tokens) const {
    kvcomp::baseline::Fp16Attention a{k_[size_t(layer)].get(), v_[size_t(layer)].get(), 1, shape_.kv_heads * replicas_,
                                      shape_.q_heads, shape_.head_dim, tokens};
    a.head_stride = int64_t(shape_.max_tokens) * shape_.head_dim;
    return a;
  }
};

}  // namespace llama
