#include "kvcomp/reference.hpp"

#include <algorithm>
#include <cstring>

#include "kvcomp/error.hpp"

namespace kvcomp {
namespace ref {
namespace {

using namespace format;

void check_shape(int tokens, int head_dim) {
  if (!supported_tokens(tokens)) throw Error("block tokens must be 32, 64 or 128, got " + std::to_string(tokens));
  if (!supported_head_dim(head_dim)) throw Error("head_dim must be 64, 80, 96, 128 or 256, got " + std::to_string(head_dim));
}

// Appends bits LSB first into 32-bit words.
class BitWriter {
 public:
  void put(uint32_t bits, int n) {
    acc_ |= uint64_t(bits) << fill_;
    fill_ += n;
    total_ += n;
    if (fill_ >= 32) { words_.push_back(uint32_t(acc_)); acc_ >>= 32; fill_ -= 32; }
  }
  uint64_t total_bits() const { return total_; }
  std::vector<uint32_t> finish() {
    if (fill_ > 0) words_.push_back(uint32_t(acc_));
    acc_ = 0; fill_ = 0;
    return words_;
  }
 private:
  std::vector<uint32_t> words_;
  uint64_t acc_ = 0;
  int fill_ = 0;
  uint64_t total_ = 0;
};

// Reads bits LSB first from [begin, end) of a word array; never past `end`.
class BitReader {
 public:
  BitReader(const uint8_t* words, uint64_t begin, uint64_t end) : w_(words), pos_(begin), end_(end) {}
  // Next n bits (0 <= n <= 32), zero-filled past `end`; does not consume.
  uint32_t peek(int n) const {
    if (n <= 0 || pos_ >= end_) return 0;
    const uint64_t avail = std::min<uint64_t>(uint64_t(n), end_ - pos_);
    const uint64_t first = pos_ >> 3, last = (pos_ + avail - 1) >> 3;  // bytes inside [begin, end)
    uint64_t v = 0;
    for (uint64_t b = first; b <= last; ++b) v |= uint64_t(w_[b]) << (8 * (b - first));
    v >>= (pos_ & 7);
    return uint32_t(v & ((uint64_t(1) << avail) - 1));
  }
  bool consume(int n) {
    if (pos_ + n > end_) return false;
    pos_ += n;
    return true;
  }
  uint64_t pos() const { return pos_; }
 private:
  const uint8_t* w_;
  uint64_t pos_, end_;
};

}  // namespace

std::vector<GroupQuant> block_params(Kind kind, const float* x, int tokens, int head_dim, ErrorBound eb) {
  check_shape(tokens, head_dim);
  const int groups = num_groups(kind, tokens, head_dim);
  std::vector<float> lo(groups, kEmptyLo), hi(groups, kEmptyHi);
  for (int t = 0; t < tokens; ++t)
    for (int c = 0; c < head_dim; ++c) {
      const int g = group_of(kind, tokens, head_dim, t, c);
      range_add(x[size_t(t) * head_dim + c], lo[g], hi[g]);
    }
  std::vector<GroupQuant> params(groups);
  for (int g = 0; g < groups; ++g) params[g] = make_group_quant(lo[g], hi[g], eb);
  return params;
}

namespace {

// Quantization codes (0..254 or kEscape) of every value of a block, row-major.
std::vector<int> block_codes(Kind kind, const float* x, int tokens, int head_dim,
                             const std::vector<GroupQuant>& params) {
  std::vector<int> codes(size_t(tokens) * head_dim);
  for (int t = 0; t < tokens; ++t)
    for (int c = 0; c < head_dim; ++c)
      codes[size_t(t) * head_dim + c] =
          quantize(x[size_t(t) * head_dim + c], params[group_of(kind, tokens, head_dim, t, c)]);
  return codes;
}

}  // namespace

void add_histogram(Kind kind, const float* x, int tokens, int head_dim, ErrorBound eb, uint64_t* counts) {
  const auto params = block_params(kind, x, tokens, head_dim, eb);
  const auto codes = block_codes(kind, x, tokens, head_dim, params);
  const int per_lane = pairs_per_lane(tokens, head_dim);
  for (int lane = 0; lane < kLanes; ++lane)
    for (int i = 0; i < per_lane; ++i) {
      int t0, c0, t1, c1;
      pair_position(kind, head_dim, lane, i, t0, c0, t1, c1);
      const int a = codes[size_t(t0) * head_dim + c0], b = codes[size_t(t1) * head_dim + c1];
      for (int k = 0; k < kLowBitChoices; ++k) ++counts[size_t(k) * kNumSymbols + pair_symbol(a, b, k)];
    }
}

std::vector<uint8_t> encode_block(Kind kind, const float* x, int tokens, int head_dim, ErrorBound eb,
                                  const Codebook& codebook, uint16_t codebook_id) {
  const auto params = block_params(kind, x, tokens, head_dim, eb);
  const auto codes = block_codes(kind, x, tokens, head_dim, params);
  const auto& enc = codebook.tables().enc;
  const int k = codebook.low_bits();
  const int per_lane = pairs_per_lane(tokens, head_dim);

  BitWriter bw;
  auto put = [&bw](uint32_t bits, int n) { bw.put(bits, n); };
  uint16_t lane_bits[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) {
    const uint64_t start = bw.total_bits();
    for (int i = 0; i < per_lane; ++i) {
      int t0, c0, t1, c1;
      pair_position(kind, head_dim, lane, i, t0, c0, t1, c1);
      const size_t i0 = size_t(t0) * head_dim + c0, i1 = size_t(t1) * head_dim + c1;
      put_pair(enc, k, codes[i0], codes[i1], x[i0], x[i1], put);
    }
    const uint64_t bits = bw.total_bits() - start;
    if (bits > max_lane_bits(tokens, head_dim)) throw Error("encode_block: lane stream longer than max_lane_bits");
    lane_bits[lane] = uint16_t(bits);
  }
  const uint64_t payload_bits = bw.total_bits();
  const std::vector<uint32_t> payload = bw.finish();

  std::vector<uint8_t> out(block_bytes(kind, tokens, head_dim, payload_bits), 0);
  BlockHeader h{kMagic, uint8_t(kind), kVersion, codebook_id, 0};
  for (size_t g = 0; g < params.size(); ++g)
    std::memcpy(&out[params_offset() + 4 * g], &params[g].stored, 4);
  std::memcpy(&out[lane_bits_offset(kind, tokens, head_dim)], lane_bits, sizeof(lane_bits));
  std::memcpy(&out[payload_offset(kind, tokens, head_dim)], payload.data(), 4 * payload.size());
  uint64_t sum = codebook_id;
  for (size_t off = sizeof(BlockHeader); off < out.size(); off += 4) {
    uint32_t w;
    std::memcpy(&w, &out[off], 4);
    checksum_add(sum, w);
  }
  h.checksum = checksum_fold(sum);
  std::memcpy(out.data(), &h, sizeof(h));
  return out;
}

const char* to_string(DecodeStatus s) {
  switch (s) {
    case DecodeStatus::Ok: return "ok";
    case DecodeStatus::TooSmall: return "block too small for its header, params and lane table";
    case DecodeStatus::BadHeader: return "bad block header (magic, version or kind)";
    case DecodeStatus::BadChecksum: return "block checksum mismatch";
    case DecodeStatus::LaneOverflow: return "lane lengths do not match the block size";
    case DecodeStatus::BadCode: return "bits match no codeword";
    case DecodeStatus::LengthMismatch: return "lane stream length mismatch";
  }
  return "unknown";
}

DecodeStatus decode_block(const uint8_t* data, size_t size, Kind kind, int tokens, int head_dim,
                          const Codebook& codebook, float* out, uint16_t* codebook_id) {
  check_shape(tokens, head_dim);
  const size_t payload_at = payload_offset(kind, tokens, head_dim);
  if (size < payload_at || size % 4 != 0) return DecodeStatus::TooSmall;
  BlockHeader h;
  std::memcpy(&h, data, sizeof(h));
  if (h.magic != kMagic || h.version != kVersion || h.kind != uint8_t(kind)) return DecodeStatus::BadHeader;
  uint64_t sum = h.codebook_id;
  for (size_t off = sizeof(BlockHeader); off < size; off += 4) {
    uint32_t w;
    std::memcpy(&w, data + off, 4);
    checksum_add(sum, w);
  }
  if (checksum_fold(sum) != h.checksum) return DecodeStatus::BadChecksum;
  if (codebook_id) *codebook_id = h.codebook_id;

  const int groups = num_groups(kind, tokens, head_dim);
  std::vector<float> gmin(groups), gstep(groups);
  for (int g = 0; g < groups; ++g) {
    GroupParams p;
    std::memcpy(&p, data + params_offset() + 4 * g, 4);
    gmin[g] = half_to_float(p.min_bits);
    gstep[g] = half_to_float(p.step_bits);
  }
  uint16_t lane_bits[kLanes];
  std::memcpy(lane_bits, data + lane_bits_offset(kind, tokens, head_dim), sizeof(lane_bits));
  uint64_t start = 0;
  for (int lane = 0; lane < kLanes; ++lane) start += lane_bits[lane];
  // The size is exactly what the lane lengths imply: a cut block never passes.
  if (block_bytes(kind, tokens, head_dim, start) != size) return DecodeStatus::LaneOverflow;

  const auto& lut = codebook.tables().lut;
  const int low = codebook.low_bits();
  const uint32_t low_mask = (1u << low) - 1;
  const uint8_t* payload = data + payload_at;
  const int per_lane = pairs_per_lane(tokens, head_dim);
  start = 0;
  for (int lane = 0; lane < kLanes; ++lane) {
    BitReader br(payload, start, start + lane_bits[lane]);
    for (int i = 0; i < per_lane; ++i) {
      const uint32_t e = lut[br.peek(kMaxCodeLen)];
      // Fast entry: L + 2k bits (codeword and low bits); slow entry: L bits.
      const int len = lut_length(e);
      if (len == 0 || !br.consume(len)) return DecodeStatus::BadCode;
      int t[2], c[2];
      pair_position(kind, head_dim, lane, i, t[0], c[0], t[1], c[1]);
      int code[2];
      if (!lut_is_slow(e)) {
        code[0] = lut_first(e);
        code[1] = lut_second(e);
      } else if (lut_slow_symbol(e) != kPairEscape) {
        // A codeword too long to carry its low bits: k raw bits of a, then k of b.
        const int s = lut_slow_symbol(e);
        if (s >= kPairSymbols) return DecodeStatus::BadCode;  // no codebook makes one
        const uint32_t lo = br.peek(2 * low);
        if (!br.consume(2 * low)) return DecodeStatus::BadCode;
        code[0] = (s / kPairBase) << low | int(lo & low_mask);
        code[1] = (s % kPairBase) << low | int((lo >> low) & low_mask);
      } else {
        // PAIR_ESC: per value an 8-bit field, the code or 255 = ESC + 32 raw bits.
        for (int v = 0; v < 2; ++v) {
          const int field = int(br.peek(kFieldBits));
          if (!br.consume(kFieldBits)) return DecodeStatus::BadCode;
          if (field == kEscape) {
            const uint32_t raw = br.peek(kRawBits);
            if (!br.consume(kRawBits)) return DecodeStatus::BadCode;
            out[size_t(t[v]) * head_dim + c[v]] = bits_float(raw);
            code[v] = kEscape;
          } else {
            code[v] = field;
          }
        }
      }
      for (int v = 0; v < 2; ++v) {
        if (code[v] == kEscape) continue;  // stored raw above
        const int g = group_of(kind, tokens, head_dim, t[v], c[v]);
        out[size_t(t[v]) * head_dim + c[v]] = dequantize(code[v], gmin[g], gstep[g]);
      }
    }
    if (br.pos() != start + lane_bits[lane]) return DecodeStatus::LengthMismatch;
    start += lane_bits[lane];
  }
  return DecodeStatus::Ok;
}

}  // namespace ref
}  // namespace kvcomp
