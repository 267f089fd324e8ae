// CPU reference codec: the oracle the GPU store path and fused kernel are
// compared with, bit for bit. Written for clarity, not speed.
//
// Inputs are row-major T x D fp32 arrays (half and bfloat16 convert to fp32
// exactly, see dtype.hpp), one block of one KV head.
#pragma once

#include <cstdint>
#include <vector>

#include "kvcomp/codebook.hpp"
#include "kvcomp/format.hpp"

namespace kvcomp {
namespace ref {

/// Quantization parameters of every group of a block (format::num_groups: D for K, T or D for V).
std::vector<format::GroupQuant> block_params(Kind kind, const float* x, int tokens, int head_dim,
                                             ErrorBound eb);

/// Adds the block's stream symbols (codebook-independent) under every low-bit
/// count k to counts[kLowBitChoices][kNumSymbols] (4 x 256 counts, row k at
/// counts + k * kNumSymbols; every caller must pass all of them): per pair of
/// every lane and per k, format::pair_symbol(a, b, k) of its two quantization
/// codes (PAIR_ESC where a code is ESC or its hi part a >> k is >= 15). The
/// input of Codebook::from_histograms (row k alone: of from_histogram(.., k)).
void add_histogram(Kind kind, const float* x, int tokens, int head_dim, ErrorBound eb, uint64_t* counts);

/// Encodes one block in the format of format.hpp: lanes 0..31, each pair in
/// format::pair_position order written by format::put_pair with the
/// codebook's low-bit count (as the GPU store).
std::vector<uint8_t> encode_block(Kind kind, const float* x, int tokens, int head_dim, ErrorBound eb,
                                  const Codebook& codebook, uint16_t codebook_id);

enum class DecodeStatus {
  Ok = 0,
  TooSmall,        // size cannot hold header, params and lane table
  BadHeader,       // magic, version or kind do not match
  BadChecksum,     // content changed after encoding
  LaneOverflow,    // lane bit lengths do not match the block size
  BadCode,         // bits that match no codeword, or a codeword/low bits/field/raw word past the lane's end
  LengthMismatch,  // a lane's pairs did not end exactly at its stored length
};
const char* to_string(DecodeStatus s);

/// Decodes one block of `size` bytes into out[T x D]; reads only [data, data+size).
/// On error `out` holds partial results and must not be used.
DecodeStatus decode_block(const uint8_t* data, size_t size, Kind kind, int tokens, int head_dim,
                          const Codebook& codebook, float* out, uint16_t* codebook_id = nullptr);

}  // namespace ref
}  // namespace kvcomp
