// Picks and activates this rank's CUDA device for the NCCL communicator (device_choice.h's rules applied
// to the launcher's environment, the host names and the driver), agreed across the ranks.
#pragma once

#include <optional>
#include <string>

#include "comm/communicator.h"
#include "comm/nccl/device_choice.h"

namespace epic {

struct SelectedDevice {
  int device = 0;  // the CUDA device index in this process (cudaSetDevice has been called)
  NodeLocalRank local;
  std::string pci_bus_id;  // e.g. "0000:19:00.0"
};

// A collective over `host`: every rank calls it. Each rank chooses (choose_device), makes the device
// current and reads its PCI bus id; then the ranks exchange outcomes, so that a rank without a GPU fails
// every rank at once with the same message naming it, instead of leaving its peers to time out in NCCL's
// start-up. Two ranks on one GPU fail the same way (check_distinct_devices).
SelectedDevice select_device(Communicator& host, std::optional<int> device_override);

}  // namespace epic
