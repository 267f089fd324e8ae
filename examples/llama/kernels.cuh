// The small kernels of a Llama forward pass (everything but the projections,
// which are cuBLAS GEMMs). Simple rather than fast: one block per row, fp32
// arithmetic, fp16 storage. Residual stream and logits stay fp32.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace llama {
namespace kernels {

constexpr int kThreads = 256;  // every kernel here assumes a multiple of 32, at most 1024

/// Sum of v over the block; every thread gets it. `scratch` holds 32 floats.
__device__ inline float block_sum(float v, float* scratch) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(~0u, v, o);
  __syncthreads();  // scratch may still be read from a previous call
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float s = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) s += scratch[w];
  return s;
}
/// Max of v over the block; every thread gets it.
__device__ inline float block_max(float v, float* scratch) {
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(~0u, v, o));
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < int(blockDim.x / 32); ++w) m = fmaxf(m, scratch[w]);
  return m;
}

/// x[row][:] (fp32) = table[tokens[row]][:]. Grid: one block per row.
__global__ void embed(const __half* table, const int* tokens, int hidden, float* x) {
  const __half* e = table + int64_t(tokens[blockIdx.x]) * hidden;
  float* out = x + int64_t(blockIdx.x) * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = __half2float(e[i]);
}

/// y[row] = weight * x[row] / sqrt(mean(x[row]^2) + eps), accumulated in fp32.
/// Grid: one block per row.
__global__ void rmsnorm(const float* x, const __half* weight, int hidden, float eps, __half* y) {
  __shared__ float scratch[32];
  const float* r = x + int64_t(blockIdx.x) * hidden;
  float ss = 0;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += r[i] * r[i];
  const float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
  __half* out = y + int64_t(blockIdx.x) * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = __float2half_rn(__half2float(weight[i]) * (r[i] * inv));
}

/// y[r][c] += bias[c] for rows x width values (fp16 activations: q/k/v biases).
__global__ void add_bias(__half* y, const __half* bias, int width, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2half_rn(__half2float(y[i]) + __half2float(bias[i % width]));
}
/// The same on the fp32 residual stream (o_proj bias).
__global__ void add_bias_f32(float* y, const __half* bias, int width, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    y[i] += __half2float(bias[i % width]);
}

/// RoPE in place on rows of `heads` x head_dim, row r at position pos0 + r,
/// Hugging Face convention: channel c pairs with c + head_dim/2 (rotate_half),
/// angle = pos * theta^(-2c/head_dim), computed in fp32 as transformers does.
/// Grid: one block per row.
__global__ void rope(__half* x, int heads, int head_dim, int pos0, float theta) {
  const int half_dim = head_dim / 2;
  const float pos = float(pos0 + int(blockIdx.x));
  __half* row = x + int64_t(blockIdx.x) * heads * head_dim;
  for (int i = threadIdx.x; i < heads * half_dim; i += blockDim.x) {
    const int h = i / half_dim, c = i % half_dim;
    __half* p = row + h * head_dim;
    const float inv_freq = 1.f / powf(theta, float(2 * c) / float(head_dim));
    float sn, cs;
    sincosf(pos * inv_freq, &sn, &cs);
    const float a = __half2float(p[c]), b = __half2float(p[c + half_dim]);
    p[c] = __float2half_rn(a * cs - b * sn);
    p[c + half_dim] = __float2half_rn(b * cs + a * sn);
  }
}

/// h = silu(gate) * up (SwiGLU), elementwise over `total` values.
__global__ void silu_mul(const __half* gate, const __half* up, __half* h, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = __half2float(gate[i]);
    h[i] = __float2half_rn(g / (1.f + expf(-g)) * __half2float(up[i]));
  }
}

/// Causal self-attention of a prefill: query row i (position i) attends to
/// rows 0..i of the fresh K/V. q, out: [n][q_heads][D]; k, v: [n][kv_heads][D].
/// One warp per (row, q head), online softmax in fp32; lane holds channels
/// lane, lane + 32, ... Grid: ceil(n * q_heads / warps per block) blocks.
template <int D>
__global__ void causal_attention(const __half* q, const __half* k, const __half* v, __half* out, int n, int q_heads,
                                 int kv_heads, float scale) {
  constexpr int C = D / 32;
  const int warp = int((blockIdx.x * blockDim.x + threadIdx.x) / 32), lane = threadIdx.x % 32;
  if (warp >= n * q_heads) return;  // whole warps exit together
  const int row = warp / q_heads, h = warp % q_heads, kvh = h / (q_heads / kv_heads);
  float qv[C], acc[C];
  for (int c = 0; c < C; ++c) {
    qv[c] = __half2float(q[(int64_t(row) * q_heads + h) * D + c * 32 + lane]) * scale;
    acc[c] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j = 0; j <= row; ++j) {
    const __half* kr = k + (int64_t(j) * kv_heads + kvh) * D;
    float s = 0.f;
    for (int c = 0; c < C; ++c) s += qv[c] * __half2float(kr[c * 32 + lane]);
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
    const float m_new = fmaxf(m, s), rescale = expf(m - m_new), p = expf(s - m_new);
    const __half* vr = v + (int64_t(j) * kv_heads + kvh) * D;
    for (int c = 0; c < C; ++c) acc[c] = acc[c] * rescale + p * __half2float(vr[c * 32 + lane]);
    l = l * rescale + p;
    m = m_new;
  }
  for (int c = 0; c < C; ++c) out[(int64_t(row) * q_heads + h) * D + c * 32 + lane] = __float2half_rn(acc[c] / l);
}

/// Copies n rows of K/V [n][kv_heads][D] into an fp16 cache laid out
/// [kv_heads * replicas][max_tokens][D] at token pos0; each KV head is written
/// `replicas` times (heads h * replicas + r), see Fp16Kv. Grid: one block per row.
__global__ void fp16_cache_append(const __half* k, const __half* v, __half* k_cache, __half* v_cache, int kv_heads,
                                  int replicas, int head_dim, int max_tokens, int pos0) {
  const int row = blockIdx.x;
  for (int i = threadIdx.x; i < kv_heads * head_dim; i += blockDim.x) {
    const int h = i / head_dim, c = i % head_dim;
    const __half kx = k[int64_t(row) * kv_heads * head_dim + i], vx = v[int64_t(row) * kv_heads * head_dim + i];
    for (int r = 0; r < replicas; ++r) {
      const int64_t at = (int64_t(h * replicas + r) * max_tokens + pos0 + row) * head_dim + c;
      k_cache[at] = kx;
      v_cache[at] = vx;
    }
  }
}

/// *token = argmax of logits[0..vocab) (lowest index on ties, as torch.argmax).
/// One block of kThreads.
__global__ void argmax(const float* logits, int vocab, int* token) {
  __shared__ float best_v[kThreads];
  __shared__ int best_i[kThreads];
  float bv = -INFINITY;
  int bi = 0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x)
    if (logits[i] > bv) { bv = logits[i]; bi = i; }
  best_v[threadIdx.x] = bv;
  best_i[threadIdx.x] = bi;
  __syncthreads();
  for (int s = blockDim.x / 2; s; s >>= 1) {
    if (threadIdx.x < s) {
      const float ov = best_v[threadIdx.x + s];
      const int oi = best_i[threadIdx.x + s];
      if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
        best_v[threadIdx.x] = ov;
        best_i[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *token = best_i[0];
}

/// *nll_sum += -log softmax(logits)[*target] (log-sum-exp in fp32, sum in fp64).
/// One block of kThreads.
__global__ void add_nll(const float* logits, int vocab, const int* target, double* nll_sum) {
  __shared__ float scratch[32];
  float m = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, logits[i]);
  m = block_max(m, scratch);
  float s = 0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(logits[i] - m);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *nll_sum += double(logf(s) + m - logits[*target]);
}

}  // namespace kernels
}  // namespace llama
