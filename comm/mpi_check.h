// Checked MPI calls: EPIC_MPI_CHECK(MPI_Foo(...)) throws Error(kCommunication) naming the statement,
// file:line, this process's MPI_COMM_WORLD rank and MPI's own error string. Needs MPI_ERRORS_RETURN on
// the communicator the call uses (MpiCommunicator sets it), else MPI aborts before we can report.
#pragma once

#include <mpi.h>

#include <cstdio>
#include <string>

#include "kernels/error.h"

namespace epic {

// The MPI_COMM_WORLD rank as a string for messages; "?" before MPI_Init or after MPI_Finalize.
inline std::string mpi_world_rank_for_message() {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return "?";
  int rank = -1;
  if (MPI_Comm_rank(MPI_COMM_WORLD, &rank) != MPI_SUCCESS) return "?";
  return std::to_string(rank);
}

inline std::string mpi_error_string(int status) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(status, text, &length) != MPI_SUCCESS) return "MPI error " + std::to_string(status);
  return std::string(text, static_cast<size_t>(length)) + " (MPI error " + std::to_string(status) + ")";
}

inline std::string mpi_failure_message(int status, const char* statement, const char* file, int line) {
  return "MPI call failed on rank " + mpi_world_rank_for_message() + ": " + statement + " at " + file + ":" +
         std::to_string(line) + ": " + mpi_error_string(status);
}

}  // namespace epic

// Throws epic::Error(kCommunication) when the MPI call does not return MPI_SUCCESS.
#define EPIC_MPI_CHECK(statement)                                                                         \
  do {                                                                                                    \
    const int epic_mpi_status_ = (statement);                                                             \
    if (epic_mpi_status_ != MPI_SUCCESS) {                                                                \
      throw ::epic::Error(::epic::ErrorCode::kCommunication,                                              \
                          ::epic::mpi_failure_message(epic_mpi_status_, #statement, __FILE__, __LINE__)); \
    }                                                                                                     \
  } while (0)

// For destructors and other places that must not throw: reports the failure on stderr and goes on.
#define EPIC_MPI_WARN(statement)                                                                           \
  do {                                                                                                     \
    const int epic_mpi_status_ = (statement);                                                              \
    if (epic_mpi_status_ != MPI_SUCCESS) {                                                                 \
      std::fprintf(stderr, "epic: warning: %s\n",                                                          \
                   ::epic::mpi_failure_message(epic_mpi_status_, #statement, __FILE__, __LINE__).c_str()); \
    }                                                                                                      \
  } while (0)
