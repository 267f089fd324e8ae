// GPU store path vs the CPU reference: bit-equal blocks, equal histograms
// (format v3: pair symbols of the codes' high parts with k raw low bits each,
// PAIR_ESC with 8-bit fields and raw fp32 words; four histograms per codebook,
// one per k).
#include <algorithm>
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

/// How the test builds a case's codebooks from its histograms.
constexpr int kAutoLowBits = -1;  // Codebook::from_histograms over all four (picks k)
// Otherwise k in 0..kMaxLowBits: Codebook::from_histogram(counts[k], k).
const std::vector<int> kEveryBookChoice = {kAutoLowBits, 0, 1, 2, 3};

struct StoreOptions {
  // Non-finite and huge inputs (raw escapes), an all-NaN channel and an all-Inf
  // token (groups with no finite value), constant channels and tokens (step 0).
  bool specials = false;
  // Codebooks built from thinned histograms: pair symbols that occur in the
  // data but have no codeword, written as PAIR_ESC with two fields.
  bool sparse_books = false;
  // Codebook sets to encode the case's blocks with, one after the other.
  std::vector<int> book_choices = kEveryBookChoice;
  // Input rows one element further apart than H D: most rows miss 16-byte
  // alignment, so the store kernels take their element-load path.
  bool odd_stride = false;
};

/// What run_store_case saw, summed over the cases a test runs.
struct StoreStats {
  int dropped = 0;           // pair symbols that occur in the data but lost their codeword (sparse_books)
  int auto_books = 0;        // codebooks built by from_histograms
  int auto_low_bits = 0;     // ... of them with k > 0
  int blocks_per_k[format::kLowBitChoices] = {};  // blocks encoded (and compared) per k
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

/// Payload bits of an encoded block: the sum of its lane table.
uint64_t payload_bits(const std::vector<uint8_t>& block, Kind kind, int T, int D) {
  uint64_t bits = 0;
  for (int l = 0; l < format::kLanes; ++l) {
    uint16_t b;
    std::memcpy(&b, &block[format::lane_bits_offset(kind, T, D) + 2 * l], 2);
    bits += b;
  }
  return bits;
}

constexpr int kBooks = 4;  // codebooks of a case: (head 0, 1) x (K, V)
constexpr size_t kHistPerBook = size_t(format::kLowBitChoices) * format::kNumSymbols;  // [k][symbol]

void run_store_case(StoreCase cs, Dist dist, ErrorBound eb, uint64_t seed, const StoreOptions& opt = {},
                    StoreStats* stats = nullptr) {
  StoreStats local_stats;
  StoreStats& st = stats ? *stats : local_stats;
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
  const int64_t in_stride = int64_t(H) * D + (opt.odd_stride ? 1 : 0);
  auto spread = [&](const std::vector<float>& x) {  // rows [tokens][in_stride]; a gap is never read
    std::vector<float> y(size_t(tokens) * in_stride, 0.f);
    for (int t = 0; t < tokens; ++t) std::copy_n(&x[size_t(t) * H * D], size_t(H) * D, &y[size_t(t) * in_stride]);
    return y;
  };
  const auto k_bytes = to_dtype_bytes(cs.dtype, spread(k_all)), v_bytes = to_dtype_bytes(cs.dtype, spread(v_all));
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
      j.k_in = d_k.ptr + (size_t(first_tok) * in_stride + size_t(h) * D) * esz;
      j.v_in = d_v.ptr + (size_t(first_tok) * in_stride + size_t(h) * D) * esz;
      j.k_tail = d_tk.ptr;
      j.v_tail = d_tv.ptr;
      j.in_token_stride = in_stride;
      j.eb_k = eb;
      j.eb_v = eb;
      j.tail_tokens = tailed ? tail_rows : 0;
      j.codebook = uint32_t(2 * h);
      j.table_index = uint32_t(jobs.size());
      j.entry = 0;
      jobs.push_back(j);
      expect_k.push_back(block_of(k_all, &tail_k, j.tail_tokens, first_tok, h));
      expect_v.push_back(block_of(v_all, &tail_v, j.tail_tokens, first_tok, h));
    }
  const int n_jobs = int(jobs.size());
  DevBuf<detail::StoreJob> d_jobs(n_jobs);
  d_jobs.upload(jobs);

  // Histograms, [book][k][symbol]: GPU vs CPU, every low-bit count.
  std::vector<uint64_t> cpu_hist(kBooks * kHistPerBook, 0);
  std::vector<uint64_t> book_pairs(kBooks, 0);
  for (int i = 0; i < n_jobs; ++i) {
    ref::add_histogram(Kind::Key, expect_k[i].data(), T, D, eb, &cpu_hist[jobs[i].codebook * kHistPerBook]);
    ref::add_histogram(Kind::Value, expect_v[i].data(), T, D, eb, &cpu_hist[(jobs[i].codebook + 1) * kHistPerBook]);
    book_pairs[jobs[i].codebook] += uint64_t(T) * D / 2;
    book_pairs[jobs[i].codebook + 1] += uint64_t(T) * D / 2;
  }
  DevBuf<unsigned long long> d_hist(kBooks * kHistPerBook);
  CUDA_OK(cudaMemset(d_hist.ptr, 0, kBooks * kHistPerBook * sizeof(unsigned long long)));
  detail::launch_histogram(cs.dtype, d_jobs.ptr, n_jobs, T, D, d_hist.ptr, 0);
  CUDA_LAUNCH_OK();
  const auto gpu_hist = d_hist.download();
  for (size_t i = 0; i < cpu_hist.size(); ++i)
    ASSERT_EQ(gpu_hist[i], cpu_hist[i]) << "histogram of book " << i / kHistPerBook << ", k "
                                        << i % kHistPerBook / format::kNumSymbols << ", symbol "
                                        << i % format::kNumSymbols;
  for (int b = 0; b < kBooks; ++b)
    for (int k = 0; k < format::kLowBitChoices; ++k) {
      const uint64_t* h = &cpu_hist[b * kHistPerBook + k * format::kNumSymbols];
      uint64_t sum = 0;
      for (int sym = 0; sym < format::kNumSymbols; ++sym) sum += h[sym];
      ASSERT_EQ(sum, book_pairs[b]) << "book " << b << " k " << k << ": every pair counted once per k";
      for (int sym = format::kPairEscape + 1; sym < format::kNumSymbols; ++sym)
        ASSERT_EQ(h[sym], 0u) << "book " << b << " k " << k << " symbol " << sym;
      if (opt.specials)  // every codebook's data holds escaped values, so PAIR_ESC under every k
        ASSERT_GT(h[format::kPairEscape], 0u) << "book " << b << " k " << k;
    }

  // Encodes every block with `books` on the GPU and compares with the CPU
  // reference; adds each book's payload bits to bits[book].
  auto encode_and_compare = [&](const std::vector<Codebook>& books, std::vector<uint64_t>& bits) {
    std::vector<CodebookTables> tables;
    for (const Codebook& cb : books) tables.push_back(cb.tables());
    DevBuf<CodebookTables> d_books(kBooks);
    d_books.upload(tables);

    // Both warp counts of the store CTA (prefill's and a decode step's) write the same bytes.
    for (int warps : {detail::kStoreWarps, detail::kStoreWarpsFew}) {
      SCOPED_TRACE("store CTA of " + std::to_string(warps) + " warps");
      const int n_blocks = 2 * n_jobs;
      DevBuf<uint32_t> d_sizes(n_blocks);
      DevBuf<uint16_t> d_seg_bits(size_t(n_blocks) * detail::kMaxStoreSegments);
      detail::launch_measure(cs.dtype, warps, d_jobs.ptr, n_jobs, T, D, d_books.ptr, d_sizes.ptr, d_seg_bits.ptr, 0);
      CUDA_LAUNCH_OK();
      const auto sizes = d_sizes.download();
      // Pairs one after the other from unit 4 (as the place kernel puts them in a page).
      std::vector<uint32_t> offsets(n_blocks + 1, 0), pair_at(n_jobs);
      for (int b = 0; b < n_blocks; ++b) offsets[b + 1] = offsets[b] + sizes[b];
      for (int j = 0; j < n_jobs; ++j) pair_at[j] = 4 + offsets[2 * j];
      const size_t pool_bytes = size_t(offsets[n_blocks]) * 16 + 64;  // +64: a base offset of 4 units
      DevBuf<uint8_t> d_pool(pool_bytes);
      CUDA_OK(cudaMemset(d_pool.ptr, 0xAB, pool_bytes));  // poison: encode must write every byte
      DevBuf<uint32_t> d_pair_at(n_jobs);
      d_pair_at.upload(pair_at);
      DevBuf<int32_t> d_ok(1);
      d_ok.upload({1});
      DevBuf<format::BlockRef> d_table(n_jobs);
      detail::launch_encode(cs.dtype, warps, d_jobs.ptr, n_jobs, T, D, d_books.ptr, d_sizes.ptr, d_seg_bits.ptr,
                            d_pair_at.ptr, d_ok.ptr, d_pool.ptr, d_table.ptr, 0);
      CUDA_LAUNCH_OK();
      const auto pool = d_pool.download();
      const auto table = d_table.download();

      for (int i = 0; i < n_jobs; ++i) {
        for (Kind kind : {Kind::Key, Kind::Value}) {
          SCOPED_TRACE("job " + std::to_string(i) + (kind == Kind::Key ? " K" : " V"));
          const auto& x = kind == Kind::Key ? expect_k[i] : expect_v[i];
          const uint16_t id = uint16_t(jobs[i].codebook + int(kind));
          const auto want = ref::encode_block(kind, x.data(), T, D, eb, books[id], id);
          const size_t at = (4 + size_t(offsets[2 * i + int(kind)])) * 16;
          ASSERT_EQ(size_t(sizes[2 * i + int(kind)]) * 16, want.size());
          for (size_t b = 0; b < want.size(); ++b)
            ASSERT_EQ(pool[at + b], want[b]) << "byte " << b << " of " << want.size();
          if (warps == detail::kStoreWarps) {  // counted once
            bits[id] += payload_bits(want, kind, T, D);
            ++st.blocks_per_k[books[id].low_bits()];
          }
          // GPU bytes decode on the CPU within the bound.
          std::vector<float> out(x.size());
          ASSERT_EQ(ref::decode_block(&pool[at], want.size(), kind, T, D, books[id], out.data()),
                    ref::DecodeStatus::Ok);
          const auto params = ref::block_params(kind, x.data(), T, D, eb);
          for (int t = 0; t < T; ++t)
            for (int c = 0; c < D; ++c) {
              const size_t e = size_t(t) * D + c;
              if (!std::isfinite(x[e])) {  // escaped: raw bits, NaN payload included
                ASSERT_TRUE(same_bits(out[e], x[e])) << "t " << t << " c " << c;
                continue;
              }
              ASSERT_LE(std::fabs(out[e] - x[e]), params[format::group_of(kind, T, D, t, c)].eb_abs) << "t " << t << " c " << c;
            }
        }
        ASSERT_EQ(table[i].offset16, 4 + offsets[2 * i]);
        ASSERT_EQ(table[i].k_size16, sizes[2 * i]);
        ASSERT_EQ(table[i].v_size16, sizes[2 * i + 1]);
      }
    }
  };

  // Thinned histograms (sparse_books): every third pair symbol dropped, under every k.
  std::vector<uint64_t> hist = cpu_hist;
  if (opt.sparse_books)
    for (size_t h = 0; h < kBooks * size_t(format::kLowBitChoices); ++h)
      for (int sym = 0; sym < format::kPairSymbols; sym += 3) hist[h * format::kNumSymbols + sym] = 0;

  // bits[choice][book]: payload bits of the book's blocks under each codebook choice.
  std::vector<std::vector<uint64_t>> bits(opt.book_choices.size(), std::vector<uint64_t>(kBooks, 0));
  for (size_t ci = 0; ci < opt.book_choices.size(); ++ci) {
    const int choice = opt.book_choices[ci];
    SCOPED_TRACE(choice == kAutoLowBits ? std::string("codebooks from_histograms")
                                        : "codebooks from_histogram, k " + std::to_string(choice));
    std::vector<Codebook> books;
    for (int b = 0; b < kBooks; ++b) {
      if (choice == kAutoLowBits) {
        books.push_back(Codebook::from_histograms(&hist[b * kHistPerBook]));
        ++st.auto_books;
        st.auto_low_bits += books.back().low_bits() > 0;
      } else {
        books.push_back(Codebook::from_histogram(&hist[b * kHistPerBook + choice * format::kNumSymbols], choice));
        ASSERT_EQ(books.back().low_bits(), choice) << "book " << b;
      }
      const int k = books.back().low_bits();
      ASSERT_TRUE(k >= 0 && k <= format::kMaxLowBits) << "book " << b << " k " << k;
      if (opt.sparse_books) {
        // The builder gives every pair in the range of hi parts seen a codeword: take the dropped ones' away.
        auto lens = books.back().lengths();
        for (int sym = 0; sym < format::kPairSymbols; sym += 3) {
          st.dropped += cpu_hist[b * kHistPerBook + k * format::kNumSymbols + sym] != 0;
          lens[sym] = 0;
        }
        books.back() = Codebook::from_lengths(lens.data(), k);
      }
    }
    encode_and_compare(books, bits[ci]);
    if (::testing::Test::HasFatalFailure()) return;
  }

  // from_histograms picks the k whose code needs the fewest bits on its
  // histograms, and the blocks encoded here are exactly those histograms (raw
  // fp32 words, the only bits a stream-symbol histogram does not see, are the
  // same under every k): its payload is the smallest of the four.
  if (!opt.sparse_books && opt.book_choices == kEveryBookChoice)
    for (int b = 0; b < kBooks; ++b) {
      const uint64_t best = std::min({bits[1][b], bits[2][b], bits[3][b], bits[4][b]});
      EXPECT_EQ(bits[0][b], best) << "book " << b << ": from_histograms did not pick the smallest k (bits per k: "
                                  << bits[1][b] << " " << bits[2][b] << " " << bits[3][b] << " " << bits[4][b] << ")";
    }
}

}  // namespace

// Every case is encoded five times: with codebooks from from_histograms (k
// picked from the data) and with codebooks of each k = 0..3
// (from_histogram(counts[k], k)), so every k meets every shape and type.
TEST(StoreGpu, BitEqualToReferenceForEveryTypeHeadDimAndDistribution) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  StoreStats stats;
  for (StoreCase cs : {StoreCase{DType::F16, 64, 64}, StoreCase{DType::F16, 64, 128}, StoreCase{DType::F16, 64, 256},
                       StoreCase{DType::BF16, 64, 128}, StoreCase{DType::BF16, 32, 64}, StoreCase{DType::F32, 64, 128},
                       StoreCase{DType::F32, 128, 256}, StoreCase{DType::F16, 128, 128}, StoreCase{DType::F16, 32, 128}})
    for (Dist dist : kAllDists) {
      SCOPED_TRACE(std::string(dtype_name(cs.dtype)) + " T " + std::to_string(cs.T) + " D " + std::to_string(cs.D) +
                   " " + dist_name(dist));
      run_store_case(cs, dist, {BoundMode::Relative, 0.05f}, seed, {}, &stats);
      if (HasFatalFailure()) return;
    }
  // Other bounds, including absolute ones that force escapes.
  for (ErrorBound eb : {ErrorBound{BoundMode::Relative, 0.01f}, ErrorBound{BoundMode::Relative, 0.1f},
                        ErrorBound{BoundMode::Absolute, 0.001f}, ErrorBound{BoundMode::Absolute, 0.5f}}) {
    SCOPED_TRACE("eb " + std::to_string(eb.value));
    run_store_case({DType::F16, 64, 128}, Dist::HeavyTailed, eb, seed + 5, {}, &stats);
    if (HasFatalFailure()) return;
  }
  for (int k = 0; k < format::kLowBitChoices; ++k) EXPECT_GT(stats.blocks_per_k[k], 0) << "k " << k;
}

// Small relative bounds give codes up to 50 (eb 0.01) and 100 (eb 0.005):
// most pairs escape under k = 0, so from_histograms picks k > 0, and the
// blocks it writes carry low bits after most codewords. Every block shape and
// input type, each with every codebook choice.
TEST(StoreGpu, BitEqualToReferenceWithLowBitsAtSmallBounds) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  StoreStats stats;
  int n = 0;
  for (float bound : {0.01f, 0.005f})
    for (int T : {32, 64, 128})
      for (int D : {64, 80, 96, 128, 256}) {
        const DType dtypes[] = {DType::F16, DType::BF16, DType::F32};
        const DType dtype = dtypes[n % 3];
        const Dist dist = kAllDists[n % 4];
        ++n;
        SCOPED_TRACE(std::string(dtype_name(dtype)) + " T " + std::to_string(T) + " D " + std::to_string(D) + " " +
                     dist_name(dist) + " eb " + std::to_string(bound));
        StoreStats one;
        run_store_case({dtype, T, D}, dist, {BoundMode::Relative, bound}, seed + 17 * n, {}, &one);
        if (HasFatalFailure()) return;
        // Codes spread over 0..1/(2 eb) around the group's middle: k = 0
        // escapes most pairs. (Outlier channels can crowd a token's other
        // values into a few small codes, so they are only counted.)
        if (dist != Dist::OutlierChannels)
          EXPECT_EQ(one.auto_low_bits, one.auto_books) << "from_histograms kept k = 0 for some codebook";
        stats.auto_books += one.auto_books;
        stats.auto_low_bits += one.auto_low_bits;
        for (int k = 0; k < format::kLowBitChoices; ++k) stats.blocks_per_k[k] += one.blocks_per_k[k];
      }
  EXPECT_GT(stats.auto_low_bits, stats.auto_books / 2) << "from_histograms rarely picked k > 0 at small bounds";
}

// Small bound (codes beyond 15 << k and beyond 254: PAIR_ESC fields and raw
// words), non-finite inputs (raw words, NaN payloads kept), empty and constant
// groups, and pair symbols without a codeword, over every block shape and
// input type, each with every codebook choice (k = 0..3 and from_histograms).
TEST(StoreGpu, BitEqualToReferenceWithPairEscapesAndRawValues) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  int n = 0;
  StoreStats stats;
  for (DType dtype : {DType::F16, DType::BF16, DType::F32})
    for (int T : {32, 64, 128})
      for (int D : {64, 80, 96, 128, 256})
        for (bool sparse : {false, true}) {
          const Dist dist = kAllDists[n++ % 4];
          SCOPED_TRACE(std::string(dtype_name(dtype)) + " T " + std::to_string(T) + " D " + std::to_string(D) + " " +
                       dist_name(dist) + (sparse ? " sparse codebooks" : ""));
          StoreOptions opt;
          opt.specials = true;
          opt.sparse_books = sparse;
          run_store_case({dtype, T, D}, dist, {BoundMode::Relative, 0.005f}, seed + 7 * n, opt, &stats);
          if (HasFatalFailure()) return;
        }
  EXPECT_GT(stats.dropped, 0) << "no case encoded a pair symbol without a codeword";
  // Bounds where most finite codes exceed 254 (raw words) or 15 << k (fields).
  for (ErrorBound eb : {ErrorBound{BoundMode::Relative, 0.0005f}, ErrorBound{BoundMode::Absolute, 0.0001f},
                        ErrorBound{BoundMode::Relative, 0.02f}}) {
    SCOPED_TRACE("eb " + std::to_string(eb.value));
    StoreOptions opt;
    opt.specials = true;
    run_store_case({DType::F32, 64, 128}, Dist::Gaussian, eb, seed + 11, opt, &stats);
    if (HasFatalFailure()) return;
    opt.specials = false;
    opt.sparse_books = true;
    run_store_case({DType::BF16, 128, 64}, Dist::OutlierChannels, eb, seed + 13, opt, &stats);
    if (HasFatalFailure()) return;
  }
  // Unaligned input rows, every input type (16-byte vector loads do not apply).
  for (DType dtype : {DType::F16, DType::BF16, DType::F32}) {
    SCOPED_TRACE(std::string("odd stride ") + dtype_name(dtype));
    StoreOptions opt;
    opt.specials = true;
    opt.odd_stride = true;
    run_store_case({dtype, 64, 96}, Dist::HeavyTailed, {BoundMode::Relative, 0.02f}, seed + 19, opt, &stats);
    if (HasFatalFailure()) return;
  }
}
