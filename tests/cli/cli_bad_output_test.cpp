// Outputs and resources at the command line: every output path is checked before any work (a
// device, FIFO, directory, missing or unwritable folder is exit 2 with the flag named, and the
// device or FIFO is still there afterwards), make-model refuses a non-empty --out without --force,
// numbers out of range are errors (never a clamp or a wrap), input files must be regular files,
// and ids past the tokenizer decode to nothing.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "tests/support/file_contents.h"
#include "tests/cli/cli_support.h"

namespace epic {
namespace {

// The suite's model plus, in scratch(): a FIFO, a folder, a regular file, a 0555 folder, a model
// folder whose tokenizer.json is a FIFO, and an ids file of two prompts.
class CliOutputs : public Cli {
 protected:
  static void SetUpTestSuite() {
    Cli::SetUpTestSuite();
    ASSERT_EQ(::mkfifo((scratch() / "pipe").c_str(), 0600), 0);
    fs::create_directory(scratch() / "folder");
    std::ofstream(scratch() / "file.txt") << "a regular file\n";
    fs::create_directories(scratch() / "fifo_tokenizer");
    ASSERT_EQ(::mkfifo((scratch() / "fifo_tokenizer" / "tokenizer.json").c_str(), 0600), 0);
    std::ofstream(scratch() / "ids.txt") << "1,2\n1,2,3,4,5,6,7,8\n";  // the second prompt is longer
    fs::create_directory(scratch() / "read_only");
    fs::permissions(scratch() / "read_only", fs::perms::owner_read | fs::perms::owner_exec |
                                                 fs::perms::group_read | fs::perms::group_exec |
                                                 fs::perms::others_read | fs::perms::others_exec);
  }
  static std::string expand(std::string args) {
    args = expand_placeholders(args, tiny());
    for (size_t at; (at = args.find("{scratch}")) != std::string::npos;)
      args.replace(at, 9, scratch().string());
    return args;
  }
};

// Bad input: exit code 2 (not 1, not a crash), the message on stderr, nothing on stdout (the check
// came before any work), and the FIFO and /dev/full untouched.
class CliBadOutput : public CliOutputs, public ::testing::WithParamInterface<BadInput> {};

TEST_P(CliBadOutput, ExitCodeTwoWithMessageBeforeAnyWork) {
  const Outcome outcome = run_epic(expand(GetParam().args), scratch());
  EXPECT_EQ(outcome.exit_code, 2) << outcome.err;
  EXPECT_NE(outcome.err.find(expand(GetParam().message)), std::string::npos) << outcome.err;
  EXPECT_EQ(outcome.out, "");
  EXPECT_TRUE(fs::is_character_file("/dev/full")) << "/dev/full was replaced";
  EXPECT_TRUE(fs::is_fifo(scratch() / "pipe")) << "the FIFO was replaced";
  EXPECT_TRUE(fs::is_directory(scratch() / "folder"));
}

const std::string kRun = "run --model {tiny} --prompt-ids 1,2,3 --max-new-tokens 2";

INSTANTIATE_TEST_SUITE_P(
    Outputs, CliBadOutput,
    ::testing::Values(
        // The case: `--logits-out /dev/full` replaced the device node.
        BadInput{"LogitsOutDevFull", kRun + " --logits-out /dev/full",
                 "--logits-out /dev/full is a character device"},
        BadInput{"ReportOutFifo", kRun + " --report-out {scratch}/pipe",
                 "--report-out {scratch}/pipe is a FIFO"},
        BadInput{"PlacementOutDirectory", kRun + " --placement-out {scratch}/folder", "is a directory"},
        BadInput{"LoadProfileOutMissingFolder", kRun + " --load-profile-out {scratch}/no_such_folder/p.json",
                 "does not exist"},
        BadInput{"LogitsOutInsideARegularFile", kRun + " --logits-out {scratch}/file.txt/logits.npy",
                 "Not a directory"},
        // As root access() passes everywhere; /proc refuses the file itself: the probe finds it.
        BadInput{"ReportOutUnderProc", kRun + " --report-out /proc/epic-report.json", "cannot create"},
        BadInput{"SameFileForTwoOutputs",
                 kRun + " --report-out {scratch}/same.json --placement-out {scratch}/same.json", "both name"},
        BadInput{"PlanOutDevFull", "plan --model {tiny} --workers 2 --out /dev/full", "--out /dev/full"},
        BadInput{"PlanOutFifo", "plan --model {tiny} --workers 2 --out {scratch}/pipe", "FIFO"},
        BadInput{"BenchCsvFifo", "bench-moe --preset tiny --csv {scratch}/pipe", "--csv"},
        BadInput{"BenchCsvDevFull", "bench-moe --preset tiny --csv /dev/full", "character device"},
        BadInput{"BenchJsonDirectory", "bench-moe --preset tiny --json {scratch}/folder", "is a directory"},
        BadInput{"BenchJsonMissingFolder", "bench-moe --preset tiny --json {scratch}/nowhere/b.json",
                 "does not exist"}));

INSTANTIATE_TEST_SUITE_P(
    MakeModelOut, CliBadOutput,
    ::testing::Values(
        BadInput{"OutIsAFile", "make-model --preset tiny --out {scratch}/file.txt", "not a folder"},
        BadInput{"OutIsAFifo", "make-model --preset tiny --out {scratch}/pipe", "FIFO"},
        BadInput{"OutHoldsAnEarlierModel", "make-model --preset tiny --out {tiny}", "pass --force"},
        BadInput{"ForceStillKeepsForeignFiles", "make-model --preset tiny --out {scratch} --force",
                 "which make-model did not write"},
        BadInput{"TokenizerIsAFifo", "make-model --preset tiny --out {scratch}/m2 --tokenizer {scratch}/pipe",
                 "--tokenizer {scratch}/pipe is a FIFO"},
        BadInput{"PresetIsAFifo", "make-model --preset {scratch}/pipe --out {scratch}/m3", "FIFO"}));

INSTANTIATE_TEST_SUITE_P(
    Numbers, CliBadOutput,
    ::testing::Values(
        // CLI11 2.1 reads "-1" into a uint64 as 2^64-1, and clamps an overflow: both refused.
        BadInput{"RunSeedMinusOne", kRun + " --seed -1", "--seed"},
        BadInput{"RunSeedPast2To64", kRun + " --seed 18446744073709551616", "not a decimal integer"},
        BadInput{"MakeModelSeedMinusOne", "make-model --preset tiny --out {scratch}/m4 --seed -1", "--seed"},
        BadInput{"BenchSeedHex", "bench-moe --preset tiny --seed 0x10", "not a decimal integer"},
        BadInput{"MaxNewTokensOverflow",
                 "run --model {tiny} --prompt-ids 1 --max-new-tokens 99999999999999999999",
                 "--max-new-tokens"},
        BadInput{"MaxNewTokensNegative", "run --model {tiny} --prompt-ids 1 --max-new-tokens -5",
                 "--max-new-tokens must be >= 0"},
        // The golden model's context is 256 positions: 3 prompt tokens + 254 do not fit.
        BadInput{"MaxNewTokensPastContext",
                 "run --model {golden}/qwen3_moe_f32 --prompt-ids 1,2,3 --max-new-tokens 254",
                 "the prompt (3 tokens) plus --max-new-tokens 254 exceeds the model's context of 256"},
        BadInput{
            "MaxNewTokensPastContextNamesThePrompt",
            "run --model {golden}/qwen3_moe_f32 --prompt-ids-file {scratch}/ids.txt --max-new-tokens 250",
            "prompt 2 (8 tokens)"},
        BadInput{"CommTimeoutInf", kRun + " --comm-timeout inf", "--comm-timeout must be a finite number"},
        BadInput{"CommTimeoutNan", kRun + " --comm-timeout nan", "--comm-timeout must be a finite number"},
        BadInput{"CommTimeoutZero", kRun + " --comm-timeout 0", "--comm-timeout"},
        BadInput{"CommTimeoutNegative", kRun + " --comm-timeout -3", "--comm-timeout"},
        BadInput{"CommTimeoutPastAWeek", kRun + " --comm-timeout 1e9", "(0, 604800]"},
        BadInput{"BenchCommTimeoutNan", "bench-moe --preset tiny --comm-timeout nan", "--comm-timeout"},
        BadInput{"BenchCommTimeoutInf", "bench-moe --preset tiny --comm-timeout inf", "--comm-timeout"},
        BadInput{"TemperatureNan", kRun + " --temperature nan", "--temperature"},
        BadInput{"TemperatureInf", kRun + " --temperature inf", "--temperature"},
        BadInput{"TopPNan", kRun + " --top-p nan", "--top-p"},
        BadInput{"PlanWorkersBillion", "plan --model {tiny} --workers 1000000000",
                 "--workers must be in [1, 1024]"},
        BadInput{"PlanWorkersPastInt", "plan --model {tiny} --workers 99999999999", "--workers"},
        BadInput{"PlanWorkersZero", "plan --model {tiny} --workers 0", "--workers must be in [1, 1024]"},
        BadInput{"PlanSlotsZero", "plan --model {tiny} --workers 2 --slots 0", "--slots must be in [1,"},
        BadInput{"PlanSlotsNegative", "plan --model {tiny} --workers 2 --slots -4", "--slots must be in [1,"},
        BadInput{"PlanBudgetMinusOne", "plan --model {tiny} --workers 2 --budget-bytes -1", "--budget-bytes"},
        BadInput{"RunSlotsNegative", kRun + " --slots -1", "--slots must be in [1,"},
        BadInput{"BenchThreadsNegative", "bench-moe --preset tiny --threads -1",
                 "--threads must be in [0, 1024]"},
        BadInput{"BenchTokensHuge", "bench-moe --preset tiny --tokens-per-worker 1000000000",
                 "--tokens-per-worker must be in [0, 16384]"},
        BadInput{"BenchIterationsZero", "bench-moe --preset tiny --iterations 0",
                 "--iterations must be in [1,"},
        BadInput{"BenchIterationsHuge", "bench-moe --preset tiny --iterations 1000000000", "--iterations"},
        BadInput{"BenchWarmupNegative", "bench-moe --preset tiny --warmup -1", "--warmup must be in [0,"},
        BadInput{"BenchLayersPastPreset", "bench-moe --preset tiny --layers 1000",
                 "--layers (of preset tiny)"},
        BadInput{"BenchLayersZero", "bench-moe --preset tiny --layers 0", "--layers"},
        BadInput{"BenchGraphsOnCpu", "bench-moe --preset tiny --backend cpu --cuda-graphs",
                 "--cuda-graphs times one worker on a GPU"},
        BadInput{"BenchNcclOnCpu", "bench-moe --preset tiny --backend cpu --ep-transport nccl",
                 "--ep-transport nccl needs --backend cuda"},
        BadInput{"BenchTransportUnknown", "bench-moe --preset tiny --ep-transport shm", "--ep-transport"},
        BadInput{"RunNcclOnCpu", kRun + " --backend cpu --ep-transport nccl",
                 "--ep-transport nccl needs --backend cuda"},
        BadInput{"MakeModelLayersZero", "make-model --preset tiny --out {scratch}/m5 --layers 0",
                 "--layers"}));

INSTANTIATE_TEST_SUITE_P(
    InputFiles, CliBadOutput,
    ::testing::Values(
        // Without the check the open() of a FIFO with no writer blocks forever.
        BadInput{"PromptsFileFifo", "run --model {tiny} --prompts-file {scratch}/pipe",
                 "--prompts-file {scratch}/pipe is a FIFO"},
        BadInput{"PromptIdsFileDirectory", "run --model {tiny} --prompt-ids-file {scratch}/folder",
                 "is a directory"},
        BadInput{"PromptIdsFileDevice", "run --model {tiny} --prompt-ids-file /dev/zero", "character device"},
        BadInput{"LoadProfileFifo", kRun + " --load-profile {scratch}/pipe",
                 "--load-profile {scratch}/pipe is a FIFO"},
        BadInput{"PlanLoadProfileDirectory",
                 "plan --model {tiny} --workers 2 --load-profile {scratch}/folder", "is a directory"},
        BadInput{"TokenizeFileFifo", "tokenize --model {tiny} --file {scratch}/pipe",
                 "--file {scratch}/pipe is a FIFO"},
        BadInput{"TokenizeFileDevZero", "tokenize --model {tiny} --file /dev/zero", "character device"},
        BadInput{"TokenizerJsonIsAFifo", "tokenize --model {scratch}/fifo_tokenizer --text hi",
                 "tokenizer.json {scratch}/fifo_tokenizer/tokenizer.json is a FIFO"},
        BadInput{"DetokenizeNegativeId", "detokenize --model {tiny} --ids -1", "\"-1\""}));

TEST_F(CliOutputs, MakeModelRefusesANonEmptyOutUnlessForced) {
  const std::string make = "make-model --preset tiny --seed 3 --out " + (scratch() / "again").string();
  ASSERT_EQ(run_epic(make, scratch()).exit_code, 0);
  const std::string config = testing::read_whole_file(scratch() / "again" / "config.json");
  const Outcome refused = run_epic(make, scratch());
  EXPECT_EQ(refused.exit_code, 2) << refused.err;
  EXPECT_NE(refused.err.find("is not empty"), std::string::npos) << refused.err;
  EXPECT_NE(refused.err.find("pass --force"), std::string::npos) << refused.err;
  const Outcome forced = run_epic(make + " --force", scratch());
  EXPECT_EQ(forced.exit_code, 0) << forced.err;
  EXPECT_EQ(testing::read_whole_file(scratch() / "again" / "config.json"), config);
  // Same seed, same bytes: the replaced checkpoint equals the suite's model, shard by shard.
  for (const auto& entry : fs::directory_iterator(tiny()))
    EXPECT_EQ(testing::read_whole_file(entry.path()), testing::read_whole_file(scratch() / "again" / entry.path().filename()))
        << entry.path().filename();
  EXPECT_EQ(testing::count_atomic_writer_temporaries(scratch() / "again"), 0);
}

// As root, access() grants a 0555 folder and the write really succeeds there, so accepting it is
// right; for other users it is refused before the run. The /proc case in the table is the failure
// root meets too.
TEST_F(CliOutputs, ReadOnlyFolderIsRefusedUnlessRootWhoCanWriteThere) {
  const fs::path report = scratch() / "read_only" / "report.json";
  const Outcome outcome = run_epic("run --model " + tiny().string() +
                                       " --prompt-ids 1,2 --max-new-tokens 1 --report-out " + report.string(),
                                   scratch());
  if (::geteuid() == 0) {
    EXPECT_EQ(outcome.exit_code, 0) << outcome.err;
    EXPECT_TRUE(fs::is_regular_file(report));
    std::printf(
        "note: running as root, which bypasses the 0555 folder's permission; the refusal is "
        "covered by the /proc and file-inside-a-file cases\n");
    return;
  }
  EXPECT_EQ(outcome.exit_code, 2) << outcome.err;
  EXPECT_NE(outcome.err.find("not writable"), std::string::npos) << outcome.err;
  EXPECT_EQ(outcome.out, "");
}

// Outputs over existing regular files are replaced whole, with no temporary left behind.
TEST_F(CliOutputs, OutputsReplaceRegularFilesAtomically) {
  const fs::path folder = scratch() / "outputs";
  fs::create_directory(folder);
  const char* names[] = {"logits.npy", "profile.json", "placement.json", "report.json", "plan.json"};
  for (const char* name : names) std::ofstream(folder / name) << "stale contents";
  const Outcome run = run_epic("run --model " + tiny().string() + " --prompt-ids 1,2,3 --max-new-tokens 2" +
                                   " --logits-out " + (folder / "logits.npy").string() +
                                   " --load-profile-out " + (folder / "profile.json").string() +
                                   " --placement-out " + (folder / "placement.json").string() +
                                   " --report-out " + (folder / "report.json").string(),
                               scratch());
  ASSERT_EQ(run.exit_code, 0) << run.err;
  const Outcome plan = run_epic(
      "plan --model " + tiny().string() + " --workers 2 --out " + (folder / "plan.json").string(), scratch());
  ASSERT_EQ(plan.exit_code, 0) << plan.err;
  EXPECT_EQ(fs::file_size(folder / "logits.npy"), 128u + 3u * 151936u * 4u);
  for (const char* name : {"profile.json", "placement.json", "report.json", "plan.json"})
    EXPECT_NO_THROW((void)nlohmann::json::parse(testing::read_whole_file(folder / name))) << name;
  EXPECT_EQ(testing::count_atomic_writer_temporaries(folder), 0);
}

// --csv appends (a header only on a new file); --json is replaced whole.
TEST_F(CliOutputs, BenchCsvAppendsAndJsonIsReplaced) {
  const fs::path csv = scratch() / "bench.csv", json = scratch() / "bench.json";
  const std::string bench = "bench-moe --preset tiny --tokens-per-worker 4 --iterations 1 --warmup 0 --csv " +
                            csv.string() + " --json " + json.string();
  ASSERT_EQ(run_epic(bench, scratch()).exit_code, 0);
  const Outcome second = run_epic(bench, scratch());
  ASSERT_EQ(second.exit_code, 0) << second.err;
  const std::string lines = testing::read_whole_file(csv);
  EXPECT_EQ(std::count(lines.begin(), lines.end(), '\n'), 3) << lines;  // header + one line per run
  EXPECT_EQ(lines.rfind("preset,", 0), 0u) << lines;
  EXPECT_EQ(nlohmann::json::parse(testing::read_whole_file(json)).at("format"), "epic-bench-moe-v1");
}

// A real full disk (a 64 KiB tmpfs; root only, skipped visibly otherwise): the logits do not fit,
// which is exit 1 naming the cause, never a 0-byte file and exit 0.
TEST_F(CliOutputs, FullDiskIsAnErrorNotAnEmptyFile) {
  const fs::path mount_point = scratch() / "tiny_fs";
  fs::create_directory(mount_point);
  const std::string mount = "mount -t tmpfs -o size=64k tmpfs " + mount_point.string() + " 2>/dev/null";
  if (::geteuid() != 0 || std::system(mount.c_str()) != 0)
    GTEST_SKIP() << "cannot mount a 64 KiB tmpfs (needs root): the full-disk case is not run";
  const fs::path logits = mount_point / "logits.npy";
  const Outcome outcome =
      run_epic("run --model " + tiny().string() + " --prompt-ids 1,2,3 --max-new-tokens 1 --logits-out " +
                   logits.string(),
               scratch());
  const bool left_a_file = fs::exists(logits);
  const int temporaries = testing::count_atomic_writer_temporaries(mount_point);
  std::system(("umount " + mount_point.string()).c_str());
  EXPECT_EQ(outcome.exit_code, 1) << outcome.err;
  EXPECT_NE(outcome.err.find("No space left on device"), std::string::npos) << outcome.err;
  EXPECT_FALSE(left_a_file);
  EXPECT_EQ(temporaries, 0);
}

// The seed is decimal: CLI11 alone would read "010" as octal 8.
TEST_F(CliOutputs, SeedWithLeadingZerosIsDecimal) {
  const std::string base =
      "run --model " + tiny().string() + " --prompt-ids 5,6 --max-new-tokens 8 --temperature 1.5 --seed ";
  const Outcome leading_zero = run_epic(base + "010", scratch());
  const Outcome ten = run_epic(base + "10", scratch());
  const Outcome eight = run_epic(base + "8", scratch());
  ASSERT_EQ(leading_zero.exit_code, 0) << leading_zero.err;
  EXPECT_EQ(leading_zero.out, ten.out);
  EXPECT_NE(leading_zero.out, eight.out);
}

// The context bound is exact: prompt + --max-new-tokens == max_position_embeddings runs.
TEST_F(CliOutputs, MaxNewTokensUpToTheContextRuns) {
  std::string ids = "1";
  for (int i = 1; i < 250; ++i) ids += ",1";
  const std::string run = "run --model " + std::string(EPIC_GOLDEN_DIR) + "/qwen3_moe_f32 --prompt-ids " +
                          ids + " --max-new-tokens ";
  const Outcome fits = run_epic(run + "6", scratch());
  EXPECT_EQ(fits.exit_code, 0) << fits.err;
  const Outcome one_more = run_epic(run + "7", scratch());
  EXPECT_EQ(one_more.exit_code, 2) << one_more.err;
  EXPECT_NE(one_more.err.find("lower --max-new-tokens to at most 6"), std::string::npos) << one_more.err;
}

// Qwen3's vocabulary (151936) is larger than its tokenizer (ids up to 151668): ids in between
// decode to nothing, as Hugging Face does; ids past the model are still an error.
TEST_F(CliOutputs, IdsPastTheTokenizerDecodeToNothing) {
  if (!has_tokenizer()) GTEST_SKIP() << "no Qwen3 tokenizer.json: run launch/setup_debian.sh";
  const Outcome text =
      run_epic("detokenize --model " + tiny().string() + " --ids 9707,151700,151935,1879", scratch());
  EXPECT_EQ(text.exit_code, 0) << text.err;
  EXPECT_EQ(text.out, "Hello world\n");
  const Outcome past = run_epic("detokenize --model " + tiny().string() + " --ids 1,151936", scratch());
  EXPECT_EQ(past.exit_code, 2) << past.err;
  EXPECT_NE(past.err.find("outside the model's vocabulary [0, 151936)"), std::string::npos) << past.err;
}

// The case: a run that samples an id past the tokenizer (flat sampling over Qwen3's full
// vocabulary hits the 267 ids without text) ended with an error after generation and lost its
// output. Now it succeeds, and the text is that of the other ids.
TEST_F(CliOutputs, GeneratedIdsPastTheTokenizerDecodeToNothing) {
  if (!has_tokenizer()) GTEST_SKIP() << "no Qwen3 tokenizer.json: run launch/setup_debian.sh";
  std::ofstream(scratch() / "one_prompt.txt") << "1,2\n";
  const Outcome run = run_epic("run --model " + tiny().string() + " --prompt-ids-file " +
                                   (scratch() / "one_prompt.txt").string() +
                                   " --max-new-tokens 300 --temperature 1000 --seed 3",
                               scratch());
  ASSERT_EQ(run.exit_code, 0) << run.err;
  const nlohmann::json line = nlohmann::json::parse(run.out);
  const std::vector<int32_t> ids = line.at("ids").get<std::vector<int32_t>>();
  std::string known_ids;
  int past_the_tokenizer = 0;
  for (int32_t id : ids) {
    if (id > 151668) {
      ++past_the_tokenizer;
      continue;
    }
    known_ids += (known_ids.empty() ? "" : ",") + std::to_string(id);
  }
  ASSERT_GT(past_the_tokenizer, 0) << "this seed no longer samples an id past the tokenizer; pick another";
  const Outcome text = run_epic("detokenize --model " + tiny().string() + " --ids " + known_ids, scratch());
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_EQ(line.at("text").get<std::string>() + "\n", text.out);
}

}  // namespace
}  // namespace epic
