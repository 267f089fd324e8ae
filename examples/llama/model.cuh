// A Llama-family decoder on the GPU (Llama, Mistral, Qwen2): weights loaded
// once from a checkpoint (as fp16), projections as cuBLAS GEMMs (fp16 in and
// out, fp32 compute; the residual stream is fp32 and the o/down projections
// accumulate into it), the rest in kernels.cuh.
//
// Attention goes through a KvCache (kv_cache.cuh):
//   Prefill: the prompt's rows attend causally to their own fresh K/V (as
//            engines do in prefill), then all its K/V go into the cache in
//            one append per layer. The cache must be empty.
//   Decode:  one token: its K/V are appended, then its query attends to the
//            cache, so every prediction reads the cache as decode does.
//   Verify:  n tokens after the cache's (speculative decoding: the last token
//            and n - 1 drafts): all appended, then attended as n queries
//            (each causal over the cache and the rows before it); logits for
//            every row (logits(j)).
#pragma once

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "config.hpp"
#include "device_buffer.cuh"
#include "kernels.cuh"
#include "kv_cache.cuh"
#include "safetensors.hpp"

namespace llama {

class Model {
 public:
  enum class Phase { Prefill, Decode, Verify };

  /// Loads every weight to the device; `max_rows` is the longest prefill (or verification),
  /// `logit_rows` the most rows a Verify forward returns logits for.
  Model(const ModelConfig& cfg, Checkpoint& ckpt, int max_rows, int logit_rows = 1)
      : cfg_(cfg), max_rows_(std::max(max_rows, 1)), logit_rows_(std::max(logit_rows, 1)) {
    const int64_t H = cfg.hidden, Q = int64_t(cfg.q_heads) * cfg.head_dim, KV = int64_t(cfg.kv_heads) * cfg.head_dim,
                  I = cfg.intermediate, V = cfg.vocab;
    std::set<std::string> used;
    auto load = [&](const std::string& name, std::vector<int64_t> shape) {
      used.insert(name);
      return to_device(ckpt.load_fp16(name, shape));
    };
    auto load_if = [&](const std::string& name, std::vector<int64_t> shape) {
      return ckpt.has(name) ? load(name, shape) : DeviceBuffer<__half>();
    };
    embed_ = load("model.embed_tokens.weight", {V, H});
    for (int l = 0; l < cfg.layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      Layer w;
      w.input_norm = load(p + "input_layernorm.weight", {H});
      w.wq = load(p + "self_attn.q_proj.weight", {Q, H});
      w.wk = load(p + "self_attn.k_proj.weight", {KV, H});
      w.wv = load(p + "self_attn.v_proj.weight", {KV, H});
      w.wo = load(p + "self_attn.o_proj.weight", {H, Q});
      w.bq = load_if(p + "self_attn.q_proj.bias", {Q});  // Qwen2 has q/k/v biases, attention_bias Llamas all four
      w.bk = load_if(p + "self_attn.k_proj.bias", {KV});
      w.bv = load_if(p + "self_attn.v_proj.bias", {KV});
      w.bo = load_if(p + "self_attn.o_proj.bias", {H});
      w.post_norm = load(p + "post_attention_layernorm.weight", {H});
      w.gate = load(p + "mlp.gate_proj.weight", {I, H});
      w.up = load(p + "mlp.up_proj.weight", {I, H});
      w.down = load(p + "mlp.down_proj.weight", {H, I});
      layers_.push_back(std::move(w));
    }
    final_norm_ = load("model.norm.weight", {H});
    // Tied embeddings: no lm_head.weight, the embedding matrix is the output layer.
    if (ckpt.has("lm_head.weight")) lm_head_ = load("lm_head.weight", {V, H});
    else if (!cfg.tie_word_embeddings)
      throw std::runtime_error("checkpoint has no lm_head.weight and config.json does not tie the embeddings");
    // A tensor this code does not use would mean a different architecture (e.g.
    // q/k norms): refuse rather than compute something else.
    for (const std::string& name : ckpt.names())
      if (!used.count(name) && name.find("rotary_emb.inv_freq") == std::string::npos)
        throw std::runtime_error("checkpoint tensor \"" + name + "\" is not part of a Llama/Mistral/Qwen2 decoder");
    if (ckpt.fp16_overflows())
      std::fprintf(stderr, "warning: %zu weights exceed the fp16 range and became inf\n", ckpt.fp16_overflows());

    const int64_t R = max_rows_;
    x_ = DeviceBuffer<float>(size_t(R * H));
    xn_ = DeviceBuffer<__half>(size_t(R * H));
    q_ = DeviceBuffer<__half>(size_t(R * Q));
    k_ = DeviceBuffer<__half>(size_t(R * KV));
    v_ = DeviceBuffer<__half>(size_t(R * KV));
    att_ = DeviceBuffer<__half>(size_t(R * Q));
    gate_ = DeviceBuffer<__half>(size_t(R * I));
    up_ = DeviceBuffer<__half>(size_t(R * I));
    logits_ = DeviceBuffer<float>(size_t(logit_rows_) * V);
    check(cublasCreate(&blas_), "cublasCreate");
  }
  ~Model() { cublasDestroy(blas_); }
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return cfg_; }

  /// Runs n tokens (device ids) at positions pos0.. through every layer and
  /// leaves the logits of the last one in logits() (fp32 [vocab]), or with
  /// Phase::Verify those of every row j in logits(j).
  void forward(const int* tokens, int n, int pos0, Phase phase, KvCache& cache, cudaStream_t s) {
    if (n < 1 || n > max_rows_) throw std::runtime_error("forward: " + std::to_string(n) + " rows, at most " + std::to_string(max_rows_));
    if (phase == Phase::Decode && n != 1) throw std::runtime_error("forward: decode takes one token at a time");
    if (phase == Phase::Verify && n > logit_rows_)
      throw std::runtime_error("forward: verification of " + std::to_string(n) + " rows, logits for at most " +
                               std::to_string(logit_rows_));
    if (phase == Phase::Prefill && (pos0 != 0 || cache.tokens() != 0))
      throw std::runtime_error("forward: prefill needs an empty cache");
    check(cublasSetStream(blas_, s), "cublasSetStream");
    const int H = cfg_.hidden, D = cfg_.head_dim, Q = cfg_.q_heads * D, KV = cfg_.kv_heads * D, I = cfg_.intermediate;
    const int T = kernels::kThreads;
    kernels::embed<<<n, T, 0, s>>>(embed_.get(), tokens, H, x_.get());
    for (int l = 0; l < cfg_.layers; ++l) {
      const Layer& w = layers_[size_t(l)];
      // Attention block.
      kernels::rmsnorm<<<n, T, 0, s>>>(x_.get(), w.input_norm.get(), H, cfg_.rms_eps, xn_.get());
      gemm(w.wq, Q, H, xn_.get(), q_.get(), n, Out::F16);
      gemm(w.wk, KV, H, xn_.get(), k_.get(), n, Out::F16);
      gemm(w.wv, KV, H, xn_.get(), v_.get(), n, Out::F16);
      add_bias(w.bq, q_.get(), Q, n, s);
      add_bias(w.bk, k_.get(), KV, n, s);
      add_bias(w.bv, v_.get(), KV, n, s);
      kernels::rope<<<n, T, 0, s>>>(q_.get(), cfg_.q_heads, D, pos0, cfg_.rope_theta);
      kernels::rope<<<n, T, 0, s>>>(k_.get(), cfg_.kv_heads, D, pos0, cfg_.rope_theta);
      if (phase == Phase::Prefill) {
        prefill_attention(n, s);
        cache.append(l, n, k_.get(), v_.get(), s);
      } else if (phase == Phase::Decode) {
        cache.append(l, 1, k_.get(), v_.get(), s);
        cache.attend(l, q_.get(), att_.get(), s);
      } else {
        cache.append(l, n, k_.get(), v_.get(), s);
        cache.attend_many(l, n, q_.get(), att_.get(), s);
      }
      gemm(w.wo, H, Q, att_.get(), x_.get(), n, Out::AddF32);  // x += o_proj(att)
      if (w.bo.get()) kernels::add_bias_f32<<<blocks(int64_t(n) * H), T, 0, s>>>(x_.get(), w.bo.get(), H, int64_t(n) * H);
      // MLP block (SwiGLU).
      kernels::rmsnorm<<<n, T, 0, s>>>(x_.get(), w.post_norm.get(), H, cfg_.rms_eps, xn_.get());
      gemm(w.gate, I, H, xn_.get(), gate_.get(), n, Out::F16);
      gemm(w.up, I, H, xn_.get(), up_.get(), n, Out::F16);
      kernels::silu_mul<<<blocks(int64_t(n) * I), T, 0, s>>>(gate_.get(), up_.get(), gate_.get(), int64_t(n) * I);
      gemm(w.down, H, I, gate_.get(), x_.get(), n, Out::AddF32);  // x += down_proj(h)
    }
    // Logits of the last row (Verify: of every row): final norm, then the output layer.
    const int rows = phase == Phase::Verify ? n : 1;
    kernels::rmsnorm<<<rows, T, 0, s>>>(x_.get() + int64_t(n - rows) * H, final_norm_.get(), H, cfg_.rms_eps, xn_.get());
    gemm(lm_head_.get() ? lm_head_ : embed_, cfg_.vocab, H, xn_.get(), logits_.get(), rows, Out::F32);
    check(cudaGetLastError(), "forward");
  }

  const float* logits(int row = 0) const { return logits_.get() + int64_t(row) * cfg_.vocab; }

 private:
  struct Layer {
    DeviceBuffer<__half> input_norm, wq, wk, wv, wo, bq, bk, bv, bo, post_norm, gate, up, down;
  };
  ModelConfig cfg_;
  int max_rows_;
  int logit_rows_;
  DeviceBuffer<__half> embed_, final_norm_, lm_head_;
  std::vector<Layer> layers_;
  DeviceBuffer<float> x_, logits_;                       // residual stream [rows][hidden]; logits [rows][vocab]
  DeviceBuffer<__half> xn_, q_, k_, v_, att_, gate_, up_;  // activations [rows][width]
  cublasHandle_t blas_ = nullptr;

  static DeviceBuffer<__half> to_device(const std::vector<uint16_t>& bits) {
    DeviceBuffer<__half> d(bits.size());
    check(cudaMemcpy(d.get(), bits.data(), bits.size() * 2, cudaMemcpyHostToDevice), "upload weights");
    return d;
  }
  static int blocks(int64_t total) { return int(std::min<int64_t>((total + kernels::kThreads - 1) / kernels::kThreads, 4096)); }

  enum class Out { F16, F32, AddF32 };  // y fp16; y fp32; y fp32 += (the residual stream)
  /// y[n][rows] = x[n][cols] . W^T, W [rows][cols] row-major as a Hugging Face
  /// Linear weight is (column-major: W^T [cols][rows]).
  void gemm(const DeviceBuffer<__half>& W, int rows, int cols, const __half* x, void* y, int n, Out out) {
    const float one = 1.f, zero = 0.f;
    check(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one, W.get(), CUDA_R_16F, cols, x, CUDA_R_16F,
                       cols, out == Out::AddF32 ? &one : &zero, y, out == Out::F16 ? CUDA_R_16F : CUDA_R_32F, rows,
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
  }

  void add_bias(const DeviceBuffer<__half>& b, __half* y, int width, int n, cudaStream_t s) {
    if (!b.get()) return;
    kernels::add_bias<<<blocks(int64_t(n) * width), kernels::kThreads, 0, s>>>(y, b.get(), width, int64_t(n) * width);
  }

  void prefill_attention(int n, cudaStream_t s) {
    const int warps_per_block = kernels::kThreads / 32;
    const int grid = (n * cfg_.q_heads + warps_per_block - 1) / warps_per_block;
    const float scale = 1.f / std::sqrt(float(cfg_.head_dim));
    if (cfg_.head_dim == 64)
      kernels::causal_attention<64><<<grid, kernels::kThreads, 0, s>>>(q_.get(), k_.get(), v_.get(), att_.get(), n,
                                                                       cfg_.q_heads, cfg_.kv_heads, scale);
    else
      kernels::causal_attention<128><<<grid, kernels::kThreads, 0, s>>>(q_.get(), k_.get(), v_.get(), att_.get(), n,
                                                                        cfg_.q_heads, cfg_.kv_heads, scale);
  }
};

}  // namespace llama
