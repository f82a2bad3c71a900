// Fuzzes SafetensorsFile::open (the 8-byte length, the JSON header, every offset and shape check)
// with whole files: an opened file must describe tensors that lie inside it and can be read.
#include <cstdint>

#include "tests/fuzz/fuzz_support.h"
#include "worker/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The parser takes a path only; the file lives in memory (see scratch_directory).
  const std::filesystem::path path =
      epic::fuzz::write_scratch_file("model.safetensors", epic::fuzz::as_text(data, size));
  epic::fuzz::expect_only_epic_errors([&] {
    const epic::SafetensorsFile file = epic::SafetensorsFile::open(path);
    for (const epic::TensorInfo& tensor : file.tensors()) {
      EPIC_FUZZ_REQUIRE(tensor.data_begin <= tensor.data_end && tensor.data_end <= size,
                        "an accepted tensor's bytes lie outside the file");
      EPIC_FUZZ_REQUIRE(file.find(tensor.name) == &tensor, "find() does not return the listed tensor");
      EPIC_FUZZ_REQUIRE(
          tensor.num_bytes() == static_cast<uint64_t>(tensor.num_elements()) * epic::dtype_size(tensor.dtype),
          "an accepted tensor's byte count is not elements x dtype size");
      // Reading is bounded by the input size (checked above), so every tensor is read.
      std::vector<uint8_t> bytes(tensor.num_bytes());
      file.read_raw(tensor, bytes.data());
      if (epic::dtype_is_float_storage(tensor.dtype)) {
        EPIC_FUZZ_REQUIRE(file.read_f32(tensor).size() == static_cast<size_t>(tensor.num_elements()),
                          "read_f32 returned a wrong element count");
      }
    }
  });
  return 0;
}
