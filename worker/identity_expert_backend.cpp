// The identity expert and the exact output it implies (see identity_expert_backend.h). Built with
// -ffp-contract=off (worker/CMakeLists.txt): the expected sum must round each product and each sum
// as combine_top_k does, never fused into an FMA.
#include "worker/identity_expert_backend.h"

#include <bit>
#include <cstdio>

#include "kernels/backend_checks.h"
#include "kernels/error.h"
#include "worker/safetensors.h"

namespace epic {

void IdentityExpertBackend::expert_ffn(const Tensor& x, const Tensor& expert_offsets, const Tensor& gate_up,
                                       const Tensor& down, const Tensor& local_index,
                                       const Tensor& intermediate, const Tensor& y) {
  backend_checks::check_expert_ffn(memory_space(), x, expert_offsets, gate_up, down, local_index,
                                   intermediate, y);
  inner().copy(x, y);
  identity_rows_ += x.dim(0);
}

void IdentityExpertBackend::route_top_k(const Tensor& logits, const Tensor& present, const Tensor& expert_ids,
                                        const Tensor& weights, bool normalize, const Tensor& row_top_k) {
  inner().route_top_k(logits, present, expert_ids, weights, normalize, row_top_k);
  routed_expert_ids_.resize(static_cast<size_t>(expert_ids.numel()));
  routed_weights_.resize(static_cast<size_t>(weights.numel()));
  inner().copy_to_host(expert_ids, 0, routed_expert_ids_.data(), expert_ids.bytes());
  inner().copy_to_host(weights, 0, routed_weights_.data(), weights.bytes());
}

std::vector<float> identity_moe_output(std::span<const float> x, std::span<const float> weights,
                                       int64_t top_k, int64_t hidden, ScalarType out_type) {
  EPIC_CHECK(top_k >= 1 && hidden >= 1 && x.size() % static_cast<size_t>(hidden) == 0 &&
                 weights.size() == x.size() / static_cast<size_t>(hidden) * static_cast<size_t>(top_k),
             ErrorCode::kInternal,
             "identity_moe_output: " + std::to_string(x.size()) + " row values of hidden " +
                 std::to_string(hidden) + " do not match " + std::to_string(weights.size()) +
                 " routing weights of top-" + std::to_string(top_k));
  EPIC_CHECK(out_type == ScalarType::kF32 || out_type == ScalarType::kBF16, ErrorCode::kInternal,
             std::string("identity_moe_output: out_type must be f32 or bf16, not ") + scalar_name(out_type));
  const size_t num_tokens = x.size() / static_cast<size_t>(hidden);
  std::vector<float> out(x.size());
  for (size_t t = 0; t < num_tokens; ++t) {
    for (int64_t i = 0; i < hidden; ++i) {
      const float value = x[t * hidden + i];
      float sum = 0.0f;
      for (int64_t j = 0; j < top_k; ++j) {
        const float product = weights[t * top_k + j] * value;
        sum = sum + product;
      }
      out[t * hidden + i] = out_type == ScalarType::kBF16 ? bf16_to_f32(f32_to_bf16(sum)) : sum;
    }
  }
  return out;
}

std::vector<float> read_as_f32(Backend& backend, const Tensor& tensor) {
  std::vector<float> values(static_cast<size_t>(tensor.numel()));
  if (tensor.type == ScalarType::kF32) {
    if (!values.empty()) backend.copy_to_host(tensor, 0, values.data(), tensor.bytes());
    return values;
  }
  EPIC_CHECK(tensor.type == ScalarType::kBF16, ErrorCode::kInternal,
             "read_as_f32: " + tensor.describe() + " is neither f32 nor bf16");
  std::vector<uint16_t> bits(values.size());
  if (!bits.empty()) backend.copy_to_host(tensor, 0, bits.data(), tensor.bytes());
  for (size_t i = 0; i < bits.size(); ++i) values[i] = bf16_to_f32(bits[i]);
  return values;
}

int64_t count_bitwise_mismatches(std::span<const float> actual, std::span<const float> expected,
                                 int64_t row_elements, std::string* first) {
  EPIC_CHECK(actual.size() == expected.size() && row_elements >= 1, ErrorCode::kInternal,
             "count_bitwise_mismatches: " + std::to_string(actual.size()) + " values against " +
                 std::to_string(expected.size()));
  int64_t wrong = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const uint32_t got = std::bit_cast<uint32_t>(actual[i]), want = std::bit_cast<uint32_t>(expected[i]);
    if (got == want) continue;
    if (wrong++ == 0 && first != nullptr) {
      char text[160];
      std::snprintf(text, sizeof(text), "token %lld element %lld: got %.9g (0x%08x), expected %.9g (0x%08x)",
                    static_cast<long long>(i / row_elements), static_cast<long long>(i % row_elements),
                    actual[i], got, expected[i], want);
      *first = text;
    }
  }
  return wrong;
}

}  // namespace epic
