// CPU tests of examples/llama's host code: the JSON reader, fp16 conversion,
// the safetensors reader (on the shipped model and on corrupt files), the
// config checks and the byte-level BPE tokenizer.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "examples/llama/config.hpp"
#include "examples/llama/half_bits.hpp"
#include "examples/llama/json.hpp"
#include "examples/llama/pretokenize.hpp"
#include "examples/llama/safetensors.hpp"
#include "examples/llama/tokenizer.hpp"

#ifndef KVCOMP_TEST_MODEL_DIR
#error "KVCOMP_TEST_MODEL_DIR must name models/tiny-llama-hd64"
#endif

namespace {

using llama::Json;

const std::string kModelDir = KVCOMP_TEST_MODEL_DIR;

/// The message of the std::runtime_error that f throws ("" if none).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

// ---------------------------------------------------------------- JSON

TEST(LlamaJson, ParsesNestedValues) {
  const Json j = Json::parse(R"({"a": [1, -2.5e2, true, false, null, {"b": "c"}], "d": {}, "e": [], "n": 0})", "t.json");
  const auto& a = j.at("a").as_array();
  ASSERT_EQ(a.size(), 6u);
  EXPECT_EQ(a[0].as_int(), 1);
  EXPECT_DOUBLE_EQ(a[1].as_double(), -250.0);
  EXPECT_TRUE(a[2].as_bool());
  EXPECT_FALSE(a[3].as_bool());
  EXPECT_TRUE(a[4].is_null());
  EXPECT_EQ(a[5].at("b").as_string(), "c");
  EXPECT_TRUE(j.at("d").as_object().empty());
  EXPECT_TRUE(j.at("e").as_array().empty());
  EXPECT_EQ(j.at("n").as_int64(), 0);
  EXPECT_EQ(j.find("missing"), nullptr);
  EXPECT_EQ(j.find_value("missing"), nullptr);
  EXPECT_EQ(j.as_object().front().first, "a");  // file order kept
}

TEST(LlamaJson, UnescapesStrings) {
  const Json j = Json::parse(R"(["q\"b\\s\/\b\f\n\r\t", "\u00e9\u20ac", "\ud83d\ude00", "Ġthe", "\u0000x"])", "t.json");
  const auto& a = j.as_array();
  EXPECT_EQ(a[0].as_string(), "q\"b\\s/\b\f\n\r\t");
  EXPECT_EQ(a[1].as_string(), "\xC3\xA9\xE2\x82\xAC");          // é €
  EXPECT_EQ(a[2].as_string(), "\xF0\x9F\x98\x80");              // U+1F600 from a surrogate pair
  EXPECT_EQ(a[3].as_string(), "\xC4\xA0the");                    // raw UTF-8 passes through
  EXPECT_EQ(a[4].as_string(), std::string("\0x", 2));
}

TEST(LlamaJson, RejectsMalformedInputWithItsPosition) {
  const char* bad[] = {"",        "{",           "[1,]",        "{\"a\" 1}",   "{\"a\":1,}",  "\"abc",
                       "tru",     "nul",         "01",          "1.",          "-",           "1e",
                       "[1 2]",   "{} x",        "\"\\x\"",     "\"\\u12\"",   "\"\\ud800\"", "\"\\ud800\\u0041\"",
                       "\"\\udc00\"", "\"a\nb\"", "{1: 2}",      "[\"a\" : 1]", "+1",          "NaN"};
  for (const char* text : bad) {
    const std::string msg = error_of([&] { Json::parse(text, "bad.json"); });
    EXPECT_NE(msg, "") << "accepted: " << text;
    EXPECT_NE(msg.find("bad.json: line 1 column"), std::string::npos) << msg;
  }
  const std::string deep(1000, '[');
  EXPECT_NE(error_of([&] { Json::parse(deep, "deep.json"); }).find("nesting deeper"), std::string::npos);
  const std::string msg = error_of([] { Json::parse("{\n  \"a\": [1,\n  2,,]\n}", "multi.json"); });
  EXPECT_NE(msg.find("multi.json: line 3 column 5"), std::string::npos) << msg;
}

TEST(LlamaJson, TypeAndKeyErrorsNameTheSource) {
  const Json j = Json::parse(R"({"x": 1.5, "s": "str"})", "cfg.json");
  EXPECT_NE(error_of([&] { j.at("nope"); }).find("cfg.json: missing key \"nope\""), std::string::npos);
  EXPECT_NE(error_of([&] { j.at("x").as_int(); }).find("expected an integer"), std::string::npos);
  EXPECT_NE(error_of([&] { j.at("s").as_array(); }).find("cfg.json: expected array, got string"), std::string::npos);
  EXPECT_NE(error_of([] { Json::parse_file("/nonexistent/x.json"); }).find("/nonexistent/x.json: cannot open"),
            std::string::npos);
}

// ---------------------------------------------------------------- fp16 conversion

TEST(LlamaHalf, EveryHalfRoundTripsThroughFloat) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = llama::half_bits_to_float(uint16_t(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(((h >> 10) & 0x1F) == 0x1F && (h & 0x3FF));
      EXPECT_TRUE(std::isnan(llama::half_bits_to_float(llama::float_to_half_bits(f))));
      continue;
    }
    ASSERT_EQ(llama::float_to_half_bits(f), h) << "half 0x" << std::hex << h;
  }
}

TEST(LlamaHalf, RoundsToNearestEvenAndSaturatesToInf) {
  EXPECT_EQ(llama::float_to_half_bits(1.0f), 0x3C00);
  EXPECT_EQ(llama::float_to_half_bits(-2.0f), 0xC000);
  EXPECT_EQ(llama::float_to_half_bits(65504.f), 0x7BFF);
  EXPECT_EQ(llama::float_to_half_bits(65519.f), 0x7BFF);
  EXPECT_EQ(llama::float_to_half_bits(65520.f), 0x7C00);  // the tie rounds to even: inf
  EXPECT_EQ(llama::float_to_half_bits(-1e9f), 0xFC00);
  EXPECT_EQ(llama::float_to_half_bits(1.0f + 1.0f / 2048), 0x3C00);        // tie -> even
  EXPECT_EQ(llama::float_to_half_bits(1.0f + 3.0f / 2048), 0x3C02);        // tie -> even (up)
  EXPECT_EQ(llama::float_to_half_bits(std::ldexp(1.f, -24)), 0x0001);       // smallest subnormal
  EXPECT_EQ(llama::float_to_half_bits(std::ldexp(1.f, -25)), 0x0000);       // tie -> even (zero)
  EXPECT_EQ(llama::float_to_half_bits(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(llama::float_to_half_bits(std::ldexp(1.f, -14)), 0x0400);       // smallest normal
  EXPECT_EQ(llama::float_to_half_bits(std::ldexp(1023.5f, -24)), 0x0400);   // subnormal rounds up to normal
  EXPECT_FLOAT_EQ(llama::bf16_bits_to_float(0x3FC0), 1.5f);
}

// ---------------------------------------------------------------- safetensors

std::string temp_path(const std::string& name) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir && *dir ? dir : "/tmp") + "/kvcomp_llama_test_" + std::to_string(::getpid()) + "_" + name;
}

/// Writes a safetensors file: header JSON (with its length prefix) + data.
std::string write_safetensors(const std::string& name, const std::string& header, const std::string& data,
                              int64_t claimed_header_len = -1) {
  const std::string path = temp_path(name);
  std::ofstream f(path, std::ios::binary);
  const uint64_t len = claimed_header_len >= 0 ? uint64_t(claimed_header_len) : header.size();
  for (int i = 0; i < 8; ++i) f.put(char((len >> (8 * i)) & 0xFF));
  f << header << data;
  return path;
}

TEST(LlamaSafetensors, ShippedModelMatchesItsConfig) {
  const llama::ModelConfig c = llama::ModelConfig::from_dir(kModelDir);
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.hidden, 512);
  EXPECT_EQ(c.layers, 6);
  EXPECT_EQ(c.q_heads, 8);
  EXPECT_EQ(c.kv_heads, 2);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.intermediate, 768);
  EXPECT_EQ(c.vocab, 4096);
  EXPECT_EQ(c.max_positions, 1024);
  EXPECT_EQ(c.context, 1024);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-6f);
  EXPECT_FLOAT_EQ(c.rope_theta, 10000.f);

  llama::Checkpoint ck(kModelDir);
  const int64_t H = c.hidden, Q = c.q_heads * c.head_dim, KV = c.kv_heads * c.head_dim, I = c.intermediate, V = c.vocab;
  std::map<std::string, std::vector<int64_t>> expected = {
      {"model.embed_tokens.weight", {V, H}}, {"model.norm.weight", {H}}, {"lm_head.weight", {V, H}}};
  for (int l = 0; l < c.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    expected[p + "input_layernorm.weight"] = {H};
    expected[p + "post_attention_layernorm.weight"] = {H};
    expected[p + "self_attn.q_proj.weight"] = {Q, H};
    expected[p + "self_attn.k_proj.weight"] = {KV, H};
    expected[p + "self_attn.v_proj.weight"] = {KV, H};
    expected[p + "self_attn.o_proj.weight"] = {H, Q};
    expected[p + "mlp.gate_proj.weight"] = {I, H};
    expected[p + "mlp.up_proj.weight"] = {I, H};
    expected[p + "mlp.down_proj.weight"] = {H, I};
  }
  EXPECT_EQ(ck.names().size(), expected.size());
  for (const auto& [name, shape] : expected) {
    ASSERT_TRUE(ck.has(name)) << name;
    const llama::TensorInfo& t = ck.info(name);
    EXPECT_EQ(t.shape, shape) << name;
    EXPECT_EQ(t.dtype, llama::TensorDType::F16) << name;
    EXPECT_EQ(t.bytes, uint64_t(t.numel()) * 2) << name;
  }
  // A weight reads back as finite fp16 values, and a wrong expected shape is refused.
  const std::vector<uint16_t> norm = ck.load_fp16("model.norm.weight", {H});
  ASSERT_EQ(norm.size(), size_t(H));
  for (uint16_t h : norm) EXPECT_TRUE(std::isfinite(llama::half_bits_to_float(h)));
  EXPECT_NE(error_of([&] { ck.load_fp16("model.norm.weight", {H + 1}); }).find("has shape [512], expected [513]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ck.load_fp16("model.nope", {1}); }).find("no tensor \"model.nope\""), std::string::npos);
  EXPECT_NE(error_of([] { llama::Checkpoint("/nonexistent"); }).find("neither model.safetensors"), std::string::npos);
}

TEST(LlamaSafetensors, ConvertsBf16AndF32ToFp16) {
  // a: F32 [2] = {1.5, 1e6 (overflows fp16)}, b: BF16 [3] = {1.5, -2, 0}, c: F16 [1] = 1.
  std::string data;
  auto put = [&](const void* p, size_t n) { data.append(static_cast<const char*>(p), n); };
  const float f32[2] = {1.5f, 1e6f};
  const uint16_t bf16[3] = {0x3FC0, 0xC000, 0x0000}, f16[1] = {0x3C00};
  put(f32, 8);
  put(bf16, 6);
  put(f16, 2);
  const std::string header = R"({"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                             R"( "b": {"dtype": "BF16", "shape": [3], "data_offsets": [8, 14]},)"
                             R"( "c": {"dtype": "F16", "shape": [1, 1], "data_offsets": [14, 16]}})";
  const std::string path = write_safetensors("ok.safetensors", header, data);
  llama::SafetensorsFile f(path);
  EXPECT_EQ(f.tensors().size(), 3u);
  size_t overflows = 0;
  EXPECT_EQ(f.read_fp16(*f.find("a"), &overflows), (std::vector<uint16_t>{0x3E00, 0x7C00}));
  EXPECT_EQ(overflows, 1u);
  EXPECT_EQ(f.read_fp16(*f.find("b"), &overflows), (std::vector<uint16_t>{0x3E00, 0xC000, 0x0000}));
  EXPECT_EQ(f.read_fp16(*f.find("c"), &overflows), (std::vector<uint16_t>{0x3C00}));
  EXPECT_EQ(overflows, 1u);
  std::remove(path.c_str());
}

TEST(LlamaSafetensors, CorruptFilesGiveClearErrors) {
  const std::string good_entry = R"("w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]})";
  struct Case {
    std::string name, header, data;
    int64_t claimed_len;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"len.st", "{" + good_entry + "}", "abcd", 1 << 20, "runs past the end of the file"},
      {"trunc.st", "{\"w\": {\"dtype\": \"F16\", \"sha", "", -1, "(header): line 1 column"},
      {"notobj.st", "[1, 2]", "", -1, "header is not a JSON object"},
      {"past.st", "{" + good_entry + "}", "ab", -1, "past the end of the data"},
      {"order.st", R"({"w": {"dtype": "F16", "shape": [2], "data_offsets": [4, 0]}})", "abcd", -1, "are invalid"},
      {"size.st", R"({"w": {"dtype": "F16", "shape": [3], "data_offsets": [0, 4]}})", "abcd", -1,
       "holds 4 bytes but shape [3] of F16 needs 6"},
      {"dtype.st", R"({"w": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}})", "abcd", -1,
       "dtype I8 is not supported"},
      {"nooff.st", R"({"w": {"dtype": "F16", "shape": [2]}})", "abcd", -1, "missing key \"data_offsets\""},
  };
  for (const Case& c : cases) {
    const std::string path = write_safetensors(c.name, c.header, c.data, c.claimed_len);
    const std::string msg = error_of([&] { llama::SafetensorsFile f(path); });
    EXPECT_NE(msg.find(path), std::string::npos) << c.name << ": " << msg;
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.name << ": " << msg;
    std::remove(path.c_str());
  }
  const std::string tiny = temp_path("tiny.st");
  std::ofstream(tiny, std::ios::binary) << "abc";
  EXPECT_NE(error_of([&] { llama::SafetensorsFile f(tiny); }).find("too short"), std::string::npos);
  std::remove(tiny.c_str());
}

// ---------------------------------------------------------------- config checks

Json tiny_config_with(const std::string& key, const std::string& value_json) {
  std::ifstream f(kModelDir + "/config.json");
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t brace = text.find('{');
  text.insert(brace + 1, "\"" + key + "\": " + value_json + ",");  // an earlier duplicate key is found first
  return Json::parse(text, "config.json");
}

TEST(LlamaConfig, RejectsWhatTheExampleCannotRun) {
  auto err = [](const std::string& key, const std::string& value) {
    return error_of([&] { llama::ModelConfig::from_json(tiny_config_with(key, value), "config.json"); });
  };
  EXPECT_EQ(err("attention_bias", "true"), "");  // biases are supported
  EXPECT_NE(err("rope_scaling", R"({"rope_type": "llama3", "factor": 8.0})").find("\"llama3\" is not supported"),
            std::string::npos);
  EXPECT_NE(err("rope_scaling", R"({"type": "linear", "factor": 2.0})").find("\"linear\" is not supported"),
            std::string::npos);
  EXPECT_NE(err("rope_parameters", R"({"rope_type": "yarn", "rope_theta": 1e6})").find("\"yarn\""), std::string::npos);
  EXPECT_NE(err("head_dim", "96").find("head_dim 96 is not supported by this example"), std::string::npos);
  EXPECT_EQ(err("num_key_value_heads", "1"), "");  // GQA group 8 is supported, 6 is not
  EXPECT_NE(err("num_attention_heads", "12").find("= 6 is not supported by this example"), std::string::npos);
  EXPECT_NE(err("model_type", "\"qwen3\"").find("model_type \"qwen3\" is not supported"), std::string::npos);
  EXPECT_NE(err("hidden_act", "\"gelu\"").find("hidden_act \"gelu\""), std::string::npos);
  // Theta: rope_parameters (transformers 5) or top-level rope_theta.
  const Json top = tiny_config_with("rope_theta", "500000.0");
  EXPECT_FLOAT_EQ(llama::ModelConfig::from_json(top, "c").rope_theta, 10000.f);  // rope_parameters wins
  const Json qwen = Json::parse(R"({"model_type": "qwen2", "hidden_size": 1024, "num_hidden_layers": 2,
      "num_attention_heads": 16, "num_key_value_heads": 2, "intermediate_size": 2816, "vocab_size": 1000,
      "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": 4096, "use_sliding_window": false,
      "rope_scaling": null, "hidden_act": "silu"})", "qwen.json");
  const llama::ModelConfig q = llama::ModelConfig::from_json(qwen, "qwen.json");
  EXPECT_EQ(q.head_dim, 64);  // hidden / heads
  EXPECT_FLOAT_EQ(q.rope_theta, 1e6f);
  EXPECT_EQ(q.context, 32768);  // the window is off
}

// ---------------------------------------------------------------- tokenizer

const llama::Tokenizer& tiny_tokenizer() {
  static const llama::Tokenizer t = llama::Tokenizer::from_file(kModelDir + "/tokenizer.json");
  return t;
}

TEST(LlamaTokenizer, MatchesHuggingFaceIds) {
  // Ids from Hugging Face tokenizers 0.23 on the shipped tokenizer.json.
  const llama::Tokenizer& t = tiny_tokenizer();
  EXPECT_EQ(t.encode("It was a dark and stormy night, and"),
            (std::vector<int>{740, 314, 259, 1085, 281, 343, 283, 928, 857, 12, 281}));
  EXPECT_EQ(t.encode("\"I don't know,\" she said -- 42 times.\n\nThen  they left."),
            (std::vector<int>{2, 41, 762, 424, 551, 381, 374, 391, 221, 354, 221, 20, 18, 1683, 14, 199, 199, 1254, 221,
                              432, 945, 14}));
  EXPECT_EQ(t.encode("<|endoftext|>The End."), (std::vector<int>{0, 349, 575, 266, 14}));
}

TEST(LlamaTokenizer, TheIsOneToken) {
  const llama::Tokenizer& t = tiny_tokenizer();
  const int the = t.token_id("\xC4\xA0the");  // "Ġthe": Ġ stands for the space byte
  ASSERT_GE(the, 0);
  EXPECT_EQ(the, 261);
  EXPECT_EQ(t.encode(" the"), std::vector<int>{the});
  EXPECT_EQ(t.decode({the}), " the");
  EXPECT_EQ(t.decode({0}), "<|endoftext|>");
  EXPECT_EQ(t.vocab_size(), 4096);
  EXPECT_NE(error_of([&] { t.decode({4096}); }).find("not in the vocabulary"), std::string::npos);
}

TEST(LlamaTokenizer, DecodeOfEncodeIsTheText) {
  const llama::Tokenizer& t = tiny_tokenizer();
  const std::string texts[] = {
      "The quick brown fox jumps over the lazy dog.",
      "\"Well,\" said Polly, \"it's 3:45 -- we'll be late!\"\n\nShe ran.",
      "Numbers: 1, 22, 333, 4444.5; tabs\tand   several    spaces  ",
      "  Leading spaces, trailing newline\n",
      "Line one\r\nLine two\n\n\n   indented (parenthetical) [bracketed] {braced}?!",
      "caf\xC3\xA9 \xE2\x80\x94 na\xC3\xAFve \xE2\x80\x9Cquotes\xE2\x80\x9D",  // café — naïve “quotes”
      "",
  };
  for (const std::string& text : texts) {
    const std::vector<int> ids = t.encode(text);
    EXPECT_EQ(t.decode(ids), text);
    if (!text.empty()) {
      EXPECT_LT(ids.size(), text.size()) << "no BPE merge in: " << text;
    }
  }
}

TEST(LlamaTokenizer, Gpt2PreTokenizationFollowsTheRegex) {
  using V = std::vector<std::string>;
  EXPECT_EQ(llama::pretokenize("Hello  world\n\n it's 123!! ok", llama::SplitStyle::Gpt2),
            (V{"Hello", " ", " world", "\n\n", " it", "'s", " 123", "!!", " ok"}));
  EXPECT_EQ(llama::pretokenize("a   \nb  ", llama::SplitStyle::Gpt2), (V{"a", "   ", "\n", "b", "  "}));
  EXPECT_EQ(llama::pretokenize("I'LL don't 'sup", llama::SplitStyle::Gpt2),
            (V{"I", "'", "LL", " don", "'t", " '", "sup"}));
  // Llama 3: case-insensitive contractions, numbers in threes, punctuation joins a following word.
  EXPECT_EQ(llama::pretokenize("I'LL pay 12345 (now)\n\n", llama::SplitStyle::Llama3),
            (V{"I", "'LL", " pay", " ", "123", "45", " (", "now", ")\n\n"}));
}

}  // namespace
