// Tensor views: shape arithmetic and the checks that keep a view inside its bytes.
#include "kernels/tensor.h"

#include "kernels/backend.h"
#include "kernels/error.h"

namespace epic {

size_t scalar_size(ScalarType type) {
  switch (type) {
    case ScalarType::kF32:
    case ScalarType::kI32:
      return 4;
    case ScalarType::kBF16:
      return 2;
    case ScalarType::kU8:
      return 1;
    case ScalarType::kI64:
      return 8;
  }
  return 0;
}

const char* scalar_name(ScalarType type) {
  switch (type) {
    case ScalarType::kF32:
      return "f32";
    case ScalarType::kBF16:
      return "bf16";
    case ScalarType::kI32:
      return "i32";
    case ScalarType::kU8:
      return "u8";
    case ScalarType::kI64:
      return "i64";
  }
  return "?";
}

Tensor::Tensor(void* data_in, ScalarType type_in, MemorySpace space_in, std::initializer_list<int64_t> shape)
    : data(data_in), type(type_in), space(space_in) {
  EPIC_CHECK(shape.size() <= static_cast<size_t>(kMaxTensorRank), ErrorCode::kInvalidArgument,
             "a tensor has at most " + std::to_string(kMaxTensorRank) + " dimensions, got " +
                 std::to_string(shape.size()));
  for (int64_t d : shape) {
    EPIC_CHECK(d >= 0, ErrorCode::kInvalidArgument, "tensor dimension " + std::to_string(d) + " is negative");
    dims[rank++] = d;
  }
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= dims[i];
  return n;
}

int64_t Tensor::row_elements() const {
  int64_t n = 1;
  for (int i = 1; i < rank; ++i) n *= dims[i];
  return n;
}

Tensor Tensor::rows_view(int64_t begin, int64_t count) const {
  EPIC_CHECK(rank >= 1 && begin >= 0 && count >= 0 && begin + count <= dims[0], ErrorCode::kInvalidArgument,
             "rows [" + std::to_string(begin) + ", " + std::to_string(begin + count) + ") are outside " +
                 describe());
  Tensor view = *this;
  view.dims[0] = count;
  view.data = static_cast<char*>(data) + static_cast<size_t>(begin) * row_bytes();
  return view;
}

Tensor Tensor::reshaped(std::initializer_list<int64_t> shape) const {
  Tensor view(data, type, space, shape);
  EPIC_CHECK(view.numel() == numel(), ErrorCode::kInvalidArgument,
             "cannot view " + describe() + " as " + view.describe() + ": the element counts differ");
  return view;
}

std::string Tensor::describe() const {
  std::string text = std::string(scalar_name(type)) + "[";
  for (int i = 0; i < rank; ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "] on " + (space == MemorySpace::kDevice ? "device" : "host");
}

OwnedTensor Backend::new_tensor(ScalarType type, std::initializer_list<int64_t> shape) {
  Tensor view(nullptr, type, memory_space(), shape);
  std::unique_ptr<Buffer> buffer = allocate(view.bytes());
  view.data = buffer->data();
  return OwnedTensor(std::move(buffer), view);
}

}  // namespace epic
