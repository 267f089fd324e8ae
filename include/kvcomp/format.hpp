// kvcomp compressed-block format: the single source of truth.
//
// A block holds T consecutive tokens x D channels of one KV head of one layer,
// either keys (K) or values (V). T is 32, 64 or 128; D is 64, 80, 96, 128 or 256.
//
// Quantization (error bounded, hard guarantee)
//   K blocks are quantized per channel over the block's T tokens (D groups);
//   V blocks per token over the D channels (T groups), except where T > D
//   (128-token blocks of D <= 96): then per channel as K (D groups), the
//   grouping with fewer params (groups_are_channels(); at T 128, D 64 V's
//   params halve and the tiny Llama's perplexity does not change:
//   bench/RESULTS.md, issue 12). For a group with finite min gmin and max
//   gmax (non-finite values are ignored for the range):
//     eb_abs = Relative ? eb * (gmax - gmin) : eb            (fp32)
//     min    = gmin rounded down to fp16 (clamped to +-65504)
//     step   = 2 * eb_abs rounded toward zero to fp16 (clamped to 65504)
//     inv    = 1 / step, 0 if step is 0                      (fp32, IEEE division)
//     code   = rint((x - min) * inv)                          (fp32, IEEE)
//     recon  = fmaf(code, step, min)                          (fp32, one rounding)
//   A value is stored as its `code` when 0 <= code <= 254 and |recon - x| <=
//   eb_abs. Otherwise its code is ESC (255) and it is stored as the 32 raw
//   bits of x as fp32 (see PAIR_ESC below). So every input,
//   NaN and Inf included, is representable, and every reconstructed value is
//   within eb_abs of its input (escaped ones are exact).
//
// Entropy coding (v3: pairs, with low bits)
//   A lane stream is a sequence of PAIRS of codes (two values the fused
//   kernel consumes together, see "Sub-streams"). Each codebook has a
//   low-bit count k in 0..3 (chosen from the data when it is built: small
//   error bounds give many codes, whose low bits are nearly uniform): a code
//   c splits into hi = c >> k and lo = c & (2^k - 1). A pair (a, b) with
//   neither code ESC and both hi parts below kPairBase = 15 is the stream
//   symbol (a >> k) * 15 + (b >> k) (0..224) followed by k raw bits of a's lo
//   and k raw bits of b's lo; any other pair is the symbol PAIR_ESC = 225
//   followed by two 8-bit fields, one per value: the code (0..254), or 255 =
//   ESC followed by the 32 raw bits of x as fp32. Stream symbols are coded
//   with a canonical Huffman code over 256 symbols (226..255 never have a
//   codeword), lengths limited to kMaxCodeLen = 11, so the decode table
//   (2048 x uint32, indexed by the next 11 stream bits) fits in shared memory
//   and one lookup yields two values: a codeword of length L whose pair's low
//   bits also fit (L + 2k <= 11) decodes to both codes at once; a longer one,
//   or PAIR_ESC, is marked for the slow path. A pair symbol with no codeword
//   is written as PAIR_ESC; PAIR_ESC always has one. A codebook is fully
//   described by its 256 code lengths (0 = no codeword) and k; codewords are
//   canonical: assigned in order of (length, symbol), consecutive within a
//   length. Codebooks belong to (layer, kv head, K|V) and live in a table; a
//   block names its codebook by id, so a codebook may be rebuilt at any block
//   boundary by adding a new id (old blocks keep theirs).
//   Bits are written LSB first into little-endian 32-bit words; a codeword is
//   stored bit-reversed so the decoder indexes its table with the low bits;
//   raw low bits, 8-bit fields and raw words are written LSB first as they are.
//   A decoder accepts a PAIR_ESC whose codes could have been a pair symbol
//   (the encoder never writes one).
//
// Sub-streams (divergence-free decoding, in the fused kernel's mma order)
//   A block's values are split into 32 lane streams of T*D/64 pairs each, so
//   the 32 lanes of a warp decode in lockstep, one pair per lookup. The pairs
//   of a lane are the registers of its tensor-core fragments
//   (mma.m16n8k16, PTX ISA), in the order the kernel consumes them. Per
//   32-token chunk, with r = lane / 4 and q = lane % 4 (pair_position() is
//   the definition):
//     K, the B operand (k = 16 channels, n = 8 tokens), two pairs per mma:
//       for k16 in 0..D/16, for n8 in 0..4: token 32 chunk + 8 n8 + r,
//       channels 16 k16 + 2 q + {0, 1}, then the same token, channels + 8;
//     V, the A operand (m = 16 channels, k = 16 tokens), four pairs per mma:
//       for k16 in 0..2, for m16 in 0..D/16, tokens u = 32 chunk + 16 k16 +
//       2 q + {0, 1}: channel 16 m16 + r at u, channel 16 m16 + r + 8 at u,
//       channel 16 m16 + r at u + 8, channel 16 m16 + r + 8 at u + 8.
//   Lane streams are concatenated bit-exactly (no padding); their bit lengths
//   are stored, the decoder takes a warp prefix sum to find each start.
//
// Block layout (all little-endian; block start is 16-byte aligned)
//   offset 0   BlockHeader (8 bytes: magic, kind, version, codebook id, checksum)
//   offset 8   params[G]: {uint16 min_fp16, uint16 step_fp16}, G = num_groups():
//              D (K, and V where T > D; in channel order) or T (V; in token order)
//   then       lane_bits[32]: uint16 bit length of each lane stream
//   then       payload: ceil(sum(lane_bits) / 32) uint32 words
//   then       zero padding up to a multiple of 16 bytes
//   The block's byte size is stored outside it (in the block table), so a
//   reader knows it before reading and never reads past it; a decoder checks
//   that the header, params, lane table and payload fit in that size.
//
// Open tail
//   Tokens of a block not yet closed wait uncompressed in the Cache's tail
//   buffers, in the input's type, or as 8- or 6-bit codes per token vector with
//   Config::tail_format = Codes8 / Codes6: kvcomp/tail_codes.hpp defines those rows
//   (and that a block then quantizes the rows' decoded values).
//
// Pool
//   The K block and V block of one (sequence, layer, kv head, token block) are
//   stored back to back in one device pool. A block-table entry (BlockRef)
//   holds the pair's offset in 16-byte units and both sizes in 16-byte units.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define KVCOMP_HD __host__ __device__ __forceinline__
#else
#define KVCOMP_HD inline
#endif

namespace kvcomp {

enum class Kind : uint8_t { Key = 0, Value = 1 };

/// Error-bound mode: Relative = eb x (max - min) of the quantization group.
enum class BoundMode : uint8_t { Relative = 0, Absolute = 1 };

struct ErrorBound {
  BoundMode mode = BoundMode::Relative;
  float value = 0.05f;
};

namespace format {

constexpr int kLanes = 32;          // sub-streams per block (one warp)
constexpr int kNumSymbols = 256;    // stream symbols (pairs 0..224, PAIR_ESC 225, 226.. unused)
constexpr int kEscape = 255;        // quantizer's escape code: the value is stored as 32 raw bits
constexpr int kMaxCode = 254;       // largest quantization code
constexpr int kPairBase = 15;       // codes 0..14 pair up into one stream symbol
constexpr int kPairSymbols = kPairBase * kPairBase;  // 225 pair symbols
constexpr int kPairEscape = kPairSymbols;            // PAIR_ESC: two 8-bit fields follow
constexpr int kFieldBits = 8;       // one value's code in an escaped pair
constexpr int kMaxLowBits = 3;      // low bits per code sent raw after a pair symbol (k)
constexpr int kLowBitChoices = kMaxLowBits + 1;  // histograms per codebook: one per k
constexpr int kMaxCodeLen = 11;     // Huffman length limit
constexpr int kLutSize = 1 << kMaxCodeLen;
constexpr int kRawBits = 32;        // bits of an escaped value (fp32)
constexpr uint16_t kMagic = 0x4B43; // 'CK'
constexpr uint8_t kVersion = 4;   // 4: V per channel where T > D (3: V always per token)
constexpr size_t kBlockAlign = 16;

struct BlockHeader {
  uint16_t magic;
  uint8_t kind;        // Kind
  uint8_t version;
  uint16_t codebook_id;
  uint16_t checksum;   // checksum16 of codebook_id and bytes [8, size): a 1-bit flip shows
};
static_assert(sizeof(BlockHeader) == 8, "header is 8 bytes");

/// Per-group quantization parameters as stored (fp16 bit patterns).
struct GroupParams {
  uint16_t min_bits;
  uint16_t step_bits;
};
static_assert(sizeof(GroupParams) == 4, "params are 4 bytes");

/// One block-table entry: a K block followed by its V block in the pool.
struct BlockRef {
  uint32_t offset16;   // byte offset of the K block / 16
  uint16_t k_size16;   // K block bytes / 16
  uint16_t v_size16;   // V block bytes / 16
};
static_assert(sizeof(BlockRef) == 8, "block ref is 8 bytes");

KVCOMP_HD bool supported_tokens(int t) { return t == 32 || t == 64 || t == 128; }
KVCOMP_HD bool supported_head_dim(int d) { return d == 64 || d == 80 || d == 96 || d == 128 || d == 256; }

/// Whether a block's groups are its channels (K always; V where it has more
/// tokens than channels) rather than its tokens.
KVCOMP_HD bool groups_are_channels(Kind kind, int tokens, int head_dim) {
  return kind == Kind::Key || tokens > head_dim;
}
KVCOMP_HD int num_groups(Kind kind, int tokens, int head_dim) {
  return groups_are_channels(kind, tokens, head_dim) ? head_dim : tokens;
}
/// The group of the value at (token, channel).
KVCOMP_HD int group_of(Kind kind, int tokens, int head_dim, int token, int channel) {
  return groups_are_channels(kind, tokens, head_dim) ? channel : token;
}
KVCOMP_HD constexpr int pairs_per_lane(int tokens, int head_dim) { return tokens * head_dim / (2 * kLanes); }
constexpr int kChunkTokens = 32;  // the lane order repeats per 32-token chunk
KVCOMP_HD size_t params_offset() { return sizeof(BlockHeader); }
KVCOMP_HD size_t lane_bits_offset(Kind kind, int tokens, int head_dim) {
  return params_offset() + sizeof(GroupParams) * num_groups(kind, tokens, head_dim);
}
KVCOMP_HD size_t payload_offset(Kind kind, int tokens, int head_dim) {
  return lane_bits_offset(kind, tokens, head_dim) + sizeof(uint16_t) * kLanes;
}
KVCOMP_HD size_t block_bytes(Kind kind, int tokens, int head_dim, uint64_t payload_bits) {
  size_t bytes = payload_offset(kind, tokens, head_dim) + 4 * ((payload_bits + 31) / 32);
  return (bytes + kBlockAlign - 1) / kBlockAlign * kBlockAlign;
}
/// Largest lane stream: every pair escaped with two raw values. Fits uint16
/// for T <= 128, D <= 256 (512 pairs x 91 bits).
KVCOMP_HD constexpr uint32_t max_lane_bits(int tokens, int head_dim) {
  return uint32_t(pairs_per_lane(tokens, head_dim)) * (kMaxCodeLen + 2 * (kFieldBits + kRawBits));
}

/// Positions (token, channel) of the two values of lane `lane`'s `i`-th pair
/// (the lane order of "Sub-streams" above; the first value is the fragment
/// register's low half).
KVCOMP_HD void pair_position(Kind kind, int head_dim, int lane, int i, int& t0, int& c0, int& t1, int& c1) {
  const int per_chunk = head_dim / 2;  // pairs per lane per 32-token chunk
  const int chunk = i / per_chunk, r = i % per_chunk;
  const int row = lane / 4, quad = lane % 4;
  if (kind == Kind::Key) {
    const int group = r / 2, half = r % 2;
    const int k16 = group / 4, n8 = group % 4;
    t0 = t1 = kChunkTokens * chunk + 8 * n8 + row;
    c0 = 16 * k16 + 2 * quad + 8 * half;
    c1 = c0 + 1;
  } else {
    const int per_k16 = head_dim / 4;  // pairs per 16 tokens
    const int k16 = r / per_k16, rest = r % per_k16, m16 = rest / 4, j = rest % 4;
    c0 = c1 = 16 * m16 + row + 8 * (j & 1);
    t0 = kChunkTokens * chunk + 16 * k16 + 2 * quad + 8 * (j >> 1);
    t1 = t0 + 1;
  }
}

/// The stream symbol of a pair of quantization codes (0..254 or kEscape)
/// under k low bits.
KVCOMP_HD int pair_symbol(int a, int b, int k = 0) {
  if (a == kEscape || b == kEscape) return kPairEscape;
  const int ha = a >> k, hb = b >> k;
  return (ha < kPairBase && hb < kPairBase) ? ha * kPairBase + hb : kPairEscape;
}

// ---------------------------------------------------------------------------
// Portable fp16/fp32 bit helpers (identical on host and device: bit exactness
// of the store path depends on them, so no intrinsics).

KVCOMP_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
KVCOMP_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
KVCOMP_HD bool is_finite_bits(uint32_t u) { return (u & 0x7F800000u) != 0x7F800000u; }

KVCOMP_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_float(sign | 0x7F800000u | (mant << 13));
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // Subnormal: value = mant * 2^-24, exact in fp32.
  int e = 113;
  while ((mant & 0x400u) == 0) { mant <<= 1; --e; }
  return bits_float(sign | (uint32_t(e) << 23) | ((mant & 0x3FFu) << 13));
}

/// |f| truncated to fp16 magnitude bits (clamped to 65504); sets `inexact`.
KVCOMP_HD uint16_t half_magnitude_trunc(float f, bool& inexact) {
  const uint32_t a = float_bits(f) & 0x7FFFFFFFu;
  if (a >= 0x477FE000u) { inexact = a != 0x477FE000u; return 0x7BFF; }
  const uint32_t exp = a >> 23, mant = a & 0x7FFFFFu;
  if (exp >= 113) { inexact = (mant & 0x1FFFu) != 0; return uint16_t(((exp - 112) << 10) | (mant >> 13)); }
  if (exp == 0) { inexact = a != 0; return 0; }
  const uint32_t m = mant | 0x800000u, shift = 126 - exp;  // shift >= 14
  if (shift >= 32) { inexact = true; return 0; }
  inexact = (m & ((1u << shift) - 1)) != 0;
  return uint16_t(m >> shift);
}

/// Finite f rounded toward -inf to fp16, clamped to [-65504, 65504].
KVCOMP_HD uint16_t float_to_half_down(float f) {
  bool inexact = false;
  uint16_t mag = half_magnitude_trunc(f, inexact);
  const bool neg = (float_bits(f) >> 31) != 0;
  if (neg && inexact && mag != 0x7BFF) ++mag;
  return uint16_t((neg ? 0x8000u : 0u) | mag);
}

/// Non-negative finite f rounded toward zero to fp16, clamped to 65504.
KVCOMP_HD uint16_t float_to_half_toward_zero(float f) {
  bool inexact = false;
  return half_magnitude_trunc(f, inexact);
}

// ---------------------------------------------------------------------------
// The quantizer. Host reference and device kernels call exactly these.

struct GroupQuant {
  GroupParams stored;  // what the block holds
  float min;           // decoded stored min
  float step;          // decoded stored step
  float inv_step;      // 1 / step (0 when step is 0): a multiply per value, not a division
  float eb_abs;        // the bound every reconstructed value meets
};

/// Parameters of a group from its finite range; `gmin > gmax` means no finite value.
KVCOMP_HD GroupQuant make_group_quant(float gmin, float gmax, ErrorBound eb) {
  GroupQuant g;
  if (!(gmin <= gmax)) {  // empty group: everything escapes
    g.stored = {0, 0};
    g.min = 0.f; g.step = 0.f; g.inv_step = 0.f; g.eb_abs = 0.f;
    return g;
  }
  g.eb_abs = eb.mode == BoundMode::Relative ? eb.value * (gmax - gmin) : eb.value;
  const float two_eb = 2.0f * g.eb_abs;
  g.stored.min_bits = float_to_half_down(gmin);
  g.stored.step_bits = (two_eb == two_eb && two_eb > 0.f) ? float_to_half_toward_zero(two_eb) : uint16_t(0);
  g.min = half_to_float(g.stored.min_bits);
  g.step = half_to_float(g.stored.step_bits);
  g.inv_step = g.step > 0.f ? 1.0f / g.step : 0.f;  // step >= 2^-24: no overflow
  return g;
}

KVCOMP_HD float dequantize(int code, float min, float step) { return fmaf(float(code), step, min); }

/// Quantization code of x (0..254), or kEscape if x must be stored raw.
/// Branch-free (the store kernels run it per value): a non-finite x, or one
/// whose code falls outside 0..254, fails the range or the bound test (NaN
/// compares false; an infinite x leaves an infinite error).
KVCOMP_HD int quantize(float x, const GroupQuant& g) {
  // A multiply, not a division: the GPU's IEEE division falls back to an
  // out-of-line subroutine for some operands, in a third of the store
  // kernels' warps (ncu); inv_step is one division per group. With step 0,
  // inv_step is 0: every value tries code 0, which the bound test settles.
  const float r = rintf((x - g.min) * g.inv_step);
  const bool in_range = r >= 0.f && r <= float(kMaxCode);
  const float qf = in_range ? r : 0.f;
  const float err = fmaf(qf, g.step, g.min) - x;  // dequantize(int(qf), ...): qf is a whole number
  return in_range && fabsf(err) <= g.eb_abs ? int(qf) : kEscape;
}

/// Min/max accumulation over finite values only.
KVCOMP_HD void range_add(float x, float& lo, float& hi) {
  if (is_finite_bits(float_bits(x))) { lo = fminf(lo, x); hi = fmaxf(hi, x); }
}
constexpr float kEmptyLo = __builtin_huge_valf();   // identity of fminf
constexpr float kEmptyHi = -__builtin_huge_valf();  // identity of fmaxf

/// Block checksum: ones' complement sum of the 16-bit halves of every 32-bit
/// word after the header, plus the codebook id (as in the Internet checksum). Order-free, so the
/// lanes of a warp can each add the words they write and reduce.
KVCOMP_HD void checksum_add(uint64_t& acc, uint32_t word) { acc += (word & 0xFFFFu) + (word >> 16); }
KVCOMP_HD uint16_t checksum_fold(uint64_t acc) {
  while (acc >> 16) acc = (acc & 0xFFFFu) + (acc >> 16);
  return uint16_t(acc);
}

KVCOMP_HD uint32_t reverse_bits(uint32_t code, int len) {
  uint32_t r = 0;
  for (int i = 0; i < len; ++i) { r = (r << 1) | (code & 1u); code >>= 1; }
  return r;
}

/// Decode-table entry (32 bits), laid out so the fused kernel's tensor-core
/// operand is one AND away and the bits a lookup takes one shift away. Fast
/// entry (not PAIR_ESC, L + 2k <= 11): the two codes of the pair as fp16 bit
/// patterns (low half = first value) of code x kLutCodeUnit: subnormals whose
/// mantissa is code << 2 (bits 2..9 of each half; codes below 256), with
/// bits 28..31 = L + 2k, the bits the pair takes (one LEA.HI adds them to the
/// stream position). Slow entry (PAIR_ESC, or a codeword too long to carry its
/// low bits): bit 16 set, bits 28..31 = L, bits 4..11 = the symbol. No
/// codeword: 0.
constexpr int kLutLengthShift = 28;
constexpr uint32_t kLutEscapeBit = 0x10000u;  // "slow": PAIR_ESC or a long codeword
constexpr uint32_t kLutValueMask = 0x03FC03FCu;
/// The value of code 1 in a fast entry's fp16 halves (2^-22): tensor-core
/// products of them are in these units.
constexpr float kLutCodeUnit = 1.f / 4194304.f;
/// fp16 bit pattern of code x kLutCodeUnit (code < 256).
KVCOMP_HD uint32_t lut_code_half(uint32_t code) { return code << 2; }
// The codes that reach it: a fast entry's (hi part below kPairBase, k low bits) and an escaped pair's fields
// that are not kEscape (so at most kMaxCode).
static_assert((((kPairBase - 1) << kMaxLowBits) | ((1 << kMaxLowBits) - 1)) < 256 && kMaxCode < 256,
              "table codes fit lut_code_half (mantissa code << 2 below the exponent bits)");
KVCOMP_HD uint32_t lut_fast_entry(int a, int b, int bits) {
  return lut_code_half(uint32_t(a)) | (lut_code_half(uint32_t(b)) << 16) | (uint32_t(bits) << kLutLengthShift);
}
KVCOMP_HD uint32_t lut_slow_entry(int symbol, int length) {
  return kLutEscapeBit | (uint32_t(length) << kLutLengthShift) | (uint32_t(symbol) << 4);
}
KVCOMP_HD int lut_length(uint32_t e) { return int(e >> kLutLengthShift); }
KVCOMP_HD bool lut_is_slow(uint32_t e) { return (e & kLutEscapeBit) != 0; }
/// A slow entry's symbol.
KVCOMP_HD int lut_slow_symbol(uint32_t e) { return int((e >> 4) & 0xFFu); }
/// A fast entry's codes.
KVCOMP_HD int lut_first(uint32_t e) { return int((e & kLutValueMask & 0xFFFFu) >> 2); }
KVCOMP_HD int lut_second(uint32_t e) { return int((e & kLutValueMask) >> 18); }

/// Writes one pair (codes a, b of values va, vb) with encoder table `enc`
/// (bit-reversed codeword | length << 16, length 0 = no codeword) and k low
/// bits through put(bits, n), n <= 32. The CPU reference and the GPU store
/// both call this.
template <typename Put>
KVCOMP_HD void put_pair(const uint32_t* enc, int k, int a, int b, float va, float vb, Put&& put) {
  int s = pair_symbol(a, b, k);
  uint32_t e = enc[s];
  if ((e >> 16) == 0) {  // no codeword: the pair goes out escaped
    s = kPairEscape;
    e = enc[kPairEscape];
  }
  if (s != kPairEscape) {
    // The codeword, then the 2k low bits (a's, then b's), in one put: at most
    // kMaxCodeLen + 2 kMaxLowBits = 17 bits.
    const uint32_t len = e >> 16, mask = (1u << k) - 1;
    const uint32_t low = (uint32_t(a) & mask) | ((uint32_t(b) & mask) << k);
    put((e & 0xFFFFu) | (low << len), int(len) + 2 * k);
    return;
  }
  put(e & 0xFFFFu, int(e >> 16));
  put(uint32_t(a), kFieldBits);
  if (a == kEscape) put(float_bits(va), kRawBits);
  put(uint32_t(b), kFieldBits);
  if (b == kEscape) put(float_bits(vb), kRawBits);
}
static_assert(kMaxCodeLen + 2 * kMaxLowBits <= 32, "a pair symbol and its low bits are one put");
/// Bits put_pair writes.
KVCOMP_HD uint32_t pair_bits(const uint32_t* enc, int k, int a, int b) {
  int s = pair_symbol(a, b, k);
  uint32_t e = enc[s];
  if ((e >> 16) == 0) {
    s = kPairEscape;
    e = enc[kPairEscape];
  }
  uint32_t bits = e >> 16;
  if (s == kPairEscape) bits += 2 * kFieldBits + (a == kEscape ? kRawBits : 0) + (b == kEscape ? kRawBits : 0);
  else bits += 2 * uint32_t(k);
  return bits;
}

}  // namespace format
}  // namespace kvcomp
