// Plans and load profiles as JSON and cereal bytes: round trips on random plans give identical
// plans, and every corruption (duplicate, out-of-range, slot overflow, missing or masked expert,
// wrong tag or version, truncation, flipped bytes) is refused with a message that names it.
#include <gtest/gtest.h>

#include <cereal/archives/portable_binary.hpp>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "coordinator/placement.h"
#include "tests/placement/placement_test_support.h"

namespace epic {
namespace {

using nlohmann::json;
using testing::all_present;
using testing::expect_error;
using testing::expect_same_plan;
using testing::fresh_seed;
using testing::seed_trace;
using testing::zipf_counts;

constexpr ErrorCode kBad = ErrorCode::kInvalidArgument;

// Layer 2: 10 experts (expert 7 masked) on 3 workers with 4 slots, so experts 0 and 6 (the hottest)
// get replicas; layer 5: 5 experts, uniform, 2 slots.
PlacementPlan sample_plan() {
  PlacementRequest request;
  request.num_workers = 3;
  request.slots_per_worker = 4;
  LayerExperts layer = all_present(2, 10);
  layer.present[7] = 0;
  request.layers = {layer, all_present(5, 5)};
  request.profile.load[2] = {90, 5, 4, 3, 2, 1, 30, 8, 0.5, 7};
  return plan_placement(request);
}

void expect_plan_json_error(const json& document, std::initializer_list<std::string> words) {
  expect_error([&] { PlacementPlan::from_json_text(document.dump(), "plans/edited.json"); }, kBad, words);
}

TEST(PlacementSerialization, RandomPlansRoundTripThroughJsonAndCereal) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 rng(seed);
  for (int index = 0; index < 200; ++index) {
    std::string description;
    const PlacementRequest request = testing::random_request(rng, description);
    SCOPED_TRACE("case " + std::to_string(index) + ": " + description);
    const PlacementPlan plan = plan_placement(request);
    const std::string text = plan.to_json_text();
    const PlacementPlan from_json = PlacementPlan::from_json_text(text, "round-trip.json");
    ASSERT_NO_FATAL_FAILURE(expect_same_plan(plan, from_json));
    ASSERT_EQ(text, from_json.to_json_text());
    const PlacementPlan from_bytes = PlacementPlan::from_cereal_bytes(plan.to_cereal_bytes());
    ASSERT_NO_FATAL_FAILURE(expect_same_plan(plan, from_bytes));
    ASSERT_EQ(text, from_bytes.to_json_text());
  }
}

TEST(PlacementSerialization, JsonLayout) {
  const PlacementPlan plan = sample_plan();
  const json document = json::parse(plan.to_json_text());
  EXPECT_EQ("epic-placement-v1", document.at("format"));
  EXPECT_EQ(3, document.at("num_workers"));
  ASSERT_EQ(2u, document.at("layers").size());
  const json& layer = document.at("layers")[0];
  EXPECT_EQ(2, layer.at("layer"));
  EXPECT_EQ(10, layer.at("num_experts"));
  EXPECT_EQ(4, layer.at("slots_per_worker"));
  EXPECT_EQ(json::array({7}), layer.at("masked_experts"));
  EXPECT_EQ(json(plan.layer(2).worker_experts), layer.at("workers"));
  EXPECT_EQ(json(plan.layer(2).expert_load), layer.at("expert_load"));
  EXPECT_EQ(json(plan.layer(2).worker_load), layer.at("worker_load"));
  EXPECT_DOUBLE_EQ(plan.layer(2).max_over_mean_load(), layer.at("max_over_mean_load").get<double>());
  // 3 x 4 slots for 9 present experts: 3 replicas, all for the hottest experts (0: 90, 6: 30).
  // Expert 0 reaches every worker (45, 30 per replica), then expert 6 takes the last (15).
  EXPECT_EQ((std::vector<int>{0, 1, 2}), plan.layer(2).expert_workers[0]);
  EXPECT_EQ(2u, plan.layer(2).expert_workers[6].size());
}

TEST(PlacementSerialization, CorruptJsonIsRefusedWithItsProblem) {
  const PlacementPlan plan = sample_plan();
  const json good = json::parse(plan.to_json_text());
  ASSERT_NO_THROW(PlacementPlan::from_json_text(good.dump(), "plans/edited.json"));
  const LayerPlacement& layer = plan.layer(2);
  const json::json_pointer workers("/layers/0/workers");

  json duplicate = good;
  duplicate[workers][1][1] = duplicate[workers][1][0];  // same slot count: only the duplicate is wrong
  expect_plan_json_error(
      duplicate, {"plans/edited.json", "layer 2", "expert " + std::to_string(layer.worker_experts[1][0]),
                  "twice on worker 1", "duplicate"});

  json out_of_range = good;
  out_of_range[workers][2][0] = 10;
  expect_plan_json_error(out_of_range,
                         {"plans/edited.json", "layer 2", "expert 10 on worker 2", "out of range"});
  out_of_range[workers][2][0] = -1;
  expect_plan_json_error(out_of_range, {"layer 2", "expert -1 on worker 2", "out of range"});

  json overflow = good;
  int64_t not_on_worker_0 = 0;
  while (plan.hosts(0, 2, not_on_worker_0) || not_on_worker_0 == 7) ++not_on_worker_0;
  overflow[workers][0].push_back(not_on_worker_0);
  expect_plan_json_error(
      overflow, {"plans/edited.json", "layer 2", "worker 0 hosts 5 experts", "4 slots", "slot overflow"});

  json missing = good;
  int64_t single = 1;
  while (layer.expert_workers[single].size() != 1) ++single;
  const int holder = layer.expert_workers[single][0];
  json& list = missing[workers][holder];
  list.erase(std::find(list.begin(), list.end(), json(single)) - list.begin());
  expect_plan_json_error(missing, {"plans/edited.json", "layer 2", "missing", std::to_string(single)});

  json masked = good;
  masked["/layers/0/masked_experts"_json_pointer].push_back(single);
  expect_plan_json_error(masked, {"layer 2", "expert " + std::to_string(single), "masked"});

  json tag = good;
  tag["format"] = "epic-placement-v0";
  expect_plan_json_error(tag, {"plans/edited.json", "format", "epic-placement-v1"});

  json worker_count = good;
  worker_count["num_workers"] = 4;
  expect_plan_json_error(worker_count, {"layer 2", "4 expert lists"});

  json order = good;
  std::swap(order["layers"][0], order["layers"][1]);
  expect_plan_json_error(order, {"layer 2 follows layer 5", "ascending"});

  json negative = good;
  negative["/layers/1/expert_load/3"_json_pointer] = -1.5;
  expect_plan_json_error(negative, {"layer 5", "expert_load of expert 3", "non-negative"});

  json fraction = good;
  fraction[workers][0][0] = 1.5;
  expect_plan_json_error(fraction, {"layer 2", "worker 0", "integer"});

  json no_workers = good;
  no_workers["layers"][1].erase("workers");
  expect_plan_json_error(no_workers, {"layer 5", "missing field \"workers\""});

  expect_error([] { PlacementPlan::from_json_text("{\"format\": ", "cut.json"); }, kBad,
               {"cut.json", "not valid JSON"});
}

// A hand edit that moves an expert keeps the plan valid; the derived figures follow the edit.
TEST(PlacementSerialization, HandEditedPlanRecomputesDerivedFigures) {
  // 5 uniform experts, 3 workers of 2 slots; the spare slot holds expert 0 twice.
  PlacementRequest request;
  request.num_workers = 3;
  request.slots_per_worker = 2;
  request.layers = {all_present(5, 5)};
  json document = json::parse(plan_placement(request).to_json_text());
  json& workers = document["/layers/0/workers"_json_pointer];
  ASSERT_EQ(json::array({json::array({1, 4}), json::array({0, 2}), json::array({0, 3})}), workers);
  workers[2] = json::array({3});  // drop a replica of expert 0
  const PlacementPlan edited = PlacementPlan::from_json_text(document.dump(), "edited.json");
  EXPECT_EQ((std::vector<int>{1}), edited.layer(5).expert_workers[0]);
  EXPECT_EQ((std::vector<double>{2, 2, 1}), edited.layer(5).worker_load);
}

TEST(PlacementSerialization, CerealBytesRejectWrongVersionTruncationAndJunk) {
  const PlacementPlan plan = sample_plan();
  const std::string bytes = plan.to_cereal_bytes();
  expect_same_plan(plan, PlacementPlan::from_cereal_bytes(bytes));

  // Every truncation is refused (never a crash, never a partial plan).
  for (size_t length = 0; length < bytes.size(); ++length) {
    SCOPED_TRACE("first " + std::to_string(length) + " of " + std::to_string(bytes.size()) + " bytes");
    try {
      PlacementPlan::from_cereal_bytes(bytes.substr(0, length));
      ADD_FAILURE() << "a truncated plan was accepted";
    } catch (const Error& error) {
      EXPECT_NE(std::string::npos, std::string(error.what()).find("placement bytes")) << error.what();
      EXPECT_TRUE(error.code() == ErrorCode::kCommunication || error.code() == kBad) << error.what();
    }
  }
  expect_error([&] { PlacementPlan::from_cereal_bytes(bytes.substr(0, bytes.size() - 3)); },
               ErrorCode::kCommunication, {"placement bytes", "truncated or corrupt"});
  expect_error([&] { PlacementPlan::from_cereal_bytes(bytes + "xyz"); }, ErrorCode::kCommunication,
               {"3 unexpected bytes"});

  std::ostringstream future;
  {
    cereal::PortableBinaryOutputArchive archive(future);
    archive(uint32_t{2}, int32_t{3}, uint64_t{0});
  }
  expect_error([&] { PlacementPlan::from_cereal_bytes(future.str()); }, ErrorCode::kCommunication,
               {"version 2", "reads version 1", "same epic build"});
  expect_error([] { PlacementPlan::from_cereal_bytes("{\"format\": \"epic-placement-v1\"}"); },
               ErrorCode::kCommunication, {"placement bytes", "version"});
}

// Bytes that decode but break a rule are refused like a bad JSON file.
TEST(PlacementSerialization, CerealBytesAreCheckedLikeJson) {
  PlacementPlan plan = sample_plan();
  plan.layers[0].worker_experts[2][1] = plan.layers[0].worker_experts[2][0];
  expect_error([&] { PlacementPlan::from_cereal_bytes(plan.to_cereal_bytes()); }, kBad,
               {"placement bytes", "layer 2", "twice on worker 2"});
}

// Random byte flips: either a valid plan (every rule re-checked) or an epic::Error, nothing else.
TEST(PlacementSerialization, FlippedCerealBytesNeverCrash) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 rng(seed);
  const std::string bytes = sample_plan().to_cereal_bytes();
  int refused = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    std::string corrupt = bytes;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int flip = 0; flip < flips; ++flip)
      corrupt[rng() % corrupt.size()] ^= static_cast<char>(1 + rng() % 255);
    try {
      PlacementPlan::from_cereal_bytes(corrupt);
    } catch (const Error&) {
      ++refused;
    } catch (const std::exception& other) {
      FAIL() << "trial " << trial << ": not an epic::Error: " << other.what();
    }
  }
  EXPECT_GT(refused, 1000);
}

TEST(LoadProfileJson, RoundTripAndFile) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 rng(seed);
  LoadProfile profile;
  profile.load[0] = zipf_counts(128, 1.2, rng);
  profile.load[7] = {0, 1.5, 3, 0};
  profile.load[12] = {};
  const std::string text = profile.to_json_text();
  const json document = json::parse(text);
  EXPECT_EQ("epic-load-profile-v1", document.at("format"));
  EXPECT_EQ(json::array({0, 1.5, 3, 0}), document.at("layers").at("7"));
  EXPECT_EQ(profile.load, LoadProfile::from_json_text(text, "profile.json").load);

  const std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("epic-load-profile-" + std::to_string(seed) + ".json");
  profile.save_file(path);
  const LoadProfile loaded = LoadProfile::load_file(path);
  std::filesystem::remove(path);
  EXPECT_EQ(profile.load, loaded.load);
  expect_error([&] { LoadProfile::load_file(path); }, ErrorCode::kIo, {path.string(), "cannot open"});
}

TEST(LoadProfileJson, BadProfilesNameFileAndProblem) {
  auto expect_profile_error = [](const std::string& text, std::initializer_list<std::string> words) {
    SCOPED_TRACE(text);
    expect_error([&] { LoadProfile::from_json_text(text, "runs/profile.json"); }, kBad, words);
  };
  expect_profile_error(R"({"format": "epic-load-profile-v2", "layers": {}})",
                       {"runs/profile.json", "format"});
  expect_profile_error(R"({"layers": {}})", {"format is missing"});
  expect_profile_error(R"({"format": "epic-load-profile-v1"})", {"\"layers\" must be an object"});
  expect_profile_error(R"({"format": "epic-load-profile-v1", "layers": {"3": [1, -2]}})",
                       {"layer 3", "expert 1", "-2", "non-negative"});
  expect_profile_error(R"({"format": "epic-load-profile-v1", "layers": {"3": [1, "2"]}})",
                       {"layer 3", "expert 1", "not a number"});
  expect_profile_error(R"({"format": "epic-load-profile-v1", "layers": {"3": 5}})", {"layer 3", "array"});
  expect_profile_error(R"({"format": "epic-load-profile-v1", "layers": {"03": [1]}})",
                       {"\"03\"", "layer index"});
  expect_profile_error(R"({"format": "epic-load-profile-v1", "layers": {"-1": [1]}})",
                       {"\"-1\"", "layer index"});
  expect_profile_error(R"({"format": "epic-load-profile-v1", "layers": {"3": [1e999]}})",
                       {"runs/profile.json"});
  expect_profile_error("[1, 2]", {"JSON object"});
  expect_profile_error("{", {"not valid JSON"});
}

}  // namespace
}  // namespace epic
