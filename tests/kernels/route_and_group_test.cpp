// Backend::route_and_group (router product + route_top_k + group_by_expert in one call) on every
// backend: the CPU's composed default and CUDA's fused kernel for a few tokens (its fallback to the
// three ops for more). A fused product sums in another order than linear, so near-tied logits may
// choose differently; the check is therefore in two steps, each exact where it can be:
//   1. logits against a double-precision product within fp32 summation error;
//   2. every other output equal to what the CPU's route_top_k and group_by_expert (the references
//      of the op table) give for the backend's own logits.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/kernel_test_support.h"

#ifdef EPIC_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace epic {
namespace {

using namespace kernel_test;

struct RouteShape {
  int64_t tokens, hidden, experts, top_k;
  bool every_third_absent;
  const char* what;
};

struct RoutePoint {
  bool cuda;
  RouteShape shape;
  ScalarType router_type, input_type;
};

std::string point_name(const RoutePoint& p) {
  const RouteShape& s = p.shape;
  return std::string(s.what) + "_t" + std::to_string(s.tokens) + "_h" + std::to_string(s.hidden) + "_e" +
         std::to_string(s.experts) + "_k" + std::to_string(s.top_k) + "_w" + scalar_name(p.router_type) +
         "_x" + scalar_name(p.input_type) + (p.cuda ? "_cuda" : "_cpu");
}
void PrintTo(const RoutePoint& p, std::ostream* os) { *os << point_name(p); }

std::vector<RoutePoint> route_points() {
  // CUDA fuses 1..8 tokens with H % 8 == 0 (see cuda_kernels.h); the others take the three ops.
  const std::vector<RouteShape> shapes = {
      {1, 2048, 128, 8, false, "qwen3_decode"},  {8, 64, 60, 4, true, "third_absent"},
      {3, 136, 1024, 32, false, "many_experts"}, {5, 24, 8, 2, false, "few_experts"},
      {2, 40, 130, 1, true, "odd_experts"},      {17, 128, 128, 8, false, "unfused_tokens"},
      {1, 12, 8, 1, false, "unfused_hidden"},
  };
  std::vector<RoutePoint> points;
  for (const bool cuda : {false, true}) {
    for (const RouteShape& shape : shapes) {
      for (const ScalarType router : {ScalarType::kF32, ScalarType::kBF16}) {
        points.push_back({cuda, shape, router, ScalarType::kF32});  // the model's router input is f32
        if (cuda) points.push_back({cuda, shape, router, ScalarType::kBF16});
      }
    }
  }
  return points;
}

std::vector<uint8_t> encode(const std::vector<float>& values, ScalarType type) {
  std::vector<uint8_t> bytes(values.size() * scalar_size(type));
  for (size_t i = 0; i < values.size(); ++i) {
    if (type == ScalarType::kF32) {
      std::memcpy(&bytes[i * 4], &values[i], 4);
    } else {
      const uint16_t bits = to_bf16_bits(values[i]);
      std::memcpy(&bytes[i * 2], &bits, 2);
    }
  }
  return bytes;
}

template <class T>
std::vector<T> read_back(Backend& backend, const Tensor& tensor) {
  std::vector<T> values(static_cast<size_t>(tensor.numel()));
  backend.copy_to_host(tensor, 0, values.data(), tensor.bytes());
  return values;
}

class RouteAndGroup : public ::testing::TestWithParam<RoutePoint> {};

TEST_P(RouteAndGroup, MatchesTheComposedOpsOnItsOwnLogits) {
  const RoutePoint& p = GetParam();
  const RouteShape& s = p.shape;
  std::unique_ptr<Backend> backend;
  if (p.cuda) {
#ifdef EPIC_HAVE_CUDA
    if (cuda_device_count() == 0)
      GTEST_SKIP() << "no CUDA device: the fused CUDA routing runs on a GPU machine";
    backend = make_cuda_backend(0);
#else
    GTEST_SKIP() << "this build has no CUDA backend";
#endif
  } else {
    backend = make_cpu_backend();
  }
  const std::unique_ptr<Backend> reference = make_cpu_backend();
  std::mt19937_64 generator = case_generator(current_case_index());
  SCOPED_TRACE(seed_text());

  std::vector<uint8_t> present(static_cast<size_t>(s.experts), 1);
  if (s.every_third_absent) {
    for (int64_t e = 0; e < s.experts; e += 3) present[e] = 0;
  }
  OwnedTensor present_tensor = backend->new_tensor(ScalarType::kU8, {s.experts});
  backend->copy_from_host(present_tensor, 0, present.data(), present.size());
  OwnedTensor x = backend->new_tensor(p.input_type, {s.tokens, s.hidden});
  OwnedTensor router = backend->new_tensor(p.router_type, {s.experts, s.hidden});
  OwnedTensor logits = backend->new_tensor(ScalarType::kF32, {s.tokens, s.experts});
  OwnedTensor expert_ids = backend->new_tensor(ScalarType::kI32, {s.tokens, s.top_k});
  OwnedTensor weights = backend->new_tensor(ScalarType::kF32, {s.tokens, s.top_k});
  OwnedTensor offsets = backend->new_tensor(ScalarType::kI32, {s.experts + 1});
  OwnedTensor source_row = backend->new_tensor(ScalarType::kI32, {s.tokens * s.top_k});
  OwnedTensor sorted_position = backend->new_tensor(ScalarType::kI32, {s.tokens * s.top_k});

  // Twice with fresh inputs: the fused kernel's block counter must be ready again after a launch.
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    std::vector<float> x_values = random_values(generator, s.tokens * s.hidden);
    std::vector<float> router_values = random_values(generator, s.experts * s.hidden);
    if (p.input_type == ScalarType::kBF16) round_to_bf16(x_values);
    if (p.router_type == ScalarType::kBF16) round_to_bf16(router_values);
    const std::vector<uint8_t> x_bytes = encode(x_values, p.input_type);
    const std::vector<uint8_t> router_bytes = encode(router_values, p.router_type);
    backend->copy_from_host(x, 0, x_bytes.data(), x_bytes.size());
    backend->copy_from_host(router, 0, router_bytes.data(), router_bytes.size());
    const std::vector<int32_t> sentinel(static_cast<size_t>(s.tokens * s.top_k), -12345);
    backend->copy_from_host(source_row, 0, sentinel.data(), sentinel.size() * 4);
    backend->copy_from_host(sorted_position, 0, sentinel.data(), sentinel.size() * 4);
    backend->synchronize();

    backend->route_and_group(x, router, present_tensor, /*normalize=*/true, logits, expert_ids, weights,
                             offsets, source_row, sorted_position);
    const std::vector<float> got_logits = read_back<float>(*backend, logits);

    // 1. The product: fp32 sums of H terms, any order: well within 1e-5 of sum |x_i w_i|.
    std::vector<double> expected(got_logits.size()), magnitude(got_logits.size());
    reference_linear(x_values.data(), router_values.data(), s.tokens, s.hidden, s.experts, expected.data(),
                     magnitude.data());
    EXPECT_TRUE(all_close(got_logits, expected, magnitude, 1e-5)) << "logits";

    // 2. Routing and grouping of those logits by the CPU ops.
    OwnedTensor ref_logits = reference->new_tensor(ScalarType::kF32, {s.tokens, s.experts});
    OwnedTensor ref_present = reference->new_tensor(ScalarType::kU8, {s.experts});
    OwnedTensor ref_ids = reference->new_tensor(ScalarType::kI32, {s.tokens, s.top_k});
    OwnedTensor ref_weights = reference->new_tensor(ScalarType::kF32, {s.tokens, s.top_k});
    OwnedTensor ref_offsets = reference->new_tensor(ScalarType::kI32, {s.experts + 1});
    OwnedTensor ref_source = reference->new_tensor(ScalarType::kI32, {s.tokens * s.top_k});
    OwnedTensor ref_sorted = reference->new_tensor(ScalarType::kI32, {s.tokens * s.top_k});
    reference->copy_from_host(ref_logits, 0, got_logits.data(), got_logits.size() * 4);
    reference->copy_from_host(ref_present, 0, present.data(), present.size());
    reference->route_top_k(ref_logits, ref_present, ref_ids, ref_weights, true);
    reference->group_by_expert(ref_ids.view().reshaped({s.tokens * s.top_k}), s.experts, s.top_k, ref_offsets,
                               ref_source, ref_sorted);

    EXPECT_EQ(read_back<int32_t>(*backend, expert_ids), read_back<int32_t>(*reference, ref_ids))
        << "expert_ids";
    EXPECT_EQ(read_back<int32_t>(*backend, offsets), read_back<int32_t>(*reference, ref_offsets))
        << "offsets";
    EXPECT_EQ(read_back<int32_t>(*backend, source_row), read_back<int32_t>(*reference, ref_source))
        << "source_row";
    EXPECT_EQ(read_back<int32_t>(*backend, sorted_position), read_back<int32_t>(*reference, ref_sorted))
        << "sorted_position";
    // Weights: the op table's route_top_k tolerance (the GPU's expf is within 2 ulp).
    const std::vector<float> ref_weight_values = read_back<float>(*reference, ref_weights);
    std::vector<double> weight_scale(ref_weight_values.size());
    for (size_t i = 0; i < weight_scale.size(); ++i) weight_scale[i] = std::abs(ref_weight_values[i]);
    EXPECT_TRUE(
        all_close(read_back<float>(*backend, weights), to_double(ref_weight_values), weight_scale, 3e-6))
        << "weights";
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, RouteAndGroup, ::testing::ValuesIn(route_points()),
                         [](const ::testing::TestParamInfo<RoutePoint>& info) {
                           return point_name(info.param);
                         });

}  // namespace
}  // namespace epic
