// Random checkpoints in the published per-expert Hugging Face layout.
#include "worker/model_writer.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "kernels/file_io.h"
#include "worker/model_tensors.h"
#include "worker/random_values.h"

namespace epic {
namespace {

using nlohmann::json;

// The files make-model writes (and only these may be replaced by a later make-model), with the
// temporary files a killed make-model leaves beside them ("<name>.tmp.*", "<name>.epic-tmp.*").
bool written_by_make_model(const std::filesystem::path& file) {
  std::string name = file.filename().string();
  for (const char* temporary : {".tmp.", ".epic-tmp."})
    if (const size_t at = name.find(temporary); at != std::string::npos) name.resize(at);
  return name == "config.json" || name == "tokenizer.json" || name == "model.safetensors.index.json" ||
         name == "model.safetensors" || (name.rfind("model-", 0) == 0 && name.ends_with(".safetensors"));
}

// --out must be a new or empty folder, or one holding only an earlier make-model output: a
// finished one (with config.json) is replaced only with --force; an unfinished one (config.json is
// written last, so a killed or failed make-model leaves none) is no model and is replaced. It is
// removed first, so no stale shard of another shard count stays behind. Files make-model did not
// write are never touched, --force or not.
void prepare_output_folder(const std::filesystem::path& out_dir, bool force) {
  namespace fs = std::filesystem;
  const std::string type = files::describe_file_type(out_dir);
  if (type != "missing" && type != "a directory")
    throw Error(ErrorCode::kInvalidArgument,
                "--out " + out_dir.string() + " is " + type + ", not a folder; give a new or empty folder");
  std::error_code ec;
  if (type == "a directory") {
    std::vector<fs::path> earlier_output;
    for (const auto& entry : fs::directory_iterator(out_dir)) {
      if (!written_by_make_model(entry.path()) || !entry.is_regular_file())
        throw Error(ErrorCode::kInvalidArgument,
                    "--out " + out_dir.string() + " already holds " + entry.path().filename().string() +
                        ", which make-model did not write; choose an empty or new --out");
      earlier_output.push_back(entry.path());
    }
    if (fs::exists(out_dir / "config.json") && !force)
      throw Error(ErrorCode::kInvalidArgument,
                  "--out " + out_dir.string() + " is not empty: it holds an earlier make-model output (" +
                      std::to_string(earlier_output.size()) +
                      " files, config.json among them); pass --force to replace it, or choose a new --out");
    for (const fs::path& file : earlier_output) {
      fs::remove(file, ec);
      if (ec)
        throw Error(ErrorCode::kIo, file.string() + ": cannot remove the earlier output: " + ec.message());
    }
  }
  fs::create_directories(out_dir, ec);
  if (ec)
    throw Error(ErrorCode::kInvalidArgument,
                "--out " + out_dir.string() + ": cannot create the folder (" + ec.message() + ")");
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
  // A path to a preset file (which must be a regular file: a FIFO is refused, never read), or a
  // name in presets_dir.
  std::filesystem::path path = name_or_path;
  const std::string type = files::describe_file_type(path);
  if (type == "missing" || type == "a directory") path = presets_dir / (name_or_path + ".json");
  if (files::describe_file_type(path) == "missing") {
    std::string known;
    if (std::filesystem::is_directory(presets_dir))
      for (const auto& entry : std::filesystem::directory_iterator(presets_dir))
        if (entry.path().extension() == ".json") known += " " + entry.path().stem().string();
    throw Error(ErrorCode::kInvalidArgument, "unknown preset \"" + name_or_path + "\"; presets in " +
                                                 presets_dir.string() + ":" +
                                                 (known.empty() ? " (none)" : known));
  }
  const std::string text = files::read_file(path, "preset", uint64_t{1} << 24);
  json root;
  try {
    root = json::parse(text);
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
  prepare_output_folder(out_dir, options.force);

  const ModelConfig& config = preset.config;
  const std::vector<ModelTensorSpec> plan = model_tensor_specs(config);
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
    // SafetensorsWriter writes beside the target and renames; the target was checked to be absent
    // or a regular file (never a device, FIFO or folder) just before.
    files::check_output_path(out_dir / name_buffer, "make-model shard");
    writer.write(out_dir / name_buffer);
    if (options.progress)
      options.progress(static_cast<int64_t>(s + 1), result.num_shards, written, total_bytes);
  }
  json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
  // config.json last: a folder cut short by a crash or a full disk has none, so no loader takes
  // it for a model.
  files::write_file_atomically(out_dir / "model.safetensors.index.json", index.dump(2) + "\n",
                               "make-model index");
  files::write_file_atomically(out_dir / "config.json", config.to_json_text(), "make-model config.json");

  if (options.tokenizer_json && files::describe_file_type(*options.tokenizer_json) != "missing") {
    // The tokenizer fits when its largest id is inside the model's vocabulary.
    const std::string tokenizer_text =
        files::read_file(*options.tokenizer_json, "--tokenizer", uint64_t{1} << 30);
    json tokenizer = json::parse(tokenizer_text, nullptr, false);
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
      files::write_file_atomically(out_dir / "tokenizer.json", tokenizer_text, "make-model tokenizer.json");
      result.wrote_tokenizer = true;
    }
  } else {
    result.tokenizer_note = "no tokenizer.json available (run launch/setup_debian.sh or pass --tokenizer)";
  }
  return result;
}

}  // namespace epic
