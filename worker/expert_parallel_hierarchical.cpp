// ExpertParallelMoeExecutor's hierarchical scheme (expert_parallel_moe.h), DeepEP's internode idea on
// the host exchange. A token crosses the slow link between nodes once per node that hosts one of its
// experts, however many of its top-k experts live there:
//   1. across: each rank sends a token once to a gateway rank of every node its slots go to (the
//      gateway with the sender's local index; its own node's gateway is itself), with the destination
//      rank, expert and weight of each slot (-1 for slots that go to other nodes);
//   2. inside: each gateway sends every record it received once to each rank of its node that hosts
//      one of its slots, with those slots' experts and weights;
//   3. each rank runs its experts over the rows and sums each record's weighted outputs in slot order
//      (slots not here add an exact zero) into one partial row, sent back to the gateway;
//   4. the gateway sums a record's partials in rank order (one row per node), sent back across;
//   5. the sender sums the node rows in node order.
// So a token's output is the same sum of weighted expert outputs as the flat scheme, grouped by rank
// and node: equal up to the order of the additions (bitwise equal when all its slots share a rank).
// The partial sums are rounded to the activation type.
#include <algorithm>
#include <bit>
#include <chrono>
#include <cstring>

#include "kernels/error.h"
#include "worker/expert_parallel_moe.h"
#include "worker/host_exchange_util.h"
#include "worker/moe_block.h"

namespace epic {
namespace {

using host_exchange::download;
using host_exchange::seconds_since;

// The executor's own scratch slots (its Workspace, apart from the caller's).
enum HierarchicalSlot : int {
  kSendIndex,
  kSendRows,
  kInsideRows,
  kExpertSource,
  kExpertRows,
  kExpertIds,
  kExpertSorted,
  kExpertOut,
  kPositions,
  kWeights,
  kPartial,
  kSummands,
  kNodeSum,
  kNumHierarchicalSlots,
};
static_assert(kNumHierarchicalSlots <= 16, "the executor's scratch Workspace has 16 slots");

int32_t weight_bits(float weight) { return std::bit_cast<int32_t>(weight); }
float weight_of(int32_t bits) { return std::bit_cast<float>(bits); }

// Per-rank blocks of fixed-size records: the counts and offsets of one all-to-all in elements.
struct Blocks {
  std::vector<int64_t> counts;   // records per rank
  std::vector<int64_t> offsets;  // first record of each rank, plus the total at the end
  explicit Blocks(const std::vector<int64_t>& per_rank) : counts(per_rank), offsets(per_rank.size() + 1, 0) {
    for (size_t r = 0; r < per_rank.size(); ++r) offsets[r + 1] = offsets[r] + per_rank[r];
  }
  int64_t total() const { return offsets.back(); }
  std::vector<int64_t> scaled(int64_t unit) const {
    std::vector<int64_t> out(counts.size());
    for (size_t r = 0; r < counts.size(); ++r) out[r] = counts[r] * unit;
    return out;
  }
  std::vector<int64_t> scaled_offsets(int64_t unit) const {
    std::vector<int64_t> out(counts.size());
    for (size_t r = 0; r < counts.size(); ++r) out[r] = offsets[r] * unit;
    return out;
  }
};

}  // namespace

void ExpertParallelMoeExecutor::forward_hierarchical(int64_t layer, const Tensor& hidden,
                                                     const Tensor& router_input, const Tensor& out,
                                                     Workspace& workspace) {
  using clock = std::chrono::steady_clock;
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  const NodeTopology& topology = options_.topology;
  const int64_t hidden_size = config_.hidden_size, top_k = routed_top_k(config_);
  const int64_t num_tokens = hidden.dim(0), num_slots = num_tokens * top_k;
  const ScalarType act = hidden.type;
  const int64_t row_bytes = hidden_size * static_cast<int64_t>(scalar_size(act));
  const int num_ranks = comm_.size(), rank = comm_.rank(), my_node = topology.node_of(rank);
  const int num_nodes = topology.num_nodes();
  const std::vector<int>& node_ranks = topology.ranks_of(my_node);
  const int node_size = static_cast<int>(node_ranks.size());
  const uint64_t sent_before = comm_.bytes_sent(), received_before = comm_.bytes_received();
  const std::string what = "MoE layer " + std::to_string(layer);
  ++stats_.calls;
  uint64_t inter_node_bytes = 0;
  auto count_across = [&](const std::vector<int64_t>& bytes_per_rank) {
    for (int r = 0; r < num_ranks; ++r)
      if (!topology.same_node(r, rank)) inter_node_bytes += static_cast<uint64_t>(bytes_per_rank[r]);
  };

  // ---- Route; each slot's worker as the flat scheme picks it. ------------------------------------
  auto start = clock::now();
  const RoutedTokens routed = route_tokens(backend_, config_, moe, routable_mask(layer, moe),
                                           routed_top_k(config_), router_input, workspace, step_row_top_k());
  const std::vector<int32_t> expert_ids = download<int32_t>(backend_, routed.expert_ids);
  const std::vector<float> route_weights = download<float>(backend_, routed.weights);
  std::vector<int> destination(num_slots);
  {
    std::vector<uint64_t> occurrences(moe.num_experts, 0);
    for (int64_t slot = 0; slot < num_slots; ++slot) {
      const int64_t expert = expert_ids[slot];
      destination[slot] =
          table_.worker_for_sender(layer, expert, occurrences[expert]++ + static_cast<uint64_t>(rank), rank);
    }
  }
  stats_.rows_sent += num_slots;

  // ---- 1. Across: a record per (token, destination node) to that node's gateway. -----------------
  // Record: [token, then per slot: destination rank (-1: another node), expert, weight bits].
  const int64_t across_ints = 1 + 3 * top_k;
  std::vector<int64_t> across_records(num_ranks, 0);
  std::vector<std::vector<int32_t>> to_gateway(num_ranks);
  std::vector<std::vector<int32_t>> token_of_record(num_ranks);  // which token each record carries
  for (int node = 0; node < num_nodes; ++node) {
    const int gateway = node == my_node ? rank : topology.gateway(node, rank);
    for (int64_t token = 0; token < num_tokens; ++token) {
      bool goes_there = false;
      for (int64_t k = 0; k < top_k; ++k)
        goes_there |= topology.node_of(destination[token * top_k + k]) == node;
      if (!goes_there) continue;
      std::vector<int32_t>& record = to_gateway[gateway];
      record.push_back(static_cast<int32_t>(token));
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t slot = token * top_k + k;
        const bool here = topology.node_of(destination[slot]) == node;
        record.push_back(here ? destination[slot] : -1);
        record.push_back(expert_ids[slot]);
        record.push_back(weight_bits(route_weights[slot]));
      }
      token_of_record[gateway].push_back(static_cast<int32_t>(token));
      ++across_records[gateway];
    }
  }
  const Blocks across(across_records);
  std::vector<int32_t> across_meta, across_source_row;
  for (int r = 0; r < num_ranks; ++r) {
    across_meta.insert(across_meta.end(), to_gateway[r].begin(), to_gateway[r].end());
    across_source_row.insert(across_source_row.end(), token_of_record[r].begin(), token_of_record[r].end());
  }
  // The rows to send, gathered on the backend in send order and brought to the host.
  std::vector<char> across_rows(static_cast<size_t>(across.total() * row_bytes));
  if (across.total() > 0) {
    const Tensor index = scratch_.get(kSendIndex, ScalarType::kI32, {across.total()});
    backend_.copy_from_host(index, 0, across_source_row.data(), index.bytes());
    const Tensor rows = scratch_.get(kSendRows, act, {across.total(), hidden_size});
    backend_.gather_rows(hidden, index, rows);
    backend_.copy_to_host(rows, 0, across_rows.data(), across_rows.size());
  }
  stats_.route_seconds += seconds_since(start);

  start = clock::now();
  std::vector<int64_t> gateway_records_per_rank;
  std::vector<int32_t> gateway_meta;
  std::vector<char> gateway_rows;
  {
    const Communicator::Activity activity(comm_, what + " dispatch across nodes");
    std::vector<int64_t> meta_counts = across.scaled(across_ints), meta_received;
    gateway_meta =
        comm_.all_to_all_v<int32_t>(std::span<const int32_t>(across_meta), meta_counts, &meta_received);
    gateway_records_per_rank.resize(num_ranks);
    for (int r = 0; r < num_ranks; ++r) gateway_records_per_rank[r] = meta_received[r] / across_ints;
    const Blocks received(gateway_records_per_rank);
    gateway_rows.resize(static_cast<size_t>(received.total() * row_bytes));
    comm_.all_to_all_v(across_rows.data(), across.scaled(row_bytes), across.scaled_offsets(row_bytes),
                       gateway_rows.data(), received.scaled(row_bytes), received.scaled_offsets(row_bytes));
    std::vector<int64_t> meta_bytes = across.scaled(across_ints * 4);
    count_across(meta_bytes);
    count_across(across.scaled(row_bytes));
  }
  const Blocks at_gateway(gateway_records_per_rank);

  // ---- 2. Inside: each gateway record once to every rank of this node that hosts one of its slots. --
  // Record: [gateway record index, then per slot: expert (-1: not on that rank), weight bits].
  const int64_t inside_ints = 1 + 2 * top_k;
  std::vector<int64_t> inside_records(num_ranks, 0);
  std::vector<int32_t> inside_meta;
  std::vector<char> inside_rows;
  for (int target : node_ranks) {
    for (int64_t record = 0; record < at_gateway.total(); ++record) {
      const int32_t* meta = gateway_meta.data() + record * across_ints;
      bool goes_there = false;
      for (int64_t k = 0; k < top_k; ++k) goes_there |= meta[1 + 3 * k] == target;
      if (!goes_there) continue;
      inside_meta.push_back(static_cast<int32_t>(record));
      for (int64_t k = 0; k < top_k; ++k) {
        const bool here = meta[1 + 3 * k] == target;
        inside_meta.push_back(here ? meta[2 + 3 * k] : -1);
        inside_meta.push_back(here ? meta[3 + 3 * k] : weight_bits(0.0f));
      }
      const char* row = gateway_rows.data() + record * row_bytes;
      inside_rows.insert(inside_rows.end(), row, row + row_bytes);
      ++inside_records[target];
    }
  }
  for (int64_t record = 0; record < at_gateway.total(); ++record) {
    const int32_t* meta = gateway_meta.data() + record * across_ints;
    for (int64_t k = 0; k < top_k; ++k) {
      const int32_t target = meta[1 + 3 * k];
      if (target >= 0 && topology.node_of(target) != my_node)
        throw Error(ErrorCode::kInternal, "rank " + std::to_string(rank) + ": a record for rank " +
                                              std::to_string(target) +
                                              " reached the gateway of another node");
    }
  }
  const Blocks inside(inside_records);
  std::vector<int64_t> worker_records_per_rank(num_ranks);
  std::vector<int32_t> worker_meta;
  std::vector<char> worker_rows;
  {
    const Communicator::Activity activity(comm_, what + " dispatch inside the node");
    std::vector<int64_t> meta_received;
    worker_meta = comm_.all_to_all_v<int32_t>(std::span<const int32_t>(inside_meta),
                                              inside.scaled(inside_ints), &meta_received);
    for (int r = 0; r < num_ranks; ++r) worker_records_per_rank[r] = meta_received[r] / inside_ints;
    const Blocks received(worker_records_per_rank);
    worker_rows.resize(static_cast<size_t>(received.total() * row_bytes));
    comm_.all_to_all_v(inside_rows.data(), inside.scaled(row_bytes), inside.scaled_offsets(row_bytes),
                       worker_rows.data(), received.scaled(row_bytes), received.scaled_offsets(row_bytes));
  }
  const Blocks at_worker(worker_records_per_rank);
  stats_.dispatch_seconds += seconds_since(start);

  // ---- 3. Experts, then each record's weighted sum in slot order (absent slots add an exact 0). ----
  start = clock::now();
  const int64_t num_records = at_worker.total();
  std::vector<int32_t> expert_source, expert_of_row;
  std::vector<float> weight_of_row;  // each row's routing weight (the store's policies)
  std::vector<int32_t> positions(static_cast<size_t>(num_records * top_k));
  std::vector<float> weights(static_cast<size_t>(num_records * top_k), 0.0f);
  for (int64_t record = 0; record < num_records; ++record) {
    const int32_t* meta = worker_meta.data() + record * inside_ints;
    for (int64_t k = 0; k < top_k; ++k) {
      const int32_t expert = meta[1 + 2 * k];
      if (expert < 0) continue;
      if (expert >= moe.num_experts || !table_.hosts(rank, layer, expert) || !hosts(layer, expert))
        throw Error(ErrorCode::kInternal, "rank " + std::to_string(rank) + ": received a row for layer " +
                                              std::to_string(layer) + " expert " + std::to_string(expert) +
                                              ", which this worker does not host");
      positions[record * top_k + k] = static_cast<int32_t>(expert_of_row.size());
      weights[record * top_k + k] = weight_of(meta[2 + 2 * k]);
      expert_source.push_back(static_cast<int32_t>(record));
      expert_of_row.push_back(expert);
      weight_of_row.push_back(weights[record * top_k + k]);
    }
  }
  const int64_t num_rows = static_cast<int64_t>(expert_of_row.size());
  for (int64_t record = 0; record < num_records; ++record)
    for (int64_t k = 0; k < top_k; ++k)
      if (worker_meta[record * inside_ints + 1 + 2 * k] < 0)
        positions[record * top_k + k] = static_cast<int32_t>(num_rows);
  const std::vector<char> zero_row(static_cast<size_t>(row_bytes), 0);
  std::vector<char> partial_rows(static_cast<size_t>(num_records * row_bytes));
  if (num_records > 0) {
    const Tensor received = scratch_.get(kInsideRows, act, {num_records, hidden_size});
    backend_.copy_from_host(received, 0, worker_rows.data(), received.bytes());
    const Tensor source = scratch_.get(kExpertSource, ScalarType::kI32, {num_rows});
    backend_.copy_from_host(source, 0, expert_source.data(), source.bytes());
    const Tensor rows = scratch_.get(kExpertRows, act, {num_rows, hidden_size});
    backend_.gather_rows(received, source, rows);
    const Tensor experts = scratch_.get(kExpertIds, ScalarType::kI32, {num_rows});
    backend_.copy_from_host(experts, 0, expert_of_row.data(), experts.bytes());
    // The outputs in row order in a [records * top_k] table (combine_top_k's shape), whose row num_rows,
    // when there is one (some slot is not on this rank), is zero: every absent slot points there.
    const Tensor with_zero = scratch_.get(kExpertOut, act, {num_records * top_k, hidden_size});
    compute_rows(layer, expert_of_row, weight_of_row, rows, experts,
                 scratch_.get(kExpertSorted, act, {num_rows, hidden_size}),
                 workspace.get(kSlotExpertOut, act, {num_rows, hidden_size}),
                 with_zero.rows_view(0, num_rows), workspace);
    if (num_rows < num_records * top_k)
      backend_.copy_from_host(with_zero, static_cast<size_t>(num_rows * row_bytes), zero_row.data(),
                              zero_row.size());
    const Tensor position_tensor = scratch_.get(kPositions, ScalarType::kI32, {num_records * top_k});
    backend_.copy_from_host(position_tensor, 0, positions.data(), position_tensor.bytes());
    const Tensor weight_tensor = scratch_.get(kWeights, ScalarType::kF32, {num_records, top_k});
    backend_.copy_from_host(weight_tensor, 0, weights.data(), weight_tensor.bytes());
    const Tensor partial = scratch_.get(kPartial, act, {num_records, hidden_size});
    backend_.combine_top_k(with_zero, position_tensor, weight_tensor, partial);
    backend_.copy_to_host(partial, 0, partial_rows.data(), partial_rows.size());
  }
  count_expert_rows(layer, expert_of_row);
  stats_.expert_seconds += seconds_since(start);

  // Sums rows of `summands` per output row: out[i] = sum over j, in order, of
  // summands[positions[i * width + j]] with weight 1; position `count` (past the summands) is a zero
  // row, exact to add. The table has combine_top_k's shape, [outputs * width] rows; count is fewer
  // whenever a zero is needed.
  auto sum_rows = [&](const std::vector<char>& summands, const std::vector<int32_t>& sum_positions,
                      int64_t outputs, int64_t width, const Tensor& destination_rows) {
    const int64_t count = static_cast<int64_t>(summands.size()) / row_bytes;
    const Tensor rows = scratch_.get(kSummands, act, {outputs * width, hidden_size});
    if (count > 0) backend_.copy_from_host(rows, 0, summands.data(), summands.size());
    if (count < outputs * width)
      backend_.copy_from_host(rows, static_cast<size_t>(count * row_bytes), zero_row.data(), zero_row.size());
    const Tensor position_tensor = scratch_.get(kPositions, ScalarType::kI32, {outputs * width});
    backend_.copy_from_host(position_tensor, 0, sum_positions.data(), position_tensor.bytes());
    const std::vector<float> ones(static_cast<size_t>(outputs * width), 1.0f);
    const Tensor weight_tensor = scratch_.get(kWeights, ScalarType::kF32, {outputs, width});
    backend_.copy_from_host(weight_tensor, 0, ones.data(), weight_tensor.bytes());
    backend_.combine_top_k(rows, position_tensor, weight_tensor, destination_rows);
  };

  // ---- 4. Partials back to the gateways, summed in rank order into one row per node. --------------
  start = clock::now();
  std::vector<char> returned_partials(static_cast<size_t>(inside.total() * row_bytes));
  {
    const Communicator::Activity activity(comm_, what + " combine inside the node");
    comm_.all_to_all_v(partial_rows.data(), at_worker.scaled(row_bytes), at_worker.scaled_offsets(row_bytes),
                       returned_partials.data(), inside.scaled(row_bytes), inside.scaled_offsets(row_bytes));
  }
  std::vector<char> node_rows(static_cast<size_t>(at_gateway.total() * row_bytes));
  if (at_gateway.total() > 0) {
    // Partial of (gateway record, local rank m) or the zero row.
    std::vector<int32_t> sum_positions(static_cast<size_t>(at_gateway.total() * node_size),
                                       static_cast<int32_t>(inside.total()));
    for (int target : node_ranks) {
      for (int64_t i = inside.offsets[target]; i < inside.offsets[target + 1]; ++i) {
        const int32_t gateway_record = inside_meta[i * inside_ints];
        sum_positions[gateway_record * node_size + topology.local_index(target)] = static_cast<int32_t>(i);
      }
    }
    const Tensor node_sum = scratch_.get(kNodeSum, act, {at_gateway.total(), hidden_size});
    sum_rows(returned_partials, sum_positions, at_gateway.total(), node_size, node_sum);
    backend_.copy_to_host(node_sum, 0, node_rows.data(), node_rows.size());
  }

  // ---- 5. Node rows back across; the sender sums them in node order into `out`. ------------------
  std::vector<char> returned_nodes(static_cast<size_t>(across.total() * row_bytes));
  {
    const Communicator::Activity activity(comm_, what + " combine across nodes");
    comm_.all_to_all_v(node_rows.data(), at_gateway.scaled(row_bytes), at_gateway.scaled_offsets(row_bytes),
                       returned_nodes.data(), across.scaled(row_bytes), across.scaled_offsets(row_bytes));
    count_across(at_gateway.scaled(row_bytes));
  }
  if (num_tokens > 0) {
    std::vector<int32_t> sum_positions(static_cast<size_t>(num_tokens * num_nodes),
                                       static_cast<int32_t>(across.total()));
    for (int gateway = 0; gateway < num_ranks; ++gateway) {
      const int node = topology.node_of(gateway);
      for (int64_t i = across.offsets[gateway]; i < across.offsets[gateway + 1]; ++i)
        sum_positions[across_source_row[i] * num_nodes + node] = static_cast<int32_t>(i);
    }
    sum_rows(returned_nodes, sum_positions, num_tokens, num_nodes, out);
  }
  backend_.synchronize();  // the host buffers above are the sources of asynchronous copies
  stats_.combine_seconds += seconds_since(start);
  stats_.inter_node_bytes_sent += inter_node_bytes;
  stats_.bytes_sent += comm_.bytes_sent() - sent_before;
  stats_.bytes_received += comm_.bytes_received() - received_before;
}

}  // namespace epic
