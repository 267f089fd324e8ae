#include "layer_codebooks.hpp"

#include <cstdint>

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

Codebook read_codebook(const CodebookTables* tables) {
  CodebookTables t;
  check_cuda(cudaMemcpy(&t, tables, sizeof(t), cudaMemcpyDeviceToHost), "codebook copy");
  uint8_t lengths[format::kNumSymbols];
  for (int i = 0; i < format::kNumSymbols; ++i) lengths[i] = uint8_t(t.enc[i] >> 16);
  return Codebook::from_lengths(lengths, int(t.low_bits));
}

}  // namespace detail
}  // namespace kvcomp
