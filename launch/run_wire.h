// What the coordinator sends every worker before a run (the run plan) and what each worker sends
// back after it (its report: statistics only; results stream to rank 0 during the run, see
// worker/generation_loop.h), serialised with cereal. Versioned: a mismatch is an error.
#pragma once

#include <cereal/archives/binary.hpp>
#include <cereal/types/map.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>
#include <cstdint>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "coordinator/checked_binary_archive.h"
#include "kernels/error.h"

namespace epic::wire {

constexpr uint32_t kRunPlanVersion = 2;       // 2: a residency state per sequence
constexpr uint32_t kWorkerReportVersion = 4;  // 2: results stream out during the run; 3: the host name;
                                              // 4: the expert store's report

struct Sequence {
  int64_t sequence_id = 0;
  int32_t worker = 0;
  std::vector<int32_t> prompt;
  int64_t max_new_tokens = 0;
  bool want_prompt_logits = false;
  double temperature = 0, top_p = 1;
  uint64_t seed = 0;
  int64_t top_k = 0;  // experts per token of this sequence's residency state; 0: the run's
  template <class Archive>
  void serialize(Archive& ar) {
    ar(sequence_id, worker, prompt, max_new_tokens, want_prompt_logits, temperature, top_p, seed, top_k);
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

struct WorkerReport {
  uint32_t version = kWorkerReportVersion;
  int32_t rank = 0;
  std::string host;  // the node the rank ran on (gethostname)
  uint64_t bytes_read = 0, resident_bytes = 0;
  uint64_t peak_resident_bytes = 0;  // the process's high-water mark (VmHWM) at the end of the run
  int64_t experts_hosted = 0, sequences = 0, steps = 0, tokens_processed = 0;
  int64_t most_active_sequences = 0;  // the most sequences live at once (bounded by --max-active-sequences)
  double load_seconds = 0, run_seconds = 0;
  double route_seconds = 0, dispatch_seconds = 0, expert_seconds = 0, combine_seconds = 0;
  uint64_t bytes_sent = 0, bytes_received = 0;
  int64_t rows_computed = 0;
  std::map<int64_t, std::vector<int64_t>> expert_rows;  // layer -> rows per expert computed here
  std::string
      expert_store;  // with --expert-budget: the store's report as JSON (expert_store_report); else ""
  template <class Archive>
  void serialize(Archive& ar) {
    ar(version, rank, host, bytes_read, resident_bytes, peak_resident_bytes, experts_hosted, sequences, steps,
       tokens_processed, most_active_sequences, load_seconds, run_seconds, route_seconds, dispatch_seconds,
       expert_seconds, combine_seconds, bytes_sent, bytes_received, rows_computed, expert_rows, expert_store);
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

// Error(kCommunication) when the bytes are not exactly one T of the expected version.
template <typename T>
T from_bytes(const std::string& bytes, uint32_t expected_version, const char* what) {
  T value;
  try {
    CheckedBinaryInputArchive archive(bytes);
    archive(value);
    if (archive.bytes_left() != 0) {
      throw cereal::Exception(std::to_string(archive.bytes_left()) + " unexpected bytes after the message");
    }
    // to_bytes has one encoding per value; any other (a map key twice, whose second entry cereal
    // drops; keys out of order) is corruption, not a message to half-trust.
    if (to_bytes(value) != bytes)
      throw cereal::Exception("the bytes are not the encoding of the values they hold");
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
