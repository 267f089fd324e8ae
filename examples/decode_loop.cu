// decode_loop: a synthetic multi-layer decoder with random but fixed weights
// that prefills a prompt and decodes tokens greedily, once with a kvcomp cache
// and once with an fp16 cache read by our fp16 flash-decoding kernel.
//
// The model (fixed seed): 8 layers, d_model 1024, 32 query / 8 kv heads of
// 128 dims, vocabulary 4096 with tied embeddings. A layer: RMSNorm, q/k/v
// projections (K has outlier channels: every 16th channel of a head scaled x8
// with a +4 bias, as real keys have), RoPE, attention over the cache, output
// projection added to the fp32 residual. Logits = E . RMSNorm(x), greedy.
// The prompt is prefilled in chunks of 64 tokens: each chunk attends to the
// tokens before it (block-causal, so prefill needs only decode attention), then
// its K/V are appended in one call.
//
// Prints: decode tokens/s for both runs, attention time per token at the final
// context, KV bytes of both caches, the attention-output deviation of kvcomp
// from fp16 attention on identical inputs (a shadow fp16 cache in the kvcomp
// run), and how many greedy tokens the two runs agree on.
//
// Graph mode (two more kvcomp runs, same prompt and prefill): decode through
// a kvcomp::DecodePlan, one decode step (embedding, every layer's cuBLAS
// projections, RoPE, append(plan), attend(plan), output projection, logits,
// argmax) once as eager launches and once captured in a CUDA graph replayed
// for every token; the token and the position live on the device, so neither
// loop synchronizes per token. Prints tokens/s of both and checks that the
// graph decodes the same greedy tokens as the eager plan run (exit code 1 if
// not); it also reports agreement with the eager-API kvcomp run above (its
// attention may split the tokens differently: fp32 order, so it may differ).
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvcomp/cache.hpp"
#include "src/baselines.hpp"

namespace {

constexpr int kLayers = 8, kH = 8, kHq = 32, kD = 128, kModel = 1024, kVocab = 4096;
constexpr int kQ = kHq * kD, kKV = kH * kD;
constexpr int kPrompt = 2048, kDecode = 128, kChunk = 64, kTotal = kPrompt + kDecode;

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void ck(cublasStatus_t e, const char* what) {
  if (e != CUBLAS_STATUS_SUCCESS) throw std::runtime_error(std::string(what) + ": cuBLAS status " + std::to_string(int(e)));
}

__device__ float normal_at(uint64_t seed, uint64_t i) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ULL + 2 * i;
  auto mix = [](uint64_t y) {
    y ^= y >> 33; y *= 0xff51afd7ed558ccdULL; y ^= y >> 33; y *= 0xc4ceb9fe1a85ec53ULL; y ^= y >> 33;
    return uint32_t(y);
  };
  const float u1 = (mix(x) + 1.f) * 2.3283064e-10f, u2 = mix(x + 1) * 2.3283064e-10f;
  return sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
}
/// w[rows][cols] ~ N(0, scale^2); with `k_outliers`, every 16th row of each
/// head (row = output channel) is scaled x8.
__global__ void init_weights(__half* w, int rows, int cols, uint64_t seed, float scale, bool k_outliers) {
  const size_t n = size_t(rows) * cols;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const int row = int(i / cols);
    const float s = (k_outliers && row % kD % 16 == 5) ? 8.f * scale : scale;
    w[i] = __float2half_rn(normal_at(seed, i) * s);
  }
}
/// x[n][kModel] fp32 = E[tokens[n]].
__global__ void embed(const __half* E, const int* tokens, float* x) {
  const __half* e = E + size_t(tokens[blockIdx.x]) * kModel;
  for (int i = threadIdx.x; i < kModel; i += blockDim.x) x[size_t(blockIdx.x) * kModel + i] = __half2float(e[i]);
}
/// y = x / rms(x) as fp16, one block per row.
__global__ void rmsnorm(const float* x, __half* y) {
  __shared__ float part[32];
  const float* r = x + size_t(blockIdx.x) * kModel;
  float ss = 0;
  for (int i = threadIdx.x; i < kModel; i += blockDim.x) ss += r[i] * r[i];
  for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(~0u, ss, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
  __syncthreads();
  ss = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) ss += part[w];
  const float inv = rsqrtf(ss / kModel + 1e-6f);
  for (int i = threadIdx.x; i < kModel; i += blockDim.x) y[size_t(blockIdx.x) * kModel + i] = __float2half_rn(r[i] * inv);
}
/// In place on rows of `heads` x kD: the K bias (+4 on the outlier channels)
/// and RoPE of channel pairs (c, c + 64) at position pos0 + row (pos0 read
/// from device memory when pos_dev is set: a captured step's position).
__global__ void bias_rope(__half* x, int heads, int pos0, bool k_bias, const int* pos_dev) {
  const int row = blockIdx.x, pos = (pos_dev ? *pos_dev : pos0) + row;
  for (int i = threadIdx.x; i < heads * kD / 2; i += blockDim.x) {
    const int h = i / (kD / 2), c = i % (kD / 2);
    __half* p = x + (size_t(row) * heads + h) * kD;
    float a = __half2float(p[c]), b = __half2float(p[c + kD / 2]);
    if (k_bias) { a += (c % 16 == 5) ? 4.f : 0.f; b += ((c + kD / 2) % 16 == 5) ? 4.f : 0.f; }
    const float theta = pos * powf(10000.f, -2.f * c / kD);
    float sn, cs;
    sincosf(theta, &sn, &cs);
    p[c] = __float2half_rn(a * cs - b * sn);
    p[c + kD / 2] = __float2half_rn(a * sn + b * cs);
  }
}
/// tokens[row] = argmax of logits[row][kVocab].
__global__ void argmax(const float* logits, int* tokens) {
  __shared__ float best_v[256];
  __shared__ int best_i[256];
  const float* l = logits + size_t(blockIdx.x) * kVocab;
  float bv = -INFINITY;
  int bi = 0;
  for (int i = threadIdx.x; i < kVocab; i += blockDim.x) if (l[i] > bv) { bv = l[i]; bi = i; }
  best_v[threadIdx.x] = bv;
  best_i[threadIdx.x] = bi;
  __syncthreads();
  for (int s = blockDim.x / 2; s; s >>= 1) {
    if (threadIdx.x < s && (best_v[threadIdx.x + s] > best_v[threadIdx.x] ||
                            (best_v[threadIdx.x + s] == best_v[threadIdx.x] && best_i[threadIdx.x + s] < best_i[threadIdx.x]))) {
      best_v[threadIdx.x] = best_v[threadIdx.x + s];
      best_i[threadIdx.x] = best_i[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) tokens[blockIdx.x] = best_i[0];
}
/// The end of a device-driven decode step: history[*pos - kPrompt] = *token, ++*pos.
__global__ void record_token(const int* token, int* pos, int* history) {
  history[*pos - kPrompt] = *token;
  *pos += 1;
}
/// Appends n rows of K/V [n][kH][kD] to an fp16 cache [kH][kTotal][kD] at position pos0.
__global__ void fp16_append(const __half* k, const __half* v, __half* kc, __half* vc, int pos0) {
  const int row = blockIdx.x;
  for (int i = threadIdx.x; i < kKV; i += blockDim.x) {
    const int h = i / kD, c = i % kD;
    kc[(size_t(h) * kTotal + pos0 + row) * kD + c] = k[size_t(row) * kKV + i];
    vc[(size_t(h) * kTotal + pos0 + row) * kD + c] = v[size_t(row) * kKV + i];
  }
}

template <typename T>
struct Dev {
  T* p = nullptr;
  explicit Dev(size_t n) { ck(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc"); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
};

struct Weights {
  Dev<__half> E{size_t(kVocab) * kModel};
  std::vector<std::unique_ptr<Dev<__half>>> wq, wk, wv, wo;
  Weights() {
    init_weights<<<1024, 256>>>(E.p, kVocab, kModel, 1, 1.f, false);
    for (int l = 0; l < kLayers; ++l) {
      auto make = [&](int rows, int cols, uint64_t seed, float scale, bool outl) {
        auto w = std::make_unique<Dev<__half>>(size_t(rows) * cols);
        init_weights<<<1024, 256>>>(w->p, rows, cols, seed, scale, outl);
        return w;
      };
      const float in = 1.f / std::sqrt(float(kModel));
      wq.push_back(make(kQ, kModel, 100 + l, in, false));
      wk.push_back(make(kKV, kModel, 200 + l, in, true));
      wv.push_back(make(kKV, kModel, 300 + l, in, false));
      wo.push_back(make(kModel, kQ, 400 + l, 0.5f / std::sqrt(float(kQ)), false));
    }
    ck(cudaGetLastError(), "weight init");
  }
};

/// Fp16: an fp16 cache read by flash-decoding. Kvcomp: the kvcomp cache
/// through the eager API (and a shadow fp16 cache gives fp16 attention on
/// identical inputs for the deviation). KvcompPlan / KvcompGraph: the kvcomp
/// cache, prefilled as in Kvcomp, decoding through a DecodePlan with eager
/// launches / one CUDA graph per token (no shadow cache, no host sync per token).
enum class Mode { Fp16, Kvcomp, KvcompPlan, KvcompGraph };

/// One run of the decoder.
struct Run {
  std::vector<int> tokens;     // generated
  double decode_s = 0;         // wall time of the decode loop
  double max_dev = 0, max_ref = 0, sum_sq_dev = 0, sum_sq_ref = 0;
  size_t kv_bytes = 0;
  double attn_ms_per_token = 0;  // attention alone, all layers, at the final context (Fp16, Kvcomp)
  std::vector<float> last_logits;  // of the last decode step (KvcompPlan, KvcompGraph)
};

/// A stream of our own for the plan runs (capture cannot use the legacy
/// default stream; a blocking stream still orders with it).
struct Stream {
  cudaStream_t s = nullptr;
  explicit Stream(bool create) { if (create) ck(cudaStreamCreate(&s), "cudaStreamCreate"); }
  ~Stream() { if (s) cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

Run run(const Weights& w, const std::vector<int>& prompt, Mode mode, int sms, cublasHandle_t blas) {
  Run r;
  const bool use_kvcomp = mode != Mode::Fp16, shadow = mode == Mode::Kvcomp;
  const bool plan_mode = mode == Mode::KvcompPlan || mode == Mode::KvcompGraph;
  const Stream stream(plan_mode);
  const cudaStream_t st = stream.s;  // 0 (the legacy default stream) in the Fp16 and Kvcomp runs
  kvcomp::Config cfg;
  cfg.layers = kLayers; cfg.kv_heads = kH; cfg.q_heads = kHq; cfg.head_dim = kD;
  cfg.max_seqs = 1; cfg.max_tokens_per_seq = kTotal; cfg.pool_bytes = size_t(256) << 20;
  cfg.max_attend_batch = kChunk;  // a prefill chunk's queries attend to the one sequence
  std::unique_ptr<kvcomp::Cache> cache;
  int seq = -1;
  if (use_kvcomp) {
    cache = std::make_unique<kvcomp::Cache>(cfg);
    seq = cache->add_sequence();
  }
  // fp16 caches [layer][kH][kTotal][kD] (the shadow in the kvcomp run).
  Dev<__half> kc(size_t(kLayers) * kKV * kTotal), vc(size_t(kLayers) * kKV * kTotal);
  Dev<float> x(size_t(kChunk) * kModel), logits(size_t(kChunk) * kVocab);
  Dev<__half> xn(size_t(kChunk) * kModel), q(size_t(kChunk) * kQ), k(size_t(kChunk) * kKV), v(size_t(kChunk) * kKV);
  Dev<__half> att(size_t(kChunk) * kQ), att16(size_t(kChunk) * kQ);
  Dev<int> tok(kChunk);
  kvcomp::baseline::Fp16Attention fa{kc.p, vc.p, kChunk, kH, kHq, kD, kTotal, 0, int64_t(kTotal) * kD};
  Dev<float> ws(kvcomp::baseline::flash_workspace_floats(fa, sms));
  // cuBLAS on the plan runs' stream, with a workspace of its own (cublasSetStream
  // resets it to the default pool): nothing for cuBLAS to allocate during capture.
  const size_t kBlasWorkspace = size_t(32) << 20;
  std::unique_ptr<Dev<uint8_t>> blas_ws;
  if (plan_mode) {
    blas_ws = std::make_unique<Dev<uint8_t>>(kBlasWorkspace);
    ck(cublasSetStream(blas, st), "cublasSetStream");
    ck(cublasSetWorkspace(blas, blas_ws->p, kBlasWorkspace), "cublasSetWorkspace");
  }
  struct BlasReset {  // back to the default stream and workspace pool, before blas_ws is freed
    cublasHandle_t h;
    bool on;
    ~BlasReset() { if (on) cublasSetStream(h, 0); }
  } blas_reset{blas, plan_mode};
  kvcomp::DecodePlan plan;
  if (plan_mode) plan = cache->make_plan(1);
  const float one = 1.f, zero = 0.f;
  // y[n][rows] = W[rows][cols] . in[n][cols]; fp32 y accumulates into itself with beta = 1.
  auto gemm = [&](const __half* W, int rows, int cols, const __half* in, void* y, cudaDataType yt, int n, const float* beta) {
    ck(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one, W, CUDA_R_16F, cols, in, CUDA_R_16F, cols, beta,
                    y, yt, rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "gemm");
  };
  // n tokens at positions pos..pos+n-1 through every layer. Prefill chunks
  // attend to the cache before appending; a decode token appends first.
  // pos_dev (plan decode): the position is read on the device, and the token
  // goes through the plan.
  auto forward = [&](int n, int pos, bool prefill, bool measure_dev, const int* pos_dev = nullptr) {
    const bool through_plan = pos_dev != nullptr;
    for (int l = 0; l < kLayers; ++l) {
      rmsnorm<<<n, 256, 0, st>>>(x.p, xn.p);
      gemm(w.wq[l]->p, kQ, kModel, xn.p, q.p, CUDA_R_16F, n, &zero);
      gemm(w.wk[l]->p, kKV, kModel, xn.p, k.p, CUDA_R_16F, n, &zero);
      gemm(w.wv[l]->p, kKV, kModel, xn.p, v.p, CUDA_R_16F, n, &zero);
      bias_rope<<<n, 256, 0, st>>>(q.p, kHq, pos, false, pos_dev);
      bias_rope<<<n, 256, 0, st>>>(k.p, kH, pos, true, pos_dev);
      __half* kl = kc.p + size_t(l) * kKV * kTotal;
      __half* vl = vc.p + size_t(l) * kKV * kTotal;
      auto append = [&] {
        if (through_plan) {
          cache->append(plan, l, k.p, v.p, st);
        } else if (use_kvcomp) {
          cache->append(l, {seq}, {n}, k.p, v.p, st);
        }
        if (!use_kvcomp || shadow) fp16_append<<<n, 256, 0, st>>>(k.p, v.p, kl, vl, pos);
      };
      if (!prefill) append();
      const int ctx = prefill ? pos : pos + 1;
      kvcomp::baseline::Fp16Attention a{kl, vl, n, kH, kHq, kD, ctx, 0, int64_t(kTotal) * kD};
      if (!use_kvcomp || shadow) {
        if (ctx > 0) {
          kvcomp::baseline::flash_decode_fp16(a, q.p, use_kvcomp ? att16.p : att.p, ws.p, sms, st);
        } else {
          ck(cudaMemsetAsync(att16.p, 0, size_t(n) * kQ * 2, st), "memset");
          ck(cudaMemsetAsync(att.p, 0, size_t(n) * kQ * 2, st), "memset");
        }
      }
      if (through_plan) {
        cache->attend(plan, l, q.p, att.p, kvcomp::DType::F16, st);
      } else if (use_kvcomp) {
        cache->attend(l, std::vector<int>(n, seq), q.p, att.p, kvcomp::DType::F16, st);
      }
      if (shadow && measure_dev) {
        std::vector<__half> o(size_t(n) * kQ), o16(o.size());
        ck(cudaMemcpy(o.data(), att.p, o.size() * 2, cudaMemcpyDeviceToHost), "copy");
        ck(cudaMemcpy(o16.data(), att16.p, o.size() * 2, cudaMemcpyDeviceToHost), "copy");
        for (size_t i = 0; i < o.size(); ++i) {
          const double a16 = __half2float(o16[i]), d = __half2float(o[i]) - a16;
          r.max_dev = std::fmax(r.max_dev, std::fabs(d));
          r.max_ref = std::fmax(r.max_ref, std::fabs(a16));
          r.sum_sq_dev += d * d;
          r.sum_sq_ref += a16 * a16;
        }
      }
      if (prefill) append();
      gemm(w.wo[l]->p, kModel, kQ, att.p, x.p, CUDA_R_32F, n, &one);  // residual
    }
  };
  // Prefill, chunk by chunk.
  Dev<int> prompt_d(kPrompt);
  ck(cudaMemcpy(prompt_d.p, prompt.data(), kPrompt * sizeof(int), cudaMemcpyHostToDevice), "copy");
  for (int pos = 0; pos < kPrompt; pos += kChunk) {
    embed<<<kChunk, 256, 0, st>>>(w.E.p, prompt_d.p + pos, x.p);
    forward(kChunk, pos, true, pos == kPrompt - kChunk);
  }
  // The next token from the last prompt position, then decode greedily.
  auto logits_argmax = [&](const float* last) {
    rmsnorm<<<1, 256, 0, st>>>(last, xn.p);
    gemm(w.E.p, kVocab, kModel, xn.p, logits.p, CUDA_R_32F, 1, &zero);
    argmax<<<1, 256, 0, st>>>(logits.p, tok.p);
  };
  auto next_token = [&](const float* last) {
    logits_argmax(last);
    int t = 0;
    ck(cudaMemcpy(&t, tok.p, sizeof(int), cudaMemcpyDeviceToHost), "copy");
    return t;
  };
  int t = next_token(x.p + size_t(kChunk - 1) * kModel);
  ck(cudaDeviceSynchronize(), "prefill");
  if (plan_mode) {
    // One decode step, all on the device: the token in tok, the position in pos_d.
    Dev<int> pos_d(1), history(kDecode);
    const int pos0 = kPrompt;
    ck(cudaMemcpy(pos_d.p, &pos0, sizeof(int), cudaMemcpyHostToDevice), "copy");
    cache->set_plan(plan, {seq}, st);
    auto step = [&] {
      embed<<<1, 256, 0, st>>>(w.E.p, tok.p, x.p);
      forward(1, 0, false, false, pos_d.p);
      logits_argmax(x.p);
      record_token<<<1, 1, 0, st>>>(tok.p, pos_d.p, history.p);
    };
    cudaGraphExec_t exec = nullptr;
    if (mode == Mode::KvcompGraph) {
      cudaGraph_t graph = nullptr;
      ck(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
      try {
        step();
      } catch (...) {
        cudaStreamEndCapture(st, &graph);
        if (graph) cudaGraphDestroy(graph);
        throw;
      }
      ck(cudaStreamEndCapture(st, &graph), "cudaStreamEndCapture");
      const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      ck(e, "cudaGraphInstantiate");
      ck(cudaGraphUpload(exec, st), "cudaGraphUpload");
    }
    struct ExecGuard {
      cudaGraphExec_t e;
      ~ExecGuard() { if (e) cudaGraphExecDestroy(e); }
    } exec_guard{exec};
    ck(cudaStreamSynchronize(st), "capture");
    const auto t0 = std::chrono::steady_clock::now();
    for (int step_i = 0; step_i < kDecode; ++step_i) {
      if (exec) {
        ck(cudaGraphLaunch(exec, st), "cudaGraphLaunch");
      } else {
        step();
      }
    }
    ck(cudaStreamSynchronize(st), "decode");
    r.decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    cache->check(st);  // a device-side failure (pool full, max tokens) throws here
    std::vector<int> h(kDecode);
    ck(cudaMemcpy(h.data(), history.p, kDecode * sizeof(int), cudaMemcpyDeviceToHost), "copy");
    r.tokens.push_back(t);  // as the eager loop: the token each step consumes
    r.tokens.insert(r.tokens.end(), h.begin(), h.end() - 1);
    r.last_logits.resize(kVocab);
    ck(cudaMemcpy(r.last_logits.data(), logits.p, kVocab * sizeof(float), cudaMemcpyDeviceToHost), "copy");
    const kvcomp::Stats stats = cache->stats();
    r.kv_bytes = stats.compressed_bytes + stats.tail_bytes;
    ck(cudaGetLastError(), "run");
    return r;
  }
  const auto t0 = std::chrono::steady_clock::now();
  for (int step = 0; step < kDecode; ++step) {
    r.tokens.push_back(t);
    ck(cudaMemcpy(tok.p, &t, sizeof(int), cudaMemcpyHostToDevice), "copy");
    embed<<<1, 256>>>(w.E.p, tok.p, x.p);
    forward(1, kPrompt + step, false, shadow && step % 8 == 0);
    t = next_token(x.p);
  }
  ck(cudaDeviceSynchronize(), "decode");
  r.decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // Attention alone at the final context, all layers (second pass timed).
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  for (int rep = 0; rep < 2; ++rep) {
    cudaEventRecord(a);
    for (int l = 0; l < kLayers; ++l) {
      if (use_kvcomp) {
        cache->attend(l, {seq}, q.p, att.p, kvcomp::DType::F16, 0);
      } else {
        kvcomp::baseline::Fp16Attention fl{kc.p + size_t(l) * kKV * kTotal, vc.p + size_t(l) * kKV * kTotal, 1, kH, kHq,
                                           kD, kTotal, 0, int64_t(kTotal) * kD};
        kvcomp::baseline::flash_decode_fp16(fl, q.p, att.p, ws.p, sms, 0);
      }
    }
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    r.attn_ms_per_token = ms;
  }
  cudaEventDestroy(a); cudaEventDestroy(b);
  if (use_kvcomp) {
    const kvcomp::Stats st = cache->stats();
    r.kv_bytes = st.compressed_bytes + st.tail_bytes;
  } else {
    r.kv_bytes = size_t(kLayers) * kTotal * kKV * 2 * 2;
  }
  ck(cudaGetLastError(), "run");
  return r;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("decode_loop: no CUDA device found; nothing to run (kvcomp needs a GPU).\n");
    return 0;
  }
  try {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    cublasHandle_t blas;
    ck(cublasCreate(&blas), "cublasCreate");
    const Weights w;
    std::vector<int> prompt(kPrompt);
    uint64_t s = 12345;
    for (int& t : prompt) { s = s * 6364136223846793005ULL + 1442695040888963407ULL; t = int(s >> 33) % kVocab; }
    const Run fp = run(w, prompt, Mode::Fp16, sms, blas);
    const Run kv = run(w, prompt, Mode::Kvcomp, sms, blas);
    int agree = 0;
    while (agree < kDecode && kv.tokens[agree] == fp.tokens[agree]) ++agree;
    std::printf("decode_loop: %d layers, d_model %d, %d q / %d kv heads x %d, vocab %d; prompt %d (prefill in chunks of %d), %d tokens decoded greedily\n",
                kLayers, kModel, kHq, kH, kD, kVocab, kPrompt, kChunk, kDecode);
    std::printf("  decode (whole model, batch 1): kvcomp %.1f tokens/s   fp16 %.1f tokens/s\n", kDecode / kv.decode_s,
                kDecode / fp.decode_s);
    std::printf("  attention per token at %d tokens, all layers: kvcomp %.3f ms   fp16 flash %.3f ms\n", kTotal,
                kv.attn_ms_per_token, fp.attn_ms_per_token);
    std::printf("  KV bytes: kvcomp %.2f MB (%.1f B/token/layer/head)   fp16 %.2f MB   ratio %.2fx\n", kv.kv_bytes / 1e6,
                double(kv.kv_bytes) / (double(kTotal) * kLayers * kH), fp.kv_bytes / 1e6,
                double(fp.kv_bytes) / kv.kv_bytes);
    std::printf("  attention output vs fp16 on identical inputs: max |diff| %.4g (max |output| %.4g), relative L2 %.4f\n",
                kv.max_dev, kv.max_ref, std::sqrt(kv.sum_sq_dev / kv.sum_sq_ref));
    std::printf("  greedy tokens identical to the fp16 run: first %d of %d\n", agree, kDecode);
    std::fflush(stdout);
    // Graph mode: the same prompt through a DecodePlan, eager launches vs one CUDA graph per token.
    const Run pe = run(w, prompt, Mode::KvcompPlan, sms, blas);
    const Run pg = run(w, prompt, Mode::KvcompGraph, sms, blas);
    auto agreeing = [](const Run& x, const Run& y) {
      int n = 0;
      while (n < kDecode && x.tokens[n] == y.tokens[n]) ++n;
      return n;
    };
    const int graph_vs_plan = agreeing(pg, pe), graph_vs_eager = agreeing(pg, kv), plan_vs_eager = agreeing(pe, kv);
    const bool same_logits = pe.last_logits.size() == pg.last_logits.size() &&
                             std::memcmp(pe.last_logits.data(), pg.last_logits.data(), pe.last_logits.size() * 4) == 0;
    std::printf("  decode through a DecodePlan (kvcomp, batch 1, no shadow fp16 cache, no host sync per token): "
                "eager launches %.1f tokens/s   one CUDA graph per token %.1f tokens/s (%.2fx)\n",
                kDecode / pe.decode_s, kDecode / pg.decode_s, pe.decode_s / pg.decode_s);
    std::printf("  greedy tokens, plan + graph vs plan eager: first %d of %d identical (last logits %s); "
                "vs the eager-API kvcomp run: graph %d, plan eager %d of %d\n",
                graph_vs_plan, kDecode, same_logits ? "bit-identical" : "differ", graph_vs_eager, plan_vs_eager,
                kDecode);
    cublasDestroy(blas);
    if (graph_vs_plan != kDecode) {
      std::printf("decode_loop: the CUDA graph decoded other tokens than the same plan steps launched eagerly\n");
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::printf("decode_loop: %s\n", e.what());
    return 1;
  }
  return 0;
}
