// A completion's text as it streams (coordinator/completion_text.h): split characters held until whole, stop
// strings that straddle tokens caught and never shown, held-back tails released at the end; and, with the
// real Qwen3 tokenizer, token-by-token pushes of multilingual text give pieces that are each valid UTF-8 and
// join to Tokenizer::decode of the whole, cut at the first stop string when one is given (fresh seed per
// run).
#include "coordinator/completion_text.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "coordinator/tokenizer.h"
#include "coordinator/unicode_text.h"

namespace epic {
namespace {

TEST(CompletionText, HoldsASplitCharacterUntilItIsWhole) {
  CompletionText text;
  EXPECT_EQ(text.push("caf"), "caf");
  EXPECT_EQ(text.push("\xC3"), "");
  EXPECT_EQ(text.push("\xA9!"), "\xC3\xA9!");
  EXPECT_EQ(text.push("\xF0\x9F"), "");  // U+1F600 over three tokens
  EXPECT_EQ(text.push("\x98"), "");
  EXPECT_EQ(text.push("\x80"), "\xF0\x9F\x98\x80");
  EXPECT_EQ(text.finish(), "");
  EXPECT_EQ(text.sent(), "caf\xC3\xA9!\xF0\x9F\x98\x80");
  EXPECT_EQ(complete_utf8_prefix("ab\xE2\x82"), 2u);
  EXPECT_EQ(complete_utf8_prefix("ab\xE2\x82\xAC"), 5u);
  EXPECT_EQ(complete_utf8_prefix("\xFF"), 1u);  // invalid: whole (shown as U+FFFD)
}

TEST(CompletionText, AnUnfinishedCharacterAtTheEndShowsAsTheReplacementCharacter) {
  CompletionText text;
  EXPECT_EQ(text.push("a\xE2\x82"), "a");
  EXPECT_EQ(text.finish(), "\xEF\xBF\xBD");
}

TEST(CompletionText, StopStringsAcrossTokensAreNeverSent) {
  CompletionText text({"\n\n", "END"});
  EXPECT_EQ(text.push("abc\n"), "abc");  // "\n" may start "\n\n"
  EXPECT_EQ(text.push("x E"), "\nx ");   // "E" may start "END"
  EXPECT_EQ(text.push("N"), "");
  EXPECT_EQ(text.push("Dtail"), "");  // "END": stop; nothing of it or after it
  EXPECT_TRUE(text.stopped());
  EXPECT_EQ(text.push("more"), "");
  EXPECT_EQ(text.finish(), "");
  EXPECT_EQ(text.sent(), "abc\nx ");
}

TEST(CompletionText, AHeldTailThatNeverCompletesIsReleased) {
  CompletionText text({"END"});
  EXPECT_EQ(text.push("xEN"), "x");
  EXPECT_EQ(text.push("Nope"), "ENNope");
  EXPECT_EQ(text.push("E"), "");
  EXPECT_EQ(text.finish(), "E");
  EXPECT_FALSE(text.stopped());
  EXPECT_EQ(text.sent(), "xENNopeE");
}

bool valid_utf8(const std::string& text) { return unicode::utf8_lossy(text) == text; }

TEST(CompletionText, TokenByTokenWithTheQwen3TokenizerJoinsToTheWholeDecode) {
  const std::filesystem::path path = EPIC_QWEN3_TOKENIZER_JSON;
  if (!std::filesystem::exists(path))
    GTEST_SKIP() << "no Qwen3 tokenizer.json at " << path << " (run set-up)";
  const Tokenizer tokenizer = Tokenizer::load(path);
  const std::string source =
      "def f(x):\n    return x ** 2  # 平方 \xF0\x9F\x98\x80\n\n混合专家模型 (MoE) を使う。 e\xCC\x81 "
      "\xC3\xA9 END of "
      "text, 12345 \xF0\x9F\x8E\x89\xF0\x9F\x8E\x89";
  const std::vector<int32_t> ids = tokenizer.encode(source);
  const std::string whole = tokenizer.decode(ids);  // NFC-normalised by the tokenizer: e + U+0301 is é
  ASSERT_GT(whole.size(), 100u);
  std::random_device device;
  const uint64_t seed = (uint64_t{device()} << 32) ^ device();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 random(seed);
  for (int round = 0; round < 20; ++round) {
    // No stop, then a stop string cut from the text at random (ASCII or not).
    std::vector<std::string> stops;
    if (round > 0) {
      const size_t at = random() % whole.size(), length = 1 + random() % 6;
      stops.push_back(whole.substr(at, length));
    }
    CompletionText text(stops);
    std::string joined;
    for (int32_t id : ids) {
      const std::string piece = text.push(tokenizer.decode_bytes(std::vector<int32_t>{id}));
      EXPECT_TRUE(valid_utf8(piece)) << "a piece cuts a character";
      joined += piece;
    }
    joined += text.finish();
    EXPECT_EQ(joined, text.sent());
    const std::string expected =
        stops.empty() ? whole : unicode::utf8_lossy(whole.substr(0, whole.find(stops[0])));
    EXPECT_EQ(joined, expected) << "stop '" << (stops.empty() ? "" : stops[0]) << "'";
  }
}

}  // namespace
}  // namespace epic
