// The --ep-transport choice (see ep_transport.h).
#include "launch/ep_transport.h"

#include "kernels/error.h"

namespace epic::cli {

const char* ep_transport_name(EpTransport transport) {
  switch (transport) {
    case EpTransport::kLocal:
      return "local";
    case EpTransport::kHost:
      return "host";
    case EpTransport::kNccl:
      return "nccl";
  }
  return "?";
}

void check_ep_transport_flag(const std::string& transport, const std::string& backend) {
  if (transport != "auto" && transport != "nccl" && transport != "host")
    throw Error(ErrorCode::kInvalidArgument,
                "--ep-transport must be auto, nccl or host, got '" + transport + "'");
  if (transport == "nccl" && backend == "cpu")
    throw Error(
        ErrorCode::kInvalidArgument,
        "--ep-transport nccl needs --backend cuda (NCCL moves device buffers); with --backend cpu use "
        "--ep-transport host or auto");
}

EpTransport choose_ep_transport(const std::string& transport, bool device_backend, int num_ranks,
                                bool nccl_built) {
  check_ep_transport_flag(transport, device_backend ? "cuda" : "cpu");
  if (transport == "nccl") {
    if (!nccl_built)
      throw Error(
          ErrorCode::kInvalidArgument,
          "--ep-transport nccl: this build has no NCCL communicator (configure with the CUDA backend and "
          "NCCL found, EPIC_ENABLE_NCCL=ON), use --ep-transport host");
    return EpTransport::kNccl;
  }
  if (transport == "host") return EpTransport::kHost;
  if (!device_backend) return EpTransport::kHost;
  if (num_ranks == 1) return EpTransport::kLocal;
  return nccl_built ? EpTransport::kNccl : EpTransport::kHost;
}

}  // namespace epic::cli
