// The compressed pool's allocator: which 16-byte units of the pool are free.
// append() places each sequence's newly closed blocks in one Extent; a
// sequence gives its extents back when it is removed. Host bookkeeping only:
// the pool itself is device memory owned by the Cache.
#pragma once

#include <cstdint>
#include <map>

namespace kvcomp {
namespace detail {

/// A run of the pool, in 16-byte units (format::kBlockAlign).
struct Extent {
  uint64_t at16;
  uint64_t units16;
};

// First-fit allocator over the pool, in 16-byte units, with coalescing.
class PoolAllocator {
 public:
  explicit PoolAllocator(uint64_t units) : capacity_(units) { free_[0] = units; }
  /// First fit: sets `at` and returns true, or returns false and changes nothing.
  bool allocate(uint64_t units, uint64_t& at);
  /// Gives back [at, at + units), merging it with free neighbours.
  void release(uint64_t at, uint64_t units);
  uint64_t used() const { return used_; }

 private:
  uint64_t capacity_;
  uint64_t used_ = 0;
  std::map<uint64_t, uint64_t> free_;  // start -> length of each free run
};

}  // namespace detail
}  // namespace kvcomp
