// `--ep-transport auto|nccl|host` (epic run, epic bench-moe): how GPU workers exchange MoE rows. nccl:
// the NCCL executor on device buffers; host: the MPI executor through host memory; local: one GPU
// worker computes its MoE blocks alone (no exchange). Pure logic, so it is tested on the CPU.
#pragma once

#include <string>

namespace epic::cli {

enum class EpTransport { kLocal, kHost, kNccl };

const char* ep_transport_name(EpTransport transport);

// Names only, before any device is touched: Error(kInvalidArgument) (exit 2) for an unknown value, or
// nccl with --backend cpu (NCCL moves device buffers).
void check_ep_transport_flag(const std::string& transport, const std::string& backend);

// The transport for a job of `num_ranks` on a backend (device_backend: memory on a GPU), NCCL built or
// not. auto: nccl with a device backend, several ranks and NCCL built; local for one GPU worker; host
// otherwise. nccl (explicit): Error(kInvalidArgument) without a device backend or without NCCL in the
// build; with one rank it runs the NCCL executor alone (its overhead against local). host: host, also on
// one GPU worker (the MPI executor's per-phase clocks).
EpTransport choose_ep_transport(const std::string& transport, bool device_backend, int num_ranks,
                                bool nccl_built);

}  // namespace epic::cli
