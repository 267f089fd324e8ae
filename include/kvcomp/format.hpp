// kvcomp compressed-block format: the single source of truth.
//
// A block holds T consecutive tokens x D channels of one KV head of one layer,
// either keys (K) or values (V). T is 32, 64 or 128; D is 64, 128 or 256.
//
// Quantization (error bounded, hard guarantee)
//   K blocks are quantized per channel over the block's T tokens (D groups);
//   V blocks per token over the D channels (T groups). For a group with finite
//   min gmin and max gmax (non-finite values are ignored for the range):
//     eb_abs = Relative ? eb * (gmax - gmin) : eb            (fp32)
//     min    = gmin rounded down to fp16 (clamped to +-65504)
//     step   = 2 * eb_abs rounded toward zero to fp16 (clamped to 65504)
//     code   = rint((x - min) / step)                         (fp32, IEEE)
//     recon  = fmaf(code, step, min)                          (fp32, one rounding)
//   A value is stored as the symbol `code` when 0 <= code <= 254, the codebook
//   has a codeword for it, and |recon - x| <= eb_abs. Otherwise it is escaped:
//   the ESC symbol followed by the 32 raw bits of x as fp32. So every input,
//   NaN and Inf included, is representable, and every reconstructed value is
//   within eb_abs of its input (escaped ones are exact).
//
// Entropy coding
//   Canonical Huffman over 256 symbols (codes 0..254, ESC = 255), code lengths
//   limited to kMaxCodeLen = 10 so the decode table (1024 x uint32) fits in
//   shared memory. A codebook is fully described by its 256 code lengths (0 =
//   no codeword); ESC always has one. Codebooks belong to (layer, kv head, K|V)
//   and live in a table; a block names its codebook by id, so a codebook may be
//   rebuilt at any block boundary by adding a new id (old blocks keep theirs).
//   Bits are written LSB first into little-endian 32-bit words; a codeword is
//   stored bit-reversed so the decoder indexes its table with the low bits.
//
// Sub-streams (divergence-free decoding)
//   A block's symbols are split into 32 lane streams of T*D/32 symbols each,
//   so the 32 lanes of a warp decode in lockstep, one symbol per step:
//     K: lane l holds tokens t = l, l+32, ... ; for each, channels 0..D-1.
//     V: lane l holds channels c = l, l+32, ...; order: for each token t,
//        channels l, l+32, ... (so a lane's accumulators stay in registers).
//   Lane streams are concatenated bit-exactly (no padding); their bit lengths
//   are stored, the decoder takes a warp prefix sum to find each start.
//
// Block layout (all little-endian; block start is 16-byte aligned)
//   offset 0   BlockHeader (8 bytes: magic, kind, version, codebook id, checksum)
//   offset 8   params[G]: {uint16 min_fp16, uint16 step_fp16}, G = D (K) or T (V)
//   then       lane_bits[32]: uint16 bit length of each lane stream
//   then       payload: ceil(sum(lane_bits) / 32) uint32 words
//   then       zero padding up to a multiple of 16 bytes
//   The block's byte size is stored outside it (in the block table), so a
//   reader knows it before reading and never reads past it; a decoder checks
//   that the header, params, lane table and payload fit in that size.
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
constexpr int kNumSymbols = 256;    // codes 0..254 and ESC
constexpr int kEscape = 255;        // escape symbol: followed by 32 raw bits
constexpr int kMaxCode = 254;       // largest quantization code
constexpr int kMaxCodeLen = 10;     // Huffman length limit
constexpr int kLutSize = 1 << kMaxCodeLen;
constexpr int kRawBits = 32;        // bits of an escaped value (fp32)
constexpr uint16_t kMagic = 0x4B43; // 'CK'
constexpr uint8_t kVersion = 2;
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
KVCOMP_HD bool supported_head_dim(int d) { return d == 64 || d == 128 || d == 256; }

KVCOMP_HD int num_groups(Kind kind, int tokens, int head_dim) {
  return kind == Kind::Key ? head_dim : tokens;
}
KVCOMP_HD int symbols_per_lane(int tokens, int head_dim) { return tokens * head_dim / kLanes; }
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
/// Largest lane stream: every symbol escaped. Fits uint16 for T <= 128, D <= 256.
KVCOMP_HD uint32_t max_lane_bits(int tokens, int head_dim) {
  return uint32_t(symbols_per_lane(tokens, head_dim)) * (kMaxCodeLen + kRawBits);
}

/// Symbol position -> (token, channel) of lane `lane`'s `i`-th symbol.
KVCOMP_HD void symbol_position(Kind kind, int head_dim, int lane, int i, int& token, int& channel) {
  if (kind == Kind::Key) {
    token = (i / head_dim) * kLanes + lane;
    channel = i % head_dim;
  } else {
    const int per_token = head_dim / kLanes;
    token = i / per_token;
    channel = (i % per_token) * kLanes + lane;
  }
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
  float eb_abs;        // the bound every reconstructed value meets
};

/// Parameters of a group from its finite range; `gmin > gmax` means no finite value.
KVCOMP_HD GroupQuant make_group_quant(float gmin, float gmax, ErrorBound eb) {
  GroupQuant g;
  if (!(gmin <= gmax)) {  // empty group: everything escapes
    g.stored = {0, 0};
    g.min = 0.f; g.step = 0.f; g.eb_abs = 0.f;
    return g;
  }
  g.eb_abs = eb.mode == BoundMode::Relative ? eb.value * (gmax - gmin) : eb.value;
  const float two_eb = 2.0f * g.eb_abs;
  g.stored.min_bits = float_to_half_down(gmin);
  g.stored.step_bits = (two_eb == two_eb && two_eb > 0.f) ? float_to_half_toward_zero(two_eb) : uint16_t(0);
  g.min = half_to_float(g.stored.min_bits);
  g.step = half_to_float(g.stored.step_bits);
  return g;
}

KVCOMP_HD float dequantize(int code, float min, float step) { return fmaf(float(code), step, min); }

/// Quantization code of x (0..254), or kEscape if x must be stored raw.
KVCOMP_HD int quantize(float x, const GroupQuant& g) {
  if (!is_finite_bits(float_bits(x))) return kEscape;
  float qf;
  if (g.step > 0.f) {
    qf = rintf((x - g.min) / g.step);
  } else {
    qf = (x == g.min) ? 0.f : -1.f;
  }
  if (!(qf >= 0.f && qf <= float(kMaxCode))) return kEscape;
  const int q = int(qf);
  const float err = dequantize(q, g.min, g.step) - x;
  return fabsf(err) <= g.eb_abs ? q : kEscape;
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

/// Decode-table entry (32 bits), laid out so the fused kernel needs no
/// integer-to-float conversion: bits 0..3 code length (0 = no codeword),
/// bit 4 set for ESC, bits 5..31 the fp32 bit pattern of float(symbol) (an
/// integer below 256 has its low 16 mantissa bits zero, so it survives).
constexpr uint32_t kLutLengthMask = 0xFu;
constexpr uint32_t kLutEscapeBit = 0x10u;
constexpr uint32_t kLutValueMask = ~0x1Fu;
KVCOMP_HD uint32_t lut_entry(int symbol, int length) {
  return symbol == kEscape ? (kLutEscapeBit | uint32_t(length))
                           : (float_bits(float(symbol)) | uint32_t(length));
}
KVCOMP_HD int lut_length(uint32_t e) { return int(e & kLutLengthMask); }
KVCOMP_HD bool lut_is_escape(uint32_t e) { return (e & kLutEscapeBit) != 0; }
KVCOMP_HD int lut_symbol(uint32_t e) { return lut_is_escape(e) ? kEscape : int(bits_float(e & kLutValueMask)); }

}  // namespace format
}  // namespace kvcomp
