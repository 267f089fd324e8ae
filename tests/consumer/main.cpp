#include <cstdio>

#include <kvcomp/cache.hpp>
#include <kvcomp/reference.hpp>

int main() {
  // CPU part: encode and decode one block with the installed library.
  float x[64 * 64];
  for (int i = 0; i < 64 * 64; ++i) x[i] = float((i * 37) % 101) / 50.f - 1.f;
  uint64_t counts[kvcomp::format::kLowBitChoices][kvcomp::format::kNumSymbols] = {};  // one histogram per k
  const kvcomp::ErrorBound eb{kvcomp::BoundMode::Relative, 0.05f};
  kvcomp::ref::add_histogram(kvcomp::Kind::Key, x, 64, 64, eb, &counts[0][0]);
  const auto cb = kvcomp::Codebook::from_histograms(&counts[0][0]);
  const auto bytes = kvcomp::ref::encode_block(kvcomp::Kind::Key, x, 64, 64, eb, cb, 0);
  float y[64 * 64];
  if (kvcomp::ref::decode_block(bytes.data(), bytes.size(), kvcomp::Kind::Key, 64, 64, cb, y) !=
      kvcomp::ref::DecodeStatus::Ok)
    return 1;
  // The API: a Cache where a GPU exists, a clear error where none does.
  try {
    kvcomp::Config cfg;
    cfg.pool_bytes = 1 << 20;
    cfg.max_seqs = 1;
    cfg.max_tokens_per_seq = 128;
    kvcomp::Cache cache(cfg);
    const int s = cache.add_sequence();
    std::printf("consumer: cache ready, sequence %d, %zu pool bytes\n", s, cache.stats().pool_capacity);
  } catch (const kvcomp::Error& e) {
    std::printf("consumer: %s\n", e.what());
  }
  std::printf("consumer: block of %zu bytes round-tripped\n", bytes.size());
  return 0;
}
