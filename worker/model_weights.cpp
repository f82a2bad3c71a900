// Loading ModelWeights from a WeightSource into backend memory, with the missing-expert policy.
#include "worker/model_weights.h"

#include <algorithm>
#include <chrono>
#include <sstream>

#include "kernels/error.h"
#include "worker/weight_loader.h"

namespace epic {
namespace {

struct MissingExpert {
  int64_t layer;
  int64_t expert_id;
  std::string where;  // what the index says about the missing tensor
};

std::string missing_report(const std::vector<MissingExpert>& missing) {
  std::ostringstream out;
  out << missing.size() << " expert(s) that the router has are missing from the checkpoint:";
  for (const MissingExpert& m : missing)
    out << "\n  layer " << m.layer << " expert " << m.expert_id << ": " << m.where;
  out << "\nRe-download the shard(s) named above, or pass --allow-missing-experts to mask these experts "
         "out of routing (top-k is then chosen among the present experts).";
  return out.str();
}

// Collects the tensors of a load plan and the backend tensors they fill.
class LoadPlan {
 public:
  LoadPlan(Backend& backend, ScalarType weight_type) : backend_(backend), weight_type_(weight_type) {}

  // A destination of weight type holding the listed tensors one after another.
  OwnedTensor stacked(std::initializer_list<int64_t> shape,
                      const std::vector<std::pair<std::string, std::vector<int64_t>>>& parts) {
    OwnedTensor destination = backend_.new_tensor(weight_type_, shape);
    size_t offset = 0;
    for (const auto& [name, part_shape] : parts) {
      loads_.push_back({name, part_shape, destination.view(), offset});
      int64_t count = 1;
      for (int64_t d : part_shape) count *= d;
      offset += static_cast<size_t>(count) * scalar_size(weight_type_);
    }
    EPIC_CHECK(offset == destination.view().bytes(), ErrorCode::kInternal,
               "load plan: the parts of " + parts.front().first + " do not fill their destination");
    return destination;
  }
  OwnedTensor single(const std::string& name, std::initializer_list<int64_t> shape) {
    return stacked(shape, {{name, std::vector<int64_t>(shape)}});
  }
  const std::vector<TensorLoad>& loads() const { return loads_; }

 private:
  Backend& backend_;
  ScalarType weight_type_;
  std::vector<TensorLoad> loads_;
};

}  // namespace

bool MoeLayerWeights::hosts(int64_t expert) const {
  return std::binary_search(hosted.begin(), hosted.end(), expert);
}

int64_t ModelWeights::experts_hosted() const {
  int64_t count = 0;
  for (const LayerWeights& layer : layers) count += static_cast<int64_t>(layer.moe.hosted.size());
  return count;
}

int64_t LayerExpertInventory::num_present() const {
  int64_t count = 0;
  for (uint8_t p : present) count += p;
  return count;
}

std::vector<std::string> expert_tensor_names(const ModelConfig& config, int64_t layer, int64_t expert_id) {
  const std::string base = config.layer_prefix(layer) + "mlp.experts." + std::to_string(expert_id) + ".";
  return {base + "gate_proj.weight", base + "up_proj.weight", base + "down_proj.weight"};
}

ExpertInventory inspect_experts(const ModelConfig& config, WeightSource& source, bool allow_missing_experts) {
  const int64_t hidden = config.hidden_size;
  // Without an expert count every layer reads as dense, and the run would fail later on a missing
  // dense MLP tensor, or worse, silently skip the routers; name the real cause instead.
  if (config.num_experts == 0) {
    for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
      const std::string router_name = config.layer_prefix(layer) + "mlp.gate.weight";
      if (!source.contains(router_name)) continue;
      throw Error(ErrorCode::kInvalidConfig,
                  source.description() +
                      ": config.json names no expert count (num_experts / num_local_experts) but the checkpoint "
                      "has routers, e.g. " +
                      router_name +
                      "; add the expert count to config.json (\"num_experts\": the row count of "
                      "the largest router)");
    }
  }
  ExpertInventory inventory;
  std::vector<MissingExpert> missing;
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    if (!config.is_moe_layer(layer)) continue;
    const std::string router_name = config.layer_prefix(layer) + "mlp.gate.weight";
    const TensorInfo& router = source.info(router_name);
    if (router.shape.size() != 2 || router.shape[1] != hidden || router.shape[0] <= 0 ||
        router.shape[0] > config.num_experts) {
      throw Error(ErrorCode::kInvalidCheckpoint,
                  source.description() + " (" + source.location_of(router_name) + "): router " + router_name +
                      " has shape " + shape_to_string(router.shape) + "; expected [E, " + std::to_string(hidden) +
                      "] with 1 <= E <= num_experts (" + std::to_string(config.num_experts) +
                      "). Check config.json against the checkpoint.");
    }
    LayerExpertInventory& experts = inventory[layer];
    experts.num_experts = router.shape[0];
    experts.present.assign(experts.num_experts, 1);
    for (int64_t expert = 0; expert < router.shape[0]; ++expert) {
      std::string where;
      for (const std::string& name : expert_tensor_names(config, layer, expert)) {
        if (source.contains(name)) continue;
        // Name the shard the index points at: where this expert's other tensors are, else where the
        // layer's router is (the shard a complete checkpoint would most likely hold it in).
        std::string sibling_location;
        for (const std::string& sibling : expert_tensor_names(config, layer, expert))
          if (source.contains(sibling)) sibling_location = source.location_of(sibling);
        where = name + " is not in the checkpoint; " +
                (sibling_location.empty() ? "the index puts layer " + std::to_string(layer) + "'s router in " +
                                                source.location_of(router_name)
                                          : "the index puts this expert's other tensors in " + sibling_location);
        break;
      }
      if (!where.empty()) {
        missing.push_back({layer, expert, where});
        experts.present[expert] = 0;
      }
    }
  }
  if (!missing.empty() && !allow_missing_experts)
    throw Error(ErrorCode::kMissingExperts, source.description() + ": " + missing_report(missing));
  for (const auto& [layer, experts] : inventory) {
    const int64_t num_present = experts.num_present();
    if (num_present < config.num_experts_per_tok)
      throw Error(ErrorCode::kMissingExperts,
                  source.description() + ": layer " + std::to_string(layer) + " has " + std::to_string(num_present) +
                      " present experts but num_experts_per_tok is " + std::to_string(config.num_experts_per_tok) +
                      "; top-k needs at least that many experts");
  }
  return inventory;
}

namespace {

// The router, masks and hosted experts of one MoE layer, added to the plan.
void plan_moe_layer(const ModelConfig& config, int64_t layer, const LayerExpertInventory& experts,
                    const LoadOptions& options, Backend& backend, ScalarType weight_type, LoadPlan& plan,
                    MoeLayerWeights& moe) {
  const int64_t hidden = config.hidden_size;
  const std::string p = config.layer_prefix(layer);
  moe.num_experts = experts.num_experts;
  moe.present = experts.present;
  moe.router = plan.single(p + "mlp.gate.weight", {moe.num_experts, hidden});
  for (int64_t expert = 0; expert < moe.num_experts; ++expert) {
    if (!moe.present[expert]) continue;
    if (options.hosts_expert && !options.hosts_expert(layer, expert)) continue;
    moe.hosted.push_back(expert);
  }
  const int64_t inter = config.moe_intermediate_size, num_hosted = static_cast<int64_t>(moe.hosted.size());
  std::vector<std::pair<std::string, std::vector<int64_t>>> gate_up_parts, down_parts;
  for (int64_t expert : moe.hosted) {
    const std::vector<std::string> names = expert_tensor_names(config, layer, expert);
    gate_up_parts.push_back({names[0], {inter, hidden}});
    gate_up_parts.push_back({names[1], {inter, hidden}});
    down_parts.push_back({names[2], {hidden, inter}});
  }
  if (num_hosted > 0) {
    moe.gate_up = plan.stacked({num_hosted, 2 * inter, hidden}, gate_up_parts);
    moe.down = plan.stacked({num_hosted, hidden, inter}, down_parts);
  } else {  // empty stacks still have their shape (the ops check it)
    moe.gate_up = backend.new_tensor(weight_type, {0, 2 * inter, hidden});
    moe.down = backend.new_tensor(weight_type, {0, hidden, inter});
  }
  // The small per-layer tables go up once, here: no op ever reads them back.
  std::vector<int32_t> local_index(moe.num_experts, -1);
  for (int64_t slot = 0; slot < num_hosted; ++slot) local_index[moe.hosted[slot]] = static_cast<int32_t>(slot);
  moe.local_index = backend.new_tensor(ScalarType::kI32, {moe.num_experts});
  backend.copy_from_host(moe.local_index, 0, local_index.data(), local_index.size() * sizeof(int32_t));
  moe.present_mask = backend.new_tensor(ScalarType::kU8, {moe.num_experts});
  backend.copy_from_host(moe.present_mask, 0, moe.present.data(), moe.present.size());
  backend.synchronize();  // local_index lives on this stack frame
}

uint64_t resident_bytes_of(const ModelWeights& weights) {
  uint64_t total = 0;
  for (const OwnedTensor* t : {&weights.embed, &weights.final_norm, &weights.lm_head}) total += t->bytes();
  for (const LayerWeights& w : weights.layers)
    for (const OwnedTensor* t : {&w.input_norm, &w.post_attention_norm, &w.qkv_proj, &w.o_proj, &w.q_norm, &w.k_norm,
                                 &w.dense_gate_up, &w.dense_down, &w.moe.router, &w.moe.gate_up, &w.moe.down,
                                 &w.moe.local_index, &w.moe.present_mask})
      total += t->bytes();
  return total;
}

void run_load(WeightSource& source, Backend& backend, const LoadPlan& plan, const LoadOptions& options) {
  WeightLoadOptions load_options;
  load_options.allow_nonfinite_weights = options.allow_nonfinite_weights;
  load_options.num_threads = options.reader_threads;
  load_tensors(source, backend, plan.loads(), load_options);
  backend.synchronize();
}

}  // namespace

// BF16 when every tensor the model needs is stored as BF16, else F32 (F16 or F32 storage widens).
ScalarType stored_weight_type(const ModelConfig& config, WeightSource& source) {
  for (const std::string& name :
       {config.tensor_prefix + "embed_tokens.weight", config.tensor_prefix + "norm.weight",
        config.layer_prefix(0) + "self_attn.q_proj.weight"}) {
    if (!source.contains(name) || source.info(name).dtype != DType::kBF16) return ScalarType::kF32;
  }
  return ScalarType::kBF16;
}

std::optional<ScalarType> required_weight_type(ScalarType activation_type) {
  if (activation_type == ScalarType::kBF16) return ScalarType::kBF16;
  return std::nullopt;
}

ModelWeights load_moe_layers(const ModelConfig& config, WeightSource& source, Backend& backend,
                             const LoadOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  const uint64_t bytes_before = source.bytes_read();
  const ExpertInventory inventory = inspect_experts(config, source, options.allow_missing_experts);
  ModelWeights weights;
  weights.weight_type = options.weight_type.value_or(stored_weight_type(config, source));
  LoadPlan plan(backend, weights.weight_type);
  weights.layers.resize(config.num_hidden_layers);
  for (const auto& [layer, experts] : inventory) {
    weights.layers[layer].is_moe = true;
    plan_moe_layer(config, layer, experts, options, backend, weights.weight_type, plan, weights.layers[layer].moe);
  }
  run_load(source, backend, plan, options);
  weights.bytes_read = source.bytes_read() - bytes_before;
  weights.resident_bytes = resident_bytes_of(weights);
  weights.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return weights;
}

ModelWeights load_model_weights(const ModelConfig& config, WeightSource& source, Backend& backend,
                                const LoadOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  const int64_t hidden = config.hidden_size, head_dim = config.head_dim;
  const int64_t q_dim = config.num_attention_heads * head_dim;
  const int64_t kv_dim = config.num_key_value_heads * head_dim;
  const uint64_t bytes_before = source.bytes_read();
  // Check experts first: a missing expert should fail before minutes of reading.
  const ExpertInventory inventory = inspect_experts(config, source, options.allow_missing_experts);

  ModelWeights weights;
  weights.weight_type = options.weight_type.value_or(stored_weight_type(config, source));
  LoadPlan plan(backend, weights.weight_type);
  weights.embed = plan.single(config.tensor_prefix + "embed_tokens.weight", {config.vocab_size, hidden});
  weights.final_norm = plan.single(config.tensor_prefix + "norm.weight", {hidden});
  if (!config.tie_word_embeddings) weights.lm_head = plan.single(config.lm_head_name, {config.vocab_size, hidden});

  weights.layers.resize(config.num_hidden_layers);
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    LayerWeights& w = weights.layers[layer];
    const std::string p = config.layer_prefix(layer);
    w.input_norm = plan.single(p + "input_layernorm.weight", {hidden});
    w.post_attention_norm = plan.single(p + "post_attention_layernorm.weight", {hidden});
    w.qkv_proj = plan.stacked({q_dim + 2 * kv_dim, hidden}, {{p + "self_attn.q_proj.weight", {q_dim, hidden}},
                                                             {p + "self_attn.k_proj.weight", {kv_dim, hidden}},
                                                             {p + "self_attn.v_proj.weight", {kv_dim, hidden}}});
    w.o_proj = plan.single(p + "self_attn.o_proj.weight", {hidden, q_dim});
    w.q_norm = plan.single(p + "self_attn.q_norm.weight", {head_dim});
    w.k_norm = plan.single(p + "self_attn.k_norm.weight", {head_dim});
    w.is_moe = config.is_moe_layer(layer);
    if (!w.is_moe) {
      const int64_t inter = config.intermediate_size;
      w.dense_gate_up = plan.stacked({2 * inter, hidden}, {{p + "mlp.gate_proj.weight", {inter, hidden}},
                                                           {p + "mlp.up_proj.weight", {inter, hidden}}});
      w.dense_down = plan.single(p + "mlp.down_proj.weight", {hidden, inter});
      continue;
    }
    plan_moe_layer(config, layer, inventory.at(layer), options, backend, weights.weight_type, plan, w.moe);
  }

  run_load(source, backend, plan, options);
  weights.bytes_read = source.bytes_read() - bytes_before;
  weights.resident_bytes = resident_bytes_of(weights);
  weights.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return weights;
}

}  // namespace epic
