// `epic run` with many prompts: memory bounded by --max-active-sequences, not by the number of
// prompts (the peak resident memory of 2,000 prompts is that of 200), and the output (stdout and
// --logits-out) bitwise the same whatever the bound.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>

#include "tests/cli/cli_support.h"

namespace epic {
namespace {

INSTANTIATE_TEST_SUITE_P(
    MaxActiveSequences, CliBadInput,
    ::testing::Values(BadInput{"MaxActiveSequencesZero",
                               "run --model {tiny} --prompt-ids 1,2 --max-active-sequences 0",
                               "--max-active-sequences must be in [1, 1048576], got 0"},
                      BadInput{"MaxActiveSequencesNegative",
                               "run --model {tiny} --prompt-ids 1,2 --max-active-sequences -4",
                               "--max-active-sequences must be in [1, 1048576], got -4"},
                      BadInput{"MaxActiveSequencesHuge",
                               "run --model {tiny} --prompt-ids 1,2 --max-active-sequences 1048577",
                               "--max-active-sequences must be in [1, 1048576], got 1048577"},
                      BadInput{"MaxActiveSequencesNotANumber",
                               "run --model {tiny} --prompt-ids 1,2 --max-active-sequences many",
                               "--max-active-sequences"}),
    [](const auto& info) { return info.param.name; });

std::string read_bytes(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

// `count` prompts of 2 to 9 random ids below `vocab`, one per line; the same file for a seed.
fs::path write_prompt_ids(const fs::path& dir, int count, uint32_t seed, uint32_t vocab = 150000) {
  const fs::path path = dir / ("prompts_" + std::to_string(count) + ".txt");
  std::mt19937 random(seed);
  std::ofstream file(path);
  for (int p = 0; p < count; ++p) {
    const int length = 2 + static_cast<int>(random() % 8);
    for (int t = 0; t < length; ++t) file << (t ? "," : "") << random() % vocab;
    file << "\n";
  }
  return path;
}

TEST_F(Cli, MaxActiveSequencesLeavesOutputAndLogitsBitwiseUnchanged) {
  const fs::path prompts = write_prompt_ids(scratch(), 9, 5);
  const std::string base = "run --model " + tiny().string() + " --prompt-ids-file " + prompts.string() +
                           " --max-new-tokens 5 --temperature 0.8 --top-p 0.9 --seed 5";
  std::string reference_out, reference_logits;
  for (int max_active : {64, 1, 4}) {
    SCOPED_TRACE("--max-active-sequences " + std::to_string(max_active));
    const fs::path logits = scratch() / ("logits_" + std::to_string(max_active) + ".npy");
    const fs::path report = scratch() / ("report_" + std::to_string(max_active) + ".json");
    const Outcome run = run_epic(base + " --max-active-sequences " + std::to_string(max_active) +
                                     " --logits-out " + logits.string() + " --report-out " + report.string(),
                                 scratch());
    ASSERT_EQ(run.exit_code, 0) << run.err;
    EXPECT_EQ(std::count(run.out.begin(), run.out.end(), '\n'), 9) << run.out;
    const nlohmann::json worker = nlohmann::json::parse(read_bytes(report))["workers"][0];
    EXPECT_EQ(worker["most_active_sequences"].get<int64_t>(), std::min(max_active, 9));
    if (reference_out.empty()) {
      reference_out = run.out;
      reference_logits = read_bytes(logits);
      ASSERT_GT(reference_logits.size(), 128u);
      continue;
    }
    EXPECT_EQ(run.out, reference_out);
    EXPECT_TRUE(read_bytes(logits) == reference_logits) << "logits differ from --max-active-sequences 64";
  }
}

// The tiny preset with a 4,096-token vocabulary: the lm_head (152k rows in tiny) is what makes
// thousands of prompts slow, and per-prompt memory shows as well at this size.
fs::path make_small_vocab_model(const fs::path& dir) {
  const fs::path preset = dir / "tiny_4k_vocab.json";
  nlohmann::json tiny =
      nlohmann::json::parse(read_bytes(EPIC_GOLDEN_DIR "/../../../configs/presets/tiny.json"));
  tiny["config"]["vocab_size"] = 4096;
  tiny["config"]["eos_token_id"] = nlohmann::json::array({4095});
  std::ofstream(preset) << tiny.dump(2);
  const fs::path model = dir / "tiny_4k_vocab";
  const Outcome made =
      run_epic("make-model --preset " + preset.string() + " --seed 4 --out " + model.string(), dir);
  EXPECT_EQ(made.exit_code, 0) << made.err;
  return model;
}

// The high-water mark of resident memory (VmHWM, in --report-out) with 10x the prompts stays
// within a few MB: results stream out and caches are freed as sequences finish. Before, every
// prompt's result and logits were held to the end (here ~40 KB per prompt, +70 MB for 1,800 more;
// ~1.2 MB per prompt with the tiny preset's full vocabulary).
TEST_F(Cli, PeakMemoryDoesNotGrowWithTheNumberOfPrompts) {
#if defined(__SANITIZE_ADDRESS__)
  // ASan keeps freed memory in quarantine (256 MB by default), so the peak grows with the work done.
  GTEST_SKIP() << "peak resident memory is not meaningful in an AddressSanitizer build";
#endif
  const fs::path model = make_small_vocab_model(scratch());
  int64_t peak[2] = {0, 0};
  const int counts[2] = {200, 2000};
  for (int i = 0; i < 2; ++i) {
    const fs::path prompts = write_prompt_ids(scratch(), counts[i], 11, 4000);
    const fs::path report = scratch() / "memory_report.json";
    const Outcome run =
        run_epic("run --model " + model.string() + " --prompt-ids-file " + prompts.string() +
                     " --max-new-tokens 3 --max-active-sequences 16 --report-out " + report.string(),
                 scratch());
    ASSERT_EQ(run.exit_code, 0) << run.err;
    EXPECT_EQ(std::count(run.out.begin(), run.out.end(), '\n'), counts[i]);
    peak[i] = nlohmann::json::parse(read_bytes(report))["workers"][0]["peak_resident_bytes"].get<int64_t>();
    ASSERT_GT(peak[i], 0) << "no VmHWM in /proc/self/status";
  }
  RecordProperty("peak_resident_kb_200_prompts", std::to_string(peak[0] / 1000));
  RecordProperty("peak_resident_kb_2000_prompts", std::to_string(peak[1] / 1000));
  // 1,800 more prompts may cost their ids and bookkeeping (well under 1 MB), not 1,800 results.
  EXPECT_LE(peak[1], peak[0] + 8 * 1000 * 1000)
      << "peak resident memory grew from " << peak[0] / 1000 << " kB (200 prompts) to " << peak[1] / 1000
      << " kB (2000 prompts)";
}

// Sets every value of row `row` of the f32 tensor `name` to NaN, in place (safetensors layout: an
// 8-byte header length, the JSON header, then the data).
void poison_row(const fs::path& model, const std::string& name, int64_t row) {
  const nlohmann::json index = nlohmann::json::parse(read_bytes(model / "model.safetensors.index.json"));
  const fs::path shard = model / index["weight_map"][name].get<std::string>();
  std::fstream file(shard, std::ios::in | std::ios::out | std::ios::binary);
  uint64_t header_length = 0;
  file.read(reinterpret_cast<char*>(&header_length), 8);
  std::string header(header_length, '\0');
  file.read(header.data(), static_cast<std::streamsize>(header_length));
  const nlohmann::json tensor = nlohmann::json::parse(header)[name];
  ASSERT_EQ(tensor["dtype"], "F32");
  const int64_t width = tensor["shape"][1].get<int64_t>();
  const std::vector<float> nans(width, std::numeric_limits<float>::quiet_NaN());
  file.seekp(static_cast<std::streamoff>(8 + header_length + tensor["data_offsets"][0].get<uint64_t>() +
                                         row * width * sizeof(float)));
  file.write(reinterpret_cast<const char*>(nans.data()), static_cast<std::streamsize>(width * sizeof(float)));
  ASSERT_TRUE(file.good());
}

// An error at a later step (NaN logits of the third prompt, whose token's embedding row is NaN)
// after two prompts finished: their lines stay printed, and --logits-out never appears.
TEST_F(Cli, ResultsPrintedBeforeAFailingStepStayPrintedAndNoLogitsFileAppears) {
  const fs::path model = scratch() / "poisoned_f32";
  fs::copy(fs::path(EPIC_GOLDEN_DIR) / "qwen3_moe_f32", model, fs::copy_options::recursive);
  const fs::path prompts = scratch() / "poison_prompts.txt";
  const std::string flags = " --prompt-ids-file " + prompts.string() +
                            " --max-new-tokens 3 --max-active-sequences 1 --allow-nonfinite-weights";
  std::ofstream(prompts) << "1,2,3\n4,5\n6,7,8\n9,10\n";
  const Outcome clean = run_epic("run --model " + model.string() + flags, scratch());
  ASSERT_EQ(clean.exit_code, 0) << clean.err;
  // A token id in neither of the first two prompts nor their outputs; the third prompt holds it.
  const std::string first_two = clean.out.substr(0, clean.out.find('\n', clean.out.find('\n') + 1) + 1);
  int poison = 100;
  while (first_two.find(std::to_string(poison)) != std::string::npos) ++poison;
  std::ofstream(prompts) << "1,2,3\n4,5\n6," << poison << ",8\n9,10\n";
  poison_row(model, "model.embed_tokens.weight", poison);

  const fs::path logits = scratch() / "poisoned_logits.npy";
  const Outcome failed =
      run_epic("run --model " + model.string() + flags + " --logits-out " + logits.string(), scratch());
  EXPECT_NE(failed.exit_code, 0) << failed.out;
  EXPECT_NE(failed.err.find("sequence 2"), std::string::npos) << failed.err;
  EXPECT_EQ(failed.out, first_two) << "the two results finished before the failing step must stay printed";
  EXPECT_FALSE(fs::exists(logits)) << "--logits-out written although the run failed";
}

}  // namespace
}  // namespace epic
