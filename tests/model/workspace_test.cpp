// Workspace: its slots (the runner's default count, or an owner's own), growth and the generation count
// that tells captured graphs they are stale.
#include "worker/workspace.h"

#include <gtest/gtest.h>

#include <string>

#include "kernels/backend.h"
#include "kernels/error.h"

namespace epic {
namespace {

TEST(Workspace, SlotsBeyondTheCountAreAnInternalErrorNamingIt) {
  const auto backend = make_cpu_backend();
  Workspace runner_slots(*backend);
  EXPECT_NO_THROW(runner_slots.get(kNumWorkspaceSlots - 1, ScalarType::kF32, {4}));
  try {
    runner_slots.get(kNumWorkspaceSlots, ScalarType::kF32, {4});
    ADD_FAILURE() << "a slot past kNumWorkspaceSlots was handed out";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInternal);
    EXPECT_NE(std::string(e.what()).find("slot " + std::to_string(kNumWorkspaceSlots)), std::string::npos)
        << e.what();
  }
  // An owner with its own numbering (the expert-parallel executor's two exchanges) asks for more.
  Workspace own_slots(*backend, kNumWorkspaceSlots + 10);
  const Tensor last = own_slots.get(kNumWorkspaceSlots + 9, ScalarType::kF32, {4});
  EXPECT_NE(last.data, nullptr);
  EXPECT_THROW(own_slots.get(-1, ScalarType::kF32, {4}), Error);
}

TEST(Workspace, GrowingASlotBumpsTheGenerationAndReusingItDoesNot) {
  const auto backend = make_cpu_backend();
  Workspace workspace(*backend);
  workspace.get(0, ScalarType::kF32, {16});
  const uint64_t after_first = workspace.generation();
  workspace.get(0, ScalarType::kF32, {8});  // fits: the same buffer
  EXPECT_EQ(workspace.generation(), after_first);
  workspace.get(0, ScalarType::kF32, {1024});  // does not fit: a new buffer, graphs made before are stale
  EXPECT_GT(workspace.generation(), after_first);
  EXPECT_GE(workspace.bytes(), 1024 * sizeof(float));
}

}  // namespace
}  // namespace epic
