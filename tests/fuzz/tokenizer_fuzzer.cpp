// Fuzzes the Qwen3 tokenizer (the real tokenizer.json, loaded once). The first input byte picks:
// even -> encode the rest as text: ids must be in the vocabulary, decode to valid UTF-8, and that
//         text must encode to the same ids (NFC and byte-level BPE are idempotent);
// odd  -> decode the rest as little-endian int32 ids: valid UTF-8 out, or an epic::Error.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "coordinator/tokenizer.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

const epic::Tokenizer& qwen3_tokenizer() {
  static const std::unique_ptr<epic::Tokenizer> tokenizer = [] {
    const char* override_path = std::getenv("EPIC_FUZZ_TOKENIZER_JSON");
    const std::filesystem::path path = override_path != nullptr ? override_path : EPIC_QWEN3_TOKENIZER_JSON;
    if (!std::filesystem::is_regular_file(path)) {
      // 77: the replay test's "skipped"; tests/fuzz/run_fuzzers.sh checks the file before fuzzing.
      std::fprintf(stderr, "SKIPPED: no Qwen3 tokenizer.json at %s (launch/setup_debian.sh installs it)\n",
                   path.c_str());
      std::exit(77);
    }
    return std::make_unique<epic::Tokenizer>(epic::Tokenizer::load(path));
  }();
  return *tokenizer;
}

// Independent of coordinator/unicode_text: shortest forms only, no surrogates, at most U+10FFFF.
bool is_valid_utf8(const std::string& text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto byte = static_cast<unsigned char>(text[i]);
    size_t length = 0;
    uint32_t code_point = 0;
    if (byte < 0x80) {
      length = 1, code_point = byte;
    } else if ((byte & 0xE0) == 0xC0) {
      length = 2, code_point = byte & 0x1F;
    } else if ((byte & 0xF0) == 0xE0) {
      length = 3, code_point = byte & 0x0F;
    } else if ((byte & 0xF8) == 0xF0) {
      length = 4, code_point = byte & 0x07;
    } else {
      return false;
    }
    if (i + length > text.size()) return false;
    for (size_t k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next & 0xC0) != 0x80) return false;
      code_point = (code_point << 6) | (next & 0x3F);
    }
    static constexpr uint32_t kSmallest[] = {0, 0, 0x80, 0x800, 0x10000};
    if (code_point < kSmallest[length] || code_point > 0x10FFFF ||
        (code_point >= 0xD800 && code_point <= 0xDFFF))
      return false;
    i += length;
  }
  return true;
}

void check_encode(const epic::Tokenizer& tokenizer, const std::string& text) {
  const std::vector<int32_t> ids = tokenizer.encode(text);  // invalid UTF-8 -> epic::Error
  for (int32_t id : ids)
    EPIC_FUZZ_REQUIRE(id >= 0 && id < tokenizer.vocab_size(), "encode produced an id outside the vocabulary");
  std::string decoded;
  try {
    decoded = tokenizer.decode(ids);
  } catch (const epic::Error& error) {
    std::fprintf(stderr, "decode of encode's own ids failed: %s\n", error.what());
    EPIC_FUZZ_REQUIRE(false, "decode refuses ids that encode produced");
  }
  EPIC_FUZZ_REQUIRE(is_valid_utf8(decoded), "decode produced invalid UTF-8");
  EPIC_FUZZ_REQUIRE(tokenizer.encode(decoded) == ids, "encode(decode(encode(text))) != encode(text)");
}

void check_decode(const epic::Tokenizer& tokenizer, const uint8_t* data, size_t size) {
  std::vector<int32_t> ids(size / sizeof(int32_t));
  if (!ids.empty()) std::memcpy(ids.data(), data, ids.size() * sizeof(int32_t));
  // Mostly in-range ids, so decoding gets past the range check: fold large values into the vocabulary
  // unless the sign bit asks for the raw value.
  for (int32_t& id : ids) {
    if (id >= 0) id = static_cast<int32_t>(id % (tokenizer.vocab_size() + 2));
  }
  const std::string text = tokenizer.decode(ids);
  EPIC_FUZZ_REQUIRE(is_valid_utf8(text), "decode produced invalid UTF-8");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const epic::Tokenizer& tokenizer = qwen3_tokenizer();
  if (size == 0) return 0;
  const bool decode_mode = (data[0] & 1) != 0;
  epic::fuzz::expect_only_epic_errors([&] {
    if (decode_mode) {
      check_decode(tokenizer, data + 1, size - 1);
    } else {
      check_encode(tokenizer, epic::fuzz::as_text(data + 1, size - 1));
    }
  });
  return 0;
}
