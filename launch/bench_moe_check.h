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
//  (c) With the NCCL executor (device_executor): it cannot run on a decorator (it needs the CUDA
//      backend's stream), so (a) and (b) check ExpertParallelMoeExecutor, the reference, and (c)
//      compares one more forward of every layer by the NCCL executor with the reference's output on
//      the same backend, element by element within nccl_check_tolerance of the row's largest |value|
//      (the two sum a token's slots in different orders, and the grouped FFN may take another kernel
//      path for another row count).
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "comm/communicator.h"
#include "kernels/backend.h"
#include "worker/expert_parallel_moe.h"
#include "worker/expert_routing_table.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/moe_executor.h"
#include "worker/workspace.h"

namespace epic::cli {

inline constexpr int64_t kCheckedExpertRows = 64;

// Part (c)'s bound on |nccl - reference| relative to the reference row's largest |value|: fp32 1e-5
// (a few ulp of sum order); bf16 2e-2 (one bf16 rounding of an expert row, 2^-8, times a few slots,
// and one of the output).
double nccl_check_tolerance(ScalarType activation_type);
// Part (a)'s bound with hierarchical dispatch, relative to the row's largest |value|: fp32 1e-6 (a few
// ulp: the same products summed in another order); bf16 2e-2 (each partial sum rounded to bf16).
double hierarchical_check_tolerance(ScalarType activation_type);

// Part (c)'s comparison: elements with |actual - expected| > tolerance * max |expected| of their row
// (rows of row_elements; a NaN anywhere counts), the first described in *first.
int64_t count_relative_mismatches(std::span<const float> actual, std::span<const float> expected,
                                  int64_t row_elements, double tolerance, std::string* first);

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
  // The NCCL executor the timing used (part (c)); null otherwise. Requires !local_executor.
  MoeExecutor* device_executor = nullptr;
  // The host exchange's scheme: hierarchical sums a token's slots by rank and node, so part (a) then
  // allows the sum-order tolerance (hierarchical_check_tolerance) instead of bitwise equality.
  HostExchangeOptions exchange = {};
};

struct MoeCheckResult {
  int64_t data_plane_wrong = 0;     // elements of part (a) that differ bit for bit
  int64_t data_plane_elements = 0;  // elements part (a) compared
  int64_t expert_wrong = 0;         // elements of part (b) outside the tolerance
  int64_t expert_rows_checked = 0;
  int64_t nccl_wrong = 0;      // elements of part (c) outside the tolerance
  int64_t nccl_elements = 0;   // elements part (c) compared
  std::string first_mismatch;  // what went wrong first ("data plane, layer 0: token 0 element 0: ...")
  int64_t wrong() const { return data_plane_wrong + expert_wrong + nccl_wrong; }
};

MoeCheckResult check_moe_layers(const MoeCheckInputs& inputs);

}  // namespace epic::cli
