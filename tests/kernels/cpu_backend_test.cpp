// The CPU reference backend against independent double-precision references (kernel_test_support.h),
// on random never-zero data with a per-run seed, over the shared shape tables; outputs NaN-prefilled.
#include <gtest/gtest.h>

#include <cstring>

#include "kernels/backend.h"
#include "kernels/error.h"
#include "tests/kernels/kernel_test_support.h"

namespace epic {
namespace {

using namespace kernel_test;

// ---- linear ----

class CpuLinear : public ::testing::TestWithParam<LinearShape> {};

TEST_P(CpuLinear, MatchesDoubleReference) {
  SCOPED_TRACE(seed_text());
  const LinearShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto x = random_values(generator, shape.rows * shape.in_dim);
  const auto w = random_values(generator, shape.out_dim * shape.in_dim);
  auto y = nan_filled(shape.rows * shape.out_dim);
  make_cpu_backend()->linear(x.data(), w.data(), y.data(), shape.rows, shape.in_dim, shape.out_dim);

  std::vector<double> expected, magnitude;
  reference_linear(x, w, shape.rows, shape.in_dim, shape.out_dim, expected, magnitude);
  // fp32 sums of in_dim/8 terms per lane: the random-walk error is ~1e-7 of sum |x_i w_i|, the
  // worst case (in_dim/8 + 3) * 2^-24 = 1.5e-5 at in_dim 2048.
  EXPECT_TRUE(all_close(y, expected, magnitude, 1e-5));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuLinear, ::testing::ValuesIn(kLinearShapes), ParamName());

// Thread counts split the out dimension differently; each element must still be summed in the
// same order. 37 x 2048 x 4099 is far above the work needed to start 16 threads.
TEST(CpuLinearThreads, SameBitsForAnyThreadCount) {
  SCOPED_TRACE(seed_text());
  constexpr int64_t kRows = 37, kInDim = 2048, kOutDim = 4099;
  auto generator = case_generator(current_case_index());
  const auto x = random_values(generator, kRows * kInDim);
  const auto w = random_values(generator, kOutDim * kInDim);
  auto single_threaded = nan_filled(kRows * kOutDim);
  make_cpu_backend(1)->linear(x.data(), w.data(), single_threaded.data(), kRows, kInDim, kOutDim);
  for (int num_threads : {2, 3, 5, 16}) {
    SCOPED_TRACE("num_threads " + std::to_string(num_threads));
    auto y = nan_filled(kRows * kOutDim);
    make_cpu_backend(num_threads)->linear(x.data(), w.data(), y.data(), kRows, kInDim, kOutDim);
    EXPECT_EQ(0, std::memcmp(y.data(), single_threaded.data(), y.size() * sizeof(float)))
        << "linear with " << num_threads << " threads differs from 1 thread";
  }
}

// ---- rms_norm ----

class CpuRmsNorm : public ::testing::TestWithParam<RmsNormShape> {};

// A few fp32 roundings per element (the mean square is summed in double): 1e-6 relative.
constexpr double kCpuRmsNormTolerance = 1e-6;

TEST_P(CpuRmsNorm, MatchesDoubleReference) {
  SCOPED_TRACE(seed_text());
  const RmsNormShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto x = random_values(generator, shape.rows * shape.dim, 3.0f);
  const auto weight = random_values(generator, shape.dim);
  auto y = nan_filled(shape.rows * shape.dim);
  make_cpu_backend()->rms_norm(x.data(), weight.data(), y.data(), shape.rows, shape.dim, kRmsNormEps);
  const auto expected = reference_rms_norm(x, weight, shape.rows, shape.dim, kRmsNormEps);
  EXPECT_TRUE(all_close(y, expected, absolute(expected), kCpuRmsNormTolerance));
}

TEST_P(CpuRmsNorm, InPlaceMatchesDoubleReference) {
  SCOPED_TRACE(seed_text());
  const RmsNormShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto x = random_values(generator, shape.rows * shape.dim, 3.0f);
  const auto weight = random_values(generator, shape.dim);
  auto y = x;
  make_cpu_backend()->rms_norm(y.data(), weight.data(), y.data(), shape.rows, shape.dim, kRmsNormEps);
  const auto expected = reference_rms_norm(x, weight, shape.rows, shape.dim, kRmsNormEps);
  EXPECT_TRUE(all_close(y, expected, absolute(expected), kCpuRmsNormTolerance));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuRmsNorm, ::testing::ValuesIn(kRmsNormShapes), ParamName());

// ---- rope ----

class CpuRope : public ::testing::TestWithParam<RopeShape> {};

std::vector<int32_t> random_positions(std::mt19937_64& generator, int64_t num_tokens, int32_t max_position) {
  std::uniform_int_distribution<int32_t> position(0, max_position);
  std::vector<int32_t> positions(static_cast<size_t>(num_tokens));
  for (int32_t& p : positions) p = position(generator);
  return positions;
}

TEST_P(CpuRope, MatchesDoubleReference) {
  SCOPED_TRACE(seed_text());
  const RopeShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto x = random_values(generator, shape.num_tokens * shape.num_heads * shape.head_dim);
  const auto positions = random_positions(generator, shape.num_tokens, shape.max_position);
  auto y = x;
  make_cpu_backend()->rope(y.data(), positions.data(), shape.num_tokens, shape.num_heads, shape.head_dim,
                           shape.theta);
  std::vector<double> expected, magnitude;
  reference_rope(x, positions, shape.num_tokens, shape.num_heads, shape.head_dim, shape.theta, expected,
                 magnitude);
  // Same double angle as the reference; cos/sin rounded to fp32 and two fp32 products and a sum.
  EXPECT_TRUE(all_close(y, expected, magnitude, 1e-6));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuRope, ::testing::ValuesIn(kRopeShapes), ParamName());

// ---- attention ----

class CpuAttention : public ::testing::TestWithParam<AttentionShape> {};

TEST_P(CpuAttention, MatchesDoubleReference) {
  SCOPED_TRACE(seed_text());
  const AttentionShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const int64_t num_keys = shape.first_position + shape.num_queries;
  const auto q =
      random_values(generator, shape.num_queries * shape.num_heads * shape.head_dim, shape.amplitude);
  const auto k = random_values(generator, num_keys * shape.num_kv_heads * shape.head_dim, shape.amplitude);
  const auto v = random_values(generator, num_keys * shape.num_kv_heads * shape.head_dim);
  auto out = nan_filled(shape.num_queries * shape.num_heads * shape.head_dim);
  make_cpu_backend()->attention(q.data(), k.data(), v.data(), out.data(), shape.num_queries, num_keys,
                                shape.first_position, shape.num_heads, shape.num_kv_heads, shape.head_dim);
  std::vector<double> expected, magnitude;
  reference_attention(q, k, v, shape, expected, magnitude);
  EXPECT_TRUE(all_close(out, expected, magnitude, shape.cpu_tolerance));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuAttention, ::testing::ValuesIn(kAttentionShapes), ParamName());

// Query i sees keys 0 .. first_position + i only: with v = the key index (data that identifies
// itself) and equal scores, out must be the mean of 0 .. first_position + i.
TEST(CpuAttentionMask, EqualScoresAverageTheVisibleKeys) {
  constexpr int64_t kNumQueries = 4, kFirstPosition = 3, kHeads = 4, kKvHeads = 2, kHeadDim = 8;
  constexpr int64_t kNumKeys = kFirstPosition + kNumQueries;
  std::vector<float> q(kNumQueries * kHeads * kHeadDim, 0.25f);
  std::vector<float> k(kNumKeys * kKvHeads * kHeadDim, 0.5f);
  std::vector<float> v(kNumKeys * kKvHeads * kHeadDim);
  for (int64_t key = 0; key < kNumKeys; ++key) {
    for (int64_t i = 0; i < kKvHeads * kHeadDim; ++i)
      v[key * kKvHeads * kHeadDim + i] = static_cast<float>(key);
  }
  auto out = nan_filled(kNumQueries * kHeads * kHeadDim);
  make_cpu_backend()->attention(q.data(), k.data(), v.data(), out.data(), kNumQueries, kNumKeys,
                                kFirstPosition, kHeads, kKvHeads, kHeadDim);
  for (int64_t query = 0; query < kNumQueries; ++query) {
    const double mean_visible = static_cast<double>(kFirstPosition + query) / 2.0;
    for (int64_t i = 0; i < kHeads * kHeadDim; ++i) {
      EXPECT_NEAR(out[query * kHeads * kHeadDim + i], mean_visible, 1e-6)
          << "query " << query << " element " << i;
    }
  }
}

// ---- silu_mul ----

class CpuSiluMul : public ::testing::TestWithParam<SiluMulShape> {};

TEST_P(CpuSiluMul, MatchesDoubleReference) {
  SCOPED_TRACE(seed_text());
  const SiluMulShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto gate = random_values(generator, shape.n, shape.gate_amplitude);
  const auto up = random_values(generator, shape.n);
  auto out = nan_filled(shape.n);
  make_cpu_backend()->silu_mul(gate.data(), up.data(), out.data(), shape.n);
  const auto expected = reference_silu_mul(gate, up);
  // expf (< 1 ulp in glibc), an add, a divide and a multiply: a few ulp.
  EXPECT_TRUE(all_close(out, expected, absolute(expected), 1e-6));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuSiluMul, ::testing::ValuesIn(kSiluMulShapes), ParamName());

// ---- route_top_k ----

class CpuRouteTopK : public ::testing::TestWithParam<RouteShape> {};

TEST_P(CpuRouteTopK, MatchesFullSortReference) {
  SCOPED_TRACE(seed_text());
  const RouteShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto present = make_present(generator, shape);
  const auto logits = make_router_logits(generator, shape, present);
  std::vector<int32_t> ids(static_cast<size_t>(shape.num_tokens * shape.top_k), -12345);
  auto weights = nan_filled(shape.num_tokens * shape.top_k);
  make_cpu_backend()->route_top_k(logits.data(), present.data(), ids.data(), weights.data(), shape.num_tokens,
                                  shape.num_experts, shape.top_k, shape.normalize_top_k);

  std::vector<int32_t> expected_ids;
  std::vector<double> expected_weights;
  reference_route_top_k(logits, present, shape, expected_ids, expected_weights);
  // Logits 0.05 apart make probabilities differ by 5%, far above fp32 noise, so the ids must match
  // exactly; exact ties must resolve to the lower id in both.
  EXPECT_EQ(ids, expected_ids);
  // fp32 exp, fp32 sums of up to 128 terms (denominator, renormalisation), one or two divisions:
  // measured up to 5e-7 (top-128 renormalised), so 2e-6.
  EXPECT_TRUE(all_close(weights, expected_weights, absolute(expected_weights), 2e-6));
  for (size_t j = 0; j < ids.size(); ++j) {
    ASSERT_TRUE(ids[j] >= 0 && ids[j] < shape.num_experts && present[ids[j]])
        << "id " << ids[j] << " at " << j;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuRouteTopK, ::testing::ValuesIn(kRouteShapes), ParamName());

// The fixed example of the contract: experts 0..4, expert 2 absent with the largest logit, experts
// 1 and 3 tied. Softmax over {0, 1, 3, 4} only; the tie goes to expert 1.
TEST(CpuRouteTopKExample, MaskedExpertAndTieFollowTheContract) {
  const std::vector<float> logits = {0.0f, 1.0f, 9.0f, 1.0f, -1.0f};
  const std::vector<uint8_t> present = {1, 1, 0, 1, 1};
  std::vector<int32_t> ids(3, -1);
  std::vector<float> weights(3, NAN);
  make_cpu_backend()->route_top_k(logits.data(), present.data(), ids.data(), weights.data(), 1, 5, 3, false);
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 3, 0}));
  const double denominator = 2 * std::exp(1.0) + 1.0 + std::exp(-1.0);
  EXPECT_NEAR(weights[0], std::exp(1.0) / denominator, 1e-7);
  EXPECT_NEAR(weights[1], std::exp(1.0) / denominator, 1e-7);
  EXPECT_NEAR(weights[2], 1.0 / denominator, 1e-7);

  make_cpu_backend()->route_top_k(logits.data(), present.data(), ids.data(), weights.data(), 1, 5, 3, true);
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 3, 0}));
  const double selected = 2 * std::exp(1.0) + 1.0;
  EXPECT_NEAR(weights[0], std::exp(1.0) / selected, 1e-7);
  EXPECT_NEAR(weights[2], 1.0 / selected, 1e-7);
}

// ---- scaled_add_rows and add ----

class CpuRows : public ::testing::TestWithParam<RowsShape> {};

TEST_P(CpuRows, ScaledAddRowsMatchesDoubleReference) {
  SCOPED_TRACE(seed_text());
  const RowsShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto x = random_values(generator, shape.rows * shape.dim);
  const auto scale = random_values(generator, shape.rows, 2.0f);
  const auto y_before = random_values(generator, shape.rows * shape.dim);
  auto y = y_before;
  make_cpu_backend()->scaled_add_rows(x.data(), scale.data(), y.data(), shape.rows, shape.dim);
  std::vector<double> expected(y.size()), magnitude(y.size());
  for (int64_t r = 0; r < shape.rows; ++r) {
    for (int64_t i = 0; i < shape.dim; ++i) {
      const size_t at = static_cast<size_t>(r * shape.dim + i);
      expected[at] = y_before[at] + static_cast<double>(scale[r]) * x[at];
      magnitude[at] = std::abs(y_before[at]) + std::abs(static_cast<double>(scale[r]) * x[at]);
    }
  }
  // Two fp32 roundings (product, sum): <= 2^-23 of |y| + |s x|.
  EXPECT_TRUE(all_close(y, expected, magnitude, 2e-7));
}

TEST_P(CpuRows, AddMatchesDoubleReference) {
  SCOPED_TRACE(seed_text());
  const int64_t n = GetParam().rows * GetParam().dim;
  auto generator = case_generator(current_case_index());
  const auto x = random_values(generator, n);
  const auto y_before = random_values(generator, n);
  auto y = y_before;
  make_cpu_backend()->add(x.data(), y.data(), n);
  std::vector<double> expected(y.size()), magnitude(y.size());
  for (size_t i = 0; i < y.size(); ++i) {
    expected[i] = static_cast<double>(y_before[i]) + x[i];
    magnitude[i] = std::abs(y_before[i]) + std::abs(x[i]);
  }
  // One fp32 rounding: <= 2^-24 of |x| + |y|.
  EXPECT_TRUE(all_close(y, expected, magnitude, 1e-7));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuRows, ::testing::ValuesIn(kRowsShapes), ParamName());

// ---- invalid arguments ----

TEST(CpuBackendErrors, InvalidArgumentsThrowBeforeTouchingMemory) {
  const auto backend = make_cpu_backend();
  const uint8_t present3of8[8] = {1, 1, 1, 0, 0, 0, 0, 0};
  for (const InvalidCall& invalid : invalid_calls()) {
    SCOPED_TRACE(invalid.name);
    try {
      invalid.call(*backend, present3of8);
      ADD_FAILURE() << "no exception";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument) << error.what();
      EXPECT_NE(std::string(error.what()).find(invalid.expected_text), std::string::npos)
          << "message: " << error.what() << "\nexpected to contain: " << invalid.expected_text;
      EXPECT_NE(std::string(error.what()).find("cpu backend"), std::string::npos) << error.what();
    }
  }
}

TEST(CpuBackendErrors, EmptyShapesWriteNothing) {
  const auto backend = make_cpu_backend();
  float sentinel = 7.0f;
  backend->linear(nullptr, nullptr, &sentinel, 0, 16, 16);
  backend->linear(nullptr, nullptr, &sentinel, 16, 16, 0);
  backend->rms_norm(nullptr, nullptr, &sentinel, 0, 16, 1e-6f);
  backend->attention(nullptr, nullptr, nullptr, &sentinel, 0, 0, 0, 4, 2, 8);
  backend->silu_mul(nullptr, nullptr, &sentinel, 0);
  backend->add(nullptr, &sentinel, 0);
  EXPECT_EQ(sentinel, 7.0f);
}

}  // namespace
}  // namespace epic
