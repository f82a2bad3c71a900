// bench-moe's two-part check of its MoE layers (see bench_moe_check.h).
#include "launch/bench_moe_check.h"

#include <memory>
#include <vector>

#include "worker/expert_ffn_checker.h"
#include "worker/expert_parallel_moe.h"
#include "worker/identity_expert_backend.h"
#include "worker/moe_executor.h"

namespace epic::cli {
namespace {

std::unique_ptr<MoeExecutor> make_executor(const MoeCheckInputs& in, Backend& backend) {
  if (in.local_executor) return std::make_unique<LocalMoeExecutor>(in.config, in.weights, backend);
  return std::make_unique<ExpertParallelMoeExecutor>(in.config, in.weights, backend, in.comm, in.table);
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
      const int64_t wrong = count_bitwise_mismatches(read_as_f32(in.backend, out), expected, hidden, &first);
      if (wrong > 0 && result.first_mismatch.empty())
        result.first_mismatch = "data plane (identity experts: out must be sum_j w_j x exactly), layer " +
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
  return result;
}

}  // namespace epic::cli
