// The smallest complete program an engine author would copy: a Cache from a
// Config, three sequences of different prompt lengths, prefill, 100 batched
// decode steps through all layers, one sequence replaced mid-way, stats.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#include <kvcomp/cache.hpp>

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("engine_integration: no CUDA device found; nothing to run.\n");
    return 0;
  }
  kvcomp::Config cfg;
  cfg.layers = 4;
  cfg.kv_heads = 8;
  cfg.q_heads = 32;
  cfg.head_dim = 128;
  cfg.max_seqs = 4;
  cfg.max_tokens_per_seq = 4096;
  cfg.pool_bytes = size_t(256) << 20;
  kvcomp::Cache cache(cfg);
  cudaStream_t stream;
  cudaStreamCreate(&stream);

  // The engine's projection outputs: [tokens, kv_heads, head_dim] fp16. Here: random.
  const int max_prompt = 1000, row = cfg.kv_heads * cfg.head_dim;
  std::vector<__half> host(size_t(max_prompt) * row);
  for (size_t i = 0; i < host.size(); ++i) host[i] = __float2half(float(int(i * 2654435761u % 2001) - 1000) / 500.f);
  __half *k, *v, *q, *out;
  cudaMalloc(&k, host.size() * 2);
  cudaMalloc(&v, host.size() * 2);
  cudaMemcpy(k, host.data(), host.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(v, host.data(), host.size() * 2, cudaMemcpyHostToDevice);
  cudaMalloc(&q, size_t(cfg.max_seqs) * cfg.q_heads * cfg.head_dim * 2);
  cudaMalloc(&out, size_t(cfg.max_seqs) * cfg.q_heads * cfg.head_dim * 2);
  cudaMemcpy(q, host.data(), size_t(cfg.max_seqs) * cfg.q_heads * cfg.head_dim * 2, cudaMemcpyHostToDevice);

  try {
    std::vector<int> seqs;
    for (int prompt : {100, 500, 1000}) {
      seqs.push_back(cache.add_sequence());
      for (int l = 0; l < cfg.layers; ++l) cache.append(l, {seqs.back()}, {prompt}, k, v, stream);
    }
    for (int step = 0; step < 100; ++step) {
      if (step == 50) {  // a request finishes, a new one arrives
        cudaStreamSynchronize(stream);
        cache.remove_sequence(seqs[1]);
        seqs[1] = cache.add_sequence();
        for (int l = 0; l < cfg.layers; ++l) cache.append(l, {seqs[1]}, {200}, k, v, stream);
      }
      const std::vector<int> one(seqs.size(), 1);
      for (int l = 0; l < cfg.layers; ++l) {
        cache.append(l, seqs, one, k + step * row, v + step * row, stream);  // this step's K/V
        cache.attend(l, seqs, q, out, kvcomp::DType::F16, stream);          // and attention
      }
    }
    cudaStreamSynchronize(stream);
    const kvcomp::Stats st = cache.stats();
    std::printf("engine_integration: %zu tokens stored over %d layers\n", st.tokens, cfg.layers);
    std::printf("  compressed %zu B, tail %zu B, pool in use %zu of %zu B, metadata reserved %zu B\n",
                st.compressed_bytes, st.tail_bytes, st.pool_bytes_in_use, st.pool_capacity, st.metadata_bytes);
    std::printf("  ratio vs fp16: %.2fx\n", st.ratio_vs_fp16);
    for (int l = 0; l < cfg.layers; ++l)
      std::printf("  layer %d: %zu tokens, %zu compressed bytes, %zu tail tokens\n", l, st.per_layer[l].tokens,
                  st.per_layer[l].compressed_bytes, st.per_layer[l].tail_tokens);
  } catch (const kvcomp::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  cudaFree(k); cudaFree(v); cudaFree(q); cudaFree(out);
  cudaStreamDestroy(stream);
  return 0;
}
