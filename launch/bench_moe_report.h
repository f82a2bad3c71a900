// bench-moe's NCCL figures of one rank (what every rank gathers to rank 0) and how rank 0 prints them
// and writes them as JSON: per rank, max over ranks, ours against the baselines (bench_moe_nccl.h).
// Pure host code, so it is tested on the CPU.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace epic::cli {

// Per MoE layer call (seconds, bytes), averaged over layers and timed iterations.
struct NcclRankFigures {
  double route_seconds = 0;
  double dispatch_seconds = 0;         // layout + count exchange + host read of counts + rows all-to-all
  double count_exchange_seconds = 0;   // part of dispatch
  double rows_all_to_all_seconds = 0;  // part of dispatch
  double expert_seconds = 0;
  double combine_seconds = 0;          // all-to-all back + sum
  double dispatch_bytes_off_rank = 0;  // sent to other ranks
  double combine_bytes_off_rank = 0;
  // Baselines (0 when not measured).
  double baseline_dispatch_seconds = 0;  // NCCL all_to_all_v of the dispatch's per-peer bytes
  double baseline_combine_seconds = 0;   // ... of the combine's
  double link_gigabytes_per_second =
      0;                          // send/recv with one peer, per direction, mean over this rank's pairs
  double link_floor_seconds = 0;  // one 8-byte send/recv with a peer

  std::vector<double> to_columns() const;
  // Error(kInternal) when the count of columns is wrong.
  static NcclRankFigures from_columns(const std::vector<double>& columns);
};

struct NcclReportShape {
  std::string card;  // the backend's description, with the GPU name
  int64_t tokens_per_rank = 0, hidden = 0, top_k = 0, experts = 0, layers = 0, iterations = 0;
  int ranks = 0;
  bool baselines = false;
  int64_t link_bytes = 0;
};

// The lines rank 0 prints (per rank, max over ranks, ratios to the baselines, share of the link).
std::string format_nccl_report(const NcclReportShape& shape, const std::vector<NcclRankFigures>& ranks);
// The same as JSON (the "nccl" object of bench-moe's --json).
nlohmann::json nccl_report_json(const NcclReportShape& shape, const std::vector<NcclRankFigures>& ranks);

}  // namespace epic::cli
