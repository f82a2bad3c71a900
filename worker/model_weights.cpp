// Loading ModelWeights through the checkpoint index, with the missing-expert policy.
#include "worker/model_weights.h"

#include <sstream>

#include "kernels/error.h"

namespace epic {
namespace {

struct MissingExpert {
  int64_t layer;
  int64_t expert_id;
  std::string where;  // the shard the index points at, or where the layer lives
};

uint64_t vector_bytes(const std::vector<float>& values) { return values.size() * sizeof(float); }

std::string missing_report(const std::vector<MissingExpert>& missing) {
  std::ostringstream out;
  out << missing.size() << " expert(s) that the router has are missing from the checkpoint:";
  for (const MissingExpert& m : missing)
    out << "\n  layer " << m.layer << " expert " << m.expert_id << ": " << m.where;
  out << "\nRe-download the shard(s) named above, or pass --allow-missing-experts to mask these experts "
         "out of routing (top-k is then chosen among the present experts).";
  return out.str();
}

}  // namespace

int64_t LayerExpertInventory::num_present() const {
  int64_t count = 0;
  for (uint8_t p : present) count += p;
  return count;
}

uint64_t ModelWeights::resident_bytes() const {
  uint64_t total = vector_bytes(embed) + vector_bytes(final_norm) + vector_bytes(lm_head);
  for (const LayerWeights& layer : layers) {
    for (const auto* v : {&layer.input_norm, &layer.post_attention_norm, &layer.q_proj, &layer.k_proj,
                          &layer.v_proj, &layer.o_proj, &layer.q_norm, &layer.k_norm, &layer.moe.router,
                          &layer.dense.gate, &layer.dense.up, &layer.dense.down})
      total += vector_bytes(*v);
    for (const auto& [id, expert] : layer.moe.experts)
      total += vector_bytes(expert.gate) + vector_bytes(expert.up) + vector_bytes(expert.down);
  }
  return total;
}

std::vector<std::string> expert_tensor_names(const ModelConfig& config, int64_t layer, int64_t expert_id) {
  const std::string base = config.layer_prefix(layer) + "mlp.experts." + std::to_string(expert_id) + ".";
  return {base + "gate_proj.weight", base + "up_proj.weight", base + "down_proj.weight"};
}

ExpertInventory inspect_experts(const ModelConfig& config, Checkpoint& checkpoint,
                                bool allow_missing_experts) {
  const int64_t hidden = config.hidden_size;
  // Without an expert count every layer reads as dense, and the run would fail later on a missing
  // dense MLP tensor, or worse, silently skip the routers; name the real cause instead.
  if (config.num_experts == 0) {
    for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
      const std::string router_name = config.layer_prefix(layer) + "mlp.gate.weight";
      if (!checkpoint.contains(router_name)) continue;
      throw Error(
          ErrorCode::kInvalidConfig,
          checkpoint.directory().string() +
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
    const TensorInfo& router = checkpoint.info(router_name);
    if (router.shape.size() != 2 || router.shape[1] != hidden || router.shape[0] <= 0 ||
        router.shape[0] > config.num_experts) {
      throw Error(ErrorCode::kInvalidCheckpoint,
                  checkpoint.directory().string() + "/" + checkpoint.shard_of(router_name).value_or("?") +
                      ": router " + router_name + " has shape " + shape_to_string(router.shape) +
                      "; expected [E, " + std::to_string(hidden) + "] with 1 <= E <= num_experts (" +
                      std::to_string(config.num_experts) + "). Check config.json against the checkpoint.");
    }
    LayerExpertInventory& experts = inventory[layer];
    experts.num_experts = router.shape[0];
    experts.present.assign(experts.num_experts, 1);
    for (int64_t expert = 0; expert < router.shape[0]; ++expert) {
      std::string where;
      for (const std::string& name : expert_tensor_names(config, layer, expert)) {
        if (checkpoint.contains(name)) continue;
        // Name the shard the index points at: where this expert's other tensors are, else where the
        // layer's router is (the shard a complete checkpoint would most likely hold it in).
        std::string sibling_shard;
        for (const std::string& sibling : expert_tensor_names(config, layer, expert))
          if (auto shard = checkpoint.shard_of(sibling)) sibling_shard = *shard;
        where = name + " is not in the checkpoint; " +
                (sibling_shard.empty() ? "the index puts layer " + std::to_string(layer) + "'s router in " +
                                             checkpoint.shard_of(router_name).value_or("?")
                                       : "the index puts this expert's other tensors in " + sibling_shard);
        break;
      }
      if (!where.empty()) {
        missing.push_back({layer, expert, where});
        experts.present[expert] = 0;
      }
    }
  }
  if (!missing.empty() && !allow_missing_experts)
    throw Error(ErrorCode::kMissingExperts, checkpoint.directory().string() + ": " + missing_report(missing));
  for (const auto& [layer, experts] : inventory) {
    const int64_t num_present = experts.num_present();
    if (num_present < config.num_experts_per_tok)
      throw Error(ErrorCode::kMissingExperts,
                  checkpoint.directory().string() + ": layer " + std::to_string(layer) + " has " +
                      std::to_string(num_present) + " present experts but num_experts_per_tok is " +
                      std::to_string(config.num_experts_per_tok) +
                      "; top-k needs at least that many experts");
  }
  return inventory;
}

ModelWeights load_model_weights(const ModelConfig& config, Checkpoint& checkpoint,
                                const LoadOptions& options) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_dim = config.num_attention_heads * config.head_dim;
  const int64_t kv_dim = config.num_key_value_heads * config.head_dim;
  const uint64_t bytes_before = checkpoint.bytes_read();
  const NonFiniteWeights non_finite =
      options.allow_nonfinite_weights ? NonFiniteWeights::kAllow : NonFiniteWeights::kReject;
  // Every tensor goes through this, so none can skip the NaN/Inf check.
  auto read = [&](const std::string& name, const std::vector<int64_t>& shape) {
    return checkpoint.read_f32(name, shape, non_finite);
  };
  ModelWeights weights;
  // Check experts first: a missing expert should fail before minutes of reading.
  const ExpertInventory inventory = inspect_experts(config, checkpoint, options.allow_missing_experts);

  weights.embed = read(config.tensor_prefix + "embed_tokens.weight", {config.vocab_size, hidden});
  weights.final_norm = read(config.tensor_prefix + "norm.weight", {hidden});
  if (!config.tie_word_embeddings) weights.lm_head = read(config.lm_head_name, {config.vocab_size, hidden});

  weights.layers.resize(config.num_hidden_layers);
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    LayerWeights& w = weights.layers[layer];
    const std::string p = config.layer_prefix(layer);
    w.input_norm = read(p + "input_layernorm.weight", {hidden});
    w.post_attention_norm = read(p + "post_attention_layernorm.weight", {hidden});
    w.q_proj = read(p + "self_attn.q_proj.weight", {q_dim, hidden});
    w.k_proj = read(p + "self_attn.k_proj.weight", {kv_dim, hidden});
    w.v_proj = read(p + "self_attn.v_proj.weight", {kv_dim, hidden});
    w.o_proj = read(p + "self_attn.o_proj.weight", {hidden, q_dim});
    w.q_norm = read(p + "self_attn.q_norm.weight", {config.head_dim});
    w.k_norm = read(p + "self_attn.k_norm.weight", {config.head_dim});
    w.is_moe = config.is_moe_layer(layer);
    if (!w.is_moe) {
      const int64_t inter = config.intermediate_size;
      w.dense.gate = read(p + "mlp.gate_proj.weight", {inter, hidden});
      w.dense.up = read(p + "mlp.up_proj.weight", {inter, hidden});
      w.dense.down = read(p + "mlp.down_proj.weight", {hidden, inter});
      continue;
    }
    MoeLayerWeights& moe = w.moe;
    moe.num_experts = inventory.at(layer).num_experts;
    moe.present = inventory.at(layer).present;
    moe.router = read(p + "mlp.gate.weight", {moe.num_experts, hidden});
    const int64_t inter = config.moe_intermediate_size;
    for (int64_t expert = 0; expert < moe.num_experts; ++expert) {
      if (!moe.present[expert]) continue;
      if (options.hosts_expert && !options.hosts_expert(layer, expert)) continue;
      const std::vector<std::string> names = expert_tensor_names(config, layer, expert);
      ExpertWeights& e = moe.experts[expert];
      e.gate = read(names[0], {inter, hidden});
      e.up = read(names[1], {inter, hidden});
      e.down = read(names[2], {hidden, inter});
    }
  }
  weights.bytes_read = checkpoint.bytes_read() - bytes_before;
  return weights;
}

}  // namespace epic
