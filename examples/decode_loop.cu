// decode_loop: a synthetic multi-layer decoder that prefills a prompt and
// decodes tokens with kvcomp, next to an fp16 cache read by our fp16
// flash-decoding kernel. K/V come from a fixed-seed generator (K with outlier
// channels, as real keys have); q likewise. Prints attention time per token,
// KV bytes of both caches and the max deviation of the attention outputs.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include "kvcomp/cache.hpp"
#include "src/baselines.hpp"

namespace {

constexpr int kLayers = 8, kH = 8, kHq = 32, kD = 128, kPrompt = 4000, kDecode = 256;

__device__ float gen(uint32_t layer, uint32_t token, uint32_t head, uint32_t c, uint32_t which) {
  uint64_t x = (uint64_t(layer) << 48) ^ (uint64_t(token) << 20) ^ (uint64_t(head) << 12) ^ (c << 2) ^ which;
  x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
  const float u1 = (uint32_t(x) + 1.f) * 2.3283064e-10f, u2 = uint32_t(x >> 32) * 2.3283064e-10f;
  float v = sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
  if (which == 0 && c % 16 == 5) v = v * 8.f + 4.f;  // K outlier channels
  return v;
}
/// token_major: [n][H][D] (what the engine appends); else [H][n][D] (fp16 baseline).
__global__ void gen_kv(__half* out, int layer, int tok0, int n, int which, bool token_major) {
  const size_t total = size_t(n) * kH * kD;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    int t, h, c = int(i % kD);
    if (token_major) { t = int(i / (kH * kD)); h = int(i / kD % kH); }
    else { h = int(i / (size_t(n) * kD)); t = int(i / kD % n); }
    out[i] = __float2half_rn(gen(layer, tok0 + t, h, c, which));
  }
}

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { std::printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("decode_loop: no CUDA device found; nothing to run (kvcomp needs a GPU).\n");
    return 0;
  }
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  kvcomp::Config cfg;
  cfg.layers = kLayers; cfg.kv_heads = kH; cfg.q_heads = kHq; cfg.head_dim = kD;
  cfg.max_seqs = 1; cfg.max_tokens_per_seq = kPrompt + kDecode; cfg.pool_bytes = size_t(512) << 20;
  const int total = kPrompt + kDecode;
  try {
    kvcomp::Cache cache(cfg);
    const int s = cache.add_sequence();
    __half *k, *v, *q, *out, *out16, *k16, *v16;
    CK(cudaMalloc(&k, size_t(total) * kH * kD * 2)); CK(cudaMalloc(&v, size_t(total) * kH * kD * 2));
    CK(cudaMalloc(&k16, size_t(total) * kH * kD * 2)); CK(cudaMalloc(&v16, size_t(total) * kH * kD * 2));
    CK(cudaMalloc(&q, kHq * kD * 2)); CK(cudaMalloc(&out, kHq * kD * 2)); CK(cudaMalloc(&out16, kHq * kD * 2));
    gen_kv<<<64, 256>>>(q, 99, 0, 4, 2, true);  // 4 tokens x 8 heads x 128 = 32 q heads
    // Prefill every layer.
    for (int l = 0; l < kLayers; ++l) {
      gen_kv<<<1024, 256>>>(k, l, 0, kPrompt, 0, true);
      gen_kv<<<1024, 256>>>(v, l, 0, kPrompt, 1, true);
      cache.append(l, {s}, {kPrompt}, k, v, 0);
    }
    CK(cudaDeviceSynchronize());
    // Decode: each step appends one token per layer and attends.
    const auto t0 = std::chrono::steady_clock::now();
    for (int step = 0; step < kDecode; ++step)
      for (int l = 0; l < kLayers; ++l) {
        gen_kv<<<4, 256>>>(k, l, kPrompt + step, 1, 0, true);
        gen_kv<<<4, 256>>>(v, l, kPrompt + step, 1, 1, true);
        cache.append(l, {s}, {1}, k, v, 0);
        cache.attend(l, {s}, q, out, kvcomp::DType::F16, 0);
      }
    CK(cudaDeviceSynchronize());
    const double loop_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    // Attention alone at the final context, kvcomp vs fp16 flash-decoding, all layers.
    float max_dev = 0, max_ref = 0;
    cudaEvent_t a, b;
    cudaEventCreate(&a); cudaEventCreate(&b);
    float kv_ms = 0, fp_ms = 0;
    std::vector<float> ws_dummy;
    float* ws;
    const kvcomp::baseline::Fp16Attention fa{k16, v16, 1, kH, kHq, kD, total};
    CK(cudaMalloc(&ws, kvcomp::baseline::flash_workspace_floats(fa, sms) * 4));
    for (int l = 0; l < kLayers; ++l) {
      gen_kv<<<1024, 256>>>(k16, l, 0, total, 0, false);
      gen_kv<<<1024, 256>>>(v16, l, 0, total, 1, false);
      for (int rep = 0; rep < 2; ++rep) {  // second pass timed
        cudaEventRecord(a);
        cache.attend(l, {s}, q, out, kvcomp::DType::F16, 0);
        cudaEventRecord(b);
        cudaEventSynchronize(b);
        float ms; cudaEventElapsedTime(&ms, a, b); if (rep) kv_ms += ms;
        cudaEventRecord(a);
        kvcomp::baseline::flash_decode_fp16(fa, q, out16, ws, sms, 0);
        cudaEventRecord(b);
        cudaEventSynchronize(b);
        cudaEventElapsedTime(&ms, a, b); if (rep) fp_ms += ms;
      }
      std::vector<__half> o(kHq * kD), o16(kHq * kD);
      CK(cudaMemcpy(o.data(), out, o.size() * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(o16.data(), out16, o16.size() * 2, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < o.size(); ++i) {
        max_dev = std::fmax(max_dev, std::fabs(__half2float(o[i]) - __half2float(o16[i])));
        max_ref = std::fmax(max_ref, std::fabs(__half2float(o16[i])));
      }
    }
    const kvcomp::Stats st = cache.stats();
    const double fp16_bytes = double(total) * kLayers * kH * kD * 2 * 2;
    std::printf("decode_loop: %d layers, %d kv heads / %d q heads, head_dim %d, prompt %d + %d decoded tokens\n",
                kLayers, kH, kHq, kD, kPrompt, kDecode);
    std::printf("  kvcomp decode loop (append + attend, all layers): %.1f tokens/s\n", kDecode / loop_s);
    std::printf("  attention per token at %d tokens, all layers:  kvcomp %.3f ms (%.0f tokens/s)   fp16 flash %.3f ms (%.0f tokens/s)\n",
                total, kv_ms, 1e3 / kv_ms, fp_ms, 1e3 / fp_ms);
    std::printf("  KV bytes: kvcomp %.2f MB (%.1f B/token/layer/head)   fp16 %.2f MB   ratio %.2fx\n",
                (st.compressed_bytes + st.tail_bytes) / 1e6,
                double(st.compressed_bytes + st.tail_bytes) / (double(total) * kLayers * kH), fp16_bytes / 1e6,
                st.ratio_vs_fp16);
    std::printf("  max |attention(kvcomp) - attention(fp16)| = %.4g (max |output| %.4g)\n", max_dev, max_ref);
    cudaFree(k); cudaFree(v); cudaFree(k16); cudaFree(v16); cudaFree(q); cudaFree(out); cudaFree(out16); cudaFree(ws);
  } catch (const kvcomp::Error& e) {
    std::printf("%s\n", e.what());
    return 1;
  }
  return 0;
}
