// Picks and makes the backend of a process (see backend_choice.h).
#include "launch/backend_choice.h"

#include <cstdlib>

#include "kernels/error.h"
#ifdef EPIC_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace epic::cli {

bool cuda_available() {
#ifdef EPIC_HAVE_CUDA
  return cuda_device_count() > 0;
#else
  return false;
#endif
}

int launcher_local_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PMIX_LOCAL_RANK"}) {
    const char* value = std::getenv(name);
    if (value != nullptr && *value != '\0') return std::atoi(value);
  }
  return 0;
}

void check_backend_flags(const BackendFlags& flags) {
  if (flags.backend != "auto" && flags.backend != "cpu" && flags.backend != "cuda")
    throw Error(ErrorCode::kInvalidArgument,
                "--backend must be cpu or cuda (or auto: cuda where a GPU is visible), got '" + flags.backend + "'");
  if (flags.precision != "auto" && flags.precision != "fp32" && flags.precision != "bf16")
    throw Error(ErrorCode::kInvalidArgument,
                "--precision must be fp32 (verification) or bf16 (serving, cuda only), got '" + flags.precision + "'");
  if (flags.device && *flags.device < 0)
    throw Error(ErrorCode::kInvalidArgument, "--device must be >= 0, got " + std::to_string(*flags.device));
  if (flags.backend == "cpu" && flags.precision == "bf16")
    throw Error(ErrorCode::kInvalidArgument,
                "--precision bf16 needs --backend cuda: the cpu backend is the fp32 reference");
  if (flags.backend == "cpu" && flags.device)
    throw Error(ErrorCode::kInvalidArgument, "--device selects a GPU; it does not apply to --backend cpu");
}

ChosenBackend choose_backend(const BackendFlags& flags, int local_rank, int cpu_threads) {
  check_backend_flags(flags);
  const bool use_cuda = flags.backend == "cuda" || (flags.backend == "auto" && cuda_available());
  ChosenBackend chosen;
  if (!use_cuda) {
    if (flags.precision == "bf16")
      throw Error(ErrorCode::kInvalidArgument,
                  "--precision bf16 needs a GPU (the cpu backend is the fp32 reference), and none is visible");
    chosen.backend = make_cpu_backend(cpu_threads);
    chosen.activation_type = ScalarType::kF32;
    chosen.description = "cpu, fp32";
    return chosen;
  }
#ifdef EPIC_HAVE_CUDA
  const int count = cuda_device_count();
  if (count == 0)
    throw Error(ErrorCode::kInvalidArgument,
                "--backend cuda: no CUDA device is visible (no driver or no GPU; check nvidia-smi and "
                "CUDA_VISIBLE_DEVICES); run with --backend cpu");
  const int device = flags.device.value_or(local_rank % count);
  if (device >= count)
    throw Error(ErrorCode::kInvalidArgument, "--device " + std::to_string(device) + " is out of range: " +
                                                 std::to_string(count) + " CUDA device(s) are visible (0 .. " +
                                                 std::to_string(count - 1) + ")");
  chosen.backend = make_cuda_backend(device);
  chosen.activation_type = flags.precision == "fp32" ? ScalarType::kF32 : ScalarType::kBF16;
  chosen.description = "cuda device " + std::to_string(device) + ": " + cuda_device_description(device) + ", " +
                       (chosen.activation_type == ScalarType::kBF16 ? "bf16" : "fp32");
  return chosen;
#else
  (void)local_rank;
  throw Error(ErrorCode::kInvalidArgument,
              "--backend cuda: this epic was built without the CUDA backend (nvcc was not found at configure "
              "time); rebuild on a machine with the CUDA toolkit, or run with --backend cpu");
#endif
}

}  // namespace epic::cli
