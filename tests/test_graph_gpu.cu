// Plan-based decode through CUDA graphs: one captured decode step (every
// layer: append(plan) then attend(plan)) replayed token after token gives the
// same blocks and outputs, bit for bit, as the same plan calls run eagerly,
// and the same blocks as the eager vector API (outputs within fp32 rounding);
// a replay that fills the pool fails on the device, check() names the
// sequence, and replaying the step after remove_sequence stores exactly what
// was missing; a soak adds and removes sequences between captured graphs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpu_random.cuh"
#include "gpu_util.cuh"
#include "kvcomp/cache.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp_test;

namespace {

struct Stream {
  cudaStream_t s = nullptr;
  Stream() {
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess) s = nullptr;
  }
  ~Stream() { if (s) cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

struct GraphExec {
  cudaGraphExec_t e = nullptr;
  GraphExec() = default;
  ~GraphExec() { reset(); }
  GraphExec(const GraphExec&) = delete;
  GraphExec& operator=(const GraphExec&) = delete;
  void reset() {
    if (e) cudaGraphExecDestroy(e);
    e = nullptr;
  }
};

/// The device buffers of one decode step: k, v [layer][rows][kv_heads][D],
/// q, out [layer][rows][q_heads][D], fp16. A plan of batch b uses the first b
/// rows of every layer.
struct StepIo {
  const __half* k;
  const __half* v;
  const __half* q;
  __half* out;
  int rows;
};

size_t kv_elems(const Config& c, int rows) { return size_t(c.layers) * rows * c.kv_heads * c.head_dim; }
size_t q_elems(const Config& c, int rows) { return size_t(c.layers) * rows * c.q_heads * c.head_dim; }

/// One decode step through the plan: for every layer, append then attend.
void run_step(Cache& c, const DecodePlan& p, const StepIo& io, cudaStream_t st) {
  const Config& cfg = c.config();
  const size_t kv = size_t(io.rows) * cfg.kv_heads * cfg.head_dim, qo = size_t(io.rows) * cfg.q_heads * cfg.head_dim;
  for (int l = 0; l < cfg.layers; ++l) {
    c.append(p, l, io.k + l * kv, io.v + l * kv, st);
    c.attend(p, l, io.q + l * qo, io.out + l * qo, DType::F16, st);
  }
}

/// Captures run_step on `st` (global capture mode: a synchronizing or
/// allocating call inside would invalidate the capture) and instantiates it.
void capture_step(Cache& c, const DecodePlan& p, const StepIo& io, cudaStream_t st, GraphExec& exec) {
  exec.reset();
  cudaGraph_t g = nullptr;
  CUDA_OK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  try {
    run_step(c, p, io, st);
  } catch (...) {
    cudaStreamEndCapture(st, &g);
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();
    throw;
  }
  CUDA_OK(cudaStreamEndCapture(st, &g));
  ASSERT_NE(g, nullptr);
  const cudaError_t e = cudaGraphInstantiate(&exec.e, g, 0);
  cudaGraphDestroy(g);
  CUDA_OK(e);
}

void download(std::vector<uint8_t>& h, const void* p, size_t bytes, cudaStream_t st) {
  h.resize(bytes);
  CUDA_OK(cudaMemcpyAsync(h.data(), p, bytes, cudaMemcpyDeviceToHost, st));
  CUDA_OK(cudaStreamSynchronize(st));
}

/// Fresh pseudo-random step inputs in the buffers (on `st`).
void fill_step(__half* k, __half* v, __half* q, const Config& c, int rows, uint64_t seed, cudaStream_t st) {
  fill_normal<<<64, 256, 0, st>>>(k, kv_elems(c, rows), c.head_dim, seed, true);
  fill_normal<<<64, 256, 0, st>>>(v, kv_elems(c, rows), c.head_dim, seed + 1, false);
  fill_normal<<<64, 256, 0, st>>>(q, q_elems(c, rows), c.head_dim, seed + 2, false);
}

/// Where fp16 element e of an output buffer [layer][rows][q_heads][D] lies.
std::string out_pos(size_t e, const Config& c, int rows) {
  const size_t D = c.head_dim, per_row = size_t(c.q_heads) * D, per_layer = per_row * rows;
  return "layer " + std::to_string(e / per_layer) + " row " + std::to_string(e % per_layer / per_row) + " q head " +
         std::to_string(e % per_row / D) + " channel " + std::to_string(e % D);
}

/// Bit-for-bit equality of two output buffers, naming the first difference.
::testing::AssertionResult same_outputs(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, const Config& c,
                                        int rows) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes " << a.size() << " vs " << b.size();
  const auto m = std::mismatch(a.begin(), a.end(), b.begin());
  if (m.first == a.end()) return ::testing::AssertionSuccess();
  const size_t e = size_t(m.first - a.begin()) / 2;
  return ::testing::AssertionFailure() << "outputs differ first at " << out_pos(e, c, rows) << ": "
                                       << load_as_float(DType::F16, a.data(), e) << " vs "
                                       << load_as_float(DType::F16, b.data(), e);
}

/// Every closed block of sequence sx of x and sy of y (every layer, kv head,
/// K and V) bit for bit, up to the blocks both hold in each layer.
::testing::AssertionResult same_blocks(const Cache& x, int sx, const Cache& y, int sy, cudaStream_t st) {
  const Config& c = x.config();
  for (int l = 0; l < c.layers; ++l) {
    const int64_t blocks = std::min(x.tokens(sx, l), y.tokens(sy, l)) / c.block_tokens;
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int h = 0; h < c.kv_heads; ++h)
        for (Kind kind : {Kind::Key, Kind::Value}) {
          const auto a = x.read_block(l, sx, h, blk, kind, st), b = y.read_block(l, sy, h, blk, kind, st);
          if (a != b)
            return ::testing::AssertionFailure()
                   << "block differs: layer " << l << " block " << blk << " of " << blocks << " kv head " << h
                   << (kind == Kind::Key ? " K" : " V") << " (" << a.size() << " vs " << b.size() << " bytes)";
        }
  }
  return ::testing::AssertionSuccess();
}

/// max |a - b| over the rows of one layer of two output buffers, and max |a| there.
void layer_diff(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, const Config& c, int rows, int layer,
                double& max_diff, double& scale) {
  const size_t n = size_t(rows) * c.q_heads * c.head_dim, at = size_t(layer) * n;
  max_diff = 0;
  scale = 0;
  for (size_t i = at; i < at + n; ++i) {
    const double x = load_as_float(DType::F16, a.data(), i), y = load_as_float(DType::F16, b.data(), i);
    max_diff = std::max(max_diff, std::fabs(x - y));
    scale = std::max(scale, std::fabs(x));
  }
}

/// Every element of row `row` in every layer is finite (written), or zero (`zero`: an idle plan slot).
::testing::AssertionResult row_is(const std::vector<uint8_t>& out, const Config& c, int rows, int row, bool zero) {
  const size_t per_row = size_t(c.q_heads) * c.head_dim;
  for (int l = 0; l < c.layers; ++l)
    for (size_t j = 0; j < per_row; ++j) {
      const size_t e = (size_t(l) * rows + row) * per_row + j;
      const float x = load_as_float(DType::F16, out.data(), e);
      if (zero ? x != 0.f : !std::isfinite(x))
        return ::testing::AssertionFailure() << (zero ? "idle slot output not zero" : "output not finite") << " at "
                                             << out_pos(e, c, rows) << ": " << x;
    }
  return ::testing::AssertionSuccess();
}

}  // namespace

namespace {

/// Graph replays vs the same plan calls eager vs the eager vector API, 300 steps of 8 sequences.
/// capacity: Config::max_tokens_per_seq, which the plan's split and CTA size are made for.
void capture_one_decode_step_and_replay(TailFormat tail, int capacity = 1024) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Config cfg;
  cfg.layers = 4; cfg.kv_heads = 2; cfg.q_heads = 8; cfg.head_dim = 128; cfg.block_tokens = 64;
  cfg.max_seqs = 8; cfg.max_tokens_per_seq = capacity; cfg.pool_bytes = size_t(64) << 20;
  cfg.tail_format = tail;
  const int L = cfg.layers, H = cfg.kv_heads, D = cfg.head_dim, T = cfg.block_tokens, B = 8, kSteps = 300;
  // Different lengths: empty, tails only, whole blocks, blocks + odd tails.
  const std::vector<int> prefill = {0, 37, T, 2 * T + 5, 3 * T + 63, 5 * T + 1, 7 * T + 30, 8 * T + 11};
  Stream stream;
  ASSERT_NE(stream.s, nullptr);
  const cudaStream_t st = stream.s;

  // Prefill tokens (sequence i, layer l: its own window) and every step's inputs [step][layer][row][heads][D].
  int total = 0;
  for (int n : prefill) total += n;
  DevBuf<__half> pk(size_t(L) * total * H * D), pv(size_t(L) * total * H * D);
  const size_t kv_step = kv_elems(cfg, B), q_step = q_elems(cfg, B);
  DevBuf<__half> sk(kv_step * kSteps), sv(kv_step * kSteps), sq(q_step * kSteps);
  fill_normal<<<256, 256, 0, st>>>(pk.ptr, pk.n, D, seed, true);
  fill_normal<<<256, 256, 0, st>>>(pv.ptr, pv.n, D, seed + 1, false);
  fill_step(sk.ptr, sv.ptr, sq.ptr, cfg, B * kSteps, seed + 2, st);  // kSteps x B rows per layer: fine, all random
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaStreamSynchronize(st));

  // A: graph replays; B: the same plan calls, eager; C: the eager vector API.
  Cache a(cfg), b(cfg), c(cfg);
  std::vector<int> ida, idb, idc;
  auto prefill_into = [&](Cache& x, std::vector<int>& ids) {
    size_t off = 0;
    for (int i = 0; i < B; ++i) {
      ids.push_back(x.add_sequence());
      if (prefill[i] > 0)
        for (int l = 0; l < L; ++l) {
          const size_t at = (size_t(l) * total + off) * H * D;
          x.append(l, {ids.back()}, {prefill[i]}, pk.ptr + at, pv.ptr + at, st);
        }
      off += prefill[i];
    }
  };
  prefill_into(a, ida);
  prefill_into(b, idb);
  prefill_into(c, idc);
  const DecodePlan pa = a.make_plan(B), pb = b.make_plan(B);
  ASSERT_EQ(pa.batch, B);
  a.set_plan(pa, ida, st);
  b.set_plan(pb, idb, st);

  DevBuf<__half> ak(kv_step), av(kv_step), aq(q_step), aout(q_step), bout(q_step), cout(q_step);
  GraphExec graph;
  ASSERT_NO_FATAL_FAILURE(capture_step(a, pa, {ak.ptr, av.ptr, aq.ptr, aout.ptr, B}, st, graph));

  const std::vector<int> ones(B, 1);
  const size_t out_bytes = q_step * 2;
  std::vector<uint8_t> oa, ob, oc;
  double worst_c = 0;  // max |A - C| / max |A| over steps and layers
  for (int s = 0; s < kSteps; ++s) {
    const __half *k = sk.ptr + s * kv_step, *v = sv.ptr + s * kv_step, *q = sq.ptr + s * q_step;
    CUDA_OK(cudaMemcpyAsync(ak.ptr, k, kv_step * 2, cudaMemcpyDeviceToDevice, st));
    CUDA_OK(cudaMemcpyAsync(av.ptr, v, kv_step * 2, cudaMemcpyDeviceToDevice, st));
    CUDA_OK(cudaMemcpyAsync(aq.ptr, q, q_step * 2, cudaMemcpyDeviceToDevice, st));
    // Unwritten outputs would read as NaN.
    for (__half* o : {aout.ptr, bout.ptr, cout.ptr}) CUDA_OK(cudaMemsetAsync(o, 0xFF, out_bytes, st));
    CUDA_OK(cudaGraphLaunch(graph.e, st));
    run_step(b, pb, {k, v, q, bout.ptr, B}, st);
    for (int l = 0; l < L; ++l) {
      const size_t kv = size_t(l) * B * H * D, qo = size_t(l) * B * cfg.q_heads * D;
      c.append(l, idc, ones, k + kv, v + kv, st);
      c.attend(l, idc, q + qo, cout.ptr + qo, DType::F16, st);
    }
    CUDA_OK(cudaGetLastError());
    ASSERT_NO_FATAL_FAILURE(download(oa, aout.ptr, out_bytes, st));
    ASSERT_NO_FATAL_FAILURE(download(ob, bout.ptr, out_bytes, st));
    ASSERT_NO_FATAL_FAILURE(download(oc, cout.ptr, out_bytes, st));
    ASSERT_TRUE(same_outputs(oa, ob, cfg, B)) << "graph vs eager plan, step " << s;
    for (int i = 0; i < B; ++i) ASSERT_TRUE(row_is(oa, cfg, B, i, false)) << "step " << s;
    for (int l = 0; l < L; ++l) {
      double diff = 0, scale = 0;
      layer_diff(oa, oc, cfg, B, l, diff, scale);
      // Same blocks and tails, possibly another split of the tokens: fp32 order and fp16 output rounding.
      ASSERT_LE(diff, 2e-3 * scale) << "graph vs eager vector API, step " << s << " layer " << l << " (max |out| "
                                    << scale << ")";
      if (scale > 0) worst_c = std::max(worst_c, diff / scale);
    }
  }
  EXPECT_NO_THROW(a.check(st));
  EXPECT_NO_THROW(b.check(st));
  for (int i = 0; i < B; ++i) {
    for (int l = 0; l < L; ++l) {
      ASSERT_EQ(a.tokens(ida[i], l), prefill[i] + kSteps) << "sequence " << i << " layer " << l;
      ASSERT_EQ(b.tokens(idb[i], l), prefill[i] + kSteps) << "sequence " << i << " layer " << l;
      ASSERT_EQ(c.tokens(idc[i], l), prefill[i] + kSteps) << "sequence " << i << " layer " << l;
    }
    ASSERT_TRUE(same_blocks(a, ida[i], b, idb[i], st)) << "graph vs eager plan, sequence " << i;
    ASSERT_TRUE(same_blocks(a, ida[i], c, idc[i], st)) << "graph vs eager vector API, sequence " << i;
  }
  const Stats sa = a.stats(), sb = b.stats(), sc = c.stats();
  EXPECT_EQ(sa.compressed_bytes, sb.compressed_bytes);
  EXPECT_EQ(sa.compressed_bytes, sc.compressed_bytes);
  EXPECT_EQ(sa.pool_bytes_in_use, sb.pool_bytes_in_use);
  EXPECT_EQ(sa.tail_bytes, sc.tail_bytes);
  EXPECT_EQ(sa.tokens, sc.tokens);
  std::printf("graph replay: %d steps x %d sequences x %d layers; outputs vs the eager vector API: "
              "max |diff| / max |out| = %.3g\n", kSteps, B, L, worst_c);
}

}  // namespace

TEST(GraphGpu, CaptureOneDecodeStepAndReplay) {
  KVCOMP_REQUIRE_GPU();
  capture_one_decode_step_and_replay(TailFormat::Input);
}

// A plan made for 128k tokens a sequence replayed at 0..~900: the kernel cuts each sequence into at most
// `spread` splits (make_plan: the CTA places a wave has for each item), of fewer units than the CTA's warps.
TEST(GraphGpu, CaptureOneDecodeStepAndReplayAtALargeCapacity) {
  KVCOMP_REQUIRE_GPU();
  capture_one_decode_step_and_replay(TailFormat::Input, 131072);
}

// Codes8 tails: the graph's tail copies encode, its block closes decode the tail's codes.
TEST(GraphGpu, CaptureOneDecodeStepAndReplayWithCodes8Tails) {
  KVCOMP_REQUIRE_GPU();
  capture_one_decode_step_and_replay(TailFormat::Codes8);
}

// Codes6 tails: the tail copies pack 4 codes in 3 bytes (a lane a quad), the kernels read them back.
TEST(GraphGpu, CaptureOneDecodeStepAndReplayWithCodes6Tails) {
  KVCOMP_REQUIRE_GPU();
  capture_one_decode_step_and_replay(TailFormat::Codes6);
}

TEST(GraphGpu, ReplayThatHitsAFullPoolFailsCleanlyAndRedoes) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Config cfg;
  cfg.layers = 4; cfg.kv_heads = 2; cfg.q_heads = 8; cfg.head_dim = 128; cfg.block_tokens = 64;
  cfg.max_seqs = 4; cfg.max_tokens_per_seq = 4096; cfg.pool_bytes = size_t(64) << 20;
  const int L = cfg.layers, H = cfg.kv_heads, D = cfg.head_dim, T = cfg.block_tokens, B = 3, kMaxSteps = 3000;
  // Lengths apart mod T: the sequences close their blocks (and need pages) at different steps.
  const std::vector<int> prefill = {T + 5, 2 * T + 30, 3 * T + 50};
  Stream stream;
  ASSERT_NE(stream.s, nullptr);
  const cudaStream_t st = stream.s;
  int total = 0;
  for (int n : prefill) total += n;
  DevBuf<__half> pk(size_t(L) * total * H * D), pv(size_t(L) * total * H * D);
  fill_normal<<<256, 256, 0, st>>>(pk.ptr, pk.n, D, seed, true);
  fill_normal<<<256, 256, 0, st>>>(pv.ptr, pv.n, D, seed + 1, false);
  CUDA_LAUNCH_OK();
  auto prefill_into = [&](Cache& x, std::vector<int>& ids) {
    size_t off = 0;
    for (int i = 0; i < B; ++i) {
      ids.push_back(x.add_sequence());
      for (int l = 0; l < L; ++l) {
        const size_t at = (size_t(l) * total + off) * H * D;
        x.append(l, {ids.back()}, {prefill[i]}, pk.ptr + at, pv.ptr + at, st);
      }
      off += prefill[i];
    }
  };
  // B never fails (large pool); A gets two free pages beyond what the prefill takes.
  Cache b(cfg);
  std::vector<int> ida, idb;
  prefill_into(b, idb);
  const Stats sb0 = b.stats();
  const size_t page = sb0.pool_page_bytes;
  ASSERT_GT(page, 0u);
  const size_t held = (sb0.pool_bytes_in_use + page - 1) / page;
  Config small = cfg;
  small.pool_bytes = (held + 2) * page;
  small.pool_page_bytes = page;  // a smaller pool would otherwise get smaller pages
  Cache a(small);
  prefill_into(a, ida);
  EXPECT_EQ(a.stats().pool_bytes_in_use, sb0.pool_bytes_in_use);

  const DecodePlan pa = a.make_plan(B), pb = b.make_plan(B);
  a.set_plan(pa, ida, st);
  b.set_plan(pb, idb, st);
  const size_t kv_step = kv_elems(cfg, B), q_step = q_elems(cfg, B), out_bytes = q_step * 2;
  DevBuf<__half> k(kv_step), v(kv_step), q(q_step), aout(q_step), bout(q_step);
  GraphExec graph;
  ASSERT_NO_FATAL_FAILURE(capture_step(a, pa, {k.ptr, v.ptr, q.ptr, aout.ptr, B}, st, graph));
  const StepIo io_b{k.ptr, v.ptr, q.ptr, bout.ptr, B};  // B reads the inputs A's graph read

  std::vector<uint8_t> oa, ob;
  auto step_inputs = [&](int s) {
    fill_step(k.ptr, v.ptr, q.ptr, cfg, B, seed * 7919 + 1000 + 3 * uint64_t(s), st);
    CUDA_OK(cudaMemsetAsync(aout.ptr, 0xFF, out_bytes, st));
    CUDA_OK(cudaMemsetAsync(bout.ptr, 0xFF, out_bytes, st));
  };
  int fail_step = -1;
  std::string msg;
  for (int s = 0; s < kMaxSteps && fail_step < 0; ++s) {
    ASSERT_NO_FATAL_FAILURE(step_inputs(s));
    CUDA_OK(cudaGraphLaunch(graph.e, st));
    try {
      a.check(st);
    } catch (const Error& e) {
      fail_step = s;
      msg = e.what();
      break;
    }
    run_step(b, pb, io_b, st);
    ASSERT_NO_FATAL_FAILURE(download(oa, aout.ptr, out_bytes, st));
    ASSERT_NO_FATAL_FAILURE(download(ob, bout.ptr, out_bytes, st));
    ASSERT_TRUE(same_outputs(oa, ob, cfg, B)) << "step " << s;
  }
  ASSERT_GE(fail_step, 0) << "the pool of " << held + 2 << " pages never filled in " << kMaxSteps << " steps";
  EXPECT_NE(msg.find("pool is full"), std::string::npos) << msg;
  EXPECT_NO_THROW(a.check(st)) << "the throw clears the records";

  // Each sequence: B holds N tokens in every layer (the state before the step).
  // A: a complete sequence holds N + 1 everywhere; a failed one N + 1 in the
  // layers before the one that failed and N from it on (later layers skip:
  // they may not pass the failed one).
  std::vector<int> failed_layer(B, -1);
  std::vector<int64_t> before(B);
  for (int i = 0; i < B; ++i) {
    const int64_t N = before[i] = b.tokens(idb[i], 0);
    ASSERT_EQ(N, prefill[i] + fail_step);
    for (int l = 0; l < L; ++l) {
      const int64_t n = a.tokens(ida[i], l);
      if (n == N && failed_layer[i] < 0) failed_layer[i] = l;
      ASSERT_EQ(n, failed_layer[i] < 0 ? N + 1 : N) << "sequence " << ida[i] << " layer " << l << ": " << msg;
    }
    if (failed_layer[i] >= 0) {
      EXPECT_EQ((N + 1) % T, 0) << "sequence " << ida[i] << " failed on a token that closes no block";
      EXPECT_NE(msg.find(std::to_string(ida[i])), std::string::npos)
          << "the error names sequence " << ida[i] << ": " << msg;
      std::printf("pool full at step %d: sequence %d from layer %d on (%zu pages of %zu B): %s\n", fail_step, ida[i],
                  failed_layer[i], held + 2, page, msg.c_str());
    }
  }
  ASSERT_TRUE(std::any_of(failed_layer.begin(), failed_layer.end(), [](int l) { return l >= 0; }))
      << "check() threw but every sequence holds the step's token: " << msg;
  // Blocks stored before the failure: unchanged, and those of a cache that never failed.
  for (int i = 0; i < B; ++i) ASSERT_TRUE(same_blocks(a, ida[i], b, idb[i], st)) << "sequence " << ida[i];

  // The never-failing twin runs the step; A frees room (removes the longest
  // complete sequence, in both) and replays the same step (same inputs) with
  // only the failed sequences in their slots: a complete sequence in its slot
  // would take the step's token a second time (layer 0 holds as many as the
  // last layer), so it sits this replay out.
  run_step(b, pb, io_b, st);
  std::vector<uint8_t> ob_step;
  ASSERT_NO_FATAL_FAILURE(download(ob_step, bout.ptr, out_bytes, st));
  int victim = -1;
  for (int i = 0; i < B; ++i)
    if (failed_layer[i] < 0 && (victim < 0 || before[i] > before[victim])) victim = i;
  ASSERT_GE(victim, 0) << "every sequence failed: none to remove";
  a.remove_sequence(ida[victim], st);
  b.remove_sequence(idb[victim], st);
  std::vector<int> redo(B, -1);
  for (int i = 0; i < B; ++i)
    if (failed_layer[i] >= 0) redo[i] = ida[i];
  a.set_plan(pa, redo, st);
  CUDA_OK(cudaMemsetAsync(aout.ptr, 0xFF, out_bytes, st));
  CUDA_OK(cudaGraphLaunch(graph.e, st));
  try {
    a.check(st);
  } catch (const Error& e) {
    FAIL() << "the replay after remove_sequence failed: " << e.what();
  }
  ASSERT_NO_FATAL_FAILURE(download(oa, aout.ptr, out_bytes, st));
  for (int i = 0; i < B; ++i) {
    if (i == victim) continue;
    for (int l = 0; l < L; ++l)
      ASSERT_EQ(a.tokens(ida[i], l), before[i] + 1) << "sequence " << ida[i] << " layer " << l << " after the redo";
    if (redo[i] < 0) {
      ASSERT_TRUE(row_is(oa, cfg, B, i, true)) << "slot " << i;
      continue;
    }
    ASSERT_TRUE(same_blocks(a, ida[i], b, idb[i], st)) << "failed sequence " << ida[i] << " after the redo";
    ASSERT_TRUE(row_is(oa, cfg, B, i, false)) << "slot " << i;
    // Its attention in the redo vs the twin's in the step (the batches differ: fp32 order may).
    const size_t per_row = size_t(cfg.q_heads) * D;
    size_t exact = 0;
    for (int l = 0; l < L; ++l) {
      double diff = 0, scale = 0;
      for (size_t j = 0; j < per_row; ++j) {
        const size_t e = (size_t(l) * B + i) * per_row + j;
        const double x = load_as_float(DType::F16, oa.data(), e), y = load_as_float(DType::F16, ob_step.data(), e);
        diff = std::max(diff, std::fabs(x - y));
        scale = std::max(scale, std::fabs(y));
        exact += std::memcmp(oa.data() + 2 * e, ob_step.data() + 2 * e, 2) == 0;
      }
      EXPECT_LE(diff, 2e-3 * scale) << "redo vs never-failed, sequence " << ida[i] << " layer " << l;
    }
    std::printf("redo of sequence %d: %zu of %zu output elements bit-identical to the never-failed cache's\n", ida[i],
                exact, size_t(L) * per_row);
  }

  // Decode goes on in both without the removed sequence: bit for bit.
  std::vector<int> go_a(B, -1), go_b(B, -1);
  for (int i = 0; i < B; ++i)
    if (i != victim) { go_a[i] = ida[i]; go_b[i] = idb[i]; }
  a.set_plan(pa, go_a, st);
  b.set_plan(pb, go_b, st);
  const int kAfter = 16;
  for (int s = fail_step + 1; s <= fail_step + kAfter; ++s) {
    ASSERT_NO_FATAL_FAILURE(step_inputs(s));
    CUDA_OK(cudaGraphLaunch(graph.e, st));
    try {
      a.check(st);
    } catch (const Error& e) {
      FAIL() << "step " << s << " after the recovery: " << e.what();
    }
    run_step(b, pb, io_b, st);
    ASSERT_NO_FATAL_FAILURE(download(oa, aout.ptr, out_bytes, st));
    ASSERT_NO_FATAL_FAILURE(download(ob, bout.ptr, out_bytes, st));
    ASSERT_TRUE(same_outputs(oa, ob, cfg, B)) << "step " << s << " after the recovery";
    ASSERT_TRUE(row_is(oa, cfg, B, victim, true)) << "step " << s;
  }
  EXPECT_NO_THROW(b.check(st));
  for (int i = 0; i < B; ++i) {
    if (i == victim) continue;
    for (int l = 0; l < L; ++l) {
      ASSERT_EQ(a.tokens(ida[i], l), before[i] + 1 + kAfter) << "sequence " << ida[i] << " layer " << l;
      ASSERT_EQ(b.tokens(idb[i], l), before[i] + 1 + kAfter) << "sequence " << idb[i] << " layer " << l;
    }
    ASSERT_TRUE(same_blocks(a, ida[i], b, idb[i], st)) << "sequence " << ida[i] << " at the end";
    a.remove_sequence(ida[i], st);
    b.remove_sequence(idb[i], st);
  }
  EXPECT_EQ(a.stats().pool_bytes_in_use, 0u);
  EXPECT_EQ(b.stats().pool_bytes_in_use, 0u);
  EXPECT_EQ(a.stats().tokens, 0u);
}

TEST(GraphGpu, SoakThroughGraphs) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Config cfg;
  cfg.layers = 3; cfg.kv_heads = 2; cfg.q_heads = 8; cfg.head_dim = 64; cfg.block_tokens = 32;
  cfg.max_seqs = 8; cfg.max_tokens_per_seq = 512; cfg.pool_bytes = size_t(32) << 20;
  const int L = cfg.layers, H = cfg.kv_heads, D = cfg.head_dim, T = cfg.block_tokens, kMax = 8;
  const int kEpochs = 40, kMaxEpochSteps = 24, kPoolTokens = 4096;
  Stream stream;
  ASSERT_NE(stream.s, nullptr);
  const cudaStream_t st = stream.s;
  DevBuf<__half> pk(size_t(kPoolTokens) * H * D), pv(size_t(kPoolTokens) * H * D);
  fill_normal<<<256, 256, 0, st>>>(pk.ptr, pk.n, D, seed, true);
  fill_normal<<<256, 256, 0, st>>>(pv.ptr, pv.n, D, seed + 1, false);
  const size_t kv_step = kv_elems(cfg, kMax), q_step = q_elems(cfg, kMax), out_bytes = q_step * 2;
  DevBuf<__half> k(kv_step), v(kv_step), q(q_step), aout(q_step), bout(q_step);
  CUDA_LAUNCH_OK();

  // A replays one graph per batch size (captured on first use, sometimes
  // again); B runs the same plan calls eagerly.
  Cache a(cfg), b(cfg);
  DecodePlan pa[kMax + 1], pb[kMax + 1];
  GraphExec graphs[kMax + 1];
  struct Seq { int a, b; int64_t n; };
  std::vector<Seq> live;
  std::mt19937_64 rng(seed);
  auto add = [&](int prompt) {
    Seq s{a.add_sequence(), b.add_sequence(), prompt};
    if (prompt > 0)
      for (int l = 0; l < L; ++l) {
        const size_t at = size_t(rng() % (kPoolTokens - prompt)) * H * D;
        a.append(l, {s.a}, {prompt}, pk.ptr + at, pv.ptr + at, st);
        b.append(l, {s.b}, {prompt}, pk.ptr + at, pv.ptr + at, st);
      }
    live.push_back(s);
  };
  uint64_t step_seed = seed * 104729 + 17;
  int total_steps = 0, captures = 0, padded_epochs = 0;
  std::vector<uint8_t> oa, ob;
  for (int epoch = 0; epoch < kEpochs; ++epoch) {
    SCOPED_TRACE("epoch " + std::to_string(epoch));
    for (size_t i = 0; i < live.size();) {
      if (live[i].n + kMaxEpochSteps > cfg.max_tokens_per_seq || rng() % 4 == 0) {
        a.remove_sequence(live[i].a, st);
        b.remove_sequence(live[i].b, st);
        live.erase(live.begin() + i);
      } else {
        ++i;
      }
    }
    // The first sequences are shorter than a block: the layers' first
    // compressions (codebook builds) happen inside graph replays.
    const int adds = epoch == 0 ? 4 : int(rng() % 3);
    for (int j = 0; j < adds && int(live.size()) < kMax; ++j) add(int(rng() % (epoch == 0 ? T : 4 * T)));
    if (live.empty()) add(int(rng() % (4 * T)));

    // The batch: exactly the live sequences, or the largest plan with idle slots; random slot order.
    const int n = int(live.size());
    const bool padded = n < kMax && rng() % 3 == 0;
    const int batch = padded ? kMax : n;
    padded_epochs += padded;
    std::vector<int> slots(batch);
    for (int i = 0; i < batch; ++i) slots[i] = i;
    std::shuffle(slots.begin(), slots.end(), rng);
    std::vector<int> slot_a(batch, -1), slot_b(batch, -1), slot_seq(batch, -1);
    for (int i = 0; i < n; ++i) {
      slot_a[slots[i]] = live[i].a;
      slot_b[slots[i]] = live[i].b;
      slot_seq[slots[i]] = i;
    }
    if (pa[batch].batch == 0) {
      pa[batch] = a.make_plan(batch);
      pb[batch] = b.make_plan(batch);
    }
    a.set_plan(pa[batch], slot_a, st);
    b.set_plan(pb[batch], slot_b, st);
    if (!graphs[batch].e || rng() % 4 == 0) {
      ASSERT_NO_FATAL_FAILURE(capture_step(a, pa[batch], {k.ptr, v.ptr, q.ptr, aout.ptr, kMax}, st, graphs[batch]));
      ++captures;
    }
    const int steps = 1 + int(rng() % kMaxEpochSteps);
    for (int s = 0; s < steps; ++s, ++total_steps) {
      fill_step(k.ptr, v.ptr, q.ptr, cfg, kMax, step_seed += 3, st);
      CUDA_OK(cudaMemsetAsync(aout.ptr, 0xFF, out_bytes, st));
      CUDA_OK(cudaMemsetAsync(bout.ptr, 0xFF, out_bytes, st));
      CUDA_OK(cudaGraphLaunch(graphs[batch].e, st));
      run_step(b, pb[batch], {k.ptr, v.ptr, q.ptr, bout.ptr, kMax}, st);
      for (Seq& x : live) ++x.n;
      CUDA_OK(cudaGetLastError());
      ASSERT_NO_FATAL_FAILURE(download(oa, aout.ptr, out_bytes, st));
      ASSERT_NO_FATAL_FAILURE(download(ob, bout.ptr, out_bytes, st));
      ASSERT_TRUE(same_outputs(oa, ob, cfg, kMax)) << "batch " << batch << " step " << s;
      for (int i = 0; i < batch; ++i) ASSERT_TRUE(row_is(oa, cfg, kMax, i, slot_seq[i] < 0)) << "slot " << i;
      if (s % 8 == 7) {
        try {
          a.check(st);
          b.check(st);
        } catch (const Error& e) {
          FAIL() << "step " << s << ": " << e.what();
        }
      }
    }
    try {
      a.check(st);
      b.check(st);
    } catch (const Error& e) {
      FAIL() << "end of epoch: " << e.what();
    }
    for (const Seq& x : live)
      for (int l = 0; l < L; ++l) {
        ASSERT_EQ(a.tokens(x.a, l), x.n) << "sequence " << x.a << " layer " << l;
        ASSERT_EQ(b.tokens(x.b, l), x.n) << "sequence " << x.b << " layer " << l;
      }
    const Seq& one = live[rng() % live.size()];
    ASSERT_TRUE(same_blocks(a, one.a, b, one.b, st)) << "sequence " << one.a;
  }
  for (const Seq& x : live) {
    ASSERT_TRUE(same_blocks(a, x.a, b, x.b, st)) << "sequence " << x.a << " at the end";
    a.remove_sequence(x.a, st);
    b.remove_sequence(x.b, st);
  }
  for (const Cache* x : {&a, &b}) {
    const Stats s = x->stats();
    EXPECT_EQ(s.pool_bytes_in_use, 0u);
    EXPECT_EQ(s.compressed_bytes, 0u);
    EXPECT_EQ(s.tokens, 0u);
  }
  std::printf("graph soak: %d epochs, %d steps, %d captures, %d epochs with idle slots\n", kEpochs, total_steps,
              captures, padded_epochs);
}
