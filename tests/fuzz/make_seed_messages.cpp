// Writes the seed inputs of the coordinator-side fuzz targets with epic's own writers: placement
// plans (JSON and cereal bytes), load profiles, run plan / worker report messages, and worker protocol frames.
// Usage: make_seed_messages CORPUS_DIR   (tests/fuzz/make_corpus.sh runs it)
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "coordinator/placement.h"
#include "coordinator/worker_protocol.h"
#include "launch/run_wire.h"

namespace {

void write(const std::filesystem::path& path, const std::string& bytes) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << bytes;
}

epic::PlacementRequest request(int num_workers, std::vector<int64_t> experts_per_layer, bool masked,
                               bool profiled) {
  epic::PlacementRequest result;
  result.num_workers = num_workers;
  for (size_t i = 0; i < experts_per_layer.size(); ++i) {
    const int64_t layer = static_cast<int64_t>(2 * i + 1);  // odd layers: as decoder_sparse_step 2
    epic::LayerExperts experts{layer, experts_per_layer[i], std::vector<uint8_t>(experts_per_layer[i], 1)};
    if (masked) experts.present[experts_per_layer[i] / 2] = 0;
    result.layers.push_back(experts);
    if (profiled) {
      std::vector<double> load(experts_per_layer[i]);
      for (size_t e = 0; e < load.size(); ++e) load[e] = experts.present[e] ? double((e * 7919) % 97) : 0.0;
      result.profile.load[layer] = load;
    }
  }
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seed_messages CORPUS_DIR\n");
    return 2;
  }
  const std::filesystem::path corpus = argv[1];
  struct Case {
    const char* name;
    epic::PlacementRequest request;
    std::optional<int64_t> slots;
  };
  std::vector<Case> cases = {
      {"one_worker", request(1, {8}, false, false), std::nullopt},
      {"two_workers_uneven", request(2, {8, 6}, false, false), std::nullopt},
      {"three_workers_masked_replicas", request(3, {8, 8}, true, true), 4},
      {"five_workers_profiled", request(5, {16, 12, 16}, false, true), 5},
  };
  std::vector<std::string> plan_bytes;
  for (Case& c : cases) {
    c.request.slots_per_worker = c.slots;
    const epic::PlacementPlan plan = epic::plan_placement(c.request);
    write(corpus / "placement_plan_json" / (std::string(c.name) + ".json"), plan.to_json_text());
    plan_bytes.push_back(plan.to_cereal_bytes());
    write(corpus / "placement_plan_cereal" / (std::string(c.name) + ".bin"), plan_bytes.back());
    if (!c.request.profile.load.empty())
      write(corpus / "load_profile" / (std::string(c.name) + ".json"), c.request.profile.to_json_text());
  }

  // Run plans and worker reports; the first byte picks the message kind (see run_wire_fuzzer.cpp).
  epic::wire::RunPlan run_plan;
  run_plan.placement = plan_bytes[1];
  for (int i = 0; i < 3; ++i) {
    epic::wire::Sequence sequence;
    sequence.sequence_id = i;
    sequence.worker = i % 2;
    sequence.prompt = {9707, 1879, 151645 - i};
    sequence.max_new_tokens = 4 + i;
    sequence.want_prompt_logits = i == 0;
    sequence.temperature = i == 2 ? 0.7 : 0.0;
    sequence.top_p = 0.9;
    sequence.seed = 3 + i;
    run_plan.sequences.push_back(sequence);
  }
  write(corpus / "run_wire" / "run_plan.bin", std::string(1, '\0') + epic::wire::to_bytes(run_plan));
  epic::wire::WorkerReport report;
  report.rank = 1;
  report.bytes_read = 123456;
  report.experts_hosted = 8;
  report.sequences = 2;
  report.expert_rows = {{1, {3, 0, 5, 1}}, {3, {2, 2, 0, 4}}};
  report.run_seconds = 1.5;
  write(corpus / "run_wire" / "worker_report.bin", std::string(1, '\1') + epic::wire::to_bytes(report));

  // The worker protocol's frames: one of each kind (coordinator/worker_protocol.h).
  namespace wp = epic::worker_protocol;
  wp::Message hello;
  hello.kind = wp::Kind::kHello;
  hello.hello = {wp::kVersion, 1, 2, 4242, "node1", 64, 4096, 151936, "cpu, fp32", 262144};
  write(corpus / "worker_protocol" / "hello.bin", wp::encode(hello));
  wp::Message step;
  step.kind = wp::Kind::kStep;
  step.command.admit.push_back({7, {9707, 1879}, {11, 12}, 32, 0.7, 0.9, 5});
  step.command.cancel = {3, 4};
  write(corpus / "worker_protocol" / "step.bin", wp::encode(step));
  wp::Message done;
  done.kind = wp::Kind::kStepDone;
  done.done.tokens = {{7, 13, false}, {8, -1, true}};
  done.done.live = 1;
  done.done.kv_tokens = 35;
  done.done.expert_rows = {{1, {3, 0, 5, 1}}};
  done.done.rows_per_rank = {6, 3};
  write(corpus / "worker_protocol" / "step_done.bin", wp::encode(done));
  wp::Message error;
  error.kind = wp::Kind::kError;
  error.error = "rank 1: out of memory";
  write(corpus / "worker_protocol" / "error.bin", wp::encode(error));
  wp::Message ping;
  ping.kind = wp::Kind::kPing;
  write(corpus / "worker_protocol" / "ping.bin", wp::encode(ping));
  return 0;
}
