// `epic run`'s choice of backend and model source: --backend / --device / --precision checked before
// any work (exit 2 with what to do), cuda refused where there is none, and --random-weights drawing
// exactly the model make-model writes for the same preset and seed.
#include <filesystem>
#include <nlohmann/json.hpp>
#include <vector>

#include "tests/cli/cli_support.h"
#include "tests/support/file_contents.h"
#include "worker/npy_file.h"

namespace epic {
namespace {

const std::string kIds = " --prompt-ids 1,2,3 --max-new-tokens 4";

INSTANTIATE_TEST_SUITE_P(
    Backends, CliBadInput,
    ::testing::Values(
        BadInput{"UnknownBackend", "run --model {tiny}" + kIds + " --backend tpu", "--backend must be cpu or cuda"},
        BadInput{"UnknownPrecision", "run --model {tiny}" + kIds + " --precision fp8",
                 "--precision must be fp32"},
        BadInput{"Bf16OnTheCpu", "run --model {tiny}" + kIds + " --backend cpu --precision bf16",
                 "--precision bf16 needs --backend cuda"},
        BadInput{"DeviceOnTheCpu", "run --model {tiny}" + kIds + " --backend cpu --device 1",
                 "--device selects a GPU"},
        BadInput{"NegativeDevice", "run --model {tiny}" + kIds + " --device -1", "--device"},
        BadInput{"ModelAndRandomWeights", "run --model {tiny} --random-weights tiny" + kIds,
                 "give exactly one of --model DIR"},
        BadInput{"NeitherModelNorRandomWeights", "run" + kIds, "give exactly one of --model DIR"},
        BadInput{"LayersWithModel", "run --model {tiny} --layers 2" + kIds, "--layers applies to --random-weights"},
        BadInput{"LayersOutOfRange", "run --random-weights tiny --layers 99" + kIds, "--layers must be in [1, 4]"},
        BadInput{"UnknownPresetForRandomWeights", "run --random-weights no-such-preset" + kIds, "no-such-preset"}),
    [](const auto& info) { return info.param.name; });

INSTANTIATE_TEST_SUITE_P(
    BenchDecode, CliBadInput,
    ::testing::Values(BadInput{"BatchZero", "bench-decode --random-weights tiny --backend cpu --batch 0", "--batch"},
                      BadInput{"TooFewNewTokens", "bench-decode --random-weights tiny --backend cpu --new-tokens 2",
                               "--new-tokens"},
                      BadInput{"NoModel", "bench-decode --backend cpu", "give exactly one of --model DIR"}),
    [](const auto& info) { return info.param.name; });

// The benchmark tools run on the CPU too (the figures of BENCHMARKS.md come from the same commands).
TEST_F(Cli, BenchDecodeReportsEveryBatchAndThePrefill) {
  const fs::path json_out = scratch() / "decode.json";
  const Outcome run = run_epic("bench-decode --random-weights tiny --backend cpu --batch 1,3 --prompt-tokens 5 "
                               "--new-tokens 5 --prefill-tokens 20 --json " + json_out.string(),
                               scratch());
  ASSERT_EQ(run.exit_code, 0) << run.err;
  const nlohmann::json results = nlohmann::json::parse(testing::read_whole_file(json_out));
  std::vector<int64_t> batches;
  bool prefill = false;
  for (const nlohmann::json& line : results) {
    if (line["name"] == "decode") {
      batches.push_back(line["batch"].get<int64_t>());
      EXPECT_EQ(line["timed_steps"].get<int64_t>(), 2);  // 5 new tokens: 1 from the prefill, 2 warm-up, 2 timed
      EXPECT_GT(line["tokens_per_s"].get<double>(), 0.0);
    }
    if (line["name"] == "prefill") {
      prefill = true;
      EXPECT_EQ(line["tokens"].get<int64_t>(), 20);
      EXPECT_GT(line["tflops"].get<double>(), 0.0);
    }
  }
  EXPECT_EQ(batches, (std::vector<int64_t>{1, 3}));
  EXPECT_TRUE(prefill);
}

TEST_F(Cli, BenchLoadComparesTheLoadWithTheRawRead) {
  const Outcome run = run_epic("bench-load --model " + tiny().string(), scratch());
  ASSERT_EQ(run.exit_code, 0) << run.err;
  EXPECT_NE(run.out.find("raw read"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("load / raw read"), std::string::npos) << run.out;
}

TEST_F(Cli, CudaAskedForWhereThereIsNoneIsABadFlag) {
  if (run_epic("run --model " + tiny().string() + kIds + " --backend cuda --device 0", scratch()).exit_code == 0)
    GTEST_SKIP() << "a CUDA device is visible here: the no-GPU error cannot happen";
  const Outcome run = run_epic("run --model " + tiny().string() + kIds + " --backend cuda", scratch());
  EXPECT_EQ(run.exit_code, 2) << run.err;
  EXPECT_NE(run.err.find("--backend cpu"), std::string::npos) << "the message must say what to do: " << run.err;
}

TEST_F(Cli, RandomWeightsAreTheModelMakeModelWrites) {
  const fs::path made = scratch() / "tiny-seed-5";
  ASSERT_EQ(run_epic("make-model --preset tiny --seed 5 --out " + made.string(), scratch()).exit_code, 0);
  const fs::path from_disk = scratch() / "from-disk.npy", in_memory = scratch() / "in-memory.npy";
  const Outcome disk = run_epic("run --backend cpu --model " + made.string() + kIds + " --logits-out " +
                                    from_disk.string(),
                                scratch());
  const Outcome memory = run_epic("run --backend cpu --random-weights tiny --weights-seed 5" + kIds +
                                      " --logits-out " + in_memory.string(),
                                  scratch());
  ASSERT_EQ(disk.exit_code, 0) << disk.err;
  ASSERT_EQ(memory.exit_code, 0) << memory.err;
  // (stdout differs by design: make-model's folder has a tokenizer and prints text, random weights print ids)
  const NpyArray a = read_npy_f32(from_disk), b = read_npy_f32(in_memory);
  ASSERT_EQ(a.shape, b.shape);
  EXPECT_TRUE(a.values == b.values) << "logits differ: the random source drew other weights than make-model";
  // Another seed is another model (the seed is not ignored).
  const Outcome other = run_epic("run --backend cpu --random-weights tiny --weights-seed 6" + kIds, scratch());
  ASSERT_EQ(other.exit_code, 0) << other.err;
  EXPECT_NE(other.out, memory.out);
}

}  // namespace
}  // namespace epic
