// CudaBackend: owns a stream, a cuBLAS handle (with a fixed workspace, so cuBLAS calls can be
// captured in graphs) and the device memory it hands out; validates every op on the host
// (backend_checks) and enqueues the kernels of cuda_kernels.h.
#include "kernels/cuda/cuda_backend.h"

#include <algorithm>
#include <climits>
#include <cstddef>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/backend_checks.h"
#include "kernels/cuda/ab_switch.h"
#include "kernels/cuda/cublas_gemm.h"
#include "kernels/cuda/cuda_backend_access.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/gemm_lanes.h"
#include "kernels/cuda/host_copy_kernel.h"
#include "kernels/cuda/op_timing.h"
#include "kernels/cuda/routed_moe_fused.h"
#include "kernels/error.h"

namespace epic {
namespace {

constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

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

std::string gib_text(size_t bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f GiB", static_cast<double>(bytes) / (1ull << 30));
  return text;
}

class DeviceBuffer final : public Buffer {
 public:
  DeviceBuffer(void* data, size_t size, int device)
      : Buffer(data, size, MemorySpace::kDevice), device_(device) {}
  ~DeviceBuffer() override {
    if (data() == nullptr) return;
    int previous = 0;
    const bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != device_ &&
                          cudaSetDevice(device_) == cudaSuccess;
    cudaFree(data());
    if (switched) cudaSetDevice(previous);
  }

 private:
  int device_;
};

class PinnedBuffer final : public Buffer {
 public:
  PinnedBuffer(void* data, size_t size) : Buffer(data, size, MemorySpace::kHost) {}
  ~PinnedBuffer() override {
    if (data() != nullptr) cudaFreeHost(data());
  }
};

class CudaGraph final : public Graph {
 public:
  CudaGraph(cudaGraphExec_t exec, cudaStream_t stream, int device)
      : exec_(exec), stream_(stream), device_(device) {}
  ~CudaGraph() override { cudaGraphExecDestroy(exec_); }
  void replay() override {
    DeviceScope scope(device_);
    EPIC_CUDA_CHECK(cudaGraphLaunch(exec_, stream_));
  }

 private:
  cudaGraphExec_t exec_;
  cudaStream_t stream_;
  int device_;
};

void check_fits_int(const char* op, const char* name, int64_t value) {
  if (value > INT_MAX)
    throw Error(ErrorCode::kUnsupported, std::string("cuda backend ") + op + ": " + name + " = " +
                                             std::to_string(value) + " exceeds the 32-bit sizes of cuBLAS");
}

cudaDataType cuda_type(ScalarType type) { return type == ScalarType::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }

// Pinned descriptors for copy_host_descriptors, appended call after call and reused from the start once
// the stream has run every kernel that reads them (last_use, recorded after each).
class DescriptorArena {
 public:
  DescriptorArena() = default;
  DescriptorArena(const DescriptorArena&) = delete;
  DescriptorArena& operator=(const DescriptorArena&) = delete;
  ~DescriptorArena() {
    if (base_ != nullptr) cudaFreeHost(base_);
    if (last_use_ != nullptr) cudaEventDestroy(last_use_);
  }

  cuda_kernels::HostCopyDescriptor* reserve(size_t count) {
    if (in_flight_ && cudaEventQuery(last_use_) == cudaSuccess) {
      used_ = 0;
      in_flight_ = false;
    }
    if (used_ + count > capacity_) {
      if (in_flight_) EPIC_CUDA_CHECK(cudaEventSynchronize(last_use_));
      in_flight_ = false;
      used_ = 0;
      if (count > capacity_) {
        if (base_ != nullptr) EPIC_CUDA_CHECK(cudaFreeHost(base_));
        base_ = nullptr;
        capacity_ = std::max<size_t>({count, 2 * capacity_, 1024});
        EPIC_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&base_),
                                       capacity_ * sizeof(cuda_kernels::HostCopyDescriptor)));
      }
    }
    cuda_kernels::HostCopyDescriptor* at = base_ + used_;
    used_ += count;
    return at;
  }
  void mark_used(cudaStream_t stream) {
    if (last_use_ == nullptr) EPIC_CUDA_CHECK(cudaEventCreateWithFlags(&last_use_, cudaEventDisableTiming));
    EPIC_CUDA_CHECK(cudaEventRecord(last_use_, stream));
    in_flight_ = true;
  }

 private:
  cuda_kernels::HostCopyDescriptor* base_ = nullptr;
  size_t capacity_ = 0, used_ = 0;
  cudaEvent_t last_use_ = nullptr;
  bool in_flight_ = false;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    DeviceScope scope(device_);
    // Non-blocking: the legacy default stream must not serialise with our work (and a graph can
    // only be captured from a stream other than it). Every copy goes through this stream.
    EPIC_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    try {
      EPIC_CUBLAS_CHECK(cublasCreate(&cublas_));
      EPIC_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
      // Plain fp32 in the verification mode: no TF32 tensor-op math.
      EPIC_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
      // A workspace of our own: cuBLAS would otherwise allocate one lazily, which a graph capture
      // cannot do.
      EPIC_CUDA_CHECK(cudaMalloc(&cublas_workspace_, kCublasWorkspaceBytes));
      EPIC_CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspaceBytes));
      EPIC_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_groups_),
                                     sizeof(int32_t) * 2 * kMaxHostGroupEntries));
      EPIC_CUDA_CHECK(
          cudaMalloc(reinterpret_cast<void**>(&device_gemm_pointers_), sizeof(void*) * kGemmPointers));
      EPIC_CUDA_CHECK(
          cudaMallocHost(reinterpret_cast<void**>(&host_gemm_pointers_), sizeof(void*) * kGemmPointers));
    } catch (...) {
      release();
      throw;
    }
  }

  ~CudaBackend() override {
    int previous = 0;
    const bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != device_ &&
                          cudaSetDevice(device_) == cudaSuccess;
    op_timing_.finish();
    release();
    if (switched) cudaSetDevice(previous);
  }

  CudaBackend(const CudaBackend&) = delete;
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda(device " + std::to_string(device_) + ")"; }
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }

  std::unique_ptr<Buffer> allocate(size_t bytes) override {
    DeviceScope scope(device_);
    void* data = nullptr;
    if (bytes > 0) {
      const cudaError_t status = cudaMalloc(&data, bytes);
      if (status != cudaSuccess) {
        cudaGetLastError();
        size_t free_bytes = 0, total_bytes = 0;
        cudaMemGetInfo(&free_bytes, &total_bytes);
        throw Error(ErrorCode::kUnsupported,
                    "cuda device " + std::to_string(device_) + ": cannot allocate " + gib_text(bytes) + " (" +
                        cudaGetErrorString(status) + "; " + gib_text(free_bytes) + " free of " +
                        gib_text(total_bytes) +
                        "); host fewer experts per GPU (more workers), fewer layers, or a smaller "
                        "--max-active-sequences / --kv-cache-gb");
      }
    }
    return std::make_unique<DeviceBuffer>(data, bytes, device_);
  }

  std::unique_ptr<Buffer> allocate_staging(size_t bytes) override {
    DeviceScope scope(device_);
    void* data = nullptr;
    if (bytes > 0) EPIC_CUDA_CHECK(cudaMallocHost(&data, bytes));
    return std::make_unique<PinnedBuffer>(data, bytes);
  }

  void copy_from_host(const Tensor& dst, size_t dst_offset, const void* src, size_t bytes) override {
    backend_checks::check_copy_range("copy_from_host", MemorySpace::kDevice, dst, dst_offset, bytes);
    if (bytes == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("copy_from_host", static_cast<int64_t>(bytes));
    EPIC_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst.data) + dst_offset, src, bytes,
                                    cudaMemcpyHostToDevice, stream_));
  }

  void copy_to_host(const Tensor& src, size_t src_offset, void* dst, size_t bytes) override {
    backend_checks::check_copy_range("copy_to_host", MemorySpace::kDevice, src, src_offset, bytes);
    if (bytes == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("copy_to_host", static_cast<int64_t>(bytes));
    EPIC_CUDA_CHECK(cudaMemcpyAsync(dst, static_cast<const char*>(src.data) + src_offset, bytes,
                                    cudaMemcpyDeviceToHost, stream_));
    EPIC_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void copy(const Tensor& src, const Tensor& dst) override {
    backend_checks::check_copy("copy", MemorySpace::kDevice, src, dst);
    if (src.bytes() == 0) return;
    DeviceScope scope(device_);
    EPIC_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, src.bytes(), cudaMemcpyDeviceToDevice, stream_));
  }

  void synchronize() override {
    DeviceScope scope(device_);
    EPIC_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void copy_from_host_scattered(const std::vector<HostCopy>& copies) override {
    if (copies.empty()) return;
    DeviceScope scope(device_);
    run_host_copies("copy_from_host_scattered", copies, stream_, stream_descriptors_);
  }

  // A copy stream that waits for an event recorded on the stream now, then copies; its own event marks
  // the end, for wait_side_copies. Made at the first call.
  void enqueue_side_copies(const std::vector<HostCopy>& copies) override {
    if (copies.empty()) return;
    DeviceScope scope(device_);
    if (copy_stream_ == nullptr) {
      EPIC_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking));
      EPIC_CUDA_CHECK(cudaEventCreateWithFlags(&side_start_, cudaEventDisableTiming));
      EPIC_CUDA_CHECK(cudaEventCreateWithFlags(&side_done_, cudaEventDisableTiming));
    }
    EPIC_CUDA_CHECK(cudaEventRecord(side_start_, stream_));
    EPIC_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, side_start_, 0));
    run_host_copies("enqueue_side_copies", copies, copy_stream_, side_descriptors_);
    EPIC_CUDA_CHECK(cudaEventRecord(side_done_, copy_stream_));
    side_pending_ = true;
  }

  // Large copies to the copy engines; the small ones as one kernel over pinned descriptors.
  void run_host_copies(const char* op, const std::vector<HostCopy>& copies, cudaStream_t stream,
                       DescriptorArena& arena) {
    size_t small = 0;
    for (const HostCopy& copy : copies) {
      backend_checks::check_copy_range(op, MemorySpace::kDevice, copy.dst, copy.dst_offset, copy.bytes);
      if (copy.bytes > 0 && copy.bytes < cuda_kernels::kKernelCopyMaxBytes) ++small;
    }
    cuda_kernels::HostCopyDescriptor* descriptors = small > 0 ? arena.reserve(small) : nullptr;
    size_t next = 0;
    for (const HostCopy& copy : copies) {
      if (copy.bytes == 0) continue;
      char* dst = static_cast<char*>(copy.dst.data) + copy.dst_offset;
      if (copy.bytes < cuda_kernels::kKernelCopyMaxBytes) {
        descriptors[next++] = {reinterpret_cast<uint64_t>(dst), reinterpret_cast<uint64_t>(copy.src),
                               copy.bytes};
      } else {
        EPIC_CUDA_CHECK(cudaMemcpyAsync(dst, copy.src, copy.bytes, cudaMemcpyHostToDevice, stream));
      }
    }
    if (small == 0) return;
    cuda_kernels::copy_host_descriptors(descriptors, static_cast<int64_t>(small), stream);
    arena.mark_used(stream);
  }

  void wait_side_copies() override {
    if (!side_pending_) return;
    DeviceScope scope(device_);
    EPIC_CUDA_CHECK(cudaEventSynchronize(side_done_));
    side_pending_ = false;
  }

  std::unique_ptr<Graph> capture(const std::function<void()>& record) override {
    DeviceScope scope(device_);
    EPIC_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    cudaGraph_t graph = nullptr;
    try {
      record();
    } catch (...) {
      cudaStreamEndCapture(stream_, &graph);  // leave capture mode before reporting
      if (graph != nullptr) cudaGraphDestroy(graph);
      cudaGetLastError();
      throw;
    }
    EPIC_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    EPIC_CUDA_CHECK(status);
    return std::make_unique<CudaGraph>(exec, stream_, device_);
  }

  void embed(const Tensor& ids, const Tensor& table, const Tensor& out) override {
    backend_checks::check_embed(kSpace, ids, table, out);
    if (out.numel() == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("embed", ids.dim(0));
    cuda_kernels::embed(ids.as<int32_t>(), ids.dim(0), table.data, table.type, table.dim(1), out.data,
                        out.type, stream_);
  }

  void linear(const Tensor& x, const Tensor& w, const Tensor& y) override {
    backend_checks::check_linear(kSpace, x, w, y);
    const int64_t rows = x.dim(0), in_dim = x.dim(1), out_dim = w.dim(0);
    if (cuda_kernels::skipped_for_timing("linear", out_dim)) return;
    if (rows == 0 || out_dim == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("linear", rows, [&] {
      std::string detail = std::to_string(out_dim);
      detail.append("x").append(std::to_string(in_dim)).append(" ").append(scalar_name(x.type));
      return detail.append("*").append(scalar_name(w.type));
    });
    if (in_dim == 0) {  // an empty sum; cuBLAS rejects a leading dimension of 0
      EPIC_CUDA_CHECK(cudaMemsetAsync(y.data, 0, y.bytes(), stream_));
      return;
    }
    if (x.type == ScalarType::kF32 && w.type == ScalarType::kBF16) {
      // cuBLAS has no f32 x bf16 GEMM, and widening the weights would put an fp32 copy of them on
      // the device. x split exactly into three bf16 parts on tensor cores where that is faster,
      // else a kernel of our own that widens the weights as it reads them.
      if (cuda_kernels::linear_f32_split_wins(rows, out_dim)) {
        check_fits_int("linear", "rows", rows);
        check_fits_int("linear", "in_dim", in_dim);
        check_fits_int("linear", "out_dim", out_dim);
        void* scratch = op_scratch(static_cast<size_t>(3 * rows * in_dim) * 2, "the fp32 router product");
        cuda_kernels::linear_f32_split(x.as<float>(), w.data, y.as<float>(), rows, in_dim, out_dim, scratch,
                                       cublas_, stream_);
      } else {
        cuda_kernels::linear_f32(x.as<float>(), w.data, w.type, y.as<float>(), rows, in_dim, out_dim,
                                 stream_);
      }
      return;
    }
    if (x.type != w.type)
      throw Error(ErrorCode::kUnsupported, "cuda backend linear: " + x.describe() + " activations with " +
                                               w.describe() + " weights; bf16 activations need bf16 weights");
    if (x.type == ScalarType::kBF16 &&
        cuda_kernels::linear_skinny_supported(x.data, w.data, rows, in_dim, out_dim)) {
      // Decode-size rows: a weight-streaming kernel of our own (cuBLAS is far from the read rate there).
      cuda_kernels::linear_skinny(x.data, w.data, y.data, y.type, rows, in_dim, out_dim, stream_);
      return;
    }
    check_fits_int("linear", "rows", rows);
    check_fits_int("linear", "in_dim", in_dim);
    check_fits_int("linear", "out_dim", out_dim);
    cuda_kernels::gemm_rows_nt(cublas_, x.data, cuda_type(x.type), in_dim, w.data, cuda_type(w.type), out_dim,
                               in_dim, y.data, cuda_type(y.type), out_dim, rows);
  }

  void rms_norm(const Tensor& x, const Tensor& weight, const Tensor& y, float eps) override {
    if (cuda_kernels::skipped_for_timing("rms_norm", x.dim(0))) return;
    backend_checks::check_rms_norm(kSpace, x, weight, y);
    if (x.numel() == 0) return;
    DeviceScope scope(device_);
    const auto timing =
        time_op("rms_norm", x.dim(0), [&] { return std::string("to ") + scalar_name(y.type); });
    cuda_kernels::rms_norm(x.data, x.type, weight.data, weight.type, y.data, y.type, x.dim(0), weight.dim(0),
                           eps, stream_);
  }

  void add_rms_norm(const Tensor& delta, const Tensor& residual, const Tensor& weight, const Tensor& normed,
                    const Tensor& normed_f32, float eps) override {
    if (cuda_kernels::skipped_for_timing("add_rms_norm", residual.dim(0))) return;
    backend_checks::check_add_rms_norm(kSpace, delta, residual, weight, normed, normed_f32);
    if (residual.numel() == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("add_rms_norm", residual.dim(0), [&] {
      return std::string("to ") + scalar_name(normed.type) + (is_absent(normed_f32) ? "" : " and f32");
    });
    cuda_kernels::add_rms_norm(delta.data, delta.type, residual.as<float>(), weight.data, weight.type,
                               normed.data, normed.type,
                               is_absent(normed_f32) ? nullptr : normed_f32.as<float>(), residual.dim(0),
                               residual.dim(1), eps, stream_);
  }

  void qk_norm_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& positions,
                    const AttentionShape& shape, float eps, double theta) override {
    if (cuda_kernels::skipped_for_timing("qk_norm_rope", qkv.dim(0))) return;
    backend_checks::check_qk_norm_rope(kSpace, qkv, q_norm, k_norm, positions, shape, theta);
    check_head_dim("qk_norm_rope", shape.head_dim);
    if (qkv.dim(0) == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("qk_norm_rope", qkv.dim(0));
    cuda_kernels::qk_norm_rope(qkv.data, qkv.type, q_norm.data, k_norm.data, q_norm.type,
                               positions.as<int32_t>(), qkv.dim(0), shape.num_heads, shape.num_kv_heads,
                               shape.head_dim, eps, theta, stream_);
  }

  void store_kv(const Tensor& qkv, const Tensor& slot_mapping, const Tensor& key_pool,
                const Tensor& value_pool, const AttentionShape& shape) override {
    if (cuda_kernels::skipped_for_timing("store_kv", qkv.dim(0))) return;
    backend_checks::check_store_kv(kSpace, qkv, slot_mapping, key_pool, value_pool, shape);
    if (qkv.dim(0) == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("store_kv", qkv.dim(0));
    cuda_kernels::store_kv(qkv.data, qkv.type, slot_mapping.as<int32_t>(), qkv.dim(0), key_pool.data,
                           value_pool.data, shape.num_heads, shape.num_kv_heads, shape.head_dim, stream_);
  }

  void attention(const Tensor& qkv, const Tensor& key_pool, const Tensor& value_pool,
                 const Tensor& block_tables, const Tensor& row_sequence, const Tensor& positions,
                 const AttentionShape& shape, const Tensor& out) override {
    if (cuda_kernels::skipped_for_timing("attention", qkv.dim(0))) return;
    backend_checks::check_attention(kSpace, qkv, key_pool, value_pool, block_tables, row_sequence, positions,
                                    shape, out);
    check_head_dim("attention", shape.head_dim);
    if (qkv.dim(0) == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("attention", qkv.dim(0));
    cuda_kernels::attention(qkv.data, qkv.type, key_pool.data, value_pool.data, block_tables.as<int32_t>(),
                            block_tables.dim(1), row_sequence.as<int32_t>(), positions.as<int32_t>(),
                            qkv.dim(0), shape.num_heads, shape.num_kv_heads, shape.head_dim, out.data,
                            stream_);
  }

  // One launch for a decode step of a few rows (attention_decode_fused.cu); the three ops otherwise, or
  // with EPIC_CUDA_FUSED_ATTENTION=0 (A/B timing).
  void decode_attention(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& key_pool,
                        const Tensor& value_pool, const AttentionTables& tables, const AttentionShape& shape,
                        float eps, double theta, const Tensor& out) override {
    if (cuda_kernels::skipped_for_timing("decode_attention", qkv.dim(0))) return;
    backend_checks::check_decode_attention(kSpace, qkv, q_norm, k_norm, key_pool, value_pool, tables, shape,
                                           theta, out);
    static const bool fused_enabled = cuda_kernels::ab_switch_on("EPIC_CUDA_FUSED_ATTENTION");
    cuda_kernels::DecodeAttentionFusedArgs args;
    args.qkv = qkv.data;
    args.q_norm = q_norm.data;
    args.k_norm = k_norm.data;
    args.positions = tables.positions.as<int32_t>();
    args.slot_mapping = tables.slot_mapping.as<int32_t>();
    args.row_sequence = tables.row_sequence.as<int32_t>();
    args.block_tables = tables.block_tables.as<int32_t>();
    args.key_pool = key_pool.data;
    args.value_pool = value_pool.data;
    args.out = out.data;
    args.type = qkv.type;
    args.norm_type = q_norm.type;
    args.rows = qkv.dim(0);
    args.num_heads = shape.num_heads;
    args.num_kv_heads = shape.num_kv_heads;
    args.head_dim = shape.head_dim;
    args.max_blocks = tables.block_tables.dim(1);
    args.eps = eps;
    args.theta = theta;
    if (!fused_enabled || !cuda_kernels::decode_attention_fused_supported(args)) {
      run_decode_attention_ops(qkv, q_norm, k_norm, key_pool, value_pool, tables, shape, eps, theta, out);
      return;
    }
    DeviceScope scope(device_);
    const auto timing = time_op("decode_attention_fused", args.rows);
    cuda_kernels::decode_attention_fused(args, stream_);
  }

  void silu_mul(const Tensor& gate_up, const Tensor& out) override {
    backend_checks::check_silu_mul(kSpace, gate_up, out);
    if (out.numel() == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("silu_mul", out.dim(0));
    cuda_kernels::silu_mul(gate_up.data, out.data, out.type, out.dim(0), out.dim(1), stream_);
  }

  void add(const Tensor& x, const Tensor& y) override {
    backend_checks::check_add(kSpace, x, y);
    if (x.numel() == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("add", x.numel());
    cuda_kernels::add(x.data, x.type, y.data, y.type, x.numel(), stream_);
  }

  void gather_rows(const Tensor& x, const Tensor& index, const Tensor& out) override {
    backend_checks::check_gather_rows(kSpace, x, index, out);
    if (out.numel() == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("gather_rows", out.dim(0));
    cuda_kernels::gather_rows(x.data, index.as<int32_t>(), out.data, out.dim(0), out.row_bytes(), stream_);
  }

  void argmax(const Tensor& logits, const Tensor& ids) override {
    if (cuda_kernels::skipped_for_timing("argmax", logits.dim(0))) return;
    backend_checks::check_argmax(kSpace, logits, ids);
    if (logits.dim(0) == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("argmax", logits.dim(0));
    const int64_t rows = logits.dim(0), vocab = logits.dim(1);
    void* scratch = op_scratch(static_cast<size_t>(cuda_kernels::argmax_scratch_bytes(rows, vocab)),
                               "argmax's per-slice results");
    cuda_kernels::argmax(logits.data, logits.type, ids.as<int32_t>(), rows, vocab, scratch, stream_);
  }

  void log_softmax(const Tensor& logits, const Tensor& out) override {
    backend_checks::check_log_softmax(kSpace, logits, out);
    if (logits.dim(0) == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("log_softmax", logits.dim(0));
    cuda_kernels::log_softmax(logits.as<float>(), out.as<float>(), logits.dim(0), logits.dim(1), stream_);
  }

  void score_rows(const Tensor& logits, const Tensor& targets, const Tensor& reference_log_probs,
                  const Tensor& scores, const Tensor& ids) override {
    backend_checks::check_score_rows(kSpace, logits, targets, reference_log_probs, scores, ids);
    if (logits.dim(0) == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("score_rows", logits.dim(0));
    cuda_kernels::score_rows(logits.as<float>(), targets.as<int32_t>(), reference_log_probs.as<float>(),
                             scores.as<float>(), ids.as<int32_t>(), logits.dim(0), logits.dim(1), stream_);
  }

  void route_top_k(const Tensor& logits, const Tensor& present, const Tensor& expert_ids,
                   const Tensor& weights, bool normalize, const Tensor& row_top_k) override {
    backend_checks::check_route_top_k(kSpace, logits, present, expert_ids, weights, row_top_k);
    if (logits.dim(0) == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("route_top_k", logits.dim(0));
    cuda_kernels::route_top_k(logits.data, logits.type, present.as<uint8_t>(), expert_ids.as<int32_t>(),
                              weights.as<float>(), logits.dim(0), logits.dim(1), expert_ids.dim(1), normalize,
                              is_absent(row_top_k) ? nullptr : row_top_k.as<int32_t>(), stream_);
  }

  void group_by_expert(const Tensor& expert_ids, int64_t num_experts, int64_t top_k,
                       const Tensor& expert_offsets, const Tensor& source_row,
                       const Tensor& sorted_position) override {
    backend_checks::check_group_by_expert(kSpace, expert_ids, num_experts, top_k, expert_offsets, source_row,
                                          sorted_position);
    DeviceScope scope(device_);
    const auto timing = time_op("group_by_expert", expert_ids.numel());
    const int64_t scratch_bytes =
        cuda_kernels::group_by_expert_scratch_bytes(expert_ids.numel(), num_experts);
    auto* scratch =
        scratch_bytes > 0
            ? static_cast<int32_t*>(op_scratch(static_cast<size_t>(scratch_bytes), "grouping rows by expert"))
            : nullptr;
    cuda_kernels::group_by_expert(expert_ids.as<int32_t>(), expert_ids.numel(), num_experts, top_k,
                                  expert_offsets.as<int32_t>(), source_row.as<int32_t>(),
                                  sorted_position.as<int32_t>(), scratch, stream_);
  }

  void count_routed_slots(const Tensor& expert_ids, const Tensor& real_tokens, const Tensor& expert_counts,
                          const Tensor& keys, const Tensor& key_counts) override {
    backend_checks::check_count_routed_slots(kSpace, expert_ids, real_tokens, expert_counts, keys,
                                             key_counts);
    DeviceScope scope(device_);
    const bool keyed = !is_absent(keys);
    cuda_kernels::count_routed_slots(
        expert_ids.as<int32_t>(), expert_ids.dim(0), expert_ids.dim(1),
        is_absent(real_tokens) ? nullptr : real_tokens.as<int32_t>(), expert_counts.as<int64_t>(),
        expert_counts.numel(), keyed ? keys.as<int32_t>() : nullptr,
        keyed ? key_counts.as<int64_t>() : nullptr, keyed ? key_counts.numel() : 0, stream_);
  }

  void expert_ffn(const Tensor& x, const Tensor& expert_offsets, const Tensor& gate_up, const Tensor& down,
                  const Tensor& local_index, const Tensor& intermediate, const Tensor& y) override {
    backend_checks::check_expert_ffn(kSpace, x, expert_offsets, gate_up, down, local_index, intermediate, y);
    if (x.dim(0) == 0) return;
    DeviceScope scope(device_);
    const bool host_scheduled = x.type == ScalarType::kBF16 && gate_up.type == ScalarType::kBF16 &&
                                x.dim(0) >= kCublasExpertFfnMinRows;
    const auto timing = time_op("expert_ffn", x.dim(0), [&] {
      // cuBLAS: batched where it applies, else per expert or grouped (by rows).
      return std::string(host_scheduled ? "cublas" : "device-scheduled");
    });
    cuda_kernels::ExpertFfnArgs args;
    args.x = x.data;
    args.expert_offsets = expert_offsets.as<int32_t>();
    args.gate_up = gate_up.data;
    args.down = down.data;
    args.local_index = local_index.as<int32_t>();
    args.intermediate = intermediate.data;
    args.y = y.data;
    args.rows = x.dim(0);
    args.num_experts = local_index.dim(0);
    args.num_local = gate_up.dim(0);
    args.hidden = x.dim(1);
    args.inter = down.dim(2);
    args.act_type = x.type;
    args.weight_type = gate_up.type;
    const bool bf16 = x.type == ScalarType::kBF16 && gate_up.type == ScalarType::kBF16;
    if (bf16 && args.rows >= kCublasExpertFfnMinRows && !capturing() &&
        args.num_experts + 1 <= kMaxHostGroupEntries) {
      // Prefill sizes: one read-back of the group sizes buys cuBLAS GEMMs of the exact shapes.
      int32_t* host_offsets = host_groups_;
      int32_t* host_local = host_groups_ + kMaxHostGroupEntries;
      EPIC_CUDA_CHECK(cudaMemcpyAsync(host_offsets, args.expert_offsets,
                                      sizeof(int32_t) * (args.num_experts + 1), cudaMemcpyDeviceToHost,
                                      stream_));
      EPIC_CUDA_CHECK(cudaMemcpyAsync(host_local, args.local_index, sizeof(int32_t) * args.num_experts,
                                      cudaMemcpyDeviceToHost, stream_));
      EPIC_CUDA_CHECK(cudaStreamSynchronize(stream_));
      // Rows past offsets[E] (an upper-bound shape, e.g. the expert-parallel low-latency mode's) belong
      // to no expert: the GEMMs take the exact rows.
      args.rows = std::min<int64_t>(args.rows, host_offsets[args.num_experts]);
      if (args.rows <= 0) return;
      // The stream is idle here, so the previous call's pointer copy is done with the staging.
      args.device_pointers = device_gemm_pointers_;
      args.host_pointers = host_gemm_pointers_;
      args.pointer_capacity = kGemmPointers;
      // Batched GEMMs over all experts first (expert_ffn_batched.cu); where they do not apply,
      // the per-expert loop or the grouped calls below. EPIC_CUDA_BATCHED_FFN=0: never (A/B).
      static const bool batched = cuda_kernels::ab_switch_on("EPIC_CUDA_BATCHED_FFN");
      if (batched) args.batched_scratch = [this](size_t bytes) { return batched_scratch(bytes); };
      if (args.rows >= kPerExpertFfnMinRows) {
        if (lanes_ == nullptr) lanes_ = std::make_unique<cuda_kernels::GemmLanePool>(kExpertFfnSideLanes);
        args.per_expert = true;
        args.lane_pool = lanes_.get();
        args.side_lane_count = lanes_->side_count();
      }
      cuda_kernels::expert_ffn_cublas(args, host_offsets, host_local, cublas_, stream_);
      return;
    }
    cuda_kernels::expert_ffn_device_scheduled(args, stream_);
  }

  // Device-scheduled only (no host read of the group sizes): the grouped kernels take the table in place
  // of the weight stack.
  void expert_ffn_addressed(const Tensor& x, const Tensor& expert_offsets, const Tensor& addresses,
                            ScalarType weight_type, const Tensor& intermediate, const Tensor& y) override {
    backend_checks::check_expert_ffn_addressed(kSpace, x, expert_offsets, addresses, weight_type,
                                               intermediate, y);
    if (x.dim(0) == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("expert_ffn_addressed", x.dim(0));
    cuda_kernels::ExpertFfnArgs args;
    args.x = x.data;
    args.expert_offsets = expert_offsets.as<int32_t>();
    args.addresses = addresses.as<int64_t>();
    args.intermediate = intermediate.data;
    args.y = y.data;
    args.rows = x.dim(0);
    args.num_experts = addresses.dim(0);
    args.num_local = addresses.dim(0);
    args.hidden = x.dim(1);
    args.inter = intermediate.dim(1);
    args.act_type = x.type;
    args.weight_type = weight_type;
    cuda_kernels::expert_ffn_device_scheduled(args, stream_);
  }

  void combine_top_k(const Tensor& expert_out, const Tensor& sorted_position, const Tensor& weights,
                     const Tensor& out) override {
    backend_checks::check_combine_top_k(kSpace, expert_out, sorted_position, weights, out);
    if (out.numel() == 0) return;
    DeviceScope scope(device_);
    const auto timing = time_op("combine_top_k", out.dim(0));
    cuda_kernels::combine_top_k(expert_out.data, expert_out.type, sorted_position.as<int32_t>(),
                                weights.as<float>(), weights.dim(0), weights.dim(1), out.dim(1), out.data,
                                out.type, stream_);
  }

  // One bf16 token (kRoutedMoeFusedMaxTokens): the fused kernels (routed_moe_fused.cu), three launches
  // instead of seven;
  // otherwise, or with EPIC_CUDA_FUSED_MOE=0 (A/B), the ops one by one (Backend's default).
  void routed_moe(const Tensor& router_input, const Tensor& x, const RoutedMoeWeights& weights,
                  const RoutedMoeScratch& scratch, const Tensor& out) override {
    if (cuda_kernels::skipped_for_timing("routed_moe", x.dim(0))) return;
    static const bool fused_enabled = cuda_kernels::ab_switch_on("EPIC_CUDA_FUSED_MOE");
    backend_checks::check_routed_moe(kSpace, router_input, x, weights, scratch, out);
    cuda_kernels::RoutedMoeFusedArgs args;
    args.router_input = router_input.type == ScalarType::kF32 ? router_input.as<float>() : nullptr;
    args.router = static_cast<const __nv_bfloat16*>(weights.router.data);
    args.present = weights.present.as<uint8_t>();
    args.x = static_cast<const __nv_bfloat16*>(x.data);
    const bool addressed = !is_absent(weights.addresses);
    if (addressed) {
      args.addresses = weights.addresses.as<int64_t>();
    } else {
      args.gate_up = static_cast<const __nv_bfloat16*>(weights.gate_up.data);
      args.down = static_cast<const __nv_bfloat16*>(weights.down.data);
      args.local_index = weights.local_index.as<int32_t>();
    }
    args.logits = scratch.logits.as<float>();
    args.expert_ids = scratch.expert_ids.as<int32_t>();
    args.weights = scratch.weights.as<float>();
    args.intermediate = static_cast<__nv_bfloat16*>(scratch.intermediate.data);
    args.out = out.data;
    args.out_type = out.type;
    args.tokens = x.dim(0);
    args.hidden = x.dim(1);
    args.inter = scratch.intermediate.dim(1);
    args.num_experts = weights.router.dim(0);
    args.top_k = scratch.expert_ids.dim(1);
    args.normalize = weights.normalize;
    const bool bf16 =
        router_input.type == ScalarType::kF32 && x.type == ScalarType::kBF16 &&
        weights.router.type == ScalarType::kBF16 &&
        (addressed ? weights.addressed_weight_type : weights.gate_up.type) == ScalarType::kBF16 &&
        scratch.intermediate.type == ScalarType::kBF16;
    // A per-token k (row_top_k) comes only with tokens of different states, never with one token.
    if (!fused_enabled || !bf16 || !is_absent(weights.row_top_k) ||
        !cuda_kernels::routed_moe_fused_supported(args)) {
      run_routed_moe_ops(router_input, x, weights, scratch, out);  // checked above
      return;
    }
    DeviceScope scope(device_);
    const auto timing = time_op("routed_moe_fused", args.tokens);
    cuda_kernels::routed_moe_fused(args, stream_);
  }

 private:
  static constexpr MemorySpace kSpace = MemorySpace::kDevice;
  // Room for the group offsets and local indices of layers with up to this many experts - 1.
  static constexpr int64_t kMaxHostGroupEntries = 4097;
  // expert_ffn_cublas's grouped GEMM pointers for up to kMaxHostGroupEntries - 1 experts.
  static constexpr int64_t kGemmPointers =
      cuda_kernels::kExpertFfnPointersPerExpert * (kMaxHostGroupEntries - 1);

  // Device scratch of at least `bytes` for an op that is done with it when its own launches are
  // (linear_f32_split, the many-block group_by_expert): ops run in order on the one stream, so they
  // share it. Grown on demand, graph capture included (an allocation enqueues nothing; the capture
  // mode is relaxed around it). A smaller earlier buffer is kept, not freed: a captured graph may
  // still use it.
  void* op_scratch(size_t bytes, const char* purpose) {
    if (!op_scratch_.empty() && op_scratch_bytes_ >= bytes) return op_scratch_.back();
    const size_t size = std::max(bytes, 2 * op_scratch_bytes_);
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    EPIC_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    void* data = nullptr;
    try {
      data = allocate_scratch(size, purpose);
    } catch (...) {
      cudaThreadExchangeStreamCaptureMode(&mode);
      throw;
    }
    cudaThreadExchangeStreamCaptureMode(&mode);
    op_scratch_.push_back(data);
    op_scratch_bytes_ = size;
    return data;
  }

  // expert_ffn_batched's scratch, grown on demand. Never used inside a graph capture (that path
  // reads the group sizes back), so a smaller buffer is freed when a larger one is needed.
  void* batched_scratch(size_t bytes) {
    if (batched_scratch_ != nullptr && batched_scratch_bytes_ >= bytes) return batched_scratch_;
    if (batched_scratch_ != nullptr) EPIC_CUDA_CHECK(cudaFree(batched_scratch_));  // waits for the device
    batched_scratch_ = nullptr;
    batched_scratch_bytes_ = 0;
    batched_scratch_ = allocate_scratch(bytes, "the expert FFN");
    batched_scratch_bytes_ = bytes;
    return batched_scratch_;
  }

  // cudaMalloc of `bytes`, or Error(kUnsupported) naming the size and what it was for.
  void* allocate_scratch(size_t bytes, const char* purpose) {
    void* data = nullptr;
    const cudaError_t status = cudaMalloc(&data, bytes);
    if (status != cudaSuccess) {
      cudaGetLastError();
      throw Error(ErrorCode::kUnsupported, "cuda device " + std::to_string(device_) + ": cannot allocate " +
                                               gib_text(bytes) + " of scratch for " + purpose + " (" +
                                               cudaGetErrorString(status) + "); use fewer tokens per step");
    }
    return data;
  }

  // The op's device time under EPIC_CUDA_OP_TIMING (op_timing.h), keyed by op, size and detail
  // (a callable returning a std::string, or none). A template: with timing off nothing is built.
  template <class Detail = std::nullptr_t>
  cuda_kernels::OpTiming::Scope time_op(const char* op, int64_t size, const Detail& detail = nullptr) {
    if (!op_timing_.enabled()) return {};
    return op_timing_.time(stream_, [&] {
      std::string label(op);
      label.append(" ").append(std::to_string(size));
      if constexpr (!std::is_same_v<Detail, std::nullptr_t>) label.append(" ").append(detail());
      return label;
    });
  }

  bool capturing() const {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    EPIC_CUDA_CHECK(cudaStreamIsCapturing(stream_, &status));
    return status != cudaStreamCaptureStatusNone;
  }

  static void check_head_dim(const char* op, int64_t head_dim) {
    if (head_dim > cuda_kernels::kMaxHeadDim)
      throw Error(ErrorCode::kUnsupported, std::string("cuda backend ") + op + ": head_dim " +
                                               std::to_string(head_dim) + " exceeds the supported " +
                                               std::to_string(cuda_kernels::kMaxHeadDim));
  }

  void release() {
    lanes_.reset();
    for (void* scratch : op_scratch_) cudaFree(scratch);
    op_scratch_.clear();
    if (batched_scratch_ != nullptr) cudaFree(batched_scratch_);
    batched_scratch_ = nullptr;
    if (host_groups_ != nullptr) cudaFreeHost(host_groups_);
    if (host_gemm_pointers_ != nullptr) cudaFreeHost(host_gemm_pointers_);
    if (device_gemm_pointers_ != nullptr) cudaFree(device_gemm_pointers_);
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    if (cublas_workspace_ != nullptr) cudaFree(cublas_workspace_);
    if (copy_stream_ != nullptr) {
      cudaStreamSynchronize(copy_stream_);
      cudaStreamDestroy(copy_stream_);
      cudaEventDestroy(side_start_);
      cudaEventDestroy(side_done_);
      copy_stream_ = nullptr;
    }
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    host_groups_ = nullptr;
    host_gemm_pointers_ = nullptr;
    device_gemm_pointers_ = nullptr;
    cublas_ = nullptr;
    cublas_workspace_ = nullptr;
    stream_ = nullptr;
  }

  int device_;
  cudaStream_t stream_ = nullptr;
  cudaStream_t copy_stream_ = nullptr;  // enqueue_side_copies'
  cudaEvent_t side_start_ = nullptr, side_done_ = nullptr;
  bool side_pending_ = false;  // side copies enqueued since the last wait_side_copies
  DescriptorArena stream_descriptors_, side_descriptors_;  // the small copies' descriptors, per stream
  cublasHandle_t cublas_ = nullptr;
  void* cublas_workspace_ = nullptr;
  int32_t* host_groups_ = nullptr;                     // pinned: [offsets | local indices]
  void** host_gemm_pointers_ = nullptr;                // pinned staging of device_gemm_pointers_
  void** device_gemm_pointers_ = nullptr;              // [kGemmPointers]
  std::unique_ptr<cuda_kernels::GemmLanePool> lanes_;  // made at the first call that wants it
  std::vector<void*> op_scratch_;                      // op_scratch's buffers, the last one the largest
  size_t op_scratch_bytes_ = 0;
  void* batched_scratch_ = nullptr;  // expert_ffn_batched's, the largest asked for so far
  size_t batched_scratch_bytes_ = 0;
  cuda_kernels::OpTiming op_timing_;  // finished before release() destroys the stream
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

namespace {

void require_device(int device) {
  const int count = cuda_device_count();
  if (count == 0)
    throw Error(ErrorCode::kUnsupported,
                "cuda backend: no CUDA device is visible (no driver or no GPU; check nvidia-smi and "
                "CUDA_VISIBLE_DEVICES); use --backend cpu");
  if (device < 0 || device >= count)
    throw Error(ErrorCode::kInvalidArgument, "cuda backend: device " + std::to_string(device) +
                                                 " is out of range; " + std::to_string(count) +
                                                 " CUDA device(s) are visible (0 .. " +
                                                 std::to_string(count - 1) + ")");
}

}  // namespace

std::string cuda_device_description(int device) {
  require_device(device);
  cudaDeviceProp properties{};
  EPIC_CUDA_CHECK(cudaGetDeviceProperties(&properties, device));
  return std::string(properties.name) + " (" + gib_text(properties.totalGlobalMem) + ", sm_" +
         std::to_string(properties.major) + std::to_string(properties.minor) + ")";
}

namespace {

CudaBackend& as_cuda_backend(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (cuda == nullptr)
    throw Error(ErrorCode::kInvalidArgument, "the " + backend.name() + " backend is not the CUDA backend");
  return *cuda;
}

}  // namespace

int cuda_backend_device(Backend& backend) { return as_cuda_backend(backend).device(); }
cudaStream_t cuda_backend_stream(Backend& backend) { return as_cuda_backend(backend).stream(); }

std::unique_ptr<Backend> make_cuda_backend(int device) {
  require_device(device);
  return std::make_unique<CudaBackend>(device);
}

}  // namespace epic
