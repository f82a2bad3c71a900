// A Hugging Face model directory's weights: model.safetensors, or the shards that
// model.safetensors.index.json names. Every tensor is found through the index, never by guessing
// which shard holds it; shards are opened (header only) on first use; bytes read are counted.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "worker/safetensors.h"

namespace epic {

class Checkpoint {
 public:
  // Opens DIR/model.safetensors.index.json when present, else DIR/model.safetensors.
  // Throws Error(kInvalidCheckpoint) when neither exists, when the index is not valid JSON or
  // lacks a "weight_map" object of string values, names a tensor twice, or names a shard outside
  // DIR; Error(kInvalidArgument) when the index or model.safetensors is a directory, FIFO or
  // device (refused by type, never read).
  static Checkpoint open(const std::filesystem::path& model_dir);

  const std::filesystem::path& directory() const { return directory_; }
  // True when the index (or the single file) names this tensor.
  bool contains(const std::string& tensor_name) const;
  // The shard file the index points at for this tensor (relative name, e.g.
  // "model-00002-of-00003.safetensors"); nullopt when the index does not name it.
  std::optional<std::string> shard_of(const std::string& tensor_name) const;
  std::vector<std::string> tensor_names() const;  // sorted

  // The tensor's header entry, opening its shard. Throws Error(kInvalidCheckpoint) naming the
  // tensor and the shard when the index names a shard that lacks the tensor, the shard file is
  // missing or invalid, or the shard holds a tensor the index places in another shard.
  const TensorInfo& info(const std::string& tensor_name);

  // Reads a float tensor (F32/F16/BF16) as f32 after checking its shape equals expected_shape.
  // Wrong shape or a non-float dtype -> Error(kInvalidCheckpoint) naming file, tensor, the
  // shape/dtype found, what the config expects, and a hint to fix the config or checkpoint; so is
  // a NaN or Inf value unless non_finite is kAllow (see SafetensorsFile::read_f32).
  std::vector<float> read_f32(const std::string& tensor_name, const std::vector<int64_t>& expected_shape,
                              NonFiniteWeights non_finite = NonFiniteWeights::kReject);

  uint64_t bytes_read() const;  // tensor data bytes read, summed over every shard
  size_t num_shards() const;    // distinct shard files the index names

 private:
  SafetensorsFile& shard(const std::string& file_name);
  std::filesystem::path directory_;
  std::map<std::string, std::string> weight_map_;  // tensor name -> shard file name
  std::map<std::string, std::unique_ptr<SafetensorsFile>> open_shards_;
};

}  // namespace epic
