// Backend::count_routed_slots (the per-expert load /metrics reports) on every backend against a plain
// count here: random routings with padding slots, a real-token count below, at and past the rows, keys
// out of range, and counts that start non-zero (the op adds). On CUDA also inside a captured graph:
// each replay adds the step's tallies again. Exact integers, so exact equality.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/error.h"
#include "tests/kernels/kernel_test_support.h"
#ifdef EPIC_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace epic {
namespace {

using kernel_test::case_generator;
using kernel_test::seed_text;

std::unique_ptr<Backend> backend_or_skip_reason(const std::string& kind, std::string& missing) {
  if (kind == "cpu") return make_cpu_backend(2);
#ifdef EPIC_HAVE_CUDA
  if (cuda_device_count() > 0) return make_cuda_backend(0);
  missing = "no CUDA device (cuda_device_count() == 0): the CUDA count is only checked on a GPU machine";
#else
  missing = "this build has no CUDA backend (EPIC_ENABLE_CUDA=OFF or no nvcc)";
#endif
  return nullptr;
}

struct Routing {
  int64_t tokens = 0, top_k = 0, experts = 0, num_keys = 0;
  std::vector<int32_t> ids, keys;
  std::vector<int64_t> expert_counts, key_counts;  // the starting values
};

// Distinct experts per token (as route_top_k writes), a random own k per token with the rest padding (the
// first choice again), keys in [-1, num_keys] (both ends outside the range on purpose).
Routing random_routing(std::mt19937_64& g, int64_t tokens, int64_t top_k, int64_t experts, int64_t num_keys) {
  Routing r{tokens, top_k, experts, num_keys, {}, {}, {}, {}};
  std::vector<int32_t> order(static_cast<size_t>(experts));
  for (int64_t e = 0; e < experts; ++e) order[e] = static_cast<int32_t>(e);
  std::uniform_int_distribution<int64_t> own_k(1, top_k), key(-1, num_keys), start(0, 1000);
  for (int64_t t = 0; t < tokens; ++t) {
    std::shuffle(order.begin(), order.end(), g);
    const int64_t k = own_k(g);
    for (int64_t j = 0; j < top_k; ++j) {
      r.ids.push_back(j < k ? order[j] : order[0]);
      r.keys.push_back(static_cast<int32_t>(key(g)));
    }
  }
  for (int64_t e = 0; e < experts; ++e) r.expert_counts.push_back(start(g));
  for (int64_t k = 0; k < num_keys; ++k) r.key_counts.push_back(start(g));
  return r;
}

// The counts after `times` tallies of the first `real` tokens.
void expected_counts(const Routing& r, int64_t real, int times, std::vector<int64_t>& experts,
                     std::vector<int64_t>& keys) {
  experts = r.expert_counts;
  keys = r.key_counts;
  for (int n = 0; n < times; ++n)
    for (int64_t t = 0; t < std::min(real, r.tokens); ++t)
      for (int64_t j = 0; j < r.top_k; ++j) {
        const size_t s = static_cast<size_t>(t * r.top_k + j);
        if (j > 0 && r.ids[s] == r.ids[static_cast<size_t>(t * r.top_k)]) continue;  // padding
        ++experts[static_cast<size_t>(r.ids[s])];
        if (r.keys[s] >= 0 && r.keys[s] < r.num_keys) ++keys[static_cast<size_t>(r.keys[s])];
      }
}

struct OnBackend {
  OwnedTensor ids, keys, real, expert_counts, key_counts;
};

OnBackend upload(Backend& b, const Routing& r, int64_t real) {
  OnBackend t;
  t.ids = b.new_tensor(ScalarType::kI32, {r.tokens, r.top_k});
  t.keys = b.new_tensor(ScalarType::kI32, {r.tokens, r.top_k});
  t.real = b.new_tensor(ScalarType::kI32, {1});
  t.expert_counts = b.new_tensor(ScalarType::kI64, {r.experts});
  t.key_counts = b.new_tensor(ScalarType::kI64, {r.num_keys});
  b.copy_from_host(t.ids.view(), 0, r.ids.data(), r.ids.size() * 4);
  b.copy_from_host(t.keys.view(), 0, r.keys.data(), r.keys.size() * 4);
  const int32_t real32 = static_cast<int32_t>(real);
  b.copy_from_host(t.real.view(), 0, &real32, 4);
  b.copy_from_host(t.expert_counts.view(), 0, r.expert_counts.data(), r.expert_counts.size() * 8);
  b.copy_from_host(t.key_counts.view(), 0, r.key_counts.data(), r.key_counts.size() * 8);
  return t;
}

std::vector<int64_t> download(Backend& b, const OwnedTensor& t) {
  std::vector<int64_t> values(static_cast<size_t>(t.view().numel()));
  b.synchronize();
  b.copy_to_host(t.view(), 0, values.data(), values.size() * 8);
  return values;
}

class CountRoutedSlots : public ::testing::TestWithParam<std::string> {};

TEST_P(CountRoutedSlots, EqualsAPlainCountOfTheRealTokensNonPaddingSlots) {
  std::string missing;
  const std::unique_ptr<Backend> backend = backend_or_skip_reason(GetParam(), missing);
  if (backend == nullptr) GTEST_SKIP() << GetParam() << " skipped: " << missing;
  struct Shape {
    int64_t tokens, top_k, experts, keys;
  };
  uint64_t index = 0;
  for (const Shape s :
       {Shape{1, 1, 4, 2}, Shape{7, 8, 128, 4}, Shape{300, 4, 60, 3}, Shape{4096, 8, 128, 8}}) {
    std::mt19937_64 g = case_generator(++index);
    const Routing r = random_routing(g, s.tokens, s.top_k, s.experts, s.keys);
    std::uniform_int_distribution<int64_t> below(0, s.tokens - 1);
    for (const int64_t real : {s.tokens, below(g), s.tokens + 5}) {
      for (const bool with_real : {true, false}) {
        if (!with_real && real != s.tokens) continue;
        SCOPED_TRACE(GetParam() + " tokens " + std::to_string(s.tokens) + " k " + std::to_string(s.top_k) +
                     " real " + std::to_string(real) + (with_real ? "" : " (absent)") + ", " + seed_text());
        OnBackend t = upload(*backend, r, real);
        backend->count_routed_slots(t.ids, with_real ? t.real.view() : Tensor{}, t.expert_counts, t.keys,
                                    t.key_counts);
        std::vector<int64_t> experts, keys;
        expected_counts(r, real, 1, experts, keys);
        EXPECT_EQ(download(*backend, t.expert_counts), experts);
        EXPECT_EQ(download(*backend, t.key_counts), keys);
        // Without keys only the experts' counts change.
        OnBackend plain = upload(*backend, r, real);
        backend->count_routed_slots(plain.ids, plain.real, plain.expert_counts, Tensor{}, Tensor{});
        EXPECT_EQ(download(*backend, plain.expert_counts), experts);
        EXPECT_EQ(download(*backend, plain.key_counts), r.key_counts);
      }
    }
  }
}

TEST_P(CountRoutedSlots, BadTensorsAreRejectedNamingTheOp) {
  std::string missing;
  const std::unique_ptr<Backend> backend = backend_or_skip_reason(GetParam(), missing);
  if (backend == nullptr) GTEST_SKIP() << GetParam() << " skipped: " << missing;
  Backend& b = *backend;
  const OwnedTensor ids = b.new_tensor(ScalarType::kI32, {3, 2}),
                    counts = b.new_tensor(ScalarType::kI64, {8});
  const OwnedTensor counts32 = b.new_tensor(ScalarType::kI32, {8}),
                    real = b.new_tensor(ScalarType::kI32, {2});
  const OwnedTensor keys = b.new_tensor(ScalarType::kI32, {3, 1});
  const auto message = [&](const std::function<void()>& call) {
    try {
      call();
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_NE(message([&] {
              b.count_routed_slots(ids, Tensor{}, counts32, Tensor{}, Tensor{});
            }).find("count_routed_slots"),
            std::string::npos);
  EXPECT_NE(message([&] { b.count_routed_slots(ids, real, counts, Tensor{}, Tensor{}); }).find("real_tokens"),
            std::string::npos);
  EXPECT_NE(message([&] { b.count_routed_slots(ids, Tensor{}, counts, keys, counts); }).find("keys"),
            std::string::npos);
  EXPECT_NE(message([&] { b.count_routed_slots(ids, Tensor{}, counts, ids, Tensor{}); }).find("together"),
            std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Backends, CountRoutedSlots, ::testing::Values("cpu", "cuda"),
                         [](const auto& info) { return info.param; });

// The tally inside a captured graph: each replay counts the real tokens as they are at the replay (the
// count is read from device memory, as the runner's padded decode buckets need).
TEST(CountRoutedSlotsGraph, EachReplayAddsTheRealTokensOfThatReplay) {
#ifndef EPIC_HAVE_CUDA
  GTEST_SKIP() << "this build has no CUDA backend (EPIC_ENABLE_CUDA=OFF or no nvcc)";
#else
  if (cuda_device_count() == 0)
    GTEST_SKIP() << "no CUDA device: graph capture is only checked on a GPU machine";
  const std::unique_ptr<Backend> backend = make_cuda_backend(0);
  std::mt19937_64 g = case_generator(99);
  const Routing r = random_routing(g, 64, 8, 128, 4);
  OnBackend t = upload(*backend, r, 64);
  backend->synchronize();
  const std::unique_ptr<Graph> graph = backend->capture(
      [&] { backend->count_routed_slots(t.ids, t.real, t.expert_counts, t.keys, t.key_counts); });
  ASSERT_NE(graph, nullptr);
  std::vector<int64_t> experts = r.expert_counts, keys = r.key_counts;
  for (const int32_t real : {64, 17, 0, 3}) {
    SCOPED_TRACE("real " + std::to_string(real) + ", " + seed_text());
    backend->copy_from_host(t.real.view(), 0, &real, 4);
    graph->replay();
    Routing once = r;
    once.expert_counts = experts;
    once.key_counts = keys;
    expected_counts(once, real, 1, experts, keys);
    EXPECT_EQ(download(*backend, t.expert_counts), experts);
    EXPECT_EQ(download(*backend, t.key_counts), keys);
  }
#endif
}

}  // namespace
}  // namespace epic
