// CudaBackend: owns a stream and a cuBLAS handle on one device, validates arguments on the host
// and launches the kernels of cuda_kernels.h (linear goes to cuBLAS sgemm).
#include "kernels/cuda/cuda_backend.h"

#include <algorithm>
#include <climits>
#include <string>
#include <vector>

#include "kernels/backend_checks.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/error.h"

namespace epic {
namespace {

constexpr const char* kBackendName = "cuda";

// Makes device current for one scope and restores the caller's device after it, so a backend
// works whatever device the calling thread had selected.
class DeviceScope {
 public:
  explicit DeviceScope(int device) : device_(device) {
    EPIC_CUDA_CHECK(cudaGetDevice(&previous_device_));
    if (previous_device_ != device_) EPIC_CUDA_CHECK(cudaSetDevice(device_));
  }
  ~DeviceScope() {
    if (previous_device_ != device_) cudaSetDevice(previous_device_);  // no throwing from a destructor
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int device_;
  int previous_device_ = 0;
};

void check_fits_int(const char* op, const char* name, int64_t value) {
  if (value > INT_MAX) {
    throw Error(ErrorCode::kUnsupported, std::string("cuda backend ") + op + ": " + name + " = " +
                                             std::to_string(value) + " exceeds the 32-bit sizes of cuBLAS");
  }
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    DeviceScope scope(device_);
    // A blocking stream: it synchronises with the legacy default stream, so callers' plain
    // cudaMemcpy calls are ordered after the ops.
    EPIC_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamDefault));
    try {
      EPIC_CUBLAS_CHECK(cublasCreate(&cublas_));
      EPIC_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
      // Plain fp32: no TF32 tensor-op math, so linear stays within fp32 rounding of the CPU.
      EPIC_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
    } catch (...) {
      if (cublas_ != nullptr) cublasDestroy(cublas_);
      cudaStreamDestroy(stream_);
      throw;
    }
  }

  ~CudaBackend() override {
    int previous_device = 0;
    const bool switched = cudaGetDevice(&previous_device) == cudaSuccess && previous_device != device_ &&
                          cudaSetDevice(device_) == cudaSuccess;
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
    if (switched) cudaSetDevice(previous_device);
  }

  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda(device " + std::to_string(device_) + ")"; }

  // Row-major y[rows, out] = x[rows, in] * w[out, in]^T is, in cuBLAS's column-major terms,
  // y^T[out, rows] = op_T(w as [in, out]) * (x as [in, rows]).
  void linear(const float* x, const float* w, float* y, int64_t rows, int64_t in_dim,
              int64_t out_dim) override {
    backend_checks::check_linear(kBackendName, rows, in_dim, out_dim);
    check_fits_int("linear", "rows", rows);
    check_fits_int("linear", "in_dim", in_dim);
    check_fits_int("linear", "out_dim", out_dim);
    if (rows == 0 || out_dim == 0) return;
    DeviceScope scope(device_);
    if (in_dim == 0) {  // an empty sum; cuBLAS rejects a leading dimension of 0
      EPIC_CUDA_CHECK(cudaMemsetAsync(y, 0, static_cast<size_t>(rows * out_dim) * sizeof(float), stream_));
      return;
    }
    const float alpha = 1.0f;
    const float beta = 0.0f;
    EPIC_CUBLAS_CHECK(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out_dim),
                                   static_cast<int>(rows), static_cast<int>(in_dim), &alpha, w, CUDA_R_32F,
                                   static_cast<int>(in_dim), x, CUDA_R_32F, static_cast<int>(in_dim), &beta,
                                   y, CUDA_R_32F, static_cast<int>(out_dim), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
  }

  void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim,
                float eps) override {
    backend_checks::check_rms_norm(kBackendName, rows, dim);
    if (rows == 0 || dim == 0) return;
    DeviceScope scope(device_);
    cuda_kernels::rms_norm(x, weight, y, rows, dim, eps, stream_);
  }

  void rope(float* x, const int32_t* positions, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
            double theta) override {
    backend_checks::check_rope(kBackendName, num_tokens, num_heads, head_dim, theta);
    if (num_tokens == 0 || num_heads == 0 || head_dim == 0) return;
    DeviceScope scope(device_);
    cuda_kernels::rope(x, positions, num_tokens, num_heads, head_dim, theta, stream_);
  }

  void attention(const float* q, const float* k, const float* v, float* out, int64_t num_queries,
                 int64_t num_keys, int64_t first_position, int64_t num_heads, int64_t num_kv_heads,
                 int64_t head_dim) override {
    backend_checks::check_attention(kBackendName, num_queries, num_keys, first_position, num_heads,
                                    num_kv_heads, head_dim);
    if (head_dim > cuda_kernels::kMaxAttentionHeadDim) {
      throw Error(ErrorCode::kUnsupported, "cuda backend attention: head_dim = " + std::to_string(head_dim) +
                                               " exceeds the supported " +
                                               std::to_string(cuda_kernels::kMaxAttentionHeadDim));
    }
    check_fits_int("attention", "num_queries * num_heads", num_queries * num_heads);
    if (num_queries == 0 || num_heads == 0 || head_dim == 0) return;
    DeviceScope scope(device_);
    cuda_kernels::attention(q, k, v, out, num_queries, first_position, num_heads, num_kv_heads, head_dim,
                            stream_);
  }

  void silu_mul(const float* gate, const float* up, float* out, int64_t n) override {
    backend_checks::check_silu_mul(kBackendName, n);
    if (n == 0) return;
    DeviceScope scope(device_);
    cuda_kernels::silu_mul(gate, up, out, n, stream_);
  }

  void route_top_k(const float* logits, const uint8_t* present, int32_t* expert_ids, float* weights,
                   int64_t num_tokens, int64_t num_experts, int64_t top_k, bool normalize_top_k) override {
    DeviceScope scope(device_);
    // top_k must not exceed the present experts, or the kernel would run out of candidates; the
    // mask is small, so read it back (this waits for the stream).
    int64_t num_present = 0;
    if (num_experts > 0) {
      std::vector<uint8_t> present_host(static_cast<size_t>(num_experts));
      EPIC_CUDA_CHECK(cudaMemcpyAsync(present_host.data(), present, present_host.size(),
                                      cudaMemcpyDeviceToHost, stream_));
      EPIC_CUDA_CHECK(cudaStreamSynchronize(stream_));
      num_present = std::count_if(present_host.begin(), present_host.end(), [](uint8_t p) { return p != 0; });
    }
    backend_checks::check_route_top_k(kBackendName, num_tokens, num_experts, top_k, num_present);
    if (num_tokens == 0) return;
    cuda_kernels::route_top_k(logits, present, expert_ids, weights, num_tokens, num_experts, top_k,
                              normalize_top_k, stream_);
  }

  void scaled_add_rows(const float* x, const float* scale, float* y, int64_t rows, int64_t dim) override {
    backend_checks::check_scaled_add_rows(kBackendName, rows, dim);
    if (rows == 0 || dim == 0) return;
    DeviceScope scope(device_);
    cuda_kernels::scaled_add_rows(x, scale, y, rows, dim, stream_);
  }

  void add(const float* x, float* y, int64_t n) override {
    backend_checks::check_add(kBackendName, n);
    if (n == 0) return;
    DeviceScope scope(device_);
    cuda_kernels::add(x, y, n, stream_);
  }

 private:
  int device_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
};

}  // namespace

int cuda_device_count() {
  // Without a driver cudaGetDeviceCount returns cudaErrorInsufficientDriver and leaves the count
  // untouched, hence the 0 start; the error is cleared so no later check reports it.
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::unique_ptr<Backend> make_cuda_backend(int device) {
  const int count = cuda_device_count();
  if (count == 0) {
    throw Error(ErrorCode::kUnsupported,
                "cuda backend: no CUDA device is visible (no driver or no GPU; check nvidia-smi and "
                "CUDA_VISIBLE_DEVICES), use the cpu backend instead");
  }
  if (device < 0 || device >= count) {
    throw Error(ErrorCode::kInvalidArgument, "cuda backend: device " + std::to_string(device) +
                                                 " is out of range; " + std::to_string(count) +
                                                 " CUDA device(s) are visible");
  }
  return std::make_unique<CudaBackend>(device);
}

}  // namespace epic
