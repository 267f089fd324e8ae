// The pre-tokenization regexes of byte-level BPE tokenizers, written out by
// hand (no regex library does \p{L} in standard C++):
//
//   GPT-2 (ByteLevel, use_regex):  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   Llama 3 / Qwen2 (Split):       (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
//                                  | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+   (Qwen2: \p{N} alone)
//
// Each alternative is tried in order at the current position, as the regex
// engine does; every character belongs to one of \s, \p{L}, \p{N} or the
// rest, so the pieces tile the text. Character classes work on code points:
// ASCII exactly; beyond ASCII, Unicode white space, Latin-1 / General
// Punctuation symbols and Latin-1 digits are classified, everything else
// counts as a letter (right for English text; CJK punctuation and the like
// would differ from Hugging Face). Host-only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace llama {

enum class SplitStyle {
  Gpt2,    // GPT-2's regex (ByteLevel pre-tokenizer with use_regex)
  Llama3,  // Llama 3's Split regex: numbers in runs of up to 3 digits
  Qwen2,   // Qwen2's Split regex: numbers one digit at a time
};

namespace detail {

enum class CharClass { Space, Letter, Number, Other };

/// Decodes the code point at s[i] (invalid UTF-8: the single byte, as a letter).
inline uint32_t code_point(const std::string& s, size_t i, size_t* len) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  auto cont = [&](size_t k) { return i + k < s.size() && (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80; };
  if (c < 0x80) { *len = 1; return c; }
  if ((c & 0xE0) == 0xC0 && cont(1)) { *len = 2; return (uint32_t(c & 0x1F) << 6) | (s[i + 1] & 0x3F); }
  if ((c & 0xF0) == 0xE0 && cont(1) && cont(2)) {
    *len = 3;
    return (uint32_t(c & 0x0F) << 12) | (uint32_t(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
  }
  if ((c & 0xF8) == 0xF0 && cont(1) && cont(2) && cont(3)) {
    *len = 4;
    return (uint32_t(c & 0x07) << 18) | (uint32_t(s[i + 1] & 0x3F) << 12) | (uint32_t(s[i + 2] & 0x3F) << 6) |
           (s[i + 3] & 0x3F);
  }
  *len = 1;
  return 0xFFFFFFFFu;  // invalid: classified as a letter
}

inline CharClass classify(uint32_t cp) {
  if (cp < 0x80) {
    if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return CharClass::Space;
    if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') return CharClass::Letter;
    if (cp >= '0' && cp <= '9') return CharClass::Number;
    return CharClass::Other;
  }
  if (cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
      cp == 0x202F || cp == 0x205F || cp == 0x3000)
    return CharClass::Space;
  if (cp == 0xB2 || cp == 0xB3 || cp == 0xB9 || (cp >= 0xBC && cp <= 0xBE)) return CharClass::Number;
  if (cp == 0xAA || cp == 0xB5 || cp == 0xBA) return CharClass::Letter;
  if (cp < 0xC0 || cp == 0xD7 || cp == 0xF7) return CharClass::Other;  // C1 controls, Latin-1 symbols
  if (cp >= 0x2010 && cp <= 0x205E) return CharClass::Other;           // dashes, quotes, ellipsis, ...
  return CharClass::Letter;
}

/// The text as code points with their byte offsets and classes.
struct Chars {
  std::vector<size_t> offset;  // offset[n] = text size
  std::vector<uint32_t> cp;
  std::vector<CharClass> cls;
  explicit Chars(const std::string& s) {
    for (size_t i = 0; i < s.size();) {
      size_t len = 1;
      const uint32_t c = code_point(s, i, &len);
      offset.push_back(i);
      cp.push_back(c);
      cls.push_back(classify(c));
      i += len;
    }
    offset.push_back(s.size());
  }
  size_t size() const { return cp.size(); }
};

/// Length (in chars) of a contraction 's 't 're 've 'm 'll 'd at i, or 0.
inline size_t contraction(const Chars& t, size_t i, bool ignore_case) {
  if (t.cp[i] != '\'' || i + 1 >= t.size()) return 0;
  auto lower = [&](size_t k) -> uint32_t {
    if (k >= t.size()) return 0;
    const uint32_t c = t.cp[k];
    return (ignore_case && c >= 'A' && c <= 'Z') ? c + 32 : c;
  };
  const uint32_t a = lower(i + 1), b = lower(i + 2);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  return 0;
}

inline size_t run_of(const Chars& t, size_t i, CharClass c, size_t max_len = SIZE_MAX) {
  size_t j = i;
  while (j < t.size() && t.cls[j] == c && j - i < max_len) ++j;
  return j - i;
}

/// The whitespace alternatives shared by both regexes: \s+(?!\S) | \s+.
inline size_t trailing_space_rule(const Chars& t, size_t i) {
  const size_t k = run_of(t, i, CharClass::Space);
  if (i + k == t.size() || k == 1) return k;  // at the end all of it; a single one before \S: \s+
  return k - 1;                               // leave the last one to prefix the next word
}

inline size_t gpt2_piece(const Chars& t, size_t i) {
  if (size_t c = contraction(t, i, false)) return c;
  const size_t j = i + (t.cp[i] == ' ' ? 1 : 0);  // " ?"
  for (CharClass c : {CharClass::Letter, CharClass::Number, CharClass::Other}) {
    // Without the space " ?" cannot match (a space is not L, N or the rest).
    if (j < t.size() && t.cls[j] == c) return (j - i) + run_of(t, j, c);
  }
  return trailing_space_rule(t, i);
}

inline size_t split_regex_piece(const Chars& t, size_t i, size_t max_digits) {
  if (size_t c = contraction(t, i, true)) return c;
  auto is_newline = [&](size_t k) { return t.cp[k] == '\r' || t.cp[k] == '\n'; };
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (t.cls[i] == CharClass::Letter) return run_of(t, i, CharClass::Letter);
  if (t.cls[i] != CharClass::Number && !is_newline(i) && i + 1 < t.size() && t.cls[i + 1] == CharClass::Letter)
    return 1 + run_of(t, i + 1, CharClass::Letter);
  // \p{N}{1,max}
  if (t.cls[i] == CharClass::Number) return run_of(t, i, CharClass::Number, max_digits);
  //  ?[^\s\p{L}\p{N}]+[\r\n]*
  const size_t j = i + (t.cp[i] == ' ' ? 1 : 0);
  if (j < t.size() && t.cls[j] == CharClass::Other) {
    size_t e = j + run_of(t, j, CharClass::Other);
    while (e < t.size() && is_newline(e)) ++e;
    return e - i;
  }
  // \s*[\r\n]+ : up to the last newline of the whitespace run
  const size_t k = run_of(t, i, CharClass::Space);
  for (size_t p = i + k; p > i; --p)
    if (is_newline(p - 1)) return p - i;
  return trailing_space_rule(t, i);
}

}  // namespace detail

/// Splits text into pre-tokens (byte substrings that BPE merges within).
inline std::vector<std::string> pretokenize(const std::string& text, SplitStyle style) {
  const detail::Chars t(text);
  std::vector<std::string> pieces;
  for (size_t i = 0; i < t.size();) {
    size_t n = 0;
    switch (style) {
      case SplitStyle::Gpt2: n = detail::gpt2_piece(t, i); break;
      case SplitStyle::Llama3: n = detail::split_regex_piece(t, i, 3); break;
      case SplitStyle::Qwen2: n = detail::split_regex_piece(t, i, 1); break;
    }
    pieces.push_back(text.substr(t.offset[i], t.offset[i + n] - t.offset[i]));
    i += n;
  }
  return pieces;
}

}  // namespace llama
