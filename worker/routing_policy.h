// What the routers may choose in a step, switchable between steps: how many experts each token takes
// (the residency states: FOCUS runs the trained top-k, WAKE fewer) and, per MoE layer, which experts
// (the present ones, less any the user pruned). A narrower choice is computed as the model's own
// routing with those experts masked out and the top-k weights renormalised (when the model
// normalises them), the way a checkpoint's missing experts are handled. Every rank of an
// expert-parallel job must use the same policy in a step (the dispatch records carry top-k slots).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"

namespace epic {

// The named residency states of the design note: FOCUS = the full trained top-k, WAKE = 4 experts per
// token (or the trained top-k when that is smaller).
enum class ResidencyState { kFocus, kWake };
constexpr int64_t kWakeExpertsPerToken = 4;
// "focus" or "wake" -> the state; anything else -> Error(kInvalidArgument) naming the valid names.
ResidencyState parse_residency_state(const std::string& name);
// "wake" or "wake,focus,wake": one state, or a comma-separated list of them (one per request);
// Error(kInvalidArgument) naming the bad entry.
std::vector<ResidencyState> parse_residency_states(const std::string& list);
const char* residency_state_name(ResidencyState state);
int64_t experts_per_token(ResidencyState state, const ModelConfig& config);

class RoutingPolicy {
 public:
  // The model as trained: its top-k over its present experts.
  static std::shared_ptr<const RoutingPolicy> trained(const ModelConfig& config);
  // top_k in [1, the trained top-k]; removed: per MoE layer the experts taken out of routing (on top of
  // those the checkpoint lacks). Error(kInvalidArgument) for a top-k out of range, a layer that is not
  // a MoE layer, an expert id out of the layer's range, or a layer left with fewer routable experts
  // than top_k. The masks live in the backend's memory (route_top_k reads them there).
  static std::shared_ptr<const RoutingPolicy> make(const ModelConfig& config, const ModelWeights& weights,
                                                   Backend& backend, int64_t top_k,
                                                   const std::map<int64_t, std::vector<int64_t>>& removed);

  int64_t top_k() const { return top_k_; }
  // The mask route_top_k reads for `layer`: the narrowed one when experts were removed there, else the
  // layer's present experts.
  const Tensor& routable_mask(int64_t layer, const MoeLayerWeights& moe) const;
  // Experts removed from routing in `layer` (ascending; empty when none).
  const std::vector<int64_t>& removed(int64_t layer) const;
  int64_t num_removed() const;

 private:
  int64_t top_k_ = 0;
  std::map<int64_t, OwnedTensor> masks_;
  std::map<int64_t, std::vector<int64_t>> removed_;
};

// The host copy of the mask route_top_k reads for `layer` (one entry per expert): the layer's present
// experts less those the policy removed there; policy null: the model as trained.
std::vector<uint8_t> routable_host_mask(const MoeLayerWeights& moe, const RoutingPolicy* policy,
                                        int64_t layer);

// One token's router softmax over the routable experts on the host; row holds routable.size() logits.
// probs = exp(row[e] - max) / total for a routable expert, 0 for the others, all in fp32 as route_top_k
// computes them (probs is resized to one entry per expert).
void routable_softmax(const float* row, const std::vector<uint8_t>& routable, std::vector<float>& probs);
// The largest routable logit and the sum of exp(double(row[e] - max)) over the routable experts, for a
// caller that wants a few experts' probabilities in double: exp(double(row[e] - max)) / total.
struct RoutableSoftmaxSum {
  float max = 0;
  double total = 0;
};
RoutableSoftmaxSum routable_softmax_sum(const float* row, const std::vector<uint8_t>& routable);

}  // namespace epic
