// Workspace growth: geometric, so a run of growing prefill sizes reallocates a few times only.
#include "worker/workspace.h"

#include <algorithm>

#include "kernels/error.h"

namespace epic {

Tensor Workspace::get(int slot, ScalarType type, std::initializer_list<int64_t> shape) {
  EPIC_CHECK(slot >= 0 && slot < num_slots_, ErrorCode::kInternal,
             "workspace slot " + std::to_string(slot) + " does not exist (" + std::to_string(num_slots_) +
                 " slots)");
  if (buffers_.size() < static_cast<size_t>(num_slots_)) buffers_.resize(num_slots_);
  Tensor view(nullptr, type, backend_.memory_space(), shape);
  const size_t needed = std::max<size_t>(view.bytes(), 64);
  std::unique_ptr<Buffer>& buffer = buffers_[slot];
  if (!buffer || buffer->size() < needed) {
    const size_t grown = buffer ? std::max(needed, buffer->size() + buffer->size() / 2) : needed;
    buffer.reset();  // free first: the old and new buffer need not fit together
    buffer = backend_.allocate(grown);
    ++generation_;
  }
  view.data = buffer->data();
  return view;
}

size_t Workspace::bytes() const {
  size_t total = 0;
  for (const auto& buffer : buffers_)
    if (buffer) total += buffer->size();
  return total;
}

}  // namespace epic
