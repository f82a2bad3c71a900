// bench-moe's self-check (on by default, as nccl-tests' -c): after the timed iterations, each worker
// checks what its MoE layers computed, in two parts, without ever loading another worker's experts.
//  (a) The data plane: one more forward of every layer with the same kind of executor (the same
//      routing, dispatch and combine) on an identity-expert decorator of the backend that ran
//      (IdentityExpertBackend): each token's output must equal sum_j w_j x bit for bit, computed on
//      the host in slot order in fp32.
//  (b) The experts: one more forward of every layer on an ExpertFfnCheckingBackend: a sample of the
//      rows this worker's experts computed (at most kCheckedExpertRows over all layers) against a
//      double-precision host FFN of the same rows and weights, within expert_ffn_check_tolerance.
// Both decorate whichever backend runs (cpu or cuda) and read results back to the host. Neither
// covers CUDA's fused one-token routed_moe (a decorator runs the block op by op); the kernel op
// table checks that kernel against the CPU.
#pragma once

#include <cstdint>
#include <string>

#include "comm/communicator.h"
#include "kernels/backend.h"
#include "worker/expert_routing_table.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/workspace.h"

namespace epic::cli {

inline constexpr int64_t kCheckedExpertRows = 64;

struct MoeCheckInputs {
  const ModelConfig& config;
  const ModelWeights& weights;
  Backend& backend;
  Communicator& comm;
  const ExpertRoutingTable& table;
  bool local_executor;          // LocalMoeExecutor (one GPU worker) instead of ExpertParallelMoeExecutor
  const Tensor& tokens;         // [tokens, hidden] activation type
  const Tensor& router_tokens;  // [tokens, hidden] F32
  Workspace& workspace;  // the timed run's buffers, reused (made on `backend`; decorators allocate there)
  int64_t layers;
  // Test-only fault injection (bench-moe's hidden --inject-wrong-row): on this rank, flip the sign of
  // element 0 of combined row 0 in part (a), so the check must fail naming this worker. -1: none.
  int corrupt_rank = -1;
};

struct MoeCheckResult {
  int64_t data_plane_wrong = 0;     // elements of part (a) that differ bit for bit
  int64_t data_plane_elements = 0;  // elements part (a) compared
  int64_t expert_wrong = 0;         // elements of part (b) outside the tolerance
  int64_t expert_rows_checked = 0;
  std::string first_mismatch;  // what went wrong first ("data plane, layer 0: token 0 element 0: ...")
  int64_t wrong() const { return data_plane_wrong + expert_wrong; }
};

MoeCheckResult check_moe_layers(const MoeCheckInputs& inputs);

}  // namespace epic::cli
