// Attention-quality harness: what each compressor costs where attention
// happens. For given K, V and decode queries it reports per variant the KV
// bytes per token, the ratio vs fp16, the relative error of the attention
// output vs fp16 attention and the KL divergence of the softmax, and the
// headline: kvcomp's ratio at the same output error as KIVI 4-bit and 2-bit.
//
//   quality [--layers L] [--tokens N] [--queries Q] [--seed S]   synthetic data
//           [--block-tokens T]                                   kvcomp's block (32, 64 or 128; default 64)
//   quality --dump kv.json                                        a KV dump
//           [--write-dump DIR] [--json results.json]
//
// Synthetic data (fixed seed, default 1): per layer and kv head, K has about
// 1 in 16 channels with a x8..x20 scale and an offset of up to +-10 (outlier
// channels), Student-t(5) tails, and a RoPE rotation of channel pairs
// (c, c + D/2) by position * 10000^(-2c/D); V is Student-t(8) with a
// log-normal scale per token; queries are Gaussian with the same rotation at
// their decode position. All values are rounded to fp16.
//
// KV dump format: a JSON object {"layers": L, "tokens": N, "kv_heads": H,
// "q_heads": Hq, "head_dim": D, "queries": Q, "k": "k.f16", "v": "v.f16",
// "q": "q.f16"} and three raw little-endian float16 files (paths relative to
// the JSON): k and v [L][N][H][D], q [L][Q][Hq][D]. --write-dump writes the
// synthetic data in this format.
//
// Variants: fp16 (the reference), kvcomp (blocks of T tokens, relative bounds for
// K and V (the equal-error search also tries V/K bound ratios 1/4..4), one
// codebook per layer/head/kind built from the data with
// Codebook::from_histograms (which also picks its low-bit count k), as the
// Cache does on prefill; bytes = blocks + 8-byte block table entries + the fp16
// tail), the same with Config::transform = Hadamard (rows rotated and rounded
// to fp16 as the Cache stores them, errors measured after rotating back; D a
// power of two), KIVI 4-bit and 2-bit (group 32, 32-token fp16 window; bytes =
// codes + fp16 scale/zero + fp16 window).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <cuda_fp16.h>

#include "kvcomp/codebook.hpp"
#include "kvcomp/reference.hpp"
#include "kvcomp/transform.hpp"
#include "kv_dump.hpp"
#include "src/kivi.hpp"

using namespace kvcomp_bench;

namespace {

// --- variants ----------------------------------------------------------------

/// One (layer, kv head): K, V [N][D] in and the variant's reconstruction out; returns bytes stored.
using Compressor = std::function<size_t(const std::vector<float>& k, const std::vector<float>& v, int N, int D,
                                        std::vector<float>& k_out, std::vector<float>& v_out)>;

/// kvcomp with relative bounds eb_k for K and eb_v for V, blocks of T tokens.
Compressor kvcomp_variant(float eb_k, float eb_v, int T) {
  return [eb_k, eb_v, T](const std::vector<float>& k, const std::vector<float>& v, int N, int D,
                         std::vector<float>& ko, std::vector<float>& vo) {
    const int blocks = N / T;
    ko = k;
    vo = v;
    // The open tail is held in the input's type (fp16 here), as the Cache holds it.
    size_t bytes = size_t(blocks) * sizeof(kvcomp::format::BlockRef) + size_t(N - blocks * T) * D * 2 * sizeof(uint16_t);
    for (kvcomp::Kind kind : {kvcomp::Kind::Key, kvcomp::Kind::Value}) {
      const kvcomp::ErrorBound bound{kvcomp::BoundMode::Relative, kind == kvcomp::Kind::Key ? eb_k : eb_v};
      const auto& x = kind == kvcomp::Kind::Key ? k : v;
      auto& out = kind == kvcomp::Kind::Key ? ko : vo;
      // One histogram per low-bit count k; from_histograms picks the k that needs the fewest bits.
      std::vector<uint64_t> hist(size_t(kvcomp::format::kLowBitChoices) * kvcomp::format::kNumSymbols, 0);
      for (int b = 0; b < blocks; ++b) kvcomp::ref::add_histogram(kind, &x[size_t(b) * T * D], T, D, bound, hist.data());
      const auto book = kvcomp::Codebook::from_histograms(hist.data());
      for (int b = 0; b < blocks; ++b) {
        const auto blk = kvcomp::ref::encode_block(kind, &x[size_t(b) * T * D], T, D, bound, book, 0);
        bytes += blk.size();
        if (kvcomp::ref::decode_block(blk.data(), blk.size(), kind, T, D, book, &out[size_t(b) * T * D]) !=
            kvcomp::ref::DecodeStatus::Ok)
          throw std::runtime_error("kvcomp block failed to decode");
      }
    }
    return bytes;
  };
}

/// kvcomp with Config::transform = Hadamard: rows rotated (x R, rounded to fp16 as the Cache stores them) before
/// `inner` quantizes them, the reconstruction rotated back (R is its own inverse) so that errors are measured in
/// the input domain, as attend() returns them.
Compressor hadamard_variant(Compressor inner) {
  return [inner](const std::vector<float>& k, const std::vector<float>& v, int N, int D, std::vector<float>& ko,
                 std::vector<float>& vo) {
    const auto k_rot = kvcomp::hadamard_rows_as_stored(kvcomp::DType::F16, k.data(), size_t(N), D);
    const auto v_rot = kvcomp::hadamard_rows_as_stored(kvcomp::DType::F16, v.data(), size_t(N), D);
    const size_t bytes = inner(k_rot, v_rot, N, D, ko, vo);
    for (int t = 0; t < N; ++t) {
      kvcomp::hadamard_row(&ko[size_t(t) * D], D);
      kvcomp::hadamard_row(&vo[size_t(t) * D], D);
    }
    return bytes;
  };
}

Compressor kivi_variant(int bits) {
  return [bits](const std::vector<float>& k, const std::vector<float>& v, int N, int D, std::vector<float>& ko,
                std::vector<float>& vo) {
    kvcomp::baseline::KiviShape s;
    s.batch = 1; s.kv_heads = 1; s.q_heads = 1; s.head_dim = D; s.tokens = N; s.bits = bits;
    ko.resize(k.size());
    vo.resize(v.size());
    kvcomp::baseline::kivi_reference(s, k.data(), v.data(), ko.data(), vo.data());
    return s.bytes();
  };
}

struct Result {
  std::string name;
  double bytes_per_token = 0, ratio = 0, err_mean = 0, err_max = 0, kl_mean = 0, kl_max = 0;
};

/// Softmax attention of q over K (scale 1/sqrt(D)), in double.
void attend(const float* q, const std::vector<float>& k, const std::vector<float>& v, int N, int D,
            std::vector<double>& p, std::vector<double>& o) {
  p.assign(N, 0.0);
  o.assign(D, 0.0);
  double mx = -INFINITY;
  for (int t = 0; t < N; ++t) {
    double s = 0;
    for (int c = 0; c < D; ++c) s += double(q[c]) * k[size_t(t) * D + c];
    p[t] = s / std::sqrt(double(D));
    mx = std::max(mx, p[t]);
  }
  double den = 0;
  for (int t = 0; t < N; ++t) { p[t] = std::exp(p[t] - mx); den += p[t]; }
  for (int t = 0; t < N; ++t) {
    p[t] /= den;
    for (int c = 0; c < D; ++c) o[c] += p[t] * v[size_t(t) * D + c];
  }
}

Result evaluate(KvData& d, const std::string& name, const Compressor& comp) {
  const int N = d.tokens, D = d.head_dim, G = d.q_heads / d.kv_heads;
  const int jobs = d.layers * d.kv_heads;
  std::vector<size_t> bytes(jobs, 0);
  std::vector<double> err_sum(jobs, 0), err_max(jobs, 0), kl_sum(jobs, 0), kl_max(jobs, 0);
  std::atomic<int> next{0};
  std::string failure;
  auto worker = [&] {
    std::vector<float> k(size_t(N) * D), v(size_t(N) * D), ko, vo;
    std::vector<double> p_ref, o_ref, p, o;
    for (int job; (job = next++) < jobs;) {
      const int l = job / d.kv_heads, h = job % d.kv_heads;
      for (int t = 0; t < N; ++t)
        for (int c = 0; c < D; ++c) { k[size_t(t) * D + c] = d.K(l, t, h, c); v[size_t(t) * D + c] = d.V(l, t, h, c); }
      try {
        bytes[job] = comp(k, v, N, D, ko, vo);
      } catch (const std::exception& e) {
        failure = e.what();
        return;
      }
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < d.queries; ++i) {
          const float* q = &d.Q(l, i, h * G + g, 0);
          attend(q, k, v, N, D, p_ref, o_ref);
          attend(q, ko, vo, N, D, p, o);
          double num = 0, den = 0, kl = 0;
          for (int c = 0; c < D; ++c) { num += (o[c] - o_ref[c]) * (o[c] - o_ref[c]); den += o_ref[c] * o_ref[c]; }
          for (int t = 0; t < N; ++t)
            if (p_ref[t] > 0) kl += p_ref[t] * std::log(p_ref[t] / std::max(p[t], 1e-300));
          const double err = std::sqrt(num / std::max(den, 1e-300));
          err_sum[job] += err;
          err_max[job] = std::max(err_max[job], err);
          kl_sum[job] += kl;
          kl_max[job] = std::max(kl_max[job], kl);
        }
    }
  };
  std::vector<std::thread> pool;
  const unsigned n_threads = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  for (unsigned i = 0; i < n_threads; ++i) pool.emplace_back(worker);
  for (auto& t : pool) t.join();
  if (!failure.empty()) throw std::runtime_error(name + ": " + failure);
  Result r;
  r.name = name;
  size_t total = 0;
  for (int j = 0; j < jobs; ++j) {
    total += bytes[j];
    r.err_mean += err_sum[j];
    r.kl_mean += kl_sum[j];
    r.err_max = std::max(r.err_max, err_max[j]);
    r.kl_max = std::max(r.kl_max, kl_max[j]);
  }
  const double samples = double(jobs) * G * d.queries;
  r.err_mean /= samples;
  r.kl_mean /= samples;
  r.bytes_per_token = double(total) / N;
  r.ratio = double(d.layers) * d.kv_heads * N * D * 2 * 2 / double(total);
  return r;
}

/// kvcomp's best ratio at a mean output error of at most `target`: for each
/// V/K bound ratio in {1/4, 1/2, 1, 2, 4}, bisection on log eb_k (the error
/// grows with the bound). Returns the bounds in eb_k, eb_v.
Result kvcomp_at_error(KvData& d, double target, double& eb_k, double& eb_v, bool hadamard, int block_tokens) {
  Result best;
  for (double v_over_k : {0.25, 0.5, 1.0, 2.0, 4.0}) {
    double lo = 1e-4, hi = 0.5;
    for (int it = 0; it < 8; ++it) {
      const double mid = std::sqrt(lo * hi);
      const Compressor c = kvcomp_variant(float(mid), float(std::min(0.5, mid * v_over_k)), block_tokens);
      Result r = evaluate(d, "kvcomp", hadamard ? hadamard_variant(c) : c);
      if (r.err_mean <= target) {
        lo = mid;
        if (r.ratio > best.ratio) { best = r; eb_k = mid; eb_v = std::min(0.5, mid * v_over_k); }
      } else {
        hi = mid;
      }
    }
  }
  return best;
}

void print_row(const Result& r) {
  std::printf("| %s | %.1f | %.2fx | %.4f | %.4f | %.2e | %.2e |\n", r.name.c_str(), r.bytes_per_token, r.ratio,
              r.err_mean, r.err_max, r.kl_mean, r.kl_max);
}

}  // namespace

int main(int argc, char** argv) {
  KvData d;
  std::string dump, write_dir, json_out;
  uint64_t seed = 1;
  int block_tokens = 64;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) { std::fprintf(stderr, "%s needs a value\n", a.c_str()); std::exit(2); }
      return argv[++i];
    };
    if (a == "--dump") dump = next();
    else if (a == "--write-dump") write_dir = next();
    else if (a == "--json") json_out = next();
    else if (a == "--layers") d.layers = std::stoi(next());
    else if (a == "--tokens") d.tokens = std::stoi(next());
    else if (a == "--queries") d.queries = std::stoi(next());
    else if (a == "--seed") seed = std::stoull(next());
    else if (a == "--block-tokens") block_tokens = std::stoi(next());
    else { std::fprintf(stderr, "unknown argument %s (see the comment at the top of bench/quality.cpp)\n", a.c_str()); return 2; }
  }
  if (!kvcomp::format::supported_tokens(block_tokens)) {
    std::fprintf(stderr, "--block-tokens %d: kvcomp blocks hold 32, 64 or 128 tokens\n", block_tokens);
    return 2;
  }
  try {
    if (!dump.empty()) load_dump(dump, d); else synthesize(d, seed);
    if (!write_dir.empty()) write_dump(write_dir, d);
    std::printf("data: %s, %d layers x %d tokens x %d kv heads (%d q heads) x %d dims, %d queries per layer; kvcomp "
                "blocks of %d tokens\n\n",
                dump.empty() ? ("synthetic seed " + std::to_string(seed)).c_str() : dump.c_str(), d.layers, d.tokens,
                d.kv_heads, d.q_heads, d.head_dim, d.queries, block_tokens);
    std::vector<Result> rows;
    for (float eb : {0.005f, 0.01f, 0.02f, 0.05f, 0.1f}) {
      char name[32];
      std::snprintf(name, sizeof(name), "kvcomp eb %.3g", eb);
      rows.push_back(evaluate(d, name, kvcomp_variant(eb, eb, block_tokens)));
    }
    // Config::transform = Hadamard needs a power-of-two head_dim.
    const bool hadamard = kvcomp::is_power_of_two(d.head_dim);
    if (hadamard)
      for (float eb : {0.05f, 0.1f}) {
        char name[40];
        std::snprintf(name, sizeof(name), "kvcomp eb %.3g hadamard", eb);
        rows.push_back(evaluate(d, name, hadamard_variant(kvcomp_variant(eb, eb, block_tokens))));
      }
    rows.push_back(evaluate(d, "KIVI 4-bit", kivi_variant(4)));
    rows.push_back(evaluate(d, "KIVI 2-bit", kivi_variant(2)));
    std::printf("| variant | KV bytes/token (all layers, heads) | ratio vs fp16 | rel. err mean | rel. err max | KL mean | KL max |\n");
    std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
    std::printf("| fp16 | %.1f | 1.00x | 0 | 0 | 0 | 0 |\n", double(d.layers) * d.kv_heads * d.head_dim * 4);
    for (const auto& r : rows) print_row(r);
    std::printf("\nAt equal attention-output error (mean relative error):\n\n");
    std::printf("| baseline | its error | its ratio | kvcomp | kvcomp eb K / V at that error | kvcomp ratio | kvcomp / baseline |\n|---|---:|---:|---|---:|---:|---:|\n");
    std::string json = "{\"rows\": [";
    for (size_t i = 0; i < rows.size(); ++i) {
      char buf[512];
      std::snprintf(buf, sizeof(buf), "%s{\"variant\": \"%s\", \"bytes_per_token\": %.3f, \"ratio\": %.4f, \"err_mean\": %.6g, \"err_max\": %.6g, \"kl_mean\": %.6g, \"kl_max\": %.6g}",
                    i ? ", " : "", rows[i].name.c_str(), rows[i].bytes_per_token, rows[i].ratio, rows[i].err_mean,
                    rows[i].err_max, rows[i].kl_mean, rows[i].kl_max);
      json += buf;
    }
    json += "], \"equal_error\": [";
    bool first = true;
    for (int b = 0; b < 2; ++b)
      for (bool rotate : {false, true}) {
        if (rotate && !hadamard) continue;
        const Result& base = rows[rows.size() - 2 + b];
        double eb_k = 0, eb_v = 0;
        const Result k = kvcomp_at_error(d, base.err_mean, eb_k, eb_v, rotate, block_tokens);
        const char* how = rotate ? "hadamard" : "plain";
        std::printf("| %s | %.4f | %.2fx | %s | %.4f / %.4f | %.2fx | **%.2fx** |\n", base.name.c_str(), base.err_mean,
                    base.ratio, how, eb_k, eb_v, k.ratio, k.ratio / base.ratio);
        char buf[300];
        std::snprintf(buf, sizeof(buf), "%s{\"baseline\": \"%s\", \"err\": %.6g, \"ratio\": %.4f, \"transform\": \"%s\", \"kvcomp_eb_k\": %.6g, \"kvcomp_eb_v\": %.6g, \"kvcomp_ratio\": %.4f}",
                      first ? "" : ", ", base.name.c_str(), base.err_mean, base.ratio, how, eb_k, eb_v, k.ratio);
        json += buf;
        first = false;
      }
    json += "]}\n";
    if (!json_out.empty()) std::ofstream(json_out) << json;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quality: %s\n", e.what());
    return 1;
  }
  return 0;
}
