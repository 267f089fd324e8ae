// Codebook construction (codebook.hpp) as plain-array steps that run on the
// host and on the device, so a codebook built on the GPU is the host's bit
// for bit. The host (src/codebook.cpp) calls every step with lane 0 of 1
// lane; the device (kernels/codebook_build.cuh) calls the strided steps with
// one warp or one CTA and the serial ones from one thread, with barriers in
// between. No CUDA-only header: g++ compiles this through src/codebook.cpp.
//
// Code lengths: Huffman over the present symbols, limited to max_len by
// halving every count (ceil(c / 2)) and rebuilding until the deepest leaf
// fits. The tree is built by the two-queue method: leaves sorted by
// (count, symbol), internal nodes in creation order; each step takes the
// smaller front by (weight, id), where internal ids (256, 257, .. in creation
// order) exceed every symbol, so on equal weight the leaf wins. Internal
// weights never decrease in creation order: a merge takes the two lightest
// nodes a <= b, every node left (the new a + b too) weighs at least b, so the
// next merge's pair sums to at least a + b. The internal queue is therefore in
// (weight, id) order too, and the lighter front is the lightest node: this is
// the binary-heap construction ordered by (weight, id), merge for merge, as
// long as no weight wraps (finish_load rules that out).
//
// Tables: canonical codes, by (length, symbol), consecutive per length; the
// decode table entry of an index is found by canonical decoding of its bits.
#pragma once

#include <cstdint>

#include "kvcomp/format.hpp"

namespace kvcomp {
namespace huffman {

constexpr int kSymbols = format::kNumSymbols;
constexpr int kNodes = 2 * kSymbols - 1;  // leaves and internal nodes of a full tree

/// One histogram row's code lengths in the making.
struct LengthWork {
  uint64_t weight[kSymbols];          // counts, halved as the length limit needs
  uint8_t order[kSymbols];            // present symbols sorted by (weight, symbol)
  uint64_t sorted_weight[kSymbols];   // weight[order[i]]
  uint8_t length[kSymbols];           // the result; 0 = no codeword
  uint64_t node_weight[kSymbols - 1]; // internal nodes, in creation order
  int16_t parent[kNodes];             // by node: sorted leaves 0..n-1, then internal n..2n-2
  uint8_t depth[kNodes];
  int present;                        // n: symbols with a nonzero weight (halving keeps them)
  int max_depth;                      // deepest leaf of the last merge
};

/// The largest hi part (code >> k) of the pair symbols present in `counts`
/// (-1: none).
KVCOMP_HD int max_pair_hi(const uint64_t* counts) {
  int m = -1;
  for (int s = 0; s < format::kPairSymbols; ++s) {
    const int hi = s / format::kPairBase > s % format::kPairBase ? s / format::kPairBase : s % format::kPairBase;
    if (counts[s] && hi > m) m = hi;
  }
  return m;
}

/// Weight of symbol s in a codebook built from `counts` (hi_max:
/// max_pair_hi(counts)): only pair symbols and PAIR_ESC may have codewords,
/// and PAIR_ESC always has one (any input stays representable). Every pair
/// symbol whose two hi parts are both within the largest present one has one
/// too (weight at least 1): a pair of codes the data's range holds but the
/// histogram never showed is then a codeword of at most 11 bits, not a
/// PAIR_ESC (16 bits more, and the fused kernel's slow path: on the tiny
/// Llama 0.2% of the pairs, in 56-80% of the 32-token chunks, at eb 0.05).
KVCOMP_HD uint64_t codebook_weight(const uint64_t* counts, int s, int hi_max) {
  if (s > format::kPairEscape) return 0;
  if (s == format::kPairEscape) return counts[s] > 0 ? counts[s] : 1;
  if (counts[s] > 0) return counts[s];
  return s / format::kPairBase <= hi_max && s % format::kPairBase <= hi_max ? 1 : 0;
}

/// Strided: the weights from `counts` (as they are, or by codebook_weight).
KVCOMP_HD void load_step(LengthWork& w, const uint64_t* counts, bool for_codebook, int lane, int lanes) {
  const int hi_max = for_codebook ? max_pair_hi(counts) : -1;
  for (int s = lane; s < kSymbols; s += lanes)
    w.weight[s] = for_codebook ? codebook_weight(counts, s, hi_max) : counts[s];
}

/// Strided: every weight to ceil(w / 2); a present symbol stays present. The
/// order of weights is kept, but ties may appear: the next sort breaks them
/// by symbol.
KVCOMP_HD void halve_step(LengthWork& w, int lane, int lanes) {
  for (int s = lane; s < kSymbols; s += lanes) w.weight[s] -= w.weight[s] / 2;
}

/// Whether the weights sum to less than 2^64 (no node weight wraps).
KVCOMP_HD bool total_fits(const LengthWork& w) {
  uint64_t sum = 0;
  for (int s = 0; s < kSymbols; ++s) {
    sum += w.weight[s];
    if (sum < w.weight[s]) return false;
  }
  return true;
}

/// Serial, after load_step: halves until the weights sum below 2^64 (nothing
/// to do for any real histogram), counts the present symbols and lists them
/// in symbol order (sort_serial's start).
KVCOMP_HD void finish_load(LengthWork& w) {
  while (!total_fits(w)) halve_step(w, 0, 1);
  int n = 0;
  for (int s = 0; s < kSymbols; ++s)
    if (w.weight[s] != 0) w.order[n++] = uint8_t(s);
  w.present = n;
}

/// The (weight, id) order of the construction.
KVCOMP_HD bool precedes(uint64_t weight_a, int a, uint64_t weight_b, int b) {
  return weight_a != weight_b ? weight_a < weight_b : a < b;
}

/// Position of present symbol s among the present symbols in (weight, symbol) order.
KVCOMP_HD int leaf_rank(const uint64_t* weight, int s) {
  const uint64_t ws = weight[s];
  int rank = 0;
  for (int t = 0; t < kSymbols; ++t) rank += (weight[t] != 0 && precedes(weight[t], t, ws, s)) ? 1 : 0;
  return rank;
}

/// Strided (the device's sort): every present symbol to its rank in `order`
/// and `sorted_weight`; clears `length`.
KVCOMP_HD void rank_step(LengthWork& w, int lane, int lanes) {
  for (int s = lane; s < kSymbols; s += lanes) {
    w.length[s] = 0;
    if (w.weight[s] == 0) continue;
    const int r = leaf_rank(w.weight, s);
    w.order[r] = uint8_t(s);
    w.sorted_weight[r] = w.weight[s];
  }
}

/// Serial (the host's sort), the same result as rank_step: insertion sort of
/// the previous order, which halving leaves sorted up to new ties, so little
/// moves after the first pass.
KVCOMP_HD void sort_serial(LengthWork& w) {
  for (int s = 0; s < kSymbols; ++s) w.length[s] = 0;
  for (int i = 1; i < w.present; ++i) {
    const int s = w.order[i];
    const uint64_t ws = w.weight[s];
    int j = i;
    for (; j > 0 && precedes(ws, s, w.weight[w.order[j - 1]], w.order[j - 1]); --j) w.order[j] = w.order[j - 1];
    w.order[j] = uint8_t(s);
  }
  for (int i = 0; i < w.present; ++i) w.sorted_weight[i] = w.weight[w.order[i]];
}

/// The next node to merge, leaf (0..n-1) or internal (n + j): the lighter
/// front, the leaf on equal weight (its id is the smaller). Internal nodes
/// [front, created) are waiting.
KVCOMP_HD int take_lightest(const LengthWork& w, int n, int& leaf, int& front, int created, uint64_t& weight) {
  if (leaf < n && (front == created || w.sorted_weight[leaf] <= w.node_weight[front])) {
    weight = w.sorted_weight[leaf];
    return leaf++;
  }
  weight = w.node_weight[front];
  return n + front++;
}

/// Serial, after a sort: builds the tree by the two-queue method and writes
/// the depth of every present symbol to `length` (a lone symbol gets 1);
/// sets max_depth.
KVCOMP_HD void merge_step(LengthWork& w) {
  const int n = w.present;
  if (n <= 1) {
    if (n == 1) w.length[w.order[0]] = 1;
    w.max_depth = n;
    return;
  }
  int leaf = 0, front = 0;
  for (int created = 0; created < n - 1; ++created) {
    uint64_t wa, wb;
    const int a = take_lightest(w, n, leaf, front, created, wa);
    const int b = take_lightest(w, n, leaf, front, created, wb);
    w.node_weight[created] = wa + wb;
    w.parent[a] = w.parent[b] = int16_t(n + created);
  }
  // A parent is created after its children: walking down from the root gives
  // every parent's depth before its children's.
  const int root = 2 * n - 2;
  w.depth[root] = 0;
  int max_depth = 0;
  for (int node = root - 1; node >= 0; --node) {
    const int d = w.depth[w.parent[node]] + 1;
    w.depth[node] = uint8_t(d);  // at most n - 1 <= 255
    if (node < n) {
      w.length[w.order[node]] = uint8_t(d);
      max_depth = d > max_depth ? d : max_depth;
    }
  }
  w.max_depth = max_depth;
}

/// Serial: the length-limited Huffman lengths of the loaded weights
/// (w.length). Terminates for max_len >= 8: repeated halving ends at all
/// weights 1, a tree of depth <= 8.
KVCOMP_HD void limited_lengths(LengthWork& w, int max_len) {
  finish_load(w);
  for (;;) {
    sort_serial(w);
    merge_step(w);
    if (w.max_depth <= max_len) return;
    halve_step(w, 0, 1);
  }
}

/// An exact bit count (128 bits: a count near 2^64 times 27 bits still fits).
/// No member initializers: the device keeps these in shared memory.
struct BitTotal {
  uint64_t high, low;
};

/// t += count * per, per < 2^32.
KVCOMP_HD void add_bits(BitTotal& t, uint64_t count, uint32_t per) {
  const uint64_t lo_part = (count & 0xFFFFFFFFu) * per;  // < 2^64
  const uint64_t hi_part = (count >> 32) * per;          // times 2^32
  const uint64_t low = lo_part + (hi_part << 32);
  const uint64_t high = (hi_part >> 32) + (low < lo_part ? 1u : 0u);
  t.low += low;
  t.high += high + (t.low < low ? 1u : 0u);
}

KVCOMP_HD bool fewer_bits(const BitTotal& a, const BitTotal& b) {
  return a.high != b.high ? a.high < b.high : a.low < b.low;
}

/// Bits of the pairs of a histogram (under k) coded with `lengths`. A pair
/// symbol without a codeword is written as PAIR_ESC (format::put_pair); a
/// coded pair symbol costs its codeword and 2k low bits; a PAIR_ESC its
/// codeword and two 8-bit fields. The 32 raw bits that follow a field of 255
/// (an ESC value) are not counted: a histogram of stream symbols does not say
/// how many escaped values a PAIR_ESC holds.
KVCOMP_HD BitTotal total_bits(const uint8_t* lengths, int k, const uint64_t* counts) {
  const uint32_t esc_bits = uint32_t(lengths[format::kPairEscape]) + 2u * format::kFieldBits;
  BitTotal t = {0, 0};
  for (int s = 0; s < kSymbols; ++s) {
    if (!counts[s]) continue;
    const uint32_t per = (s < format::kPairEscape && lengths[s]) ? uint32_t(lengths[s]) + 2u * uint32_t(k) : esc_bits;
    add_bits(t, counts[s], per);
  }
  return t;
}

/// The canonical code of a set of lengths (each <= kMaxCodeLen).
struct CanonicalCode {
  uint16_t count[format::kMaxCodeLen + 1];  // codewords of each length
  uint32_t first[format::kMaxCodeLen + 1];  // first codeword of each length (MSB first)
  uint16_t start[format::kMaxCodeLen + 1];  // where each length begins in by-length symbol order
};

/// Serial.
KVCOMP_HD void canonical_code(const uint8_t* lengths, CanonicalCode& c) {
  for (int l = 0; l <= format::kMaxCodeLen; ++l) c.count[l] = 0;
  for (int s = 0; s < kSymbols; ++s)
    if (lengths[s]) ++c.count[lengths[s]];
  uint32_t code = 0;
  c.first[0] = 0;
  c.start[0] = 0;
  for (int l = 1; l <= format::kMaxCodeLen; ++l) {
    code = (code + c.count[l - 1]) << 1;
    c.first[l] = code;
    c.start[l] = uint16_t(l == 1 ? 0 : c.start[l - 1] + c.count[l - 1]);
  }
}

/// Symbols before s with a codeword of s's length.
KVCOMP_HD int rank_in_length(const uint8_t* lengths, int s) {
  int r = 0;
  for (int t = 0; t < s; ++t) r += lengths[t] == lengths[s] ? 1 : 0;
  return r;
}

/// Strided: the encoder table (bit-reversed codeword | length << 16, 0 = no
/// codeword) and the symbols in (length, symbol) order that lut_entry reads.
KVCOMP_HD void enc_step(const uint8_t* lengths, const CanonicalCode& c, uint32_t* enc, uint8_t* by_length, int lane,
                        int lanes) {
  for (int s = lane; s < kSymbols; s += lanes) {
    const int len = lengths[s];
    if (!len) {
      enc[s] = 0;
      continue;
    }
    const int r = rank_in_length(lengths, s);
    enc[s] = format::reverse_bits(c.first[len] + uint32_t(r), len) | (uint32_t(len) << 16);
    by_length[c.start[len] + r] = uint8_t(s);
  }
}

/// Decode-table entry of `index` (the next kMaxCodeLen stream bits, LSB
/// first) under k low bits: the codeword its low bits start with, found by
/// canonical decoding; 0 where none does (an incomplete code).
KVCOMP_HD uint32_t lut_entry(const CanonicalCode& c, const uint8_t* by_length, int k, uint32_t index) {
  const uint32_t msb_first = format::reverse_bits(index, format::kMaxCodeLen);
  for (int len = 1; len <= format::kMaxCodeLen; ++len) {
    const uint32_t offset = (msb_first >> (format::kMaxCodeLen - len)) - c.first[len];  // wraps below first
    if (offset >= c.count[len]) continue;
    const int s = by_length[c.start[len] + offset];
    // The bits after the codeword: the pair's low bits (k of a, then k of b) and whatever follows.
    if (s == format::kPairEscape || len + 2 * k > format::kMaxCodeLen) return format::lut_slow_entry(s, len);
    const uint32_t after = index >> len, mask = (1u << k) - 1;
    const int lo_a = int(after & mask), lo_b = int((after >> k) & mask);
    return format::lut_fast_entry((s / format::kPairBase) << k | lo_a, (s % format::kPairBase) << k | lo_b,
                                  len + 2 * k);
  }
  return 0;
}

/// Strided: the decode table (kLutSize entries), after enc_step.
KVCOMP_HD void lut_step(const CanonicalCode& c, const uint8_t* by_length, int k, uint32_t* lut, int lane, int lanes) {
  for (int i = lane; i < format::kLutSize; i += lanes) lut[i] = lut_entry(c, by_length, k, uint32_t(i));
}

}  // namespace huffman
}  // namespace kvcomp
