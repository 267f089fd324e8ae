#include "kvcomp/codebook.hpp"

#include <algorithm>
#include <queue>
#include <string>
#include <vector>

#include "kvcomp/error.hpp"

namespace kvcomp {
namespace {

using format::kMaxCodeLen;
using format::kNumSymbols;
using format::kPairBase;
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

namespace {

void check_low_bits(int low_bits, const char* what) {
  if (low_bits < 0 || low_bits > format::kMaxLowBits)
    throw Error(std::string("codebook: ") + what + ": low_bits (k) must be 0.." +
                std::to_string(format::kMaxLowBits) + ", got " + std::to_string(low_bits));
}

// Bits of the pairs of a histogram (under k) coded with `lengths`: what
// mean_bits averages.
double total_bits(const std::array<uint8_t, kNumSymbols>& lengths, int k, const uint64_t* counts) {
  // A pair symbol without a codeword is written as PAIR_ESC (format::put_pair);
  // a coded pair symbol costs its codeword and 2k low bits; a PAIR_ESC its
  // codeword and two 8-bit fields. The 32 raw bits that follow a field of 255
  // (an ESC value) are not counted: a histogram of stream symbols does not
  // say how many escaped values a PAIR_ESC holds.
  const double esc_bits = double(lengths[kPairEscape]) + 2.0 * format::kFieldBits;
  const double low = 2.0 * double(k);
  double bits = 0;
  for (int s = 0; s < kNumSymbols; ++s) {
    if (!counts[s]) continue;
    const double per = (s < kPairEscape && lengths[s]) ? double(lengths[s]) + low : esc_bits;
    bits += per * double(counts[s]);
  }
  return bits;
}

}  // namespace

Codebook Codebook::from_histogram(const uint64_t* counts_in, int low_bits) {
  check_low_bits(low_bits, "from_histogram");
  std::vector<uint64_t> counts(counts_in, counts_in + kNumSymbols);
  // Only pair symbols and PAIR_ESC may have codewords; PAIR_ESC always has one.
  for (int s = kPairEscape + 1; s < kNumSymbols; ++s) counts[s] = 0;
  counts[kPairEscape] = std::max<uint64_t>(counts[kPairEscape], 1);
  Codebook cb;
  cb.lengths_ = huffman_lengths(counts.data(), kMaxCodeLen);
  cb.tables_.low_bits = uint32_t(low_bits);
  cb.derive_tables();
  return cb;
}

Codebook Codebook::from_histograms(const uint64_t* counts) {
  // One candidate per k, each from the histogram under its k; the estimate is
  // total_bits (what mean_bits averages), so the raw words of ESC values,
  // which every k writes alike, do not take part.
  Codebook best;
  double best_bits = 0;
  for (int k = 0; k < format::kLowBitChoices; ++k) {
    const uint64_t* h = counts + size_t(k) * kNumSymbols;
    Codebook cb = from_histogram(h, k);
    const double bits = total_bits(cb.lengths_, k, h);
    if (k == 0 || bits < best_bits) {  // strictly fewer: a tie keeps the smaller k
      best = cb;
      best_bits = bits;
    }
  }
  return best;
}

Codebook Codebook::from_lengths(const uint8_t* lengths, int low_bits) {
  check_low_bits(low_bits, "from_lengths");
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
  cb.tables_.low_bits = uint32_t(low_bits);
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
  const int k = int(tables_.low_bits);
  const uint32_t mask = (1u << k) - 1;
  std::fill(std::begin(tables_.lut), std::end(tables_.lut), uint32_t(0));
  for (int s = 0; s < kNumSymbols; ++s) {
    const int len = lengths_[s];
    if (!len) { tables_.enc[s] = 0; continue; }
    const uint32_t rev = format::reverse_bits(next_code[len]++, len);
    tables_.enc[s] = rev | (uint32_t(len) << 16);
    // Every index whose low `len` bits are the codeword: the bits above it
    // are the pair's low bits (k of a, then k of b) and whatever follows.
    const bool slow = s == kPairEscape || len + 2 * k > kMaxCodeLen;
    for (uint32_t ext = 0; ext < (1u << (kMaxCodeLen - len)); ++ext) {
      uint32_t e;
      if (slow) {
        e = format::lut_slow_entry(s, len);
      } else {
        const int lo_a = int(ext & mask), lo_b = int((ext >> k) & mask);
        e = format::lut_fast_entry((s / kPairBase) << k | lo_a, (s % kPairBase) << k | lo_b, len + 2 * k);
      }
      tables_.lut[rev | (ext << len)] = e;
    }
  }
}

double Codebook::mean_bits(const uint64_t* counts) const {
  double n = 0;
  for (int s = 0; s < kNumSymbols; ++s) n += double(counts[s]);
  return n > 0 ? total_bits(lengths_, low_bits(), counts) / n : 0.0;
}

}  // namespace kvcomp
