// The KIVI-style baseline on the GPU: its quantizer against the CPU reference
// (bit for bit, read back through the layout documented in
// kernels/kivi_attention.cuh, decoded here independently of the kernels) and
// its fused tensor-core attention against a float64 attention over the
// reference's K/V, for every output element.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "gpu_util.cuh"
#include "kvcomp/error.hpp"
#include "src/kivi.hpp"
#include "attention_ref.hpp"
#include "test_data.hpp"

using namespace kvcomp_test;
using kvcomp::baseline::KiviCache;
using kvcomp::baseline::KiviShape;

namespace {

float half_bits_to_float(uint32_t bits16) {
  __half h = __ushort_as_half(uint16_t(bits16));
  return __half2float(h);
}

/// K/V of every sequence as the device cache holds them, decoded from the
/// documented record layout; scale_max: the device's [K, V] scale maxima,
/// scales: the largest K and V scale decoded.
void read_back(const KiviCache& c, std::vector<float>& k, std::vector<float>& v, float (&scale_max)[2],
               float (&scales)[2]) {
  const KiviShape& s = c.shape();
  const auto& p = c.params();
  const int D = s.head_dim, N = s.tokens, bits = s.bits, S = 8 / bits, LW = D * bits / 32, MG = D * bits / 128;
  const uint32_t mask = (1u << bits) - 1;
  // Record: K codes, V codes (32 LW words each), K params (D), V scales (D / 2), V zeros (D / 2).
  const size_t k_codes = 0, v_codes = 32 * LW, k_prm = 64 * LW, v_scales = k_prm + D, v_zeros = v_scales + D / 2;
  const size_t rec_words = v_zeros + D / 2;
  ASSERT_EQ(c.record_words(), rec_words);
  ASSERT_EQ(c.records(), size_t(s.batch) * s.kv_heads * s.chunks());
  std::vector<uint32_t> recs(c.records() * rec_words);
  const size_t tail_n = size_t(s.batch) * s.kv_heads * s.tail_cap() * D;
  std::vector<__half> kt(tail_n), vt(tail_n);
  if (!recs.empty())
    CUDA_OK(cudaMemcpy(recs.data(), p.records, recs.size() * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(scale_max, p.scale_max, 2 * sizeof(float), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(kt.data(), p.k_tail, tail_n * 2, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(vt.data(), p.v_tail, tail_n * 2, cudaMemcpyDeviceToHost));
  k.assign(size_t(s.batch) * s.kv_heads * N * D, 0.f);
  v.assign(k.size(), 0.f);
  scales[0] = scales[1] = 0.f;
  // Word j of lane L of a code array; the fp16 half e of a params word.
  auto code_word = [](const uint32_t* arr, int lane, int j) { return arr[((j / 4) * 32 + lane) * 4 + j % 4]; };
  auto half_of = [](uint32_t w, int e) { return half_bits_to_float(e ? w >> 16 : w & 0xFFFFu); };
  for (size_t seq = 0; seq < size_t(s.batch) * s.kv_heads; ++seq) {
    for (int ch = 0; ch < s.chunks(); ++ch) {
      const uint32_t* rec = recs.data() + (seq * s.chunks() + ch) * rec_words;
      for (int t = 0; t < 32; ++t)
        for (int c = 0; c < D; ++c) {
          {  // K: token t, channel c
            const int r = t % 8, n8 = t / 8, k16 = c / 16, h = (c % 16) / 8, q = (c % 8) / 2, e = c % 2;
            const int j = k16 * (bits / 2) + n8 / S, cl = n8 % S, bit = 16 * e + 8 * h + bits * cl;
            const uint32_t code = (code_word(rec + k_codes, 4 * r + q, j) >> bit) & mask;
            const uint32_t* prm = rec + k_prm + (k16 * 4 + q) * 4;
            const float scale = half_of(prm[h], e), zero = half_of(prm[2 + h], e);
            scales[0] = std::max(scales[0], scale);
            k[(seq * N + ch * 32 + t) * D + c] = std::fma(float(code), scale, zero);
          }
          {  // V: token t, channel c
            const int m16 = c / 16, r = c % 8, sb = (c % 16) / 8, kk = t / 16, wp = (t % 16) / 8, q = (t % 8) / 2,
                      e = t % 2, g = c / 32, hh = wp;
            const int j = 2 * (kk * MG + m16 / S) + wp, cl = m16 % S, bit = 16 * e + 8 * sb + bits * cl;
            const uint32_t code = (code_word(rec + v_codes, 4 * r + q, j) >> bit) & mask;
            const float scale = half_of(rec[v_scales + (kk * 4 + q) * (D / 16) + 2 * g + hh], e);
            const float zero = half_of(rec[v_zeros + (g * 4 + q) * 4 + 2 * kk + hh], e);
            scales[1] = std::max(scales[1], scale);
            v[(seq * N + ch * 32 + t) * D + c] = std::fma(float(code), scale, zero);
          }
        }
    }
    for (int t = s.chunks() * 32; t < N; ++t)
      for (int c2 = 0; c2 < D; ++c2) {
        const size_t src = (seq * s.tail_cap() + (t - s.chunks() * 32)) * D + c2;
        k[(seq * N + t) * D + c2] = __half2float(kt[src]);
        v[(seq * N + t) * D + c2] = __half2float(vt[src]);
      }
  }
}

enum class Range { Normal, Wide, WideK, WideV };  // WideK / WideV: only the K or only the V part of Wide

/// Range::Wide: K channel 0 x 8000 and q channel 1 = 16 (|q| max x K scale max over the fp16
/// guard: q x scale is built in fp32 and pre-divided), V channel 5 x 3000 (the p shift drops to 0).
void run_kivi_case(int bits, int D, int G, int tokens, uint64_t seed, Range range = Range::Normal) {
  SCOPED_TRACE(testing::Message() << "bits " << bits << " D " << D << " G " << G << " tokens " << tokens << " seed "
                                  << seed << (range == Range::Wide ? " wide" : range == Range::WideK ? " wide K" :
                                                                     range == Range::WideV ? " wide V" : ""));
  const bool wide_k = range == Range::Wide || range == Range::WideK, wide_v = range == Range::Wide || range == Range::WideV;
  KiviShape s;
  s.batch = 3; s.kv_heads = 2; s.q_heads = 2 * G; s.head_dim = D; s.tokens = tokens; s.bits = bits;
  const int seqs = s.batch * s.kv_heads;
  auto k = make_data(wide_k ? Dist::Gaussian : Dist::OutlierChannels, seqs * tokens, D, seed);
  auto v = make_data(Dist::HeavyTailed, seqs * tokens, D, seed + 1);
  auto q = make_data(Dist::Gaussian, s.batch * s.q_heads, D, seed + 2);
  if (wide_k) {
    for (size_t i = 0; i < k.size(); i += D) k[i] = std::clamp(k[i] * 8000.f, -60000.f, 60000.f);
    for (size_t i = 0; i < q.size(); i += D) { q[i] *= 0.0005f; q[i + 1] = 16.f; }
  }
  if (wide_v)
    for (size_t i = 5; i < v.size(); i += D) v[i] = std::clamp(v[i] * 3000.f, -60000.f, 60000.f);
  round_to_half(k);
  round_to_half(v);
  q = round_to(kvcomp::DType::F16, q);
  std::vector<float> k_ref(k.size()), v_ref(v.size());
  kvcomp::baseline::kivi_reference(s, k.data(), v.data(), k_ref.data(), v_ref.data());

  DevBuf<uint8_t> dk(kvcomp::DType::F16, k), dv(kvcomp::DType::F16, v);
  KiviCache cache(s);
  cache.build(reinterpret_cast<const __half*>(dk.ptr), reinterpret_cast<const __half*>(dv.ptr), 0);
  CUDA_LAUNCH_OK();
  std::vector<float> k_dev, v_dev;
  float scale_max[2], scales[2];
  read_back(cache, k_dev, v_dev, scale_max, scales);
  if (::testing::Test::HasFatalFailure()) return;
  for (size_t i = 0; i < k.size(); ++i) {
    ASSERT_EQ(k_dev[i], k_ref[i]) << "K element " << i;
    ASSERT_EQ(v_dev[i], v_ref[i]) << "V element " << i;
  }
  ASSERT_EQ(scale_max[0], scales[0]) << "the K scale maximum";
  ASSERT_EQ(scale_max[1], scales[1]) << "the V scale maximum";
  if (wide_k && s.chunks() > 0) ASSERT_GT(16.f * scale_max[0], 16384.f) << "the case takes the fp32 path";

  DevBuf<uint8_t> dq(kvcomp::DType::F16, q), dout(q.size() * 2);
  std::vector<std::vector<double>> refs(size_t(s.batch) * s.q_heads);
  for (int b = 0; b < s.batch; ++b)
    for (int hq = 0; hq < s.q_heads; ++hq) {
      const size_t seq = size_t(b) * s.kv_heads + hq / G;
      refs[size_t(b) * s.q_heads + hq] = attention64(&q[(size_t(b) * s.q_heads + hq) * D], &k_ref[seq * tokens * D],
                                                     &v_ref[seq * tokens * D], tokens, D);
    }
  // The kernel sums p x code x scale and p x zero apart (fp32 on tensor cores, whose accumulation
  // truncates to about the largest product), two terms up to |zero| + range <= 3 max|v| of the 32-channel
  // group, whose difference, the output, can be far smaller: the tolerance has a part relative to that
  // magnitude, term[seq][c] = 3 max |v| over the tokens and the channels of c's group. (Measured: up to
  // ~2^-19.5 of it, in the V-wide case; allowed: 2^-17 per element, 2^-19 for the RMS.)
  std::vector<double> term(size_t(seqs) * D, 0.0);
  for (int sq = 0; sq < seqs; ++sq)
    for (int t = 0; t < tokens; ++t)
      for (int c = 0; c < D; ++c) {
        double& m = term[size_t(sq) * D + c / 32 * 32];
        m = std::max(m, 3.0 * std::fabs(double(v[(size_t(sq) * tokens + t) * D + c])));
      }
  // 132 SMs: many splits of a few units; 1 SM: few splits of many units (each warp many chunks).
  for (int sms : {132, 1}) {
    SCOPED_TRACE(testing::Message() << "sms " << sms);
    CUDA_OK(cudaMemset(dout.ptr, 0xFF, q.size() * 2));  // NaN poison
    DevBuf<float> ws(cache.workspace_floats(sms));
    ASSERT_NE(ws.ptr, nullptr);
    cache.attend(reinterpret_cast<const __half*>(dq.ptr), reinterpret_cast<__half*>(dout.ptr), ws.ptr, sms, 0);
    CUDA_LAUNCH_OK();
    const auto ob = dout.download();
    for (int b = 0; b < s.batch; ++b)
      for (int hq = 0; hq < s.q_heads; ++hq) {
        const auto& ref = refs[size_t(b) * s.q_heads + hq];
        const size_t seq = size_t(b) * s.kv_heads + hq / G;
        double num = 0, den = 0, t2 = 0;
        for (int c = 0; c < D; ++c) den += ref[c] * ref[c];
        const double rms = std::sqrt(den / D);
        for (int c = 0; c < D; ++c) {
          const float got = kvcomp::load_as_float(kvcomp::DType::F16, ob.data(), (size_t(b) * s.q_heads + hq) * D + c);
          ASSERT_TRUE(std::isfinite(got)) << "unwritten output: seq " << b << " head " << hq << " c " << c;
          // fp16 output rounding (half an ulp: 2^-11 relative) plus the kernel's error (above).
          const double tm = term[seq * D + c / 32 * 32];
          t2 += tm * tm;
          ASSERT_LE(std::fabs(got - ref[c]), std::ldexp(std::fabs(ref[c]), -11) + 1e-3 * rms + std::ldexp(tm, -17) + 1e-6)
              << "seq " << b << " head " << hq << " channel " << c << " ref " << ref[c];
          num += (got - ref[c]) * (got - ref[c]);
        }
        // Relative RMS error 1e-3, plus the cancellation part (2^-19 of its RMS over the channels).
        ASSERT_LE(std::sqrt(num / D), 1e-3 * rms + std::ldexp(std::sqrt(t2 / D), -19) + 1e-6)
            << "seq " << b << " head " << hq;
      }
  }
}

}  // namespace

TEST(KiviGpu, QuantizerMatchesReferenceAndAttentionMatchesFloat64) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  // Tokens: none, all fp16 (1, 33, 64: one or two tail units), one chunk and a tail of 33, a
  // partial tail of 36, many chunks with a full and a partial tail unit.
  for (int bits : {2, 4})
    for (int D : {64, 128})
      for (int G : {1, 3, 4, 7, 8})
        for (int tokens : {0, 1, 33, 64, 65, 100, 1000}) {
          run_kivi_case(bits, D, G, tokens, seed + tokens);
          if (HasFatalFailure()) return;
        }
}

TEST(KiviGpu, EveryGroupSize) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  for (int G = 1; G <= 8; ++G) {
    run_kivi_case(G % 2 ? 2 : 4, G % 3 ? 128 : 64, G, 777, seed + G);
    if (HasFatalFailure()) return;
  }
}

TEST(KiviGpu, LongContextSplitsAndMerges) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  run_kivi_case(4, 128, 4, 20000, seed);
  if (HasFatalFailure()) return;
  run_kivi_case(2, 128, 8, 20000, seed + 1);
  if (HasFatalFailure()) return;
  run_kivi_case(2, 64, 3, 9000, seed + 2);
}

TEST(KiviGpu, Fp16RangeGuards) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  for (Range range : {Range::WideK, Range::WideV, Range::Wide})
    for (int bits : {2, 4})
      for (int tokens : {70, 1000}) run_kivi_case(bits, 128, 4, tokens, seed + bits + tokens, range);
  run_kivi_case(2, 64, 7, 3000, seed + 5, Range::Wide);
}

TEST(KiviGpu, RejectsUnsupportedShapes) {
  KVCOMP_REQUIRE_GPU();
  KiviShape s;
  s.batch = 1; s.kv_heads = 2; s.q_heads = 18; s.head_dim = 128; s.tokens = 100; s.bits = 4;  // G = 9
  EXPECT_THROW(KiviCache{s}, kvcomp::Error);
  s.q_heads = 16; s.head_dim = 96;
  EXPECT_THROW(KiviCache{s}, kvcomp::Error);
}
