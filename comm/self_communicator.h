// A one-rank Communicator for a single process without MPI: every collective is a local copy.
#pragma once

#include "comm/communicator.h"

namespace epic {

class SelfCommunicator final : public Communicator {
 public:
  // The typed helpers share their names with the byte-level overrides below.
  using Communicator::all_to_all_v;

  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return "self"; }

  void all_to_all_v(const void* send, const std::vector<int64_t>& send_bytes,
                    const std::vector<int64_t>& send_offsets, void* recv,
                    const std::vector<int64_t>& recv_bytes,
                    const std::vector<int64_t>& recv_offsets) override;
  void all_gather(const void* send, int64_t bytes, void* recv) override;
  void broadcast(void* data, int64_t bytes, int root) override;
  void barrier() override {}
};

}  // namespace epic
