// OpenMPI on one small machine, as root, in containers (shared/ENVIRONMENT.md): allowed as root,
// oversubscribed, shared memory without cross-memory attach. Tests that start mpirun call this once;
// a value already set in the environment wins.
#pragma once

#include <cstdlib>
#include <utility>
#include <vector>

namespace epic::testing {

inline bool set_mpi_test_environment() {
  for (const auto& [name, value] :
       std::vector<std::pair<const char*, const char*>>{{"OMPI_ALLOW_RUN_AS_ROOT", "1"},
                                                        {"OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"},
                                                        {"OMPI_MCA_rmaps_base_oversubscribe", "1"},
                                                        {"OMPI_MCA_btl", "self,vader"},
                                                        {"OMPI_MCA_pml", "ob1"},
                                                        {"OMPI_MCA_btl_vader_single_copy_mechanism", "none"}})
    setenv(name, value, /*overwrite=*/0);
  return true;
}

}  // namespace epic::testing
