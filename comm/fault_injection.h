// Faults on demand, for the tests of what the job does when a rank gets stuck, dies or fails mid-run. Test
// use only; unset (always, outside tests), nothing happens. A malformed value is an error naming the
// variable.
//   EPIC_TEST_COMM_FAULT="RANK:COLLECTIVE:ACTION": world rank RANK, on reaching collective number COLLECTIVE
//     (1 = the first) of the first communicator it created, does ACTION before entering it.
//   EPIC_TEST_STEP_FAULT="RANK:STEP:ACTION": rank RANK (or * for every rank) does ACTION at generation step
//     STEP (1 = the first, which prefills), after the step's agreement and before its forward pass, so its
//     peers wait for it in the step's MoE collectives.
// ACTION: stop  raise SIGSTOP (a stuck rank)      spin  compute forever (an endless loop)
//         kill  raise SIGKILL (a dead rank)       throw throw Error(kInternal) on this rank alone
//         nan   (steps only) the step's logits turn NaN, so the generation loop's own check raises its error
#pragma once

#include <cstdint>
#include <string>

namespace epic {

// Called by MpiCommunicator before it enters a collective; `activity` names what it is for (may be empty).
void inject_test_fault(int comm_index, int rank, int64_t sequence, const std::string& activity);

// Called by the generation loop at the start of each step. Returns true when the step's logits must be
// made NaN (action nan); does the other actions itself.
bool inject_test_step_fault(int rank, int64_t step);

}  // namespace epic
