// Reference decode attention in float64, and the bound on how far attention
// over error-bounded K/V can move from attention over the exact K/V.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "kvcomp/format.hpp"

namespace kvcomp_test {

/// softmax(q . K^T / sqrt(D)) . V over `tokens` rows of k, v ([tokens][D]).
template <typename KT, typename VT>
std::vector<double> attention64(const float* q, const KT* k, const VT* v, int tokens, int D) {
  std::vector<double> s(tokens), o(D, 0.0);
  if (tokens == 0) return o;
  double mx = -INFINITY;
  for (int t = 0; t < tokens; ++t) {
    double acc = 0;
    for (int c = 0; c < D; ++c) acc += double(q[c]) * double(k[size_t(t) * D + c]);
    s[t] = acc / std::sqrt(double(D));
    mx = std::max(mx, s[t]);
  }
  double den = 0;
  for (int t = 0; t < tokens; ++t) { s[t] = std::exp(s[t] - mx); den += s[t]; }
  for (int t = 0; t < tokens; ++t)
    for (int c = 0; c < D; ++c) o[c] += s[t] / den * double(v[size_t(t) * D + c]);
  return o;
}

/// |attention(K', V') - attention(K, V)| per element is at most
/// max|dV| + (e^(2 delta) - 1) max|V|, where delta = sum_c |q_c| max_t |dK_tc| / sqrt(D)
/// bounds how far any score moves (softmax weights then move by a factor within e^(+-2 delta)).
/// k, v exact; kd, vd the reconstruction; all [tokens][D].
template <typename A, typename B>
double attention_deviation_bound(const float* q, const A& k, const A& v, const B& kd, const B& vd, int tokens, int D) {
  double delta = 0, max_dv = 0, max_v = 0;
  for (int c = 0; c < D; ++c) {
    double dk = 0;
    for (int t = 0; t < tokens; ++t) dk = std::max(dk, std::fabs(double(kd[size_t(t) * D + c]) - double(k[size_t(t) * D + c])));
    delta += std::fabs(q[c]) * dk;
  }
  delta /= std::sqrt(double(D));
  for (size_t i = 0; i < size_t(tokens) * D; ++i) {
    max_dv = std::max(max_dv, std::fabs(double(vd[i]) - double(v[i])));
    max_v = std::max(max_v, std::fabs(double(v[i])));
  }
  return max_dv + (std::exp(2 * delta) - 1) * max_v;
}

}  // namespace kvcomp_test

namespace kvcomp_test {

/// The largest |reconstruction - x| the error bounds allow for each element
/// of one (sequence, head)'s K and V ([tokens][D]) stored in blocks of T
/// tokens with relative bounds eb_k, eb_v (K per channel over a block, V per
/// token, or per channel where T > D: format::group_of; the uncompressed tail
/// is exact). Computed from the exact data alone.
inline void allowed_deviation(const std::vector<double>& k, const std::vector<double>& v, int tokens, int D, int T,
                              double eb_k, double eb_v, std::vector<double>& dk, std::vector<double>& dv) {
  const double slack = 1 + 1e-6;  // the quantizer computes eb * range in fp32
  // d[x] = eb x the range of x's group (format::group_of) in its block.
  auto allow = [&](kvcomp::Kind kind, const std::vector<double>& x, double eb, std::vector<double>& d) {
    d.assign(size_t(tokens) * D, 0.0);
    const int groups = kvcomp::format::num_groups(kind, T, D);
    for (int b = 0; b + T <= tokens; b += T) {
      std::vector<double> lo(groups, INFINITY), hi(groups, -INFINITY);
      for (int t = 0; t < T; ++t)
        for (int c = 0; c < D; ++c) {
          const int g = kvcomp::format::group_of(kind, T, D, t, c);
          lo[g] = std::min(lo[g], x[size_t(b + t) * D + c]);
          hi[g] = std::max(hi[g], x[size_t(b + t) * D + c]);
        }
      for (int t = 0; t < T; ++t)
        for (int c = 0; c < D; ++c) {
          const int g = kvcomp::format::group_of(kind, T, D, t, c);
          d[size_t(b + t) * D + c] = eb * (hi[g] - lo[g]) * slack;
        }
    }
  };
  allow(kvcomp::Kind::Key, k, eb_k, dk);
  allow(kvcomp::Kind::Value, v, eb_v, dv);
}

/// Per output channel, how far attention over any K', V' within (dk, dv) of
/// the exact K, V can move: scores move by e_t, |e_t| <= d_t = sum_c |q_c|
/// dk_tc / sqrt(D), so p'_t / p_t lies within e^(+-(d_t + max d)) and
/// |out'_c - out_c| <= max_t dv_tc + sum_t p_t (e^(d_t + max d) - 1) |v_tc|.
inline std::vector<double> attention_bound_from_allowed(const float* q, const std::vector<double>& k,
                                                        const std::vector<double>& v, const std::vector<double>& dk,
                                                        const std::vector<double>& dv, int tokens, int D) {
  std::vector<double> d(tokens, 0.0), p(tokens, 0.0), bound(D, 0.0);
  double d_max = 0, s_max = -INFINITY, den = 0;
  for (int t = 0; t < tokens; ++t) {
    double s = 0;
    for (int c = 0; c < D; ++c) {
      d[t] += std::fabs(q[c]) * dk[size_t(t) * D + c];
      s += double(q[c]) * k[size_t(t) * D + c];
    }
    d[t] /= std::sqrt(double(D));
    p[t] = s / std::sqrt(double(D));
    d_max = std::max(d_max, d[t]);
    s_max = std::max(s_max, p[t]);
  }
  for (int t = 0; t < tokens; ++t) { p[t] = std::exp(p[t] - s_max); den += p[t]; }
  for (int c = 0; c < D; ++c) {
    double max_dv = 0, moved = 0;
    for (int t = 0; t < tokens; ++t) {
      max_dv = std::max(max_dv, dv[size_t(t) * D + c]);
      moved += p[t] / den * std::expm1(d[t] + d_max) * std::fabs(v[size_t(t) * D + c]);
    }
    bound[c] = max_dv + moved;
  }
  return bound;
}

/// The same bound when the errors are known per token vector in L2 (as with
/// Config::transform = Hadamard): |k'_t - k_t|_2 <= ek[t], |v'_t - v_t|_2 <=
/// ev[t]. Scores move by at most d_t = |q|_2 ek[t] / sqrt(D) (Cauchy-Schwarz)
/// and a V element by at most ev[t], so |out'_c - out_c| <= max_t ev[t] +
/// sum_t p_t (e^(d_t + max d) - 1) |v_tc|.
inline std::vector<double> attention_bound_from_vector_errors(const float* q, const std::vector<double>& k,
                                                              const std::vector<double>& v,
                                                              const std::vector<double>& ek,
                                                              const std::vector<double>& ev, int tokens, int D) {
  double q_norm = 0;
  for (int c = 0; c < D; ++c) q_norm += double(q[c]) * q[c];
  q_norm = std::sqrt(q_norm);
  std::vector<double> d(tokens), p(tokens), bound(D, 0.0);
  double d_max = 0, s_max = -INFINITY, den = 0, max_ev = 0;
  for (int t = 0; t < tokens; ++t) {
    double s = 0;
    for (int c = 0; c < D; ++c) s += double(q[c]) * k[size_t(t) * D + c];
    d[t] = q_norm * ek[t] / std::sqrt(double(D));
    p[t] = s / std::sqrt(double(D));
    d_max = std::max(d_max, d[t]);
    s_max = std::max(s_max, p[t]);
    max_ev = std::max(max_ev, ev[t]);
  }
  for (int t = 0; t < tokens; ++t) { p[t] = std::exp(p[t] - s_max); den += p[t]; }
  for (int c = 0; c < D; ++c) {
    double moved = 0;
    for (int t = 0; t < tokens; ++t) moved += p[t] / den * std::expm1(d[t] + d_max) * std::fabs(v[size_t(t) * D + c]);
    bound[c] = max_ev + moved;
  }
  return bound;
}

}  // namespace kvcomp_test
