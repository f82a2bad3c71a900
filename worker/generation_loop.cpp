// Lockstep prefill + decode over this worker's sequences, a bounded number live at once, results
// streamed to the result root as they finish (see generation_loop.h).
#include "worker/generation_loop.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>

#include "comm/fault_injection.h"
#include "kernels/error.h"
#include "worker/generation_engine.h"
#include "worker/random_values.h"

namespace epic {
namespace {

// What every worker tells every other at the start of a step: sequences it has not finished yet
// (live or waiting), and the bytes of finished results it sends the root in this step.
struct StepStatus {
  int64_t unfinished = 0;
  int64_t result_bytes = 0;
  // The coming step on this rank, for the StepAgreement every rank's runner gets (model_runner.h).
  int64_t rows = 0;            // token rows
  int64_t decode_only = 0;     // 1: decode-only or empty
  uint64_t graph_buckets = 0;  // ModelRunner::current_graph_buckets
  // The fewest and most experts per token among the step's rows (0: no rows): StepAgreement::top_k.
  int64_t fewest_top_k = 0, most_top_k = 0;
};

// Results on the wire: per result its id, then the ids and the logits, each count first.
template <typename T>
void append_array(std::vector<char>& bytes, const std::vector<T>& values) {
  const int64_t count = static_cast<int64_t>(values.size());
  const size_t at = bytes.size();
  bytes.resize(at + sizeof(count) + values.size() * sizeof(T));
  std::memcpy(bytes.data() + at, &count, sizeof(count));
  if (!values.empty())
    std::memcpy(bytes.data() + at + sizeof(count), values.data(), values.size() * sizeof(T));
}

void pack_result(const SequenceResult& result, std::vector<char>& bytes) {
  append_array(bytes, std::vector<int64_t>{result.sequence_id});
  append_array(bytes, result.new_ids);
  append_array(bytes, result.prompt_logits);
}

class ResultReader {
 public:
  ResultReader(const char* data, size_t size, int from_rank)
      : data_(data), size_(size), from_rank_(from_rank) {}
  bool at_end() const { return at_ == size_; }
  SequenceResult next() {
    SequenceResult result;
    std::vector<int64_t> id;
    read_array(id);
    if (id.size() != 1) corrupt();
    result.sequence_id = id[0];
    read_array(result.new_ids);
    read_array(result.prompt_logits);
    return result;
  }

 private:
  template <typename T>
  void read_array(std::vector<T>& values) {
    int64_t count = 0;
    if (size_ - at_ < sizeof(count)) corrupt();
    std::memcpy(&count, data_ + at_, sizeof(count));
    at_ += sizeof(count);
    if (count < 0 || static_cast<uint64_t>(count) > (size_ - at_) / sizeof(T)) corrupt();
    values.resize(static_cast<size_t>(count));
    if (count > 0) std::memcpy(values.data(), data_ + at_, values.size() * sizeof(T));
    at_ += values.size() * sizeof(T);
  }
  [[noreturn]] void corrupt() const {
    throw Error(ErrorCode::kCommunication, "corrupt finished-sequence message from rank " +
                                               std::to_string(from_rank_) + " at byte " +
                                               std::to_string(at_) + " of " + std::to_string(size_) +
                                               "; every rank must run the same epic build");
  }
  const char* data_;
  size_t size_;
  int from_rank_;
  size_t at_ = 0;
};

// This rank's part of the step agreement.
StepStatus status_of(const PlannedStep& plan, uint64_t graph_buckets) {
  StepStatus mine;
  mine.unfinished = plan.unfinished;
  mine.rows = plan.rows;
  mine.decode_only = plan.decode_only ? 1 : 0;
  mine.fewest_top_k = plan.fewest_top_k;
  mine.most_top_k = plan.most_top_k;
  mine.graph_buckets = graph_buckets;
  return mine;
}

// Every rank's status folded into the step's agreed shape.
StepAgreement fold_agreement(const std::vector<StepStatus>& all) {
  StepAgreement agreement{0, true, ~uint64_t{0}, {}};
  int64_t fewest_top_k = 0;
  for (const StepStatus& status : all) {
    agreement.max_rows = std::max(agreement.max_rows, status.rows);
    agreement.every_rank_decode = agreement.every_rank_decode && status.decode_only != 0;
    agreement.common_graph_buckets &= status.graph_buckets;
    agreement.top_k.top_k = std::max(agreement.top_k.top_k, status.most_top_k);
    if (status.fewest_top_k > 0)
      fewest_top_k = fewest_top_k == 0 ? status.fewest_top_k : std::min(fewest_top_k, status.fewest_top_k);
  }
  agreement.top_k.mixed = fewest_top_k > 0 && fewest_top_k < agreement.top_k.top_k;
  return agreement;
}

// One collective per step, on every rank: agrees on the work left and moves the results finished
// in the last step to the root (a gather: every other rank sends only to the root, the root to
// nobody). Returns the sequences unfinished on all workers together.
// Also agrees on the coming step's shape (`mine`: this rank's part; its result_bytes is filled here).
int64_t agree_and_deliver(Communicator& comm, int root, StepStatus mine,
                          std::vector<SequenceResult>& finished, const ResultSink& sink,
                          StepAgreement& agreement) {
  const bool is_root = comm.rank() == root;
  std::vector<char> packed;
  if (!is_root)
    for (const SequenceResult& result : finished) pack_result(result, packed);
  mine.result_bytes = static_cast<int64_t>(packed.size());
  const std::vector<StepStatus> all = comm.all_gather_value(mine);
  int64_t total_unfinished = 0, total_bytes = 0;
  for (const StepStatus& status : all) {
    total_unfinished += status.unfinished;
    total_bytes += status.result_bytes;
  }
  agreement = fold_agreement(all);
  if (is_root) {
    for (SequenceResult& result : finished) sink(std::move(result));
  }
  finished.clear();
  if (total_bytes == 0) return total_unfinished;  // nothing finished off the root: skip the exchange

  const int num_ranks = comm.size();
  std::vector<int64_t> send_bytes(num_ranks, 0), send_offsets(num_ranks, 0);
  std::vector<int64_t> recv_bytes(num_ranks, 0), recv_offsets(num_ranks, 0);
  send_bytes[root] = static_cast<int64_t>(packed.size());
  int64_t received_total = 0;
  if (is_root) {
    for (int rank = 0; rank < num_ranks; ++rank) {
      recv_offsets[rank] = received_total;
      recv_bytes[rank] = all[rank].result_bytes;
      received_total += all[rank].result_bytes;
    }
  }
  std::vector<char> received(static_cast<size_t>(received_total));
  comm.all_to_all_v(packed.data(), send_bytes, send_offsets, received.data(), recv_bytes, recv_offsets);
  packed = {};
  if (is_root) {
    for (int rank = 0; rank < num_ranks; ++rank) {
      ResultReader reader(received.data() + recv_offsets[rank], static_cast<size_t>(recv_bytes[rank]), rank);
      while (!reader.at_end()) sink(reader.next());
    }
  }
  return total_unfinished;
}

}  // namespace

StepAgreement agree_on_step(Communicator& comm, const PlannedStep& plan, uint64_t graph_buckets,
                            int64_t& unfinished_everywhere) {
  const std::vector<StepStatus> all = comm.all_gather_value(status_of(plan, graph_buckets));
  unfinished_everywhere = 0;
  for (const StepStatus& status : all) unfinished_everywhere += status.unfinished;
  return fold_agreement(all);
}

uint64_t sequence_seed(uint64_t seed, int64_t sequence_id) {
  return splitmix64(seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(sequence_id));
}

GenerationStats run_generation(ModelRunner& runner, std::span<const SequenceRequest> sequences,
                               Communicator& comm, const GenerationOptions& options, const ResultSink& sink) {
  EPIC_CHECK(options.result_root >= 0 && options.result_root < comm.size(), ErrorCode::kInvalidArgument,
             "result root " + std::to_string(options.result_root) + " is not a rank of this " +
                 std::to_string(comm.size()) + "-rank job");
  GenerationEngine engine(runner, options.max_active_sequences, options.prefill_chunk_tokens);
  for (const SequenceRequest& sequence : sequences) engine.admit(sequence);

  std::vector<SequenceResult> finished;  // in the last step, not yet at the root
  while (true) {
    // The coming step, known before it is built, agreed with every other rank.
    StepAgreement agreement;
    if (agree_and_deliver(comm, options.result_root, status_of(engine.next_step(), runner.current_graph_buckets()),
                          finished, sink, agreement) == 0)
      break;
    // An error raised here, or anywhere in the step, on this rank alone ends the job from where it is
    // caught (epic run: one message, then MPI_Abort): the peers are not told through another collective.
    const bool poison = inject_test_step_fault(comm.rank(), engine.stats().steps + 1);
    // Several ranks: the agreed step shape (the MoE exchange and decode graphs must match on every rank).
    for (SequenceStepEvent& event : engine.step(comm.size() > 1 ? &agreement : nullptr, poison))
      if (event.finished) finished.push_back(std::move(*event.finished));
  }
  return engine.stats();
}

std::vector<SequenceResult> run_generation(ModelRunner& runner, const std::vector<SequenceRequest>& sequences,
                                           Communicator& comm, GenerationStats* stats) {
  std::map<int64_t, SequenceResult> by_id;
  const GenerationStats local_stats =
      run_generation(runner, sequences, comm, GenerationOptions{},
                     [&](SequenceResult&& result) { by_id[result.sequence_id] = std::move(result); });
  if (stats) *stats = local_stats;
  std::vector<SequenceResult> results;
  for (auto& [id, result] : by_id) results.push_back(std::move(result));
  return results;
}

}  // namespace epic
