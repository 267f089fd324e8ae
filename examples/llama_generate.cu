// llama_generate: a real model run twice, once with a kvcomp cache and once
// with an fp16 cache: greedy generation from a prompt, decode speed, KV bytes,
// and teacher-forced perplexity on a text through each cache.
//
// Loads any Llama / Mistral / Qwen2 checkpoint in Hugging Face format
// (config.json, *.safetensors, tokenizer.json); default: the shipped
// models/tiny-llama-hd64. The model code is the same for both runs
// (examples/llama/model.cuh); only the KvCache differs.
//
//   llama_generate [--model DIR] [--prompt TEXT | --prompt-ids "1 2 3"] [--tokens N] [--eb X]
//                  [--speculate K] [--ppl-text FILE] [--ppl-tokens N] [--no-ppl] [--tokenize TEXT]
//
// --speculate K adds speculative greedy decoding through each cache (prompt
// lookup: up to K draft tokens copied from the text after an earlier
// occurrence of its last tokens, verified in one forward as multi-token
// queries, the rejected ones taken back with rollback; kvcomp keeps the
// newest K tokens uncompressed: Config::max_rollback) and compares its tokens
// with plain greedy decoding through the same cache.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "llama/config.hpp"
#include "llama/device_buffer.cuh"
#include "llama/kernels.cuh"
#include "llama/kv_cache.cuh"
#include "llama/model.cuh"
#include "llama/safetensors.hpp"
#include "llama/tokenizer.hpp"

#ifndef KVCOMP_LLAMA_DEFAULT_MODEL
#define KVCOMP_LLAMA_DEFAULT_MODEL "models/tiny-llama-hd64"
#endif
#ifndef KVCOMP_LLAMA_DEFAULT_TEXT
#define KVCOMP_LLAMA_DEFAULT_TEXT "examples/data/eval_excerpt.txt"
#endif

namespace {

using llama::DeviceBuffer;
using llama::check;

constexpr const char* kUsage =
    "usage: llama_generate [options]\n"
    "  --model DIR         Hugging Face Llama/Mistral/Qwen2 checkpoint (default: the shipped tiny-llama-hd64)\n"
    "  --prompt TEXT       prompt (default: \"It was a dark and stormy night, and\")\n"
    "  --prompt-ids IDS    prompt as token ids, e.g. \"1 2 3\" (instead of --prompt)\n"
    "  --tokens N          tokens to generate greedily (default 64)\n"
    "  --eb X              kvcomp relative error bound for K and V (default 0.05)\n"
    "  --speculate K       also decode speculatively: prompt-lookup drafts of up to K tokens (1..63), verified\n"
    "                      in one forward, the rejected ones rolled back (default 0: off)\n"
    "  --ppl-text FILE     text for teacher-forced perplexity (default: examples/data/eval_excerpt.txt)\n"
    "  --ppl-tokens N      tokens of it to score (default 1024, at most the model's context)\n"
    "  --no-ppl            skip the perplexity runs\n"
    "  --tokenize TEXT     print TEXT's token ids and exit (no GPU needed)\n";

struct Options {
  std::string model_dir = KVCOMP_LLAMA_DEFAULT_MODEL;
  std::string prompt = "It was a dark and stormy night, and";
  std::string prompt_ids;  // non-empty: use these ids
  int tokens = 64;
  float eb = 0.05f;
  int speculate = 0;
  std::string ppl_text = KVCOMP_LLAMA_DEFAULT_TEXT;
  int ppl_tokens = 1024;
  bool ppl = true;
  bool tokenize = false;
  std::string tokenize_text;
};

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int parse_int(const std::string& s, const std::string& flag, int min) {
  char* end = nullptr;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || v < min || v > (1L << 30))
    throw UsageError(flag + " needs an integer >= " + std::to_string(min) + ", got \"" + s + "\"");
  return int(v);
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(a + " needs a value");
      return argv[++i];
    };
    if (a == "--model") o.model_dir = value();
    else if (a == "--prompt") o.prompt = value();
    else if (a == "--prompt-ids") o.prompt_ids = value();
    else if (a == "--tokens") o.tokens = parse_int(value(), a, 1);
    else if (a == "--eb") {
      const std::string v = value();
      char* end = nullptr;
      o.eb = std::strtof(v.c_str(), &end);
      if (v.empty() || *end != '\0' || !(o.eb > 0) || !std::isfinite(o.eb)) throw UsageError("--eb needs a positive number");
    } else if (a == "--speculate") {
      o.speculate = parse_int(value(), a, 0);
      if (o.speculate > 63) throw UsageError("--speculate takes at most 63 draft tokens");
    } else if (a == "--ppl-text") o.ppl_text = value();
    else if (a == "--ppl-tokens") o.ppl_tokens = parse_int(value(), a, 2);
    else if (a == "--no-ppl") o.ppl = false;
    else if (a == "--tokenize") { o.tokenize = true; o.tokenize_text = value(); }
    else if (a == "--help" || a == "-h") { std::fputs(kUsage, stdout); std::exit(0); }
    else throw UsageError("unknown option " + a);
  }
  return o;
}

std::vector<int> parse_ids(const std::string& s, int vocab) {
  std::vector<int> ids;
  std::istringstream in(s);
  std::string word;
  while (in >> word) {
    const int id = parse_int(word, "--prompt-ids", 0);
    if (id >= vocab) throw UsageError("--prompt-ids: id " + word + " is outside the vocabulary (" + std::to_string(vocab) + ")");
    ids.push_back(id);
  }
  return ids;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open file");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string basename(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

/// Generated text on one line: newlines, tabs and carriage returns escaped,
/// bytes that are not valid UTF-8 (a token may end mid-character) as U+FFFD.
std::string one_line(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '\n') { out += "\\n"; ++i; continue; }
    if (c == '\r') { out += "\\r"; ++i; continue; }
    if (c == '\t') { out += "\\t"; ++i; continue; }
    if (c < 0x80) { out += (c < 0x20 || c == 0x7F) ? '?' : char(c); ++i; continue; }
    size_t len = 0;
    if ((c & 0xE0) == 0xC0 && c >= 0xC2) len = 2;
    else if ((c & 0xF0) == 0xE0) len = 3;
    else if ((c & 0xF8) == 0xF0 && c <= 0xF4) len = 4;
    bool ok = len > 0 && i + len <= s.size();
    for (size_t k = 1; ok && k < len; ++k) ok = (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80;
    if (ok) { out.append(s, i, len); i += len; } else { out += "\xEF\xBF\xBD"; ++i; }
  }
  return out;
}

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { check(cudaStreamCreate(&s), "cudaStreamCreate"); }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

enum class CacheKind { Kvcomp, Fp16 };

struct Run {
  std::unique_ptr<llama::KvCache> cache;
  llama::KvcompKv* kvcomp = nullptr;  // the same cache when it is kvcomp's (for stats)
};

Run make_cache(CacheKind kind, const llama::ModelConfig& c, int max_tokens, float eb, int sms, int max_rollback = 0) {
  const llama::KvShape shape{c.layers, c.kv_heads, c.q_heads, c.head_dim, max_tokens};
  Run r;
  if (kind == CacheKind::Kvcomp) {
    auto kv = std::make_unique<llama::KvcompKv>(shape, eb, max_rollback);
    r.kvcomp = kv.get();
    r.cache = std::move(kv);
  } else {
    r.cache = std::make_unique<llama::Fp16Kv>(shape, sms);
  }
  return r;
}

struct Generation {
  std::vector<int> tokens;
  int decode_steps = 0;
  double decode_seconds = 0;
  size_t kv_bytes = 0;
  int64_t kv_tokens = 0;
  double ratio = 1;  // fp16 bytes / kv_bytes
};

/// Prefill the prompt, then greedy decode: new_tokens tokens, the first from
/// the prefill's logits, each next one from a decode step. Token ids stay on
/// the device (argmax writes the id the next step embeds).
Generation generate(llama::Model& model, CacheKind kind, const std::vector<int>& prompt, int new_tokens, float eb,
                    int sms, cudaStream_t s) {
  const llama::ModelConfig& c = model.config();
  const int prompt_len = int(prompt.size());
  Run run = make_cache(kind, c, prompt_len + new_tokens, eb, sms);
  DeviceBuffer<int> prompt_d(prompt.size());
  DeviceBuffer<int> out_d{static_cast<size_t>(new_tokens)};
  prompt_d.upload(prompt);
  model.forward(prompt_d.get(), prompt_len, 0, llama::Model::Phase::Prefill, *run.cache, s);
  llama::kernels::argmax<<<1, llama::kernels::kThreads, 0, s>>>(model.logits(), c.vocab, out_d.get());
  check(cudaStreamSynchronize(s), "prefill");

  Generation g;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 1; i < new_tokens; ++i) {
    model.forward(out_d.get() + i - 1, 1, prompt_len + i - 1, llama::Model::Phase::Decode, *run.cache, s);
    llama::kernels::argmax<<<1, llama::kernels::kThreads, 0, s>>>(model.logits(), c.vocab, out_d.get() + i);
  }
  check(cudaStreamSynchronize(s), "decode");
  g.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  g.decode_steps = new_tokens - 1;
  g.tokens = out_d.download();
  g.kv_bytes = run.cache->bytes();
  g.kv_tokens = run.cache->tokens();
  g.ratio = run.kvcomp ? run.kvcomp->stats().ratio_vs_fp16 : 1.0;
  return g;
}

struct Speculation {
  std::vector<int> tokens;
  int forwards = 0;         // verification forwards after the prefill
  int drafted = 0;          // draft tokens proposed
  int accepted = 0;         // of them, accepted
  double decode_seconds = 0;
};

/// Prompt lookup: up to k tokens that followed the latest earlier occurrence
/// of the last `ngram` tokens of `text` (3, then 2, then 1), or none.
std::vector<int> lookup_drafts(const std::vector<int>& text, int k) {
  const int n = int(text.size());
  for (int ngram = 3; ngram >= 1; --ngram) {
    if (n <= ngram) continue;
    for (int start = n - ngram - 1; start >= 0; --start) {
      bool match = true;
      for (int i = 0; i < ngram && match; ++i) match = text[size_t(start + i)] == text[size_t(n - ngram + i)];
      if (!match) continue;
      const int from = start + ngram, to = std::min(n, from + k);
      return std::vector<int>(text.begin() + from, text.begin() + to);
    }
  }
  return {};
}

/// Speculative greedy decoding: each forward verifies the last token and up to
/// k drafts (Phase::Verify); the drafts up to the first one greedy decoding
/// would not pick are kept, plus the token the model picks after them; the
/// rejected drafts are rolled back. Exact for greedy decoding: the same
/// tokens as generate() up to the arithmetic of batched rows.
Speculation speculate(llama::Model& model, CacheKind kind, const std::vector<int>& prompt, int new_tokens, int k,
                      float eb, int sms, cudaStream_t s) {
  const llama::ModelConfig& c = model.config();
  const int prompt_len = int(prompt.size());
  Run run = make_cache(kind, c, prompt_len + new_tokens + k + 1, eb, sms, k);
  DeviceBuffer<int> ids_d(size_t(std::max(prompt_len, k + 1))), pred_d(size_t(k + 1));
  ids_d.upload(prompt);
  model.forward(ids_d.get(), prompt_len, 0, llama::Model::Phase::Prefill, *run.cache, s);
  llama::kernels::argmax<<<1, llama::kernels::kThreads, 0, s>>>(model.logits(), c.vocab, pred_d.get());
  check(cudaStreamSynchronize(s), "prefill");
  std::vector<int> text = prompt;
  text.push_back(pred_d.download()[0]);
  Speculation g;
  const auto t0 = std::chrono::steady_clock::now();
  while (int(text.size()) - prompt_len < new_tokens) {
    // The cache holds every token but the last; verify the last and the drafts.
    const int room = new_tokens - (int(text.size()) - prompt_len) - 1;  // drafts past the end are wasted
    std::vector<int> rows = lookup_drafts(text, std::min(k, room));
    const int drafts = int(rows.size());
    rows.insert(rows.begin(), text.back());
    check(cudaMemcpyAsync(ids_d.get(), rows.data(), rows.size() * sizeof(int), cudaMemcpyHostToDevice, s), "ids");
    model.forward(ids_d.get(), int(rows.size()), int(text.size()) - 1, llama::Model::Phase::Verify, *run.cache, s);
    for (int j = 0; j <= drafts; ++j)
      llama::kernels::argmax<<<1, llama::kernels::kThreads, 0, s>>>(model.logits(j), c.vocab, pred_d.get() + j);
    std::vector<int> pred(size_t(drafts + 1));
    check(cudaMemcpyAsync(pred.data(), pred_d.get(), pred.size() * sizeof(int), cudaMemcpyDeviceToHost, s), "preds");
    check(cudaStreamSynchronize(s), "verify");
    int ok = 0;
    while (ok < drafts && rows[size_t(ok + 1)] == pred[size_t(ok)]) ++ok;
    if (ok < drafts) run.cache->rollback(drafts - ok, s);
    text.insert(text.end(), rows.begin() + 1, rows.begin() + 1 + ok);
    text.push_back(pred[size_t(ok)]);
    ++g.forwards;
    g.drafted += drafts;
    g.accepted += ok;
  }
  check(cudaStreamSynchronize(s), "speculative decode");
  g.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  g.tokens.assign(text.begin() + prompt_len, text.begin() + prompt_len + new_tokens);
  return g;
}

struct Perplexity {
  double ppl = 0;
  size_t kv_bytes = 0;
  int64_t kv_tokens = 0;
};

/// Teacher-forced perplexity: every token goes through the decode path
/// (append, then attend over the cache), the first one alone, and the next
/// token's -log p is summed on the device.
Perplexity perplexity(llama::Model& model, CacheKind kind, const std::vector<int>& text, float eb, int sms,
                      cudaStream_t s) {
  const llama::ModelConfig& c = model.config();
  const int n = int(text.size());
  Run run = make_cache(kind, c, n, eb, sms);
  DeviceBuffer<int> text_d(text.size());
  text_d.upload(text);
  DeviceBuffer<double> nll(1);
  check(cudaMemsetAsync(nll.get(), 0, sizeof(double), s), "memset");
  for (int t = 0; t + 1 < n; ++t) {
    model.forward(text_d.get() + t, 1, t, llama::Model::Phase::Decode, *run.cache, s);
    llama::kernels::add_nll<<<1, llama::kernels::kThreads, 0, s>>>(model.logits(), c.vocab, text_d.get() + t + 1,
                                                                    nll.get());
  }
  check(cudaStreamSynchronize(s), "perplexity");
  Perplexity p;
  p.ppl = std::exp(nll.download()[0] / (n - 1));
  p.kv_bytes = run.cache->bytes();
  p.kv_tokens = run.cache->tokens();
  return p;
}

int run_main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse_args(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "llama_generate: %s\n%s", e.what(), kUsage);
    return 1;
  }

  // Host side first (no GPU needed): tokenizer, config, checkpoint headers.
  std::unique_ptr<llama::Tokenizer> tok;
  std::string tokenizer_error;
  try {
    tok = std::make_unique<llama::Tokenizer>(llama::Tokenizer::from_file(opt.model_dir + "/tokenizer.json"));
  } catch (const std::exception& e) {
    tokenizer_error = e.what();
  }
  auto need_tokenizer = [&](const char* for_what) -> const llama::Tokenizer& {
    if (!tok) throw std::runtime_error(std::string(for_what) + " needs the tokenizer: " + tokenizer_error);
    return *tok;
  };
  if (opt.tokenize) {
    const std::vector<int> ids = need_tokenizer("--tokenize").encode(opt.tokenize_text);
    for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%d", i ? " " : "", ids[i]);
    std::printf("\n");
    return 0;
  }
  const llama::ModelConfig cfg = llama::ModelConfig::from_dir(opt.model_dir);
  llama::Checkpoint ckpt(opt.model_dir);

  const std::vector<int> prompt =
      opt.prompt_ids.empty() ? need_tokenizer("--prompt").encode(opt.prompt) : parse_ids(opt.prompt_ids, cfg.vocab);
  if (prompt.empty()) throw std::runtime_error("the prompt has no tokens");
  if (int(prompt.size()) + opt.tokens + opt.speculate > cfg.context)
    throw std::runtime_error("prompt (" + std::to_string(prompt.size()) + " tokens) + --tokens " +
                             std::to_string(opt.tokens) + " + --speculate " + std::to_string(opt.speculate) +
                             " exceed the model's context of " + std::to_string(cfg.context));
  std::vector<int> ppl_ids;
  if (opt.ppl) {
    ppl_ids = need_tokenizer("perplexity (or use --no-ppl)").encode(read_file(opt.ppl_text));
    const size_t n = size_t(std::min(opt.ppl_tokens, cfg.context));
    if (ppl_ids.size() > n) ppl_ids.resize(n);
    if (ppl_ids.size() < 2) throw std::runtime_error(opt.ppl_text + ": fewer than 2 tokens to score");
  }
  // Text of ids for display; ids the tokenizer lacks (a padded embedding) as <id N>.
  auto text_of = [&](const std::vector<int>& ids) {
    std::string s;
    for (int id : ids) s += (tok && tok->has_token(id)) ? tok->token_bytes(id) : "<id " + std::to_string(id) + ">";
    return one_line(s);
  };

  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    cudaGetLastError();
    std::printf("llama_generate: no CUDA device found; the model (%s) was read, but running it needs a GPU.\n",
                opt.model_dir.c_str());
    return 0;
  }
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "device attribute");
  const Stream owned_stream;  // outlives the model, whose cuBLAS handle uses it
  const cudaStream_t stream = owned_stream.s;

  llama::Model model(cfg, ckpt, std::max(int(prompt.size()), opt.speculate + 1), opt.speculate + 1);
  std::printf("model: %s (%d layers, %d q / %d kv heads, head_dim %d, vocab %d)\n", basename(opt.model_dir).c_str(),
              cfg.layers, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.vocab);
  std::printf("prompt (%zu tokens): %s\n", prompt.size(), text_of(prompt).c_str());

  // Warm-up (lazy kernel loading, cuBLAS heuristics) so neither timed run pays it.
  for (CacheKind k : {CacheKind::Kvcomp, CacheKind::Fp16})
    generate(model, k, prompt, std::min(opt.tokens, 4), opt.eb, sms, stream);
  const Generation kv = generate(model, CacheKind::Kvcomp, prompt, opt.tokens, opt.eb, sms, stream);
  const Generation fp = generate(model, CacheKind::Fp16, prompt, opt.tokens, opt.eb, sms, stream);

  int same = 0;
  while (same < opt.tokens && kv.tokens[size_t(same)] == fp.tokens[size_t(same)]) ++same;
  char kv_label[64];
  const int label_width = std::snprintf(kv_label, sizeof kv_label, "kvcomp (eb %g):", opt.eb);
  std::printf("%s %s\n", kv_label, text_of(kv.tokens).c_str());
  std::printf("%-*s %s\n", label_width, "fp16:", text_of(fp.tokens).c_str());
  std::printf("greedy tokens identical: first %d of %d\n", same, opt.tokens);
  if (kv.decode_steps > 0)
    std::printf("decode: kvcomp %.1f tokens/s   fp16 %.1f tokens/s\n", kv.decode_steps / kv.decode_seconds,
                fp.decode_steps / fp.decode_seconds);
  std::printf("KV bytes after generation (%lld tokens): kvcomp %zu B (%.1f B/token)  fp16 %zu B  ratio %.2f x\n",
              (long long)kv.kv_tokens, kv.kv_bytes, double(kv.kv_bytes) / double(kv.kv_tokens), fp.kv_bytes, kv.ratio);

  if (opt.speculate > 0) {
    for (CacheKind k : {CacheKind::Kvcomp, CacheKind::Fp16}) {
      const Speculation sp = speculate(model, k, prompt, opt.tokens, opt.speculate, opt.eb, sms, stream);
      const Generation& plain = k == CacheKind::Kvcomp ? kv : fp;
      int match = 0;
      while (match < opt.tokens && sp.tokens[size_t(match)] == plain.tokens[size_t(match)]) ++match;
      std::printf("speculative (%s, prompt lookup, up to %d drafts): %d forwards for %d tokens, %d of %d drafts "
                  "accepted, %.1f tokens/s; tokens identical to plain greedy: first %d of %d\n",
                  k == CacheKind::Kvcomp ? "kvcomp" : "fp16", opt.speculate, sp.forwards, opt.tokens - 1, sp.accepted,
                  sp.drafted, (opt.tokens - 1) / sp.decode_seconds, match, opt.tokens);
    }
  }

  if (opt.ppl) {
    const Perplexity pf = perplexity(model, CacheKind::Fp16, ppl_ids, opt.eb, sms, stream);
    const Perplexity pk = perplexity(model, CacheKind::Kvcomp, ppl_ids, opt.eb, sms, stream);
    std::printf("perplexity on %s (%zu tokens, teacher-forced through each cache): fp16 %.3f  kvcomp %.3f  (%+.2f%%)\n",
                basename(opt.ppl_text).c_str(), ppl_ids.size(), pf.ppl, pk.ppl, (pk.ppl / pf.ppl - 1) * 100);
    std::printf("KV bytes/token at the end of the perplexity run (%lld tokens): kvcomp %.1f B  fp16 %.1f B  (%.2f x)\n",
                (long long)pk.kv_tokens, double(pk.kv_bytes) / double(pk.kv_tokens),
                double(pf.kv_bytes) / double(pf.kv_tokens), double(pf.kv_bytes) / double(pk.kv_bytes));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run_main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llama_generate: %s\n", e.what());
    return 1;
  }
}
