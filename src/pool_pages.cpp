#include "pool_pages.hpp"

#include <algorithm>

#include "kvcomp/format.hpp"

namespace kvcomp {
namespace detail {

size_t worst_pair_bytes(int T, int D) {
  const uint64_t bits = uint64_t(32) * format::max_lane_bits(T, D);
  return format::block_bytes(Kind::Key, T, D, bits) + format::block_bytes(Kind::Value, T, D, bits);
}

PageGeometry plan_pages(size_t pool_bytes, int max_seqs, int T, int D, size_t page_bytes) {
  const uint64_t units = pool_bytes / format::kBlockAlign;
  const uint64_t worst = (worst_pair_bytes(T, D) + format::kBlockAlign - 1) / format::kBlockAlign;
  const uint64_t target = (uint64_t(256) << 10) / format::kBlockAlign;
  const uint64_t share = units / (2 * uint64_t(std::max(max_seqs, 1)));
  const uint64_t page = page_bytes ? std::max<uint64_t>(page_bytes / format::kBlockAlign, worst)
                                   : std::max(worst, std::min(target, share));
  return {uint32_t(page), int32_t(std::min<uint64_t>(units / page, INT32_MAX))};
}

}  // namespace detail
}  // namespace kvcomp
