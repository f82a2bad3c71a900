// Tensors as the backends see them: a view (where the bytes live, their scalar type and shape)
// and memory a backend owns (Buffer). Views are cheap values passed to every backend op; the
// memory behind them is allocated, filled and freed only through the backend that owns it, so a
// CUDA backend never receives a host pointer and the CPU backend never a device one.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

namespace epic {

// The scalar types epic computes with. Weights are F32 or BF16 (as the checkpoint stores them);
// activations F32 (the reference and the cuda fp32 verification mode) or BF16 (cuda serving mode).
// kI64: 64-bit integers, used for tables of addresses (Backend::expert_ffn_addressed).
enum class ScalarType : uint8_t { kF32, kBF16, kI32, kU8, kI64 };

size_t scalar_size(ScalarType type);
const char* scalar_name(ScalarType type);  // "f32", "bf16", "i32", "u8", "i64"

// Where a buffer's bytes are: host memory (the CPU backend's, or pinned staging) or device memory.
enum class MemorySpace : uint8_t { kHost, kDevice };

constexpr int kMaxTensorRank = 4;

// A non-owning view of row-major, contiguous data. Dimension 0 is the row dimension.
struct Tensor {
  void* data = nullptr;
  ScalarType type = ScalarType::kF32;
  MemorySpace space = MemorySpace::kHost;
  int rank = 0;
  std::array<int64_t, kMaxTensorRank> dims{};

  Tensor() = default;
  // Throws Error(kInvalidArgument) for a negative dimension or more than kMaxTensorRank of them.
  Tensor(void* data, ScalarType type, MemorySpace space, std::initializer_list<int64_t> shape);

  int64_t dim(int i) const { return dims[i]; }
  int64_t numel() const;
  size_t bytes() const { return static_cast<size_t>(numel()) * scalar_size(type); }
  int64_t rows() const { return rank == 0 ? 1 : dims[0]; }
  int64_t row_elements() const;  // numel of one row (product of dims 1..rank-1)
  size_t row_bytes() const { return static_cast<size_t>(row_elements()) * scalar_size(type); }

  // Rows [begin, begin + count) of dimension 0, same type and space. Throws on out of range.
  Tensor rows_view(int64_t begin, int64_t count) const;
  // The same bytes under another shape with the same element count. Throws otherwise.
  Tensor reshaped(std::initializer_list<int64_t> shape) const;

  template <class T>
  T* as() const {
    return static_cast<T*>(data);
  }
  std::string describe() const;  // "bf16[4, 2048] on device"
};

// Memory one backend allocated (device memory for cuda; host memory for cpu; pinned host memory
// for staging). Freed by its destructor, on the backend that made it.
class Buffer {
 public:
  virtual ~Buffer() = default;
  void* data() const { return data_; }
  size_t size() const { return size_; }
  MemorySpace space() const { return space_; }

 protected:
  Buffer(void* data, size_t size, MemorySpace space) : data_(data), size_(size), space_(space) {}

 private:
  void* data_;
  size_t size_;
  MemorySpace space_;
};

// A tensor with its memory: what model weights, KV caches and work buffers are.
class OwnedTensor {
 public:
  OwnedTensor() = default;
  OwnedTensor(std::unique_ptr<Buffer> buffer, const Tensor& view) : buffer_(std::move(buffer)), view_(view) {}
  const Tensor& view() const { return view_; }
  operator const Tensor&() const { return view_; }  // NOLINT: passing an owned tensor to an op is the point
  bool empty() const { return buffer_ == nullptr; }
  size_t bytes() const { return buffer_ ? buffer_->size() : 0; }

 private:
  std::unique_ptr<Buffer> buffer_;
  Tensor view_;
};

}  // namespace epic
