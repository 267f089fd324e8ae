// Beam search on a kvcomp cache: one prompt, 4 beams forked from it
// (Cache::fork shares the prompt's compressed blocks), decode steps where
// every beam appends its own token, and now and then the worst beam is
// dropped and the best one forked in its place. Prints the pool bytes the
// beams hold against 4 independent copies of the prompt, and checks that the
// pool is empty at the end. K/V/q are random here; an engine passes its own.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#include <kvcomp/cache.hpp>

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("beam_search: no CUDA device found; nothing to run.\n");
    return 0;
  }
  kvcomp::Config cfg;
  cfg.layers = 4;
  cfg.kv_heads = 8;
  cfg.q_heads = 32;
  cfg.head_dim = 128;
  cfg.max_seqs = 8;
  cfg.max_tokens_per_seq = 4096;
  cfg.pool_bytes = size_t(256) << 20;
  const int beams = 4, prompt = 2000, steps = 128, row = cfg.kv_heads * cfg.head_dim;

  // Random fp16 K/V for the prompt and for every beam's steps, and q for all beams.
  std::vector<__half> host(size_t(prompt + beams * steps) * row);
  unsigned x = 12345;
  for (auto& h : host) {
    x = x * 1664525u + 1013904223u;
    h = __float2half(float(int(x >> 16) % 2001 - 1000) / 500.f);
  }
  __half *kv, *q, *out;
  cudaMalloc(&kv, host.size() * 2);
  cudaMemcpy(kv, host.data(), host.size() * 2, cudaMemcpyHostToDevice);
  cudaMalloc(&q, size_t(beams) * cfg.q_heads * cfg.head_dim * 2);
  cudaMalloc(&out, size_t(beams) * cfg.q_heads * cfg.head_dim * 2);
  cudaMemcpy(q, host.data(), size_t(beams) * cfg.q_heads * cfg.head_dim * 2, cudaMemcpyHostToDevice);
  cudaStream_t stream;
  cudaStreamCreate(&stream);

  try {
    kvcomp::Cache cache(cfg);
    const int root = cache.add_sequence();
    for (int l = 0; l < cfg.layers; ++l) cache.append(l, {root}, {prompt}, kv, kv, stream);
    const size_t prompt_bytes = cache.stats().compressed_bytes;
    std::vector<int> beam{root};
    for (int b = 1; b < beams; ++b) beam.push_back(cache.fork(root, stream));

    for (int step = 0; step < steps; ++step) {
      if (step % 32 == 31) {  // prune: the worst beam (here: the last) goes, the best (the first) splits
        cache.remove_sequence(beam.back(), stream);
        beam.back() = cache.fork(beam.front(), stream);
      }
      for (int l = 0; l < cfg.layers; ++l)
        for (int b = 0; b < beams; ++b) {  // beam b's token of this step
          const __half* t = kv + (size_t(prompt) + size_t(b) * steps + step) * row;
          cache.append(l, {beam[b]}, {1}, t, t, stream);
        }
      for (int l = 0; l < cfg.layers; ++l) cache.attend(l, beam, q, out, kvcomp::DType::F16, stream);
    }
    cache.check(stream);
    const kvcomp::Stats st = cache.stats();
    std::printf("beam_search: %d beams x %d steps after a %d-token prompt, %d layers\n", beams, steps, prompt,
                cfg.layers);
    std::printf("  compressed bytes held: %zu (prompt %zu, shared by the beams)\n", st.compressed_bytes,
                prompt_bytes);
    std::printf("  %d independent copies of the prompt would add %zu more\n", beams, (beams - 1) * prompt_bytes);
    std::printf("  pool pages in use: %zu bytes; tokens held: %zu; ratio vs fp16: %.2f\n", st.pool_bytes_in_use,
                st.tokens, st.ratio_vs_fp16);
    for (int s : beam) cache.remove_sequence(s, stream);
    const kvcomp::Stats empty = cache.stats();
    std::printf("  after removing every beam: %zu pool bytes in use, %zu compressed\n", empty.pool_bytes_in_use,
                empty.compressed_bytes);
    if (empty.pool_bytes_in_use != 0 || empty.compressed_bytes != 0) {
      std::printf("beam_search: the pool did not return to empty\n");
      return 1;
    }
  } catch (const kvcomp::Error& e) {
    std::printf("beam_search: %s\n", e.what());
    return 1;
  }
  cudaFree(kv);
  cudaFree(q);
  cudaFree(out);
  cudaStreamDestroy(stream);
  return 0;
}
