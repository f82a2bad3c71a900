// Fuzzes LoadProfile::from_json_text (`epic plan --load-profile`): an accepted profile has one entry
// per layer key of the file, and prints (to_json_text) as a profile that reads back to itself.
#include <cstdint>
#include <nlohmann/json.hpp>

#include "coordinator/placement.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = epic::fuzz::as_text(data, size);
  epic::fuzz::expect_only_epic_errors([&] {
    const epic::LoadProfile profile = epic::LoadProfile::from_json_text(text, "fuzz/profile.json");
    // Two spellings of one layer ("1", "01") must not merge into one entry.
    EPIC_FUZZ_REQUIRE(nlohmann::json::parse(text).at("layers").size() == profile.load.size(),
                      "the profile's layer count differs from the file's layer keys");
    const std::string printed = profile.to_json_text();
    epic::LoadProfile reread;
    try {
      reread = epic::LoadProfile::from_json_text(printed, "fuzz/printed-profile.json");
    } catch (const epic::Error& error) {
      std::fprintf(stderr, "the accepted profile printed as\n%s\nwhich is refused: %s\n", printed.c_str(),
                   error.what());
      EPIC_FUZZ_REQUIRE(false, "to_json_text of an accepted profile is refused by from_json_text");
    }
    EPIC_FUZZ_REQUIRE(reread.load == profile.load, "a profile does not read back to itself");
  });
  return 0;
}
