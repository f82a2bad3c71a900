// Small helpers shared by the host-exchange executor's flat and hierarchical schemes
// (expert_parallel_moe.cpp, expert_parallel_hierarchical.cpp).
#pragma once

#include <chrono>
#include <vector>

#include "kernels/backend.h"

namespace epic::host_exchange {

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// A backend tensor's elements on the host (waits for the copy).
template <typename T>
std::vector<T> download(Backend& backend, const Tensor& tensor) {
  std::vector<T> values(static_cast<size_t>(tensor.numel()));
  if (!values.empty()) backend.copy_to_host(tensor, 0, values.data(), tensor.bytes());
  return values;
}

}  // namespace epic::host_exchange
