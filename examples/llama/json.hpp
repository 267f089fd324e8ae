// A minimal JSON reader, enough for a Hugging Face checkpoint: config.json,
// the safetensors header and tokenizer.json. No dependencies; host-only.
//
//   llama::Json j = llama::Json::parse(text, "config.json");
//   int layers = j.at("num_hidden_layers").as_int();
//
// Errors throw std::runtime_error naming the source, line and column, or the
// key / type that was expected.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace llama {

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };
  using Members = std::vector<std::pair<std::string, Json>>;  // file order kept

  Json() = default;
  static Json parse(const std::string& text, const std::string& source);
  static Json parse_file(const std::string& path);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  bool as_bool() const { expect(Type::Bool); return bool_; }
  double as_double() const { expect(Type::Number); return number_; }
  /// The number as an integer; throws if it has a fraction or does not fit.
  int64_t as_int64() const {
    expect(Type::Number);
    if (number_ != std::floor(number_) || std::fabs(number_) > 9007199254740992.0)
      throw std::runtime_error(where() + "expected an integer, got " + std::to_string(number_));
    return int64_t(number_);
  }
  int as_int() const {
    const int64_t v = as_int64();
    if (v < INT32_MIN || v > INT32_MAX) throw std::runtime_error(where() + "integer " + std::to_string(v) + " out of range");
    return int(v);
  }
  const std::string& as_string() const { expect(Type::String); return string_; }
  const std::vector<Json>& as_array() const { expect(Type::Array); return array_; }
  const Members& as_object() const { expect(Type::Object); return object_; }

  /// Member `key` of an object, or nullptr when absent.
  const Json* find(const std::string& key) const {
    expect(Type::Object);
    for (const auto& m : object_)
      if (m.first == key) return &m.second;
    return nullptr;
  }
  /// Member `key` of an object; throws naming the key when absent.
  const Json& at(const std::string& key) const {
    const Json* j = find(key);
    if (!j) throw std::runtime_error(where() + "missing key \"" + key + "\"");
    return *j;
  }
  /// Member `key` when present and not null, else nullptr (optional fields).
  const Json* find_value(const std::string& key) const {
    const Json* j = find(key);
    return (j && !j->is_null()) ? j : nullptr;
  }

  static const char* type_name(Type t) {
    switch (t) {
      case Type::Null: return "null";
      case Type::Bool: return "bool";
      case Type::Number: return "number";
      case Type::String: return "string";
      case Type::Array: return "array";
      case Type::Object: return "object";
    }
    return "?";
  }

 private:
  class Parser;
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0;
  std::string string_;
  std::vector<Json> array_;
  Members object_;
  std::shared_ptr<const std::string> source_;  // for messages about values, shared by a document

  std::string where() const { return (source_ ? *source_ : std::string("json")) + ": "; }
  void expect(Type t) const {
    if (type_ != t)
      throw std::runtime_error(where() + "expected " + type_name(t) + ", got " + type_name(type_));
  }
};

class Json::Parser {
 public:
  Parser(const std::string& text, std::shared_ptr<const std::string> source) : s_(text), source_(std::move(source)) {}

  Json document() {
    skip_space();
    Json j = value(0);
    skip_space();
    if (pos_ != s_.size()) fail("unexpected characters after the JSON value");
    return j;
  }

 private:
  static constexpr int kMaxDepth = 256;  // deep enough for any real file, bounded for malformed ones
  const std::string& s_;
  std::shared_ptr<const std::string> source_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < pos_ && i < s_.size(); ++i) {
      if (s_[i] == '\n') { ++line; col = 1; } else { ++col; }
    }
    throw std::runtime_error(*source_ + ": line " + std::to_string(line) + " column " + std::to_string(col) + ": " + what);
  }
  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }
  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  void literal(const char* word) {
    for (const char* c = word; *c; ++c, ++pos_)
      if (pos_ >= s_.size() || s_[pos_] != *c) fail(std::string("invalid literal, expected \"") + word + "\"");
  }

  Json make(Type t) const {
    Json j;
    j.type_ = t;
    j.source_ = source_;
    return j;
  }

  Json value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth));
    if (pos_ >= s_.size()) fail("unexpected end of input, expected a value");
    const char c = s_[pos_];
    if (c == '{') return object(depth);
    if (c == '[') return array(depth);
    if (c == '"') { Json j = make(Type::String); j.string_ = string(); return j; }
    if (c == 't') { literal("true"); Json j = make(Type::Bool); j.bool_ = true; return j; }
    if (c == 'f') { literal("false"); Json j = make(Type::Bool); j.bool_ = false; return j; }
    if (c == 'n') { literal("null"); return make(Type::Null); }
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    fail(std::string("unexpected character '") + c + "'");
  }

  Json object(int depth) {
    Json j = make(Type::Object);
    ++pos_;  // '{'
    skip_space();
    if (peek() == '}') { ++pos_; return j; }
    for (;;) {
      skip_space();
      if (peek() != '"') fail("expected a string key in object");
      std::string key = string();
      skip_space();
      if (peek() != ':') fail("expected ':' after object key \"" + key + "\"");
      ++pos_;
      skip_space();
      j.object_.emplace_back(std::move(key), value(depth + 1));
      skip_space();
      if (peek() == ',') { ++pos_; continue; }
      if (peek() == '}') { ++pos_; return j; }
      fail("expected ',' or '}' in object");
    }
  }

  Json array(int depth) {
    Json j = make(Type::Array);
    ++pos_;  // '['
    skip_space();
    if (peek() == ']') { ++pos_; return j; }
    for (;;) {
      skip_space();
      j.array_.push_back(value(depth + 1));
      skip_space();
      if (peek() == ',') { ++pos_; continue; }
      if (peek() == ']') { ++pos_; return j; }
      fail("expected ',' or ']' in array");
    }
  }

  Json number() {
    // Validate the JSON grammar first (strtod alone would accept "0x1F", "inf", " 1").
    const size_t start = pos_;
    auto digits = [&] {
      const size_t d = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      return pos_ - d;
    };
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
    } else if (digits() == 0) {
      fail("invalid number");
    }
    if (peek() == '.') {
      ++pos_;
      if (digits() == 0) fail("invalid number: no digits after '.'");
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (digits() == 0) fail("invalid number: no digits in exponent");
    }
    Json j = make(Type::Number);
    j.number_ = std::strtod(s_.substr(start, pos_ - start).c_str(), nullptr);
    return j;
  }

  unsigned hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= unsigned(c - '0');
      else if (c >= 'a' && c <= 'f') v |= unsigned(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= unsigned(c - 'A' + 10);
      else fail("invalid hex digit in \\u escape");
    }
    return v;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  /// A string at pos_ (on its opening quote), unescaped to UTF-8.
  std::string string() {
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (pos_ >= s_.size()) fail("unterminated string");
      const char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) { --pos_; fail("control character in string (must be escaped)"); }
      if (c != '\\') { out += c; continue; }
      if (pos_ >= s_.size()) fail("unterminated escape in string");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // high surrogate: a low one must follow
            if (pos_ + 2 > s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u')
              fail("high surrogate \\u escape without a low surrogate");
            pos_ += 2;
            const uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("high surrogate followed by a non-low-surrogate \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("lone low surrogate \\u escape");
          }
          append_utf8(out, cp);
          break;
        }
        default: --pos_; fail(std::string("invalid escape '\\") + e + "' in string");
      }
    }
  }
};

inline Json Json::parse(const std::string& text, const std::string& source) {
  Parser p(text, std::make_shared<const std::string>(source));
  return p.document();
}

inline Json Json::parse_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open file");
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw std::runtime_error(path + ": read error");
  return parse(ss.str(), path);
}

}  // namespace llama
