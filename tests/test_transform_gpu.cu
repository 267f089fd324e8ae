// Config::transform = Hadamard on the GPU. The stored blocks are the CPU
// reference encoding of the host-rotated rows, bit for bit (strided prefill of
// several sequences, decode steps that close blocks from the tail, two layers,
// every cache type; and with Codes8 tails, of the rows through the tail codes,
// rotated or not). Attention matches float64 attention over the stored
// values rotated back, every token vector is within cache.hpp's per-vector L2
// bound of its input, and attention stays within what that bound implies of
// attention over the original K/V.
#include <cmath>
#include <cstring>
#include <memory>
#include <string>

#include "attention_ref.hpp"
#include "gpu_util.cuh"
#include "kvcomp/cache.hpp"
#include "kvcomp/reference.hpp"
#include "kvcomp/tail_codes.hpp"
#include "kvcomp/transform.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp_test;

namespace {

// cache.hpp's per-vector terms for the transform and the rounding to the
// cache's type: eps ||x||_2 + delta sqrt(D).
double rounding_eps(DType t) { return t == DType::F16 ? 0x1p-11 + 0x1p-19 : t == DType::BF16 ? 0x1p-8 + 0x1p-19 : 0x1p-20; }
double rounding_delta(DType t) { return t == DType::F16 ? 0x1p-25 : 0.0; }

/// x <- x R in float64 (R = H / sqrt(D), its own inverse): stored rows back to the input domain.
void hadamard64(double* x, int D) {
  for (int h = 1; h < D; h <<= 1)
    for (int i = 0; i < D; ++i)
      if ((i & h) == 0) {
        const double a = x[i], b = x[i + h];
        x[i] = a + b;
        x[i + h] = a - b;
      }
  for (int i = 0; i < D; ++i) x[i] /= std::sqrt(double(D));
}

/// Tokens an engine of type t hands over ([n][H][D]): K with outlier channels, V gaussian.
struct Rows {
  std::vector<float> k, v;
  Rows(DType t, int n, int H, int D, uint64_t seed)
      : k(round_to(t, make_data(Dist::OutlierChannels, n, H * D, seed))),
        v(round_to(t, make_data(Dist::Gaussian, n, H * D, seed + 1))) {}
};

/// rows [n][H][D] as an engine might hold them: head_stride = D + 8,
/// token_stride = H (D + 8) + 4 elements, the gaps NaN (a stride mix-up shows).
struct Strided {
  int64_t head_stride, token_stride;
  std::unique_ptr<DevBuf<uint8_t>> buf;
  Strided(DType t, const std::vector<float>& rows, int n, int H, int D)
      : head_stride(D + 8), token_stride(int64_t(H) * (D + 8) + 4) {
    std::vector<float> x(size_t(n) * token_stride, std::nanf(""));
    for (int i = 0; i < n; ++i)
      for (int h = 0; h < H; ++h)
        for (int c = 0; c < D; ++c) x[i * token_stride + h * head_stride + c] = rows[(size_t(i) * H + h) * D + c];
    const auto bytes = to_dtype_bytes(t, x);
    buf = std::make_unique<DevBuf<uint8_t>>(bytes.size());
    buf->upload(bytes);
  }
  const uint8_t* ptr() const { return buf->ptr; }
};

/// Head h's rows [n][D] of rows [n][H][D].
std::vector<float> head_rows(const std::vector<float>& all, int n, int H, int D, int h) {
  std::vector<float> x(size_t(n) * D);
  for (int t = 0; t < n; ++t)
    for (int c = 0; c < D; ++c) x[size_t(t) * D + c] = all[(size_t(t) * H + h) * D + c];
  return x;
}

/// The bound the cache uses for (layer, head, kind): later overrides win.
ErrorBound bound_of(const Config& cfg, int layer, int head, Kind kind) {
  ErrorBound b = kind == Kind::Key ? cfg.k_bound : cfg.v_bound;
  for (const auto& o : cfg.overrides)
    if (o.layer == layer && (o.kv_head == -1 || o.kv_head == head)) b = kind == Kind::Key ? o.k : o.v;
  return b;
}

/// What the cache holds for one (seq, head, kind), [n][D] in the rotated
/// domain: closed blocks through the reference decoder, tail rows = the
/// rotated input y (the tail holds y in the cache's type).
std::vector<float> stored_rows(const Cache& cache, int layer, int seq, int head, Kind kind, const std::vector<float>& y,
                               int n) {
  const int T = cache.config().block_tokens, D = cache.config().head_dim;
  std::vector<float> z(y);
  const Codebook cb = n >= T ? cache.codebook(layer, head, kind) : Codebook{};
  for (int b = 0; b < n / T; ++b) {
    const auto bytes = cache.read_block(layer, seq, head, b, kind, 0);
    const auto status = ref::decode_block(bytes.data(), bytes.size(), kind, T, D, cb, &z[size_t(b) * T * D]);
    EXPECT_EQ(status, ref::DecodeStatus::Ok) << "block " << b;
  }
  return z;
}

/// Index of the first byte where a and b differ (or the shorter size), -1 if equal.
long first_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    if (a[i] != b[i]) return long(i);
  return a.size() == b.size() ? -1 : long(std::min(a.size(), b.size()));
}

}  // namespace

TEST(TransformGpu, BlocksAreTheReferenceEncodingOfTheRowsAsStored) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  // Codes8 / Codes6 tails (kvcomp/tail_codes.hpp): the reference encodes the rows through the tail codes first, as
  // the cache quantizes every vector (prefill too) from them; with and without the rotation.
  struct Case { DType dtype; int D, T; TailFormat tail; Transform transform; };
  for (const Case cs : {Case{DType::F16, 128, 64, TailFormat::Input, Transform::Hadamard},
                        Case{DType::BF16, 64, 32, TailFormat::Input, Transform::Hadamard},
                        Case{DType::F32, 128, 32, TailFormat::Input, Transform::Hadamard},
                        Case{DType::F16, 256, 64, TailFormat::Input, Transform::Hadamard},
                        Case{DType::F16, 128, 64, TailFormat::Codes8, Transform::Hadamard},
                        Case{DType::BF16, 64, 32, TailFormat::Codes8, Transform::None},
                        Case{DType::F16, 96, 64, TailFormat::Codes8, Transform::None},
                        Case{DType::F32, 256, 32, TailFormat::Codes8, Transform::None},
                        Case{DType::F16, 128, 64, TailFormat::Codes6, Transform::Hadamard},
                        Case{DType::BF16, 80, 32, TailFormat::Codes6, Transform::None},
                        Case{DType::F32, 64, 128, TailFormat::Codes6, Transform::None}}) {
    const int code_bits = tail_code_bits(cs.tail);
    const bool codes = code_bits != 0, rotated = cs.transform == Transform::Hadamard;
    SCOPED_TRACE(std::string(dtype_name(cs.dtype)) + " D " + std::to_string(cs.D) + " T " + std::to_string(cs.T) +
                 (codes ? " Codes" + std::to_string(code_bits) : "") + (rotated ? " Hadamard" : ""));
    Config cfg;
    cfg.layers = 2;
    cfg.kv_heads = 2;
    cfg.q_heads = 4;
    cfg.head_dim = cs.D;
    cfg.dtype = cs.dtype;
    cfg.block_tokens = cs.T;
    cfg.max_seqs = 3;
    cfg.max_tokens_per_seq = 512;
    cfg.pool_bytes = size_t(8) << 20;
    cfg.transform = cs.transform;
    cfg.tail_format = cs.tail;
    // Absolute bounds on one head force escapes too.
    cfg.overrides.push_back({1, 1, {BoundMode::Absolute, 0.001f}, {BoundMode::Absolute, 0.02f}});
    const int H = cfg.kv_heads, D = cfg.head_dim, T = cfg.block_tokens;
    Cache cache(cfg);
    const std::vector<int> prompt = {5, T, 2 * T + 13};
    std::vector<int> ids;
    for (size_t i = 0; i < prompt.size(); ++i) ids.push_back(cache.add_sequence());
    // Everything appended, per layer and sequence: [t][H][D].
    std::vector<std::vector<std::vector<float>>> hk(cfg.layers, std::vector<std::vector<float>>(ids.size())), hv = hk;
    auto record = [&](int layer, const Rows& r, const std::vector<int>& counts) {
      size_t at = 0;
      for (size_t i = 0; i < ids.size(); ++i) {
        const size_t len = size_t(counts[i]) * H * D;
        hk[layer][i].insert(hk[layer][i].end(), r.k.begin() + at, r.k.begin() + at + len);
        hv[layer][i].insert(hv[layer][i].end(), r.v.begin() + at, r.v.begin() + at + len);
        at += len;
      }
    };
    // Prefill: the three sequences in one strided call per layer.
    const int prompt_total = prompt[0] + prompt[1] + prompt[2];
    for (int l = 0; l < cfg.layers; ++l) {
      const Rows r(cs.dtype, prompt_total, H, D, seed + 10 * l);
      const Strided k(cs.dtype, r.k, prompt_total, H, D), v(cs.dtype, r.v, prompt_total, H, D);
      cache.append(l, ids, prompt, k.ptr(), v.ptr(), 0, k.token_stride, k.head_stride);
      record(l, r, prompt);
    }
    // Decode: one token for each sequence per step, contiguous; closes blocks from the tails.
    for (int step = 0; step < T + 3; ++step)
      for (int l = 0; l < cfg.layers; ++l) {
        const Rows r(cs.dtype, 3, H, D, seed + 1000 + 10 * step + l);
        const auto kb = to_dtype_bytes(cs.dtype, r.k), vb = to_dtype_bytes(cs.dtype, r.v);
        DevBuf<uint8_t> dk(kb.size()), dv(vb.size());
        dk.upload(kb);
        dv.upload(vb);
        cache.append(l, ids, {1, 1, 1}, dk.ptr, dv.ptr, 0);
        record(l, r, {1, 1, 1});
      }
    CUDA_LAUNCH_OK();

    int blocks_checked = 0;
    for (int l = 0; l < cfg.layers; ++l)
      for (size_t i = 0; i < ids.size(); ++i) {
        const int n = prompt[i] + T + 3;
        ASSERT_EQ(cache.tokens(ids[i], l), n);
        for (int h = 0; h < H; ++h)
          for (Kind kind : {Kind::Key, Kind::Value}) {
            const auto x = head_rows(kind == Kind::Key ? hk[l][i] : hv[l][i], n, H, D, h);
            auto y = rotated ? hadamard_rows_as_stored(cs.dtype, x.data(), size_t(n), D) : x;
            if (codes)
              for (int t = 0; t < n; ++t)
                format::tail_round_row(&y[size_t(t) * D], D, int(cs.dtype), code_bits, &y[size_t(t) * D]);
            const Codebook cb = cache.codebook(l, h, kind);
            const uint16_t id = uint16_t((l * H + h) * 2 + int(kind));
            for (int b = 0; b < n / T; ++b) {
              const auto want = ref::encode_block(kind, &y[size_t(b) * T * D], T, D, bound_of(cfg, l, h, kind), cb, id);
              const auto got = cache.read_block(l, ids[i], h, b, kind, 0);
              ASSERT_EQ(first_difference(got, want), -1)
                  << "layer " << l << " seq " << i << " head " << h << " kind " << int(kind) << " block " << b
                  << ": " << got.size() << " bytes stored, " << want.size() << " expected";
              ++blocks_checked;
            }
          }
      }
    EXPECT_EQ(blocks_checked, cfg.layers * H * 2 * (1 + 2 + 3));  // n / T = 1, 2, 3 per sequence
  }
}

namespace {

struct AttnCase {
  int H, G, D;
  DType dtype;   // of K/V (the cache's)
  DType q_type;  // of q and out
  std::vector<int> lengths;
  ErrorBound k_bound{BoundMode::Relative, 0.05f};
  ErrorBound v_bound{BoundMode::Relative, 0.05f};
};

void run_hadamard_attention(const AttnCase& cs, uint64_t seed) {
  const int H = cs.H, G = cs.G, D = cs.D, B = int(cs.lengths.size());
  Config cfg;
  cfg.layers = 1;
  cfg.kv_heads = H;
  cfg.q_heads = H * G;
  cfg.head_dim = D;
  cfg.dtype = cs.dtype;
  cfg.k_bound = cs.k_bound;
  cfg.v_bound = cs.v_bound;
  cfg.transform = Transform::Hadamard;
  cfg.max_seqs = B;
  int longest = 1, total = 0;
  for (int n : cs.lengths) { longest = std::max(longest, n); total += n; }
  cfg.max_tokens_per_seq = longest;
  cfg.pool_bytes = size_t(total) * H * D * 2 * dtype_size(cs.dtype) * 2 + (size_t(16) << 20);
  const int T = cfg.block_tokens;
  Cache cache(cfg);
  std::vector<int> ids;
  for (int b = 0; b < B; ++b) ids.push_back(cache.add_sequence());
  // All sequences in one strided prefill call.
  const Rows all(cs.dtype, total, H, D, seed);
  {
    const Strided k(cs.dtype, all.k, total, H, D), v(cs.dtype, all.v, total, H, D);
    cache.append(0, ids, cs.lengths, k.ptr(), v.ptr(), 0, k.token_stride, k.head_stride);
    CUDA_LAUNCH_OK();
  }
  const int Hq = H * G;
  const auto q = round_to(cs.q_type, make_data(Dist::Gaussian, B * Hq, D, seed + 99));
  const auto qb = to_dtype_bytes(cs.q_type, q);
  DevBuf<uint8_t> dq(qb.size()), dout(qb.size());
  dq.upload(qb);
  CUDA_OK(cudaMemset(dout.ptr, 0xFF, qb.size()));  // NaN poison
  cache.attend(0, ids, dq.ptr, dout.ptr, cs.q_type, 0);
  CUDA_LAUNCH_OK();
  const auto ob = dout.download();

  // As in test_attention_gpu.cu: fp32 accumulation plus the output type's rounding.
  const double tol = cs.q_type == DType::F16 ? 1e-3 : 8e-3;
  const double eps = rounding_eps(cs.dtype), delta = rounding_delta(cs.dtype) * std::sqrt(double(D));
  int first_token = 0;
  for (int b = 0; b < B; ++b) {
    const int n = cs.lengths[b];
    ASSERT_EQ(cache.tokens(ids[b], 0), n);
    for (int h = 0; h < H; ++h) {
      // Per kind: input x, stored z rotated back (x'), and each token's guaranteed L2 error bound.
      std::vector<double> x[2], xr[2], err_bound[2];
      for (Kind kind : {Kind::Key, Kind::Value}) {
        const int ki = int(kind);
        const auto rows = head_rows(kind == Kind::Key ? all.k : all.v, total, H, D, h);
        const std::vector<float> xin(rows.begin() + size_t(first_token) * D, rows.begin() + size_t(first_token + n) * D);
        const auto y = hadamard_rows_as_stored(cs.dtype, xin.data(), size_t(n), D);
        const auto z = stored_rows(cache, 0, ids[b], h, kind, y, n);
        if (::testing::Test::HasFailure()) return;
        x[ki].assign(xin.begin(), xin.end());
        xr[ki].assign(z.begin(), z.end());
        err_bound[ki].assign(n, 0.0);
        std::vector<format::GroupQuant> params;
        for (int t = 0; t < n; ++t) {
          double eb_sq = 0;
          if (t < n / T * T) {  // in a closed block: every element within its group's bound of y
            const int blk = t / T;
            if (t % T == 0) params = ref::block_params(kind, &y[size_t(blk) * T * D], T, D, bound_of(cfg, 0, h, kind));
            for (int c = 0; c < D; ++c) {
              const float eb = params[format::group_of(kind, T, D, t % T, c)].eb_abs;
              ASSERT_LE(std::fabs(z[size_t(t) * D + c] - y[size_t(t) * D + c]), eb)
                  << "seq " << b << " head " << h << " kind " << ki << " token " << t << " channel " << c;
              eb_sq += double(eb) * eb;
            }
          }
          double x_norm = 0, e_sq = 0;
          double* row = &xr[ki][size_t(t) * D];
          hadamard64(row, D);
          for (int c = 0; c < D; ++c) {
            x_norm += x[ki][size_t(t) * D + c] * x[ki][size_t(t) * D + c];
            e_sq += (row[c] - x[ki][size_t(t) * D + c]) * (row[c] - x[ki][size_t(t) * D + c]);
          }
          // cache.hpp: ||x' - x||_2 <= sqrt(sum eb_j^2) + eps ||x||_2 + delta sqrt(D).
          err_bound[ki][t] = std::sqrt(eb_sq) * (1 + 1e-6) + eps * std::sqrt(x_norm) + delta;  // 1e-6: slack for float64 rounding here
          ASSERT_LE(std::sqrt(e_sq), err_bound[ki][t]) << "seq " << b << " head " << h << " kind " << ki << " token " << t;
        }
      }
      double max_v = 0;
      for (double e : x[1]) max_v = std::max(max_v, std::fabs(e));
      for (int g = 0; g < G; ++g) {
        const int hq = h * G + g;
        const float* qv = &q[(size_t(b) * Hq + hq) * D];
        const auto ref = attention64(qv, xr[0].data(), xr[1].data(), n, D);
        const auto exact = attention64(qv, x[0].data(), x[1].data(), n, D);
        const auto bound = attention_bound_from_vector_errors(qv, x[0], x[1], err_bound[0], err_bound[1], n, D);
        double num = 0, den = 0;
        for (int c = 0; c < D; ++c) {
          const float got = load_as_float(cs.q_type, ob.data(), (size_t(b) * Hq + hq) * D + c);
          ASSERT_TRUE(std::isfinite(got)) << "unwritten or non-finite output: seq " << b << " head " << hq << " c " << c;
          num += (got - ref[c]) * (got - ref[c]);
          den += ref[c] * ref[c];
          // The bound the per-vector error bound implies (attention_ref.hpp), plus rounding.
          ASSERT_LE(std::fabs(got - exact[c]), bound[c] + 4 * tol * max_v)
              << "seq " << b << " (" << n << " tokens) q head " << hq << " channel " << c;
        }
        if (n == 0) ASSERT_EQ(num, 0.0) << "a sequence with no tokens attends to 0";
        ASSERT_LE(std::sqrt(num / std::max(den, 1e-30)), tol) << "seq " << b << " (" << n << " tokens) q head " << hq;
      }
    }
    first_token += n;
  }
}

}  // namespace

TEST(TransformGpu, HadamardAttentionAroundBlockEdgesMatchesTheStoredValuesAndTheBound) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  run_hadamard_attention({2, 4, 128, DType::F16, DType::F16, {0, 1, 63, 64, 65, 1000}}, seed);
}

TEST(TransformGpu, HadamardAttentionGqaHeadDimsAndTypes) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (int G : {1, 8, 16}) {
    SCOPED_TRACE("G " + std::to_string(G));
    run_hadamard_attention({2, G, 64, DType::F16, DType::F16, {130, 700}}, seed + G);
    if (HasFatalFailure()) return;
  }
  SCOPED_TRACE("bf16 K/V, bf16 q");
  run_hadamard_attention({2, 2, 128, DType::BF16, DType::BF16, {129, 513}}, seed + 3);
  if (HasFatalFailure()) return;
  SCOPED_TRACE("fp32 K/V");
  run_hadamard_attention({2, 4, 64, DType::F32, DType::F16, {200, 77}}, seed + 4);
  if (HasFatalFailure()) return;
  SCOPED_TRACE("head_dim 256");
  run_hadamard_attention({2, 2, 256, DType::BF16, DType::BF16, {129, 300}}, seed + 5);
}

TEST(TransformGpu, HadamardAttentionTightBoundAndLongContext) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  // A tight K bound keeps the attention bound informative (it grows like e^(2 x score error)).
  AttnCase tight{2, 4, 128, DType::F16, DType::F16, {300, 2000}};
  tight.k_bound = {BoundMode::Relative, 0.002f};
  tight.v_bound = {BoundMode::Relative, 0.01f};
  run_hadamard_attention(tight, seed);
  if (HasFatalFailure()) return;
  run_hadamard_attention({2, 4, 128, DType::F16, DType::F16, {30000}}, seed + 1);  // many splits, merged and rotated
}
