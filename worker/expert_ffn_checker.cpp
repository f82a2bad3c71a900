// The sampled host recomputation of expert_ffn (see expert_ffn_checker.h).
#include "worker/expert_ffn_checker.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "kernels/error.h"
#include "worker/safetensors.h"

namespace epic {
namespace {

// Elements [first, first + count) of an F32 or BF16 tensor, widened to float.
std::vector<float> read_elements(Backend& backend, const Tensor& tensor, int64_t first, int64_t count) {
  std::vector<float> values(static_cast<size_t>(count));
  if (count == 0) return values;
  const size_t element = scalar_size(tensor.type);
  if (tensor.type == ScalarType::kF32) {
    backend.copy_to_host(tensor, static_cast<size_t>(first) * element, values.data(),
                         values.size() * element);
    return values;
  }
  EPIC_CHECK(tensor.type == ScalarType::kBF16, ErrorCode::kInternal,
             "expert_ffn check: " + tensor.describe() + " is neither f32 nor bf16");
  std::vector<uint16_t> bits(values.size());
  backend.copy_to_host(tensor, static_cast<size_t>(first) * element, bits.data(), bits.size() * element);
  for (size_t i = 0; i < bits.size(); ++i) values[i] = bf16_to_f32(bits[i]);
  return values;
}

template <typename T>
std::vector<T> read_all(Backend& backend, const Tensor& tensor) {
  std::vector<T> values(static_cast<size_t>(tensor.numel()));
  if (!values.empty()) backend.copy_to_host(tensor, 0, values.data(), tensor.bytes());
  return values;
}

// One hosted expert's matrices on the host: gate_up [2I, H] (gate rows first), down [H, I].
struct HostExpert {
  std::vector<float> gate_up, down;
};

// down(silu(gate x) * up x) in double.
std::vector<double> reference_ffn(const HostExpert& expert, const std::vector<float>& x, int64_t hidden,
                                  int64_t inter) {
  std::vector<double> activated(static_cast<size_t>(inter));
  for (int64_t i = 0; i < inter; ++i) {
    double gate = 0, up = 0;
    for (int64_t h = 0; h < hidden; ++h) {
      gate += static_cast<double>(expert.gate_up[i * hidden + h]) * x[h];
      up += static_cast<double>(expert.gate_up[(inter + i) * hidden + h]) * x[h];
    }
    activated[i] = gate / (1.0 + std::exp(-gate)) * up;
  }
  std::vector<double> y(static_cast<size_t>(hidden));
  for (int64_t h = 0; h < hidden; ++h) {
    double sum = 0;
    for (int64_t i = 0; i < inter; ++i) sum += static_cast<double>(expert.down[h * inter + i]) * activated[i];
    y[h] = sum;
  }
  return y;
}

}  // namespace

double expert_ffn_check_tolerance(ScalarType activation_type) {
  return activation_type == ScalarType::kBF16 ? 2e-2 : 1e-4;
}

ExpertFfnCheckingBackend::ExpertFfnCheckingBackend(Backend& inner, int64_t max_rows_per_call,
                                                   double relative_tolerance)
    : ForwardingBackend(inner),
      max_rows_per_call_(max_rows_per_call),
      relative_tolerance_(relative_tolerance) {
  EPIC_CHECK(max_rows_per_call >= 1 && relative_tolerance > 0, ErrorCode::kInternal,
             "ExpertFfnCheckingBackend needs max_rows_per_call >= 1 and a positive tolerance");
}

void ExpertFfnCheckingBackend::expert_ffn(const Tensor& x, const Tensor& expert_offsets,
                                          const Tensor& gate_up, const Tensor& down,
                                          const Tensor& local_index, const Tensor& intermediate,
                                          const Tensor& y) {
  inner().expert_ffn(x, expert_offsets, gate_up, down, local_index, intermediate, y);
  const int64_t rows = x.dim(0), hidden = x.dim(1), inter = down.dim(2);
  if (rows == 0) return;
  const std::vector<int32_t> offsets = read_all<int32_t>(inner(), expert_offsets);
  const std::vector<int32_t> slot_of_expert = read_all<int32_t>(inner(), local_index);
  const int64_t num_checked = std::min(rows, max_rows_per_call_);
  // Rows are grouped by expert, so the sampled rows of one expert come together: one expert's weights
  // on the host at a time (9 MiB of bf16 at Qwen3's shapes, widened), each read once per call.
  int32_t cached_slot = -1;
  HostExpert cached;
  for (int64_t n = 0; n < num_checked; ++n) {
    const int64_t row = n * rows / num_checked;  // evenly spread, first row included
    const int64_t expert =
        std::upper_bound(offsets.begin(), offsets.end(), static_cast<int32_t>(row)) - offsets.begin() - 1;
    EPIC_CHECK(
        expert >= 0 && expert < static_cast<int64_t>(slot_of_expert.size()) && slot_of_expert[expert] >= 0,
        ErrorCode::kInternal,
        "expert_ffn check: row " + std::to_string(row) + " belongs to no hosted expert (expert " +
            std::to_string(expert) + ")");
    const int32_t slot = slot_of_expert[expert];
    if (slot != cached_slot) {
      const int64_t gate_up_elements = 2 * inter * hidden, down_elements = hidden * inter;
      cached = HostExpert{read_elements(inner(), gate_up, slot * gate_up_elements, gate_up_elements),
                          read_elements(inner(), down, slot * down_elements, down_elements)};
      cached_slot = slot;
    }
    const std::vector<float> input = read_elements(inner(), x, row * hidden, hidden);
    const std::vector<float> output = read_elements(inner(), y, row * hidden, hidden);
    const std::vector<double> reference = reference_ffn(cached, input, hidden, inter);
    double scale = 0;
    for (double value : reference) scale = std::max(scale, std::abs(value));
    const double allowed = relative_tolerance_ * scale;
    for (int64_t h = 0; h < hidden; ++h) {
      const double error = std::abs(static_cast<double>(output[h]) - reference[h]);
      if (error <= allowed) continue;  // a NaN fails here too
      if (wrong_elements_++ == 0) {
        char text[256];
        std::snprintf(
            text, sizeof(text),
            "expert %lld, row %lld of its group, element %lld: got %.9g, reference %.9g (allowed error "
            "%.3g = %.0e x the row's largest |reference| %.6g)",
            static_cast<long long>(expert), static_cast<long long>(row), static_cast<long long>(h), output[h],
            reference[h], allowed, relative_tolerance_, scale);
        first_mismatch_ = (label_.empty() ? "" : label_ + ", ") + text;
      }
    }
    ++rows_checked_;
  }
}

}  // namespace epic
