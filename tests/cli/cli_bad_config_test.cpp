// `epic run` on a model directory whose config.json is bad, hostile or written by another tool:
// each bad one ends with exit code 2 and a message naming the problem; each good spelling runs.
#include <sys/stat.h>

#include <functional>
#include <nlohmann/json.hpp>

#include "cli_support.h"

namespace epic {
namespace {

using nlohmann::json;

// A copy of the suite's tiny model with `edit` applied to its config.json. The weights are
// linked, not copied: only config.json differs.
fs::path tiny_with_config(const std::string& name, const std::function<void(json&)>& edit,
                          const fs::path& tiny, const fs::path& scratch) {
  const fs::path dir = scratch / name;
  fs::create_directories(dir);
  for (const auto& entry : fs::directory_iterator(tiny))
    if (entry.path().filename() != "config.json" && !fs::exists(dir / entry.path().filename()))
      fs::create_symlink(entry.path(), dir / entry.path().filename());
  std::ifstream in(tiny / "config.json");
  json config = json::parse(in);
  edit(config);
  std::ofstream(dir / "config.json") << config.dump(2);
  return dir;
}

// The same with config.json's text edited (for text that is not what nlohmann would write).
fs::path tiny_with_config_text(const std::string& name, const std::function<void(std::string&)>& edit,
                               const fs::path& tiny, const fs::path& scratch) {
  const fs::path dir = tiny_with_config(
      name, [](json&) {}, tiny, scratch);
  std::ifstream in(dir / "config.json");
  std::string text((std::istreambuf_iterator<char>(in)), {});
  edit(text);
  std::ofstream(dir / "config.json", std::ios::trunc) << text;
  return dir;
}

std::string run_args(const fs::path& model) {
  return "run --model " + model.string() + " --prompt-ids 1,2 --max-new-tokens 2";
}

void expect_bad_config(const Outcome& outcome, const std::vector<std::string>& words) {
  EXPECT_EQ(outcome.exit_code, 2) << outcome.err;
  for (const std::string& word : words) EXPECT_NE(outcome.err.find(word), std::string::npos) << outcome.err;
}

TEST_F(Cli, Transformers5SpellingsRunLikeTransformers4) {
  // transformers 5's save_pretrained writes num_local_experts and rope_parameters; read as an
  // all-dense model before, the run failed on a missing dense MLP tensor.
  const fs::path model = tiny_with_config(
      "tf5_spelling",
      [](json& c) {
        c["num_local_experts"] = c["num_experts"];
        c.erase("num_experts");
        c["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", c["rope_theta"]}};
        c.erase("rope_theta");
      },
      tiny(), scratch());
  const Outcome original = run_epic(run_args(tiny()), scratch());
  const Outcome spelled = run_epic(run_args(model), scratch());
  ASSERT_EQ(original.exit_code, 0) << original.err;
  EXPECT_EQ(spelled.exit_code, 0) << spelled.err;
  EXPECT_EQ(spelled.out, original.out);
}

TEST_F(Cli, ContradictingExpertCountsAreRefused) {
  const fs::path model = tiny_with_config(
      "two_counts", [](json& c) { c["num_local_experts"] = 16; }, tiny(), scratch());
  expect_bad_config(run_epic(run_args(model), scratch()), {"num_experts", "num_local_experts"});
}

TEST_F(Cli, UnimplementedFeaturesAreRefused) {
  const std::vector<std::pair<std::string, std::function<void(json&)>>> cases = {
      {"hidden_act", [](json& c) { c["hidden_act"] = "gelu"; }},
      {"yarn",
       [](json& c) {
         c["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
       }},
      {"use_sliding_window",
       [](json& c) {
         c["use_sliding_window"] = true;
         c["sliding_window"] = 4096;
       }},
      {"attention_bias", [](json& c) { c["attention_bias"] = true; }},
      {"eos_token_id", [](json& c) { c["eos_token_id"] = "151645"; }},
      {"rope_parameters",
       [](json& c) {
         c["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1.0}};
       }},
  };
  for (const auto& [word, edit] : cases) {
    SCOPED_TRACE(word);
    expect_bad_config(
        run_epic(run_args(tiny_with_config("feature_" + word, edit, tiny(), scratch())), scratch()), {word});
  }
}

TEST_F(Cli, AbsurdSizesFailFast) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"num_hidden_layers", "1000000000000"},
      {"head_dim", "4611686018427387904"},
      {"vocab_size", "18446744073709551615"},
      {"decoder_sparse_step", "9223372036854775807"},
  };
  for (const auto& [key, value] : cases) {
    SCOPED_TRACE(key);
    const fs::path model = tiny_with_config_text(
        "size_" + key,
        [&, key = key, value = value](std::string& text) {
          const size_t at = text.find("\"" + key + "\": ");
          const size_t end = text.find_first_of(",\n}", at);
          text.replace(at, end - at, "\"" + key + "\": " + value);
        },
        tiny(), scratch());
    expect_bad_config(run_epic(run_args(model), scratch()), {key});
  }
}

TEST_F(Cli, NonFiniteNumberIsNamed) {
  const fs::path model = tiny_with_config_text(
      "nan",
      [](std::string& text) {
        const size_t at = text.find("\"rms_norm_eps\": ");
        text.replace(at, text.find_first_of(",\n}", at) - at, "\"rms_norm_eps\": NaN");
      },
      tiny(), scratch());
  expect_bad_config(run_epic(run_args(model), scratch()), {"rms_norm_eps", "NaN"});
}

TEST_F(Cli, LongStringsInConfigDoNotCrash) {
  // 30 KB crashed epic (stack overflow in a std::regex); a 1 MB string and a 30 KB list too.
  const fs::path model = tiny_with_config(
      "long_values",
      [](json& c) {
        c["_name_or_path"] = std::string(30 << 10, 'x');
        c["comment"] = std::string(1 << 20, 'y');
        c["bad_words_ids"] = json(std::vector<int>(30 << 10, 1));
      },
      tiny(), scratch());
  const Outcome outcome = run_epic(run_args(model), scratch());
  EXPECT_EQ(outcome.exit_code, 0) << outcome.err;
}

TEST_F(Cli, ConfigThatIsAFifoIsRefusedAtOnce) {
  const fs::path dir = scratch() / "fifo_config";
  fs::create_directories(dir);
  ASSERT_EQ(::mkfifo((dir / "config.json").c_str(), 0600), 0);
  expect_bad_config(run_epic(run_args(dir), scratch()), {"config.json", "FIFO"});
}

INSTANTIATE_TEST_SUITE_P(BadConfig, CliBadInput,
                         ::testing::Values(BadInput{"ModelIsAFile",
                                                    "run --model {tiny}/config.json --prompt-ids 1",
                                                    "--model must name a Hugging Face model directory"}),
                         [](const ::testing::TestParamInfo<BadInput>& info) { return info.param.name; });

}  // namespace
}  // namespace epic
