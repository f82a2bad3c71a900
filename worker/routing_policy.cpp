// RoutingPolicy (routing_policy.h): validation and the narrowed masks.
#include "worker/routing_policy.h"

#include <algorithm>
#include <cmath>

#include "kernels/error.h"

namespace epic {

ResidencyState parse_residency_state(const std::string& name) {
  if (name == "focus") return ResidencyState::kFocus;
  if (name == "wake") return ResidencyState::kWake;
  throw Error(ErrorCode::kInvalidArgument, "residency state '" + name +
                                               "': use focus (the trained experts per token) or wake (" +
                                               std::to_string(kWakeExpertsPerToken) + " experts per token)");
}

std::vector<ResidencyState> parse_residency_states(const std::string& list) {
  std::vector<ResidencyState> states;
  size_t begin = 0;
  while (true) {
    const size_t end = list.find(',', begin);
    const std::string name = list.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
    if (name.empty())
      throw Error(ErrorCode::kInvalidArgument,
                  "residency states '" + list + "': entry " + std::to_string(states.size() + 1) +
                      " is empty; give focus or wake, or a comma-separated list of them without blanks");
    states.push_back(parse_residency_state(name));
    if (end == std::string::npos) return states;
    begin = end + 1;
  }
}

const char* residency_state_name(ResidencyState state) {
  return state == ResidencyState::kFocus ? "focus" : "wake";
}

int64_t experts_per_token(ResidencyState state, const ModelConfig& config) {
  return state == ResidencyState::kFocus ? config.num_experts_per_tok
                                         : std::min(kWakeExpertsPerToken, config.num_experts_per_tok);
}

std::shared_ptr<const RoutingPolicy> RoutingPolicy::trained(const ModelConfig& config) {
  auto policy = std::make_shared<RoutingPolicy>();
  policy->top_k_ = config.num_experts_per_tok;
  return policy;
}

std::shared_ptr<const RoutingPolicy> RoutingPolicy::make(
    const ModelConfig& config, const ModelWeights& weights, Backend& backend, int64_t top_k,
    const std::map<int64_t, std::vector<int64_t>>& removed) {
  if (top_k < 1 || top_k > config.num_experts_per_tok)
    throw Error(ErrorCode::kInvalidArgument,
                "experts per token " + std::to_string(top_k) + ": this model was trained with top-k " +
                    std::to_string(config.num_experts_per_tok) + "; give a value from 1 to that");
  auto policy = std::make_shared<RoutingPolicy>();
  policy->top_k_ = top_k;
  for (const auto& [layer, experts] : removed) {
    if (layer < 0 || layer >= static_cast<int64_t>(weights.layers.size()) || !weights.layers[layer].is_moe)
      throw Error(ErrorCode::kInvalidArgument,
                  "removing experts from layer " + std::to_string(layer) + ": not a MoE layer of this model");
    const MoeLayerWeights& moe = weights.layers[layer].moe;
    std::vector<uint8_t> mask = moe.present;
    for (int64_t expert : experts) {
      if (expert < 0 || expert >= moe.num_experts)
        throw Error(ErrorCode::kInvalidArgument,
                    "removing expert " + std::to_string(expert) + " from layer " + std::to_string(layer) +
                        ": the layer has experts 0 to " + std::to_string(moe.num_experts - 1));
      mask[expert] = 0;
    }
    const int64_t routable = std::count(mask.begin(), mask.end(), uint8_t{1});
    if (routable < top_k)
      throw Error(ErrorCode::kInvalidArgument,
                  "layer " + std::to_string(layer) + " keeps " + std::to_string(routable) +
                      " routable experts after removing " + std::to_string(experts.size()) +
                      ", fewer than the " + std::to_string(top_k) +
                      " experts per token asked for: remove fewer or route fewer per token");
    std::vector<int64_t> sorted = experts;
    std::sort(sorted.begin(), sorted.end());
    sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
    if (sorted.empty()) continue;
    OwnedTensor tensor = backend.new_tensor(ScalarType::kU8, {moe.num_experts});
    backend.copy_from_host(tensor, 0, mask.data(), mask.size());
    policy->masks_.emplace(layer, std::move(tensor));
    policy->removed_.emplace(layer, std::move(sorted));
  }
  return policy;
}

const Tensor& RoutingPolicy::routable_mask(int64_t layer, const MoeLayerWeights& moe) const {
  const auto found = masks_.find(layer);
  return found == masks_.end() ? moe.present_mask.view() : found->second.view();
}

const std::vector<int64_t>& RoutingPolicy::removed(int64_t layer) const {
  static const std::vector<int64_t> kNone;
  const auto found = removed_.find(layer);
  return found == removed_.end() ? kNone : found->second;
}

int64_t RoutingPolicy::num_removed() const {
  int64_t total = 0;
  for (const auto& [layer, experts] : removed_) total += static_cast<int64_t>(experts.size());
  return total;
}

std::vector<uint8_t> routable_host_mask(const MoeLayerWeights& moe, const RoutingPolicy* policy,
                                        int64_t layer) {
  std::vector<uint8_t> routable = moe.present;
  if (policy != nullptr)
    for (int64_t e : policy->removed(layer)) routable[e] = 0;
  return routable;
}

namespace {

float routable_max(const float* row, const std::vector<uint8_t>& routable) {
  float max = -INFINITY;
  for (size_t e = 0; e < routable.size(); ++e)
    if (routable[e]) max = std::max(max, row[e]);
  return max;
}

}  // namespace

void routable_softmax(const float* row, const std::vector<uint8_t>& routable, std::vector<float>& probs) {
  const size_t num_experts = routable.size();
  probs.resize(num_experts);
  const float max = routable_max(row, routable);
  float total = 0;
  for (size_t e = 0; e < num_experts; ++e) total += probs[e] = routable[e] ? std::exp(row[e] - max) : 0.0f;
  for (size_t e = 0; e < num_experts; ++e) probs[e] /= total;
}

RoutableSoftmaxSum routable_softmax_sum(const float* row, const std::vector<uint8_t>& routable) {
  RoutableSoftmaxSum sum;
  sum.max = routable_max(row, routable);
  for (size_t e = 0; e < routable.size(); ++e)
    sum.total += routable[e] ? std::exp(double(row[e] - sum.max)) : 0.0;
  return sum;
}

}  // namespace epic
