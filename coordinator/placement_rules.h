// Private to the placement sources: the rules every plan keeps (checked the same way for a fresh
// plan, a JSON file and cereal bytes) and the figures derived from a layer's worker lists.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "coordinator/placement.h"

namespace epic::placement_rules {

// Error(kInvalidArgument) "<source>: layer L: <problem>" unless: layer.worker_experts has one list
// per worker, each no longer than slots_per_worker, of expert ids in [0, num_experts) that are
// present, none twice on one worker, and every present expert is on some worker; expert_load has
// num_experts finite non-negative entries. present has num_experts entries.
void check_layer(const LayerPlacement& layer, const std::vector<uint8_t>& present, int num_workers,
                 const std::string& source);

// Sorts each worker's experts and rebuilds expert_workers and worker_load (each replica carries
// load / replicas) from worker_experts and expert_load. Call after check_layer.
void derive_layer_figures(LayerPlacement& layer, int num_workers);

// The present mask a finished layer implies: an expert is present when some worker holds it.
std::vector<uint8_t> present_mask(const LayerPlacement& layer);

// JSON for people: objects one key a line, arrays of numbers on one line.
std::string readable_json(const nlohmann::ordered_json& value);

}  // namespace epic::placement_rules
