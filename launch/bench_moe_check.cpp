// bench-moe's two-part check of its MoE layers (see bench_moe_check.h).
#include "launch/bench_moe_check.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <sstream>
#include <vector>

#include "kernels/error.h"
#include "worker/expert_ffn_checker.h"
#include "worker/expert_parallel_moe.h"
#include "worker/identity_expert_backend.h"
#include "worker/moe_executor.h"

namespace epic::cli {
namespace {

std::unique_ptr<MoeExecutor> make_executor(const MoeCheckInputs& in, Backend& backend) {
  if (in.local_executor) return std::make_unique<LocalMoeExecutor>(in.config, in.weights, backend);
  return std::make_unique<ExpertParallelMoeExecutor>(in.config, in.weights, backend, in.comm, in.table,
                                                     in.exchange);
}

// The injected fault: the sign bit of out[0, 0] flipped on the backend (the highest byte of a
// little-endian f32 or bf16 holds it), so the fault travels the same read-back path as a real one.
void flip_sign_of_first_element(Backend& backend, const Tensor& out) {
  const size_t element = scalar_size(out.type);
  std::vector<unsigned char> bytes(element);
  backend.copy_to_host(out, 0, bytes.data(), element);
  bytes[element - 1] ^= 0x80;
  backend.copy_from_host(out, 0, bytes.data(), element);
  backend.synchronize();
}

}  // namespace

double nccl_check_tolerance(ScalarType activation_type) {
  return activation_type == ScalarType::kBF16 ? 2e-2 : 1e-5;
}

double hierarchical_check_tolerance(ScalarType activation_type) {
  return activation_type == ScalarType::kBF16 ? 2e-2 : 1e-6;
}

int64_t count_relative_mismatches(std::span<const float> actual, std::span<const float> expected,
                                  int64_t row_elements, double tolerance, std::string* first) {
  EPIC_CHECK(actual.size() == expected.size() && row_elements > 0 &&
                 expected.size() % static_cast<size_t>(row_elements) == 0,
             ErrorCode::kInternal, "count_relative_mismatches: sizes do not match");
  int64_t wrong = 0;
  const size_t row = static_cast<size_t>(row_elements);
  for (size_t start = 0; start < expected.size(); start += row) {
    double row_max = 0;
    for (size_t i = start; i < start + row; ++i) row_max = std::max(row_max, std::fabs(double(expected[i])));
    const double bound = tolerance * row_max;
    for (size_t i = start; i < start + row; ++i) {
      const double difference = std::fabs(double(actual[i]) - double(expected[i]));
      if (difference <= bound) continue;  // false for NaN: counted
      if (wrong == 0 && first != nullptr) {
        std::ostringstream text;
        text << "token " << start / row << " element " << i - start << ": got " << actual[i] << ", expected "
             << expected[i] << " (bound " << bound << " = " << tolerance << " x row max " << row_max << ")";
        *first = text.str();
      }
      ++wrong;
    }
  }
  return wrong;
}

MoeCheckResult check_moe_layers(const MoeCheckInputs& in) {
  MoeCheckResult result;
  const int64_t num_tokens = in.tokens.dim(0), hidden = in.tokens.dim(1);
  const ScalarType act = in.tokens.type;
  const OwnedTensor out = in.backend.new_tensor(act, {num_tokens, hidden});
  // The rows exactly as the block sees them (bf16-rounded in bf16 mode).
  const std::vector<float> x = read_as_f32(in.backend, in.tokens);

  // (a) The data plane with identity experts.
  {
    IdentityExpertBackend identity(in.backend);
    const std::unique_ptr<MoeExecutor> executor = make_executor(in, identity);
    for (int64_t layer = 0; layer < in.layers; ++layer) {
      executor->forward(layer, in.tokens, in.router_tokens, out, in.workspace);
      identity.synchronize();
      if (in.comm.rank() == in.corrupt_rank && num_tokens > 0) flip_sign_of_first_element(in.backend, out);
      const std::vector<float> expected =
          identity_moe_output(x, identity.routed_weights(), in.config.num_experts_per_tok, hidden, act);
      std::string first;
      const bool exact = in.exchange.dispatch == EpDispatch::kFlat;
      const int64_t wrong =
          exact ? count_bitwise_mismatches(read_as_f32(in.backend, out), expected, hidden, &first)
                : count_relative_mismatches(read_as_f32(in.backend, out), expected, hidden,
                                            hierarchical_check_tolerance(act), &first);
      if (wrong > 0 && result.first_mismatch.empty())
        result.first_mismatch = std::string("data plane (identity experts: out must be sum_j w_j x ") +
                                (exact ? "exactly" : "up to the hierarchical sum order") + "), layer " +
                                std::to_string(layer) + ": " + first;
      result.data_plane_wrong += wrong;
      result.data_plane_elements += static_cast<int64_t>(expected.size());
    }
  }

  // (b) The experts this worker hosts, a sample of their rows against a host FFN.
  {
    const int64_t rows_per_layer = (kCheckedExpertRows + in.layers - 1) / in.layers;
    ExpertFfnCheckingBackend checking(in.backend, rows_per_layer, expert_ffn_check_tolerance(act));
    const std::unique_ptr<MoeExecutor> executor = make_executor(in, checking);
    for (int64_t layer = 0; layer < in.layers; ++layer) {
      checking.set_label("layer " + std::to_string(layer));
      executor->forward(layer, in.tokens, in.router_tokens, out, in.workspace);
    }
    checking.synchronize();
    result.expert_wrong = checking.wrong_elements();
    result.expert_rows_checked = checking.rows_checked();
    if (result.expert_wrong > 0 && result.first_mismatch.empty())
      result.first_mismatch = "expert FFN (against a host reference), " + checking.first_mismatch();
  }

  // (c) The NCCL executor against the reference executor, both on the backend that ran.
  if (in.device_executor != nullptr) {
    EPIC_CHECK(!in.local_executor, ErrorCode::kInternal,
               "bench-moe check: the NCCL executor needs several ranks' reference");
    const std::unique_ptr<MoeExecutor> reference = make_executor(in, in.backend);
    const OwnedTensor expected_out = in.backend.new_tensor(act, {num_tokens, hidden});
    const double tolerance = nccl_check_tolerance(act);
    for (int64_t layer = 0; layer < in.layers; ++layer) {
      reference->forward(layer, in.tokens, in.router_tokens, expected_out, in.workspace);
      in.device_executor->forward(layer, in.tokens, in.router_tokens, out, in.workspace);
      in.backend.synchronize();
      if (in.comm.rank() == in.corrupt_rank && num_tokens > 0) flip_sign_of_first_element(in.backend, out);
      std::string first;
      const int64_t wrong = count_relative_mismatches(
          read_as_f32(in.backend, out), read_as_f32(in.backend, expected_out), hidden, tolerance, &first);
      if (wrong > 0 && result.first_mismatch.empty())
        result.first_mismatch = "NCCL executor against the MPI executor (within " +
                                std::to_string(tolerance) + " of the row's max), layer " +
                                std::to_string(layer) + ": " + first;
      result.nccl_wrong += wrong;
      result.nccl_elements += num_tokens * hidden;
    }
  }
  return result;
}

}  // namespace epic::cli
