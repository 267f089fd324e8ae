#include "layer_codebooks.hpp"

#include <cstdint>
#include <vector>

#include "kernels/codebook_build.cuh"
#include "kvcomp/format.hpp"
#include "launch.hpp"

namespace kvcomp {
namespace detail {

void launch_build_codebooks(const unsigned long long* hist, int n_books, CodebookTables* books, int32_t* ready,
                            cudaStream_t s) {
  if (n_books <= 0) return;  // no histogram: nothing to build, *ready stays as it is
  build_codebooks_kernel<<<n_books, kBuildThreads, 0, s>>>(hist, n_books, books, ready);
  check_cuda(cudaGetLastError(), "codebook build kernel launch");
  mark_ready_kernel<<<1, kBuildThreads, 0, s>>>(hist, size_t(n_books) * kBookCounts, ready);
  check_cuda(cudaGetLastError(), "codebook ready kernel launch");
}

void build_layer_codebooks(DType dtype, int layers, int kv_heads, int block_tokens, int head_dim, int layer,
                           const StoreJob* jobs, int n_jobs, DeviceBuffer<unsigned long long>& hist,
                           CodebookTables* books, cudaStream_t s) {
  const int H = kv_heads, T = block_tokens, D = head_dim;
  const size_t n_books = size_t(layers) * H * 2;
  // Per codebook, one histogram per low-bit count: [book][kLowBitChoices][kNumSymbols].
  const size_t per_book = size_t(format::kLowBitChoices) * format::kNumSymbols;
  hist.reserve(n_books * per_book, "histogram scratch");
  check_cuda(cudaMemsetAsync(hist.ptr, 0, n_books * per_book * sizeof(unsigned long long), s), "histogram clear");
  launch_histogram(dtype, jobs, n_jobs, T, D, hist.ptr, s);
  const size_t layer_books = size_t(H) * 2;
  const size_t first = size_t(layer) * layer_books;
  std::vector<unsigned long long> h(layer_books * per_book);
  check_cuda(cudaMemcpyAsync(h.data(), hist.ptr + first * per_book, h.size() * sizeof(unsigned long long),
                             cudaMemcpyDeviceToHost, s),
             "histogram copy");
  check_cuda(cudaStreamSynchronize(s), "histogram sync");
  std::vector<CodebookTables> tables(layer_books);
  for (size_t b = 0; b < layer_books; ++b) {
    std::vector<uint64_t> counts(h.begin() + b * per_book, h.begin() + (b + 1) * per_book);
    tables[b] = Codebook::from_histograms(counts.data()).tables();  // picks the book's k
  }
  check_cuda(cudaMemcpyAsync(books + first, tables.data(), tables.size() * sizeof(CodebookTables),
                             cudaMemcpyHostToDevice, s),
             "codebook upload");
  check_cuda(cudaStreamSynchronize(s), "codebook upload sync");  // `tables` is pageable and local
}

Codebook read_codebook(const CodebookTables* tables) {
  CodebookTables t;
  check_cuda(cudaMemcpy(&t, tables, sizeof(t), cudaMemcpyDeviceToHost), "codebook copy");
  uint8_t lengths[format::kNumSymbols];
  for (int i = 0; i < format::kNumSymbols; ++i) lengths[i] = uint8_t(t.enc[i] >> 16);
  return Codebook::from_lengths(lengths, int(t.low_bits));
}

}  // namespace detail
}  // namespace kvcomp
