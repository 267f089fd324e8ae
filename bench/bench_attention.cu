// Decode attention: kvcomp vs fp16 flash-decoding vs cuBLAS attention, on the
// same data; and the store path (prefill throughput, block-closing decode step).
//
// Counters: bytes_read (what the variant reads from HBM for K/V), floor_us
// (bytes_read / measured copy bandwidth), eff_TBps (fp16-equivalent K/V bytes
// / time), ratio (fp16 bytes / compressed bytes).
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <memory>

#include "kvcomp/cache.hpp"
#include "src/baselines.hpp"

namespace {

#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) { std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); std::abort(); } \
  } while (0)

constexpr int kH = 8, kHq = 32, kD = 128;
double g_copy_bw = 0;  // bytes/s, measured in main
int g_sms = 132;

__device__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
  return uint32_t(x);
}
/// Pseudo-normal values; `outliers`: every 16th channel x10 with an offset (K-like).
__global__ void fill_kernel(__half* x, size_t n, uint64_t seed, bool outliers) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float u1 = (hash32(seed * 0x9E3779B97F4A7C15ULL + 2 * i) + 1.f) * 2.3283064e-10f;
    const float u2 = hash32(seed * 0x9E3779B97F4A7C15ULL + 2 * i + 1) * 2.3283064e-10f;
    float v = sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
    const int c = int(i % kD);
    if (outliers && c % 16 == 3) v = v * 10.f + 5.f;
    x[i] = __float2half_rn(v);
  }
}

struct Setup {
  int N = 0, B = 0;
  float eb = 0;
  __half *k = nullptr, *v = nullptr, *q = nullptr, *out = nullptr;
  float* flash_ws = nullptr;
  void* cublas_ws = nullptr;
  cublasHandle_t handle = nullptr;
  std::unique_ptr<kvcomp::Cache> cache;
  std::vector<int> ids;
  size_t compressed = 0;
  int stage = -1;
  ~Setup() {
    cudaFree(k); cudaFree(v); cudaFree(q); cudaFree(out); cudaFree(flash_ws); cudaFree(cublas_ws);
    if (handle) cublasDestroy(handle);
  }
  kvcomp::baseline::Fp16Attention fp16() const { return {k, v, B, kH, kHq, kD, N}; }
  size_t fp16_bytes() const { return size_t(B) * kH * N * kD * 2 * sizeof(__half); }
};

std::unique_ptr<Setup> g_setup;
std::unique_ptr<kvcomp::Cache> make_cache(const Setup& s, int stage_bytes);

Setup& setup(int N, int B, float eb) {
  if (g_setup && g_setup->N == N && g_setup->B == B && g_setup->eb == eb) return *g_setup;
  g_setup.reset();
  auto s = std::make_unique<Setup>();
  s->N = N; s->B = B; s->eb = eb;
  const size_t kv = size_t(B) * kH * N * kD;
  CK(cudaMalloc(&s->k, kv * 2)); CK(cudaMalloc(&s->v, kv * 2));
  CK(cudaMalloc(&s->q, size_t(B) * kHq * kD * 2)); CK(cudaMalloc(&s->out, size_t(B) * kHq * kD * 2));
  fill_kernel<<<1024, 256>>>(s->k, kv, 1, true);
  fill_kernel<<<1024, 256>>>(s->v, kv, 2, false);
  fill_kernel<<<64, 256>>>(s->q, size_t(B) * kHq * kD, 3, false);
  CK(cudaGetLastError());
  CK(cudaMalloc(&s->flash_ws, kvcomp::baseline::flash_workspace_floats(s->fp16(), g_sms) * 4));
  CK(cudaMalloc(&s->cublas_ws, kvcomp::baseline::cublas_workspace_bytes(s->fp16())));
  cublasCreate(&s->handle);
  for (int b = 0; b < B; ++b) s->ids.push_back(b);  // make_cache adds sequences 0..B-1
  s->cache = make_cache(*s, -1);
  s->compressed = s->cache->stats().compressed_bytes;
  g_setup = std::move(s);
  return *g_setup;
}

std::unique_ptr<kvcomp::Cache> make_cache(const Setup& s, int stage_bytes) {
  kvcomp::Config cfg;
  cfg.layers = 1; cfg.kv_heads = kH; cfg.q_heads = kHq; cfg.head_dim = kD;
  cfg.k_bound = cfg.v_bound = {kvcomp::BoundMode::Relative, s.eb};
  cfg.max_seqs = s.B; cfg.max_tokens_per_seq = s.N;
  cfg.pool_bytes = size_t(s.B) * kH * s.N * kD * 2 + (size_t(64) << 20);  // room for ratio >= 2
  cfg.attention_stage_bytes = stage_bytes;
  auto cache = std::make_unique<kvcomp::Cache>(cfg);
  for (int b = 0; b < s.B; ++b) {
    const int id = cache->add_sequence();
    const size_t off = size_t(b) * kH * s.N * kD;  // this sequence in [B][H][N][D]
    cache->append(0, {id}, {s.N}, s.k + off, s.v + off, 0, /*token_stride=*/kD, /*head_stride=*/int64_t(s.N) * kD);
  }
  CK(cudaDeviceSynchronize());
  return cache;
}

std::unique_ptr<kvcomp::Cache> rebuild_stage(Setup& s, int stage_bytes) {
  if (s.stage == stage_bytes) return std::move(s.cache);
  s.cache.reset();
  s.stage = stage_bytes;
  return make_cache(s, stage_bytes);
}

enum Variant { kKvcomp = 0, kFlash = 1, kCublas = 2, kKvcompDirect = 3 };

void BM_attention(benchmark::State& st) {
  const int N = int(st.range(0)), B = int(st.range(1));
  const Variant var = Variant(st.range(2));
  Setup& s = setup(N, B, 0.05f);
  if (var == kKvcomp || var == kKvcompDirect) s.cache = rebuild_stage(s, var == kKvcompDirect ? 0 : -1);
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  auto run = [&] {
    switch (var) {
      case kKvcomp:
      case kKvcompDirect: s.cache->attend(0, s.ids, s.q, s.out, kvcomp::DType::F16, 0); break;
      case kFlash: kvcomp::baseline::flash_decode_fp16(s.fp16(), s.q, s.out, s.flash_ws, g_sms, 0); break;
      case kCublas: kvcomp::baseline::cublas_attention(s.handle, s.fp16(), s.q, s.out, s.cublas_ws, 0); break;
    }
  };
  for (int i = 0; i < 3; ++i) run();
  CK(cudaDeviceSynchronize());
  for (auto _ : st) {
    cudaEventRecord(a);
    run();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    st.SetIterationTime(ms / 1e3);
  }
  CK(cudaGetLastError());
  cudaEventDestroy(a); cudaEventDestroy(b);
  const double bytes = (var == kKvcomp || var == kKvcompDirect) ? double(s.compressed) : double(s.fp16_bytes());
  st.counters["bytes_read"] = bytes;
  st.counters["floor_us"] = bytes / g_copy_bw * 1e6;
  st.counters["eff_TBps"] = benchmark::Counter(double(s.fp16_bytes()) / 1e12, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["ratio"] = double(s.fp16_bytes()) / bytes;
  st.SetLabel(var == kKvcomp ? "kvcomp eb0.05 staged" : var == kKvcompDirect ? "kvcomp eb0.05 via L1"
              : var == kFlash ? "flash-fp16" : "cublas-fp16");
}

// Store: prefill throughput of one sequence, input bytes per second.
void BM_store_prefill(benchmark::State& st) {
  const int N = int(st.range(0));
  const float eb = float(st.range(1)) / 100.f;
  const size_t kv = size_t(kH) * N * kD;
  __half *k, *v;
  CK(cudaMalloc(&k, kv * 2)); CK(cudaMalloc(&v, kv * 2));
  fill_kernel<<<1024, 256>>>(k, kv, 11, true);
  fill_kernel<<<1024, 256>>>(v, kv, 12, false);
  kvcomp::Config cfg;
  cfg.layers = 1; cfg.kv_heads = kH; cfg.q_heads = kHq; cfg.head_dim = kD;
  cfg.k_bound = cfg.v_bound = {kvcomp::BoundMode::Relative, eb};
  cfg.max_seqs = 1; cfg.max_tokens_per_seq = N; cfg.pool_bytes = kv * 2 * 2;
  kvcomp::Cache cache(cfg);
  {  // warm-up: builds the codebooks and grows scratch
    const int s = cache.add_sequence();
    cache.append(0, {s}, {N}, k, v, 0);
    cache.remove_sequence(s);
  }
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  double ratio = 0;
  for (auto _ : st) {
    const int s = cache.add_sequence();
    cudaEventRecord(a);
    cache.append(0, {s}, {N}, k, v, 0);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    st.SetIterationTime(ms / 1e3);
    ratio = cache.stats().ratio_vs_fp16;
    cache.remove_sequence(s);
  }
  CK(cudaGetLastError());
  st.counters["input_GBps"] = benchmark::Counter(double(kv) * 2 * 2 / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["ratio"] = ratio;
  cudaFree(k); cudaFree(v);
}

// Decode step that closes a block for every sequence: 32 layers x 8 heads x batch 8.
void BM_decode_close_step(benchmark::State& st) {
  const int layers = 32, B = 8, T = 64;
  kvcomp::Config cfg;
  cfg.layers = layers; cfg.kv_heads = kH; cfg.q_heads = kHq; cfg.head_dim = kD;
  cfg.max_seqs = B; cfg.max_tokens_per_seq = 1 << 16; cfg.pool_bytes = size_t(2) << 30;
  kvcomp::Cache cache(cfg);
  const size_t per_step = size_t(B) * kH * kD;
  __half *k, *v;
  CK(cudaMalloc(&k, per_step * T * 2)); CK(cudaMalloc(&v, per_step * T * 2));
  fill_kernel<<<256, 256>>>(k, per_step * T, 21, true);
  fill_kernel<<<256, 256>>>(v, per_step * T, 22, false);
  std::vector<int> ids;
  for (int b = 0; b < B; ++b) ids.push_back(cache.add_sequence());
  const std::vector<int> one(B, 1), rest(B, T - 1);
  cudaEvent_t a, e;
  cudaEventCreate(&a); cudaEventCreate(&e);
  for (auto _ : st) {
    // T-1 tokens into the tails (untimed), then the step that closes blocks.
    for (int l = 0; l < layers; ++l) cache.append(l, ids, rest, k, v, 0);
    cudaEventRecord(a);
    for (int l = 0; l < layers; ++l) cache.append(l, ids, one, k, v, 0);
    cudaEventRecord(e);
    cudaEventSynchronize(e);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, e);
    st.SetIterationTime(ms / 1e3);
    if (cache.tokens(ids[0], 0) + T > cfg.max_tokens_per_seq) {
      st.PauseTiming();
      for (int& id : ids) { cache.remove_sequence(id); id = cache.add_sequence(); }
      st.ResumeTiming();
    }
  }
  CK(cudaGetLastError());
  st.counters["layers_per_step"] = layers;
  cudaFree(k); cudaFree(v);
}

void attention_args(benchmark::internal::Benchmark* b) {
  for (int n : {1024, 4096, 16384, 32768, 65536, 131072})
    for (int batch : {1, 8})
      for (int var : {kKvcomp, kKvcompDirect, kFlash, kCublas}) b->Args({n, batch, var});
}

}  // namespace

BENCHMARK(BM_attention)->Apply(attention_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
BENCHMARK(BM_store_prefill)->ArgsProduct({{4096, 32768, 131072}, {1, 5, 10}})->UseManualTime()
    ->Unit(benchmark::kMillisecond)->MinTime(0.2);
BENCHMARK(BM_decode_close_step)->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(20);

int main(int argc, char** argv) {
  int dev = 0, n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("bench_attention: no CUDA device, nothing to measure\n");
    return 0;
  }
  cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, dev);
  {  // measured copy bandwidth: bytes read + written per second, 1 GiB D2D
    const size_t bytes = size_t(1) << 30;
    void *x, *y;
    CK(cudaMalloc(&x, bytes)); CK(cudaMalloc(&y, bytes));
    CK(cudaMemset(x, 1, bytes));
    cudaEvent_t a, b;
    cudaEventCreate(&a); cudaEventCreate(&b);
    CK(cudaMemcpy(y, x, bytes, cudaMemcpyDeviceToDevice));
    cudaEventRecord(a);
    for (int i = 0; i < 10; ++i) cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    g_copy_bw = 2.0 * bytes * 10 / (ms / 1e3);
    cudaFree(x); cudaFree(y);
    std::printf("measured copy bandwidth: %.2f TB/s (read + write)\n", g_copy_bw / 1e12);
    benchmark::AddCustomContext("copy_bw_TBps", std::to_string(g_copy_bw / 1e12));
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  g_setup.reset();
  benchmark::Shutdown();
  return 0;
}
