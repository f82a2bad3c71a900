// Random checkpoints in the published per-expert Hugging Face layout.
#include "worker/model_writer.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kernels/error.h"
#include "worker/random_values.h"

namespace epic {
namespace {

using nlohmann::json;

struct TensorPlan {
  std::string name;
  std::vector<int64_t> shape;
  RandomInit init;
};

std::vector<TensorPlan> plan_tensors(const ModelConfig& c) {
  using Init = RandomInit;
  const int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim,
                kv = c.num_key_value_heads * c.head_dim;
  std::vector<TensorPlan> plan;
  plan.push_back({c.tensor_prefix + "embed_tokens.weight", {c.vocab_size, h}, Init::kEmbedding});
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    const std::string p = c.layer_prefix(layer);
    plan.push_back({p + "input_layernorm.weight", {h}, Init::kNorm});
    plan.push_back({p + "self_attn.q_proj.weight", {q, h}, Init::kLinear});
    plan.push_back({p + "self_attn.k_proj.weight", {kv, h}, Init::kLinear});
    plan.push_back({p + "self_attn.v_proj.weight", {kv, h}, Init::kLinear});
    plan.push_back({p + "self_attn.o_proj.weight", {h, q}, Init::kLinear});
    plan.push_back({p + "self_attn.q_norm.weight", {c.head_dim}, Init::kNorm});
    plan.push_back({p + "self_attn.k_norm.weight", {c.head_dim}, Init::kNorm});
    plan.push_back({p + "post_attention_layernorm.weight", {h}, Init::kNorm});
    if (c.is_moe_layer(layer)) {
      const int64_t i = c.moe_intermediate_size;
      plan.push_back({p + "mlp.gate.weight", {c.num_experts, h}, Init::kLinear});
      for (int64_t e = 0; e < c.num_experts; ++e) {
        const std::string ep = p + "mlp.experts." + std::to_string(e) + ".";
        plan.push_back({ep + "gate_proj.weight", {i, h}, Init::kLinear});
        plan.push_back({ep + "up_proj.weight", {i, h}, Init::kLinear});
        plan.push_back({ep + "down_proj.weight", {h, i}, Init::kLinear});
      }
    } else {
      const int64_t i = c.intermediate_size;
      plan.push_back({p + "mlp.gate_proj.weight", {i, h}, Init::kLinear});
      plan.push_back({p + "mlp.up_proj.weight", {i, h}, Init::kLinear});
      plan.push_back({p + "mlp.down_proj.weight", {h, i}, Init::kLinear});
    }
  }
  plan.push_back({c.tensor_prefix + "norm.weight", {h}, Init::kNorm});
  if (!c.tie_word_embeddings) plan.push_back({c.lm_head_name, {c.vocab_size, h}, Init::kLinear});
  return plan;
}

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file << text;
  if (!file) throw Error(ErrorCode::kIo, path.string() + ": write failed");
}

DType parse_storage(const std::string& text, const std::string& source) {
  if (text == "bf16" || text == "bfloat16") return DType::kBF16;
  if (text == "f16" || text == "float16") return DType::kF16;
  if (text == "f32" || text == "float32") return DType::kF32;
  throw Error(ErrorCode::kInvalidConfig,
              source + ": storage_dtype \"" + text + "\" is not one of bf16, f16, f32");
}

}  // namespace

ModelPreset load_preset(const std::string& name_or_path, const std::filesystem::path& presets_dir) {
  std::filesystem::path path = name_or_path;
  if (!std::filesystem::exists(path) || std::filesystem::is_directory(path))
    path = presets_dir / (name_or_path + ".json");
  if (!std::filesystem::is_regular_file(path)) {
    std::string known;
    if (std::filesystem::is_directory(presets_dir))
      for (const auto& entry : std::filesystem::directory_iterator(presets_dir))
        if (entry.path().extension() == ".json") known += " " + entry.path().stem().string();
    throw Error(ErrorCode::kInvalidArgument, "unknown preset \"" + name_or_path + "\"; presets in " +
                                                 presets_dir.string() + ":" +
                                                 (known.empty() ? " (none)" : known));
  }
  std::ifstream file(path);
  std::stringstream buffer;
  buffer << file.rdbuf();
  json root;
  try {
    root = json::parse(buffer.str());
  } catch (const json::parse_error& e) {
    throw Error(ErrorCode::kInvalidConfig, path.string() + ": not valid JSON (" + e.what() + ")");
  }
  if (!root.is_object() || !root.contains("config") || !root["config"].is_object())
    throw Error(ErrorCode::kInvalidConfig,
                path.string() + ": a preset needs a \"config\" object (a config.json)");
  ModelPreset preset;
  preset.name = path.stem().string();
  preset.description = root.value("description", "");
  preset.config = ModelConfig::from_json_text(root["config"].dump(), path.string() + " (config)");
  preset.storage = parse_storage(root.value("storage_dtype", "bf16"), path.string());
  if (root.contains("shard_bytes")) {
    if (!root["shard_bytes"].is_number_unsigned() || root["shard_bytes"].get<uint64_t>() == 0)
      throw Error(ErrorCode::kInvalidConfig, path.string() + ": shard_bytes must be a positive integer");
    preset.shard_bytes = root["shard_bytes"].get<uint64_t>();
  }
  return preset;
}

MakeModelResult make_model(const ModelPreset& preset, const std::filesystem::path& out_dir,
                           const MakeModelOptions& options) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(out_dir)) {
    if (!fs::is_directory(out_dir))
      throw Error(ErrorCode::kInvalidArgument,
                  out_dir.string() + " exists and is not a directory; choose another --out");
    for (const auto& entry : fs::directory_iterator(out_dir)) {
      const std::string file = entry.path().filename().string();
      const bool ours = file == "config.json" || file == "tokenizer.json" ||
                        file == "model.safetensors.index.json" || file == "model.safetensors" ||
                        (file.rfind("model-", 0) == 0 && entry.path().extension() == ".safetensors");
      if (!ours)
        throw Error(ErrorCode::kInvalidArgument,
                    out_dir.string() + " already holds " + file +
                        ", which make-model did not write; choose an empty or new --out");
    }
    for (const auto& entry : fs::directory_iterator(out_dir)) fs::remove(entry.path(), ec);
  }
  fs::create_directories(out_dir, ec);
  if (ec) throw Error(ErrorCode::kIo, out_dir.string() + ": cannot create the directory: " + ec.message());

  const ModelConfig& config = preset.config;
  const std::vector<TensorPlan> plan = plan_tensors(config);
  const size_t element_size = dtype_size(preset.storage);

  // Assign tensors to shards by byte budget first, so file names can carry the shard count.
  std::vector<std::vector<size_t>> shards(1);
  uint64_t shard_size = 0, total_bytes = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    uint64_t bytes = element_size;
    for (int64_t d : plan[i].shape) bytes *= d;
    if (!shards.back().empty() && shard_size + bytes > preset.shard_bytes) {
      shards.emplace_back();
      shard_size = 0;
    }
    shards.back().push_back(i);
    shard_size += bytes;
    total_bytes += bytes;
  }

  MakeModelResult result;
  result.num_tensors = static_cast<int64_t>(plan.size());
  result.num_shards = static_cast<int64_t>(shards.size());
  result.total_bytes = total_bytes;
  json weight_map = json::object();
  uint64_t written = 0;
  char name_buffer[64];
  for (size_t s = 0; s < shards.size(); ++s) {
    std::snprintf(name_buffer, sizeof(name_buffer), "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    SafetensorsWriter writer;
    writer.set_metadata("format", "pt");
    for (size_t index : shards[s]) {
      writer.add_f32(
          plan[index].name, preset.storage, plan[index].shape,
          random_tensor_values(plan[index].name, plan[index].shape, plan[index].init, options.seed));
      weight_map[plan[index].name] = name_buffer;
      if (options.progress)
        options.progress(static_cast<int64_t>(s), result.num_shards, written + writer.data_bytes(),
                         total_bytes);
    }
    written += writer.data_bytes();
    writer.write(out_dir / name_buffer);
    if (options.progress)
      options.progress(static_cast<int64_t>(s + 1), result.num_shards, written, total_bytes);
  }
  json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
  write_text(out_dir / "model.safetensors.index.json", index.dump(2) + "\n");
  write_text(out_dir / "config.json", config.to_json_text());

  if (options.tokenizer_json && fs::is_regular_file(*options.tokenizer_json)) {
    // The tokenizer fits when its largest id is inside the model's vocabulary.
    std::ifstream file(*options.tokenizer_json);
    json tokenizer = json::parse(file, nullptr, false);
    int64_t max_id = -1;
    if (!tokenizer.is_discarded() && tokenizer.contains("model") && tokenizer["model"].contains("vocab")) {
      for (const auto& [token, id] : tokenizer["model"]["vocab"].items())
        max_id = std::max<int64_t>(max_id, id.get<int64_t>());
      if (tokenizer.contains("added_tokens"))
        for (const json& added : tokenizer["added_tokens"])
          max_id = std::max<int64_t>(max_id, added.value("id", 0));
    }
    if (max_id < 0) {
      result.tokenizer_note = options.tokenizer_json->string() + " is not a BPE tokenizer.json; none written";
    } else if (max_id >= config.vocab_size) {
      result.tokenizer_note = "the tokenizer's ids reach " + std::to_string(max_id) + " but vocab_size is " +
                              std::to_string(config.vocab_size) + "; no tokenizer written (use --prompt-ids)";
    } else {
      fs::copy_file(*options.tokenizer_json, out_dir / "tokenizer.json",
                    fs::copy_options::overwrite_existing);
      result.wrote_tokenizer = true;
    }
  } else {
    result.tokenizer_note = "no tokenizer.json available (run launch/setup_debian.sh or pass --tokenizer)";
  }
  return result;
}

}  // namespace epic
