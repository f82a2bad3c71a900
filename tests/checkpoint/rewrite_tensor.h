// For tests that need a checkpoint with one tensor changed (NaN or huge weights): copies a model
// directory and rewrites the shard holding the tensor, every other tensor byte for byte.
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "worker/checkpoint.h"
#include "worker/safetensors.h"

namespace epic::testing {

// Copies model_dir to out_dir, then replaces tensor_name's values by edit(values) in its shard
// (same name, dtype and shape; values are converted back to the stored dtype).
inline void copy_with_edited_tensor(const std::filesystem::path& model_dir,
                                    const std::filesystem::path& out_dir, const std::string& tensor_name,
                                    const std::function<void(std::vector<float>&)>& edit) {
  std::filesystem::copy(
      model_dir, out_dir,
      std::filesystem::copy_options::recursive | std::filesystem::copy_options::overwrite_existing);
  Checkpoint checkpoint = Checkpoint::open(out_dir);
  const std::filesystem::path shard_path = out_dir / checkpoint.shard_of(tensor_name).value();
  const SafetensorsFile shard = SafetensorsFile::open(shard_path);
  SafetensorsWriter writer;
  for (const TensorInfo& tensor : shard.tensors()) {
    if (tensor.name == tensor_name) {
      std::vector<float> values = shard.read_f32(tensor, NonFiniteWeights::kAllow);
      edit(values);
      writer.add_f32(tensor.name, tensor.dtype, tensor.shape, values);
    } else {
      std::vector<uint8_t> bytes(tensor.num_bytes());
      shard.read_raw(tensor, bytes.data());
      writer.add(tensor.name, tensor.dtype, tensor.shape, std::move(bytes));
    }
  }
  for (const auto& [key, value] : shard.metadata()) writer.set_metadata(key, value);
  writer.write(shard_path);
}

}  // namespace epic::testing
