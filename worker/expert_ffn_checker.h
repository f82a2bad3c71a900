// Checks the expert FFN a MoE block runs, on whichever backend runs it: expert_ffn goes to the real
// backend, then a sample of its rows is recomputed on the host from the same input rows and the
// same weights read back from the backend (only the experts the op is given: this worker's own)
// in double, and every element of a sampled row must lie within a tolerance relative to the
// row's largest reference magnitude.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/backend.h"
#include "worker/forwarding_backend.h"

namespace epic {

// The tolerance of the check, relative to a row's largest |reference| element: fp32 activations
// differ from the double reference only by the order of fp32 sums (about 1e-6); bf16 ones round the
// intermediate and the output to bf16 (2^-9 relative each).
double expert_ffn_check_tolerance(ScalarType activation_type);  // 1e-4 for F32, 2e-2 for BF16

class ExpertFfnCheckingBackend final : public ForwardingBackend {
 public:
  // Checks up to max_rows_per_call rows of each expert_ffn call, evenly spread over its rows.
  ExpertFfnCheckingBackend(Backend& inner, int64_t max_rows_per_call, double relative_tolerance);

  void expert_ffn(const Tensor& x, const Tensor& expert_offsets, const Tensor& gate_up, const Tensor& down,
                  const Tensor& local_index, const Tensor& intermediate, const Tensor& y) override;

  // Names the calls that follow in mismatch descriptions ("layer 3").
  void set_label(std::string label) { label_ = std::move(label); }
  int64_t rows_checked() const { return rows_checked_; }
  int64_t wrong_elements() const { return wrong_elements_; }
  // The first element outside the tolerance, with its label, expert, row and values; empty if none.
  const std::string& first_mismatch() const { return first_mismatch_; }

 private:
  int64_t max_rows_per_call_;
  double relative_tolerance_;
  std::string label_;
  int64_t rows_checked_ = 0;
  int64_t wrong_elements_ = 0;
  std::string first_mismatch_;
};

}  // namespace epic
