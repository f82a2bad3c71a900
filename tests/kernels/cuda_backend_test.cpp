// Every CUDA backend op against the CPU backend on the same random inputs (copied to the device),
// over the shapes of kernel_test_support.h, outputs NaN-prefilled on the device. Without a GPU the
// op tests skip visibly; the error-reporting tests run everywhere.
#include <gtest/gtest.h>

#include "kernels/backend.h"
#include "kernels/error.h"
#include "tests/kernels/kernel_test_support.h"

#ifdef EPIC_HAVE_CUDA

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_check.h"

namespace epic {
namespace {

using namespace kernel_test;

// A device copy of a host vector; download() brings it back. Freed on scope exit.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(const std::vector<T>& host) : size_(host.size()) {
    EPIC_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), std::max<size_t>(size_, 1) * sizeof(T)));
    if (size_ > 0) EPIC_CUDA_CHECK(cudaMemcpy(data_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() { return data_; }
  // cudaMemcpy on the legacy default stream waits for the backend's (blocking) stream.
  std::vector<T> download() const {
    std::vector<T> host(size_);
    if (size_ > 0) EPIC_CUDA_CHECK(cudaMemcpy(host.data(), data_, size_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* data_ = nullptr;
  size_t size_;
};

// The op tests: skipped, visibly, where there is no CUDA device.
class CudaVsCpu {
 protected:
  void set_up() {
    if (cuda_device_count() == 0) {
      GTEST_SKIP() << "no CUDA device: cuda_device_count() == 0 (no driver or no GPU); the CUDA backend "
                      "is compiled here but its ops are only checked on a GPU machine";
    }
    cuda_ = make_cuda_backend(0);
    cpu_ = make_cpu_backend();
  }
  std::unique_ptr<Backend> cuda_;
  std::unique_ptr<Backend> cpu_;
};

template <typename Shape>
class CudaOpTest : public ::testing::TestWithParam<Shape>, public CudaVsCpu {
 protected:
  void SetUp() override { set_up(); }
};

// ---- linear ----

using CudaLinear = CudaOpTest<LinearShape>;

TEST_P(CudaLinear, MatchesCpu) {
  SCOPED_TRACE(seed_text());
  const LinearShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto x = random_values(generator, shape.rows * shape.in_dim);
  const auto w = random_values(generator, shape.out_dim * shape.in_dim);
  auto cpu_y = nan_filled(shape.rows * shape.out_dim);
  cpu_->linear(x.data(), w.data(), cpu_y.data(), shape.rows, shape.in_dim, shape.out_dim);
  DeviceBuffer<float> x_device(x), w_device(w), y_device(nan_filled(shape.rows * shape.out_dim));
  cuda_->linear(x_device.get(), w_device.get(), y_device.get(), shape.rows, shape.in_dim, shape.out_dim);

  std::vector<double> exact, magnitude;
  reference_linear(x, w, shape.rows, shape.in_dim, shape.out_dim, exact, magnitude);
  // Both are fp32 sums, ~1e-7 of sum |x_i w_i| from the exact value whatever the order. TF32
  // (10-bit mantissa inputs) would be ~1e-5 at in_dim 2048 and fail, as it should.
  EXPECT_TRUE(all_close(y_device.download(), to_double(cpu_y), magnitude, 2e-6));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaLinear, ::testing::ValuesIn(kLinearShapes), ParamName());

// ---- rms_norm ----

using CudaRmsNorm = CudaOpTest<RmsNormShape>;

TEST_P(CudaRmsNorm, MatchesCpuAlsoInPlace) {
  SCOPED_TRACE(seed_text());
  const RmsNormShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto x = random_values(generator, shape.rows * shape.dim, 3.0f);
  const auto weight = random_values(generator, shape.dim);
  auto cpu_y = nan_filled(shape.rows * shape.dim);
  cpu_->rms_norm(x.data(), weight.data(), cpu_y.data(), shape.rows, shape.dim, kRmsNormEps);
  const auto expected = to_double(cpu_y);
  // The GPU sums the squares in fp32 in a tree (the CPU in double): 2e-6 relative.
  constexpr double kTolerance = 2e-6;

  DeviceBuffer<float> x_device(x), weight_device(weight), y_device(nan_filled(shape.rows * shape.dim));
  cuda_->rms_norm(x_device.get(), weight_device.get(), y_device.get(), shape.rows, shape.dim, kRmsNormEps);
  EXPECT_TRUE(all_close(y_device.download(), expected, absolute(expected), kTolerance)) << "out of place";

  cuda_->rms_norm(x_device.get(), weight_device.get(), x_device.get(), shape.rows, shape.dim, kRmsNormEps);
  EXPECT_TRUE(all_close(x_device.download(), expected, absolute(expected), kTolerance)) << "in place";
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaRmsNorm, ::testing::ValuesIn(kRmsNormShapes), ParamName());

// ---- rope ----

using CudaRope = CudaOpTest<RopeShape>;

TEST_P(CudaRope, MatchesCpu) {
  SCOPED_TRACE(seed_text());
  const RopeShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto x = random_values(generator, shape.num_tokens * shape.num_heads * shape.head_dim);
  std::uniform_int_distribution<int32_t> position(0, shape.max_position);
  std::vector<int32_t> positions(static_cast<size_t>(shape.num_tokens));
  for (int32_t& p : positions) p = position(generator);
  auto cpu_y = x;
  cpu_->rope(cpu_y.data(), positions.data(), shape.num_tokens, shape.num_heads, shape.head_dim, shape.theta);
  DeviceBuffer<float> x_device(x);
  DeviceBuffer<int32_t> positions_device(positions);
  cuda_->rope(x_device.get(), positions_device.get(), shape.num_tokens, shape.num_heads, shape.head_dim,
              shape.theta);
  std::vector<double> exact, magnitude;
  reference_rope(x, positions, shape.num_tokens, shape.num_heads, shape.head_dim, shape.theta, exact,
                 magnitude);
  // Same double angles (device pow/sincos are within 1-2 ulp of double); the GPU may fuse the
  // products into FMAs: 1e-6 of |x_i cos| + |x_{i+half} sin|.
  EXPECT_TRUE(all_close(x_device.download(), to_double(cpu_y), magnitude, 1e-6));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaRope, ::testing::ValuesIn(kRopeShapes), ParamName());

// ---- attention ----

using CudaAttention = CudaOpTest<AttentionShape>;

TEST_P(CudaAttention, MatchesCpu) {
  SCOPED_TRACE(seed_text());
  const AttentionShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const int64_t num_keys = shape.first_position + shape.num_queries;
  const auto q =
      random_values(generator, shape.num_queries * shape.num_heads * shape.head_dim, shape.amplitude);
  const auto k = random_values(generator, num_keys * shape.num_kv_heads * shape.head_dim, shape.amplitude);
  const auto v = random_values(generator, num_keys * shape.num_kv_heads * shape.head_dim);
  auto cpu_out = nan_filled(shape.num_queries * shape.num_heads * shape.head_dim);
  cpu_->attention(q.data(), k.data(), v.data(), cpu_out.data(), shape.num_queries, num_keys,
                  shape.first_position, shape.num_heads, shape.num_kv_heads, shape.head_dim);
  DeviceBuffer<float> q_device(q), k_device(k), v_device(v), out_device(nan_filled(cpu_out.size()));
  cuda_->attention(q_device.get(), k_device.get(), v_device.get(), out_device.get(), shape.num_queries,
                   num_keys, shape.first_position, shape.num_heads, shape.num_kv_heads, shape.head_dim);
  std::vector<double> exact, magnitude;
  reference_attention(q, k, v, shape, exact, magnitude);
  EXPECT_TRUE(all_close(out_device.download(), to_double(cpu_out), magnitude, shape.cuda_tolerance));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaAttention, ::testing::ValuesIn(kAttentionShapes), ParamName());

// ---- silu_mul ----

using CudaSiluMul = CudaOpTest<SiluMulShape>;

TEST_P(CudaSiluMul, MatchesCpu) {
  SCOPED_TRACE(seed_text());
  const SiluMulShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto gate = random_values(generator, shape.n, shape.gate_amplitude);
  const auto up = random_values(generator, shape.n);
  auto cpu_out = nan_filled(shape.n);
  cpu_->silu_mul(gate.data(), up.data(), cpu_out.data(), shape.n);
  DeviceBuffer<float> gate_device(gate), up_device(up), out_device(nan_filled(shape.n));
  cuda_->silu_mul(gate_device.get(), up_device.get(), out_device.get(), shape.n);
  const auto expected = to_double(cpu_out);
  // CUDA expf is within 2 ulp (glibc's within 1), then an add, a divide and a multiply on each:
  // up to ~4e-7 apart (the CPU alone is up to ~2e-7 from double).
  EXPECT_TRUE(all_close(out_device.download(), expected, absolute(expected), 2e-6));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaSiluMul, ::testing::ValuesIn(kSiluMulShapes), ParamName());

// ---- route_top_k ----

using CudaRouteTopK = CudaOpTest<RouteShape>;

TEST_P(CudaRouteTopK, MatchesCpu) {
  SCOPED_TRACE(seed_text());
  const RouteShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto present = make_present(generator, shape);
  const auto logits = make_router_logits(generator, shape, present);
  const int64_t num_outputs = shape.num_tokens * shape.top_k;
  std::vector<int32_t> cpu_ids(static_cast<size_t>(num_outputs), -12345);
  auto cpu_weights = nan_filled(num_outputs);
  cpu_->route_top_k(logits.data(), present.data(), cpu_ids.data(), cpu_weights.data(), shape.num_tokens,
                    shape.num_experts, shape.top_k, shape.normalize_top_k);
  DeviceBuffer<float> logits_device(logits), weights_device(nan_filled(num_outputs));
  DeviceBuffer<uint8_t> present_device(present);
  DeviceBuffer<int32_t> ids_device(std::vector<int32_t>(static_cast<size_t>(num_outputs), -12345));
  cuda_->route_top_k(logits_device.get(), present_device.get(), ids_device.get(), weights_device.get(),
                     shape.num_tokens, shape.num_experts, shape.top_k, shape.normalize_top_k);
  // No near-ties in the data (logits 0.05 apart) and exact ties give bitwise-equal probabilities:
  // the ids must be identical. Weights: same summation order, but expf within 2 ulp on the GPU
  // (1 in glibc) over up to 128 terms; the CPU alone is up to 5e-7 from double.
  EXPECT_EQ(ids_device.download(), cpu_ids);
  const auto expected = to_double(cpu_weights);
  EXPECT_TRUE(all_close(weights_device.download(), expected, absolute(expected), 3e-6));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaRouteTopK, ::testing::ValuesIn(kRouteShapes), ParamName());

// ---- scaled_add_rows and add ----

using CudaRows = CudaOpTest<RowsShape>;

TEST_P(CudaRows, ScaledAddRowsMatchesCpu) {
  SCOPED_TRACE(seed_text());
  const RowsShape shape = GetParam();
  auto generator = case_generator(current_case_index());
  const auto x = random_values(generator, shape.rows * shape.dim);
  const auto scale = random_values(generator, shape.rows, 2.0f);
  const auto y_before = random_values(generator, shape.rows * shape.dim);
  auto cpu_y = y_before;
  cpu_->scaled_add_rows(x.data(), scale.data(), cpu_y.data(), shape.rows, shape.dim);
  DeviceBuffer<float> x_device(x), scale_device(scale), y_device(y_before);
  cuda_->scaled_add_rows(x_device.get(), scale_device.get(), y_device.get(), shape.rows, shape.dim);
  std::vector<double> magnitude(cpu_y.size());
  for (size_t i = 0; i < magnitude.size(); ++i) {
    magnitude[i] = std::abs(y_before[i]) + std::abs(static_cast<double>(scale[i / shape.dim]) * x[i]);
  }
  // The GPU may fuse y + s * x into one FMA (one rounding instead of two): the results can differ
  // by the product's rounding plus one ulp of the sum, <= 3 * 2^-24 of |y| + |s x|.
  EXPECT_TRUE(all_close(y_device.download(), to_double(cpu_y), magnitude, 4e-7));
}

TEST_P(CudaRows, AddIsBitwiseEqualToCpu) {
  SCOPED_TRACE(seed_text());
  const int64_t n = GetParam().rows * GetParam().dim;
  auto generator = case_generator(current_case_index());
  const auto x = random_values(generator, n);
  const auto y_before = random_values(generator, n);
  auto cpu_y = y_before;
  cpu_->add(x.data(), cpu_y.data(), n);
  DeviceBuffer<float> x_device(x), y_device(y_before);
  cuda_->add(x_device.get(), y_device.get(), n);
  // One correctly rounded fp32 add on both: exactly equal.
  EXPECT_TRUE(all_close(y_device.download(), to_double(cpu_y), std::vector<double>(cpu_y.size(), 1.0), 0.0));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaRows, ::testing::ValuesIn(kRowsShapes), ParamName());

// ---- errors ----

class CudaBackendErrors : public ::testing::Test, public CudaVsCpu {
 protected:
  void SetUp() override { set_up(); }
};

TEST_F(CudaBackendErrors, InvalidArgumentsThrowBeforeTouchingMemory) {
  DeviceBuffer<uint8_t> present3of8(std::vector<uint8_t>{1, 1, 1, 0, 0, 0, 0, 0});
  for (const InvalidCall& invalid : invalid_calls()) {
    SCOPED_TRACE(invalid.name);
    try {
      invalid.call(*cuda_, present3of8.get());
      ADD_FAILURE() << "no exception";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument) << error.what();
      EXPECT_NE(std::string(error.what()).find(invalid.expected_text), std::string::npos)
          << "message: " << error.what() << "\nexpected to contain: " << invalid.expected_text;
      EXPECT_NE(std::string(error.what()).find("cuda backend"), std::string::npos) << error.what();
    }
  }
  // The device must still be healthy: no sticky error from the rejected calls.
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

TEST_F(CudaBackendErrors, HeadDimAboveTheKernelLimitIsUnsupported) {
  try {
    cuda_->attention(nullptr, nullptr, nullptr, nullptr, 1, 1, 0, 1, 1, 258);
    ADD_FAILURE() << "no exception";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), ErrorCode::kUnsupported) << error.what();
  }
}

// These run everywhere, GPU or not.

TEST(CudaDeviceCount, NeverThrowsAndLeavesNoError) {
  const int count = cuda_device_count();
  EXPECT_GE(count, 0);
  EXPECT_EQ(cuda_device_count(), count) << "a second call must give the same answer";
  // Without a driver every runtime call keeps returning cudaErrorInsufficientDriver, so a clean
  // "last error" can only be asked for where a device exists.
  if (count > 0) {
    EXPECT_EQ(cudaGetLastError(), cudaSuccess) << "cuda_device_count() left an error behind";
  }
}

TEST(CudaDeviceCount, MakeBackendRejectsMissingOrOutOfRangeDevices) {
  const int count = cuda_device_count();
  try {
    make_cuda_backend(count);  // one past the last device (device 0 when there is none)
    ADD_FAILURE() << "no exception";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), count == 0 ? ErrorCode::kUnsupported : ErrorCode::kInvalidArgument)
        << error.what();
  }
}

TEST(CudaCheck, NamesStatementFileLineAndError) {
  const auto failing_call = [] { return cudaErrorInvalidValue; };
  try {
    EPIC_CUDA_CHECK(failing_call());
    ADD_FAILURE() << "no exception";
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_EQ(error.code(), ErrorCode::kInternal);
    EXPECT_NE(message.find("failing_call()"), std::string::npos) << message;
    EXPECT_NE(message.find("cuda_backend_test.cpp:"), std::string::npos) << message;
    EXPECT_NE(message.find("on CUDA device"), std::string::npos) << message;
    EXPECT_NE(message.find("cudaErrorInvalidValue"), std::string::npos) << message;
  }
  try {
    EPIC_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE);
    ADD_FAILURE() << "no exception";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), ErrorCode::kInternal);
    EXPECT_NE(std::string(error.what()).find("CUBLAS_STATUS_INVALID_VALUE"), std::string::npos)
        << error.what();
  }
}

}  // namespace
}  // namespace epic

#else  // !EPIC_HAVE_CUDA

TEST(CudaBackend, NotBuilt) {
  GTEST_SKIP() << "built without CUDA (nvcc not found or EPIC_ENABLE_CUDA=OFF): no CUDA backend to test";
}

#endif  // EPIC_HAVE_CUDA
