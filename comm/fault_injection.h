// Faults on demand, for the tests of what the job does when a rank gets stuck or dies mid-run. Test
// use only: EPIC_TEST_COMM_FAULT="RANK:COLLECTIVE:ACTION" makes world rank RANK, on reaching collective
// number COLLECTIVE (1 = the first) of the first communicator it created, do ACTION before entering it:
//   stop   raise SIGSTOP (a stuck rank)      spin  compute forever (an endless loop)
//   kill   raise SIGKILL (a dead rank)       throw throw Error(kInternal) on this rank alone
// Unset (always, outside tests): nothing happens. A malformed value is an error naming the variable.
#pragma once

#include <cstdint>

namespace epic {

// Called by MpiCommunicator before it enters a collective.
void inject_test_fault(int comm_index, int rank, int64_t sequence);

}  // namespace epic
