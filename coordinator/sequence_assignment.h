// Which worker runs each sequence (attention is data parallel: a sequence lives on one worker).
// Greedy longest-first onto the least-loaded worker, where a sequence's load is its prompt length
// plus the tokens it may generate; deterministic (ties go to the lower sequence / worker index).
#pragma once

#include <cstdint>
#include <vector>

namespace epic {

// Returns the worker of each sequence. Workers may get no sequence (they still join every MoE
// layer). Error(kInvalidArgument) when num_workers < 1.
std::vector<int> assign_sequences(const std::vector<int64_t>& sequence_costs, int num_workers);

}  // namespace epic
