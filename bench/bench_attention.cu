// Decode attention on the same data: kvcomp, fp16 flash-decoding, cuBLAS
// attention, KIVI-style 4-bit and 2-bit fused kernels. Store throughput is in
// bench_codec.
//
// Counters: bytes_read (what the variant reads from HBM for K/V), floor_us
// (bytes_read / measured copy bandwidth), eff_TBps (fp16-equivalent K/V bytes
// / time), ratio (fp16 bytes / compressed bytes).
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>
#include <cstdio>
#include <map>
#include <memory>

#include "kvcomp/cache.hpp"
#include "src/baselines.hpp"
#include "src/kivi.hpp"
#include "bench_util.cuh"

namespace {

constexpr int kH = 8;
int g_sms = 132;
double g_copy_bw = 0;

using kvcomp_bench::fill_normal;

struct Setup {
  int N = 0, B = 0, G = 4, D = 128;
  float eb = 0;
  int Hq() const { return kH * G; }
  __half *k = nullptr, *v = nullptr, *q = nullptr, *out = nullptr;
  float* flash_ws = nullptr;
  void* cublas_ws = nullptr;
  cublasHandle_t handle = nullptr;
  std::unique_ptr<kvcomp::Cache> cache;
  std::map<int, std::unique_ptr<kvcomp::Cache>> config_caches;  // kvcomp's Config variants, by Variant (kvcomp_cache)
  std::unique_ptr<kvcomp::baseline::KiviCache> kivi[2];  // 4-bit, 2-bit (built on first use)
  float* kivi_ws = nullptr;
  std::vector<int> ids;
  size_t compressed = 0;
  ~Setup() {
    cudaFree(k); cudaFree(v); cudaFree(q); cudaFree(out); cudaFree(flash_ws); cudaFree(cublas_ws); cudaFree(kivi_ws);
    if (handle) cublasDestroy(handle);
  }
  kvcomp::baseline::Fp16Attention fp16() const { return {k, v, B, kH, Hq(), D, N}; }
  size_t fp16_bytes() const { return size_t(B) * kH * N * D * 2 * sizeof(__half); }
  kvcomp::baseline::KiviCache& kivi_cache(int bits) {
    auto& c = kivi[bits == 4 ? 0 : 1];
    if (!c) {
      kvcomp::baseline::KiviShape sh;
      sh.batch = B; sh.kv_heads = kH; sh.q_heads = Hq(); sh.head_dim = D; sh.tokens = N; sh.bits = bits;
      c = std::make_unique<kvcomp::baseline::KiviCache>(sh);
      c->build(k, v, 0);
      if (!kivi_ws) CK(cudaMalloc(&kivi_ws, c->workspace_floats(g_sms) * 4));
      CK(cudaDeviceSynchronize());
    }
    return *c;
  }
};

std::unique_ptr<Setup> g_setup;
std::unique_ptr<kvcomp::Cache> make_cache(const Setup& s, kvcomp::Transform transform = kvcomp::Transform::None,
                                          int window = 0, int block_tokens = 64,
                                          kvcomp::TailFormat tail = kvcomp::TailFormat::Input, int capacity = 0);

Setup& setup(int N, int B, int G, int D, float eb) {
  if (g_setup && g_setup->N == N && g_setup->B == B && g_setup->G == G && g_setup->D == D && g_setup->eb == eb)
    return *g_setup;
  g_setup.reset();
  auto s = std::make_unique<Setup>();
  s->N = N; s->B = B; s->G = G; s->D = D; s->eb = eb;
  const size_t kv = size_t(B) * kH * N * D, qn = size_t(B) * s->Hq() * D;
  CK(cudaMalloc(&s->k, kv * 2)); CK(cudaMalloc(&s->v, kv * 2));
  CK(cudaMalloc(&s->q, qn * 2)); CK(cudaMalloc(&s->out, qn * 2));
  fill_normal<<<1024, 256>>>(s->k, kv, D, 1, true);
  fill_normal<<<1024, 256>>>(s->v, kv, D, 2, false);
  fill_normal<<<64, 256>>>(s->q, qn, D, 3, false);
  CK(cudaGetLastError());
  CK(cudaMalloc(&s->flash_ws, kvcomp::baseline::flash_workspace_floats(s->fp16(), g_sms) * 4));
  CK(cudaMalloc(&s->cublas_ws, kvcomp::baseline::cublas_workspace_bytes(s->fp16())));
  cublasCreate(&s->handle);
  for (int b = 0; b < B; ++b) s->ids.push_back(b);  // make_cache adds sequences 0..B-1
  s->cache = make_cache(*s);
  s->compressed = s->cache->stats().compressed_bytes;
  g_setup = std::move(s);
  return *g_setup;
}

/// capacity: Config::max_tokens_per_seq (0: the context, N).
std::unique_ptr<kvcomp::Cache> make_cache(const Setup& s, kvcomp::Transform transform, int window, int block_tokens,
                                          kvcomp::TailFormat tail, int capacity) {
  kvcomp::Config cfg;
  cfg.tail_format = tail;
  cfg.transform = transform;
  cfg.window = window;
  cfg.block_tokens = block_tokens;
  cfg.max_attend_batch = std::min(256, 16 * s.B);  // multi-token queries: up to 16 a sequence
  cfg.layers = 1; cfg.kv_heads = kH; cfg.q_heads = s.Hq(); cfg.head_dim = s.D;
  cfg.k_bound = cfg.v_bound = {kvcomp::BoundMode::Relative, s.eb};
  cfg.max_seqs = s.B; cfg.max_tokens_per_seq = capacity > 0 ? capacity : s.N;
  cfg.pool_bytes = size_t(s.B) * kH * s.N * s.D * 2 + (size_t(64) << 20);  // room for ratio >= 2
  auto cache = std::make_unique<kvcomp::Cache>(cfg);
  for (int b = 0; b < s.B; ++b) {
    const int id = cache->add_sequence();
    const size_t off = size_t(b) * kH * s.N * s.D;  // this sequence in [B][H][N][D]
    cache->append(0, {id}, {s.N}, s.k + off, s.v + off, 0, /*token_stride=*/s.D, /*head_stride=*/int64_t(s.N) * s.D);
  }
  CK(cudaDeviceSynchronize());
  return cache;
}


/// Manual time per iteration: CUDA events (on `stream`, where run() works) around one call, after 3 warm-up calls.
template <class Run>
void time_calls(benchmark::State& st, Run&& run, cudaStream_t stream = 0) {
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) run();
  CK(cudaDeviceSynchronize());
  for (auto _ : st) {
    cudaEventRecord(a, stream);
    run();
    cudaEventRecord(b, stream);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    st.SetIterationTime(ms / 1e3);
  }
  CK(cudaGetLastError());
  cudaEventDestroy(a); cudaEventDestroy(b);
}

enum Variant { kFlash = 1, kCublas = 2, kKvcomp = 3, kKivi4 = 4, kKivi2 = 5, kKvcompHadamard = 7, kKvcompT32 = 8, kKvcompT128 = 9,
               kKvcompCodes8 = 10, kKvcompCodes6 = 11 };  // numbers name the benchmarks

/// kvcomp's variants: the Config each reads (the default cache, or one built on first use) and its label.
struct KvcompVariant {
  Variant var;
  kvcomp::Transform transform;
  int block_tokens;
  kvcomp::TailFormat tail;
  const char* label;
};
constexpr auto kInput = kvcomp::TailFormat::Input;
constexpr KvcompVariant kKvcompVariants[] = {
    {kKvcomp, kvcomp::Transform::None, 64, kInput, "kvcomp eb0.05"},
    {kKvcompHadamard, kvcomp::Transform::Hadamard, 64, kInput, "kvcomp eb0.05 hadamard"},
    {kKvcompT32, kvcomp::Transform::None, 32, kInput, "kvcomp eb0.05 T32"},
    {kKvcompT128, kvcomp::Transform::None, 128, kInput, "kvcomp eb0.05 T128"},
    {kKvcompCodes8, kvcomp::Transform::None, 64, kvcomp::TailFormat::Codes8, "kvcomp eb0.05 codes8"},
    {kKvcompCodes6, kvcomp::Transform::None, 64, kvcomp::TailFormat::Codes6, "kvcomp eb0.05 codes6"},
};
const KvcompVariant* kvcomp_variant(Variant var) {
  for (const KvcompVariant& v : kKvcompVariants)
    if (v.var == var) return &v;
  return nullptr;
}
/// The cache a kvcomp variant reads (null for the baselines).
kvcomp::Cache* kvcomp_cache(Setup& s, Variant var) {
  const KvcompVariant* v = kvcomp_variant(var);
  if (!v) return nullptr;
  if (var == kKvcomp) return s.cache.get();
  auto& c = s.config_caches[var];
  if (!c) c = make_cache(s, v->transform, 0, v->block_tokens, v->tail);
  return c.get();
}

void BM_attention(benchmark::State& st) {
  const int N = int(st.range(0)), B = int(st.range(1));
  const Variant var = Variant(st.range(2));
  const int G = int(st.range(3)), D = int(st.range(4));
  Setup& s = setup(N, B, G, D, 0.05f);
  kvcomp::baseline::KiviCache* kivi = (var == kKivi4 || var == kKivi2) ? &s.kivi_cache(var == kKivi4 ? 4 : 2) : nullptr;
  kvcomp::Cache* kc = kvcomp_cache(s, var);
  auto run = [&] {
    if (kc) {
      kc->attend(0, s.ids, s.q, s.out, kvcomp::DType::F16, 0);
      return;
    }
    switch (var) {
      case kFlash: kvcomp::baseline::flash_decode_fp16(s.fp16(), s.q, s.out, s.flash_ws, g_sms, 0); break;
      case kCublas: kvcomp::baseline::cublas_attention(s.handle, s.fp16(), s.q, s.out, s.cublas_ws, 0); break;
      case kKivi4:
      case kKivi2: kivi->attend(s.q, s.out, s.kivi_ws, g_sms, 0); break;
      default: break;
    }
  };
  time_calls(st, run);
  const double bytes = var == kKvcomp ? double(s.compressed)
                       : kc   ? double(kc->stats().compressed_bytes)
                       : kivi ? double(kivi->shape().bytes())
                              : double(s.fp16_bytes());
  st.counters["bytes_read"] = bytes;
  st.counters["floor_us"] = bytes / g_copy_bw * 1e6;
  st.counters["eff_TBps"] = benchmark::Counter(double(s.fp16_bytes()) / 1e12, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["ratio"] = double(s.fp16_bytes()) / bytes;
  st.SetLabel(kc ? kvcomp_variant(var)->label
              : var == kFlash ? "flash-fp16" : var == kCublas ? "cublas-fp16" : var == kKivi4 ? "kivi-4bit" : "kivi-2bit");
}

constexpr Variant kMain[] = {kKvcomp, kFlash, kCublas, kKivi4, kKivi2};

/// kvcomp with n query tokens per sequence (speculative verification: causal
/// over the sequence's last n tokens) and optionally a sliding window;
/// bench/sdpa_anchor.py times SDPA on the same shapes (its "queries" sweep).
void BM_attention_queries(benchmark::State& st) {
  const int N = int(st.range(0)), B = int(st.range(1)), G = int(st.range(2)), D = int(st.range(3));
  const int n = int(st.range(4)), window = int(st.range(5));
  Setup& s = setup(N, B, G, D, 0.05f);
  std::unique_ptr<kvcomp::Cache> windowed = window ? make_cache(s, kvcomp::Transform::None, window) : nullptr;
  kvcomp::Cache& cache = windowed ? *windowed : *s.cache;
  const size_t rows = size_t(B) * n * s.Hq() * D;
  __half *q = nullptr, *out = nullptr;
  CK(cudaMalloc(&q, rows * 2));
  CK(cudaMalloc(&out, rows * 2));
  fill_normal<<<64, 256>>>(q, rows, D, 4, false);
  const std::vector<int> counts(B, n);
  time_calls(st, [&] { cache.attend(0, s.ids, counts, q, out, kvcomp::DType::F16, 0); });
  cudaFree(q); cudaFree(out);
  st.counters["bytes_read"] = double(cache.stats().compressed_bytes);
  st.SetLabel("kvcomp eb0.05 n" + std::to_string(n) + (window ? " window " + std::to_string(window) : ""));
}

/// A decode step as an engine replays it from a CUDA graph: kvcomp's plan-based
/// attend (Cache::make_plan, set_plan; captured once) or the fp16 flash-decoding
/// baseline, captured and replayed; one graph launch a call. The plan's split is
/// fixed at capture for the cache's capacity (Config::max_tokens_per_seq: the
/// context itself, or the 128k an engine might allocate for), while the eager
/// rows (BM_attention) plan every call for its actual lengths and pay the host's
/// launch work inside the timed interval.
void BM_attention_graph(benchmark::State& st) {
  const int N = int(st.range(0)), B = int(st.range(1)), capacity = int(st.range(2));
  const bool flash = st.range(3) != 0;
  Setup& s = setup(N, B, 4, 128, 0.05f);
  std::unique_ptr<kvcomp::Cache> cache =
      flash ? nullptr : make_cache(s, kvcomp::Transform::None, 0, 64, kvcomp::TailFormat::Input, capacity);
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  kvcomp::DecodePlan plan;
  if (cache) {
    plan = cache->make_plan(B);
    cache->set_plan(plan, s.ids, stream);
    CK(cudaStreamSynchronize(stream));
  }
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  if (cache) cache->attend(plan, 0, s.q, s.out, kvcomp::DType::F16, stream);
  else kvcomp::baseline::flash_decode_fp16(s.fp16(), s.q, s.out, s.flash_ws, g_sms, stream);
  CK(cudaStreamEndCapture(stream, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  time_calls(st, [&] { cudaGraphLaunch(exec, stream); }, stream);
  if (cache) cache->check(stream);
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  CK(cudaStreamDestroy(stream));
  st.counters["bytes_read"] = cache ? double(cache->stats().compressed_bytes) : double(s.fp16_bytes());
  st.SetLabel(flash ? "flash-fp16 graph"
                    : "kvcomp eb0.05 graph, capacity " + std::to_string(capacity > 0 ? capacity : N));
}

// {context, batch, capacity (0: the context), flash-fp16 instead of kvcomp}.
void graph_args(benchmark::internal::Benchmark* b) {
  for (const auto& nb : std::vector<std::pair<int, int>>{{1024, 1}, {1087, 1}, {4096, 1}, {4096, 8}, {32768, 1},
                                                         {32768, 8}, {32831, 8}}) {
    b->Args({nb.first, nb.second, 0, 0});
    b->Args({nb.first, nb.second, 131072, 0});
  }
  for (const auto& nb : std::vector<std::pair<int, int>>{{1024, 1}, {4096, 1}, {32768, 8}})
    b->Args({nb.first, nb.second, 0, 1});
}

// {context, batch, G, D, queries per sequence, window} at 32k x 8.
void queries_args(benchmark::internal::Benchmark* b) {
  for (int n : {1, 2, 4, 8, 16}) b->Args({32768, 8, 4, 128, n, 0});
  for (int n : {1, 4}) b->Args({32768, 8, 1, 128, n, 0});
  b->Args({32768, 8, 4, 128, 1, 4096});  // Mistral's window
  b->Args({32768, 8, 4, 128, 4, 4096});
}

// {context, batch, variant, q heads per kv head, head_dim}; 8 kv heads throughout.
void attention_args(benchmark::internal::Benchmark* b) {
  for (int n : {1024, 4096, 16384, 32768, 65536, 131072})
    for (int batch : {1, 8})
      for (int var : kMain) b->Args({n, batch, var, 4, 128});
  for (int var : kMain) b->Args({524288, 1, var, 4, 128});
  for (int n : {1024, 4096, 16384, 32768})
    for (int var : kMain) b->Args({n, 32, var, 4, 128});
}
// GQA groups and head_dim 64 at 32k x 8.
void sweep_args(benchmark::internal::Benchmark* b) {
  for (int g : {1, 8})
    for (int var : kMain) b->Args({32768, 8, var, g, 128});
  for (int var : kMain) b->Args({32768, 8, var, 4, 64});
  // GQA groups that run padded (Llama-3.2-3B: 3, Qwen2.5-7B: 7): kvcomp only (the fp16 flash baseline takes 1/4/8; KIVI takes 1..8 but is not registered here).
  for (int g : {3, 7, 16}) b->Args({32768, 8, kKvcomp, g, 128});
  // head_dim 80 (Phi-2), 96 (Phi-3) and 256 (Gemma): kvcomp only (the baselines take 64 and 128).
  b->Args({32768, 8, kKvcomp, 4, 80});
  b->Args({32768, 8, kKvcomp, 4, 96});
  b->Args({32768, 8, kKvcomp, 4, 256});
  // Config::transform = Hadamard (q rotated in the kernel, output in the merge).
  for (int n : {1024, 32768}) b->Args({n, 8, kKvcompHadamard, 4, 128});
  b->Args({131072, 1, kKvcompHadamard, 4, 128});
  // Config::block_tokens = 32: half a block's serial decode (what bounds short contexts), more headers.
  for (int n : {1024, 4096})
    for (int batch : {1, 8}) b->Args({n, batch, kKvcompT32, 4, 128});
  b->Args({32768, 8, kKvcompT32, 4, 128});
  b->Args({131072, 1, kKvcompT32, 4, 128});
  // Config::block_tokens = 128: half the blocks' fixed work (params, lane tables, decoder starts) and K params
  // a token, but each warp's serial decode twice as long (bench/RESULTS.md: slower at every shape measured).
  for (const auto& nb : std::vector<std::pair<int, int>>{{4096, 8}, {32768, 8}, {131072, 1}})
    b->Args({nb.first, nb.second, kKvcompT128, 4, 128});
  // At head_dim 64 (the tiny Llama's) 128-token blocks hold V's params per channel (format.hpp), folded into
  // the output at each block's start and end; 64-token blocks per token (the kMain rows at 64 above).
  for (const auto& nb : std::vector<std::pair<int, int>>{{1024, 1}, {32768, 8}})
    b->Args({nb.first, nb.second, kKvcompT128, 4, 64});
  b->Args({1024, 1, kKvcomp, 4, 64});
  // Config::tail_format = Codes8 and Codes6 against the default (Input) where the open tail is longest (63 tokens).
  for (const auto& nb : std::vector<std::pair<int, int>>{{1087, 1}, {1087, 8}, {32831, 8}})
    for (int var : {kKvcomp, kKvcompCodes8, kKvcompCodes6}) b->Args({nb.first, nb.second, var, 4, 128});
  // More contexts with a 63-token tail: what the tail costs at full load and at batch 1 (bench/RESULTS.md);
  // Codes8 at full load, where the tail rides with the last split's blocks or adds a block.
  for (const auto& nb : std::vector<std::pair<int, int>>{{4159, 1}, {4159, 8}, {16447, 8}, {32831, 1}, {131135, 1}})
    b->Args({nb.first, nb.second, kKvcomp, 4, 128});
  for (int n : {4159, 16447}) b->Args({n, 8, kKvcompCodes8, 4, 128});
}

}  // namespace

BENCHMARK(BM_attention)->Apply(attention_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
BENCHMARK(BM_attention)->Name("BM_attention_sweep")->Apply(sweep_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
BENCHMARK(BM_attention_queries)->Apply(queries_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
BENCHMARK(BM_attention_graph)->Apply(graph_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);

int main(int argc, char** argv) {
  int dev = 0;
  if (kvcomp_bench::no_gpu("bench_attention")) return 0;
  cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, dev);
  g_copy_bw = kvcomp_bench::measure_copy_bandwidth();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  g_setup.reset();
  benchmark::Shutdown();
  return 0;
}
