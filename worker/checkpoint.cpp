// Checkpoint: finds tensors through model.safetensors.index.json (or the one model.safetensors),
// opens shards lazily and checks shapes against what the config expects.
#include "worker/checkpoint.h"

#include <nlohmann/json.hpp>
#include <set>

#include "kernels/error.h"
#include "kernels/file_io.h"

namespace epic {

namespace {

using nlohmann::json;

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleFileName = "model.safetensors";
// The index of a trillion-parameter model is a few MB; a bigger one is not an index.
constexpr uint64_t kMaxIndexBytes = uint64_t{256} << 20;
// {"metadata": {...}, "weight_map": {name: shard}} nests 2 levels; deeper JSON is not an index, and
// the bound keeps the parser's stack small on hostile input.
constexpr int kMaxIndexDepth = 8;

[[noreturn]] void throw_bad_index(const std::filesystem::path& index_path, const std::string& what) {
  throw Error(ErrorCode::kInvalidCheckpoint, "invalid checkpoint index " + index_path.string() + ": " + what +
                                                 "; re-download the model directory or regenerate the index");
}

// A shard name must stay inside the model directory: one plain file name, no directories.
bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name.find('/') == std::string::npos && name.find('\\') == std::string::npos &&
         name.find("..") == std::string::npos && name.find('\0') == std::string::npos && name != ".";
}

// Parses the index, refusing what nlohmann would silently accept: a tensor named twice in
// "weight_map" (the last shard named would win) and absurd nesting.
json parse_index(const std::filesystem::path& index_path, const std::string& text) {
  std::string top_level_key, duplicate;
  std::set<std::string> mapped_tensors;
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) {
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
        depth >= kMaxIndexDepth) {
      throw_bad_index(index_path, "it nests deeper than " + std::to_string(kMaxIndexDepth) +
                                      " levels, which no index does");
    }
    if (event == json::parse_event_t::key && parsed.is_string()) {
      if (depth == 1) top_level_key = parsed.get<std::string>();
      if (depth == 2 && top_level_key == "weight_map" &&
          !mapped_tensors.insert(parsed.get<std::string>()).second && duplicate.empty()) {
        duplicate = parsed.get<std::string>();
      }
    }
    return true;
  };
  json index;
  try {
    index = json::parse(text, callback, /*allow_exceptions=*/true);
  } catch (const json::exception& parse_error) {
    throw_bad_index(index_path, std::string("it is not valid JSON (") + parse_error.what() + ")");
  }
  if (!duplicate.empty()) {
    throw_bad_index(index_path, "\"weight_map\" names tensor '" + duplicate +
                                    "' twice; a tensor must live in exactly one shard");
  }
  return index;
}

}  // namespace

Checkpoint Checkpoint::open(const std::filesystem::path& model_dir) {
  Checkpoint checkpoint;
  checkpoint.directory_ = model_dir;
  const std::filesystem::path index_path = model_dir / kIndexName;
  const std::filesystem::path single_path = model_dir / kSingleFileName;
  std::error_code error;

  // Present but not a regular file (a FIFO, a directory, a device): refused by type, never read.
  if (std::filesystem::exists(index_path, error)) {
    const json index =
        parse_index(index_path, files::read_file(index_path, "checkpoint index", kMaxIndexBytes));
    if (!index.is_object()) {
      throw_bad_index(index_path, std::string("it is JSON of type ") + index.type_name() +
                                      " but must be an object with a \"weight_map\"");
    }
    if (!index.contains("weight_map")) {
      throw_bad_index(index_path,
                      "it has no \"weight_map\" (the object mapping each tensor name to its shard file)");
    }
    const json& weight_map = index.at("weight_map");
    if (!weight_map.is_object()) {
      throw_bad_index(index_path, std::string("\"weight_map\" is JSON of type ") + weight_map.type_name() +
                                      " but must be an object mapping tensor names to shard file names");
    }
    if (weight_map.empty()) throw_bad_index(index_path, "\"weight_map\" is empty: it names no tensors");
    for (const auto& [tensor_name, shard_json] : weight_map.items()) {
      if (!shard_json.is_string()) {
        throw_bad_index(index_path, "\"weight_map\" maps tensor '" + tensor_name + "' to JSON of type " +
                                        shard_json.type_name() + " but shard file names must be strings");
      }
      const std::string shard_name = shard_json.get<std::string>();
      if (!is_plain_file_name(shard_name)) {
        throw_bad_index(index_path, "\"weight_map\" maps tensor '" + tensor_name + "' to shard file '" +
                                        shard_name + "', which is not a plain file name inside " +
                                        model_dir.string() + " (no path separators or \"..\" allowed)");
      }
      checkpoint.weight_map_[tensor_name] = shard_name;
    }
    return checkpoint;
  }

  if (std::filesystem::exists(single_path, error)) {
    auto file = std::make_unique<SafetensorsFile>(SafetensorsFile::open(single_path));
    for (const TensorInfo& tensor : file->tensors()) checkpoint.weight_map_[tensor.name] = kSingleFileName;
    checkpoint.open_shards_[kSingleFileName] = std::move(file);
    return checkpoint;
  }

  std::string found = "it contains neither file";
  if (!std::filesystem::exists(model_dir, error)) {
    found = "the directory does not exist";
  } else if (!std::filesystem::is_directory(model_dir, error)) {
    found = "it is not a directory";
  }
  throw Error(ErrorCode::kInvalidCheckpoint,
              "no checkpoint found in " + model_dir.string() + ": looked for " + index_path.string() +
                  " and " + single_path.string() + ", but " + found +
                  "; the model directory must be a Hugging Face model directory holding " + kIndexName +
                  " and its shards, or a single " + kSingleFileName);
}

bool Checkpoint::contains(const std::string& tensor_name) const { return weight_map_.count(tensor_name) > 0; }

std::optional<std::string> Checkpoint::shard_of(const std::string& tensor_name) const {
  auto it = weight_map_.find(tensor_name);
  if (it == weight_map_.end()) return std::nullopt;
  return it->second;
}

std::vector<std::string> Checkpoint::tensor_names() const {
  std::vector<std::string> names;
  names.reserve(weight_map_.size());
  for (const auto& [name, shard_name] : weight_map_) names.push_back(name);
  return names;
}

SafetensorsFile& Checkpoint::shard(const std::string& file_name) {
  auto it = open_shards_.find(file_name);
  if (it != open_shards_.end()) return *it->second;
  auto file = std::make_unique<SafetensorsFile>(SafetensorsFile::open(directory_ / file_name));
  // A tensor stored in two shards means shards of different exports were mixed: which copy is
  // right cannot be known, so neither is used. Checked from the header alone, for each shard opened.
  for (const TensorInfo& tensor : file->tensors()) {
    auto mapped = weight_map_.find(tensor.name);
    if (mapped != weight_map_.end() && mapped->second != file_name) {
      throw Error(ErrorCode::kInvalidCheckpoint,
                  "tensor '" + tensor.name + "' is stored in two shards of " + directory_.string() + ": in " +
                      file_name + " and in " + mapped->second + ", where " + kIndexName +
                      " places it; the shards come from different exports. Re-download the model directory "
                      "(every shard and the index from one export)");
    }
  }
  return *open_shards_.emplace(file_name, std::move(file)).first->second;
}

const TensorInfo& Checkpoint::info(const std::string& tensor_name) {
  auto it = weight_map_.find(tensor_name);
  if (it == weight_map_.end()) {
    throw Error(ErrorCode::kInvalidCheckpoint,
                "tensor '" + tensor_name + "' is not in the checkpoint in " + directory_.string() + " (its " +
                    std::to_string(weight_map_.size()) +
                    " tensors do not include it); check config.json against the checkpoint");
  }
  const std::string& shard_name = it->second;
  const std::filesystem::path shard_path = directory_ / shard_name;
  if (!open_shards_.count(shard_name)) {
    std::error_code error;
    if (!std::filesystem::exists(shard_path, error)) {
      throw Error(ErrorCode::kInvalidCheckpoint,
                  "shard " + shard_path.string() + " is missing: " + kIndexName + " names it for tensor '" +
                      tensor_name + "'; re-download the shard into " + directory_.string());
    }
  }
  SafetensorsFile* file = nullptr;
  try {
    file = &shard(shard_name);
  } catch (const Error& shard_error) {
    throw Error(shard_error.code(), std::string(shard_error.what()) + " (opening shard " + shard_name +
                                        " for tensor '" + tensor_name + "')");
  }
  const TensorInfo* tensor = file->find(tensor_name);
  if (!tensor) {
    throw Error(ErrorCode::kInvalidCheckpoint, "tensor '" + tensor_name + "' is named by " + kIndexName +
                                                   " in shard " + shard_name + " but " + shard_name +
                                                   " does not contain it (in " + directory_.string() +
                                                   "); re-download the shard or regenerate the index");
  }
  return *tensor;
}

std::vector<float> Checkpoint::read_f32(const std::string& tensor_name,
                                        const std::vector<int64_t>& expected_shape,
                                        NonFiniteWeights non_finite) {
  const TensorInfo& tensor = info(tensor_name);
  SafetensorsFile& file = shard(weight_map_.at(tensor_name));
  if (tensor.shape != expected_shape || !dtype_is_float_storage(tensor.dtype)) {
    throw Error(
        ErrorCode::kInvalidCheckpoint,
        "checkpoint file " + file.path().string() + ": tensor '" + tensor_name + "' has shape " +
            shape_to_string(tensor.shape) + " and dtype " + dtype_name(tensor.dtype) +
            ", but the model config expects shape " + shape_to_string(expected_shape) +
            " of F32, F16 or BF16; check config.json against the checkpoint (is it this model's config?)");
  }
  return file.read_f32(tensor, non_finite);
}

uint64_t Checkpoint::bytes_read() const {
  uint64_t total = 0;
  for (const auto& [name, file] : open_shards_) total += file->bytes_read();
  return total;
}

size_t Checkpoint::num_shards() const {
  std::set<std::string> shards;
  for (const auto& [name, shard_name] : weight_map_) shards.insert(shard_name);
  return shards.size();
}

}  // namespace epic
