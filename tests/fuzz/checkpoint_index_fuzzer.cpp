// Fuzzes Checkpoint::open of a model.safetensors.index.json: an accepted index names each tensor's
// shard as a plain file name, and asking for a tensor whose shard is absent is an epic::Error.
#include <cstdint>

#include "tests/fuzz/fuzz_support.h"
#include "worker/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Checkpoint::open takes a directory only; the index is the one file in the scratch folder.
  epic::fuzz::write_scratch_file("model.safetensors.index.json", epic::fuzz::as_text(data, size));
  epic::fuzz::expect_only_epic_errors([&] {
    epic::Checkpoint checkpoint = epic::Checkpoint::open(epic::fuzz::scratch_directory());
    const std::vector<std::string> names = checkpoint.tensor_names();
    EPIC_FUZZ_REQUIRE(!names.empty(), "an index with no tensors was accepted");
    EPIC_FUZZ_REQUIRE(checkpoint.num_shards() >= 1 && checkpoint.num_shards() <= names.size(),
                      "num_shards() is not between 1 and the tensor count");
    for (const std::string& name : names) {
      EPIC_FUZZ_REQUIRE(checkpoint.contains(name), "a listed tensor is not contained");
      const std::optional<std::string> shard = checkpoint.shard_of(name);
      EPIC_FUZZ_REQUIRE(shard.has_value(), "a listed tensor has no shard");
      const std::filesystem::path shard_path(*shard);
      EPIC_FUZZ_REQUIRE(
          !shard->empty() && shard_path.filename() == shard_path && *shard != "." && *shard != "..",
          "a shard name is not a plain file name inside the model directory");
    }
    (void)checkpoint.info(names.front());  // its shard is missing: must be an epic::Error
    EPIC_FUZZ_REQUIRE(false, "info() of a tensor whose shard does not exist returned");
  });
  return 0;
}
