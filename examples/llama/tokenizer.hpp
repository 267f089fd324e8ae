// A byte-level BPE tokenizer read from a Hugging Face tokenizer.json (GPT-2
// style, as the shipped model uses; also the Llama 3 / Qwen2 split regexes).
//
// encode: added tokens (e.g. <|endoftext|>) are matched in the raw text
// first; the rest is pre-tokenized (pretokenize.hpp), each piece's bytes are
// mapped to GPT-2's printable byte alphabet and merged by merge rank, lowest
// first, leftmost on ties (what the Hugging Face BPE model does); a
// TemplateProcessing post-processor's special tokens (e.g. a BOS) are added
// when `add_special` is set, as tokenizers' encode() does by default.
// decode: ids -> token strings -> bytes through the inverse byte alphabet;
// added tokens give their content. Host-only.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "json.hpp"
#include "pretokenize.hpp"

namespace llama {

class Tokenizer {
 public:
  static Tokenizer from_file(const std::string& path) { return Tokenizer(Json::parse_file(path), path); }

  Tokenizer(const Json& j, const std::string& source) : source_(source) {
    build_byte_alphabet();
    read_pre_tokenizer(j);
    if (const Json* n = j.find_value("normalizer"); n && n->at("type").as_string() != "NFC")
      fail("normalizer " + n->at("type").as_string() + " is not supported");  // NFC: a no-op on ASCII text
    if (const Json* d = j.find_value("decoder"); !d || d->at("type").as_string() != "ByteLevel")
      fail("decoder must be ByteLevel (a byte-level BPE tokenizer)");

    const Json& model = j.at("model");
    if (model.at("type").as_string() != "BPE") fail("model type " + model.at("type").as_string() + " is not BPE");
    if (const Json* im = model.find_value("ignore_merges")) ignore_merges_ = im->as_bool();
    for (const auto& [token, id] : model.at("vocab").as_object()) set_token(id.as_int(), token);
    for (const Json& added : j.at("added_tokens").as_array()) {
      const int id = added.at("id").as_int();
      const std::string& content = added.at("content").as_string();
      set_token(id, content);
      added_id_[content] = id;
      if (is_added_.size() <= size_t(id)) is_added_.resize(size_t(id) + 1, false);
      is_added_[size_t(id)] = true;
    }
    // Every byte must have a token of its own, or some text could not be encoded.
    for (int b = 0; b < 256; ++b) {
      auto it = token_id_.find(byte_char_[b]);
      if (it == token_id_.end()) fail("vocab has no token for byte " + std::to_string(b));
      byte_token_[b] = it->second;
    }
    read_merges(model.at("merges"));
    read_post_processor(j.find_value("post_processor"));
  }

  int vocab_size() const { return int(id_token_.size()); }
  /// The id of a token string as tokenizer.json spells it (e.g. "Ġthe"), or -1.
  int token_id(const std::string& token) const {
    auto it = token_id_.find(token);
    return it == token_id_.end() ? -1 : it->second;
  }

  std::vector<int> encode(const std::string& text, bool add_special = true) const {
    std::vector<int> ids;
    if (add_special) ids = prefix_ids_;
    // Split on added tokens (longest match at the earliest position), BPE between them.
    size_t start = 0;
    for (size_t i = 0; i <= text.size();) {
      size_t match_len = 0;
      int match_id = -1;
      if (i < text.size())
        for (const auto& [content, id] : added_id_)
          if (content.size() > match_len && !content.empty() && text.compare(i, content.size(), content) == 0) {
            match_len = content.size();
            match_id = id;
          }
      if (match_len == 0 && i < text.size()) { ++i; continue; }
      encode_ordinary(text.substr(start, i - start), ids);
      if (match_len == 0) break;  // end of text
      ids.push_back(match_id);
      i += match_len;
      start = i;
    }
    if (add_special) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
    return ids;
  }

  /// Whether `id` names a token (a model's embedding may be padded past the vocab).
  bool has_token(int id) const {
    return id >= 0 && size_t(id) < id_token_.size() && (!id_token_[size_t(id)].empty() || is_added(id));
  }
  /// The bytes of token `id` (a piece of UTF-8 that may end mid-character).
  std::string token_bytes(int id) const {
    if (!has_token(id))
      throw std::runtime_error(source_ + ": token id " + std::to_string(id) + " is not in the vocabulary");
    const std::string& tok = id_token_[size_t(id)];
    if (is_added(id)) return tok;
    std::string bytes;
    for (size_t i = 0; i < tok.size();) {
      size_t len = 1;
      const uint32_t cp = detail::code_point(tok, i, &len);
      auto it = char_byte_.find(cp);
      if (it == char_byte_.end()) throw std::runtime_error(source_ + ": token " + std::to_string(id) + " is not byte-level");
      bytes += char(it->second);
      i += len;
    }
    return bytes;
  }

  std::string decode(const std::vector<int>& ids) const {
    std::string out;
    for (int id : ids) out += token_bytes(id);
    return out;
  }

 private:
  std::string source_;
  SplitStyle split_ = SplitStyle::Gpt2;
  bool add_prefix_space_ = false;
  bool ignore_merges_ = false;
  std::string byte_char_[256];                   // byte -> UTF-8 of its printable stand-in
  std::unordered_map<uint32_t, int> char_byte_;  // stand-in code point -> byte
  int byte_token_[256] = {};
  std::unordered_map<std::string, int> token_id_;
  std::vector<std::string> id_token_;
  std::vector<bool> is_added_;
  std::unordered_map<std::string, int> added_id_;
  struct Merge {
    int rank;
    int result;
  };
  std::unordered_map<uint64_t, Merge> merges_;  // (left id << 32 | right id) -> rank, merged id
  std::vector<int> prefix_ids_, suffix_ids_;    // special tokens the post-processor adds
  mutable std::unordered_map<std::string, std::vector<int>> piece_cache_;

  [[noreturn]] void fail(const std::string& what) const { throw std::runtime_error(source_ + ": " + what); }
  bool is_added(int id) const { return size_t(id) < is_added_.size() && is_added_[size_t(id)]; }

  void set_token(int id, const std::string& token) {
    if (id < 0 || id > (1 << 24)) fail("token id " + std::to_string(id) + " out of range");
    if (id_token_.size() <= size_t(id)) id_token_.resize(size_t(id) + 1);
    id_token_[size_t(id)] = token;
    token_id_[token] = id;
  }

  // GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest
  // (controls, space, ...) map to code points 256, 257, ... in byte order.
  void build_byte_alphabet() {
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? uint32_t(b) : uint32_t(next++);
      std::string utf8;
      if (cp < 0x80) {
        utf8 += char(cp);
      } else {
        utf8 += char(0xC0 | (cp >> 6));
        utf8 += char(0x80 | (cp & 0x3F));
      }
      byte_char_[b] = utf8;
      char_byte_[cp] = b;
    }
  }

  void read_pre_tokenizer(const Json& j) {
    const Json* pt = j.find_value("pre_tokenizer");
    if (!pt) fail("no pre_tokenizer (only byte-level BPE tokenizers are supported)");
    const std::string& type = pt->at("type").as_string();
    if (type == "ByteLevel") {
      const Json* use_regex = pt->find_value("use_regex");
      if (use_regex && !use_regex->as_bool()) fail("ByteLevel pre_tokenizer without use_regex is not supported");
      if (const Json* aps = pt->find_value("add_prefix_space")) add_prefix_space_ = aps->as_bool();
      split_ = SplitStyle::Gpt2;
      return;
    }
    // Llama 3 / Qwen2: Sequence [Split(regex, Isolated), ByteLevel(use_regex false)].
    static const std::string kLlama3 =
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
        "\\s+(?!\\S)|\\s+";
    static const std::string kQwen2 =
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
        "\\s+(?!\\S)|\\s+";
    if (type == "Sequence") {
      const auto& seq = pt->at("pretokenizers").as_array();
      if (seq.size() == 2 && seq[0].at("type").as_string() == "Split" && seq[1].at("type").as_string() == "ByteLevel") {
        const Json* regex = seq[0].at("pattern").find_value("Regex");
        const std::string behavior = seq[0].at("behavior").as_string();
        const Json* invert = seq[0].find_value("invert");
        if (regex && behavior == "Isolated" && !(invert && invert->as_bool())) {
          if (regex->as_string() == kLlama3) { split_ = SplitStyle::Llama3; return; }
          if (regex->as_string() == kQwen2) { split_ = SplitStyle::Qwen2; return; }
        }
      }
    }
    fail("pre_tokenizer " + type +
         " is not supported (GPT-2 ByteLevel, or the Llama 3 / Qwen2 split regex); use --prompt-ids");
  }

  void read_merges(const Json& merges) {
    int rank = 0;
    for (const Json& m : merges.as_array()) {
      std::string left, right;
      if (m.is_string()) {  // "left right" (older files)
        const std::string& s = m.as_string();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos) fail("merge \"" + s + "\" has no space");
        left = s.substr(0, sp);
        right = s.substr(sp + 1);
      } else {  // ["left", "right"]
        const auto& pair = m.as_array();
        if (pair.size() != 2) fail("merge #" + std::to_string(rank) + " is not a pair");
        left = pair[0].as_string();
        right = pair[1].as_string();
      }
      const int l = token_id(left), r = token_id(right), result = token_id(left + right);
      if (l < 0 || r < 0 || result < 0) fail("merge \"" + left + " " + right + "\" names a token not in the vocab");
      merges_.emplace((uint64_t(uint32_t(l)) << 32) | uint32_t(r), Merge{rank, result});  // first (lowest) rank wins
      ++rank;
    }
  }

  void read_post_processor(const Json* pp) {
    if (!pp) return;
    const std::string& type = pp->at("type").as_string();
    if (type == "Sequence") {
      for (const Json& p : pp->at("processors").as_array()) read_post_processor(&p);
      return;
    }
    if (type != "TemplateProcessing") return;  // ByteLevel and the like add no tokens
    bool before_sequence = true;
    for (const Json& piece : pp->at("single").as_array()) {
      if (piece.find("Sequence")) { before_sequence = false; continue; }
      const std::string& name = piece.at("SpecialToken").at("id").as_string();
      for (const Json& id : pp->at("special_tokens").at(name).at("ids").as_array())
        (before_sequence ? prefix_ids_ : suffix_ids_).push_back(id.as_int());
    }
  }

  /// Appends the ids of text that holds no added token.
  void encode_ordinary(const std::string& text, std::vector<int>& ids) const {
    if (text.empty()) return;
    const bool prefix = add_prefix_space_ && text[0] != ' ';  // as ByteLevel does, per segment
    for (const std::string& piece : pretokenize(prefix ? " " + text : text, split_)) {
      auto it = piece_cache_.find(piece);
      if (it == piece_cache_.end()) it = piece_cache_.emplace(piece, bpe(piece)).first;
      ids.insert(ids.end(), it->second.begin(), it->second.end());
    }
  }

  /// BPE of one pre-token: start from one token per byte, merge the pair with
  /// the lowest rank (leftmost on ties) until no pair has a merge.
  std::vector<int> bpe(const std::string& piece) const {
    if (ignore_merges_) {  // Llama 3: a piece that is itself a token is taken whole
      std::string mapped;
      for (unsigned char b : piece) mapped += byte_char_[b];
      if (int id = token_id(mapped); id >= 0) return {id};
    }
    std::vector<int> sym;
    for (unsigned char b : piece) sym.push_back(byte_token_[b]);
    for (;;) {
      int best_rank = INT32_MAX, best_result = -1;
      size_t best_at = 0;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = merges_.find((uint64_t(uint32_t(sym[i])) << 32) | uint32_t(sym[i + 1]));
        if (it != merges_.end() && it->second.rank < best_rank) {
          best_rank = it->second.rank;
          best_result = it->second.result;
          best_at = i;
        }
      }
      if (best_result < 0) return sym;
      sym[best_at] = best_result;
      sym.erase(sym.begin() + std::ptrdiff_t(best_at) + 1);
    }
  }
};

}  // namespace llama
