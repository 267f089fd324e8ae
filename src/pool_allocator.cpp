#include "pool_allocator.hpp"

#include <iterator>

namespace kvcomp {
namespace detail {

bool PoolAllocator::allocate(uint64_t units, uint64_t& at) {
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < units) continue;
    at = it->first;
    const uint64_t rest = it->second - units;
    free_.erase(it);
    if (rest) free_[at + units] = rest;
    used_ += units;
    return true;
  }
  return false;
}

void PoolAllocator::release(uint64_t at, uint64_t units) {
  used_ -= units;
  auto next = free_.lower_bound(at);
  if (next != free_.end() && at + units == next->first) { units += next->second; next = free_.erase(next); }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == at) { prev->second += units; return; }
  }
  free_[at] = units;
}

}  // namespace detail
}  // namespace kvcomp
