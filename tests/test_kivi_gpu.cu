// The KIVI-style baseline on the GPU: its quantizer against the CPU reference
// (bit for bit, read back through the documented layout) and its fused
// attention against a float64 attention over the reference's K/V.
#include <cmath>

#include "gpu_util.cuh"
#include "src/kivi.hpp"
#include "attention_ref.hpp"
#include "test_data.hpp"

using namespace kvcomp_test;
using kvcomp::baseline::KiviCache;
using kvcomp::baseline::KiviShape;

namespace {

/// K/V of every sequence as the device cache holds them (layout in kivi_attention.cuh).
void read_back(const KiviCache& c, std::vector<float>& k, std::vector<float>& v) {
  const KiviShape& s = c.shape();
  const auto& p = c.params();
  const int D = s.head_dim, N = s.tokens, W = D * s.bits / 32, per_word = 32 / s.bits, per_lane = D / 32;
  const uint32_t mask = (1u << s.bits) - 1;
  std::vector<uint32_t> kc(c.code_words()), vc(c.code_words());
  std::vector<__half2> kp(c.param_count()), vp(c.param_count());
  const size_t tail_n = size_t(s.batch) * s.kv_heads * s.tail_cap() * D;
  std::vector<__half> kt(tail_n), vt(tail_n);
  ASSERT_EQ(cudaMemcpy(kc.data(), p.k_codes, kc.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(vc.data(), p.v_codes, vc.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(kp.data(), p.k_prm, kp.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(vp.data(), p.v_prm, vp.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(kt.data(), p.k_tail, tail_n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(vt.data(), p.v_tail, tail_n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  k.assign(size_t(s.batch) * s.kv_heads * N * D, 0.f);
  v.assign(k.size(), 0.f);
  for (size_t seq = 0; seq < size_t(s.batch) * s.kv_heads; ++seq) {
    for (int ch = 0; ch < s.chunks(); ++ch) {
      const size_t chunk = seq * s.chunks() + ch;
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < D; ++i) {
          const uint32_t kcode = (kc[(chunk * W + i / per_word) * 32 + lane] >> (i % per_word * s.bits)) & mask;
          const uint32_t vcode = (vc[(chunk * W + i / per_word) * 32 + lane] >> (i % per_word * s.bits)) & mask;
          const int t = ch * 32 + lane;  // K: lane = token, i = channel
          const float2 ksz = __half22float2(kp[chunk * D + i]);
          k[(seq * N + t) * D + i] = std::fma(float(kcode), ksz.x, ksz.y);
          const int vt_ = ch * 32 + i / per_lane, vch = lane + 32 * (i % per_lane);  // V: i = t * D/32 + j
          const float2 vsz = __half22float2(vp[(chunk * 32 + i / per_lane) * per_lane + i % per_lane]);
          v[(seq * N + vt_) * D + vch] = std::fma(float(vcode), vsz.x, vsz.y);
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

void run_kivi_case(int bits, int D, int G, int tokens, uint64_t seed) {
  KiviShape s;
  s.batch = 3; s.kv_heads = 2; s.q_heads = 2 * G; s.head_dim = D; s.tokens = tokens; s.bits = bits;
  const int seqs = s.batch * s.kv_heads;
  auto k = make_data(Dist::OutlierChannels, seqs * tokens, D, seed);
  auto v = make_data(Dist::HeavyTailed, seqs * tokens, D, seed + 1);
  round_to_half(k);
  round_to_half(v);
  std::vector<float> k_ref(k.size()), v_ref(v.size());
  kvcomp::baseline::kivi_reference(s, k.data(), v.data(), k_ref.data(), v_ref.data());

  DevBuf<uint8_t> dk(k.size() * 2), dv(v.size() * 2);
  dk.upload(to_dtype_bytes(kvcomp::DType::F16, k));
  dv.upload(to_dtype_bytes(kvcomp::DType::F16, v));
  KiviCache cache(s);
  cache.build(reinterpret_cast<const __half*>(dk.ptr), reinterpret_cast<const __half*>(dv.ptr), 0);
  CUDA_LAUNCH_OK();
  std::vector<float> k_dev, v_dev;
  read_back(cache, k_dev, v_dev);
  if (::testing::Test::HasFatalFailure()) return;
  for (size_t i = 0; i < k.size(); ++i) {
    ASSERT_EQ(k_dev[i], k_ref[i]) << "K element " << i << " bits " << bits << " seed " << seed;
    ASSERT_EQ(v_dev[i], v_ref[i]) << "V element " << i << " bits " << bits << " seed " << seed;
  }

  const auto q = round_to(kvcomp::DType::F16, make_data(Dist::Gaussian, s.batch * s.q_heads, D, seed + 2));
  DevBuf<uint8_t> dq(q.size() * 2), dout(q.size() * 2);
  dq.upload(to_dtype_bytes(kvcomp::DType::F16, q));
  CUDA_OK(cudaMemset(dout.ptr, 0xFF, q.size() * 2));  // NaN poison
  DevBuf<float> ws(cache.workspace_floats(132));
  cache.attend(reinterpret_cast<const __half*>(dq.ptr), reinterpret_cast<__half*>(dout.ptr), ws.ptr, 132, 0);
  CUDA_LAUNCH_OK();
  const auto ob = dout.download();
  for (int b = 0; b < s.batch; ++b)
    for (int hq = 0; hq < s.q_heads; ++hq) {
      const size_t seq = size_t(b) * s.kv_heads + hq / G;
      const auto ref = attention64(&q[(size_t(b) * s.q_heads + hq) * D], &k_ref[seq * tokens * D],
                                   &v_ref[seq * tokens * D], tokens, D);
      double num = 0, den = 0;
      for (int c = 0; c < D; ++c) {
        const float got = kvcomp::load_as_float(kvcomp::DType::F16, ob.data(), (size_t(b) * s.q_heads + hq) * D + c);
        ASSERT_TRUE(std::isfinite(got)) << "unwritten output: seq " << b << " head " << hq << " c " << c;
        num += (got - ref[c]) * (got - ref[c]);
        den += ref[c] * ref[c];
      }
      ASSERT_LE(std::sqrt(num / std::max(den, 1e-30)), 1e-3)
          << "bits " << bits << " D " << D << " G " << G << " tokens " << tokens << " seq " << b << " seed " << seed;
    }
}

}  // namespace

TEST(KiviGpu, QuantizerMatchesReferenceAndAttentionMatchesFloat64) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  for (int bits : {2, 4})
    for (int D : {64, 128})
      for (int G : {1, 4, 8})
        for (int tokens : {1, 33, 64, 65, 1000}) {
          run_kivi_case(bits, D, G, tokens, seed + tokens);
          if (HasFatalFailure()) return;
        }
}

TEST(KiviGpu, LongContextSplitsAndMerges) {
  KVCOMP_REQUIRE_GPU();
  run_kivi_case(4, 128, 4, 20000, fresh_seed());
}
