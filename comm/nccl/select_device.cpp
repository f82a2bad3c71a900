// select_device: gathers host names, chooses and activates the device, agrees on the outcome.
#include "comm/nccl/select_device.h"

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <span>
#include <string>
#include <vector>

#include "comm/node_topology.h"
#include "kernels/error.h"

namespace epic {

namespace {

std::vector<std::string> all_gather_strings(Communicator& host, const std::string& text) {
  const std::vector<std::vector<char>> gathered = host.all_gather_v<char>(std::span<const char>(text));
  std::vector<std::string> strings;
  for (const std::vector<char>& chars : gathered) strings.emplace_back(chars.begin(), chars.end());
  return strings;
}

std::string cuda_error_text(cudaError_t status) {
  return std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")";
}

// This rank's choice, made current: the PCI bus id, or throws.
std::string activate_device(int device) {
  cudaError_t status = cudaSetDevice(device);
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw Error(ErrorCode::kUnsupported,
                "cudaSetDevice(" + std::to_string(device) + ") failed: " + cuda_error_text(status));
  }
  char bus_id[64] = {};
  status = cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), device);
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw Error(ErrorCode::kUnsupported,
                "cudaDeviceGetPCIBusId(" + std::to_string(device) + ") failed: " + cuda_error_text(status));
  }
  return bus_id;
}

// An outcome on the wire: "+<bus id>" or "-<error code number>:<message>".
std::string encode_failure(const Error& error) {
  return "-" + std::to_string(static_cast<int>(error.code())) + ":" + error.what();
}

}  // namespace

SelectedDevice select_device(Communicator& host, std::optional<int> device_override) {
  const std::vector<std::string> hosts = all_gather_strings(host, this_host_name());
  SelectedDevice selected;
  std::string outcome;
  try {
    selected.local = node_local_rank(node_local_rank_from_hosts(hosts, host.rank()), std::getenv);
    int num_devices = 0;  // cudaGetDeviceCount leaves it untouched when it fails (no driver)
    const cudaError_t status = cudaGetDeviceCount(&num_devices);
    if (status != cudaSuccess) {
      cudaGetLastError();
      throw Error(ErrorCode::kUnsupported,
                  "no usable CUDA device: cudaGetDeviceCount failed: " + cuda_error_text(status));
    }
    selected.device = choose_device(selected.local, num_devices, device_override);
    selected.pci_bus_id = activate_device(selected.device);
    outcome = "+" + selected.pci_bus_id;
  } catch (const Error& error) {
    outcome = encode_failure(error);
  }

  const std::vector<std::string> outcomes = all_gather_strings(host, outcome);
  std::string failures;
  ErrorCode first_code = ErrorCode::kInternal;
  std::vector<std::string> bus_ids;
  for (size_t rank = 0; rank < outcomes.size(); ++rank) {
    const std::string& text = outcomes[rank];
    if (!text.empty() && text[0] == '+') {
      bus_ids.push_back(text.substr(1));
      continue;
    }
    const size_t colon = text.find(':');
    if (failures.empty() && colon != std::string::npos)
      first_code = static_cast<ErrorCode>(std::atoi(text.substr(1, colon).c_str()));
    failures += (failures.empty() ? "" : "; ") + std::string("rank ") + std::to_string(rank) + " on " +
                hosts[rank] + ": " + (colon == std::string::npos ? text : text.substr(colon + 1));
  }
  if (!failures.empty()) throw Error(first_code, "NCCL communicator: no GPU for every rank: " + failures);
  check_distinct_devices(hosts, bus_ids);
  return selected;
}

}  // namespace epic
