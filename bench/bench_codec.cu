// The store path: prefill throughput and compression ratio vs error bound, on
// GPU-generated data, on the quality harness's synthetic KV (bench/kv_dump.hpp)
// and on a KV dump file (--kv_dump=path.json, the harness's format); and the
// decode step that closes a block in every layer.
//
// Counters: input_GBps (fp16 K+V bytes appended per second), ratio (fp16
// bytes / stored bytes, from Cache::stats()), host_us (the host part of the
// prefill append: planning, uploading and launching; inside the measured time).
#include <benchmark/benchmark.h>
#include <cuda_fp16.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench_util.cuh"
#include "kv_dump.hpp"
#include "kvcomp/cache.hpp"

namespace {

using kvcomp_bench::fill_normal;

/// fp16 K/V of one layer on the device, [tokens][heads][D].
struct LayerKv {
  int tokens = 0, heads = 8, q_heads = 32, D = 128;
  __half *k = nullptr, *v = nullptr;
  ~LayerKv() { cudaFree(k); cudaFree(v); }
  size_t values() const { return size_t(tokens) * heads * D; }
  /// `rows` tokens of GPU-generated K (outlier channels) and V.
  void fill(int rows, uint64_t seed_k, uint64_t seed_v, int grid = 256) {
    tokens = rows;
    CK(cudaMalloc(&k, values() * 2)); CK(cudaMalloc(&v, values() * 2));
    fill_normal<<<grid, 256>>>(k, values(), D, seed_k, true);
    fill_normal<<<grid, 256>>>(v, values(), D, seed_v, false);
  }
};

/// Appends `kv` as one sequence `iterations` times (state.iterations()).
void time_store(benchmark::State& st, const LayerKv& kv, float eb) {
  kvcomp::Config cfg;
  cfg.layers = 1; cfg.kv_heads = kv.heads; cfg.q_heads = kv.q_heads; cfg.head_dim = kv.D;
  cfg.k_bound = cfg.v_bound = {kvcomp::BoundMode::Relative, eb};
  cfg.max_seqs = 1; cfg.max_tokens_per_seq = kv.tokens; cfg.pool_bytes = kv.values() * 2 * 2 * 2;
  kvcomp::Cache cache(cfg);
  {  // warm-up: builds the codebooks and grows scratch
    const int s = cache.add_sequence();
    cache.append(0, {s}, {kv.tokens}, kv.k, kv.v, 0);
    cache.remove_sequence(s);
  }
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  double ratio = 0, host_s = 0;
  for (auto _ : st) {
    const int s = cache.add_sequence();
    cudaEventRecord(a);
    const auto h0 = std::chrono::steady_clock::now();
    cache.append(0, {s}, {kv.tokens}, kv.k, kv.v, 0);
    host_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - h0).count();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    st.SetIterationTime(ms / 1e3);
    ratio = cache.stats().ratio_vs_fp16;
    cache.remove_sequence(s);
  }
  CK(cudaGetLastError());
  cudaEventDestroy(a); cudaEventDestroy(b);
  st.counters["input_GBps"] = benchmark::Counter(double(kv.values()) * 2 * 2 / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["ratio"] = ratio;
  // The host's part of append (planning the jobs, uploading them, launching): the GPU waits for it
  // when the stream is idle, as here, so it is inside the measured time.
  st.counters["host_us"] = benchmark::Counter(host_s * 1e6, benchmark::Counter::kAvgIterations);
}

float eb_of(int64_t thousandths) { return float(thousandths) / 1000.f; }

// GPU-generated data (every 16th K channel an outlier): throughput at scale.
void BM_store_prefill(benchmark::State& st) {
  LayerKv kv;
  kv.fill(int(st.range(0)), 11, 12, 1024);
  CK(cudaDeviceSynchronize());
  time_store(st, kv, eb_of(st.range(1)));
}

// The quality harness's synthetic KV (outlier channels, RoPE, heavy tails), layer 0.
std::unique_ptr<LayerKv> g_synthetic;
void BM_store_synthetic(benchmark::State& st) {
  if (!g_synthetic) {
    kvcomp_bench::KvData d;
    d.layers = 1; d.tokens = 32768; d.queries = 1;
    kvcomp_bench::synthesize(d, 1);
    g_synthetic = std::make_unique<LayerKv>();
    g_synthetic->tokens = d.tokens;
    std::vector<__half> k(d.k.size()), v(d.v.size());
    for (size_t i = 0; i < k.size(); ++i) { k[i] = __float2half_rn(d.k[i]); v[i] = __float2half_rn(d.v[i]); }
    CK(cudaMalloc(&g_synthetic->k, k.size() * 2)); CK(cudaMalloc(&g_synthetic->v, v.size() * 2));
    CK(cudaMemcpy(g_synthetic->k, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(g_synthetic->v, v.data(), v.size() * 2, cudaMemcpyHostToDevice));
  }
  time_store(st, *g_synthetic, eb_of(st.range(0)));
}

// A KV dump: every layer appended as one sequence; the label names the layer.
std::vector<std::unique_ptr<LayerKv>> g_dump;
void BM_store_dump(benchmark::State& st) {
  const LayerKv& kv = *g_dump[size_t(st.range(0))];
  time_store(st, kv, eb_of(st.range(1)));
  st.SetLabel("layer " + std::to_string(st.range(0)));
}

void load_dump_layers(const std::string& path) {
  kvcomp_bench::KvData d;
  kvcomp_bench::load_dump(path, d);
  for (int l = 0; l < d.layers; ++l) {
    auto kv = std::make_unique<LayerKv>();
    kv->tokens = d.tokens; kv->heads = d.kv_heads; kv->q_heads = d.q_heads; kv->D = d.head_dim;
    const size_t n = kv->values();
    std::vector<__half> k(n), v(n);
    for (size_t i = 0; i < n; ++i) { k[i] = __float2half_rn(d.k[size_t(l) * n + i]); v[i] = __float2half_rn(d.v[size_t(l) * n + i]); }
    CK(cudaMalloc(&kv->k, n * 2)); CK(cudaMalloc(&kv->v, n * 2));
    CK(cudaMemcpy(kv->k, k.data(), n * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(kv->v, v.data(), n * 2, cudaMemcpyHostToDevice));
    g_dump.push_back(std::move(kv));
  }
  for (int l = 0; l < d.layers; ++l)
    for (int eb : {5, 10, 20, 50, 100})
      benchmark::RegisterBenchmark("BM_store_dump", BM_store_dump)->Args({l, eb})->UseManualTime()
          ->Unit(benchmark::kMillisecond)->MinTime(0.1);
}

// Decode step that closes a block for every sequence: 32 layers x 8 heads x batch 8.
constexpr int kStepLayers = 32, kStepBatch = 8;
kvcomp::Config close_step_config() {
  kvcomp::Config cfg;
  cfg.layers = kStepLayers; cfg.kv_heads = 8; cfg.q_heads = 32; cfg.head_dim = 128; cfg.block_tokens = 64;
  cfg.max_seqs = kStepBatch; cfg.max_tokens_per_seq = 1 << 16; cfg.pool_bytes = size_t(2) << 30;
  return cfg;
}

void BM_decode_close_step(benchmark::State& st) {
  const int layers = kStepLayers, B = kStepBatch, T = 64;
  const kvcomp::Config cfg = close_step_config();
  kvcomp::Cache cache(cfg);
  LayerKv in;  // B x T input rows [token][head][D] (8 heads, D 128, as close_step_config); appends read from row 0
  in.fill(B * T, 21, 22);
  const __half *k = in.k, *v = in.v;
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
  cudaEventDestroy(a); cudaEventDestroy(e);
}

// The same step through a DecodePlan: 32 layers of append(plan) captured in
// one CUDA graph; T - 1 replays fill the tails (untimed), the timed replay
// closes a block for every sequence and layer.
void BM_decode_close_step_graph(benchmark::State& st) {
  const int layers = kStepLayers, B = kStepBatch, T = 64;
  const kvcomp::Config cfg = close_step_config();
  kvcomp::Cache cache(cfg);
  LayerKv in;  // one input row per sequence
  in.fill(B, 21, 22);
  const __half *k = in.k, *v = in.v;
  std::vector<int> ids;
  for (int b = 0; b < B; ++b) ids.push_back(cache.add_sequence());
  const kvcomp::DecodePlan plan = cache.make_plan(B);
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cache.set_plan(plan, ids, s);
  CK(cudaStreamSynchronize(s));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  for (int l = 0; l < layers; ++l) cache.append(plan, l, k, v, s);
  CK(cudaStreamEndCapture(s, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, e;
  cudaEventCreate(&a); cudaEventCreate(&e);
  int64_t stored = 0;
  for (auto _ : st) {
    for (int t = 0; t < T - 1; ++t) CK(cudaGraphLaunch(exec, s));
    cudaEventRecord(a, s);
    CK(cudaGraphLaunch(exec, s));
    cudaEventRecord(e, s);
    cudaEventSynchronize(e);
    stored += T;
    float ms = 0;
    cudaEventElapsedTime(&ms, a, e);
    st.SetIterationTime(ms / 1e3);
  }
  cache.check(s);
  if (cache.tokens(ids[0], layers - 1) != stored) st.SkipWithError("the graph did not append every token");
  st.counters["layers_per_step"] = layers;
  cudaGraphExecDestroy(exec); cudaGraphDestroy(graph);
  cudaEventDestroy(a); cudaEventDestroy(e);
  cudaStreamDestroy(s);
}

}  // namespace

// {tokens, eb x 1000}
BENCHMARK(BM_store_prefill)->ArgsProduct({{4096, 32768, 131072}, {10, 50, 100}})->UseManualTime()
    ->Unit(benchmark::kMillisecond)->MinTime(0.2);
// {eb x 1000}: ratio vs error bound on the harness's synthetic KV (32k tokens)
BENCHMARK(BM_store_synthetic)->Arg(5)->Arg(10)->Arg(20)->Arg(50)->Arg(100)->UseManualTime()
    ->Unit(benchmark::kMillisecond)->MinTime(0.1);
BENCHMARK(BM_decode_close_step)->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(20);
BENCHMARK(BM_decode_close_step_graph)->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(20);

int main(int argc, char** argv) {
  if (kvcomp_bench::no_gpu("bench_codec")) return 0;
  std::vector<char*> args;
  std::string dump;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--kv_dump=", 10) == 0) dump = argv[i] + 10; else args.push_back(argv[i]);
  }
  try {
    if (!dump.empty()) load_dump_layers(dump);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_codec: %s\n", e.what());
    return 1;
  }
  int n = int(args.size());
  kvcomp_bench::measure_copy_bandwidth();
  benchmark::Initialize(&n, args.data());
  benchmark::RunSpecifiedBenchmarks();
  g_synthetic.reset();
  g_dump.clear();
  benchmark::Shutdown();
  return 0;
}
