// GPU store path vs the CPU reference: bit-equal blocks, equal histograms
// (format v3: pair symbols, PAIR_ESC with 8-bit fields and raw fp32 words).
#include <cmath>
#include <cstring>
#include <random>
#include <string>

#include "gpu_util.cuh"
#include "kvcomp/reference.hpp"
#include "src/launch.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp_test;

namespace {

struct StoreCase {
  DType dtype;
  int T;
  int D;
};

struct StoreOptions {
  // Non-finite and huge inputs (raw escapes), an all-NaN channel and an all-Inf
  // token (groups with no finite value), constant channels and tokens (step 0).
  bool specials = false;
  // Codebooks built from a thinned histogram: pair symbols that occur in the
  // data but have no codeword, written as PAIR_ESC with two fields.
  bool sparse_books = false;
};

/// Overwrites some of x (rows x cols, row = token) with values that escape.
void add_specials(std::vector<float>& x, int rows, int cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const float specials[] = {format::bits_float(0x7FC01234u), format::bits_float(0xFFC00001u), INFINITY, -INFINITY,
                            NAN, 30000.f, -30000.f};
  for (auto& v : x)
    if (rng() % 50 == 0) v = specials[rng() % (sizeof(specials) / sizeof(specials[0]))];
  for (int r = 0; r < rows; ++r) {
    if (cols > 5) x[size_t(r) * cols + 5] = NAN;      // channel 5: no finite value
    if (cols > 9) x[size_t(r) * cols + 9] = 0.75f;    // channel 9: constant
  }
  if (rows > 3)
    for (int c = 0; c < cols; ++c) x[size_t(3) * cols + c] = INFINITY;  // token 3: no finite value
  if (rows > 10)
    for (int c = 0; c < cols; ++c) x[size_t(10) * cols + c] = -2.5f;    // token 10: constant
}

std::vector<float> case_data(Dist dist, int rows, int cols, uint64_t seed, DType dtype, bool specials) {
  auto x = make_data(dist, rows, cols, seed);
  if (specials) add_specials(x, rows, cols, seed ^ 0x5bd1e995u);
  return round_to(dtype, x);
}

bool same_bits(float a, float b) { return format::float_bits(a) == format::float_bits(b); }

/// `dropped`, if given, is increased by the pair symbols that occur in the
/// data but lost their codeword (sparse_books).
void run_store_case(StoreCase cs, Dist dist, ErrorBound eb, uint64_t seed, StoreOptions opt = {},
                    int* dropped = nullptr) {
  const int H = 2, blocks = 3, tail_rows = 7;
  const int T = cs.T, D = cs.D;
  const int tokens = blocks * T;
  // Input [tokens][H][D]; K with outliers as the distribution says, V likewise.
  auto k_all = case_data(dist, tokens, H * D, seed, cs.dtype, opt.specials);
  auto v_all = case_data(dist, tokens, H * D, seed + 1, cs.dtype, opt.specials);
  auto tail_k = case_data(dist, T, D, seed + 2, cs.dtype, opt.specials);
  auto tail_v = case_data(dist, T, D, seed + 3, cs.dtype, opt.specials);

  // Jobs: every (block, head) from the input, plus one block whose first
  // tail_rows rows come from a tail buffer (what a decode step closes).
  std::vector<detail::StoreJob> jobs;
  std::vector<std::vector<float>> expect_k, expect_v;  // row-major T x D per job
  const auto k_bytes = to_dtype_bytes(cs.dtype, k_all), v_bytes = to_dtype_bytes(cs.dtype, v_all);
  DevBuf<uint8_t> d_k(k_bytes.size()), d_v(v_bytes.size());
  d_k.upload(k_bytes);
  d_v.upload(v_bytes);
  // The cache holds tails in the input's type.
  const auto tk_bytes = to_dtype_bytes(cs.dtype, tail_k), tv_bytes = to_dtype_bytes(cs.dtype, tail_v);
  DevBuf<uint8_t> d_tk(tk_bytes.size()), d_tv(tv_bytes.size());
  d_tk.upload(tk_bytes);
  d_tv.upload(tv_bytes);
  const size_t esz = dtype_size(cs.dtype);
  auto block_of = [&](const std::vector<float>& all, const std::vector<float>* tail, int rows_from_tail, int first_tok,
                      int h) {
    std::vector<float> x(size_t(T) * D);
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < D; ++c)
        x[size_t(t) * D + c] = t < rows_from_tail ? (*tail)[size_t(t) * D + c]
                                                  : all[(size_t(first_tok + t - rows_from_tail) * H + h) * D + c];
    return x;
  };
  for (int b = 0; b <= blocks; ++b)
    for (int h = 0; h < H; ++h) {
      const bool tailed = b == blocks;
      if (tailed && h == 1) continue;
      const int first_tok = tailed ? 0 : b * T;
      detail::StoreJob j{};
      j.k_in = d_k.ptr + (size_t(first_tok) * H + h) * D * esz;
      j.v_in = d_v.ptr + (size_t(first_tok) * H + h) * D * esz;
      j.k_tail = d_tk.ptr;
      j.v_tail = d_tv.ptr;
      j.in_token_stride = int64_t(H) * D;
      j.eb_k = eb;
      j.eb_v = eb;
      j.tail_tokens = tailed ? tail_rows : 0;
      j.codebook = uint32_t(2 * h);
      j.table_index = uint32_t(jobs.size());
      j.extent = 0;
      jobs.push_back(j);
      expect_k.push_back(block_of(k_all, &tail_k, j.tail_tokens, first_tok, h));
      expect_v.push_back(block_of(v_all, &tail_v, j.tail_tokens, first_tok, h));
    }
  const int n_jobs = int(jobs.size());
  DevBuf<detail::StoreJob> d_jobs(n_jobs);
  d_jobs.upload(jobs);

  // Histograms: GPU vs CPU, per (head, kind).
  std::vector<uint64_t> cpu_hist(4 * format::kNumSymbols, 0);
  for (int i = 0; i < n_jobs; ++i) {
    ref::add_histogram(Kind::Key, expect_k[i].data(), T, D, eb, &cpu_hist[jobs[i].codebook * format::kNumSymbols]);
    ref::add_histogram(Kind::Value, expect_v[i].data(), T, D, eb,
                       &cpu_hist[(jobs[i].codebook + 1) * format::kNumSymbols]);
  }
  DevBuf<unsigned long long> d_hist(4 * format::kNumSymbols);
  CUDA_OK(cudaMemset(d_hist.ptr, 0, 4 * format::kNumSymbols * sizeof(unsigned long long)));
  detail::launch_histogram(cs.dtype, d_jobs.ptr, n_jobs, T, D, d_hist.ptr, 0);
  CUDA_LAUNCH_OK();
  const auto gpu_hist = d_hist.download();
  for (size_t i = 0; i < cpu_hist.size(); ++i) ASSERT_EQ(gpu_hist[i], cpu_hist[i]) << "histogram entry " << i;
  if (opt.specials)  // every codebook's data holds escaped pairs
    for (int b = 0; b < 4; ++b) ASSERT_GT(cpu_hist[b * format::kNumSymbols + format::kPairEscape], 0u) << "book " << b;

  // Codebooks from the histograms (thinned: every third pair symbol dropped).
  std::vector<Codebook> books;
  std::vector<CodebookTables> tables;
  for (int b = 0; b < 4; ++b) {
    std::vector<uint64_t> counts(cpu_hist.begin() + b * format::kNumSymbols,
                                 cpu_hist.begin() + (b + 1) * format::kNumSymbols);
    if (opt.sparse_books)
      for (int sym = 0; sym < format::kPairSymbols; sym += 3) {
        if (dropped) *dropped += counts[sym] != 0;
        counts[sym] = 0;
      }
    books.push_back(Codebook::from_histogram(counts.data()));
    tables.push_back(books.back().tables());
  }
  DevBuf<CodebookTables> d_books(4);
  d_books.upload(tables);

  const int n_blocks = 2 * n_jobs;
  DevBuf<uint32_t> d_sizes(n_blocks + 1), d_offsets(n_blocks + 1);
  CUDA_OK(cudaMemset(d_sizes.ptr, 0, (n_blocks + 1) * sizeof(uint32_t)));
  detail::launch_measure(cs.dtype, d_jobs.ptr, n_jobs, T, D, d_books.ptr, d_sizes.ptr, 0);
  CUDA_LAUNCH_OK();
  const size_t scan_bytes = detail::scan_workspace_bytes(n_blocks + 1);
  DevBuf<uint8_t> d_scan(scan_bytes);
  detail::launch_scan(d_sizes.ptr, d_offsets.ptr, n_blocks + 1, d_scan.ptr, scan_bytes, 0);
  CUDA_LAUNCH_OK();
  const auto offsets = d_offsets.download();
  const size_t pool_bytes = size_t(offsets[n_blocks]) * 16 + 64;  // +64: a base offset of 4 units
  DevBuf<uint8_t> d_pool(pool_bytes);
  CUDA_OK(cudaMemset(d_pool.ptr, 0xAB, pool_bytes));  // poison: encode must write every byte
  DevBuf<int64_t> d_base(1);
  d_base.upload({4});
  DevBuf<format::BlockRef> d_table(n_jobs);
  detail::launch_encode(cs.dtype, d_jobs.ptr, n_jobs, T, D, d_books.ptr, d_sizes.ptr, d_offsets.ptr, d_base.ptr,
                        d_pool.ptr, d_table.ptr, 0);
  CUDA_LAUNCH_OK();
  const auto pool = d_pool.download();
  const auto table = d_table.download();
  const auto sizes = d_sizes.download();

  for (int i = 0; i < n_jobs; ++i) {
    for (Kind kind : {Kind::Key, Kind::Value}) {
      const auto& x = kind == Kind::Key ? expect_k[i] : expect_v[i];
      const uint16_t id = uint16_t(jobs[i].codebook + int(kind));
      const auto want = ref::encode_block(kind, x.data(), T, D, eb, books[id], id);
      const size_t at = (4 + size_t(offsets[2 * i + int(kind)])) * 16;
      ASSERT_EQ(size_t(sizes[2 * i + int(kind)]) * 16, want.size()) << "job " << i << " kind " << int(kind);
      for (size_t b = 0; b < want.size(); ++b)
        ASSERT_EQ(pool[at + b], want[b]) << "job " << i << " kind " << int(kind) << " byte " << b << " of "
                                         << want.size();
      // GPU bytes decode on the CPU within the bound.
      std::vector<float> out(x.size());
      ASSERT_EQ(ref::decode_block(&pool[at], want.size(), kind, T, D, books[id], out.data()), ref::DecodeStatus::Ok);
      const auto params = ref::block_params(kind, x.data(), T, D, eb);
      for (int t = 0; t < T; ++t)
        for (int c = 0; c < D; ++c) {
          const size_t e = size_t(t) * D + c;
          if (!std::isfinite(x[e])) {  // escaped: raw bits, NaN payload included
            ASSERT_TRUE(same_bits(out[e], x[e])) << "t " << t << " c " << c;
            continue;
          }
          ASSERT_LE(std::fabs(out[e] - x[e]), params[kind == Kind::Key ? c : t].eb_abs) << "t " << t << " c " << c;
        }
    }
    ASSERT_EQ(table[i].offset16, 4 + offsets[2 * i]);
    ASSERT_EQ(table[i].k_size16, sizes[2 * i]);
    ASSERT_EQ(table[i].v_size16, sizes[2 * i + 1]);
  }
}

}  // namespace

TEST(StoreGpu, BitEqualToReferenceForEveryTypeHeadDimAndDistribution) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (StoreCase cs : {StoreCase{DType::F16, 64, 64}, StoreCase{DType::F16, 64, 128}, StoreCase{DType::F16, 64, 256},
                       StoreCase{DType::BF16, 64, 128}, StoreCase{DType::BF16, 32, 64}, StoreCase{DType::F32, 64, 128},
                       StoreCase{DType::F32, 128, 256}, StoreCase{DType::F16, 128, 128}, StoreCase{DType::F16, 32, 128}})
    for (Dist dist : kAllDists) {
      SCOPED_TRACE(std::string(dtype_name(cs.dtype)) + " T " + std::to_string(cs.T) + " D " + std::to_string(cs.D) +
                   " " + dist_name(dist));
      run_store_case(cs, dist, {BoundMode::Relative, 0.05f}, seed);
      if (HasFatalFailure()) return;
    }
  // Other bounds, including absolute ones that force escapes.
  for (ErrorBound eb : {ErrorBound{BoundMode::Relative, 0.01f}, ErrorBound{BoundMode::Relative, 0.1f},
                        ErrorBound{BoundMode::Absolute, 0.001f}, ErrorBound{BoundMode::Absolute, 0.5f}}) {
    SCOPED_TRACE("eb " + std::to_string(eb.value));
    run_store_case({DType::F16, 64, 128}, Dist::HeavyTailed, eb, seed + 5);
    if (HasFatalFailure()) return;
  }
}

// Small bound (codes beyond 15 and beyond 254: PAIR_ESC fields and raw words),
// non-finite inputs (raw words, NaN payloads kept), empty and constant groups,
// and pair symbols without a codeword, over every block shape and input type.
TEST(StoreGpu, BitEqualToReferenceWithPairEscapesAndRawValues) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  int n = 0, dropped = 0;
  for (DType dtype : {DType::F16, DType::BF16, DType::F32})
    for (int T : {32, 64, 128})
      for (int D : {64, 128, 256})
        for (bool sparse : {false, true}) {
          const Dist dist = kAllDists[n++ % 4];
          SCOPED_TRACE(std::string(dtype_name(dtype)) + " T " + std::to_string(T) + " D " + std::to_string(D) + " " +
                       dist_name(dist) + (sparse ? " sparse codebooks" : ""));
          run_store_case({dtype, T, D}, dist, {BoundMode::Relative, 0.005f}, seed + 7 * n, {true, sparse},
                         &dropped);
          if (HasFatalFailure()) return;
        }
  EXPECT_GT(dropped, 0) << "no case encoded a pair symbol without a codeword";
  // Bounds where most finite codes exceed 254 (raw words) or 14 (fields).
  for (ErrorBound eb : {ErrorBound{BoundMode::Relative, 0.0005f}, ErrorBound{BoundMode::Absolute, 0.0001f},
                        ErrorBound{BoundMode::Relative, 0.02f}}) {
    SCOPED_TRACE("eb " + std::to_string(eb.value));
    run_store_case({DType::F32, 64, 128}, Dist::Gaussian, eb, seed + 11, {true, false});
    if (HasFatalFailure()) return;
    run_store_case({DType::BF16, 128, 64}, Dist::OutlierChannels, eb, seed + 13, {false, true});
    if (HasFatalFailure()) return;
  }
}
