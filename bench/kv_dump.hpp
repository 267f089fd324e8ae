// KV data for the benchmarks and the quality harness: a documented synthetic
// generator and the KV dump format (see bench/quality.cpp's header comment).
#pragma once

#include <cuda_fp16.h>

#include <cctype>
#include <cmath>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvcomp_bench {

struct KvData {
  int layers = 4, tokens = 4096, kv_heads = 8, q_heads = 32, head_dim = 128, queries = 8;
  std::vector<float> k, v, q;  // as in the dump format, fp16-exact values
  float& K(int l, int t, int h, int d) { return k[((size_t(l) * tokens + t) * kv_heads + h) * head_dim + d]; }
  float& V(int l, int t, int h, int d) { return v[((size_t(l) * tokens + t) * kv_heads + h) * head_dim + d]; }
  float& Q(int l, int i, int h, int d) { return q[((size_t(l) * queries + i) * q_heads + h) * head_dim + d]; }
};

inline float fp16_round(float x) { return __half2float(__float2half_rn(x)); }

inline void rope(std::vector<float>& row, int pos) {
  const int D = int(row.size());
  for (int c = 0; c < D / 2; ++c) {
    const double theta = pos * std::pow(10000.0, -2.0 * c / D);
    const double a = row[c], b = row[c + D / 2];
    row[c] = float(a * std::cos(theta) - b * std::sin(theta));
    row[c + D / 2] = float(a * std::sin(theta) + b * std::cos(theta));
  }
}

inline void synthesize(KvData& d, uint64_t seed) {
  const int D = d.head_dim;
  d.k.assign(size_t(d.layers) * d.tokens * d.kv_heads * D, 0.f);
  d.v.assign(d.k.size(), 0.f);
  d.q.assign(size_t(d.layers) * d.queries * d.q_heads * D, 0.f);
  std::mt19937_64 rng(seed);
  std::student_t_distribution<float> t5(5.f), t8(8.f);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> row(D);
  for (int l = 0; l < d.layers; ++l) {
    for (int h = 0; h < d.kv_heads; ++h) {
      std::vector<float> scale(D, 1.f), offset(D, 0.f);
      for (int c = 0; c < D; ++c)
        if (rng() % 16 == 0) { scale[c] = 8.f + float(rng() % 13); offset[c] = float(int(rng() % 21) - 10); }
      for (int t = 0; t < d.tokens; ++t) {
        for (int c = 0; c < D; ++c) row[c] = t5(rng) * scale[c] + offset[c];
        rope(row, t);
        for (int c = 0; c < D; ++c) d.K(l, t, h, c) = fp16_round(row[c]);
        const float vs = std::exp(0.3f * normal(rng));
        for (int c = 0; c < D; ++c) d.V(l, t, h, c) = fp16_round(t8(rng) * vs);
      }
    }
    for (int i = 0; i < d.queries; ++i)
      for (int h = 0; h < d.q_heads; ++h) {
        for (int c = 0; c < D; ++c) row[c] = normal(rng);
        rope(row, d.tokens + i);
        for (int c = 0; c < D; ++c) d.Q(l, i, h, c) = fp16_round(row[c]);
      }
  }
}

inline std::string json_value(const std::string& json, const std::string& key) {
  const size_t at = json.find("\"" + key + "\"");
  if (at == std::string::npos) throw std::runtime_error("dump header lacks \"" + key + "\"");
  size_t p = json.find(':', at) + 1;
  while (p < json.size() && std::isspace(static_cast<unsigned char>(json[p]))) ++p;
  if (json[p] == '"') return json.substr(p + 1, json.find('"', p + 1) - p - 1);
  size_t e = p;
  while (e < json.size() && (std::isdigit(static_cast<unsigned char>(json[e])) || json[e] == '-')) ++e;
  return json.substr(p, e - p);
}

inline void read_f16(const std::string& path, size_t n, std::vector<float>& out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::vector<uint16_t> raw(n);
  f.read(reinterpret_cast<char*>(raw.data()), std::streamsize(n * 2));
  if (size_t(f.gcount()) != n * 2) throw std::runtime_error(path + ": expected " + std::to_string(n * 2) + " bytes");
  out.resize(n);
  for (size_t i = 0; i < n; ++i) out[i] = __half2float(__ushort_as_half(raw[i]));
}

inline void write_f16(const std::string& path, const std::vector<float>& x) {
  std::vector<uint16_t> raw(x.size());
  for (size_t i = 0; i < x.size(); ++i) raw[i] = __half_as_ushort(__float2half_rn(x[i]));
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(raw.data()), std::streamsize(raw.size() * 2));
  if (!f) throw std::runtime_error("cannot write " + path);
}

inline void load_dump(const std::string& json_path, KvData& d) {
  std::ifstream f(json_path);
  if (!f) throw std::runtime_error("cannot open " + json_path);
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string j = ss.str();
  d.layers = std::stoi(json_value(j, "layers"));
  d.tokens = std::stoi(json_value(j, "tokens"));
  d.kv_heads = std::stoi(json_value(j, "kv_heads"));
  d.q_heads = std::stoi(json_value(j, "q_heads"));
  d.head_dim = std::stoi(json_value(j, "head_dim"));
  d.queries = std::stoi(json_value(j, "queries"));
  const std::string dir = json_path.find('/') == std::string::npos ? "" : json_path.substr(0, json_path.rfind('/') + 1);
  const size_t kv = size_t(d.layers) * d.tokens * d.kv_heads * d.head_dim;
  read_f16(dir + json_value(j, "k"), kv, d.k);
  read_f16(dir + json_value(j, "v"), kv, d.v);
  read_f16(dir + json_value(j, "q"), size_t(d.layers) * d.queries * d.q_heads * d.head_dim, d.q);
}

inline void write_dump(const std::string& dir, const KvData& d) {
  write_f16(dir + "/k.f16", d.k);
  write_f16(dir + "/v.f16", d.v);
  write_f16(dir + "/q.f16", d.q);
  std::ofstream f(dir + "/kv.json");
  f << "{\"layers\": " << d.layers << ", \"tokens\": " << d.tokens << ", \"kv_heads\": " << d.kv_heads
    << ", \"q_heads\": " << d.q_heads << ", \"head_dim\": " << d.head_dim << ", \"queries\": " << d.queries
    << ", \"k\": \"k.f16\", \"v\": \"v.f16\", \"q\": \"q.f16\"}\n";
}

}  // namespace kvcomp_bench
