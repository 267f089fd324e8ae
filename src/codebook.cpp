#include "kvcomp/codebook.hpp"

#include <algorithm>
#include <queue>
#include <vector>

#include "kvcomp/error.hpp"

namespace kvcomp {
namespace {

using format::kMaxCodeLen;
using format::kNumSymbols;

// Plain Huffman depths for the present symbols (two-queue-free, heap based).
std::array<uint8_t, kNumSymbols> unlimited_lengths(const std::vector<uint64_t>& counts) {
  std::array<uint8_t, kNumSymbols> len{};
  struct Node { uint64_t weight; int id; };
  auto cmp = [](const Node& a, const Node& b) { return a.weight != b.weight ? a.weight > b.weight : a.id > b.id; };
  std::priority_queue<Node, std::vector<Node>, decltype(cmp)> heap(cmp);
  std::vector<int> parent(2 * kNumSymbols, -1);
  int present = 0;
  for (int s = 0; s < kNumSymbols; ++s)
    if (counts[s] > 0) { heap.push({counts[s], s}); ++present; }
  if (present == 1) {
    for (int s = 0; s < kNumSymbols; ++s) if (counts[s] > 0) len[s] = 1;
    return len;
  }
  int next = kNumSymbols;
  while (heap.size() > 1) {
    Node a = heap.top(); heap.pop();
    Node b = heap.top(); heap.pop();
    parent[a.id] = parent[b.id] = next;
    heap.push({a.weight + b.weight, next++});
  }
  for (int s = 0; s < kNumSymbols; ++s) {
    if (counts[s] == 0) continue;
    int depth = 0;
    for (int n = s; parent[n] != -1; n = parent[n]) ++depth;
    len[s] = uint8_t(std::min(depth, 255));
  }
  return len;
}

}  // namespace

std::array<uint8_t, kNumSymbols> huffman_lengths(const uint64_t* counts_in, int max_len) {
  std::vector<uint64_t> counts(counts_in, counts_in + kNumSymbols);
  // Flatten the distribution until the tree fits: halving keeps the order of
  // weights and converges to a balanced tree (depth <= 8 for 256 symbols).
  for (;;) {
    auto len = unlimited_lengths(counts);
    if (*std::max_element(len.begin(), len.end()) <= max_len) return len;
    for (auto& c : counts) if (c > 0) c = (c + 1) / 2;
  }
}

Codebook Codebook::from_histogram(const uint64_t* counts_in) {
  std::vector<uint64_t> counts(counts_in, counts_in + kNumSymbols);
  counts[format::kEscape] = std::max<uint64_t>(counts[format::kEscape], 1);
  Codebook cb;
  cb.lengths_ = huffman_lengths(counts.data(), kMaxCodeLen);
  cb.derive_tables();
  return cb;
}

Codebook Codebook::from_lengths(const uint8_t* lengths) {
  Codebook cb;
  uint64_t kraft = 0;  // in units of 2^-kMaxCodeLen
  for (int s = 0; s < kNumSymbols; ++s) {
    if (lengths[s] > kMaxCodeLen) throw Error("codebook: code length " + std::to_string(lengths[s]) +
                                              " of symbol " + std::to_string(s) + " exceeds the limit");
    cb.lengths_[s] = lengths[s];
    if (lengths[s]) kraft += uint64_t(1) << (kMaxCodeLen - lengths[s]);
  }
  if (kraft > (uint64_t(1) << kMaxCodeLen)) throw Error("codebook: lengths violate the Kraft inequality");
  if (lengths[format::kEscape] == 0) throw Error("codebook: the escape symbol has no codeword");
  cb.derive_tables();
  return cb;
}

void Codebook::derive_tables() {
  // Canonical assignment: by (length, symbol), consecutive codes per length.
  int bl_count[kMaxCodeLen + 1] = {};
  for (int s = 0; s < kNumSymbols; ++s) if (lengths_[s]) ++bl_count[lengths_[s]];
  uint32_t next_code[kMaxCodeLen + 2] = {};
  uint32_t code = 0;
  for (int bits = 1; bits <= kMaxCodeLen; ++bits) {
    code = (code + bl_count[bits - 1]) << 1;
    next_code[bits] = code;
  }
  std::fill(std::begin(tables_.lut), std::end(tables_.lut), uint32_t(0));
  for (int s = 0; s < kNumSymbols; ++s) {
    const int len = lengths_[s];
    if (!len) { tables_.enc[s] = 0; continue; }
    const uint32_t rev = format::reverse_bits(next_code[len]++, len);
    tables_.enc[s] = rev | (uint32_t(len) << 16);
    for (uint32_t hi = 0; hi < (1u << (kMaxCodeLen - len)); ++hi)
      tables_.lut[rev | (hi << len)] = format::lut_entry(s, len);
  }
}

double Codebook::mean_bits(const uint64_t* counts) const {
  double bits = 0, n = 0;
  for (int s = 0; s < kNumSymbols; ++s) {
    if (!counts[s]) continue;
    const double per = lengths_[s] ? lengths_[s] + (s == format::kEscape ? format::kRawBits : 0)
                                   : lengths_[format::kEscape] + format::kRawBits;
    bits += per * double(counts[s]);
    n += double(counts[s]);
  }
  return n > 0 ? bits / n : 0.0;
}

}  // namespace kvcomp
