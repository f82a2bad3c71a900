// Fuzzes ModelConfig::from_json_text (config.json): an accepted config must print (to_json_text) as
// a config that reads back to the same one, and answer is_moe_layer for each of its layers.
#include <cstdint>

#include "tests/fuzz/fuzz_support.h"
#include "worker/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  epic::fuzz::expect_only_epic_errors([&] {
    const epic::ModelConfig config =
        epic::ModelConfig::from_json_text(epic::fuzz::as_text(data, size), "fuzz/config.json");
    const std::string printed = config.to_json_text();
    std::string reprinted;
    try {
      reprinted = epic::ModelConfig::from_json_text(printed, "fuzz/printed-config.json").to_json_text();
    } catch (const epic::Error& error) {
      std::fprintf(stderr, "the accepted config printed as\n%s\nwhich is refused: %s\n", printed.c_str(),
                   error.what());
      EPIC_FUZZ_REQUIRE(false, "to_json_text of an accepted config is refused by from_json_text");
    }
    EPIC_FUZZ_REQUIRE(printed == reprinted, "a config does not read back to itself");
    // Accepted layer counts are bounded (absurd sizes fail fast), so this loop is short.
    for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) (void)config.is_moe_layer(layer);
  });
  return 0;
}
