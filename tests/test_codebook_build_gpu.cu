// Codebooks built on the device (detail::launch_build_codebooks) against the
// host build: every byte of every CodebookTables equals
// Codebook::from_histograms(...).tables(), on fresh random histograms of
// every shape and on histograms of KV-like data; the ready flag (set once
// built, left 0 with nothing to build, an already-set flag skips the build);
// and the same build captured into a CUDA graph and replayed.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpu_util.cuh"
#include "kvcomp/codebook.hpp"
#include "kvcomp/reference.hpp"
#include "random_histograms.hpp"
#include "src/layer_codebooks.hpp"
#include "test_data.hpp"

using namespace kvcomp;
using namespace kvcomp_test;

namespace {

constexpr size_t kBookCounts = size_t(format::kLowBitChoices) * format::kNumSymbols;
constexpr uint8_t kPoison = 0xA5;  // what "untouched" tables hold

/// Histograms of n_books codebooks, [book][k][symbol].
using Hist = std::vector<unsigned long long>;

void put_book(Hist& hist, int b, const std::vector<uint64_t>& rows) {
  std::copy(rows.begin(), rows.end(), hist.begin() + size_t(b) * kBookCounts);
}

/// K|V histograms of Gaussian / outlier data at a relative bound, as histogram_kernel counts them.
std::vector<uint64_t> data_book(std::mt19937_64& rng, Kind kind) {
  const int T = 64, D = 128;
  const float ebs[] = {0.005f, 0.01f, 0.05f, 0.1f};
  std::vector<uint64_t> rows(kBookCounts, 0);
  auto x = make_data(kind == Kind::Key ? Dist::OutlierChannels : Dist::Gaussian, T, D, rng());
  round_to_half(x);
  ref::add_histogram(kind, x.data(), T, D, ErrorBound{BoundMode::Relative, ebs[rng() % 4]}, rows.data());
  return rows;
}

/// Where two tables first differ, in words ("" if they do not).
std::string first_difference(const CodebookTables& got, const CodebookTables& want) {
  for (int i = 0; i < format::kNumSymbols; ++i)
    if (got.enc[i] != want.enc[i])
      return "enc[" + std::to_string(i) + "] " + std::to_string(got.enc[i]) + " vs " + std::to_string(want.enc[i]);
  if (got.low_bits != want.low_bits)
    return "low_bits " + std::to_string(got.low_bits) + " vs " + std::to_string(want.low_bits);
  for (int i = 0; i < format::kLutSize; ++i)
    if (got.lut[i] != want.lut[i])
      return "lut[" + std::to_string(i) + "] " + std::to_string(got.lut[i]) + " vs " + std::to_string(want.lut[i]);
  if (std::memcmp(&got, &want, sizeof(got)) != 0) return "padding";
  return "";
}

/// Device buffers for one build: histograms, tables (poisoned), ready flag.
struct Build {
  int n_books;
  DevBuf<unsigned long long> hist;
  DevBuf<CodebookTables> books;
  DevBuf<int32_t> ready;
  Build(const Hist& h, int32_t ready_value)
      : n_books(int(h.size() / kBookCounts)), hist(h.size()), books(size_t(n_books)), ready(1) {
    hist.upload(h);
    cudaMemset(books.ptr, kPoison, size_t(n_books) * sizeof(CodebookTables));
    ready.upload({ready_value});
  }
  int32_t ready_flag() const { return ready.download()[0]; }
};

/// Every book's tables equal the host build's.
void expect_host_tables(const Build& build, const Hist& hist) {
  const auto got = build.books.download();
  for (int b = 0; b < build.n_books; ++b) {
    std::vector<uint64_t> counts(hist.begin() + size_t(b) * kBookCounts, hist.begin() + size_t(b + 1) * kBookCounts);
    const CodebookTables want = Codebook::from_histograms(counts.data()).tables();
    ASSERT_EQ(first_difference(got[b], want), "") << "book " << b;
  }
}

/// Every byte of every book still the poison.
void expect_untouched(const Build& build) {
  const auto got = build.books.download();
  const auto* bytes = reinterpret_cast<const uint8_t*>(got.data());
  for (size_t i = 0; i < got.size() * sizeof(CodebookTables); ++i) ASSERT_EQ(bytes[i], kPoison) << "byte " << i;
}

bool all_zero(const Hist& h) {
  for (auto c : h)
    if (c) return false;
  return true;
}

}  // namespace

TEST(CodebookBuildGpu, EveryShapeMatchesTheHostBuildByteForByte) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int n_books : {1, 2, 3, 8, 16, 40}) {
    for (int round = 0; round < 4; ++round) {
      SCOPED_TRACE("books " + std::to_string(n_books) + " round " + std::to_string(round));
      Hist hist(size_t(n_books) * kBookCounts);
      for (int b = 0; b < n_books; ++b) {
        // Round 0: one shape for all books (each in turn); later rounds mix shapes and KV-like data.
        const int pick = round == 0 ? (n_books + b) % 9 : int(rng() % 9);
        put_book(hist, b, pick < 8 ? random_book(rng, kAllShapes[pick]) : data_book(rng, Kind(b % 2)));
      }
      if (all_zero(hist)) put_book(hist, 0, random_book(rng, HistShape::Sparse));  // AllZero covers that case
      Build build(hist, 0);
      detail::launch_build_codebooks(build.hist.ptr, n_books, build.books.ptr, build.ready.ptr, 0);
      CUDA_LAUNCH_OK();
      EXPECT_EQ(build.ready_flag(), 1);
      expect_host_tables(build, hist);
      if (HasFatalFailure()) return;
    }
  }
}

TEST(CodebookBuildGpu, EveryShapeAloneAndSomeEmptyBooks) {
  // Books of one shape each, every shape many times; empty books among
  // non-empty ones are built too (only PAIR_ESC, as on the host).
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (auto shape : kAllShapes) {
    SCOPED_TRACE(shape_name(shape));
    const int n_books = 24;
    Hist hist(size_t(n_books) * kBookCounts);
    for (int b = 0; b < n_books; ++b) put_book(hist, b, random_book(rng, shape));
    put_book(hist, n_books - 1, random_book(rng, HistShape::Dense));  // not all empty
    Build build(hist, 0);
    detail::launch_build_codebooks(build.hist.ptr, n_books, build.books.ptr, build.ready.ptr, 0);
    CUDA_LAUNCH_OK();
    EXPECT_EQ(build.ready_flag(), 1);
    expect_host_tables(build, hist);
    if (HasFatalFailure()) return;
  }
}

TEST(CodebookBuildGpu, AllZeroHistogramsBuildNothing) {
  KVCOMP_REQUIRE_GPU();
  for (int n_books : {1, 2, 16, 33}) {
    SCOPED_TRACE("books " + std::to_string(n_books));
    const Hist hist(size_t(n_books) * kBookCounts, 0);
    Build build(hist, 0);
    detail::launch_build_codebooks(build.hist.ptr, n_books, build.books.ptr, build.ready.ptr, 0);
    CUDA_LAUNCH_OK();
    EXPECT_EQ(build.ready_flag(), 0);
    expect_untouched(build);
  }
  // No books at all: nothing launched, the flag stays as it is.
  DevBuf<int32_t> ready(1);
  ready.upload({0});
  detail::launch_build_codebooks(nullptr, 0, nullptr, ready.ptr, 0);
  CUDA_LAUNCH_OK();
  EXPECT_EQ(ready.download()[0], 0);
}

TEST(CodebookBuildGpu, ASetReadyFlagSkipsTheBuild) {
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int n_books = 8;
  Hist hist(size_t(n_books) * kBookCounts);
  for (int b = 0; b < n_books; ++b) put_book(hist, b, random_book(rng, HistShape::Dense));
  for (int32_t flag : {1, 7, -1}) {
    Build build(hist, flag);
    detail::launch_build_codebooks(build.hist.ptr, n_books, build.books.ptr, build.ready.ptr, 0);
    CUDA_LAUNCH_OK();
    EXPECT_EQ(build.ready_flag(), flag);
    expect_untouched(build);
  }
  // Built once, a second launch leaves the tables as they are even after the histograms change.
  Build build(hist, 0);
  detail::launch_build_codebooks(build.hist.ptr, n_books, build.books.ptr, build.ready.ptr, 0);
  CUDA_LAUNCH_OK();
  Hist other(hist.size());
  for (int b = 0; b < n_books; ++b) put_book(other, b, random_book(rng, HistShape::Skewed));
  build.hist.upload(other);
  detail::launch_build_codebooks(build.hist.ptr, n_books, build.books.ptr, build.ready.ptr, 0);
  CUDA_LAUNCH_OK();
  EXPECT_EQ(build.ready_flag(), 1);
  expect_host_tables(build, hist);
}

TEST(CodebookBuildGpu, CapturedInACudaGraph) {
  // Captured once (no host synchronization or allocation inside, or the
  // capture fails), replayed: builds from whatever the histograms hold at
  // replay; with the flag set, a replay changes nothing.
  KVCOMP_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int n_books = 16;
  Hist hist(size_t(n_books) * kBookCounts);
  for (int b = 0; b < n_books; ++b) put_book(hist, b, data_book(rng, Kind(b % 2)));
  Build build(Hist(hist.size(), 0), 0);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  detail::launch_build_codebooks(build.hist.ptr, n_books, build.books.ptr, build.ready.ptr, stream);
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  // Histograms still zero: nothing built.
  CUDA_OK(cudaDeviceSynchronize());  // the poisoning memset (legacy stream) is done
  CUDA_OK(cudaGraphLaunch(exec, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  CUDA_LAUNCH_OK();
  EXPECT_EQ(build.ready_flag(), 0);
  expect_untouched(build);
  // Histograms filled: built, bit for bit. (A copy from pageable memory may
  // still be in flight when cudaMemcpy returns; the non-blocking stream does
  // not wait for it.)
  build.hist.upload(hist);
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaGraphLaunch(exec, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  CUDA_LAUNCH_OK();
  EXPECT_EQ(build.ready_flag(), 1);
  expect_host_tables(build, hist);
  // Ready: a replay over other histograms keeps the tables.
  Hist other(hist.size());
  for (int b = 0; b < n_books; ++b) put_book(other, b, random_book(rng, HistShape::Ties));
  build.hist.upload(other);
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaGraphLaunch(exec, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  EXPECT_EQ(build.ready_flag(), 1);
  expect_host_tables(build, hist);
  // Flag cleared: the replay builds from the new histograms.
  build.ready.upload({0});
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaGraphLaunch(exec, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  EXPECT_EQ(build.ready_flag(), 1);
  expect_host_tables(build, other);
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
  CUDA_OK(cudaStreamDestroy(stream));
}

TEST(CodebookBuildGpu, TimeOfALayer) {
  // Informational: one layer of 8 KV heads (16 books) of KV-like histograms.
  KVCOMP_REQUIRE_GPU();
  std::mt19937_64 rng(fresh_seed());
  const int n_books = 16;
  Hist hist(size_t(n_books) * kBookCounts);
  for (int b = 0; b < n_books; ++b) put_book(hist, b, data_book(rng, Kind(b % 2)));
  Build build(hist, 0);
  cudaEvent_t start, stop;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  float best_ms = 1e9f;
  for (int rep = 0; rep < 5; ++rep) {
    build.ready.upload({0});
    CUDA_OK(cudaEventRecord(start, 0));
    detail::launch_build_codebooks(build.hist.ptr, n_books, build.books.ptr, build.ready.ptr, 0);
    CUDA_OK(cudaEventRecord(stop, 0));
    CUDA_OK(cudaEventSynchronize(stop));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
    best_ms = std::min(best_ms, ms);
  }
  CUDA_LAUNCH_OK();
  std::printf("device codebook build, %d books: %.1f us\n", n_books, 1000.0 * best_ms);
  expect_host_tables(build, hist);
  CUDA_OK(cudaEventDestroy(start));
  CUDA_OK(cudaEventDestroy(stop));
}
