// What the coordinator sends every worker before a run (the run plan) and what each worker sends
// back after it (its results and report), serialised with cereal. Versioned: a mismatch is an error.
#pragma once

#include <cereal/archives/binary.hpp>
#include <cereal/types/map.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>
#include <cstdint>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/error.h"

namespace epic::wire {

constexpr uint32_t kRunPlanVersion = 1;
constexpr uint32_t kWorkerReportVersion = 1;

struct Sequence {
  int64_t sequence_id = 0;
  int32_t worker = 0;
  std::vector<int32_t> prompt;
  int64_t max_new_tokens = 0;
  bool want_prompt_logits = false;
  double temperature = 0, top_p = 1;
  uint64_t seed = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(sequence_id, worker, prompt, max_new_tokens, want_prompt_logits, temperature, top_p, seed);
  }
};

struct RunPlan {
  uint32_t version = kRunPlanVersion;
  std::string placement;  // PlacementPlan::to_cereal_bytes()
  std::vector<Sequence> sequences;
  bool allow_missing_experts = false;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(version, placement, sequences, allow_missing_experts);
  }
};

struct Result {
  int64_t sequence_id = 0;
  std::vector<int32_t> new_ids;
  std::vector<float> prompt_logits;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(sequence_id, new_ids, prompt_logits);
  }
};

struct WorkerReport {
  uint32_t version = kWorkerReportVersion;
  int32_t rank = 0;
  uint64_t bytes_read = 0, resident_bytes = 0;
  int64_t experts_hosted = 0, sequences = 0, steps = 0, tokens_processed = 0;
  double load_seconds = 0, run_seconds = 0;
  double route_seconds = 0, dispatch_seconds = 0, expert_seconds = 0, combine_seconds = 0;
  uint64_t bytes_sent = 0, bytes_received = 0;
  int64_t rows_computed = 0;
  std::map<int64_t, std::vector<int64_t>> expert_rows;  // layer -> rows per expert computed here
  std::vector<Result> results;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(version, rank, bytes_read, resident_bytes, experts_hosted, sequences, steps, tokens_processed,
       load_seconds, run_seconds, route_seconds, dispatch_seconds, expert_seconds, combine_seconds,
       bytes_sent, bytes_received, rows_computed, expert_rows, results);
  }
};

template <typename T>
std::string to_bytes(const T& value) {
  std::ostringstream out;
  {
    cereal::BinaryOutputArchive archive(out);
    archive(value);
  }
  return out.str();
}

// Error(kCommunication) when the bytes are not a T of the expected version.
template <typename T>
T from_bytes(const std::string& bytes, uint32_t expected_version, const char* what) {
  T value;
  try {
    std::istringstream in(bytes);
    cereal::BinaryInputArchive archive(in);
    archive(value);
  } catch (const std::exception& e) {
    throw Error(ErrorCode::kCommunication, std::string("corrupt ") + what + " message (" + e.what() + ")");
  }
  if (value.version != expected_version)
    throw Error(ErrorCode::kCommunication,
                std::string(what) + " message has version " + std::to_string(value.version) + ", expected " +
                    std::to_string(expected_version) + "; every rank must run the same epic build");
  return value;
}

}  // namespace epic::wire
