// Cache API checks that need no GPU: configuration errors are reported
// before any device work, with messages that name the problem.
#include <gtest/gtest.h>

#include <string>

#include "kvcomp/cache.hpp"

using namespace kvcomp;

namespace {

void expect_error(const Config& c, const std::string& needle) {
  try {
    Cache cache(c);
    FAIL() << "expected kvcomp::Error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(CacheConfig, BadConfigurationsAreRejectedWithClearMessages) {
  Config c;
  c.head_dim = 96;
  expect_error(c, "head_dim must be 64 or 128");
  c = Config{};
  c.max_attend_batch = 300;
  expect_error(c, "max_attend_batch must be 0");
  c = Config{};
  c.block_tokens = 48;
  expect_error(c, "block_tokens must be 32, 64 or 128");
  c = Config{};
  c.q_heads = 12;
  c.kv_heads = 8;
  expect_error(c, "multiple of kv_heads");
  c = Config{};
  c.q_heads = 48;
  c.kv_heads = 3;
  expect_error(c, "must be 1, 2, 4 or 8");
  c = Config{};
  c.k_bound.value = -1.f;
  expect_error(c, "K error bound must be positive");
  c = Config{};
  c.v_bound.value = std::nanf("");
  expect_error(c, "V error bound must be positive");
  c = Config{};
  c.overrides.push_back({5, 0, {}, {}});
  c.layers = 2;
  expect_error(c, "override names layer 5");
  c = Config{};
  c.overrides.push_back({0, 9, {}, {}});
  expect_error(c, "override names kv head 9");
  c = Config{};
  c.layers = 0;
  expect_error(c, "layers must be positive");
  c = Config{};
  c.max_seqs = 0;
  expect_error(c, "max_seqs must be positive");
  c = Config{};
  c.transform = Transform(7);
  expect_error(c, "transform must be Transform::None or Transform::Hadamard, got 7");
  c = Config{};
  c.transform = Transform::Hadamard;
  c.head_dim = 96;
  expect_error(c, "transform Hadamard needs head_dim a power of two, got 96");
}

TEST(CacheConfig, ValidConfigEitherWorksOrFailsClearlyWithoutAGpu) {
  Config c;
  c.pool_bytes = 1 << 20;
  c.max_seqs = 2;
  c.max_tokens_per_seq = 256;
  try {
    Cache cache(c);
    const int s = cache.add_sequence();
    EXPECT_THROW(cache.tokens(s + 1, 0), Error);
    EXPECT_THROW(cache.tokens(s, 7), Error);
    EXPECT_THROW(cache.append(0, {s}, {1, 2}, nullptr, nullptr, nullptr), Error);
    EXPECT_THROW(cache.append(0, {s}, {1}, nullptr, nullptr, nullptr), Error);
    EXPECT_THROW(cache.append(0, {s}, {257}, nullptr, nullptr, nullptr), Error);
    EXPECT_THROW(cache.append(0, {s, s}, {1, 1}, nullptr, nullptr, nullptr), Error);
    EXPECT_EQ(cache.tokens(s, 0), 0);
    cache.add_sequence();
    EXPECT_THROW(cache.add_sequence(), Error);
  } catch (const Error& e) {
    // No device here: the message must say what failed.
    EXPECT_NE(std::string(e.what()).find("kvcomp:"), std::string::npos);
    std::printf("no GPU: %s\n", e.what());
  }
}
