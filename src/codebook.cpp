#include "kvcomp/codebook.hpp"

#include <algorithm>
#include <queue>
#include <vector>

#include "kvcomp/error.hpp"

namespace kvcomp {
namespace {

using format::kMaxCodeLen;
using format::kNumSymbols;
using format::kPairEscape;

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
  // weights and converges to a balanced tree (depth <= 8 for 256 symbols,
  // so any max_len >= 8 is reached).
  for (;;) {
    auto len = unlimited_lengths(counts);
    if (*std::max_element(len.begin(), len.end()) <= max_len) return len;
    for (auto& c : counts) if (c > 0) c = (c + 1) / 2;
  }
}

Codebook Codebook::from_histogram(const uint64_t* counts_in) {
  std::vector<uint64_t> counts(counts_in, counts_in + kNumSymbols);
  // Only pair symbols and PAIR_ESC may have codewords; PAIR_ESC always has one.
  for (int s = kPairEscape + 1; s < kNumSymbols; ++s) counts[s] = 0;
  counts[kPairEscape] = std::max<uint64_t>(counts[kPairEscape], 1);
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
    if (s > kPairEscape && lengths[s] != 0)
      throw Error("codebook: symbol " + std::to_string(s) + " has a codeword (length " +
                  std::to_string(lengths[s]) + ") but only symbols 0.." + std::to_string(kPairEscape) + " may");
    cb.lengths_[s] = lengths[s];
    if (lengths[s]) kraft += uint64_t(1) << (kMaxCodeLen - lengths[s]);
  }
  if (kraft > (uint64_t(1) << kMaxCodeLen)) throw Error("codebook: lengths violate the Kraft inequality");
  if (lengths[kPairEscape] == 0)
    throw Error("codebook: the pair escape symbol " + std::to_string(kPairEscape) + " has no codeword");
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
  // A pair symbol without a codeword is written as PAIR_ESC (format::put_pair);
  // a PAIR_ESC costs its codeword and two 8-bit fields. The 32 raw bits that
  // follow a field of 255 (an ESC value) are not counted: a histogram of
  // stream symbols does not say how many escaped values a PAIR_ESC holds.
  const double esc_bits = double(lengths_[kPairEscape]) + 2.0 * format::kFieldBits;
  double bits = 0, n = 0;
  for (int s = 0; s < kNumSymbols; ++s) {
    if (!counts[s]) continue;
    const double per = (s != kPairEscape && lengths_[s]) ? double(lengths_[s]) : esc_bits;
    bits += per * double(counts[s]);
    n += double(counts[s]);
  }
  return n > 0 ? bits / n : 0.0;
}

}  // namespace kvcomp
