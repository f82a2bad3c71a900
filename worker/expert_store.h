// A worker's hosted experts with only a budget of them in backend memory: per MoE layer, slot tensors
// that the expert FFN computes with, and a lower tier (pinned host memory, or the checkpoint on disk)
// that a miss is copied from, under an ExpertResidencySet's eviction policy. Synchronous for now.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "kernels/backend.h"
#include "worker/expert_residency_policy.h"
#include "worker/host_expert_cache.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/weight_source.h"

namespace epic {

// Where the experts that are not resident live.
// kHost: every hosted expert's bytes in host memory, already in the backend's layout and weight type
//   (pinned on cuda, so a miss is one asynchronous copy per tensor); costs the hosted experts' size
//   in host memory, read once at construction.
// kDisk: nothing kept; a miss reads the expert's three tensors from the WeightSource by offset and
//   converts them (the loader's load_tensors, through a small pinned staging buffer), or, with a host
//   budget, a pinned cache of that many experts per layer sits between (worker/host_expert_cache.h):
//   a miss it holds is one copy, one it does not is read into it first.
enum class ExpertTier { kHost, kDisk };

// "host", "disk"; anything else throws Error(kInvalidArgument) listing them.
ExpertTier parse_expert_tier(std::string_view text);
std::string_view expert_tier_name(ExpertTier tier);

struct ExpertStoreOptions {
  ExpertTier tier = ExpertTier::kHost;
  // Slots of every MoE layer (split_residency_budget makes one); a layer's slots are capped at the
  // experts it hosts. Every MoE layer needs an entry, and only MoE layers may have one.
  ResidencyBudget budget;
  // Disk tier only: the pinned host cache's experts per MoE layer (capped at the layer's hosted experts;
  // each layer's at least its slots, so one step's experts fit). Empty: no cache.
  ResidencyBudget host_budget;
  EvictionPolicy policy = EvictionPolicy::kLru;
  double usefulness_decay = 0.9;  // see ExpertResidencySet
  // As LoadOptions: which experts this worker hosts (every present one when empty), the weight type
  // (unset: the source's, as load_model_weights keeps it), the missing and non-finite policies.
  std::function<bool(int64_t layer, int64_t expert_id)> hosts_expert;
  std::optional<ScalarType> weight_type;
  bool allow_missing_experts = false;
  bool allow_nonfinite_weights = false;
  int reader_threads = 0;  // the loader's threads; <= 0: its default
  // Disk tier: experts read and converted per batch, the size of the pinned staging buffer.
  int64_t staging_experts = 4;
  // admit_in_background: at most this many of a layer's experts per call, the most wanted first (0: all).
  // When the bus is the limit (--on-miss read), every admitted expert crosses it twice in its step (read in
  // place, then copied into a slot); admitting fewer keeps the copies to the experts that stay wanted.
  int64_t admit_per_layer = 0;
};

// What one ensure_resident or prefetch did.
struct ExpertLoadReport {
  int64_t hits = 0;                // distinct experts asked for that were resident already
  int64_t misses = 0;              // distinct experts copied into a slot
  int64_t evictions = 0;           // residents pushed out to make room
  int64_t skipped = 0;             // prefetch only: experts left out for lack of an unpinned slot
  std::vector<int64_t> loaded;     // the experts copied in, in the order asked
  std::vector<int64_t> evicted;    // the experts that made room, in eviction order
  uint64_t bytes_from_host = 0;    // bytes written into slots from the host tier (misses x expert_bytes)
  uint64_t bytes_from_disk = 0;    // bytes written into slots from the disk tier (misses x expert_bytes)
  uint64_t source_bytes_read = 0;  // disk tier: stored bytes read from the WeightSource
  // Disk tier with a host cache: of the misses, those the cache held (their bytes count as from host)
  // and those read into it from disk first; the cache's experts that made room.
  int64_t host_cache_hits = 0, host_cache_misses = 0, host_cache_evictions = 0;
  double seconds = 0;  // wall time of the call, copies finished
};

struct ExpertStoreStats {
  int64_t hits = 0, misses = 0, evictions = 0;  // ensure_resident and prefetch together
  int64_t prefetch_loads = 0;                   // of the misses, those loaded by prefetch
  uint64_t bytes_from_host = 0, bytes_from_disk = 0, source_bytes_read = 0;
  int64_t host_cache_hits = 0, host_cache_misses = 0, host_cache_evictions = 0;  // see ExpertLoadReport
  double stall_seconds = 0;      // wall time inside ensure_resident
  double prefetch_seconds = 0;   // wall time inside prefetch
  uint64_t resident_bytes = 0;   // backend bytes of the slot tensors (measured from their buffers)
  uint64_t host_tier_bytes = 0;  // host bytes of the host tier or the disk tier's cache (measured)
};

// The order prefetch and admit_in_background take, most wanted first: the experts of `wanted` (expert
// -> how much the step wanted it: the routing weight or the rows its misses had) by that amount,
// descending, ties to the lower expert id.
std::vector<int64_t> most_wanted_first(const std::map<int64_t, double>& wanted);

// Not thread-safe; one per worker, used on the thread that drives its backend. The source must
// outlive a disk-tier store.
class ExpertStore {
 public:
  // Throws what inspect_experts throws; Error(kInvalidArgument) for a budget that misses a MoE layer,
  // names a layer that is not one, or is negative; what load_tensors throws for a host tier it cannot
  // read, and Error(kInvalidCheckpoint) for a disk-tier expert tensor of the wrong shape or dtype.
  ExpertStore(const ModelConfig& config, WeightSource& source, Backend& backend, ExpertStoreOptions options);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  // Makes every expert of experts_needed (duplicates count once) resident in `layer`'s slots before it
  // returns: pins them (no admission evicts them until the next ensure_resident of this layer or
  // unpin_all, so a prefetch cannot take them away), admits the missing ones, evicting by the policy,
  // copies their bytes from the lower tier, and uploads the layer's local_index once. More distinct
  // experts than the layer has slots is Error(kInvalidArgument) naming the layer, the count and the
  // budget, with nothing changed: the caller then splits the step's rows into groups that fit (each
  // ensure_resident + expert FFN in turn) or substitutes (substitute_missing_picks). Also
  // Error(kInvalidArgument) for a layer that is not MoE, an expert id outside the layer, an expert this
  // worker does not host, or a step before the latest one seen. Synchronous: the copies have finished when it
  // returns (on cuda it synchronises the backend's stream, waiting for the ops enqueued before too).
  ExpertLoadReport ensure_resident(int64_t layer, const std::vector<int64_t>& experts_needed, int64_t step);

  // Loads experts ahead of need, in the order given (most wanted first), into slots that are free or
  // hold an unpinned expert not in the list; those that find none are skipped (a hint, not an order:
  // no count error). Pins nothing. The same errors as ensure_resident otherwise. Synchronous for now,
  // like ensure_resident; it is meant to run on the copy stream while another layer computes.
  ExpertLoadReport prefetch(int64_t layer, const std::vector<int64_t>& experts, int64_t step);

  // One router pick of a hosted expert with its routing weight: the policy's recency, count and
  // usefulness (ExpertResidencySet::record_use).
  void record_use(int64_t layer, int64_t expert_id, float routing_weight, int64_t step);
  // `uses` picks of one expert in one step, their weights summed (ExpertResidencySet::record_uses).
  void record_uses(int64_t layer, int64_t expert_id, int64_t uses, double weight_sum, int64_t step);

  // Releases every pin (end of a step).
  void unpin_all();

  // ---- Reading experts in place (host tier) ----------------------------------------------------
  // With the host tier every MoE layer also has an address table (Backend::expert_ffn_addressed):
  // I64 [num_experts, 2] on the backend, for each hosted expert the addresses of its gate_up and down in
  // its slot when resident, else in the host tier (pinned host memory the backend's kernels read over
  // the bus, in place); 0 for an expert not hosted. Every call above keeps it true. An expert FFN over
  // the table computes any hosted expert, resident or not, with no host synchronisation: a miss costs
  // its bytes read over the bus instead of a stall. Error(kUnsupported) for the disk tier (nothing the
  // backend can read in place).
  bool reads_in_place() const { return tier_ == ExpertTier::kHost; }
  const Tensor& address_table(int64_t layer) const;

  // Admits, per layer, the experts given (most wanted first) as prefetch does, but copies them on the
  // backend's side queue (Backend::enqueue_side_copies), beside the steps enqueued after it: an evicted
  // expert's table entry goes back to its host-tier address on the stream first (so no later op reads
  // the slot it leaves), and an admitted expert's entry points at its slot only once its bytes are
  // there. Until then ops read it in place, so the output never depends on when the copies finish. Waits
  // for the previous call's copies before it starts (so at most one batch is in flight). The report's
  // seconds are the host's time in the call, not the copies'. Host tier only (Error(kUnsupported)); the
  // errors of prefetch otherwise.
  ExpertLoadReport admit_in_background(const std::map<int64_t, std::vector<int64_t>>& experts_by_layer,
                                       int64_t step);

  // The layer's experts as run_experts / Backend::expert_ffn read them: gate_up [slots, 2I, H] and
  // down [slots, H, I] are the slot tensors, local_index I32 [num_experts] maps an expert to its slot
  // or -1 when it is not resident; num_experts, present and hosted (this worker's experts, resident
  // or not) are as load_model_weights gives them. Slots are not in `hosted` order: local_index is the
  // only map. router and present_mask are empty (route with the model's weights). An expert that is
  // not resident must get no rows: the CPU expert_ffn refuses such rows, the cuda one leaves them
  // unwritten, so call ensure_resident for the experts a group of rows uses first.
  const MoeLayerWeights& layer_weights(int64_t layer) const;

  bool is_moe_layer(int64_t layer) const;
  bool resident(int64_t layer, int64_t expert_id) const;  // and its bytes in the slot
  // Disk tier with a host budget: whether the host cache holds the expert's bytes (false without one).
  bool host_cached(int64_t layer, int64_t expert_id) const;
  bool has_host_cache() const { return host_cache_ != nullptr; }
  int64_t host_cache_capacity(int64_t layer) const;  // 0 without a cache
  // The expert's usefulness score as the policies see it at the latest step (ExpertResidencySet).
  double usefulness(int64_t layer, int64_t expert_id) const;
  std::vector<int64_t> resident_experts(int64_t layer) const;  // ascending
  int64_t capacity(int64_t layer) const;                       // slots
  ScalarType weight_type() const { return weight_type_; }
  ExpertTier tier() const { return tier_; }
  // One expert's bytes in the weight type: its gate_up [2I, H], its down [H, I], and both.
  size_t gate_up_bytes() const { return gate_up_bytes_; }
  size_t down_bytes() const { return down_bytes_; }
  uint64_t expert_bytes() const { return gate_up_bytes_ + down_bytes_; }
  ExpertStoreStats stats() const;
  const ExpertResidencySet& residency() const { return *residency_; }

 private:
  struct Layer;
  struct CopyJob {
    int64_t expert_id;
    int64_t slot;
  };

  Layer& layer_state(int64_t layer, const char* operation);
  const Layer& layer_state(int64_t layer, const char* operation) const;
  // The distinct experts of `experts` in first-seen order, each checked to be hosted.
  std::vector<int64_t> distinct_hosted(const Layer& state, int64_t layer, const std::vector<int64_t>& experts,
                                       const char* operation) const;
  void check_step(int64_t step, const char* operation) const;
  // The ExpertResidencySet's pins set to pinned_by_layer_ (plus `extra` of `extra_layer`).
  void apply_pins(int64_t extra_layer, const std::vector<int64_t>& extra);
  // Admits `expert_id` (pinned already) and gives it a slot; false when the residency set refused it.
  bool admit(Layer& state, int64_t layer, int64_t expert_id, int64_t step, ExpertLoadReport& report,
             std::vector<CopyJob>& jobs);
  // Copies the jobs' bytes into their slots, publishes them in local_index and waits for the copies.
  void copy_in(Layer& state, int64_t layer, const std::vector<CopyJob>& jobs, ExpertLoadReport& report);
  void copy_from_disk(Layer& state, int64_t layer, const std::vector<CopyJob>& jobs,
                      ExpertLoadReport& report);
  void copy_through_host_cache(Layer& state, int64_t layer, const std::vector<CopyJob>& jobs,
                               ExpertLoadReport& report);
  // The address table's host mirror entries of an expert: its host-tier bytes, or its slot's.
  void point_at_host_tier(Layer& state, int64_t expert_id) const;
  void point_at_slot(Layer& state, int64_t expert_id, int64_t slot) const;
  // Admits `experts` (distinct, hosted) of `layer` as prefetch does (pinned while admitted; a refusal
  // is counted as skipped) and returns the copies it needs.
  std::vector<CopyJob> admit_list(Layer& state, int64_t layer, const std::vector<int64_t>& experts,
                                  int64_t step, ExpertLoadReport& report);
  // Folds one ensure_resident's or prefetch's report into stats_: its seconds count as stall time, or
  // as prefetch time and its misses as prefetch loads.
  void add_to_stats(const ExpertLoadReport& report, bool prefetch);

  ModelConfig config_;  // a copy: the caller's may go
  WeightSource& source_;
  Backend& backend_;
  ExpertTier tier_;
  ScalarType weight_type_;
  size_t gate_up_bytes_ = 0, down_bytes_ = 0;  // set with weight_type_, before anything uses them
  bool allow_nonfinite_weights_;
  int reader_threads_;
  int64_t staging_experts_;
  int64_t admit_per_layer_;  // ExpertStoreOptions::admit_per_layer
  std::map<int64_t, std::unique_ptr<Layer>> layers_;
  std::unique_ptr<ExpertResidencySet> residency_;
  std::map<int64_t, std::vector<int64_t>> pinned_by_layer_;  // the last ensure_resident's experts
  std::unique_ptr<Buffer> disk_staging_;                     // pinned, staging_experts experts
  std::unique_ptr<HostExpertCache> host_cache_;              // disk tier with a host budget
  int64_t latest_step_ = 0;
  ExpertStoreStats stats_;
};

}  // namespace epic
